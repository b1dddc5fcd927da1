"""GPU probe: the add + RMSNorm folded into the split-K matmul that feeds it.

    python -m pallas_kernels.fold_probe --out OUT

At batch-1 decode every o_proj and down_proj is followed by an add + RMSNorm kernel
(64 a token, ~2.9 us each on the H100: docs/benchmarks/decode-profile-h100.md) that sums
the matmul's split-K partials, adds the residual and normalizes the row for qkv or
gate_up. The fold (`int4_matmul_mosaic(..., fold=...)`, `pallas_mosaic_gpu._fold_norm_tail`)
does the tile-local part of that work in the matmul itself: the last warp to finish each
64-column tile sums the tile's partials, adds the residual, and writes the new residual
``s``, ``x' = w * s`` and the tile's sum of squares; the consumer would scale its f32
result by ``rsqrt(sum of the tiles' sums / D + eps)``, which is a row constant. The
question this answers before any of it is built into the model: does the tail cost
much less than the norm kernel it would replace? (Run 93's attention merge, the same
last-arriver pattern, saved only ~0.2 of the 1.8 us its combine kernel took.)

For o_proj 4096x4096 and down_proj 14336x4096 at dispatch's config, M = 1 and 8:

- checks: ``s`` and ``x'`` bitwise against the reference made from the kernel's own
  partials (`norm.sum_partials`, the residual add as the norm kernel rounds it), the
  tiles' sums of squares to 1e-5, the product to 1e-2 (as `bench`), the counters zero
  after the call;
- times with CUPTI, weights rotated past the L2 (as `pallas_kernels.bench`): ``today``
  (the kernel's partials, then `norm.add_rms_norm`), ``fold`` (the kernel with the tail),
  ``partials`` (the kernel alone: the tail's cost is ``fold - partials``).

Writes ``fold-probe-<device>.json`` and ``.md`` to ``--out``; prints the table last.
Run 94 (H100, docs/benchmarks/fold-probe/): every check passed and the fold saved nothing
(M = 1: 8.15 against 8.14 us on o_proj, 16.04 against 16.24 on down_proj; M = 8: 3-4 us
slower). Its tail costs what the norm kernel does.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import bench, norm, pallas_mosaic_gpu, tuning
from pallas_kernels.api import device_tag

SHAPES = ((4096, 4096), (14336, 4096))  # o_proj, down_proj
GROUP = 128
EPS = 1e-5
mm = pallas_mosaic_gpu.int4_matmul_mosaic


def _check(fold_out, res, nw, count, ref_y, bn: int) -> dict:
    """The fold's outputs against the reference built from its own partials."""
    parts, s, xp, ssq = fold_out
    s_ref = res.astype(jnp.float32) + norm.sum_partials(parts, res.dtype).astype(jnp.float32)
    s_ref = s_ref.astype(res.dtype)
    xp_ref = (nw.astype(jnp.float32) * s_ref.astype(jnp.float32)).astype(res.dtype)
    s64 = np.asarray(s_ref, np.float64)
    ssq_ref = (s64 * s64).reshape(s64.shape[0], -1, bn).sum(-1).T  # [tiles, M]
    return {
        "product_rel_err": bench.rel_err(parts.sum(0), ref_y),
        "s_exact": bool(np.array_equal(np.asarray(s), np.asarray(s_ref))),
        "x_exact": bool(np.array_equal(np.asarray(xp), np.asarray(xp_ref))),
        "ssq_rel_err": bench.rel_err(ssq, ssq_ref),
        "counters_zero": bool(np.all(np.asarray(count) == 0)),
    }


def records(device: str, ms: tuple[int, ...]) -> list[dict]:
    out = []
    for (k, n), m in [(s, m) for s in SHAPES for m in ms]:
        cfg = tuning.mosaic_config(device, m, k, n, GROUP)
        p = bench.make_problem(k, n, GROUP, seed=k + m, fmts=("u4_wgmma",))
        ws = p.w4["u4_wgmma"]
        xs = bench.make_xs(m, k, len(ws), seed=m)
        key = jax.random.key(k + m)
        res = jax.random.normal(key, (m, n), jnp.float32).astype(jnp.bfloat16)
        nw = (1 + 0.1 * jax.random.normal(key, (n,), jnp.float32)).astype(jnp.bfloat16)
        count = jnp.zeros((n // cfg.block_n,), jnp.int32)
        ref_y = xs[0].astype(jnp.float32) @ p.ref_w_nk.T

        def fold(x, w, cfg=cfg, res=res, nw=nw, count=count):
            return mm(x, w, config=cfg, fold=(res, nw, count))

        def today(x, w, cfg=cfg, res=res, nw=nw):
            return norm.add_rms_norm(res, mm(x, w, config=cfg, partial_sums=True), nw, EPS)

        def partials(x, w, cfg=cfg):
            return mm(x, w, config=cfg, partial_sums=True)

        rec = {"k": k, "n": n, "m": m, "split_k": cfg.split_k, "block_n": cfg.block_n}
        try:
            # The counters as an argument, not a closure (a jit constant would be a copy):
            # the kernel writes this buffer, and the check reads it back.
            first = jax.jit(lambda x, w, *f, cfg=cfg: mm(x, w, config=cfg, fold=f))
            got = first(xs[0], ws[0], res, nw, count)
            rec |= _check(got, res, nw, count, ref_y, cfg.block_n)
        except Exception as e:  # a probe: record the failure, time the others
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
        ok = "error" not in rec and rec["s_exact"] and rec["x_exact"] and rec["counters_zero"]
        ok = ok and rec["ssq_rel_err"] < 1e-5 and rec["product_rel_err"] < bench.MAX_REL_ERR
        rec["ok"] = bool(ok)
        for name, fn in (("today", today), ("fold", fold), ("partials", partials)):
            if name == "fold" and not ok:
                continue
            _, us, per_kernel = bench.check_and_time(fn, xs, ws, None)
            rec[f"{name}_us"], rec[f"{name}_kernels"] = us, per_kernel
        out.append(rec)
        print(json.dumps(rec), flush=True)
    return out


def markdown(recs: list[dict], device: str) -> str:
    lines = [f"# fold-probe ({device})", "", "    python -m pallas_kernels.fold_probe --out OUT"]
    lines += ["", "| K x N | M | S | checks | today (partials + norm), us | fold | partials |"]
    lines += ["|---|---:|---:|---|---:|---:|---:|"]
    for r in recs:
        us = lambda key, r=r: "-" if r.get(key) is None else f"{r[key]:.2f}"  # noqa: E731
        checks = "ok" if r["ok"] else r.get("error", "FAILED")
        lines.append(
            f"| {r['k']}x{r['n']} | {r['m']} | {r['split_k']} | {checks} | {us('today_us')} "
            f"| {us('fold_us')} | {us('partials_us')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the JSON and markdown")
    ap.add_argument("--ms", default="1,8", help="tokens per call, comma-separated")
    args = ap.parse_args(argv)
    device = jax.devices()[0].device_kind
    recs = records(device, tuple(int(v) for v in args.ms.split(",")))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"fold-probe-{device_tag()}"
    (out / f"{name}.json").write_text(json.dumps(recs, indent=1))
    text = markdown(recs, device)
    (out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
