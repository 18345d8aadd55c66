"""Prefix cache: chained block hashes, the ``hash -> block`` map, LRU eviction of unused entries.

Pure Python and NumPy, outside ``jit``; one of the three host-side pieces of the allocator:

- :class:`PrefixCache` (this module): what a full block's key is, which device block holds each
  key, and in which order unreferenced ones are evicted;
- :class:`paxcache.block_pool.BlockPool`: reference counts, fill, the free list;
- :class:`paxcache.allocator.BlockAllocator`: sequences (block tables, copy-on-write, host swap),
  built on the other two.

The cache knows nothing of sequences or reference counts. The pool tells it when a registered
block loses its last reference (:meth:`PrefixCache.park`: the entry becomes *cached*, i.e.
evictable) and when a cached one is referenced again (:meth:`PrefixCache.unpark`), and asks it
for a block to reuse when the free list is empty (:meth:`PrefixCache.evict`, least recently
parked first).

A full block's key is blake2b-256 over its parent block's key (a fixed root for a sequence's
first block) followed by its token ids as little-endian int64: a hash of the whole prefix up to
and including the block, not of the block alone. :func:`block_hash` and
:meth:`PrefixCache.hash_blocks` compute it through one function, so every caller (prompts,
appends, tokens resolved later) keys the same tokens the same way.
"""

from __future__ import annotations

import collections
import hashlib
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

_HASH_BYTES = 32  # blake2b-256: collisions are not a practical concern.
_ROOT_HASH = b"paxcache.prefix.root"  # the parent of a sequence's first block
_TOKEN_BYTES = 8  # tokens are hashed as little-endian int64

_blake2b = hashlib.blake2b


def _expect(condition, what) -> None:
  if not condition:
    raise AssertionError(f"prefix cache invariant broken: {what}")


def _digest(parent: bytes | None, data: bytes) -> bytes:
  """The key of one block: blake2b-256 of ``parent`` (or the root) followed by ``data``.

  The only place a key is computed. One call over the joined bytes is the same hash as feeding
  the parent and then the tokens, and cheaper.
  """
  return _blake2b(
    (_ROOT_HASH if parent is None else parent) + data, digest_size=_HASH_BYTES
  ).digest()


def _token_bytes(tokens) -> bytes:
  return np.ascontiguousarray(tokens, dtype="<i8").tobytes()


def block_hash(parent: bytes | None, tokens: Sequence[int] | np.ndarray) -> bytes:
  """Chained key of one full block: blake2b-256 over the parent block's key and its token ids.

  Args:
    parent: key of the previous block of the sequence, ``None`` for the first block.
    tokens: ``[block_size]`` integer token ids.
  """
  return _digest(parent, _token_bytes(tokens))


