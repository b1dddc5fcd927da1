"""In-model A/B of the decode kernel's pipeline depth (after runs 72-73; docs/kernels.md):
dispatch with `tuning.IN_FLIGHT_BYTES` (the in-flight cap, 9 MiB) against without it
(the one-wave depths of before) and other caps, and the cap with other sizes of the L2
prefetch of the next weight (`tuning.DECODE["H100"].prefetch_bytes`, 12 MiB); batch-1
generate of the 8B-shaped int4 model, greedy tokens compared with the first variant's. On
an H100:

    PYTHONPATH=$PWD python3 docs/benchmarks/decode-ab/ab_depth.py nocap,cap,nocap,cap
    PYTHONPATH=$PWD python3 docs/benchmarks/decode-ab/ab_depth.py cap,cap6,cap12,pf0,pf6,pf24
"""

import json
import os
import sys

from awq_jax import bench_generate as bg
from pallas_kernels import tuning

config = bg.LLAMA3_8B
int4 = bg.random_int4(config, bg.random_params(config))
MIB, CAP, PF = 1 << 20, tuning.IN_FLIGHT_BYTES, tuning.DECODE["H100"].prefetch_bytes
V = {  # name: (in-flight cap, prefetch bytes)
    "cap": (CAP, PF),
    "nocap": (None, PF),
    "cap6": (6 * MIB, PF),
    "cap12": (12 * MIB, PF),
    "pf0": (CAP, 0),
    "pf6": (CAP, 6 * MIB),
    "pf24": (CAP, 24 * MIB),
}


def apply(name):
    cap, pf = V[name]
    tuning.IN_FLIGHT_BYTES, tuning.DECODE["H100"] = cap, tuning.DecodeChoices(prefetch_bytes=pf)


recs = bg.ab_decode(config, int4, sys.argv[1].split(","), apply)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "ab_depth.json"), "w") as f:
    json.dump(recs, f, indent=1)
