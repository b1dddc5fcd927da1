"""Mosaic GPU backend for many tokens (Hopper): a warp-specialized int4 GEMM.

The decode kernel (``pallas_mosaic_gpu``) has one warpgroup per CTA and a per-group
scale pass over its accumulator: right for 1-128 tokens, where the weight bytes are
the cost. With hundreds of tokens the tensor cores are the cost, and the weight must
be dequantized for free next to a GEMM that runs at cuBLAS rates. This kernel is built
for that (the structure of JAX's ``hopper_mixed_type_matmul_mgpu`` example, with int4
codes, group scales and the ``[M, N]`` output):

* Three warpgroups per CTA (``emit_pipeline_warp_specialized``): one issues the TMA
  copies of the pipeline (weight tile, x tile, the group's scales and zero points);
  two consumers each own ``block_n`` weight rows of the CTA's ``2 * block_n`` and all
  ``block_m`` tokens, so one consumer's dequantization overlaps the other's wgmma.
* Still ``out^T = W^T x^T``: the dequantized weight ``(q - z) * s`` (x.dtype, one
  rounding like the reference's dequantize-then-dot, but of a product with the scale
  rounded to x.dtype) is wgmma's register A operand, the x tile its shared-memory B
  operand (transposed view), one f32 accumulator ``[block_n, block_m]`` per consumer
  over the whole K range.
* The epilogue transposes through shared memory (``stmatrix.trans`` into a
  ``[64, block_n]`` piece at a time) and TMA stores write the ``[M, N]`` output in
  x.dtype; TMA skips the rows past M and zero-fills x's.
* Split-K (``split_k > 1``) where the output tiles alone leave SMs idle (N = 4096 at a
  few hundred tokens: 32 weight tiles): each CTA reduces a K slice into an f32 partial
  ``[N, M]`` and one XLA fusion adds them.
* CTAs in groups of ``group_m`` token tiles per weight tile (``_tile_of``), so that a
  wave of CTAs shares a few weight and token slices in L2; ``persistent=True`` runs one
  CTA per SM over all tiles (``plgpu.nd_loop``) with the pipeline buffers allocated once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.layout import WGMMA_CHUNK, Int4Weight
from pallas_kernels.pallas_mosaic_gpu import (
    dequant_group,
    group_ref,
    load_words,
    swizzle_for,
    sz_block,
    tiled,
    tiled_problems,
    w_block,
)

# Consumer warpgroups per CTA and the registers left to the TMA warpgroup.
_CONSUMERS = 2
_MEMORY_REGISTERS = 40
# H100: 227 KB of shared memory per CTA; leave room for barriers.
SMEM_BUDGET = 220 * 1024
# Streaming multiprocessors of an H100 / H200: the persistent grid's size where the
# device does not say (lowering on a CPU host).
_DEFAULT_SMS = 132
# Tokens per epilogue store (the output tile goes out in [_EPI_M, block_n] pieces).
_EPI_M = 64


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiles of the warp-specialized kernel.

    block_n: weight rows (output columns) per consumer warpgroup, a multiple of 64; a CTA
      covers ``2 * block_n``.
    block_m: tokens per CTA (wgmma N), a multiple of 8, at most 256.
    block_k: K rows per pipeline step, a multiple of the group size (and of 128 for
      ``u4_wgmma``).
    max_concurrent_steps: pipeline depth, cut to the shared-memory budget.
    group_m: CTA order: consecutive CTAs take ``group_m`` token tiles for each weight
      tile before moving along N (1: along N first), so that a wave of CTAs shares a
      few weight and token slices in L2.
    split_k: CTAs along K per output tile, for layers with too few tiles to fill the
      GPU (N = 4096 at a few hundred tokens); each writes an f32 partial ``[N, M]`` and
      XLA adds them.
    persistent: one CTA per SM looping over the tiles (``plgpu.nd_loop``) with the
      pipeline's buffers allocated once, instead of one CTA per tile.
    """

    block_n: int = 128
    block_m: int = 128
    block_k: int = 128
    max_concurrent_steps: int = 4
    group_m: int = 1
    split_k: int = 1
    persistent: bool = False


def _num_sms() -> int:
    return getattr(jax.devices()[0], "core_count", None) or _DEFAULT_SMS


