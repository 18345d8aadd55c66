"""The split-K skinny product (kernels/gpu/matmul.py) in interpret mode against float64 NumPy,
its launch rule, and its errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.gpu import matmul as mm


def _inputs(rows, k, n, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
  w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
  return x, w


def _f64(a):
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


@pytest.mark.parametrize(
  "rows,k,n,settings",
  [
    (1, 256, 64, mm.MatmulSettings(splits=2, block_n=32, block_k=64)),  # one row
    (5, 256, 96, mm.MatmulSettings(splits=2, block_n=32, block_k=64)),  # not a power of two
    (64, 512, 128, mm.MatmulSettings(splits=4, block_n=64, block_k=64)),
    (17, 384, 64, mm.MatmulSettings(splits=3, block_n=64, block_k=128)),  # 3 slices
    (40, 128, 48, mm.MatmulSettings(splits=1, block_n=16, block_k=128)),
  ],
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_partials_and_product_against_float64(rows, k, n, settings, dtype):
  """Each partial is the product of its K slice (exact inputs, float32 sums: within 1e-5
  of float64 relative to the largest entry), and the product is their sum."""
  x, w = _inputs(rows, k, n, dtype)
  parts = mm.splitk_partials(x, w, settings, interpret=True)
  assert parts.shape == (settings.splits, rows, n) and parts.dtype == jnp.float32
  xs, ws = _f64(x), _f64(w)
  step = k // settings.splits
  for s in range(settings.splits):
    want = xs[:, s * step : (s + 1) * step] @ ws[s * step : (s + 1) * step]
    np.testing.assert_allclose(_f64(parts[s]), want, rtol=0, atol=1e-5 * np.abs(want).max())
  got = mm.skinny_matmul(x, w, settings, interpret=True)
  want = xs @ ws
  assert got.shape == (rows, n) and got.dtype == jnp.float32
  np.testing.assert_allclose(_f64(got), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("row", [2, 5])
def test_a_nan_in_one_row_of_x_stays_in_that_row(row):
  """Each output row reads only its own row of x: a NaN in row 2, or in the last row (whose
  index the row tile's 10 padding rows take), reaches that row's outputs alone."""
  x, w = _inputs(6, 256, 64, jnp.bfloat16)
  x = x.at[row, 7].set(jnp.nan)
  got = np.asarray(mm.skinny_matmul(x, w, mm.MatmulSettings(2, 32, 64), interpret=True))
  assert got.shape == (6, 64)
  assert np.isnan(got[row]).all()
  assert np.isfinite(np.delete(got, row, axis=0)).all()


def test_settings_rule_for_the_benchmark_models():
  """The launches measured fastest at 64 rows on the H100 (docs/benchmarks.md, Run37; the
  1B down's from Run47, in the decode step), and None where XLA's product was faster or
  the kernel does not take the shape."""
  S = mm.MatmulSettings
  rule = {
    (2048, 3072): S(2, 64, 128, num_stages=4),  # Llama-1B q/k/v
    (2048, 2048): S(4, 64, 128, num_stages=4),  # o
    (8192, 2048): S(4, 64, 128, num_stages=4),  # down: 32 MiB, the cap
    (576, 960): S(3, 32, 64, num_stages=4),  # SmolLM2 q/k/v
    (576, 3072): S(3, 64, 64, num_stages=4),  # gate/up
    (1536, 576): S(6, 32, 128, num_stages=4),  # down
  }
  for (k, n), want in rule.items():
    assert mm.matmul_settings(64, k, n, num_sms=132) == want, (k, n)
    # Three stages above 64 rows; none above 128 rows.
    assert mm.matmul_settings(128, k, n, num_sms=132).num_stages == 3
    assert mm.matmul_settings(129, k, n, num_sms=132) is None
  assert mm.matmul_settings(64, 576, 576, num_sms=132) is None  # SmolLM2 o: XLA's
  assert mm.matmul_settings(64, 2048, 16384, num_sms=132) is None  # 1B gate/up: 64 MiB
  assert mm.matmul_settings(64, 8192, 4096, itemsize=1, num_sms=132) is not None  # 32 MiB
  assert mm.matmul_settings(64, 8192 + 64, 2048, num_sms=132) is None  # above 32 MiB
  assert mm.matmul_settings(64, 2000, 2048, num_sms=132) is None  # K not a multiple of 64
  for rows in (1, 7, 64, 100, 128):
    for k, n in rule:
      s = mm.matmul_settings(rows, k, n, num_sms=132)
      assert k % (s.splits * s.block_k) == 0 and n % s.block_n == 0
  # fit=True: the rule's launch where it has one, else one split where the kernel tiles the
  # shape (up to 256 rows, K steps of 64 above 128 rows).
  assert mm.matmul_settings(64, 576, 960, num_sms=132, fit=True) == rule[576, 960]
  assert mm.matmul_settings(64, 576, 576, num_sms=132, fit=True) == S(1, 64, 64)
  assert mm.matmul_settings(64, 8192, 2048, num_sms=132, fit=True) == rule[8192, 2048]
  assert mm.matmul_settings(64, 8192 + 64, 2048, num_sms=132, fit=True) == S(1, 64, 64)
  assert mm.matmul_settings(256, 8192, 2048, num_sms=132, fit=True) == S(1, 64, 64)
  assert mm.matmul_settings(8, 64, 48, fit=True) == S(1, 16, 64)
  assert mm.matmul_settings(8, 40, 48, fit=True) is None
  assert mm.matmul_settings(257, 64, 64, fit=True) is None


def test_errors():
  x, w = _inputs(4, 128, 64, jnp.bfloat16)
  s = mm.MatmulSettings(2, 32, 64)
  with pytest.raises(ValueError, match="must share one of"):
    mm.splitk_partials(x.astype(jnp.float32), w.astype(jnp.float32), s, interpret=True)
  with pytest.raises(ValueError, match="must share one of"):
    mm.splitk_partials(x, w.astype(jnp.float16), s, interpret=True)
  with pytest.raises(ValueError, match="must equal w's rows"):
    mm.splitk_partials(x, w[:64], s, interpret=True)
  with pytest.raises(ValueError, match="must be 2-D"):
    mm.splitk_partials(x[None], w, s, interpret=True)
  with pytest.raises(ValueError, match="do not tile"):
    mm.splitk_partials(x, w, mm.MatmulSettings(4, 32, 64), interpret=True)  # 128 / 4 < 64
  with pytest.raises(ValueError, match="do not tile"):
    mm.splitk_partials(x, w, mm.MatmulSettings(1, 128, 64), interpret=True)  # N 64
  with pytest.raises(ValueError, match="power of two"):
    mm.MatmulSettings(1, 48, 64)
  with pytest.raises(ValueError, match="splits must be >= 1"):
    mm.MatmulSettings(0, 32, 64)
  with pytest.raises(ValueError, match="no split-K launch"):
    mm.skinny_matmul(x, w[:, :48], interpret=True)


def _swiglu_f64(x, w, mlp):
  xs, ws = _f64(x), _f64(w)
  g, u = xs @ ws[:, :mlp], xs @ ws[:, mlp:]
  return g / (1.0 + np.exp(-g)) * u


@pytest.mark.parametrize(
  "rows,k,mlp,settings",
  [
    (1, 128, 32, mm.MatmulSettings(1, 16, 64)),  # one row
    (5, 256, 48, mm.MatmulSettings(1, 16, 128)),  # rows not a power of two: a sliced tile
    (16, 576, 64, mm.MatmulSettings(1, 32, 64, num_stages=4)),  # SmolLM2's K, 9 steps
    (40, 128, 128, mm.MatmulSettings(1, 64, 128, num_stages=2)),
  ],
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_swiglu_against_float64(rows, k, mlp, settings, dtype):
  """silu(x @ W_gate) * (x @ W_up) from float32 sums, rounded once to x's dtype: within one
  rounding (2**-8 of bf16, 2**-11 of f16, relative to each entry, plus a floor for entries
  near 0) of float64 on the same inputs."""
  x, w = _inputs(rows, k, 2 * mlp, dtype, seed=rows)
  got = mm.swiglu_matmul(x, w, mlp=mlp, settings=settings, interpret=True)
  assert got.shape == (rows, mlp) and got.dtype == dtype
  want = _swiglu_f64(x, w, mlp)
  eps = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-11
  np.testing.assert_allclose(_f64(got), want, rtol=eps, atol=1e-5 * np.abs(want).max())
  # The gate's and the up's columns are not swapped (the activation is not symmetric).
  swapped = _swiglu_f64(x, jnp.concatenate([w[:, mlp:], w[:, :mlp]], axis=1), mlp)
  assert np.abs(_f64(got) - swapped).max() > 10 * np.abs(_f64(got) - want).max()


def test_swiglu_extremes_and_a_nan_row():
  """Large negative gate sums give silu's limit, -0 times up, not NaN; a NaN in one row of x
  reaches that row alone."""
  k, mlp = 64, 32
  x = jnp.ones((3, k), jnp.bfloat16)
  w = jnp.concatenate(
    [jnp.full((k, mlp), -4.0, jnp.bfloat16), jnp.full((k, mlp), 0.5, jnp.bfloat16)], axis=1
  )  # g = -256, u = 32
  s = mm.MatmulSettings(1, 32, 64)
  got = np.asarray(mm.swiglu_matmul(x, w, mlp=mlp, settings=s, interpret=True), np.float64)
  assert np.isfinite(got).all() and np.abs(got).max() < 1e-20
  x, w = _inputs(6, 128, 64, jnp.bfloat16)
  x = x.at[5, 3].set(jnp.nan)
  got = np.asarray(mm.swiglu_matmul(x, w, mlp=32, settings=s, interpret=True), np.float64)
  assert np.isnan(got[5]).all() and np.isfinite(got[:5]).all()


def test_swiglu_settings_rule():
  """Unsplit launches from 32 to 128 rows and weights up to 64 MiB: the widest column tile
  giving half the SMs a program, K steps of 64 in four stages; None outside the rule
  unless fit, which gives any launch the kernel can run."""
  S = mm.MatmulSettings
  assert mm.swiglu_settings(64, 576, 1536, num_sms=132) == S(1, 16, 64, num_stages=4)  # SmolLM2
  assert mm.swiglu_settings(32, 576, 1536, num_sms=132) == S(1, 16, 64, num_stages=4)
  assert mm.swiglu_settings(128, 2048, 8192, num_sms=132) == S(1, 64, 64, num_stages=4)  # 1B
  assert mm.swiglu_settings(64, 1024, 4096, num_sms=132) == S(1, 32, 64, num_stages=4)
  assert mm.swiglu_settings(31, 576, 1536, num_sms=132) is None  # few rows: the split-K path
  assert mm.swiglu_settings(129, 576, 1536, num_sms=132) is None
  assert mm.swiglu_settings(64, 2048 + 64, 8192, num_sms=132) is None  # above 64 MiB
  assert mm.swiglu_settings(64, 2048, 8192, itemsize=4, num_sms=132) is None  # 128 MiB
  assert mm.swiglu_settings(64, 560, 1536, num_sms=132) is None  # K not a multiple of 64
  assert mm.swiglu_settings(64, 576, 1544, num_sms=132) is None  # mlp not a multiple of 16
  # fit=True: the rule's launch where it has one, else the largest tiles that divide.
  assert mm.swiglu_settings(64, 576, 1536, num_sms=132, fit=True) == S(1, 16, 64, num_stages=4)
  assert mm.swiglu_settings(8, 576, 1536, num_sms=132, fit=True) == S(1, 64, 64)
  assert mm.swiglu_settings(256, 560, 1536, num_sms=132, fit=True) == S(1, 64, 16)
  assert mm.swiglu_settings(257, 576, 1536, fit=True) is None
  assert mm.swiglu_settings(8, 40, 48, fit=True) is None  # K not a multiple of 16
  for rows in (32, 63, 64, 100, 128):
    for k, mlp in ((576, 1536), (1024, 4096), (2048, 2048), (2048, 8192)):
      s = mm.swiglu_settings(rows, k, mlp, num_sms=132)
      assert s.splits == 1 and k % s.block_k == 0 and mlp % s.block_n == 0


def test_swiglu_errors():
  x, w = _inputs(4, 128, 64, jnp.bfloat16)
  s = mm.MatmulSettings(1, 16, 64)
  with pytest.raises(ValueError, match="no swiglu_matmul launch suits"):  # 4 rows: no rule
    mm.swiglu_matmul(x, w, mlp=32, interpret=True)
  # settings=None takes the rule's launch where it has one.
  x32 = _inputs(32, 128, 64, jnp.bfloat16)[0]
  np.testing.assert_array_equal(
    np.asarray(mm.swiglu_matmul(x32, w, mlp=32, interpret=True), np.float32),
    np.asarray(
      mm.swiglu_matmul(x32, w, mlp=32, settings=mm.swiglu_settings(32, 128, 32), interpret=True),
      np.float32,
    ),
  )
  with pytest.raises(ValueError, match="2 \\* mlp = 48 columns"):
    mm.swiglu_matmul(x, w, mlp=24, settings=s, interpret=True)
  with pytest.raises(ValueError, match="unsplit products"):
    mm.swiglu_matmul(x, w, mlp=32, settings=mm.MatmulSettings(2, 16, 64), interpret=True)
  with pytest.raises(ValueError, match="do not tile mlp 32"):
    mm.swiglu_matmul(x, w, mlp=32, settings=mm.MatmulSettings(1, 64, 64), interpret=True)
  with pytest.raises(ValueError, match="must share one of"):
    mm.swiglu_matmul(x, w.astype(jnp.float16), mlp=32, settings=s, interpret=True)
  with pytest.raises(ValueError, match="must equal w's rows"):
    mm.swiglu_matmul(x, w[:64], mlp=32, settings=s, interpret=True)
