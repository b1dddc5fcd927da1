"""Benchmark: int4 kernels vs bf16 ``jnp.dot`` on Llama-3 layer shapes (KERNELS.md method).

    python -m pallas_kernels.bench                       # full table -> docs/benchmarks/
    python -m pallas_kernels.bench --shapes 8b --ms 1,16 --out-dir /tmp/b
    python -m pallas_kernels.bench --sweep triton ...    # time Triton configs (tuning)
    python -m pallas_kernels.bench --sweep mosaic ...    # time Mosaic GPU configs

Method: CUPTI kernel time (``profiler.measure``) of a jitted function that runs the
matmul once per weight set, over >= 4 distinct weight sets totalling > 200 MB (so each
call reads HBM, not the 50 MB L2), median of >= 20 iterations after a warm-up,
divided by the number of sets. Every implementation is checked against an f32
reference on random data (fresh per shape) before it is timed; records carry the
relative error. Writes ``kernels-<device>.json`` (records ``{k, n, m, impl, us,
rel_err}``), ``kernels-<device>.md`` and ``kernels-<device>.png``, <device> being
`api.device_tag()` ("h100", "h200", ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import api, pallas_mosaic_gpu, pallas_mosaic_gpu_ws, pallas_triton, tuning
from pallas_kernels.layout import Int4Weight, format_for, prepare_weight
from pallas_kernels.reference import dequantize

SHAPES = {
    "8b": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
    "70b": [(8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)],
    "key": [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)],
    # The acceptance shapes first, then the rest of the Llama-3 8B / 70B layers.
    "all": [
        (4096, 4096),
        (4096, 14336),
        (14336, 4096),
        (4096, 28672),
        (8192, 8192),
        (4096, 6144),
        (8192, 10240),
        (28672, 8192),
        (8192, 57344),
    ],
}
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
MIN_SET_BYTES = 200e6
MAX_REL_ERR = 1e-2
# The Triton kernel is not timed above this M in the full table (it is 3x slower than bf16
# at M=1024 and dispatch never picks it there); the sweeps in docs/kernels.md timed it.
# Likewise xla_int4 is not timed for 16 < M <= 128 where dispatch runs Triton: the
# acceptance compares against it at M <= 16. Both keep one device call under 10 minutes.
MAX_TRITON_BENCH_M = 256
_IMPL_OF = {"xla_int4": "xla", "triton": "triton", "mosaic": "mosaic", "mosaic_ws": "mosaic_ws"}


@dataclasses.dataclass
class Problem:
    """Weight sets for one (K, N) layer shape, on device."""

    k: int
    n: int
    group_size: int
    w4: dict[str, list[Int4Weight]]  # by format (layout.FORMATS), same codes
    w16_kn: list[jax.Array]
    ref_w_nk: jax.Array  # f32 dequantized weight of set 0, for the correctness check


def make_problem(
    k: int,
    n: int,
    group_size: int,
    seed: int,
    tile_n: int | None = None,
    fmts: tuple[str, ...] | None = None,
) -> Problem:
    """Random codes, scales and zero points; as many sets as the L2-defeating rule needs.

    Every format in ``fmts`` holds the same codes, so each backend reads its own layout
    (None: every format the group size allows).
    """
    if fmts is None:
        fmts = tuple(dict.fromkeys(("u4_split", "s4", format_for("mosaic", k, group_size))))
    nbytes4 = k * n // 2 + 4 * (k // group_size) * n
    sets4 = max(4, math.ceil(MIN_SET_BYTES / nbytes4))
    sets16 = max(4, math.ceil(MIN_SET_BYTES / (2 * k * n)))

    @functools.partial(jax.jit, static_argnames="fmt")
    def one(key, fmt):
        kq, ks, kz = jax.random.split(key, 3)
        q = jax.random.randint(kq, (k, n), 0, 16, jnp.int32).astype(jnp.uint8)
        s = jax.random.uniform(ks, (k // group_size, n), jnp.float32, 0.5, 1.5) / 64
        z = jax.random.randint(kz, (k // group_size, n), 0, 16, jnp.int32).astype(jnp.uint8)
        return prepare_weight(
            q, s.astype(jnp.float16), z, group_size=group_size, tile_n=tile_n, fmt=fmt
        )

    keys = jax.random.split(jax.random.key(seed), max(sets4, sets16))
    w4 = {fmt: [one(kk, fmt) for kk in keys[:sets4]] for fmt in fmts}
    first = next(iter(w4.values()))
    to16 = jax.jit(lambda w: dequantize(w, jnp.bfloat16).T)
    w16 = [to16(first[i % sets4]) for i in range(sets16)]
    # Distinct bf16 sets even where they share int4 codes: add a tiny per-set offset.
    w16 = [w + jnp.bfloat16(i * 2**-10) for i, w in enumerate(w16)]
    ref = jax.jit(lambda w: dequantize(w, jnp.float32))(first[0])
    return Problem(k, n, group_size, w4, w16, ref)


def make_xs(m: int, k: int, count: int, seed: int) -> list[jax.Array]:
    keys = jax.random.split(jax.random.key(seed), count)
    return [jax.random.normal(kk, (m, k), jnp.float32).astype(jnp.bfloat16) for kk in keys]


def rel_err(out: jax.Array, ref: jax.Array) -> float:
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def cupti_time(f, args: tuple, iterations: int = 20) -> tuple[float, dict[str, float]]:
    """The median CUPTI time of one call of the jitted ``f(*args)`` in us (all its
    kernels), and one call's time per kernel (names cut to 40 characters)."""
    from jax.experimental.mosaic.gpu import profiler

    _, times_ms = profiler.measure(f, iterations=iterations)(*args)
    _, kernels = profiler.measure(f, aggregate=False)(*args)
    per_kernel: dict[str, float] = {}
    for name, ms in kernels or []:
        per_kernel[name[:40]] = per_kernel.get(name[:40], 0.0) + 1e3 * ms
    return 1e3 * statistics.median(times_ms), per_kernel


