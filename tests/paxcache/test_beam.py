"""Beam search in the engine against a brute-force beam search over full recomputation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels.testing import tolerance
from paxcache.engine import Engine, EngineConfig, Request, RequestError
from paxcache.engine._beam import BeamSearch, select
from paxcache.nn import greedy_generate_no_cache, load_decoder

PERIOD = ord(".")


@pytest.fixture(scope="module")
def tiny():
  return load_decoder()


def _config(**kw) -> EngineConfig:
  base = dict(
    num_blocks=64,
    block_size=4,
    num_host_blocks=64,
    max_num_seqs=16,
    max_num_batched_tokens=64,
    check_invariants=True,
  )
  return EngineConfig(**(base | kw))


@nnx.jit
def _forward(model, tokens, rows):
  return model.forward(tokens, logit_rows=rows)


def brute_force_beam_search(model, prompt, width, max_new_tokens, end_token):
  """The beam search of ``paxcache/engine/_beam.py``, written out independently: every step
  reruns each live beam through ``Decoder.forward`` (no cache), takes the float64
  log-softmax of the whole vocabulary, and sorts every (beam, token) by (score, beam rank,
  token). Returns the ``width`` best ``(output tokens, score, finish reason)``."""
  live = [(list(prompt), 0.0)]  # (tokens, score), best first
  finished = []
  # One padded shape for every step (right padding never changes earlier positions:
  # causality), so that the forward pass is traced once, not once per length.
  pad = len(prompt) + max_new_tokens
  for step in range(max_new_tokens):
    tokens = np.zeros((width, pad), np.int32)
    for b, (t, _) in enumerate(live):
      tokens[b, : len(t)] = t
    rows = np.full((width, 1), len(live[0][0]) - 1, np.int32)
    logits = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(rows)))
    logits = logits[: len(live), 0].astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    cands = sorted(
      (score + logp[b, t], b, t)
      for b, (_, score) in enumerate(live)
      for t in range(logits.shape[1])
    )
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    new = []
    for score, b, t in cands:
      if t == end_token:
        finished.append((live[b][0][len(prompt) :] + [t], score, "stop"))
      else:
        new.append((live[b][0] + [t], score))
        if len(new) == width:
          break
    if step + 1 == max_new_tokens:
      finished += [(t[len(prompt) :], score, "length") for t, score in new]
      break
    live = new
    kth = sorted((s for _, s, _ in finished), reverse=True)
    if len(kth) >= width and kth[width - 1] >= live[0][1]:
      break
  return sorted(finished, key=lambda h: -h[1])[:width]


CASES = [  # (prompt, max_new_tokens, end_token)
  (b"the old man ", 24, PERIOD),  # width 2: both hypotheses end at "." (early stop)
  (b"the teacher walked to the soft road", 6, PERIOD),  # "." comes first: early stop
  (b"a young girl ", 7, None),
]


@pytest.mark.parametrize("width", [1, 2, 4])
def test_beam_search_matches_brute_force_over_full_recomputation(tiny, width):
  reqs = [
    Request(i, list(p), max_new_tokens=g, end_token=e, beam_width=width)
    for i, (p, g, e) in enumerate(CASES)
  ]
  # A sampled request in the same steps: beam rows and sampled rows share one step.
  other = Request("x", list(b"the brown fox "), max_new_tokens=9, temperature=0.8, seed=3)
  engine = Engine(tiny, _config())
  outs = engine.run(reqs + [other])
  # The step's logits are float32 through the paged cache, the oracle's float32 through
  # Decoder.forward: their difference is held to layer_vs_float64 (2e-5) per logit. A
  # log-softmax moves by at most twice a logit's error, and a score sums one per step.
  tol = tolerance("layer_vs_float64", np.float32)
  for r, (prompt, g, end) in zip(reqs, CASES, strict=True):
    want = brute_force_beam_search(tiny, list(prompt), width, g, end)
    got = outs[r.request_id]
    assert len(got.samples) == len(want) == width
    assert got.samples == [w[0] for w in want], (width, prompt)
    assert got.finish_reasons == [w[2] for w in want]
    np.testing.assert_allclose(
      got.scores, [w[1] for w in want], rtol=tol.rtol, atol=2 * g * tol.atol
    )
    assert got.scores == sorted(got.scores, reverse=True)
  assert len(outs["x"].samples[0]) == 9 and outs["x"].scores is None
  assert engine.allocator.num_used_blocks == 0 and len(engine.allocator) == 0
  if width == 1:
    return
  # Each case ends otherwise: the first (width 2) stops early, once both hypotheses have
  # ended at "." before 24 tokens and outscore every live beam; in the second "." comes
  # first and the other hypotheses run to max_new_tokens; the third has no end token.
  if width == 2:
    assert outs[0].finish_reasons == ["stop", "stop"] and len(outs[0].samples[1]) < 24
  assert outs[1].finish_reasons == ["stop"] + ["length"] * (width - 1)
  assert outs[2].finish_reasons == ["length"] * width


@pytest.mark.parametrize("end_token", [None, PERIOD])
def test_width_one_is_greedy(tiny, end_token):
  prompts = [list(b"the old man "), list(b"a young girl "), list(b"the teacher walked")]
  want = greedy_generate_no_cache(tiny, prompts, 24, end_token=end_token)
  engine = Engine(tiny, _config())
  outs = engine.run(
    Request(i, p, max_new_tokens=24, end_token=end_token, beam_width=1)
    for i, p in enumerate(prompts)
  )
  for i, w in enumerate(want):
    assert outs[i].samples == [w]


def test_pruned_beams_are_freed_and_beams_share_blocks(tiny):
  bs, width = 4, 4
  # No prefix cache: whatever the beams share, they share by forking.
  engine = Engine(tiny, _config(block_size=bs, enable_prefix_caching=False))
  engine.add_request(Request("a", list(b"the old man "), max_new_tokens=20, beam_width=width))
  alloc = engine.allocator
  shared_steps = 0
  seen = set()
  while engine.has_unfinished():
    engine.step()  # check_invariants=True: the allocator's full check after every step
    if not engine.has_unfinished():
      break
    live = engine.beams.live_beams()["a"]
    assert len(live) == width
    # Exactly the live beams hold blocks: every pruned beam was freed.
    assert sorted(alloc.seq_ids(), key=str) == sorted(live, key=str)
    seen.update(live)
    alone = sum(-(-alloc.num_tokens(s) // bs) for s in live)
    assert alloc.num_used_blocks <= alone
    shared_steps += alloc.num_used_blocks < alone
  assert len(seen) > width  # beams were forked and pruned over the run
  assert shared_steps > 0  # the beams' common prefix is stored once
  assert alloc.num_used_blocks == 0 and len(alloc) == 0
  assert engine.metrics.cow_copies > 0  # siblings copied their shared last block on write


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_beam_search_under_preemption_gives_the_roomy_pool_outputs(tiny, mode, monkeypatch):
  # Count steps after which a request's beams wait for a beam still recomputing its tokens
  # in chunks (recompute mode: each beam comes back as its own prefill).
  waits = []
  advance = BeamSearch.advance

  def counted(self, entries, candidates, outs):
    rows = advance(self, entries, candidates, outs)
    waits.extend(g for g in self.groups.values() if g.beam is not None and g.beam.candidates)
    return rows

  monkeypatch.setattr(BeamSearch, "advance", counted)
  reqs = [
    Request(i, list(p), max_new_tokens=16, beam_width=w)
    for i, (p, w) in enumerate(
      [(b"the old man ", 3), (b"a young girl walked ", 2), (b"the brown fox ", 4)]
    )
  ]
  roomy = Engine(tiny, _config()).run(reqs)
  tight = Engine(tiny, _config(num_blocks=34, preemption_mode=mode, max_num_batched_tokens=16))
  outs = tight.run(reqs)
  m = tight.metrics
  assert m.preemptions_swap + m.preemptions_recompute > 0
  if mode == "swap":  # the beams swap out and in as one group, their shared blocks once
    assert m.preemptions_swap > 0 and m.swapped_in_blocks > 0
  if mode == "recompute":
    assert m.preemptions_recompute > 0 and waits
  # Scores: sums of 16 float32 log-probabilities, computed in another order in the tight
  # run (prompts in 16-token chunks, recomputed beams as prefills); measured at most 3.8e-6
  # apart in either mode, so 1e-5 leaves 2.6x.
  for r in reqs:
    assert outs[r.request_id].samples == roomy[r.request_id].samples
    np.testing.assert_allclose(outs[r.request_id].scores, roomy[r.request_id].scores, atol=1e-5)
  assert tight.allocator.num_used_blocks == 0


def test_select_ranks_ties_by_beam_then_token():
  lp = [np.array([-1.0, -1.0, -2.0]), np.array([-1.0, -0.5, -3.0])]
  ids = [np.array([5, 3, 7]), np.array([9, 5, 2])]
  live, ended = select([0.0, -0.5], lp, ids, 3, end_token=7)
  # Scores: beam 0: 5 -> -1, 3 -> -1, 7 -> -2; beam 1: 9 -> -1.5, 5 -> -1.0, 2 -> -3.5.
  assert live == [(0, 3, -1.0), (0, 5, -1.0), (1, 5, -1.0)]
  assert ended == []
  live, ended = select([0.0, -0.5], lp, ids, 5, end_token=7)
  assert live[3:] == [(1, 9, -1.5), (1, 2, -3.5)] and ended == [(0, 7, -2.0)]


def test_bad_beam_requests_are_refused(tiny):
  engine = Engine(tiny, _config(max_num_seqs=4))
  bad = {
    "temperature": Request("t", [1, 2], beam_width=2, temperature=0.5),
    "top_k": Request("k", [1, 2], beam_width=2, top_k=5),
    "n=1": Request("n", [1, 2], beam_width=2, n=2),
    ">= 0": Request("w", [1, 2], beam_width=-1),
    "never be resident": Request("r", [1, 2], beam_width=5),
    "must be an int": Request("f", [1, 2], beam_width=2.0),
  }
  for match, r in bad.items():
    with pytest.raises(RequestError, match=match):
      engine.add_request(r)
  assert not engine.has_unfinished()
  async_engine = Engine(tiny, _config(async_scheduling=True))
  with pytest.raises(RequestError, match="async_scheduling=False"):
    async_engine.add_request(Request("a", [1, 2], beam_width=2))


def test_abort_returns_the_live_beams(tiny):
  engine = Engine(tiny, _config())
  engine.add_request(Request("a", list(b"the old man "), max_new_tokens=20, beam_width=3))
  for _ in range(4):
    engine.step()
  out = engine.abort("a")
  assert out.finish_reasons == ["abort"] * 3 and len(out.scores) == 3
  assert all(len(s) == 4 for s in out.samples)
  assert engine.allocator.num_used_blocks == 0 and engine.beams.active == 0
