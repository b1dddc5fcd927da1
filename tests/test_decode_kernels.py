"""The decode-step kernels: attention over the KV cache and residual add + RMSNorm.

The Triton kernels run through the Pallas interpreter on the CPU (small, awkward shapes:
S not a power of two, GQA with 1 and 4 query heads per kv head, left padding, a sliding
window, one and several splits of S) and compiled on a GPU (``gpu`` marker, real sizes;
skipped without one). Attention is checked against a float64 truth written here in
numpy, the jnp reference included, and the variant fed by the fused q/k/v projection
(split and RoPE in the kernel) also against the split-then-RoPE path; the norm against
its reference; the model's decode step through the kernels against the XLA path, down
to identical generated tokens. The norm's delta and the qkv row given as a stack of f32
split-K partial sums give, bit for bit, what their f32 sum rounded to the activations'
dtype gives.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_generate

import awq_jax.model as model_mod
from awq_jax.generate import generate, generate_tokens
from awq_jax.inference import prepare_for_inference
from awq_jax.model import init_params, rope_cos_sin
from pallas_kernels import add_rms_norm, attention, decode_attention, decode_attention_update
from pallas_kernels import norm as norm_mod
from pallas_kernels.attention import Config, decode_attention_update_qkv

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())

# ||out - truth|| / ||truth|| bounds for attention. f32: the kernel's online softmax and
# the dots reorder f32 sums (~1e-7 measured). bf16: inputs are exact in the truth, but P
# is rounded to bf16 before the PV dot (the reference rounds normalized P, the kernel
# unnormalized P) and the output to bf16: ~2e-3 measured (f16: 8x finer); a wrong key,
# head or mask gives > 1e-1.
ATTN_TOL = {jnp.float32: 1e-5, jnp.float16: 3e-3, jnp.bfloat16: 1e-2}
# Norm outputs, elementwise and relative: the f32 sum of squares is ordered differently
# from XLA's, which can move the rounded row by one unit of x.dtype (2^-8 in bf16), and
# the weight product by one more.
NORM_RTOL = {jnp.float32: 1e-6, jnp.bfloat16: 2**-7}


def rope_tol(dtype) -> float:
    """||roped - truth|| / ||truth|| bound: rounding cos, sin, the products and the sum
    to ``dtype`` gives ~0.35 units of its epsilon (measured); a wrong half, sign or head
    gives ~1."""
    return 2.0 ** (1 - jnp.finfo(dtype).nmant)


def attention_truth(q_bnh, k_bskh, v_bskh, valid_bs, scale) -> np.ndarray:
    """float64 softmax attention; rows with no valid key are zeros."""
    q, k, v = (np.asarray(a, np.float64) for a in (q_bnh, k_bskh, v_bskh))
    b, n, h = q.shape
    kh = k.shape[2]
    q_bkgh = q.reshape(b, kh, n // kh, h)
    s = np.einsum("bkgh,bskh->bkgs", q_bkgh, k) * scale
    valid = np.asarray(valid_bs, bool)[:, None, None, :]
    s = np.where(valid, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    p = np.where(valid, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
    l = p.sum(-1, keepdims=True)
    out = np.einsum("bkgs,bskh->bkgh", p / np.where(l > 0, l, 1), v)
    return out.reshape(b, n, h)


def rope_truth(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """float64 RoPE, rotate-half convention: ``x * cos + concat([-x2, x1]) * sin``."""
    x1, x2 = np.split(x, 2, axis=-1)
    return x * cos + np.concatenate([-x2, x1], axis=-1) * sin


def rel_err(out, truth: np.ndarray) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    return float(np.linalg.norm(out - truth) / max(np.linalg.norm(truth), 1e-30))


def decode_mask(b: int, s: int, index: int, pad: int = 0, window: int | None = None):
    """The decode step's mask row: keys <= index, row i left-padded by i * pad keys."""
    pos = np.arange(s)[None, :]
    valid = (pos <= index) & (pos >= pad * np.arange(b)[:, None])
    if window is not None:
        valid &= pos > index - window
    return jnp.asarray(valid)


def random_problem(seed: int, b: int, s: int, kh: int, g: int, h: int, dtype):
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    return draw(b, kh * g, h), draw(b, s, kh, h), draw(b, s, kh, h), draw(b, kh, h), draw(b, kh, h)


def random_qkv_problem(seed: int, b: int, s: int, kh: int, g: int, h: int, dtype, pos):
    """A packed projection row ``[B, (N + 2K) * H]``, the model's cos/sin ``[B, H]`` at
    positions ``pos`` [B], and k/v caches."""
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    cos, sin = rope_cos_sin(dataclasses.replace(TINY, head_dim=h), jnp.asarray(pos)[:, None])
    return (
        draw(b, (kh * g + 2 * kh) * h),
        cos[:, 0],
        sin[:, 0],
        draw(b, s, kh, h),
        draw(b, s, kh, h),
    )


def f32(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32))


def random_partials(seed: int, shape: tuple, dtype) -> tuple[jax.Array, jax.Array]:
    """``(partials [*shape] f32, their sum)``: the sum in f32, in order, rounded to
    ``dtype`` in numpy (what `pallas_kernels.norm.sum_partials` is specified to give)."""
    parts = np.random.default_rng(seed).standard_normal(shape, np.float32)
    return jnp.asarray(parts), jnp.asarray(functools.reduce(np.add, parts), dtype)


