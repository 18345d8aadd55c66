"""Hand-worked unit tests of BlockPool: where a block goes when taken, shared and released."""

from __future__ import annotations

import numpy as np

from paxcache.block_pool import BlockPool
from paxcache.prefix_cache import PrefixCache, block_hash


def _pool(num_blocks=4):
  return BlockPool(num_blocks, PrefixCache(num_blocks, block_size=2))


def test_take_is_free_list_first_then_least_recently_released_cached():
  pool = _pool()
  assert [pool.take() for _ in range(4)] == [0, 1, 2, 3]
  assert pool.num_available == 0 and pool.num_used == 4
  k0, k2 = block_hash(None, [1, 2]), block_hash(None, [3, 4])
  pool.cache.register_all([k0, k2], [0, 2])
  # Released in this order: 2 and 0 hold entries (cached), 3 does not (free).
  pool.release([2, 3, 0])
  assert (pool.num_free, pool.cache.num_cached, pool.num_used) == (1, 2, 1)
  assert pool.num_available == 3
  # Free first (3), then evict the least recently released cached block (2), then 0.
  assert [pool.take() for _ in range(3)] == [3, 2, 0]
  assert pool.cache.num_evictions == 2 and pool.cache.num_entries == 0
  pool.check_invariants(np.array([1, 1, 1, 1]))


def test_fill_is_counted_for_used_blocks_only():
  pool = _pool()
  a, b = pool.take(), pool.take()
  pool.set_fill(a, 2)
  pool.set_fill(b, 1)
  pool.add_one_token(np.array([b]))
  assert pool.filled_slots == 4 and pool.fill.tolist()[:2] == [2, 2]
  pool.cache.register(block_hash(None, [1, 2]), a)
  pool.release([a])  # cached: its tokens stay in the block, but it is not used
  assert pool.filled_slots == 2
  pool.acquire(a)  # a prefix hit on the cached block
  assert pool.filled_slots == 4 and pool.ref[a] == 1 and pool.cache.num_cached == 0
  pool.check_invariants(np.array([1, 1, 0, 0]))


def test_copy_on_write_moves_one_reference_to_a_fresh_block():
  pool = _pool()
  src = pool.take()
  pool.set_fill(src, 1)
  pool.share(np.array([src]))  # a fork
  assert pool.ref[src] == 2 and pool.filled_slots == 1
  dst = pool.copy_on_write(src, 1)
  assert dst == 1 and pool.ref[src] == 1 and pool.ref[dst] == 1
  assert pool.fill[dst] == 1 and pool.filled_slots == 2
  pool.check_invariants(np.array([1, 1, 0, 0]))


def test_equality_compares_counts_free_order_and_cache():
  a, b = _pool(), _pool()
  assert a == b
  for pool, order in ((a, [0, 1]), (b, [1, 0])):
    assert [pool.take(), pool.take()] == [0, 1]
    pool.release(order)
  assert a != b  # same blocks free, in a different order


def test_bad_releases_takes_and_acquires_are_refused_and_change_nothing():
  import pytest

  pool = _pool()
  a, b = pool.take(), pool.take()
  pool.share(np.array([b]))  # b: two references
  before = (pool.ref.copy(), pool.fill.copy(), list(pool._free), pool.filled_slots)
  for bad, match in (
    ([a, a], "block 0 released 2 time"),  # a double free
    ([b, b, b], "block 1 released 3 time"),
    ([b, 2], "block 2 released 1 time.s. with 0"),  # never taken
    ([a, 7], "block 7 is outside"),
    ([-1], "block -1 is outside"),
  ):
    with pytest.raises(ValueError, match=match):
      pool.release(bad)
    after = (pool.ref.copy(), pool.fill.copy(), list(pool._free), pool.filled_slots)
    assert all(np.array_equal(x, y) for x, y in zip(before, after, strict=True)), bad
  pool.release([b, b])  # both references: a legal release of one block twice
  assert pool.ref.tolist() == [1, 0, 0, 0]
  with pytest.raises(ValueError, match="block 4 is outside"):
    pool.acquire(4)
  assert [pool.take() for _ in range(3)] == [2, 3, 1]
  with pytest.raises(ValueError, match="no block available"):
    pool.take()
  pool.check_invariants(np.array([1, 1, 1, 1]))
