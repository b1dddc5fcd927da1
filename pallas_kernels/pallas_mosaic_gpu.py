"""Mosaic GPU (Hopper) backend: placeholder until the wgmma kernel lands."""

from __future__ import annotations

import dataclasses

import jax

from pallas_kernels.layout import Int4Weight


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes of the Mosaic GPU kernel."""

    block_n: int = 128
    block_m: int = 16
    block_k: int = 128
    split_k: int = 1
    max_concurrent_steps: int = 4


def int4_matmul_mosaic(
    x_mk: jax.Array, w: Int4Weight, *, config: Config | None = None
) -> jax.Array:
    """Not implemented yet: raises so dispatch falls back."""
    del x_mk, w, config
    raise NotImplementedError("the Mosaic GPU int4 kernel is not implemented yet")
