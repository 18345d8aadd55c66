"""Where an engine step's time goes: device kernels by name, and the host's phases.

* ``--device``: for each model, ``batch x context`` of ``engine_step.py`` and ``--gemm``
  value (the model's products, ``paxcache.nn.GEMMS``; the same jitted step, pool just big
  enough), traces ``--steps`` steps with ``jax.profiler`` and
  sums the GPU kernels per step by kernel name (``jax.profiler.ProfileData`` reads the
  trace; no TensorBoard needed): kernel time, launches, and the span from the first
  kernel's start to the last one's end (the gap between the two is the device idling
  between launches).
* ``--host``: serves ShareGPT-like requests through the engine as ``engine_step.py --e2e``
  does (or ``--host-steady BxP+O``: B requests of P prompt and O generated tokens, all B
  decoding together) and times the host phases of every decode step (schedule, batch
  building, the jitted call's dispatch, the post-dispatch bookkeeping, reading the tokens
  back and the time spent blocked on them). ``--host-dispatch-thread`` and
  ``--host-pipeline-depth`` set the engine's overlap options; with the thread the call's
  dispatch runs on the worker, and its time may land in the next step's row or in none
  (read ``dispatch_ms`` as a rough figure there).

* ``--dispatch``: the host time of the step's call (dispatched while earlier steps run)
  against its device time, each a median with its min-max spread
  (:func:`experiments._timing.time_calls`).

  python -m experiments.bench.profile_step --out DIR [--device] [--host] [--dispatch]

  (``--host`` also takes ``--host-steady``, ``--host-dispatch-thread`` and
  ``--host-pipeline-depth``; docs/engine.md has a whole command.)

Writes ``OUT/profile_device.json`` and ``OUT/profile_host.json`` and prints tables.
"""

from __future__ import annotations

import collections
import glob
import itertools
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from absl import flags

import experiments.bench.engine_step as es  # sets the allocator's environment before JAX starts
from experiments._timing import Timing, time_calls
from experiments.bench import _flags
from experiments.bench._gpu_common import (
  device_kernel_events,
  env_info,
  kernel_summary,
  trace_kernels,
)


