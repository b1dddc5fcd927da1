"""Tokenizer loading and the two encodings the project needs: plain text and chat prompts.

The tokenizer is transformers' `PreTrainedTokenizerFast` (the `tokenizers` Rust backend)
loaded from a Hugging Face folder with `AutoTokenizer`; it needs no torch. Using
transformers' own class keeps ids identical to the reference side of the parity tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerFast

__all__ = ["apply_chat_template", "check_vocab", "encode", "load_tokenizer", "tokenizer_size"]


def load_tokenizer(
    model_dir: str | os.PathLike[str], *, vocab_size: int | None = None
) -> PreTrainedTokenizerFast:
    """Load the fast tokenizer of a Hugging Face folder (needs `tokenizer.json`).

    ``vocab_size``: the model's (``config.json``); if given, the tokenizer is checked against
    it with `check_vocab`.

    Raises:
      FileNotFoundError: no such folder, or no ``tokenizer.json`` in it.
      ValueError: ``tokenizer.json`` / ``tokenizer_config.json`` cannot be parsed, or the
        tokenizer has ids the model's embedding does not have (the message names the file).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    tokenizer_json = model_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise FileNotFoundError(
            f"{model_dir} has no tokenizer.json: awq-jax needs a fast (tokenizers) tokenizer; "
            "save one with transformers' `AutoTokenizer.from_pretrained(...).save_pretrained`"
        )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (model_dir / name).is_file():
            _read_json_object(model_dir / name)
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise ValueError(
            f"{tokenizer_json} could not be parsed as a tokenizer: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise TypeError(f"{model_dir}: expected a fast tokenizer, got {type(tok).__name__}")
    if vocab_size is not None:
        check_vocab(tok, vocab_size, model_dir)
    return tok


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} could not be parsed as JSON: {e}") from e
    if not isinstance(body, dict):
        raise ValueError(
            f"{path} could not be parsed: expected a JSON object, got {type(body).__name__}"
        )
    return body


def tokenizer_size(tok: PreTrainedTokenizerFast) -> int:
    """The number of ids the tokenizer can produce: one past its largest id, added tokens too."""
    return max(len(tok), max(tok.get_vocab().values(), default=-1) + 1)


def check_vocab(
    tok: PreTrainedTokenizerFast, vocab_size: int, model_dir: str | os.PathLike[str]
) -> None:
    """Raises ValueError if ``tok`` has ids at or past the model's ``vocab_size``.

    Such ids would index past the embedding table (which gathers NaN there, not an error).
    A ``vocab_size`` larger than the tokenizer is fine: models pad their vocabulary.
    """
    size = tokenizer_size(tok)
    if size > vocab_size:
        model_dir = Path(model_dir)
        raise ValueError(
            f"{model_dir / 'tokenizer.json'} has {size} tokens but "
            f"{model_dir / 'config.json'} vocab_size is {vocab_size}: the tokenizer does not "
            "belong to this model"
        )


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
