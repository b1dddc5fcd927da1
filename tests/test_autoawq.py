"""Tests for convert/autoawq.py: the AutoAWQ GEMM checkpoint format (AWQ_SPEC.md section 6).

- Packing against an independent implementation written here from the spec's words.
- save/load round trips (single file and shards), atomic writes, every validation error.
- Cross-check with AutoAWQ 0.2.9's own code in the reference env (tests/reference/
  autoawq_unpack.py): its unpack/dequantize of our checkpoints, and our loading of a
  checkpoint packed by its `WQLinear_GEMM.from_linear`. Tolerance 0: the integer codes are
  compared exactly, and both sides compute `(q - z) * s` in float16 with a single rounding.
  And transformers 5.23 parses our config.json into an AwqConfig (gemm, bits, group size).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from awq_jax.quantizer import QuantizedTensor, quantize
from convert import autoawq, outdir
from convert.autoawq import (
    CheckpointError,
    load_checkpoint,
    pack_int4,
    save_checkpoint,
    unpack_int4,
)

# --------------------------------------------------------------------------------------
# An independent packer, from the spec's sentence: "For column block c, nibble i (bits
# 4i..4i+3) holds column 8c + ORDER[i] with ORDER = [0, 2, 4, 6, 1, 3, 5, 7]". Python ints,
# one value at a time, then the two's-complement reading of the 32-bit word.

SPEC_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def spec_pack(q: np.ndarray) -> np.ndarray:
    rows, cols = q.shape
    out = np.zeros((rows, cols // 8), dtype=np.int64)
    for r in range(rows):
        for c in range(cols // 8):
            word = 0
            for i in range(8):
                word += int(q[r, 8 * c + SPEC_ORDER[i]]) * 16**i
            out[r, c] = word - 2**32 if word >= 2**31 else word
    return out.astype(np.int32)


def spec_unpack(words: np.ndarray) -> np.ndarray:
    rows, blocks = words.shape
    out = np.zeros((rows, blocks * 8), dtype=np.uint8)
    for r in range(rows):
        for c in range(blocks):
            word = int(words[r, c]) % 2**32
            for i in range(8):
                out[r, 8 * c + SPEC_ORDER[i]] = (word // 16**i) % 16
    return out


def test_spec_packer_matches_the_spec_example():
    # Columns 0..7 holding 0..7: nibbles hold columns 0,2,4,6,1,3,5,7, i.e. 0x75316420.
    q = np.arange(8, dtype=np.uint8)[None, :]
    assert spec_pack(q)[0, 0] == 0x75316420
    assert pack_int4(q)[0, 0] == 0x75316420


@pytest.mark.parametrize("shape", [(1, 8), (3, 16), (17, 40), (64, 128)])
def test_pack_matches_spec_on_random_codes(shape):
    q = np.random.default_rng(sum(shape)).integers(0, 16, shape, dtype=np.uint8)
    packed = pack_int4(q)
    assert packed.dtype == np.int32 and packed.shape == (shape[0], shape[1] // 8)
    np.testing.assert_array_equal(packed, spec_pack(q))
    np.testing.assert_array_equal(unpack_int4(spec_pack(q)), q)
    np.testing.assert_array_equal(unpack_int4(packed), q)
    np.testing.assert_array_equal(spec_unpack(packed), q)


def test_pack_boundary_values_in_every_nibble_position():
    # Rows: all 0, all 15, then for each nibble position p: 15 only there / 0 only there.
    rows = [np.zeros(16), np.full(16, 15)]
    for p in range(8):
        one = np.zeros(16)
        one[[p, 8 + p]] = 15
        rows += [one, 15 - one]
    q = np.stack(rows).astype(np.uint8)
    packed = pack_int4(q)
    np.testing.assert_array_equal(packed, spec_pack(q))
    np.testing.assert_array_equal(unpack_int4(packed), q)
    assert packed[1, 0] == -1  # all 15s is 0xFFFFFFFF, a negative int32
    for p in range(8):  # 15 in column p sits in nibble ORDER.index(p)
        assert packed[2 + 2 * p, 0] == np.uint32(15 << (4 * SPEC_ORDER.index(p))).view(np.int32)


def test_unpack_handles_signed_words():
    words = np.array([[-1, np.iinfo(np.int32).min, 0x7FFFFFFF, 0]], dtype=np.int32)
    np.testing.assert_array_equal(unpack_int4(words), spec_unpack(words))
    np.testing.assert_array_equal(pack_int4(unpack_int4(words)), words)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(np.zeros((2, 12), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(np.full((2, 8), 16, np.uint8))
    with pytest.raises(ValueError, match="integer"):
        pack_int4(np.zeros((2, 8), np.float32))


# --------------------------------------------------------------------------------------
# Round trips

CONFIG = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 1}


def _weights(seed: int, group: int, zero_point: bool) -> dict:
    keys = jax.random.split(jax.random.key(seed), 8)
    qt = lambda k, shape: quantize(  # noqa: E731
        jax.random.normal(k, shape) * 0.05, group_size=group, zero_point=zero_point
    )
    return {
        "model.embed_tokens.weight": jax.random.normal(keys[0], (64, 128)),
        "model.layers.0.self_attn.q_proj": qt(keys[1], (128, 128)),
        "model.layers.0.self_attn.q_proj.bias": jax.random.normal(keys[2], (128,)),
        "model.layers.0.self_attn.k_proj": qt(keys[3], (128, 32)),
        "model.layers.0.mlp.down_proj": qt(keys[4], (384, 128)),
        "model.layers.0.input_layernorm.weight": np.asarray(1 + jax.random.normal(keys[5], (128,))),
        "model.norm.weight": jnp.ones((128,), jnp.bfloat16),
        "lm_head.weight": np.asarray(jax.random.normal(keys[6], (64, 128)), np.float32),
    }


def _assert_same(saved: dict, loaded: dict, dtype) -> None:
    assert set(saved) == set(loaded)
    for key, want in saved.items():
        got = loaded[key]
        if isinstance(want, QuantizedTensor):
            assert isinstance(got, QuantizedTensor), key
            assert (got.bits, got.group_size) == (want.bits, want.group_size), key
            np.testing.assert_array_equal(got.q, np.asarray(want.q), err_msg=key)
            np.testing.assert_array_equal(got.zeros, np.asarray(want.zeros), err_msg=key)
            assert got.scales.dtype == np.float16
            np.testing.assert_array_equal(got.scales, np.asarray(want.scales), err_msg=key)
            for dq in (jnp.float32, jnp.float16):  # bit-identical dequantized weights
                np.testing.assert_array_equal(
                    np.asarray(got.dequantize(dq)), np.asarray(want.dequantize(dq)), err_msg=key
                )
        else:
            assert got.dtype == dtype, key
            np.testing.assert_array_equal(got, np.asarray(want).astype(dtype), err_msg=key)


@pytest.mark.parametrize(
    ("group", "zero_point", "dtype"),
    [(32, True, "float16"), (64, False, "float16"), (128, True, "bfloat16"), (64, True, "float16")],
)
def test_round_trip(tmp_path, group, zero_point, dtype):
    tensors = _weights(group, group, zero_point)
    out = save_checkpoint(tmp_path / "ckpt", tensors, CONFIG, dtype=dtype)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config, loaded = load_checkpoint(out)
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    _assert_same(tensors, loaded, np.dtype(np_dtype))
    assert config == {
        **CONFIG,
        "torch_dtype": dtype,
        "quantization_config": {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group,
            "zero_point": zero_point,
            "version": "gemm",
            "modules_to_not_convert": None,
        },
    }
    with safe_open(out / "model.safetensors", framework="np") as f:
        assert f.metadata() == {"format": "pt"}
        m = "model.layers.0.mlp.down_proj"
        assert f.get_slice(f"{m}.qweight").get_shape() == [384, 16]
        assert f.get_slice(f"{m}.qweight").get_dtype() == "I32"
        assert f.get_slice(f"{m}.qzeros").get_shape() == [384 // group, 16]
        assert f.get_slice(f"{m}.qzeros").get_dtype() == "I32"
        assert f.get_slice(f"{m}.scales").get_shape() == [384 // group, 128]
        assert f.get_slice(f"{m}.scales").get_dtype() == "F16"
        assert f.get_slice("model.layers.0.self_attn.q_proj.bias").get_dtype() == (
            "F16" if dtype == "float16" else "BF16"
        )


def test_per_channel_group_is_recorded_as_minus_one(tmp_path):
    w = jax.random.normal(jax.random.key(0), (128, 64))
    tensors = {"a": quantize(w, group_size=-1), "b": quantize(w[:64], group_size=-1)}
    out = save_checkpoint(tmp_path / "c", tensors, CONFIG)
    config, loaded = load_checkpoint(out)
    assert config["quantization_config"]["group_size"] == -1
    _assert_same(tensors, loaded, np.dtype(np.float16))


def test_sharded_round_trip_and_copied_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (src / name).write_text(json.dumps({"name": name}))
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "model.safetensors").write_bytes(b"not copied")
    tensors = _weights(1, 64, True)
    config = {**CONFIG, "dtype": "float32"}
    out = save_checkpoint(
        tmp_path / "ckpt", tensors, config, copy_files_from=src, max_shard_bytes=40_000
    )
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert shards == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    assert not (out / "model.safetensors").exists()
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    on_disk, sizes = {}, 0
    for shard in shards:
        with safe_open(out / shard, framework="np") as f:
            names = list(f.keys())
            nbytes = sum(f.get_tensor(k).nbytes for k in names)
        on_disk.update(dict.fromkeys(names, shard))
        sizes += nbytes
        assert nbytes <= 40_000  # the limit holds: no single entry here is above it
    assert index["weight_map"] == on_disk
    assert index["metadata"]["total_size"] == sizes
    loaded_config, loaded = load_checkpoint(out)
    assert loaded_config["dtype"] == loaded_config["torch_dtype"] == "float16"
    _assert_same(tensors, loaded, np.dtype(np.float16))


# --------------------------------------------------------------------------------------
# Atomic writes


def test_existing_output_is_refused_without_overwrite(tmp_path):
    tensors = _weights(2, 64, True)
    out = save_checkpoint(tmp_path / "ckpt", tensors, CONFIG)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_checkpoint(out, _weights(3, 64, True), CONFIG)
    assert (out / "model.safetensors").read_bytes() == before
    save_checkpoint(out, _weights(3, 64, True), CONFIG, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    _assert_same(_weights(3, 64, True), load_checkpoint(out)[1], np.dtype(np.float16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left
    (tmp_path / "probe").mkdir()  # the user's usual permissions, not mkdtemp's 0700
    assert out.stat().st_mode & 0o777 == (tmp_path / "probe").stat().st_mode & 0o777


def test_extra_files_and_modules_to_not_convert(tmp_path):
    tensors = _weights(2, 64, True)
    extra = {"awq_records.json": b'{"method": "awq"}\n', "awq_records.npz": bytes(range(256))}
    out = save_checkpoint(
        tmp_path / "ckpt",
        tensors,
        CONFIG,
        extra_files=extra,
        modules_to_not_convert=["model.layers.0.mlp.up_proj"],
    )
    for name, data in extra.items():
        assert (out / name).read_bytes() == data
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["model.layers.0.mlp.up_proj"]
    _assert_same(tensors, load_checkpoint(out)[1], np.dtype(np.float16))
    out = save_checkpoint(tmp_path / "empty", tensors, CONFIG, modules_to_not_convert=[])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] is None


@pytest.mark.parametrize(
    ("extra", "modules", "match"),
    [
        ({"../escape.json": b""}, None, "plain file name"),
        ({"sub/x.json": b""}, None, "plain file name"),
        ({".hidden": b""}, None, "plain file name"),
        ({"config.json": b"{}"}, None, "checkpoint itself uses"),
        ({"tokenizer.json": b"{}"}, None, "checkpoint itself uses"),
        ({"records.safetensors": b""}, None, "checkpoint itself uses"),
        ({"a.json": "text"}, None, "must be bytes"),
        (None, "model.layers.0.mlp.up_proj", "list of module names"),
        (None, [""], "list of module names"),
    ],
)
def test_extra_files_and_modules_validation(tmp_path, extra, modules, match):
    with pytest.raises(ValueError, match=match):
        save_checkpoint(
            tmp_path / "ckpt",
            _weights(2, 64, True),
            CONFIG,
            extra_files=extra,
            modules_to_not_convert=modules,
        )
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="does not look like a model checkpoint"):
        save_checkpoint(tmp_path / "home", _weights(2, 64, True), CONFIG, overwrite=True)
    assert (tmp_path / "home" / "notes.txt").read_text() == "precious"


def test_written_files_get_the_usual_permissions(tmp_path):
    """safetensors creates its files 0600; a checkpoint must be readable like any other file."""
    import os

    umask = os.umask(0o022)
    try:
        out = save_checkpoint(tmp_path / "ckpt", _weights(2, 64, True), CONFIG)
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
    assert out.stat().st_mode & 0o777 == 0o755


def test_a_writer_error_names_the_output(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error type; the CLI catches OSError."""
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(autoawq, "save_file", full_disk)
    with pytest.raises(OSError, match=r"model.safetensors: .*No space left .*\(writing .*ckpt\)"):
        save_checkpoint(tmp_path / "ckpt", _weights(2, 64, True), CONFIG)
    assert list(tmp_path.iterdir()) == []


