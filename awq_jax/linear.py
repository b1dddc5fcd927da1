"""``linear(x, w)``: the one place where a model's matmul meets a quantized weight.

- a float array: ``x @ w`` in the activation dtype with float32 accumulation;
- an `awq_jax.quantizer.QuantizedTensor`: dequantized, then the same dot (fake quantization:
  a quantized model evaluated exactly as its integer weights say);
- an `awq_jax.inference.Int4Linear`: `pallas_kernels.int4_matmul` (fused dequantize-matmul
  Pallas kernels on GPU, the jnp reference elsewhere), with its epilogue (``"swiglu"``: the
  result is ``silu(gate) * up`` of an interleaved gate/up weight).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from awq_jax.quantizer import QuantizedTensor


def linear(x: jax.Array, w, *, partial_sums: bool = False) -> jax.Array:
    """``x[..., K] @ w[K, N] -> [..., N]`` in ``x.dtype``.

    ``partial_sums=True`` returns ``[S, ..., N]`` terms that sum to it (in f32, rounded to
    x.dtype): an int4 kernel's split-K partials, for a consumer kernel that adds them
    (`pallas_kernels.int4_matmul`); S = 1 for every other weight.
    """
    from awq_jax.inference import Int4Linear

    if isinstance(w, Int4Linear):
        import pallas_kernels

        return pallas_kernels.int4_matmul(
            x,
            w.weight,
            implementation=w.implementation,
            epilogue=w.epilogue,
            partial_sums=partial_sums,
            prefetch=w.prefetch,
        )
    if isinstance(w, QuantizedTensor):
        w = w.dequantize(x.dtype)
    y = jnp.einsum("...k,kn->...n", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    y = y.astype(x.dtype)
    return y[None] if partial_sums else y
