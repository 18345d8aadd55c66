"""The online engine: arrival times, per-request timelines, Orca reservation policies, the
simulated clock and executor, and the step-cost model."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from paxcache.engine import (
  Engine,
  EngineConfig,
  Request,
  RequestError,
  SimulatedClock,
  SimulatedEngine,
  StepCostModel,
  WallClock,
  fit_step_cost,
  load_step_records,
  reservation_blocks,
  step_record,
)
from paxcache.engine._reservation import FirstFitRanges
from paxcache.nn import TINY_CORPUS, load_decoder

ORCA = ("max", "pow2", "oracle")


def _config(**kw) -> EngineConfig:
  base = dict(
    num_blocks=64,
    block_size=4,
    num_host_blocks=64,
    enable_prefix_caching=False,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    check_invariants=True,
  )
  base.update(kw)
  return EngineConfig(**base)


# ------------------------------------------------------------------ arrivals and timelines


def test_hand_worked_timeline_under_a_constant_cost_model():
  """1 ms per computed token (the CPU default). A: prompt 3, 2 tokens, arrives at 0;
  B: prompt 2, 1 token, arrives at 10.5 ms.

  step 1 (0 -> 3 ms): A's prefill (3 tokens) samples A's first token at 3 ms;
  step 2 (3 -> 4 ms): A decodes its second token and finishes at 4 ms (B not arrived);
  the engine is idle until 10.5 ms; step 3 (10.5 -> 12.5 ms): B's prefill, finished."""
  engine = SimulatedEngine(_config(), max_seq_len=64)
  out = engine.run(
    [
      Request("A", [1, 2, 3], max_new_tokens=2, arrival_time=0.0),
      Request("B", [4, 5], max_new_tokens=1, arrival_time=0.0105),
    ]
  )
  a, b = out["A"].metrics, out["B"].metrics
  assert engine.metrics.steps == 3
  assert (a.arrival_time, a.first_token_time, a.finish_time) == pytest.approx((0, 0.003, 0.004))
  assert (b.arrival_time, b.first_token_time, b.finish_time) == pytest.approx(
    (0.0105, 0.0125, 0.0125)
  )
  assert a.output_tokens == 2 and b.output_tokens == 1
  assert a.normalized_latency == pytest.approx(0.002)  # 4 ms / 2 tokens
  assert b.normalized_latency == pytest.approx(0.002)
  assert a.ttft == pytest.approx(0.003) and a.tpot == pytest.approx(0.001)
  assert b.tpot == 0.0
  assert out["A"].samples == [[0, 0]]  # forced tokens
  assert [s.clock for s in engine.step_metrics] == pytest.approx([0.003, 0.004, 0.0125])


def test_a_request_is_not_admitted_before_its_arrival():
  engine = SimulatedEngine(_config(), max_seq_len=64)
  engine.add_request(Request("early", [1] * 4, max_new_tokens=20, arrival_time=0.0))
  engine.add_request(Request("late", [2] * 4, max_new_tokens=2, arrival_time=0.010))
  assert engine.num_unfinished() == 2
  while engine.clock.now() < 0.010:
    assert [g.request.request_id for g in engine.scheduler.running] in ([], ["early"])
    engine.step()
  engine.step()
  ids = {g.request.request_id for g in engine.scheduler.running}
  assert "late" in ids


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, True, "1"])
def test_bad_arrival_time_raises_and_changes_nothing(bad):
  engine = SimulatedEngine(_config(), max_seq_len=64)
  with pytest.raises(RequestError, match="arrival_time"):
    engine.add_request(Request("x", [1, 2], arrival_time=bad))
  assert not engine.has_unfinished()


