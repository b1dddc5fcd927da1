"""jit generate: agreement with the plain forward, batch invariance, one compile, sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awq_jax.config import ModelConfig
from awq_jax.generate import Sampling, generate, generate_tokens, pad_prompts
from awq_jax.model import forward, init_params

TINY = ModelConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)


@pytest.fixture(scope="module")
def tiny_params():
    return init_params(TINY, jax.random.key(0), jnp.float32)


def _greedy_reference(params, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        logits = forward(TINY, params, jnp.asarray([seq]))
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt) :]


def test_greedy_matches_the_uncached_forward(tiny_params):
    prompt = [5, 9, 2, 77, 31]
    assert generate(TINY, tiny_params, [prompt], max_new_tokens=8)[0] == _greedy_reference(
        tiny_params, prompt, 8
    )


def test_batch_invariance_tiny(tiny_params):
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3], [7], [5, 9, 2, 77, 31]]
    batch = generate(TINY, tiny_params, prompts, max_new_tokens=6)
    for p, out in zip(prompts, batch, strict=True):
        assert generate(TINY, tiny_params, [p], max_new_tokens=6)[0] == out


@pytest.mark.slow
def test_batch_invariance_real_model(bundled_model_dir):
    from awq_jax.api import generate_text, load_model

    model = load_model(bundled_model_dir, dtype="float32")
    prompt = "The capital of France is"
    alone = generate_text(model, prompt, max_new_tokens=8)[0]
    batch = generate_text(
        model,
        ["Once upon a time, in a small village by the sea, there lived", prompt, "Hi"],
        max_new_tokens=8,
    )
    assert batch[1] == alone
    assert "Paris" in alone


def test_decoding_compiles_once(tiny_params):
    run = dict(max_new_tokens=12)
    generate(TINY, tiny_params, [[1, 2, 3]], **run)
    n = generate_tokens._cache_size()
    # Other prompts in the same length bucket, other token values: no new compilation,
    # and nothing compiles per generated token (12 tokens, one cached executable).
    generate(TINY, tiny_params, [[4, 5, 6, 7, 8]], **run)
    generate(TINY, tiny_params, [[9]], **run)
    assert generate_tokens._cache_size() == n


def test_eos_stops_each_sequence(tiny_params):
    prompts = [[5, 9, 2, 77, 31], [1, 2, 3]]
    free = generate(TINY, tiny_params, prompts, max_new_tokens=6)
    eos = free[0][2]  # the first prompt's third token
    out = generate(TINY, tiny_params, prompts, max_new_tokens=6, eos_ids=[eos])
    assert out[0] == free[0][:3]  # stops after (and includes) its EOS
    cut = free[1].index(eos) + 1 if eos in free[1] else 6
    assert out[1] == free[1][:cut]  # the other sequence is unaffected until its own EOS


def test_without_eos_the_loop_has_a_static_trip_count(tiny_params):
    """Without EOS ids nothing can stop decoding early: the loop's trip count is static, so
    XLA never reads a stop flag back to the host (runs 96-98: ~12-28 us a token on an H100), and the
    tokens are those of a loop that checks for an EOS id that never comes."""
    tokens, valid = (jnp.asarray(a) for a in pad_prompts([[5, 9, 2, 77, 31], [1, 2, 3]]))
    args = (TINY, tiny_params, tokens, valid, jax.random.key(1))
    kw = dict(max_new_tokens=11, sampling=Sampling(temperature=1.5, top_k=20))
    never = (TINY.vocab_size + 7,)
    np.testing.assert_array_equal(
        np.asarray(generate_tokens(*args, **kw)),
        np.asarray(generate_tokens(*args, eos_ids=never, **kw)),
    )
    trip_count = '"known_trip_count":{"n":"11"}'  # the decode loop's, in the compiled HLO
    assert trip_count in generate_tokens.lower(*args, **kw).compile().as_text()
    assert trip_count not in generate_tokens.lower(*args, eos_ids=never, **kw).compile().as_text()


def test_sampling(tiny_params):
    prompt = [[5, 9, 2, 77, 31]]
    greedy = generate(TINY, tiny_params, prompt, max_new_tokens=6)
    # top_k=1 is greedy whatever the temperature.
    assert (
        generate(
            TINY, tiny_params, prompt, max_new_tokens=6, sampling=Sampling(temperature=5.0, top_k=1)
        )
        == greedy
    )
    hot = Sampling(temperature=2.0, top_p=0.95)
    a = generate(TINY, tiny_params, prompt, max_new_tokens=6, sampling=hot, key=jax.random.key(1))
    b = generate(TINY, tiny_params, prompt, max_new_tokens=6, sampling=hot, key=jax.random.key(1))
    c = generate(TINY, tiny_params, prompt, max_new_tokens=6, sampling=hot, key=jax.random.key(2))
    assert a == b  # an explicit key makes sampling reproducible
    assert a != c  # and different keys give different samples (vocab 97, 6 tokens)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


def test_prompt_too_long_rejected(tiny_params):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(TINY, tiny_params, [[1] * 500], max_new_tokens=20)


def test_perplexity_is_exp_mean_nll(tiny_params):
    from awq_jax.eval import perplexity

    ids = np.random.default_rng(0).integers(0, 97, 200)
    r = perplexity(TINY, tiny_params, ids, seqlen=64, batch_size=2, progress=False)
    assert r["windows"] == 3 and r["tokens"] == 3 * 63
    logp = jax.nn.log_softmax(forward(TINY, tiny_params, jnp.asarray(ids[:192].reshape(3, 64))))
    nll = -np.take_along_axis(np.asarray(logp[:, :-1]), ids[:192].reshape(3, 64)[:, 1:, None], -1)
    assert r["ppl"] == pytest.approx(float(np.exp(nll.mean())), rel=1e-5)
    assert (
        perplexity(TINY, tiny_params, ids, seqlen=64, n_windows=1, progress=False)["windows"] == 1
    )
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(TINY, tiny_params, ids[:10], seqlen=64, progress=False)


def test_long_prompts_attend_in_query_blocks(monkeypatch):
    """Query-blocked attention (long prompts) gives the logits of the one-block path."""
    import awq_jax.model as model_mod

    params = init_params(TINY, jax.random.key(3), jnp.float32)
    tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, TINY.vocab_size)
    valid = jnp.ones((2, 16), bool).at[0, :5].set(False)  # a left-padded row too
    whole = forward(TINY, params, tokens, key_valid_bt=valid)
    monkeypatch.setattr(model_mod, "ATTENTION_QUERY_CHUNK", 4)  # 16 tokens -> 4 blocks
    blocked = forward(TINY, params, tokens, key_valid_bt=valid)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=1e-5, atol=1e-5)


def test_prefill_last_logits_match_forward():
    """`prefill` (shared by generate and the benchmark) on left-padded prompts: the last
    position's logits equal the uncached forward's."""
    from awq_jax.generate import prefill

    params = init_params(TINY, jax.random.key(5), jnp.float32)
    tokens = jax.random.randint(jax.random.key(6), (2, 8), 0, TINY.vocab_size)
    valid = jnp.ones((2, 8), bool).at[1, :3].set(False)
    logits_bv, cache = prefill(TINY, params, tokens, valid, max_len=12)
    want = forward(TINY, params, tokens, key_valid_bt=valid)[:, -1]
    np.testing.assert_allclose(np.asarray(logits_bv), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert cache[0][0].shape[1] == 12  # layer 0 keys: [B, max_len, kv heads, head dim]


def test_step_breakdown_finds_the_step_and_its_layers() -> None:
    """`bench profile`'s readout of one decode step from a CUPTI trace: the kernels between
    the last two lm_heads, split into the layers' repeating pattern and what is outside."""
    from awq_jax.bench_generate import step_breakdown

    def step(scale: float) -> list[tuple[str, float]]:
        layer = [("norm", 0.003), ("mm", 0.007 * scale), ("attn", 0.004), ("mm", 0.006)]
        layers = [(n, ms + 1e-4 * i) for i in range(4) for n, ms in layer]
        return [("embed", 0.001), *layers, ("final_norm", 0.002), ("lm_head", 0.34)]

    prefill = [("prefill_mm", 0.1), ("lm_head", 0.34)]
    got = step_breakdown(prefill + step(1.0) + step(2.0), num_layers=4)
    assert got["kernels"] == 19 and got["layers"] == 4
    assert [k["name"] for k in got["layer"]] == ["norm", "mm", "attn", "mm"]
    # the last step (scale 2): position 1 is 14 us plus the layers' mean offset of 0.15 us
    assert got["layer"][1]["us"] == pytest.approx(14.15)
    assert [k["name"] for k in got["outside"]] == ["embed", "final_norm", "lm_head"]
    assert got["step_us"] == pytest.approx(1e3 * sum(ms for _, ms in step(2.0)))
    assert step_breakdown(prefill, num_layers=4) is None  # one lm_head: no whole step
    aperiodic = [("a", 0.01), ("b", 0.01), ("c", 0.01), ("lm_head", 0.34)]
    assert step_breakdown(prefill + aperiodic, num_layers=4) is None  # no layers in it


