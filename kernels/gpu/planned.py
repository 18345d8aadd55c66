"""Planned paged decode on GPU in Pallas Triton: one program per (KV head, chunk), then a merge.

Runs a :class:`kernels.gpu.plan.DecodePlan` (built on the host from the real lengths).
Grid ``(num_kv_heads, num_padded_chunks)``: a program reads its chunk's sequence and key
range ``[start, end)`` from the plan, takes the ``group`` query heads of its KV head as
rows of one ``[rows, head_dim]`` tile (as ``decode.py`` does), and walks the range in
steps of ``kv_tile`` tokens, gathering K/V rows through the block table
(``row = block_id * block_size + offset`` in the pool seen as ``[heads * blocks *
block_size, head_dim]``). Every gathered load is masked by ``0 <= block_id <
num_blocks`` and by the position being in the chunk, below the length and inside the
sliding window; masked rows load as zeros with ``-inf`` logits, so NaN in unused slots
cannot leak. Each program writes unnormalised float32 partials, the running max (log2
units) and the denominator; padding chunks (``start = end``) return at once, reading and
writing nothing.

A sequence in one chunk (most rows of a ragged batch) is finished by its chunk's
programs: they write its normalised output in ``q.dtype`` directly. For the others, the
merge (``_merge_kernel``, grid ``(num_q_heads, batch)``, writing into the same output
buffer) reads the sequence's chunks ``seq_first_chunk .. + seq_num_chunks`` for one query
head, ``MERGE_TILE`` chunks a step (a long row cut into 100 chunks merges in 4 steps, not
100 dependent loads); its programs for one-chunk sequences only read the count and
return. A sequence with no chunk (length 0) gets zeros, as from the reference.

A head_dim that is not a power of two is computed in tiles of the next power of two, its
extra columns masked on every load and store of both kernels (as in ``decode.py``:
arrays keep their real head_dim in HBM); a power-of-two head_dim emits no column mask.
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
from kernels.gpu.decode import (
  add_own_key,
  dot_precision,
  head_cols,
  load_own_rows,
  new_rows,
  preloads_own_row,
  tile_mask,
)
from kernels.gpu.plan import DecodePlan
from kernels.gpu.tuning import BlockSizes


def _chunk_kernel(
  # Whole arrays in GPU global memory (no BlockSpec), as in decode.py.
  chunk_seq_ref,  # i32[C]
  chunk_start_ref,  # i32[C]
  chunk_end_ref,  # i32[C]
  seq_chunks_ref,  # i32[batch]: seq_num_chunks
  lengths_ref,  # i32[batch]
  table_ref,  # i32[batch * max_blocks]
  q_ref,  # [batch * num_q_heads, head_dim]
  k_ref,  # [num_kv_heads * num_blocks * block_size, head_dim]
  v_ref,  # same
  # 8-bit K/V only: ks_ref, vs_ref f32[num_kv_heads * num_blocks * block_size]. Then the
  # outputs: o f32[C * num_q_heads, head_dim], m and den f32[C * num_q_heads], row
  # chunk * num_q_heads + query head (chunks of sequences cut into several); out
  # [batch * num_q_heads, head_dim] in q's dtype or q_cast (sequences in one chunk).
  *refs,
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
  quantized,
  fused_write=False,
  packed=None,
  preload_own=False,
  q_cast=None,
):
  if quantized:
    ks_ref, vs_ref, *refs = refs
  if fused_write:
    # As in decode.py: the step's K/V rows and slots in; the pools (8-bit: and the scale
    # pools), aliased, out last.
    knew_ref, vnew_ref, slots_ref, *refs = refs
    scale_outs = ()
    if quantized:
      *refs, kout_ref, vout_ref, ksout_ref, vsout_ref = refs
      scale_outs = (ksout_ref, vsout_ref)
    else:
      *refs, kout_ref, vout_ref = refs
  o_ref, m_ref, den_ref, out_ref = refs
  h = pl.program_id(0)
  c = pl.program_id(1)
  chunk_start, chunk_end = chunk_start_ref[c], chunk_end_ref[c]

  # Padding chunks (start == end) read and write nothing (no sequence merges them): they
  # leave as soon as they have read their range, before the query tile.
  @pl.when(chunk_end > chunk_start)
  def _():
    b = chunk_seq_ref[c]
    length = lengths_ref[b]
    start = chunk_start
    pool_len = length  # keys read from the pool: with a fused write, all but the last
    if fused_write:
      slot = slots_ref[b]
      # A slot outside the pool writes nothing (as write_kv's scatter drops it).
      has_new = (slot >= 0) & (slot < num_blocks * block_size) & (length > 0)
      pool_len = jnp.where(has_new, length - 1, length)
    end = jnp.minimum(chunk_end, pool_len)
    if sliding_window is not None:
      # Position length-1 sees keys >= length - window.
      start = jnp.maximum(start, length - sliding_window)
    row_ids = jnp.arange(rows, dtype=jnp.int32)
    row_ok = row_ids < group
    num_kv_heads = num_q_heads // group
    # q_ref's rows per sequence: its query heads, or all heads of a packed q/k/v.
    q_row0 = b * (num_q_heads if packed is None else packed) + h * group
    o_row0 = b * num_q_heads + h * group
    # Tiles are head_dim padded to a power of two wide; col_ok (None when nothing is
    # padded) masks the columns past head_dim on every load and store.
    cols, col_ok = head_cols(head_dim)
    width = cols.shape[0]
    if col_ok is None:
      q = plgpu.load(q_ref.at[pl.ds(q_row0, rows), :], mask=row_ok[:, None], other=0.0)
    else:
      q_idx = ((q_row0 + row_ids)[:, None], cols[None, :])
      q = plgpu.load(q_ref.at[q_idx], mask=tile_mask(row_ok, col_ok), other=0.0)
    o_idx = ((o_row0 + row_ids)[:, None], cols[None, :])
    if q_cast is not None:  # a packed q/k/v wider than the query's dtype (8-bit write)
      q = q.astype(q_cast)
    q_plain = q
    # A tuple: q in the dots' dtype (f16 and clipped in the 16-bit modes), or split in two
    # int8 parts in "int8_qk" (kernels/gpu/_widen.py).
    q = widen.query_state(q)
    prec = dot_precision(widen.cdtype)
    head_base = h * (num_blocks * block_size)
    offs = jnp.arange(kv_tile, dtype=jnp.int32)

    step = functools.partial(
      gathered_step,
      b=b,
      lo=start,
      hi=end,
      table_ref=table_ref,
      k_ref=k_ref,
      v_ref=v_ref,
      scale_refs=(ks_ref, vs_ref) if quantized else None,
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

    def body(j, carry):
      return step(carry, q, j * kv_tile + offs)

    if fused_write:
      own_rows = new_rows(b, h, packed=packed, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads)
      # The chunk holding position length - 1 adds that key and writes it.
      owns = has_new & (length - 1 >= chunk_start) & (length - 1 < chunk_end)
      # Loaded before the key loop with 3 or more stages (decode.preloads_own_row).
      new = None
      if preload_own:
        new = load_own_rows(
          knew_ref, vnew_ref, rows_of=own_rows, owns=owns, cols=cols, col_ok=col_ok
        )
    acc = jnp.zeros((rows, width), jnp.float32)
    m = jnp.full((rows,), -jnp.inf, jnp.float32)
    den = jnp.zeros((rows,), jnp.float32)
    first = start // kv_tile
    last = jnp.where(end > start, (end + kv_tile - 1) // kv_tile, first)
    acc, m, den = lax.fori_loop(first, last, body, (acc, m, den))
    if fused_write:
      acc, m, den = add_own_key(
        (acc, m, den),
        q,
        q_plain,
        (knew_ref, vnew_ref, kout_ref, vout_ref, *scale_outs),
        kv_dtype=k_ref.dtype if quantized else None,
        rows_of=own_rows,
        pool_row=head_base + jnp.maximum(slot, 0),
        owns=owns,
        cols=cols,
        col_ok=col_ok,
        scale=scale,
        softmax_scale=scale,
        logit_soft_cap=logit_soft_cap,
        new=new,
      )
    # A sequence in one chunk is done here: its output, normalised, with no partial
    # written and none merged. Otherwise the partials, for the merge.
    single = seq_chunks_ref[b] == 1
    whole = row_ok & single
    out = (acc / jnp.where(den > 0, den, 1.0)[:, None]).astype(out_ref.dtype)
    part = row_ok & jnp.logical_not(single)
    part0 = c * num_q_heads + h * group
    if col_ok is None:
      plgpu.store(out_ref.at[pl.ds(o_row0, rows), :], out, mask=whole[:, None])
      plgpu.store(o_ref.at[pl.ds(part0, rows), :], acc, mask=part[:, None])
    else:
      plgpu.store(out_ref.at[o_idx], out, mask=tile_mask(whole, col_ok))
      part_idx = ((part0 + row_ids)[:, None], cols[None, :])
      plgpu.store(o_ref.at[part_idx], acc, mask=tile_mask(part, col_ok))
    plgpu.store(m_ref.at[pl.ds(part0, rows)], m, mask=part)
    plgpu.store(den_ref.at[pl.ds(part0, rows)], den, mask=part)


def gathered_step(
  carry,
  q,
  tok,
  *,
  b,
  lo,
  hi,
  table_ref,
  k_ref,
  v_ref,
  scale_refs,
  max_blocks,
  num_blocks,
  block_size,
  head_base,
  cols,
  col_ok,
  widen,
  prec,
  scale,
  logit_soft_cap,
):
  """One step of a planned program: the keys at positions ``tok`` (i32[kv_tile]) of
  sequence ``b`` that lie in ``[lo, hi)`` and in its block table, gathered through the
  table, added to the running ``(acc, m, den)`` for the query state ``q``
  (``widen.query_state``). Keys outside are masked (loaded as zeros, ``-inf`` logits).
  ``scale_refs``: the 8-bit pools' ``(k_scales, v_scales)`` refs, or None. Shared by the
  planned kernel and the persistent one (``kernels/gpu/persistent.py``)."""
  lblk = jnp.right_shift(tok, int(math.log2(block_size)))
  in_table = lblk < max_blocks
  blk = plgpu.load(
    table_ref.at[b * max_blocks + jnp.minimum(lblk, max_blocks - 1)], mask=in_table, other=-1
  )
  valid = in_table & (blk >= 0) & (blk < num_blocks) & (tok >= lo) & (tok < hi)
  kv_rows = head_base + jnp.where(valid, blk, 0) * block_size + jnp.bitwise_and(tok, block_size - 1)
  idx = (kv_rows[:, None], cols[None, :])
  kv_mask = tile_mask(valid, col_ok)
  # Masked (other=0), never multiplied by 0: the widening may not keep NaN as NaN.
  k = plgpu.load(k_ref.at[idx], mask=kv_mask, other=0.0)
  v = widen.widen(plgpu.load(v_ref.at[idx], mask=kv_mask, other=0.0))
  dot = functools.partial(plgpu.dot, precision=prec)
  s = widen.scores(q, k, dot=dot)  # f32[rows, kv_tile]
  if scale_refs is not None:
    # Dequantise in the kernel: q . (k_row * k_scale) = (q . k_row) * k_scale per key.
    s = s * plgpu.load(scale_refs[0].at[kv_rows], mask=valid, other=0.0)[None, :]
  # scale * k_factor: the e4m3 bit trick's 2**8 (1 otherwise).
  (acc, m, den), p = online_softmax_step(
    carry, s, scale=scale * widen.k_factor, logit_soft_cap=logit_soft_cap, mask=valid[None, :]
  )
  # sum_j p_j (v_j * s_j) = sum_j (p_j * s_j) v_j: 8-bit V's scales go on p.
  vs = None
  if scale_refs is not None:
    vs = plgpu.load(scale_refs[1].at[kv_rows], mask=valid, other=0.0)
  return widen.accumulate(acc, p, v, vs, dot=dot), m, den


# Chunks one merge step reads at once, and the merge's warps and stages. 16 chunks a step
# left the merge at 11.6 us of a 61.6 us call on the H200 for one 32,768-token row among 63
# short ones (86 chunks: 6 dependent steps; gpu_ragged --profile, 986aabf); 64 chunks with
# 8 warps cut that to 4.7 us but made every merge program dearer, also those that only
# read a count (rows of one chunk): ShareGPT-like 256 11.2 us against 7.1 with 16. 32
# chunks with 4 warps and 2 stages sits between (6.8 and 7.3 us) and, with chunks of
# plan.MIN_CHUNK_TOKENS, merges a 32,768-token row in one step (af45169 sweep,
# docs/benchmarks.md "The planned defaults re-measured").
MERGE_TILE = 32
MERGE_NUM_WARPS = 4
MERGE_NUM_STAGES = 2


def _merge_kernel(
  first_ref,  # i32[batch]: seq_first_chunk
  count_ref,  # i32[batch]: seq_num_chunks
  o_ref,  # f32[C * num_q_heads, head_dim]
  m_ref,  # f32[C * num_q_heads]
  den_ref,  # f32[C * num_q_heads]
  out_in_ref,  # [batch * num_q_heads * head_dim], q.dtype: the chunk kernel's out
  out_ref,  # the same buffer (aliased): rows of sequences in one chunk are already there
  *,
  num_q_heads,
  head_dim,
):
  del out_in_ref  # written through out_ref
  hq = pl.program_id(0)
  b = pl.program_id(1)
  count = count_ref[b]

  @pl.when(count != 1)
  def _():
    _merge_row(first_ref[b], count, b, hq, o_ref, m_ref, den_ref, out_ref, num_q_heads, head_dim)


def _merge_row(
  first, count, b, hq, o_ref, m_ref, den_ref, out_ref, num_q_heads, head_dim, part_rows=None
):
  """Merges the ``count`` chunks of sequence ``b`` for query head ``hq`` (0 chunks: zeros).

  ``part_rows``: ``(stride, offset)``, the partials of chunk ``i`` being row ``i * stride +
  offset`` (the Mosaic GPU decode pads each KV head's rows); None: ``(num_q_heads, hq)``.
  """
  stride, offset = (num_q_heads, hq) if part_rows is None else part_rows
  offs = jnp.arange(MERGE_TILE, dtype=jnp.int32)
  cols, col_ok = head_cols(head_dim)  # as in the chunk kernel

  def body(t, carry):
    acc, mx, den = carry
    i = t * MERGE_TILE + offs  # chunk numbers within the sequence
    ok = i < count
    part = (first + jnp.where(ok, i, 0)) * stride + offset
    m_i = plgpu.load(m_ref.at[part], mask=ok, other=-jnp.inf)
    d_i = plgpu.load(den_ref.at[part], mask=ok, other=0.0)
    o_i = plgpu.load(o_ref.at[part[:, None], cols[None, :]], mask=tile_mask(ok, col_ok), other=0.0)
    m_new = jnp.maximum(mx, jnp.max(m_i))
    # Chunks whose keys were all masked (and the start) have m = -inf; weigh them by
    # exp2(-inf) = 0 against 0 instead of NaN from (-inf) - (-inf).
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(mx - m_use)
    w = jnp.exp2(m_i - m_use)
    acc = acc * alpha + jnp.sum(o_i * w[:, None], axis=0)
    return acc, m_new, den * alpha + jnp.sum(d_i * w)

  acc = jnp.zeros(cols.shape, jnp.float32)
  mx = jnp.float32(-jnp.inf)
  den = jnp.float32(0.0)
  tiles = (count + MERGE_TILE - 1) // MERGE_TILE
  acc, mx, den = lax.fori_loop(0, tiles, body, (acc, mx, den))
  out = (acc / jnp.where(den > 0, den, 1.0)).astype(out_ref.dtype)
  row0 = (b * num_q_heads + hq) * head_dim
  if col_ok is None:
    plgpu.store(out_ref.at[pl.ds(row0, head_dim)], out)
  else:
    plgpu.store(out_ref.at[row0 + cols], out, mask=col_ok)


@functools.partial(
  jax.jit,
  static_argnames=(
    "scale",
    "sliding_window",
    "logit_soft_cap",
    "block_sizes",
    "interpret",
    "packed_qkv",
    "q_dtype",
  ),
)
def planned_decode(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  plan: DecodePlan,
  *,
  scale: float,
  sliding_window: int | None,
  logit_soft_cap: float | None,
  block_sizes: BlockSizes,
  interpret: bool = False,
  k_scales=None,
  v_scales=None,
  k_new=None,
  v_new=None,
  new_slots=None,
  packed_qkv: bool = False,
  q_dtype=None,
):
  """Decode attention, one query per sequence, by the chunks of ``plan``; with ``k_new``
  (or ``packed_qkv``) the step's K/V written by the chunk kernel (as
  ``decode.paged_decode``).

  Args:
    q: [batch, num_q_heads, head_dim].
    k_blocks, v_blocks: [num_kv_heads, num_blocks, block_size, head_dim].
    block_table: i32[batch, max_blocks] (-1 where unused).
    lengths: i32[batch] (the lengths the plan was built from).
    plan: a DecodePlan for this batch (checked by the caller, kernels.gpu.paged_attention).
    block_sizes: ``decode_kv_tile``, ``decode_num_warps`` and ``decode_num_stages`` apply
      to the chunk kernel (``decode_num_splits`` does not: the plan decides), and
      ``quant_widen`` to 8-bit K/V.
    k_scales, v_scales: f32[num_kv_heads, num_blocks, block_size] for 8-bit K/V, else None.
    k_new, v_new, new_slots: a fused write, as in ``decode.paged_decode`` (16-bit or float32
      pools): the chunk holding each row's position ``lengths[b] - 1`` takes that key from
      ``k_new``/``v_new`` and stores the row into its slot.

  Returns:
    [batch, num_q_heads, head_dim] in q.dtype (or ``q_dtype``); with ``k_new``, ``(out,
    k_blocks, v_blocks)``, and over 8-bit pools the scale pools too.
  """
  batch, num_q_heads, head_dim = q.shape
  num_kv_heads, num_blocks, block_size, _ = k_blocks.shape
  packed = None
  if packed_qkv:  # q is [batch, all heads, head_dim]: [q | k | v] (decode.paged_decode)
    packed, num_q_heads = num_q_heads, num_q_heads - 2 * num_kv_heads
  max_blocks = block_table.shape[1]
  group = num_q_heads // num_kv_heads
  rows = max(16, 1 << (group - 1).bit_length())
  num_chunks = plan.chunk_seq.shape[0]
  quantized = k_scales is not None
  fused_write = new_slots is not None
  quant_write = fused_write and quantized
  if fused_write and (k_new is None) != packed_qkv:
    raise ValueError("planned_decode: a fused write takes k_new and v_new, or packed_qkv=True")
  if quant_write and not packed_qkv:
    raise ValueError("planned_decode: a fused write into 8-bit pools takes a packed q/k/v")
  if q_dtype is not None and not quant_write:
    raise ValueError("planned_decode: q_dtype is for a packed q/k/v over 8-bit pools")
  out_dtype = jnp.dtype(q.dtype if q_dtype is None else q_dtype)
  widen = widening(out_dtype, k_blocks.dtype, block_sizes.quant_widen)
  kernel = functools.partial(
    _chunk_kernel,
    num_q_heads=num_q_heads,
    group=group,
    rows=rows,
    head_dim=head_dim,
    block_size=block_size,
    num_blocks=num_blocks,
    max_blocks=max_blocks,
    kv_tile=block_sizes.decode_kv_tile,
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    widen=widen,
    quantized=quantized,
    fused_write=fused_write,
    packed=packed,
    preload_own=fused_write and preloads_own_row(block_sizes),
    q_cast=None if out_dtype == q.dtype else out_dtype.name,
  )
  flat_rows = num_kv_heads * num_blocks * block_size
  args = (
    plan.chunk_seq,
    plan.chunk_start,
    plan.chunk_end,
    plan.seq_num_chunks,
    lengths,
    block_table.reshape(-1),
    q.reshape(-1, head_dim),
    k_blocks.reshape(flat_rows, head_dim),
    v_blocks.reshape(flat_rows, head_dim),
  )
  if quantized:
    args += (k_scales.reshape(flat_rows), v_scales.reshape(flat_rows))
  n = num_chunks * num_q_heads
  out_shape = (
    jax.ShapeDtypeStruct((n, head_dim), jnp.float32),
    jax.ShapeDtypeStruct((n,), jnp.float32),
    jax.ShapeDtypeStruct((n,), jnp.float32),
    jax.ShapeDtypeStruct((batch * num_q_heads, head_dim), out_dtype),
  )
  aliases = {}
  if fused_write:
    if packed_qkv:  # the K and V rows are read from q's array itself
      k_rows = v_rows = args[6]
    else:
      k_rows = k_new.astype(k_blocks.dtype).reshape(batch * num_kv_heads, head_dim)
      v_rows = v_new.astype(v_blocks.dtype).reshape(batch * num_kv_heads, head_dim)
    args += (k_rows, v_rows, new_slots.astype(jnp.int32))
    pool = jax.ShapeDtypeStruct((flat_rows, head_dim), k_blocks.dtype)
    out_shape += (pool, pool)
    aliases = {7: 4, 8: 5}  # k_ref, v_ref (args 7 and 8) -> the last two outputs
    if quant_write:  # and the scale pools (args 9 and 10)
      scales = jax.ShapeDtypeStruct((flat_rows,), jnp.float32)
      out_shape += (scales, scales)
      aliases.update({9: 6, 10: 7})
  o, m, den, out, *pools = pl.pallas_call(
    kernel,
    grid=(num_kv_heads, num_chunks),
    out_shape=out_shape,
    input_output_aliases=aliases,
    compiler_params=plgpu.CompilerParams(
      num_warps=block_sizes.decode_num_warps, num_stages=block_sizes.decode_num_stages
    ),
    interpret=interpret,
    name=f"paxcache_planned_decode_bs{block_size}_t{block_sizes.decode_kv_tile}"
    + ("_write" if fused_write else "")
    + widen.name_suffix,
  )(*args)
  out = pl.pallas_call(
    functools.partial(_merge_kernel, num_q_heads=num_q_heads, head_dim=head_dim),
    grid=(num_q_heads, batch),
    out_shape=jax.ShapeDtypeStruct((batch * num_q_heads * head_dim,), out_dtype),
    compiler_params=plgpu.CompilerParams(num_warps=MERGE_NUM_WARPS, num_stages=MERGE_NUM_STAGES),
    input_output_aliases={5: 0},  # out: the chunk kernel's rows stay, the merge adds its own
    interpret=interpret,
    name="paxcache_planned_decode_merge",
  )(plan.seq_first_chunk, plan.seq_num_chunks, o, m, den, out.reshape(-1))
  out = out.reshape(batch, num_q_heads, head_dim)
  if fused_write:
    shapes = (k_blocks.shape, v_blocks.shape, k_blocks.shape[:3], v_blocks.shape[:3])
    return (out, *(x.reshape(shape) for x, shape in zip(pools, shapes[: len(pools)], strict=True)))
  return out
