"""Mosaic GPU backend (Hopper): TMA-pipelined int4 dequantize + wgmma, swapped operands.

The product is computed transposed, ``out^T[N, M] = W^T[N, K] @ x^T[K, M]``, so the
weight is wgmma's A operand (M = block_n rows, a multiple of 64) and the tokens are its
N dimension (8..256): at decode a 16-token tile wastes nothing, where a token-major MMA
would pad 1 token to 64 rows. Per CTA (one warpgroup):

* ``emit_pipeline`` streams ``[block_n, block_k]`` weight tiles (TMA into swizzled
  shared memory; one contiguous run each where the weight is tiled, layout.py), the
  matching ``[block_m, block_k]`` x tile and the
  ``[block_k / G, block_n]`` scales and zero points, ``max_concurrent_steps`` deep.
* Per group the weight tile becomes the exact integers ``q - z`` in x.dtype, in the
  wgmma A-operand registers. Two weight formats (layout.py): ``u4_wgmma`` (pre-permuted
  at load time so that SHR + LOP3 + one packed SUB per two weights lands them in the
  operand registers; inline PTX through ``plgpu.inline_mgpu``) and ``s4`` (any group
  size: Mosaic's own signed int4 -> bf16 upcast, then ``z - 8`` subtracted per row).
  One wgmma chain multiplies it (A from registers) by the x slice (B from shared memory,
  transposed view), and the group's scale is applied once per output element in f32:
  ``acc += s[:, None] * acc_g``. At decode the accumulator is 4-8 values per thread, so
  this costs far less than scaling every weight.
* Split-K, two ways. ``cluster_reduce=True`` (dispatch's choice where N / 64 >= 100):
  the ``split_k`` CTAs of a row tile form a thread-block cluster; the others store their
  f32 accumulators into the leader's shared memory (``st.shared::cluster``), one
  ``barrier.cluster`` later the leader adds them and writes its rows of the ``[M, N]``
  output in x.dtype itself, so nothing runs after the kernel. Otherwise the grid is
  ``(N / block_n, split_k, M / block_m)`` and each CTA stores its f32 accumulator
  transposed into its rows of an ``[split_k, M, N]`` array of partials (predicated to
  the real tokens): more CTAs than a cluster can co-schedule, for 4096-wide layers. XLA
  sums the partials (one small fusion), or with ``partial_sums=True`` the consumer does
  (the decode step's norm and attention kernels: one kernel fewer per matmul).
* ``epilogue="swiglu"`` (a gate/up weight interleaved in blocks of 8 rows): where the
  kernel finishes the product itself (``cluster_reduce``) it stores ``silu(gate) * up``
  from its f32 accumulators, a thread holding each gate row and its up row.

* ``prefetch=`` the next matmul's weight: once its pipeline is done, each CTA issues its
  share of TMA prefetches of that weight into the L2 (`prefetch_boxes`), which need no
  shared memory and no wait; the bytes move while the kernels in between (attention,
  norms) leave the memory idle (docs/kernels.md, "Cross-kernel L2 prefetch").

``scale_in_dequant=True`` instead multiplies each dequantized weight by its scale in
x.dtype (one more packed multiply per two weights, one bf16 rounding of the scale) and
accumulates the whole K range in one wgmma accumulator, so consecutive groups' wgmma
chains overlap instead of each group waiting for its own (``wgmma_wait(1)``, with the
pipeline's slots released one step late).

The x tile is read straight from the ``[M, K]`` activations (padded only to a multiple
of 8 rows when M > 8): TMA fills the rows past M with zeros.

``a_in_smem=True`` stores the dequantized tile to shared memory and runs wgmma with
both operands there. It is slower (an extra shared-memory round trip) but it is the
variant the Mosaic GPU interpreter can run (its wgmma takes shared-memory operands only),
so CPU tests check the pipeline, indexing and dequantization through it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.layout import SWIGLU_BLOCK, WGMMA_CHUNK, WGMMA_TILE_K, WGMMA_TILE_N, Int4Weight
from pallas_kernels.reference import swiglu_interleaved

# Magic float whose low mantissa bits take a 4-bit code q: (bits, value of magic | 0).
_MAGIC = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0), jnp.dtype(jnp.float16): (0x6400, 1024.0)}

# wgmma's N (tokens per CTA) must be a multiple of 8 and at most 256.
MAX_BLOCK_M = 256
# Default tokens per CTA above 16 tokens: a [64, 128] f32 accumulator (and the group's
# partial) is 64 registers per thread each; 256 would spill.
DEFAULT_MAX_BLOCK_M = 128
# Shared memory the pipeline may use per CTA (H100: 227 KB per block; keep headroom).
SMEM_BUDGET = 200 * 1024


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes of the Mosaic GPU kernel.

    block_n: weight rows (output columns) per CTA, a multiple of 64 (wgmma M).
    block_m: tokens per CTA (None: M rounded up to 8, or 16 above 8); <= 256.
    block_k: K rows per pipeline step, a multiple of the group size (>= 64).
    split_k: CTAs along K, each reducing ``K / split_k`` rows into an f32 partial.
    max_concurrent_steps: pipeline depth (TMA copies in flight per CTA).
    a_in_smem: stage the dequantized tile in shared memory (see the module docstring).
    x_resident: copy the CTA's whole ``[block_m, K / split_k]`` x slice once (the pipeline
      sees an index-invariant block) instead of one ``[block_m, block_k]`` tile per step
      (fewer TMA copies; measured slower, run 15).
    cluster_reduce: finish inside the kernel, no XLA epilogue: the ``split_k`` CTAs of a
      row tile form a thread-block cluster, the others store their f32 accumulators
      into the leader's shared memory, and the leader adds them and writes its
      ``[M, block_n]`` slice of the output in x.dtype (needs a single M tile).
    """

    block_n: int = 128
    block_m: int | None = None
    block_k: int = 256
    split_k: int = 1
    max_concurrent_steps: int = 4
    scale_in_dequant: bool = False
    a_in_smem: bool = False
    x_resident: bool = False
    cluster_reduce: bool = False


