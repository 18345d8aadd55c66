"""kernels.write_kv against a Python loop over the new tokens."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels

H, NUM_BLOCKS, BS, D = 2, 5, 4, 8


def write_loop(k_blocks, v_blocks, k_new, v_new, slot_mapping):
  """One token at a time: token t goes to block slot // block_size, offset slot % block_size."""
  k_out = np.array(k_blocks)
  v_out = np.array(v_blocks)
  block_size = k_out.shape[2]
  for t, slot in enumerate(np.asarray(slot_mapping)):
    if slot == kernels.INVALID_SLOT:
      continue
    block, offset = divmod(int(slot), block_size)
    k_out[:, block, offset] = np.asarray(k_new[t]).astype(k_out.dtype)
    v_out[:, block, offset] = np.asarray(v_new[t]).astype(v_out.dtype)
  return k_out, v_out


def _bits(x):
  """Raw bits, so that equality is exact (NaN payloads, -0.0) rather than numeric."""
  x = np.asarray(x)
  return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _inputs(rng, num_tokens, pool_dtype=jnp.float32, new_dtype=jnp.float32):
  shape = (H, NUM_BLOCKS, BS, D)
  k = jnp.asarray(rng.standard_normal(shape), pool_dtype)
  v = jnp.asarray(rng.standard_normal(shape), pool_dtype)
  k_new = jnp.asarray(rng.standard_normal((num_tokens, H, D)), new_dtype)
  v_new = jnp.asarray(rng.standard_normal((num_tokens, H, D)), new_dtype)
  return k, v, k_new, v_new


@pytest.mark.parametrize(
  "pool_dtype,new_dtype",
  [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float32)],
  ids=["f32", "bf16", "f32_into_bf16"],
)
def test_write_kv_matches_loop(pool_dtype, new_dtype):
  rng = np.random.default_rng(10)
  num_tokens = 9
  # Distinct slots, in random order, crossing blocks; some rows are padding.
  slots = rng.choice(NUM_BLOCKS * BS, size=num_tokens, replace=False).astype(np.int32)
  slots[[1, 4, 8]] = kernels.INVALID_SLOT
  k, v, k_new, v_new = _inputs(rng, num_tokens, pool_dtype, new_dtype)
  want_k, want_v = write_loop(k, v, k_new, v_new, slots)
  got_k, got_v = kernels.write_kv(k, v, k_new, v_new, jnp.asarray(slots))
  assert got_k.dtype == pool_dtype and got_k.shape == k.shape
  np.testing.assert_array_equal(_bits(got_k), _bits(want_k))
  np.testing.assert_array_equal(_bits(got_v), _bits(want_v))
  # The write really changed the pool where slots are valid (guards the loop itself).
  assert not np.array_equal(np.asarray(got_k), np.asarray(k))


def test_padding_rows_write_nothing():
  rng = np.random.default_rng(11)
  k, v, k_new, v_new = _inputs(rng, 4)
  slots = jnp.full((4,), kernels.INVALID_SLOT, jnp.int32)
  got_k, got_v = kernels.write_kv(k, v, k_new, v_new, slots)
  np.testing.assert_array_equal(_bits(got_k), _bits(k))
  np.testing.assert_array_equal(_bits(got_v), _bits(v))


def test_whole_block_and_single_slot_edges():
  """First and last slot of the pool, and one whole block in order."""
  rng = np.random.default_rng(12)
  last = NUM_BLOCKS * BS - 1
  slots = np.array([0, last] + list(range(2 * BS, 3 * BS)), np.int32)
  k, v, k_new, v_new = _inputs(rng, len(slots))
  got_k, got_v = kernels.write_kv(k, v, k_new, v_new, jnp.asarray(slots))
  np.testing.assert_array_equal(np.asarray(got_k[:, 0, 0]), np.asarray(k_new[0]))
  np.testing.assert_array_equal(np.asarray(got_v[:, NUM_BLOCKS - 1, BS - 1]), np.asarray(v_new[1]))
  np.testing.assert_array_equal(np.asarray(got_k[:, 2]), np.swapaxes(np.asarray(k_new[2:]), 0, 1))


