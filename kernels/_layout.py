"""The layouts of a K/V block pool: plain rows, lane-dense rows of 128, lane-padded rows.

A pool is ``[num_kv_heads, num_blocks, rows_per_block, width]``:

- **plain**: ``width == head_dim`` and ``rows_per_block == block_size``, one token per row;
- **lane-dense** (head_dim 32 or 64, 16- or 32-bit K/V): ``width == 128`` and
  ``rows_per_block == block_size * head_dim / 128``: row ``r`` of a block holds its tokens
  ``r * p .. r * p + p - 1`` (``p = 128 // head_dim``) side by side, token ``r * p + j``
  in lanes ``[j * head_dim, (j + 1) * head_dim)``.

Row-major, the two are the same bytes (a lane-dense pool is a reshape of a plain one), so
the GPU and reference backends read a lane-dense pool through a reshape. They differ on
TPU: XLA stores an array in tiles 128 lanes wide, so a plain pool of head_dim 64 is padded
to 128 lanes (or laid out with the blocks along the lanes, docs/tpu.md) and its kernels
would read twice its bytes, or a copy of the pool; a lane-dense one is stored as it is and
the TPU kernels read its rows whole (issue 18, item 4). Every backend takes both layouts
with the same results; ``paxcache.PagedKVCache.create(..., lane_dense=True)`` allocates
the second one.

A third, **lane-padded** (any head_dim that is not a multiple of 128, e.g. 80, 96, 112,
192): ``width == round_up(head_dim, 128)``, each token's K/V in the first ``head_dim``
lanes of its row and zeros (or anything finite) after them. It costs HBM and read time in
proportion to the padding (1.6x at 80, 4/3 at 96 and 192, 8/7 at 112), what a row-major
pool of the real width costs in XLA's 128-lane TPU tiles; XLA's default TPU layout of the
unpadded pool wastes nothing but is not row-major, so the kernels would get a copy of it on
every call (docs/tpu.md). Every backend reads it
as a pool of head_dim ``width``: the entry points zero-pad q to ``width`` (zero lanes add
nothing to q . k), keep the softmax scale of the real head_dim and return the first
``head_dim`` lanes of the output; ``kernels.write_kv(..., lane_padded=True)`` writes new
rows with zero padding. Nothing of the pool is copied or sliced: the kernels see a plain
pool of a head_dim they take. ``paxcache.PagedKVCache.create(..., lane_padded=True)``
allocates it (and keeps the real head_dim).

Which layout a pool is in is said, not guessed: ``lane_dense=True`` on
``kernels.paged_attention``, ``kernels.cascade_attention``, ``kernels.write_kv`` and the
TPU entry points (a head_dim 64 q against a plain head_dim 128 pool has the same shapes,
and is a mistake, refused). ``PagedKVCache`` knows its own layout and passes it. 8-bit
pools are plain only: their per-token scales (``[num_kv_heads, num_blocks, block_size]``)
do not pack with the rows.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels._quant import is_quantized

LANE_WIDTH = 128
# head_dims a lane-dense pool packs (128 // head_dim tokens a row).
PACKED_HEAD_DIMS = (32, 64)


def padded_width(head_dim: int) -> int:
  """The row width of a lane-padded pool: ``head_dim`` rounded up to a multiple of 128."""
  return -(-int(head_dim) // LANE_WIDTH) * LANE_WIDTH


def check_lane_padded(head_dim: int, width: int, what: str) -> None:
  """The rule of a lane-padded pool: rows ``padded_width(head_dim)`` wide for a head_dim
  that is not a multiple of 128. ValueError, prefixed with ``what``, otherwise."""
  if head_dim % LANE_WIDTH == 0:
    raise ValueError(
      f"{what}: head_dim {head_dim} is a multiple of {LANE_WIDTH} already: pass the pool "
      "as plain (lane_padded=False)"
    )
  if width != padded_width(head_dim):
    raise ValueError(
      f"{what}: a lane-padded pool of head_dim {head_dim} has rows {padded_width(head_dim)} "
      f"wide (head_dim rounded up to a multiple of {LANE_WIDTH}); got rows {width} wide"
    )


def pad_lanes(x, width: int):
  """``x [..., d]`` with zeros appended on its last axis to ``width`` (d <= width)."""
  extra = width - x.shape[-1]
  if extra == 0:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def tokens_per_row(head_dim: int, width: int) -> int:
  """Tokens in one row of a pool ``width`` wide: 1 (plain) or ``128 // head_dim``
  (lane-dense); raises ValueError for any other pairing."""
  if width == head_dim:
    return 1
  if width == LANE_WIDTH and head_dim in PACKED_HEAD_DIMS:
    return LANE_WIDTH // head_dim
  raise ValueError(
    f"a K/V pool row is head_dim ({head_dim}) wide, or {LANE_WIDTH} wide for a lane-dense "
    f"pool of head_dim {' or '.join(map(str, PACKED_HEAD_DIMS))}; got rows {width} wide"
  )


def check_lane_dense(head_dim: int, width: int, dtype, what: str) -> None:
  """The one rule of a lane-dense pool: 16- or 32-bit K/V of head_dim 32 or 64 in rows of
  128. ValueError, prefixed with ``what`` (the caller's context), otherwise."""
  if is_quantized(dtype):
    raise ValueError(
      f"{what}: a lane-dense pool holds 16- or 32-bit K/V; 8-bit ({jnp.dtype(dtype).name}) "
      "pools keep one token a row (their per-token scales do not pack with the rows)"
    )
  if head_dim not in PACKED_HEAD_DIMS or width != LANE_WIDTH:
    raise ValueError(
      f"{what}: a lane-dense pool holds head_dim {' or '.join(map(str, PACKED_HEAD_DIMS))} "
      f"in rows of {LANE_WIDTH}; got head_dim {head_dim} in rows {width} wide"
    )


def logical_shape(blocks, head_dim: int) -> tuple[int, int, int, int]:
  """``(num_kv_heads, num_blocks, block_size, head_dim)`` of a pool in either layout."""
  num_kv_heads, num_blocks, rows, width = blocks.shape
  return num_kv_heads, num_blocks, rows * tokens_per_row(head_dim, width), head_dim


def lane_dense_shape(
  num_kv_heads: int, num_blocks: int, block_size: int, head_dim: int, dtype
) -> tuple[int, int, int, int]:
  """The lane-dense pool shape; ValueError when this head_dim, block_size or dtype has none."""
  check_lane_dense(head_dim, LANE_WIDTH, dtype, "lane_dense")
  p = LANE_WIDTH // head_dim
  if block_size % p:
    raise ValueError(
      f"a lane-dense pool of head_dim {head_dim} holds {p} tokens a row: block_size must be a "
      f"multiple of {p}, got {block_size}"
    )
  return num_kv_heads, num_blocks, block_size // p, LANE_WIDTH


def unpack(blocks, head_dim: int):
  """A pool in the plain layout: a reshape (free under jit on GPU and CPU, where both
  layouts are the same row-major bytes; on TPU it would relayout the pool)."""
  return blocks.reshape(logical_shape(blocks, head_dim))


def pack(blocks):
  """A plain pool ``[H, N, block_size, head_dim]`` in the lane-dense layout (a reshape)."""
  h, n, bs, d = blocks.shape
  return blocks.reshape(lane_dense_shape(h, n, bs, d, blocks.dtype))


def padded_query(q, k_blocks, scale, lane_dense: bool, what: str):
  """For a lane-padded pool (above): ``(q zero-padded to the pool's row
  width, the softmax scale of q's real head_dim, that head_dim)``; ValueError where the
  pool is not lane-padded for q's head_dim or is also said to be lane-dense."""
  if lane_dense:
    raise ValueError(f"{what}: lane_dense and lane_padded are two layouts; a pool is in one")
  if q.ndim != 3 or k_blocks.ndim != 4:
    raise ValueError(
      f"{what}: q must be [tokens, num_q_heads, head_dim] and k_blocks [num_kv_heads, "
      f"num_blocks, block_size, width], got {tuple(q.shape)} and {tuple(k_blocks.shape)}"
    )
  head_dim, width = q.shape[2], k_blocks.shape[3]
  check_lane_padded(
    head_dim,
    width,
    f"{what}(lane_padded=True) with q {tuple(q.shape)} and k_blocks {tuple(k_blocks.shape)}",
  )
  scale = float(head_dim**-0.5) if scale is None else scale
  return pad_lanes(q, width), scale, head_dim
