"""Pieces shared by the decode and ragged TPU kernels: block DMAs, masks, online softmax.

Everything here runs inside a Pallas TPU kernel body. Masks are built from iotas and
comparisons only (no vector integer division), and no ref is ever reshaped, so the same
code lowers with Mosaic and runs in TPU interpret mode.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels._quant import SCALE_DTYPE, is_quantized

MASK_VALUE = -1e30  # finite, as in the reference: a fully masked row stays finite


def cdiv(a, b):
  return lax.div(a + b - 1, b)


def interpret_params(interpret):
  """``interpret`` as pallas_call wants it: False, or TPU ``InterpretParams``."""
  if interpret is True:
    # The TPU interpreter (simulated DMAs, semaphores and memory spaces); its defaults raise
    # on out-of-bounds reads and fill fresh buffers with NaN.
    return pltpu.InterpretParams()
  return interpret or False


@dataclasses.dataclass(frozen=True)
class Chunk:
  """DMAs of one chunk of ``blocks_per_chunk`` consecutive logical blocks of one sequence,
  for ``kv_buf.shape[2]`` consecutive KV heads starting at ``head``.

  Block ``j`` of the chunk is logical block ``first + j``. It is copied only when it is
  below ``end`` (blocks the queries can see) and its table entry names a block of the pool
  (``0 <= id < num_blocks``: -1, the unused entry, and an out-of-range id of a corrupt
  table are both skipped and their keys masked, as on the other backends); the physical
  id is clamped as well, so that no DMA can address outside the pool. Each block is one
  DMA for K and one for V, covering all the ``heads`` KV heads (a strided copy: the heads'
  slabs of a block are ``num_blocks * block_size`` rows apart in HBM), into rows ``[j *
  block_size, (j + 1) * block_size)`` of every head's part of the slot. With 8-bit K/V
  (``scales`` given) each block also copies its K and V scales ``[heads, block_size]`` into
  the slot's scale buffer (two more small DMAs, on the slot's second semaphore): a block's
  scales always arrive with its rows.

  All the K and V DMAs of a slot signal one semaphore, and :meth:`wait` waits on it once
  for the bytes of every block fetched (a DMA semaphore counts bytes: a wait with a
  descriptor of ``n`` bytes consumes ``n``, whichever DMAs delivered them): one wait when
  the whole chunk was fetched, otherwise one per binary digit set in the fetched count
  (a wait descriptor's size is static; at most ``bit_length(blocks_per_chunk - 1)``).
  """

  k_hbm: object  # HBM [num_kv_heads, num_blocks, block_size, head_dim]
  v_hbm: object
  kv_buf: object  # VMEM [2 (slot), 2 (K, V), heads, chunk_tokens, head_dim]
  sems: object  # DMA [2 (K and V, scales), 2 (slot)]
  table_ref: object  # SMEM i32[batch * max_blocks]
  # 8-bit only: (ks_hbm, vs_hbm, scale_buf); HBM f32[num_kv_heads, num_blocks, block_size],
  # VMEM f32[2 (slot), 2 (K, V), heads, chunk_tokens]
  scales: tuple | None
  row: object
  head: object
  first: object
  end: object
  slot: object
  blocks_per_chunk: int
  max_blocks: int

  @property
  def block_size(self):
    return self.k_hbm.shape[2]

  def block(self, j):
    """(fetched, physical id) of block ``j`` (static or traced) of the chunk."""
    logical = self.first + j
    # Clamped so the SMEM read stays in bounds even for blocks we will not fetch.
    entry = self.table_ref[self.row * self.max_blocks + jnp.minimum(logical, self.max_blocks - 1)]
    # An id outside the pool is an unused entry, as on every backend (reference.block_present).
    fetched = (logical < self.end) & (entry >= 0) & (entry < self.k_hbm.shape[1])
    return fetched, jnp.clip(entry, 0, self.k_hbm.shape[1] - 1)

  def _copies(self, j, phys):
    bs = self.block_size
    heads = self.kv_buf.shape[2]
    rows = pl.ds(pl.multiple_of(j * bs, bs), bs)
    hbm = pl.ds(self.head, heads)
    sem = self.sems.at[0, self.slot]
    copies = [
      pltpu.make_async_copy(self.k_hbm.at[hbm, phys], self.kv_buf.at[self.slot, 0, :, rows], sem),
      pltpu.make_async_copy(self.v_hbm.at[hbm, phys], self.kv_buf.at[self.slot, 1, :, rows], sem),
    ]
    if self.scales is not None:
      ks_hbm, vs_hbm, sc_buf = self.scales
      sem = self.sems.at[1, self.slot]
      copies += [
        pltpu.make_async_copy(ks_hbm.at[hbm, phys], sc_buf.at[self.slot, 0, :, rows], sem),
        pltpu.make_async_copy(vs_hbm.at[hbm, phys], sc_buf.at[self.slot, 1, :, rows], sem),
      ]
    return copies

  def start(self):
    """Starts the DMAs of every block to fetch; returns how many blocks that is (i32)."""

    def issue(j, count):
      fetched, phys = self.block(j)

      @pl.when(fetched)
      def _():
        for copy in self._copies(j, phys):
          copy.start()

      return count + fetched.astype(jnp.int32)

    return lax.fori_loop(0, self.blocks_per_chunk, issue, jnp.int32(0))

  def _wait_rows(self, rows):
    """One wait per semaphore for ``rows`` rows of K and V of every head (and scales)."""
    view = self.kv_buf.at[self.slot, :, :, pl.ds(0, rows)]
    pltpu.make_async_copy(view, view, self.sems.at[0, self.slot]).wait()
    if self.scales is not None:
      view = self.scales[2].at[self.slot, :, :, pl.ds(0, rows)]
      pltpu.make_async_copy(view, view, self.sems.at[1, self.slot]).wait()

  def wait(self, fetched):
    """Waits for the ``fetched`` blocks :meth:`start` returned (i32)."""
    bpc, bs = self.blocks_per_chunk, self.block_size
    full = fetched == bpc

    @pl.when(full)
    def _():
      self._wait_rows(bpc * bs)

    for bit in range((bpc - 1).bit_length()):  # a partial count is below bpc

      @pl.when(jnp.logical_not(full) & ((fetched & (1 << bit)) != 0))
      def _(bit=bit):
        self._wait_rows((1 << bit) * bs)

  def holes(self, fetched):
    """True when a block below ``end`` in this chunk was not fetched (a -1 entry)."""
    in_range = jnp.clip(self.end - self.first, 0, self.blocks_per_chunk)
    return fetched < in_range

  def hole_masks(self, ok_row, ok_col, has_holes):
    """``ok_row`` [1, chunk] and ``ok_col`` [chunk, 1] (bool) with the keys of blocks not
    fetched cleared; a loop over the chunk's blocks that runs only when ``has_holes``."""
    bs = self.block_size
    slot_row = lax.broadcasted_iota(jnp.int32, ok_row.shape, 1)
    slot_col = lax.broadcasted_iota(jnp.int32, ok_col.shape, 0)

    def clear(j, oks):
      fetched, _ = self.block(j)
      gone = jnp.logical_not(fetched)
      row, col = oks
      row = jnp.where(gone & (slot_row >= j * bs) & (slot_row < (j + 1) * bs), 0, row)
      col = jnp.where(gone & (slot_col >= j * bs) & (slot_col < (j + 1) * bs), 0, col)
      return row, col

    n = jnp.where(has_holes, self.blocks_per_chunk, 0)
    row, col = lax.fori_loop(0, n, clear, (ok_row.astype(jnp.int32), ok_col.astype(jnp.int32)))
    return row > 0, col > 0


def _matmul_operands(a, b):
  """Same-dtype operands for the MXU, never narrower than either input.

  bf16 x bf16 stays bf16 (products are exact in the f32 accumulator); any mix with f32
  widens to f32 at HIGHEST precision, so K/V are never silently rounded to bf16. 8-bit K
  (int8, e4m3) is first widened to q's dtype, which holds every 8-bit value exactly.
  """
  if is_quantized(b.dtype):
    b = b.astype(a.dtype)
  if a.dtype == b.dtype and a.dtype != jnp.float32:
    return a, b, None
  return a.astype(jnp.float32), b.astype(jnp.float32), lax.Precision.HIGHEST


def scores(q, k, *, scale, logit_soft_cap, k_scale=None):
  """f32 logits ``[rows, keys]`` = scale * q @ k.T, soft-capped when asked.

  ``k_scale`` f32[1, keys] (8-bit K): the per-key scale, folded into the scores
  (``q . (k_row * s) = (q . k_row) * s``), so K is never dequantised in VMEM either.
  """
  q, k, precision = _matmul_operands(q, k)
  s = lax.dot_general(
    q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
  )
  if k_scale is not None:
    s = s * k_scale
  s = s * scale
  if logit_soft_cap is not None:
    s = logit_soft_cap * jnp.tanh(s / logit_soft_cap)
  return s


def online_softmax_step(
  carry, s, visible, v, v_ok, v_scale=None, *, q_dtype=jnp.float32, rows_ok=None
):
  """One flash-attention update of (max, sum, accumulator) with a chunk of keys.

  carry: (m f32[rows, 1], denom f32[rows, 1], acc f32[rows, head_dim]); s: f32[rows, keys];
  visible: bool[rows, keys]; v: [keys, head_dim]; v_ok: bool[keys, 1]. Values outside
  ``v_ok`` (slots never DMA'd, or past the sequence) are zeroed, not multiplied by zero,
  so NaN in a stale buffer cannot reach the output. ``visible`` and ``v_ok`` None (the
  fast path: a chunk whose every key was fetched and is seen by every row) skip both
  masks. ``v_scale`` f32[1, keys] (8-bit V,
  already zero outside the keys in use): ``p * v_scale`` goes into the ``p @ v`` product.

  ``p @ v`` runs in a 16-bit dtype with a float32 accumulator when q and V share it, or
  when V is 8-bit and q is 16-bit (V widened to q's dtype, which holds every int8 and
  e4m3 value exactly): as ``q @ k.T`` does, and as the GPU kernels do (their
  ``compute_dtype``), one MXU pass instead of the several of a float32 product at HIGHEST
  precision, at the cost of rounding p (``p * v_scale`` for 8-bit V) to q's dtype. Any
  other mix (float32 q or V) keeps p in float32 and widens V, so nothing is rounded. The
  softmax state (m, denom, acc) is float32 either way.

  ``rows_ok`` bool[rows, 1] (a ragged tile shared by several sequences): rows outside it
  add nothing to their accumulator. Their probabilities are 0, but ``0 x NaN`` is NaN: a
  NaN in a V row one sequence sees would otherwise reach the rows of another.
  """
  m, denom, acc = carry
  if visible is not None:
    s = jnp.where(visible, s, MASK_VALUE)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  p = jnp.exp(s - m_new)
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  alpha = jnp.exp(m - m_new)
  denom_new = alpha * denom + jnp.sum(p, axis=1, keepdims=True)
  if v_scale is not None:
    p = p * v_scale
  narrow = jnp.dtype(q_dtype).itemsize == 2 and (
    jnp.dtype(q_dtype) == jnp.dtype(v.dtype) or is_quantized(v.dtype)
  )
  if narrow:
    v = v.astype(q_dtype)  # exact: a no-op for 16-bit V, 8-bit values fit a 16-bit float
    if v_ok is not None:
      v = jnp.where(v_ok, v, jnp.zeros((), v.dtype))
    p, precision = p.astype(v.dtype), None
  else:
    v = v.astype(jnp.float32)
    if v_ok is not None:
      v = jnp.where(v_ok, v, 0.0)
    precision = lax.Precision.HIGHEST
  pv = lax.dot_general(
    p, v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
  )
  if rows_ok is not None:
    pv = jnp.where(rows_ok, pv, 0.0)
  return m_new, denom_new, alpha * acc + pv


def init_carry(rows, head_dim):
  return (
    jnp.full((rows, 1), MASK_VALUE, jnp.float32),
    jnp.zeros((rows, 1), jnp.float32),
    jnp.zeros((rows, head_dim), jnp.float32),
  )


def finish(carry, dtype):
  """acc / denom; rows that saw no key have acc == 0 and denom == 0, so they give zeros.

  The guard is only on the divisor: a NaN reached through a *visible* slot leaves denom
  NaN, and must surface as NaN (as in the reference), not be turned into zeros.
  """
  _, denom, acc = carry
  return (acc / jnp.where(denom > 0, denom, 1.0)).astype(dtype)


def log_sum_exp(carry):
  """f32[rows, 1]: ``m + log(denom)``, the log of the row's softmax normaliser over the keys
  seen, to merge partial attentions (cascade attention); ``MASK_VALUE`` (finite) for a row
  that saw no key, so that merging it gives it weight ``exp(MASK_VALUE - lse) == 0``.
  A NaN denom stays NaN."""
  m, denom, _ = carry
  saw = ~(denom <= 0)  # NaN compares False both ways: it must stay NaN, not be masked
  return jnp.where(saw, m + jnp.log(jnp.where(saw, denom, 1.0)), MASK_VALUE)


def mosaic_params(semantics, vmem_limit_bytes=None):
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=vmem_limit_bytes)


def kv_scratch(heads, chunk_tokens, head_dim, dtype):
  """Two slots (double buffer) of one chunk of K and V, ``[2 (slot), 2 (K, V), heads,
  chunk_tokens, head_dim]``, and the DMA semaphores ``[2, 2 (slot)]`` (the second one of a
  slot only used by 8-bit K/V); for 8-bit K/V also the chunk's K and V scales
  (``[2 (slot), 2 (K, V), heads, chunk_tokens]`` float32, keys along the lanes, as the
  scores are)."""
  out = [pltpu.VMEM((2, 2, heads, chunk_tokens, head_dim), dtype)]
  if is_quantized(dtype):
    out.append(pltpu.VMEM((2, 2, heads, chunk_tokens), SCALE_DTYPE))
  return out + [pltpu.SemaphoreType.DMA((2, 2))]  # [K and V, scales; slot]
