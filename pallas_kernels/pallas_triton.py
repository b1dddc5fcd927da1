"""Pallas-Triton backend: split-K grouped int4 dequantize-matmul for any CUDA GPU.

Per group ``g`` a program loads the packed weight tile ``p[bn, G/2]`` (uint8, 16-byte
vectors), splits it into its two nibble planes (``p & 0xF`` = first half of the group,
``p >> 4`` = second half, see layout.py) and runs one ``tl.dot`` per plane against the
matching half of the token tile ``x[bm, G/2]`` (tokens padded to ``bm >= 16`` by masked
loads). Two ways to dequantize:

* ``scale_after_dot=True``: the codes become ``magic + q`` with one integer OR
  (``0x4300 | q`` is the bf16 number ``128 + q``; ``0x6400 | q`` the f16 ``1024 + q``),
  the dot runs on those exact integers, and the group's scale and zero are applied once
  per output: ``acc += s * (d - (magic + z) * sum_k x)``. ~1 integer op per weight
  element instead of a convert, a subtract and a multiply.
* ``scale_after_dot=False``: ``w = (q - z) * s`` per element in f32, rounded to x.dtype.
* ``asm_dequant=True``: inline PTX turns 4 packed bytes (8 codes) into the EXACT small
  integers ``q - z`` as four bf16x2 / f16x2 words (4 PRMT, 1 SHR, 4 LOP3 ``magic | q``,
  4 packed FMAs ``(magic + q) - (magic + z)``: ~1.4 instructions per code instead of a
  per-element unpack, zero-extend, OR and repack), one dot per nibble plane, and the
  group's scale once per output: ``acc += s * d``. No ``sum_k x`` term is needed.

``swap=True`` computes ``acc^T[bn, bm] = w[bn, G/2] @ x^T``: the weight is the MMA's
A operand (M = bn >= 64, so Hopper can use wgmma with A in registers) and tokens are
its N dimension, as Machete does.

Split-K: the grid is ``(N / bn, split_k, M / bm)``; each program loops over
``K / split_k`` rows (``num_stages`` software pipelining keeps several tiles in flight)
and writes an f32 partial that XLA sums and casts in one small fusion, so a 4096-wide
layer at batch 1 still launches hundreds of programs for 132 SMs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.layout import Int4Weight


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes and launch parameters of the Triton kernel.

    block_m: tokens per program (a power of 2 >= 16: Triton dots need dims >= 16).
    block_n: output columns per program (a power of 2 dividing N).
    split_k: programs along K; each reduces ``K // split_k`` rows.
    groups_per_step: groups handled per loop iteration (unrolled).
    fma: no tensor-core dot: multiply-add on the CUDA cores (GEMV style), one token
      per program (``block_m=1``), where a 16-row dot would be 15/16 padding.
    """

    block_m: int = 16
    block_n: int = 128
    split_k: int = 1
    groups_per_step: int = 1
    num_warps: int = 4
    num_stages: int = 3
    scale_after_dot: bool = True
    swap: bool = False
    fma: bool = False
    asm_dequant: bool = False


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def check_supported(w: Int4Weight, cfg: Config) -> None:
    """Raises NotImplementedError for shapes/configs this kernel cannot run."""
    problems = []
    step = w.group_size * cfg.groups_per_step
    if w.fmt != "u4_split":
        problems.append(f"the weight must be in the 'u4_split' format, not {w.fmt!r}")
    if cfg.asm_dequant and cfg.fma:
        problems.append("asm_dequant feeds a tensor-core dot: fma must be False")
    if cfg.fma and cfg.block_m != 1:
        problems.append("fma runs one token per program: block_m must be 1")
    if not cfg.fma and not (_is_pow2(cfg.block_m) and cfg.block_m >= 16):
        problems.append(f"block_m={cfg.block_m} must be a power of 2 >= 16")
    if not (_is_pow2(cfg.block_n) and cfg.block_n >= 16 and w.n % cfg.block_n == 0):
        problems.append(f"block_n={cfg.block_n} must be a power of 2 >= 16 dividing N={w.n}")
    if not (_is_pow2(w.group_size) and w.group_size >= 32):
        problems.append(f"group_size={w.group_size} must be a power of 2 >= 32")
    if w.tile_n and cfg.block_n != w.tile_n:
        problems.append(f"block_n={cfg.block_n} must equal the weight's tile_n={w.tile_n}")
    if w.k % (cfg.split_k * step):
        problems.append(f"K={w.k} must split into {cfg.split_k} x steps of {step} rows")
    if problems:
        raise NotImplementedError("; ".join(problems))


