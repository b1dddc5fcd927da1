"""The specification: dequantize the int4 weight, then one dense dot (plain jnp).

This is also the CPU/TPU path, so it is written to stay cheap under jit on CPU: the
dequantization is one fused elementwise pass over ``[N, K]`` and the dot contracts K of
both operands (no explicit transpose is materialised).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.layout import WGMMA_CHUNK, Int4Weight, wgmma_order


def _dequantize_planes(w: Int4Weight, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """The two nibble planes dequantized: ``[N, groups, G/2]`` each (first/second halves)."""
    g, h = w.num_groups, w.group_size // 2
    p_ngh = w.q_nk2.reshape(w.n, g, h)
    z_ng1 = w.zeros_gn.T.astype(jnp.float32)[:, :, None]
    s_ng1 = w.scales_gn.T.astype(jnp.float32)[:, :, None]
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
    zc = (w.zeros_gn.T.astype(jnp.float32) - offset)[:, :, None]
    s = w.scales_gn.T.astype(jnp.float32)[:, :, None]
    return ((q_ngG - zc) * s).astype(dtype).reshape(w.n, w.k)


def _stored_columns(k: int) -> np.ndarray:
    """True K column of each stored u4_wgmma column (the permutation within 128 chunks)."""
    cols, _ = wgmma_order()
    return (np.arange(0, k, WGMMA_CHUNK)[:, None] + np.asarray(cols)[None, :]).reshape(k)


def _dequantize_stored_wgmma(w: Int4Weight, dtype: jnp.dtype) -> jax.Array:
    """``u4_wgmma`` weight as ``dtype [N, K]`` in its stored column order.

    A group is a whole number of 128-wide chunks, so a stored column keeps its group.
    """
    nib = jnp.stack([(w.q_packed >> (4 * t)) & 0xF for t in range(8)], axis=-1)
    q = nib.astype(jnp.float32).reshape(w.n, w.num_groups, w.group_size)
    z = w.zeros_gn.T.astype(jnp.float32)[:, :, None]
    s = w.scales_gn.T.astype(jnp.float32)[:, :, None]
    return ((q - z) * s).astype(dtype).reshape(w.n, w.k)


def dequantize(w: Int4Weight, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Returns ``W^T`` as ``dtype [N, K]``: ``(q - z) * s`` computed in f32, rounded once."""
    if w.fmt != "u4_split":
        return _dequantize_s4(w, dtype)
    lo, hi = _dequantize_planes(w, dtype)
    return jnp.stack([lo, hi], axis=2).reshape(w.n, w.k)


def int4_matmul_reference(x: jax.Array, w: Int4Weight) -> jax.Array:
    """``x[..., K] @ W[K, N]`` with W rounded to ``x.dtype`` and f32 accumulation.

    Written as two dots, one per nibble plane, against the matching halves of each
    group of x: the dequantization then stays a plain elementwise pass (no interleave),
    which XLA runs at memory speed and fuses into its GEMM where it can.
    """
    if x.shape[-1] != w.k:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={w.k}")
    if w.fmt == "u4_wgmma":
        # Dequantize in the STORED column order (shift + mask of each word: one elementwise
        # fusion, no gather of the weight) and permute the activations instead.
        w_nk = _dequantize_stored_wgmma(w, x.dtype)
        xs = jnp.take(x, jnp.asarray(_stored_columns(w.k)), axis=-1)
        if jax.default_backend() == "cpu":  # XLA:CPU has no bf16 x bf16 -> f32 dot thunk
            xs, w_nk = xs.astype(jnp.float32), w_nk.astype(jnp.float32)  # exact upcast
        y = jnp.einsum("...k,nk->...n", xs, w_nk, preferred_element_type=jnp.float32)
        return y.astype(x.dtype)
    if w.fmt != "u4_split":
        w_nk = _dequantize_s4(w, x.dtype)
        y = jnp.einsum("...k,nk->...n", x, w_nk, preferred_element_type=jnp.float32)
        return y.astype(x.dtype)
    lo, hi = _dequantize_planes(w, x.dtype)
    x_g2h = x.reshape(*x.shape[:-1], w.num_groups, 2, w.group_size // 2)
    y = jnp.einsum("...gh,ngh->...n", x_g2h[..., 0, :], lo, preferred_element_type=jnp.float32)
    y += jnp.einsum("...gh,ngh->...n", x_g2h[..., 1, :], hi, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
