"""Hand-worked unit tests of BlockAllocator: every expected value below is worked out by hand.

Blocks are handed out from a FIFO free list starting at block 0, so the ids are predictable.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import kernels
from paxcache import allocator as allocator_lib
from paxcache.allocator import BlockAllocator, OutOfBlocksError, SequenceError, block_hash


def _same_state(a, b):
  """Deep equality of two ``vars(allocator)`` snapshots (arrays compared exactly).

  ``_memo_*`` attributes are skipped: look-up memos (the rows of the last batch of ids, for
  the allocator's current sequences) that a call failing after its look-ups may fill; they
  hold no state and change no result."""
  assert a.keys() == b.keys()
  for key in a:
    if key.startswith("_memo_"):
      continue
    x, y = a[key], b[key]
    if isinstance(x, np.ndarray):
      assert np.array_equal(x, y) and x.dtype == y.dtype, key
    elif key == "_seqs":
      assert list(x) == list(y), key
      for s in x:
        for name in allocator_lib._Seq.__slots__:
          assert getattr(x[s], name) == getattr(y[s], name), (key, s, name)
    else:
      assert type(x) is type(y) and x == y, key


def test_sentinel_matches_kernels():
  assert allocator_lib.INVALID_BLOCK == kernels.INVALID_BLOCK == kernels.INVALID_SLOT == -1


def test_add_append_allocates_a_block_only_when_the_last_is_full():
  a = BlockAllocator(8, 4)
  assert a.add_sequence("s", [1, 2, 3, 4, 5, 6]) == 0
  view = a.sequence("s")
  assert view.block_ids.tolist() == [0, 1] and view.num_tokens == 6
  # Slots are block_id * block_size + offset.
  assert a.slots("s", 0, 6).tolist() == [0, 1, 2, 3, 4, 5]
  assert a.slots("s", 4, 6).tolist() == [4, 5]
  res = a.append_tokens("s", [7, 8])
  assert res.slots.tolist() == [6, 7] and res.cow is None
  assert a.sequence("s").block_ids.tolist() == [0, 1]
  res = a.append_tokens("s", [9])
  assert res.slots.tolist() == [8] and res.cow is None
  assert a.sequence("s").block_ids.tolist() == [0, 1, 2]
  assert a.num_free_blocks == 5
  res = a.append_batch(["s"], [10])
  assert res.slots.tolist() == [9] and res.cow_pairs.shape == (0, 2)


def test_fork_then_append_returns_a_copy_on_write_pair():
  a = BlockAllocator(8, 4)
  a.add_sequence(0, [1, 2, 3, 4, 5, 6])  # blocks [0, 1]; block 1 holds 2 tokens
  a.fork(0, 1)
  assert a.ref_count(0) == a.ref_count(1) == 2
  assert a.num_free_blocks == 6  # a fork takes no block
  res = a.append_tokens(1, [7])
  # The child gets block 2, a copy of block 1, and writes offset 2 of it.
  assert res.cow == (1, 2) and res.slots.tolist() == [2 * 4 + 2]
  assert a.sequence(1).block_ids.tolist() == [0, 2]
  assert a.sequence(0).block_ids.tolist() == [0, 1]  # the parent's table is untouched
  assert (a.ref_count(0), a.ref_count(1), a.ref_count(2)) == (2, 1, 1)
  # Block 1 is now the parent's alone: no copy, it writes in place.
  res = a.append_tokens(0, [8])
  assert res.cow is None and res.slots.tolist() == [1 * 4 + 2]
  assert a.metrics().num_cow_copies == 1


def test_fork_full_last_block_needs_no_copy():
  a = BlockAllocator(8, 2)
  a.add_sequence(0, [1, 2, 3, 4])  # blocks [0, 1], both full
  a.fork(0, 1)
  res = a.append_tokens(1, [5])
  assert res.cow is None and res.slots.tolist() == [2 * 2]
  assert a.sequence(0).block_ids.tolist() == [0, 1]
  assert a.sequence(1).block_ids.tolist() == [0, 1, 2]


def test_batch_append_when_every_sharer_writes_copies_all_but_the_last():
  a = BlockAllocator(8, 4)
  a.add_sequence(0, [1, 2, 3])  # block 0 holds 3 tokens
  a.fork(0, 1)
  a.fork(0, 2)
  assert a.blocks_needed_to_append([0, 1, 2]) == 2
  res = a.append_batch([0, 1, 2], [7, 8, 9])
  # Sequences 0 and 1 copy block 0 to blocks 1 and 2; sequence 2, the last holder, keeps it.
  assert res.cow_pairs.tolist() == [[0, 1], [0, 2]]
  assert res.slots.tolist() == [1 * 4 + 3, 2 * 4 + 3, 0 * 4 + 3]
  assert [a.sequence(s).block_ids.tolist() for s in range(3)] == [[1], [2], [0]]
  assert [a.ref_count(b) for b in range(3)] == [1, 1, 1]
  a.check_invariants()


def test_prefix_hits_count_full_blocks_of_the_longest_cached_prefix():
  a = BlockAllocator(32, 4)
  assert a.add_sequence("a", list(range(10))) == 0  # full blocks [0..3], [4..7] are cached
  assert a.num_cached_tokens(list(range(8)) + [99]) == 8
  assert a.add_sequence("b", list(range(8)) + [99]) == 8
  assert a.sequence("b").block_ids.tolist()[:2] == a.sequence("a").block_ids.tolist()[:2]
  assert a.ref_count(int(a.sequence("a").block_ids[0])) == 2
  # The second block differs in its last token: only the first block hits.
  assert a.add_sequence("c", [0, 1, 2, 3, 4, 5, 6, 99, 1]) == 4
  # The same tokens at another position do not hit: the hash chains over the prefix.
  assert a.add_sequence("d", [4, 5, 6, 7, 1]) == 0
  # A prompt shorter than one block hits nothing.
  assert a.add_sequence("e", [0, 1, 2]) == 0
  m = a.metrics()
  assert m.prefix_hit_tokens == 12 and m.prefix_query_tokens == 10 + 9 + 9 + 5 + 3


def test_fully_cached_prompt_still_leaves_its_last_token_to_compute():
  a = BlockAllocator(16, 4)
  a.add_sequence("a", list(range(8)))
  # All 8 tokens are cached, but the hit stops at (8 - 1) // 4 = 1 block: the engine must
  # compute token 7 (it needs its logits), and it may not write into a shared cached block.
  assert a.add_sequence("b", list(range(8))) == 4
  ids_a, ids_b = a.sequence("a").block_ids, a.sequence("b").block_ids
  assert ids_b[0] == ids_a[0] and ids_b[1] != ids_a[1]
  assert a.slots("b", 4, 8).tolist() == [int(ids_b[1]) * 4 + i for i in range(4)]
  assert a.ref_count(int(ids_b[1])) == 1
  # 9 tokens: two full cached blocks hit and only token 8 is computed.
  assert a.add_sequence("c", list(range(9))) == 8


def test_prefix_hits_on_generated_blocks():
  a = BlockAllocator(16, 2)
  a.add_sequence("a", [1, 2, 3])
  a.append_tokens("a", [4])
  a.append_batch(["a"], [5])
  a.append_batch(["a"], [6])  # blocks [1, 2], [3, 4], [5, 6] are full and hashed
  assert a.add_sequence("b", [1, 2, 3, 4, 5, 6, 7]) == 6
  assert a.sequence("b").block_ids.tolist()[:3] == a.sequence("a").block_ids.tolist()


def test_freed_prefix_blocks_stay_cached_and_are_evicted_lru_first():
  a = BlockAllocator(4, 2)
  a.add_sequence("a", [1, 2, 3, 4, 5])  # blocks [0, 1, 2]; 0 and 1 full and hashed
  a.free("a")
  # Released last block first: 2 (not hashed) is free; 1 then 0 become cached, so 1 is the
  # least recently used and goes first.
  m = a.metrics()
  assert (m.num_used_blocks, m.num_free_blocks, m.num_cached_blocks) == (0, 2, 2)
  assert a.num_free_blocks == 4
  # Free blocks are taken before cached ones are evicted: 3, 2, then evict 1.
  a.add_sequence("b", [9, 9, 9, 9, 9, 9])
  assert a.sequence("b").block_ids.tolist() == [3, 2, 1]
  assert a.metrics().num_evictions == 1
  # Block 0 still holds [1, 2]; the evicted block 1 held [3, 4].
  assert a.num_cached_tokens([1, 2, 3, 4, 5]) == 2
  a.free("b")
  # b's three blocks are all full and hashed; released 1, 2, 3 after 0 was: LRU is 0, 1, 2, 3.
  m = a.metrics()
  assert (m.num_free_blocks, m.num_cached_blocks) == (0, 4)
  a.add_sequence("c", [8, 8, 8, 8, 8, 8, 8, 8])
  assert a.sequence("c").block_ids.tolist() == [0, 1, 2, 3]
  assert a.metrics().num_evictions == 5
  assert a.num_cached_tokens([1, 2, 3]) == 0


def test_lru_recency_follows_release_order():
  a = BlockAllocator(4, 1)
  a.add_sequence("x", [1, 1])  # block 0 ([1] at position 0) hashed; block 1 too
  a.add_sequence("y", [7, 7])  # blocks 2, 3
  a.free("y")  # 3 then 2 cached
  a.free("x")  # 1 then 0 cached: LRU order is now 3, 2, 1, 0
  a.add_sequence("z", [5, 5, 5])  # evicts 3, 2, 1
  assert a.sequence("z").block_ids.tolist() == [3, 2, 1]
  assert a.num_cached_tokens([1, 1]) == 1  # block 0 survived
  assert a.num_cached_tokens([7, 7]) == 0


def test_prefix_caching_disabled_never_hits_and_frees_to_the_free_list():
  a = BlockAllocator(8, 2, enable_prefix_caching=False)
  a.add_sequence("a", [1, 2, 3, 4])
  assert a.add_sequence("b", [1, 2, 3, 4, 5]) == 0
  a.free("a")
  assert a.metrics().num_cached_blocks == 0 and a.num_free_blocks == 5


def test_waste_by_hand():
  a = BlockAllocator(10, 4, max_seq_len=16)
  a.add_sequence("a", [1, 2, 3, 4, 5])  # 2 blocks holding 4 + 1 tokens
  a.add_sequence("b", [6, 7])  # 1 block holding 2 tokens
  m = a.metrics()
  assert (m.reserved_slots, m.filled_slots) == (12, 7)
  assert m.waste == pytest.approx(5 / 12)
  # Contiguous: 2 requests x 16 slots reserved, 7 tokens held.
  assert (m.contiguous_reserved_slots, m.num_tokens) == (32, 7)
  assert m.contiguous_waste == pytest.approx(25 / 32)
  a.fork("a", "c")  # shares 2 blocks: paged unchanged, contiguous reserves 16 more for 5 tokens
  m = a.metrics()
  assert m.waste == pytest.approx(5 / 12)
  assert m.contiguous_waste == pytest.approx(1 - 12 / 48)
  assert a.metrics(max_seq_len=64).contiguous_waste == pytest.approx(1 - 12 / 192)
  a.append_tokens("c", [8])  # copy of block 1 (1 token) plus the new one: 4 blocks, 9 tokens
  m = a.metrics()
  assert (m.reserved_slots, m.filled_slots) == (16, 9)
  assert m.waste == pytest.approx(7 / 16)
  for s in ("a", "b", "c"):
    a.free(s)
  m = a.metrics()
  assert (m.waste, m.contiguous_waste, m.reserved_slots) == (0.0, 0.0, 0)


def test_swap_out_and_in_returns_pairs_and_reuses_cached_blocks():
  a = BlockAllocator(6, 2, num_host_blocks=4)
  a.add_sequence("a", [1, 2, 3])  # blocks [0, 1]; block 0 full and hashed
  a.add_sequence("b", [1, 2, 9])  # hits block 0; own block 2
  assert a.can_swap_out("a")
  pairs = a.swap_out("a")
  assert pairs.tolist() == [[0, 0], [1, 1]]  # (device, host); shared block 0 copied too
  assert a.is_swapped("a") and a.sequence("a").host_block_ids.tolist() == [0, 1]
  assert a.sequence("a").block_ids.size == 0
  assert a.ref_count(0) == 1 and a.ref_count(1) == 0
  assert a.metrics().num_host_used_blocks == 2
  assert a.blocks_needed_to_swap_in("a") == 1
  pairs = a.swap_in("a")
  # Block 0 is still on device (b holds it) and in the prefix cache: no copy, only host 1.
  assert pairs.tolist() == [[1, 3]]
  assert a.sequence("a").block_ids.tolist() == [0, 3]
  assert a.ref_count(0) == 2
  assert a.metrics().num_host_free_blocks == 4
  assert a.append_tokens("a", [4]).slots.tolist() == [3 * 2 + 1]


def test_swap_in_copies_are_entered_in_the_prefix_cache():
  a = BlockAllocator(4, 2, num_host_blocks=4)
  a.add_sequence("a", [1, 2, 3, 4, 5])  # blocks 0, 1, 2; 0 and 1 hashed
  a.swap_out("a")  # 2 -> free; 1, 0 -> cached
  a.add_sequence("b", [9] * 8)  # takes 3, 2, evicts 1, 0: a's prefix is gone from device
  a.free("b")  # all four blocks hashed: cached in order 0, 1, 2, 3
  assert a.num_cached_tokens([1, 2, 3, 4, 7]) == 0
  assert a.swap_in("a").tolist() == [[0, 0], [1, 1], [2, 2]]
  # The fresh copies of a's two full blocks are cache entries again.
  assert a.add_sequence("c", [1, 2, 3, 4, 7]) == 4
  assert a.sequence("c").block_ids.tolist()[:2] == [0, 1]


def test_swap_without_prefix_caching_copies_every_block_back():
  a = BlockAllocator(4, 2, num_host_blocks=2, enable_prefix_caching=False)
  a.add_sequence("a", [1, 2, 3])
  assert a.swap_out("a").tolist() == [[0, 0], [1, 1]]
  assert a.swap_in("a").tolist() == [[0, 2], [1, 3]]


def _forked_three(num_host_blocks):
  """a, b, c forked from one 6-token prompt (blocks of 4); c has written one own token.

  a, b: blocks [0, 1] (1 partly filled, shared); c: [0, 2] (its copy of block 1)."""
  a = BlockAllocator(8, 4, num_host_blocks=num_host_blocks, enable_prefix_caching=False)
  a.add_sequence("a", [1, 2, 3, 4, 5, 6])
  a.fork("a", "b")
  a.fork("a", "c")
  assert a.append_tokens("c", [7]).cow == (1, 2)
  return a


def test_a_group_swaps_out_and_in_with_its_blocks_shared():
  # Three host blocks where swapping each sequence alone takes six (and the pool of three
  # would be out of blocks at the second); the sharing comes back on the device.
  a = _forked_three(num_host_blocks=3)
  assert [a.host_blocks_needed_to_swap_out([s]) for s in "abc"] == [2, 2, 2]
  assert a.host_blocks_needed_to_swap_out(["a", "b", "c"]) == 3
  pairs = a.swap_out_group(["a", "b", "c"])
  assert pairs.tolist() == [[0, 0], [1, 1], [2, 2]]  # (device, host), each block once
  assert [a.sequence(s).host_block_ids.tolist() for s in "abc"] == [[0, 1], [0, 1], [0, 2]]
  m = a.metrics()
  assert (m.num_host_used_blocks, m.num_swapped_sequences, m.num_swapped_out_blocks) == (3, 3, 3)
  assert a.num_free_blocks == 8 and [a.ref_count(b) for b in range(3)] == [0, 0, 0]
  a.check_invariants()
  # Released last block first, row by row: 1 and 2 reach 0 before 0 does.
  # Free list [3, 4, 5, 6, 7, 1, 2, 0]: one fresh block per host block.
  assert a.blocks_needed_to_swap_in_group(["a", "b", "c"]) == 3
  assert a.swap_in_group(["a", "b", "c"]).tolist() == [[0, 3], [1, 4], [2, 5]]
  assert [a.sequence(s).block_ids.tolist() for s in "abc"] == [[3, 4], [3, 4], [3, 5]]
  assert [a.ref_count(b) for b in (3, 4, 5)] == [3, 2, 1]
  assert a.metrics().num_host_free_blocks == 3 and a.metrics().num_swapped_in_blocks == 3
  # b's next token copies the block it shares with a again, as before the swap.
  assert a.append_tokens("b", [8]).cow == (4, 6)
  a.check_invariants()


def test_a_host_block_named_by_several_sequences_is_freed_with_the_last():
  a = _forked_three(num_host_blocks=8)
  a.swap_out_group(["a", "b", "c"])
  a.free("a")
  assert a.num_free_host_blocks == 5  # b and c still name host blocks 0, 1, 2
  a.free("b")
  assert a.num_free_host_blocks == 6  # host block 1 had only a and b
  a.check_invariants()
  # c alone: its own copy of every block; host blocks 0 and 2 go with it.
  assert a.swap_in("c").tolist() == [[0, 3], [2, 4]]
  assert a.sequence("c").block_ids.tolist() == [3, 4] and a.num_free_host_blocks == 8
  a.check_invariants()


def test_a_group_swap_in_shares_blocks_of_one_hash_that_came_from_two():
  # a and b write the same two tokens into blocks of their own (the second registration of
  # the key is ignored); once the cache has evicted both, a swap-in of the pair brings the
  # two host copies back as one device block.
  a = BlockAllocator(6, 2, num_host_blocks=6)
  a.add_sequence("a", [1, 2])  # block 0, full
  a.fork("a", "b")
  a.append_tokens("a", [3, 4])  # block 1
  a.append_tokens("b", [3, 4])  # block 2, same key as block 1
  assert a.swap_out_group(["a", "b"]).tolist() == [[0, 0], [1, 1], [2, 2]]
  a.add_sequence("x", [9] * 12)  # every block, evicting 1 and 0: the keys are gone
  a.free("x")
  assert a.num_cached_tokens([1, 2, 3, 4, 5]) == 0
  assert a.blocks_needed_to_swap_in_group(["a", "b"]) == 2
  pairs = a.swap_in_group(["a", "b"])
  assert pairs[:, 0].tolist() == [0, 1]  # host block 2 is host block 1's tokens: no copy
  assert a.sequence("a").block_ids.tolist() == a.sequence("b").block_ids.tolist()
  assert a.sequence("a").block_ids.tolist() == pairs[:, 1].tolist()
  assert [a.ref_count(int(b)) for b in pairs[:, 1]] == [2, 2]
  assert a.metrics().num_host_free_blocks == 6
  a.check_invariants()


@pytest.mark.parametrize(
  "call,error,match",
  [
    (lambda a: a.swap_out_group(["a", "a"]), SequenceError, r"repeated in the group: \['a'\]"),
    (lambda a: a.swap_out_group(["a", "nope"]), SequenceError, "'nope'.*unknown"),
    (
      lambda a: a.swap_out_group(["a", "b", "c"]),
      OutOfBlocksError,
      r"swap out sequences 'a', 'b', 'c': needs 3 host blocks, 2 free",
    ),
    (lambda a: a.swap_in_group(["a", "b"]), SequenceError, "'a'.*not swapped out"),
    (lambda a: a.blocks_needed_to_swap_in_group(["b"]), SequenceError, "'b'.*not swapped out"),
    (lambda a: a.host_blocks_needed_to_swap_out(["b", "b"]), SequenceError, "repeated"),
  ],
)
def test_group_swap_errors_leave_everything_unchanged(call, error, match):
  a = _forked_three(num_host_blocks=2)
  before = copy.deepcopy(vars(a))
  with pytest.raises(error, match=match):
    call(a)
  _same_state(before, vars(a))
  a.check_invariants()


def test_a_group_swap_in_out_of_device_blocks_leaves_everything_unchanged():
  a = _forked_three(num_host_blocks=8)
  a.swap_out_group(["a", "b", "c"])
  a.add_sequence("x", list(range(100, 124)))  # 6 of the 8 blocks
  assert a.blocks_needed_to_swap_in_group(["a", "b", "c"]) == 3 > a.num_free_blocks
  before = copy.deepcopy(vars(a))
  with pytest.raises(OutOfBlocksError, match=r"swap in sequences 'a', 'b', 'c' \(3 host blocks\)"):
    a.swap_in_group(["a", "b", "c"])
  _same_state(before, vars(a))
  # One pending token in the group: nothing of the group moves.
  a.free("x")
  a.swap_in_group(["a", "b", "c"])
  a.append_batch(["a"], [allocator_lib.PENDING_TOKEN])
  before = copy.deepcopy(vars(a))
  with pytest.raises(SequenceError, match="'a'.*still pending"):
    a.swap_out_group(["b", "c", "a"])
  _same_state(before, vars(a))


def test_freeing_a_swapped_sequence_frees_its_host_blocks():
  a = BlockAllocator(4, 2, num_host_blocks=2)
  a.add_sequence("a", [1, 2, 3])
  a.swap_out("a")
  a.free("a")
  m = a.metrics()
  assert m.num_host_free_blocks == 2 and m.num_swapped_sequences == 0 and m.num_sequences == 0
  a.check_invariants()


@pytest.mark.parametrize(
  "call",
  [
    lambda a: a.add_sequence("new", list(range(9))),
    lambda a: a.append_tokens("a", [1, 2, 3, 4, 5, 6]),
    lambda a: a.append_batch(["a", "b", "f"], [1, 1, 1]),
    lambda a: a.swap_in("s"),
  ],
)
def test_out_of_blocks_leaves_everything_unchanged(call):
  a = BlockAllocator(6, 2, num_host_blocks=3)
  a.add_sequence("a", [1, 2, 3])  # blocks 0, 1
  a.add_sequence("b", [4, 5])  # block 2
  a.fork("b", "f")
  a.add_sequence("s", [6, 7, 8, 9, 10])  # blocks 3, 4, 5
  a.swap_out("s")
  # s's blocks went 5 -> free, 4 and 3 (hashed) -> cached. c hits block 0, takes 5, evicts 4.
  a.add_sequence("c", [1, 2, 3, 4, 5, 6])
  # Left: block 3, cached. swap_in("s") can reuse it but needs 2 more.
  assert a.num_free_blocks == 1
  before = copy.deepcopy(vars(a))
  with pytest.raises(OutOfBlocksError) as info:
    call(a)
  assert info.value.pool == "device" and info.value.available == 1
  assert info.value.needed > 1
  assert "device blocks" in str(info.value)
  # The one available block is the cached one: the message splits the count the way
  # num_free_blocks adds it up.
  assert "1 available (0 unused + 1 cached, evictable" in str(info.value)
  _same_state(before, vars(a))
  a.check_invariants()


def test_out_of_host_blocks_leaves_everything_unchanged():
  a = BlockAllocator(8, 2, num_host_blocks=1)
  a.add_sequence("a", [1, 2, 3])
  before = copy.deepcopy(vars(a))
  assert not a.can_swap_out("a")
  with pytest.raises(OutOfBlocksError, match="'a'.*2 host blocks, 1 free") as info:
    a.swap_out("a")
  assert (info.value.pool, info.value.needed, info.value.available) == ("host", 2, 1)
  _same_state(before, vars(a))


def test_admission_queries_match_what_add_takes():
  a = BlockAllocator(5, 2)
  a.add_sequence("a", [1, 2, 3, 4, 5])  # 3 blocks; two hashed
  a.free("a")  # 2 cached + 3 free
  prompt = [1, 2, 3, 4, 9, 9, 9, 9, 9, 9]  # 5 blocks, 2 hit (both cached)
  assert a.blocks_needed_to_add(prompt) == 5
  assert a.can_add(prompt)
  assert a.add_sequence("b", prompt) == 4
  assert a.num_free_blocks == 0
  assert not a.can_add([1])
  assert not a.can_append(["b"]) and a.blocks_needed_to_append(["b"]) == 1


def test_errors_name_the_sequence():
  a = BlockAllocator(8, 2, num_host_blocks=4)
  a.add_sequence("alive", [1, 2])
  a.add_sequence("gone", [3])
  a.free("gone")
  a.add_sequence("away", [4])
  a.swap_out("away")
  with pytest.raises(SequenceError, match="'gone'.*already freed"):
    a.free("gone")
  with pytest.raises(SequenceError, match="'gone'.*already freed"):
    a.append_tokens("gone", [1])
  with pytest.raises(SequenceError, match="'gone'.*already freed"):
    a.append_batch(["alive", "gone"], [1, 1])
  with pytest.raises(SequenceError, match="'nobody'.*unknown"):
    a.free("nobody")
  with pytest.raises(SequenceError, match="'nobody'.*unknown"):
    a.sequence("nobody")
  with pytest.raises(SequenceError, match="'alive' already exists"):
    a.add_sequence("alive", [1])
  with pytest.raises(SequenceError, match="'alive'.*exists"):
    a.fork("alive", "alive")
  with pytest.raises(SequenceError, match="'away'.*swapped out"):
    a.append_tokens("away", [1])
  with pytest.raises(SequenceError, match="'away'.*swapped out"):
    a.append_batch(["alive", "away"], [1, 1])
  with pytest.raises(SequenceError, match="'away'.*swapped out"):
    a.fork("away", "child")
  with pytest.raises(SequenceError, match="'alive'.*not swapped out"):
    a.swap_in("alive")
  with pytest.raises(SequenceError, match="repeated.*'alive'"):
    a.append_batch(["alive", "alive"], [1, 1])
  # A freed id can be used again.
  a.add_sequence("gone", [5])
  assert a.num_tokens("gone") == 1


def test_bad_arguments_raise_value_error():
  with pytest.raises(ValueError, match="num_blocks"):
    BlockAllocator(0, 4)
  with pytest.raises(ValueError, match="block_size"):
    BlockAllocator(4, 0)
  a = BlockAllocator(8, 2, max_seq_len=4)
  with pytest.raises(ValueError, match="prompt"):
    a.add_sequence("a", [[1, 2]])
  with pytest.raises(ValueError, match="prompt"):
    a.add_sequence("a", [1.5])
  with pytest.raises(ValueError, match="'a'.*5 tokens > max_seq_len=4"):
    a.add_sequence("a", [1, 2, 3, 4, 5])
  a.add_sequence("a", [1, 2, 3])
  with pytest.raises(ValueError, match="'a'.*5 tokens > max_seq_len=4"):
    a.append_tokens("a", [1, 2])
  with pytest.raises(ValueError, match="tokens has 2 entries but seq_ids has 1"):
    a.append_batch(["a"], [1, 2])
  with pytest.raises(ValueError, match="start <= stop"):
    a.slots("a", 2, 4)
  # A fault-injection review's finds: a float or bool count read as 1 block, a huge one
  # overflowed, a uint64 token past int64 was called negative, "no" turned caching on.
  for bad in (1.5, True):
    with pytest.raises(ValueError, match=r"num_tokens must be an int, got"):
      a.blocks_needed_to_append(["a"], bad)
  with pytest.raises(ValueError, match=r"num_tokens must be >= 0, got -5"):
    a.blocks_needed_to_append(["a"], -5)
  with pytest.raises(ValueError, match=r"num_tokens=10{30} is past any sequence length"):
    a.can_append(["a"], 10**30)
  assert a.blocks_needed_to_append(["a"], np.int64(2)) == 1  # 3 + 2 tokens: a third block
  with pytest.raises(ValueError, match=r"prompt holds a token id 9223372036854775808 past int64"):
    a.add_sequence("b", np.array([2**63], np.uint64))
  with pytest.raises(ValueError, match=r"enable_prefix_caching must be a bool, got 'no'"):
    BlockAllocator(8, 2, enable_prefix_caching="no")
  assert "b" not in a and a.num_used_blocks == 2
  a.check_invariants()


_SIZES = dict(num_blocks=8, block_size=2, num_host_blocks=2, max_seq_len=6)


def _allocator(**sizes):
  return BlockAllocator(**{**_SIZES, **sizes})


@pytest.mark.parametrize("name", list(_SIZES))
@pytest.mark.parametrize("value", [True, np.True_, 4.0, "4"], ids=repr)
def test_sizes_must_be_ints_not_bools(name, value):
  """True passed as an int: BlockAllocator(True, 2) built a one-block pool."""
  with pytest.raises(ValueError, match=rf"^{name} must be (None or )?an int >= \d, got {value!r}$"):
    _allocator(**{name: value})
  # NumPy ints are ints, stored as Python ints.
  a = _allocator(**{name: np.int64(_SIZES[name])})
  assert type(getattr(a, name)) is int and getattr(a, name) == _SIZES[name]


@pytest.mark.parametrize(
  "start,stop,match",
  [
    (1.5, 3, r"start must be an int token position, got 1.5 \(float\)"),
    (0, 3.0, r"stop must be an int token position, got 3.0 \(float\)"),
    (np.float64(1), 2, r"start must be an int .*float64"),
    (False, 2, r"start must be an int token position, got False \(bool\)"),
    ("0", 2, r"start must be .* got '0' \(str\)"),
  ],
)
def test_slots_positions_must_be_ints(start, stop, match):
  a = BlockAllocator(8, 2)
  a.add_sequence("a", [1, 2, 3])
  before = copy.deepcopy(vars(a))
  with pytest.raises(ValueError, match=rf"slots of sequence 'a': {match}"):
    a.slots("a", start, stop)
  _same_state(before, vars(a))
  # NumPy ints are positions; the answer is the same as for Python ints.
  np.testing.assert_array_equal(a.slots("a", np.int32(1), np.int64(3)), a.slots("a", 1, 3))
  with pytest.raises(ValueError, match=r"block_id must be an int, got 1.0 \(float\)"):
    a.ref_count(1.0)
  with pytest.raises(ValueError, match=r"block_id must be in \[0, 8\), got 8"):
    a.ref_count(8)


def test_block_hash_is_chained_and_content_addressed():
  t = np.array([1, 2, 3, 4])
  h = block_hash(None, t)
  assert len(h) == 32 and h == block_hash(None, t.tolist())
  assert h != block_hash(None, np.array([1, 2, 3, 5]))
  assert block_hash(h, t) != h  # same tokens, different parent
  assert block_hash(h, t) != block_hash(block_hash(None, np.array([0, 0, 0, 0])), t)


def test_negative_token_ids_are_rejected_naming_the_sequence():
  a = BlockAllocator(8, 2, num_host_blocks=2)
  a.add_sequence("a", [1, 2, 3])
  a.add_sequence("b", [4])
  before = copy.deepcopy(vars(a))
  with pytest.raises(ValueError, match="'c'.*prompt.*negative.*-1"):
    a.add_sequence("c", [5, -1])
  with pytest.raises(ValueError, match="'a'.*tokens.*negative.*-7"):
    a.append_tokens("a", [-7])
  with pytest.raises(ValueError, match="'b'.*tokens.*negative.*-2"):
    a.append_batch(["a", "b"], [3, -2])
  with pytest.raises(ValueError, match="prompt.*negative.*-3"):
    a.blocks_needed_to_add([1, -3])
  _same_state(before, vars(a))
  a.check_invariants()


def test_swap_out_without_a_host_pool_says_so():
  a = BlockAllocator(8, 2)  # num_host_blocks=0
  a.add_sequence("a", [1, 2, 3])
  before = copy.deepcopy(vars(a))
  assert not a.can_swap_out("a")
  with pytest.raises(OutOfBlocksError, match=r"'a'.*no host pool \(num_host_blocks=0\)") as info:
    a.swap_out("a")
  assert (info.value.pool, info.value.needed, info.value.available) == ("host", 2, 0)
  _same_state(before, vars(a))


def test_allocator_import_does_not_load_jax():
  """The host-side allocator is pure Python + NumPy: importing it (and paxcache) must not
  pull in JAX or Flax, so host-only tools and experiments stay light."""
  import subprocess
  import sys

  code = "import sys, paxcache.allocator; print('jax' in sys.modules or 'flax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_pending_token_appends_then_resolves_to_the_same_state_as_a_known_token():
  """An engine that schedules step n + 1 before step n's token is back appends
  PENDING_TOKEN; once resolve_tokens gives the ids, slots, hashes and prefix hits are what
  appending the known tokens gives."""
  bs = 4
  known = BlockAllocator(16, bs)
  later = BlockAllocator(16, bs)
  for a in (known, later):
    a.add_sequence("x", [1, 2, 3])  # the next token fills block 0
    a.add_sequence("y", [5, 6])
  got = later.append_batch(["x", "y"], [allocator_lib.PENDING_TOKEN, allocator_lib.PENDING_TOKEN])
  want = known.append_batch(["x", "y"], [9, 7])
  np.testing.assert_array_equal(got.slots, want.slots)
  assert later.has_pending_token("x") and later.has_pending_token("y")
  later.check_invariants()  # the filled block waits for its hash
  assert later.num_cached_tokens([1, 2, 3, 9, 0]) == 0  # not registered while pending
  with pytest.raises(SequenceError, match=r"sequence 'x'.*still pending"):
    later.append_batch(["x"], [4])
  with pytest.raises(SequenceError, match=r"append to sequence 'x'.*still pending"):
    later.append_tokens("x", [4, 5])
  with pytest.raises(SequenceError, match=r"cannot fork sequence 'x'.*still pending"):
    later.fork("x", "x2")
  with pytest.raises(SequenceError, match=r"cannot swap out sequence 'x'.*still pending"):
    later.swap_out("x")
  later.resolve_tokens(["x", "y"], [9, 7])
  assert not later.has_pending_token("x")
  assert later._seqs["x"].hashes == known._seqs["x"].hashes
  assert later.num_cached_tokens([1, 2, 3, 9, 0]) == known.num_cached_tokens([1, 2, 3, 9, 0]) == 4
  later.check_invariants()
  with pytest.raises(SequenceError, match=r"have no pending token"):
    later.resolve_tokens(["x"], [3])
  with pytest.raises(ValueError, match=r"negative token id -1"):
    later.add_sequence("z", [allocator_lib.PENDING_TOKEN])
  # Freeing a sequence with a pending token releases its block unhashed.
  later.append_batch(["y"], [allocator_lib.PENDING_TOKEN])
  later.free("y")
  assert not later.has_pending_token("y")
  later.check_invariants()


def test_pending_token_that_fills_a_block_without_prefix_caching():
  """With prefix caching off no block is hashed, so a pending token that fills a block
  leaves nothing to hash later: the invariant check must not expect one."""
  a = BlockAllocator(8, 4, enable_prefix_caching=False)
  a.add_sequence("x", [1, 2, 3])
  a.append_batch(["x"], [allocator_lib.PENDING_TOKEN])
  a.check_invariants()
  a.resolve_tokens(["x"], [9])
  assert a._seqs["x"].hashes == []
  a.check_invariants()


def test_batched_calls_follow_frees_adds_and_swaps_of_the_same_ids():
  """Batched calls given the same ids again (as an engine does step after step) see every
  free, add and swap in between: checked against the per-sequence views."""
  a = BlockAllocator(32, 2, num_host_blocks=8)
  ids = ["a", "b", "c"]
  for i, s in enumerate(ids):
    a.add_sequence(s, [1, 2, 3 + i])
  a.append_batch(ids, [4, 5, 6])
  a.free("a")
  a.add_sequence("z", [9])  # takes the row "a" had
  a.add_sequence("a", [7, 8, 9, 10, 11])  # "a" again, in another row, with other blocks
  block_ids, lengths = a.gather(list(ids), 4, 4)
  for r, s in enumerate(ids):
    view = a.sequence(s)
    assert lengths[r] == view.num_tokens
    assert block_ids[r, : view.num_blocks].tolist() == view.block_ids.tolist()
    assert (block_ids[r, view.num_blocks :] == -1).all()
  res = a.append_batch(list(ids), [1, 1, 1])
  for r, s in enumerate(ids):
    view = a.sequence(s)
    last = int(view.block_ids[-1])
    assert res.slots[r] == last * 2 + (view.num_tokens - 1) % 2
  a.swap_out("b")
  with pytest.raises(SequenceError, match="'b'"):
    a.append_batch(list(ids), [1, 1, 1])
  a.swap_in("b")
  assert a.blocks_needed_to_append(list(ids), 1) == sum(
    a.sequence(s).num_tokens % 2 == 0 for s in ids
  )
  a.check_invariants()


@pytest.mark.parametrize("bs", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_two_pending_tokens_end_in_the_state_of_known_tokens(bs, seed):
  """max_pending_tokens=2 (an engine keeping two steps on the device): every decode
  appends PENDING_TOKEN and its id is given only after the next step's append, oldest
  first, so a sequence holds two pending tokens that often straddle a block boundary. A
  twin allocator appends the same tokens known at once. Slots and tables agree at every
  step until the first free; once all is resolved the hash chains, the prefix cache
  (hits of new prompts over generated blocks) and every invariant agree too. Sequences
  stop and are freed with pending tokens (their unhashed blocks go back free, not
  cached, so the twins' block ids part there); new ones join."""
  rng = np.random.default_rng(seed)
  P = allocator_lib.PENDING_TOKEN
  later = BlockAllocator(96, bs, max_pending_tokens=2)
  known = BlockAllocator(96, bs)
  history: dict[str, list[int]] = {}
  shared = rng.integers(0, 50, 3 * bs + 1).tolist()

  def add(name):
    prompt = shared + rng.integers(0, 50, int(rng.integers(0, 2 * bs))).tolist()
    assert later.add_sequence(name, prompt) == known.add_sequence(name, prompt)
    history[name] = list(prompt)

  for i in range(4):
    add(f"s{i}")
  queue = []  # (names, tokens) of the steps whose tokens are not given yet
  for step in range(24):
    names = list(history)
    tokens = rng.integers(0, 50, len(names)).tolist()
    got = later.append_batch(names, [P] * len(names))
    want = known.append_batch(names, tokens)
    if step < 7:  # no sequence freed yet
      np.testing.assert_array_equal(got.slots, want.slots)
      np.testing.assert_array_equal(got.cow_pairs, want.cow_pairs)
      for n in names:
        row_l, row_k = later._seqs[n].row, known._seqs[n].row
        np.testing.assert_array_equal(later._table[row_l], known._table[row_k])
    pend = [later.num_pending_tokens(n) for n in names]
    assert max(pend) == (2 if step else 1) and min(pend) >= 1
    for n, t in zip(names, tokens, strict=True):
      history[n].append(t)
    queue.append((names, tokens))
    if len(queue) > 1:  # the step before this one is back
      old_names, old_tokens = queue.pop(0)
      live = [(n, t) for n, t in zip(old_names, old_tokens, strict=True) if n in history]
      later.resolve_tokens([n for n, _ in live], [t for _, t in live])
    assert all(later.num_pending_tokens(n) == 1 for n in history)
    later.check_invariants()
    if step % 7 == 6:  # one stops: freed with its pending tokens
      name = names[int(rng.integers(len(names)))]
      later.free(name)
      known.free(name)
      del history[name]
      add(f"s{step}")
  for old_names, old_tokens in queue:
    live = [(n, t) for n, t in zip(old_names, old_tokens, strict=True) if n in history]
    later.resolve_tokens([n for n, _ in live], [t for _, t in live])
  later.check_invariants()
  for n in history:
    assert later.num_pending_tokens(n) == 0
    assert later._seqs[n].hashes == known._seqs[n].hashes
  # A new prompt over a sequence's generated tokens hits as much in both, past its prompt.
  for toks in history.values():
    hit = later.num_cached_tokens(toks + [0])
    assert hit == known.num_cached_tokens(toks + [0]) == len(toks) // bs * bs
  known.check_invariants()


def test_pending_tokens_past_the_limit_and_known_after_pending_are_refused():
  P = allocator_lib.PENDING_TOKEN
  a = BlockAllocator(8, 2, max_pending_tokens=2)
  a.add_sequence("x", [1, 2, 3])
  a.add_sequence("y", [4])
  a.append_batch(["x", "y"], [P, P])
  a.append_batch(["x", "y"], [P, P])  # two each: x's straddle blocks 1 and 2
  assert a.num_pending_tokens("x") == 2 and a.num_pending_tokens("z") == 0
  before = copy.deepcopy(vars(a))
  with pytest.raises(SequenceError, match=r"'x': it holds 2 pending tokens, max_pending_tokens=2"):
    a.append_batch(["x", "y"], [P, P])
  _same_state(before, vars(a))
  a.resolve_tokens(["y"], [7])
  before = copy.deepcopy(vars(a))
  with pytest.raises(SequenceError, match=r"'y': its last token is still pending and this one"):
    a.append_batch(["y"], [8])
  _same_state(before, vars(a))
  with pytest.raises(SequenceError, match=r"cannot swap out sequence 'y'.*still pending"):
    a.swap_out("y")
  a.resolve_tokens(["x", "y"], [9, 5])
  a.resolve_tokens(["x"], [6])
  a.check_invariants()
  # x holds 1 2 3 9 6: blocks [1, 2], [3, 9] hashed in order, as if known.
  b = BlockAllocator(8, 2)
  b.add_sequence("x", [1, 2, 3])
  b.append_tokens("x", [9, 6])
  assert a._seqs["x"].hashes == b._seqs["x"].hashes
  assert a.num_cached_tokens([1, 2, 3, 9, 6, 0]) == 4
  for bad in (0, 4, 1.0, True):
    with pytest.raises(ValueError, match="max_pending_tokens"):
      BlockAllocator(8, 2, max_pending_tokens=bad)
