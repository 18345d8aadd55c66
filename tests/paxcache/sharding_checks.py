"""Sharded-vs-single-device checks on N simulated CPU devices, run in a subprocess.

``python tests/paxcache/sharding_checks.py N`` sets ``XLA_FLAGS`` before jax starts (the
device count is fixed when jax initialises, so it cannot be changed inside a pytest
process that already imported jax), runs every check and prints one JSON object on the
last line of stdout. ``tests/paxcache/test_sharding.py`` runs it for N = 4 and 8 and
asserts on the numbers; the script itself asserts nothing, so that a failing comparison
reaches pytest with its values.
"""

from __future__ import annotations

import functools
import json
import os
import sys

NUM_DEVICES = int(sys.argv[1])
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NUM_DEVICES}"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kernels  # noqa: E402
from paxcache import cache as cache_ops  # noqa: E402
from paxcache import sharding as sh  # noqa: E402
from paxcache.cache import PagedKVCache  # noqa: E402

NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM = 24, 4, 8


def _cases(n: int) -> list[tuple[int, int, tuple[str, ...]]]:
  """(num_q_heads, num_kv_heads, modes): KV heads a multiple of the devices (2 per device),
  fewer than the devices (GQA, and MQA), and a count that does not divide (3)."""
  return [
    (4 * n, 2 * n, ("decode", "prefill")),
    (4, 2, ("decode", "prefill")),
    (4, 1, ("decode",)),
    (9, 3, ("decode", "prefill_window_softcap")),
  ]


def _pools(rng, hkv, head_dim=HEAD_DIM):
  shape = (hkv, NUM_BLOCKS, BLOCK_SIZE, head_dim)
  k = rng.standard_normal(shape).astype(np.float32)
  v = rng.standard_normal(shape).astype(np.float32)
  return k, v


def _batch(rng):
  """Three sequences over shuffled blocks; unused table entries -1, unused blocks NaN."""
  lengths = np.array([1, 9, 15], np.int32)  # 1, 2*bs+1, 4*bs-1
  max_blocks = 4
  perm = rng.permutation(NUM_BLOCKS)
  table = np.full((3, max_blocks), kernels.INVALID_BLOCK, np.int32)
  used = []
  j = 0
  for b, n in enumerate(lengths):
    nb = -(-int(n) // BLOCK_SIZE)
    table[b, :nb] = perm[j : j + nb]
    used.extend(perm[j : j + nb])
    j += nb
  return table, lengths, np.setdiff1d(np.arange(NUM_BLOCKS), used)


def check_attention(mesh, rng) -> list[dict]:
  rows = []
  modes = {
    "decode": (3, None, {}),
    "prefill": (12, True, {}),  # 9 real rows + 3 bucket-padding rows
    "prefill_window_softcap": (12, True, dict(sliding_window=6, logit_soft_cap=5.0)),
  }
  for hq, hkv, names in _cases(NUM_DEVICES):
    k, v = _pools(rng, hkv)
    table, lengths, unused = _batch(rng)
    k[:, unused], v[:, unused] = np.nan, np.nan
    cache = sh.shard_cache(PagedKVCache(k=jnp.asarray(k)[None], v=jnp.asarray(v)[None]), mesh)
    ks, vs = cache.k[0], cache.v[0]
    q_lens = np.array([1, 5, 3], np.int32)  # a decode row and two prefill chunks
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32))
    for mode in names:
      num_q, ragged, extra = modes[mode]
      q = jnp.asarray(rng.standard_normal((num_q, hq, HEAD_DIM)).astype(np.float32))
      args = (jnp.asarray(table), jnp.asarray(lengths), cu if ragged else None)
      single = jax.jit(functools.partial(kernels.paged_attention, **extra))
      want = single(q, jnp.asarray(k), jnp.asarray(v), *args)
      sharded = jax.jit(
        functools.partial(sh.sharded_paged_attention, mesh, num_kv_heads=hkv, **extra)
      )
      got = sharded(q, ks, vs, *args)
      got_np, want_np = np.asarray(got), np.asarray(want)
      rows.append(
        dict(
          num_q_heads=hq,
          num_kv_heads=hkv,
          mode=mode,
          max_abs_err=float(np.nanmax(np.abs(got_np - want_np))),
          finite=bool(np.isfinite(got_np).all()),
          want_finite=bool(np.isfinite(want_np).all()),
          q_identity=sh.head_layout(NUM_DEVICES, hkv, hq).q_identity,
          out_sharded=len({s.device for s in got.addressable_shards}) == NUM_DEVICES,
        )
      )
  return rows


def check_pallas_under_shard_map(mesh, rng) -> dict:
  """The GPU Pallas decode kernel (interpret mode) as the per-device kernel."""
  hq, hkv = 2 * NUM_DEVICES, NUM_DEVICES
  k, v = _pools(rng, hkv, head_dim=64)  # the smallest head_dim the GPU kernel takes
  table, lengths, _ = _batch(rng)
  cache = sh.shard_cache(PagedKVCache(k=jnp.asarray(k)[None], v=jnp.asarray(v)[None]), mesh)
  q = jnp.asarray(rng.standard_normal((3, hq, 64)).astype(np.float32))
  args = (jnp.asarray(table), jnp.asarray(lengths))
  want = kernels.paged_attention(q, jnp.asarray(k), jnp.asarray(v), *args)
  got = sh.sharded_paged_attention(
    mesh, q, cache.k[0], cache.v[0], *args, backend="gpu", interpret=True
  )
  return dict(max_abs_err=float(np.abs(np.asarray(got) - np.asarray(want)).max()))


