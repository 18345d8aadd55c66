"""Sharded-vs-single-device checks on simulated CPU devices, run in a subprocess.

``python tests/paxcache/sharding_checks.py 4 8`` starts jax with 8 host devices
(``XLA_FLAGS`` must be set before jax initialises, so this cannot run inside a pytest
process that already imported jax) and runs every check on a ``model`` mesh of 4 devices
(the first four) and one of 8, against single-device results computed once. It prints
one JSON object on the last line of stdout; ``tests/paxcache/test_sharding.py`` asserts
on it. The script itself asserts nothing, so that a failing comparison reaches pytest
with its values.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
import time

MESH_SIZES = [int(a) for a in sys.argv[1:]] or [4, 8]
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={max(MESH_SIZES)}"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kernels  # noqa: E402
from paxcache import cache as cache_ops  # noqa: E402
from paxcache import sharding as sh  # noqa: E402
from paxcache.cache import PagedKVCache  # noqa: E402

NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM = 24, 4, 8


# (num_q_heads, num_kv_heads, modes). On 4 and 8 devices: 8 KV heads are a multiple of the
# devices (2 per device) or one each; 2 are fewer than the devices (on 8 devices the 4
# query heads of 2 KV heads do not split over the 4 copies each: padded query slots); 3
# neither divides nor is divided by the devices. (MQA takes the same paths as 2 KV heads;
# test_head_layout_invariants covers its layout.)
CASES = [
  (16, 8, ("decode", "prefill")),
  (4, 2, ("decode", "prefill")),
  (9, 3, ("decode", "prefill_window_softcap")),
]
WRITE_CASES = [(16, 8), (4, 2), (9, 3)]


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


def _shard_info(x) -> dict:
  shards = x.addressable_shards
  return dict(
    shard_shapes=sorted({tuple(sh_.data.shape) for sh_ in shards}),
    shard_devices=len({sh_.device for sh_ in shards}),
  )


_COLLECTIVE = re.compile(
  r"= (\w+)\[([\d,]*)\][^=]*? (all-gather|all-reduce|all-to-all|collective-permute|"
  r"reduce-scatter)(?:-start)?\("
)


def _collectives(hlo: str) -> list[list]:
  """``[op, shape]`` of every cross-device collective in compiled HLO text."""
  return [[op, [int(d) for d in dims.split(",") if d]] for _, dims, op in _COLLECTIVE.findall(hlo)]


def check_attention(meshes, rng) -> list[dict]:
  modes = {
    "decode": (3, False, {}),
    "prefill": (12, True, {}),  # 9 real rows + 3 bucket-padding rows
    "prefill_window_softcap": (12, True, dict(sliding_window=6, logit_soft_cap=5.0)),
  }
  rows = []
  for hq, hkv, names in CASES:
    k, v = _pools(rng, hkv)
    table, lengths, unused = _batch(rng)
    k[:, unused], v[:, unused] = np.nan, np.nan
    pools = PagedKVCache(k=(jnp.asarray(k),), v=(jnp.asarray(v),))
    placed = {n: sh.shard_cache(pools, mesh) for n, mesh in meshes.items()}
    q_lens = np.array([1, 5, 3], np.int32)  # a decode row and two prefill chunks
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32))
    for mode in names:
      num_q, ragged, extra = modes[mode]
      q = jnp.asarray(rng.standard_normal((num_q, hq, HEAD_DIM)).astype(np.float32))
      args = (jnp.asarray(table), jnp.asarray(lengths), cu if ragged else None)
      single = jax.jit(functools.partial(kernels.paged_attention, **extra))
      want = np.asarray(single(q, jnp.asarray(k), jnp.asarray(v), *args))
      for n, mesh in meshes.items():
        sharded = jax.jit(
          functools.partial(sh.sharded_paged_attention, mesh, num_kv_heads=hkv, **extra)
        )
        compiled = sharded.lower(q, placed[n].k[0], placed[n].v[0], *args).compile()
        got = compiled(q, placed[n].k[0], placed[n].v[0], *args)
        got_np = np.asarray(got)
        rows.append(
          dict(
            mesh=n,
            num_q_heads=hq,
            num_kv_heads=hkv,
            mode=mode,
            max_abs_err=float(np.max(np.abs(got_np - want))),
            finite=bool(np.isfinite(got_np).all()),
            want_finite=bool(np.isfinite(want).all()),
            q_identity=sh.head_layout(n, hkv, hq).q_identity,
            out_devices=len({s.device for s in got.addressable_shards}),
            collectives=_collectives(compiled.as_text()),
            pool=_shard_info(placed[n].k[0]),
          )
        )
  return rows


def check_pallas_under_shard_map(mesh, rng) -> dict:
  """The GPU Pallas decode kernel (interpret mode) as the per-device kernel."""
  n = mesh.shape[sh.MODEL_AXIS]
  hq, hkv = 2 * n, n
  k, v = _pools(rng, hkv, head_dim=64)  # the smallest head_dim the GPU kernel takes
  table, lengths, _ = _batch(rng)
  cache = sh.shard_cache(PagedKVCache(k=(jnp.asarray(k),), v=(jnp.asarray(v),)), mesh)
  q = jnp.asarray(rng.standard_normal((3, hq, 64)).astype(np.float32))
  args = (jnp.asarray(table), jnp.asarray(lengths))
  want = kernels.paged_attention(q, jnp.asarray(k), jnp.asarray(v), *args)
  got = sh.sharded_paged_attention(
    mesh, q, cache.k[0], cache.v[0], *args, backend="gpu", interpret=True
  )
  return dict(mesh=n, max_abs_err=float(np.abs(np.asarray(got) - np.asarray(want)).max()))


def check_writes(meshes, rng) -> list[dict]:
  rows = []
  num_layers = 2
  for hq, hkv in WRITE_CASES:
    k = rng.standard_normal((num_layers, hkv, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    slots = np.array([5, 17, -1, 40, 95, 0, -1], np.int32)  # -1: padding rows
    k_new = jnp.asarray(rng.standard_normal((len(slots), hkv, HEAD_DIM)).astype(np.float32))
    v_new = jnp.asarray(rng.standard_normal(k_new.shape).astype(np.float32))
    # Oracles: one layer with kernels.write_kv, the 5-D cache with paxcache.cache.write.
    want_k, want_v = (
      np.asarray(x)
      for x in kernels.write_kv(jnp.asarray(k[1]), jnp.asarray(v[1]), k_new, v_new, slots)
    )
    want_cache = cache_ops.write(PagedKVCache.from_stacked(k, v), 1, k_new, v_new, slots)
    want_ck, want_cv = (np.asarray(x) for x in want_cache.stacked())
    for n, mesh in meshes.items():
      layout = sh.head_layout(n, hkv, hq)
      spec = sh.kv_sharding(mesh, hkv, hq)
      sc = sh.shard_cache(PagedKVCache.from_stacked(k, v), mesh)
      got_k, got_v = sh.sharded_write_kv(mesh, sc.k[1], sc.v[1], k_new, v_new, jnp.asarray(slots))
      view = sh.unshard_cache(PagedKVCache(k=(got_k,), v=(got_v,)), hkv, n)
      copies = np.asarray(layout.kv_heads)
      sc = sh.shard_cache(PagedKVCache.from_stacked(k, v), mesh)
      step = jax.jit(
        lambda c, kn, vn, s, mesh=mesh: sh.sharded_cache_write(mesh, c, 1, kn, vn, s),
        donate_argnums=0,
      )
      got_cache = step(sc, k_new, v_new, jnp.asarray(slots))
      cview = sh.unshard_cache(got_cache, hkv, n)
      rows.append(
        dict(
          mesh=n,
          num_q_heads=hq,
          num_kv_heads=hkv,
          pool_heads=layout.pool_heads,
          kv_per_shard=layout.kv_per_shard,
          layer_equal=bool(
            np.array_equal(np.asarray(view.k[0]), want_k)
            and np.array_equal(np.asarray(view.v[0]), want_v)
          ),
          # Every copy of a KV head holds the same bytes as the model's head.
          copies_equal=bool(
            np.array_equal(np.asarray(got_k), want_k[copies])
            and np.array_equal(np.asarray(got_v), want_v[copies])
          ),
          layer_sharding=bool(got_k.sharding.is_equivalent_to(spec.pool, 4)),
          cache_equal=bool(
            np.array_equal(np.asarray(cview.stacked()[0]), want_ck)
            and np.array_equal(np.asarray(cview.stacked()[1]), want_cv)
          ),
          cache_sharding=all(p.sharding.is_equivalent_to(spec.pool, 4) for p in got_cache.k),
          pool=_shard_info(got_cache.k[0]),
        )
      )
  return rows


def check_model_collectives(meshes) -> list[dict]:
  """What crosses devices in one sharded model call (a 32-token ragged step of the tiny
  model): the collectives of the compiled HLO, with their shapes."""
  from flax import nnx

  from paxcache.nn import load_decoder

  rows = []
  tokens = 32
  for n, mesh in meshes.items():
    model = sh.shard_model(load_decoder(), mesh)
    cache = sh.shard_cache(model.init_cache(14, 8), mesh)
    graphdef, state = nnx.split(model)

    def step(state, cache, *batch, graphdef=graphdef):
      toks, pos, table, lens, slots, cu = batch
      m = nnx.merge(graphdef, state)
      return m(toks, pos, cache, block_table=table, lengths=lens, slot_mapping=slots, cu_q_lens=cu)

    batch = (
      jnp.zeros(tokens, jnp.int32),
      jnp.zeros(tokens, jnp.int32),
      jnp.zeros((4, 8), jnp.int32),
      jnp.ones(4, jnp.int32),
      jnp.arange(tokens, dtype=jnp.int32),
      jnp.asarray([0, 8, 16, 24, 32], jnp.int32),
    )
    hlo = jax.jit(step, donate_argnums=1).lower(state, cache, *batch).compile().as_text()
    c = model.config
    rows.append(
      dict(
        mesh=n,
        tokens=tokens,
        d_model=c.d_model,
        num_layers=c.num_layers,
        num_q_heads=c.num_q_heads,
        head_dim=c.head_dim,
        collectives=_collectives(hlo),
      )
    )
  return rows


def check_fused_weights(meshes) -> list[dict]:
  """A model whose 8 KV heads split evenly over 4 and 8 devices: its one q/k/v weight is
  column-sharded in blocks of [q | k | v] heads, and a ragged paged step (prefill of 4
  sequences) gives the single-device logits with no data moved but the two all-reduces;
  the weight reads back in the one-device order (what ``save_decoder`` writes)."""
  from flax import nnx

  from paxcache.nn import Decoder, DecoderConfig

  # 16 query / 8 KV heads split evenly on 4 and 8 devices; 8 query / 2 KV heads have their
  # KV heads copied (2 and 4 copies), with the query layout still the identity.
  configs = {
    (hq, hkv): DecoderConfig(
      vocab_size=64,
      d_model=32,
      num_layers=1,
      num_q_heads=hq,
      num_kv_heads=hkv,
      head_dim=8,
      mlp_dim=64,
    )
    for hq, hkv in ((16, 8), (8, 2))
  }
  # 4 sequences of 6 tokens in blocks of 4, sequence i in blocks (6 - 2i, 7 - 2i).
  table = np.arange(8).reshape(4, 2)[::-1].copy()
  pos = np.tile(np.arange(6), 4)
  slots = table[np.repeat(np.arange(4), 6), pos // 4] * 4 + pos % 4
  batch = tuple(
    jnp.asarray(a, jnp.int32)
    for a in (np.arange(24) * 7 % 64, pos, table, np.full(4, 6), slots, [0, 6, 12, 18, 24])
  )

  def step(graphdef, state, cache, toks, pos, table, lens, slots, cu):
    m = nnx.merge(graphdef, state)
    logits, _ = m(
      toks, pos, cache, block_table=table, lengths=lens, slot_mapping=slots, cu_q_lens=cu
    )
    return logits

  def run(model):
    """The step's logits and the collectives of its compiled HLO."""
    graphdef, state = nnx.split(model)
    cache = model.init_cache(8, 4)  # sharded over the heads for a sharded model
    jitted = jax.jit(functools.partial(step, graphdef))
    hlo = jitted.lower(state, cache, *batch).compile().as_text()
    return np.asarray(jitted(state, cache, *batch)), _collectives(hlo)

  rows = []
  for (hq, hkv), config in configs.items():
    base = Decoder(config, rngs=nnx.Rngs(3))
    want_w = np.asarray(base.layers[0].attn.qkv.get_value())
    want, _ = run(base)
    for n, mesh in meshes.items():
      model = sh.shard_model(Decoder(config, rngs=nnx.Rngs(3)), mesh)
      attn = model.layers[0].attn
      got, collectives = run(model)
      rows.append(
        dict(
          mesh=n,
          num_q_heads=hq,
          num_kv_heads=hkv,
          qkv_shards=int(attn.shards),
          qkv=_shard_info(attn.qkv.get_value()),
          canonical_equal=bool(np.array_equal(np.asarray(attn.canonical_qkv()), want_w)),
          max_abs_err=float(np.max(np.abs(got - want))),
          finite=bool(np.isfinite(got).all()),
          collectives=collectives,
        )
      )
  return rows


