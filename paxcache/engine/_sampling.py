"""Token sampling inside the jitted step: greedy, temperature and top-k, per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_tokens(logits, temperature, top_k, key, seeds, sample_index, positions):
  """Picks one token per row.

  Args:
    logits: ``f32[rows, vocab]``.
    temperature: ``f32[rows]``; 0 means greedy (argmax).
    top_k: ``i32[rows]``; sample among the ``top_k`` largest logits, 0 means all.
    key: the engine's base PRNG key.
    seeds, sample_index, positions: ``i32[rows]``; each row's key is
      ``fold_in(fold_in(fold_in(key, seed), sample_index), position)``, so a sample's
      token does not depend on which step or batch row produced it.

  Returns:
    ``i32[rows]``.
  """
  vocab = logits.shape[-1]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # Ties at the k-th value keep every tied token (a threshold, not an exact k).
  k = jnp.clip(jnp.where(top_k > 0, top_k, vocab), 1, vocab)
  ascending = jnp.sort(logits, axis=-1)
  threshold = jnp.take_along_axis(ascending, (vocab - k)[:, None], axis=-1)
  safe_t = jnp.where(temperature > 0, temperature, 1.0)
  # Shift by the row's max before dividing: a tiny temperature (1e-38) then sends every
  # other logit to -inf and the max to 0 (greedy), instead of overflowing to inf - inf.
  shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
  scaled = jnp.where(logits >= threshold, shifted / safe_t[:, None], -jnp.inf)

  def one(seed, index, pos, row):
    row_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, seed), index), pos)
    return jax.random.categorical(row_key, row)

  sampled = jax.vmap(one)(seeds, sample_index, positions, scaled).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)
