"""Decode attention: one query position per sequence over the KV cache, as a Pallas-Triton kernel.

    out_bnh = decode_attention(q_bnh, k_bskh, v_bskh, valid_bs, scale=h**-0.5)
    out_bnh, k_bskh, v_bskh = decode_attention_update(
        q_bnh, k_new_bkh, v_new_bkh, k_bskh, v_bskh, index, valid_bs, scale=h**-0.5
    )  # also writes this step's key and value into the cache at ``index``
    out_bnh, k_bskh, v_bskh = decode_attention_update_qkv(
        qkv_bf, cos_bh, sin_bh, k_bskh, v_bskh, index, valid_bs,
        num_heads=n, num_kv_heads=k, scale=h**-0.5,
    )  # the same from the fused q/k/v projection: split into heads and RoPE in the kernel

``q_bnh`` is the query after RoPE, N = K * G heads (query head n reads kv head n // G, as
the model's ``[B, T, K, G, H]`` reshape says); the caches are ``[B, S, K, H]`` exactly as
the model stores them; ``valid_bs`` marks the keys the query may see (the caller folds
causality, left padding and a sliding window into it).

Why a kernel: XLA runs batch-1 decode attention as ~8 kernels per layer (QK^T and PV as
two cuBLAS GEMMs, softmax reductions and converts between them, one dynamic_update_slice
fusion per cache), each costing 1.3-2.6 us whatever its size
(docs/benchmarks/decode-profile-h100.md). This is one launch, with or without a split of S.

Why not jax's ``pallas.ops.gpu.decode_attention.gqa``: it wants the cache as
``[B, K, S, H]``, a transpose of ours (a full copy of every layer's cache per decode
step); it takes a start and a length instead of a mask (ours folds left padding, the
causal limit and a sliding window); and it combines its split partials with XLA ops
behind an optimization barrier.

The kernel: grid ``(B, K, splits)``. A program loads its kv head's G queries once
(padded to 16 rows: Triton's dots need 16), streams its share of the keys in blocks of
``block_s`` rows straight out of ``[B, S, K, H]`` (a key row is H contiguous elements),
and keeps an online softmax in f32: scores ``q k^T * scale``, exponentials relative to
the running maximum, P rounded to the cache dtype for the PV dot (as flash attention
does). Masked keys are never read: the caller's mask is the load mask, so cache slots
not written yet and keys outside a sliding window cost no bandwidth. With one split the
program writes the normalized output; with several, each writes f32 partials
(unnormalized sum, maximum, denominator) and counts itself in an int32 counter of its
(sequence, kv head) with an atomic add (acquire-release, GPU scope, after a CTA barrier
so that all its warps' stores come first); the program that arrives last, whichever
split it is, merges the splits in order and sets the counter back to zero, so the
result does not depend on which one that is. Until run 93 a second kernel, grid
``(B, K)``, did that merge: ~1.8 us a layer on the H100. The counters are the caller's
(``counter=``; the model keeps them beside the KV cache, `awq_jax.model.init_cache`),
else a fresh zero array per call. S need not be a multiple of anything: the tail block is
a masked load.

A row with no valid key gives zeros (the XLA path, which masks with ``finfo.min``,
would average all values uniformly). The model never asks for one: a decode query
always sees its own key.

`decode_attention_update` aliases the caches in and out of the kernel
(``input_output_aliases``): the program whose key range holds ``index`` stores the new
key and value rows, and every program uses the new rows from registers at that position,
so no program waits on another's write. This removes the two dynamic_update_slice
kernels per layer; like ``lax.dynamic_update_slice``, ``index`` is clamped into the cache.
A decode step's query never sees a key after its own position, so the update kernels
attend to none (the reference masks them too) and their loop stops at the block holding
``index``: the splits of a cache sized for the whole generation that lie ahead of the
step exit at once.

`decode_attention_update_qkv` takes the fused projection's output row as it is: a
program loads its G query heads, its kv head's new key and value from it and applies
RoPE to the queries and the key (`apply_rope`'s arithmetic, in the input dtype; the
rotate-half is a second load with the halves' columns swapped, Triton having no
concatenate). Done by XLA, RoPE was two fusions per layer whose outputs a Pallas call
needs materialized: ~2.3 us a layer on an H100 (2,800 -> 2,728 us per decoded token,
docs/benchmarks/decode-profile-h100.md). The attention loop is the same kernel body;
only its prologue differs.

The projection may also come as ``[P, B, (N + 2K) * H]``: the split-K partial sums of
the int4 matmul, which at batch-1 decode would otherwise cost an XLA kernel of their own
to sum (~1.3 us). Every load from it then loads the P rows and sums them as
`pallas_kernels.norm.sum_partials` does: in float32, p = 0..P-1 in order, rounded to
the cache's dtype (what the matmul would have returned).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import api
from pallas_kernels.norm import sum_partials

__all__ = [
    "Config",
    "apply_rope",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_update",
    "decode_attention_update_qkv",
    "decode_attention_update_reference",
    "default_config",
    "split_qkv_heads",
]

# Triton's dots need every dimension >= 16: the G query rows of a kv head are padded.
MIN_DOT = 16
# The heuristic aims for this many programs (about two per SM of a 132-SM H100) ...
TARGET_PROGRAMS = 256
# ... but gives no split fewer keys than this (a split costs a partial write and a read).
MIN_KEYS_PER_SPLIT = 256
# Up to this many programs without splits, steps of 128 keys instead of 64.
FEW_PROGRAMS = 64
# Up to this many programs (batch 1 of 8 kv heads) short caches still split this many
# ways, down to blocks of 64 keys: decode steps stop at their own position, so the
# splits past it cost one early exit each. At S = 384 that is 6 splits of one 64-key
# block each (run 105: 431.2 tok/s against 4 splits' 425.7-426.1; 12 splits 424.3).
BATCH1_PROGRAMS, BATCH1_SPLITS = 8, 8
# Shared memory the loop's pipelined K and V blocks may take (H100: 227 KB per block):
# num_stages x 2 x block_s x H x itemsize. bf16 at H = 128 fits 128-key blocks, f32 64.
SMEM_BUDGET = 200 * 1024


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch parameters of the decode-attention kernel.

    block_s: keys per loop step (a power of 2 >= 16).
    splits: programs along S per (sequence, kv head); > 1: the last to finish merges them.
      Rounded down where the last splits would get no key.
    """

    block_s: int = 64
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3


