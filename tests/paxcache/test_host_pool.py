"""HostKVPool's block-major storage: swaps against a NumPy model of the layer-major pool.

The reference keeps the documented layout, ``[num_layers, num_kv_heads, num_host_blocks,
block_size, head_dim]``, as plain NumPy arrays and indexes it the way the pool was indexed
before its storage became block-major (``ref[:, :, host_ids] = device[:, :, device_ids]``);
every swap must leave the pool and the cache bit for bit equal to it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from paxcache.cache import HostKVPool, PagedKVCache, swap_in, swap_out

L, H, NUM_BLOCKS, BS, D = 2, 3, 7, 4, 8
NUM_HOST_BLOCKS = 9
DTYPES = [
  pytest.param(jnp.float32, id="f32"),
  pytest.param(jnp.bfloat16, id="bf16"),
  pytest.param(jnp.int8, id="int8"),
]


def _bits(x) -> np.ndarray:
  x = np.asarray(x)
  return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _random_cache(rng, dtype) -> PagedKVCache:
  shape = (L, H, NUM_BLOCKS, BS, D)
  if jnp.dtype(dtype) == jnp.int8:
    k, v = (jnp.asarray(rng.integers(-127, 128, shape), jnp.int8) for _ in range(2))
    ks, vs = (jnp.asarray(rng.uniform(0.1, 2.0, shape[:4]), jnp.float32) for _ in range(2))
    return PagedKVCache.from_stacked(k, v, ks, vs)
  k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
  return PagedKVCache.from_stacked(k, v)


def _device(cache) -> list[np.ndarray]:
  """The cache's pools as layer-major NumPy arrays: k, v (and the scales)."""
  kinds = [cache.k, cache.v] + ([cache.k_scale, cache.v_scale] if cache.quantized else [])
  return [np.stack([np.asarray(p) for p in pools]) for pools in kinds]


def _host(host) -> list[np.ndarray]:
  return [host.k, host.v] + ([host.k_scale, host.v_scale] if host.k_scale is not None else [])


def _stale_host(rng, cache) -> HostKVPool:
  """A pool of the cache's shape filled with random contents through its public views."""
  host = HostKVPool.like(cache, NUM_HOST_BLOCKS)
  for view in _host(host):
    if view.dtype == np.int8:
      view[...] = rng.integers(-127, 128, view.shape)
    else:
      view[...] = rng.standard_normal(view.shape).astype(view.dtype)
  return host


def _assert_all_bits_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want, strict=True):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_array_equal(_bits(g), _bits(w))


@pytest.mark.parametrize("dtype", DTYPES)
def test_storage_is_block_major_and_the_documented_views_share_it(dtype):
  host = HostKVPool.create(L, H, NUM_HOST_BLOCKS, BS, D, dtype)
  kv = host._kv
  assert kv.shape == (NUM_HOST_BLOCKS, 2, L, H, BS, D) and kv.flags.c_contiguous
  assert host.k.shape == host.v.shape == (L, H, NUM_HOST_BLOCKS, BS, D)
  assert host.k.base is kv and host.v.base is kv  # views, not copies
  assert host.num_host_blocks == NUM_HOST_BLOCKS
  # Host block b of the documented layout is one contiguous slab of the storage.
  host.k[:, :, 5] = 1
  host.v[:, :, 5] = 2
  assert (kv[5, 0] == 1).all() and (kv[5, 1] == 2).all() and not kv[:5].any()
  if jnp.dtype(dtype) == jnp.int8:
    assert host._scales.shape == (NUM_HOST_BLOCKS, 2, L, H, BS)
    assert host.k_scale.base is host._scales and host.k_scale.shape == (L, H, NUM_HOST_BLOCKS, BS)
  else:
    assert host._scales is None and host.k_scale is None and host.v_scale is None


