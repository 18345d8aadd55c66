"""The engine with the planned GPU decode (``EngineConfig.decode_plan``).

Decode-only steps on the GPU backend get a ``kernels_gpu.plan_decode`` plan built on the
host from the step's lengths and run the planned Pallas kernel (interpret mode here, on a
one-layer model with head_dim 64, the smallest the GPU kernels take). Outputs are checked
token for token against greedy full recomputation without any cache
(``greedy_generate_no_cache`` on the reference backend) and against the same engine with
the plan off, with a fork and a preemption; the step metrics and a counting wrapper around
``kernels.paged_attention`` show the plan was built, cut rows into several chunks, and
reached the kernel, so the identity cannot hold vacuously.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels
from kernels import gpu as kernels_gpu
from paxcache.block_table import BlockTable
from paxcache.engine import Engine, EngineConfig, Request
from paxcache.engine import _engine as engine_module
from paxcache.engine._batch import StepBatch, build_step_batch
from paxcache.engine._decode_plan import DecodePlanner, decode_planner
from paxcache.engine._request import Seq
from paxcache.engine._scheduler import Plan, ScheduledSeq
from paxcache.nn import Decoder, DecoderConfig, PagedAttention, greedy_generate_no_cache

BS = 8
CONFIG = DecoderConfig(
  d_model=32, num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=64, mlp_dim=64,
  max_seq_len=64,
)  # fmt: skip


@pytest.fixture(scope="module")
def models():
  """The GPU-backend model (Pallas kernels in interpret mode) and the same parameters on
  the reference backend (the no-cache oracle)."""
  gpu = Decoder(CONFIG, backend="gpu", interpret=True, rngs=nnx.Rngs(0))
  ref = Decoder(CONFIG, rngs=nnx.Rngs(0))
  return gpu, ref


def _requests():
  """Ragged rows: a 36-token prompt forked in two (4 shared blocks), 20 and 5 tokens."""
  rng = np.random.default_rng(5)
  prompt = lambda n: rng.integers(1, CONFIG.vocab_size, n).tolist()  # noqa: E731
  return [
    Request(0, prompt(36), max_new_tokens=8, n=2),
    Request(1, prompt(20), max_new_tokens=8),
    Request(2, prompt(5), max_new_tokens=6),
  ]


def _config(**kw) -> EngineConfig:
  base = dict(
    num_blocks=13,  # 12 is the most one request needs; the three together need ~15
    block_size=BS,
    num_host_blocks=16,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    check_invariants=True,
    cascade_min_shared_blocks=0,  # the fork shares blocks: keep cascade out of the way
  )
  base.update(kw)
  return EngineConfig(**base)


def test_greedy_outputs_with_the_plan_equal_no_cache_and_plan_off(models, monkeypatch):
  gpu, ref = models
  reqs = _requests()
  want = greedy_generate_no_cache(ref, [r.prompt for r in reqs], [r.max_new_tokens for r in reqs])
  plans = []

  def counted(real):
    def call(*args, **kw):
      plans.append(kw.get("decode_plan"))
      return real(*args, **kw)

    return call

  # A decode step writes and attends through write_and_decode_packed (plain pools), a step
  # with a prefill chunk through paged_attention.
  for name in ("paged_attention", "write_and_decode", "write_and_decode_packed"):
    monkeypatch.setattr(kernels, name, counted(getattr(kernels, name)))
  engine_module._jitted_step.cache_clear()  # retrace: a cached step would not call it
  try:
    engine = Engine(gpu, _config(decode_plan="on", preemption_mode="recompute"))
    # Chunks of 16 keys (kernel steps of 16), so that rows of 17+ keys are cut in several
    # chunks and the merge runs; plan_decode's defaults would keep these rows whole.
    engine.decode_planner = dataclasses.replace(engine.decode_planner, chunk_tokens=16, kv_tile=16)
    outs = engine.run(reqs)
    # The same engine with the plan off (its steps with a prefill chunk, unplanned in both,
    # reuse the compiled steps of the run above).
    off = Engine(gpu, _config(decode_plan="off", preemption_mode="recompute"))
    off_outs = off.run(reqs)
    # A plan that leaves out each row's last key (its own token) must change the outputs:
    # the plan reaches the kernel and decides what it reads (same shapes: no new compile).
    good = engine.decode_planner
    wrong = Engine(gpu, _config(decode_plan="on", preemption_mode="recompute"))
    wrong.decode_planner = lambda lengths, rows: good(np.maximum(lengths - 1, 0), rows)
    wrong_outs = wrong.run(reqs)
  finally:
    engine_module._jitted_step.cache_clear()  # no step traced with the wrapper outlives it
  for r, w in zip(reqs, want, strict=True):
    assert outs[r.request_id].samples == [w] * r.n, r.request_id
  assert {k: v.samples for k, v in off_outs.items()} == {k: v.samples for k, v in outs.items()}
  assert {k: v.samples for k, v in wrong_outs.items()} != {k: v.samples for k, v in outs.items()}
  m = engine.metrics
  assert m.preemptions > 0, "the pool was meant to be too small for every sample at once"
  assert m.planned_steps > 0
  steps = list(engine.step_metrics)
  # Every decode-only step is planned ("on"); no step with a prefill chunk is.
  for s in steps:
    if s.num_seqs:
      assert (s.decode_plan_chunks > 0) == (s.num_prefill_tokens == 0), s
  # Some step cut a row into several chunks: more chunks than rows.
  assert any(s.decode_plan_chunks > s.decode_batch for s in steps)
  assert m.planned_steps == sum(s.decode_plan_chunks > 0 for s in steps)
  assert m.decode_plan_chunks == sum(s.decode_plan_chunks for s in steps)
  # The layer handed the plan to the kernel entry point (traced once per compiled shape).
  assert any(isinstance(p, kernels_gpu.DecodePlan) for p in plans)
  assert engine.allocator.num_used_blocks == 0
  assert off.metrics.planned_steps == 0 and off.metrics.preemptions > 0
  assert all(s.decode_plan_chunks == 0 for s in off.step_metrics)


def test_auto_plans_ragged_decode_steps_only(models):
  gpu, ref = models
  # One long and one short prompt: decode rows of ~36 and ~4 keys (max > 1.5 x mean).
  rng = np.random.default_rng(9)
  ragged = [
    Request(0, rng.integers(1, 256, 36).tolist(), max_new_tokens=4),
    Request(1, rng.integers(1, 256, 3).tolist(), max_new_tokens=4),
  ]
  # With overlap scheduling: the plan needs only lengths, known before the tokens are.
  engine = Engine(gpu, _config(num_blocks=16, async_scheduling=True))
  assert engine.config.decode_plan == "auto" and engine.decode_planner.mode == "auto"
  outs = engine.run(ragged)
  want = greedy_generate_no_cache(ref, [r.prompt for r in ragged], 4)
  assert [outs[r.request_id].samples for r in ragged] == [[w] for w in want]
  decodes = [s for s in engine.step_metrics if s.decode_batch == 2 and not s.num_prefill_tokens]
  # Every such step planned, with plan_decode's defaults: one chunk per row (256+ keys a
  # chunk). Level batches are declined (test_auto_rule_is_max_over_mean_above_one_and_a_half).
  assert len(decodes) == 3 and all(s.decode_plan_chunks == 2 for s in decodes)
  assert engine.metrics.planned_steps == 3


def test_auto_rule_is_max_over_mean_above_one_and_a_half():
  p = DecodePlanner("auto", block_size=16, num_kv_heads=2)
  # Hand-worked: max 100 vs 1.5 x mean 32.5 = 48.75: ragged; equal rows are not.
  assert p.wants(np.array([100, 10, 10, 10]))
  assert not p.wants(np.array([10, 10, 10, 10]))
  # At the bar is not above it: [3, 1] has mean 2, 1.5 x 2 = 3; [4, 1]: 4 > 3.75.
  assert not p.wants(np.array([3, 1])) and p.wants(np.array([4, 1]))
  assert not p.wants(np.array([50]))  # one row: nothing to balance against
  # With a window the visible keys count: [20, 10, 10, 10] (window 20) has mean 12.5 and
  # 20 > 18.75; [16, 10, 10, 10] (window 16) has mean 11.5 and 16 < 17.25.
  assert dataclasses.replace(p, sliding_window=20).wants(np.array([100, 10, 10, 10]))
  assert not dataclasses.replace(p, sliding_window=16).wants(np.array([100, 10, 10, 10]))
  # Padding rows (length 0) past `rows` are not counted: [8, 8] + 6 zeros is level.
  lengths = np.array([8, 8, 0, 0, 0, 0, 0, 0], np.int32)
  assert p(lengths, 2) is None
  on = dataclasses.replace(p, mode="on")(lengths, 2)
  assert on is not None and on.seq_num_chunks.tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


def _decode_plan_and_table():
  """A decode-only scheduler plan of three rows; rows 0 and 1 share their first 2 blocks."""
  rows, ids = [], [[3, 4, 9], [3, 4, 10], [11, 12, 13]]
  lengths = [20, 19, 23]
  table = np.full((8, 4), -1, np.int32)
  for i, (blocks, n) in enumerate(zip(ids, lengths, strict=True)):
    seq = Seq(seq_id=(i, 0), index=0, tokens=list(range(1, n + 1)), prompt_len=n - 1)
    slot = blocks[(n - 1) // BS] * BS + (n - 1) % BS
    rows.append(ScheduledSeq(seq, n - 1, n, np.array([slot], np.int32), [seq]))
    table[i, :3] = blocks
  full = np.zeros(8, np.int32)
  full[:3] = lengths
  sampling = {i: (0.0, 0, i) for i in range(3)}
  return Plan(rows=rows), BlockTable(table, full), sampling


def test_step_batch_carries_the_plan_through_pack_and_unpack():
  plan, table, sampling = _decode_plan_and_table()
  planner = DecodePlanner("on", block_size=BS, num_kv_heads=2, chunk_tokens=16, kv_tile=16)
  batch = build_step_batch(
    plan, table, sampling, min_tokens=8, min_copies=8, decode_planner=planner
  )
  want = kernels_gpu.plan_decode(table.lengths, BS, 2, chunk_tokens=16, kv_tile=16)
  got = batch.decode_plan()
  for f in dataclasses.fields(want):
    np.testing.assert_array_equal(getattr(got, f.name), getattr(want, f.name), err_msg=f.name)
  # Rows of 20, 19 and 23 keys in chunks of 16: two chunks each (shape_key[-1]: a burst's).
  assert batch.decode_plan_chunks() == 6 and batch.shape_key[-2] == 16
  packed, layout = batch.pack()
  out = jax.jit(StepBatch.unpack, static_argnums=1)(packed, layout)
  plan_out = out.decode_plan()
  for f in dataclasses.fields(want):
    np.testing.assert_array_equal(
      np.asarray(getattr(plan_out, f.name)), getattr(want, f.name), err_msg=f.name
    )
  # Without a planner: zero-size fields and no plan.
  plain = build_step_batch(plan, table, sampling, min_tokens=8, min_copies=8)
  assert plain.decode_plan() is None and plain.decode_plan_chunks() == 0
  assert plain.shape_key[-2] == 0


def test_a_cascade_plan_wins_over_the_decode_plan():
  plan, table, sampling = _decode_plan_and_table()
  planner = DecodePlanner("on", block_size=BS, num_kv_heads=2)
  both = build_step_batch(
    plan, table, sampling, min_tokens=8, min_copies=8, decode_planner=planner,
    cascade_min_shared_blocks=2, block_size=BS,
  )  # fmt: skip
  assert both.cascade_counts()[0] == 1  # rows 0 and 1 share 2 blocks
  assert both.decode_plan() is None and both.decode_plan_chunks() == 0
  # Sharing fewer blocks than the threshold: no cascade, so the decode plan runs.
  only = build_step_batch(
    plan, table, sampling, min_tokens=8, min_copies=8, decode_planner=planner,
    cascade_min_shared_blocks=3, block_size=BS,
  )  # fmt: skip
  assert only.cascade_counts()[0] == 0 and only.decode_plan_chunks() == 3


def test_planner_follows_the_backend_the_mesh_and_the_windows(models):
  gpu, ref = models
  assert decode_planner(gpu, EngineConfig(decode_plan="off")) is None
  assert decode_planner(ref, EngineConfig(decode_plan="auto")) is None  # reference backend
  with pytest.raises(ValueError, match="decode_plan='on'.*reference"):
    decode_planner(ref, EngineConfig(decode_plan="on"))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
  assert decode_planner(gpu, EngineConfig(mesh=mesh)) is None
  with pytest.raises(ValueError, match="decode_plan='on'.*mesh"):
    decode_planner(gpu, EngineConfig(decode_plan="on", mesh=mesh))
  p = decode_planner(gpu, EngineConfig(decode_plan="on", block_size=32))
  assert (p.mode, p.block_size, p.num_kv_heads, p.sliding_window) == ("on", 32, 1, None)
  two = Decoder(dataclasses.replace(CONFIG, num_layers=2), backend="gpu", interpret=True,
                rngs=nnx.Rngs(0))  # fmt: skip
  for layer in two.layers:
    layer.attn.sliding_window = 24
  assert decode_planner(two, EngineConfig()).sliding_window == 24  # shared: the plan cuts
  two.layers[1].attn.sliding_window = None
  assert decode_planner(two, EngineConfig()).sliding_window is None  # not shared: all keys


@pytest.mark.parametrize("value", ["yes", "", None, True, 1])
def test_decode_plan_setting_is_validated(value):
  with pytest.raises(ValueError, match="decode_plan"):
    EngineConfig(decode_plan=value)


def test_layer_refuses_a_plan_with_a_prefill_or_a_cascade():
  layer = PagedAttention(32, 2, 1, 64, rngs=nnx.Rngs(0))
  cache = (jnp.zeros((1, 4, BS, 64)), jnp.zeros((1, 4, BS, 64)))
  lengths = np.array([3], np.int32)
  plan = kernels_gpu.plan_decode(lengths, BS, 1)
  common = dict(
    block_table=jnp.zeros((1, 1), jnp.int32), lengths=jnp.asarray(lengths),
    slot_mapping=jnp.array([2], jnp.int32), decode_plan=plan,
  )  # fmt: skip
  x, pos = jnp.zeros((1, 32)), jnp.array([2], jnp.int32)
  with pytest.raises(ValueError, match="decode steps only"):
    layer(x, pos, cache, cu_q_lens=jnp.array([0, 1], jnp.int32), **common)
  none = np.zeros((0, 0), np.int32)
  cascade = kernels.CascadePlan(none, np.zeros(0, np.int32), none, np.zeros(0, np.int32))
  with pytest.raises(ValueError, match="not both"):
    layer(x, pos, cache, cascade=cascade, **common)
  # The reference backend checks the plan and ignores it: the output is the plain one.
  got, _ = layer(x, pos, cache, **common)
  want, _ = layer(x, pos, cache, **{**common, "decode_plan": None})
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