def test_donated_write_matches_and_consumes_the_pools():
  rng = np.random.default_rng(13)
  slots = np.array([3, -1, 17, 6], np.int32)
  k, v, k_new, v_new = _inputs(rng, 4)
  want_k, want_v = write_loop(k, v, k_new, v_new, slots)
  donated = jax.jit(kernels.write_kv, donate_argnums=(0, 1))
  got_k, got_v = donated(k, v, k_new, v_new, jnp.asarray(slots))
  np.testing.assert_array_equal(_bits(got_k), _bits(want_k))
  np.testing.assert_array_equal(_bits(got_v), _bits(want_v))
  assert k.is_deleted() and v.is_deleted()  # written in place, not copied


@pytest.mark.parametrize(
  "which,match",
  [
    ("k_heads", r"k_new/v_new must be \[num_tokens, 2, 8\], got \(3, 1, 8\)"),
    ("v_shape", r"k_new/v_new must be .* got \(3, 2, 8\) and \(2, 2, 8\)"),
    ("slots_len", r"slot_mapping must be int32 \[3\], got \(4,\)"),
    ("slots_int64", r"slot_mapping must be int32 \[3\], got \(3,\) int64"),
    # Integer rows are a mistake, not values to cast into a float pool.
    ("k_int32", r"k_new must be a float array, got \(3, 2, 8\) int32"),
    # ... and so is an integer pool, which would truncate them; or two pool dtypes.
    ("pools_int32", r"k_blocks' dtype must be one of float32, .*got int32"),
    ("pools_mixed", r"k_blocks and v_blocks must have one dtype, got float32 and bfloat16"),
    ("list_rows", r"kernels.write_kv: k_new must be a JAX or NumPy array, got list"),
  ],
)
def test_bad_inputs_are_named(which, match):
  rng = np.random.default_rng(14)
  k, v, k_new, v_new = _inputs(rng, 3)
  slots = jnp.asarray([0, 1, 2], jnp.int32)
  if which == "k_heads":
    k_new = k_new[:, :1]
  elif which == "v_shape":
    v_new = v_new[:2]
  elif which == "slots_len":
    slots = jnp.asarray([0, 1, 2, 3], jnp.int32)
  elif which == "k_int32":
    k_new = k_new.astype(jnp.int32)
  elif which == "pools_int32":
    k, v = k.astype(jnp.int32), v.astype(jnp.int32)
  elif which == "pools_mixed":
    k, v = k.astype(jnp.float32), v.astype(jnp.bfloat16)
  elif which == "list_rows":
    k_new = np.asarray(k_new).tolist()
  else:
    slots = np.asarray([0, 1, 2], np.int64)
  with pytest.raises(ValueError, match=match):
    kernels.write_kv(k, v, k_new, v_new, slots)


@pytest.mark.parametrize(
  "slots,match",
  [
    ([3, NUM_BLOCKS * BS, 5], rf"slot_mapping \[{NUM_BLOCKS * BS}\] out of range \[0, \d+\) or -1"),
    ([3, -7, 5], r"slot_mapping \[-7\] out of range"),
    ([3, 5, 3], r"slot_mapping has repeated ids \[3\]"),
  ],
  ids=["past-the-pool", "negative-not-padding", "repeated"],
)
def test_host_slot_mapping_is_checked_not_silently_dropped(slots, match):
  """A NumPy slot mapping with a slot the scatter would drop (or write twice) raises,
  instead of losing that token's K/V."""
  rng = np.random.default_rng(14)
  k, v, k_new, v_new = _inputs(rng, 3)
  with pytest.raises(ValueError, match=match):
    kernels.write_kv(k, v, k_new, v_new, np.asarray(slots, np.int32))


# --------------------------------------------------------------- lane-dense pools


