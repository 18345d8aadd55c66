"""Compiling every step shape up front (paxcache/engine/_warmup.py): after
``compile_step_shapes`` an online run on the CPU compiles nothing, and every shape it meets
is one the enumeration listed; the planned-decode chunk counts against ``plan_decode``."""

import dataclasses

import jax
import numpy as np
import pytest

from paxcache.engine import (
  DecodePlanner,
  Engine,
  EngineConfig,
  Request,
  SimulatedClock,
  StepCostModel,
  compile_step_shapes,
  step_shapes,
  unwarmed_shapes,
)
from paxcache.engine._warmup import StepShape, shape_batch
from paxcache.nn import load_decoder

_COMPILES = []  # fun_name of every backend compile since the listener was registered
_LISTENING = []


def _count_compiles():
  if not _LISTENING:

    def on(event, duration, **kw):
      if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES.append(kw.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(on)
    _LISTENING.append(True)
  return len(_COMPILES)


def _config(**kw):
  base = dict(
    num_blocks=48,
    block_size=8,
    num_host_blocks=0,
    preemption_mode="recompute",
    enable_prefix_caching=False,
    max_num_seqs=16,
    max_num_batched_tokens=32,
    min_batch_bucket=8,
    min_token_bucket=16,
    min_blocks_bucket=4,
  )
  base.update(kw)
  return EngineConfig(**base)


def _online_requests(seed, n=24):
  """Poisson-like arrivals on a simulated clock of 1 ms per token, prompts 1-40 tokens
  (chunked at 32), outputs 1-24: decode-only steps and prefill steps of several sizes."""
  rng = np.random.default_rng(seed)
  t = np.cumsum(rng.exponential(0.01, size=n))
  return [
    Request(
      i,
      rng.integers(1, 200, size=int(rng.integers(1, 41))).tolist(),
      max_new_tokens=int(rng.integers(1, 25)),
      arrival_time=float(t[i]),
    )
    for i in range(n)
  ]


@pytest.fixture(scope="module")
def tiny():
  return load_decoder()


def test_step_shapes_by_hand():
  """16 sequences pad to 8 or 16 rows; 9 blocks a row (72 tokens of 8) pad to 4, 8 or 16
  columns; prefill steps pad their tokens to >= max(16, rows) up to 32."""
  shapes = step_shapes(_config(), max_seq_len=72)
  decode = {(s.batch, s.max_blocks) for s in shapes if s.decode_only}
  assert decode == {(b, m) for b in (8, 16) for m in (4, 8, 16)}
  mixed = {(s.num_tokens, s.batch) for s in shapes if not s.decode_only}
  assert mixed == {(16, 8), (32, 8), (16, 16), (32, 16)}
  assert all(s.plan_chunks == 0 and not s.sampled for s in shapes)
  assert len(shapes) == 6 + 4 * 3
  # A 4-row budget: no 16-row step (at most 4 rows); a 16-block pool caps widths at 16.
  small = step_shapes(_config(max_num_batched_tokens=4, num_blocks=16), max_seq_len=1024)
  assert {s.batch for s in small} == {8}
  assert {s.max_blocks for s in small} == {4, 8, 16}
  with pytest.raises(ValueError, match="prefix_caching"):
    step_shapes(_config(enable_prefix_caching=True), max_seq_len=72)


def _small(**kw):
  """Few shapes (each costs seconds to compile on a CPU): 8 rows, widths 16 and 32
  blocks (the pool's 32), tokens 16 and 32."""
  return _config(max_num_seqs=8, num_blocks=32, min_blocks_bucket=16, **kw)


@pytest.mark.parametrize(
  "async_scheduling,decode_steps",
  [(False, 1), (True, 1), (True, 3)],
  ids=["sync", "async", "burst"],
)
def test_an_online_run_after_the_warmup_compiles_nothing(tiny, async_scheduling, decode_steps):
  cfg = _small(async_scheduling=async_scheduling, decode_steps=decode_steps)
  # Two decode-only shapes (widths 16 and 32), each again as a burst, and four with prefill.
  assert len(step_shapes(cfg, tiny.config.max_seq_len)) == 6 + 2 * (decode_steps > 1)
  clock = None if async_scheduling else SimulatedClock(StepCostModel())
  engine = Engine(tiny, cfg, clock=clock)  # overlap scheduling runs on the wall clock
  report = compile_step_shapes(engine, threads=2)
  assert len(report.shapes) == len(step_shapes(cfg, tiny.config.max_seq_len))
  before = _count_compiles()
  engine.run(_online_requests(0))
  assert _count_compiles() == before, _COMPILES[before:]
  assert engine.metrics.compiled_shapes >= 3  # decode-only and prefill steps of 2 sizes
  assert unwarmed_shapes(engine, report) == set()
  bursts = sum(s.decode_steps > 1 for s in engine.step_metrics)
  assert (bursts > 0) == (decode_steps > 1)


def test_a_run_without_the_warmup_compiles_and_reports_unwarmed_shapes(tiny):
  """The negative control: the counter and the check see a shape compiled during a run.
  A pool of another size gives a cache no other test compiled a step for."""
  cfg = _config(max_num_seqs=8, num_blocks=24, min_blocks_bucket=16)
  engine = Engine(tiny, cfg, clock=SimulatedClock(StepCostModel()))
  only_decode = [s for s in step_shapes(cfg, tiny.config.max_seq_len) if s.decode_only]
  report = compile_step_shapes(engine, only_decode)
  before = _count_compiles()
  engine.run(_online_requests(1, n=6))
  assert _count_compiles() > before
  assert any("_device_step" in str(n) for n in _COMPILES[before:])
  missed = unwarmed_shapes(engine, report)
  assert missed and all(not key[5] for key in missed)  # the prefill steps' shapes


def test_shape_batch_has_the_shape_key_of_its_shape():
  s = StepShape(num_tokens=32, batch=16, max_blocks=8, decode_only=False)
  key = shape_batch(s).shape_key
  assert key[:5] == (32, 16, 8, 0, 16) and key[5] is False
  d = shape_batch(StepShape(16, 16, 8, True, sampled=True))
  assert d.any_sampled and d.decode_only and d.shape_key[0] == 16


@pytest.mark.parametrize(
  "mode, kv_heads, min_chunk",
  [("auto", 2, 32), ("on", 2, 32), ("on", 2, None), ("on", 16, None), ("auto", 16, None)],
)
def test_plan_chunk_counts_cover_plan_decode(mode, kv_heads, min_chunk):
  """Random decode steps within each enumerated (batch, width): the padded chunk count of
  their ``plan_decode`` plan (the planner the engine would call) is an enumerated one.
  ``min_chunk`` None is the plan's default floor (``plan.min_chunk_for``, 132 SMs off a
  GPU): with at most 4,096 keys here it is 256, or 1024 once the rows give 264 programs
  (17 rows at 16 KV heads); rows of at most 512 keys are cut in two at most."""
  cfg = _config(num_blocks=512, max_num_seqs=64, max_num_batched_tokens=64)
  planner = DecodePlanner(
    mode=mode, block_size=8, num_kv_heads=kv_heads, min_chunk_tokens=min_chunk
  )
  shapes = step_shapes(cfg, max_seq_len=512, planner=planner)
  listed = {(s.batch, s.max_blocks, s.plan_chunks) for s in shapes if s.decode_only}
  rng = np.random.default_rng(0)
  seen = 0
  for b, m in {(s.batch, s.max_blocks) for s in shapes}:
    for _ in range(30):
      lo = 1 if b == 8 else b // 2 + 1
      rows = int(rng.integers(lo, min(b, 64) + 1))
      cap = min(m * 8, 512)
      low = 1 if m == 4 else (m // 2) * 8 + 1  # the longest row needs > m / 2 blocks
      lengths = rng.integers(1, cap + 1, size=rows)
      lengths[0] = rng.integers(min(low, cap), cap + 1)
      if lengths.sum() > 512 * 8:
        continue
      padded = np.zeros(b, np.int32)
      padded[:rows] = lengths
      plan = planner(padded, rows)
      chunks = 0 if plan is None else plan.num_padded_chunks
      assert (b, m, chunks) in listed, (b, m, rows, chunks)
      seen += chunks > 0
  assert seen > 50
  if mode == "on":
    assert all(c > 0 for _, _, c in listed)


def test_plan_chunk_counts_cover_small_floor_plans_of_long_rows():
  """The default floor's small batches at a larger pool: rows just over 256 and 512 keys
  cut in 2-4 pieces. 8 rows, 5 of 513 keys and 3 of 1, at 2 KV heads (8 chunks at 1024, 16
  programs: the floor is 256) plan 5 x 3 + 3 = 18 chunks, padded to 32, which a bound
  assuming chunks of 1024 does not list."""
  cfg = _config(num_blocks=2048, block_size=16, max_num_seqs=64, max_num_batched_tokens=64)
  planner = DecodePlanner(mode="on", block_size=16, num_kv_heads=2)
  shapes = step_shapes(cfg, max_seq_len=1024, planner=planner)
  listed = {(s.batch, s.max_blocks, s.plan_chunks) for s in shapes if s.decode_only}
  widths = sorted({m for _, m, _ in listed})
  batches = sorted({b for b, _, _ in listed})

  def covered(lengths):
    b = next(x for x in batches if x >= len(lengths))
    m = next(x for x in widths if x * 16 >= int(lengths.max()))
    padded = np.zeros(b, np.int32)
    padded[: len(lengths)] = lengths
    plan = planner(padded, len(lengths))
    return (b, m, plan.num_padded_chunks) in listed, plan

  ok, plan = covered(np.array([513] * 5 + [1] * 3))
  assert ok and plan.num_chunks() == 18 and plan.num_padded_chunks == 32
  rng = np.random.default_rng(1)
  for _ in range(300):
    rows = int(rng.integers(1, 65))
    near = rng.choice([257, 385, 513, 769, 1023, 1024])
    lengths = np.minimum(rng.integers(1, 1025, rows), 1024)
    lengths[: int(rng.integers(1, rows + 1))] = near
    if lengths.sum() > 2048 * 16:
      continue
    ok, plan = covered(lengths)
    assert ok, (rows, int(near), plan.num_chunks(), plan.num_padded_chunks)


def test_bad_threads_raise(tiny):
  engine = Engine(tiny, _config(), clock=SimulatedClock(StepCostModel()))
  with pytest.raises(ValueError, match="threads"):
    compile_step_shapes(engine, [], threads=0)
  assert dataclasses.is_dataclass(compile_step_shapes(engine, []))


def test_shape_batch_packs_like_a_real_planned_decode_batch():
  """The layout (every field's shape and dtype, the static flags and the plan's static
  part) of a planned decode step that ``build_step_batch`` makes equals that of the
  all-padding batch of its shape: the same compiled step serves both."""
  from paxcache.block_table import BlockTable
  from paxcache.engine._batch import build_step_batch
  from paxcache.engine._request import Seq
  from paxcache.engine._scheduler import Plan, ScheduledSeq

  planner = DecodePlanner(mode="on", block_size=8, num_kv_heads=2, min_chunk_tokens=16)
  seqs = [
    Seq(seq_id=(i, 0), index=0, tokens=list(range(1, n + 1)), prompt_len=n - 1)
    for i, n in enumerate((40, 3, 17))
  ]
  rows = [ScheduledSeq(s, len(s.tokens) - 1, len(s.tokens), np.array([5], np.int32), [s])
          for s in seqs]  # fmt: skip
  lengths = np.zeros(8, np.int32)
  lengths[:3] = [40, 3, 17]
  table = BlockTable(block_ids=np.zeros((8, 8), np.int32), lengths=lengths)
  sampling = {i: (0.0, 0, 1) for i in range(3)}
  real = build_step_batch(
    Plan(rows=rows, cow_pairs=[]), table, sampling, min_tokens=8, min_copies=8,
    decode_planner=planner, block_size=8,
  )  # fmt: skip
  assert real.decode_only and real.decode_plan_chunk_seq.shape[0] > 0
  shape = StepShape(8, 8, 8, True, plan_chunks=real.decode_plan_chunk_seq.shape[0])
  assert shape_batch(shape, planner).pack()[1] == real.pack()[1]
  assert shape in step_shapes(_config(max_num_seqs=8), max_seq_len=64, planner=planner)
