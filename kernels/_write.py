"""Writing new tokens' K/V into their slots: one scatter, one pass over the new tokens."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels import _layout
from kernels._quant import SCALE_DTYPE, check_kv_dtype, is_quantized, quantize
from kernels._validate import check_arrays

INVALID_SLOT = -1


def check_host_slot_mapping(slot_mapping, num_slots: int) -> None:
  """Value checks of a host (NumPy) slot mapping; device arrays and tracers are trusted.

  The scatter would silently drop an out-of-range slot (losing that token's K/V), and a
  slot written twice in one step is a race; both raise ValueError here instead.
  """
  if not isinstance(slot_mapping, np.ndarray):
    return
  bad = (slot_mapping < INVALID_SLOT) | (slot_mapping >= num_slots)
  if bad.any():
    raise ValueError(
      f"slot_mapping {slot_mapping[bad][:8].tolist()} out of range [0, {num_slots}) or "
      f"{INVALID_SLOT} (padding)"
    )
  real = slot_mapping[slot_mapping != INVALID_SLOT]
  values, counts = np.unique(real, return_counts=True)
  if (counts > 1).any():
    raise ValueError(f"slot_mapping has repeated ids {values[counts > 1][:8].tolist()}")


def check_host_slots_match_table(
  slot_mapping, block_table, lengths, cu_q_lens, block_size: int, positions=None, *, caller=""
) -> None:
  """With NumPy metadata (what ``BlockTable.from_allocator`` builds, e.g. a model called
  eagerly; device arrays and tracers, such as the engine's jitted step, are trusted): each
  query row's ``slot_mapping`` entry is -1 (a padding row: nothing written) or the slot its
  position has in its sequence's block table, ``table[b, pos // block_size] * block_size
  + pos % block_size``; and ``positions``, where given, are the rows' positions
  ``lengths[b] - q_len[b] + j`` (decode, ``cu_q_lens`` None: ``lengths[b] - 1``), which
  the kernels derive. Rows of a sequence of length 0 (decode padding: position 0 by the
  engine's convention) must have slot -1 and any position. ValueError naming the first
  rows that are not: a slot the table does not give writes K/V that no query reads,
  while the attention reads whatever the table's slot holds.

  Metadata whose shapes or ``cu_q_lens`` do not fit together is left to the kernels' own
  checks (``validate_inputs``), which name what is wrong; this one returns without a word.
  """
  arrays = [slot_mapping, block_table, lengths, cu_q_lens]
  if not all(a is None or isinstance(a, np.ndarray) for a in arrays) or lengths is None:
    return
  if not isinstance(positions, np.ndarray):
    positions = None  # device positions are trusted; the slots are still checked
  batch = len(lengths) if lengths.ndim == 1 else -1
  if block_table.ndim != 2 or block_table.shape[0] != batch or slot_mapping.ndim != 1:
    return
  if cu_q_lens is None:  # decode: one row per sequence
    rows = min(batch, len(slot_mapping))
    seq = np.arange(rows)
    pos = lengths[:rows].astype(np.int64) - 1
    label = "lengths - 1"
  else:
    if cu_q_lens.shape != (batch + 1,) or cu_q_lens[0] != 0:
      return
    q_lens = np.diff(cu_q_lens.astype(np.int64))
    if (q_lens < 0).any() or (q_lens > lengths).any():
      return
    rows = max(0, min(int(cu_q_lens[-1]), len(slot_mapping)))
    r = np.arange(rows)
    seq = np.searchsorted(cu_q_lens, r, side="right") - 1
    pos = lengths[seq].astype(np.int64) - q_lens[seq] + (r - cu_q_lens[seq])
    label = "lengths - q_len + j"
  if positions is not None and positions.shape == slot_mapping.shape:
    wrong = np.flatnonzero((pos >= 0) & (positions[:rows] != pos))
    if wrong.size:
      b = wrong[:4].tolist()
      raise ValueError(
        f"{caller}positions of rows {b} are {positions[b].tolist()}, but the sequences' "
        f"lengths put them at {label} = {pos[b].tolist()}"
      )
  width = block_table.shape[1]
  col = np.clip(pos // block_size, 0, max(width - 1, 0))
  block = block_table[seq, col].astype(np.int64) if width else np.full(rows, -1)
  has = (pos >= 0) & (pos // block_size < width) & (block >= 0)
  want = np.where(has, block * block_size + pos % block_size, -2)
  slots = slot_mapping[:rows].astype(np.int64)
  bad = np.flatnonzero((slots != INVALID_SLOT) & (slots != want))
  if bad.size:
    b = bad[:4].tolist()
    raise ValueError(
      f"{caller}rows {b} have slots {slots[b].tolist()}, not the slots block_table gives "
      f"their positions {label} = {pos[b].tolist()}, which are {want[b].tolist()} (-2: no "
      f"block there), nor {INVALID_SLOT}"
    )


def split_packed_qkv(qkv, num_kv_heads: int):
  """``(q, k_new, v_new)`` of a packed ``[batch, num_q_heads + 2 * num_kv_heads, head_dim]``
  q/k/v (``kernels.write_and_decode_packed``): each row's query heads, then its K rows, then
  its V rows."""
  hq = qkv.shape[1] - 2 * num_kv_heads
  return qkv[:, :hq], qkv[:, hq : hq + num_kv_heads], qkv[:, hq + num_kv_heads :]


def check_pools(k_blocks, v_blocks) -> None:
  """Pools of one shape ``[num_kv_heads, num_blocks, block_size, head_dim]`` and one dtype
  a cache holds (``kernels.KV_DTYPES``): an integer pool would silently truncate the
  rows cast into it."""
  if k_blocks.ndim != 4 or v_blocks.shape != k_blocks.shape:
    raise ValueError(
      "k_blocks/v_blocks must both be [num_kv_heads, num_blocks, block_size, head_dim], got "
      f"{tuple(k_blocks.shape)} and {tuple(v_blocks.shape)}"
    )
  check_kv_dtype(k_blocks.dtype, "k_blocks' dtype")
  if v_blocks.dtype != k_blocks.dtype:
    raise ValueError(
      f"k_blocks and v_blocks must have one dtype, got {jnp.dtype(k_blocks.dtype).name} and "
      f"{jnp.dtype(v_blocks.dtype).name}"
    )


def check_rows(k_new, v_new, slot_mapping, pool, lane_dense=False) -> int:
  """Checks the new rows and their slots against a pool ``[H, N, bs, D]`` (or, with
  ``lane_dense``, its lane-dense form, ``kernels._layout``); returns the pool's slot
  count."""
  num_kv_heads, num_blocks, block_size, head_dim = pool.shape
  if lane_dense:
    new_dim = k_new.shape[-1]
    _layout.check_lane_dense(
      new_dim,
      pool.shape[3],
      pool.dtype,
      f"lane_dense=True with k_blocks {tuple(pool.shape)} {jnp.dtype(pool.dtype).name} and "
      f"k_new {tuple(k_new.shape)}",
    )
    num_kv_heads, num_blocks, block_size, head_dim = _layout.logical_shape(pool, new_dim)
  if k_new.shape != v_new.shape or k_new.ndim != 3 or k_new.shape[1:] != (num_kv_heads, head_dim):
    raise ValueError(
      f"k_new/v_new must be [num_tokens, {num_kv_heads}, {head_dim}], got "
      f"{tuple(k_new.shape)} and {tuple(v_new.shape)}"
    )
  if slot_mapping.shape != (k_new.shape[0],) or slot_mapping.dtype != jnp.int32:
    raise ValueError(
      f"slot_mapping must be int32 [{k_new.shape[0]}], got {tuple(slot_mapping.shape)} "
      f"{jnp.dtype(slot_mapping.dtype).name}"
    )
  for name, x in (("k_new", k_new), ("v_new", v_new)):
    # Rows are cast to the pool's dtype: an integer array here is a mistake, not rows.
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(
        f"{name} must be a float array, got {tuple(x.shape)} {jnp.dtype(x.dtype).name}"
      )
  total = num_blocks * block_size
  check_host_slot_mapping(slot_mapping, total)
  return total


def _padded_rows(k_blocks, k_new, v_new, lane_padded: bool, what: str):
  """``(k_new, v_new)`` zero-padded to a lane-padded pool's rows (``kernels._layout``),
  checked; as they are for another layout."""
  if not lane_padded:
    return k_new, v_new
  if k_new.ndim != 3 or k_new.shape != v_new.shape or k_blocks.ndim != 4:
    raise ValueError(
      f"{what}: k_new and v_new must both be [num_tokens, num_kv_heads, head_dim] and "
      f"k_blocks 4-D, got {tuple(k_new.shape)}, {tuple(v_new.shape)} and "
      f"{tuple(k_blocks.shape)}"
    )
  width = k_blocks.shape[3]
  _layout.check_lane_padded(
    k_new.shape[2], width, f"{what}(lane_padded=True) with k_blocks {tuple(k_blocks.shape)}"
  )
  return _layout.pad_lanes(k_new, width), _layout.pad_lanes(v_new, width)


def write_kv(
  k_blocks, v_blocks, k_new, v_new, slot_mapping, *, lane_dense=False, lane_padded=False
):
  """Scatters new K/V rows into one layer's block pools.

  Args:
    k_blocks, v_blocks: ``[num_kv_heads, num_blocks, block_size, head_dim]``, or with
      ``lane_dense`` ``[num_kv_heads, num_blocks, block_size * head_dim / 128, 128]`` for
      head_dim 32 or 64 (``kernels._layout``; written in place in that layout).
    k_new, v_new: ``[num_tokens, num_kv_heads, head_dim]``.
    slot_mapping: ``i32[num_tokens]``, ``block_id * block_size + offset``; ``-1`` (padding
      rows) writes nothing.
    lane_dense: the pools are lane-dense (16- or 32-bit; ValueError otherwise).
    lane_padded: the pools are lane-padded (``kernels._layout``): rows of ``head_dim``
      rounded up to a multiple of 128; the new rows are written with zeros after their
      ``head_dim`` lanes.

  Returns:
    The updated ``(k_blocks, v_blocks)``. Under ``jit`` with the pools donated the
    scatter happens in place. A NumPy ``slot_mapping`` is checked (range, no slot twice)
    and raises ValueError; a device one is trusted.
  """
  if lane_padded and lane_dense:
    raise ValueError(
      "kernels.write_kv: lane_dense and lane_padded are two layouts; a pool is in one"
    )
  check_arrays(
    "kernels.write_kv", k_blocks=k_blocks, v_blocks=v_blocks, k_new=k_new, v_new=v_new,
    slot_mapping=slot_mapping,
  )  # fmt: skip
  check_pools(k_blocks, v_blocks)
  k_new, v_new = _padded_rows(k_blocks, k_new, v_new, lane_padded, "kernels.write_kv")
  total = check_rows(k_new, v_new, slot_mapping, k_blocks, lane_dense)

  if is_quantized(k_blocks.dtype):
    raise ValueError(
      f"k_blocks are {jnp.dtype(k_blocks.dtype).name}: an 8-bit pool needs its scales; use "
      "kernels.write_kv_quantized"
    )
  slots = _slots(slot_mapping, total)
  return _scatter_rows(k_blocks, k_new, slots), _scatter_rows(v_blocks, v_new, slots)


def _slots(slot_mapping, total):
  # Padding rows go to an index past the end and are dropped by the scatter.
  return jnp.where(slot_mapping >= 0, slot_mapping, total)


def _scatter_rows(pool, new, slots):
  """``new [num_tokens, num_kv_heads, *rest]`` into ``pool [num_kv_heads, num_blocks,
  block_size, *rest]`` at flat ``slots`` (or into a lane-dense pool, ``kernels._layout``,
  when ``new``'s head_dim is narrower than the pool's rows).

  One scatter of one ``rest``-shaped window per (token, head), indexed by (head, block,
  offset) on the pool as it is: no reshape of the pool, and no window across heads. On
  TPU a window spanning the heads (the pool flattened to ``[heads, slots, ...]``) made XLA
  expand the scatter into a loop over a pool laid out heads-inside, copying the whole pool
  into that layout and back on every write; this form compiles in place for v5e and v6e
  (``kernels.tpu.aot.write_copies``).
  """
  if new.ndim == 3 and new.shape[2] != pool.shape[3]:  # checked lane-dense (check_rows)
    return _scatter_packed(pool, new, slots)
  num_kv_heads, _, block_size = pool.shape[:3]
  rest = pool.shape[3:]
  # Padding slots (num_blocks * block_size, from _slots) land on block num_blocks: out of
  # bounds, dropped.
  index = _head_major_index(slots // block_size, slots % block_size, num_kv_heads=num_kv_heads)
  dnums = lax.ScatterDimensionNumbers(
    update_window_dims=tuple(range(1, 1 + len(rest))),
    inserted_window_dims=(0, 1, 2),
    scatter_dims_to_operand_dims=(0, 1, 2),
  )
  updates = new.reshape(-1, *rest).astype(pool.dtype)  # [tokens * heads, *rest]
  return lax.scatter(pool, index, updates, dnums, mode=lax.GatherScatterMode.FILL_OR_DROP)


def _head_major_index(*coords, num_kv_heads):
  """i32[tokens * heads, 1 + len(coords)]: (head, *coords of the token) for every token
  and head, token-major (the order of ``new.reshape(tokens * heads, ...)``)."""
  tokens = coords[0].shape[0]
  head = jnp.broadcast_to(jnp.arange(num_kv_heads, dtype=jnp.int32)[None], (tokens, num_kv_heads))
  cols = [head] + [jnp.broadcast_to(c.astype(jnp.int32)[:, None], head.shape) for c in coords]
  return jnp.stack(cols, axis=-1).reshape(tokens * num_kv_heads, len(cols))


def _scatter_packed(pool, new, slots):
  """``new [num_tokens, num_kv_heads, head_dim]`` into a lane-dense pool ``[num_kv_heads,
  num_blocks, rows, 128]``: token ``s`` of a block is row ``s // p`` of it, lanes
  ``[(s % p) * head_dim, ...)``, one ``head_dim``-wide window per (token, head). Written
  on the lane-dense array itself: on TPU a reshape to the plain layout would relayout the
  pool."""
  num_kv_heads, _, rows, width = pool.shape
  head_dim = new.shape[2]
  p = width // head_dim
  block_size = rows * p
  block, offset = slots // block_size, slots % block_size
  index = _head_major_index(block, offset // p, (offset % p) * head_dim, num_kv_heads=num_kv_heads)
  dnums = lax.ScatterDimensionNumbers(
    update_window_dims=(1,),
    inserted_window_dims=(0, 1, 2),
    scatter_dims_to_operand_dims=(0, 1, 2, 3),
  )
  updates = new.reshape(-1, head_dim).astype(pool.dtype)
  return lax.scatter(pool, index, updates, dnums, mode=lax.GatherScatterMode.FILL_OR_DROP)


def write_kv_quantized(
  k_blocks, v_blocks, k_scales, v_scales, k_new, v_new, slot_mapping, *, lane_padded=False
):
  """Quantizes new K/V rows (``kernels._quant.quantize``) and scatters them and their
  scales into one layer's 8-bit pools.

  Args:
    k_blocks, v_blocks: ``[num_kv_heads, num_blocks, block_size, head_dim]``, int8 or
      float8_e4m3fn.
    k_scales, v_scales: ``f32[num_kv_heads, num_blocks, block_size]``.
    k_new, v_new: ``[num_tokens, num_kv_heads, head_dim]``, any float dtype.
    slot_mapping: as in :func:`write_kv`.
    lane_padded: as in :func:`write_kv` (the zero lanes change no row's scale).

  Returns:
    The updated ``(k_blocks, v_blocks, k_scales, v_scales)``: each row and its scale go
    to the same slot in one pass over the new tokens.
  """
  check_arrays(
    "kernels.write_kv_quantized", k_blocks=k_blocks, v_blocks=v_blocks, k_scales=k_scales,
    v_scales=v_scales, k_new=k_new, v_new=v_new, slot_mapping=slot_mapping,
  )  # fmt: skip
  if not is_quantized(k_blocks.dtype) or v_blocks.dtype != k_blocks.dtype:
    raise ValueError(
      "write_kv_quantized needs int8 or float8_e4m3fn k_blocks and v_blocks of one dtype, got "
      f"{jnp.dtype(k_blocks.dtype).name} and {jnp.dtype(v_blocks.dtype).name}"
    )
  check_pools(k_blocks, v_blocks)
  for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
    if s.shape != k_blocks.shape[:3] or s.dtype != SCALE_DTYPE:
      raise ValueError(
        f"{name} must be float32 {tuple(k_blocks.shape[:3])} ([num_kv_heads, num_blocks, "
        f"block_size] of k_blocks), got {tuple(s.shape)} {jnp.dtype(s.dtype).name}"
      )
  k_new, v_new = _padded_rows(k_blocks, k_new, v_new, lane_padded, "kernels.write_kv_quantized")
  total = check_rows(k_new, v_new, slot_mapping, k_blocks)
  slots = _slots(slot_mapping, total)
  kq, ks = quantize(k_new, k_blocks.dtype)
  vq, vs = quantize(v_new, v_blocks.dtype)
  return (
    _scatter_rows(k_blocks, kq, slots),
    _scatter_rows(v_blocks, vq, slots),
    _scatter_rows(k_scales, ks, slots),
    _scatter_rows(v_scales, vs, slots),
  )
