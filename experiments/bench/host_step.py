"""Host cost of one decode step: allocator appends, BlockTable build and slot mapping.

For each batch size, ``batch`` sequences of about 4,096 tokens (lengths staggered so that a
different 1/block_size of them crosses a block boundary each step, as in a steady decode) run
many decode steps; each step appends one token to every sequence with
``BlockAllocator.append_batch``, builds the ``BlockTable`` and pads the slot mapping. Prefix
caching is on, so blocks that fill are hashed. Prints the median, 10th and 90th percentile per
step in milliseconds with the min-max spread and the 95% interval of the median, and for
comparison the appends alone done as one ``append_tokens`` call per sequence (median and
spread of ``max(steps // 10, 5)`` steps); the last column says whether the batched step is
faster than that loop by those intervals (:func:`experiments._timing.compare`). All times
come from :func:`experiments._timing.time_calls`, one step per sample.

  python -m experiments.bench.host_step               # 256 and 1024 sequences, block size 16
  python -m experiments.bench.host_step --batch 64,256 --steps 100 --block-size 32
"""

from __future__ import annotations

import platform

import numpy as np
from absl import flags

from experiments._timing import Timing, compare, spread_text, time_calls
from experiments.bench import _flags
from paxcache.allocator import BlockAllocator
from paxcache.block_table import BlockTable, build_slot_mapping


def decode_step(allocator, seq_ids, tokens):
  res = allocator.append_batch(seq_ids, tokens)
  table = BlockTable.from_allocator(allocator, seq_ids)
  slot_mapping = build_slot_mapping(res.slots, table.batch_size)
  return table, slot_mapping, res.cow_pairs


def _no_sync(out):
  return out  # host work: nothing to wait for


def run(
  batch: int, seq_len: int, block_size: int, steps: int, warmup: int, seed: int
) -> tuple[Timing, Timing]:
  """Timings of one decode step (``steps`` samples) and of the per-sequence append loop."""
  rng = np.random.default_rng(seed)
  loop_steps = max(steps // 10, 5)
  blocks_per_seq = -(-(seq_len + steps + warmup + loop_steps + block_size) // block_size)
  allocator = BlockAllocator(batch * blocks_per_seq, block_size)
  seq_ids = list(range(batch))
  for s in seq_ids:
    # Unique prompts (no prefix hits) with lengths seq_len - block_size + 1 .. seq_len.
    length = seq_len - (s % block_size)
    allocator.add_sequence(s, rng.integers(0, 32_000, length))
  # Each step's tokens are drawn before the timed call; every sample is one step.
  step_tokens = iter(rng.integers(0, 32_000, (warmup + steps, batch)))
  step = time_calls(
    lambda: decode_step(allocator, seq_ids, next(step_tokens)),
    repeats=steps,
    warmup=warmup,
    sync=_no_sync,
  )

  # For comparison: the same appends as one append_tokens call per sequence.
  loop_tokens = iter(rng.integers(0, 32_000, (loop_steps, batch, 1)))

  def loop():
    tokens = next(loop_tokens)
    for s in seq_ids:
      allocator.append_tokens(s, tokens[s])

  loop_timing = time_calls(loop, repeats=loop_steps, warmup=0, sync=_no_sync)
  allocator.check_invariants()
  return step, loop_timing


def define_flags():
  flags.DEFINE_list("batch", ["256", "1024"], "sequences per step, comma separated")
  flags.DEFINE_integer("seq-len", 4096, "tokens per sequence")
  flags.DEFINE_integer("block-size", 16, "tokens per block")
  flags.DEFINE_integer("steps", 300, "timed decode steps", lower_bound=1)
  flags.DEFINE_integer("warmup", 20, "untimed decode steps first")
  flags.DEFINE_integer("seed", 0, "prompt and token seed")


def main(args):
  print(
    f"# host decode step, block_size={args.block_size}, ~{args.seq_len} tokens/sequence, "
    f"{args.steps} steps, numpy {np.__version__}, {platform.processor() or platform.machine()}"
  )
  print(
    "| sequences | median ms | p10 ms | p90 ms | min-max ms | 95% interval ms "
    "| appends as a per-sequence loop, median (min-max) ms | loop's 95% interval ms "
    "| batched step vs loop |"
  )
  print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
  for batch in (int(b) for b in args.batch):
    step, loop = run(batch, args.seq_len, args.block_size, args.steps, args.warmup, args.seed)
    p10, p90 = np.percentile(step.samples, [10, 90]) * 1e3
    (s_lo, s_hi), (l_lo, l_hi) = step.interval, loop.interval
    print(
      f"| {batch} | {step.median * 1e3:.3f} | {p10:.3f} | {p90:.3f} "
      f"| {step.min * 1e3:.3f}-{step.max * 1e3:.3f} | {s_lo * 1e3:.3f}-{s_hi * 1e3:.3f} "
      f"| {spread_text(loop)} | {l_lo * 1e3:.3f}-{l_hi * 1e3:.3f} | {compare(step, loop)} |",
      flush=True,
    )


if __name__ == "__main__":
  _flags.run(define_flags, main)
