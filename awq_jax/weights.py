"""Hugging Face checkpoint names <-> our param paths, and the strict safetensors loader.

One table (`_RULES`) maps every HF tensor name to a param path. The loader fills a template
made with ``jax.eval_shape`` (no allocation): every template leaf must be filled, every
checkpoint tensor consumed or explicitly ignored, every shape asserted. Tensors are read one at
a time from memory-mapped safetensors and each param leaf is moved to the device as soon as it
is complete, so loading never holds two full copies of the weights. `params_from_hf` is that
core, shared with the AWQ checkpoint loader (`awq_jax.checkpoint`), whose quantized kernels
arrive as `QuantizedTensor` values.

Pickle checkpoints (``pytorch_model.bin``) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from awq_jax.config import ModelConfig
from awq_jax.model import init_params
from awq_jax.quantizer import QuantizedTensor

__all__ = [
    "CheckpointError",
    "hf_name_to_path",
    "load_params",
    "params_from_hf",
    "params_to_hf",
    "read_config",
    "read_json",
    "safetensors_files",
]

Params = dict[str, Any]

# (HF name regex, param path below the root or below "layers", transpose torch [out, in]).
_RULES: tuple[tuple[re.Pattern[str], tuple[str, ...], bool], ...] = tuple(
    (re.compile(pattern), path, transpose)
    for pattern, path, transpose in [
        (r"model\.embed_tokens\.weight", ("embed_tokens", "embedding"), False),
        (r"model\.norm\.weight", ("norm", "scale"), False),
        (r"lm_head\.weight", ("lm_head", "kernel"), True),
        (
            r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
            ("{1}", "scale"),
            False,
        ),
        (
            r"model\.layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight",
            ("self_attn", "{1}", "scale"),
            False,
        ),
        (
            r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight",
            ("self_attn", "{1}", "kernel"),
            True,
        ),
        (
            r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.bias",
            ("self_attn", "{1}", "bias"),
            False,
        ),
        (
            r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight",
            ("mlp", "{1}", "kernel"),
            True,
        ),
        (
            r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.bias",
            ("mlp", "{1}", "bias"),
            False,
        ),
    ]
)
# Present in some checkpoints, never needed: recomputed buffers.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message names the file or key."""


def hf_name_to_path(name: str) -> tuple[tuple[str, ...], int | None, bool] | None:
    """``(param path, layer index or None, transpose)`` for an HF tensor name, else None.

    Layer params live under ``("layers", ...)`` with the layer index as the leading axis.
    """
    for pattern, path, transpose in _RULES:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        resolved = tuple(p.format(*m.groups()) for p in path)
        if name.startswith("model.layers."):
            return ("layers", *resolved), int(m.group(1)), transpose
        return resolved, None, transpose
    return None


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; a `CheckpointError` naming the file if it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """The ``config.json`` dict of a model folder, checked with `ModelConfig.from_hf`.

    Raises:
      CheckpointError: no such folder, no ``config.json``, or not a JSON object.
      UnsupportedModelError: (`awq_jax.config`; `InvalidConfigError` for a malformed value)
        a config `ModelConfig.from_hf` rejects; the message starts with the file's path.
    """
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"model directory not found: {model_dir}")
    if not path.is_file():
        raise CheckpointError(f"missing config.json in {model_dir}")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    ModelConfig.from_hf(cfg, source=path)
    return cfg


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's safetensors files (single file or the shards an index lists)."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        body = read_json(index)
        weight_map = body.get("weight_map") if isinstance(body, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f"{index}: expected an object with a 'weight_map' of tensor name -> file name"
            )
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {missing}")
        return [d / n for n in names]
    files = sorted(d.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
    if pickles:
        raise CheckpointError(
            f"{d} holds only pickle checkpoints ({', '.join(pickles)}). They are never loaded "
            "here: unpickling runs arbitrary code. Convert them once with transformers, e.g. "
            "`AutoModelForCausalLM.from_pretrained(d).save_pretrained(out, "
            "safe_serialization=True)`, and load the safetensors folder."
        )
    raise CheckpointError(f"no *.safetensors weights in {d}")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path} (truncated or corrupt?): {e}") from e


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, Path, Any]]:
    """``(name, file, open handle)`` for every tensor of the checkpoint, file by file."""
    for path in safetensors_files(model_dir):
        f = _open(path)
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            yield name, path, f


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


