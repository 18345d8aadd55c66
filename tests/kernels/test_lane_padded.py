"""Lane-padded pools (kernels._layout): head_dims that are not a multiple of 128 (64, 80, 96,
112, 192) in rows of head_dim rounded up to 128, on every backend.

Each backend's result from the lane-padded pool is compared with a float64 loop over the
plain pool (tests.kernels.test_gpu_plan.decode_float64, tests.kernels.test_tpu._oracle).
Unused slots are NaN in every lane; the padding lanes of used slots hold random finite
values (the layout promises only finite ones there; ``kernels.write_kv(...,
lane_padded=True)`` writes zeros), so that a q padded with anything but zeros shows. The
TPU kernels run in TPU interpret mode with its race detector, the GPU kernels in
interpret mode.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import kernels
from kernels import _layout
from kernels.testing import rel_l2_error, tolerance
from tests.kernels.test_gpu_plan import decode_float64, make_cache
from tests.kernels.test_tpu import INTERPRET, _assert_no_races, _oracle

HEAD_DIMS = (64, 80, 96, 112, 192)
BS = 8  # TPU float32 sublane tile
LENGTHS = [0, 1, BS - 1, BS, 13, 29]


@pytest.fixture(autouse=True)
def _fresh_interpreter():
  pltpu.reset_tpu_interpret_mode_state()
  yield
  pltpu.reset_tpu_interpret_mode_state()


def _padded(pool, seed=0):
  """A plain pool in the lane-padded layout: random finite lanes after each used row, NaN
  after each unused (NaN) one."""
  width = _layout.padded_width(pool.shape[-1])
  x = np.asarray(jnp.asarray(pool, jnp.float32))
  shape = (*x.shape[:-1], width - x.shape[-1])
  junk = np.random.default_rng(seed).uniform(-3, 3, shape)
  pad = np.where(np.isnan(x[..., :1]), np.nan, junk)
  return jnp.asarray(np.concatenate([x, pad], axis=-1), pool.dtype)


def _run(backend):
  if backend == "tpu":
    return functools.partial(kernels.paged_attention, backend="tpu", interpret=INTERPRET)
  return functools.partial(kernels.paged_attention, backend=backend, interpret=backend == "gpu")


def _close(out, want):
  out = np.asarray(out, np.float32)
  assert not np.isnan(out).any()
  np.testing.assert_allclose(out, want, **tolerance("attention_vs_float64", jnp.float32))


@pytest.mark.parametrize("backend", ["reference", "gpu", "tpu"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decode_from_a_lane_padded_pool_matches_float64(backend, head_dim):
  rng = np.random.default_rng(head_dim)
  k, v, table, lengths = make_cache(
    rng, lengths=LENGTHS, block_size=BS, num_kv_heads=2, head_dim=head_dim, kv_dtype=jnp.float32
  )
  q = jnp.asarray(rng.standard_normal((len(LENGTHS), 4, head_dim)), jnp.float32)
  kp, vp = _padded(k), _padded(v)
  assert kp.shape[-1] == (128 if head_dim < 128 else 256)
  out = _run(backend)(q, kp, vp, table, lengths, lane_padded=True)
  if backend == "tpu":
    _assert_no_races()
  assert out.shape == q.shape and out.dtype == q.dtype
  _close(out, decode_float64(q, k, v, table, lengths, scale=head_dim**-0.5))


@pytest.mark.parametrize("head_dim", (80, 192))
def test_planned_gpu_decode_from_a_lane_padded_pool_matches_float64(head_dim):
  # The GPU backend's planned decode (a plan of this step's lengths: a row over several
  # chunks, merged; rows of one chunk; an empty row) over the padded rows.
  from kernels.gpu import plan_decode

  rng = np.random.default_rng(head_dim + 3)
  lengths = [50, 3, 0, 29]
  k, v, table, lens = make_cache(
    rng, lengths=lengths, block_size=BS, num_kv_heads=2, head_dim=head_dim, kv_dtype=jnp.float32
  )
  q = jnp.asarray(rng.standard_normal((len(lengths), 4, head_dim)), jnp.float32)
  p = plan_decode(lens, BS, 2, kv_tile=BS, chunk_tokens=16)
  assert int(p.seq_num_chunks.max()) >= 2 and (p.seq_num_chunks == 1).any()
  out = _run("gpu")(q, _padded(k), _padded(v), table, lens, lane_padded=True, decode_plan=p)
  assert out.shape == q.shape
  _close(out, decode_float64(q, k, v, table, lens, scale=head_dim**-0.5))
  np.testing.assert_array_equal(np.asarray(out[2]), 0.0)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_ragged_prefill_from_a_lane_padded_pool_with_window_and_cap(backend, head_dim):
  rng = np.random.default_rng(7)
  lengths = [5, 1, 20]
  q_lens = [5, 1, 3]  # a whole prompt, a decode row, a chunk after 17 cached tokens
  k, v, table, lengths = make_cache(
    rng, lengths=lengths, block_size=BS, num_kv_heads=1, head_dim=head_dim, kv_dtype=jnp.float32
  )
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
  q = jnp.asarray(rng.standard_normal((sum(q_lens), 2, head_dim)), jnp.float32)
  kw = dict(sliding_window=6, logit_soft_cap=2.5, scale=0.3)
  out = _run(backend)(q, _padded(k), _padded(v), table, lengths, cu, lane_padded=True, **kw)
  if backend == "tpu":
    _assert_no_races()
  # The scale passed is kept (the padded head_dim does not replace it).
  _close(out, _oracle(q, k, v, table, lengths, cu, **kw))


def test_decode_bf16_lane_padded_on_tpu_with_its_defaults():
  # bf16 q and K/V (blocks of 16, the bf16 sublane tile), the kernel's default settings.
  rng = np.random.default_rng(11)
  lengths = [1, 15, 16, 40]
  k, v, table, lengths = make_cache(
    rng, lengths=lengths, block_size=16, num_kv_heads=2, head_dim=96, kv_dtype=jnp.bfloat16
  )
  q = jnp.asarray(rng.standard_normal((4, 6, 96)), jnp.bfloat16)
  out = _run("tpu")(q, _padded(k), _padded(v), table, lengths, lane_padded=True)
  _assert_no_races()
  assert out.shape == q.shape and out.dtype == jnp.bfloat16
  want = decode_float64(q, k, v, table, lengths, scale=96**-0.5)
  got = np.asarray(out, np.float32)
  assert not np.isnan(got).any()
  # bf16 p for the p @ V product, as in tests/kernels/test_tpu.py's bf16 checks.
  assert rel_l2_error(got, want) < tolerance("attention_bf16_probs_rel_l2", jnp.bfloat16).rtol


def test_nan_in_a_used_rows_k_padding_reaches_the_output():
  # The layout asks finite padding lanes: q's zero lanes times a NaN in K's padding make
  # the score NaN. This pins the documented failure (docs/tpu.md), so that a change that
  # masks the padding shows up here and the docs can say so.
  rng = np.random.default_rng(12)
  k, v, table, lengths = make_cache(
    rng, lengths=[5], block_size=BS, num_kv_heads=1, head_dim=80, kv_dtype=jnp.float32
  )
  kp = np.array(_padded(k))
  kp[0, table[0, 0], 2, 100] = np.nan
  q = jnp.asarray(rng.standard_normal((1, 2, 80)), jnp.float32)
  out = kernels.paged_attention(
    q, jnp.asarray(kp), _padded(v), table, lengths, backend="reference", lane_padded=True
  )
  assert np.isnan(np.asarray(out)).all()


def test_write_kv_pads_new_rows_with_zeros_and_reads_back():
  rng = np.random.default_rng(3)
  head_dim, heads, blocks = 96, 2, 4
  kp = jnp.full((heads, blocks, BS, 128), 7.0, jnp.float32)
  vp = jnp.full((heads, blocks, BS, 128), 7.0, jnp.float32)
  k_new = jnp.asarray(rng.standard_normal((3, heads, head_dim)), jnp.float32)
  v_new = jnp.asarray(rng.standard_normal((3, heads, head_dim)), jnp.float32)
  slots = np.array([5, kernels.INVALID_SLOT, 2 * BS + 1], np.int32)
  kp, vp = kernels.write_kv(kp, vp, k_new, v_new, slots, lane_padded=True)
  for row, slot in [(0, 5), (2, 2 * BS + 1)]:
    blk, off = divmod(slot, BS)
    np.testing.assert_array_equal(kp[:, blk, off, :head_dim], k_new[row])
    np.testing.assert_array_equal(vp[:, blk, off, :head_dim], v_new[row])
    assert (np.asarray(kp[:, blk, off, head_dim:]) == 0).all()
    assert (np.asarray(vp[:, blk, off, head_dim:]) == 0).all()
  untouched = np.ones((heads, blocks, BS), bool)
  untouched[:, 0, 5] = untouched[:, 2, 1] = False
  assert (np.asarray(kp)[untouched] == 7.0).all()  # the padding row wrote nothing


@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_8bit_lane_padded_write_then_decode_matches_dequantised_float64(kv_dtype):
  rng = np.random.default_rng(5)
  head_dim, heads, blocks, lengths = 80, 2, 6, np.array([9, 15], np.int32)
  shape = (heads, blocks, BS, 128)
  kp, vp = jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype)
  ks, vs = jnp.zeros(shape[:3], jnp.float32), jnp.zeros(shape[:3], jnp.float32)
  table = np.array([[3, 0, -1], [5, 1, 4]], np.int32)
  slots = np.concatenate(
    [[table[b, p // BS] * BS + p % BS for p in range(n)] for b, n in enumerate(lengths)]
  ).astype(np.int32)
  k_new = jnp.asarray(rng.standard_normal((len(slots), heads, head_dim)), jnp.float32)
  v_new = jnp.asarray(rng.standard_normal((len(slots), heads, head_dim)), jnp.float32)
  kp, vp, ks, vs = kernels.write_kv_quantized(kp, vp, ks, vs, k_new, v_new, slots, lane_padded=True)
  # The scales are the unpadded rows' (zero lanes change no max), the padding lanes zero.
  kq_plain, vq_plain, ks_plain, vs_plain = kernels.write_kv_quantized(
    jnp.zeros((*shape[:3], head_dim), kv_dtype),
    jnp.zeros((*shape[:3], head_dim), kv_dtype),
    jnp.zeros(shape[:3], jnp.float32),
    jnp.zeros(shape[:3], jnp.float32),
    k_new,
    v_new,
    slots,
  )
  np.testing.assert_array_equal(ks, ks_plain)
  np.testing.assert_array_equal(vs, vs_plain)
  # The rows themselves are the plain write's (compared as float32 values, exact).
  for padded, plain in ((kp, kq_plain), (vp, vq_plain)):
    np.testing.assert_array_equal(
      np.asarray(padded[..., :head_dim].astype(jnp.float32)),
      np.asarray(plain.astype(jnp.float32)),
    )
  assert (np.asarray(kp[..., head_dim:].astype(jnp.float32)) == 0).all()
  assert (np.asarray(vp[..., head_dim:].astype(jnp.float32)) == 0).all()
  q = jnp.asarray(rng.standard_normal((2, 4, head_dim)), jnp.float32)
  k_plain, v_plain = kp[..., :head_dim], vp[..., :head_dim]
  want = decode_float64(q, k_plain, v_plain, table, lengths, scale=head_dim**-0.5, ks=ks, vs=vs)
  for backend in ("reference", "gpu"):
    out = _run(backend)(q, kp, vp, table, lengths, k_scales=ks, v_scales=vs, lane_padded=True)
    _close(out, want)


@pytest.mark.parametrize(
  "q_dim,width,kw,match",
  [
    (80, 256, {}, "rows 128 wide"),
    (128, 128, {}, "a multiple of 128 already"),
    (80, 128, dict(lane_dense=True), "two layouts"),
  ],
)
def test_lane_padded_refuses_what_it_is_not(q_dim, width, kw, match):
  q = jnp.zeros((2, 4, q_dim), jnp.float32)
  pool = jnp.zeros((2, 4, BS, width), jnp.float32)
  table, lengths = jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32)
  with pytest.raises(ValueError, match=match):
    kernels.paged_attention(
      q, pool, pool, table, lengths, backend="reference", lane_padded=True, **kw
    )
  rows = jnp.zeros((1, 2, q_dim), jnp.float32)
  with pytest.raises(ValueError, match=match):
    kernels.write_kv(pool, pool, rows, rows, np.array([0], np.int32), lane_padded=True, **kw)


def test_a_lane_padded_pool_without_the_flag_is_refused_with_a_hint():
  q = jnp.zeros((2, 4, 112), jnp.float32)
  pool = jnp.zeros((2, 4, BS, 128), jnp.float32)
  table, lengths = jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32)
  with pytest.raises(ValueError, match="pass lane_padded=True"):
    kernels.paged_attention(q, pool, pool, table, lengths, backend="reference")
  with pytest.raises(ValueError, match="k_new/v_new must be"):
    rows = jnp.zeros((1, 2, 112), jnp.float32)
    kernels.write_kv(pool, pool, rows, rows, np.array([0], np.int32))


def test_the_gpu_backend_names_the_real_head_dim_of_a_too_wide_lane_padded_pool():
  # head_dim 272 in rows of 384: wider than the GPU kernels take (256) in any layout; the
  # error names both sizes, not only the row width the kernels would see. The reference
  # takes it.
  q = jnp.zeros((2, 4, 272), jnp.float32)
  pool = jnp.zeros((2, 4, BS, 384), jnp.float32)
  table, lengths = jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32)
  match = r"reads a lane-padded pool as head_dim 384, .*\(head_dim 272 rounded up"
  with pytest.raises(ValueError, match=match + r".* multiple of 16 up to 256.* in any layout"):
    _run("gpu")(q, pool, pool, table, lengths, lane_padded=True)
  shared = np.array([[0, 1], [0, 2]], np.int32)  # two rows sharing block 0
  shared_lens = np.full(2, BS + 1, np.int32)
  plan = kernels.plan_cascade(shared, shared_lens, BS)
  assert plan is not None
  with pytest.raises(ValueError, match=match + r".* one of \(64, 128, 256\)"):
    kernels.cascade_attention(
      q, pool, pool, shared, shared_lens, plan, backend="gpu", interpret=True, lane_padded=True
    )
  out = _run("reference")(q, pool, pool, table, lengths, lane_padded=True)
  assert out.shape == (2, 4, 272)
