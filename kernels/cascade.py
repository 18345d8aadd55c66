"""Cascade (shared-prefix) decode attention: read a prefix shared by a group once per step.

Paging stores a prompt shared by many sequences once, but plain paged decode still reads
its K/V once per sequence per step. Cascade attention splits each decode row's keys in two:

1. *shared part*: for each group of rows whose block tables start with the same physical
   blocks, the group's queries (all member rows x the query heads of one KV head) against
   the shared keys ``[0, group_lens[g])`` as one matrix product, so each shared K/V slot is
   read once per group per step; it gives an unnormalised output and a log-sum-exp (LSE)
   per (row, query head);
2. *own part*: each row against its own keys ``[row_starts[b], lengths[b])`` through its
   block table, with its LSE; rows in no group have ``row_starts[b] = 0`` and read all of
   their keys here;
3. a log-sum-exp merge of the two parts.

The result equals ``kernels.paged_attention(q, k_blocks, v_blocks, block_table, lengths)``
(decode) up to float rounding. The grouping is planned on the host, outside jit, by
:func:`plan_cascade` into a :class:`CascadePlan` (arrays, and an optional backend
schedule: a pytree that passes into jit). Backends: ``"reference"`` (plain JAX, below),
``"gpu"`` (Pallas Triton, ``kernels.gpu.cascade``), ``"tpu"`` (Pallas TPU,
``kernels.tpu.cascade``); never a silent fallback.

Changes against the agreed sketch (both additions): :func:`cascade_attention` also takes
``sliding_window=None``, so that a window is refused with a ValueError naming cascade
(instead of a TypeError for an unknown keyword); :func:`plan_cascade`'s buckets are
``group_bucket``, ``member_bucket`` and ``block_bucket`` (the least G, M and S). The
dispatcher validates everything and hands the Pallas backends (``kernels.gpu.cascade`` /
``kernels.tpu.cascade``, ``cascade_attention(q, k_blocks, v_blocks, block_table, lengths,
plan, *, scale, logit_soft_cap, interpret, k_scales, v_scales, block_sizes)``) ``scale`` as
a Python float (``head_dim ** -0.5`` when None was given).

This module imports nothing from paxcache or flax.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels import _layout
from kernels._api import (
  BackendUnavailableError,
  backend_static_checks,
  layout_for,
  resolve_backend,
  run_abstract,
)
from kernels._validate import (
  _shape_str,
  check_arrays,
  validate_inputs,
  validate_options,
  validate_padded_width,
)
from kernels.reference import INVALID_BLOCK, block_present

__all__ = ["CascadePlan", "cascade_attention", "plan_cascade", "validate_plan"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CascadePlan:
  """Which decode rows share which leading blocks: built on the host, passed into jit.

  Every field but ``schedule`` is an array (a pytree leaf). ``G`` groups of at most ``M``
  member rows each share at most ``S`` leading blocks; shapes are padded to powers of two
  by :func:`plan_cascade` so that few shapes compile.

  Attributes:
    group_table: ``i32[G, S]``: the physical ids of each group's shared leading blocks (the
      members' block-table entries ``[:ceil(group_lens[g] / block_size)]``), -1 past them.
    group_lens: ``i32[G]``: shared tokens of each group; may end mid-block; 0 for padding
      groups.
    group_rows: ``i32[G, M]``: the batch rows in each group, -1 where unused. A row is in at
      most one group.
    row_starts: ``i32[B]``: the first key position each row reads in its own part: its
      group's ``group_lens``, or 0 for rows in no group.
    schedule: None (default), or a backend's launch arrays for this plan built on the host
      (``kernels.gpu.cascade.schedule_plan``: the GPU's Mosaic shared part, a pytree of
      arrays and a static chunk count); the backends that do not use it ignore it. It
      belongs to the other fields' values: build it again after changing them.
  """

  group_table: Any
  group_lens: Any
  group_rows: Any
  row_starts: Any
  schedule: Any = None

  @property
  def num_groups(self) -> int:
    return self.group_table.shape[0]


# ------------------------------------------------------------------------------ planning


_BOOLS = (bool, np.bool_)
_INTS = (int, np.integer)


def _pow2_at_least(n: int, lo: int) -> int:
  n = max(int(n), int(lo), 1)
  return 1 << (n - 1).bit_length()


def _byte_key(ids: np.ndarray) -> np.ndarray:
  """``uint32`` keys whose numeric order is the byte (memcmp) order of the int32 ``ids``."""
  ids = np.ascontiguousarray(ids, np.int32)
  if np.little_endian:
    ids = ids.byteswap()
  return ids.view(np.uint32)


def _first_true(neq: np.ndarray, none: int) -> np.ndarray:
  """Column of each row's first True in ``neq [P, W]``; ``none`` for rows with none."""
  first = neq.argmax(axis=1)
  zero = np.flatnonzero(first == 0)  # a True in column 0, or none at all
  if len(zero):
    first[zero[~neq[zero, 0]]] = none
  return first


