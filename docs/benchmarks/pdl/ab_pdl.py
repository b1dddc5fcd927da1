"""In-model A/B of programmatic dependent launch (runs 66-67; docs/kernels.md): batch-1
decode of the 8B-shaped int4 model, greedy tokens checked against the first variant.
Needs the code of commit 765c5e4 (the experiment was removed in the next one). On the
device:

    XLA_FLAGS=--xla_gpu_enable_pdl=true PYTHONPATH=$PWD python3 docs/benchmarks/pdl/ab_pdl.py \\
        dispatch,pdl+trig,pdl,pdl+trig-noprefetch,dispatch,pdl+trig 1     # run 66
    ... dispatch,xring,wait,wait+trig,dispatch 1                              # run 67
"""

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from awq_jax import bench_generate as bg
from awq_jax.generate import generate_tokens
from awq_jax.inference import prepare_for_inference
from awq_jax.pipeline import rtn_quantize
from awq_jax.search import SearchSettings
from pallas_kernels import norm, pallas_mosaic_gpu, tuning

t0 = time.time()
orig = tuning.mosaic_config
config = bg.LLAMA3_8B
params = bg.random_params(config)
q = rtn_quantize(config, params, SearchSettings(group_size=128))
del params
int4 = prepare_for_inference(q, implementation=None)
del q
nopf = bg._replace_int4(int4, prefetch=None)
print(f"setup {time.time() - t0:.0f}s", flush=True)
V = {
    "dispatch": ({}, False, int4),
    "pdl": ({"pdl": True}, False, int4),
    "pdl+trig": ({"pdl": True}, True, int4),
    "pdl+trig-noprefetch": ({"pdl": True}, True, nopf),
    "noprefetch": ({}, False, nopf),
    "xring": ({"pdl": True}, False, int4, False, False),
    "wait": ({"pdl": True}, False, int4, True, False),
    "wait+trig": ({"pdl": True}, True, int4, True, False),
}
order = sys.argv[1].split(",")
batches = [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "1").split(",")]
tokens = jax.random.randint(jax.random.key(1), (1, 128), 0, config.vocab_size)
valid = jnp.ones((1, 128), bool)
ref = None
recs = []
for name in order:
    ch, trig, p, *wt = V[name]
    pallas_mosaic_gpu.PDL_WAIT, pallas_mosaic_gpu.PDL_TRIGGER = wt or (True, True)
    tuning.mosaic_config = lambda *a, c=ch: dataclasses.replace(orig(*a), **c)
    norm.LAUNCH_DEPENDENTS = trig
    jax.clear_caches()
    t1 = time.time()
    toks = np.asarray(
        generate_tokens(config, p, tokens, valid, jax.random.key(2), max_new_tokens=48)
    )
    if ref is None:
        ref = toks
    same = int((toks == ref).sum())
    for b in batches:
        r = bg.bench_generate_one(config, p, batch=b, prompt_len=128, new_tokens=256, repeats=5)
        rec = {"variant": name, "batch": b, "same_tokens": same, "of": ref.size, **r}
        recs.append(rec)
        print(
            f"{name:>22} b{b}: {r['decode_tok_s']:.1f} tok/s  "
            f"{r['ms_per_token'] * 1e3:.0f} us/tok  "
            f"tokens same {same}/{ref.size}  ({time.time() - t1:.0f}s)",
            flush=True,
        )
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "ab_pdl.json"), "w") as f:
        json.dump(recs, f, indent=1)
