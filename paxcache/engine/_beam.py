"""Beam search over the paged cache: host bookkeeping around the jitted step's candidates.

A request with ``beam_width = k >= 1`` keeps up to ``k`` live beams, each an engine
sequence with its own row in the step, scored by its cumulative log-probability (natural
log, summed over its generated tokens). When a step has beam rows, the jitted step also
returns, per sample row, the ``num_candidates(k)`` (``>= 2k``) largest log-softmax values
of the row's logits and their token ids. Once every live beam of a request has its
candidates, :func:`select` picks the next beams on the host:

- every candidate ``(beam, token)`` scores ``score(beam) + log p(token | beam)`` (float64 on
  the host, from the step's float32 log-probabilities);
- candidates are walked best first (ties: the better-ranked beam, then the lower token id);
  one that ends with the request's ``end_token`` becomes a finished hypothesis (``"stop"``,
  the end token kept), any other becomes a live beam, until ``k`` live beams are chosen. A
  beam's top ``2k`` always hold ``k`` continuations that are not the end token, so the
  candidates not returned could never be chosen;
- when the new beams reach ``max_new_tokens`` (or the model's ``max_seq_len``) they all
  finish (``"length"``; live beams always have the same length);
- the request stops once no live beam is left or ``k`` hypotheses have finished and the
  ``k``-th best of them scores at least as high as the best live beam: with no length
  penalty a score only falls as a beam grows, so no live beam could overtake it.

There is no length penalty (scores are plain sums of log-probabilities, so shorter
hypotheses are favoured when an end token is set); the output holds the ``k`` best finished
hypotheses, best first (ties: the one finished first), with their scores.

Memory: a parent with several surviving children is forked (``allocator.fork``: the
children share every block, and the partly filled last block is copied on write when each
appends its token in the next step); a beam with no surviving child is freed at once
(``allocator.free``); one child reuses its parent's sequence. Beams of a request therefore
share the blocks of their common prefix, as in the paper's Figure 9.

Scheduling: a beam request is admitted with room for ``k`` rows (``Group.reserve``). A
group preempted by recomputation recomputes each beam as its own sequence; beams that get
their candidates before the others (chunked prefill) wait for them. Beam search runs only
with ``async_scheduling=False``: the next step's input tokens are chosen on the host from
the candidates, so the step cannot read them on the device; the engine refuses a beam
request with async scheduling on.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Hashable

import numpy as np

from paxcache.block_table import bucket_size
from paxcache.engine._request import Group, RequestError, RequestOutput, Seq


def num_candidates(width: int, vocab_size: int) -> int:
  """Candidates per sample row for beams of ``width``: ``2 * width`` bucketed to a power
  of two (few compiled shapes), at most the vocabulary."""
  return min(bucket_size(2 * width, minimum=2), vocab_size)


def check_request(r, *, async_scheduling: bool, max_rows: int, vocab_size: int) -> None:
  """Raises :class:`RequestError` for a beam request the engine cannot run."""
  rid, k = r.request_id, r.beam_width
  if k == 0:
    return
  if k < 0:
    raise RequestError(f"request {rid!r}: beam_width must be >= 0 (0: no beam search), got {k}")
  if r.temperature != 0 or r.top_k != 0:
    raise RequestError(
      f"request {rid!r}: beam search scores by log-probability and samples nothing; "
      f"it needs temperature=0 and top_k=0, got temperature={r.temperature}, top_k={r.top_k}"
    )
  if r.n != 1:
    raise RequestError(
      f"request {rid!r}: beam search needs n=1 (its output holds the beam_width={k} best "
      f"hypotheses), got n={r.n}"
    )
  if async_scheduling:
    raise RequestError(
      f"request {rid!r}: beam search needs EngineConfig(async_scheduling=False): the next "
      "beams are chosen on the host from a step's candidates before the next step"
    )
  if k > max_rows:
    raise RequestError(
      f"request {rid!r}: beam_width={k} beams can never be resident at once "
      f"(min(max_num_seqs, max_num_batched_tokens) = {max_rows})"
    )
  if 2 * k > vocab_size:
    raise RequestError(
      f"request {rid!r}: beam_width={k} needs 2 * beam_width <= vocab_size {vocab_size}"
    )


def select(
  scores: list[float],
  logprobs: list[np.ndarray],
  ids: list[np.ndarray],
  width: int,
  end_token: int | None,
) -> tuple[list[tuple[int, int, float]], list[tuple[int, int, float]]]:
  """The next beams of one request.

  Args:
    scores: each live beam's cumulative log-probability, best-ranked beam first.
    logprobs, ids: per beam, its candidates' log-probabilities and token ids.
    width: beams to keep.
    end_token: the token that finishes a hypothesis, or None.

  Returns:
    ``(live, ended)``, each a list of ``(beam rank, token, score)`` best first: the
    ``width`` (or fewer, if the candidates run out) continuing beams, and the hypotheses
    that ended with ``end_token`` among the candidates walked before the last live one.
  """
  total = np.concatenate(
    [np.float64(s) + np.asarray(lp, np.float64) for s, lp in zip(scores, logprobs, strict=True)]
  )
  beam = np.repeat(np.arange(len(scores)), [len(lp) for lp in logprobs])
  token = np.concatenate([np.asarray(t, np.int64) for t in ids])
  order = np.lexsort((token, beam, -total))  # the last key sorts first
  live, ended = [], []
  for i in order.tolist():
    cand = (int(beam[i]), int(token[i]), float(total[i]))
    if end_token is not None and cand[1] == end_token:
      ended.append(cand)
    else:
      live.append(cand)
      if len(live) == width:
        break
  return live, ended


@dataclasses.dataclass
class Hypothesis:
  tokens: list[int]  # generated tokens (prompt excluded)
  score: float
  finish_reason: str


class BeamState:
  """One beam request's scores, waiting candidates and finished hypotheses."""

  def __init__(self, width: int):
    self.width = width
    self.scores: dict[Seq, float] = {}  # live beam -> cumulative log-probability
    self.candidates: dict[Seq, tuple[np.ndarray, np.ndarray]] = {}  # beams that have them
    self.finished: list[Hypothesis] = []
    self.ids = itertools.count(1)  # sequence ids of forked beams (0 is the prompt's)
    self.steps = 0  # selections made

  def best(self, hyps: list[Hypothesis]) -> list[Hypothesis]:
    # sorted() is stable: among equal scores the one finished first comes first.
    return sorted(hyps, key=lambda h: -h.score)[: self.width]

  def output(self, group: Group) -> RequestOutput:
    hyps = list(self.finished)
    # Aborted: the live beams count, as far as they got.
    hyps += [Hypothesis(list(s.output), self.scores[s], "abort") for s in group.seqs]
    best = self.best(hyps)
    return RequestOutput(
      request_id=group.request.request_id,
      prompt_len=len(group.request.prompt),
      samples=[h.tokens for h in best],
      finish_reasons=[h.finish_reason for h in best],
      scores=[h.score for h in best],
    )


