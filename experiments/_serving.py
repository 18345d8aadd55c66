"""A step-level serving simulation that measures where KV memory goes, over time.

What is simulated
-----------------
A fixed KV pool of ``pool_tokens`` slots serves requests (prompt_len, output_len) in
iteration-level (continuous) batching, as Orca and vLLM do:

* a request waits in a FCFS queue; it is admitted when the pool can hold it (and
  every request before it has been admitted); its admission step is its prefill,
  after which its cache holds ``prompt_len`` tokens;
* every later step each running request writes one more token (its cache grows by
  one); after ``output_len`` such steps it finishes and its memory is released;
* **contiguous** policies reserve one contiguous range per request at admission, in a
  linear address space with first-fit placement (so gaps between live ranges are
  external fragmentation): ``max`` reserves ``max_seq_len`` slots (Orca (Max)), ``pow2``
  reserves ``prompt_len + next_pow2(output_len)`` (Orca (Pow2): the paper's example,
  25 output tokens reserve 32), ``oracle`` reserves exactly ``prompt_len +
  output_len`` (Orca (Oracle));
* **paged** allocation goes through the real :class:`paxcache.allocator.BlockAllocator`:
  a request is admitted when the free blocks cover its prompt plus a 1% watermark (as
  vLLM does), grows one token at a time (a new block only when its last one is full),
  and, when no block is left, the most recently admitted request is preempted by
  recomputation (freed and put back at the head of the queue, to prefill its prompt
  and the tokens it had generated), as vLLM does.

What is measured
----------------
At the end of every step (after the step's tokens are written, before finished
requests release memory) the pool's slots are split into

* ``tokens``: slots holding a token's K/V;
* ``reserved_future``: contiguous slots reserved for tokens the request will still
  generate (the paper's "reservation");
* ``internal_frag``: reserved slots that will never hold a token (``pow2``/``max``
  over-reservation; a paged request's partly filled last block);
* ``external_frag_free``: everything else -- gaps between contiguous ranges, and free
  memory (the paper's "external fragmentation & others").

Every step is also charged through a step-cost model
(:class:`paxcache.engine._cost.StepCostModel`; default the CPU default, 1 ms per computed
token): its prefill tokens (``prompt_tokens`` of first admissions, and ``recomputed_tokens``,
the prompt and generated tokens a request preempted by recomputation prefills again), its
decode rows (requests writing one token), the K/V tokens it reads (the context of every
running request after the step) and swapped tokens (always 0: this simulation preempts by
recomputation only). ``sim_ms`` sums the step costs; a step with nothing to compute (every
request still to arrive) costs nothing.

Shares are memory-time weighted: the sum over steps of each part, over the sum over
steps of the pool (``*_of_pool``, over the steps where a request was waiting, i.e.
while memory, not demand, limited the batch) or of the reserved slots
(``token_share_of_reserved``, over all steps). The paper's Figure 2 reports the
same split of KV memory, averaged over a serving run of OPT-13B on an A100.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from experiments._progress import Progress
from paxcache.engine._cost import CPU_DEFAULT, StepCostModel
from paxcache.engine._reservation import FirstFitRanges

CONTIGUOUS_POLICIES = ("max", "pow2", "oracle")
PAPER_NAMES = {"max": "Orca (Max)", "pow2": "Orca (Pow2)", "oracle": "Orca (Oracle)"}


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def contiguous_reservation(policy: str, prompt_len: int, output_len: int, max_seq_len: int) -> int:
  """Slots one request reserves up front under a contiguous policy."""
  if policy == "max":
    return max_seq_len
  if policy == "pow2":
    return min(max_seq_len, prompt_len + next_pow2(output_len))
  if policy == "oracle":
    return prompt_len + output_len
  raise ValueError(f"policy must be one of {CONTIGUOUS_POLICIES}, got {policy!r}")


class ContiguousPool:
  """Per-request contiguous reservations in a first-fit space (the engine's own
  :class:`paxcache.engine._reservation.FirstFitRanges`, which its Orca policies use)."""

  def __init__(self, policy: str, pool_tokens: int, max_seq_len: int):
    if policy not in CONTIGUOUS_POLICIES:
      raise ValueError(f"policy must be one of {CONTIGUOUS_POLICIES}, got {policy!r}")
    self.policy = policy
    self.max_seq_len = max_seq_len
    self.capacity = pool_tokens
    self._space = FirstFitRanges(pool_tokens)
    self._ranges: dict[int, tuple[int, int]] = {}
    self.reserved = 0

  def check_fits(self, prompt_len: int, output_len: int) -> None:
    size = contiguous_reservation(self.policy, prompt_len, output_len, self.max_seq_len)
    if size > self.capacity:
      raise ValueError(
        f"a request of {prompt_len}+{output_len} tokens reserves {size} slots under "
        f"policy={self.policy!r}, more than the pool's {self.capacity}"
      )

  def admit(self, rid: int, context_len: int, prompt_len: int, output_len: int) -> bool:
    del context_len  # the reservation depends on the request, not on its progress
    size = contiguous_reservation(self.policy, prompt_len, output_len, self.max_seq_len)
    start = self._space.reserve(size)
    if start is None:
      return False
    self._ranges[rid] = (start, size)
    self.reserved += size
    return True

  def can_grow(self, rids: list[int]) -> bool:
    del rids  # the reservations already cover every final length
    return True

  def grow(self, rids: list[int]) -> None:
    del rids

  def release(self, rid: int) -> None:
    start, size = self._ranges.pop(rid)
    self._space.release(start, size)
    self.reserved -= size

  def reserved_slots(self) -> int:
    return self.reserved

  def future_slots(self, rid: int, held: int, final_len: int) -> int:
    return min(self._ranges[rid][1], final_len) - held


class PagedPool:
  """Paged allocation through the real :class:`paxcache.allocator.BlockAllocator`.

  Prefix caching is off: this experiment measures fragmentation, and every request's
  tokens are distinct anyway (sharing is the prefix-sharing experiment's subject).
  """

  def __init__(self, block_size: int, pool_tokens: int, watermark: float = 0.01):
    from paxcache.allocator import BlockAllocator

    if not 0 <= watermark < 1:
      raise ValueError(f"watermark is a share of the pool's blocks in [0, 1), got {watermark!r}")
    self.block_size = block_size
    self.num_blocks = pool_tokens // block_size
    if self.num_blocks < 1:
      raise ValueError(f"pool_tokens={pool_tokens} holds no block of block_size={block_size}")
    self.capacity = self.num_blocks * block_size
    self.allocator = BlockAllocator(
      num_blocks=self.num_blocks, block_size=block_size, enable_prefix_caching=False
    )
    self._watermark = int(watermark * self.num_blocks)

  def check_fits(self, prompt_len: int, output_len: int) -> None:
    blocks = -(-(prompt_len + output_len) // self.block_size)
    if blocks > self.num_blocks:
      raise ValueError(
        f"a request of {prompt_len}+{output_len} tokens needs {blocks} blocks of "
        f"{self.block_size}, more than the pool's {self.num_blocks}"
      )

  def admit(self, rid: int, context_len: int, prompt_len: int, output_len: int) -> bool:
    del prompt_len, output_len
    blocks = -(-context_len // self.block_size)
    # The watermark keeps room for running requests to grow; with none running it would
    # only lock out a request that fits.
    watermark = self._watermark if self.allocator.num_used_blocks else 0
    if self.allocator.num_free_blocks - blocks < watermark:
      return False
    self.allocator.add_sequence(rid, np.zeros(context_len, np.int64))
    return True

  def can_grow(self, rids: list[int]) -> bool:
    return self.allocator.can_append(rids)

  def grow(self, rids: list[int]) -> None:
    self.allocator.append_batch(rids, np.zeros(len(rids), np.int64))

  def release(self, rid: int) -> None:
    self.allocator.free(rid)

  def reserved_slots(self) -> int:
    return self.allocator.num_used_blocks * self.block_size

  def future_slots(self, rid: int, held: int, final_len: int) -> int:
    del rid, held, final_len
    return 0


@dataclasses.dataclass
class ServingStats:
  """Sums over steps; shares are ratios of these sums (memory-time weighted)."""

  steps: int = 0
  saturated_steps: int = 0
  preemptions: int = 0
  max_batch: int = 0  # most requests running at once
  # over all steps
  tokens_all: int = 0
  reserved_all: int = 0
  # over saturated steps (a request was waiting for memory)
  tokens: int = 0
  reserved_future: int = 0
  internal_frag: int = 0
  pool: int = 0
  batch: int = 0
  # charged work, over all steps
  prompt_tokens: int = 0  # prefill of requests admitted for the first time
  recomputed_tokens: int = 0  # prompt + generated tokens prefilled again after a preemption
  decode_rows: int = 0  # requests writing one token (one generated token each)
  kv_tokens: int = 0  # K/V tokens read: context of every running request after the step
  swap_tokens: int = 0  # always 0: preemption is by recomputation
  sim_ms: float = 0.0  # the step-cost model's time for every step
  cost_model: str = CPU_DEFAULT.name

  def shares(self) -> dict[str, float]:
    """Memory-time weighted shares; the ``*_of_pool`` ones are NaN if no step was saturated."""
    nan = float("nan")
    pool = self.pool if self.pool else nan
    ext = self.pool - self.tokens - self.reserved_future - self.internal_frag
    return {
      "token_share_of_pool": self.tokens / pool,
      "reserved_future_of_pool": self.reserved_future / pool,
      "internal_frag_of_pool": self.internal_frag / pool,
      "external_frag_free_of_pool": ext / pool,
      "token_share_of_reserved": self.tokens_all / self.reserved_all if self.reserved_all else nan,
      "mean_batch": self.batch / self.saturated_steps if self.saturated_steps else nan,
    }


def simulate(
  pool,
  lengths: np.ndarray,
  arrivals: Sequence[int] | None = None,
  *,
  max_batch: int = 0,
  cost: StepCostModel = CPU_DEFAULT,
  desc: str = "serving",
) -> ServingStats:
  """Serves every request of ``lengths`` (i64[n, 2]: prompt_len, output_len) on ``pool``.

  Args:
    pool: a :class:`ContiguousPool` or :class:`PagedPool`.
    lengths: one row per request.
    arrivals: step at which each request arrives (non-decreasing); None: all at step 0.
    max_batch: most requests running at once (vLLM's ``max_num_seqs``); 0: no limit, so
      memory alone limits the batch.
    cost: charges each step (``ServingStats.sim_ms``); default the CPU default.
    desc: label for the progress lines.
  """
  n = len(lengths)
  prompt = [int(p) for p in lengths[:, 0]]
  output = [int(o) for o in lengths[:, 1]]
  arrive = [0] * n if arrivals is None else [int(a) for a in arrivals]
  for r in range(n):
    pool.check_fits(prompt[r], output[r])
  generated = [0] * n
  held = [0] * n
  admitted_before = [False] * n  # a later admission recomputes what the request held
  queue: collections.deque[int] = collections.deque()
  next_arrival = 0
  running: list[int] = []  # admission order
  stats = ServingStats(cost_model=cost.name)
  finished = 0
  step = 0
  progress = Progress(desc, total=n)
  while finished < n:
    while next_arrival < n and arrive[next_arrival] <= step:
      queue.append(next_arrival)
      next_arrival += 1
    # Decode: requests admitted before this step write one token each. Growth can fail
    # only for paged pools; then the latest admitted requests are preempted (recompute).
    while running and not pool.can_grow(running):
      victim = running.pop()
      pool.release(victim)
      held[victim] = 0
      queue.appendleft(victim)
      stats.preemptions += 1
    decode_rows = len(running)
    if running:
      pool.grow(running)
      for r in running:
        held[r] += 1
        generated[r] += 1
    prompt_tokens = recomputed_tokens = 0
    # Admission (prefill) in FCFS order; stop at the first request that does not fit.
    while queue and (max_batch <= 0 or len(running) < max_batch):
      r = queue[0]
      context = prompt[r] + generated[r]
      if not pool.admit(r, context, prompt[r], output[r]):
        break
      queue.popleft()
      running.append(r)
      held[r] = context
      if admitted_before[r]:
        recomputed_tokens += context
      else:
        prompt_tokens += context
        admitted_before[r] = True
    if not running and queue:
      raise RuntimeError(f"{desc}: request {queue[0]} can never be admitted to an empty pool")

    stats.max_batch = max(stats.max_batch, len(running))
    tokens = sum(held[r] for r in running)
    reserved = pool.reserved_slots()
    stats.steps += 1
    stats.prompt_tokens += prompt_tokens
    stats.recomputed_tokens += recomputed_tokens
    stats.decode_rows += decode_rows
    stats.kv_tokens += tokens
    if running:
      stats.sim_ms += cost.step_ms(prompt_tokens + recomputed_tokens, decode_rows, tokens, 0)
    stats.tokens_all += tokens
    stats.reserved_all += reserved
    if queue:  # memory (or max_batch), not demand, limits the batch at this step
      future = sum(pool.future_slots(r, held[r], prompt[r] + output[r]) for r in running)
      stats.saturated_steps += 1
      stats.tokens += tokens
      stats.reserved_future += future
      stats.internal_frag += reserved - tokens - future
      stats.pool += pool.capacity
      stats.batch += len(running)

    still = []
    for r in running:
      if generated[r] >= output[r]:
        pool.release(r)
        held[r] = 0
        finished += 1
        progress.update()
      else:
        still.append(r)
    running = still
    step += 1
  progress.done()
  return stats


def poisson_arrivals(num_requests: int, rate: float, seed: int) -> list[int] | None:
  """Arrival steps of a Poisson process with ``rate`` requests per step; None when rate <= 0."""
  if rate <= 0:
    return None
  gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num_requests)
  return np.floor(np.cumsum(gaps)).astype(np.int64).tolist()
