"""H100 benchmark of the Pallas GPU paged-attention kernels against the read ceiling and peers.

In one process: the HBM read ceiling (torch ``x.sum()`` and ``jnp.sum`` over 2 GiB of
bf16), our decode kernel at the standard decode shapes (32 q heads, 8 KV heads,
head_dim 128, bf16, full-length sequences, blocks scattered at random) for block
sizes 16/32/64/128, the same kernel on an identity (contiguous) block table, JAX's
built-in ``jax.experimental.pallas.ops.gpu.paged_attention`` (best of k_splits
1/4/16), an XLA gather + einsum paged decode, and our prefill (causal, 4 x 4096 into
paged K/V: the default, which is the Mosaic GPU kernel on Hopper, two other Mosaic
settings and the Triton kernel) beside cuDNN and JAX's Mosaic GPU flash attention on
contiguous K/V. Prints a table last; writes every measurement to ``OUT/raw.jsonl`` and
summary rows to ``OUT/gpu_decode.jsonl`` / ``OUT/gpu_prefill.jsonl``.

  python -m experiments.bench.gpu_decode --out /tmp/bench [--quick]

With ``--kv-quant``: 8-bit K/V decode (int8 and float8 e4m3, a float32 scale per token
and KV head) against bf16 decode on the same tokens, at 64 x 8192 and 128 x 4096 (32/8
heads, head_dim 128, block 16), in the same process; rows ``OUT/kv_quant.jsonl``
(``ours_tbs``: bytes read, scales counted, per second; ``speedup``: bf16 time / 8-bit
time), one row per 8-bit dtype and widening (``widen``: ``BlockSizes.quant_widen``, the
old "q_dtype" beside "f16", for e4m3 "f16_bits", for int8 "int8_qk" and "int8_qkv";
``--kv-quant-widen q_dtype,f16`` times only those), and, unless ``--nodevice-time``, the
same cases as device time (``device_ms``, ``device_speedup``). Only that comparison (and
the ceiling)::

  python -m experiments.bench.gpu_decode --kv-quant --no-decode --no-prefill --out /tmp/q

Every time is the median of 21 samples (10 calls back to back each, then one block) with
its min-max spread (``time_min_ms``, ``time_max_ms``); ``sync_time_ms`` is the median of
21 single synchronous calls (dispatch latency included).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import kernels
from experiments._timing import time_calls
from experiments.bench import _flags
from experiments.bench._gpu_common import (
  commit_of,
  device_time,
  env_info,
  make_paged,
  write_jsonl,
)
from kernels import gpu
from kernels.gpu import _widen
from kernels.testing import rel_l2_error

HQ, HKV, D = 32, 8, 128
DECODE_SHAPES = ((8, 4096), (32, 4096), (64, 8192), (128, 4096))
BLOCK_SIZES = (16, 32, 64, 128)
PREFILL_LEN = 4096
# --kv-quant: the shapes issue 16 names for the 8-bit decode speedup, and its block size.
QUANT_SHAPES = ((64, 8192), (128, 4096))
QUANT_BLOCK_SIZE = 16
QUANT_DTYPES = ("int8", "float8_e4m3fn")
# --kv-quant: the 8-bit widenings timed side by side (BlockSizes.quant_widen,
# kernels/gpu/_widen.py): "q_dtype" is the old widening to bf16; "f16_bits" differs from
# "f16" only for e4m3 (int8 takes the same magic number in both), so int8 skips it;
# "int8_qk" / "int8_qkv" (int8's q . K / both products by integer dots) are "f16" for
# e4m3, so e4m3 skips them.
QUANT_WIDENS = ("q_dtype", "f16", "f16_bits", "int8_qk", "int8_qkv")
# --kv-quant-sweep: decode settings (kv_tile, warps, stages) tried for 8-bit K/V at the
# first of QUANT_SHAPES, with the default widening (the default for a 256-byte token of K
# plus V is a 128-token step, 4 warps, 3 stages). 93e3c3e swept 128/256-token steps with
# 4/8 warps and 3/4 stages (the default fastest); 64-token steps (bf16's token count, half
# its bytes) with deeper pipelines, and 2 stages, were not tried then.
QUANT_SWEEP = (
  (64, 4, 3),
  (64, 4, 4),
  (64, 4, 6),
  (64, 8, 4),
  (128, 4, 2),
  (128, 4, 3),
  (128, 4, 4),
  (128, 8, 3),
  (256, 4, 2),
  (256, 4, 3),
)

# Extra decode settings timed with --decode-sweep (the defaults come from tuning.py).
SWEEP_CONFIGS = (
  dict(decode_kv_tile=128, decode_num_warps=8, decode_num_stages=3),
  dict(decode_kv_tile=128, decode_num_stages=2),
)
# Prefill settings timed at block 64 (the first is the default: kernel_backend picks the
# Mosaic GPU kernel on Hopper); the default and the Triton kernel run at every block size.
PREFILL_SWEEP = (
  dict(),
  dict(mosaic_kv_tile=64, mosaic_num_slots=3),
  dict(mosaic_kv_tile=64, mosaic_num_slots=4),
  dict(prefill_kernel="triton"),
)
PREFILL_EVERY_BLOCK = (dict(), dict(prefill_kernel="triton"))


def hbm_read_ceiling(n=1 << 30, device_trace=False):
  """TB/s of a plain read of 2 GiB of bf16: torch x.sum() (if torch is there; CUDA events
  around each call, so device time) and jnp.sum (``time_calls``, 10 calls per sample; with
  ``device_trace`` also as device time from a profiler trace, ``jax_sum_device_tbps``)."""
  out = {}
  try:
    import torch

    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
      x.sum()
    torch.cuda.synchronize()
    times = []
    for _ in range(21):
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      x.sum()
      end.record()
      torch.cuda.synchronize()
      times.append(start.elapsed_time(end) / 1e3)
    out["torch_sum_tbps"] = 2 * n / float(np.median(times)) / 1e12
    del x
    torch.cuda.empty_cache()
  except Exception as e:  # noqa: BLE001 - torch missing or no CUDA: keep the JAX figure
    out["torch_error"] = repr(e)[:200]
  x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
  f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  t = time_calls(functools.partial(f, x), repeats=21, inner=10, warmup=2)
  out["jax_sum_tbps"] = 2 * n / t.median / 1e12
  out["jax_sum_min_tbps"] = 2 * n / t.max / 1e12
  out["jax_sum_max_tbps"] = 2 * n / t.min / 1e12
  if device_trace:
    # The same sum as device time from a profiler trace (as gpu_ragged's device figures):
    # 21 runs of 1 sum each.
    from experiments.bench._gpu_common import device_time

    td = device_time(functools.partial(f, x), runs=21, per_run=1)
    out["jax_sum_device_tbps"] = 2 * n / td.median / 1e12
    out["jax_sum_device_min_tbps"] = 2 * n / td.max / 1e12
    out["jax_sum_device_max_tbps"] = 2 * n / td.min / 1e12
  del x
  out["ceiling_tbps"] = max(out.get("torch_sum_tbps", 0.0), out["jax_sum_tbps"])
  return out


def xla_paged_decode(q, k_blocks, v_blocks, table, lengths):
  """XLA peer: gather the blocks, einsum, softmax, einsum (bf16 in, float32 accumulate)."""
  b, hq, d = q.shape
  hkv, _, bs, _ = k_blocks.shape
  mb = table.shape[1]
  k = k_blocks[:, jnp.maximum(table, 0)].reshape(hkv, b, mb * bs, d)
  v = v_blocks[:, jnp.maximum(table, 0)].reshape(hkv, b, mb * bs, d)
  qg = q.reshape(b, hkv, hq // hkv, d)
  s = jnp.einsum("bkgd,kbsd->bkgs", qg, k, preferred_element_type=jnp.float32) * d**-0.5
  mask = jnp.arange(mb * bs)[None, :] < lengths[:, None]
  s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bkgs,kbsd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o.reshape(b, hq, d).astype(q.dtype)


INTERPRET = False  # --smoke: tiny shapes in interpret mode on CPU, to test this script


def ours_fn(block_sizes, **kw):
  return jax.jit(
    functools.partial(gpu.paged_attention, block_sizes=block_sizes, interpret=INTERPRET, **kw)
  )


class Runner:
  def __init__(self, out_dir, budget_s):
    self.out_dir = out_dir
    self.t0 = time.time()
    self.budget_s = budget_s
    self.env = env_info()
    self.raw = os.path.join(out_dir, "raw.jsonl")

  def left(self):
    return self.budget_s - (time.time() - self.t0)

  def record(self, **row):
    row = {**row, **self.env}
    write_jsonl(self.raw, [row])
    print(
      "  ",
      {
        k: (round(v, 4) if isinstance(v, float) else v)
        for k, v in row.items()
        if k not in ("device", "jax_version", "date")
      },
      flush=True,
    )
    return row


def measure(runner, name, fn, args, nbytes=None, flops=None, **meta):
  try:
    t = time_calls(lambda: fn(*args), repeats=21, inner=10, warmup=2)
    t_sync = time_calls(lambda: fn(*args), repeats=21, inner=1, warmup=0)
  except Exception as e:  # noqa: BLE001 - a failing peer is a result, recorded as such
    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return runner.record(impl=name, error=msg, **meta)
  row = dict(impl=name, **t.fields("time"), **t_sync.fields("sync_time"), **meta)
  if nbytes is not None:
    row["tbps"] = nbytes / t.median / 1e12
  if flops is not None:
    row["tflops"] = flops / t.median / 1e12
  return runner.record(**row)


def decode_bench(runner, shapes, block_sizes, builtin, passes, sweep):
  """Every shape x block size: ours (scattered, contiguous), built-in, XLA.

  Pass 1 compiles and times everything; passes 2.. re-time the same compiled
  functions, interleaved over the shapes, so drift of the card shows as spread.
  """
  rng = np.random.default_rng(0)
  cases = []
  ours = ours_fn(None)  # per-shape defaults, as a caller gets them
  for batch, context in shapes:
    for bs in block_sizes:
      meta = dict(
        kind="decode",
        batch=batch,
        context=context,
        block_size=bs,
        num_q_heads=HQ,
        num_kv_heads=HKV,
        head_dim=D,
        dtype="bfloat16",
      )
      print(f"decode {batch}x{context} block {bs}  ({runner.left():.0f}s left)", flush=True)
      kb, vb, table, lengths, _, _ = make_paged(
        rng,
        batch=batch,
        context=context,
        block_size=bs,
        num_kv_heads=HKV,
        head_dim=D,
        dtype=jnp.bfloat16,
        poison=False,
      )
      q = jax.random.normal(jax.random.key(1), (batch, HQ, D), jnp.float32).astype(jnp.bfloat16)
      nbytes = batch * context * 2 * HKV * D * 2
      args = (q, kb, vb, table, lengths)
      ident = jnp.arange(table.size, dtype=jnp.int32).reshape(table.shape)
      default = gpu.default_block_sizes(
        head_dim=D, kv_dtype=jnp.bfloat16, batch=batch, num_kv_heads=HKV, max_context=context
      )
      meta["config"] = {
        k: v for k, v in dataclasses.asdict(default).items() if k.startswith("decode")
      }
      timers = [
        ("ours", ours, args, {}),
        ("ours_contiguous", ours, (q, kb, vb, ident, lengths), {}),
      ]
      if builtin is not None:
        for ks in (1, 4, 16):
          if table.shape[1] % ks == 0:
            timers.append(
              ("builtin", jax.jit(functools.partial(builtin, k_splits=ks)), args, dict(k_splits=ks))
            )
      if sweep:
        for c in SWEEP_CONFIGS:
          bsz = dataclasses.replace(default, **c)
          timers.append(("ours_sweep", ours_fn(bsz), args, dict(sweep_config=c)))
      rows = {}
      for i, (name, fn, a, extra) in enumerate(timers):
        rows[i] = [measure(runner, name, fn, a, nbytes, **extra, **meta, rep=0)]
      xla = measure(
        runner, "xla_gather_einsum", jax.jit(xla_paged_decode), args, nbytes, **meta, rep=0
      )
      cases.append(dict(meta=meta, nbytes=nbytes, timers=timers, rows=rows, xla=xla))
  for rep in range(1, passes):
    print(f"re-timing pass {rep}  ({runner.left():.0f}s left)", flush=True)
    for c in cases:
      for i, (name, fn, a, extra) in enumerate(c["timers"]):
        if "error" in c["rows"][i][0] or runner.left() < 15:
          continue
        c["rows"][i].append(
          measure(runner, name, fn, a, c["nbytes"], **extra, **c["meta"], rep=rep)
        )
  return cases


def _median_tbps(rows):
  vals = [r["tbps"] for r in rows if "tbps" in r]
  return (float(np.median(vals)), min(vals), max(vals)) if vals else (None, None, None)


def prefill_bench(runner, block_sizes, sweep):
  """Causal 4 x 4096 into paged K/V: the sweep at block 64, then its best at every block size."""
  rng = np.random.default_rng(1)
  batch, length = 4, PREFILL_LEN
  pairs = batch * length * length / 2
  flops = 4 * D * HQ * pairs
  rows = []
  base = gpu.default_block_sizes(
    head_dim=D, kv_dtype=jnp.bfloat16, num_tokens=batch * length, decode=False
  )

  def run(bs, configs):
    kb, vb, table, lengths, _, _ = make_paged(
      rng,
      batch=batch,
      context=length,
      block_size=bs,
      num_kv_heads=HKV,
      head_dim=D,
      dtype=jnp.bfloat16,
      poison=False,
    )
    q = jax.random.normal(jax.random.key(2), (batch * length, HQ, D), jnp.bfloat16)
    cu = jnp.arange(batch + 1, dtype=jnp.int32) * length
    args = (q, kb, vb, table, lengths, cu)
    meta = dict(
      kind="prefill",
      batch=batch,
      q_len=length,
      context=length,
      block_size=bs,
      num_q_heads=HQ,
      num_kv_heads=HKV,
      head_dim=D,
      dtype="bfloat16",
    )
    out = []
    for c in configs:
      if runner.left() < 30:
        break
      print(
        f"prefill {batch}x{length} block {bs} {c or 'default'}  ({runner.left():.0f}s left)",
        flush=True,
      )
      bsz = dataclasses.replace(base, **c)
      cfg = {
        k: v
        for k, v in dataclasses.asdict(bsz).items()
        if k.startswith(("prefill", "mosaic")) and not k.startswith("mosaic_decode")
      }
      kernel = gpu.kernel_backend(
        "prefill",
        q_dtype=jnp.bfloat16,
        kv_dtype=jnp.bfloat16,
        head_dim=D,
        block_size=bs,
        num_tokens=batch * length,
        batch=batch,
        requested=bsz.prefill_kernel,
        interpret=INTERPRET,
      )
      row = measure(
        runner,
        "ours_prefill",
        ours_fn(bsz, scale=D**-0.5),
        args,
        flops=flops,
        config=cfg,
        kernel=kernel,
        is_default=not c,
        **meta,
      )
      row["_override"] = c
      out.append(row)
    return out

  ref_bs = 64 if 64 in block_sizes else block_sizes[0]
  for bs in block_sizes:
    rows += run(bs, sweep if bs == ref_bs else [c for c in PREFILL_EVERY_BLOCK if c in sweep])
  # Dense peers on contiguous K/V (the no-paging limit): cuDNN, and on the GPU JAX's own
  # Mosaic GPU flash attention (FlashAttention-3 design), whose shared-memory scratch is
  # float16-only, so it runs in float16 (the same speed class as bf16).
  qd = jax.random.normal(jax.random.key(3), (batch, length, HQ, D), jnp.bfloat16)
  kd = jax.random.normal(jax.random.key(4), (batch, length, HKV, D), jnp.bfloat16)
  peers = [
    (
      "cudnn_dense",
      lambda: functools.partial(
        jax.nn.dot_product_attention, is_causal=True, implementation=None if INTERPRET else "cudnn"
      ),
      (qd, kd, kd),
    )
  ]
  if not INTERPRET:

    def mosaic_fa3():
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu import attention_mgpu
      cfg = attention_mgpu.TuningConfig(
        block_q=64, block_kv=128, max_concurrent_steps=2, causal=True
      )
      return functools.partial(attention_mgpu.attention, config=cfg)

    q16, k16 = qd.astype(jnp.float16), kd.astype(jnp.float16)
    peers.append(("builtin_mosaic_dense_f16", mosaic_fa3, (q16, k16, k16)))
  dense = dict(kind="prefill", batch=batch, q_len=length, context=length, block_size=None)
  for name, make_fn, args in peers:
    try:
      rows.append(measure(runner, name, jax.jit(make_fn()), args, flops=flops, **dense))
    except Exception:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
      traceback.print_exc()
  return rows


def _quant_case(rng, batch, context):
  """bf16 q and pools (blocks scattered, no poison) of the 8-bit benchmarks' shapes."""
  kb, vb, table, lengths, _, _ = make_paged(
    rng,
    batch=batch,
    context=context,
    block_size=QUANT_BLOCK_SIZE,
    num_kv_heads=HKV,
    head_dim=D,
    dtype=jnp.bfloat16,
    poison=False,
  )
  q = jax.random.normal(jax.random.key(5), (batch, HQ, D), jnp.float32).astype(jnp.bfloat16)
  return q, kb, vb, table, lengths