def _pair_common(table: np.ndarray, a, b, lo: int, cols: int) -> np.ndarray:
  """Common leading blocks of table rows ``a[j]`` and ``b[j]``, which agree on ``[0, lo)``:
  compared over ``[lo, cols)`` first, past ``cols`` only for the pairs equal up to it."""
  width = table.shape[1]
  if not len(a) or lo >= width:
    return np.full(len(a), width, np.int64)
  if lo >= cols:
    return lo + _first_true(table[a, lo:] != table[b, lo:], width - lo)
  common = lo + _first_true(table[a, lo:cols] != table[b, lo:cols], cols - lo)
  if cols < width:
    more = np.flatnonzero(common == cols)
    if len(more):
      common[more] = _pair_common(table, a[more], b[more], cols, width)
  return common


def _trie_order(table: np.ndarray, rows: np.ndarray, cols: int) -> tuple[np.ndarray, np.ndarray]:
  """``rows`` sorted by the bytes of their table rows, and each neighbour pair's common
  leading blocks (``table.shape[1]`` for identical rows).

  The order is the stable byte (memcmp) order of whole rows, so rows with a common leading
  run of ids are contiguous. It is built most-significant column first, without comparing
  whole rows in a sort: sort by the first id; then, while a bucket (rows known to agree on
  a prefix) holds two rows that differ, find the first column where it is not uniform
  (the minimum of its neighbours' common blocks), sort the bucket by that column and split
  it there. Each neighbour pair's common length is compared once (from the column up to
  which the pair is known to agree) or known from the split; rows that sit next to each
  other in the table are compared in place, without a gather. Each round splits every
  bucket it sorts, so there are at most ``len(rows) - 1`` rounds (one when the rows share
  one prefix and then differ). Compares cover the first ``cols`` columns (those a shared
  part can touch; the table may be much wider), and go past them only for pairs equal there.
  """
  width = table.shape[1]
  n = len(rows)
  if n < 2:
    return rows, np.zeros(0, np.int64)
  first = table[rows, 0] if n < len(table) else table[:, 0]
  order = rows  # rows is increasing; a stable sort by the first id
  if not (first == first[0]).all():
    order = rows[np.argsort(_byte_key(first), kind="stable")]
  s, e = int(order[0]), int(order[-1]) + 1
  if e - s == n and (order is rows or (order[1:] > order[:-1]).all()):
    # Neighbours in the table too: compare the slice in place (no gather), first over
    # the columns a shared part can touch, then past them only for rows equal there.
    common = _first_true(table[s + 1 : e, :cols] != table[s : e - 1, :cols], cols)
    if cols < width:
      more = np.flatnonzero(common == cols)
      common[more] = _pair_common(table, s + more, s + more + 1, cols, width)
  else:
    a, b = order[:-1], order[1:]
    common = np.zeros(n - 1, np.int64)
    same = table[a, 0] == table[b, 0]
    common[same] = _pair_common(table, a[same], b[same], 1, cols)
  brk = common == 0  # bucket boundaries: the pair's order is final
  while True:
    if not brk.any():  # one bucket (rows on one prefix): try a one-sort finish first
      col = int(common.min())
      if col == width:  # identical rows
        return order, common
      key = _byte_key(table[order, col])
      perm = np.argsort(key, kind="stable")
      key = key[perm]
      if (key[1:] != key[:-1]).all():  # all differ there: neighbours share exactly col
        return order[perm], np.full(n - 1, col, np.int64)
    inner = ~brk & (common < width)  # pairs in one bucket that still differ somewhere
    if not inner.any():
      return order, common
    bucket = np.concatenate(([0], np.cumsum(brk)))
    col = np.full(int(bucket[-1]) + 1, width, np.int64)
    np.minimum.at(col, bucket[1:][inner], common[inner])
    col = col[bucket]  # per row: its bucket's first non-uniform column (width: none)
    active = col < width
    key = np.where(active, _byte_key(table[order, np.where(active, col, 0)]), 0)
    perm = np.lexsort((key, bucket))  # stable; bucket sizes and places do not change
    order, key = order[perm], key[perm]
    kept = perm[1:] == perm[:-1] + 1  # the same neighbours as before
    new = np.where(kept, common[np.minimum(perm[:-1], n - 2)], 0)
    new[brk] = common[brk]  # rows of two buckets share exactly what the bucket ends did
    act = ~brk & active[1:]
    split = act & (key[1:] != key[:-1])
    new[split] = col[1:][split]
    todo = act & ~split & ~kept
    if todo.any():
      lo = int(col[1:][todo].min()) + 1  # the pairs agree up to their column, and on it
      new[todo] = _pair_common(table, order[:-1][todo], order[1:][todo], lo, cols)
    common, brk = new, brk | split


