"""Pallas TPU (Mosaic) paged-attention decode kernel: one query per sequence.

Grid ``(num_cores, batch / num_cores, num_kv_heads / kv_heads_per_step)``. One grid step is
one sequence and ``kv_heads_per_step`` KV heads (the leading axis splits the batch over the
two TensorCores of a megacore chip such as v5p; it is 1 on v5e and v6e). The
``group = num_q_heads // num_kv_heads`` query heads of each KV head are handled together as
the rows of one ``[group, head_dim]`` tile, so each K/V block is read from HBM once per KV
head.

- ``lengths`` and the flattened ``block_table`` are scalar-prefetch operands (SMEM); the
  K/V pools stay in HBM (``memory_space=pl.ANY``) and the kernel copies blocks into VMEM
  itself with async DMAs: one DMA per block for K and one for V, each covering all the
  step's KV heads (``[heads_per_step, block_size, head_dim]``, strided in HBM).
- A compute step covers ``blocks_per_chunk`` blocks (2,048 rows by default: tokens, or
  4,096 / 8,192 tokens in a lane-dense pool of head_dim 64 / 32). Two VMEM slots
  alternate: while a chunk is computed, the next chunk's DMAs are in flight. All
  the DMAs into a slot signal one semaphore, waited on once for the bytes of the whole
  chunk (``_common.Chunk.wait``).
- A chunk whose every block was fetched and whose every key is visible takes a fast path
  with no per-key mask; others mask keys outside ``[lo, length)`` and, only when a ``-1``
  entry lies inside the chunk, the keys of that block. The last chunk of a step starts
  the first chunk of the *next* grid step of the same core (the other grid axes are
  "arbitrary", so the order is sequential and known): only a core's first step waits on a
  cold DMA.
- Only blocks ``[first, ceil(length / block_size))`` are fetched (``first`` skips blocks
  wholly outside a sliding window); ``-1`` table entries are never DMA'd.
- Scores and the softmax state are float32; bf16 K/V go to the MXU as bf16 only when q is
  bf16 too (exact products, f32 accumulation; ``p @ V`` then rounds p to bf16, one MXU
  pass), as do 8-bit K/V with bf16 q (widened to bf16 exactly); otherwise they are
  widened to f32 and p stays f32.
- A batch whose block table does not fit the SMEM budget is split into several calls.
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


def _visible_range(length, *, block_size, max_blocks, sliding_window, start=None):
  """Keys ``[lo, length)`` the decode query at ``length - 1`` sees, and their blocks.

  ``start`` (cascade attention's own part): the row reads only keys from ``start`` on,
  the ones before it being read by the shared part; blocks wholly before it are skipped.
  """
  if start is not None:
    lo = jnp.clip(start, 0, length)
    return lo, lax.div(lo, block_size), jnp.clip(_common.cdiv(length, block_size), 0, max_blocks)
  lo = jnp.maximum(length - sliding_window, 0) if sliding_window is not None else 0
  end = jnp.clip(_common.cdiv(length, block_size), 0, max_blocks)
  first = lax.div(lo, block_size) if sliding_window is not None else jnp.int32(0)
  return lo, first, end


def _part(index, part_size, parts):
  """``index // part_size`` for ``index`` in ``[0, parts * part_size)``, by comparisons
  (no vector integer division in the kernel)."""
  out = jnp.zeros_like(index)
  for j in range(1, parts):
    out = out + (index >= j * part_size).astype(index.dtype)
  return out


def _keys(k, k_ok, pack):
  """A chunk's K as the scores read it. Lane-dense (``pack`` > 1) and masked: the lanes of
  tokens outside ``k_ok`` ([rows, width], the V mask) are zeroed, since a row's tokens
  share its dot products (q's zero lanes times a NaN would poison its valid token's
  score); plain rows are masked after the product instead (a whole score column)."""
  if pack == 1 or k_ok is None:
    return k
  return jnp.where(k_ok, k, jnp.zeros((), k.dtype))


def key_iotas(rows, chunk_rows, width, pack):
  """Each chunk element's token offset in the chunk, for the masks: ``(row [1 or rows,
  chunk_rows], col [chunk_rows, 1 or width])``, the scores' keys and V's rows. Plain
  (``pack`` 1): the row index. Lane-dense: q's ``rows`` are ``pack`` parts (part ``j``
  against the token in lanes ``[j * width / pack, ...)`` of each K/V row, ``pack_queries``),
  so score ``(r, c)`` is token ``c * pack + part(r)`` and V element ``(c, lane)`` token
  ``c * pack + part(lane)``."""
  if pack == 1:
    return (
      lax.broadcasted_iota(jnp.int32, (1, chunk_rows), 1),
      lax.broadcasted_iota(jnp.int32, (chunk_rows, 1), 0),
    )
  shape_row, shape_col = (rows, chunk_rows), (chunk_rows, width)
  row = lax.broadcasted_iota(jnp.int32, shape_row, 1) * pack + _part(
    lax.broadcasted_iota(jnp.int32, shape_row, 0), rows // pack, pack
  )
  col = lax.broadcasted_iota(jnp.int32, shape_col, 0) * pack + _part(
    lax.broadcasted_iota(jnp.int32, shape_col, 1), width // pack, pack
  )
  return row, col


def pack_queries(qg, pack, axis=-2):
  """``qg [..., rows, head_dim]`` as the queries of a lane-dense pool of ``pack`` tokens a
  row: ``[..., pack * rows, pack * head_dim]``, part ``j`` the rows with q in lanes
  ``[j * head_dim, (j + 1) * head_dim)`` and zeros elsewhere, so that part ``j`` scores
  (and, through p @ V, reads) the token of each K/V row that sits in those lanes. The
  parts are stacked along ``axis``."""
  head_dim = qg.shape[-1]
  widths = [(0, 0)] * (qg.ndim - 1)
  parts = [jnp.pad(qg, widths + [(j * head_dim, (pack - 1 - j) * head_dim)]) for j in range(pack)]
  return jnp.concatenate(parts, axis=axis)


def merge_parts(out, lse, pack, head_dim):
  """The result of ``pack`` parts of q rows (:func:`pack_queries`), each normalised over its
  own tokens: ``out f32[..., pack * rows, pack * head_dim]``, ``lse f32[..., pack * rows]``
  -> ``(f32[..., rows, head_dim], f32[..., rows])`` by their log-sum-exps, as split-K
  partials merge. A part that saw no key has lse ``MASK_VALUE`` and weight 0; a NaN
  stays NaN."""
  rows = out.shape[-2] // pack
  outs = [
    out[..., j * rows : (j + 1) * rows, j * head_dim : (j + 1) * head_dim] for j in range(pack)
  ]
  lses = [lse[..., j * rows : (j + 1) * rows] for j in range(pack)]
  m = functools.reduce(jnp.maximum, lses)
  weights = [jnp.exp(part - m) for part in lses]
  total = functools.reduce(jnp.add, weights)
  merged = functools.reduce(jnp.add, [w[..., None] * o for w, o in zip(weights, outs, strict=True)])
  return merged / total[..., None], m + jnp.log(total)


def _decode_kernel(
  lengths_ref,  # SMEM i32[batch]
  table_ref,  # SMEM i32[batch * max_blocks]
  # with_starts only: starts_ref SMEM i32[batch]. Then:
  # q_ref VMEM [heads_per_step, group, head_dim]
  # k_hbm, v_hbm HBM [num_kv_heads, num_blocks, block_size, head_dim]
  # 8-bit K/V (quantized=True) only: ks_hbm, vs_hbm HBM f32[num_kv_heads, num_blocks,
  # block_size]. Then:
  # o_ref VMEM [heads_per_step, group, head_dim]
  # with_lse only: lse_ref VMEM f32[heads_per_step, group, LANES]
  # kv_buf VMEM [2 (slot), 2 (K, V), heads_per_step, chunk_tokens, head_dim]
  # 8-bit only: sc_buf VMEM f32[2 (slot), 2 (K, V), heads_per_step, chunk_tokens]
  # sems DMA semaphores [2 (K and V, scales), 2 (slot)]
  # state_ref SMEM i32[4]: slot of this step's first chunk; 1 if it was prefetched; per
  # slot, the blocks in flight into it
  *refs,
  scale,
  sliding_window,
  logit_soft_cap,
  blocks_per_chunk,
  max_blocks,
  quantized=False,
  with_starts=False,
  with_lse=False,
  pack=1,
):
  refs = list(refs)
  starts_ref = refs.pop(0) if with_starts else None
  q_ref, k_hbm, v_hbm = refs.pop(0), refs.pop(0), refs.pop(0)
  if quantized:
    ks_hbm, vs_hbm = refs.pop(0), refs.pop(0)
  o_ref = refs.pop(0)
  lse_ref = refs.pop(0) if with_lse else None
  if quantized:
    kv_buf, sc_buf, sems, state_ref = refs
    scales = (ks_hbm, vs_hbm, sc_buf)
  else:
    kv_buf, sems, state_ref = refs
    scales = None
  # h indexes groups of heads_per_step consecutive KV heads.
  core, i, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  per_core, head_groups = pl.num_programs(1), pl.num_programs(2)
  b = core * per_core + i  # each core walks its own contiguous run of sequences
  # A lane-dense pool (pack > 1, kernels._layout) holds ``pack`` tokens a row: blocks,
  # DMAs and VMEM slots count rows; lengths, windows and masks count tokens.
  block_rows = k_hbm.shape[2]
  block_size = block_rows * pack
  chunk_rows = blocks_per_chunk * block_rows
  chunk_tokens = chunk_rows * pack
  heads, group, head_dim = q_ref.shape

  def steps(seq):
    lo, first, end = _visible_range(
      lengths_ref[seq],
      block_size=block_size,
      max_blocks=max_blocks,
      sliding_window=sliding_window,
      start=starts_ref[seq] if with_starts else None,
    )
    return lo, first, end, _common.cdiv(jnp.maximum(end - first, 0), blocks_per_chunk)

  def chunk(seq, head, first, end, c, slot):
    return _common.Chunk(
      k_hbm,
      v_hbm,
      kv_buf,
      sems,
      table_ref,
      scales,
      row=seq,
      head=head * heads,
      first=first + c * blocks_per_chunk,
      end=end,
      slot=slot,
      blocks_per_chunk=blocks_per_chunk,
      max_blocks=max_blocks,
    )

  def start(ch):
    state_ref[2 + ch.slot] = ch.start()  # blocks in flight in that slot, for its wait

  @pl.when((i == 0) & (h == 0))
  def _():
    state_ref[0] = 0
    state_ref[1] = 0

  length = lengths_ref[b]
  lo, first, end, n = steps(b)
  # Keys past the last block the table holds are never fetched (end <= max_blocks).
  hi = jnp.minimum(length, end * block_size)
  base_slot = state_ref[0]

  @pl.when((n > 0) & (state_ref[1] == 0))
  def _():
    start(chunk(b, h, first, end, 0, base_slot))

  # The step this core runs next: the (i, h) axes are "arbitrary", so sequential.
  last_head = h + 1 == head_groups
  next_i = jnp.where(last_head, i + 1, i)
  next_h = jnp.where(last_head, 0, h + 1)
  next_b_safe = core * per_core + jnp.minimum(next_i, per_core - 1)
  _, next_first, next_end, next_n = steps(next_b_safe)
  prefetch_next = (next_i < per_core) & (next_n > 0)

  qs = [q_ref[hh] for hh in range(heads)]
  key_iota_row, key_iota_col = key_iotas(group, chunk_rows, head_dim, pack)

  def body(c, carry):
    slot = lax.rem(base_slot + c, 2)

    @pl.when(c + 1 < n)
    def _():
      start(chunk(b, h, first, end, c + 1, 1 - slot))

    @pl.when((c + 1 == n) & prefetch_next)
    def _():
      start(chunk(next_b_safe, next_h, next_first, next_end, 0, 1 - slot))

    cur = chunk(b, h, first, end, c, slot)
    fetched = state_ref[2 + slot]
    cur.wait(fetched)
    key0 = (first + c * blocks_per_chunk) * block_size

    def attend(carry, masks):
      """Every head's online-softmax step over the chunk; ``masks`` None: no key masked."""
      visible, v_ok, key_ok = masks if masks is not None else (None, None, None)
      out = []
      for hh in range(heads):
        ks = vs = None
        if quantized:
          # 8-bit: this head's K and V scales, f32[1, chunk_tokens]; V scales zeroed where
          # no key is in use (a slot never DMA'd holds anything, NaN included).
          ks = sc_buf[slot, 0, pl.ds(hh, 1)]
          vs = sc_buf[slot, 1, pl.ds(hh, 1)]
          if key_ok is not None:
            vs = jnp.where(key_ok, vs, 0.0)
        s = _common.scores(
          qs[hh],
          _keys(kv_buf[slot, 0, hh], v_ok, pack),
          scale=scale,
          logit_soft_cap=logit_soft_cap,
          k_scale=ks,
        )
        out.append(
          _common.online_softmax_step(
            carry[hh], s, visible, kv_buf[slot, 1, hh], v_ok, vs, q_dtype=qs[hh].dtype
          )
        )
      return tuple(out)

    def masked(carry):
      # Keys the query sees: inside [lo, hi) and in a block that was fetched.
      kp, kp_col = key0 + key_iota_row, key0 + key_iota_col
      key_ok, v_ok = cur.hole_masks(
        (kp >= lo) & (kp < hi), (kp_col >= lo) & (kp_col < hi), cur.holes(fetched)
      )
      return attend(carry, (jnp.broadcast_to(key_ok, (group, chunk_rows)), v_ok, key_ok))

    # Fast path: every block fetched and every key inside [lo, length): no per-key mask.
    full = (fetched == blocks_per_chunk) & (key0 >= lo) & (key0 + chunk_tokens <= length)
    return lax.cond(full, lambda carry: attend(carry, None), masked, carry)

  init = tuple(_common.init_carry(group, head_dim) for _ in range(heads))
  carry = lax.fori_loop(0, n, body, init)
  for hh in range(heads):
    o_ref[hh] = _common.finish(carry[hh], o_ref.dtype)
    if with_lse:
      lse_ref[hh] = jnp.broadcast_to(_common.log_sum_exp(carry[hh]), lse_ref.shape[1:])
  state_ref[0] = lax.rem(base_slot + n, 2)
  # Only a step with chunks of its own reaches the loop iteration that prefetches.
  state_ref[1] = (prefetch_next & (n > 0)).astype(jnp.int32)


