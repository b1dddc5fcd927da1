"""The activation-aware scale search and the clip search, as pure jitted functions.

AWQ_SPEC.md sections 3-4. Everything here takes arrays and returns arrays: the layer's params
are never edited in place, so every candidate is scored against the original weights by
construction. Candidates run inside one jitted function with ``lax.map`` (no host round trip
per grid point); ``SearchSettings.grid_batch`` candidates are evaluated at once (vmapped) and
the calibration sequences are processed ``chunk_seqs`` at a time, which bounds memory.

Weights are ``[in, out]``: a per-input-channel scale ``s`` multiplies kernel ROWS.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from awq_jax.config import ModelConfig
from awq_jax.model import MLP, Attention
from awq_jax.quantizer import fake_quantize, resolve_group_size
from awq_jax.scale_groups import ScaleGroup

__all__ = [
    "SearchSettings",
    "apply_clip",
    "apply_scales",
    "candidate_scales",
    "get_path",
    "kv_expand",
    "replace_path",
    "search_clip",
    "search_scales",
]

Layer = dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """Quantization and search options (defaults: AutoAWQ's, except the group size)."""

    w_bit: int = 4
    group_size: int = 128
    zero_point: bool = True
    n_grid: int = 20
    inclusive_grid: bool = False  # False: ratios i/n for i < n (AutoAWQ); True: [0, 1] inclusive
    duo_scaling: str = "true"  # "true": x^r / w^(1-r) (AutoAWQ); "false": x^r (paper); "both"
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512  # tokens subsampled for the clip search (AutoAWQ: 512)
    gqa_vo: bool = False
    chunk_seqs: int | None = None  # calibration sequences per forward chunk (None: all)
    grid_batch: int = 1  # scale candidates evaluated at once

    def __post_init__(self) -> None:
        if self.duo_scaling not in ("true", "false", "both"):
            raise ValueError(f"duo_scaling must be true, false or both, got {self.duo_scaling!r}")
        if self.n_grid < 1 or self.clip_grid < 1:
            raise ValueError("grid sizes must be >= 1")

    def ratios(self) -> np.ndarray:
        if self.inclusive_grid:
            return np.linspace(0.0, 1.0, self.n_grid, dtype=np.float32)
        return (np.arange(self.n_grid) / self.n_grid).astype(np.float32)

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ratios, duo flags)`` of every candidate after the identity (RTN) candidate."""
        r = self.ratios()
        duo = {"true": [True], "false": [False], "both": [False, True]}[self.duo_scaling]
        return np.concatenate([r] * len(duo)), np.repeat(np.asarray(duo), len(r))

    def quant(self, w_kn: jax.Array) -> jax.Array:
        return fake_quantize(
            w_kn, bits=self.w_bit, group_size=self.group_size, zero_point=self.zero_point
        )


# ------------------------------------------------------------------------------ statistics


def get_path(tree: Layer, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def replace_path(tree: Layer, path: tuple[str, ...], value: Any) -> Layer:
    """A copy of ``tree`` with ``tree[path] = value`` (dicts along the path copied)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = replace_path(tree[path[0]], path[1:], value)
    return out


def kv_reduce(v: jax.Array, config: ModelConfig) -> jax.Array:
    """``[N*H] -> [K*H]``: mean over the query heads that share a kv head."""
    return v.reshape(config.num_kv_heads, config.q_per_kv, config.head_dim).mean(1).reshape(-1)


def kv_expand(s: jax.Array, config: ModelConfig) -> jax.Array:
    """``[K*H] -> [N*H]``: repeat each kv channel's scale over its query heads."""
    s = s.reshape(config.num_kv_heads, 1, config.head_dim)
    return jnp.broadcast_to(s, (config.num_kv_heads, config.q_per_kv, config.head_dim)).reshape(-1)


def activation_mean(x: jax.Array) -> jax.Array:
    """``x_mean[c]``: mean |x[..., c]| over all tokens, accumulated in float32."""
    return jnp.mean(jnp.abs(x.reshape(-1, x.shape[-1]).astype(jnp.float32)), axis=0)


