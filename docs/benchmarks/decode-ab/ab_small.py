"""In-model A/B of the decode step's small Triton kernels (run 68; docs/kernels.md): warps
of add + RMSNorm and of decode attention, attention pipeline stages and splits; batch-1
generate of the 8B-shaped int4 model (a second argument picks the weights: ``int4``,
``bf16`` or ``int4,bf16``),
greedy tokens compared with the first variant's. On the device:

    PYTHONPATH=$PWD python3 docs/benchmarks/decode-ab/ab_small.py \\
        dispatch,norm4,norm16,att8,att2st,norm4+att8,dispatch

Run 104 added ``norm32`` (then 32 warps became dispatch's at 4096 wide; dispatch was 8):
``dispatch,norm16,dispatch,norm16,norm4`` and ``norm16,norm32,norm16,norm32,dispatch``.
``att2w``, ``att6s``, ``att8s``, ``att12s`` (2 warps; 6, 8, 12 splits of batch 1's keys
instead of 4: shorter splits spread the cache's loads over more SMs, run 104's reading of
the norm): run 105, which made 6 splits dispatch's at S = 384 (64-key steps up to 8
splits). Then ``att1st`` (one pipeline stage: a split of one step has nothing to
pipeline) and ``att12s32`` (12 splits of one 32-key step).
"""

import dataclasses
import os
import sys
from pathlib import Path

from awq_jax import bench_generate as bg
from pallas_kernels import attention, norm

config = bg.LLAMA3_8B
onw, adc = norm._num_warps, attention.default_config


def att(**ch):
    return lambda *a: dataclasses.replace(adc(*a), **ch)


V = {
    "dispatch": (onw, adc),
    "norm4": (lambda b: 4, adc),
    "norm8": (lambda b: 8, adc),
    "norm16": (lambda b: 16, adc),
    "norm32": (lambda b: 32, adc),
    "att8": (onw, att(num_warps=8)),
    "att2w": (onw, att(num_warps=2)),
    "att2st": (onw, att(num_stages=2)),
    "att6s": (onw, att(splits=6)),
    "att8s": (onw, att(splits=8)),
    "att12s": (onw, att(splits=12)),
    "att1st": (onw, att(num_stages=1)),
    "att12s32": (onw, att(splits=12, block_s=32)),
    "norm4+att8": (lambda b: 4, att(num_warps=8)),
}


def apply(name):
    norm._num_warps, attention.default_config = V[name]


names = sys.argv[1].split(",")
weights = tuple(sys.argv[2].split(",")) if sys.argv[2:] else ("int4",)
out = Path(os.environ.get("OUT", "/tmp")) / f"ab_small-{'-'.join(weights)}.json"
bg.ab_decode_int4_bf16(config, names, apply, out, weights)