def _decode_call(
  q,
  k_blocks,
  v_blocks,
  table_flat,
  lengths,
  *,
  scale,
  sliding_window,
  logit_soft_cap,
  blocks_per_chunk,
  max_blocks,
  num_cores,
  heads_per_step,
  interpret,
  vmem_limit_bytes=None,
  k_scales=None,
  v_scales=None,
  starts=None,
  with_lse=False,
  pack=1,
):
  """One pallas_call over ``q: [batch, num_kv_heads, group, head_dim]``.

  ``batch`` must be a multiple of ``num_cores``. ``pack`` > 1: the pools are lane-dense
  (``kernels._layout``) and q is :func:`pack_queries`'s (``group`` counts its parts' rows,
  ``head_dim`` is the pool's row width). ``starts`` (i32[batch]) and ``with_lse``:
  see :func:`decode_rows`. Returns the output, or (output, lse) with ``with_lse``.
  """
  batch, num_kv_heads, group, head_dim = q.shape
  per_core = batch // num_cores
  block_size = k_blocks.shape[2]
  kernel = functools.partial(
    _decode_kernel,
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    blocks_per_chunk=blocks_per_chunk,
    max_blocks=max_blocks,
    quantized=k_scales is not None,
    with_starts=starts is not None,
    with_lse=with_lse,
    pack=pack,
  )
  scales = () if k_scales is None else (k_scales, v_scales)
  prefetch = (lengths, table_flat) + (() if starts is None else (starts,))
  # The full (group, head_dim) tail of q: legal for any group (a block dim equal to the
  # array dim), so GQA groups of 1..32 need no padding of q.
  q_spec = pl.BlockSpec(
    (None, heads_per_step, group, head_dim), lambda c, i, h, *_: (c * per_core + i, h, 0, 0)
  )
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  # Partial outputs to be merged (with_lse) stay float32: rounding them to a 16-bit q dtype
  # before the merge would round twice.
  out_shape = jax.ShapeDtypeStruct(q.shape, jnp.float32 if with_lse else q.dtype)
  out_specs = q_spec
  if with_lse:
    # The log-sum-exp of each (row, head), repeated along the 128 lanes: a lane-dense tile.
    lse_spec = pl.BlockSpec(
      (None, heads_per_step, group, _config.LANES),
      lambda c, i, h, *_: (c * per_core + i, h, 0, 0),
    )
    lse_shape = jax.ShapeDtypeStruct((batch, num_kv_heads, group, _config.LANES), jnp.float32)
    out_shape, out_specs = (out_shape, lse_shape), (q_spec, lse_spec)
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(prefetch),
      grid=(num_cores, per_core, num_kv_heads // heads_per_step),
      in_specs=[q_spec, any_spec, any_spec] + [any_spec] * len(scales),
      out_specs=out_specs,
      scratch_shapes=[
        *_common.kv_scratch(
          heads_per_step, blocks_per_chunk * block_size, head_dim, k_blocks.dtype
        ),
        pltpu.SMEM((4,), jnp.int32),
      ],
    ),
    out_shape=out_shape,
    # Only the core axis is parallel: within a core, each step prefetches the first chunk
    # of the step that follows it, so their order must be the grid's.
    compiler_params=_common.mosaic_params(
      ("parallel", "arbitrary", "arbitrary"), vmem_limit_bytes=vmem_limit_bytes
    ),
    interpret=_common.interpret_params(interpret),
  )(*prefetch, q, k_blocks, v_blocks, *scales)


