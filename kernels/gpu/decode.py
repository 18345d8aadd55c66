"""Paged decode attention on GPU in Pallas Triton: split-K (flash-decoding) plus a combine.

Grid ``(num_kv_heads, num_splits, batch)``. One program owns one KV head of one
sequence and one chunk of its context; all ``group = num_q_heads // num_kv_heads``
query heads of that KV head are rows of one ``[rows, head_dim]`` tile (rows = group
padded to >= 16 for the tensor cores), so each K/V slot is read from HBM once.

Each inner step covers ``kv_tile`` consecutive token positions whatever the cache's
``block_size``: the rows of the step are gathered through the block table
(``row = block_id * block_size + offset`` in the pool seen as ``[heads * blocks *
block_size, head_dim]``), so block sizes 1..512 share one code path and a step may
span many small blocks or a slice of one big block. Every gathered load is masked
by ``0 <= block_id < num_blocks`` (an unused ``-1`` entry is never dereferenced) and
by the position being visible (``< length``, inside the sliding window); masked rows
load as zeros and their logits are ``-inf``, so NaN in unused slots cannot leak.

A head_dim that is not a power of two (80, 96, 112, 192, ...: any multiple of 16 up
to 256) is computed in tiles of the next power of two (``padded_head_dim``): every load
and store masks the columns past head_dim, so arrays keep their real width in HBM and
no extra byte is read or written; a power-of-two head_dim takes the same code with no
column mask.

8-bit K/V (int8, e4m3, with float32 scales per slot): the scales go on the scores and on
p, and the rows are widened for the dots as ``BlockSizes.quant_widen`` says
(``kernels/gpu/_widen.py``: f16 dots by integer-op widening by default with 16-bit q; the
old widening to q's dtype as ``"q_dtype"``). The planned decode, prefill and cascade
kernels do the same.

With one split the program writes the normalised output in ``q.dtype``; with more
it writes unnormalised float32 partial sums and the running max / denominator, and
``_combine`` (XLA, a few MB at most; one loop fusion up to 8 splits) merges them.

Three options, off by default (the plain decode path compiles to the same kernel without
them), serve cascade attention (``kernels.gpu.cascade``): ``row_starts`` (each row reads
only keys ``[row_starts[b], lengths[b])``), ``return_partials`` (the float32 partial
sums, max and denominator are returned, even with one split, for a merge with other
partials), and the ``prefix_*`` arguments (normalised partials of each row's keys before
``row_starts``, merged by the kernel itself before it writes its output).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels._quant import is_quantized, quantize
from kernels.gpu._softmax import logits_log2, online_softmax_step
from kernels.gpu._widen import widening
from kernels.gpu.plan import num_sms as _num_sms  # one SM count for every rule
from kernels.gpu.tuning import BlockSizes, padded_head_dim


def compute_dtype(q_dtype, kv_dtype):
  """Operand dtype of the kernels' dots in the ``quant_widen="q_dtype"`` mode: the common
  dtype, float32 when they differ; q's dtype for 8-bit K/V (int8 and e4m3 values are
  exact in bf16, f16 and f32). Its itemsize is that of every mode (the 16-bit modes run
  f16 dots where this is bf16); ``kernels.gpu._widen.widening`` gives a call's dtype.
  """
  q_dtype, kv_dtype = jnp.dtype(q_dtype), jnp.dtype(kv_dtype)
  if is_quantized(kv_dtype):
    return q_dtype
  return q_dtype if q_dtype == kv_dtype else jnp.dtype(jnp.float32)


def dot_precision(dtype):
  # Triton's default for a float32 dot is tf32 (~1e-3 relative error); the API
  # promises float32 accuracy, so float32 operands ask for IEEE products.
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def head_cols(head_dim: int):
  """``(cols, col_ok)``: i32[width] column ids of a head-dim tile (width =
  ``tuning.padded_head_dim``) and bool[width] ``cols < head_dim``, or None where the width
  is ``head_dim`` (the static branch that keeps power-of-two head sizes mask-free)."""
  width = padded_head_dim(head_dim)
  cols = jnp.arange(width, dtype=jnp.int32)
  return cols, (None if width == head_dim else cols < head_dim)


def tile_mask(row_mask, col_ok):
  """Mask of a ``[rows, width]`` tile: ``row_mask`` bool[rows] on every column, and only
  the real columns where the head dim is padded (``col_ok`` not None)."""
  if col_ok is None:
    return row_mask[:, None]
  return row_mask[:, None] & col_ok[None, :]


def choose_num_splits(
  batch: int, num_kv_heads: int, max_context: int, kv_tile: int, requested: int | None
) -> int:
  """Splits per (sequence, KV head): enough programs to fill every SM about twice."""
  max_tiles = max(1, -(-max_context // kv_tile))
  if requested is not None:
    return max(1, min(requested, max_tiles))
  target = 2 * _num_sms()
  splits = -(-target // max(1, batch * num_kv_heads))
  # A split shorter than 4 steps spends more on its prologue and combine than it saves.
  splits = min(splits, max(1, max_tiles // 4))
  return max(1, splits)


def grid_splits(
  batch: int, num_kv_heads: int, max_context: int, kv_tile: int, requested: int | None
) -> tuple[int, int]:
  """``(splits, chunk)`` the decode kernel launches with: :func:`choose_num_splits`, then
  each split ``chunk`` keys (whole ``kv_tile`` steps), and as many splits as that takes
  to cover ``max_context`` (3 asked over 4 steps gives chunks of 2 steps, so 2 splits).
  The grid is ``(num_kv_heads, splits, batch)``."""
  splits = choose_num_splits(batch, num_kv_heads, max_context, kv_tile, requested)
  tiles = -(-max_context // kv_tile)
  chunk = -(-tiles // splits) * kv_tile
  return -(-max_context // chunk), chunk


def preloads_own_row(block_sizes: BlockSizes) -> bool:
  """Whether a fused write's decode kernel loads the step's own K/V row before its key loop
  (:func:`load_own_rows`) rather than after it: with pipelines of 3 or more stages.

  Measured on an H100 with the split-K kernel (docs/benchmarks.md, "Run38", calls H and I:
  head_dim 64 and 128, packed q/k/v, 8 pools so that the L2 is cold, round by round):
  loaded first, the calls with 3 stages ran 0.5-7.1% faster (SmolLM2's heads at 16-256
  sequences, the 1B shape's at 16 x 1024 and 32 x 512, head_dim 128 at 32 x 2048;
  intervals apart), the two with 2 stages (the 1B shape's deep grids at 256 x 1024 and 64
  x 512, ``tuning.deep_grid_stages``) 2.2-2.4% and 7.5-8.1% slower. In the engine's step
  (call J) SmolLM2's decode kernels took 4% less. The planned kernel takes the same rule;
  it was timed at head_dim 64 (3 stages, call K: lower in 20 of 24 noisy pairs), and its
  2-stage settings (head_dim 128 in 16 bits) were not timed with the preload."""
  return block_sizes.decode_num_stages >= 3


def _decode_kernel(
  # Each ref is a whole array in GPU global memory (no BlockSpec): the program gathers
  # its own rows. The pools are seen with one row per token slot.
  lengths_ref,  # i32[batch]
  table_ref,  # i32[batch * max_blocks]: block_table flattened, -1 where unused
  q_ref,  # [batch * num_q_heads, head_dim]: row b * num_q_heads + query head. head_dim is
  # the real one (any multiple of 16 up to 256): tiles are padded_head_dim wide, masked.
  k_ref,  # [num_kv_heads * num_blocks * block_size, head_dim]: K pool, row = slot
  v_ref,  # [num_kv_heads * num_blocks * block_size, head_dim]: V pool, row = slot
  # 8-bit K/V only (quantized=True): ks_ref, vs_ref f32[num_kv_heads * num_blocks *
  # block_size], the scale of each slot's row; then the outputs.
  # One split: o [batch * num_q_heads, head_dim] in q's dtype (q_cast where given),
  # normalised. Several: o f32[batch * num_q_heads * num_splits, head_dim] unnormalised,
  # m and den f32[batch * num_q_heads * num_splits] (max in log2 units, sum of p); row
  # (b * num_q_heads + query head) * num_splits + split.
  *out_refs,
  num_q_heads,
  group,
  rows,
  head_dim,
  block_size,
  num_blocks,
  max_blocks,
  kv_tile,
  chunk,
  num_splits,
  scale,
  sliding_window,
  logit_soft_cap,
  widen,
  quantized=False,
  has_starts=False,
  partials=False,
  fused_write=False,
  packed=None,
  prefix=None,
  preload_own=False,
  q_cast=None,
  kv_dtype=None,
):
  if quantized:
    ks_ref, vs_ref, *out_refs = out_refs
  if has_starts:
    starts_ref, *out_refs = out_refs  # i32[batch]: the first key position each row reads
  if prefix is not None:
    # Partials of keys before row_starts (a cascade's shared part), merged into this
    # program's output: normalised outputs [R * num_q_heads, head_dim] (row r * num_q_heads
    # + query head), their log-sum-exp f32[num_q_heads * R] (log2 units, heads-major), and
    # each sequence's first row r0 (-1: none); chunk c of sequence b is row r0 + c * stride.
    pre_o_ref, pre_lse_ref, pre_row_ref, *out_refs = out_refs
  if fused_write:
    # This step's K/V (one row per sequence and KV head, in the pool's dtype; 8-bit pools:
    # float rows, quantized here) and each sequence's slot for them (-1: none); the pools
    # come back as the last two outputs (8-bit: then the two scale pools), the same
    # buffers as k_ref and v_ref (ks_ref, vs_ref) (aliased).
    knew_ref, vnew_ref, slots_ref, *out_refs = out_refs
    scale_outs = ()
    if quantized:
      *out_refs, kout_ref, vout_ref, ksout_ref, vsout_ref = out_refs
      scale_outs = (ksout_ref, vsout_ref)
    else:
      *out_refs, kout_ref, vout_ref = out_refs
  h = pl.program_id(0)
  split = pl.program_id(1)
  b = pl.program_id(2)
  length = lengths_ref[b]
  row_ids = jnp.arange(rows, dtype=jnp.int32)
  row_ok = row_ids < group
  num_kv_heads = num_q_heads // group
  # Rows of q_ref per sequence, and of the step's K/V rows: the query heads and the KV
  # heads, or with a packed q/k/v (``packed``) all of them in one array, [q | k | v].
  seq_rows = num_q_heads if packed is None else packed
  q_row0 = b * seq_rows + h * group
  o_row0 = b * num_q_heads + h * group
  # Gathers index every dimension with an array (rows x columns): that is what both
  # the Triton lowering and interpret mode accept for a row gather. Tiles are `width`
  # columns wide (head_dim padded to a power of two; col_ok None when it is head_dim).
  cols, col_ok = head_cols(head_dim)
  width = cols.shape[0]
  # [rows, width]: the group's query heads, zero rows past the group (and zero columns
  # past head_dim)
  if col_ok is None:
    q = plgpu.load(q_ref.at[pl.ds(q_row0, rows), :], mask=row_ok[:, None], other=0.0)
  else:
    q_idx = ((q_row0 + row_ids)[:, None], cols[None, :])
    q = plgpu.load(q_ref.at[q_idx], mask=tile_mask(row_ok, col_ok), other=0.0)
  o_idx = ((o_row0 + row_ids)[:, None], cols[None, :])
  if q_cast is not None:  # a packed q/k/v wider than the query's dtype (8-bit fused write)
    q = q.astype(q_cast)
  q_plain, softmax_scale = q, scale
  # A tuple: q in the dots' dtype (8-bit K/V with 16-bit q: f16 and clipped to f16's range
  # in the 16-bit modes), or split in two int8 parts in "int8_qk" (kernels/gpu/_widen.py).
  q = widen.query_state(q)
  prec = dot_precision(widen.cdtype)
  # The e4m3 bit trick widens K to its value times 2**-8: the 2**8 goes into the scale.
  scale = scale * widen.k_factor

  start = split * chunk
  # Keys read from the pool: all of them, or with a fused write all but the last, which is
  # this step's own (taken from knew_ref / vnew_ref below, never read back from the pool).
  pool_len = length
  if fused_write:
    slot = slots_ref[b]
    # A slot outside the pool writes nothing (as write_kv's scatter drops it).
    has_new = (slot >= 0) & (slot < num_blocks * block_size) & (length > 0)
    pool_len = jnp.where(has_new, length - 1, length)
  # Position length-1 sees keys > length-1-window, i.e. >= length-window.
  win_lo = None if sliding_window is None else length - sliding_window
  if has_starts:
    # The row's keys are [row_start, pool_len) (and inside the window): the splits share
    # that range in whole steps, evenly, not the table's width (where all but the last
    # split would hold none of a cascade's own keys). Masks below cut the edge steps.
    row_start = starts_ref[b]
    row_lo = row_start if win_lo is None else jnp.maximum(row_start, win_lo)
    row_first = jnp.maximum(row_lo, 0) // kv_tile
    row_steps = jnp.maximum((pool_len + kv_tile - 1) // kv_tile - row_first, 0)
    per_split = (row_steps + num_splits - 1) // num_splits
    first = row_first + split * per_split
    last = jnp.minimum(first + per_split, row_first + row_steps)
  else:
    # This split's chunk of the table's width: keys [start, start + chunk).
    lo = start if win_lo is None else jnp.maximum(start, win_lo)
    first = lo // kv_tile
    last = (jnp.minimum(start + chunk, pool_len) + kv_tile - 1) // kv_tile
  head_base = h * (num_blocks * block_size)
  offs = jnp.arange(kv_tile, dtype=jnp.int32)
  shift = int(math.log2(block_size))

  def body(j, carry):
    tok = j * kv_tile + offs  # i32[kv_tile]: token positions of this step
    lblk = jnp.right_shift(tok, shift)
    in_table = lblk < max_blocks
    blk = plgpu.load(
      table_ref.at[b * max_blocks + jnp.minimum(lblk, max_blocks - 1)], mask=in_table, other=-1
    )
    valid = in_table & (blk >= 0) & (blk < num_blocks) & (tok < pool_len)
    if sliding_window is not None:
      valid &= tok >= length - sliding_window
    if has_starts:
      valid &= tok >= row_start
    kv_rows = (
      head_base + jnp.where(valid, blk, 0) * block_size + jnp.bitwise_and(tok, block_size - 1)
    )
    idx = (kv_rows[:, None], cols[None, :])
    # [kv_tile, width] each; rows of positions the query does not see are zero.
    kv_mask = tile_mask(valid, col_ok)
    # Masked (other=0), never multiplied by 0: the widening may not keep NaN as NaN.
    k = plgpu.load(k_ref.at[idx], mask=kv_mask, other=0.0)
    v = widen.widen(plgpu.load(v_ref.at[idx], mask=kv_mask, other=0.0))
    # f32[rows, kv_tile]
    s = widen.scores(q, k, dot=functools.partial(plgpu.dot, precision=prec))
    if quantized:
      # Dequantise in the kernel: q . (k_row * k_scale) = (q . k_row) * k_scale per key.
      ks = plgpu.load(ks_ref.at[kv_rows], mask=valid, other=0.0)
      s = s * ks[None, :]
    (acc, m, den), p = online_softmax_step(
      carry, s, scale=scale, logit_soft_cap=logit_soft_cap, mask=valid[None, :]
    )
    # sum_j p_j (v_j * s_j) = sum_j (p_j * s_j) v_j: 8-bit V's scales go on p.
    vs = plgpu.load(vs_ref.at[kv_rows], mask=valid, other=0.0) if quantized else None
    acc = widen.accumulate(acc, p, v, vs, dot=functools.partial(plgpu.dot, precision=prec))
    return acc, m, den

  if fused_write:
    own_rows = new_rows(b, h, packed=packed, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads)
    # The split whose key range holds position length - 1 adds it and writes it.
    owns = has_new & (length - 1 >= start) & (length - 1 < start + chunk)
    new = None
    if preload_own:
      new = load_own_rows(knew_ref, vnew_ref, rows_of=own_rows, owns=owns, cols=cols, col_ok=col_ok)
  acc = jnp.zeros((rows, width), jnp.float32)  # sum of p @ v
  m = jnp.full((rows,), -jnp.inf, jnp.float32)  # running max, log2 units
  den = jnp.zeros((rows,), jnp.float32)  # running sum of p
  acc, m, den = lax.fori_loop(first, last, body, (acc, m, den))
  if fused_write:
    acc, m, den = add_own_key(
      (acc, m, den),
      q,
      q_plain,
      (knew_ref, vnew_ref, kout_ref, vout_ref, *scale_outs),
      kv_dtype=kv_dtype if quantized else None,
      rows_of=own_rows,
      pool_row=head_base + jnp.maximum(slot, 0),
      owns=owns,
      cols=cols,
      col_ok=col_ok,
      scale=scale,
      softmax_scale=softmax_scale,
      logit_soft_cap=logit_soft_cap,
      new=new,
    )

  if prefix is not None:
    acc, m, den = merge_prefix(
      (acc, m, den),
      (pre_o_ref, pre_lse_ref),
      first_row=pre_row_ref[b],
      heads=h * group + row_ids,
      row_ok=row_ok,
      cols=cols,
      col_ok=col_ok,
      num_q_heads=num_q_heads,
      **prefix,
    )

  if num_splits == 1 and not partials:
    (o_ref,) = out_refs
    out = (acc / jnp.where(den > 0, den, 1.0)[:, None]).astype(o_ref.dtype)
    if col_ok is None:
      plgpu.store(o_ref.at[pl.ds(o_row0, rows), :], out, mask=row_ok[:, None])
    else:
      plgpu.store(o_ref.at[o_idx], out, mask=tile_mask(row_ok, col_ok))
  else:
    o_ref, m_ref, den_ref = out_refs
    part_rows = (o_row0 + row_ids) * num_splits + split
    plgpu.store(o_ref.at[part_rows[:, None], cols[None, :]], acc, mask=tile_mask(row_ok, col_ok))
    plgpu.store(m_ref.at[part_rows], m, mask=row_ok)
    plgpu.store(den_ref.at[part_rows], den, mask=row_ok)


# Prefix chunks up to this many are loaded before they are merged (unrolled), after the
# key loop; the Mosaic shared part has 1-4 at the shapes (choose_num_chunks).
_UNROLLED_PREFIX_CHUNKS = 8


def merge_prefix(
  carry, refs, *, first_row, heads, row_ok, cols, col_ok, num_q_heads, chunks, stride, total
):
  """``(acc, m, den)`` with ``chunks`` normalised partials of earlier keys merged in.

  Chunk ``c`` is row ``first_row + c * stride`` of ``refs = (o_ref, lse_ref)``: output
  ``o_ref[row * num_q_heads + head]`` (any float dtype) and log-sum-exp ``lse_ref[head *
  total + row]`` in log2 units, i.e. the triple ``(o, lse, 1)`` in the running state's
  terms. ``first_row < 0`` merges nothing; a chunk with no keys has lse -inf and adds
  nothing, as in the XLA merge it replaces (``kernels.gpu.cascade._merge``).
  """
  o_ref, lse_ref = refs
  ok = row_ok & (first_row >= 0)

  def load(c):
    row = jnp.maximum(first_row, 0) + c * stride
    lse = plgpu.load(lse_ref.at[heads * total + row], mask=ok, other=-jnp.inf)
    idx = ((row * num_q_heads + heads)[:, None], cols[None, :])
    o = plgpu.load(o_ref.at[idx], mask=tile_mask(ok, col_ok), other=0.0).astype(jnp.float32)
    return o, lse

  def merge(carry, o, lse):
    acc, m, den = carry
    m_new = jnp.maximum(m, lse)
    safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    a = jnp.exp2(m - safe)  # 0 where m = -inf
    w = jnp.where(ok, jnp.exp2(lse - safe), 0.0)
    return acc * a[:, None] + o * w[:, None], m_new, den * a + w

  if chunks <= _UNROLLED_PREFIX_CHUNKS:
    # Every chunk's loads first, then the merges, so that no load waits on a merge (the
    # loop below was level with this on the H100 at 100 x 5k, Run36; loads before the
    # key loop were slower there).
    parts = [load(c) for c in range(chunks)]
    for o, lse in parts:
      carry = merge(carry, o, lse)
    return carry
  return lax.fori_loop(0, chunks, lambda c, carry: merge(carry, *load(c)), carry)


def new_rows(b, h, *, packed, num_q_heads, num_kv_heads):
  """``(k_row, v_row)``: the rows of sequence ``b``'s new K and V for KV head ``h`` in the
  arrays a fused write reads them from: ``[batch * num_kv_heads, head_dim]`` each, or with a
  packed q/k/v (``packed`` = all heads) the one ``[batch * packed, head_dim]`` array."""
  if packed is None:
    return b * num_kv_heads + h, b * num_kv_heads + h
  k_row = b * packed + num_q_heads + h
  return k_row, k_row + num_kv_heads


def load_own_rows(knew_ref, vnew_ref, *, rows_of, owns, cols, col_ok):
  """``(kn, vn)``, ``[1, width]`` each in their array's dtype (the pool's; over 8-bit pools
  the packed q/k/v's float dtype): the step's own K and V rows
  (``rows_of``: :func:`new_rows`), loaded by the program that ``owns`` the key (zeros
  elsewhere: a row that writes nothing may carry any values, NaN included, which p = 0
  would not cancel). For :func:`own_key`: where :func:`preloads_own_row` says so a kernel
  loads them before its key loop, so that their latency hides behind the loop instead of
  adding to the program's tail; otherwise ``own_key`` loads them after it."""
  k_row, v_row = rows_of
  one = jnp.arange(1, dtype=jnp.int32)
  ok = tile_mask(one >= 0, col_ok) & owns
  kn = plgpu.load(knew_ref.at[(k_row + one)[:, None], cols[None, :]], mask=ok, other=0.0)
  vn = plgpu.load(vnew_ref.at[(v_row + one)[:, None], cols[None, :]], mask=ok, other=0.0)
  return kn, vn


