"""The compiled engine step never copies or materialises a pool-sized buffer.

A Pallas kernel is a custom call, so XLA must hand it whole buffers: a layer sliced out of
one 5-D pool was copied before every kernel call, and a step's time grew with the pool
(docs/benchmarks.md). Each backend's compiled step is inspected at two pool sizes: its
scratch memory must not grow with the pool, every pool byte it returns must alias the
donated input, and no HLO ``copy`` may produce a pool-shaped array.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from paxcache.engine import Engine, EngineConfig, Request
from paxcache.nn import Decoder, DecoderConfig

SMALL_POOL, LARGE_POOL = 64, 1024  # blocks; the large pool's layer is 16x the small one's


def _compiled_decode_step(
  backend: str,
  head_dim: int,
  num_blocks: int,
  kv_dtype=None,
  decode_plan: str = "auto",
  lane_dense: bool = False,
  lane_padded: bool = False,
  cascade: bool = False,
  burst: int = 1,
):
  config = DecoderConfig(
    kv_dtype=kv_dtype,
    vocab_size=64,
    d_model=32,
    num_layers=2,
    num_q_heads=2,
    num_kv_heads=1,
    head_dim=head_dim,
    mlp_dim=64,
    max_seq_len=64,
  )
  # On a GPU or TPU the real kernel compiles (a custom call, whose operand copies this
  # test is about); elsewhere interpret mode stands in for it.
  interpret = backend != "reference" and jax.default_backend() != backend
  model = Decoder(config, backend=backend, interpret=interpret, rngs=nnx.Rngs(0))
  if interpret and backend == "gpu":
    # The GPU decode kernel writes the step's K/V in place (pools aliased in and out;
    # tests/kernels/test_write_and_decode.py checks the aliasing), but Pallas's interpret
    # mode carries an aliased pool twice through its grid loop, copying it: here the layers
    # write with write_kv, and the fused kernel's step is inspected on a GPU (where this
    # branch is not taken: docs/benchmarks.md records the run).
    for layer in model.layers:
      layer.attn.fused_write = False
  engine = Engine(
    model,
    EngineConfig(
      num_blocks=num_blocks,
      block_size=16 if lane_dense else 8,  # lane-dense float32 on TPU: 8 rows of 2 tokens
      num_host_blocks=0,
      preemption_mode="recompute",
      decode_plan=decode_plan,
      lane_dense_cache=lane_dense,
      lane_padded_cache=lane_padded,
      # Cascade: the fork's two rows share their first block, a group of one block.
      cascade_min_shared_blocks=1 if cascade else 0,
      decode_steps=burst,
    ),
  )
  engine.add_request(Request("a", list(range(11)), max_new_tokens=4))
  engine.add_request(Request("b", list(range(5, 25)), max_new_tokens=4, temperature=0.5))
  if burst == 1:
    # Two samples sharing a partly filled block: the first decode copies it (copy-on-write).
    engine.add_request(Request("c", list(range(3, 14)), max_new_tokens=4, n=2))
  engine.step()  # the prefill runs; the step inspected below is the next one, a decode
  plan = engine.scheduler.schedule()
  if burst > 1:  # a burst: every layer's write and attention in the device loop
    assert engine._burst_size(plan) == burst
    batch = engine._build_burst_batch(plan, burst)
    assert batch.burst_slots.shape[0] == burst - 1
  else:
    batch = engine._build_batch(plan)
    assert (batch.cow_src >= 0).any()  # the copies are part of the step inspected
  assert batch.decode_only
  # "on" plans this level decode step; "auto" leaves it to the default decode.
  assert (batch.decode_plan() is not None) == (decode_plan == "on")
  assert (batch.cascade_plan() is not None) == cascade
  lowered = engine._step_fn.lower(
    engine._params, engine.cache, batch, engine._key, engine._prev_tokens
  )
  return lowered.compile(), engine.cache


@pytest.mark.parametrize("burst", [1, 3], ids=["step", "burst3"])
@pytest.mark.parametrize("backend,head_dim", [("reference", 16), ("gpu", 64), ("tpu", 128)])
def test_compiled_step_never_copies_the_pool(backend, head_dim, burst):
  # burst3: EngineConfig.decode_steps=3, the pools carried through the device loop.
  small, _ = _compiled_decode_step(backend, head_dim, SMALL_POOL, burst=burst)
  large, cache = _compiled_decode_step(backend, head_dim, LARGE_POOL, burst=burst)
  layer_bytes = cache.k[0].nbytes
  pool_bytes = 2 * cache.num_layers * layer_bytes
  mem_small, mem = small.memory_analysis(), large.memory_analysis()
  # Scratch does not grow with the pool (the 5-D layout needed 2 layers' worth here)...
  assert mem.temp_size_in_bytes == mem_small.temp_size_in_bytes
  assert mem.temp_size_in_bytes < layer_bytes / 4
  # ...and the returned pools are the donated ones, updated in place.
  assert mem.alias_size_in_bytes >= pool_bytes
  assert mem.output_size_in_bytes - mem.alias_size_in_bytes < layer_bytes / 4
  layer_shape = ",".join(map(str, cache.k[0].shape))
  dtype = {jnp.float32: "f32", jnp.bfloat16: "bf16"}[cache.dtype.type]
  copies = re.findall(rf"= {dtype}\[{layer_shape}\][^ ]* copy\(", large.as_text())
  assert not copies


def _assert_float32_pools_in_place(small, large, cache):
  """The compiled steps at the two pool sizes: scratch the same and under a quarter of a
  layer, every pool byte aliased to the donated input, no float32 pool-shaped copy."""
  assert cache.dtype == jnp.float32  # the copy pattern below names f32
  layer_bytes = cache.k[0].nbytes
  mem_small, mem = small.memory_analysis(), large.memory_analysis()
  assert mem.temp_size_in_bytes == mem_small.temp_size_in_bytes
  assert mem.temp_size_in_bytes < layer_bytes / 4
  assert mem.alias_size_in_bytes >= 2 * cache.num_layers * layer_bytes
  assert mem.output_size_in_bytes - mem.alias_size_in_bytes < layer_bytes / 4
  layer_shape = ",".join(map(str, cache.k[0].shape))
  assert not re.findall(rf"= f32\[{layer_shape}\][^ ]* copy\(", large.as_text())


def test_compiled_step_with_a_decode_plan_never_copies_the_pool():
  """The GPU step with the planned decode (EngineConfig.decode_plan="on"): its float32
  partials are per chunk, not per pool, and the pools are still updated in place."""
  small, _ = _compiled_decode_step("gpu", 64, SMALL_POOL, decode_plan="on")
  large, cache = _compiled_decode_step("gpu", 64, LARGE_POOL, decode_plan="on")
  _assert_float32_pools_in_place(small, large, cache)


@pytest.mark.parametrize("backend,head_dim", [("reference", 16), ("gpu", 64)])
def test_compiled_step_never_copies_an_8bit_pool_or_its_scales(backend, head_dim):
  """The same with an int8 cache: the quantizing write and copy-on-write update the int8
  pools and the float32 scale pools in place. (The TPU backend takes 8-bit blocks of 128
  slots or more; this engine uses 8.)"""
  small, _ = _compiled_decode_step(backend, head_dim, SMALL_POOL, "int8")
  large, cache = _compiled_decode_step(backend, head_dim, LARGE_POOL, "int8")
  assert cache.quantized
  layer_bytes = cache.k[0].nbytes
  scale_bytes = cache.k_scale[0].nbytes
  pool_bytes = 2 * cache.num_layers * (layer_bytes + scale_bytes)
  mem_small, mem = small.memory_analysis(), large.memory_analysis()
  assert mem.temp_size_in_bytes == mem_small.temp_size_in_bytes
  # The float32 test's bound, a quarter of a float32 layer: one int8 layer's bytes.
  assert mem.temp_size_in_bytes < layer_bytes
  assert mem.alias_size_in_bytes >= pool_bytes
  assert mem.output_size_in_bytes - mem.alias_size_in_bytes < layer_bytes
  text = large.as_text()
  pool_shape = ",".join(map(str, cache.k[0].shape))
  scale_shape = ",".join(map(str, cache.k_scale[0].shape))
  assert not re.findall(rf"= s8\[{pool_shape}\][^ ]* copy\(", text)
  assert not re.findall(rf"= f32\[{scale_shape}\][^ ]* copy\(", text)


@pytest.mark.parametrize("backend", ["reference", "gpu", "tpu"])
@pytest.mark.parametrize("layout,head_dim", [("lane_dense", 64), ("lane_padded", 80)])
def test_compiled_step_never_copies_a_lane_dense_or_lane_padded_pool(backend, layout, head_dim):
  """Pools in rows of 128: head_dim 64 lane-dense (two tokens a row) or head_dim 80
  lane-padded (zeros after the real lanes). The GPU and reference backends read a
  lane-dense pool through a reshape and a lane-padded one as head_dim 128 with q
  zero-padded, the TPU kernels both as they are; the write scatters into the rows. No copy
  of the pool in its own shape or its logical one, and the pools are updated in place."""
  small, _ = _compiled_decode_step(backend, head_dim, SMALL_POOL, **{layout: True})
  large, cache = _compiled_decode_step(backend, head_dim, LARGE_POOL, **{layout: True})
  assert getattr(cache, layout) and cache.k[0].shape[2:] == (8, 128)
  layer_bytes = cache.k[0].nbytes
  mem_small, mem = small.memory_analysis(), large.memory_analysis()
  assert mem.temp_size_in_bytes == mem_small.temp_size_in_bytes
  assert mem.temp_size_in_bytes < layer_bytes / 4
  assert mem.alias_size_in_bytes >= 2 * cache.num_layers * layer_bytes
  assert mem.output_size_in_bytes - mem.alias_size_in_bytes < layer_bytes / 4
  text = large.as_text()
  for shape in (cache.k[0].shape, cache.logical_shape):
    assert not re.findall(rf"= f32\[{','.join(map(str, shape))}\][^ ]* copy\(", text), shape


@pytest.mark.parametrize("backend,head_dim", [("reference", 16), ("gpu", 64), ("tpu", 128)])
def test_compiled_cascade_step_never_copies_the_pool(backend, head_dim):
  """A decode step whose attention runs as cascade (the fork's rows share a block): the
  write and copy-on-write still update the pools in place, and the cascade's partials are
  per group and row, not per pool."""
  small, _ = _compiled_decode_step(backend, head_dim, SMALL_POOL, cascade=True)
  large, cache = _compiled_decode_step(backend, head_dim, LARGE_POOL, cascade=True)
  _assert_float32_pools_in_place(small, large, cache)
