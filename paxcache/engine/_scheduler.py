"""The host side of one engine iteration: which sequences run, which are preempted.

Policy (first come, first served by arrival, as in the paper and vLLM):

1. **Plan the running groups.** Every running sequence with one pending token (a
   decode) gets one token of the step's budget first; sequences still computing their
   prompt share what is left, in arrival order (chunked prefill).
2. **Preempt when blocks run out.** Groups are checked in arrival order; while the
   blocks the next group needs exceed the free blocks, the latest-arrived running
   group is preempted, by swapping its blocks to the host pool (``"swap"``) or by
   freeing them and recomputing later (``"recompute"``). A swap that does not fit in
   the host pool falls back to recomputation. A group is preempted as a whole.
3. **Swap in** swapped groups, oldest first, only in an iteration without preemption
   and while their blocks fit.
4. **Append** the planned tokens to the allocator (copy-on-write pairs come out here).
5. **Admit** waiting groups, oldest first, only when nothing is swapped out and no
   group was preempted in this iteration, while rows, budget and blocks allow;
   the first group that does not fit stops admission (no overtaking).
   Under a reservation policy (Orca (Max), (Pow2), (Oracle); see ``_reservation.py``) a
   group is admitted only when its whole reservation fits one contiguous free range of
   the reservation space; it holds the range until it finishes (or is preempted).
6. **Fork** a request's ``n - 1`` extra samples in the step that computes the last
   prompt token; they share every block (copy-on-write at their first own token).

Blocks are taken lazily: a sequence holds exactly the tokens computed by the end of
the current step. So every block the prefix cache has registered holds K/V that are
written no later than this step, and appends (4) come before admissions (5) so a new
request can hit blocks filled in this very step: each layer writes all the step's
K/V before its attention reads them (a step with such a hit, ``Plan.prefix_hit_rows``,
keeps the write apart from the attention kernel: ``StepBatch.fused_write``).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from paxcache.allocator import BlockAllocator
from paxcache.engine._request import Group, Seq, Status
from paxcache.engine._reservation import FirstFitRanges, reservation_blocks


@dataclasses.dataclass(eq=False)
class ScheduledSeq:
  """Tokens ``seq.tokens[start:stop]`` computed this step for ``seq``.

  ``samplers``: the sequences that sample their next token from this row's last
  logits (empty for a prefill chunk that does not reach the last token; more than one
  when the request is forked in this step).
  """

  seq: Seq
  start: int
  stop: int
  slots: np.ndarray  # i32[stop - start]
  samplers: list[Seq]


@dataclasses.dataclass
class Plan:
  """One iteration's work. Its rows, in batch order: first the plain decodes, as columns
  (``decodes``: one token ``seq.tokens[start]`` each, at ``start = decode_starts[i]``,
  written at ``decode_slots[i]``, and sampled by the sequence itself, of a request already
  forked and not beam searching; ``decode_groups[i]`` is its group), then every other row
  (``rows``: prefill chunks, a request's last prompt token, beam rows). Columns, not one
  :class:`ScheduledSeq` each: at batch 256 building a row object per decode cost more host
  time than the rest of the step's bookkeeping."""

  rows: list[ScheduledSeq] = dataclasses.field(default_factory=list)
  decodes: list[Seq] = dataclasses.field(default_factory=list)
  decode_groups: list[Group] = dataclasses.field(default_factory=list)
  decode_ids: list = dataclasses.field(default_factory=list)  # each decode's seq_id
  decode_starts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
  decode_tokens: list[int] = dataclasses.field(default_factory=list)  # PENDING_TOKEN allowed
  decode_slots: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
  cow_pairs: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  swap_out: list[np.ndarray] = dataclasses.field(default_factory=list)  # i32[n, 2] (dev, host)
  swap_in: list[np.ndarray] = dataclasses.field(default_factory=list)  # i32[n, 2] (host, dev)
  prefix_hit_tokens: int = 0
  # Rows admitted in this step with a prefix-cache hit: their tables may hold a block that
  # another row fills in this very step (appends come before admission), so that step must
  # write its K/V before any attention reads it (StepBatch.fused_write).
  prefix_hit_rows: int = 0
  admitted_prompt_tokens: int = 0
  preemptions_swap: int = 0
  preemptions_recompute: int = 0
  # Computed tokens freed by recompute preemptions (each is computed again on re-admission,
  # less any prefix-cache hit then).
  recomputed_tokens: int = 0
  forked: list[Seq] = dataclasses.field(default_factory=list)

  @property
  def num_rows(self) -> int:
    return len(self.decodes) + len(self.rows)

  def all_rows(self) -> list[ScheduledSeq]:
    """Every row as a :class:`ScheduledSeq`, in batch order (the decodes made into rows:
    for tests and for code off the hot path)."""
    decodes = [
      ScheduledSeq(s, start, start + 1, self.decode_slots[i : i + 1], [s])
      for i, (s, start) in enumerate(zip(self.decodes, self.decode_starts.tolist(), strict=True))
    ]
    return decodes + self.rows


class Scheduler:
  """Waiting / running / swapped queues over one :class:`BlockAllocator`.

  Args:
    allocator: the block allocator (its ``num_host_blocks`` is the swap space).
    preemption_mode: ``"swap"`` or ``"recompute"``.
    max_num_seqs: resident live sequences at most (block-table rows per step).
    max_num_batched_tokens: query tokens per step at most (the chunked-prefill budget).
    watermark_blocks: blocks admission leaves free while other groups run, so that
      running sequences can grow without an immediate preemption.
    reservation: ``"paged"`` (blocks on demand) or an Orca policy ``"max"``, ``"pow2"``,
      ``"oracle"`` (contiguous reservation at admission; see ``_reservation.py``).
    max_seq_len: the model's maximum length (what ``"max"`` reserves).
  """

  def __init__(
    self,
    allocator: BlockAllocator,
    *,
    preemption_mode: str,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    watermark_blocks: int = 0,
    reservation: str = "paged",
    max_seq_len: int | None = None,
  ):
    self.allocator = allocator
    self.reservation = reservation
    self.max_seq_len = max_seq_len
    # The reservation space, in blocks (None when paged).
    self.reserved_space = None if reservation == "paged" else FirstFitRanges(allocator.num_blocks)
    self.preemption_mode = preemption_mode
    self.max_num_seqs = max_num_seqs
    self.max_num_batched_tokens = max_num_batched_tokens
    self.watermark_blocks = watermark_blocks
    # False while the engine keeps two steps unread (EngineConfig.pipeline_depth): a
    # preempted sequence must have no pending token, so a preemption then is a bug,
    # raised before anything changes.
    self.may_preempt = True
    self.waiting: collections.deque[Group] = collections.deque()
    self.running: list[Group] = []  # arrival order
    self.swapped: collections.deque[Group] = collections.deque()

  # ------------------------------------------------------------------ queues

  def add(self, group: Group) -> None:
    group.status = Status.WAITING
    self.waiting.append(group)

  def remove(self, group: Group) -> None:
    """Takes ``group`` out of its queue and frees its blocks (abort or finish)."""
    queue = {
      Status.WAITING: self.waiting,
      Status.RUNNING: self.running,
      Status.SWAPPED: self.swapped,
    }.get(group.status)
    if queue is not None:
      queue.remove(group)
    for s in group.seqs:
      if s.seq_id in self.allocator:
        self.allocator.free(s.seq_id)
    self._release(group)
    group.status = Status.FINISHED

  def finish(self, group: Group) -> None:
    """A running group whose last sample stopped by length: out of the running queue, its
    reservation released (its blocks are freed by the engine in the same iteration)."""
    self.running.remove(group)
    self._release(group)
    group.status = Status.FINISHED

  def reservation_size(self, group: Group) -> int:
    """Blocks ``group`` reserves under the reservation policy (0 when paged)."""
    if self.reserved_space is None:
      return 0
    r = group.request
    return reservation_blocks(
      self.reservation,
      len(r.prompt),
      r.max_new_tokens,
      r.n,
      self.max_seq_len,
      self.allocator.block_size,
    )

  def _reserve(self, group: Group) -> bool:
    if self.reserved_space is None or group.reserved is not None:
      return True
    size = self.reservation_size(group)
    start = self.reserved_space.reserve(size)
    if start is None:
      return False
    group.reserved = (start, size)
    return True

  def _release(self, group: Group) -> None:
    if group.reserved is not None:
      self.reserved_space.release(*group.reserved)
      group.reserved = None

  def num_resident_seqs(self) -> int:
    """Live sequences of running groups, plus the rows beam requests may still fork."""
    return sum(len(g.live) + g.reserve for g in self.running)

  def has_work(self) -> bool:
    return bool(self.waiting or self.running or self.swapped)

  # ------------------------------------------------------------------ one iteration

  def schedule(self) -> Plan:
    plan = Plan()
    alloc = self.allocator
    budget = self.max_num_batched_tokens

    # 1. Token budget for the running groups: decodes first, then prefill chunks. (The
    # loops below run over every resident sequence each step: plain attribute reads, no
    # properties, no object per sequence, keep them cheap at batch 256.)
    # The decodes as parallel lists; ``odd``: indices of decodes that are not plain rows
    # (an unforked request's last prompt token, a beam row).
    dec, dec_g, starts, odd = [], [], [], []
    longer = []
    resident = 0
    for g in self.running:
      resident += g.reserve  # rows a beam request forks after its prompt (0 otherwise)
      for s in g.seqs:
        if s.finish_reason is None:
          resident += 1
          n = s.num_computed
          pending = len(s.tokens) - n
          if pending == 1:
            if not g.forked or g.beam is not None:
              odd.append(len(dec))
            dec.append(s)
            dec_g.append(g)
            starts.append(n)
          elif pending > 1:
            longer.append((g, s))
    if len(dec) > budget:  # decodes past the budget wait (budget >= 1 here)
      del dec[budget:], dec_g[budget:], starts[budget:]
      odd = [i for i in odd if i < budget]
    budget -= len(dec)
    chunks: dict[Seq, int] = dict.fromkeys(dec, 1)
    chunked = []
    for g, s in longer:
      if budget > 0:
        chunks[s] = c = min(len(s.tokens) - s.num_computed, budget)
        budget -= c
        chunked.append((g, s, c))

    # 2. Blocks. The common case (everything fits) costs one vectorised query; when short,
    # groups are checked in arrival order and the latest-arrived is preempted while short.
    need_total = sum(alloc.blocks_needed_to_append([s.seq_id], c) for _, s, c in chunked)
    dec_ids = [s.seq_id for s in dec]
    if dec:
      need_total += alloc.blocks_needed_to_append(dec_ids, 1)
    replanned = False  # preemption or swap-in changed the running set: step 4 re-reads it
    if need_total > alloc.num_free_blocks:
      replanned = True
      order = list(self.running)
      need_total = 0
      while order:
        g = order.pop(0)
        need = self._blocks_to_append([g], chunks)
        while need_total + need > alloc.num_free_blocks and order:
          victim = order.pop()
          budget += self._preempt(victim, plan, chunks)
        if need_total + need > alloc.num_free_blocks:
          budget += self._preempt(g, plan, chunks)
          continue
        need_total += need
    preempted = plan.preemptions_swap + plan.preemptions_recompute > 0

    # 3. Swap in, oldest first, while the blocks fit (never in an iteration that preempted).
    while self.swapped and not preempted:
      g = self.swapped[0]
      live = g.live
      if self.num_resident_seqs() + len(live) + g.reserve > self.max_num_seqs:
        break
      ids = [s.seq_id for s in live]
      need = alloc.blocks_needed_to_swap_in_group(ids)
      # +1 per sequence: its next token may need a block (or a copy-on-write copy).
      if need + len(live) + need_total > alloc.num_free_blocks or not self._reserve(g):
        break
      self.swapped.popleft()
      replanned = True
      plan.swap_in.append(alloc.swap_in_group(ids))
      g.status = Status.RUNNING
      self.running.append(g)
      self.running.sort(key=lambda x: x.arrival)
      for s in live:
        if budget > 0:
          chunks[s] = min(s.num_pending, budget)
          budget -= chunks[s]
      extra = self._blocks_to_append([g], chunks)
      if need_total + extra > alloc.num_free_blocks:
        for s in live:  # swapped in, but it computes from the next step on
          budget += chunks.pop(s, 0)
      else:
        need_total += extra

    # 4. Appends (copy-on-write pairs appear here): all decodes in one vectorised call.
    if replanned:  # otherwise step 1's lists are still exact
      dec, dec_g, starts, odd, chunked = [], [], [], [], []
      for g in self.running:
        for s in g.seqs:
          c = chunks.get(s, 0) if s.finish_reason is None else 0
          if c == 1 and len(s.tokens) - s.num_computed == 1:
            if not g.forked or g.beam is not None:
              odd.append(len(dec))
            dec.append(s)
            dec_g.append(g)
            starts.append(s.num_computed)
          elif c:
            chunked.append((g, s, c))
      dec_ids = [s.seq_id for s in dec]
    if dec:
      # One vectorised append for every decode; the common rows stay columns of the plan.
      tokens = [s.tokens[n] for s, n in zip(dec, starts, strict=True)]
      res = alloc.append_batch(dec_ids, tokens)
      plan.cow_pairs.extend(map(tuple, res.cow_pairs.tolist()))
      slots = res.slots
      if odd:
        for i in odd:
          n = starts[i]
          self._add_row(plan, dec_g[i], dec[i], n, n + 1, slots[i : i + 1])
        keep = np.ones(len(dec), np.bool_)
        keep[odd] = False
        slots = slots[keep]
        plain = keep.tolist()
        dec, dec_g, dec_ids, starts, tokens = (
          [x for x, k in zip(xs, plain, strict=True) if k]
          for xs in (dec, dec_g, dec_ids, starts, tokens)
        )
      plan.decodes, plan.decode_groups, plan.decode_ids = dec, dec_g, dec_ids
      plan.decode_starts = np.array(starts, np.int32)
      plan.decode_tokens = tokens
      plan.decode_slots = slots
    for g, s, c in chunked:
      res = alloc.append_tokens(s.seq_id, s.tokens[s.num_computed : s.num_computed + c])
      if res.cow is not None:
        plan.cow_pairs.append(res.cow)
      self._add_row(plan, g, s, s.num_computed, s.num_computed + c, res.slots)

    # 5. Admission. The appends above have already taken their blocks.
    need_total = 0
    resident += len(plan.forked)  # samples forked off a prompt finished in step 4
    if replanned:
      resident = self.num_resident_seqs()
    while self.waiting and not self.swapped and not preempted and budget > 0:
      g = self.waiting[0]
      live = g.live
      rows = (len(live) if g.forked else g.request.n) + g.reserve
      if resident + rows > self.max_num_seqs or budget < len(live):
        break
      need = sum(alloc.blocks_needed_to_add(s.tokens) for s in live)
      watermark = self.watermark_blocks if self.running else 0
      if need + need_total + watermark > alloc.num_free_blocks or not self._reserve(g):
        break
      self.waiting.popleft()
      for s in live:
        hit = alloc.num_cached_tokens(s.tokens)
        stop = min(len(s.tokens), hit + max(budget, 1))
        got = alloc.add_sequence(s.seq_id, s.tokens[:stop])
        plan.prefix_hit_tokens += got
        plan.prefix_hit_rows += got > 0
        budget -= stop - got
        s.num_computed = got
        self._add_row(plan, g, s, got, stop, alloc.slots(s.seq_id, got, stop))
      if not g.admitted:
        plan.admitted_prompt_tokens += len(g.request.prompt)
        g.admitted = True
      g.status = Status.RUNNING
      self.running.append(g)
      resident += len(g.live) + g.reserve
    return plan

  # ------------------------------------------------------------------ helpers

  def _add_row(self, plan: Plan, g: Group, s: Seq, start: int, stop: int, slots) -> None:
    samplers = []
    if stop == len(s.tokens):
      samplers = [s]
      if not g.forked:
        # The last prompt token is computed now: fork the other samples off it.
        for i in range(1, g.request.n):
          child = Seq(
            seq_id=(g.request.request_id, i),
            index=i,
            tokens=list(s.tokens),
            prompt_len=s.prompt_len,
          )
          self.allocator.fork(s.seq_id, child.seq_id)
          g.seqs.append(child)
          samplers.append(child)
          plan.forked.append(child)
        g.forked = True
    plan.rows.append(ScheduledSeq(s, start, stop, np.asarray(slots, np.int32), samplers))

  def _blocks_to_append(self, groups: list[Group], chunks: dict[Seq, int]) -> int:
    """Blocks the planned tokens of ``groups`` take (new blocks and copy-on-write copies)."""
    alloc = self.allocator
    decodes, need = [], 0
    for g in groups:
      for s in g.seqs:
        c = chunks.get(s, 0) if s.finish_reason is None else 0
        if c == 1 and len(s.tokens) - s.num_computed == 1:
          decodes.append(s.seq_id)
        elif c:
          need += alloc.blocks_needed_to_append([s.seq_id], c)
    return need + (alloc.blocks_needed_to_append(decodes, 1) if decodes else 0)

  def _preempt(self, g: Group, plan: Plan, chunks: dict[Seq, int]) -> int:
    """Preempts ``g`` (swap, or recompute when swapping is off, the host pool is too
    small, or the group's swap-in could never fit the device pool); returns the token
    budget its planned chunks held."""
    if not self.may_preempt:
      raise RuntimeError(
        "scheduler: a preemption while the engine keeps two steps unread (the engine's "
        "bound on the blocks a step takes should have made this impossible)"
      )
    alloc = self.allocator
    live = g.live
    freed_budget = sum(chunks.pop(s, 0) for s in live)
    self.running.remove(g)
    self._release(g)
    ids = [s.seq_id for s in live]
    # The group swaps out together, each block its samples share copied once (and shared
    # again when it swaps in), so it comes back needing at most host_need blocks and one
    # more per sequence (step 3); a group for which the whole pool is too small for that is
    # recomputed instead, or it would wait in `swapped` forever.
    host_need = alloc.host_blocks_needed_to_swap_out(ids)
    can_return = host_need + len(live) <= alloc.num_blocks
    if self.preemption_mode == "swap" and host_need <= alloc.num_free_host_blocks and can_return:
      plan.swap_out.append(alloc.swap_out_group(ids))
      g.status = Status.SWAPPED
      _insert_by_arrival(self.swapped, g)
      plan.preemptions_swap += 1
      g.preemptions_swap += 1
    else:
      for s in live:
        alloc.free(s.seq_id)
        plan.recomputed_tokens += s.num_computed
        s.num_computed = 0
      g.status = Status.WAITING
      _insert_by_arrival(self.waiting, g)
      plan.preemptions_recompute += 1
      g.preemptions_recompute += 1
    return freed_budget


def _insert_by_arrival(queue: collections.deque, g: Group) -> None:
  """Puts a preempted group back in arrival order (it may be older than queued ones)."""
  i = 0
  while i < len(queue) and queue[i].arrival < g.arrival:
    i += 1
  queue.insert(i, g)
