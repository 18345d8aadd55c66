"""The bucketed step-cost form, the relative loss and the fixed train/held-out split
(paxcache/engine/_cost.py), against hand-worked values and a NumPy reference fit."""

import numpy as np
import pytest

from paxcache.engine._cost import (
  StepCostModel,
  fit_model,
  fit_step_cost,
  median_rel_error,
  split_records,
)


def _rec(p, d, kv, ms):
  return {"prefill_tokens": p, "decode_batch": d, "kv_tokens": kv, "step_ms": ms}


def test_bucketed_model_charges_the_padded_batch_by_hand():
  m = StepCostModel(
    prefill_ms=0.01,
    decode_ms=0.0,
    kv_ms=0.001,
    bucket_ms=((8, 1.0), (16, 2.0), (64, 4.0)),
    name="hand",
  )
  # 5 decode rows pad to 8: 1 ms + 100 K/V tokens * 0.001.
  assert m.step_ms(0, 5, 100) == pytest.approx(1.1)
  # 8 decode rows + a prefill row = 9 rows pad to 16: 2 + 50 * 0.01 + 0.
  assert m.step_ms(50, 8, 0) == pytest.approx(2.5)
  # 20 rows pad to 32, not fitted: nearest on a log scale is a tie (16, 64): the larger.
  assert m.step_ms(0, 20, 0) == pytest.approx(4.0)
  # 200 rows pad to 256: the nearest fitted is 64; an empty step pads to the minimum 8.
  assert m.step_ms(0, 200, 0) == pytest.approx(4.0)
  assert m.step_ms(0, 0, 0) == pytest.approx(1.0)
  assert m.seconds(0, 5, 100, swap_tokens=7) == pytest.approx(1.1e-3)


def test_a_higher_min_bucket_charges_the_larger_padding():
  m = StepCostModel(decode_ms=0.0, bucket_ms=((8, 1.0), (16, 2.0), (32, 3.0)), min_bucket=32)
  assert m.step_ms(0, 3, 0) == pytest.approx(3.0)  # 3 rows pad to 32, not 8


def test_linear_model_is_unchanged_by_the_bucket_fields():
  m = StepCostModel(base_ms=2.0, prefill_ms=0.5, decode_ms=0.25, kv_ms=0.125, swap_ms=1.0)
  assert m.step_ms(2, 4, 8, 1) == pytest.approx(2 + 1 + 1 + 1 + 1)


@pytest.mark.parametrize(
  "pairs, match",
  [
    (((12, 1.0),), "power of two"),
    (((0, 1.0),), "power of two"),
    (((8, -1.0),), "ms >= 0"),
    (((16, 1.0), (8, 1.0)), "increase"),
    (((8, 1.0), (8, 2.0)), "increase"),
    (((8,),), "pair"),
  ],
)
def test_bad_bucket_pairs_raise(pairs, match):
  with pytest.raises(ValueError, match=match):
    StepCostModel(bucket_ms=pairs)


def test_bucket_pairs_from_json_lists_are_accepted_and_hashable():
  m = StepCostModel(bucket_ms=[[8, 1.0], [16, 2.0]])
  assert m.bucket_ms == ((8, 1.0), (16, 2.0))
  hash(m)


def _bucketed_truth(n, noise, seed):
  rng = np.random.default_rng(seed)
  fixed = {8: 1.5, 16: 1.8, 32: 2.0, 64: 2.4}
  recs = []
  for _ in range(n):
    d = int(rng.integers(0, 60))
    p = int(rng.integers(1, 400)) if rng.random() < 0.2 else 0
    kv = int(rng.integers(0, 5000))
    rows = d + (p > 0)
    size = 1 << (max(rows, 8) - 1).bit_length()
    ms = (fixed[size] + 0.002 * p + 0.0001 * kv) * (1 + noise * rng.standard_normal())
    recs.append(_rec(p, d, kv, ms))
  return recs, fixed


def test_bucketed_fit_recovers_a_bucketed_model():
  recs, fixed = _bucketed_truth(300, 0.0, 0)
  m = fit_model(recs, form="bucketed")
  assert dict(m.bucket_ms) == pytest.approx(fixed)
  assert (m.prefill_ms, m.kv_ms, m.decode_ms, m.base_ms) == pytest.approx((0.002, 1e-4, 0, 0))
  assert median_rel_error(m, recs) < 1e-9
  rel = fit_model(recs, form="bucketed", loss="relative")
  assert dict(rel.bucket_ms) == pytest.approx(fixed)


def test_relative_loss_is_weighted_least_squares_on_relative_error():
  """Against NumPy's lstsq on the rows divided by the measured time (no coefficient is
  negative here, so the non-negative fit is the plain one)."""
  rng = np.random.default_rng(3)
  recs = []
  for _ in range(80):
    p, d, kv = int(rng.integers(0, 300)), int(rng.integers(1, 64)), int(rng.integers(0, 9000))
    ms = (3.0 + 0.01 * p + 0.05 * d + 2e-4 * kv) * float(rng.uniform(0.7, 1.3))
    recs.append(_rec(p, d, kv, ms))
  x = np.array([[1, r["prefill_tokens"], r["decode_batch"], r["kv_tokens"]] for r in recs], float)
  y = np.array([r["step_ms"] for r in recs])
  want, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
  assert (want > 0).all()
  m = fit_model(recs, loss="relative")
  assert (m.base_ms, m.prefill_ms, m.decode_ms, m.kv_ms) == pytest.approx(tuple(want))
  absolute = fit_model(recs)
  want_abs, *_ = np.linalg.lstsq(x, y, rcond=None)
  assert (absolute.base_ms, absolute.prefill_ms) == pytest.approx(tuple(want_abs[:2]))


def test_split_is_fixed_by_the_seed_and_fit_step_cost_reports_on_its_heldout_part():
  recs, _ = _bucketed_truth(100, 0.05, 1)
  train, held = split_records(recs, 0.2, seed=0)
  assert (len(train), len(held)) == (80, 20)
  assert split_records(recs, 0.2, seed=0) == (train, held)
  assert split_records(recs, 0.2, seed=1) != (train, held)
  assert sorted(map(id, train + held)) == sorted(map(id, recs))
  report = fit_step_cost(recs, form="bucketed", loss="relative")
  assert report.model == fit_model(train, form="bucketed", loss="relative")
  assert report.median_rel_error == pytest.approx(median_rel_error(report.model, held))
  assert 0.005 < report.median_rel_error < 0.08  # noise 5%: median |N(0, 5%)| ~ 3.4%


def test_bad_form_loss_and_zero_times_raise():
  recs, _ = _bucketed_truth(20, 0.0, 2)
  with pytest.raises(ValueError, match="form"):
    fit_model(recs, form="cubic")
  with pytest.raises(ValueError, match="loss"):
    fit_model(recs, loss="huber")
  with pytest.raises(ValueError, match="step_ms > 0"):
    fit_model(recs + [_rec(0, 1, 1, 0.0)], loss="relative")
