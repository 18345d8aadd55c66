"""One process of a 2-process JAX job on CPU devices, started by ``paxcache.distributed.launch``.

``python tests/paxcache/multiprocess_checks.py OUT_DIR MODE`` under the launcher (which sets
the coordinator, the process ids and 2 CPU devices per process). Every process writes
``OUT_DIR/p<process>.json``; ``tests/paxcache/test_multiprocess.py`` asserts on them and
on a single-process run of the same requests. The script itself asserts nothing, so that
a failing comparison reaches pytest with its values.

MODE ``serve``: the per-host swap against NumPy, then the engine over the 4-device mesh
with swap and with recompute preemption. MODE ``diverge``: the engine with the guard on
every step, and a request queued on process 1 only after step ``DIVERGE_AT``.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from paxcache import distributed
from paxcache import sharding as sh
from paxcache.cache import PagedKVCache

DIVERGE_AT = 3


def requests(beam: bool = False):
  """Shared with the test (which serves them in one process): prompts from the tiny
  model's corpus; requests 0 and 1 share a 2-block prefix (block_size 8), request 2 forks
  (n=2) and request 3 samples (temperature 0.8, n=2, a fixed seed); with ``beam`` also
  request 5, a beam search of width 2 (not with async scheduling)."""
  from paxcache.engine import Request
  from paxcache.nn import TINY_CORPUS

  with open(TINY_CORPUS, "rb") as f:
    corpus = f.read()

  def text(start, n):
    return list(corpus[start : start + n])

  shared = text(100, 16)
  reqs = [
    Request(0, shared + text(300, 5), max_new_tokens=10),
    Request(1, shared + text(400, 9), max_new_tokens=12),
    Request(2, text(500, 21), max_new_tokens=12, n=2),
    Request(3, text(600, 9), max_new_tokens=14, n=2, temperature=0.8, seed=7),
    Request(4, text(700, 30), max_new_tokens=8),
  ]
  if beam:
    reqs.append(Request(5, text(800, 7), max_new_tokens=6, beam_width=2))
  return reqs


def engine_config(mode: str, mesh=None, **kw):
  """The pool is small enough that these requests preempt (checked by the test)."""
  from paxcache.engine import EngineConfig

  return EngineConfig(
    num_blocks=12,
    block_size=8,
    num_host_blocks=32,
    preemption_mode=mode,
    max_num_seqs=4,
    max_num_batched_tokens=32,
    min_batch_bucket=4,
    min_token_bucket=32,
    check_invariants=True,
    mesh=mesh,
    **kw,
  )


def _place(x: np.ndarray, sharding) -> jax.Array:
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _local(arr: jax.Array, num_heads: int) -> dict[int, np.ndarray]:
  """Pool head -> that head's array, from this process's shards only."""
  out = {}
  for s in arr.addressable_shards:
    data = np.asarray(s.data)
    for j, h in enumerate(range(*s.index[0].indices(num_heads))):
      out[h] = data[j]
  return out


def check_swap(mesh, quantized: bool) -> dict:
  """LocalHostKVPool against NumPy: every process holds only its heads of the host blocks,
  and a swap-in writes back every device's heads."""
  rng = np.random.default_rng(0)  # the same data in every process
  L, H, NB, BS, D = 2, 4, 6, 4, 8
  dtype = np.int8 if quantized else np.float32

  def pool_data(shape):
    if quantized:
      return rng.integers(-127, 128, shape).astype(np.int8)
    return rng.standard_normal(shape).astype(np.float32)

  k = pool_data((L, H, NB, BS, D))
  v = pool_data((L, H, NB, BS, D))
  scales = [rng.random((L, H, NB, BS)).astype(np.float32) for _ in range(2)] if quantized else []
  pool = NamedSharding(mesh, P(sh.MODEL_AXIS))
  cache = PagedKVCache(
    k=tuple(_place(k[i], pool) for i in range(L)),
    v=tuple(_place(v[i], pool) for i in range(L)),
    k_scale=tuple(_place(scales[0][i], pool) for i in range(L)) if quantized else (),
    v_scale=tuple(_place(scales[1][i], pool) for i in range(L)) if quantized else (),
  )
  host = sh.LocalHostKVPool(cache, 5)
  heads = list(host.heads)
  dev, hid = [3, 0, 5], [4, 1, 2]
  host.swap_out(cache, dev, hid)
  full = [k, v] + scales
  mine = [host.k, host.v] + ([host.k_scale, host.v_scale] if quantized else [])
  out_ok = all(
    np.array_equal(m[:, :, hid], f[:, heads][:, :, dev]) for m, f in zip(mine, full, strict=True)
  )
  # Swap host blocks 1 and 4 (device blocks 0 and 3 above) into device blocks 2 and 1.
  cache = host.swap_in(cache, [1, 4], [2, 1])
  want = [f.copy() for f in full]
  for w, f in zip(want, full, strict=True):
    w[:, :, [2, 1]] = f[:, :, [0, 3]]
  got_pools = [cache.k, cache.v] + ([cache.k_scale, cache.v_scale] if quantized else [])
  in_ok = True
  for pools, w in zip(got_pools, want, strict=True):
    for layer in range(L):
      for h, data in _local(pools[layer], H).items():
        in_ok &= bool(np.array_equal(data, w[layer, h]))
  return dict(
    quantized=quantized,
    dtype=np.dtype(dtype).name,
    heads=heads,
    host_shape=list(host.k.shape),
    swap_out_equal=bool(out_ok),
    swap_in_equal=bool(in_ok),
  )


