"""One timing helper for every measurement: repeated samples, their median and their spread.

:func:`time_calls` runs a call ``repeats`` times (each sample ``inner`` calls back to back,
then one ``sync`` on the last result, divided by ``inner``) and returns a :class:`Timing`:
the samples, their median, min and max. Every timing figure an experiment or benchmark
reports is such a median, with its min-max spread beside it (a table column, an error bar).

The range ``[min, max]`` of ``n`` independent samples holds the median of their
distribution with probability ``1 - 2**(1 - n)`` whatever that distribution is (93.8% at
5 samples, 96.9% at 6, 98.4% at 7): the spread is a distribution-free interval for the
median. With many samples it grows with every outlier, so :attr:`Timing.interval` narrows
it to the order statistics ``[x_(k), x_(n+1-k)]`` with the largest ``k`` that still covers
the median with probability >= 95% (the min-max range up to 8 samples). :func:`compare`
calls one timing faster or slower than another only where those intervals do not
overlap; text that claims a difference uses it.

Nothing here imports ml_collections (the GPU machine has only absl-py), nor JAX until a
call is synced with its default.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

MIN_REPEATS = 5  # the fewest repeats behind a reported timing (issue 19, item 5)
LEVEL = 0.95  # the coverage :attr:`Timing.interval` aims at


def median_interval_rank(n: int, level: float = LEVEL) -> tuple[int, float]:
  """``(k, coverage)``: the largest ``k`` for which the ``k``-th smallest and ``k``-th largest
  of ``n`` independent samples hold their distribution's median with probability
  ``coverage >= level`` (binomial tails); ``k = 1`` (min-max) when no ``k`` reaches it."""
  best = (1, 1.0 - 2.0 ** (1 - n))
  below = 1  # C(n, 0): the ways fewer than k samples fall below the median, k = 1
  outcomes = 1 << n  # an int: 2.0**n overflows a float past n = 1023
  for k in range(2, (n + 1) // 2 + 1):
    below += math.comb(n, k - 1)
    coverage = 1.0 - 2 * below / outcomes
    if coverage < level:
      break
    best = (k, coverage)
  return best


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per call over repeated samples: their median, min and max, and the samples."""

  median: float
  min: float
  max: float
  samples: tuple[float, ...]

  @classmethod
  def of(cls, samples: Iterable[float]) -> Timing:
    """The timing of already measured ``samples`` (seconds), in the order taken."""
    s = tuple(float(x) for x in samples)
    if not s:
      raise ValueError("a Timing needs at least one sample")
    return cls(median=statistics.median(s), min=min(s), max=max(s), samples=s)

  @property
  def repeats(self) -> int:
    return len(self.samples)

  @property
  def spread(self) -> float:
    """``max - min``: the width of the interval."""
    return self.max - self.min

  @property
  def coverage(self) -> float:
    """Probability that ``[min, max]`` holds the distribution's median (independent samples)."""
    return 1.0 - 2.0 ** (1 - self.repeats)

  @property
  def interval(self) -> tuple[float, float]:
    """A distribution-free interval for the median, at >= 95% where the samples allow
    (:func:`median_interval_rank`); ``(min, max)`` up to 8 samples."""
    k, _ = median_interval_rank(self.repeats)
    s = sorted(self.samples)
    return s[k - 1], s[-k]

  def map(self, fn: Callable[[float], float]) -> Timing:
    """The timing of ``fn`` applied to every sample (e.g. seconds to tokens/s). For a
    monotone ``fn`` the median maps to the median (odd counts) and min/max to the ends."""
    return Timing.of(fn(x) for x in self.samples)

  def fields(self, name: str, scale: float = 1e3, suffix: str = "_ms", digits: int | None = None):
    """JSON fields ``{name}{suffix}`` (median), ``{name}_min{suffix}``, ``{name}_max{suffix}``,
    the interval of the median ``{name}_ci_lo{suffix}``, ``{name}_ci_hi{suffix}`` and
    ``{name}_repeats``, values times ``scale`` (ms by default), rounded to ``digits``
    significant digits when given."""

    def r(x: float) -> float:
      x = x * scale
      return float(f"{x:.{digits}g}") if digits else x

    return {
      f"{name}{suffix}": r(self.median),
      f"{name}_min{suffix}": r(self.min),
      f"{name}_max{suffix}": r(self.max),
      f"{name}_ci_lo{suffix}": r(self.interval[0]),
      f"{name}_ci_hi{suffix}": r(self.interval[1]),
      f"{name}_repeats": self.repeats,
    }


