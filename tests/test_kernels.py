"""Grouped int4 matmul: every backend against a float64 truth on random, awkward shapes.

One base class holds the cases; ``TestTritonInterpret`` runs the Pallas-Triton kernel
through the Pallas interpreter on the CPU (small shapes), ``TestMosaicInterpret`` runs the
Mosaic GPU kernel through the Mosaic GPU interpreter (its ``a_in_smem`` variant: the
interpreter's wgmma reads shared-memory operands only), and ``TestGpu`` runs every
backend compiled on a GPU, both variants of the Mosaic kernel included, and is skipped
where there is none.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    Int4Weight,
    int4_matmul,
    layout,
    pallas_mosaic_gpu,
    pallas_mosaic_gpu_ws,
    pallas_triton,
    prepare_weight,
)
from pallas_kernels.reference import dequantize, int4_matmul_reference

# ||out - truth|| / ||truth|| bounds. The kernels round the dequantized weight (or the
# per-group partial sums) to x.dtype once and accumulate in f32: bf16 keeps 8 mantissa
# bits (per-element error <= 2^-9, ~2.5e-3 measured on random data), f16 keeps 11
# (~3e-4). The bounds leave ~3x headroom; a wrong group, nibble or zero gives > 1e-1.
TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3}

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())


def random_weight(
    rng: np.random.Generator,
    k: int,
    n: int,
    group_size: int,
    tile_n: int | None = None,
    fmt: str | None = None,
):
    """Random codes, f16 scales and zero points; returns (Int4Weight, float64 W[K, N])."""
    q = rng.integers(0, 16, (k, n), dtype=np.uint8)
    s = (rng.uniform(0.5, 1.5, (k // group_size, n)) / 64).astype(np.float16)
    z = rng.integers(0, 16, (k // group_size, n), dtype=np.uint8)
    w = prepare_weight(
        jnp.asarray(q),
        jnp.asarray(s),
        jnp.asarray(z),
        group_size=group_size,
        tile_n=tile_n,
        fmt=fmt,
    )
    rep = lambda a: np.repeat(a.astype(np.float64), group_size, axis=0)  # noqa: E731
    return w, (q.astype(np.float64) - rep(z)) * rep(s)


def random_swiglu_weight(rng: np.random.Generator, k: int, f: int, group_size: int, fmt: str):
    """A gate/up pair interleaved for ``epilogue="swiglu"``; returns (Int4Weight of N = 2f,
    float64 gate [K, f], float64 up [K, f])."""
    w, w_kn = random_weight(rng, k, 2 * f, group_size, fmt=fmt)  # its codes, re-laid out:
    q, s, z = (np.asarray(a) for a in (w.codes_nk().T, w.plain_scales, w.plain_zeros))
    il = lambda a: layout.interleave_gate_up(jnp.asarray(a[:, :f]), jnp.asarray(a[:, f:]))  # noqa: E731
    w = prepare_weight(il(q), il(s), il(z), group_size=group_size, fmt=fmt)
    return w, w_kn[:, :f], w_kn[:, f:]


def swiglu_truth(x: jax.Array, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    g = x64 @ gate
    return g / (1 + np.exp(-g)) * (x64 @ up)


def rel_err(out: jax.Array, truth: np.ndarray) -> float:
    out = np.asarray(out.astype(jnp.float32), np.float64)
    return float(np.linalg.norm(out - truth) / np.linalg.norm(truth))


class _Int4MatmulCases:
    """Shared cases; subclasses say how to call the backend (``matmul``)."""

    # (M, K, N, group_size); subclasses may override with larger shapes.
    SHAPES: ClassVar = [(1, 256, 64, 64), (3, 256, 128, 32), (16, 512, 64, 128), (17, 256, 64, 64)]
    FMT: ClassVar[str | None] = None  # the weight format (None: prepare_weight's default)
    TILE_N: ClassVar[int | None] = None  # its tile_n (None: prepare_weight's default)

    def matmul(self, x: jax.Array, w: Int4Weight) -> jax.Array:
        raise NotImplementedError

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
    @pytest.mark.parametrize("shape_idx", range(4))
    def test_matches_truth(self, shape_idx: int, dtype) -> None:
        m, k, n, gs = self.SHAPES[shape_idx]
        if self.FMT == "u4_wgmma" and gs % layout.WGMMA_CHUNK:
            pytest.skip("the u4_wgmma layout is for group sizes that are multiples of 128")
        rng = np.random.default_rng(1000 * shape_idx + (dtype == jnp.float16))
        w, w_kn = random_weight(rng, k, n, gs, tile_n=self.TILE_N, fmt=self.FMT)
        x = rng.standard_normal((m, k)).astype(np.float32)
        out = self.matmul(jnp.asarray(x, dtype), w)
        assert out.shape == (m, n) and out.dtype == dtype
        truth = np.asarray(jnp.asarray(x, dtype), np.float64) @ w_kn
        assert np.all(np.isfinite(np.asarray(out, np.float32)))
        assert rel_err(out, truth) < TOLERANCE[dtype]


class TestReference(_Int4MatmulCases):
    SHAPES: ClassVar = [
        (1, 576, 192, 64),
        (3, 1536, 576, 128),
        (100, 256, 64, 32),
        (17, 192, 96, 64),
    ]

    def matmul(self, x, w):
        return jax.jit(int4_matmul_reference)(x, w)


class TestReferenceS4(TestReference):
    FMT = "s4"


class TestReferenceWgmma(TestReference):
    """The u4_wgmma reference permutes x instead of the weight: check every path of it."""

    FMT = "u4_wgmma"
    SHAPES: ClassVar = [
        (1, 512, 192, 128),
        (3, 1536, 576, 256),
        (100, 256, 64, 128),
        (17, 384, 96, 128),
    ]


class TestDispatch(_Int4MatmulCases):
    """``implementation=None``: on the CPU this is the reference; on a GPU, a kernel."""

    def matmul(self, x, w):
        return jax.jit(int4_matmul)(x, w)


class TestTritonInterpret(_Int4MatmulCases):
    """The Pallas-Triton kernel through the Pallas interpreter (CPU), several configs.
    Its weights are in the Triton kernel's format whatever the device (on a Hopper GPU
    `prepare_weight`'s default is the Mosaic kernels' format)."""

    FMT = "u4_split"
    CONFIGS: ClassVar = [
        pallas_triton.Config(block_n=32, split_k=2),
        pallas_triton.Config(block_n=64, swap=True),
        pallas_triton.Config(block_n=32, split_k=2, scale_after_dot=False, groups_per_step=2),
        pallas_triton.Config(block_m=1, block_n=32, split_k=2, fma=True),
        pallas_triton.Config(block_n=64, split_k=2, swap=True, asm_dequant=True),
        pallas_triton.Config(block_n=32, groups_per_step=2, asm_dequant=True),
    ]

    def matmul(self, x, w):
        m = x.shape[0]
        cfg = self.CONFIGS[(m + w.group_size) % len(self.CONFIGS)]
        if w.k % (cfg.split_k * cfg.groups_per_step * w.group_size):
            cfg = pallas_triton.Config(block_n=32)
        if w.tile_n:
            cfg = dataclasses.replace(cfg, block_n=w.tile_n)
        return pallas_triton.int4_matmul_triton(x, w, config=cfg, interpret=True)

    @pytest.mark.parametrize("tile_n", [0, 32])
    @pytest.mark.parametrize("cfg_idx", range(6))
    def test_each_config(self, cfg_idx: int, tile_n: int) -> None:
        rng = np.random.default_rng(7 + cfg_idx)
        w, w_kn = random_weight(rng, 512, 64, 64, tile_n=tile_n, fmt=self.FMT)
        x = jnp.asarray(rng.standard_normal((5, 512)), jnp.bfloat16)
        cfg = self.CONFIGS[cfg_idx]
        if tile_n:
            cfg = dataclasses.replace(cfg, block_n=tile_n)
        out = pallas_triton.int4_matmul_triton(x, w, config=cfg, interpret=True)
        assert rel_err(out, np.asarray(x, np.float64) @ w_kn) < TOLERANCE[jnp.bfloat16]

    def test_unsupported_shape_raises(self) -> None:
        rng = np.random.default_rng(0)
        w, _ = random_weight(rng, 192, 96, 64, fmt=self.FMT)  # N=96: untiled, 64 does not divide it
        assert w.tile_n == 0
        x = jnp.ones((2, 192), jnp.bfloat16)
        with pytest.raises(NotImplementedError):
            pallas_triton.int4_matmul_triton(x, w, config=pallas_triton.Config(block_n=64))
        tiled, _ = random_weight(rng, 256, 128, 64, tile_n=64, fmt=self.FMT)
        with pytest.raises(NotImplementedError, match="tile_n"):
            pallas_triton.int4_matmul_triton(
                jnp.ones((2, 256), jnp.bfloat16), tiled, config=pallas_triton.Config(block_n=128)
            )


class TestMosaicInterpret(_Int4MatmulCases):
    """The Mosaic GPU kernel through the Mosaic GPU interpreter (CPU), several configs."""

    FMT = "s4"
    SHAPES: ClassVar = [(1, 512, 128, 128), (3, 256, 64, 32), (16, 512, 64, 64), (17, 256, 128, 64)]
    CONFIGS: ClassVar = [
        pallas_mosaic_gpu.Config(block_n=128, block_k=256, split_k=2, a_in_smem=True),
        pallas_mosaic_gpu.Config(block_n=64, block_k=64, split_k=2, a_in_smem=True),
        pallas_mosaic_gpu.Config(block_n=64, block_k=128, max_concurrent_steps=2, a_in_smem=True),
        pallas_mosaic_gpu.Config(block_n=64, block_k=128, block_m=8, a_in_smem=True),
        pallas_mosaic_gpu.Config(
            block_n=64, block_k=128, split_k=2, x_resident=True, a_in_smem=True
        ),
    ]

    def matmul(self, x, w):
        cfg = self.CONFIGS[self.SHAPES.index((x.shape[0], w.k, w.n, w.group_size))]
        return pallas_mosaic_gpu.int4_matmul_mosaic(x, w, config=cfg, interpret=True)

    def test_x_resident(self) -> None:
        """The whole x slice of a CTA copied once, sliced per step (3 steps, 2 splits)."""
        rng = np.random.default_rng(11)
        w, w_kn = random_weight(rng, 768, 64, 128, fmt="s4")
        x = jnp.asarray(rng.standard_normal((5, 768)), jnp.bfloat16)
        out = pallas_mosaic_gpu.int4_matmul_mosaic(x, w, config=self.CONFIGS[4], interpret=True)
        assert rel_err(out, np.asarray(x, np.float64) @ w_kn) < TOLERANCE[jnp.bfloat16]

    def test_partial_sums_and_swiglu(self) -> None:
        """Split-K partials ``[S, M, N]`` that sum to the product, and the SwiGLU epilogue
        on an interleaved gate/up weight (applied after the sum: no cluster here)."""
        rng = np.random.default_rng(12)
        cfg = pallas_mosaic_gpu.Config(block_n=64, block_k=128, split_k=2, a_in_smem=True)
        w, gate, up = random_swiglu_weight(rng, 256, 64, 64, fmt="s4")
        x = jnp.asarray(rng.standard_normal((3, 256)), jnp.bfloat16)
        run = functools.partial(pallas_mosaic_gpu.int4_matmul_mosaic, config=cfg, interpret=True)
        parts = run(x, w, partial_sums=True)
        assert parts.shape == (2, 3, 128) and parts.dtype == jnp.float32
        x64 = np.asarray(x, np.float64)
        truth = layout.interleave_gate_up(jnp.asarray(x64 @ gate), jnp.asarray(x64 @ up))
        assert rel_err(parts.sum(0), np.asarray(truth, np.float64)) < TOLERANCE[jnp.bfloat16]
        out = run(x, w, epilogue="swiglu")
        assert out.shape == (3, 64) and out.dtype == jnp.bfloat16
        assert rel_err(out, swiglu_truth(x, gate, up)) < TOLERANCE[jnp.bfloat16]

    def test_lowers_for_the_gpu(self) -> None:
        """The register-operand kernel (the one the GPU runs) lowers to Mosaic GPU on any
        host, with each epilogue: XLA-summed, partial sums out, cluster-reduced, SwiGLU."""
        w, _ = random_weight(np.random.default_rng(2), 1024, 256, 128, fmt="s4")
        cases = [
            (16, pallas_mosaic_gpu.Config(block_n=128, block_k=256, split_k=2), {}),
            (1, pallas_mosaic_gpu.Config(block_n=64, split_k=4), {"partial_sums": True}),
            (40, pallas_mosaic_gpu.Config(block_n=64, block_m=16), {"partial_sums": True}),
            (16, pallas_mosaic_gpu.Config(block_n=64, split_k=4, cluster_reduce=True), {}),
        ]
        cases += [
            (m, pallas_mosaic_gpu.Config(block_n=bn, split_k=sk, cluster_reduce=True), swiglu)
            for m, bn, sk in ((1, 64, 1), (16, 64, 2), (3, 128, 2))
            for swiglu in [{"epilogue": "swiglu"}]
        ]
        for m, cfg, kw in cases:
            x = jax.ShapeDtypeStruct((m, 1024), jnp.bfloat16)
            fn = jax.jit(
                lambda x, w, cfg=cfg, kw=kw: pallas_mosaic_gpu.int4_matmul_mosaic(
                    x, w, config=cfg, **kw
                )
            )
            text = fn.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
            assert "mosaic_gpu" in text

    @pytest.mark.parametrize(
        "m, cfg, kw",
        [
            (1, dict(split_k=4), {"partial_sums": True}),
            (1, dict(cluster_reduce=True), {"epilogue": "swiglu"}),
            (16, dict(block_k=128, split_k=2), {}),
            (8, dict(block_k=512, split_k=2, cluster_reduce=True), {}),
            (3, dict(block_n=128, split_k=2), {}),
        ],
    )
    def test_tiled_weights_lower_for_the_gpu(self, m, cfg, kw) -> None:
        """The decode kernel on a tiled u4_wgmma weight (128 x 256 tiles) lowers with half a
        tile, one or two tiles per step, 64 or 128 rows per CTA; 256 rows are refused."""
        w, _ = random_weight(np.random.default_rng(2), 1024, 256, 128, fmt="u4_wgmma")
        assert w.tile_n == 128 and w.q_packed.shape == (2, 4, 128, 32)
        config = pallas_mosaic_gpu.Config(**{"block_n": 64, **cfg})
        fn = jax.jit(lambda x, w: pallas_mosaic_gpu.int4_matmul_mosaic(x, w, config=config, **kw))
        x = jax.ShapeDtypeStruct((m, 1024), jnp.bfloat16)
        assert "mosaic_gpu" in fn.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
        with pytest.raises(NotImplementedError, match="tiled"):
            pallas_mosaic_gpu.int4_matmul_mosaic(
                jnp.ones((1, 1024), jnp.bfloat16), w, config=pallas_mosaic_gpu.Config(block_n=256)
            )
        # steps of 384 K rows would straddle the 256-row tiles
        w3, _ = random_weight(np.random.default_rng(3), 1536, 256, 128, fmt="u4_wgmma")
        assert w3.tile_n == 128
        with pytest.raises(NotImplementedError, match="tiled u4_wgmma .* block_k"):
            pallas_mosaic_gpu.int4_matmul_mosaic(
                jnp.ones((1, 1536), jnp.bfloat16),
                w3,
                config=pallas_mosaic_gpu.Config(block_n=64, block_k=384),
            )
        with pytest.raises(NotImplementedError, match="tiled u4_wgmma .* block_k"):
            pallas_mosaic_gpu_ws.int4_matmul_mosaic_ws(
                jnp.ones((64, 1536), jnp.bfloat16),
                w3,
                config=pallas_mosaic_gpu_ws.Config(block_n=64, block_k=384),
            )

    def test_prefetch_lowers_for_the_gpu(self) -> None:
        """A kernel that prefetches the next weight lowers, split or clustered, with the
        L2 prefetch instruction in it (and none without a prefetch)."""
        w, _ = random_weight(np.random.default_rng(2), 1024, 512, 128, fmt="u4_wgmma")
        # (the prefetch cuts the rows order: a tiled next weight is not prefetched)
        nxt, _ = random_weight(np.random.default_rng(3), 512, 1024, 128, tile_n=0, fmt="u4_wgmma")
        cfgs = (
            pallas_mosaic_gpu.Config(block_n=64, split_k=4),
            pallas_mosaic_gpu.Config(block_n=64, split_k=2, cluster_reduce=True),
        )
        x = jax.ShapeDtypeStruct((1, 1024), jnp.bfloat16)
        for cfg, nbytes in [(c, b) for c in cfgs for b in (0, 1 << 20)]:
            fn = jax.jit(
                lambda x, w, n, cfg=cfg, b=nbytes: pallas_mosaic_gpu.int4_matmul_mosaic(
                    x, w, config=cfg, prefetch=n, prefetch_split=2, prefetch_bytes=b
                )
            )
            text = fn.trace(x, w, nxt).lower(lowering_platforms=("cuda",)).as_text()
            assert "mosaic_gpu" in text
            assert ("cp.async.bulk.prefetch.tensor" in text) == (nbytes > 0)

    def test_prefetch_boxes_cover_the_weight_in_read_order(self) -> None:
        """Uncapped, the boxes tile every operand exactly once; capped, they stay within
        the bytes, keep the scales and zero points whole and take the codes' K chunks
        by position within the next kernel's splits."""
        tiled, _ = random_weight(np.random.default_rng(4), 4096, 512, 128, fmt="u4_wgmma")
        assert pallas_mosaic_gpu.prefetch_boxes(tiled, split=4, max_bytes=1 << 30) == ()
        w, _ = random_weight(np.random.default_rng(4), 4096, 512, 128, tile_n=0, fmt="u4_wgmma")
        operands = (w.q_packed, w.scales_gn, w.zeros_gn)

        def covered(boxes):
            seen = [np.zeros(a.shape, int) for a in operands]
            for bx in boxes:
                for b in range(bx.count):
                    r0, c0 = bx.origin(b)
                    seen[bx.operand][r0 : r0 + bx.rows, c0 : c0 + bx.cols] += 1
            return seen

        full = pallas_mosaic_gpu.prefetch_boxes(w, split=4, max_bytes=1 << 30)
        assert all((c == 1).all() for c in covered(full))
        nbytes = lambda a: a.size * a.dtype.itemsize  # noqa: E731
        sz = nbytes(w.scales_gn) + nbytes(w.zeros_gn)
        chunk = 512 * 64 * 4  # 512 rows x 64 words: one K chunk of 512 (of 8)
        capped = pallas_mosaic_gpu.prefetch_boxes(w, split=4, max_bytes=sz + 4 * chunk + 100)
        q_seen, s_seen, z_seen = covered(capped)
        assert (s_seen == 1).all() and (z_seen == 1).all()
        # 4 chunks of 8, split 4 ways (2 chunks each): the first chunk of every split.
        words = q_seen.sum(axis=0)
        assert list(words.reshape(8, 64).max(axis=1)) == [512, 0] * 4
        assert pallas_mosaic_gpu.prefetch_boxes(w, split=4, max_bytes=sz - 1) == ()
        s4, _ = random_weight(np.random.default_rng(4), 1024, 512, 128, fmt="s4")
        assert pallas_mosaic_gpu.prefetch_boxes(s4, split=1, max_bytes=1 << 30) == ()

    def test_many_token_kernel_lowers_for_the_gpu(self) -> None:
        """The warp-specialized kernel (3 warpgroups, transposed epilogue) lowers too."""
        for fmt, tile_n, m, cfg in (
            ("u4_wgmma", 0, 300, pallas_mosaic_gpu_ws.Config(group_m=2)),
            ("u4_wgmma", 128, 300, pallas_mosaic_gpu_ws.Config(block_n=64, group_m=2)),
            ("s4", None, 40, pallas_mosaic_gpu_ws.Config(block_n=64, block_m=40)),
            ("u4_wgmma", 128, 200, pallas_mosaic_gpu_ws.Config(block_n=64, split_k=4)),
            ("u4_wgmma", 128, 300, pallas_mosaic_gpu_ws.Config(block_n=64, block_k=256)),
            ("u4_wgmma", 0, 300, pallas_mosaic_gpu_ws.Config(persistent=True)),
        ):
            w, _ = random_weight(np.random.default_rng(3), 1024, 512, 128, tile_n, fmt=fmt)
            x = jax.ShapeDtypeStruct((m, 1024), jnp.bfloat16)
            fn = jax.jit(
                lambda x, w, cfg=cfg: pallas_mosaic_gpu_ws.int4_matmul_mosaic_ws(x, w, config=cfg)
            )
            assert "mosaic_gpu" in fn.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()

    def test_stream_probes_lower_for_the_gpu(self) -> None:
        """Every probe of `pallas_kernels.stream_probe` (load-only, dequant-only, mma-only
        pipelines at dispatch's grid) lowers to Mosaic GPU, so the tool stays runnable."""
        from pallas_kernels import stream_probe

        k, n, g = 2048, 1024, 128
        x = jax.ShapeDtypeStruct((1, k), jnp.bfloat16)
        sz = jax.ShapeDtypeStruct((k // g, n), jnp.float16)
        probes = stream_probe.probes(k, n, g)
        assert {p.body for p in probes} == {"none", "ld", "dequant", "mma", "mma1"}
        for p in probes:
            w = jax.ShapeDtypeStruct(stream_probe.weight_shape(p, k, n), jnp.uint32)
            fn = jax.jit(
                lambda x, w, s, z, p=p: stream_probe.run_probe(x, w, s, z, p=p, k=k, n=n, g=g)
            )
            assert (
                "mosaic_gpu" in fn.trace(x, w, sz, sz).lower(lowering_platforms=("cuda",)).as_text()
            )

    def test_stream_probe_variants_parse(self) -> None:
        """``--variants`` / ``--ws-variants`` text becomes typed Config changes; a field the
        config does not have is an error, not a silently timed default."""
        from pallas_kernels import stream_probe

        assert stream_probe.parse_changes("scale_in_dequant=True,block_k=512") == {
            "scale_in_dequant": True,
            "block_k": 512,
        }
        ws = stream_probe.parse_changes("persistent=False", pallas_mosaic_gpu_ws.Config)
        assert ws == {"persistent": False}
        with pytest.raises(ValueError, match="unknown Config field 'persistent'"):
            stream_probe.parse_changes("persistent=True")

    def test_unsupported_raises(self) -> None:
        rng = np.random.default_rng(0)
        u4, _ = random_weight(rng, 256, 64, 64, fmt="u4_split")
        x = jnp.ones((2, 256), jnp.bfloat16)
        with pytest.raises(NotImplementedError, match="s4"):
            pallas_mosaic_gpu.int4_matmul_mosaic(x, u4)
        s4, _ = random_weight(rng, 256, 96, 64, fmt="s4")  # N=96: no 64-row block divides it
        with pytest.raises(NotImplementedError, match="block_n"):
            pallas_mosaic_gpu.int4_matmul_mosaic(x, s4, config=pallas_mosaic_gpu.Config())
        with pytest.raises(NotImplementedError, match="u4_split"):
            pallas_triton.int4_matmul_triton(x, s4)
        with pytest.raises(NotImplementedError, match="block_n"):
            pallas_mosaic_gpu_ws.int4_matmul_mosaic_ws(jnp.ones((64, 256), jnp.bfloat16), s4)
        cfg = pallas_mosaic_gpu.Config(block_n=64, block_k=128)
        with pytest.raises(NotImplementedError, match="a_in_smem"):
            pallas_mosaic_gpu.int4_matmul_mosaic(
                x, random_weight(rng, 256, 64, 64, fmt="s4")[0], config=cfg, interpret=True
            )


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
class TestGpu(_Int4MatmulCases):
    """Every backend compiled on the GPU, on Llama-like and awkward shapes."""

    SHAPES: ClassVar = [
        (1, 4096, 4096, 128),
        (3, 4096, 1024, 64),
        (17, 2048, 2048, 32),
        (100, 4096, 512, 128),
    ]

    # (implementation, weight format, Mosaic config or None); "u4_wgmma" is tiled where the
    # shape allows (prepare_weight's default), "u4_wgmma:rows" in the [N, K / 8] order
    VARIANTS: ClassVar = [
        ("triton", "u4_split", None),
        ("mosaic", "s4", None),
        ("mosaic", "s4", pallas_mosaic_gpu.Config(block_n=64, block_k=128, a_in_smem=True)),
        ("mosaic", "u4_wgmma", None),
        ("mosaic", "u4_wgmma:rows", None),
        ("mosaic", "u4_wgmma:rows", pallas_mosaic_gpu.Config(block_n=128, scale_in_dequant=True)),
        # tiled weights: half a tile per step, two tiles per step
        ("mosaic", "u4_wgmma", pallas_mosaic_gpu.Config(block_n=64, block_k=128, split_k=2)),
        ("mosaic", "u4_wgmma", pallas_mosaic_gpu.Config(block_n=64, block_k=512)),
        # the in-kernel epilogue: one CTA per row tile, and a cluster of 4 / 2 along K
        ("mosaic", "u4_wgmma", pallas_mosaic_gpu.Config(block_n=64, cluster_reduce=True)),
        (
            "mosaic",
            "u4_wgmma",
            pallas_mosaic_gpu.Config(block_n=64, split_k=4, cluster_reduce=True),
        ),
        (
            "mosaic",
            "s4",
            pallas_mosaic_gpu.Config(block_n=64, block_k=128, split_k=2, cluster_reduce=True),
        ),
        (None, "u4_split", None),
        (None, "s4", None),
    ]

    @pytest.fixture(params=range(len(VARIANTS)))
    def variant(self, request):
        return self.VARIANTS[request.param]

    @pytest.fixture(autouse=True)
    def _bind(self, variant):
        self._impl, fmt, self._cfg = variant
        self.FMT, _, order = fmt.partition(":")
        self.TILE_N = 0 if order == "rows" else None

    def matmul(self, x, w):
        if self._cfg is not None:
            fn = lambda x, w: pallas_mosaic_gpu.int4_matmul_mosaic(x, w, config=self._cfg)  # noqa: E731
        else:
            fn = lambda x, w: int4_matmul(x, w, implementation=self._impl)  # noqa: E731
        try:
            return jax.jit(fn)(x, w)
        except NotImplementedError as e:
            pytest.skip(f"{self._impl} does not support this shape: {e}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
class TestGpuEpilogues:
    """The decode kernel's epilogues on the GPU: split-K partial sums out (one and several
    M tiles), and SwiGLU from the accumulators (one CTA per row tile, clusters of 2),
    against float64 truths; dispatch's choice for the model's shapes too."""

    CFG = pallas_mosaic_gpu.Config

    @pytest.mark.parametrize("fmt", ["u4_wgmma", "s4"])
    @pytest.mark.parametrize(
        "m, cfg",
        [
            (1, CFG(block_n=64, split_k=4)),
            (16, CFG(block_n=64, split_k=4)),
            (40, CFG(block_n=64, block_m=16, split_k=2)),
            (3, CFG(block_n=64, cluster_reduce=True)),
        ],
    )
    def test_partial_sums(self, m, cfg, fmt) -> None:
        rng = np.random.default_rng(m)
        w, w_kn = random_weight(rng, 2048, 512, 128, fmt=fmt)
        x = jnp.asarray(rng.standard_normal((m, 2048)), jnp.bfloat16)
        fn = jax.jit(
            lambda x, w: pallas_mosaic_gpu.int4_matmul_mosaic(x, w, config=cfg, partial_sums=True)
        )
        parts = fn(x, w)
        want_s = 1 if cfg.cluster_reduce else cfg.split_k
        assert parts.shape == (want_s, m, 512)
        assert (
            rel_err(parts.astype(jnp.float32).sum(0), np.asarray(x, np.float64) @ w_kn)
            < (TOLERANCE[jnp.bfloat16])
        )

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
    @pytest.mark.parametrize(
        "m, cfg",
        [
            (1, CFG(block_n=64, cluster_reduce=True)),
            (16, CFG(block_n=64, cluster_reduce=True)),
            (5, CFG(block_n=64, split_k=2, cluster_reduce=True)),
            (9, CFG(block_n=128, split_k=2, cluster_reduce=True)),
            (3, CFG(block_n=64, split_k=4)),  # no cluster: XLA applies it after the sum
            (16, None),  # dispatch
        ],
    )
    def test_swiglu(self, m, cfg, dtype) -> None:
        rng = np.random.default_rng(100 + m)
        w, gate, up = random_swiglu_weight(rng, 2048, 3584, 128, fmt="u4_wgmma")
        x = jnp.asarray(rng.standard_normal((m, 2048)), dtype)
        if cfg is None:
            fn = jax.jit(lambda x, w: int4_matmul(x, w, epilogue="swiglu"))
        else:
            fn = jax.jit(
                lambda x, w: pallas_mosaic_gpu.int4_matmul_mosaic(
                    x, w, config=cfg, epilogue="swiglu"
                )
            )
        out = fn(x, w)
        assert out.shape == (m, 3584) and out.dtype == dtype
        assert rel_err(out, swiglu_truth(x, gate, up)) < TOLERANCE[dtype]

    @pytest.mark.parametrize(
        "m, cfg",
        [(1, CFG(block_n=64, split_k=4)), (16, CFG(block_n=64, split_k=2, cluster_reduce=True))],
    )
    def test_prefetch_changes_no_result(self, m, cfg) -> None:
        """Prefetching the next weight (whole, and capped) gives bitwise the same output."""
        rng = np.random.default_rng(200 + m)
        w, w_kn = random_weight(rng, 2048, 512, 128, fmt="u4_wgmma")
        nxt, _ = random_weight(rng, 512, 2048, 128, tile_n=0, fmt="u4_wgmma")
        x = jnp.asarray(rng.standard_normal((m, 2048)), jnp.bfloat16)

        def run(nbytes):
            kw = dict(prefetch=nxt, prefetch_split=2, prefetch_bytes=nbytes) if nbytes else {}
            fn = jax.jit(lambda x, w: pallas_mosaic_gpu.int4_matmul_mosaic(x, w, config=cfg, **kw))
            return np.asarray(fn(x, w).astype(jnp.float32))

        plain = run(0)
        truth = np.asarray(x, np.float64) @ w_kn
        assert rel_err(jnp.asarray(plain), truth) < TOLERANCE[jnp.bfloat16]
        np.testing.assert_array_equal(run(1 << 30), plain)
        np.testing.assert_array_equal(run(300_000), plain)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
class TestGpuManyTokens(_Int4MatmulCases):
    """The warp-specialized many-token kernel (``mosaic_ws``) on the GPU: M not a
    multiple of the token tile, several tiles along M and N, both Mosaic formats."""

    SHAPES: ClassVar = [
        (129, 1024, 512, 128),
        (256, 2048, 1024, 128),
        (1000, 4096, 512, 128),
        (40, 512, 256, 64),
    ]
    VARIANTS: ClassVar = [  # "u4_wgmma" tiled where the shape allows, ":rows" not
        ("u4_wgmma:rows", pallas_mosaic_gpu_ws.Config()),
        ("u4_wgmma", pallas_mosaic_gpu_ws.Config(block_n=64)),
        ("u4_wgmma", pallas_mosaic_gpu_ws.Config(block_n=64, block_k=256)),
        ("u4_wgmma", pallas_mosaic_gpu_ws.Config(block_n=64, block_m=256, group_m=3)),
        ("s4", pallas_mosaic_gpu_ws.Config(block_n=64, block_m=64)),
        ("s4", pallas_mosaic_gpu_ws.Config(block_n=128, block_m=40, block_k=256)),
        ("u4_wgmma", pallas_mosaic_gpu_ws.Config(block_n=64, block_m=64, split_k=2)),
        ("u4_wgmma", pallas_mosaic_gpu_ws.Config(block_n=64, group_m=2, persistent=True)),
        ("s4", pallas_mosaic_gpu_ws.Config(block_n=64, block_m=64, split_k=2, persistent=True)),
    ]

    @pytest.fixture(params=range(len(VARIANTS)))
    def variant(self, request):
        return self.VARIANTS[request.param]

    @pytest.fixture(autouse=True)
    def _bind(self, variant):
        fmt, self._cfg = variant
        self.FMT, _, order = fmt.partition(":")
        self.TILE_N = 0 if order == "rows" else None

    def matmul(self, x, w):
        try:
            return pallas_mosaic_gpu_ws.int4_matmul_mosaic_ws(x, w, config=self._cfg)
        except NotImplementedError as e:
            pytest.skip(f"mosaic_ws does not support this shape: {e}")


class TestLayoutAndApi:
    def test_pack_roundtrip(self) -> None:
        rng = np.random.default_rng(3)
        q = rng.integers(0, 16, (256, 48), dtype=np.uint8)
        for gs in (32, 64, 128):
            packed = layout.pack_codes(jnp.asarray(q), gs)
            assert packed.shape == (48, 128) and packed.dtype == jnp.uint8
            np.testing.assert_array_equal(layout.unpack_codes(packed, gs), q.T)

    def test_weight_bytes(self) -> None:
        """The Triton kernel's tiled ``u4_split`` layout (named: a Hopper GPU's default
        format is another) holds the plain layout's bytes, re-tiled."""
        rng = np.random.default_rng
        w, _ = random_weight(rng(0), 512, 64, 128, tile_n=64, fmt="u4_split")
        assert w.q_packed.nbytes == 512 * 64 // 2
        assert w.tile_n == 64 and w.q_packed.shape == (1, 4, 64, 64)
        plain, _ = random_weight(rng(0), 512, 64, 128, tile_n=0, fmt="u4_split")
        assert plain.tile_n == 0 and plain.q_packed.shape == (64, 256)
        np.testing.assert_array_equal(w.q_nk2, plain.q_packed)

    @pytest.mark.parametrize("gs", [0, 3, 48, 1000])
    def test_bad_group_size(self, gs: int) -> None:
        with pytest.raises(ValueError, match="group_size"):
            prepare_weight(
                jnp.zeros((256, 8), jnp.uint8),
                jnp.ones((1, 8), jnp.float16),
                jnp.zeros((1, 8), jnp.uint8),
                group_size=gs,
            )

    def test_dequant_probe_ops_are_named(self) -> None:
        """The decode kernel's dequantization probes (ab_alu.py, stream_probe.py) refuse
        an unknown name before building anything."""
        with pytest.raises(ValueError, match="ops must be"):
            pallas_mosaic_gpu._dequant_wgmma(None, None, jnp.bfloat16, ops="nozero")

    @pytest.mark.parametrize("fmt", layout.FORMATS)
    def test_leading_dims_jit_and_pytree(self, fmt: str) -> None:
        # On the H200 the XLA path once gave rel_err 0.50 here for s4, most likely XLA
        # fusing the int4 converts into its Triton GEMM (see reference._unfused).
        rng = np.random.default_rng(5)
        w, w_kn = random_weight(rng, 256, 64, 128 if fmt == "u4_wgmma" else 64, fmt=fmt)
        x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.bfloat16)
        leaves = jax.tree_util.tree_leaves(w)
        assert len(leaves) == 3
        out = jax.jit(lambda x, w: int4_matmul(x, w, implementation="xla"))(x, w)
        assert out.shape == (2, 3, 64)
        truth = np.asarray(x, np.float64) @ w_kn
        assert rel_err(out, truth) < TOLERANCE[jnp.bfloat16]

    @pytest.mark.parametrize("fmt", layout.FORMATS)
    def test_dequantize_matches_definition(self, fmt: str) -> None:
        w, w_kn = random_weight(np.random.default_rng(6), 256, 32, 128, fmt=fmt)
        assert w.fmt == fmt
        np.testing.assert_allclose(np.asarray(dequantize(w)).T, w_kn, rtol=1e-6)

    def test_formats_hold_the_same_codes(self) -> None:
        rng = np.random.default_rng(4)
        q = rng.integers(0, 16, (256, 64), dtype=np.uint8)
        ones, zeros = jnp.ones((4, 64), jnp.float16), jnp.zeros((4, 64), jnp.uint8)
        ones, zeros = jnp.ones((2, 64), jnp.float16), jnp.zeros((2, 64), jnp.uint8)
        ws = {
            f: prepare_weight(jnp.asarray(q), ones, zeros, group_size=128, fmt=f)
            for f in layout.FORMATS
        }
        assert ws["s4"].q_packed.dtype == jnp.int4 and ws["s4"].q_packed.shape == (64, 256)
        for w in ws.values():
            np.testing.assert_array_equal(w.codes_nk(), q.T)
        np.testing.assert_array_equal(ws["s4"].q_nk2, ws["u4_split"].q_nk2)
        assert ws["u4_wgmma"].q_packed.dtype == jnp.uint32
        assert ws["u4_wgmma"].tile_n == 0 and ws["u4_wgmma"].q_packed.shape == (64, 32)
        # N = 64 does not cut into 128-row tiles; 256 does
        with pytest.raises(ValueError, match="tiled"):
            prepare_weight(jnp.asarray(q), ones, zeros, group_size=128, fmt="u4_wgmma", tile_n=128)
        q2 = np.concatenate([q] * 4, axis=1)
        ones2, zeros2 = jnp.ones((2, 256), jnp.float16), jnp.zeros((2, 256), jnp.uint8)
        tiled = prepare_weight(jnp.asarray(q2), ones2, zeros2, group_size=128, fmt="u4_wgmma")
        assert tiled.tile_n == 128 and tiled.q_packed.shape == (2, 1, 128, 32)
        rows = prepare_weight(
            jnp.asarray(q2), ones2, zeros2, group_size=128, fmt="u4_wgmma", tile_n=0
        )
        assert rows.q_packed.shape == (256, 32)
        np.testing.assert_array_equal(tiled.words_nk8, rows.q_packed)
        np.testing.assert_array_equal(tiled.codes_nk(), q2.T)
        # the scales and zero points tiled with the codes: a 128 x 256 tile's groups together
        s_gn = np.arange(2 * 256, dtype=np.float16).reshape(2, 256)
        st = prepare_weight(jnp.asarray(q2), s_gn, zeros2, group_size=128, fmt="u4_wgmma")
        assert st.scales_gn.shape == (2, 1, 2, 128)
        np.testing.assert_array_equal(st.scales_gn[1, 0, 1], s_gn[1, 128:])
        np.testing.assert_array_equal(st.plain_scales, s_gn)
        np.testing.assert_array_equal(st.plain_zeros, np.zeros((2, 256)))
        np.testing.assert_array_equal(rows.plain_scales, rows.scales_gn)
        with pytest.raises(ValueError, match="fmt"):
            prepare_weight(jnp.asarray(q), ones, zeros, group_size=128, fmt="u8")
        with pytest.raises(ValueError, match="128"):
            prepare_weight(
                jnp.asarray(q),
                jnp.ones((4, 64), jnp.float16),
                jnp.zeros((4, 64), jnp.uint8),
                group_size=64,
                fmt="u4_wgmma",
            )

    def test_wgmma_order_puts_pairs_in_nibbles_p_and_p_plus_4(self) -> None:
        """Word 4j + v, nibble t of a chunk = column 8 (4v + t % 4) + 2j + t // 4."""
        q = np.zeros((1, 128), np.uint8)
        for col in range(128):
            q[0, col] = col % 16
        words = np.asarray(layout.pack_wgmma(jnp.asarray(q)))[0]
        for word in range(16):
            j, v = divmod(word, 4)
            for t in range(8):
                col = 8 * (4 * v + t % 4) + 2 * j + t // 4
                assert (int(words[word]) >> (4 * t)) & 0xF == col % 16

    def test_empty_and_f32_inputs_fall_back(self) -> None:
        w, w_kn = random_weight(np.random.default_rng(8), 256, 64, 64, tile_n=64)
        assert int4_matmul(jnp.ones((0, 256), jnp.bfloat16), w).shape == (0, 64)
        x = np.random.default_rng(9).standard_normal((2, 256)).astype(np.float32)
        out = int4_matmul(jnp.asarray(x), w)  # f32: no kernel takes it; the reference does
        assert out.dtype == jnp.float32 and rel_err(out, x @ w_kn) < 1e-5

    def test_swiglu_epilogue_and_partial_sums(self) -> None:
        """``epilogue="swiglu"`` on an interleaved weight is silu(x @ gate) * (x @ up) for
        every layout; ``partial_sums`` stacks terms that sum to the product; bad combos
        raise."""
        rng = np.random.default_rng(13)
        x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.bfloat16)
        for fmt in layout.FORMATS:
            w, gate, up = random_swiglu_weight(rng, 256, 48, 128, fmt=fmt)
            out = jax.jit(lambda x, w: int4_matmul(x, w, epilogue="swiglu"))(x, w)
            assert out.shape == (2, 3, 48) and out.dtype == jnp.bfloat16
            assert rel_err(out, swiglu_truth(x, gate, up)) < TOLERANCE[jnp.bfloat16]
            parts = int4_matmul(x, w, partial_sums=True)
            plain = int4_matmul(x, w)
            assert parts.shape[1:] == plain.shape and parts.ndim == 4
            np.testing.assert_array_equal(parts.astype(jnp.float32).sum(0), plain)
        with pytest.raises(ValueError, match="partial_sums"):
            int4_matmul(x, w, epilogue="swiglu", partial_sums=True)
        with pytest.raises(ValueError, match="epilogue"):
            int4_matmul(x, w, epilogue="gelu")
        w40, _ = random_weight(rng, 256, 40, 128)
        with pytest.raises(ValueError, match="multiple of 16"):
            int4_matmul(x, w40, epilogue="swiglu")
        with pytest.raises(ValueError, match="multiple of 8"):
            layout.interleave_gate_up(jnp.zeros((4, 12)), jnp.zeros((4, 12)))

    def test_unknown_implementation(self) -> None:
        w, _ = random_weight(np.random.default_rng(0), 64, 16, 32)
        with pytest.raises(ValueError, match="implementation"):
            int4_matmul(jnp.ones((1, 64), jnp.bfloat16), w, implementation="cuda")

    @pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 100, 128])
    def test_mosaic_heuristic_configs_are_supported(self, m: int) -> None:
        """Dispatch's Mosaic config runs on every Llama-3 8B / 70B layer shape up to the
        largest M it is used for (an unsupported one would silently fall back to XLA)."""
        from pallas_kernels import bench, tuning

        for k, n in bench.SHAPES["8b"] + bench.SHAPES["70b"]:
            cfg = tuning.mosaic_config("NVIDIA H100 80GB HBM3", m, k, n, 128)
            w = tuning.WeightShape(k, n, 128, fmt="u4_wgmma")
            pallas_mosaic_gpu.check_supported(m, w, jnp.bfloat16, cfg)
            assert cfg.cluster_reduce == (n >= 6400)  # >= 100 row tiles of 64

    @pytest.mark.parametrize("m", [1, 8, 16])
    def test_decode_depth_caps_the_bytes_in_flight(self, m: int) -> None:
        """At decode, dispatch's pipeline depth keeps the weight copies in flight of all
        CTAs within `tuning.IN_FLIGHT_BYTES` (down to depth 2) wherever they are all
        resident at once: gate_up's 448 CTAs and qkv's 384 run 2 deep, o_proj's and
        down_proj's 256 keep 4 (runs 72-73 measured each of those choices)."""
        from pallas_kernels import bench, tuning

        h100 = "NVIDIA H100 80GB HBM3"
        for k, n in bench.SHAPES["8b"] + bench.SHAPES["70b"]:
            cfg = tuning.mosaic_config(h100, m, k, n, 128)
            ctas = n // cfg.block_n * cfg.split_k
            if ctas > 5 * 132:  # several waves: the in-flight bytes are not all CTAs'
                continue
            step = cfg.block_n * cfg.block_k // 2 + 4 * (cfg.block_k // 128) * cfg.block_n
            depth = cfg.max_concurrent_steps
            assert depth == 2 or ctas * depth * step <= tuning.IN_FLIGHT_BYTES, (k, n)
            assert depth == 4 or ctas * (depth + 1) * step > tuning.IN_FLIGHT_BYTES, (k, n)
        depths = {
            (k, n): tuning.mosaic_config(h100, m, k, n, 128).max_concurrent_steps
            for k, n in bench.SHAPES["8b"]
        }
        assert depths == {(4096, 6144): 2, (4096, 4096): 4, (4096, 28672): 2, (14336, 4096): 4}

    @pytest.mark.parametrize("m", [1, 8, 16, 17])
    def test_decode_choices_per_part(self, m: int) -> None:
        """The H200's decode choices (run 76): K steps of 512 rows, 2 deep, for gate_up
        and down_proj up to 8 tokens, nothing else changed. The H100 and parts without an
        entry keep steps of 256. Neither prefetches into the L2 (runs 76 and 92)."""
        from pallas_kernels import bench, tuning

        h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
        assert tuning.decode_choices(h200) == tuning.DecodeChoices(0, 512)
        assert tuning.decode_choices(h100) == tuning.decode_choices("NVIDIA H800")
        assert tuning.decode_choices(h100) == tuning.DecodeChoices(0, 256)
        for k, n in bench.SHAPES["8b"] + bench.SHAPES["70b"]:
            old, new = (tuning.mosaic_config(d, m, k, n, 128) for d in (h100, h200))
            w = tuning.WeightShape(k, n, 128, fmt="u4_wgmma")
            pallas_mosaic_gpu.check_supported(m, w, jnp.bfloat16, new)
            assert old.block_k == (256 if m <= 16 else 128), (k, n)
            large = m <= 8 and k * n >= 32 * 2**20
            assert new.block_k == (512 if large else old.block_k), (k, n)
            if not large:
                assert new == old, (k, n)
            assert new.split_k == old.split_k and new.cluster_reduce == old.cluster_reduce
        if m <= 8:
            for k, n in ((4096, 28672), (14336, 4096)):  # gate_up, down_proj
                assert tuning.mosaic_config(h200, m, k, n, 128).max_concurrent_steps == 2

    @pytest.mark.parametrize("m", [17, 32, 64, 100, 128, 129, 256, 1000, 2048, 4096, 16384])
    def test_many_token_dispatch(self, m: int) -> None:
        """Above 16 tokens a Hopper GPU runs the warp-specialized kernel, with a config
        it supports on every Llama-3 8B / 70B layer; other devices keep their paths."""
        from pallas_kernels import bench, tuning

        h100 = "NVIDIA H100 80GB HBM3"
        for k, n in bench.SHAPES["8b"] + bench.SHAPES["70b"]:
            assert tuning.choose_implementation(h100, m, k, n, 128, "u4_wgmma") == "mosaic_ws"
            assert tuning.choose_implementation(h100, 16, k, n, 128, "u4_wgmma") == "mosaic"
            assert tuning.choose_implementation("cpu", m, k, n, 128, "u4_wgmma") == "xla"
            # groups of 32 (s4 only): the decode kernel up to 128 tokens, then XLA
            g32 = tuning.choose_implementation(h100, m, k, n, 32, "s4")
            assert g32 == ("mosaic" if m <= 128 else "xla")
            cfg = tuning.mosaic_ws_config(h100, m, k, n, 128)
            w = tuning.WeightShape(k, n, 128, fmt="u4_wgmma")
            pallas_mosaic_gpu_ws.check_supported(m, w, jnp.bfloat16, cfg)
        # SmolLM2-135M (groups of 64, s4): K = 576 takes no step of 128 rows, N = 576 no
        # tile of 128: the decode kernel up to 128 tokens, then XLA; K = 1536 runs it.
        for k, n in ((576, 1536), (1536, 576)):
            impl = tuning.choose_implementation(h100, m, k, n, 64, "s4")
            assert impl == ("mosaic" if m <= 128 else "xla"), (k, n)
        assert tuning.choose_implementation(h100, m, 1536, 1536, 64, "s4") == "mosaic_ws"