@pytest.fixture
def on_cpu():
    """The interpreter's tests run on the CPU also on a GPU host, where f32 dots default
    to TF32 and XLA's GPU fusions round bf16 intermediates differently."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


class _AttentionCases:
    """Shared cases; subclasses say how to run the kernel (``run`` / ``run_update``)."""

    # (B, S, K, G, H, dtype, left-pad step, sliding window, config)
    CASES: tuple = ()

    def run(self, q, k, v, valid, scale, cfg):
        raise NotImplementedError

    def run_update(self, q, k_new, v_new, k, v, index, valid, scale, cfg):
        raise NotImplementedError

    def run_qkv(self, qkv, cos, sin, k, v, index, valid, heads, scale, cfg):
        raise NotImplementedError

    # Whether the qkv kernel's bf16 RoPE is asserted bit-equal to the split path's.
    BF16_ROPE_EXACT = False

    def test_matches_truth(self, case) -> None:
        b, s, kh, g, h, dtype, pad, window, cfg = case
        q, k, v, _, _ = random_problem(s + g, b, s, kh, g, h, dtype)
        valid = decode_mask(b, s, s - 3, pad, window)
        truth = attention_truth(q, k, v, valid, h**-0.5)
        out = self.run(q, k, v, valid, h**-0.5, cfg)
        assert out.shape == q.shape and out.dtype == dtype
        assert rel_err(out, truth) < ATTN_TOL[dtype]
        ref = decode_attention(q, k, v, valid, scale=h**-0.5, implementation="xla")
        assert rel_err(ref, truth) < ATTN_TOL[dtype]

    def test_update_writes_the_step(self, case) -> None:
        b, s, kh, g, h, dtype, pad, window, cfg = case
        q, k, v, k_new, v_new = random_problem(2 * s + g, b, s, kh, g, h, dtype)
        index = s // 2 + 1  # not at a block edge, inside a middle split
        valid = decode_mask(b, s, index, pad, window)
        out, k2, v2 = self.run_update(q, k_new, v_new, k, v, index, valid, h**-0.5, cfg)
        want_k = k.at[:, index].set(k_new)
        want_v = v.at[:, index].set(v_new)
        np.testing.assert_array_equal(np.asarray(k2, np.float32), np.asarray(want_k, np.float32))
        np.testing.assert_array_equal(np.asarray(v2, np.float32), np.asarray(want_v, np.float32))
        truth = attention_truth(q, want_k, want_v, valid, h**-0.5)
        assert rel_err(out, truth) < ATTN_TOL[dtype]

    def test_qkv_matches_truth_and_the_split_path(self, qkv_case) -> None:
        """decode_attention_update_qkv: the roped key and the value written at ``index``,
        attention against the float64 truth (RoPE in numpy) and against the split path
        (split_qkv_heads, the model's split + RoPE, then decode_attention_update)."""
        b, s, kh, g, h, dtype, pad, window, cfg = qkv_case
        n, index = kh * g, s // 2 + 1
        pos = 1000 + index - pad * np.arange(b)  # each row's real position
        qkv, cos, sin, k, v = random_qkv_problem(3 * s + h, b, s, kh, g, h, dtype, pos)
        valid = decode_mask(b, s, index, pad, window)
        heads = dict(num_heads=n, num_kv_heads=kh)
        got = self.run_qkv(qkv, cos, sin, k, v, index, valid, heads, h**-0.5, cfg)
        out, k2, v2 = got
        assert out.shape == (b, n, h) and out.dtype == dtype

        x = np.asarray(jnp.asarray(qkv, jnp.float32), np.float64).reshape(b, n + 2 * kh, h)
        cs = [np.asarray(a, np.float64)[:, None] for a in (cos, sin)]
        q_t, k_t, v_t = rope_truth(x[:, :n], *cs), rope_truth(x[:, n : n + kh], *cs), x[:, n + kh :]
        want_k, want_v = np.array(f32(k), np.float64), np.array(f32(v), np.float64)
        want_k[:, index], want_v[:, index] = k_t, v_t
        np.testing.assert_array_equal(f32(v2), want_v)
        np.testing.assert_array_equal(np.delete(f32(k2), index, 1), np.delete(want_k, index, 1))
        assert rel_err(k2[:, index], k_t) < rope_tol(dtype)
        assert rel_err(out, attention_truth(q_t, want_k, want_v, valid, h**-0.5)) < ATTN_TOL[dtype]

        q, k_new, v_new = attention.split_qkv_heads(qkv, cos, sin, **heads)
        want = self.run_update(q, k_new, v_new, k, v, index, valid, h**-0.5, cfg)
        if dtype == jnp.bfloat16 and self.BF16_ROPE_EXACT:
            for a, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(f32(a), f32(w))
        else:  # the RoPE's products and sums may be rounded (or fused) differently
            assert rel_err(k2[:, index], f32(want[1][:, index])) < rope_tol(dtype)
            assert rel_err(out, f32(want[0])) < ATTN_TOL[dtype]

    @pytest.mark.parametrize("parts", [1, 3, 4])
    def test_qkv_partials(self, qkv_case, parts) -> None:
        """qkv as ``[P, B, F]`` f32 partial sums: the kernel's outputs and caches equal,
        bit for bit, its outputs for their f32 sum rounded to the cache's dtype (so do the
        reference's); the value row written is that sum; the kernel fed partials against
        the reference fed partials as in the test above. A missing partial moves the
        value row by O(1)."""
        b, s, kh, g, h, dtype, pad, window, cfg = qkv_case
        n, index = kh * g, s // 2 + 1
        pos = 1000 + index - pad * np.arange(b)
        _, cos, sin, k, v = random_qkv_problem(3 * s + h, b, s, kh, g, h, dtype, pos)
        partials, qkv = random_partials(parts, (parts, b, (n + 2 * kh) * h), dtype)
        heads = dict(num_heads=n, num_kv_heads=kh)
        args = (cos, sin, k, v, index, decode_mask(b, s, index, pad, window))
        got = self.run_qkv(partials, *args, heads, h**-0.5, cfg)
        want = self.run_qkv(qkv, *args, heads, h**-0.5, cfg)
        ref_kw = dict(scale=h**-0.5, implementation="xla", **heads)
        ref = decode_attention_update_qkv(partials, *args, **ref_kw)
        ref_want = decode_attention_update_qkv(qkv, *args, **ref_kw)
        assert got[0].dtype == dtype
        for a, w in (*zip(got, want, strict=True), *zip(ref, ref_want, strict=True)):
            np.testing.assert_array_equal(f32(a), f32(w))
        np.testing.assert_array_equal(
            f32(got[2][:, index]), f32(qkv.reshape(b, -1, h)[:, n + kh :])
        )

        out, k2, v2 = got
        np.testing.assert_array_equal(f32(v2), f32(ref[2]))
        if dtype == jnp.bfloat16 and self.BF16_ROPE_EXACT:
            np.testing.assert_array_equal(f32(k2), f32(ref[1]))
        else:
            assert rel_err(k2[:, index], f32(ref[1][:, index])) < rope_tol(dtype)
        assert rel_err(out, f32(ref[0])) < ATTN_TOL[dtype]


def _case_id(case) -> str:
    b, s, kh, g, h, dtype, pad, window, cfg = case
    return (
        f"b{b}-s{s}-k{kh}-g{g}-h{h}-{jnp.dtype(dtype).name}-pad{pad}-w{window}"
        f"-bs{cfg.block_s}-sp{cfg.splits}"
    )


INTERPRET_CASES = [
    (2, 37, 2, 4, 16, jnp.float32, 0, None, Config(block_s=16)),
    (3, 50, 2, 1, 32, jnp.bfloat16, 5, None, Config(block_s=16, splits=2)),
    (2, 70, 1, 4, 16, jnp.bfloat16, 9, 20, Config(block_s=16, splits=3)),
    (1, 45, 4, 2, 16, jnp.float32, 0, 7, Config(block_s=32, splits=4)),
]
# The qkv variant at the real head sizes, bf16 (the GPU cases add f32 and f16).
QKV_INTERPRET_CASES = [
    (2, 37, 2, 4, 64, jnp.bfloat16, 0, None, Config(block_s=16)),
    (3, 50, 1, 2, 128, jnp.bfloat16, 5, 20, Config(block_s=16, splits=3)),
]


@pytest.mark.usefixtures("on_cpu")
class TestAttentionInterpret(_AttentionCases):
    """The Triton kernels in the Pallas interpreter (CPU)."""

    # Interpreted, both paths' RoPE is XLA's CPU arithmetic: bf16 rounds every op alike.
    BF16_ROPE_EXACT = True

    @pytest.fixture(params=INTERPRET_CASES, ids=[_case_id(c) for c in INTERPRET_CASES])
    def case(self, request):
        return request.param

    @pytest.fixture(params=QKV_INTERPRET_CASES, ids=[_case_id(c) for c in QKV_INTERPRET_CASES])
    def qkv_case(self, request):
        return request.param

    def run(self, q, k, v, valid, scale, cfg):
        kw = dict(scale=scale, implementation="triton", config=cfg, interpret=True)
        return decode_attention(q, k, v, valid, **kw)

    def run_update(self, q, k_new, v_new, k, v, index, valid, scale, cfg):
        kw = dict(scale=scale, implementation="triton", config=cfg, interpret=True)
        return decode_attention_update(q, k_new, v_new, k, v, index, valid, **kw)

    def run_qkv(self, qkv, cos, sin, k, v, index, valid, heads, scale, cfg):
        kw = dict(scale=scale, implementation="triton", config=cfg, interpret=True, **heads)
        return decode_attention_update_qkv(qkv, cos, sin, k, v, index, valid, **kw)


@pytest.mark.usefixtures("on_cpu")
class TestAttentionEdges:
    def test_update_attends_to_no_key_after_the_step(self) -> None:
        """Valid keys after ``index`` are not attended (causal): the kernel stops at the
        step's block (whole splits past it read nothing) and the reference masks them."""
        q, k, v, k_new, v_new = random_problem(3, 2, 100, 2, 2, 16, jnp.float32)
        index, valid = 37, jnp.ones((2, 100), bool)
        k1, v1 = k.at[:, index].set(k_new), v.at[:, index].set(v_new)
        causal = valid & (jnp.arange(100) <= index)
        want = decode_attention(q, k1, v1, causal, scale=0.25, implementation="xla")
        everything = decode_attention(q, k1, v1, valid, scale=0.25, implementation="xla")
        assert rel_err(want, everything) > 1e-2  # the keys after index matter
        for kw in (
            dict(implementation="xla"),
            dict(implementation="triton", interpret=True, config=Config(block_s=16)),
            dict(implementation="triton", interpret=True, config=Config(block_s=16, splits=3)),
        ):
            out, k2, _ = decode_attention_update(
                q, k_new, v_new, k, v, index, valid, scale=0.25, **kw
            )
            np.testing.assert_allclose(f32(out), f32(want), rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(f32(k2), f32(k1))

    def test_split_counters_come_back_zero(self) -> None:
        """With splits, the programs count their arrivals in ``counter`` (the last merges
        the splits) and leave it zero, so the same counter serves every step; the result
        is the one without a counter (a fresh zero array) and the reference's. A counter
        of the wrong shape or dtype is refused."""
        q, k, v, k_new, v_new = random_problem(4, 2, 50, 3, 2, 16, jnp.float32)
        valid = jnp.ones((2, 50), bool)
        want = decode_attention_update(
            q, k_new, v_new, k, v, 40, valid, scale=0.25, implementation="xla"
        )
        counter = jnp.zeros((2, 3), jnp.int32)
        kw = dict(scale=0.25, implementation="triton", interpret=True)
        for splits in (1, 3, 4):
            cfg = Config(block_s=16, splits=splits)
            plain = decode_attention_update(q, k_new, v_new, k, v, 40, valid, config=cfg, **kw)
            out, k2, v2, counter = decode_attention_update(
                q, k_new, v_new, k, v, 40, valid, config=cfg, counter=counter, **kw
            )
            np.testing.assert_array_equal(counter, np.zeros((2, 3), np.int32))
            for got, ref in zip((out, k2, v2), plain, strict=True):
                np.testing.assert_array_equal(got, ref)
            np.testing.assert_allclose(out, want[0], rtol=1e-5, atol=1e-6)
        ref = decode_attention_update(
            q, k_new, v_new, k, v, 40, valid, scale=0.25, counter=counter, implementation="xla"
        )
        assert len(ref) == 4 and ref[3] is counter
        for bad in (jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 3), jnp.float32)):
            with pytest.raises(ValueError, match="counter must be"):
                decode_attention_update(q, k_new, v_new, k, v, 40, valid, counter=bad, **kw)

    def test_row_without_keys_is_zero(self) -> None:
        q, k, v, _, _ = random_problem(0, 2, 20, 2, 2, 16, jnp.float32)
        valid = decode_mask(2, 20, 9).at[1].set(False)
        for kw in (
            dict(implementation="xla"),
            dict(implementation="triton", interpret=True, config=Config(block_s=16, splits=2)),
        ):
            out = np.asarray(decode_attention(q, k, v, valid, scale=0.25, **kw))
            assert np.all(np.isfinite(out)) and np.all(out[1] == 0)
            assert rel_err(out[0], attention_truth(q, k, v, valid, 0.25)[0]) < 1e-5

    def test_index_is_clamped_like_dynamic_update_slice(self) -> None:
        q, k, v, k_new, v_new = random_problem(1, 1, 20, 2, 2, 16, jnp.float32)
        valid = decode_mask(1, 20, 19)
        cfg = Config(block_s=16, splits=2)
        kw = dict(scale=0.25, implementation="triton", interpret=True, config=cfg)
        _, k2, _ = decode_attention_update(q, k_new, v_new, k, v, 25, valid, **kw)
        np.testing.assert_array_equal(k2, k.at[:, 19].set(k_new))

    def test_dispatch_and_errors(self) -> None:
        q, k, v, k_new, v_new = random_problem(2, 2, 20, 2, 2, 16, jnp.float32)
        valid = decode_mask(2, 20, 9)
        if not HAS_GPU:  # None is the reference off NVIDIA GPUs
            np.testing.assert_array_equal(
                decode_attention(q, k, v, valid, scale=0.25),
                attention.decode_attention_reference(q, k, v, valid, scale=0.25),
            )
        with pytest.raises(ValueError, match="implementation"):
            decode_attention(q, k, v, valid, scale=0.25, implementation="mosaic")
        with pytest.raises(ValueError, match="valid"):
            decode_attention(q, k, v, valid[:, :5], scale=0.25)
        with pytest.raises(ValueError, match="group"):
            decode_attention(q[:, :3], k, v, valid, scale=0.25)
        with pytest.raises(ValueError, match=r"\[B, K, H\]"):
            decode_attention_update(q, k_new[:, :1], v_new, k, v, 0, valid, scale=0.25)
        q24, k24, v24, _, _ = random_problem(3, 1, 20, 2, 2, 24, jnp.float32)
        with pytest.raises(NotImplementedError, match="head_dim"):
            decode_attention(q24, k24, v24, valid[:1], scale=0.25, implementation="triton")
        with pytest.raises(NotImplementedError, match="block_s"):
            cfg = Config(block_s=48)
            decode_attention(q, k, v, valid, scale=0.25, implementation="triton", config=cfg)

    def test_qkv_dispatch_and_errors(self) -> None:
        qkv, cos, sin, k, v = random_qkv_problem(4, 2, 20, 2, 2, 16, jnp.float32, [3, 9])
        valid = decode_mask(2, 20, 9)
        heads = dict(num_heads=4, num_kv_heads=2)
        args = (qkv, cos, sin, k, v, 9, valid)
        if not HAS_GPU:  # None is the reference off NVIDIA GPUs
            want = attention.decode_attention_update_reference(
                *attention.split_qkv_heads(qkv, cos, sin, **heads), k, v, 9, valid, scale=0.25
            )
            got = decode_attention_update_qkv(*args, scale=0.25, **heads)
            for a, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, w)
        for bad in (dict(num_heads=2, num_kv_heads=2), dict(num_heads=6, num_kv_heads=1)):
            with pytest.raises(ValueError, match=r"\[B, \(N \+ 2K\) \* H\]"):
                decode_attention_update_qkv(*args, scale=0.25, **bad)
        for bad in (qkv[None, :1], qkv[None, :, 16:], qkv[None, None], qkv[None][:0]):
            with pytest.raises(ValueError, match="partial sums"):
                decode_attention_update_qkv(bad, *args[1:], scale=0.25, **heads)
        with pytest.raises(ValueError, match="cos"):
            decode_attention_update_qkv(qkv, cos, sin[:1], *args[3:], scale=0.25, **heads)
        with pytest.raises(ValueError, match="group"):
            qkv3 = jnp.zeros((2, (3 + 4) * 16))
            decode_attention_update_qkv(qkv3, *args[1:], scale=0.25, num_heads=3, num_kv_heads=2)

    def test_config_fits_shared_memory(self) -> None:
        """The default config's blocks shrink to a short cache and to f32's itemsize (an
        f32 cache of 128-wide heads at 128 keys asked the H100 for 392 KB, run 52); an
        explicit config that does not fit is refused (dispatch falls back to XLA)."""
        fit = attention.fit_config
        assert fit(Config(block_s=128), 384, 128, 2) == Config(block_s=128)
        assert fit(Config(block_s=128), 384, 128, 4) == Config(block_s=64)
        assert fit(Config(block_s=64, splits=4), 384, 128, 2) == Config(block_s=64, splits=4)
        assert fit(Config(block_s=128), 12, 128, 4) == Config(block_s=16)
        q, k, v, _, _ = random_problem(0, 1, 20, 1, 1, 128, jnp.float32)
        valid = jnp.ones((1, 20), bool)
        kw = dict(scale=0.1, implementation="triton", interpret=True)
        with pytest.raises(NotImplementedError, match="shared memory"):
            decode_attention(q, k, v, valid, config=Config(block_s=128), **kw)
        np.testing.assert_allclose(  # the fitted default runs
            f32(decode_attention(q, k, v, valid, **kw)),
            f32(decode_attention(q, k, v, valid, scale=0.1, implementation="xla")),
            rtol=1e-5,
            atol=1e-6,
        )

    def test_default_config_fills_the_gpu(self) -> None:
        """Batch 1 splits S (8 kv heads x 1 program would leave most SMs idle), short
        caches too; batch 32 does not; beyond batch 1 short caches keep >=
        MIN_KEYS_PER_SPLIT keys per split."""
        assert attention.default_config(1, 8, 4096).splits == 16
        assert attention.default_config(1, 8, 384) == Config(block_s=64, splits=6)
        assert attention.default_config(1, 8, 256) == Config(block_s=64, splits=4)
        assert attention.default_config(1, 8, 100) == Config(block_s=128, splits=1)
        assert attention.default_config(8, 8, 384) == Config(block_s=128, splits=1)
        assert attention.default_config(8, 8, 2048) == Config(block_s=64, splits=4)
        assert attention.default_config(32, 8, 4096) == Config(block_s=64, splits=1)
        for b, s in ((8, 384), (1, 2048), (8, 2048), (32, 4096)):
            cfg = attention.default_config(b, 8, s)
            assert s // cfg.splits >= attention.MIN_KEYS_PER_SPLIT or cfg.splits == 1


