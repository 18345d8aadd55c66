"""A step-cost model: how long one engine step takes, from what the step computes.

Two forms (``fit_step_cost(form=...)``):

* ``"linear"`` (the presets): ``step_ms = base_ms + prefill_ms * prefill_tokens
  + decode_ms * decode_batch + kv_ms * kv_tokens + swap_ms * swap_tokens``;
* ``"bucketed"``: the fixed cost is one constant per padded batch size instead of
  ``base_ms``: ``step_ms = bucket_ms[bucket(rows)] + prefill_ms * prefill_tokens
  + kv_ms * kv_tokens + swap_ms * swap_tokens`` with ``rows = decode_batch + 1`` for a step
  with prefill tokens (at least one prefill row), else ``decode_batch``, and ``bucket`` the
  engine's power-of-two padding (``paxcache.block_table.bucket_size``, at least
  ``min_bucket``). The engine compiles one step per padded shape, and a padded shape's
  launches and kernel sizes are fixed whatever the rows inside it: on a GPU, where a small
  model's step is launch- and host-bound, that fixed cost is most of the step.
  (:class:`StepCostModel` adds ``base_ms`` and ``decode_ms * decode_batch`` to it as well;
  a bucketed fit sets both to 0.)

* ``prefill_tokens``: query tokens of rows with more than one new token (prompt chunks,
  recomputation of preempted requests);
* ``decode_batch``: rows with exactly one new token;
* ``kv_tokens``: K/V tokens the step's attention reads (the sum over rows of each row's
  context length after the step);
* ``swap_tokens``: token slots of the blocks copied between the device and the host pool
  (blocks times block size: the bytes moved; not fitted, since the measured steps of a
  run without preemption do not determine it; set it by hand).

The coefficients are fitted by non-negative least squares (:func:`fit_step_cost`) to
measured steps, records ``{"prefill_tokens", "decode_batch", "kv_tokens", "step_ms"}``
(:func:`step_record` makes one from the engine's ``StepMetrics``), on the absolute error
(``loss="absolute"``) or on the relative error (``loss="relative"``: each step weighted by
``1 / step_ms``, what the reported median relative error measures). A held-out part of the
records, fixed by a seed (:func:`split_records`), reports the fit's median relative error.

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
FORMS = ("linear", "bucketed")
LOSSES = ("absolute", "relative")


def _bucket(n: int, minimum: int) -> int:
  """The engine's padded size for ``n`` rows (``paxcache.block_table.bucket_size``)."""
  return 1 << (max(int(n), minimum) - 1).bit_length()


