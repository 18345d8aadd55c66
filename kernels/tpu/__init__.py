"""Pallas TPU (Mosaic) paged attention: a decode kernel and a ragged prefill / mixed kernel.

Same layout, argument order and meaning as :mod:`kernels.reference`; see docs/tpu.md for
the design, block sizes and roofline. On CPU the kernels run in TPU interpret mode
(``interpret=True`` or a ``pltpu.InterpretParams``).
"""

from __future__ import annotations

import jax

from kernels._validate import validate_inputs, validate_options
from kernels.tpu._config import BlockSizes
from kernels.tpu.decode import paged_attention_decode
from kernels.tpu.ragged import paged_attention_ragged


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
  block_sizes: BlockSizes | None = None,
  interpret=False,
  k_scales: jax.Array | None = None,
  v_scales: jax.Array | None = None,
  lane_dense: bool = False,
) -> jax.Array:
  """TPU paged attention: decode when ``cu_q_lens`` is None, else ragged.

  Args and result as :func:`kernels.paged_attention` (shapes in :mod:`kernels.reference`);
  ``block_sizes`` is a :class:`BlockSizes` or None, ``interpret`` is False, True or a
  ``pltpu.InterpretParams``. 8-bit K/V (int8, float8_e4m3fn; block_size a multiple of
  128) come with ``k_scales``/``v_scales f32[num_kv_heads, num_blocks, block_size]``: each
  block's scales are DMA'd with it and multiplied into the scores and probabilities. In a
  ragged call the sequences with one query row run through the decode kernel in a launch
  of their own (``BlockSizes.split_decode``). ``lane_dense``: the pools hold head_dim 32
  or 64 in rows of 128 (``kernels._layout``), read as they are.
  """
  validate_inputs(
    q,
    k_blocks,
    v_blocks,
    block_table,
    lengths,
    cu_q_lens,
    k_scales,
    v_scales,
    lane_dense=lane_dense,
  )
  scale, sliding_window, logit_soft_cap = validate_options(scale, sliding_window, logit_soft_cap)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(
      f"block_sizes must be a kernels.tpu.BlockSizes or None, got {type(block_sizes)}"
    )
  kwargs = dict(
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    block_sizes=block_sizes,
    interpret=interpret,
    k_scales=k_scales,
    v_scales=v_scales,
    lane_dense=lane_dense,
  )
  if cu_q_lens is None:
    return paged_attention_decode(q, k_blocks, v_blocks, block_table, lengths, **kwargs)
  return paged_attention_ragged(q, k_blocks, v_blocks, block_table, lengths, cu_q_lens, **kwargs)


__all__ = ["BlockSizes", "paged_attention", "paged_attention_decode", "paged_attention_ragged"]
