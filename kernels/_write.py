"""Writing new tokens' K/V into their slots: one scatter, one pass over the new tokens."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels import _layout
from kernels._quant import SCALE_DTYPE, is_quantized, quantize

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


def _check_pools(k_blocks, v_blocks) -> None:
  if k_blocks.ndim != 4 or v_blocks.shape != k_blocks.shape:
    raise ValueError(
      "k_blocks/v_blocks must both be [num_kv_heads, num_blocks, block_size, head_dim], got "
      f"{tuple(k_blocks.shape)} and {tuple(v_blocks.shape)}"
    )


def _is_packed(pool, new) -> bool:
  """Whether ``new``'s rows go into ``pool`` lane-dense (``kernels._layout``)."""
  return (
    new.ndim == 3
    and new.shape[2] != pool.shape[3]
    and pool.shape[3] == _layout.LANE_WIDTH
    and new.shape[2] in _layout.PACKED_HEAD_DIMS
  )


def _check_rows(k_new, v_new, slot_mapping, pool) -> int:
  """Checks the new rows and their slots against a pool ``[H, N, bs, D]`` (or its
  lane-dense form, ``kernels._layout``); returns the pool's slot count."""
  num_kv_heads, num_blocks, block_size, head_dim = pool.shape
  if _is_packed(pool, k_new):
    if is_quantized(pool.dtype):
      raise ValueError(
        f"an 8-bit pool keeps one token a row (its scales do not pack): k_blocks must be "
        f"[num_kv_heads, num_blocks, block_size, {k_new.shape[2]}], got {tuple(pool.shape)}"
      )
    num_kv_heads, num_blocks, block_size, head_dim = _layout.logical_shape(pool, k_new.shape[2])
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
  total = num_blocks * block_size
  check_host_slot_mapping(slot_mapping, total)
  return total


def write_kv(k_blocks, v_blocks, k_new, v_new, slot_mapping):
  """Scatters new K/V rows into one layer's block pools.

  Args:
    k_blocks, v_blocks: ``[num_kv_heads, num_blocks, block_size, head_dim]``, or lane-dense
      ``[num_kv_heads, num_blocks, block_size * head_dim / 128, 128]`` for head_dim 32 or
      64 (``kernels._layout``; written in place in that layout).
    k_new, v_new: ``[num_tokens, num_kv_heads, head_dim]``.
    slot_mapping: ``i32[num_tokens]``, ``block_id * block_size + offset``; ``-1`` (padding
      rows) writes nothing.

  Returns:
    The updated ``(k_blocks, v_blocks)``. Under ``jit`` with the pools donated the
    scatter happens in place. A NumPy ``slot_mapping`` is checked (range, no slot twice)
    and raises ValueError; a device one is trusted.
  """
  _check_pools(k_blocks, v_blocks)
  total = _check_rows(k_new, v_new, slot_mapping, k_blocks)

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
  when ``new``'s head_dim is narrower than the pool's rows)."""
  num_kv_heads = pool.shape[0]
  if _is_packed(pool, new):
    return _scatter_packed(pool, new, slots)
  total = pool.shape[1] * pool.shape[2]
  flat = pool.reshape(num_kv_heads, total, *pool.shape[3:])
  flat = flat.at[:, slots].set(jnp.swapaxes(new, 0, 1).astype(pool.dtype), mode="drop")
  return flat.reshape(pool.shape)


def _scatter_packed(pool, new, slots):
  """``new [num_tokens, num_kv_heads, head_dim]`` into a lane-dense pool ``[num_kv_heads,
  num_blocks, rows, 128]``: slot ``s`` is row ``s // p`` (of the flattened pool), lanes
  ``[(s % p) * head_dim, ...)``, one scatter of ``head_dim``-wide windows. Written on the
  lane-dense array itself: on TPU a reshape to the plain layout would relayout the pool."""
  num_kv_heads, num_blocks, rows, width = pool.shape
  head_dim = new.shape[2]
  p = width // head_dim
  flat = pool.reshape(num_kv_heads, num_blocks * rows, width)
  # Padding slots (num_blocks * block_size, from _slots) land on row num_blocks * rows:
  # out of bounds, dropped.
  index = jnp.stack([slots // p, (slots % p) * head_dim], axis=-1).astype(jnp.int32)
  dnums = lax.ScatterDimensionNumbers(
    update_window_dims=(0, 2), inserted_window_dims=(1,), scatter_dims_to_operand_dims=(1, 2)
  )
  flat = lax.scatter(
    flat,
    index,
    jnp.swapaxes(new, 0, 1).astype(pool.dtype),
    dnums,
    mode=lax.GatherScatterMode.FILL_OR_DROP,
  )
  return flat.reshape(pool.shape)


def write_kv_quantized(k_blocks, v_blocks, k_scales, v_scales, k_new, v_new, slot_mapping):
  """Quantizes new K/V rows (``kernels._quant.quantize``) and scatters them and their
  scales into one layer's 8-bit pools.

  Args:
    k_blocks, v_blocks: ``[num_kv_heads, num_blocks, block_size, head_dim]``, int8 or
      float8_e4m3fn.
    k_scales, v_scales: ``f32[num_kv_heads, num_blocks, block_size]``.
    k_new, v_new: ``[num_tokens, num_kv_heads, head_dim]``, any float dtype.
    slot_mapping: as in :func:`write_kv`.

  Returns:
    The updated ``(k_blocks, v_blocks, k_scales, v_scales)``: each row and its scale go
    to the same slot in one pass over the new tokens.
  """
  if not is_quantized(k_blocks.dtype) or v_blocks.dtype != k_blocks.dtype:
    raise ValueError(
      "write_kv_quantized needs int8 or float8_e4m3fn k_blocks and v_blocks of one dtype, got "
      f"{jnp.dtype(k_blocks.dtype).name} and {jnp.dtype(v_blocks.dtype).name}"
    )
  _check_pools(k_blocks, v_blocks)
  for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
    if s.shape != k_blocks.shape[:3] or s.dtype != SCALE_DTYPE:
      raise ValueError(
        f"{name} must be float32 {tuple(k_blocks.shape[:3])} ([num_kv_heads, num_blocks, "
        f"block_size] of k_blocks), got {tuple(s.shape)} {jnp.dtype(s.dtype).name}"
      )
  total = _check_rows(k_new, v_new, slot_mapping, k_blocks)
  slots = _slots(slot_mapping, total)
  kq, ks = quantize(k_new, k_blocks.dtype)
  vq, vs = quantize(v_new, v_blocks.dtype)
  return (
    _scatter_rows(k_blocks, kq, slots),
    _scatter_rows(v_blocks, vq, slots),
    _scatter_rows(k_scales, ks, slots),
    _scatter_rows(v_scales, vs, slots),
  )