def _norm_problem(seed: int, shape: tuple, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(3 * rng.standard_normal(shape), dtype)
    delta = jnp.asarray(rng.standard_normal(shape), dtype)
    w = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), dtype)
    return x, delta, w


class _NormCases:
    SHAPES: tuple = ((1, 64), (3, 100), (2, 3, 576))

    def add_norm(self, x, delta, w, eps):
        raise NotImplementedError

    def norm(self, x, w, eps):
        raise NotImplementedError

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_matches_reference(self, dtype) -> None:
        for i, shape in enumerate(self.SHAPES):
            x, delta, w = _norm_problem(i, shape, dtype)
            s, y = self.add_norm(x, delta, w, 1e-5)
            s_ref, y_ref = norm_mod.add_rms_norm_reference(x, delta, w, 1e-5)
            assert s.dtype == y.dtype == dtype and y.shape == shape
            np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s_ref, np.float32))
            f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
            np.testing.assert_allclose(f32(y), f32(y_ref), rtol=NORM_RTOL[dtype], atol=1e-6)
            y1 = self.norm(x, w, 1e-5)
            y1_ref = norm_mod.rms_norm_reference(x, w, 1e-5)
            np.testing.assert_allclose(f32(y1), f32(y1_ref), rtol=NORM_RTOL[dtype], atol=1e-6)

    @pytest.mark.parametrize("parts", [1, 3, 4])
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_partials(self, dtype, parts) -> None:
        """delta as ``[S, *x.shape]`` f32 partial sums: the kernel's (s, y) equal, bit for
        bit, its (s, y) for their f32 sum rounded to x's dtype (so do the reference's); s
        equals the reference's fed the partials, y within NORM_RTOL of it. A missing
        partial moves s by O(1)."""
        shape = self.SHAPES[-1]
        x, _, w = _norm_problem(parts, shape, dtype)
        partials, delta = random_partials(parts, (parts, *shape), dtype)
        got = self.add_norm(x, partials, w, 1e-5)
        want = self.add_norm(x, delta, w, 1e-5)
        ref = norm_mod.add_rms_norm_reference(x, partials, w, 1e-5)
        ref_want = norm_mod.add_rms_norm_reference(x, delta, w, 1e-5)
        assert got[0].dtype == got[1].dtype == dtype
        for a, a_want in (*zip(got, want, strict=True), *zip(ref, ref_want, strict=True)):
            np.testing.assert_array_equal(f32(a), f32(a_want))
        np.testing.assert_array_equal(f32(got[0]), f32(ref[0]))
        np.testing.assert_allclose(f32(got[1]), f32(ref[1]), rtol=NORM_RTOL[dtype], atol=1e-6)


