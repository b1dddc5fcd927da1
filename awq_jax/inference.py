"""Params for fast inference: fused projections and int4 kernels.

`prepare_for_inference` rewrites a params pytree (float or quantized) once, at load time:

- q/k/v become one ``qkv_proj`` and gate/up one ``gate_up_proj`` (one matmul, one kernel
  launch each instead of three / two); the model picks the fused layout up by itself. 4-bit
  gate/up (no biases) are interleaved instead of concatenated and their `Int4Linear` carries
  ``epilogue="swiglu"``: the kernel returns ``silu(gate) * up`` itself (on the H100 the decode
  kernel computes it from its accumulators: one XLA multiply fewer per layer and step);
- every `QuantizedTensor` kernel (4-bit) becomes an `Int4Linear`: the weight repacked by
  `pallas_kernels.prepare_weight` into the kernels' layout, so `awq_jax.linear.linear` routes
  it to `pallas_kernels.int4_matmul` (Pallas kernels on GPU, the jnp reference elsewhere);
- the stacked layer axis is split into a list of per-layer trees, which the model runs as an
  unrolled loop with a per-layer KV cache: a scan over stacked weights slices (copies) each
  layer's weights and rewrites the stacked cache on every decode step, which costs a large
  share of the memory bandwidth that decoding is bound by;
- each `Int4Linear` of that list points at the weight of the linear that runs after it
  (``prefetch``; the same arrays, no copy): at decode its kernel may prefetch that weight
  into the L2, so the bytes move while attention and the norms leave the memory idle
  (how much is the part's `pallas_kernels.tuning.DECODE` choice: none on the H100 and
  the H200 since run 92).

The model function is unchanged: only leaves and names of the params pytree differ.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from awq_jax.quantizer import QuantizedTensor

__all__ = ["Int4Linear", "prepare_for_inference", "weight_bytes"]

Params = dict[str, Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Linear:
    """A linear's int4 weight in kernel layout, and which implementation runs it.

    ``implementation`` is static (part of the pytree structure), so changing it retraces
    instead of silently reusing a compiled function: None = dispatch, or "xla", "triton",
    "mosaic", "mosaic_ws" (see `pallas_kernels.int4_matmul`). ``epilogue`` (static too) is
    None or "swiglu" (`pallas_kernels.int4_matmul`'s argument of that name). ``prefetch``
    is the weight of the linear that runs next (or None), set by `prepare_for_inference`.
    """

    weight: Any  # pallas_kernels.Int4Weight
    implementation: str | None = dataclasses.field(default=None, metadata={"static": True})
    # "swiglu": the weight is gate/up interleaved and the linear returns silu(gate) * up.
    epilogue: str | None = dataclasses.field(default=None, metadata={"static": True})
    # The next linear's weight (the same device arrays, no copy): the decode kernel
    # prefetches it into the L2 (`pallas_kernels.int4_matmul`'s ``prefetch``).
    prefetch: Any = None


def _to_int4(
    qt: QuantizedTensor, implementation: str | None, epilogue: str | None = None
) -> Int4Linear:
    from pallas_kernels import prepare_weight
    from pallas_kernels.layout import format_for

    if qt.bits != 4:
        raise ValueError(f"the int4 kernels need 4-bit weights, got {qt.bits}-bit")
    fmt = format_for(implementation, qt.q.shape[-2], qt.group_size)  # what the backend reads
    prepare = lambda q, s, z: prepare_weight(q, s, z, group_size=qt.group_size, fmt=fmt)  # noqa: E731
    for _ in range(qt.q.ndim - 2):  # stacked layers: map over the leading axes
        prepare = jax.vmap(prepare)
    return Int4Linear(prepare(qt.q, qt.scales, qt.zeros), implementation, epilogue)


def _concat_out(*leaves: Any) -> Any:
    """Concatenates float kernels / biases / QuantizedTensors along the output (last) axis."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=-1), *leaves)


def _fuse(mods: dict[str, Any], names: tuple[str, ...], fused: str) -> dict[str, Any]:
    if not all(n in mods for n in names):
        return mods
    parts = [mods[n] for n in names]
    kinds = {type(p["kernel"]) for p in parts}
    if len(kinds) != 1 or (
        isinstance(parts[0]["kernel"], QuantizedTensor)
        and len({(p["kernel"].bits, p["kernel"].group_size) for p in parts}) != 1
    ):
        return mods  # mixed precisions: leave unfused
    out = {k: v for k, v in mods.items() if k not in names}
    out[fused] = {key: _concat_out(*(p[key] for p in parts)) for key in parts[0]}
    return out


def _fuse_swiglu(mlp: dict[str, Any], implementation: str | None) -> dict[str, Any] | None:
    """4-bit gate/up without biases -> one ``gate_up_proj`` `Int4Linear` whose columns
    are interleaved (`pallas_kernels.layout.interleave_gate_up`) and whose linear returns
    ``silu(gate) * up``; None where that does not apply (the caller concatenates)."""
    from pallas_kernels.layout import interleave_gate_up

    parts = [mlp.get(n) for n in ("gate_proj", "up_proj")]
    if any(p is None or set(p) != {"kernel"} for p in parts):
        return None
    gate, up = (p["kernel"] for p in parts)
    if not all(isinstance(t, QuantizedTensor) and t.bits == 4 for t in (gate, up)) or (
        gate.group_size != up.group_size
    ):
        return None
    fused = jax.tree.map(interleave_gate_up, gate, up)
    rest = {k: v for k, v in mlp.items() if k not in ("gate_proj", "up_proj")}
    return {**rest, "gate_up_proj": {"kernel": _to_int4(fused, implementation, "swiglu")}}


def prepare_for_inference(
    params: Params,
    *,
    fuse: bool = True,
    unstack: bool = True,
    implementation: str | None = None,
    prefetch: bool = True,
) -> Params:
    """Fused projections, `Int4Linear` kernels, one param tree per layer (module docstring);
    ``prefetch``: each unstacked `Int4Linear` points at the next one's weight."""
    layers = dict(params["layers"])
    if fuse:
        layers["self_attn"] = _fuse(layers["self_attn"], ("q_proj", "k_proj", "v_proj"), "qkv_proj")
        layers["mlp"] = _fuse_swiglu(layers["mlp"], implementation) or _fuse(
            layers["mlp"], ("gate_proj", "up_proj"), "gate_up_proj"
        )

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, QuantizedTensor):
            return _to_int4(leaf, implementation)
        return leaf

    layers = jax.tree.map(convert, layers, is_leaf=lambda x: isinstance(x, QuantizedTensor))
    if unstack:
        n = jax.tree.leaves(layers)[0].shape[0]
        layers = [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)]
        if prefetch:
            layers = _chain_prefetch(layers)
    return {**params, "layers": layers}


