"""Comparison helpers for the tests (they live in fastppo.testing so `fastppo verify` shares them)."""

from fastppo.testing import TOL, TOL_FP32_OUT, assert_close, errors, random_mask, within  # noqa: F401
