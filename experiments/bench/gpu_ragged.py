"""GPU decode on ragged batches: the default kernel, the planned kernels and vLLM's Triton kernel.

Issue 15, items 1 and 5. One process, one GPU: the HBM read ceiling (as ``gpu_decode``
measures it), then per case the same K/V, block table and queries timed through

* ``default``: ``kernels.gpu.paged_attention`` with no plan (split-K from static shapes);
* ``planned``: the same call with ``decode_plan=plan_decode(lengths, ...)`` (built on the
  host before timing; its host time is recorded as ``plan_us``), on the Triton planned
  kernel (``planned_block_sizes``, ``decode_kernel="triton"``);
* ``mosaic``: the same plan on the Mosaic GPU planned decode (``decode_mosaic.py``,
  ``decode_kernel="mosaic"``: Hopper only; elsewhere, or if it fails, an error row for the
  variant and the case's other rows stand); ``--nomosaic`` skips it;
* ``mosaic_persistent``: the same with a persistent grid of one CUDA block per SM
  (``mosaic_decode_programs_per_sm=1``; not in ``--smoke``);
* the peer: vLLM's Triton "unified attention" kernel as vendored in the PyPI package
  ``conch-triton-kernels`` (torch + triton), when importable, on the same tokens copied
  into its ``[num_blocks, block_size, num_kv_heads, head_dim]`` layout before timing.

32 query / 8 KV heads, head_dim 128 (``--heads 9/3`` and ``--head-dim 64`` set others),
bf16, blocks at shuffled ids. Cases (``--cases`` picks some, comma-separated)::

  sharegpt256_b16   256 lengths drawn as experiments/workloads.py draws ShareGPT-like
                    requests (prompt + output, seed 0, <= 8192), block 16
  uniform64_b16     64 lengths uniform in [1, 8192], block 16
  long1_short63_b16 one sequence of 32,768 and 63 of 128, block 16
  engine61_b16      an engine decode step: 61 ShareGPT-like requests (seed 0, <= 1024),
                    each its prompt plus half its output, block 16 (not in the default
                    list; with --heads 9/3 --head-dim 64, SmolLM2's attention)
  full64x8192_b16, full128x4096_b32, full64x8192_b128, full256x2048_b16, full8x4096_b16

Timing: each timed function is one jit running ``--calls`` kernel calls on distinct
queries (no Python dispatch between them). Harness time (``ours_tbs``): the jit dispatched
``--inner`` (3) times back to back per sample, 21 samples (``experiments._timing.
time_calls``); on the H200 this includes 12-37 us per call of host time before a sample's
first kernel and after its last. Device time (``device_tbs``, on unless
``--nodevice-time``): a ``jax.profiler`` trace of 21 runs of the jit, each run's first
kernel start to last kernel end over its calls (``_gpu_common.device_time``), as a share
of the plain sum timed the same way (``device_ceiling_tbs``). ``--profile`` adds each
variant's kernels by name, their time and the idle between them (``profile``). The peer
runs ``--calls`` calls captured in one CUDA graph between two CUDA events (plain
back-to-back launches if capture fails). TB/s = K/V bytes the lengths cover
(``sum(lengths) * 2 * kv_heads * head_dim * 2``) / median time. Rows say which kernel
family ran (``kernel``: "triton" or "mosaic"). Every output is checked against the default
kernel's (relative L2, ``check_rel_l2``; ``check_ok`` when under the
bf16 bound of ``gpu_kernel_vs_reference_rel_l2`` in kernels/testing.py). Rows go to
``OUT/gpu_decode_ragged.jsonl`` as each case finishes (one failing case or peer loses
nothing else); ``--sweep`` also times a few planned settings (``SWEEP``, and
``MOSAIC_SWEEP`` unless ``--nomosaic``) into ``OUT/gpu_decode_ragged_sweep.jsonl``::

  python -m experiments.bench.gpu_ragged --out /tmp/ragged [--sweep] [--profile]
  python -m experiments.bench.gpu_ragged --cases sharegpt256_b16,long1_short63_b16 --out /tmp/r2
  python -m experiments.bench.gpu_ragged --smoke --out /tmp/ragged_smoke
  python -m experiments.bench.gpu_ragged --nomosaic --persistent 1,2:64:2,3:64:2 --out /tmp/rp

``--smoke`` (one call per jit, two timing samples) runs the Mosaic variant too, in GPU
interpret mode.

The peer needs ``pip install conch-triton-kernels`` (and torch); it is imported only here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
import traceback
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments._timing import time_calls
from experiments.bench import _flags
from experiments.bench._gpu_common import (
  commit_of,
  device_time,
  env_info,
  kernel_summary,
  shuffled_pool,
  trace_kernels,
  vllm_unified_attention,
  write_jsonl,
)
from kernels import gpu
from kernels.gpu import plan as plan_mod
from kernels.testing import rel_l2_error, tolerance

HQ, HKV, D = 32, 8, 128
DTYPE = jnp.bfloat16
INTERPRET = False  # --smoke: tiny shapes in interpret mode on CPU
FULL = {
  "full64x8192_b16": (64, 8192, 16),
  "full128x4096_b32": (128, 4096, 32),
  "full64x8192_b128": (64, 8192, 128),
  "full256x2048_b16": (256, 2048, 16),
  "full8x4096_b16": (8, 4096, 16),
}
CASES = ("sharegpt256_b16", "uniform64_b16", "long1_short63_b16", *FULL)
EXTRA_CASES = ("engine61_b16",)  # run only when named in --cases
# --sweep: planned settings beside the default ones, each a dict of: "bs" (BlockSizes
# overrides), "per_sm" (programs per SM the plan aims at), "per_octave" (padded chunk
# counts per doubling), "min_chunk" (plan_decode's min_chunk_tokens) and "merge" (the
# planned merge's (MERGE_TILE, MERGE_NUM_WARPS, MERGE_NUM_STAGES)); a key left out keeps
# the default. The default is planned_block_sizes (128-token steps, 4 warps, 2 stages at
# bf16 head_dim 128: one program per SM), chunks of at least plan.min_chunk_for (256-1024)
# and a 32-chunk merge with 4 warps, 2 stages; BEFORE is what they replaced (f46425b): the
# rule's small-batch decode settings for the head_dim ("bs": "rule"; 64-token steps, 4
# warps, 3 stages at bf16 head_dim 128), chunks of at least 256, a 64-chunk merge, 8 warps.
SMALL_STEPS = dict(decode_kv_tile=64, decode_num_warps=4, decode_num_stages=3)
LARGE_STEPS = dict(decode_kv_tile=128, decode_num_warps=8, decode_num_stages=3)
BEFORE = dict(bs="rule", min_chunk=256, merge=(64, 8, 1))
SWEEP = (
  BEFORE,
  dict(bs=SMALL_STEPS),
  dict(bs=LARGE_STEPS),
  dict(bs=dict(decode_kv_tile=128, decode_num_warps=4, decode_num_stages=3)),
  dict(min_chunk=256),
  dict(min_chunk=512),
  dict(merge=(64, 8, 1)),
  dict(merge=(16, 4, 1)),
  dict(per_sm=4),
  dict(per_sm=16),
  # Deeper pipelines of smaller steps (run28: at 8 x 4096 the planned kernel's warps wait
  # on the barrier of their one 64 KiB step in flight, two programs an SM): more, smaller
  # steps in flight in about the same shared memory.
  dict(bs=dict(decode_kv_tile=64, decode_num_warps=4, decode_num_stages=4)),
  dict(bs=dict(decode_kv_tile=64, decode_num_warps=4, decode_num_stages=5)),
  dict(bs=dict(decode_kv_tile=32, decode_num_warps=4, decode_num_stages=6)),
)
# --sweep with the Mosaic variants on: Mosaic GPU decode settings (the defaults: 64-key
# steps, the deepest ring that fits, one CUDA block per unit, the Triton merge), rows
# "mosaic_sweep".
MOSAIC = dict(decode_kernel="mosaic")
MOSAIC_SWEEP = (
  dict(bs=dict(MOSAIC, mosaic_decode_kv_tile=128)),
  dict(bs=dict(MOSAIC, mosaic_decode_num_slots=2)),
  dict(bs=dict(MOSAIC, mosaic_decode_programs_per_sm=1, mosaic_decode_kv_tile=128)),
  dict(bs=dict(MOSAIC, mosaic_decode_programs_per_sm=1), per_sm=16),
  dict(bs=dict(MOSAIC, mosaic_decode_programs_per_sm=1), per_sm=4),
  dict(bs=dict(MOSAIC, mosaic_decode_merge="xla")),
)


def _merge_defaults():
  from kernels.gpu import planned

  return planned.MERGE_TILE, planned.MERGE_NUM_WARPS, planned.MERGE_NUM_STAGES


@contextlib.contextmanager
def merge_settings(merge):
  """The planned merge's (tile, warps, stages) set to ``merge`` inside the block (None:
  unchanged), restored after; JAX's caches are cleared on the way in and out, since the
  jitted kernels read these module constants when they trace."""
  from kernels.gpu import planned

  if merge is None:
    yield
    return
  saved = _merge_defaults()
  planned.MERGE_TILE, planned.MERGE_NUM_WARPS, planned.MERGE_NUM_STAGES = merge
  jax.clear_caches()
  try:
    yield
  finally:
    planned.MERGE_TILE, planned.MERGE_NUM_WARPS, planned.MERGE_NUM_STAGES = saved
    jax.clear_caches()


def case_lengths(name: str) -> tuple[np.ndarray, int]:
  """``(lengths i32[batch], block_size)`` of a case."""
  if name == "sharegpt256_b16":
    from experiments import workloads

    pairs = workloads.sample_synthetic(workloads.SHAREGPT, 256, max_seq_len=8192, seed=0)
    return pairs.sum(axis=1).astype(np.int32), 16
  if name == "uniform64_b16":
    return np.random.default_rng(0).integers(1, 8193, size=64).astype(np.int32), 16
  if name == "long1_short63_b16":
    return np.array([32768] + [128] * 63, np.int32), 16
  if name == "engine61_b16":
    from experiments import workloads

    pairs = workloads.sample_synthetic(workloads.SHAREGPT, 61, max_seq_len=1024, seed=0)
    return (pairs[:, 0] + pairs[:, 1] // 2).astype(np.int32), 16
  if name in FULL:
    batch, context, bs = FULL[name]
    return np.full((batch,), context, np.int32), bs
  raise ValueError(f"unknown case {name!r}; cases: {', '.join(CASES + EXTRA_CASES)}")


def smoke_lengths(name: str) -> tuple[np.ndarray, int]:
  """--smoke: each case shrunk to a few short rows (same shape of raggedness)."""
  if name == "long1_short63_b16":
    return np.array([300, 5, 5, 5], np.int32), 16
  if name in FULL:
    return np.full((2,), 64, np.int32), 16
  return np.random.default_rng(0).integers(1, 120, size=4).astype(np.int32), 16


def make_pool(rng, lengths, block_size):
  """``shuffled_pool`` at this script's heads, head_dim and dtype."""
  return shuffled_pool(rng, lengths, block_size, num_kv_heads=HKV, head_dim=D, dtype=DTYPE)


