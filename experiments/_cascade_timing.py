"""One decode step's attention for rows on a shared prefix: plain paged against cascade.

Used by ``experiments/prefix_sharing.py`` (the time axis of the system-prompt scenario)
and ``experiments/bench/prefix_time.py`` (the same on a GPU machine, which has no
ml_collections: nothing here imports it).
"""

from __future__ import annotations

import numpy as np


def _cdiv(a, b):
  return -(-a // b)


def shared_prefix_cache(
  users, shared_len, own_len, block_size, *, num_kv_heads, head_dim, seed
):  # fmt: skip
  """A decode step's inputs for ``users`` rows on one ``shared_len``-token prefix: the
  prefix's full blocks shared by every row (prefix-cache hits share full blocks only), the
  rest of each row (its partial prefix block, then ``own_len`` tokens) in blocks of its own,
  all shuffled over the pool. Returns NumPy ``(k, v, block_table, lengths)`` (float32 K/V)."""
  shared_blocks = shared_len // block_size
  length = shared_len + own_len
  own_blocks = _cdiv(length, block_size) - shared_blocks
  num_blocks = shared_blocks + users * own_blocks
  rng = np.random.default_rng(seed)
  perm = rng.permutation(num_blocks).astype(np.int32)
  table = np.empty((users, shared_blocks + own_blocks), np.int32)
  table[:, :shared_blocks] = perm[:shared_blocks]
  table[:, shared_blocks:] = perm[shared_blocks:].reshape(users, own_blocks)
  shape = (num_kv_heads, num_blocks, block_size, head_dim)
  k = rng.standard_normal(shape, np.float32)
  v = rng.standard_normal(shape, np.float32)
  return k, v, table, np.full(users, length, np.int32)


def time_shared_prefix_decode(
  *,
  users: int,
  shared_len: int,
  own_len: int,
  block_size: int,
  num_q_heads: int,
  num_kv_heads: int,
  head_dim: int,
  dtype: str,
  backend: str = "auto",
  repeats: int = 5,
  inner: int = 1,
  seed: int = 0,
) -> dict:
  """Times one decode step's attention, plain (``kernels.paged_attention``) and cascade
  (``kernels.cascade_attention`` with a ``kernels.plan_cascade`` plan made on the host,
  outside the timed call; its own host time is ``plan_ms``), each a jitted call on
  ``backend`` ("auto": the reference on CPU, the Pallas kernels on GPU and TPU; interpret
  mode is never timed). ``repeats`` samples of ``inner`` calls each
  (:func:`experiments._timing.time_calls`). The outputs are compared first
  (``max_abs_diff``). Returns one row: the shape, the medians ``plain_ms`` /
  ``cascade_ms`` with their spreads and intervals, ``speedup`` (plain / cascade),
  ``cascade_vs_plain`` (faster / slower / indistinguishable, from the intervals), and
  the K/V bytes each must read (``plain_kv_bytes``, ``cascade_kv_bytes``, and in MB)."""
  import jax
  import jax.numpy as jnp

  import kernels
  from experiments._kernel_timing import device_label
  from experiments._timing import compare, range_text, time_calls

  backend = kernels.resolve_backend(backend)
  k, v, table, lengths = shared_prefix_cache(
    users, shared_len, own_len, block_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
    seed=seed,
  )  # fmt: skip
  host_plan = time_calls(
    lambda: kernels.plan_cascade(table, lengths, block_size), repeats=repeats, sync=lambda o: o
  )
  plan = kernels.plan_cascade(table, lengths, block_size)
  if plan is None:
    raise RuntimeError(f"no cascade group among {users} rows sharing {shared_len} tokens")
  dt = jnp.dtype(dtype)
  rng = np.random.default_rng([seed, 1])
  q = jnp.asarray(rng.standard_normal((users, num_q_heads, head_dim)), dt)
  k, v = jnp.asarray(k, dt), jnp.asarray(v, dt)
  table_d, lengths_d = jnp.asarray(table), jnp.asarray(lengths)
  plan_d = jax.tree.map(jnp.asarray, plan)  # device arrays: no host checks per call
  plain = jax.jit(lambda q, k, v, t, n: kernels.paged_attention(q, k, v, t, n, backend=backend))
  cascade = jax.jit(
    lambda q, k, v, t, n, p: kernels.cascade_attention(q, k, v, t, n, p, backend=backend)
  )
  a = np.asarray(plain(q, k, v, table_d, lengths_d), np.float32)
  b = np.asarray(cascade(q, k, v, table_d, lengths_d, plan_d), np.float32)
  plain_t = time_calls(lambda: plain(q, k, v, table_d, lengths_d), repeats=repeats, inner=inner)
  cascade_t = time_calls(
    lambda: cascade(q, k, v, table_d, lengths_d, plan_d), repeats=repeats, inner=inner
  )
  per_token = 2 * num_kv_heads * head_dim * dt.itemsize  # K and V of one token, one layer
  length = shared_len + own_len
  shared_full = shared_len // block_size * block_size  # what the group reads once
  return {
    "device": device_label(),
    "backend": backend,
    "block_size": block_size,
    "users": users,
    "shared_len": shared_len,
    "own_len": own_len,
    "heads": f"{num_q_heads}/{num_kv_heads}x{head_dim}",
    "dtype": dt.name,
    "groups": int(plan.num_groups),
    "plain_kv_bytes": users * length * per_token,
    "cascade_kv_bytes": (shared_full + users * (length - shared_full)) * per_token,
    "plain_kv_mb": round(users * length * per_token / 1e6, 2),
    "cascade_kv_mb": round((shared_full + users * (length - shared_full)) * per_token / 1e6, 2),
    "plain_ms": round(plain_t.median * 1e3, 4),
    "plain_range_ms": range_text(plain_t.min * 1e3, plain_t.max * 1e3),
    "cascade_ms": round(cascade_t.median * 1e3, 4),
    "cascade_range_ms": range_text(cascade_t.min * 1e3, cascade_t.max * 1e3),
    "speedup": round(plain_t.median / cascade_t.median, 2),
    "cascade_vs_plain": compare(cascade_t, plain_t),
    "plan_ms": round(host_plan.median * 1e3, 4),
    "max_abs_diff": float(np.abs(a - b).max()),
    **plain_t.fields("plain"),
    **cascade_t.fields("cascade"),
  }
