"""Engine tests: greedy parity with full recomputation under preemption, the seed's shared
system prompt scenario, bad input, aborts, stops and sampling."""

from __future__ import annotations

import collections
import dataclasses
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from paxcache.allocator import PENDING_TOKEN
from paxcache.engine import (
  Engine,
  EngineConfig,
  Request,
  RequestError,
  SimulatedClock,
  sample_tokens,
)
from paxcache.nn import TINY_CORPUS, Decoder, DecoderConfig, greedy_generate_no_cache, load_decoder

PERIOD = ord(".")


@pytest.fixture(scope="module")
def tiny():
  return load_decoder()


@pytest.fixture(scope="module")
def corpus():
  with open(TINY_CORPUS, "rb") as f:
    return f.read()


def _mixed_requests(corpus: bytes) -> list[Request]:
  """Mixed prompt (2-150 tokens) and output (4-40) lengths; four prompts share a 48-token
  prefix (6 blocks of 8); forks with n = 2 and 3; half stop at the first period."""
  rng = np.random.default_rng(7)
  shared = list(corpus[100:148])
  spec = [  # (prompt length, max_new_tokens, n)
    (2, 30, 1),
    (150, 12, 1),
    (17, 40, 2),
    (60, 25, 1),
    (5, 8, 3),
    (90, 20, 1),
    (33, 35, 1),
    (120, 6, 2),
    (9, 40, 1),
    (70, 4, 1),
    (48, 30, 1),
    (100, 16, 1),
  ]
  reqs = []
  for i, (p, g, n) in enumerate(spec):
    start = int(rng.integers(0, len(corpus) - 200))
    prompt = list(corpus[start : start + p])
    if i % 3 == 0:
      prompt = shared + prompt[:10]
    reqs.append(Request(i, prompt, max_new_tokens=g, n=n, end_token=PERIOD if i % 2 else None))
  return reqs


@pytest.fixture(scope="module")
def parity_case(tiny, corpus):
  reqs = _mixed_requests(corpus)
  want = greedy_generate_no_cache(
    tiny, [r.prompt for r in reqs], [r.max_new_tokens for r in reqs], end_token=PERIOD
  )
  # Requests without an end token must not stop at it: recompute those without one.
  free = [i for i, r in enumerate(reqs) if r.end_token is None]
  unstopped = greedy_generate_no_cache(
    tiny, [reqs[i].prompt for i in free], [reqs[i].max_new_tokens for i in free]
  )
  for i, out in zip(free, unstopped, strict=True):
    want[i] = out
  return reqs, want


def _pressure_config(
  mode: str, async_scheduling: bool, dispatch_thread=False, pipeline_depth=1, num_blocks=40
) -> EngineConfig:
  """A pool of 40 blocks of 8 for the mixed requests: preemption, forks and prefix hits."""
  return EngineConfig(
    dispatch_thread=dispatch_thread,
    pipeline_depth=pipeline_depth,
    num_blocks=num_blocks,
    block_size=8,
    num_host_blocks=256,
    preemption_mode=mode,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    check_invariants=True,
    async_scheduling=async_scheduling,
  )


def test_recomputed_tokens_account_for_every_token_computed_twice(tiny, corpus):
  # Without prefix caching, forks or end tokens a request of prompt P and G outputs costs
  # P + G - 1 computed tokens (the last output is never fed back); whatever a recompute
  # preemption throws away is computed again, and is what recomputed_tokens counts.
  reqs = [
    Request(i, list(corpus[40 * i : 40 * i + 20 + 3 * i]), max_new_tokens=30 + 5 * i)
    for i in range(6)
  ]
  config = EngineConfig(
    num_blocks=24,
    block_size=8,
    preemption_mode="recompute",
    enable_prefix_caching=False,
    max_num_seqs=6,
    max_num_batched_tokens=32,
    check_invariants=True,
  )
  engine = Engine(tiny, config)
  engine.run(reqs)
  m = engine.metrics
  assert m.preemptions_recompute > 0 and m.recomputed_tokens > 0
  base = sum(len(r.prompt) + r.max_new_tokens - 1 for r in reqs)
  assert m.computed_tokens == base + m.recomputed_tokens


@pytest.mark.parametrize(
  "async_scheduling,dispatch_thread,depth",
  [(False, False, 1), (True, False, 1), (True, True, 1), (True, False, 2)],
  ids=["sync", "async", "async-thread", "async-depth2"],
)
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_greedy_parity_with_no_cache_under_preemption_prefix_hits_and_forks(
  tiny, parity_case, mode, async_scheduling, dispatch_thread, depth
):
  reqs, want = parity_case
  config = _pressure_config(mode, async_scheduling, dispatch_thread, pipeline_depth=depth)
  engine = Engine(tiny, config)
  outs = engine.run(reqs)
  m = engine.metrics
  assert sorted(outs) == [r.request_id for r in reqs]
  for r, w in zip(reqs, want, strict=True):
    assert len(outs[r.request_id].samples) == r.n
    for sample in outs[r.request_id].samples:
      assert sample == w, (r.request_id, bytes(sample), bytes(w))
  if mode == "swap":
    assert m.preemptions_swap > 0 and m.swapped_out_blocks > 0 and m.swapped_in_blocks > 0
    assert m.preemptions_recompute == 0
  else:
    assert m.preemptions_recompute > 0 and m.preemptions_swap == 0 and m.swapped_out_blocks == 0
  assert m.prefix_hit_tokens >= 3 * 48  # the three later sharers hit the 6 shared blocks
  # A fork's samples share a partly filled last prompt block: all but the last writer copy it
  # (no copy when the prompt ends on a block boundary; a fork recomputed after preemption
  # loses its sharing).
  max_copies = sum(r.n - 1 for r in reqs if len(r.prompt) % config.block_size)
  assert 0 < m.cow_copies <= max_copies
  assert m.max_blocks_used <= config.num_blocks
  assert engine.allocator.num_used_blocks == 0
  assert engine.allocator.num_free_host_blocks == config.num_host_blocks
  steps = list(engine.step_metrics)
  assert sum(s.preemptions_swap + s.preemptions_recompute for s in steps) == m.preemptions
  assert (
    sum(s.num_sampled for s in steps)
    == m.generated_tokens
    == sum(len(s) for o in outs.values() for s in o.samples)
  )
  # With overlap scheduling the last step only reads the tokens of the one before it.
  assert all(s.tokens_per_s > 0 or (async_scheduling and s.num_seqs == 0) for s in steps)
  assert all(s.blocks_used <= config.num_blocks for s in steps)
  print(
    f"parity[{mode}]: {m.steps} steps, {m.preemptions_swap} swap + {m.preemptions_recompute} "
    f"recompute preemptions, {m.prefix_hit_tokens} prefix-hit tokens, {m.cow_copies} copies, "
    f"{m.compiled_shapes} shapes"
  )


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_forked_group_swaps_its_shared_blocks_once(tiny, corpus, async_scheduling):
  """Four sampled samples of one 30-token prompt (blocks of 8: three full, shared, and a
  partly filled one each sample copies), preempted by a request that arrived before them.
  The group swaps out each of its distinct blocks once, so a host pool smaller than its
  samples' blocks counted one by one still takes it (such a group used to be recomputed),
  and it comes back sharing its prompt. The outputs are those of a pool large enough that
  nothing is preempted (a sample's tokens depend on its seed and positions only)."""
  first = Request("first", list(corpus[0:60]), max_new_tokens=70)
  group = Request("group", list(corpus[300:330]), max_new_tokens=30, n=4, temperature=1.0, seed=3)
  config = EngineConfig(
    num_blocks=32,
    block_size=8,
    num_host_blocks=22,
    # Off, so that a swap-in copies every block back and shares only what the group did
    # (with it, cached full blocks come back without a copy, shared or not).
    enable_prefix_caching=False,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    check_invariants=True,
    async_scheduling=async_scheduling,
  )
  roomy = Engine(tiny, dataclasses.replace(config, num_blocks=200)).run([first, group])
  engine = Engine(tiny, config)
  calls = []
  swap_out_group = engine.allocator.swap_out_group

  def spy(seq_ids):
    blocks = [engine.allocator.sequence(s).block_ids.tolist() for s in seq_ids]
    pairs = swap_out_group(seq_ids)
    calls.append((sum(map(len, blocks)), len({b for bs in blocks for b in bs}), len(pairs)))
    return pairs

  swap_in_group = engine.allocator.swap_in_group
  back = []

  def spy_in(seq_ids):
    host = [engine.allocator.sequence(s).host_block_ids.tolist() for s in seq_ids]
    pairs = swap_in_group(seq_ids)
    dev = [engine.allocator.sequence(s).block_ids.tolist() for s in seq_ids]
    distinct = (len({b for h in host for b in h}), len({b for d in dev for b in d}))
    back.append((sum(map(len, host)), *distinct, len(pairs)))
    return pairs

  engine.allocator.swap_out_group = spy
  engine.allocator.swap_in_group = spy_in
  outs = engine.run([first, group])
  m = engine.metrics
  assert m.preemptions_swap > 0 and m.preemptions_recompute == 0
  # Some swap-out of the group moved fewer blocks than its samples hold one by one, and more
  # than the host pool could have taken that way.
  assert any(moved == distinct < held for held, distinct, moved in calls), calls
  assert any(held > config.num_host_blocks for held, _, _ in calls), calls
  # ... and came back as many device blocks as host blocks (shared again), each copied once.
  assert back and all(host == dev == moved < held for held, host, dev, moved in back), back
  assert {k: o.samples for k, o in outs.items()} == {k: o.samples for k, o in roomy.items()}
  assert len(set(map(tuple, outs["group"].samples))) == 4  # the samples differ
  assert engine.allocator.num_free_host_blocks == config.num_host_blocks