def smem_bytes(cfg: Config, g: int, depth: int, dtype_bytes: int = 2) -> int:
    """Shared memory of one CTA: ``depth`` pipeline steps and the epilogue tiles."""
    rows = _CONSUMERS * cfg.block_n
    per_step = rows * cfg.block_k // 2 + cfg.block_m * cfg.block_k * dtype_bytes
    per_step += 2 * (cfg.block_k // g) * rows * 2
    out_bytes = 4 if cfg.split_k > 1 else dtype_bytes
    out = _CONSUMERS * min(cfg.block_m, _EPI_M) * cfg.block_n * out_bytes
    return depth * per_step + out


def pipeline_depth(cfg: Config, g: int, steps: int) -> int:
    """``max_concurrent_steps`` cut to :data:`SMEM_BUDGET` (and to the steps there are)."""
    depth = min(cfg.max_concurrent_steps, steps)
    while depth > 1 and smem_bytes(cfg, g, depth) > SMEM_BUDGET:
        depth -= 1
    return depth


def check_supported(m: int, w: Int4Weight, dtype: jnp.dtype, cfg: Config) -> None:
    """Raises NotImplementedError for inputs this kernel cannot run."""
    problems = []
    g = w.group_size
    if w.fmt not in ("s4", "u4_wgmma"):
        problems.append(f"the weight must be in the 's4' or 'u4_wgmma' format, not {w.fmt!r}")
    if w.fmt == "u4_wgmma" and cfg.block_k % WGMMA_CHUNK:
        problems.append(f"u4_wgmma needs block_k a multiple of {WGMMA_CHUNK}")
    problems += tiled_problems(w, _CONSUMERS * cfg.block_n, cfg.block_k)
    if dtype not in (jnp.bfloat16, jnp.float16):
        problems.append(f"activations must be bf16 or f16, got {dtype}")
    if g % 64 or cfg.block_k % g or w.k % (cfg.split_k * cfg.block_k):
        problems.append(
            f"group_size={g} must be a multiple of 64 dividing block_k={cfg.block_k}, and "
            f"K={w.k} must split into {cfg.split_k} x steps of block_k"
        )
    if cfg.block_n % 64 or w.n % (_CONSUMERS * cfg.block_n):
        problems.append(
            f"block_n={cfg.block_n} must be a multiple of 64 and {_CONSUMERS} x block_n "
            f"must divide N={w.n}"
        )
    if not (cfg.block_m % _EPI_M == 0 or (cfg.block_m < _EPI_M and cfg.block_m % 8 == 0)):
        problems.append(f"block_m={cfg.block_m} must be a multiple of {_EPI_M} or of 8 below it")
    if cfg.block_m > 256:
        problems.append(f"block_m={cfg.block_m} must be at most 256 (wgmma N)")
    if problems:
        raise NotImplementedError("; ".join(problems))


def _tile_of(t, n_tiles: int, m_tiles: int, group_m: int):
    """CTA ``t`` -> (weight tile, token tile): groups of ``group_m`` token tiles, the
    token tile fastest inside a group (the last group may be shorter)."""
    per_group = group_m * n_tiles
    first_m = (t // per_group) * group_m
    rows = jnp.minimum(m_tiles - first_m, group_m)
    return (t % per_group) // rows, first_m + (t % per_group) % rows


def _kernel(
    x_gmem, w_gmem, s_gmem, z_gmem, o_gmem, o_smem, *, g, steps, depth, n_tiles, m_tiles, cfg
):
    bn, bm, bk = cfg.block_n, cfg.block_m, cfg.block_k
    dtype = x_gmem.dtype
    row = plgpu.Layout.WGMMA.reduce(1)
    x_elems = 64  # x columns per wgmma: one 128-byte swizzle row

    def pipeline_for(t, body, compute):
        """The pipeline of output tile ``t`` (split-K slice outermost)."""
        ki = t // (n_tiles * m_tiles)
        ni, mi = _tile_of(t % (n_tiles * m_tiles), n_tiles, m_tiles, cfg.group_m)
        k0 = ki * steps
        w_shape, w_index, w_transforms = w_block(_CONSUMERS * bn, bk, w_gmem)
        sz_shape, sz_index = sz_block(_CONSUMERS * bn, bk, g, s_gmem)
        return (ki, ni, mi), plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(steps,),
            memory_registers=_MEMORY_REGISTERS,
            in_specs=[
                plgpu.BlockSpec(w_shape, lambda k: w_index(ni, k0 + k), transforms=w_transforms),
                plgpu.BlockSpec((bm, bk), lambda k: (mi, k0 + k), transforms=tiled(128, 16)),
                plgpu.BlockSpec(sz_shape, lambda k: sz_index(ni, k0 + k)),
                plgpu.BlockSpec(sz_shape, lambda k: sz_index(ni, k0 + k)),
            ],
            wg_axis="wg",
            num_compute_wgs=_CONSUMERS,
            max_concurrent_steps=depth,
            compute_context=compute,
        )

    def body(_, w_smem, x_smem, s_smem, z_smem, acc_ref):
        wg = lax.axis_index("wg")
        rows = pl.ds(wg * bn, bn)
        w_tile = load_words(w_smem, rows)
        for gi in range(bk // g):
            s = plgpu.load(group_ref(s_smem, gi).at[rows], layout=row).astype(dtype)
            wq = dequant_group(w_tile, group_ref(z_smem, gi).at[rows], gi, g, dtype)
            wq = wq * lax.broadcast_in_dim(s, wq.shape, [0])  # (q - z) * s in x.dtype
            for j in range(g // x_elems):
                cols = slice(j * x_elems, (j + 1) * x_elems)
                plgpu.wgmma(
                    acc_ref, wq[:, cols], x_smem.at[:, pl.ds(gi * g + j * x_elems, x_elems)].T
                )
        # The chain is done before the pipeline releases the slot and the next step
        # writes new operand registers. Letting it run on (wgmma_wait(1), slots released
        # a step late) gave wrong results on the H100 (run 31; cause not established).
        plgpu.wgmma_wait(0)
        return acc_ref

    def run_tile(t, allocations=None):
        def compute(eval_pipeline):
            wg = lax.axis_index("wg")

            def scope(acc_ref):
                eval_pipeline(acc_ref)
                acc = acc_ref[...]  # [bn, bm] f32, all chains done
                out = acc if cfg.split_k > 1 else acc.astype(dtype)
                cols = pl.ds((ni * _CONSUMERS + wg) * bn, bn)
                epi = min(bm, _EPI_M)
                for c in range(bm // epi):  # through shared memory, then TMA
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    tile = out[:, c * epi : (c + 1) * epi]
                    toks = pl.ds(mi * bm + c * epi, epi)
                    if cfg.split_k > 1:  # f32 partial, [N, M] as accumulated
                        o_smem.at[wg][...] = tile
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[ki, cols, toks])
                    else:  # x.dtype rows of [M, N]: transposed on the way (stmatrix.trans)
                        o_smem.at[wg].transpose((1, 0))[...] = tile
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[toks, cols])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            pl.run_scoped(scope, plgpu.ACC((bn, bm), jnp.float32))

        (ki, ni, mi), pipeline = pipeline_for(t, body, compute)
        if allocations is None:
            pipeline(w_gmem, x_gmem, s_gmem, z_gmem)
        else:
            pipeline(w_gmem, x_gmem, s_gmem, z_gmem, allocations=allocations)

    if not cfg.persistent:
        run_tile(lax.axis_index("t"))
        return
    ignore = lambda *_, **__: None  # noqa: E731 (the allocations depend on shapes only)
    _, shapes_only = pipeline_for(0, ignore, ignore)
    tiles = cfg.split_k * n_tiles * m_tiles

    @functools.partial(
        pl.run_scoped,
        allocations=shapes_only.get_allocations(w_gmem, x_gmem, s_gmem, z_gmem),
        collective_axes="wg",
    )
    def _scope(allocations):
        @plgpu.nd_loop((tiles,), collective_axes="t")
        def _loop(info):
            (t,) = info.index
            run_tile(t, allocations=allocations)


@functools.partial(jax.jit, static_argnames=("config",))
def int4_matmul_mosaic_ws(
    x_mk: jax.Array, w: Int4Weight, *, config: Config | None = None
) -> jax.Array:
    """``x[M, K] @ W`` through the warp-specialized kernel; returns ``[M, N]`` in x.dtype."""
    cfg = config or Config()
    m, k = x_mk.shape
    if k != w.k:
        raise ValueError(f"x has K={k}, weight has K={w.k}")
    check_supported(m, w, x_mk.dtype, cfg)
    g, bn, bm = w.group_size, cfg.block_n, cfg.block_m
    steps = k // (cfg.split_k * cfg.block_k)
    depth = pipeline_depth(cfg, g, steps)
    m_tiles, n_tiles = -(-m // bm), w.n // (_CONSUMERS * bn)
    # TMA zero-fills the x rows past M; below 8 rows the box is simply larger than x.
    x = x_mk if m < 8 or m % 8 == 0 else jnp.pad(x_mk, ((0, -m % 8), (0, 0)))
    epi = min(bm, _EPI_M)
    if cfg.split_k > 1:
        out_type = jax.ShapeDtypeStruct((cfg.split_k, w.n, m_tiles * bm), jnp.float32)
        o_smem = plgpu.SMEM((_CONSUMERS, bn, epi), jnp.float32)
    else:
        out_type = jax.ShapeDtypeStruct((m_tiles * bm, w.n), x_mk.dtype)
        o_smem = plgpu.SMEM(
            (_CONSUMERS, epi, bn), x_mk.dtype, transforms=tiled(swizzle_for(bn * 2), 16)
        )
    tiles = cfg.split_k * n_tiles * m_tiles
    kernel = plgpu.kernel(
        functools.partial(
            _kernel, g=g, steps=steps, depth=depth, n_tiles=n_tiles, m_tiles=m_tiles, cfg=cfg
        ),
        out_type=out_type,
        grid=(min(tiles, _num_sms()) if cfg.persistent else tiles,),
        grid_names=("t",),
        num_threads=_CONSUMERS + 1,
        thread_name="wg",
        scratch_types=[o_smem],
    )
    out = kernel(x, w.q_packed, w.scales_gn, w.zeros_gn)
    if cfg.split_k > 1:  # [split_k, N, m_pad] f32 partials: one XLA fusion
        return out.sum(axis=0)[:, :m].T.astype(x_mk.dtype)
    return out if out.shape[0] == m else out[:m]
