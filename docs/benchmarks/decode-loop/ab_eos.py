"""In-model A/B of the decode loop's stop condition (docs/kernels.md, "The decode loop's host
round trip"): batch-1 generate of the 8B-shaped model, int4 and bf16, with no EOS ids
(``none``: a static trip count, the host never asked) and with an EOS id that never comes
(``never``: the loop's condition reads a flag back to the host after every token, as every
loop did before run 98), greedy tokens compared with the first variant's.

    PYTHONPATH=$PWD python3 docs/benchmarks/decode-loop/ab_eos.py never,none,never
"""

import functools
import os
import sys
from pathlib import Path

from awq_jax import bench_generate as bg
from awq_jax.generate import generate_tokens

config = bg.LLAMA3_8B
EOS = {"none": (), "never": (config.vocab_size + 7,)}


def apply(name):  # read at trace time: ab_decode clears the jit caches
    bg.generate_tokens = functools.partial(generate_tokens, eos_ids=EOS[name])


out = Path(os.environ.get("OUT", "/tmp"), "ab_eos.json")
bg.ab_decode_int4_bf16(config, sys.argv[1].split(","), apply, out)