def test_a_pending_request_can_be_aborted_and_its_id_is_taken_until_then():
  engine = SimulatedEngine(_config(), max_seq_len=64)
  engine.add_request(Request("x", [1, 2], arrival_time=5.0))
  with pytest.raises(RequestError, match="already"):
    engine.add_request(Request("x", [1, 2]))
  out = engine.abort("x")
  assert out.finish_reasons == ["abort"] and out.metrics is None
  assert not engine.has_unfinished()


def test_preemptions_are_counted_per_request():
  cfg = _config(num_blocks=12, preemption_mode="recompute")
  engine = SimulatedEngine(cfg, max_seq_len=64)
  out = engine.run([Request(i, [i + 1] * 6, max_new_tokens=14) for i in range(4)])
  per_request = sum(o.metrics.preemptions_recompute for o in out.values())
  assert per_request == engine.metrics.preemptions_recompute > 0
  assert all(o.metrics.output_tokens == 14 for o in out.values())


# ------------------------------------------------------------------ reservation policies


@pytest.mark.parametrize(
  "policy, blocks",
  # prompt 5 + 7 new tokens, block 4, max_seq_len 64: max reserves 64 slots = 16 blocks;
  # pow2 5 + 8 = 13 slots = 4 blocks; oracle 5 + 7 = 12 slots = 3 blocks.
  [("max", 16), ("pow2", 4), ("oracle", 3)],
)
def test_reservations_are_what_the_policy_says(policy, blocks):
  assert reservation_blocks(policy, 5, 7, 1, 64, 4) == blocks
  assert reservation_blocks(policy, 5, 7, 2, 64, 4) == 2 * blocks
  engine = SimulatedEngine(_config(reservation=policy), max_seq_len=64)
  engine.add_request(Request("a", [1] * 5, max_new_tokens=7))
  engine.add_request(Request("b", [2] * 5, max_new_tokens=7, n=2))
  engine.step()
  reserved = {g.request.request_id: g.reserved for g in engine.scheduler.running}
  assert reserved == {"a": (0, blocks), "b": (blocks, 2 * blocks)}  # contiguous, first fit
  assert engine.scheduler.reserved_space.free == 64 - 3 * blocks
  engine.run()
  assert engine.scheduler.reserved_space.free == 64  # released at finish


def test_orca_max_admits_only_what_its_reservations_fit_and_never_preempts():
  # 64 blocks of 4 = 256 slots; max reserves 64 slots = 16 blocks: 4 requests at a time.
  engine = SimulatedEngine(_config(reservation="max"), max_seq_len=64)
  engine.run([Request(i, [i + 1] * 4, max_new_tokens=8) for i in range(8)])
  assert engine.metrics.max_batch == 4 and engine.metrics.preemptions == 0
  paged = SimulatedEngine(_config(), max_seq_len=64)
  paged.run([Request(i, [i + 1] * 4, max_new_tokens=8) for i in range(8)])
  assert paged.metrics.max_batch == 8


def test_first_fit_ranges_leave_external_fragmentation():
  space = FirstFitRanges(10)
  assert [space.reserve(3), space.reserve(3), space.reserve(3)] == [0, 3, 6]
  space.release(0, 3)
  space.release(6, 3)
  assert space.free == 7 and space.largest_free == 4 and space.reserve(5) is None
  space.release(3, 3)
  assert space.reserve(10) == 0


def test_reservation_config_errors():
  with pytest.raises(ValueError, match="reservation must be one of"):
    _config(reservation="orca")
  with pytest.raises(ValueError, match="enable_prefix_caching=False"):
    _config(reservation="max", enable_prefix_caching=True)
  engine = SimulatedEngine(_config(num_blocks=8, reservation="max"), max_seq_len=64)
  with pytest.raises(RequestError, match="reserves 16 blocks"):
    engine.add_request(Request("x", [1, 2], max_new_tokens=2))


# ------------------------------------------------------------------ the real engine


