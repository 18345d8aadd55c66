"""Correctness of the Pallas GPU kernels on the GPU at benchmark shapes, against kernels.reference.

Fresh random inputs per case; unused blocks and the slots past each length are NaN;
block tables shuffled. Each case reports the relative error
``|out - ref|_2 / |ref|_2`` (the reference accumulates in float32 at HIGHEST
precision) and fails on any NaN or an error over the bound of its dtype, the same bound
the interpret-mode tests use (``gpu_kernel_vs_reference_rel_l2`` in kernels/testing.py).
Writes ``OUT/check.jsonl``; exits 1 if any case fails.

  python -m experiments.bench.gpu_check --out /tmp/check [--smoke]
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments.bench import _flags
from experiments.bench._gpu_common import env_info, make_paged, write_jsonl
from kernels import gpu, reference
from kernels.gpu.prefill_mosaic import paged_prefill_mosaic
from kernels.testing import rel_l2_error, tolerance


def decode_case(
  rng,
  *,
  batch,
  context,
  block_size,
  hq=32,
  hkv=8,
  d=128,
  dtype=jnp.bfloat16,
  lengths="full",
  window=None,
  cap=None,
  block_sizes=None,
  interpret=False,
):
  if lengths == "full":
    lens = np.full((batch,), context, np.int32)
  else:  # a mix: 0, 1, a non-multiple of the block size, random, full
    lens = rng.integers(1, context + 1, size=batch).astype(np.int32)
    special = [0, 1, block_size + 1, context - 1, context]
    lens[: min(batch, len(special))] = special[: min(batch, len(special))]
  kb, vb, table, lens, _, _ = make_paged(
    rng,
    batch=batch,
    context=context,
    block_size=block_size,
    num_kv_heads=hkv,
    head_dim=d,
    dtype=dtype,
    lengths=lens,
    extra_blocks=7,
  )
  q = jax.random.normal(
    jax.random.key(int(rng.integers(1 << 30))), (batch, hq, d), jnp.float32
  ).astype(dtype)
  kw = dict(scale=d**-0.5, sliding_window=window, logit_soft_cap=cap)
  out = gpu.paged_attention(
    q, kb, vb, table, lens, block_sizes=block_sizes, interpret=interpret, **kw
  )
  ref = reference.paged_attention(q, kb, vb, table, lens, **kw)
  return out, ref


def prefill_case(
  rng,
  *,
  q_lens,
  ctx_lens,
  block_size,
  hq=32,
  hkv=8,
  d=128,
  dtype=jnp.bfloat16,
  pad_rows=5,
  window=None,
  cap=None,
  block_sizes=None,
  interpret=False,
  pv_via_smem=None,
):
  q_lens = np.asarray(q_lens, np.int32)
  lens = np.asarray(ctx_lens, np.int32) + q_lens
  batch = len(q_lens)
  context = int(lens.max())
  kb, vb, table, lens, _, _ = make_paged(
    rng,
    batch=batch,
    context=context,
    block_size=block_size,
    num_kv_heads=hkv,
    head_dim=d,
    dtype=dtype,
    lengths=lens,
    extra_blocks=5,
  )
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
  num_tokens = int(q_lens.sum()) + pad_rows
  q = jax.random.normal(
    jax.random.key(int(rng.integers(1 << 30))), (num_tokens, hq, d), jnp.float32
  ).astype(dtype)
  kw = dict(scale=d**-0.5, sliding_window=window, logit_soft_cap=cap)
  if pv_via_smem is None:
    out = gpu.paged_attention(
      q, kb, vb, table, lens, cu, block_sizes=block_sizes, interpret=interpret, **kw
    )
  else:  # the Mosaic kernel directly, with the P V variant interpret mode runs
    out = paged_prefill_mosaic(q, kb, vb, table, lens, cu, pv_via_smem=pv_via_smem, **kw)
  ref = reference.paged_attention(q, kb, vb, table, lens, cu, rows_per_chunk=32, **kw)
  kernel = (
    "mosaic"
    if pv_via_smem is not None
    else gpu.kernel_backend(
      "prefill",
      q_dtype=q.dtype,
      kv_dtype=kb.dtype,
      head_dim=d,
      block_size=block_size,
      num_tokens=num_tokens,
      batch=batch,
      requested=(block_sizes or gpu.BlockSizes()).prefill_kernel,
      interpret=interpret,
    )
  )
  return out, ref, {"kernel": kernel}


def cases(smoke: bool):
  """(name, fn) pairs; smoke shrinks every shape so the script itself runs on CPU."""
  if smoke:
    s = dict(hq=4, hkv=2, d=64)
    yield (
      "decode smoke",
      lambda r: decode_case(
        r, batch=3, context=40, block_size=8, lengths="mixed", interpret=True, **s
      ),
    )
    yield (
      "prefill smoke",
      lambda r: prefill_case(
        r, q_lens=[5, 1, 9], ctx_lens=[3, 20, 0], block_size=8, interpret=True, **s
      ),
    )
    return
  for bs in (8, 16, 32, 64, 128, 256):
    yield (
      f"decode 8x4096 bf16 bs{bs} full",
      lambda r, bs=bs: decode_case(r, batch=8, context=4096, block_size=bs),
    )
    yield (
      f"decode 32x4096 bf16 bs{bs} mixed lengths",
      lambda r, bs=bs: decode_case(r, batch=32, context=4096, block_size=bs, lengths="mixed"),
    )
  yield (
    "decode 64x8192 bf16 bs16 full",
    lambda r: decode_case(r, batch=64, context=8192, block_size=16),
  )
  yield (
    "decode 128x4096 bf16 bs32 full",
    lambda r: decode_case(r, batch=128, context=4096, block_size=32),
  )
  for cfg in (
    dict(decode_kv_tile=128, decode_num_warps=8, decode_num_stages=3),
    dict(decode_kv_tile=32, decode_num_stages=4),
    dict(decode_num_splits=16),
  ):
    bsz = gpu.BlockSizes(**cfg)
    yield (
      f"decode 8x4096 bf16 bs16 {cfg}",
      lambda r, bsz=bsz: decode_case(
        r, batch=8, context=4096, block_size=16, lengths="mixed", block_sizes=bsz
      ),
    )
  yield (
    "decode f32 D64 bs16 window 300 cap 30",
    lambda r: decode_case(
      r,
      batch=16,
      context=2048,
      block_size=16,
      d=64,
      dtype=jnp.float32,
      lengths="mixed",
      window=300,
      cap=30.0,
    ),
  )
  yield (
    "decode bf16 D256 16/2 heads bs128",
    lambda r: decode_case(
      r, batch=16, context=2048, block_size=128, hq=16, hkv=2, d=256, lengths="mixed"
    ),
  )
  yield (
    "decode f32 D256 8/8 heads bs8",
    lambda r: decode_case(
      r, batch=8, context=1024, block_size=8, hq=8, hkv=8, d=256, dtype=jnp.float32, lengths="mixed"
    ),
  )
  yield (
    "prefill 4x4096 causal bf16 bs64",
    lambda r: prefill_case(r, q_lens=[4096] * 4, ctx_lens=[0] * 4, block_size=64, pad_rows=0),
  )
  yield (
    "prefill 4x4096 causal bf16 bs16",
    lambda r: prefill_case(r, q_lens=[4096] * 4, ctx_lens=[0] * 4, block_size=16, pad_rows=0),
  )
  yield (
    "mixed chunked prefill bf16 D256 16/2 heads bs64",
    lambda r: prefill_case(
      r, q_lens=[300, 1, 70], ctx_lens=[500, 1000, 0], block_size=64, hq=16, hkv=2, d=256
    ),
  )
  yield (
    "prefill 4x4096 causal bf16 bs64 triton",
    lambda r: prefill_case(
      r,
      q_lens=[4096] * 4,
      ctx_lens=[0] * 4,
      block_size=64,
      pad_rows=0,
      block_sizes=gpu.BlockSizes(prefill_kernel="triton"),
    ),
  )
  # The Mosaic GPU prefill (what "auto" picks on Hopper above) in its other settings.
  mixed = dict(q_lens=[700, 1, 37, 1, 0, 300], ctx_lens=[1000, 4000, 129, 0, 50, 0])
  for bs, cfg in (
    (16, dict(mosaic_kv_tile=64, mosaic_num_slots=3)),
    (128, dict(mosaic_kv_tile=64, mosaic_num_slots=4)),
    (256, dict(mosaic_kv_tile=128, mosaic_num_slots=2)),
  ):
    bsz = gpu.BlockSizes(prefill_kernel="mosaic", **cfg)
    yield (
      f"mosaic mixed chunked prefill + decode bf16 bs{bs} {cfg}",
      lambda r, bs=bs, bsz=bsz: prefill_case(r, **mixed, block_size=bs, block_sizes=bsz),
    )
  yield (
    "mosaic mixed chunked prefill bf16 bs32 P via shared memory (the interpret-mode variant)",
    lambda r: prefill_case(r, **mixed, block_size=32, pv_via_smem=True),
  )
  yield (
    "mosaic mixed chunked prefill f16 D64 16/2 heads bs8 window 100 cap 30",
    lambda r: prefill_case(
      r,
      **mixed,
      block_size=8,
      hq=16,
      hkv=2,
      d=64,
      dtype=jnp.float16,
      window=100,
      cap=30.0,
      block_sizes=gpu.BlockSizes(prefill_kernel="mosaic"),
    ),
  )
  for cfg in (
    dict(prefill_q_tile=256, prefill_kv_tile=64, prefill_num_warps=8, prefill_num_stages=2),
    dict(prefill_q_tile=128, prefill_num_warps=4, prefill_heads_per_program=1),
  ):
    cfg = dict(cfg, prefill_kernel="triton")
    bsz = gpu.BlockSizes(**cfg)
    yield (
      f"mixed chunked prefill + decode bf16 bs32 {cfg}",
      lambda r, bsz=bsz: prefill_case(
        r,
        q_lens=[700, 1, 37, 1, 0, 300],
        ctx_lens=[1000, 4000, 129, 0, 50, 0],
        block_size=32,
        block_sizes=bsz,
      ),
    )
  yield (
    "mixed chunked prefill + decode bf16 bs16",
    lambda r: prefill_case(
      r, q_lens=[512, 1, 37, 1, 0, 300], ctx_lens=[1000, 4000, 129, 0, 50, 0], block_size=16
    ),
  )
  yield (
    "mixed chunked prefill bf16 bs256 window 200 cap 20",
    lambda r: prefill_case(
      r, q_lens=[300, 1, 64], ctx_lens=[700, 900, 0], block_size=256, window=200, cap=20.0
    ),
  )
  yield (
    "mixed chunked prefill bf16 bs256 window 200 cap 20 triton",
    lambda r: prefill_case(
      r,
      q_lens=[300, 1, 64],
      ctx_lens=[700, 900, 0],
      block_size=256,
      window=200,
      cap=20.0,
      block_sizes=gpu.BlockSizes(prefill_kernel="triton"),
    ),
  )
  yield (
    "mixed chunked prefill f32 D64 bs8",
    lambda r: prefill_case(
      r, q_lens=[100, 1, 33], ctx_lens=[200, 77, 0], block_size=8, d=64, dtype=jnp.float32
    ),
  )


def define_flags():
  flags.DEFINE_string("out", os.environ.get("OUT", "/tmp/gpu_check"), "output folder")
  flags.DEFINE_bool("smoke", False, "tiny shapes, interpret mode (CPU)")


def main(args):
  os.makedirs(args.out, exist_ok=True)
  env = env_info()
  print(env, flush=True)
  rng = np.random.default_rng(1234)
  failed = 0
  rows = []
  for name, fn in cases(args.smoke):
    t0 = time.time()
    try:
      out, ref, *extra = fn(rng)
      extra = extra[0] if extra else {"kernel": "triton"}  # decode cases
      # The output's dtype is the case's (q, K and V share it), read rather than parsed
      # from the name ("f16" is in "bf16").
      dtype = jnp.dtype(out.dtype).name
      bound = tolerance("gpu_kernel_vs_reference_rel_l2", dtype).rtol
      out = np.asarray(out.astype(jnp.float32), np.float64)
      ref = np.asarray(ref.astype(jnp.float32), np.float64)
      nan = bool(np.isnan(out).any())
      rel = rel_l2_error(out, ref)
      ok = (not nan) and rel <= bound
      row = dict(
        case=name,
        dtype=dtype,
        bound=bound,
        rel_err=rel,
        max_abs_err=float(np.nanmax(np.abs(out - ref))),
        nan=nan,
        ok=ok,
        seconds=time.time() - t0,
        **extra,
        **env,
      )
    except Exception as e:  # noqa: BLE001 - report and go on
      row = dict(case=name, ok=False, error=f"{type(e).__name__}: {str(e)[:400]}", **env)
    failed += not row["ok"]
    rows.append(row)
    write_jsonl(os.path.join(args.out, "check.jsonl"), [row])
    print(
      ("PASS " if row["ok"] else "FAIL ") + name,
      {
        k: row[k]
        for k in row
        if k in ("kernel", "rel_err", "bound", "max_abs_err", "nan", "error", "seconds")
      },
      flush=True,
    )
  print(f"\n{len(rows) - failed}/{len(rows)} checks passed on {env['device']}")
  return 1 if failed else 0


if __name__ == "__main__":
  _flags.run(define_flags, main)