def default_config(batch: int, kv_heads: int, seq: int) -> Config:
    """Enough programs to fill the GPU at small batch, without splits of few keys; few
    unsplit programs step 128 keys at a time.

    Fitted to the H100 sweep (run 39, docs/benchmarks/decode-kernels-h100.md; 8 kv
    heads, us): batch 8 takes 4 splits (S = 2048 / 4096: 28.3 / 50.0 against 30.7 /
    56.2 with 2), batch 1 at 2048 / 4096 8 / 16 splits, batch 32 none (its 256 programs
    fill the GPU; 128-key steps were slower there: 22.9 against 19.9 at S = 384). Batch 1
    at S = 384 (run 50, in the 8B-shaped int4 generate loop, 128 + 256 tokens): 4 splits
    of 64-key steps 387.5 tok/s, 2 splits 380.6, one split of 128-key steps 374.8-376.3;
    run 105 (the same loop, 425.7-426.1 tok/s at 4 splits): 6 or 8 splits 431.2, 12 splits
    424.3, so a batch-1 split holds one 64-key step where the cache allows.
    """
    programs = batch * kv_heads
    splits = min(max(1, TARGET_PROGRAMS // programs), max(1, seq // MIN_KEYS_PER_SPLIT))
    if programs <= BATCH1_PROGRAMS:
        splits = max(splits, min(BATCH1_SPLITS, seq // 64))
    block_s = 128 if splits == 1 and programs <= FEW_PROGRAMS else 64
    return Config(block_s=block_s, splits=splits)


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _check_shapes(q_bnh, k_bskh, v_bskh, valid_bs) -> tuple[int, int, int, int, int]:
    """(B, S, K, G, H) of the inputs; ValueError where they do not fit together."""
    if q_bnh.ndim != 3 or k_bskh.ndim != 4:
        raise ValueError(
            f"q must be [B, N, H] and k [B, S, K, H]; got {q_bnh.shape}, {k_bskh.shape}"
        )
    b, n, h = q_bnh.shape
    _, s, kh, _ = k_bskh.shape
    if k_bskh.shape != (b, s, kh, h) or v_bskh.shape != k_bskh.shape:
        raise ValueError(
            f"k and v must be [B={b}, S, K, H={h}] alike; got {k_bskh.shape}, {v_bskh.shape}"
        )
    if n % kh:
        raise ValueError(f"{n} query heads do not group over {kh} kv heads")
    if valid_bs.shape != (b, s):
        raise ValueError(f"valid must be [B, S] = {(b, s)}; got {valid_bs.shape}")
    return b, s, kh, n // kh, h


def _check_counter(counter: jax.Array | None, b: int, kh: int) -> None:
    if counter is not None and (counter.shape != (b, kh) or counter.dtype != jnp.int32):
        raise ValueError(
            f"counter must be [B, K] = {(b, kh)} int32 (zeros); got {counter.shape} {counter.dtype}"
        )


# ----------------------------------------------------------------------------- reference


def decode_attention_reference(
    q_bnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, valid_bs: jax.Array, *, scale: float
) -> jax.Array:
    """The spec in jnp (the CPU/TPU path): the model's attention for one query position.

    f32 scores, masked softmax, probabilities rounded to v's dtype before the PV product,
    output in q's dtype; zeros where a row has no valid key.
    """
    b, _, kh, g, h = _check_shapes(q_bnh, k_bskh, v_bskh, valid_bs)
    q_bkgh = q_bnh.reshape(b, kh, g, h)
    logits = (
        jnp.einsum(
            "BKGH,BSKH->BKGS",
            q_bkgh,
            k_bskh.astype(q_bnh.dtype),
            preferred_element_type=jnp.float32,
        )
        * scale
    )
    # 0 for masked keys, so a row with no valid key is all zeros.
    probs = jax.nn.softmax(logits, axis=-1, where=valid_bs.astype(bool)[:, None, None, :])
    probs = probs.astype(v_bskh.dtype)
    out_bkgh = jnp.einsum("BKGS,BSKH->BKGH", probs, v_bskh)
    return out_bkgh.reshape(b, kh * g, h).astype(q_bnh.dtype)


def _write_step(k_bskh, v_bskh, k_new_bkh, v_new_bkh, index):
    start = (0, index, 0, 0)
    k_bskh = jax.lax.dynamic_update_slice(k_bskh, k_new_bkh[:, None].astype(k_bskh.dtype), start)
    v_bskh = jax.lax.dynamic_update_slice(v_bskh, v_new_bkh[:, None].astype(v_bskh.dtype), start)
    return k_bskh, v_bskh


def decode_attention_update_reference(
    q_bnh, k_new_bkh, v_new_bkh, k_bskh, v_bskh, index, valid_bs, *, scale: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes the step's key/value at ``index`` (dynamic_update_slice, which clamps it),
    then attends to the valid keys at positions ``<= index``: a decode step's query never
    sees later keys (the model's causal mask says the same), so the kernel stops there."""
    k_bskh, v_bskh = _write_step(k_bskh, v_bskh, k_new_bkh, v_new_bkh, index)
    s = k_bskh.shape[1]
    causal = jnp.arange(s) <= jnp.clip(index, 0, s - 1)
    valid_bs = valid_bs.astype(bool) & causal[None, :]
    out = decode_attention_reference(q_bnh, k_bskh, v_bskh, valid_bs, scale=scale)
    return out, k_bskh, v_bskh


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE, Hugging Face's rotate-half convention: ``x * cos + rotate_half(x) * sin`` with
    cos and sin (broadcast against ``x [..., H]``) cast to x's dtype first, so the
    arithmetic is x's dtype; ``rotate_half(x) = concat([-x2, x1])`` of x's halves.

    The model's RoPE (``awq_jax.model``), and what the "qkv" kernel computes.
    """
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def split_qkv_heads(
    qkv_bf: jax.Array, cos_bh: jax.Array, sin_bh: jax.Array, *, num_heads: int, num_kv_heads: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(q_bnh, k_bkh, v_bkh)`` of a packed projection row (see
    :func:`decode_attention_update_qkv`), RoPE applied to q and k."""
    b, h = cos_bh.shape
    nq, nk = num_heads, num_kv_heads
    q, k, v = jnp.split(qkv_bf, [nq * h, (nq + nk) * h], axis=-1)
    cos, sin = cos_bh[:, None], sin_bh[:, None]
    q_bnh = apply_rope(q.reshape(b, nq, h), cos, sin)
    k_bkh = apply_rope(k.reshape(b, nk, h), cos, sin)
    return q_bnh, k_bkh, v.reshape(b, nk, h)


# ----------------------------------------------------------------------------- kernels


def _load_heads(ref, b, heads, mask=None, *, dtype=None, swap_halves: bool = False):
    """``ref[b, heads, :]`` of a ``[B, heads, H]`` ref, ``[*heads.shape, H]``; of a
    ``[P, B, heads, H]`` ref of partial sums, their `sum_partials` rounded to ``dtype``.
    With ``swap_halves`` each head's halves trade places (``concat([x2, x1])``, by index
    arithmetic: Triton has no concatenate)."""
    h = ref.shape[-1]
    cols = jnp.arange(h)
    if swap_halves:
        cols = (cols + h // 2) % h
    cols = cols.reshape((1,) * heads.ndim + (h,))
    other = None if mask is None else 0
    at = (b, heads[..., None], cols)
    if ref.ndim == 3:
        return pltriton.load(ref.at[at], mask=mask, other=other)
    parts = [pltriton.load(ref.at[(p, *at)], mask=mask, other=other) for p in range(ref.shape[0])]
    return sum_partials(parts, dtype)


def _load_roped(ref, b, heads, cos, sin, mask=None, *, dtype=None):
    """Heads as `_load_heads`, RoPE applied with `apply_rope`'s arithmetic: cos and sin
    cast to x's dtype, then ``x * cos + rotate_half(x) * sin`` in that dtype."""
    x = _load_heads(ref, b, heads, mask, dtype=dtype)
    x_swapped = _load_heads(ref, b, heads, mask, dtype=dtype, swap_halves=True)
    first_half = jnp.arange(x.shape[-1]) < x.shape[-1] // 2
    rotated = jnp.where(first_half, -x_swapped, x_swapped)  # concat([-x2, x1])
    return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


def _attention_kernel(
    q_ref,
    k_ref,
    v_ref,
    valid_ref,
    *refs,
    g: int,
    block_g: int,
    seq: int,
    keys_per_split: int,
    scale: float,
    cfg: Config,
    source: str,
    interpret: bool,
):
    """One (sequence, kv head, split): online softmax over ``keys_per_split`` keys.

    ``source`` (static) says where the queries and the step's new rows come from; only
    this prologue depends on it. "attend": ``q_ref`` ``[B, N, H]``, no new rows;
    "update": ``q_ref`` and the new rows ``[B, K, H]``; "qkv": ``q_ref`` is the packed
    projection ``[B, N + 2K, H]`` (q heads, k heads, v heads) or P partial sums of it
    ``[P, B, N + 2K, H]`` (summed to the cache's dtype) with cos/sin ``[B, H]``: q and
    the new key are roped here.
    """
    b, kh, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    if cfg.splits > 1:  # the counters' input; the kernel uses their (aliased) output
        _, *refs = refs
    kv_heads = k_ref.shape[2]
    rows = pl.ds(0, block_g)
    row_ok = jnp.arange(block_g) < g
    heads = kh * g + jnp.arange(block_g)  # this kv head's query heads
    if source == "qkv":
        cos_ref, sin_ref, index_ref, k_out_ref, v_out_ref, *out_refs = refs
        cos, sin = cos_ref[b, :], sin_ref[b, :]  # [H] f32
        dtype = k_ref.dtype  # of the heads summed from partials
        q = _load_roped(q_ref, b, heads, cos, sin, row_ok[:, None], dtype=dtype)  # [bg, H]
        k_head = kv_heads * g + kh  # after the N query heads
        k_new = _load_roped(q_ref, b, k_head, cos, sin, dtype=dtype)  # [H]
        v_new = _load_heads(q_ref, b, k_head + kv_heads, dtype=dtype)
    else:
        q = _load_heads(q_ref, b, heads, row_ok[:, None])
        out_refs = refs
        if source == "update":
            k_new_ref, v_new_ref, index_ref, k_out_ref, v_out_ref, *out_refs = refs
            k_new, v_new = k_new_ref[b, kh, :], v_new_ref[b, kh, :]
    update = source != "attend"
    bs = cfg.block_s
    h = q.shape[-1]
    first = split * keys_per_split
    if update:
        index = jnp.clip(index_ref[0], 0, seq - 1)

        @pl.when((index >= first) & (index < first + keys_per_split))
        def _():
            pltriton.store(k_out_ref.at[b, index, kh, :], k_new)
            pltriton.store(v_out_ref.at[b, index, kh, :], v_new)

    def body(i, carry):
        acc, m, l = carry  # [bg, H] f32, [bg] running max, [bg] running denominator
        start = first + i * bs
        keys = start + jnp.arange(bs)
        ok = pltriton.load(valid_ref.at[b, pl.ds(start, bs)], mask=keys < seq, other=0)
        ok = (ok != 0) & (keys < seq)
        if update:  # causal: nothing after the step's own position
            ok &= keys <= index
        k = pltriton.load(k_ref.at[b, pl.ds(start, bs), kh, :], mask=ok[:, None], other=0)
        v = pltriton.load(v_ref.at[b, pl.ds(start, bs), kh, :], mask=ok[:, None], other=0)
        if update:
            here = (keys == index)[:, None]
            k = jnp.where(here, k_new[None, :], k)
            v = jnp.where(here, v_new[None, :], v)
        # HIGHEST: f32 inputs as IEEE f32, not TF32 (no effect on bf16 / f16 inputs).
        s = jax.lax.dot_general(
            q,
            k,
            (((1,), (1,)), ((), ())),
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )  # [bg, bs]
        s = jnp.where(ok[None, :], s * scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key yet: exp(-inf - 0) = 0
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        pv = jax.lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )  # [bg, H]
        return alpha[:, None] * acc + pv, m_new, alpha * l + jnp.sum(p, axis=1)

    init = (
        jnp.zeros((block_g, h), jnp.float32),
        jnp.full((block_g,), -jnp.inf, jnp.float32),
        jnp.zeros((block_g,), jnp.float32),
    )
    steps = keys_per_split // bs
    if update:  # only the blocks up to the step's position: at batch-1 decode the loop
        # is most of the kernel, and a cache sized for the whole generation is mostly ahead
        steps = jnp.clip(pl.cdiv(index + 1 - first, bs), 0, steps)
    acc, m, l = jax.lax.fori_loop(0, steps, body, init)
    if cfg.splits == 1:
        (o_ref,) = out_refs
        out = acc / jnp.where(l > 0, l, 1.0)[:, None]
        pltriton.store(o_ref.at[b, kh, rows, :], out.astype(o_ref.dtype), mask=row_ok[:, None])
        return
    o_ref, m_out_ref, l_out_ref, out_ref, count_ref = out_refs
    pltriton.store(o_ref.at[b, kh, split, rows, :], acc, mask=row_ok[:, None])
    pltriton.store(m_out_ref.at[b, kh, split, rows], m, mask=row_ok)
    pltriton.store(l_out_ref.at[b, kh, split, rows], l, mask=row_ok)
    # Every warp's partial stores precede this program's arrival, which releases them at
    # GPU scope; the program that arrives last (whichever split it is) acquires all the
    # others', merges the splits in order 0..splits-1 and sets the counter back to zero.
    if not interpret:  # (the interpreter runs one program at a time and has no barrier)
        pltriton.debug_barrier()
    arrived = pltriton.atomic_add(count_ref, (b, kh), jnp.array(1, jnp.int32))

    @pl.when(arrived == cfg.splits - 1)
    def _():
        out = _merge_splits(o_ref, m_out_ref, l_out_ref, b, kh, row_ok, cfg.splits)
        pltriton.store(out_ref.at[b, kh, rows, :], out.astype(out_ref.dtype), mask=row_ok[:, None])
        pltriton.store(count_ref.at[b, kh], jnp.int32(0))


def _merge_splits(o_ref, m_ref, l_ref, b, kh, row_ok, splits: int) -> jax.Array:
    """``[block_g, H]`` f32: the splits' partials of (sequence, kv head) merged by their
    maxima, in split order. The loads bypass the L1 (other programs wrote them)."""
    block_g, h = row_ok.shape[0], o_ref.shape[-1]
    rows = pl.ds(0, block_g)

    load = functools.partial(pltriton.load, volatile=True)

    def body(j, carry):
        acc, m, l = carry
        m_j = load(m_ref.at[b, kh, j, rows], mask=row_ok, other=-jnp.inf)
        l_j = load(l_ref.at[b, kh, j, rows], mask=row_ok, other=0)
        o_j = load(o_ref.at[b, kh, j, rows, :], mask=row_ok[:, None], other=0)
        m_new = jnp.maximum(m, m_j)
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        a, c = jnp.exp(m - m_safe), jnp.exp(m_j - m_safe)
        return a[:, None] * acc + c[:, None] * o_j, m_new, a * l + c * l_j

    init = (
        jnp.zeros((block_g, h), jnp.float32),
        jnp.full((block_g,), -jnp.inf, jnp.float32),
        jnp.zeros((block_g,), jnp.float32),
    )
    acc, _, l = jax.lax.fori_loop(0, splits, body, init)
    return acc / jnp.where(l > 0, l, 1.0)[:, None]


def _block_bytes(cfg: Config, h: int, itemsize: int) -> int:
    return cfg.num_stages * 2 * cfg.block_s * h * itemsize


def fit_config(cfg: Config, seq: int, h: int, itemsize: int) -> Config:
    """``cfg`` with ``block_s`` no longer than a split's keys need (>= 16) and halved
    until the pipelined blocks fit :data:`SMEM_BUDGET` (the default config is sized for
    bf16; f32 caches of 128-wide heads need half the keys per block)."""
    per = pl.cdiv(seq, cfg.splits)
    bs = min(cfg.block_s, max(MIN_DOT, pl.next_power_of_2(per)))
    cfg = dataclasses.replace(cfg, block_s=bs)
    while cfg.block_s > MIN_DOT and _block_bytes(cfg, h, itemsize) > SMEM_BUDGET:
        cfg = dataclasses.replace(cfg, block_s=cfg.block_s // 2)
    return cfg


def check_supported(q_bnh, k_bskh, v_bskh, cfg: Config) -> None:
    """Raises NotImplementedError for inputs or configs the kernel cannot run."""
    h = q_bnh.shape[-1]
    problems = []
    if _block_bytes(cfg, h, k_bskh.dtype.itemsize) > SMEM_BUDGET:
        problems.append(
            f"{cfg.num_stages} stages of {cfg.block_s}-key K and V blocks of {h} x "
            f"{k_bskh.dtype} need more than {SMEM_BUDGET} bytes of shared memory"
        )
    if not (_is_pow2(h) and h >= MIN_DOT):
        problems.append(f"head_dim={h} must be a power of 2 >= {MIN_DOT}")
    if not (_is_pow2(cfg.block_s) and cfg.block_s >= MIN_DOT):
        problems.append(f"block_s={cfg.block_s} must be a power of 2 >= {MIN_DOT}")
    if cfg.splits < 1:
        problems.append(f"splits={cfg.splits} must be >= 1")
    if not (k_bskh.dtype == v_bskh.dtype == q_bnh.dtype):
        problems.append(
            f"q, k, v must share a dtype; got {q_bnh.dtype}, {k_bskh.dtype}, {v_bskh.dtype}"
        )
    if q_bnh.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        problems.append(f"dtype {q_bnh.dtype} is not a float the dots take")
    if 0 in k_bskh.shape:
        problems.append("empty input")
    if problems:
        raise NotImplementedError("; ".join(problems))


def _split_keys(seq: int, cfg: Config) -> tuple[int, int]:
    """(splits, keys per split): a whole number of blocks each, no split left empty."""
    per = pl.cdiv(pl.cdiv(seq, cfg.splits), cfg.block_s) * cfg.block_s
    return pl.cdiv(seq, per), per


@functools.partial(jax.jit, static_argnames=("source", "scale", "config", "interpret"))
def _decode_attention_triton(
    q_src: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    valid_bs: jax.Array,
    step: tuple[jax.Array, jax.Array, jax.Array] | None,
    counter: jax.Array | None,
    *,
    source: str,
    scale: float,
    config: Config | None,
    interpret: bool,
):
    """The kernel, shapes checked by the caller. ``source`` as `_attention_kernel`:
    "attend" (``q_src`` = q ``[B, N, H]``, ``step`` None), "update" (``step = (k_new_bkh,
    v_new_bkh, index)``) or "qkv" (``q_src`` = the projection ``[[P,] B, (N + 2K) * H]``,
    ``step = (cos_bh, sin_bh, index)``); the last two also write the caches. ``counter``:
    the splits' arrival counters ``[B, K]`` int32, all zero (None: a fresh zero array).
    Returns ``(out_bnh, *caches, counter)``."""
    b, s, kh, h = k_bskh.shape
    if source == "qkv":
        q_src = q_src.reshape(*q_src.shape[:-1], -1, h)  # a bitcast: [[P,] B, heads, H]
    g = (q_src.shape[-2] - (2 * kh if source == "qkv" else 0)) // kh
    cfg = config or fit_config(default_config(b, kh, s), s, h, k_bskh.dtype.itemsize)
    # The kernel's q: partials are summed to the caches' dtype.
    q = q_src if q_src.ndim == 3 else jax.ShapeDtypeStruct(q_src.shape[1:], k_bskh.dtype)
    check_supported(q, k_bskh, v_bskh, cfg)
    splits, per = _split_keys(s, cfg)
    cfg = dataclasses.replace(cfg, splits=splits)
    block_g = max(MIN_DOT, pl.next_power_of_2(g))
    operands = [q_src, k_bskh, v_bskh, valid_bs]
    out_shape = []
    aliases = {}
    if counter is None:
        counter = jnp.zeros((b, kh), jnp.int32)
    count_at = len(operands)  # the kernel's first operand after these, with splits
    if splits > 1:
        operands.append(counter)
    if step is not None:
        *step_rows, index = step
        operands += [*step_rows, jnp.asarray(index, jnp.int32).reshape(1)]
        out_shape += [jax.ShapeDtypeStruct(k_bskh.shape, k_bskh.dtype)] * 2
        aliases |= {1: 0, 2: 1}  # k, v caches: read and written in place
    if splits == 1:
        out_shape.append(jax.ShapeDtypeStruct((b, kh, g, h), q.dtype))
    else:  # the splits' f32 partials (scratch), the output, the counters (in place)
        out_shape += [
            jax.ShapeDtypeStruct((b, kh, splits, g, h), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, splits, g), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, splits, g), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, g, h), q.dtype),
            jax.ShapeDtypeStruct(counter.shape, counter.dtype),
        ]
        aliases[count_at] = len(out_shape) - 1  # the counters: read and written in place
    kernel = functools.partial(
        _attention_kernel,
        g=g,
        block_g=block_g,
        seq=s,
        keys_per_split=per,
        scale=scale,
        cfg=cfg,
        source=source,
        interpret=interpret,
    )
    whole = pl.BlockSpec(memory_space=pl.ANY)
    outs = pl.pallas_call(
        kernel,
        grid=(b, kh, splits),
        in_specs=[whole] * len(operands),
        out_specs=[whole] * len(out_shape),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="decode_attention",
    )(*operands)
    caches = outs[:2] if step is not None else []
    if splits == 1:
        out_bkgh = outs[-1]
    else:
        *_, out_bkgh, counter = outs
    return (out_bkgh.reshape(b, kh * g, h), *caches, counter)


# ----------------------------------------------------------------------------- public


def decode_attention(
    q_bnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    valid_bs: jax.Array,
    *,
    scale: float,
    implementation: str | None = None,
    config: Config | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Softmax attention of one query position per sequence over the cache: ``[B, N, H]``.

    Args:
      q_bnh: the queries after RoPE, N = K * G heads (head n reads kv head n // G).
      k_bskh, v_bskh: the caches ``[B, S, K, H]`` (the kernel needs q's dtype).
      valid_bs: bool or int ``[B, S]``: the keys each sequence's query may see.
      scale: multiplies the scores (``head_dim ** -0.5``).
      implementation: None (Triton on NVIDIA GPUs, else or where it raises
        ``NotImplementedError``: the reference), "xla" or "triton".
      config: the kernel's block size and splits (default: :func:`default_config`).
      interpret: run the kernel in the Pallas interpreter (CPU tests).
    """
    _check_shapes(q_bnh, k_bskh, v_bskh, valid_bs)
    attend = functools.partial(
        _decode_attention_triton, source="attend", scale=scale, config=config, interpret=interpret
    )
    return api.dispatch(
        implementation,
        {
            "xla": lambda: decode_attention_reference(q_bnh, k_bskh, v_bskh, valid_bs, scale=scale),
            "triton": lambda: attend(q_bnh, k_bskh, v_bskh, valid_bs, None, None)[0],
        },
    )


def decode_attention_update(
    q_bnh: jax.Array,
    k_new_bkh: jax.Array,
    v_new_bkh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    index: jax.Array | int,
    valid_bs: jax.Array,
    *,
    scale: float,
    counter: jax.Array | None = None,
    implementation: str | None = None,
    config: Config | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """Writes the step's key and value rows ``[B, K, H]`` at cache position ``index``
    (a scalar, clamped into ``[0, S)`` like ``lax.dynamic_update_slice``) and attends
    over the updated cache's valid keys at positions ``<= index`` (causal: the kernel
    reads no block past the step's own); returns ``(out [B, N, H], k cache, v cache)``,
    and ``counter`` after them where one is given.

    The kernel updates the caches in place (no copy where XLA can donate their buffers,
    as in the decode loop). ``counter``: ``[B, K]`` int32 zeros that the kernel's splits
    count their arrivals in (the last merges them) and leave zero, updated in place like
    the caches: kept beside them (`awq_jax.model.init_cache`), it costs nothing; without
    one the kernel gets a fresh zero array (a memset). Other arguments as for
    :func:`decode_attention`.
    """
    _check_shapes(q_bnh, k_bskh, v_bskh, valid_bs)
    _check_counter(counter, k_bskh.shape[0], k_bskh.shape[2])
    kv_shape = (k_bskh.shape[0], *k_bskh.shape[2:])
    if k_new_bkh.shape != kv_shape or v_new_bkh.shape != kv_shape:
        raise ValueError(
            f"the new key/value rows must be [B, K, H] = {kv_shape}; "
            f"got {k_new_bkh.shape}, {v_new_bkh.shape}"
        )
    kernel = functools.partial(
        _decode_attention_triton, scale=scale, config=config, interpret=interpret
    )
    step = (k_new_bkh.astype(k_bskh.dtype), v_new_bkh.astype(v_bskh.dtype), index)
    return _with_counter(
        api.dispatch(
            implementation,
            {
                "xla": lambda: (
                    *decode_attention_update_reference(
                        q_bnh, k_new_bkh, v_new_bkh, k_bskh, v_bskh, index, valid_bs, scale=scale
                    ),
                    counter,
                ),
                "triton": lambda: kernel(
                    q_bnh, k_bskh, v_bskh, valid_bs, step, counter, source="update"
                ),
            },
        ),
        counter,
    )


def _with_counter(outs: tuple[jax.Array, ...], counter: jax.Array | None) -> tuple[jax.Array, ...]:
    """``(out, k, v, counter)``, or ``(out, k, v)`` where the caller gave no counter."""
    return outs if counter is not None else outs[:3]


def decode_attention_update_qkv(
    qkv_bf: jax.Array,
    cos_bh: jax.Array,
    sin_bh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    index: jax.Array | int,
    valid_bs: jax.Array,
    *,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    counter: jax.Array | None = None,
    implementation: str | None = None,
    config: Config | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """:func:`decode_attention_update` fed by the fused q/k/v projection: the split into
    heads and RoPE happen in the kernel (`split_qkv_heads` is the same in jnp).

    Args:
      qkv_bf: ``[B, (N + 2K) * H]`` in ``jnp.split(qkv, [N * H, (N + K) * H])``'s layout:
        the N query heads, then the K key heads, then the K value heads, each H
        contiguous; the cache's dtype. Or ``[P, B, (N + 2K) * H]`` of any float dtype: the
        projection's split-K partial sums, summed here as by
        :func:`pallas_kernels.norm.sum_partials` (float32, in order, rounded to the
        cache's dtype), so that the matmul needs no kernel to sum them.
      cos_bh, sin_bh: the step's RoPE ``[B, H]`` (float32, frequencies repeated over the
        two halves, as ``awq_jax.model.rope_cos_sin``).
      num_heads, num_kv_heads: N and K.
      Others as for :func:`decode_attention_update`; the roped key is what is cached.
    """
    b, _, kh, h = k_bskh.shape
    want = (b, (num_heads + 2 * num_kv_heads) * h)
    stacked = qkv_bf.ndim == 3 and qkv_bf.shape[0] > 0  # [P, B, F] partial sums
    row_shape = qkv_bf.shape[1:] if stacked else qkv_bf.shape
    if row_shape != want or kh != num_kv_heads or cos_bh.shape != (b, h):
        raise ValueError(
            f"qkv must be [B, (N + 2K) * H] = {want} or P >= 1 partial sums [P, *{want}], "
            f"the caches [B, S, K={num_kv_heads}, H] and cos/sin [B, H]; "
            f"got {qkv_bf.shape}, {k_bskh.shape}, {cos_bh.shape}"
        )
    if sin_bh.shape != cos_bh.shape or h % 2:
        raise ValueError(f"sin must be cos's shape {cos_bh.shape}, H even; got {sin_bh.shape}")
    q_shape = jax.ShapeDtypeStruct((b, num_heads, h), qkv_bf.dtype)
    _check_shapes(q_shape, k_bskh, v_bskh, valid_bs)
    _check_counter(counter, b, kh)
    kernel = functools.partial(
        _decode_attention_triton, scale=scale, config=config, interpret=interpret
    )
    step = (cos_bh, sin_bh, index)

    def reference():
        qkv = sum_partials(qkv_bf, k_bskh.dtype) if stacked else qkv_bf
        q_bnh, k_new_bkh, v_new_bkh = split_qkv_heads(
            qkv, cos_bh, sin_bh, num_heads=num_heads, num_kv_heads=num_kv_heads
        )
        out = decode_attention_update_reference(
            q_bnh, k_new_bkh, v_new_bkh, k_bskh, v_bskh, index, valid_bs, scale=scale
        )
        return (*out, counter)

    return _with_counter(
        api.dispatch(
            implementation,
            {
                "xla": reference,
                "triton": lambda: kernel(
                    qkv_bf, k_bskh, v_bskh, valid_bs, step, counter, source="qkv"
                ),
            },
        ),
        counter,
    )
