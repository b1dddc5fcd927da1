"""In-model A/B of how the decode kernel splits K on the N = 4096 / 6144 layers (run 105;
docs/kernels.md): dispatch gives qkv (4096x6144), o_proj (4096x4096) and down_proj
(14336x4096) 4 CTAs along K at M <= 16, whose f32 partials the next kernel adds (decode
attention for qkv, add + RMSNorm for the others, ~0.25 us a partial). Run 46 chose 4 on
the kernels alone; here each variant overrides one layer's split (the pipeline depth
recomputed under the in-flight cap) in batch-1 generate of the 8B-shaped int4 model,
greedy tokens compared with the first variant's. ``qkvd3`` and ``gud3`` keep the
split and run qkv and gate_up (2 deep under the cap) 3 deep. On an H100:

    PYTHONPATH=$PWD python3 docs/benchmarks/decode-ab/ab_split.py \\
        dispatch,qkv2,qkv8,o2,o8,down2,down8,cap7,dispatch                 # run 105
    PYTHONPATH=$PWD python3 docs/benchmarks/decode-ab/ab_split.py dispatch,qkvd3,gud3
"""

import dataclasses
import json
import os
import sys

from awq_jax import bench_generate as bg
from pallas_kernels import tuning

config = bg.LLAMA3_8B
int4 = bg.random_int4(config, bg.random_params(config))
QKV, O, DOWN, GATE_UP = (4096, 6144), (4096, 4096), (14336, 4096), (4096, 28672)
MIB, CAP, original = 1 << 20, tuning.IN_FLIGHT_BYTES, tuning.mosaic_config
V = {  # name: ({(K, N): (split_k, depth or None: the cap's)}, in-flight cap)
    "dispatch": ({}, CAP),
    "qkv2": ({QKV: (2, None)}, CAP),
    "qkv8": ({QKV: (8, None)}, CAP),
    "o2": ({O: (2, None)}, CAP),
    "o8": ({O: (8, None)}, CAP),
    "down2": ({DOWN: (2, None)}, CAP),
    "down8": ({DOWN: (8, None)}, CAP),
    "cap7": ({}, 7 * MIB),
    "qkvd3": ({QKV: (4, 3)}, CAP),
    "gud3": ({GATE_UP: (1, 3)}, CAP),
}
splits: dict = {}


def mosaic_config(device_kind, m, k, n, group_size):
    cfg = original(device_kind, m, k, n, group_size)
    s, depth = splits.get((k, n), (None, None))
    if m > 16 or s is None:
        return cfg
    cfg = dataclasses.replace(cfg, split_k=s, max_concurrent_steps=depth or 4)
    if depth is None:
        depth = tuning._in_flight_depth(n // cfg.block_n * s, m, group_size, cfg)
    return dataclasses.replace(cfg, max_concurrent_steps=depth)


def apply(name):
    global splits
    splits, tuning.IN_FLIGHT_BYTES = V[name]


tuning.mosaic_config = mosaic_config
recs = bg.ab_decode(config, int4, sys.argv[1].split(","), apply)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "ab_split.json"), "w") as f:
    json.dump(recs, f, indent=1)