class PrefixCache:
  """Map from chained block keys to device blocks, with LRU order over unreferenced entries.

  Args:
    num_blocks: device blocks in the pool (ids ``0 .. num_blocks - 1``).
    block_size: tokens per block (what :meth:`hash_blocks` cuts token runs into).

  An entry ``key -> block`` is *registered* when a block fills (:meth:`register`); while some
  sequence references the block it is only looked up, and once the last reference goes the
  pool *parks* it: the entry stays (a later prompt or swap-in may reuse the block) and joins
  the LRU order. :meth:`evict` drops the least recently parked entry and hands its block back
  for reuse. A block holds at most one entry and a key names at most one block; the first
  registration of a key wins.

  Every method is O(1), except :meth:`hash_blocks` (O(tokens)) and the matches (O(keys)).
  """

  __slots__ = (
    "block_size",
    "num_evictions",
    "_block_bytes",
    "_block_of_hash",
    "_hash_of_block",
    "_lru",
  )

  def __init__(self, num_blocks: int, block_size: int):
    self.block_size = int(block_size)
    self.num_evictions = 0  # running total, reported by the allocator's metrics
    self._block_bytes = self.block_size * _TOKEN_BYTES
    self._block_of_hash: dict[bytes, int] = {}
    self._hash_of_block: list[bytes | None] = [None] * int(num_blocks)
    # Parked (unreferenced, evictable) blocks, least recently parked first.
    self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()

  def __eq__(self, other) -> bool:
    """Same entries, same LRU order, same totals (tests compare snapshots of allocator state)."""
    if type(other) is not PrefixCache:
      return NotImplemented
    return (
      self.block_size == other.block_size
      and self.num_evictions == other.num_evictions
      and self._block_of_hash == other._block_of_hash
      and self._hash_of_block == other._hash_of_block
      and self._lru == other._lru  # OrderedDict equality is order-sensitive
    )

  __hash__ = None  # mutable

  # ------------------------------------------------------------------ keys

  def hash_blocks(
    self, parents: Sequence[bytes | None], tokens: Sequence[Sequence[int]] | np.ndarray
  ) -> list[bytes]:
    """Keys of whole blocks of several sequences at once, each chained from its own parent.

    Args:
      parents: for each row of ``tokens``, the key of the block before it (``None``: the row
        starts its sequence).
      tokens: ``[len(parents), m * block_size]`` token ids; row ``i`` continues sequence ``i``
        from a block boundary with ``m`` whole blocks.

    Returns:
      ``len(parents) * m`` keys, row by row: key ``i * m + j`` is that of block ``j`` of row
      ``i``, and the parent of key ``i * m + j + 1``.

    Raises:
      ValueError: ``tokens`` is not ``[len(parents), m * block_size]``.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or len(tokens) != len(parents) or tokens.shape[1] % self.block_size:
      raise ValueError(
        f"tokens must be [len(parents)={len(parents)}, m * block_size={self.block_size}], "
        f"got shape {tokens.shape}"
      )
    m = tokens.shape[1] // self.block_size
    data = _token_bytes(tokens)  # one conversion for every block of every row
    step = self._block_bytes
    keys: list[bytes] = []
    if m == 1:  # one block per row: a decode step
      for i, parent in enumerate(parents):
        keys.append(_digest(parent, data[i * step : (i + 1) * step]))
      return keys
    for i, start in enumerate(range(0, len(data), step)):
      keys.append(_digest(parents[i // m] if i % m == 0 else keys[-1], data[start : start + step]))
    return keys

  # ------------------------------------------------------------------ lookups

  @property
  def num_entries(self) -> int:
    return len(self._block_of_hash)

  @property
  def num_cached(self) -> int:
    """Parked entries: blocks no sequence references, reusable until evicted."""
    return len(self._lru)

  @property
  def entries(self) -> Mapping[bytes, int]:
    """Read-only live view of the ``key -> block`` map."""
    return types.MappingProxyType(self._block_of_hash)

  def cached_blocks(self) -> Iterator[int]:
    """Parked blocks, least recently parked (next to be evicted) first."""
    return iter(list(self._lru))

  def get(self, key: bytes) -> int | None:
    """The block registered under ``key``, or ``None``."""
    return self._block_of_hash.get(key)

  def key_of(self, block: int) -> bytes | None:
    """The key ``block`` is registered under, or ``None``."""
    return self._hash_of_block[block]

  def is_cached(self, block: int) -> bool:
    return block in self._lru

  def match_prefix(self, keys: Sequence[bytes]) -> tuple[list[int], int]:
    """Blocks of the longest leading run of ``keys`` that are registered, and how many of
    those blocks are parked (taking them removes them from the evictable pool)."""
    get = self._block_of_hash.get
    blocks: list[int] = []
    for key in keys:
      b = get(key)
      if b is None:
        break
      blocks.append(b)
    return blocks, sum(b in self._lru for b in blocks)

  # ------------------------------------------------------------------ updates

  def register_all(self, keys: Iterable[bytes], blocks: Iterable[int]) -> None:
    """:meth:`register` of each ``keys[i] -> blocks[i]``, in order."""
    block_of_hash, hash_of_block = self._block_of_hash, self._hash_of_block
    for key, block in zip(keys, blocks, strict=True):
      if key not in block_of_hash:
        block_of_hash[key] = block
        hash_of_block[block] = key

  def register(self, key: bytes, block: int) -> bool:
    """Enters ``key -> block``, unless ``key`` is already registered (then returns ``False``).

    An equal block computed independently (two forks writing the same tokens) keeps the first
    registration; the duplicate stays an ordinary block. ``block`` must hold no entry yet.
    """
    if key in self._block_of_hash:
      return False
    self._block_of_hash[key] = block
    self._hash_of_block[block] = key
    return True

  def park(self, block: int) -> bool:
    """``block`` lost its last reference: if it holds an entry, keep it as the most recently
    used cached block and return ``True``; else return ``False`` (the caller frees it)."""
    if self._hash_of_block[block] is None:
      return False
    self._lru[block] = None
    return True

  def unpark(self, block: int) -> None:
    """A parked ``block`` is referenced again: it is no longer evictable."""
    del self._lru[block]

  def evict(self) -> int:
    """Drops the least recently parked entry and returns its block (now holding nothing).

    Raises:
      KeyError: nothing is parked.
    """
    block, _ = self._lru.popitem(last=False)
    del self._block_of_hash[self._hash_of_block[block]]
    self._hash_of_block[block] = None
    self.num_evictions += 1
    return block

  def check_invariants(self, free_blocks: set[int] = frozenset()) -> None:
    """O(num_blocks) consistency check; ``free_blocks`` (the pool's free list) holds no entry.

    Raises:
      AssertionError: naming the first broken invariant.
    """
    for b in self._lru:
      key = self._hash_of_block[b]
      _expect(key is not None, f"cached block {b} has no entry")
      _expect(self._block_of_hash.get(key) == b, f"cached block {b}: its entry points elsewhere")
    for key, b in self._block_of_hash.items():
      _expect(self._hash_of_block[b] == key, f"entry for block {b} disagrees")
      _expect(b not in free_blocks, f"free block {b} is still in the prefix cache")
    keyed = sum(key is not None for key in self._hash_of_block)
    _expect(
      keyed == len(self._block_of_hash), f"{keyed} keyed blocks != {self.num_entries} entries"
    )
