"""Probes behind issue 13's dispatch and head_dim-64 findings (H200, 2026-12-02).

  python -m experiments.bench.probe_step dispatch|attn|step|modes [--out DIR]

writes ``DIR/probe_<part>_<pid>.jsonl`` (``--out`` defaults to ``$OUT``).

* ``dispatch``: the engine's jitted step (64 x 512, pool just big enough) for both model
  shapes: its host call time; whether a thread issuing the call overlaps with Python work
  on the main thread (it does not: the call holds the GIL); and the host-side events of a
  ``jax.profiler`` trace of 20 calls, summed by name (where the call's time goes).
* ``attn``: the GPU decode kernel alone at the two models' heads (32/8 and 9/3, head_dim
  64, bf16, block 16) over a grid of ``kernels.gpu.BlockSizes`` (KV tile, warps, stages,
  splits), at most 40 s per shape. Small shapes are host-bound here (one call is shorter
  than its dispatch); only 256 x 1024 measures the kernel.
* ``step``: the engine's step at both shapes and models, pool just big enough, against
  the bytes' roofline; run under different ``XLA_FLAGS`` to compare XLA options.
* ``modes``: for both models at 64 x 512 (pool just big enough), the host time of the
  jitted step's call (batch from the host, as the engine calls it; already on the
  device, one buffer every call; and packed, then put on the device by ``jax.device_put``
  inside the timed call), the device step (10 back to back), and the host events of a traced call
  (``cuGraphLaunch``, ``command_buffer::update``): run once per ``XLA_FLAGS`` setting of
  XLA's command buffers (``--xla_gpu_command_buffer_update_mode``, ...) to see which part
  of the host's dispatch each one changes. Rows carry ``xla_flags``.

Exploratory: it ran as tmp/probe.py at 30c8381 before being committed as
benchmarks/probe_step.py, reformatted; moved to experiments/bench with the other scripts
(absl flags, :func:`experiments._timing.time_calls`; rows gain ``*_min``/``*_max``).
Rows: docs/results/engine_probe.jsonl.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import experiments.bench.engine_step as es  # sets the allocator's environment before JAX starts
import experiments.bench.profile_step as ps
from experiments._timing import Timing, time_calls
from experiments.bench import _flags
from experiments.bench._gpu_common import make_paged

PARTS = ("dispatch", "attn", "step", "modes")


class A:
  block_size = 16


def _unsynced(fn, rounds: int = 6, per_round: int = 5) -> Timing:
  """Host seconds of each ``fn()``: ``rounds`` of ``per_round`` timed calls that do not
  wait for the device, each round followed (untimed) by a wait for its last result."""
  holder = {}

  def call():
    holder["out"] = fn()
    return holder["out"]

  samples = []
  for _ in range(rounds):
    samples += time_calls(call, repeats=per_round, warmup=0, sync=lambda out: out).samples
    jax.block_until_ready(holder["out"])
  return Timing.of(samples)


def _ms(name: str, t: Timing) -> dict:
  return {
    f"{name}_ms": t.median * 1e3,
    f"{name}_min_ms": t.min * 1e3,
    f"{name}_max_ms": t.max * 1e3,
  }


def pywork(ms):
  t = time.perf_counter()
  n = 0
  while time.perf_counter() - t < ms / 1e3:
    n += 1
  return n


def _host_events(rec, name, call, top: int = 45, **extra) -> None:
  """The host-side events of a ``jax.profiler`` trace of 20 calls, summed by name, per
  call (the trace inflates host times; their shares are what it tells)."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for i in range(20):
        out = call()
        if i % 5 == 4:
          jax.block_until_ready(out)
      jax.block_until_ready(out)
    path = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))[-1]
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    agg = collections.defaultdict(lambda: [0, 0.0])
    for plane in data.planes:
      if plane.name.startswith("/device:GPU"):
        continue
      for line in plane.lines:
        for e in line.events:
          k = (plane.name[:20], line.name[:30], e.name[:90])
          agg[k][0] += 1
          agg[k][1] += e.duration_ns
    for (pl, ln, n), (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]:
      rec(
        part="host_events",
        model=name,
        plane=pl,
        line=ln,
        name=n,
        per_call=c / 20,
        ms_per_call=t / 20 / 1e6,
        **extra,
      )


def probe_modes(rec) -> None:
  rng = np.random.default_rng(0)
  flags_now = os.environ.get("XLA_FLAGS", "")
  rate = es.read_rate(4.0)

  class Args:
    repeats = 11
    inner = 10
    lane_dense = False

  for name in ("smollm2-135m", "llama-1b"):
    call, release = ps._warm_step(name, 64, 512, A, rng)
    host = ps._host_call(call, 10)
    host_dev = ps._host_call(call.variants["device_batch"], 10)
    host_put = ps._host_call(call.variants["device_put"], 10)
    t = time_calls(call, repeats=11, inner=10, warmup=2)
    rec(
      part="modes",
      xla_flags=flags_now,
      model=name,
      batch=64,
      context=512,
      read_tbs=rate / 1e12,
      **_ms("host_call", host),
      **_ms("host_call_device_batch", host_dev),
      **_ms("host_call_device_put", host_put),
      **_ms("step", t),
    )
    _host_events(rec, name, call, top=60, xla_flags=flags_now)
    release()


