"""PagedKVCache and the host pool: write, copy-on-write and swap, checked bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from paxcache.cache import HostKVPool, PagedKVCache, copy_blocks, swap_in, swap_out, write

L, H, NUM_BLOCKS, BS, D = 3, 2, 8, 4, 8
NUM_HOST_BLOCKS = 6


def _bits(x):
  """Raw bits, so that equality is exact (NaN payloads, -0.0) rather than numeric."""
  x = np.asarray(x)
  return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def assert_bits_equal(a, b):
  np.testing.assert_array_equal(_bits(a), _bits(b))


def random_cache(rng, dtype=jnp.float32) -> PagedKVCache:
  shape = (L, H, NUM_BLOCKS, BS, D)
  return PagedKVCache.from_stacked(
    jnp.asarray(rng.standard_normal(shape), dtype), jnp.asarray(rng.standard_normal(shape), dtype)
  )


def stk(pools) -> np.ndarray:
  """One 5-D NumPy array ``[L, H, blocks, BS, D]`` from a cache's per-layer pools."""
  return np.stack([np.asarray(p) for p in pools])


def host_copy(cache):
  """NumPy copies of k and v (taken before a donating call consumes the cache)."""
  return stk(cache.k), stk(cache.v)


def deleted(pools) -> bool:
  return any(p.is_deleted() for p in pools)


# ---------------------------------------------------------------------------------------------
# The pytree.


def test_create_has_the_documented_layout():
  cache = PagedKVCache.create(L, H, NUM_BLOCKS, BS, D, jnp.bfloat16)
  assert len(cache.k) == len(cache.v) == L  # one buffer per layer
  for pool in cache.k + cache.v:
    assert pool.shape == (H, NUM_BLOCKS, BS, D) and pool.dtype == jnp.bfloat16
  assert len({p.unsafe_buffer_pointer() for p in cache.k + cache.v}) == 2 * L  # not views
  sizes = (cache.num_layers, cache.num_kv_heads, cache.num_blocks, cache.block_size)
  assert sizes + (cache.head_dim,) == (L, H, NUM_BLOCKS, BS, D)
  k1, v1 = cache.layer(1)
  assert k1.shape == (H, NUM_BLOCKS, BS, D) and v1.shape == k1.shape


@pytest.mark.parametrize(
  "args,match",
  [
    ((0, H, NUM_BLOCKS, BS, D, jnp.float32), r"num_layers must be a positive int, got 0"),
    ((L, H, -1, BS, D, jnp.float32), r"num_blocks must be a positive int, got -1"),
    ((L, H, NUM_BLOCKS, 2.0, D, jnp.float32), r"block_size must be a positive int, got 2.0"),
    (
      (L, H, NUM_BLOCKS, BS, D, jnp.int32),
      r"dtype must be one of float32, bfloat16, float16, int8, float8_e4m3fn, got int32",
    ),
    # Floating, but no kernel reads them: refused here, not at the first attention call.
    ((L, H, NUM_BLOCKS, BS, D, jnp.float8_e5m2), r"dtype must be one of .*, got float8_e5m2"),
    ((L, H, NUM_BLOCKS, BS, D, jnp.float64), r"dtype must be one of .*, got float64"),
    ((L, H, NUM_BLOCKS, BS, D, "int4x"), r"dtype must be one of .*, got 'int4x'"),
  ],
)
def test_create_rejects_bad_sizes(args, match):
  with pytest.raises(ValueError, match=match):
    PagedKVCache.create(*args)


def test_cache_is_a_pytree_of_two_arrays_per_layer_through_jit():
  rng = np.random.default_rng(20)
  cache = random_cache(rng)
  assert len(jax.tree.leaves(cache)) == 2 * L
  doubled = jax.jit(lambda c: jax.tree.map(lambda x: 2 * x, c))(cache)
  assert isinstance(doubled, PagedKVCache)
  np.testing.assert_array_equal(stk(doubled.v), 2 * stk(cache.v))
  k, v = doubled.stacked()
  assert k.shape == (L, H, NUM_BLOCKS, BS, D)
  np.testing.assert_array_equal(np.asarray(k), stk(doubled.k))


