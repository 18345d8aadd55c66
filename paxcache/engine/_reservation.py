"""Orca-style reservation policies: each admitted request reserves its blocks up front.

The vLLM paper's baselines (Kwon et al., SOSP 2023, Sec. 6.1) are Orca with three ways of
reserving a request's K/V memory as one contiguous chunk at admission:

* ``"max"`` (Orca (Max)): the model's maximum sequence length;
* ``"pow2"`` (Orca (Pow2)): the prompt plus the output length rounded up to a power of two
  (the paper's example: 25 output tokens reserve 32);
* ``"oracle"`` (Orca (Oracle)): exactly the final length (prompt + ``max_new_tokens``,
  which is the final length when no end token stops the request earlier).

Here they are admission policies of the same engine: the reservation, rounded up to whole
blocks and times the request's ``n`` samples, is taken first-fit as one contiguous range
of a block-index space of ``num_blocks`` (so gaps between live reservations are external
fragmentation, as in a contiguous allocator) and held until the request finishes. K/V
still lives in the allocator's blocks, which never run out because every request uses at
most what it reserved; prefix sharing is off. ``"paged"`` reserves nothing.
"""

from __future__ import annotations

import bisect

RESERVATION_POLICIES = ("paged", "max", "pow2", "oracle")


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def reservation_tokens(policy: str, prompt_len: int, max_new_tokens: int, max_seq_len: int) -> int:
  """Token slots one sample reserves under ``policy`` (not ``"paged"``)."""
  if policy == "max":
    return max_seq_len
  if policy == "pow2":
    return min(max_seq_len, prompt_len + next_pow2(max_new_tokens))
  if policy == "oracle":
    return prompt_len + max_new_tokens
  raise ValueError(f"reservation policy must be one of {RESERVATION_POLICIES[1:]}, got {policy!r}")


def reservation_blocks(
  policy: str, prompt_len: int, max_new_tokens: int, n: int, max_seq_len: int, block_size: int
) -> int:
  """Blocks a request reserves: ``n`` samples of ``ceil(tokens / block_size)`` blocks."""
  tokens = reservation_tokens(policy, prompt_len, max_new_tokens, max_seq_len)
  return n * -(-tokens // block_size)


class FirstFitRanges:
  """A linear space of ``capacity`` units: first-fit ``reserve``, ``release`` with merging."""

  def __init__(self, capacity: int):
    self.capacity = capacity
    self._starts = [0] if capacity else []
    self._sizes = [capacity] if capacity else []

  def reserve(self, size: int) -> int | None:
    """Start of a free range of ``size`` units (the lowest that fits), or None."""
    for i, free in enumerate(self._sizes):
      if free >= size:
        start = self._starts[i]
        if free == size:
          del self._starts[i], self._sizes[i]
        else:
          self._starts[i] += size
          self._sizes[i] -= size
        return start
    return None

  def release(self, start: int, size: int) -> None:
    i = bisect.bisect_left(self._starts, start)
    if (i > 0 and self._starts[i - 1] + self._sizes[i - 1] > start) or (
      i < len(self._starts) and start + size > self._starts[i]
    ):
      raise ValueError(f"release({start}, {size}) overlaps a free range")
    if i > 0 and self._starts[i - 1] + self._sizes[i - 1] == start:
      i -= 1
      self._sizes[i] += size
    else:
      self._starts.insert(i, start)
      self._sizes.insert(i, size)
    if i + 1 < len(self._starts) and self._starts[i] + self._sizes[i] == self._starts[i + 1]:
      self._sizes[i] += self._sizes[i + 1]
      del self._starts[i + 1], self._sizes[i + 1]

  @property
  def free(self) -> int:
    return sum(self._sizes)

  @property
  def largest_free(self) -> int:
    return max(self._sizes, default=0)
