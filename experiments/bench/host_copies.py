"""Where a swap's time goes: ``paxcache.cache.swap_out`` / ``swap_in`` beside the copies
they are made of, and beside copies through JAX's pinned host memory.

The H200 run of ``configs/swap_vs_recompute.py:gpu`` found swapping a 2,048-token sequence
(128 MiB of bf16 K/V) 23-39x slower than recomputing it. This times, for one such sequence
(``--tokens`` at ``--block-size``, the model's 16 layers, 8 KV heads x 128, bf16, blocks
at random ids of a pool twice its size):

* ``swap_out`` / ``swap_in``: the two calls as the engine makes them (``staging="auto"``:
  through pinned host memory on an accelerator, direct on the CPU), and
  ``swap_out_direct`` / ``swap_in_direct``, ``swap_out_pinned`` / ``swap_in_pinned`` with
  each staging forced (:func:`paxcache.cache.swap_out`);
* ``d2h_pageable``: the device gather of the blocks plus ``jax.device_get`` into new NumPy
  memory (what ``swap_out`` does before writing the host pool; the gather is included, as
  a fresh array is needed each time); ``h2d_pageable``: ``jax.device_put`` of a NumPy array
  of the same bytes (no scatter);
* ``host_scatter``: NumPy writing the blocks into the host pool at their ids (the rest of
  ``swap_out``); ``host_gather``: NumPy reading them out (``swap_in``'s first step). Both
  use the pool's block-major storage as the swaps do (one contiguous copy per block); runs
  before the storage became block-major timed the layer-major pool's strided copies;
* ``d2h_pinned`` / ``h2d_pinned``: ``jax.device_put`` of already gathered blocks to and
  from ``memory_kind="pinned_host"`` (the copies a host pool in pinned memory would pay,
  without the gather or scatter), where the backend has that memory kind (else the row
  says why not); ``pinned_to_numpy`` / ``numpy_to_pinned``: the host copies between
  pinned memory and NumPy that a pinned swap adds to those DMAs.

Each figure is the median of ``--repeats`` samples of one synced call with its min-max
(:func:`experiments._timing.time_calls`) and the bytes over the median as GB/s. Prints a
table and appends one JSON line per figure to ``OUT/host_copies.jsonl``.

  PYTHONPATH=. python -m experiments.bench.host_copies --out /tmp/host_copies
"""

from __future__ import annotations

import datetime
import json
import os

import numpy as np
from absl import flags

from experiments._timing import time_calls
from experiments.bench import _flags

LAYERS, KV_HEADS, HEAD_DIM = 16, 8, 128  # swap_vs_recompute.py:gpu's model


def define_flags():
  flags.DEFINE_integer("tokens", 2048, "tokens of the swapped sequence")
  flags.DEFINE_integer("block-size", 16, "tokens per block")
  flags.DEFINE_integer("layers", LAYERS, "model layers (the pools' leading axis)")
  flags.DEFINE_integer("repeats", 10, "timed samples per figure")
  flags.DEFINE_string("out", None, "directory for host_copies.jsonl", required=True)
  flags.DEFINE_string("commit", os.environ.get("PAXCACHE_COMMIT", "unknown"), "recorded commit")


