"""Device diagnostics of the Triton int4 kernel (docs/kernels.md, run 6).

    python -m pallas_kernels.diag --out $OUT            # PTX/SASS stats + timings
    python -m pallas_kernels.diag --out /tmp/d --no-time --shapes 8192x8192

1. Dumps the PTX XLA generates for the M=1 kernel (``--xla_dump_to`` in a child
   process), keeps the kernel's PTX, an opcode histogram of it, and, where the CUDA
   tools are on the machine, ``ptxas -v`` (registers, spills) and a SASS histogram.
2. Times, with the bench method (CUPTI, rotating weights > 200 MB, checked against an
   f32 reference), bf16 ``jnp.dot``, what dispatch runs today, and the variants listed
   in ``variants`` below; and a load-only kernel (same grid and loop, the packed bytes
   read as uint32 and XOR-ed) that gives the memory ceiling of this loop structure.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import api, bench, tuning
from pallas_kernels.layout import prepare_weight
from pallas_kernels.pallas_triton import Config, int4_matmul_triton

_KERNEL = "int4_matmul_triton"


def _opcodes(text: str) -> collections.Counter:
    """PTX/SASS opcode histogram (first token of each instruction line, no predicate)."""
    hist: collections.Counter = collections.Counter()
    for line in text.splitlines():
        line = line.strip()
        line = re.sub(r"^/\*[0-9a-f]+\*/\s*", "", line)  # SASS address
        line = re.sub(r"^@!?%?\w+\s+", "", line)  # predicate
        m = re.match(r"([a-zA-Z][\w.]*)\s", line + " ")
        if m and not line.startswith(("//", ".", "$", "{", "}")):
            hist[m.group(1)] += 1
    return hist


def _kernel_ptx(ptx: str) -> str:
    """The ``.entry`` of the Triton kernel in a module's PTX (XLA links it in)."""
    start = ptx.find(".entry " + _KERNEL)
    if start < 0:
        start = ptx.find(_KERNEL)
    if start < 0:
        return ""
    end = ptx.find(".entry ", start + 10)
    return ptx[start : end if end > 0 else len(ptx)]


def _tools() -> dict[str, str]:
    found = {}
    roots = [os.path.dirname(jax.__file__) + "/../nvidia", "/usr/local/cuda/bin", "/usr/bin"]
    for tool in ("ptxas", "nvdisasm", "cuobjdump"):
        hits = shutil.which(tool) or next(
            (p for r in roots for p in glob.glob(f"{r}/**/{tool}", recursive=True)), None
        )
        if hits:
            found[tool] = hits
    return found