def own_key(
  carry,
  q_state,
  refs,
  *,
  rows_of,
  pool_row,
  owns,
  cols,
  col_ok,
  scale,
  logit_soft_cap,
  new=None,
):
  """A fused write's last key: the step's own K/V row, added to ``(acc, m, den)`` from
  registers and stored into its slot of the pools (``refs``: the new K and V rows' arrays
  in, the pools out; ``rows_of``: :func:`new_rows`), by the one program that ``owns`` it
  (every other program leaves the state as it is and stores nothing). Shared with the
  planned decode (``planned.py``).

  The key is the value the pool would hold (the caller casts it to the pool's dtype) and
  enters as a pool key would: ``q . k`` with both operands in the dots' dtype and a float32
  sum, ``p`` rounded to that dtype before it multiplies ``v``. No program reads the slot
  (every program masks position ``length - 1`` out of its pool reads), so the store races
  with nothing. ``new``: the rows as :func:`load_own_rows` gave them, or None to load them
  here.
  """
  knew_ref, vnew_ref, kout_ref, vout_ref = refs
  one = jnp.arange(1, dtype=jnp.int32)
  ok = tile_mask(one >= 0, col_ok) & owns
  if new is None:
    new = load_own_rows(knew_ref, vnew_ref, rows_of=rows_of, owns=owns, cols=cols, col_ok=col_ok)
  kn, vn = new
  (qc,) = q_state
  cdtype = qc.dtype
  f32 = jnp.float32
  s = jnp.sum(qc.astype(f32) * kn.astype(cdtype).astype(f32), axis=1)  # f32[rows]
  carry = _add_one_key(
    carry, s, vn.astype(cdtype).astype(f32), owns=owns, scale=scale,
    logit_soft_cap=logit_soft_cap, p_dtype=cdtype,
  )  # fmt: skip
  store_idx = ((pool_row + one)[:, None], cols[None, :])
  plgpu.store(kout_ref.at[store_idx], kn, mask=ok)
  plgpu.store(vout_ref.at[store_idx], vn, mask=ok)
  return carry


