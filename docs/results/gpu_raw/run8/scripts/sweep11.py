# The script (once under tmp/, uncommitted) that wrote this session's rows named in
# ../README.md, as run (reformatted by ruff; behaviour unchanged), for the record: later
# runs use the committed benchmarks
# (experiments/bench/gpu_ragged.py --sweep, gpu_decode.py --kv-quant). Run from the repo root
# on a GPU: PYTHONPATH=. python docs/results/gpu_raw/run8/scripts/sweep11.py
"""Session 9: int8 decode by widening mode, split-K and planned, bf16 beside (device time)."""

import dataclasses
import json
import os
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from experiments.bench import gpu_ragged as gr
from experiments.bench._gpu_common import env_info, kernel_summary, trace_kernels
from kernels import gpu
from kernels.gpu import plan as plan_mod
from kernels.testing import rel_l2_error

OUT = os.environ.get("OUT", "/tmp/sweep11")
os.makedirs(OUT, exist_ok=True)
COMMIT = os.environ.get("PAXCACHE_COMMIT", "unknown")
CALLS, RUNS = 8, 15
DEADLINE = time.time() + float(os.environ.get("BUDGET_S", "200"))
env = env_info()


def spans_of(events, runs, per):
  k = len(events) // runs
  return [
    (max(s + d for _, s, d in events[i * k : (i + 1) * k]) - events[i * k][1]) / 1e9 / per
    for i in range(runs)
  ]


def many(block_sizes, planned):
  def run(qs, kb, vb, table, lengths, plan, ks, vs):
    return [
      gpu.paged_attention(
        q,
        kb,
        vb,
        table,
        lengths,
        decode_plan=plan if planned else None,
        block_sizes=block_sizes,
        k_scales=ks,
        v_scales=vs,
      )
      for q in qs
    ]

  return jax.jit(run)


for case in ("full64x8192_b16", "full128x4096_b32", "sharegpt256_b16"):
  lengths, bs = gr.case_lengths(case)
  rng = np.random.default_rng(zlib.crc32(case.encode()))
  kb, vb, table = gr.make_pool(rng, lengths, bs)
  keys = jax.random.split(jax.random.key(7), CALLS)
  qs = [
    jax.random.normal(k, (len(lengths), gr.HQ, gr.D), jnp.float32).astype(gr.DTYPE) for k in keys
  ]
  lens_dev, table_dev = jnp.asarray(lengths), jnp.asarray(table)
  tok = int(lengths.astype(np.int64).sum()) * 2 * gr.HKV
  kq, ks = jax.jit(kernels.quantize, static_argnums=1)(kb, jnp.dtype("int8"))
  vq, vs = jax.jit(kernels.quantize, static_argnums=1)(vb, jnp.dtype("int8"))
  p = plan_mod.plan_decode(lengths, bs, gr.HKV).device_put()
  ref = None
  for planned in (False, True):
    for mode in ("bf16", "q_dtype", "int8_qk", "int8_qkv"):
      if time.time() > DEADLINE:
        break
      row = dict(case=case, planned=planned, mode=mode, commit=COMMIT, device=env.get("device"))
      try:
        if planned:
          bsz = dataclasses.replace(
            gpu.planned_block_sizes(
              head_dim=gr.D, kv_dtype=jnp.bfloat16 if mode == "bf16" else jnp.int8
            ),
            decode_kernel="triton",
          )
        else:
          bsz = gpu.default_block_sizes(
            head_dim=gr.D,
            kv_dtype=jnp.bfloat16 if mode == "bf16" else jnp.int8,
            batch=len(lengths),
            num_kv_heads=gr.HKV,
          )
        if mode != "bf16":
          bsz = dataclasses.replace(bsz, quant_widen=mode)
          args = (qs, kq, vq, table_dev, lens_dev, p, ks, vs)
          nbytes = tok * (gr.D + 4)
        else:
          args = (qs, kb, vb, table_dev, lens_dev, p, None, None)
          nbytes = tok * gr.D * 2
        fn = many(bsz, planned)
        out = np.asarray(jnp.asarray(fn(*args)[0], jnp.float32))
        if ref is None:
          ref = out
        row["err_vs_bf16"] = rel_l2_error(out, ref)
        ev = trace_kernels(lambda: fn(*args), RUNS)  # noqa: B023 (called at once)
        sp = spans_of(ev, RUNS, CALLS)
        row.update(
          us=np.median(sp) * 1e6,
          us_min=min(sp) * 1e6,
          us_max=max(sp) * 1e6,
          tbs=nbytes / np.median(sp) / 1e12,
          by_name=kernel_summary(ev, RUNS * CALLS)["by_name"][:3],
          settings=(
            bsz.decode_kv_tile,
            bsz.decode_num_warps,
            bsz.decode_num_stages,
            bsz.decode_num_splits,
          ),
        )
      except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
      with open(os.path.join(OUT, "sweep11.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
      print(
        json.dumps(
          {k: row.get(k) for k in ("case", "planned", "mode", "us", "tbs", "err_vs_bf16", "error")}
        ),
        flush=True,
      )
print("done", flush=True)
