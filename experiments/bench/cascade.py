"""Cascade (shared-prefix) decode attention against plain paged decode on the GPU (issue 16).

Cases (32 query / 8 KV heads, head_dim 128, bf16, block 16; every row's table starts with
the shared prompt's full blocks, then blocks of its own scattered at random in the pool;
the prompt's tokens past its last full block sit in each row's first own block):

* ``100x5000``: 100 rows x (5,000 shared + U[100, 500] own tokens), case
  ``100x(5000+U[100,500])``;
* ``256x32768``: 256 rows x (32,768 shared + 512 own), case ``256x(32768+512)``.

For each case: ``kernels.plan_cascade`` on the host (its time is ``plan_ms``; the cascade
and its shared part take it with ``kernels.gpu.cascade.schedule_plan``'s Mosaic launch
arrays, built per setting outside the timing: row field ``host_schedule``), then plain
``kernels.paged_attention`` (gpu backend) and ``kernels.cascade_attention`` (gpu), timed
two ways. ``plain_ms``, ``cascade_ms`` and ``speedup``: each sample is one jitted program
that runs the kernel ``--chain`` (20) times, one call after the other
(``experiments._timing.chained``), then one block, divided by 20; median of 15 samples
with the min-max spread (row field ``timing``: ``"chain20"``). A kernel of ~0.1 ms is as
short as one Python dispatch on the H200's host, so 10 calls back to back from Python
(``--chain 0``, ``"inner10"``: how rows before run29's second call were timed) measure
the host there. The chained program still pays a host cost per execution that grows with
the kernels a call launches (0.75-1.6 ms for 20 calls on an H200 in run33: 37-81 us a
call, against a 0.09 ms cascade), so on the GPU each row also holds ``plain_device_ms``,
``cascade_device_ms`` and ``speedup_device``: one call's first kernel start to its last
kernel end in a ``jax.profiler`` trace, 15 calls each waited for
(``_gpu_common.call_spans``): the attention's device time, which issue 16's bars are about
(``--parts`` adds ``shared_device_ms`` and ``own_device_ms``).
The two outputs
must agree (relative L2 within twice the bf16 kernel bound: each is within that bound of
the exact result) and hold no NaN (unused pool slots are NaN). Prints a table and appends
one JSON line per case and cascade config to ``OUT/cascade.jsonl`` as soon as it is
measured (fields
``device``, ``case``, ``batch``, ``shared_len``, ``own_len`` (mean; ``own_len_min``/``max``),
``plain_ms``, ``cascade_ms``, ``speedup``, ``date``, ``commit``, ``jax``, ``block_size``,
``dtype`` (q's), ``kv_dtype``, spreads, ``plan_ms``, ``rel_l2``, ``config`` and the block
sizes used); a case
or config that fails is printed and written to ``OUT/cascade_errors.jsonl`` and the others
still run (the exit status is then 1).

  PYTHONPATH=. python -m experiments.bench.cascade --out /tmp/cascade
  python -m experiments.bench.cascade --cases 256x32768 --sweep --out /tmp/cascade
  python -m experiments.bench.cascade --smoke --out /tmp/cascade_smoke

``--sweep`` also times the shared kernel with the settings in ``SWEEP`` (rows with their
``config``); ``--parts`` adds ``shared_ms`` and ``own_ms`` to each row, the shared kernel
and the own part's decode each timed alone (``kernels.gpu.cascade.shared_partials`` and
``own_partials``), so that a row says which part holds the time; ``--kv-dtype int8`` (or
``float8_e4m3fn``) runs both kernels on 8-bit pools with scales (the first compiled run of
the cascade 8-bit path)::

  python -m experiments.bench.cascade --kv-dtype int8 --out /tmp/cascade_int8

``--smoke`` runs a tiny case in interpret mode on CPU (to test this script).

``--plan-only`` times ``kernels.plan_cascade`` alone on each case's block table, on the
host (no pools, no device; any machine): the first call, then the median and min-max of
``20 * --repeats`` samples of one call; prints a table and appends one JSON line per case to
``OUT/cascade_plan.jsonl`` (``plan_ms``, its spread, ``plan_first_ms``, ``groups``,
``table_blocks``, the 1-minute load average, ``commit``, ``date``)::

  PYTHONPATH=. python -m experiments.bench.cascade --plan-only --out /tmp/cascade_plan
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import kernels
from experiments._timing import chained, spread_text, time_calls
from experiments.bench import _flags
from experiments.bench._gpu_common import call_spans, env_info, write_jsonl
from kernels.testing import rel_l2_error, tolerance


@dataclasses.dataclass(frozen=True)
class Case:
  name: str  # the --cases name
  label: str  # the recorded ``case``
  batch: int
  shared_len: int
  own_lo: int
  own_hi: int  # own lengths drawn uniformly from [own_lo, own_hi]


CASES = {
  c.name: c
  for c in (
    Case("100x5000", "100x(5000+U[100,500])", 100, 5000, 100, 500),
    Case("256x32768", "256x(32768+512)", 256, 32768, 512, 512),
  )
}
SMOKE = Case("smoke", "3x(40+U[4,12])", 3, 40, 4, 12)
HQ, HKV, D, BLOCK = 32, 8, 128, 16
# --sweep: shared-kernel settings timed beside the default (kernels.gpu.cascade).
SWEEP = (
  # The Triton shared kernel's defaults (what "auto" runs off Hopper and for 8-bit K/V),
  # then settings of it; the default row is "auto": the Mosaic part on Hopper for bf16.
  dict(shared_kernel="triton"),
  dict(shared_kernel="triton", shared_num_warps=8),
  dict(
    shared_kernel="triton",
    shared_rows=128,
    shared_kv_tile=128,
    shared_num_warps=8,
    shared_num_stages=2,
  ),
  dict(
    shared_kernel="triton",
    shared_rows=64,
    shared_kv_tile=64,
    shared_num_warps=4,
    shared_num_stages=3,
  ),
  # more, shorter programs than the wave-filling default
  dict(shared_kernel="triton", shared_num_chunks=8),
  # Two programs an SM (96 KiB of shared memory each) instead of one (128 KiB): the
  # default's 4 warps alone on an SM may not keep its tensor cores busy.
  dict(shared_kernel="triton", shared_num_stages=2),
  dict(shared_kernel="triton", shared_num_stages=2, shared_num_warps=8),
  dict(shared_kernel="triton", shared_num_stages=2, shared_num_chunks=8),
  dict(shared_kernel="triton", shared_num_stages=2, shared_num_chunks=16),
  dict(shared_kernel="triton", shared_num_warps=8, shared_num_chunks=8),
  # The best Triton setting at 256 x 32k in run29 (0.426 ms shared, 8.9x).
  dict(
    shared_kernel="triton",
    shared_rows=256,
    shared_kv_tile=64,
    shared_num_warps=8,
    shared_num_stages=2,
  ),
  dict(
    shared_kernel="triton",
    shared_rows=64,
    shared_kv_tile=128,
    shared_num_warps=4,
    shared_num_stages=2,
  ),
  dict(
    shared_kernel="triton",
    shared_rows=128,
    shared_kv_tile=32,
    shared_num_warps=4,
    shared_num_stages=4,
  ),
  # The Mosaic GPU part asked for (Hopper only), and settings of it.
  dict(shared_kernel="mosaic"),
  dict(shared_kernel="mosaic", shared_num_chunks=4),
  dict(shared_kernel="mosaic", shared_mosaic_kv_tile=64, shared_mosaic_num_slots=3),
  dict(shared_kernel="mosaic", shared_mosaic_kv_tile=64, shared_mosaic_num_slots=4),
)


def git_commit() -> str:
  """$PAXCACHE_COMMIT, else ``git rev-parse --short HEAD``, else "unknown"."""
  if os.environ.get("PAXCACHE_COMMIT"):
    return os.environ["PAXCACHE_COMMIT"]
  try:
    out = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
    )
    return out.stdout.strip() or "unknown"
  except Exception:  # noqa: BLE001 - no git on the machine: say so
    return "unknown"


def build_table(case: Case, seed: int, *, block_size):
  """Block table, lengths and the live ``[num_blocks, block_size]`` slots of a case (NumPy:
  what the host planner sees; :func:`build` adds the pools)."""
  rng = np.random.default_rng(seed)
  own = rng.integers(case.own_lo, case.own_hi + 1, size=case.batch)
  lengths = (case.shared_len + own).astype(np.int32)
  full = case.shared_len // block_size  # the prompt's full blocks: shared
  need = -(-lengths // block_size)
  own_blocks = need - full
  num_blocks = full + int(own_blocks.sum())
  perm = rng.permutation(num_blocks).astype(np.int32)
  shared_ids, own_ids = perm[:full], perm[full:]
  table = np.full((case.batch, int(need.max())), -1, np.int32)
  table[:, :full] = shared_ids
  live = np.zeros((num_blocks, block_size), bool)
  live[shared_ids] = True
  taken = 0
  for b in range(case.batch):
    ids = own_ids[taken : taken + own_blocks[b]]
    taken += own_blocks[b]
    table[b, full : need[b]] = ids
    live[ids] = True
    last = lengths[b] - (need[b] - 1) * block_size  # tokens in the row's last block
    live[ids[-1], last:] = False
  return table, lengths, live


def build(case: Case, seed: int, *, heads, head_dim, block_size, dtype, kv_dtype=None):
  """Pools, block table, lengths, q and scales (None unless ``kv_dtype`` is 8-bit) of a
  case; slots no row reads are NaN (8-bit pools: NaN scales)."""
  num_q_heads, num_kv_heads = heads
  table, lengths, live = build_table(case, seed, block_size=block_size)
  num_blocks = live.shape[0]
  kk, kv, kq = jax.random.split(jax.random.key(seed), 3)
  shape = (num_kv_heads, num_blocks, block_size, head_dim)
  mask = jnp.asarray(live)[None, :, :, None]
  k = jnp.where(mask, jax.random.normal(kk, shape, jnp.float32), jnp.nan)
  v = jnp.where(mask, jax.random.normal(kv, shape, jnp.float32), jnp.nan)
  q = jax.random.normal(kq, (case.batch, num_q_heads, head_dim), jnp.float32).astype(dtype)
  kv_dtype = dtype if kv_dtype is None else kv_dtype
  if kernels.is_quantized(kv_dtype):
    (k, ks), (v, vs) = kernels.quantize(k, kv_dtype), kernels.quantize(v, kv_dtype)
    return q, k, v, table, lengths, dict(k_scales=ks, v_scales=vs)
  return q, k.astype(kv_dtype), v.astype(kv_dtype), table, lengths, {}


def run_case(
  case: Case,
  *,
  interpret,
  configs,
  repeats,
  inner,
  heads,
  head_dim,
  block_size,
  emit,
  kv_dtype,
  parts=False,
  chain=0,
):
  """Times plain and cascade decode of one case; ``emit(row)`` as each config is measured.

  With ``parts`` each row also holds ``shared_ms`` and ``own_ms`` (and their spreads): the
  shared kernel alone and the own part's decode alone, timed the same way.

  Returns ``(config, message)`` for each config that failed (a sweep setting that does not
  compile must not lose the default's row). A failure before the cascade configs
  (building, planning, the plain kernel) raises.
  """
  from kernels.gpu.cascade import default_cascade_block_sizes

  dtype, kv_dtype = jnp.dtype(jnp.bfloat16), jnp.dtype(kv_dtype)
  q, k, v, table_np, lengths_np, scales = build(
    case, 0, heads=heads, head_dim=head_dim, block_size=block_size, dtype=dtype, kv_dtype=kv_dtype
  )
  t0 = time.perf_counter()
  plan_np = kernels.plan_cascade(table_np, lengths_np, block_size)
  plan_times = [time.perf_counter() - t0]
  for _ in range(20):
    t0 = time.perf_counter()
    kernels.plan_cascade(table_np, lengths_np, block_size)
    plan_times.append(time.perf_counter() - t0)
  if plan_np is None:
    raise RuntimeError(f"plan_cascade found no group in case {case.label}")
  kernels.cascade.validate_plan(plan_np, q, k, table_np, lengths_np)  # host checks, once
  table, lengths, plan = jax.device_put((table_np, lengths_np, plan_np))

  plain = jax.jit(functools.partial(kernels.paged_attention, backend="gpu", interpret=interpret))

  def timed(fn, *a, **kw):
    """Seconds per call of ``fn(*a, **kw)``: ``chain`` calls inside one jit
    (:func:`experiments._timing.chained`), or ``inner`` calls back to back from Python."""
    if chain:
      run = chained(fn, chain)
      t = time_calls(lambda: run(*a, **kw), repeats=repeats, inner=1, warmup=2)
      return t.map(lambda x: x / chain)
    return time_calls(lambda: fn(*a, **kw), repeats=repeats, inner=inner, warmup=2)

  t_plain = timed(plain, q, k, v, table, lengths, **scales)

  def device(fn, *a, **kw):
    """Device time of one call (GPU only): its first kernel's start to its last's end."""
    if interpret:
      return {}
    return call_spans(lambda: fn(*a, **kw), runs=repeats)

  d_plain = device(plain, q, k, v, table, lengths, **scales)
  out_plain = np.asarray(plain(q, k, v, table, lengths, **scales).astype(jnp.float32))
  assert not np.isnan(out_plain).any(), "NaN in the plain output"
  own_read = lengths_np - plan_np.row_starts  # what each row reads in the own part
  common = dict(
    case=case.label,
    batch=case.batch,
    shared_len=case.shared_len,
    own_len=float(np.mean(lengths_np - case.shared_len)),
    own_len_min=int((lengths_np - case.shared_len).min()),
    own_len_max=int((lengths_np - case.shared_len).max()),
    plain_ms=t_plain.median * 1e3,
    **{k_: v_ for k_, v_ in t_plain.fields("plain").items() if k_ != "plain_ms"},
    **(d_plain.fields("plain_device") if d_plain else {}),
    timing=f"chain{chain}" if chain else f"inner{inner}",
    plan_ms=float(np.median(plan_times)) * 1e3,
    plan_first_ms=plan_times[0] * 1e3,
    planned_shared_len=int(plan_np.group_lens.max()),
    planned_own_len_max=int(own_read.max()),
    groups=int((plan_np.group_lens > 0).sum()),
    block_size=block_size,
    dtype=dtype.name,
    kv_dtype=kv_dtype.name,
    num_q_heads=heads[0],
    num_kv_heads=heads[1],
    head_dim=head_dim,
    plain_text=spread_text(t_plain),
  )

  base = default_cascade_block_sizes(head_dim=head_dim, q_dtype=dtype, kv_dtype=kv_dtype)
  # Each bf16 GPU kernel is within the bf16 bound of the exact result (for 8-bit K/V: of
  # dequantise-then-attend), so the two are within twice that of each other.
  kind = "quantized_gpu_vs_float64_rel_l2" if scales else "gpu_kernel_vs_reference_rel_l2"
  bound = 2 * tolerance(kind, dtype).rtol
  from kernels.gpu import cascade as gpu_cascade

  part_kw = dict(scale=1.0 / np.sqrt(head_dim), logit_soft_cap=None, interpret=interpret)

  def time_shared(bs, cplan):
    """The shared part alone: (chained timing, device time or {})."""
    if bs.shared_kernel == "mosaic":  # 16-bit K/V only: no scales
      kw = dict(part_kw, interpret=kernels.gpu._mosaic_interpret_params() if interpret else False)
      part = jax.jit(functools.partial(gpu_cascade.shared_partials_mosaic, **kw, block_sizes=bs))
      return timed(part, q, k, v, cplan), device(part, q, k, v, cplan)
    part = jax.jit(functools.partial(gpu_cascade.shared_partials, **part_kw, block_sizes=bs))
    return timed(part, q, k, v, plan, **scales), device(part, q, k, v, plan, **scales)

  errors = []
  own_fields = {}
  for name, cfg in configs:
    try:
      bs = dataclasses.replace(base, **cfg)
      # "auto" as cascade_attention resolves it (Mosaic on Hopper for bf16), so that the
      # parts time the shared kernel the cascade runs and the row says which it was.
      bs = gpu_cascade.resolve_shared_kernel(
        bs,
        q_dtype=dtype,
        kv_dtype=kv_dtype,
        head_dim=head_dim,
        block_size=block_size,
        interpret=interpret,
      )
      # With the Mosaic shared part's launch arrays built on the host for these settings
      # (kernels.gpu.cascade.schedule_plan; the plan as it was for the Triton part).
      cplan = jax.device_put(
        gpu_cascade.schedule_plan(
          plan_np,
          num_q_heads=heads[0],
          head_dim=head_dim,
          q_dtype=dtype,
          kv_dtype=kv_dtype,
          block_size=block_size,
          block_sizes=bs,
          interpret=interpret,
        )
      )
      part_fields = {}
      if parts:
        t_shared, d_shared = time_shared(bs, cplan)
        if not own_fields:  # the own part does not depend on the shared kernel's settings
          own = jax.jit(functools.partial(gpu_cascade.own_partials, **part_kw, block_sizes=bs))
          t_own = timed(own, q, k, v, table, lengths, plan, **scales)
          d_own = device(own, q, k, v, table, lengths, plan, **scales)
          own_fields = dict(t_own.fields("own"), **(d_own.fields("own_device") if d_own else {}))
        part_fields = dict(own_fields, **t_shared.fields("shared"))
        if d_shared:
          part_fields.update(d_shared.fields("shared_device"))
      casc = jax.jit(
        functools.partial(
          kernels.cascade_attention, backend="gpu", interpret=interpret, block_sizes=bs
        )
      )
      t_casc = timed(casc, q, k, v, table, lengths, cplan, **scales)
      d_casc = device(casc, q, k, v, table, lengths, cplan, **scales)
      out = np.asarray(casc(q, k, v, table, lengths, cplan, **scales).astype(jnp.float32))
      assert not np.isnan(out).any(), "NaN in the cascade output"
      err = rel_l2_error(out, out_plain)
      assert err < bound, f"cascade and plain disagree: relative L2 {err:.2e} >= {bound:.1e}"
    except Exception as e:  # noqa: BLE001 - a failing setting is a result; the others go on
      traceback.print_exc()
      errors.append((name, f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}"))
      continue
    emit(
      dict(
        common,
        host_schedule=cplan.schedule is not None,
        cascade_ms=t_casc.median * 1e3,
        speedup=t_plain.median / t_casc.median,
        **{k_: v_ for k_, v_ in t_casc.fields("cascade").items() if k_ != "cascade_ms"},
        **(d_casc.fields("cascade_device") if d_casc else {}),
        **(dict(speedup_device=d_plain.median / d_casc.median) if d_casc else {}),
        rel_l2=err,
        **part_fields,
        config=name,
        block_sizes=str(bs),
        cascade_text=spread_text(t_casc),
      )
    )
  return errors


def _cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo, or "unknown"."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown"


def plan_only(cases, *, repeats, out, env) -> list[dict]:
  """Host time of ``kernels.plan_cascade`` alone on each case's table (no pools, no
  device): the first call, then ``repeats`` samples of one call each (median, min-max):
  single calls, so that on a shared, loaded host few samples hold a context switch.
  Appends one row per case to ``OUT/cascade_plan.jsonl``."""
  path = os.path.join(out, "cascade_plan.jsonl")
  rows = []
  for case in cases:
    table, lengths, _ = build_table(case, 0, block_size=BLOCK)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    plan = kernels.plan_cascade(table, lengths, BLOCK)
    first = time.perf_counter() - t0
    if plan is None:
      raise RuntimeError(f"plan_cascade found no group in case {case.label}")
    timing = time_calls(
      lambda table=table, lengths=lengths: kernels.plan_cascade(table, lengths, BLOCK),
      repeats=repeats,
      sync=lambda o: o,
    )
    row = dict(
      env,
      case=case.label,
      batch=case.batch,
      table_blocks=table.shape[1],
      block_size=BLOCK,
      **timing.fields("plan"),
      plan_first_ms=first * 1e3,
      groups=int((plan.group_lens > 0).sum()),
      planned_shared_len=int(plan.group_lens.max()),
      load_avg_1min=load,
      cpu_count=os.cpu_count(),
    )
    write_jsonl(path, [row])
    rows.append(dict(row, plan_text=spread_text(timing)))
  print()
  print("| case | table | plan ms (min-max) | first call ms | groups | load avg |")
  print("| --- | --- | ---: | ---: | ---: | ---: |")
  for r in rows:
    print(
      f"| {r['case']} | {r['batch']} x {r['table_blocks']} | {r['plan_text']} | "
      f"{r['plan_first_ms']:.3f} | {r['groups']} | {r['load_avg_1min']:.1f} |"
    )
  print(f"rows -> {path}")
  return rows


def define_flags():
  flags.DEFINE_string("out", os.environ.get("OUT", "/tmp/cascade"), "output folder")
  flags.DEFINE_list("cases", list(CASES), f"cases to run, from {list(CASES)}")
  flags.DEFINE_bool("sweep", False, "also time the shared-kernel settings in SWEEP")
  flags.DEFINE_integer("repeats", 15, "timing samples per measurement", lower_bound=5)
  flags.DEFINE_bool(
    "parts", False, "also time the shared kernel and the own part's decode alone (per config)"
  )
  flags.DEFINE_bool("smoke", False, "one tiny case in interpret mode on CPU (tests this script)")
  flags.DEFINE_bool(
    "plan-only", False, "time the host planner alone on each case's table (any machine)"
  )
  flags.DEFINE_integer(
    "chain",
    20,
    "time N calls inside one jit (device time, no Python dispatch between calls); 0: 10 "
    "calls back to back from Python",
    lower_bound=0,
  )
  flags.DEFINE_enum(
    "kv-dtype", "bfloat16", ["bfloat16", "int8", "float8_e4m3fn"], "K/V pool dtype (q is bf16)"
  )


def main(args):
  os.makedirs(args.out, exist_ok=True)
  env = env_info()
  env = dict(device=env["device"], jax=env["jax_version"], date=env["date"], commit=git_commit())
  print(env, flush=True)
  if args.plan_only:
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
      raise SystemExit(f"unknown --cases {unknown}; choose from {list(CASES)}")
    env["device"] = f"host CPU: {_cpu_model()}, {os.cpu_count()} cores"
    cases = [CASES[c] for c in args.cases]
    plan_only(cases, repeats=20 * args.repeats, out=args.out, env=env)
    return 0
  configs = [("default", {})]
  if args.sweep:
    configs += [(f"sweep{i}", cfg) for i, cfg in enumerate(SWEEP)]
  if args.smoke:
    cases = [SMOKE]
    kw = dict(interpret=True, repeats=5, inner=1, heads=(4, 2), head_dim=64, block_size=16)
    kw["chain"] = min(args.chain, 2)  # the chained path, kept short in interpret mode
    kw["kv_dtype"] = args.kv_dtype
    kw["parts"] = args.parts
    configs = [(n, {**c, "shared_rows": 16, "shared_kv_tile": 16}) for n, c in configs]
  else:
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
      raise SystemExit(f"unknown --cases {unknown}; choose from {list(CASES)}")
    cases = [CASES[c] for c in args.cases]
    kw = dict(
      interpret=False,
      repeats=args.repeats,
      inner=10,
      heads=(HQ, HKV),
      head_dim=D,
      block_size=BLOCK,
      kv_dtype=args.kv_dtype,
      parts=args.parts,
      chain=args.chain,
    )
  path = os.path.join(args.out, "cascade.jsonl")
  rows, failed = [], []
  for case in cases:
    print(f"case {case.label} ...", flush=True)

    def emit(row):
      row = {**env, **row}
      write_jsonl(path, [{k: v for k, v in row.items() if not k.endswith("_text")}])
      rows.append(row)
      parts = ""
      if "shared_ms" in row:
        parts = f" (shared {row['shared_ms']:.3f} ms, own {row['own_ms']:.3f} ms)"
      if "shared_device_ms" in row:
        parts += (
          f" device: shared {row['shared_device_ms']:.3f} ms, own {row['own_device_ms']:.3f} ms"
        )
      dev = ""
      if "speedup_device" in row:
        dev = (
          f", device {row['speedup_device']:.1f}x ({row['plain_device_ms']:.3f} / "
          f"{row['cascade_device_ms']:.3f} ms)"
        )
      print(f"  {row['config']}: {row['speedup']:.1f}x{dev}{parts}", flush=True)

    try:
      errors = run_case(case, configs=configs, emit=emit, **kw)
    except Exception as e:  # noqa: BLE001 - one failing case must not lose the others' rows
      traceback.print_exc()
      errors = [("all", f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}")]
    if errors:
      failed += [f"{case.label} {name}" for name, _ in errors]
      write_jsonl(
        os.path.join(args.out, "cascade_errors.jsonl"),
        [dict(case=case.label, config=name, error=msg, **env) for name, msg in errors],
      )
  print()
  print(
    "| case | K/V | config | plain ms (min-max) | cascade ms (min-max) | speedup "
    "| device: plain ms | cascade ms | speedup | plan ms | rel L2 |"
  )
  print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for r in rows:
    dev = "| | |"
    if "speedup_device" in r:
      dev = (
        f"{r['plain_device_ms']:.3f} ({r['plain_device_min_ms']:.3f}-"
        f"{r['plain_device_max_ms']:.3f}) | {r['cascade_device_ms']:.3f} "
        f"({r['cascade_device_min_ms']:.3f}-{r['cascade_device_max_ms']:.3f}) | "
        f"{r['speedup_device']:.1f}x"
      )
    print(
      f"| {r['case']} | {r['kv_dtype']} | {r['config']} | {r['plain_text']} | "
      f"{r['cascade_text']} | {r['speedup']:.1f}x | {dev} | {r['plan_ms']:.3f} | "
      f"{r['rel_l2']:.1e} |"
    )
  print(f"rows -> {path}" + (f"; FAILED: {failed}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  _flags.run(define_flags, main)
