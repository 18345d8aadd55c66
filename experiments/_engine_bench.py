"""End-to-end measurements through :class:`paxcache.engine.Engine` on the device present.

Used by the batch-capacity, block-size and swap-vs-recompute experiments when their
``config.engine.requests > 0``. The model is a small random-weight
``paxcache.nn.Decoder`` (throughput does not depend on the weights; greedy decoding
with no end token makes every request generate exactly its drawn output length).
Request lengths come from the experiment's workload divided by ``length_scale`` so that
a CPU run stays short, and so do block sizes: a block of ``b`` tokens on real lengths runs
as a block of ``b / length_scale`` on the scaled ones (:func:`engine_block_size`), so that
a block holds the same share of a request as it would unscaled (block 128 at scale 8 runs
as 16, not as 128, which on real lengths would be a block of 1,024). Pool sizes
(``pool_tokens``) are slots for scaled tokens: 2,048 at scale 8 stand for 16,384 real ones.
Rows report both ``block_size`` (real lengths) and ``engine_block_size``.

Every measurement first runs the same request lengths once with other prompt tokens
(no prefix hits carry over) to compile the step's bucketed shapes, then ``repeats``
measured passes (other prompt tokens each) and reports the differences of the engine's run
metrics over them: compile time is not throughput. Throughputs are the median over the
passes with their min-max spread (:mod:`experiments._timing`); steps, batches and
preemptions are the first pass's (they reproduce pass to pass, and a row says so if not).
The experiments compare settings (block sizes, preemption modes, batch caps) with their
passes interleaved (:func:`measure_interleaved`), so that a shared machine's load drift
does not fall on whichever setting runs last.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from ml_collections import ConfigDict


def default_engine_config(requests: int = 0) -> ConfigDict:
  """The ``config.engine`` block shared by the experiment configs (one field per line)."""
  c = ConfigDict()
  c.requests = requests  # requests per measurement; 0 skips the engine measurements
  c.pool_tokens = 2048  # KV pool in scaled token slots (pool_tokens * length_scale real ones)
  c.block_size = 16  # block size (real lengths) where the experiment does not sweep it
  c.length_scale = 8.0  # lengths and block sizes are divided by this (CPU runs stay short)
  c.max_num_seqs = 64  # the engine's batch cap for paged runs
  c.max_num_batched_tokens = 256  # query tokens per step (longer prompts are chunked)
  c.num_host_blocks_share = 1.0  # host pool blocks as a share of device blocks (swap mode)
  c.seed = 0  # prompts and parameters
  c.repeats = 5  # measured passes per measurement: tokens/s is their median, with min-max
  # One JAX job of several processes (python -m paxcache.launch ...): a DistributedEngine
  # on a mesh over every process's devices (docs/scaling.md).
  c.distributed = False
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


def wants_distributed(config: ConfigDict) -> bool:
  """Whether the run is one process of a multi-process JAX job: ``config.engine.distributed``
  (the engine experiments) or ``config.distributed`` (request_rate)."""
  ec = config.get("engine")
  return bool(
    config.get("distributed", False) or (isinstance(ec, ConfigDict) and ec.get("distributed"))
  )


def make_engine(model, engine_config, distributed: bool = False, **kwargs):
  """``Engine(model, engine_config, **kwargs)``, or with ``distributed`` a
  :class:`paxcache.engine.DistributedEngine` on a ``model`` mesh over every process's devices
  (``paxcache.distributed.initialize()`` must have run: ``experiments.run`` calls it)."""
  from paxcache.engine import DistributedEngine, Engine

  if not distributed:
    return Engine(model, engine_config, **kwargs)
  from paxcache.sharding import make_mesh

  config = dataclasses.replace(engine_config, mesh=make_mesh())
  return DistributedEngine(model, config, **kwargs)


def distributed_label() -> dict:
  """Row fields saying where a distributed run ran."""
  import jax

  return {"processes": jax.process_count(), "devices": jax.device_count()}


def engine_block_size(length_scale: float, block_size: int) -> int:
  """The block the engine runs for ``block_size`` on real lengths: ``block_size /
  length_scale``, which must be a whole number >= 1 (a rounded block would not model the
  one named)."""
  scaled = block_size / length_scale
  if scaled < 1 or scaled != int(scaled):
    raise ValueError(
      f"block size {block_size} is not a multiple of length_scale={length_scale:g}: engine "
      "runs divide lengths and block sizes by it alike"
    )
  return int(scaled)


def check_scaled_block_sizes(config: ConfigDict) -> None:
  """Raises ``ValueError`` naming the flag of a block size that an engine run of this config
  (``config.engine.requests > 0``) could not scale with its lengths."""
  ec = config.get("engine")
  if not isinstance(ec, ConfigDict) or ec.get("requests", 0) <= 0 or "length_scale" not in ec:
    return
  sizes = [("engine.block_size", ec.block_size, ec.block_size)] if "block_size" in ec else []
  given = config.get("block_sizes", ())
  sizes += [("block_sizes", given, b) for b in given]
  for flag, value, bs in sizes:
    try:
      engine_block_size(ec.length_scale, bs)
    except ValueError as e:
      where = "" if value is bs else f" (block size {bs})"
      raise ValueError(
        f"--config.{flag}={value!r}{where}: {e} (--config.engine.length_scale)"
      ) from None


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


def _prepare(
  model,
  ec: ConfigDict,
  lengths: np.ndarray,
  *,
  block_size: int,
  max_num_seqs: int,
  preemption_mode: str = "recompute",
  pool_tokens: int | None = None,
) -> dict:
  """A fresh engine for one measurement, after its compile pass (same lengths, other
  prompt tokens, so that no prefix hit carries over).

  ``lengths`` are already scaled (:func:`scaled_lengths`); ``block_size`` is on real lengths
  and runs as :func:`engine_block_size`; ``pool_tokens`` (default ``ec.pool_tokens``) are
  scaled slots."""
  from paxcache.engine import EngineConfig

  engine_bs = engine_block_size(ec.length_scale, block_size)
  num_blocks = (pool_tokens or ec.pool_tokens) // engine_bs
  distributed = bool(ec.get("distributed", False))
  engine = make_engine(
    model,
    EngineConfig(
      num_blocks=num_blocks,
      block_size=engine_bs,
      num_host_blocks=max(1, int(num_blocks * ec.num_host_blocks_share)),
      preemption_mode=preemption_mode,
      enable_prefix_caching=False,
      max_num_seqs=max_num_seqs,
      max_num_batched_tokens=ec.max_num_batched_tokens,
      seed=ec.seed,
    ),
    distributed,
  )
  engine.run(_requests(lengths, ec, "warmup", ec.seed + 1))
  return {
    "engine": engine,
    "lengths": lengths,
    "block_size": block_size,
    "engine_block_size": engine_bs,
    "num_blocks": num_blocks,
    "distributed": distributed,
    "passes": [],
  }


def _one_pass(state: dict, ec: ConfigDict) -> None:
  """One measured pass (other prompt tokens each time); appends its metrics' differences."""
  engine, lengths = state["engine"], state["lengths"]
  rep = len(state["passes"])
  expected = int(lengths[:, 1].sum())
  before = dataclasses.replace(engine.metrics)
  tag = "measured" if rep == 0 else f"measured{rep}"
  outputs = engine.run(_requests(lengths, ec, tag, ec.seed + 2 + rep))
  m = engine.metrics
  generated = m.generated_tokens - before.generated_tokens
  if len(outputs) != len(lengths) or generated != expected:
    raise RuntimeError(
      f"engine finished {len(outputs)} of {len(lengths)} requests and generated "
      f"{generated} of {expected} tokens"
    )
  state["passes"].append(
    {
      "seconds": m.seconds - before.seconds,
      "computed": m.computed_tokens - before.computed_tokens,
      "steps": m.steps - before.steps,
      "preemptions": m.preemptions - before.preemptions,
      "recomputed_tokens": m.recomputed_tokens - before.recomputed_tokens,
      "swapped_blocks": (m.swapped_out_blocks - before.swapped_out_blocks)
      + (m.swapped_in_blocks - before.swapped_in_blocks),
    }
  )


