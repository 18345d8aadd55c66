"""Cascade attention on TPU (Pallas, Mosaic): a shared prefix read once per group per step.

Decode only. The result is :func:`kernels.paged_attention`'s (decode) for the same inputs,
computed in three parts from a plan (:func:`kernels.plan_cascade`, built on the host):

1. **Shared part.** For each group ``g`` of rows whose block tables start with the same
   physical blocks ``group_table[g]``, the queries of every member row (all their query
   heads of one KV head: ``members x group`` rows of one ``[rows, head_dim]`` tile) against
   the keys ``[0, group_lens[g])``: one matmul per KV tile, each shared K/V block DMA'd
   once per group (per ``CASCADE_ROWS`` tile of members) instead of once per member.
2. **Own part.** Each row against its own keys ``[row_starts[b], lengths[b])`` (all of
   them, ``row_starts = 0``, for a row in no group).
3. **Merge** by log-sum-exp: ``o = (e^(l1 - m) o1 + e^(l2 - m) o2) / (e^(l1 - m) + e^(l2 - m))``
   with ``m = max(l1, l2)``.

Parts 1 and 2 are the decode kernel of :mod:`kernels.tpu.decode` (same scalar prefetch of
the tables, one DMA per block for all the step's KV heads, double-buffered chunks), run
with a first-key offset (part 2) and a log-sum-exp output (both), partial outputs in
float32. Part 1 runs it over the group table, with the members' queries gathered into the
rows of each group's q tile; part 3 is plain JAX on ``[batch, num_q_heads, head_dim]``
arrays, negligible next to the K/V reads. Same TPU shape rules as the other kernels
(``kernels.tpu._config.check_shapes``): head_dim a multiple of 128 (or 32 / 64 in a
lane-dense pool, ``kernels._layout``; other sizes arrive padded to 128 from a lane-padded
pool, ``kernels.cascade_attention(..., lane_padded=True)``), and a block_size of a
multiple of 128 for 8-bit K/V.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import _layout
from kernels.cascade import merge_lse
from kernels.tpu import _common, _config
from kernels.tpu.decode import decode_rows

# Query rows (members x query heads of one KV head) of one shared-part tile. A larger group
# is split into tiles of at most this many rows, each reading the shared blocks once: 256
# rows x a 512-token chunk is a 512 KiB f32 score tile, a few MXU passes per chunk.
CASCADE_ROWS = 256

PLAN_FIELDS = ("group_table", "group_lens", "group_rows", "row_starts")


def _check_plan(plan, batch):
  """Static checks of the plan's arrays (shapes and integer dtypes; values are the host
  planner's job; the kernels skip every table entry outside the pool, as -1)."""
  arrays = {}
  for name in PLAN_FIELDS:
    if not hasattr(plan, name):
      raise ValueError(f"plan must have a {name!r} array (a kernels.CascadePlan), got {plan!r}")
    x = getattr(plan, name)
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"plan.{name} must be int32, got {x.dtype}")
    arrays[name] = x
  gt, gl, gr, rs = (arrays[n] for n in PLAN_FIELDS)
  if gt.ndim != 2 or gl.ndim != 1 or gr.ndim != 2 or rs.ndim != 1:
    raise ValueError(
      "plan shapes must be group_table [G, S], group_lens [G], group_rows [G, M], "
      f"row_starts [batch]; got {gt.shape}, {gl.shape}, {gr.shape}, {rs.shape}"
    )
  if not (gt.shape[0] == gl.shape[0] == gr.shape[0]):
    raise ValueError(
      f"plan: group_table {gt.shape}, group_lens {gl.shape} and group_rows {gr.shape} must "
      "have the same number of groups"
    )
  if rs.shape[0] != batch:
    raise ValueError(f"plan.row_starts {rs.shape} must have one entry per row of q ({batch})")
  return tuple(x.astype(jnp.int32) for x in (gt, gl, gr, rs))


