"""The host decode plan (kernels.gpu.plan) and the planned GPU decode kernel (interpret mode).

Plan properties are checked against Python loops over the chunks (every visible key of
every row covered exactly once, chunk sizes bounded, power-of-two padding) and one
hand-worked example. The kernel is checked against a float64 NumPy loop over positions on
ragged batches whose unused blocks and slots are NaN (make_cache), with plans cut small
so that rows span several chunks.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import gpu
from kernels.gpu import plan as plan_mod
from kernels.gpu.plan import DecodePlan, plan_decode
from kernels.gpu.planned import MERGE_TILE
from kernels.testing import rel_l2_error, tolerance

HQ, HKV, D = 4, 2, 64
# 16-token kernel steps, so that the tiny rows here still take several steps per chunk.
SMALL = gpu.BlockSizes(decode_kv_tile=16, decode_num_stages=2)


def make_cache(rng, *, lengths, block_size, num_kv_heads, head_dim, kv_dtype):
  """Pools for ``lengths`` with blocks at shuffled ids and two spare blocks; every slot
  that no length covers (unused blocks, the tails of last blocks) is NaN."""
  lengths = np.asarray(lengths, np.int32)
  need = -(-lengths // block_size)
  max_blocks = int(need.max()) + 1  # a spare column, -1 in every row
  num_blocks = int(need.sum()) + 2
  ids = rng.permutation(num_blocks)
  table = np.full((len(lengths), max_blocks), kernels.INVALID_BLOCK, np.int32)
  shape = (num_kv_heads, num_blocks, block_size, head_dim)
  k = np.full(shape, np.nan, np.float32)
  v = np.full(shape, np.nan, np.float32)
  used = 0
  for b, length in enumerate(lengths):
    table[b, : need[b]] = ids[used : used + need[b]]
    used += need[b]
    for pos in range(length):
      blk, off = table[b, pos // block_size], pos % block_size
      k[:, blk, off] = rng.standard_normal((num_kv_heads, head_dim))
      v[:, blk, off] = rng.standard_normal((num_kv_heads, head_dim))
  return jnp.asarray(k, kv_dtype), jnp.asarray(v, kv_dtype), table, lengths


# --- the plan ---------------------------------------------------------------------------


def _visible(length, window):
  return (0 if window is None else max(length - window, 0)), length


def _check_plan(p: DecodePlan, lengths, window, chunk_tokens):
  """Every property the kernel and the merge rely on, by loops over chunks and rows."""
  c = p.num_padded_chunks
  num = int(p.seq_num_chunks.sum())
  assert c >= plan_mod.MIN_CHUNK_BUCKET and c & (c - 1) == 0 and c >= num
  # The smallest power of two >= num (at least MIN_CHUNK_BUCKET), by a loop.
  want = plan_mod.MIN_CHUNK_BUCKET
  while want < num:
    want *= 2
  assert c == want
  for name in ("chunk_seq", "chunk_start", "chunk_end"):
    arr = getattr(p, name)
    assert arr.dtype == np.int32 and arr.shape == (c,)
    assert (arr[num:] == 0).all(), f"padding chunks must be (0, 0, 0): {name}"
  for b, length in enumerate(lengths):
    lo, hi = _visible(int(length), window)
    first, n = int(p.seq_first_chunk[b]), int(p.seq_num_chunks[b])
    covered = np.zeros(max(hi, 1), int)
    sizes = []
    for i in range(first, first + n):
      assert p.chunk_seq[i] == b
      s, e = int(p.chunk_start[i]), int(p.chunk_end[i])
      assert 0 <= s < e <= hi
      covered[s:e] += 1
      sizes.append(e - s)
      if i > first:
        assert s % p.kv_tile == 0, "internal boundaries are kv_tile multiples"
    assert (covered[lo:hi] == 1).all() and (covered[:lo] == 0).all(), (b, length)
    assert n == (0 if hi == lo else -(-(hi - lo // p.kv_tile * p.kv_tile) // chunk_tokens))
    assert all(size <= chunk_tokens for size in sizes)
    # Balanced within a row: equal pieces, the last one no longer than the others.
    assert len(set(sizes[:-1])) <= 1 and (n < 2 or sizes[-1] <= sizes[0])


@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("seed", range(4))
def test_plan_covers_every_visible_key_once_in_bounded_chunks(seed, window):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, 3000, size=int(rng.integers(1, 40)))
  lengths[rng.integers(len(lengths))] = 1
  lengths[rng.integers(len(lengths))] = 20000  # one long row among short ones
  kv_tile = int(rng.choice([16, 64, 128]))
  p = plan_decode(lengths, 16, 8, kv_tile=kv_tile, sliding_window=window, target_programs=800)
  lo = lengths * 0 if window is None else np.maximum(lengths - window, 0)
  spans = lengths - (lo // kv_tile * kv_tile)
  chunk = plan_mod.chunk_tokens_for(
    int((lengths - lo).sum()), 8, kv_tile=kv_tile, target_programs=800, spans=spans
  )
  # The chunk size is the balanced share of the work (token-heads over the 800 programs
  # aimed at), rounded up to kv_tile, and no smaller than the floor: 1024 when the rows'
  # chunks at 1024 give two programs per SM (132 SMs off a GPU: 264), else the share of
  # the work that gives two, within 256..1024. A row's span starts at its window's first
  # kv_tile boundary; by a Python loop over the rows:
  work = int((lengths - lo).sum()) * 8
  at_1024 = 0
  for n, first in zip(lengths.tolist(), np.asarray(lo + lengths * 0).tolist(), strict=True):
    at_1024 += math.ceil((n - first // kv_tile * kv_tile) / 1024)
  floor = 1024 if at_1024 * 8 >= 264 else min(max(math.ceil(work / 264), 256), 1024)
  share = max(math.ceil(work / 800), floor)
  assert share <= chunk < share + kv_tile
  _check_plan(p, lengths, window, chunk)
  if window is None:
    # The long row is split into many chunks, the first ones (longest row first).
    long_row = int(np.argmax(lengths))
    assert p.seq_first_chunk[long_row] == 0 and p.seq_num_chunks[long_row] > 1


def test_min_chunk_gives_a_small_batch_two_programs_an_sm(monkeypatch):
  monkeypatch.setattr(plan_mod, "num_sms", lambda: 100)  # 200 program slots
  rows61 = np.full(61, 272)  # an engine's ShareGPT-like decode step, 16,592 keys
  # 61 chunks at 1024, 183 programs at 3 KV heads: the floor is the share for 200 programs,
  # 16,592 * 3 / 200 = 248.9 tokens, raised to SMALL_MIN_CHUNK_TOKENS.
  assert plan_mod.min_chunk_for(16_592, 3, rows61) == plan_mod.SMALL_MIN_CHUNK_TOKENS == 256
  longer = np.full(61, 656)  # 40,016 keys: 600.2 -> 640 (kv_tile 128), 608 (kv_tile 16)
  assert plan_mod.min_chunk_for(40_016, 3, longer) == 640
  assert plan_mod.min_chunk_for(40_016, 3, longer, kv_tile=16) == 608
  assert plan_mod.min_chunk_for(40_016, 3) == 640  # spans unknown: the share
  assert plan_mod.min_chunk_for(90_000, 3, rows61) == plan_mod.MIN_CHUNK_TOKENS == 1024  # 1350
  # 67 rows at 3 heads, or 25 at 8: 201 and 200 programs at 1024, the large floor.
  assert plan_mod.min_chunk_for(18_224, 3, np.full(67, 272)) == 1024
  assert plan_mod.min_chunk_for(6_800, 8, np.full(25, 272)) == 1024
  assert plan_mod.min_chunk_for(6_528, 8, np.full(24, 272)) == 384  # 192 programs: 262 -> 384
  # Rows over 1024 count their chunks at 1024: 20 rows of 2,500 keys give 60 chunks, 180
  # programs at 3 heads (share 750 -> 768); 23 rows give 207 (1024).
  assert plan_mod.min_chunk_for(50_000, 3, np.full(20, 2_500)) == 768
  assert plan_mod.min_chunk_for(57_500, 3, np.full(23, 2_500)) == 1024
  # Padding rows (length 0) and rows without keys give no programs.
  padded = np.zeros(128, np.int64)
  padded[:61] = 272
  assert plan_mod.min_chunk_for(16_592, 3, padded) == 256
  p = plan_decode(padded, 16, 3)
  assert p.num_chunks() == 61 * 2 and int((p.chunk_end - p.chunk_start).max()) == 256
  # The floor binds only when the programs' target gives smaller chunks.
  assert plan_mod.chunk_tokens_for(40_016, 3, kv_tile=16, target_programs=800, spans=longer) == 608
  assert (
    plan_mod.chunk_tokens_for(40_016, 3, kv_tile=16, target_programs=10, spans=longer) == 12_016
  )
  assert plan_mod.chunk_tokens_for(40_016, 3, kv_tile=16, min_chunk_tokens=32) == 160  # 151
  # Plans: 40 rows at 3 heads (120 programs at 1024), 13,200 keys: 198 -> 256. Rows are cut
  # in equal pieces rounded up to kv_tile 16: 700 in three (240, 240, 220), 300 in two
  # (160, 140).
  lengths = np.full(40, 300)
  lengths[:3] = 700
  p = plan_decode(lengths, 16, 3, kv_tile=16)
  assert p.num_chunks() == 3 * 3 + 37 * 2
  sizes = p.chunk_end[: p.num_chunks()] - p.chunk_start[: p.num_chunks()]
  assert sorted(set(sizes.tolist())) == [140, 160, 220, 240]
  # The same lengths at 8 heads: 320 programs at 1024, chunks of 1024, one a row.
  assert plan_decode(lengths, 16, 8, kv_tile=16).num_chunks() == 40


def test_plan_hand_worked_example():
  p = plan_decode(np.array([0, 5, 300, 1000, 129]), 16, 2, kv_tile=64, chunk_tokens=512)
  # Row 3 (1000 keys) needs ceil(1000 / 512) = 2 pieces of ceil(500 / 64) * 64 = 512; the
  # others fit one chunk; rows by length, longest first: 3, 2, 4, 1; row 0 has none.
  np.testing.assert_array_equal(p.chunk_seq[:5], [3, 3, 2, 4, 1])
  np.testing.assert_array_equal(p.chunk_start[:5], [0, 512, 0, 0, 0])
  np.testing.assert_array_equal(p.chunk_end[:5], [512, 1000, 300, 129, 5])
  np.testing.assert_array_equal(p.seq_first_chunk, [0, 4, 2, 0, 3])
  np.testing.assert_array_equal(p.seq_num_chunks, [0, 1, 1, 2, 1])
  assert p.num_padded_chunks == 16 and not p.chunk_end[5:].any()
  # A window of 300 over 1000 keys: keys 700..999, from the aligned 640 a span of 360,
  # ceil(360 / 128) = 3 pieces of ceil(120 / 64) * 64 = 128: [700, 768) [768, 896) [896, 1000).
  w = plan_decode(np.array([1000]), 16, 2, kv_tile=64, sliding_window=300, chunk_tokens=128)
  np.testing.assert_array_equal(w.chunk_start[:3], [700, 768, 896])
  np.testing.assert_array_equal(w.chunk_end[:3], [768, 896, 1000])
  assert w.seq_num_chunks.tolist() == [3]
  # Nothing to read: no chunks, the smallest bucket, all padding.
  e = plan_decode(np.array([0, 0, 0]), 16, 2)
  assert e.num_chunks() == 0 and e.num_padded_chunks == plan_mod.MIN_CHUNK_BUCKET
  assert not e.chunk_end.any() and not e.seq_num_chunks.any()


def test_plan_is_deterministic_and_its_shapes_are_bucketed():
  rng = np.random.default_rng(7)
  lengths = rng.integers(1, 5000, size=64)
  a, b = plan_decode(lengths, 16, 8), plan_decode(lengths.copy(), 16, 8)
  for f in dataclasses.fields(DecodePlan):
    x, y = getattr(a, f.name), getattr(b, f.name)
    assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
  # Other lengths with as many chunks after padding: the same pytree structure and leaf
  # shapes, so a jitted call does not compile again.
  c = plan_decode(np.maximum(lengths - 7, 1), 16, 8)
  assert c.num_padded_chunks == a.num_padded_chunks
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(c)
  assert [x.shape for x in jax.tree_util.tree_leaves(a)] == [
    x.shape for x in jax.tree_util.tree_leaves(c)
  ]
  traces = []

  @jax.jit
  def f(p):
    traces.append(1)
    return p.chunk_end - p.chunk_start

  f(a), f(c)
  assert len(traces) == 1


def test_finer_buckets_pad_less():
  # Hand-worked: 17 chunks -> 32 (powers of two), 24 (2 per octave: 16, 24, 32), 20
  # (4 per octave: 16, 20, 24, 28, 32); 16 stays 16; 100 -> 128, 128, 112.
  assert [plan_mod.bucket(17, k) for k in (1, 2, 4)] == [32, 24, 20]
  assert [plan_mod.bucket(16, k) for k in (1, 2, 4)] == [16, 16, 16]
  assert [plan_mod.bucket(100, k) for k in (1, 2, 4)] == [128, 128, 112]
  for n in range(1, 300):
    for k in (1, 2, 4, 8):
      b = plan_mod.bucket(n, k)
      assert b >= max(n, plan_mod.MIN_CHUNK_BUCKET) and b <= max(16, n * (1 + 1 / k))
  lengths = np.random.default_rng(2).integers(1, 3000, size=50)
  p4 = plan_decode(lengths, 16, 8, buckets_per_octave=4)
  p1 = plan_decode(lengths, 16, 8)
  assert p4.num_padded_chunks <= p1.num_padded_chunks
  for f in ("chunk_seq", "chunk_start", "chunk_end"):
    n = p1.num_chunks()
    np.testing.assert_array_equal(getattr(p4, f)[:n], getattr(p1, f)[:n])


def test_plan_refuses_bad_input():
  with pytest.raises(ValueError, match="lengths must be >= 0"):
    plan_decode(np.array([3, -1]), 16, 2)
  with pytest.raises(ValueError, match="kv_tile"):
    plan_decode(np.array([3]), 16, 2, kv_tile=48)
  with pytest.raises(ValueError, match="chunk_tokens"):
    plan_decode(np.array([3]), 16, 2, kv_tile=64, chunk_tokens=100)
  with pytest.raises(ValueError, match="buckets_per_octave"):
    plan_decode(np.array([3]), 16, 2, buckets_per_octave=3)
  with pytest.raises(ValueError, match="1-D integer"):
    plan_decode(np.array([[3.0]]), 16, 2)
  with pytest.raises(ValueError, match="block_size"):
    plan_decode(np.array([3]), True, 2)  # a bool is not a block size
  with pytest.raises(ValueError, match="num_kv_heads"):
    plan_decode(np.array([3]), 16, 2.0)


def test_plan_takes_numpy_integers_as_ints():
  lens = np.array([700, 3, 40])
  want = plan_decode(lens, 16, 2, sliding_window=512)
  got = plan_decode(lens, np.int64(16), np.int32(2), sliding_window=np.int64(512))
  assert (got.block_size, got.num_kv_heads, got.sliding_window) == (16, 2, 512)
  assert all(type(v) is int for v in (got.block_size, got.num_kv_heads, got.sliding_window))
  for name in ("chunk_seq", "chunk_start", "chunk_end", "seq_first_chunk", "seq_num_chunks"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


# --- the planned kernel ------------------------------------------------------------------


def decode_float64(q, k, v, table, lengths, *, scale, window=None, cap=None, ks=None, vs=None):
  """Decode attention by a loop over sequences and query heads, in float64."""
  qn, kn, vn = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  if ks is not None:
    kn = kn * np.asarray(ks, np.float64)[..., None]
    vn = vn * np.asarray(vs, np.float64)[..., None]
  table, lengths = np.asarray(table), np.asarray(lengths)
  block_size = kn.shape[2]
  group = qn.shape[1] // kn.shape[0]
  out = np.zeros(qn.shape, np.float64)
  for b, length in enumerate(lengths):
    lo = 0 if window is None else max(int(length) - window, 0)
    pos = np.arange(lo, int(length))
    if pos.size == 0:
      continue
    blk = table[b, pos // block_size]
    for hq in range(qn.shape[1]):
      h = hq // group
      keys, vals = kn[h, blk, pos % block_size], vn[h, blk, pos % block_size]
      s = keys @ qn[b, hq] * scale
      if cap is not None:
        s = cap * np.tanh(s / cap)
      p = np.exp(s - s.max())
      out[b, hq] = p @ vals / p.sum()
  return out


def _run(
  lengths,
  *,
  block_size,
  dtype=jnp.float32,
  q_dtype=None,
  window=None,
  cap=None,
  plan_window="same",
  chunk_tokens=64,
  kv_dtype=None,
  seed=0,
  block_sizes=SMALL,
):
  rng = np.random.default_rng(seed)
  k, v, table, lens = make_cache(
    rng, lengths=lengths, block_size=block_size, num_kv_heads=HKV, head_dim=D, kv_dtype=dtype
  )
  q = jnp.asarray(rng.standard_normal((len(lengths), HQ, D)), q_dtype or dtype)
  quant = {}
  if kv_dtype is not None:
    # 8-bit rows and scales; unused rows stay NaN-free only where written, so poison the
    # scales of unused slots instead (NaN * 0-probability must not leak either).
    kq, ksc = kernels.quantize(jnp.nan_to_num(k), jnp.dtype(kv_dtype))
    vq, vsc = kernels.quantize(jnp.nan_to_num(v), jnp.dtype(kv_dtype))
    dead = np.isnan(np.asarray(k, np.float32))[..., 0]
    ksc = jnp.where(dead, jnp.nan, ksc)
    vsc = jnp.where(dead, jnp.nan, vsc)
    k, v, quant = kq, vq, dict(k_scales=ksc, v_scales=vsc)
  pw = window if plan_window == "same" else plan_window
  p = plan_decode(
    np.asarray(lengths), block_size, HKV, kv_tile=16, sliding_window=pw, chunk_tokens=chunk_tokens
  )
  out = kernels.paged_attention(
    q,
    k,
    v,
    np.asarray(table),
    np.asarray(lens),
    backend="gpu",
    interpret=True,
    block_sizes=block_sizes,
    sliding_window=window,
    logit_soft_cap=cap,
    decode_plan=p,
    **quant,
  )
  assert out.shape == q.shape and out.dtype == q.dtype
  assert not np.isnan(np.asarray(out, np.float32)).any(), "NaN leaked into the output"
  want = decode_float64(
    q,
    k,
    v,
    table,
    lens,
    scale=D**-0.5,
    window=window,
    cap=cap,
    ks=quant.get("k_scales"),
    vs=quant.get("v_scales"),
  )
  return np.asarray(jnp.asarray(out, jnp.float32), np.float64), want, p


@pytest.mark.parametrize(
  "lengths, block_size, chunk_tokens",
  [
    ([1, 37, 300, 1, 64], 16, 64),  # ragged, length-1 rows, a row over five chunks
    # One long row among short ones (in 88 chunks: more than one merge step of
    # MERGE_TILE), an empty row.
    ([1400, 3, 5, 1, 9, 0], 64, 16),
    ([1, 20, 45], 1, 16),  # block size 1: every key its own block
    ([600, 1, 2], 512, 64),  # block size 512: chunks are slices of one block
  ],
)
def test_planned_decode_float32_matches_float64_loop(lengths, block_size, chunk_tokens):
  got, want, p = _run(lengths, block_size=block_size, chunk_tokens=chunk_tokens)
  assert int(p.seq_num_chunks.max()) >= 2  # some row is merged from several chunks
  if max(lengths) == 1400:
    assert int(p.seq_num_chunks.max()) > MERGE_TILE
  np.testing.assert_allclose(got, want, **tolerance("attention_vs_float64", jnp.float32))


def test_planned_decode_kernel_steps_longer_than_the_plans_chunks():
  # Chunks of 48 keys on 16-key boundaries, read in 64-key steps: a step straddles two
  # chunks, and each program must take only its own keys from it.
  got, want, p = _run(
    [200, 5, 97], block_size=16, chunk_tokens=48, block_sizes=gpu.BlockSizes(decode_kv_tile=64)
  )
  assert (p.chunk_start[p.chunk_start > 0] % 64 != 0).any()
  np.testing.assert_allclose(got, want, **tolerance("attention_vs_float64", jnp.float32))


def test_planned_decode_window_and_soft_cap():
  lengths = [200, 1, 90, 33]
  # The plan cut by the window, and a plan over all keys (the kernel masks the window).
  for plan_window in ("same", None):
    got, want, _ = _run(lengths, block_size=16, window=40, cap=5.0, plan_window=plan_window)
    np.testing.assert_allclose(got, want, **tolerance("attention_vs_float64", jnp.float32))


def test_planned_decode_bf16():
  got, want, _ = _run([130, 2, 77, 1], block_size=16, dtype=jnp.bfloat16)
  # bf16 probabilities before p @ V and a bf16 output, as the TPU kernels since issue 18.
  assert rel_l2_error(got, want) < tolerance("attention_bf16_probs_rel_l2", jnp.bfloat16).rtol


@pytest.mark.parametrize(
  "kv_dtype, q_dtype", [("int8", jnp.float32), ("float8_e4m3fn", jnp.bfloat16)]
)
def test_planned_decode_8bit(kv_dtype, q_dtype):
  got, want, _ = _run([150, 1, 40], block_size=16, q_dtype=q_dtype, kv_dtype=kv_dtype, window=None)
  if q_dtype == jnp.float32:
    np.testing.assert_allclose(
      got, want, **tolerance("quantized_attention_vs_float64", jnp.float32)
    )
  else:
    assert rel_l2_error(got, want) < tolerance("quantized_gpu_vs_float64_rel_l2", q_dtype).rtol


@pytest.mark.parametrize(
  "q_dtype, kv_dtype, head_dim", [("float16", "float16", 128), ("float32", "bfloat16", 64)]
)
def test_planned_decode_against_the_reference_backend(q_dtype, kv_dtype, head_dim):
  # float16, and float32 q over bf16 K/V (dots in float32), at head_dim 128 / 64.
  rng = np.random.default_rng(5)
  lengths = [90, 1, 257, 16]
  k, v, table, lens = make_cache(
    rng, lengths=lengths, block_size=16, num_kv_heads=HKV, head_dim=head_dim, kv_dtype=kv_dtype
  )
  q = jnp.asarray(rng.standard_normal((4, HQ, head_dim)), q_dtype)
  p = plan_decode(lens, 16, HKV, kv_tile=16, chunk_tokens=64)
  out = kernels.paged_attention(
    q, k, v, table, lens, backend="gpu", interpret=True, block_sizes=SMALL, decode_plan=p
  )
  ref = kernels.paged_attention(q, k, v, table, lens, backend="reference")
  assert out.dtype == q.dtype and not np.isnan(np.asarray(out, np.float32)).any()
  err = rel_l2_error(np.asarray(out, np.float32), np.asarray(ref, np.float32))
  assert err < tolerance("gpu_kernel_vs_reference_rel_l2", q_dtype).rtol


def test_planned_decode_default_block_sizes_and_plan():
  # No block_sizes and a plan with its default chunking: the call's own defaults.
  rng = np.random.default_rng(3)
  lengths = [300, 2, 17]
  k, v, table, lens = make_cache(
    rng, lengths=lengths, block_size=32, num_kv_heads=HKV, head_dim=D, kv_dtype=jnp.float32
  )
  q = jnp.asarray(rng.standard_normal((3, HQ, D)), jnp.float32)
  p = plan_decode(np.asarray(lengths), 32, HKV)
  out = gpu.paged_attention(
    q, k, v, np.asarray(table), np.asarray(lens), interpret=True, decode_plan=p.device_put()
  )
  want = decode_float64(q, k, v, table, lens, scale=D**-0.5)
  np.testing.assert_allclose(
    np.asarray(out), want, **tolerance("attention_vs_float64", jnp.float32)
  )


# --- the switch and its checks -----------------------------------------------------------


def _small_call(lengths=(40, 3)):
  rng = np.random.default_rng(1)
  k, v, table, lens = make_cache(
    rng, lengths=list(lengths), block_size=16, num_kv_heads=HKV, head_dim=D, kv_dtype=jnp.float32
  )
  q = jnp.asarray(rng.standard_normal((len(lengths), HQ, D)), jnp.float32)
  return q, k, v, np.asarray(table), np.asarray(lens)


def test_reference_accepts_and_ignores_a_plan_tpu_refuses_it():
  q, k, v, table, lens = _small_call()
  p = plan_decode(lens, 16, HKV)
  with_plan = kernels.paged_attention(q, k, v, table, lens, backend="reference", decode_plan=p)
  without = kernels.paged_attention(q, k, v, table, lens, backend="reference")
  np.testing.assert_array_equal(np.asarray(with_plan), np.asarray(without))
  with pytest.raises(ValueError, match="TPU backend has none"):
    kernels.paged_attention(q, k, v, table, lens, backend="tpu", interpret=True, decode_plan=p)


@pytest.mark.parametrize(
  "make_plan, kwargs, match",
  [
    (lambda lens: plan_decode(lens + 1, 16, HKV), {}, "tile each sequence"),
    (lambda lens: plan_decode(lens[:1], 16, HKV), {}, "batch of 1 sequences"),
    (lambda lens: plan_decode(lens, 32, HKV), {}, "block_size 32"),
    (lambda lens: plan_decode(lens, 16, HKV, sliding_window=8), {}, "sliding_window=None"),
    (lambda lens: {"chunk_seq": lens}, {}, "must be a kernels.gpu.plan.DecodePlan"),
    (lambda lens: plan_decode(lens, 16, HKV), {"cu_q_lens": True}, "decode calls only"),
  ],
)
def test_bad_plans_are_refused(make_plan, kwargs, match):
  q, k, v, table, lens = _small_call()
  cu = None
  if kwargs.get("cu_q_lens"):
    cu = np.arange(3, dtype=np.int32)
    q = q[:2]
  with pytest.raises(ValueError, match=match):
    kernels.paged_attention(
      q, k, v, table, lens, cu, backend="gpu", interpret=True, decode_plan=make_plan(lens)
    )


@pytest.mark.parametrize(
  "kv_dtype, options",
  [("bfloat16", {}), ("bfloat16", dict(sliding_window=100, logit_soft_cap=30.0)), ("int8", {})],
)
def test_planned_kernels_lower_to_triton_ir_for_an_h200(monkeypatch, kv_dtype, options):
  # No GPU here: Pallas asks the device for its compute capability before lowering, so
  # give it an H200's (a private JAX module, pinned to jax 0.11). This lowers both
  # kernels to Triton IR, which checks every primitive they use has a Triton lowering
  # (interpret mode does not); the PTX compile itself happens only on a GPU.
  from jax._src.pallas.triton import gpu_info, pallas_call_registration

  info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: info)
  lengths = np.array([300, 5, 1000, 0], np.int32)
  need = -(-lengths // 16)
  table = np.full((4, int(need.max())), -1, np.int32)
  table[np.arange(table.shape[1])[None] < need[:, None]] = np.arange(int(need.sum()))
  kv = jax.ShapeDtypeStruct((8, int(need.sum()) + 1, 16, 128), jnp.dtype(kv_dtype))
  q = jax.ShapeDtypeStruct((4, 32, 128), jnp.bfloat16)
  scales = {}
  if kv_dtype == "int8":
    s = jax.ShapeDtypeStruct(kv.shape[:3], jnp.float32)
    scales = dict(k_scales=s, v_scales=s)
  p = plan_decode(lengths, 16, 8, sliding_window=options.get("sliding_window"))

  def call(q, k, v, table, lengths, plan, scales):
    return gpu.paged_attention(q, k, v, table, lengths, decode_plan=plan, **options, **scales)

  lowered = (
    jax.jit(call)
    .trace(q, kv, kv, jnp.asarray(table), jnp.asarray(lengths), p, scales)
    .lower(lowering_platforms=("cuda",))
  )
  text = lowered.as_text()
  assert "paxcache_planned_decode_bs16" in text and "paxcache_planned_decode_merge" in text


@pytest.mark.parametrize("mode", ["q_dtype", "f16", "f16_bits", "int8_qk", "int8_qkv"])
@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
def test_planned_decode_8bit_widenings(kv_dtype, mode):
  # Each BlockSizes.quant_widen (kernels/gpu/_widen.py) in the planned chunk kernel, with
  # bf16 q (f32 q keeps f32 dots in every mode), against the float64 loop.
  got, want, _ = _run(
    [150, 1, 40],
    block_size=16,
    q_dtype=jnp.bfloat16,
    kv_dtype=kv_dtype,
    block_sizes=dataclasses.replace(SMALL, quant_widen=mode),
  )
  assert rel_l2_error(got, want) < tolerance("quantized_gpu_vs_float64_rel_l2", jnp.bfloat16).rtol
