"""RMSNorm and residual-add + RMSNorm: a jnp reference and one Pallas-Triton kernel.

    s, y = add_rms_norm(x, delta, weight, eps)   # s = x + delta, y = rms_norm(s) * weight
    s, y = add_rms_norm(x, partials, weight, eps)  # delta = sum_partials(partials, x.dtype)
    y = rms_norm(x, weight, eps)

Why a kernel: at batch-1 decode XLA runs each residual add and the RMSNorm it feeds as
three small kernels (the add, a reduce fusion, a multiply fusion), ~1.3-2.6 us each
whatever their size (docs/benchmarks/decode-profile-h100.md); a decoder layer has two
such places. Here one program per row loads x and delta once, writes the sum and the
normalized row: one launch.

Numerics are the model's (and transformers'): the sum is rounded to x's dtype (as
``x + delta`` is), the norm runs in float32 on that rounded sum, the normalized row is
cast back to x's dtype before the weight multiply, and the product is rounded once to
``result_type(weight, x)``. Only the order of the f32 sum of squares differs from XLA's,
so results agree to the last bit of the output dtype, occasionally one unit off.

``delta`` may also be a stack ``[S, *x.shape]`` of partial sums: the split-K partials
of the matmul that makes it (o_proj, down_proj), which at batch-1 decode would otherwise
cost an XLA kernel of their own to sum (~1.3 us per matmul). The kernel loads the S rows
and sums them itself, as `sum_partials` does: in float32, s = 0..S-1 in order, rounded
to x's dtype (what the matmul would have returned); the add and the norm follow as above.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import api

__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "rms_norm",
    "rms_norm_reference",
    "sum_partials",
]

# A row is one block of registers: 16384 f32 values over 32 warps is 16 per thread.
MAX_WIDTH = 16384


def sum_partials(parts: jax.Array | Sequence[jax.Array], dtype) -> jax.Array:
    """``parts[0] + ... + parts[S - 1]`` in float32, in that order, rounded to ``dtype``:
    what a split-K matmul returns from its S partial sums. ``parts``: a ``[S, ...]`` array
    or a sequence of arrays (rows a kernel loaded)."""
    total = parts[0].astype(jnp.float32)
    for i in range(1, len(parts)):
        total = total + parts[i].astype(jnp.float32)
    return total.astype(dtype)


def rms_norm_reference(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """The spec: float32 statistics, cast back to x.dtype before the weight multiply."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def add_rms_norm_reference(
    x: jax.Array, delta: jax.Array, weight: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array]:
    """``(x + delta, rms_norm_reference(x + delta))``; a ``delta`` stack ``[S, *x.shape]``
    is first summed by `sum_partials` to x's dtype."""
    if delta.shape != x.shape:
        delta = sum_partials(delta, x.dtype)
    s = x + delta
    return s, rms_norm_reference(s, weight, eps)