def _member_tiles(group_table, group_lens, group_rows, group):
  """Splits groups of more than ``CASCADE_ROWS // group`` members into tiles (each with
  the group's table and length): ``[G', S]``, ``[G']``, ``[G', M']``. ``group``: the q
  rows a member brings to the kernel (its query heads of a KV head, times the parts of a
  lane-dense pool)."""
  num_groups, members = group_rows.shape
  per_tile = max(1, CASCADE_ROWS // group)
  if members <= per_tile:
    return group_table, group_lens, group_rows
  pad = -members % per_tile
  rows = jnp.pad(group_rows, ((0, 0), (0, pad)), constant_values=-1)
  tiles = (members + pad) // per_tile
  return (
    jnp.repeat(group_table, tiles, axis=0),
    jnp.repeat(group_lens, tiles, axis=0),
    rows.reshape(num_groups * tiles, per_tile),
  )


@functools.partial(jax.jit, static_argnames=("scale", "logit_soft_cap", "block_sizes", "interpret"))
def _cascade(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  group_table,
  group_lens,
  group_rows,
  row_starts,
  *,
  scale,
  logit_soft_cap,
  block_sizes,
  interpret,
  k_scales,
  v_scales,
):
  batch, num_q_heads, head_dim = q.shape
  num_kv_heads, _, block_rows, width = k_blocks.shape
  group = num_q_heads // num_kv_heads
  scale = head_dim**-0.5 if scale is None else scale
  # A lane-dense pool (kernels._layout): the kernel sees rows of ``width`` lanes and
  # ``pack`` times the q rows (decode_rows packs them), and is sized for that.
  pack = _layout.tokens_per_row(head_dim, width)

  def tuned(max_blocks):
    return _config.resolve(
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

  common = dict(
    scale=scale,
    sliding_window=None,
    logit_soft_cap=logit_soft_cap,
    interpret=interpret,
    k_scales=k_scales,
    v_scales=v_scales,
    with_lse=True,
  )
  # Own part: each row from its row_start on.
  own, own_lse = decode_rows(
    q.reshape(batch, num_kv_heads, group, head_dim),
    k_blocks,
    v_blocks,
    block_table,
    lengths,
    tuned=tuned(block_table.shape[1]),
    starts=row_starts,
    **common,
  )
  if group_rows.shape[0] == 0 or group_rows.shape[1] == 0 or group_table.shape[1] == 0:
    return own.reshape(batch, num_q_heads, head_dim).astype(q.dtype)

  # Shared part: each group's member queries as the rows of one tile per KV head.
  table, glens, rows = _member_tiles(group_table, group_lens, group_rows, pack * group)
  tiles, members = rows.shape
  qs = q[jnp.clip(rows, 0, batch - 1)]  # [tiles, members, Hq, D]; padding members read row 0
  qs = qs.reshape(tiles, members, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
  shared, shared_lse = decode_rows(
    qs.reshape(tiles, num_kv_heads, members * group, head_dim),
    k_blocks,
    v_blocks,
    table,
    glens,
    tuned=tuned(table.shape[1]),
    **common,
  )
  shared = shared.reshape(tiles, num_kv_heads, members, group, head_dim).transpose(0, 2, 1, 3, 4)
  shared_lse = shared_lse.reshape(tiles, num_kv_heads, members, group).transpose(0, 2, 1, 3)
  # Back to the rows (a row is in at most one group); padding members (-1) are dropped.
  target = jnp.where(rows >= 0, rows, batch).reshape(-1)
  row_out = (
    jnp.zeros(own.shape, jnp.float32)
    .at[target]
    .set(shared.reshape((-1,) + own.shape[1:]), mode="drop")
  )
  row_lse = (
    jnp.full(own_lse.shape, _common.MASK_VALUE, jnp.float32)
    .at[target]
    .set(shared_lse.reshape((-1,) + own_lse.shape[1:]), mode="drop")
  )
  # The shared LSE merge (kernels.cascade); a part that saw no key has MASK_VALUE, which
  # weighs exp(MASK_VALUE - m) = 0 beside a part that did, and two such parts give zeros.
  out = merge_lse(own, own_lse, row_out, row_lse, q.dtype)
  return out.reshape(batch, num_q_heads, head_dim)


def cascade_attention(
  q: jax.Array,
  k_blocks: jax.Array,
  v_blocks: jax.Array,
  block_table: jax.Array,
  lengths: jax.Array,
  plan,
  *,
  scale: float | None = None,
  logit_soft_cap: float | None = None,
  interpret=False,
  k_scales: jax.Array | None = None,
  v_scales: jax.Array | None = None,
  block_sizes: _config.BlockSizes | None = None,
  lane_dense: bool = False,
) -> jax.Array:
  """Decode paged attention with the prefix shared by each of ``plan``'s groups read once.

  Args:
    q: ``[batch, num_q_heads, head_dim]``, one query per row at position ``lengths[b] - 1``.
    k_blocks, v_blocks, block_table, lengths, k_scales, v_scales: as in
      :func:`kernels.tpu.paged_attention_decode`.
    plan: a :class:`kernels.CascadePlan` (``group_table i32[G, S]``, ``group_lens
      i32[G]``, ``group_rows i32[G, M]``, ``row_starts i32[batch]``) from
      :func:`kernels.plan_cascade`. Every member of group ``g`` must hold the blocks
      ``group_table[g]`` as its leading block-table entries, ``group_lens[g]`` at most its
      length, and ``row_starts`` its group's length (0 for a row in no group); the
      planner guarantees it, and the kernels do not check values.
    scale, logit_soft_cap: as in :func:`kernels.paged_attention` (already validated by it).
    interpret: False, True, or a ``pltpu.InterpretParams`` (TPU interpret mode on CPU).
    block_sizes: :class:`BlockSizes` for both parts (``blocks_per_chunk``,
      ``kv_heads_per_step``, ``smem_budget_bytes``, ``num_cores``); None picks defaults.
    lane_dense: the pools are lane-dense (``kernels._layout``), as in
      :func:`kernels.tpu.paged_attention_decode`.

  Returns:
    ``[batch, num_q_heads, head_dim]`` in ``q.dtype``: the decode paged attention.
  """
  _config.check_shapes(q, k_blocks, block_sizes, lane_dense=lane_dense)
  if block_sizes is not None and not isinstance(block_sizes, _config.BlockSizes):
    raise ValueError(
      f"block_sizes must be a kernels.tpu.BlockSizes or None, got {type(block_sizes)}"
    )
  if q.ndim != 3:
    raise ValueError(f"cascade attention is decode only: q must be [batch, heads, dim], {q.shape}")
  arrays = _check_plan(plan, q.shape[0])
  if q.shape[0] == 0 or block_table.shape[1] == 0 or k_blocks.shape[1] == 0:
    return jnp.zeros_like(q)
  return _cascade(
    q,
    k_blocks,
    v_blocks,
    block_table,
    lengths,
    *arrays,
    scale=scale,
    logit_soft_cap=logit_soft_cap,
    block_sizes=block_sizes,
    interpret=interpret,
    k_scales=k_scales,
    v_scales=v_scales,
  )


__all__ = ["CASCADE_ROWS", "cascade_attention"]
