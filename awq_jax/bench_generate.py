"""GPU benchmarks of the whole path: jit ``generate`` with bf16 vs int4 weights, AWQ search time.

    awq-jax bench generate --out DIR     # -> DIR/generate-<device>.json / .md
    awq-jax bench profile --out DIR      # -> DIR/decode-profile-<device>.json / .md, by layer too
    awq-jax bench search --out DIR       # -> DIR/search-<device>.json / .md

The model is Llama-3-8B-shaped (32 layers, 4096 wide, GQA 32/8, MLP 14336, vocab 128256) with
random weights created on the device (no download). int4 weights are RTN-quantized with
group 128 (AWQ changes the values, not the shapes or the speed). Implementations:
``bf16`` (fused bf16 matmuls), ``int4`` (`Int4Linear`, dispatch picks the Pallas kernel),
``xla_int4`` (the same int4 weights, dequantized by XLA then ``jnp.dot``: what a JAX user gets
without custom kernels), ``int4_noprefetch`` (``int4`` without the cross-kernel L2 prefetch of
the next linear's weight: the A/B of that mechanism; the same as ``int4`` on a part whose
`tuning.DECODE` entry prefetches nothing: the H200, and the H100 since run 92).

Timing: wall clock around a whole jitted call after a warm-up call (each call runs thousands of
kernels, so dispatch overhead is negligible), median of ``repeats``. Prefill is timed alone;
decode time = generate(prompt, 256 new tokens) - prefill, over 256 decode steps. With
``--rounds N`` every case runs N times, the implementations in turn within a round (bf16's
tokens/s moved ~1% between two runs a minute apart on one H100, run 104), and the table
gives the medians.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from awq_jax.config import ModelConfig
from awq_jax.generate import generate_tokens, prefill
from awq_jax.inference import Int4Linear, prepare_for_inference, weight_bytes
from awq_jax.model import init_params
from awq_jax.pipeline import awq_quantize, rtn_quantize
from awq_jax.search import SearchSettings
from pallas_kernels.api import device_tag

LLAMA3_8B = ModelConfig(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
)


def random_params(config: ModelConfig, dtype=jnp.bfloat16) -> dict[str, Any]:
    """Random weights of the config's shapes, created on the device in ``dtype``."""
    init = jax.jit(functools.partial(init_params, config, dtype=dtype))
    return init(jax.random.key(0))


