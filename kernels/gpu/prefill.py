"""Ragged (chunked) prefill / mixed-batch paged attention on GPU in Pallas Triton.

The ragged batch is cut, in XLA, into a schedule of query tiles: each tile is up to
``q_tile`` consecutive query rows of one sequence (or of the padding before
``cu_q_lens[0]`` / after ``cu_q_lens[-1]``, whose rows are written as zeros). Grid
``(num_q_heads, num_tiles)``: the query heads run fastest, so the programs of one
GQA group, which read the same K/V, run side by side and share them in L2. Tiles
are ordered by work, longest first, so the causal tail does not straggle.

A tile's queries sit at positions ``pos0 .. pos0 + rows - 1`` and attend to keys
``<= pos`` (and ``> pos - window``). K/V tiles of ``kv_tile`` positions are gathered
through the block table as in the decode kernel. K/V tiles that every row of the
tile sees entirely run without any mask; only the tiles on the causal diagonal and
the window's edge (and the tail past the length) are masked. Every gathered load is
masked by the block id being a real block, so ``-1`` entries are never read.

A head_dim that is not a power of two is computed in tiles of the next power of two, its
extra columns masked on every load and store (as in ``decode.py``: arrays keep their real
head_dim in HBM); a power-of-two head_dim emits no column mask.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.gpu._softmax import online_softmax_step
from kernels.gpu._widen import widening
from kernels.gpu.decode import dot_precision, head_cols, tile_mask
from kernels.gpu.tuning import BlockSizes

# Schedule columns (int32 [num_tiles, _NCOL]).
_START, _END, _POS0, _SEQ, _KLEN = range(5)
_NCOL = 8


def heads_per_program(group: int, q_tile: int, requested: int | None) -> int:
  """Query heads of one GQA group that share a prefill program (a power of two).

  Auto: the largest power of two dividing ``group`` that leaves >= 16 tokens per tile;
  more heads per program means each K/V tile feeds more rows (higher arithmetic
  intensity, fewer L2 reads) and a decode row fills ``hp`` rows instead of one.
  """
  if requested is not None:
    return requested
  hp = 1
  while group % (2 * hp) == 0 and q_tile // (2 * hp) >= 16:
    hp *= 2
  return hp


def build_schedule(
  cu_q_lens, lengths, num_tokens: int, q_tile: int, sliding_window, align: int = 1
):
  """Query tiles of a ragged batch, heaviest first.

  With ``align > 1`` a segment's tiles are laid on the grid of multiples of ``align``:
  tile ``k`` of a segment starting at row ``s`` covers ``[a + k * q_tile, a + (k + 1) *
  q_tile)`` clipped to the segment, ``a = s - s % align`` (so every tile lies in one
  aligned ``q_tile``-row window; only a segment's first tile is shortened).

  Returns int32 [max_tiles, 8]: row start, row end (exclusive), position of the
  first row, sequence id, key length (0 for padding tiles, which only write zeros).
  """
  batch = lengths.shape[0]
  cu = jnp.clip(cu_q_lens.astype(jnp.int32), 0, num_tokens)
  cu = lax.cummax(cu)  # a malformed (decreasing) cu_q_lens cannot make rows overlap
  seg_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), cu])
  seg_end = jnp.concatenate([cu, jnp.full((1,), num_tokens, jnp.int32)])
  seg_base = seg_start - seg_start % align
  seg_len = seg_end - seg_base
  seg_tiles = jnp.where(seg_end > seg_start, (seg_len + q_tile - 1) // q_tile, 0)
  cum = jnp.cumsum(seg_tiles)
  # Each segment adds at most one tile beyond ceil(rows / q_tile) (two with alignment).
  max_tiles = -(-num_tokens // q_tile) + (batch + 2) * (2 if align > 1 else 1)
  tile = jnp.arange(max_tiles, dtype=jnp.int32)
  seg = jnp.searchsorted(cum, tile, side="right").astype(jnp.int32)
  real = seg < batch + 2
  seg = jnp.minimum(seg, batch + 1)
  local = tile - (cum[seg] - seg_tiles[seg])
  start = seg_base[seg] + local * q_tile
  end = jnp.minimum(start + q_tile, seg_end[seg])
  start = jnp.maximum(start, seg_start[seg])
  is_seq = real & (seg >= 1) & (seg <= batch)
  b = jnp.clip(seg - 1, 0, batch - 1)
  q_len = cu[b + 1] - cu[b]
  pos0 = lengths[b] - q_len + (start - cu[b])
  klen = jnp.where(is_seq, lengths[b], 0)
  start = jnp.where(real, start, 0)
  end = jnp.where(real, end, 0)
  pos0 = jnp.where(is_seq, pos0, 0)
  # Work of a tile ~ keys its last row sees; heaviest first.
  pos_last = pos0 + (end - start) - 1
  hi = jnp.clip(pos_last + 1, 0, klen)
  lo = jnp.zeros_like(hi) if sliding_window is None else jnp.clip(pos0 - sliding_window + 1, 0, hi)
  order = jnp.argsort(-(hi - lo), stable=True)
  cols = [start, end, pos0, b, klen]
  sched = jnp.stack(cols + [jnp.zeros_like(start)] * (_NCOL - len(cols)), axis=1)
  return sched[order]


def _prefill_kernel(
  # Each ref is a whole array in GPU global memory (no BlockSpec): the program gathers
  # its own rows. The pools are seen with one row per token slot.
  sched_ref,  # i32[num_tiles * _NCOL]: build_schedule's rows, flattened
  table_ref,  # i32[batch * max_blocks]: block_table flattened, -1 where unused
  q_ref,  # [num_tokens * num_q_heads, head_dim]: row token * num_q_heads + query head
  k_ref,  # [num_kv_heads * num_blocks * block_size, head_dim]: K pool, row = slot
  v_ref,  # [num_kv_heads * num_blocks * block_size, head_dim]: V pool, row = slot
  # 8-bit K/V only (quantized=True): ks_ref, vs_ref f32[num_kv_heads * num_blocks *
  # block_size], the scale of each slot's row; then the output:
  # o_ref [num_tokens * num_q_heads, head_dim] in q.dtype, rows as in q_ref
  *refs,
  num_q_heads,
  group,
  heads_per_program,
  head_dim,
  block_size,
  num_blocks,
  max_blocks,
  q_tile,
  kv_tile,
  scale,
  sliding_window,
  logit_soft_cap,
  widen,
  quantized=False,
):
  if quantized:
    ks_ref, vs_ref, o_ref = refs
  else:
    (o_ref,) = refs
  hg = pl.program_id(0)  # heads hg * heads_per_program + [0, heads_per_program)
  i = pl.program_id(1)
  start = sched_ref[i * _NCOL + _START]
  end = sched_ref[i * _NCOL + _END]
  pos0 = sched_ref[i * _NCOL + _POS0]
  b = sched_ref[i * _NCOL + _SEQ]
  klen = sched_ref[i * _NCOL + _KLEN]
  kvh = (hg * heads_per_program) // group

  # Tiles are `width` = head_dim padded to a power of two columns wide; col_ok masks the
  # columns past head_dim (None when there are none).
  cols, col_ok = head_cols(head_dim)
  width = cols.shape[0]
  # Row r of the tile is token r // heads_per_program, query head r % heads_per_program
  # (of this program's heads): the heads of one GQA group share every K/V load.
  r = jnp.arange(q_tile, dtype=jnp.int32)
  hp_shift = int(math.log2(heads_per_program))
  t = jnp.right_shift(r, hp_shift)
  row_ok = start + t < end
  q_rows = (
    (start + t) * num_q_heads + hg * heads_per_program + jnp.bitwise_and(r, heads_per_program - 1)
  )
  # [q_tile, width]; rows past the tile's end (and columns past head_dim) are zero.
  q_idx = (q_rows[:, None], cols[None, :])
  q = plgpu.load(q_ref.at[q_idx], mask=tile_mask(row_ok, col_ok), other=0.0)
  # A tuple: q in the dots' dtype (f16 and clipped in the 16-bit modes), or split in two
  # int8 parts in "int8_qk" (kernels/gpu/_widen.py).
  q = widen.query_state(q)
  prec = dot_precision(widen.cdtype)
  pos = pos0 + t
  pos_last = pos0 + (end - start) - 1

  hi = jnp.clip(pos_last + 1, 0, klen)  # keys [lo, hi) are seen by some row
  full_hi = jnp.clip(pos0 + 1, 0, hi)  # keys < full_hi are seen by every row ...
  if sliding_window is None:
    lo = jnp.zeros_like(hi)
    full_lo = lo
  else:
    lo = jnp.clip(pos0 - sliding_window + 1, 0, hi)
    full_lo = jnp.clip(pos_last - sliding_window + 1, 0, hi)  # ... and keys >= full_lo
  j0 = lo // kv_tile
  j3 = (hi + kv_tile - 1) // kv_tile
  j1 = jnp.clip((full_lo + kv_tile - 1) // kv_tile, j0, j3)
  j2 = jnp.clip(full_hi // kv_tile, j1, j3)

  head_base = kvh * (num_blocks * block_size)
  offs = jnp.arange(kv_tile, dtype=jnp.int32)
  shift = int(math.log2(block_size))

  def step(j, carry, masked):
    tok = j * kv_tile + offs  # i32[kv_tile]: key positions of this step
    lblk = jnp.right_shift(tok, shift)
    in_table = lblk < max_blocks
    blk = plgpu.load(
      table_ref.at[b * max_blocks + jnp.minimum(lblk, max_blocks - 1)], mask=in_table, other=-1
    )
    blk_ok = in_table & (blk >= 0) & (blk < num_blocks)
    if masked:
      # Slots past the length may hold anything (NaN): never load them, or 0 * NaN
      # would reach the output through p @ v.
      blk_ok &= tok < klen
    kv_rows = (
      head_base + jnp.where(blk_ok, blk, 0) * block_size + jnp.bitwise_and(tok, block_size - 1)
    )
    idx = (kv_rows[:, None], cols[None, :])
    # [kv_tile, width] each; rows not loaded are zero.
    kv_mask = tile_mask(blk_ok, col_ok)
    # Masked (other=0), never multiplied by 0: the widening may not keep NaN as NaN.
    k = plgpu.load(k_ref.at[idx], mask=kv_mask, other=0.0)
    v = widen.widen(plgpu.load(v_ref.at[idx], mask=kv_mask, other=0.0))
    # f32[q_tile, kv_tile]
    s = widen.scores(q, k, dot=functools.partial(plgpu.dot, precision=prec))
    if quantized:
      # Dequantise in the kernel: (q . k_row) * k_scale per key, and p * v_scale below.
      ks = plgpu.load(ks_ref.at[kv_rows], mask=blk_ok, other=0.0)
      s = s * ks[None, :]
    vis = None  # a tile every row sees in full
    if masked:  # bool[q_tile, kv_tile]
      vis = (tok[None, :] <= pos[:, None]) & blk_ok[None, :]
      if sliding_window is not None:
        vis &= tok[None, :] > pos[:, None] - sliding_window
    # scale * k_factor: the e4m3 bit trick's 2**8 (1 otherwise).
    (acc, m, den), p = online_softmax_step(
      carry, s, scale=scale * widen.k_factor, logit_soft_cap=logit_soft_cap, mask=vis
    )
    # sum_j p_j (v_j * s_j) = sum_j (p_j * s_j) v_j: 8-bit V's scales go on p.
    vs = plgpu.load(vs_ref.at[kv_rows], mask=blk_ok, other=0.0) if quantized else None
    acc = widen.accumulate(acc, p, v, vs, dot=functools.partial(plgpu.dot, precision=prec))
    return acc, m, den

  carry = (
    jnp.zeros((q_tile, width), jnp.float32),  # acc: sum of p @ v
    jnp.full((q_tile,), -jnp.inf, jnp.float32),  # m: running max, log2 units
    jnp.zeros((q_tile,), jnp.float32),  # den: running sum of p
  )
  carry = lax.fori_loop(j0, j1, functools.partial(step, masked=True), carry)
  carry = lax.fori_loop(j1, j2, functools.partial(step, masked=False), carry)
  carry = lax.fori_loop(j2, j3, functools.partial(step, masked=True), carry)
  acc, _, den = carry
  out = acc / jnp.where(den > 0, den, 1.0)[:, None]
  plgpu.store(o_ref.at[q_idx], out.astype(o_ref.dtype), mask=tile_mask(row_ok, col_ok))


@functools.partial(
  jax.jit, static_argnames=("scale", "sliding_window", "logit_soft_cap", "block_sizes", "interpret")
)
def paged_prefill(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  cu_q_lens,
  *,
  scale: float,
  sliding_window: int | None,
  logit_soft_cap: float | None,
  block_sizes: BlockSizes,
  interpret: bool = False,
  k_scales=None,
  v_scales=None,
):
  """Ragged prefill / chunked prefill / mixed batch.

  Args:
    q: [num_tokens, num_q_heads, head_dim]; rows of sequence b are
      q[cu_q_lens[b]:cu_q_lens[b + 1]].
    k_blocks, v_blocks: [num_kv_heads, num_blocks, block_size, head_dim].
    block_table: i32[batch, max_blocks] (-1 where unused).
    lengths: i32[batch], including this call's queries.
    cu_q_lens: i32[batch + 1].
    k_scales, v_scales: f32[num_kv_heads, num_blocks, block_size] for 8-bit K/V, else None.

  Returns:
    [num_tokens, num_q_heads, head_dim] in q.dtype; rows outside every sequence are 0.
  """
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads, num_blocks, block_size, _ = k_blocks.shape
  max_blocks = block_table.shape[1]
  group = num_q_heads // num_kv_heads
  q_tile = block_sizes.prefill_q_tile
  kv_tile = block_sizes.prefill_kv_tile
  hp = heads_per_program(group, q_tile, block_sizes.prefill_heads_per_program)
  sched = build_schedule(
    cu_q_lens, lengths.astype(jnp.int32), num_tokens, q_tile // hp, sliding_window
  )
  num_tiles = sched.shape[0]
  widen = widening(q.dtype, k_blocks.dtype, block_sizes.quant_widen, matmul=True)
  kernel = functools.partial(
    _prefill_kernel,
    num_q_heads=num_q_heads,
    group=group,
    heads_per_program=hp,
    head_dim=head_dim,
    block_size=block_size,
    num_blocks=num_blocks,
    max_blocks=max_blocks,
    q_tile=q_tile,
    kv_tile=kv_tile,
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    widen=widen,
    quantized=k_scales is not None,
  )
  flat_rows = num_kv_heads * num_blocks * block_size
  scales = () if k_scales is None else (k_scales.reshape(flat_rows), v_scales.reshape(flat_rows))
  out = pl.pallas_call(
    kernel,
    grid=(num_q_heads // hp, num_tiles),
    out_shape=jax.ShapeDtypeStruct((num_tokens * num_q_heads, head_dim), q.dtype),
    compiler_params=plgpu.CompilerParams(
      num_warps=block_sizes.prefill_num_warps, num_stages=block_sizes.prefill_num_stages
    ),
    interpret=interpret,
    name=f"paxcache_paged_prefill_bs{block_size}_q{q_tile}_k{kv_tile}" + widen.name_suffix,
  )(
    sched.reshape(-1),
    block_table.reshape(-1),
    q.reshape(num_tokens * num_q_heads, head_dim),
    k_blocks.reshape(flat_rows, head_dim),
    v_blocks.reshape(flat_rows, head_dim),
    *scales,
  )
  return out.reshape(num_tokens, num_q_heads, head_dim)
