"""Pallas GPU backend of ``kernels.paged_attention``: decode and ragged (chunked) prefill.

Which Pallas GPU backend runs is decided in one place, :func:`kernel_backend`.
Today it is Pallas Triton (``jax.experimental.pallas.triton``) everywhere: it runs
on every CUDA GPU JAX supports (Ampere, Hopper, ...) and in interpret mode on CPU,
which is how CI checks it. A Mosaic GPU (Hopper TMA / wgmma) kernel can replace it
behind the same function without any caller changing (see docs/gpu_notes.md).

This package imports nothing from paxcache or flax.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels._api import _shape_str, validate_inputs
from kernels.gpu.decode import paged_decode
from kernels.gpu.prefill import paged_prefill
from kernels.gpu.tuning import GpuBlockSizes, default_block_sizes

__all__ = [
  "GpuBlockSizes",
  "default_block_sizes",
  "kernel_backend",
  "paged_attention",
  "validate_gpu_inputs",
]

# The head dims checked on an H100 (benchmarks/gpu_check.py) and in interpret mode.
SUPPORTED_HEAD_DIMS = (64, 128, 256)
MAX_BLOCK_SIZE = 512
MAX_GROUP = 128  # query heads per KV head in one decode tile


def kernel_backend() -> str:
  """The Pallas GPU backend the public functions run: "triton" (see module docstring)."""
  return "triton"


def validate_gpu_inputs(
  q, k_blocks, v_blocks, block_table, lengths, cu_q_lens=None, *, block_sizes=None
) -> None:
  """Static checks of what the GPU kernels support; raises ValueError before compiling."""
  validate_inputs(q, k_blocks, v_blocks, block_table, lengths, cu_q_lens)
  num_kv_heads, num_blocks, block_size, head_dim = k_blocks.shape
  if head_dim not in SUPPORTED_HEAD_DIMS:
    raise ValueError(
      f"the GPU backend supports head_dim in {SUPPORTED_HEAD_DIMS}, got head_dim "
      f"{head_dim} (k_blocks {_shape_str(k_blocks)}, q {_shape_str(q)})"
    )
  if block_size < 1 or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
    raise ValueError(
      f"the GPU backend supports block_size a power of two in [1, {MAX_BLOCK_SIZE}], got "
      f"block_size {block_size} (k_blocks {_shape_str(k_blocks)})"
    )
  group = q.shape[1] // num_kv_heads
  if group > MAX_GROUP:
    raise ValueError(
      f"the GPU backend supports at most {MAX_GROUP} query heads per KV head, got "
      f"{group} (q {_shape_str(q)}, k_blocks {_shape_str(k_blocks)})"
    )
  if num_kv_heads * num_blocks * block_size >= 2**31:
    raise ValueError(
      f"k_blocks {_shape_str(k_blocks)} has >= 2**31 token slots; the GPU kernels index "
      "slots with int32"
    )
  hp = getattr(block_sizes, "prefill_heads_per_program", None)
  if hp is not None and group % hp:
    raise ValueError(
      f"block_sizes.prefill_heads_per_program {hp} must divide the {group} query heads per "
      f"KV head (q {_shape_str(q)}, k_blocks {_shape_str(k_blocks)})"
    )
  if block_sizes is not None and not isinstance(block_sizes, GpuBlockSizes):
    raise ValueError(
      f"block_sizes for the GPU backend must be a kernels.gpu.GpuBlockSizes, got "
      f"{type(block_sizes).__name__}"
    )


def paged_attention(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  cu_q_lens=None,
  *,
  scale=None,
  sliding_window=None,
  logit_soft_cap=None,
  block_sizes=None,
  interpret=False,
):
  """Paged attention on GPU (Pallas); same arguments and result as kernels.reference.

  Args:
    q: [batch, num_q_heads, head_dim] (decode, ``cu_q_lens=None``) or [num_tokens,
      num_q_heads, head_dim] (ragged prefill / mixed batch).
    k_blocks, v_blocks: [num_kv_heads, num_blocks, block_size, head_dim].
    block_table: i32[batch, max_blocks], -1 where unused.
    lengths: i32[batch], tokens in each sequence's cache including this call's queries.
    cu_q_lens: i32[batch + 1] or None.
    scale, sliding_window, logit_soft_cap: as in kernels.paged_attention.
    block_sizes: a GpuBlockSizes, or None for per-shape defaults.
    interpret: run the Pallas kernels in interpret mode (CPU tests).

  Returns:
    Array shaped like q, q.dtype.
  """
  validate_gpu_inputs(
    q, k_blocks, v_blocks, block_table, lengths, cu_q_lens, block_sizes=block_sizes
  )
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
  if logit_soft_cap is not None and logit_soft_cap <= 0:
    raise ValueError(f"logit_soft_cap must be > 0, got {logit_soft_cap}")
  head_dim = q.shape[2]
  decode = cu_q_lens is None
  if block_sizes is None:
    block_sizes = default_block_sizes(
      head_dim=head_dim,
      kv_dtype=k_blocks.dtype,
      num_tokens=q.shape[0],
      decode=decode,
      batch=block_table.shape[0],
      num_kv_heads=k_blocks.shape[0],
    )
  scale = float(head_dim**-0.5 if scale is None else scale)
  sliding_window = None if sliding_window is None else int(sliding_window)
  logit_soft_cap = None if logit_soft_cap is None else float(logit_soft_cap)
  if (
    q.shape[0] == 0
    or block_table.shape[0] == 0
    or block_table.shape[1] == 0
    or (k_blocks.shape[1] == 0)
  ):
    # Nothing to attend to (or no rows): every row sees no key and is zero.
    return jnp.zeros(q.shape, q.dtype)
  kwargs = dict(
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    block_sizes=block_sizes,
    interpret=interpret,
  )
  if kernel_backend() != "triton":  # pragma: no cover - the one switch point
    raise NotImplementedError(kernel_backend())
  if decode:
    return paged_decode(q, k_blocks, v_blocks, block_table, lengths, **kwargs)
  return paged_prefill(q, k_blocks, v_blocks, block_table, lengths, cu_q_lens, **kwargs)
