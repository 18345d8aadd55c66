"""8-bit caches: the scale pools are written with their rows and move with their blocks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from paxcache.cache import HostKVPool, PagedKVCache, copy_blocks, swap_in, swap_out, write

L, H, NUM_BLOCKS, BS, D = 2, 2, 6, 4, 8
QDTYPES = [pytest.param(jnp.int8, id="int8"), pytest.param(jnp.float8_e4m3fn, id="fp8")]


def random_cache(rng, dtype) -> PagedKVCache:
  shape = (L, H, NUM_BLOCKS, BS, D)
  kq, ks = kernels.quantize(jnp.asarray(rng.standard_normal(shape), jnp.float32), dtype)
  vq, vs = kernels.quantize(jnp.asarray(rng.standard_normal(shape) * 3, jnp.float32), dtype)
  return PagedKVCache.from_stacked(kq, vq, ks, vs)


def snapshot(cache):
  """Raw bytes of every pool (8-bit as uint8, scales as uint32: exact, NaN-safe)."""
  as8 = lambda ps: np.stack([np.asarray(p).view(np.uint8) for p in ps])
  as32 = lambda ps: np.stack([np.asarray(p).view(np.uint32) for p in ps])
  return as8(cache.k), as8(cache.v), as32(cache.k_scale), as32(cache.v_scale)


@pytest.mark.parametrize("dtype", QDTYPES)
def test_create_has_scale_pools_and_float_caches_have_none(dtype):
  cache = PagedKVCache.create(L, H, NUM_BLOCKS, BS, D, dtype)
  assert cache.quantized and cache.dtype == jnp.dtype(dtype)
  assert len(cache.k_scale) == len(cache.v_scale) == L
  for s in cache.k_scale + cache.v_scale:
    assert s.shape == (H, NUM_BLOCKS, BS) and s.dtype == jnp.float32
  assert set(cache.scales(1)) == {"k_scales", "v_scales"}
  plain = PagedKVCache.create(L, H, NUM_BLOCKS, BS, D, jnp.bfloat16)
  assert not plain.quantized and plain.k_scale == () and plain.scales(0) == {}
  with pytest.raises(ValueError, match="int8, float8_e4m3fn, got int32"):
    PagedKVCache.create(L, H, NUM_BLOCKS, BS, D, jnp.int32)


@pytest.mark.parametrize("dtype", QDTYPES)
def test_write_quantizes_rows_and_their_scales_into_the_slots(dtype):
  rng = np.random.default_rng(0)
  cache = random_cache(rng, dtype)
  before = snapshot(cache)
  k_new = jnp.asarray(rng.standard_normal((3, H, D)) * 5, jnp.float32)
  v_new = jnp.asarray(rng.standard_normal((3, H, D)), jnp.float32)
  slots = np.array([7, -1, 20], np.int32)  # block 1 slot 3, padding, block 5 slot 0
  cache = write(cache, 1, k_new, v_new, slots)
  after = snapshot(cache)
  kq, ks = kernels.quantize(k_new, dtype)
  vq, vs = kernels.quantize(v_new, dtype)
  for row, slot in ((0, 7), (2, 20)):
    b, i = divmod(slot, BS)
    np.testing.assert_array_equal(
      np.asarray(cache.k[1][:, b, i]).view(np.uint8), np.asarray(kq[row]).view(np.uint8)
    )
    np.testing.assert_array_equal(
      np.asarray(cache.v[1][:, b, i]).view(np.uint8), np.asarray(vq[row]).view(np.uint8)
    )
    np.testing.assert_array_equal(np.asarray(cache.k_scale[1][:, b, i]), np.asarray(ks[row]))
    np.testing.assert_array_equal(np.asarray(cache.v_scale[1][:, b, i]), np.asarray(vs[row]))
  # Nothing else moved: layer 0 entirely, and layer 1 outside the two slots.
  for x, y in zip(before, after, strict=True):
    np.testing.assert_array_equal(x[0], y[0])
    flat_x = x[1].reshape(H, NUM_BLOCKS * BS, -1)
    flat_y = y[1].reshape(H, NUM_BLOCKS * BS, -1)
    keep = np.ones(NUM_BLOCKS * BS, bool)
    keep[[7, 20]] = False
    np.testing.assert_array_equal(flat_x[:, keep], flat_y[:, keep])


@pytest.mark.parametrize("dtype", QDTYPES)
def test_copy_on_write_copies_the_scales_with_the_block(dtype):
  rng = np.random.default_rng(1)
  cache = random_cache(rng, dtype)
  before = snapshot(cache)
  cache = copy_blocks(cache, np.array([2, 4, -1]), np.array([5, 0, -1]))
  after = snapshot(cache)
  for x, y in zip(before, after, strict=True):
    np.testing.assert_array_equal(y[:, :, 5], x[:, :, 2])
    np.testing.assert_array_equal(y[:, :, 0], x[:, :, 4])
    np.testing.assert_array_equal(y[:, :, [1, 2, 3, 4]], x[:, :, [1, 2, 3, 4]])


@pytest.mark.parametrize("dtype", QDTYPES)
def test_swap_out_and_in_to_other_blocks_keeps_the_scales(dtype):
  rng = np.random.default_rng(2)
  cache = random_cache(rng, dtype)
  before = snapshot(cache)
  host = HostKVPool.like(cache, 4)
  assert host.k.dtype == jnp.dtype(dtype) and host.k_scale.shape == (L, H, 4, BS)
  swap_out(cache, host, np.array([1, 3]), np.array([2, 0]))
  np.testing.assert_array_equal(host.k_scale[:, :, 2].view(np.uint32), before[2][:, :, 1])
  cache = swap_in(cache, host, np.array([2, 0]), np.array([4, 5]))
  after = snapshot(cache)
  for x, y in zip(before, after, strict=True):
    np.testing.assert_array_equal(y[:, :, 4], x[:, :, 1])
    np.testing.assert_array_equal(y[:, :, 5], x[:, :, 3])
    np.testing.assert_array_equal(y[:, :, :4], x[:, :, :4])


def test_attention_reads_a_copied_block_like_its_source():
  """Through the kernel: a sequence whose table points at the copy attends as one
  pointing at the original (the copy's scales are the original's)."""
  rng = np.random.default_rng(3)
  cache = random_cache(rng, jnp.int8)
  cache = copy_blocks(cache, np.array([2]), np.array([5]))
  q = jnp.asarray(rng.standard_normal((2, 2 * H, D)), jnp.float32)
  table = jnp.asarray([[1, 2], [1, 5]], jnp.int32)
  lengths = jnp.asarray([7, 7], jnp.int32)
  out = kernels.paged_attention(
    q[:1].repeat(2, 0), *cache.layer(0), table, lengths, **cache.scales(0)
  )
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(out[1]))
  # ... and dropping the scales is refused.
  with pytest.raises(ValueError, match="k_scales is required"):
    kernels.paged_attention(q, *cache.layer(0), table, lengths)


def test_inconsistent_scale_pools_are_refused():
  rng = np.random.default_rng(4)
  cache = random_cache(rng, jnp.int8)
  with pytest.raises(ValueError, match="cache.k_scale"):
    write(
      cache.replace(k_scale=cache.k_scale[:1]),
      0,
      jnp.zeros((1, H, D)),
      jnp.zeros((1, H, D)),
      np.array([0], np.int32),
    )
  with pytest.raises(ValueError, match="v_scale"):
    HostKVPool(
      np.zeros((L, H, 2, BS, D), np.int8),
      np.zeros((L, H, 2, BS, D), np.int8),
      np.zeros((L, H, 2, BS), np.float32),
    )


def test_from_stacked_takes_8bit_pools_with_both_scales_only():
  """8-bit k, v without scales made a cache whose first kernel call failed with an
  IndexError; one scale alone failed inside jnp.asarray(None). Float pools take none."""
  rng = np.random.default_rng(5)
  k = rng.standard_normal((L, H, 3, BS, D)).astype(np.float32)
  kq, ks = kernels.quantize(jnp.asarray(k), jnp.int8)
  with pytest.raises(
    ValueError, match=r"int8 k and v need both k_scale and v_scale.*None, v_scale None"
  ):
    PagedKVCache.from_stacked(kq, kq)
  with pytest.raises(ValueError, match=r"k_scale given, v_scale None"):
    PagedKVCache.from_stacked(kq, kq, ks)
  with pytest.raises(ValueError, match=r"float32 k and v take neither of k_scale and v_scale"):
    PagedKVCache.from_stacked(k, k, ks, ks)
  cache = PagedKVCache.from_stacked(kq, kq, ks, ks)
  assert cache.quantized and len(cache.k_scale) == L
  np.testing.assert_array_equal(np.asarray(cache.k_scale[1]), np.asarray(ks[1]))


def test_dtype_none_and_bad_counts_are_named():
  # jnp.dtype(None) is float64: the message named a dtype nobody passed
  with pytest.raises(ValueError, match=r"kv_dtype must be one of .*, got None"):
    kernels.check_kv_dtype(None)
  with pytest.raises(ValueError, match=r"got None"):
    PagedKVCache.create(1, H, 4, BS, D, None)
  assert kernels.kv_bytes_per_token(2, 3, 64, jnp.int8) == 2 * 2 * 3 * (64 + 4)
  for args, name in (((-1, 2, 128), "num_layers"), ((2, 2.5, 128), "num_kv_heads"),
                     ((2, 2, 0), "head_dim"), ((True, 2, 8), "num_layers")):  # fmt: skip
    with pytest.raises(ValueError, match=rf"kv_bytes_per_token: {name} must be an int >= 1"):
      kernels.kv_bytes_per_token(*args, jnp.bfloat16)