def _warm_step(name, batch, context, args, rng, gemm: str = "auto"):
  """The engine's step for ``name`` at ``batch x context`` (pool just big enough, the
  model's products by ``gemm``), run three times; returns ``(call, release)``."""
  model = es.build_model(
    name, max_seq_len=max(2048, context), gemm=gemm, kv_dtype=args.kv_dtype or None
  )
  per_seq = -(-context // args.block_size)
  call, _, release = es.paged_step_call(
    model,
    batch=batch,
    context=context,
    block_size=args.block_size,
    num_blocks=batch * per_seq + 8,
    rng=rng,
  )
  for _ in range(3):
    jax.block_until_ready(call())
  return call, release


def _host_call(call, repeats: int) -> Timing:
  """Host seconds of each ``call()`` dispatched while earlier calls still run: ``repeats``
  rounds of 10 calls, each round after the device caught up (10 samples a round)."""
  samples = []
  for _ in range(repeats):
    jax.block_until_ready(call())  # waits for the round before; the 10 timed calls do not wait
    samples += time_calls(call, repeats=10, warmup=0, sync=lambda out: out).samples
  jax.block_until_ready(call())
  return Timing.of(samples)


def device_profile(args) -> list[dict]:
  rows = []
  rng = np.random.default_rng(0)
  for name, (batch, context), gemm in itertools.product(args.models, args.shapes, args.gemm):
    call, release = _warm_step(name, batch, context, args, rng, gemm)
    events = trace_kernels(call, args.steps)
    release()
    if not events:
      print(f"{name} {batch}x{context}: no GPU events in the trace", flush=True)
      continue
    summary = kernel_summary(events, args.steps)
    row = dict(
      **env_info(),
      commit=args.commit,
      model=name,
      batch=batch,
      context=context,
      block_size=args.block_size,
      gemm=gemm,
      kv_dtype=args.kv_dtype or "bfloat16",
      steps=args.steps,
      kernels_per_step=summary["kernels"],
      kernel_ms_per_step=summary["kernel_us"] / 1e3,
      span_ms_per_step=summary["span_us"] / 1e3,
      kernels=[
        dict(name=k["name"], launches_per_step=k["launches"], ms_per_step=k["us"] / 1e3)
        for k in summary["by_name"][: args.top]
      ],
    )
    rows.append(row)
    print(
      f"\n{name} {batch}x{context} gemm={gemm} kv={row['kv_dtype']}: "
      f"{row['kernels_per_step']:.0f} kernels/step, "
      f"{row['kernel_ms_per_step']:.3f} ms of kernels, span {row['span_ms_per_step']:.3f} ms"
    )
    for k in row["kernels"]:
      print(f"  {k['ms_per_step']:8.4f} ms  x{k['launches_per_step']:5.1f}  {k['name'][:110]}")
    sys.stdout.flush()
  return rows


def dispatch_profile(args) -> list[dict]:
  """Host time of the step's call (dispatch, the device busy with earlier steps) against
  its device time; also with the batch already on the device (``host_call_ms_variants``)."""
  rows = []
  rng = np.random.default_rng(0)
  for name in args.models:
    for batch, context in args.shapes:
      call, release = _warm_step(name, batch, context, args, rng)
      host = _host_call(call, args.repeats)
      device = time_calls(call, repeats=args.repeats, inner=10, warmup=2)
      variants = {vname: _host_call(vcall, args.repeats) for vname, vcall in call.variants.items()}
      release()
      row = dict(
        **env_info(),
        commit=args.commit,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        model=name,
        batch=batch,
        context=context,
        kv_dtype=args.kv_dtype or "bfloat16",
        host_call_ms=host.median * 1e3,
        host_call_p90_ms=float(np.percentile(host.samples, 90)) * 1e3,
        host_call_min_ms=host.min * 1e3,
        host_call_max_ms=host.max * 1e3,
        device_ms=device.median * 1e3,
        device_min_ms=device.min * 1e3,
        device_max_ms=device.max * 1e3,
        host_call_ms_variants={k: t.median * 1e3 for k, t in variants.items()},
        host_call_ms_variants_min_max={k: [t.min * 1e3, t.max * 1e3] for k, t in variants.items()},
      )
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def host_profile(args) -> list[dict]:
  from experiments.workloads import workload_lengths
  from paxcache.engine import Engine, EngineConfig, Request
  from paxcache.engine import _engine as engine_mod
  from paxcache.engine import _scheduler as scheduler_mod

  phases: dict[str, float] = collections.defaultdict(float)

  def wrap(obj, attr, key):
    fn = getattr(obj, attr)

    def timed_fn(*a, **k):
      t0 = time.perf_counter()
      try:
        return fn(*a, **k)
      finally:
        phases[key] += time.perf_counter() - t0

    setattr(obj, attr, timed_fn)
    return fn

  originals = [
    (scheduler_mod.Scheduler, "schedule", wrap(scheduler_mod.Scheduler, "schedule", "schedule")),
    (engine_mod.Engine, "_build_batch", wrap(engine_mod.Engine, "_build_batch", "build")),
    (engine_mod.Engine, "_commit", wrap(engine_mod.Engine, "_commit", "commit")),
    (engine_mod.Engine, "_resolve", wrap(engine_mod.Engine, "_resolve", "resolve")),
  ]
  rows = []
  try:
    for name, requests in zip(args.models, args.requests, strict=True):
      if args.host_steady:  # B requests of P prompt and O generated tokens: B decode together
        b, p, o = args.host_steady
        lengths = np.array([[p, o]] * b)
      else:
        lengths = workload_lengths("sharegpt", requests, max_seq_len=1024, seed=0)
      model = es.build_model(name, max_seq_len=1024)
      c = model.config
      config = EngineConfig(
        num_blocks=int(args.pool_gb * 1e9 // es.kv_bytes(c, 1, 1)) // 16,
        block_size=16,
        num_host_blocks=0,
        preemption_mode="recompute",
        max_num_seqs=256,
        max_num_batched_tokens=2048,
        async_scheduling=True,
        dispatch_thread=args.host_dispatch_thread,
        pipeline_depth=args.host_pipeline_depth,
        metrics_history=1 << 22,
      )
      rng = np.random.default_rng(0)
      for rep in ("compile", "measured"):
        engine = Engine(model, config)
        step_fn = engine._step_fn

        def dispatch(*a, _fn=step_fn):
          t0 = time.perf_counter()
          try:
            return _fn(*a)
          finally:
            phases["dispatch"] += time.perf_counter() - t0

        engine._step_fn = dispatch
        for i, (p, o) in enumerate(lengths):
          engine.add_request(
            Request((rep, i), rng.integers(0, c.vocab_size, int(p)).tolist(), int(o))
          )
        per_step = []
        trace_dir = tempfile.mkdtemp()
        window = (args.trace_from, args.trace_from + args.trace_steps)
        n = 0
        while engine.has_unfinished():
          if rep == "measured" and n == window[0]:
            jax.profiler.start_trace(trace_dir)
            t_window = time.perf_counter()
          phases.clear()
          t0 = time.perf_counter()
          engine.step()
          wall = time.perf_counter() - t0
          n += 1
          if rep == "measured" and n == window[1]:
            jax.block_until_ready(engine.cache)
            t_window = time.perf_counter() - t_window
            jax.profiler.stop_trace()
          sm = engine.step_metrics[-1]
          if sm.num_seqs and not sm.num_prefill_tokens:
            per_step.append(dict(batch=sm.num_seqs, wall=wall, **phases))
        if rep == "measured" and n < window[1]:
          if n > window[0]:
            jax.profiler.stop_trace()
          raise ValueError(
            f"--trace-from {args.trace_from} --trace-steps {args.trace_steps} end past the"
            f" run's {n} steps: trace an earlier or shorter window"
          )
      # The traced window: the device's kernel time against the wall time of its steps.
      path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
      events = device_kernel_events(path[-1]) if path else []
      busy = sum(d for _, _, d in events) / 1e6
      window_steps = list(engine.step_metrics)[window[0] : window[1]]
      settings = dict(
        workload="steady{}x{}+{}".format(*args.host_steady) if args.host_steady else "sharegpt",
        dispatch_thread=args.host_dispatch_thread,
        pipeline_depth=args.host_pipeline_depth,
      )
      rows.append(
        dict(
          **env_info(),
          commit=args.commit,
          model=name,
          **settings,
          window_steps=args.trace_steps,
          window_mean_batch=statistics.mean(m.num_seqs for m in window_steps),
          window_prefill_steps=sum(1 for m in window_steps if m.num_prefill_tokens),
          window_wall_ms_per_step=t_window * 1e3 / args.trace_steps,
          window_kernel_ms_per_step=busy / args.trace_steps,
        )
      )
      print(json.dumps(rows[-1]), flush=True)
      bins = [(1, 64), (65, 128), (129, 256)]
      for lo, hi in bins:
        sel = [s for s in per_step if lo <= s["batch"] <= hi]
        if not sel:
          continue
        keys = ["wall", "schedule", "build", "dispatch", "commit", "resolve"]
        row = dict(
          **env_info(),
          commit=args.commit,
          model=name,
          **settings,
          batch_range=[lo, hi],
          decode_steps=len(sel),
          **{f"{k}_ms": statistics.median(s.get(k, 0.0) for s in sel) * 1e3 for k in keys},
        )
        rows.append(row)
        print(
          f"{name} decode batch {lo}-{hi} ({len(sel)} steps): "
          + ", ".join(f"{k} {row[k + '_ms']:.3f}" for k in keys)
          + " ms (medians)",
          flush=True,
        )
  finally:
    for obj, attr, fn in originals:
      setattr(obj, attr, fn)
  return rows


def define_flags():
  flags.DEFINE_string("out", None, "output folder", required=True)
  flags.DEFINE_string("models", "smollm2-135m,llama-1b", "model names, comma separated")
  flags.DEFINE_string("shapes", "64x512,256x1024", "batch x context, comma separated")
  flags.DEFINE_integer("block-size", 16, "tokens per block")
  flags.DEFINE_integer("steps", 5, "--device: steps traced", lower_bound=1)
  flags.DEFINE_string(
    "gemm", "auto", "--device: the model's products (paxcache.nn.GEMMS), comma separated"
  )
  flags.DEFINE_integer("top", 25, "--device: kernels listed")
  flags.DEFINE_string(
    "kv-dtype",
    "",
    "--device, --dispatch (not --host): the cache's dtype (int8, float8_e4m3fn; unset: bf16)",
  )
  flags.DEFINE_string("requests", "192,128", "--host: requests per model")
  flags.DEFINE_float("pool-gb", 40.0, "engine pool of --host")
  flags.DEFINE_bool("device", False, "profile the device kernels of one step")
  flags.DEFINE_bool("host", False, "time the host phases of the engine's decode steps")
  flags.DEFINE_bool("dispatch", False, "host time of the step's call against its device time")
  flags.DEFINE_string(
    "host-steady", "", "--host: BxP+O: B requests, P prompt and O output tokens (unset: ShareGPT)"
  )
  flags.DEFINE_bool("host-dispatch-thread", False, "--host: EngineConfig.dispatch_thread")
  flags.DEFINE_integer("host-pipeline-depth", 1, "--host: EngineConfig.pipeline_depth")
  flags.DEFINE_integer("trace-from", 300, "--host: first traced step")
  flags.DEFINE_integer("trace-steps", 100, "--host: steps traced")
  flags.DEFINE_integer(
    "repeats", 15, "--dispatch: timed samples (median and min-max)", lower_bound=1
  )
  flags.DEFINE_string("commit", os.environ.get("PAXCACHE_COMMIT", "unknown"), "recorded commit")


def _steady(text: str) -> tuple[int, int, int]:
  """``"BxP+O"`` -> ``(B, P, O)``, within what ``host_profile``'s engine serves together
  (``max_num_seqs`` 256 rows, a model of ``max_seq_len`` 1024); ValueError otherwise."""
  match = re.fullmatch(r"(\d+)x(\d+)\+(\d+)", text)
  if not match:
    raise ValueError(f"--host-steady must be BxP+O, e.g. 256x128+512; got {text!r}")
  b, p, o = map(int, match.groups())
  if not (1 <= b <= 256 and p >= 1 and o >= 1 and p + o <= 1024):
    raise ValueError(
      f"--host-steady {text}: needs 1 <= B <= 256 (the engine's max_num_seqs), P, O >= 1"
      " and P + O <= 1024 (the model's max_seq_len)"
    )
  return b, p, o


def main(args):
  args.models = args.models.split(",")
  args.gemm = es.gemm_values(args.gemm)
  args.shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
  args.requests = [int(x) for x in args.requests.split(",")][: len(args.models)]
  if args.host_steady:
    args.host_steady = _steady(args.host_steady)
    args.requests = [args.host_steady[0]] * len(args.models)
  os.makedirs(args.out, exist_ok=True)
  if args.device:
    rows = device_profile(args)
    with open(os.path.join(args.out, "profile_device.json"), "w") as f:
      json.dump(rows, f, indent=1)
  if args.dispatch:
    rows = dispatch_profile(args)
    with open(os.path.join(args.out, "profile_dispatch.jsonl"), "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  if args.host:
    rows = host_profile(args)
    with open(os.path.join(args.out, "profile_host.json"), "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  _flags.run(define_flags, main)
