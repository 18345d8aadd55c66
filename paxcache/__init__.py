"""paxcache: paged KV caches (PagedAttention) for JAX research on TPU and GPU.

Host side (pure Python + NumPy, outside jit): :class:`BlockAllocator`.
Device side (immutable pytrees and pure functions): :class:`BlockTable`,
:class:`PagedKVCache` and the functions in :mod:`paxcache.cache`.
Model and serving: :mod:`paxcache.nn` (Flax NNX) and :mod:`paxcache.engine`.
Kernels live in the top-level :mod:`kernels` package.
"""

from paxcache import cache
from paxcache.allocator import (
  INVALID_BLOCK,
  AllocatorError,
  AllocatorMetrics,
  AppendResult,
  BatchAppendResult,
  BlockAllocator,
  OutOfBlocksError,
  SequenceError,
  SequenceView,
  block_hash,
)
from paxcache.block_table import BlockTable, bucket_size, build_slot_mapping
from paxcache.cache import HostKVPool, PagedKVCache

__version__ = "0.1.0"

__all__ = [
  "INVALID_BLOCK",
  "AllocatorError",
  "AllocatorMetrics",
  "AppendResult",
  "BatchAppendResult",
  "BlockAllocator",
  "BlockTable",
  "HostKVPool",
  "OutOfBlocksError",
  "PagedKVCache",
  "SequenceError",
  "SequenceView",
  "block_hash",
  "bucket_size",
  "build_slot_mapping",
  "cache",
]
