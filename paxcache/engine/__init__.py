"""Continuous-batching engine over the paged KV cache (host scheduling, one jitted step).

See docs/engine.md for the step as data, the scheduling policy, preemption modes and
metrics.
"""

from paxcache.engine._batch import StepBatch, build_step_batch
from paxcache.engine._engine import PREEMPTION_MODES, Engine, EngineConfig, device_step
from paxcache.engine._metrics import RunMetrics, StepMetrics
from paxcache.engine._request import Request, RequestError, RequestOutput
from paxcache.engine._sampling import sample_tokens
from paxcache.engine._scheduler import Scheduler

__all__ = [
  "PREEMPTION_MODES",
  "Engine",
  "EngineConfig",
  "Request",
  "RequestError",
  "RequestOutput",
  "RunMetrics",
  "Scheduler",
  "StepBatch",
  "StepMetrics",
  "build_step_batch",
  "device_step",
  "sample_tokens",
]