Entry = tuple[str, str, Callable[[], Any]]
"""``(HF tensor name, where it comes from (for messages), read it)``: one checkpoint tensor."""


def load_params(model_dir: str | Path, config: ModelConfig, dtype=jnp.bfloat16) -> Params:
    """Loads an unquantized HF safetensors checkpoint into our params pytree, strictly."""

    def read(name: str, path: Path, f: Any) -> np.ndarray:
        try:
            return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {name} from {path}: {e}") from e

    entries = (
        (name, path.name, functools.partial(read, name, path, f))
        for name, path, f in iter_tensors(model_dir)
    )
    return params_from_hf(entries, config, dtype, where=str(model_dir))


def params_from_hf(
    entries: Iterable[Entry], config: ModelConfig, dtype=jnp.bfloat16, *, where: str
) -> Params:
    """Fills the params pytree from HF-named tensors, strictly; the core of the loaders.

    Every template leaf must be filled, every tensor consumed (or knowingly ignored), every
    shape match the config. A tensor is read (``entry[2]()``) only when its param leaf is
    built, so at most one leaf is held twice. A reader may return:

    - a float ``np.ndarray`` in torch orientation (``[out, in]`` for kernels): transposed as
      `hf_name_to_path` says and cast to ``dtype``;
    - a `QuantizedTensor` (``[in, out]``, numpy arrays) for a Linear kernel, named
      ``<module>.weight``: kept quantized (codes, float16 scales and zeros as stored), the
      layers stacked into one `QuantizedTensor` of jax arrays. Where some layers of a kernel
      are quantized and others are float, the quantized ones are dequantized into the float
      stack (the params hold one kind per leaf).
    """
    template = jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype))
    flat_template = {
        tuple(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]
    }
    # Group the checkpoint's tensors by the param leaf they fill.
    sources: dict[tuple[str, ...], list[tuple[str, str, Callable[[], Any], int | None, bool]]]
    sources = {}
    unexpected: list[str] = []
    for name, source, read in entries:
        target = hf_name_to_path(name)
        if target is None:
            if not _IGNORED.fullmatch(name):
                unexpected.append(f"{name} ({source})")
            continue
        param_path, layer, transpose = target
        if param_path == ("lm_head", "kernel") and config.tie_word_embeddings:
            continue  # a tied checkpoint may store the shared matrix twice
        if param_path not in flat_template:
            unexpected.append(f"{name} ({source})")
            continue
        sources.setdefault(param_path, []).append((name, source, read, layer, transpose))
    if unexpected:
        raise CheckpointError(
            f"checkpoint tensors that this model ({config.model_type}) has no place for: "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )

    params: Params = {}
    for param_path, spec in flat_template.items():
        entries_here = sources.get(param_path, [])
        stacked = param_path[0] == "layers"
        expected = config.num_layers if stacked else 1
        if len(entries_here) != expected:
            raise CheckpointError(
                f"{'/'.join(param_path)}: expected {expected} checkpoint tensor(s), found "
                f"{len(entries_here)} in {where}"
            )
        _set_path(params, param_path, _build_leaf(param_path, spec, entries_here, stacked))
    return params