def weight_mean(kernels: list[jax.Array], group_size: int) -> jax.Array:
    """``w_mean[c]``: |w| / (its group's absmax + 1e-6), averaged over all outputs (AutoAWQ)."""
    w = jnp.concatenate([k.astype(jnp.float32) for k in kernels], axis=1)  # [in, out_total]
    k, n = w.shape
    g = resolve_group_size(group_size, k)
    w_gsn = jnp.abs(w).reshape(k // g, g, n)
    w_gsn = w_gsn / (w_gsn.max(axis=1, keepdims=True) + 1e-6)
    return w_gsn.reshape(k, n).mean(axis=1)


def candidate_scales(
    x_mean: jax.Array, w_mean: jax.Array, ratio: jax.Array, duo: jax.Array
) -> jax.Array:
    """``s = x^r / (w^(1-r) + 1e-4)`` (duo) or ``x^r``; clamped, normalised by sqrt(max*min)."""
    s = jnp.where(duo, x_mean**ratio / (w_mean ** (1 - ratio) + 1e-4), x_mean**ratio)
    s = jnp.maximum(s, 1e-4)
    s = s / jnp.sqrt(s.max() * s.min())
    return jnp.where(jnp.isfinite(s), s, 1.0)


# ------------------------------------------------------------------------------ the search


def _inspect(
    config: ModelConfig, group: ScaleGroup, layer: Layer, x: jax.Array, rope_mask: tuple
) -> jax.Array:
    """The output the group's loss is measured on, for inputs ``x [b, T, D_in]``."""
    if group.inspect == "attention":
        cos, sin, mask = rope_mask
        out, _ = Attention(config).apply({"params": layer["self_attn"]}, x, cos, sin, mask)
        return out
    if group.inspect == "mlp":
        return MLP(config).apply({"params": layer["mlp"]}, x)
    (path,) = group.linears
    p = get_path(layer, path)
    y = jnp.einsum("...k,kn->...n", x, p["kernel"], preferred_element_type=jnp.float32)
    return y + p["bias"] if "bias" in p else y


def _chunks(x: jax.Array, chunk_seqs: int | None) -> jax.Array:
    """``[n, T, D] -> [C, n // C, T, D]`` with the largest chunk <= chunk_seqs dividing n."""
    n = x.shape[0]
    c = n if chunk_seqs is None else max(d for d in range(1, min(n, chunk_seqs) + 1) if n % d == 0)
    return x.reshape(n // c, c, *x.shape[1:])


def scaled_layer(
    config: ModelConfig, group: ScaleGroup, settings: SearchSettings, layer: Layer, s: jax.Array
) -> Layer:
    """The layer with each of the group's kernels replaced by ``Q(W * s) / s`` (rows)."""
    s_rows = kv_expand(s, config) if group.shared_kv else s
    for path in group.linears:
        kernel = get_path(layer, (*path, "kernel"))
        w = kernel.astype(jnp.float32) * s_rows[:, None]
        w_q = settings.quant(w) / s_rows[:, None]
        layer = replace_path(layer, (*path, "kernel"), w_q.astype(kernel.dtype))
    return layer


@functools.partial(jax.jit, static_argnames=("config", "group", "settings"))
def search_scales(
    config: ModelConfig,
    group: ScaleGroup,
    settings: SearchSettings,
    layer: Layer,
    x_in: jax.Array,
    rope_mask: tuple,
) -> dict[str, jax.Array]:
    """Searches the best scale for one group of one layer.

    Args:
      layer: the layer's ORIGINAL float params.
      x_in: the input of the group's linears, ``[n_seqs, T, D_in]`` (the inspected module's
        input: for "attention"/"mlp" groups the normed hidden states).
      rope_mask: ``(cos, sin, mask)`` for the attention sub-block.

    Returns ``{"scales", "losses", "best"}``: the winning ``s``; the loss of every candidate,
    the identity (plain RTN, ``s = 1``) first, then the grid; the winner's index. The identity
    is always a candidate, so the chosen scales never score worse than RTN on this loss.
    """
    kernels = [get_path(layer, (*p, "kernel")) for p in group.linears]
    x_mean = activation_mean(x_in)
    w_mean = weight_mean(kernels, settings.group_size)
    if group.shared_kv:
        x_mean, w_mean = kv_reduce(x_mean, config), kv_reduce(w_mean, config)

    x_chunks = _chunks(x_in, settings.chunk_seqs)
    out_fp = jax.lax.map(lambda x: _inspect(config, group, layer, x, rope_mask), x_chunks)
    n_elems = out_fp.size

    def loss(s: jax.Array) -> jax.Array:
        cand = scaled_layer(config, group, settings, layer, s)

        def chunk_err(carry, xs):
            x, ref = xs
            out = _inspect(config, group, cand, x, rope_mask)
            err = jnp.sum(jnp.square(ref.astype(jnp.float32) - out.astype(jnp.float32)))
            return carry + err, None

        total, _ = jax.lax.scan(chunk_err, jnp.float32(0), (x_chunks, out_fp))
        return total / n_elems

    ratios, duo = settings.candidates()
    grid = jax.vmap(candidate_scales, in_axes=(None, None, 0, 0))(
        x_mean, w_mean, jnp.asarray(ratios), jnp.asarray(duo)
    )
    cands = jnp.concatenate([jnp.ones_like(grid[:1]), grid], axis=0)
    losses = jax.lax.map(loss, cands, batch_size=settings.grid_batch)
    best = jnp.argmin(losses)
    return {"scales": cands[best], "losses": losses, "best": best, "x_mean": x_mean}


def apply_scales(config: ModelConfig, group: ScaleGroup, layer: Layer, s: jax.Array) -> Layer:
    """Folds ``s``: the previous op's outputs divided by ``s``, the linears' input rows times it.

    Exact in real arithmetic: the layer computes the same function (tested in float32).
    """
    s_rows = kv_expand(s, config) if group.shared_kv else s
    prev = get_path(layer, group.prev)
    if "scale" in prev:  # RMSNorm weight
        new_prev = {
            **prev,
            "scale": (prev["scale"].astype(jnp.float32) / s).astype(prev["scale"].dtype),
        }
    else:  # a linear: its output columns (and bias)
        new_prev = {
            **prev,
            "kernel": (prev["kernel"].astype(jnp.float32) / s[None, :]).astype(
                prev["kernel"].dtype
            ),
        }
        if "bias" in prev:
            new_prev["bias"] = (prev["bias"].astype(jnp.float32) / s).astype(prev["bias"].dtype)
    layer = replace_path(layer, group.prev, new_prev)
    for path in group.linears:
        kernel = get_path(layer, (*path, "kernel"))
        new = (kernel.astype(jnp.float32) * s_rows[:, None]).astype(kernel.dtype)
        layer = replace_path(layer, (*path, "kernel"), new)
    return layer


# ------------------------------------------------------------------------------ clipping


@functools.partial(jax.jit, static_argnames=("settings",))
def search_clip(settings: SearchSettings, kernel_kn: jax.Array, x: jax.Array) -> jax.Array:
    """Best clipping threshold ``max_val [K // g, N]`` per (group, output channel).

    Candidates ``absmax * (1 - i / clip_grid)`` for ``i < clip_max_shrink * clip_grid``; the
    error of a candidate is AutoAWQ's, mean over tokens of
    ``(sum_{i in group} x_i * (Q(clip(w))_i - w_i))**2``, computed exactly through each group's
    input second-moment matrix ``C_g = X_g^T X_g / T`` as ``d^T C_g d`` (no ``[T, K, N]``
    intermediate). Tokens are subsampled to about ``clip_tokens`` with a stride, as AutoAWQ.
    """
    k, n = kernel_kn.shape
    g = resolve_group_size(settings.group_size, k)
    x = x.reshape(-1, k)
    x = x[:: max(1, x.shape[0] // settings.clip_tokens)].astype(jnp.float32)
    x_tgi = x.reshape(x.shape[0], k // g, g)
    c_gij = jnp.einsum("tgi,tgj->gij", x_tgi, x_tgi) / x.shape[0]
    w = kernel_kn.astype(jnp.float32)
    w_gsn = w.reshape(k // g, g, n)
    absmax = jnp.abs(w_gsn).max(axis=1, keepdims=True)  # [G, 1, N]
    shrinks = (
        1 - jnp.arange(int(settings.clip_max_shrink * settings.clip_grid)) / settings.clip_grid
    )

    def err(shrink: jax.Array) -> jax.Array:
        max_val = absmax * shrink
        w_c = jnp.clip(w_gsn, -max_val, max_val).reshape(k, n)
        d_gsn = (settings.quant(w_c) - w).reshape(k // g, g, n)
        return jnp.einsum("gin,gij,gjn->gn", d_gsn, c_gij, d_gsn)

    errs = jax.lax.map(err, shrinks)  # [n_shrink, G, N]
    best = jnp.argmin(errs, axis=0)
    return absmax[:, 0, :] * shrinks[best]


def apply_clip(kernel_kn: jax.Array, max_val_gn: jax.Array) -> jax.Array:
    """Clamps each (group, column) of the kernel to ``[-max_val, max_val]``."""
    k, n = kernel_kn.shape
    g = k // max_val_gn.shape[0]
    w_gsn = kernel_kn.reshape(k // g, g, n)
    m = max_val_gn[:, None, :].astype(kernel_kn.dtype)
    return jnp.clip(w_gsn, -m, m).reshape(k, n)
