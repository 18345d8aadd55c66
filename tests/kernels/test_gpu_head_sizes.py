"""Head sizes that are not powers of two (80, 96, 112, 192; 48) on the Pallas GPU kernels.

The kernels compute them in tiles of the next power of two with the columns past head_dim
masked on every load and store (kernels/gpu/decode.py). Each kernel (split-K decode with
one and several splits, planned decode with its merge, ragged prefill) runs in interpret
mode against a float64 NumPy loop over positions, on caches whose unused blocks and
slots past each length are NaN (a padded column or a masked row that were read would
show). The lowering to Triton IR for an H200 is checked too (interpret mode does not
check that every masked gather has a Triton lowering), and the head-size rules of every
backend.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import gpu
from kernels._validate import head_dim_supported
from kernels.gpu.plan import plan_decode
from kernels.testing import rel_l2_error, tolerance

HQ, HKV = 4, 2
# 16-token steps and tiles, so that tiny sequences still take several steps (and splits).
SMALL = gpu.BlockSizes(
  decode_kv_tile=16,
  decode_num_stages=2,
  prefill_q_tile=16,
  prefill_kv_tile=16,
  prefill_num_warps=4,
  prefill_num_stages=2,
)


def make_cache(rng, lengths, *, block_size, head_dim, kv_dtype):
  """Shuffled block table for ``lengths`` with two spare blocks; every slot no length
  covers is NaN. Returns float32 pools (NaN kept) and the table, both as NumPy."""
  lengths = np.asarray(lengths, np.int32)
  need = -(-lengths // block_size)
  max_blocks = max(1, int(need.max()) + 1)  # a spare column, -1 in every row
  num_blocks = int(need.sum()) + 2
  ids = rng.permutation(num_blocks)
  table = np.full((len(lengths), max_blocks), kernels.INVALID_BLOCK, np.int32)
  shape = (HKV, num_blocks, block_size, head_dim)
  k = np.full(shape, np.nan, np.float32)
  v = np.full(shape, np.nan, np.float32)
  used = 0
  for b, length in enumerate(lengths):
    table[b, : need[b]] = ids[used : used + need[b]]
    used += need[b]
    for pos in range(length):
      blk, off = table[b, pos // block_size], pos % block_size
      k[:, blk, off] = rng.standard_normal((HKV, head_dim))
      v[:, blk, off] = rng.standard_normal((HKV, head_dim))
  return jnp.asarray(k, kv_dtype), jnp.asarray(v, kv_dtype), table, lengths


def quantize_with_poisoned_scales(k, v, kv_dtype):
  """8-bit rows and float32 scales of ``k``/``v``; the scales of unused slots are NaN."""
  kq, ks = kernels.quantize(jnp.nan_to_num(k), jnp.dtype(kv_dtype))
  vq, vs = kernels.quantize(jnp.nan_to_num(v), jnp.dtype(kv_dtype))
  dead = np.isnan(np.asarray(k, np.float32))[..., 0]
  return kq, vq, jnp.where(dead, jnp.nan, ks), jnp.where(dead, jnp.nan, vs)


def attention_float64(
  q, k, v, table, lengths, cu_q_lens=None, *, window=None, cap=None, ks=None, vs=None
):
  """Paged attention by a loop over sequences, query rows and heads, in float64 (decode
  when ``cu_q_lens`` is None: one query per sequence at position length - 1)."""
  qn, kn, vn = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  if ks is not None:
    kn = kn * np.asarray(ks, np.float64)[..., None]
    vn = vn * np.asarray(vs, np.float64)[..., None]
  block_size, head_dim = kn.shape[2], kn.shape[3]
  group = qn.shape[1] // kn.shape[0]
  cu = np.arange(len(lengths) + 1) if cu_q_lens is None else np.asarray(cu_q_lens)
  out = np.zeros(qn.shape, np.float64)
  for b, length in enumerate(np.asarray(lengths)):
    rows = range(int(cu[b]), int(cu[b + 1]))
    for i, row in enumerate(rows):
      pos = int(length) - len(rows) + i
      lo = 0 if window is None else max(pos - window + 1, 0)
      keys = np.arange(lo, pos + 1)
      if keys.size == 0:  # a decode row of length 0 sees nothing: zeros
        continue
      blk = table[b, keys // block_size]
      for hq in range(qn.shape[1]):
        h = hq // group
        kk, vv = kn[h, blk, keys % block_size], vn[h, blk, keys % block_size]
        s = kk @ qn[row, hq] * head_dim**-0.5
        if cap is not None:
          s = cap * np.tanh(s / cap)
        p = np.exp(s - s.max())
        out[row, hq] = p @ vv / p.sum()
  return out


def check(out, q, want, *, q_dtype, quantized=False):
  """``out`` has q's shape and dtype, no NaN, and is within the tolerance of ``want``."""
  assert out.shape == q.shape and out.dtype == q.dtype
  got = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  assert not np.isnan(got).any(), "NaN leaked into the output"
  if jnp.dtype(q_dtype) == jnp.float32:
    kind = "quantized_attention_vs_float64" if quantized else "attention_vs_float64"
    np.testing.assert_allclose(got, want, **tolerance(kind, jnp.float32))
  else:
    # bf16: probabilities rounded to bf16 before p @ V, and a bf16 output.
    kind = "quantized_gpu_vs_float64_rel_l2" if quantized else "attention_bf16_probs_rel_l2"
    assert rel_l2_error(got, want) < tolerance(kind, q_dtype).rtol