def check_and_time(
    fn, xs: list[jax.Array], ws: list, ref_y: jax.Array | None, iterations: int = 20
) -> tuple[float, float | None, dict]:
    """Checks ``fn(xs[0], ws[0])`` against ``ref_y``, then times one ``fn(x, w)``.

    Returns (relative error, median CUPTI microseconds per call or None when the check
    failed, one iteration's per-kernel split in us per call). One jitted function runs
    ``fn`` once per weight set (rotating past the L2); its warm-up output is checked
    (``ref_y=None``: nothing to check, a probe that computes no product; error 0).
    """
    count = len(ws)
    xs = [xs[i % len(xs)] for i in range(count)]
    batched = jax.jit(lambda xs, ws: [fn(x, w) for x, w in zip(xs, ws, strict=True)])
    outs = jax.block_until_ready(batched(xs, ws))  # compile + warm-up
    err = 0.0 if ref_y is None else rel_err(outs[0], ref_y)
    if not err < MAX_REL_ERR:
        return err, None, {}
    us, per_kernel = cupti_time(batched, (xs, ws), iterations)
    return err, us / count, {name: t / count for name, t in per_kernel.items()}


def _bf16_dot(x_mk: jax.Array, w_kn: jax.Array) -> jax.Array:
    """The baseline: plain ``jnp.dot`` of bf16 operands (cuBLAS accumulates in f32)."""
    return jnp.dot(x_mk, w_kn)


def impl_fns(names: list[str]) -> dict:
    """name -> (fn(x, w), weights: "bf16", an int4 format, or the backend whose format
    (``layout.format_for``) it reads: "mosaic", or "auto" for dispatch's)."""
    table = {
        "bf16": (_bf16_dot, "bf16"),
        "xla_int4": (lambda x, w: api.int4_matmul(x, w, implementation="xla"), "u4_split"),
        "triton": (lambda x, w: api.int4_matmul(x, w, implementation="triton"), "u4_split"),
        "mosaic": (lambda x, w: api.int4_matmul(x, w, implementation="mosaic"), "mosaic"),
        "mosaic_ws": (lambda x, w: api.int4_matmul(x, w, implementation="mosaic_ws"), "mosaic"),
        "auto": (lambda x, w: api.int4_matmul(x, w), "auto"),
    }
    return {n: table[n] for n in names}


def _fmt(weights: str, k: int, group_size: int) -> str:
    """What an :func:`impl_fns` weights entry reads: "bf16" or an int4 format."""
    if weights in ("mosaic", "auto"):
        return format_for(None if weights == "auto" else weights, k, group_size)
    return weights


def _not_timed(k: int, n: int, m: int, impl: str, why: str) -> dict:
    return {"k": k, "n": n, "m": m, "impl": impl, "us": None, "rel_err": None, "error": why}


