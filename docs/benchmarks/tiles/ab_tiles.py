"""A/B of the u4_wgmma weight's order: ``[N, K / 8]`` rows against contiguous 128 x 256
tiles (``[N / 128, K / 256, 128, 32]``, layout.py; docs/kernels.md "Contiguous weight
tiles (run 101)"). The same codes in both orders; outputs compared bitwise.

    PYTHONPATH=$PWD python3 docs/benchmarks/tiles/ab_tiles.py kernels    # ~2 min on an H100
    PYTHONPATH=$PWD python3 docs/benchmarks/tiles/ab_tiles.py model tiles,rows,tiles,rows

``kernels``: the 8B layer shapes at M = 1 and 16 as the decode step calls them (qkv,
o_proj and down_proj with ``partial_sums``, gate_up with the SwiGLU epilogue) and at
M = 128 and 2048 (the warp-specialized kernel), CUPTI, weights rotated past the L2.
``model``: batch-1 generate of the 8B-shaped int4 model (prompt 128, 256 new tokens,
median of 5) with each order in turn, greedy tokens compared with the first variant's.
Writes ``$OUT/ab_tiles_{kernels,model}.json`` and prints a table. ``kernels ORDERS MS``
times one order alone (``kernels tiles 1,16``), e.g. main's code against a branch's in
two processes (``PYTHONPATH=$PWD/ab_main:$PWD``, ``AB_TAG=-main`` names the JSON file),
with each output's SHA-1 to compare them bitwise.
"""

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import api, bench
from pallas_kernels.layout import Int4Weight, untile_wgmma

OUT = Path(os.environ.get("OUT", "/tmp"))
SHAPES = {
    "qkv": (4096, 6144),
    "o_proj": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
}


def rows(w: Int4Weight) -> Int4Weight:
    """The same weight in the ``[N, K / 8]`` rows order."""
    if not w.tile_n:
        return w
    return dataclasses.replace(
        w,
        q_packed=untile_wgmma(w.q_packed),
        scales_gn=w.plain_scales,
        zeros_gn=w.plain_zeros,
        tile_n=0,
    )


def model_call(name: str, m: int):
    if m > 16:
        return lambda x, w: api.int4_matmul(x, w)
    if name == "gate_up":
        return lambda x, w: api.int4_matmul(x, w, epilogue="swiglu")
    return lambda x, w: api.int4_matmul(x, w, partial_sums=True)


def kernels(order_names=("rows", "tiles"), ms=(1, 16, 128, 2048)) -> None:
    recs = []
    for si, (name, (k, n)) in enumerate(SHAPES.items()):
        prob = bench.make_problem(k, n, 128, seed=si, fmts=("u4_wgmma",))
        tiles = prob.w4["u4_wgmma"]
        assert tiles[0].tile_n == 128, tiles[0].tile_n
        orders = {"tiles": tiles} if order_names == ("tiles",) else {}
        if not orders:
            orders = {"rows": [rows(w) for w in tiles], "tiles": tiles}
        for m in ms:
            xs = bench.make_xs(m, k, 4, si)
            ref = jnp.dot(xs[0].astype(jnp.float32), prob.ref_w_nk.T, precision="highest")
            outs = {}
            for order, ws in orders.items():
                plain = jax.jit(lambda x, w: api.int4_matmul(x, w))(xs[0], ws[0])
                err = bench.rel_err(plain, ref)
                outs[order] = np.asarray(jax.jit(model_call(name, m))(xs[0], ws[0]))
                _, us, _ = bench.check_and_time(model_call(name, m), xs, ws, None)
                rec = {"layer": name, "k": k, "n": n, "m": m, "order": order, "us": us}
                rec["rel_err"] = err
                # compares outputs across processes (main's code against a branch's)
                rec["sha1"] = hashlib.sha1(outs[order].tobytes()).hexdigest()[:12]
                recs.append(rec)
                print(f"{name} {k}x{n} M={m} {order}: {us:.2f} us, rel_err {err:.2e}", flush=True)
            if len(outs) == 2:
                same = bool(np.array_equal(outs["rows"], outs["tiles"]))
                recs[-1]["same_as_rows"] = recs[-2]["same_as_rows"] = same
                print(f"  tiles == rows bitwise: {same}", flush=True)
        del prob, tiles, orders
    tag = os.environ.get("AB_TAG", "")
    (OUT / f"ab_tiles_kernels{tag}.json").write_text(json.dumps(recs, indent=1))
    if len(order_names) == 1:
        print(f"\n| layer | K x N | M | {order_names[0]} us | output sha1 |")
        print("|---|---|---:|---:|---|")
        for a in recs:
            print(f"| {a['layer']} | {a['k']}x{a['n']} | {a['m']} | {a['us']:.2f} | {a['sha1']} |")
        return
    print("\n| layer | K x N | M | rows us | tiles us | tiles / rows | bitwise |")
    print("|---|---|---:|---:|---:|---:|---|")
    for a, b in zip(recs[::2], recs[1::2], strict=True):
        print(
            f"| {a['layer']} | {a['k']}x{a['n']} | {a['m']} | {a['us']:.2f} | {b['us']:.2f} | "
            f"{b['us'] / a['us']:.3f} | {a['same_as_rows']} |"
        )


def model(names: list[str]) -> None:
    from awq_jax import bench_generate as bg
    from awq_jax.generate import generate_tokens

    config = bg.LLAMA3_8B
    tiled = bg.random_int4(config, bg.random_params(config))
    untiled = jax.tree.map(
        lambda w: rows(w) if isinstance(w, Int4Weight) else w,
        tiled,
        is_leaf=lambda x: isinstance(x, Int4Weight),
    )
    variants = {"tiles": tiled, "rows": untiled}
    tokens = jax.random.randint(jax.random.key(1), (1, 128), 0, config.vocab_size)
    valid = jnp.ones((1, 128), bool)
    ref, recs, t0 = None, [], time.time()
    for name in names:
        if time.time() - t0 > 420:
            print(f"time budget spent: {name} not run", flush=True)
            break
        params = variants[name]
        jax.clear_caches()
        toks = np.asarray(
            generate_tokens(config, params, tokens, valid, jax.random.key(2), max_new_tokens=48)
        )
        ref = toks if ref is None else ref
        same = int((toks == ref).sum())
        r = bg.bench_generate_one(
            config, params, batch=1, prompt_len=128, new_tokens=256, repeats=5
        )
        recs.append({"variant": name, "same": same, **r})
        print(f"{name:>6}: {r['decode_tok_s']:.1f} tok/s, {same}/48 tokens same", flush=True)
    (OUT / "ab_tiles_model.json").write_text(json.dumps(recs, indent=1))
    print("\n| order | decode tok/s | generate ms | tokens same |\n|---|---:|---:|---:|")
    for r in recs:
        print(
            f"| {r['variant']} | {r['decode_tok_s']:.1f} | {1e3 * r['generate_s']:.1f} "
            f"| {r['same']}/48 |"
        )


if __name__ == "__main__":
    if sys.argv[1] == "kernels":
        # kernels [ORDERS [MS]]: e.g. "kernels tiles 1,16"
        names = tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else ("rows", "tiles")
        ms = (
            tuple(int(v) for v in sys.argv[3].split(","))
            if len(sys.argv) > 3
            else (1, 16, 128, 2048)
        )
        kernels(names, ms)
    else:
        model(sys.argv[2].split(","))