def _magic(dtype: jnp.dtype) -> tuple[int, float]:
    """(bit pattern, value) of the float whose low mantissa bits take a 4-bit code."""
    if dtype == jnp.bfloat16:
        return 0x4300, 128.0
    if dtype == jnp.float16:
        return 0x6400, 1024.0
    raise NotImplementedError(f"activations must be bf16 or f16, got {dtype}")


# One instance per 4 packed bytes (pack=4) and nibble plane: $2 = bytes e0..e3, $3/$4 =
# -(magic + z) of elements (e0, e1) / (e2, e3) as 16-bit pairs; outputs $0/$1 = q - z of
# (e0, e1) / (e2, e3). The high plane first shifts the word right by 4. PRMT 0x4140
# spreads bytes 0, 1 into the low bytes of the two 16-bit halves (0x4342: bytes 2, 3),
# LOP3 0xEA = (a & b) | c makes each half ``magic | q`` = the float magic + q, and the
# packed FMA subtracts magic + z exactly (all values are small integers). Element order
# is kept, so the op is elementwise whatever layout Triton gives the tensors. (Two
# single-output calls: jax's lowering of a multi-output inline asm returns one value.)
_DEQUANT_ASM = """{{
.reg .b32 r0, r1, src, zero, one;
mov.b32 zero, 0;
mov.b32 one, {one};
{shift}
prmt.b32 r0, src, zero, 0x4140;
prmt.b32 r1, src, zero, 0x4342;
lop3.b32 r0, r0, 0x000F000F, {magic2}, 0xEA;
lop3.b32 r1, r1, 0x000F000F, {magic2}, 0xEA;
fma.rn.{ty}x2 $0, r0, one, $3;
fma.rn.{ty}x2 $1, r1, one, $4;
}}"""


def _dequant_qz(p, zm, dtype, interpret: bool):
    """uint8 codes p[bn, h] and zm = magic + z [bn] -> exact (q_lo - z, q_hi - z) in dtype."""
    if interpret:  # the interpreter cannot run PTX: the same exact values in jnp
        zf = zm[:, None] - _magic(dtype)[1]
        return (
            ((p & 0xF).astype(jnp.float32) - zf).astype(dtype),
            ((p >> 4).astype(jnp.float32) - zf).astype(dtype),
        )
    bits, _ = _magic(dtype)
    one, ty = (0x3F803F80, "bf16") if dtype == jnp.bfloat16 else (0x3C003C00, "f16")
    nz = jnp.broadcast_to((-zm).astype(dtype)[:, None], p.shape)
    out = jax.ShapeDtypeStruct(p.shape, dtype)
    planes = []
    for shift in ("mov.b32 src, $2;", "shr.b32 src, $2, 4;"):
        asm = _DEQUANT_ASM.format(one=hex(one), magic2=hex(bits << 16 | bits), ty=ty, shift=shift)
        [w] = pltriton.elementwise_inline_asm(
            asm, args=[p, nz], constraints="=r,=r,r,r,r", pack=4, result_shape_dtypes=[out]
        )
        planes.append(w)
    return planes[0], planes[1]


