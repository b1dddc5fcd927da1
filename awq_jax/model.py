"""The Llama-family decoder as Flax (linen) modules.

One model covers Llama 2/3, Mistral, Qwen2 and Qwen3 through `ModelConfig` fields; module and
parameter names follow the Hugging Face checkpoint names (``self_attn.q_proj``, ...) so the
weight mapping stays a short table. Linear kernels are stored ``[in, out]``.

Quantization replaces leaves of the params pytree and nothing else: a `Linear` kernel may be a
float array, an `awq_jax.quantizer.QuantizedTensor` (evaluated by dequantizing: the fake-quant
path) or a `pallas_kernels.Int4Weight` (the fast path); `awq_jax.linear.linear` routes it. For
inference q/k/v and gate/up may be fused into ``qkv_proj`` / ``gate_up_proj`` (one kernel call
each); the modules see which layout the params have.

Axis letters in names and einsums: B batch, T query positions, S key positions, D model width,
N query heads, K kv heads, G query heads per kv head, H head dim, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from awq_jax.config import ModelConfig, rope_inv_freq
from awq_jax.linear import linear
from pallas_kernels.attention import (
    apply_rope,
    decode_attention_update,
    decode_attention_update_qkv,
)
from pallas_kernels.norm import add_rms_norm, rms_norm, rms_norm_reference

__all__ = [
    "MLP",
    "AddRMSNorm",
    "Attention",
    "Block",
    "KVCache",
    "Linear",
    "RMSNorm",
    "Transformer",
    "causal_mask",
    "forward",
    "init_cache",
    "init_params",
    "rope_cos_sin",
]

Params = dict[str, Any]
# (k, v, counter): k and v of [L, B, S, K, H] and counter [L, B, K] int32 (stacked), or per
# layer k, v of [B, S, K, H] and counter [B, K]. The counter (zeros between steps) is where
# the decode-attention kernel's splits count their arrivals (`pallas_kernels.attention`).
KVCache = tuple


class RMSNorm(nn.Module):
    """RMSNorm in float32, cast back before the weight multiply (as transformers does).

    Always the jnp reference (`pallas_kernels.norm.rms_norm_reference`). Its only users are
    Qwen3's per-head q/k norms, which also run inside the AWQ search's vmapped candidates;
    the norm kernel is used (and tested on GPU) for the residual stream's norms only.
    """

    eps: float

    def weight(self, x: jax.Array) -> jax.Array:
        return self.param("scale", nn.initializers.ones, (x.shape[-1],), x.dtype)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm_reference(x, self.weight(x), self.eps)


class AddRMSNorm(RMSNorm):
    """A residual add and the RMSNorm it feeds: ``(x + delta, norm(x + delta))``.

    One Pallas kernel on NVIDIA GPUs (`pallas_kernels.add_rms_norm`), the same numbers as
    ``x + delta`` followed by `RMSNorm`. ``delta=None``: no add, ``(x, norm(x))``; a
    ``[S, *x.shape]`` stack of a projection's partial sums is added up first.
    """

    @nn.compact
    def __call__(  # type: ignore[override]
        self, x: jax.Array, delta: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        if delta is None:
            return x, rms_norm(x, self.weight(x), self.eps)
        return add_rms_norm(x, delta, self.weight(x), self.eps)


class Linear(nn.Module):
    """``y = x @ kernel (+ bias)``; the kernel may be float or quantized (see module doc)."""

    features: int
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, partial_sums: bool = False) -> jax.Array:
        """``[..., N]``; with ``partial_sums`` ``[S, ..., N]`` terms that sum to it
        (`awq_jax.linear.linear`: an int4 kernel's split-K partials, else S = 1)."""
        if self.is_initializing():
            kernel = self.param(
                "kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), x.dtype
            )
        else:
            kernel = self.get_variable("params", "kernel")
        # Recorded only when "intermediates" is mutable (the AWQ search's capture pass).
        self.sow("intermediates", "input", x)
        if not self.use_bias:
            return linear(x, kernel, partial_sums=partial_sums)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), x.dtype)
        y = linear(x, kernel)
        y = y + bias.astype(y.dtype)
        return y[None] if partial_sums else y


