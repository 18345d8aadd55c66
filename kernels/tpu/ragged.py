"""Pallas TPU (Mosaic) ragged paged attention: chunked prefill and decode in one call.

Sequence ``b`` owns query rows ``q[cu_q_lens[b]:cu_q_lens[b + 1]]``; its query ``i`` sits at
position ``lengths[b] - q_len_b + i`` and attends causally to its cached context and to the
queries before it (a decode is a sequence with one query). Rows past ``cu_q_lens[-1]``
return zeros.

Grid ``(num_tiles, num_kv_heads / kv_heads_per_step)``. A tile is ``queries_per_tile``
consecutive query rows (aligned, so q and the output move through the ordinary BlockSpec
pipeline) times the ``group`` query heads of each of ``kv_heads_per_step`` KV heads: the
wrapper lays q out as ``[num_kv_heads, group, num_tokens, head_dim]`` and the kernel
flattens each head's ``[group, queries_per_tile, head_dim]`` tile into
``group * queries_per_tile`` matmul rows. Each block is one DMA for K and one for V
covering all the step's KV heads, as in the decode kernel.
A tile may hold the rows of several sequences: for each sequence that overlaps it (the
range is precomputed per tile and prefetched to SMEM), the kernel walks the blocks that
sequence's rows can see in chunks of ``blocks_per_chunk`` blocks, double-buffered
through two VMEM slots exactly as the decode kernel does, and masks rows of other
sequences out of the online softmax. Only blocks up to the tile's last visible position
(and from the sliding window's first) are fetched; ``-1`` entries never are.

Each head's softmax state lives in VMEM scratch and a chunk's heads are a ``fori_loop``
(one copy of the loop body, however many heads a step holds).

No ref is reshaped (JAX's own ragged kernel needs ``ref.reshape``, which TPU interpret
mode does not support); the only reshapes are of values, and they collapse or split a
tile-aligned leading axis.

:func:`paged_attention_ragged` by default (``BlockSizes.split_decode``) sends the
sequences with one query row to the decode kernel (:func:`kernels.tpu.decode.decode_rows`)
in a launch of their own and only the others, their rows packed from row 0, to this
kernel, whose default tiles are then sized for prefill (docs/tpu.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import _layout
from kernels.tpu import _common, _config
from kernels.tpu.decode import _keys, decode_rows, key_iotas, pack_queries


def _ragged_kernel(
  lengths_ref,  # SMEM i32[batch]
  table_ref,  # SMEM i32[batch * max_blocks]
  cu_ref,  # SMEM i32[batch + 1]
  seq_lo_ref,  # SMEM i32[num_tiles]: first sequence overlapping the tile
  seq_hi_ref,  # SMEM i32[num_tiles]: last one (seq_hi < seq_lo: none)
  q_ref,  # VMEM [heads_per_step, group, queries_per_tile, head_dim]
  k_hbm,  # HBM [num_kv_heads, num_blocks, block_size, head_dim]
  v_hbm,  # HBM [num_kv_heads, num_blocks, block_size, head_dim]
  # 8-bit K/V (quantized=True) only: ks_hbm, vs_hbm HBM f32[num_kv_heads, num_blocks,
  # block_size]. Then:
  # o_ref VMEM [heads_per_step, group, queries_per_tile, head_dim]
  # kv_buf VMEM [2 (slot), 2 (K, V), heads_per_step, chunk_tokens, head_dim]
  # 8-bit only: sc_buf VMEM f32[2 (slot), 2 (K, V), heads_per_step, chunk_tokens]
  # sems DMA semaphores [2 (K and V, scales), 2 (slot)]
  # count_ref SMEM i32[2]: per slot, the blocks in flight into it
  # m_ref, l_ref VMEM f32[heads_per_step, rows, 1]: running max and sum of each head
  # acc_ref VMEM f32[heads_per_step, rows, head_dim]: each head's output accumulator
  *refs,
  scale,
  sliding_window,
  logit_soft_cap,
  blocks_per_chunk,
  max_blocks,
  quantized=False,
  pack=1,
):
  if quantized:
    ks_hbm, vs_hbm, o_ref, kv_buf, sc_buf, sems, count_ref, m_ref, l_ref, acc_ref = refs
    scales = (ks_hbm, vs_hbm, sc_buf)
  else:
    o_ref, kv_buf, sems, count_ref, m_ref, l_ref, acc_ref = refs
    scales = None
  t, h = pl.program_id(0), pl.program_id(1)
  heads, group, tile, head_dim = q_ref.shape
  rows = group * tile
  # A lane-dense pool (pack > 1, kernels._layout) holds ``pack`` tokens a row: blocks,
  # DMAs and VMEM slots count rows; positions and masks count tokens. q's ``group`` rows
  # are then ``pack`` parts (pack_queries), part j reading the token in lanes
  # [j * head_dim / pack, ...) of each K/V row.
  block_rows = k_hbm.shape[2]
  block_size = block_rows * pack
  chunk_rows = blocks_per_chunk * block_rows
  chunk_tokens = chunk_rows * pack
  t0 = t * tile

  # Row r of the flattened tile is head r // tile, token t0 + r % tile (tile: power of 2).
  row_token = t0 + (lax.broadcasted_iota(jnp.int32, (rows, 1), 0) & (tile - 1))
  key_iota_row, key_iota_col = key_iotas(rows, chunk_rows, head_dim, pack)

  def sequence(s, _):
    cs, ce = cu_ref[s], cu_ref[s + 1]
    offset = lengths_ref[s] - (ce - cs)  # position of the sequence's first query
    r0, r1 = jnp.maximum(cs, t0), jnp.minimum(ce, t0 + tile)
    pos_first, pos_last = offset + r0 - cs, offset + r1 - 1 - cs
    # Keys any row of this sequence in this tile can see: [key_lo, key_hi].
    key_hi = pos_last
    if sliding_window is not None:
      key_lo = jnp.maximum(pos_first - sliding_window + 1, 0)
    else:
      key_lo = jnp.int32(0)
    first = lax.div(key_lo, block_size)
    end = jnp.clip(_common.cdiv(jnp.maximum(pos_last + 1, 0), block_size), 0, max_blocks)
    n = jnp.where(r1 > r0, _common.cdiv(jnp.maximum(end - first, 0), blocks_per_chunk), 0)
    row_in = (row_token >= cs) & (row_token < ce)
    row_pos = offset + row_token - cs

    def chunk(c, slot):
      return _common.Chunk(
        k_hbm,
        v_hbm,
        kv_buf,
        sems,
        table_ref,
        scales,
        row=s,
        head=h * heads,
        first=first + c * blocks_per_chunk,
        end=end,
        slot=slot,
        blocks_per_chunk=blocks_per_chunk,
        max_blocks=max_blocks,
      )

    def start(ch):
      count_ref[ch.slot] = ch.start()  # blocks in flight in that slot, for its wait

    @pl.when(n > 0)
    def _():
      start(chunk(0, 0))

    def body(c, _):
      slot = lax.rem(c, 2)

      @pl.when(c + 1 < n)
      def _():
        start(chunk(c + 1, 1 - slot))

      cur = chunk(c, slot)
      fetched = count_ref[slot]
      cur.wait(fetched)
      key0 = (first + c * blocks_per_chunk) * block_size

      def attend(masks):
        """Every head's online-softmax step over the chunk; ``masks`` None: no key masked.

        A loop over the step's heads, whose softmax state lives in VMEM scratch: one copy
        of the loop body whatever the number of heads (a prefill tile's head is ``rows``
        of 512 to 1,024 matmul rows; unrolled over 8 heads, Mosaic's code and compile
        time grow eightfold).
        """
        visible, v_ok, key_ok = masks if masks is not None else (None, None, None)
        # Masked chunks: rows of other sequences sharing the tile take nothing from this
        # sequence's V (a NaN there would reach them through 0 x NaN). The fast path's
        # rows are all this sequence's.
        rows_ok = None if masks is None else row_in
        head_ids = lax.broadcasted_iota(jnp.int32, (heads, 1), 0)

        def head_scales(kv, hh):
          # Row hh of the chunk's [heads, chunk] scales, by a select and a sum over the
          # heads rather than a dynamic one-row slice of the sublane axis.
          return jnp.sum(jnp.where(head_ids == hh, sc_buf[slot, kv], 0.0), 0, keepdims=True)

        def head(hh, _):
          ks = vs = None
          if quantized:
            ks = head_scales(0, hh)
            vs = head_scales(1, hh)
            if key_ok is not None:
              # V scales of slots not in use are zeroed (a slot never DMA'd holds
              # anything, NaN included).
              vs = jnp.where(key_ok, vs, 0.0)
          q = q_ref[hh].reshape(rows, head_dim)
          s_ = _common.scores(
            q,
            _keys(kv_buf[slot, 0, hh], v_ok, pack),
            scale=scale,
            logit_soft_cap=logit_soft_cap,
            k_scale=ks,
          )
          m, l_, acc = _common.online_softmax_step(
            (m_ref[hh], l_ref[hh], acc_ref[hh]),
            s_,
            visible,
            kv_buf[slot, 1, hh],
            v_ok,
            vs,
            q_dtype=q.dtype,
            rows_ok=rows_ok,
          )
          m_ref[hh], l_ref[hh], acc_ref[hh] = m, l_, acc
          return 0

        lax.fori_loop(0, heads, head, 0)

      def masked():
        kp = key0 + key_iota_row
        kp_col = key0 + key_iota_col
        # Keys in a fetched block inside [key_lo, last]: blocks past the table (end is at
        # most max_blocks) are never fetched.
        last = jnp.minimum(key_hi, end * block_size - 1)
        key_ok, v_ok = cur.hole_masks(
          (kp >= key_lo) & (kp <= last),
          (kp_col >= key_lo) & (kp_col <= last),
          cur.holes(fetched),
        )
        visible = row_in & key_ok & (kp <= row_pos)
        if sliding_window is not None:
          visible = visible & (kp > row_pos - sliding_window)
        attend((visible, v_ok, key_ok))

      # Fast path: every block fetched, every row of the tile in this sequence, and every
      # key seen by every row (before the first row's position, inside the last row's
      # window): no per-key mask.
      full = (
        (fetched == blocks_per_chunk)
        & (cs <= t0)
        & (ce >= t0 + tile)
        & (key0 + chunk_tokens - 1 <= pos_first)
      )
      if sliding_window is not None:
        full = full & (key0 > pos_last - sliding_window)
      lax.cond(full, lambda: attend(None), masked)
      return 0

    lax.fori_loop(0, n, body, 0)
    return 0

  m_ref[...] = jnp.full(m_ref.shape, _common.MASK_VALUE, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
  lax.fori_loop(seq_lo_ref[t], seq_hi_ref[t] + 1, sequence, 0)

  def finish(hh, _):
    carry = (m_ref[hh], l_ref[hh], acc_ref[hh])
    if pack > 1:
      carry = _merge_parts(carry, pack, head_dim // pack)
    out = _common.finish(carry, o_ref.dtype)
    o_ref[hh] = out.reshape(o_ref.shape[1:])
    return 0

  lax.fori_loop(0, heads, finish, 0)


def _merge_parts(carry, pack, part_dim):
  """One softmax state from the ``pack`` parts of a lane-dense tile's rows (each part
  normalised over its own tokens, rows ``[j * rows / pack, ...)``, its output in lanes
  ``[j * part_dim, ...)``): the parts' states merge as split-K partials, part j's lanes
  rotated to lanes ``[0, part_dim)``. The other lanes of the result are not used."""
  m, denom, acc = carry
  rows = m.shape[0] // pack
  ms = [m[j * rows : (j + 1) * rows] for j in range(pack)]
  m_new = functools.reduce(jnp.maximum, ms)
  weights = [jnp.exp(mj - m_new) for mj in ms]
  denom_new = functools.reduce(
    jnp.add, [w * denom[j * rows : (j + 1) * rows] for j, w in enumerate(weights)]
  )
  width = acc.shape[1]
  parts = []
  for j, w in enumerate(weights):
    part = acc[j * rows : (j + 1) * rows]
    if j:
      part = pltpu.roll(part, width - j * part_dim, 1)
    parts.append(w * part)
  return m_new, denom_new, functools.reduce(jnp.add, parts)


def _tile_sequences(cu_q_lens, num_tiles, tile):
  """Per tile: first and last sequence whose rows overlap it (last < first: none)."""
  batch = cu_q_lens.shape[0] - 1
  t0 = jnp.arange(num_tiles, dtype=jnp.int32) * tile
  t_last = jnp.minimum(t0 + tile, cu_q_lens[-1]) - 1
  lo = jnp.searchsorted(cu_q_lens, t0, side="right").astype(jnp.int32) - 1
  hi = jnp.searchsorted(cu_q_lens, t_last, side="right").astype(jnp.int32) - 1
  valid = (t0 < cu_q_lens[-1]) & (t0 + tile > cu_q_lens[0])
  lo = jnp.clip(lo, 0, batch - 1)
  hi = jnp.where(valid, jnp.clip(hi, 0, batch - 1), lo - 1)
  return lo, hi


def _ragged_call(
  qt,
  k_blocks,
  v_blocks,
  table_flat,
  lengths,
  cu_q_lens,
  *,
  scale,
  sliding_window,
  logit_soft_cap,
  blocks_per_chunk,
  max_blocks,
  tile,
  heads_per_step,
  interpret,
  vmem_limit_bytes=None,
  k_scales=None,
  v_scales=None,
  pack=1,
):
  """One pallas_call over ``qt: [num_kv_heads, group, num_tiles * tile, head_dim]``.

  ``pack`` > 1: the pools are lane-dense and ``qt`` is ``pack_queries``'s (``group``
  counts its parts' rows, ``head_dim`` is the pools' row width); the output has
  ``group / pack`` rows a tile, each real result in lanes ``[0, head_dim / pack)``."""
  num_kv_heads, group, padded_tokens, head_dim = qt.shape
  block_size = k_blocks.shape[2]
  num_tiles = padded_tokens // tile
  seq_lo, seq_hi = _tile_sequences(cu_q_lens, num_tiles, tile)
  kernel = functools.partial(
    _ragged_kernel,
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    blocks_per_chunk=blocks_per_chunk,
    max_blocks=max_blocks,
    quantized=k_scales is not None,
    pack=pack,
  )
  scales = () if k_scales is None else (k_scales, v_scales)
  q_spec = pl.BlockSpec((heads_per_step, group, tile, head_dim), lambda t, h, *_: (h, 0, t, 0))
  out_group = group // pack
  o_spec = pl.BlockSpec((heads_per_step, out_group, tile, head_dim), lambda t, h, *_: (h, 0, t, 0))
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=5,
      grid=(num_tiles, num_kv_heads // heads_per_step),
      in_specs=[q_spec, any_spec, any_spec] + [any_spec] * len(scales),
      out_specs=o_spec,
      scratch_shapes=[
        *_common.kv_scratch(
          heads_per_step, blocks_per_chunk * block_size, head_dim, k_blocks.dtype
        ),
        pltpu.SMEM((2,), jnp.int32),
        pltpu.VMEM((heads_per_step, group * tile, 1), jnp.float32),
        pltpu.VMEM((heads_per_step, group * tile, 1), jnp.float32),
        pltpu.VMEM((heads_per_step, group * tile, head_dim), jnp.float32),
      ],
    ),
    out_shape=jax.ShapeDtypeStruct((num_kv_heads, out_group, padded_tokens, head_dim), qt.dtype),
    # Every step starts and drains its own DMAs, so steps are independent (megacore can
    # split them).
    compiler_params=_common.mosaic_params(("parallel", "parallel"), vmem_limit_bytes),
    interpret=_common.interpret_params(interpret),
  )(lengths, table_flat, cu_q_lens, seq_lo, seq_hi, qt, k_blocks, v_blocks, *scales)


def _ragged_rows(qt, k_blocks, v_blocks, block_table, lengths, cu_q_lens, *, tuned, call):
  """The ragged kernel over ``qt [num_kv_heads, group, padded, head_dim]``, in as many calls
  as the SMEM budget needs (each call leaves other calls' rows at zero)."""
  batch, max_blocks = block_table.shape
  padded = qt.shape[2]
  per_call = _config.sequences_per_call(
    smem_budget_bytes=tuned.smem_budget_bytes,
    words_per_sequence=max_blocks + 2,
    fixed_words=2 * (padded // tuned.queries_per_tile) + 1,
    batch=batch,
    what=f"ragged attention with block_table {tuple(block_table.shape)} and "
    f"{padded // tuned.queries_per_tile} query tiles",
  )
  out = None
  row = jnp.arange(padded, dtype=jnp.int32)[None, None, :, None]
  for s0 in range(0, batch, per_call):
    s1 = min(batch, s0 + per_call)
    part = call(
      qt, k_blocks, v_blocks, block_table[s0:s1].reshape(-1), lengths[s0:s1], cu_q_lens[s0 : s1 + 1]
    )
    if out is None:
      out = part
    else:
      # Each call leaves the rows of other calls' sequences at zero; keep its own rows.
      mine = (row >= cu_q_lens[s0]) & (row < cu_q_lens[s1])
      out = jnp.where(mine, part, out)
  return out


def _split_rows(cu_q_lens, num_tokens):
  """Where the rows of a mixed batch go when its decodes run in a launch of their own.

  A decode is a sequence with exactly one query row. Returns ``is_decode bool[batch]``,
  ``cu_prefill i32[batch + 1]`` (the other sequences' rows packed from row 0, decodes with
  none), ``src i32[num_tokens]`` (the q row each packed row comes from; rows past
  ``cu_prefill[-1]`` repeat a valid row and belong to no sequence), ``seq i32[num_tokens]``
  (the sequence owning each original row) and ``in_seq bool[num_tokens]`` (whether it has
  one: rows outside ``[cu_q_lens[0], cu_q_lens[-1])`` do not).
  """
  batch = cu_q_lens.shape[0] - 1
  q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
  is_decode = q_lens == 1
  prefill_lens = jnp.where(is_decode, 0, q_lens)
  cu_prefill = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(prefill_lens)])
  cu_prefill = cu_prefill.astype(jnp.int32)
  rows = jnp.arange(num_tokens, dtype=jnp.int32)
  # The owner of a row is the last sequence starting at or before it (empty sequences
  # share their start with the next one, which side="right" picks).
  owner = jnp.clip(jnp.searchsorted(cu_prefill, rows, side="right") - 1, 0, batch - 1)
  src = jnp.clip(cu_q_lens[owner] + rows - cu_prefill[owner], 0, num_tokens - 1)
  seq = jnp.clip(jnp.searchsorted(cu_q_lens, rows, side="right") - 1, 0, batch - 1)
  in_seq = (rows >= cu_q_lens[0]) & (rows < cu_q_lens[-1])
  return is_decode, cu_prefill, src.astype(jnp.int32), seq.astype(jnp.int32), in_seq


