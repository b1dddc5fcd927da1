"""In-model A/B of the H200's decode choices (`tuning.DECODE["H200"]`; docs/kernels.md,
"The H200 (runs 74-77)"): batch-1 generate of the 8B-shaped int4 model, greedy tokens
compared with the first variant's. Each variant is a `tuning.DecodeChoices` put in place
of the running part's entry (the H200's; the H100's on an H100), and, for `nocap`,
`cap6` and `cap12`, no in-flight cap or one of 6 or 12 MiB instead of 9. On the device:

    PYTHONPATH=$PWD python3 docs/benchmarks/decode-ab/ab_h200.py h100,dispatch,pf12,bk256

Run 92 (an H100, code of commit a717f3c) ran ``dispatch,h200,bk256,pf12,dispatch`` when
the H100's entry was what ``h100pf12`` names now (`run92-h100.json`); its winner,
``bk256``, is the H100's entry since (``h100``).

Run 76 was this script's first form (commit cbb675d, whose dispatch had the H100's
choices on every part), with its own variant names; here `h100,bk256,pf12,pf24` are its
`dispatch` (440.3 tok/s), `pf0` (no prefetch, 450.2), `bk512` (512-row steps, 454.9) and
`bk512+pf24` (440.1). Its `pf24` (256-row steps and a 24 MB prefetch, 429.5) and `nocap`
(the H100's choices without the in-flight cap, 445.5) have no name here.
"""

import json
import os
import sys

import jax

from awq_jax import bench_generate as bg
from pallas_kernels import tuning

config = bg.LLAMA3_8B
int4 = bg.random_int4(config, bg.random_params(config))
MIB, CAP, H200 = 1 << 20, tuning.IN_FLIGHT_BYTES, tuning.DECODE["H200"]
# The entry of the part this runs on (the H200's, or the H100's on an H100).
PART = next((p for p in tuning.DECODE if p in jax.devices()[0].device_kind), "H100")
D = tuning.DecodeChoices
V = {  # name: (this part's decode choices, in-flight cap)
    "dispatch": (tuning.DECODE[PART], CAP),
    "h200": (H200, CAP),
    "h100": (tuning.DECODE["H100"], CAP),
    "h100pf12": (D(prefetch_bytes=12 * MIB, large_block_k=256), CAP),  # the H100's to run 91
    "pf12": (D(prefetch_bytes=12 * MIB, large_block_k=512), CAP),
    "pf24": (D(prefetch_bytes=24 * MIB, large_block_k=512), CAP),
    "bk256": (D(prefetch_bytes=0, large_block_k=256), CAP),
    "nocap": (tuning.DECODE[PART], None),
    "cap6": (tuning.DECODE[PART], 6 * MIB),
    "cap12": (tuning.DECODE[PART], 12 * MIB),
}


def apply(name):
    tuning.DECODE[PART], tuning.IN_FLIGHT_BYTES = V[name]


recs = bg.ab_decode(config, int4, sys.argv[1].split(","), apply)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "ab_h200.json"), "w") as f:
    json.dump(recs, f, indent=1)
