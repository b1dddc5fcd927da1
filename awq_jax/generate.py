"""Text generation: prefill and the whole decode loop inside one ``jax.jit``.

Prompts of different lengths are left-padded to a shared bucket length; positions count real
tokens only and padded keys are masked, so a prompt's output does not depend on what else is
in its batch. The KV cache has a static maximum length (bucket + ``max_new_tokens``); the decode
loop is a ``lax.while_loop`` that stops when every sequence has produced an end-of-sequence
token; without EOS ids it runs a fixed count (a trip count XLA knows, so the host is never
asked whether to go on: a stop flag read back costs ~12-28 us a token on an H100, runs 96-98
in docs/kernels.md). One compilation per (batch size, bucket length, max_new_tokens, sampling
settings), never per token.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from awq_jax.config import ModelConfig
from awq_jax.model import Transformer, causal_mask, init_cache

__all__ = ["Sampling", "generate", "generate_tokens"]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature == 0``; otherwise temperature, then top-k, then top-p."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _sample(logits_bv: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    if sampling.temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv / sampling.temperature
    neg = jnp.finfo(logits.dtype).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _bucket(n: int, minimum: int = 16) -> int:
    """Prompt lengths are padded to a power of two (>= 16) to bound recompilation."""
    return max(minimum, 1 << (n - 1).bit_length())


def prefill(
    config: ModelConfig, params: Any, tokens_bt: jax.Array, valid_bt: jax.Array, max_len: int
) -> tuple[jax.Array, Any]:
    """Runs left-padded prompts through the model into a fresh ``max_len`` KV cache.

    Returns the last position's logits ``[B, V]`` and the cache (keys past the prompt are
    marked valid: they are the tokens decoding will write).
    """
    b, t = tokens_bt.shape
    cache = init_cache(config, params, b, max_len)
    key_valid_bs = jnp.concatenate([valid_bt, jnp.ones((b, max_len - t), bool)], axis=1)
    positions_bt = jnp.maximum(jnp.cumsum(valid_bt, axis=-1) - 1, 0)
    q_index_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = causal_mask(q_index_bt, key_valid_bs, config.sliding_window)
    logits, cache = Transformer(config).apply(
        {"params": params}, tokens_bt, positions_bt, mask, cache, 0, last_only=True
    )
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampling", "eos_ids"))
def generate_tokens(
    config: ModelConfig,
    params: Any,
    tokens_bt: jax.Array,
    valid_bt: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_ids: tuple[int, ...] = (),
) -> jax.Array:
    """Generates ``[B, max_new_tokens]`` token ids (-1 after a sequence's EOS).

    ``tokens_bt`` are left-padded prompts and ``valid_bt`` marks their real tokens.
    """
    b, t = tokens_bt.shape
    model = Transformer(config)
    key_valid_bs = jnp.concatenate([valid_bt, jnp.ones((b, max_new_tokens), bool)], axis=1)
    lengths_b = valid_bt.sum(axis=-1).astype(jnp.int32)
    eos = jnp.asarray(eos_ids, jnp.int32)

    logits_bv, cache = prefill(config, params, tokens_bt, valid_bt, t + max_new_tokens)
    key, sub = jax.random.split(key)
    token_b = _sample(logits_bv, sub, sampling)
    out = jnp.full((b, max_new_tokens), -1, jnp.int32)
    done_b = jnp.zeros((b,), bool)

    def cond(state):
        i, _, _, done_b, _, _ = state
        if not eos_ids:  # nothing can stop it early: a static trip count, no host round trip
            return i < max_new_tokens
        return (i < max_new_tokens) & ~jnp.all(done_b)

    def body(state):
        i, token_b, cache, done_b, out, key = state
        if eos_ids:
            out = out.at[:, i].set(jnp.where(done_b, -1, token_b))
            done_b = done_b | jnp.isin(token_b, eos)
        else:  # nothing stops a sequence: no stop flags (isin, or, select) to update
            out = out.at[:, i].set(token_b)
        index = t + i
        mask = causal_mask(jnp.full((b, 1), index), key_valid_bs, config.sliding_window)
        logits, cache = model.apply(
            {"params": params},
            token_b[:, None],
            (lengths_b + i)[:, None],
            mask,
            cache,
            index,
        )
        key, sub = jax.random.split(key)
        return i + 1, _sample(logits[:, -1], sub, sampling), cache, done_b, out, key

    state = (jnp.int32(0), token_b, cache, done_b, out, key)
    return jax.lax.while_loop(cond, body, state)[4]


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to a bucket length: ``(tokens [B, T], valid [B, T])``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    t = _bucket(max(len(p) for p in prompts))
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    valid = np.zeros((len(prompts), t), bool)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p) :] = p
        valid[i, t - len(p) :] = True
    return tokens, valid


def generate(
    config: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    sampling: Sampling = Sampling(),
    eos_ids: Sequence[int] = (),
    key: jax.Array | None = None,
) -> list[list[int]]:
    """Generates continuations for a batch of token-id prompts; returns the new ids per prompt.

    A sequence stops after its first token in ``eos_ids`` (which is included in its output).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts) if prompts else 0
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's max_position_embeddings ({config.max_position_embeddings})"
        )
    tokens, valid = pad_prompts(prompts)
    if key is None:
        key = jax.random.key(0)
    out = generate_tokens(
        config,
        params,
        jnp.asarray(tokens),
        jnp.asarray(valid),
        key,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_ids=tuple(int(e) for e in eos_ids),
    )
    return [[int(x) for x in row if x >= 0] for row in np.asarray(out)]
