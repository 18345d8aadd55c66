"""Tensor parallelism over KV heads through the engine: 1 GPU against N, same pool per GPU.

The same random-weight decoder (a Llama-style model: the weights do not change the speed,
and greedy decoding with no end token makes every request generate exactly its drawn
output length) serves the same requests through :class:`paxcache.engine.Engine`:

* on one device with ``num_blocks = B`` (no mesh), and
* on ``n`` devices with ``EngineConfig(mesh=make_mesh(n))`` and ``num_blocks = n * B``:
  each device holds ``Hkv / n`` KV heads of every block, so every GPU holds the same KV
  bytes as the single GPU, and the pool holds ``n`` times the tokens.

For each it reports the largest batch the engine ran (resident sequences in one step),
generated tokens per second over the whole run, and decode throughput: tokens per second
over the steps with no prefill tokens (pure decode steps), with their mean batch. Each
configuration first runs the same lengths once with other prompt tokens (compiling the
bucketed step shapes), then ``--repeats`` measured passes (other prompt tokens each); the
throughputs are the median over the passes with their min-max spread (``*_min``,
``*_max``, :mod:`experiments._timing`); steps and preemptions reproduce pass to pass.

  python -m experiments.bench.spmd_scaling --out /tmp/spmd [--devices 1,2]

Writes ``OUT/spmd_scaling.jsonl`` and prints a table last.
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
  blocks_per_gpu: int = 1024  # 16,384 token slots of 64 KiB (all layers, K+V, bf16) = 1 GiB
  requests: int = 192
  prompt_range: tuple[int, int] = (256, 1024)
  output_range: tuple[int, int] = (128, 384)
  max_num_seqs: int = 256
  max_num_batched_tokens: int = 2048
  seed: int = 0


def kv_bytes_per_token(s: Setup) -> int:
  itemsize = jax.numpy.dtype(s.dtype).itemsize
  return s.num_layers * 2 * s.num_kv_heads * s.head_dim * itemsize


def make_lengths(s: Setup) -> np.ndarray:
  rng = np.random.default_rng(s.seed)
  prompts = rng.integers(s.prompt_range[0], s.prompt_range[1] + 1, s.requests)
  outputs = rng.integers(s.output_range[0], s.output_range[1] + 1, s.requests)
  return np.stack([prompts, outputs], axis=1)


def run_config(s: Setup, lengths: np.ndarray, num_devices: int, repeats: int = 5) -> dict:
  from flax import nnx

  from paxcache.engine import Engine, EngineConfig, Request
  from paxcache.nn import Decoder, DecoderConfig
  from paxcache.sharding import make_mesh

  model = Decoder(
    DecoderConfig(
      vocab_size=s.vocab_size,
      d_model=s.d_model,
      num_layers=s.num_layers,
      num_q_heads=s.num_q_heads,
      num_kv_heads=s.num_kv_heads,
      head_dim=s.head_dim,
      mlp_dim=s.mlp_dim,
      max_seq_len=int(lengths.sum(axis=1).max()),
      dtype=s.dtype,
    ),
    rngs=nnx.Rngs(s.seed),
  )
  mesh = make_mesh(num_devices) if num_devices > 1 else None
  engine = Engine(
    model,
    EngineConfig(
      num_blocks=num_devices * s.blocks_per_gpu,
      block_size=s.block_size,
      num_host_blocks=1,
      preemption_mode="recompute",
      enable_prefix_caching=False,
      max_num_seqs=s.max_num_seqs,
      max_num_batched_tokens=s.max_num_batched_tokens,
      seed=s.seed,
      metrics_history=1_000_000,
      mesh=mesh,
    ),
  )

  def requests(tag, seed):
    rng = np.random.default_rng(seed)
    return [
      Request(
        request_id=(tag, i),
        prompt=rng.integers(0, s.vocab_size, int(p)).tolist(),
        max_new_tokens=int(o),
      )
      for i, (p, o) in enumerate(lengths)
    ]

  t0 = time.perf_counter()
  engine.run(requests("warmup", s.seed + 1))
  compile_pass_s = time.perf_counter() - t0
  passes = []
  expected = int(lengths[:, 1].sum())
  for rep in range(repeats):
    before = dataclasses.replace(engine.metrics)
    first_step = len(engine.step_metrics)
    tag = "measured" if rep == 0 else f"measured{rep}"
    outputs = engine.run(requests(tag, s.seed + 2 + rep))
    m = engine.metrics
    generated = m.generated_tokens - before.generated_tokens
    if len(outputs) != len(lengths) or generated != expected:
      raise RuntimeError(
        f"finished {len(outputs)}/{len(lengths)}, generated {generated}/{expected}"
      )
    history = list(engine.step_metrics)[first_step:]
    decode = [h for h in history if h.num_prefill_tokens == 0]
    passes.append(
      dict(
        seconds=m.seconds - before.seconds,
        decode=decode,
        decode_tokens=sum(h.num_tokens for h in decode),
        decode_seconds=sum(h.seconds for h in decode),
        steps=m.steps - before.steps,
        preemptions=m.preemptions - before.preemptions,
      )
    )
  first = passes[0]
  decode = first["decode"]
  decode_tokens = first["decode_tokens"]
  wall = Timing.of(p["seconds"] for p in passes)
  tokens_per_s = wall.map(lambda sec: generated / sec)
  decode_rate = (
    Timing.of(p["decode_tokens"] / p["decode_seconds"] for p in passes)
    if all(p["decode_seconds"] for p in passes)
    else None
  )
  step_ms = Timing.of(h.seconds * 1e3 for p in passes for h in p["decode"]) if decode else None
  seconds = wall.median
  row = {
    "devices": num_devices,
    "num_blocks": num_devices * s.blocks_per_gpu,
    "pool_tokens": num_devices * s.blocks_per_gpu * s.block_size,
    "kv_gib_per_gpu": round(s.blocks_per_gpu * s.block_size * kv_bytes_per_token(s) / 2**30, 3),
    "requests": len(lengths),
    "generated_tokens": generated,
    "seconds": round(seconds, 3),
    "tokens_per_s": round(tokens_per_s.median, 1),
    "tokens_per_s_min": round(tokens_per_s.min, 1),
    "tokens_per_s_max": round(tokens_per_s.max, 1),
    "repeats": repeats,
    "max_batch": m.max_batch,
    "decode_steps": len(decode),
    "decode_tokens_per_s": round(decode_rate.median, 1) if decode_rate else None,
    "decode_tokens_per_s_min": round(decode_rate.min, 1) if decode_rate else None,
    "decode_tokens_per_s_max": round(decode_rate.max, 1) if decode_rate else None,
    "decode_mean_batch": round(decode_tokens / len(decode), 2) if decode else None,
    "decode_median_step_ms": round(step_ms.median, 3) if step_ms else None,
    "steps": first["steps"],
    "preemptions": first["preemptions"],
    "compile_pass_s": round(compile_pass_s, 1),
  }
  if any(p["steps"] != first["steps"] or p["preemptions"] != first["preemptions"] for p in passes):
    row["steps_per_pass"] = [p["steps"] for p in passes]
    row["preemptions_per_pass"] = [p["preemptions"] for p in passes]
  return row


def define_flags():
  flags.DEFINE_string("out", None, "output folder", required=True)
  flags.DEFINE_string("devices", "1,2", "comma-separated device counts")
  flags.DEFINE_integer("requests", Setup.requests, "requests per pass")
  flags.DEFINE_integer("blocks-per-gpu", Setup.blocks_per_gpu, "KV blocks per device")
  flags.DEFINE_integer(
    "repeats", 5, "measured passes per device count (median and spread)", lower_bound=1
  )


def main(args):
  os.makedirs(args.out, exist_ok=True)
  s = Setup(requests=args.requests, blocks_per_gpu=args.blocks_per_gpu)
  lengths = make_lengths(s)
  devs = jax.devices()
  env = dict(
    device=getattr(devs[0], "device_kind", str(devs[0])),
    visible_devices=len(devs),
    jax_version=jax.__version__,
    date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
    setup=dataclasses.asdict(s),
    kv_bytes_per_token=kv_bytes_per_token(s),
    mean_prompt=float(lengths[:, 0].mean()),
    mean_output=float(lengths[:, 1].mean()),
  )
  print(json.dumps(env), flush=True)
  rows = []
  for n in (int(x) for x in args.devices.split(",")):
    if n > len(devs):
      print(f"skipping {n} devices: only {len(devs)} visible", flush=True)
      continue
    row = {**env, **run_config(s, lengths, n, repeats=args.repeats)}
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "setup"}), flush=True)
    with open(os.path.join(args.out, "spmd_scaling.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")
  base = rows[0] if rows else None
  print()
  print(
    "| GPUs | pool tokens | KV GiB/GPU | largest batch | tokens/s (min-max) | "
    "decode tok/s (min-max) | "
    "decode mean batch | decode step ms | preemptions |"
  )
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(
      f"| {r['devices']} | {r['pool_tokens']} | {r['kv_gib_per_gpu']} | {r['max_batch']} "
      f"({r['max_batch'] / base['max_batch']:.2f}x) | {r['tokens_per_s']} "
      f"({r['tokens_per_s_min']}-{r['tokens_per_s_max']}; "
      f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x) | {r['decode_tokens_per_s']} "
      f"({r['decode_tokens_per_s_min']}-{r['decode_tokens_per_s_max']}) | "
      f"{r['decode_mean_batch']} | {r['decode_median_step_ms']} | {r['preemptions']} |"
    )


if __name__ == "__main__":
  _flags.run(define_flags, main)
