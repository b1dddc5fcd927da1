"""Quantized models <-> AutoAWQ GEMM checkpoints (AWQ_SPEC.md section 6; issue 4).

`save_quantized` writes a quantized `awq_jax.api.Model` as a checkpoint that transformers,
vLLM and AutoAWQ load; `load_quantized` reads ours and third-party AutoAWQ GEMM checkpoints of
the supported families back into a Model whose Linear kernels are stacked `QuantizedTensor`
leaves. The format itself (packing, validation, atomic writes) is `convert.autoawq`; the name
mapping and the strict filling of the params pytree are `awq_jax.weights`. This module only
joins the two.

Besides the format's files, our checkpoints carry how they were made: ``awq_records.json``
(method, settings, calibration, timings, and the AWQ search records with their arrays
referenced by key) and, when there are arrays, ``awq_records.npz`` (read without pickle).
Other tools ignore both files. Both are written inside the same atomic write as the weights.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from awq_jax.config import ModelConfig
from awq_jax.quantizer import QuantizedTensor
from awq_jax.weights import CheckpointError, hf_name_to_path, params_from_hf, params_to_hf
from convert.autoawq import load_checkpoint, save_checkpoint

__all__ = [
    "RECORDS_ARRAYS",
    "RECORDS_FILE",
    "CheckpointError",
    "check_saveable",
    "load_quantized",
    "load_records",
    "save_quantized",
]

RECORDS_FILE = "awq_records.json"
RECORDS_ARRAYS = "awq_records.npz"
_RECORDS_FORMAT = "awq-jax quantization record"
_RECORDS_VERSION = 1
_ARRAY_REF = "__ndarray__"  # {"__ndarray__": key}: the array stored under key in the .npz
_FLOAT16_MAX = float(np.finfo(np.float16).max)


# --------------------------------------------------------------------------------------
# Saving


def save_quantized(
    model: Any,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    dtype: str = "float16",
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Writes a quantized Model as an AutoAWQ GEMM checkpoint; returns its path.

    Args:
      model: an `awq_jax.api.Model` from `awq_jax.pipeline.quantize_model` (or
        `load_quantized`): 4-bit `QuantizedTensor` kernels and ``model.quantization`` set.
      out_dir: the checkpoint folder to create (atomically: written under a temporary name
        and renamed at the end).
      overwrite: replace an existing checkpoint at ``out_dir`` (a folder that does not look
        like one is never replaced).
      dtype: ``"float16"`` (the format's usual dtype) or ``"bfloat16"`` for the unquantized
        tensors (embeddings, norms, biases, lm_head); scales are always float16.
      max_shard_bytes: above this the weights are split into shards plus an index.

    The config written is ``model.hf_config`` as loaded (keys the loader knowingly ignores
    survive), checked to describe ``model.config``; tokenizer and generation files are copied
    from ``model.path``; ``model.quantization`` goes to ``awq_records.json`` (+ ``.npz``).

    Raises:
      ValueError: the model is not quantized, not 4-bit, holds fused or unknown layouts, its
        hf_config disagrees with its config, or a float tensor overflows float16.
      FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    info = model.quantization
    if not info:
        raise ValueError(
            "the model is not quantized (model.quantization is None): quantize it first "
            "(awq-jax quantize, or awq_jax.pipeline.quantize_model)"
        )
    bits = info.get("w_bit")
    if bits != 4:
        raise ValueError(
            f"the AutoAWQ GEMM format holds 4-bit weights only; this model was quantized with "
            f"w_bit={bits}"
        )
    config: ModelConfig = model.config
    hf_config = _hf_config_for(model)
    tensors = params_to_hf(model.params, config)

    float_linears = []
    for key, value in tensors.items():
        quantized = isinstance(value, QuantizedTensor)
        name = f"{key}.weight" if quantized else key
        target = hf_name_to_path(name)
        if target is None:
            raise ValueError(
                f"{name}: not a tensor of the Hugging Face layout (fused inference params such "
                "as qkv_proj / gate_up_proj cannot be saved: save the unfused quantized model)"
            )
        path, _, _ = target
        if quantized:
            if value.bits != 4:
                raise ValueError(f"{key}: {value.bits}-bit; the GEMM format holds 4-bit only")
            continue
        if path[0] == "layers" and path[-1] == "kernel":
            float_linears.append(key.removesuffix(".weight"))
        if dtype == "float16":
            _check_fits_float16(key, value)
    if not any(isinstance(v, QuantizedTensor) for v in tensors.values()):
        raise ValueError(
            "model.quantization is set, but no kernel is a QuantizedTensor (dequantized "
            "params?); save the model that quantize_model returned"
        )

    extra = _encode_records(info)
    src = Path(model.path) if model.path is not None and Path(model.path).is_dir() else None
    return save_checkpoint(
        out_dir,
        tensors,
        hf_config,
        dtype=dtype,
        copy_files_from=src,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
        zero_point=info.get("zero_point"),
        modules_to_not_convert=float_linears or None,
        extra_files=extra,
    )


def _hf_config_for(model: Any) -> dict[str, Any]:
    """``model.hf_config`` without its quantization_config, checked against ``model.config``."""
    cfg = {k: v for k, v in dict(model.hf_config or {}).items() if k != "quantization_config"}
    if not cfg:
        return model.config.to_hf()
    parsed = ModelConfig.from_hf(cfg)
    if parsed != model.config:
        raise ValueError(
            "model.hf_config describes a different model than model.config "
            f"({parsed} vs {model.config}); rebuild hf_config from config.to_hf()"
        )
    return cfg


def check_saveable(model: Any, *, dtype: str = "float16") -> None:
    """Before quantizing a float model: ValueError if a tensor the checkpoint will store
    unquantized (embeddings, norms, lm_head, biases) overflows ``dtype``. (AWQ's scales
    change the norms a little; `save_quantized` checks again.)"""
    if dtype != "float16":
        return
    for key, value in params_to_hf(model.params, model.config).items():
        target = hf_name_to_path(key)
        if target is not None and target[0][0] == "layers" and target[0][-1] == "kernel":
            continue  # a linear: quantized
        _check_fits_float16(key, np.asarray(value))


def _check_fits_float16(name: str, x: Any) -> None:
    if x.size and float(np.max(np.abs(np.asarray(x, np.float32)))) > _FLOAT16_MAX:
        raise ValueError(
            f"{name}: values up to {float(np.max(np.abs(np.asarray(x, np.float32)))):.4g} "
            "overflow float16; save as bfloat16 (awq-jax quantize --save-dtype bfloat16; "
            "dtype='bfloat16' in Python)"
        )


def _encode_records(info: Mapping[str, Any]) -> dict[str, bytes]:
    """``model.quantization`` as ``{awq_records.json: ..., awq_records.npz: ...}`` bytes."""
    arrays: dict[str, np.ndarray] = {}
    body = {
        "format": _RECORDS_FORMAT,
        "version": _RECORDS_VERSION,
        "quantization": _encode(
            {k: v for k, v in info.items() if k != "records"}, arrays, "quantization"
        ),
        "records": _encode(list(info.get("records") or []), arrays, "records"),
    }
    files = {RECORDS_FILE: (json.dumps(body, indent=1) + "\n").encode()}
    if arrays:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        files[RECORDS_ARRAYS] = buf.getvalue()
    return files


def _encode(value: Any, arrays: dict[str, np.ndarray], key: str) -> Any:
    """JSON-able form of ``value``; arrays are moved to ``arrays`` and referenced by key."""
    if isinstance(value, np.ndarray | jax.Array):
        arrays[key] = np.asarray(value)
        return {_ARRAY_REF: key}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or k == _ARRAY_REF:
                raise ValueError(f"model.quantization: cannot record the key {k!r} ({key})")
            out[k] = _encode(v, arrays, f"{key}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_encode(v, arrays, f"{key}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(
        f"model.quantization: cannot record {key} of type {type(value).__name__} "
        "(numbers, strings, lists, dicts and arrays only)"
    )


# --------------------------------------------------------------------------------------
# Loading


def load_quantized(path: str | os.PathLike[str], *, dtype: Any = "auto") -> Any:
    """Loads an AutoAWQ GEMM checkpoint (ours or a third party's) as an `awq_jax.api.Model`.

    Quantized linears become stacked `QuantizedTensor` kernels (``uint8`` codes and zeros,
    ``float16`` scales, exactly as stored); every other tensor is transposed like
    `awq_jax.weights.load_params` does and cast to ``dtype`` (``"auto"``: float32 on the CPU,
    bfloat16 on accelerators). Strict: every param filled, every tensor consumed, every shape
    checked. A linear stored unquantized must be listed in ``modules_to_not_convert``; if only
    some layers of a kernel are quantized, that kernel is loaded as float for all layers
    (dequantized; listed in ``quantization["float_modules"]``).

    ``model.quantization`` holds ``method`` (from ``awq_records.json`` when present, else
    ``"unknown"``), ``w_bit``, ``group_size`` (-1: per channel), ``zero_point``, ``version``,
    ``modules_to_not_convert`` and, for our checkpoints, the recorded settings, calibration and
    timings. The AWQ search records are not loaded into it (they hold arrays): see
    `load_records`.

    Raises:
      CheckpointError: (`awq_jax.weights.CheckpointError`, a ValueError; the format's own
        checks raise its subclass `convert.autoawq.CheckpointError`) anything wrong with the
        files, naming file and key.
      FileNotFoundError: no such folder, no config.json.
    """
    from awq_jax.api import Model, _resolve_dtype
    from awq_jax.tokenizer import load_tokenizer

    root = Path(path)
    dtype = _resolve_dtype(dtype)
    hf_config, tensors = load_checkpoint(root)
    config = ModelConfig.from_hf(hf_config, source=str(root / "config.json"))
    tokenizer = load_tokenizer(root, vocab_size=config.vocab_size)
    qc = hf_config["quantization_config"]
    not_convert = qc.get("modules_to_not_convert") or []
    if isinstance(not_convert, str) or not all(isinstance(m, str) for m in not_convert):
        raise CheckpointError(
            f"{root / 'config.json'}: modules_to_not_convert must be a list of names, "
            f"got {not_convert!r}"
        )

    qts = {k: v for k, v in tensors.items() if isinstance(v, QuantizedTensor)}
    if not qts:
        raise CheckpointError(f"{root}: the checkpoint holds no quantized module")
    float_modules = []
    for key in tensors:
        if key in qts:
            continue
        target = hf_name_to_path(key)
        if target is not None and target[0][0] == "layers" and target[0][-1] == "kernel":
            module = key.removesuffix(".weight")
            if not any(m in module for m in not_convert):
                raise CheckpointError(
                    f"{root}: {key} is stored unquantized, but modules_to_not_convert "
                    f"({not_convert or None}) does not list it"
                )
            float_modules.append(module)

    source = root.name
    entries = [
        (f"{key}.weight" if key in qts else key, source, functools.partial(tensors.pop, key))
        for key in list(tensors)
    ]
    del qts  # the entries pop each tensor as its param leaf is built
    params = params_from_hf(entries, config, dtype, where=str(root))
    del entries

    group_sizes = {
        -1 if leaf.group_size == leaf.shape[-2] else leaf.group_size
        for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedTensor))
        if isinstance(leaf, QuantizedTensor)
    }
    group_size = qc.get("group_size", qc.get("q_group_size"))
    if group_size is None and len(group_sizes) == 1:
        group_size = next(iter(group_sizes))
    zero_point = qc.get("zero_point")
    quantization: dict[str, Any] = {
        "method": "unknown",
        "w_bit": 4,
        "group_size": group_size,
        "zero_point": True if zero_point is None else bool(zero_point),
        "version": "gemm",
        "modules_to_not_convert": list(not_convert) or None,
    }
    if float_modules:
        quantization["float_modules"] = sorted(float_modules)
    recorded = _read_records(root, arrays=False)
    if recorded is not None:
        rq = recorded["quantization"]
        for key in ("w_bit", "group_size", "zero_point"):
            if key in rq and rq[key] != quantization[key]:
                raise CheckpointError(
                    f"{root / RECORDS_FILE}: records {key}={rq[key]!r}, but config.json's "
                    f"quantization_config says {quantization[key]!r} (stale records file?)"
                )
        quantization = {**rq, **quantization, "method": rq.get("method", "unknown")}
        if recorded["records"]:
            quantization["records_file"] = RECORDS_FILE
    return Model(config, params, tokenizer, root, hf_config, quantization)


def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The AWQ search records saved with a checkpoint (numpy arrays restored); [] if none."""
    recorded = _read_records(Path(path), arrays=True)
    return [] if recorded is None else recorded["records"]


def _read_records(root: Path, *, arrays: bool) -> dict[str, Any] | None:
    file = root / RECORDS_FILE
    if not file.is_file():
        return None
    try:
        body = json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from e
    if not isinstance(body, dict) or body.get("format") != _RECORDS_FORMAT:
        raise CheckpointError(f"{file}: not an awq-jax records file")
    if body.get("version") != _RECORDS_VERSION:
        raise CheckpointError(
            f"{file}: records version {body.get('version')!r}, this awq-jax reads "
            f"{_RECORDS_VERSION}"
        )
    store: Mapping[str, np.ndarray] = {}
    npz = root / RECORDS_ARRAYS
    if arrays and npz.is_file():
        try:
            with np.load(npz, allow_pickle=False) as f:
                store = {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{npz}: cannot read ({e})") from e
    return {
        "quantization": _decode(body.get("quantization") or {}, store, file, arrays=arrays),
        "records": _decode(body.get("records") or [], store, file, arrays=arrays),
    }


def _decode(value: Any, store: Mapping[str, np.ndarray], file: Path, *, arrays: bool) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY_REF}:
            key = value[_ARRAY_REF]
            if not arrays:
                return value
            if key not in store:
                raise CheckpointError(f"{file}: refers to array {key!r}, missing from the .npz")
            return store[key]
        return {k: _decode(v, store, file, arrays=arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, store, file, arrays=arrays) for v in value]
    return value
