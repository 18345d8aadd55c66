"""The engine's host work per decode step, without the jitted call's own time.

For each batch size ``B``, ``B`` requests of short prompts and long outputs run through
:class:`paxcache.engine.Engine` until all ``B`` decode together; then every sample is one
``Engine.step`` (a pure decode step of ``B`` rows, or a burst of them: checked), timed whole with
:func:`experiments._timing.time_calls`, minus the time of its one call of the jitted step.
That call is wrapped to wait for its result (``jax.block_until_ready``), so the device's
work and the launch are both inside it and everything else — scheduling, the allocator's
appends, the block table and step batch (and packing it), committing the placeholders,
reading the previous step's tokens back, stops, metrics — is the host work reported.
With that wait the device never overlaps the host, so ``wall`` here is not the engine's
step time; the host work is what overlap scheduling must hide behind the device step.

The phases (medians of the same steps) name where the host time goes: ``schedule``
(``Scheduler.schedule``, the allocator's appends included), ``build`` (block table and
step batch), ``commit`` and ``resolve`` (the previous step's tokens, with overlap
scheduling); ``pack`` and the rest of ``step`` are the remainder.

  python -m experiments.bench.engine_host --out DIR                    # 64, 256; micro model
  python -m experiments.bench.engine_host --batch 64,256 --model smollm2-135m --out DIR
  python -m experiments.bench.engine_host --batch 256 --noasync-scheduling --commit abc1234

``--dispatch-thread`` (``EngineConfig.dispatch_thread``) makes the jitted call on the
engine's worker thread, not waited for there: then ``jit`` is the call's dispatch alone,
the call overlaps the host work and ``host`` (the step less its call) means nothing;
``wall`` (the whole step, median and spread, reported always) is the figure to compare
with and without it::

  python -m experiments.bench.engine_host --batch 64 --model tiny --dispatch-thread

``--pipeline-depth 2`` (``EngineConfig.pipeline_depth``) keeps two steps unread; with the
call waited for, the host's reads of the older step never wait, so ``host`` is its work
per step; with ``--dispatch-thread`` again ``wall`` is the figure (the pool then gets room
for the bound under which a step keeps two steps unread).

``--emulate-device-ms D --emulate-launch-ms L`` replaces the model's call with a fake
device: the call sleeps L ms on the calling thread (a launch: no CPU, no GIL) and the
step's tokens (zeros) arrive D ms after the step before's, from a thread that sleeps, so
that a CPU machine sees a GPU's timing (the engine's host work is real, the device's
work and launch are sleeps) and the engine's overlap of host work with the device can be
measured: the step waits only where the engine reads tokens. ``wall`` is the figure (add
``--pipeline-depth 2 --dispatch-thread`` for the engine's fastest setting)::

  python -m experiments.bench.engine_host --emulate-device-ms 1.25 --emulate-launch-ms 0.85

``--decode-steps K`` (``EngineConfig.decode_steps``): every timed step is a burst of K
decode steps, and every figure (host, call, wall, phases) is divided by K: per decode
step. The fake device takes K times its step and K times its launch for a burst (one
launch per step of the device's loop, as without the loop; a real loop may launch less)::

  python -m experiments.bench.engine_host --emulate-device-ms 1.25 --decode-steps 4
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import os
import platform
import statistics
import time

import numpy as np
from absl import flags

from experiments._timing import Timing, time_calls
from experiments.bench import _flags

PHASES = ("schedule", "build", "commit", "resolve")


class _TimedCall:
  """Calls ``fn`` and (``wait``) waits for its result; records the seconds of each call."""

  def __init__(self, fn, seconds: list[float], wait: bool = True):
    self.fn = fn
    self.seconds = seconds
    self.wait = wait

  def __call__(self, *args):
    import jax

    t0 = time.perf_counter()
    out = self.fn(*args)
    if self.wait:
      jax.block_until_ready(out)
    self.seconds.append(time.perf_counter() - t0)
    return out


class _FakeDevice:
  """A device that takes ``device_s`` per step and no host CPU, behind a call whose launch
  takes ``launch_s`` of the calling thread (a sleep: no CPU, GIL released, as a CUDA graph
  launch holds neither). No model runs: each step's tokens (zeros) come from one device
  thread that sleeps ``device_s`` per step, in order, and whatever reads them waits.
  The engine's host work (planning, packing, committing, reading tokens) is its own."""

  def __init__(self, device_s: float, launch_s: float, cap: int):
    import concurrent.futures

    from paxcache.engine._batch import _ARRAY_FIELDS

    self.device_s, self.launch_s = device_s, launch_s
    self.cap = cap
    self.queue = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fake-device")
    self._burst_field = _ARRAY_FIELDS.index("burst_slots")  # its (shape, dtype) in a layout

  def _run(self, steps: int):
    time.sleep(self.device_s * steps)
    return np.zeros((steps, self.cap), np.int32) if steps > 1 else np.zeros(self.cap, np.int32)

  def __call__(self, params, cache, packed, layout, key, prev_tokens):
    later = layout[self._burst_field][0][0]  # a burst's later sub-steps (0: one step)
    time.sleep(self.launch_s * (later + 1))
    tokens = _FakeTokens(self.queue.submit(self._run, later + 1))
    # A burst returns (the last sub-step's tokens, every sub-step's); the engine reads
    # only the second on the host.
    return ((tokens, tokens) if later else tokens), cache


