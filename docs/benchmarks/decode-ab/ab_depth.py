"""In-model A/B of the decode kernel's pipeline depth (runs 72-74; docs/kernels.md):
dispatch with `tuning.IN_FLIGHT_BYTES` (the in-flight cap) against without it (the
one-wave depths of before); batch-1 generate of the 8B-shaped int4 model, greedy
tokens compared with the first variant's. On the device:

    PYTHONPATH=$PWD python3 docs/benchmarks/decode-ab/ab_depth.py nocap,cap,nocap,cap
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from awq_jax import bench_generate as bg
from awq_jax.generate import generate_tokens
from pallas_kernels import tuning

config = bg.LLAMA3_8B
int4 = bg.random_int4(config, bg.random_params(config))
V = {"cap": tuning.IN_FLIGHT_BYTES, "nocap": None}
tokens = jax.random.randint(jax.random.key(1), (1, 128), 0, config.vocab_size)
valid = jnp.ones((1, 128), bool)
ref = None
recs = []
for name in sys.argv[1].split(","):
    tuning.IN_FLIGHT_BYTES = V[name]
    jax.clear_caches()  # the configs are read at trace time
    toks = np.asarray(
        generate_tokens(config, int4, tokens, valid, jax.random.key(2), max_new_tokens=48)
    )
    ref = toks if ref is None else ref
    r = bg.bench_generate_one(config, int4, batch=1, prompt_len=128, new_tokens=256, repeats=5)
    recs.append({"variant": name, "same": int((toks == ref).sum()), **r})
    print(f"{name:>8}: {r['decode_tok_s']:.1f} tok/s same {(toks == ref).sum()}/48", flush=True)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "ab_depth.json"), "w") as f:
    json.dump(recs, f, indent=1)