def _best_runs(shared: np.ndarray, lo: int, hi: int, min_group_size: int) -> list:
  """Best partition of sorted rows ``[lo, hi]`` (inclusive) into groups, by saved reads.

  ``shared[i]`` is the usable shared length (tokens) of sorted rows i and i + 1, none of
  them below the least a group may share (the caller cut the rows at shorter links). A
  run's shared length is the minimum of its ``shared``; grouping ``m`` rows that share
  ``s`` tokens saves ``(m - 1) * s`` token reads. A run is either one group or split at
  its weakest link (its first minimum), whichever saves more (ties: one group), the two
  halves chosen the same way (a Cartesian-tree dynamic programme, evaluated with a work
  list: no recursion). A run where one group saves at least ``(m - 2) *`` its longest
  link is taken whole without looking inside (no split can save more). Returns
  ``[(lo, hi, shared)]`` of the chosen groups, in row order.
  """
  spans = [(lo, hi)]
  nodes = []  # per span: (whole saving or -1, shared, left child, right child)
  k = 0
  while k < len(spans):
    lo, hi = spans[k]
    k += 1
    m = hi - lo + 1
    if m == 1:
      nodes.append((-1, 0, -1, -1))
      continue
    seg = shared[lo:hi]
    cut = int(seg.argmin())
    s = int(seg[cut])
    whole = (m - 1) * s if m >= min_group_size else -1
    if whole >= 0 and whole >= (m - 2) * int(seg.max()):
      nodes.append((whole, s, -1, -1))
      continue
    nodes.append((whole, s, len(spans), len(spans) + 1))
    spans += [(lo, lo + cut), (lo + cut + 1, hi)]
  # Children come after their parent: one backward pass picks whole or split everywhere.
  best = [0] * len(nodes)
  split_it = [False] * len(nodes)
  for k in range(len(nodes) - 1, -1, -1):
    whole, _, left, right = nodes[k]
    split = best[left] + best[right] if left >= 0 else -1
    if whole >= 0 and whole >= split:
      best[k] = whole
    elif split >= 0:
      best[k], split_it[k] = split, True
  out, todo = [], [0]
  while todo:
    k = todo.pop()
    whole, s, left, right = nodes[k]
    if split_it[k]:
      todo += [right, left]
    elif whole >= 0:
      out.append((spans[k][0], spans[k][1], s))
  return out


