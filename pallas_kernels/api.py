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
from pallas_kernels.reference import int4_matmul_reference

IMPLEMENTATIONS = ("xla", "triton", "mosaic", "mosaic_ws")


def _device_kind() -> str:
    """The device kind of the default backend ("cpu" for CPU, e.g. "NVIDIA H100 80GB HBM3")."""
    dev = jax.devices()[0]
    return "cpu" if dev.platform == "cpu" else dev.device_kind


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


def _run(impl: str, x_mk: jax.Array, w: Int4Weight) -> jax.Array:
    m = x_mk.shape[0]
    if impl == "xla":
        return int4_matmul_reference(x_mk, w)
    if impl == "triton":
        cfg = tuning.triton_config(_device_kind(), m, w.k, w.n, w.group_size)
        if w.tile_n and cfg.block_n != w.tile_n:
            cfg = dataclasses.replace(cfg, block_n=w.tile_n)
        return pallas_triton.int4_matmul_triton(x_mk, w, config=cfg)
    if impl == "mosaic":
        cfg = tuning.mosaic_config(_device_kind(), m, w.k, w.n, w.group_size)
        return pallas_mosaic_gpu.int4_matmul_mosaic(x_mk, w, config=cfg)
    if impl == "mosaic_ws":
        cfg = tuning.mosaic_ws_config(_device_kind(), m, w.k, w.n, w.group_size)
        return pallas_mosaic_gpu_ws.int4_matmul_mosaic_ws(x_mk, w, config=cfg)
    raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}; got {impl!r}")


def choose(m: int, w: Int4Weight) -> str:
    """The implementation dispatch uses for ``M`` tokens on the default device."""
    return tuning.choose_implementation(_device_kind(), m, w.k, w.n, w.group_size, w.fmt)


def int4_matmul(x: jax.Array, w: Int4Weight, *, implementation: str | None = None) -> jax.Array:
    """``x[..., K] @ W[K, N]`` for a grouped int4 weight; returns ``[..., N]`` in x.dtype.

    Args:
      x: bf16 or f16 activations; leading dims are flattened into M.
      w: the weight from :func:`pallas_kernels.prepare_weight`.
      implementation: None (dispatch), "xla", "triton", "mosaic" or "mosaic_ws". An explicit backend
        raises ``NotImplementedError`` for shapes it does not support; None falls back
        to "xla" instead.
    """
    if x.shape[-1] != w.k:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={w.k}")
    lead = x.shape[:-1]
    x_mk = x.reshape(-1, w.k)
    if implementation is None:
        impl = choose(x_mk.shape[0], w) if x_mk.shape[0] else "xla"
        try:
            y = _run(impl, x_mk, w)
        except NotImplementedError:
            y = int4_matmul_reference(x_mk, w)
    else:
        y = _run(implementation, x_mk, w)
    return y.reshape(*lead, w.n)