def _num_warps(block: int) -> int:
    """Four elements of a row per thread (one 16-byte load of each f32 partial), up to
    32 warps. A row is one CTA's: at batch-1 decode the kernel is latency-bound and one
    SM's loads in flight set its time, so more warps pay (8B-shaped model, 4096 wide, an
    H100, runs 68 and 104: 4 / 8 / 16 / 32 warps 413 / 419.5 / 421 / 425 tok/s)."""
    return min(max(block // 128, 1), 32)


def _norm_kernel(*refs, width: int, block: int, eps: float, has_delta: bool):
    """One row: [delta add,] f32 mean of squares, rsqrt, cast, weight multiply. ``d_ref``
    is ``[S * rows, width]``: the row's S partials (at ``i * rows + row``) are summed
    (`sum_partials`) before the add."""
    if has_delta:
        x_ref, d_ref, w_ref, s_ref, y_ref = refs
    else:
        x_ref, w_ref, y_ref = refs
    row = pl.program_id(0)
    cols = pl.ds(0, block)
    ok = jnp.arange(block) < width
    x = pltriton.load(x_ref.at[row, cols], mask=ok, other=0)
    if has_delta:
        rows = x_ref.shape[0]
        parts = [
            pltriton.load(d_ref.at[i * rows + row, cols], mask=ok, other=0)
            for i in range(d_ref.shape[0] // rows)
        ]
        d = sum_partials(parts, x_ref.dtype)
        x = (x.astype(jnp.float32) + d.astype(jnp.float32)).astype(x_ref.dtype)
        pltriton.store(s_ref.at[row, cols], x, mask=ok)
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.sum(x32 * x32) / width + eps)
    y = (x32 * inv).astype(x_ref.dtype).astype(jnp.float32)
    w = pltriton.load(w_ref.at[cols], mask=ok, other=0).astype(jnp.float32)
    pltriton.store(y_ref.at[row, cols], (w * y).astype(y_ref.dtype), mask=ok)


def _check_supported(x: jax.Array, delta: jax.Array | None) -> None:
    problems = []
    if x.size == 0:
        problems.append("x is empty")
    if x.shape[-1] > MAX_WIDTH:
        problems.append(f"rows of {x.shape[-1]} > {MAX_WIDTH} elements")
    if delta is not None and delta.shape == x.shape and delta.dtype != x.dtype:
        problems.append(f"delta is {delta.dtype}, x is {x.dtype} (the sum would promote)")
    if problems:
        raise NotImplementedError("; ".join(problems))


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def _norm_triton(
    x: jax.Array,
    delta: jax.Array | None,
    weight: jax.Array,
    eps: float,
    *,
    num_warps: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array] | jax.Array:
    _check_supported(x, delta)
    width = x.shape[-1]
    rows = x.size // width if width else 0
    block = pl.next_power_of_2(width)
    kernel = functools.partial(
        _norm_kernel, width=width, block=block, eps=eps, has_delta=delta is not None
    )
    y_shape = jax.ShapeDtypeStruct((rows, width), jnp.result_type(weight.dtype, x.dtype))
    operands = [x.reshape(rows, width)]
    out_shape = [y_shape]
    if delta is not None:
        operands.append(delta.reshape(-1, width))  # [S * rows, width]; S = 1 if unstacked
        out_shape = [jax.ShapeDtypeStruct((rows, width), x.dtype), y_shape]
    whole = pl.BlockSpec(memory_space=pl.ANY)
    outs = pl.pallas_call(
        kernel,
        grid=(rows,),
        in_specs=[whole] * (len(operands) + 1),
        out_specs=[whole] * len(out_shape),
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(
            num_warps=num_warps or _num_warps(block), num_stages=1
        ),
        interpret=interpret,
        name="add_rms_norm" if delta is not None else "rms_norm",
    )(*operands, weight)
    outs = [o.reshape(x.shape) for o in outs]
    return tuple(outs) if delta is not None else outs[0]


def _check_shapes(x: jax.Array, weight: jax.Array, delta: jax.Array | None = None) -> None:
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight has shape {weight.shape}, x rows have {x.shape[-1:]}")
    if delta is None or delta.shape == x.shape:
        return
    if delta.shape[1:] != x.shape or not delta.shape[0]:
        raise ValueError(
            f"delta has shape {delta.shape}; it must be x's {x.shape} or a stack of "
            f"S >= 1 partial sums [S, *{x.shape}]"
        )


def rms_norm(
    x: jax.Array,
    weight: jax.Array,
    eps: float,
    *,
    implementation: str | None = None,
    num_warps: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """RMSNorm of the last axis of ``x [..., D]`` times ``weight [D]`` (see the module doc).

    ``implementation``: None (the Triton kernel on NVIDIA GPUs, the reference elsewhere),
    "xla" (the reference) or "triton" (raises ``NotImplementedError`` for rows wider than
    ``MAX_WIDTH``); ``interpret`` runs the kernel in the Pallas interpreter (CPU tests).
    """
    _check_shapes(x, weight)

    triton = functools.partial(_norm_triton, num_warps=num_warps, interpret=interpret)
    return api.dispatch(
        implementation,
        {
            "xla": lambda: rms_norm_reference(x, weight, eps),
            "triton": lambda: triton(x, None, weight, eps),
        },
    )


def add_rms_norm(
    x: jax.Array,
    delta: jax.Array,
    weight: jax.Array,
    eps: float,
    *,
    implementation: str | None = None,
    num_warps: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(x + delta, rms_norm(x + delta) * weight)`` in one kernel: the residual add of a
    decoder layer and the RMSNorm that it feeds. Arguments as for :func:`rms_norm`.

    ``delta``: x's shape, or ``[S, *x.shape]`` of any float dtype: the split-K partial
    sums of the matmul that makes delta, summed here as by :func:`sum_partials` (float32,
    in order, rounded to x's dtype), so that the matmul needs no kernel to sum them. The
    kernel takes an unstacked delta of x's dtype only (None falls back to the reference,
    which promotes, otherwise).
    """
    _check_shapes(x, weight, delta)

    triton = functools.partial(_norm_triton, num_warps=num_warps, interpret=interpret)
    return api.dispatch(
        implementation,
        {
            "xla": lambda: add_rms_norm_reference(x, delta, weight, eps),
            "triton": lambda: triton(x, delta, weight, eps),
        },
    )
