"""8-bit caches sharded over KV heads (4 simulated CPU devices, in a subprocess): the
quantizing write and the attention over int8 pools and their scale pools, per device,
against one device; KV heads copied where 2 heads spread over 4 devices; the decoder over
an int8 cache with its rows rotated and not, sharded against one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CODE = r"""
import json
import jax, jax.numpy as jnp, numpy as np
import kernels
from paxcache import cache as cache_ops, sharding as sh
from paxcache.cache import PagedKVCache

rng = np.random.default_rng(0)
rows = []
for hq, hkv in ((8, 4), (4, 2)):  # 4 KV heads: one per device; 2: each copied twice
  mesh = sh.make_mesh(4)
  L, NB, BS, D = 2, 12, 8, 16
  pool = lambda: jnp.asarray(rng.standard_normal((L, hkv, NB, BS, D)), jnp.float32)
  kq, ks = kernels.quantize(pool(), jnp.int8)
  vq, vs = kernels.quantize(pool(), jnp.int8)
  slots = np.array([5, 17, -1, 40, 95, 0], np.int32)
  k_new = jnp.asarray(rng.standard_normal((6, hkv, D)), jnp.float32)
  v_new = jnp.asarray(rng.standard_normal((6, hkv, D)), jnp.float32)
  want = cache_ops.write(PagedKVCache.from_stacked(kq, vq, ks, vs), 1, k_new, v_new, slots)
  sc = sh.shard_cache(PagedKVCache.from_stacked(kq, vq, ks, vs), mesh)
  step = jax.jit(lambda c, a, b, s: sh.sharded_cache_write(mesh, c, 1, a, b, s), donate_argnums=0)
  got = step(sc, k_new, v_new, jnp.asarray(slots))
  view = sh.unshard_cache(got, hkv, 4)
  spec = sh.kv_sharding(mesh, hkv, hq)
  write_equal = all(
    np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(view), jax.tree.leaves(want), strict=True)
  )
  sharded = all(x.sharding.is_equivalent_to(spec.pool, x.ndim) for x in jax.tree.leaves(got))
  table = jnp.asarray([[1, 4, 7], [2, 9, -1]], jnp.int32)
  lengths = jnp.asarray([20, 11], jnp.int32)
  q = jnp.asarray(rng.standard_normal((2, hq, D)), jnp.float32)
  ref = kernels.paged_attention(q, *want.layer(1), table, lengths, **want.scales(1))
  out = sh.sharded_paged_attention(
    mesh, q, *got.layer(1), table, lengths, num_kv_heads=hkv, **got.scales(1)
  )
  rows.append(dict(
    hq=hq, hkv=hkv, write_equal=write_equal, sharded=sharded,
    max_err=float(np.max(np.abs(np.asarray(out) - np.asarray(ref)))),
  ))

# The model over an int8 cache on 4 devices, rows rotated (DecoderConfig.kv_rotation: the
# layer's mesh path rotates q, k and v apart) and not, against one device: a ragged
# prefill of 4 sequences, then one decode step each. One layer: in a second one, the
# all-reduces' float order (1e-7 apart from one device's sums) can move a K/V value
# across an int8 rounding boundary, a logit error of ~1e-3 that says nothing of the
# rotation (seen with 2 layers, 4 query / 2 KV heads, unrotated).
import functools
from flax import nnx
from paxcache.nn import Decoder, DecoderConfig

table = np.arange(12).reshape(4, 3)[::-1].copy()

