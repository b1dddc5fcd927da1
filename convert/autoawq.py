"""The AutoAWQ "GEMM" checkpoint format: write it, read it (AWQ_SPEC.md section 6).

This is the one module that knows how 4-bit codes are packed into int32 words. Everything
else in awq-jax sees :class:`awq_jax.quantizer.QuantizedTensor` (``uint8 [in, out]`` codes,
scales and zero points per ``(group, column)``), which has the same ``[in, out]``
orientation as the format.

Per quantized linear with input dim ``K``, output dim ``N`` and group size ``g``, a GEMM
checkpoint stores (spec section 6)::

    <name>.qweight  int32    [K, N / 8]   codes, 8 per word along N
    <name>.qzeros   int32    [K / g, N / 8]  zero points, same packing
    <name>.scales   float16  [K / g, N]
    <name>.bias     float16  [N]          (only when the linear has one)

    W[K, N] = (q - z) * s                 (zero points are plain integers, no GPTQ "z - 1")

Word ``c`` of a row holds columns ``8c .. 8c + 7``: nibble ``i`` (bits ``4i .. 4i + 3``)
holds column ``8c + AWQ_ORDER[i]``, ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``. This is the
order of AutoAWQ's ``WQLinear_GEMM.from_linear`` (``order_map``) and of its
``awq/utils/packing_utils.py`` (``AWQ_ORDER`` / ``AWQ_REVERSE_ORDER``), which vLLM and
transformers follow. The words are signed int32, so unpacking masks with ``& 0xF``.

Files: ``config.json`` with a ``quantization_config``; ``model.safetensors``, or shards
``model-0000k-of-0000N.safetensors`` plus ``model.safetensors.index.json``; tokenizer files
and ``generation_config.json`` copied from the source model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes  # registers bfloat16 with numpy, so safetensors can read and write BF16
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from awq_jax import weights
from awq_jax.quantizer import QuantizedTensor
from convert.outdir import check_destination, staged_dir

__all__ = [
    "AWQ_ORDER",
    "CheckpointError",
    "load_checkpoint",
    "pack_int4",
    "save_checkpoint",
    "unpack_int4",
]

AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble ``i`` of a packed word holds column ``8c + AWQ_ORDER[i]`` (spec section 6)."""

_PACK = 8  # 4-bit values per int32 word
_BITS = 4
_SUFFIXES = ("qweight", "qzeros", "scales")

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# Copied from the source model when present: what transformers/vLLM need to run the
# checkpoint (fast and slow tokenizer files, chat templates, generation defaults).
_COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)

# AutoAWQ's other on-disk layouts (spec section 6: "Other layouts exist"); named so the
# error can say "not supported" instead of "unknown".
_UNSUPPORTED_VERSIONS = (
    "gemv",
    "gemv_fast",
    "llm-awq",
    "marlin",
    "exllama",
    "exllamav2",
    "ipex",
)
_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class CheckpointError(weights.CheckpointError):
    """A checkpoint that is not a valid AutoAWQ GEMM checkpoint; the message names the file/key.

    A ``ValueError``, and a kind of `awq_jax.weights.CheckpointError`, so one ``except`` covers
    every checkpoint that `awq_jax.api.load_model` cannot load.
    """


# --------------------------------------------------------------------------------------
# Packing