def random_int4(config: ModelConfig, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` RTN-quantized (group 128) and prepared for inference (dispatch's kernels)."""
    q = rtn_quantize(config, params, SearchSettings(group_size=128))
    return prepare_for_inference(q, implementation=None)


_prefill = jax.jit(prefill, static_argnames=("config", "max_len"))


def _median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_generate_one(
    config, params, *, batch: int, prompt_len: int, new_tokens: int, repeats: int
) -> dict[str, float]:
    tokens = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, config.vocab_size)
    valid = jnp.ones((batch, prompt_len), bool)
    key = jax.random.key(2)
    prefill_s = _median_seconds(
        lambda: _prefill(config, params, tokens, valid, max_len=prompt_len + new_tokens), repeats
    )
    total = _median_seconds(
        lambda: generate_tokens(config, params, tokens, valid, key, max_new_tokens=new_tokens),
        repeats,
    )
    decode = max(total - prefill_s, 1e-9)
    return {
        "prefill_tok_s": batch * prompt_len / prefill_s,
        "decode_tok_s": batch * new_tokens / decode,
        "ms_per_token": 1e3 * decode / new_tokens,
        "prefill_s": prefill_s,
        "generate_s": total,
    }


def ab_decode(config, params, names: list[str], apply, *, check_tokens: int = 48) -> list:
    """In-process A/B of decode-step variants (docs/benchmarks/decode-ab/): for each name,
    ``apply(name)`` (sets the knob read at trace time), the jit caches are cleared, the
    first ``check_tokens`` greedy tokens are compared with the first variant's, and
    batch-1 generate (prompt 128, 256 new tokens, median of 5) is timed."""
    tokens = jax.random.randint(jax.random.key(1), (1, 128), 0, config.vocab_size)
    valid = jnp.ones((1, 128), bool)
    ref, recs = None, []
    for name in names:
        apply(name)
        jax.clear_caches()
        toks = np.asarray(
            generate_tokens(
                config, params, tokens, valid, jax.random.key(2), max_new_tokens=check_tokens
            )
        )
        ref = toks if ref is None else ref
        same = int((toks == ref).sum())
        r = bench_generate_one(config, params, batch=1, prompt_len=128, new_tokens=256, repeats=5)
        recs.append({"variant": name, "same": same, **r})
        print(f"{name:>12}: {r['decode_tok_s']:.1f} tok/s, {same}/{check_tokens} tokens same")
    return recs


def ab_decode_int4_bf16(
    config, names: list[str], apply, out_file: Path, weights: tuple[str, ...] = ("int4", "bf16")
) -> dict:
    """`ab_decode` on random int4 (RTN) and/or bf16 weights of ``config`` (``weights``);
    writes ``out_file`` (``{"int4": [...], "bf16": [...]}``) and prints a table."""
    params = random_params(config)
    make = {
        "int4": lambda: random_int4(config, params),
        "bf16": lambda: prepare_for_inference(params),
    }
    recs = {w: ab_decode(config, make[w](), names, apply) for w in weights}
    out_file.write_text(json.dumps(recs, indent=1))
    print("\nweights   variant    tok/s  generate ms")
    for w, rs in recs.items():
        for r in rs:
            print(
                f"{w:>7} {r['variant']:>9} {r['decode_tok_s']:8.1f} {1e3 * r['generate_s']:12.1f}"
            )
    return recs


DEFAULT_CASES = ((1, 128), (8, 128), (32, 128), (1, 2048), (8, 2048), (32, 2048))
IMPLS = ("int4", "xla_int4", "bf16", "int4_noprefetch")


def _replace_int4(int4: dict[str, Any], **changes) -> dict[str, Any]:
    """The same int4 weights (same arrays) with ``changes`` to every `Int4Linear`."""
    return jax.tree.map(
        lambda x: dataclasses.replace(x, **changes) if isinstance(x, Int4Linear) else x,
        int4,
        is_leaf=lambda x: isinstance(x, Int4Linear),
    )


def _with_xla(int4: dict[str, Any]) -> dict[str, Any]:
    """The same int4 weights (same layout) run by the plain-XLA path."""
    return _replace_int4(int4, implementation="xla", prefetch=None)


def run_generate(
    out: Path,
    *,
    quick: bool = False,
    config: ModelConfig = LLAMA3_8B,
    impls: tuple[str, ...] = IMPLS,
    cases: tuple[tuple[int, int], ...] = DEFAULT_CASES,
    rounds: int = 1,
) -> list:
    """Generate throughput per (implementation, batch, prompt length); see the module doc.

    Every implementation's weights stay on the device together, and each case is measured
    ``rounds`` times with the implementations in turn within a round (int4 next to bf16
    seconds apart, so a drift of the clocks moves both); each round is a record
    (``"round"``), the table gives the median of each."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    new_tokens = 256
    xla_cases = {(1, 128), (32, 128)}
    if quick:
        cases, xla_cases = ((1, 128), (32, 128)), {(1, 128)}
    params = random_params(config)
    weights: dict[str, Any] = {}
    if set(impls) - {"bf16"}:  # the int4 variants share one repacked weight
        int4 = random_int4(config, params)
        variants = {"int4": int4, "xla_int4": _with_xla(int4)}
        variants["int4_noprefetch"] = _replace_int4(int4, prefetch=None)
        weights |= {i: variants[i] for i in impls if i in variants}
    if "bf16" in impls:
        weights["bf16"] = prepare_for_inference(params)
    del params  # an 8B model is 16 GB in bf16: the unfused copy goes before measuring
    sizes = {
        i: {
            "weight_bytes": weight_bytes(p),
            "linear_weight_bytes": weight_bytes(p, linear_only=True),
        }
        for i, p in weights.items()
    }
    records = []
    for rnd in range(rounds):
        for batch, prompt_len in cases:
            for impl in impls:
                if impl == "xla_int4" and (batch, prompt_len) not in xla_cases:
                    continue
                r = bench_generate_one(
                    config,
                    weights[impl],
                    batch=batch,
                    prompt_len=prompt_len,
                    new_tokens=new_tokens,
                    repeats=3,
                )
                rec = {
                    "model": "llama3-8b-shaped",
                    "dtype": "bfloat16" if impl == "bf16" else "int4",
                    "impl": impl,
                    "batch": batch,
                    "prompt_len": prompt_len,
                    "new_tokens": new_tokens,
                    **sizes[impl],
                    **r,
                    "round": rnd,
                }
                records.append(rec)
                print(json.dumps(rec), flush=True)
    records.sort(key=lambda r: (r["prompt_len"], r["batch"], r["impl"] != "bf16", r["round"]))
    _write(out, f"generate-{device_tag()}", records, _generate_table(records))
    return records


def _kernel_group(name: str) -> str:
    """A readable bucket for a kernel name from the CUPTI trace."""
    lowered = name.lower()
    for key, group in (
        ("mosaic", "int4 matmul (Mosaic GPU)"),  # "anonymous_mosaic_gpu_kernel"
        ("int4_matmul_triton", "int4 matmul (Triton)"),
        ("decode_attention", "decode attention (Pallas)"),
        ("rms_norm", "add + RMSNorm (Pallas)"),
        # XLA names the kernels of its Triton GEMM fusions after them; cuBLAS's are its own
        ("gemm_fusion", "XLA GEMM (Triton fusion)"),
        ("gemm", "cuBLAS GEMM"),
        ("gemv", "cuBLAS GEMV"),
        ("nvjet", "cuBLAS GEMM"),
        ("cutlass", "cuBLAS GEMM"),
        ("reduce", "XLA reductions"),
        ("fusion", "XLA fusions"),
    ):
        if key in lowered:
            return group
    return "other: " + name[:40]


def step_breakdown(trace: list[tuple[str, float]], num_layers: int) -> dict | None:
    """One decode step of a CUPTI trace (``[(kernel name, ms)]`` in stream order), layer by
    layer: the step is the kernels between the last two lm_heads (the longest kernel of a
    step, once per step), its layers the longest run of it whose names repeat with some
    period ``p`` (the kernels of one layer) for at least ``num_layers - 1`` layers.
    Returns ``{"step_us", "kernels", "layer": [{"name", "us"}] (the mean of each
    position over the periodic layers), "layers", "outside": [{"name", "us"}]}``, or None
    where the trace has fewer than two lm_heads or no such period."""
    if not trace:
        return None
    longest = max(ms for _, ms in trace)
    heads = [i for i, (_, ms) in enumerate(trace) if ms > 0.5 * longest]
    if len(heads) < 2:
        return None
    step = trace[heads[-2] + 1 : heads[-1] + 1]
    names = [n for n, _ in step]
    n = len(step)
    for p in range(1, n // max(num_layers - 1, 1) + 1):
        start, best_len, run = 0, 0, 0
        for i in range(n - p):  # run: how many i' <= i in a row have names[i'] == names[i'+p]
            run = run + 1 if names[i] == names[i + p] else 0
            if run > best_len:
                start, best_len = i - run + 1, run
        layers = min((best_len + p) // p, num_layers)
        if layers >= num_layers - 1:
            body = step[start : start + p * layers]
            layer = [
                {
                    "name": body[j][0][:60],
                    "us": 1e3 * float(np.mean([body[j + p * i][1] for i in range(layers)])),
                }
                for j in range(p)
            ]
            outside = step[:start] + step[start + p * layers :]
            return {
                "step_us": 1e3 * sum(ms for _, ms in step),
                "kernels": n,
                "layers": layers,
                "layer": layer,
                "outside": [{"name": k[:60], "us": 1e3 * ms} for k, ms in outside],
            }
    return None


def profile_decode(
    config, params, *, batch: int = 1, prompt_len: int = 128, new_tokens: int = 64
) -> dict:
    """Where one decode step's GPU time goes: CUPTI kernel times of a whole generate
    call minus those of its prefill, per generated token, bucketed by kernel kind, next
    to the wall time per token (the gap is time the GPU spends idle between kernels)."""
    from jax.experimental.mosaic.gpu import profiler

    tokens = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, config.vocab_size)
    valid = jnp.ones((batch, prompt_len), bool)
    key = jax.random.key(2)

    def gen(p, tokens, valid, key):
        return generate_tokens(config, p, tokens, valid, key, max_new_tokens=new_tokens)

    def pre(p, tokens, valid, key):
        return _prefill(config, p, tokens, valid, max_len=prompt_len + new_tokens)

    args = (params, tokens, valid, key)  # arguments, not constants captured by a jit
    walls = {}
    kernels = {}
    for name, fn in (("generate", gen), ("prefill", pre)):
        walls[name] = _median_seconds(lambda fn=fn: fn(*args), 3)
        _, trace = profiler.measure(fn, aggregate=False)(*args)
        kernels[name] = trace or []
    per_token: dict[str, float] = {}
    counts: dict[str, int] = {}
    per_name: dict[str, float] = {}
    for name, sign in (("generate", 1), ("prefill", -1)):
        for kname, ms in kernels[name]:
            group = _kernel_group(kname)
            per_token[group] = per_token.get(group, 0.0) + sign * 1e3 * ms / new_tokens
            counts[group] = counts.get(group, 0) + sign
            per_name[kname[:60]] = per_name.get(kname[:60], 0.0) + sign * 1e3 * ms / new_tokens
    gpu_us = sum(per_token.values())
    wall_us = 1e6 * (walls["generate"] - walls["prefill"]) / new_tokens
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "wall_us_per_token": wall_us,
        "kernel_us_per_token": gpu_us,
        "kernels_per_token": sum(counts.values()) / new_tokens,
        "groups": {
            g: {"us_per_token": us, "kernels_per_token": counts[g] / new_tokens}
            for g, us in sorted(per_token.items(), key=lambda kv: -kv[1])
        },
        "top_kernels_us_per_token": dict(sorted(per_name.items(), key=lambda kv: -kv[1])[:20]),
        "last_step": step_breakdown(kernels["generate"], config.num_layers),
    }


def run_profile(out: Path, *, impls: tuple[str, ...] = ("int4", "bf16")) -> list:
    """:func:`profile_decode` of the 8B-shaped model at batch 1, per implementation."""
    config = LLAMA3_8B
    params = random_params(config)
    q = rtn_quantize(config, params, SearchSettings(group_size=128))
    variants = {
        "int4": lambda: prepare_for_inference(q, implementation=None),
        "xla_int4": lambda: _with_xla(prepare_for_inference(q, implementation=None)),
        "int4_noprefetch": lambda: prepare_for_inference(q, implementation=None, prefetch=False),
        "bf16": lambda: prepare_for_inference(params),
    }
    records = []
    lines = [
        "| impl | wall us/token | kernel us/token | kernels/token | top kernel groups (us/token) |",
        "|---|---:|---:|---:|---|",
    ]
    for impl in impls:
        rec = {
            "model": "llama3-8b-shaped",
            "impl": impl,
            **profile_decode(config, variants[impl]()),
        }
        records.append(rec)
        print(json.dumps(rec), flush=True)
        top = "; ".join(f"{g}: {v['us_per_token']:.0f}" for g, v in list(rec["groups"].items())[:5])
        lines.append(
            f"| {impl} | {rec['wall_us_per_token']:.0f} | {rec['kernel_us_per_token']:.0f} | "
            f"{rec['kernels_per_token']:.0f} | {top} |"
        )
    for rec in records:
        lines += _step_table(rec)
    _write(out, f"decode-profile-{device_tag()}", records, "\n".join(lines))
    return records


def _step_table(rec: dict) -> list[str]:
    """Markdown of a profile record's ``last_step`` (`step_breakdown`)."""
    st = rec.get("last_step")
    if not st:
        return ["", f"{rec['impl']}: no step breakdown (the trace had no periodic layers)"]
    layer_us = sum(k["us"] for k in st["layer"])
    lines = [
        "",
        f"### {rec['impl']}: the last step, {st['step_us']:.0f} us in {st['kernels']} kernels; "
        f"{st['layers']} layers of {len(st['layer'])} kernels, {layer_us:.1f} us a layer",
        "",
        "| # | kernel (mean over the layers) | us |",
        "|---:|---|---:|",
    ]
    lines += [f"| {j} | `{k['name']}` | {k['us']:.2f} |" for j, k in enumerate(st["layer"])]
    outside = "; ".join(f"`{k['name']}` {k['us']:.1f}" for k in st["outside"])
    lines += ["", f"Outside the layers: {outside or 'nothing'}."]
    return lines


def _generate_table(records: list[dict]) -> str:
    """One row per (impl, batch, prompt): the median over its rounds (decode's range after
    it where there are several); the ratio divides the medians."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["impl"], r["batch"], r["prompt_len"]), []).append(r)

    def med(rs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rs)

    lines = [
        "| impl | batch | prompt | prefill tok/s | decode tok/s | ms/token | decode vs bf16 "
        "| weight GB (linear GB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (impl, batch, prompt), rs in groups.items():
        base = groups.get(("bf16", batch, prompt))
        decode = med(rs, "decode_tok_s")
        ratio = f"{decode / med(base, 'decode_tok_s'):.2f}x" if base else "-"
        spread = ""
        if len(rs) > 1:
            lo, hi = (f(r["decode_tok_s"] for r in rs) for f in (min, max))
            spread = f" ({len(rs)} rounds: {lo:,.1f}-{hi:,.1f})"
        r = rs[0]
        lines.append(
            f"| {impl} | {batch} | {prompt} | {med(rs, 'prefill_tok_s'):,.0f} | "
            f"{decode:,.1f}{spread} | {med(rs, 'ms_per_token'):.2f} | {ratio} | "
            f"{r['weight_bytes'] / 1e9:.2f} ({r['linear_weight_bytes'] / 1e9:.2f}) |"
        )
    return "\n".join(lines)


def run_search(out: Path, *, quick: bool = False, config: ModelConfig = LLAMA3_8B) -> dict:
    """The full AWQ search (128 x 512 random calibration tokens) on the 8B-shaped model."""
    if quick:
        config = dataclasses.replace(config, num_layers=2)
    params = random_params(config)
    tokens = np.asarray(
        jax.random.randint(jax.random.key(3), (128, 512), 0, config.vocab_size), np.int32
    )
    settings = SearchSettings(group_size=128, chunk_seqs=32)
    t0 = time.perf_counter()
    qparams, _ = awq_quantize(config, params, tokens, settings, progress=True)
    jax.block_until_ready(qparams)
    seconds = time.perf_counter() - t0
    stats = jax.devices()[0].memory_stats() or {}
    result = {
        "model": "llama3-8b-shaped",
        "layers": config.num_layers,
        "calib": [128, 512],
        "group_size": 128,
        "chunk_seqs": 32,
        "seconds": seconds,
        "seconds_per_layer": seconds / config.num_layers,
        "peak_device_bytes": stats.get("peak_bytes_in_use"),
        "model_bf16_bytes": weight_bytes(params),
    }
    print(json.dumps(result), flush=True)
    table = (
        "| model | layers | calibration | search wall time | per layer | peak device memory |\n"
        "|---|---:|---|---:|---:|---:|\n"
        f"| {result['model']} | {config.num_layers} | 128 x 512 | {seconds:.0f} s | "
        f"{result['seconds_per_layer']:.1f} s | "
        f"{(result['peak_device_bytes'] or 0) / 2**30:.1f} GiB |"
    )
    _write(out, f"search-{device_tag()}", [result], table)
    return result


def _write(out: Path, name: str, records: list, table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(records, indent=1))
    device = jax.devices()[0].device_kind
    (out / f"{name}.md").write_text(f"# {name} ({device})\n\n{table}\n")
    print(table)


def main(args) -> None:
    if jax.default_backend() != "gpu":
        raise ValueError(
            f"the benchmarks need a GPU (jax.default_backend() is {jax.default_backend()!r})"
        )
    out = Path(args.out)
    if args.what == "generate":
        impls = tuple(args.impls.split(",")) if args.impls else IMPLS
        unknown = set(impls) - set(IMPLS)
        if unknown:
            raise ValueError(f"unknown --impls {sorted(unknown)}; choose from {IMPLS}")
        cases = DEFAULT_CASES
        if args.cases:
            try:
                cases = tuple(tuple(int(v) for v in c.split("x")) for c in args.cases.split(","))
            except ValueError as e:
                raise ValueError(f"--cases takes BATCHxPROMPT,..., got {args.cases!r}") from e
        run_generate(out, quick=args.quick, impls=impls, cases=cases, rounds=args.rounds)
    elif args.what == "profile":
        impls = tuple(args.impls.split(",")) if args.impls else ("int4", "bf16")
        unknown = set(impls) - set(IMPLS)
        if unknown:
            raise ValueError(f"unknown --impls {sorted(unknown)}; choose from {IMPLS}")
        run_profile(out, impls=impls)
    else:
        run_search(out, quick=args.quick)
