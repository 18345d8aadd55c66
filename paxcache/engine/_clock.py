"""The engine's clocks: request arrivals, first tokens and finishes are stamped on one.

* :class:`WallClock`: real seconds since the clock started (or was reset); waiting for an
  arrival sleeps. With ``exclude_compile=True`` it stops while JAX traces, lowers and
  compiles (the durations JAX reports through :mod:`jax.monitoring`), so that a shape met
  for the first time during a measured run does not count as serving latency.
* :class:`SimulatedClock`: seconds that advance only by the step-cost model's cost of each
  step the engine runs (and jump to the next arrival when the engine is idle), so that a
  run is reproducible and needs no device.
"""

from __future__ import annotations

import threading
import time

import jax

from paxcache.engine._cost import StepCostModel

# The events JAX records for the work of making one top-level jitted call runnable: tracing
# to a jaxpr (recorded for top-level traces only), lowering to MLIR, and the backend compile
# (which includes a persistent-cache read). The three are sequential, never nested.
COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)

_compile_lock = threading.Lock()
_compile_total = [0.0]
_listening = [False]


def _on_duration(event: str, duration: float, **kwargs) -> None:
  del kwargs
  if event in COMPILE_EVENTS:
    with _compile_lock:
      _compile_total[0] += float(duration)


def compile_seconds() -> float:
  """Seconds this process has spent tracing, lowering and compiling since the first call.

  Registers one process-wide :mod:`jax.monitoring` listener on first use (listeners cannot
  be removed, so there is only ever one)."""
  with _compile_lock:
    if not _listening[0]:
      jax.monitoring.register_event_duration_secs_listener(_on_duration)
      _listening[0] = True
    return _compile_total[0]


class WallClock:
  """Seconds since construction or :meth:`reset` (``time.perf_counter``).

  Args:
    exclude_compile: stop the clock while JAX compiles (:func:`compile_seconds`): the time
      reads as if every compile had taken no time. Arrivals are stamped on the same clock,
      so a run keeps its arrival pattern; the compiles still take real time, they are only
      not charged to the requests. Reported by ``excluded_s``.
  """

  simulated = False

  def __init__(self, *, exclude_compile: bool = False):
    self.exclude_compile = bool(exclude_compile)
    self._t0 = time.perf_counter()
    self._c0 = compile_seconds() if self.exclude_compile else 0.0
    self._last = 0.0

  def reset(self) -> None:
    """Restarts at 0 (e.g. after compiling, so that arrivals count from the run's start)."""
    self._t0 = time.perf_counter()
    self._c0 = compile_seconds() if self.exclude_compile else 0.0
    self._last = 0.0

  @property
  def excluded_s(self) -> float:
    """Compile seconds left off the clock since it started or was reset."""
    return compile_seconds() - self._c0 if self.exclude_compile else 0.0

  def now(self) -> float:
    t = time.perf_counter() - self._t0 - self.excluded_s
    # A compile's duration is reported when it ends; never let the clock run backwards.
    self._last = max(self._last, t)
    return self._last

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
