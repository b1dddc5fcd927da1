"""Quantized models saved as AutoAWQ GEMM checkpoints and loaded back (awq_jax.checkpoint).

Tolerances: none where the saved values are exact. Codes and zero points are integers and the
scales are float16 already (the quantizer rounds them before computing the codes), so every
dequantized kernel must come back bit-identical. The unquantized tensors are stored in float16
(or bfloat16); the tiny models are rounded to that dtype before saving, so their logits must
be identical too. The bundled model is float32: its float tensors are compared against their
float16-rounded originals and its perplexity against that of the float16-rounded original
(equal to 1e-6 relative; in practice identical, the params being bit-identical).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file
from tiny_configs import HF_BASE, HF_CONFIGS

from awq_jax.api import Model, load_model
from awq_jax.checkpoint import (
    RECORDS_ARRAYS,
    RECORDS_FILE,
    CheckpointError,
    load_quantized,
    load_records,
    save_quantized,
)
from awq_jax.config import ModelConfig
from awq_jax.model import forward, init_params
from awq_jax.pipeline import dequantized, quantize_model
from awq_jax.quantizer import QuantizedTensor
from awq_jax.search import SearchSettings
from awq_jax.weights import params_to_hf
from convert.autoawq import load_checkpoint, save_checkpoint

CONFIGS = HF_CONFIGS
GROUP = 32  # divides 64 and 96
_NP_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _is_qt(x) -> bool:
    return isinstance(x, QuantizedTensor)


def _round_floats(params, dtype: str):
    """Float leaves rounded to the storage dtype (kept float32), so saving them is exact."""

    def f(leaf):
        if _is_qt(leaf):
            return leaf
        return jnp.asarray(np.asarray(leaf).astype(_NP_DTYPES[dtype]).astype(np.float32))

    return jax.tree.map(f, params, is_leaf=_is_qt)


def _flat(params) -> dict[str, object]:
    return {
        "/".join(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_qt)[0]
    }


def _assert_same_params(loaded, original) -> None:
    """Same tree; quantized kernels field by field (dtypes too), float leaves exactly."""
    a, b = _flat(loaded), _flat(original)
    assert sorted(a) == sorted(b)
    for key, want in b.items():
        got = a[key]
        if _is_qt(want):
            assert _is_qt(got), key
            assert (got.bits, got.group_size) == (want.bits, want.group_size), key
            for field, dtype in (("q", np.uint8), ("scales", np.float16), ("zeros", np.uint8)):
                g, w = getattr(got, field), getattr(want, field)
                assert isinstance(g, jax.Array), (key, field)
                assert g.dtype == dtype, (key, field, g.dtype)
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=key)
            np.testing.assert_array_equal(
                np.asarray(got.dequantize(jnp.float32)).view(np.uint32),
                np.asarray(want.dequantize(jnp.float32)).view(np.uint32),
                err_msg=key,
            )
        else:
            assert not _is_qt(got), key
            assert got.dtype == want.dtype, key
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=key)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A model folder's non-weight files: a word-level tokenizer of 40 tokens, which fits
    the tiny configs' vocabulary (101) as loading requires."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [
        "four",
        "score",
        "and",
        "seven",
        "years",
        "ago",
        "our",
        "fathers",
        "brought",
        "forth",
        "on",
        "this",
        "continent",
    ]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words, *map(str, range(25))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (d / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **special})
    )
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return d


def _tiny_model(name: str, src: Path, dtype: str = "float16", seed: int = 0) -> Model:
    cfg = CONFIGS[name]
    config = ModelConfig.from_hf(cfg)
    params = init_params(config, jax.random.key(seed), jnp.float32)
    # Norm scales and biases start at 1 and 0: make them carry information.
    params = jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(seed + 1), x.shape), params
    )
    return Model(config, _round_floats(params, dtype), None, src, dict(cfg))


_QUANTIZED: dict[tuple, Model] = {}


def _quantized(name: str, src: Path, dtype: str = "float16", zero_point: bool = True) -> Model:
    """RTN w4 g32 of a tiny model (cached: quantizing compiles)."""
    key = (name, str(src), dtype, zero_point)
    if key not in _QUANTIZED:
        settings = SearchSettings(w_bit=4, group_size=GROUP, zero_point=zero_point)
        model = _tiny_model(name, src, dtype)
        _QUANTIZED[key] = quantize_model(model, settings, method="rtn", progress=False)
    return _QUANTIZED[key]


def _logits(model: Model) -> np.ndarray:
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 16))
    params = dequantized(model.params, jnp.float32)
    return np.asarray(forward(model.config, params, jnp.asarray(ids, jnp.int32)))


# --------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize(
    ("name", "dtype", "zero_point", "max_shard_bytes"),
    [
        ("llama_gqa_untied", "float16", True, 5 * 2**30),
        ("qwen2_bias", "float16", True, 30_000),  # sharded
        ("qwen3_qknorm", "bfloat16", False, 5 * 2**30),  # symmetric, bf16 storage
    ],
)
def test_tiny_round_trip(tmp_path, tokenizer_dir, name, dtype, zero_point, max_shard_bytes):
    qmodel = _quantized(name, tokenizer_dir, dtype, zero_point)
    out = save_quantized(qmodel, tmp_path / "ckpt", dtype=dtype, max_shard_bytes=max_shard_bytes)
    assert out == (tmp_path / "ckpt").absolute()
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", RECORDS_FILE} <= files
    assert ("model.safetensors.index.json" in files) == (max_shard_bytes < 2**20)
    assert not any(n.endswith(".safetensors") and not n.startswith("model") for n in files)

    loaded = load_model(out, dtype="float32")
    assert loaded.path == out
    assert loaded.config == qmodel.config
    stored = json.loads((out / "config.json").read_text())
    assert stored["torch_dtype"] == dtype
    assert {k: v for k, v in stored.items() if k not in ("torch_dtype", "quantization_config")} == (
        CONFIGS[name]
    )
    assert stored["quantization_config"] == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": GROUP,
        "zero_point": zero_point,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    q = loaded.quantization
    assert (q["method"], q["w_bit"], q["group_size"], q["zero_point"]) == (
        "rtn",
        4,
        GROUP,
        zero_point,
    )
    json.dumps(q)  # printable by `awq-jax eval --json`
    _assert_same_params(loaded.params, qmodel.params)
    np.testing.assert_array_equal(_logits(loaded), _logits(qmodel))

    # Saving what was loaded writes the same tensors again.
    again = save_quantized(loaded, tmp_path / "again", dtype=dtype, max_shard_bytes=max_shard_bytes)
    _, t1 = load_checkpoint(out)
    _, t2 = load_checkpoint(again)
    assert sorted(t1) == sorted(t2)
    for key, v in t1.items():
        w = t2[key]
        if _is_qt(v):
            for field in ("q", "scales", "zeros"):
                np.testing.assert_array_equal(getattr(v, field), getattr(w, field), err_msg=key)
        else:
            assert v.dtype == w.dtype
            np.testing.assert_array_equal(v, w, err_msg=key)


def test_load_quantized_bfloat16_params(tmp_path, tokenizer_dir):
    qmodel = _quantized("qwen2_bias", tokenizer_dir)
    out = save_quantized(qmodel, tmp_path / "ckpt")
    loaded = load_quantized(out, dtype="bfloat16")
    for key, leaf in _flat(loaded.params).items():
        if _is_qt(leaf):
            assert (leaf.q.dtype, leaf.scales.dtype) == (jnp.uint8, jnp.float16), key
        else:
            assert leaf.dtype == jnp.bfloat16, key


@pytest.mark.slow
def test_bundled_model_round_trip(tmp_path, bundled_model_dir):
    from awq_jax.api import model_perplexity

    model = load_model(bundled_model_dir, dtype="float32")
    qmodel = quantize_model(
        model, SearchSettings(w_bit=4, group_size=64), method="rtn", progress=False
    )
    del model
    out = save_quantized(qmodel, tmp_path / "smollm2-w4g64")
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= (
        files
    )
    loaded = load_model(out, dtype="float32")
    assert loaded.config == qmodel.config
    assert loaded.tokenizer.encode("Four score") == qmodel.tokenizer.encode("Four score")
    # Every dequantized kernel bit-identical; every float tensor equal to its float16 rounding.
    expected = _round_floats(qmodel.params, "float16")
    _assert_same_params(loaded.params, expected)
    n_quantized = sum(_is_qt(x) for x in _flat(loaded.params).values())
    assert n_quantized == 7

    def ppl(m: Model) -> float:
        fake = m.replace(params=dequantized(m.params, jnp.float32))
        return model_perplexity(fake, windows=2, progress=False)["ppl"]

    want = ppl(qmodel.replace(params=expected))
    got = ppl(loaded)
    assert abs(got - want) <= 1e-6 * want, (got, want)


def test_records_round_trip(tmp_path, tokenizer_dir):
    qmodel = _quantized("llama_gqa_untied", tokenizer_dir)
    rng = np.random.default_rng(0)
    records = [
        {
            "layer": i,
            "group": "qkv",
            "ratio": None if i == 0 else 0.25,
            "duo": None if i == 0 else True,
            "rtn_loss": 1.5,
            "best_loss": 1.25,
            "losses": [1.5, 1.25],
            "ratios": [0.0, 0.25],
            "scales": rng.standard_normal(64).astype(np.float32),
            "x_mean": rng.standard_normal(64).astype(np.float32),
        }
        for i in range(2)
    ]
    info = {
        **qmodel.quantization,
        "method": "awq",
        "calib": {"n_samples": 4, "seqlen": 64, "source": "sotu<=1989"},
        "settings": {"w_bit": 4, "group_size": GROUP, "zero_point": True, "chunk_seqs": None},
        "records": records,
        "seconds": np.float64(3.5),
    }
    out = save_quantized(qmodel.replace(quantization=info), tmp_path / "ckpt")
    assert (out / RECORDS_ARRAYS).is_file()
    loaded = load_model(out)
    q = loaded.quantization
    assert q["method"] == "awq"
    assert q["calib"] == info["calib"]
    assert q["settings"] == info["settings"]
    assert q["seconds"] == 3.5
    assert q["records_file"] == RECORDS_FILE
    assert "records" not in q
    json.dumps(q)
    back = load_records(out)
    assert len(back) == len(records)
    for r, b in zip(records, back, strict=True):
        assert sorted(r) == sorted(b)
        for k, v in r.items():
            if isinstance(v, np.ndarray):
                assert b[k].dtype == v.dtype
                np.testing.assert_array_equal(b[k], v)
            else:
                assert b[k] == v, k
    # A records file that contradicts config.json is refused.
    body = json.loads((out / RECORDS_FILE).read_text())
    body["quantization"]["group_size"] = 128
    (out / RECORDS_FILE).write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match="stale"):
        load_quantized(out)
    (out / RECORDS_FILE).write_text("{")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_quantized(out)


# --------------------------------------------------------------------------------------
# Third-party checkpoints (the format's tensors only; AutoAWQ's own packing is exercised in
# tests/test_autoawq.py)


def _tensors(qmodel: Model) -> dict:
    return params_to_hf(qmodel.params, qmodel.config)


def test_checkpoint_without_records(tmp_path, tokenizer_dir):
    qmodel = _quantized("qwen2_bias", tokenizer_dir)
    out = save_checkpoint(
        tmp_path / "ckpt", _tensors(qmodel), CONFIGS["qwen2_bias"], copy_files_from=tokenizer_dir
    )
    loaded = load_model(out, dtype="float32")
    assert loaded.quantization == {
        "method": "unknown",
        "w_bit": 4,
        "group_size": GROUP,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    _assert_same_params(loaded.params, qmodel.params)
    assert load_records(out) == []


def test_model_packed_by_autoawq(tmp_path, tokenizer_dir):
    """A whole checkpoint as AutoAWQ writes one (tests/reference/autoawq_model.py): logits.

    The reference is transformers' float32 forward of the model the checkpoint describes;
    tolerance as tests/test_model.py's for tiny models (1e-5 relative), float32 both sides.
    """
    from refenv import run_reference

    ids = np.random.default_rng(0).integers(0, HF_BASE["vocab_size"], (2, 16)).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    names = ["llama_gqa_untied", "qwen2_bias"]
    jobs = [
        {
            "config": CONFIGS[name],
            "group_size": GROUP,
            "out_dir": str(tmp_path / name),
            "ids": str(tmp_path / "ids.npy"),
            "logits": str(tmp_path / f"{name}.npy"),
        }
        for name in names
    ]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    run_reference("autoawq_model.py", str(tmp_path / "jobs.json"), timeout=600)
    for name in names:
        ckpt = tmp_path / name
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, ckpt / f.name)
        model = load_model(ckpt, dtype="float32")
        q = model.quantization
        assert (q["method"], q["group_size"], q["zero_point"]) == ("unknown", GROUP, True)
        kernels = [x for x in _flat(model.params).values() if _is_qt(x)]
        assert len(kernels) == 7
        ours = np.asarray(forward(model.config, model.params, jnp.asarray(ids, jnp.int32)))
        ref = np.load(tmp_path / f"{name}.npy")
        assert ours.shape == ref.shape
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-5, name


def _with_down_proj(model: Model, kernel: np.ndarray) -> Model:
    layers = dict(model.params["layers"])
    layers["mlp"] = {**layers["mlp"], "down_proj": {"kernel": jnp.asarray(kernel)}}
    return model.replace(params={**model.params, "layers": layers})


def test_modules_to_not_convert(tmp_path, tokenizer_dir):
    qmodel = _quantized("llama_gqa_untied", tokenizer_dir)
    tensors = _tensors(qmodel)
    cfg = CONFIGS["llama_gqa_untied"]
    deq = np.asarray(qmodel.params["layers"]["mlp"]["down_proj"]["kernel"].dequantize())
    deq16 = deq.astype(np.float16).astype(np.float32)  # a float linear is stored in float16
    # Layer 0's down_proj stored unquantized (torch orientation, as AutoAWQ would leave it).
    m0, m1 = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"
    del tensors[m0]
    tensors[f"{m0}.weight"] = deq[0].T
    out = save_checkpoint(
        tmp_path / "one", tensors, cfg, copy_files_from=tokenizer_dir, modules_to_not_convert=[m0]
    )
    loaded = load_model(out, dtype="float32")
    assert loaded.quantization["modules_to_not_convert"] == [m0]
    assert loaded.quantization["float_modules"] == [m0]
    down = loaded.params["layers"]["mlp"]["down_proj"]["kernel"]
    assert not _is_qt(down)  # one kind per stacked leaf: layer 1 dequantized alongside
    np.testing.assert_array_equal(np.asarray(down), np.stack([deq16[0], deq[1]]))
    assert _is_qt(loaded.params["layers"]["mlp"]["up_proj"]["kernel"])
    want = _logits(_with_down_proj(qmodel, np.stack([deq16[0], deq[1]])))
    np.testing.assert_array_equal(_logits(loaded), want)
    # Saving it again lists the unquantized modules for transformers / vLLM.
    again = save_quantized(loaded, tmp_path / "again")
    qc = json.loads((again / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == [m0, m1]
    want_all = _logits(_with_down_proj(qmodel, deq16))
    np.testing.assert_array_equal(_logits(load_model(again, dtype="float32")), want_all)

    # Every layer's down_proj unquantized, listed by a substring (as AutoAWQ configs do).
    del tensors[m1]
    tensors[f"{m1}.weight"] = deq[1].T
    out = save_checkpoint(
        tmp_path / "all",
        tensors,
        cfg,
        copy_files_from=tokenizer_dir,
        modules_to_not_convert=["down_proj"],
    )
    loaded = load_model(out, dtype="float32")
    assert "float_modules" in loaded.quantization
    np.testing.assert_array_equal(
        np.asarray(loaded.params["layers"]["mlp"]["down_proj"]["kernel"]), deq16
    )
    np.testing.assert_array_equal(_logits(loaded), want_all)

    # An unquantized linear that the config does not list is an inconsistent checkpoint.
    out = save_checkpoint(tmp_path / "unlisted", tensors, cfg, copy_files_from=tokenizer_dir)
    with pytest.raises(CheckpointError, match=r"down_proj\.weight.*modules_to_not_convert"):
        load_quantized(out)


def test_loader_is_strict(tmp_path, tokenizer_dir):
    qmodel = _quantized("qwen3_qknorm", tokenizer_dir)
    cfg = CONFIGS["qwen3_qknorm"]

    def write(name, tensors, config=cfg):
        return save_checkpoint(tmp_path / name, tensors, config, copy_files_from=tokenizer_dir)

    missing = _tensors(qmodel)
    del missing["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(CheckpointError, match=r"k_norm/scale: expected 2 .* found 1"):
        load_quantized(write("missing", missing))

    extra = _tensors(qmodel)
    extra["model.layers.0.mlp.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(CheckpointError, match="extra_proj"):
        load_quantized(write("extra", extra))

    wrong = dict(cfg, intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj.*shape"):
        load_quantized(write("shape", _tensors(qmodel), wrong))

    both = _tensors(qmodel)  # one kernel given quantized and as a float weight
    both["model.layers.0.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)
    out = save_checkpoint(
        tmp_path / "both",
        both,
        cfg,
        copy_files_from=tokenizer_dir,
        modules_to_not_convert=["up_proj"],
    )
    with pytest.raises(CheckpointError, match="up_proj"):
        load_quantized(out)

    embed = _tensors(qmodel)  # only Linear kernels may be quantized
    embed["model.embed_tokens"] = QuantizedTensor(
        q=np.zeros((96, 64), np.uint8),
        scales=np.ones((3, 64), np.float16),
        zeros=np.zeros((3, 64), np.uint8),
        bits=4,
        group_size=32,
    )
    del embed["model.embed_tokens.weight"]
    with pytest.raises(CheckpointError, match="embed_tokens"):
        load_quantized(write("embed", embed))

    # The format's own checks surface through load_model as the same CheckpointError.
    gemv = write("gemv", _tensors(qmodel))
    stored = json.loads((gemv / "config.json").read_text())
    stored["quantization_config"]["version"] = "gemv"
    (gemv / "config.json").write_text(json.dumps(stored))
    with pytest.raises(CheckpointError, match="'gemv' is not supported"):
        load_model(gemv)

    (tmp_path / "float").mkdir()  # not an AWQ checkpoint at all
    (tmp_path / "float" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        load_quantized(tmp_path / "float")


# --------------------------------------------------------------------------------------
# Refusals on saving


def test_save_refuses_what_the_format_cannot_hold(tmp_path, tokenizer_dir):
    model = _tiny_model("llama_gqa_untied", tokenizer_dir)
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(model, tmp_path / "float")

    w3 = quantize_model(
        model, SearchSettings(w_bit=3, group_size=GROUP), method="rtn", progress=False
    )
    with pytest.raises(ValueError, match="4-bit weights only.*w_bit=3"):
        save_quantized(w3, tmp_path / "w3")

    qmodel = _quantized("llama_gqa_untied", tokenizer_dir)
    with pytest.raises(ValueError, match="no kernel is a QuantizedTensor"):
        save_quantized(qmodel.replace(params=dequantized(qmodel.params)), tmp_path / "deq")

    other = dict(qmodel.hf_config, intermediate_size=128)
    with pytest.raises(ValueError, match="different model"):
        save_quantized(qmodel.replace(hf_config=other), tmp_path / "cfg")

    layers = dict(qmodel.params["layers"])
    layers["mlp"] = {**layers["mlp"], "gate_up_proj": layers["mlp"]["up_proj"]}
    fused = {**qmodel.params, "layers": layers}
    with pytest.raises(ValueError, match="fused"):
        save_quantized(qmodel.replace(params=fused), tmp_path / "fused")

    big = dict(qmodel.params)
    big["norm"] = {"scale": qmodel.params["norm"]["scale"].at[0].set(1e5)}
    with pytest.raises(ValueError, match="model.norm.weight.*overflow float16.*bfloat16"):
        save_quantized(qmodel.replace(params=big), tmp_path / "big")
    save_quantized(qmodel.replace(params=big), tmp_path / "big", dtype="bfloat16")

    bad = {**qmodel.quantization, "callback": print}
    with pytest.raises(ValueError, match="cannot record"):
        save_quantized(qmodel.replace(quantization=bad), tmp_path / "bad")
    # Nothing was left behind by the refusals.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]


def test_float16_overflow_is_found_before_quantizing(tokenizer_dir):
    from awq_jax.checkpoint import check_saveable

    model = _tiny_model("qwen2_bias", tokenizer_dir, dtype="bfloat16")
    check_saveable(model)
    emb = model.params["embed_tokens"]["embedding"]
    params = {**model.params, "embed_tokens": {"embedding": emb.at[3, 4].set(1e30)}}
    huge = model.replace(params=params)
    with pytest.raises(ValueError, match="model.embed_tokens.weight: .* --save-dtype bfloat16"):
        check_saveable(huge)
    check_saveable(huge, dtype="bfloat16")


def test_cli_quantize_output_and_overwrite(tmp_path, tokenizer_dir, capsys):
    from convert.cli import main

    model = _tiny_model("qwen2_bias", tokenizer_dir)
    src = tmp_path / "tiny-float"
    shutil.copytree(tokenizer_dir, src)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in params_to_hf(model.params, model.config).items()},
        src / "model.safetensors",
    )
    (src / "config.json").write_text(json.dumps(CONFIGS["qwen2_bias"]))
    out = tmp_path / "tiny-awq"
    argv = ["quantize", "--model", str(src), "--method", "rtn", "--group-size", str(GROUP)]
    argv += ["--output", str(out)]

    main(argv)
    assert f"wrote {out.absolute()}" in capsys.readouterr().out
    first = (out / "model.safetensors").read_bytes()
    loaded = load_model(out, dtype="float32")
    assert loaded.quantization["method"] == "rtn"

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "already exists" in err and "--overwrite" in err
    assert (out / "model.safetensors").read_bytes() == first

    main([*argv, "--overwrite"])
    assert "wrote" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == first  # same model, same bytes
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