def probe_dispatch(rec) -> None:
  rng = np.random.default_rng(0)
  for name in ("smollm2-135m", "llama-1b"):
    call, release = ps._warm_step(name, 64, 512, A, rng)
    # 1) plain host call time (device busy)
    host = ps._host_call(call, 10)

    # 2) Python work W while a dispatcher thread issues the call
    for W in (0.5, 1.0, 2.0):

      def sequential(W=W, call=call):
        out = call()
        pywork(W)
        return out

      def threaded(W=W, call=call):
        res = {}
        th = threading.Thread(target=lambda: res.setdefault("o", call()))
        th.start()
        pywork(W)
        th.join()
        return res["o"]

      rec(
        part="gil",
        model=name,
        work_ms=W,
        **_ms("host_call", host),
        **_ms("sequential", _unsynced(sequential)),
        **_ms("threaded", _unsynced(threaded)),
      )
    _host_events(rec, name, call)
    release()


def probe_attn(rec) -> None:
  import functools

  import kernels
  from kernels import gpu

  rng = np.random.default_rng(0)
  for (hq, hkv), (batch, ctx) in [
    ((32, 8), (64, 512)),
    ((32, 8), (256, 1024)),
    ((9, 3), (64, 512)),
    ((9, 3), (256, 1024)),
  ]:
    D = 64
    kb, vb, table, lengths, _, _ = make_paged(
      rng,
      batch=batch,
      context=ctx,
      block_size=16,
      num_kv_heads=hkv,
      head_dim=D,
      dtype=jnp.bfloat16,
      poison=False,
    )
    q = jax.random.normal(jax.random.key(1), (batch, hq, D), jnp.float32).astype(jnp.bfloat16)
    nbytes = batch * ctx * 2 * hkv * D * 2
    default = gpu.default_block_sizes(
      head_dim=D, kv_dtype=jnp.bfloat16, batch=batch, num_kv_heads=hkv, max_context=ctx
    )
    cfgs = [dict()]
    for tile in (64, 128, 256, 512):
      for warps in (4, 8):
        for stages in (2, 3, 4):
          for splits in (None, 1, 2, 4):
            cfgs.append(
              dict(
                decode_kv_tile=tile,
                decode_num_warps=warps,
                decode_num_stages=stages,
                decode_num_splits=splits,
              )
            )
    t_start = time.perf_counter()
    for c in cfgs:
      if time.perf_counter() - t_start > 40:
        break
      bs = dataclasses.replace(default, **c)
      fn = jax.jit(functools.partial(kernels.paged_attention, backend="gpu", block_sizes=bs))
      try:
        t = time_calls(
          functools.partial(fn, q, kb, vb, table, lengths), repeats=7, inner=10, warmup=2
        )
        rec(
          part="attn",
          heads=f"{hq}/{hkv}",
          batch=batch,
          context=ctx,
          cfg=c,
          ms=t.median * 1e3,
          min_ms=t.min * 1e3,
          max_ms=t.max * 1e3,
          tbs=nbytes / t.median / 1e12,
        )
      except Exception as e:  # noqa: BLE001 - a config the kernel refuses is a result
        rec(part="attn", heads=f"{hq}/{hkv}", batch=batch, context=ctx, cfg=c, error=str(e)[:200])


def probe_step(rec) -> None:
  rng = np.random.default_rng(0)

  class Args:
    repeats = 11
    inner = 10

  rate = es.read_rate(4.0)
  for name in ("llama-1b", "smollm2-135m"):
    for batch, ctx in ((64, 512), (256, 1024)):
      model = es.build_model(name, max_seq_len=2048)
      live = batch * (-(-ctx // 16))
      r = es.paged_step_ms(
        model, batch=batch, context=ctx, block_size=16, num_blocks=live + 8, rng=rng, args=Args
      )
      roof = (es.param_bytes(model) + es.kv_bytes(model.config, batch, ctx)) / rate * 1e3
      rec(
        part="step",
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        model=name,
        batch=batch,
        context=ctx,
        paged_ms=r["paged_step_ms"],
        min=r["paged_min_ms"],
        max=r["paged_max_ms"],
        roofline_ms=roof,
        ratio=r["paged_step_ms"] / roof,
        read_tbs=rate / 1e12,
      )


def define_flags():
  flags.DEFINE_string("out", os.environ.get("OUT", "/tmp/out"), "output folder")


def main(args):
  if len(args.positional) != 1 or args.positional[0] not in PARTS:
    raise SystemExit(f"usage: python -m experiments.bench.probe_step {'|'.join(PARTS)}")
  part = args.positional[0]
  rows = []

  def rec(**r):
    print(json.dumps(r), flush=True)
    rows.append(r)

  {"dispatch": probe_dispatch, "attn": probe_attn, "step": probe_step, "modes": probe_modes}[part](
    rec
  )
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"probe_{part}_{os.getpid()}.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
  _flags.run(define_flags, main, positional=True)
