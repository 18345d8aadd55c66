"""Sharding over KV heads: head layouts by hand and by brute force (in process, one device),
and sharded attention, K/V writes and the engine against one device on meshes of 4 and 8
simulated CPU devices (in a subprocess: the device count is fixed when jax starts)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels
from kernels.testing import tolerance
from paxcache import sharding as sh
from paxcache.cache import PagedKVCache

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKS = os.path.join(REPO, "tests", "paxcache", "sharding_checks.py")

# float32 bounds (kernels/testing.py says why): |sharded - single device|, and the Pallas
# kernel under shard_map against the reference.
SHARDED = tolerance("sharded_vs_single_device", "float32")
PALLAS = tolerance("sharded_pallas_vs_reference", "float32")


# ---------------------------------------------------------------------------------------------
# Head layout.


def test_head_layout_by_hand():
  # 2 KV heads on 8 devices: 4 copies each; 2 query heads per KV head fill 2 of the 4
  # copies, the other two compute a duplicate whose output is dropped.
  lay = sh.head_layout(8, num_kv_heads=2, num_q_heads=4)
  assert (lay.pool_heads, lay.kv_per_shard, lay.q_per_pool_head) == (8, 1, 1)
  assert lay.kv_heads == (0, 0, 0, 0, 1, 1, 1, 1)
  assert lay.q_heads == (0, 1, 0, 0, 2, 3, 2, 2)
  assert lay.q_source == (0, 1, 4, 5)
  assert not lay.q_identity and not lay.kv_identity
  # 3 KV heads (9 query heads) on 2 devices: 2 pool heads per device, KV head 0 twice.
  lay = sh.head_layout(2, num_kv_heads=3, num_q_heads=9)
  assert (lay.pool_heads, lay.kv_per_shard, lay.q_per_pool_head) == (4, 2, 3)
  assert lay.kv_heads == (0, 0, 1, 2)
  assert lay.q_heads == (0, 1, 2, 0, 0, 0, 3, 4, 5, 6, 7, 8)
  assert lay.q_source == (0, 1, 2, 6, 7, 8, 9, 10, 11)
  # 2 KV heads, 4 query heads on 4 devices: one KV head copy and one query head per device.
  lay = sh.head_layout(4, num_kv_heads=2, num_q_heads=4)
  assert lay.kv_heads == (0, 0, 1, 1) and lay.q_identity
  # 8 KV heads on 4 devices: the plain split.
  lay = sh.head_layout(4, num_kv_heads=8, num_q_heads=32)
  assert lay.kv_identity and lay.q_identity and lay.kv_per_shard == 2


@pytest.mark.parametrize(
  "shards, kv, group", list(itertools.product([1, 2, 3, 4, 8], [1, 2, 3, 5, 8, 12], [1, 2, 3, 7]))
)
def test_head_layout_invariants(shards, kv, group):
  lay = sh.head_layout(shards, kv, kv * group)
  e, gq = lay.pool_heads, lay.q_per_pool_head
  # Whole heads, the same number on every device, the fewest that hold every head once.
  assert e % shards == 0 and e // shards == -(-kv // shards) == lay.kv_per_shard
  assert sorted(set(lay.kv_heads)) == list(range(kv))
  assert list(lay.kv_heads) == sorted(lay.kv_heads)  # copies are neighbours
  for h in range(kv):
    assert lay.kv_heads[lay.kv_first_copy[h]] == h
  # Every query slot computes a query head of its pool head's KV head.
  assert len(lay.q_heads) == e * gq
  for slot, qh in enumerate(lay.q_heads):
    assert qh // group == lay.kv_heads[slot // gq]
  # Every query head is taken from one slot that computes it.
  assert len(lay.q_source) == kv * group == len(set(lay.q_source))
  for qh, slot in enumerate(lay.q_source):
    assert lay.q_heads[slot] == qh
  # The identity (no data movement) exactly when the documented condition holds.
  documented = (kv * group) % shards == 0 and (kv % shards == 0 or shards % kv == 0)
  assert lay.q_identity == documented
  assert lay.kv_identity == (kv % shards == 0)
  hash(lay)  # a static argument of jit


def test_layout_and_mesh_errors():
  with pytest.raises(ValueError, match="num_q_heads 6 is not a multiple of num_kv_heads 4"):
    sh.head_layout(2, 4, 6)
  with pytest.raises(ValueError, match="num_shards"):
    sh.head_layout(0, 4, 4)
  with pytest.raises(ValueError, match=r"num_devices must be an int in \[1, "):
    sh.make_mesh(jax.device_count() + 1)
  mesh = sh.make_mesh(1, axis="tp")
  with pytest.raises(ValueError, match="not 'model'"):
    sh.kv_sharding(mesh, 2)
  spec = sh.kv_sharding(mesh, 2, 4, axis="tp")
  assert spec.pool.spec == jax.sharding.PartitionSpec("tp")  # each layer's pool, heads first


def _small_case(rng, hq=4, hkv=2, num_blocks=6, block_size=4, head_dim=8):
  k = jnp.asarray(rng.standard_normal((hkv, num_blocks, block_size, head_dim)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((hkv, num_blocks, block_size, head_dim)), jnp.float32)
  q = jnp.asarray(rng.standard_normal((2, hq, head_dim)), jnp.float32)
  table = jnp.asarray([[3, 1], [0, -1]], jnp.int32)
  lengths = jnp.asarray([7, 2], jnp.int32)
  return q, k, v, table, lengths


def test_one_device_mesh_matches_and_bad_pools_raise():
  rng = np.random.default_rng(0)
  q, k, v, table, lengths = _small_case(rng)
  mesh = sh.make_mesh(1)
  cache = sh.shard_cache(PagedKVCache(k=(k,), v=(v,)), mesh)
  want = kernels.paged_attention(q, k, v, table, lengths)
  got = sh.sharded_paged_attention(mesh, q, cache.k[0], cache.v[0], table, lengths)
  np.testing.assert_allclose(got, want, **SHARDED)
  # Pools that are not a shard_cache layout of the claimed KV heads.
  with pytest.raises(ValueError, match=r"the pools have 2 heads, but 3 KV heads on 1 shards"):
    sh.sharded_paged_attention(mesh, q[:, :3], k, v, table, lengths, num_kv_heads=3)
  with pytest.raises(ValueError, match="q must be"):
    sh.sharded_paged_attention(mesh, q[0], k, v, table, lengths)
  with pytest.raises(ValueError, match="cache has 2 heads, but 3 KV heads"):
    sh.unshard_cache(cache, 3, 1)
  fresh = sh.init_sharded_cache(mesh, 2, 3, 5, 4, 8, jnp.bfloat16)
  assert len(fresh.k) == 2 and fresh.k[1].shape == (3, 5, 4, 8)
  assert fresh.dtype == jnp.bfloat16
  assert not np.asarray(fresh.stacked()[1], np.float32).any()
  with pytest.raises(ValueError, match="num_blocks must be a positive int"):
    sh.init_sharded_cache(mesh, 2, 3, 0, 4, 8)


# ---------------------------------------------------------------------------------------------
# 4 and 8 simulated devices (one subprocess with 8 host devices; meshes of 4 and 8).


@pytest.fixture(scope="module")
def multi_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, CHECKS, "4", "8"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["device_count"] == 8
  return out


def test_sharded_attention_equals_single_device(multi_device):
  rows = multi_device["attention"]
  seen = {(r["mesh"], r["num_kv_heads"], r["mode"]) for r in rows}
  # Both meshes, decode and ragged prefill, KV heads >= and < the devices.
  for n in (4, 8):
    assert {(n, 8, "decode"), (n, 8, "prefill"), (n, 2, "decode"), (n, 2, "prefill")} <= seen
    assert {(n, 3, "decode"), (n, 3, "prefill_window_softcap")} <= seen
  for r in rows:
    assert r["want_finite"] and r["finite"], r  # NaN in unused blocks never leaks
    assert r["max_abs_err"] <= SHARDED.atol, r
    # The pool is really split: one shard per device, kv_per_shard whole heads each.
    lay = sh.head_layout(r["mesh"], r["num_kv_heads"], r["num_q_heads"])
    assert r["pool"]["shard_devices"] == r["mesh"]
    assert r["pool"]["shard_shapes"] == [[lay.kv_per_shard, 24, 4, 8]]
    assert r["out_devices"] == r["mesh"]
    # Nothing crosses devices when q is sharded as is; otherwise only the output, once,
    # to put the query heads back in order (never a K/V pool).
    if r["q_identity"]:
      assert r["collectives"] == [], r
    else:
      num_q = 3 if r["mode"] == "decode" else 12
      assert r["collectives"] == [["all-reduce", [num_q, r["num_q_heads"], 8]]], r
  # Both query layouts ran: plain head sharding and gathered query slots.
  assert {r["q_identity"] for r in rows} == {True, False}


def test_sharded_model_step_moves_only_activations(multi_device):
  # Megatron pattern on 4 devices (4 query heads, 2 KV heads: one head each): one
  # all-reduce of [tokens, d_model] after the o projection and one after the MLP, per
  # layer; the K/V pools, block tables and attention never leave their devices.
  (r,) = multi_device["model_collectives"]
  assert r["mesh"] == 4
  want = [["all-reduce", [r["tokens"], r["d_model"]]]] * (2 * r["num_layers"])
  assert r["collectives"] == want, r


def test_pallas_kernel_runs_per_device(multi_device):
  r = multi_device["pallas"]
  assert r["mesh"] == 8 and r["max_abs_err"] <= PALLAS.atol, r


def test_sharded_writes_equal_unsharded(multi_device):
  rows = multi_device["writes"]
  assert {(r["mesh"], r["num_kv_heads"]) for r in rows} >= {(4, 8), (8, 8), (4, 2), (8, 2)}
  for r in rows:
    # Scatters are exact: bit-identical to the single-device write, in every copy.
    assert r["layer_equal"] and r["copies_equal"] and r["cache_equal"], r
    assert r["layer_sharding"] and r["cache_sharding"], r
    assert r["pool"]["shard_devices"] == r["mesh"]
    assert r["pool"]["shard_shapes"] == [[r["kv_per_shard"], 24, 4, 8]]
    assert r["pool_heads"] == r["mesh"] * r["kv_per_shard"]


def test_sharded_engine_equals_single_device(multi_device):
  rows = multi_device["engine"]
  assert [r["mesh"] for r in rows] == [4, 8]
  for r in rows:
    assert r["equal"] and r["num_outputs"] == 5, r
    assert r["generated"] == r["want_generated"] > 0
    assert r["preemptions_swap"] > 0 and r["cow_copies"] > 0  # swaps and a fork ran sharded
    assert r["used_blocks_after"] == 0
    # The tiny model has 2 KV heads: one whole KV head copy per device, 14 blocks each.
    assert r["cache_sharding"] and r["pool"]["shard_devices"] == r["mesh"]
    assert r["pool"]["shard_shapes"] == [[1, 14, 8, 16]]
    # EngineConfig.mesh alone did it: the layers run on the mesh, the pools have the pool
    # heads (2 KV heads copied to one per device), the host pool matches the device pool.
    assert r["attn_mesh"], r
    assert r["pool_heads"] == r["want_pool_heads"] == r["host_pool_heads"] == r["mesh"], r
  # One q/k/v weight (4 query and 2 KV heads of 16). On 4 devices the KV heads are copied
  # and the query layout is the identity: each device holds its query head and the k and v
  # of its copy. On 8 the queries are padded (not the identity): replicated, in the
  # one-device column order.
  r4, r8 = rows
  assert r4["qkv"]["shard_shapes"] == [[64, (1 + 2 * 1) * 16]] and r4["qkv_shards"] == 4, r4
  assert r8["qkv"]["shard_shapes"] == [[64, (4 + 2 * 2) * 16]] and r8["qkv_shards"] == 1, r8
  # The MLP (mlp_dim 192): gate/up by columns in n blocks of [gate | up], down by rows.
  for r, n in zip(rows, (4, 8), strict=True):
    assert r["mlp_shards"] == n, r
    assert r["gate_up"]["shard_shapes"] == [[64, 2 * 192 // n]], r
    assert r["down"]["shard_shapes"] == [[192 // n, 64]], r


def test_a_fused_qkv_weight_is_sharded_by_whole_heads(multi_device):
  # 16 query and 8 KV heads of 8 over 4 and 8 devices: each device holds the columns of
  # its own q, k and v heads ((16 + 2 * 8) * 8 / n), and the step's logits are the
  # single-device ones up to float rounding of the all-reduced sums. 8 query and 2 KV
  # heads: the KV heads are copied, so each device holds its 8 / n query heads and the k
  # and v of its one pool head ((8 / n + 2) * 8).
  rows = multi_device["fused_weights"]
  assert [(r["num_q_heads"], r["num_kv_heads"], r["mesh"]) for r in rows] == [
    (16, 8, 4),
    (16, 8, 8),
    (8, 2, 4),
    (8, 2, 8),
  ]
  for r in rows:
    n, hq, hkv = r["mesh"], r["num_q_heads"], r["num_kv_heads"]
    assert r["qkv_shards"] == n and r["qkv"]["shard_devices"] == n, r
    assert r["qkv"]["shard_shapes"] == [[32, (hq // n + 2 * -(-hkv // n)) * 8]], r
    assert r["canonical_equal"] and r["finite"], r
    assert r["max_abs_err"] <= SHARDED.atol, r
    # Each device's columns are its own heads: nothing crosses devices but the Megatron
    # all-reduces of [tokens, d_model] after the o projection and the MLP.
    assert r["collectives"] == [["all-reduce", [24, 32]]] * 2, r


# ---------------------------------------------------------------------------------------------
# The mesh option, in process (one device).


def test_mesh_option_checks_its_input():
  from paxcache.engine import EngineConfig
  from paxcache.nn import PagedAttention

  mesh = sh.make_mesh(1)
  with pytest.raises(ValueError, match="jax.sharding.Mesh"):
    EngineConfig(mesh="model")
  with pytest.raises(ValueError, match="mesh_axis 'data'"):
    EngineConfig(mesh=mesh, mesh_axis="data")
  with pytest.raises(ValueError, match="not 'data'"):
    PagedAttention(8, 2, 1, 4, mesh=mesh, mesh_axis="data", rngs=nnx.Rngs(0))


def test_paged_attention_on_a_one_device_mesh_equals_no_mesh():
  """The mesh path (shard_map write and kernel) against the plain path, same parameters,
  on a 1-device mesh: the subprocess checks cover 4 and 8 devices."""
  from paxcache.nn import PagedAttention

  rng = np.random.default_rng(3)
  attn = PagedAttention(16, 4, 2, 8, rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((5, 16)).astype(np.float32))
  positions = jnp.asarray([0, 1, 2, 0, 1], jnp.int32)
  paged = dict(
    block_table=jnp.asarray([[2, -1], [0, -1]], jnp.int32),
    lengths=jnp.asarray([3, 2], jnp.int32),
    slot_mapping=jnp.asarray([8, 9, 10, 0, 1], jnp.int32),
    cu_q_lens=jnp.asarray([0, 3, 5], jnp.int32),
  )
  # Two fresh caches: the write donates its cache.
  want, want_cache = attn(x, positions, PagedKVCache.create(2, 2, 4, 4, 8), layer=1, **paged)
  attn.set_mesh(sh.make_mesh(1))
  assert attn.mesh is not None
  got, got_cache = attn(x, positions, PagedKVCache.create(2, 2, 4, 4, 8), layer=1, **paged)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **SHARDED)
  chex.assert_trees_all_equal(got_cache, want_cache)


@pytest.mark.parametrize(
  "change,match",
  [
    (dict(block_table=np.array([[2, 99], [0, -1]], np.int32)), r"ids outside \[0, 4\)"),
    (dict(lengths=np.array([3, 2])), "lengths must be int32"),
  ],
)
def test_a_refused_call_on_a_mesh_leaves_the_cache_whole(change, match):
  # The sharded write donates the layer's pools; the sharded attention's checks used to
  # run after it, so a refused call deleted the caller's cache.
  from paxcache.nn import PagedAttention

  mesh = sh.make_mesh(1)
  attn = PagedAttention(16, 4, 2, 8, mesh=mesh, rngs=nnx.Rngs(0))
  cache = sh.shard_cache(PagedKVCache.create(2, 2, 4, 4, 8), mesh)
  paged = dict(
    block_table=np.array([[2, -1], [0, -1]], np.int32),
    lengths=np.array([3, 2], np.int32),
    slot_mapping=np.array([8, 9, 10, 0, 1], np.int32),
    cu_q_lens=np.array([0, 3, 5], np.int32),
  )
  x, positions = jnp.ones((5, 16)), np.array([0, 1, 2, 0, 1], np.int32)
  with pytest.raises(ValueError, match=match):
    attn(x, positions, cache, layer=1, **(paged | change))
  np.testing.assert_array_equal(np.asarray(cache.layer(1)[0]), 0)  # not donated, not written
  out, _ = attn(x, positions, cache, layer=1, **paged)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("flag", ["lane_padded", "lane_dense"])
def test_sharded_attention_refuses_packed_or_padded_pools_by_name(flag):
  # A lane-padded or lane-dense pool (kernels._layout) is not sharded yet: refused before
  # any mesh is touched, naming the layouts, not with a head_dim mismatch from the plain
  # check.
  q = jnp.zeros((2, 4, 80), jnp.float32)
  pool = jnp.zeros((2, 4, 16, 128), jnp.float32)
  table, lengths = jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32)
  with pytest.raises(ValueError, match="lane-padded pools .* not sharded yet"):
    sh.sharded_paged_attention(None, q, pool, pool, table, lengths, **{flag: True})


@pytest.mark.parametrize("flag,head_dim", [("lane_padded", 80), ("lane_dense", 64)])
def test_lane_padded_and_lane_dense_caches_are_refused_with_a_mesh(flag, head_dim):
  # Neither layout is sharded yet: shard_cache, Decoder.init_cache and EngineConfig say so
  # by name instead of sharding a pool that the sharded attention would then refuse.
  from paxcache.engine import EngineConfig
  from paxcache.nn import Decoder, DecoderConfig

  mesh = sh.make_mesh(1)
  cache = PagedKVCache.create(1, 2, 4, 16, head_dim, **{flag: True})
  with pytest.raises(ValueError, match=f"{flag}=True.*not sharded yet"):
    sh.shard_cache(cache, mesh)
  config = DecoderConfig(
    d_model=32, num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=head_dim, mlp_dim=32
  )
  model = sh.shard_model(Decoder(config, rngs=nnx.Rngs(0)), mesh)
  with pytest.raises(ValueError, match=f"not sharded yet: pass {flag}=False with a mesh"):
    model.init_cache(4, 16, **{flag: True})
  with pytest.raises(ValueError, match=f"{flag}_cache with a mesh: .* not sharded yet"):
    EngineConfig(mesh=mesh, **{f"{flag}_cache": True})
