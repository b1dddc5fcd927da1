"""Group-wise integer quantization of ``[in, out]`` weights, as AutoAWQ and llm-awq do it.

AWQ_SPEC.md section 5. Groups are runs of ``group_size`` rows along the input dimension
(the first axis here: weights are stored ``[in, out]`` like a Flax ``Dense`` kernel and the
AutoAWQ GEMM format)::

    max_int = 2**bits - 1
    scale   = max(max - min, 1e-5) / max_int
    zero    = clip(-round(min / scale), 0, max_int)
    q       = clip(round(w / scale) + zero, 0, max_int)
    w_hat   = (q - zero) * scale

Symmetric quantization (``zero_point=False``) uses ``scale = absmax / (2**(bits-1) - 1)`` and
codes in ``[-2**(bits-1), 2**(bits-1) - 1]``. It is stored in the same unsigned form with a
constant zero point ``2**(bits-1)``, so every consumer (the kernels, the checkpoint writer)
handles one representation: ``w_hat = (q - zero) * scale``.

Rounding is round-half-to-even (``jnp.round``, like ``torch.round``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = [
    "QuantizedTensor",
    "check_bits",
    "fake_quantize",
    "group_size_hint",
    "quantize",
    "resolve_group_size",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A weight ``W[in, out] ≈ (q - zeros) * scales``, scale and zero per (group, column).

    Attributes:
      q: ``uint8 [K, N]`` integer codes in ``[0, 2**bits)``.
      scales: ``[K // group_size, N]`` float.
      zeros: ``uint8 [K // group_size, N]`` integer zero points.
      bits: bits per code (static).
      group_size: rows per group along ``K``; always a divisor of ``K`` (static).
    """

    q: jax.Array
    scales: jax.Array
    zeros: jax.Array
    bits: int = dataclasses.field(metadata={"static": True})
    group_size: int = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """``(q - zeros) * scales`` in float32, cast to ``dtype``.

        Leading axes (e.g. the stacked layer axis) are carried through.
        """
        *lead, k, n = self.q.shape
        g = self.group_size
        q_gsn = self.q.reshape(*lead, k // g, g, n).astype(jnp.float32)
        z_g1n = self.zeros.astype(jnp.float32)[..., None, :]
        s_g1n = self.scales.astype(jnp.float32)[..., None, :]
        return ((q_gsn - z_g1n) * s_g1n).reshape(*lead, k, n).astype(dtype)


def group_size_hint(*in_features: int) -> str:
    """The usual group sizes (16-256) that divide every one of ``in_features``, for messages."""
    fits = [g for g in (32, 64, 128, 16, 256) if all(k % g == 0 for k in in_features)]
    return f"{' or '.join(map(str, fits[:3]))} or -1 (per channel)" if fits else "-1 (per channel)"


def resolve_group_size(group_size: int, in_features: int) -> int:
    """``-1`` means one group per column (per-channel); otherwise it must divide ``in_features``."""
    if group_size == -1:
        return in_features
    if group_size <= 0:
        raise ValueError(f"group size must be positive or -1 (per channel), got {group_size}")
    if in_features % group_size:
        raise ValueError(
            f"group size {group_size} does not divide the input dimension {in_features}; "
            f"choose {group_size_hint(in_features)}"
        )
    return group_size


def check_bits(bits: int) -> None:
    """ValueError unless 2 <= bits <= 8."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")


def _scales_and_zeros(w_gsn: jax.Array, bits: int, zero_point: bool, scale_dtype):
    """Per-group scale (rounded to ``scale_dtype``) and zero point, both ``[G, 1, N]`` f32."""
    if zero_point:
        max_int = 2**bits - 1
        w_max = w_gsn.max(axis=1, keepdims=True)
        w_min = w_gsn.min(axis=1, keepdims=True)
        scale = jnp.maximum(w_max - w_min, 1e-5) / max_int
        scale = scale.astype(scale_dtype).astype(jnp.float32)
        zero = jnp.clip(-jnp.round(w_min / scale), 0, max_int)
    else:
        absmax = jnp.maximum(jnp.abs(w_gsn).max(axis=1, keepdims=True), 1e-5)
        scale = (absmax / (2 ** (bits - 1) - 1)).astype(scale_dtype).astype(jnp.float32)
        zero = jnp.full_like(scale, 2 ** (bits - 1))
    return scale, zero


def quantize(
    w_kn: jax.Array,
    *,
    bits: int = 4,
    group_size: int = 128,
    zero_point: bool = True,
    scale_dtype=jnp.float16,
) -> QuantizedTensor:
    """Quantizes ``w_kn`` (``[in, out]``) group-wise along ``in``.

    The scale is rounded to ``scale_dtype`` first (float16, the dtype the AutoAWQ GEMM format
    stores) and the codes and zero points are computed against the rounded scale, so saving
    the result loses nothing.
    """
    check_bits(bits)
    k, n = w_kn.shape
    g = resolve_group_size(group_size, k)
    w_gsn = w_kn.astype(jnp.float32).reshape(k // g, g, n)
    scale, zero = _scales_and_zeros(w_gsn, bits, zero_point, scale_dtype)
    q = jnp.clip(jnp.round(w_gsn / scale) + zero, 0, 2**bits - 1)
    return QuantizedTensor(
        q=q.reshape(k, n).astype(jnp.uint8),
        scales=scale[:, 0, :].astype(scale_dtype),
        zeros=zero[:, 0, :].astype(jnp.uint8),
        bits=bits,
        group_size=g,
    )


def fake_quantize(
    w_kn: jax.Array, *, bits: int = 4, group_size: int = 128, zero_point: bool = True
) -> jax.Array:
    """``dequantize(quantize(w))`` in float32 scales, in ``w``'s dtype: what the search scores."""
    check_bits(bits)
    k, n = w_kn.shape
    g = resolve_group_size(group_size, k)
    w_gsn = w_kn.astype(jnp.float32).reshape(k // g, g, n)
    scale, zero = _scales_and_zeros(w_gsn, bits, zero_point, jnp.float32)
    q = jnp.clip(jnp.round(w_gsn / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).reshape(k, n).astype(w_kn.dtype)
