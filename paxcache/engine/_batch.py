"""What crosses the jit boundary each engine step: one typed, frozen pytree.

:func:`build_step_batch` turns the scheduler's :class:`~paxcache.engine._scheduler.Plan`
into a :class:`StepBatch` of host (NumPy) arrays padded to bucket sizes; the jitted step
reads nothing else. Sizes grow by powers of two from the ``min_*_bucket`` of
``EngineConfig``, so few shapes ever compile.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

import kernels
from kernels import INVALID_BLOCK, INVALID_SLOT
from paxcache.allocator import PENDING_TOKEN
from paxcache.block_table import BlockTable, bucket_size


def _no_plan():
  """A zero-size plan field (a step without a decode plan)."""
  return flax.struct.field(default_factory=lambda: np.zeros(0, np.int32))


@flax.struct.dataclass
class StepBatch:
  """The padded inputs of one device step (``rows``: sampled rows, bucketed).

  Padding: token rows past ``cu_q_lens[-1]`` carry ``slot_mapping = -1`` (they write
  nothing); block-table rows past the batch have length 0; sample rows past the real ones
  are greedy samples of row 0 whose tokens the host ignores; copy pairs of ``-1`` copy
  nothing.
  """

  tokens: jax.Array  # i32[num_tokens]        new tokens of every row, concatenated
  prev_index: jax.Array  # i32[num_tokens]    >= 0: the token is that sample row of the step
  #                                             before (still on the device); -1: use tokens
  positions: jax.Array  # i32[num_tokens]     each token's position in its sequence
  slot_mapping: jax.Array  # i32[num_tokens]  where its K/V goes; -1 for padding
  cu_q_lens: jax.Array  # i32[batch + 1]      row b's tokens: [cu_q_lens[b], cu_q_lens[b+1])
  block_table: jax.Array  # i32[batch, max_blocks]  physical block ids, -1 unused
  lengths: jax.Array  # i32[batch]            tokens in each row's cache after this step
  logit_rows: jax.Array  # i32[rows]          token row whose logits each sample reads
  temperature: jax.Array  # f32[rows]         0 = greedy
  top_k: jax.Array  # i32[rows]               0 = whole vocabulary
  seeds: jax.Array  # i32[rows]               request seed, in [0, 2**31)
  sample_index: jax.Array  # i32[rows]        sample index within the request
  sample_positions: jax.Array  # i32[rows]    position of the token being sampled
  cow_src: jax.Array  # i32[num_copies]       copy-on-write source blocks, -1 padding (none: 0)
  cow_dst: jax.Array  # i32[num_copies]       copy-on-write destination blocks
  # Cascade attention's plan (kernels.CascadePlan's fields; decode-only steps whose rows
  # share a prefix, else zero-size: G = 0 compiles the step with plain paged attention).
  cascade_group_table: jax.Array  # i32[G, S]  each group's shared leading blocks, -1 pad
  cascade_group_lens: jax.Array  # i32[G]      shared tokens of each group (0: padding)
  cascade_group_rows: jax.Array  # i32[G, M]   batch rows of each group, -1 pad
  cascade_row_starts: jax.Array  # i32[batch or 0]  first key of each row's own part
  decode_only: bool = flax.struct.field(pytree_node=False)  # one token per row: no cu_q_lens
  any_sampled: bool = flax.struct.field(pytree_node=False)  # some row has temperature > 0
  # > 0: the step also returns each sample row's num_candidates best (log-prob, token)
  # pairs, for beam search (paxcache/engine/_beam.py); 0 compiles the step without them.
  num_candidates: int = flax.struct.field(pytree_node=False, default=0)
  # Decode-only steps: each row writes into a block it alone holds (copy-on-write), so the
  # attention kernel may write the step's K/V itself (paxcache.nn.PagedAttention,
  # fused_write) unless a row's table holds a block another row fills in this very step: a
  # row admitted on a prefix-cache hit (Plan.prefix_hit_rows; the scheduler appends before
  # it admits). False there: the write runs before the attention.
  fused_write: bool = flax.struct.field(pytree_node=False, default=True)
  # The planned GPU decode's work plan (kernels.gpu.plan.DecodePlan's arrays; decode-only
  # steps that EngineConfig.decode_plan plans, else zero-size: K = 0 compiles the step with
  # the default decode); decode_plan_meta is its static part (block_size, num_kv_heads,
  # kv_tile, sliding_window), () without a plan.
  decode_plan_chunk_seq: jax.Array = _no_plan()  # i32[K]    block-table row of each chunk
  decode_plan_chunk_start: jax.Array = _no_plan()  # i32[K]  its keys: [start, end)
  decode_plan_chunk_end: jax.Array = _no_plan()  # i32[K]
  decode_plan_seq_first: jax.Array = _no_plan()  # i32[batch or 0]  each row's first chunk
  decode_plan_seq_chunks: jax.Array = _no_plan()  # i32[batch or 0] its number of chunks
  decode_plan_meta: tuple = flax.struct.field(pytree_node=False, default=())
  # A decode burst (EngineConfig.decode_steps = K > 1): the slots of sub-steps 1 .. K - 1
  # (sub-step 0's are ``slot_mapping``; -1 for padding rows). Sub-step j runs the model on
  # the tokens sub-step j - 1 sampled, at positions and lengths + j. Zero-size (0, 0): one
  # step. Only decode-only steps without a cascade or decode plan burst.
  burst_slots: jax.Array = flax.struct.field(default_factory=lambda: np.zeros((0, 0), np.int32))

  def pack(self) -> tuple[np.ndarray, tuple]:
    """``(buffer, layout)``: every array field in one host ``i32`` buffer (``f32`` fields
    bit-cast), so that a step crosses to the device in one transfer instead of one per
    field; ``layout`` (hashable, static under jit) is what :meth:`unpack` needs."""
    arrays = [np.asarray(getattr(self, name)) for name in _ARRAY_FIELDS]
    for name, a in zip(_ARRAY_FIELDS, arrays, strict=True):
      if a.dtype.itemsize != 4:
        raise ValueError(f"StepBatch.{name}: 4-byte dtype expected, got {a.dtype}")
    # Every field starts on a 256-byte boundary: kernels take some of them as operands, and
    # a custom call (Mosaic GPU's) refuses an operand that is not 256-byte aligned.
    sizes = [-(-a.size // _ALIGN) * _ALIGN for a in arrays]
    buffer = np.zeros(sum(sizes), np.int32)
    offset = 0
    for a, size in zip(arrays, sizes, strict=True):
      buffer[offset : offset + a.size] = a.view(np.int32).ravel()
      offset += size
    # ``dtype.name`` is computed in Python on every read (~5 us a field): look it up.
    layout = tuple((a.shape, _DTYPE_NAMES.get(a.dtype) or a.dtype.name) for a in arrays) + (
      self.decode_only,
      self.any_sampled,
      self.num_candidates,
      self.fused_write,
      self.decode_plan_meta,
    )
    return buffer, layout

  @classmethod
  def unpack(cls, buffer: jax.Array, layout: tuple) -> StepBatch:
    """The :class:`StepBatch` that :meth:`pack` made ``buffer`` and ``layout`` of (traceable:
    slices of the one buffer)."""
    *fields, decode_only, any_sampled, num_candidates, fused_write, decode_plan_meta = layout
    values, offset = {}, 0
    for name, (shape, dtype) in zip(_ARRAY_FIELDS, fields, strict=True):
      size = math.prod(shape)
      piece = buffer[offset : offset + size].reshape(shape)
      if dtype != "int32":
        piece = jax.lax.bitcast_convert_type(piece, jnp.dtype(dtype))
      values[name] = piece
      offset += -(-size // _ALIGN) * _ALIGN
    return cls(
      **values,
      decode_only=decode_only,
      any_sampled=any_sampled,
      num_candidates=num_candidates,
      fused_write=fused_write,
      decode_plan_meta=decode_plan_meta,
    )

  @property
  def shape_key(self) -> tuple:
    """What the jitted step is compiled for: the padded sizes and the static flags."""
    return (
      self.tokens.shape[0],
      self.block_table.shape[0],
      self.block_table.shape[1],
      self.cow_src.shape[0],
      self.logit_rows.shape[0],
      self.decode_only,
      self.any_sampled,
      self.num_candidates,
      self.fused_write,
      self.cascade_group_table.shape,
      self.cascade_group_rows.shape[1],
      self.decode_plan_chunk_seq.shape[0],
      self.burst_slots.shape[0],
    )

  def cascade_plan(self) -> kernels.CascadePlan | None:
    """The step's :class:`kernels.CascadePlan`, or None (static: zero groups) when the step
    runs plain paged attention. Traceable."""
    if not self.cascade_group_rows.shape[0]:
      return None
    return kernels.CascadePlan(
      self.cascade_group_table,
      self.cascade_group_lens,
      self.cascade_group_rows,
      self.cascade_row_starts,
    )

  def cascade_counts(self) -> tuple[int, int, int]:
    """Host: ``(groups, member rows, K/V token reads saved per layer and KV head)`` of the
    step's cascade plan, the saving being ``(members - 1) * shared tokens`` per group."""
    rows = np.asarray(self.cascade_group_rows)
    if not rows.shape[0]:
      return 0, 0, 0
    members = (rows >= 0).sum(axis=1)
    lens = np.asarray(self.cascade_group_lens).astype(np.int64)
    saved = int((np.maximum(members - 1, 0) * lens).sum())
    return int((members > 0).sum()), int(members.sum()), saved

  def decode_plan(self):
    """The step's ``kernels.gpu.plan.DecodePlan``, or None (static: zero chunks) when the
    step runs the default decode. Traceable."""
    if not self.decode_plan_chunk_seq.shape[0]:
      return None
    from kernels.gpu.plan import DecodePlan  # only a planned (GPU) step loads the package

    block_size, num_kv_heads, kv_tile, sliding_window = self.decode_plan_meta
    return DecodePlan(
      chunk_seq=self.decode_plan_chunk_seq,
      chunk_start=self.decode_plan_chunk_start,
      chunk_end=self.decode_plan_chunk_end,
      seq_first_chunk=self.decode_plan_seq_first,
      seq_num_chunks=self.decode_plan_seq_chunks,
      block_size=block_size,
      num_kv_heads=num_kv_heads,
      kv_tile=kv_tile,
      sliding_window=sliding_window,
    )

  def decode_plan_chunks(self) -> int:
    """Host: the real (unpadded) chunks of the step's decode plan; 0 without one."""
    return int(np.asarray(self.decode_plan_seq_chunks).sum())


