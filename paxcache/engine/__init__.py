"""Continuous-batching engine over the paged KV cache (host scheduling, one jitted step).

See docs/engine.md for the step as data, the scheduling policy, preemption modes and
metrics.
"""

from paxcache.engine._batch import StepBatch, build_step_batch
from paxcache.engine._clock import SimulatedClock, WallClock
from paxcache.engine._cost import (
  CPU_DEFAULT,
  OPT13B_A100_ROOFLINE,
  FitReport,
  StepCostModel,
  fit_step_cost,
  load_step_records,
  step_record,
)
from paxcache.engine._decode_plan import DECODE_PLAN_MODES, DecodePlanner
from paxcache.engine._distributed import DistributedEngine, DivergenceError
from paxcache.engine._engine import (
  PREEMPTION_MODES,
  Engine,
  EngineConfig,
  SimulatedEngine,
  device_step,
)
from paxcache.engine._metrics import RunMetrics, StepMetrics
from paxcache.engine._request import Request, RequestError, RequestMetrics, RequestOutput
from paxcache.engine._reservation import RESERVATION_POLICIES, reservation_blocks
from paxcache.engine._router import Router, RouterMetrics, allgather_exchange
from paxcache.engine._sampling import sample_tokens
from paxcache.engine._scheduler import Scheduler
from paxcache.engine._warmup import (
  StepShape,
  WarmupReport,
  compile_step_shapes,
  step_shapes,
  unwarmed_shapes,
)

__all__ = [
  "CPU_DEFAULT",
  "DECODE_PLAN_MODES",
  "OPT13B_A100_ROOFLINE",
  "PREEMPTION_MODES",
  "RESERVATION_POLICIES",
  "FitReport",
  "RequestMetrics",
  "SimulatedClock",
  "SimulatedEngine",
  "StepCostModel",
  "WallClock",
  "fit_step_cost",
  "load_step_records",
  "reservation_blocks",
  "step_record",
  "DecodePlanner",
  "DistributedEngine",
  "DivergenceError",
  "Engine",
  "EngineConfig",
  "Request",
  "RequestError",
  "RequestOutput",
  "Router",
  "RouterMetrics",
  "RunMetrics",
  "Scheduler",
  "StepBatch",
  "StepMetrics",
  "allgather_exchange",
  "build_step_batch",
  "device_step",
  "sample_tokens",
  "StepShape",
  "WarmupReport",
  "compile_step_shapes",
  "step_shapes",
  "unwarmed_shapes",
]