def _add_one_key(carry, s, v, *, owns, scale, logit_soft_cap, p_dtype=None):
  """``(acc, m, den)`` with one key added: ``s`` its f32[rows] scores (before the softmax
  scale), ``v`` its f32 ``[1, width]`` value row; a program that does not ``own`` the key
  adds nothing (p = 0). ``p_dtype``: p is rounded to it before it multiplies ``v``."""
  acc, m, den = carry
  s = logits_log2(s, scale=scale, logit_soft_cap=logit_soft_cap)
  s = jnp.where(owns, s, -jnp.inf)
  m_new = jnp.maximum(m, s)
  m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp2(m - m_use)
  p = jnp.exp2(s - m_use)  # 0 where the program does not own the key
  den = den * alpha + p
  if p_dtype is not None:
    p = p.astype(p_dtype).astype(jnp.float32)
  return acc * alpha[:, None] + p[:, None] * v, m_new, den


def own_key_quantized(
  carry,
  q_plain,
  refs,
  *,
  kv_dtype,
  rows_of,
  pool_row,
  owns,
  cols,
  col_ok,
  scale,
  logit_soft_cap,
  new=None,
):
  """:func:`own_key` over 8-bit pools: the step's own K and V rows (float, as the packed
  q/k/v holds them) are quantized in the kernel (``kernels._quant.quantize``, the cache
  write's quantizer, written with what Triton lowers), stored with their
  scales (``refs``: the rows' arrays in; the pools and scale pools out), and added as the
  stored key: ``q . (k_q * k_scale)`` in float32 from ``q_plain`` (the query tile as loaded,
  ``[rows, width]``, before any widening), ``p * v_scale`` times ``v_q``. ``scale`` is the
  softmax scale without a widening's factor. Shared with the planned decode."""
  knew_ref, vnew_ref, kout_ref, vout_ref, ksout_ref, vsout_ref = refs
  one = jnp.arange(1, dtype=jnp.int32)
  ok = tile_mask(one >= 0, col_ok) & owns
  if new is None:
    new = load_own_rows(knew_ref, vnew_ref, rows_of=rows_of, owns=owns, cols=cols, col_ok=col_ok)
  f32 = jnp.float32
  kq, ks = quantize(new[0], kv_dtype)  # the cache write's own quantizer (kernels._quant)
  vq, vs = quantize(new[1], kv_dtype)
  s = jnp.sum(q_plain.astype(f32) * (kq.astype(f32) * ks[:, None]), axis=1)  # f32[rows]
  carry = _add_one_key(
    carry, s, vq.astype(f32) * vs[:, None], owns=owns, scale=scale, logit_soft_cap=logit_soft_cap
  )
  store_idx = ((pool_row + one)[:, None], cols[None, :])
  plgpu.store(kout_ref.at[store_idx], kq, mask=ok)
  plgpu.store(vout_ref.at[store_idx], vq, mask=ok)
  slot_ok = owns & (one >= 0)
  plgpu.store(ksout_ref.at[pool_row + one], ks, mask=slot_ok)
  plgpu.store(vsout_ref.at[pool_row + one], vs, mask=slot_ok)
  return carry


