"""The engine's clocks: request arrivals, first tokens and finishes are stamped on one.

* :class:`WallClock`: real seconds since the clock started (or was reset); waiting for an
  arrival sleeps.
* :class:`SimulatedClock`: seconds that advance only by the step-cost model's cost of each
  step the engine runs (and jump to the next arrival when the engine is idle), so that a
  run is reproducible and needs no device.
"""

from __future__ import annotations

import time

from paxcache.engine._cost import StepCostModel


class WallClock:
  """Seconds since construction or :meth:`reset` (``time.perf_counter``)."""

  simulated = False

  def __init__(self):
    self._t0 = time.perf_counter()

  def reset(self) -> None:
    """Restarts at 0 (e.g. after compiling, so that arrivals count from the run's start)."""
    self._t0 = time.perf_counter()

  def now(self) -> float:
    return time.perf_counter() - self._t0

  def wait_until(self, t: float) -> None:
    delay = t - self.now()
    if delay > 0:
      time.sleep(delay)

  def on_step(self, prefill_tokens: int, decode_batch: int, kv_tokens: int, swap_tokens: int):
    """Real time passes by itself."""


class SimulatedClock:
  """Seconds advanced by ``cost`` per engine step; starts at 0."""

  simulated = True

  def __init__(self, cost: StepCostModel | None = None):
    self.cost = cost if cost is not None else StepCostModel()
    self._now = 0.0

  def now(self) -> float:
    return self._now

  def wait_until(self, t: float) -> None:
    self._now = max(self._now, float(t))

  def on_step(self, prefill_tokens: int, decode_batch: int, kv_tokens: int, swap_tokens: int):
    self._now += self.cost.seconds(prefill_tokens, decode_batch, kv_tokens, swap_tokens)