def test_profile_kernel_groups() -> None:
    """`bench profile` buckets: XLA's Triton GEMM fusions are not cuBLAS's kernels."""
    from awq_jax.bench_generate import _kernel_group

    assert _kernel_group("gemm_fusion_dot_196") == "XLA GEMM (Triton fusion)"
    assert _kernel_group("nvjet_sm90_tss_128x64_64x8_1x2_h_bz_NNT") == "cuBLAS GEMM"
    assert _kernel_group("anonymous_mosaic_gpu_kernel") == "int4 matmul (Mosaic GPU)"
    assert _kernel_group("add_rms_norm__2") == "add + RMSNorm (Pallas)"
    assert _kernel_group("decode_attention") == "decode attention (Pallas)"
    assert _kernel_group("input_reduce_fusion_3") == "XLA reductions"


def test_generate_table_gives_each_case_its_median() -> None:
    """`bench generate --rounds N`: one row per (impl, case), the median of its rounds with
    their range, the ratio of the medians."""
    from awq_jax.bench_generate import _generate_table

    def rec(impl: str, tok_s: float, rnd: int) -> dict:
        return {
            "impl": impl, "batch": 1, "prompt_len": 128, "decode_tok_s": tok_s,
            "prefill_tok_s": 1e4, "ms_per_token": 1e3 / tok_s, "round": rnd,
            "weight_bytes": 5.81e9, "linear_weight_bytes": 3.71e9,
        }  # fmt: skip

    rows = [rec("bf16", t, i) for i, t in enumerate((171.0, 168.0, 170.0))]
    rows += [rec("int4", t, i) for i, t in enumerate((425.0, 424.0, 426.0))]
    lines = _generate_table(rows).splitlines()
    assert len(lines) == 4  # header, rule, one row per implementation
    assert "| bf16 | 1 | 128 | 10,000 | 170.0 (3 rounds: 168.0-171.0) |" in lines[2]
    assert "425.0 (3 rounds: 424.0-426.0)" in lines[3] and "| 2.50x |" in lines[3]
    one = _generate_table([rec("bf16", 170.0, 0), rec("int4", 425.0, 0)]).splitlines()
    assert "| 170.0 | 5.88 | 1.00x |" in one[2]  # a single round: no range
