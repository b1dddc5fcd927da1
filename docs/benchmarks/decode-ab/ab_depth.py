"""In-model A/B of the decode kernel's pipeline depth (runs 72-73; docs/kernels.md):
dispatch with `tuning.IN_FLIGHT_BYTES` (the in-flight cap) against without it (the
one-wave depths of before); batch-1 generate of the 8B-shaped int4 model, greedy
tokens compared with the first variant's. On the device:

    PYTHONPATH=$PWD python3 docs/benchmarks/decode-ab/ab_depth.py nocap,cap,nocap,cap
"""

import json
import os
import sys

from awq_jax import bench_generate as bg
from pallas_kernels import tuning

config = bg.LLAMA3_8B
int4 = bg.random_int4(config, bg.random_params(config))
V = {"cap": tuning.IN_FLIGHT_BYTES, "nocap": None}


def apply(name):
    tuning.IN_FLIGHT_BYTES = V[name]


recs = bg.ab_decode(config, int4, sys.argv[1].split(","), apply)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "ab_depth.json"), "w") as f:
    json.dump(recs, f, indent=1)