def kv_quant_sweep(runner, shape):
  """Times 8-bit decode at ``shape`` under each QUANT_SWEEP setting; one row per (dtype,
  setting) with its median and spread, bytes counted as in :func:`kv_quant_bench`."""
  from kernels.gpu.tuning import BlockSizes

  batch, context = shape
  q, kb, vb, table, lengths = _quant_case(np.random.default_rng(3), batch, context)
  nbytes = batch * context * 2 * HKV * (D + 4)
  rows = []
  for name in QUANT_DTYPES:
    kq, ks = jax.jit(kernels.quantize, static_argnums=1)(kb, jnp.dtype(name))
    vq, vs = jax.jit(kernels.quantize, static_argnums=1)(vb, jnp.dtype(name))
    for tile, warps, stages in QUANT_SWEEP:
      if runner.left() < 15:
        break
      bs = BlockSizes(decode_kv_tile=tile, decode_num_warps=warps, decode_num_stages=stages)
      try:
        row = measure(
          runner,
          "ours_kv_quant_sweep",
          ours_fn(bs, k_scales=ks, v_scales=vs),
          (q, kq, vq, table, lengths),
          nbytes,
          kv_dtype=name,
          widen=bs.quant_widen,
          # what the mode resolves to now (it changes with _widen.AUTO_WIDEN)
          widen_kind=_widen.widening(jnp.bfloat16, name, bs.quant_widen).kind,
          kv_tile=tile,
          num_warps=warps,
          num_stages=stages,
          batch=batch,
          context=context,
          block_size=QUANT_BLOCK_SIZE,
          num_q_heads=HQ,
          num_kv_heads=HKV,
          head_dim=D,
          kernel="triton",
        )
      except Exception:  # noqa: BLE001 - a setting that does not compile is reported
        traceback.print_exc()
        continue
      if "time_ms" in row:
        print(
          f"  sweep {name} tile {tile} warps {warps} stages {stages}: {row['time_ms']:.4f} ms "
          f"({row['time_min_ms']:.4f}-{row['time_max_ms']:.4f}), {row['tbps']:.2f} TB/s",
          flush=True,
        )
        rows.append(
          {**row, **runner.env, "commit": commit_of(os.environ.get("PAXCACHE_COMMIT", "unknown"))}
        )
  return rows


