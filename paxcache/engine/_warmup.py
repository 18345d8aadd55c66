"""Compile every step shape an engine can meet, before a timed run starts.

The engine pads each step to power-of-two sizes (``EngineConfig.min_*_bucket``,
``build_step_batch``) and JAX compiles one executable per padded shape. An online run
(arrivals over time) meets shapes one by one, and a shape first met in the middle of a
measured run compiles there: seconds per shape on a GPU. :func:`step_shapes` enumerates,
from the engine's configuration alone, a superset of the shapes its steps can take;
:func:`compile_step_shapes` lowers and compiles each (``jit(...).lower(...).compile()``
fills the same caches a call does, so the run's calls of those shapes compile nothing),
on ``threads`` threads (XLA compiles outside the GIL).

What the enumeration covers: greedy or sampled (``sampled``) requests with ``n = 1`` and
no beam search, and no shared blocks (``enable_prefix_caching=False``): such steps have no
copy-on-write pairs, no cascade groups and no beam candidates. Over that, every
combination of padded batch ``b``, padded block-table width ``m`` and padded query tokens
the engine's bounds allow (``max_num_seqs``, ``max_num_batched_tokens``, ``num_blocks``,
``max_seq_len``), and for decode-only steps every padded chunk count of the planned GPU
decode (``EngineConfig.decode_plan``) that rows of those sizes can give, and with
``EngineConfig.decode_steps > 1`` each decode-only shape again as a burst. Unreachable
combinations may be included (they cost compile time, not correctness).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time

import numpy as np

from kernels import INVALID_BLOCK, INVALID_SLOT
from paxcache.block_table import bucket_size
from paxcache.engine._batch import StepBatch


@dataclasses.dataclass(frozen=True, order=True)
class StepShape:
  """One padded step: what ``StepBatch.shape_key`` varies in for the covered requests."""

  num_tokens: int  # padded query tokens (== batch for a decode-only step)
  batch: int  # padded block-table rows (and sample rows)
  max_blocks: int  # padded block-table columns
  decode_only: bool
  plan_chunks: int = 0  # padded chunks of the planned GPU decode; 0: no plan
  sampled: bool = False  # some row samples (temperature > 0)
  burst: int = 1  # decode steps of the call (EngineConfig.decode_steps; decode-only, no plan)


def _powers(lo: int, hi: int) -> list[int]:
  """Powers of two from ``lo`` to ``hi`` (both powers of two), inclusive."""
  out = []
  p = lo
  while p <= hi:
    out.append(p)
    p *= 2
  return out


def _plan_chunk_counts(planner, rows_lo: int, rows_hi: int, row_tokens: int, pool: int):
  """Padded chunk counts ``plan_decode`` can give for ``rows_lo..rows_hi`` rows of at most
  ``row_tokens`` keys each, ``pool`` keys in all.

  A plan has at least one chunk per row with keys and, at chunk size ``c``, at most
  ``rows + keys / c`` chunks (a row of ``s > c`` keys is cut into at most ``ceil(s / c)``
  pieces). ``c`` is the planner's fixed ``chunk_tokens``, or at least its
  ``min_chunk_tokens`` and, without a window, at least ``keys * kv_heads /
  target_programs`` (which caps ``keys / c`` at ``target_programs / kv_heads``). With the
  default floor (``plan.min_chunk_for``), ``c`` is at least ``SMALL_MIN_CHUNK_TOKENS``, and
  without a window either ``MIN_CHUNK_TOKENS`` or at least the share of the keys that gives
  ``SMALL_BATCH_PROGRAMS_PER_SM`` programs per SM, so ``keys / c`` is at most the larger of
  ``keys / MIN_CHUNK_TOKENS`` and ``SMALL_BATCH_PROGRAMS_PER_SM * num_sms / kv_heads``.
  """
  from kernels.gpu import plan as gpu_plan  # only for a GPU planner (heavy import)

  keys = min(rows_hi * row_tokens, pool)
  kv_heads = planner.num_kv_heads
  target = gpu_plan.PROGRAMS_PER_SM * gpu_plan.num_sms()
  if planner.chunk_tokens is not None:
    extra = keys // planner.chunk_tokens
  elif planner.min_chunk_tokens is not None:
    extra = keys // max(planner.min_chunk_tokens, 1)
    if planner.sliding_window is None:
      extra = min(extra, target // kv_heads)
  else:
    extra = keys // gpu_plan.SMALL_MIN_CHUNK_TOKENS
    if planner.sliding_window is None:
      slots = gpu_plan.SMALL_BATCH_PROGRAMS_PER_SM * gpu_plan.num_sms()
      share_bound = max(slots // kv_heads, keys // gpu_plan.MIN_CHUNK_TOKENS)
      extra = min(extra, share_bound, target // kv_heads)
  lo = gpu_plan.bucket(max(rows_lo, 1))
  hi = gpu_plan.bucket(rows_hi + extra)
  return _powers(lo, hi)


def step_shapes(config, max_seq_len: int, planner=None, *, sampled=(False,)) -> list[StepShape]:
  """A superset of the padded shapes an engine's steps can take (see the module docstring).

  Args:
    config: the engine's ``EngineConfig`` (prefix caching off).
    max_seq_len: the engine's maximum sequence length (the model's).
    planner: the engine's ``decode_planner`` (a ``DecodePlanner``) or None.
    sampled: the ``any_sampled`` values to cover: ``(False,)`` for greedy requests only.
  """
  if config.enable_prefix_caching:
    raise ValueError(
      "step_shapes covers steps without shared blocks: set enable_prefix_caching=False "
      "(shared blocks add copy-on-write and cascade shapes it does not enumerate)"
    )
  bs = config.block_size
  pool = config.num_blocks * bs  # no sharing: the rows' keys all fit in the pool
  # Rows in a step: resident sequences, each with >= 1 query token of the step's budget
  # and >= 1 block of the pool.
  rows_max = min(config.max_num_seqs, config.max_num_batched_tokens, config.num_blocks)
  b0 = bucket_size(1, minimum=config.min_batch_bucket)
  batches = [
    b for b in _powers(b0, bucket_size(rows_max, minimum=config.min_batch_bucket))
    if b == b0 or b // 2 + 1 <= rows_max
  ]  # fmt: skip
  blocks_max = min(-(-max_seq_len // bs), config.num_blocks)
  m0 = bucket_size(1, minimum=config.min_blocks_bucket)
  widths = [
    m for m in _powers(m0, bucket_size(blocks_max, minimum=config.min_blocks_bucket))
    if m == m0 or m // 2 + 1 <= blocks_max
  ]  # fmt: skip
  shapes = []
  for s in sampled:
    for b in batches:
      rows_lo = 1 if b == b0 else b // 2 + 1
      rows_hi = min(b, rows_max)
      for m in widths:
        # Decode-only steps: one token per row, padded to the batch.
        plans = [0]
        if planner is not None:
          auto = planner.mode == "auto"
          lo = max(rows_lo, 2) if auto else rows_lo  # "auto" plans two rows or more
          counts = []
          if lo <= rows_hi:
            row_tokens = min(m * bs, max_seq_len)
            counts = _plan_chunk_counts(planner, lo, rows_hi, row_tokens, pool)
          plans = ([0] if auto else []) + counts
        shapes += [StepShape(b, b, m, True, c, s) for c in plans]
        if config.decode_steps > 1:  # a burst: never a decode plan
          shapes.append(StepShape(b, b, m, True, 0, s, config.decode_steps))
        # Steps with a prefill chunk: the query tokens padded to at least the batch.
        least = max(config.min_token_bucket, b)
        for t in _powers(
          bucket_size(least, minimum=least),
          bucket_size(config.max_num_batched_tokens, minimum=least),
        ):
          shapes.append(StepShape(t, b, m, False, 0, s))
  return sorted(set(shapes))


def shape_batch(shape: StepShape, planner=None) -> StepBatch:
  """An all-padding :class:`StepBatch` of ``shape``: what the engine builds for a step of
  that shape, with every row empty (for lowering; nothing reads its values)."""
  t, b, m = shape.num_tokens, shape.batch, shape.max_blocks
  i32 = np.int32
  plan_fields = {}
  if shape.plan_chunks:
    if planner is None:
      raise ValueError(f"{shape} has a decode plan: pass the engine's decode_planner")
    # A real plan of empty rows gives the plan's static part and dtypes; its chunk
    # arrays are then padded to the shape's count.
    p = dataclasses.replace(planner, mode="on")(np.zeros(b, i32), 0)
    plan_fields = dict(
      decode_plan_chunk_seq=np.zeros(shape.plan_chunks, i32),
      decode_plan_chunk_start=np.zeros(shape.plan_chunks, i32),
      decode_plan_chunk_end=np.zeros(shape.plan_chunks, i32),
      decode_plan_seq_first=np.asarray(p.seq_first_chunk),
      decode_plan_seq_chunks=np.asarray(p.seq_num_chunks),
      decode_plan_meta=(p.block_size, p.num_kv_heads, p.kv_tile, p.sliding_window),
    )
  return StepBatch(
    tokens=np.zeros(t, i32),
    prev_index=np.full(t, -1, i32),
    positions=np.zeros(t, i32),
    slot_mapping=np.full(t, INVALID_SLOT, i32),
    cu_q_lens=np.zeros(b + 1, i32),
    block_table=np.full((b, m), INVALID_BLOCK, i32),
    lengths=np.zeros(b, i32),
    logit_rows=np.zeros(b, i32),
    temperature=np.full(b, 1.0 if shape.sampled else 0.0, np.float32),
    top_k=np.zeros(b, i32),
    seeds=np.zeros(b, i32),
    sample_index=np.zeros(b, i32),
    sample_positions=np.zeros(b, i32),
    cow_src=np.zeros(0, i32),
    cow_dst=np.zeros(0, i32),
    cascade_group_table=np.zeros((0, 0), i32),
    cascade_group_lens=np.zeros(0, i32),
    cascade_group_rows=np.zeros((0, 0), i32),
    cascade_row_starts=np.zeros(0, i32),
    decode_only=shape.decode_only,
    any_sampled=shape.sampled,
    burst_slots=np.full((shape.burst - 1, t), INVALID_SLOT, i32)
    if shape.burst > 1
    else np.zeros((0, 0), i32),
    **plan_fields,
  )


@dataclasses.dataclass(frozen=True)
class WarmupReport:
  shapes: tuple[StepShape, ...]
  seconds: float  # wall time of lowering and compiling them all


def compile_step_shapes(engine, shapes=None, *, threads: int = 1, sampled=(False,)):
  """Lowers and compiles the engine's jitted step for every shape of ``shapes`` (default
  :func:`step_shapes` of the engine), ``threads`` at a time; returns a
  :class:`WarmupReport`. Runs nothing on the device and changes no engine state: the
  engine's later calls of these shapes find them compiled."""
  if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
    raise ValueError(f"threads must be an int >= 1, got {threads!r}")
  planner = engine.decode_planner
  if shapes is None:
    shapes = step_shapes(engine.config, engine.max_seq_len, planner, sampled=sampled)
  step, args = engine._step_fn, (engine._params, engine.cache)
  rest = (engine._key, engine._prev_tokens)

  def compile_one(shape):
    step.lower(*args, shape_batch(shape, planner), *rest).compile()

  t0 = time.perf_counter()
  if threads == 1:
    for shape in shapes:
      compile_one(shape)
  else:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      list(pool.map(compile_one, shapes))  # list(): re-raises the first failure
  return WarmupReport(tuple(shapes), time.perf_counter() - t0)


def unwarmed_shapes(engine, report: WarmupReport) -> set[tuple]:
  """The padded shapes (``StepBatch.shape_key``) ``engine`` has called its step with that
  ``report``'s shapes do not include: each compiled during the run (empty when the
  enumeration covered the run)."""
  warmed = {shape_batch(s, engine.decode_planner).shape_key for s in report.shapes}
  return set(engine._shapes) - warmed
