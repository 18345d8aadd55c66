"""One engine decode step against its bytes, its pool size and a contiguous cache.

For a random-weight decoder of SmolLM2-135M's shape and of Llama-3.2-1B's shape (bf16
activations, K/V and parameters; the weights do not change the speed), at each
``batch x context`` every sequence is decoded one token at full context:

* **paged**: the engine's own jitted step (``paxcache.engine.device_step``: the
  copy-on-write copies, the model over the paged cache, greedy sampling), the cache
  donated as the engine does, blocks scattered at random over pools of several sizes:
  just the live blocks, 40x the live blocks, and at least ``--big-pool-gb`` GB;
* **dense**: the same model over a contiguous ``[batch, context]`` cache
  (``Decoder.forward_cached(..., exact=False)``: bf16 products, float32 accumulation;
  cache donated), the no-paging peer;
* **roofline**: parameter bytes plus the K/V bytes the step reads, over the read rate
  (``jnp.sum`` of 4 GiB of bf16) measured in the same process.

Times are device time: ``--inner`` steps dispatched back to back, then one block; the
median over ``--repeats`` samples with the spread (min, max), from
:func:`experiments._timing.time_calls`. Live K/V is random (never zeros). With ``--e2e`` the
same models also serve ShareGPT-like requests through :class:`paxcache.engine.Engine` (the
first pass compiles, its compile share timed by JAX's compile events (``compile_s``, with
``first_pass_s`` the whole pass); then ``--e2e-repeats`` passes, same lengths,
other tokens, give the median tokens/s with its min-max spread). Every
``--capture-every``-th decode step of the first measured pass is kept and replayed
afterwards (``_replay_ms``) for its device time, beside the wall time the engine took for
it: on a GPU the span of the step's kernels in a profiler trace, the batch already on the
device (``device_timing: "trace"``); elsewhere the device-resident batch's clock time.

  python -m experiments.bench.engine_step --out /tmp/engine_step [--e2e]

``--e2e-shared-prefix N --e2e-cascade 0,default`` puts one N-token system prompt in front
of every prompt and serves it with cascade attention off and at the engine's threshold
(docs/engine.md, "Cascade attention", has the command).

Writes ``OUT/engine_step.jsonl`` (and ``OUT/engine_e2e.jsonl``) and prints a table last.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# JAX's allocator stops at 75% of the card by default (105 GiB of an H200's 140): a 100 GB
# pool plus the parameters needs more.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments._timing import Timing, time_calls
from experiments.bench import _flags
from experiments.bench._gpu_common import env_info

T0 = time.perf_counter()

MODELS = {
  # SmolLM2-135M: 30 layers, 9/3 heads of 64, tied embeddings.
  "smollm2-135m": dict(
    vocab_size=49152,
    d_model=576,
    num_layers=30,
    num_q_heads=9,
    num_kv_heads=3,
    head_dim=64,
    mlp_dim=1536,
    tie_embeddings=True,
    rope_theta=100_000.0,
  ),  # fmt: skip
  # One layer of width 32 (2/1 heads of 16): the CPU tests' smoke runs, not a benchmark.
  "micro": dict(
    vocab_size=256,
    d_model=32,
    num_layers=1,
    num_q_heads=2,
    num_kv_heads=1,
    head_dim=16,
    mlp_dim=64,
    tie_embeddings=True,
    rope_theta=10_000.0,
  ),  # fmt: skip
  # Llama-3.2-1B: 16 layers, 32/8 heads of 64, tied embeddings.
  "llama-1b": dict(
    vocab_size=128256,
    d_model=2048,
    num_layers=16,
    num_q_heads=32,
    num_kv_heads=8,
    head_dim=64,
    mlp_dim=8192,
    tie_embeddings=True,
    rope_theta=500_000.0,
  ),  # fmt: skip
}


def build_model(
  name: str,
  *,
  max_seq_len: int,
  param_dtype: str = "bfloat16",
  seed: int = 0,
  gemm: str = "auto",
  kv_dtype: str | None = None,
):
  """A random-weight decoder of ``MODELS[name]``'s shape, bf16 activations; ``kv_dtype``
  the cache's (None: bf16, the activations'; "int8" and "float8_e4m3fn" with the config's
  default ``kv_rotation``)."""
  from flax import nnx

  from paxcache.nn import Decoder, DecoderConfig

  config = DecoderConfig(
    **MODELS[name],
    max_seq_len=max_seq_len,
    dtype="bfloat16",
    param_dtype=param_dtype,
    kv_dtype=kv_dtype,
  )
  return Decoder(config, gemm=gemm, rngs=nnx.Rngs(seed))


def param_bytes(model) -> int:
  from flax import nnx

  return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def kv_bytes(config, batch: int, context: int) -> int:
  itemsize = jnp.dtype(config.dtype).itemsize
  return batch * context * config.num_layers * 2 * config.num_kv_heads * config.head_dim * itemsize


def read_rate(gib: float) -> float:
  """Bytes/s of ``jnp.sum`` over ``gib`` GiB of bf16 (median of 21)."""
  n = int(gib * 2**29)
  x = jax.random.normal(jax.random.key(0), (n // 4096, 4096), jnp.bfloat16)
  f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  return x.nbytes / time_calls(lambda: f(x), repeats=21, inner=5, warmup=2).median


def _fill_random(pool, ids, key):
  """Random bf16 values in blocks ``ids`` of one layer's pool (the rest stays as is)."""
  shape = (pool.shape[0], ids.shape[0]) + pool.shape[2:]
  return pool.at[:, ids].set(jax.random.normal(key, shape, jnp.float32).astype(pool.dtype))


