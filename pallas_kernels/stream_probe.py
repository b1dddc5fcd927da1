"""What bounds the Mosaic decode kernel: its streaming ceilings, measured (docs/kernels.md).

    python -m pallas_kernels.stream_probe --out $OUT       # on the H100, ~5 minutes

At M = 1 the decode kernel moves 2.1-2.3 TB/s where bf16 cuBLAS moves ~3.0 on bigger
matrices. This times, on each layer shape, with the bench's method (CUPTI, rotating
weight sets past the L2) and the grid, K split, step size and pipeline depth dispatch
uses for M = 1:

* ``bf16`` and ``auto`` (dispatch, on `prepare_weight`'s default layout: the contiguous
  128 x 256 tiles since run 101), and dispatch's config with the changes
  ``--variants`` names (default ``scale_in_dequant``: one accumulator over K, chains
  overlapped) and the warp-specialized kernel with those ``--ws-variants`` names (on
  dispatch's config of that kernel above 16 tokens, else 64 rows per consumer and 8 or
  16 tokens per CTA), all checked against the f32 reference, at ``--ms`` (1 and 16);
* ``load``: the same ``emit_pipeline`` of TMA copies with an empty body, i.e. the
  memory ceiling of the kernel's access pattern: ``rows`` (the ``[N, K/8]`` words order:
  each step reads 64 rows of ``block_k / 2`` bytes at a ``K / 2`` stride) against
  ``tiles`` (``[N/64, K/block_k, 64, block_k/8]``: each step one contiguous run), the
  weight alone (``w``) or with the x, scale and zero-point copies of every step
  (``wxsz``) or some of them (``p``: scales and zero points packed in one ``uint32``
  array, one copy), at dispatch's depth and deeper;
* ``dequant``: the pipeline plus the dequantization of every weight into registers
  (summed in bf16 so it is not dead code), no wgmma: the kernel without its
  tensor-core chain; ``ld`` the same with the raw words instead of the dequantized
  weights (the shared-memory reads and the sums without the dequantization's ALU work);
* ``mma``: the pipeline plus the kernel's wgmma chains, per-group waits and scales on
  the raw words (no dequantization): the kernel without its ALU work; ``mma1`` the
  same with one chain and one wait per step instead of per group.

Each record's ``tbps`` counts the bytes the real kernel reads (int4 codes, f16 scales
and zero points), so the rows compare directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import bench, pallas_mosaic_gpu, pallas_mosaic_gpu_ws, tuning
from pallas_kernels.layout import WGMMA_CHUNK
from pallas_kernels.pallas_mosaic_gpu import _dequant_wgmma, dequant_group, swizzle_for, tiled

SHAPES = [(4096, 14336), (4096, 28672), (8192, 8192), (14336, 4096), (4096, 4096)]
ROWS = 64  # weight rows per CTA (wgmma M), as dispatch uses at decode


@dataclasses.dataclass(frozen=True)
class Probe:
    layout: str  # "rows" | "tiles"
    copies: str  # "w" then any of "x", "s", "z" (or "p": s and z packed in one array)
    body: str  # "none" | "ld" | "dequant" | "mma" | "mma1"
    block_k: int
    depth: int
    split_k: int

    @property
    def name(self) -> str:
        return (
            f"{'load' if self.body == 'none' else self.body}:{self.layout},{self.copies},"
            f"bk={self.block_k},depth={self.depth},split={self.split_k}"
        )


def _probe_kernel(*refs, p: Probe, steps: int, g: int):
    """One CTA: ``steps`` pipeline steps of its 64 rows; writes a [64, 8] f32 tile."""
    *ins, o_gmem, o_smem = refs
    ni, ki = lax.axis_index("n"), lax.axis_index("k")
    k0 = ki * steps
    bk = p.block_k
    w_tr = tiled(swizzle_for(bk // 2), 32)
    if p.layout == "tiles":
        w_spec = plgpu.BlockSpec(
            (None, None, ROWS, bk // 8), lambda i: (ni, k0 + i, 0, 0), transforms=w_tr
        )
    else:
        w_spec = plgpu.BlockSpec((ROWS, bk // 8), lambda i: (ni, k0 + i), transforms=w_tr)
    specs = [w_spec]
    if "x" in p.copies:
        specs.append(plgpu.BlockSpec((8, bk), lambda i: (0, k0 + i), transforms=tiled(128, 16)))
    for _ in range(sum(c in p.copies for c in "szp")):  # [K / g, N] each
        specs.append(plgpu.BlockSpec((bk // g, ROWS), lambda i: (k0 + i, ni)))
    wgmma = plgpu.Layout.WGMMA

    def body(idx, w_smem, *rest):
        *_, carry = rest
        if p.body == "none":
            return carry
        x_smem, s_smem, z_smem = rest[:3]
        w_tile = plgpu.load(w_smem, layout=plgpu.Layout.WGMMA_8BIT)
        if p.body == "mma1":  # one chain and one wait per step (no per-group scale)
            zm = plgpu.load(z_smem.at[0], layout=row).astype(jnp.bfloat16)

            def step_chain(acc_ref):
                for c in range(bk // WGMMA_CHUNK):
                    words = w_tile[:, c * WGMMA_CHUNK // 8 : (c + 1) * WGMMA_CHUNK // 8]
                    wq = _dequant_wgmma(words, zm, jnp.bfloat16, ops="raw")
                    for j in range(WGMMA_CHUNK // 64):
                        b = x_smem.at[:, pl.ds(c * WGMMA_CHUNK + j * 64, 64)].T
                        plgpu.wgmma(acc_ref, wq[:, 64 * j : 64 * j + 64], b)
                return acc_ref[...]

            return carry + pl.run_scoped(step_chain, plgpu.ACC((ROWS, 8), jnp.float32))
        for gi in range(bk // g):
            if p.body in ("dequant", "ld"):  # summed in bf16 so that it is not dead code
                if p.body == "dequant":
                    wq = dequant_group(w_tile, z_smem.at[gi], gi, g, jnp.bfloat16)
                else:  # the raw words of the group in the operand registers (g = 128)
                    zm = plgpu.load(z_smem.at[gi], layout=row).astype(jnp.bfloat16)
                    words = w_tile[:, gi * g // 8 : (gi * g + WGMMA_CHUNK) // 8]
                    wq = _dequant_wgmma(words, zm, jnp.bfloat16, ops="raw")
                for j in range(g // 8):
                    carry = carry + wq[:, 8 * j : 8 * j + 8]
                continue
            # "mma": the kernel's wgmma chain, per-group wait and scale, on raw words
            words = w_tile[:, gi * g // 8 : (gi * g + WGMMA_CHUNK) // 8]
            zm = plgpu.load(z_smem.at[gi], layout=row).astype(jnp.bfloat16)
            wq = _dequant_wgmma(words, zm, jnp.bfloat16, ops="raw")

            def chain(acc_ref, gi=gi, wq=wq):
                for j in range(g // 64):
                    b = x_smem.at[:, pl.ds(gi * g + j * 64, 64)].T
                    plgpu.wgmma(acc_ref, wq[:, 64 * j : 64 * j + 64], b)
                return acc_ref[...]

            acc_g = pl.run_scoped(chain, plgpu.ACC((ROWS, 8), jnp.float32))
            s = plgpu.load(s_smem.at[gi], layout=row).astype(jnp.float32)
            carry = carry + lax.broadcast_in_dim(s, acc_g.shape, [0]) * acc_g
        return carry

    row = plgpu.Layout.WGMMA.reduce(1)
    acc_dtype = jnp.bfloat16 if p.body in ("dequant", "ld") else jnp.float32
    init = plgpu.layout_cast(jnp.zeros((ROWS, 8), acc_dtype), wgmma)
    acc = plgpu.emit_pipeline(
        body, grid=(steps,), in_specs=specs, max_concurrent_steps=p.depth, init_carry=init
    )(*ins)
    o_smem[...] = acc.astype(jnp.float32)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[ki, pl.ds(ni * ROWS, ROWS)])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("p", "k", "n", "g"))
def run_probe(x, w, s, z, *, p: Probe, k: int, n: int, g: int):
    steps = k // (p.split_k * p.block_k)
    kernel = plgpu.kernel(
        functools.partial(_probe_kernel, p=p, steps=steps, g=g),
        out_type=jax.ShapeDtypeStruct((p.split_k, n, 8), jnp.float32),
        grid=(n // ROWS, p.split_k),
        grid_names=("n", "k"),
        scratch_types=[plgpu.SMEM((ROWS, 8), jnp.float32)],
    )
    operands = {"x": x, "s": s, "z": z}
    if "p" in p.copies:  # one uint32 per (group, row): its scale and zero point
        operands["p"] = lax.bitcast_convert_type(jnp.stack([s, z], axis=-1), jnp.uint32)
    return kernel(w, *(operands[c] for c in p.copies[1:]))


def _call_probe(x, w, *, s, z, p: Probe, k: int, n: int, g: int):
    return run_probe(x, w, s, z, p=p, k=k, n=n, g=g)


def probes(k: int, n: int, g: int) -> list[Probe]:
    cfg = tuning.mosaic_config("NVIDIA H100", 1, k, n, g)
    bk, split = cfg.block_k, cfg.split_k
    steps = k // (split * bk)
    depth = pallas_mosaic_gpu.pipeline_depth(8, g, cfg, steps)
    out = []
    for layout in ("rows", "tiles"):
        for copies in ("w", "wx", "wsz", "wp", "wxp", "wxsz"):
            out.append(Probe(layout, copies, "none", bk, depth, split))
        out.append(Probe(layout, "w", "none", bk, min(8, steps), split))
    out.append(Probe("rows", "w", "none", 2 * bk, max(2, depth // 2), split))
    out.append(Probe("rows", "wxsz", "ld", bk, depth, split))
    out.append(Probe("rows", "wxsz", "dequant", bk, depth, split))
    out.append(Probe("rows", "wxsz", "mma", bk, depth, split))
    out.append(Probe("rows", "wxsz", "mma1", bk, depth, split))
    return out


def weight_shape(p: Probe, k: int, n: int) -> tuple[int, ...]:
    """The probe's uint32 weight words: ``[N, K/8]`` rows, or contiguous 64-row tiles."""
    if p.layout == "tiles":
        return (n // ROWS, k // p.block_k, ROWS, p.block_k // 8)
    return (n, k // 8)


def _weights(p: Probe, k: int, n: int, count: int, key) -> list:
    keys = jax.random.split(key, count)
    return [jax.random.bits(kk, weight_shape(p, k, n), jnp.uint32) for kk in keys]


def ncu_target(k: int, n: int, g: int) -> None:
    """Runs bf16 ``jnp.dot``, dispatch's kernel and the ``load:rows,wxsz`` probe at M = 1,
    twice each, and nothing else on the GPU after the inputs exist: a target for Nsight
    Compute (``ncu -k regex:'mosaic|gemm|gemv|nvjet' ...``)."""
    from pallas_kernels import api

    prob = bench.make_problem(k, n, g, seed=0, fmts=("u4_wgmma",))
    w = prob.w4["u4_wgmma"][0]
    x = bench.make_xs(1, k, 1, 0)[0]
    p = next(q for q in probes(k, n, g) if q.copies == "wxsz" and q.body == "none")
    words = _weights(p, k, n, 1, jax.random.key(0))[0]
    calls = [
        jax.jit(jnp.dot),
        jax.jit(api.int4_matmul),
        functools.partial(_call_probe, s=w.plain_scales, z=w.plain_zeros, p=p, k=k, n=n, g=g),
    ]
    operands = [(x, prob.w16_kn[0]), (x, w), (x, words)]
    jax.block_until_ready([f(*a) for f, a in zip(calls, operands, strict=True)])  # compile
    for _ in range(2):
        for f, a in zip(calls, operands, strict=True):
            jax.block_until_ready(f(*a))


def parse_changes(text: str, config_type=pallas_mosaic_gpu.Config) -> dict:
    """``"block_k=512,scale_in_dequant=True"`` -> the field changes of a ``config_type``."""
    fields = {f.name: f.type for f in dataclasses.fields(config_type)}
    changes = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in fields:
            raise ValueError(f"unknown Config field {name!r} in {text!r}")
        changes[name] = value == "True" if fields[name] == "bool" else int(value)
    return changes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/stream_probe")
    ap.add_argument("--ncu-target", default="", help="KxN: run ncu_target() and exit")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument(
        "--no-probes", dest="probes", action="store_false", help="time the real kernels only"
    )
    ap.add_argument("--ms", default="1,16", help="token counts of the real kernels")
    ap.add_argument(
        "--variants",
        default="scale_in_dequant=True",
        help="dispatch's config with these changes, timed too: 'FIELD=VALUE,...;...'",
    )
    ap.add_argument(
        "--ws-variants",
        default="",
        help="the warp-specialized kernel (dispatch's config above 16 tokens, else 64 rows "
        "per consumer and M rounded up to 8 or 16 tokens per CTA) with these changes: "
        "'FIELD=VALUE,...;...'",
    )
    args = ap.parse_args(argv)
    ms = [int(v) for v in args.ms.split(",")]
    variants = [(text, parse_changes(text)) for text in args.variants.split(";") if text]
    ws_variants = [
        (text, parse_changes(text, pallas_mosaic_gpu_ws.Config))
        for text in args.ws_variants.split(";")
        if text
    ]
    if args.ncu_target:
        k, n = (int(v) for v in args.ncu_target.split("x"))
        ncu_target(k, n, args.group_size)
        return
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, g = time.time(), args.group_size
    records = []
    log = open(out / "probe.jsonl", "a")  # noqa: SIM115

    def add(rec):
        records.append(rec)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        us = "-" if rec["us"] is None else f"{rec['us']:.2f}"
        print(f"{rec['k']}x{rec['n']} {rec['impl']}: {us} us {rec.get('error', '')}", flush=True)

    print(f"device: {jax.devices()[0].device_kind}", flush=True)
    for si, shape in enumerate(args.shapes.split(",")):
        if time.time() - t0 > args.budget_s:
            break
        k, n = (int(v) for v in shape.split("x"))
        nbytes = k * n // 2 + 4 * (k // g) * n
        prob = bench.make_problem(k, n, g, seed=si, fmts=("u4_wgmma",))
        fns = bench.impl_fns(["bf16", "auto"])
        for m in ms:
            kernels = {
                "auto+": (
                    pallas_mosaic_gpu.int4_matmul_mosaic,
                    tuning.mosaic_config("NVIDIA H100", m, k, n, g),
                    variants,
                ),
                "ws:": (
                    pallas_mosaic_gpu_ws.int4_matmul_mosaic_ws,
                    # dispatch's config where dispatch runs this kernel (above 16 tokens)
                    tuning.mosaic_ws_config("NVIDIA H100", m, k, n, g)
                    if m > 16
                    else pallas_mosaic_gpu_ws.Config(block_n=64, block_m=8 if m <= 8 else 16),
                    ws_variants,
                ),
            }
            for prefix, (kernel, base, changes_list) in kernels.items():
                for text, changes in changes_list:
                    config = dataclasses.replace(base, **changes)
                    fns[prefix + text] = (functools.partial(kernel, config=config), "u4_wgmma")
            for name, (fn, weights) in fns.items():
                rec = bench.measure_one(prob, m, name, fn, weights, seed=si)
                rec["tbps"] = rec["us"] and nbytes / rec["us"] / 1e6
                add(rec)
        if not args.probes:
            continue
        count = len(prob.w4["u4_wgmma"])
        first = prob.w4["u4_wgmma"][0]
        x = bench.make_xs(1, k, 1, si)[0]
        for p in probes(k, n, g):
            if time.time() - t0 > args.budget_s:
                break
            rec = {"k": k, "n": n, "m": 1, "impl": p.name, "us": None, **dataclasses.asdict(p)}
            try:
                ws = _weights(p, k, n, count, jax.random.key(si))
                call = functools.partial(
                    _call_probe, s=first.plain_scales, z=first.plain_zeros, p=p, k=k, n=n, g=g
                )
                _, rec["us"], _ = bench.check_and_time(call, [x], ws, None)
                rec["tbps"] = nbytes / rec["us"] / 1e6
            except Exception as e:  # one variant failing must not end the run
                rec["error"] = f"{type(e).__name__}: {e}"[:300]
            add(rec)
        del prob
    (out / "probe.json").write_text(json.dumps(records, indent=1))
    print("\n| shape | variant | us | TB/s |\n|---|---|---|---|")
    for r in records:
        us = "-" if r["us"] is None else f"{r['us']:.2f}"
        tb = "-" if not r.get("tbps") else f"{r['tbps']:.2f}"
        print(f"| {r['k']}x{r['n']} | {r['impl']} (M={r['m']}) | {us} | {tb} |")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