@pytest.mark.parametrize("head_dim,block_size", [(64, 4), (32, 8)], ids=["d64", "d32"])
def test_write_kv_into_a_lane_dense_pool_matches_the_loop(head_dim, block_size):
  # A lane-dense pool (kernels._layout: 128 // head_dim tokens a 128-lane row) is written
  # in that layout; read back through the plain view it is the loop's result, bit for bit,
  # with padding rows and (device) slots past the pool dropped.
  from kernels import _layout

  rng = np.random.default_rng(12)
  shape = (H, NUM_BLOCKS, block_size, head_dim)
  k = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  num_tokens = 9
  slots = rng.choice(NUM_BLOCKS * block_size, size=num_tokens, replace=False).astype(np.int32)
  slots[[1, 4]] = kernels.INVALID_SLOT
  k_new = jnp.asarray(rng.standard_normal((num_tokens, H, head_dim)), jnp.float32)
  v_new = jnp.asarray(rng.standard_normal((num_tokens, H, head_dim)), jnp.float32)
  want_k, want_v = write_loop(k, v, k_new, v_new, slots)
  dk, dv = _layout.pack(k), _layout.pack(v)
  assert dk.shape == (H, NUM_BLOCKS, block_size * head_dim // 128, 128)
  got_k, got_v = kernels.write_kv(dk, dv, k_new, v_new, slots, lane_dense=True)
  assert got_k.shape == dk.shape
  np.testing.assert_array_equal(_bits(_layout.unpack(got_k, head_dim)), _bits(want_k))
  np.testing.assert_array_equal(_bits(_layout.unpack(got_v, head_dim)), _bits(want_v))
  # Device slots are trusted; one past the pool is dropped, as in the plain layout.
  past = slots.copy()
  past[8] = NUM_BLOCKS * block_size
  write = functools.partial(kernels.write_kv, lane_dense=True)
  got_k, _ = jax.jit(write)(dk, dv, k_new, v_new, jnp.asarray(past))
  want_k, _ = write_loop(k, v, k_new[:8], v_new[:8], past[:8])
  np.testing.assert_array_equal(_bits(_layout.unpack(got_k, head_dim)), _bits(want_k))
  # Host slots are checked in tokens of the logical pool.
  with pytest.raises(ValueError, match="out of range"):
    kernels.write_kv(dk, dv, k_new, v_new, past, lane_dense=True)
  # Not said to be lane-dense: rows of 64 against a pool of rows of 128 are refused.
  with pytest.raises(ValueError, match="k_new/v_new must be"):
    kernels.write_kv(dk, dv, k_new, v_new, slots)


def test_write_kv_refuses_lane_dense_8bit_and_odd_widths():
  k8 = jnp.zeros((H, NUM_BLOCKS, 2, 128), jnp.int8)
  s = jnp.zeros((H, NUM_BLOCKS, 2), jnp.float32)
  new = jnp.zeros((1, H, 64), jnp.float32)
  slots = np.zeros(1, np.int32)
  with pytest.raises(ValueError, match="k_new/v_new must be"):  # 8-bit: never lane-dense
    kernels.write_kv_quantized(k8, k8, s, s, new, new, slots)
  with pytest.raises(ValueError, match="lane_dense=True"):
    kernels.write_kv(k8, k8, new, new, slots, lane_dense=True)
  pool = jnp.zeros((H, NUM_BLOCKS, 2, 128), jnp.float32)
  odd = jnp.zeros((1, H, 48))
  with pytest.raises(ValueError, match="lane_dense=True"):
    kernels.write_kv(pool, pool, odd, odd, slots, lane_dense=True)
  plain = jnp.zeros((H, NUM_BLOCKS, 4, 64), jnp.float32)
  with pytest.raises(ValueError, match="lane_dense=True"):
    kernels.write_kv(plain, plain, new, new, slots, lane_dense=True)


def test_write_kv_quantized_names_missing_scales_and_non_arrays():
  rng = np.random.default_rng(3)
  k, v, k_new, v_new = _inputs(rng, 3)
  kq, ks = kernels.quantize(k, jnp.int8)
  vq, vs = kernels.quantize(v, jnp.int8)
  slots = jnp.asarray([0, 1, 2], jnp.int32)
  with pytest.raises(
    ValueError, match=r"write_kv_quantized: k_scales must be a JAX or NumPy array, got NoneType"
  ):
    kernels.write_kv_quantized(kq, vq, None, None, k_new, v_new, slots)
  with pytest.raises(ValueError, match=r"slot_mapping must be a JAX or NumPy array, got list"):
    kernels.write_kv_quantized(kq, vq, ks, vs, k_new, v_new, [0, 1, 2])
