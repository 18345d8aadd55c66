"""The engine on an 8-bit K/V cache (``DecoderConfig.kv_dtype``): forks, swapping, accuracy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from paxcache.engine import Engine, EngineConfig, Request
from paxcache.nn import TINY_CORPUS, load_decoder


@pytest.fixture(scope="module")
def int8_model():
  return load_decoder(kv_dtype="int8")


@pytest.fixture(scope="module")
def corpus():
  with open(TINY_CORPUS, "rb") as f:
    return f.read()


def test_swapping_and_forks_give_the_roomy_pools_tokens(int8_model, corpus):
  """A pool that swaps blocks out and back (scales with them) samples what a roomy pool
  samples; a greedy fork (n=2, its partly filled last prompt block copied on write with
  its scales) gives both samples the unforked request's tokens."""
  reqs = [
    Request(i, list(corpus[40 * i : 40 * i + 21]), max_new_tokens=16, temperature=0.8, seed=i)
    for i in range(5)
  ]
  roomy = Engine(int8_model, EngineConfig(num_blocks=96, block_size=8, num_host_blocks=8))
  assert roomy.cache.quantized and roomy.cache.dtype == jnp.int8
  want = roomy.run(reqs)
  small = Engine(
    int8_model,
    EngineConfig(num_blocks=12, block_size=8, num_host_blocks=64, max_num_batched_tokens=32),
  )
  got = small.run(reqs)
  assert small.metrics.preemptions_swap > 0 and small.host_pool.k_scale is not None
  for r in reqs:
    assert got[r.request_id].samples == want[r.request_id].samples
  prompt = list(corpus[300:321])  # 21 tokens: the last prompt block is partly filled
  fork = Engine(int8_model, EngineConfig(num_blocks=32, block_size=8)).run(
    [Request("fork", prompt, max_new_tokens=16, n=2)]
  )["fork"]
  single = Engine(int8_model, EngineConfig(num_blocks=32, block_size=8)).run(
    [Request("one", prompt, max_new_tokens=16)]
  )["one"]
  assert fork.samples[0] == fork.samples[1] == single.samples[0]


def test_int8_logits_stay_close_to_the_float_cache(int8_model, corpus):
  """Teacher-forced logits of 96 tokens with an int8 and a float32 cache (the tiny model
  is byte-level, logits of order 2): measured top-1 agreement 0.99 and mean |error| 0.02
  over 512 tokens (experiments/kv_quant_accuracy.py); bounds with room for other CPUs."""
  from experiments.kv_quant_accuracy import teacher_forced_logits

  tokens = list(corpus[:96])
  ref = teacher_forced_logits(load_decoder(), tokens, chunk=32)
  got = teacher_forced_logits(int8_model, tokens, chunk=32)
  assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.9
  err = float(np.mean(np.abs(got - ref)))
  assert 0 < err < 0.1  # > 0: the cache really is 8-bit
