"""Input checks shared by the dispatcher (``kernels._api``) and every backend.

A leaf module: it imports nothing from the dispatcher or the backends, so each of them
can import it at module level (the backends used to import these checks from
``kernels._api``, which imports the backends: an import circle).

This module imports nothing from paxcache or flax.
"""

from __future__ import annotations

import math
import numbers

import jax.numpy as jnp
import numpy as np

from kernels import _layout
from kernels._quant import QUANT_DTYPES, SCALE_DTYPE, is_quantized
from kernels.reference import INVALID_BLOCK

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _shape_str(x) -> str:
  return f"{tuple(x.shape)} {jnp.dtype(x.dtype).name}"


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_)


def check_arrays(what: str = "", **arrays) -> None:
  """ValueError naming the first of ``arrays`` that is not an array (a list, None, ...),
  prefixed by ``what``: JAX would fail on it later with an AttributeError instead."""
  for name, x in arrays.items():
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      where = f"{what}: " if what else ""
      raise ValueError(f"{where}{name} must be a JAX or NumPy array, got {type(x).__name__}")


def validate_options(scale, sliding_window, logit_soft_cap) -> tuple:
  """Checks the attention options; returns ``(scale, sliding_window, logit_soft_cap)`` as
  Python ``float``, ``int`` and ``float`` (None stays None). Raises ValueError naming the
  option.

  * ``scale``: None or a finite real number (a NaN or inf would poison every logit).
  * ``sliding_window``: None or a Python or NumPy int >= 1 (not a bool): backends used to
    round a fractional window differently (the reference took 2.5 as 3 keys, the GPU
    kernels as 2, and the TPU kernels failed inside with a TypeError).
  * ``logit_soft_cap``: None or a finite real number > 0.
  """
  if scale is not None and not (_is_real(scale) and math.isfinite(scale)):
    hint = ""
    if hasattr(scale, "shape") and not _is_real(scale):
      # A static option: a kernel compiles it in, so it cannot be an array (or a tracer).
      hint = " (an array: pass a Python float, e.g. float(x), outside jit)"
    raise ValueError(f"scale must be None or a finite real number{hint}, got {scale!r}")
  if sliding_window is not None and (
    isinstance(sliding_window, bool | np.bool_)
    or not isinstance(sliding_window, numbers.Integral)
    or sliding_window < 1
  ):
    raise ValueError(
      f"sliding_window must be None or an int >= 1, got {sliding_window!r} "
      f"({type(sliding_window).__name__})"
    )
  if logit_soft_cap is not None and not (
    _is_real(logit_soft_cap) and math.isfinite(logit_soft_cap) and logit_soft_cap > 0
  ):
    raise ValueError(f"logit_soft_cap must be None or a finite number > 0, got {logit_soft_cap!r}")
  return (
    None if scale is None else float(scale),
    None if sliding_window is None else int(sliding_window),
    None if logit_soft_cap is None else float(logit_soft_cap),
  )


# Head sizes of the Pallas backends (the reference backend takes any head_dim >= 1).
# GPU: a multiple of 16 up to 256; a size that is not a power of two (80, 96, 112, 192, ...)
# runs in tiles of the next power of two, its extra columns masked in the kernels
# (kernels/gpu/decode.py). Above 256: refused, as before (never tested; the default tiles
# are sized for at most 256).
GPU_HEAD_DIM_MULTIPLE = 16
GPU_MAX_HEAD_DIM = 256
# TPU: a multiple of 128, the lane width. The kernels themselves compile for other sizes
# (Mosaic pads VMEM tiles to 128 lanes), but XLA's default TPU layout of a pool whose
# head_dim is not a multiple of 128 is not row-major at real sizes (bf16 [8, 4096, 16, 64]
# is laid out {1,3,2,0}: num_blocks along the lanes), while the Mosaic kernels take their
# HBM operands row-major, so every call would relayout (copy) the whole pool (issue 13:
# no step may touch the whole pool); kernels.tpu.aot.pool_relayout checks it. docs/tpu.md.
TPU_LANES = 128