def _kernel(
    x_ref,
    q_ref,
    s_ref,
    z_ref,
    o_ref,
    *,
    m: int,
    group_size: int,
    steps: int,
    tiled: bool,
    cfg: Config,
    interpret: bool = False,
):
    """One program: tokens [bm] x columns [bn] x K rows of split ``program_id(1)``."""
    pid_n, pid_s, pid_m = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bm, bn, gps = cfg.block_m, cfg.block_n, cfg.groups_per_step
    h = group_size // 2
    dtype = x_ref.dtype
    bits, magic = _magic(dtype)
    row_ok = (pid_m * bm + jnp.arange(bm, dtype=jnp.int32)) < m
    m_slc = pl.ds(pl.multiple_of(pid_m * bm, bm), bm)
    n0 = pl.multiple_of(pid_n * bn, bn)
    n_slc = pl.ds(n0, bn)
    g_base = pid_s * steps * gps

    def dot(a, b):  # a[r, c] . b[s, c] -> [r, s], f32
        return jax.lax.dot_general(
            a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )

    def body(i, acc):
        for j in range(gps):
            g = g_base + i * gps + j
            k0 = pl.multiple_of(g * group_size, group_size)
            xa = pltriton.load(x_ref.at[m_slc, pl.ds(k0, h)], mask=row_ok[:, None], other=0)
            xb = pltriton.load(x_ref.at[m_slc, pl.ds(k0 + h, h)], mask=row_ok[:, None], other=0)
            # uint8 [bn, h]: one contiguous 4 KB block when tiled (see layout.py).
            p = q_ref[pid_n, g] if tiled else q_ref[n_slc, pl.ds(pl.multiple_of(g * h, h), h)]
            s = s_ref[g, n_slc].astype(jnp.float32)  # [bn]
            z = z_ref[g, n_slc].astype(jnp.float32)  # [bn]
            if cfg.fma:
                # 0x3F800000 | q << 19 is the f32 number 1 + q/16 exactly (one shift and
                # one LOP3 per code, no int -> float convert); one FMA turns it into
                # (q - z) * s = (1 + q/16) * 16s - (16 + z) s, a second one accumulates.
                one = jnp.uint32(0x3F800000)
                wa = jax.lax.bitcast_convert_type(
                    ((p & 0xF).astype(jnp.uint32) << 19) | one, jnp.float32
                )
                wb = jax.lax.bitcast_convert_type(
                    ((p >> 4).astype(jnp.uint32) << 19) | one, jnp.float32
                )
                s16 = (16.0 * s)[:, None]
                bias = (-(16.0 + z) * s)[:, None]
                acc += (wa * s16 + bias) * xa.astype(jnp.float32) + (wb * s16 + bias) * xb.astype(
                    jnp.float32
                )  # [bn, h]; xa, xb are [1, h]
            elif cfg.asm_dequant:
                wa, wb = _dequant_qz(p, z + magic, dtype, interpret)
                if cfg.swap:
                    acc += s[:, None] * (dot(wa, xa) + dot(wb, xb))  # [bn, bm]
                else:
                    acc += s[None, :] * (dot(xa, wa) + dot(xb, wb))  # [bm, bn]
            elif cfg.scale_after_dot:
                wa = jax.lax.bitcast_convert_type((p & 0xF).astype(jnp.uint16) | bits, dtype)
                wb = jax.lax.bitcast_convert_type((p >> 4).astype(jnp.uint16) | bits, dtype)
                x_sum = jnp.sum(xa.astype(jnp.float32), axis=1) + jnp.sum(
                    xb.astype(jnp.float32), axis=1
                )  # [bm]
                zm = z + magic
                if cfg.swap:
                    d = dot(wa, xa) + dot(wb, xb)  # [bn, bm]
                    acc += s[:, None] * (d - zm[:, None] * x_sum[None, :])
                else:
                    d = dot(xa, wa) + dot(xb, wb)  # [bm, bn]
                    acc += s[None, :] * (d - x_sum[:, None] * zm[None, :])
            else:
                wa = (((p & 0xF).astype(jnp.float32) - z[:, None]) * s[:, None]).astype(dtype)
                wb = (((p >> 4).astype(jnp.float32) - z[:, None]) * s[:, None]).astype(dtype)
                if cfg.swap:
                    acc += dot(wa, xa) + dot(wb, xb)
                else:
                    acc += dot(xa, wa) + dot(xb, wb)
        return acc

    if cfg.fma:
        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bn, h), jnp.float32))
        acc = jnp.sum(acc, axis=1)[None, :]  # [1, bn]
    else:
        acc_shape = (bn, bm) if cfg.swap else (bm, bn)
        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(acc_shape, jnp.float32))
        if cfg.swap:
            acc = acc.T
    out = acc.astype(o_ref.dtype)
    if cfg.split_k == 1:
        pltriton.store(o_ref.at[m_slc, n_slc], out, mask=row_ok[:, None])
    else:
        pltriton.store(o_ref.at[pid_s, m_slc, n_slc], out, mask=row_ok[:, None])


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def int4_matmul_triton(
    x_mk: jax.Array, w: Int4Weight, *, config: Config | None = None, interpret: bool = False
) -> jax.Array:
    """``x[M, K] @ W`` through the Pallas-Triton kernel; returns ``[M, N]`` in x.dtype."""
    cfg = config or Config()
    m, k = x_mk.shape
    if k != w.k:
        raise ValueError(f"x has K={k}, weight has K={w.k}")
    _magic(x_mk.dtype)
    check_supported(w, cfg)
    steps = w.k // (cfg.split_k * w.group_size * cfg.groups_per_step)
    grid = (w.n // cfg.block_n, cfg.split_k, pl.cdiv(m, cfg.block_m))
    if cfg.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((m, w.n), x_mk.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((cfg.split_k, m, w.n), jnp.float32)
    kernel = functools.partial(
        _kernel,
        m=m,
        group_size=w.group_size,
        steps=steps,
        tiled=bool(w.tile_n),
        cfg=cfg,
        interpret=interpret,
    )
    whole = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[whole, whole, whole, whole],
        out_specs=whole,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="int4_matmul_triton",
    )(x_mk, w.q_packed, w.scales_gn, w.zeros_gn)
    if cfg.split_k > 1:
        out = out.sum(axis=0).astype(x_mk.dtype)
    return out
