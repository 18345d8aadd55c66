"""The Pallas GPU kernels (kernels.gpu) in Pallas interpret mode on CPU, against kernels.reference.

Every case draws fresh random inputs, shuffles the block table, and fills unused blocks
and the slots past each length with NaN, so a kernel that reads them (or multiplies a
masked probability by them) fails. Shapes are tiny: interpret mode runs the grid one
program at a time. Tile sizes are set small (16) so that even tiny sequences take many
inner steps, several splits, and both the masked and the unmasked prefill loops.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import gpu, reference
from kernels.testing import rel_l2_error, tolerance


def _bound(q_dtype) -> float:
  """Relative L2 error ``||out - ref|| / ||ref||`` allowed, by q dtype (kernels/testing.py)."""
  return tolerance("gpu_kernel_vs_reference_rel_l2", q_dtype).rtol


SMALL = gpu.BlockSizes(
  decode_kv_tile=16,
  decode_num_stages=2,
  prefill_q_tile=16,
  prefill_kv_tile=16,
  prefill_num_warps=4,
  prefill_num_stages=2,
)


def _rel_err(out, ref):
  assert not np.isnan(np.asarray(out, np.float32)).any(), "NaN in the kernel output"
  return rel_l2_error(out, ref)


def make_cache(rng, *, lengths, block_size, num_kv_heads, head_dim, kv_dtype, extra_blocks=3):
  """Shuffled block table for ``lengths``; unused blocks and slots past the lengths are NaN."""
  lengths = np.asarray(lengths, np.int32)
  need = -(-lengths // block_size)
  max_blocks = max(1, int(need.max()) + 1)  # one spare column stays -1 everywhere
  num_blocks = int(need.sum()) + extra_blocks
  perm = rng.permutation(num_blocks)
  table = np.full((len(lengths), max_blocks), kernels.INVALID_BLOCK, np.int32)
  k = rng.standard_normal((num_kv_heads, num_blocks, block_size, head_dim)).astype(np.float32)
  v = rng.standard_normal((num_kv_heads, num_blocks, block_size, head_dim)).astype(np.float32)
  live = np.zeros((num_blocks, block_size), bool)
  used = 0
  for b, n in enumerate(need):
    table[b, :n] = perm[used : used + n]
    used += n
    for i in range(n):
      live[table[b, i], : min(block_size, lengths[b] - i * block_size)] = True
  k[:, ~live] = np.nan
  v[:, ~live] = np.nan
  return (
    jnp.asarray(k, kv_dtype),
    jnp.asarray(v, kv_dtype),
    jnp.asarray(table),
    jnp.asarray(lengths),
  )


def run_both(q, k, v, table, lengths, cu_q_lens=None, *, block_sizes=SMALL, **kw):
  out = gpu.paged_attention(
    q, k, v, table, lengths, cu_q_lens, block_sizes=block_sizes, interpret=True, **kw
  )
  ref = reference.paged_attention(q, k, v, table, lengths, cu_q_lens, **kw)
  chex.assert_equal_shape([out, q])
  chex.assert_type(out, q.dtype)
  return out, ref


def decode_inputs(
  seed,
  *,
  lengths,
  block_size=16,
  num_q_heads=4,
  num_kv_heads=2,
  head_dim=64,
  q_dtype=jnp.float32,
  kv_dtype=jnp.float32,
):
  rng = np.random.default_rng(seed)
  k, v, table, lens = make_cache(
    rng,
    lengths=lengths,
    block_size=block_size,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    kv_dtype=kv_dtype,
  )
  q = jnp.asarray(rng.standard_normal((len(lengths), num_q_heads, head_dim)), q_dtype)
  return q, k, v, table, lens


# ------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128, 256])
def test_decode_every_block_size(block_size):
  # Lengths 0 and 1, one short of / one past a block, and a longer one.
  lengths = [0, 1, block_size - 1, block_size + 1, 3 * block_size + 5]
  q, k, v, table, lens = decode_inputs(block_size, lengths=lengths, block_size=block_size)
  out, ref = run_both(q, k, v, table, lens)
  assert _rel_err(out, ref) < _bound(jnp.float32)
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)  # length 0 sees nothing


@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize(
  "q_dtype,kv_dtype,head_dim",
  [
    (jnp.bfloat16, jnp.bfloat16, 128),
    (jnp.float32, jnp.bfloat16, 64),
    (jnp.bfloat16, jnp.float32, 64),
  ],
)
def test_decode_dtypes_and_splits(q_dtype, kv_dtype, head_dim, splits):
  # splits=1 takes the path that normalises in the kernel; 2 and 3 the split-K + combine path.
  q, k, v, table, lens = decode_inputs(
    7 + splits, lengths=[37, 0, 70, 1], head_dim=head_dim, q_dtype=q_dtype, kv_dtype=kv_dtype
  )
  bsz = dataclasses.replace(SMALL, decode_num_splits=splits)
  out, ref = run_both(q, k, v, table, lens, block_sizes=bsz)
  assert _rel_err(out, ref) < _bound(q_dtype)


def test_decode_past_the_unrolled_combine():
  # More splits than decode._UNROLLED_COMBINE_SPLITS: the combine over the split axis.
  from kernels.gpu import decode

  splits = decode._UNROLLED_COMBINE_SPLITS + 2
  q, k, v, table, lens = decode_inputs(31, lengths=[144, 0, 9, 137])  # 10 columns: 10 tiles of 16
  bsz = dataclasses.replace(SMALL, decode_num_splits=splits)
  assert decode.grid_splits(4, k.shape[0], table.shape[1] * k.shape[2], 16, splits)[0] == splits
  out, ref = run_both(q, k, v, table, lens, block_sizes=bsz)
  assert _rel_err(out, ref) < _bound(jnp.float32)


@pytest.mark.parametrize("splits", [1, 2, 3, 5, 8, 9, 16])
def test_split_combine_against_float64(splits):
  # Partials of random scores and values cut into `splits` key ranges, as the kernel
  # writes them (max in log2 units, sum of p, sum of p @ v); merged, they must give one
  # softmax over all the keys in float64. Some ranges are empty (no key: m = -inf), and
  # one row has no key at all (output 0).
  from kernels.gpu import decode
  from kernels.testing import random_partials, softmax_over_keys

  rng = np.random.default_rng(splits)
  b, h, d = 3, 4, 8
  o, m, den, scores, vals = random_partials(rng, (b, h), splits, d)
  scores[0, 0], m[0, 0], den[0, 0], o[0, 0] = -np.inf, -np.inf, 0.0, 0.0  # no key at all
  want = softmax_over_keys(scores.reshape(b, h, -1), vals.reshape(b, h, -1, d))
  args = (jnp.asarray(o, jnp.float32), jnp.asarray(m, jnp.float32), jnp.asarray(den, jnp.float32))
  got = np.asarray(decode._combine(*args, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[0, 0], 0.0)
  # Up to _UNROLLED_COMBINE_SPLITS it is elementwise (no reduction), so that XLA can emit it
  # as one kernel: at 2 splits the reductions were three kernels a call on the GPU.
  prims = {e.primitive.name for e in jax.make_jaxpr(decode._combine, static_argnums=3)(
    *args, jnp.float32
  ).eqns}  # fmt: skip
  reduces = prims & {"reduce_max", "reduce_sum"}
  assert (not reduces) == (splits <= decode._UNROLLED_COMBINE_SPLITS), prims


def _own_range_steps(start, length, splits, tile):
  """The keys each split holds when ``row_starts`` is given: the row's steps of ``tile``
  keys from ``start // tile`` to ``ceil(length / tile)``, cut into ``splits`` equal runs."""
  first = start // tile
  steps = max(-(-length // tile) - first, 0)
  per = -(-steps // splits)
  keys = set(range(start, length))
  out = []
  for s in range(splits):
    lo, hi = (first + s * per) * tile, min(first + (s + 1) * per, first + steps) * tile
    out.append(len(keys & set(range(lo, hi))))
  return out


@pytest.mark.parametrize("chunks", [1, 3, 9])  # 9: past the unrolled count, a loop
def test_decode_merges_prefix_partials_against_float64(chunks):
  # Cascade's own part with the shared part's partials merged in the kernel: each row's
  # own keys [row_starts[b], lengths[b]) and `chunks` normalised partials (o, lse) of
  # earlier keys, read at rows first_row[b] + c * stride. Against one float64 softmax over
  # every score the row sees. Row 1 has no prefix (first_row -1: its partial rows are NaN
  # and must not leak), row 3 no own key (length 0), some chunks are empty (lse -inf).
  from kernels.gpu.decode import paged_decode
  from kernels.testing import random_partials, softmax_over_keys

  lengths = [70, 37, 1, 0, 50, 100]
  starts = np.array([33, 0, 1, 0, 49, 4], np.int32)
  q, k, v, table, lens = decode_inputs(43, lengths=lengths)
  batch, num_q_heads, head_dim = q.shape
  rng = np.random.default_rng(chunks)
  o_p, m_p, den_p, x_p, v_p = random_partials(rng, (batch, num_q_heads), chunks, head_dim)
  with np.errstate(divide="ignore", invalid="ignore"):
    o_norm = np.where(den_p[..., None] > 0, o_p / den_p[..., None], 0.0)
    lse = np.where(den_p > 0, m_p + np.log2(den_p), -np.inf)
  first = np.arange(batch, dtype=np.int32)
  first[1] = -1
  stride = batch + 1  # chunk c of row b is row b + c * stride; one spare row a chunk
  total = chunks * stride
  pre_o = np.full((total, num_q_heads, head_dim), np.nan, np.float32)
  pre_lse = np.full((num_q_heads, total), np.nan, np.float32)
  for b in range(batch):
    if first[b] < 0:
      continue
    for c in range(chunks):
      pre_o[b + c * stride] = o_norm[b, :, c]
      pre_lse[:, b + c * stride] = lse[b, :, c]
  got = paged_decode(
    q,
    k,
    v,
    table,
    lens,
    scale=64**-0.5,
    sliding_window=None,
    logit_soft_cap=None,
    block_sizes=dataclasses.replace(SMALL, decode_num_splits=1),
    interpret=True,
    row_starts=jnp.asarray(starts),
    prefix_o=jnp.asarray(pre_o),
    prefix_lse=jnp.asarray(pre_lse),
    prefix_rows=jnp.asarray(first),
    prefix_chunks=chunks,
    prefix_stride=stride,
  )
  got = np.asarray(got, np.float64)
  assert not np.isnan(got).any()
  qn, kn, vn, tn = (np.asarray(x, np.float64) for x in (q, k, v, table))
  group = num_q_heads // k.shape[0]
  for b, (st, n) in enumerate(zip(starts, lengths, strict=True)):
    pos = np.arange(st, n)
    blk, slot = tn[b, pos // 16].astype(int), pos % 16
    for h in range(num_q_heads):
      own_x = kn[h // group, blk, slot] @ qn[b, h] * 64**-0.5 * np.log2(np.e)
      own_v = vn[h // group, blk, slot]
      pre_x = x_p[b, h].reshape(-1) if first[b] >= 0 else np.zeros(0)
      pre_v = v_p[b, h].reshape(-1, head_dim) if first[b] >= 0 else np.zeros((0, head_dim))
      want = softmax_over_keys(np.concatenate([pre_x, own_x]), np.concatenate([pre_v, own_v]))
      np.testing.assert_allclose(got[b, h], want, **tolerance("attention_vs_float64", jnp.float32))


def test_decode_prefix_partials_need_one_split_and_row_starts():
  from kernels.gpu.decode import paged_decode

  q, k, v, table, lens = decode_inputs(44, lengths=[20, 5])
  pre = dict(
    prefix_o=jnp.zeros((2,) + q.shape[1:]),
    prefix_lse=jnp.zeros((q.shape[1], 2)),
    prefix_rows=jnp.zeros((2,), jnp.int32),
    prefix_chunks=1,
    prefix_stride=1,
  )
  kw = dict(scale=0.1, sliding_window=None, logit_soft_cap=None, interpret=True)
  one = dataclasses.replace(SMALL, decode_num_splits=1)
  with pytest.raises(ValueError, match="one-split decode with row_starts"):
    paged_decode(q, k, v, table, lens, block_sizes=one, **kw, **pre)
  starts = jnp.zeros((2,), jnp.int32)
  two = dataclasses.replace(SMALL, decode_num_splits=2)
  with pytest.raises(ValueError, match="got 2 splits"):
    paged_decode(q, k, v, table, lens, block_sizes=two, row_starts=starts, **kw, **pre)
  bad = dict(pre, prefix_lse=jnp.zeros((2, q.shape[1] + 1)))
  with pytest.raises(ValueError, match="prefix_lse"):
    paged_decode(q, k, v, table, lens, block_sizes=one, row_starts=starts, **kw, **bad)
  bad = dict(pre, prefix_o=jnp.zeros((2,) + q.shape[1:], jnp.int32))
  with pytest.raises(ValueError, match="prefix_o must be floating"):
    paged_decode(q, k, v, table, lens, block_sizes=one, row_starts=starts, **kw, **bad)
  bad = dict(pre, prefix_rows=jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="prefix_rows"):
    paged_decode(q, k, v, table, lens, block_sizes=one, row_starts=starts, **kw, **bad)
  with pytest.raises(ValueError, match="take prefix_o, prefix_lse and prefix_rows"):
    paged_decode(
      q, k, v, table, lens, block_sizes=one, row_starts=starts, **kw, **dict(pre, prefix_lse=None)
    )
  # A window would cut the own keys and not the prefix's.
  with pytest.raises(ValueError, match="no sliding_window"):
    paged_decode(
      q, k, v, table, lens, block_sizes=one, row_starts=starts, **dict(kw, sliding_window=8),
      **pre,
    )  # fmt: skip
  # The last chunk's rows must be inside R (Triton loads are not bounds-checked).
  for chunks, stride in ((0, 1), (2, 2), (3, -1)):
    bad = dict(pre, prefix_chunks=chunks, prefix_stride=stride)
    with pytest.raises(ValueError, match="prefix_chunks must be >= 1"):
      paged_decode(q, k, v, table, lens, block_sizes=one, row_starts=starts, **kw, **bad)


@pytest.mark.parametrize("splits", [1, 2, 3, 4])
def test_decode_row_starts_splits_share_each_rows_own_range(splits):
  # Cascade's own part: row b reads keys [row_starts[b], lengths[b]), and the splits cut
  # that range (not the table's width) into equal runs of whole steps. With q = 0 every
  # key scores 0, so a split's denominator counts its keys: checked against the rule by
  # hand, then random q against float64 over each row's own keys.
  from kernels.gpu.decode import _combine, paged_decode

  lengths = [70, 37, 1, 0, 50, 100]
  starts = np.array([33, 0, 1, 0, 49, 4], np.int32)  # a start at its length reads nothing
  q, k, v, table, lens = decode_inputs(41, lengths=lengths)
  bsz = dataclasses.replace(SMALL, decode_num_splits=splits)
  call = functools.partial(
    paged_decode,
    k_blocks=k,
    v_blocks=v,
    block_table=table,
    lengths=lens,
    scale=64**-0.5,
    sliding_window=None,
    logit_soft_cap=None,
    block_sizes=bsz,
    interpret=True,
    row_starts=jnp.asarray(starts),
    return_partials=True,
  )
  o, m, den = call(jnp.zeros_like(q))
  assert den.shape == (len(lengths), q.shape[1], splits)
  for b, (st, n) in enumerate(zip(starts, lengths, strict=True)):
    want = _own_range_steps(int(st), n, splits, SMALL.decode_kv_tile)
    np.testing.assert_array_equal(np.asarray(den[b]), np.broadcast_to(want, den[b].shape))
  o, m, den = call(q)
  got = np.asarray(_combine(o, m, den, jnp.float32), np.float64)
  assert not np.isnan(got).any()
  qn, kn, vn, tn = (np.asarray(x, np.float64) for x in (q, k, v, table))
  group = q.shape[1] // k.shape[0]
  for b, (st, n) in enumerate(zip(starts, lengths, strict=True)):
    pos = np.arange(st, n)
    blk, slot = tn[b, pos // 16].astype(int), pos % 16
    for h in range(q.shape[1]):
      if not len(pos):
        np.testing.assert_array_equal(got[b, h], 0.0)
        continue
      s = kn[h // group, blk, slot] @ qn[b, h] * 64**-0.5
      p = np.exp(s - s.max())
      want = p @ vn[h // group, blk, slot] / p.sum()
      np.testing.assert_allclose(got[b, h], want, **tolerance("attention_vs_float64", jnp.float32))


@pytest.mark.parametrize("window,cap", [(5, None), (None, 2.0), (20, 5.0)])
def test_decode_window_and_soft_cap(window, cap):
  q, k, v, table, lens = decode_inputs(11, lengths=[45, 3, 17, 64], block_size=8)
  out, ref = run_both(q, k, v, table, lens, sliding_window=window, logit_soft_cap=cap, scale=0.3)
  assert _rel_err(out, ref) < _bound(jnp.float32)


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(8, 1, 64), (6, 2, 64), (2, 2, 256)])
def test_decode_head_layouts(num_q_heads, num_kv_heads, head_dim):
  # MQA, a group of 3 (not a power of two: masked rows of the 16-row tile), plain MHA
  # at head_dim 256.
  q, k, v, table, lens = decode_inputs(
    13, lengths=[20, 33], num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim
  )
  out, ref = run_both(q, k, v, table, lens)
  assert _rel_err(out, ref) < _bound(jnp.float32)


def test_decode_default_block_sizes_and_float64_loop():
  # Default tuning (no block_sizes) against an independent float64 loop over positions.
  q, k, v, table, lens = decode_inputs(
    17, lengths=[9, 40], block_size=8, num_q_heads=4, num_kv_heads=2, head_dim=64
  )
  out = gpu.paged_attention(q, k, v, table, lens, interpret=True)
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  want = np.zeros(qn.shape)
  for b, length in enumerate(np.asarray(lens)):
    rows = [int(table[b, p // 8]) for p in range(length)]
    for h in range(4):
      kk = np.stack([kn[h // 2, rows[p], p % 8] for p in range(length)])
      vv = np.stack([vn[h // 2, rows[p], p % 8] for p in range(length)])
      s = kk @ qn[b, h] / math.sqrt(64)
      p = np.exp(s - s.max())
      want[b, h] = p @ vv / p.sum()
  np.testing.assert_allclose(np.asarray(out), want, **tolerance("attention_vs_float64", out.dtype))


# ------------------------------------------------------------------------------ prefill


def prefill_inputs(
  seed,
  *,
  q_lens,
  ctx_lens,
  block_size=16,
  num_q_heads=4,
  num_kv_heads=2,
  head_dim=64,
  dtype=jnp.float32,
  pad_rows=3,
):
  rng = np.random.default_rng(seed)
  q_lens = np.asarray(q_lens, np.int32)
  lengths = np.asarray(ctx_lens, np.int32) + q_lens
  k, v, table, lens = make_cache(
    rng,
    lengths=lengths,
    block_size=block_size,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    kv_dtype=dtype,
  )
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
  num_tokens = int(q_lens.sum()) + pad_rows
  q = jnp.asarray(rng.standard_normal((num_tokens, num_q_heads, head_dim)), dtype)
  return q, k, v, table, lens, cu


@pytest.mark.parametrize("block_size", [8, 256])
def test_mixed_batch_every_kind_of_sequence(block_size):
  # A full prefill, a chunk after cached context, decode steps (q_len 1), an empty
  # sequence (q_len 0, context 0) and one with context but no queries; then padding rows.
  q, k, v, table, lens, cu = prefill_inputs(
    block_size, q_lens=[40, 21, 1, 0, 1, 0], ctx_lens=[0, 37, 50, 0, 0, 9], block_size=block_size
  )
  out, ref = run_both(q, k, v, table, lens, cu)
  assert _rel_err(out, ref) < _bound(jnp.float32)
  np.testing.assert_array_equal(np.asarray(out[int(cu[-1]) :]), 0.0)  # padding rows


@pytest.mark.parametrize(
  "kernel,first_len,block_size,num_q_heads,dtype",
  [
    ("triton", 30, 8, 4, jnp.float32),
    # Mosaic: each CUDA block is one of 8 query heads on 2 KV heads; float16.
    ("mosaic", 75, 16, 8, jnp.float16),
  ],
)
def test_prefill_rows_outside_every_sequence_and_overlong_chunks(
  kernel, first_len, block_size, num_q_heads, dtype
):
  # Rows before cu_q_lens[0] belong to no sequence (zeros, like the reference); a chunk
  # longer than its sequence puts its first queries at negative positions, which see no
  # key and return zeros.
  rng = np.random.default_rng(43)
  lengths = np.array([first_len, 5], np.int32)
  k, v, table, lens = make_cache(
    rng, lengths=lengths, block_size=block_size, num_kv_heads=2, head_dim=64, kv_dtype=dtype
  )
  a, b = 4 + first_len, 4 + first_len + 8  # 8 queries into the second sequence's 5 tokens
  cu = jnp.asarray([4, a, b], jnp.int32)
  q = jnp.asarray(rng.standard_normal((b + 1, num_q_heads, 64)), dtype)
  bsz = dataclasses.replace(SMALL, prefill_kernel=kernel, mosaic_kv_tile=64)
  out, ref = run_both(q, k, v, table, lens, cu, block_sizes=bsz)
  out = np.asarray(out, np.float32)
  assert _rel_err(out, ref) < _bound(dtype)
  np.testing.assert_array_equal(out[:4], 0.0)
  np.testing.assert_array_equal(out[a : a + 3], 0.0)  # positions -3..-1
  assert np.abs(out[a + 3 : b]).max() > 0


@pytest.mark.parametrize("window,cap", [(7, None), (None, 3.0), (30, 10.0)])
def test_prefill_window_and_soft_cap(window, cap):
  q, k, v, table, lens, cu = prefill_inputs(23, q_lens=[50, 1, 19], ctx_lens=[12, 60, 0])
  out, ref = run_both(q, k, v, table, lens, cu, sliding_window=window, logit_soft_cap=cap)
  assert _rel_err(out, ref) < _bound(jnp.float32)


@pytest.mark.parametrize("heads_per_program", [1, 2, 4])
def test_prefill_heads_per_program(heads_per_program):
  # 8 q heads on 2 KV heads: programs take 1, 2 or 4 heads of a group together.
  q, k, v, table, lens, cu = prefill_inputs(
    29, q_lens=[33, 1, 8], ctx_lens=[5, 20, 0], num_q_heads=8, num_kv_heads=2
  )
  bsz = dataclasses.replace(SMALL, prefill_q_tile=32, prefill_heads_per_program=heads_per_program)
  out, ref = run_both(q, k, v, table, lens, cu, block_sizes=bsz)
  assert _rel_err(out, ref) < _bound(jnp.float32)


def test_prefill_bf16_head_dim_128_defaults():
  q, k, v, table, lens, cu = prefill_inputs(
    31, q_lens=[24, 1, 9], ctx_lens=[8, 30, 0], head_dim=128, dtype=jnp.bfloat16
  )
  out, ref = run_both(q, k, v, table, lens, cu, block_sizes=None)
  assert _rel_err(out, ref) < _bound(jnp.bfloat16)


def test_public_api_routes_to_gpu_kernel():
  q, k, v, table, lens = decode_inputs(37, lengths=[10, 30])
  out = kernels.paged_attention(
    q, k, v, table, lens, backend="gpu", interpret=True, block_sizes=SMALL
  )
  ref = reference.paged_attention(q, k, v, table, lens)
  assert _rel_err(out, ref) < _bound(jnp.float32)


def test_nothing_to_attend_is_zero():
  q, k, v, table, lens = decode_inputs(41, lengths=[0, 0])
  out = gpu.paged_attention(q, k, v, table, lens, interpret=True, block_sizes=SMALL)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


# ---------------------------------------------------------------------- bad input, tuning


def _args(head_dim=64, block_size=16, num_q_heads=4, num_kv_heads=2):
  q = jnp.zeros((2, num_q_heads, head_dim), jnp.float32)
  k = jnp.zeros((num_kv_heads, 4, block_size, head_dim), jnp.float32)
  return q, k, k, jnp.zeros((2, 2), jnp.int32), jnp.zeros((2,), jnp.int32)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    # Multiples of 16 up to 256 run (tests/kernels/test_gpu_head_sizes.py); not these.
    (dict(head_dim=40), r"head_dim 40"),
    (dict(head_dim=8), r"head_dim 8"),
    (dict(head_dim=272), r"head_dim 272"),
    (dict(head_dim=512), r"head_dim 512"),
    (dict(block_size=12), r"block_size .*12"),
    (dict(block_size=1024), r"block_size .*1024"),
  ],
)
def test_unsupported_shapes_raise_before_compiling(kwargs, match):
  with pytest.raises(ValueError, match=match):
    gpu.paged_attention(*_args(**kwargs), interpret=True)


def test_bad_block_sizes_raise():
  with pytest.raises(ValueError, match=r"kernels\.gpu\.BlockSizes"):
    gpu.paged_attention(*_args(), block_sizes={"decode_kv_tile": 16}, interpret=True)
  with pytest.raises(ValueError, match="prefill_heads_per_program 4 must divide the 2"):
    gpu.paged_attention(
      *_args(), block_sizes=gpu.BlockSizes(prefill_heads_per_program=4), interpret=True
    )
  with pytest.raises(ValueError, match="k_blocks"):  # generic checks still run first
    q, k, v, t, n = _args()
    gpu.paged_attention(q, k[:1], v, t, n, interpret=True)


@pytest.mark.parametrize(
  "field,value",
  [
    ("decode_kv_tile", 24),
    ("decode_kv_tile", 8),
    ("prefill_q_tile", 512),
    ("decode_num_warps", 3),
    ("decode_num_stages", 0),
    ("decode_num_splits", 0),
    ("prefill_heads_per_program", 3),
  ],
)
def test_block_sizes_validated_on_construction(field, value):
  with pytest.raises(ValueError, match=field):
    gpu.BlockSizes(**{field: value})


def test_block_sizes_frozen_hashable_and_chosen_per_shape():
  a = gpu.BlockSizes()
  assert hash(a) == hash(gpu.BlockSizes()) and a == gpu.BlockSizes()
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.decode_kv_tile = 32  # type: ignore[misc]
  small = gpu.default_block_sizes(head_dim=256, kv_dtype=jnp.float32)
  big = gpu.default_block_sizes(head_dim=64, kv_dtype=jnp.bfloat16)
  # One pipeline stage of K+V stays within the shared-memory budget in both.
  assert small.decode_kv_tile < big.decode_kv_tile
  assert small.decode_kv_tile * 256 * 4 * 2 <= 48 * 1024
  short = gpu.default_block_sizes(head_dim=64, kv_dtype=jnp.bfloat16, num_tokens=20, decode=False)
  assert short.prefill_q_tile == 16
  # Large decode batches (>= 128 sequence x KV head pairs): 128-token steps, 8 warps where
  # a token of K+V is 512 bytes (bf16 head_dim 128), 4 below (head_dim 64: measured faster).
  kw = dict(kv_dtype=jnp.bfloat16, batch=256, num_kv_heads=8)
  wide, narrow = (gpu.default_block_sizes(head_dim=d, **kw) for d in (128, 64))
  assert (wide.decode_kv_tile, wide.decode_num_warps) == (128, 8)
  assert (narrow.decode_kv_tile, narrow.decode_num_warps) == (128, 4)


def test_backend_is_named_in_one_place():
  assert gpu.kernel_backend() == "triton"
  if jax.default_backend() == "cpu":
    with pytest.raises(kernels.BackendUnavailableError):
      kernels.paged_attention(*_args(), backend="gpu")


# ------------------------------------------------------------- Mosaic GPU prefill (Hopper)
#
# kernels/gpu/prefill_mosaic.py in GPU interpret mode: the three warpgroups run as
# threads with simulated shared memory, barriers, TMA copies and wgmma (tests/conftest.py
# gives XLA the threads this needs). bf16 / f16 only, like the kernel.

MOSAIC = dataclasses.replace(SMALL, prefill_kernel="mosaic", mosaic_kv_tile=64)


@pytest.mark.parametrize(
  "block_size,kv_tile,num_slots",
  [(16, 64, 2), (64, 64, 3), (128, 64, 2), (8, 128, 2)],
)
def test_mosaic_prefill_every_kind_of_sequence(block_size, kv_tile, num_slots):
  # Several blocks per K/V step (16, 8), one (64), a slice of one (128 > 64); a full
  # prefill longer than one 128-row tile, a chunk after cached context, decode rows, an
  # empty sequence, one with context and no queries, then padding rows (98 rows: not a
  # multiple of 8). Unused blocks and slots past each length are NaN (make_cache).
  q, k, v, table, lens, cu = prefill_inputs(
    block_size,
    q_lens=[70, 21, 1, 0, 1, 0],
    ctx_lens=[0, 37, 50, 0, 0, 9],
    block_size=block_size,
    dtype=jnp.bfloat16,
    pad_rows=5,
  )
  bsz = dataclasses.replace(MOSAIC, mosaic_kv_tile=kv_tile, mosaic_num_slots=num_slots)
  out, ref = run_both(q, k, v, table, lens, cu, block_sizes=bsz)
  assert _rel_err(out, ref) < _bound(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(out[int(cu[-1]) :], np.float32), 0.0)


@pytest.mark.parametrize("tiles_per_block,num_slots", [(2, 2), (3, 3)])
def test_mosaic_prefill_several_tiles_per_block(tiles_per_block, num_slots):
  # One CUDA block works through several schedule rows with one K/V ring: a prompt of
  # three 128-row tiles, a chunk after cached context, decode rows, an empty sequence and
  # padding rows. The schedule has 19 rows (8 with query rows, the rest empty up to
  # build_schedule's bound), divisible by neither 2 nor 3, so the last block also gets
  # added empty rows. Ring positions carry over tiles of 0 to 5 steps of 64 keys.
  q, k, v, table, lens, cu = prefill_inputs(
    7,
    q_lens=[300, 21, 1, 0, 1, 40],
    ctx_lens=[0, 37, 50, 0, 90, 130],
    block_size=16,
    dtype=jnp.bfloat16,
    pad_rows=5,
  )
  bsz = dataclasses.replace(MOSAIC, mosaic_num_slots=num_slots)
  many = dataclasses.replace(bsz, mosaic_tiles_per_block=tiles_per_block)
  out, ref = run_both(q, k, v, table, lens, cu, block_sizes=many)
  assert _rel_err(out, ref) < _bound(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(out[int(cu[-1]) :], np.float32), 0.0)
  # Each tile's arithmetic is unchanged by sharing a block: equal to one tile per block.
  one = gpu.paged_attention(q, k, v, table, lens, cu, block_sizes=bsz, interpret=True)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(one, np.float32))


def test_mosaic_prefill_several_tiles_per_block_lowers_for_the_gpu():
  # Interpret mode runs P V through shared memory; the GPU's default keeps P in registers
  # (pv_via_smem=False), which only lowering to Mosaic GPU for CUDA exercises on a CPU
  # machine: the tile loop's nested ring, rendezvous and register-accumulated P V must
  # lower (not compiled to PTX here; that and the speed are the GPU benchmark's).
  from kernels.gpu.prefill_mosaic import paged_prefill_mosaic

  q = jax.ShapeDtypeStruct((1024, 8, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 64, 16, 128), jnp.bfloat16)
  table = jax.ShapeDtypeStruct((4, 16), jnp.int32)
  lens = jax.ShapeDtypeStruct((4,), jnp.int32)
  cu = jax.ShapeDtypeStruct((5,), jnp.int32)
  for tpb in (1, 2):
    fn = functools.partial(
      paged_prefill_mosaic,
      scale=0.1,
      sliding_window=None,
      logit_soft_cap=None,
      tiles_per_block=tpb,
      pv_via_smem=False,
    )
    text = jax.jit(fn).trace(q, kv, kv, table, lens, cu).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in text.as_text()


@pytest.mark.parametrize("window,cap", [(9, None), (40, 5.0)])
def test_mosaic_prefill_window_and_soft_cap(window, cap):
  q, k, v, table, lens, cu = prefill_inputs(
    31, q_lens=[150, 3], ctx_lens=[20, 90], dtype=jnp.bfloat16, pad_rows=0
  )
  out, ref = run_both(
    q, k, v, table, lens, cu, block_sizes=MOSAIC, sliding_window=window, logit_soft_cap=cap
  )
  assert _rel_err(out, ref) < _bound(jnp.bfloat16)


def test_mosaic_schedule_tiles_are_aligned_and_cover_every_row_once():
  from kernels.gpu.prefill import build_schedule

  cu = jnp.asarray([3, 140, 141, 141, 300], jnp.int32)
  lengths = jnp.asarray([137, 10, 4, 200], jnp.int32)
  sched = np.asarray(build_schedule(cu, lengths, 305, 128, None, align=8))
  seen = np.zeros(305, int)
  for start, end, pos0, seq, klen, *_ in sched:
    if end <= start:
      continue
    base = start - start % 8
    assert end <= base + 128  # inside one aligned 128-row window
    seen[start:end] += 1
    if klen:  # a sequence's tile: positions continue the cached context
      b = int(seq)
      assert pos0 == int(lengths[b]) - int(cu[b + 1] - cu[b]) + (start - int(cu[b]))
  np.testing.assert_array_equal(seen, 1)


def test_mosaic_tail_buffer_zeroes_past_the_length():
  from kernels.gpu.prefill_mosaic import build_tail

  k = jnp.arange(2 * 6 * 8 * 1, dtype=jnp.float32).reshape(2, 6, 8, 1)
  table = jnp.asarray([[4, 1, -1], [2, -1, -1]], jnp.int32)
  lengths = jnp.asarray([13, 16], jnp.int32)  # 13: tail step [0, 16) ends mid-block 1
  tail = np.asarray(build_tail(k, table, lengths, kv_tile=16))
  assert tail.shape == (2, 2, 16, 1)
  for h in range(2):
    want0 = [float(k[h, 4, t, 0]) for t in range(8)] + [float(k[h, 1, t, 0]) for t in range(5)]
    np.testing.assert_array_equal(tail[h, 0, :13, 0], want0)
    np.testing.assert_array_equal(tail[h, 0, 13:], 0.0)
    # lengths 16 is a multiple of kv_tile: its tail step [16, 32) is all past the end.
    np.testing.assert_array_equal(tail[h, 1], 0.0)


def test_mosaic_backend_choice():
  kw = dict(q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16, head_dim=128, block_size=16)
  assert gpu.kernel_backend("decode", **kw) == "triton"  # "auto" decode: Triton for now
  assert gpu.kernel_backend("prefill", requested="mosaic", interpret=True, **kw) == "mosaic"
  assert gpu.kernel_backend("prefill", requested="triton", **kw) == "triton"
  if not gpu.is_hopper():  # asked for, off Hopper and not interpreting: a clear error
    with pytest.raises(ValueError, match="Hopper"):
      gpu.kernel_backend("prefill", requested="mosaic", **kw)
  # "auto" never picks Mosaic off Hopper or when interpreting, nor for decode-heavy calls.
  heavy = dict(num_tokens=4096, batch=4)
  if not gpu.is_hopper():
    assert gpu.kernel_backend("prefill", **kw, **heavy) == "triton"
  assert gpu.kernel_backend("prefill", **kw, **heavy, interpret=True) == "triton"
  assert gpu.kernel_backend("prefill", **kw, num_tokens=64, batch=32) == "triton"
  for bad in (
    dict(kw, q_dtype=jnp.float32, kv_dtype=jnp.float32),
    dict(kw, head_dim=256),
    dict(kw, block_size=4),
    dict(kw, kv_dtype=jnp.float16),
  ):
    assert gpu.kernel_backend("prefill", **bad, **heavy) == "triton"
    with pytest.raises(ValueError, match="Mosaic GPU prefill supports"):
      gpu.kernel_backend("prefill", requested="mosaic", interpret=True, **bad)
  with pytest.raises(ValueError, match="kind"):
    gpu.kernel_backend("verify")
  with pytest.raises(ValueError, match="requested"):
    gpu.kernel_backend("decode", requested="bogus")
  with pytest.raises(ValueError, match="needs q_dtype"):
    gpu.kernel_backend("prefill", requested="mosaic", interpret=True)


def test_mosaic_shared_memory_budget_checked_before_compiling():
  from kernels.gpu.prefill_mosaic import SMEM_LIMIT_BYTES, paged_prefill_mosaic, smem_bytes

  # bf16 head_dim 128: 128-key steps fit 2 slots (the default), not 3.
  assert smem_bytes(128, 2, 128, 2, False) <= SMEM_LIMIT_BYTES < smem_bytes(128, 2, 128, 3, False)
  q, k, v, table, lens, cu = prefill_inputs(
    5, q_lens=[10], ctx_lens=[0], head_dim=128, dtype=jnp.bfloat16
  )
  with pytest.raises(ValueError, match="shared memory"):
    paged_prefill_mosaic(
      q,
      k,
      v,
      table,
      lens,
      cu,
      scale=0.1,
      sliding_window=None,
      logit_soft_cap=None,
      kv_tile=128,
      num_slots=3,
      pv_via_smem=False,
    )


def test_mosaic_run_schedule_refuses_output_rows_off_the_8_row_tile():
  # The output's TMA descriptor needs whole 8-row tiles; the cascade asks for its own row
  # count (num_out_rows), so a bad one must raise before any kernel is built.
  from kernels.gpu.prefill import build_schedule
  from kernels.gpu.prefill_mosaic import TILE, run_schedule

  q, k, v, table, lens, cu = prefill_inputs(
    5, q_lens=[16], ctx_lens=[0], head_dim=64, dtype=jnp.bfloat16
  )
  sched = build_schedule(cu, lens, q.shape[0], TILE, None, align=8)
  kw = dict(
    num_groups=int(sched.shape[0]),
    kv_tile=64,
    num_slots=2,
    scale=0.1,
    sliding_window=None,
    logit_soft_cap=None,
    pv_via_smem=True,
    tiles_per_block=1,
    with_lse=True,
    interpret=False,
  )
  with pytest.raises(ValueError, match="multiple of 8 output rows, got 12"):
    run_schedule(q, k, v, table, lens, sched, num_out_rows=12, **kw)


def test_mosaic_requested_for_float32_raises_before_compiling():
  q, k, v, table, lens, cu = prefill_inputs(3, q_lens=[10], ctx_lens=[0])
  with pytest.raises(ValueError, match="Mosaic GPU prefill supports"):
    gpu.paged_attention(q, k, v, table, lens, cu, block_sizes=MOSAIC, interpret=True)


def test_mosaic_interpret_needs_threads(monkeypatch):
  monkeypatch.setenv("NPROC", "2")
  with pytest.raises(RuntimeError, match="NPROC"):
    gpu._mosaic_interpret_params()


@pytest.mark.parametrize(
  "field,value",
  [
    ("prefill_kernel", "cuda"),
    ("mosaic_kv_tile", 32),
    ("mosaic_kv_tile", 64.0),
    ("mosaic_num_slots", 5),
    ("mosaic_tiles_per_block", 0),
    ("mosaic_tiles_per_block", 9),
  ],
)
def test_mosaic_block_sizes_validated(field, value):
  with pytest.raises(ValueError, match=field):
    gpu.BlockSizes(**{field: value})


def test_lane_dense_pools_give_the_plain_pools_result_bit_for_bit():
  # A lane-dense pool (kernels._layout, head_dim 64 in rows of 128) is the same row-major
  # bytes as the plain one: the GPU backend reads it through a reshape, so decode (default
  # and planned) and ragged give exactly what the plain pool gives.
  from kernels import _layout
  from kernels.gpu.plan import plan_decode

  rng = np.random.default_rng(40)
  bs, d = 16, 64
  lengths = np.array([1, 17, 40], np.int32)
  table = np.array([[3, -1, -1], [0, 5, -1], [1, 2, 4]], np.int32)
  k = jnp.asarray(rng.standard_normal((2, 6, bs, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 6, bs, d)), jnp.float32)
  dk, dv = _layout.pack(k), _layout.pack(v)
  q = jnp.asarray(rng.standard_normal((3, 6, d)), jnp.float32)
  run = functools.partial(kernels.paged_attention, backend="gpu", interpret=True, block_sizes=SMALL)
  dense = functools.partial(run, lane_dense=True)
  for extra in ({}, {"decode_plan": plan_decode(lengths, bs, 2, kv_tile=16)}):
    plain = run(q, k, v, table, lengths, **extra)
    np.testing.assert_array_equal(np.asarray(dense(q, dk, dv, table, lengths, **extra)), plain)
  cu = np.array([0, 1, 4, 6], np.int32)
  qr = jnp.asarray(rng.standard_normal((6, 6, d)), jnp.float32)
  plain = run(qr, k, v, table, lengths, cu)
  np.testing.assert_array_equal(np.asarray(dense(qr, dk, dv, table, lengths, cu)), plain)
  ref = kernels.paged_attention(
    qr, dk, dv, table, lengths, cu, backend="reference", lane_dense=True
  )
  # The GPU module called directly takes the plain layout only, and says so.
  with pytest.raises(ValueError, match="lane_dense"):
    gpu.paged_attention(qr, dk, dv, table, lengths, cu, interpret=True)
  assert rel_l2_error(np.asarray(plain), np.asarray(ref)) < _bound(jnp.float32)
