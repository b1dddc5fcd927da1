"""awq-jax: Activation-aware Weight Quantization (arXiv 2306.00978) for Llama models in JAX.

Usage::

    import awq_jax
    model = awq_jax.load_model()                       # the bundled SmolLM2-135M, or a folder
    qmodel = awq_jax.quantize(model, awq_jax.SearchSettings(group_size=64))
    awq_jax.save_quantized(qmodel, "smollm2-awq")      # AutoAWQ GEMM checkpoint
    awq_jax.generate_text(awq_jax.load_model("smollm2-awq"), "The capital of France is")
"""

from awq_jax.api import Model, generate_text, load_model
from awq_jax.api import model_perplexity as perplexity
from awq_jax.checkpoint import load_quantized, save_quantized
from awq_jax.generate import Sampling, generate
from awq_jax.inference import prepare_for_inference
from awq_jax.pipeline import compare, dequantized
from awq_jax.pipeline import quantize_model as quantize
from awq_jax.quantizer import QuantizedTensor
from awq_jax.search import SearchSettings

__all__ = [
    "Model",
    "QuantizedTensor",
    "Sampling",
    "SearchSettings",
    "compare",
    "dequantized",
    "generate",
    "generate_text",
    "load_model",
    "load_quantized",
    "perplexity",
    "prepare_for_inference",
    "quantize",
    "save_quantized",
]