# The linears of a decoder layer in the order a forward pass runs them.
_RUN_ORDER = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "qkv_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "gate_up_proj"),
    ("mlp", "down_proj"),
)


def _chain_prefetch(layers: list[Params]) -> list[Params]:
    """Each `Int4Linear` gets the weight of the one that runs after it (through the
    layers; the last gets none): its decode kernel prefetches that weight into the L2."""
    sites = [
        (i, mod, name)
        for i, layer in enumerate(layers)
        for mod, name in _RUN_ORDER
        if isinstance(layer.get(mod, {}).get(name, {}).get("kernel"), Int4Linear)
    ]
    layers = [{k: dict(v) if isinstance(v, dict) else v for k, v in ly.items()} for ly in layers]
    for (i, mod, name), nxt in zip(sites, [*sites[1:], None], strict=False):
        linear = dict(layers[i][mod][name])
        following = None if nxt is None else layers[nxt[0]][nxt[1]][nxt[2]]["kernel"].weight
        linear["kernel"] = dataclasses.replace(linear["kernel"], prefetch=following)
        layers[i][mod][name] = linear
    return layers


def weight_bytes(params: Params, *, linear_only: bool = False) -> int:
    """Bytes of the params on device (``linear_only``: only the decoder layers' kernels)."""
    tree = params["layers"] if linear_only else params
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if linear_only and "norm" in jax.tree_util.keystr(path):
            continue
        if linear_only and "bias" in jax.tree_util.keystr(path):
            continue
        if ".prefetch" in jax.tree_util.keystr(path):  # another linear's arrays, counted there
            continue
        total += leaf.size * _bits(leaf.dtype) // 8
    return int(total)


def _bits(dtype: Any) -> int:
    """Storage bits per element: int4 is packed two per byte on device (numpy says 1 byte)."""
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).bits
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.finfo(dtype).bits
    return 8 * jnp.dtype(dtype).itemsize