class _FakeTokens:
  """A step's tokens on the fake device: reading them waits for the step."""

  def __init__(self, future):
    self.future = future

  def __array__(self, dtype=None, copy=None):
    return self.future.result()


def _timed_phase(fn, key: str, phases: dict):
  def timed(*args, **kwargs):
    t0 = time.perf_counter()
    try:
      return fn(*args, **kwargs)
    finally:
      phases[key] += time.perf_counter() - t0

  return timed


def build_model(name: str, max_seq_len: int):
  if name == "tiny":
    from paxcache.nn import load_decoder

    return load_decoder()
  if name == "micro":
    # A step with next to no device work (one layer of width 16): on a CPU the jitted
    # call of a real model also evicts the host's caches, which the next phase then pays.
    from flax import nnx

    from paxcache.nn import Decoder, DecoderConfig

    config = DecoderConfig(
      d_model=16,
      num_layers=1,
      num_q_heads=2,
      num_kv_heads=1,
      head_dim=8,
      mlp_dim=32,
      vocab_size=256,
      max_seq_len=max_seq_len,
    )
    return Decoder(config, rngs=nnx.Rngs(0))
  from experiments.bench import engine_step

  return engine_step.build_model(name, max_seq_len=max_seq_len)


def run(model, batch: int, args) -> dict:
  """Timings of ``args.steps`` engine steps (decode steps, or bursts of ``--decode-steps``)
  of ``batch`` running sequences, per decode step: ``host`` (the step less its jitted
  call), ``jit`` (that call, waited for) and the phase medians."""
  from paxcache.engine import Engine, EngineConfig, Request
  from paxcache.engine._engine import no_preemption_blocks

  bs = args.block_size
  k = args.decode_steps
  # Nothing finishes while measured: the prefill samples one token, the ramp's step (a
  # burst) k, then warmup and measured steps k each.
  max_new = (args.warmup + args.steps + 1) * k + 4
  per_seq = -(-(args.prompt_len + max_new) // bs)
  if args.prompt_len + max_new > model.config.max_seq_len:
    raise ValueError(
      f"prompt {args.prompt_len} + {max_new} new tokens exceed the model's max_seq_len "
      f"{model.config.max_seq_len}: fewer --steps or --warmup"
    )
  config = EngineConfig(
    num_blocks=batch * per_seq + 8,
    block_size=bs,
    num_host_blocks=0,
    preemption_mode="recompute",
    max_num_seqs=batch,
    max_num_batched_tokens=max(batch * args.prompt_len, 256),
    async_scheduling=args.async_scheduling,
    dispatch_thread=args.dispatch_thread,
    pipeline_depth=args.pipeline_depth,
    decode_steps=k,
  )
  if args.pipeline_depth == 2:
    # Two steps stay unread only while a step cannot preempt: room for that bound on top
    # of every sequence's blocks.
    config = dataclasses.replace(
      config, num_blocks=config.num_blocks + no_preemption_blocks(config)
    )
  engine = Engine(model, config)
  jit_seconds: list[float] = []
  step_fn = copy.copy(engine._step_fn)  # the engines' shared step stays untouched
  # With the dispatch thread the call is not waited for (the worker would otherwise hold
  # each step until its result, which is not what the option does): `jit` is then the
  # call's dispatch alone and `host` means nothing; `wall` is the figure.
  jitted = step_fn._jitted
  if args.emulate_device_ms:
    jitted = _FakeDevice(args.emulate_device_ms / 1e3, args.emulate_launch_ms / 1e3, engine._cap)
  wait = not (args.dispatch_thread or args.emulate_device_ms)
  step_fn._jitted = _TimedCall(jitted, jit_seconds, wait=wait)
  engine._step_fn = step_fn
  phases: dict[str, float] = collections.defaultdict(float)
  engine.scheduler.schedule = _timed_phase(engine.scheduler.schedule, "schedule", phases)
  for name, key in (("_build_batch", "build"), ("_commit", "commit"), ("_resolve", "resolve")):
    setattr(engine, name, _timed_phase(getattr(engine, name), key, phases))

  rng = np.random.default_rng(args.seed)
  vocab = model.config.vocab_size
  for i in range(batch):
    engine.add_request(
      Request(
        i,
        rng.integers(0, vocab, args.prompt_len).tolist(),
        max_new_tokens=max_new,
        # Half sampled, half greedy: both paths of the step batch.
        temperature=1.0 if i % 2 else 0.0,
        top_k=50 if i % 4 == 1 else 0,
      )
    )
  ramp = 0
  while not (engine.step_metrics and _decode_of(engine.step_metrics[-1], batch)):
    engine.step()
    ramp += 1
    if ramp > 64:
      raise RuntimeError(f"{batch} sequences did not all decode after {ramp} steps")
  for _ in range(args.warmup):
    engine.step()

  per_step: dict[str, list[float]] = collections.defaultdict(list)

  def one_step():
    phases.clear()
    engine.step()
    for key in PHASES:
      per_step[key].append(phases[key])

  engine.cache  # noqa: B018 - waits for a call still queued on the dispatch thread
  jit_seconds.clear()
  wall = time_calls(one_step, repeats=args.steps, warmup=0, sync=lambda out: out)
  engine.cache  # noqa: B018 - the last call's time is in before it is counted
  measured = list(engine.step_metrics)[-args.steps :]
  if len(jit_seconds) != args.steps or not all(_decode_of(m, batch) for m in measured):
    raise RuntimeError("a measured step was not one pure decode step of every sequence")
  if any(m.decode_steps != k for m in measured):
    raise RuntimeError(f"a measured step was not a burst of {k} decode steps")
  host = Timing.of((w - j) / k for w, j in zip(wall.samples, jit_seconds, strict=True))
  return dict(
    host=host,
    jit=Timing.of(j / k for j in jit_seconds),
    wall=wall.map(lambda x: x / k),
    phases={p: statistics.median(v) / k for p, v in per_step.items()},
  )


def _decode_of(m, batch: int) -> bool:
  return m.num_seqs == batch and m.num_prefill_tokens == 0 and m.decode_batch == batch


def define_flags():
  flags.DEFINE_list("batch", ["64", "256"], "running sequences, comma separated")
  flags.DEFINE_string(
    "model",
    "micro",
    "micro (one layer of width 16: next to no device work), tiny (the package's checkpoint) "
    "or one of engine_step's models (smollm2-135m, llama-1b: random weights)",
  )
  flags.DEFINE_integer("prompt-len", 16, "prompt tokens per request")
  flags.DEFINE_integer("block-size", 16, "tokens per block")
  flags.DEFINE_integer(
    "steps", 200, "timed engine steps (bursts with --decode-steps)", lower_bound=5
  )
  flags.DEFINE_integer("warmup", 20, "untimed engine steps first")
  flags.DEFINE_bool("async-scheduling", True, "overlap scheduling (the engine's fast setting)")
  flags.DEFINE_bool("dispatch-thread", False, "EngineConfig.dispatch_thread: calls on a worker")
  flags.DEFINE_integer("pipeline-depth", 1, "EngineConfig.pipeline_depth: steps kept unread")
  flags.DEFINE_integer(
    "decode-steps",
    1,
    "EngineConfig.decode_steps: every timed step a burst of this many (figures per decode step)",
    lower_bound=1,
  )
  flags.DEFINE_float(
    "emulate-device-ms",
    0.0,
    "> 0: no model runs; each step takes this long on a fake device that uses no host CPU "
    "(a thread that sleeps), a GPU's step on a CPU machine; then `wall` is the figure",
    lower_bound=0.0,
  )
  flags.DEFINE_float(
    "emulate-launch-ms",
    0.0,
    "with --emulate-device-ms: the call's launch, a sleep of the calling thread",
    lower_bound=0.0,
  )
  flags.DEFINE_integer("seed", 0, "prompt seed")
  flags.DEFINE_string("commit", "", "commit of the engine measured (recorded in the rows)")
  flags.DEFINE_string("out", "", "directory for engine_host.jsonl (none: print only)")


def main(args):
  import jax

  longest = args.prompt_len + (args.warmup + args.steps + 1) * args.decode_steps + 8
  model = build_model(args.model, max_seq_len=max(1024, longest))
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(
    f"# engine host work per decode step, {args.model} model, block_size={args.block_size}, "
    f"prompt {args.prompt_len}, async_scheduling={args.async_scheduling}, "
    f"dispatch_thread={args.dispatch_thread}, pipeline_depth={args.pipeline_depth}, "
    f"decode_steps={args.decode_steps} (figures per decode step), "
    f"emulated device / launch ms {args.emulate_device_ms} / {args.emulate_launch_ms}, "
    f"{args.steps} engine steps, "
    f"{jax.devices()[0].platform}, {platform.processor() or platform.machine()}, "
    f"load average {load:.2f}"
  )
  print(
    "| running sequences | host ms median (min-max) | 95% interval ms | jitted call ms "
    "| step wall ms median (min-max) | wall 95% interval ms | "
    + " | ".join(f"{p} ms" for p in PHASES)
    + " |"
  )
  print("| ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(PHASES))
  rows = []
  for batch in (int(b) for b in args.batch):
    r = run(model, batch, args)
    host, jit, wall = r["host"], r["jit"], r["wall"]
    lo, hi = host.interval
    wlo, whi = wall.interval
    print(
      f"| {batch} | {host.median * 1e3:.3f} ({host.min * 1e3:.3f}-{host.max * 1e3:.3f}) "
      f"| {lo * 1e3:.3f}-{hi * 1e3:.3f} | {jit.median * 1e3:.3f} | "
      f"{wall.median * 1e3:.3f} ({wall.min * 1e3:.3f}-{wall.max * 1e3:.3f}) | "
      f"{wlo * 1e3:.3f}-{whi * 1e3:.3f} | "
      + " | ".join(f"{r['phases'][p] * 1e3:.3f}" for p in PHASES)
      + " |",
      flush=True,
    )
    rows.append(
      dict(
        bench="engine_host",
        commit=args.commit,
        model=args.model,
        device=jax.devices()[0].device_kind,
        machine=platform.processor() or platform.machine(),
        load_average=load,
        batch=batch,
        block_size=args.block_size,
        prompt_len=args.prompt_len,
        async_scheduling=args.async_scheduling,
        dispatch_thread=args.dispatch_thread,
        pipeline_depth=args.pipeline_depth,
        decode_steps=args.decode_steps,
        emulate_device_ms=args.emulate_device_ms,
        emulate_launch_ms=args.emulate_launch_ms,
        **host.fields("host"),
        **jit.fields("jit"),
        **wall.fields("wall"),
        **{f"{p}_ms": r["phases"][p] * 1e3 for p in PHASES},
        date=time.strftime("%Y-%m-%d", time.gmtime()),
      )
    )
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "engine_host.jsonl"), "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  _flags.run(define_flags, main)
