"""In-model A/B of how often the decode loop hands control back to the host (docs/kernels.md,
"The decode loop's host round trip"): batch-1 generate of the 8B-shaped model, int4 and bf16,
with ``generate_tokens(steps_per_sync=n)`` for each variant ``s<n>`` (``s1``: the loop
condition, a device-to-host copy and a wait, read after every token, as before run 96),
greedy tokens compared with the first variant's. Run under different ``XLA_FLAGS`` (e.g.
command buffers for the while loop) in separate processes; the label names the flags.

    PYTHONPATH=$PWD python3 docs/benchmarks/decode-loop/ab_sync.py s1,s16,s1 default
"""

import functools
import json
import os
import sys

from awq_jax import bench_generate as bg
from awq_jax.generate import generate_tokens
from awq_jax.inference import prepare_for_inference


def apply(name):  # read at trace time: ab_decode clears the jit caches
    bg.generate_tokens = functools.partial(generate_tokens, steps_per_sync=int(name[1:]))


names, label = sys.argv[1].split(","), sys.argv[2]
weights = sys.argv[3].split(",") if len(sys.argv) > 3 else ["int4", "bf16"]
config = bg.LLAMA3_8B
params = bg.random_params(config)
recs = {}
if "int4" in weights:
    recs["int4"] = bg.ab_decode(config, bg.random_int4(config, params), names, apply)
if "bf16" in weights:
    recs["bf16"] = bg.ab_decode(config, prepare_for_inference(params), names, apply)
out = {"label": label, "xla_flags": os.environ.get("XLA_FLAGS", ""), "records": recs}
with open(os.path.join(os.environ.get("OUT", "/tmp"), f"ab_sync-{label}.json"), "w") as f:
    json.dump(out, f, indent=1)
print(f"\n[{label}] weights  variant  tok/s  us/token")
for w, rs in recs.items():
    for r in rs:
        print(f"{w:>5} {r['variant']:>5} {r['decode_tok_s']:7.1f} {1e3 * r['ms_per_token']:7.0f}")
