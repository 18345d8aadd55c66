"""Cascade (shared-prefix) decode attention on GPU in Pallas: three launches, or two.

1. ``_shared_kernel`` (this module): grid ``(row_tiles, num_chunks, num_groups *
   num_kv_heads)``. A program takes one KV head of one group and a tile of ``rows`` query
   rows: ``rows // group`` member rows x the ``group = num_q_heads // num_kv_heads`` query
   heads of that KV head, gathered from ``q`` through ``plan.group_rows``. It runs them
   against one chunk of the group's shared keys ``[0, group_lens[g])`` (the chunk's length
   is set per group at run time, so a group's chunks are even whatever the plan's padded
   width) as tensor-core tiles ``[rows, head_dim] x [head_dim, kv_tile]``, and writes the
   unnormalised float32 partial sums, max and denominator of each (member row, query
   head, chunk) at the member's batch row. Row tiles are the fastest grid axis, so the
   programs that read the same K/V chunk start together and share it through L2: HBM
   sees each shared slot about once per group per step.
   On Hopper, for 16-bit K/V of q's dtype and the head dims and blocks it takes, the
   shared part runs instead on the Mosaic GPU prefill kernel (``prefill_mosaic``; the
   default ``CascadeBlockSizes.shared_kernel="auto"`` picks it there through
   ``kernels.gpu.kernel_backend("cascade")``, "mosaic" asks for it): each (group,
   chunk) is a sequence of a ragged batch whose query rows are the group's members, all
   placed past the chunk's last key, so that every row sees every key of the chunk
   (:func:`shared_partials_mosaic`); the kernel also writes each row's log-sum-exp, and
   its normalised output and that are the partials. XLA gathers the members' queries;
   the partials stay in the kernel's rows (:class:`MosaicShared`), read through each
   batch row's first row. The launch arrays (chunk tables, lengths, tile schedule, first
   rows) are computed in the call from the plan, or built on the host beforehand
   (:func:`schedule_plan`, ``CascadePlan.schedule``).
2. the decode kernel (``kernels.gpu.decode``) with ``row_starts`` and ``return_partials``:
   each row against its own keys ``[row_starts[b], lengths[b])``, split-K partials.
3. one XLA merge of both sets of partials (max, exp2 weights, sums; rows in no group,
   ``row_starts[b] == 0``, take the own part alone). With the Mosaic shared part and a
   one-split own part (:func:`merges_in_own_kernel`; the H100's and H200's defaults at
   100 x (5,000 + 100-500) and 256 x (32,768 + 512)) there is no third launch: the own
   part's kernel (``row_starts`` without ``return_partials``) reads each member's shared
   partials from the Mosaic kernel's rows and merges them before it writes the output
   (``paged_decode``'s ``prefix_*`` arguments).

K/V loads are masked (``0 <= block < num_blocks``, inside the group's length and the
chunk), masked rows load as zeros and their logits are -inf, so NaN in unused slots
cannot leak; 8-bit K/V fold their scales into the scores and into p as in the decode
kernel. The partial outputs of rows in no group are never written: the merge selects
them away (``jnp.where``, never a product with garbage).

The Mosaic shared part's query rows are padded with zero rows to whole 128-row tiles,
and only the members' rows are read back; its K/V steps follow the prefill kernel's rules
(the step holding a chunk's end comes from a zeroed copy, so NaN past it cannot leak).

This module imports nothing from paxcache or flax.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.gpu import _mosaic_interpret_params, kernel_backend, validate_gpu_inputs
from kernels.gpu._softmax import online_softmax_step
from kernels.gpu._widen import DEFAULT_QUANT_WIDEN, QUANT_WIDEN_MODES, widening
from kernels.gpu.decode import (
  _num_sms,
  compute_dtype,
  dot_precision,
  grid_splits,
  paged_decode,
)
from kernels.gpu.tuning import (
  CASCADE_SHARED_KERNELS,
  BlockSizes,
  _is_pow2,
  default_block_sizes,
)

__all__ = [
  "CascadeBlockSizes",
  "MosaicSchedule",
  "cascade_attention",
  "default_cascade_block_sizes",
  "merges_in_own_kernel",
  "resolve_shared_kernel",
  "schedule_plan",
]


@dataclasses.dataclass(frozen=True)
class CascadeBlockSizes:
  """Tiles and launch settings of the GPU cascade kernels (frozen, hashable: a static arg).

  Attributes:
    shared_rows: query rows (member rows x query heads of one KV head) per program of the
      shared kernel; a power of two in [16, 256]. Members per tile are ``shared_rows //
      group`` (at least 1; the tile is padded to a power of two).
    shared_kv_tile: shared keys per inner step (power of two in [16, 256]).
    shared_num_chunks: chunks of each group's shared keys, run by separate programs and
      merged by LSE; None: :func:`choose_num_chunks` (whole waves, fewest chunks).
    shared_num_warps, shared_num_stages: Triton warps and pipeline depth of the shared
      kernel.
    own: the decode kernel's ``kernels.gpu.BlockSizes`` for the own part (None: the
      decode defaults for the shape, with this ``quant_widen``). Its
      ``decode_num_splits`` cuts each row's own keys into that many runs (3 on the H200
      made the cascade 1.5-2.3% faster at 100 x 5,000 and level at 256 x 32,768; Run35 in
      docs/benchmarks.md; not a default, since the count is the decode class's).
    quant_widen: how the shared kernel (and the own part where ``own`` is None) widens
      8-bit K/V for 16-bit q: as ``kernels.gpu.BlockSizes.quant_widen``.
    shared_kernel: "triton" (this module's kernel, every GPU and dtype), "mosaic": the
      Mosaic GPU prefill kernel (``prefill_mosaic``, Hopper; 16-bit q and K/V of one
      dtype, head_dim 64 or 128, blocks of at least 8) run over the members' rows as a
      ragged batch that sees every shared key (:func:`shared_partials_mosaic`), or
      "auto" (default): "mosaic" where it runs (a Hopper GPU, not interpreting, inputs it
      takes), else "triton" (``kernels.gpu.kernel_backend("cascade")``; on the H200 the
      Mosaic part took 0.32 against 0.74 ms at 256 x (32,768 + 512) and was level or
      faster at 100 x 5,000, run29 in docs/benchmarks.md). With "mosaic",
      ``shared_rows``, ``shared_kv_tile``, warps, stages and ``quant_widen`` do not apply
      to the shared part; ``shared_num_chunks`` does.
    shared_mosaic_kv_tile, shared_mosaic_num_slots: the Mosaic kernel's K/V step (64 or
      128 keys) and ring depth (2-4).
  """

  shared_rows: int = 128
  shared_kv_tile: int = 64
  shared_num_chunks: int | None = None
  shared_num_warps: int = 4
  shared_num_stages: int = 3
  own: BlockSizes | None = None
  quant_widen: str = DEFAULT_QUANT_WIDEN
  shared_kernel: str = "auto"
  shared_mosaic_kv_tile: int = 128
  shared_mosaic_num_slots: int = 2

  def __post_init__(self):
    for name, (lo, hi) in {
      "shared_rows": (16, 256),
      "shared_kv_tile": (16, 256),
      "shared_num_warps": (1, 16),
    }.items():
      value = getattr(self, name)
      if not (_is_pow2(value) and lo <= value <= hi):
        raise ValueError(
          f"CascadeBlockSizes.{name} must be a power of two in [{lo}, {hi}], got {value!r}"
        )
    if not (isinstance(self.shared_num_stages, int) and 1 <= self.shared_num_stages <= 8):
      raise ValueError(
        f"CascadeBlockSizes.shared_num_stages must be an int in [1, 8], got "
        f"{self.shared_num_stages!r}"
      )
    c = self.shared_num_chunks
    if c is not None and not (isinstance(c, int) and not isinstance(c, bool) and c >= 1):
      raise ValueError(
        f"CascadeBlockSizes.shared_num_chunks must be None or an int >= 1, got {c!r}"
      )
    if self.quant_widen not in QUANT_WIDEN_MODES:
      raise ValueError(
        f"CascadeBlockSizes.quant_widen must be one of {QUANT_WIDEN_MODES}, "
        f"got {self.quant_widen!r}"
      )
    if self.shared_kernel not in CASCADE_SHARED_KERNELS:
      raise ValueError(
        f"CascadeBlockSizes.shared_kernel must be one of {CASCADE_SHARED_KERNELS}, got "
        f"{self.shared_kernel!r}"
      )
    if self.shared_mosaic_kv_tile not in (64, 128):
      raise ValueError(
        f"CascadeBlockSizes.shared_mosaic_kv_tile must be 64 or 128, got "
        f"{self.shared_mosaic_kv_tile!r}"
      )
    n = self.shared_mosaic_num_slots
    if not (isinstance(n, int) and not isinstance(n, bool) and 2 <= n <= 4):
      raise ValueError(
        f"CascadeBlockSizes.shared_mosaic_num_slots must be an int in [2, 4], got {n!r}"
      )
    if self.own is not None and not isinstance(self.own, BlockSizes):
      raise ValueError(
        f"CascadeBlockSizes.own must be None or a kernels.gpu.BlockSizes, got "
        f"{type(self.own).__name__}"
      )


def default_cascade_block_sizes(*, head_dim: int, q_dtype, kv_dtype) -> CascadeBlockSizes:
  """Per-shape defaults, those of the Triton prefill kernel (the same tile loop; on the H100
  its 128-row tiles ran best with 4 warps: 289 against 231 TFLOP/s with 8,
  docs/gpu_notes.md): 128-row tiles of 64-key steps, 4 warps, 3 stages where the dots'
  operand row (head_dim x the compute dtype's bytes) is at most 256 bytes (bf16 / f16 q at
  head_dim <= 128); 64-row tiles of 32-key steps, 2 stages where registers would run out
  (head_dim 256 in bf16, float32 dots at head_dim >= 128). Not yet timed on a GPU."""
  big = head_dim * compute_dtype(q_dtype, kv_dtype).itemsize > 256
  return CascadeBlockSizes(
    shared_rows=64 if big else 128,
    shared_kv_tile=32 if big else 64,
    shared_num_warps=4,
    shared_num_stages=2 if big else 3,
  )


def _shared_kernel(
  # Whole arrays in GPU global memory; the program gathers its rows.
  glens_ref,  # i32[G]: shared tokens of each group
  gtable_ref,  # i32[G * width]: group_table flattened, -1 where unused
  grows_ref,  # i32[G * M]: group_rows flattened, -1 where unused
  q_ref,  # [batch * num_q_heads, head_dim]
  k_ref,  # [num_kv_heads * num_blocks * block_size, head_dim]
  v_ref,
  # 8-bit K/V only: ks_ref, vs_ref f32[num_kv_heads * num_blocks * block_size]. Then the
  # outputs: o f32[batch * num_q_heads * num_chunks, head_dim] (sum of p @ v), m and den
  # f32[batch * num_q_heads * num_chunks] (max in log2 units, sum of p); row
  # (b * num_q_heads + query head) * num_chunks + chunk, written for member rows only,
  # then ``rows`` scratch rows.
  *refs,
  num_q_heads,
  num_kv_heads,
  group,
  members,
  per_tile,
  rows,
  head_dim,
  block_size,
  num_blocks,
  width,
  kv_tile,
  num_chunks,
  batch,
  scale,
  logit_soft_cap,
  widen,
  quantized,
):
  if quantized:
    ks_ref, vs_ref, o_ref, m_ref, den_ref = refs
  else:
    o_ref, m_ref, den_ref = refs
  t = pl.program_id(0)
  c = pl.program_id(1)
  gh = pl.program_id(2)
  g = gh // num_kv_heads
  h = gh - g * num_kv_heads
  glen = glens_ref[g]

  # Query rows of this tile: row i is member t * per_tile + i // group, head i % group.
  row_ids = jnp.arange(rows, dtype=jnp.int32)
  member = t * per_tile + row_ids // group
  head = h * group + row_ids % group
  in_tile = (row_ids < per_tile * group) & (member < members)
  batch_row = plgpu.load(
    grows_ref.at[g * members + jnp.minimum(member, members - 1)], mask=in_tile, other=-1
  )
  row_ok = in_tile & (batch_row >= 0)
  q_rows = jnp.where(row_ok, batch_row, 0) * num_q_heads + head
  cols = jnp.arange(head_dim, dtype=jnp.int32)
  q = plgpu.load(q_ref.at[q_rows[:, None], cols[None, :]], mask=row_ok[:, None], other=0.0)
  # A tuple: q in the dots' dtype (f16 and clipped in the 16-bit modes), or split in two
  # int8 parts in "int8_qk" (kernels/gpu/_widen.py).
  q = widen.query_state(q)
  prec = dot_precision(widen.cdtype)

  # This program's keys: chunk c of the group's [0, glen), in whole kv tiles.
  tiles = (glen + kv_tile - 1) // kv_tile
  per_chunk = (tiles + num_chunks - 1) // num_chunks
  first = c * per_chunk
  last = jnp.minimum(first + per_chunk, tiles)
  # A tile without a member row (padding of the plan) reads nothing.
  # (A max over int32: a plain reduction that the Triton lowering takes.)
  last = jnp.where(jnp.max(row_ok.astype(jnp.int32)) > 0, last, first)
  head_base = h * (num_blocks * block_size)
  offs = jnp.arange(kv_tile, dtype=jnp.int32)
  shift = int(math.log2(block_size))

  # Tiles below glen // kv_tile hold only shared keys: their logits need no mask (the
  # loads stay masked by the block id, so a -1 is never dereferenced); the chunk's tiles
  # from there on (the group's last, partial tile) are masked by position.
  mid = jnp.clip(glen // kv_tile, first, last)

  def step(j, carry, masked):
    tok = j * kv_tile + offs
    lblk = jnp.right_shift(tok, shift)
    in_table = lblk < width
    blk = plgpu.load(
      gtable_ref.at[g * width + jnp.minimum(lblk, width - 1)], mask=in_table, other=-1
    )
    valid = in_table & (blk >= 0) & (blk < num_blocks)
    if masked:
      valid &= tok < glen  # slots past the shared length may hold anything (NaN)
    kv_rows = (
      head_base + jnp.where(valid, blk, 0) * block_size + jnp.bitwise_and(tok, block_size - 1)
    )
    idx = (kv_rows[:, None], cols[None, :])
    # Masked (other=0), never multiplied by 0: the widening may not keep NaN as NaN.
    k = plgpu.load(k_ref.at[idx], mask=valid[:, None], other=0.0)
    v = widen.widen(plgpu.load(v_ref.at[idx], mask=valid[:, None], other=0.0))
    # f32[rows, kv_tile]
    s = widen.scores(q, k, dot=functools.partial(plgpu.dot, precision=prec))
    if quantized:
      ks = plgpu.load(ks_ref.at[kv_rows], mask=valid, other=0.0)
      s = s * ks[None, :]
    # scale * k_factor: the e4m3 bit trick's 2**8 (1 otherwise).
    (acc, m, den), p = online_softmax_step(
      carry,
      s,
      scale=scale * widen.k_factor,
      logit_soft_cap=logit_soft_cap,
      mask=valid[None, :] if masked else None,
    )
    # sum_j p_j (v_j * s_j) = sum_j (p_j * s_j) v_j: 8-bit V's scales go on p.
    vs = plgpu.load(vs_ref.at[kv_rows], mask=valid, other=0.0) if quantized else None
    acc = widen.accumulate(acc, p, v, vs, dot=functools.partial(plgpu.dot, precision=prec))
    return acc, m, den

  acc = jnp.zeros((rows, head_dim), jnp.float32)
  m = jnp.full((rows,), -jnp.inf, jnp.float32)
  den = jnp.zeros((rows,), jnp.float32)
  carry = lax.fori_loop(first, mid, functools.partial(step, masked=False), (acc, m, den))
  acc, m, den = lax.fori_loop(mid, last, functools.partial(step, masked=True), carry)

  # Rows without a member go to a scratch tail past the n real rows, one row each: the
  # stores are masked, but interpret mode writes a masked lane back as read, and must not
  # collide with a real row of the same store.
  n = num_q_heads * num_chunks * batch
  part_rows = jnp.where(row_ok, (batch_row * num_q_heads + head) * num_chunks + c, n + row_ids)
  plgpu.store(o_ref.at[part_rows[:, None], cols[None, :]], acc, mask=row_ok[:, None])
  plgpu.store(m_ref.at[part_rows], m, mask=row_ok)
  plgpu.store(den_ref.at[part_rows], den, mask=row_ok)


_SMEM_PER_SM = 227 * 1024  # usable shared memory of an H100 / H200 SM


def choose_num_chunks(
  programs_per_chunk: int, max_tiles: int, requested: int | None, *, program_smem: int = 0
) -> int:
  """Chunks per group's shared keys, so that the programs fill the GPU in whole waves.

  The shared kernel is compute-bound and its programs are of equal work, so one full wave
  is as good as many, and every extra chunk costs partials (``B * Hq * chunks * D`` floats
  written and read back). Slots = SMs x programs per SM (from ``program_smem``, the
  program's shared memory: its query tile plus ``stages`` K/V steps). The count is the one
  in ``[lo, 4 lo]`` whose last wave is fullest, fewest on ties, where ``lo`` makes at least
  90% of one wave; at most one chunk per 4 kv tiles of the plan's width.
  """
  if requested is not None:
    return max(1, min(requested, max_tiles))
  per = max(1, programs_per_chunk)
  slots = _num_sms() * max(1, _SMEM_PER_SM // max(1, program_smem))
  cap = max(1, max_tiles // 4)
  lo = min(cap, max(1, -(-9 * slots // (10 * per))))
  hi = min(cap, 4 * lo)
  return max(range(lo, hi + 1), key=lambda c: (c * per / (-(-c * per // slots) * slots), -c))


def shared_partials(
  q,
  k_blocks,
  v_blocks,
  plan,
  *,
  scale,
  logit_soft_cap,
  block_sizes: CascadeBlockSizes,
  interpret=False,
  k_scales=None,
  v_scales=None,
):
  """The shared part: ``(o f32[B, Hq, C, D], m f32[B, Hq, C], den f32[B, Hq, C])`` partials
  at each member's batch row (m in log2 units); rows in no group hold garbage."""
  batch, num_q_heads, head_dim = q.shape
  num_kv_heads, num_blocks, block_size, _ = k_blocks.shape
  num_groups, width = plan.group_table.shape
  members = plan.group_rows.shape[1]
  group = num_q_heads // num_kv_heads
  per_tile = max(1, block_sizes.shared_rows // group)
  rows = max(16, 1 << (per_tile * group - 1).bit_length())
  row_tiles = -(-members // per_tile)
  kv_tile = block_sizes.shared_kv_tile
  max_tiles = max(1, -(-(width * block_size) // kv_tile))
  widen = widening(q.dtype, k_blocks.dtype, block_sizes.quant_widen, matmul=True)
  itemsize = jnp.dtype(widen.cdtype).itemsize
  smem = (rows + 2 * block_sizes.shared_num_stages * kv_tile) * head_dim * itemsize
  num_chunks = choose_num_chunks(
    row_tiles * num_groups * num_kv_heads,
    max_tiles,
    block_sizes.shared_num_chunks,
    program_smem=smem,
  )
  quantized = k_scales is not None
  kernel = functools.partial(
    _shared_kernel,
    num_q_heads=num_q_heads,
    num_kv_heads=num_kv_heads,
    group=group,
    members=members,
    per_tile=per_tile,
    rows=rows,
    head_dim=head_dim,
    block_size=block_size,
    num_blocks=num_blocks,
    width=width,
    kv_tile=kv_tile,
    num_chunks=num_chunks,
    batch=batch,
    scale=scale,
    logit_soft_cap=logit_soft_cap,
    widen=widen,
    quantized=quantized,
  )
  flat_rows = num_kv_heads * num_blocks * block_size
  args = (
    plan.group_lens.astype(jnp.int32),
    plan.group_table.reshape(-1).astype(jnp.int32),
    plan.group_rows.reshape(-1).astype(jnp.int32),
    q.reshape(batch * num_q_heads, head_dim),
    k_blocks.reshape(flat_rows, head_dim),
    v_blocks.reshape(flat_rows, head_dim),
  )
  if quantized:
    args += (k_scales.reshape(flat_rows), v_scales.reshape(flat_rows))
  n = batch * num_q_heads * num_chunks
  n_out = n + rows  # the scratch tail of rows without a member
  o, m, den = pl.pallas_call(
    kernel,
    grid=(row_tiles, num_chunks, num_groups * num_kv_heads),
    out_shape=(
      jax.ShapeDtypeStruct((n_out, head_dim), jnp.float32),
      jax.ShapeDtypeStruct((n_out,), jnp.float32),
      jax.ShapeDtypeStruct((n_out,), jnp.float32),
    ),
    compiler_params=plgpu.CompilerParams(
      num_warps=block_sizes.shared_num_warps, num_stages=block_sizes.shared_num_stages
    ),
    interpret=interpret,
    name=f"paxcache_cascade_shared_bs{block_size}_r{rows}_t{kv_tile}_c{num_chunks}"
    + widen.name_suffix,
  )(*args)
  return (
    o[:n].reshape(batch, num_q_heads, num_chunks, head_dim),
    m[:n].reshape(batch, num_q_heads, num_chunks),
    den[:n].reshape(batch, num_q_heads, num_chunks),
  )


def shared_partials_mosaic(
  q,
  k_blocks,
  v_blocks,
  plan,
  *,
  scale,
  logit_soft_cap,
  block_sizes: CascadeBlockSizes,
  interpret=False,
):
  """The shared part on the Mosaic GPU prefill kernel, as a :class:`MosaicShared`: each
  chunk's normalised output (rounded to q's dtype by the kernel) and its log-sum-exp in
  log2 units, in the kernel's row layout (``at_batch_rows`` gives them at batch rows, as
  :func:`shared_partials`; the own part's kernel can also merge them itself).

  Each (group, chunk) is one sequence of a ragged prefill batch: its query rows are the
  group's members (gathered through ``plan.group_rows``, padded with zero rows to whole
  128-row tiles), its block table the group's blocks of that chunk, its length the
  chunk's keys, and every query row is placed at or past the last key, so the causal
  prefill kernel lets each row see every key of its chunk and masks only the chunk's last
  step. Chunks are whole K/V steps and whole blocks (``max(kv_tile, block_size)``) of
  each group's length, cut at run time (every group's chunks are even); their count fills
  whole waves of CUDA blocks (one a SM) as :func:`choose_num_chunks` picks. The kernel
  writes each row's normalised output and its log-sum-exp; each batch row's partials are
  read from its member slot (rows in no group hold garbage, as :func:`shared_partials`
  gives them: the merge masks them).
  """
  from kernels.gpu import prefill_mosaic as pm

  batch, num_q_heads, head_dim = q.shape
  block_size = k_blocks.shape[2]
  num_groups = plan.group_table.shape[0]
  members = plan.group_rows.shape[1]
  kv_tile = block_sizes.shared_mosaic_kv_tile
  num_slots = block_sizes.shared_mosaic_num_slots
  itemsize = jnp.dtype(q.dtype).itemsize
  pv_via_smem = bool(interpret)
  smem = pm.smem_bytes(head_dim, itemsize, kv_tile, num_slots, pv_via_smem)
  smem += pm.NUM_CONSUMERS * pm.ROWS * 4  # the log-sum-exp windows
  if smem > pm.SMEM_LIMIT_BYTES:
    raise ValueError(
      f"CascadeBlockSizes(shared_kernel='mosaic') with head_dim {head_dim}, "
      f"{jnp.dtype(q.dtype).name}, shared_mosaic_kv_tile={kv_tile} and "
      f"shared_mosaic_num_slots={num_slots} needs {smem} bytes of shared memory, more than "
      f"the {pm.SMEM_LIMIT_BYTES} of an sm_90 SM; use fewer slots or 64-key steps"
    )
  layout = _mosaic_layout(plan, num_q_heads, block_size, block_sizes)
  num_chunks, tiles = layout["num_chunks"], layout["tiles"]
  mpad = tiles * pm.TILE  # query rows of one (group, chunk): whole 128-row tiles
  sch = plan.schedule
  if sch is None:
    # Traced: the plan's arrays are device arrays (or tracers) here.
    sch = _mosaic_schedule(jnp, plan, batch, **layout)
  else:
    _check_schedule(sch, plan, batch, layout)
  table, seq_lens, sched = sch.table, sch.seq_lens, sch.sched
  # Query rows: (group, member) -> q of the member's batch row (zero for padding). Every
  # chunk of a group reads the same rows (the schedule's query shift), into its own outputs.
  rows = jnp.pad(
    plan.group_rows.astype(jnp.int32), ((0, 0), (0, mpad - members)), constant_values=-1
  )
  q_rows = jnp.where((rows >= 0)[..., None, None], q[jnp.clip(rows, 0, batch - 1)], 0)
  q_in = q_rows.reshape(num_groups * mpad, num_q_heads, head_dim).astype(q.dtype)
  o, lse = pm.run_schedule(
    q_in,
    k_blocks,
    v_blocks,
    table,
    seq_lens,
    sched,
    num_groups=int(sched.shape[0]),
    kv_tile=kv_tile,
    num_slots=num_slots,
    scale=scale,
    sliding_window=None,
    logit_soft_cap=logit_soft_cap,
    pv_via_smem=pv_via_smem,
    tiles_per_block=1,
    with_lse=True,
    interpret=interpret,
    num_out_rows=num_groups * num_chunks * mpad,
  )
  o = o.reshape(num_groups * num_chunks * mpad, num_q_heads, head_dim)
  lse = lse.reshape(num_q_heads, num_groups * num_chunks * mpad)
  return MosaicShared(o, lse, sch.first_row, num_chunks, mpad)


def _check_schedule(sch, plan, batch, layout) -> None:
  """Raises ValueError unless ``sch`` is a :class:`MosaicSchedule` of the chunk count,
  shapes and dtypes that this call's ``layout`` traces from ``plan`` (its values are the
  caller's: :func:`schedule_plan`)."""

  def signature(s):
    arrays = (s.table, s.seq_lens, s.sched, s.first_row)
    return s.chunks, tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in arrays)

  want = jax.eval_shape(
    functools.partial(_mosaic_schedule, jnp, batch=batch, **layout),
    dataclasses.replace(plan, schedule=None),
  )
  if not isinstance(sch, MosaicSchedule) or signature(sch) != signature(want):
    raise ValueError(
      f"plan.schedule must be the MosaicSchedule of this call ({want.chunks} chunks a "
      f"group: kernels.gpu.cascade.schedule_plan with this call's heads, block size and "
      f"CascadeBlockSizes), got {sch!r:.200}"
    )


def _mosaic_layout(plan, num_q_heads, block_size, block_sizes) -> dict:
  """The Mosaic shared part's static layout of ``plan`` (keyword arguments of
  :func:`_mosaic_schedule`): ``tiles`` 128-row query tiles a (group, chunk), chunks of
  ``unit`` keys (whole K/V steps and whole blocks), ``num_chunks`` a group."""
  from kernels.gpu import prefill_mosaic as pm

  num_groups, width = plan.group_table.shape
  tiles = -(-plan.group_rows.shape[1] // pm.TILE)
  unit = max(block_sizes.shared_mosaic_kv_tile, block_size)
  # One CUDA block an SM whatever its shared memory: its three warpgroups' registers
  # (232 / 40 a thread) fill the SM.
  num_chunks = choose_num_chunks(
    num_q_heads * num_groups * tiles,
    max(1, -(-(width * block_size) // unit)),
    block_sizes.shared_num_chunks,
    program_smem=pm.SMEM_LIMIT_BYTES,
  )
  return dict(num_chunks=num_chunks, tiles=tiles, unit=unit, block_size=block_size)


def _mosaic_schedule(xp, plan, batch, *, num_chunks, tiles, unit, block_size):
  """The Mosaic shared part's launch arrays from the plan, with ``xp`` NumPy (on the host,
  :func:`schedule_plan`) or ``jax.numpy`` (traced, when the plan carries none): a
  :class:`MosaicSchedule`."""
  from kernels.gpu import prefill_mosaic as pm

  i32 = xp.int32
  num_groups, width = plan.group_table.shape
  members = plan.group_rows.shape[1]
  mpad = tiles * pm.TILE
  # Chunk boundaries per group: whole units (K/V steps and blocks), even within a group.
  glens = xp.clip(plan.group_lens.astype(i32), 0, width * block_size)
  clen = (-(-glens // num_chunks) + unit - 1) // unit * unit  # [G], a multiple of unit
  first = clen[:, None] * xp.arange(num_chunks, dtype=i32)  # [G, C] first key
  seq_lens = xp.clip(glens[:, None] - first, 0, clen[:, None])  # [G, C]
  per_chunk = -(-(width * block_size) // num_chunks)
  max_keys = -(-per_chunk // unit) * unit  # >= every group's clen
  cwidth = max_keys // block_size  # table columns of a chunk (static bound)
  col = (first // block_size)[:, :, None] + xp.arange(cwidth, dtype=i32)
  table = xp.take_along_axis(
    plan.group_table.astype(i32)[:, None, :], xp.minimum(col, width - 1), axis=2
  )
  table = xp.where(col < width, table, -1).reshape(num_groups * num_chunks, cwidth)
  seq_lens = seq_lens.reshape(num_groups * num_chunks)
  # Schedule: tile t of sequence s = t // tiles = (group g, chunk c) writes rows [128 t,
  # 128 (t + 1)) and reads q at [g * mpad + 128 i, ...) for i = t % tiles (query shift:
  # that minus 128 t), its first row at position klen (past every key), keys [0, klen).
  t = xp.arange(num_groups * num_chunks * tiles, dtype=i32)
  seq = t // tiles
  klen = seq_lens[seq]
  qshift = (seq // num_chunks) * mpad + (t % tiles) * pm.TILE - t * pm.TILE
  sched = xp.stack([t * pm.TILE, (t + 1) * pm.TILE, klen, seq, klen, qshift], axis=1)
  sched = xp.pad(sched, ((0, 0), (0, 2))).astype(i32)
  # Each batch row's member slot g * M + i (a scatter of G * M ids), then its first kernel
  # row (g * C) * mpad + i (chunk c: + c * mpad); -1 for rows in no group (row_starts 0).
  idx = plan.group_rows.astype(i32).reshape(-1)
  ids = xp.arange(num_groups * members, dtype=i32)
  if xp is np:
    slot = np.zeros((batch,), np.int32)
    slot[idx[idx >= 0]] = ids[idx >= 0]
  else:
    slot = xp.zeros((batch,), i32).at[xp.where(idx >= 0, idx, batch)].set(ids, mode="drop")
  first_row = (slot // members) * (num_chunks * mpad) + slot % members
  first_row = xp.where(plan.row_starts > 0, first_row, -1).astype(i32)
  return MosaicSchedule(table, seq_lens, sched, first_row, num_chunks)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MosaicSchedule:
  """The Mosaic shared part's launch arrays for one plan (``CascadePlan.schedule``), built
  on the host by :func:`schedule_plan` (a call then runs no small kernels to make them).

  Attributes:
    table: ``i32[G * C, chunk_blocks]``: each (group, chunk)'s block ids, -1 past them.
    seq_lens: ``i32[G * C]``: keys of each (group, chunk).
    sched: ``i32[G * C * tiles, 8]``: the prefill kernel's schedule of query tiles.
    first_row: ``i32[B]``: each batch row's first kernel output row (chunk c: ``+ c *
      tiles * 128``), -1 for rows in no group.
    chunks: chunks a group (static).
  """

  table: Any
  seq_lens: Any
  sched: Any
  first_row: Any
  chunks: int = dataclasses.field(metadata=dict(static=True))


def schedule_plan(
  plan,
  *,
  num_q_heads: int,
  head_dim: int,
  q_dtype,
  kv_dtype,
  block_size: int,
  block_sizes: CascadeBlockSizes | None = None,
  interpret: bool = False,
):
  """``plan`` (host NumPy, from ``kernels.plan_cascade``) with its Mosaic shared part's
  launch arrays (:class:`MosaicSchedule`) in ``plan.schedule``, when a GPU cascade call of
  these heads, dtypes, block size and ``block_sizes`` (None: the defaults) runs its shared
  part on Mosaic; else ``plan`` unchanged. NumPy only, outside jit. A call with it runs 5
  small XLA kernels fewer (7 at 256 x (32,768 + 512)): 4-5% of one cascade call at 100 x
  (5,000 + 100-500) on an H100 (docs/benchmarks.md, Run36). Inside one jit of several
  layers the traced arrays are computed once for all of them (XLA merges the identical
  computations), so the engine does not build them on the host.

  The schedule belongs to the plan's values: a call checks only that its settings, shapes
  and dtypes match, so a plan whose arrays change afterwards (``dataclasses.replace``)
  needs a new one (or ``schedule=None``).

  Raises:
    ValueError: ``plan``'s arrays are not host NumPy arrays.
  """
  if block_sizes is None:
    block_sizes = default_cascade_block_sizes(head_dim=head_dim, q_dtype=q_dtype, kv_dtype=kv_dtype)
  block_sizes = resolve_shared_kernel(
    block_sizes,
    q_dtype=q_dtype,
    kv_dtype=kv_dtype,
    head_dim=head_dim,
    block_size=block_size,
    interpret=interpret,
  )
  num_groups, width = plan.group_table.shape
  members = plan.group_rows.shape[1]
  if block_sizes.shared_kernel != "mosaic" or not (num_groups and width and members):
    return plan
  for name in ("group_table", "group_lens", "group_rows", "row_starts"):
    if not isinstance(getattr(plan, name), np.ndarray):
      raise ValueError(f"schedule_plan takes a host (NumPy) plan; plan.{name} is not one")
  layout = _mosaic_layout(plan, num_q_heads, block_size, block_sizes)
  sch = _mosaic_schedule(np, plan, len(plan.row_starts), **layout)
  return dataclasses.replace(plan, schedule=sch)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MosaicShared:
  """The Mosaic shared part's outputs in its own layout: ``o [R, Hq, D]`` (normalised, q's
  dtype) and ``lse f32[Hq, R]`` (log2 units) per kernel row; batch row b's chunk c is row
  ``first_row[b] + c * stride`` (garbage for rows in no group)."""

  o: Any
  lse: Any
  first_row: Any
  chunks: int = dataclasses.field(metadata=dict(static=True))
  stride: int = dataclasses.field(metadata=dict(static=True))

  def at_batch_rows(self):
    """``(o f32[B, Hq, C, D], m f32[B, Hq, C], den = 1)``: the partials at batch rows, as
    :func:`shared_partials` gives them and :func:`_merge` takes them (a gather, not a
    scatter: XLA fuses the gathers and transposes into the merge)."""
    first = jnp.maximum(self.first_row, 0)  # rows in no group (-1): garbage, masked later
    rows = first[:, None] + self.stride * jnp.arange(self.chunks, dtype=jnp.int32)
    o_s = self.o[rows].transpose(0, 2, 1, 3).astype(jnp.float32)  # [B, Hq, C, D]
    m_s = self.lse[:, rows].transpose(1, 0, 2)  # [B, Hq, C]
    return o_s, m_s, jnp.ones_like(m_s)


def own_partials(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  plan,
  *,
  scale,
  logit_soft_cap,
  block_sizes: CascadeBlockSizes,
  interpret=False,
  k_scales=None,
  v_scales=None,
  shared=None,
):
  """The own part: each row against its keys ``[plan.row_starts[b], lengths[b])`` by the
  split-K decode kernel, as its partials ``(o f32[B, Hq, S, D], m, den)``; or, given
  ``shared`` (a :class:`MosaicShared`, with a one-split own part), the whole cascade's
  output ``[B, Hq, D]``: the kernel merges those partials itself."""
  prefix = {}
  if shared is not None:
    prefix = dict(
      prefix_o=shared.o,
      prefix_lse=shared.lse,
      prefix_rows=shared.first_row,  # -1: rows in no group merge nothing
      prefix_chunks=shared.chunks,
      prefix_stride=shared.stride,
    )
  return paged_decode(
    q,
    k_blocks,
    v_blocks,
    block_table,
    lengths,
    scale=scale,
    sliding_window=None,
    logit_soft_cap=logit_soft_cap,
    block_sizes=own_block_sizes(q, k_blocks, block_table, block_sizes),
    interpret=interpret,
    k_scales=k_scales,
    v_scales=v_scales,
    row_starts=plan.row_starts,
    return_partials=shared is None,
    **prefix,
  )


def own_block_sizes(q, k_blocks, block_table, block_sizes: CascadeBlockSizes) -> BlockSizes:
  """The own part's decode settings: ``block_sizes.own``, or the decode defaults for the
  shape with the cascade's ``quant_widen``."""
  return block_sizes.own or dataclasses.replace(
    default_block_sizes(
      head_dim=q.shape[2],
      kv_dtype=k_blocks.dtype,
      batch=q.shape[0],
      num_kv_heads=k_blocks.shape[0],
      max_context=block_table.shape[1] * k_blocks.shape[2],
    ),
    quant_widen=block_sizes.quant_widen,
  )


def merges_in_own_kernel(q, k_blocks, block_table, block_sizes: CascadeBlockSizes) -> bool:
  """Whether the own part's kernel merges the Mosaic shared part's partials itself (no
  merge after it): with the Mosaic shared part and a one-split own part."""
  if block_sizes.shared_kernel != "mosaic":
    return False
  own = own_block_sizes(q, k_blocks, block_table, block_sizes)
  splits, _ = grid_splits(
    q.shape[0],
    k_blocks.shape[0],
    block_table.shape[1] * k_blocks.shape[2],
    own.decode_kv_tile,
    own.decode_num_splits,
  )
  return splits == 1


def _merge(shared, own, in_group, out_dtype):
  """Merges the shared partials (of rows ``in_group`` only) with the own ones by max-exp2."""
  o_s, m_s, den_s = shared
  o_o, m_o, den_o = own
  sel = in_group[:, None, None]
  m_s = jnp.where(sel, m_s, -jnp.inf)
  m_max = jnp.maximum(jnp.max(m_s, axis=-1), jnp.max(m_o, axis=-1))[..., None]
  m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
  w_s = jnp.where(sel, jnp.exp2(m_s - m_max), 0.0)  # 0 for rows in no group, empty chunks
  w_o = jnp.exp2(m_o - m_max)
  num = jnp.sum(jnp.where(sel[..., None], o_s, 0.0) * w_s[..., None], axis=2)
  num = num + jnp.sum(o_o * w_o[..., None], axis=2)
  den = jnp.sum(jnp.where(sel, den_s, 0.0) * w_s, axis=-1) + jnp.sum(den_o * w_o, axis=-1)
  out = num / jnp.where(den > 0, den, 1.0)[..., None]
  return out.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("scale", "logit_soft_cap", "block_sizes", "interpret"))
def _cascade(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  plan,
  *,
  scale,
  logit_soft_cap,
  block_sizes,
  interpret,
  k_scales,
  v_scales,
):
  if block_sizes.shared_kernel not in ("triton", "mosaic"):  # cascade_attention resolves it
    raise ValueError(f"_cascade needs a resolved shared_kernel, got {block_sizes.shared_kernel!r}")
  batch = q.shape[0]
  num_groups, width = plan.group_table.shape
  has_groups = num_groups > 0 and width > 0 and plan.group_rows.shape[1] > 0
  kw = dict(scale=scale, logit_soft_cap=logit_soft_cap, block_sizes=block_sizes)

  def mosaic_part():
    mosaic_interpret = _mosaic_interpret_params() if interpret else False
    return shared_partials_mosaic(q, k_blocks, v_blocks, plan, **kw, interpret=mosaic_interpret)

  own_args = (q, k_blocks, v_blocks, block_table, lengths, plan)
  if has_groups and merges_in_own_kernel(q, k_blocks, block_table, block_sizes):
    if k_scales is not None:  # resolve_shared_kernel never picks Mosaic for 8-bit K/V
      raise ValueError("the Mosaic shared part takes 16-bit K/V, not 8-bit with scales")
    return own_partials(*own_args, **kw, interpret=interpret, shared=mosaic_part())
  own = own_partials(*own_args, **kw, interpret=interpret, k_scales=k_scales, v_scales=v_scales)
  if not has_groups:
    in_group = jnp.zeros((batch,), bool)
    shared = tuple(jnp.zeros(x.shape[:2] + (1,) + x.shape[3:], jnp.float32) for x in own)
  else:
    if block_sizes.shared_kernel == "mosaic":
      shared = mosaic_part().at_batch_rows()
    else:
      shared = shared_partials(
        q, k_blocks, v_blocks, plan, **kw, interpret=interpret, k_scales=k_scales, v_scales=v_scales
      )
    # Rows whose shared partials were written: row_starts[b] > 0 only for members of a
    # group with keys (the plan's invariant, checked on the host). A member of a group of
    # length 0 has partials that add nothing (m = -inf, den = 0), so it may be left out;
    # rows in no group (row_starts 0) must be. No scatter over group_rows: one launch less.
    in_group = plan.row_starts > 0
  return _merge(shared, own, in_group, q.dtype)


def resolve_shared_kernel(
  block_sizes: CascadeBlockSizes, *, q_dtype, kv_dtype, head_dim, block_size, interpret
) -> CascadeBlockSizes:
  """``block_sizes`` with ``shared_kernel`` as :func:`cascade_attention` runs it, from the
  one switch point (``kernels.gpu.kernel_backend("cascade")``): "auto" becomes "mosaic" on
  Hopper for what the Mosaic prefill kernel takes, else "triton".

  Raises:
    ValueError: "mosaic" asked for off Hopper (unless interpreting) or for inputs the
      Mosaic prefill kernel does not take; the message says why.
  """
  try:
    shared_kernel = kernel_backend(
      "cascade",
      q_dtype=q_dtype,
      kv_dtype=kv_dtype,
      head_dim=head_dim,
      block_size=block_size,
      requested=block_sizes.shared_kernel,
      interpret=interpret,
    )
  except ValueError as e:
    raise ValueError(
      f"CascadeBlockSizes(shared_kernel='mosaic') runs the shared part on the Mosaic GPU "
      f"prefill kernel, which cannot take this call: {e}. shared_kernel='triton' takes "
      "every GPU, dtype and block size ('auto', the default, picks what runs)"
    ) from e
  return dataclasses.replace(block_sizes, shared_kernel=shared_kernel)


def cascade_attention(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  plan,
  *,
  scale,
  logit_soft_cap,
  interpret=False,
  k_scales=None,
  v_scales=None,
  block_sizes=None,
):
  """Cascade decode attention on GPU (module docstring); called by ``kernels.cascade``.

  Args are those of ``kernels.cascade_attention`` (already validated there, ``scale`` a
  float); ``block_sizes`` is a :class:`CascadeBlockSizes` or None for per-shape defaults.

  Returns:
    ``[batch, num_q_heads, head_dim]`` in ``q.dtype``.
  """
  validate_gpu_inputs(
    q, k_blocks, v_blocks, block_table, lengths, k_scales=k_scales, v_scales=v_scales
  )
  if block_sizes is None:
    block_sizes = default_cascade_block_sizes(
      head_dim=q.shape[2], q_dtype=q.dtype, kv_dtype=k_blocks.dtype
    )
  elif not isinstance(block_sizes, CascadeBlockSizes):
    kind = type(block_sizes)
    raise ValueError(
      "block_sizes for the GPU cascade backend must be a kernels.gpu.cascade."
      f"CascadeBlockSizes, got {kind.__module__}.{kind.__qualname__}"
    )
  block_sizes = resolve_shared_kernel(
    block_sizes,
    q_dtype=q.dtype,
    kv_dtype=k_blocks.dtype,
    head_dim=q.shape[2],
    block_size=k_blocks.shape[2],
    interpret=bool(interpret),
  )
  if q.shape[0] == 0 or block_table.shape[1] == 0 or k_blocks.shape[1] == 0:
    return jnp.zeros(q.shape, q.dtype)
  return _cascade(
    q,
    k_blocks,
    v_blocks,
    block_table,
    lengths,
    plan,
    scale=scale,
    logit_soft_cap=logit_soft_cap,
    block_sizes=block_sizes,
    interpret=interpret,
    k_scales=k_scales,
    v_scales=v_scales,
  )
