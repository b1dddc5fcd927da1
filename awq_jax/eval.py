"""Perplexity, with the project's protocol (DATA.md).

The evaluation text is the State of the Union speeches from 1990 on (never used for
calibration), in file-name order joined by a blank line, tokenized once; non-overlapping
windows of ``seqlen`` tokens (all full windows unless fewer are asked for) are scored and
perplexity = exp(mean NLL over every predicted token).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from awq_jax.config import ModelConfig
from awq_jax.model import forward

__all__ = ["perplexity"]


@functools.partial(jax.jit, static_argnames=("config",))
def _nll_sum(config: ModelConfig, params: Any, tokens_bt: jax.Array) -> jax.Array:
    """Summed next-token NLL per window ``[B]`` (float32)."""
    logits = forward(config, params, tokens_bt[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    return nll.sum(axis=-1)


def perplexity(
    config: ModelConfig,
    params: Any,
    token_ids: np.ndarray | list[int],
    *,
    seqlen: int = 512,
    n_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict[str, float | int]:
    """``{"ppl", "nll", "windows", "tokens"}`` over non-overlapping ``seqlen`` windows."""
    ids = np.asarray(token_ids, dtype=np.int32)
    available = len(ids) // seqlen
    if available == 0:
        raise ValueError(f"text has {len(ids)} tokens: fewer than one window of {seqlen}")
    n = available if n_windows is None else min(n_windows, available)
    windows = ids[: n * seqlen].reshape(n, seqlen)
    total = 0.0
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = windows[start : start + batch_size]
        pad = batch_size - len(batch)  # keep one compiled shape; padded rows are dropped
        if pad:
            batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
        sums = np.asarray(_nll_sum(config, params, jnp.asarray(batch)))
        total += float(sums[: batch_size - pad].sum())
    predicted = n * (seqlen - 1)
    nll = total / predicted
    return {"ppl": math.exp(nll), "nll": nll, "windows": n, "tokens": predicted}
