"""Host cost of the planned decode in the engine's step: ``plan_decode`` and the StepBatch build.

Issue 15 asks the plan to cost at most 0.1 ms of host time at 256 sequences. For each case
of 256 decode rows (ShareGPT-like lengths, the draw of ``gpu_ragged``; 256 x 2048; one
32,768 among 255 x 128), this times on the host:

* ``plan_decode`` alone (the planner's defaults: kv_tile 128, the SM count of this
  machine's first GPU, 132 off a GPU);
* ``build_step_batch`` of the decode-only step without a planner (``decode_plan="off"``),
  with the ``"auto"`` planner (which declines a level batch after its ragged test), and with
  ``"on"`` (a plan every step): the last minus the first is what the plan adds to a step
  (the difference of the medians, and of the minima, which a loaded host disturbs less);
* ``StepBatch.pack`` of the step without and with the plan (the one buffer that crosses
  to the device; the plan adds five arrays to it).

Each figure is the median of ``--repeats`` samples of one call
(:func:`experiments._timing.time_calls`, host work: nothing to sync; taken in ``ROUNDS``
interleaved rounds over the figures) with its min-max and the 95% interval of the median.
Prints a table and appends one JSON line per case to ``OUT/plan_host.jsonl``. Nothing here
needs a GPU.

  python -m experiments.bench.plan_host --out /tmp/plan_host
  python -m experiments.bench.plan_host --cases sharegpt256 --repeats 50 --out /tmp/plan_host
"""

from __future__ import annotations

import functools
import os
import platform

import numpy as np
from absl import flags

from experiments._timing import Timing, time_calls
from experiments.bench import _flags

CASES = ("sharegpt256", "full256x2048", "long1_short255")
BLOCK_SIZE = 16
ROUNDS = 10


def case_lengths(name: str) -> np.ndarray:
  """``i32[256]``: the rows' lengths (this step's token included)."""
  if name == "sharegpt256":
    from experiments import workloads

    # The draw of experiments.bench.gpu_ragged's sharegpt256_b16 case.
    pairs = workloads.sample_synthetic(workloads.SHAREGPT, 256, max_seq_len=8192, seed=0)
    return pairs.sum(axis=1).astype(np.int32)
  if name == "full256x2048":
    return np.full(256, 2048, np.int32)
  if name == "long1_short255":
    return np.array([32768] + [128] * 255, np.int32)
  raise ValueError(f"unknown case {name!r}; cases: {', '.join(CASES)}")


