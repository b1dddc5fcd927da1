"""awq-jax: Activation-aware Weight Quantization (arXiv 2306.00978) for Llama models in JAX."""

from awq_jax.quantizer import QuantizedTensor, fake_quantize, quantize

__all__ = ["QuantizedTensor", "fake_quantize", "quantize"]
