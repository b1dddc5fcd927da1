"""What the decode kernel's dequantization ALU costs, as upper bounds (docs/kernels.md,
run 91): the Mosaic decode kernel with its per-pair ``SHR, LOP3, SUB`` (dispatch), without
the SUB of the zero point (``nosub``: what moving the zero point out of the
dequantization, e.g. ``acc_g - (magic + z) * sum_k x`` with the group sums of x made by the
kernel that writes x, could at most save), and with no dequantization at all (``raw``:
the words go to the tensor cores as they are). The last two compute WRONG products: they
time, they do not check.

1. The kernel alone at M = 1 on the four Llama-3-8B layer shapes (dispatch's config,
   CUPTI, weight sets rotated past the L2, as `pallas_kernels.bench`).
2. In the model: batch-1 generate of the 8B-shaped int4 model (prompt 128, 256 new
   tokens, median of 5; `bench_generate.ab_decode`), dispatch first and last.

On the device:

    PYTHONPATH=$PWD python3 docs/benchmarks/decode-ab/ab_alu.py dispatch,nosub,raw,dispatch
"""

import functools
import json
import os
import sys

import jax

from awq_jax import bench_generate as bg
from pallas_kernels import api, bench, pallas_mosaic_gpu

ORIGINAL = pallas_mosaic_gpu._dequant_wgmma
SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # qkv, o, gate_up, down


def apply(name):  # read at trace time: the caller clears the jit caches
    ops = "full" if name == "dispatch" else name
    pallas_mosaic_gpu._dequant_wgmma = functools.partial(ORIGINAL, ops=ops)


names = sys.argv[1].split(",")
out = os.environ.get("OUT", "/tmp")
kernel_recs = []
for k, n in SHAPES:
    p = bench.make_problem(k, n, 128, seed=0, fmts=("u4_wgmma",))
    xs = bench.make_xs(1, k, 4, seed=1)
    for name in dict.fromkeys(names):
        apply(name)
        jax.clear_caches()
        _, us, _ = bench.check_and_time(
            lambda x, w: api.int4_matmul(x, w), xs, p.w4["u4_wgmma"], None
        )
        kernel_recs.append({"k": k, "n": n, "m": 1, "variant": name, "us": us})
        print(f"{k}x{n} {name:>8}: {us:.2f} us", flush=True)
    del p
with open(os.path.join(out, "ab_alu_kernel.json"), "w") as f:
    json.dump(kernel_recs, f, indent=1)

config = bg.LLAMA3_8B
int4 = bg.random_int4(config, bg.random_params(config))
model_recs = bg.ab_decode(config, int4, names, apply)
with open(os.path.join(out, "ab_alu.json"), "w") as f:
    json.dump({"kernel": kernel_recs, "model": model_recs}, f, indent=1)
print("\nvariant   tok/s   us/token")
for r in model_recs:
    print(f"{r['variant']:>8} {r['decode_tok_s']:7.1f} {1e6 / r['decode_tok_s']:8.0f}")