def test_seed_scenario_100_requests_share_a_5000_token_system_prompt():
  """100 requests = one 5,000-token system prompt + 4 own tokens; 10 of them fork (n=2).

  The prompt's 312 full blocks are stored once; each request's own tokens start a fresh
  block (the 313th), each fork's samples copy it on write; outputs equal a no-sharing
  full recomputation. A 1-layer model keeps the no-cache oracle affordable on CPU.
  """
  t0 = time.perf_counter()
  bs, system_len, num_req, new_tokens = 16, 5000, 100, 4
  config = DecoderConfig(
    d_model=32,
    num_layers=1,
    num_q_heads=2,
    num_kv_heads=1,
    head_dim=16,
    mlp_dim=64,
    max_seq_len=5120,
  )
  model = Decoder(config, rngs=nnx.Rngs(11))
  rng = np.random.default_rng(0)
  system = rng.integers(0, 256, system_len).tolist()
  reqs = [
    Request(
      i,
      system + rng.integers(0, 256, 4).tolist(),
      max_new_tokens=new_tokens,
      n=2 if i % 10 == 0 else 1,
    )
    for i in range(num_req)
  ]
  engine = Engine(
    model,
    EngineConfig(
      num_blocks=700,
      block_size=bs,
      num_host_blocks=0,
      preemption_mode="recompute",
      max_num_seqs=128,
      max_num_batched_tokens=1024,
    ),
  )
  for r in reqs:
    engine.add_request(r)
  outs = {}
  checked = False
  while engine.has_unfinished():
    for o in engine.step():
      outs[o.request_id] = o
    sched = engine.scheduler
    if not checked and not sched.waiting and len(sched.running) == num_req:
      checked = True
      alloc = engine.allocator
      shared = system_len // bs  # 312 full blocks
      views = [alloc.sequence((i, 0)) for i in range(num_req)]
      first = views[0].block_ids[:shared]
      for v in views:
        np.testing.assert_array_equal(v.block_ids[:shared], first)
      seqs = sum(len(g.live) for g in sched.running)
      assert all(alloc.ref_count(int(b)) == seqs for b in first)
      own = {int(v.block_ids[shared]) for v in views}
      assert len(own) == num_req  # the first divergent token starts a fresh block
      # Stored once: 312 shared + one own block per sample (a fork's samples each copied it).
      assert alloc.num_used_blocks == shared + seqs
  assert checked
  m = engine.metrics
  assert m.prefix_hit_tokens == (num_req - 1) * (system_len // bs) * bs
  assert m.cow_copies >= 10  # every fork copies its shared last block on its first own token
  want = greedy_generate_no_cache(model, [r.prompt for r in reqs], new_tokens)
  for r, w in zip(reqs, want, strict=True):
    assert outs[r.request_id].samples == [w] * r.n
  elapsed = time.perf_counter() - t0
  print(
    f"seed scenario: {elapsed:.1f} s, {m.steps} steps, blocks used max {m.max_blocks_used} "
    f"(no sharing would need {num_req * -(-(system_len + 4 + new_tokens) // bs)})"
  )


def _snapshot(engine: Engine):
  s = engine.scheduler
  return (
    len(s.waiting),
    len(s.running),
    len(s.swapped),
    engine.num_unfinished(),
    engine.allocator.metrics(),
    engine.metrics.as_dict(),
  )


def test_bad_input_raises_and_changes_nothing(tiny):
  engine = Engine(tiny, EngineConfig(num_blocks=16, block_size=8, num_host_blocks=16))
  engine.add_request(Request("ok", list(b"the cat "), max_new_tokens=4))
  engine.step()
  before = _snapshot(engine)
  max_len = tiny.config.max_seq_len
  bad = {
    "empty prompt": Request("a", [], max_new_tokens=4),
    "max_seq_len": Request("b", [1] * (max_len + 1), max_new_tokens=1),
    "never fit": Request("c", [1] * 100, max_new_tokens=40),  # 18 blocks > 16
    "already in the engine": Request("ok", [1, 2], max_new_tokens=1),
    "not ints in": Request("d", [1, 256], max_new_tokens=1),
    "max_new_tokens >= 1": Request("e", [1], max_new_tokens=0),
    "can never be resident": Request("f", [1], max_new_tokens=1, n=33),  # max_num_seqs 32
  }
  for match, req in bad.items():
    with pytest.raises(RequestError, match=match):
      engine.add_request(req)
    assert _snapshot(engine) == before
  with pytest.raises(RequestError, match="unknown request id 'nope'"):
    engine.abort("nope")
  assert _snapshot(engine) == before
  out = engine.run()
  assert list(out) == ["ok"] and len(out["ok"].samples[0]) == 4


def test_request_fields_are_type_checked_and_the_prompt_is_copied(tiny):
  engine = Engine(tiny, EngineConfig(num_blocks=16, block_size=8))
  before = _snapshot(engine)
  nan, inf = float("nan"), float("inf")
  bad = {  # field the message must name -> a request wrong only in that field
    "max_new_tokens": Request("a", [1, 2], max_new_tokens=2.5),
    "n": Request("b", [1, 2], max_new_tokens=2, n=True),
    "top_k": Request("c", [1, 2], max_new_tokens=2, top_k=1.0),
    "temperature": Request("d", [1, 2], max_new_tokens=2, temperature=nan),
    "temperature ": Request("e", [1, 2], max_new_tokens=2, temperature=inf),
    "end_token": Request("f", [1, 2], max_new_tokens=2, end_token=256),
    "prompt": Request("g", [1, -2], max_new_tokens=2),
    "prompt ": Request("h", [1, 2.0], max_new_tokens=2),
    "prompt  ": Request("i", [1, True], max_new_tokens=2),
    "prompt   ": Request("j", 12, max_new_tokens=2),
    "prompt    ": Request("k", "ab", max_new_tokens=2),
    "seed": Request("l", [1, 2], max_new_tokens=2, temperature=1.0, seed=1.5),
    "seed ": Request("m", [1, 2], max_new_tokens=2, temperature=1.0, seed=2**31),
    "seed  ": Request("n", [1, 2], max_new_tokens=2, temperature=1.0, seed=-1),
  }
  for field, req in bad.items():
    with pytest.raises(RequestError, match=rf"{req.request_id!r}.*\b{field.strip()}\b"):
      engine.add_request(req)
    assert _snapshot(engine) == before
  # A one-shot iterable is read once; NumPy integers are taken as ints.
  words = list(b"the cat ")
  engine.add_request(Request("gen", (t for t in words), max_new_tokens=3))
  engine.add_request(Request("np", np.array(words), max_new_tokens=np.int64(3), top_k=np.int32(0)))
  out = engine.run()
  want = greedy_generate_no_cache(tiny, [words], 3)[0]
  assert out["gen"].samples == [want] and out["np"].samples == [want]
  assert out["gen"].prompt_len == len(words)


@pytest.mark.parametrize(
  "dispatch_thread,depth,burst",
  [(False, 1, 1), (True, 1, 1), (False, 2, 1), (False, 1, 4), (True, 1, 4)],
  ids=["", "thread", "depth2", "burst", "burst-thread"],
)
def test_async_abort_returns_what_was_produced_without_placeholders(
  tiny, dispatch_thread, depth, burst
):
  # The steps still unread are read first (one, two with pipeline_depth=2, or a whole
  # burst): the aborted request's output holds only real tokens, and the other one ends
  # as without the abort.
  config = EngineConfig(
    num_blocks=32,
    block_size=8,
    async_scheduling=True,
    dispatch_thread=dispatch_thread,
    pipeline_depth=depth,
    decode_steps=burst,
    max_num_seqs=2,
    max_num_batched_tokens=32,
  )
  engine = Engine(tiny, config)
  engine.add_request(Request("a", list(b"the old man "), max_new_tokens=30))
  engine.add_request(Request("b", list(b"a young girl "), max_new_tokens=30))
  for _ in range(6 if burst == 1 else 4):
    engine.step()
  if depth == 2:
    assert engine._older is not None  # two steps unread when aborting
  if burst > 1:  # a burst unread when aborting
    assert engine.step_metrics[-1].decode_steps == burst and engine._burst_rest
  out = engine.abort("a")
  assert len(out.samples[0]) >= 3 and PENDING_TOKEN not in out.samples[0]
  assert (
    out.samples[0]
    == greedy_generate_no_cache(tiny, [list(b"the old man ")], 30)[0][: len(out.samples[0])]
  )
  rest = engine.run()
  assert list(rest) == ["b"]
  assert rest["b"].samples[0] == greedy_generate_no_cache(tiny, [list(b"a young girl ")], 30)[0]
  assert engine.allocator.num_used_blocks == 0


def test_abort_frees_blocks_and_keeps_other_requests_exact(tiny):
  engine = Engine(tiny, EngineConfig(num_blocks=32, block_size=8, num_host_blocks=32))
  keep = Request("keep", list(b"the farmer "), max_new_tokens=12)
  engine.add_request(keep)
  engine.add_request(Request("drop", list(b"a small boy "), max_new_tokens=30, n=2))
  for _ in range(4):
    engine.step()
  out = engine.abort("drop")
  assert out.finish_reasons == ["abort", "abort"] and all(out.samples)
  assert ("drop", 0) not in engine.allocator and ("drop", 1) not in engine.allocator
  rest = engine.run()
  assert list(rest) == ["keep"]
  assert rest["keep"].samples[0] == greedy_generate_no_cache(tiny, [keep.prompt], 12)[0]
  assert engine.allocator.num_used_blocks == 0
  with pytest.raises(RequestError, match="unknown request id"):
    engine.abort("drop")  # already gone: never answered twice


def test_abort_before_the_fork_returns_one_empty_sample_per_sample(tiny):
  # n=3 is one sequence until its prompt is computed: aborted then (queued, or partway
  # through a chunked prefill), the output still has three samples, as for one not arrived.
  for steps in (0, 1):
    engine = Engine(tiny, EngineConfig(num_blocks=32, block_size=8, max_num_batched_tokens=8))
    engine.add_request(Request("r", list(b"a small boy walked in "), max_new_tokens=4, n=3))
    for _ in range(steps):
      engine.step()
    out = engine.abort("r")
    assert out.samples == [[], [], []] and out.finish_reasons == ["abort"] * 3, steps
    assert engine.allocator.num_used_blocks == 0


def test_top_k_of_at_least_the_vocabulary_is_the_whole_vocabulary(tiny):
  # top_k=2**40 was accepted, then overflowed the step's int32 array after the scheduler had
  # planned the step: every later step failed and the allocator ran ahead of the sequences.
  prompt = list(b"the old man ")
  outs = {}
  for k in (0, tiny.config.vocab_size, 2**40):
    engine = Engine(tiny, EngineConfig(num_blocks=32, block_size=8, check_invariants=True))
    r = Request("r", prompt, max_new_tokens=8, temperature=1.0, top_k=k, seed=3)
    outs[k] = engine.run([r])["r"].samples
    assert engine.allocator.num_used_blocks == 0
  assert outs[0] == outs[tiny.config.vocab_size] == outs[2**40]


def test_a_fork_that_swapping_would_unshare_past_the_pool_is_recomputed(tiny, corpus):
  # Swapped out, each of n samples owns copies of the blocks they shared. A: 8 prompt
  # tokens + 8 new, n=3: running, the three share one prompt block (4 blocks in all);
  # swapped in, they would need 3 x 2 blocks and one more each, 9 of a pool of 6, and
  # the engine stopped ("made no progress") with A swapped forever. Preempted as a
  # recompute instead, both requests finish with the roomy engine's tokens.
  reqs = [
    Request("B", list(corpus[0:15]), max_new_tokens=10),
    Request("A", list(corpus[200:208]), max_new_tokens=8, n=3),
  ]
  roomy = Engine(tiny, EngineConfig(num_blocks=64, block_size=8)).run(reqs)
  for caching in (False, True):
    config = EngineConfig(
      num_blocks=6, block_size=8, num_host_blocks=32, max_num_seqs=4,
      enable_prefix_caching=caching, check_invariants=True,
    )  # fmt: skip
    engine = Engine(tiny, config)
    outs = engine.run(reqs)
    assert {k: o.samples for k, o in outs.items()} == {k: o.samples for k, o in roomy.items()}
    assert engine.metrics.preemptions_recompute > 0, caching
    assert engine.allocator.num_used_blocks == 0


def test_stops_at_end_token_or_max_tokens(tiny):
  engine = Engine(tiny, EngineConfig(num_blocks=32, block_size=8, num_host_blocks=8))
  prompt = list(b"the king ")
  full = greedy_generate_no_cache(tiny, [prompt], 40)[0]
  assert PERIOD in full
  out = engine.run(
    [
      Request("stop", prompt, max_new_tokens=40, end_token=PERIOD),
      Request("len", prompt, max_new_tokens=5),
    ]
  )
  assert out["stop"].samples[0] == full[: full.index(PERIOD) + 1]
  assert out["stop"].finish_reasons == ["stop"]
  assert out["len"].samples[0] == full[:5] and out["len"].finish_reasons == ["length"]


def test_sampled_outputs_do_not_depend_on_batching_or_swapping(tiny, corpus):
  """Each token's key is (seed, sample, position): a roomy pool and a tiny swapping pool
  give the same samples; top_k=1 is greedy at any temperature."""
  reqs = [
    Request(
      i,
      list(corpus[50 * i : 50 * i + 20]),
      max_new_tokens=20,
      n=2,
      temperature=0.9,
      top_k=8 if i % 2 else 0,
    )
    for i in range(5)
  ]
  roomy = Engine(tiny, EngineConfig(num_blocks=128, block_size=8, num_host_blocks=8)).run(reqs)
  small = Engine(
    tiny, EngineConfig(num_blocks=16, block_size=8, num_host_blocks=64, max_num_batched_tokens=32)
  )
  tight = small.run(reqs)
  assert small.metrics.preemptions_swap > 0
  for r in reqs:
    assert roomy[r.request_id].samples == tight[r.request_id].samples
  assert any(len(set(map(tuple, o.samples))) > 1 for o in roomy.values())  # samples differ
  greedy = greedy_generate_no_cache(tiny, [reqs[0].prompt], 20)[0]
  out = Engine(tiny, EngineConfig(num_blocks=32, block_size=8, num_host_blocks=8)).run(
    [Request("k1", reqs[0].prompt, max_new_tokens=20, temperature=2.0, top_k=1)]
  )
  assert out["k1"].samples[0] == greedy


def test_sample_tokens_follows_softmax_and_top_k():
  logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05], jnp.float32))
  rows = 4000
  tile = jnp.tile(logits, (rows, 1))
  key = jax.random.key(0)
  zeros = jnp.zeros(rows, jnp.int32)
  pos = jnp.arange(rows, dtype=jnp.int32)
  got = np.asarray(sample_tokens(tile, jnp.ones(rows), zeros, key, zeros, zeros, pos))
  freq = np.bincount(got, minlength=4) / rows
  # 4000 draws: the standard error of a frequency is <= 0.008; 0.03 is ~4 sigma.
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  top2 = np.asarray(sample_tokens(tile, jnp.ones(rows), zeros + 2, key, zeros, zeros, pos))
  assert set(top2.tolist()) == {0, 1}
  np.testing.assert_allclose(np.mean(top2 == 0), 0.5 / 0.8, atol=0.03)
  greedy = np.asarray(sample_tokens(tile, jnp.zeros(rows), zeros, key, zeros, zeros, pos))
  assert (greedy == 0).all()
  # A tiny positive temperature is greedy in the limit, not garbage from inf - inf.
  cold = sample_tokens(tile, jnp.full(rows, 1e-38), zeros, key, zeros, zeros, pos)
  assert (np.asarray(cold) == 0).all()


