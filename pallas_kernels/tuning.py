"""Which backend and which block sizes, per (device kind, M, K, N, group size, format).

The weight's format (layout.py) follows the device: Hopper GPUs get the Mosaic GPU
kernels' formats (``u4_wgmma``/``s4``) and run the decode kernel up to ``_MAX_MOSAIC_M``
(16) tokens and the warp-specialized GEMM above, with heuristic configs fitted to the H100
sweeps; other NVIDIA GPUs get ``u4_split`` and the
Triton kernel, whose configs come from a tuned table (``tuned_configs.json``, written by
``python -m pallas_kernels.bench --sweep tune`` on the device and committed) per device
kind, layer shape and bucket of M, or a heuristic. Above those M, and on anything that is
not an NVIDIA GPU, the reference ("xla": dequantize, then ``jnp.dot``). The numbers
behind each rule are in docs/kernels.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax.numpy as jnp

from pallas_kernels import pallas_mosaic_gpu, pallas_mosaic_gpu_ws, pallas_triton
from pallas_kernels.layout import is_hopper

TABLE_PATH = pathlib.Path(__file__).with_name("tuned_configs.json")

# Above this many tokens the Triton kernel (mma.sync on padded tiles) loses to
# dequantize-then-cuBLAS: measured 3x slower than bf16 at M=1024, xla ~0.6x.
_MAX_TRITON_M = 128
# Above this many tokens the decode Mosaic kernel (one warpgroup per CTA) hands over to
# the warp-specialized GEMM (``mosaic_ws``). Same run (28), 4 8B shapes: at M <= 16 the
# decode kernel is as fast or faster (4096x28672 at M=16: 28.2 against 31.5 us) but for
# 14336x4096 at 16 (18.2 vs 16.6); at M=64 mosaic_ws wins on all four (14336x4096 21.6
# vs 25.9 us), and at M=128 by 1.4-2.2x (run 27: 14336x4096 28.7 vs 63.4 us).
_MAX_MOSAIC_M = 16
# Weights at least this large (K * N) get the inline-PTX dequant at M <= 16.
_ASM_MIN_KN = 32 * 1024 * 1024


def _is_gpu(device_kind: str) -> bool:
    return device_kind.startswith("NVIDIA")


@functools.cache
def _table() -> dict:
    """{device_kind: [{"k", "n", "m_max", "impl", "config"}]}; empty if no table."""
    if not TABLE_PATH.exists():
        return {}
    return json.loads(TABLE_PATH.read_text())


def _lookup(device_kind: str, m: int, k: int, n: int, group_size: int) -> dict | None:
    entries = [
        e
        for e in _table().get(device_kind, [])
        if (e["k"], e["n"], e.get("group_size", 128)) == (k, n, group_size) and m <= e["m_max"]
    ]
    return min(entries, key=lambda e: e["m_max"]) if entries else None


def choose_implementation(
    device_kind: str, m: int, k: int, n: int, group_size: int, fmt: str = "u4_split"
) -> str:
    """The backend name dispatch runs for this shape and weight format."""
    if not _is_gpu(device_kind):
        return "xla"
    if fmt in ("s4", "u4_wgmma"):
        if not is_hopper(device_kind):
            return "xla"
        if m <= _MAX_MOSAIC_M:
            return "mosaic"
        try:
            cfg = mosaic_ws_config(device_kind, m, k, n, group_size)
            pallas_mosaic_gpu_ws.check_supported(
                m, WeightShape(k, n, group_size, fmt=fmt), jnp.bfloat16, cfg
            )
            return "mosaic_ws"
        except NotImplementedError:  # e.g. groups of 32, or N not a multiple of 128
            return "mosaic" if m <= pallas_mosaic_gpu.DEFAULT_MAX_BLOCK_M else "xla"
    entry = _lookup(device_kind, m, k, n, group_size)
    if entry is not None:
        return entry["impl"]
    return "triton" if m <= _MAX_TRITON_M else "xla"


@dataclasses.dataclass(frozen=True)
class WeightShape:
    """What the kernels' ``check_supported`` read of a weight: a stand-in for an
    ``Int4Weight`` when choosing a config without one (dispatch, sweeps, tests)."""

    k: int
    n: int
    group_size: int
    tile_n: int = 0
    fmt: str = "u4_split"


def _split_for(k: int, rows: int, group_size: int) -> int:
    """split_k giving ~``rows`` K rows per program (whole groups, dividing K)."""
    split = max(1, k // rows)
    while split > 1 and k % (split * group_size):
        split -= 1
    return split


def triton_config(
    device_kind: str, m: int, k: int, n: int, group_size: int
) -> pallas_triton.Config:
    """Tuned config if the table has one, else the heuristic below.

    Heuristic (from the H100 sweeps, docs/kernels.md run 6): up to 16 tokens -> the
    inline-PTX dequant (``asm_dequant``), non-swapped for one token and swapped for
    more (measured 1.2-1.4x faster than the plain swapped dot on the four large
    Llama-3 layers; on 4096x4096 it is 0-9% slower, so small layers keep the plain
    swapped dot); more -> block_m 64. ~1024 K rows per program (split-K) keeps hundreds
    of programs in flight for 4096-wide layers.
    """
    entry = _lookup(device_kind, m, k, n, group_size)
    if entry is not None and entry["impl"] == "triton":
        return pallas_triton.Config(**entry["config"])
    block_n = 64 if n % 64 == 0 else 32
    split_k = _split_for(k, 1024, group_size)
    if m <= 16:
        asm = k * n >= _ASM_MIN_KN
        return pallas_triton.Config(
            block_n=block_n, split_k=split_k, swap=m > 1 or not asm, asm_dequant=asm
        )
    return pallas_triton.Config(block_m=64, block_n=block_n, split_k=split_k, swap=True)


# H100 SXM: streaming multiprocessors, shared memory per SM, and CTAs of the Mosaic
# kernel that fit on one SM by registers (95 per thread x 128 threads).
_SMS = 132
_SMEM_PER_SM = 228 * 1024
_MAX_CTAS_PER_SM = 5
# Barriers and alignment on top of a CTA's buffers (a margin, not measured).
_SMEM_PER_CTA_EXTRA = 2048
# At decode (M <= 16), the most weight bytes (codes, scales, zero points) the pipelines
# of all CTAs together may have in flight: deeper rings past it only queue (runs 72-73,
# M = 1: 4096x28672, 448 CTAs, 25.3 us at depth 2 against 28.1 at depth 4; 4096x6144,
# 384 CTAs of 4 K steps, 7.9 against 8.8; 4096x14336, 224 CTAs, 14.6 at depth 4 against
# 15.2 at 2). None: no cap.
IN_FLIGHT_BYTES: int | None = 9 * 2**20


@dataclasses.dataclass(frozen=True)
class DecodeChoices:
    """The decode-step choices (M <= 16) that differ between Hopper parts, whose memory
    differs (H100: 3.35 TB/s and a 50 MB L2; H200: 4.8 TB/s and 60 MB).

    prefetch_bytes: the most bytes of the next matmul's weight each decode kernel's
      CTAs prefetch into the L2 once their pipeline is done (`api.int4_matmul`'s
      ``prefetch``); 0: none.
    large_block_k: K rows per pipeline step up to 8 tokens (one 8-token tile) for
      weights of ``K * N >= 32 Mi`` (gate_up and down_proj on 8B layers), where the split
      of K leaves whole steps of it. (At 16 tokens the x tile doubles; 512-row steps were
      25% slower there on the H100, run 73, and tie with 256 on the H200, run 86.)
    """

    prefetch_bytes: int = 0
    large_block_k: int = 256


# H100: steps of 256 rows (runs 8-16, 73: 512 lost on gate_up); no prefetch since run 92
# (batch-1 generate, in-model A/B: the 12 MB prefetch of runs 53-58, +1.3-1.7% then,
# 395.0 / 392.7 tok/s against 402.9 without it, and 400.2 with the H200's choices).
# H200, run 76 (batch-1 generate of the 8B-shaped model, in-model A/B, 440.3 tok/s as the
# H100 then chose): no prefetch 450.2 (12 MB costs the small kernels between the matmuls
# more than it saves), steps of 512 rows for gate_up / down_proj 454.9 (kernel alone at
# M = 1, run 75: 21.7 against 22.4 us and 13.2 against 13.7, 2 deep; qkv and o_proj slower).
DECODE: dict[str, DecodeChoices] = {
    "H100": DecodeChoices(),
    "H200": DecodeChoices(prefetch_bytes=0, large_block_k=512),
}


def decode_choices(device_kind: str) -> DecodeChoices:
    """The :data:`DECODE` entry whose name the device kind holds (the H100's otherwise)."""
    return next((c for name, c in DECODE.items() if name in device_kind), DECODE["H100"])


def _one_wave_depth(
    ctas: int, m: int, k: int, group_size: int, cfg: pallas_mosaic_gpu.Config
) -> int:
    """The deepest pipeline (<= cfg's, >= 3) that lets all ``ctas`` be resident at once
    (cfg's depth where none does).

    A second wave of a few CTAs costs a whole CTA's time: 4096x28672 at M = 16 (448 CTAs,
    4 per SM needed) took 36.8 us at depth 4 (3 CTAs per SM fit) and 28.1 us at depth 3.
    """
    per_sm = -(-ctas // _SMS)
    if per_sm > _MAX_CTAS_PER_SM:
        return cfg.max_concurrent_steps  # several waves whatever the depth
    bm = pallas_mosaic_gpu.block_m_for(m, cfg)
    steps = k // (cfg.split_k * cfg.block_k)
    for depth in range(cfg.max_concurrent_steps, 2, -1):  # 2: only by _in_flight_depth
        smem = pallas_mosaic_gpu.smem_bytes(bm, group_size, cfg, steps, depth)
        if per_sm * (smem + _SMEM_PER_CTA_EXTRA) <= _SMEM_PER_SM:
            return depth
    return cfg.max_concurrent_steps


def _in_flight_depth(ctas: int, m: int, group_size: int, cfg: pallas_mosaic_gpu.Config) -> int:
    """cfg's pipeline depth, cut (to no less than 2) until the copies in flight of all
    ``ctas`` CTAs stay within :data:`IN_FLIGHT_BYTES`; at M <= 16 where they are all
    resident at once, cfg's depth otherwise."""
    if IN_FLIGHT_BYTES is None or m > 16 or -(-ctas // _SMS) > _MAX_CTAS_PER_SM:
        return cfg.max_concurrent_steps
    step = pallas_mosaic_gpu.weight_bytes_per_step(group_size, cfg)
    depth = cfg.max_concurrent_steps
    while depth > 2 and ctas * depth * step > IN_FLIGHT_BYTES:
        depth -= 1
    return depth


def mosaic_config(
    device_kind: str, m: int, k: int, n: int, group_size: int
) -> pallas_mosaic_gpu.Config:
    """Heuristic Mosaic GPU config, from the H100 sweeps (docs/kernels.md, runs 8-20).

    64 weight rows per CTA everywhere (128 was 10-20% slower at M <= 16 and spills at
    M >= 128); K steps of 256 rows up to 16 tokens, 128 up to 64 (halves the x tile),
    256 above. How K is split depends on the number of 64-row tiles T = N / 64:

    * T >= 100: the in-kernel epilogue (``cluster_reduce``), no XLA pass after the
      kernel. One CTA per row tile for K = 4096; clusters of 2 along K (~4096 K rows per
      CTA) for K >= 8192 where T < 200 or M <= 16 (8192x57344 at M = 64 / 128: 1.88x /
      0.97x with clusters of 2, 2.00x / 1.28x without); larger clusters were slower
      everywhere (co-scheduling). The pipeline depth is cut so that all CTAs are
      resident at once where that is possible (``_one_wave_depth``).
    * T < 100 (N = 4096): too few row tiles to fill 132 SMs; 4 CTAs along K up to 16
      tokens, ~2048 K rows per CTA up to 64, the whole K above; the f32 partials are
      summed by XLA, or by the consumer (``partial_sums``). 4 splits at decode: the kernel
      alone at M = 1 (run 46, `pallas_kernels.epilogue_probe`) took 13.8 us on 14336x4096
      against 14.5 with 14 (~1024 K rows each), 16.2 with 7 and 17.6 with 2; on 4096x4096
      and 4096x6144 4 was within 2-4% of the best (5.9 / 7.8 us); and a consumer pays
      ~0.25 us per partial it adds (`add_rms_norm` at batch 1).

    Up to 16 tokens the depth is then cut, to no less than 2, until all CTAs' copies in
    flight fit :data:`IN_FLIGHT_BYTES` (``_in_flight_depth``): gate_up (448 CTAs) and
    qkv (384) run 2 deep, the 256-CTA layers keep 4. Where the part's
    :class:`DecodeChoices` ask for longer steps on the large weights up to 8 tokens (the
    H200: 512 K rows), gate_up and down_proj take them, and the cap makes both 2 deep.
    """
    block_k = 256 if m <= 16 or m > 64 else 128
    block_k = max(block_k, group_size)
    tiles = n // 64
    large_k = decode_choices(device_kind).large_block_k if m <= 8 and k * n >= _ASM_MIN_KN else 0

    def steps_of(split_k: int) -> int:  # K rows per step: the part's choice where it divides
        whole = large_k and k % (split_k * large_k) == 0 and large_k % group_size == 0
        return large_k if whole else block_k

    if tiles >= 100 and m <= pallas_mosaic_gpu.DEFAULT_MAX_BLOCK_M:  # one M tile
        split_k = 2 if k >= 8192 and (tiles < 200 or m <= 16) else 1
        if k % (split_k * block_k) == 0:
            cfg = pallas_mosaic_gpu.Config(
                block_n=64, block_k=steps_of(split_k), split_k=split_k, cluster_reduce=True
            )
            depth = _one_wave_depth(tiles * split_k, m, k, group_size, cfg)
            cfg = dataclasses.replace(cfg, max_concurrent_steps=depth)
            depth = _in_flight_depth(tiles * split_k, m, group_size, cfg)
            return dataclasses.replace(cfg, max_concurrent_steps=depth)
    split_k = 4 if m <= 16 else max(1, k // 2048) if m <= 64 else 1
    while split_k > 1 and k % (split_k * block_k):
        split_k -= 1
    cfg = pallas_mosaic_gpu.Config(block_n=64, block_k=steps_of(split_k), split_k=split_k)
    m_tiles = -(-m // pallas_mosaic_gpu.block_m_for(m, cfg))
    depth = _in_flight_depth(tiles * split_k * m_tiles, m, group_size, cfg)
    return dataclasses.replace(cfg, max_concurrent_steps=depth)


def mosaic_ws_config(
    device_kind: str, m: int, k: int, n: int, group_size: int
) -> pallas_mosaic_gpu_ws.Config:
    """Config of the warp-specialized kernel (H100 sweeps, docs/kernels.md runs 23-28).

    64 weight rows per consumer (128 per CTA).

    * Above 128 tokens, 256 tokens per CTA where that still makes about one wave of
      CTAs (best on all 8B shapes at M = 1024 and 4096; 128 x 128 was 3-10% slower), in
      groups of 8 token tiles per weight tile (4096x28672 at M = 1024: 313.5 us against
      336.2 going along N first), on a persistent grid (run 31: 3-7% faster on five of
      six cells, e.g. 4096x14336 at M = 4096 650.6 against 699.3 us; 5% slower on
      4096x28672 at 4096).
    * Else 128 tokens per CTA (M rounded up to 8 up to 64 tokens, with K steps of 256:
      3-8% faster than 128 at M = 64), and split-K doubled while the CTAs fit in half
      the SMs (N = 4096 at M = 128: 4 CTAs along K, 28.7 us on 14336x4096 against 84.1
      without).
    """
    del device_kind
    n_tiles = n // (2 * 64)
    if m > 128 and n_tiles * -(-m // 256) >= _SMS - _SMS // 32:  # >= 128 of 132 SMs
        block_k = _ws_block_k(k, 128, group_size)
        return pallas_mosaic_gpu_ws.Config(
            block_n=64, block_m=256, block_k=block_k, group_m=8, persistent=True
        )
    block_m = 128 if m > 64 else max(8, -(-m // 8) * 8)
    block_k = _ws_block_k(k, 128 if m > 64 else 256, group_size)  # x tile <= 32 KB
    ctas, split = n_tiles * -(-m // block_m), 1
    while 2 * ctas * split <= _SMS and k % (2 * split * block_k) == 0 and k // split >= 2048:
        # the next split still gives each CTA >= 1024 K rows
        split *= 2
    return pallas_mosaic_gpu_ws.Config(block_n=64, block_m=block_m, block_k=block_k, split_k=split)


def _ws_block_k(k: int, preferred: int, group_size: int) -> int:
    """``preferred`` K rows per step, or 128 where that does not divide K; the group size
    where it is larger. (Steps of 64 would fit SmolLM2's K = 576 but have never run on a
    GPU: such layers keep the decode kernel, see :func:`choose_implementation`.)"""
    for block_k in (preferred, 128):
        if block_k % group_size == 0 and k % block_k == 0:
            return block_k
    return max(preferred, group_size)
