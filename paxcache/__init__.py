"""paxcache: paged KV caches (PagedAttention) for JAX research on TPU and GPU.

Host side (pure Python + NumPy, outside jit): :class:`BlockAllocator`.
Device side (immutable pytrees and pure functions): :class:`BlockTable`,
:class:`PagedKVCache` and the functions in :mod:`paxcache.cache`.
Model and serving: :mod:`paxcache.nn` (Flax NNX) and :mod:`paxcache.engine`.
Kernels live in the top-level :mod:`kernels` package.

The allocator's names are imported eagerly; the device-side ones load JAX and Flax, so
they are imported on first use (``import paxcache.allocator`` stays JAX-free).
"""

import importlib

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

__version__ = "0.1.0"

_LAZY = {
  "BlockTable": "paxcache.block_table",
  "bucket_size": "paxcache.block_table",
  "build_slot_mapping": "paxcache.block_table",
  "HostKVPool": "paxcache.cache",
  "PagedKVCache": "paxcache.cache",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  if name == "cache":
    return importlib.import_module("paxcache.cache")
  raise AttributeError(f"module 'paxcache' has no attribute {name!r}")


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