def add_own_key(carry, q_state, q_plain, refs, *, kv_dtype, scale, softmax_scale, **kw):
  """The fused write's own key: :func:`own_key` over 16- or 32-bit pools (``q_state`` and
  ``scale`` as the key loop uses them), :func:`own_key_quantized` over 8-bit ones
  (``kv_dtype``; ``q_plain`` and the plain ``softmax_scale``)."""
  if kv_dtype is None:
    return own_key(carry, q_state, refs, scale=scale, **kw)
  return own_key_quantized(carry, q_plain, refs, kv_dtype=kv_dtype, scale=softmax_scale, **kw)


# Up to this many splits _combine is written split by split (elementwise), which XLA emits
# as one loop fusion; as reductions over the split axis it was three kernels a call at 2
# splits (a max, a sum, the division: 1.2-1.8 us each on an H100; one kernel at 3 splits
# already), docs/benchmarks.md "Run32". 4 to 8 splits were not timed.
_UNROLLED_COMBINE_SPLITS = 8


def _combine(o, m, den, out_dtype):
  """Merges split partials: o [B, Hq, S, D], m/den [B, Hq, S] -> [B, Hq, D]."""
  splits = m.shape[-1]
  if splits > _UNROLLED_COMBINE_SPLITS:
    m_max = jnp.max(m, axis=-1, keepdims=True)
    m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
    w = jnp.exp2(m - m_max)  # m is in log2 units; 0 for empty splits (m = -inf)
    num = jnp.sum(o * w[..., None], axis=2)
    den = jnp.sum(den * w, axis=-1)
  else:
    m_max = functools.reduce(jnp.maximum, [m[..., s] for s in range(splits)])
    m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
    num, total = 0.0, 0.0
    for s in range(splits):
      w = jnp.exp2(m[..., s] - m_max)  # 0 for an empty split (m = -inf)
      num = num + o[..., s, :] * w[..., None]
      total = total + den[..., s] * w
    den = total
  out = num / jnp.where(den > 0, den, 1.0)[..., None]
  return out.astype(out_dtype)


