# The script (once under tmp/, uncommitted) that wrote this session's rows named in
# ../README.md, as run (reformatted by ruff; behaviour unchanged), for the record: later
# runs use the committed benchmarks
# (experiments/bench/gpu_ragged.py --sweep, gpu_decode.py --kv-quant). Run from the repo root
# on a GPU: PYTHONPATH=. python docs/results/gpu_raw/run8/scripts/sweep10.py
"""Session 9: old against new planned defaults at head_dim 64, 128, 256 (device time)."""

import dataclasses
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
from kernels.gpu import planned, tuning
from kernels.testing import rel_l2_error

OUT = os.environ.get("OUT", "/tmp/sweep10")
os.makedirs(OUT, exist_ok=True)
COMMIT = os.environ.get("PAXCACHE_COMMIT", "unknown")
CALLS, RUNS = 8, 15
DEADLINE = time.time() + float(os.environ.get("BUDGET_S", "240"))
env = env_info()
NEW_MERGE = (planned.MERGE_TILE, planned.MERGE_NUM_WARPS, planned.MERGE_NUM_STAGES)


def spans_of(events, runs, per):
  k = len(events) // runs
  return [
    (max(s + d for _, s, d in events[i * k : (i + 1) * k]) - events[i * k][1]) / 1e9 / per
    for i in range(runs)
  ]


for D in (128, 64, 256):
  gr.D = D
  old_bs = dataclasses.replace(
    tuning.rule_block_sizes(head_dim=D, kv_dtype=gr.DTYPE), decode_kernel="triton"
  )
  new_bs = dataclasses.replace(
    gpu.planned_block_sizes(head_dim=D, kv_dtype=gr.DTYPE), decode_kernel="triton"
  )
  for case in ("sharegpt256_b16", "uniform64_b16", "long1_short63_b16", "full8x4096_b16"):
    if time.time() > DEADLINE:
      break
    lengths, bs = gr.case_lengths(case)
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    kb, vb, table = gr.make_pool(rng, lengths, bs)
    keys = jax.random.split(jax.random.key(7), CALLS)
    qs = [
      jax.random.normal(k, (len(lengths), gr.HQ, D), jnp.float32).astype(gr.DTYPE) for k in keys
    ]
    lens_dev, table_dev = jnp.asarray(lengths), jnp.asarray(table)
    nbytes = int(lengths.astype(np.int64).sum()) * 2 * gr.HKV * D * 2
    ref = np.asarray(
      jnp.asarray(gr.many_calls(CALLS)(qs, kb, vb, table_dev, lens_dev, None)[0], jnp.float32)
    )
    for name, bsz, min_chunk, merge in (
      ("old", old_bs, 256, (64, 8, 1)),
      ("new", new_bs, None, NEW_MERGE),
    ) * 2:
      row = dict(
        case=case,
        head_dim=D,
        config=name,
        commit=COMMIT,
        device=env.get("device"),
        chunk=(bsz.decode_kv_tile, bsz.decode_num_warps, bsz.decode_num_stages),
        merge=merge,
      )
      try:
        planned.MERGE_TILE, planned.MERGE_NUM_WARPS, planned.MERGE_NUM_STAGES = merge
        jax.clear_caches()
        kw = {} if min_chunk is None else dict(min_chunk_tokens=min_chunk)
        p = plan_mod.plan_decode(lengths, bs, gr.HKV, **kw)
        fn = gr.many_calls(CALLS, block_sizes=bsz)
        args = (qs, kb, vb, table_dev, lens_dev, p.device_put())
        out = np.asarray(jnp.asarray(fn(*args)[0], jnp.float32))
        row["err"] = rel_l2_error(out, ref)
        ev = trace_kernels(lambda: fn(*args), RUNS)  # noqa: B023 (called at once)
        sp = spans_of(ev, RUNS, CALLS)
        summ = kernel_summary(ev, RUNS * CALLS)
        row.update(
          num_chunks=p.num_chunks(),
          device_tbs=nbytes / np.median(sp) / 1e12,
          device_tbs_min=nbytes / max(sp) / 1e12,
          device_tbs_max=nbytes / min(sp) / 1e12,
          by_name=summ["by_name"][:3],
        )
      except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      with open(os.path.join(OUT, "sweep10.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
      print(
        json.dumps(
          {
            k: row.get(k)
            for k in ("case", "head_dim", "config", "chunk", "device_tbs", "err", "error")
          }
        ),
        flush=True,
      )
print("done", flush=True)
