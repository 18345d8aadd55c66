"""Shared helpers of the GPU benchmark and check scripts (inputs, environment).

Run the scripts from the repository root as ``python -m experiments.bench.<name>``; they
time with :func:`experiments._timing.time_calls`.
"""

from __future__ import annotations

import datetime
import json
import os

# Let torch (ceiling) and JAX share the GPU; JAX would otherwise take 75% up front. Read
# when JAX's backend starts, so importing this module before any computation suffices.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np


def device_name() -> str:
  dev = jax.devices()[0]
  return getattr(dev, "device_kind", str(dev))


def env_info() -> dict:
  return dict(
    device=device_name(),
    jax_version=jax.__version__,
    date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
  )


def make_paged(
  rng,
  *,
  batch,
  context,
  block_size,
  num_kv_heads,
  head_dim,
  dtype,
  lengths=None,
  extra_blocks=0,
  contiguous=False,
  poison=True,
):
  """A block pool holding ``batch`` sequences, blocks scattered at random.

  Returns (k_blocks, v_blocks, block_table, lengths, k_dense, v_dense) where the
  dense arrays [batch, context, num_kv_heads, head_dim] hold the same tokens (for
  references). Unused blocks and slots past each length are NaN when ``poison``.
  """
  max_blocks = -(-context // block_size)
  if lengths is None:
    lengths = np.full((batch,), context, np.int32)
  lengths = np.asarray(lengths, np.int32)
  num_used = batch * max_blocks
  num_blocks = num_used + extra_blocks
  ids = np.arange(num_blocks) if contiguous else rng.permutation(num_blocks)
  table = ids[:num_used].reshape(batch, max_blocks).astype(np.int32)
  need = -(-lengths // block_size)
  table = np.where(np.arange(max_blocks)[None, :] < need[:, None], table, -1).astype(np.int32)
  key = jax.random.key(int(rng.integers(1 << 30)))
  k1, k2 = jax.random.split(key)
  shape = (batch, max_blocks * block_size, num_kv_heads, head_dim)
  k_dense = jax.random.normal(k1, shape, jnp.float32).astype(dtype)
  v_dense = jax.random.normal(k2, shape, jnp.float32).astype(dtype)
  pos = jnp.arange(max_blocks * block_size)
  if poison:
    live = (pos[None, :] < jnp.asarray(lengths)[:, None])[:, :, None, None]
    k_dense = jnp.where(live, k_dense, jnp.nan).astype(dtype)
    v_dense = jnp.where(live, v_dense, jnp.nan).astype(dtype)
  fill = jnp.nan if poison else 0.0
  pool_shape = (num_kv_heads, num_blocks, block_size, head_dim)
  src = k_dense.reshape(batch, max_blocks, block_size, num_kv_heads, head_dim)
  src = src.transpose(3, 0, 1, 2, 4).reshape(num_kv_heads, num_used, block_size, head_dim)
  vsrc = v_dense.reshape(batch, max_blocks, block_size, num_kv_heads, head_dim)
  vsrc = vsrc.transpose(3, 0, 1, 2, 4).reshape(num_kv_heads, num_used, block_size, head_dim)
  dest = jnp.asarray(ids[:num_used])
  k_blocks = jnp.full(pool_shape, fill, dtype).at[:, dest].set(src)
  v_blocks = jnp.full(pool_shape, fill, dtype).at[:, dest].set(vsrc)
  return (k_blocks, v_blocks, jnp.asarray(table), jnp.asarray(lengths), k_dense, v_dense)


def write_jsonl(path, rows):
  with open(path, "a") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
