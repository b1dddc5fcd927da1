"""GPU probe: the decode kernel's epilogues against the XLA passes they replace.

    python -m pallas_kernels.epilogue_probe --out OUT

At decode the Mosaic kernel splits K for the Llama-3-8B layers narrower than 100 row
tiles (qkv 4096x6144, o_proj 4096x4096, down_proj 14336x4096) and XLA summed the f32
partials (one kernel per matmul); gate_up's SwiGLU was one more XLA kernel. This times,
with CUPTI (rotating weights past the L2, as `pallas_kernels.bench`):

- ``sum``: ``int4_matmul(x, w)`` (the kernel, then XLA's sum of its partials), against
  ``partials``: the kernel alone writing ``[S, M, N]`` f32 (``partial_sums=True``), at
  dispatch's split and others: what a consumer that adds the partials saves, and
  which S it can afford; and ``cluster``: S CTAs of a thread-block cluster adding their
  partials in the kernel (``cluster_reduce``), the product out in x.dtype;
- the consumers: ``add_rms_norm`` with a bf16 delta against a ``[S, B, 4096]`` f32
  stack, and ``decode_attention_update_qkv`` with a bf16 row against ``[S, B, 6144]``
  (its kernel alone: the cache copy of a non-donated call is left out);
- gate_up 4096x28672: ``int4_matmul`` then XLA's ``swiglu_interleaved`` against
  ``epilogue="swiglu"`` (the kernel's own).

Every timed matmul output is first checked against the f32 reference (rel. err < 1e-2).
Writes ``epilogue-probe-h100.json`` and ``.md`` to ``--out``; prints the table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp

from pallas_kernels import api, attention, bench, norm, pallas_mosaic_gpu, tuning
from pallas_kernels.reference import swiglu_interleaved

SPLIT_SHAPES = ((4096, 6144), (4096, 4096), (14336, 4096))  # qkv, o_proj, down_proj
GATE_UP = (4096, 28672)
GROUP = 128
ITERATIONS = 20


def _cupti_us(fn, *args) -> tuple[float, dict[str, float]]:
    """`bench.cupti_time` of ``fn(*args)`` jitted; non-array arguments are static."""
    static = tuple(i for i, a in enumerate(args) if not isinstance(a, jax.Array))
    return bench.cupti_time(jax.jit(fn, static_argnums=static), args, ITERATIONS)


def _matmul_records(device: str, ms: tuple[int, ...]) -> list[dict]:
    out = []
    for (k, n), m in [(s, m) for s in (*SPLIT_SHAPES, GATE_UP) for m in ms]:
        p = bench.make_problem(k, n, GROUP, seed=k + n, fmts=("u4_wgmma",))
        ws = p.w4["u4_wgmma"]
        xs = bench.make_xs(m, k, len(ws), seed=m)
        y32 = xs[0].astype(jnp.float32) @ p.ref_w_nk.T
        base = tuning.mosaic_config(device, m, k, n, GROUP)
        if (k, n) == GATE_UP:
            ref = swiglu_interleaved(y32)
            variants = {
                "matmul + XLA swiglu": lambda x, w: swiglu_interleaved(api.int4_matmul(x, w)),
                "epilogue swiglu": lambda x, w: api.int4_matmul(x, w, epilogue="swiglu"),
            }
        else:
            ref = y32
            variants = {"matmul + XLA sum": lambda x, w: api.int4_matmul(x, w)}
            for split in sorted({base.split_k, 2, 4, 7, 8, 14, 16}):
                if k % (split * base.block_k):
                    continue
                cfg = dataclasses.replace(base, split_k=split)
                variants[f"partials S={split}"] = lambda x, w, cfg=cfg: (
                    pallas_mosaic_gpu.int4_matmul_mosaic(x, w, config=cfg, partial_sums=True)
                )
            for split in (2, 4, 8):  # a cluster along K adds its partials: x.dtype out
                if k % (split * base.block_k):
                    continue
                cfg = dataclasses.replace(base, split_k=split, cluster_reduce=True)
                variants[f"cluster S={split}"] = lambda x, w, cfg=cfg: (
                    pallas_mosaic_gpu.int4_matmul_mosaic(x, w, config=cfg)
                )
        for name, fn in variants.items():
            first = jax.jit(fn)(xs[0], ws[0])
            if first.ndim == 3:
                first = first.sum(0)
            err = bench.rel_err(first.astype(jnp.float32), ref)
            us = None
            if err < bench.MAX_REL_ERR:
                _, us, _ = bench.check_and_time(fn, xs, ws, None)
            rec = {"what": "matmul", "k": k, "n": n, "m": m, "variant": name, "us": us}
            out.append({**rec, "rel_err": err, "dispatch_split": base.split_k})
            print(json.dumps(out[-1]), flush=True)
    return out


def _attention_qkv(qkv, cos, kc, valid):
    """The 8B decode attention fed by qkv (32 query / 8 kv heads of 128), step 200."""
    return attention.decode_attention_update_qkv(
        qkv, cos, cos, kc, kc, 200, valid, num_heads=32, num_kv_heads=8, scale=0.1
    )


def _consumer_records(batches: tuple[int, ...]) -> list[dict]:
    out = []
    key = jax.random.key(0)
    for b in batches:
        d, f = 4096, 6144
        x = jax.random.normal(key, (b, d), jnp.float32).astype(jnp.bfloat16)
        wn = jnp.ones((d,), jnp.bfloat16)
        for s in (None, 1, 2, 4, 7, 14):
            shape = (b, d) if s is None else (s, b, d)
            dtype = jnp.bfloat16 if s is None else jnp.float32
            delta = jax.random.normal(key, shape, jnp.float32).astype(dtype)
            us, _ = _cupti_us(norm.add_rms_norm, x, delta, wn, 1e-5)
            out.append({"what": "add_rms_norm", "b": b, "s": s, "us": us})
            print(json.dumps(out[-1]), flush=True)
        seq, kh, h = 384, 8, 128
        kc = jax.random.normal(key, (b, seq, kh, h), jnp.float32).astype(jnp.bfloat16)
        cos = jnp.ones((b, h), jnp.float32)
        valid = jnp.ones((b, seq), bool)
        for s in (None, 1, 2, 4):
            shape = (b, f) if s is None else (s, b, f)
            dtype = jnp.bfloat16 if s is None else jnp.float32
            qkv = jax.random.normal(key, shape, jnp.float32).astype(dtype)

            _, per = _cupti_us(_attention_qkv, qkv, cos, kc, valid)
            us = sum(t for name, t in per.items() if "attention" in name)
            out.append({"what": "attention_qkv", "b": b, "s": s, "us": us, "kernels": per})
            print(json.dumps(out[-1]), flush=True)
    return out


def markdown(records: list[dict], device: str) -> str:
    lines = [f"# epilogue-probe ({device})", "", "    python -m pallas_kernels.epilogue_probe"]
    lines += ["", "| K x N | M | variant | us | rel err |", "|---|---:|---|---:|---:|"]
    for r in records:
        if r["what"] == "matmul":
            us = "-" if r["us"] is None else f"{r['us']:.2f}"
            lines.append(
                f"| {r['k']}x{r['n']} | {r['m']} | {r['variant']} | {us} | {r['rel_err']:.1e} |"
            )
    lines += ["", "| consumer | batch | S (None: bf16 operand) | us |", "|---|---:|---:|---:|"]
    for r in records:
        if r["what"] != "matmul":
            lines.append(f"| {r['what']} | {r['b']} | {r['s']} | {r['us']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the JSON and markdown")
    ap.add_argument("--ms", default="1,8", help="tokens per matmul call, comma-separated")
    ap.add_argument("--batches", default="1,8", help="rows of the consumers")
    args = ap.parse_args(argv)
    device = jax.devices()[0].device_kind
    ms = tuple(int(v) for v in args.ms.split(","))
    batches = tuple(int(v) for v in args.batches.split(","))
    records = _consumer_records(batches) + _matmul_records(device, ms)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "epilogue-probe-h100.json").write_text(json.dumps(records, indent=1))
    text = markdown(records, device)
    (out / "epilogue-probe-h100.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