def measure(tokens: int, block_size: int, layers: int, repeats: int) -> list[dict]:
  import jax
  import jax.numpy as jnp

  from paxcache import cache as cache_ops

  if tokens % block_size:
    raise ValueError(f"--tokens={tokens} must be a multiple of --block-size={block_size}")
  n = tokens // block_size
  rng = np.random.default_rng(0)
  cache = cache_ops.PagedKVCache.create(layers, KV_HEADS, 2 * n, block_size, HEAD_DIM, jnp.bfloat16)
  host = cache_ops.HostKVPool.like(cache, 2 * n)
  for pool in (host.k, host.v):  # touch every page once, as a pool in use has been
    pool.view(np.uint16)[...] = 1
  dev_ids = rng.permutation(2 * n)[:n].astype(np.int32)
  host_ids = rng.permutation(2 * n)[:n].astype(np.int64)
  nbytes = 2 * layers * KV_HEADS * n * block_size * HEAD_DIM * 2  # K and V, bf16

  state = {"cache": cache}

  def swap_out(staging):
    return lambda: cache_ops.swap_out(state["cache"], host, dev_ids, host_ids, staging=staging)

  def swap_in(staging):
    def call():
      state["cache"] = cache_ops.swap_in(state["cache"], host, host_ids, dev_ids, staging=staging)
      return state["cache"]

    return call

  gather = cache_ops._gather_blocks
  blocks = np.asarray(jax.device_get(gather(cache, dev_ids))[0])

  def host_scatter():  # as swap_out: blocks are [n, 2, L, H, bs, D], one slab per block
    host._kv[host_ids] = blocks

  def host_gather():  # as swap_in
    return host._kv[host_ids]

  on_device = gather(cache, dev_ids)[0]
  figures = {
    "swap_out": (swap_out("auto"), lambda out: out),
    "swap_in": (swap_in("auto"), None),
    "swap_out_direct": (swap_out("direct"), lambda out: out),
    "swap_in_direct": (swap_in("direct"), None),
    # A fresh gather each time: device_get of an array fetched before returns its cache.
    "d2h_pageable": (lambda: jax.device_get(gather(state["cache"], dev_ids)), lambda out: out),
    "h2d_pageable": (lambda: jax.device_put(blocks), None),
    "host_scatter": (host_scatter, lambda out: out),
    "host_gather": (host_gather, lambda out: out),
  }
  skipped = {}
  try:
    device = jax.devices()[0]
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    on_host = jax.block_until_ready(jax.device_put(on_device, pinned))
    back = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
    figures["d2h_pinned"] = (lambda: jax.device_put(on_device, pinned), None)
    figures["h2d_pinned"] = (lambda: jax.device_put(on_host, back), None)
    # The pinned array read into NumPy, and NumPy copied into pinned memory: the host
    # copies a pool in pageable NumPy memory adds to each pinned DMA.
    figures["pinned_to_numpy"] = (lambda: np.asarray(on_host[...]), lambda out: out)
    figures["numpy_to_pinned"] = (lambda: jax.device_put(blocks, pinned), None)
    figures["swap_out_pinned"] = (swap_out("pinned"), lambda out: out)
    figures["swap_in_pinned"] = (swap_in("pinned"), None)
  except Exception as e:  # a backend without pinned host memory: say so in the rows
    names = ("d2h_pinned", "h2d_pinned", "pinned_to_numpy", "numpy_to_pinned")
    names += ("swap_out_pinned", "swap_in_pinned")
    skipped = {n: f"{type(e).__name__}: {e}"[:200] for n in names}

  rows = []
  for name, (call, sync) in figures.items():
    t = time_calls(call, repeats=repeats, sync=sync)
    rows.append(
      {
        "figure": name,
        "ms": round(t.median * 1e3, 3),
        "ms_min": round(t.min * 1e3, 3),
        "ms_max": round(t.max * 1e3, 3),
        "gbs": round(nbytes / t.median / 1e9, 2),
        "repeats": t.repeats,
      }
    )
  rows += [{"figure": name, "skipped": why} for name, why in skipped.items()]
  for r in rows:
    r.update(tokens=tokens, block_size=block_size, layers=layers, mib=nbytes / 2**20)
  return rows


def main(args) -> int:
  import jax

  rows = measure(args.tokens, args.block_size, args.layers, args.repeats)
  meta = {
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "commit": args.commit,
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
  }
  print(
    f"| figure | ms (median) | min-max ms | GB/s | ({rows[0]['mib']:.2f} MiB, {meta['device']})"
  )
  print("| --- | ---: | --- | ---: |")
  for r in rows:
    if "skipped" in r:
      print(f"| {r['figure']} | - | - | - | skipped: {r['skipped']}")
    else:
      print(f"| {r['figure']} | {r['ms']:.3f} | {r['ms_min']:.3f}-{r['ms_max']:.3f} | {r['gbs']} |")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "host_copies.jsonl"), "a") as f:
    for r in rows:
      f.write(json.dumps({**r, **meta}) + "\n")
  return 0


if __name__ == "__main__":
  _flags.run(define_flags, main)
