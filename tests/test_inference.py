"""Inference params: fused projections and int4 kernels behind the same model and generate."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awq_jax.config import ModelConfig
from awq_jax.generate import generate
from awq_jax.inference import Int4Linear, prepare_for_inference, weight_bytes
from awq_jax.model import forward, init_params
from awq_jax.pipeline import dequantized, rtn_quantize
from awq_jax.search import SearchSettings

TINY = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    model_type="qwen2",
    qkv_bias=True,
)
HAS_GPU = any(d.platform == "gpu" for d in jax.devices())


@pytest.fixture(scope="module")
def tiny():
    params = init_params(TINY, jax.random.key(0), jnp.float32)
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.1 if "bias" in jax.tree_util.keystr(p) else a, params
    )
    return params, rtn_quantize(TINY, params, SearchSettings(group_size=32))


def test_fused_float_params_compute_the_same(tiny):
    params, _ = tiny
    fused = prepare_for_inference(params)
    assert len(fused["layers"]) == TINY.num_layers  # one param tree per layer, unrolled
    attn, mlp = fused["layers"][0]["self_attn"], fused["layers"][0]["mlp"]
    assert "qkv_proj" in attn and "q_proj" not in attn and "gate_up_proj" in mlp
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, TINY.vocab_size)
    np.testing.assert_allclose(
        np.asarray(forward(TINY, fused, tokens)),
        np.asarray(forward(TINY, params, tokens)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_int4_params_match_fake_quantization(tiny):
    _, q = tiny
    int4 = prepare_for_inference(q)
    kernels = jax.tree.leaves(int4["layers"], is_leaf=lambda x: isinstance(x, Int4Linear))
    # qkv, o, gate_up, down in each layer; gate/up interleaved, SwiGLU in the kernel call
    assert sum(isinstance(k, Int4Linear) for k in kernels) == 4 * TINY.num_layers
    gate_up = int4["layers"][0]["mlp"]["gate_up_proj"]["kernel"]
    assert gate_up.epilogue == "swiglu" and gate_up.weight.n == 2 * TINY.intermediate_size
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, TINY.vocab_size)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    # Same integer weights, same float32 math up to summation order. A GPU's default f32
    # dot is TF32 (~1e-3 relative, on the H200 run 83): ask both models for f32 dots.
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(
            np.asarray(forward(TINY, int4, tokens)),
            np.asarray(forward(TINY, dequantized(q), tokens)),
            rtol=1e-4,
            atol=1e-4,
        )
        assert generate(TINY, int4, prompts, max_new_tokens=6) == generate(
            TINY, dequantized(q), prompts, max_new_tokens=6
        )


def test_each_int4_linear_prefetches_the_next_ones_weight(tiny):
    """In run order through the layers, each `Int4Linear` carries the next one's weight
    (the same arrays: nothing copied, nothing counted twice); the last carries none."""
    _, q = tiny
    int4 = prepare_for_inference(q)
    order = [("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj")]
    order.append(("mlp", "down_proj"))
    linears = [layer[m][n]["kernel"] for layer in int4["layers"] for m, n in order]
    for linear, following in itertools.pairwise(linears):
        assert linear.prefetch is following.weight
    assert linears[-1].prefetch is None
    plain = prepare_for_inference(q, prefetch=False)
    assert all(
        k.prefetch is None
        for k in jax.tree.leaves(plain["layers"], is_leaf=lambda x: isinstance(x, Int4Linear))
        if isinstance(k, Int4Linear)
    )
    assert weight_bytes(int4) == weight_bytes(plain)


@pytest.mark.parametrize("implementation", ["triton", "mosaic"])  # u4_split / s4 layouts
def test_int4_weight_bytes_under_a_third_of_bf16(implementation):
    config = dataclasses.replace(
        TINY, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=4, head_dim=32
    )
    params = init_params(config, jax.random.key(0), jnp.bfloat16)
    q = rtn_quantize(config, params, SearchSettings(group_size=128))
    int4 = prepare_for_inference(q, implementation=implementation)
    ratio = weight_bytes(int4, linear_only=True) / weight_bytes(params, linear_only=True)
    # 4 bits + an f16 scale and zero per 128 weights: (0.5 + 4/128) / 2 = 0.266
    assert ratio == pytest.approx(0.2656, abs=0.002)


@pytest.mark.slow
def test_quantized_bundled_model_still_says_paris(bundled_model_dir):
    from awq_jax.api import generate_text, load_model

    model = load_model(bundled_model_dir, dtype="float32")
    q = rtn_quantize(model.config, model.params, SearchSettings(group_size=64))
    text = generate_text(
        model.replace(params=prepare_for_inference(q)), "The capital of France is", max_new_tokens=8
    )[0]
    assert "Paris" in text


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_gpu_kernels_generate_like_the_reference():
    config = dataclasses.replace(
        TINY, hidden_size=512, intermediate_size=1024, num_heads=8, num_kv_heads=4, head_dim=64
    )
    params = init_params(config, jax.random.key(0), jnp.bfloat16)
    q = rtn_quantize(config, params, SearchSettings(group_size=128))
    fast = prepare_for_inference(q)  # dispatch: Pallas kernels on the GPU
    ref = prepare_for_inference(q, implementation="xla")
    tokens = jax.random.randint(jax.random.key(1), (3, 16), 0, config.vocab_size)
    a = np.asarray(forward(config, fast, tokens), np.float32)
    b = np.asarray(forward(config, ref, tokens), np.float32)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2  # bf16 activations


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_gpu_int4_decode_steps_match_the_reference():
    """Decode steps through the decode kernel's epilogues are as close to the float32
    truth (the same integer weights, f32 activations) as the XLA matmuls' path: qkv's
    split-K partials added by the attention kernel, o_proj's and down_proj's by the norm
    kernels, SwiGLU computed in gate_up's epilogue (2F / 64 >= 100 row tiles). Both run
    bf16 activations: the two paths' logits differed by 1.2% of their norm (run 52), so
    the bound is loose; a dropped partial or a wrong gate/up pairing is O(1)."""
    from awq_jax.generate import prefill
    from awq_jax.model import Transformer, causal_mask

    config = dataclasses.replace(
        TINY,
        hidden_size=2048,  # K = 2048: two split-K partials for qkv and o_proj
        intermediate_size=3584,  # two for down_proj
        num_heads=16,
        num_kv_heads=4,
        head_dim=128,
        qkv_bias=False,
    )
    params = init_params(config, jax.random.key(0), jnp.bfloat16)
    q = rtn_quantize(config, params, SearchSettings(group_size=128))

    @jax.jit
    def decode_logits(params):
        tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, config.vocab_size)
        valid = jnp.ones((2, 8), bool)
        _, cache = prefill(config, params, tokens, valid, max_len=12)
        out = []
        for i, tok in enumerate(([7, 3], [11, 2])):
            mask = causal_mask(jnp.full((2, 1), 8 + i), jnp.ones((2, 12), bool))
            logits, cache = Transformer(config).apply(
                {"params": params},
                jnp.asarray(tok)[:, None],
                jnp.full((2, 1), 8 + i),
                mask,
                cache,
                8 + i,
            )
            out.append(logits[:, 0])
        return jnp.stack(out)

    fast = prepare_for_inference(q)  # dispatch: the Mosaic decode kernel at M = 2
    assert fast["layers"][0]["mlp"]["gate_up_proj"]["kernel"].epilogue == "swiglu"
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), dequantized(q))
    truth = np.asarray(decode_logits(prepare_for_inference(f32)))
    err = lambda p: float(  # noqa: E731
        np.linalg.norm(np.asarray(decode_logits(p), np.float32) - truth) / np.linalg.norm(truth)
    )
    fast_err, xla_err = err(fast), err(prepare_for_inference(q, implementation="xla"))
    assert xla_err < 0.05 and fast_err < 2 * xla_err + 0.01, (fast_err, xla_err)
