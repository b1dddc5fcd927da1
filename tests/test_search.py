"""The AWQ scale and clip search, the folding of scales, and the layer-by-layer driver."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awq_jax.config import ModelConfig
from awq_jax.model import Block, init_params
from awq_jax.pipeline import awq_quantize, calibration_inputs, rtn_quantize
from awq_jax.quantizer import QuantizedTensor
from awq_jax.scale_groups import scale_groups
from awq_jax.search import (
    SearchSettings,
    apply_clip,
    apply_scales,
    search_clip,
    search_scales,
)

GQA = ModelConfig(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)
MHA = dataclasses.replace(GQA, num_kv_heads=4)
QWEN2 = dataclasses.replace(GQA, model_type="qwen2", qkv_bias=True)
SETTINGS = SearchSettings(group_size=32, n_grid=10)


def _layer(config: ModelConfig, seed: int = 0):
    params = init_params(config, jax.random.key(seed), jnp.float32)
    # Random norm weights and biases, so folding into them is exercised.
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: (
            a + 0.3 * jax.random.normal(jax.random.key(len(str(path))), a.shape)
            if "scale" in str(path) or "bias" in str(path)
            else a
        ),
        params,
    )
    return params, jax.tree.map(lambda a: a[0], params["layers"])


def _block(config, layer, x, rope_mask):
    cos, sin, mask = rope_mask
    return Block(config).apply({"params": layer}, x, None, cos, sin, mask)[0]


@pytest.mark.parametrize("config", [MHA, GQA, QWEN2], ids=["mha", "gqa", "qwen2_bias"])
def test_folding_scales_leaves_the_function_unchanged(config):
    params, layer = _layer(config)
    tokens = np.random.default_rng(0).integers(0, 64, (2, 16))
    x, rope_mask = calibration_inputs(config, params, tokens)
    ref = _block(config, layer, x, rope_mask)
    scaled = layer
    for i, group in enumerate(scale_groups(config, gqa_vo=True)):
        dim = config.num_kv_heads * config.head_dim if group.shared_kv else None
        dim = dim or group_input_dim(config, group)
        s = jnp.exp(jax.random.normal(jax.random.key(i), (dim,)))  # scales in ~[0.1, 10]
        scaled = apply_scales(config, group, scaled, s)
    out = _block(config, scaled, x, rope_mask)
    assert not np.allclose(
        np.asarray(scaled["mlp"]["down_proj"]["kernel"]),
        np.asarray(layer["mlp"]["down_proj"]["kernel"]),
    )
    # float32: equal up to rounding (relative 1e-5; measured ~1e-7).
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def group_input_dim(config: ModelConfig, group) -> int:
    return {
        "qkv": config.hidden_size,
        "o": config.num_heads * config.head_dim,
        "gate_up": config.hidden_size,
        "down": config.intermediate_size,
    }[group.name]


def test_outlier_channels_pick_a_ratio_above_zero_and_beat_rtn():
    config = GQA
    _, layer = _layer(config)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 32, config.hidden_size)).astype(np.float32)
    x[..., [3, 17, 40]] *= 40.0  # a few salient input channels, as in real LLM activations
    group = scale_groups(config)[1]  # gate/up after the post-attention norm: the whole MLP
    assert group.name == "gate_up"
    r = search_scales(config, group, SETTINGS, layer, jnp.asarray(x), (None, None, None))
    losses = np.asarray(r["losses"])
    best = int(r["best"])
    assert best > 1  # not the identity, not ratio 0
    assert losses[best] < 0.7 * losses[0]  # clearly better than plain RTN
    s = np.asarray(r["scales"])
    assert s[[3, 17, 40]].min() > np.median(s)  # the salient channels get the large scales


def test_search_compiles_once_per_shape():
    config = GQA
    group = scale_groups(config)[2]  # down
    x = jnp.asarray(
        np.random.default_rng(0).standard_normal((2, 8, config.intermediate_size)), jnp.float32
    )
    _, layer_a = _layer(config, 0)
    _, layer_b = _layer(config, 1)
    search_scales(config, group, SETTINGS, layer_a, x, (None, None, None))
    before = search_scales._cache_size()
    search_scales(config, group, SETTINGS, layer_b, x * 2, (None, None, None))
    search_scales(config, group, SETTINGS, layer_a, x + 1, (None, None, None))
    assert search_scales._cache_size() == before


def test_clip_search_clips_some_groups_and_never_hurts():
    rng = np.random.default_rng(0)
    w = rng.standard_t(df=4, size=(64, 16)).astype(np.float32)  # heavy-tailed, like LLM weights
    x = jnp.asarray(rng.standard_normal((600, 64)), jnp.float32)
    settings = SearchSettings(group_size=32)
    max_val = np.asarray(search_clip(settings, jnp.asarray(w), x))
    absmax = np.abs(w.reshape(2, 32, 16)).max(axis=1)
    assert max_val.shape == (2, 16)
    assert (max_val <= absmax + 1e-6).all() and (max_val >= 0.5 * absmax - 1e-6).all()
    assert (max_val < absmax - 1e-6).mean() > 0.1  # clipping wins for a share of the groups

    def out_err(kernel):
        q = settings.quant(jnp.asarray(kernel))
        return float(jnp.mean(jnp.square(x @ q - x @ jnp.asarray(w))))

    assert out_err(apply_clip(jnp.asarray(w), jnp.asarray(max_val))) <= out_err(w)


def _quantize_tiny(config, settings):
    params, _ = _layer(config)
    tokens = np.random.default_rng(0).integers(0, 64, (4, 16))
    return params, awq_quantize(config, params, tokens, settings, progress=False)


def test_two_runs_give_identical_quantized_weights():
    (_, (qa, rec_a)), (_, (qb, _)) = (_quantize_tiny(GQA, SETTINGS) for _ in range(2))
    leaves_a = jax.tree.leaves(qa)
    leaves_b = jax.tree.leaves(qb)
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kernels = [
        qa["layers"]["self_attn"]["q_proj"]["kernel"],
        qa["layers"]["mlp"]["down_proj"]["kernel"],
    ]
    assert all(isinstance(k, QuantizedTensor) for k in kernels)
    assert len(rec_a) == GQA.num_layers * 3  # qkv, gate_up, down (v->o skipped for GQA)
    for r in rec_a:
        assert r["best_loss"] <= r["rtn_loss"]  # the identity is a candidate


def test_gqa_vo_option_adds_the_group():
    settings = dataclasses.replace(SETTINGS, gqa_vo=True)
    _, (_, records) = _quantize_tiny(GQA, settings)
    groups = [r["group"] for r in records if r["layer"] == 0]
    assert groups == ["qkv", "o", "gate_up", "down"]
    o = next(r for r in records if r["group"] == "o")
    assert o["scales"].shape == (GQA.num_kv_heads * GQA.head_dim,)


def test_rtn_quantizes_every_linear_and_nothing_else():
    params, _ = _layer(GQA)
    q = rtn_quantize(GQA, params, SETTINGS)
    is_q = jax.tree.map(
        lambda x: isinstance(x, QuantizedTensor),
        q,
        is_leaf=lambda x: isinstance(x, QuantizedTensor),
    )
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(is_q)[0]}
    assert sum(flat.values()) == 7
    assert not any(v for k, v in flat.items() if "norm" in k or "embed" in k or "lm_head" in k)


def test_nan_weights_are_refused_with_the_path():
    from awq_jax.api import Model
    from awq_jax.pipeline import quantize_model

    params, _ = _layer(GQA)
    kernel = params["layers"]["mlp"]["up_proj"]["kernel"]
    params["layers"]["mlp"]["up_proj"]["kernel"] = kernel.at[1, 2, 3].set(jnp.nan)
    model = Model(GQA, params, tokenizer=None, path=None, hf_config={})
    with pytest.raises(ValueError, match="non-finite values in layers/mlp/up_proj"):
        quantize_model(model, SETTINGS, method="rtn")
    # Not only the linears: a NaN norm or embedding would make every search loss NaN.
    params["layers"]["mlp"]["up_proj"]["kernel"] = kernel
    norm = params["layers"]["input_layernorm"]["scale"]
    params["layers"]["input_layernorm"]["scale"] = norm.at[0, 1].set(jnp.inf)
    model = Model(GQA, params, tokenizer=None, path=None, hf_config={})
    with pytest.raises(ValueError, match="non-finite values in layers/input_layernorm/scale"):
        quantize_model(model, SETTINGS, method="awq")


def test_already_quantized_and_bad_group_size_are_refused_before_any_work():
    from awq_jax.api import Model
    from awq_jax.pipeline import quantize_model

    params, _ = _layer(GQA)
    model = Model(GQA, params, tokenizer=None, path=None, hf_config={})
    # calib=None with method awq would need a tokenizer: the checks come first.
    d = GQA.hidden_size
    match = f"group size 48 does not divide self_attn/q_proj's input dimension {d}; choose 32"
    with pytest.raises(ValueError, match=match):
        quantize_model(model, dataclasses.replace(SETTINGS, group_size=48), method="awq")
    with pytest.raises(ValueError, match="group size must be positive or -1"):
        quantize_model(model, dataclasses.replace(SETTINGS, group_size=0), method="rtn")
    n = GQA.max_position_embeddings
    with pytest.raises(
        ValueError, match=f"longer than the model's max_position_embeddings \\({n}\\)"
    ):
        quantize_model(model, SETTINGS, method="awq", calib={"seqlen": n + 1})
    rtn = quantize_model(model, SETTINGS, method="rtn")
    with pytest.raises(ValueError, match="already quantized \\(method rtn\\)"):
        quantize_model(rtn, SETTINGS, method="rtn")
