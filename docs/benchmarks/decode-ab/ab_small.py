"""In-model A/B of the decode step's small Triton kernels (run 68; docs/kernels.md): warps
of add + RMSNorm and of decode attention, attention pipeline stages; batch-1 generate of
the 8B-shaped int4 model, greedy tokens compared with the first variant's. On the device:

    PYTHONPATH=$PWD python3 docs/benchmarks/decode-ab/ab_small.py \\
        dispatch,norm4,norm16,att8,att2st,norm4+att8,dispatch

Run 104 added ``norm32`` (then 32 warps became dispatch's at 4096 wide; dispatch was 8):
``dispatch,norm16,dispatch,norm16,norm4`` and ``norm16,norm32,norm16,norm32,dispatch``.
"""

import dataclasses
import json
import os
import sys

from awq_jax import bench_generate as bg
from pallas_kernels import attention, norm

config = bg.LLAMA3_8B
int4 = bg.random_int4(config, bg.random_params(config))
onw, adc = norm._num_warps, attention.default_config


def att(**ch):
    return lambda *a: dataclasses.replace(adc(*a), **ch)


V = {
    "dispatch": (onw, adc),
    "norm4": (lambda b: 4, adc),
    "norm16": (lambda b: 16, adc),
    "norm32": (lambda b: 32, adc),
    "att8": (onw, att(num_warps=8)),
    "att2st": (onw, att(num_stages=2)),
    "norm4+att8": (lambda b: 4, att(num_warps=8)),
}


def apply(name):
    norm._num_warps, attention.default_config = V[name]


recs = bg.ab_decode(config, int4, sys.argv[1].split(","), apply)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "ab_small.json"), "w") as f:
    json.dump(recs, f, indent=1)
