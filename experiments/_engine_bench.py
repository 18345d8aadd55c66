"""End-to-end measurements through :class:`paxcache.engine.Engine` on the device present.

Used by the batch-capacity, block-size and swap-vs-recompute experiments when their
``config.engine.requests > 0``. The model is a small random-weight
``paxcache.nn.Decoder`` (throughput does not depend on the weights; greedy decoding
with no end token makes every request generate exactly its drawn output length).
Request lengths come from the experiment's workload divided by ``length_scale`` so that
a CPU run stays short.

Every measurement first runs the same request lengths once with other prompt tokens
(no prefix hits carry over) to compile the step's bucketed shapes, then reports the
differences of the engine's run metrics over the measured pass: compile time is not
throughput.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from ml_collections import ConfigDict


def default_engine_config(requests: int = 0) -> ConfigDict:
  """The ``config.engine`` block shared by the experiment configs (one field per line)."""
  c = ConfigDict()
  c.requests = requests  # requests per measurement; 0 skips the engine measurements
  c.pool_tokens = 2048  # KV pool in token slots (num_blocks = pool_tokens // block_size)
  c.block_size = 16  # block size where the experiment does not sweep it
  c.length_scale = 8.0  # workload lengths are divided by this (CPU runs stay short)
  c.max_num_seqs = 64  # the engine's batch cap for paged runs
  c.max_num_batched_tokens = 256  # query tokens per step (longer prompts are chunked)
  c.num_host_blocks_share = 1.0  # host pool blocks as a share of device blocks (swap mode)
  c.seed = 0  # prompts and parameters
  # The model (paxcache.nn.DecoderConfig fields).
  c.max_seq_len = 256  # longest request after scaling; longer ones are dropped
  c.vocab_size = 256  # tokens
  c.d_model = 64  # residual width
  c.num_layers = 2  # decoder layers
  c.num_q_heads = 4  # query heads
  c.num_kv_heads = 2  # KV heads
  c.head_dim = 16  # dims per head
  c.mlp_dim = 192  # SwiGLU hidden width
  c.dtype = "float32"  # activations and K/V
  return c


def make_model(ec: ConfigDict):
  from flax import nnx

  from paxcache.nn import Decoder, DecoderConfig

  return Decoder(
    DecoderConfig(
      vocab_size=ec.vocab_size,
      d_model=ec.d_model,
      num_layers=ec.num_layers,
      num_q_heads=ec.num_q_heads,
      num_kv_heads=ec.num_kv_heads,
      head_dim=ec.head_dim,
      mlp_dim=ec.mlp_dim,
      max_seq_len=ec.max_seq_len,
      dtype=ec.dtype,
    ),
    rngs=nnx.Rngs(ec.seed),
  )


def scaled_lengths(ec: ConfigDict, lengths: np.ndarray) -> np.ndarray:
  """The first ``ec.requests`` workload rows divided by ``length_scale`` that fit the model."""
  scaled = np.maximum(1, np.rint(lengths / ec.length_scale)).astype(np.int64)
  scaled = scaled[scaled.sum(axis=1) <= ec.max_seq_len]
  return scaled[: ec.requests]


def _requests(lengths: np.ndarray, ec: ConfigDict, tag: str, seed: int, n: int = 1) -> list:
  from paxcache.engine import Request

  rng = np.random.default_rng(seed)
  return [
    Request(
      request_id=(tag, i),
      prompt=rng.integers(0, ec.vocab_size, int(p)).tolist(),
      max_new_tokens=int(o),
      n=n,
    )
    for i, (p, o) in enumerate(lengths)
  ]


def measure(
  model,
  ec: ConfigDict,
  lengths: np.ndarray,
  *,
  block_size: int,
  max_num_seqs: int,
  preemption_mode: str = "recompute",
  pool_tokens: int | None = None,
) -> dict:
  """Runs ``lengths`` through a fresh engine (after a compile pass); returns metrics deltas."""
  from experiments._kernel_timing import device_label
  from paxcache.engine import Engine, EngineConfig

  num_blocks = (pool_tokens or ec.pool_tokens) // block_size
  engine = Engine(
    model,
    EngineConfig(
      num_blocks=num_blocks,
      block_size=block_size,
      num_host_blocks=max(1, int(num_blocks * ec.num_host_blocks_share)),
      preemption_mode=preemption_mode,
      enable_prefix_caching=False,
      max_num_seqs=max_num_seqs,
      max_num_batched_tokens=ec.max_num_batched_tokens,
      seed=ec.seed,
    ),
  )
  engine.run(_requests(lengths, ec, "warmup", ec.seed + 1))
  before = dataclasses.replace(engine.metrics)
  outputs = engine.run(_requests(lengths, ec, "measured", ec.seed + 2))
  m = engine.metrics
  expected = int(lengths[:, 1].sum())
  generated = m.generated_tokens - before.generated_tokens
  if len(outputs) != len(lengths) or generated != expected:
    raise RuntimeError(
      f"engine finished {len(outputs)} of {len(lengths)} requests and generated "
      f"{generated} of {expected} tokens"
    )
  seconds = m.seconds - before.seconds
  steps = m.steps - before.steps
  computed = m.computed_tokens - before.computed_tokens
  return {
    "requests": len(lengths),
    "generated_tokens": generated,
    "seconds": round(seconds, 3),
    "tokens_per_s": round(generated / seconds, 1),
    "computed_tokens_per_s": round(computed / seconds, 1),
    "steps": steps,
    "mean_batch": round(generated / steps, 2),
    "max_batch": m.max_batch,
    "preemptions": m.preemptions - before.preemptions,
    "swapped_blocks": (m.swapped_out_blocks - before.swapped_out_blocks)
    + (m.swapped_in_blocks - before.swapped_in_blocks),
    "block_size": block_size,
    "pool_tokens": num_blocks * block_size,
    "device": device_label(),
  }


def capacity_throughput(config: ConfigDict, lengths: np.ndarray) -> list[dict]:
  """Paged (batch cap ``max_num_seqs``) against a batch capped at what contiguous
  ``max_seq_len`` reservation fits in the same pool (``pool_tokens // max_seq_len``)."""
  ec = config.engine
  model = make_model(ec)
  scaled = scaled_lengths(ec, lengths)
  contiguous_cap = max(1, ec.pool_tokens // ec.max_seq_len)
  rows = []
  for system, cap in (
    (f"contiguous Max (batch cap {contiguous_cap})", contiguous_cap),
    (f"paged (block {ec.block_size})", ec.max_num_seqs),
  ):
    row = measure(model, ec, scaled, block_size=ec.block_size, max_num_seqs=cap)
    rows.append({"system": system, "batch_cap": cap, **row})
  return rows


def block_size_throughput(config: ConfigDict, lengths: np.ndarray) -> list[dict]:
  ec = config.engine
  model = make_model(ec)
  scaled = scaled_lengths(ec, lengths)
  return [
    measure(model, ec, scaled, block_size=bs, max_num_seqs=ec.max_num_seqs)
    for bs in config.block_sizes
  ]


def preemption_throughput(config: ConfigDict, lengths: np.ndarray) -> list[dict]:
  ec = config.engine
  model = make_model(ec)
  scaled = scaled_lengths(ec, lengths)
  rows = []
  for i, bs in enumerate(config.block_sizes):
    # Alternate which mode runs first, so that drift in a shared machine's load does not
    # always favour the same mode.
    for mode in ("swap", "recompute")[:: 1 if i % 2 == 0 else -1]:
      row = measure(
        model, ec, scaled, block_size=bs, max_num_seqs=ec.max_num_seqs, preemption_mode=mode
      )
      rows.append({"mode": mode, **row})
  return rows