@pytest.mark.parametrize(
  "head_dim, q_dtype, kv_dtype, splits, window, cap",
  [
    (80, jnp.float32, jnp.float32, 1, None, None),
    (48, jnp.float32, jnp.float32, 2, None, None),  # any multiple of 16: 48 in 64-wide tiles
    (96, jnp.bfloat16, jnp.bfloat16, 3, None, None),
    (112, jnp.float32, jnp.bfloat16, 3, 20, 5.0),  # f32 q over bf16 K/V: f32 dots
    (192, jnp.bfloat16, jnp.bfloat16, 1, None, None),
  ],
)
def test_decode(head_dim, q_dtype, kv_dtype, splits, window, cap):
  rng = np.random.default_rng(head_dim)
  k, v, table, lens = make_cache(
    rng, [37, 0, 70, 1], block_size=16, head_dim=head_dim, kv_dtype=kv_dtype
  )
  q = jnp.asarray(rng.standard_normal((4, HQ, head_dim)), q_dtype)
  bsz = dataclasses.replace(SMALL, decode_num_splits=splits)
  out = gpu.paged_attention(
    q, k, v, table, lens, block_sizes=bsz, interpret=True, sliding_window=window,
    logit_soft_cap=cap,
  )  # fmt: skip
  want = attention_float64(q, k, v, table, lens, window=window, cap=cap)
  check(out, q, want, q_dtype=q_dtype)
  np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)  # length 0


@pytest.mark.parametrize(
  "head_dim, dtype",
  [(80, jnp.float32), (96, jnp.bfloat16), (112, jnp.bfloat16), (192, jnp.float32)],
)
def test_planned_decode(head_dim, dtype):
  # One row over several chunks (merged), rows in one chunk (written by their chunk's
  # programs), an empty row (zeros from the merge).
  rng = np.random.default_rng(head_dim + 1)
  lengths = [150, 3, 0, 40]
  k, v, table, lens = make_cache(rng, lengths, block_size=16, head_dim=head_dim, kv_dtype=dtype)
  q = jnp.asarray(rng.standard_normal((4, HQ, head_dim)), dtype)
  p = plan_decode(lens, 16, HKV, kv_tile=16, chunk_tokens=48)
  assert int(p.seq_num_chunks.max()) >= 2 and (p.seq_num_chunks == 1).any()
  out = kernels.paged_attention(
    q, k, v, table, lens, backend="gpu", interpret=True, block_sizes=SMALL, decode_plan=p
  )
  check(out, q, attention_float64(q, k, v, table, lens), q_dtype=dtype)
  np.testing.assert_array_equal(np.asarray(out[2], np.float32), 0.0)


