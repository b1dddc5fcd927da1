"""Tokenizer loading and the two encodings the project needs: plain text and chat prompts.

The tokenizer is transformers' `PreTrainedTokenizerFast` (the `tokenizers` Rust backend)
loaded from a Hugging Face folder with `AutoTokenizer`; it needs no torch. Using
transformers' own class keeps ids identical to the reference side of the parity tests.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

__all__ = ["apply_chat_template", "encode", "load_tokenizer"]


def load_tokenizer(model_dir: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Load the fast tokenizer of a Hugging Face folder (needs `tokenizer.json`)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} has no tokenizer.json: awq-jax needs a fast (tokenizers) tokenizer; "
            "save one with transformers' `AutoTokenizer.from_pretrained(...).save_pretrained`"
        )
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise TypeError(f"{model_dir}: expected a fast tokenizer, got {type(tok).__name__}")
    return tok


def encode(tok: PreTrainedTokenizerFast, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of `text`.

    `add_bos=None` follows the tokenizer's own setting (`add_bos_token` in
    `tokenizer_config.json`; False for SmolLM2, as its GGUF says); True / False force a BOS
    token on or off. Texts longer than the model's context are fine (no warning): the
    perplexity code windows them itself.
    """
    if add_bos is None:
        return list(tok.encode(text, verbose=False))
    ids = list(tok.encode(text, add_special_tokens=False, verbose=False))
    if add_bos:
        if tok.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no bos token")
        ids.insert(0, tok.bos_token_id)
    return ids


def apply_chat_template(
    tok: PreTrainedTokenizerFast, prompt: str | Sequence[Mapping[str, str]]
) -> list[int]:
    """Token ids of a chat prompt, ending with the assistant turn's header.

    `prompt` is one user message, or a list of `{"role": ..., "content": ...}` messages. The
    template (with its default system message, if any) is the one in
    `tokenizer_config.json`.
    """
    if tok.chat_template is None:
        raise ValueError(f"tokenizer {tok.name_or_path!r} has no chat template")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    out = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])
