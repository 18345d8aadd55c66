"""The step's inputs: ``build_step_batch`` against a row-by-row reference, and the packed
buffer that carries a :class:`StepBatch` to the device in one transfer."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from paxcache.allocator import PENDING_TOKEN
from paxcache.block_table import BlockTable
from paxcache.engine._batch import StepBatch, build_step_batch
from paxcache.engine._request import Seq
from paxcache.engine._scheduler import Plan, ScheduledSeq

FIELDS = [
  "tokens",
  "prev_index",
  "positions",
  "slot_mapping",
  "cu_q_lens",
  "block_table",
  "lengths",
  "logit_rows",
  "temperature",
  "top_k",
  "seeds",
  "sample_index",
  "sample_positions",
  "cow_src",
  "cow_dst",
]


def _seq(rid, index, tokens, prompt_len):
  return Seq(seq_id=(rid, index), index=index, tokens=list(tokens), prompt_len=prompt_len)


def _mixed_plan():
  """Decodes (one with its input token still on the device), a prefill chunk that samples
  nothing, a last chunk sampled by two forked samples, and one copy-on-write pair."""
  a = _seq("a", 0, [5, 6, 7, 8], 3)  # decode of token 8 at position 3
  b = _seq("b", 0, [1, 2, 3, PENDING_TOKEN], 3)  # decode whose token the last step samples
  c = _seq("c", 0, list(range(10, 30)), 20)  # prefill chunk [4, 12): no sample
  d = _seq("d", 0, [40, 41, 42, 43, 44], 5)  # last chunk [2, 5), forked into d/0 and d/1
  d1 = _seq("d", 1, [40, 41, 42, 43, 44], 5)
  rows = [
    ScheduledSeq(a, 3, 4, np.array([103], np.int32), [a]),
    ScheduledSeq(b, 3, 4, np.array([211], np.int32), [b]),
    ScheduledSeq(c, 4, 12, np.arange(304, 312, dtype=np.int32), []),
    ScheduledSeq(d, 2, 5, np.array([402, 403, 404], np.int32), [d, d1]),
  ]
  plan = Plan(rows=rows, cow_pairs=[(7, 9)])
  sampling = {"a": (0.0, 0, 11), "b": (0.5, 3, 12), "c": (1.0, 0, 13), "d": (0.8, 5, 14)}
  table = BlockTable(
    block_ids=np.arange(8 * 8, dtype=np.int32).reshape(8, 8), lengths=np.arange(8, dtype=np.int32)
  )
  return plan, table, sampling, {b: 6}


def _reference(plan, table, sampling, pending_rows, num_tokens, num_rows, num_copies):
  """Row by row, in plain Python."""
  tokens, prev, pos, slots, cu = [], [], [], [], [0]
  logit_rows, temp, top_k, seeds, index, spos = [], [], [], [], [], []
  for r in plan.rows:
    for j, t in enumerate(r.seq.tokens[r.start : r.stop]):
      if t == PENDING_TOKEN:
        tokens.append(0)
        prev.append(pending_rows[r.seq])
      else:
        tokens.append(t)
        prev.append(-1)
      pos.append(r.start + j)
      slots.append(int(r.slots[j]))
    cu.append(len(tokens))
    for s in r.samplers:
      t, k, seed = sampling[s.seq_id[0]]
      logit_rows.append(len(tokens) - 1)
      temp.append(t)
      top_k.append(k)
      seeds.append(seed)
      index.append(s.index)
      spos.append(len(s.tokens))

  def pad(xs, n, fill=0):
    return xs + [fill] * (n - len(xs))

  batch_pad = table.batch_size
  return dict(
    tokens=pad(tokens, num_tokens),
    prev_index=pad(prev, num_tokens, -1),
    positions=pad(pos, num_tokens),
    slot_mapping=pad(slots, num_tokens, -1),
    cu_q_lens=pad(cu, batch_pad + 1, len(tokens)),
    logit_rows=pad(logit_rows, num_rows),
    temperature=pad(temp, num_rows, 0.0),
    top_k=pad(top_k, num_rows),
    seeds=pad(seeds, num_rows),
    sample_index=pad(index, num_rows),
    sample_positions=pad(spos, num_rows),
    cow_src=pad([s for s, _ in plan.cow_pairs], num_copies, -1),
    cow_dst=pad([d for _, d in plan.cow_pairs], num_copies, -1),
  )


def test_build_step_batch_matches_a_row_by_row_reference():
  plan, table, sampling, pending_rows = _mixed_plan()
  batch = build_step_batch(
    plan, table, sampling, min_tokens=8, min_copies=4, pending_rows=pending_rows
  )
  assert not batch.decode_only and batch.any_sampled
  # 1 + 1 + 8 + 3 = 13 tokens -> 16; 5 samples -> 8 rows (the table's 8 rows); 1 copy -> 4.
  # The last three: no cascade plan (a mixed step): group table (0, 0), 0 members; no
  # decode plan: 0 chunks.
  assert batch.shape_key == (16, 8, 8, 4, 8, False, True, 0, True, (0, 0), 0, 0, 0)
  want = _reference(plan, table, sampling, pending_rows, 16, 8, 4)
  for name, values in want.items():
    got = np.asarray(getattr(batch, name))
    np.testing.assert_array_equal(got, np.asarray(values, got.dtype), err_msg=name)
  np.testing.assert_array_equal(batch.block_table, table.block_ids)
  np.testing.assert_array_equal(batch.lengths, table.lengths)


def test_decode_only_batch_and_a_step_without_copies():
  a = _seq("a", 0, [5, 6, 7, 8], 3)
  b = _seq("b", 0, [1, 2, PENDING_TOKEN], 2)
  plan = Plan(
    rows=[
      ScheduledSeq(a, 3, 4, np.array([50], np.int32), [a]),
      ScheduledSeq(b, 2, 3, np.array([61], np.int32), [b]),
    ]
  )
  table = BlockTable(np.zeros((8, 4), np.int32), np.zeros(8, np.int32))
  sampling = {"a": (0.0, 0, 1), "b": (0.0, 0, 2)}
  batch = build_step_batch(plan, table, sampling, min_tokens=8, min_copies=8, pending_rows={b: 3})
  assert batch.decode_only and not batch.any_sampled
  # No row admitted on a prefix hit: the attention kernel may write K/V itself.
  assert batch.fused_write
  # No copy-on-write pairs: zero-length, so the step compiles without the copy.
  assert batch.cow_src.shape == batch.cow_dst.shape == (0,)
  want = _reference(plan, table, sampling, {b: 3}, 8, 8, 0)
  for name, values in want.items():
    got = np.asarray(getattr(batch, name))
    np.testing.assert_array_equal(got, np.asarray(values, got.dtype), err_msg=name)


def test_pack_unpack_round_trip_with_aligned_fields():
  plan, table, sampling, pending_rows = _mixed_plan()
  batch = build_step_batch(
    plan, table, sampling, min_tokens=8, min_copies=4, pending_rows=pending_rows
  )
  packed, layout = batch.pack()
  assert packed.dtype == np.int32 and packed.ndim == 1
  hash(layout)  # static under jit
  # Each field starts at a multiple of 64 elements (256 bytes), in declaration order.
  offset = 0
  for name in FIELDS:
    value = np.asarray(getattr(batch, name))
    flat = packed[offset : offset + value.size]
    np.testing.assert_array_equal(flat.view(value.dtype).reshape(value.shape), value, name)
    offset += -(-value.size // 64) * 64
  assert offset == packed.size
  # Unpacked under jit: the same arrays, temperature bit-cast back to float32.
  out = jax.jit(StepBatch.unpack, static_argnums=1)(packed, layout)
  for name in FIELDS:
    got, want = np.asarray(getattr(out, name)), np.asarray(getattr(batch, name))
    assert got.dtype == want.dtype, name
    np.testing.assert_array_equal(got, want, err_msg=name)
  assert (out.decode_only, out.any_sampled) == (batch.decode_only, batch.any_sampled)
  assert out.fused_write == batch.fused_write


def test_pack_refuses_wide_dtypes():
  plan, table, sampling, pending_rows = _mixed_plan()
  batch = build_step_batch(
    plan, table, sampling, min_tokens=8, min_copies=4, pending_rows=pending_rows
  )
  bad = batch.replace(tokens=np.asarray(batch.tokens, np.int64))
  with pytest.raises(ValueError, match="StepBatch.tokens: 4-byte dtype"):
    bad.pack()


def _columnar_plan():
  """Three plain decodes as columns (two with their input still on the device), then a
  prefill chunk and a last chunk sampled by two forked samples."""
  plan, table, sampling, _ = _mixed_plan()
  a = _seq("e", 0, [5, 6, 7, 8, PENDING_TOKEN], 3)  # decode at position 4, pending
  b = _seq("f", 0, [1, 2, 3], 2)  # decode of token 3 at position 2
  c = _seq("g", 1, [9, 9, PENDING_TOKEN], 1)  # second sample of "g", pending
  plan.decodes, plan.decode_groups = [a, b, c], [None, None, None]
  plan.decode_ids = [s.seq_id for s in plan.decodes]
  plan.decode_starts = np.array([4, 2, 2], np.int32)
  plan.decode_tokens = [PENDING_TOKEN, 3, PENDING_TOKEN]
  plan.decode_slots = np.array([71, 72, 73], np.int32)
  plan.rows = [r for r in plan.rows if r.seq.seq_id[0] in ("c", "d")]  # a prefill, a last chunk
  sampling = {**sampling, "e": (0.7, 2, 21), "f": (0.0, 0, 22), "g": (1.5, 0, 23)}
  return plan, table, sampling


@pytest.mark.parametrize("fast", [False, True], ids=["mappings", "columns"])
def test_columnar_decodes_match_the_row_by_row_reference(fast):
  plan, table, sampling = _columnar_plan()
  a, _, c = plan.decodes
  # The step on the device sampled a at row 0 and c at row 2 (and something else at row 1).
  prev = [a, _seq("x", 0, [1], 1), c]
  pending_rows = {s: j for j, s in enumerate(prev)}
  kwargs = dict(pending_rows=pending_rows)
  if fast:
    # The steady state: the same decodes as the step before, with their sampling columns.
    prev = plan.decodes
    pending_rows = {s: j for j, s in enumerate(prev)}
    kwargs = dict(
      pending_rows={},  # must not be read: the decodes match row for row
      prev_decodes=prev,
      decode_sampling=(
        np.array([0.7, 0.0, 1.5], np.float32),
        np.array([2, 0, 0]),
        np.array([21, 22, 23]),
        np.array([0, 0, 1]),
      ),
    )
  batch = build_step_batch(plan, table, sampling, min_tokens=8, min_copies=4, **kwargs)
  row_plan = Plan(rows=plan.all_rows(), cow_pairs=plan.cow_pairs)
  # 3 decodes + 8 prefill + 3 last-chunk tokens = 14 -> 16; 3 + 2 samples -> 8 rows.
  assert batch.shape_key == (16, 8, 8, 4, 8, False, True, 0, True, (0, 0), 0, 0, 0)
  want = _reference(row_plan, table, sampling, pending_rows, 16, 8, 4)
  for name, values in want.items():
    got = np.asarray(getattr(batch, name))
    np.testing.assert_array_equal(got, np.asarray(values, got.dtype), err_msg=name)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_steady_decode_steps_build_no_row_object_and_read_no_sampling_per_sequence(
  async_scheduling, monkeypatch
):
  """While the same sequences decode, a step makes no ScheduledSeq and looks up no
  request's sampling parameters (both O(rows) Python work per step); a sequence that joins
  does both, for its own rows only; outputs match an engine run without the counting."""
  from flax import nnx

  from paxcache.engine import Engine, EngineConfig, Request
  from paxcache.engine import _engine as engine_mod
  from paxcache.engine import _scheduler as scheduler_mod
  from paxcache.nn import Decoder, DecoderConfig

  config = DecoderConfig(
    d_model=16, num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32, max_seq_len=64
  )
  model = Decoder(config, rngs=nnx.Rngs(0))
  engine_config = EngineConfig(
    num_blocks=64, block_size=4, max_num_seqs=16, async_scheduling=async_scheduling
  )
  rng = np.random.default_rng(3)
  requests = [
    Request(i, rng.integers(0, 256, 5 + i).tolist(), max_new_tokens=14, n=1 + i % 2,
            temperature=float(i % 3 == 0), top_k=3 * (i % 2))
    for i in range(5)
  ]  # fmt: skip
  late = Request("late", rng.integers(0, 256, 6).tolist(), max_new_tokens=3, temperature=1.0)

  def run(count):
    counts = {"rows": 0, "sampling": 0}
    if count:

      class CountedRow(ScheduledSeq):
        def __init__(self, *args):
          counts["rows"] += 1
          super().__init__(*args)

      view = engine_mod._SamplingView.__getitem__

      def counted_view(self, key):
        counts["sampling"] += 1
        return view(self, key)

      monkeypatch.setattr(scheduler_mod, "ScheduledSeq", CountedRow)
      monkeypatch.setattr(engine_mod._SamplingView, "__getitem__", counted_view)
    engine = Engine(model, engine_config)
    outputs = {}

    def step():
      for out in engine.step():
        outputs[out.request_id] = out

    for r in requests:
      engine.add_request(r)
    rows = sum(r.n for r in requests)  # once every prompt is in, every sample decodes
    for _ in range(8):
      step()
      if engine.step_metrics[-1].decode_batch == rows:
        break
    assert engine.step_metrics[-1].decode_batch == rows
    counts.update(rows=0, sampling=0)
    for _ in range(4):
      step()
      m = engine.step_metrics[-1]
      assert m.decode_batch == m.num_seqs == rows and m.num_prefill_tokens == 0
    steady = dict(counts)
    engine.add_request(late)
    step()  # its prompt: one row, one sample
    joined = dict(counts)
    for _ in range(40):
      if not engine.has_unfinished():
        break
      step()
    assert not engine.has_unfinished()
    monkeypatch.undo()
    return outputs, steady, joined

  outputs, steady, joined = run(count=True)
  assert steady == {"rows": 0, "sampling": 0}
  assert joined == {"rows": 1, "sampling": 1}
  reference, _, _ = run(count=False)
  assert outputs == reference and len(outputs) == 6


def test_only_a_step_of_plain_decodes_writes_k_v_inside_its_attention_kernel():
  """``fused_write``: a decode-only step may write K/V inside the attention kernel, unless a
  row was admitted in it on a prefix-cache hit (``Plan.prefix_hit_rows``): that row's
  table may hold a block another row fills in this very step, and a kernel that writes and
  reads in one launch would race on that slot."""
  a = _seq("a", 0, [5, 6, 7, 8], 3)
  new = _seq("n", 0, [5, 6, 7, 8, 9], 5)  # admitted this step: 4 tokens hit, 1 to compute
  table = BlockTable(np.zeros((8, 4), np.int32), np.zeros(8, np.int32))
  sampling = {"a": (0.0, 0, 1), "n": (0.0, 0, 2)}

  def decodes_plan(rows, hits=0):
    plan = Plan(rows=rows, prefix_hit_rows=hits)
    plan.decodes, plan.decode_groups, plan.decode_ids = [a], [None], [a.seq_id]
    plan.decode_starts = np.array([3], np.int32)
    plan.decode_tokens = [8]
    plan.decode_slots = np.array([50], np.int32)
    return plan

  plain = build_step_batch(decodes_plan([]), table, sampling, min_tokens=8, min_copies=8)
  assert plain.decode_only and plain.fused_write
  row = ScheduledSeq(new, 4, 5, np.array([61], np.int32), [new])
  missed = build_step_batch(decodes_plan([row]), table, sampling, min_tokens=8, min_copies=8)
  assert missed.decode_only and missed.fused_write  # a row of its own blocks only
  mixed = build_step_batch(decodes_plan([row], 1), table, sampling, min_tokens=8, min_copies=8)
  assert mixed.decode_only and not mixed.fused_write
  assert plain.shape_key != mixed.shape_key  # a static flag: compiled apart
  # The jitted step passes it to the model: unpacked from the layout as it was packed.
  assert StepBatch.unpack(*mixed.pack()).fused_write is False


def test_a_prefix_hit_on_a_block_filled_in_the_same_step_keeps_the_write_apart():
  """The race the flag guards against, built in the engine: request A's decode fills its
  second block in the step that admits B, whose prompt is A's tokens so far plus one, so B
  hits that block (appends come before admission) and computes one token: a decode-only
  step in which B reads the slot A writes."""
  from flax import nnx

  from paxcache.engine import Engine, EngineConfig, Request
  from paxcache.nn import Decoder, DecoderConfig

  config = DecoderConfig(
    vocab_size=64, d_model=32, num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=16,
    mlp_dim=64, max_seq_len=64,
  )  # fmt: skip
  engine = Engine(
    Decoder(config, rngs=nnx.Rngs(0)),
    EngineConfig(num_blocks=16, block_size=4, num_host_blocks=0, preemption_mode="recompute"),
  )
  engine.add_request(Request("a", list(range(1, 8)), max_new_tokens=4))  # 7 tokens
  engine.step()  # A's prefill: blocks [1..4] and [5, 6, 7, +its first sample]
  a = engine.scheduler.running[0].seqs[0]
  assert len(a.tokens) == 8
  engine.add_request(Request("b", [*a.tokens, 9], max_new_tokens=1))
  plan = engine.scheduler.schedule()  # A's decode fills block 2, B hits both blocks
  assert plan.prefix_hit_rows == 1 and plan.prefix_hit_tokens == 8
  batch = engine._build_batch(plan)
  assert batch.decode_only and not batch.fused_write


def test_a_burst_batch_reads_sub_step_zero_and_carries_the_later_slots():
  # Two plain decodes whose allocator already holds 3 tokens each (a burst of 3): the
  # table's lengths count them, the batch's are sub-step 0's (start + 1), the later slots
  # pad with -1 past the rows, and neither a cascade nor a decode plan is made.
  a = _seq("a", 0, [5, 6, 7, 8], 3)
  b = _seq("b", 0, [1, 2, 3, 4, 5, PENDING_TOKEN], 5)
  plan = Plan(
    decodes=[a, b],
    decode_ids=[a.seq_id, b.seq_id],
    decode_starts=np.array([3, 5], np.int32),
    decode_tokens=[8, PENDING_TOKEN],
    decode_slots=np.array([50, 61], np.int32),
  )
  # Both rows share their first block: a cascade plan would be made without the burst.
  table = BlockTable(
    np.array([[3, 4, 0, 0]] * 2 + [[-1] * 4] * 6, np.int32),
    np.array([3 + 3, 5 + 3, 0, 0, 0, 0, 0, 0], np.int32),
  )
  later = np.array([[51, 62], [52, 63]], np.int32)
  kwargs = dict(
    min_tokens=8,
    min_copies=8,
    pending_rows={b: 1},
    decode_sampling=(np.zeros(2, np.float32), np.zeros(2), np.zeros(2), np.zeros(2)),
    cascade_min_shared_blocks=1,
    block_size=4,
  )
  batch = build_step_batch(plan, table, {}, burst_slots=later, **kwargs)
  np.testing.assert_array_equal(batch.lengths, [4, 6, 0, 0, 0, 0, 0, 0])
  assert batch.burst_slots.shape == (2, 8)
  np.testing.assert_array_equal(batch.burst_slots[:, :2], later)
  assert (batch.burst_slots[:, 2:] == -1).all()
  np.testing.assert_array_equal(batch.positions[:2], [3, 5])
  np.testing.assert_array_equal(batch.prev_index[:2], [-1, 1])
  assert batch.cascade_plan() is None and batch.decode_plan() is None
  assert batch.shape_key[-1] == 2
  plain = build_step_batch(plan, table, {}, **kwargs)  # the same plan, not a burst
  assert plain.burst_slots.shape == (0, 0) and plain.shape_key[-1] == 0
  assert plain.cascade_plan() is not None
  # Later slots for another number of rows, or a plan with other rows, are refused.
  with pytest.raises(ValueError, match=r"a burst takes plain decodes only"):
    build_step_batch(plan, table, {}, burst_slots=later[:, :1], **kwargs)
  mixed = Plan(rows=[ScheduledSeq(a, 3, 4, np.array([50], np.int32), [a])], **{
    k: getattr(plan, k) for k in ("decodes", "decode_ids", "decode_starts", "decode_tokens",
                                  "decode_slots")
  })  # fmt: skip
  with pytest.raises(ValueError, match=r"got 1 other rows"):
    build_step_batch(mixed, table, {"a": (0.0, 0, 1)}, burst_slots=later, **kwargs)