@pytest.mark.usefixtures("on_cpu")
class TestNormInterpret(_NormCases):
    def add_norm(self, x, delta, w, eps):
        return add_rms_norm(x, delta, w, eps, implementation="triton", interpret=True)

    def norm(self, x, w, eps):
        return norm_mod.rms_norm(x, w, eps, implementation="triton", interpret=True)

    def test_unsupported(self) -> None:
        x, delta, w = _norm_problem(0, (2, 64), jnp.float32)
        with pytest.raises(NotImplementedError, match="delta"):
            add_rms_norm(x, delta.astype(jnp.bfloat16), w, 1e-5, implementation="triton")
        with pytest.raises(ValueError, match="weight"):
            add_rms_norm(x, delta, w[:8], 1e-5)
        for bad in (delta[None, :1], delta[:, None], delta[None, None], delta[None][:0]):
            with pytest.raises(ValueError, match="partial sums"):
                add_rms_norm(x, bad, w, 1e-5)
        wide = jnp.ones((1, 2 * norm_mod.MAX_WIDTH), jnp.float32)
        with pytest.raises(NotImplementedError, match="rows"):
            norm_mod.rms_norm(wide, wide[0], 1e-5, implementation="triton")
        # None falls back to the reference wherever the kernel cannot run.
        s, _ = add_rms_norm(x, delta.astype(jnp.bfloat16), w, 1e-5)
        assert s.dtype == jnp.float32


