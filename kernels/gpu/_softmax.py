"""The online-softmax step of the GPU kernels: logits, soft cap, exp2 and the running state.

One copy for the three kernels (``decode.py``, ``prefill.py``, ``prefill_mosaic.py``). It
works on values, not refs: the Triton kernels get ``q @ k.T`` from a dot of gathered tiles,
the Mosaic GPU kernel from a wgmma accumulator, and each multiplies ``p @ v`` its own way
(a dot; a wgmma from registers or through shared memory, between barriers), so the step
stops short of that product and hands back ``p`` and the rescaled accumulator.

Logits are kept in log2 units (times log2(e)), so the softmax takes one ``exp2`` per
element: one ``ex2`` instruction instead of libdevice's longer ``expf``. The running max
``m`` is in the same units (the decode kernel's split-K combine relies on it).

Only plain ``jnp`` / ``lax`` operations, and row vectors are spread over columns with
``lax.broadcast_in_dim`` (what Mosaic GPU lowers for a row-reduced register layout; Triton
lowers it to the same expand-and-broadcast as ``x[:, None]``).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)


def _per_row(x, shape):
  """``x`` f32[rows] spread over the columns of ``shape`` [rows, cols]."""
  return lax.broadcast_in_dim(x, shape, (0,))


def logits_log2(s, *, scale, logit_soft_cap):
  """Scores ``q . k`` -> logits in log2 units: times ``scale``, soft-capped if asked
  (``cap * tanh(logit / cap)``), times log2(e)."""
  if logit_soft_cap is None:
    return s * (scale * LOG2E)
  return (logit_soft_cap * LOG2E) * jnp.tanh(s * (scale / logit_soft_cap))


def online_softmax_step(carry, s, *, scale, logit_soft_cap, mask=None):
  """One flash-attention update of ``(acc, m, den)`` with a tile of keys, up to ``p @ v``.

  The caller adds ``p.astype(...) @ v`` to the returned ``acc``; the result is the usual
  ``acc * exp2(m_old - m_new) + p @ v``, computed in that order.

  Args:
    carry: ``(acc f32[rows, head_dim], m f32[rows], den f32[rows])``: the unnormalised
      output, the running max of the logits (log2 units; ``-inf`` before the row's first
      visible key) and the running sum of ``exp2(logit - m)``.
    s: f32[rows, keys], ``q @ k.T`` of this tile, before scale and soft cap.
    scale, logit_soft_cap: as in ``kernels.paged_attention`` (static Python floats; the
      cap None or > 0).
    mask: bool broadcastable to [rows, keys], True where the row sees the key; None when
      every row sees every key of the tile (then each row's new max is finite, and the
      guard for rows that have seen nothing is left out).

  Returns:
    ``((acc, m, den), p)``: ``acc`` scaled by ``exp2(m_old - m_new)``, the new ``m`` and
    ``den``, and p f32[rows, keys], this tile's unnormalised probabilities (0 where masked).
  """
  acc, m, den = carry
  s = logits_log2(s, scale=scale, logit_soft_cap=logit_soft_cap)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  # A row that has seen no key keeps m = -inf; exp2 against 0 then gives p = alpha = 0
  # instead of NaN from (-inf) - (-inf).
  m_use = m_new if mask is None else jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp2(m - m_use)
  p = jnp.exp2(s - _per_row(m_use, s.shape))
  den = den * alpha + jnp.sum(p, axis=1)
  acc = acc * _per_row(alpha, acc.shape)
  return (acc, m_new, den), p
