"""Where one decode kernel's time goes, from Nsight Compute: occupancy, stalls, instructions.

Runs one paged decode call (blocks scattered at random, ``gpu_decode``'s inputs) under
``ncu --set full`` in a child process of its own, profiles one launch of our kernel after
the warm-up calls, and summarises what the report says:

* the launch (``ncu --page details``): duration, DRAM throughput, issue slots busy,
  instructions executed, registers and shared memory per program, the programs an SM holds
  (and which limit binds), waves, occupancy;
* the warps' stall samples by reason, summed over the kernel's SASS instructions, and the
  instruction mix (warp instructions executed, by opcode) with each opcode's share of the
  stall samples (``ncu --page source --csv --print-source sass``).

This is how docs/benchmarks.md ("Run28") found the 8-bit decode issue-bound (V's bytes
gathered into ``p @ V`` fragments one by one) and the 8 x 4096 planned decode waiting on
memory; run28 itself ran the same steps as scratch scripts (``docs/results/gpu_raw/run28/``).

  python -m experiments.bench.ncu_profile --kv int8 --shape 64x8192 --out DIR
  python -m experiments.bench.ncu_profile --kernel planned --shape 8x4096 --out DIR
  python -m experiments.bench.ncu_profile --summarize-csv SOURCE.csv --out DIR

Writes ``DIR/ncu_profile.jsonl`` (one row per profile) and, beside it, the details page
and the source CSV the row was made from. Needs a GPU and ``ncu`` on the PATH (``--ncu``);
``--summarize-csv`` only reads a source page exported before. ncu replays the one launch
many times to read its counters (``--clock-control none``: it does not lock the card's
clocks); its duration is one replay's, not a benchmark's timing. Only the decode kernels
count as launches (``KERNEL_FILTER``: not the planned decode's merge, not XLA's kernels), so
two warm-up calls are skipped and the third call's kernel is the one profiled.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import re
import signal
import subprocess
import sys

from absl import flags

from experiments.bench import _flags

KV_DTYPES = {"bf16": "bfloat16", "int8": "int8", "e4m3": "float8_e4m3fn"}
KERNELS = ("split_k", "planned")
# ncu's kernel filter: the split-K and planned decode kernels (one launch a call).
KERNEL_FILTER = "regex:paxcache_(paged|planned)_decode_bs"
# Metrics read from the details page: (label in the row, the page's metric name).
DETAIL_METRICS = (
  ("duration", "Duration"),
  ("dram_throughput_pct", "DRAM Throughput"),
  ("issue_slots_busy_pct", "Issue Slots Busy"),
  ("executed_instructions", "Executed Instructions"),
  ("registers_per_thread", "Registers Per Thread"),
  ("dynamic_shared_kib", "Dynamic Shared Memory Per Block"),  # ncu's Kbyte is 1000 bytes
  ("grid_size", "Grid Size"),
  ("threads_per_program", "Block Size"),
  ("waves_per_sm", "Waves Per SM"),
  ("block_limit_registers", "Block Limit Registers"),
  ("block_limit_shared_mem", "Block Limit Shared Mem"),
  ("block_limit_warps", "Block Limit Warps"),
  ("theoretical_occupancy_pct", "Theoretical Occupancy"),
  ("achieved_occupancy_pct", "Achieved Occupancy"),
)
_NUMBER = re.compile(r"^-?[\d,]*\.?\d+$")
# A profile row's own fields, beside the DETAIL_METRICS labels ("duration" as "duration_us")
# and summarize_source's "samples", "stalls" and "ops": no name may be in two of them.
ROW_FIELDS = ("case", "kernel_name", "kernel", "kv", "shape", "heads", "head_dim", "block_size")


def parse_details(text: str) -> dict:
  """The ``DETAIL_METRICS`` of an ``ncu --page details`` page: each metric's line is its
  name, an optional unit and a number; the first such line of a name counts (a page of
  several launches gives the first launch's). The duration comes back in microseconds
  (``duration_us``), the dynamic shared memory in KiB (ncu prints Kbyte, 1000 bytes); the
  other values as printed, thousands commas dropped. A unit it cannot convert raises
  ValueError."""
  out = {}
  for line in text.splitlines():
    parts = line.split()
    if not parts or not _NUMBER.match(parts[-1]):
      continue
    for label, name in DETAIL_METRICS:
      words = name.split()
      n = len(words)
      key = "duration_us" if label == "duration" else label
      if key in out or parts[:n] != words or len(parts) not in (n + 1, n + 2):
        continue
      if len(parts) == n + 2 and _NUMBER.match(parts[n]):
        continue  # two numbers: not a metric line of this form
      value = float(parts[-1].replace(",", ""))
      unit = parts[n] if len(parts) == n + 2 else ""
      if label == "dynamic_shared_kib":
        scale = {"byte/block": 1.0, "Kbyte/block": 1e3, "Mbyte/block": 1e6}.get(unit)
        if scale is None:
          raise ValueError(f"ncu details: unknown shared-memory unit {unit!r} in {line.strip()!r}")
        value *= scale / 1024  # ncu's Kbyte is 1000 bytes; the row is in KiB
      if label == "duration":
        scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}.get(unit)
        if scale is None:
          raise ValueError(f"ncu details: unknown duration unit {unit!r} in {line.strip()!r}")
        value *= scale
      out[key] = value
      break
  return out


def summarize_source(path: str, *, top: int = 25) -> dict:
  """Stall reasons and instruction mix of an ``ncu --page source --csv --print-source sass``
  export (one kernel): ``samples`` (all warp stall samples), ``stalls`` {reason: share of
  the samples}, ``ops`` [(opcode, share of warp instructions executed, share of the stall
  samples)], largest ``top`` first. Opcodes drop their modifiers and predicate (``@P0
  LDG.E.128`` is ``LDG``)."""
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  header_at = next(
    (i for i, r in enumerate(rows) if "Source" in r and "Instructions Executed" in r), None
  )
  if header_at is None:
    raise ValueError(f"{path}: no header with 'Source' and 'Instructions Executed' columns")
  header = rows[header_at]
  col = {h: i for i, h in enumerate(header)}
  sample_col = "Warp Stall Sampling (All Samples)"
  if sample_col not in col:
    raise ValueError(f"{path}: no {sample_col!r} column")
  reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
  stalls = collections.Counter()
  executed, sampled = collections.Counter(), collections.Counter()
  samples = 0
  for r in rows[header_at + 1 :]:
    if len(r) < len(header):
      continue
    words = r[col["Source"]].split()
    if not words:
      continue
    op = (words[1] if words[0].startswith("@") and len(words) > 1 else words[0]).split(".")[0]
    s = int(float(r[col[sample_col]] or 0))
    samples += s
    executed[op] += int(float(r[col["Instructions Executed"]] or 0))
    sampled[op] += s
    for reason in reasons:
      stalls[reason.removeprefix("stall_")] += int(float(r[col[reason]] or 0))
  total = sum(executed.values())
  return dict(
    samples=samples,
    stalls={k: v / samples for k, v in stalls.most_common() if v} if samples else {},
    ops=[
      (op, n / total, sampled[op] / samples if samples else 0.0)
      for op, n in executed.most_common(top)
    ]
    if total
    else [],
  )


def _child(args) -> None:
  """The profiled process: three calls of the decode kernel (ncu skips two)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import kernels
  from experiments.bench._gpu_common import make_paged
  from kernels import gpu
  from kernels.gpu import plan as plan_mod

  batch, context = (int(x) for x in args.shape.split("x"))
  hq, hkv = (int(x) for x in args.heads.split("/"))
  kb, vb, table, lengths, _, _ = make_paged(
    np.random.default_rng(3),
    batch=batch,
    context=context,
    block_size=args.block_size,
    num_kv_heads=hkv,
    head_dim=args.head_dim,
    dtype=jnp.bfloat16,
    poison=False,
  )
  q = jax.random.normal(jax.random.key(5), (batch, hq, args.head_dim), jnp.bfloat16)
  kw = {}
  if args.kv != "bf16":
    dtype = jnp.dtype(KV_DTYPES[args.kv])
    kb, kw["k_scales"] = kernels.quantize(kb, dtype)
    vb, kw["v_scales"] = kernels.quantize(vb, dtype)
  if args.kernel == "planned":
    kw["decode_plan"] = plan_mod.plan_decode(np.asarray(lengths), args.block_size, hkv)
  fn = jax.jit(lambda q, k, v, t, n: gpu.paged_attention(q, k, v, t, n, **kw))
  for _ in range(3):
    jax.block_until_ready(fn(q, kb, vb, table, lengths))


def _ncu(cmd: list[str], timeout_s: float) -> tuple[str, str]:
  """Runs ``cmd`` (ncu, with the profiled process under it) in a process group of its own;
  returns its ``(stdout, stderr)``. On a time-out the whole group is killed (the profiled
  process too); a missing command, a time-out or a non-zero exit raise RuntimeError with
  ncu's output."""
  try:
    proc = subprocess.Popen(
      cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
  except FileNotFoundError as e:
    raise RuntimeError(f"{cmd[0]!r} not found: pass --ncu with Nsight Compute's ncu") from e
  try:
    out, err = proc.communicate(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    tail = (out + err)[-2000:]
    raise RuntimeError(f"{' '.join(cmd[:3])} ... ran past {timeout_s} s: {tail}") from None
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}: {(out + err)[-2000:]}")
  return out, err


def _profile(args) -> dict:
  name = f"{args.kernel}_{args.kv}_{args.shape}_b{args.block_size}"
  report = os.path.join(args.out, f"ncu_{name}")
  child = [
    sys.executable, "-m", "experiments.bench.ncu_profile", "--child", "--out", args.out,
    "--kernel", args.kernel, "--kv", args.kv, "--shape", args.shape, "--heads", args.heads,
    "--head-dim", str(args.head_dim), "--block-size", str(args.block_size),
  ]  # fmt: skip
  ncu = [
    args.ncu, "--clock-control", "none", "--target-processes", "all",
    "-k", KERNEL_FILTER, "--launch-skip", "2", "--launch-count", "1",
    "--set", "full", "-f", "-o", report,
  ]  # fmt: skip
  if os.path.exists(report + ".ncu-rep"):
    os.remove(report + ".ncu-rep")  # a report of an earlier run must not pass for this one
  out = "".join(_ncu(ncu + child, args.timeout_s))
  if "No kernels were profiled" in out or not os.path.exists(report + ".ncu-rep"):
    raise RuntimeError(f"ncu profiled no kernel matching {KERNEL_FILTER}: {out[-2000:]}")
  details, _ = _ncu([args.ncu, "-i", report + ".ncu-rep", "--page", "details"], args.timeout_s)
  with open(report + "_details.txt", "w") as f:
    f.write(details)
  source, _ = _ncu(
    [args.ncu, "-i", report + ".ncu-rep", "--page", "source", "--csv", "--print-source", "sass"],
    args.timeout_s,
  )
  with open(report + "_sass.csv", "w") as f:
    f.write(source)
  kernel_name = re.search(r"(paxcache\w*)", details)
  values = (name, kernel_name and kernel_name.group(1), args.kernel, args.kv, args.shape)
  values += (args.heads, args.head_dim, args.block_size)
  return {
    **dict(zip(ROW_FIELDS, values, strict=True)),
    **parse_details(details),
    **summarize_source(report + "_sass.csv"),
  }


def _print(row: dict) -> None:
  keys = [label for label, _ in DETAIL_METRICS if label in row] + (
    ["duration_us"] if "duration_us" in row else []
  )
  print(f"# {row.get('case', row.get('source'))}")
  for k in keys:
    print(f"  {k}: {row[k]:g}")
  print(f"  stall samples: {row['samples']}")
  for reason, share in list(row["stalls"].items())[:10]:
    print(f"  stall {reason:20s} {share * 100:5.1f}%")
  print("  opcode     executed  stall samples")
  for op, ex, st in row["ops"]:
    print(f"  {op:10s} {ex * 100:7.1f}%  {st * 100:7.1f}%")


def define_flags():
  flags.DEFINE_string("out", None, "output folder", required=True)
  flags.DEFINE_enum("kernel", "split_k", list(KERNELS), "split-K decode or the planned decode")
  flags.DEFINE_enum("kv", "bf16", list(KV_DTYPES), "K/V dtype (8-bit: scales per token)")
  flags.DEFINE_string("shape", "64x8192", "batch x context (every row full)")
  flags.DEFINE_string("heads", "32/8", "query / KV heads")
  flags.DEFINE_integer("head-dim", 128, "head_dim")
  flags.DEFINE_integer("block-size", 16, "tokens per block")
  flags.DEFINE_string("ncu", "ncu", "the Nsight Compute command")
  flags.DEFINE_integer("timeout-s", 300, "limit for the profiled process")
  flags.DEFINE_string("summarize-csv", None, "only summarise this exported source page")
  flags.DEFINE_bool("child", False, "internal: the profiled process")


def main(args) -> int:
  os.makedirs(args.out, exist_ok=True)
  if args.child:
    _child(args)
    return 0
  if args.summarize_csv:
    row = dict(source=args.summarize_csv, **summarize_source(args.summarize_csv))
  else:
    row = _profile(args)
  _print(row)
  with open(os.path.join(args.out, "ncu_profile.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")
  return 0


if __name__ == "__main__":
  _flags.run(define_flags, main)
