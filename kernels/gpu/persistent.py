"""An experiment: the planned decode with a persistent grid, its steps flowing across chunks.

Not wired into ``kernels.paged_attention``: ``experiments.bench.gpu_ragged --persistent``
times it beside the planned kernel, to find out whether it is worth wiring in. On an H100
(run30, docs/benchmarks.md) it was slower than the planned kernel in every case, 8 x 4096
included (73.5% of the device ceiling at best, against 80.0%).

Why: at 8 x 4096 (issue 15, item 1) the planned kernel runs 256 programs of one 1,024-key
chunk on 132 SMs and reads 74% of the device ceiling, against 92% asked. Nsight Compute
puts half of its stall samples at the barrier where a step's K/V copy is awaited, and
docs/benchmarks.md ("Run28") names what is left: programs that keep steps in flight
across chunk boundaries. Short rows (the engine's 64 x 512 decode, the cascade's own part)
pay the same start and drain per program.

How: the host (:func:`persistent_schedule`) lists every ``kv_tile`` step of the plan's
chunks in chunk order and gives each of ``num_programs`` programs per KV head a
contiguous range of whole chunks, balanced by steps. Program ``(h, p)`` runs one loop
over its range's steps (one ``fori_loop``, which Triton software-pipelines as a whole:
the next chunk's first step is loaded while the last one of the chunk before is
computed). A step that starts a chunk resets the running state; a step that ends one
writes the chunk's output (a sequence in one chunk) or its partials, with masked stores.
The partials and the merge are the planned kernel's (``planned._merge_kernel``). A step's
row of the schedule holds its sequence, keys and flags, so the loop's first dependent load
is the block table's, as in the planned kernel: Triton must run that chain ahead of every
prefetched step.

16-bit and float32 K/V only; no fused write, no 8-bit K/V (the experiment's scope).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels._validate import validate_decode_plan, validate_inputs
from kernels.gpu._widen import widening
from kernels.gpu.decode import dot_precision, head_cols, tile_mask
from kernels.gpu.plan import DecodePlan, bucket
from kernels.gpu.planned import MERGE_NUM_STAGES, MERGE_NUM_WARPS, _merge_kernel, gathered_step
from kernels.gpu.tuning import BlockSizes

# A step's flags: it starts its chunk, it ends its chunk, its sequence has one chunk.
FIRST, LAST, SINGLE = 1, 2, 4


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["program_steps", "steps"], meta_fields=["kv_tile"]
)
@dataclasses.dataclass(frozen=True)
class PersistentSchedule:
  """Which steps each persistent program runs (host NumPy, built from a DecodePlan).

  Every per-step value a program needs is in the step's own row, indexed by the loop
  counter alone: the kernel's first dependent load is the block table's, as in the
  planned kernel, which keeps the chain Triton must run ahead of each prefetched step
  short.

  Attributes:
    program_steps: i32[P + 1]: program p runs steps ``[program_steps[p],
      program_steps[p + 1])`` of the list below.
    steps: i32[6, S], one column per step (steps padded past the last are never run):
      its chunk (whose partials row it writes), sequence, first key position (a multiple
      of ``kv_tile``), the chunk's keys ``[lo, hi)``, and ``FIRST`` | ``LAST`` |
      ``SINGLE`` flags.
    kv_tile: the keys of a step; the kernel must step by the same (checked per call).
  """

  program_steps: np.ndarray
  steps: np.ndarray
  kv_tile: int


def persistent_schedule(plan: DecodePlan, num_programs: int, kv_tile: int) -> PersistentSchedule:
  """The steps of ``plan``'s chunks (``kv_tile`` keys each) and ``num_programs`` contiguous
  ranges of whole chunks over them, cut where the running count of steps crosses a
  multiple of ``total / num_programs``. Padding chunks have no step."""
  if num_programs < 1:
    raise ValueError(f"num_programs must be >= 1, got {num_programs}")
  if kv_tile < 1 or kv_tile & (kv_tile - 1):
    raise ValueError(f"kv_tile must be a power of two, got {kv_tile}")
  start = np.asarray(plan.chunk_start).astype(np.int64)
  end = np.asarray(plan.chunk_end).astype(np.int64)
  first = start // kv_tile
  steps = np.where(end > start, -(-end // kv_tile) - first, 0)
  done = steps.cumsum()
  before = done - steps
  total = int(done[-1]) if len(done) else 0
  # A chunk goes to the program its first step falls in; the ranges stay whole chunks.
  owner = np.minimum(before * num_programs // max(total, 1), num_programs - 1)
  cuts = np.searchsorted(owner, np.arange(num_programs + 1), side="left")
  edges = np.append(before, total)
  program_steps = edges[cuts].astype(np.int32)
  table = np.zeros((6, bucket(max(total, 1))), np.int32)
  if total:
    c = np.arange(len(steps)).repeat(steps)
    k = np.arange(total) - before[c]
    seq = np.asarray(plan.chunk_seq)[c]
    single = np.asarray(plan.seq_num_chunks)[seq] == 1
    table[0, :total] = c
    table[1, :total] = seq
    table[2, :total] = (first[c] + k) * kv_tile
    table[3, :total] = start[c]
    table[4, :total] = end[c]
    flags = np.where(k == 0, FIRST, 0) | np.where(k == steps[c] - 1, LAST, 0)
    table[5, :total] = flags | np.where(single, SINGLE, 0)
  return PersistentSchedule(program_steps, table, kv_tile)


def _persistent_kernel(
  program_steps_ref,  # i32[P + 1]
  steps_ref,  # i32[6 * S]: PersistentSchedule.steps, flattened (row-major)
  lengths_ref,  # i32[batch] (a sliding window only)
  table_ref,  # i32[batch * max_blocks]
  q_ref,  # [batch * num_q_heads, head_dim]
  k_ref,  # [num_kv_heads * num_blocks * block_size, head_dim]
  v_ref,  # same
  o_ref,  # f32[C * num_q_heads, head_dim]: partials (as planned._chunk_kernel)
  m_ref,  # f32[C * num_q_heads]
  den_ref,  # f32[C * num_q_heads]
  out_ref,  # [batch * num_q_heads, head_dim]: sequences in one chunk
  *,
  num_q_heads,
  group,
  rows,
  head_dim,
  block_size,
  num_blocks,
  max_blocks,
  kv_tile,
  scale,
  sliding_window,
  logit_soft_cap,
  widen,
  num_steps,
):
  h = pl.program_id(0)
  p = pl.program_id(1)
  row_ids = jnp.arange(rows, dtype=jnp.int32)
  row_ok = row_ids < group
  cols, col_ok = head_cols(head_dim)
  width = cols.shape[0]
  prec = dot_precision(widen.cdtype)
  head_base = h * (num_blocks * block_size)
  offs = jnp.arange(kv_tile, dtype=jnp.int32)

  def body(t, carry):
    c = steps_ref[t]
    b = steps_ref[num_steps + t]
    key0 = steps_ref[2 * num_steps + t]
    lo = steps_ref[3 * num_steps + t]
    hi = steps_ref[4 * num_steps + t]
    flags = steps_ref[5 * num_steps + t]
    starts = jnp.bitwise_and(flags, FIRST) != 0
    ends = jnp.bitwise_and(flags, LAST) != 0
    single = jnp.bitwise_and(flags, SINGLE) != 0
    if sliding_window is not None:  # a plan cut without the window: mask it here
      lo = jnp.maximum(lo, lengths_ref[b] - sliding_window)
    # A chunk's first step starts from nothing (the carry is the chunk before's).
    acc, m, den = carry
    acc = jnp.where(starts, 0.0, acc)
    m = jnp.where(starts, -jnp.inf, m)
    den = jnp.where(starts, 0.0, den)
    # The sequence's query heads of KV head h (a few KiB, from L2 after its first step).
    q_row0 = b * num_q_heads + h * group
    q_idx = ((q_row0 + row_ids)[:, None], cols[None, :])
    q = plgpu.load(q_ref.at[q_idx], mask=tile_mask(row_ok, col_ok), other=0.0)
    q = widen.query_state(q)
    acc, m, den = gathered_step(
      (acc, m, den),
      q,
      key0 + offs,
      b=b,
      lo=lo,
      hi=hi,
      table_ref=table_ref,
      k_ref=k_ref,
      v_ref=v_ref,
      scale_refs=None,
      max_blocks=max_blocks,
      num_blocks=num_blocks,
      block_size=block_size,
      head_base=head_base,
      cols=cols,
      col_ok=col_ok,
      widen=widen,
      prec=prec,
      scale=scale,
      logit_soft_cap=logit_soft_cap,
    )
    # A chunk's last step writes it: the output of a sequence in one chunk, else partials.
    whole = row_ok & single & ends
    part = row_ok & jnp.logical_not(single) & ends
    out = (acc / jnp.where(den > 0, den, 1.0)[:, None]).astype(out_ref.dtype)
    o_idx = ((b * num_q_heads + h * group + row_ids)[:, None], cols[None, :])
    plgpu.store(out_ref.at[o_idx], out, mask=tile_mask(whole, col_ok))
    part_rows = c * num_q_heads + h * group + row_ids
    plgpu.store(o_ref.at[part_rows[:, None], cols[None, :]], acc, mask=tile_mask(part, col_ok))
    plgpu.store(m_ref.at[part_rows], m, mask=part)
    plgpu.store(den_ref.at[part_rows], den, mask=part)
    return acc, m, den

  init = (
    jnp.zeros((rows, width), jnp.float32),
    jnp.full((rows,), -jnp.inf, jnp.float32),
    jnp.zeros((rows,), jnp.float32),
  )
  lax.fori_loop(program_steps_ref[p], program_steps_ref[p + 1], body, init)


def persistent_decode(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  plan: DecodePlan,
  schedule: PersistentSchedule,
  *,
  scale: float,
  sliding_window: int | None,
  logit_soft_cap: float | None,
  block_sizes: BlockSizes,
  interpret: bool = False,
):
  """Decode attention by ``plan``'s chunks on ``schedule``'s persistent programs (grid
  ``(num_kv_heads, P)``), then the planned kernel's merge. ``block_sizes``:
  ``decode_kv_tile`` (the schedule's), warps and stages.

  Raises:
    ValueError: what ``kernels.paged_attention`` refuses (``validate_inputs``, and
      ``validate_decode_plan`` for the plan against the call), 8-bit K/V, or a schedule
      made for steps of another size than ``block_sizes.decode_kv_tile``.
  """
  if jnp.dtype(k_blocks.dtype).itemsize == 1:
    raise ValueError("persistent_decode takes 16-bit or float32 K/V (an experiment)")
  validate_inputs(q, k_blocks, v_blocks, block_table, lengths)
  validate_decode_plan(plan, k_blocks, block_table, lengths, None, sliding_window)
  batch, num_q_heads, head_dim = q.shape
  num_kv_heads, num_blocks, block_size, _ = k_blocks.shape
  if schedule.kv_tile != block_sizes.decode_kv_tile:
    raise ValueError(
      f"the schedule's steps are {schedule.kv_tile} keys, block_sizes.decode_kv_tile is "
      f"{block_sizes.decode_kv_tile}: build it with persistent_schedule(plan, P, "
      f"{block_sizes.decode_kv_tile})"
    )
  group = num_q_heads // num_kv_heads
  rows = max(16, 1 << (group - 1).bit_length())
  num_programs = schedule.program_steps.shape[0] - 1
  num_chunks = plan.chunk_seq.shape[0]
  kernel = functools.partial(
    _persistent_kernel,
    num_q_heads=num_q_heads,
    group=group,
    rows=rows,
    head_dim=head_dim,
    block_size=block_size,
    num_blocks=num_blocks,
    max_blocks=block_table.shape[1],
    kv_tile=block_sizes.decode_kv_tile,
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    widen=widening(q.dtype, k_blocks.dtype, block_sizes.quant_widen),
    num_steps=schedule.steps.shape[1],
  )
  flat_rows = num_kv_heads * num_blocks * block_size
  n = num_chunks * num_q_heads
  o, m, den, out = pl.pallas_call(
    kernel,
    grid=(num_kv_heads, num_programs),
    out_shape=(
      jax.ShapeDtypeStruct((n, head_dim), jnp.float32),
      jax.ShapeDtypeStruct((n,), jnp.float32),
      jax.ShapeDtypeStruct((n,), jnp.float32),
      jax.ShapeDtypeStruct((batch * num_q_heads, head_dim), q.dtype),
    ),
    compiler_params=plgpu.CompilerParams(
      num_warps=block_sizes.decode_num_warps, num_stages=block_sizes.decode_num_stages
    ),
    interpret=interpret,
    name=f"paxcache_persistent_decode_bs{block_size}_t{block_sizes.decode_kv_tile}",
  )(
    schedule.program_steps,
    schedule.steps.reshape(-1),
    lengths,
    block_table.reshape(-1),
    q.reshape(-1, head_dim),
    k_blocks.reshape(flat_rows, head_dim),
    v_blocks.reshape(flat_rows, head_dim),
  )
  out = pl.pallas_call(
    functools.partial(_merge_kernel, num_q_heads=num_q_heads, head_dim=head_dim),
    grid=(num_q_heads, batch),
    out_shape=jax.ShapeDtypeStruct((batch * num_q_heads * head_dim,), q.dtype),
    compiler_params=plgpu.CompilerParams(num_warps=MERGE_NUM_WARPS, num_stages=MERGE_NUM_STAGES),
    input_output_aliases={5: 0},
    interpret=interpret,
    name="paxcache_planned_decode_merge",
  )(plan.seq_first_chunk, plan.seq_num_chunks, o, m, den, out.reshape(-1))
  return out.reshape(batch, num_q_heads, head_dim)