def test_a_refused_request_changes_nothing_later_requests_sample():
  """A request refused for its seed does not advance the arrival counter (which seeds the
  requests that bring none), and run() with one bad request queues none of them."""

  def sampled(engine_requests):
    engine = Engine(load_decoder(), EngineConfig(num_blocks=32, block_size=8))
    for r in engine_requests[:-1]:
      with pytest.raises(RequestError, match="seed"):
        engine.add_request(r)
    return engine.run([engine_requests[-1]])["x"].samples

  good = Request("x", list(b"the old man "), max_new_tokens=12, temperature=1.0)
  bad = Request("bad", [1, 2], max_new_tokens=2, temperature=1.0, seed="7")
  assert sampled([bad, good]) == sampled([good])
  engine = Engine(load_decoder(), EngineConfig(num_blocks=32, block_size=8))
  with pytest.raises(RequestError, match="request 'bad'.*seed"):
    engine.run([Request("y", [1, 2], max_new_tokens=2), bad])
  assert not engine.has_unfinished() and engine.scheduler.waiting == collections.deque()
  with pytest.raises(RequestError, match="appears twice"):
    engine.run([Request("y", [1, 2], max_new_tokens=2), Request("y", [3], max_new_tokens=2)])
  assert not engine.has_unfinished()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_jitted_step_is_traced_once_per_padded_shape(monkeypatch, async_scheduling):
  """Steps of one padded shape reuse one trace of the jitted step: a prefill step, then
  nine decode steps in one bucket, trace it twice in all; a second engine over the same
  model (which shares the compiled steps) traces it no more.

  The engine's ``jax.jit`` wraps ``_engine._device_step`` when its step function is built,
  so a ``chex.assert_max_traces`` wrapper put there first sees every trace: the Python
  body of a jitted function runs once per trace, not per call. The cached step functions
  are dropped before and after, so that no other test shares the wrapped one."""
  from paxcache.engine import _engine

  traced = collections.Counter()  # traces per static layout (one per padded shape)
  device_step = _engine._device_step

  def counted(graphdef, treedef, params, cache, packed, layout, key, prev_tokens):
    traced[layout] += 1
    return device_step(graphdef, treedef, params, cache, packed, layout, key, prev_tokens)

  chex.clear_trace_counter()
  _engine._jitted_step.cache_clear()
  monkeypatch.setattr(_engine, "_device_step", chex.assert_max_traces(counted, n=2))
  try:
    config = DecoderConfig(d_model=32, num_layers=1, head_dim=8, mlp_dim=64, max_seq_len=64)
    model = Decoder(config, rngs=nnx.Rngs(0))
    # Prompts of 9 and 10 tokens (no shared prefix), 10 new tokens each: every decode step
    # has 2 rows and at most 20 tokens a sequence, inside the smallest buckets (8 rows, 8
    # blocks), and no request stops early (greedy, no end token).
    prompts = [list(range(3, 12)), list(range(40, 50))]
    reqs = [Request(i, p, max_new_tokens=10) for i, p in enumerate(prompts)]
    cfg = EngineConfig(num_blocks=16, block_size=8, async_scheduling=async_scheduling)
    engine = Engine(model, cfg)
    outs = engine.run(reqs)
    assert all(len(outs[r.request_id].samples[0]) == 10 for r in reqs)
    assert len(engine.step_metrics) >= 10  # 1 prefill + 9 decode steps (async: one more)
    assert len(engine._shapes) == 2  # the prefill shape and the decode shape
    assert sorted(traced.values()) == [1, 1]
    # Same model, same shapes: the second engine reuses both compiled steps.
    Engine(model, cfg).run(reqs)
    assert sorted(traced.values()) == [1, 1]
  finally:
    _engine._jitted_step.cache_clear()


