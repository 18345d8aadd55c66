"""Block pool: reference counts, fill and the free list of one paged KV pool's device blocks.

Pure Python and NumPy, outside ``jit``. The pool knows blocks, not sequences: the allocator
(:class:`paxcache.allocator.BlockAllocator`) says which blocks a sequence takes, shares or lets
go of, and the pool keeps each block's reference count and fill and decides where a block goes
when its last reference does, with the prefix cache (:class:`paxcache.prefix_cache.PrefixCache`)
keeping unreferenced blocks that hold a cache entry.

A block is *used* (reference count > 0), *cached* (count 0, but it holds a prefix-cache entry,
so a later sequence may reuse it; evictable) or *free* (in the FIFO free list).
``used + cached + free == num_blocks`` always.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

import numpy as np

from paxcache.prefix_cache import PrefixCache


def _expect(condition, what) -> None:
  if not condition:
    raise AssertionError(f"block pool invariant broken: {what}")


class BlockPool:
  """Device blocks ``0 .. num_blocks - 1`` and where each one is.

  Args:
    num_blocks: blocks in the pool, all usable.
    cache: the prefix cache that keeps unreferenced blocks holding an entry (an empty one when
      prefix caching is off: then nothing is ever cached).

  ``ref`` and ``fill`` (``i32[num_blocks]``: references, and tokens held, which is meaningful
  for used blocks) are public for the allocator's vectorised reads; change them only through
  the methods, which keep ``filled_slots`` (tokens held by used blocks, a shared block counted
  once) right. Blocks are handed out from the free list first, lowest id first at the start;
  only when it is empty is the least recently released cached block evicted.

  Every method is O(blocks it is given); none scans the pool except :meth:`check_invariants`.
  """

  __slots__ = ("num_blocks", "cache", "ref", "fill", "filled_slots", "_free")

  def __init__(self, num_blocks: int, cache: PrefixCache):
    self.num_blocks = int(num_blocks)
    self.cache = cache
    self.ref = np.zeros(self.num_blocks, np.int32)
    self.fill = np.zeros(self.num_blocks, np.int32)
    self.filled_slots = 0
    self._free: collections.deque[int] = collections.deque(range(self.num_blocks))

  def __eq__(self, other) -> bool:
    """Same counts, fills, free-list order and cache (tests compare snapshots of state)."""
    if type(other) is not BlockPool:
      return NotImplemented
    return (
      self.num_blocks == other.num_blocks
      and self.filled_slots == other.filled_slots
      and np.array_equal(self.ref, other.ref)
      and np.array_equal(self.fill, other.fill)
      and self._free == other._free
      and self.cache == other.cache
    )

  __hash__ = None  # mutable

  # ------------------------------------------------------------------ counts

  @property
  def num_free(self) -> int:
    """Blocks in the free list (cached ones not counted)."""
    return len(self._free)

  @property
  def num_available(self) -> int:
    """Blocks :meth:`take` can hand out now: free plus evictable cached ones."""
    return len(self._free) + self.cache.num_cached

  @property
  def num_used(self) -> int:
    return self.num_blocks - len(self._free) - self.cache.num_cached

  # ------------------------------------------------------------------ changes

  def take(self) -> int:
    """A block for exclusive use (reference count 1, empty): free first, else evict LRU.

    The caller checks :attr:`num_available` first; with nothing available this raises
    ``ValueError`` (and changes nothing).
    """
    if not self._free and not self.cache.num_cached:
      raise ValueError(f"BlockPool.take: no block available (all {self.num_blocks} used)")
    b = self._free.popleft() if self._free else self.cache.evict()
    self.ref[b] = 1
    self.fill[b] = 0
    return b

  def acquire(self, block: int) -> None:
    """One more reference on a block that holds a cache entry, used or cached (a prefix hit).

    Raises:
      ValueError: a block id outside the pool.
    """
    if not 0 <= block < self.num_blocks:
      raise ValueError(f"BlockPool.acquire: block {block} is outside [0, {self.num_blocks})")
    if self.ref[block] == 0:
      self.cache.unpark(block)
      self.filled_slots += self.fill.item(block)
    self.ref[block] += 1

  def share(self, blocks: np.ndarray, counts: np.ndarray | int = 1) -> None:
    """``counts`` more references on each of ``blocks`` (distinct, used): a fork, or a
    group swapped in whose members share blocks again."""
    self.ref[blocks] += counts

  def release(self, blocks: Iterable[int]) -> None:
    """Drops one reference on each of ``blocks``, in the order given.

    A block whose count reaches 0 is parked in the prefix cache if it holds an entry (so, of
    one sequence's blocks, those released first are evicted first), else goes to the free list.

    Raises:
      ValueError: a block id outside the pool, or more releases of a block than it has
        references (a double free); checked before any count changes.
    """
    ref, fill, cache = self.ref, self.fill, self.cache
    blocks = list(blocks)
    for b, n in collections.Counter(blocks).items():
      if not 0 <= b < self.num_blocks:
        raise ValueError(f"BlockPool.release: block {b} is outside [0, {self.num_blocks})")
      if ref.item(b) < n:
        raise ValueError(
          f"BlockPool.release: block {b} released {n} time(s) with {ref.item(b)} reference(s) "
          "(a double free)"
        )
    for b in blocks:
      r = ref.item(b) - 1
      ref[b] = r
      if r == 0:
        self.filled_slots -= fill.item(b)
        if not cache.park(b):
          self._free.append(b)

  def copy_on_write(self, src: int, fill: int) -> int:
    """A fresh block to replace the shared block ``src`` in one holder's table.

    The new block holds ``fill`` tokens (the device copies them from ``src``); ``src`` loses
    that holder's reference and stays used by the others.
    """
    dst = self.take()
    self.ref[src] -= 1
    self.fill[dst] = fill
    self.filled_slots += fill
    return dst

  def set_fill(self, block: int, fill: int) -> None:
    """``block`` (used, written by one sequence only) now holds ``fill`` tokens."""
    self.filled_slots += fill - self.fill.item(block)
    self.fill[block] = fill

  def add_one_token(self, blocks: np.ndarray) -> None:
    """Each of ``blocks`` (distinct, used, each written by one sequence) holds one more token."""
    self.fill[blocks] += 1
    self.filled_slots += len(blocks)

  def check_invariants(self, owners: np.ndarray) -> None:
    """Full O(num_blocks) consistency check, the prefix cache's included.

    Args:
      owners: ``[num_blocks]`` how many resident sequences hold each block.

    Raises:
      AssertionError: naming the first broken invariant.
    """
    bad = np.flatnonzero(owners != self.ref)
    _expect(not bad.size, f"reference counts != owners for blocks {bad[:8].tolist()}")
    used = set(np.flatnonzero(owners).tolist())
    free, cached = set(self._free), set(self.cache.cached_blocks())
    _expect(len(free) == len(self._free), "a block is twice in the free list")
    _expect(not (free & cached), f"blocks both free and cached: {sorted(free & cached)[:8]}")
    _expect(not (free & used), f"blocks both free and used: {sorted(free & used)[:8]}")
    _expect(not (cached & used), f"blocks both cached and used: {sorted(cached & used)[:8]}")
    leaked = self.num_blocks - len(free) - len(cached) - len(used)
    _expect(leaked == 0, f"{leaked} blocks are neither used, cached nor free")
    filled = sum(self.fill.item(b) for b in used)
    _expect(filled == self.filled_slots, f"filled slots {self.filled_slots} != {filled}")
    self.cache.check_invariants(free)
