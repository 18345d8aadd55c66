"""Stateful (hypothesis) tests of BlockAllocator against a simulated device and host memory.

The machine below keeps its own model of every sequence's tokens and a simulated block pool
(``dev[block, offset] = token``, ``host[...]`` likewise). It applies each copy-on-write and swap
pair the allocator returns and writes each new token at the slot it returns, then checks that
reading every sequence back through its block table gives exactly its tokens. So a wrong slot, a
missing copy, a write into a shared block or a prefix hit on the wrong block all fail here, not
only the bookkeeping invariants.
"""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from paxcache.allocator import BlockAllocator, OutOfBlocksError, SequenceError, block_hash

MAX_SEQ_LEN = 48  # for the contiguous-waste metric; prompts and appends stay below it
# Prompts start with a prefix of one of these, so prefix-cache hits are frequent.
BASE_PROMPTS = [list(range(100, 124)), list(range(200, 224)), [7] * 24]


def _state(alloc):
  return copy.deepcopy(vars(alloc))


def _same(x, y, path="") -> None:
  """Deep equality of allocator state, exact (dtypes, order of deques and OrderedDicts)."""
  assert type(x) is type(y), (path, type(x), type(y))
  if isinstance(x, np.ndarray):
    assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), path
  elif isinstance(x, dict):
    assert list(x) == list(y), path
    for key in x:
      _same(x[key], y[key], f"{path}[{key!r}]")
  elif isinstance(x, list | tuple) or type(x).__name__ == "deque":
    assert len(x) == len(y), path
    for i, (a, b) in enumerate(zip(x, y, strict=True)):
      _same(a, b, f"{path}[{i}]")
  elif hasattr(type(x), "__slots__"):
    for name in type(x).__slots__:
      _same(getattr(x, name), getattr(y, name), f"{path}.{name}")
  else:
    assert x == y, (path, x, y)