def test_kernels_lower_for_the_gpu() -> None:
    """Pallas -> Triton IR lowering (what interpret mode skips) runs on any host for an
    abstract H100; Triton's own compilation to PTX happens only on a GPU."""
    from jax.sharding import AbstractDevice, AbstractMesh

    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), abstract_device=dev)
    sds = jax.ShapeDtypeStruct
    b, s, kh, g, h, bf16 = 2, 1000, 8, 4, 128, jnp.bfloat16
    q, kv, new = sds((b, kh * g, h), bf16), sds((b, s, kh, h), bf16), sds((b, kh, h), bf16)
    valid, index = sds((b, s), jnp.bool_), sds((), jnp.int32)
    counter = sds((b, kh), jnp.int32)
    # One kernel with splits or without (the last split to arrive merges them); the caches
    # and the splits' counters are written in place.
    for cfg in (Config(splits=1), Config(block_s=32, splits=4)):
        kw = dict(scale=h**-0.5, implementation="triton", config=cfg)
        fn = jax.jit(functools.partial(decode_attention_update, **kw))
        with jax.sharding.use_abstract_mesh(mesh):
            text = fn.trace(q, new, new, kv, kv, index, valid, counter=counter)
            text = text.lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1
        aliased = len(re.findall(r"output_operand_alias<output_tuple_indices = \[(\d+)\]", text))
        assert aliased == (2 if cfg.splits == 1 else 3), text
    # The qkv variant: the kernels and bitcasts only (no XLA slice or RoPE fusion left).
    # Also fed f32 split-K partials [P, B, F]: no XLA sum left either.
    for hd, cfg, parts in (
        (128, Config(splits=1), ()),
        (64, Config(block_s=32, splits=4), ()),
        (128, Config(splits=1), (3,)),
    ):
        kw = dict(scale=hd**-0.5, implementation="triton", config=cfg, num_heads=kh * g)
        fn = jax.jit(functools.partial(decode_attention_update_qkv, num_kv_heads=kh, **kw))
        qkv_dtype = jnp.float32 if parts else bf16
        qkv = sds((*parts, b, (kh * g + 2 * kh) * hd), qkv_dtype)
        cos = sds((b, hd), jnp.float32)
        kv = sds((b, s, kh, hd), bf16)
        with jax.sharding.use_abstract_mesh(mesh):
            text = fn.trace(qkv, cos, cos, kv, kv, index, valid, counter=counter)
            text = text.lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1
        assert "output_operand_alias" in text
        ops = set(re.findall(r"stablehlo\.(\w+)", text)) - {"output_operand_alias", "mesh"}
        assert ops == {"custom_call", "reshape"}, ops
    x = sds((3, 1, 4096), bf16)
    fn = jax.jit(lambda x, d, w: add_rms_norm(x, d, w, 1e-5, implementation="triton"))
    for delta in (x, sds((4, *x.shape), jnp.float32)):  # the sum of partials is the kernel's
        with jax.sharding.use_abstract_mesh(mesh):
            text = fn.trace(x, delta, sds((4096,), bf16)).lower(lowering_platforms=("cuda",))
            text = text.as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1
        assert set(re.findall(r"stablehlo\.(\w+)", text)) - {"mesh"} == {"custom_call", "reshape"}


