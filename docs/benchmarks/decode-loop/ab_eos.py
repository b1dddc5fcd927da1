"""In-model A/B of the decode loop's stop condition (docs/kernels.md, "The decode loop's host
round trip"): batch-1 generate of the 8B-shaped model, int4 and bf16, with no EOS ids
(``none``: a static trip count, the host never asked) and with an EOS id that never comes
(``never``: the loop's condition reads a flag back to the host after every token, as every
loop did before run 98), greedy tokens compared with the first variant's.

    PYTHONPATH=$PWD python3 docs/benchmarks/decode-loop/ab_eos.py never,none,never
"""

import functools
import json
import os
import sys

from awq_jax import bench_generate as bg
from awq_jax.generate import generate_tokens
from awq_jax.inference import prepare_for_inference

config = bg.LLAMA3_8B
EOS = {"none": (), "never": (config.vocab_size + 7,)}


def apply(name):  # read at trace time: ab_decode clears the jit caches
    bg.generate_tokens = functools.partial(generate_tokens, eos_ids=EOS[name])


names = sys.argv[1].split(",")
params = bg.random_params(config)
recs = {"int4": bg.ab_decode(config, bg.random_int4(config, params), names, apply)}
recs["bf16"] = bg.ab_decode(config, prepare_for_inference(params), names, apply)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "ab_eos.json"), "w") as f:
    json.dump(recs, f, indent=1)
print("\nweights  variant  tok/s  generate ms")
for w, rs in recs.items():
    for r in rs:
        print(f"{w:>5} {r['variant']:>5} {r['decode_tok_s']:7.1f} {1e3 * r['generate_s']:8.1f}")