@pytest.mark.parametrize(
  "head_dim, dtype",
  [(80, jnp.bfloat16), (96, jnp.float32), (112, jnp.float32), (192, jnp.bfloat16)],
)
def test_prefill(head_dim, dtype):
  # A full prefill, a chunk after cached context, a decode row, an empty sequence, then
  # three padding rows (zeros).
  rng = np.random.default_rng(head_dim + 2)
  q_lens, ctx = np.array([20, 9, 1, 0]), np.array([0, 25, 30, 0])
  k, v, table, lens = make_cache(rng, q_lens + ctx, block_size=8, head_dim=head_dim, kv_dtype=dtype)
  cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  q = jnp.asarray(rng.standard_normal((int(cu[-1]) + 3, HQ, head_dim)), dtype)
  out = gpu.paged_attention(q, k, v, table, lens, cu, block_sizes=SMALL, interpret=True)
  check(out, q, attention_float64(q, k, v, table, lens, cu), q_dtype=dtype)
  np.testing.assert_array_equal(np.asarray(out[int(cu[-1]) :], np.float32), 0.0)


@pytest.mark.parametrize(
  "kernel, head_dim, kv_dtype", [("decode", 96, "int8"), ("planned", 80, "float8_e4m3fn")]
)
def test_8bit_kv(kernel, head_dim, kv_dtype):
  rng = np.random.default_rng(head_dim + 3)
  k, v, table, lens = make_cache(
    rng, [90, 1, 33], block_size=16, head_dim=head_dim, kv_dtype=jnp.float32
  )
  kq, vq, ks, vs = quantize_with_poisoned_scales(k, v, kv_dtype)
  q = jnp.asarray(rng.standard_normal((3, HQ, head_dim)), jnp.bfloat16)
  extra = {}
  if kernel == "planned":
    extra["decode_plan"] = plan_decode(lens, 16, HKV, kv_tile=16, chunk_tokens=32)
  else:
    extra["block_sizes"] = dataclasses.replace(SMALL, decode_num_splits=2)
  out = kernels.paged_attention(
    q, kq, vq, table, lens, backend="gpu", interpret=True, k_scales=ks, v_scales=vs,
    **{"block_sizes": SMALL, **extra},
  )  # fmt: skip
  want = attention_float64(q, kq, vq, table, lens, ks=ks, vs=vs)
  check(out, q, want, q_dtype=jnp.bfloat16, quantized=True)