_ALIGN = 64  # i32 elements: 256 bytes
_DTYPE_NAMES = {np.dtype(t): np.dtype(t).name for t in (np.int32, np.float32, np.uint32)}
_ARRAY_FIELDS = tuple(
  f.name for f in dataclasses.fields(StepBatch) if f.metadata.get("pytree_node", True)
)


def build_step_batch(
  plan,
  table: BlockTable,
  sampling: Mapping,
  *,
  min_tokens: int,
  min_copies: int,
  pending_rows: Mapping | None = None,
  num_candidates: int = 0,
  prev_decodes: list | None = None,
  decode_sampling: tuple | None = None,
  cascade_min_shared_blocks: int = 0,
  block_size: int | None = None,
  decode_planner=None,
  burst_slots: np.ndarray | None = None,
) -> StepBatch:
  """The :class:`StepBatch` of ``plan``; pure (reads its arguments, changes none).

  Args:
    plan: the scheduler's plan; its decodes and then its ``rows`` are the block-table rows,
      in order.
    table: the block table of those rows (``BlockTable.from_allocator``), already padded.
    sampling: request id -> ``(temperature, top_k, seed)`` for every sampled request.
    min_tokens, min_copies: smallest bucket sizes of the token rows and copy pairs.
    pending_rows: sequence -> its sample row in the step still running on the device, for
      sequences whose next input token (``PENDING_TOKEN`` on the host) that step samples.
    num_candidates: candidates per sample row for beam search (0: none; static).
    prev_decodes: the plain decodes of the step still on the device (its sample rows
      ``0 .. len - 1``); when ``plan.decodes`` is the same list (the steady state), a pending
      decode's sample row is its own row, without a look-up in ``pending_rows``.
    decode_sampling: ``(temperature f32, top_k i32, seeds i32, sample_index i32)`` of
      ``plan.decodes``, when the caller keeps them (else read from ``sampling``).
    cascade_min_shared_blocks: > 0: in a decode-only step, plan cascade attention
      (``kernels.plan_cascade``) for groups of rows sharing at least this many leading
      blocks; 0, or no such group: the step carries a zero-size plan (plain attention).
    block_size: the pool's block size (needed when ``cascade_min_shared_blocks > 0``).
    decode_planner: a :class:`~paxcache.engine._decode_plan.DecodePlanner` or None. In a
      decode-only step without a cascade plan (the cascade path wins; the two are never
      combined), ``decode_planner(lengths, rows)`` gives the step's decode plan or None.
    burst_slots: ``i32[K - 1, len(plan.decodes)]``, a decode burst's later slots
      (``EngineConfig.decode_steps = K``): the plan holds plain decodes only, the allocator
      already holds the burst's K tokens of each (so ``table.lengths`` counts K - 1 more
      than sub-step 0 reads), and the step plans neither cascade nor decode plan.
  """
  rows = plan.rows
  decodes = plan.decodes
  nd = len(decodes)
  b = nd + len(rows)
  batch_pad = table.batch_size
  # Vectorised over rows (a Python loop of NumPy slice assignments per row cost ~10 us a
  # row, 2.5 ms a step at batch 256): the decodes are columns already, the other rows
  # (few) go through flat lists.
  starts = np.empty(b, np.int32)
  q_lens = np.ones(b, np.int32)
  starts[:nd] = plan.decode_starts
  if rows:
    starts[nd:] = [r.start for r in rows]
    q_lens[nd:] = [r.stop - r.start for r in rows]
  decode_only = not rows or bool((q_lens[nd:] == 1).all())
  total = nd + (int(q_lens[nd:].sum()) if rows else 0)
  num_tokens = batch_pad if decode_only else bucket_size(total, minimum=max(min_tokens, batch_pad))
  cu = np.full(batch_pad + 1, total, np.int32)
  cu[0] = 0
  np.cumsum(q_lens, out=cu[1 : b + 1])
  tokens = np.zeros(num_tokens, np.int32)
  tokens[:nd] = plan.decode_tokens
  if decode_only:
    tokens[nd:b] = [r.seq.tokens[r.start] for r in rows]
    row_of = np.arange(b)
  else:
    tokens[nd:total] = [t for r in rows for t in r.seq.tokens[r.start : r.stop]]
    row_of = np.repeat(np.arange(b), q_lens)
  prev_index = np.full(num_tokens, -1, np.int32)
  pending = np.flatnonzero(tokens[:total] == PENDING_TOKEN)
  if len(pending):  # only a decode's one token can be pending
    rows_pending = row_of[pending]
    if prev_decodes is not None and nd and prev_decodes == decodes:
      # The steady state: decode i reads sample row i of the step before.
      in_block = rows_pending < nd
      prev_index[pending[in_block]] = rows_pending[in_block]
      pending_rest, rows_rest = pending[~in_block], rows_pending[~in_block]
    else:
      pending_rest, rows_rest = pending, rows_pending
    if len(pending_rest):
      prev_index[pending_rest] = [
        pending_rows[decodes[i] if i < nd else rows[i - nd].seq] for i in rows_rest.tolist()
      ]
    tokens[pending] = 0
  positions = np.zeros(num_tokens, np.int32)
  if decode_only:
    positions[:b] = starts
  else:
    positions[:total] = np.arange(total, dtype=np.int32) + np.repeat(starts - cu[:b], q_lens)
  slot_mapping = np.full(num_tokens, INVALID_SLOT, np.int32)
  slot_mapping[:nd] = plan.decode_slots
  if rows:
    slot_mapping[nd:total] = np.concatenate([r.slots for r in rows])
  # Sample rows: the decodes' (row i samples sequence i), then the other rows' samplers.
  samplers = [(s, int(cu[nd + i + 1]) - 1) for i, r in enumerate(rows) for s in r.samplers]
  n = nd + len(samplers)
  num_rows = bucket_size(n, minimum=batch_pad)
  logit_rows = np.zeros(num_rows, np.int32)
  temperature = np.zeros(num_rows, np.float32)
  top_k = np.zeros(num_rows, np.int32)
  seeds = np.zeros(num_rows, np.int32)
  sample_index = np.zeros(num_rows, np.int32)
  sample_positions = np.zeros(num_rows, np.int32)
  if nd:
    logit_rows[:nd] = np.arange(nd, dtype=np.int32)
    if decode_sampling is None:
      params = [sampling[s.seq_id[0]] for s in decodes]
      decode_sampling = (
        [p[0] for p in params],
        [p[1] for p in params],
        [p[2] for p in params],
        [s.index for s in decodes],
      )
    temperature[:nd], top_k[:nd], seeds[:nd], sample_index[:nd] = decode_sampling
    # A decode samples the token after its input: position start + 1 = len(seq.tokens).
    sample_positions[:nd] = starts[:nd] + 1
  if samplers:
    params = [sampling[s.seq_id[0]] for s, _ in samplers]
    logit_rows[nd:n] = [row for _, row in samplers]
    temperature[nd:n] = [p[0] for p in params]
    top_k[nd:n] = [p[1] for p in params]
    seeds[nd:n] = [p[2] for p in params]
    sample_index[nd:n] = [s.index for s, _ in samplers]
    sample_positions[nd:n] = [len(s.tokens) for s, _ in samplers]
  pairs = np.array(plan.cow_pairs, np.int32).reshape(-1, 2)
  # No copies: zero-length arrays, and the step compiles without the copy (two scatters
  # per layer that would copy nothing, 60 launches a step for a 30-layer model).
  num_copies = bucket_size(len(pairs), minimum=min_copies) if len(pairs) else 0
  cow_src = np.full(num_copies, INVALID_BLOCK, np.int32)
  cow_dst = np.full(num_copies, INVALID_BLOCK, np.int32)
  cow_src[: len(pairs)] = pairs[:, 0]
  cow_dst[: len(pairs)] = pairs[:, 1]
  block_ids, lengths = np.asarray(table.block_ids), np.asarray(table.lengths)
  burst = np.zeros((0, 0), np.int32)
  if burst_slots is not None:
    if rows or not nd or burst_slots.shape != (len(burst_slots), nd):
      raise ValueError(
        f"build_step_batch: a burst takes plain decodes only and i32[K - 1, {nd}] slots, got "
        f"{len(rows)} other rows and slots of shape {burst_slots.shape}"
      )
    lengths = lengths.copy()
    lengths[:nd] -= len(burst_slots)  # sub-step 0 reads its own tokens, not the burst's
    burst = np.full((len(burst_slots), num_tokens), INVALID_SLOT, np.int32)
    burst[:, :nd] = burst_slots
    cascade_min_shared_blocks, decode_planner = 0, None
  cascade = None
  if decode_only and cascade_min_shared_blocks > 0 and b > 1:
    if block_size is None:
      raise ValueError("build_step_batch: cascade_min_shared_blocks > 0 needs block_size")
    # A group's rows share their first block: when no two rows do (one unique over the
    # first column, ~0.01 ms at 256 rows), skip the planner (0.04-0.2 ms a step).
    first = block_ids[:b, 0]
    if len(np.unique(first)) < b:
      # Padded rows have length 0 and take no part; G, M and S are powers of two.
      cascade = kernels.plan_cascade(
        block_ids, lengths, block_size, min_shared_blocks=cascade_min_shared_blocks
      )
  if cascade is None:
    cascade = kernels.CascadePlan(
      np.zeros((0, 0), np.int32),
      np.zeros(0, np.int32),
      np.zeros((0, 0), np.int32),
      np.zeros(0, np.int32),
    )
  plan_fields = {}
  if decode_only and decode_planner is not None and not cascade.group_rows.shape[0]:
    decode_plan = decode_planner(lengths, b)
    if decode_plan is not None:
      p = decode_plan
      plan_fields = dict(
        decode_plan_chunk_seq=p.chunk_seq,
        decode_plan_chunk_start=p.chunk_start,
        decode_plan_chunk_end=p.chunk_end,
        decode_plan_seq_first=p.seq_first_chunk,
        decode_plan_seq_chunks=p.seq_num_chunks,
        decode_plan_meta=(p.block_size, p.num_kv_heads, p.kv_tile, p.sliding_window),
      )
  return StepBatch(
    tokens=tokens,
    prev_index=prev_index,
    positions=positions,
    slot_mapping=slot_mapping,
    cu_q_lens=cu,
    block_table=block_ids,
    lengths=lengths,
    logit_rows=logit_rows,
    temperature=temperature,
    top_k=top_k,
    seeds=seeds,
    sample_index=sample_index,
    sample_positions=sample_positions,
    cow_src=cow_src,
    cow_dst=cow_dst,
    cascade_group_table=cascade.group_table,
    cascade_group_lens=cascade.group_lens,
    cascade_group_rows=cascade.group_rows,
    cascade_row_starts=cascade.row_starts,
    decode_only=decode_only,
    any_sampled=bool((temperature > 0).any()),
    num_candidates=num_candidates,
    # Only a decode-only step's kernel could write K/V itself; one with a row admitted
    # on a prefix hit writes first (a step with a prefill chunk always does).
    fused_write=not (decode_only and plan.prefix_hit_rows),
    burst_slots=burst,
    **plan_fields,
  )
