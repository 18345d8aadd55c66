"""Data-parallel replicas behind the router: one replica against R, prefix affinity on and off.

The same random-weight decoder (as ``spmd_scaling``: the weights do not change the speed;
greedy decoding with no end token makes every request generate exactly its drawn output
length) serves the same requests through :class:`paxcache.engine.Router` built over
``make_data_mesh(R, model_size)`` (every configuration, the single replica included, takes
the engine's mesh code path), each replica with the same pool per device:

* ``R = 1``: one replica serves everything;
* ``R > 1``, routing ``affinity``: requests sharing their first block go to one replica
  (the router's default), the rest by least outstanding tokens;
* ``R > 1``, routing ``load``: no prefix key (``affinity_blocks`` larger than any prompt),
  every request to the least loaded replica, so a shared prefix is computed and cached on
  every replica.

The workload is ``--prefixes`` groups of requests, each group sharing a prompt prefix of
``--prefix-len`` tokens followed by 16-128 tokens of its own, outputs of 64-256 tokens
(drawn once, the same in every configuration). Each configuration first runs the workload
twice with other prompt tokens (compiling the step shapes), then ``--repeats`` measured
passes (other tokens each); throughputs are the median with the min-max spread
(:mod:`experiments._timing`). In one process the replicas step one after another on the
host, so they overlap on their devices only with ``async_scheduling`` (each replica's next
step is queued before the host reads its last one); ``--async-scheduling`` (default on)
sets it for every configuration.

  python -m experiments.bench.dp_router --out /tmp/dp [--replicas 1,2] [--model-size 1]

Writes ``OUT/dp_router.jsonl`` and prints a table last. ``--tiny`` shrinks the model and
the workload to a CPU check.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time

import jax
import numpy as np
from absl import flags

from experiments._timing import Timing
from experiments.bench import _flags


@dataclasses.dataclass(frozen=True)
class Setup:
  d_model: int = 2048
  num_layers: int = 16
  num_q_heads: int = 16
  num_kv_heads: int = 8
  head_dim: int = 128
  mlp_dim: int = 5632
  vocab_size: int = 32000
  dtype: str = "bfloat16"
  block_size: int = 16
  blocks_per_gpu: int = 1024
  prefixes: int = 8
  per_prefix: int = 24
  prefix_len: int = 512
  own_range: tuple[int, int] = (16, 128)
  output_range: tuple[int, int] = (64, 256)
  max_num_seqs: int = 128
  max_num_batched_tokens: int = 2048
  async_scheduling: bool = True
  seed: int = 0


TINY = dict(
  d_model=32,
  num_layers=1,
  num_q_heads=2,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=64,
  vocab_size=64,
  dtype="float32",
  blocks_per_gpu=48,
  prefixes=3,
  per_prefix=3,
  prefix_len=8,
  own_range=(1, 6),
  output_range=(2, 5),
  max_num_seqs=4,
  max_num_batched_tokens=32,
  block_size=4,
)


def make_lengths(s: Setup) -> np.ndarray:
  """``[requests, 3]``: prefix group, own prompt tokens, output tokens (groups interleaved:
  request ``i`` is in group ``i % prefixes``)."""
  rng = np.random.default_rng(s.seed)
  n = s.prefixes * s.per_prefix
  own = rng.integers(s.own_range[0], s.own_range[1] + 1, n)
  out = rng.integers(s.output_range[0], s.output_range[1] + 1, n)
  return np.stack([np.arange(n) % s.prefixes, own, out], axis=1)


def make_requests(s: Setup, lengths: np.ndarray, tag: str, seed: int) -> list:
  from paxcache.engine import Request

  rng = np.random.default_rng(seed)
  shared = rng.integers(0, s.vocab_size, (s.prefixes, s.prefix_len))
  return [
    Request(
      request_id=(tag, i),
      prompt=shared[g].tolist() + rng.integers(0, s.vocab_size, int(own)).tolist(),
      max_new_tokens=int(out),
    )
    for i, (g, own, out) in enumerate(lengths)
  ]


def make_model(s: Setup, max_seq_len: int):
  from flax import nnx

  from paxcache.nn import Decoder, DecoderConfig

  return Decoder(
    DecoderConfig(
      vocab_size=s.vocab_size,
      d_model=s.d_model,
      num_layers=s.num_layers,
      num_q_heads=s.num_q_heads,
      num_kv_heads=s.num_kv_heads,
      head_dim=s.head_dim,
      mlp_dim=s.mlp_dim,
      max_seq_len=max_seq_len,
      dtype=s.dtype,
    ),
    rngs=nnx.Rngs(s.seed),
  )


def run_config(
  s: Setup, lengths: np.ndarray, replicas: int, model_size: int, routing: str, repeats: int
) -> dict:
  from paxcache.engine import EngineConfig, Router
  from paxcache.sharding import make_data_mesh

  max_seq_len = s.prefix_len + int(lengths[:, 1:].sum(axis=1).max())
  config = EngineConfig(
    num_blocks=model_size * s.blocks_per_gpu,
    block_size=s.block_size,
    num_host_blocks=1,
    preemption_mode="recompute",
    enable_prefix_caching=True,
    max_num_seqs=s.max_num_seqs,
    max_num_batched_tokens=s.max_num_batched_tokens,
    seed=s.seed,
    async_scheduling=s.async_scheduling,
  )
  # "load": no prompt is long enough for a key, so nothing is routed by prefix.
  affinity_blocks = 1 if routing == "affinity" else max_seq_len + 1
  router = Router.build(
    make_model(s, max_seq_len),
    config,
    make_data_mesh(replicas, model_size),
    affinity_blocks=affinity_blocks,
  )
  t0 = time.perf_counter()
  router.run(make_requests(s, lengths, "warmup", s.seed + 1))
  compile_pass_s = time.perf_counter() - t0
  # A second unmeasured pass: an engine's first step reads an initial token buffer placed
  # unlike the step's own outputs, so that step's shape compiles once more in the next pass.
  router.run(make_requests(s, lengths, "warmup2", s.seed + 1000))
  expected = int(lengths[:, 2].sum())
  passes = []
  for rep in range(repeats):
    before = router.metrics
    t0 = time.perf_counter()
    outputs = router.run(make_requests(s, lengths, f"measured{rep}", s.seed + 2 + rep))
    seconds = time.perf_counter() - t0
    after = router.metrics
    total, prev = after.total, before.total
    generated = total.generated_tokens - prev.generated_tokens
    if len(outputs) != len(lengths) or generated != expected:
      raise RuntimeError(
        f"finished {len(outputs)}/{len(lengths)}, generated {generated}/{expected}"
      )
    passes.append(
      dict(
        seconds=seconds,
        generated=generated,
        computed=total.computed_tokens - prev.computed_tokens,
        prefix_hits=total.prefix_hit_tokens - prev.prefix_hit_tokens,
        preemptions=total.preemptions - prev.preemptions,
        routed=[a - b for a, b in zip(after.routed, before.routed, strict=True)],
        steps=[a.steps - b.steps for a, b in zip(after.replicas, before.replicas, strict=True)],
      )
    )
  first = passes[0]
  rate = Timing.of(p["generated"] / p["seconds"] for p in passes)
  wall = Timing.of(p["seconds"] for p in passes)
  return {
    "replicas": replicas,
    "model_size": model_size,
    "devices": replicas * model_size,
    "routing": routing,
    "requests": len(lengths),
    "generated_tokens": first["generated"],
    "seconds": round(wall.median, 3),
    "tokens_per_s": round(rate.median, 1),
    "tokens_per_s_min": round(rate.min, 1),
    "tokens_per_s_max": round(rate.max, 1),
    "repeats": repeats,
    "computed_tokens": first["computed"],
    "prefix_hit_tokens": first["prefix_hits"],
    "preemptions": first["preemptions"],
    "routed": first["routed"],
    "steps": first["steps"],
    "compile_pass_s": round(compile_pass_s, 1),
  }


def define_flags():
  flags.DEFINE_string("out", None, "output folder", required=True)
  flags.DEFINE_string("replicas", "1,2", "comma-separated replica counts")
  flags.DEFINE_integer("model-size", 1, "devices per replica (tensor parallel)", lower_bound=1)
  flags.DEFINE_integer("blocks-per-gpu", Setup.blocks_per_gpu, "KV blocks per device")
  flags.DEFINE_integer("prefixes", Setup.prefixes, "groups of requests sharing a prefix")
  flags.DEFINE_integer("per-prefix", Setup.per_prefix, "requests per group")
  flags.DEFINE_bool("async-scheduling", True, "overlap scheduling in every replica")
  flags.DEFINE_integer("repeats", 3, "measured passes per configuration", lower_bound=1)
  flags.DEFINE_bool("tiny", False, "a CPU-sized model and workload (a check, not a benchmark)")


def main(args):
  os.makedirs(args.out, exist_ok=True)
  if args.tiny:
    s = Setup(**TINY, async_scheduling=args.async_scheduling)
  else:
    s = Setup(
      blocks_per_gpu=args.blocks_per_gpu,
      prefixes=args.prefixes,
      per_prefix=args.per_prefix,
      async_scheduling=args.async_scheduling,
    )
  lengths = make_lengths(s)
  devs = jax.devices()
  env = dict(
    device=getattr(devs[0], "device_kind", str(devs[0])),
    visible_devices=len(devs),
    jax_version=jax.__version__,
    date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
    setup=dataclasses.asdict(s),
  )
  print(json.dumps(env), flush=True)
  rows = []
  for r in (int(x) for x in args.replicas.split(",")):
    if r * args.model_size > len(devs):
      print(f"skipping {r} x {args.model_size} devices: only {len(devs)} visible", flush=True)
      continue
    for routing in ("affinity",) if r == 1 else ("affinity", "load"):
      row = {**env, **run_config(s, lengths, r, args.model_size, routing, args.repeats)}
      rows.append(row)
      print(json.dumps({k: v for k, v in row.items() if k != "setup"}), flush=True)
      with open(os.path.join(args.out, "dp_router.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
  if not rows:
    return 1
  first = rows[0]
  print()
  print(
    "| replicas x devices | routing | tokens/s (min-max) | vs first | computed tokens | "
    "prefix-hit tokens | preemptions | routed | steps |"
  )
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(
      f"| {r['replicas']} x {r['model_size']} | {r['routing']} | {r['tokens_per_s']} "
      f"({r['tokens_per_s_min']}-{r['tokens_per_s_max']}) | "
      f"{r['tokens_per_s'] / first['tokens_per_s']:.2f}x | {r['computed_tokens']} | "
      f"{r['prefix_hit_tokens']} | {r['preemptions']} | {r['routed']} | {r['steps']} |"
    )
  return 0


if __name__ == "__main__":
  _flags.run(define_flags, main)
