"""The one timing helper, against a fake clock: samples, median, min, max and separation."""

import itertools
import math
import time

import numpy as np
import pytest

from experiments import _timing
from experiments._timing import Timing, compare, rate_verdict, separated, time_calls


def _fake_clock(monkeypatch, ticks):
  """time.perf_counter returns ``ticks`` in order (and fails past their end)."""
  it = iter(ticks)
  monkeypatch.setattr(time, "perf_counter", lambda: next(it))


def test_time_calls_samples_median_min_max_by_hand(monkeypatch):
  # Five samples of one call each: (start, end) pairs 1, 3, 2, 10, 4 seconds long.
  durations = [1.0, 3.0, 2.0, 10.0, 4.0]
  ticks = list(
    itertools.chain.from_iterable((100.0 * i, 100.0 * i + d) for i, d in enumerate(durations))
  )
  _fake_clock(monkeypatch, ticks)
  calls, synced = [], []
  t = time_calls(lambda: calls.append(1) or len(calls), repeats=5, warmup=2, sync=synced.append)
  assert t.samples == (1.0, 3.0, 2.0, 10.0, 4.0)  # in the order taken
  assert (t.median, t.min, t.max) == (3.0, 1.0, 10.0)  # sorted: 1 2 [3] 4 10
  assert t.spread == 9.0
  assert t.repeats == 5
  assert t.coverage == pytest.approx(1 - 2**-4)  # 93.75%
  assert len(calls) == 7  # 2 warm-up calls + 5 timed
  assert synced == [1, 2, 3, 4, 5, 6, 7]  # every warm-up call and every sample's last result


def test_time_calls_divides_by_inner_and_syncs_only_the_last(monkeypatch):
  # Two samples of 4 calls each, 8 s and 2 s long: 2.0 and 0.5 s per call.
  _fake_clock(monkeypatch, [0.0, 8.0, 10.0, 12.0])
  calls, synced = [], []
  t = time_calls(
    lambda: calls.append(1) or len(calls), repeats=2, inner=4, warmup=0, sync=synced.append
  )
  assert t.samples == (2.0, 0.5)
  assert t.median == pytest.approx(1.25)  # an even count: the mean of the middle two
  assert (t.min, t.max) == (0.5, 2.0)
  assert synced == [4, 8]
  assert len(calls) == 8


def test_time_calls_rejects_empty_and_bad_counts():
  with pytest.raises(ValueError, match="repeats"):
    time_calls(lambda: None, repeats=0, sync=lambda x: x)
  with pytest.raises(ValueError, match="inner"):
    time_calls(lambda: None, inner=0, sync=lambda x: x)
  with pytest.raises(ValueError, match="at least one sample"):
    Timing.of([])


def test_time_calls_on_the_real_clock_and_jax():
  import jax.numpy as jnp

  t = time_calls(lambda: jnp.ones(4) + 1, repeats=5, inner=2)
  assert t.repeats == 5 and 0 < t.min <= t.median <= t.max


def test_fields_map_and_text():
  t = Timing.of([0.001, 0.003, 0.002])
  assert t.fields("step") == {
    "step_ms": pytest.approx(2.0),
    "step_min_ms": pytest.approx(1.0),
    "step_max_ms": pytest.approx(3.0),
    "step_ci_lo_ms": pytest.approx(1.0),  # 3 samples: the interval is min-max
    "step_ci_hi_ms": pytest.approx(3.0),
    "step_repeats": 3,
  }
  assert t.fields("x", digits=2, scale=1.0, suffix="_s") == {
    "x_s": 0.002,
    "x_min_s": 0.001,
    "x_max_s": 0.003,
    "x_ci_lo_s": 0.001,
    "x_ci_hi_s": 0.003,
    "x_repeats": 3,
  }
  rate = t.map(lambda s: 6.0 / s)  # seconds -> calls/s: min and max swap ends
  assert (rate.median, rate.min, rate.max) == pytest.approx((3000.0, 2000.0, 6000.0))
  assert _timing.spread_text(t) == "2.000 (1.000-3.000)"


