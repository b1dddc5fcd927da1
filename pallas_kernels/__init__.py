"""Grouped int4 dequantize-matmul: a jnp reference and Pallas GPU kernels.

w = prepare_weight(q_kn, scales_gn, zeros_gn, group_size=128)   # once, at load
y = int4_matmul(x, w)                                             # [..., K] -> [..., N]
"""

from pallas_kernels.api import int4_matmul as int4_matmul
from pallas_kernels.layout import Int4Weight as Int4Weight
from pallas_kernels.layout import prepare_weight as prepare_weight

__all__ = ["Int4Weight", "int4_matmul", "prepare_weight"]