@pytest.mark.parametrize("backend,head_dim", [("gpu", 64), ("tpu", 128)])
def test_engine_on_pallas_kernels_in_interpret_mode_matches_no_cache(backend, head_dim):
  """The engine's padded batches (ragged prefill and decode-only steps, a fork) through the
  Pallas GPU and TPU kernels in interpret mode give the greedy no-cache tokens."""
  config = DecoderConfig(
    d_model=32,
    num_layers=1,
    num_q_heads=2,
    num_kv_heads=1,
    head_dim=head_dim,
    mlp_dim=64,
    max_seq_len=64,
  )
  model = Decoder(config, backend=backend, interpret=True, rngs=nnx.Rngs(0))
  oracle = Decoder(config, rngs=nnx.Rngs(0))  # same parameters, reference backend
  reqs = [
    Request(0, list(range(3, 13)), max_new_tokens=4),
    Request(1, list(range(40, 59)), max_new_tokens=4, n=2),
  ]
  engine = Engine(model, EngineConfig(num_blocks=16, block_size=8, num_host_blocks=16))
  outs = engine.run(reqs)
  want = greedy_generate_no_cache(oracle, [r.prompt for r in reqs], 4)
  for r, w in zip(reqs, want, strict=True):
    assert outs[r.request_id].samples == [w] * r.n
  assert engine.metrics.cow_copies == 1


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_async_scheduling_samples_the_same_tokens_as_the_synchronous_engine(tiny, corpus, mode):
  """Overlap scheduling (step n + 1 planned while step n runs, its input tokens read on the
  device) changes when the host learns tokens, not which tokens: sampled and greedy
  requests, end tokens, forks, prefix hits and preemption give the same outputs."""
  reqs = [
    dataclasses.replace(r, temperature=0.0 if i % 3 == 0 else 0.9, top_k=0 if i % 2 else 12)
    for i, r in enumerate(_mixed_requests(corpus))
  ]
  outs, engines = {}, {}
  for flag in (False, True, "thread"):
    engines[flag] = engine = Engine(tiny, _pressure_config(mode, bool(flag), flag == "thread"))
    if flag:
      # White box: after the first step its tokens are still on the device, and the host
      # holds a placeholder for each sample.
      for r in reqs:
        engine.add_request(r)
      engine.step()
      assert engine._in_flight is not None
      assert all(s.tokens[-1] == PENDING_TOKEN for s, _ in engine._in_flight.entries)
    outs[flag] = engine.run([] if flag else reqs)
  # The calls on a dispatch thread (EngineConfig.dispatch_thread) change when the host
  # makes them, not what they compute.
  assert outs[True] == outs[False] == outs["thread"]
  sync, overlap = engines[False].metrics, engines[True].metrics
  assert (
    overlap.generated_tokens == sync.generated_tokens == engines["thread"].metrics.generated_tokens
  )
  assert overlap.preemptions > 0 and sync.preemptions > 0
  assert engines[True].allocator.num_used_blocks == 0
  assert engines["thread"].allocator.num_used_blocks == 0


