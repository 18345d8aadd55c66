"""Cascade (shared-prefix) decode attention: the host planner and every backend's kernels.

Each case builds block tables from labels (rows that list the same label share that
physical block, as after a prefix-cache hit or a fork), fills unused blocks and every slot
no row reads with NaN (8-bit pools: an out-of-range int8 or NaN, and NaN scales), plans
with ``kernels.plan_cascade`` (or by hand), and checks ``kernels.cascade_attention``
against plain paged attention computed one row and head at a time in float64 NumPy, and
against ``kernels.paged_attention(..., backend="reference")``. The GPU kernels run in
Pallas interpret mode with small tiles, so that tiny groups take several row tiles,
chunks, inner steps and splits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.cascade import validate_plan
from kernels.testing import rel_l2_error, tolerance

BS = 4  # tokens per block in the kernel cases

# Rows as lists of block labels (one per block a row uses) and lengths.
CASES = {
  # Three rows share blocks A B C, then their own; a row alone; a row of length 0; a row of
  # length 1 on block A (too short to share: its one key is its newest).
  "prefix": (
    [["A", "B", "C", "p", "q"], ["A", "B", "C", "r"], ["A", "B", "C", "s"], ["x", "y"], [], ["A"]],
    [17, 14, 13, 7, 0, 1],
  ),
  # Forks that copied on write: rows 0 and 3 hold the same five blocks (a fork before
  # either wrote past the shared block E, so the group ends mid-block at 18 = length - 1);
  # row 1 diverged into its copy F after four blocks, row 2 into G after two.
  "forks": (
    [
      ["A", "B", "C", "D", "E"],
      ["A", "B", "C", "D", "F"],
      ["A", "B", "G"],
      ["A", "B", "C", "D", "E"],
    ],
    [19, 18, 10, 19],
  ),
  # Two groups; the second one's prefix ends mid-block (row 3 has length 11: shared 10).
  "mid_block": (
    [["A", "B", "u"], ["A", "B", "v"], ["C", "D", "E", "w"], ["C", "D", "E"], ["z"]],
    [10, 9, 15, 11, 3],
  ),
  # A longer prefix (11 blocks, 44 keys, all shared: the shortest row has 45): with 16-key
  # tiles and 2 chunks, chunk 0's two full tiles run the shared kernel's unmasked loop and
  # chunk 1's partial tile the masked one. Rows 0 and 2 (1 and 3) also share their last
  # blocks, which the group leaves to the own part.
  "long": (
    [[f"s{i}" for i in range(11)] + ["a"], [f"s{i}" for i in range(11)] + ["b", "c"]] * 2,
    [46, 51, 45, 52],
  ),
}
HEADS = {
  "prefix": (4, 2),
  "forks": (8, 1),
  "mid_block": (6, 2),
  "long": (4, 1),
}  # (q heads, KV heads)


def build(
  seed, labels, lengths, *, heads, head_dim=64, kv_dtype=jnp.float32, q_dtype=None, block_size=BS
):
  """Pools, table, lengths and q for rows given as block labels; unread slots are poison."""
  rng = np.random.default_rng(seed)
  num_q_heads, num_kv_heads = heads
  q_dtype = q_dtype or (jnp.float32 if kernels.is_quantized(kv_dtype) else kv_dtype)
  names = sorted({name for row in labels for name in row})
  num_blocks = len(names) + 3  # three blocks no row uses
  ids = dict(zip(names, rng.permutation(num_blocks)[: len(names)].tolist(), strict=True))
  lengths = np.asarray(lengths, np.int32)
  width = max(len(r) for r in labels) + 1  # a spare -1 column
  table = np.full((len(labels), width), -1, np.int32)
  live = np.zeros((num_blocks, block_size), bool)
  for b, row in enumerate(labels):
    assert len(row) == -(-int(lengths[b]) // block_size), (row, lengths[b])
    table[b, : len(row)] = [ids[n] for n in row]
    for p in range(lengths[b]):
      live[table[b, p // block_size], p % block_size] = True
  shape = (num_kv_heads, num_blocks, block_size, head_dim)
  dead = np.broadcast_to(~live, shape[:3])
  case = dict(block_table=table, lengths=lengths)
  if kernels.is_quantized(kv_dtype):
    mag = np.exp(rng.uniform(-1, 1, shape[:3]))[..., None]  # scales differ 7x between rows
    kq, ks = kernels.quantize(jnp.asarray(rng.standard_normal(shape) * mag, jnp.float32), kv_dtype)
    vq, vs = kernels.quantize(jnp.asarray(rng.standard_normal(shape) * mag, jnp.float32), kv_dtype)
    bad = np.int8(-128) if jnp.dtype(kv_dtype) == jnp.int8 else np.asarray(np.nan, kv_dtype)
    kq, vq, ks, vs = (np.asarray(x).copy() for x in (kq, vq, ks, vs))
    kq[dead], vq[dead], ks[dead], vs[dead] = bad, bad, np.nan, np.nan
    case.update(k_blocks=jnp.asarray(kq), v_blocks=jnp.asarray(vq))
    case.update(k_scales=jnp.asarray(ks), v_scales=jnp.asarray(vs))
  else:
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    k[dead], v[dead] = np.nan, np.nan
    case.update(k_blocks=jnp.asarray(k, kv_dtype), v_blocks=jnp.asarray(v, kv_dtype))
  case["q"] = jnp.asarray(rng.standard_normal((len(labels), num_q_heads, head_dim)), q_dtype)
  return case


def oracle(q, k_blocks, v_blocks, block_table, lengths, k_scales=None, v_scales=None, *, cap=None):
  """Plain decode attention in float64, one row and head at a time (8-bit: row * scale)."""
  q = np.asarray(jnp.asarray(q, jnp.float32), np.float64)
  k = np.asarray(jnp.asarray(k_blocks, jnp.float32), np.float64)
  v = np.asarray(jnp.asarray(v_blocks, jnp.float32), np.float64)
  if k_scales is not None:
    k = k * np.asarray(k_scales, np.float64)[..., None]
    v = v * np.asarray(v_scales, np.float64)[..., None]
  table, lengths = np.asarray(block_table), np.asarray(lengths)
  num_kv_heads, _, block_size, head_dim = k.shape
  group = q.shape[1] // num_kv_heads
  out = np.zeros(q.shape)
  for b, n in enumerate(lengths):
    keys = np.arange(n)
    if not n:
      continue
    blocks, slots = table[b, keys // block_size], keys % block_size
    for h in range(q.shape[1]):
      s = (k[h // group, blocks, slots] @ q[b, h]) * head_dim**-0.5
      if cap is not None:
        s = cap * np.tanh(s / cap)
      p = np.exp(s - s.max())
      out[b, h] = p @ v[h // group, blocks, slots] / p.sum()
  return out


def small_gpu_sizes():
  from kernels import gpu
  from kernels.gpu.cascade import CascadeBlockSizes

  # 16-row tiles (2 members at 8 query heads per KV head), 16-key steps over 4-token
  # blocks, 2 chunks; the own part with 16-key steps and 2 splits.
  return CascadeBlockSizes(
    shared_rows=16,
    shared_kv_tile=16,
    shared_num_chunks=2,
    shared_num_stages=2,
    own=gpu.BlockSizes(decode_kv_tile=16, decode_num_splits=2, decode_num_stages=2),
  )


def run(case, plan, backend, **kw):
  if backend == "gpu":
    kw.update(interpret=True, block_sizes=small_gpu_sizes())
  return kernels.cascade_attention(**case, plan=plan, backend=backend, **kw)


def check(out, case, *, cap=None, gpu_bf16=False):
  q = case["q"]
  assert out.shape == q.shape and out.dtype == q.dtype
  got = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  assert not np.isnan(got).any(), "NaN from an unused slot leaked into the output"
  want = oracle(**case, cap=cap)
  plain = kernels.paged_attention(**case, logit_soft_cap=cap, backend="reference")
  plain = np.asarray(jnp.asarray(plain, jnp.float32), np.float64)
  quant = "k_scales" in case
  if gpu_bf16:
    # The GPU kernels round p to bf16 before p @ v and the output to bf16: held to their
    # relative-L2 bounds (kernels/testing.py), against the oracle and the plain reference.
    kind = "quantized_gpu_vs_float64_rel_l2" if quant else "gpu_kernel_vs_reference_rel_l2"
    bound = tolerance(kind, q.dtype).rtol
    assert rel_l2_error(got, want) < bound
    assert rel_l2_error(got, plain) < bound
    return
  kind = "quantized_attention_vs_float64" if quant else "attention_vs_float64"
  np.testing.assert_allclose(got, want, **tolerance(kind, q.dtype))
  np.testing.assert_allclose(got, plain, **tolerance(kind, q.dtype))


BACKENDS = ["reference", "gpu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_plain_attention(name, backend):
  labels, lengths = CASES[name]
  case = build(1, labels, lengths, heads=HEADS[name])
  plan = kernels.plan_cascade(case["block_table"], case["lengths"], BS)
  assert plan is not None
  check(run(case, plan, backend), case)


def test_reference_own_part_in_row_chunks():
  # 6 rows in chunks of 4: the second chunk is half padding (length 0), cut off after.
  from kernels.cascade import _cascade_reference

  labels, lengths = CASES["prefix"]
  case = build(7, labels, lengths, heads=(4, 2))
  plan = kernels.plan_cascade(case["block_table"], case["lengths"], BS)
  out = _cascade_reference(
    **case,
    plan=plan,
    scale=64**-0.5,
    logit_soft_cap=None,
    k_scales=None,
    v_scales=None,
    rows_per_chunk=4,
  )
  check(out, case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_of_one(backend):
  labels, lengths = CASES["prefix"]
  case = build(2, labels, lengths, heads=(4, 2))
  plan = kernels.plan_cascade(case["block_table"], case["lengths"], BS, min_group_size=1)
  # The three sharers stay one group; row 3 becomes a group of one (its first 6 keys
  # shared with nobody); rows 4 and 5 (lengths 0 and 1) have no key besides the newest.
  rows = sorted(tuple(sorted(r[r >= 0].tolist())) for r in plan.group_rows if (r >= 0).any())
  assert rows == [(0, 1, 2), (3,)]
  check(run(case, plan, backend), case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_plan_ending_mid_block_with_single_and_empty_groups(backend):
  labels, lengths = CASES["prefix"]
  case = build(3, labels, lengths, heads=(4, 2))
  table = case["block_table"]
  a, b = table[0, :2].tolist()
  plan = kernels.CascadePlan(
    # Rows 0-2 share 6 tokens (1.5 blocks); row 3 alone shares 5 of its 7; row 5 sits in a
    # group of length 0 (it reads its one key in its own part); a padding group.
    group_table=np.array(
      [[a, b, -1], [table[3, 0], table[3, 1], -1], [-1, -1, -1], [-1, -1, -1]], np.int32
    ),
    group_lens=np.array([6, 5, 0, 0], np.int32),
    group_rows=np.array([[1, 0, 2], [3, -1, -1], [5, -1, -1], [-1, -1, -1]], np.int32),
    row_starts=np.array([6, 6, 6, 5, 0, 0], np.int32),
  )
  check(run(case, plan, backend), case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
  "kv_dtype,q_dtype,cap",
  [
    pytest.param(jnp.bfloat16, jnp.bfloat16, None, id="bf16"),
    pytest.param(jnp.float32, jnp.float32, 2.5, id="f32-softcap"),
    pytest.param(jnp.int8, jnp.float32, None, id="int8-f32q"),
    pytest.param(jnp.float8_e4m3fn, jnp.bfloat16, 3.0, id="fp8-bf16q-softcap"),
  ],
)
def test_dtypes_and_soft_cap(backend, kv_dtype, q_dtype, cap):
  labels, lengths = CASES["forks"]
  case = build(4, labels, lengths, heads=(8, 2), kv_dtype=kv_dtype, q_dtype=q_dtype)
  plan = kernels.plan_cascade(case["block_table"], case["lengths"], BS)
  out = run(case, plan, backend, logit_soft_cap=cap)
  check(out, case, cap=cap, gpu_bf16=backend == "gpu" and q_dtype == jnp.bfloat16)


@pytest.mark.parametrize("mode", ["q_dtype", "f16_bits", "int8_qk", "int8_qkv"])
@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
def test_gpu_8bit_widenings(kv_dtype, mode):
  # The default widening (f16 dots) runs in test_dtypes_and_soft_cap; the old bf16 path and
  # the e4m3 bit trick here, in the shared kernel and the own part (kernels/gpu/_widen.py).
  labels, lengths = CASES["forks"]
  case = build(4, labels, lengths, heads=(8, 2), kv_dtype=kv_dtype, q_dtype=jnp.bfloat16)
  plan = kernels.plan_cascade(case["block_table"], case["lengths"], BS)
  sizes = small_gpu_sizes()
  sizes = dataclasses.replace(
    sizes, quant_widen=mode, own=dataclasses.replace(sizes.own, quant_widen=mode)
  )
  out = kernels.cascade_attention(
    **case, plan=plan, backend="gpu", interpret=True, block_sizes=sizes
  )
  check(out, case, gpu_bf16=True)


def test_gpu_kernels_lower_to_triton_for_an_h200(monkeypatch):
  # Lowering to Triton IR needs no GPU once Pallas is told which one (a private hook of
  # jax 0.11: the test names it so that a change there fails here, loudly). It catches
  # what interpret mode cannot: an operation the Triton lowering does not take. It does not
  # compile the IR to PTX; the H200 run (experiments/bench/cascade.py) does.
  import functools

  from jax._src.pallas.triton import gpu_info, pallas_call_registration

  from kernels.gpu import cascade as gpu_cascade

  h200 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: h200)
  sds = jax.ShapeDtypeStruct
  batch, width, num_blocks = 256, 2080, 10240
  for kv_dtype in (jnp.bfloat16, jnp.int8):
    quant = kernels.is_quantized(kv_dtype)
    scales = sds((8, num_blocks, 16), jnp.float32) if quant else None
    plan = kernels.CascadePlan(
      sds((1, 2048), jnp.int32),
      sds((1,), jnp.int32),
      sds((1, 256), jnp.int32),
      sds((batch,), jnp.int32),
    )
    sizes = gpu_cascade.default_cascade_block_sizes(
      head_dim=128, q_dtype=jnp.bfloat16, kv_dtype=kv_dtype
    )
    # cascade_attention resolves "auto" (Mosaic on a real H200 for bf16; this lowers the
    # Triton shared kernel, what 8-bit K/V and other cards run).
    sizes = dataclasses.replace(sizes, shared_kernel="triton")
    fn = functools.partial(
      gpu_cascade._cascade, scale=0.1, logit_soft_cap=None, block_sizes=sizes, interpret=False
    )
    pool = sds((8, num_blocks, 16, 128), kv_dtype)
    args = (sds((batch, 32, 128), jnp.bfloat16), pool, pool)
    args += (sds((batch, width), jnp.int32), sds((batch,), jnp.int32), plan)
    traced = jax.jit(fn).trace(*args, k_scales=scales, v_scales=scales)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= 2, kv_dtype  # the shared kernel and the own (decode) one
    assert "paxcache_cascade_shared" in text and "paxcache_paged_decode" in text


def test_gpu_default_block_sizes():
  # block_sizes=None: the per-shape defaults (128-row tiles, 64-key steps) and the chunk
  # count choose_num_chunks picks, as on the GPU.
  labels, lengths = CASES["long"]
  case = build(8, labels, lengths, heads=(8, 2), kv_dtype=jnp.bfloat16)
  plan = kernels.plan_cascade(case["block_table"], case["lengths"], BS)
  out = kernels.cascade_attention(**case, plan=plan, backend="gpu", interpret=True)
  check(out, case, gpu_bf16=True)


# ------------------------------------------ the shared part on the Mosaic GPU prefill kernel

# Block size 8 (the Mosaic kernel's least). Three rows share 20 blocks (160 keys: with
# 64-key steps and 2 chunks, chunk 0 is two full steps and chunk 1 a partial one), then
# keys of their own; two forks share 4 whole blocks and part of a fifth (a group ending
# mid-block); a row alone; a row of length 0.
MOSAIC_CASE = (
  [[f"s{i}" for i in range(20)] + [o] for o in ("a", "b", "c")]
  + [["f0", "f1", "f2", "f3", "F"], ["f0", "f1", "f2", "f3", "F"]]
  + [["x", "y"], []],
  [163, 161, 168, 38, 39, 12, 0],
)


def mosaic_sizes(own_splits=2, **kw):
  from kernels.gpu.cascade import CascadeBlockSizes

  # One own split: the own part's kernel merges the shared partials itself; two: the XLA
  # merge after both parts (kernels.gpu.cascade.merges_in_own_kernel).
  own = kernels.gpu.BlockSizes(decode_kv_tile=16, decode_num_splits=own_splits, decode_num_stages=2)
  return CascadeBlockSizes(
    shared_kernel="mosaic", shared_mosaic_kv_tile=64, shared_num_chunks=2, own=own, **kw
  )


@pytest.mark.parametrize(
  "num_chunks,num_slots,own_splits", [(2, 2, 2), (3, 3, 2), (1, 2, 2), (2, 2, 1), (3, 3, 1)]
)
def test_gpu_mosaic_shared_part_matches_plain_attention(num_chunks, num_slots, own_splits):
  # GPU interpret mode (threads with simulated shared memory, TMA and wgmma). Chunks of 2:
  # the 160-key group in a full chunk and a partial one, the forks' group (37 keys) in one
  # chunk and an empty one; 3: one chunk per 64-key step; 1: no split. NaN in every slot
  # no row reads; the planner's groups and ends as the engine would give them. One own
  # split: the own part's kernel merges the shared partials (an empty chunk included).
  from kernels.gpu.cascade import merges_in_own_kernel

  labels, lengths = MOSAIC_CASE
  case = build(11, labels, lengths, heads=(8, 2), kv_dtype=jnp.bfloat16, block_size=8)
  plan = kernels.plan_cascade(case["block_table"], case["lengths"], 8)
  assert sorted(int(n) for n in plan.group_lens if n) == [37, 160]  # forks: 38 - 1
  sizes = mosaic_sizes(own_splits=own_splits, shared_mosaic_num_slots=num_slots)
  sizes = dataclasses.replace(sizes, shared_num_chunks=num_chunks)
  fused = merges_in_own_kernel(case["q"], case["k_blocks"], case["block_table"], sizes)
  assert fused == (own_splits == 1)
  out = kernels.cascade_attention(
    **case, plan=plan, backend="gpu", interpret=True, block_sizes=sizes
  )
  check(out, case, gpu_bf16=True)
  # The same partials merge as the Triton shared kernel's: both near the exact result.
  triton = kernels.cascade_attention(
    **case, plan=plan, backend="gpu", interpret=True, block_sizes=small_gpu_sizes()
  )
  assert (
    rel_l2_error(out, triton) < 2 * tolerance("gpu_kernel_vs_reference_rel_l2", jnp.bfloat16).rtol
  )


@pytest.mark.parametrize("num_chunks", [1, 2, 3])
def test_gpu_mosaic_schedule_from_the_host_is_the_traced_one(num_chunks):
  # schedule_plan builds on the host (NumPy) the arrays the Mosaic shared part otherwise
  # computes in the step: the same values, and the cascade with them matches plain
  # attention (interpret mode, NaN in unread slots). A schedule of other chunks is refused.
  from kernels.gpu import cascade as gc

  labels, lengths = MOSAIC_CASE
  case = build(11, labels, lengths, heads=(8, 2), kv_dtype=jnp.bfloat16, block_size=8)
  plan = kernels.plan_cascade(case["block_table"], case["lengths"], 8)
  sizes = dataclasses.replace(mosaic_sizes(own_splits=1), shared_num_chunks=num_chunks)
  kw = dict(num_q_heads=8, head_dim=64, q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16)
  scheduled = gc.schedule_plan(plan, **kw, block_size=8, block_sizes=sizes, interpret=True)
  sch = scheduled.schedule
  assert isinstance(sch, gc.MosaicSchedule) and sch.chunks == num_chunks
  tiles = -(-plan.group_rows.shape[1] // 128)
  unit = max(sizes.shared_mosaic_kv_tile, 8)
  traced = jax.jit(
    lambda p: gc._mosaic_schedule(
      jnp, p, len(lengths), num_chunks=num_chunks, tiles=tiles, unit=unit, block_size=8
    )
  )(plan)
  for name in ("table", "seq_lens", "sched", "first_row"):
    np.testing.assert_array_equal(getattr(sch, name), np.asarray(getattr(traced, name)), name)
  members = {int(r) for r in plan.group_rows.reshape(-1) if r >= 0}
  assert [b for b in range(len(lengths)) if sch.first_row[b] >= 0] == sorted(members)
  out = kernels.cascade_attention(
    **case, plan=scheduled, backend="gpu", interpret=True, block_sizes=sizes
  )
  check(out, case, gpu_bf16=True)
  wide = dataclasses.replace(
    scheduled, schedule=dataclasses.replace(sch, sched=sch.sched.astype(np.float32))
  )
  with pytest.raises(ValueError, match="plan.schedule must be the MosaicSchedule of this call"):
    jax.eval_shape(  # checked when traced: nothing runs
      lambda c, p: kernels.cascade_attention(
        **c, plan=p, backend="gpu", interpret=True, block_sizes=sizes
      ),
      case,
      wide,
    )
  other = dataclasses.replace(sizes, shared_num_chunks=num_chunks + 1)
  with pytest.raises(ValueError, match="plan.schedule must be the MosaicSchedule of this call"):
    kernels.cascade_attention(
      **case, plan=scheduled, backend="gpu", interpret=True, block_sizes=other
    )
  # No Mosaic shared part (the Triton kernel): the plan comes back as it was.
  assert gc.schedule_plan(plan, **kw, block_size=8, block_sizes=small_gpu_sizes()) is plan
  with pytest.raises(ValueError, match="host"):
    gc.schedule_plan(jax.device_put(plan), **kw, block_size=8, block_sizes=sizes, interpret=True)


def test_gpu_mosaic_shared_part_with_three_query_heads_per_kv_head():
  # SmolLM2's grouping (9 / 3 heads: 3 query heads a KV head), which "auto" hands the
  # Mosaic part on Hopper in the engine's decode steps.
  labels, lengths = MOSAIC_CASE
  case = build(17, labels, lengths, heads=(6, 2), kv_dtype=jnp.bfloat16, block_size=8)
  plan = kernels.plan_cascade(case["block_table"], case["lengths"], 8)
  out = kernels.cascade_attention(
    **case, plan=plan, backend="gpu", interpret=True, block_sizes=mosaic_sizes()
  )
  check(out, case, gpu_bf16=True)


def test_gpu_mosaic_shared_part_with_a_soft_cap_and_head_dim_128():
  # Two groups: three rows on 3 whole blocks (24 keys), two forks on the same 3 blocks
  # that end mid-block (lengths 21 and 20: 19 shared); a row alone.
  labels = [["A", "B", "C", "u"], ["A", "B", "C", "v"], ["A", "B", "C", "t"]]
  labels += [["D", "E", "F"], ["D", "E", "F"], ["z"]]
  case = build(
    12,
    labels,
    [30, 27, 25, 21, 20, 5],
    heads=(4, 2),
    head_dim=128,
    kv_dtype=jnp.bfloat16,
    block_size=8,
  )
  plan = kernels.plan_cascade(case["block_table"], case["lengths"], 8)
  assert sorted(int(n) for n in plan.group_lens if n) == [19, 24]
  out = kernels.cascade_attention(
    **case, plan=plan, backend="gpu", interpret=True, block_sizes=mosaic_sizes(), logit_soft_cap=4.0
  )
  check(out, case, cap=4.0, gpu_bf16=True)


def test_gpu_mosaic_shared_part_refuses_what_the_kernel_does_not_take():
  from kernels.gpu.cascade import CascadeBlockSizes

  with pytest.raises(ValueError, match="shared_kernel"):
    CascadeBlockSizes(shared_kernel="cuda")
  with pytest.raises(ValueError, match="shared_mosaic_kv_tile"):
    CascadeBlockSizes(shared_mosaic_kv_tile=32)
  with pytest.raises(ValueError, match="shared_mosaic_num_slots"):
    CascadeBlockSizes(shared_mosaic_num_slots=1)
  # 4 slots of 128-key steps at head_dim 128 do not fit an SM's shared memory: said in
  # terms of the cascade's settings, before Mosaic's own lowering would fail.
  from kernels.gpu.cascade import shared_partials_mosaic

  sds = jax.ShapeDtypeStruct
  plan = kernels.CascadePlan(*(sds(s, jnp.int32) for s in ((1, 64), (1,), (1, 8), (8,))))
  pool = sds((2, 64, 16, 128), jnp.bfloat16)
  big = dataclasses.replace(mosaic_sizes(shared_mosaic_num_slots=4), shared_mosaic_kv_tile=128)
  with pytest.raises(ValueError, match="shared_mosaic_num_slots=4 needs"):
    jax.eval_shape(
      lambda q, k, v, p: shared_partials_mosaic(
        q,
        k,
        v,
        p,
        scale=0.1,
        logit_soft_cap=None,
        block_sizes=big,
      ),
      sds((8, 8, 128), jnp.bfloat16),
      pool,
      pool,
      plan,
    )
  # 4-token blocks (bf16 otherwise fine) and 8-bit K/V: the Mosaic prefill takes neither
  # (the one switch point, kernels.gpu.kernel_backend, says so before anything runs).
  labels, lengths = CASES["prefix"]
  case = build(14, labels, lengths, heads=(4, 2), kv_dtype=jnp.bfloat16)
  plan = kernels.plan_cascade(case["block_table"], case["lengths"], BS)
  with pytest.raises(ValueError, match="block size|block_size"):
    kernels.cascade_attention(
      **case, plan=plan, backend="gpu", interpret=True, block_sizes=mosaic_sizes()
    )
  labels, lengths = MOSAIC_CASE
  case = build(
    13, labels, lengths, heads=(8, 2), kv_dtype=jnp.int8, q_dtype=jnp.bfloat16, block_size=8
  )
  plan = kernels.plan_cascade(case["block_table"], case["lengths"], 8)
  with pytest.raises(ValueError, match="Mosaic GPU prefill"):
    kernels.cascade_attention(
      **case, plan=plan, backend="gpu", interpret=True, block_sizes=mosaic_sizes()
    )


def test_gpu_shared_kernel_auto_picks_mosaic_only_where_it_runs(monkeypatch):
  # CascadeBlockSizes.shared_kernel="auto" (the default): the one switch point gives the
  # Mosaic prefill kernel on Hopper for what it takes, the Triton shared kernel elsewhere,
  # and never Mosaic when interpreting (CI's CPU runs the Triton kernel in interpret mode).
  from kernels import gpu
  from kernels.gpu.cascade import CascadeBlockSizes

  assert CascadeBlockSizes().shared_kernel == "auto"
  kw = dict(q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16, head_dim=128, block_size=16)
  monkeypatch.setattr(gpu, "is_hopper", lambda device=None: False)
  assert gpu.kernel_backend("cascade", **kw) == "triton"
  with pytest.raises(ValueError, match="Hopper"):
    gpu.kernel_backend("cascade", requested="mosaic", **kw)
  monkeypatch.setattr(gpu, "is_hopper", lambda device=None: True)
  assert gpu.kernel_backend("cascade", **kw) == "mosaic"  # no row count needed, unlike prefill
  assert gpu.kernel_backend("cascade", **dict(kw, head_dim=64)) == "mosaic"
  assert gpu.kernel_backend("cascade", **kw, interpret=True) == "triton"
  assert gpu.kernel_backend("cascade", requested="triton", **kw) == "triton"
  for bad in (
    dict(kw, kv_dtype=jnp.int8),
    dict(kw, kv_dtype=jnp.float8_e4m3fn),
    dict(kw, head_dim=96),
    dict(kw, block_size=4),
    dict(kw, q_dtype=jnp.float32, kv_dtype=jnp.float32),
  ):
    assert gpu.kernel_backend("cascade", **bad) == "triton", bad
  with pytest.raises(ValueError, match="requested"):
    gpu.kernel_backend("cascade", requested="cuda", **kw)


def test_gpu_mosaic_shared_part_lowers_for_the_gpu():
  # Interpret mode runs P V through shared memory and cannot check Mosaic GPU's lowering
  # of the log-sum-exp store; lowering for CUDA on this machine does (registers' P V, the
  # issue's 256 x 32,768 shapes). Not compiled to PTX here: the H200 benchmark does that.
  import functools

  from kernels.gpu import cascade as gpu_cascade

  sds = jax.ShapeDtypeStruct
  batch, num_blocks = 256, 10240
  plan = kernels.CascadePlan(
    sds((1, 2048), jnp.int32),
    sds((1,), jnp.int32),
    sds((1, 256), jnp.int32),
    sds((batch,), jnp.int32),
  )
  sizes = dataclasses.replace(mosaic_sizes(), own=None, shared_num_chunks=None)
  part = functools.partial(
    gpu_cascade.shared_partials_mosaic, scale=0.1, logit_soft_cap=None, block_sizes=sizes
  )

  def fn(*args):  # the partials at batch rows, as the XLA merge takes them
    return part(*args).at_batch_rows()

  pool = sds((8, num_blocks, 16, 128), jnp.bfloat16)
  traced = jax.jit(fn).trace(sds((batch, 32, 128), jnp.bfloat16), pool, pool, plan)
  text = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  # Batch rows read their partials through a gather: the one scatter is the [batch] map
  # of row slots, not the partials (a zeroed buffer and a scatter kernel each, per step).
  lines = text.splitlines()
  at = [i for i, line in enumerate(lines) if '"stablehlo.scatter"(' in line]
  assert len(at) == 1, [lines[i] for i in at]
  signature = next(line for line in lines[at[0] :] if line.strip().startswith("})"))
  assert signature.strip().endswith(f"-> tensor<{batch}xi32>"), signature


def test_gpu_cascade_with_the_merge_in_the_own_kernel_lowers_for_an_h200(monkeypatch):
  # The whole cascade as the H200 runs it at 100 x (5,000 + own): the Mosaic shared part,
  # then the own part's Triton kernel merging its partials ("_prefix"; an H200's compute
  # capability stubbed, as test_gpu_head_sizes' lowering test does), and no split-K
  # partials of the own part for an XLA merge.
  import functools

  from jax._src.pallas.triton import gpu_info, pallas_call_registration

  from kernels.gpu import cascade as gpu_cascade

  info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: info)
  sds = jax.ShapeDtypeStruct
  batch, num_blocks = 100, 4096
  shapes = ((1, 512), (1,), (1, 128), (batch,))
  plan = kernels.CascadePlan(*(sds(s, jnp.int32) for s in shapes))
  sizes = gpu_cascade.CascadeBlockSizes(
    shared_kernel="mosaic", own=kernels.gpu.BlockSizes(decode_num_splits=1)
  )
  fn = functools.partial(
    gpu_cascade._cascade,
    scale=0.1,
    logit_soft_cap=None,
    block_sizes=sizes,
    interpret=False,
    k_scales=None,
    v_scales=None,
  )
  pool = sds((8, num_blocks, 16, 128), jnp.bfloat16)
  args = (sds((batch, 32, 128), jnp.bfloat16), pool, pool, sds((batch, 352), jnp.int32))
  traced = jax.jit(fn).trace(*args, sds((batch,), jnp.int32), plan)
  text = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  assert "_s1_prefix" in text
  assert "_partials" not in text


def test_plan_passes_into_jit_as_device_arrays():
  labels, lengths = CASES["mid_block"]
  case = build(5, labels, lengths, heads=(6, 2))
  plan = kernels.plan_cascade(case["block_table"], case["lengths"], BS)
  assert len(jax.tree.leaves(plan)) == 4

  @jax.jit
  def step(case, plan):
    return kernels.cascade_attention(**case, plan=plan, backend="reference")

  out = step(case, plan)
  check(out, case)
  # The same shapes with other values reuse the compiled step.
  # (min_shared_blocks=3 keeps only the second group; group_bucket=2 pads it to two).
  plan2 = kernels.plan_cascade(
    case["block_table"], case["lengths"], BS, min_shared_blocks=3, group_bucket=2
  )
  assert groups_of(plan2).keys() == {(2, 3)}
  assert jax.tree.map(np.shape, plan2) == jax.tree.map(np.shape, plan)
  check(step(case, plan2), case)
  assert step._cache_size() == 1


# ---------------------------------------------------------------------------- planning


def groups_of(plan):
  """{sorted member rows: (group_len, shared block ids)} of a plan's real groups."""
  out = {}
  for g in range(plan.group_table.shape[0]):
    rows = plan.group_rows[g][plan.group_rows[g] >= 0]
    if len(rows):
      n = plan.group_lens[g]
      ids = plan.group_table[g][: -(-n // 4) if n else 0]
      out[tuple(sorted(rows.tolist()))] = (int(n), ids.tolist())
  return out


def table_of(rows, width=8):
  t = np.full((len(rows), width), -1, np.int32)
  for b, r in enumerate(rows):
    t[b, : len(r)] = r
  return t


def test_plan_forks_by_hand():
  # bs 4. Rows 0 and 1 share blocks 1 2 3 then fork (4 vs 5); row 2 shares 1 2; row 3 and
  # 4 share nothing with anyone. Sorted neighbours share 12 (rows 0, 1: min(3 * 4, 15, 14))
  # and 8 (row 2: min(2 * 4, 9)). Whole group {0, 1, 2} at 8 saves 2 * 8 = 16 reads; {0, 1}
  # alone at 12 saves 12: the planner takes the three.
  table = table_of([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6], [7, 8], [9]])
  lengths = np.array([16, 15, 10, 8, 3], np.int32)
  plan = kernels.plan_cascade(table, lengths, 4)
  assert groups_of(plan) == {(0, 1, 2): (8, [1, 2])}
  np.testing.assert_array_equal(plan.row_starts, [8, 8, 8, 0, 0])
  # Rows 0 and 1 sharing ten blocks: {0, 1} at 40 saves 40 against 2 * 8 for all three.
  table = table_of(
    [[1, 2] + list(range(10, 18)) + [30], [1, 2] + list(range(10, 18)) + [31], [1, 2, 6]], 12
  )
  lengths = np.array([44, 43, 10], np.int32)
  plan = kernels.plan_cascade(table, lengths, 4)
  assert groups_of(plan) == {(0, 1): (40, [1, 2] + list(range(10, 18)))}
  np.testing.assert_array_equal(plan.row_starts, [40, 40, 0])


def test_plan_shared_length_keeps_each_members_newest_token():
  # Identical tables (a fork before either row wrote): shared = min(len) - 1 = 9, which ends
  # mid-block (block 3 of 4-token blocks holds tokens 8..11).
  table = table_of([[1, 2, 3], [1, 2, 3]])
  plan = kernels.plan_cascade(table, np.array([11, 10], np.int32), 4)
  assert groups_of(plan) == {(0, 1): (9, [1, 2, 3])}
  np.testing.assert_array_equal(plan.row_starts, [9, 9])


def test_plan_thresholds_and_none():
  table = table_of([[1, 2, 3], [1, 2, 4], [5]])
  lengths = np.array([12, 12, 2], np.int32)
  assert groups_of(kernels.plan_cascade(table, lengths, 4)) == {(0, 1): (8, [1, 2])}
  assert kernels.plan_cascade(table, lengths, 4, min_shared_blocks=3) is None
  assert kernels.plan_cascade(table, lengths, 4, min_group_size=3) is None
  assert kernels.plan_cascade(table_of([[1], [2]]), np.array([4, 4], np.int32), 4) is None
  # No row has a key besides its newest.
  assert kernels.plan_cascade(table_of([[1], [1]]), np.array([1, 1], np.int32), 4) is None


def test_plan_pads_shapes_to_powers_of_two():
  rows = [[1, 2, 3, 10 + i] for i in range(5)] + [[4, 5, 20 + i] for i in range(3)]
  lengths = np.array([14] * 5 + [9] * 3, np.int32)
  plan = kernels.plan_cascade(table_of(rows), lengths, 4, member_bucket=1, block_bucket=1)
  assert plan.group_table.shape == (2, 4)  # 2 groups; 3 shared blocks -> 4
  assert plan.group_rows.shape == (2, 8)  # 5 members -> 8
  assert groups_of(plan) == {(0, 1, 2, 3, 4): (12, [1, 2, 3]), (5, 6, 7): (8, [4, 5])}
  plan = kernels.plan_cascade(table_of(rows), lengths, 4, group_bucket=4, block_bucket=16)
  assert plan.group_table.shape == (4, 16) and plan.group_rows.shape == (4, 8)
  assert (plan.group_lens[2:] == 0).all() and (plan.group_rows[2:] == -1).all()


@pytest.mark.parametrize("seed", range(4))
def test_plan_of_random_fork_trees_is_valid_and_saves_reads(seed):
  # Beam-search-like trees: each row copies a random earlier row's first k blocks, then
  # continues in blocks of its own (copy-on-write); the plan's groups are the Python loop's
  # (reference_groups, below) and satisfy the invariants listed here.
  rng = np.random.default_rng(seed)
  bs, width = 4, 12
  rows, nxt = [], 0
  for b in range(24):
    if b and rng.random() < 0.8:
      parent = rows[rng.integers(b)]
      k = int(rng.integers(0, len(parent) + 1))
      row = parent[:k]
    else:
      row = []
    n = int(rng.integers(max(len(row), 1), width + 1)) - len(row)  # blocks of its own
    rows.append(row + list(range(nxt, nxt + n)))
    nxt += n
  table = table_of(rows, width)
  # Each row's last block holds 1..bs of its tokens.
  lengths = np.array([len(r) * bs - int(rng.integers(0, bs)) for r in rows], np.int32)
  plan = kernels.plan_cascade(table, lengths, bs)
  assert plan is not None  # 80% forks in 24 rows: every seed here shares blocks
  assert plan_groups(plan) == reference_groups(table, lengths, bs)
  q = np.zeros((len(rows), 2, 8), np.float32)
  pool = np.zeros((1, nxt, bs, 8), np.float32)
  validate_plan(plan, q, pool, table, lengths)  # ids, members, row_starts, shared blocks
  saved = 0
  for members, (n, ids) in groups_of(plan).items():
    assert len(members) >= 2 and n >= 1
    for b in members:
      assert n <= lengths[b] - 1  # each member keeps its newest token
      assert table[b, : len(ids)].tolist() == ids
    saved += (len(members) - 1) * n
  assert saved > 0


# ------------------------------------------------------------------------ refused inputs


def small_case():
  labels, lengths = CASES["prefix"]
  case = build(6, labels, lengths, heads=(4, 2))
  return case, kernels.plan_cascade(case["block_table"], case["lengths"], BS)


def replaced(plan, **fields):
  parts = dict(
    group_table=plan.group_table,
    group_lens=plan.group_lens,
    group_rows=plan.group_rows,
    row_starts=plan.row_starts,
  )
  parts.update(fields)
  return kernels.CascadePlan(**parts)


def test_sliding_window_is_refused():
  case, plan = small_case()
  with pytest.raises(ValueError, match="sliding_window"):
    kernels.cascade_attention(**case, plan=plan, backend="reference", sliding_window=4)


@pytest.mark.parametrize(
  "change,match",
  [
    (lambda p: dict(group_rows=np.where(p.group_rows == 1, 2, p.group_rows)), "more than one"),
    (lambda p: dict(row_starts=p.row_starts + 1), "row_starts"),
    (lambda p: dict(group_table=np.where(p.group_table >= 0, 99, -1)), "group_table"),
    (lambda p: dict(group_lens=p.group_lens + 100), "group_lens"),
    (lambda p: dict(group_rows=np.where(p.group_rows == 1, 9, p.group_rows)), "group_rows"),
    (lambda p: dict(group_lens=p.group_lens.astype(np.int64)), "int32"),
    (lambda p: dict(row_starts=p.row_starts[:-1]), r"row_starts must be \[6\]"),
    (lambda p: dict(group_lens=p.group_lens[:0]), "group_lens"),
  ],
  ids=["row-twice", "starts", "id-range", "lens-range", "row-range", "dtype", "batch", "groups"],
)
def test_bad_plans_raise_naming_the_field(change, match):
  case, plan = small_case()
  with pytest.raises(ValueError, match=match):
    kernels.cascade_attention(**case, plan=replaced(plan, **change(plan)), backend="reference")


def test_member_whose_table_does_not_start_with_the_group_blocks_is_refused():
  case, plan = small_case()
  table = case["block_table"].copy()
  table[1, 1] = table[3, 0]  # row 1 (a member) now diverges after one block
  case["block_table"] = table
  with pytest.raises(ValueError, match="does not start with the group's blocks"):
    kernels.cascade_attention(**case, plan=plan, backend="reference")


def test_plan_cascade_refuses_bad_arguments():
  table = table_of([[1, 2], [1, 2]])
  lengths = np.array([8, 8], np.int32)
  with pytest.raises(ValueError, match="block_table must be int32"):
    kernels.plan_cascade(table.astype(np.int64), lengths, 4)
  with pytest.raises(ValueError, match="lengths must be int32"):
    kernels.plan_cascade(table, lengths[:1], 4)
  with pytest.raises(ValueError, match="lengths must be in"):
    kernels.plan_cascade(table, np.array([8, 40], np.int32), 4)
  with pytest.raises(ValueError, match="min_group_size"):
    kernels.plan_cascade(table, lengths, 4, min_group_size=0)
  with pytest.raises(ValueError, match="holds -1 inside its length"):
    kernels.plan_cascade(table_of([[1, -1, 3], [1, -1, 3]]), np.array([12, 12], np.int32), 4)
  with pytest.raises(ValueError, match="must be a kernels.CascadePlan"):
    case, _ = small_case()
    kernels.cascade_attention(**case, plan=(1, 2, 3, 4), backend="reference")


def test_block_sizes_belong_to_the_gpu_backend():
  from kernels.gpu.cascade import CascadeBlockSizes

  case, plan = small_case()
  with pytest.raises(ValueError, match="reference backend takes none"):
    kernels.cascade_attention(**case, plan=plan, backend="reference", block_sizes=small_gpu_sizes())
  with pytest.raises(ValueError, match="CascadeBlockSizes"):
    kernels.cascade_attention(
      **case, plan=plan, backend="gpu", interpret=True, block_sizes=kernels.gpu.BlockSizes()
    )
  with pytest.raises(ValueError, match="shared_rows"):
    CascadeBlockSizes(shared_rows=12)


def test_shared_chunks_fill_whole_waves():
  from kernels.gpu.cascade import _num_sms, choose_num_chunks

  sms = _num_sms()  # 132 (H100 / H200) off the GPU
  one = 200 * 1024  # one program per SM
  for per in (8, 32, 64, 100, 256):
    c = choose_num_chunks(per, 4096, None, program_smem=one)
    waves = -(-c * per // sms)
    assert c * per >= 0.9 * sms and c * per / (waves * sms) >= 0.9, (per, c)
    assert choose_num_chunks(per, 4096, None, program_smem=one // 2) >= c  # 2 per SM
  assert choose_num_chunks(64, 8, None, program_smem=one) == 2  # <= one chunk per 4 tiles
  assert choose_num_chunks(64, 8, 5, program_smem=one) == 5  # asked for: kept
  assert choose_num_chunks(64, 3, 5, program_smem=one) == 3  # but not past the tiles


# -------------------------------------------------------- planner against a Python loop


def reference_groups(table, lengths, bs, *, min_shared_blocks=1, min_group_size=2):
  """The planner's documented rule as Python loops: [(member rows in order, shared)].

  Candidate rows (length - 1 >= the least shared length) sorted by the bytes of their
  table rows (Python's stable sort); neighbours share min(common leading blocks * bs,
  each length - 1); links below the least shared length cut the order into segments; a
  run is one group (if it has min_group_size rows) or split at its first weakest link,
  whichever saves more (ties: one group), recursively; with min_group_size 1, rows in no
  group become groups of one sharing length - 1.
  """
  min_tokens = (min_shared_blocks - 1) * bs + 1
  rows = [b for b in range(len(lengths)) if lengths[b] - 1 >= min_tokens]
  if len(rows) < min_group_size:
    return []
  rows.sort(key=lambda b: table[b].tobytes())
  links = []
  for x, y in zip(rows[:-1], rows[1:], strict=True):
    common = 0
    while common < table.shape[1] and table[x, common] == table[y, common]:
      common += 1
    links.append(min(common * bs, int(lengths[x]) - 1, int(lengths[y]) - 1))

  def best(lo, hi):  # rows[lo..hi] -> (saving, [(lo, hi, shared)])
    if lo == hi:
      return 0, []
    cut = min(range(lo, hi), key=lambda i: (links[i], i))
    m, s = hi - lo + 1, links[cut]
    left, right = best(lo, cut), best(cut + 1, hi)
    split = (left[0] + right[0], left[1] + right[1])
    if m >= min_group_size and (m - 1) * s >= split[0]:
      return (m - 1) * s, [(lo, hi, s)]
    return split

  runs, lo = [], 0
  for i in range(len(rows)):
    if i == len(rows) - 1 or links[i] < min_tokens:
      runs += best(lo, i)[1]
      lo = i + 1
  groups = [(rows[lo : hi + 1], s) for lo, hi, s in runs]
  if min_group_size == 1:
    taken = {b for members, _ in groups for b in members}
    groups += [([b], int(lengths[b]) - 1) for b in rows if b not in taken]
  return groups


def plan_groups(plan):
  """[(member rows in order, shared)] of a plan's real groups, in the plan's order."""
  if plan is None:
    return []
  out = []
  for g in range(plan.group_table.shape[0]):
    members = plan.group_rows[g][plan.group_rows[g] >= 0].tolist()
    if members:
      out.append((members, int(plan.group_lens[g])))
  return out


def random_fork_table(rng, *, batch, width, bs, stale=False):
  """Block tables of fork trees (each row copies a random earlier row's first k blocks,
  then continues in blocks of its own; some rows start a tree of their own) and lengths
  whose last block holds 1..bs tokens; some rows empty. With ``stale``, columns past a
  row's blocks hold old ids (0..2) instead of -1, and the table is 3 columns wider."""
  rows, nxt = [], 3
  for b in range(batch):
    row = []
    if b and rng.random() < 0.8:
      parent = rows[rng.integers(b)]
      row = parent[: int(rng.integers(0, len(parent) + 1))]
    own = int(rng.integers(max(len(row), 1), width + 1)) - len(row)
    if rng.random() < 0.1:
      row, own = [], 0
    rows.append(row + list(range(nxt, nxt + own)))
    nxt += own
  extra = 3 if stale else 0
  table = np.full((batch, width + extra), -1, np.int32)
  for b, r in enumerate(rows):
    table[b, : len(r)] = r
    if stale:
      table[b, len(r) :] = rng.integers(-1, 3, width + extra - len(r))
  lengths = np.array([len(r) * bs - int(rng.integers(0, bs)) if r else 0 for r in rows])
  return table, lengths.astype(np.int32), nxt


def check_plan_invariants(plan, table, lengths, bs, min_shared_blocks, min_group_size):
  """What every plan must satisfy, checked one group and member at a time."""
  seen = set()
  for members, shared in plan_groups(plan):
    assert len(members) >= min_group_size
    assert -(-shared // bs) >= min_shared_blocks and shared >= 1
    g = [tuple(r[r >= 0]) for r in plan.group_rows].index(tuple(members))
    nb = -(-shared // bs)
    assert (plan.group_table[g, nb:] == -1).all()
    for b in members:
      assert b not in seen, f"row {b} in two groups"
      seen.add(b)
      assert shared <= lengths[b] - 1  # each member keeps its newest token
      assert (table[b, :nb] == plan.group_table[g, :nb]).all()
      assert plan.row_starts[b] == shared
  others = [b for b in range(len(lengths)) if b not in seen]
  assert (plan.row_starts[others] == 0).all()


@pytest.mark.parametrize("stale", [False, True], ids=["clean", "stale-ids"])
def test_plan_equals_the_python_rule_and_plain_attention_on_random_forks(stale):
  # 200 random fork tables per parameter: the plan is exactly the one the Python loop
  # above builds (groups, their order, member order, shared lengths), satisfies the
  # invariants, and cascade attention with it (reference backend) equals plain paged
  # attention. Shapes are fixed (buckets at their largest) so that each path compiles once.
  rng = np.random.default_rng(11 if stale else 12)
  batch, width, bs, heads, head_dim = 10, 6, 4, (2, 1), 8
  num_blocks = 3 + batch * width
  buckets = dict(group_bucket=16, member_bucket=16, block_bucket=8)
  cascade = jax.jit(lambda c, p: kernels.cascade_attention(**c, plan=p, backend="reference"))
  plain = jax.jit(lambda c: kernels.paged_attention(**c, backend="reference"))
  planned = 0
  for _ in range(200):
    table, lengths, _ = random_fork_table(rng, batch=batch, width=width, bs=bs, stale=stale)
    kw = dict(min_shared_blocks=int(rng.integers(1, 3)), min_group_size=int(rng.integers(1, 4)))
    plan = kernels.plan_cascade(table, lengths, bs, **kw, **buckets)
    assert plan_groups(plan) == reference_groups(table, lengths, bs, **kw)
    if plan is None:
      continue
    planned += 1
    check_plan_invariants(plan, table, lengths, bs, **kw)
    # Pools: NaN in every slot no row reads (so a plan that reads a wrong key fails).
    live = np.zeros((num_blocks, bs), bool)
    for b in range(batch):
      for p in range(lengths[b]):
        live[table[b, p // bs], p % bs] = True
    k = np.where(live[None, :, :, None], rng.standard_normal((1, num_blocks, bs, head_dim)), np.nan)
    v = np.where(live[None, :, :, None], rng.standard_normal((1, num_blocks, bs, head_dim)), np.nan)
    case = dict(
      q=jnp.asarray(rng.standard_normal((batch, heads[0], head_dim)), jnp.float32),
      k_blocks=jnp.asarray(k, jnp.float32),
      v_blocks=jnp.asarray(v, jnp.float32),
      block_table=table,
      lengths=lengths,
    )
    validate_plan(plan, case["q"], case["k_blocks"], case["block_table"], lengths)
    got = np.asarray(cascade(case, plan))
    want = np.asarray(plain(case))
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, **tolerance("attention_vs_float64", jnp.float32))
  assert planned >= 100  # most tables share something
  assert cascade._cache_size() == 1 and plain._cache_size() == 1


def test_plan_of_a_deep_fork_chain_needs_no_recursion():
  # Row i holds the chain's first i + 1 blocks, then one of its own: neighbours share
  # more and more, so no run is taken whole early and the old recursion went one level
  # per row (1,500 rows: past Python's default limit of 1,000).
  bs = 2

  def chain(n):
    table = np.full((n, n + 1), -1, np.int32)
    for i in range(n):
      table[i, : i + 1] = np.arange(i + 1)
      table[i, i + 1] = n + i
    return table, np.full(n, 0, np.int32) + (np.arange(n, dtype=np.int32) + 2) * bs

  table, lengths = chain(300)
  plan = kernels.plan_cascade(table, lengths, bs)
  assert plan_groups(plan) == reference_groups(table, lengths, bs)  # recursion depth 300
  check_plan_invariants(plan, table, lengths, bs, 1, 2)
  table, lengths = chain(1500)
  plan = kernels.plan_cascade(table, lengths, bs)
  check_plan_invariants(plan, table, lengths, bs, 1, 2)
  assert sum((len(m) - 1) * s for m, s in plan_groups(plan)) > 0


def test_plan_of_rows_on_one_prefix_in_any_row_order():
  # 64 rows on one 40-block prefix, then own blocks, in a scrambled row order and with
  # rows of other prefixes and empty rows between them (the planner's gather path), and
  # in a table four times wider than the rows: one group of the 64.
  rng = np.random.default_rng(5)
  bs, shared_blocks, n = 4, 40, 64
  table = np.full((n + 16, 4 * (shared_blocks + 3)), -1, np.int32)
  ids = rng.permutation(10_000).astype(np.int32)
  table[:n, :shared_blocks] = ids[:shared_blocks]
  table[:n, shared_blocks : shared_blocks + 2] = ids[100 : 100 + 2 * n].reshape(n, 2)
  table[n:, :3] = ids[1000 : 1000 + 48].reshape(16, 3)
  lengths = np.concatenate([np.full(n, (shared_blocks + 2) * bs, np.int32), np.full(16, 9)])
  lengths[n::2] = 0
  perm = rng.permutation(n + 16)
  table, lengths = table[perm], lengths[perm].astype(np.int32)
  plan = kernels.plan_cascade(table, lengths, bs)
  assert plan_groups(plan) == reference_groups(table, lengths, bs)
  ((members, shared),) = plan_groups(plan)
  assert sorted(members) == sorted(np.flatnonzero(perm < n).tolist())
  assert shared == shared_blocks * bs
  np.testing.assert_array_equal(plan.group_table[0, :shared_blocks], ids[:shared_blocks])


@pytest.mark.parametrize("chunks,splits", [(1, 1), (4, 1), (3, 2), (9, 8)])
def test_gpu_merge_of_shared_and_own_partials_against_float64(chunks, splits):
  # The cascade's merge: rows in a group take their shared chunks' partials and their own
  # splits'; rows in no group hold garbage (NaN here) in the shared partials, which must
  # not reach their output. Against one float64 softmax over every key a row sees; a row
  # with no key at all gives 0.
  from kernels.gpu import cascade as gc
  from kernels.testing import random_partials, softmax_over_keys

  rng = np.random.default_rng(chunks * 100 + splits)
  b, h, d = 4, 3, 8
  o_s, m_s, den_s, x_s, v_s = random_partials(rng, (b, h), chunks, d)
  o_o, m_o, den_o, x_o, v_o = random_partials(rng, (b, h), splits, d)
  in_group = np.array([True, False, True, True])
  o_s[~in_group], m_s[~in_group], den_s[~in_group] = np.nan, np.nan, np.nan
  x_o[3], m_o[3], den_o[3], o_o[3] = -np.inf, -np.inf, 0.0, 0.0  # row 3: shared keys only
  x_s[2], m_s[2], den_s[2], o_s[2] = -np.inf, -np.inf, 0.0, 0.0  # row 2: own keys only
  x_o[2, 0] = -np.inf  # row 2, head 0: no key at all
  m_o[2, 0], den_o[2, 0], o_o[2, 0] = -np.inf, 0.0, 0.0
  x_all = np.concatenate([np.where(in_group[:, None, None, None], x_s, -np.inf), x_o], 2)
  v_all = np.concatenate([np.nan_to_num(v_s), v_o], 2)
  want = softmax_over_keys(x_all.reshape(b, h, -1), v_all.reshape(b, h, -1, d))
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  args = ((f32(o_s), f32(m_s), f32(den_s)), (f32(o_o), f32(m_o), f32(den_o)), jnp.asarray(in_group))
  got = np.asarray(gc._merge(*args, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[2, 0], 0.0)
