"""The public entry point: ``int4_matmul`` dispatching over the backends.

``implementation=None`` picks per (device kind, M, K, N) with :func:`choose`, and falls
back to the reference when the chosen backend raises ``NotImplementedError`` for the
shape. The backend names are those of the benchmark records: ``"xla"`` (the reference:
dequantize in jnp, then ``jnp.dot``), ``"triton"``, ``"mosaic"`` (Hopper, few tokens) and
``"mosaic_ws"`` (Hopper, many tokens: the warp-specialized GEMM).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from pallas_kernels import pallas_mosaic_gpu, pallas_mosaic_gpu_ws, pallas_triton, tuning
from pallas_kernels.layout import Int4Weight
from pallas_kernels.reference import int4_matmul_reference, swiglu_interleaved

IMPLEMENTATIONS = ("xla", "triton", "mosaic", "mosaic_ws")


def _device_kind() -> str:
    """The device kind of the default backend ("cpu" for CPU, e.g. "NVIDIA H100 80GB HBM3")."""
    dev = jax.devices()[0]
    return "cpu" if dev.platform == "cpu" else dev.device_kind


def device_tag() -> str:
    """A short name of the default device for benchmark file names: "h100", "h200",
    "a100", else "gpu" or the platform ("cpu")."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return dev.platform
    kind = dev.device_kind.lower()
    return next((t for t in ("h100", "h200", "a100") if t in kind), "gpu")


def on_nvidia_gpu() -> bool:
    """Whether the default device is an NVIDIA GPU (where the Triton kernels run)."""
    return _device_kind().startswith("NVIDIA")


def dispatch[T](implementation: str | None, backends: dict[str, Callable[[], T]]) -> T:
    """Runs ``backends[implementation]()``; for None, ``backends["triton"]()`` on NVIDIA
    GPUs and ``backends["xla"]()`` elsewhere or where Triton raises ``NotImplementedError``.

    The small decode kernels (`pallas_kernels.attention`, `pallas_kernels.norm`) have one
    GPU backend each and no tuned table: this is their whole dispatch.
    """
    if implementation is None:
        if on_nvidia_gpu() and "triton" in backends:
            try:
                return backends["triton"]()
            except NotImplementedError:
                pass
        return backends["xla"]()
    if implementation not in backends:
        raise ValueError(
            f"implementation must be None or one of {tuple(backends)}; got {implementation!r}"
        )
    return backends[implementation]()


def _run(
    impl: str,
    x_mk: jax.Array,
    w: Int4Weight,
    epilogue: str | None,
    partial_sums: bool,
    prefetch: Int4Weight | None = None,
) -> jax.Array:
    """The backend's product ``[M, N]`` (``[S, M, N]`` partial sums with ``partial_sums``);
    only the Mosaic decode kernel fuses the epilogue, returns S > 1 partials or prefetches."""
    m = x_mk.shape[0]
    if impl == "mosaic":
        device = _device_kind()
        cfg = tuning.mosaic_config(device, m, w.k, w.n, w.group_size)
        pf = {}
        # How much of the next weight to prefetch into the L2 is the part's choice
        # (`tuning.DECODE`: none on the H100 and the H200 since run 92).
        pf_bytes = tuning.decode_choices(device).prefetch_bytes
        if prefetch is not None and pf_bytes > 0:
            nxt = tuning.mosaic_config(device, m, prefetch.k, prefetch.n, prefetch.group_size)
            pf = dict(prefetch=prefetch, prefetch_split=nxt.split_k, prefetch_bytes=pf_bytes)
        return pallas_mosaic_gpu.int4_matmul_mosaic(
            x_mk, w, config=cfg, epilogue=epilogue, partial_sums=partial_sums, **pf
        )
    if impl == "xla":
        y = int4_matmul_reference(x_mk, w)
    elif impl == "triton":
        cfg = tuning.triton_config(_device_kind(), m, w.k, w.n, w.group_size)
        if w.tile_n and cfg.block_n != w.tile_n:
            cfg = dataclasses.replace(cfg, block_n=w.tile_n)
        y = pallas_triton.int4_matmul_triton(x_mk, w, config=cfg)
    elif impl == "mosaic_ws":
        cfg = tuning.mosaic_ws_config(_device_kind(), m, w.k, w.n, w.group_size)
        y = pallas_mosaic_gpu_ws.int4_matmul_mosaic_ws(x_mk, w, config=cfg)
    else:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}; got {impl!r}")
    if epilogue == "swiglu":
        y = swiglu_interleaved(y)
    return y[None] if partial_sums else y


def choose(m: int, w: Int4Weight) -> str:
    """The implementation dispatch uses for ``M`` tokens on the default device."""
    return tuning.choose_implementation(_device_kind(), m, w.k, w.n, w.group_size, w.fmt)


def int4_matmul(
    x: jax.Array,
    w: Int4Weight,
    *,
    implementation: str | None = None,
    epilogue: str | None = None,
    partial_sums: bool = False,
    prefetch: Int4Weight | None = None,
) -> jax.Array:
    """``x[..., K] @ W[K, N]`` for a grouped int4 weight; returns ``[..., N]`` in x.dtype.

    Args:
      x: bf16 or f16 activations; leading dims are flattened into M.
      w: the weight from :func:`pallas_kernels.prepare_weight`.
      implementation: None (dispatch), "xla", "triton", "mosaic" or "mosaic_ws". An explicit backend
        raises ``NotImplementedError`` for shapes it does not support; None falls back
        to "xla" instead.
      epilogue: None, or "swiglu": W's columns are gate/up blocks
        (`pallas_kernels.layout.interleave_gate_up`) and the result is ``silu(gate) * up``,
        ``[..., N / 2]`` (`reference.swiglu_interleaved`). The Mosaic decode kernel applies
        it to its f32 accumulators in its own epilogue where it finishes the product in
        the kernel (N of 100 row tiles or more); elsewhere XLA applies it to the product.
      partial_sums: return ``[S, ..., N]`` terms whose sum over S (in f32, rounded to
        x.dtype) is the product: the Mosaic decode kernel's S split-K partials in f32,
        which a consumer kernel adds itself (`add_rms_norm`'s and
        `decode_attention_update_qkv`'s stacked operands) instead of an XLA pass per
        matmul; S = 1 (the product itself) for every other backend and config.
      prefetch: the weight the next matmul will read. The Mosaic decode kernel's CTAs
        prefetch up to the part's ``tuning.decode_choices(...).prefetch_bytes`` of it
        into the L2 as they finish (TMA prefetches: no result changes), so its bytes
        move while the small kernels between the two matmuls (attention, norms) leave
        the memory idle. Off on the H100 and the H200 (`tuning.DECODE`, runs 76 and 92:
        the small kernels lose more than the matmuls gain). Other backends ignore it.
    """
    if x.shape[-1] != w.k:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={w.k}")
    pallas_mosaic_gpu.check_epilogue(w.n, epilogue, partial_sums)
    lead = x.shape[:-1]
    x_mk = x.reshape(-1, w.k)
    if implementation is None:
        impl = choose(x_mk.shape[0], w) if x_mk.shape[0] else "xla"
        try:
            y = _run(impl, x_mk, w, epilogue, partial_sums, prefetch)
        except NotImplementedError:
            y = _run("xla", x_mk, w, epilogue, partial_sums)
    else:
        y = _run(implementation, x_mk, w, epilogue, partial_sums, prefetch)
    return y.reshape(*y.shape[:-2], *lead, y.shape[-1])