def test_dispatch_thread_makes_the_calls_off_the_engines_thread_and_in_order(tiny, corpus):
  import threading

  engine = Engine(tiny, _pressure_config("swap", True, dispatch_thread=True))
  step_fn, build = engine._step_fn, engine._build_batch
  built, called, threads = [], [], set()

  def build_batch(plan):  # on the engine's thread, in step order
    batch = build(plan)
    built.append(id(batch))
    return batch

  def call(params, cache, batch, key, prev):
    threads.add(threading.current_thread().name)
    called.append(id(batch))
    time.sleep(0.002)  # a slow launch: the engine's thread runs ahead meanwhile
    return step_fn(params, cache, batch, key, prev)

  engine._build_batch, engine._step_fn = build_batch, call
  engine.run(_mixed_requests(corpus)[:3])
  assert len(threads) == 1 and threads != {threading.current_thread().name}, threads
  assert called == built and len(called) > 10  # every batch called once, in the built order
  jax.block_until_ready(engine.cache)  # waits for the worker; the pool is whole


def test_dispatch_thread_reports_a_failed_call_and_every_call_after_it(tiny, corpus):
  engine = Engine(tiny, _pressure_config("swap", True, dispatch_thread=True))
  step_fn, calls = engine._step_fn, []

  def call(params, cache, batch, key, prev):
    calls.append(1)
    if len(calls) == 3:
      raise ValueError("device lost")
    return step_fn(params, cache, batch, key, prev)

  engine._step_fn = call
  for r in _mixed_requests(corpus)[:2]:
    engine.add_request(r)
  # The error comes back with the step that reads the call's tokens (or waits for it),
  # wrapped, with the call's own error as its cause.
  with pytest.raises(RuntimeError, match="failed on the dispatch thread") as info:
    for _ in range(8):
      engine.step()
  assert isinstance(info.value.__cause__, ValueError)
  # Every later step, and the pool, raise it again instead of running on a lost pool.
  for again in (engine.step, lambda: engine.cache):
    with pytest.raises(RuntimeError, match="device lost"):
      again()
  assert len(calls) == 3


def _fail_at(engine: Engine, where: str, n: int) -> list:
  """Makes the engine's ``n``-th jitted call (``where="call"``: a trace, compile or launch
  error) or ``n``-th read of a step's tokens (``"read"``: an error the device reports after
  the call) raise ValueError("device lost"); returns the list that counts the calls."""
  calls = []
  name = "_step_fn" if where == "call" else "_resolve"
  inner = getattr(engine, name)

  def fail(*args):
    calls.append(1)
    if len(calls) == n:
      raise ValueError("device lost")
    return inner(*args)

  setattr(engine, name, fail)
  return calls


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("where", ["call", "read"])
def test_a_step_that_raises_stops_the_engine_instead_of_losing_requests(
  tiny, corpus, async_scheduling, where
):
  # Without this, the synchronous engine went on after a failed call and one of two
  # requests vanished unreturned (its step's appends were made, its tokens never were);
  # the overlapped one failed every later step with "last token is still pending".
  engine = Engine(tiny, _pressure_config("swap", async_scheduling))
  calls = _fail_at(engine, where, 3)
  requests = _mixed_requests(corpus)[:2]
  for r in requests:
    engine.add_request(r)
  steps = []
  with pytest.raises(ValueError, match="device lost"):  # raised as it is, once
    while len(steps) < 8:
      steps.append(1)
      engine.step()
  assert len(steps) == 3 + (where == "read" and async_scheduling)  # (read one step later)
  # Every later use raises an error naming it; nothing runs on the half-done state.
  later = [
    engine.step,
    lambda: engine.cache,
    lambda: engine.add_request(dataclasses.replace(requests[0], request_id="new")),
    lambda: engine.abort(requests[0].request_id),
  ]
  for again in later:
    with pytest.raises(RuntimeError, match=r"a step raised \(ValueError\('device lost'\)\)"):
      again()
  assert len(calls) == 3


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("where", ["call", "read"])
def test_the_requests_a_failed_engine_had_not_returned_finish_on_a_new_one(
  tiny, corpus, async_scheduling, where
):
  # Before Engine.unfinished_requests, the requests a failed step had not returned were
  # lost with the engine. Given back (sampling ones with the seeds they sample with, the
  # ones not yet arrived still to arrive), a new engine finishes each with the tokens the
  # engine would have produced had it not failed, under preemption, forks and prefix hits.
  requests = [
    dataclasses.replace(r, temperature=0.9 if i % 2 else 0.0, seed=5 if i == 3 else None)
    for i, r in enumerate(_mixed_requests(corpus)[:6])
  ]
  requests += [
    dataclasses.replace(r, request_id=f"late{i}", temperature=0.7, arrival_time=50.0 + i)
    for i, r in enumerate(_mixed_requests(corpus)[6:8])
  ]

  def engine():
    return Engine(tiny, _pressure_config("swap", async_scheduling), clock=SimulatedClock())

  reference, want, first = engine(), {}, None
  for r in requests:
    reference.add_request(r)
  while reference.has_unfinished():
    out = reference.step()
    want.update((o.request_id, o) for o in out)
    if out and first is None:
      first = reference.metrics.steps  # the step that returned the first output
  broken = engine()
  _fail_at(broken, where, first + 2)  # some returned, the rest not
  for r in requests:
    broken.add_request(r)
  got = {}
  with pytest.raises(ValueError, match="device lost"):
    for _ in range(40):
      got.update((o.request_id, o) for o in broken.step())
  again = broken.unfinished_requests()
  assert got and again  # the failure came after some requests finished, before all did
  assert {r.request_id for r in again} == {r.request_id for r in requests} - set(got)
  assert [r.request_id for r in again][-2:] == ["late0", "late1"]  # still to arrive
  assert all(r.seed is not None for r in again)
  assert [r.arrival_time for r in again[-2:]] == [50.0, 51.0]
  assert all(r.arrival_time is None for r in again[:-2])
  # The failed engine itself still refuses to go on.
  with pytest.raises(RuntimeError, match="unfinished_requests"):
    broken.step()
  fresh = engine()
  got.update(fresh.run(again))
  assert {k: v.samples for k, v in got.items()} == {k: v.samples for k, v in want.items()}
  assert {k: v.finish_reasons for k, v in got.items()} == {
    k: v.finish_reasons for k, v in want.items()
  }


