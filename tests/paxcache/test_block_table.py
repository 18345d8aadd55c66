"""BlockTable: values against a Python loop over the allocator's views, bucketing, jit reuse."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from paxcache.allocator import BlockAllocator, SequenceError
from paxcache.block_table import BlockTable, bucket_size, build_slot_mapping


def _random_allocator(rng, num_seqs=12, block_size=4):
  """An allocator after a mix of adds (with shared prefixes), forks, appends and frees."""
  a = BlockAllocator(256, block_size, num_host_blocks=64)
  prefix = rng.integers(0, 50, 8).tolist()
  for s in range(num_seqs):
    n = int(rng.integers(1, 30))
    a.add_sequence(s, (prefix + rng.integers(0, 50, n).tolist())[:n])
  for s in range(0, num_seqs, 3):
    a.fork(s, 100 + s)
  for s in list(a.seq_ids()):
    a.append_tokens(s, rng.integers(0, 50, int(rng.integers(0, 6))))
  a.free(1)
  a.swap_out(2)
  return a


def _loop_table(a, seq_ids, batch, max_blocks):
  ids = [[-1] * max_blocks for _ in range(batch)]
  lengths = [0] * batch
  for r, s in enumerate(seq_ids):
    view = a.sequence(s)
    for i, b in enumerate(view.block_ids.tolist()):
      ids[r][i] = b
    lengths[r] = view.num_tokens
  return np.array(ids, np.int32), np.array(lengths, np.int32)


def test_bucket_size():
  assert [bucket_size(n) for n in (0, 1, 7, 8, 9, 16, 17, 1000, 1024, 1025)] == [
    8,
    8,
    8,
    8,
    16,
    16,
    32,
    1024,
    1024,
    2048,
  ]
  assert bucket_size(3, minimum=1) == 4 and bucket_size(1, minimum=1) == 1
  assert bucket_size(5, minimum=64) == 64
  with pytest.raises(ValueError, match="n=-1"):
    bucket_size(-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_from_allocator_matches_python_loop(seed):
  rng = np.random.default_rng(seed)
  a = _random_allocator(rng)
  resident = [s for s in a.seq_ids() if not a.is_swapped(s)]
  seq_ids = [resident[i] for i in rng.permutation(len(resident))[:9]]
  table = BlockTable.from_allocator(a, seq_ids)
  longest = max(a.sequence(s).num_blocks for s in seq_ids)
  assert table.batch_size == bucket_size(9) == 16
  assert table.max_blocks == bucket_size(longest)
  ids, lengths = _loop_table(a, seq_ids, table.batch_size, table.max_blocks)
  assert table.block_ids.dtype == np.int32 and table.lengths.dtype == np.int32
  np.testing.assert_array_equal(table.block_ids, ids)
  np.testing.assert_array_equal(table.lengths, lengths)
  # Unused entries and padding rows hold the kernels' sentinel, never a real block.
  assert (table.block_ids[len(seq_ids) :] == kernels.INVALID_BLOCK).all()
  assert (table.lengths[len(seq_ids) :] == 0).all()
  for r, s in enumerate(seq_ids):
    nb = a.sequence(s).num_blocks
    assert (table.block_ids[r, nb:] == kernels.INVALID_BLOCK).all()
    assert (table.block_ids[r, :nb] >= 0).all()


def test_explicit_sizes_and_errors():
  a = BlockAllocator(64, 2, num_host_blocks=8)
  a.add_sequence("a", list(range(9)))  # 5 blocks
  a.add_sequence("b", [1])
  table = BlockTable.from_allocator(a, ["b", "a"], batch_size=3, max_blocks=6)
  ids, lengths = _loop_table(a, ["b", "a"], 3, 6)
  np.testing.assert_array_equal(table.block_ids, ids)
  np.testing.assert_array_equal(table.lengths, lengths)
  with pytest.raises(ValueError, match="max_blocks=4 is smaller"):
    BlockTable.from_allocator(a, ["a"], max_blocks=4)
  with pytest.raises(ValueError, match="batch_size=1 is smaller"):
    BlockTable.from_allocator(a, ["a", "b"], batch_size=1)
  empty = BlockTable.from_allocator(a, [])
  assert empty.block_ids.shape == (8, 8) and (empty.block_ids == -1).all()
  a.swap_out("b")
  with pytest.raises(SequenceError, match="'b'.*swapped out"):
    BlockTable.from_allocator(a, ["a", "b"])
  with pytest.raises(SequenceError, match="'zz'.*unknown"):
    BlockTable.from_allocator(a, ["a", "zz"])


def test_block_table_is_frozen_and_its_arrays_read_only():
  a = BlockAllocator(16, 4)
  a.add_sequence(0, [1, 2, 3])
  table = BlockTable.from_allocator(a, [0])
  with pytest.raises(dataclasses.FrozenInstanceError):
    table.lengths = None
  with pytest.raises(ValueError, match="read-only"):
    table.block_ids[0, 0] = 5
  # Later allocator changes do not leak into a table already built.
  a.append_tokens(0, [4, 5])
  assert table.lengths[0] == 3 and table.block_ids[0, 1] == -1


def test_jit_does_not_recompile_within_a_bucket():
  traces = []

  @jax.jit
  def used_slots(table: BlockTable):
    traces.append(table.block_ids.shape)
    valid = table.block_ids >= 0
    return jnp.sum(jnp.where(valid, table.block_ids, 0), axis=1), table.lengths * 2

  a = BlockAllocator(512, 4)
  rng = np.random.default_rng(0)
  for s in range(20):
    a.add_sequence(s, rng.integers(0, 9, int(rng.integers(1, 28))).tolist())
  # Batches of 3, 5 and 8 sequences, all at most 7 blocks long: one bucket (8, 8).
  for batch in ([0, 1, 2], [3, 4, 5, 6, 7], list(range(8, 16))):
    table = BlockTable.from_allocator(a, batch)
    sums, doubled = used_slots(table)
    ids = np.asarray(table.block_ids)
    np.testing.assert_array_equal(sums, np.where(ids >= 0, ids, 0).sum(axis=1))
    np.testing.assert_array_equal(doubled, 2 * table.lengths)
  assert traces == [(8, 8)]
  # A decode step grows the sequences but stays in the bucket: no new trace.
  a.append_batch(list(range(8)), [1] * 8)
  used_slots(BlockTable.from_allocator(a, list(range(8))))
  assert traces == [(8, 8)]
  # Nine sequences leave the batch bucket: exactly one more trace.
  used_slots(BlockTable.from_allocator(a, list(range(9))))
  assert traces == [(8, 8), (16, 8)]
  assert len(jax.tree.leaves(table)) == 2


def test_build_slot_mapping_pads_with_invalid_slot():
  a = BlockAllocator(32, 4)
  a.add_sequence("a", list(range(6)))
  a.add_sequence("b", list(range(3)))
  parts = [a.slots("a", 2, 6), a.slots("b", 0, 3)]
  mapping = build_slot_mapping(parts)
  expect = [-1] * 8
  for i, slot in enumerate([p for part in parts for p in part.tolist()]):
    expect[i] = slot
  assert mapping.dtype == np.int32 and mapping.tolist() == expect
  assert build_slot_mapping(parts, 7).tolist() == expect[:7]
  assert build_slot_mapping(np.array([3, 4], np.int32), minimum=1).tolist() == [3, 4]
  assert build_slot_mapping([]).tolist() == [kernels.INVALID_SLOT] * 8
  with pytest.raises(ValueError, match="num_tokens=6 is smaller than the 7 slots"):
    build_slot_mapping(parts, 6)
  # A decode step: one slot per sequence from append_batch, padded to the batch bucket.
  res = a.append_batch(["a", "b"], [1, 2])
  assert build_slot_mapping(res.slots).tolist() == res.slots.tolist() + [-1] * 6
