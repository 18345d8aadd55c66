"""The one public paged-attention entry point and its backend switch.

Every backend takes the same arguments in the same order, with the layout
documented in :mod:`kernels.reference`. ``backend="auto"`` picks the Pallas
kernel on GPU and TPU and the reference on CPU; asking for a backend that cannot
run raises :class:`BackendUnavailableError` with the reason, never a silent
fallback to the reference.
"""

from __future__ import annotations

from typing import Any

import jax

from kernels import _layout, reference
from kernels._validate import (
  validate_decode_plan,
  validate_inputs,
  validate_options,
  validate_padded_width,
)

BACKENDS = ("auto", "reference", "gpu", "tpu")


class BackendUnavailableError(RuntimeError):
  """The requested backend cannot run here (and we never fall back in silence)."""


def _platform() -> str:
  return jax.default_backend()


def resolve_backend(backend: str, *, interpret: bool = False) -> str:
  """Maps ``backend`` to the concrete backend that will run, or raises with the reason."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  platform = _platform()
  if backend == "auto":
    return {"gpu": "gpu", "tpu": "tpu"}.get(platform, "reference")
  if backend in ("gpu", "tpu") and not interpret and platform != backend:
    raise BackendUnavailableError(
      f"backend={backend!r} needs a {backend.upper()} but JAX's default backend is "
      f"{platform!r}; pass interpret=True to run the Pallas kernel in interpret mode, or "
      "backend='reference'"
    )
  return backend


def paged_attention(
  q: jax.Array,
  k_blocks: jax.Array,
  v_blocks: jax.Array,
  block_table: jax.Array,
  lengths: jax.Array,
  cu_q_lens: jax.Array | None = None,
  *,
  scale: float | None = None,
  sliding_window: int | None = None,
  logit_soft_cap: float | None = None,
  backend: str = "auto",
  block_sizes: Any = None,
  interpret: bool = False,
  k_scales: jax.Array | None = None,
  v_scales: jax.Array | None = None,
  decode_plan: Any = None,
  lane_dense: bool = False,
  lane_padded: bool = False,
) -> jax.Array:
  """Paged attention over K/V block pools; decode when ``cu_q_lens`` is None.

  Args:
    q: ``[batch, num_q_heads, head_dim]`` (decode) or ``[num_tokens, num_q_heads,
      head_dim]`` (ragged prefill / mixed batch, rows split by ``cu_q_lens``).
    k_blocks, v_blocks: ``[num_kv_heads, num_blocks, block_size, head_dim]``; float32,
      bfloat16, float16, or 8-bit (int8, float8_e4m3fn) with scales. 16- and 32-bit
      pools of head_dim 32 or 64 may instead be lane-dense, ``[num_kv_heads, num_blocks,
      block_size * head_dim / 128, 128]`` (``kernels._layout``: what the TPU kernels read
      without padding; every backend gives the same result from either layout). The head_dim each
      backend takes (``kernels._validate.head_dim_supported``; any other raises
      ValueError naming the rule before compiling): ``"reference"`` any; ``"gpu"`` a
      multiple of 16 up to 256 (64, 80, 96, 112, 128, 192, 256, ...; one that is not a
      power of two runs in masked tiles of the next power of two, reading only its real
      bytes); ``"tpu"`` a multiple of 128 (128, 256, ...: XLA would copy a pool of any
      other head_dim into the kernels' layout on every call), or any head_dim in a
      lane-padded pool (``lane_padded``), or 32 / 64 lane-dense (``lane_dense``).
    block_table: ``i32[batch, max_blocks]``; ``-1`` marks unused entries.
    lengths: ``i32[batch]``; tokens in each sequence including this call's queries.
    cu_q_lens: ``i32[batch + 1]`` cumulative query counts, or None for decode.
    scale: softmax scale (finite), default ``head_dim ** -0.5``.
    sliding_window: if set (an int >= 1), a query at position p sees keys in
      ``(p - window, p]``.
    logit_soft_cap: if set (finite, > 0), logits become ``cap * tanh(logits / cap)``
      (after scale).
    backend: ``"auto" | "reference" | "gpu" | "tpu"``.
    block_sizes: backend tuning dataclass (frozen, hashable); None picks defaults per shape.
    interpret: run the Pallas kernel in interpret mode (tests on CPU).
    k_scales, v_scales: 8-bit K/V only (None otherwise): ``f32[num_kv_heads, num_blocks,
      block_size]``, the scale of each slot's row (``kernels.quantize``); every backend
      multiplies them in inside its kernel.
    decode_plan: decode only: a ``kernels.gpu.plan.DecodePlan`` built on the host from
      this call's lengths (``kernels.gpu.plan_decode``), or None. A plan is a schedule,
      not a change of the result: the GPU backend runs its planned kernel by it; the
      reference checks it and ignores it (same result, so tests pass the same arguments
      to both); the TPU backend refuses it (it has no planned kernel: pass None there).
    lane_dense: ``k_blocks``/``v_blocks`` are lane-dense (above): head_dim 32 or 64 in rows
      of 128, 16- or 32-bit (ValueError otherwise, and for such a pool without it).
    lane_padded: ``k_blocks``/``v_blocks`` are lane-padded (``kernels._layout``): rows of
      ``head_dim`` rounded up to a multiple of 128, K/V in the first ``head_dim`` lanes,
      finite values (``kernels.write_kv(..., lane_padded=True)`` writes zeros) after them;
      for a head_dim that is not a multiple of 128 (ValueError otherwise). Every backend
      runs it as head_dim ``width`` with q zero-padded and the real head_dim's scale, and
      returns the first ``head_dim`` lanes: how the TPU backend takes 80, 96, 112, 192.

  Returns:
    Array shaped like ``q`` with ``q.dtype``.
  """
  real_head_dim = None  # a lane-padded pool: q padded here, the output cut back at the end
  if lane_padded:
    q, scale, real_head_dim = _layout.padded_query(
      q, k_blocks, scale, lane_dense, "kernels.paged_attention"
    )
  validate_inputs(
    q,
    k_blocks,
    v_blocks,
    block_table,
    lengths,
    cu_q_lens,
    k_scales,
    v_scales,
    lane_dense=lane_dense,
  )
  scale, sliding_window, logit_soft_cap = validate_options(scale, sliding_window, logit_soft_cap)
  chosen = resolve_backend(backend, interpret=interpret)
  if real_head_dim is not None and chosen == "gpu":
    validate_padded_width(real_head_dim, k_blocks, "gpu", "kernels.paged_attention")
  if decode_plan is not None and chosen == "tpu":
    raise ValueError(
      "decode_plan is for the GPU backend's planned decode; the TPU backend has none: "
      "pass decode_plan=None"
    )
  k_blocks, v_blocks, extra = layout_for(chosen, q, k_blocks, v_blocks, lane_dense)
  if k_scales is not None:
    extra.update(k_scales=k_scales, v_scales=v_scales)
  if decode_plan is not None:
    validate_decode_plan(decode_plan, k_blocks, block_table, lengths, cu_q_lens, sliding_window)
    if chosen == "gpu":
      extra["decode_plan"] = decode_plan
  out = _BACKEND_FNS[chosen](
    q,
    k_blocks,
    v_blocks,
    block_table,
    lengths,
    cu_q_lens,
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    block_sizes=block_sizes,
    interpret=interpret,
    **extra,
  )
  return out if real_head_dim is None else out[..., :real_head_dim]


def layout_for(chosen: str, q, k_blocks, v_blocks, lane_dense: bool):
  """``(k_blocks, v_blocks, kwargs)`` as backend ``chosen`` takes them: the TPU kernels read
  a lane-dense pool (``kernels._layout``) as it is, told by ``lane_dense=True`` in the
  kwargs; the others see it through a reshape to the plain layout (free under jit: the
  same row-major bytes; outside jit, a copy)."""
  if not lane_dense:
    return k_blocks, v_blocks, {}
  if chosen == "tpu":
    return k_blocks, v_blocks, {"lane_dense": True}
  head_dim = q.shape[-1]
  return _layout.unpack(k_blocks, head_dim), _layout.unpack(v_blocks, head_dim), {}


def _run_reference(*args, block_sizes, interpret, **options):
  del interpret  # plain JAX: nothing to interpret
  if block_sizes is not None:
    raise ValueError("block_sizes tunes a Pallas kernel; the reference backend takes none")
  return reference.paged_attention(*args, **options)


def _run_gpu(*args, **kwargs):
  from kernels import gpu  # imported lazily: Pallas GPU lowering is heavy

  return gpu.paged_attention(*args, **kwargs)


def _run_tpu(*args, **kwargs):
  from kernels import tpu  # imported lazily, like the GPU backend

  return tpu.paged_attention(*args, **kwargs)


# Concrete backend name (what resolve_backend returns) -> the function that runs it, each
# taking the arguments of paged_attention less ``backend``.
_BACKEND_FNS = {"reference": _run_reference, "gpu": _run_gpu, "tpu": _run_tpu}