def paged_step_call(
  model, *, batch, context, block_size, num_blocks, rng, lane_dense=False, xla_options=()
):
  """The engine's jitted step (compiled with ``xla_options``: ``EngineConfig.xla_options``)
  over a pool of ``num_blocks`` with ``batch`` sequences at ``context`` tokens, blocks
  scattered at random; returns ``(call, live_blocks, release)``:
  ``call()`` runs one step (cache donated) and returns its tokens; ``release()`` drops
  the pool."""
  from paxcache.engine import device_step
  from paxcache.engine._batch import StepBatch

  c = model.config
  per_seq = -(-context // block_size)
  live = batch * per_seq
  ids = rng.permutation(num_blocks)[:live].astype(np.int32)
  table = ids.reshape(batch, per_seq)
  cache = model.init_cache(num_blocks, block_size, lane_dense=lane_dense)
  fill = jax.jit(_fill_random, donate_argnums=0)
  key = jax.random.key(1)
  k = list(cache.k)
  v = list(cache.v)
  for i in range(c.num_layers):
    k[i] = fill(k[i], jnp.asarray(ids), jax.random.fold_in(key, 2 * i))
    v[i] = fill(v[i], jnp.asarray(ids), jax.random.fold_in(key, 2 * i + 1))
  holder = {"cache": cache.replace(k=tuple(k), v=tuple(v))}
  del cache, k, v
  last = context - 1
  slots = table[:, last // block_size] * block_size + last % block_size
  pad = np.zeros(0, np.int32)  # no copy-on-write copies, as the engine passes them
  zeros = np.zeros(batch, np.int32)
  step_batch = StepBatch(
    tokens=rng.integers(0, c.vocab_size, batch).astype(np.int32),
    prev_index=np.full(batch, -1, np.int32),
    positions=np.full(batch, last, np.int32),
    slot_mapping=slots.astype(np.int32),
    cu_q_lens=np.arange(batch + 1, dtype=np.int32),
    block_table=table,
    lengths=np.full(batch, context, np.int32),
    logit_rows=np.arange(batch, dtype=np.int32),
    temperature=np.zeros(batch, np.float32),
    top_k=zeros,
    seeds=zeros,
    sample_index=zeros,
    sample_positions=zeros,
    cow_src=pad,
    cow_dst=pad,
    # No cascade plan (distinct random blocks per row: nothing is shared).
    cascade_group_table=np.zeros((0, 0), np.int32),
    cascade_group_lens=pad,
    cascade_group_rows=np.zeros((0, 0), np.int32),
    cascade_row_starts=pad,
    decode_only=True,
    any_sampled=False,
  )
  step, params = device_step(model, xla_options)
  prev = jnp.zeros(batch, jnp.int32)  # the engine's previous tokens (unused: prev_index -1)

  def call():
    tokens, holder["cache"] = step(params, holder["cache"], step_batch, key, prev)
    return tokens

  def release():
    holder.clear()
    gc.collect()

  call.lower = lambda: step.lower(params, holder["cache"], step_batch, key, prev)
  packed, layout = step_batch.pack()
  packed_dev = jax.device_put(packed)

  def call_device_batch():  # the batch already on the device, at one address every call
    tokens, holder["cache"] = step._jitted(params, holder["cache"], packed_dev, layout, key, prev)
    return tokens

  def call_device_put():  # packed as the engine packs it, put on the device before the call
    packed, layout = step_batch.pack()
    tokens, holder["cache"] = step._jitted(
      params, holder["cache"], jax.device_put(packed), layout, key, prev
    )
    return tokens

  call.variants = {"device_batch": call_device_batch, "device_put": call_device_put}

  return call, live, release


def paged_step_ms(model, *, batch, context, block_size, num_blocks, rng, args) -> dict:
  call, live, release = paged_step_call(
    model,
    batch=batch,
    context=context,
    block_size=block_size,
    num_blocks=num_blocks,
    rng=rng,
    lane_dense=args.lane_dense,
    xla_options=args.xla_options,
  )
  from paxcache.engine._clock import compile_seconds  # the engine's own compile clock

  t0, c0 = time.perf_counter(), compile_seconds()
  jax.block_until_ready(call())
  first_call_s, compile_s = time.perf_counter() - t0, compile_seconds() - c0
  t = time_calls(call, repeats=args.repeats, inner=args.inner, warmup=2)
  release()
  return dict(
    paged_step_ms=t.median * 1e3,
    paged_min_ms=t.min * 1e3,
    paged_max_ms=t.max * 1e3,
    repeats=t.repeats,
    live_blocks=live,
    # As in the e2e rows: JAX's compile seconds in the first call, and that call's wall.
    compile_s=compile_s,
    first_call_s=first_call_s,
  )


def dense_step_ms(model, *, batch, context, rng, args) -> dict:
  c = model.config
  from flax import nnx

  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)  # a flat tuple dispatches fast, as in the engine
  params = tuple(leaves)
  key = jax.random.key(2)
  shape = (batch, context, c.num_kv_heads, c.head_dim)
  cache = [
    tuple(
      jax.random.normal(jax.random.fold_in(key, 2 * i + j), shape, jnp.float32).astype(c.jnp_dtype)
      for j in range(2)
    )
    for i in range(c.num_layers)
  ]

  def step(params, cache, tokens):
    m = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
    logits, cache = m.forward_cached(tokens, cache, context - 1, exact=False)
    return jnp.argmax(logits[:, -1], axis=-1), cache

  step = jax.jit(step, donate_argnums=1)
  tokens = jnp.asarray(rng.integers(0, c.vocab_size, (batch, 1)).astype(np.int32))
  holder = {"cache": cache}

  def call():
    out, holder["cache"] = step(params, holder["cache"], tokens)
    return out

  t = time_calls(call, repeats=args.repeats, inner=args.inner, warmup=2)
  holder.clear()
  del cache
  gc.collect()
  return dict(dense_step_ms=t.median * 1e3, dense_min_ms=t.min * 1e3, dense_max_ms=t.max * 1e3)


def xla_options_field(args) -> dict:
  """``{"xla_options": {...}}`` for a row when ``--xla-options`` set any, else nothing."""
  return {"xla_options": dict(args.xla_options)} if args.xla_options else {}


def step_rows(args, rate: float) -> list[dict]:
  rows = []
  env = env_info()
  rng = np.random.default_rng(0)
  for name, (batch, context), gemm in itertools.product(args.models, args.shapes, args.gemm):
    model = build_model(name, max_seq_len=max(2048, context), gemm=gemm)
    c = model.config
    pbytes = param_bytes(model)
    kbytes = kv_bytes(c, batch, context)
    roofline_ms = (pbytes + kbytes) / rate * 1e3
    per_seq = -(-context // args.block_size)
    live = batch * per_seq
    block_bytes = kv_bytes(c, 1, args.block_size)
    big = int(args.big_pool_gb * 1e9 // block_bytes)
    # Just the live blocks, 40x them, and >= --big-pool-gb; none above --max-pool-gb.
    cap = int(args.max_pool_gb * 1e9 // block_bytes)
    if cap < live + 8:
      raise ValueError(
        f"{name} {batch}x{context}: --max-pool-gb {args.max_pool_gb} holds {cap} blocks, "
        f"fewer than the {live + 8} the step needs ({(live + 8) * block_bytes / 1e9:.2f} GB)"
      )
    dense = dense_step_ms(model, batch=batch, context=context, rng=rng, args=args)
    for pool in sorted({live + 8, min(40 * live, cap), min(max(big, 40 * live), cap)}):
      paged = paged_step_ms(
        model,
        batch=batch,
        context=context,
        block_size=args.block_size,
        num_blocks=pool,
        rng=rng,
        args=args,
      )
      row = dict(
        device=env["device"],
        jax_version=env["jax_version"],
        commit=args.commit,
        model=name,
        param_dtype=c.param_dtype,
        kv_dtype=c.dtype,
        batch=batch,
        context=context,
        block_size=args.block_size,
        lane_dense=args.lane_dense,
        gemm=gemm,
        **xla_options_field(args),
        pool_blocks=pool,
        pool_gb=pool * block_bytes / 1e9,
        param_bytes=pbytes,
        kv_bytes=kbytes,
        roofline_ms=roofline_ms,
        read_tbs=rate / 1e12,
        **paged,
        **dense,
        date=env["date"],
      )
      row["paged_over_dense"] = row["paged_step_ms"] / row["dense_step_ms"]
      row["paged_over_roofline"] = row["paged_step_ms"] / roofline_ms
      print(f"[{time.perf_counter() - T0:.0f} s]", json.dumps(row), flush=True)
      rows.append(row)
    del model
    gc.collect()
  return rows


def _replay_ms(engine, batches, args) -> dict[str, list[float]]:
  """Each captured step batch replayed through the engine's own jitted step against its
  pool (the work depends on the table and lengths, not on the K/V values), three ways,
  ms per step:

  * ``clock``: the batch as the engine passes it (host arrays, packed and transferred on
    every call), ``--inner`` calls back to back, then one sync; median of 5 samples. Run29
    found it above the engine's own wall time with two steps unread: the host's packing
    and transfer of each call are in it.
  * ``put_clock``: the packed batch put on the device once, then timed as ``clock``.
  * ``trace`` (GPU only): the same device-resident batch, ``--replay-runs`` calls back to
    back under ``jax.profiler``; each call's span from its first kernel's start to its
    last kernel's end (``_gpu_common.device_spans``), median. No host time is in it.
    ``busy`` beside it: the same calls' kernel time alone (span minus busy: the launch
    gaps inside a step, which the tracer may lengthen).

  ``--replay-max`` bounds how many batches (evenly spaced) are replayed; the others get
  None, as does a batch whose trace does not split into its calls (reported, not fatal:
  the passes already measured are kept). The pool goes back to the engine in any case."""
  from experiments.bench._gpu_common import device_spans

  holder = {"cache": engine.cache}
  step = engine._step_fn
  n = min(len(batches), args.replay_max)
  keep = set(np.linspace(0, len(batches) - 1, n).round().astype(int).tolist())

  def from_host(batch):
    def call():
      tokens, holder["cache"] = step(
        engine._params, holder["cache"], batch, engine._key, engine._prev_tokens
      )
      return tokens

    return call

  def on_device(batch):
    packed, layout = batch.pack()
    packed = jax.device_put(packed)

    def call():
      tokens, holder["cache"] = step.jitted(
        engine._params, holder["cache"], packed, layout, engine._key, engine._prev_tokens
      )
      return tokens

    return call

  gpu = jax.default_backend() == "gpu"
  out = {"clock": [], "put_clock": [], "trace": [], "busy": []}
  try:
    for i, b in enumerate(batches):
      row = dict.fromkeys(out)
      if i in keep:
        resident = on_device(b)
        for name, call in (("clock", from_host(b)), ("put_clock", resident)):
          row[name] = time_calls(call, repeats=5, inner=args.inner, warmup=2).median * 1e3
        if gpu:
          try:
            span, busy = device_spans(resident, runs=args.replay_runs, per_run=1)
            row["trace"], row["busy"] = span.median * 1e3, busy.median * 1e3
          except RuntimeError as e:  # an uneven trace: this batch has no traced time
            print(f"replay {i}: no traced time ({e})", flush=True)
      for name, v in row.items():
        out[name].append(v)
  finally:
    engine.cache = holder["cache"]
  return out


def e2e_rows(args) -> list[dict]:
  from experiments.workloads import workload_lengths
  from paxcache.engine import Engine, EngineConfig, Request, step_record
  from paxcache.engine._clock import compile_seconds  # the engine's own compile clock

  env = env_info()
  rows = []
  runs = [(name, "sharegpt", n) for name, n in zip(args.models, args.e2e_requests, strict=True)]
  if args.e2e_only_steady:
    runs = []
  if args.e2e_steady:
    # Every request decodes at once: prompts of P tokens, O new tokens each, B requests.
    b, p, o = args.e2e_steady
    runs += [(name, f"steady{b}x{p}+{o}", b) for name in args.models]
  for name, workload, requests in runs:
    if workload == "sharegpt":
      lengths = workload_lengths("sharegpt", requests, max_seq_len=1024, seed=0)
    else:
      lengths = np.array([[args.e2e_steady[1], args.e2e_steady[2]]] * requests)
    # --e2e-shared-prefix N: every prompt starts with the same N tokens (a system prompt),
    # so that admissions hit the prefix cache and decode steps may run cascade attention.
    prefix_len = args.e2e_shared_prefix
    if prefix_len:
      workload += f"+prefix{prefix_len}"
    runs_of = itertools.product(args.e2e_block_sizes, args.e2e_min_chunks, args.e2e_cascade)
    for block_size, min_chunk, cascade_min in runs_of:
      longest = prefix_len + int(lengths.sum(1).max())
      model = build_model(name, max_seq_len=max(1024, longest), gemm=args.gemm[0])
      c = model.config
      pool_tokens = int(args.e2e_pool_gb * 1e9 // kv_bytes(c, 1, 1))
      config = EngineConfig(
        num_blocks=pool_tokens // block_size,
        block_size=block_size,
        num_host_blocks=0,
        preemption_mode="recompute",
        max_num_seqs=256,
        max_num_batched_tokens=2048,
        async_scheduling=args.async_scheduling,
        dispatch_thread=args.dispatch_thread,
        pipeline_depth=args.pipeline_depth,
        decode_steps=args.decode_steps,
        cascade_min_shared_blocks=cascade_min,
        xla_options=args.xla_options,
        # Every step's metrics of a pass (the default keeps the last 4,096; a longer pass
        # would lose the captured steps' records).
        metrics_history=1 << 22,
      )
      rng = np.random.default_rng(0)
      prefix = rng.integers(0, c.vocab_size, prefix_len).tolist()
      result = {}
      passes = ["compile"]
      if not args.e2e_compile_only:
        passes += ["measured"] + [f"measured{i}" for i in range(1, args.e2e_repeats)]
      for rep in passes:
        engine = Engine(model, config)
        result["planned"] = engine.decode_planner is not None
        if min_chunk and engine.decode_planner is not None:  # the plan's floor fixed
          engine.decode_planner = dataclasses.replace(
            engine.decode_planner, min_chunk_tokens=min_chunk
          )
        captured = []  # (step index, StepBatch) of every --capture-every-th decode step
        build = engine._build_batch

        # The batch as the engine's thread builds it (with --dispatch-thread the call runs
        # on another thread, where the step count may already be the next step's).
        def capture(plan, *rest, _fn=build, _engine=engine, _c=captured):
          batch = _fn(plan, *rest)  # (a burst's later slots)
          i = _engine.metrics.steps
          if batch.decode_only and i % args.capture_every == 0:
            _c.append((i, batch))
          return batch

        engine._build_batch = capture
        reqs = [
          Request(
            (rep, i),
            prefix + rng.integers(0, c.vocab_size, int(p)).tolist(),
            max_new_tokens=int(o),
          )
          for i, (p, o) in enumerate(lengths)
        ]
        t0 = time.perf_counter()
        # From the process's start to this pass (imports, model, earlier runs' passes): for
        # the first run of a fresh process, the time until its first measured step.
        result.setdefault("startup_s", {})[rep] = t0 - T0
        c0 = compile_seconds()
        engine.run(reqs)
        seconds = time.perf_counter() - t0
        del engine._build_batch  # the method again
        steps = list(engine.step_metrics)
        decode = [s for s in steps if s.num_prefill_tokens == 0 and s.num_seqs]
        # Per decode step: a burst (--decode-steps) is one engine step of several.
        per = {s.step: max(s.decode_steps, 1) for s in steps}
        result[rep] = dict(
          seconds=seconds,
          generated=engine.metrics.generated_tokens,
          decode_ms=statistics.median(s.seconds / per[s.step] for s in decode) * 1e3
          if decode
          else None,
          bursts=sum(s.decode_steps > 1 for s in steps),
          mean_batch=statistics.mean(s.num_seqs for s in decode) if decode else None,
          shapes=engine.metrics.compiled_shapes,
          compile_s=compile_seconds() - c0,
          prefix_hit_tokens=engine.metrics.prefix_hit_tokens,
          cascade_steps=engine.metrics.cascade_steps,
          cascade_min_shared_blocks=engine.cascade_min_shared_blocks,  # as applied
          cascade_off_reason=engine.cascade_off_reason,
        )
        if rep == "measured" and captured:
          # Each captured step's wall time (the host's, with overlap) beside its device time.
          by_step = {s.step: s for s in steps}
          replay = _replay_ms(engine, [b for _, b in captured], args)
          # The device time of a step: the traced span where there is a GPU trace, else
          # the device-resident batch's clock (on a CPU the call is the device's work).
          timing = "trace" if any(x is not None for x in replay["trace"]) else "put_clock"
          device = replay[timing]
          if args.e2e_steps_out:
            # Every step as the engine ran it (a step-cost model's training data; the
            # captured ones with their replayed device time).
            dev = {i: d for (i, _), d in zip(captured, device, strict=True)}
            with open(os.path.join(args.out, "engine_steps.jsonl"), "a") as f:
              for s in steps:
                # step_record: the fields a step-cost model is fitted to (the engine
                # counts them per step); the rest says which run the step came from.
                row = dict(
                  commit=args.commit,
                  model=name,
                  workload=workload,
                  block_size=block_size,
                  step=s.step,
                  rows=s.num_seqs,
                  num_tokens=s.num_tokens,
                  **step_record(s),
                  # The engine clock from the step before's end to this one's.
                  pace_ms=(s.clock - by_step[s.step - 1].clock) * 1e3
                  if s.step - 1 in by_step
                  else None,
                  captured=s.step in dev,  # its batch kept for the replay
                  decode_steps=s.decode_steps,  # > 1: a burst (its times cover them all)
                  device_ms=dev.get(s.step),
                  device_timing=timing if dev.get(s.step) is not None else None,
                  plan_min_chunk=(min_chunk or None) if result["planned"] else None,
                  async_scheduling=args.async_scheduling,
                  dispatch_thread=args.dispatch_thread,
                  pipeline_depth=args.pipeline_depth,
                )
                f.write(json.dumps(row) + "\n")
          # (wall, device, rows, pace) of every replayed step, per decode step (a burst's
          # over its decode steps). Wall: the step's own StepMetrics.seconds; pace: the
          # engine clock from the step before's end to this one's (also the host work
          # outside step(): arrivals, metrics, run()'s loop).
          pairs = [
            (
              by_step[i].seconds * 1e3 / per[i],
              d / per[i],
              by_step[i].num_seqs,
              (by_step[i].clock - by_step[i - 1].clock) * 1e3 / per[i]
              if i - 1 in by_step
              else None,
            )
            for (i, _), d in zip(captured, device, strict=True)
            if d is not None
          ]
          wall = [w for w, _, _, _ in pairs]

          def med(xs):
            xs = [x for x in xs if x is not None]
            return statistics.median(xs) if xs else None

          result[rep].update(
            decode_device_ms=statistics.median(d for _, d, _, _ in pairs),
            device_timing=timing,
            replay_clock_ms=med(replay["clock"]),
            replay_put_clock_ms=med(replay["put_clock"]),
            replay_trace_ms=med(replay["trace"]),
            replay_busy_ms=med(replay["busy"]),
            captured_wall_ms=statistics.median(wall),
            # Means, not medians: with async scheduling a step's wall time holds the wait
            # for an earlier step's tokens (two steps earlier at depth 2), so per-step
            # ratios pair different steps; only means over the steps give the pace.
            captured_wall_mean_ms=statistics.mean(wall),
            captured_batch=statistics.mean(n for _, _, n, _ in pairs),
            captured_steps=len(pairs),
            wall_over_device=statistics.median(w / d for w, d, _, _ in pairs),
            mean_wall_over_device=statistics.mean(wall)
            / statistics.mean(d for _, d, _, _ in pairs),
          )
          # At the run's largest decode batch (all of --e2e-steady's B decoding: the
          # issue's "at batch 256"): the mean wall (and pace) of every decode step at that
          # batch over the mean device time of the replayed ones there. The replayed steps
          # alone (at most --replay-max) are too few for the wall's mean: in run30 one
          # 16 ms step among 15 made SmolLM2's ratio 2.12 against 1.56 from all 494.
          top = max(s.num_seqs for s in decode)
          dev_top = [d for _, d, n, _ in pairs if n == top]
          at_top = [s for s in decode if s.num_seqs == top]
          paces = [
            (s.clock - by_step[s.step - 1].clock) * 1e3 / per[s.step]
            for s in at_top
            if s.step - 1 in by_step
          ]
          mean_dev = statistics.mean(dev_top) if dev_top else None
          result[rep].update(
            full_batch=top,
            full_steps=len(at_top),
            full_device_steps=len(dev_top),
            full_wall_over_device=(
              statistics.mean(s.seconds * 1e3 / per[s.step] for s in at_top) / mean_dev
              if mean_dev
              else None
            ),
            full_pace_over_device=statistics.mean(paces) / mean_dev if mean_dev and paces else None,
          )
        del engine
        gc.collect()
      if args.e2e_compile_only:
        c = result["compile"]
        print(
          f"[{time.perf_counter() - T0:.0f} s] compiled {name} {workload} bs={block_size}"
          f" min_chunk={min_chunk or 'default'}: {c['compile_s']:.2f} s of compiles"
          f" ({c['shapes']} shapes)"
        )
        continue
      m = result["measured"]
      # Tokens/s: the median over the measured passes (same lengths, same count) and spread.
      wall = Timing.of(result[rep]["seconds"] for rep in passes[1:])
      rate = wall.map(lambda sec, _n=m["generated"]: _n / sec)
      row = dict(
        device=env["device"],
        jax_version=env["jax_version"],
        commit=args.commit,
        model=name,
        workload=workload,
        param_dtype=c.param_dtype,
        block_size=block_size,
        # The plan's floor when fixed (--e2e-min-chunks); null for the default or no plan.
        plan_min_chunk=(min_chunk or None) if result["planned"] else None,
        requests=requests,
        prompt_mean=float(lengths[:, 0].mean()),
        output_mean=float(lengths[:, 1].mean()),
        pool_gb=args.e2e_pool_gb,
        generated_tokens=int(m["generated"]),
        tokens_per_s=rate.median,
        tokens_per_s_min=rate.min,
        tokens_per_s_max=rate.max,
        e2e_repeats=rate.repeats,
        decode_step_ms=m["decode_ms"],
        decode_device_ms=m.get("decode_device_ms"),
        device_timing=m.get("device_timing"),
        replay_clock_ms=m.get("replay_clock_ms"),
        replay_put_clock_ms=m.get("replay_put_clock_ms"),
        replay_trace_ms=m.get("replay_trace_ms"),
        captured_wall_ms=m.get("captured_wall_ms"),
        captured_wall_mean_ms=m.get("captured_wall_mean_ms"),
        captured_batch=m.get("captured_batch"),
        captured_steps=m.get("captured_steps"),
        wall_over_device=m.get("wall_over_device"),
        mean_wall_over_device=m.get("mean_wall_over_device"),
        full_batch=m.get("full_batch"),
        full_steps=m.get("full_steps"),
        full_device_steps=m.get("full_device_steps"),
        full_wall_over_device=m.get("full_wall_over_device"),
        full_pace_over_device=m.get("full_pace_over_device"),
        replay_busy_ms=m.get("replay_busy_ms"),
        mean_decode_batch=m["mean_batch"],
        # JAX's own compile events in the first pass (tracing, lowering, compiling or
        # loading from the persistent cache; paxcache.engine._clock.compile_seconds): not the
        # first pass minus a measured one, which went negative where nothing was left.
        compile_s=result["compile"]["compile_s"],
        first_pass_s=result["compile"]["seconds"],
        startup_s=result["startup_s"]["measured"],
        compiled_shapes=m["shapes"],
        shared_prefix=prefix_len,
        prefix_hit_tokens=m["prefix_hit_tokens"],
        cascade_min_shared_blocks=m["cascade_min_shared_blocks"],
        cascade_off_reason=m["cascade_off_reason"],
        cascade_steps=m["cascade_steps"],
        compilation_cache=bool(args.compilation_cache),
        async_scheduling=args.async_scheduling,
        dispatch_thread=args.dispatch_thread,
        pipeline_depth=args.pipeline_depth,
        decode_steps=args.decode_steps,
        bursts=m["bursts"],
        gemm=args.gemm[0],
        **xla_options_field(args),
        date=env["date"],
      )
      print(f"[{time.perf_counter() - T0:.0f} s]", json.dumps(row), flush=True)
      rows.append(row)
      with open(os.path.join(args.out, "engine_e2e.jsonl"), "a") as f:  # row by row: a run
        f.write(json.dumps(row) + "\n")  # cut short by a time limit keeps what it measured
      del model
      gc.collect()
  return rows


def gemm_values(text: str) -> list[str]:
  """``--gemm``'s comma-separated values, each one of ``paxcache.nn.GEMMS`` (SystemExit
  otherwise, before anything is built or timed)."""
  from paxcache.nn import GEMMS

  values = text.split(",")
  if not text or any(g not in GEMMS for g in values):
    raise SystemExit(f"--gemm takes values of {GEMMS}, got {text!r}")
  return values


def define_flags():
  flags.DEFINE_string("out", None, "output folder", required=True)
  flags.DEFINE_string("models", "smollm2-135m,llama-1b", "model names, comma separated")
  flags.DEFINE_string("shapes", "64x512,256x1024", "batch x context, comma separated")
  flags.DEFINE_string(
    "gemm",
    "auto",
    "the model's projections (paxcache.nn.GEMMS), comma separated: the step table runs each "
    "(rows record it); the engine runs take the first",
  )
  flags.DEFINE_integer("block-size", 16, "tokens per block")
  flags.DEFINE_float("big-pool-gb", 100.0, "the big pool")
  flags.DEFINE_float("max-pool-gb", 110.0, "largest pool (H200: 139 GiB)")
  flags.DEFINE_float("read-gib", 4.0, "array size of the read ceiling")
  flags.DEFINE_integer(
    "repeats", 21, "timed samples per step time (median and min-max)", lower_bound=1
  )
  flags.DEFINE_integer("inner", 10, "steps back to back per sample", lower_bound=1)
  flags.DEFINE_string("commit", os.environ.get("PAXCACHE_COMMIT", "unknown"), "recorded commit")
  flags.DEFINE_bool("no-step", False, "skip the step table")
  flags.DEFINE_bool(
    "lane-dense", False, "the step table's paged cache in rows of 128 (head_dim 32 or 64)"
  )
  flags.DEFINE_string(
    "xla-options",
    "",
    "EngineConfig.xla_options for the step table's paged step (not its dense baseline, which "
    "compiles first in the same process) and the engine, as JSON, e.g. "
    "'{\"xla_gpu_exhaustive_tiling_search\": true}'",
  )
  flags.DEFINE_bool("e2e", False, "also serve requests through the Engine")
  flags.DEFINE_string("e2e-requests", "192,128", "requests per model")
  flags.DEFINE_string("e2e-block-sizes", "16", "block sizes, comma separated")
  flags.DEFINE_float("e2e-pool-gb", 40.0, "engine pool")
  flags.DEFINE_string(
    "e2e-min-chunks",
    "0",
    "the planned decode's smallest chunk, comma separated: one run each (0: the plan's "
    "default, kernels.gpu.plan.min_chunk_for)",
  )
  flags.DEFINE_integer(
    "e2e-repeats", 5, "measured passes per run (median tokens/s, min-max)", lower_bound=1
  )
  flags.DEFINE_string(
    "e2e-steady",
    None,
    "BxP+O: also B requests of P prompt and O new tokens each (all decode together)",
  )
  flags.DEFINE_bool("e2e-only-steady", False, "skip the ShareGPT-like runs")
  flags.DEFINE_integer(
    "e2e-shared-prefix",
    0,
    "tokens of one system prompt every request's prompt starts with (prefix-cache hits, "
    "cascade attention in decode steps)",
    lower_bound=0,
  )
  flags.DEFINE_string(
    "e2e-cascade",
    "default",
    "EngineConfig.cascade_min_shared_blocks, comma separated: one run each (0: off; "
    "'default': the config's default)",
  )
  flags.DEFINE_bool(
    "e2e-compile-only",
    False,
    "run the first (compiling) pass only and record nothing: fills --compilation-cache",
  )
  flags.DEFINE_bool("e2e-steps-out", False, "also write every step to engine_steps.jsonl")
  flags.DEFINE_integer(
    "capture-every", 25, "replay every Nth decode step for device time", lower_bound=1
  )
  flags.DEFINE_integer(
    "replay-max", 16, "replay at most this many captured steps (evenly spaced)", lower_bound=1
  )
  flags.DEFINE_integer(
    "replay-runs", 9, "traced calls per replayed step (GPU; median of their spans)", lower_bound=1
  )
  flags.DEFINE_bool("async-scheduling", False, "EngineConfig.async_scheduling")
  flags.DEFINE_bool(
    "dispatch-thread", False, "EngineConfig.dispatch_thread (needs --async-scheduling)"
  )
  flags.DEFINE_integer(
    "pipeline-depth", 1, "EngineConfig.pipeline_depth (2 needs --async-scheduling)"
  )
  flags.DEFINE_integer(
    "decode-steps", 1, "EngineConfig.decode_steps: decode steps a burst's call runs", lower_bound=1
  )
  flags.DEFINE_string(
    "compilation-cache",
    os.path.expanduser("~/.cache/paxcache/jax"),
    "JAX's persistent compilation cache folder (a fresh process then loads, not compiles; "
    "issue 13 item 4); '' compiles every shape anew",
  )


def main(args):
  try:
    options = json.loads(args.xla_options) if args.xla_options else {}
  except json.JSONDecodeError as e:
    raise SystemExit(f"--xla-options must be a JSON object: {e}") from e
  if not isinstance(options, dict):
    raise SystemExit(f"--xla-options must be a JSON object, got {args.xla_options!r}")
  args.xla_options = options  # EngineConfig / device_step check and normalise them
  args.models = args.models.split(",")
  args.shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
  args.gemm = gemm_values(args.gemm)
  args.e2e_requests = [int(x) for x in args.e2e_requests.split(",")][: len(args.models)]
  args.e2e_block_sizes = [int(x) for x in args.e2e_block_sizes.split(",")]
  args.e2e_min_chunks = [int(x) for x in args.e2e_min_chunks.split(",")]
  default_cascade = None
  if "default" in args.e2e_cascade.split(","):
    from paxcache.engine import EngineConfig

    default_cascade = EngineConfig().cascade_min_shared_blocks
  args.e2e_cascade = [
    default_cascade if x == "default" else int(x) for x in args.e2e_cascade.split(",")
  ]
  if args.e2e_steady:
    b, rest = args.e2e_steady.split("x")
    args.e2e_steady = (int(b), *(int(x) for x in rest.split("+")))
  os.makedirs(args.out, exist_ok=True)
  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  rows = []
  if not args.no_step:
    rate = read_rate(args.read_gib)
    print(f"read rate {rate / 1e12:.2f} TB/s", flush=True)
    rows = step_rows(args, rate)
    with open(os.path.join(args.out, "engine_step.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  e2e = []
  if args.e2e:
    e2e = e2e_rows(args)
  print()
  print(
    f"{'model':<13} {'BxL':>9} {'pool GB':>8} {'paged ms (min-max)':>22} {'dense ms':>9} "
    f"{'roof ms':>8} {'p/d':>5} {'p/roof':>6}"
  )
  for r in rows:
    print(
      f"{r['model']:<13} {r['batch']}x{r['context']:<5} {r['pool_gb']:>8.1f} "
      f"{r['paged_step_ms']:>8.3f} ({r['paged_min_ms']:.3f}-{r['paged_max_ms']:.3f}) "
      f"{r['dense_step_ms']:>9.3f} {r['roofline_ms']:>8.3f} {r['paged_over_dense']:>5.2f} "
      f"{r['paged_over_roofline']:>6.2f}"
    )
  for r in e2e:
    print(
      f"e2e {r['model']:<13} {r['workload']:<18} bs={r['block_size']:<4} "
      f"{r['tokens_per_s']:>8.0f} ({r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f}) tok/s  "
      f"decode {r['decode_step_ms']:.2f} ms @ {r['mean_decode_batch']:.1f}  "
      f"compile {r['compile_s']:.2f} s ({r['compiled_shapes']} shapes)"
      + (
        f"  cascade>={r['cascade_min_shared_blocks']} blocks: {r['cascade_steps']} steps"
        if r["shared_prefix"]
        else ""
      )
      + (
        f"  captured: wall {r['captured_wall_ms']:.2f} ms, device {r['decode_device_ms']:.2f} ms"
        f" @ {r['captured_batch']:.0f} (wall/device {r['wall_over_device']:.2f};"
        f" {r['device_timing']}; at batch {r['full_batch']}:"
        f" {r['full_wall_over_device'] or float('nan'):.2f} over {r['full_steps']} steps,"
        f" pace/device {r['full_pace_over_device'] or float('nan'):.2f})"
        if r["decode_device_ms"]
        else ""
      )
    )


if __name__ == "__main__":
  _flags.run(define_flags, main)