def test_from_stacked_and_check_reject_bad_layouts():
  with pytest.raises(ValueError, match=r"k and v must both be \[num_layers"):
    PagedKVCache.from_stacked(np.zeros((H, NUM_BLOCKS, BS, D)), np.zeros((H, NUM_BLOCKS, BS, D)))
  k = jnp.zeros((H, NUM_BLOCKS, BS, D))
  bad = PagedKVCache(
    k=(k, jnp.zeros((H, NUM_BLOCKS + 1, BS, D))), v=(jnp.zeros_like(k), jnp.zeros_like(k))
  )
  with pytest.raises(ValueError, match=r"cache.k\[1\] must be .* like cache.k\[0\]"):
    write(bad, 0, jnp.zeros((1, H, D)), jnp.zeros((1, H, D)), np.zeros(1, np.int32))
  with pytest.raises(ValueError, match=r"tuples of one array per layer"):
    write(PagedKVCache(k=jnp.zeros((L, H, NUM_BLOCKS, BS, D)), v=k), 0, k, k, k)


# ---------------------------------------------------------------------------------------------
# write.


def write_loop(k, v, layer, k_new, v_new, slot_mapping):
  """Float NumPy model of a write: one token at a time into ``layer`` only."""
  k, v = np.array(k), np.array(v)
  for t, slot in enumerate(np.asarray(slot_mapping)):
    if slot == kernels.INVALID_SLOT:
      continue
    block, offset = divmod(int(slot), BS)
    k[layer, :, block, offset] = np.asarray(k_new[t]).astype(k.dtype)
    v[layer, :, block, offset] = np.asarray(v_new[t]).astype(v.dtype)
  return k, v


def _new_tokens(rng, num_tokens, dtype=jnp.float32):
  k_new = jnp.asarray(rng.standard_normal((num_tokens, H, D)), dtype)
  v_new = jnp.asarray(rng.standard_normal((num_tokens, H, D)), dtype)
  slots = rng.choice(NUM_BLOCKS * BS, size=num_tokens, replace=False).astype(np.int32)
  slots[::3] = kernels.INVALID_SLOT
  return k_new, v_new, jnp.asarray(slots)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("layer", [0, L - 1])
def test_write_matches_loop_and_write_kv_on_the_layer(layer, dtype):
  rng = np.random.default_rng(21)
  cache = random_cache(rng, dtype)
  k_new, v_new, slots = _new_tokens(rng, 7, jnp.float32)  # float32 into the pool's dtype
  k0, v0 = host_copy(cache)
  # The kernel-level write of the same layer: write must agree with it exactly.
  kernel_k, kernel_v = kernels.write_kv(cache.k[layer], cache.v[layer], k_new, v_new, slots)
  want_k, want_v = write_loop(k0, v0, layer, k_new, v_new, slots)

  new = write(cache, layer, k_new, v_new, slots)
  assert new.dtype == dtype
  assert_bits_equal(new.k, want_k)
  assert_bits_equal(new.v, want_v)
  assert_bits_equal(new.k[layer], kernel_k)
  assert_bits_equal(new.v[layer], kernel_v)
  others = [i for i in range(L) if i != layer]
  assert_bits_equal(stk(new.k)[others], k0[others])  # other layers untouched


def test_write_refuses_a_traced_layer():
  """Each layer is its own buffer, picked at trace time: a traced index cannot pick one."""
  rng = np.random.default_rng(22)
  cache = random_cache(rng)
  k_new = jnp.zeros((2, H, D))
  slots = jnp.asarray([9, -1], jnp.int32)

  @jax.jit
  def step(cache, layer):
    return write(cache, layer, k_new, k_new, slots)

  with pytest.raises(ValueError, match=r"layer must be a Python int"):
    step(cache, jnp.int32(1))


def test_write_padding_only_changes_nothing():
  rng = np.random.default_rng(23)
  cache = random_cache(rng)
  k0, v0 = host_copy(cache)
  k_new, v_new, _ = _new_tokens(rng, 3)
  new = write(cache, 1, k_new, v_new, jnp.full((3,), kernels.INVALID_SLOT, jnp.int32))
  assert_bits_equal(new.k, k0)
  assert_bits_equal(new.v, v0)