# GPU kernels that do not mask a padded head dim (kernels.gpu.cascade's shared-prefix
# kernel) keep the head sizes checked before the padding: "gpu-unpadded".
GPU_UNPADDED_HEAD_DIMS = (64, 128, 256)


def head_dim_supported(head_dim: int, backend: str) -> bool:
  """Whether ``backend`` ("reference", "gpu", "gpu-unpadded" or "tpu") takes this
  head_dim; "gpu-unpadded" is the rule of GPU kernels that do not pad the head dim."""
  if backend == "gpu":
    return head_dim % GPU_HEAD_DIM_MULTIPLE == 0 and 0 < head_dim <= GPU_MAX_HEAD_DIM
  if backend == "gpu-unpadded":
    return head_dim in GPU_UNPADDED_HEAD_DIMS
  if backend == "tpu":
    return head_dim > 0 and head_dim % TPU_LANES == 0
  if backend == "reference":
    return head_dim >= 1
  raise ValueError(f"backend must be 'reference', 'gpu', 'gpu-unpadded' or 'tpu', got {backend!r}")


# What each rule asks, as the error says it: "the GPU backend: head_dim must be <rule>".
HEAD_DIM_RULES = {
  "reference": "at least 1",
  "gpu": f"a multiple of {GPU_HEAD_DIM_MULTIPLE} up to {GPU_MAX_HEAD_DIM} (e.g. 64, 80, 96, 112, "
  "128, 192, 256)",
  "gpu-unpadded": f"one of {GPU_UNPADDED_HEAD_DIMS} for this kernel (it does not pad the head "
  "dim to a power of two as paged_attention's kernels do)",
  "tpu": f"a multiple of {TPU_LANES} (the lane width: 128, 256, ...; XLA would copy a pool of "
  "any other head_dim into the kernels' row-major layout on every call), or 32 or 64 in a "
  "lane-dense pool (rows of 128: kernels._layout, PagedKVCache.create(lane_dense=True)); "
  "other sizes in a lane-padded pool (rows of head_dim rounded up to a multiple of 128, "
  "lane_padded=True on the kernels entry points: kernels._layout, docs/tpu.md; allocated "
  "by PagedKVCache.create(lane_padded=True), Decoder.init_cache(lane_padded=True) and "
  "EngineConfig(lane_padded_cache=True))",
}


def validate_head_dim(q, k_blocks, backend: str) -> None:
  """Raises ValueError when ``backend`` does not take the head_dim of ``k_blocks``."""
  head_dim = k_blocks.shape[3]
  if not head_dim_supported(head_dim, backend):
    name = backend.split("-")[0].upper()
    raise ValueError(
      f"the {name} backend: head_dim must be {HEAD_DIM_RULES[backend]}; got head_dim "
      f"{head_dim} (k_blocks {_shape_str(k_blocks)}, q {_shape_str(q)})"
    )


def validate_padded_width(real_head_dim: int, k_blocks, backend: str, what: str) -> None:
  """For a lane-padded pool (``kernels._layout``) on a GPU ``backend`` ("gpu" or
  "gpu-unpadded"), which reads it as a plain pool of its row width: ValueError naming the
  real head_dim and the width where the kernels do not take that width (the kernels' own
  check would name only the width). The width is refused only above 256 (head_dims up to
  256 round up to 128 or 256), where the GPU kernels take no head_dim in any layout."""
  width = k_blocks.shape[3]
  if not head_dim_supported(width, backend):
    raise ValueError(
      f"{what}: the GPU backend reads a lane-padded pool as head_dim {width}, its rows' "
      f"width (head_dim {real_head_dim} rounded up to a multiple of {TPU_LANES}), and takes "
      f"head_dim {HEAD_DIM_RULES[backend]} (k_blocks {_shape_str(k_blocks)}); head_dim "
      f"{real_head_dim} is not one the GPU kernels take in any layout: use "
      "backend='reference', or the TPU backend"
    )