# A thread-block cluster holds at most 8 CTAs (portable size).
MAX_CLUSTER = 8


def swizzle_for(row_bytes: int) -> int:
    """The largest TMA swizzle (bytes) a row of ``row_bytes`` holds whole."""
    for s in (128, 64, 32):
        if row_bytes % s == 0:
            return s
    raise NotImplementedError(f"a tile row of {row_bytes} bytes is below the 32-byte swizzle")


def tiled(swizzle: int, bits: int) -> tuple:
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def block_m_for(m: int, cfg: Config) -> int:
    if cfg.block_m is not None:
        return cfg.block_m
    return 8 if m <= 8 else min(DEFAULT_MAX_BLOCK_M, -(-m // 16) * 16)


def weight_bytes_per_step(g: int, cfg: Config) -> int:
    """The weight bytes one pipeline step copies: codes, f16 scales and zero points."""
    bn, bk = cfg.block_n, cfg.block_k
    return bn * bk // 2 + 2 * (bk // g) * bn * 2


def _smem_per_step_and_fixed(bm: int, g: int, cfg: Config, steps: int) -> tuple[int, int]:
    bn, bk = cfg.block_n, cfg.block_k
    per_step = weight_bytes_per_step(g, cfg)
    x_bytes = bm * bk * 2 * (steps if cfg.x_resident else 1)
    per_step += 0 if cfg.x_resident else x_bytes
    # Shared [bn, bm] f32 tiles: the leader's slots of a cluster, the interpreter's output.
    out_tiles = cfg.split_k - 1 if cfg.cluster_reduce else int(cfg.a_in_smem)
    fixed = out_tiles * bn * bm * 4 + (bn * g * 2 if cfg.a_in_smem else 0)
    fixed += x_bytes * cfg.max_concurrent_steps if cfg.x_resident else 0
    return per_step, fixed


def smem_bytes(bm: int, g: int, cfg: Config, steps: int, depth: int) -> int:
    """Shared memory of one CTA whose pipeline is ``depth`` steps deep (buffers only)."""
    per_step, fixed = _smem_per_step_and_fixed(bm, g, cfg, steps)
    return depth * per_step + fixed


def pipeline_depth(bm: int, g: int, cfg: Config, steps: int) -> int:
    """``max_concurrent_steps`` cut to what fits in :data:`SMEM_BUDGET` (at least 1)."""
    per_step, fixed = _smem_per_step_and_fixed(bm, g, cfg, steps)
    fits = max(1, (SMEM_BUDGET - fixed) // per_step)
    return max(1, min(cfg.max_concurrent_steps, steps, fits))


def check_supported(m: int, w: Int4Weight, dtype: jnp.dtype, cfg: Config) -> None:
    """Raises NotImplementedError for inputs this kernel cannot run."""
    problems = []
    bm = block_m_for(m, cfg)
    g = w.group_size
    if w.fmt not in ("s4", "u4_wgmma"):
        problems.append(f"the weight must be in the 's4' or 'u4_wgmma' format, not {w.fmt!r}")
    if w.fmt == "u4_wgmma" and (cfg.block_k % WGMMA_CHUNK or cfg.a_in_smem):
        problems.append(f"u4_wgmma needs block_k a multiple of {WGMMA_CHUNK} and no a_in_smem")
    problems += tiled_problems(w, cfg.block_n, cfg.block_k)
    if dtype not in (jnp.bfloat16, jnp.float16):
        problems.append(f"activations must be bf16 or f16, got {dtype}")
    if g % 32 or g > cfg.block_k or cfg.block_k % g or cfg.block_k < 64:
        problems.append(f"group_size={g} must be a multiple of 32 dividing block_k >= 64")
    if cfg.block_n % 64 or w.n % cfg.block_n:
        problems.append(f"block_n={cfg.block_n} must be a multiple of 64 dividing N={w.n}")
    if bm % 8 or not 8 <= bm <= MAX_BLOCK_M:
        problems.append(f"block_m={bm} must be a multiple of 8 in [8, {MAX_BLOCK_M}]")
    if w.k % (cfg.split_k * cfg.block_k):
        problems.append(f"K={w.k} must split into {cfg.split_k} x steps of block_k={cfg.block_k}")
    if cfg.cluster_reduce and (m > bm or cfg.split_k > MAX_CLUSTER or cfg.a_in_smem):
        problems.append(
            f"cluster_reduce needs one M tile (M={m} > block_m={bm}?), split_k <= "
            f"{MAX_CLUSTER} and no a_in_smem"
        )
    if problems:
        raise NotImplementedError("; ".join(problems))


def _dequant_wgmma(words, zm, dtype, ops: str = "full"):
    """u4_wgmma words ``[bn, 16] uint32`` (WGMMA_8BIT layout) -> ``[bn, 128]`` q - z.

    ``zm`` is ``magic + z`` per row (row layout). Per 32-bit word: for each of its 4
    element pairs one SHR, one LOP3 (``& 0x000F000F | magic``: two floats ``magic + q``)
    and one packed SUB of ``magic + z``, written straight into the wgmma A-operand
    registers (see layout.py for the order that makes this possible).

    ``ops`` other than "full" are probes of the kernel's cost (wrong products, timing
    only): "raw" (stream_probe.py) moves each word into the operand registers as it is,
    the same registers and wgmma with no dequantization; "nosub" leaves out the SUB of
    the zero point (operands ``magic + q``), what taking the zero point out of the
    dequantization could at most save (docs/benchmarks/decode-ab/ab_alu.py).
    """
    if ops not in ("full", "nosub", "raw"):
        raise ValueError(f"ops must be 'full', 'nosub' or 'raw', got {ops!r}")
    import jax.experimental.mosaic.gpu as mgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm, vector

    bits, _ = _MAGIC[jnp.dtype(dtype)]
    ty = "bf16" if jnp.dtype(dtype) == jnp.bfloat16 else "f16"
    bn = words.shape[0]
    lop = f"lop3.b32 t, t, 0x000F000F, {hex(bits << 16 | bits)}, 0xEA;\n"
    asm = [  # pair p of a word: its nibbles p and p + 4 -> two floats q - z
        "mov.b32 $0, $1;"
        if ops == "raw"
        else f"{{ .reg .b32 t;\nshr.b32 t, $1, {4 * p};\n{lop}"
        + ("mov.b32 $0, t; }" if ops == "nosub" else f"sub.{ty}x2 $0, t, $2; }}")
        for p in range(4)
    ]

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA_8BIT, plgpu.Layout.WGMMA.reduce(1)),
        return_type=plgpu.ShapeDtypeStruct((bn, WGMMA_CHUNK), dtype, layout=plgpu.Layout.WGMMA),
    )
    def convert(_, words, zm):
        i32 = ir.IntegerType.get_signless(32)
        i16 = ir.IntegerType.get_signless(16)
        el = mgpu_utils.dtype_to_ir_type(jnp.dtype(dtype))
        out = np.empty(fa.WGMMA_LAYOUT.registers_shape((bn, WGMMA_CHUNK)), dtype=object)
        for tile in range(bn // 64):
            for h in range(2):
                zreg = zm.registers[tile, 0, h, 0, 0]  # vector<1 x dtype>
                z16 = arith.extui(i32, mgpu_utils.bitcast(zreg, i16))
                z2 = arith.ori(z16, arith.shli(z16, arith.constant(i32, 16)))
                wvec = words.registers[tile, 0, 0, 0, h, 0, 0, 0, 0]  # vector<4 x i32>
                for v in range(4):
                    word = vector.extract(wvec, [], [v])
                    for p in range(4):
                        res = llvm.inline_asm(i32, [word, z2], asm[p], "=r,r,r")
                        reg = mgpu_utils.bitcast(res, ir.VectorType.get((2,), el))
                        out[tile, 4 * v + p, 0, 0, h, 0, 0, 0, 0] = reg
        return mgpu.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return convert(words, zm)


def tiled_problems(w: Int4Weight, rows: int, bk: int) -> list[str]:
    """Why a CTA of ``rows`` weight rows with steps of ``bk`` K rows cannot read ``w``'s
    tiles (`w_block`), if it is a tiled ``u4_wgmma`` weight: empty where it can."""
    if w.fmt != "u4_wgmma" or not w.tile_n:
        return []
    if WGMMA_TILE_N % rows or (bk % WGMMA_TILE_K and WGMMA_TILE_K % bk):
        return [
            f"a tiled u4_wgmma weight needs a CTA's rows ({rows}) dividing {WGMMA_TILE_N} "
            f"and block_k ({bk}) dividing {WGMMA_TILE_K} or a multiple of it"
        ]
    return []


def w_block(rows: int, bk: int, w_gmem) -> tuple:
    """(block shape, index map of step ``(ni, kk)`` -> block index, TMA transforms) of
    the weight's pipeline copy: ``rows`` weight rows (row block ``ni``) by ``bk`` K rows
    (step ``kk``) of ``w_gmem`` (``q_packed``; `tiled_problems` says what fits).

    Rows order: a ``[rows, bk / 8]`` box of the ``[N, K / 8]`` words (``s4``: ``[rows,
    bk]`` codes). Tiled (``[N / 128, K / 256, 128, 32]``): the rows of one tile at one
    step, ``[rows, bk / 8]`` in shared memory as in the rows order; ``[bk / 256, rows,
    32]`` where a step spans several tiles along K.
    """
    wgmma_fmt = w_gmem.dtype == jnp.uint32
    if len(w_gmem.shape) == 2:  # the rows order (u4_wgmma or s4)
        block = (rows, bk // 8) if wgmma_fmt else (rows, bk)
        bits = 32 if wgmma_fmt else 4
        return block, lambda ni, kk: (ni, kk), tiled_transforms(bk // 2, bits)
    per_n = WGMMA_TILE_N // rows  # row blocks per tile
    if bk >= WGMMA_TILE_K:
        kt = bk // WGMMA_TILE_K
        block = (None, None if kt == 1 else kt, rows, WGMMA_TILE_K // 8)
        return (
            block,
            lambda ni, kk: (ni // per_n, kk, ni % per_n, 0),
            tiled_transforms(WGMMA_TILE_K // 2, 32),
        )
    per_k = WGMMA_TILE_K // bk  # steps per tile
    return (
        (None, None, rows, bk // 8),
        lambda ni, kk: (ni // per_n, kk // per_k, ni % per_n, kk % per_k),
        tiled_transforms(bk // 2, 32),
    )


def sz_block(rows: int, bk: int, g: int, sz_gmem) -> tuple:
    """(block shape, index map of step ``(ni, kk)``) of the scales' and zero points' copy
    for `w_block`'s weight block: ``[bk / g, rows]`` of ``[K / G, N]``; tiled
    (``[N / 128, K / 256, 256 / G, 128]``) the same values, ``[bk / 256, 256 / G, rows]``
    where a step spans several tiles along K (`group_ref` finds a group in either)."""
    if len(sz_gmem.shape) == 2:
        return (bk // g, rows), lambda ni, kk: (kk, ni)
    per_n = WGMMA_TILE_N // rows
    if bk >= WGMMA_TILE_K:
        kt = bk // WGMMA_TILE_K
        block = (None, None if kt == 1 else kt, WGMMA_TILE_K // g, rows)
        return block, lambda ni, kk: (ni // per_n, kk, 0, ni % per_n)
    per_k = WGMMA_TILE_K // bk
    return (
        (None, None, bk // g, rows),
        lambda ni, kk: (ni // per_n, kk // per_k, kk % per_k, ni % per_n),
    )


def group_ref(sz_smem, gi: int):
    """Group ``gi`` of a step's scales or zero points (`sz_block`): a ``[rows]`` ref."""
    if len(sz_smem.shape) == 3:  # [tiles along K, groups per tile, rows]
        per = sz_smem.shape[1]
        return sz_smem.at[gi // per, gi % per]
    return sz_smem.at[gi]


def tiled_transforms(row_bytes: int, bits: int) -> tuple:
    return tiled(swizzle_for(row_bytes), bits)


def load_words(w_smem, rows=None):
    """A step's weight block in registers: ``u4_wgmma`` words in the WGMMA_8BIT layout
    (a tuple of ``[rows, 32]`` arrays where the block spans several tiles along K), or
    ``s4`` codes; ``rows``: a slice of its rows (None: all)."""
    at = (lambda ref: ref) if rows is None else (lambda ref: ref.at[rows])
    if w_smem.dtype != jnp.uint32:
        return at(w_smem)[...]
    layout = plgpu.Layout.WGMMA_8BIT
    if len(w_smem.shape) == 2:
        return plgpu.load(at(w_smem), layout=layout)
    return tuple(plgpu.load(at(w_smem.at[c]), layout=layout) for c in range(w_smem.shape[0]))


def _chunk_words(w_tile, c0: int):
    """The ``[rows, 16]`` words of the 128-column chunk at word ``c0`` of a step's tile."""
    if isinstance(w_tile, tuple):  # tiled: find the tile along K that holds it
        per = w_tile[0].shape[1]
        w_tile, c0 = w_tile[c0 // per], c0 % per
    return w_tile[:, c0 : c0 + WGMMA_CHUNK // 8]


def dequant_group(w_tile, z_ref, gi: int, g: int, dtype):
    """Group ``gi`` of a weight tile in registers as the exact ``q - z`` in ``dtype``,
    ``[rows, g]`` in the WGMMA layout. ``w_tile``: ``u4_wgmma`` words (`load_words`) or
    ``s4`` codes; ``z_ref``: the tile rows' zero points of that group.
    """
    row = plgpu.Layout.WGMMA.reduce(1)
    if isinstance(w_tile, tuple) or w_tile.dtype == jnp.uint32:
        zm = plgpu.load(z_ref, layout=row).astype(jnp.float32)
        zm = (zm + _MAGIC[jnp.dtype(dtype)][1]).astype(dtype)
        chunks = []
        for ch in range(g // WGMMA_CHUNK):
            words = _chunk_words(w_tile, (gi * g + ch * WGMMA_CHUNK) // 8)  # [rows, 16]
            chunks.append(_dequant_wgmma(words, zm, dtype))
        return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks, axis=1)
    zc = plgpu.load(z_ref, layout=row).astype(jnp.float32) - 8.0
    wq = w_tile[:, gi * g : (gi + 1) * g].astype(dtype)
    return wq - lax.broadcast_in_dim(zc.astype(dtype), wq.shape, [0])  # q - z, exact


def _store_transposed(val, o_ref, m: int):
    """``o_ref[t, r] = val[r, t]`` for the tokens ``t < m``: val ``[bn, bm]`` (WGMMA
    layout) -> o_ref ``[m, bn]`` in global memory, one predicated store per
    element (a few per thread at decode); the weight rows of one token are contiguous.
    """
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, memref

    bm = val.shape[1]

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))
    def store(_, val, ref):
        limit = arith.constant(ir.IndexType.get(), m)

        def put(v, idx):
            row, tok = idx
            if m >= bm:
                memref.store(v, ref, [tok, row])
                return
            with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.ult, tok, limit)):
                memref.store(v, ref, [tok, row])

        val.foreach(put)

    store(val, o_ref)


def _store_swiglu_transposed(val, o_ref, m: int, dtype):
    """``o_ref[t, j] = silu(gate) * up`` for the tokens ``t < m``, from ``val [bn, bm]``
    f32 (WGMMA layout) whose rows are gate/up in blocks of :data:`SWIGLU_BLOCK` (layout.py,
    `interleave_gate_up`): ``o_ref [m, bn / 2]`` in global memory, rounded once to dtype.

    In the WGMMA layout a thread holds rows ``r`` and ``r + 8`` of each 16 (the register
    index 4, ``h``), so gate row ``r`` and its up row ``r + 8`` meet in one thread: the
    product needs no data movement, and gate row ``16 i + r`` is output column ``8 i + r``.
    """
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, memref, vector

    act = val / (1.0 + jnp.exp(-val))  # silu of every row; the gate rows' are used
    bm = val.shape[1]

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA, plgpu.RefType()))
    def store(_, act, val, ref):
        index = ir.IndexType.get()
        el = mgpu_utils.dtype_to_ir_type(jnp.dtype(dtype))
        limit = arith.constant(index, m)
        c = lambda v: arith.constant(index, v)  # noqa: E731
        regs = val.registers
        for pos, (row, tok) in zip(
            np.ndindex(regs.shape), val.layout.thread_idxs(val.shape), strict=True
        ):
            if pos[4]:  # an up row: taken with its gate row
                continue
            up = regs[(*pos[:4], 1, *pos[5:])]
            prod = arith.mulf(act.registers[pos], up)  # vector<2 x f32>: 2 tokens
            out = arith.truncf(ir.VectorType.get(ir.VectorType(prod.type).shape, el), prod)
            col = arith.addi(
                arith.muli(arith.divui(row, c(2 * SWIGLU_BLOCK)), c(SWIGLU_BLOCK)),
                arith.remui(row, c(SWIGLU_BLOCK)),
            )
            for e in range(ir.VectorType(prod.type).shape[0]):
                t = arith.addi(tok, c(e))
                v = vector.extract(out, dynamic_position=[], static_position=[e])
                if m >= bm:
                    memref.store(v, ref, [t, col])
                    continue
                with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.ult, t, limit)):
                    memref.store(v, ref, [t, col])

    store(act, val, o_ref)


def _store_to_leader(val, ref):
    """``ref`` in the shared memory of the cluster's CTA 0 ``= val`` (one
    ``st.shared::cluster`` per element: a few per thread)."""
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, gpu, memref

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))
    def store(_, val, ref):
        leader = arith.constant(ir.IndexType.get(), 0)
        # The kernel's only cluster axis ("k") is the CUDA cluster's x dimension.
        remote = mgpu_utils.get_cluster_ref(ref, gpu.Dimension.x, leader, generic=False)
        val.foreach(lambda v, idx: memref.store(v, remote, list(idx)))

    store(val, ref)


def _cluster_sync():
    """All threads of all CTAs in the cluster: their earlier writes (shared memory of
    other CTAs included) are visible to every one of them after this."""
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import llvm

    @plgpu.inline_mgpu()
    def sync(_):
        llvm.inline_asm(
            ir.Type.parse("!llvm.void"),
            [],
            "barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;",
            "",
            has_side_effects=True,
        )

    sync()


@dataclasses.dataclass(frozen=True)
class PrefetchBoxes:
    """One operand of an L2 prefetch cut into TMA boxes of ``[rows, cols]`` elements:
    ``n_r`` boxes down the rows times the first ``n_c`` of ``c_total`` column chunks, the
    chunks taken in the order the next kernel reads them: by position within each of its
    ``c_split`` K splits (chunk 0 of every split first, then chunk 1, ...)."""

    operand: int
    rows: int
    cols: int
    n_r: int
    n_c: int
    c_total: int
    c_split: int = 1

    @property
    def count(self) -> int:
        return self.n_r * self.n_c

    def origin(self, b):
        """Box ``b``'s first row and column (``b`` may be traced)."""
        p, r = b // self.n_r, b % self.n_r
        per = self.c_total // self.c_split
        return r * self.rows, ((p % self.c_split) * per + p // self.c_split) * self.cols


def _divisor(n: int, options: tuple[int, ...]) -> int | None:
    return next((o for o in options if n % o == 0), None)


def prefetch_boxes(w: Int4Weight, split: int, max_bytes: int) -> tuple[PrefetchBoxes, ...]:
    """The boxes that prefetch ``w`` (the next matmul's ``u4_wgmma`` weight, operands
    ``q_packed, scales_gn, zeros_gn``) into the L2, at most ``max_bytes``: its scales and
    zero points whole, then its codes' K chunks in the order a kernel that splits K
    ``split`` ways reads them. Empty where the shapes do not cut into TMA boxes, and for
    tiled weights (the boxes cut the ``[N, K / 8]`` rows order; the prefetch is off on
    every part, `tuning.DECODE`)."""
    if w.fmt != "u4_wgmma" or w.tile_n:
        return ()
    n, words = w.q_packed.shape
    groups = w.scales_gn.shape[0]
    rows, cols = _divisor(n, (256, 128, 64)), _divisor(words, (64, 32, 16))
    g_rows = groups if groups <= 256 else _divisor(groups, (256, 128, 64, 32, 16, 8))
    n_cols = _divisor(n, (256, 128, 64))
    if None in (rows, cols, g_rows, n_cols):
        return ()
    sz_bytes = 2 * groups * n * w.scales_gn.dtype.itemsize
    if sz_bytes > max_bytes:
        return ()
    boxes = [
        PrefetchBoxes(operand, g_rows, n_cols, groups // g_rows, n // n_cols, n // n_cols)
        for operand in (1, 2)
    ]
    c_total = words // cols
    take = min(c_total, (max_bytes - sz_bytes) // (n * cols * 4))
    if take:
        c_split = split if c_total % split == 0 else 1
        boxes.insert(0, PrefetchBoxes(0, rows, cols, n // rows, take, c_total, c_split))
    return tuple(boxes)


def _issue_prefetch(refs, boxes: tuple[PrefetchBoxes, ...], cta, num_ctas: int) -> None:
    """CTA ``cta``'s share of the prefetch: boxes ``cta``, ``cta + num_ctas``, ... of each
    operand (its first box at a different CTA per operand), one TMA prefetch each."""
    for i, bx in enumerate(boxes):
        mine = lax.rem(cta + i * num_ctas // len(boxes), num_ctas)
        for j in range(-(-bx.count // num_ctas)):
            b = mine + j * num_ctas
            r0, c0 = bx.origin(jnp.minimum(b, bx.count - 1))
            ref = refs[bx.operand].at[pl.ds(r0, bx.rows), pl.ds(c0, bx.cols)]
            plgpu.async_prefetch(ref, predicate=b < bx.count)


def _kernel(
    x_gmem, w_gmem, s_gmem, z_gmem, *refs, g, bm, m, steps, depth, cfg, swiglu, prefetch, n
):
    """``refs``: the prefetched weight's three operands when ``prefetch`` (its boxes) is
    not empty, then the output, then the scratch buffers."""
    n_pf = 3 if prefetch else 0
    pf_refs, (o_gmem, *scratch) = refs[:n_pf], refs[n_pf:]
    bn, bk = cfg.block_n, cfg.block_k
    dtype = x_gmem.dtype
    ni, mi = lax.axis_index("n"), lax.axis_index("m")
    ki = lax.axis_index("k") if cfg.split_k > 1 or not cfg.cluster_reduce else 0
    if cfg.cluster_reduce:
        red_smem = scratch[0] if cfg.split_k > 1 else None
        a_smem = ()
    elif cfg.a_in_smem:
        o_smem, *a_smem = scratch
    else:
        a_smem = ()
    x_swizzle = swizzle_for(min(g, 64) * 2)  # an x slice per wgmma = one swizzle row
    x_elems = x_swizzle // 2
    row = plgpu.Layout.WGMMA.reduce(1)  # one value per accumulator row (weight row)

    def x_cols(idx, start, size):
        """The x columns of this step's ``[start, start + size)`` in the x block."""
        if cfg.x_resident:
            return pl.ds(idx[0] * bk + start, size)
        return pl.ds(start, size)

    def body(idx, w_smem, x_smem, s_smem, z_smem, acc):
        w_tile = load_words(w_smem)
        for gi in range(bk // g):
            wq = dequant_group(w_tile, group_ref(z_smem, gi), gi, g, dtype)
            if cfg.a_in_smem:
                a_smem[0][...] = wq
                plgpu.commit_smem()

            def group_dot(acc_ref, gi=gi, wq=wq):
                for j in range(g // x_elems):
                    cols = slice(j * x_elems, (j + 1) * x_elems)
                    a = a_smem[0].at[:, cols] if cfg.a_in_smem else wq[:, cols]
                    b = x_smem.at[:, x_cols(idx, gi * g + j * x_elems, x_elems)].T
                    plgpu.wgmma(acc_ref, a, b)
                return acc_ref[...]  # waits for the chain

            acc_g = pl.run_scoped(group_dot, plgpu.ACC((bn, bm), jnp.float32))
            s = plgpu.load(group_ref(s_smem, gi), layout=row).astype(jnp.float32)
            acc = acc + lax.broadcast_in_dim(s, acc.shape, [0]) * acc_g
        return acc

    def body_scaled(acc_ref, idx, w_smem, x_smem, s_smem, z_smem):
        w_tile = load_words(w_smem)
        for gi in range(bk // g):
            s = plgpu.load(group_ref(s_smem, gi), layout=row).astype(dtype)
            wq = dequant_group(w_tile, group_ref(z_smem, gi), gi, g, dtype)
            wq = wq * lax.broadcast_in_dim(s, wq.shape, [0])  # (q - z) * s in x.dtype
            for j in range(g // x_elems):
                cols = slice(j * x_elems, (j + 1) * x_elems)
                b = x_smem.at[:, x_cols(idx, gi * g + j * x_elems, x_elems)].T
                plgpu.wgmma(acc_ref, wq[:, cols], b)
            plgpu.wgmma_wait(1)  # the previous chain is done: its registers are free

    k0 = ki * steps
    w_shape, w_index, w_transforms = w_block(bn, bk, w_gmem)
    sz_shape, sz_index = sz_block(bn, bk, g, s_gmem)

    release = 1 if cfg.scale_in_dequant else 0
    specs = [
        plgpu.BlockSpec(
            w_shape,
            lambda i: w_index(ni, k0 + i),
            transforms=w_transforms,
            delay_release=release,
        ),
        plgpu.BlockSpec(
            (bm, bk * steps) if cfg.x_resident else (bm, bk),
            (lambda i: (mi, ki)) if cfg.x_resident else (lambda i: (mi, k0 + i)),
            transforms=tiled(x_swizzle, 16),
            delay_release=release,
        ),
        plgpu.BlockSpec(sz_shape, lambda i: sz_index(ni, k0 + i), delay_release=release),
        plgpu.BlockSpec(sz_shape, lambda i: sz_index(ni, k0 + i), delay_release=release),
    ]
    if cfg.scale_in_dequant:

        def run(acc_ref):
            plgpu.emit_pipeline(
                functools.partial(body_scaled, acc_ref),
                grid=(steps,),
                in_specs=specs,
                max_concurrent_steps=max(depth, release + 1),
            )(w_gmem, x_gmem, s_gmem, z_gmem)
            return acc_ref[...]

        acc = pl.run_scoped(run, plgpu.ACC((bn, bm), jnp.float32))
    else:
        acc = plgpu.emit_pipeline(
            body,
            grid=(steps,),
            in_specs=specs,
            max_concurrent_steps=depth,
            init_carry=plgpu.layout_cast(jnp.zeros((bn, bm), jnp.float32), plgpu.Layout.WGMMA),
        )(w_gmem, x_gmem, s_gmem, z_gmem)
    if prefetch:  # after its own stream: the bytes move while the CTAs still running
        # finish and while the small kernels after this one leave the memory idle
        n_tiles, m_tiles = n // bn, -(-m // bm)
        cta = ni + n_tiles * (ki + cfg.split_k * mi)
        _issue_prefetch(pf_refs, prefetch, cta, n_tiles * cfg.split_k * m_tiles)
    if not cfg.cluster_reduce and cfg.a_in_smem:
        # The interpreter's variant (it runs no inline stores): [split_k, N, M] tiles by TMA.
        o_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[ki, pl.ds(ni * bn, bn), pl.ds(mi * bm, bm)])
        plgpu.wait_smem_to_gmem(0)
        return
    if not cfg.cluster_reduce:  # this CTA's f32 partial, rows of the [split_k, M, N] output
        one_tile = o_gmem.shape[1] <= bm
        rows = slice(None) if one_tile else pl.ds(mi * bm, bm)
        _store_transposed(acc, o_gmem.at[ki, rows, pl.ds(ni * bn, bn)], m if one_tile else bm)
        return

    def finish(total):  # the output rows of this row tile, in x.dtype
        if swiglu:
            _store_swiglu_transposed(total, o_gmem.at[:, pl.ds(ni * bn // 2, bn // 2)], m, dtype)
        else:
            _store_transposed(total.astype(dtype), o_gmem.at[:, pl.ds(ni * bn, bn)], m)

    if cfg.split_k == 1:
        finish(acc)
        return

    @pl.when(ki != 0)
    def _send():  # into the leader's shared memory (st.shared::cluster)
        _store_to_leader(acc, red_smem.at[ki - 1])

    _cluster_sync()

    @pl.when(ki == 0)
    def _finish():
        total = acc
        for j in range(cfg.split_k - 1):
            layout = plgpu.Layout.WGMMA
            total = total + plgpu.load(red_smem.at[j], layout=layout, optimized=False)
        finish(total)


@functools.partial(
    jax.jit,
    static_argnames=(
        "config",
        "epilogue",
        "partial_sums",
        "prefetch_split",
        "prefetch_bytes",
        "interpret",
    ),
)
def int4_matmul_mosaic(
    x_mk: jax.Array,
    w: Int4Weight,
    *,
    config: Config | None = None,
    epilogue: str | None = None,
    partial_sums: bool = False,
    prefetch: Int4Weight | None = None,
    prefetch_split: int = 1,
    prefetch_bytes: int = 0,
    interpret: bool = False,
) -> jax.Array:
    """``x[M, K] @ W`` through the Mosaic GPU kernel; returns ``[M, N]`` in x.dtype.

    ``epilogue="swiglu"``: W's columns are gate/up pairs (`layout.interleave_gate_up`) and
    the result is ``silu(gate) * up``, ``[M, N / 2]``; with ``cluster_reduce`` the kernel
    computes it from its f32 accumulators, otherwise XLA does after the sum.
    ``partial_sums=True`` returns the ``[S, M, N]`` terms whose sum over S is the product
    (S = split_k f32 partials without ``cluster_reduce``, else the product itself with
    S = 1), for a consumer that adds them itself (`pallas_kernels.int4_matmul`).
    ``prefetch``: the weight the next matmul reads (``u4_wgmma``); the CTAs share out
    TMA prefetches of up to ``prefetch_bytes`` of it into the L2 (`prefetch_boxes`, in
    the order a kernel splitting K ``prefetch_split`` ways reads it), each after its
    own pipeline. A hint: it changes no result.
    ``interpret=True`` runs the Mosaic GPU interpreter on the CPU (needs
    ``a_in_smem=True``; small shapes only; it prefetches nothing).
    """
    cfg = config or Config()
    m, k = x_mk.shape
    if k != w.k:
        raise ValueError(f"x has K={k}, weight has K={w.k}")
    check_supported(m, w, x_mk.dtype, cfg)
    check_epilogue(w.n, epilogue, partial_sums)
    if interpret and not cfg.a_in_smem:
        raise NotImplementedError("the Mosaic GPU interpreter needs a_in_smem=True")
    if cfg.a_in_smem and cfg.scale_in_dequant:
        raise NotImplementedError("a_in_smem and scale_in_dequant do not combine")
    bm = block_m_for(m, cfg)
    m_pad = -(-m // bm) * bm
    g, bn = w.group_size, cfg.block_n
    steps = k // (cfg.split_k * cfg.block_k)
    depth = pipeline_depth(bm, g, cfg, steps)
    swiglu = epilogue == "swiglu" and cfg.cluster_reduce
    boxes = ()
    if prefetch is not None and prefetch_bytes > 0 and not interpret:
        boxes = prefetch_boxes(prefetch, prefetch_split, prefetch_bytes)
    pf_operands = (prefetch.q_packed, prefetch.scales_gn, prefetch.zeros_gn) if boxes else ()
    body = functools.partial(
        _kernel,
        g=g,
        bm=bm,
        m=m,
        steps=steps,
        depth=depth,
        cfg=cfg,
        swiglu=swiglu,
        prefetch=boxes,
        n=w.n,
    )
    interpret_params = plgpu.InterpretGPUParams() if interpret else None
    x = x_mk if m <= 8 or m % 8 == 0 else jnp.pad(x_mk, ((0, -m % 8), (0, 0)))
    if cfg.cluster_reduce:
        scratch = []
        if cfg.split_k > 1:  # the leader's slots for the other CTAs' accumulators
            scratch.append(plgpu.SMEM((cfg.split_k - 1, bn, bm), jnp.float32))
        kernel = plgpu.kernel(
            body,
            out_type=jax.ShapeDtypeStruct((m, w.n // 2 if swiglu else w.n), x_mk.dtype),
            grid=(w.n // bn, 1),
            grid_names=("n", "m"),
            cluster=(cfg.split_k,),
            cluster_names=("k",),
            scratch_types=scratch,
            interpret=interpret_params,
        )
        y = kernel(x, w.q_packed, w.scales_gn, w.zeros_gn, *pf_operands)
        return y[None] if partial_sums else y
    if cfg.a_in_smem:  # the interpreter's variant writes [split_k, N, m_pad] tiles
        a_tiling = tiled(swizzle_for(min(g, 64) * 2), 16)
        a_tile = plgpu.SMEM((bn, g), x_mk.dtype, transforms=a_tiling)
        scratch = [plgpu.SMEM((bn, bm), jnp.float32), a_tile]
        part_shape = (cfg.split_k, w.n, m_pad)
    else:
        scratch = []
        part_shape = (cfg.split_k, m if m_pad == bm else m_pad, w.n)
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(part_shape, jnp.float32),
        grid=(w.n // bn, cfg.split_k, m_pad // bm),
        grid_names=("n", "k", "m"),
        scratch_types=scratch,
        interpret=interpret_params,
    )
    part = kernel(x, w.q_packed, w.scales_gn, w.zeros_gn, *pf_operands)
    part = part.transpose(0, 2, 1)[:, :m] if cfg.a_in_smem else part[:, :m]  # [split_k, M, N]
    if partial_sums:
        return part
    y = part.sum(axis=0).astype(x_mk.dtype)
    return swiglu_interleaved(y) if epilogue == "swiglu" else y


def check_epilogue(n: int, epilogue: str | None, partial_sums: bool) -> None:
    """ValueError for an epilogue the kernels do not know or that cannot apply."""
    if epilogue not in (None, "swiglu"):
        raise ValueError(f"epilogue must be None or 'swiglu', got {epilogue!r}")
    if epilogue and partial_sums:
        raise ValueError("an epilogue needs the whole product: no partial_sums with it")
    if epilogue and n % (2 * SWIGLU_BLOCK):
        raise ValueError(f"swiglu needs N a multiple of {2 * SWIGLU_BLOCK}, got {n}")
