"""The on-device layout of a grouped int4 weight, and the one-time repack into it.

AWQ stores ``W[K, N] = (q - z) * s`` with 4-bit codes ``q``, per-group integer zero
points ``z`` and scales ``s`` (one group = ``group_size`` consecutive rows of K). Every
format keeps the weight TRANSPOSED (K contiguous), two codes per byte, with the same
f16 scales and zero points; they differ in the order of the codes. The Triton kernel's
(``fmt="u4_split"``) splits each group by halves:

* ``q_nk2``: ``uint8 [N, K // 2]``. Byte ``j`` of group ``g`` in row ``n`` holds
  ``q[g*G + j, n]`` in its low nibble and ``q[g*G + G/2 + j, n]`` in its high nibble
  (``G`` = group_size, ``0 <= j < G/2``). K-contiguous rows give a kernel 16-byte
  loads of a ``[bn, G/2]`` tile, and the half split makes each nibble plane of a tile
  (``p & 0xF`` and ``p >> 4``) a contiguous K slice: a kernel never interleaves them,
  it runs one dot per plane against the matching half of x. Codes stay unsigned, so
  ``0x4300 | q`` is exactly the bf16 number ``128 + q`` (``0x6400 | q``: f16 1024 + q).
* Tiled (``tile_n > 0``, the default on GPU when 64 divides N): the same bytes
  reordered to ``q_packed: uint8 [N / tile_n, K / G, tile_n, G / 2]``, so the
  ``[tile_n, G/2]`` tile a kernel reads per group is ONE contiguous 4 KB block and a
  program streaming K reads one contiguous run. With the plain ``[N, K/2]`` order each
  step read 64 bytes from each of 64 rows 4 KB apart, and every Triton variant stalled
  at ~1.1 TB/s of HBM (DRAM page misses); Marlin pre-tiles for the same reason.
* ``scales_gn``: ``float16 [K // group_size, N]`` scale per (group, column): a kernel
  reads ``bn`` consecutive scales of one group in one coalesced load.
* ``zeros_gn``: ``float16 [K // group_size, N]`` the integer zero point ``z`` (0..15)
  as a float, exact in f16, so kernels can fold it without an int conversion.
  (A tiled ``u4_wgmma`` weight holds both tiled like its codes: ``[N / 128, K / 256,
  256 / G, 128]``; `Int4Weight.plain_scales` and `plain_zeros` give ``[K // G, N]``.)

* Signed (``fmt="s4"``, the Mosaic GPU backend's layout): ``q_packed`` is a plain
  ``jnp.int4 [N, K]`` array holding ``q - 8`` (XLA packs two per byte, element ``2i`` in
  the low nibble). Hopper's fast int4 -> bf16 conversion (PRMT/LOP3, as in CUTLASS) is
  for SIGNED nibbles, and TMA copies ``[block_n, block_k]`` boxes of it straight into
  swizzled shared memory, so no tiling is needed. The kernel adds ``8 - z`` per row.

* WGMMA-ordered (``fmt="u4_wgmma"``, the Mosaic kernel's fast dequantization; group
  sizes that are multiples of 128): ``q_packed`` is ``uint32 [N, K / 8]``, unsigned codes
  permuted within each 128-wide K chunk so that one thread of a wgmma warpgroup finds
  the weights it holds in the A-operand register layout (per row, the element pairs at
  columns ``8c + 2j, 8c + 2j + 1`` for its ``j = lane % 4``) in 4 consecutive words, and
  inside a word element pair ``p`` sits at nibbles ``p`` and ``p + 4``. Then
  ``(w >> 4p) & 0x000F000F | 0x43004300`` is a register of two bf16 numbers ``128 + q``
  with no shuffle or repack (the int4 trick of FasterTransformer / Marlin), and one
  packed subtraction of ``128 + z`` gives the exact ``q - z``: 1.5 instructions per
  weight against ~2.5 for the generic signed-int4 path. Tiled (``tile_n=128``, the
  default where 128 divides N and 256 divides K): the same words reordered to ``uint32
  [N / 128, K / 256, 128, 32]``, so the ``[64, 256]`` weight block a Mosaic decode
  kernel's pipeline step copies (64 rows of wgmma, 256 K rows) is ONE contiguous 8 KB
  run (the warp-specialized kernel's 128 rows: 16 KB), where the ``[N, K / 8]`` rows
  order (``tile_n=0``) has each step read 128 bytes from each of 64 rows ``K / 2``
  bytes apart. Inside a tile the order is the rows order's, so a step's block lands in
  shared memory exactly as before.

The nibble order of AWQ's own ``qweight`` checkpoints lives in ``convert/``; this module
starts from plain unpacked codes ``q_kn`` so it never needs to know it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_SUPPORTED_GROUP_SIZES_NOTE = "group_size must be even and divide K (e.g. 32, 64, 128)"
FORMATS = ("u4_split", "s4", "u4_wgmma")
WGMMA_CHUNK = 128  # K columns per permutation chunk of the u4_wgmma format
# The tiled u4_wgmma format's contiguous tile: 128 weight rows (the warp-specialized
# kernel's CTA, two decode CTAs) x 256 K rows (a pipeline step), 16 KB of words.
WGMMA_TILE_N, WGMMA_TILE_K = 128, 256
# Rows per gate/up block of a SwiGLU projection (`interleave_gate_up`): a wgmma
# accumulator thread holds rows r and r + 8 of every 16, so a gate row meets its up row.
SWIGLU_BLOCK = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Weight:
    """A grouped int4 weight in kernel layout (a JAX pytree; k, n, group_size static).

    ``W[k, n] = (q[k, n] - zeros_gn[g, n]) * scales_gn[g, n]``, ``g = k // group_size``,
    with ``q`` packed into ``q_packed`` as described in the module docstring: format
    ``fmt="u4_split"`` (Triton), ``"s4"`` or ``"u4_wgmma"`` (Mosaic GPU); the reference
    reads all three.
    """

    # u4_split: uint8 [N/tile_n, K/G, tile_n, G/2] (tiled) or [N, K/2]; s4: int4 [N, K];
    # u4_wgmma: uint32 [N/128, K/256, 128, 32] (tiled) or [N, K/8]
    q_packed: jax.Array
    # float16 [K // group_size, N]; tiled u4_wgmma: [N/128, K/256, 256/group_size, 128]
    scales_gn: jax.Array
    zeros_gn: jax.Array  # the same shape: integer zero points 0..15
    k: int = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    tile_n: int = dataclasses.field(default=0, metadata=dict(static=True))
    fmt: str = dataclasses.field(default="u4_split", metadata=dict(static=True))

    @property
    def num_groups(self) -> int:
        return self.k // self.group_size

    @property
    def q_nk2(self) -> jax.Array:
        """The packed codes in plain ``[N, K // 2]`` order (a transpose if tiled)."""
        if self.fmt in ("s4", "u4_wgmma"):
            return pack_codes(self.codes_nk().T, self.group_size)
        if not self.tile_n:
            return self.q_packed
        h = self.group_size // 2
        q = self.q_packed.transpose(0, 2, 1, 3)  # [N/tn, tn, K/G, h]
        return q.reshape(self.n, self.num_groups * h)

    @property
    def words_nk8(self) -> jax.Array:
        """``u4_wgmma``: the words in plain ``uint32 [N, K / 8]`` order (a transpose if tiled)."""
        if self.fmt != "u4_wgmma":
            raise ValueError(f"words_nk8 is the u4_wgmma format's, not {self.fmt!r}'s")
        return untile_wgmma(self.q_packed) if self.tile_n else self.q_packed

    @property
    def plain_scales(self) -> jax.Array:
        """The scales as ``float16 [K // group_size, N]`` (a transpose if tiled)."""
        return self._plain(self.scales_gn)

    @property
    def plain_zeros(self) -> jax.Array:
        """The zero points as ``float16 [K // group_size, N]`` (a transpose if tiled)."""
        return self._plain(self.zeros_gn)

    def _plain(self, a: jax.Array) -> jax.Array:
        return untile_groups(a) if self.fmt == "u4_wgmma" and self.tile_n else a

    def codes_nk(self) -> jax.Array:
        """The unsigned codes ``q`` as ``uint8 [N, K]``, whatever the format."""
        if self.fmt == "s4":
            return (self.q_packed.astype(jnp.int8) + 8).astype(jnp.uint8)
        if self.fmt == "u4_wgmma":
            return unpack_wgmma(self.words_nk8)
        return unpack_codes(self.q_nk2, self.group_size)

    @property
    def nbytes(self) -> int:
        """Device bytes of the weight: packed codes plus f16 scales and zeros."""
        return self.k * self.n // 2 + 2 * 2 * self.num_groups * self.n


def interleave_gate_up(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``[..., F]`` gate and up columns -> ``[..., 2F]`` in alternating blocks of
    :data:`SWIGLU_BLOCK`: columns ``16 i + r`` = gate ``8 i + r``, ``16 i + 8 + r`` = up
    ``8 i + r``. The layout `int4_matmul(..., epilogue="swiglu")` reads (codes, scales and
    zero points alike: any array whose last axis is the output one)."""
    if gate.shape != up.shape or gate.shape[-1] % SWIGLU_BLOCK:
        raise ValueError(
            f"gate and up must have one shape with a last axis a multiple of {SWIGLU_BLOCK}; "
            f"got {gate.shape} and {up.shape}"
        )
    blocks = (*gate.shape[:-1], gate.shape[-1] // SWIGLU_BLOCK, 1, SWIGLU_BLOCK)
    pair = jnp.concatenate([gate.reshape(blocks), up.reshape(blocks)], axis=-2)
    return pair.reshape(*gate.shape[:-1], 2 * gate.shape[-1])


def is_hopper(device_kind: str) -> bool:
    """Whether a device kind is a Hopper GPU (wgmma + TMA: the Mosaic GPU kernel)."""
    return device_kind.startswith("NVIDIA") and any(
        name in device_kind for name in ("H100", "H200", "H800", "H20")
    )


def format_for(implementation: str | None, k: int, group_size: int) -> str:
    """The format :func:`prepare_weight` writes for a backend (None: the default device's).

    ``"mosaic"`` and ``"mosaic_ws"``: ``"u4_wgmma"`` where the group size and K are
    multiples of 128 (its fast dequantization; 8-10% faster than ``s4`` on the H100,
    docs/kernels.md run 12), else ``"s4"``. ``"triton"``: ``"u4_split"``. None or
    ``"xla"``: Mosaic's format on a Hopper GPU, else ``"u4_split"`` (the Triton kernel's,
    and the cheaper one for the reference on CPU/TPU).
    """
    if implementation in ("mosaic", "mosaic_ws"):
        return "u4_wgmma" if k % WGMMA_CHUNK == 0 == group_size % WGMMA_CHUNK else "s4"
    if implementation == "triton":
        return "u4_split"
    dev = jax.devices()[0]
    if dev.platform == "gpu" and is_hopper(dev.device_kind):
        return format_for("mosaic", k, group_size)
    return "u4_split"


def check_group_size(k: int, group_size: int) -> None:
    """Raises ValueError unless ``group_size`` is a usable group size for ``k`` rows."""
    if group_size <= 0 or group_size % 2 or k % group_size:
        raise ValueError(f"{_SUPPORTED_GROUP_SIZES_NOTE}; got {group_size=} for K={k}")


def pack_codes(q_kn: jax.Array, group_size: int) -> jax.Array:
    """uint8 codes ``[K, N]`` -> packed ``uint8 [N, K // 2]`` (half split per group)."""
    k, n = q_kn.shape
    h = group_size // 2
    q_ngs = q_kn.astype(jnp.uint8).T.reshape(n, k // group_size, 2, h)
    packed = q_ngs[:, :, 0, :] | (q_ngs[:, :, 1, :] << 4)  # [N, G, h]
    return packed.reshape(n, k // 2)


def unpack_codes(q_nk2: jax.Array, group_size: int) -> jax.Array:
    """Inverse of :func:`pack_codes`, but transposed: returns uint8 codes ``[N, K]``."""
    n, k2 = q_nk2.shape
    h = group_size // 2
    p = q_nk2.reshape(n, k2 // h, 1, h)
    return jnp.concatenate([p & 0xF, p >> 4], axis=2).reshape(n, 2 * k2)


def wgmma_order() -> tuple[list[int], list[int]]:
    """(word, nibble) -> K column within a 128 chunk, as two flat lists of 128 entries.

    Word ``4j + v`` (``j`` = lane % 4, ``v`` = 0..3) nibble ``t`` holds column
    ``8 (4v + t % 4) + 2j + t // 4``: pair ``p = t % 4`` of column block ``4v + p``,
    its first element in nibble ``p`` and its second in nibble ``p + 4``.
    """
    cols = []
    for word in range(16):
        j, v = divmod(word, 4)
        for t in range(8):
            cols.append(8 * (4 * v + t % 4) + 2 * j + t // 4)
    return cols, sorted(range(128), key=cols.__getitem__)


def pack_wgmma(q_nk: jax.Array) -> jax.Array:
    """uint8 codes ``[N, K]`` -> ``uint32 [N, K / 8]`` in the u4_wgmma order."""
    n, k = q_nk.shape
    cols, _ = wgmma_order()
    q = q_nk.reshape(n, k // WGMMA_CHUNK, WGMMA_CHUNK)[:, :, jnp.asarray(cols)]
    q = q.reshape(n, k // 8, 8).astype(jnp.uint32)
    return sum((q[:, :, t] << (4 * t)) for t in range(8)).astype(jnp.uint32)


def stored_codes_wgmma(q_words: jax.Array) -> jax.Array:
    """u4_wgmma words -> ``uint4 [N, K]`` codes in their STORED column order (nibble t of
    word i is column ``8i + t``): a bitcast, no arithmetic."""
    n, k8 = q_words.shape
    return jax.lax.bitcast_convert_type(q_words, jnp.uint4).reshape(n, 8 * k8)


def unpack_wgmma(q_words: jax.Array) -> jax.Array:
    """Inverse of :func:`pack_wgmma`: uint8 codes ``[N, K]``."""
    n, k8 = q_words.shape
    _, inverse = wgmma_order()
    q = stored_codes_wgmma(q_words).reshape(n, k8 // 16, WGMMA_CHUNK)[:, :, jnp.asarray(inverse)]
    return q.reshape(n, 8 * k8).astype(jnp.uint8)


def tile_wgmma(words_nk8: jax.Array) -> jax.Array:
    """u4_wgmma words ``[N, K / 8]`` -> tiled ``[N / 128, K / 256, 128, 32]``."""
    n, k8 = words_nk8.shape
    tk = WGMMA_TILE_K // 8
    return words_nk8.reshape(n // WGMMA_TILE_N, WGMMA_TILE_N, k8 // tk, tk).transpose(0, 2, 1, 3)


def untile_wgmma(tiles: jax.Array) -> jax.Array:
    """Inverse of :func:`tile_wgmma`: ``[N, K / 8]`` words."""
    nt, kt, tn, tk = tiles.shape
    return tiles.transpose(0, 2, 1, 3).reshape(nt * tn, kt * tk)


def tile_groups(a_gn: jax.Array, group_size: int) -> jax.Array:
    """Scales or zero points ``[K / G, N]`` -> tiled ``[N / 128, K / 256, 256 / G, 128]``:
    the groups of each 128 x 256 weight tile in one contiguous block."""
    gk, n = a_gn.shape
    per = WGMMA_TILE_K // group_size
    return a_gn.reshape(gk // per, per, n // WGMMA_TILE_N, WGMMA_TILE_N).transpose(2, 0, 1, 3)


def untile_groups(tiles: jax.Array) -> jax.Array:
    """Inverse of :func:`tile_groups`: ``[K / G, N]``."""
    nt, kt, per, tn = tiles.shape
    return tiles.transpose(1, 2, 0, 3).reshape(kt * per, nt * tn)


def wgmma_tileable(k: int, n: int, group_size: int) -> bool:
    """Whether a ``[K, N]`` u4_wgmma weight cuts into the tiled format's tiles (its
    groups too: G divides 256)."""
    return n % WGMMA_TILE_N == 0 and k % WGMMA_TILE_K == 0 and WGMMA_TILE_K % group_size == 0


def tile_codes(q_nk2: jax.Array, group_size: int, tile_n: int) -> jax.Array:
    """Plain ``[N, K // 2]`` packed codes -> tiled ``[N/tile_n, K/G, tile_n, G/2]``."""
    n, k2 = q_nk2.shape
    h = group_size // 2
    return q_nk2.reshape(n // tile_n, tile_n, k2 // h, h).transpose(0, 2, 1, 3)


def prepare_weight(
    q_kn: jax.Array,
    scales_gn: jax.Array,
    zeros_gn: jax.Array,
    *,
    group_size: int,
    tile_n: int | None = None,
    fmt: str | None = None,
) -> Int4Weight:
    """Repacks unpacked AWQ-style codes into the kernel layout (once, at load time).

    Args:
      q_kn: uint8 ``[K, N]`` codes in ``[0, 16)``.
      scales_gn: float ``[K // group_size, N]`` scales (f16, bf16 or f32; stored as f16).
      zeros_gn: uint8 ``[K // group_size, N]`` integer zero points in ``[0, 16)``.
      group_size: rows of K that share one scale and zero point.
      tile_n: columns per contiguous tile (see the module docstring). ``u4_split``: None
        picks 64 when the default backend is a GPU and 64 divides N, else the plain
        order (0), which every backend accepts (the CPU reference then skips a
        transpose). ``u4_wgmma``: 128 (tiles of 128 x 256) or 0 (rows); None picks
        128 where the shape cuts into tiles (`wgmma_tileable`). Ignored by ``s4``.
      fmt: ``"u4_split"`` (the Triton kernel's layout), ``"s4"`` or ``"u4_wgmma"``
        (Mosaic GPU's); None: ``format_for(None, K, group_size)``.

    Returns:
      The weight as an :class:`Int4Weight` pytree. Pure jnp: jit it or run it on CPU.
    """
    q_kn, scales_gn, zeros_gn = (jnp.asarray(a) for a in (q_kn, scales_gn, zeros_gn))
    k, n = q_kn.shape
    check_group_size(k, group_size)
    g = k // group_size
    if scales_gn.shape != (g, n) or zeros_gn.shape != (g, n):
        raise ValueError(
            f"scales/zeros must be [K//group_size, N] = {(g, n)}; "
            f"got {scales_gn.shape} and {zeros_gn.shape}"
        )
    fmt = fmt or format_for(None, k, group_size)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}; got {fmt!r}")
    if fmt == "u4_wgmma":
        if group_size % WGMMA_CHUNK or k % WGMMA_CHUNK:
            raise ValueError(f"fmt='u4_wgmma' needs group_size and K multiples of {WGMMA_CHUNK}")
        if tile_n is None:
            tile_n = WGMMA_TILE_N if wgmma_tileable(k, n, group_size) else 0
        if tile_n not in (0, WGMMA_TILE_N) or (tile_n and not wgmma_tileable(k, n, group_size)):
            raise ValueError(
                f"a u4_wgmma weight is tiled {WGMMA_TILE_N} x {WGMMA_TILE_K} (tile_n="
                f"{WGMMA_TILE_N}, N and K multiples of those, group_size dividing "
                f"{WGMMA_TILE_K}) or not (0); got {tile_n=} for K={k}, N={n}, {group_size=}"
            )
        q_packed = pack_wgmma(q_kn.T.astype(jnp.uint8))
        if tile_n:
            q_packed = tile_wgmma(q_packed)
            scales_gn = tile_groups(scales_gn, group_size)
            zeros_gn = tile_groups(zeros_gn, group_size)
    elif fmt == "s4":
        tile_n, q_packed = 0, (q_kn.T.astype(jnp.int8) - 8).astype(jnp.int4)
    else:
        if tile_n is None:
            tile_n = 64 if n % 64 == 0 and jax.default_backend() == "gpu" else 0
        if tile_n and n % tile_n:
            raise ValueError(f"tile_n={tile_n} must divide N={n}")
        q_packed = pack_codes(q_kn, group_size)
        q_packed = tile_codes(q_packed, group_size, tile_n) if tile_n else q_packed
    return Int4Weight(
        q_packed=q_packed,
        scales_gn=scales_gn.astype(jnp.float16),
        zeros_gn=zeros_gn.astype(jnp.float16),
        k=k,
        n=n,
        group_size=group_size,
        tile_n=tile_n,
        fmt=fmt,
    )