def dump_child(out: str, shape: str) -> None:
    """In a child with XLA_FLAGS=--xla_dump_to: compile + run each variant once (M=1)."""
    del out
    k, n = (int(v) for v in shape.split("x"))
    q = jnp.full((k, n), 7, jnp.uint8)
    s = jnp.ones((k // 128, n), jnp.float16)
    w = prepare_weight(q, s, jnp.zeros((k // 128, n), jnp.uint8), group_size=128)
    x = jnp.ones((1, k), jnp.bfloat16)
    for name, cfg in variants(1, k, n).items():
        if name not in ("swap", "asm"):
            continue

        def f(x, w, c=cfg):
            return int4_matmul_triton(x, w, config=c)

        f.__name__ = "variant_" + name
        try:
            jax.block_until_ready(jax.jit(f)(x, w))
            print("dumped", name, flush=True)
        except Exception as e:
            print("dump failed", name, type(e).__name__, str(e)[:2000], flush=True)


def diagnose_ptx(out_dir: pathlib.Path, shape: str) -> dict:
    dump = out_dir / "xla_dump_tmp"
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_gpu_dump_llvmir",
        JAX_ENABLE_COMPILATION_CACHE="false",
    )
    t0 = time.time()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pallas_kernels.diag",
            "--dump-child",
            "--out",
            str(out_dir),
            "--shapes",
            shape,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    info: dict = {"child_rc": r.returncode, "child_s": round(time.time() - t0, 1)}
    info["child_tail"] = (r.stdout + r.stderr)[-3000:]
    tools = _tools()
    info["tools"] = tools
    ptx_dir = out_dir / "ptx"
    ptx_dir.mkdir(exist_ok=True)
    listing = sorted(glob.glob(f"{dump}/**/*", recursive=True))
    info["dump_listing"] = [os.path.relpath(f, dump) for f in listing][:80]
    files = [f for f in listing if f.endswith(".ptx") or f.endswith(".ll")]
    info["ptx_files"] = [os.path.basename(f) for f in files]
    kernels = {}
    for f in files:
        text = pathlib.Path(f).read_text()
        body = _kernel_ptx(text)
        if not body:
            continue
        tag = os.path.basename(f).split(".")[0] + "_" + str(len(kernels))
        (ptx_dir / f"{tag}.ptx").write_text(body)
        rec = {"file": os.path.basename(f), "ptx_ops": dict(_opcodes(body).most_common(60))}
        if "ptxas" in tools:
            cubin = ptx_dir / f"{tag}.cubin"
            pr = subprocess.run(
                [tools["ptxas"], "-arch=sm_90a", "-v", f, "-o", str(cubin)],
                capture_output=True,
                text=True,
            )
            lines = [ln for ln in pr.stderr.splitlines() if _KERNEL in ln or "Used" in ln]
            rec["ptxas"] = "\n".join(lines)[-1500:]
            sass = ""
            if "cuobjdump" in tools and cubin.exists():
                sass = subprocess.run(
                    [tools["cuobjdump"], "-sass", str(cubin)], capture_output=True, text=True
                ).stdout
            elif "nvdisasm" in tools and cubin.exists():
                sass = subprocess.run(
                    [tools["nvdisasm"], "-c", str(cubin)], capture_output=True, text=True
                ).stdout
            if sass:
                i = sass.find(_KERNEL)
                body_sass = sass[i : sass.find("Function :", i + 10)] if i >= 0 else sass
                (ptx_dir / f"{tag}.sass").write_text(body_sass)
                rec["sass_ops"] = dict(_opcodes(body_sass).most_common(60))
                rec["sass_lines"] = body_sass.count("\n")
            if cubin.exists():
                cubin.unlink()
        kernels[tag] = rec
    info["kernels"] = kernels
    shutil.rmtree(dump, ignore_errors=True)
    return info


def variants(m: int, k: int, n: int) -> dict[str, Config]:
    """What dispatch runs (``tuned``), the same grid as asm without it (``swap``), and
    the asm_dequant variants around it."""
    kind = jax.devices()[0].device_kind
    tuned = tuning.triton_config(kind, m, k, n, 128)
    if tuned.block_n != 64:
        tuned = dataclasses.replace(tuned, block_n=64)
    base = Config(block_n=64, swap=True, split_k=max(1, k // 1024), asm_dequant=True)
    out = {"tuned": tuned, "swap": dataclasses.replace(base, asm_dequant=False), "asm": base}
    if m == 1:
        out["asm_gps2"] = dataclasses.replace(base, groups_per_step=2)
        out["asm_st4"] = dataclasses.replace(base, num_stages=4)
        out["asm_split2048"] = dataclasses.replace(base, split_k=max(1, k // 2048))
        out["asm_noswap"] = dataclasses.replace(base, swap=False)
    else:
        out["asm_gps2"] = dataclasses.replace(base, groups_per_step=2)
    return out


def _load_only_kernel(q_ref, o_ref, *, steps: int, bn: int):
    pid_n, pid_s = pl.program_id(0), pl.program_id(1)

    def body(i, acc):
        return acc ^ q_ref[pid_n, pid_s * steps + i]

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bn, q_ref.shape[-1]), jnp.uint32))
    pltriton.store(o_ref.at[pid_s, pl.ds(pl.multiple_of(pid_n * bn, bn), bn)], jnp.sum(acc, axis=1))


def load_only(
    q32: jax.Array, split_k: int, num_stages: int = 3, num_warps: int = 4, interpret: bool = False
):
    """Reads every packed byte once (as uint32, same tiles and grid); ~no arithmetic."""
    nt, groups, bn, _ = q32.shape
    steps = groups // split_k
    whole = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        lambda q, o: _load_only_kernel(q, o, steps=steps, bn=bn),
        grid=(nt, split_k, 1),
        in_specs=[whole],
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct((split_k, nt * bn), jnp.uint32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="load_only",
    )(q32)


def time_load_only(p: bench.Problem, split_k: int) -> float:
    from jax.experimental.mosaic.gpu import profiler

    to32 = jax.jit(
        lambda q: jax.lax.bitcast_convert_type(q.reshape(*q.shape[:-1], -1, 4), jnp.uint32)
    )
    qs = [to32(w.q_packed) for w in p.w4["u4_split"]]
    f = jax.jit(lambda qs: [load_only(q, split_k) for q in qs])
    jax.block_until_ready(f(qs))
    _, times = profiler.measure(f, iterations=20)(qs)
    return 1e3 * statistics.median(times) / len(qs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="8192x8192,4096x14336,14336x4096,4096x28672")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--dump-child", action="store_true")
    ap.add_argument("--no-ptx", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--budget-s", type=float, default=400)
    ap.add_argument("--no-baselines", dest="baselines", action="store_false")
    ap.add_argument("--no-load-only", dest="load_only", action="store_false")
    args = ap.parse_args(argv)
    if args.dump_child:
        dump_child(args.out, args.shapes.split(",")[0])
        return
    t0 = time.time()
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print("device:", jax.devices()[0].device_kind, flush=True)
    if not args.no_ptx:
        info = diagnose_ptx(out_dir, args.shapes.split(",")[0])
        (out_dir / "ptx_info.json").write_text(json.dumps(info, indent=1))
        print(json.dumps(info, indent=1)[:6000], flush=True)
    if args.no_time:
        return
    log = open(out_dir / "records.jsonl", "a")  # noqa: SIM115
    for si, shape in enumerate(args.shapes.split(",")):
        if time.time() - t0 > args.budget_s:
            print("budget reached", flush=True)
            break
        k, n = (int(v) for v in shape.split("x"))
        p = bench.make_problem(k, n, 128, seed=si, fmts=("u4_split",))
        nbytes = p.w4["u4_split"][0].nbytes
        for m in (int(v) for v in args.ms.split(",")):
            fns = {}
            if args.baselines:
                fns["bf16"] = (bench._bf16_dot, "bf16")
                fns["dispatch"] = (
                    lambda x, w: api.int4_matmul(x, w, implementation="triton"),
                    "u4_split",
                )
            for name, cfg in variants(m, k, n).items():
                if name == "tuned":
                    continue
                fns[name] = (lambda x, w, c=cfg: int4_matmul_triton(x, w, config=c), "u4_split")
            for name, (fn, weights) in fns.items():
                if time.time() - t0 > args.budget_s:
                    break
                rec = bench.measure_one(p, m, name, fn, weights, seed=1000 * si + m)
                if name != "bf16":
                    cfg = variants(m, k, n).get(name) or variants(m, k, n)["tuned"]
                    rec["config"] = dataclasses.asdict(cfg)
                if rec["us"]:
                    rec["TBps"] = round(nbytes / rec["us"] / 1e6, 3)
                rec["run"] = "run6-asm-dequant"
                log.write(json.dumps(rec) + "\n")
                log.flush()
                print(
                    f"{k}x{n} m={m} {name}: {rec['us'] and round(rec['us'], 2)} us "
                    f"{rec.get('TBps')} TB/s err={rec['rel_err']} {rec.get('error', '')} "
                    f"{rec.get('kernels', '')}",
                    flush=True,
                )
        if si < 2 and args.load_only:
            for split in (max(1, k // 1024), max(1, k // 2048)):
                try:
                    us = time_load_only(p, split)
                    rec = {"k": k, "n": n, "impl": f"load_only:split_k={split}", "us": us}
                    rec["TBps"] = round(k * n / 2 / us / 1e6, 3)
                except Exception as e:
                    rec = {"k": k, "n": n, "impl": "load_only", "error": str(e)[:500]}
                rec["run"] = "run6-asm-dequant"
                log.write(json.dumps(rec) + "\n")
                print(rec, flush=True)
        del p
    print(f"total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