@functools.partial(
  jax.jit,
  static_argnames=(
    "scale",
    "sliding_window",
    "logit_soft_cap",
    "block_sizes",
    "interpret",
    "lane_dense",
  ),
)
def paged_attention_ragged(
  q: jax.Array,
  k_blocks: jax.Array,
  v_blocks: jax.Array,
  block_table: jax.Array,
  lengths: jax.Array,
  cu_q_lens: jax.Array,
  *,
  scale: float | None = None,
  sliding_window: int | None = None,
  logit_soft_cap: float | None = None,
  block_sizes: _config.BlockSizes | None = None,
  interpret=False,
  k_scales: jax.Array | None = None,
  v_scales: jax.Array | None = None,
  lane_dense: bool = False,
) -> jax.Array:
  """Ragged (chunked prefill / mixed prefill and decode) paged attention on TPU.

  With ``block_sizes.split_decode`` (the default), the sequences with one query row (the
  decodes of a mixed batch) run through the decode kernel in a launch of their own and
  the others through the ragged kernel, their rows packed from row 0 so that no prefill
  tile carries a decode row; each launch is skipped (``lax.cond``) when it has no
  sequence, and the results are gathered back into q's row order.

  Args:
    q: ``[num_tokens, num_q_heads, head_dim]``, the rows of every sequence back to back.
    k_blocks, v_blocks: ``[num_kv_heads, num_blocks, block_size, head_dim]``, or with
      ``lane_dense`` ``[num_kv_heads, num_blocks, block_size * head_dim / 128, 128]``
      (head_dim 32 or 64, ``kernels._layout``).
    block_table: ``i32[batch, max_blocks]``, ``-1`` where unused.
    lengths: ``i32[batch]``, tokens in each sequence including this call's queries.
    cu_q_lens: ``i32[batch + 1]``, cumulative query rows per sequence.
    scale, sliding_window, logit_soft_cap: as in :func:`kernels.paged_attention`.
    block_sizes: :class:`BlockSizes`; None picks defaults for the shape.
    interpret: False, True, or a ``pltpu.InterpretParams`` (TPU interpret mode on CPU).
    k_scales, v_scales: 8-bit K/V only: ``f32[num_kv_heads, num_blocks, block_size]``,
      DMA'd with their blocks and folded into the scores and probabilities.
    lane_dense: the pools are lane-dense (above).

  Returns:
    ``[num_tokens, num_q_heads, head_dim]`` in ``q.dtype``.
  """
  _config.check_shapes(q, k_blocks, block_sizes, lane_dense=lane_dense)
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads, _, block_rows, width = k_blocks.shape
  batch, max_blocks = block_table.shape
  group = num_q_heads // num_kv_heads
  if num_tokens == 0 or batch == 0 or max_blocks == 0 or k_blocks.shape[1] == 0:
    return jnp.zeros_like(q)
  pack = _layout.tokens_per_row(head_dim, width)
  # Sized as the kernels see the pool: rows of ``width`` lanes, ``pack * group`` q rows.
  shape = dict(
    q_dtype=q.dtype,
    kv_dtype=k_blocks.dtype,
    num_kv_heads=num_kv_heads,
    block_size=block_rows,
    head_dim=width,
    max_blocks=max_blocks,
    group=pack * group,
  )
  split = block_sizes is None or block_sizes.split_decode
  tuned = _config.resolve(block_sizes, ragged=True, prefill_only=split, **shape)
  tile = tuned.queries_per_tile
  num_tiles = -(-num_tokens // tile)
  padded = num_tiles * tile
  scale = head_dim**-0.5 if scale is None else scale
  options = dict(scale=scale, sliding_window=sliding_window, logit_soft_cap=logit_soft_cap)
  call = functools.partial(
    _ragged_call,
    **options,
    blocks_per_chunk=tuned.blocks_per_chunk,
    max_blocks=max_blocks,
    tile=tile,
    heads_per_step=tuned.kv_heads_per_step,
    interpret=interpret,
    vmem_limit_bytes=tuned.vmem_limit_bytes,
    k_scales=k_scales,
    v_scales=v_scales,
    pack=pack,
  )

  def ragged(q, cu):
    # [T, Hq, D] -> [Hkv, group, T_padded, D]: a tile's rows of one KV head are one block.
    qt = jnp.pad(q, ((0, padded - num_tokens), (0, 0), (0, 0)))
    qt = qt.reshape(padded, num_kv_heads, group, head_dim).transpose(1, 2, 0, 3)
    if pack > 1:
      qt = pack_queries(qt, pack, axis=1)
    out = _ragged_rows(qt, k_blocks, v_blocks, block_table, lengths, cu, tuned=tuned, call=call)
    out = out[..., :head_dim]
    return out.transpose(2, 0, 1, 3).reshape(padded, num_q_heads, head_dim)[:num_tokens]

  if not split:
    return ragged(q, cu_q_lens)

  is_decode, cu_prefill, src, seq, in_seq = _split_rows(cu_q_lens, num_tokens)
  # Decode launch: every sequence, decodes first (a stable order, so the decode kernel's
  # cross-step prefetch runs from one decode to the next), the others with length 0 (no
  # chunk, no DMA).
  order = jnp.argsort(jnp.logical_not(is_decode), stable=True).astype(jnp.int32)
  decode_tuned = _config.resolve(block_sizes, ragged=False, **shape)

  def decode(_):
    row = jnp.clip(cu_q_lens[:-1][order], 0, num_tokens - 1)
    qg = q[row].reshape(batch, num_kv_heads, group, head_dim)
    out = decode_rows(
      qg,
      k_blocks,
      v_blocks,
      block_table[order],
      jnp.where(is_decode[order], lengths[order], 0),
      tuned=decode_tuned,
      **options,
      interpret=interpret,
      k_scales=k_scales,
      v_scales=v_scales,
    )
    return out.reshape(batch, num_q_heads, head_dim)

  decoded = lax.cond(
    jnp.any(is_decode), decode, lambda _: jnp.zeros((batch, num_q_heads, head_dim), q.dtype), None
  )
  prefilled = lax.cond(
    cu_prefill[-1] > 0, lambda _: ragged(q[src], cu_prefill), lambda _: jnp.zeros_like(q), None
  )
  # Back to q's row order: a decode row from the decode launch (at its sequence's place in
  # ``order``), a prefill row from its packed row, rows of no sequence zero.
  rank = jnp.zeros((batch,), jnp.int32).at[order].set(jnp.arange(batch, dtype=jnp.int32))
  packed = jnp.clip(cu_prefill[seq] + jnp.arange(num_tokens) - cu_q_lens[seq], 0, num_tokens - 1)
  take_decode = (in_seq & is_decode[seq])[:, None, None]
  out = jnp.where(take_decode, decoded[rank[seq]], prefilled[packed])
  return jnp.where(in_seq[:, None, None], out, jnp.zeros((), q.dtype))
