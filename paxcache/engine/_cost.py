"""A linear step-cost model: how long one engine step takes, from what the step computes.

``step_ms = base_ms + prefill_ms * prefill_tokens + decode_ms * decode_batch
+ kv_ms * kv_tokens + swap_ms * swap_tokens``

* ``prefill_tokens``: query tokens of rows with more than one new token (prompt chunks,
  recomputation of preempted requests);
* ``decode_batch``: rows with exactly one new token;
* ``kv_tokens``: K/V tokens the step's attention reads (the sum over rows of each row's
  context length after the step);
* ``swap_tokens``: token slots of the blocks copied between the device and the host pool
  (blocks times block size: the bytes moved; not fitted, since the measured steps of a
  run without preemption do not determine it; set it by hand).

The first four coefficients are fitted by least squares (:func:`fit_step_cost`) to
measured steps, records ``{"prefill_tokens", "decode_batch", "kv_tokens", "step_ms"}``
(:func:`step_record` makes one from the engine's ``StepMetrics``). A linear model is what
a GPU step looks like at first order: a fixed cost (weights read once per step, launch
overheads), a cost per token computed and a cost per K/V token read; it cannot express a
roofline's max(compute, memory), so its error is reported on held-out steps.

It lives in ``paxcache.engine`` (not ``experiments``) because the engine's simulated clock
uses it and the library must not import the experiments; the request-rate experiment and
the serving simulation both import it from here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

FEATURES = ("prefill_tokens", "decode_batch", "kv_tokens")


@dataclasses.dataclass(frozen=True)
class StepCostModel:
  """Step time in milliseconds, linear in what the step computes (see the module docstring).

  The default is the **CPU default**: a constant 1 ms per computed token (prefill token
  or decode row), no fixed cost and nothing for K/V reads or swaps -- what a small model
  on a CPU, which is compute bound and gains nothing from batching, looks like to first
  order. It is a stated assumption, not a measurement; fit a model to measured steps
  (:func:`fit_step_cost`) for a device whose steps batch.
  """

  base_ms: float = 0.0
  prefill_ms: float = 1.0
  decode_ms: float = 1.0
  kv_ms: float = 0.0
  swap_ms: float = 0.0
  name: str = "cpu_default"

  def __post_init__(self):
    for f in ("base_ms", "prefill_ms", "decode_ms", "kv_ms", "swap_ms"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise ValueError(f"StepCostModel.{f} must be a finite number >= 0, got {v!r}")

  def step_ms(
    self, prefill_tokens: int, decode_batch: int, kv_tokens: int, swap_tokens: int = 0
  ) -> float:
    return (
      self.base_ms
      + self.prefill_ms * prefill_tokens
      + self.decode_ms * decode_batch
      + self.kv_ms * kv_tokens
      + self.swap_ms * swap_tokens
    )

  def seconds(
    self, prefill_tokens: int, decode_batch: int, kv_tokens: int, swap_tokens: int = 0
  ) -> float:
    return self.step_ms(prefill_tokens, decode_batch, kv_tokens, swap_tokens) / 1e3

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


CPU_DEFAULT = StepCostModel()

# A roofline estimate, not a fit, for OPT-13B in fp16 on an A100 (the paper's Fig. 12
# setting): 26 GB of weights read once per step at ~1.5 TB/s (~17 ms); 2 x 13e9 FLOPs per
# token at ~200 TFLOP/s sustained (~0.13 ms per token, prefill or decode); 800 KB of K/V
# per token (40 layers x 2 x 5120 x 2 bytes) read at ~1.5 TB/s (~0.53 us per token read);
# a swapped token (800 KB) over PCIe 4 at ~25 GB/s (~0.032 ms). Summing the
# terms instead of taking the roofline's max overestimates mid-size batches.
OPT13B_A100_ROOFLINE = StepCostModel(
  base_ms=17.0,
  prefill_ms=0.13,
  decode_ms=0.13,
  kv_ms=0.00053,
  swap_ms=0.032,
  name="opt13b_a100_roofline",
)

PRESETS = {m.name: m for m in (CPU_DEFAULT, OPT13B_A100_ROOFLINE)}


@dataclasses.dataclass(frozen=True)
class FitReport:
  """How well a fitted model predicts steps it was not fitted to."""

  model: StepCostModel
  train_records: int
  heldout_records: int
  median_rel_error: float  # median over held-out steps of |predicted - measured| / measured


def step_record(step) -> dict:
  """A fitting record from an engine ``StepMetrics`` (its wall time in ms)."""
  return {
    "prefill_tokens": int(step.num_prefill_tokens),
    "decode_batch": int(step.decode_batch),
    "kv_tokens": int(step.kv_tokens),
    "step_ms": float(step.seconds) * 1e3,
  }


def _check_records(records: Sequence[Mapping]) -> np.ndarray:
  rows = []
  for i, r in enumerate(records):
    if not isinstance(r, Mapping):
      raise ValueError(f"step record {i} is not a mapping: {r!r:.80}")
    missing = [k for k in (*FEATURES, "step_ms") if k not in r]
    if missing:
      raise ValueError(f"step record {i} lacks {missing}: {dict(r)!r:.120}")
    row = [r[k] for k in (*FEATURES, "step_ms")]
    if any(
      isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0
      for v in row
    ):
      raise ValueError(f"step record {i} has a value that is not a finite number >= 0: {row}")
    rows.append(row)
  return np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURES) + 1)


def load_step_records(path: str) -> list[dict]:
  """Reads JSON lines of step records (blank lines skipped); checks every field."""
  records = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
  _check_records(records)
  return records


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Least squares with coefficients >= 0: refit without any column that came out negative
  (a step cannot get cheaper with more work), until none does."""
  active = list(range(x.shape[1]))
  coef = np.zeros(x.shape[1])
  while active:
    sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
    if (sol >= 0).all():
      coef[active] = sol
      break
    active = [c for c, v in zip(active, sol, strict=True) if v > 0]
  return coef


def fit_step_cost(
  records: Iterable[Mapping],
  *,
  heldout_fraction: float = 0.2,
  seed: int = 0,
  swap_ms: float = 0.0,
  name: str = "fitted",
) -> FitReport:
  """Fits ``base_ms``, ``prefill_ms``, ``decode_ms`` and ``kv_ms`` (non-negative least
  squares, NumPy) to a random ``1 - heldout_fraction`` of ``records``; reports the median
  relative error on the rest.

  Raises ``ValueError`` for a bad record, fewer than 5 records, a held-out fraction outside
  (0, 1), or a held-out step measured at 0 ms.
  """
  data = _check_records(list(records))
  if not 0 < heldout_fraction < 1:
    raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
  if len(data) < 5:
    raise ValueError(f"need at least 5 step records to fit and hold out, got {len(data)}")
  order = np.random.default_rng(seed).permutation(len(data))
  n_test = max(1, int(round(heldout_fraction * len(data))))
  test, train = data[order[:n_test]], data[order[n_test:]]
  design = np.column_stack([np.ones(len(train)), train[:, : len(FEATURES)]])
  coef = _nonneg_lstsq(design, train[:, -1])
  model = StepCostModel(*map(float, coef), swap_ms=swap_ms, name=name)
  measured = test[:, -1]
  if (measured <= 0).any():
    raise ValueError("a held-out step record has step_ms <= 0: relative error is undefined")
  predicted = np.array([model.step_ms(*row[: len(FEATURES)]) for row in test])
  err = float(np.median(np.abs(predicted - measured) / measured))
  return FitReport(model, len(train), n_test, err)