class BeamSearch:
  """The engine's beam bookkeeping (its hooks: ``start``, ``num_candidates``, ``advance``)."""

  def __init__(
    self, allocator, scheduler, groups: dict[Hashable, Group], max_seq_len: int, vocab_size: int
  ):
    self.allocator = allocator
    self.scheduler = scheduler
    self.groups = groups  # the engine's live requests (shared, not copied)
    self.max_seq_len = max_seq_len
    self.vocab_size = vocab_size
    self.active = 0  # beam requests in the engine (0: num_candidates returns at once)

  def start(self, group: Group) -> None:
    group.beam = state = BeamState(group.request.beam_width)
    state.scores[group.seqs[0]] = 0.0
    group.reserve = state.width - 1
    self.active += 1

  def forget(self, group: Group) -> None:
    """``group`` left the engine other than through :meth:`advance` (abort)."""
    if group.beam is not None:
      self.active -= 1

  def live_beams(self) -> dict[Hashable, list]:
    """Request id -> the allocator ids of its live beams (best first), for every beam
    request past its first selection (before it, the request is one prompt sequence)."""
    return {
      rid: [s.seq_id for s in g.seqs]
      for rid, g in self.groups.items()
      if g.beam is not None and g.beam.steps
    }

  def num_candidates(self, plan) -> int:
    """Candidates per sample row the step must return for ``plan`` (0: no beam row)."""
    if not self.active:
      return 0
    groups, width = self.groups, 0
    for r in plan.rows:
      for s in r.samplers:
        g = groups[s.seq_id[0]]
        if g.beam is not None:
          width = max(width, g.beam.width)
    return num_candidates(width, self.vocab_size) if width else 0

  def advance(self, entries, candidates, outs: list[RequestOutput]) -> int:
    """Reads a step's candidates for its beam rows (``entries[j] == (seq, None)``), picks
    the next beams of every request whose beams all have theirs, and appends the requests
    that finished to ``outs``. Returns the number of beam rows read."""
    logprobs, ids = (np.asarray(c) for c in candidates)
    touched: dict[Hashable, Group] = {}
    rows = 0
    for j, (s, pos) in enumerate(entries):
      if pos is not None:
        continue
      g = self.groups[s.seq_id[0]]
      g.beam.candidates[s] = (logprobs[j], ids[j])
      touched[g.request.request_id] = g
      rows += 1
    for g in touched.values():
      if all(s in g.beam.candidates for s in g.seqs):
        self._step(g, outs)
    return rows

  def _step(self, g: Group, outs: list[RequestOutput]) -> None:
    state, req, beams = g.beam, g.request, g.seqs
    live, ended = select(
      [state.scores[s] for s in beams],
      [state.candidates[s][0] for s in beams],
      [state.candidates[s][1] for s in beams],
      state.width,
      req.end_token,
    )
    state.candidates.clear()
    state.steps += 1
    for b, t, score in ended:
      state.finished.append(Hypothesis(list(beams[b].output) + [t], score, "stop"))
    length = len(beams[0].tokens) + 1  # every live beam has the same length
    done = not live
    if live and (length - beams[0].prompt_len >= req.max_new_tokens or length >= self.max_seq_len):
      for b, t, score in live:
        state.finished.append(Hypothesis(list(beams[b].output) + [t], score, "length"))
      done = True
    elif live and len(state.finished) >= state.width:
      done = state.best(state.finished)[-1].score >= live[0][2]
    if done:
      for s in beams:
        self.allocator.free(s.seq_id)
      g.seqs = []
      state.scores.clear()
      self.scheduler.remove(g)
      del self.groups[req.request_id]
      self.active -= 1
      outs.append(g.output())
      return
    # Fork first (a child copies its parent's allocator state, which holds the parent's
    # computed tokens only), then free the pruned beams, then append the chosen tokens.
    reused, new, tokens = set(), [], []
    for b, t, score in live:
      parent = beams[b]
      if b not in reused:
        reused.add(b)
        child = parent
      else:
        i = next(state.ids)
        child = Seq(
          seq_id=(req.request_id, i),
          index=i,
          tokens=list(parent.tokens),
          prompt_len=parent.prompt_len,
          num_computed=parent.num_computed,
        )
        self.allocator.fork(parent.seq_id, child.seq_id)
      new.append((child, score))
      tokens.append(t)
    for b, s in enumerate(beams):
      if b not in reused:
        self.allocator.free(s.seq_id)
    for (child, _), t in zip(new, tokens, strict=True):
      child.tokens.append(t)
    g.seqs = [child for child, _ in new]
    state.scores = {child: score for child, score in new}
    g.reserve = 0