def many_calls(num_calls, **kw):
  """One jit running ``num_calls`` decode calls, one per query array: device time per jit."""
  fn = functools.partial(gpu.paged_attention, interpret=INTERPRET, **kw)

  def run(qs, kb, vb, table, lengths, plan):
    return [fn(q, kb, vb, table, lengths, decode_plan=plan) for q in qs]

  return jax.jit(run)


def persistent_calls(num_calls, schedule, block_sizes):
  """As :func:`many_calls`, for the persistent planned decode (``kernels.gpu.persistent``,
  an experiment) on ``schedule``'s programs."""
  from kernels.gpu.persistent import persistent_decode

  def run(qs, kb, vb, table, lengths, plan):
    return [
      persistent_decode(
        q,
        kb,
        vb,
        table,
        lengths,
        plan,
        schedule,
        scale=q.shape[-1] ** -0.5,
        sliding_window=None,
        logit_soft_cap=None,
        block_sizes=block_sizes,
        interpret=INTERPRET,
      )
      for q in qs
    ]

  return jax.jit(run)


def time_ours(fn, args, num_calls, repeats, inner=3):
  if INTERPRET:  # --smoke: the timing path runs, but interpret mode is slow (Mosaic GPU's)
    t = time_calls(lambda: fn(*args), repeats=2, inner=1, warmup=1)
    return t.map(lambda s: s / num_calls)
  t = time_calls(lambda: fn(*args), repeats=repeats, inner=inner, warmup=2)
  return t.map(lambda s: s / num_calls)