def test_output_never_replaces_the_folder_it_copies_from(tmp_path):
    src = save_checkpoint(tmp_path / "ckpt", _weights(2, 64, True), CONFIG)
    with pytest.raises(ValueError, match="would replace the input"):
        save_checkpoint(src, _weights(2, 64, True), CONFIG, copy_files_from=src, overwrite=True)
    assert (src / "config.json").is_file()


@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, overwrite):
    if overwrite:
        save_checkpoint(tmp_path / "ckpt", _weights(2, 64, True), CONFIG)
    before = sorted(p.name for p in tmp_path.iterdir())
    calls = []
    real_save = autoawq.save_file

    def failing_save(arrays, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the first shard is on disk, then the disk "fills up"
            raise OSError("No space left on device")
        real_save(arrays, path, metadata=metadata)

    monkeypatch.setattr(autoawq, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(
            tmp_path / "ckpt",
            _weights(3, 64, True),
            CONFIG,
            max_shard_bytes=40_000,
            overwrite=overwrite,
        )
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp dir, no new ckpt
    if overwrite:  # the old checkpoint is untouched
        _assert_same(
            _weights(2, 64, True), load_checkpoint(tmp_path / "ckpt")[1], np.dtype(np.float16)
        )


# --------------------------------------------------------------------------------------
# Writer validation


def _qt(k=128, n=64, group=64, bits=4) -> QuantizedTensor:
    return quantize(jax.random.normal(jax.random.key(k + n), (k, n)), bits=bits, group_size=group)


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({"m.l": _qt(bits=3)}, "m.l: the GEMM format holds 4-bit weights only"),
        ({"m.l": _qt(n=60)}, "m.l: output dim 60 is not a multiple of 8"),
        (
            {
                "m.l": QuantizedTensor(
                    q=np.zeros((96, 8), np.uint8),
                    scales=np.ones((2, 8), np.float16),
                    zeros=np.zeros((2, 8), np.uint8),
                    bits=4,
                    group_size=64,
                )
            },
            "m.l: group size 64 does not divide the input dim 96",
        ),
        ({"m.l": _qt(group=32), "m.k": _qt(group=64)}, "share one group size"),
        ({"m.l.weight": _qt()}, "keyed by its module name"),
        ({"m.l": _qt(), "m.l.qweight": np.ones(3)}, "'m.l.qweight' is produced by both"),
        ({"m.l": _qt(), "m.ids": np.arange(4)}, "m.ids: expected a floating-point tensor"),
        ({"m.norm.weight": np.ones(4)}, "no QuantizedTensor"),
        (
            {"m.l": quantize(jnp.ones((64, 8)) * 0.1, group_size=64, scale_dtype=jnp.float32)},
            "m.l: scales .* not exactly representable in float16",
        ),
    ],
)
def test_writer_validation(tmp_path, monkeypatch, tensors, match):
    def no_temp_dir(*args, **kwargs):
        raise AssertionError("validation must happen before anything is written")

    monkeypatch.setattr(outdir.tempfile, "mkdtemp", no_temp_dir)
    with pytest.raises(ValueError, match=match):
        save_checkpoint(tmp_path / "ckpt", tensors, CONFIG)
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        save_checkpoint(tmp_path / "c", {"m.l": _qt()}, CONFIG, dtype="float32")