def _workload(n: int = 8, seed: int = 3) -> list[Request]:
  with open(TINY_CORPUS, "rb") as f:
    corpus = f.read()
  rng = np.random.default_rng(seed)
  reqs = []
  for i in range(n):
    start = int(rng.integers(0, len(corpus) - 100))
    p, g = int(rng.integers(3, 40)), int(rng.integers(4, 24))
    reqs.append(Request(i, list(corpus[start : start + p]), max_new_tokens=g))
  return reqs


@pytest.fixture(scope="module")
def tiny():
  return load_decoder()


def test_orca_policies_generate_the_same_tokens_as_paged(tiny):
  """Systems differ only in memory management: greedy outputs are token-identical."""
  reqs = _workload()
  cfg = _config(num_blocks=160, block_size=8)  # max reserves 512 / 8 = 64 blocks
  want = Engine(tiny, cfg).run(reqs)
  for policy in ORCA:
    engine = Engine(tiny, dataclasses.replace(cfg, reservation=policy))
    got = engine.run(reqs)
    assert got == want, policy
    if policy == "max":
      assert engine.metrics.max_batch == 2  # 160 blocks hold two 64-block reservations


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_simulated_engine_schedules_like_the_real_engine(tiny, mode):
  """Same steps, preemptions and per-step batches, arrivals included: the real engine on
  a simulated clock and the simulated executor."""
  reqs = [
    dataclasses.replace(r, arrival_time=0.004 * i) for i, r in enumerate(_workload(10, seed=5))
  ]
  cfg = _config(num_blocks=14, block_size=8, preemption_mode=mode, max_num_batched_tokens=32)

  def schedule(engine):
    out = engine.run(reqs)
    steps = [
      (s.num_seqs, s.num_tokens, s.num_prefill_tokens, s.preemptions_swap,
       s.preemptions_recompute, s.swapped_in_blocks, s.kv_tokens, s.clock)
      for s in engine.step_metrics
    ]  # fmt: skip
    times = {k: (o.metrics.first_token_time, o.metrics.finish_time) for k, o in out.items()}
    return steps, times, {k: [len(s) for s in o.samples] for k, o in out.items()}

  real = schedule(Engine(tiny, cfg, clock=SimulatedClock()))
  sim = schedule(SimulatedEngine(cfg, max_seq_len=tiny.config.max_seq_len))
  assert real == sim
  assert sum(s[3] + s[4] for s in real[0]) > 0  # the pool is small enough to preempt


# ------------------------------------------------------------------ the step-cost model