@pytest.mark.parametrize(
  "change,match",
  [
    (dict(layer=L), rf"layer {L} out of range for a cache of {L} layers"),
    (dict(layer=-1), r"layer -1 out of range"),
    (dict(layer=1.0), r"layer must be a Python int"),
    (dict(k_new=jnp.zeros((3, H + 1, D))), r"k_new must be \[num_tokens, 2, 8\].*\(3, 3, 8\)"),
    (dict(v_new=jnp.zeros((3, H, D + 1))), r"v_new must be \[num_tokens, 2, 8\].*\(3, 2, 9\)"),
    (dict(v_new=jnp.zeros((2, H, D))), r"k_new \(3, 2, 8\) float32 and v_new \(2, 2, 8\)"),
    (dict(k_new=jnp.zeros((3, H, D), jnp.int32)), r"k_new must be a float array"),
    (dict(slot_mapping=jnp.zeros((4,), jnp.int32)), r"slot_mapping must be int32 \[3\]"),
    (dict(slot_mapping=np.zeros((3,), np.int64)), r"slot_mapping must be int32 .*int64"),
    (dict(slot_mapping=np.array([0, 32, -1], np.int32)), r"slot_mapping \[32\] out of range"),
    (dict(slot_mapping=np.array([5, -1, 5], np.int32)), r"slot_mapping has repeated ids \[5\]"),
    (dict(slot_mapping=[0, 1, 2]), r"slot_mapping must be a JAX or NumPy array, got list"),
    (dict(k_new=[[0.0]]), r"k_new must be a JAX or NumPy array, got list"),
  ],
  ids=lambda x: "-".join(x) if isinstance(x, dict) else None,
)
def test_write_rejects_bad_inputs_and_leaves_the_cache_valid(change, match):
  rng = np.random.default_rng(24)
  cache = random_cache(rng)
  k0, _ = host_copy(cache)
  args = dict(layer=1, k_new=jnp.zeros((3, H, D)), v_new=jnp.zeros((3, H, D)))
  args["slot_mapping"] = jnp.asarray([0, 1, 2], jnp.int32)
  args.update(change)
  with pytest.raises(ValueError, match=match):
    write(cache, **args)
  assert not deleted(cache.k)  # nothing was donated before the check
  assert_bits_equal(cache.k, k0)


# ---------------------------------------------------------------------------------------------
# Copy-on-write.


def test_copy_on_write_leaves_the_sharer_bit_identical():
  """Two sequences share block a; the writer gets a copy b, writes its token there, and the
  sharer's block a (every layer, every head) does not change by a single bit."""
  rng = np.random.default_rng(25)
  cache = random_cache(rng, jnp.bfloat16)
  a, b = 5, 2
  k0, v0 = host_copy(cache)
  cache = copy_blocks(cache, np.array([a, -1], np.int32), np.array([b, -1], np.int32))
  assert_bits_equal(stk(cache.k)[:, :, b], k0[:, :, a])  # the copy is exact
  assert_bits_equal(stk(cache.v)[:, :, b], v0[:, :, a])
  # The writer appends its token at offset 3 of its copy, in every layer.
  k_new = jnp.asarray(rng.standard_normal((1, H, D)), jnp.bfloat16)
  slot = jnp.asarray([b * BS + 3], jnp.int32)
  for layer in range(L):
    cache = write(cache, layer, k_new, k_new, slot)
  assert_bits_equal(stk(cache.k)[:, :, a], k0[:, :, a])
  assert_bits_equal(stk(cache.v)[:, :, a], v0[:, :, a])
  assert_bits_equal(stk(cache.k)[:, :, b, :3], k0[:, :, a, :3])  # shared prefix still shared
  assert_bits_equal(stk(cache.k)[:, :, b, 3], np.broadcast_to(np.asarray(k_new[0]), (L, H, D)))
  # Nothing else moved.
  rest = [i for i in range(NUM_BLOCKS) if i != b]
  assert_bits_equal(stk(cache.k)[:, :, np.array(rest)], k0[:, :, rest])
  assert_bits_equal(stk(cache.v)[:, :, np.array(rest)], v0[:, :, rest])


def copy_loop(k, v, src, dst):
  """Reads every source first, then writes: the documented (order-free) semantics."""
  k, v = np.array(k), np.array(v)
  pairs = [(s, d) for s, d in zip(src, dst, strict=True) if s >= 0 and d >= 0]
  blocks = [(k[:, :, s].copy(), v[:, :, s].copy()) for s, _ in pairs]
  for (_, d), (kb, vb) in zip(pairs, blocks, strict=True):
    k[:, :, d], v[:, :, d] = kb, vb
  return k, v


@pytest.mark.parametrize("on_device", [False, True], ids=["host_ids", "device_ids"])
def test_copy_blocks_padding_and_chains(on_device):
  """Padded pairs copy nothing; a swap (a->b, b->a) and a chain read the old contents."""
  rng = np.random.default_rng(26)
  cache = random_cache(rng)
  src = np.array([1, -1, 4, 0, -1, 6], np.int32)
  dst = np.array([4, -1, 1, 6, -1, 3], np.int32)
  want_k, want_v = copy_loop(*host_copy(cache), src, dst)
  if on_device:
    src, dst = jnp.asarray(src), jnp.asarray(dst)
  new = copy_blocks(cache, src, dst)
  assert_bits_equal(new.k, want_k)
  assert_bits_equal(new.v, want_v)