def validate_inputs(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  cu_q_lens=None,
  k_scales=None,
  v_scales=None,
  *,
  lane_dense: bool = False,
) -> None:
  """Checks shared by every backend; raises ValueError naming the argument.

  ``lane_dense``: the pools are in the lane-dense layout of ``kernels._layout`` (head_dim
  32 or 64 in rows of 128), said by the caller rather than guessed from the shapes (a
  head_dim 64 q against a plain head_dim 128 pool is a mistake, not a layout).

  K/V are float32, bfloat16 or float16, or 8-bit (int8, float8_e4m3fn) with ``k_scales``
  and ``v_scales`` ``f32[num_kv_heads, num_blocks, block_size]`` (given iff K/V are 8-bit).

  Shapes and dtypes are always checked (static). Values of ``block_table``, ``lengths``
  and ``cu_q_lens`` are checked when they are host (NumPy) arrays — what
  ``paxcache.BlockTable.from_allocator`` builds — since that costs no device transfer;
  device arrays and tracers are trusted (a kernel cannot raise on a bad id at run time).
  """
  arrays = dict(q=q, k_blocks=k_blocks, v_blocks=v_blocks, block_table=block_table)
  check_arrays(**arrays, lengths=lengths, **({} if cu_q_lens is None else {"cu_q_lens": cu_q_lens}))
  if k_blocks.ndim != 4:
    raise ValueError(
      "k_blocks must be [num_kv_heads, num_blocks, block_size, head_dim], got "
      f"{_shape_str(k_blocks)}"
    )
  if v_blocks.shape != k_blocks.shape or v_blocks.dtype != k_blocks.dtype:
    raise ValueError(f"v_blocks {_shape_str(v_blocks)} must match k_blocks {_shape_str(k_blocks)}")
  if 0 in (k_blocks.shape[0], *k_blocks.shape[2:]):
    # A pool of 0 blocks is allowed (nothing to read: zeros, as from any empty table).
    raise ValueError(
      "k_blocks [num_kv_heads, num_blocks, block_size, head_dim] needs num_kv_heads, "
      f"block_size and head_dim >= 1, got {_shape_str(k_blocks)}"
    )
  num_kv_heads = k_blocks.shape[0]
  if q.ndim != 3:
    raise ValueError(f"q must be [num_tokens or batch, num_q_heads, head_dim], got {_shape_str(q)}")
  if 0 in q.shape[1:]:
    raise ValueError(
      f"q [num_tokens or batch, num_q_heads, head_dim] needs heads and head_dim >= 1, got "
      f"{_shape_str(q)}"
    )
  pool_shape = validate_layout(q, k_blocks, lane_dense)
  if q.shape[1] % num_kv_heads:
    raise ValueError(
      f"num_q_heads {q.shape[1]} (q {_shape_str(q)}) is not a multiple of num_kv_heads "
      f"{num_kv_heads} (k_blocks {_shape_str(k_blocks)})"
    )
  if q.dtype not in _FLOAT_DTYPES:
    raise ValueError(f"q must be float32, bfloat16 or float16, got {_shape_str(q)}")
  if k_blocks.dtype not in _FLOAT_DTYPES and not is_quantized(k_blocks.dtype):
    raise ValueError(
      "k_blocks must be float32, bfloat16, float16 or 8-bit "
      f"({', '.join(d.name for d in QUANT_DTYPES)}), got {_shape_str(k_blocks)}"
    )
  validate_scales(k_blocks, k_scales, v_scales)
  if block_table.ndim != 2 or block_table.dtype != jnp.int32:
    raise ValueError(
      f"block_table must be int32 [batch, max_blocks], got {_shape_str(block_table)}"
    )
  if lengths.ndim != 1 or lengths.dtype != jnp.int32:
    raise ValueError(f"lengths must be int32 [batch], got {_shape_str(lengths)}")
  batch = block_table.shape[0]
  if lengths.shape[0] != batch:
    raise ValueError(
      f"lengths {_shape_str(lengths)} and block_table {_shape_str(block_table)} disagree on batch"
    )
  if cu_q_lens is None:
    if q.shape[0] != batch:
      raise ValueError(
        f"decode (cu_q_lens=None) needs one query per sequence: q {_shape_str(q)} vs "
        f"block_table {_shape_str(block_table)}"
      )
  else:
    if cu_q_lens.ndim != 1 or cu_q_lens.dtype != jnp.int32 or cu_q_lens.shape[0] != batch + 1:
      raise ValueError(
        f"cu_q_lens must be int32 [batch + 1] = [{batch + 1}], got {_shape_str(cu_q_lens)}"
      )
  _validate_host_values(q.shape[0], pool_shape, block_table, lengths, cu_q_lens)