def _row(state: dict) -> dict:
  from experiments._kernel_timing import device_label
  from experiments._timing import Timing, range_text

  passes, lengths = state["passes"], state["lengths"]
  expected = int(lengths[:, 1].sum())
  first = passes[0]
  wall = Timing.of(p["seconds"] for p in passes)
  rate = wall.map(lambda sec: expected / sec)
  computed_rate = Timing.of(p["computed"] / p["seconds"] for p in passes)
  row = {
    "requests": len(lengths),
    "generated_tokens": expected,
    "seconds": round(wall.median, 3),
    "tokens_per_s": round(rate.median, 1),
    "tokens_per_s_min": round(rate.min, 1),
    "tokens_per_s_max": round(rate.max, 1),
    "tokens_per_s_spread": range_text(round(rate.min, 1), round(rate.max, 1), ".1f"),
    "repeats": rate.repeats,
    "computed_tokens_per_s": round(computed_rate.median, 1),
    "steps": first["steps"],
    "mean_batch": round(expected / first["steps"], 2),
    "max_batch": state["engine"].metrics.max_batch,
    "preemptions": first["preemptions"],
    "recomputed_tokens": first["recomputed_tokens"],
    "swapped_blocks": first["swapped_blocks"],
    "block_size": state["block_size"],
    "engine_block_size": state["engine_block_size"],
    "pool_tokens": state["num_blocks"] * state["engine_block_size"],
    "device": device_label(),
  }
  if state["distributed"]:
    row.update(distributed_label())
  for key in ("steps", "preemptions", "recomputed_tokens", "swapped_blocks"):
    if any(p[key] != first[key] for p in passes):
      row[f"{key}_per_pass"] = [p[key] for p in passes]
  return row


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
  """Runs ``lengths`` through a fresh engine (after a compile pass); returns metrics deltas.

  ``lengths`` are already scaled (:func:`scaled_lengths`); ``block_size`` is on real lengths
  and runs as :func:`engine_block_size`; ``pool_tokens`` (default ``ec.pool_tokens``) are
  scaled slots. ``ec.repeats`` passes back to back; to compare settings, use
  :func:`measure_interleaved`."""
  state = _prepare(
    model,
    ec,
    lengths,
    block_size=block_size,
    max_num_seqs=max_num_seqs,
    preemption_mode=preemption_mode,
    pool_tokens=pool_tokens,
  )
  for _ in range(ec.get("repeats", 5)):
    _one_pass(state, ec)
  return _row(state)