def decode_step(lengths: np.ndarray, seed: int = 0):
  """``(plan, table, sampling)``: a decode-only scheduler plan of one row per length, its
  padded block table (blocks at random ids) and the rows' sampling parameters."""
  from paxcache.block_table import BlockTable, bucket_size
  from paxcache.engine._request import Seq
  from paxcache.engine._scheduler import Plan, ScheduledSeq

  rng = np.random.default_rng(seed)
  need = -(-lengths // BLOCK_SIZE)
  batch_pad = bucket_size(len(lengths), minimum=8)
  max_blocks = bucket_size(int(need.max()), minimum=8)
  ids = rng.permutation(int(need.sum()))
  block_ids = np.full((batch_pad, max_blocks), -1, np.int32)
  table_lengths = np.zeros(batch_pad, np.int32)
  rows, used = [], 0
  for i, n in enumerate(lengths.tolist()):
    block_ids[i, : need[i]] = ids[used : used + need[i]]
    used += need[i]
    table_lengths[i] = n
    seq = Seq(seq_id=(i, 0), index=0, tokens=[1] * n, prompt_len=n - 1)
    slot = int(block_ids[i, (n - 1) // BLOCK_SIZE]) * BLOCK_SIZE + (n - 1) % BLOCK_SIZE
    rows.append(ScheduledSeq(seq, n - 1, n, np.array([slot], np.int32), [seq]))
  sampling = {i: (0.0, 0, i) for i in range(len(lengths))}
  return Plan(rows=rows), BlockTable(block_ids, table_lengths), sampling


def _host(out):
  return out  # host work: nothing to wait for


def run_case(name: str, num_kv_heads: int, repeats: int, warmup: int) -> dict:
  from kernels.gpu.plan import num_sms, plan_decode
  from paxcache.engine._batch import build_step_batch
  from paxcache.engine._decode_plan import DecodePlanner

  lengths = case_lengths(name)
  plan, table, sampling = decode_step(lengths)
  kw = dict(min_tokens=8, min_copies=8)
  planners = {
    "off": None,
    "auto": DecodePlanner("auto", BLOCK_SIZE, num_kv_heads),
    "on": DecodePlanner("on", BLOCK_SIZE, num_kv_heads),
  }
  batch = build_step_batch(plan, table, sampling, **kw, decode_planner=planners["on"])
  calls = {"plan": lambda: plan_decode(table.lengths, BLOCK_SIZE, num_kv_heads)}
  for mode, planner in planners.items():
    calls[f"build_{mode}"] = functools.partial(
      build_step_batch, plan, table, sampling, **kw, decode_planner=planner
    )
  calls["pack_off"] = build_step_batch(plan, table, sampling, **kw).pack
  calls["pack_on"] = batch.pack
  # In ROUNDS interleaved rounds, so that a change of load on a shared host (this one has
  # other users) shifts every figure alike and "on - off" stays a difference of the same
  # conditions; each figure is then the Timing of all its rounds' samples.
  samples: dict[str, list[float]] = {key: [] for key in calls}
  per_round = max(repeats // ROUNDS, 1)
  for _ in range(ROUNDS):
    for key, call in calls.items():
      t = time_calls(call, repeats=per_round, warmup=warmup, sync=_host)
      samples[key].extend(t.samples)
  timings = {key: Timing.of(s) for key, s in samples.items()}
  auto = build_step_batch(plan, table, sampling, **kw, decode_planner=planners["auto"])
  row = dict(
    case=name,
    batch=int(len(lengths)),
    block_size=BLOCK_SIZE,
    num_kv_heads=num_kv_heads,
    mean_len=float(lengths.mean()),
    max_len=int(lengths.max()),
    num_sms=num_sms(),
    num_chunks=batch.decode_plan_chunks(),
    padded_chunks=int(batch.decode_plan_chunk_seq.shape[0]),
    auto_plans=auto.decode_plan() is not None,
    repeats=repeats,
  )
  for key, t in timings.items():
    lo, hi = t.interval
    row.update(
      {
        f"{key}_us": t.median * 1e6,
        f"{key}_us_min": t.min * 1e6,
        f"{key}_us_max": t.max * 1e6,
        f"{key}_us_lo": lo * 1e6,
        f"{key}_us_hi": hi * 1e6,
      }
    )
  return row


def _cell(row: dict, key: str) -> str:
  """``"median (min-max)"`` of a timing of ``row``, in microseconds."""
  return f"{row[f'{key}_us']:.1f} ({row[f'{key}_us_min']:.1f}-{row[f'{key}_us_max']:.1f})"


def define_flags():
  flags.DEFINE_list("cases", list(CASES), f"comma separated, of {', '.join(CASES)}")
  flags.DEFINE_integer("num-kv-heads", 8, "KV heads of the cache the plan is for")
  flags.DEFINE_integer("repeats", 200, "timed calls per figure", lower_bound=5)
  flags.DEFINE_integer("warmup", 5, "untimed calls before each round", lower_bound=0)
  flags.DEFINE_string("out", None, "directory for plan_host.jsonl", required=True)


def main(args):
  from experiments.bench._gpu_common import env_info, write_jsonl

  for name in args.cases:
    if name not in CASES:
      raise ValueError(f"unknown case {name!r}; cases: {', '.join(CASES)}")
  os.makedirs(args.out, exist_ok=True)
  env = dict(env_info(), cpu=platform.processor() or platform.machine(), numpy=np.__version__)
  print(
    f"# host cost of the decode plan, block_size={BLOCK_SIZE}, num_kv_heads="
    f"{args.num_kv_heads}, {args.repeats} samples each, {env['cpu']}, numpy {env['numpy']}"
  )
  print(
    "| case | mean / max len | chunks (padded) | plan_decode us | step build off us "
    "| auto us (plans?) | on us | on - off us: medians (minima) | pack off us | pack on us |"
  )
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  path = os.path.join(args.out, "plan_host.jsonl")
  for name in args.cases:
    row = run_case(name, args.num_kv_heads, args.repeats, args.warmup)
    write_jsonl(path, [dict(env, **row)])
    cell = functools.partial(_cell, row)
    print(
      f"| {name} | {row['mean_len']:.0f} / {row['max_len']} | {row['num_chunks']} "
      f"({row['padded_chunks']}) | {cell('plan')} | {cell('build_off')} "
      f"| {cell('build_auto')} ({'yes' if row['auto_plans'] else 'no'}) | {cell('build_on')} "
      f"| {row['build_on_us'] - row['build_off_us']:.1f} "
      f"({row['build_on_us_min'] - row['build_off_us_min']:.1f}) "
      f"| {cell('pack_off')} | {cell('pack_on')} |",
      flush=True,
    )


if __name__ == "__main__":
  _flags.run(define_flags, main)