def decode_rows(
  qg,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  *,
  tuned: _config.BlockSizes,
  scale,
  sliding_window,
  logit_soft_cap,
  interpret,
  k_scales=None,
  v_scales=None,
  starts=None,
  with_lse=False,
):
  """The decode kernel over ``qg [batch, num_kv_heads, rows, head_dim]``: each batch entry's
  ``rows`` query rows of a KV head (its query heads; for cascade attention's shared part,
  every member's query heads) against the keys ``[lo, lengths[b])`` of block-table row
  ``b``, in as many kernel calls as the SMEM budget needs. Call inside jit.

  ``tuned`` is a resolved :class:`BlockSizes`. ``starts`` (i32[batch], or None): the first
  key each entry reads (``lo``; blocks before it are not fetched). ``with_lse``: also
  return ``f32[batch, num_kv_heads, rows]``, the log-sum-exp of each row's scaled logits
  over the keys it saw, ``MASK_VALUE`` for a row that saw none; the output is then float32
  (a partial result, to be merged).
  """
  batch, num_kv_heads, rows, head_dim = qg.shape
  max_blocks = block_table.shape[1]
  # A lane-dense pool (kernels._layout): each part of the packed q rows reads one token of
  # every K/V row, normalised on its own, and the parts merge by their log-sum-exps.
  pack = _layout.tokens_per_row(head_dim, k_blocks.shape[3])
  want_lse = with_lse
  if pack > 1:
    qg, with_lse = pack_queries(qg, pack), True
  per_call = _config.sequences_per_call(
    smem_budget_bytes=tuned.smem_budget_bytes,
    words_per_sequence=max_blocks + 1 + (starts is not None),
    fixed_words=2,
    batch=batch,
    what=f"decode with block_table {tuple(block_table.shape)}",
  )
  cores = tuned.num_cores
  if per_call >= cores:
    per_call -= per_call % cores
  outs, lses = [], []
  for s0 in range(0, batch, per_call):
    s1 = min(batch, s0 + per_call)
    pad = -(s1 - s0) % cores  # idle sequences (length 0) so every core gets as many
    got = _decode_call(
      jnp.pad(qg[s0:s1], ((0, pad), (0, 0), (0, 0), (0, 0))),
      k_blocks,
      v_blocks,
      jnp.pad(block_table[s0:s1], ((0, pad), (0, 0)), constant_values=-1).reshape(-1),
      jnp.pad(lengths[s0:s1], (0, pad)),
      scale=scale,
      sliding_window=sliding_window,
      logit_soft_cap=logit_soft_cap,
      blocks_per_chunk=tuned.blocks_per_chunk,
      max_blocks=max_blocks,
      num_cores=cores,
      heads_per_step=tuned.kv_heads_per_step,
      interpret=interpret,
      vmem_limit_bytes=tuned.vmem_limit_bytes,
      k_scales=k_scales,
      v_scales=v_scales,
      starts=None if starts is None else jnp.pad(starts[s0:s1], (0, pad)),
      with_lse=with_lse,
      pack=pack,
    )
    out, lse = got if with_lse else (got, None)
    outs.append(out[: s1 - s0])
    if with_lse:
      lses.append(lse[: s1 - s0, :, :, 0])
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
  if not with_lse:
    return out
  lse = lses[0] if len(lses) == 1 else jnp.concatenate(lses, axis=0)
  if pack > 1:
    out, lse = merge_parts(out, lse, pack, head_dim)
    if not want_lse:
      return out.astype(qg.dtype)
  return out, lse


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
def paged_attention_decode(
  q: jax.Array,
  k_blocks: jax.Array,
  v_blocks: jax.Array,
  block_table: jax.Array,
  lengths: jax.Array,
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
  """Decode paged attention on TPU.

  Args:
    q: ``[batch, num_q_heads, head_dim]``, one query per sequence at position
      ``lengths[b] - 1``.
    k_blocks, v_blocks: ``[num_kv_heads, num_blocks, block_size, head_dim]``, or with
      ``lane_dense`` ``[num_kv_heads, num_blocks, block_size * head_dim / 128, 128]``
      (head_dim 32 or 64, ``kernels._layout``).
    block_table: ``i32[batch, max_blocks]``, ``-1`` where unused.
    lengths: ``i32[batch]``, tokens in each sequence including this step's.
    scale, sliding_window, logit_soft_cap: as in :func:`kernels.paged_attention`.
    block_sizes: :class:`BlockSizes`; None picks defaults for the shape.
    interpret: False, True, or a ``pltpu.InterpretParams`` (TPU interpret mode on CPU).
    k_scales, v_scales: 8-bit K/V only: ``f32[num_kv_heads, num_blocks, block_size]``,
      DMA'd with their blocks and folded into the scores and probabilities.
    lane_dense: the pools are lane-dense (above).

  Returns:
    ``[batch, num_q_heads, head_dim]`` in ``q.dtype``.
  """
  _config.check_shapes(q, k_blocks, block_sizes, lane_dense=lane_dense)
  batch, num_q_heads, head_dim = q.shape
  num_kv_heads, _, block_rows, width = k_blocks.shape
  max_blocks = block_table.shape[1]
  group = num_q_heads // num_kv_heads
  if batch == 0 or max_blocks == 0 or k_blocks.shape[1] == 0:  # no block to read: zeros
    return jnp.zeros_like(q)
  pack = _layout.tokens_per_row(head_dim, width)
  # Sized as the kernel sees the pool: rows of ``width`` lanes, ``pack * group`` q rows.
  tuned = _config.resolve(
    block_sizes,
    q_dtype=q.dtype,
    kv_dtype=k_blocks.dtype,
    num_kv_heads=num_kv_heads,
    block_size=block_rows,
    head_dim=width,
    max_blocks=max_blocks,
    group=pack * group,
    ragged=False,
  )
  scale = head_dim**-0.5 if scale is None else scale
  out = decode_rows(
    q.reshape(batch, num_kv_heads, group, head_dim),
    k_blocks,
    v_blocks,
    block_table,
    lengths,
    tuned=tuned,
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    interpret=interpret,
    k_scales=k_scales,
    v_scales=v_scales,
  )
  return out.reshape(batch, num_q_heads, head_dim)
