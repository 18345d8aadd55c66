"""Hand-worked unit tests of PrefixCache: keys, hits, LRU eviction order.

Keys are worked out from their definition (blake2b-256 of the parent key, or the root, followed
by the tokens as little-endian int64), written out here with hashlib and struct rather than with
the module's own helpers; one key is also pinned as a literal.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from paxcache.prefix_cache import PrefixCache, block_hash

ROOT = b"paxcache.prefix.root"


def key(parent: bytes | None, *tokens: int) -> bytes:
  data = (ROOT if parent is None else parent) + struct.pack(f"<{len(tokens)}q", *tokens)
  return hashlib.blake2b(data, digest_size=32).digest()


K12 = key(None, 1, 2)  # block [1, 2] starting a sequence
K12_34 = key(K12, 3, 4)  # block [3, 4] after it
K34 = key(None, 3, 4)  # block [3, 4] starting a sequence
K56 = key(None, 5, 6)


def test_key_format_is_pinned():
  # Changing the key format is a deliberate act: this literal is blake2b-256(root || 1 || 2).
  assert K12.hex() == "628c9bd6281843c810dcb13aeec29ee0a0274e8ebc4f09e1586872e772219bca"
  assert block_hash(None, [1, 2]) == block_hash(None, np.array([1, 2], np.int32)) == K12
  assert block_hash(K12, np.array([3, 4])) == K12_34


def test_hash_blocks_chains_each_row_from_its_parent():
  cache = PrefixCache(num_blocks=8, block_size=2)
  # One row of two blocks: the second key is chained from the first.
  assert cache.hash_blocks([None], [[1, 2, 3, 4]]) == [K12, K12_34]
  # The same block [3, 4] gets a different key after a different prefix, or none.
  assert K12_34 != K34 and cache.hash_blocks([None], [[3, 4]]) == [K34]
  # Several rows, one block each (a decode step), each chained from its own parent.
  assert cache.hash_blocks([None, K12, None], np.array([[1, 2], [3, 4], [5, 6]])) == [
    K12,
    K12_34,
    K56,
  ]
  # Several rows of two blocks: row-major.
  k78 = key(K56, 7, 8)
  assert cache.hash_blocks([None, None], [[1, 2, 3, 4], [5, 6, 7, 8]]) == [K12, K12_34, K56, k78]
  assert cache.hash_blocks([], np.zeros((0, 2), np.int64)) == []
  assert cache.hash_blocks([None], np.zeros((1, 0), np.int64)) == []


@pytest.mark.parametrize(
  "parents, tokens",
  [([None], [1, 2]), ([None], [[1, 2, 3]]), ([None, None], [[1, 2]])],
  ids=["1-D", "partial block", "rows != parents"],
)
def test_hash_blocks_rejects_a_bad_shape(parents, tokens):
  with pytest.raises(ValueError, match=r"tokens must be \[len\(parents\)"):
    PrefixCache(8, 2).hash_blocks(parents, tokens)


def test_match_prefix_stops_at_the_first_miss_and_counts_cached_hits():
  cache = PrefixCache(num_blocks=8, block_size=2)
  assert cache.register(K12, 5) and cache.register(K12_34, 3)
  k_miss = key(K12_34, 9, 9)
  assert cache.match_prefix([K12, K12_34, k_miss]) == ([5, 3], 0)
  # A leading run only: K12_34 is registered, but it follows a miss.
  assert cache.match_prefix([K34, K12_34]) == ([], 0)
  assert cache.match_prefix([]) == ([], 0)
  # Block 3 loses its last reference: still a hit, now one taken out of the evictable pool.
  assert cache.park(3)
  assert cache.match_prefix([K12, K12_34]) == ([5, 3], 1)
  cache.check_invariants()


def test_the_first_registration_of_a_key_wins():
  cache = PrefixCache(num_blocks=8, block_size=2)
  assert cache.register(K12, 5)
  assert not cache.register(K12, 7)  # an equal block computed again elsewhere
  assert cache.get(K12) == 5 and cache.key_of(5) == K12 and cache.key_of(7) is None
  # Block 7 holds no entry, so it is not kept once unreferenced.
  assert not cache.park(7) and cache.num_cached == 0
  cache.register_all([K34, K56, K12], [1, 2, 6])
  assert dict(cache.entries) == {K12: 5, K34: 1, K56: 2} and cache.num_entries == 3
  cache.check_invariants()


def test_eviction_is_least_recently_parked_first():
  cache = PrefixCache(num_blocks=8, block_size=2)
  cache.register_all([K12, K34, K56], [0, 1, 2])
  for b in (2, 0, 1):
    assert cache.park(b)
  assert list(cache.cached_blocks()) == [2, 0, 1] and cache.num_cached == 3
  # Block 0 is reused, then released again: it becomes the most recently parked.
  cache.unpark(0)
  assert cache.num_cached == 2
  cache.park(0)
  assert list(cache.cached_blocks()) == [2, 1, 0]
  assert cache.evict() == 2
  # Evicting drops the entry: its key misses, its block holds nothing.
  assert cache.get(K56) is None and cache.key_of(2) is None
  assert cache.match_prefix([K56]) == ([], 0)
  assert (cache.evict(), cache.evict()) == (1, 0)
  assert cache.num_evictions == 3 and cache.num_entries == 0 and cache.num_cached == 0
  cache.check_invariants()
  with pytest.raises(KeyError):
    cache.evict()
  # An evicted block can hold a new entry.
  assert cache.register(K12_34, 2) and cache.get(K12_34) == 2


def test_check_invariants_names_a_free_block_that_holds_an_entry():
  cache = PrefixCache(num_blocks=8, block_size=2)
  cache.register(K12, 4)
  cache.check_invariants(free_blocks={3})
  with pytest.raises(AssertionError, match="free block 4 is still in the prefix cache"):
    cache.check_invariants(free_blocks={4})


def test_equality_compares_entries_lru_order_and_totals():
  a, b = PrefixCache(4, 2), PrefixCache(4, 2)
  for cache in (a, b):
    cache.register_all([K12, K34], [0, 1])
  for block in (0, 1):
    a.park(block)
  for block in (1, 0):
    b.park(block)
  assert a != b  # same entries, different eviction order
  b.unpark(1)
  b.park(1)
  assert a == b
  assert a.evict() == b.evict() == 0
  assert a == b