# ----------------------------------------------------------------------------- the model

# test_generate's tiny model, with a sliding window (one more mask the kernel must follow).
# Its fused q/k/v projection feeds decode_attention_update_qkv on decode steps.
TINY = dataclasses.replace(test_generate.TINY, sliding_window=12)
# Qwen3's q/k norms sit between the split and RoPE: decode_attention_update is used.
TINY_QK_NORM = dataclasses.replace(TINY, qk_norm=True, num_layers=1)


@pytest.fixture
def kernels_forced(monkeypatch):
    """The model's decode attention and norms through the Triton kernels (interpreted
    on CPU); counts the calls. ``generate_tokens`` caches compiled programs by config,
    so its cache is cleared around the patch."""
    calls = {"attention": 0, "attention_qkv": 0, "norm": 0}
    kw = dict(implementation="triton", interpret=not HAS_GPU)

    def counted(fn, key):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs, **kw)

        return wrapped

    monkeypatch.setattr(
        model_mod, "decode_attention_update", counted(decode_attention_update, "attention")
    )
    monkeypatch.setattr(
        model_mod,
        "decode_attention_update_qkv",
        counted(decode_attention_update_qkv, "attention_qkv"),
    )
    monkeypatch.setattr(model_mod, "add_rms_norm", counted(add_rms_norm, "norm"))
    monkeypatch.setattr(model_mod, "rms_norm", counted(norm_mod.rms_norm, "norm"))
    generate_tokens.clear_cache()
    yield calls
    generate_tokens.clear_cache()