def measure_one(p: Problem, m: int, name: str, fn, weights: str, seed: int) -> dict:
    weights = _fmt(weights, p.k, p.group_size)
    ws = p.w16_kn if weights == "bf16" else p.w4[weights]
    xs = make_xs(m, p.k, 4, seed)
    rec = {"k": p.k, "n": p.n, "m": m, "impl": name, "us": None, "rel_err": None}
    try:
        ref_w = p.w16_kn[0].astype(jnp.float32).T if weights == "bf16" else p.ref_w_nk
        ref = jnp.dot(xs[0].astype(jnp.float32), ref_w.T, precision="highest")
        rec["rel_err"], rec["us"], rec["kernels"] = check_and_time(fn, xs, ws, ref)
        if rec["us"] is None:
            rec["error"] = f"rel_err {rec['rel_err']:.3g} >= {MAX_REL_ERR}"
    except NotImplementedError as e:
        rec["error"] = f"NotImplementedError: {e}"[:300]
    except Exception as e:  # a compile failure of one variant must not end the run
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    return rec


def sweep_configs(m: int, k: int, n: int, gs: int) -> list[pallas_triton.Config]:
    """Triton configs to time in --sweep triton mode (a small grid around the heuristic)."""
    c = pallas_triton.Config
    cfgs: list[tuple[int, pallas_triton.Config]] = []  # (K rows per program, config)
    if m <= 2:
        for bn in (32, 64, 128):
            for rows in (1024, 2048):
                cfgs.append((rows, c(block_m=1, block_n=bn, fma=True)))
        cfgs.append((1024, c(block_m=1, block_n=64, fma=True, num_stages=4)))
        for nw in (4, 8):
            cfgs.append((1024, c(block_n=64, swap=True, groups_per_step=2, num_warps=nw)))
    elif m <= 8:
        for bn in (32, 64):
            cfgs.append((1024, c(block_m=4 if m <= 4 else 8, block_n=bn, fma=True)))
        cfgs.append((1024, c(block_n=64, swap=True)))
    elif m <= 16:
        for bn in (64, 128):
            for gps in (1, 2):
                for nw in (4, 8):
                    cfgs.append((1024, c(block_n=bn, swap=True, groups_per_step=gps, num_warps=nw)))
    else:
        for bm in (64, 128):
            for nw in (4, 8):
                cfgs.append((k, c(block_m=bm, block_n=128, swap=True, num_warps=nw)))
    return _runnable(
        cfgs, k, lambda cfg: pallas_triton.check_supported(tuning.WeightShape(k, n, gs), cfg)
    )


