"""The specification: dequantize the int4 weight, then one dense dot (plain jnp).

This is also the CPU/TPU path, so it is written to stay cheap under jit on CPU: the
dequantization is one fused elementwise pass over ``[N, K]`` and the dot contracts K of
both operands (no explicit transpose is materialised).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.layout import SWIGLU_BLOCK, WGMMA_CHUNK, Int4Weight, stored_codes_wgmma


def _dequantize_planes(w: Int4Weight, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """The two nibble planes dequantized: ``[N, groups, G/2]`` each (first/second halves)."""
    g, h = w.num_groups, w.group_size // 2
    p_ngh = w.q_nk2.reshape(w.n, g, h)
    z_ng1 = w.plain_zeros.T.astype(jnp.float32)[:, :, None]
    s_ng1 = w.plain_scales.T.astype(jnp.float32)[:, :, None]
    lo = ((p_ngh & 0xF).astype(jnp.float32) - z_ng1) * s_ng1
    hi = ((p_ngh >> 4).astype(jnp.float32) - z_ng1) * s_ng1
    return lo.astype(dtype), hi.astype(dtype)


def _dequantize_s4(w: Int4Weight, dtype: jnp.dtype) -> jax.Array:
    """``W^T`` as ``dtype [N, K]`` from the ``s4`` (``q - 8`` stored) or ``u4_wgmma`` format."""
    if w.fmt == "s4":
        q, offset = w.q_packed, 8.0
    else:
        q, offset = w.codes_nk(), 0.0
    q_ngG = q.astype(jnp.float32).reshape(w.n, w.num_groups, w.group_size)
    zc = (w.plain_zeros.T.astype(jnp.float32) - offset)[:, :, None]
    s = w.plain_scales.T.astype(jnp.float32)[:, :, None]
    return ((q_ngG - zc) * s).astype(dtype).reshape(w.n, w.k)


def _to_stored_order(x: jax.Array) -> jax.Array:
    """Permutes the K columns of x like the ``u4_wgmma`` layout permutes the weight's.

    Within each 128 chunk a true column ``32v + 8p + 2j + e`` is stored at ``32j + 8v +
    4e + p`` (layout.wgmma_order): a reshape and a transpose, no gather.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x6 = x.reshape(*lead, k // WGMMA_CHUNK, 4, 4, 4, 2)  # chunk, v, p, j, e
    nd = len(lead) + 1
    perm = (*range(nd), nd + 2, nd, nd + 3, nd + 1)  # chunk, j, v, e, p
    return x6.transpose(perm).reshape(*lead, k)


def _dequantize_stored_wgmma(w: Int4Weight, dtype: jnp.dtype) -> jax.Array:
    """``u4_wgmma`` weight as ``dtype [N, K]`` in its stored column order.

    A group is a whole number of 128-wide chunks, so a stored column keeps its group.
    """
    q = stored_codes_wgmma(w.words_nk8).astype(jnp.float32)
    q = q.reshape(w.n, w.num_groups, w.group_size)
    z = w.plain_zeros.T.astype(jnp.float32)[:, :, None]
    s = w.plain_scales.T.astype(jnp.float32)[:, :, None]
    return ((q - z) * s).astype(dtype).reshape(w.n, w.k)


def _unfused[T](w: T) -> T:
    """The dequantized weight (an array or a tuple of them) as arrays of its own on GPUs.

    XLA:GPU (jax 0.11.2) computed wrong products on the H200 when the dot consumed the
    integer -> float converts in the same fusion scope (most likely folded into its
    Triton GEMM fusion): rel_err 0.50 for ``s4`` codes with x of shape ``[2, 3, K]``, and
    for codes widened to int8 at 3 tokens or more (docs/benchmarks/gpu-checks/, run 82). An
    optimization barrier keeps the dequantization one elementwise fusion that writes the
    weight in x.dtype, which is what XLA already did for the cases it got right; CPUs and
    TPUs keep the fusion.
    """
    if jax.default_backend() == "gpu":
        return jax.lax.optimization_barrier(w)
    return w


def _dot_nk(x: jax.Array, w_nk: jax.Array, spec: str = "...k,nk->...n") -> jax.Array:
    """``x . w_nk^T`` in x.dtype with f32 accumulation (``w_nk`` through `_unfused`).

    On GPUs the dot writes x.dtype directly (cuBLAS accumulates bf16/f16 GEMMs in f32),
    so no f32 ``[M, N]`` intermediate and convert pass; XLA:CPU has no bf16 x bf16 -> f32
    dot for every operand layout, so there the operands are upcast (exactly) to f32.
    """
    w_nk = _unfused(w_nk)
    if jax.default_backend() == "cpu" or x.dtype == jnp.float32:
        xf, wf = x.astype(jnp.float32), w_nk.astype(jnp.float32)
        y = jnp.einsum(
            spec, xf, wf, preferred_element_type=jnp.float32, precision=_precision(x.dtype)
        )
        return y.astype(x.dtype)
    return jnp.einsum(spec, x, w_nk)


def _precision(dtype) -> jax.lax.Precision | None:
    """f32 activations get an f32 dot: a GPU's default for f32 is TF32, ~3e-4 relative
    error (seen on the H200, run 80), where a caller who passes f32 asks for f32."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def dequantize(w: Int4Weight, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Returns ``W^T`` as ``dtype [N, K]``: ``(q - z) * s`` computed in f32, rounded once."""
    if w.fmt != "u4_split":
        return _dequantize_s4(w, dtype)
    lo, hi = _dequantize_planes(w, dtype)
    return jnp.stack([lo, hi], axis=2).reshape(w.n, w.k)


def int4_matmul_reference(x: jax.Array, w: Int4Weight) -> jax.Array:
    """``x[..., K] @ W[K, N]`` with W rounded to ``x.dtype`` and f32 accumulation.

    Each format is dequantized in the order its bytes are stored, so the dequantization
    is a plain elementwise pass that XLA runs at memory speed: ``u4_split`` as two dots,
    one per nibble plane, against the matching halves of each group of x; ``u4_wgmma``
    against x with its columns permuted like the weight's; ``s4`` directly.
    """
    if x.shape[-1] != w.k:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={w.k}")
    if w.fmt == "u4_wgmma":
        # Dequantize in the STORED column order (the bytes as they are: one elementwise
        # fusion) and permute the activations' columns the same way instead.
        return _dot_nk(_to_stored_order(x), _dequantize_stored_wgmma(w, x.dtype))
    if w.fmt == "s4":
        return _dot_nk(x, _dequantize_s4(w, x.dtype))
    lo, hi = _unfused(_dequantize_planes(w, x.dtype))
    x_g2h = x.reshape(*x.shape[:-1], w.num_groups, 2, w.group_size // 2)
    dot = functools.partial(
        jnp.einsum, preferred_element_type=jnp.float32, precision=_precision(x.dtype)
    )
    y = dot("...gh,ngh->...n", x_g2h[..., 0, :], lo) + dot("...gh,ngh->...n", x_g2h[..., 1, :], hi)
    return y.astype(x.dtype)


def swiglu_interleaved(y: jax.Array) -> jax.Array:
    """``silu(gate) * up`` of a product whose columns are gate/up blocks
    (`layout.interleave_gate_up`): ``[..., 2F] -> [..., F]``, in f32, rounded to y.dtype."""
    blocks = y.astype(jnp.float32).reshape(*y.shape[:-1], -1, 2, SWIGLU_BLOCK)
    h = jax.nn.silu(blocks[..., 0, :]) * blocks[..., 1, :]
    return h.reshape(*y.shape[:-1], y.shape[-1] // 2).astype(y.dtype)