def quant_widen_cases(widens):
  """``(kv_dtype, widen)`` pairs --kv-quant times: each of ``widens`` (QUANT_WIDENS names)
  per 8-bit dtype, leaving out "f16_bits" for int8 and "int8_qk" / "int8_qkv" for e4m3 (the
  same kernels as "f16")."""
  bad = [w for w in widens if w not in QUANT_WIDENS]
  if bad:
    raise ValueError(f"--kv-quant-widen takes {QUANT_WIDENS}, got {bad}")
  return [
    (name, w)
    for name in QUANT_DTYPES
    for w in widens
    if not (name == "int8" and w == "f16_bits" and "f16" in widens)
    and not (name != "int8" and w.startswith("int8_") and "f16" in widens)
  ]


def kv_quant_bench(runner, shapes, passes, widens=QUANT_WIDENS, device=False):
  """bf16 against 8-bit decode on the same tokens, per shape; rows for kv_quant.jsonl.

  The 8-bit pools are quantized from the bf16 ones once, before timing (that is the
  cache write's job, not the kernel's). Bytes read: bf16 ``2 * B * T * Hkv * D * 2``;
  8-bit ``2 * B * T * Hkv * (D + 4)`` (rows and their float32 scales). Each 8-bit dtype
  is timed under each widening of ``widens`` (:func:`quant_widen_cases`), with the
  per-shape default settings otherwise, interleaved with bf16 in every pass; one row per
  (dtype, widening). With ``device`` each case is also timed as device time after the
  passes (``_gpu_common.device_time``: a profiler trace of 21 calls, each call's first
  kernel start to last kernel end), into ``device_ms`` (median, min, max) and
  ``device_speedup`` (bf16's device median over this one's).
  """
  rng = np.random.default_rng(2)
  ours = ours_fn(None)
  pairs = quant_widen_cases(widens)
  summary = []
  for batch, context in shapes:
    print(f"kv-quant decode {batch}x{context}  ({runner.left():.0f}s left)", flush=True)
    q, kb, vb, table, lengths = _quant_case(rng, batch, context)
    meta = dict(
      kind="decode_kv_quant",
      batch=batch,
      context=context,
      block_size=QUANT_BLOCK_SIZE,
      num_q_heads=HQ,
      num_kv_heads=HKV,
      head_dim=D,
    )
    tokens = batch * context
    # (key, kv_dtype, widen, fn, args, bytes); key "bfloat16" or "<dtype>/<widen>".
    cases = [
      ("bfloat16", "bfloat16", None, ours, (q, kb, vb, table, lengths), tokens * 4 * HKV * D)
    ]
    pools = {}
    for name, widen in pairs:
      if name not in pools:
        kq, ks = jax.jit(kernels.quantize, static_argnums=1)(kb, jnp.dtype(name))
        vq, vs = jax.jit(kernels.quantize, static_argnums=1)(vb, jnp.dtype(name))
        pools[name] = (kq, vq, ks, vs)
      kq, vq, ks, vs = pools[name]
      bsz = dataclasses.replace(
        gpu.default_block_sizes(head_dim=D, kv_dtype=name, batch=batch, num_kv_heads=HKV),
        quant_widen=widen,
      )
      # Scales as arguments of the jitted call (not bound inside it), as the bf16 case.
      fn = functools.partial(ours_fn(bsz), k_scales=ks, v_scales=vs)
      nbytes = tokens * 2 * HKV * (D + 4)
      cases.append((f"{name}/{widen}", name, widen, fn, (q, kq, vq, table, lengths), nbytes))
    times = {key: [] for key, *_ in cases}
    for rep_ in range(passes):  # interleaved, so drift of the card hits every case alike
      for key, name, widen, fn, args, nbytes in cases:
        if runner.left() < 15 and times[key]:
          continue
        row = measure(
          runner,
          "ours_kv_quant",
          fn,
          args,
          nbytes,
          kv_dtype=name,
          widen=widen,
          rep=rep_,
          **meta,
        )
        if "time_ms" in row:
          times[key].append(row["time_ms"])
    # Correctness on the GPU, cheaply: each 8-bit kernel against the reference on the same
    # 8-bit pools, for the first two sequences (relative L2 error; tolerance table kind
    # quantized_gpu_vs_float64_rel_l2, bf16 q).
    errs = {}
    for key, name, _, fn, args, _ in cases[1:]:
      q2, kq, vq, t2, l2 = args[0][:2], args[1], args[2], args[3][:2], args[4][:2]
      ks, vs = pools[name][2:]
      got = fn(q2, kq, vq, t2, l2)
      want = kernels.paged_attention(
        q2, kq, vq, t2, l2, backend="reference", k_scales=ks, v_scales=vs
      )
      errs[key] = rel_l2_error(np.asarray(got, np.float32), np.asarray(want, np.float32))
    dev = {}  # key -> Timing (seconds per call), with device=True
    for key, _, _, fn, args, _ in cases if device else ():
      try:
        dev[key] = device_time(functools.partial(fn, *args), runs=21, per_run=1)
      except Exception as e:  # noqa: BLE001 - the harness figures stand without it
        print(f"device time of {key} failed: {type(e).__name__}: {e}", flush=True)
    bf16_ms = float(np.median(times["bfloat16"])) if times["bfloat16"] else None
    old = {}  # kv_dtype -> median ms of the old widening ("q_dtype"), where timed
    for key, name, widen, *_ in cases[1:]:
      if widen == "q_dtype" and times[key]:
        old[name] = float(np.median(times[key]))
    for key, name, widen, _, _, nbytes in cases[1:]:
      if not times[key]:
        continue
      ms = float(np.median(times[key]))
      summary.append(
        dict(
          kv_dtype=name,
          widen=widen,
          widen_kind=_widen.widening(jnp.bfloat16, name, widen).kind,
          case=f"decode_{batch}x{context}_bs{QUANT_BLOCK_SIZE}_h{HQ}/{HKV}_d{D}",
          ours_ms=ms,
          # the pass medians' range (one pass: the median itself)
          ours_ms_min=float(np.min(times[key])),
          ours_ms_max=float(np.max(times[key])),
          bf16_ms=bf16_ms,
          ours_tbs=nbytes / ms / 1e9,
          bf16_tbs=(tokens * 2 * HKV * D * 2) / bf16_ms / 1e9 if bf16_ms else None,
          speedup=bf16_ms / ms if bf16_ms else None,
          speedup_vs_old_widen=old[name] / ms if name in old else None,
          passes=len(times[key]),
          rel_l2_vs_reference=errs[key],
          **(
            dict(
              device_ms=dev[key].median * 1e3,
              device_ms_min=dev[key].min * 1e3,
              device_ms_max=dev[key].max * 1e3,
              bf16_device_ms=dev["bfloat16"].median * 1e3,
              device_speedup=dev["bfloat16"].median / dev[key].median,
            )
            if key in dev and "bfloat16" in dev
            else {}
          ),
          commit=commit_of(os.environ.get("PAXCACHE_COMMIT", "unknown")),
          **runner.env,
        )
      )
  return summary


