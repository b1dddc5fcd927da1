"""``linear(x, w)``: the one place where a model's matmul meets a quantized weight.

- a float array: ``x @ w`` in the activation dtype with float32 accumulation;
- an `awq_jax.quantizer.QuantizedTensor`: dequantized, then the same dot (fake quantization,
  for evaluating a quantized model bit-for-bit as its integer weights say);
- a `pallas_kernels.Int4Weight`: `pallas_kernels.int4_matmul` (fused dequantize-matmul kernels
  on GPU, the jnp reference elsewhere).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from awq_jax.quantizer import QuantizedTensor


def linear(x: jax.Array, w) -> jax.Array:
    """``x[..., K] @ w[K, N] -> [..., N]`` in ``x.dtype``."""
    if isinstance(w, QuantizedTensor):
        w = w.dequantize(x.dtype)
    elif not isinstance(w, jax.Array | jax.ShapeDtypeStruct) and hasattr(w, "group_size"):
        import pallas_kernels

        return pallas_kernels.int4_matmul(x, w)
    return jnp.einsum(
        "...k,kn->...n", x, w.astype(x.dtype), preferred_element_type=jnp.float32
    ).astype(x.dtype)
