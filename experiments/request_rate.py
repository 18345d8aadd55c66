"""Experiment 2f: latency against request rate, paged against the Orca baselines (issue 14).

The vLLM paper's headline result (Kwon et al., SOSP 2023, Figs. 12-13): requests arrive as
a Poisson process; the figure plots **normalized latency**, the mean over requests of
``(finish - arrival) / output tokens`` (s/token), against the request rate, one line per
system. Here every system is the same engine (:mod:`paxcache.engine`) with a different
``EngineConfig.reservation``: ``paged`` (blocks on demand), ``orca_max``, ``orca_pow2``,
``orca_oracle`` (contiguous reservation of the max length, prompt + next power of two of
the output, or the exact final length, at admission; no sharing). They differ only in
memory management.

Arrivals
--------
As in the paper's artifact, time is cut in 10 ms slots and each slot receives a Poisson
number of arrivals with mean ``rate * 0.01`` (all at the slot's start), until
``num_requests`` have arrived, or with ``trace_s > 0`` ``rate * trace_s`` requests (a trace
of about ``trace_s`` seconds at every rate, as the paper's fixed-duration traces: past
capacity every system's queue then grows for the same time); seeded, so every system sees
the same trace at a rate. Lengths come from :mod:`experiments.workloads` (``sharegpt``,
``alpaca`` or a ShareGPT JSON file; with ``trace_s`` the first ones of one list, the same
at every rate); a request's output length is its ``max_new_tokens`` with no end token.

Parallel sampling (the paper's Fig. 14a): with ``num_samples`` = ``(2, 4, 6)`` each request
asks for that many samples (``Request.n``, sampled at temperature 1; a run per value): the
prompt is computed once and forked, paged systems share its blocks (and swap a preempted
group's shared blocks once), Orca systems reserve ``n`` contiguous ranges. A request's
normalized latency divides by its output tokens over all samples
(:attr:`paxcache.engine.RequestMetrics.normalized_latency`), so values at different ``n``
are not comparable with each other, only systems at one ``n``.

Each system sweeps ``rates`` (or its own ``system_rates[system]``) in ascending order;
``stop_past_bound`` ends a system's sweep at its first rate past ``latency_bound``, and
``max_wall_s`` starts no new run after that many seconds (both noted in the outputs).

Clocks
------
``clock="simulated"``: :class:`paxcache.engine.SimulatedEngine` runs the scheduler and the
allocator for real but no model; the clock advances by a step-cost model per step
(``cost_model``: a preset of :mod:`paxcache.engine._cost`, or a fit to the measured step
records of ``step_records``, JSON lines ``{prefill_tokens, decode_batch, kv_tokens,
step_ms}``, in the ``cost_form`` and ``cost_loss`` given, whose held-out median relative
error is reported; a bucketed model charges the padded batch at least
``min_batch_bucket``, as the engine pads). ``clock="wall"``: the real
engine over the tiny packaged model (its 512-token context bounds ``max_seq_len``) or a
named shape (``model``), after a warm-up; meant for a device run. With ``warmup_shapes``
every padded step shape the engine can meet is compiled before its clock starts
(:func:`paxcache.engine.compile_step_shapes`, ``warmup_threads`` at a time; the padding
floors ``min_batch_bucket``, ``min_token_bucket``, ``min_blocks_bucket`` bound their
number), and each row reports ``unwarmed_shapes``, the shapes met that were not.

Outputs
-------
Table ``request_rate`` (one row per workload, system, block size, preemption mode, samples
per request and rate): normalized latency, TTFT and time-per-output-token p50/p99,
preemptions, batch.
Table ``sustainable_rate``: each system's highest rate whose normalized latency stays
within ``latency_bound`` (linear interpolation between the swept rates; ``censored`` when
even the highest swept rate stays within it) and its ratio to every other system.
Plots: normalized latency against rate, one line per system (one plot per workload, block
size, preemption mode and samples per request); with one rate and several block sizes
(Figs. 18-19) against block size instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np
from ml_collections import ConfigDict

from experiments import _engine_bench, _outputs
from experiments._cost_config import check_cost_config, step_cost
from experiments._progress import Progress
from experiments.workloads import workload_label, workload_lengths
from paxcache.engine import (
  PREEMPTION_MODES,
  EngineConfig,
  Request,
  RequestMetrics,
  SimulatedClock,
  SimulatedEngine,
  StepCostModel,
  WallClock,
)

SYSTEMS = {"paged": "paged", "orca_max": "max", "orca_pow2": "pow2", "orca_oracle": "oracle"}
LABELS = {
  "paged": "paged (vLLM)",
  "orca_max": "Orca (Max)",
  "orca_pow2": "Orca (Pow2)",
  "orca_oracle": "Orca (Oracle)",
}
CLOCKS = ("simulated", "wall")
SLOT_S = 0.01  # the paper's artifact draws arrivals per 10 ms slot


def poisson_arrivals(rate: float, num_requests: int, rng: np.random.Generator) -> np.ndarray:
  """Arrival times (s) of ``num_requests`` requests: Poisson counts per 10 ms slot."""
  if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate):
    raise ValueError(f"rate must be a finite number of requests/s, got {rate!r}")
  if rate <= 0:
    raise ValueError(f"rate must be > 0 requests/s, got {rate!r}")
  if num_requests < 0:
    raise ValueError(f"num_requests must be >= 0, got {num_requests}")
  times, have, slot0 = [], 0, 0
  while have < num_requests:
    n_slots = max(1024, int(2 * (num_requests - have) / (rate * SLOT_S)) + 1)
    counts = rng.poisson(rate * SLOT_S, size=n_slots)
    slots = np.repeat(np.arange(slot0, slot0 + n_slots), counts)
    times.append(slots * SLOT_S)
    have += len(slots)
    slot0 += n_slots
  return np.concatenate(times + [np.zeros(0)])[:num_requests]


def percentile(values, q: float) -> float:
  return float(np.percentile(values, q)) if len(values) else float("nan")


def summarize(metrics: list[RequestMetrics], warmup_s: float = 0.0) -> dict:
  """The paper's normalized latency and the serving benchmarks' TTFT / TPOT percentiles
  over the requests that arrived at or after ``warmup_s``."""
  kept = [m for m in metrics if m.arrival_time >= warmup_s]
  if not kept:
    raise ValueError(f"no request arrived after warmup_s={warmup_s}: lower it")
  ttft = [m.ttft for m in kept]
  tpot = [m.tpot for m in kept if m.output_tokens > 1]
  return {
    "normalized_latency": float(np.mean([m.normalized_latency for m in kept])),
    "ttft_p50": percentile(ttft, 50),
    "ttft_p99": percentile(ttft, 99),
    "tpot_p50": percentile(tpot, 50),
    "tpot_p99": percentile(tpot, 99),
    "requests": len(kept),
    "preemptions": sum(m.preemptions_swap + m.preemptions_recompute for m in kept),
  }


def sustainable_rate(rates, latencies, bound: float) -> tuple[float, bool]:
  """The highest rate with normalized latency <= ``bound``, interpolated linearly where the
  latency curve crosses the bound; ``(rate, censored)`` with ``censored`` True when the
  highest swept rate is still within the bound (the true rate is higher) and 0.0 when even
  the lowest is over it."""
  pts = sorted(zip(rates, latencies, strict=True))
  if pts[0][1] > bound:
    return 0.0, False
  for (r0, l0), (r1, l1) in zip(pts, pts[1:], strict=False):
    if l1 > bound:
      return r0 + (r1 - r0) * (bound - l0) / (l1 - l0), False
  return pts[-1][0], True


def _is_rate(r) -> bool:
  return not isinstance(r, bool) and isinstance(r, int | float) and math.isfinite(r) and r > 0


def check_config(config: ConfigDict) -> None:
  """Raises ``ValueError`` naming the first bad field."""
  rates = tuple(config.rates)
  if not rates:
    raise ValueError("--config.rates needs at least one rate (requests/s)")
  if not all(_is_rate(r) for r in rates):
    raise ValueError(f"--config.rates={rates!r}: every rate must be a finite number > 0")
  bad = [s for s in config.systems if s not in SYSTEMS]
  if not config.systems or bad:
    raise ValueError(f"--config.systems={config.systems!r}: pick from {sorted(SYSTEMS)}")
  per = config.get("system_rates", None) or {}
  for system, rs in per.items():
    if system not in SYSTEMS:
      raise ValueError(f"--config.system_rates.{system}: not a system; pick from {sorted(SYSTEMS)}")
    rs = tuple(rs)
    if not rs or not all(_is_rate(r) for r in rs):
      raise ValueError(
        f"--config.system_rates.{system}={rs!r}: at least one rate, each a finite number > 0"
      )
  for field in ("stop_past_bound", "warmup_shapes"):
    if not isinstance(config.get(field, False), bool):
      raise ValueError(f"--config.{field}={config.get(field)!r} must be True or False")
  trace_s = config.get("trace_s", 0.0)
  if (
    isinstance(trace_s, bool) or not isinstance(trace_s, int | float) or not 0 <= trace_s < math.inf
  ):
    raise ValueError(f"--config.trace_s={trace_s!r} must be a number >= 0 (0: num_requests)")
  budget = config.get("max_wall_s", 0.0)
  if isinstance(budget, bool) or not isinstance(budget, int | float) or not budget >= 0:
    raise ValueError(f"--config.max_wall_s={budget!r} must be a number >= 0 (0: no limit)")
  for field in ("warmup_threads", "min_batch_bucket", "min_token_bucket", "min_blocks_bucket"):
    v = config.get(field, 1)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"--config.{field}={v!r} must be an int >= 1")
  ns = tuple(config.get("num_samples", (1,)))
  if not ns or not all(not isinstance(n, bool) and isinstance(n, int) and n >= 1 for n in ns):
    raise ValueError(f"--config.num_samples={ns!r}: at least one value, each an int >= 1")
  if max(ns) > config.max_num_seqs:
    raise ValueError(
      f"--config.num_samples={ns!r}: {max(ns)} samples can never be resident at once "
      f"(max_num_seqs={config.max_num_seqs})"
    )
  bad = [m for m in config.preemption_modes if m not in PREEMPTION_MODES]
  if not config.preemption_modes or bad:
    raise ValueError(
      f"--config.preemption_modes={config.preemption_modes!r}: pick from {PREEMPTION_MODES}"
    )
  if not config.workloads:
    raise ValueError("--config.workloads needs at least one workload")
  if config.clock not in CLOCKS:
    raise ValueError(f"--config.clock={config.clock!r}: one of {CLOCKS}")
  if config.get("distributed", False) and config.clock != "wall":
    raise ValueError(
      "--config.distributed=True runs the real engine over several processes: it needs "
      f"--config.clock=wall, not {config.clock!r}"
    )
  if not config.latency_bound > 0:
    raise ValueError(f"--config.latency_bound={config.latency_bound!r} must be > 0 s/token")
  if config.warmup_s < 0:
    raise ValueError(f"--config.warmup_s={config.warmup_s!r} must be >= 0")
  if config.max_seq_len < 2:
    raise ValueError(f"--config.max_seq_len={config.max_seq_len!r} must be >= 2")
  check_cost_config(config)
  n = max(ns)
  for b in config.block_sizes:
    if config.pool_tokens // b < n * -(-config.max_seq_len // b):
      raise ValueError(
        f"--config.pool_tokens={config.pool_tokens} holds {config.pool_tokens // b} blocks of "
        f"{b}, fewer than one max_seq_len={config.max_seq_len} request of {n} sample"
        f"{'s' if n > 1 else ''} needs"
      )


def engine_config(config: ConfigDict, system: str, block_size: int, mode: str) -> EngineConfig:
  num_blocks = config.pool_tokens // block_size
  paged = system == "paged"
  return EngineConfig(
    num_blocks=num_blocks,
    block_size=block_size,
    num_host_blocks=max(1, config.host_pool_tokens // block_size),
    preemption_mode=mode,
    enable_prefix_caching=False,
    max_num_seqs=config.max_num_seqs,
    max_num_batched_tokens=config.max_num_batched_tokens,
    # vLLM's 1% watermark for the paged system; a reservation already holds every block.
    watermark_blocks=int(config.watermark * num_blocks) if paged else 0,
    reservation=SYSTEMS[system],
    metrics_history=1,
    async_scheduling=bool(config.get("async_scheduling", False)),
    # Padding floors (EngineConfig's defaults unless a config raises them): fewer padded
    # shapes, so that a wall-clock run can compile them all before its clock starts.
    min_batch_bucket=config.get("min_batch_bucket", 8),
    min_token_bucket=config.get("min_token_bucket", 8),
    min_blocks_bucket=config.get("min_blocks_bucket", 8),
  )


def make_requests(
  lengths: np.ndarray, arrivals: np.ndarray, vocab: int, seed: int, num_samples: int = 1
):
  """One request per (prompt length, output length) pair; ``num_samples > 1`` asks each for
  that many samples at temperature 1 (greedy ones would all be the same)."""
  rng = np.random.default_rng(seed)
  temperature = 1.0 if num_samples > 1 else 0.0
  reqs = []
  for i, ((p, o), t) in enumerate(zip(lengths, arrivals, strict=True)):
    prompt = rng.integers(1, vocab, size=int(p)).tolist()
    reqs.append(
      Request(
        i,
        prompt,
        max_new_tokens=int(o),
        n=num_samples,
        temperature=temperature,
        arrival_time=float(t),
      )
    )
  return reqs


def serve(engine, requests: list[Request], progress: Progress) -> tuple[list, dict]:
  """Runs ``requests`` to completion; returns per-request metrics and engine totals."""
  for r in requests:
    engine.add_request(r)
  out, batches = [], []
  while engine.has_unfinished():
    done = engine.step()
    batches.append(engine.step_metrics[-1].num_seqs)
    out += [o.metrics for o in done]
    progress.update(len(done))
  batches = [b for b in batches if b]
  totals = {
    "steps": engine.metrics.steps,
    "mean_batch": float(np.mean(batches)) if batches else 0.0,
    "max_batch": engine.metrics.max_batch,
    "duration_s": engine.clock.now(),
    # Wall clock only: compile seconds left off the clock (config.exclude_compile).
    "compile_excluded_s": getattr(engine.clock, "excluded_s", 0.0),
  }
  return out, totals


def _wall_engine_factory(config: ConfigDict):
  """A real engine over ``config.model`` (the packaged tiny model, or a random-weight
  decoder of a named shape of ``experiments.bench.engine_step``). Before its clock starts,
  each engine compiles every step shape it can meet (``config.warmup_shapes``:
  :func:`paxcache.engine.compile_step_shapes`; engines over the same model share the
  compiled steps, so only the first engine of a configuration pays) and runs
  ``config.warmup_requests`` requests of the trace once (host-side warm-up)."""
  import jax

  from paxcache.engine import compile_step_shapes, unwarmed_shapes

  name = config.get("model", "tiny")
  if name == "tiny":
    from paxcache.nn import load_decoder

    model = load_decoder()
  else:
    from experiments.bench import engine_step

    if name not in engine_step.MODELS:
      raise ValueError(f"--config.model={name!r}: 'tiny' or one of {sorted(engine_step.MODELS)}")
    model = engine_step.build_model(name, max_seq_len=max(1024, config.max_seq_len))
  if config.max_seq_len > model.config.max_seq_len:
    raise ValueError(
      f"--config.max_seq_len={config.max_seq_len} exceeds the model's "
      f"{model.config.max_seq_len} (clock='wall' runs the real model)"
    )
  device = jax.devices()[0].device_kind
  distributed = bool(config.get("distributed", False))
  if distributed:
    device += f" x {jax.device_count()} over {jax.process_count()} processes"

  warmups = {}  # shape-relevant engine settings -> WarmupReport
  used = {}  # id(engine) -> the WarmupReport it was warmed with

  def make(cfg: EngineConfig, requests: list[Request]):
    clock = WallClock(exclude_compile=config.get("exclude_compile", True))
    # Distributed: every process adds the same requests (process 0's are served).
    engine = _engine_bench.make_engine(model, cfg, distributed, clock=clock)
    if config.get("warmup_shapes", False):
      key = dataclasses.replace(cfg, reservation="paged", watermark_blocks=0)
      if key not in warmups:
        warmups[key] = compile_step_shapes(engine, threads=config.get("warmup_threads", 1))
        print(
          f"request_rate: compiled {len(warmups[key].shapes)} step shapes in "
          f"{warmups[key].seconds:.1f} s",
          flush=True,
        )
      used[id(engine)] = warmups[key]
    warm = [dataclasses.replace(r, request_id=("warm", r.request_id), arrival_time=None) for r in
            requests[: config.warmup_requests]]  # fmt: skip
    engine.run(warm)
    clock.reset()
    return engine

  def check(engine) -> dict:
    """What a wall row adds: the shape warm-up and whether the run met a shape it missed."""
    w = used.pop(id(engine), None)
    if w is None:
      return {"warmup_shapes": 0, "warmup_compile_s": None, "unwarmed_shapes": None}
    return {
      "warmup_shapes": len(w.shapes),
      "warmup_compile_s": w.seconds,
      "unwarmed_shapes": len(unwarmed_shapes(engine, w)),
    }

  return make, check, model.config.vocab_size, device


def rates_of(config: ConfigDict, system: str) -> tuple[float, ...]:
  """The rates swept for ``system``, ascending: ``config.system_rates[system]`` where the
  config gives one, else ``config.rates``."""
  per = config.get("system_rates", None) or {}
  return tuple(sorted(float(r) for r in per.get(system, config.rates)))


def run(config: ConfigDict) -> _outputs.Result:
  check_config(config)
  cost, fit = step_cost(config)
  floor = config.get("min_batch_bucket", 8)
  if cost.bucket_ms and floor > cost.min_bucket:
    # A bucketed model charges the padded batch: the one this config's engine pads to.
    cost = dataclasses.replace(cost, min_bucket=floor)
  extra = {}
  if config.clock == "simulated":
    vocab = 256
    device = f"cpu (simulated clock: {cost.name})"

    def make(cfg, requests):
      return SimulatedEngine(cfg, max_seq_len=config.max_seq_len, clock=SimulatedClock(cost))

    def check(engine):
      return {}
  else:
    import jax

    make, check, vocab, device = _wall_engine_factory(config)
    # The GPU host may have no git checkout: the lead passes the commit.
    extra = {
      "jax": jax.__version__,
      "commit": os.environ.get("PAXCACHE_COMMIT"),
      "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }

  trace_s = config.get("trace_s", 0.0)
  top = max(r for system in config.systems for r in rates_of(config, system))
  traces = []
  for w in config.workloads:
    n = math.ceil(top * trace_s) if trace_s else config.num_requests
    lengths = workload_lengths(w, n, max_seq_len=config.max_seq_len, seed=config.seed)
    traces.append((workload_label(w), lengths))

  def trace(lengths, rate):
    """The requests' lengths at ``rate``: all of them, or with ``trace_s`` the first
    ``rate * trace_s`` (the same lengths in the same order at every rate)."""
    return lengths[: max(1, round(rate * trace_s))] if trace_s else lengths

  # One sweep per (workload, block size, mode, samples, system): its rates ascending.
  sweeps = [
    (label, lengths, system, bs, mode, n)
    for label, lengths in traces
    for bs in config.block_sizes
    for mode in config.preemption_modes
    for n in config.get("num_samples", (1,))
    for system in config.systems
  ]
  progress = Progress(
    "request_rate",
    total=sum(len(trace(c[1], r)) for c in sweeps for r in rates_of(config, c[2])),
  )
  rows, skipped = [], []
  t_start = time.perf_counter()
  budget = config.get("max_wall_s", 0.0)
  for label, all_lengths, system, bs, mode, n in sweeps:
    for i, rate in enumerate(rates_of(config, system)):
      lengths = trace(all_lengths, rate)
      if budget and time.perf_counter() - t_start > budget:
        skipped.append((label, system, bs, mode, n, rate, "time budget"))
        progress.update(len(lengths))
        continue
      arrivals = poisson_arrivals(rate, len(lengths), np.random.default_rng(config.seed))
      requests = make_requests(lengths, arrivals, vocab, config.seed, n)
      engine = make(engine_config(config, system, bs, mode), requests)
      metrics, totals = serve(engine, requests, progress)
      rows.append(
        {
          "workload": label,
          "system": system,
          "block_size": bs,
          "preemption_mode": mode,
          "num_samples": n,
          "rate": rate,
          "clock": config.clock,
          **summarize(metrics, config.warmup_s),
          **totals,
          **check(engine),
          "cost_model": cost.name if config.clock == "simulated" else None,
          "device": device,
          **extra,
        }
      )
      if config.get("partial_path", ""):
        # Each row as soon as it is measured: a run cut short by a time limit keeps them.
        with open(config.partial_path, "a", encoding="utf-8") as f:
          f.write(json.dumps(rows[-1]) + "\n")
      if config.get("stop_past_bound", False) and rows[-1]["normalized_latency"] > (
        config.latency_bound
      ):
        # Past the bound: the crossing is bracketed, and higher rates only queue longer.
        rest = rates_of(config, system)[i + 1 :]
        skipped += [(label, system, bs, mode, n, r, "past the bound") for r in rest]
        progress.update(sum(len(trace(all_lengths, r)) for r in rest))
        break
  progress.done()
  return _result(config, rows, cost, fit, skipped)


# experiments.run calls it before the workdir is made (a bad system or clock is a usage error).
run.check_config = check_config


# ------------------------------------------------------------------ outputs

ROW_COLUMNS = [
  _outputs.Column("workload"),
  _outputs.Column("system"),
  _outputs.Column("block_size", "block"),
  _outputs.Column("preemption_mode", "preemption"),
  _outputs.Column("num_samples", "n"),
  _outputs.Column("rate", "rate (req/s)", ".3g"),
  _outputs.Column("normalized_latency", "norm. latency (s/token)", ".4f"),
  _outputs.Column("ttft_p50", "TTFT p50 (s)", ".3f"),
  _outputs.Column("ttft_p99", "TTFT p99 (s)", ".3f"),
  _outputs.Column("tpot_p50", "TPOT p50 (s)", ".4f"),
  _outputs.Column("tpot_p99", "TPOT p99 (s)", ".4f"),
  _outputs.Column("mean_batch", "mean batch", ".1f"),
  _outputs.Column("preemptions"),
  _outputs.Column("requests"),
]


def _key(r) -> tuple:
  """A sweep's rows share it: (workload, block size, preemption mode, samples)."""
  return (r["workload"], r["block_size"], r["preemption_mode"], r.get("num_samples", 1))


