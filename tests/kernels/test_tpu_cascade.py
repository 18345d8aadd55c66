"""Cascade attention's Pallas TPU kernels (``kernels.tpu.cascade``) in TPU interpret mode.

Each case is a small pool in which groups of rows share leading physical blocks, with NaN
in every slot no row may read (unused blocks, slots past each length), compared with
decode paged attention in float64 NumPy (a loop over rows and heads, independent of
every kernel). The plans here are built by hand (a group of 1, a prefix ending mid-block,
padding groups and members, rows in no group), so the kernels are tested on their own,
apart from the host planner.
"""

from __future__ import annotations

import functools
import types

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as _interpret_state
from jax.experimental.pallas import tpu as pltpu

import kernels
from kernels import tpu
from kernels.cascade import merge_lse
from kernels.testing import rel_l2_error, tolerance
from kernels.tpu import cascade

INTERPRET = pltpu.InterpretParams(
  detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan"
)
HEAD_DIM = 128


@pytest.fixture(autouse=True)
def _fresh_interpreter():
  pltpu.reset_tpu_interpret_mode_state()
  yield
  pltpu.reset_tpu_interpret_mode_state()


def _assert_no_races():
  races = _interpret_state.races
  assert races is not None and not races.races_found, "TPU interpret mode found a data race"