# "pinned" stages through JAX's pinned host memory, which the CPU backend has too, so the
# path a GPU takes by default ("auto") runs here against the same reference.
@pytest.mark.parametrize("staging", ["auto", "direct", "pinned"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_swaps_match_the_layer_major_reference(dtype, staging):
  rng = np.random.default_rng(40)
  cache = _random_cache(rng, dtype)
  host = _stale_host(rng, cache)
  dev_ref = [x.copy() for x in _device(cache)]
  host_ref = [x.copy() for x in _host(host)]
  for _ in range(4):
    n = int(rng.integers(1, 6))
    # swap_out: sources may repeat, host destinations are distinct.
    device_ids = rng.integers(0, NUM_BLOCKS, n)
    host_ids = rng.permutation(NUM_HOST_BLOCKS)[:n]
    swap_out(cache, host, device_ids, host_ids, staging=staging)
    for h, d in zip(host_ref, dev_ref, strict=True):
      h[:, :, host_ids] = d[:, :, device_ids]
    _assert_all_bits_equal(_host(host), host_ref)
    _assert_all_bits_equal(_device(cache), dev_ref)  # swap_out leaves the cache alone

    # swap_in: host sources may repeat, device destinations are distinct.
    n = int(rng.integers(1, 6))
    host_ids = rng.integers(0, NUM_HOST_BLOCKS, n)
    device_ids = rng.permutation(NUM_BLOCKS)[:n]
    cache = swap_in(cache, host, host_ids, device_ids, staging=staging)
    for h, d in zip(host_ref, dev_ref, strict=True):
      d[:, :, device_ids] = h[:, :, host_ids]
    _assert_all_bits_equal(_device(cache), dev_ref)
    _assert_all_bits_equal(_host(host), host_ref)  # swap_in leaves the pool alone


BAD_IDS = [
  # (function, ids as the function takes them, match)
  ("out", ([0, NUM_BLOCKS], [1, 2]), rf"device_ids \[{NUM_BLOCKS}\] out of range"),
  ("out", ([0, 1], [1, NUM_HOST_BLOCKS]), rf"host_ids \[{NUM_HOST_BLOCKS}\] out of range"),
  ("out", ([0, 1], [3, 3]), r"host_ids has repeated ids \[3\]"),
  ("out", ([0, 1, 2], [3, 4]), r"must have one shape"),
  ("in", ([1, -1], [0, 2]), r"host_ids \[-1\] out of range"),
  ("in", ([1, 2], [4, 4]), r"device_ids has repeated ids \[4\]"),
  ("in", ([[1]], [[2]]), r"must be a 1-D integer array"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which,ids,match", BAD_IDS)
def test_bad_ids_leave_pool_and_cache_untouched(dtype, which, ids, match):
  rng = np.random.default_rng(41)
  cache = _random_cache(rng, dtype)
  host = _stale_host(rng, cache)
  dev_before = [x.copy() for x in _device(cache)]
  storage = [host._kv.copy()] + ([host._scales.copy()] if host._scales is not None else [])
  with pytest.raises(ValueError, match=match):
    if which == "out":
      swap_out(cache, host, *ids)
    else:
      swap_in(cache, host, *ids)
  after = [host._kv] + ([host._scales] if host._scales is not None else [])
  _assert_all_bits_equal(after, storage)
  assert not any(p.is_deleted() for p in cache.k + cache.v)  # not donated
  _assert_all_bits_equal(_device(cache), dev_before)


def test_constructor_shares_its_own_views_and_copies_other_arrays():
  rng = np.random.default_rng(42)
  pool = HostKVPool.create(L, H, NUM_HOST_BLOCKS, BS, D, jnp.int8)
  again = HostKVPool(pool.k, pool.v, pool.k_scale, pool.v_scale)
  assert again._kv is pool._kv and again._scales is pool._scales

  # Plain layer-major arrays (and non-contiguous ones) are copied into block-major storage.
  shape = (L, H, NUM_HOST_BLOCKS, BS, D)
  k = rng.standard_normal(shape).astype(np.float32)
  v = np.asfortranarray(rng.standard_normal(shape).astype(np.float32))
  host = HostKVPool(k, v)
  assert host._kv.flags.c_contiguous and not np.shares_memory(host._kv, k)
  np.testing.assert_array_equal(host.k, k)
  np.testing.assert_array_equal(host.v, v)
  np.testing.assert_array_equal(host._kv[4, 1], v[:, :, 4])
  # Views of two different pools are not one storage: copied as well.
  a, b = HostKVPool.create(*shape), HostKVPool.create(*shape)
  mixed = HostKVPool(a.k, b.v)
  assert not np.shares_memory(mixed._kv, a._kv) and not np.shares_memory(mixed._kv, b._kv)


def test_bad_staging_is_refused_before_anything_moves():
  rng = np.random.default_rng(41)
  cache = _random_cache(rng, jnp.float32)
  host = _stale_host(rng, cache)
  dev_before, host_before = [x.copy() for x in _device(cache)], [x.copy() for x in _host(host)]
  with pytest.raises(ValueError, match=r"staging must be one of \('auto', 'pinned', 'direct'\)"):
    swap_out(cache, host, [0], [1], staging="pageable")
  with pytest.raises(ValueError, match="staging must be one of"):
    swap_in(cache, host, [1], [0], staging="")
  _assert_all_bits_equal(_device(cache), dev_before)
  _assert_all_bits_equal(_host(host), host_before)