def measure_interleaved(model, ec: ConfigDict, lengths: np.ndarray, settings: list[dict]):
  """:func:`measure` for each of ``settings`` (its keyword arguments), with the measured
  passes interleaved: every engine is built and compiled first, then round ``r`` runs one
  pass of each setting, in the given order on even rounds and reversed on odd ones. On a
  shared machine whose load drifts, drift then falls on every setting alike instead of on
  whichever ran last, and each row's min-max spans the same stretch of time. Rows in the
  order of ``settings``, each with ``"interleaved": True``."""
  states = [_prepare(model, ec, lengths, **kw) for kw in settings]
  for rnd in range(ec.get("repeats", 5)):
    for state in states if rnd % 2 == 0 else states[::-1]:
      _one_pass(state, ec)
  return [{**_row(state), "interleaved": True} for state in states]


def capacity_throughput(config: ConfigDict, lengths: np.ndarray) -> list[dict]:
  """Paged (batch cap ``max_num_seqs``) against a batch capped at what contiguous
  ``max_seq_len`` reservation fits in the same pool (``pool_tokens // max_seq_len``),
  their passes interleaved (:func:`measure_interleaved`)."""
  ec = config.engine
  model = make_model(ec)
  scaled = scaled_lengths(ec, lengths)
  contiguous_cap = max(1, ec.pool_tokens // ec.max_seq_len)
  systems = (
    (f"contiguous Max (batch cap {contiguous_cap})", contiguous_cap),
    (f"paged (block {ec.block_size})", ec.max_num_seqs),
  )
  rows = measure_interleaved(
    model,
    ec,
    scaled,
    [dict(block_size=ec.block_size, max_num_seqs=cap) for _, cap in systems],
  )
  return [
    {"system": system, "batch_cap": cap, **row}
    for (system, cap), row in zip(systems, rows, strict=True)
  ]


def block_size_throughput(config: ConfigDict, lengths: np.ndarray) -> list[dict]:
  """One row per block size of ``config.block_sizes``, passes interleaved."""
  ec = config.engine
  model = make_model(ec)
  scaled = scaled_lengths(ec, lengths)
  return measure_interleaved(
    model,
    ec,
    scaled,
    [dict(block_size=bs, max_num_seqs=ec.max_num_seqs) for bs in config.block_sizes],
  )


def preemption_throughput(config: ConfigDict, lengths: np.ndarray) -> list[dict]:
  """One row per block size and preemption mode (swap, recompute), passes interleaved."""
  ec = config.engine
  model = make_model(ec)
  scaled = scaled_lengths(ec, lengths)
  settings = [
    dict(block_size=bs, max_num_seqs=ec.max_num_seqs, preemption_mode=mode)
    for bs in config.block_sizes
    for mode in ("swap", "recompute")
  ]
  rows = measure_interleaved(model, ec, scaled, settings)
  return [{"mode": kw["preemption_mode"], **row} for kw, row in zip(settings, rows, strict=True)]