def batch(lengths_before, n_new):
  pos = np.concatenate([np.arange(b, b + n_new) for b in lengths_before])
  seq = np.repeat(np.arange(4), n_new)
  slots = table[seq, pos // 4] * 4 + pos % 4
  toks = (pos * 7 + seq * 3) % 64
  lens = np.asarray(lengths_before) + n_new
  cu = np.arange(5) * n_new
  return tuple(jnp.asarray(a, jnp.int32) for a in (toks, pos, table, lens, slots, cu))

def step(graphdef, state, cache, toks, pos, table, lens, slots, cu):
  m = nnx.merge(graphdef, state)
  return m(toks, pos, cache, block_table=table, lengths=lens, slot_mapping=slots, cu_q_lens=cu)

def run(model):
  graphdef, state = nnx.split(model)
  cache = model.init_cache(12, 4)
  f = jax.jit(functools.partial(step, graphdef))
  out1, cache = f(state, cache, *batch([0] * 4, 6))
  out2, cache = f(state, cache, *batch([6] * 4, 1))
  return np.concatenate([np.asarray(out1), np.asarray(out2)]), cache

mesh = sh.make_mesh(4)
model_rows = []
for hq, hkv in ((8, 4), (4, 2)):
  for rotation in (True, False):
    config = DecoderConfig(vocab_size=64, d_model=32, num_layers=1, num_q_heads=hq,
                           num_kv_heads=hkv, head_dim=8, mlp_dim=64, kv_dtype="int8",
                           kv_rotation=rotation)
    want, want_cache = run(Decoder(config, rngs=nnx.Rngs(3)))
    got, got_cache = run(sh.shard_model(Decoder(config, rngs=nnx.Rngs(3)), mesh))
    pairs = list(zip(jax.tree.leaves(sh.unshard_cache(got_cache, hkv, 4)),
                     jax.tree.leaves(want_cache), strict=True))
    pools_equal = all(np.array_equal(np.asarray(a), np.asarray(b))
                      for a, b in pairs if a.dtype == jnp.int8)
    scales = [(np.asarray(a), np.asarray(b)) for a, b in pairs if a.dtype == jnp.float32]
    # slots no step wrote keep init_cache's 0 scales, on both
    pools_equal &= all(np.array_equal(a == 0, b == 0) for a, b in scales)
    scale_rel = max(float(np.max(np.abs(a - b) / np.where(b == 0, 1, np.abs(b))))
                    for a, b in scales)
    model_rows.append(dict(hq=hq, hkv=hkv, rotation=rotation, pools_equal=pools_equal,
                           scale_rel=scale_rel,
                           rotated=[bool(want_cache.rotated), bool(got_cache.rotated)],
                           max_err=float(np.max(np.abs(got - want))),
                           finite=bool(np.isfinite(got).all()), logits=want.tolist()))
print(json.dumps(dict(device_count=jax.device_count(), rows=rows, model_rows=model_rows)))
"""


def test_sharded_int8_write_and_attention_match_one_device():
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p),
  )
  proc = subprocess.run(
    [sys.executable, "-c", CODE], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["device_count"] == 4
  from kernels.testing import tolerance

  bound = tolerance("sharded_vs_single_device", "float32").atol
  for row in out["rows"]:
    assert row["write_equal"] and row["sharded"], row
    assert row["max_err"] <= bound, row
  # The model over an int8 cache, rotated rows or not: the mesh's logits are one device's.
  models = out["model_rows"]
  assert [(r["hq"], r["hkv"], r["rotation"]) for r in models] == [
    (8, 4, True), (8, 4, False), (4, 2, True), (4, 2, False)
  ]  # fmt: skip
  for row in models:
    assert row["rotated"] == [row["rotation"]] * 2 and row["finite"], row
    assert row["pools_equal"], row  # the int8 rows written, bit for bit
    # Their scales: equal unrotated; rotated, within 4 float32 ulps (the mesh path rotates
    # q, k and v by separate float32 products, one device by one over their concatenation:
    # a row's largest |value|, which its scale stores, may round apart in the last bit).
    assert row["scale_rel"] <= (4 * 2.0**-23 if row["rotation"] else 0.0), row
    assert row["max_err"] <= bound, {k: v for k, v in row.items() if k != "logits"}
  # ... and the rotation changed them (the rotated path is the one under test).
  for on, off in (models[0:2], models[2:4]):
    assert np.max(np.abs(np.subtract(on["logits"], off["logits"]))) > 100 * bound
