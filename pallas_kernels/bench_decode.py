"""Benchmark: the decode-step kernels (attention over the KV cache, add + RMSNorm) vs XLA.

    python -m pallas_kernels.bench_decode --out OUT            # GPU: check, sweep, time
    python -m pallas_kernels.bench_decode --out OUT --cpu-smoke  # CPU: interpreted, tiny

Three kernels, each checked against its f32 reference before it is timed (records carry
the relative error; a failed check is not timed):

- ``attention``: `decode_attention` (the kernel alone) against the XLA path on
  Llama-3-8B's attention shape (K=8 kv heads, G=4, H=128, bf16), batch 1/8/32, cache
  length S = 384 / 2048 / 4096, every key valid; the Triton kernel over a sweep of
  ``block_s`` x ``splits`` x ``num_warps`` (and the default config, marked). Rotating
  cache sets (> 256 MB in all, at least 2) so each call reads HBM, as the model's 32
  layers do.
- ``attention_update``: `decode_attention_update` (the cache write folded in) against
  XLA's two dynamic_update_slice + attention, for the default and the best swept config.
  Timed inside a ``fori_loop`` with the caches as loop carries, as in the generate loop
  (a call on non-donated caches would add a full cache copy to both sides):
  per step = (time of 8 steps - time of 2 steps) / 6.
- ``add_rms_norm``: at D = 4096 bf16 with batch 1/8/32 rows, against XLA's add + norm.

Times: CUPTI kernel time (``profiler.measure``, as pallas_kernels/bench.py), median of
20 calls, per call (per set). ``--cpu-smoke`` runs the same path on tiny shapes with the
kernels interpreted and wall-clock "times" that mean nothing. Writes
``decode-kernels-<device>.json`` and ``.md`` to ``--out`` and prints the table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import api, attention, norm
from pallas_kernels.attention import Config

MAX_REL_ERR = 1e-2
MIN_SET_BYTES = 256e6
ITERATIONS = 20
STEPS = (2, 8)  # decode steps of the two timed loops (attention_update)


@dataclasses.dataclass(frozen=True)
class Setup:
    """The shapes one run covers; ``smoke``: interpreted kernels, wall-clock times."""

    batches: tuple[int, ...] = (1, 8, 32)
    seqs: tuple[int, ...] = (384, 2048, 4096)
    kv_heads: int = 8
    q_per_kv: int = 4
    head_dim: int = 128
    width: int = 4096
    block_s: tuple[int, ...] = (32, 64, 128)  # 256 exceeds shared memory (run 48)
    splits: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    num_warps: tuple[int, ...] = (4, 8)
    smoke: bool = False


SMOKE = Setup(
    batches=(2,),
    seqs=(37,),
    kv_heads=2,
    q_per_kv=4,
    head_dim=16,
    width=64,
    block_s=(16,),
    splits=(2,),
    num_warps=(4,),
    smoke=True,
)


def _rel_err(out: jax.Array, ref: jax.Array) -> float:
    out32, ref32 = out.astype(jnp.float32), ref.astype(jnp.float32)
    if not bool(jnp.all(jnp.isfinite(out32))):
        return float("inf")
    return float(jnp.linalg.norm(out32 - ref32) / jnp.linalg.norm(ref32))


def _time_us(fn: Callable, args, setup: Setup) -> float:
    """Median kernel time of ``fn(*args)`` in us (wall clock for the smoke run)."""
    if setup.smoke:
        jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return 1e6 * (time.perf_counter() - t0)
    from jax.experimental.mosaic.gpu import profiler

    _, times_ms = profiler.measure(fn, iterations=ITERATIONS)(*args)
    return 1e3 * statistics.median(times_ms)


def _kernel_names(fn: Callable, args, setup: Setup) -> list[str]:
    if setup.smoke:
        return []
    from jax.experimental.mosaic.gpu import profiler

    _, kernels = profiler.measure(fn, aggregate=False)(*args)
    return sorted({name[:50] for name, _ in kernels or []})


# ----------------------------------------------------------------------------- problems


def _cache_sets(setup: Setup, b: int, s: int, seed: int) -> list[tuple]:
    """Rotating (q, k_new, v_new, k, v, valid) sets, > MIN_SET_BYTES of caches in all."""
    kh, g, h = setup.kv_heads, setup.q_per_kv, setup.head_dim
    cache_bytes = 2 * b * s * kh * h * 2
    count = 1 if setup.smoke else max(2, min(64, -(-int(MIN_SET_BYTES) // cache_bytes)))
    sets = []
    for i in range(count):
        keys = jax.random.split(jax.random.key(seed + i), 5)
        shapes = ((b, kh * g, h), (b, kh, h), (b, kh, h), (b, s, kh, h), (b, s, kh, h))
        arrays = [
            jax.random.normal(k, shp, jnp.float32).astype(jnp.bfloat16)
            for k, shp in zip(keys, shapes, strict=True)
        ]
        sets.append((*arrays, jnp.ones((b, s), bool)))
    return sets


def _attention_configs(setup: Setup, b: int, s: int) -> list[Config]:
    """The sweep: splits that leave each >= one block of keys and <= 1024 programs."""
    cands = []
    for bs, sp, warps in itertools.product(setup.block_s, setup.splits, setup.num_warps):
        if s // sp >= bs and b * setup.kv_heads * sp <= 1024:
            cands.append(Config(block_s=bs, splits=sp, num_warps=warps))
    default = attention.default_config(b, setup.kv_heads, s)
    return [default] + [c for c in cands if c != default]


def _record(kernel: str, impl: str, cfg: Config | None, **fields) -> dict:
    return {
        "kernel": kernel,
        "impl": impl,
        "config": None if cfg is None else dataclasses.asdict(cfg),
        "us": None,
        "rel_err": None,
        "error": None,
        **fields,
    }


def _guarded(rec: dict, run: Callable[[], None]) -> dict:
    """Runs one measurement into ``rec``; a compile failure of one config is recorded."""
    try:
        run()
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    if rec["error"] is None and not rec["rel_err"] < MAX_REL_ERR:
        rec["error"], rec["us"] = f"rel_err {rec['rel_err']:.3g} >= {MAX_REL_ERR}", None
    print(json.dumps(rec), flush=True)
    return rec


# ----------------------------------------------------------------------------- kernels


def _impl_kw(impl: str, setup: Setup, **triton_kw) -> dict:
    """Keyword arguments that force ``impl`` (the kernel interpreted in the smoke run)."""
    if impl == "xla":
        return {"implementation": "xla"}
    return {"implementation": "triton", "interpret": setup.smoke, **triton_kw}


def bench_attention(setup: Setup, b: int, s: int, sets: list[tuple]) -> list[dict]:
    h = setup.head_dim
    scale = h**-0.5
    q, _, _, k, v, valid = sets[0]
    ref = attention.decode_attention_reference(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), valid, scale=scale
    )
    default = attention.default_config(b, setup.kv_heads, s)
    variants = [("xla", None)] + [("triton", c) for c in _attention_configs(setup, b, s)]
    records = []
    for impl, cfg in variants:
        kw = _impl_kw(impl, setup, config=cfg)
        fn = functools.partial(attention.decode_attention, scale=scale, **kw)
        batched = jax.jit(lambda sets, fn=fn: [fn(q, k, v, m) for q, _, _, k, v, m in sets])
        rec = _record("attention", impl, cfg, batch=b, seq=s, default=cfg == default)

        def run(rec=rec, batched=batched):
            rec["rel_err"] = _rel_err(batched(sets)[0], ref)
            if rec["rel_err"] < MAX_REL_ERR:
                rec["us"] = _time_us(batched, (sets,), setup) / len(sets)
                rec["kernels"] = _kernel_names(batched, (sets,), setup)

        records.append(_guarded(rec, run))
    return records


def bench_attention_update(
    setup: Setup, b: int, s: int, sets: list[tuple], best: Config | None
) -> list[dict]:
    h = setup.head_dim
    scale = h**-0.5
    q, k_new, v_new, k, v, valid = sets[0]
    index = s - 1
    f32 = [a.astype(jnp.float32) for a in (q, k_new, v_new, k, v)]
    ref, *_ = attention.decode_attention_update_reference(*f32, index, valid, scale=scale)
    default = attention.default_config(b, setup.kv_heads, s)
    variants = [("xla", None), ("triton", default)]
    if best is not None and best != default:
        variants.append(("triton", best))
    records = []
    for impl, cfg in variants:
        kw = _impl_kw(impl, setup, config=cfg)
        fn = functools.partial(attention.decode_attention_update, scale=scale, **kw)

        def steps_fn(sets, n: int, fn=fn):
            """``n`` decode steps; the caches and outputs are loop carries (in place)."""

            def body(_, carry):
                out = []
                for (q, kn, vn, _, _, m), (_, k, v) in zip(sets, carry, strict=True):
                    out.append(fn(q, kn, vn, k, v, index, m))
                return out

            init = [(jnp.zeros_like(q), k, v) for q, _, _, k, v, _ in sets]
            return jax.lax.fori_loop(0, n, body, init)

        rec = _record("attention_update", impl, cfg, batch=b, seq=s, default=cfg == default)

        def run(rec=rec, steps_fn=steps_fn):
            # Every step writes the same row and reads the same keys: any step's output
            # is the one-step reference's.
            few, many = (jax.jit(functools.partial(steps_fn, n=n)) for n in STEPS)
            rec["rel_err"] = _rel_err(few(sets)[0][0], ref)
            if rec["rel_err"] < MAX_REL_ERR:
                us = _time_us(many, (sets,), setup) - _time_us(few, (sets,), setup)
                rec["us"] = us / ((STEPS[1] - STEPS[0]) * len(sets))
                rec["kernels"] = _kernel_names(few, (sets,), setup)

        records.append(_guarded(rec, run))
    return records


def bench_add_rms_norm(setup: Setup, rows: int) -> list[dict]:
    keys = jax.random.split(jax.random.key(rows), 3)
    d = setup.width
    x = jax.random.normal(keys[0], (rows, 1, d), jnp.float32).astype(jnp.bfloat16)
    delta = jax.random.normal(keys[1], (rows, 1, d), jnp.float32).astype(jnp.bfloat16)
    w = (1 + 0.1 * jax.random.normal(keys[2], (d,), jnp.float32)).astype(jnp.bfloat16)
    _, ref = norm.add_rms_norm_reference(x, delta, w, 1e-5)
    sets = [(x + i, delta, w) for i in range(1 if setup.smoke else 8)]
    records = []
    for impl, warps in (("xla", None), ("triton", None), ("triton", 4), ("triton", 8)):
        kw = _impl_kw(impl, setup, num_warps=warps)
        fn = functools.partial(norm.add_rms_norm, eps=1e-5, **kw)
        batched = jax.jit(lambda sets, fn=fn: [fn(x, d, w) for x, d, w in sets])
        rec = _record("add_rms_norm", impl, None, batch=rows, width=d, num_warps=warps)

        def run(rec=rec, batched=batched):
            rec["rel_err"] = _rel_err(batched(sets)[0][1], ref)
            if rec["rel_err"] < MAX_REL_ERR:
                rec["us"] = _time_us(batched, (sets,), setup) / len(sets)
                rec["kernels"] = _kernel_names(batched, (sets,), setup)

        records.append(_guarded(rec, run))
    return records


# ----------------------------------------------------------------------------- report


def _best(records: list[dict], kernel: str, **where) -> dict | None:
    timed = [
        r
        for r in records
        if r["kernel"] == kernel
        and r["impl"] == "triton"
        and r["us"] is not None
        and all(r.get(k) == v for k, v in where.items())
    ]
    return min(timed, key=lambda r: r["us"]) if timed else None


def _cfg_text(r: dict | None) -> str:
    if r is None:
        return "-"
    if r["config"] is None:
        return f"warps {r.get('num_warps') or 'auto'}"
    c = r["config"]
    return f"bs {c['block_s']}, splits {c['splits']}, warps {c['num_warps']}"


def markdown_table(records: list[dict]) -> str:
    lines = [
        "| kernel | batch | S / D | xla us | triton default us | triton best us (config) "
        "| best vs xla |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted(
        {(r["kernel"], r["batch"], r.get("seq") or r.get("width")) for r in records},
        key=lambda t: (["attention", "attention_update", "add_rms_norm"].index(t[0]), t[1:]),
    )
    for kernel, b, size in keys:
        where = {"batch": b, ("width" if kernel == "add_rms_norm" else "seq"): size}
        rows = [
            r
            for r in records
            if r["kernel"] == kernel and all(r.get(k) == v for k, v in where.items())
        ]
        xla = next((r["us"] for r in rows if r["impl"] == "xla"), None)
        if kernel == "add_rms_norm":
            dflt = next((r for r in rows if r["impl"] == "triton" and r["num_warps"] is None), None)
        else:
            dflt = next((r for r in rows if r["impl"] == "triton" and r["default"]), None)
        best = _best(records, kernel, **where)
        fmt = lambda us: "-" if us is None else f"{us:.1f}"  # noqa: E731
        ratio = f"{xla / best['us']:.2f}x" if xla and best else "-"
        lines.append(
            f"| {kernel} | {b} | {size} | {fmt(xla)} | {fmt(dflt and dflt['us'])} | "
            f"{fmt(best and best['us'])} ({_cfg_text(best)}) | {ratio} |"
        )
    return "\n".join(lines)


def run(setup: Setup, out: pathlib.Path, budget_s: float, command: str) -> list[dict]:
    t0 = time.time()
    records: list[dict] = []
    for rows in setup.batches:  # first: a few seconds, whatever the budget leaves
        records += bench_add_rms_norm(setup, rows)
    for b, s in itertools.product(setup.batches, setup.seqs):
        if time.time() - t0 > budget_s:
            print(f"budget reached; not timed: batch {b}, S {s} and later", flush=True)
            break
        sets = _cache_sets(setup, b, s, seed=1000 * b + s)
        recs = bench_attention(setup, b, s, sets)
        best = _best(recs, "attention")
        records += recs
        records += bench_attention_update(
            setup, b, s, sets, None if best is None else Config(**best["config"])
        )
        del sets
    tag = api.device_tag()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"decode-kernels-{tag}.json").write_text(json.dumps(records, indent=1))
    table = markdown_table(records)
    (out / f"decode-kernels-{tag}.md").write_text(
        f"# decode-step kernels on {jax.devices()[0].device_kind}\n\n"
        f"Produced by `{command}`: CUPTI kernel time per call in us, median of "
        f"{ITERATIONS}; see the module docstring of pallas_kernels/bench_decode.py.\n\n"
        + table
        + "\n"
    )
    print(table)
    return records


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the JSON and markdown results")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, interpreted kernels")
    ap.add_argument("--batches", default=None, help="comma list (default 1,8,32)")
    ap.add_argument("--seqs", default=None, help="comma list of cache lengths (384,2048,4096)")
    ap.add_argument(
        "--budget-s", type=float, default=420.0, help="start no new (batch, S) after this"
    )
    args = ap.parse_args(argv)
    setup = SMOKE if args.cpu_smoke else Setup()
    if args.batches:
        setup = dataclasses.replace(setup, batches=tuple(int(v) for v in args.batches.split(",")))
    if args.seqs:
        setup = dataclasses.replace(setup, seqs=tuple(int(v) for v in args.seqs.split(",")))
    if not setup.smoke and jax.default_backend() != "gpu":
        raise SystemExit("no GPU: run with --cpu-smoke for the interpreted smoke test")
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m pallas_kernels.bench_decode " + " ".join(argv)
    return run(setup, pathlib.Path(args.out), args.budget_s, command)


if __name__ == "__main__":
    main()
