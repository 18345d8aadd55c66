"""``BlockTable``: the immutable pytree of block ids and lengths that crosses the jit boundary.

Built on the host from a :class:`paxcache.allocator.BlockAllocator` in one vectorised NumPy
gather, with batch and ``max_blocks`` padded up to power-of-two buckets so that consecutive decode
steps reuse one compiled program. Unused entries hold ``kernels.INVALID_BLOCK`` (-1); padding rows
are all -1 with length 0, so they read nothing and write nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import struct

from kernels import INVALID_SLOT

if TYPE_CHECKING:
  from paxcache.allocator import BlockAllocator

DEFAULT_MIN_BATCH = 8
DEFAULT_MIN_BLOCKS = 8


def bucket_size(n: int, *, minimum: int = 8) -> int:
  """Smallest power of two ``>= max(n, minimum)``: the padded size for ``n`` rows or blocks.

  Powers of two bound the number of compiled shapes by ``log2`` of the largest size while
  never padding by more than 2x.
  """
  if n < 0 or minimum < 1:
    raise ValueError(f"bucket_size needs n >= 0 and minimum >= 1, got n={n}, minimum={minimum}")
  return 1 << (max(n, minimum) - 1).bit_length()


@struct.dataclass
class BlockTable:
  """Per-sequence block ids and lengths for one step (frozen pytree).

  Attributes:
    block_ids: ``i32[batch, max_blocks]``; entry ``[b, i]`` is the physical block of logical
      block ``i`` of row ``b``, ``INVALID_BLOCK`` (-1) where unused (and for padding rows).
    lengths: ``i32[batch]``; tokens in each row's cache including this step's; 0 for padding.

  Leaves built by :meth:`from_allocator` are read-only NumPy arrays; ``jit`` moves them to the
  device when called (or use ``jax.device_put(table)``).
  """

  block_ids: jax.Array | np.ndarray  # i32[batch, max_blocks]
  lengths: jax.Array | np.ndarray  # i32[batch]

  @property
  def batch_size(self) -> int:
    return self.block_ids.shape[0]

  @property
  def max_blocks(self) -> int:
    return self.block_ids.shape[1]

  @classmethod
  def from_allocator(
    cls,
    allocator: BlockAllocator,
    seq_ids: Sequence[Hashable],
    *,
    batch_size: int | None = None,
    max_blocks: int | None = None,
    min_batch: int = DEFAULT_MIN_BATCH,
    min_blocks: int = DEFAULT_MIN_BLOCKS,
  ) -> BlockTable:
    """Block table of ``seq_ids`` (in that row order), padded to bucketed sizes.

    Args:
      allocator: the host allocator holding the sequences (all resident, none repeated).
      seq_ids: the sequences of this step, one row each.
      batch_size: padded rows; default ``bucket_size(len(seq_ids), minimum=min_batch)``.
      max_blocks: padded columns; default ``bucket_size(longest block list, minimum=min_blocks)``.
    """
    if batch_size is None:
      batch_size = bucket_size(len(seq_ids), minimum=min_batch)
    if max_blocks is None:
      # Bucketed inside the gather, so the sequences are looked up once.
      max_blocks = functools.partial(bucket_size, minimum=min_blocks)
    block_ids, lengths = allocator.gather(seq_ids, batch_size, max_blocks)
    block_ids.flags.writeable = False
    lengths.flags.writeable = False
    return cls(block_ids=block_ids, lengths=lengths)


def build_slot_mapping(
  slots: Sequence[np.ndarray] | np.ndarray,
  num_tokens: int | None = None,
  *,
  minimum: int = DEFAULT_MIN_BATCH,
) -> np.ndarray:
  """Concatenates per-sequence slot arrays into one ``i32[num_tokens]`` slot mapping.

  Args:
    slots: one ``i32`` array (e.g. ``append_batch(...).slots``) or a list of them (e.g.
      ``allocator.slots(seq, start, stop)`` per prefilling sequence), in token order.
    num_tokens: padded length; default ``bucket_size(total, minimum=minimum)``.

  Returns:
    ``i32[num_tokens]``; rows past the real tokens are ``INVALID_SLOT`` (-1) and write nothing.
  """
  if isinstance(slots, np.ndarray):
    flat = slots.reshape(-1)
  else:
    flat = np.concatenate(slots) if len(slots) else np.zeros(0, np.int32)
  total = flat.shape[0]
  if num_tokens is None:
    num_tokens = bucket_size(total, minimum=minimum)
  if total > num_tokens:
    raise ValueError(f"num_tokens={num_tokens} is smaller than the {total} slots given")
  out = np.full(num_tokens, INVALID_SLOT, np.int32)
  out[:total] = flat
  return out