def plan_cascade(
  block_table: np.ndarray,
  lengths: np.ndarray,
  block_size: int,
  *,
  min_shared_blocks: int = 1,
  min_group_size: int = 2,
  group_bucket: int = 1,
  member_bucket: int = 4,
  block_bucket: int = 8,
) -> CascadePlan | None:
  """Groups decode rows whose block tables start with the same physical blocks (host, NumPy).

  Rows are sorted by their block-table rows (byte order of the int32 entries, which keeps
  rows with a common leading run of ids next to each other; :func:`_trie_order`);
  neighbours share ``min(common leading blocks * block_size, length_a - 1, length_b - 1)``
  tokens (each member keeps at least its newest token in its own part). Contiguous runs of
  sorted rows become groups: a run is one group or is split at its weakest link, whichever
  saves more reads ``(members - 1) * shared tokens`` (:func:`_best_runs`); a group's shared
  length is the minimum over its members, and may end mid-block. NumPy throughout, apart
  from a Python step per run the grouping looks inside (one when all rows share one
  prefix) and a fill loop for at most four groups; no recursion, so any batch size works.
  About 0.1 ms for 256 rows on one 2,048-block prefix (``experiments/bench/cascade.py
  --plan-only``; docs/benchmarks.md), most of it one compare of neighbouring rows.

  Args:
    block_table: ``i32[B, max_blocks]`` on the host, -1 where unused.
    lengths: ``i32[B]``: tokens of each row including this step's query.
    block_size: tokens per block of the pools.
    min_shared_blocks: a group must share keys in at least this many blocks
      (``ceil(shared / block_size) >= min_shared_blocks``), >= 1.
    min_group_size: a group has at least this many rows, >= 1 (1 makes single rows with
      a prefix into groups of one: correct, though it saves nothing).
    group_bucket, member_bucket, block_bucket: the least G, M and S of the plan; each is
      rounded up to a power of two, so that few shapes compile.

  Returns:
    A :class:`CascadePlan` of NumPy int32 arrays, or None when no group qualifies.
  """
  block_table = np.asarray(block_table)
  lengths = np.asarray(lengths)
  if block_table.ndim != 2 or block_table.dtype != np.int32:
    raise ValueError(
      f"block_table must be int32 [batch, max_blocks], got {block_table.shape} {block_table.dtype}"
    )
  if lengths.shape != (block_table.shape[0],) or lengths.dtype != np.int32:
    raise ValueError(
      f"lengths must be int32 [{block_table.shape[0]}] (block_table's batch), got "
      f"{lengths.shape} {lengths.dtype}"
    )
  for name, value, lo in (
    ("block_size", block_size, 1),
    ("min_shared_blocks", min_shared_blocks, 1),
    ("min_group_size", min_group_size, 1),
    ("group_bucket", group_bucket, 1),
    ("member_bucket", member_bucket, 1),
    ("block_bucket", block_bucket, 1),
  ):
    if type(value) is not int and (isinstance(value, _BOOLS) or not isinstance(value, _INTS)):
      raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    if value < lo:
      raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
  batch, max_blocks = block_table.shape
  longest, shortest = (int(lengths.max()), int(lengths.min())) if batch else (0, 0)
  if longest > max_blocks * block_size or shortest < 0:
    raise ValueError(
      f"lengths must be in [0, max_blocks * block_size] = [0, {max_blocks * block_size}], "
      f"got {lengths.tolist()}"
    )
  min_tokens = (min_shared_blocks - 1) * block_size + 1
  # Only rows that could put min_tokens keys in a shared part take part.
  if shortest > min_tokens:
    rows = np.arange(batch)
  else:
    rows = np.flatnonzero(lengths > min_tokens)
  if len(rows) < min_group_size:
    return None
  table = np.ascontiguousarray(block_table)
  cols = -(-(longest - 1) // block_size)  # blocks a shared part can touch (longest: a row)
  rows, common = _trie_order(table, rows, cols)
  lens = lengths[rows]
  shared = np.minimum(common * block_size, np.minimum(lens[1:], lens[:-1]) - 1)
  n = len(rows)
  # Links too short for any group cut the sorted rows into independent segments.
  cuts = np.flatnonzero(shared < min_tokens).tolist()
  runs: list[tuple[int, int, int]] = []
  for lo, hi in zip([0] + [c + 1 for c in cuts], cuts + [n - 1], strict=True):
    if hi > lo:
      runs += _best_runs(shared, lo, hi, min_group_size)
  if min_group_size == 1:
    # Rows left alone become groups of one with their whole prefix (len - 1) shared.
    edge = np.zeros(n + 1, np.int64)
    for lo, hi, _ in runs:
      edge[lo] += 1
      edge[hi + 1] -= 1
    alone = np.flatnonzero(np.cumsum(edge[:-1]) == 0)
    runs += zip(alone.tolist(), alone.tolist(), (lens[alone] - 1).tolist(), strict=True)
  if not runs:
    return None

  def hole(lo):
    return ValueError(
      f"block_table row {int(rows[lo])} holds -1 inside its length {int(lens[lo])} "
      f"(block_size {block_size}): the planner cannot tell what it shares"
    )

  num_groups = _pow2_at_least(len(runs), group_bucket)
  members = _pow2_at_least(max(hi - lo + 1 for lo, hi, _ in runs), member_bucket)
  width = _pow2_at_least(max(-(-s // block_size) for _, _, s in runs), block_bucket)
  group_table = np.full((num_groups, width), INVALID_BLOCK, np.int32)
  group_lens = np.zeros((num_groups,), np.int32)
  group_rows = np.full((num_groups, members), -1, np.int32)
  row_starts = np.zeros((batch,), np.int32)
  if len(runs) <= 4:  # few groups: a loop is fewer NumPy calls than the vectorised fill
    for g, (lo, hi, s) in enumerate(runs):
      ids = table[rows[lo], : -(-s // block_size)]
      if (ids < 0).any():
        raise hole(lo)
      group_table[g, : len(ids)] = ids
      group_lens[g] = s
      group_rows[g, : hi - lo + 1] = rows[lo : hi + 1]
      row_starts[rows[lo : hi + 1]] = s
    return CascadePlan(group_table, group_lens, group_rows, row_starts)
  lo, hi, sh = np.array(runs, np.int64).T
  used = min(width, max_blocks)
  ids = table[rows[lo], :used]
  inside = np.arange(used) < -(-sh[:, None] // block_size)
  bad = (inside & (ids < 0)).any(axis=1)
  if bad.any():
    g = int(np.argmax(bad))
    raise hole(int(lo[g]))
  group_table[: len(lo), :used] = np.where(inside, ids, INVALID_BLOCK)
  group_lens[: len(lo)] = sh
  pos = lo[:, None] + np.arange(members)
  member = pos <= hi[:, None]
  group_rows[: len(lo)] = np.where(member, rows[np.minimum(pos, n - 1)], -1)
  row_starts[group_rows[: len(lo)][member]] = np.repeat(sh, hi - lo + 1)
  return CascadePlan(group_table, group_lens, group_rows, row_starts)


# ---------------------------------------------------------------------------- validation


def validate_plan(plan, q, k_blocks, block_table, lengths) -> None:
  """Checks a :class:`CascadePlan` against the call; raises ValueError naming the field.

  Shapes and dtypes always (static); values where the plan (and, for the cross checks,
  ``block_table``/``lengths``) are host NumPy arrays, as ``plan_cascade`` builds them:
  ids in range, every row in at most one group, ``row_starts`` equal to the row's group
  length (0 outside groups) and at most its length, and each member's block table
  starting with its group's blocks. Device arrays and tracers are trusted.
  """
  if not isinstance(plan, CascadePlan):
    raise ValueError(f"plan must be a kernels.CascadePlan, got {type(plan).__name__}")
  for name in ("group_table", "group_lens", "group_rows", "row_starts"):
    x = getattr(plan, name)
    check_arrays(**{f"plan.{name}": x})
    if jnp.dtype(x.dtype) != jnp.int32:
      raise ValueError(f"plan.{name} must be int32, got {_shape_str(x)}")
  gt, gl, gr, rs = plan.group_table, plan.group_lens, plan.group_rows, plan.row_starts
  batch = q.shape[0]
  if gt.ndim != 2:
    raise ValueError(f"plan.group_table must be [num_groups, shared_blocks], got {_shape_str(gt)}")
  num_groups = gt.shape[0]
  if gl.shape != (num_groups,):
    raise ValueError(
      f"plan.group_lens must be [{num_groups}] (group_table's groups), got {_shape_str(gl)}"
    )
  if gr.ndim != 2 or gr.shape[0] != num_groups:
    raise ValueError(
      f"plan.group_rows must be [{num_groups}, max_members] (group_table's groups), got "
      f"{_shape_str(gr)}"
    )
  if rs.shape != (batch,):
    raise ValueError(f"plan.row_starts must be [{batch}] (the batch of q), got {_shape_str(rs)}")
  _, num_blocks, block_size, _ = k_blocks.shape
  host = all(isinstance(x, np.ndarray) for x in (gt, gl, gr, rs))
  if not host:
    return
  width = gt.shape[1]
  if ((gt < INVALID_BLOCK) | (gt >= num_blocks)).any():
    raise ValueError(
      f"plan.group_table holds ids outside [0, {num_blocks}) and != {INVALID_BLOCK}: "
      f"{gt[(gt < INVALID_BLOCK) | (gt >= num_blocks)][:8].tolist()}"
    )
  if ((gl < 0) | (gl > width * block_size)).any():
    raise ValueError(
      f"plan.group_lens must be in [0, shared_blocks * block_size] = [0, "
      f"{width * block_size}], got {gl.tolist()}"
    )
  need = -(-gl.astype(np.int64) // block_size)
  hole = (np.arange(width) < need[:, None]) & (gt == INVALID_BLOCK)
  if hole.any():
    g = int(np.nonzero(hole)[0][0])
    raise ValueError(
      f"plan.group_table row {g} holds {INVALID_BLOCK} inside its group_lens {int(gl[g])}"
    )
  if ((gr < -1) | (gr >= batch)).any():
    raise ValueError(f"plan.group_rows must be batch rows in [0, {batch}) or -1, got {gr.tolist()}")
  members = gr[gr >= 0]
  if len(np.unique(members)) != len(members):
    vals, counts = np.unique(members, return_counts=True)
    dup = vals[counts > 1]
    raise ValueError(f"plan.group_rows puts rows {dup.tolist()} in more than one group")
  want = np.zeros(batch, np.int64)
  g_of = np.nonzero(gr >= 0)[0]
  want[gr[gr >= 0]] = gl[g_of]
  if (rs != want).any():
    bad = np.nonzero(rs != want)[0][:8]
    raise ValueError(
      f"plan.row_starts must be each row's group_lens (0 for rows in no group): rows "
      f"{bad.tolist()} hold {rs[bad].tolist()}, want {want[bad].tolist()}"
    )
  if isinstance(lengths, np.ndarray) and (rs > lengths).any():
    bad = np.nonzero(rs > lengths)[0][:8]
    raise ValueError(
      f"plan.row_starts exceed lengths at rows {bad.tolist()}: {rs[bad].tolist()} > "
      f"{lengths[bad].tolist()}"
    )
  if isinstance(block_table, np.ndarray):
    for g, b in zip(g_of.tolist(), gr[gr >= 0].tolist(), strict=True):
      n = int(need[g])
      if n > block_table.shape[1] or (block_table[b, :n] != gt[g, :n]).any():
        raise ValueError(
          f"row {b} is in group {g}, but its block table {block_table[b, :n].tolist()} does "
          f"not start with the group's blocks {gt[g, :n].tolist()}"
        )


# ----------------------------------------------------------------------------- reference


def _softmax_lse(logits, mask, v, precision):
  """Masked softmax over the last axis of ``logits`` times ``v``: (output, LSE).

  Rows with no visible key give output 0 and LSE -inf. A NaN in a visible slot surfaces.
  """
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  has_key = jnp.any(mask, axis=-1, keepdims=True)
  m = jnp.where(has_key, m, 0.0)
  p = jnp.where(mask, jnp.exp(logits - m), 0.0)
  den = jnp.sum(p, axis=-1, keepdims=True)
  out = v(p, precision)
  out = jnp.where(has_key, out / jnp.where(has_key, den, 1.0), 0.0)
  lse = jnp.where(has_key, m + jnp.log(jnp.where(has_key, den, 1.0)), -jnp.inf)
  return out, lse[..., 0]


def _gather_kv(k_blocks, v_blocks, k_scales, v_scales, table, visible):
  """K/V rows of ``table [R, nb]`` as float32 ``[Hkv, R, nb * bs, D]``, 0 where not visible."""
  num_kv_heads, _, block_size, head_dim = k_blocks.shape
  r, nb = table.shape
  safe = jnp.where(block_present(table, k_blocks.shape[1]), table, 0)
  k = k_blocks[:, safe].reshape(num_kv_heads, r, nb * block_size, head_dim).astype(jnp.float32)
  v = v_blocks[:, safe].reshape(num_kv_heads, r, nb * block_size, head_dim).astype(jnp.float32)
  if k_scales is not None:
    k = k * k_scales[:, safe].reshape(num_kv_heads, r, nb * block_size, 1)
    v = v * v_scales[:, safe].reshape(num_kv_heads, r, nb * block_size, 1)
  # Unused slots may hold anything (NaN included): zero them so 0 * NaN never appears.
  k = jnp.where(visible[None, :, :, None], k, 0.0)
  v = jnp.where(visible[None, :, :, None], v, 0.0)
  return k, v


def _cap(logits, logit_soft_cap):
  if logit_soft_cap is None:
    return logits
  return logit_soft_cap * jnp.tanh(logits / logit_soft_cap)


def merge_lse(o1, lse1, o2, lse2, out_dtype):
  """Merges two normalised partial attentions by their LSEs (-inf: the part saw no key).

  ``o*`` float32 ``[..., D]``, ``lse*`` float32 ``[...]``; a row where both are -inf is 0.
  """
  m = jnp.maximum(lse1, lse2)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  w1 = jnp.exp(lse1 - m_safe)  # 0 where lse1 = -inf
  w2 = jnp.exp(lse2 - m_safe)
  den = w1 + w2
  out = (o1 * w1[..., None] + o2 * w2[..., None]) / jnp.where(den > 0, den, 1.0)[..., None]
  return out.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("scale", "logit_soft_cap", "rows_per_chunk"))
def _cascade_reference(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  plan,
  *,
  scale,
  logit_soft_cap,
  k_scales,
  v_scales,
  rows_per_chunk=64,
):
  batch, num_q_heads, head_dim = q.shape
  num_kv_heads, num_blocks, block_size, _ = k_blocks.shape
  group = num_q_heads // num_kv_heads
  hi = jax.lax.Precision.HIGHEST
  qf = q.astype(jnp.float32)

  # (1) shared part: one gather per group, every member's query heads against it.
  num_groups, width = plan.group_table.shape
  members = plan.group_rows.shape[1]
  shared_o = jnp.zeros((batch, num_q_heads, head_dim), jnp.float32)
  shared_lse = jnp.full((batch, num_q_heads), -jnp.inf, jnp.float32)
  if num_groups and width and members and num_blocks:
    span = width * block_size
    block_ok = jnp.repeat(block_present(plan.group_table, num_blocks), block_size, axis=1)
    visible = (jnp.arange(span)[None, :] < plan.group_lens[:, None]) & block_ok  # [G, span]
    k, v = _gather_kv(k_blocks, v_blocks, k_scales, v_scales, plan.group_table, visible)
    member_ok = plan.group_rows >= 0
    qg = qf[jnp.where(member_ok, plan.group_rows, 0)]  # [G, M, Hq, D]
    qg = qg.reshape(num_groups, members, num_kv_heads, group, head_dim)
    logits = jnp.einsum("gmkhd,kgsd->gmkhs", qg, k, precision=hi) * scale
    mask = visible[:, None, None, None, :]
    o, lse = _softmax_lse(
      _cap(logits, logit_soft_cap),
      mask,
      lambda p, prec: jnp.einsum("gmkhs,kgsd->gmkhd", p, v, precision=prec),
      hi,
    )
    # Scatter to the batch rows; -1 (unused member) goes out of range and is dropped.
    dest = jnp.where(member_ok, plan.group_rows, batch).reshape(-1)
    shared_o = shared_o.at[dest].set(
      o.reshape(num_groups * members, num_q_heads, head_dim), mode="drop"
    )
    shared_lse = shared_lse.at[dest].set(
      lse.reshape(num_groups * members, num_q_heads), mode="drop"
    )

  # (2) own part: each row's keys [row_starts, lengths) through its own block table, for
  # at most rows_per_chunk rows at a time (the gather is rows x the table's width).
  max_blocks = block_table.shape[1]
  own_o = jnp.zeros((batch, num_q_heads, head_dim), jnp.float32)
  own_lse = jnp.full((batch, num_q_heads), -jnp.inf, jnp.float32)
  if max_blocks and num_blocks and batch:
    span = max_blocks * block_size

    def own(xs):
      qc, table, start, length = xs
      pos = jnp.arange(span)[None, :]
      block_ok = jnp.repeat(block_present(table, num_blocks), block_size, axis=1)
      visible = (pos >= start[:, None]) & (pos < length[:, None]) & block_ok
      k, v = _gather_kv(k_blocks, v_blocks, k_scales, v_scales, table, visible)
      qb = qc.reshape(qc.shape[0], num_kv_heads, group, head_dim)
      logits = jnp.einsum("bkhd,kbsd->bkhs", qb, k, precision=hi) * scale
      return _softmax_lse(
        _cap(logits, logit_soft_cap),
        visible[:, None, None, :],
        lambda p, prec: jnp.einsum("bkhs,kbsd->bkhd", p, v, precision=prec),
        hi,
      )

    chunk = min(rows_per_chunk, batch)
    n = -(-batch // chunk)
    pad = n * chunk - batch

    def chunked(x):
      x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
      return x.reshape((n, chunk) + x.shape[1:])

    xs = (chunked(qf), chunked(block_table), chunked(plan.row_starts), chunked(lengths))
    own_o, own_lse = jax.lax.map(own, xs)
    own_o = own_o.reshape(n * chunk, num_q_heads, head_dim)[:batch]
    own_lse = own_lse.reshape(n * chunk, num_q_heads)[:batch]

  # (3) merge by log-sum-exp.
  return merge_lse(shared_o, shared_lse, own_o, own_lse, q.dtype)


# ------------------------------------------------------------------------------ dispatch


def cascade_attention(
  q: jax.Array,
  k_blocks: jax.Array,
  v_blocks: jax.Array,
  block_table: jax.Array,
  lengths: jax.Array,
  plan: CascadePlan,
  *,
  scale: float | None = None,
  logit_soft_cap: float | None = None,
  backend: str = "auto",
  interpret: bool = False,
  k_scales: jax.Array | None = None,
  v_scales: jax.Array | None = None,
  block_sizes: Any = None,
  sliding_window: None = None,
  lane_dense: bool = False,
  lane_padded: bool = False,
) -> jax.Array:
  """Decode attention with shared prefixes read once per group (module docstring).

  Same result as ``kernels.paged_attention(q, k_blocks, v_blocks, block_table, lengths,
  scale=..., logit_soft_cap=..., k_scales=..., v_scales=...)`` (decode) for a ``plan``
  that :func:`plan_cascade` built from this ``block_table`` and ``lengths`` (or any plan
  that :func:`validate_plan` accepts).

  Args:
    q: ``[batch, num_q_heads, head_dim]``, one decode query per row.
    k_blocks, v_blocks: ``[num_kv_heads, num_blocks, block_size, head_dim]`` pools, as in
      ``kernels.paged_attention`` (float32, bfloat16, float16, or 8-bit with scales).
    block_table: ``i32[batch, max_blocks]``, -1 where unused.
    lengths: ``i32[batch]``, tokens of each row including this step's query.
    plan: a :class:`CascadePlan` (NumPy arrays from :func:`plan_cascade`, or the same as
      device arrays / tracers inside jit).
    scale, logit_soft_cap: as in ``kernels.paged_attention``.
    backend: ``"auto" | "reference" | "gpu" | "tpu"``.
    interpret: run the Pallas kernels in interpret mode (tests on CPU).
    k_scales, v_scales: ``f32[num_kv_heads, num_blocks, block_size]`` for 8-bit K/V.
    block_sizes: backend tuning (``kernels.gpu.cascade.CascadeBlockSizes`` on GPU), or None.
    sliding_window: must be None: a window cuts the shared prefix per row, which cascade
      does not do (ValueError otherwise; use ``kernels.paged_attention``).
    lane_dense: the pools are lane-dense (``kernels._layout``), as in
      ``kernels.paged_attention``.
    lane_padded: the pools are lane-padded (``kernels._layout``), as in
      ``kernels.paged_attention``: run as their row width with q zero-padded.

  Returns:
    ``[batch, num_q_heads, head_dim]`` in ``q.dtype``.
  """
  q, k_blocks, v_blocks, scale, logit_soft_cap, chosen, layout, real_head_dim = _checked_call(
    q,
    k_blocks,
    v_blocks,
    block_table,
    lengths,
    plan,
    scale=scale,
    logit_soft_cap=logit_soft_cap,
    backend=backend,
    interpret=interpret,
    k_scales=k_scales,
    v_scales=v_scales,
    sliding_window=sliding_window,
    lane_dense=lane_dense,
    lane_padded=lane_padded,
  )
  if scale is None:
    scale = float(q.shape[2] ** -0.5)
  if chosen == "reference":
    if block_sizes is not None:
      raise ValueError("block_sizes tunes a Pallas kernel; the reference backend takes none")
    out = _cascade_reference(
      q,
      k_blocks,
      v_blocks,
      block_table,
      lengths,
      plan,
      scale=scale,
      logit_soft_cap=logit_soft_cap,
      k_scales=k_scales,
      v_scales=v_scales,
    )
  else:
    out = _backend_module(chosen).cascade_attention(
      q,
      k_blocks,
      v_blocks,
      block_table,
      lengths,
      plan,
      scale=scale,
      logit_soft_cap=logit_soft_cap,
      interpret=interpret,
      k_scales=k_scales,
      v_scales=v_scales,
      block_sizes=block_sizes,
      **layout,
    )
  return out if real_head_dim is None else out[..., :real_head_dim]


def _checked_call(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  plan,
  *,
  scale: float | None = None,
  logit_soft_cap: float | None = None,
  backend: str = "auto",
  interpret: bool = False,
  k_scales=None,
  v_scales=None,
  sliding_window: None = None,
  lane_dense: bool = False,
  lane_padded: bool = False,
  backend_checks: bool = False,
):
  """Every check :func:`cascade_attention` makes before it runs a backend, and what it
  then runs: ``(q, k_blocks, v_blocks, scale, logit_soft_cap, backend, layout kwargs,
  real head_dim or None)``; ``backend_checks``: also the backend's own static checks."""
  if sliding_window is not None:
    raise ValueError(
      f"cascade_attention does not take a sliding_window (got {sliding_window!r}): a window "
      "cuts each row's view of the shared prefix differently; use kernels.paged_attention"
    )
  real_head_dim = None  # a lane-padded pool: q padded here, the output cut back at the end
  if lane_padded:
    q, scale, real_head_dim = _layout.padded_query(
      q, k_blocks, scale, lane_dense, "kernels.cascade_attention"
    )
  validate_inputs(
    q, k_blocks, v_blocks, block_table, lengths, None, k_scales, v_scales, lane_dense=lane_dense
  )
  scale, _, logit_soft_cap = validate_options(scale, None, logit_soft_cap)
  chosen = resolve_backend(backend, interpret=interpret)
  if real_head_dim is not None and chosen == "gpu":  # the shared-prefix kernel: unpadded
    validate_padded_width(real_head_dim, k_blocks, "gpu-unpadded", "kernels.cascade_attention")
  # A lane-dense pool (kernels._layout) reaches the TPU kernels as it is, the others
  # through a reshape to the plain layout, as in kernels.paged_attention.
  k_blocks, v_blocks, layout = layout_for(chosen, q, k_blocks, v_blocks, lane_dense)
  pool = jax.ShapeDtypeStruct(_layout.logical_shape(k_blocks, q.shape[2]), k_blocks.dtype)
  validate_plan(plan, q, pool, block_table, lengths)
  if backend_checks:  # the shared-prefix kernels take the unpadded GPU head sizes
    backend_static_checks(
      chosen, q, k_blocks, v_blocks, block_table, lengths, None, block_sizes=None,
      k_scales=k_scales, v_scales=v_scales, pads_head_dim=False,
      lane_dense=layout.get("lane_dense", False),
    )  # fmt: skip
  return q, k_blocks, v_blocks, scale, logit_soft_cap, chosen, layout, real_head_dim


def check_cascade_attention(q, k_blocks, v_blocks, block_table, lengths, plan, **options) -> None:
  """Raises what :func:`cascade_attention` with these arguments would raise before it
  computes anything, and computes nothing (as ``kernels.check_paged_attention``);
  ``options``: its keyword arguments but ``block_sizes``."""
  check_arrays("kernels.check_cascade_attention", q=q, k_blocks=k_blocks, v_blocks=v_blocks)
  run_abstract(  # (it takes the scales out of options before the lambda runs)
    lambda q, k, v, scales: _checked_call(
      q, k, v, block_table, lengths, plan, **options, **scales, backend_checks=True
    ),
    q, k_blocks, v_blocks, options,
  )  # fmt: skip


def _backend_module(chosen: str):
  """``kernels.gpu.cascade`` or ``kernels.tpu.cascade``, imported lazily (heavy lowering)."""
  name = f"kernels.{chosen}.cascade"
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as e:
    if e.name != name:
      raise
    raise BackendUnavailableError(
      f"backend={chosen!r} for cascade_attention needs the module {name}, which is not in "
      "this checkout; use backend='reference' or the other backend"
    ) from e
