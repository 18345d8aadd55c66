"""Paged attention in plain JAX: the oracle for every kernel, and the CPU backend.

Layout shared by every backend (see docs/ARCHITECTURE.md):

  q            [num_tokens, num_q_heads, head_dim]   ragged queries, or
               [batch, num_q_heads, head_dim]        one decode query per sequence
  k_blocks     [num_kv_heads, num_blocks, block_size, head_dim]
  v_blocks     [num_kv_heads, num_blocks, block_size, head_dim]
  k_scales     f32[num_kv_heads, num_blocks, block_size]   8-bit K/V only (else None): slot
  v_scales     f32[num_kv_heads, num_blocks, block_size]   (h, b, i) holds row * scale
  block_table  i32[batch, max_blocks]   physical block of logical block i; INVALID_BLOCK (-1)
                                        where unused
  lengths      i32[batch]               tokens in each sequence's cache, *including* the
                                        queries of this call (their K/V are already written)
  cu_q_lens    i32[batch + 1]           query rows of sequence b are
                                        q[cu_q_lens[b]:cu_q_lens[b + 1]]; None means decode
                                        (exactly one query per sequence)

Query i of sequence b (q_len_b = cu_q_lens[b+1] - cu_q_lens[b]) sits at position
``lengths[b] - q_len_b + i`` and attends causally to key positions ``p <= pos``
(and ``p > pos - sliding_window`` when a window is given). A query that sees no
key (length 0, or rows past ``cu_q_lens[-1]``) returns zeros; so does every row when the
block table has no columns (``[batch, 0]``) or the pool no blocks.

The entry points (``kernels.paged_attention``, ``kernels.cascade_attention``) also take
K/V pools in the lane-dense layout of ``kernels._layout`` (head_dim 32 or 64 in rows of
128); this backend is handed them reshaped to the layout above.

This module imports nothing from paxcache or flax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

INVALID_BLOCK = -1
_MASK_VALUE = -1e30  # finite: a fully masked row stays finite (no inf - inf = NaN)


def block_present(table, num_blocks: int):
  """Which entries of a block table name a block of the pool: ``0 <= id < num_blocks``.
  Every backend skips the keys of the others (-1, the unused entry, and any id out of
  range in a traced table, which no kernel can refuse at run time)."""
  return (table >= 0) & (table < num_blocks)


def _positions(lengths, cu_q_lens, num_tokens):
  """Per query row: its sequence id, its position, and whether it is a real row."""
  rows = jnp.arange(num_tokens, dtype=jnp.int32)
  seq = jnp.searchsorted(cu_q_lens, rows, side="right").astype(jnp.int32) - 1
  batch = lengths.shape[0]
  valid = (rows < cu_q_lens[-1]) & (seq >= 0) & (seq < batch)
  seq = jnp.clip(seq, 0, batch - 1)
  q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
  pos = lengths[seq] - q_len + (rows - cu_q_lens[seq])
  return seq, pos, valid


def _attend_rows(
  q,
  k_blocks,
  v_blocks,
  k_scales,
  v_scales,
  row_table,
  pos,
  valid,
  *,
  scale,
  sliding_window,
  logit_soft_cap,
):
  """Attention for a chunk of query rows, each with its own block-table row.

  q: [T, Hq, D]; row_table: i32[T, max_blocks]; pos, valid: [T].
  """
  num_kv_heads, _, block_size, head_dim = k_blocks.shape
  t, num_q_heads, _ = q.shape
  group = num_q_heads // num_kv_heads
  max_blocks = row_table.shape[1]
  span = max_blocks * block_size

  # An entry outside [0, num_blocks) is an unused one (-1) on every backend: its keys are
  # skipped, never read from another block (the GPU and TPU kernels mask it alike).
  present = block_present(row_table, k_blocks.shape[1])
  safe_table = jnp.where(present, row_table, 0)
  # [Hkv, T, max_blocks, bs, D] -> [Hkv, T, span, D]
  k = k_blocks[:, safe_table].reshape(num_kv_heads, t, span, head_dim).astype(jnp.float32)
  v = v_blocks[:, safe_table].reshape(num_kv_heads, t, span, head_dim).astype(jnp.float32)
  if k_scales is not None:
    # 8-bit K/V: the gathered rows (never the pool) are read as q * scale.
    k = k * k_scales[:, safe_table].reshape(num_kv_heads, t, span, 1)
    v = v * v_scales[:, safe_table].reshape(num_kv_heads, t, span, 1)

  key_pos = jnp.arange(span, dtype=jnp.int32)
  block_ok = jnp.repeat(present, block_size, axis=1)  # [T, span]
  visible = (key_pos[None, :] <= pos[:, None]) & block_ok & valid[:, None]
  if sliding_window is not None:
    visible &= key_pos[None, :] > (pos[:, None] - sliding_window)
  # Unused slots may hold anything (NaN included): zero them so 0 * NaN never appears.
  k = jnp.where(visible[None, :, :, None], k, 0.0)
  v = jnp.where(visible[None, :, :, None], v, 0.0)

  qf = q.astype(jnp.float32).reshape(t, num_kv_heads, group, head_dim)
  logits = jnp.einsum("tkgd,ktsd->tkgs", qf, k, precision=jax.lax.Precision.HIGHEST) * scale
  if logit_soft_cap is not None:
    logits = logit_soft_cap * jnp.tanh(logits / logit_soft_cap)
  mask = visible[:, None, None, :]
  logits = jnp.where(mask, logits, _MASK_VALUE)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(logits - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("tkgs,ktsd->tkgd", p, v, precision=jax.lax.Precision.HIGHEST)
  # "No visible key" comes from the mask, not from denom: a NaN in a *visible* slot
  # must surface as NaN (denom > 0 is False for NaN and would hide it as zeros).
  has_key = jnp.any(mask, axis=-1, keepdims=True)
  out = jnp.where(has_key, out / jnp.where(has_key, denom, 1.0), 0.0)
  return out.reshape(t, num_q_heads, head_dim)


@functools.partial(
  jax.jit, static_argnames=("scale", "sliding_window", "logit_soft_cap", "rows_per_chunk")
)
def paged_attention(
  q: jax.Array,
  k_blocks: jax.Array,
  v_blocks: jax.Array,
  block_table: jax.Array,
  lengths: jax.Array,
  cu_q_lens: jax.Array | None = None,
  *,
  scale: float | None = None,
  sliding_window: int | None = None,
  logit_soft_cap: float | None = None,
  rows_per_chunk: int = 64,
  k_scales: jax.Array | None = None,
  v_scales: jax.Array | None = None,
) -> jax.Array:
  """Reference paged attention (decode when ``cu_q_lens`` is None, else ragged prefill).

  Shapes and meaning are in the module docstring; 8-bit (int8, float8_e4m3fn) K/V come with
  ``k_scales``/``v_scales f32[num_kv_heads, num_blocks, block_size]`` and are read as
  ``row * scale`` (``kernels._quant``). Accumulates in float32 and
  returns ``q.dtype``. ``rows_per_chunk`` bounds memory: K/V are gathered for at
  most that many query rows at a time.
  """
  num_tokens, num_q_heads, head_dim = q.shape
  if block_table.shape[1] == 0 or k_blocks.shape[1] == 0:
    # No block to read (a zero-width table or an empty pool): every row sees no key and is
    # zero, as in the Pallas kernels (the code below would reduce over zero keys).
    return jnp.zeros(q.shape, q.dtype)
  if scale is None:
    scale = head_dim**-0.5
  if cu_q_lens is None:
    cu_q_lens = jnp.arange(lengths.shape[0] + 1, dtype=jnp.int32)
  seq, pos, valid = _positions(lengths.astype(jnp.int32), cu_q_lens.astype(jnp.int32), num_tokens)
  row_table = block_table[seq]

  attend = functools.partial(
    _attend_rows,
    k_blocks=k_blocks,
    v_blocks=v_blocks,
    k_scales=k_scales,
    v_scales=v_scales,
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
  )
  chunk = min(rows_per_chunk, num_tokens) if num_tokens else 1
  pad = (-num_tokens) % chunk

  def padded(x):
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))

  n = (num_tokens + pad) // chunk

  def chunked(x):
    return padded(x).reshape((n, chunk) + x.shape[1:])

  out = jax.lax.map(
    lambda xs: attend(xs[0], row_table=xs[1], pos=xs[2], valid=xs[3]),
    (chunked(q), chunked(row_table), chunked(pos), chunked(valid)),
  )
  out = out.reshape((n * chunk, num_q_heads, head_dim))[:num_tokens]
  return out.astype(q.dtype)
