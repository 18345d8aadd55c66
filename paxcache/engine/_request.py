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
    top_k: sample among the ``top_k`` most likely tokens; 0 (or any value of at least
      the vocabulary's size) means all.
    end_token: a sample stops after emitting this token (it is kept in the output).
    seed: sampling seed, an int in ``[0, 2**31)``; None derives one from the arrival
      order. A sample's token at
      position ``p`` uses the key ``(engine seed, seed, sample index, p)``, so the output
      does not depend on batching, preemption or which step computed it.
    arrival_time: seconds on the engine's clock (``paxcache.engine.WallClock`` or
      ``SimulatedClock``) at which the request arrives; the engine admits it to its
      queue only once the clock reaches it. None: it arrives when it is added.
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
  arrival_time: float | None = None
  beam_width: int = 0


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
  """One request's timeline on the engine's clock (seconds) and its preemptions.

  ``first_token_time`` is when the first output token was known on the host (the end of
  the step that sampled it), ``finish_time`` when the last one was.
  """

  arrival_time: float
  first_token_time: float
  finish_time: float
  output_tokens: int  # generated tokens over all samples
  preemptions_swap: int
  preemptions_recompute: int

  @property
  def latency(self) -> float:
    return self.finish_time - self.arrival_time

  @property
  def normalized_latency(self) -> float:
    """The vLLM paper's per-request latency over output length (s/token)."""
    return self.latency / max(self.output_tokens, 1)

  @property
  def ttft(self) -> float:
    return self.first_token_time - self.arrival_time

  @property
  def tpot(self) -> float:
    """Time per output token after the first; 0 for a single-token output."""
    if self.output_tokens <= 1:
      return 0.0
    return (self.finish_time - self.first_token_time) / (self.output_tokens - 1)


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
  # Timeline and preemptions (None for an aborted request); not part of equality.
  metrics: RequestMetrics | None = dataclasses.field(default=None, compare=False)
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
  arrival_time: float = 0.0  # on the engine's clock
  first_token_time: float | None = None
  finish_time: float | None = None
  preemptions_swap: int = 0
  preemptions_recompute: int = 0
  reserved: tuple[int, int] | None = None  # (first block, blocks) under a reservation policy
  # Beam search (paxcache/engine/_beam.py): its state, and the rows the group may still
  # grow by (``beam_width - 1`` until the first beams are forked), which the scheduler
  # counts as resident so that forking never exceeds ``max_num_seqs``.
  beam: object | None = None
  reserve: int = 0

  @property
  def live(self) -> list[Seq]:
    return [s for s in self.seqs if not s.finished]

  def output(self) -> RequestOutput:
    seqs = sorted(self.seqs, key=lambda s: s.index)
    if self.beam is not None:  # the k best hypotheses (paxcache/engine/_beam.py)
      out = self.beam.output(self)
    else:
      samples = [list(s.output) for s in seqs]
      reasons = [s.finish_reason or "abort" for s in seqs]
      missing = self.request.n - len(seqs)
      if not self.forked and missing > 0:
        # Aborted before its prompt was computed (the fork into n samples comes with the
        # first token): one empty sample per sample asked for, as for one not yet arrived.
        samples += [[] for _ in range(missing)]
        reasons += ["abort"] * missing
      out = RequestOutput(
        request_id=self.request.request_id,
        prompt_len=len(self.request.prompt),
        samples=samples,
        finish_reasons=reasons,
      )
    if self.finish_time is not None:
      out.metrics = RequestMetrics(
        arrival_time=self.arrival_time,
        first_token_time=self.finish_time
        if self.first_token_time is None
        else self.first_token_time,
        finish_time=self.finish_time,
        output_tokens=sum(len(t) for t in out.samples),
        preemptions_swap=self.preemptions_swap,
        preemptions_recompute=self.preemptions_recompute,
      )
    return out