def check_host_readable(mesh) -> dict:
  """A sharded i32[8] (2 values per device) read whole in every process."""
  from paxcache.engine._distributed import host_readable

  x = np.arange(8, dtype=np.int32) * 3
  sharded = _place(x, NamedSharding(mesh, P(sh.MODEL_AXIS)))
  readable = host_readable(sharded)
  return dict(
    was_addressable=sharded.is_fully_addressable,
    equal=np.asarray(readable).tolist() == x.tolist(),
  )


def serve(out_dir: str) -> dict:
  from paxcache.engine import DistributedEngine
  from paxcache.nn import load_decoder

  mesh = sh.make_mesh()
  result = dict(
    host_readable=check_host_readable(mesh),
    process=jax.process_index(),
    processes=jax.process_count(),
    devices=jax.device_count(),
    local_devices=jax.local_device_count(),
    swap=[check_swap(mesh, False), check_swap(mesh, True)],
    runs={},
  )
  for mode, kw in (("swap", {}), ("recompute", {"async_scheduling": True})):
    engine = DistributedEngine(load_decoder(), engine_config(mode, mesh, **kw), guard_every=2)
    # Process 0's requests are served; the others pass nothing.
    reqs = requests(beam=mode == "swap")
    outs = engine.run(reqs if jax.process_index() == 0 else ())
    m = engine.metrics
    a = engine.allocator
    result["runs"][mode] = dict(
      samples={str(k): o.samples for k, o in sorted(outs.items())},
      scores={str(k): o.scores for k, o in sorted(outs.items()) if o.scores is not None},
      preemptions_swap=m.preemptions_swap,
      preemptions_recompute=m.preemptions_recompute,
      swapped_in_blocks=m.swapped_in_blocks,
      prefix_hit_tokens=m.prefix_hit_tokens,
      cow_copies=m.cow_copies,
      steps=m.steps,
      guard_checks=engine.guard_checks,
      used_blocks=a.num_used_blocks,
      free_host_blocks=a.num_free_host_blocks,
      num_host_blocks=a.num_host_blocks,
      host_pool_heads=list(engine.host_pool.heads),
      pool_shards=len(engine.cache.k[0].addressable_shards),
      pool_heads=int(engine.cache.num_kv_heads),
    )
  return result


def diverge(out_dir: str) -> dict:
  from paxcache.engine import DistributedEngine, DivergenceError, Request
  from paxcache.nn import load_decoder

  mesh = sh.make_mesh()
  engine = DistributedEngine(load_decoder(), engine_config("swap", mesh), guard_every=1)
  for r in requests()[:2]:  # every process adds them; process 0's are sent
    engine.add_request(r)
  error = None
  try:
    while engine.has_unfinished():
      engine.step()
      if engine.metrics.steps == DIVERGE_AT and jax.process_index() == 1:
        # A request that reached this process only: its next schedule differs.
        engine._enqueue(Request("rogue", [1, 2, 3], max_new_tokens=2))
  except DivergenceError as e:
    error = str(e)
  return dict(process=jax.process_index(), error=error, steps=engine.metrics.steps)


def main():
  out_dir, mode = sys.argv[1], sys.argv[2]
  distributed.initialize()  # first: before anything touches a device
  result = {"serve": serve, "diverge": diverge}[mode](out_dir)
  with open(os.path.join(out_dir, f"p{jax.process_index()}.json"), "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main()
