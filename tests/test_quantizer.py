"""The group quantizer against hand-computed values (AWQ_SPEC.md section 5)."""

import jax.numpy as jnp
import numpy as np
import pytest

from awq_jax.quantizer import fake_quantize, quantize, resolve_group_size


def _col(values) -> jnp.ndarray:
    """One group as a [g, 1] weight (groups run along the input dimension, axis 0)."""
    return jnp.asarray(values, jnp.float32)[:, None]


def test_asymmetric_exact_grid():
    w = _col(np.arange(16) * 0.25 - 1.0)  # min -1, max 2.75: a 4-bit grid of step 0.25
    qt = quantize(w, bits=4, group_size=16, scale_dtype=jnp.float32)
    assert float(qt.scales[0, 0]) == pytest.approx(0.25)
    assert int(qt.zeros[0, 0]) == 4  # -round(-1 / 0.25)
    np.testing.assert_array_equal(np.asarray(qt.q[:, 0]), np.arange(16))
    np.testing.assert_allclose(np.asarray(qt.dequantize()), np.asarray(w), atol=1e-7)


def test_asymmetric_boundaries_round_half_even():
    # min -1.875, max 1.875, 4 bits: scale 3.75 / 15 = 0.25 (exact); zero = -round(-7.5) = 8
    # (half to even); -1.875 -> round(-7.5) + 8 = 0; 1.875 -> round(7.5) + 8 = 16 -> 15.
    w = _col([-1.875, 1.875, 0.0, 0.125])
    qt = quantize(w, bits=4, group_size=4, scale_dtype=jnp.float32)
    assert float(qt.scales[0, 0]) == 0.25
    assert int(qt.zeros[0, 0]) == 8
    # 0 -> 8; 0.125 = half a step -> round(0.5) = 0 -> 8.
    np.testing.assert_array_equal(np.asarray(qt.q[:, 0]), [0, 15, 8, 8])
    np.testing.assert_array_equal(np.asarray(qt.dequantize()[:, 0]), [-2.0, 1.75, 0.0, 0.0])


def test_constant_groups_max_equals_min():
    # All zeros: scale clamps to 1e-5 / 15, zero 0, codes 0: exactly zero back.
    qt = quantize(jnp.zeros((8, 2)), bits=4, group_size=8, scale_dtype=jnp.float32)
    assert float(qt.scales[0, 0]) == pytest.approx(1e-5 / 15)
    assert not np.asarray(qt.q).any() and not np.asarray(qt.dequantize()).any()
    # A constant negative group: zero point saturates at 15, code 0 -> -15 * scale = -1e-5.
    # (The reference formula, reproduced as is: its range does not include 0.)
    qt = quantize(jnp.full((8, 1), -0.5), bits=4, group_size=8, scale_dtype=jnp.float32)
    assert int(qt.zeros[0, 0]) == 15
    np.testing.assert_array_equal(np.asarray(qt.q), 0)
    np.testing.assert_allclose(np.asarray(qt.dequantize()), -1e-5, rtol=1e-5)


def test_symmetric_stored_with_zero_point_half_range():
    # absmax 1.75: scale 1.75 / 7 = 0.25, exact in binary, so the halves are exact halves.
    w = _col([-1.75, -0.625, 0.0, 0.375, 1.75, 0.125, -0.375, 0.3])
    qt = quantize(w, bits=4, group_size=8, zero_point=False, scale_dtype=jnp.float32)
    assert float(qt.scales[0, 0]) == 0.25
    assert int(qt.zeros[0, 0]) == 8
    # round(w / 0.25) + 8, half to even: -7, -2.5->-2, 0, 1.5->2, 7, 0.5->0, -1.5->-2, 1.2->1
    np.testing.assert_array_equal(np.asarray(qt.q[:, 0]), [1, 6, 8, 10, 15, 8, 6, 9])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_codes_in_range_and_error_bounded(bits, group_size):
    w = jnp.asarray(np.random.default_rng(bits).standard_normal((128, 24)), jnp.float32)
    qt = quantize(w, bits=bits, group_size=group_size, scale_dtype=jnp.float32)
    q = np.asarray(qt.q)
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    g = resolve_group_size(group_size, 128)
    assert qt.scales.shape == (128 // g, 24) and qt.group_size == g
    # Round to nearest: every in-range value is within half a step (+ scale rounding).
    err = np.abs(np.asarray(qt.dequantize()) - np.asarray(w))
    step = np.repeat(np.asarray(qt.scales), g, axis=0)
    assert (err <= 0.5 * step + 1e-6).all()
    # fake_quantize is the same function with float32 scales.
    np.testing.assert_allclose(
        np.asarray(fake_quantize(w, bits=bits, group_size=group_size)),
        np.asarray(qt.dequantize()),
        atol=1e-6,
    )


def test_float16_scales_are_what_the_codes_use():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 16)), jnp.float32)
    qt = quantize(w, bits=4, group_size=64)
    assert qt.scales.dtype == jnp.float16
    # Dequantizing with the stored fp16 scales stays within half a step of w.
    err = np.abs(np.asarray(qt.dequantize()) - np.asarray(w))
    assert (err <= 0.5 * np.asarray(qt.scales, np.float32) + 1e-6).all()


def test_bad_group_size_and_bits():
    with pytest.raises(ValueError, match="group size 128 does not divide the input dimension 576"):
        quantize(jnp.zeros((576, 8)), group_size=128)
    with pytest.raises(ValueError, match="bits must be between 2 and 8"):
        quantize(jnp.zeros((64, 8)), bits=1, group_size=64)