def _build_leaf(param_path, spec, entries, stacked: bool) -> Any:
    """One param leaf from its checkpoint tensors (one per layer when ``stacked``)."""
    want = tuple(spec.shape[1:] if stacked else spec.shape)
    out: np.ndarray | None = None
    quantized: dict[int, QuantizedTensor] = {}
    seen: set[int] = set()
    for name, source, read, layer, transpose in entries:
        index = layer if stacked else 0
        if index in seen:
            raise CheckpointError(
                f"{name} ({source}): {'/'.join(param_path)} of layer {index} is given twice"
            )
        seen.add(index)
        t = read()
        if isinstance(t, QuantizedTensor):
            if param_path[-1] != "kernel":
                raise CheckpointError(
                    f"{name} ({source}) is quantized, but {'/'.join(param_path)} is not a "
                    "linear kernel"
                )
            if t.shape != want:
                raise CheckpointError(
                    f"{name.removesuffix('.weight')} in {source} is quantized with shape "
                    f"{t.shape} ([in, out]), but the config implies {want}"
                )
            quantized[index] = t
            continue
        if transpose:
            t = t.T
        if t.shape != want:
            raise CheckpointError(
                f"{name} in {source} has shape {tuple(t.shape)} "
                f"(transposed to [in, out]), but the config implies {want}"
            )
        if out is None:
            out = np.empty(spec.shape, dtype=np.dtype(spec.dtype))
        out[index if stacked else ...] = t
        del t
    if not quantized:
        return jnp.asarray(out)
    if out is not None:  # mixed: float for every layer
        for index, qt in quantized.items():
            out[index] = np.asarray(qt.dequantize(jnp.float32)).astype(out.dtype)
        return jnp.asarray(out)
    return _stack_quantized(param_path, [quantized[i] for i in sorted(quantized)], stacked)


def _stack_quantized(param_path, qts: list[QuantizedTensor], stacked: bool) -> QuantizedTensor:
    kinds = {(qt.bits, qt.group_size) for qt in qts}
    if len(kinds) > 1:
        raise CheckpointError(
            f"{'/'.join(param_path)}: layers quantized with different (bits, group size): "
            f"{sorted(kinds)}"
        )
    bits, group_size = kinds.pop()

    def join(field: str) -> jax.Array:
        arrays = [getattr(qt, field) for qt in qts]
        return jnp.asarray(np.stack(arrays) if stacked else arrays[0])

    return QuantizedTensor(
        q=join("q"), scales=join("scales"), zeros=join("zeros"), bits=bits, group_size=group_size
    )


def params_to_hf(params: Params, config: ModelConfig) -> dict[str, Any]:
    """HF tensor names -> numpy leaves (torch orientation for float kernels), layers unstacked.

    Quantized kernels (`QuantizedTensor`, stored ``[in, out]`` like the AWQ GEMM format) are
    returned under the module name (``model.layers.0.self_attn.q_proj``), not ``.weight``.
    The layers are copied to the host once; each layer's tensors are views of that copy.
    """
    out: dict[str, Any] = {}

    def put(hf: str, leaf: Any, transpose: bool) -> None:
        if isinstance(leaf, QuantizedTensor):
            out[hf.removesuffix(".weight")] = leaf
        else:
            out[hf] = np.asarray(leaf).T if transpose else np.asarray(leaf)

    put("model.embed_tokens.weight", params["embed_tokens"]["embedding"], False)
    put("model.norm.weight", params["norm"]["scale"], False)
    if not config.tie_word_embeddings:
        put("lm_head.weight", params["lm_head"]["kernel"], True)
    # One host copy of the layers; each layer below is a view of it, not another copy.
    layers = jax.tree.map(np.asarray, params["layers"])
    for i in range(config.num_layers):
        layer = jax.tree.map(lambda a, i=i: a[i], layers)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            put(f"model.layers.{i}.{norm}.weight", layer[norm]["scale"], False)
        for group, mods in layer.items():
            if group not in ("self_attn", "mlp"):
                continue
            for mod, leaves in mods.items():
                prefix = f"model.layers.{i}.{group}.{mod}"
                if "scale" in leaves:
                    put(f"{prefix}.weight", leaves["scale"], False)
                if "kernel" in leaves:
                    put(f"{prefix}.weight", leaves["kernel"], True)
                if "bias" in leaves:
                    put(f"{prefix}.bias", leaves["bias"], False)
    return out