def define_flags():
  flags.DEFINE_string("out", os.environ.get("OUT", "/tmp/gpu_bench"), "output folder")
  flags.DEFINE_bool("quick", False, "one shape, one block size, no sweep")
  flags.DEFINE_float("budget-s", 420.0, "stop the sweeps after this")
  flags.DEFINE_bool("no-builtin", False, "skip JAX's built-in paged attention")
  flags.DEFINE_bool("no-prefill", False, "skip prefill")
  flags.DEFINE_bool("no-decode", False, "prefill (and the ceiling) only")
  flags.DEFINE_bool("no-sweep", False, "prefill: default config only")
  flags.DEFINE_bool("decode-sweep", False, "also time SWEEP_CONFIGS")
  flags.DEFINE_integer("passes", 3, "timing passes over the decode cases", lower_bound=1)
  flags.DEFINE_bool("smoke", False, "tiny shapes, interpret mode (CPU)")
  flags.DEFINE_bool(
    "kv-quant", False, "also time 8-bit (int8, fp8) decode against bf16 at QUANT_SHAPES"
  )
  flags.DEFINE_list(
    "kv-quant-widen",
    list(QUANT_WIDENS),
    "--kv-quant: the BlockSizes.quant_widen modes timed per 8-bit dtype",
  )
  flags.DEFINE_bool(
    "device-time",
    True,
    "--kv-quant: also time each case as device time from a profiler trace (off in --smoke)",
  )
  flags.DEFINE_bool(
    "kv-quant-sweep",
    False,
    "also time 8-bit decode under each QUANT_SWEEP setting (OUT/kv_quant_sweep.jsonl)",
  )