def test_copy_blocks_all_padding_is_a_no_op():
  rng = np.random.default_rng(27)
  cache = random_cache(rng)
  k0, v0 = host_copy(cache)
  pad = np.full((4,), kernels.INVALID_BLOCK, np.int32)
  new = copy_blocks(cache, pad, pad)
  assert_bits_equal(new.k, k0)
  assert_bits_equal(new.v, v0)


@pytest.mark.parametrize(
  "src,dst,match",
  [
    ([0, 8], [1, 2], r"src \[8\] out of range \[0, 8\) or -1"),
    ([0, 1], [-2, 2], r"dst \[-2\] out of range"),
    ([0, -1], [1, 2], r"half-padded pairs at positions \[1\]: src \[-1\], dst \[2\]"),
    ([0, 1, 2], [3, 4, 3], r"dst has repeated ids \[3\]"),
    ([0, 1], [2], r"src \(2,\) int32 and dst \(1,\) int32 must have one shape"),
    (np.array([0.0]), [1], r"src must be a 1-D integer array"),
    ([[0]], [[1]], r"src must be a 1-D integer array"),
  ],
)
def test_copy_blocks_rejects_bad_ids_before_touching_the_cache(src, dst, match):
  rng = np.random.default_rng(28)
  cache = random_cache(rng)
  k0, _ = host_copy(cache)
  with pytest.raises(ValueError, match=match):
    copy_blocks(cache, src, dst)
  assert not deleted(cache.k)
  assert_bits_equal(cache.k, k0)


# ---------------------------------------------------------------------------------------------
# Swap to host and back.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swap_out_and_back_in_to_other_blocks_is_bit_exact(dtype):
  rng = np.random.default_rng(29)
  cache = random_cache(rng, dtype)
  # Special values too: the copy must move bits, not numbers.
  special = jnp.array([np.nan, -0.0, np.inf], dtype)
  cache = cache.replace_layer(0, cache.k[0].at[0, 3, 0, :3].set(special), cache.v[0])
  host = HostKVPool.like(cache, NUM_HOST_BLOCKS)
  host.k[:] = rng.standard_normal(host.k.shape).astype(host.k.dtype)  # stale host contents
  host_k0 = host.k.copy()
  k0, v0 = host_copy(cache)
  out_ids, host_ids, in_ids = [3, 7, 1], [0, 4, 2], [5, 0, 6]

  swap_out(cache, host, np.array(out_ids), np.array(host_ids))
  assert not deleted(cache.k)  # swap_out reads the cache; it does not consume it
  assert_bits_equal(host.k[:, :, host_ids], k0[:, :, out_ids])
  assert_bits_equal(host.v[:, :, host_ids], v0[:, :, out_ids])
  untouched = [1, 3, 5]
  assert_bits_equal(host.k[:, :, untouched], host_k0[:, :, untouched])

  new = swap_in(cache, host, host_ids, in_ids)
  assert_bits_equal(stk(new.k)[:, :, in_ids], k0[:, :, out_ids])
  assert_bits_equal(stk(new.v)[:, :, in_ids], v0[:, :, out_ids])
  rest = [i for i in range(NUM_BLOCKS) if i not in in_ids]
  assert_bits_equal(stk(new.k)[:, :, np.array(rest)], k0[:, :, rest])
  assert_bits_equal(stk(new.v)[:, :, np.array(rest)], v0[:, :, rest])


def test_swap_with_no_ids_is_a_no_op():
  rng = np.random.default_rng(30)
  cache = random_cache(rng)
  host = HostKVPool.like(cache, NUM_HOST_BLOCKS)
  host_k0 = host.k.copy()
  swap_out(cache, host, [], [])
  assert_bits_equal(host.k, host_k0)
  assert swap_in(cache, host, [], []) is cache


SWAP_ERRORS = [
  # (device_ids, host_ids, match)
  ([1, NUM_BLOCKS], [0, 1], rf"device_ids \[{NUM_BLOCKS}\] out of range \[0, {NUM_BLOCKS}\)"),
  ([1, -1], [0, 1], r"device_ids \[-1\] out of range"),
  ([1, 2], [0, NUM_HOST_BLOCKS + 3], rf"host_ids \[{NUM_HOST_BLOCKS + 3}\] out of range"),
  ([1, 2, 3], [0, 1], r"device_ids \(3,\) int32 and host_ids \(2,\) int32 must have one shape"),
  (np.array([1.0]), [0], r"device_ids must be a 1-D integer array"),
]


