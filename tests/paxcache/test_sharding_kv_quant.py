"""8-bit caches sharded over KV heads (4 simulated CPU devices, in a subprocess): the
quantizing write and the attention over int8 pools and their scale pools, per device,
against one device; KV heads copied where 2 heads spread over 4 devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
print(json.dumps(dict(device_count=jax.device_count(), rows=rows)))
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