def validate_layout(q, k_blocks, lane_dense: bool = False) -> tuple[int, int, int, int]:
  """The pool's ``(num_kv_heads, num_blocks, block_size, head_dim)`` in tokens: rows as
  wide as q's head_dim (``lane_dense`` False), or lane-dense rows of 128 (``kernels.
  _layout``: 16- or 32-bit K/V of head_dim 32 or 64). Raises ValueError otherwise."""
  head_dim, width = q.shape[-1], k_blocks.shape[3]
  if not lane_dense:
    if width != head_dim:
      raise ValueError(
        f"q head_dim {head_dim} (q {_shape_str(q)}) != k_blocks head_dim {width} "
        f"(k_blocks {_shape_str(k_blocks)})"
        + (
          "; for a lane-dense pool (rows of 128, block_size * head_dim / 128 of them a "
          "block) pass lane_dense=True, for a lane-padded one (a row a token, zeros after "
          "head_dim) lane_padded=True"
          if width == _layout.LANE_WIDTH and head_dim in _layout.PACKED_HEAD_DIMS
          else "; for a lane-padded pool (rows of head_dim rounded up to a multiple of 128) "
          "pass lane_padded=True"
          if head_dim % _layout.LANE_WIDTH and width == _layout.padded_width(head_dim)
          else ""
        )
      )
    return tuple(k_blocks.shape)
  _layout.check_lane_dense(
    head_dim,
    width,
    k_blocks.dtype,
    f"lane_dense=True with q {_shape_str(q)} and k_blocks {_shape_str(k_blocks)}",
  )
  return _layout.logical_shape(k_blocks, head_dim)


def validate_scales(k_blocks, k_scales, v_scales) -> None:
  """``k_scales``/``v_scales``: None for float K/V, ``f32[num_kv_heads, num_blocks,
  block_size]`` for 8-bit K/V; raises ValueError naming the argument."""
  quantized = is_quantized(k_blocks.dtype)
  want = tuple(k_blocks.shape[:3])
  for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
    if not quantized:
      if s is not None:
        raise ValueError(
          f"{name} given with {jnp.dtype(k_blocks.dtype).name} k_blocks: scales are only for "
          f"8-bit K/V ({', '.join(d.name for d in QUANT_DTYPES)}); pass {name}=None"
        )
      continue
    if s is None:
      raise ValueError(
        f"{name} is required with {jnp.dtype(k_blocks.dtype).name} k_blocks (8-bit K/V are "
        f"read as q * scale): pass float32 {want} [num_kv_heads, num_blocks, block_size]"
      )
    check_arrays(**{name: s})
    if tuple(s.shape) != want or jnp.dtype(s.dtype) != SCALE_DTYPE:
      raise ValueError(
        f"{name} must be float32 {want} ([num_kv_heads, num_blocks, block_size] of k_blocks "
        f"{_shape_str(k_blocks)}), got {_shape_str(s)}"
      )