@pytest.mark.parametrize("device_ids,host_ids,match", SWAP_ERRORS)
def test_swap_rejects_bad_ids_before_touching_anything(device_ids, host_ids, match):
  rng = np.random.default_rng(31)
  cache = random_cache(rng)
  k0, _ = host_copy(cache)
  host = HostKVPool.like(cache, NUM_HOST_BLOCKS)
  host_k0 = host.k.copy()
  with pytest.raises(ValueError, match=match):
    swap_out(cache, host, device_ids, host_ids)
  with pytest.raises(ValueError, match=match):
    swap_in(cache, host, host_ids, device_ids)
  assert_bits_equal(host.k, host_k0)
  assert not deleted(cache.k)
  assert_bits_equal(cache.k, k0)


def test_swap_rejects_duplicate_destinations():
  rng = np.random.default_rng(32)
  cache = random_cache(rng)
  host = HostKVPool.like(cache, NUM_HOST_BLOCKS)
  with pytest.raises(ValueError, match=r"host_ids has repeated ids \[2\]"):
    swap_out(cache, host, [0, 1], [2, 2])
  with pytest.raises(ValueError, match=r"device_ids has repeated ids \[4\]"):
    swap_in(cache, host, [0, 1], [4, 4])
  # Reading one block into two places is fine.
  swap_out(cache, host, [3, 3], [0, 1])
  assert_bits_equal(host.k[:, :, 0], host.k[:, :, 1])


def test_swap_rejects_a_host_pool_that_does_not_fit():
  rng = np.random.default_rng(33)
  cache = random_cache(rng)
  for host in (
    HostKVPool.create(L, H, NUM_HOST_BLOCKS, BS + 1, D),
    HostKVPool.create(L + 1, H, NUM_HOST_BLOCKS, BS, D),
    HostKVPool.create(L, H, NUM_HOST_BLOCKS, BS, D, jnp.bfloat16),
  ):
    with pytest.raises(ValueError, match=r"host_pool blocks .* do not fit the cache's"):
      swap_out(cache, host, [0], [0])
    with pytest.raises(ValueError, match=r"host_pool blocks .* do not fit the cache's"):
      swap_in(cache, host, [0], [0])


def test_host_pool_rejects_bad_arrays():
  with pytest.raises(ValueError, match=r"HostKVPool needs NumPy arrays"):
    HostKVPool(jnp.zeros((L, H, 2, BS, D)), jnp.zeros((L, H, 2, BS, D)))
  with pytest.raises(ValueError, match=r"host k and v must both be"):
    HostKVPool(np.zeros((L, H, 2, BS, D)), np.zeros((L, H, 3, BS, D)))


# ---------------------------------------------------------------------------------------------
# Donation.


def test_donating_functions_consume_their_input_and_stay_correct():
  """write, copy_blocks and swap_in donate the cache (updated in place); chaining them must
  give what a NumPy model of the same steps gives."""
  rng = np.random.default_rng(34)
  cache = random_cache(rng)
  host = HostKVPool.like(cache, NUM_HOST_BLOCKS)
  k, v = host_copy(cache)

  k_new, v_new, slots = _new_tokens(rng, 4)
  old = cache
  cache = write(cache, 2, k_new, v_new, slots)
  assert old.k[2].is_deleted() and old.v[2].is_deleted()  # that layer's buffers, in place
  assert cache.k[0] is old.k[0]  # the other layers' buffers are shared, not copied
  k, v = write_loop(k, v, 2, k_new, v_new, slots)

  old = cache
  cache = copy_blocks(cache, np.array([2, 5]), np.array([0, 7]))
  assert all(p.is_deleted() for p in old.k + old.v)
  k, v = copy_loop(k, v, [2, 5], [0, 7])

  swap_out(cache, host, [0, 1], [3, 4])
  old = cache
  cache = swap_in(cache, host, [4, 3], [6, 2])
  assert all(p.is_deleted() for p in old.k + old.v)
  k[:, :, [6, 2]], v[:, :, [6, 2]] = k[:, :, [1, 0]], v[:, :, [1, 0]]

  assert_bits_equal(cache.k, k)
  assert_bits_equal(cache.v, v)
  # The consumed caches are refused by name, before anything runs (JAX's own error would
  # be "Array has been deleted" from inside the call); the live cache is left as it was.
  for reuse in (
    lambda: write(old, 0, k_new, v_new, slots),
    lambda: copy_blocks(old, np.array([1]), np.array([3])),
    lambda: swap_in(old, host, [4], [5]),
    # Reading a layer of it (the pools kernels.paged_attention takes) is refused the same way.
    lambda: old.layer(0),
  ):
    with pytest.raises(ValueError, match="donated to an earlier write, copy_blocks or swap_in"):
      reuse()
  assert all(x.shape == cache.k[0].shape for x in cache.layer(0))  # the live one reads
  assert_bits_equal(cache.k, k)
  assert_bits_equal(cache.v, v)