def test_unfinished_requests_leaves_out_what_step_and_abort_returned(tiny, corpus):
  engine = Engine(tiny, _pressure_config("swap", False), clock=SimulatedClock())
  requests = _mixed_requests(corpus)[:4]
  late = dataclasses.replace(requests[3], request_id="late", arrival_time=30.0)
  for r in [*requests[:3], late]:
    engine.add_request(r)
  assert [r.request_id for r in engine.unfinished_requests()] == [0, 1, 2, "late"]
  # Seeds: the arrival order for the arrived (0, 1, 2), then the next for the late one.
  assert [r.seed for r in engine.unfinished_requests()] == [0, 1, 2, 3]
  engine.abort(1)
  engine.abort("late")
  assert [r.request_id for r in engine.unfinished_requests()] == [0, 2]
  done = set()
  while engine.has_unfinished():
    done |= {o.request_id for o in engine.step()}
    assert {r.request_id for r in engine.unfinished_requests()} == {0, 2} - done
  assert done == {0, 2} and engine.unfinished_requests() == []


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("num_blocks", "8", r"EngineConfig.num_blocks must be an int, got '8' \(str\)"),
    ("block_size", True, r"EngineConfig.block_size must be an int, got True \(bool\)"),
    ("seed", 1.5, r"EngineConfig.seed must be an int, got 1.5"),
    # jax.random.key keeps 32 bits: 2**40 would sample as seed 0 does; 2**70 failed in JAX.
    ("seed", 2**40, r"EngineConfig.seed must be in \[0, 2\*\*31\), got 1099511627776"),
    ("seed", 2**70, r"EngineConfig.seed must be in \[0, 2\*\*31\)"),
    ("seed", -1, r"EngineConfig.seed must be in \[0, 2\*\*31\), got -1"),
    ("async_scheduling", 1, r"EngineConfig.async_scheduling must be a bool, got 1"),
    ("dispatch_thread", 1, r"EngineConfig.dispatch_thread must be a bool, got 1"),
    ("dispatch_thread", True, r"dispatch_thread needs async_scheduling=True"),
    ("pipeline_depth", 3, r"EngineConfig.pipeline_depth must be 1 or 2, got 3"),
    ("pipeline_depth", 2.0, r"EngineConfig.pipeline_depth must be an int, got 2.0"),
    ("pipeline_depth", 2, r"pipeline_depth=2 needs async_scheduling=True"),
  ],
)
def test_engine_config_rejects_wrongly_typed_fields(field, value, match):
  with pytest.raises(ValueError, match=match):
    EngineConfig(**{field: value})


def test_engine_config_refuses_a_watermark_of_the_whole_pool():
  # Admission keeps watermark_blocks free while others run: with as many as the pool holds
  # the engine ran one request at a time without a word.
  EngineConfig(num_blocks=8, watermark_blocks=7)
  for watermark in (8, 9):
    with pytest.raises(ValueError, match=rf"watermark_blocks \({watermark}\) must be < num_blocks"):
      EngineConfig(num_blocks=8, watermark_blocks=watermark)


@pytest.mark.parametrize("config", [None, {"num_blocks": 16}], ids=["none", "dict"])
def test_an_engine_takes_only_an_engine_config(tiny, config):
  with pytest.raises(TypeError, match=r"config must be an EngineConfig, got (NoneType|dict)"):
    Engine(tiny, config)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_fork_counts_against_max_num_seqs_before_admission(tiny, corpus, async_scheduling):
  """Request 2 (n=2) forks in the step that computes its last prompt token; request 3 may
  be admitted in that step only if the fork's child still leaves a row under
  max_num_seqs (4). Counting residents before the fork admitted it: 5 rows, and the step's
  sample rows overflowed the 4 tokens each step returns."""
  spec = [(3, 14, 1), (40, 10, 1), (21, 12, 2), (9, 16, 1), (30, 8, 1)]
  reqs = [
    Request(i, list(corpus[37 * i + 11 : 37 * i + 11 + p]), max_new_tokens=g, n=n)
    for i, (p, g, n) in enumerate(spec)
  ]
  config = EngineConfig(
    num_blocks=14,
    block_size=8,
    num_host_blocks=32,
    preemption_mode="swap",
    max_num_seqs=4,
    max_num_batched_tokens=32,
    min_batch_bucket=4,
    min_token_bucket=32,
    check_invariants=True,
    async_scheduling=async_scheduling,
  )
  engine = Engine(tiny, config)
  for r in reqs:
    engine.add_request(r)
  outputs = {}
  while engine.has_unfinished():
    for out in engine.step():
      outputs[out.request_id] = out
    assert engine.scheduler.num_resident_seqs() <= config.max_num_seqs
  assert sorted(outputs) == list(range(len(spec)))
  assert [len(outputs[i].samples) for i in range(len(spec))] == [n for _, _, n in spec]
  for i, (_, g, _) in enumerate(spec):
    assert all(len(s) == g for s in outputs[i].samples)


def test_lane_dense_cache_gives_the_plain_caches_tokens_under_swap_prefix_hits_and_forks(corpus):
  # EngineConfig.lane_dense_cache: head_dim 64 in rows of 128 (two tokens a row). Writes,
  # copy-on-write, swap out and in, and attention all read it as the plain layout, so the
  # engine's tokens are the plain cache's, one for one.
  config = DecoderConfig(
    d_model=64, num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=64, mlp_dim=64,
    max_seq_len=256,
  )  # fmt: skip
  model = Decoder(config, rngs=nnx.Rngs(12))
  reqs = _mixed_requests(corpus)
  outs = {}
  for dense in (False, True):
    engine = Engine(
      model, dataclasses.replace(_pressure_config("swap", True), lane_dense_cache=dense)
    )
    assert engine.cache.lane_dense == dense
    outs[dense] = engine.run(reqs)
    assert engine.metrics.preemptions_swap > 0 and engine.metrics.cow_copies > 0
  for r in reqs:
    assert outs[True][r.request_id].samples == outs[False][r.request_id].samples, r.request_id
  with pytest.raises(ValueError, match="head_dim 32 or 64"):
    Engine(load_decoder(), EngineConfig(lane_dense_cache=True))


