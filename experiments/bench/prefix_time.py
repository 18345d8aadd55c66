"""The system-prompt scenario of ``configs/prefix_sharing.py`` on the time axis, on a GPU.

One decode step's attention (one layer) for ``--users`` rows on a ``--shared-len``-token
system prompt plus ``--own-len`` own tokens each (the prompt's full blocks shared, as after
prefix-cache hits): plain ``kernels.paged_attention`` against ``kernels.cascade_attention``
on ``--backend`` (auto: the device's Pallas kernels), median of ``--repeats`` samples of
``--inner`` calls each (``experiments/_timing.py``), the plan made on the host outside the
timed call. The same rows as ``prefix_sharing``'s ``decode_time`` table (which needs
ml_collections, which the GPU machine lacks). Prints a table and appends one JSON line per
block size to ``OUT/prefix_time.jsonl``.

  PYTHONPATH=. python -m experiments.bench.prefix_time --out /tmp/prefix_time
  python -m experiments.bench.prefix_time --block-sizes 16,32 --own-len 500 --out /tmp/pt
"""

from __future__ import annotations

import json
import os
import time

from absl import flags

from experiments.bench import _flags


def define_flags():
  flags.DEFINE_integer("users", 100, "rows on the shared prompt (the config's num_users)")
  flags.DEFINE_integer("shared-len", 5000, "tokens of the shared system prompt")
  flags.DEFINE_integer("own-len", 96, "each row's own tokens (user prompt 32 + output 64)")
  flags.DEFINE_list("block-sizes", ["16"], "block sizes")
  flags.DEFINE_integer("num-q-heads", 32, "query heads")
  flags.DEFINE_integer("num-kv-heads", 8, "KV heads")
  flags.DEFINE_integer("head-dim", 128, "head dim")
  flags.DEFINE_string("dtype", "bfloat16", "q and K/V dtype")
  flags.DEFINE_string("backend", "auto", "kernels backend (auto: the device's)")
  flags.DEFINE_integer("repeats", 15, "timed samples (>= 5)")
  flags.DEFINE_integer("inner", 10, "calls per sample (device time when > 1)")
  flags.DEFINE_string("out", None, "folder for prefix_time.jsonl", required=True)


def main(args) -> int:
  from experiments._cascade_timing import time_shared_prefix_decode

  if args.repeats < 5:
    raise SystemExit("--repeats must be >= 5 (experiments._timing.MIN_REPEATS)")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "prefix_time.jsonl")
  header = ("block", "users", "shared", "own", "plain ms (min-max)", "cascade ms (min-max)")
  header += ("speedup", "cascade is")
  print("| " + " | ".join(header) + " |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for bs in (int(b) for b in args.block_sizes):
    row = time_shared_prefix_decode(
      users=args.users,
      shared_len=args.shared_len,
      own_len=args.own_len,
      block_size=bs,
      num_q_heads=args.num_q_heads,
      num_kv_heads=args.num_kv_heads,
      head_dim=args.head_dim,
      dtype=args.dtype,
      backend=args.backend,
      repeats=args.repeats,
      inner=args.inner,
    )
    row["date"] = time.strftime("%Y-%m-%d")
    print(
      f"| {bs} | {row['users']} | {row['shared_len']} | {row['own_len']} | "
      f"{row['plain_ms']:.4f} ({row['plain_range_ms']}) | "
      f"{row['cascade_ms']:.4f} ({row['cascade_range_ms']}) | {row['speedup']:.2f} | "
      f"{row['cascade_vs_plain']} |",
      flush=True,
    )
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")
  return 0


if __name__ == "__main__":
  _flags.run(define_flags, main)
