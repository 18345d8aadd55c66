"""kernels.testing: the tolerance table's lookups and the relative L2 error."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.testing import TOLERANCES, Tol, rel_l2_error, tolerance


def test_lookup_by_dtype_or_name_and_unpacking():
  tol = tolerance("attention_vs_float64", jnp.bfloat16)
  assert tol is tolerance("attention_vs_float64", "bfloat16")
  assert tol is tolerance("attention_vs_float64", jnp.zeros(1, jnp.bfloat16).dtype)
  assert dict(**tol) == {"rtol": 2**-7, "atol": 1e-5}
  np.testing.assert_allclose(1.0 + 2**-8, 1.0, **tol)
  with pytest.raises(AssertionError):
    np.testing.assert_allclose(1.0 + 2**-6, 1.0, **tol)


def test_unknown_kind_or_dtype_raises_rather_than_guessing():
  with pytest.raises(KeyError, match="no comparison kind 'kernel_vs_oracle'"):
    tolerance("kernel_vs_oracle", "float32")
  with pytest.raises(KeyError, match="no float16 tolerance for 'attention_vs_float64'"):
    tolerance("attention_vs_float64", jnp.float16)


def test_table_entries_are_finite_and_non_negative():
  for kind, by_dtype in TOLERANCES.items():
    assert by_dtype and set(by_dtype) <= {"float32", "bfloat16", "float16"}, kind
    for tol in by_dtype.values():
      assert isinstance(tol, Tol) and 0 <= tol.rtol < 1 and 0 <= tol.atol < 1, kind
      if kind.endswith("_rel_l2"):
        assert tol.atol == 0, kind  # the relative L2 bound is rtol alone


def test_rel_l2_error():
  want = np.array([3.0, 4.0])
  assert rel_l2_error(want, want) == 0
  assert rel_l2_error(want + [0.0, 0.5], want) == pytest.approx(0.1)
  assert rel_l2_error(jnp.asarray(want, jnp.bfloat16), want) == 0  # 3 and 4 are exact in bf16
  assert np.isnan(rel_l2_error([np.nan, 4.0], want))  # which no bound admits
