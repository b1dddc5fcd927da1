"""Pallas GPU kernels: grouped int4 dequantize-matmul, and the small kernels of a decode step.

w = prepare_weight(q_kn, scales_gn, zeros_gn, group_size=128)   # once, at load
y = int4_matmul(x, w)                                             # [..., K] -> [..., N]
h = int4_matmul(x, w_gate_up, epilogue="swiglu")   # layout.interleave_gate_up'd: silu(g) * u
p = int4_matmul(x, w, partial_sums=True)           # [S, ..., N]: split-K terms, for ...
s, y = add_rms_norm(x, p, weight, eps)             # ... a consumer that adds them itself
out, k, v = decode_attention_update(q, k_new, v_new, k, v, index, valid, scale=...)
out, k, v = decode_attention_update_qkv(qkv, cos, sin, k, v, index, valid, num_heads=...,
                                        num_kv_heads=..., scale=...)  # split + RoPE inside
s, y = add_rms_norm(x, delta, weight, eps)                        # residual add + RMSNorm
"""

from pallas_kernels.api import int4_matmul as int4_matmul
from pallas_kernels.attention import decode_attention as decode_attention
from pallas_kernels.attention import decode_attention_update as decode_attention_update
from pallas_kernels.attention import decode_attention_update_qkv as decode_attention_update_qkv
from pallas_kernels.layout import Int4Weight as Int4Weight
from pallas_kernels.layout import prepare_weight as prepare_weight
from pallas_kernels.norm import add_rms_norm as add_rms_norm
from pallas_kernels.norm import rms_norm as rms_norm

__all__ = [
    "Int4Weight",
    "add_rms_norm",
    "decode_attention",
    "decode_attention_update",
    "decode_attention_update_qkv",
    "int4_matmul",
    "prepare_weight",
    "rms_norm",
]
