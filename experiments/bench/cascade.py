"""Cascade (shared-prefix) decode attention against plain paged decode on the GPU (issue 16).

Cases (32 query / 8 KV heads, head_dim 128, bf16, block 16; every row's table starts with
the shared prompt's full blocks, then blocks of its own scattered at random in the pool;
the prompt's tokens past its last full block sit in each row's first own block):

* ``100x5000``: 100 rows x (5,000 shared + U[100, 500] own tokens), case
  ``100x(5000+U[100,500])``;
* ``256x32768``: 256 rows x (32,768 shared + 512 own), case ``256x(32768+512)``.

For each case: ``kernels.plan_cascade`` on the host (its time is ``plan_ms``), then plain
``kernels.paged_attention`` (gpu backend) and ``kernels.cascade_attention`` (gpu) as
device time: each sample is 10 calls of one jitted function back to back, then one block
(``experiments/_timing.py``), median of 15 samples with the min-max spread. The two outputs
must agree (relative L2 within twice the bf16 kernel bound: each is within that bound of
the exact result) and hold no NaN (unused pool slots are NaN). Prints a table and appends
one JSON line per case to ``OUT/cascade.jsonl`` as soon as it is measured (fields
``device``, ``case``, ``batch``, ``shared_len``, ``own_len`` (mean; ``own_len_min``/``max``),
``plain_ms``, ``cascade_ms``, ``speedup``, ``date``, ``commit``, ``jax``, ``block_size``,
``dtype``, spreads, ``plan_ms``, ``rel_l2``, the block sizes used); a case that fails is
printed and written to ``OUT/cascade_errors.jsonl`` and the others still run.

  PYTHONPATH=. python -m experiments.bench.cascade --out /tmp/cascade
  python -m experiments.bench.cascade --cases 256x32768 --sweep --out /tmp/cascade
  python -m experiments.bench.cascade --smoke --out /tmp/cascade_smoke

``--sweep`` also times the shared kernel with the settings in ``SWEEP`` (rows with their
``config``); ``--smoke`` runs a tiny case in interpret mode on CPU (to test this script).
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
from experiments._timing import spread_text, time_calls
from experiments.bench import _flags
from experiments.bench._gpu_common import env_info, write_jsonl
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
  dict(shared_rows=128, shared_kv_tile=128, shared_num_warps=8, shared_num_stages=2),
  dict(shared_rows=64, shared_kv_tile=64, shared_num_warps=4, shared_num_stages=3),
  dict(shared_rows=128, shared_kv_tile=64, shared_num_warps=8, shared_num_stages=2),
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


def build(case: Case, seed: int, *, heads, head_dim, block_size, dtype):
  """Pools, block table, lengths and q of a case; slots no row reads are NaN."""
  num_q_heads, num_kv_heads = heads
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
  kk, kv, kq = jax.random.split(jax.random.key(seed), 3)
  shape = (num_kv_heads, num_blocks, block_size, head_dim)
  mask = jnp.asarray(live)[None, :, :, None]
  k = jnp.where(mask, jax.random.normal(kk, shape, jnp.float32), jnp.nan).astype(dtype)
  v = jnp.where(mask, jax.random.normal(kv, shape, jnp.float32), jnp.nan).astype(dtype)
  q = jax.random.normal(kq, (case.batch, num_q_heads, head_dim), jnp.float32).astype(dtype)
  return q, k, v, table, lengths


def run_case(case: Case, *, interpret, configs, repeats, inner, heads, head_dim, block_size):
  """Times plain and cascade decode of one case; returns one row per cascade config."""
  from kernels.gpu.cascade import CascadeBlockSizes, default_cascade_block_sizes

  dtype = jnp.bfloat16
  q, k, v, table_np, lengths_np = build(
    case, 0, heads=heads, head_dim=head_dim, block_size=block_size, dtype=dtype
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
  t_plain = time_calls(
    lambda: plain(q, k, v, table, lengths), repeats=repeats, inner=inner, warmup=2
  )
  out_plain = np.asarray(plain(q, k, v, table, lengths).astype(jnp.float32))
  assert not np.isnan(out_plain).any(), "NaN in the plain output"

  base = default_cascade_block_sizes(head_dim=head_dim, q_dtype=dtype, kv_dtype=dtype)
  rows = []
  for name, cfg in configs:
    bs = dataclasses.replace(base, **cfg) if cfg else base
    assert isinstance(bs, CascadeBlockSizes)
    casc = jax.jit(
      functools.partial(
        kernels.cascade_attention, backend="gpu", interpret=interpret, block_sizes=bs
      )
    )
    t_casc = time_calls(
      lambda casc=casc: casc(q, k, v, table, lengths, plan),
      repeats=repeats,
      inner=inner,
      warmup=2,
    )
    out = np.asarray(casc(q, k, v, table, lengths, plan).astype(jnp.float32))
    assert not np.isnan(out).any(), "NaN in the cascade output"
    err = rel_l2_error(out, out_plain)
    # Each bf16 GPU kernel is within the bf16 bound of the exact result, so the two are
    # within twice that of each other (triangle inequality).
    bound = 2 * tolerance("gpu_kernel_vs_reference_rel_l2", dtype).rtol
    assert err < bound, f"cascade and plain disagree: relative L2 {err:.2e} >= {bound:.1e}"
    own = lengths_np - plan_np.row_starts  # what each row reads in the own part
    rows.append(
      dict(
        case=case.label,
        batch=case.batch,
        shared_len=case.shared_len,
        own_len=float(np.mean(lengths_np - case.shared_len)),
        own_len_min=int((lengths_np - case.shared_len).min()),
        own_len_max=int((lengths_np - case.shared_len).max()),
        plain_ms=t_plain.median * 1e3,
        cascade_ms=t_casc.median * 1e3,
        speedup=t_plain.median / t_casc.median,
        **{k_: v_ for k_, v_ in t_plain.fields("plain").items() if k_ != "plain_ms"},
        **{k_: v_ for k_, v_ in t_casc.fields("cascade").items() if k_ != "cascade_ms"},
        plan_ms=float(np.median(plan_times)) * 1e3,
        plan_first_ms=plan_times[0] * 1e3,
        planned_shared_len=int(plan_np.group_lens.max()),
        planned_own_len_max=int(own.max()),
        groups=int((plan_np.group_lens > 0).sum()),
        rel_l2=err,
        config=name,
        block_sizes=str(bs),
        block_size=block_size,
        dtype=jnp.dtype(dtype).name,
        num_q_heads=heads[0],
        num_kv_heads=heads[1],
        head_dim=head_dim,
        plain_text=spread_text(t_plain),
        cascade_text=spread_text(t_casc),
      )
    )
  return rows


def define_flags():
  flags.DEFINE_string("out", os.environ.get("OUT", "/tmp/cascade"), "output folder")
  flags.DEFINE_list("cases", list(CASES), f"cases to run, from {list(CASES)}")
  flags.DEFINE_bool("sweep", False, "also time the shared-kernel settings in SWEEP")
  flags.DEFINE_integer("repeats", 15, "timing samples per measurement", lower_bound=5)
  flags.DEFINE_bool("smoke", False, "one tiny case in interpret mode on CPU (tests this script)")


def main(args):
  os.makedirs(args.out, exist_ok=True)
  env = env_info()
  env = dict(device=env["device"], jax=env["jax_version"], date=env["date"], commit=git_commit())
  print(env, flush=True)
  configs = [("default", {})]
  if args.sweep:
    configs += [(f"sweep{i}", cfg) for i, cfg in enumerate(SWEEP)]
  if args.smoke:
    cases = [SMOKE]
    kw = dict(interpret=True, repeats=5, inner=1, heads=(4, 2), head_dim=64, block_size=16)
    configs = [(n, {**c, "shared_rows": 16, "shared_kv_tile": 16}) for n, c in configs]
  else:
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
      raise SystemExit(f"unknown --cases {unknown}; choose from {list(CASES)}")
    cases = [CASES[c] for c in args.cases]
    kw = dict(
      interpret=False, repeats=args.repeats, inner=10, heads=(HQ, HKV), head_dim=D, block_size=BLOCK
    )
  path = os.path.join(args.out, "cascade.jsonl")
  rows, failed = [], []
  for case in cases:
    print(f"case {case.label} ...", flush=True)
    try:
      got = run_case(case, configs=configs, **kw)
    except Exception as e:  # noqa: BLE001 - one failing case must not lose the others' rows
      traceback.print_exc()
      msg = f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}"
      failed.append(case.label)
      write_jsonl(
        os.path.join(args.out, "cascade_errors.jsonl"), [dict(case=case.label, error=msg, **env)]
      )
      continue
    got = [{**env, **r} for r in got]
    write_jsonl(path, [{k: v for k, v in r.items() if not k.endswith("_text")} for r in got])
    rows += got
  print()
  print(
    "| case | config | plain ms (min-max) | cascade ms (min-max) | speedup | plan ms | rel L2 |"
  )
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
  for r in rows:
    print(
      f"| {r['case']} | {r['config']} | {r['plain_text']} | {r['cascade_text']} | "
      f"{r['speedup']:.1f}x | {r['plan_ms']:.3f} | {r['rel_l2']:.1e} |"
    )
  print(f"rows -> {path}" + (f"; FAILED: {failed}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  _flags.run(define_flags, main)