class AllocatorMachine(RuleBasedStateMachine):
  @initialize(
    num_blocks=st.integers(3, 24),
    block_size=st.sampled_from([1, 2, 4]),
    num_host_blocks=st.integers(0, 16),
    caching=st.booleans(),
  )
  def setup(self, num_blocks, block_size, num_host_blocks, caching):
    self.bs = block_size
    self.alloc = BlockAllocator(
      num_blocks,
      block_size,
      num_host_blocks=num_host_blocks,
      enable_prefix_caching=caching,
      max_seq_len=MAX_SEQ_LEN,
    )
    self.dev = np.full((num_blocks, block_size), -1, np.int64)
    self.host = np.full((max(num_host_blocks, 1), block_size), -1, np.int64)
    self.tokens: dict[int, list[int]] = {}
    self.swapped: set[int] = set()
    self.next_id = 0
    self.freed: list[int] = []
    # Chained hash of every full block any sequence has held -> that block's tokens.
    self.known_blocks: dict[bytes, list[int]] = {}

  # -- helpers

  def resident(self):
    return sorted(s for s in self.tokens if s not in self.swapped)

  def write(self, slots, toks):
    for slot, tok in zip(np.asarray(slots).tolist(), toks, strict=True):
      block, off = divmod(slot, self.bs)
      # Writes go only to blocks this sequence holds alone.
      assert self.alloc.ref_count(block) == 1, (slot, block)
      self.dev[block, off] = tok

  def expect_error(self, exc_type, fn, *args, name=None):
    before = _state(self.alloc)
    with pytest.raises(exc_type) as info:
      fn(*args)
    _same(before, _state(self.alloc))
    if name is not None:
      assert repr(name) in str(info.value), str(info.value)

  # -- rules

  @rule(data=st.data(), base=st.integers(0, len(BASE_PROMPTS) - 1))
  def add(self, data, base):
    head = BASE_PROMPTS[base][: data.draw(st.integers(0, 12), label="shared")]
    tail = data.draw(st.lists(st.integers(0, 9), max_size=4), label="tail")
    prompt = head + tail
    sid = self.next_id
    if not self.alloc.can_add(prompt):
      self.expect_error(OutOfBlocksError, self.alloc.add_sequence, sid, prompt)
      return
    predicted = self.alloc.num_cached_tokens(prompt)
    free_before = self.alloc.num_free_blocks
    needed = self.alloc.blocks_needed_to_add(prompt)
    cached = self.alloc.add_sequence(sid, prompt)
    assert cached == predicted
    assert self.alloc.num_free_blocks == free_before - needed
    assert cached % self.bs == 0 and cached <= max(len(prompt) - 1, 0)
    self.next_id += 1
    self.tokens[sid] = list(prompt)
    self.write(self.alloc.slots(sid, cached, len(prompt)), prompt[cached:])

  @precondition(lambda self: self.tokens)
  @rule(data=st.data())
  def add_copy(self, data):
    """Re-adds a prefix of a live sequence (generated tokens included): prefix-cache hits."""
    toks = self.tokens[data.draw(st.sampled_from(sorted(self.tokens)), label="source")]
    prompt = toks[: data.draw(st.integers(0, len(toks)), label="length")]
    sid = self.next_id
    if not self.alloc.can_add(prompt):
      self.expect_error(OutOfBlocksError, self.alloc.add_sequence, sid, prompt)
      return
    cached = self.alloc.add_sequence(sid, prompt)
    assert cached % self.bs == 0 and cached <= max(len(prompt) - 1, 0)
    self.next_id += 1
    self.tokens[sid] = list(prompt)
    self.write(self.alloc.slots(sid, cached, len(prompt)), prompt[cached:])

  @precondition(lambda self: self.resident())
  @rule(data=st.data(), k=st.integers(1, 5))
  def append(self, data, k):
    sid = data.draw(st.sampled_from(self.resident()), label="seq")
    toks = data.draw(st.lists(st.integers(0, 9), min_size=k, max_size=k), label="tokens")
    view = self.alloc.sequence(sid)
    n = view.num_tokens
    shared_last = n % self.bs and self.alloc.ref_count(int(view.block_ids[-1])) > 1
    needed = -(-(n + k) // self.bs) - view.num_blocks + bool(shared_last)
    if n + k > MAX_SEQ_LEN:
      self.expect_error(ValueError, self.alloc.append_tokens, sid, toks, name=sid)
      return
    if needed > self.alloc.num_free_blocks:
      assert not self.alloc.can_append([sid], k)
      self.expect_error(OutOfBlocksError, self.alloc.append_tokens, sid, toks)
      return
    assert self.alloc.blocks_needed_to_append([sid], k) == needed
    res = self.alloc.append_tokens(sid, toks)
    assert (res.cow is not None) == bool(shared_last)
    if res.cow is not None:
      src, dst = res.cow
      assert src == view.block_ids[-1] and self.alloc.ref_count(src) >= 1
      self.dev[dst] = self.dev[src]
    self.write(res.slots, toks)
    self.tokens[sid] += toks

  @precondition(lambda self: self.resident())
  @rule(data=st.data())
  def append_batch(self, data):
    sids = data.draw(st.lists(st.sampled_from(self.resident()), min_size=1, unique=True))
    toks = data.draw(st.lists(st.integers(0, 9), min_size=len(sids), max_size=len(sids)))
    if max(len(self.tokens[s]) for s in sids) + 1 > MAX_SEQ_LEN:
      self.expect_error(ValueError, self.alloc.append_batch, sids, toks)
      return
    needed = 0
    sharers = {}  # shared partly filled last block -> holders in this batch
    for s in sids:
      view = self.alloc.sequence(s)
      if view.num_tokens % self.bs == 0:
        needed += 1
      elif self.alloc.ref_count(last := int(view.block_ids[-1])) > 1:
        sharers[last] = sharers.get(last, 0) + 1
    for b, count in sharers.items():
      # Each holder copies, except the last one when all holders are in the batch.
      needed += count - (count == self.alloc.ref_count(b))
    assert self.alloc.blocks_needed_to_append(sids) == needed
    if needed > self.alloc.num_free_blocks:
      self.expect_error(OutOfBlocksError, self.alloc.append_batch, sids, toks)
      return
    res = self.alloc.append_batch(sids, toks)
    assert res.slots.shape == (len(sids),) and res.slots.dtype == np.int32
    for src, dst in res.cow_pairs.tolist():
      self.dev[dst] = self.dev[src]
    self.write(res.slots, toks)
    for s, t in zip(sids, toks, strict=True):
      self.tokens[s].append(t)

  @precondition(lambda self: self.resident())
  @rule(data=st.data())
  def fork(self, data):
    parent = data.draw(st.sampled_from(self.resident()), label="parent")
    free_before = self.alloc.num_free_blocks
    self.alloc.fork(parent, self.next_id)
    assert self.alloc.num_free_blocks == free_before
    self.tokens[self.next_id] = list(self.tokens[parent])
    self.next_id += 1

  @precondition(lambda self: self.tokens)
  @rule(data=st.data())
  def free(self, data):
    sid = data.draw(st.sampled_from(sorted(self.tokens)), label="seq")
    self.alloc.free(sid)
    del self.tokens[sid]
    self.swapped.discard(sid)
    self.freed.append(sid)

  @precondition(lambda self: self.resident())
  @rule(data=st.data())
  def swap_out(self, data):
    sid = data.draw(st.sampled_from(self.resident()), label="seq")
    view = self.alloc.sequence(sid)
    if view.num_blocks > self.alloc.num_free_host_blocks:
      assert not self.alloc.can_swap_out(sid)
      self.expect_error(OutOfBlocksError, self.alloc.swap_out, sid)
      return
    pairs = self.alloc.swap_out(sid)
    assert pairs[:, 0].tolist() == view.block_ids.tolist()
    for d, h in pairs.tolist():
      self.host[h] = self.dev[d]
    self.swapped.add(sid)
    # A swapped-out sequence cannot be appended to, forked or swapped out again.
    self.expect_error(SequenceError, self.alloc.append_tokens, sid, [1], name=sid)
    self.expect_error(SequenceError, self.alloc.append_batch, [sid], [1], name=sid)
    self.expect_error(SequenceError, self.alloc.fork, sid, 10_000, name=sid)
    self.expect_error(SequenceError, self.alloc.swap_out, sid, name=sid)
    self.expect_error(SequenceError, self.alloc.slots, sid, 0, 0, name=sid)

  @precondition(lambda self: self.swapped)
  @rule(data=st.data())
  def swap_in(self, data):
    sid = data.draw(st.sampled_from(sorted(self.swapped)), label="seq")
    if not self.alloc.can_swap_in(sid):
      self.expect_error(OutOfBlocksError, self.alloc.swap_in, sid)
      return
    host_blocks = self.alloc.sequence(sid).host_block_ids.tolist()
    free_before = self.alloc.num_free_blocks
    needed = self.alloc.blocks_needed_to_swap_in(sid)
    pairs = self.alloc.swap_in(sid)
    assert self.alloc.num_free_blocks == free_before - needed
    assert set(pairs[:, 0].tolist()) <= set(host_blocks)
    for h, d in pairs.tolist():
      self.dev[d] = self.host[h]
    self.swapped.discard(sid)

  @precondition(lambda self: self.resident())
  @rule(data=st.data())
  def swap_out_group(self, data):
    sids = data.draw(st.lists(st.sampled_from(self.resident()), min_size=1, unique=True))
    views = [self.alloc.sequence(s) for s in sids]
    distinct = {b for v in views for b in v.block_ids.tolist()}
    assert self.alloc.host_blocks_needed_to_swap_out(sids) == len(distinct)
    if len(distinct) > self.alloc.num_free_host_blocks:
      self.expect_error(OutOfBlocksError, self.alloc.swap_out_group, sids)
      return
    free_host = self.alloc.num_free_host_blocks
    pairs = self.alloc.swap_out_group(sids)
    # Each distinct block copied once, to its own host block.
    assert sorted(pairs[:, 0].tolist()) == sorted(distinct)
    assert len(set(pairs[:, 1].tolist())) == len(pairs)
    assert self.alloc.num_free_host_blocks == free_host - len(distinct)
    for d, h in pairs.tolist():
      self.host[h] = self.dev[d]
    host_of = dict(pairs.tolist())
    for s, v in zip(sids, views, strict=True):
      want = [host_of[b] for b in v.block_ids.tolist()]
      assert self.alloc.sequence(s).host_block_ids.tolist() == want
    self.swapped.update(sids)

  @precondition(lambda self: self.swapped)
  @rule(data=st.data())
  def swap_in_group(self, data):
    sids = data.draw(st.lists(st.sampled_from(sorted(self.swapped)), min_size=1, unique=True))
    views = [self.alloc.sequence(s) for s in sids]
    needed = self.alloc.blocks_needed_to_swap_in_group(sids)
    if needed > self.alloc.num_free_blocks:
      self.expect_error(OutOfBlocksError, self.alloc.swap_in_group, sids)
      return
    free_before = self.alloc.num_free_blocks
    pairs = self.alloc.swap_in_group(sids)
    assert self.alloc.num_free_blocks == free_before - needed
    named = {h for v in views for h in v.host_block_ids.tolist()}
    assert set(pairs[:, 0].tolist()) <= named and len(set(pairs[:, 1].tolist())) == len(pairs)
    for h, d in pairs.tolist():
      self.dev[d] = self.host[h]
    # A host block several of them named is one device block again.
    dev_of = {}
    for s, v in zip(sids, views, strict=True):
      got = self.alloc.sequence(s).block_ids.tolist()
      for h, d in zip(v.host_block_ids.tolist(), got, strict=True):
        assert dev_of.setdefault(h, d) == d, (s, h, d, dev_of[h])
    self.swapped.difference_update(sids)

  @rule(data=st.data())
  def misuse(self, data):
    """Every misuse raises SequenceError naming the sequence and changes nothing."""
    a = self.alloc
    unknown = 10_000 + data.draw(st.integers(0, 3))
    self.expect_error(SequenceError, a.free, unknown, name=unknown)
    self.expect_error(SequenceError, a.append_tokens, unknown, [1], name=unknown)
    self.expect_error(SequenceError, a.append_batch, [unknown], [1], name=unknown)
    self.expect_error(SequenceError, a.swap_in, unknown, name=unknown)
    if self.freed:
      gone = data.draw(st.sampled_from(self.freed))
      self.expect_error(SequenceError, a.free, gone, name=gone)
      self.expect_error(SequenceError, a.append_tokens, gone, [1], name=gone)
      self.expect_error(SequenceError, a.fork, gone, 10_001, name=gone)
    if self.tokens:
      live = data.draw(st.sampled_from(sorted(self.tokens)))
      self.expect_error(SequenceError, a.add_sequence, live, [1, 2], name=live)
      if self.resident():
        other = self.resident()[0]
        self.expect_error(SequenceError, a.fork, other, live, name=live)
        self.expect_error(SequenceError, a.append_batch, [other, other], [1, 2], name=other)
      if live not in self.swapped:
        self.expect_error(SequenceError, a.swap_in, live, name=live)

  # -- invariants

  @invariant()
  def consistent(self):
    a = self.alloc
    bs = self.bs
    a.check_invariants()
    m = a.metrics()
    assert m.num_used_blocks + m.num_free_blocks + m.num_cached_blocks == a.num_blocks
    assert m.num_host_used_blocks + m.num_host_free_blocks == a.num_host_blocks
    owners = np.zeros(a.num_blocks, np.int64)
    fill = {}
    host_used = []
    total_tokens = 0
    for sid, toks in self.tokens.items():
      view = a.sequence(sid)
      n = len(toks)
      assert view.num_tokens == n and view.num_blocks == -(-n // bs)
      assert view.swapped == (sid in self.swapped)
      if view.swapped:
        assert view.block_ids.size == 0 and view.host_block_ids.size == view.num_blocks
        assert len(set(view.host_block_ids.tolist())) == view.num_blocks
        host_used += view.host_block_ids.tolist()
        got = self.host[view.host_block_ids].reshape(-1)[:n]
      else:
        assert view.host_block_ids.size == 0 and view.block_ids.size == view.num_blocks
        owners[view.block_ids] += 1
        total_tokens += n
        for j, b in enumerate(view.block_ids.tolist()):
          held = min(bs, n - j * bs)
          # A block shared by several sequences holds the same number of tokens in each.
          assert fill.setdefault(b, held) == held
        got = self.dev[view.block_ids].reshape(-1)[:n]
      assert got.tolist() == toks, (sid, got.tolist(), toks)
    # Reference counts equal the number of owners; no block owned twice by one sequence.
    for b in range(a.num_blocks):
      assert a.ref_count(b) == owners[b], (b, a.ref_count(b), owners[b])
    assert m.num_used_blocks == np.count_nonzero(owners)
    # A host block may be named by several sequences (a group swapped out together).
    assert len(set(host_used)) == m.num_host_used_blocks
    assert m.num_sequences == len(self.tokens) - len(self.swapped)
    assert m.num_tokens == total_tokens
    filled = sum(fill.values())
    assert m.filled_slots == filled
    reserved = len(fill) * bs
    assert m.waste == pytest.approx(1 - filled / reserved if reserved else 0.0)
    if m.num_sequences:
      expect = 1 - total_tokens / (m.num_sequences * MAX_SEQ_LEN)
      assert m.contiguous_waste == pytest.approx(expect)

  @invariant()
  def prefix_cache_maps_real_prefixes_to_their_content(self):
    """Every prefix-cache entry is the hash of a prefix some sequence really held, and its block
    still holds that prefix's last block (so stale hashes and evicted entries both fail)."""
    if not self.alloc.enable_prefix_caching:
      return
    bs = self.bs
    for toks in self.tokens.values():
      parent = None
      for j in range(len(toks) // bs):
        parent = block_hash(parent, np.array(toks[j * bs : (j + 1) * bs]))
        self.known_blocks[parent] = toks[j * bs : (j + 1) * bs]
    # The allocator has no public listing of its cache entries; read the dict directly.
    for h, b in self.alloc._block_of_hash.items():
      assert h in self.known_blocks, f"block {b} registered under a hash of no real prefix"
      assert self.dev[b].tolist() == self.known_blocks[h], b


AllocatorMachine.TestCase.settings = settings(
  max_examples=100,
  stateful_step_count=40,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow],
)
TestAllocatorMachine = AllocatorMachine.TestCase