def vllm_peer(q, kb, vb, table, lengths, num_calls, repeats):
  """vLLM's unified-attention Triton kernel (conch-triton-kernels) on the same tokens, one
  query per sequence: ``(seconds per call Timing, output as a NumPy float32 array, how it
  was timed)`` (``_gpu_common.vllm_unified_attention``)."""
  cu_q = np.arange(len(lengths) + 1, dtype=np.int32)
  return vllm_unified_attention(
    q,
    kb,
    vb,
    table,
    lengths,
    cu_q,
    max_q_len=1,
    scale=D**-0.5,
    num_calls=num_calls,
    repeats=repeats,
  )


def check(out, want) -> dict:
  err = rel_l2_error(out, want)
  ok = (
    bool(np.isfinite(out).all()) and err < tolerance("gpu_kernel_vs_reference_rel_l2", DTYPE).rtol
  )
  if not ok:
    print(f"CHECK FAILED: relative L2 {err:.3g} against the default kernel", flush=True)
  return dict(check_rel_l2=err, check_ok=ok)


def profile_variant(fn, call_args, num_calls, seconds_per_call):
  """Where one call's device time goes (--profile): its kernels by name, from a
  ``jax.profiler`` trace of 3 runs of the timed jit, each kernel's time per call, and the
  idle time between them (the span of the trace per call less the kernels)."""
  runs = 3
  events = trace_kernels(lambda: fn(*call_args), runs)
  summary = kernel_summary(events, runs * num_calls)
  summary["idle_us"] = summary["span_us"] - summary["kernel_us"]
  summary["timed_us"] = seconds_per_call * 1e6
  summary["by_name"] = summary["by_name"][:6]
  return summary


