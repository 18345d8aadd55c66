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
  for ``k_buf.shape[1]`` consecutive KV heads starting at ``head``.

  Block ``j`` of the chunk is logical block ``first + j``. It is copied only when it is
  below ``end`` (blocks the queries can see) and its table entry is not -1, so unused
  entries are never DMA'd; the physical id is clamped so that even a corrupt table cannot
  address outside the pool. Each block is one DMA for K and one for V, covering all the
  ``heads`` KV heads: rows ``[j * block_size, (j + 1) * block_size)`` of every head's
  slot buffer. With 8-bit K/V (``scales`` given) each block also copies its K and V
  scales ``[heads, block_size]`` into the slot's scale buffers (two more small DMAs on
  their own semaphores): a block's scales always arrive with its rows.
  """

  fetched: tuple  # per block j: bool scalar
  copies: tuple  # per block j: (k copy, v copy[, k scale copy, v scale copy]), all heads

  @classmethod
  def make(
    cls,
    k_hbm,  # HBM [num_kv_heads, num_blocks, block_size, head_dim]
    v_hbm,
    k_buf,  # VMEM [2 (slot), heads, chunk_tokens, head_dim]
    v_buf,
    sems,  # DMA [2 (K, V), 2 (slot)]
    table_ref,  # SMEM i32[batch * max_blocks]
    *,
    scales=None,  # 8-bit: (ks_hbm, vs_hbm, ks_buf, vs_buf); HBM f32[heads, blocks, bs],
    # VMEM f32[2 (slot), heads, chunk_tokens]; sems is then [4 (K, V, KS, VS), 2]
    row,
    head,
    first,
    end,
    slot,
    blocks_per_chunk,
    max_blocks,
  ):
    num_blocks, block_size = k_hbm.shape[1], k_hbm.shape[2]
    heads = k_buf.shape[1]
    fetched, copies = [], []
    for j in range(blocks_per_chunk):
      logical = first + j
      # Clamped so the SMEM read stays in bounds even for blocks we will not fetch.
      entry = table_ref[row * max_blocks + jnp.minimum(logical, max_blocks - 1)]
      fetched.append((logical < end) & (entry >= 0))
      phys = jnp.clip(entry, 0, num_blocks - 1)
      rows = pl.ds(j * block_size, block_size)
      # One DMA per block for all the step's heads (a strided copy: the heads' slabs of a
      # block are num_blocks * block_size rows apart in HBM), K and V separately.
      heads_hbm = pl.ds(head, heads)
      block = (
        pltpu.make_async_copy(k_hbm.at[heads_hbm, phys], k_buf.at[slot, :, rows], sems.at[0, slot]),
        pltpu.make_async_copy(v_hbm.at[heads_hbm, phys], v_buf.at[slot, :, rows], sems.at[1, slot]),
      )
      if scales is not None:
        ks_hbm, vs_hbm, ks_buf, vs_buf = scales
        block += (
          pltpu.make_async_copy(
            ks_hbm.at[heads_hbm, phys], ks_buf.at[slot, :, rows], sems.at[2, slot]
          ),
          pltpu.make_async_copy(
            vs_hbm.at[heads_hbm, phys], vs_buf.at[slot, :, rows], sems.at[3, slot]
          ),
        )
      copies.append(block)
    return cls(tuple(fetched), tuple(copies))

  def _each(self, method):
    for fetched, block in zip(self.fetched, self.copies, strict=True):

      @pl.when(fetched)
      def _(block=block):
        for copy in block:
          getattr(copy, method)()

  def start(self):
    self._each("start")

  def wait(self):
    self._each("wait")

  def key_ok(self, shape, axis, block_size):
    """Bool mask over the chunk's key slots (along ``axis`` of ``shape``): block fetched."""
    slot = lax.broadcasted_iota(jnp.int32, shape, axis)
    ok = jnp.zeros(shape, jnp.bool_)
    for j, fetched in enumerate(self.fetched):
      in_block = (slot >= j * block_size) & (slot < (j + 1) * block_size)
      ok = ok | (jnp.where(in_block, fetched.astype(jnp.int32), 0) > 0)
    return ok


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


def online_softmax_step(carry, s, visible, v, v_ok, v_scale=None, *, q_dtype=jnp.float32):
  """One flash-attention update of (max, sum, accumulator) with a chunk of keys.

  carry: (m f32[rows, 1], denom f32[rows, 1], acc f32[rows, head_dim]); s: f32[rows, keys];
  visible: bool[rows, keys]; v: [keys, head_dim]; v_ok: bool[keys, 1]. Values outside
  ``v_ok`` (slots never DMA'd, or past the sequence) are zeroed, not multiplied by zero,
  so NaN in a stale buffer cannot reach the output. ``v_scale`` f32[1, keys] (8-bit V,
  already zero outside the keys in use): ``p * v_scale`` goes into the ``p @ v`` product.

  ``p @ v`` runs in V's dtype with a float32 accumulator when q and V share a 16-bit
  dtype (as ``q @ k.T`` does, and as the GPU kernels do): one MXU pass instead of the
  several of a float32 product at HIGHEST precision, at the cost of rounding p to bf16.
  Any other mix (float32 q or V, 8-bit V) keeps p in float32 and widens V, so nothing is
  rounded. The softmax state (m, denom, acc) is float32 either way.
  """
  m, denom, acc = carry
  s = jnp.where(visible, s, MASK_VALUE)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
  alpha = jnp.exp(m - m_new)
  denom_new = alpha * denom + jnp.sum(p, axis=1, keepdims=True)
  if v_scale is not None:
    p = p * v_scale
  narrow = jnp.dtype(q_dtype) == jnp.dtype(v.dtype) and jnp.dtype(v.dtype).itemsize == 2
  if narrow:
    v = jnp.where(v_ok, v, jnp.zeros((), v.dtype))
    p, precision = p.astype(v.dtype), None
  else:
    v = jnp.where(v_ok, v.astype(jnp.float32), 0.0)
    precision = lax.Precision.HIGHEST
  pv = lax.dot_general(
    p, v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
  )
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


def mosaic_params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def kv_scratch(heads, chunk_tokens, head_dim, dtype):
  """Two slots (double buffer) of one chunk of K and of V, and their DMA semaphores; for
  8-bit K/V also the chunk's K and V scales (``[2, heads, chunk_tokens]`` float32, keys
  along the lanes, as the scores are) and two more semaphores."""
  if is_quantized(dtype):
    return [
      pltpu.VMEM((2, heads, chunk_tokens, head_dim), dtype),
      pltpu.VMEM((2, heads, chunk_tokens, head_dim), dtype),
      pltpu.VMEM((2, heads, chunk_tokens), SCALE_DTYPE),
      pltpu.VMEM((2, heads, chunk_tokens), SCALE_DTYPE),
      pltpu.SemaphoreType.DMA((4, 2)),  # [K, V, K scale, V scale; slot]
    ]
  return [
    pltpu.VMEM((2, heads, chunk_tokens, head_dim), dtype),
    pltpu.VMEM((2, heads, chunk_tokens, head_dim), dtype),
    pltpu.SemaphoreType.DMA((2, 2)),  # [K or V, slot]
  ]
