"""Why `test_leading_dims_jit_and_pytree` failed on the H200 (run 80, rel_err 0.50; on the
CPU 0.0023): the XLA path on an `s4` weight of groups of 64 (docs/kernels.md, "The
H200"). Times nothing. For `s4` and `u4_split` weights of the failing shape (K = 256,
N = 64, groups of 64) and a few token counts, prints the relative error against the
float64 product of:

* ``api``: `int4_matmul(..., implementation="xla")` under jit (what the test runs);
* ``ref``: the jitted reference;
* ``deq``: `dequantize` alone, jitted, then a dot of the materialized bf16 weight
  (a separate jit: XLA cannot fuse the two);
* ``barrier``: the reference's dequantization with an optimization barrier before the
  dot (one jit, no fusion of the int4 convert into the GEMM);
* ``int8``: the int4 codes widened to int8 before anything else (no sub-byte type in the
  fused graph);

and writes the optimized HLO of ``ref`` at the failing token count to
``$OUT/xla_s4_hlo.txt``, so the three suspects (the weight as stored, the
dequantization, XLA's fusion of int4 operands into its GEMM) separate. Run 82 (commit
4ca555f; `run82-83-h200.md`) pointed at the last; since then the reference itself puts the
barrier in on GPUs (`reference._unfused`), so ``api`` and ``ref`` equal ``barrier`` and
only ``int8`` still shows XLA's wrong product. On the device:

    PYTHONPATH=$PWD python3 docs/benchmarks/gpu-checks/xla_s4_probe.py
"""

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from test_kernels import random_weight, rel_err

from pallas_kernels import int4_matmul
from pallas_kernels.reference import dequantize, int4_matmul_reference


def barrier(x, w):
    w_nk = jax.lax.optimization_barrier(dequantize(w, x.dtype))
    return jnp.einsum("mk,nk->mn", x, w_nk, preferred_element_type=jnp.float32).astype(x.dtype)


def int8(x, w):
    if w.fmt != "s4":  # no sub-byte type to widen
        return int4_matmul_reference(x, w)
    q = w.q_packed.astype(jnp.int8).astype(jnp.float32) + 8.0  # s4 stores q - 8
    q = q.reshape(w.n, w.num_groups, w.group_size)
    z = w.zeros_gn.T.astype(jnp.float32)[:, :, None]
    s = w.scales_gn.T.astype(jnp.float32)[:, :, None]
    w_nk = ((q - z) * s).astype(x.dtype).reshape(w.n, w.k)
    return jnp.einsum("mk,nk->mn", x, w_nk, preferred_element_type=jnp.float32).astype(x.dtype)


deq = jax.jit(dequantize, static_argnums=1)
variants = {
    "api": jax.jit(lambda x, w: int4_matmul(x, w, implementation="xla")),
    "ref": jax.jit(int4_matmul_reference),
    "deq": jax.jit(lambda x, w_nk: jnp.einsum("mk,nk->mn", x, w_nk)),
    "barrier": jax.jit(barrier),
    "int8": jax.jit(int8),
}
print(jax.devices()[0].device_kind)
for fmt in ("s4", "u4_split"):
    for m in (1, 3, 6, 8, 17, 64):
        rng = np.random.default_rng(5)
        w, w_kn = random_weight(rng, 256, 64, 64, fmt=fmt)
        x = jnp.asarray(rng.standard_normal((m, 256)), jnp.bfloat16)
        truth = np.asarray(x, np.float64) @ w_kn
        errs = []
        for name, fn in variants.items():
            arg = deq(w, jnp.bfloat16) if name == "deq" else w
            errs.append(f"{name} {rel_err(fn(x, arg), truth):.1e}")
        print(f"{w.fmt:>8} M={m:>2}: " + "  ".join(errs), flush=True)
        if fmt == "s4" and m == 6:
            hlo = variants["ref"].lower(x, w).compile().as_text()
            out = Path(os.environ.get("OUT", "/tmp")) / "xla_s4_hlo.txt"
            out.write_text(hlo)