def check_writes(mesh, rng) -> list[dict]:
  rows = []
  for hq, hkv, _ in _cases(NUM_DEVICES):
    layout = sh.head_layout(NUM_DEVICES, hkv, hq)
    num_layers = 2
    k = rng.standard_normal((num_layers, hkv, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    slots = np.array([5, 17, -1, 40, 95, 0, -1], np.int32)  # -1: padding rows
    k_new = rng.standard_normal((len(slots), hkv, HEAD_DIM)).astype(np.float32)
    v_new = rng.standard_normal(k_new.shape).astype(np.float32)

    # One layer's pools, kernels.write_kv.
    want_k, want_v = kernels.write_kv(
      jnp.asarray(k[1]), jnp.asarray(v[1]), jnp.asarray(k_new), jnp.asarray(v_new), slots
    )
    sc = sh.shard_cache(PagedKVCache(k=jnp.asarray(k), v=jnp.asarray(v)), mesh)
    got_k, got_v = sh.sharded_write_kv(
      mesh, sc.k[1], sc.v[1], jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(slots)
    )
    view = sh.unshard_cache(PagedKVCache(k=got_k[None], v=got_v[None]), hkv, NUM_DEVICES)
    layer_equal = bool(
      np.array_equal(np.asarray(view.k[0]), np.asarray(want_k))
      and np.array_equal(np.asarray(view.v[0]), np.asarray(want_v))
    )
    # Every copy of a KV head holds the same bytes as the model's head.
    copies_equal = bool(
      np.array_equal(np.asarray(got_k), np.asarray(want_k)[np.asarray(layout.kv_heads)])
    )
    layer_sharding = got_k.sharding.is_equivalent_to(
      sh.kv_sharding(mesh, hkv).layer_pool, got_k.ndim
    )

    # The whole 5-D cache, paxcache.cache.write semantics, inside jit with donation.
    want_cache = cache_ops.write(
      PagedKVCache(k=jnp.asarray(k), v=jnp.asarray(v)),
      1,
      jnp.asarray(k_new),
      jnp.asarray(v_new),
      slots,
    )
    sc = sh.shard_cache(PagedKVCache(k=jnp.asarray(k), v=jnp.asarray(v)), mesh)
    step = jax.jit(
      lambda c, kn, vn, s: sh.sharded_cache_write(mesh, c, 1, kn, vn, s), donate_argnums=0
    )
    got_cache = step(sc, jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(slots))
    view = sh.unshard_cache(got_cache, hkv, NUM_DEVICES)
    spec = sh.kv_sharding(mesh, hkv, hq)
    shards = got_cache.k.addressable_shards
    rows.append(
      dict(
        num_q_heads=hq,
        num_kv_heads=hkv,
        pool_heads=layout.pool_heads,
        layer_equal=layer_equal,
        copies_equal=copies_equal,
        layer_sharding=bool(layer_sharding),
        cache_equal=bool(
          np.array_equal(np.asarray(view.k), np.asarray(want_cache.k))
          and np.array_equal(np.asarray(view.v), np.asarray(want_cache.v))
        ),
        cache_sharding=bool(got_cache.k.sharding.is_equivalent_to(spec.pool, 5)),
        shard_shapes=sorted({tuple(s.data.shape) for s in shards}),
        shard_devices=len({s.device for s in shards}),
        kv_per_shard=layout.kv_per_shard,
      )
    )
  return rows


def check_engine(mesh) -> dict:
  """Greedy outputs of the trained tiny model (4 query heads, 2 KV heads) through the
  engine, sharded against one device, with swap preemptions and a fork."""
  from paxcache.engine import Engine, EngineConfig, Request
  from paxcache.nn import load_decoder

  with open("data/tiny_corpus.txt", "rb") as f:
    corpus = f.read()
  spec = [(3, 14, 1), (40, 10, 1), (21, 12, 2), (9, 16, 1), (30, 8, 1)]
  reqs = []
  for i, (p, g, n) in enumerate(spec):
    start = 37 * i + 11
    reqs.append(Request(i, list(corpus[start : start + p]), max_new_tokens=g, n=n))
  config = EngineConfig(
    num_blocks=14,
    block_size=8,
    num_host_blocks=32,
    preemption_mode="swap",
    max_num_seqs=4,
    max_num_batched_tokens=32,
    check_invariants=True,
  )
  single = Engine(load_decoder(), config)
  want = single.run(list(reqs))

  model = sh.shard_model(load_decoder(), mesh)
  engine = Engine(model, config)
  sh.shard_engine_cache(engine, mesh)
  got = engine.run(list(reqs))
  spec_kv = sh.kv_sharding(mesh, model.config.num_kv_heads)
  q_kernel = model.layers[0].attn.attn.q_proj.kernel.value
  return dict(
    equal=all(got[r.request_id].samples == want[r.request_id].samples for r in reqs),
    num_requests=len(got),
    generated=int(engine.metrics.generated_tokens),
    preemptions_swap=int(engine.metrics.preemptions_swap),
    cow_copies=int(engine.metrics.cow_copies),
    single_preemptions_swap=int(single.metrics.preemptions_swap),
    cache_sharded=bool(engine.cache.k.sharding.is_equivalent_to(spec_kv.pool, 5)),
    cache_shard_heads=sorted({s.data.shape[1] for s in engine.cache.k.addressable_shards}),
    q_proj_shard_shapes=sorted({tuple(s.data.shape) for s in q_kernel.addressable_shards}),
  )


def main():
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  mesh = sh.make_mesh()
  rng = np.random.default_rng(NUM_DEVICES)
  out = dict(
    num_devices=jax.device_count(),
    attention=check_attention(mesh, rng),
    pallas=check_pallas_under_shard_map(mesh, rng),
    writes=check_writes(mesh, rng),
    engine=check_engine(mesh),
  )
  print(json.dumps(out))


if __name__ == "__main__":
  main()