def _validate_host_values(num_rows, pool_shape, block_table, lengths, cu_q_lens) -> None:
  """Value checks of host (NumPy) metadata: an out-of-range block id would otherwise be
  skipped as an unused entry (every backend's rule for a traced table), silently dropping
  that block's keys."""
  _, num_blocks, block_size, _ = pool_shape
  if isinstance(block_table, np.ndarray):
    bad = (block_table < INVALID_BLOCK) | (block_table >= num_blocks)
    if bad.any():
      rows, cols = np.nonzero(bad)
      raise ValueError(
        f"block_table holds ids outside [0, {num_blocks}) and != {INVALID_BLOCK} "
        f"(unused): {block_table[rows, cols][:8].tolist()} at (row, entry) "
        f"{list(zip(rows[:8].tolist(), cols[:8].tolist(), strict=True))}"
      )
  if isinstance(lengths, np.ndarray):
    capacity = block_table.shape[1] * block_size
    bad = (lengths < 0) | (lengths > capacity)
    if bad.any():
      raise ValueError(
        f"lengths must be in [0, max_blocks * block_size] = [0, {capacity}]; rows "
        f"{np.nonzero(bad)[0][:8].tolist()} hold {lengths[bad][:8].tolist()}"
      )
    if isinstance(block_table, np.ndarray):
      # Entry i of row b holds tokens [i * block_size, (i + 1) * block_size): every entry
      # below ceil(lengths[b] / block_size) is in use; a -1 there silently skips its keys.
      need = -(-lengths.astype(np.int64) // max(block_size, 1))
      hole = (np.arange(block_table.shape[1]) < need[:, None]) & (block_table == INVALID_BLOCK)
      if hole.any():
        rows, cols = np.nonzero(hole)
        raise ValueError(
          f"block_table holds {INVALID_BLOCK} (unused) inside the blocks that lengths use, "
          f"at (row, entry) {list(zip(rows[:8].tolist(), cols[:8].tolist(), strict=True))}; "
          f"those rows' lengths are {lengths[rows[:8]].tolist()}, so entries below "
          f"ceil(length / {block_size}) must be block ids (their keys would be skipped)"
        )
  if isinstance(cu_q_lens, np.ndarray):
    q_lens = np.diff(cu_q_lens)
    if cu_q_lens[0] < 0 or (q_lens < 0).any() or cu_q_lens[-1] > num_rows:
      raise ValueError(
        f"cu_q_lens must be non-decreasing, start >= 0 and end <= the {num_rows} query rows "
        f"of q; got {cu_q_lens.tolist()}"
      )
    if isinstance(lengths, np.ndarray) and (q_lens > lengths).any():
      rows = np.nonzero(q_lens > lengths)[0][:8].tolist()
      raise ValueError(
        f"sequences {rows} have more queries than tokens (cu_q_lens {cu_q_lens.tolist()}, "
        f"lengths {lengths.tolist()}): lengths must count this call's queries"
      )


def validate_decode_plan(decode_plan, k_blocks, block_table, lengths, cu_q_lens, sliding_window):
  """Checks a ``kernels.gpu.plan.DecodePlan`` against the call; raises ValueError.

  Static: a decode call (``cu_q_lens`` None), int32 1-D arrays, ``[batch]`` per-sequence
  arrays, equal chunk-array lengths, the cache's ``num_kv_heads`` and ``block_size``, and a
  window the plan may cut by (None, or the call's). Values, when the plan and ``lengths``
  are host (NumPy) arrays: every sequence's chunks tile ``[max(length - window, 0),
  length)`` exactly (``[0, length)`` for a plan without a window), in order, so a plan
  built for other lengths cannot skip or repeat keys. Device arrays are trusted, as the
  block table is.
  """
  from kernels.gpu.plan import DecodePlan  # here: the GPU package is heavy to import

  if not isinstance(decode_plan, DecodePlan):
    raise ValueError(
      f"decode_plan must be a kernels.gpu.plan.DecodePlan (from plan_decode), got "
      f"{type(decode_plan).__name__}"
    )
  if cu_q_lens is not None:
    raise ValueError("decode_plan is for decode calls only (cu_q_lens=None)")
  p = decode_plan
  batch = block_table.shape[0]
  for name in ("chunk_seq", "chunk_start", "chunk_end", "seq_first_chunk", "seq_num_chunks"):
    x = getattr(p, name)
    if not (hasattr(x, "shape") and hasattr(x, "dtype")) or x.ndim != 1 or x.dtype != jnp.int32:
      raise ValueError(f"decode_plan.{name} must be a 1-D int32 array, got {x!r:.80}")
  if p.seq_first_chunk.shape[0] != batch or p.seq_num_chunks.shape[0] != batch:
    raise ValueError(
      f"decode_plan is for a batch of {p.seq_first_chunk.shape[0]} sequences, the call has "
      f"{batch} (block_table {_shape_str(block_table)})"
    )
  if not p.chunk_seq.shape == p.chunk_start.shape == p.chunk_end.shape:
    raise ValueError(
      f"decode_plan chunk arrays disagree: chunk_seq {p.chunk_seq.shape}, chunk_start "
      f"{p.chunk_start.shape}, chunk_end {p.chunk_end.shape}"
    )
  num_kv_heads, _, block_size, _ = k_blocks.shape
  if (p.num_kv_heads, p.block_size) != (num_kv_heads, block_size):
    raise ValueError(
      f"decode_plan was built for num_kv_heads {p.num_kv_heads}, block_size {p.block_size}; "
      f"the cache has {num_kv_heads}, {block_size} (k_blocks {_shape_str(k_blocks)})"
    )
  if p.sliding_window is not None and p.sliding_window != sliding_window:
    raise ValueError(
      f"decode_plan covers only the last {p.sliding_window} keys of each sequence "
      f"(built with sliding_window={p.sliding_window}) but the call has sliding_window="
      f"{sliding_window}; build the plan with the call's window (or None)"
    )
  arrays = (p.chunk_seq, p.chunk_start, p.chunk_end, p.seq_first_chunk, p.seq_num_chunks, lengths)
  if all(isinstance(x, np.ndarray) for x in arrays):
    _validate_plan_values(p, lengths)


def _validate_plan_values(p, lengths) -> None:
  num_padded = p.chunk_seq.shape[0]
  first = p.seq_first_chunk.astype(np.int64)
  count = p.seq_num_chunks.astype(np.int64)
  if (count < 0).any() or (first < 0).any() or (first + count > num_padded).any():
    raise ValueError(
      f"decode_plan's seq_first_chunk / seq_num_chunks point outside its {num_padded} chunks"
    )
  length = lengths.astype(np.int64)
  lo = length * 0 if p.sliding_window is None else np.maximum(length - p.sliding_window, 0)
  seqs = np.nonzero(count)[0]
  idx = np.repeat(first[seqs], count[seqs]) + (
    np.arange(int(count.sum())) - np.repeat(np.cumsum(count[seqs]) - count[seqs], count[seqs])
  )
  owner = np.repeat(seqs, count[seqs])
  start, end = p.chunk_start[idx].astype(np.int64), p.chunk_end[idx].astype(np.int64)
  head = np.r_[True, owner[1:] != owner[:-1]] if idx.size else np.zeros(0, bool)
  tail = np.r_[owner[1:] != owner[:-1], True] if idx.size else np.zeros(0, bool)
  ok = (
    (p.chunk_seq[idx] == owner).all()
    and (start < end).all()
    and (start[head] == lo[owner[head]]).all()
    and (end[tail] == length[owner[tail]]).all()
    and (end[~tail] == start[1:][~tail[:-1]]).all()
    and (length[count == 0] == lo[count == 0]).all()
  )
  if not ok:
    raise ValueError(
      "decode_plan does not tile each sequence's keys exactly once for these lengths "
      f"({lengths[:8].tolist()}...): it was built for other lengths; build it from the "
      "call's lengths (kernels.gpu.plan.plan_decode)"
    )