def _xla_only(monkeypatch) -> None:
    kw = dict(implementation="xla")
    for name, fn in (
        ("decode_attention_update", decode_attention_update),
        ("decode_attention_update_qkv", decode_attention_update_qkv),
        ("add_rms_norm", add_rms_norm),
    ):
        monkeypatch.setattr(model_mod, name, functools.partial(fn, **kw))
    monkeypatch.setattr(model_mod, "rms_norm", functools.partial(norm_mod.rms_norm, **kw))


def _generate(config, params):
    prompts = [[5, 9, 2, 77, 31, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [3, 4]]  # left pad
    return generate(config, params, prompts, max_new_tokens=10)


@functools.partial(jax.jit, static_argnames="config")
def _decode_logits(config, params):
    """Prefill 8 left-padded tokens, then two decode steps: the steps' logits [2, B, V]."""
    from awq_jax.generate import prefill
    from awq_jax.model import Transformer, causal_mask

    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, config.vocab_size)
    valid = jnp.ones((2, 8), bool).at[1, :3].set(False)
    _, cache = prefill(config, params, tokens, valid, max_len=12)
    key_valid = jnp.concatenate([valid, jnp.ones((2, 4), bool)], axis=1)
    out = []
    for i, tok in enumerate(([7, 3], [11, 2])):
        mask = causal_mask(jnp.full((2, 1), 8 + i), key_valid, config.sliding_window)
        pos = (valid.sum(-1) + i)[:, None]
        logits, cache = Transformer(config).apply(
            {"params": params}, jnp.asarray(tok)[:, None], pos, mask, cache, 8 + i
        )
        out.append(logits[:, 0])
    return jnp.stack(out)


