"""Correctness of the Pallas GPU kernels on the GPU at benchmark shapes, against kernels.reference.

Fresh random inputs per case; unused blocks and the slots past each length are NaN;
block tables shuffled. Each case reports the relative error
``|out - ref|_2 / |ref|_2`` (the reference accumulates in float32 at HIGHEST
precision) and fails on any NaN or an error over the bound of its dtype, the same bound
the interpret-mode tests use (``gpu_kernel_vs_reference_rel_l2`` in kernels/testing.py).
Writes ``OUT/check.jsonl``; exits 1 if any case fails.

  python -m experiments.bench.gpu_check --out /tmp/check [--smoke]

With ``--head-dims`` it checks head sizes instead (issue 15 item 3): for each head_dim,
the split-K decode, the planned decode and a mixed chunked prefill once against the
reference, then the default decode timed at one shape (``HEAD_DIM_DECODE_SHAPE``,
bf16) with its read rate over the real K/V bytes; prints a table and writes
``OUT/head_dims.jsonl``. 64, 128 and 256 beside the others give the power-of-two
baseline the padded sizes (80, 96, 112 in 128-wide tiles, 192 in 256-wide) compare to:

  python -m experiments.bench.gpu_check --head-dims 64,80,96,112,128,192,256 --out /tmp/hd
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments._timing import time_calls
from experiments.bench import _flags
from experiments.bench._gpu_common import env_info, make_paged, write_jsonl
from kernels import gpu, reference
from kernels.gpu.prefill_mosaic import paged_prefill_mosaic
from kernels.testing import rel_l2_error, tolerance


def decode_case(
  rng,
  *,
  batch,
  context,
  block_size,
  hq=32,
  hkv=8,
  d=128,
  dtype=jnp.bfloat16,
  lengths="full",
  window=None,
  cap=None,
  block_sizes=None,
  interpret=False,
):
  lens = _case_lengths(rng, batch, context, block_size, lengths)
  kb, vb, table, lens, _, _ = make_paged(
    rng,
    batch=batch,
    context=context,
    block_size=block_size,
    num_kv_heads=hkv,
    head_dim=d,
    dtype=dtype,
    lengths=lens,
    extra_blocks=7,
  )
  q = jax.random.normal(
    jax.random.key(int(rng.integers(1 << 30))), (batch, hq, d), jnp.float32
  ).astype(dtype)
  kw = dict(scale=d**-0.5, sliding_window=window, logit_soft_cap=cap)
  out = gpu.paged_attention(
    q, kb, vb, table, lens, block_sizes=block_sizes, interpret=interpret, **kw
  )
  ref = reference.paged_attention(q, kb, vb, table, lens, **kw)
  return out, ref


def write_decode_case(
  rng,
  *,
  batch,
  context,
  block_size,
  hq=32,
  hkv=8,
  d=128,
  dtype=jnp.bfloat16,
  lengths="full",
  window=None,
  cap=None,
  block_sizes=None,
  interpret=False,
  planned=False,
  packed=False,
  kv_dtype=None,
):
  """``kernels.write_and_decode`` on the GPU backend (the decode kernel writes the step's
  K/V itself) against ``kernels.write_kv`` then the reference. The slot each row writes is
  NaN before the call (a kernel that read its last key back from the pool would show it);
  the returned pools must equal the scatter's exactly (AssertionError otherwise). With
  ``planned``, the planned decode by ``plan_decode`` of the lengths; with ``packed``,
  ``kernels.write_and_decode_packed`` (q, K and V rows in one array).

  With ``kv_dtype`` (int8 or float8_e4m3fn; packed only) the pools are 8-bit with scale
  pools (``kernels.quantize`` of the float pools, so every stale slot holds a NaN scale):
  the kernel quantizes each new row itself, and its pools and scale pools must equal
  ``kernels.write_kv_quantized``'s exactly (NaN where it has NaN); the output is compared
  with the reference over the pools it wrote."""
  import kernels

  if kv_dtype is not None:
    return _write_decode_8bit(
      rng, batch=batch, context=context, block_size=block_size, hq=hq, hkv=hkv, d=d,
      dtype=dtype, lengths=lengths, kv_dtype=kv_dtype, planned=planned,
      interpret=interpret, block_sizes=block_sizes,
    )  # fmt: skip

  kb, vb, table, lens, slots, q, k_new, v_new = _write_case_inputs(
    rng, batch, context, block_size, hq, hkv, d, dtype, dtype, lengths
  )
  lens_np = np.asarray(lens)
  kw = dict(scale=d**-0.5, sliding_window=window, logit_soft_cap=cap)
  plan = gpu.plan_decode(lens_np, block_size, hkv, sliding_window=window) if planned else None
  kw_ref, vw_ref = kernels.write_kv(kb, vb, k_new, v_new, jnp.asarray(slots))
  ref = reference.paged_attention(q, kw_ref, vw_ref, table, lens, **kw)
  opts = dict(backend="gpu", block_sizes=block_sizes, interpret=interpret, **kw)
  if packed:
    out, kw_got, vw_got = jax.jit(
      lambda qkv, *a, plan: kernels.write_and_decode_packed(qkv, *a, decode_plan=plan, **opts)
    )(
      jnp.concatenate([q, k_new, v_new], axis=1), kb, vb, jnp.asarray(slots), table, lens,
      plan=plan,
    )  # fmt: skip
  else:
    out, kw_got, vw_got = jax.jit(
      lambda *a, plan: kernels.write_and_decode(*a, decode_plan=plan, **opts)
    )(q, kb, vb, k_new, v_new, jnp.asarray(slots), table, lens, plan=plan)
  for name, got, want in (("k", kw_got, kw_ref), ("v", vw_got, vw_ref)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    wrong = int((~((got == want) | (np.isnan(got) & np.isnan(want)))).sum())
    assert wrong == 0, f"{wrong} {name} pool values differ from kernels.write_kv's"
  kernel = "triton-" + ("planned-" if planned else "") + ("packed-" if packed else "") + "write"
  return out, ref, {"kernel": kernel}


def _write_decode_8bit(
  rng,
  *,
  batch,
  context,
  block_size,
  hq,
  hkv,
  d,
  dtype,
  lengths,
  kv_dtype,
  planned,
  interpret,
  block_sizes,
):
  """:func:`write_decode_case` over 8-bit pools (``kv_dtype``), packed q/k/v."""
  import kernels

  kf, vf, table, lens, slots, q, k_new, v_new = _write_case_inputs(
    rng, batch, context, block_size, hq, hkv, d, jnp.float32, dtype, lengths
  )
  kq, ks = kernels.quantize(kf, kv_dtype)  # NaN rows: NaN scales (every stale slot)
  vq, vs = kernels.quantize(vf, kv_dtype)
  want = kernels.write_kv_quantized(kq, vq, ks, vs, k_new, v_new, jnp.asarray(slots))
  plan = gpu.plan_decode(np.asarray(lens), block_size, hkv) if planned else None
  opts = dict(backend="gpu", block_sizes=block_sizes, interpret=interpret, scale=d**-0.5)

  def call(qkv, k, v, ks, vs, plan):
    return kernels.write_and_decode_packed(
      qkv, k, v, jnp.asarray(slots), table, lens, k_scales=ks, v_scales=vs, decode_plan=plan,
      **opts,
    )  # fmt: skip

  out, *got = jax.jit(call)(jnp.concatenate([q, k_new, v_new], axis=1), kq, vq, ks, vs, plan)
  for name, g, w in zip(("k", "v", "k_scale", "v_scale"), got, want, strict=True):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    wrong = int((~((g == w) | (np.isnan(g) & np.isnan(w)))).sum())
    assert wrong == 0, f"{wrong} {name} values differ from kernels.write_kv_quantized's"
  ref = reference.paged_attention(
    q, got[0], got[1], table, lens, k_scales=got[2], v_scales=got[3], scale=d**-0.5
  )
  kind = jnp.dtype(kv_dtype).name
  return out, ref, {"kernel": "triton-" + ("planned-" if planned else "") + f"packed-write-{kind}"}


def _case_lengths(rng, batch, context, block_size, lengths):
  """Row lengths of a write+decode case: all ``context``, or a mix (0, 1, a non-multiple of
  the block size, random, full)."""
  if lengths == "full":
    return np.full((batch,), context, np.int32)
  lens = rng.integers(1, context + 1, size=batch).astype(np.int32)
  special = [0, 1, block_size + 1, context - 1, context]
  lens[: min(batch, len(special))] = special[: min(batch, len(special))]
  return lens


def _write_case_inputs(rng, batch, context, block_size, hq, hkv, d, pool_dtype, dtype, lengths):
  """A write+decode case's pools (``pool_dtype``, blocks scattered, NaN past each length and
  in the slot each row writes: a kernel reading its last key back from the pool would show
  it), block table, lengths, those slots (-1 for an empty row) and its q, k and v rows."""
  lens = _case_lengths(rng, batch, context, block_size, lengths)
  kb, vb, table, lens, _, _ = make_paged(
    rng, batch=batch, context=context, block_size=block_size, num_kv_heads=hkv, head_dim=d,
    dtype=pool_dtype, lengths=lens, extra_blocks=7,
  )  # fmt: skip
  lens_np, table_np = np.asarray(lens), np.asarray(table)
  last = np.maximum(lens_np - 1, 0)
  blocks = table_np[np.arange(batch), last // block_size]
  slots = np.where(lens_np > 0, blocks * block_size + last % block_size, -1).astype(np.int32)
  flat = slots[slots >= 0]
  kb = kb.reshape(hkv, -1, d).at[:, flat].set(jnp.nan).reshape(kb.shape)
  vb = vb.reshape(hkv, -1, d).at[:, flat].set(jnp.nan).reshape(vb.shape)
  keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3)
  q, k_new, v_new = (
    jax.random.normal(key, (batch, h, d), jnp.float32).astype(dtype)
    for key, h in zip(keys, (hq, hkv, hkv), strict=True)
  )
  return kb, vb, table, lens, slots, q, k_new, v_new


def prefill_case(
  rng,
  *,
  q_lens,
  ctx_lens,
  block_size,
  hq=32,
  hkv=8,
  d=128,
  dtype=jnp.bfloat16,
  pad_rows=5,
  window=None,
  cap=None,
  block_sizes=None,
  interpret=False,
  pv_via_smem=None,
):
  q_lens = np.asarray(q_lens, np.int32)
  lens = np.asarray(ctx_lens, np.int32) + q_lens
  batch = len(q_lens)
  context = int(lens.max())
  kb, vb, table, lens, _, _ = make_paged(
    rng,
    batch=batch,
    context=context,
    block_size=block_size,
    num_kv_heads=hkv,
    head_dim=d,
    dtype=dtype,
    lengths=lens,
    extra_blocks=5,
  )
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
  num_tokens = int(q_lens.sum()) + pad_rows
  q = jax.random.normal(
    jax.random.key(int(rng.integers(1 << 30))), (num_tokens, hq, d), jnp.float32
  ).astype(dtype)
  kw = dict(scale=d**-0.5, sliding_window=window, logit_soft_cap=cap)
  if pv_via_smem is None:
    out = gpu.paged_attention(
      q, kb, vb, table, lens, cu, block_sizes=block_sizes, interpret=interpret, **kw
    )
  else:  # the Mosaic kernel directly, with the P V variant interpret mode runs
    out = paged_prefill_mosaic(q, kb, vb, table, lens, cu, pv_via_smem=pv_via_smem, **kw)
  ref = reference.paged_attention(q, kb, vb, table, lens, cu, rows_per_chunk=32, **kw)
  kernel = (
    "mosaic"
    if pv_via_smem is not None
    else gpu.kernel_backend(
      "prefill",
      q_dtype=q.dtype,
      kv_dtype=kb.dtype,
      head_dim=d,
      block_size=block_size,
      num_tokens=num_tokens,
      batch=batch,
      requested=(block_sizes or gpu.BlockSizes()).prefill_kernel,
      interpret=interpret,
    )
  )
  return out, ref, {"kernel": kernel}


def cases(smoke: bool):
  """(name, fn) pairs; smoke shrinks every shape so the script itself runs on CPU."""
  if smoke:
    s = dict(hq=4, hkv=2, d=64)
    yield (
      "decode smoke",
      lambda r: decode_case(
        r, batch=3, context=40, block_size=8, lengths="mixed", interpret=True, **s
      ),
    )
    for planned, packed in ((False, False), (True, False), (False, True), (True, True)):
      yield (
        "write+decode smoke" + (" planned" if planned else "") + (" packed" if packed else ""),
        lambda r, p=planned, k=packed: write_decode_case(
          r, batch=3, context=40, block_size=8, lengths="mixed", interpret=True, planned=p,
          packed=k, **s,
        ),
      )  # fmt: skip
    for kv in ("int8", "float8_e4m3fn"):
      for planned in (False, True):
        yield (
          f"write+decode smoke packed {kv}" + (" planned" if planned else ""),
          lambda r, p=planned, kv=kv: write_decode_case(
            r, batch=3, context=40, block_size=8, lengths="mixed", interpret=True, planned=p,
            packed=True, kv_dtype=kv, **s,
          ),
        )  # fmt: skip
    yield (
      "prefill smoke",
      lambda r: prefill_case(
        r, q_lens=[5, 1, 9], ctx_lens=[3, 20, 0], block_size=8, interpret=True, **s
      ),
    )
    return
  for bs in (8, 16, 32, 64, 128, 256):
    yield (
      f"decode 8x4096 bf16 bs{bs} full",
      lambda r, bs=bs: decode_case(r, batch=8, context=4096, block_size=bs),
    )
    yield (
      f"decode 32x4096 bf16 bs{bs} mixed lengths",
      lambda r, bs=bs: decode_case(r, batch=32, context=4096, block_size=bs, lengths="mixed"),
    )
  # The decode kernel writing the step's K/V (kernels.write_and_decode): the engine's shapes
  # at head_dim 64 and 128, split-K (8 x 4096), large blocks, a window and a soft cap.
  for batch, context, bs, d, lens in (
    (64, 512, 16, 64, "full"),
    (256, 1024, 16, 64, "mixed"),
    (8, 4096, 16, 128, "mixed"),
    (32, 4096, 128, 128, "mixed"),
  ):
    yield (
      f"write+decode {batch}x{context} bf16 D{d} bs{bs} {lens}",
      lambda r, a=(batch, context, bs, d, lens): write_decode_case(
        r, batch=a[0], context=a[1], block_size=a[2], d=a[3], lengths=a[4]
      ),
    )
  for planned in (False, True):
    yield (
      "write+decode packed" + (" planned" if planned else "") + " 256x1024 bf16 D64 bs16 mixed",
      lambda r, p=planned: write_decode_case(
        r, batch=256, context=1024, block_size=16, d=64, hq=9, hkv=3, lengths="mixed",
        planned=p, packed=True,
      ),
    )  # fmt: skip
  # 8-bit pools: the decode kernel quantizes each new row itself (run41; the layer takes it
  # on the H100, kernels.gpu.quant_fused_write): the 1B shape's heads and SmolLM2's.
  for kv in ("int8", "float8_e4m3fn"):
    for planned in (False, True):
      for hq, hkv, d in ((32, 8, 64), (9, 3, 64), (32, 8, 128)):
        yield (
          f"write+decode packed {kv}" + (" planned" if planned else "")
          + f" 256x1024 {hq}/{hkv} D{d} bs16 mixed",
          lambda r, p=planned, kv=kv, h=(hq, hkv, d): write_decode_case(
            r, batch=256, context=1024, block_size=16, hq=h[0], hkv=h[1], d=h[2],
            lengths="mixed", planned=p, packed=True, kv_dtype=kv,
          ),
        )  # fmt: skip
  yield (
    "write+decode planned 256x2048 bf16 D128 bs16 mixed",
    lambda r: write_decode_case(
      r, batch=256, context=2048, block_size=16, d=128, lengths="mixed", planned=True
    ),
  )
  yield (
    "write+decode planned f32 D64 bs16 window 300",
    lambda r: write_decode_case(
      r, batch=16, context=2048, block_size=16, d=64, dtype=jnp.float32, window=300,
      lengths="mixed", planned=True,
    ),
  )  # fmt: skip
  yield (
    "write+decode f32 D64 bs16 window 300 cap 30",
    lambda r: write_decode_case(
      r, batch=16, context=2048, block_size=16, d=64, dtype=jnp.float32, window=300, cap=30.0,
      lengths="mixed",
    ),
  )  # fmt: skip
  yield (
    "decode 64x8192 bf16 bs16 full",
    lambda r: decode_case(r, batch=64, context=8192, block_size=16),
  )
  yield (
    "decode 128x4096 bf16 bs32 full",
    lambda r: decode_case(r, batch=128, context=4096, block_size=32),
  )
  for cfg in (
    dict(decode_kv_tile=128, decode_num_warps=8, decode_num_stages=3),
    dict(decode_kv_tile=32, decode_num_stages=4),
    dict(decode_num_splits=16),
  ):
    bsz = gpu.BlockSizes(**cfg)
    yield (
      f"decode 8x4096 bf16 bs16 {cfg}",
      lambda r, bsz=bsz: decode_case(
        r, batch=8, context=4096, block_size=16, lengths="mixed", block_sizes=bsz
      ),
    )
  yield (
    "decode f32 D64 bs16 window 300 cap 30",
    lambda r: decode_case(
      r,
      batch=16,
      context=2048,
      block_size=16,
      d=64,
      dtype=jnp.float32,
      lengths="mixed",
      window=300,
      cap=30.0,
    ),
  )
  yield (
    "decode bf16 D256 16/2 heads bs128",
    lambda r: decode_case(
      r, batch=16, context=2048, block_size=128, hq=16, hkv=2, d=256, lengths="mixed"
    ),
  )
  yield (
    "decode f32 D256 8/8 heads bs8",
    lambda r: decode_case(
      r, batch=8, context=1024, block_size=8, hq=8, hkv=8, d=256, dtype=jnp.float32, lengths="mixed"
    ),
  )
  yield (
    "prefill 4x4096 causal bf16 bs64",
    lambda r: prefill_case(r, q_lens=[4096] * 4, ctx_lens=[0] * 4, block_size=64, pad_rows=0),
  )
  yield (
    "prefill 4x4096 causal bf16 bs16",
    lambda r: prefill_case(r, q_lens=[4096] * 4, ctx_lens=[0] * 4, block_size=16, pad_rows=0),
  )
  yield (
    "mixed chunked prefill bf16 D256 16/2 heads bs64",
    lambda r: prefill_case(
      r, q_lens=[300, 1, 70], ctx_lens=[500, 1000, 0], block_size=64, hq=16, hkv=2, d=256
    ),
  )
  yield (
    "prefill 4x4096 causal bf16 bs64 triton",
    lambda r: prefill_case(
      r,
      q_lens=[4096] * 4,
      ctx_lens=[0] * 4,
      block_size=64,
      pad_rows=0,
      block_sizes=gpu.BlockSizes(prefill_kernel="triton"),
    ),
  )
  # The Mosaic GPU prefill (what "auto" picks on Hopper above) in its other settings.
  mixed = dict(q_lens=[700, 1, 37, 1, 0, 300], ctx_lens=[1000, 4000, 129, 0, 50, 0])
  for bs, cfg in (
    (16, dict(mosaic_kv_tile=64, mosaic_num_slots=3)),
    (128, dict(mosaic_kv_tile=64, mosaic_num_slots=4)),
    (256, dict(mosaic_kv_tile=128, mosaic_num_slots=2)),
  ):
    bsz = gpu.BlockSizes(prefill_kernel="mosaic", **cfg)
    yield (
      f"mosaic mixed chunked prefill + decode bf16 bs{bs} {cfg}",
      lambda r, bs=bs, bsz=bsz: prefill_case(r, **mixed, block_size=bs, block_sizes=bsz),
    )
  yield (
    "mosaic mixed chunked prefill bf16 bs32 P via shared memory (the interpret-mode variant)",
    lambda r: prefill_case(r, **mixed, block_size=32, pv_via_smem=True),
  )
  yield (
    "mosaic mixed chunked prefill f16 D64 16/2 heads bs8 window 100 cap 30",
    lambda r: prefill_case(
      r,
      **mixed,
      block_size=8,
      hq=16,
      hkv=2,
      d=64,
      dtype=jnp.float16,
      window=100,
      cap=30.0,
      block_sizes=gpu.BlockSizes(prefill_kernel="mosaic"),
    ),
  )
  for cfg in (
    dict(prefill_q_tile=256, prefill_kv_tile=64, prefill_num_warps=8, prefill_num_stages=2),
    dict(prefill_q_tile=128, prefill_num_warps=4, prefill_heads_per_program=1),
  ):
    cfg = dict(cfg, prefill_kernel="triton")
    bsz = gpu.BlockSizes(**cfg)
    yield (
      f"mixed chunked prefill + decode bf16 bs32 {cfg}",
      lambda r, bsz=bsz: prefill_case(
        r,
        q_lens=[700, 1, 37, 1, 0, 300],
        ctx_lens=[1000, 4000, 129, 0, 50, 0],
        block_size=32,
        block_sizes=bsz,
      ),
    )
  yield (
    "mixed chunked prefill + decode bf16 bs16",
    lambda r: prefill_case(
      r, q_lens=[512, 1, 37, 1, 0, 300], ctx_lens=[1000, 4000, 129, 0, 50, 0], block_size=16
    ),
  )
  yield (
    "mixed chunked prefill bf16 bs256 window 200 cap 20",
    lambda r: prefill_case(
      r, q_lens=[300, 1, 64], ctx_lens=[700, 900, 0], block_size=256, window=200, cap=20.0
    ),
  )
  yield (
    "mixed chunked prefill bf16 bs256 window 200 cap 20 triton",
    lambda r: prefill_case(
      r,
      q_lens=[300, 1, 64],
      ctx_lens=[700, 900, 0],
      block_size=256,
      window=200,
      cap=20.0,
      block_sizes=gpu.BlockSizes(prefill_kernel="triton"),
    ),
  )
  yield (
    "mixed chunked prefill f32 D64 bs8",
    lambda r: prefill_case(
      r, q_lens=[100, 1, 33], ctx_lens=[200, 77, 0], block_size=8, d=64, dtype=jnp.float32
    ),
  )


def planned_case(
  rng, *, batch, context, block_size, hq=32, hkv=8, d=128, dtype=jnp.bfloat16, interpret=False
):
  """Planned decode (a host plan from the lengths) on mixed lengths, and the reference."""
  lens = rng.integers(1, context + 1, size=batch).astype(np.int32)
  lens[: min(batch, 3)] = [context, 1, 0][: min(batch, 3)]  # one full row: several chunks
  kb, vb, table, lens, _, _ = make_paged(
    rng,
    batch=batch,
    context=context,
    block_size=block_size,
    num_kv_heads=hkv,
    head_dim=d,
    dtype=dtype,
    lengths=lens,
    extra_blocks=7,
  )
  q = jax.random.normal(
    jax.random.key(int(rng.integers(1 << 30))), (batch, hq, d), jnp.float32
  ).astype(dtype)
  host_lens, host_table = np.asarray(lens), np.asarray(table)
  if interpret:  # 16-token steps, so that the tiny smoke rows still take several chunks
    plan = gpu.plan_decode(host_lens, block_size, hkv, kv_tile=16, chunk_tokens=32)
    bsz = gpu.BlockSizes(decode_kv_tile=16)
  else:
    plan, bsz = gpu.plan_decode(host_lens, block_size, hkv), None
  out = gpu.paged_attention(
    q, kb, vb, host_table, host_lens, decode_plan=plan, block_sizes=bsz, interpret=interpret
  )
  return out, reference.paged_attention(q, kb, vb, table, lens)


# Batch, context, query heads, KV heads, block size of the --head-dims decode timing.
HEAD_DIM_DECODE_SHAPE = (64, 4096, 32, 8, 16)


def _check_row(out, ref) -> dict:
  dtype = jnp.dtype(out.dtype).name
  bound = tolerance("gpu_kernel_vs_reference_rel_l2", dtype).rtol
  out = np.asarray(out.astype(jnp.float32), np.float64)
  ref = np.asarray(ref.astype(jnp.float32), np.float64)
  nan = bool(np.isnan(out).any())
  rel = rel_l2_error(out, ref)
  return dict(rel_err=rel, bound=bound, nan=nan, ok=(not nan) and rel <= bound)


def _head_dim_cases(rng, d, smoke):
  """(name, fn) of the three kernel checks of one head_dim, bf16."""
  if smoke:
    kw = dict(d=d, hq=4, hkv=2, block_size=8, interpret=True)
    small = gpu.BlockSizes(decode_kv_tile=16, prefill_q_tile=16, prefill_kv_tile=16)
    dec = dict(batch=3, context=40)
    pre = dict(q_lens=[5, 1, 9], ctx_lens=[3, 20, 0], block_sizes=small)
    dec_bsz = dict(block_sizes=small)
  else:
    kw = dict(d=d, block_size=16)
    dec = dict(batch=16, context=2048)
    pre = dict(q_lens=[300, 1, 70], ctx_lens=[500, 1000, 0])
    dec_bsz = {}
  return [
    ("decode", lambda: decode_case(rng, lengths="mixed", **dec, **dec_bsz, **kw)),
    ("planned", lambda: planned_case(rng, **dec, **kw)),
    ("prefill", lambda: prefill_case(rng, **pre, **kw)),
  ]


def _time_decode(rng, d, smoke) -> dict:
  """The default decode at HEAD_DIM_DECODE_SHAPE (bf16, full lengths), timed as device time
  of 10 calls per sample; its read rate counts the real K/V bytes (no padding)."""
  batch, context, hq, hkv, bs = (3, 48, 4, 2, 8) if smoke else HEAD_DIM_DECODE_SHAPE
  kb, vb, table, lens, _, _ = make_paged(
    rng,
    batch=batch,
    context=context,
    block_size=bs,
    num_kv_heads=hkv,
    head_dim=d,
    dtype=jnp.bfloat16,
    poison=False,
  )
  q = jnp.full((batch, hq, d), 0.5, jnp.bfloat16)
  bsz = gpu.BlockSizes(decode_kv_tile=16) if smoke else None
  fn = jax.jit(
    lambda q, k, v, t, n: gpu.paged_attention(q, k, v, t, n, block_sizes=bsz, interpret=smoke)
  )
  if smoke:
    t = time_calls(lambda: fn(q, kb, vb, table, lens), repeats=3, inner=1, warmup=1)
  else:
    t = time_calls(lambda: fn(q, kb, vb, table, lens), repeats=21, inner=10, warmup=2)
  real_bytes = 2 * batch * context * hkv * d * 2  # K and V, bf16, the real head_dim
  return dict(
    decode_shape=f"{batch}x{context} {hq}/{hkv} heads bs{bs}",
    **t.fields("decode_time", scale=1e6, suffix="_us"),
    decode_tbps=real_bytes / t.median / 1e12,
  )


def head_dim_checks(head_dims, *, smoke: bool, out_dir: str, env: dict) -> int:
  """The --head-dims mode (module docstring); returns the number of failed head sizes."""
  rng = np.random.default_rng(4321)
  rows, failed = [], 0
  for d in head_dims:
    row = dict(head_dim=d, tile_width=gpu.padded_head_dim(d), dtype="bfloat16")
    cases = _head_dim_cases(rng, d, smoke)
    for name, fn in cases:
      try:
        out, ref, *extra = fn()
        row.update({f"{name}_{k}": v for k, v in _check_row(out, ref).items()})
        if extra:  # prefill: which kernel "auto" ran (Mosaic takes head_dim 64 and 128 only)
          row[f"{name}_kernel"] = extra[0]["kernel"]
      except Exception as e:  # noqa: BLE001 - report and go on
        row.update({f"{name}_ok": False, f"{name}_error": f"{type(e).__name__}: {str(e)[:300]}"})
    try:
      row.update(_time_decode(rng, d, smoke))
    except Exception as e:  # noqa: BLE001
      row["timing_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    row["ok"] = all(row.get(f"{n}_ok", False) for n, _ in cases) and "timing_error" not in row
    failed += not row["ok"]
    rows.append(row)
    write_jsonl(os.path.join(out_dir, "head_dims.jsonl"), [{**row, **env}])
    print(("PASS " if row["ok"] else "FAIL ") + f"head_dim {d}", flush=True)
  print_head_dim_table(rows, env["device"])
  return failed


def print_head_dim_table(rows, device):
  def err(r, name):
    return f"{r[name + '_rel_err']:.2e}" if name + "_rel_err" in r else "error"

  print(f"\nHead sizes on {device}, bf16 (errors: relative L2 against the reference)")
  print(
    "| head_dim | tile | decode err | planned err | prefill err (kernel) | decode us (min-max) "
    "| TB/s | ok |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    timing, tbps = "error", "-"
    if "decode_time_us" in r:
      lo, hi = r["decode_time_min_us"], r["decode_time_max_us"]
      timing, tbps = f"{r['decode_time_us']:.1f} ({lo:.1f}-{hi:.1f})", f"{r['decode_tbps']:.2f}"
    print(
      f"| {r['head_dim']} | {r['tile_width']} | {err(r, 'decode')} | {err(r, 'planned')} | "
      f"{err(r, 'prefill')} ({r.get('prefill_kernel', '?')}) | {timing} | {tbps} | "
      f"{'yes' if r['ok'] else 'NO'} |"
    )
  for r in rows:
    for k, v in r.items():
      if k.endswith("error"):
        print(f"head_dim {r['head_dim']} {k}: {v}")


def define_flags():
  flags.DEFINE_string("out", os.environ.get("OUT", "/tmp/gpu_check"), "output folder")
  flags.DEFINE_bool("smoke", False, "tiny shapes, interpret mode (CPU)")
  flags.DEFINE_string("only", None, "run only the cases whose name contains this")
  flags.DEFINE_list(
    "head-dims", [], "check these head sizes (e.g. 64,80,96,112,128,192,256) instead"
  )


def main(args):
  os.makedirs(args.out, exist_ok=True)
  env = env_info()
  print(env, flush=True)
  if args.head_dims:
    head_dims = [int(d) for d in args.head_dims]
    return 1 if head_dim_checks(head_dims, smoke=args.smoke, out_dir=args.out, env=env) else 0
  rng = np.random.default_rng(1234)
  failed = 0
  rows = []
  for name, fn in cases(args.smoke):
    if args.only and args.only not in name:
      continue
    t0 = time.time()
    try:
      out, ref, *extra = fn(rng)
      extra = extra[0] if extra else {"kernel": "triton"}  # decode cases
      # The output's dtype is the case's (q, K and V share it), read rather than parsed
      # from the name ("f16" is in "bf16").
      dtype = jnp.dtype(out.dtype).name
      bound = tolerance("gpu_kernel_vs_reference_rel_l2", dtype).rtol
      out = np.asarray(out.astype(jnp.float32), np.float64)
      ref = np.asarray(ref.astype(jnp.float32), np.float64)
      nan = bool(np.isnan(out).any())
      rel = rel_l2_error(out, ref)
      ok = (not nan) and rel <= bound
      row = dict(
        case=name,
        dtype=dtype,
        bound=bound,
        rel_err=rel,
        max_abs_err=float(np.nanmax(np.abs(out - ref))),
        nan=nan,
        ok=ok,
        seconds=time.time() - t0,
        **extra,
        **env,
      )
    except Exception as e:  # noqa: BLE001 - report and go on
      row = dict(case=name, ok=False, error=f"{type(e).__name__}: {str(e)[:400]}", **env)
    failed += not row["ok"]
    rows.append(row)
    write_jsonl(os.path.join(args.out, "check.jsonl"), [row])
    print(
      ("PASS " if row["ok"] else "FAIL ") + name,
      {
        k: row[k]
        for k in row
        if k in ("kernel", "rel_err", "bound", "max_abs_err", "nan", "error", "seconds")
      },
      flush=True,
    )
  print(f"\n{len(rows) - failed}/{len(rows)} checks passed on {env['device']}")
  return 1 if failed else 0


if __name__ == "__main__":
  _flags.run(define_flags, main)