def _oracle(
  q, k, v, table, lengths, *, scale=None, logit_soft_cap=None, k_scales=None, v_scales=None
):
  """Decode paged attention in float64, one row and query head at a time (8-bit K/V are
  dequantised first: row * scale)."""
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  if k_scales is not None:
    k = k * np.asarray(k_scales, np.float64)[..., None]
    v = v * np.asarray(v_scales, np.float64)[..., None]
  table, lengths = np.asarray(table), np.asarray(lengths)
  num_kv_heads, _, block_size, head_dim = k.shape
  group = q.shape[1] // num_kv_heads
  scale = head_dim**-0.5 if scale is None else scale
  out = np.zeros(q.shape)
  for b in range(q.shape[0]):
    keys = [p for p in range(lengths[b]) if table[b, p // block_size] >= 0]
    if not keys:
      continue
    blocks = table[b, [p // block_size for p in keys]]
    slots = [p % block_size for p in keys]
    for h in range(q.shape[1]):
      kk, vv = k[h // group, blocks, slots], v[h // group, blocks, slots]
      s = scale * (kk @ q[b, h])
      if logit_soft_cap is not None:
        s = logit_soft_cap * np.tanh(s / logit_soft_cap)
      p = np.exp(s - s.max())
      out[b, h] = p @ vv / p.sum()
  return out


def _plan(group_table, group_lens, group_rows, row_starts):
  # Field names of kernels.CascadePlan; the TPU kernels read only these four arrays.
  return types.SimpleNamespace(
    group_table=np.asarray(group_table, np.int32),
    group_lens=np.asarray(group_lens, np.int32),
    group_rows=np.asarray(group_rows, np.int32),
    row_starts=np.asarray(row_starts, np.int32),
  )


def _shared_case(
  rng, *, block_size, num_kv_heads=2, num_q_heads=4, dtype=jnp.float32, head_dim=HEAD_DIM
):
  """Six rows over one pool:

  - rows 0, 2, 3: group 0, sharing 3 physical blocks; its prefix is ``3 * bs - 5`` tokens
    (ends mid-block: the third block's tail is read by each row's own part);
  - row 4: group 1 on its own (a group of 1), sharing 1 block;
  - row 1: in no group; row 5: length 0, in no group.

  The plan has a padding group (length 0, no rows) and padding members (-1).
  """
  bs = block_size
  own_blocks = {0: 2, 1: 3, 2: 1, 3: 2, 4: 2, 5: 0}
  own_tail = {0: 3, 1: 5, 2: bs, 3: 1, 4: 7, 5: 0}  # tokens in each row's last own block
  shared = {0: 3, 2: 3, 3: 3, 4: 1}  # leading shared blocks of each grouped row
  num_blocks = 3 + 1 + sum(own_blocks.values()) + 3  # 3 spare blocks stay NaN
  perm = list(rng.permutation(num_blocks))
  g0, g1 = [perm.pop() for _ in range(3)], [perm.pop()]
  max_blocks = 6
  table = np.full((6, max_blocks), -1, np.int32)
  lengths = np.zeros(6, np.int32)
  for b in range(6):
    lead = g0 if shared.get(b) == 3 else g1 if b == 4 else []
    own = [perm.pop() for _ in range(own_blocks[b])]
    table[b, : len(lead) + len(own)] = lead + own
    lengths[b] = len(lead) * bs + (len(own) - 1) * bs + own_tail[b] if own else len(lead) * bs
  shape = (num_kv_heads, num_blocks, bs, head_dim)
  k, v = rng.standard_normal(shape), rng.standard_normal(shape)
  used = np.zeros((num_blocks, bs), bool)
  for b in range(6):
    for p in range(lengths[b]):
      used[table[b, p // bs], p % bs] = True
  k[:, ~used], v[:, ~used] = np.nan, np.nan
  q = rng.standard_normal((6, num_q_heads, head_dim))
  prefix0 = 3 * bs - 5
  plan = _plan(
    group_table=[g0 + [-1], g1 + [-1] * 3, [-1] * 4, [-1] * 4],
    group_lens=[prefix0, bs, 0, 0],
    group_rows=[[0, 2, 3, -1], [4, -1, -1, -1], [-1] * 4, [-1] * 4],
    row_starts=[prefix0, 0, prefix0, prefix0, bs, 0],
  )
  return dict(
    q=jnp.asarray(q, dtype),
    k=jnp.asarray(k, dtype),
    v=jnp.asarray(v, dtype),
    table=jnp.asarray(table),
    lengths=jnp.asarray(lengths),
    plan=plan,
  )


def _run(case, **kw):
  out = cascade.cascade_attention(
    case["q"], case["k"], case["v"], case["table"], case["lengths"], case["plan"], **kw
  )
  _assert_no_races()
  return out


def _check(out, want, dtype):
  out = np.asarray(jnp.asarray(out, jnp.float32))
  assert not np.isnan(out).any(), "NaN leaked into the output"
  if jnp.dtype(dtype) == jnp.bfloat16:
    # bf16 q and K/V: p is rounded to bf16 for p @ V, as in the decode kernel (test_tpu.py).
    assert rel_l2_error(out, want) < tolerance("attention_bf16_probs_rel_l2", dtype).rtol
    return
  np.testing.assert_allclose(out, want, **tolerance("attention_vs_float64", dtype))


@pytest.mark.parametrize(
  "blocks_per_chunk,kv_heads_per_step", [(2, 2), (1, 1)], ids=["2-block-chunks", "1-block"]
)
def test_cascade_matches_float64_decode(blocks_per_chunk, kv_heads_per_step):
  case = _shared_case(np.random.default_rng(0), block_size=8)
  out = _run(
    case,
    interpret=INTERPRET,
    block_sizes=tpu.BlockSizes(
      blocks_per_chunk=blocks_per_chunk, kv_heads_per_step=kv_heads_per_step
    ),
  )
  chex.assert_equal_shape([out, case["q"]])
  chex.assert_type(out, case["q"].dtype)
  want = _oracle(case["q"], case["k"], case["v"], case["table"], case["lengths"])
  _check(out, want, jnp.float32)
  assert np.all(np.asarray(out)[5] == 0), "a length-0 row must return zeros"


def test_own_part_never_reads_blocks_before_its_start():
  # The members' entries for blocks wholly inside the shared prefix are cut (-1): only the
  # shared part can read those keys, so the result still equals attention over all of them.
  case = _shared_case(np.random.default_rng(1), block_size=8)
  table = np.asarray(case["table"]).copy()
  for b in (0, 2, 3):
    table[b, :2] = -1  # blocks 0 and 1 lie before the prefix's end (19); block 2 does not
  table[4, 0] = -1
  want = _oracle(case["q"], case["k"], case["v"], case["table"], case["lengths"])
  out = _run(dict(case, table=jnp.asarray(table)), interpret=INTERPRET)
  _check(out, want, jnp.float32)


def test_cascade_soft_cap_and_scale():
  case = _shared_case(np.random.default_rng(2), block_size=8, num_q_heads=2, num_kv_heads=1)
  case["q"] = case["q"] * 4
  kw = dict(scale=0.2, logit_soft_cap=3.0)
  out = _run(case, interpret=INTERPRET, **kw)
  _check(
    out, _oracle(case["q"], case["k"], case["v"], case["table"], case["lengths"], **kw), jnp.float32
  )


@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16], ids=["q-f32", "q-bf16"])
def test_cascade_bf16_kv(q_dtype):
  case = _shared_case(np.random.default_rng(3), block_size=16, dtype=jnp.bfloat16)
  case["q"] = case["q"].astype(q_dtype)
  out = _run(case, interpret=INTERPRET)
  chex.assert_type(out, q_dtype)
  _check(out, _oracle(case["q"], case["k"], case["v"], case["table"], case["lengths"]), q_dtype)


def test_large_group_split_into_member_tiles(monkeypatch):
  # 3 members x 2 query heads = 6 rows; with 2 rows per tile the group's members go to 3
  # tiles, each reading the shared blocks: the same result.
  monkeypatch.setattr(cascade, "CASCADE_ROWS", 2)
  cascade._cascade.clear_cache()
  case = _shared_case(np.random.default_rng(4), block_size=8)
  try:
    out = _run(case, interpret=INTERPRET)
  finally:
    cascade._cascade.clear_cache()
  _check(out, _oracle(case["q"], case["k"], case["v"], case["table"], case["lengths"]), jnp.float32)


@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
def test_cascade_8bit_kv_against_dequantised_float64(kv_dtype):
  # TPU 8-bit K/V need block_size a multiple of 128 (kernels/tpu/_config.py): a group of 2
  # rows sharing one block and a prefix of 100 tokens, a row in no group, scales poisoned
  # (NaN) outside the slots in use.
  rng = np.random.default_rng(5)
  bs, num_blocks = 128, 6
  table = np.array([[0, 1, -1], [0, 2, -1], [3, 4, -1]], np.int32)
  lengths = np.array([130, 129, 200], np.int32)
  shape = (1, num_blocks, bs, HEAD_DIM)
  mag = np.exp(rng.uniform(-1, 1, shape[:3]))[..., None]
  kq, ks = kernels.quantize(jnp.asarray(rng.standard_normal(shape) * mag, jnp.float32), kv_dtype)
  vq, vs = kernels.quantize(jnp.asarray(rng.standard_normal(shape) * mag, jnp.float32), kv_dtype)
  used = np.zeros((num_blocks, bs), bool)
  for b in range(3):
    for p in range(lengths[b]):
      used[table[b, p // bs], p % bs] = True
  ks, vs = np.asarray(ks).copy(), np.asarray(vs).copy()
  ks[:, ~used], vs[:, ~used] = np.nan, np.nan
  q = jnp.asarray(rng.standard_normal((3, 2, HEAD_DIM)), jnp.float32)
  plan = _plan([[0]], [100], [[0, 1]], [100, 100, 0])
  out = cascade.cascade_attention(
    q,
    kq,
    vq,
    jnp.asarray(table),
    jnp.asarray(lengths),
    plan,
    interpret=INTERPRET,
    k_scales=jnp.asarray(ks),
    v_scales=jnp.asarray(vs),
  )
  _assert_no_races()
  want = _oracle(q, kq, vq, table, lengths, k_scales=ks, v_scales=vs)
  np.testing.assert_allclose(
    np.asarray(out), want, **tolerance("quantized_attention_vs_float64", jnp.float32)
  )


def test_the_lse_merge_the_tpu_kernels_use_is_attention_over_both():
  # Hand-worked: one query, two keys with logits 0 and log 3 split into two parts of one
  # key each; the merged weights are 1/4 and 3/4.
  o1, o2 = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]])
  out = merge_lse(o1, jnp.array([0.0]), o2, jnp.array([np.log(3.0)], jnp.float32), jnp.float32)
  np.testing.assert_allclose(np.asarray(out), [[0.25, 0.75]], rtol=1e-6)
  # A part that saw no key (lse = MASK_VALUE) weighs nothing; two such parts give zeros.
  mask = jnp.array([tpu._common.MASK_VALUE])
  np.testing.assert_allclose(np.asarray(merge_lse(o1, mask, o2, jnp.array([5.0]), jnp.float32)), o2)
  assert np.all(np.asarray(merge_lse(o1 * 0, mask, o2 * 0, mask, jnp.float32)) == 0)


def test_nan_in_a_shared_visible_slot_surfaces_as_nan():
  case = _shared_case(np.random.default_rng(6), block_size=8)
  g0 = int(case["plan"].group_table[0, 0])
  case["k"] = case["k"].at[:, g0, 3].set(jnp.nan)
  out = np.asarray(_run(case, interpret=INTERPRET))
  assert np.isnan(out[[0, 2, 3]]).all() and not np.isnan(out[[1, 4, 5]]).any()


@pytest.mark.parametrize(
  "head_dim,block_size,kv_dtype,match",
  [
    (64, 16, jnp.bfloat16, "head_dim must be a multiple of 128"),
    (128, 64, jnp.int8, "multiple of 128 for 8-bit"),
  ],
)
def test_unsupported_shapes_raise(head_dim, block_size, kv_dtype, match):
  q = jnp.zeros((2, 2, head_dim), jnp.float32)
  k = jnp.zeros((1, 4, block_size, head_dim), kv_dtype)
  plan = _plan([[0]], [4], [[0, 1]], [4, 4])
  with pytest.raises(ValueError, match=match):
    cascade.cascade_attention(q, k, k, jnp.zeros((2, 2), jnp.int32), jnp.array([5, 5]), plan)


def test_bad_plan_shapes_raise():
  q = jnp.zeros((2, 2, HEAD_DIM), jnp.float32)
  k = jnp.zeros((1, 4, 8, HEAD_DIM), jnp.float32)
  table, lengths = jnp.zeros((2, 2), jnp.int32), jnp.array([5, 5])
  with pytest.raises(ValueError, match="row_starts"):
    cascade.cascade_attention(q, k, k, table, lengths, _plan([[0]], [4], [[0, 1]], [4, 4, 0]))
  with pytest.raises(ValueError, match="same number of groups"):
    cascade.cascade_attention(q, k, k, table, lengths, _plan([[0]], [4, 0], [[0, 1]], [4, 4]))
  with pytest.raises(ValueError, match="group_table"):
    cascade.cascade_attention(q, k, k, table, lengths, object())


def test_row_starts_matter():
  # The check of the tests above can fail: a plan whose grouped rows start their own part
  # at 0 counts the prefix twice, and must be far off.
  case = _shared_case(np.random.default_rng(7), block_size=8)
  plan = case["plan"]
  wrong = _plan(plan.group_table, plan.group_lens, plan.group_rows, np.zeros(6, np.int32))
  out = np.asarray(_run(dict(case, plan=wrong), interpret=INTERPRET))
  want = _oracle(case["q"], case["k"], case["v"], case["table"], case["lengths"])
  assert np.abs(out[[0, 2, 3, 4]] - want[[0, 2, 3, 4]]).max() > 1e-2
  np.testing.assert_allclose(
    out[[1, 5]], want[[1, 5]], **tolerance("attention_vs_float64", "float32")
  )


def test_cascade_lowers_to_mosaic_for_tpu():
  """The Pallas -> Mosaic lowering (cross-platform export) at the benchmark's head layout."""
  import jax

  k = jax.ShapeDtypeStruct((8, 64, 16, HEAD_DIM), jnp.bfloat16)
  q = jax.ShapeDtypeStruct((4, 32, HEAD_DIM), jnp.bfloat16)
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
  fn = jax.jit(
    lambda q, k, v, t, n, gt, gl, gr, rs: cascade.cascade_attention(
      q,
      k,
      v,
      t,
      n,
      types.SimpleNamespace(group_table=gt, group_lens=gl, group_rows=gr, row_starts=rs),
    )
  )
  args = (q, k, k, i32(4, 8), i32(4), i32(2, 4), i32(2), i32(2, 2), i32(4))
  text = jax.export.export(fn, platforms=["tpu"])(*args).mlir_module()
  assert text.count("tpu_custom_call") >= 2


def test_public_api_with_the_host_planner_runs_the_tpu_kernels():
  case = _shared_case(np.random.default_rng(8), block_size=8)
  table, lengths = np.asarray(case["table"]), np.asarray(case["lengths"])
  plan = kernels.plan_cascade(table, lengths, 8, min_shared_blocks=2)
  assert plan is not None and sorted(plan.group_rows[plan.group_rows >= 0].tolist()) == [0, 2, 3]
  out = kernels.cascade_attention(
    case["q"], case["k"], case["v"], table, lengths, plan, backend="tpu", interpret=INTERPRET
  )
  _assert_no_races()
  _check(out, _oracle(case["q"], case["k"], case["v"], table, lengths), jnp.float32)


@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (32, 32)], ids=["d64", "d32"])
def test_lane_dense_pool_through_the_planner_and_every_backend(head_dim, block_size):
  # head_dim 64 / 32 in a lane-dense pool (2 / 4 tokens a 128-lane row, kernels._layout):
  # the shared prefix (ending mid-block and mid-row: 3 * bs - 5 tokens) and the own parts
  # both read the packed rows; the reference backend reads the same pool through a reshape.
  from kernels import _layout

  case = _shared_case(
    np.random.default_rng(9), block_size=block_size, num_q_heads=6, head_dim=head_dim
  )
  table, lengths = np.asarray(case["table"]), np.asarray(case["lengths"])
  plan = kernels.plan_cascade(table, lengths, block_size, min_shared_blocks=2)
  assert plan is not None
  k, v = _layout.pack(case["k"]), _layout.pack(case["v"])
  assert k.shape[2:] == (block_size * head_dim // 128, 128)
  want = _oracle(case["q"], case["k"], case["v"], table, lengths)
  run = functools.partial(kernels.cascade_attention, lane_dense=True)
  out = run(case["q"], k, v, table, lengths, plan, backend="tpu", interpret=INTERPRET)
  _assert_no_races()
  _check(out, want, jnp.float32)
  _check(run(case["q"], k, v, table, lengths, plan, backend="reference"), want, jnp.float32)


def test_lane_dense_member_tiles_count_the_packed_rows(monkeypatch):
  # A member brings pack x group q rows to the kernel: the shared part's member tiles are
  # cut at CASCADE_ROWS // (pack x group) members, so a tile's rows stay within the sizing.
  from kernels import _layout

  seen = []
  real = cascade._member_tiles

  def spy(table, lens, rows, group):
    seen.append(group)
    return real(table, lens, rows, group)

  monkeypatch.setattr(cascade, "_member_tiles", spy)
  case = _shared_case(np.random.default_rng(10), block_size=16, num_q_heads=6, head_dim=64)
  k, v = _layout.pack(case["k"]), _layout.pack(case["v"])
  cascade.cascade_attention(
    case["q"], k, v, case["table"], case["lengths"], case["plan"], interpret=True,
    lane_dense=True,
  )  # fmt: skip
  assert seen == [2 * 3]


def test_lane_padded_pool_through_the_planner_and_every_backend():
  # head_dim 96 in rows of 128 (kernels._layout, lane-padded): random finite lanes after each used
  # row, NaN after each unused one; q is padded inside the entry point, the output cut back.
  # The GPU cascade kernel, which takes head_dim 64, 128 or 256 only, runs it at 128 (what
  # the engine's cascade_threshold counts on for EngineConfig.lane_padded_cache).
  case = _shared_case(np.random.default_rng(10), block_size=8, num_q_heads=4, head_dim=96)
  table, lengths = np.asarray(case["table"]), np.asarray(case["lengths"])
  plan = kernels.plan_cascade(table, lengths, 8, min_shared_blocks=2)
  assert plan is not None

  def padded(pool):  # random finite lanes after used rows: q must be padded with zeros
    x = np.asarray(pool)
    junk = np.random.default_rng(11).uniform(-3, 3, (*x.shape[:-1], 32))
    pad = np.where(np.isnan(x[..., :1]), np.nan, junk)
    return jnp.asarray(np.concatenate([x, pad], axis=-1), pool.dtype)

  k, v = padded(case["k"]), padded(case["v"])
  want = _oracle(case["q"], case["k"], case["v"], table, lengths)
  run = functools.partial(kernels.cascade_attention, lane_padded=True)
  out = run(case["q"], k, v, table, lengths, plan, backend="tpu", interpret=INTERPRET)
  _assert_no_races()
  assert out.shape == case["q"].shape
  _check(out, want, jnp.float32)
  _check(run(case["q"], k, v, table, lengths, plan, backend="reference"), want, jnp.float32)
  gpu = run(case["q"], k, v, table, lengths, plan, backend="gpu", interpret=True)
  _check(gpu, want, jnp.float32)