def _records(model: StepCostModel, n: int, noise: float, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  recs = []
  for _ in range(n):
    p, d, kv = int(rng.integers(0, 500)), int(rng.integers(0, 64)), int(rng.integers(0, 20000))
    ms = model.step_ms(p, d, kv) * (1 + noise * rng.standard_normal())
    recs.append({"prefill_tokens": p, "decode_batch": d, "kv_tokens": kv, "step_ms": ms})
  return recs


def test_fit_recovers_a_linear_model_and_reports_heldout_error(tmp_path):
  true = StepCostModel(base_ms=5.0, prefill_ms=0.1, decode_ms=0.2, kv_ms=0.001)
  report = fit_step_cost(_records(true, 200, 0.0))
  m = report.model
  assert (m.base_ms, m.prefill_ms, m.decode_ms, m.kv_ms) == pytest.approx((5, 0.1, 0.2, 0.001))
  assert report.median_rel_error < 1e-9
  assert (report.train_records, report.heldout_records) == (160, 40)
  noisy = fit_step_cost(_records(true, 400, 0.05))
  assert 0.01 < noisy.median_rel_error < 0.06  # median |N(0, 5%)| is about 3.4%
  path = tmp_path / "steps.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in _records(true, 20, 0.0)) + "\n")
  assert len(load_step_records(str(path))) == 20


def test_fit_keeps_coefficients_non_negative():
  recs = _records(StepCostModel(base_ms=3.0, prefill_ms=0.0, decode_ms=0.5, kv_ms=0.0), 50, 0.0)
  m = fit_step_cost(recs).model
  assert min(m.base_ms, m.prefill_ms, m.decode_ms, m.kv_ms) >= 0
  assert m.decode_ms == pytest.approx(0.5)


def test_bad_step_records_and_models_raise(tmp_path):
  good = {"prefill_tokens": 1, "decode_batch": 1, "kv_tokens": 1, "step_ms": 1.0}
  with pytest.raises(ValueError, match="lacks"):
    fit_step_cost([{"prefill_tokens": 1}] * 10)
  with pytest.raises(ValueError, match="finite number"):
    fit_step_cost([{**good, "step_ms": -1.0}] * 10)
  with pytest.raises(ValueError, match="at least 5"):
    fit_step_cost([good] * 3)
  with pytest.raises(ValueError, match="heldout_fraction"):
    fit_step_cost([good] * 10, heldout_fraction=1.0)
  path = tmp_path / "bad.jsonl"
  path.write_text("{not json\n")
  with pytest.raises(ValueError, match="not JSON"):
    load_step_records(str(path))
  with pytest.raises(ValueError, match="base_ms"):
    StepCostModel(base_ms=-1.0)


def test_step_record_reads_engine_step_metrics():
  engine = SimulatedEngine(_config(), max_seq_len=64)
  engine.run([Request(0, [1, 2, 3], max_new_tokens=3), Request(1, [4] * 5, max_new_tokens=2)])
  recs = [step_record(s) for s in engine.step_metrics]
  assert recs[0]["prefill_tokens"] == 8 and recs[0]["decode_batch"] == 0
  assert recs[0]["kv_tokens"] == 8
  assert recs[1]["decode_batch"] == 2 and recs[1]["kv_tokens"] == 4 + 6


def test_requests_are_queued_in_arrival_order_whenever_they_are_added():
  """A request added after the clock passed its arrival still queues behind one that
  arrived earlier but was set aside (not yet reached by a step)."""
  engine = SimulatedEngine(_config(), max_seq_len=64)
  engine.add_request(Request("y", [1, 2], max_new_tokens=2, arrival_time=0.003))
  engine.add_request(Request("w", [3, 4, 5, 6, 7], max_new_tokens=2))  # arrives at 0
  engine.step()  # 5 prefill tokens: the clock reaches 5 ms; "y" still set aside
  engine.add_request(Request("x", [5, 6], max_new_tokens=2, arrival_time=0.004))
  engine.add_request(Request("z", [7, 8], max_new_tokens=2, arrival_time=0.0045))
  order = [g.request.request_id for g in engine.scheduler.waiting]
  assert order == ["y", "x", "z"]
  assert [g.arrival for g in engine.scheduler.waiting] == sorted(
    g.arrival for g in engine.scheduler.waiting
  )


def test_wall_clock_can_leave_compiles_off():
  import time

  import jax
  import jax.numpy as jnp

  plain, excluding = WallClock(), WallClock(exclude_compile=True)
  t_real = time.perf_counter()
  # A function never compiled before (a fresh closure): tracing, lowering and compiling it
  # take real time, which JAX reports through jax.monitoring.
  n = int(time.time_ns() % 1000) + 7
  jax.jit(lambda x: jnp.sin(x) * n + jnp.cumsum(x))(jnp.arange(float(n))).block_until_ready()
  elapsed = time.perf_counter() - t_real
  assert plain.excluded_s == 0.0
  assert 0.0 < excluding.excluded_s <= elapsed
  # The excluding clock is behind the plain one by what it left off (both read real time).
  gap = plain.now() - excluding.now()
  assert gap == pytest.approx(excluding.excluded_s, abs=0.05)
  # A compiled call costs no compile time: the gap stays.
  excluding.reset()
  assert excluding.excluded_s == 0.0 and excluding.now() >= 0.0
  a, b = excluding.now(), excluding.now()
  assert b >= a
