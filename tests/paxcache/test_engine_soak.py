"""Soak: a few thousand random requests, aborts and forks through small pools.

At the end every block is free or only prefix-cached, the host pool is empty, every
request was answered exactly once, and paxcache's host memory stayed flat.
"""

from __future__ import annotations

import gc
import os
import time
import tracemalloc

import numpy as np
import pytest
from flax import nnx

import paxcache
from paxcache import allocator as allocator_module
from paxcache.engine import Engine, EngineConfig, Request
from paxcache.nn import Decoder, DecoderConfig

NUM_REQUESTS = 1500  # per preemption mode


def _paxcache_heap() -> int:
  """Bytes held by live objects that paxcache's own lines allocated (the test's bookkeeping
  and JAX's caches are not the engine's memory)."""
  gc.collect()
  mine = tracemalloc.Filter(True, os.path.join(os.path.dirname(paxcache.__file__), "*"))
  snapshot = tracemalloc.take_snapshot().filter_traces([mine])
  return sum(stat.size for stat in snapshot.statistics("filename"))


def _random_request(rng, i, prefixes):
  tail = rng.integers(0, 256, int(rng.integers(1, 12))).tolist()
  prompt = (prefixes[int(rng.integers(len(prefixes)))] + tail) if rng.random() < 0.6 else tail
  return Request(
    i,
    prompt,
    max_new_tokens=int(rng.integers(1, 9)),
    n=int(rng.choice([1, 1, 1, 2, 3])),
    temperature=float(rng.choice([0.0, 1.0])),
    top_k=int(rng.choice([0, 5])),
    end_token=int(rng.integers(256)) if rng.random() < 0.3 else None,
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  "mode,async_scheduling,depth",
  [("swap", False, 1), ("recompute", False, 1), ("swap", True, 1), ("recompute", True, 2)],
  ids=["swap", "recompute", "swap-async", "recompute-async-depth2"],
)
def test_soak_random_requests_aborts_and_forks(mode, async_scheduling, depth, monkeypatch):
  # The allocator remembers the last _FORGOTTEN_LIMIT freed ids (bounded, only to word error
  # messages); shrink the bound so that it fills during warm-up and flatness is measurable
  # within a CI-sized run.
  monkeypatch.setattr(allocator_module, "_FORGOTTEN_LIMIT", 256)
  config = DecoderConfig(
    d_model=16, num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32, max_seq_len=64
  )
  model = Decoder(config, rngs=nnx.Rngs(0))

  def soak(measure: bool):
    engine = Engine(
      model,
      EngineConfig(
        # Two steps stay unread only with at least 2 * 8 + 16 / 4 + 1 = 21 blocks free
        # (EngineConfig.pipeline_depth): 32 blocks go in and out of that, and preempt.
        num_blocks=32,
        block_size=4,
        num_host_blocks=48,
        preemption_mode=mode,
        max_num_seqs=16 if depth == 1 else 8,
        max_num_batched_tokens=64 if depth == 1 else 16,
        metrics_history=64,
        async_scheduling=async_scheduling,
        pipeline_depth=depth,
      ),
    )
    rng = np.random.default_rng(1 if mode == "swap" else 2)
    prefixes = [rng.integers(0, 256, int(rng.integers(4, 17))).tolist() for _ in range(4)]
    answered: dict[int, int] = {}
    submitted = 0
    memory = {"kept": 0, "read_first": 0}

    def record(out):
      answered[out.request_id] = answered.get(out.request_id, 0) + 1
      assert len(out.samples) == len(out.finish_reasons)

    can_keep = engine._can_keep_older

    def counted_keep():  # steps planned with two steps unread, and those reading one first
      kept = can_keep()
      memory["kept" if kept else "read_first"] += 1
      return kept

    engine._can_keep_older = counted_keep
    if measure:
      tracemalloc.start(1)  # from the start, so that bounded caches are traced as they fill
    try:
      while submitted < NUM_REQUESTS or engine.has_unfinished():
        for _ in range(int(rng.integers(0, 4))):
          if submitted < NUM_REQUESTS:
            engine.add_request(_random_request(rng, submitted, prefixes))
            submitted += 1
        if engine.has_unfinished() and rng.random() < 0.03:
          live = list(engine._groups)
          if live:  # with overlap scheduling only finished requests may be left to return
            record(engine.abort(live[int(rng.integers(len(live)))]))
        for out in engine.step():
          record(out)
        # After warm-up: bounded caches full, queues full.
        if measure and submitted >= NUM_REQUESTS // 3 and "start" not in memory:
          memory["start"] = _paxcache_heap()
      if measure:
        memory["end"] = _paxcache_heap()
    finally:
      if measure:
        tracemalloc.stop()
    return engine, answered, memory

  # The step compiles once per padded shape, and JAX keeps each compiled shape's key (a few
  # KiB per shape); this stream meets new shapes until late in the run (41 in recompute mode,
  # the last after request 1,300). A first, identical pass (same model, so the same jitted
  # step; same seeds, so the same shapes) compiles them all, so that the measured pass's
  # growth is the engine's own.
  warm, _, _ = soak(measure=False)
  t0 = time.perf_counter()
  engine, answered, memory = soak(measure=True)
  assert engine.metrics.compiled_shapes == warm.metrics.compiled_shapes  # the same stream
  elapsed = time.perf_counter() - t0
  m = engine.metrics
  alloc = engine.allocator

  assert sorted(answered) == list(range(NUM_REQUESTS))  # none lost
  assert set(answered.values()) == {1}  # none answered twice
  assert m.finished_requests + m.aborted_requests == NUM_REQUESTS
  assert m.aborted_requests > 0
  assert alloc.num_used_blocks == 0 and len(alloc) == 0
  assert alloc.num_free_host_blocks == alloc.num_host_blocks
  assert alloc.num_free_blocks == alloc.num_blocks  # free, or cached and evictable
  alloc.check_invariants()
  assert not engine.has_unfinished() and not engine.scheduler.has_work()
  assert m.cow_copies > 0 and m.prefix_hit_tokens > 0
  assert (m.preemptions_swap if mode == "swap" else m.preemptions_recompute) > 0
  if depth == 2:  # steps planned with two steps unread, and steps that read the older first
    assert memory["kept"] > 20 and memory["read_first"] > 20, memory
  growth = memory["end"] - memory["start"]
  # Flat: after 1,000 more requests paxcache holds nothing more (one leaked request with its
  # sequences is ~1 KiB, so 1,000 would be ~1 MiB); 16 KiB allows for small caches.
  assert growth < 16 * 1024, f"paxcache's heap grew by {growth} bytes"
  print(
    f"soak[{mode}, async={async_scheduling}]: {NUM_REQUESTS} requests, {m.steps} steps in "
    f"{elapsed:.1f} s, "
    f"{m.preemptions} preemptions, {m.aborted_requests} aborts, {m.cow_copies} copies, "
    f"{m.prefix_hit_tokens} prefix-hit tokens, {m.compiled_shapes} shapes, heap "
    f"{memory['start']} -> {memory['end']} B"
  )
