"""The engine with cascade attention (``EngineConfig.cascade_min_shared_blocks``).

Decode steps whose rows share leading blocks (prefix-cache hits across requests with a
common long prompt, parallel-sampling forks) run ``kernels.cascade_attention`` with a
plan built on the host. Outputs are checked against greedy full recomputation without any
cache (``greedy_generate_no_cache``, independent of paging) under preemption (swap and
recompute), copy-on-write and overlap scheduling, and against the same engine with
cascade off for sampled (temperature > 0) forks; the step metrics and a counting wrapper
around the kernel entry point show that the plan was used, so the identity cannot hold
vacuously.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.testing import tolerance
from paxcache.engine import Engine, EngineConfig, Request
from paxcache.engine import _engine as engine_module
from paxcache.nn import TINY_CORPUS, greedy_generate_no_cache, load_decoder

PERIOD = ord(".")
BS = 8
SHARED = 48  # the common prompt: 6 blocks of 8


@pytest.fixture(scope="module")
def tiny():
  return load_decoder()


@pytest.fixture(scope="module")
def corpus():
  with open(TINY_CORPUS, "rb") as f:
    return f.read()


def _requests(corpus: bytes) -> list[Request]:
  """Eight requests, six of them on one 48-token prompt prefix (plus 1-12 own tokens), two
  unrelated; forks with n = 2 and 3 (their samples share the partial last prompt block
  until each copies it on write); two stop at the first period."""
  rng = np.random.default_rng(3)
  shared = list(corpus[300 : 300 + SHARED])
  spec = [(1, 24, 1), (5, 20, 2), (12, 16, 1), (3, 28, 3), (8, 12, 1), (2, 18, 1)]
  reqs = []
  for i, (own, gen, n) in enumerate(spec):
    start = int(rng.integers(0, len(corpus) - 100))
    reqs.append(
      Request(
        i,
        shared + list(corpus[start : start + own]),
        max_new_tokens=gen,
        n=n,
        end_token=PERIOD if i in (2, 4) else None,
      )
    )
  for i, p in ((6, 30), (7, 9)):
    start = int(rng.integers(0, len(corpus) - 100))
    reqs.append(Request(i, list(corpus[start : start + p]), max_new_tokens=14))
  return reqs


def _want(tiny, reqs):
  out = []
  for r in reqs:
    (w,) = greedy_generate_no_cache(tiny, [r.prompt], r.max_new_tokens, end_token=r.end_token)
    out.append(w)
  return out


@pytest.fixture(scope="module")
def parity(tiny, corpus):
  reqs = _requests(corpus)
  return reqs, _want(tiny, reqs)


def _config(**kw) -> EngineConfig:
  base = dict(
    num_blocks=40,
    block_size=BS,
    num_host_blocks=64,
    max_num_seqs=16,
    max_num_batched_tokens=64,
    check_invariants=True,
    cascade_min_shared_blocks=2,
  )
  base.update(kw)
  return EngineConfig(**base)


@pytest.mark.parametrize(
  "mode,async_scheduling",
  [("swap", False), ("recompute", True)],
  ids=["swap-sync", "recompute-async"],
)
def test_greedy_outputs_equal_no_cache_recomputation_with_cascade(
  tiny, parity, mode, async_scheduling
):
  reqs, want = parity
  # 30 blocks (the most one request may need) for 12 samples: the shared prompt is stored
  # once, but the samples' own blocks outgrow the pool, so some are preempted.
  engine = Engine(
    tiny, _config(num_blocks=30, preemption_mode=mode, async_scheduling=async_scheduling)
  )
  outs = engine.run(reqs)
  for r, w in zip(reqs, want, strict=True):
    assert outs[r.request_id].samples == [w] * r.n, r.request_id
  m = engine.metrics
  assert m.cascade_steps > 0 and m.cascade_groups >= m.cascade_steps
  assert m.preemptions > 0, "the pool was meant to be too small for every sample at once"
  assert m.prefix_hit_tokens >= 5 * SHARED  # the later five sharers hit the 6 blocks
  assert m.cow_copies > 0
  steps = list(engine.step_metrics)
  # Only decode-only steps plan a cascade; mixed prefill/decode steps run plain attention.
  assert all(s.cascade_groups == 0 for s in steps if s.num_prefill_tokens)
  assert engine.allocator.num_used_blocks == 0


def test_sampled_forks_are_token_identical_with_cascade_on_and_off(tiny, corpus):
  # The first four requests (forks of 2 and 3 among them) on the shared prefix, sampled.
  reqs = [
    Request(r.request_id, r.prompt, max_new_tokens=12, n=r.n, temperature=0.8, top_k=20,
            seed=100 + r.request_id)
    for r in _requests(corpus)[:4]
  ]  # fmt: skip
  outs = {}
  for blocks in (0, 2):
    engine = Engine(tiny, _config(cascade_min_shared_blocks=blocks))
    outs[blocks] = {k: v.samples for k, v in engine.run(reqs).items()}
    assert (engine.metrics.cascade_steps > 0) == (blocks > 0)
  assert outs[2] == outs[0]


def test_plan_groups_the_sharing_rows_and_counts_the_saved_reads(tiny, corpus):
  """Four requests on the 48-token prefix plus 3 own tokens each (51 tokens, the 7th block
  their own): each decode step of the four groups them, sharing min(6 * 8, length - 1) = 48
  tokens, and saves (4 - 1) * 48 K/V token reads per layer and KV head."""
  shared = list(corpus[300 : 300 + SHARED])
  reqs = [Request(i, shared + list(corpus[500 + 9 * i : 503 + 9 * i]), max_new_tokens=5)
          for i in range(4)]  # fmt: skip
  engine = Engine(tiny, _config(cascade_min_shared_blocks=6))
  outs = engine.run(reqs)
  decode_steps = [
    s for s in engine.step_metrics if s.decode_batch == 4 and not s.num_prefill_tokens
  ]
  assert decode_steps
  for s in decode_steps:
    assert (s.cascade_groups, s.cascade_rows, s.cascade_saved_tokens) == (1, 4, 3 * SHARED)
  for r, w in zip(reqs, _want(tiny, reqs), strict=True):
    assert outs[r.request_id].samples == [w]
  # Six shared blocks are below a threshold of seven: no step plans a cascade.
  strict = Engine(tiny, _config(cascade_min_shared_blocks=7))
  assert {k: v.samples for k, v in strict.run(reqs).items()} == {
    k: v.samples for k, v in outs.items()
  }
  assert strict.metrics.cascade_steps == 0 and engine.metrics.cascade_steps == len(decode_steps)


def test_the_jitted_step_calls_cascade_attention_with_the_plan(tiny, corpus, monkeypatch):
  calls = []
  real = kernels.cascade_attention

  def counted(*args, **kw):
    calls.append(args[5])  # the plan (traced arrays)
    return real(*args, **kw)

  monkeypatch.setattr(kernels, "cascade_attention", counted)
  engine_module._jitted_step.cache_clear()  # retrace: a cached step would not call it
  try:
    reqs = _requests(corpus)[:4]
    engine = Engine(tiny, _config())
    engine.run(reqs)
  finally:
    engine_module._jitted_step.cache_clear()
  assert engine.metrics.cascade_steps > 0
  num_layers = tiny.config.num_layers
  assert calls and len(calls) % num_layers == 0
  assert all(isinstance(p, kernels.CascadePlan) for p in calls)


@pytest.mark.parametrize("value", [-1, 1.5, True, None])
def test_cascade_min_shared_blocks_is_validated(value):
  with pytest.raises(ValueError, match="cascade_min_shared_blocks"):
    EngineConfig(cascade_min_shared_blocks=value)


def test_off_by_zero_builds_no_plan(tiny, corpus):
  engine = Engine(tiny, _config(cascade_min_shared_blocks=0))
  engine.run(_requests(corpus)[:3])
  assert engine.metrics.cascade_steps == 0
  assert all(s.cascade_groups == 0 for s in engine.step_metrics)


def _shared_prefix_model_step(tiny, corpus, plan_fn):
  """The decoder's logits for one decode step of three rows whose caches share a 48-token
  prefix (6 blocks, written once by row 0's prefill) and hold 3 own tokens each (a 7th
  block of their own); ``plan_fn(block_table, lengths)`` gives the step's plan or None."""
  cache = tiny.init_cache(32, BS)
  shared = list(corpus[300 : 300 + SHARED])
  own = [list(corpus[600 + 7 * i : 603 + 7 * i]) for i in range(3)]
  prefix_blocks = [11, 3, 17, 5, 23, 8]
  table = np.full((3, 8), -1, np.int32)
  for b, own_block in enumerate((30, 1, 14)):
    table[b, :7] = prefix_blocks + [own_block]
  slot = lambda b, p: int(table[b, p // BS]) * BS + p % BS  # noqa: E731

  def run(tokens, positions, lengths, cu, rows, plan=None):
    slots = np.array([slot(b, p) for b, p in zip(rows, positions, strict=True)], np.int32)
    return tiny(
      jnp.asarray(tokens, jnp.int32),
      jnp.asarray(positions, jnp.int32),
      cache,
      block_table=jnp.asarray(table),
      lengths=jnp.asarray(lengths, np.int32),
      slot_mapping=jnp.asarray(slots),
      cu_q_lens=None if cu is None else jnp.asarray(cu, np.int32),
      cascade=plan,
    )

  # Prefill: row 0 writes the prefix and its own tokens; rows 1 and 2 only their own.
  tokens = shared + own[0] + own[1] + own[2]
  positions = list(range(51)) + [48, 49, 50] * 2
  rows = [0] * 51 + [1] * 3 + [2] * 3
  _, cache = run(tokens, positions, [51, 51, 51], [0, 51, 54, 57], rows)
  lengths = np.array([52, 52, 52], np.int32)
  plan = plan_fn(table, lengths)
  logits, _ = run([101, 32, 46], [51, 51, 51], lengths, None, [0, 1, 2], plan)
  return np.asarray(logits), plan


def test_decoder_logits_with_a_cascade_plan_equal_plain_paged_attention(tiny, corpus):
  plain, _ = _shared_prefix_model_step(tiny, corpus, lambda t, n: None)
  got, plan = _shared_prefix_model_step(
    tiny, corpus, lambda t, n: kernels.plan_cascade(t, n, BS, min_shared_blocks=2)
  )
  assert plan is not None and plan.group_lens[0] == SHARED
  # Two float32 paths of the same model (attention summed in another order), as in
  # test_nn.py's paged-vs-dense comparisons.
  np.testing.assert_allclose(got, plain, **tolerance("layer_vs_float64", "float32"))

  def prefix_twice(t, n):  # a wrong plan: each row's own part reads the prefix again
    p = kernels.plan_cascade(t, n, BS, min_shared_blocks=2)
    return kernels.CascadePlan(p.group_table, p.group_lens, p.group_rows, p.row_starts * 0)

  # As device arrays, as the engine's step sees them: kernels.validate_plan checks the
  # values of host arrays only, and would refuse this plan.
  wrong, _ = _shared_prefix_model_step(
    tiny, corpus, lambda t, n: jax.tree.map(jnp.asarray, prefix_twice(t, n))
  )
  assert np.abs(wrong - plain).max() > 1e-3, "the comparison above could not fail"


@pytest.mark.parametrize(
  "backend,head_dim,lane_padded", [("gpu", 64, False), ("tpu", 128, False), ("gpu", 96, True)]
)
def test_engine_cascade_on_pallas_kernels_in_interpret_mode_matches_no_cache(
  backend, head_dim, lane_padded
):
  """Decode steps with a plan through the Pallas GPU and TPU cascade kernels (interpret
  mode): a fork and a prefix-cache hit share a 16-token prefix (2 blocks of 8). Head_dim
  96 over a lane-padded cache: the GPU cascade kernel at the rows' width, 128."""
  from flax import nnx

  from paxcache.nn import Decoder, DecoderConfig

  config = DecoderConfig(
    d_model=32, num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=head_dim, mlp_dim=64,
    max_seq_len=64,
  )  # fmt: skip
  model = Decoder(config, backend=backend, interpret=True, rngs=nnx.Rngs(0))
  oracle = Decoder(config, rngs=nnx.Rngs(0))  # same parameters, reference backend
  prefix = list(range(40, 56))
  reqs = [
    Request(0, prefix + [7, 9, 11], max_new_tokens=4, n=2),
    Request(1, prefix + [60, 61], max_new_tokens=4),
  ]
  engine = Engine(
    model,
    EngineConfig(
      num_blocks=16, block_size=8, num_host_blocks=16, cascade_min_shared_blocks=2,
      max_num_batched_tokens=19,  # request 1 is admitted a step later: a prefix-cache hit
      lane_padded_cache=lane_padded,
    ),
  )  # fmt: skip
  assert engine.cache.lane_padded == lane_padded
  outs = engine.run(reqs)
  want = greedy_generate_no_cache(oracle, [r.prompt for r in reqs], 4)
  for r, w in zip(reqs, want, strict=True):
    assert outs[r.request_id].samples == [w] * r.n
  assert engine.metrics.cascade_steps > 0
  assert engine.metrics.prefix_hit_tokens == 16


def test_cascade_is_off_where_its_kernels_cannot_run(corpus):
  """A sliding-window layer (cascade_attention takes no window) and a GPU head_dim the GPU
  cascade kernel does not take: the engine runs the plain path and says why, instead of
  failing in the middle of serving when two rows first share enough blocks."""
  from flax import nnx

  from paxcache.nn import Decoder, DecoderConfig

  windowed = load_decoder()
  for layer in windowed.layers:
    layer.attn.sliding_window = 1_000  # longer than any sequence here: same outputs
  engine = Engine(windowed, _config(cascade_min_shared_blocks=2))
  assert engine.cascade_min_shared_blocks == 0 and "sliding-window" in engine.cascade_off_reason
  reqs = _requests(corpus)[:3]
  outs = engine.run(reqs)
  plain = Engine(load_decoder(), _config(cascade_min_shared_blocks=2))
  want = plain.run(reqs)
  assert {k: o.samples for k, o in outs.items()} == {k: o.samples for k, o in want.items()}
  # Without the window these requests do run cascade steps: the windowed engine declined.
  assert engine.metrics.cascade_steps == 0 and plain.metrics.cascade_steps > 0

  config = DecoderConfig(
    d_model=32, num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=96, mlp_dim=64,
    max_seq_len=64,
  )  # fmt: skip
  gpu96 = Decoder(config, backend="gpu", interpret=True, rngs=nnx.Rngs(0))
  engine = Engine(gpu96, EngineConfig(num_blocks=16, block_size=8, cascade_min_shared_blocks=2))
  assert engine.cascade_min_shared_blocks == 0 and "head_dim 96" in engine.cascade_off_reason
  # Over a lane-padded cache the GPU cascade kernel runs at the rows' width, 128: on.
  padded = EngineConfig(
    num_blocks=16, block_size=8, cascade_min_shared_blocks=2, lane_padded_cache=True
  )
  engine = Engine(gpu96, padded)
  assert engine.cascade_min_shared_blocks == 2 and engine.cascade_off_reason is None
  config64 = dataclasses.replace(config, head_dim=64)
  gpu64 = Decoder(config64, backend="gpu", interpret=True, rngs=nnx.Rngs(0))
  engine = Engine(gpu64, EngineConfig(num_blocks=16, block_size=8, cascade_min_shared_blocks=2))
  assert engine.cascade_min_shared_blocks == 2 and engine.cascade_off_reason is None


def test_engine_cascade_through_the_mosaic_shared_part(monkeypatch):
  """The engine's cascade with the GPU shared part on Mosaic (forced here: GPU interpret
  mode picks the Triton kernel on its own) and a one-split own part, whose kernel merges
  the Mosaic partials itself (kernels.gpu.cascade.merges_in_own_kernel): the tokens of the
  same engine with the cascade off."""
  from flax import nnx

  from kernels.gpu import cascade as gc
  from paxcache.nn import Decoder, DecoderConfig

  sizes = gc.CascadeBlockSizes(
    shared_kernel="mosaic",
    shared_mosaic_kv_tile=64,
    own=kernels.gpu.BlockSizes(decode_kv_tile=16, decode_num_splits=1, decode_num_stages=2),
  )
  monkeypatch.setattr(gc, "default_cascade_block_sizes", lambda **kw: sizes)
  fused = []
  real = gc.merges_in_own_kernel
  monkeypatch.setattr(gc, "merges_in_own_kernel", lambda *a: fused.append(real(*a)) or fused[-1])
  config = DecoderConfig(
    d_model=64, num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=64, mlp_dim=64,
    max_seq_len=64, dtype="bfloat16",
  )  # fmt: skip
  model = Decoder(config, backend="gpu", interpret=True, rngs=nnx.Rngs(3))
  prefix = list(range(40, 56))
  reqs = [Request(0, prefix + [7, 9, 11], max_new_tokens=3, n=2)]
  cfg = EngineConfig(num_blocks=16, block_size=8, num_host_blocks=16, cascade_min_shared_blocks=2)
  engine = Engine(model, cfg)
  outs = engine.run(reqs)
  assert engine.metrics.cascade_steps > 0
  assert fused and all(fused)  # every cascade step merged in the own part's kernel
  plain = Engine(model, dataclasses.replace(cfg, cascade_min_shared_blocks=0))
  want = plain.run(reqs)
  assert outs[0].samples == want[0].samples