def _has_submodule_params(module: nn.Module, name: str) -> bool:
    """Whether the params given to ``apply`` hold a child ``name`` (the fused layouts)."""
    return not module.is_initializing() and name in module.variables.get("params", {})


def rope_cos_sin(config: ModelConfig, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[B, T, H]`` in float32 (HF rotate-half convention: frequencies repeated)."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    freqs_bth = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs_bth, freqs_bth], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    # One definition shared with the decode kernel that applies RoPE itself.
    return apply_rope(x_btnh, cos_bth[:, :, None, :], sin_bth[:, :, None, :])


def causal_mask(
    q_index_bt: jax.Array, key_valid_bs: jax.Array, sliding_window: int | None = None
) -> jax.Array:
    """``[B, T, S]`` bool: query at cache index ``q`` sees valid keys at indices ``<= q``."""
    s_idx = jnp.arange(key_valid_bs.shape[-1])
    q = q_index_bt[:, :, None]
    mask = (s_idx[None, None, :] <= q) & key_valid_bs[:, None, :]
    if sliding_window is not None:
        mask &= s_idx[None, None, :] > q - sliding_window
    return mask


# Prompts longer than this (and a multiple of it) attend one block of queries at a time.
ATTENTION_QUERY_CHUNK = 512


def _attend(
    q_btkgh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_bts: jax.Array, h: int
) -> jax.Array:
    """Softmax attention of grouped queries over the keys; f32 scores, masked."""
    logits = jnp.einsum(
        "BTKGH,BSKH->BKGTS",
        q_btkgh,
        k_bskh.astype(q_btkgh.dtype),
        preferred_element_type=jnp.float32,
    ) * (h**-0.5)
    logits = jnp.where(mask_bts[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bskh.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_bskh)


class Attention(nn.Module):
    """Multi-head / grouped-query attention with RoPE and an optional KV cache."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x_btd: jax.Array,
        cos_bth: jax.Array,
        sin_bth: jax.Array,
        mask_bts: jax.Array,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        partial_sums: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """The attention output ``[B, T, D]`` (``partial_sums``: o_proj's ``[S, B, T, D]``
        partial sums, see `Linear`) and the updated cache."""
        c = self.config
        b, t, _ = x_btd.shape
        nq, nk, h = c.num_heads, c.num_kv_heads, c.head_dim
        decode = cache is not None and t == 1
        o_proj = Linear(c.hidden_size, c.o_bias, name="o_proj")
        if _has_submodule_params(self, "qkv_proj"):
            qkv_proj = Linear((nq + 2 * nk) * h, c.qkv_bias, name="qkv_proj")
            if decode and not c.qk_norm:
                # A decode step on the fused projection: the kernel adds its split-K
                # partials, splits it into heads and applies RoPE itself. Done here, RoPE
                # is two XLA fusions per layer whose outputs a Pallas call needs
                # materialized (~2.3 us per layer on an H100). Qwen3's q/k norms come
                # between the split and RoPE: the path below.
                out_btd, cache = _decode_step_qkv(
                    c,
                    qkv_proj(x_btd, partial_sums=True),
                    cos_bth,
                    sin_bth,
                    mask_bts,
                    cache,
                    cache_index,
                )
                return o_proj(out_btd.astype(x_btd.dtype), partial_sums), cache
            qkv = qkv_proj(x_btd)
            q, k, v = jnp.split(qkv, [nq * h, (nq + nk) * h], axis=-1)
        else:
            q = Linear(nq * h, c.qkv_bias, name="q_proj")(x_btd)
            k = Linear(nk * h, c.qkv_bias, name="k_proj")(x_btd)
            v = Linear(nk * h, c.qkv_bias, name="v_proj")(x_btd)
        q_btnh = q.reshape(b, t, nq, h)
        k_btkh = k.reshape(b, t, nk, h)
        v_btkh = v.reshape(b, t, nk, h)
        if c.qk_norm:
            q_btnh = RMSNorm(c.rms_norm_eps, name="q_norm")(q_btnh)
            k_btkh = RMSNorm(c.rms_norm_eps, name="k_norm")(k_btkh)
        q_btnh = _apply_rope(q_btnh, cos_bth, sin_bth)
        k_btkh = _apply_rope(k_btkh, cos_bth, sin_bth)

        if decode:
            # A decode step: the cache write and the attention over the cache are one
            # kernel on GPU (`pallas_kernels.decode_attention_update`).
            k_cache, v_cache, counter = cache
            out_bnh, *cache = decode_attention_update(
                q_btnh[:, 0],
                k_btkh[:, 0],
                v_btkh[:, 0],
                k_cache,
                v_cache,
                cache_index,
                mask_bts[:, 0],
                scale=h**-0.5,
                counter=counter,
            )
            out_btd = out_bnh.reshape(b, 1, nq * h)
            cache = tuple(cache)
        else:
            out_btd, cache = _attend_prompt(
                q_btnh, k_btkh, v_btkh, mask_bts, cache, cache_index, c.q_per_kv
            )
        return o_proj(out_btd.astype(x_btd.dtype), partial_sums), cache


def _decode_step_qkv(
    c: ModelConfig,
    qkv: jax.Array,
    cos_bth: jax.Array,
    sin_bth: jax.Array,
    mask_bts: jax.Array,
    cache: KVCache,
    cache_index: jax.Array | int,
) -> tuple[jax.Array, KVCache]:
    """One decode step's attention from the fused projection's partial sums
    ``[S, B, 1, (N + 2K) * H]``: ``[B, 1, N * H]`` and the cache with the step's (roped) key
    and value written."""
    b = qkv.shape[1]
    k_cache, v_cache, counter = cache
    out_bnh, *cache = decode_attention_update_qkv(
        qkv.reshape(qkv.shape[0], b, -1),  # free: T = 1
        cos_bth[:, 0],
        sin_bth[:, 0],
        k_cache,
        v_cache,
        cache_index,
        mask_bts[:, 0],
        num_heads=c.num_heads,
        num_kv_heads=c.num_kv_heads,
        scale=c.head_dim**-0.5,
        counter=counter,
    )
    return out_bnh.reshape(b, 1, -1), tuple(cache)


def _attend_prompt(
    q_btnh: jax.Array,
    k_btkh: jax.Array,
    v_btkh: jax.Array,
    mask_bts: jax.Array,
    cache: KVCache | None,
    cache_index: jax.Array | int,
    q_per_kv: int,
) -> tuple[jax.Array, KVCache | None]:
    """Attention of T query positions (a prompt, or a whole sequence without a cache):
    ``[B, T, N * H]`` and the cache with the T keys and values written at ``cache_index``."""
    b, t, nk, h = k_btkh.shape
    if cache is not None:
        k_cache, v_cache, counter = cache
        start = (0, cache_index, 0, 0)
        k_bskh = jax.lax.dynamic_update_slice(k_cache, k_btkh.astype(k_cache.dtype), start)
        v_bskh = jax.lax.dynamic_update_slice(v_cache, v_btkh.astype(v_cache.dtype), start)
        cache = (k_bskh, v_bskh, counter)
    else:
        k_bskh, v_bskh = k_btkh, v_btkh

    q_btkgh = q_btnh.reshape(b, t, nk, q_per_kv, h)
    chunk = ATTENTION_QUERY_CHUNK
    if t > chunk and t % chunk == 0:
        # Long prompts: one block of queries at a time, so the f32 scores are
        # [B, K, G, chunk, S] instead of [B, K, G, T, S] (32 x 2048 tokens of an 8B
        # model would need 19 GB at once). Each query row's softmax is unchanged.
        def block(args):
            q_c, mask_c = args
            return _attend(q_c, k_bskh, v_bskh, mask_c, h)

        q_blocks = q_btkgh.reshape(b, t // chunk, chunk, *q_btkgh.shape[2:]).swapaxes(0, 1)
        mask_blocks = mask_bts.reshape(b, t // chunk, chunk, -1).swapaxes(0, 1)
        out = jax.lax.map(block, (q_blocks, mask_blocks))
        out_btkgh = out.swapaxes(0, 1).reshape(b, t, *q_btkgh.shape[2:])
    else:
        out_btkgh = _attend(q_btkgh, k_bskh, v_bskh, mask_bts, h)
    return out_btkgh.reshape(b, t, nk * q_per_kv * h), cache


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``.

    A fused ``gate_up_proj`` is concatenated ``[gate, up]``, or an int4 kernel with the
    SwiGLU epilogue (`awq_jax.inference`) that returns ``silu(gate) * up`` itself.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd: jax.Array, partial_sums: bool = False) -> jax.Array:
        """``[B, T, D]`` (``partial_sums``: down_proj's ``[S, B, T, D]``, see `Linear`)."""
        c = self.config
        f = c.intermediate_size
        if _has_submodule_params(self, "gate_up_proj"):
            kernel = self.variables["params"]["gate_up_proj"]["kernel"]
            if getattr(kernel, "epilogue", None) == "swiglu":
                h = Linear(f, name="gate_up_proj")(x_btd)
            else:
                gate, up = jnp.split(Linear(2 * f, c.mlp_bias, name="gate_up_proj")(x_btd), 2, -1)
                h = nn.silu(gate) * up
        else:
            gate = Linear(f, c.mlp_bias, name="gate_proj")(x_btd)
            up = Linear(f, c.mlp_bias, name="up_proj")(x_btd)
            h = nn.silu(gate) * up
        return Linear(c.hidden_size, c.mlp_bias, name="down_proj")(h, partial_sums)


class Block(nn.Module):
    """One decoder layer. Signature ``(x, cache, ...) -> (x, cache)`` so it scans over layers.

    With ``defer_residual`` the hidden state travels as a pair ``(x, delta)`` that means
    ``x + delta``: the layer takes the previous layer's MLP output un-added as ``delta``
    (None before the first layer) and returns its own, so that every residual add runs
    in one kernel with the RMSNorm it feeds (`AddRMSNorm`): this layer's input norm here,
    the model's final norm after the last layer. Without it (the AWQ pipeline's per-layer
    calls) ``x`` is the hidden state itself, as a plain decoder layer's.

    ``partial_sums`` (with ``defer_residual``; the unrolled inference model): o_proj and
    down_proj hand their int4 kernels' split-K partials ``[S, B, T, D]`` to the norm
    kernels, which add them (`pallas_kernels.add_rms_norm`), so the delta travelling to
    the next layer may be such a stack.
    """

    config: ModelConfig
    defer_residual: bool = False
    partial_sums: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array | tuple[jax.Array, jax.Array | None],
        cache: KVCache | None,
        cos_bth: jax.Array,
        sin_bth: jax.Array,
        mask_bts: jax.Array,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array | tuple[jax.Array, jax.Array], KVCache | None]:
        c = self.config
        if self.partial_sums and not self.defer_residual:
            raise ValueError("partial_sums needs defer_residual (a norm kernel adds them)")
        x_btd, delta_btd = x if self.defer_residual else (x, None)
        x_btd, h = AddRMSNorm(c.rms_norm_eps, name="input_layernorm")(x_btd, delta_btd)
        a, cache = Attention(c, name="self_attn")(
            h, cos_bth, sin_bth, mask_bts, cache, cache_index, self.partial_sums
        )
        x_btd, h = AddRMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(x_btd, a)
        mlp_btd = MLP(c, name="mlp")(h, self.partial_sums)
        return ((x_btd, mlp_btd) if self.defer_residual else x_btd + mlp_btd), cache


class Transformer(nn.Module):
    """Embedding, the decoder layers (scanned: params stacked on a leading layer axis), logits."""

    config: ModelConfig
    dtype: Any = jnp.bfloat16  # parameter dtype at init; at apply the params' own dtype rules

    @nn.compact
    def __call__(
        self,
        tokens_bt: jax.Array,
        positions_bt: jax.Array,
        mask_bts: jax.Array,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        last_only: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits ``[B, T, V]`` float32 (``[B, 1, V]`` for the last position if ``last_only``)."""
        c = self.config
        embed = nn.Embed(
            c.vocab_size, c.hidden_size, param_dtype=self.dtype, dtype=None, name="embed_tokens"
        )
        x_btd = embed(tokens_bt)
        cos, sin = rope_cos_sin(c, positions_bt)
        unstacked = None if self.is_initializing() else self.variables["params"]["layers"]
        if isinstance(unstacked, list | tuple):
            # Inference layout (see `awq_jax.inference`): one param tree and one KV cache per
            # layer, unrolled. Nothing is sliced out of a stacked array at run time, so no
            # weight or cache is copied per step.
            stream = (x_btd, None)
            caches = []
            for i, layer in enumerate(unstacked):
                layer_cache = None if cache is None else cache[i]
                stream, layer_cache = Block(c, defer_residual=True, partial_sums=True).apply(
                    {"params": layer}, stream, layer_cache, cos, sin, mask_bts, cache_index
                )
                caches.append(layer_cache)
            cache = None if cache is None else tuple(caches)
        else:
            layers = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_layers,
            )
            # A scan carry keeps one structure: the first layer adds zeros (exactly x).
            stream = (x_btd, jnp.zeros_like(x_btd))
            stream, cache = layers(c, defer_residual=True, name="layers")(
                stream, cache, cos, sin, mask_bts, cache_index
            )
        x_btd, delta_btd = stream
        if last_only:  # delta may be a [S, B, T, D] stack of partial sums
            x_btd, delta_btd = x_btd[:, -1:], delta_btd[..., -1:, :]
        _, x_btd = AddRMSNorm(c.rms_norm_eps, name="norm")(x_btd, delta_btd)
        if c.tie_word_embeddings:
            logits = embed.attend(x_btd)
        else:
            logits = Linear(c.vocab_size, name="lm_head")(x_btd)
        return logits.astype(jnp.float32), cache


def init_cache(config: ModelConfig, params: Params, batch: int, max_len: int):
    """A zero KV cache in the params' dtype, in the layout the params use (`KVCache`).

    Stacked params (``params["layers"]`` a dict, scanned): ``(k, v, counter)`` of
    ``[L, B, S, K, H]`` and ``[L, B, K]``. Unstacked inference params (a list of layers): a
    tuple of per-layer ``(k, v, counter)``. The int32 counters stay zero between steps.
    """
    dtype = params["embed_tokens"]["embedding"].dtype
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    counts = (batch, config.num_kv_heads)
    if isinstance(params["layers"], list | tuple):
        return tuple(
            (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros(counts, jnp.int32))
            for _ in params["layers"]
        )
    lead = (config.num_layers,)
    return (
        jnp.zeros(lead + shape, dtype),
        jnp.zeros(lead + shape, dtype),
        jnp.zeros(lead + counts, jnp.int32),
    )


def init_params(config: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters (tests and benchmarks; real weights come from `awq_jax.weights`)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    mask = jnp.ones((1, 1, 1), bool)
    model = Transformer(config, dtype=dtype)
    return model.init(rng, tokens, tokens, mask)["params"]


def forward(
    config: ModelConfig,
    params: Params,
    tokens_bt: jax.Array,
    *,
    key_valid_bt: jax.Array | None = None,
) -> jax.Array:
    """Logits ``[B, T, V]`` (float32) for whole sequences, no cache (evaluation, calibration).

    ``key_valid_bt`` marks real tokens in left-padded batches (positions count real tokens).
    """
    b, t = tokens_bt.shape
    if key_valid_bt is None:
        key_valid_bt = jnp.ones((b, t), bool)
    positions = jnp.maximum(jnp.cumsum(key_valid_bt, axis=-1) - 1, 0)
    q_index = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = causal_mask(q_index, key_valid_bt, config.sliding_window)
    logits, _ = Transformer(config).apply({"params": params}, tokens_bt, positions, mask)
    return logits