@functools.partial(
  jax.jit,
  static_argnames=(
    "scale",
    "sliding_window",
    "logit_soft_cap",
    "block_sizes",
    "interpret",
    "return_partials",
    "packed_qkv",
    "q_dtype",
    "prefix_chunks",
    "prefix_stride",
  ),
)
def paged_decode(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  *,
  scale: float,
  sliding_window: int | None,
  logit_soft_cap: float | None,
  block_sizes: BlockSizes,
  interpret: bool = False,
  k_scales=None,
  v_scales=None,
  row_starts=None,
  return_partials: bool = False,
  k_new=None,
  v_new=None,
  new_slots=None,
  packed_qkv: bool = False,
  q_dtype=None,
  prefix_o=None,
  prefix_lse=None,
  prefix_rows=None,
  prefix_chunks: int = 0,
  prefix_stride: int = 0,
):
  """Decode attention, one query per sequence; with ``k_new`` the step's K/V written too.

  Args:
    q: [batch, num_q_heads, head_dim].
    k_blocks, v_blocks: [num_kv_heads, num_blocks, block_size, head_dim].
    block_table: i32[batch, max_blocks] (-1 where unused).
    lengths: i32[batch].
    k_scales, v_scales: f32[num_kv_heads, num_blocks, block_size] for 8-bit K/V, else None.
    row_starts: None (default: every row reads keys from position 0), or i32[batch]: row b
      reads only keys [row_starts[b], lengths[b]) (cascade attention's own part); the
      splits then cut each row's own range into equal runs of whole steps.
    return_partials: False (default): the normalised output. True: the unnormalised
      float32 split partials, for a merge elsewhere (cascade attention).
    k_new, v_new, new_slots: None (default), or this step's K/V ``[batch, num_kv_heads,
      head_dim]`` and ``i32[batch]`` slots (``block_id * block_size + offset``, -1: the row
      writes nothing), written into the pools by the kernel itself (a fused write: no
      scatter before the call). Row b's slot must be that of its position ``lengths[b] -
      1`` (the decode step's token): the kernel takes that key from ``k_new``/``v_new``
      instead of the pool. 16-bit or float32 pools only, not with ``row_starts`` or
      ``return_partials``; the pools are updated in place when donated. With 3 or more
      pipeline stages the kernel loads the row before its key loop
      (:func:`preloads_own_row`).
    packed_qkv: with ``new_slots`` and no ``k_new``/``v_new``: ``q`` is ``[batch,
      num_q_heads + 2 * num_kv_heads, head_dim]``, each row's query heads, then its K rows,
      then its V rows, in the pools' dtype (one array, as a q/k/v projection makes it: the
      kernel reads all three from it, so nothing splits it before the call). Over
      8-bit pools (``k_scales`` given) the packed array is float32, bf16 or f16: the
      kernel quantizes each new row as ``kernels.write_kv_quantized`` does and stores it
      and its scale (returned as two more pools).
    q_dtype: the query's dtype where the packed array is wider (8-bit pools: float32
      rows rotated in float32, ``paxcache.nn.PagedAttention``): q is cast to it as loaded,
      and the output is in it. None: the array's dtype.
    prefix_o, prefix_lse, prefix_rows, prefix_chunks, prefix_stride: with ``row_starts``
      and one split, the partials of each row's keys before ``row_starts[b]`` (a cascade's
      shared part, computed elsewhere), merged into the output inside the kernel instead
      of by a merge after it: ``prefix_o [R, num_q_heads, head_dim]`` normalised outputs
      (any floating dtype), ``prefix_lse f32[num_q_heads, R]`` their log-sum-exp in log2
      units, ``prefix_rows i32[batch]`` the first of row b's ``prefix_chunks`` partials
      (``prefix_rows[b] + c * prefix_stride`` for chunk c; -1: none). A chunk with no keys
      has lse -inf and a finite (zero) output. Not with ``return_partials``, a fused write
      or a ``sliding_window``. ``prefix_rows`` are trusted (device data): each must be -1
      or a row whose last chunk is inside R.

  Returns:
    [batch, num_q_heads, head_dim] in q.dtype or ``q_dtype`` (with ``k_new``: ``(out, k_blocks,
    v_blocks)``, the pools with the step's rows written; over 8-bit pools ``(out, k_blocks,
    v_blocks, k_scales, v_scales)``); with ``return_partials``, ``(o f32[batch,
    num_q_heads, splits, head_dim], m f32[batch, num_q_heads, splits], den f32[batch,
    num_q_heads, splits])``: per split the sum of p @ v, the max logit in log2 units (-inf
    where the split saw no key) and the sum of p, with p = exp2(logit * log2(e) - m).
  """
  batch, num_q_heads, head_dim = q.shape
  num_kv_heads, num_blocks, block_size, _ = k_blocks.shape
  packed = None
  if packed_qkv:
    packed, num_q_heads = num_q_heads, num_q_heads - 2 * num_kv_heads
  max_blocks = block_table.shape[1]
  group = num_q_heads // num_kv_heads
  rows = max(16, 1 << (group - 1).bit_length())
  kv_tile = block_sizes.decode_kv_tile
  max_context = max_blocks * block_size
  num_splits, chunk = grid_splits(
    batch, num_kv_heads, max_context, kv_tile, block_sizes.decode_num_splits
  )
  out_dtype = jnp.dtype(q.dtype if q_dtype is None else q_dtype)
  widen = widening(out_dtype, k_blocks.dtype, block_sizes.quant_widen)
  fused_write = new_slots is not None
  quant_write = fused_write and k_scales is not None
  if fused_write and (k_new is None) != packed_qkv:
    raise ValueError("paged_decode: a fused write takes k_new and v_new, or packed_qkv=True")
  if fused_write and (row_starts is not None or return_partials):
    raise ValueError("paged_decode: a fused write (k_new) takes no row_starts or return_partials")
  if quant_write and not packed_qkv:
    raise ValueError("paged_decode: a fused write into 8-bit pools takes a packed q/k/v")
  if q_dtype is not None and not quant_write:
    raise ValueError("paged_decode: q_dtype is for a packed q/k/v over 8-bit pools")

  prefix = None
  given = [x is not None for x in (prefix_o, prefix_lse, prefix_rows)]
  if any(given) and not all(given):
    raise ValueError("paged_decode: prefix partials take prefix_o, prefix_lse and prefix_rows")
  if all(given):
    if row_starts is None or num_splits != 1 or return_partials or fused_write:
      raise ValueError(
        "paged_decode: prefix partials are merged by a one-split decode with row_starts, "
        f"without return_partials or a fused write (got {num_splits} splits)"
      )
    if sliding_window is not None:
      # The window would cut the own keys and not the prefix's: refused, never wrong.
      raise ValueError("paged_decode: prefix partials take no sliding_window")
    total = prefix_o.shape[0]
    if (
      prefix_o.ndim != 3
      or prefix_o.shape[1:] != (num_q_heads, head_dim)
      or prefix_lse.shape != (num_q_heads, total)
      or prefix_rows.shape != (batch,)
    ):
      raise ValueError(
        f"paged_decode: prefix_o must be [R, {num_q_heads}, {head_dim}], prefix_lse "
        f"[{num_q_heads}, R] and prefix_rows [{batch}], got {prefix_o.shape}, "
        f"{prefix_lse.shape} and {prefix_rows.shape}"
      )
    if not jnp.issubdtype(prefix_o.dtype, jnp.floating):
      raise ValueError(f"paged_decode: prefix_o must be floating, got {prefix_o.dtype}")
    chunks, stride = int(prefix_chunks), int(prefix_stride)
    # Rows past R would be read unchecked (Triton loads): the last chunk must fit.
    if chunks < 1 or stride < 0 or (chunks - 1) * stride >= total:
      raise ValueError(
        f"paged_decode: prefix_chunks must be >= 1 and prefix_stride >= 0 with (chunks - 1) "
        f"* stride < R = {total}, got {chunks} chunks of stride {stride}"
      )
    prefix = dict(chunks=chunks, stride=stride, total=total)
  kernel = functools.partial(
    _decode_kernel,
    num_q_heads=num_q_heads,
    group=group,
    rows=rows,
    head_dim=head_dim,
    block_size=block_size,
    num_blocks=num_blocks,
    max_blocks=max_blocks,
    kv_tile=kv_tile,
    chunk=chunk,
    num_splits=num_splits,
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    widen=widen,
    quantized=k_scales is not None,
    has_starts=row_starts is not None,
    partials=return_partials,
    fused_write=fused_write,
    packed=packed,
    prefix=prefix,
    preload_own=fused_write and preloads_own_row(block_sizes),
    q_cast=None if out_dtype == q.dtype else out_dtype.name,
    kv_dtype=k_blocks.dtype.name if quant_write else None,
  )
  flat_rows = num_kv_heads * num_blocks * block_size
  q_flat = q.reshape(-1, head_dim)  # [batch * (num_q_heads or all heads), head_dim]
  args = (
    lengths,
    block_table.reshape(-1),
    q_flat,
    k_blocks.reshape(flat_rows, head_dim),
    v_blocks.reshape(flat_rows, head_dim),
  )
  if k_scales is not None:
    args += (k_scales.reshape(flat_rows), v_scales.reshape(flat_rows))
  if row_starts is not None:
    args += (row_starts.astype(jnp.int32),)
  if prefix is not None:
    args += (
      prefix_o.reshape(-1, head_dim),
      prefix_lse.astype(jnp.float32).reshape(-1),
      prefix_rows.astype(jnp.int32),
    )
  if num_splits == 1 and not return_partials:
    out_shape = jax.ShapeDtypeStruct((batch * num_q_heads, head_dim), out_dtype)
  else:
    n = batch * num_q_heads * num_splits
    out_shape = (
      jax.ShapeDtypeStruct((n, head_dim), jnp.float32),
      jax.ShapeDtypeStruct((n,), jnp.float32),
      jax.ShapeDtypeStruct((n,), jnp.float32),
    )
  aliases = {}
  if fused_write:
    pool = jax.ShapeDtypeStruct((flat_rows, head_dim), k_blocks.dtype)
    if packed_qkv:  # the K and V rows are read from q's array itself
      k_rows = v_rows = q_flat
    else:
      k_rows = k_new.astype(k_blocks.dtype).reshape(batch * num_kv_heads, head_dim)
      v_rows = v_new.astype(v_blocks.dtype).reshape(batch * num_kv_heads, head_dim)
    args += (k_rows, v_rows, new_slots.astype(jnp.int32))
    out_shape = (*(out_shape if isinstance(out_shape, tuple) else (out_shape,)), pool, pool)
    aliases = {3: len(out_shape) - 2, 4: len(out_shape) - 1}  # k_ref, v_ref: args 3 and 4
    if quant_write:  # and the scale pools, args 5 and 6
      scales = jax.ShapeDtypeStruct((flat_rows,), jnp.float32)
      out_shape = (*out_shape, scales, scales)
      aliases = {3 + i: len(out_shape) - 4 + i for i in range(4)}
  outs = pl.pallas_call(
    kernel,
    grid=(num_kv_heads, num_splits, batch),
    out_shape=out_shape,
    compiler_params=plgpu.CompilerParams(
      num_warps=block_sizes.decode_num_warps, num_stages=block_sizes.decode_num_stages
    ),
    interpret=interpret,
    input_output_aliases=aliases,
    name=f"paxcache_paged_decode_bs{block_size}_t{kv_tile}_s{num_splits}"
    + ("_partials" if return_partials else "")
    + ("_write" if fused_write else "")
    + ("_prefix" if prefix is not None else "")
    + widen.name_suffix,
  )(*args)
  if fused_write:
    n_pools = 4 if quant_write else 2
    outs, written = outs[:-n_pools], outs[-n_pools:]
    shapes = (k_blocks.shape, v_blocks.shape, k_blocks.shape[:3], v_blocks.shape[:3])
    pools = tuple(x.reshape(shape) for x, shape in zip(written, shapes[:n_pools], strict=True))
    outs = outs[0] if len(outs) == 1 else tuple(outs)
  else:
    pools = None
  out = _finish(outs, batch, num_q_heads, num_splits, head_dim, out_dtype, return_partials)
  return out if pools is None else (out, *pools)


def _finish(outs, batch, num_q_heads, num_splits, head_dim, out_dtype, return_partials):
  """The kernel's outputs -> the output (one split: reshaped; several: combined) or, with
  ``return_partials``, the reshaped partials."""
  if num_splits == 1 and not return_partials:
    return outs.reshape(batch, num_q_heads, head_dim)
  o, m, den = outs
  if return_partials:
    return (
      o.reshape(batch, num_q_heads, num_splits, head_dim),
      m.reshape(batch, num_q_heads, num_splits),
      den.reshape(batch, num_q_heads, num_splits),
    )
  return _combine(
    o.reshape(batch, num_q_heads, num_splits, head_dim),
    m.reshape(batch, num_q_heads, num_splits),
    den.reshape(batch, num_q_heads, num_splits),
    out_dtype,
  )
