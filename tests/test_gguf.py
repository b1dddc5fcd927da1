"""convert/gguf.py: GGUF -> Hugging Face folder.

The real bundled file is compared with transformers' own GGUF loader, run live in the
reference environment (tests/refenv.py). Tolerance: exact (0 ulp) in float32, because both
sides dequantize with the same `gguf.quants.dequantize` numpy code and the q/k un-permutation
is a pure reordering, so there is no rounding to differ in. A tiny random GGUF written with
`gguf.GGUFWriter` covers what the real file lacks (an untied lm_head, every output dtype) and
the rejections.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from refenv import run_reference
from safetensors import safe_open
from safetensors.numpy import load_file
from tiny_gguf import HEAD_DIM, HEADS, KV_HEADS, llama_cpp_permute, write_tiny_gguf

from awq_jax.bundled import bundled_gguf_path
from convert.gguf import GGUFImportError, import_gguf, unpermute_rows


@pytest.mark.slow
def test_bundled_tensors_equal_transformers_gguf_loader(bundled_model_dir, tmp_path):
    run_reference("hf_gguf_tensors.py", bundled_gguf_path(), tmp_path)
    ref = load_file(tmp_path / "model.safetensors")
    ours = load_file(bundled_model_dir / "model.safetensors")
    assert sorted(ours) == sorted(ref)
    assert len(ours) == 2 + 30 * 9  # tied: no lm_head.weight on either side
    for name, want in ref.items():
        assert ours[name].dtype == np.float32 and ours[name].shape == want.shape, name
        np.testing.assert_array_equal(ours[name], want, err_msg=name)

    # The un-permutation is not a no-op on this file: without it q and k would differ.
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    k = ours["model.layers.0.self_attn.k_proj.weight"]
    assert not np.array_equal(llama_cpp_permute(q, 9), q)
    assert not np.array_equal(llama_cpp_permute(k, 3), k)

    # transformers derives the same config from the GGUF.
    ref_cfg = json.loads((tmp_path / "config.json").read_text())
    cfg = json.loads((bundled_model_dir / "config.json").read_text())
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert cfg[key] == ref_cfg[key], key
    assert cfg["rope_theta"] == ref_cfg["rope_parameters"]["rope_theta"]
    # GGUF stores eps as float32; we write the decimal it rounds from, transformers the float32.
    assert np.float32(cfg["rms_norm_eps"]) == np.float32(ref_cfg["rms_norm_eps"])


@pytest.mark.slow
def test_bundled_config_as_documented(bundled_model_dir):
    cfg = json.loads((bundled_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["intermediate_size"] == 1536
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0
    assert cfg["rms_norm_eps"] == 1e-5
    assert cfg["rope_scaling"] is None
    assert cfg["max_position_embeddings"] == 8192
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["torch_dtype"] == "float32"
    gen = json.loads((bundled_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    tok_cfg = json.loads((bundled_model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>"
    assert tok_cfg["add_bos_token"] is False
    assert "<|im_start|>" in tok_cfg["chat_template"]


@pytest.mark.parametrize(("n_heads", "head_dim"), [(9, 64), (3, 64), (4, 2)])
def test_unpermute_inverts_llama_cpp_permute(n_heads, head_dim):
    w = np.random.default_rng(0).normal(size=(n_heads * head_dim, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, n_heads), n_heads), w)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_tiny_untied_import_every_dtype(tmp_path, dtype):
    expected = write_tiny_gguf(tmp_path / "tiny.gguf", tied=False)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", dtype=dtype, progress=False)
    assert out == tmp_path / "hf"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert cfg["torch_dtype"] == dtype
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert cfg["head_dim"] == HEAD_DIM
    assert cfg["rms_norm_eps"] == 1e-6
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
    with safe_open(out / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(expected)
        assert "lm_head.weight" in expected
        for name, want in expected.items():
            got = f.get_tensor(name)
            assert got.dtype == np_dtype[dtype], name
            # Exact: the only rounding is the one cast from float32, done identically here.
            np.testing.assert_array_equal(got, want.astype(np_dtype[dtype]), err_msg=name)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_tiny_tied_has_no_lm_head(tmp_path):
    expected = write_tiny_gguf(tmp_path / "tiny.gguf", tied=True)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", dtype="float32", progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert sorted(load_file(out / "model.safetensors")) == sorted(expected)
    assert "lm_head.weight" not in expected


def test_rejects_non_llama_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "q.gguf", arch="qwen2")
    with pytest.raises(GGUFImportError, match=r"architecture 'qwen2' is not supported.*llama"):
        import_gguf(tmp_path / "q.gguf", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"extra_keys": {"llama.rope.scaling.type": "linear"}}, "llama.rope.scaling.type"),
        ({"extra_keys": {"llama.expert_count": 8}}, "llama.expert_count"),
        ({"extra_keys": {"llama.attention.sliding_window": 64}}, "llama.attention.sliding_window"),
        (
            {"extra_tensors": {"rope_freqs.weight": np.ones(8, np.float32)}},
            "rope_freqs.weight",
        ),
        ({"extra_tensors": {"blk.0.attn_q.bias": np.ones(64, np.float32)}}, "blk.0.attn_q.bias"),
        ({"drop_tensors": ("blk.1.ffn_up.weight",)}, "missing tensors: blk.1.ffn_up.weight"),
    ],
)
def test_rejects_what_it_does_not_handle(tmp_path, kwargs, message):
    write_tiny_gguf(tmp_path / "x.gguf", **kwargs)
    with pytest.raises(GGUFImportError, match=message) as e:
        import_gguf(tmp_path / "x.gguf", tmp_path / "hf")
    assert str(tmp_path / "x.gguf") in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_existing_output_refused_unless_overwrite(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)
    (out / "marker").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        import_gguf(tmp_path / "tiny.gguf", out, progress=False)
    import_gguf(tmp_path / "tiny.gguf", out, overwrite=True, progress=False)
    assert not (out / "marker").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]


def test_overwrite_never_deletes_the_input_or_a_folder_of_other_things(tmp_path):
    """The audit's case: ``import-gguf ggdir/model.gguf ggdir --overwrite`` deleted both."""
    src = tmp_path / "ggdir"
    src.mkdir()
    write_tiny_gguf(src / "tiny.gguf")
    with pytest.raises(ValueError, match="would replace the input"):
        import_gguf(src / "tiny.gguf", src, overwrite=True, progress=False)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="does not look like a model checkpoint"):
        import_gguf(src / "tiny.gguf", notes, overwrite=True, progress=False)
    (tmp_path / "a.txt").write_text("a file")
    with pytest.raises(FileExistsError, match="not a folder"):
        import_gguf(src / "tiny.gguf", tmp_path / "a.txt", overwrite=True, progress=False)
    with pytest.raises(GGUFImportError, match="is a folder"):
        import_gguf(src, tmp_path / "hf", progress=False)
    assert [p.name for p in src.iterdir()] == ["tiny.gguf"]
    assert (notes / "README.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "ggdir", "notes"]


def test_truncated_gguf_names_the_file(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(GGUFImportError, match="cut.gguf"):
        import_gguf(tmp_path / "cut.gguf", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_sigterm_during_the_write_leaves_nothing(tmp_path, monkeypatch, capsys):
    """The CLI turns SIGTERM into an exception, so the staging folder is removed (exit 143)."""
    import os
    import signal

    import convert.gguf as mod
    from convert.cli import main

    write_tiny_gguf(tmp_path / "tiny.gguf")

    def killed_write(path, *args, **kwargs):
        path.write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(mod, "_write_safetensors", killed_write)
    with pytest.raises(SystemExit) as e:
        main(["import-gguf", str(tmp_path / "tiny.gguf"), str(tmp_path / "hf")])
    assert e.value.code == 143
    assert "terminated" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_output_appearing_during_conversion_is_kept(tmp_path, monkeypatch):
    """A concurrent converter that finishes first wins; ours is discarded, nothing left over."""
    import convert.gguf as mod

    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "hf"
    real_write = mod._write_safetensors

    def racing_write(*args, **kwargs):
        real_write(*args, **kwargs)
        out.mkdir()
        (out / "config.json").write_text("{}")  # the other process's result

    monkeypatch.setattr(mod, "_write_safetensors", racing_write)
    with pytest.raises(FileExistsError, match="appeared"):
        import_gguf(tmp_path / "tiny.gguf", out, progress=False)
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "hf")
    write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(ValueError, match="dtype"):
        import_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", dtype="int8")
