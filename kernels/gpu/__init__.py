"""Pallas GPU backend of ``kernels.paged_attention``: decode and ragged (chunked) prefill.

Which Pallas GPU kernel runs is decided in one place, :func:`kernel_backend`:

* decode (one query per sequence, memory-bound): Pallas Triton (``decode.py``) on every
  GPU; it reads K/V at 94.5-95.4% of an H100's measured bandwidth (docs/benchmarks.md).
  With a ``decode_plan`` (``plan.py``: chunks of about equal tokens cut on the host from
  the real lengths) the planned Triton kernel (``planned.py``) runs instead, for ragged
  batches where one long row would serialise the default kernel; or, when asked for
  (``BlockSizes(decode_kernel="mosaic")``), its Pallas Mosaic GPU twin for Hopper
  (``decode_mosaic.py``: TMA block copies, wgmma), which JAX's deprecation of the Triton
  backend calls for. "auto" keeps Triton until the H200 shows Mosaic at least as fast.
* prefill / chunked prefill / mixed batches (compute-bound): on Hopper (sm_90) the Pallas
  Mosaic GPU kernel (``prefill_mosaic.py``: TMA, wgmma, warp specialisation) for the calls
  it supports and that are prefill-heavy; Pallas Triton (``prefill.py``) everywhere else
  (Ampere, other dtypes or head dims, decode-heavy mixed batches). The Mosaic kernel takes
  head_dim 64 and 128 only; every other head size runs on Triton.
* the cascade's shared part (``cascade.py``: a group's queries against its shared prefix,
  compute-bound like prefill): on Hopper the Mosaic GPU prefill kernel for the dtypes and
  sizes it takes (1.9x the Triton shared kernel at 256 x 32k on the H200, run29,
  docs/benchmarks.md), else the Triton shared kernel.

Head sizes: any multiple of 16 up to 256 (``kernels._validate.head_dim_supported``). One
that is not a power of two (80, 96, 112, 192) runs in tiles of the next power of two,
the extra columns masked inside the kernels: q, K/V and the output keep their real
head_dim in HBM, so no extra byte is read; the tile is as wide as the next power of two's
in shared memory and registers (``tuning.default_block_sizes`` sizes it so).

Both run on CPU in interpret mode, which is how CI checks them: Triton kernels with
``interpret=True``; the Mosaic GPU kernel in GPU interpret mode when asked for explicitly
(``BlockSizes(prefill_kernel="mosaic")``, ``decode_kernel="mosaic"``). Interpret mode
never picks Mosaic by itself.

This package imports nothing from paxcache or flax.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from kernels._validate import (
  _shape_str,
  validate_decode_plan,
  validate_head_dim,
  validate_inputs,
  validate_options,
)
from kernels._write import split_packed_qkv, write_kv
from kernels.gpu import decode_mosaic, prefill_mosaic
from kernels.gpu.decode import paged_decode
from kernels.gpu.decode_mosaic import planned_decode_mosaic
from kernels.gpu.plan import DecodePlan, plan_decode
from kernels.gpu.plan import num_sms as plan_num_sms
from kernels.gpu.planned import planned_decode
from kernels.gpu.prefill import paged_prefill
from kernels.gpu.prefill_mosaic import paged_prefill_mosaic
from kernels.gpu.tuning import (
  CASCADE_SHARED_KERNELS,
  DECODE_KERNELS,
  PREFILL_KERNELS,
  BlockSizes,
  default_block_sizes,
  padded_head_dim,
  planned_block_sizes,
  quant_fused_write,
  rule_block_sizes,
)

__all__ = [
  "BlockSizes",
  "DecodePlan",
  "decode_with_write",
  "default_block_sizes",
  "is_hopper",
  "kernel_backend",
  "padded_head_dim",
  "paged_attention",
  "plan_decode",
  "planned_block_sizes",
  "quant_fused_write",
  "rule_block_sizes",
  "validate_gpu_inputs",
]

# Head dims: kernels._validate.head_dim_supported(d, "gpu"), any multiple of 16 up to 256.
# 64, 128 and 256 were checked on an H100 (experiments/bench/gpu_check.py); 80, 96, 112 and
# 192 (masked tiles of the next power of two) in interpret mode and lowered to Triton IR
# (tests/kernels/test_gpu_head_sizes.py), on a GPU by gpu_check.py --head-dims.
MAX_BLOCK_SIZE = 512
MAX_GROUP = 128  # query heads per KV head in one decode tile


# "auto" takes the Mosaic GPU prefill only when the call averages at least this many query
# rows per sequence: it gives each sequence whole 128-row tiles, so decode-heavy mixed
# batches run better on the Triton kernel, which packs a GQA group's heads into one tile.
MOSAIC_MIN_ROWS_PER_SEQ = 64
# GPU interpret mode runs each warpgroup as a thread blocked in XLA callbacks; XLA's CPU
# thread pool (its size is the core count, or $NPROC) must hold all three at once.
MOSAIC_INTERPRET_MIN_THREADS = 4


def is_hopper(device=None) -> bool:
  """Whether ``device`` (default: JAX's first device) is an sm_90 GPU (H100, H200)."""
  try:
    device = jax.devices()[0] if device is None else device
  except RuntimeError:
    return False
  cc = getattr(device, "compute_capability", None)
  return device.platform == "gpu" and isinstance(cc, str) and cc.split(".")[0] == "9"


def kernel_backend(
  kind: str = "decode",
  *,
  q_dtype=None,
  kv_dtype=None,
  head_dim: int | None = None,
  block_size: int | None = None,
  num_tokens: int | None = None,
  batch: int | None = None,
  group: int | None = None,
  requested: str = "auto",
  interpret: bool = False,
) -> str:
  """The Pallas GPU kernel family that runs a call: ``"triton"`` or ``"mosaic"``.

  The one switch point (module docstring). ``requested`` is ``BlockSizes.decode_kernel``
  for ``kind="decode"`` (a planned decode) and ``BlockSizes.prefill_kernel`` for
  ``"prefill"``; "triton" and "mosaic" are honoured. Decode: ``"auto"`` gives
  ``"triton"`` (the Mosaic GPU decode is taken only when asked for, until it is measured
  at least as fast on the H200); ``"mosaic"`` needs Hopper (or interpreting) and inputs
  ``decode_mosaic.supports`` (one of bf16 / f16 for q and K/V, head_dim 64 or 128, a
  power-of-two block_size >= 8, ``group`` <= 64 query heads per KV head). Prefill:
  ``"auto"`` gives ``"mosaic"`` when not interpreting, the device is Hopper, the Mosaic
  kernel supports the dtypes, head dim and block size, and the call averages at least
  ``MOSAIC_MIN_ROWS_PER_SEQ`` query rows per block-table row (``batch``: sequences,
  padding rows included); ``"triton"`` otherwise. ``kind="cascade"`` (the cascade's shared
  part, ``CascadeBlockSizes.shared_kernel``): as prefill, but ``"auto"`` needs no row count
  (every group's rows are query rows of a whole shared prefix).

  Raises:
    ValueError: an unknown ``kind`` or ``requested``; a Mosaic request without the dtypes
      and sizes (and ``group`` for decode), off Hopper (unless interpreting), or for
      dtypes or sizes the Mosaic kernel does not support.
  """
  kinds = {"decode": DECODE_KERNELS, "prefill": PREFILL_KERNELS, "cascade": CASCADE_SHARED_KERNELS}
  if kind not in kinds:
    raise ValueError(f"kind must be one of {tuple(kinds)}, got {kind!r}")
  allowed = kinds[kind]
  if requested not in allowed:
    raise ValueError(f"requested must be one of {allowed}, got {requested!r}")
  if requested == "triton" or (kind == "decode" and requested == "auto"):
    return "triton"
  if None in (q_dtype, kv_dtype, head_dim, block_size) or (kind == "decode" and group is None):
    need = "q_dtype, kv_dtype, head_dim, block_size" + (" and group" if kind == "decode" else "")
    raise ValueError(f"kernel_backend({kind!r}) with requested={requested!r} needs {need}")
  if requested == "mosaic" and not interpret and not is_hopper():
    raise ValueError(
      f"the Mosaic GPU {kind} needs a Hopper GPU (sm_90: H100, H200) or interpret=True; "
      f"the default device is {jax.devices()[0].device_kind!r}"
    )
  if kind == "decode":
    why = decode_mosaic.unsupported_reason(q_dtype, kv_dtype, head_dim, block_size, group)
    if why is not None:
      raise ValueError(
        f"the Mosaic GPU decode does not support {why}; the Triton planned decode does "
        "(BlockSizes(decode_kernel='triton' or 'auto'))"
      )
    return "mosaic"
  ok = prefill_mosaic.supports(q_dtype, kv_dtype, head_dim, block_size)
  if requested == "mosaic":
    if not ok:
      raise ValueError(
        "the Mosaic GPU prefill supports q and K/V of one dtype in "
        "(8-bit K/V run on the Triton prefill) "
        f"{[jnp.dtype(d).name for d in prefill_mosaic.SUPPORTED_DTYPES]}, head_dim in "
        f"{prefill_mosaic.SUPPORTED_HEAD_DIMS} and a power-of-two block_size >= "
        f"{prefill_mosaic.MIN_BLOCK_SIZE}; got q {jnp.dtype(q_dtype).name}, K/V "
        f"{jnp.dtype(kv_dtype).name}, head_dim {head_dim}, block_size {block_size}"
      )
    return "mosaic"
  heavy = kind == "cascade" or (
    num_tokens is not None and batch and num_tokens >= MOSAIC_MIN_ROWS_PER_SEQ * batch
  )
  return "mosaic" if (ok and heavy and not interpret and is_hopper()) else "triton"


def _mosaic_interpret_params():
  from jax.experimental.pallas import mosaic_gpu as plgpu

  threads = int(os.environ.get("NPROC") or os.cpu_count() or 1)
  if threads < MOSAIC_INTERPRET_MIN_THREADS:
    raise RuntimeError(
      f"GPU interpret mode of the Mosaic GPU kernels needs XLA's CPU thread pool to hold "
      f"{MOSAIC_INTERPRET_MIN_THREADS} threads (one per warpgroup plus the kernel), but "
      f"this machine has {threads}; set NPROC={MOSAIC_INTERPRET_MIN_THREADS} (or more) in "
      "the environment before JAX starts (tests/conftest.py does): XLA reads it once, when "
      "it creates its CPU client, so setting it later does not help and the run deadlocks"
    )
  return plgpu.InterpretGPUParams()


def validate_gpu_inputs(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  cu_q_lens=None,
  *,
  block_sizes=None,
  k_scales=None,
  v_scales=None,
  pads_head_dim=False,
) -> None:
  """Static checks of what the GPU kernels support; raises ValueError before compiling.

  ``pads_head_dim``: whether the kernels that will run mask a head dim padded to a power of
  two (``paged_attention``'s decode, planned decode and prefill do: any multiple of 16 up
  to 256). Other callers (the cascade kernels) keep the head sizes checked before that,
  ``kernels._validate.GPU_UNPADDED_HEAD_DIMS``.
  """
  validate_inputs(q, k_blocks, v_blocks, block_table, lengths, cu_q_lens, k_scales, v_scales)
  num_kv_heads, num_blocks, block_size, _ = k_blocks.shape
  validate_head_dim(q, k_blocks, "gpu" if pads_head_dim else "gpu-unpadded")
  if block_size < 1 or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
    raise ValueError(
      f"the GPU backend supports block_size a power of two in [1, {MAX_BLOCK_SIZE}], got "
      f"block_size {block_size} (k_blocks {_shape_str(k_blocks)})"
    )
  group = q.shape[1] // num_kv_heads
  if group > MAX_GROUP:
    raise ValueError(
      f"the GPU backend supports at most {MAX_GROUP} query heads per KV head, got "
      f"{group} (q {_shape_str(q)}, k_blocks {_shape_str(k_blocks)})"
    )
  if num_kv_heads * num_blocks * block_size >= 2**31:
    raise ValueError(
      f"k_blocks {_shape_str(k_blocks)} has >= 2**31 token slots; the GPU kernels index "
      "slots with int32"
    )
  hp = getattr(block_sizes, "prefill_heads_per_program", None)
  if hp is not None and group % hp:
    raise ValueError(
      f"block_sizes.prefill_heads_per_program {hp} must divide the {group} query heads per "
      f"KV head (q {_shape_str(q)}, k_blocks {_shape_str(k_blocks)})"
    )
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    # Module and name: the TPU backend's tuning class is also called BlockSizes.
    kind = type(block_sizes)
    raise ValueError(
      f"block_sizes for the GPU backend must be a kernels.gpu.BlockSizes, got "
      f"{kind.__module__}.{kind.__qualname__}"
    )


def _call_block_sizes(block_sizes, q, k_blocks, block_table, decode, decode_plan):
  """``block_sizes`` as given, or the defaults of this call: the planned decode's with a
  plan, else the per-shape rule (``default_block_sizes``)."""
  if block_sizes is not None:
    return block_sizes
  if decode_plan is not None:
    return planned_block_sizes(head_dim=q.shape[2], kv_dtype=k_blocks.dtype)
  return default_block_sizes(
    head_dim=q.shape[2],
    kv_dtype=k_blocks.dtype,
    num_tokens=q.shape[0],
    decode=decode,
    batch=block_table.shape[0],
    num_kv_heads=k_blocks.shape[0],
    max_context=block_table.shape[1] * k_blocks.shape[2],
  )


def _refuse_mosaic_without_plan(block_sizes, decode_plan) -> None:
  """A decode call asking for the Mosaic GPU decode, which only runs a planned decode,
  without a plan: ValueError (never a silent switch to the Triton kernel)."""
  if block_sizes.decode_kernel == "mosaic" and decode_plan is None:
    raise ValueError(
      "BlockSizes(decode_kernel='mosaic') runs a planned decode: pass decode_plan="
      "kernels.gpu.plan_decode(lengths, ...), or use decode_kernel='triton' or 'auto'"
    )


def paged_attention(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  cu_q_lens=None,
  *,
  scale=None,
  sliding_window=None,
  logit_soft_cap=None,
  block_sizes=None,
  interpret=False,
  k_scales=None,
  v_scales=None,
  decode_plan=None,
):
  """Paged attention on GPU (Pallas); same arguments and result as kernels.reference.

  Args:
    q: [batch, num_q_heads, head_dim] (decode, ``cu_q_lens=None``) or [num_tokens,
      num_q_heads, head_dim] (ragged prefill / mixed batch).
    k_blocks, v_blocks: [num_kv_heads, num_blocks, block_size, head_dim].
    block_table: i32[batch, max_blocks], -1 where unused.
    lengths: i32[batch], tokens in each sequence's cache including this call's queries.
    cu_q_lens: i32[batch + 1] or None.
    scale, sliding_window, logit_soft_cap: as in kernels.paged_attention.
    block_sizes: a kernels.gpu.BlockSizes, or None for per-shape defaults.
    interpret: run the Pallas kernels in interpret mode (CPU tests).
    k_scales, v_scales: f32[num_kv_heads, num_blocks, block_size] for 8-bit (int8,
      float8_e4m3fn) K/V, else None; the Triton kernels multiply them into the scores and
      the probabilities (8-bit prefill always runs on Triton).
    decode_plan: a :class:`kernels.gpu.plan.DecodePlan` from ``plan_decode`` on this
      call's lengths (decode only), or None for the default split-K decode. With a plan,
      ``block_sizes`` defaults to ``planned_block_sizes`` and its ``decode_num_splits`` is
      not used.

  Returns:
    Array shaped like q, q.dtype.
  """
  validate_gpu_inputs(
    q,
    k_blocks,
    v_blocks,
    block_table,
    lengths,
    cu_q_lens,
    block_sizes=block_sizes,
    k_scales=k_scales,
    v_scales=v_scales,
    pads_head_dim=True,
  )
  scale, sliding_window, logit_soft_cap = validate_options(scale, sliding_window, logit_soft_cap)
  if decode_plan is not None:
    validate_decode_plan(decode_plan, k_blocks, block_table, lengths, cu_q_lens, sliding_window)
  head_dim = q.shape[2]
  decode = cu_q_lens is None
  block_sizes = _call_block_sizes(block_sizes, q, k_blocks, block_table, decode, decode_plan)
  scale = float(head_dim**-0.5) if scale is None else scale
  if (
    q.shape[0] == 0
    or block_table.shape[0] == 0
    or block_table.shape[1] == 0
    or (k_blocks.shape[1] == 0)
  ):
    # Nothing to attend to (or no rows): every row sees no key and is zero.
    return jnp.zeros(q.shape, q.dtype)
  kwargs = dict(
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    block_sizes=block_sizes,
    interpret=interpret,
    k_scales=k_scales,
    v_scales=v_scales,
  )
  if decode:
    _refuse_mosaic_without_plan(block_sizes, decode_plan)
  if decode_plan is not None:
    backend = kernel_backend(
      "decode",
      q_dtype=q.dtype,
      kv_dtype=k_blocks.dtype,
      head_dim=head_dim,
      block_size=k_blocks.shape[2],
      group=q.shape[1] // k_blocks.shape[0],
      requested=block_sizes.decode_kernel,
      interpret=interpret,
    )
    if backend == "mosaic":
      if k_scales is not None:  # 8-bit dtypes are refused above; scales on 16-bit K/V too
        raise ValueError(
          "the Mosaic GPU decode does not read K/V scales; use BlockSizes(decode_kernel="
          "'triton' or 'auto')"
        )
      return planned_decode_mosaic(
        q,
        k_blocks,
        v_blocks,
        block_table,
        lengths,
        decode_plan,
        scale=scale,
        sliding_window=sliding_window,
        logit_soft_cap=logit_soft_cap,
        kv_tile=block_sizes.mosaic_decode_kv_tile,
        num_slots=block_sizes.mosaic_decode_num_slots,
        merge=block_sizes.mosaic_decode_merge,
        num_programs=(
          None
          if block_sizes.mosaic_decode_programs_per_sm is None
          else block_sizes.mosaic_decode_programs_per_sm * plan_num_sms()
        ),
        interpret=_mosaic_interpret_params() if interpret else False,
      )
    return planned_decode(q, k_blocks, v_blocks, block_table, lengths, decode_plan, **kwargs)
  if decode:
    return paged_decode(q, k_blocks, v_blocks, block_table, lengths, **kwargs)
  backend = kernel_backend(
    "prefill",
    q_dtype=q.dtype,
    kv_dtype=k_blocks.dtype,
    head_dim=head_dim,
    block_size=k_blocks.shape[2],
    num_tokens=q.shape[0],
    batch=block_table.shape[0],
    requested=block_sizes.prefill_kernel,
    interpret=interpret,
  )
  if backend == "mosaic":
    if k_scales is not None:  # kernel_backend never picks it for 8-bit K/V; a request can
      raise ValueError(
        "the Mosaic GPU prefill does not read 8-bit K/V; use BlockSizes(prefill_kernel="
        "'triton' or 'auto')"
      )
    return paged_prefill_mosaic(
      q,
      k_blocks,
      v_blocks,
      block_table,
      lengths,
      cu_q_lens,
      scale=scale,
      sliding_window=sliding_window,
      logit_soft_cap=logit_soft_cap,
      kv_tile=block_sizes.mosaic_kv_tile,
      num_slots=block_sizes.mosaic_num_slots,
      tiles_per_block=block_sizes.mosaic_tiles_per_block,
      interpret=_mosaic_interpret_params() if interpret else False,
    )
  return paged_prefill(q, k_blocks, v_blocks, block_table, lengths, cu_q_lens, **kwargs)


def decode_with_write(
  q,
  k_blocks,
  v_blocks,
  k_new,
  v_new,
  slot_mapping,
  block_table,
  lengths,
  *,
  scale=None,
  sliding_window=None,
  logit_soft_cap=None,
  block_sizes=None,
  interpret=False,
  decode_plan=None,
  k_scales=None,
  v_scales=None,
  q_dtype=None,
):
  """Decode attention with the step's K/V written by the decode kernel itself (no scatter
  before it): ``kernels.write_and_decode`` and ``write_and_decode_packed`` on the GPU
  backend, which check the arguments.

  16-bit or float32 pools (8-bit: below) in the plain layout; the split-K decode, or with
  ``decode_plan`` the planned one (a Mosaic GPU planned decode, which only a
  ``block_sizes`` asks for, runs after ``kernels.write_kv`` instead). With ``k_new`` and
  ``v_new`` None, ``q`` is a packed ``[batch, num_q_heads + 2 * num_kv_heads, head_dim]``
  q/k/v in the pools' dtype (``kernels.write_and_decode_packed``), read by the kernel as it
  is. Returns ``(out, k_blocks, v_blocks)``. 8-bit pools (``k_scales``, ``v_scales``;
  packed only): the kernel quantizes the float rows it writes, q is cast to ``q_dtype``
  (None: the packed array's), and the scale pools come back too: ``(out, k_blocks,
  v_blocks, k_scales, v_scales)``.
  """
  packed_qkv = k_new is None
  qkv = q
  quantized = k_scales is not None
  if packed_qkv:
    hkv = k_blocks.shape[0]
    q_type = q.dtype if q_dtype is None else q_dtype
    q = jax.ShapeDtypeStruct((q.shape[0], q.shape[1] - 2 * hkv, q.shape[2]), q_type)
  validate_gpu_inputs(
    q, k_blocks, v_blocks, block_table, lengths, block_sizes=block_sizes,
    k_scales=k_scales, v_scales=v_scales, pads_head_dim=True,
  )  # fmt: skip
  scale, sliding_window, logit_soft_cap = validate_options(scale, sliding_window, logit_soft_cap)
  head_dim = q.shape[2]
  if decode_plan is not None:
    validate_decode_plan(decode_plan, k_blocks, block_table, lengths, None, sliding_window)
  block_sizes = _call_block_sizes(block_sizes, q, k_blocks, block_table, True, decode_plan)
  scale = float(head_dim**-0.5) if scale is None else scale
  pools = (k_blocks, v_blocks) + ((k_scales, v_scales) if quantized else ())
  if q.shape[0] == 0 or block_table.shape[1] == 0 or k_blocks.shape[1] == 0:
    # No rows, or nothing to attend to or write into: zeros, the pools as they were.
    return jnp.zeros(q.shape, q.dtype), *pools
  fused = dict(k_new=k_new, v_new=v_new, new_slots=slot_mapping, packed_qkv=packed_qkv)
  if quantized:
    fused.update(k_scales=k_scales, v_scales=v_scales, q_dtype=q_dtype)
  kwargs = dict(
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    block_sizes=block_sizes,
    interpret=interpret,
  )
  if decode_plan is None:
    _refuse_mosaic_without_plan(block_sizes, decode_plan)
    return paged_decode(qkv, k_blocks, v_blocks, block_table, lengths, **fused, **kwargs)
  backend = kernel_backend(
    "decode",
    q_dtype=q.dtype,
    kv_dtype=k_blocks.dtype,
    head_dim=head_dim,
    block_size=k_blocks.shape[2],
    group=q.shape[1] // k_blocks.shape[0],
    requested=block_sizes.decode_kernel,
    interpret=interpret,
  )
  if backend == "mosaic":  # (16-bit pools only: kernel_backend refuses it for 8-bit K/V)
    if packed_qkv:
      q, k_new, v_new = split_packed_qkv(qkv, k_blocks.shape[0])
    k_blocks, v_blocks = write_kv(k_blocks, v_blocks, k_new, v_new, slot_mapping)
    out = paged_attention(
      q, k_blocks, v_blocks, block_table, lengths, decode_plan=decode_plan, **kwargs
    )
    return out, k_blocks, v_blocks
  return planned_decode(
    qkv, k_blocks, v_blocks, block_table, lengths, decode_plan, **fused, **kwargs
  )