def test_lane_padded_cache_gives_the_plain_caches_tokens_under_swap_prefix_hits_and_forks(corpus):
  # EngineConfig.lane_padded_cache: head_dim 80 in rows of 128, zeros after the real lanes.
  # Writes, copy-on-write, swap out and in (the real lanes: a host pool of head_dim 80)
  # and attention (q zero-padded) give the plain cache's tokens, one for one.
  config = DecoderConfig(
    d_model=64, num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=80, mlp_dim=64,
    max_seq_len=256,
  )  # fmt: skip
  model = Decoder(config, rngs=nnx.Rngs(13))
  reqs = _mixed_requests(corpus)
  outs = {}
  for padded in (False, True):
    engine = Engine(
      model, dataclasses.replace(_pressure_config("swap", True), lane_padded_cache=padded)
    )
    assert engine.cache.lane_padded == padded and engine.cache.head_dim == 80
    assert engine.cache.k[0].shape[3] == (128 if padded else 80)
    assert engine.host_pool.k.shape[4] == 80
    outs[padded] = engine.run(reqs)
    assert engine.metrics.preemptions_swap > 0 and engine.metrics.cow_copies > 0
    if padded:
      assert all((np.asarray(p)[..., 80:] == 0).all() for p in engine.cache.k + engine.cache.v)
  for r in reqs:
    assert outs[True][r.request_id].samples == outs[False][r.request_id].samples, r.request_id
  wide = Decoder(dataclasses.replace(config, head_dim=128), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="head_dim 128 is a multiple of 128 already"):
    Engine(wide, EngineConfig(num_blocks=8, num_host_blocks=8, lane_padded_cache=True))
  with pytest.raises(ValueError, match="lane_dense_cache and lane_padded_cache are two layouts"):
    EngineConfig(lane_dense_cache=True, lane_padded_cache=True)
  with pytest.raises(ValueError, match="EngineConfig.lane_padded_cache must be a bool"):
    EngineConfig(lane_padded_cache=1)


@pytest.mark.parametrize("dispatch_thread", [False, True], ids=["", "thread"])
def test_two_steps_on_the_device_sample_the_same_tokens(tiny, corpus, dispatch_thread):
  """pipeline_depth=2: the host reads step n's tokens after dispatching step n + 2. In a
  pool with room (no preemption) two steps stay unread in the steady state, and samples
  that stop at their end token run two discarded rows; under pressure (40 blocks) steps
  that could preempt read the older step first. Sampled and greedy requests, end tokens,
  forks and prefix hits give the outputs of the synchronous engine, and every block is
  returned."""
  reqs = [
    dataclasses.replace(r, temperature=0.0 if i % 3 == 0 else 0.9, top_k=0 if i % 2 else 12)
    for i, r in enumerate(_mixed_requests(corpus))
  ]
  want = Engine(tiny, _pressure_config("swap", False, num_blocks=400)).run(reqs)
  for num_blocks in (400, 40):
    config = _pressure_config(
      "swap", True, dispatch_thread, pipeline_depth=2, num_blocks=num_blocks
    )
    engine = Engine(tiny, config)
    most_pending = []
    schedule = engine.scheduler.schedule

    def counted(schedule=schedule, engine=engine, most_pending=most_pending):
      plan = schedule()  # its appends: the input tokens, pending while two steps are unread
      most_pending.append(int(engine.allocator._npend.max()))
      return plan

    engine.scheduler.schedule = counted
    keeps = []  # per step with an older step unread: planned with it still unread?
    can_keep = engine._can_keep_older

    def counted_keep(can_keep=can_keep, keeps=keeps):
      keeps.append(can_keep())
      return keeps[-1]

    engine._can_keep_older = counted_keep
    for r in reqs:
      engine.add_request(r)
    outs, dropped = {}, 0
    while engine.has_unfinished():
      for o in engine.step():
        outs[o.request_id] = o
      dropped = max(dropped, *engine._ignore.values(), 0)  # rows an end token discards
      if engine._older is not None:
        # Two steps unread: a plain decode in both holds their two placeholders.
        s = engine._older.decodes[0] if engine._older.decodes else None
        if s is not None and not s.finished and s in engine._in_flight.decodes:
          assert s.tokens[-2:] == [PENDING_TOKEN, PENDING_TOKEN]
    assert outs == want, num_blocks
    if num_blocks == 400:  # with room, nearly every step keeps two steps unread
      assert sum(keeps) > 0.8 * len(keeps) > 20, keeps
      assert max(most_pending) == 2 and dropped == 2
    m = engine.metrics
    assert m.generated_tokens == sum(len(x) for o in outs.values() for x in o.samples)
    if num_blocks == 40:
      assert m.preemptions > 0
    assert engine.allocator.num_used_blocks == 0 and not engine._ignore


@pytest.mark.parametrize(
  "async_scheduling,dispatch_thread,steps",
  [(False, False, 4), (True, False, 3), (True, True, 5)],
  ids=["sync-4", "async-3", "async-thread-5"],
)
def test_decode_bursts_sample_the_same_tokens(
  tiny, corpus, async_scheduling, dispatch_thread, steps
):
  """EngineConfig.decode_steps: a step of plain decodes with nothing waiting runs `steps`
  decode steps in one call. Sampled and greedy requests, end tokens, stops by length,
  forks and prefix hits, in a roomy pool and under pressure (40 blocks: bursts only once
  the queue is empty), give the outputs of the synchronous engine without bursts, and
  every block is returned."""
  reqs = [
    dataclasses.replace(r, temperature=0.0 if i % 3 == 0 else 0.9, top_k=0 if i % 2 else 12)
    for i, r in enumerate(_mixed_requests(corpus))
  ]
  want = Engine(tiny, _pressure_config("swap", False, num_blocks=400)).run(reqs)
  for num_blocks in (400, 40):
    config = dataclasses.replace(
      _pressure_config("swap", async_scheduling, dispatch_thread, num_blocks=num_blocks),
      decode_steps=steps,
    )
    engine = Engine(tiny, config)
    most_pending = []
    execute = engine._execute

    def counted(*args, execute=execute, engine=engine, most_pending=most_pending):
      out = execute(*args)
      most_pending.append(int(engine.allocator._npend.max(initial=0)))
      return out

    engine._execute = counted
    for r in reqs:
      engine.add_request(r)
    outs = {}
    while engine.has_unfinished():
      # A burst starts only where nothing waits (the step plans from the queue as it is).
      waiting = bool(engine.scheduler.waiting or engine.scheduler.swapped)
      for o in engine.step():
        outs[o.request_id] = o
      last = engine.step_metrics[-1]
      if last.decode_steps > 1:
        assert not waiting and last.num_prefill_tokens == 0 and last.cow_copies == 0
        assert last.num_tokens == last.decode_batch * steps
    assert outs == want, num_blocks
    bursts = [s for s in engine.step_metrics if s.decode_steps > 1]
    assert len(bursts) >= 3 and all(s.decode_steps == steps for s in bursts)
    if num_blocks == 400 and async_scheduling:
      # A burst's tokens stay pending while the next one is queued.
      assert max(most_pending) == 2 * steps - 1
    m = engine.metrics
    assert m.generated_tokens == sum(len(x) for o in outs.values() for x in o.samples)
    assert m.computed_tokens == sum(s.num_tokens for s in engine.step_metrics)
    assert engine.allocator.num_used_blocks == 0 and not engine._ignore


