"""Greedy generation without paging: the oracles the paged engine is checked against."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paxcache.nn._decoder import Decoder


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@functools.lru_cache(maxsize=16)
def _jitted_forward(graphdef):
  def fwd(state, tokens, rows):
    logits = nnx.merge(graphdef, state).forward(tokens, logit_rows=rows[:, None])  # [b, 1, V]
    return jnp.argmax(logits[:, 0], axis=-1)

  return jax.jit(fwd)


def greedy_generate_no_cache(
  model: Decoder,
  prompts: list[list[int]],
  max_new_tokens: list[int] | int,
  *,
  end_token: int | None = None,
  pad_multiple: int = 64,
) -> list[list[int]]:
  """Greedy generation by full recomputation: every token reruns the whole sequence.

  No cache of any kind: each new token is the argmax of a causal forward pass over
  the prompt plus the tokens generated so far. Sequences are right-padded into one
  batch (causality keeps padding from changing real rows).

  Args:
    model: the decoder.
    prompts: token ids per request.
    max_new_tokens: per request (or one value for all).
    end_token: generation of a request stops after it emits this token.
    pad_multiple: padded length is a multiple of this (fewer recompiles).

  Returns:
    The generated tokens per request (the end token included when emitted).
  """
  if isinstance(max_new_tokens, int):
    max_new_tokens = [max_new_tokens] * len(prompts)
  graphdef, state = nnx.split(model)
  fwd = _jitted_forward(graphdef)
  seqs = [list(p) for p in prompts]
  outs: list[list[int]] = [[] for _ in prompts]
  done = [m == 0 for m in max_new_tokens]
  while not all(done):
    live = [i for i, d in enumerate(done) if not d]
    width = _round_up(max(len(seqs[i]) for i in live), pad_multiple)
    # A fixed batch size (finished rows are dropped, not shrunk) keeps recompiles few.
    batch = np.zeros((_round_up(len(prompts), 8), width), np.int32)
    rows = np.zeros((batch.shape[0],), np.int32)
    for j, i in enumerate(live):
      batch[j, : len(seqs[i])] = seqs[i]
      rows[j] = len(seqs[i]) - 1
    next_tokens = np.asarray(fwd(state, jnp.asarray(batch), jnp.asarray(rows)))
    for j, i in enumerate(live):
      t = int(next_tokens[j])
      seqs[i].append(t)
      outs[i].append(t)
      if len(outs[i]) >= max_new_tokens[i] or t == end_token:
        done[i] = True
  return outs


@functools.lru_cache(maxsize=16)
def _jitted_cached(graphdef):
  def step(state, tokens, cache, index):
    logits, cache = nnx.merge(graphdef, state).forward_cached(tokens, cache, index)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

  return jax.jit(step)


def greedy_generate_dense_cache(
  model: Decoder,
  prompts: list[list[int]],
  max_new_tokens: int,
) -> list[list[int]]:
  """Greedy generation over a plain contiguous cache (no paging), for comparison.

  All prompts must have the same length (one shared cache index, as in Flax's own
  decode cache). Returns ``max_new_tokens`` tokens per prompt.
  """
  lengths = {len(p) for p in prompts}
  if len(lengths) != 1:
    raise ValueError(f"prompts must share one length, got lengths {sorted(lengths)}")
  (prompt_len,) = lengths
  graphdef, state = nnx.split(model)
  step = _jitted_cached(graphdef)
  cache = model.init_dense_cache(len(prompts), prompt_len + max_new_tokens)
  tokens = jnp.asarray(np.asarray(prompts, np.int32))
  outs = []
  index = 0
  for _ in range(max_new_tokens):
    nxt, cache = step(state, tokens, cache, jnp.int32(index))
    index += tokens.shape[1]
    outs.append(np.asarray(nxt))
    tokens = nxt[:, None]
  return np.stack(outs, axis=1).tolist() if outs else [[] for _ in prompts]
