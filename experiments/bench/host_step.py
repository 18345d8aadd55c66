"""Host cost of one decode step: allocator appends, BlockTable build and slot mapping.

For each batch size, ``batch`` sequences of about 4,096 tokens (lengths staggered so that a
different 1/block_size of them crosses a block boundary each step, as in a steady decode) run
many decode steps; each step appends one token to every sequence with
``BlockAllocator.append_batch``, builds the ``BlockTable`` and pads the slot mapping. Prefix
caching is on, so blocks that fill are hashed. Prints the median, 10th and 90th percentile per
step in milliseconds, and for comparison the appends alone done as one ``append_tokens`` call
per sequence.

  python benchmarks/host_step.py                # 256 and 1024 sequences, block size 16
  python benchmarks/host_step.py --batch 64 256 --steps 100 --block-size 32
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from paxcache.allocator import BlockAllocator
from paxcache.block_table import BlockTable, build_slot_mapping


def decode_step(allocator, seq_ids, tokens):
  res = allocator.append_batch(seq_ids, tokens)
  table = BlockTable.from_allocator(allocator, seq_ids)
  slot_mapping = build_slot_mapping(res.slots, table.batch_size)
  return table, slot_mapping, res.cow_pairs


def run(batch: int, seq_len: int, block_size: int, steps: int, warmup: int, seed: int):
  rng = np.random.default_rng(seed)
  loop_steps = max(steps // 10, 5)
  blocks_per_seq = -(-(seq_len + steps + warmup + loop_steps + block_size) // block_size)
  allocator = BlockAllocator(batch * blocks_per_seq, block_size)
  seq_ids = list(range(batch))
  for s in seq_ids:
    # Unique prompts (no prefix hits) with lengths seq_len - block_size + 1 .. seq_len.
    length = seq_len - (s % block_size)
    allocator.add_sequence(s, rng.integers(0, 32_000, length))
  times = []
  for step in range(warmup + steps):
    tokens = rng.integers(0, 32_000, batch)
    t0 = time.perf_counter()
    decode_step(allocator, seq_ids, tokens)
    t1 = time.perf_counter()
    if step >= warmup:
      times.append(t1 - t0)
  # For comparison: the same appends as one append_tokens call per sequence.
  loop_times = []
  for _ in range(loop_steps):
    tokens = rng.integers(0, 32_000, (batch, 1))
    t0 = time.perf_counter()
    for s in seq_ids:
      allocator.append_tokens(s, tokens[s])
    loop_times.append(time.perf_counter() - t0)
  allocator.check_invariants()
  ms = np.array(times) * 1e3
  return np.median(ms), np.percentile(ms, 10), np.percentile(ms, 90), np.median(loop_times) * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
  parser.add_argument("--seq-len", type=int, default=4096)
  parser.add_argument("--block-size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--warmup", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  print(
    f"# host decode step, block_size={args.block_size}, ~{args.seq_len} tokens/sequence, "
    f"{args.steps} steps, numpy {np.__version__}, {platform.processor() or platform.machine()}"
  )
  print("| sequences | median ms | p10 ms | p90 ms | appends as a per-sequence loop, median ms |")
  print("| ---: | ---: | ---: | ---: | ---: |")
  for batch in args.batch:
    med, p10, p90, loop = run(
      batch, args.seq_len, args.block_size, args.steps, args.warmup, args.seed
    )
    print(f"| {batch} | {med:.3f} | {p10:.3f} | {p90:.3f} | {loop:.3f} |", flush=True)


if __name__ == "__main__":
  main()