def check_engine(meshes) -> list[dict]:
  """Greedy outputs of the trained tiny model (4 query heads, 2 KV heads) through the
  engine, sharded against one device, with a swap preemption and a fork."""
  from paxcache.engine import Engine, EngineConfig, Request
  from paxcache.nn import TINY_CORPUS, load_decoder

  with open(TINY_CORPUS, "rb") as f:
    corpus = f.read()
  spec = [(3, 14, 1), (40, 10, 1), (21, 12, 2), (9, 16, 1), (30, 8, 1)]
  reqs = []
  for i, (p, g, n) in enumerate(spec):
    start = 37 * i + 11
    reqs.append(Request(i, list(corpus[start : start + p]), max_new_tokens=g, n=n))
  # Large minimum buckets: two step shapes (prefill, decode) compile, not a dozen.
  config = EngineConfig(
    num_blocks=14,
    block_size=8,
    num_host_blocks=32,
    preemption_mode="swap",
    max_num_seqs=4,
    max_num_batched_tokens=32,
    min_batch_bucket=4,
    min_token_bucket=32,
    check_invariants=True,
  )
  single = Engine(load_decoder(), config)
  want = single.run(list(reqs))
  rows = []
  for n, mesh in meshes.items():
    # The mesh is only an engine option: the engine shards the model and builds the pool.
    model = load_decoder()
    engine = Engine(model, dataclasses.replace(config, mesh=mesh))
    got = engine.run(list(reqs))
    spec_kv = sh.kv_sharding(mesh, model.config.num_kv_heads)
    m = engine.metrics
    rows.append(
      dict(
        mesh=n,
        equal=all(got[r.request_id].samples == want[r.request_id].samples for r in reqs),
        num_outputs=len(got),
        generated=int(m.generated_tokens),
        want_generated=int(single.metrics.generated_tokens),
        preemptions_swap=int(m.preemptions_swap),
        cow_copies=int(m.cow_copies),
        cache_sharding=all(p.sharding.is_equivalent_to(spec_kv.pool, 4) for p in engine.cache.k),
        pool_heads=int(engine.cache.num_kv_heads),
        want_pool_heads=spec_kv.layout.pool_heads,
        host_pool_heads=int(engine.host_pool.k.shape[1]),
        attn_mesh=all(layer.attn.mesh is mesh for layer in model.layers),
        pool=_shard_info(engine.cache.k[0]),
        qkv=_shard_info(model.layers[0].attn.qkv.get_value()),
        qkv_shards=int(model.layers[0].attn.shards),
        gate_up=_shard_info(model.layers[0].mlp.gate_up.get_value()),
        down=_shard_info(model.layers[0].mlp.down.kernel.get_value()),
        mlp_shards=int(model.layers[0].mlp.shards),
        used_blocks_after=int(engine.allocator.num_used_blocks),
      )
    )
  return rows


def main():
  meshes = {n: sh.make_mesh(n) for n in MESH_SIZES}
  rng = np.random.default_rng(0)
  out = dict(device_count=jax.device_count(), seconds={})
  checks = [
    ("attention", lambda: check_attention(meshes, rng)),
    ("pallas", lambda: check_pallas_under_shard_map(meshes[max(MESH_SIZES)], rng)),
    ("writes", lambda: check_writes(meshes, rng)),
    # One mesh suffices to see the pattern (and each compile costs seconds).
    ("model_collectives", lambda: check_model_collectives({4: meshes[4]})),
    ("engine", lambda: check_engine(meshes)),
    ("fused_weights", lambda: check_fused_weights(meshes)),
  ]
  for name, check in checks:
    t0 = time.perf_counter()
    out[name] = check()
    out["seconds"][name] = round(time.perf_counter() - t0, 1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