def _groups(rows):
  return list(dict.fromkeys(_key(r) for r in rows))


def sustainable_rows(rows: list[dict], bound: float, systems) -> list[dict]:
  out = []
  for key in _groups(rows):
    w, bs, mode, n = key
    rates = {}
    for s in systems:
      pts = [r for r in _select(rows, key) if r["system"] == s]
      # One rate says nothing about a crossing, unless it is already past the bound (a
      # sweep stopped there by stop_past_bound): then the rate is below the sweep, 0.
      if len({r["rate"] for r in pts}) < 2 and not (
        pts and all(r["normalized_latency"] > bound for r in pts)
      ):
        continue
      rates[s] = sustainable_rate(
        [r["rate"] for r in pts], [r["normalized_latency"] for r in pts], bound
      )
    for s, (rate, censored) in rates.items():
      row = {
        "workload": w,
        "block_size": bs,
        "preemption_mode": mode,
        "num_samples": n,
        "system": s,
        "latency_bound": bound,
        "sustainable_rate": rate,
        "censored": censored,
      }
      for other, (r2, _) in rates.items():
        if other != s:
          row[f"x_{other}"] = rate / r2 if r2 > 0 else float("nan")
      out.append(row)
  return out


def _result(
  config: ConfigDict,
  rows: list[dict],
  cost: StepCostModel,
  fit: dict | None,
  skipped: list | None = None,
) -> _outputs.Result:
  bound = config.latency_bound
  tables = [
    _outputs.Table(
      "request_rate",
      ROW_COLUMNS,
      rows,
      caption=(
        f"Normalized latency (mean over requests of (finish - arrival) / output tokens), "
        f"TTFT and time per output token against the Poisson request rate; {config.clock} "
        "clock."
      ),
    )
  ]
  sus = sustainable_rows(rows, bound, config.systems)
  if sus:
    ratio_cols = [
      _outputs.Column(f"x_{s}", f"x {LABELS[s]}", ".2f")
      for s in config.systems
      if any(f"x_{s}" in r for r in sus)
    ]
    tables.append(
      _outputs.Table(
        "sustainable_rate",
        [
          _outputs.Column("workload"),
          _outputs.Column("block_size", "block"),
          _outputs.Column("preemption_mode", "preemption"),
          _outputs.Column("num_samples", "n"),
          _outputs.Column("system"),
          _outputs.Column("sustainable_rate", "rate at bound (req/s)", ".3g"),
          _outputs.Column("censored", "beyond sweep"),
          *ratio_cols,
        ],
        sus,
        caption=(
          f"Highest request rate whose normalized latency stays within {bound} s/token "
          "(interpolated between swept rates; 'beyond sweep': even the highest rate "
          "stayed within it, so the rate is a lower bound; 0: even the lowest was past it), "
          "and its ratio to each system's."
        ),
      )
    )
  per_rate = (
    f"a {config.trace_s:g} s trace per rate (rate x {config.trace_s:g} requests)"
    if config.get("trace_s", 0.0)
    else f"{config.num_requests} requests per rate"
  )
  notes = [
    f"Latency bound for the sustainable rate: {bound} s/token; {per_rate}; requests "
    f"arriving before {config.warmup_s} s are not counted.",
  ]
  if skipped:
    why = {}
    for label, system, bs, mode, n, rate, reason in skipped:
      why.setdefault((reason, label, system, bs, mode, n), []).append(f"{rate:g}")
    for (reason, label, system, bs, mode, n), rates in why.items():
      samples = f", n={n}" if n > 1 else ""
      notes.append(
        f"Not run ({reason}): {label}, {system}, block {bs}, {mode}{samples} at "
        f"{', '.join(rates)} req/s."
      )
  if config.clock == "simulated":
    notes.append(f"Simulated clock, step-cost model: {cost.as_dict()}.")
  if fit is not None:
    notes.append(
      f"Cost model ({fit['form']} form, {fit['loss']} loss) fitted to {fit['train_records']} "
      f"steps of {fit['step_records']}; median "
      f"relative error on {fit['heldout_records']} held-out steps: "
      f"{100 * fit['median_rel_error']:.1f}%."
    )
  return _outputs.Result(tables, _plots(config, rows), notes)


