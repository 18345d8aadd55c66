"""Requests, their outputs, and the engine's host-side bookkeeping per sequence."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Hashable, Sequence


class RequestError(ValueError):
  """A request (or an abort) the engine cannot take; the engine's state is unchanged."""


@dataclasses.dataclass(frozen=True)
class Request:
  """One generation request.

  Attributes:
    request_id: any hashable id, unique among the engine's live requests.
    prompt: token ids (non-empty).
    max_new_tokens: generated tokens per sample, at most (>= 1).
    n: number of samples (parallel sampling: the prompt is computed once, then forked).
    temperature: 0 means greedy (argmax); > 0 samples from ``softmax(logits / temperature)``.
    top_k: sample among the ``top_k`` most likely tokens; 0 means all.
    end_token: a sample stops after emitting this token (it is kept in the output).
    seed: sampling seed, an int in ``[0, 2**31)``; None derives one from the arrival
      order. A sample's token at
      position ``p`` uses the key ``(engine seed, seed, sample index, p)``, so the output
      does not depend on batching, preemption or which step computed it.
    beam_width: 0 (the default) samples as above; ``k >= 1`` runs beam search with ``k``
      beams scored by cumulative log-probability (``paxcache/engine/_beam.py``; needs
      ``n == 1``, ``temperature == 0``, ``top_k == 0`` and an engine without
      ``async_scheduling``). The output then holds the ``k`` best hypotheses, best first,
      with their scores.
  """

  request_id: Hashable
  prompt: Sequence[int]
  max_new_tokens: int = 16
  n: int = 1
  temperature: float = 0.0
  top_k: int = 0
  end_token: int | None = None
  seed: int | None = None
  beam_width: int = 0


@dataclasses.dataclass
class RequestOutput:
  """What a request produced: one token list and one finish reason per sample.

  ``finish_reasons[i]`` is ``"stop"`` (end token), ``"length"`` (``max_new_tokens`` or the
  model's ``max_seq_len``) or ``"abort"``. ``scores`` (beam search only, else None): each
  hypothesis' cumulative log-probability (natural log), in the order of ``samples`` (best
  first).
  """

  request_id: Hashable
  prompt_len: int
  samples: list[list[int]]
  finish_reasons: list[str]
  scores: list[float] | None = None


class Status(enum.Enum):
  WAITING = "waiting"  # not resident: new, or preempted by recomputation
  RUNNING = "running"  # every live sequence resident on the device
  SWAPPED = "swapped"  # every live sequence in the host pool
  FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Seq:
  """One sample's tokens; ``num_computed`` of them have K/V in the cache.

  Invariant while resident: the allocator holds exactly ``num_computed`` tokens of it
  (blocks are taken lazily, chunk by chunk, so that every block the prefix cache knows
  holds K/V written by a finished or the current device step).
  """

  seq_id: tuple
  index: int  # sample index within the request
  tokens: list[int]
  prompt_len: int
  num_computed: int = 0
  finish_reason: str | None = None

  @property
  def output(self) -> list[int]:
    return self.tokens[self.prompt_len :]

  @property
  def finished(self) -> bool:
    return self.finish_reason is not None

  @property
  def num_pending(self) -> int:
    return len(self.tokens) - self.num_computed


@dataclasses.dataclass(eq=False)
class Group:
  """A request and its samples (one sequence until the prompt is computed, then ``n``)."""

  request: Request
  arrival: int
  seed: int
  seqs: list[Seq]
  status: Status = Status.WAITING
  forked: bool = False  # children created (set when the prompt's last token is computed)
  admitted: bool = False  # admitted at least once (prompt tokens counted once in metrics)
  # Beam search (paxcache/engine/_beam.py): its state, and the rows the group may still
  # grow by (``beam_width - 1`` until the first beams are forked), which the scheduler
  # counts as resident so that forking never exceeds ``max_num_seqs``.
  beam: object | None = None
  reserve: int = 0

  @property
  def live(self) -> list[Seq]:
    return [s for s in self.seqs if not s.finished]

  def output(self) -> RequestOutput:
    if self.beam is not None:
      return self.beam.output(self)
    seqs = sorted(self.seqs, key=lambda s: s.index)
    return RequestOutput(
      request_id=self.request.request_id,
      prompt_len=len(self.request.prompt),
      samples=[list(s.output) for s in seqs],
      finish_reasons=[s.finish_reason or "abort" for s in seqs],
    )
