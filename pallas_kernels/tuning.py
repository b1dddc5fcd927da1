"""Which backend and which block sizes, per (device kind, M, K, N, group size).

Measured on the lent H100 with ``python -m pallas_kernels.bench``; the numbers that
justify each rule are in docs/kernels.md. Other GPUs get the same heuristic (it only
assumes ~100+ SMs); the CPU (and anything that is not a CUDA GPU) gets the reference.
"""

from __future__ import annotations

from pallas_kernels import pallas_mosaic_gpu, pallas_triton

# Programs we want in flight for a memory-bound launch: a few per SM of an H100.
_TARGET_PROGRAMS = 4 * 132


def _is_gpu(device_kind: str) -> bool:
    return device_kind.startswith("NVIDIA")


def _is_hopper(device_kind: str) -> bool:
    return any(t in device_kind for t in ("H100", "H200", "H800", "H20", "GH200"))


def choose_implementation(device_kind: str, m: int, k: int, n: int, group_size: int) -> str:
    """The backend name dispatch runs for this shape."""
    del k, n, group_size
    if not _is_gpu(device_kind):
        return "xla"
    if m > 256:
        return "xla"
    return "triton"


def triton_config(
    device_kind: str, m: int, k: int, n: int, group_size: int
) -> pallas_triton.Config:
    """Split-K heuristic: enough programs for every SM, K rows per program a power of 2."""
    del device_kind
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 128 if n % 128 == 0 else 64
    m_blocks = -(-m // block_m)
    split_k = 1
    while (
        (n // block_n) * split_k * m_blocks < _TARGET_PROGRAMS
        and k % (2 * split_k) == 0
        and (k // (2 * split_k)) % max(group_size, 256) == 0
    ):
        split_k *= 2
    while k // split_k > 4096 and k % (2 * split_k) == 0:
        split_k *= 2
    return pallas_triton.Config(
        block_m=block_m, block_n=block_n, split_k=split_k, num_warps=4, num_stages=3
    )


def mosaic_config(
    device_kind: str, m: int, k: int, n: int, group_size: int
) -> pallas_mosaic_gpu.Config:
    del device_kind, m, k, n, group_size
    return pallas_mosaic_gpu.Config()
