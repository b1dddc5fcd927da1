"""Pallas GPU kernels for grouped int4 dequantize-matmul."""