def pack_int4(q_kn: np.ndarray) -> np.ndarray:
    """Packs 4-bit codes ``uint8 [K, N]`` into AutoAWQ GEMM words ``int32 [K, N / 8]``.

    Nibble ``i`` of word ``c`` holds column ``8c + AWQ_ORDER[i]`` (spec section 6). Used for
    both ``qweight`` (``[in, out]`` codes) and ``qzeros`` (``[in / g, out]`` zero points).
    """
    q_kn = np.asarray(q_kn)
    if q_kn.ndim != 2:
        raise ValueError(f"pack_int4 expects a 2-D [K, N] array, got shape {q_kn.shape}")
    k, n = q_kn.shape
    if n % _PACK:
        raise ValueError(f"pack_int4: N = {n} is not a multiple of {_PACK}")
    if not np.issubdtype(q_kn.dtype, np.integer):
        raise ValueError(f"pack_int4 expects integer codes, got {q_kn.dtype}")
    if q_kn.size and (q_kn.min() < 0 or q_kn.max() > 15):
        raise ValueError(f"pack_int4: codes must lie in [0, 15], got [{q_kn.min()}, {q_kn.max()}]")
    words_kc = np.zeros((k, n // _PACK), dtype=np.uint32)
    for i, col in enumerate(AWQ_ORDER):
        words_kc |= q_kn[:, col::_PACK].astype(np.uint32) << np.uint32(_BITS * i)
    return words_kc.view(np.int32)


def unpack_int4(packed_kc: np.ndarray) -> np.ndarray:
    """Unpacks AutoAWQ GEMM words ``int32 [K, C]`` into codes ``uint8 [K, 8 C]``.

    The inverse of :func:`pack_int4`. The words are signed, so each nibble is taken with an
    (arithmetic) shift and ``& 0xF``, as AutoAWQ's ``dequantize_gemm`` does.
    """
    packed_kc = np.asarray(packed_kc)
    if packed_kc.ndim != 2:
        raise ValueError(f"unpack_int4 expects a 2-D [K, C] array, got shape {packed_kc.shape}")
    if packed_kc.dtype not in (np.int32, np.uint32):
        raise ValueError(f"unpack_int4 expects int32 words, got {packed_kc.dtype}")
    k, c = packed_kc.shape
    q_kn = np.empty((k, c * _PACK), dtype=np.uint8)
    for i, col in enumerate(AWQ_ORDER):
        q_kn[:, col::_PACK] = (packed_kc >> (_BITS * i)) & 0xF
    return q_kn


# --------------------------------------------------------------------------------------
# Writing


def _check_quantized(name: str, qt: QuantizedTensor) -> None:
    """What the GEMM format can hold (spec section 6); cheap, run before anything is written."""
    if qt.bits != _BITS:
        raise ValueError(f"{name}: the GEMM format holds 4-bit weights only, got bits={qt.bits}")
    q_shape, s_shape, z_shape = np.shape(qt.q), np.shape(qt.scales), np.shape(qt.zeros)
    if len(q_shape) != 2:
        raise ValueError(f"{name}: quantized weight must be 2-D [in, out], got {q_shape}")
    k, n = q_shape
    g = qt.group_size
    if g <= 0 or k % g:
        raise ValueError(f"{name}: group size {g} does not divide the input dim {k}")
    if n % _PACK:
        raise ValueError(
            f"{name}: output dim {n} is not a multiple of 8 (the GEMM format packs 8 per int32)"
        )
    if s_shape != (k // g, n) or z_shape != (k // g, n):
        raise ValueError(
            f"{name}: scales {s_shape} / zeros {z_shape} do not match "
            f"[{k // g}, {n}] for weight [{k}, {n}] and group size {g}"
        )
    scales_gn = np.asarray(qt.scales)
    scales16 = scales_gn.astype(np.float16)
    if not np.all(np.isfinite(scales16)) or not np.array_equal(
        scales16.astype(np.float32), scales_gn.astype(np.float32)
    ):
        raise ValueError(
            f"{name}: scales ({scales_gn.dtype}) are not exactly representable in float16, the "
            "dtype the GEMM format stores; quantize with scale_dtype=float16"
        )


def _check_plain(name: str, x: Any) -> None:
    dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    if not (np.issubdtype(dtype, np.floating) or dtype == _DTYPES["bfloat16"]):
        raise ValueError(f"{name}: expected a floating-point tensor, got {dtype}")


def _quantized_arrays(name: str, qt: QuantizedTensor) -> dict[str, np.ndarray]:
    """The three GEMM tensors of one quantized linear (checked by ``_check_quantized``)."""
    return {
        f"{name}.qweight": pack_int4(np.asarray(qt.q)),
        f"{name}.qzeros": pack_int4(np.asarray(qt.zeros)),
        f"{name}.scales": np.asarray(qt.scales).astype(np.float16),
    }


def _plain_array(x: Any, dtype: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).astype(dtype))


def _stored_nbytes(x: Any, dtype: np.dtype) -> int:
    """Bytes ``x`` will take on disk (for sharding), computed from shapes without packing."""
    if isinstance(x, QuantizedTensor):
        k, n = x.shape
        groups = k // x.group_size if x.group_size > 0 else 0
        return k * n // 2 + groups * n // 2 + groups * n * 2
    return int(np.prod(np.shape(x))) * dtype.itemsize


def _plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, in order: a new shard starts when the next entry would overflow this one."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def _quantization_config(
    tensors: Mapping[str, Any],
    zero_point: bool | None,
    modules_to_not_convert: Sequence[str] | None = None,
) -> dict[str, Any]:
    qts = {k: v for k, v in tensors.items() if isinstance(v, QuantizedTensor)}
    if not qts:
        raise ValueError("no QuantizedTensor among the tensors: nothing to write as AWQ")
    # Per-channel tensors (one group spanning the input dim) are recorded as group_size -1.
    groups = {v.group_size for v in qts.values() if v.group_size != v.shape[0]}
    per_channel = [k for k, v in qts.items() if v.group_size == v.shape[0]]
    if len(groups) > 1 or (groups and any(qts[k].group_size not in groups for k in per_channel)):
        raise ValueError(
            "all quantized tensors must share one group size (config.json records one), got "
            f"{sorted({v.group_size for v in qts.values()})}"
        )
    group_size = groups.pop() if groups else -1
    if zero_point is None:
        # Symmetric quantization is stored with the constant zero point 2**(bits-1).
        zero_point = not all(np.all(np.asarray(v.zeros) == 2 ** (v.bits - 1)) for v in qts.values())
    return {
        "quant_method": "awq",
        "bits": _BITS,
        "group_size": group_size,
        "zero_point": bool(zero_point),
        "version": "gemm",
        "modules_to_not_convert": list(modules_to_not_convert) if modules_to_not_convert else None,
    }


def _check_tensors(tensors: Mapping[str, Any]) -> None:
    """Names and contents, all checked before the first byte is written."""
    stored: dict[str, str] = {}
    for key, value in tensors.items():
        if isinstance(value, QuantizedTensor):
            if key.endswith(".weight"):
                raise ValueError(
                    f"{key}: a QuantizedTensor is keyed by its module name (e.g. "
                    f"{key.removesuffix('.weight')!r}); '.qweight/.qzeros/.scales' are appended"
                )
            names = [f"{key}.{s}" for s in _SUFFIXES]
            _check_quantized(key, value)
        else:
            names = [key]
            _check_plain(key, value)
        for name in names:
            if name in stored:
                raise ValueError(
                    f"tensor name {name!r} is produced by both {stored[name]!r} and {key!r}"
                )
            stored[name] = key


def _check_extra_files(extra: Mapping[str, bytes]) -> None:
    reserved = {CONFIG_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, *_COPIED_FILES}
    for name, data in extra.items():
        if (
            not isinstance(name, str)
            or not name
            or name != Path(name).name
            or name.startswith(".")
            or "\\" in name
        ):
            raise ValueError(f"extra_files: {name!r} is not a plain file name")
        if name in reserved or name.endswith(".safetensors"):
            raise ValueError(f"extra_files: {name!r} is a name the checkpoint itself uses")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"extra_files: {name!r} must be bytes, got {type(data).__name__}")


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    dtype: str = "float16",
    copy_files_from: str | os.PathLike[str] | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    zero_point: bool | None = None,
    modules_to_not_convert: Sequence[str] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Writes an AutoAWQ GEMM checkpoint that transformers, vLLM and AutoAWQ load.

    Args:
      out_dir: the checkpoint directory to create.
      tensors: keyed by HF names. A :class:`QuantizedTensor` (4-bit, ``[in, out]``) is keyed by
        its module name (``"model.layers.0.self_attn.q_proj"``) and becomes
        ``.qweight/.qzeros/.scales``; any other array (``np.ndarray`` or ``jax.Array``: norms
        with folded scales, embeddings, ``lm_head``, biases such as
        ``"...q_proj.bias"``) is keyed by its full tensor name and written in ``dtype``.
      config: the model's HF config dict. ``config.json`` gets it plus ``torch_dtype`` and
        the ``quantization_config`` of spec section 6 (replacing any existing one).
      dtype: ``"float16"`` (the format's usual dtype) or ``"bfloat16"`` for unquantized
        tensors; quantized scales are always float16.
      copy_files_from: a model directory whose tokenizer files, chat templates and
        ``generation_config.json`` are copied when present.
      max_shard_bytes: above this total the weights are split into
        ``model-0000k-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``.
      overwrite: replace an existing ``out_dir`` (only one that looks like a checkpoint).
      zero_point: recorded in ``quantization_config``; by default inferred (``False`` when
        every zero point is ``8``, the symmetric quantizer's constant).
      modules_to_not_convert: recorded in ``quantization_config`` (``None`` when empty): the
        modules (name substrings, as transformers and vLLM match them) that are stored
        unquantized although they are linears AutoAWQ would quantize.
      extra_files: ``{file name: contents}`` written into the checkpoint as part of the same
        atomic write (e.g. the quantizer's own records). Plain file names only, none that the
        checkpoint itself uses (weights, index, ``config.json``, copied files) and no
        ``.safetensors`` (loaders glob for weights).

    Returns:
      ``out_dir`` as a ``Path``.

    The write is atomic (`convert.outdir`): everything goes to a temporary directory next to
    ``out_dir`` that is renamed at the end, so an interrupted write leaves no partial
    checkpoint behind; ``out_dir`` is never ``copy_files_from`` or a folder above it.
    """
    out = Path(out_dir).absolute()
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    src = Path(copy_files_from) if copy_files_from is not None else None
    if src is not None and not src.is_dir():
        raise FileNotFoundError(f"copy_files_from={src} is not a directory")
    check_destination(out, overwrite, sources=() if src is None else (src,))
    _check_tensors(tensors)
    extra = dict(extra_files or {})
    _check_extra_files(extra)
    if modules_to_not_convert is not None and (
        isinstance(modules_to_not_convert, str)
        or not all(isinstance(m, str) and m for m in modules_to_not_convert)
    ):
        raise ValueError(
            f"modules_to_not_convert must be a list of module names, got {modules_to_not_convert!r}"
        )
    np_dtype = _DTYPES[dtype]
    config_out = {
        **dict(config),
        "torch_dtype": dtype,
        "quantization_config": _quantization_config(tensors, zero_point, modules_to_not_convert),
    }
    if "dtype" in config_out:  # transformers >= 4.56 spells it "dtype"; keep the two in step
        config_out["dtype"] = dtype

    with staged_dir(out, overwrite, sources=() if src is None else (src,)) as tmp:
        _write_weights(tmp, tensors, np_dtype, max_shard_bytes)
        if src is not None:
            for name in _COPIED_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
        for name, data in extra.items():
            (tmp / name).write_bytes(data)
        # config.json last: a leftover temp directory never looks like a finished checkpoint.
        (tmp / CONFIG_NAME).write_text(json.dumps(config_out, indent=2) + "\n")
    return out


def _write_weights(
    tmp: Path, tensors: Mapping[str, Any], np_dtype: np.dtype, max_shard_bytes: int
) -> None:
    sizes = {key: _stored_nbytes(v, np_dtype) for key, v in tensors.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(shards):
        fname = SAFE_WEIGHTS_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        arrays: dict[str, np.ndarray] = {}
        for key in keys:  # materialised (and packed) one shard at a time
            value = tensors[key]
            if isinstance(value, QuantizedTensor):
                arrays.update(_quantized_arrays(key, value))
            else:
                arrays[key] = _plain_array(value, np_dtype)
        try:
            save_file(arrays, tmp / fname, metadata={"format": "pt"})
        except SafetensorError as e:  # e.g. no space left on the device
            raise OSError(f"writing {fname}: {e}") from e
        weight_map.update(dict.fromkeys(arrays, fname))
        del arrays
    if n > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (tmp / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------------------
# Reading


def _quant_params(config: Mapping[str, Any], where: Path) -> tuple[int, int | None]:
    """Validates ``quantization_config``; returns ``(bits, group_size or None)``.

    Accepts AutoAWQ's own spellings ``w_bit`` / ``q_group_size`` (which vLLM also reads) and
    transformers' ``format`` for ``version``; a missing version means ``gemm`` (their default).
    """
    qc = config.get("quantization_config")
    if not isinstance(qc, Mapping):
        raise CheckpointError(f"{where}: no quantization_config, so this is not an AWQ checkpoint")
    method = str(qc.get("quant_method", "")).lower()
    if method != "awq":
        raise CheckpointError(
            f"{where}: quantization_config.quant_method is {qc.get('quant_method')!r}, "
            "expected 'awq'"
        )
    # AutoAWQ writes "version"; transformers >= 5 writes "format" (and "version" alongside).
    raw = next((qc[k] for k in ("version", "format") if qc.get(k) is not None), "gemm")
    version = str(raw).lower()
    if version in _UNSUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{where}: AWQ version {raw!r} is not supported, only 'gemm' (the layout vLLM and "
            "transformers load); re-export the model with version='gemm'"
        )
    if version != "gemm":
        raise CheckpointError(f"{where}: unknown AWQ version {raw!r}, only 'gemm' is supported")
    bits = qc.get("bits", qc.get("w_bit", _BITS))
    if bits != _BITS:
        raise CheckpointError(
            f"{where}: bits={bits}, but the GEMM version holds 4-bit weights only"
        )
    group = qc.get("group_size", qc.get("q_group_size"))
    if group is not None and (not isinstance(group, int) or group == 0 or group < -1):
        raise CheckpointError(f"{where}: invalid group_size {group!r}")
    return bits, group


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from the index or the single ``model.safetensors``."""
    index_path = path / SAFE_WEIGHTS_INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from e
        files = {name: path / fname for name, fname in weight_map.items()}
        missing = sorted({f.name for f in files.values() if not f.is_file()})
        if missing:
            raise CheckpointError(f"{index_path}: lists files that are missing: {missing}")
        return files
    single = path / SAFE_WEIGHTS_NAME
    if not single.is_file():
        raise CheckpointError(f"{path}: neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}")
    return dict.fromkeys(_safetensors_keys(single), single)


def _safetensors_keys(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="np") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{file}: cannot read safetensors file (truncated or corrupt?): {e}"
        ) from e


class _Reader:
    """Opens each safetensors file once and reads one tensor at a time (memory-conscious)."""

    def __init__(self, files: Mapping[str, Path]):
        self.files = files
        self._handles: dict[Path, tuple[Any, frozenset[str]]] = {}

    def _open(self, key: str) -> Any:
        file = self.files[key]
        if file not in self._handles:
            try:
                handle = safe_open(file, framework="np")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(
                    f"{file}: cannot read safetensors file (truncated or corrupt?): {e}"
                ) from e
            self._handles[file] = (handle, frozenset(handle.keys()))
        handle, keys = self._handles[file]
        if key not in keys:
            raise CheckpointError(f"{file}: has no tensor {key!r} (the index is wrong)")
        return handle

    def spec(self, key: str) -> tuple[tuple[int, ...], str]:
        """``(shape, safetensors dtype string)`` from the header, without reading the data."""
        view = self._open(key).get_slice(key)
        return tuple(view.get_shape()), view.get_dtype()

    def tensor(self, key: str) -> np.ndarray:
        handle = self._open(key)
        try:
            return handle.get_tensor(key)
        except (SafetensorError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.files[key]}: cannot read {key!r}: {e}") from e

    def close(self) -> None:
        for handle, _ in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


def _load_quantized(reader: _Reader, module: str, group: int | None, bits: int) -> QuantizedTensor:
    keys = {s: f"{module}.{s}" for s in _SUFFIXES}
    for key in keys.values():
        if key not in reader.files:
            raise CheckpointError(f"{module}: has {module}.qweight but no {key}")
    specs = {s: reader.spec(key) for s, key in keys.items()}
    expected_dtype = {"qweight": "I32", "qzeros": "I32", "scales": "F16"}
    for s, (shape, st_dtype) in specs.items():
        if st_dtype != expected_dtype[s]:
            raise CheckpointError(
                f"{reader.files[keys[s]]}: {keys[s]} has dtype {st_dtype}, "
                f"expected {expected_dtype[s]} (GEMM format)"
            )
        if len(shape) != 2:
            raise CheckpointError(
                f"{reader.files[keys[s]]}: {keys[s]} must be 2-D, got {list(shape)}"
            )
    (k, c), (gs, n), zshape = specs["qweight"][0], specs["scales"][0], specs["qzeros"][0]
    if n != c * _PACK:
        raise CheckpointError(
            f"{module}: qweight {[k, c]} packs {c * _PACK} output columns, "
            f"but scales {[gs, n]} has {n}"
        )
    if group == -1:  # per output channel: one group spans the whole input dim
        g = k
    elif group is None:  # no group_size in the config: take it from the shapes
        g = k // gs if gs and k % gs == 0 else 0
    else:
        g = group
    if g <= 0 or k % g:
        raise CheckpointError(f"{module}: group size {g} does not divide the input dim {k}")
    if gs != k // g:
        raise CheckpointError(
            f"{module}: scales has {gs} groups, expected {k // g} (input dim {k}, group size {g})"
        )
    if zshape != (gs, c):
        raise CheckpointError(f"{module}: qzeros shape {list(zshape)}, expected {[gs, c]}")
    return QuantizedTensor(
        q=unpack_int4(reader.tensor(keys["qweight"])),
        scales=reader.tensor(keys["scales"]),
        zeros=unpack_int4(reader.tensor(keys["qzeros"])),
        bits=bits,
        group_size=g,
    )


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads an AutoAWQ GEMM checkpoint (ours or a third party's), validating it.

    Returns:
      ``(config, tensors)``: the ``config.json`` dict as stored, and the tensors keyed as
      :func:`save_checkpoint` takes them: a quantized linear by its module name as a
      :class:`QuantizedTensor` holding numpy arrays (``uint8`` codes and zeros, ``float16``
      scales), every other tensor by its full name as a ``np.ndarray`` in its stored dtype.

    Raises:
      CheckpointError: (a ``ValueError``) naming the file or key: not AWQ, a version other
        than ``gemm``, ``bits`` other than 4, a qweight without qzeros/scales (or the reverse),
        wrong shapes or dtypes, a group size that does not divide the input dim, a missing
        shard, a truncated or corrupt safetensors file.
      FileNotFoundError: no such directory or no ``config.json``.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such checkpoint directory")
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{root}: no {CONFIG_NAME}")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config_path}: invalid JSON ({e})") from e
    bits, group = _quant_params(config, config_path)

    files = _weight_files(root)
    modules = {k.removesuffix(".qweight") for k in files if k.endswith(".qweight")}
    for key in files:
        head, _, suffix = key.rpartition(".")
        if suffix in ("qzeros", "scales") and head not in modules:
            raise CheckpointError(f"{files[key]}: {key} has no matching {head}.qweight")

    reader = _Reader(files)
    tensors: dict[str, Any] = {}
    try:
        for key in _in_file_order(files):
            head, _, suffix = key.rpartition(".")
            if head in modules and suffix in _SUFFIXES:
                if suffix == "qweight":
                    tensors[head] = _load_quantized(reader, head, group, bits)
            else:
                tensors[key] = reader.tensor(key)
    finally:
        reader.close()
    return config, tensors


def _in_file_order(files: Mapping[str, Path]) -> Iterator[str]:
    """Keys grouped by file, so each shard is opened once, in turn."""
    return iter(sorted(files, key=lambda k: (str(files[k]), k)))