def _runnable(cands: list[tuple[int, object]], k: int, check) -> list:
    """Configs from (K rows per program, config) pairs: split_k set, unsupported dropped."""
    out = []
    for rows, cfg in cands:
        if k % rows:
            continue
        cfg = dataclasses.replace(cfg, split_k=k // rows)
        try:
            check(cfg)
        except NotImplementedError:
            continue
        if cfg not in out:
            out.append(cfg)
    return out


def tune_candidates(m: int, k: int, n: int, gs: int) -> list[pallas_triton.Config]:
    """The few Triton configs --tune times per M bucket (see docs/kernels.md)."""
    c = pallas_triton.Config
    if m == 1:
        cands = [
            (1024, c(block_m=1, block_n=64, fma=True)),
            (2048, c(block_m=1, block_n=64, fma=True)),
            (2048, c(block_m=1, block_n=128, fma=True)),
            (1024, c(block_n=64, swap=True)),
            (1024, c(block_n=64, asm_dequant=True)),
            (1024, c(block_n=64, swap=True, asm_dequant=True)),
        ]
    elif m <= 16:
        cands = [
            (1024, c(block_n=64, swap=True)),
            (2048, c(block_n=64, swap=True)),
            (1024, c(block_n=64, swap=True, asm_dequant=True)),
            (1024, c(block_n=64, asm_dequant=True)),
        ]
    else:
        cands = [
            (1024, c(block_m=64, block_n=64, swap=True)),
            (2048, c(block_m=64, block_n=64, swap=True, scale_after_dot=False)),
            (2048, c(block_m=64, block_n=128, scale_after_dot=False)),
        ]
    return _runnable(
        cands, k, lambda cfg: pallas_triton.check_supported(tuning.WeightShape(k, n, gs), cfg)
    )


def mosaic_sweep_configs(
    m: int, k: int, n: int, gs: int, splits: tuple[int, ...] = (1, 2, 4, 7, 8)
) -> list[pallas_mosaic_gpu.Config]:
    """Mosaic GPU configs to time in --sweep mosaic mode (around the heuristic): the
    XLA-summed split-K of runs 8-13 against the in-kernel cluster reduction with
    ``splits`` CTAs per cluster (7: 14336 = 7 x 2048)."""
    c = pallas_mosaic_gpu.Config
    bk = 128 if 16 < m <= 64 else 256
    cands = [(1024 if m <= 16 else 2048, c(block_n=64, block_k=bk))]  # (K rows per CTA, cfg)
    for split in splits:
        if k % split == 0:
            cands.append((k // split, c(block_n=64, block_k=bk, cluster_reduce=True)))
    for split in (1, 2):  # around dispatch's choice: row tiles, steps, depth
        rows = k // split
        cands += [
            (rows, c(block_n=128, block_k=bk, cluster_reduce=True)),
            (rows, c(block_n=64, block_k=bk // 2, cluster_reduce=True)),
            (rows, c(block_n=64, block_k=2 * bk, cluster_reduce=True)),
            (rows, c(block_n=64, block_k=bk, cluster_reduce=True, max_concurrent_steps=3)),
            (rows, c(block_n=64, block_k=bk, cluster_reduce=True, max_concurrent_steps=6)),
        ]
    w = tuning.WeightShape(k, n, gs, fmt=format_for("mosaic", k, gs))
    cfgs = _runnable(
        cands, k, lambda cfg: pallas_mosaic_gpu.check_supported(m, w, jnp.bfloat16, cfg)
    )
    return [cfg for cfg in cfgs if cfg.split_k in splits or not cfg.cluster_reduce]


def mosaic_ws_sweep_configs(m: int, k: int, n: int, gs: int) -> list[pallas_mosaic_gpu_ws.Config]:
    """Warp-specialized kernel configs to time in --sweep mosaic_ws mode: weight rows per
    consumer x tokens per CTA and split-K up to 512 tokens; above, dispatch's tiles with
    and without a persistent grid (runs 23 and 25 swept the tile shape and CTA order
    there: commit eeda550)."""
    c = pallas_mosaic_gpu_ws.Config
    if m <= 64:  # decode: against the one-warpgroup kernel
        bm = max(8, -(-m // 8) * 8)
        cands = [c(block_n=64, block_m=bm, split_k=s) for s in (1, 2, 4, 8)]
        cands += [c(block_n=64, block_m=bm, block_k=256, split_k=s) for s in (1, 2, 4)]
        cands += [c(block_n=64, block_m=bm, split_k=2, max_concurrent_steps=8)]
    elif m <= 512:  # few tiles: tokens per CTA and split-K
        cands = [c(block_n=64, block_m=128, split_k=s) for s in (1, 2, 4)]
        cands += [c(block_n=64, block_m=64, split_k=s) for s in (1, 2)]
        cands += [c(block_n=64, block_m=256, split_k=s) for s in (1, 2)]
    else:  # dispatch's tiles, with and without a persistent grid
        cands = [c(block_n=64, block_m=256, group_m=8, persistent=p) for p in (False, True)]
    w = tuning.WeightShape(k, n, gs, fmt=format_for("mosaic", k, gs))
    out = []
    for cfg in cands:
        try:
            pallas_mosaic_gpu_ws.check_supported(m, w, jnp.bfloat16, cfg)
        except NotImplementedError:
            continue
        out.append(cfg)
    return out


def _config_fns(prefix: str, configs: list, run, weights: str) -> dict:
    """name -> (fn(x, w), weights) per config of one backend; the name lists its fields."""
    fns = {}
    for cfg in configs:
        fields = ",".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg))
        fns[f"{prefix}:{fields}"] = (lambda x, w, c=cfg: run(x, w, config=c), weights)
    return fns


def write_tuned_table(records: list[dict], group_size: int, path: pathlib.Path) -> None:
    """Best Triton config per (K, N, M) -> tuned_configs.json entries, M buckets 1/16/128."""
    bucket = {1: 1, 16: 16, 64: 128}
    best: dict[tuple, dict] = {}
    for r in records:
        if r["impl"].startswith("triton:") and r["us"] and r["m"] in bucket:
            key = (r["k"], r["n"], r["m"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    entries = []
    for (k, n, m), r in sorted(best.items()):
        cfg = dict(kv.split("=") for kv in r["impl"][len("triton:") :].split(","))
        cfg = {
            key: (val == "True" if val in ("True", "False") else int(val))
            for key, val in cfg.items()
        }
        entries.append(
            {
                "k": k,
                "n": n,
                "group_size": group_size,
                "m_max": bucket[m],
                "impl": "triton",
                "config": cfg,
                "us": round(r["us"], 2),
            }
        )
    table = json.loads(path.read_text()) if path.exists() else {}
    table[jax.devices()[0].device_kind] = entries
    path.write_text(json.dumps(table, indent=1))


def write_outputs(records: list[dict], out_dir: pathlib.Path, command: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"kernels-{api.device_tag()}"
    (out_dir / f"{name}.json").write_text(json.dumps(records, indent=1))
    table = markdown_table(records)
    dev = jax.devices()[0].device_kind
    md = (
        f"# int4 dequantize-matmul vs bf16 on {dev}\n\n"
        f"Produced by `{command}` (CUPTI kernel time, median of 20, rotating weight "
        "sets > 200 MB, group size 128, random data; see KERNELS.md).\n\n"
        "Times in microseconds; `x` = bf16 time / int4 time (higher is better).\n\n" + table
    )
    (out_dir / f"{name}.md").write_text(md)
    try:
        plot(records, out_dir / f"{name}.png")
    except Exception as e:  # matplotlib missing on the device image
        print(f"plot skipped: {e}", file=sys.stderr)
    return table


def markdown_table(records: list[dict]) -> str:
    impls = [
        i
        for i in ("bf16", "xla_int4", "triton", "mosaic", "auto")
        if any(r["impl"] == i for r in records)
    ]
    by = {(r["k"], r["n"], r["m"], r["impl"]): r for r in records}
    shapes = sorted({(r["k"], r["n"]) for r in records}, key=lambda s: s[0] * s[1])
    head = "| K x N | M | " + " | ".join(impls) + " | auto speedup | auto vs xla_int4 |\n"
    head += "|---" * (len(impls) + 4) + "|\n"
    rows = []
    for k, n in shapes:
        for m in sorted({r["m"] for r in records if (r["k"], r["n"]) == (k, n)}):
            base = by.get((k, n, m, "bf16"), {}).get("us")
            xla = by.get((k, n, m, "xla_int4"), {}).get("us")
            cells = []
            for i in impls:
                us = by.get((k, n, m, i), {}).get("us")
                cells.append("-" if us is None else f"{us:.1f}")
            auto = by.get((k, n, m, "auto"), {}).get("us")
            sp = f"{base / auto:.2f}x" if base and auto else "-"
            vx = f"{xla / auto:.2f}x" if xla and auto else "-"
            rows.append(f"| {k} x {n} | {m} | " + " | ".join(cells) + f" | {sp} | {vx} |")
    return head + "\n".join(rows) + "\n"


def plot(records: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["k"], r["n"], r["m"], r["impl"]): r.get("us") for r in records}
    shapes = sorted({(r["k"], r["n"]) for r in records}, key=lambda s: s[0] * s[1])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, impl in zip(axes, ("auto", "xla_int4"), strict=True):
        for k, n in shapes:
            ms = sorted({r["m"] for r in records if (r["k"], r["n"]) == (k, n)})
            pts = [(m, by.get((k, n, m, "bf16")), by.get((k, n, m, impl))) for m in ms]
            pts = [(m, b / t) for m, b, t in pts if b and t]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{k}x{n}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_title(f"{impl}: bf16 time / int4 time")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup over bf16 jnp.dot")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="8b,70b", help="comma list of: 8b, 70b, key, KxN")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--impls", default="bf16,xla_int4,triton,mosaic,auto")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out-dir", default="docs/benchmarks")
    ap.add_argument(
        "--tile-n",
        type=int,
        default=None,
        help="weight layout tile: 0 = the plain order; u4_split any N divisor, u4_wgmma 128 "
        "(default: prepare_weight's choice)",
    )
    ap.add_argument(
        "--sweep",
        default="",
        choices=["", "triton", "tune", "mosaic", "mosaic_ws"],
        help="'triton': time a grid of Triton configs; 'mosaic': the same for Mosaic GPU; "
        "'mosaic_ws': the warp-specialized many-token Mosaic GPU kernel; "
        "'tune': time the Triton tuning candidates and write tuned_configs.json (copy it "
        "into pallas_kernels/ and commit it)",
    )
    ap.add_argument(
        "--mosaic-splits",
        default="1,2,4,7,8",
        help="--sweep mosaic: cluster sizes (split_k) of the in-kernel reduction to time",
    )
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting work after")
    args = ap.parse_args(argv)
    t0 = time.time()
    argv = argv if argv is not None else sys.argv[1:]
    command = "python -m pallas_kernels.bench " + " ".join(argv)
    shapes = []
    for s in args.shapes.split(","):
        shapes += SHAPES[s] if s in SHAPES else [tuple(int(v) for v in s.split("x"))]
    ms = [int(v) for v in args.ms.split(",")]
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    log = open(out_dir / "bench-log.jsonl", "a")  # noqa: SIM115
    print(f"device: {jax.devices()[0].device_kind}", flush=True)
    for si, (k, n) in enumerate(shapes):
        if time.time() - t0 > args.budget_s:
            print("budget reached; stopping", flush=True)
            break
        p = make_problem(k, n, args.group_size, seed=si, tile_n=args.tile_n)
        for m in ms:
            if time.time() - t0 > args.budget_s:
                break
            mosaic_fmt = format_for("mosaic", k, args.group_size)
            if args.sweep in ("triton", "tune"):
                pick = tune_candidates if args.sweep == "tune" else sweep_configs
                fns = _config_fns(
                    "triton",
                    pick(m, k, n, args.group_size),
                    pallas_triton.int4_matmul_triton,
                    "u4_split",
                )
            elif args.sweep == "mosaic":
                splits = tuple(int(v) for v in args.mosaic_splits.split(","))
                fns = _config_fns(
                    f"mosaic[{mosaic_fmt}]",
                    mosaic_sweep_configs(m, k, n, args.group_size, splits),
                    pallas_mosaic_gpu.int4_matmul_mosaic,
                    mosaic_fmt,
                )
            elif args.sweep == "mosaic_ws":
                fns = _config_fns(
                    f"mosaic_ws[{mosaic_fmt}]",
                    mosaic_ws_sweep_configs(m, k, n, args.group_size),
                    pallas_mosaic_gpu_ws.int4_matmul_mosaic_ws,
                    mosaic_fmt,
                )
            if args.sweep:  # the named baselines first, then the configs
                fns = {**impl_fns([i for i in args.impls.split(",") if i]), **fns}
            else:
                fns = impl_fns(args.impls.split(","))
            auto_fmt = format_for(None, k, args.group_size)
            chose = api.choose(m, p.w4[auto_fmt][0])
            auto_rec = None
            if "auto" in fns:  # time auto first: a backend it picked is not timed twice
                fns = {"auto": fns.pop("auto"), **fns}
            for name, (fn, weights) in fns.items():
                same = _IMPL_OF.get(name) == chose and _fmt(weights, k, args.group_size) == auto_fmt
                if auto_rec is not None and same:
                    rec = {**auto_rec, "impl": name, "same_as_auto": True}
                elif name == "xla_int4" and 16 < m <= 128 and chose == "triton":
                    rec = _not_timed(k, n, m, name, "not timed for 16 < M <= 128 (see M=16, 256)")
                elif name == "triton" and m > MAX_TRITON_BENCH_M:
                    why = f"not timed above M={MAX_TRITON_BENCH_M} (dispatch uses xla)"
                    rec = _not_timed(k, n, m, name, why)
                else:
                    rec = measure_one(p, m, name, fn, weights, seed=1000 * si + m)
                if name == "auto":
                    rec["chose"] = chose
                    auto_rec = rec
                records.append(rec)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                us = "-" if rec["us"] is None else f"{rec['us']:.2f}"
                print(
                    f"{k}x{n} m={m} {name}: {us} us err={rec['rel_err']} {rec.get('error', '')}",
                    flush=True,
                )
        del p
    if args.sweep:
        (out_dir / "sweep.json").write_text(json.dumps(records, indent=1))
        if args.sweep == "tune":
            write_tuned_table(records, args.group_size, out_dir / "tuned_configs.json")
        best = {}
        for r in records:
            if r["impl"].startswith(("triton:", "mosaic")) and r["us"]:
                key = (r["k"], r["n"], r["m"])
                if key not in best or r["us"] < best[key]["us"]:
                    best[key] = r
        for key, r in sorted(best.items()):
            base = next(
                (
                    x["us"]
                    for x in records
                    if (x["k"], x["n"], x["m"]) == key and x["impl"] == "bf16"
                ),
                None,
            )
            ratio = f"{base / r['us']:.2f}x" if base else "-"
            print(f"BEST {key}: {r['us']:.2f} us ({ratio} vs bf16) {r['impl']}")
        return
    print(write_outputs(records, out_dir, command))
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