def time_calls(
  call: Callable[[], Any],
  *,
  repeats: int = MIN_REPEATS,
  inner: int = 1,
  warmup: int = 1,
  sync: Callable[[Any], Any] | None = None,
) -> Timing:
  """Seconds per ``call()``: ``warmup`` synced calls, then ``repeats`` samples.

  Each sample dispatches ``inner`` calls back to back and runs ``sync`` on the last
  result inside the timed region: with ``inner > 1`` on an accelerator, host dispatch
  overlaps device work and the sample is device time; with ``inner=1`` it includes the
  dispatch latency. ``sync`` defaults to ``jax.block_until_ready``; pass
  ``lambda out: out`` for host-only work, or for the host time of dispatching alone.
  """
  if sync is None:
    import jax  # here, so that importing this module stays light

    sync = jax.block_until_ready
  if repeats < 1 or inner < 1 or warmup < 0:
    raise ValueError(
      f"need repeats >= 1, inner >= 1, warmup >= 0; got {repeats}, {inner}, {warmup}"
    )
  for _ in range(warmup):
    sync(call())
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = call()
    sync(out)
    samples.append((time.perf_counter() - t0) / inner)
  return Timing.of(samples)


def chained(fn: Callable[..., Any], n: int) -> Callable[..., Any]:
  """A jitted function that runs ``fn(*args, **kwargs)`` ``n`` times in one program, each
  call after the one before: an optimization barrier carries each result into the next
  call's arguments, so that XLA can neither merge the calls nor hoist them. Its time
  divided by ``n`` is device time with no Python dispatch between the calls (a kernel of
  ~0.1 ms is as short as one dispatch on the H200's host, where back-to-back calls from
  Python measure the host). Returns the list of the ``n`` results."""
  import jax

  if n < 1:
    raise ValueError(f"need n >= 1, got {n}")

  def run(*args, **kwargs):
    outs = []
    for _ in range(n):
      out = fn(*args, **kwargs)
      (args, kwargs), out = jax.lax.optimization_barrier(((args, kwargs), out))
      outs.append(out)
    return outs  # every result: none of the calls is dead code

  return jax.jit(run)


Interval = Timing | tuple[float, float]  # a Timing, or (min, max) as rows record them


def _ends(x: Interval) -> tuple[float, float]:
  return x.interval if isinstance(x, Timing) else (float(x[0]), float(x[1]))


def separated(a: Interval, b: Interval) -> bool:
  """Whether the intervals of ``a`` and ``b`` do not overlap (a Timing's
  :attr:`~Timing.interval`, or ``(lo, hi)`` as given)."""
  (a_lo, a_hi), (b_lo, b_hi) = _ends(a), _ends(b)
  return a_hi < b_lo or b_hi < a_lo


def compare(a: Interval, b: Interval) -> str:
  """``"faster"`` or ``"slower"`` (``a`` against ``b``, smaller is faster) where the
  intervals separate, else ``"indistinguishable"``. For rates (larger is better), compare
  the inverse timings or read the answer reversed."""
  (a_lo, a_hi), (b_lo, b_hi) = _ends(a), _ends(b)
  if a_hi < b_lo:
    return "faster"
  if b_hi < a_lo:
    return "slower"
  return "indistinguishable"


def rate_verdict(a: Interval, b: Interval) -> str:
  """Rate ``a`` against rate ``b`` (larger is better) as words for a sentence: ``"faster
  than"`` or ``"slower than"`` where the intervals separate, else ``"not distinguishable
  from (the ranges overlap)"``."""
  return {
    "faster": "slower than",  # compare() calls the smaller interval faster
    "slower": "faster than",
    "indistinguishable": "not distinguishable from (the ranges overlap)",
  }[compare(a, b)]


def spread_text(t: Timing, scale: float = 1e3, fmt: str = ".3f") -> str:
  """``"median (min-max)"`` of ``t`` times ``scale``, e.g. ``"1.234 (1.200-1.301)"``."""
  return f"{t.median * scale:{fmt}} ({t.min * scale:{fmt}}-{t.max * scale:{fmt}})"


def range_text(lo: float, hi: float, fmt: str = ".4g") -> str:
  """``"lo-hi"``: the cell of a table's spread column."""
  return f"{lo:{fmt}}-{hi:{fmt}}"


def errorbar(ax, x, median, lo, hi, fmt: str = "o-", **kwargs):
  """Medians as a line on matplotlib Axes ``ax`` (``ax.plot(x, median, fmt, **kwargs)``,
  its legend entry) and a bar from min to max at each point in the line's colour (one
  ``vlines`` collection: no second legend style); returns the line."""
  (line,) = ax.plot(x, np.asarray(median, float), fmt, **kwargs)
  ax.vlines(x, np.asarray(lo, float), np.asarray(hi, float), colors=line.get_color(), lw=1.2)
  return line