@pytest.mark.parametrize(
    "config, attention_fn",
    [
        pytest.param(TINY, "attention_qkv", id="fused-qkv"),
        pytest.param(TINY_QK_NORM, "attention", id="qk-norm"),
    ],
)
@pytest.mark.parametrize(
    "unstack",
    [
        pytest.param(True, id="unrolled"),
        # The scanned layout's XLA path is covered by test_generate; through the kernels
        # it costs 8 s of interpreter on CPU, so it runs on the GPU only.
        pytest.param(False, id="scanned", marks=pytest.mark.skipif(not HAS_GPU, reason="GPU")),
    ],
)
def test_model_decode_step_through_the_kernels(
    kernels_forced, unstack, config, attention_fn
) -> None:
    """One decode step's logits through the kernels equal the XLA path's (f32: 1e-5);
    the attention kernel is the one the params' layout and the config call for."""
    params = prepare_for_inference(init_params(config, jax.random.key(7)), unstack=unstack)
    got = _decode_logits(config, params)
    other = ({"attention", "attention_qkv"} - {attention_fn}).pop()
    assert kernels_forced[attention_fn] >= 2 and kernels_forced[other] == 0
    assert kernels_forced["norm"] > 0
    with pytest.MonkeyPatch.context() as mp:
        _xla_only(mp)
        want = _decode_logits(config, params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_generate_tokens_identical_through_the_kernels(kernels_forced) -> None:
    params = prepare_for_inference(init_params(TINY, jax.random.key(8)))
    got = _generate(TINY, params)
    assert kernels_forced["attention_qkv"] > 0
    with pytest.MonkeyPatch.context() as mp:
        _xla_only(mp)
        generate_tokens.clear_cache()
        want = _generate(TINY, params)
    assert got == want


# ----------------------------------------------------------------------------- GPU

GPU_CASES = [
    (1, 384, 8, 4, 128, jnp.bfloat16, 0, None, Config()),
    (1, 384, 8, 4, 128, jnp.bfloat16, 0, None, attention.default_config(1, 8, 384)),
    (1, 2048, 8, 4, 128, jnp.bfloat16, 0, None, attention.default_config(1, 8, 2048)),
    (8, 2051, 8, 4, 128, jnp.bfloat16, 100, 1024, Config(block_s=128, splits=4)),
    (32, 4096, 8, 4, 128, jnp.bfloat16, 7, None, attention.default_config(32, 8, 4096)),
    (4, 777, 8, 1, 64, jnp.float32, 3, None, Config(block_s=32, splits=2)),
    (2, 300, 2, 16, 128, jnp.float16, 0, 100, Config(block_s=64, splits=3)),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
class TestAttentionGpu(_AttentionCases):
    """The Triton kernels compiled for the GPU at the benchmark's sizes and awkward ones."""

    @pytest.fixture(params=GPU_CASES, ids=[_case_id(c) for c in GPU_CASES])
    def case(self, request):
        return request.param

    @pytest.fixture(params=GPU_CASES, ids=[_case_id(c) for c in GPU_CASES])
    def qkv_case(self, request):
        return request.param

    def run(self, q, k, v, valid, scale, cfg):
        fn = functools.partial(decode_attention, scale=scale, implementation="triton", config=cfg)
        return jax.jit(fn)(q, k, v, valid)

    def run_update(self, q, k_new, v_new, k, v, index, valid, scale, cfg):
        kw = dict(scale=scale, implementation="triton", config=cfg)
        fn = jax.jit(functools.partial(decode_attention_update, **kw))
        return fn(q, k_new, v_new, k, v, index, valid)

    def run_qkv(self, qkv, cos, sin, k, v, index, valid, heads, scale, cfg):
        kw = dict(scale=scale, implementation="triton", config=cfg, **heads)
        fn = jax.jit(functools.partial(decode_attention_update_qkv, **kw))
        return fn(qkv, cos, sin, k, v, index, valid)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_gpu_split_counters_across_steps() -> None:
    """Batch 1's split attention (dispatch's 6 programs per kv head at S = 384, the last to
    arrive merges) as the decode loop runs it: one counter through 20 steps of one jitted
    loop (each step writes the same row, so each sees the same cache), every step's output
    the same bits as a call with a fresh counter and close to the reference, the counter
    zero at the end."""
    q, k, v, k_new, v_new = random_problem(5, 1, 384, 8, 4, 128, jnp.bfloat16)
    valid = jnp.ones((1, 384), bool)
    cfg = attention.default_config(1, 8, 384)
    assert cfg == Config(block_s=64, splits=6)
    kw = dict(scale=128**-0.5, implementation="triton", config=cfg)
    step = jax.jit(functools.partial(decode_attention_update, **kw))

    @jax.jit
    def loop(k, v, counter):
        def body(i, carry):
            k, v, counter, outs = carry
            out, k, v, counter = step(q, k_new, v_new, k, v, 200, valid, counter=counter)
            return k, v, counter, outs.at[i].set(out)

        outs = jnp.zeros((20, *q.shape), q.dtype)
        return jax.lax.fori_loop(0, 20, body, (k, v, counter, outs))

    _, _, counter, outs = loop(k, v, jnp.zeros((1, 8), jnp.int32))
    np.testing.assert_array_equal(counter, np.zeros((1, 8), np.int32))
    fresh, *_ = step(q, k_new, v_new, k, v, 200, valid)
    ref, *_ = decode_attention_update(
        q, k_new, v_new, k, v, 200, valid, scale=128**-0.5, implementation="xla"
    )
    assert rel_err(fresh, ref) < 1e-2
    for i in range(20):
        np.testing.assert_array_equal(outs[i], fresh)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
class TestNormGpu(_NormCases):
    SHAPES = ((1, 4096), (32, 1, 4096), (5, 8192), (3, 576))

    def add_norm(self, x, delta, w, eps):
        return jax.jit(functools.partial(add_rms_norm, eps=eps, implementation="triton"))(
            x, delta, w
        )

    def norm(self, x, w, eps):
        return jax.jit(functools.partial(norm_mod.rms_norm, eps=eps, implementation="triton"))(x, w)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_gpu_dispatch_runs_the_kernels() -> None:
    """On an NVIDIA GPU the defaults pick the kernels (not the reference)."""
    q, k, v, _, _ = random_problem(0, 1, 384, 8, 4, 128, jnp.bfloat16)
    valid = decode_mask(1, 384, 200)
    text = jax.jit(functools.partial(decode_attention, scale=128**-0.5)).lower(q, k, v, valid)
    assert "__gpu$xla.gpu.triton" in text.as_text()


def test_cpu_smoke_benchmark(tmp_path) -> None:
    """The GPU benchmark's command runs end to end on the CPU (interpreted, tiny shapes)."""
    from pallas_kernels import bench_decode

    records = bench_decode.main(["--cpu-smoke", "--out", str(tmp_path)])
    assert len(list(tmp_path.glob("decode-kernels-*.json"))) == 1  # named after the device
    assert {r["kernel"] for r in records} == {"attention", "attention_update", "add_rms_norm"}
    assert all(r["error"] is None and r["rel_err"] < 1e-2 for r in records)
