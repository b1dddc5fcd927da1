"""In-model A/B of the decode-attention kernel's in-kernel merge of its splits (run 93,
docs/kernels.md "The attention combine inside the kernel"): batch-1 generate of the
8B-shaped model, int4 and bf16, with today's kernel (``merged``: the last split to
arrive merges them) and with the two kernels before it (``combine``: the attention
kernel, then a combine kernel per layer), greedy tokens compared with the first
variant's. The older module is the file given as the second argument, e.g. the commit
before run 93's (`git show 6f92e5e:pallas_kernels/attention.py`); its function is put in
the model's place, the counter passed through untouched. On the device:

    git show 6f92e5e:pallas_kernels/attention.py > .ab/attention_run92.py
    PYTHONPATH=$PWD python3 docs/benchmarks/decode-ab/ab_combine.py \\
        merged,combine,merged .ab/attention_run92.py          # carry .ab
"""

import importlib.util
import os
import sys
from pathlib import Path

from awq_jax import bench_generate as bg
from awq_jax import model

spec = importlib.util.spec_from_file_location("attention_old", sys.argv[2])
old = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (its dataclasses)
spec.loader.exec_module(old)
NEW = model.decode_attention_update_qkv


def two_kernels(*args, counter, **kwargs):
    return (*old.decode_attention_update_qkv(*args, **kwargs), counter)


def apply(name):  # read at trace time: ab_decode clears the jit caches
    model.decode_attention_update_qkv = NEW if name == "merged" else two_kernels


out = Path(os.environ.get("OUT", "/tmp"), "ab_combine.json")
bg.ab_decode_int4_bf16(bg.LLAMA3_8B, sys.argv[1].split(","), apply, out)
