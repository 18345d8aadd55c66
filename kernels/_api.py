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
import jax.numpy as jnp

from kernels import _layout, _write, reference
from kernels._quant import is_quantized
from kernels._validate import (
  check_arrays,
  validate_decode_plan,
  validate_inputs,
  validate_options,
  validate_padded_width,
  validate_scales,
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
  (q, k_blocks, v_blocks, scale, sliding_window, logit_soft_cap, chosen, extra, real_head_dim) = (
    _checked_call(
      q,
      k_blocks,
      v_blocks,
      block_table,
      lengths,
      cu_q_lens,
      scale=scale,
      sliding_window=sliding_window,
      logit_soft_cap=logit_soft_cap,
      backend=backend,
      interpret=interpret,
      k_scales=k_scales,
      v_scales=v_scales,
      decode_plan=decode_plan,
      lane_dense=lane_dense,
      lane_padded=lane_padded,
    )
  )
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


def _checked_call(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  cu_q_lens=None,
  *,
  scale: float | None = None,
  sliding_window: int | None = None,
  logit_soft_cap: float | None = None,
  backend: str = "auto",
  interpret: bool = False,
  k_scales=None,
  v_scales=None,
  decode_plan: Any = None,
  lane_dense: bool = False,
  lane_padded: bool = False,
  block_sizes: Any = None,
  backend_checks: bool = False,
):
  """Every check :func:`paged_attention` makes before it runs a backend (ValueError or
  BackendUnavailableError), and what it then runs: ``(q, k_blocks, v_blocks, scale,
  sliding_window, logit_soft_cap, backend, backend kwargs, real head_dim or None)``.
  ``backend_checks``: also the backend's own static checks (which it makes itself when it
  runs): the head sizes, block sizes and groups its kernels take."""
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
  if backend_checks:
    backend_static_checks(
      chosen, q, k_blocks, v_blocks, block_table, lengths, cu_q_lens, block_sizes=block_sizes,
      k_scales=k_scales, v_scales=v_scales, pads_head_dim=True,
      lane_dense=extra.get("lane_dense", False),
    )  # fmt: skip
  return q, k_blocks, v_blocks, scale, sliding_window, logit_soft_cap, chosen, extra, real_head_dim


def backend_static_checks(
  chosen, q, k_blocks, v_blocks, block_table, lengths, cu_q_lens, *, block_sizes, k_scales,
  v_scales, pads_head_dim, lane_dense=False,
):  # fmt: skip
  """The static checks the ``chosen`` backend makes itself before it compiles (on the
  arguments as it gets them: the pools after :func:`layout_for`, q padded): the GPU's
  head sizes, pool block sizes and groups, the TPU's tiles; the reference's refusal of
  ``block_sizes``. A tuning object's own settings (``block_sizes``' fields) are the
  backend's to refuse when it runs."""
  if chosen == "reference" and block_sizes is not None:
    raise ValueError("block_sizes tunes a Pallas kernel; the reference backend takes none")
  if chosen == "gpu":
    from kernels import gpu  # imported lazily, as the backend is

    gpu.validate_gpu_inputs(
      q, k_blocks, v_blocks, block_table, lengths, cu_q_lens, block_sizes=block_sizes,
      k_scales=k_scales, v_scales=v_scales, pads_head_dim=pads_head_dim,
    )  # fmt: skip
  elif chosen == "tpu":
    from kernels.tpu import _config

    if block_sizes is not None and not isinstance(block_sizes, _config.BlockSizes):
      raise ValueError(
        f"block_sizes must be a kernels.tpu.BlockSizes or None, got {type(block_sizes)}"
      )
    _config.check_shapes(q, k_blocks, block_sizes, lane_dense=lane_dense)


def check_paged_attention(
  q, k_blocks, v_blocks, block_table, lengths, cu_q_lens=None, **options
) -> None:
  """Raises what :func:`paged_attention` with these arguments would raise before it
  computes anything (its shape, dtype, option and host-value checks, and the backend's
  static rules: head sizes, the pool's block size, tiles), and computes nothing: for a
  caller that changes state first only if the call will be taken, such as a layer whose
  cache write donates the pools (``paxcache.nn.PagedAttention``). ``k_blocks``/
  ``v_blocks`` may be the pools before that write (same shapes and dtypes). ``options``:
  :func:`paged_attention`'s keyword arguments; a ``block_sizes`` object's own settings
  are not checked (the backend refuses a bad one when it runs). Host (NumPy) metadata is
  checked by value, as by the call itself; a lane-dense pool is seen abstractly (no copy)."""
  check_arrays("kernels.check_paged_attention", q=q, k_blocks=k_blocks, v_blocks=v_blocks)
  run_abstract(  # (it takes the scales out of options before the lambda runs)
    lambda q, k, v, scales: _checked_call(
      q, k, v, block_table, lengths, cu_q_lens, **options, **scales, backend_checks=True
    ),
    q, k_blocks, v_blocks, options,
  )  # fmt: skip


def run_abstract(check, q, k_blocks, v_blocks, options: dict) -> None:
  """Runs ``check(q, k_blocks, v_blocks, scales)``, the scales taken out of ``options``.
  A lane-dense pool's check would unpack (copy) the pools outside jit, so that one runs
  on abstract values (``jax.eval_shape``: shapes and dtypes only), unless an array's dtype
  is one eval_shape would narrow (float64 without x64), which the call itself refuses."""
  scales = {k: options.pop(k) for k in ("k_scales", "v_scales") if options.get(k) is not None}
  arrays = (q, k_blocks, v_blocks, *scales.values())
  narrowed = any(
    hasattr(x, "dtype") and jnp.dtype(x.dtype) != jax.dtypes.canonicalize_dtype(x.dtype)
    for x in arrays
  )
  if not options.get("lane_dense") or narrowed:
    check(q, k_blocks, v_blocks, scales)
    return

  def run(q, k, v, scales):
    check(q, k, v, scales)  # returns nothing: eval_shape's output is the empty tree

  jax.eval_shape(run, q, k_blocks, v_blocks, scales)


def write_and_decode(
  q: jax.Array,
  k_blocks: jax.Array,
  v_blocks: jax.Array,
  k_new: jax.Array,
  v_new: jax.Array,
  slot_mapping: jax.Array,
  block_table: jax.Array,
  lengths: jax.Array,
  *,
  scale: float | None = None,
  sliding_window: int | None = None,
  logit_soft_cap: float | None = None,
  backend: str = "auto",
  block_sizes: Any = None,
  interpret: bool = False,
  decode_plan: Any = None,
):
  """A decode step's K/V write and its attention: :func:`kernels.write_kv`, then
  :func:`paged_attention` with ``cu_q_lens=None``, as one call.

  On the GPU backend one kernel does both: the decode kernel takes each row's last key
  from ``k_new``/``v_new`` instead of the pool and stores the row into its slot (no scatter
  before it, so two fewer launches per layer and step). The other backends run the two
  calls. Same result either way (up to float rounding), and the same pools.

  Args:
    q: ``[batch, num_q_heads, head_dim]``, one query per sequence.
    k_blocks, v_blocks: ``[num_kv_heads, num_blocks, block_size, head_dim]``, 16-bit or
      float32, in the plain layout (8-bit, lane-dense and lane-padded pools: the two calls
      with their own flags and scales).
    k_new, v_new: ``[batch, num_kv_heads, head_dim]``: each row's new K/V (cast to the
      pools' dtype).
    slot_mapping: ``i32[batch]``: row b's slot, which must be the slot of its position
      ``lengths[b] - 1`` (the step's token; the block table already holds its block), or
      ``-1`` for a row that writes nothing (padding: it attends over the pool as it is).
      NumPy arguments are checked (ValueError); device ones are trusted.
    block_table, lengths: as in :func:`paged_attention`; ``lengths`` count the new token.
    scale, sliding_window, logit_soft_cap, backend, block_sizes, interpret, decode_plan: as
      in :func:`paged_attention` (the GPU backend's planned decode writes the rows itself
      too; the reference checks a plan and ignores it; the TPU backend refuses one).

  Returns:
    ``(out, k_blocks, v_blocks)``: ``out`` shaped like ``q``, and the pools with the new
    rows written (in place under jit when donated).
  """
  _check_fused_args(q, k_blocks, v_blocks, k_new, v_new, slot_mapping, block_table, lengths)
  chosen = resolve_backend(backend, interpret=interpret)
  options = dict(
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    block_sizes=block_sizes,
    interpret=interpret,
    decode_plan=decode_plan,
  )
  if chosen == "gpu":
    from kernels import gpu  # imported lazily, as in _run_gpu

    return gpu.decode_with_write(
      q, k_blocks, v_blocks, k_new, v_new, slot_mapping, block_table, lengths, **options
    )
  k_blocks, v_blocks = _write.write_kv(k_blocks, v_blocks, k_new, v_new, slot_mapping)
  out = paged_attention(q, k_blocks, v_blocks, block_table, lengths, backend=chosen, **options)
  return out, k_blocks, v_blocks


def write_and_decode_packed(
  qkv: jax.Array,
  k_blocks: jax.Array,
  v_blocks: jax.Array,
  slot_mapping: jax.Array,
  block_table: jax.Array,
  lengths: jax.Array,
  *,
  scale: float | None = None,
  sliding_window: int | None = None,
  logit_soft_cap: float | None = None,
  backend: str = "auto",
  block_sizes: Any = None,
  interpret: bool = False,
  decode_plan: Any = None,
  k_scales: jax.Array | None = None,
  v_scales: jax.Array | None = None,
  q_dtype: Any = None,
):
  """:func:`write_and_decode` with the step's queries, K and V rows in one array.

  ``qkv`` is ``[batch, num_q_heads + 2 * num_kv_heads, head_dim]``: each row's query heads,
  then its K rows, then its V rows (``num_kv_heads`` from the pools), as a model's one q/k/v
  projection makes them (RoPE applied). The GPU decode kernel reads all three from it, so
  nothing splits it into three arrays before the call (each split would be a kernel of
  its own); over 16- or 32-bit pools it must be in the pools' dtype (``write_and_decode``
  casts q, k and v to it; ValueError otherwise, on every backend). The other backends split
  it and run :func:`write_and_decode`. The keyword arguments are :func:`write_and_decode`'s.
  Returns ``(out [batch, num_q_heads, head_dim], k_blocks, v_blocks)``.

  8-bit pools (int8, float8_e4m3fn; plain layout) take their scale pools ``k_scales`` and
  ``v_scales`` (``f32[num_kv_heads, num_blocks, block_size]``) and a ``qkv`` in float32,
  bfloat16 or float16: each new K and V row is quantized as :func:`kernels.write_kv_quantized` does
  (on the GPU backend by the decode kernel itself, which stores the rows and their scales:
  no scatter), q is cast to ``q_dtype`` (None: ``qkv``'s dtype; e.g. bfloat16 queries in a
  float32 ``qkv`` whose K/V rows are quantized from float32), and the result is
  ``(out, k_blocks, v_blocks, k_scales, v_scales)`` with ``out`` in ``q_dtype``. The other
  backends run ``write_kv_quantized`` then :func:`paged_attention` with the scales.
  """
  num_kv_heads = k_blocks.shape[0] if k_blocks.ndim == 4 else 0
  if qkv.ndim != 3 or qkv.shape[1] < 3 * num_kv_heads or num_kv_heads == 0:
    raise ValueError(
      "kernels.write_and_decode_packed: qkv must be [batch, num_q_heads + 2 * num_kv_heads, "
      f"head_dim] and the pools [num_kv_heads, num_blocks, block_size, head_dim], got qkv "
      f"{tuple(qkv.shape)} and k_blocks {tuple(k_blocks.shape)}"
    )
  hq = qkv.shape[1] - 2 * num_kv_heads
  quantized = is_quantized(k_blocks.dtype)
  if quantized:
    _check_quantized_packed(qkv, k_blocks, k_scales, v_scales, q_dtype)
    q_dtype = jnp.dtype(qkv.dtype if q_dtype is None else q_dtype)
  else:
    if k_scales is not None or v_scales is not None or q_dtype is not None:
      raise ValueError(
        "kernels.write_and_decode_packed: k_scales, v_scales and q_dtype are for 8-bit "
        f"pools, got {jnp.dtype(k_blocks.dtype).name} ones"
      )
    if qkv.dtype != k_blocks.dtype:
      raise ValueError(
        f"kernels.write_and_decode_packed takes qkv in the pools' dtype "
        f"({jnp.dtype(k_blocks.dtype).name}), got {jnp.dtype(qkv.dtype).name}"
      )
  options = dict(
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    block_sizes=block_sizes,
    interpret=interpret,
    decode_plan=decode_plan,
  )
  chosen = resolve_backend(backend, interpret=interpret)
  part = lambda heads, dtype: jax.ShapeDtypeStruct((qkv.shape[0], heads, qkv.shape[2]), dtype)  # noqa: E731
  if quantized:  # write_and_decode's checks (every backend), on the shapes of the three parts
    _check_fused_args(
      part(hq, q_dtype), k_blocks, v_blocks, part(num_kv_heads, qkv.dtype),
      part(num_kv_heads, qkv.dtype), slot_mapping, block_table, lengths, k_scales=k_scales,
      v_scales=v_scales,
    )  # fmt: skip
  if chosen != "gpu":
    q, k_new, v_new = _write.split_packed_qkv(qkv, num_kv_heads)
    if not quantized:
      return write_and_decode(
        q, k_blocks, v_blocks, k_new, v_new, slot_mapping, block_table, lengths,
        backend=backend, **options,
      )  # fmt: skip
    pools = _write.write_kv_quantized(
      k_blocks, v_blocks, k_scales, v_scales, k_new, v_new, slot_mapping
    )
    out = paged_attention(
      q.astype(q_dtype), *pools[:2], block_table, lengths, backend=chosen,
      k_scales=pools[2], v_scales=pools[3], **options,
    )  # fmt: skip
    return out, *pools
  if not quantized:  # write_and_decode's checks, on the shapes of the three parts
    _check_fused_args(
      part(hq, qkv.dtype), k_blocks, v_blocks, part(num_kv_heads, qkv.dtype),
      part(num_kv_heads, qkv.dtype), slot_mapping, block_table, lengths,
    )  # fmt: skip
  from kernels import gpu  # imported lazily, as in _run_gpu

  scales = dict(k_scales=k_scales, v_scales=v_scales, q_dtype=q_dtype) if quantized else {}
  return gpu.decode_with_write(
    qkv, k_blocks, v_blocks, None, None, slot_mapping, block_table, lengths, **options, **scales
  )


def _check_quantized_packed(qkv, k_blocks, k_scales, v_scales, q_dtype) -> None:
  """What :func:`write_and_decode_packed` needs besides the shapes over 8-bit pools: the
  scale pools (checked as every backend checks them), a float ``qkv`` and a float
  ``q_dtype``; ValueError naming the one that is not."""
  if k_scales is None or v_scales is None:
    raise ValueError(
      f"kernels.write_and_decode_packed: 8-bit ({jnp.dtype(k_blocks.dtype).name}) pools take "
      "k_scales and v_scales"
    )
  validate_scales(k_blocks, k_scales, v_scales)
  floats = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))
  if jnp.dtype(qkv.dtype) not in floats:
    raise ValueError(
      "kernels.write_and_decode_packed: over 8-bit pools qkv must be float32, bfloat16 or "
      f"float16 (its rows are quantized), got {jnp.dtype(qkv.dtype).name}"
    )
  try:
    q_ok = q_dtype is None or jnp.dtype(q_dtype) in floats
  except TypeError:
    q_ok = False
  if not q_ok:
    raise ValueError(
      f"kernels.write_and_decode_packed: q_dtype must be float32, bfloat16 or float16, got "
      f"{q_dtype!r}"
    )


