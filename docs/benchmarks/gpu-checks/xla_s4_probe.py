"""Why `test_leading_dims_jit_and_pytree` failed on the H200 (run 80, rel_err 0.50; on the
CPU 0.0023): the XLA path on an `s4` weight of groups of 64 (docs/kernels.md, "The
H200"). Per format, prints the relative error of `int4_matmul(..., implementation="xla")`
under jit, of the jitted reference on the flattened x, and the largest error of
`dequantize` alone against the float64 weight. On the device:

    PYTHONPATH=$PWD python3 docs/benchmarks/gpu-checks/xla_s4_probe.py
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from test_kernels import random_weight, rel_err

from pallas_kernels import int4_matmul
from pallas_kernels.reference import dequantize, int4_matmul_reference

print(jax.devices()[0].device_kind)
for fmt in ("s4", "u4_split", None):
    for m in (1, 3, 6, 17):
        rng = np.random.default_rng(5)
        w, w_kn = random_weight(rng, 256, 64, 64, fmt=fmt)
        x = jnp.asarray(rng.standard_normal((m, 256)), jnp.bfloat16)
        truth = np.asarray(x, np.float64) @ w_kn
        api = jax.jit(lambda x, w: int4_matmul(x, w, implementation="xla"))(x, w)
        ref = jax.jit(int4_matmul_reference)(x, w)
        deq = np.abs(np.asarray(dequantize(w), np.float64).T - w_kn).max()
        print(
            f"{w.fmt:>8} M={m:>2}: api {rel_err(api, truth):.2e}  "
            f"reference {rel_err(ref, truth):.2e}  dequantize max err {deq:.1e}",
            flush=True,
        )