# --------------------------------------------------------------------------------------
# Reader validation: hand-written checkpoints with one thing wrong each.

MOD = "model.layers.0.mlp.up_proj"


def _write_raw(
    path: Path, arrays: dict, qc: dict | None = None, config: dict | None = None
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    qconf = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 32,
        "zero_point": True,
        "version": "gemm",
    }
    for k, v in (qc or {}).items():  # None deletes a key
        if v is None:
            qconf.pop(k, None)
        else:
            qconf[k] = v
    (path / "config.json").write_text(
        json.dumps(config or {**CONFIG, "quantization_config": qconf})
    )
    save_file(arrays, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _good_arrays(k=64, n=16, g=32) -> dict:
    rng = np.random.default_rng(0)
    return {
        f"{MOD}.qweight": pack_int4(rng.integers(0, 16, (k, n), dtype=np.uint8)),
        f"{MOD}.qzeros": pack_int4(rng.integers(0, 16, (k // g, n), dtype=np.uint8)),
        f"{MOD}.scales": rng.random((k // g, n)).astype(np.float16),
        "model.norm.weight": np.ones(16, np.float16),
    }


def test_reader_accepts_autoawq_spellings_and_infers_group(tmp_path):
    qc = {"bits": None, "group_size": None, "w_bit": 4, "q_group_size": 32, "version": "GEMM"}
    path = _write_raw(tmp_path / "c", _good_arrays(), qc)
    _, tensors = load_checkpoint(path)
    assert tensors[MOD].group_size == 32 and tensors[MOD].shape == (64, 16)
    # No group size at all: taken from the shapes.
    (path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    assert load_checkpoint(path)[1][MOD].group_size == 32


def _drop(key):
    return lambda a: {k: v for k, v in a.items() if k != key}


def _replace(key, value):
    return lambda a: {**a, key: value}


@pytest.mark.parametrize(
    ("edit", "qc", "match"),
    [
        (_drop(f"{MOD}.qzeros"), {}, f"{MOD}: has {MOD}.qweight but no {MOD}.qzeros"),
        (_drop(f"{MOD}.scales"), {}, f"{MOD}: has {MOD}.qweight but no {MOD}.scales"),
        (_drop(f"{MOD}.qweight"), {}, f"{MOD}.qzeros has no matching {MOD}.qweight"),
        (
            _replace(f"{MOD}.qweight", np.zeros((64, 2), np.uint32)),
            {},
            f"{MOD}.qweight has dtype U32, expected I32",
        ),
        (
            _replace(f"{MOD}.qzeros", np.zeros((2, 2), np.int64)),
            {},
            f"{MOD}.qzeros has dtype I64, expected I32",
        ),
        (
            _replace(f"{MOD}.scales", np.ones((2, 16), np.float32)),
            {},
            f"{MOD}.scales has dtype F32, expected F16",
        ),
        (
            _replace(f"{MOD}.scales", np.ones((2, 24), np.float16)),
            {},
            f"{MOD}: qweight .* packs 16 output columns",
        ),
        (
            _replace(f"{MOD}.scales", np.ones((4, 16), np.float16)),
            {},
            f"{MOD}: scales has 4 groups, expected 2",
        ),
        (
            _replace(f"{MOD}.qzeros", np.zeros((2, 3), np.int32)),
            {},
            f"{MOD}: qzeros shape \\[2, 3\\], expected",
        ),
        (_replace(f"{MOD}.qweight", np.zeros((64,), np.int32)), {}, f"{MOD}.qweight must be 2-D"),
        (lambda a: a, {"group_size": 48}, f"{MOD}: group size 48 does not divide the input dim 64"),
        (lambda a: a, {"bits": 8}, "bits=8, but the GEMM version holds 4-bit weights only"),
        (lambda a: a, {"bits": None, "w_bit": 3}, "bits=3"),
        (lambda a: a, {"version": "gemv"}, "'gemv' is not supported, only 'gemm'"),
        (lambda a: a, {"version": "GEMV_FAST"}, "'GEMV_FAST' is not supported, only 'gemm'"),
        (lambda a: a, {"version": "tinychat2"}, "unknown AWQ version 'tinychat2'"),
        (lambda a: a, {"version": None, "format": "llm-awq"}, "'llm-awq' is not supported"),
        (lambda a: a, {"quant_method": "gptq"}, "quant_method is 'gptq', expected 'awq'"),
        (lambda a: a, {"group_size": 0}, "invalid group_size 0"),
    ],
)
def test_reader_validation(tmp_path, edit, qc, match):
    path = _write_raw(tmp_path / "c", edit(_good_arrays()), qc)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_reader_rejects_non_awq_configs(tmp_path):
    path = _write_raw(tmp_path / "c", _good_arrays(), config=CONFIG)
    with pytest.raises(CheckpointError, match=r"config.json: no quantization_config"):
        load_checkpoint(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON"):
        load_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize("damage", ["truncate", "garble_header", "empty"])
def test_reader_names_a_corrupt_file(tmp_path, damage):
    path = _write_raw(tmp_path / "c", _good_arrays())
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(
        {"truncate": data[:-7], "garble_header": b"\xff" * 8 + data[8:], "empty": b""}[damage]
    )
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        load_checkpoint(path)


def test_reader_shard_problems(tmp_path):
    out = save_checkpoint(tmp_path / "ckpt", _weights(4, 64, True), CONFIG, max_shard_bytes=40_000)
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name}: cannot read safetensors file"):
        load_checkpoint(out)
    shard.unlink()
    with pytest.raises(
        CheckpointError, match=f"index.json: lists files that are missing: \\['{shard.name}'\\]"
    ):
        load_checkpoint(out)
    shard.write_bytes(data)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.ghost.weight"] = shard.name
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{shard.name}: has no tensor 'model.ghost.weight'"):
        load_checkpoint(out)
    (out / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors nor"):
        load_checkpoint(out)


# --------------------------------------------------------------------------------------
# Cross-check with AutoAWQ 0.2.9 (tests/reference/autoawq_unpack.py, run in the refenv).
#
# AutoAWQ's dequantize_gemm computes `(iweight - izeros) * scales` with int8 codes and
# float16 scales, i.e. the exact small integer times the float16 scale, rounded once to
# float16 (the product of an integer below 16 and a float16 is exact in float32, so torch's
# CPU float16 multiply rounds exactly once). QuantizedTensor.dequantize(float16) computes
# the same product exactly in float32 and rounds once to float16: tolerance 0.


def test_autoawq_unpacks_our_checkpoint(tmp_path):
    from refenv import run_reference

    tensors = {}
    for i, (group, zero_point) in enumerate([(32, True), (64, False), (128, True)]):
        w = jax.random.normal(jax.random.key(i), (256, 96 + 32 * i)) * 0.02
        tensors[f"model.layers.{i}.mlp.up_proj"] = quantize(
            w, group_size=group, zero_point=zero_point
        )
    # All nibble positions at the boundaries, with the sign bit of the words set.
    q = np.tile(
        np.array([[15, 0, 15, 0, 0, 15, 0, 15], [0] * 8, [15] * 8], np.uint8), (128 // 3 + 1, 12)
    )[:128]
    edge = QuantizedTensor(
        q=q,
        scales=np.full((2, 96), 0.5, np.float16),
        zeros=np.tile(np.array([0, 15, 8, 1, 14, 7, 0, 15], np.uint8), (2, 12)),
        bits=4,
        group_size=64,
    )
    jobs = {}
    for group in (32, 64, 128):
        # One config records one group size: a checkpoint per group size.
        ckpt = {k: v for k, v in tensors.items() if v.group_size == group}
        if group == 64:
            ckpt["model.layers.9.self_attn.o_proj"] = edge
        out = save_checkpoint(tmp_path / f"g{group}", ckpt, CONFIG, max_shard_bytes=20_000)
        jobs[tmp_path / f"ref{group}"] = (out, ckpt)
    args = [str(p) for ref, (out, _) in jobs.items() for p in (out, ref)]
    run_reference("autoawq_unpack.py", "unpack", *args, timeout=300)
    for ref, (_, ckpt) in jobs.items():
        for name, qt in ckpt.items():
            np.testing.assert_array_equal(
                np.load(ref / f"{name}.iweight.npy"), np.asarray(qt.q), err_msg=name
            )
            np.testing.assert_array_equal(
                np.load(ref / f"{name}.izeros.npy"), np.asarray(qt.zeros), err_msg=name
            )
            weight = np.load(ref / f"{name}.weight.npy")
            assert weight.dtype == np.float16
            ours = np.asarray(qt.dequantize(jnp.float16))
            np.testing.assert_array_equal(
                weight.view(np.uint16), ours.view(np.uint16), err_msg=name
            )


def test_we_load_a_checkpoint_packed_by_autoawq(tmp_path):
    from refenv import run_reference

    run_reference("autoawq_unpack.py", "pack", str(tmp_path / "third_party"), timeout=300)
    ckpt, truth = tmp_path / "third_party" / "ckpt", tmp_path / "third_party" / "truth"
    config, tensors = load_checkpoint(ckpt)
    assert config["quantization_config"]["version"] == "GEMM"
    modules = sorted(p.name.removesuffix(".q.npy") for p in truth.glob("*.q.npy"))
    assert sorted(k for k, v in tensors.items() if isinstance(v, QuantizedTensor)) == modules
    for name in modules:
        qt = tensors[name]
        assert qt.group_size == 64
        np.testing.assert_array_equal(qt.q, np.load(truth / f"{name}.q.npy"), err_msg=name)
        np.testing.assert_array_equal(qt.zeros, np.load(truth / f"{name}.zeros.npy"), err_msg=name)
        np.testing.assert_array_equal(
            qt.scales, np.load(truth / f"{name}.scales.npy"), err_msg=name
        )
    assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == np.float16
    assert tensors["lm_head.weight"].shape == (32, 128)
    # And AutoAWQ's own dequantization of its checkpoint equals ours, bit for bit.
    run_reference("autoawq_unpack.py", "unpack", str(ckpt), str(tmp_path / "ref"), timeout=300)
    for name in modules:
        ref = np.load(tmp_path / "ref" / f"{name}.weight.npy")
        ours = np.asarray(tensors[name].dequantize(jnp.float16))
        np.testing.assert_array_equal(ref.view(np.uint16), ours.view(np.uint16), err_msg=name)
    # Re-saving what we loaded reproduces AutoAWQ's packed words exactly.
    again = save_checkpoint(tmp_path / "again", {k: tensors[k] for k in modules}, CONFIG)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(again / "model.safetensors", framework="np") as ours_f:
        for key in ours_f.keys():  # noqa: SIM118 (safe_open has no __contains__/__iter__)
            with safe_open(ckpt / index[key], framework="np") as theirs:
                np.testing.assert_array_equal(
                    ours_f.get_tensor(key), theirs.get_tensor(key), err_msg=key
                )


def test_transformers_parses_our_config(tmp_path):
    from refenv import run_reference

    tensors = {"model.layers.0.mlp.up_proj": _qt(k=128, n=64, group=64)}
    config = {
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 32,
    }
    out = save_checkpoint(tmp_path / "ckpt", tensors, config, dtype="bfloat16")
    run_reference(
        "autoawq_unpack.py", "hf-config", str(out), str(tmp_path / "hf.json"), timeout=300
    )
    assert json.loads((tmp_path / "hf.json").read_text()) == {
        "model_type": "llama",
        "dtype": "bfloat16",
        "bits": 4,
        "group_size": 64,
        "zero_point": True,
        "format": "gemm",
        "quant_method": "awq",
    }