def test_separated_and_compare():
  fast = Timing.of([1.0, 1.1, 1.2])
  slow = Timing.of([1.3, 1.5, 2.0])
  overlapping = Timing.of([1.15, 1.4, 1.6])
  assert separated(fast, slow) and separated(slow, fast)
  assert compare(fast, slow) == "faster"
  assert compare(slow, fast) == "slower"
  assert not separated(fast, overlapping)
  assert compare(fast, overlapping) == "indistinguishable"
  assert compare(overlapping, slow) == "indistinguishable"
  # Touching ends overlap: a shared value is not a separation.
  assert not separated(Timing.of([1.0, 2.0]), Timing.of([2.0, 3.0]))
  # (min, max) pairs, as table rows record them, compare the same way.
  assert compare((1.0, 1.2), slow) == "faster"
  assert compare((1.0, 1.4), (1.3, 2.0)) == "indistinguishable"


def test_rate_verdict_reads_larger_as_faster():
  # Rates: (min, max) of tokens/s; the larger rate is the faster system.
  assert rate_verdict((200.0, 220.0), (100.0, 120.0)) == "faster than"
  assert rate_verdict((100.0, 120.0), (200.0, 220.0)) == "slower than"
  assert rate_verdict((100.0, 210.0), (200.0, 220.0)).startswith("not distinguishable")


def test_median_interval_by_hand():
  # Up to 8 samples no narrower interval reaches 95%: min-max, 1 - 2**(1 - n).
  assert _timing.median_interval_rank(5) == (1, 1 - 2**-4)
  assert _timing.median_interval_rank(8)[0] == 1  # k=2 would cover 1 - 2*9/256 = 93.0%
  # 9 samples: the 2nd smallest to the 2nd largest cover 1 - 2*(1 + 9)/512 = 96.1%.
  assert _timing.median_interval_rank(9) == (2, pytest.approx(1 - 20 / 512))
  # Past 1,023 samples 2.0**n overflowed a float. Against binomial tails summed in log
  # space: the k-th order statistics cover the median at >= 95%, the (k+1)-th do not.
  n = 1200
  k, coverage = _timing.median_interval_rank(n)

  def tail(k):  # P(fewer than k of n samples below the median), each with probability 1/2
    return sum(
      math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2))
      for i in range(k)
    )

  assert coverage == pytest.approx(1 - 2 * tail(k), rel=1e-9) and coverage >= 0.95
  assert 1 - 2 * tail(k + 1) < 0.95
  assert abs(k - (n / 2 - 1.96 * math.sqrt(n) / 2)) < 3  # the normal approximation
  t = Timing.of([5.0, 1.0, 9.0, 2.0, 3.0, 4.0, 100.0, 6.0, 7.0])  # one outlier
  assert t.interval == (2.0, 9.0)  # the outlier widens min-max, not the interval
  assert (t.min, t.max) == (1.0, 100.0)
  assert Timing.of([3.0, 1.0, 2.0, 5.0, 4.0]).interval == (1.0, 5.0)
  # Compared by intervals: [2, 9] against [10, 12] separates although 100 > 10.
  assert compare(t, Timing.of([10.0, 11.0, 12.0])) == "faster"


def test_range_text_and_errorbar_ends():
  assert _timing.range_text(0.25134, 0.5) == "0.2513-0.5"

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots()
  try:
    line = _timing.errorbar(ax, [1, 2], [2.0, 5.0], [1.0, 4.5], [3.5, 6.0], color="C1", label="t")
    assert list(ax.lines) == [line] and line.get_label() == "t"  # one legend style per timing
    assert line.get_ydata().tolist() == [2.0, 5.0]
    (bars,) = ax.collections
    segments = [seg.tolist() for seg in bars.get_segments()]
    assert segments == [[[1, 1.0], [1, 3.5]], [[2, 4.5], [2, 6.0]]]
  finally:
    plt.close(fig)


def test_chained_runs_every_call_in_order_in_one_program():
  import jax.numpy as jnp

  from experiments._timing import chained

  calls = []

  def f(x, *, scale):
    calls.append(1)  # traced once per call site: one trace per chained call
    return jnp.sin(x) * scale

  x = jnp.arange(4.0)
  run = chained(f, 3)
  outs = run(x, scale=2.0)
  assert len(outs) == 3
  for out in outs:
    np.testing.assert_allclose(np.asarray(out), np.sin(np.arange(4.0)) * 2.0, rtol=1e-6)
  assert len(calls) == 3
  # All three sines survive XLA (none merged or hoisted: each call's inputs pass through a
  # barrier that also takes the call before's result).
  hlo = run.lower(x, scale=2.0).compile().as_text()
  assert hlo.count(" sine(") == 3, hlo
  with pytest.raises(ValueError, match="n >= 1"):
    chained(f, 0)
