"""Writing new tokens' K/V into their slots: one scatter, one pass over the new tokens."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

INVALID_SLOT = -1


def write_kv(k_blocks, v_blocks, k_new, v_new, slot_mapping):
  """Scatters new K/V rows into the block pools.

  Args:
    k_blocks, v_blocks: ``[num_kv_heads, num_blocks, block_size, head_dim]``.
    k_new, v_new: ``[num_tokens, num_kv_heads, head_dim]``.
    slot_mapping: ``i32[num_tokens]``, ``block_id * block_size + offset``; ``-1`` (padding
      rows) writes nothing.

  Returns:
    The updated ``(k_blocks, v_blocks)``. Under ``jit`` with the pools donated the
    scatter happens in place. A NumPy ``slot_mapping`` is checked (range, no slot twice)
    and raises ValueError; a device one is trusted.
  """
  num_kv_heads, num_blocks, block_size, head_dim = k_blocks.shape
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
  if isinstance(slot_mapping, np.ndarray):
    # Host slots are checked (no device transfer needed): the scatter would silently drop
    # an out-of-range slot and lose that token's K/V, and a repeated slot is a race.
    bad = (slot_mapping < INVALID_SLOT) | (slot_mapping >= total)
    if bad.any():
      raise ValueError(
        f"slot_mapping holds slots outside [0, {total}) and != {INVALID_SLOT} (padding): "
        f"{slot_mapping[bad][:8].tolist()}"
      )
    real = slot_mapping[slot_mapping != INVALID_SLOT]
    if np.unique(real).size != real.size:
      raise ValueError("slot_mapping writes the same slot twice")
  # Padding rows go to an index past the end and are dropped by the scatter.
  slots = jnp.where(slot_mapping >= 0, slot_mapping, total)

  def scatter(pool, new):
    flat = pool.reshape(num_kv_heads, total, head_dim)
    flat = flat.at[:, slots].set(jnp.swapaxes(new, 0, 1).astype(pool.dtype), mode="drop")
    return flat.reshape(pool.shape)

  return scatter(k_blocks, k_new), scatter(v_blocks, v_new)
