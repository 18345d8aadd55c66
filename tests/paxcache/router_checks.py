"""Data-parallel replicas on simulated CPU devices, run in subprocesses.

``python tests/paxcache/router_checks.py single`` starts jax with 4 host devices and serves
the requests of :func:`requests` through ``Router.build`` over a ``("data", "model")`` mesh
of 2 x 2, then serves each replica's requests alone on an engine over a 2-device ``model``
mesh (one replica at a time: the reference).

``python tests/paxcache/router_checks.py worker PROCESS_ID NUM_PROCESSES PORT`` is one
process of a multi-controller run (``jax.distributed`` with a coordinator on 127.0.0.1:PORT,
CPU collectives over gloo, 2 devices per process): the same router over the 2 x 2 mesh,
each process serving the replica on its own devices. Without the three numbers it reads
them from ``PAXCACHE_COORDINATOR`` (host:port), ``PAXCACHE_PROCESS_ID`` and
``PAXCACHE_NUM_PROCESSES``, as a launcher may set them.

Each prints one JSON object on the last line of stdout (and, with ``ROUTER_CHECKS_OUT`` set
to a folder, writes it to ``MODE<process index>.json`` there); ``test_router_devices.py``
asserts on it (this script asserts nothing, so that a failed comparison reaches pytest with
its values).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

MODE = sys.argv[1]
DEVICES = 4 if MODE == "single" else 2
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

if MODE == "worker":
  if len(sys.argv) >= 5:
    PROCESS_ID, NUM_PROCESSES, PORT = (int(a) for a in sys.argv[2:5])
    COORDINATOR = f"127.0.0.1:{PORT}"
  else:  # started by a launcher that passes the job in the environment
    COORDINATOR = os.environ["PAXCACHE_COORDINATOR"]
    PROCESS_ID = int(os.environ["PAXCACHE_PROCESS_ID"])
    NUM_PROCESSES = int(os.environ["PAXCACHE_NUM_PROCESSES"])
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(COORDINATOR, NUM_PROCESSES, PROCESS_ID, initialization_timeout=60)

from jax.sharding import Mesh  # noqa: E402

from paxcache.engine import Engine, EngineConfig, Request, Router  # noqa: E402
from paxcache.nn import TINY_CORPUS, load_decoder  # noqa: E402
from paxcache.sharding import make_data_mesh, make_mesh, replica_meshes  # noqa: E402

# A pool of 12 blocks of 8 per replica: the long requests preempt (swap) each other.
CONFIG = EngineConfig(
  num_blocks=12,
  block_size=8,
  num_host_blocks=16,
  preemption_mode="swap",
  max_num_seqs=4,
  max_num_batched_tokens=32,
  min_batch_bucket=4,
  min_token_bucket=32,
  check_invariants=True,
)


def requests() -> list[Request]:
  """Ten requests: five share a 16-token (two-block) prefix, a fork (n = 2), three sampled
  (no seed: the router gives each its arrival index)."""
  with open(TINY_CORPUS, "rb") as f:
    corpus = f.read()
  shared = list(corpus[40:56])
  reqs = []
  for i in range(10):
    start = 61 * i + 5
    own = list(corpus[start : start + 4 + 3 * i])
    reqs.append(
      Request(
        i,
        shared + own if i % 2 else own,
        max_new_tokens=6 + 2 * (i % 4),
        n=2 if i == 4 else 1,
        temperature=0.7 if i % 3 == 0 else 0.0,
      )
    )
  return reqs


def serve(router: Router) -> dict:
  reqs = requests()
  placed = [router.add_request(r) for r in reqs]
  outs = router.run()
  m = router.metrics
  return dict(
    placed=placed,
    outputs={str(k): o.samples for k, o in sorted(outs.items())},
    routed=m.routed,
    affinity_hits=m.affinity_hits,
    replicas=[x.as_dict() for x in m.replicas],
    total=m.total.as_dict(),
    local=[r for r, e in enumerate(router.replicas) if e is not None],
    used_blocks=[e.allocator.num_used_blocks for e in router.replicas if e is not None],
    used_host_blocks=[
      e.allocator.num_host_blocks - e.allocator.num_free_host_blocks
      for e in router.replicas
      if e is not None
    ],
    # Each local replica's pool: the ids of the devices holding it.
    pool_devices=[
      sorted(d.id for d in e.cache.k[0].sharding.device_set)
      for e in router.replicas
      if e is not None
    ],
    mesh_devices=[[d.id for d in row] for row in router_mesh().devices],
  )


def router_mesh():
  return make_data_mesh(2, 2)


def alone(placed: list[int]) -> dict:
  """Each replica's requests served alone, one replica at a time, on a 2-device mesh."""
  reqs = requests()
  out, metrics = {}, []
  for rep in range(2):
    mine = [dataclasses.replace(r, seed=i) for i, r in enumerate(reqs) if placed[i] == rep]
    engine = Engine(load_decoder(), dataclasses.replace(CONFIG, mesh=make_mesh(2)))
    out.update((str(k), o.samples) for k, o in engine.run(mine).items())
    metrics.append(engine.metrics.as_dict())
  return dict(outputs=dict(sorted(out.items())), replicas=metrics)


def meshes() -> dict:
  """``replica_meshes`` of a mesh with the data axis second, and ``Router.build`` over a mesh
  whose replicas span processes (an error with several processes)."""
  devs = make_data_mesh(2, 2).devices
  cols = replica_meshes(Mesh(devs, ("model", "data")))
  out = dict(columns=[[[d.id for d in m.devices.flat], list(m.axis_names)] for m in cols])
  try:
    Router.build(load_decoder, CONFIG, Mesh(devs.T, ("data", "model")))
    out["span_error"] = None
  except ValueError as e:
    out["span_error"] = str(e)
  return out


def main():
  if MODE == "single":
    model = load_decoder()
    router = Router.build(model, CONFIG, router_mesh())  # a copy per replica
    untouched = all(layer.attn.mesh is None for layer in model.layers)
  else:
    router = Router.build(load_decoder, CONFIG, router_mesh())  # a new decoder per replica
    untouched = None
  result = dict(
    process_index=jax.process_index(),
    device_count=jax.device_count(),
    model_untouched=untouched,
    meshes=meshes(),
    **serve(router),
  )
  if MODE == "single":
    result["alone"] = alone(result["placed"])
  print(json.dumps(result))
  if os.environ.get("ROUTER_CHECKS_OUT"):  # a folder: one file per process
    path = os.path.join(os.environ["ROUTER_CHECKS_OUT"], f"{MODE}{jax.process_index()}.json")
    with open(path, "w") as f:
      json.dump(result, f)


if __name__ == "__main__":
  main()