def _select(rows, key):
  return [r for r in rows if _key(r) == key]


def _plots(config: ConfigDict, rows: list[dict]) -> list[_outputs.Plot]:
  plots = []
  by_block = len(config.rates) == 1 and len(config.block_sizes) > 1
  if by_block:
    for w in dict.fromkeys(r["workload"] for r in rows):
      sub = [r for r in rows if r["workload"] == w]
      plots.append(_outputs.Plot(f"latency_vs_block_size_{w}", _draw_block(sub)))
    return plots
  for key in _groups(rows):
    w, bs, mode, n = key
    sub = _select(rows, key)
    # n=1 keeps the names (and titles) of the plots from before num_samples.
    name = f"latency_vs_rate_{w}_bs{bs}_{mode}" + (f"_n{n}" if n > 1 else "")
    title = f"{w}, block {bs}, {mode}" + (f", n={n}" if n > 1 else "")
    plots.append(_outputs.Plot(name.replace(".", "_"), _draw_rate(sub, title, config)))
  return plots


def _draw_rate(rows, title, config):
  def draw(ax):
    for s in config.systems:
      pts = sorted((r["rate"], r["normalized_latency"]) for r in rows if r["system"] == s)
      if pts:
        ax.plot(*zip(*pts, strict=True), marker="o", label=LABELS[s])
    ax.axhline(config.latency_bound, color="grey", linestyle=":", label="latency bound")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("normalized latency (s/token)")
    top = max([r["normalized_latency"] for r in rows] + [config.latency_bound])
    ax.set_ylim(0, min(top, 4 * config.latency_bound) * 1.05)
    ax.set_title(title)
    ax.legend()

  return draw


def _draw_block(rows):
  def draw(ax):
    keys = list(dict.fromkeys((r["system"], r["preemption_mode"]) for r in rows))
    for s, mode in keys:
      pts = sorted(
        (r["block_size"], r["normalized_latency"])
        for r in rows
        if (r["system"], r["preemption_mode"]) == (s, mode)
      )
      style = "--" if mode == "swap" else "-"  # the modes can coincide: both stay visible
      ax.plot(*zip(*pts, strict=True), style, marker="o", label=f"{LABELS[s]}, {mode}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([p for p in dict.fromkeys(r["block_size"] for r in rows)])
    ax.get_xaxis().set_major_formatter("{x:.0f}")
    ax.set_xlabel("block size (tokens)")
    ax.set_ylabel("normalized latency (s/token)")
    ax.set_title(f"{rows[0]['workload']} at {rows[0]['rate']:g} req/s")
    ax.legend()

  return draw