def _check_fused_args(
  q, k_blocks, v_blocks, k_new, v_new, slot_mapping, block_table, lengths, *, k_scales=None,
  v_scales=None,
):  # fmt: skip
  # 8-bit pools: write_and_decode_packed only (its own checks first), with their scales.
  if is_quantized(k_blocks.dtype) and k_scales is None:
    raise ValueError(
      f"kernels.write_and_decode takes 16-bit or float32 pools, got "
      f"{jnp.dtype(k_blocks.dtype).name}: for 8-bit pools use "
      "kernels.write_and_decode_packed(..., k_scales=, v_scales=), or write them with "
      "kernels.write_kv_quantized and read them with kernels.paged_attention(..., k_scales=, "
      "v_scales=)"
    )
  if q.ndim != 3 or k_new.ndim != 3 or k_new.shape[0] != q.shape[0]:
    raise ValueError(
      "kernels.write_and_decode: q must be [batch, num_q_heads, head_dim] and k_new/v_new "
      f"[batch, num_kv_heads, head_dim] for the same batch, got q {tuple(q.shape)} and "
      f"k_new {tuple(k_new.shape)}"
    )
  _write.check_pools(k_blocks, v_blocks)
  if k_blocks.shape[3] != q.shape[2]:
    raise ValueError(
      f"kernels.write_and_decode: the pools' rows are {k_blocks.shape[3]} wide but q's "
      f"head_dim is {q.shape[2]}; it takes plain pools [num_kv_heads, num_blocks, "
      "block_size, head_dim] (a lane-dense or lane-padded pool: kernels.write_kv(..., "
      "lane_dense= / lane_padded=True), then kernels.paged_attention with the same flag)"
    )
  _write.check_rows(k_new, v_new, slot_mapping, k_blocks)
  validate_inputs(q, k_blocks, v_blocks, block_table, lengths, None, k_scales, v_scales)
  # Each row's slot must be that of its position lengths - 1 (or -1): the fused GPU write
  # stores the row there and the attention reads it as that key.
  _write.check_host_slots_match_table(
    slot_mapping, block_table, lengths, None, k_blocks.shape[2], caller="kernels.write_and_decode: "
  )


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