def test_a_cache_with_one_array_in_two_places_is_refused():
  """write donates a layer's pools: an array shared by two layers would be deleted under the
  other one."""
  k = jnp.zeros((H, NUM_BLOCKS, BS, D))
  shared = PagedKVCache(k=(k, k), v=(jnp.zeros_like(k), jnp.zeros_like(k)))
  with pytest.raises(ValueError, match=r"distinct array per layer"):
    write(shared, 0, jnp.zeros((1, H, D)), jnp.zeros((1, H, D)), np.zeros(1, np.int32))
  assert not k.is_deleted()


def test_lane_dense_cache_write_copy_and_swap_match_the_plain_cache():
  # head_dim 64 in rows of 128 (two tokens a row): every cache operation gives, read in the
  # plain layout (stacked()), what it gives on a plain cache, bit for bit; sizes in tokens.
  L, H, N, B, Dh = 2, 2, 5, 4, 64
  rng = np.random.default_rng(50)
  plain = PagedKVCache.create(L, H, N, B, Dh, jnp.bfloat16)
  dense = PagedKVCache.create(L, H, N, B, Dh, jnp.bfloat16, lane_dense=True)
  assert dense.lane_dense and dense.row_tokens == 2 and not plain.lane_dense
  assert dense.k[0].shape == (H, N, B // 2, 128)
  assert (dense.block_size, dense.head_dim, dense.num_blocks) == (B, Dh, N)
  slots = np.array([0, 3, 5, 9, 14, -1, 19], np.int32)
  for layer in range(L):
    k_new = jnp.asarray(rng.standard_normal((7, H, Dh)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((7, H, Dh)), jnp.float32)
    plain = write(plain, layer, k_new, v_new, slots)
    dense = write(dense, layer, k_new, v_new, slots)
  plain = copy_blocks(plain, np.array([0, 2]), np.array([4, 3]))
  dense = copy_blocks(dense, np.array([0, 2]), np.array([4, 3]))
  for a, b in zip(plain.stacked(), dense.stacked(), strict=True):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  # Swap out to a host pool of token rows, back in to other blocks.
  host_p, host_d = HostKVPool.like(plain, 3), HostKVPool.like(dense, 3)
  assert host_d.k.shape == host_p.k.shape == (L, H, 3, B, Dh)
  swap_out(plain, host_p, [1, 2], [0, 2])
  swap_out(dense, host_d, [1, 2], [0, 2])
  np.testing.assert_array_equal(host_p.k, host_d.k)
  plain = swap_in(plain, host_p, [2, 0], [0, 4])
  dense = swap_in(dense, host_d, [2, 0], [0, 4])
  for a, b in zip(plain.stacked(), dense.stacked(), strict=True):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  # Through jit the static field survives; 8-bit and other head_dims are refused.
  assert jax.jit(lambda c: c)(dense).row_tokens == 2
  with pytest.raises(ValueError, match="16- or 32-bit"):
    PagedKVCache.create(L, H, N, 128, Dh, jnp.int8, lane_dense=True)
  with pytest.raises(ValueError, match="head_dim 32 or 64"):
    PagedKVCache.create(L, H, N, B, 128, jnp.bfloat16, lane_dense=True)
  bad = PagedKVCache(k=plain.k, v=plain.v, row_tokens=2)  # rows of 64 said to hold two
  with pytest.raises(ValueError, match="does not fit"):
    write(bad, 0, k_new, v_new, slots)


def _float64_write(want_k, want_v, layer, k_new, v_new, slots, block_size):
  """NumPy float64 model of a write into ``want_k, want_v [L, H, N, block_size, head_dim]``
  (in place): token ``t`` of every head into slot ``slots[t]``; -1 writes nothing."""
  for t, slot in enumerate(slots):
    if slot >= 0:
      block, offset = divmod(int(slot), block_size)
      want_k[layer, :, block, offset] = np.asarray(k_new[t], np.float64)
      want_v[layer, :, block, offset] = np.asarray(v_new[t], np.float64)


@pytest.mark.parametrize("head_dim,width", [(80, 128), (192, 256)])
def test_lane_padded_cache_writes_the_real_lanes_and_keeps_the_padding_zero(head_dim, width):
  # head_dim 80 (192) in rows of 128 (256): sizes are in the real head_dim, writes land in
  # the first head_dim lanes (read back through stacked(), checked against a float64 loop),
  # and the lanes after them stay zero.
  Lp, Hp, N, B = 2, 2, 5, 4
  rng = np.random.default_rng(51)
  cache = PagedKVCache.create(Lp, Hp, N, B, head_dim, jnp.float32, lane_padded=True)
  assert cache.lane_padded and not cache.lane_dense and cache.real_head_dim == head_dim
  assert all(p.shape == (Hp, N, B, width) for p in cache.k + cache.v)
  assert (cache.num_blocks, cache.block_size, cache.head_dim) == (N, B, head_dim)
  assert cache.logical_shape == (Hp, N, B, head_dim)
  assert cache.kernel_kwargs(1) == {"lane_padded": True}
  assert jax.jit(lambda c: c)(cache).real_head_dim == head_dim  # static: survives jit
  plain = PagedKVCache.create(Lp, Hp, N, B, head_dim, jnp.float32)
  assert not plain.lane_padded and plain.real_head_dim is None and plain.kernel_kwargs(0) == {}
  want_k = np.zeros((Lp, Hp, N, B, head_dim))
  want_v = np.zeros_like(want_k)
  slots = np.array([0, 3, 5, 9, 14, -1, 19], np.int32)
  for layer in range(Lp):
    k_new = jnp.asarray(rng.standard_normal((7, Hp, head_dim)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((7, Hp, head_dim)), jnp.float32)
    cache = write(cache, layer, k_new, v_new, slots)
    _float64_write(want_k, want_v, layer, k_new, v_new, slots, B)
  k, v = cache.stacked()
  assert k.shape == v.shape == (Lp, Hp, N, B, head_dim)
  np.testing.assert_array_equal(np.asarray(k, np.float64), want_k)
  np.testing.assert_array_equal(np.asarray(v, np.float64), want_v)
  for pool in cache.k + cache.v:
    assert (np.asarray(pool)[..., head_dim:] == 0).all()


def test_lane_padded_cache_copy_and_swap_match_the_plain_cache():
  # Copy-on-write moves whole padded rows and swaps the real lanes: read in real head_dim
  # (stacked()) the cache is the plain cache, bit for bit, the host pool holds the plain
  # host pool's rows, and a swap-in puts the zero lanes back.
  Lp, Hp, N, B, Dh = 2, 2, 5, 4, 96
  rng = np.random.default_rng(52)
  plain = PagedKVCache.create(Lp, Hp, N, B, Dh, jnp.bfloat16)
  padded = PagedKVCache.create(Lp, Hp, N, B, Dh, jnp.bfloat16, lane_padded=True)
  slots = np.array([1, 4, 6, 11, 13, 18], np.int32)
  for layer in range(Lp):
    k_new = jnp.asarray(rng.standard_normal((6, Hp, Dh)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((6, Hp, Dh)), jnp.float32)
    plain = write(plain, layer, k_new, v_new, slots)
    padded = write(padded, layer, k_new, v_new, slots)
  plain = copy_blocks(plain, np.array([0, 2]), np.array([4, 3]))
  padded = copy_blocks(padded, np.array([0, 2]), np.array([4, 3]))
  host_p, host_d = HostKVPool.like(plain, 3), HostKVPool.like(padded, 3)
  assert host_p.k.shape == host_d.k.shape == (Lp, Hp, 3, B, Dh)
  swap_out(plain, host_p, [1, 2], [0, 2])
  swap_out(padded, host_d, [1, 2], [0, 2])
  for a, b in ((host_p.k, host_d.k), (host_p.v, host_d.v)):
    assert_bits_equal(b, a)
  # Swap-in over blocks whose padding lanes hold garbage: the zero lanes come back.
  padded = padded.replace(
    k=tuple(p.at[:, :, :, Dh:].set(7.0) for p in padded.k),
    v=tuple(p.at[:, :, :, Dh:].set(-3.0) for p in padded.v),
  )
  plain = swap_in(plain, host_p, [2, 0], [0, 4])
  padded = swap_in(padded, host_d, [2, 0], [0, 4])
  assert padded.lane_padded and padded.k[0].shape == (Hp, N, B, 128)
  for a, b in zip(plain.stacked(), padded.stacked(), strict=True):
    assert_bits_equal(b, a)
  for p in padded.k + padded.v:
    lanes = np.asarray(p, np.float32)[..., Dh:]
    assert (lanes[:, [0, 4]] == 0).all() and (lanes[:, [1, 2, 3]] != 0).all()
  wide = HostKVPool.create(Lp, Hp, 3, B, 128, jnp.bfloat16)
  with pytest.raises(ValueError, match="do not fit"):  # a host pool of padded rows
    swap_out(padded, wide, [1], [0])


@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_8bit_lane_padded_cache_stores_the_plain_caches_rows_and_scales(kv_dtype):
  # The quantizing write pads with zeros, which change no row's scale: the real lanes and
  # the scales are the plain 8-bit cache's, bit for bit.
  Hp, N, B, Dh = 2, 3, 8, 80
  rng = np.random.default_rng(53)
  plain = PagedKVCache.create(1, Hp, N, B, Dh, kv_dtype)
  padded = PagedKVCache.create(1, Hp, N, B, Dh, kv_dtype, lane_padded=True)
  assert padded.quantized and padded.k_scale[0].shape == (Hp, N, B)
  assert padded.kernel_kwargs(0).keys() == {"k_scales", "v_scales", "lane_padded"}
  k_new = jnp.asarray(rng.standard_normal((5, Hp, Dh)), jnp.float32)
  v_new = jnp.asarray(rng.standard_normal((5, Hp, Dh)), jnp.float32)
  slots = np.array([0, 7, 9, -1, 20], np.int32)
  old = plain
  plain = write(plain, 0, k_new, v_new, slots)
  # The written layer's pools and scales were donated: reading them is refused by name.
  for reuse in (lambda: old.layer(0), lambda: old.kernel_kwargs(0)):
    with pytest.raises(ValueError, match="donated to an earlier write"):
      reuse()
  padded = write(padded, 0, k_new, v_new, slots)
  for a, b in zip(plain.stacked(), padded.stacked(), strict=True):
    np.testing.assert_array_equal(np.asarray(b).view(np.uint8), np.asarray(a).view(np.uint8))
  np.testing.assert_array_equal(padded.k_scale[0], plain.k_scale[0])
  np.testing.assert_array_equal(padded.v_scale[0], plain.v_scale[0])
  assert (np.asarray(padded.k[0]).view(np.uint8)[..., Dh:] == 0).all()
  # A swap round trip (out of blocks 0 and 2, back into 1 and 0): the host pool holds
  # the real lanes and the scales, and both caches stay the same, bit for bit.
  host_p, host_d = HostKVPool.like(plain, 2), HostKVPool.like(padded, 2)
  assert host_d.k.shape == (1, Hp, 2, B, Dh) and host_d.k_scale.shape == (1, Hp, 2, B)
  for cache, host in ((plain, host_p), (padded, host_d)):
    swap_out(cache, host, [0, 2], [0, 1])
  np.testing.assert_array_equal(host_d.k.view(np.uint8), host_p.k.view(np.uint8))
  np.testing.assert_array_equal(host_d.v_scale, host_p.v_scale)
  plain = swap_in(plain, host_p, [1, 0], [1, 0])
  padded = swap_in(padded, host_d, [1, 0], [1, 0])
  for a, b in zip(plain.stacked(), padded.stacked(), strict=True):
    np.testing.assert_array_equal(np.asarray(b).view(np.uint8), np.asarray(a).view(np.uint8))
  np.testing.assert_array_equal(padded.k_scale[0], plain.k_scale[0])
  assert (np.asarray(padded.v[0]).view(np.uint8)[..., Dh:] == 0).all()


def test_lane_padded_cache_refuses_what_the_layout_does_not_take():
  with pytest.raises(ValueError, match="lane_dense and lane_padded are two layouts"):
    PagedKVCache.create(1, 1, 2, 4, 64, jnp.float32, lane_dense=True, lane_padded=True)
  with pytest.raises(ValueError, match=r"lane_padded=True.*head_dim 128 is a multiple of 128"):
    PagedKVCache.create(1, 1, 2, 4, 128, jnp.float32, lane_padded=True)
  plain = PagedKVCache.create(1, 1, 2, 4, 80, jnp.float32)
  rows = jnp.zeros((1, 1, 80))
  bad = PagedKVCache(k=plain.k, v=plain.v, real_head_dim=80)  # rows of 80 said to be padded
  with pytest.raises(ValueError, match=r"real_head_dim 80 does not fit.*rows 128 wide"):
    write(bad, 0, rows, rows, np.zeros(1, np.int32))
  padded = PagedKVCache.create(1, 1, 2, 4, 80, jnp.float32, lane_padded=True)
  with pytest.raises(ValueError, match=r"must be \[num_tokens, 1, 80\]"):  # the real head_dim
    write(padded, 0, jnp.zeros((1, 1, 128)), jnp.zeros((1, 1, 128)), np.zeros(1, np.int32))
