"""Times ``kernels.paged_attention`` decode per backend and block size on the device present."""

from __future__ import annotations

import functools

import numpy as np


def available_backends(requested) -> list[tuple[str, str | None]]:
  """``(backend, None)`` if it runs here natively, else ``(backend, reason)``.

  Pallas interpret mode is never used for timing: it measures the interpreter.
  """
  import kernels

  out = []
  for backend in requested:
    try:
      kernels.resolve_backend(backend)
      out.append((backend, None))
    except kernels.BackendUnavailableError as e:
      out.append((backend, str(e).split(";")[0]))
  return out


def device_label() -> str:
  import jax

  dev = jax.devices()[0]
  return f"{dev.platform}:{dev.device_kind}"


def time_decode(
  backend: str,
  block_size: int,
  *,
  batch: int,
  context: int,
  num_q_heads: int,
  num_kv_heads: int,
  head_dim: int,
  dtype: str,
  iters: int,
  seed: int = 0,
  kv_dtype: str | None = None,
  inner: int = 1,
) -> dict:
  """Median wall time of one jitted decode call, with blocks scattered over the pool.

  ``iters`` samples after the compile (:func:`experiments._timing.time_calls`), each of
  ``inner`` calls back to back synced once and divided by ``inner``: with ``inner = 1`` a
  sample includes the call's dispatch (right on CPU, where the call runs on the host
  thread); on an accelerator ``inner >= 10`` makes it device time, as a decode call of
  tens of microseconds is otherwise mostly dispatch.
  Returns a dict with ``time_ms`` (the median), ``time_min_ms``, ``time_max_ms``,
  ``time_spread_ms`` (the two as text), the median's 95% interval ``time_ci_lo_ms``,
  ``time_ci_hi_ms`` (:attr:`experiments._timing.Timing.interval`), ``time_repeats`` and
  ``gbps`` (K/V bytes read over the median time), or with ``status`` set to the error's
  message when the backend rejects the shape. ``kv_dtype`` "int8" / "float8_e4m3fn": K/V
  pools quantized (before timing) with their float32 scales passed to the kernel; the
  bytes read then count the scales.
  """
  import jax
  import jax.numpy as jnp

  import kernels
  from experiments._timing import range_text, time_calls

  blocks_per_seq = -(-context // block_size)
  num_blocks = batch * blocks_per_seq
  rng = np.random.default_rng(seed)
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  dt = jnp.dtype(dtype)
  q = jax.random.normal(kq, (batch, num_q_heads, head_dim), dt)
  k_blocks = jax.random.normal(kk, (num_kv_heads, num_blocks, block_size, head_dim), dt)
  v_blocks = jax.random.normal(kv, (num_kv_heads, num_blocks, block_size, head_dim), dt)
  table = rng.permutation(num_blocks).reshape(batch, blocks_per_seq).astype(np.int32)
  block_table = jnp.asarray(table)
  lengths = jnp.full((batch,), context, jnp.int32)
  per_token = kernels.kv_bytes_per_token(1, num_kv_heads, head_dim, dt)
  scales = {}
  if kv_dtype and kernels.is_quantized(kv_dtype):
    k_blocks, ks = kernels.quantize(k_blocks, jnp.dtype(kv_dtype))
    v_blocks, vs = kernels.quantize(v_blocks, jnp.dtype(kv_dtype))
    scales = dict(k_scales=ks, v_scales=vs)
    per_token = kernels.kv_bytes_per_token(1, num_kv_heads, head_dim, kv_dtype)
  elif kv_dtype:
    k_blocks, v_blocks = k_blocks.astype(kv_dtype), v_blocks.astype(kv_dtype)
    per_token = kernels.kv_bytes_per_token(1, num_kv_heads, head_dim, kv_dtype)
  fn = jax.jit(functools.partial(kernels.paged_attention, backend=backend, **scales))
  try:
    fn(q, k_blocks, v_blocks, block_table, lengths).block_until_ready()  # compile
  except ValueError as e:  # a shape this backend does not support (e.g. a block size)
    return {"time_ms": None, "gbps": None, "status": f"unsupported: {e}"[:200]}
  t = time_calls(
    lambda: fn(q, k_blocks, v_blocks, block_table, lengths), repeats=iters, inner=inner, warmup=0
  )
  kv_bytes = batch * context * per_token
  fields = t.fields("time", digits=4)
  return {
    **fields,
    "time_spread_ms": range_text(fields["time_min_ms"], fields["time_max_ms"]),
    "gbps": float(f"{kv_bytes / t.median / 1e9:.4g}"),
    "inner": inner,
    "status": "ok",
  }