def _is_number(v) -> bool:
  return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class StepCostModel:
  """Step time in milliseconds from what the step computes (see the module docstring).

  The default is the **CPU default**: a constant 1 ms per computed token (prefill token
  or decode row), no fixed cost and nothing for K/V reads or swaps -- what a small model
  on a CPU, which is compute bound and gains nothing from batching, looks like to first
  order. It is a stated assumption, not a measurement; fit a model to measured steps
  (:func:`fit_step_cost`) for a device whose steps batch.

  ``bucket_ms`` (the ``"bucketed"`` form; empty for the linear one): ``(padded rows, ms)``
  pairs, the fixed cost of a step by its padded batch (rows padded to a power of two, at
  least ``min_bucket``), added to ``base_ms``. A step whose padded batch has no pair takes
  the pair of the nearest padded batch that has one (on a log scale; the larger on a tie):
  sizes the fit never saw are not extrapolated. Raising ``min_bucket`` above the fit's
  charges an engine that pads more (``EngineConfig.min_batch_bucket``).
  """

  base_ms: float = 0.0
  prefill_ms: float = 1.0
  decode_ms: float = 1.0
  kv_ms: float = 0.0
  swap_ms: float = 0.0
  name: str = "cpu_default"
  bucket_ms: tuple[tuple[int, float], ...] = ()
  min_bucket: int = 8

  def __post_init__(self):
    for f in ("base_ms", "prefill_ms", "decode_ms", "kv_ms", "swap_ms"):
      v = getattr(self, f)
      if not _is_number(v) or v < 0:
        raise ValueError(f"StepCostModel.{f} must be a finite number >= 0, got {v!r}")
    m = self.min_bucket
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
      raise ValueError(f"StepCostModel.min_bucket must be an int >= 1, got {m!r}")
    # Pairs may come back from JSON as lists: keep them as a hashable tuple of tuples.
    pairs = tuple(tuple(p) for p in self.bucket_ms)
    sizes = [p[0] if len(p) == 2 else None for p in pairs]
    for p, size in zip(pairs, sizes, strict=True):
      if (
        len(p) != 2
        or isinstance(size, bool)
        or not isinstance(size, int)
        or size < 1
        or size & (size - 1)
        or not _is_number(p[1])
        or p[1] < 0
      ):
        raise ValueError(
          f"StepCostModel.bucket_ms: each pair must be (a power of two, a finite ms >= 0), "
          f"got {p!r}"
        )
    if sizes != sorted(set(sizes)):
      raise ValueError(f"StepCostModel.bucket_ms: padded sizes must increase, got {sizes}")
    object.__setattr__(self, "bucket_ms", pairs)

  def fixed_ms(self, prefill_tokens: int, decode_batch: int) -> float:
    """The step's fixed cost: ``base_ms``, plus its padded batch's ``bucket_ms``."""
    if not self.bucket_ms:
      return self.base_ms
    size = _bucket(decode_batch + (1 if prefill_tokens else 0), self.min_bucket)
    # The nearest fitted size on a log scale, the larger on a tie.
    _, ms = min(self.bucket_ms, key=lambda p: (abs(math.log2(p[0] / size)), -p[0]))
    return self.base_ms + ms

  def step_ms(
    self, prefill_tokens: int, decode_batch: int, kv_tokens: int, swap_tokens: int = 0
  ) -> float:
    return (
      self.fixed_ms(prefill_tokens, decode_batch)
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


def split_records(
  records: Sequence[Mapping], heldout_fraction: float = 0.2, seed: int = 0
) -> tuple[list, list]:
  """``(train, heldout)``: a seeded random ``heldout_fraction`` of ``records`` (at least one)
  held out, the rest to fit; the same records and seed always give the same split."""
  records = list(records)
  if not 0 < heldout_fraction < 1:
    raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
  if len(records) < 5:
    raise ValueError(f"need at least 5 step records to fit and hold out, got {len(records)}")
  order = np.random.default_rng(seed).permutation(len(records))
  n_test = max(1, int(round(heldout_fraction * len(records))))
  return [records[i] for i in order[n_test:]], [records[i] for i in order[:n_test]]


def fit_model(
  records: Iterable[Mapping],
  *,
  form: str = "linear",
  loss: str = "absolute",
  swap_ms: float = 0.0,
  min_bucket: int = 8,
  name: str = "fitted",
) -> StepCostModel:
  """A model of ``form`` fitted to all of ``records`` (non-negative least squares on the
  ``loss``); see the module docstring. ``"bucketed"`` fits one fixed cost per padded batch
  size present in the records, ``prefill_ms`` and ``kv_ms`` (``decode_ms`` is 0: within a
  padded shape a row costs its K/V reads)."""
  if form not in FORMS:
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
  data = _check_records(list(records))
  if not len(data):
    raise ValueError("no step records to fit")
  p, d, kv, y = data.T
  if form == "linear":
    design = np.column_stack([np.ones(len(data)), p, d, kv])
  else:
    size = np.array([_bucket(n, min_bucket) for n in d + (p > 0)])
    sizes = sorted(set(size.tolist()))
    design = np.column_stack([(size == s).astype(np.float64) for s in sizes] + [p, kv])
  if loss == "relative":
    if (y <= 0).any():
      raise ValueError("loss='relative' needs every step_ms > 0 (it divides by it)")
    w = 1.0 / y
    coef = _nonneg_lstsq(design * w[:, None], y * w)
  else:
    coef = _nonneg_lstsq(design, y)
  coef = [float(c) for c in coef]
  if form == "linear":
    return StepCostModel(*coef, swap_ms=swap_ms, name=name)
  n = len(sizes)
  return StepCostModel(
    base_ms=0.0,
    prefill_ms=coef[n],
    decode_ms=0.0,
    kv_ms=coef[n + 1],
    swap_ms=swap_ms,
    name=name,
    bucket_ms=tuple(zip(sizes, coef[:n], strict=True)),
    min_bucket=min_bucket,
  )


def median_rel_error(model: StepCostModel, records: Iterable[Mapping]) -> float:
  """Median over ``records`` of ``|predicted - measured| / measured``."""
  data = _check_records(list(records))
  measured = data[:, -1]
  if not len(data) or (measured <= 0).any():
    raise ValueError("need step records with step_ms > 0: relative error is undefined")
  predicted = np.array([model.step_ms(*map(int, row[: len(FEATURES)])) for row in data])
  return float(np.median(np.abs(predicted - measured) / measured))


def fit_step_cost(
  records: Iterable[Mapping],
  *,
  heldout_fraction: float = 0.2,
  seed: int = 0,
  swap_ms: float = 0.0,
  name: str = "fitted",
  form: str = "linear",
  loss: str = "absolute",
  min_bucket: int = 8,
) -> FitReport:
  """Fits a model (:func:`fit_model`) to the training part of ``records``
  (:func:`split_records`: a seeded random ``1 - heldout_fraction``); reports the median
  relative error on the rest.

  Raises ``ValueError`` for a bad record, fewer than 5 records, a held-out fraction outside
  (0, 1), an unknown form or loss, or a held-out step measured at 0 ms.
  """
  train, test = split_records(list(records), heldout_fraction, seed)
  _check_records(test)
  if any(r["step_ms"] <= 0 for r in test):
    raise ValueError("a held-out step record has step_ms <= 0: relative error is undefined")
  model = fit_model(train, form=form, loss=loss, swap_ms=swap_ms, min_bucket=min_bucket, name=name)
  return FitReport(model, len(train), len(test), median_rel_error(model, test))
