# The script (once under tmp/, uncommitted) that wrote this session's rows named in
# ../README.md, as run (reformatted by ruff; behaviour unchanged), for the record: later
# runs use the committed benchmarks
# (experiments/bench/gpu_ragged.py --sweep, gpu_decode.py --kv-quant). Run from the repo root
# on a GPU: PYTHONPATH=. python docs/results/gpu_raw/run8/scripts/sweep9.py
"""Session 9 sweep: planned decode step x plan chunk sizes x merge settings (device time)."""

import dataclasses
import functools
import json
import os
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import gpu_ragged as gr
from experiments.bench._gpu_common import env_info, kernel_summary, trace_kernels
from kernels import gpu
from kernels.gpu import plan as plan_mod
from kernels.gpu import planned
from kernels.testing import rel_l2_error

OUT = os.environ.get("OUT", "/tmp/sweep9")
os.makedirs(OUT, exist_ok=True)
COMMIT = os.environ.get("PAXCACHE_COMMIT", "unknown")
CALLS, RUNS = 8, 15
DEADLINE = time.time() + float(os.environ.get("BUDGET_S", "520"))
env = env_info()


def write(row):
  with open(os.path.join(OUT, "sweep9.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")
  print(
    json.dumps(
      {
        k: row.get(k)
        for k in (
          "case",
          "chunk",
          "plan",
          "merge",
          "device_tbs",
          "frac",
          "chunk_us",
          "merge_us",
          "span_us",
          "err",
        )
      }
    ),
    flush=True,
  )


def spans_of(events, runs, per):
  k = len(events) // runs
  return [
    (max(s + d for _, s, d in events[i * k : (i + 1) * k]) - events[i * k][1]) / 1e9 / per
    for i in range(runs)
  ]


# Ceilings: device time of jnp.sum over 2 GiB and at the two small cases' sizes.
ceil = {}
for name, nbytes in (
  ("2GiB", 1 << 31),
  ("8x4096", 8 * 4096 * 2 * 8 * 128 * 2),
  ("long1", (32768 + 63 * 128) * 2 * 8 * 128 * 2),
):
  x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  f(x).block_until_ready()
  ev = trace_kernels(functools.partial(f, x), 21)
  runs = 21
  sp = spans_of(ev, runs, 1)
  ceil[name] = dict(
    tbs=nbytes / np.median(sp) / 1e12,
    tbs_min=nbytes / max(sp) / 1e12,
    tbs_max=nbytes / min(sp) / 1e12,
    kernels_per_run=len(ev) // runs,
    us=np.median(sp) * 1e6,
  )
  del x
print("ceilings", ceil, flush=True)
write(dict(kind="ceiling", commit=COMMIT, ceilings=ceil, **env))
C0 = ceil["2GiB"]["tbs"]

CHUNK = [(64, 4, 3), (128, 4, 2), (64, 4, 4), (128, 4, 3)]
PLAN_SMALL = [(256, 8), (512, 8), (1024, 8), (256, 4), (512, 4), (768, 8)]
PLAN_LARGE = [(256, 8), (256, 4)]
MERGE = [(64, 8, 1), (16, 4, 1), (16, 4, 3), (32, 4, 2), (32, 8, 1)]
CASES = [
  "long1_short63_b16",
  "full8x4096_b16",
  "sharegpt256_b16",
  "uniform64_b16",
  "full256x2048_b16",
  "full64x8192_b16",
]
base_bs = dataclasses.replace(
  gpu.planned_block_sizes(head_dim=gr.D, kv_dtype=gr.DTYPE), decode_kernel="triton"
)

for case in CASES:
  lengths, bs = gr.case_lengths(case)
  rng = np.random.default_rng(zlib.crc32(case.encode()))
  kb, vb, table = gr.make_pool(rng, lengths, bs)
  keys = jax.random.split(jax.random.key(7), CALLS)
  qs = [
    jax.random.normal(k, (len(lengths), gr.HQ, gr.D), jnp.float32).astype(gr.DTYPE) for k in keys
  ]
  lens_dev, table_dev = jnp.asarray(lengths), jnp.asarray(table)
  nbytes = int(lengths.astype(np.int64).sum()) * 2 * gr.HKV * gr.D * 2
  ref = np.asarray(
    jnp.asarray(gr.many_calls(CALLS)(qs, kb, vb, table_dev, lens_dev, None)[0], jnp.float32)
  )
  small = case in ("long1_short63_b16", "full8x4096_b16")
  combos = [(c, p, MERGE[0]) for p in (PLAN_SMALL if small else PLAN_LARGE) for c in CHUNK]
  combos += [(CHUNK[0], (256, 8), m) for m in MERGE[1:]]
  if small:
    combos += [(CHUNK[1], (512, 8), m) for m in MERGE[1:]]
  for chunk, pl_, merge in combos:
    if time.time() > DEADLINE:
      print("deadline", flush=True)
      break
    row = dict(
      kind="sweep",
      case=case,
      commit=COMMIT,
      chunk=chunk,
      plan=pl_,
      merge=merge,
      block_size=bs,
      batch=len(lengths),
      device=env.get("device"),
    )
    try:
      planned.MERGE_TILE, planned.MERGE_NUM_WARPS, planned.MERGE_NUM_STAGES = merge
      jax.clear_caches()
      bsz = dataclasses.replace(
        base_bs, decode_kv_tile=chunk[0], decode_num_warps=chunk[1], decode_num_stages=chunk[2]
      )
      p = plan_mod.plan_decode(
        lengths, bs, gr.HKV, min_chunk_tokens=pl_[0], target_programs=pl_[1] * plan_mod.num_sms()
      )
      fn = gr.many_calls(CALLS, block_sizes=bsz)
      args = (qs, kb, vb, table_dev, lens_dev, p.device_put())
      out = np.asarray(jnp.asarray(fn(*args)[0], jnp.float32))
      row["err"] = rel_l2_error(out, ref)
      fn(*args)[0].block_until_ready()
      ev = trace_kernels(lambda: fn(*args), RUNS)  # noqa: B023 (called at once)
      sp = spans_of(ev, RUNS, CALLS)
      summ = kernel_summary(ev, RUNS * CALLS)
      row.update(
        num_chunks=p.num_chunks(),
        padded=p.num_padded_chunks,
        chunk_tokens_max=int((p.chunk_end - p.chunk_start).max()),
        device_tbs=nbytes / np.median(sp) / 1e12,
        device_tbs_min=nbytes / max(sp) / 1e12,
        device_tbs_max=nbytes / min(sp) / 1e12,
        frac=nbytes / np.median(sp) / 1e12 / C0,
        span_us=summ["span_us"],
        kernel_us=summ["kernel_us"],
      )
      for e in summ["by_name"]:
        if "merge" in e["name"]:
          row["merge_us"] = e["us"]
        elif "planned" in e["name"]:
          row["chunk_us"] = e["us"]
      row["by_name"] = summ["by_name"][:4]
    except Exception as e:
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    write(row)
print("done", flush=True)
