"""Request length workloads: synthetic ShareGPT-like and Alpaca-like, or a ShareGPT JSON file.

Synthetic workloads
-------------------
The paper (Kwon et al., SOSP 2023, Figure 11) publishes the mean lengths of its two
traces, not their distributions: ShareGPT has 161.31 input and 337.99 output tokens on
average, Alpaca 19.31 and 58.45. We draw input and output lengths independently from
**log-normal** distributions, the usual family for text lengths (positive, right-skewed,
a long tail of very long conversations), rounded up to whole tokens (at least 1).
Pairs whose total exceeds ``max_seq_len`` (2048 by default, the context of the OPT
models the paper serves) are redrawn, as vLLM's benchmark drops them.

The spread is our choice, read by eye from the shape of the paper's histograms:
``sigma = 1.0`` (inputs) and ``0.8`` (outputs) for ShareGPT, whose inputs range from a
few words to pasted documents; ``0.6`` and ``0.8`` for Alpaca, whose instructions are
short and uniform. Each ``mu`` is then *calibrated* so that the mean after rounding and
redrawing at the paper's ``max_seq_len`` of 2048 equals the published mean (within 1% on
100,000 draws; the calibration uses its own fixed random numbers, so it does not depend
on the experiment's seed). A different ``max_seq_len`` keeps that distribution and only
changes which pairs are redrawn, so a shorter one lowers the means. Memory
waste depends mostly on the means and on ``max_seq_len``; the spread matters for the
``pow2`` reservation and for the tail.

ShareGPT-format JSON files
--------------------------
``load_sharegpt(path)`` reads the format vLLM's serving benchmarks read: a JSON list of
``{"conversations": [{"from": ..., "value": ...}, ...]}``. As vLLM does, the first turn
is the prompt and the second the output; conversations with fewer than two turns are
skipped. Without a tokenizer, a turn's **token count is ceil(UTF-8 bytes / 4)** (at least
1): about 4 bytes per token is the usual rate of BPE tokenizers on English text, and
counting bytes (not words) also gives code and non-Latin scripts a sensible count.
Pairs longer than ``max_seq_len`` in total are dropped.

In a workload list, a name ending in ``.json`` is read as such a file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class LengthDistribution:
  """Independent log-normal input and output lengths with published means."""

  name: str
  input_mean: float  # tokens, as published
  output_mean: float  # tokens, as published
  input_sigma: float  # log-space standard deviation (our choice, see module docstring)
  output_sigma: float


SHAREGPT = LengthDistribution("sharegpt", 161.31, 337.99, input_sigma=1.0, output_sigma=0.8)
ALPACA = LengthDistribution("alpaca", 19.31, 58.45, input_sigma=0.6, output_sigma=0.8)
SYNTHETIC = {d.name: d for d in (SHAREGPT, ALPACA)}

_CALIBRATION_SAMPLES = 100_000
_CALIBRATION_SEED = 20230901  # fixed: mu must not depend on the experiment's seed


def _draw(dist: LengthDistribution, mu_in, mu_out, z_in, z_out) -> tuple[np.ndarray, np.ndarray]:
  prompt = np.maximum(1, np.ceil(np.exp(mu_in + dist.input_sigma * z_in))).astype(np.int64)
  output = np.maximum(1, np.ceil(np.exp(mu_out + dist.output_sigma * z_out))).astype(np.int64)
  return prompt, output


CALIBRATION_MAX_SEQ_LEN = 2048  # the context of the OPT models the paper's traces were cut to


@functools.cache
def calibrated_mu(
  dist: LengthDistribution, max_seq_len: int = CALIBRATION_MAX_SEQ_LEN
) -> tuple[float, float]:
  """Log-space means such that the kept (total <= max_seq_len) draws have the published means."""
  rng = np.random.default_rng(_CALIBRATION_SEED)
  z_in = rng.standard_normal(_CALIBRATION_SAMPLES)
  z_out = rng.standard_normal(_CALIBRATION_SAMPLES)
  # Start from the untruncated log-normal means; rounding up and dropping long pairs
  # shift the mean, which a few multiplicative corrections remove.
  mu_in = math.log(dist.input_mean) - dist.input_sigma**2 / 2
  mu_out = math.log(dist.output_mean) - dist.output_sigma**2 / 2
  for _ in range(30):
    prompt, output = _draw(dist, mu_in, mu_out, z_in, z_out)
    keep = prompt + output <= max_seq_len
    if not keep.any():
      raise ValueError(f"max_seq_len={max_seq_len} is too short for workload {dist.name!r}")
    mu_in += math.log(dist.input_mean / prompt[keep].mean())
    mu_out += math.log(dist.output_mean / output[keep].mean())
  return mu_in, mu_out


def sample_synthetic(
  dist: LengthDistribution, num_requests: int, *, max_seq_len: int, seed: int
) -> np.ndarray:
  """Returns i64[num_requests, 2]: (prompt_len, output_len) rows, each total <= max_seq_len."""
  if num_requests < 0:
    raise ValueError(f"num_requests must be >= 0, got {num_requests}")
  if max_seq_len < 2:
    raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
  mu_in, mu_out = calibrated_mu(dist)
  rng = np.random.default_rng(seed)
  rows = []
  have = 0
  while have < num_requests:
    n = max(16, 2 * (num_requests - have))
    prompt, output = _draw(dist, mu_in, mu_out, rng.standard_normal(n), rng.standard_normal(n))
    keep = prompt + output <= max_seq_len
    if keep.mean() < 0.01:
      raise ValueError(
        f"max_seq_len={max_seq_len} keeps under 1% of {dist.name!r} requests; raise it"
      )
    batch = np.stack([prompt[keep], output[keep]], axis=1)
    rows.append(batch)
    have += len(batch)
  return np.concatenate(rows + [np.zeros((0, 2), np.int64)])[:num_requests]


def count_tokens(text: str) -> int:
  """The token-count rule for text without a tokenizer: ceil(UTF-8 bytes / 4), at least 1."""
  return max(1, math.ceil(len(text.encode("utf-8")) / 4))


def load_sharegpt(path: str, *, max_seq_len: int) -> np.ndarray:
  """Reads a ShareGPT-format JSON file; returns i64[n, 2] (prompt_len, output_len) in file order.

  Raises:
    ValueError: the file is not a list of objects with a ``conversations`` list of
      ``{"value": str}`` turns, or no conversation has two turns within ``max_seq_len``.
  """
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
  rows = []
  for i, item in enumerate(data):
    turns = item.get("conversations") if isinstance(item, dict) else None
    if not isinstance(turns, list):
      raise ValueError(f"{path}: entry {i} has no 'conversations' list: {str(item)[:80]!r}")
    if len(turns) < 2:
      continue
    values = []
    for turn in turns[:2]:
      if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
        raise ValueError(f"{path}: entry {i} has a turn without a string 'value': {turn!r:.80}")
      values.append(turn["value"])
    prompt, output = count_tokens(values[0]), count_tokens(values[1])
    if prompt + output <= max_seq_len:
      rows.append((prompt, output))
  if not rows:
    raise ValueError(
      f"{path}: no conversation with at least two turns fits max_seq_len={max_seq_len}"
    )
  return np.asarray(rows, dtype=np.int64)


def workload_lengths(name: str, num_requests: int, *, max_seq_len: int, seed: int) -> np.ndarray:
  """Lengths i64[n, 2] for a workload name: ``sharegpt``, ``alpaca`` or a ``*.json`` path.

  A JSON file gives its first ``num_requests`` usable conversations after a seeded
  shuffle (all of them if it has fewer; ``num_requests <= 0`` takes all).
  """
  check_workload_name(name)
  if name.endswith(".json"):
    lengths = load_sharegpt(name, max_seq_len=max_seq_len)
    order = np.random.default_rng(seed).permutation(len(lengths))
    if num_requests > 0:
      order = order[:num_requests]
    return lengths[order]
  return sample_synthetic(SYNTHETIC[name], num_requests, max_seq_len=max_seq_len, seed=seed)


def check_workload_name(name) -> None:
  """``ValueError`` unless ``name`` is a synthetic workload or an existing ``*.json`` file."""
  if isinstance(name, str) and name.endswith(".json"):
    if not os.path.isfile(name):
      raise ValueError(f"workload file {name!r} does not exist")
  elif not isinstance(name, str) or name not in SYNTHETIC:
    raise ValueError(
      f"unknown workload {name!r}: expected one of {sorted(SYNTHETIC)} or a path ending in .json"
    )


def workload_label(name: str) -> str:
  """Short label for tables: the synthetic name, or the JSON file's base name."""
  return os.path.basename(name) if name.endswith(".json") else name
