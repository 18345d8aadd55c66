"""Progress lines for long runs, through absl logging (rate-limited, with an ETA)."""

from __future__ import annotations

import time

from absl import logging


class Progress:
  """Logs ``desc: done/total (pct) elapsed, eta`` at most every ``every_s`` seconds.

  Usage::

    progress = Progress("paged bs=16", total=num_steps)
    for step in ...:
      ...
      progress.update()
    progress.done()
  """

  def __init__(self, desc: str, total: int | None = None, every_s: float = 5.0):
    self.desc = desc
    self.total = total
    self.every_s = every_s
    self.count = 0
    self._start = time.perf_counter()
    self._last = self._start

  def update(self, n: int = 1) -> None:
    self.count += n
    now = time.perf_counter()
    if now - self._last >= self.every_s:
      self._last = now
      logging.info("%s", self._line(now))

  def done(self) -> float:
    """Logs the final line and returns the elapsed seconds."""
    now = time.perf_counter()
    logging.info("%s (done)", self._line(now))
    return now - self._start

  def _line(self, now: float) -> str:
    elapsed = now - self._start
    if self.total:
      frac = min(self.count / self.total, 1.0)
      eta = elapsed / frac - elapsed if frac > 0 else float("nan")
      return (
        f"{self.desc}: {self.count}/{self.total} ({100 * frac:.0f}%) "
        f"{elapsed:.1f}s elapsed, eta {eta:.1f}s"
      )
    return f"{self.desc}: {self.count} {elapsed:.1f}s elapsed"