@pytest.mark.parametrize("head_dim", [80, 192])
def test_padded_kernels_lower_to_triton_ir_for_an_h200(monkeypatch, head_dim):
  # As test_gpu_plan's lowering test: an H200's compute capability stubbed (a private JAX
  # module, pinned to jax 0.11), every kernel of a padded head size lowered to Triton IR
  # with the default settings (split-K decode with one and several splits, planned decode
  # and merge, prefill).
  from jax._src.pallas.triton import gpu_info, pallas_call_registration

  info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: info)
  lengths = np.array([300, 5, 1000, 0], np.int32)
  need = -(-lengths // 16)
  table = np.full((4, int(need.max())), -1, np.int32)
  table[np.arange(table.shape[1])[None] < need[:, None]] = np.arange(int(need.sum()))
  kv = jax.ShapeDtypeStruct((8, int(need.sum()) + 1, 16, head_dim), jnp.bfloat16)
  tb, ln = jnp.asarray(table), jnp.asarray(lengths)

  def text(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

  q = jax.ShapeDtypeStruct((4, 32, head_dim), jnp.bfloat16)
  for splits in (1, 4):
    bsz = gpu.BlockSizes(decode_num_splits=splits)
    got = text(lambda *a, bsz=bsz: gpu.paged_attention(*a, block_sizes=bsz), q, kv, kv, tb, ln)
    assert f"_s{splits}" in got and "paxcache_paged_decode" in got
  p = plan_decode(lengths, 16, 8)
  got = text(lambda *a: gpu.paged_attention(*a[:5], decode_plan=a[5]), q, kv, kv, tb, ln, p)
  assert "paxcache_planned_decode_bs16" in got and "paxcache_planned_decode_merge" in got
  qp = jax.ShapeDtypeStruct((64, 32, head_dim), jnp.bfloat16)
  cu = jnp.array([0, 30, 31, 40, 40], jnp.int32)
  assert "paxcache_paged_prefill" in text(gpu.paged_attention, qp, kv, kv, tb, ln, cu)


def test_head_size_rules_of_each_backend():
  for d in (16, 48, 64, 80, 96, 112, 128, 160, 192, 208, 256):
    assert head_dim_supported(d, "gpu")
  for d in (0, 8, 40, 72, 100, 264, 272, 384, 512):
    assert not head_dim_supported(d, "gpu")
  for d in (128, 256, 384, 512):
    assert head_dim_supported(d, "tpu")
  for d in (16, 64, 80, 96, 112, 192, 200):
    assert not head_dim_supported(d, "tpu")
  assert all(head_dim_supported(d, "reference") for d in (1, 7, 64, 80, 1000))
  # The errors name the head_dim and the rule, before anything compiles.
  for backend, d, rule in [
    ("gpu", 72, "a multiple of 16 up to 256"),
    ("gpu", 512, "a multiple of 16 up to 256"),
    ("tpu", 64, "a multiple of 128"),
    ("tpu", 192, "a multiple of 128"),
  ]:
    q = jnp.zeros((2, 4, d), jnp.float32)
    k = jnp.zeros((2, 4, 16, d), jnp.float32)
    args = (q, k, k, jnp.zeros((2, 2), jnp.int32), jnp.zeros((2,), jnp.int32))
    with pytest.raises(
      ValueError, match=rf"{backend.upper()} backend: head_dim must be {rule}.*head_dim {d}"
    ):
      kernels.paged_attention(*args, backend=backend, interpret=True)


def test_tiles_are_sized_by_the_padded_width_and_mosaic_is_not_chosen():
  # default_block_sizes sizes shared memory and registers by the tile width: head_dim 80,
  # 96 and 112 get the settings of 128, and 192 those of 256.
  for d, width in ((80, 128), (96, 128), (112, 128), (192, 256)):
    assert gpu.padded_head_dim(d) == width
    for kv_dtype in (jnp.bfloat16, jnp.float32):
      for kw in (dict(), dict(batch=64, num_kv_heads=8), dict(num_tokens=40, decode=False)):
        got = gpu.default_block_sizes(head_dim=d, kv_dtype=kv_dtype, **kw)
        assert got == gpu.default_block_sizes(head_dim=width, kv_dtype=kv_dtype, **kw)
  # The Mosaic GPU prefill takes head_dim 64 and 128 only: "auto" keeps the others on
  # Triton, and asking for Mosaic is a clear error.
  kw = dict(q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16, block_size=16, num_tokens=4096, batch=4)
  assert gpu.kernel_backend("prefill", head_dim=96, **kw) == "triton"
  with pytest.raises(ValueError, match="Mosaic GPU prefill supports .*head_dim 96"):
    gpu.kernel_backend("prefill", head_dim=96, requested="mosaic", interpret=True, **kw)


def test_cascade_keeps_the_unpadded_head_sizes_on_gpu():
  # The GPU cascade's shared-prefix kernel does not pad the head dim (kernels/gpu/cascade.py
  # builds its tiles head_dim wide): it keeps 64, 128 and 256 and refuses 96 by name, where
  # paged_attention takes 96.
  rng = np.random.default_rng(9)
  table = np.array([[0, 1], [0, 2]], np.int32)
  lengths = np.array([6, 7], np.int32)
  plan = kernels.plan_cascade(table, lengths, 4)
  for d, ok in ((96, False), (64, True)):
    pool = jnp.asarray(rng.standard_normal((1, 3, 4, d)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 2, d)), jnp.float32)
    args = dict(q=q, k_blocks=pool, v_blocks=pool, block_table=table, lengths=lengths)
    if ok:
      out = kernels.cascade_attention(**args, plan=plan, backend="gpu", interpret=True)
      check(out, q, attention_float64(q, pool, pool, table, lengths), q_dtype=jnp.float32)
    else:
      with pytest.raises(
        ValueError, match=r"head_dim must be one of \(64, 128, 256\) .*head_dim 96"
      ):
        kernels.cascade_attention(**args, plan=plan, backend="gpu", interpret=True)
      out = kernels.paged_attention(**args, backend="gpu", interpret=True)
      want = attention_float64(q, pool, pool, table, lengths)
      check(out, q, want, q_dtype=jnp.float32)