@pytest.mark.parametrize("mode", ["swap", "recompute"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_pool_that_fills_during_bursts_preempts_as_without_them(tiny, async_scheduling, mode):
  # Four blocks of 8 for two requests of 8 + 20 tokens (2 x 4 blocks): a burst runs only
  # while the free blocks hold every row's burst and the next step's token, so the step
  # after a burst (planned before its tokens are read, with overlap) never has to preempt
  # a row whose tokens are still pending; later single steps preempt as without bursts.
  reqs = [Request(i, list(range(10 * i, 10 * i + 8)), max_new_tokens=20) for i in range(2)]
  config = EngineConfig(
    num_blocks=4,
    block_size=8,
    num_host_blocks=8,
    preemption_mode=mode,
    async_scheduling=async_scheduling,
    check_invariants=True,
  )
  want = Engine(tiny, config).run(reqs)
  engine = Engine(tiny, dataclasses.replace(config, decode_steps=4))
  assert engine.run(reqs) == want
  m = engine.metrics
  assert m.preemptions > 0 and any(s.decode_steps == 4 for s in engine.step_metrics)
  assert engine.allocator.num_used_blocks == 0


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_an_end_token_inside_a_burst_drops_the_rest_of_it(tiny, corpus, async_scheduling):
  # Greedy, these prompts reach a period after 14, 19, 10 and 23 new tokens. The prefill
  # samples the first token and bursts of 4 the next ones (2-5, 6-9, ...): each period falls
  # inside a burst, none at its end. The burst's later tokens of such a row are dropped
  # (with overlap scheduling the next burst's rows too, dispatched before the stop was
  # read).
  reqs = [
    Request(i, list(corpus[st : st + 20]), max_new_tokens=40, end_token=PERIOD)
    for i, st in enumerate((150, 600, 1050, 1200))
  ]
  want = Engine(tiny, EngineConfig(num_blocks=64, block_size=8)).run(reqs)
  assert sorted(len(o.samples[0]) for o in want.values()) == [11, 15, 20, 24]
  config = EngineConfig(
    num_blocks=64, block_size=8, async_scheduling=async_scheduling, decode_steps=4
  )
  engine = Engine(tiny, config)
  for r in reqs:
    engine.add_request(r)
  outs, dropped = {}, []
  while engine.has_unfinished():
    outs.update((o.request_id, o) for o in engine.step())
    dropped.append(max(engine._ignore.values(), default=0))
  assert outs == want and not engine._ignore
  assert all(o.finish_reasons == ["stop"] for o in outs.values())
  assert [s.decode_steps for s in engine.step_metrics if s.decode_steps][:2] == [4, 4]
  assert all((len(o.samples[0]) - 2) % 4 != 3 for o in outs.values())  # not a burst's last
  # Rows still to skip after a step: the next burst's 4 when it was queued (overlap).
  assert max(dropped) == (4 if async_scheduling else 0)
  assert engine.allocator.num_used_blocks == 0


@pytest.mark.parametrize(
  "changes,match",
  [
    ({"decode_steps": 0}, r"decode_steps must be in \[1, block_size // 2 \+ 1 = 9\], got 0"),
    (
      {"decode_steps": 10},
      r"decode_steps must be in \[1, block_size // 2 \+ 1 = 9\], got 10: 1 runs one decode "
      r"step a call \(no bursts\).*lower decode_steps or raise block_size",
    ),
    ({"decode_steps": 6, "block_size": 8}, r"block_size // 2 \+ 1 = 5\], got 6"),
    ({"decode_steps": 2.0}, r"EngineConfig.decode_steps must be an int, got 2.0"),
    (
      {"decode_steps": 2, "async_scheduling": True, "pipeline_depth": 2},
      r"decode_steps > 1 needs pipeline_depth=1",
    ),
  ],
)
def test_engine_config_bounds_decode_steps(changes, match):
  with pytest.raises(ValueError, match=match):
    EngineConfig(**changes)


def test_a_burst_waits_where_a_row_is_near_the_models_length(tiny, corpus):
  # A row whose burst would write past the model's max_seq_len (512) runs single steps; it
  # still ends at the model's length with the tokens of an engine without bursts.
  prompt = list(corpus[:501])
  config = EngineConfig(
    num_blocks=80, block_size=8, async_scheduling=True, decode_steps=4, max_num_batched_tokens=512
  )
  engine = Engine(tiny, config)
  got = engine.run([Request("x", prompt, max_new_tokens=11)])
  want = Engine(tiny, dataclasses.replace(config, decode_steps=1)).run(
    [Request("x", prompt, max_new_tokens=11)]
  )
  assert got == want and len(prompt) + len(got["x"].samples[0]) == tiny.config.max_seq_len
  kinds = [s.decode_steps for s in engine.step_metrics if s.decode_steps]
  # Decodes from 501, 505, then 509: a burst there would write position 512.
  assert kinds == [4, 4, 1, 1]


def test_xla_options_are_checked_and_kept_as_sorted_pairs():
  config = EngineConfig(xla_options={"xla_gpu_enable_triton_gemm": False, "xla_dump_to": "/x"})
  assert config.xla_options == (("xla_dump_to", "/x"), ("xla_gpu_enable_triton_gemm", False))
  assert EngineConfig(xla_options=[("xla_dump_to", "/x")]).xla_options == (("xla_dump_to", "/x"),)
  assert EngineConfig(xla_options={"xla_gpu_autotune_level": np.int64(2)}).xla_options == (
    ("xla_gpu_autotune_level", 2),
  )
  hash(config)  # a frozen config stays hashable
  assert dataclasses.replace(config, seed=1).xla_options == config.xla_options
  for bad, match in [
    ("xla_dump_to", "mapping or"),
    ({"dump_to": "/x"}, "not an XLA option name"),
    ({1: True}, "not an XLA option name"),
    ({"xla_dump_to": ["/x"]}, r"must be a bool, int, float or str"),
    ([("xla_dump_to", "/a"), ("xla_dump_to", "/b")], "twice"),
  ]:
    with pytest.raises(ValueError, match=match):
      EngineConfig(xla_options=bad)


def test_xla_options_reach_the_step_alone_and_keep_its_tokens(tiny, corpus, tmp_path):
  # xla_dump_to makes XLA write every module it compiles with the option: the engine's
  # step (and the check's trivial function), not the rest of the process's functions.
  # The tokens are those of an engine without options. An option XLA does not know
  # fails at construction, naming it.
  reqs = [Request(i, list(corpus[30 * i : 30 * i + 12]), max_new_tokens=6) for i in range(3)]
  config = EngineConfig(num_blocks=32, block_size=8, max_num_seqs=4)
  want = Engine(tiny, config).run(reqs)
  dump = tmp_path / "dump"
  opts = dataclasses.replace(config, xla_options={"xla_dump_to": str(dump)})
  got = Engine(tiny, opts).run(reqs)
  assert got == want and all(len(o.samples[0]) == 6 for o in got.values())
  modules = {p.name.split(".")[1] for p in dump.iterdir()}
  assert any("device_step" in m for m in modules), modules
  assert all("device_step" in m or "lambda" in m for m in modules), modules
  with pytest.raises(ValueError, match="xla_no_such_option"):
    Engine(tiny, dataclasses.replace(config, xla_options={"xla_no_such_option": True}))