def run_case(name, args, ceiling, env, peer_ok, device_ceiling=None):
  """Times one case; returns (rows for gpu_decode_ragged.jsonl, sweep rows)."""
  lengths, block_size = smoke_lengths(name) if args.smoke else case_lengths(name)
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  kb, vb, table = make_pool(rng, lengths, block_size)
  keys = jax.random.split(jax.random.key(7), args.calls)
  qs = [jax.random.normal(k, (len(lengths), HQ, D), jnp.float32).astype(DTYPE) for k in keys]
  lens_dev, table_dev = jnp.asarray(lengths), jnp.asarray(table)
  nbytes = int(lengths.astype(np.int64).sum()) * 2 * HKV * D * jnp.dtype(DTYPE).itemsize
  base = dict(
    case=name,
    batch=len(lengths),
    block_size=block_size,
    head_dim=D,
    num_q_heads=HQ,
    num_kv_heads=HKV,
    dtype=jnp.dtype(DTYPE).name,
    mean_len=float(lengths.mean()),
    max_len=int(lengths.max()),
    kernel="triton",
    ceiling_tbs=ceiling,
    commit=args.commit,
    **env,
  )

  calls_of = {}  # variant -> (jitted calls, their arguments), for --profile

  def measure(plan, block_sizes, variant=None, fn=None):
    fn = fn or many_calls(args.calls, block_sizes=block_sizes)
    call_args = (qs, kb, vb, table_dev, lens_dev, plan)
    t = time_ours(fn, call_args, args.calls, args.repeats, args.inner)
    calls_of[variant] = (fn, call_args)
    return t, np.asarray(jnp.asarray(fn(*call_args)[0], jnp.float32))

  def device_fields(variant):
    """Device time of ``variant``'s last measured calls (--device-time), as row fields."""
    if not args.device_time or args.smoke:
      return {}
    fn, call_args = calls_of[variant]
    try:
      dt = device_time(functools.partial(fn, *call_args), runs=args.repeats, per_run=args.calls)
    except Exception as e:  # noqa: BLE001 - the harness figure stands without it
      return dict(device_time_error=f"{type(e).__name__}: {str(e)[:200]}")
    dtb = dt.map(lambda s: nbytes / s / 1e12)
    return dict(
      device_tbs=dtb.median,
      device_tbs_min=dtb.min,
      device_tbs_max=dtb.max,
      **dt.fields("device_time", digits=5),
      device_fraction_of_ceiling=dtb.median / device_ceiling if device_ceiling else None,
      device_ceiling_tbs=device_ceiling,
    )

  print(f"{name}: batch {len(lengths)}, mean {lengths.mean():.0f}, max {lengths.max()}", flush=True)
  t_def, out_def = measure(None, None, "default")
  plan = plan_mod.plan_decode(lengths, block_size, HKV)
  plan_t = time_calls(
    lambda: plan_mod.plan_decode(lengths, block_size, HKV), repeats=21, inner=20, sync=lambda x: x
  )
  dev_plan = plan.device_put()
  planned_bs = gpu.planned_block_sizes(head_dim=D, kv_dtype=DTYPE)
  t_plan, out_plan = measure(
    dev_plan, dataclasses.replace(planned_bs, decode_kernel="triton"), "planned"
  )
  tbs = {"default": t_def.map(lambda s: nbytes / s / 1e12)}
  tbs["planned"] = t_plan.map(lambda s: nbytes / s / 1e12)
  variants = [("default", t_def, out_def), ("planned", t_plan, out_plan)]
  for entry in args.persistent:
    # The experiment: the planned kernel's chunks on per_sm * SMs persistent programs, in
    # the planned kernel's steps or (per_sm:kv_tile:stages) others: 128-key steps in two
    # stages take more than half an SM's shared memory, so two programs an SM need smaller steps.
    from kernels.gpu.persistent import persistent_schedule

    per_sm, *steps = (int(x) for x in entry.split(":"))
    bs = planned_bs
    if steps:
      bs = dataclasses.replace(bs, decode_kv_tile=steps[0], decode_num_stages=steps[1])
    variant = "persistent" + entry.replace(":", "_")
    num_programs = -(-per_sm * plan_mod.num_sms() // HKV)
    sched = persistent_schedule(plan, num_programs, bs.decode_kv_tile)
    fn = persistent_calls(args.calls, jax.device_put(sched), bs)
    t_p, out_p = measure(dev_plan, None, variant, fn=fn)
    tbs[variant] = t_p.map(lambda s: nbytes / s / 1e12)
    variants.append((variant, t_p, out_p))
  mosaic_errors = []
  mosaic_variants = [("mosaic", {})]
  if not args.smoke:  # (interpret mode is slow, and off a GPU it is the same grid)
    mosaic_variants.append(("mosaic_persistent", dict(mosaic_decode_programs_per_sm=1)))
  for variant, extra in mosaic_variants if args.mosaic else ():
    try:
      bsz = dataclasses.replace(planned_bs, decode_kernel="mosaic", **extra)
      t_mg, out_mg = measure(dev_plan, bsz, variant)
      tbs[variant] = t_mg.map(lambda s: nbytes / s / 1e12)
      variants.append((variant, t_mg, out_mg))
    except Exception as e:  # noqa: BLE001 - off Hopper, or a failure: the other rows stand
      traceback.print_exc()
      mosaic_errors.append((variant, f"{type(e).__name__}: {str(e)[:300]}"))
  peer = dict(vllm_tbs=None)
  if peer_ok and not args.smoke:
    try:
      t_v, out_v, how = vllm_peer(qs[0], kb, vb, table, lengths, args.calls, args.repeats)
      tv = t_v.map(lambda s: nbytes / s / 1e12)
      peer = dict(
        vllm_tbs=tv.median,
        vllm_tbs_min=tv.min,
        vllm_tbs_max=tv.max,
        vllm_timing=how,
        vllm_rel_l2_vs_default=rel_l2_error(out_v, out_def),
      )
    except Exception as e:  # noqa: BLE001 - a failing peer is recorded, not fatal
      traceback.print_exc()
      peer = dict(vllm_tbs=None, vllm_error=f"{type(e).__name__}: {str(e)[:300]}")
  # The plan's default floor for this batch (no window: a row's span is its length).
  default_min_chunk = plan_mod.min_chunk_for(int(lengths.sum()), HKV, lengths.astype(np.int64))
  rows = []
  for variant, t, out in variants:
    row = dict(
      base,
      variant=variant,
      kernel="mosaic" if variant.startswith("mosaic") else "triton",
      ours_tbs=tbs[variant].median,
      ours_tbs_min=tbs[variant].min,
      ours_tbs_max=tbs[variant].max,
      **t.fields("time", digits=5),
      fraction_of_ceiling=tbs[variant].median / ceiling if ceiling else None,
      **check(out, out_def),
      **peer,
    )
    if args.profile and not args.smoke:
      row["profile"] = profile_variant(*calls_of[variant], args.calls, t.median)
    row.update(device_fields(variant))
    if variant != "default":
      row.update(
        plan_us=plan_t.median * 1e6,
        plan_us_max=plan_t.max * 1e6,
        num_chunks=plan.num_chunks(),
        padded_chunks=plan.num_padded_chunks,
        max_chunk_tokens=int((plan.chunk_end - plan.chunk_start).max()),
        min_chunk_tokens=default_min_chunk,
      )
    rows.append(row)
  for variant, error in mosaic_errors:
    rows.append(dict(base, variant=variant, kernel="mosaic", error=error))
  sweep_rows = []
  if args.sweep:
    default_bs = dataclasses.replace(planned_bs, decode_kernel="triton")
    settings = SWEEP + (MOSAIC_SWEEP if args.mosaic else ())
    if args.sweep_only:
      settings = tuple(settings[int(i)] for i in args.sweep_only)
    if args.sweep_min_chunks:  # the plan's floor alone (0: its default, min_chunk_for)
      settings = tuple(dict(min_chunk=int(m) or None) for m in args.sweep_min_chunks)
    for setting in settings:
      if time.time() > args.deadline:
        break
      overrides = setting.get("bs", {})
      if overrides == "rule":  # the small-batch rule's decode settings for this head_dim
        rule = gpu.rule_block_sizes(head_dim=D, kv_dtype=DTYPE)
        overrides = {f: getattr(rule, f) for f in SMALL_STEPS}
      per_sm, per_octave = setting.get("per_sm"), setting.get("per_octave")
      min_chunk, merge = setting.get("min_chunk"), setting.get("merge")
      mosaic = overrides.get("decode_kernel") == "mosaic"
      variant = "mosaic_sweep" if mosaic else "planned_sweep"
      try:
        with merge_settings(merge):
          bsz = dataclasses.replace(default_bs, **overrides)
          target = None if per_sm is None else per_sm * plan_mod.num_sms()
          p = plan_mod.plan_decode(
            lengths,
            block_size,
            HKV,
            target_programs=target,
            buckets_per_octave=per_octave or 1,
            **({} if min_chunk is None else dict(min_chunk_tokens=min_chunk)),
          )
          t, out = measure(p.device_put(), bsz, "sweep")
          tb = t.map(lambda s: nbytes / s / 1e12)
          sweep_rows.append(
            dict(
              base,
              variant=variant,
              kernel="mosaic" if mosaic else "triton",
              config={
                k: v
                for k, v in dataclasses.asdict(bsz).items()
                if k.startswith(("decode", "mosaic_decode") if mosaic else "decode")
              },
              programs_per_sm=per_sm or plan_mod.PROGRAMS_PER_SM,
              buckets_per_octave=per_octave or 1,
              min_chunk_tokens=min_chunk or default_min_chunk,
              min_chunk_default=min_chunk is None,
              max_chunk_tokens=int((p.chunk_end - p.chunk_start).max()),
              merge=list(merge or _merge_defaults()),
              ours_tbs=tb.median,
              ours_tbs_min=tb.min,
              ours_tbs_max=tb.max,
              fraction_of_ceiling=tb.median / ceiling if ceiling else None,
              num_chunks=p.num_chunks(),
              padded_chunks=p.num_padded_chunks,
              **check(out, out_def),
              **device_fields("sweep"),
            )
          )
      except Exception as e:  # noqa: BLE001 - one setting failing loses no other
        traceback.print_exc()
        sweep_rows.append(dict(base, variant=variant, config=repr(setting), error=repr(e)))
  return rows, sweep_rows


def define_flags():
  flags.DEFINE_string("out", os.environ.get("OUT", "/tmp/gpu_ragged"), "output folder")
  flags.DEFINE_list("cases", list(CASES), f"cases to run, of {', '.join(CASES)}")
  flags.DEFINE_integer("calls", 8, "kernel calls per timed jit (and per CUDA graph)", lower_bound=1)
  flags.DEFINE_integer("repeats", 21, "timing samples per measurement", lower_bound=5)
  flags.DEFINE_bool("sweep", False, "also time SWEEP's planned settings")
  flags.DEFINE_list("sweep-only", [], "--sweep: indices of SWEEP + MOSAIC_SWEEP to run (all)")
  flags.DEFINE_list(
    "sweep-min-chunks",
    [],
    "--sweep: instead of SWEEP, the plan's smallest chunk at each of these (0: the default)",
  )
  flags.DEFINE_string("heads", "32/8", "query / KV heads (the issue's cases: 32/8)")
  flags.DEFINE_integer(
    "head-dim", 128, "head_dim of q and K/V (the issue's cases: 128)", lower_bound=16
  )
  flags.DEFINE_bool("no-peer", False, "skip vLLM's Triton kernel")
  flags.DEFINE_bool("mosaic", True, "also time the Mosaic GPU planned decode (Hopper)")
  flags.DEFINE_list(
    "persistent",
    [],
    "also time the persistent planned decode (kernels.gpu.persistent, an experiment) with "
    "this many programs per SM, comma separated; PER_SM:KV_TILE:STAGES sets its steps too",
  )
  flags.DEFINE_float("budget-s", 200.0, "start no sweep setting after this many seconds")
  flags.DEFINE_string("commit", os.environ.get("PAXCACHE_COMMIT", "unknown"), "recorded commit")
  flags.DEFINE_integer(
    "inner", 3, "jit runs dispatched back to back per timing sample", lower_bound=1
  )
  flags.DEFINE_bool(
    "device-time",
    True,
    "also time each variant as device time from a profiler trace (device_tbs: first "
    "kernel start to last kernel end per jit run; the ceiling's sum timed the same way)",
  )
  flags.DEFINE_bool(
    "profile", False, "trace each variant's calls: kernel time by name and idle time per call"
  )
  flags.DEFINE_bool("smoke", False, "tiny shapes, interpret mode (CPU), no peer")


def main(args):
  global HQ, HKV, D, INTERPRET
  unknown = [c for c in args.cases if c not in CASES + EXTRA_CASES]
  if unknown:
    raise SystemExit(f"unknown cases {unknown}; cases: {', '.join(CASES + EXTRA_CASES)}")
  D = args.head_dim
  HQ, HKV = (int(x) for x in args.heads.split("/"))
  if args.sweep_min_chunks and not args.sweep:
    raise SystemExit("--sweep-min-chunks sets the floor of --sweep's rows: add --sweep")
  if args.smoke:
    HQ, HKV, D, INTERPRET = 4, 2, 64, True
    # GPU interpret mode (the Mosaic variant) needs 4 XLA CPU threads (kernels.gpu's
    # _mosaic_interpret_params); XLA reads NPROC when JAX makes its CPU client, below.
    os.environ.setdefault("NPROC", "4")
    args.calls, args.repeats = 1, 5
  args.commit = commit_of(args.commit)
  args.deadline = time.time() + args.budget_s
  os.makedirs(args.out, exist_ok=True)
  env = env_info()
  print(env, flush=True)
  from experiments.bench.gpu_decode import hbm_read_ceiling

  ceiling = hbm_read_ceiling(
    1 << 16 if args.smoke else 1 << 30, device_trace=args.device_time and not args.smoke
  )
  print("ceiling", ceiling, flush=True)
  # Device-time figures are shares of the best device-time read of the plain sum: torch's
  # (CUDA events) or JAX's from the trace.
  device_ceiling = max(ceiling.get("torch_sum_tbps", 0.0), ceiling.get("jax_sum_device_tbps", 0.0))
  peer_ok = not (args.no_peer or args.smoke)
  if peer_ok:
    try:
      import conch.third_party.vllm.unified_attention  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the peer is optional
      print(f"vLLM peer not importable ({type(e).__name__}: {e}); timing ours only")
      peer_ok = False
  out_path = os.path.join(args.out, "gpu_decode_ragged.jsonl")
  sweep_path = os.path.join(args.out, "gpu_decode_ragged_sweep.jsonl")
  rows = []
  for name in args.cases:
    try:
      case_rows, sweep_rows = run_case(
        name, args, ceiling["ceiling_tbps"], env, peer_ok, device_ceiling or None
      )
    except Exception as e:  # noqa: BLE001 - one failing case loses no other row
      traceback.print_exc()
      case_rows = [dict(case=name, error=f"{type(e).__name__}: {str(e)[:300]}", **env)]
      sweep_rows = []
    write_jsonl(out_path, case_rows)
    if sweep_rows:
      write_jsonl(sweep_path, sweep_rows)
    rows += case_rows

  def f(x, fmt=".2f"):
    return format(x, fmt) if isinstance(x, float) else "-"

  print(f"\nceiling {ceiling['ceiling_tbps']:.2f} TB/s; {env}")
  print(
    "| case | variant | mean len | TB/s (min-max) | % ceiling | device TB/s (min-max) | "
    "% device ceiling | vLLM TB/s | plan us |"
  )
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for r in rows:
    if "error" in r:
      print(f"| {r['case']} | {r.get('variant', '')} error | {r['error'][:60]} | | | | |")
      continue
    print(
      f"| {r['case']} | {r['variant']} | {r['mean_len']:.0f} | {f(r['ours_tbs'])} "
      f"({f(r['ours_tbs_min'])}-{f(r['ours_tbs_max'])}) | "
      f"{f(100 * r['fraction_of_ceiling'] if r['fraction_of_ceiling'] else None, '.1f')} | "
      f"{f(r.get('device_tbs'))} ({f(r.get('device_tbs_min'))}-{f(r.get('device_tbs_max'))}) | "
      f"{f(100 * (r.get('device_fraction_of_ceiling') or 0) or None, '.1f')} | "
      f"{f(r.get('vllm_tbs'))} | {f(r.get('plan_us'), '.0f')} |"
    )
  profiled = [r for r in rows if r.get("profile")]
  if profiled:
    print("\nPer call (us): timed, traced span, kernel time, idle; kernels by time")
    for r in profiled:
      p = r["profile"]
      top = "; ".join(f"{k['name'][:48]} x{k['launches']:.1f} {k['us']:.1f}" for k in p["by_name"])
      print(
        f"{r['case']} {r['variant']}: {p['timed_us']:.1f} | {p['span_us']:.1f} | "
        f"{p['kernel_us']:.1f} | {p['idle_us']:.1f} | {top}"
      )
  return 0


if __name__ == "__main__":
  _flags.run(define_flags, main)