def main(args):
  global HQ, HKV, D, DECODE_SHAPES, BLOCK_SIZES, INTERPRET, PREFILL_LEN, QUANT_SHAPES
  global QUANT_SWEEP
  if args.smoke:
    HQ, HKV, D, INTERPRET, PREFILL_LEN = 4, 2, 64, True, 32
    DECODE_SHAPES, BLOCK_SIZES = ((2, 64),), (16,)
    QUANT_SHAPES, QUANT_SWEEP = ((2, 64),), QUANT_SWEEP[:1]
    args.no_builtin = True
  os.makedirs(args.out, exist_ok=True)
  runner = Runner(args.out, args.budget_s)
  print(runner.env, flush=True)

  ceiling = hbm_read_ceiling(1 << 16 if args.smoke else 1 << 30)
  runner.record(impl="ceiling", **ceiling)
  builtin = None
  if not args.no_builtin:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      from jax.experimental.pallas.ops.gpu import paged_attention as builtin_mod
    builtin = builtin_mod.paged_attention

  shapes = DECODE_SHAPES[:1] if args.quick else DECODE_SHAPES
  bss = BLOCK_SIZES[:1] if args.quick else BLOCK_SIZES
  prefill_rows = []
  if not args.no_prefill:
    psweep = PREFILL_SWEEP[:1] if (args.quick or args.no_sweep) else PREFILL_SWEEP
    prefill_rows = prefill_bench(runner, bss, psweep)
  cases = (
    []
    if args.no_decode
    else decode_bench(runner, shapes, bss, builtin, args.passes, args.decode_sweep)
  )

  if args.kv_quant:
    quant_rows = kv_quant_bench(
      runner,
      QUANT_SHAPES,
      args.passes,
      tuple(args.kv_quant_widen),
      device=args.device_time and not args.smoke,
    )
    write_jsonl(os.path.join(args.out, "kv_quant.jsonl"), quant_rows)
    print(
      f"{'case':>34} {'K/V':>13} {'widen':>8} {'ms':>7} {'TB/s':>5} {'vs bf16':>7} "
      f"{'vs old':>6} {'rel L2':>8} {'device ms':>9} {'vs bf16':>7}"
    )
    for r in quant_rows:
      vs_old = r["speedup_vs_old_widen"]
      print(
        f"{r['case']:>34} {r['kv_dtype']:>13} {r['widen']:>8} {r['ours_ms']:>7.4f} "
        f"{r['ours_tbs']:>5.2f} {r['speedup']:>6.2f}x "
        f"{(f'{vs_old:.2f}x' if vs_old else '-'):>6} {r['rel_l2_vs_reference']:>8.1e} "
        f"{r.get('device_ms', float('nan')):>9.4f} {r.get('device_speedup', float('nan')):>6.2f}x"
      )
  if args.kv_quant_sweep:
    sweep_rows = kv_quant_sweep(runner, QUANT_SHAPES[0])
    write_jsonl(os.path.join(args.out, "kv_quant_sweep.jsonl"), sweep_rows)

  summary = []
  for c in cases:
    meta, rows = c["meta"], c["rows"]
    by_name = {}
    for i, (name, _, _, extra) in enumerate(c["timers"]):
      by_name.setdefault(name, []).append((extra, rows[i]))
    ours_med, ours_min, ours_max = _median_tbps(by_name["ours"][0][1])
    sweep_best, sweep_cfg = None, None
    for extra, srows in by_name.get("ours_sweep", []):
      med, _, _ = _median_tbps(srows)
      if med is not None and (sweep_best is None or med > sweep_best):
        sweep_best, sweep_cfg = med, extra["sweep_config"]
    contig_med, _, _ = _median_tbps(by_name["ours_contiguous"][0][1])
    best_builtin, best_ks, builtin_err = None, None, "not run"
    for extra, brows in by_name.get("builtin", []):
      med, _, _ = _median_tbps(brows)
      if med is None:
        builtin_err = builtin_err if best_builtin else brows[0].get("error")
      elif best_builtin is None or med > best_builtin:
        best_builtin, best_ks, builtin_err = med, extra["k_splits"], None
    ceil = ceiling["ceiling_tbps"]
    summary.append(
      dict(
        **meta,
        time_ms=(c["nbytes"] / ours_med / 1e9) if ours_med else None,
        tbps=ours_med,
        tbps_min=ours_min,
        tbps_max=ours_max,
        passes=len(by_name["ours"][0][1]),
        ceiling_tbps=ceil,
        fraction_of_ceiling=ours_med / ceil if ours_med else None,
        builtin_tbps=best_builtin,
        builtin_k_splits=best_ks,
        builtin_error=builtin_err,
        contiguous_tbps=contig_med,
        paging_overhead=(1 - ours_med / contig_med) if (ours_med and contig_med) else None,
        xla_tbps=c["xla"].get("tbps"),
        sweep_best_tbps=sweep_best,
        sweep_best_config=sweep_cfg,
        **runner.env,
      )
    )
  if summary:
    write_jsonl(os.path.join(args.out, "gpu_decode.jsonl"), summary)
  pre_summary = []
  ours_pre = [r for r in prefill_rows if r.get("impl") == "ours_prefill" and "tflops" in r]
  peers = {r["impl"]: r.get("tflops") for r in prefill_rows if r.get("impl") != "ours_prefill"}
  for r in ours_pre:
    pre_summary.append(
      {
        **{
          k: r[k]
          for k in (
            "batch",
            "q_len",
            "context",
            "block_size",
            "time_ms",
            "time_min_ms",
            "time_max_ms",
            "tflops",
            "kernel",
            "config",
            "is_default",
            "device",
            "jax_version",
            "date",
          )
        },
        "cudnn_dense_tflops": peers.get("cudnn_dense"),
        "builtin_mosaic_dense_f16_tflops": peers.get("builtin_mosaic_dense_f16"),
      }
    )
  write_jsonl(os.path.join(args.out, "gpu_prefill.jsonl"), pre_summary)

  print(f"\n{runner.env}  ceiling {ceiling}")
  print(
    f"{'shape':>12} {'blk':>4} {'ours':>6} {'min-max':>11} {'%ceil':>6} {'contig':>6} "
    f"{'builtin':>8} {'xla':>6}"
  )

  def f(x):
    return f"{x:.2f}" if isinstance(x, float) else "fail"

  for s in summary:
    print(
      f"{s['batch']:>5}x{s['context']:<6} {s['block_size']:>4} {f(s['tbps']):>6} "
      f"{f(s['tbps_min'])}-{f(s['tbps_max'])} "
      f"{100 * (s['fraction_of_ceiling'] or 0):>5.1f}% {f(s['contiguous_tbps']):>6} "
      f"{f(s['builtin_tbps']):>8} {f(s['xla_tbps']):>6}"
    )
  for s in prefill_rows:
    print(
      f"prefill {s.get('impl')} block {s.get('block_size')} cfg {s.get('config')}: "
      f"{s.get('tflops', float('nan')):.1f} TFLOP/s {s.get('error', '')}"
    )
  return 0


if __name__ == "__main__":
  _flags.run(define_flags, main)
