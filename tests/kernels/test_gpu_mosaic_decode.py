"""The Mosaic GPU planned decode (kernels/gpu/decode_mosaic.py) in GPU interpret mode on CPU.

Against kernels.reference (and, where blocks before a sliding window are freed, a float64
loop that reads only the visible keys), on ragged batches whose unused pool slots and
blocks are NaN (test_gpu_plan.make_cache), with plans cut into 64-token chunks so rows
span several chunks and the merge runs. A kernel that reads the step holding a
sequence's end from the pool instead of the zeroed tail buffer multiplies a 0
probability by NaN and fails; one that merges chunks wrongly misses the reference.
bf16 / f16 only, like the kernel. Interpret mode runs each program's two warpgroups as
threads (tests/conftest.py gives XLA the threads this needs), so shapes are tiny.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import gpu, reference
from kernels.gpu import decode_mosaic
from kernels.gpu.plan import plan_decode
from kernels.testing import rel_l2_error, tolerance
from tests.kernels.test_gpu_plan import decode_float64, make_cache

MOSAIC = gpu.BlockSizes(decode_kernel="mosaic", mosaic_decode_kv_tile=64)


def _inputs(lengths, *, block_size, hq, hkv, head_dim, dtype, seed=0):
  rng = np.random.default_rng(seed)
  k, v, table, lens = make_cache(
    rng, lengths=lengths, block_size=block_size, num_kv_heads=hkv, head_dim=head_dim, kv_dtype=dtype
  )
  q = jnp.asarray(rng.standard_normal((len(lengths), hq, head_dim)), dtype)
  return q, k, v, table, lens


def _run(
  q,
  k,
  v,
  table,
  lens,
  *,
  kv_tile=64,
  chunk_tokens=64,
  window=None,
  cap=None,
  bsz=MOSAIC,
  plan_window="same",
):
  p = plan_decode(
    lens,
    k.shape[2],
    k.shape[0],
    kv_tile=kv_tile,
    chunk_tokens=chunk_tokens,
    sliding_window=window if plan_window == "same" else plan_window,
  )
  out = gpu.paged_attention(
    q,
    k,
    v,
    table,
    lens,
    block_sizes=bsz,
    interpret=True,
    decode_plan=p,
    sliding_window=window,
    logit_soft_cap=cap,
  )
  assert out.shape == q.shape and out.dtype == q.dtype
  assert not np.isnan(np.asarray(out, np.float32)).any(), "NaN leaked into the output"
  return out, p


def _check_against_reference(out, q, k, v, table, lens, **kw):
  ref = reference.paged_attention(q, k, v, jnp.asarray(table), jnp.asarray(lens), **kw)
  err = rel_l2_error(out, ref)
  assert err < tolerance("gpu_kernel_vs_reference_rel_l2", q.dtype).rtol, err
  for b in np.flatnonzero(np.asarray(lens) == 0):  # a row of length 0 sees nothing: zeros
    np.testing.assert_array_equal(np.asarray(out[b], np.float32), 0.0)


@pytest.mark.parametrize("block_size,merge", [(8, "triton"), (16, "triton"), (16, "xla")])
def test_every_kind_of_row(block_size, merge):
  # Length 1, one short of a block, one block, empty, exactly one 64-key step, and a row
  # over four chunks (200 = 3 * 64 + 8: its tail step ends mid-block).
  lengths = [1, block_size - 1, block_size, 0, 64, 200]
  args = _inputs(lengths, block_size=block_size, hq=8, hkv=2, head_dim=64, dtype=jnp.bfloat16)
  out, p = _run(*args, bsz=gpu.BlockSizes(decode_kernel="mosaic", mosaic_decode_merge=merge))
  assert int(np.asarray(p.seq_num_chunks).max()) == 4  # the merge combines several chunks
  _check_against_reference(out, *args)


@pytest.mark.parametrize("programs", [1, 3])
def test_persistent_programs_walk_several_chunks(programs):
  # A persistent grid: one program walks every (chunk, KV head) unit, padding ones too;
  # three take every third. The ring's slots and barrier phases run on across units.
  args = _inputs([1, 200, 0, 7, 90], block_size=8, hq=8, hkv=2, head_dim=64, dtype=jnp.bfloat16)
  q, k, v, table, lens = args
  p = plan_decode(lens, 8, 2, kv_tile=64, chunk_tokens=64)
  out = decode_mosaic.planned_decode_mosaic(
    q,
    k,
    v,
    jnp.asarray(table),
    jnp.asarray(lens),
    p,
    scale=64**-0.5,
    sliding_window=None,
    logit_soft_cap=None,
    num_slots=3,
    num_programs=programs,
    interpret=gpu._mosaic_interpret_params(),
  )
  _check_against_reference(out, *args)


def test_persistent_grid_through_block_sizes():
  # programs_per_sm x the SMs (132 off a GPU) is more than this call's 32 units: one each.
  args = _inputs([70, 3], block_size=16, hq=4, hkv=2, head_dim=64, dtype=jnp.float16)
  bsz = gpu.BlockSizes(decode_kernel="mosaic", mosaic_decode_programs_per_sm=1)
  out, _ = _run(*args, bsz=bsz)
  _check_against_reference(out, *args)


@pytest.mark.parametrize(
  "hq,hkv,head_dim,dtype",
  [
    (2, 2, 128, jnp.bfloat16),  # group 1: q rows padded to 8 and dropped again
    (12, 2, 64, jnp.float16),  # group 6: padded to 8
    (16, 2, 128, jnp.float16),  # group 8: no padding
    (64, 1, 64, jnp.bfloat16),  # group 64: the whole 64-row tile
  ],
)
def test_gqa_groups_head_dims_and_dtypes(hq, hkv, head_dim, dtype):
  args = _inputs([70, 0, 9, 130], block_size=16, hq=hq, hkv=hkv, head_dim=head_dim, dtype=dtype)
  out, _ = _run(*args)
  _check_against_reference(out, *args)


@pytest.mark.parametrize("block_size,kv_tile", [(16, 128), (64, 64), (256, 128)])
def test_steps_of_several_blocks_one_block_and_a_slice(block_size, kv_tile):
  # 128-key steps of 8 blocks; 64-key steps of one block; 128-key slices of 256-slot blocks.
  args = _inputs([300, 5, 128], block_size=block_size, hq=4, hkv=2, head_dim=64, dtype=jnp.bfloat16)
  bsz = gpu.BlockSizes(decode_kernel="mosaic", mosaic_decode_kv_tile=kv_tile)
  out, _ = _run(*args, kv_tile=kv_tile, chunk_tokens=kv_tile, bsz=bsz)
  _check_against_reference(out, *args)


def test_kernel_steps_straddling_the_plans_chunks():
  # 128-key steps over a plan cut at 64-key boundaries: a step holds keys of two chunks,
  # is read by both, and each masks the other's keys out.
  args = _inputs([300, 70], block_size=16, hq=4, hkv=2, head_dim=64, dtype=jnp.bfloat16)
  bsz = gpu.BlockSizes(decode_kernel="mosaic", mosaic_decode_kv_tile=128)
  out, _ = _run(*args, kv_tile=64, chunk_tokens=64, bsz=bsz)
  _check_against_reference(out, *args)


@pytest.mark.parametrize("merge", ["triton", "xla"])
def test_window_with_a_plan_cut_without_it(merge):
  # The plan covers every key; the call's window leaves the first chunks of the long row
  # with no visible key: they write empty partials that the merge weighs 0. Group 6:
  # every R = 8 row is stored, the merge reads the first 6.
  args = _inputs([300, 20, 130], block_size=16, hq=12, hkv=2, head_dim=64, dtype=jnp.bfloat16)
  bsz = gpu.BlockSizes(decode_kernel="mosaic", mosaic_decode_merge=merge)
  out, p = _run(*args, window=70, plan_window=None, bsz=bsz)
  assert int(np.asarray(p.seq_num_chunks)[0]) == 5
  _check_against_reference(out, *args, sliding_window=70)


def test_window_with_freed_blocks_and_soft_cap():
  # The blocks wholly before each row's window are "freed": their table entries point at
  # a NaN spare block. The window's first step then starts before the window (lengths
  # 150 and 70, windows of 100: first keys 50 and 0) and comes from the zeroed head
  # buffer; row 1's window starts at 0 and its tail step holds both edges.
  block_size, window = 8, 100
  lengths = [150, 70, 1, 230]
  q, k, v, table, lens = _inputs(
    lengths, block_size=block_size, hq=8, hkv=2, head_dim=64, dtype=jnp.bfloat16, seed=3
  )
  used = set(table[table >= 0].tolist())
  spare = next(i for i in range(k.shape[1]) if i not in used)
  assert np.isnan(np.asarray(k[:, spare], np.float32)).all()
  for b, n in enumerate(lengths):
    table[b, : max(n - window, 0) // block_size] = spare
  out, _ = _run(q, k, v, table, lens, window=window, cap=20.0)
  want = decode_float64(q, k, v, table, lens, scale=64**-0.5, window=window, cap=20.0)
  # bf16 probabilities before P V and a bf16 output (test_gpu_plan's bf16 bound).
  err = rel_l2_error(np.asarray(out, np.float32), want)
  assert err < tolerance("attention_bf16_probs_rel_l2", jnp.bfloat16).rtol, err


def test_build_step_zeroes_outside_the_visible_keys():
  k = jnp.arange(2 * 6 * 8 * 1, dtype=jnp.float32).reshape(2, 6, 8, 1)
  table = jnp.asarray([[4, 1, -1], [2, -1, -1]], jnp.int32)
  lengths = jnp.asarray([13, 16], jnp.int32)
  step = jnp.asarray([0, 1], jnp.int32)
  lo = jnp.asarray([3, 0], jnp.int32)
  got = np.asarray(decode_mosaic.build_step(k, table, step, lo, lengths, kv_tile=16))
  assert got.shape == (2, 2, 16, 1)
  for h in range(2):
    # Row 0: tokens 0..15 of [3, 13): block 4 slots 3..7, block 1 slots 0..4.
    want = np.zeros(16)
    want[3:8] = [float(k[h, 4, t, 0]) for t in range(3, 8)]
    want[8:13] = [float(k[h, 1, t, 0]) for t in range(5)]
    np.testing.assert_array_equal(got[h, 0, :, 0], want)
    np.testing.assert_array_equal(got[h, 1], 0.0)  # tokens 16..31 of a length-16 row


def test_ring_depth_and_shared_memory():
  # bf16 head_dim 128: 4 slots of 64 keys (16 KiB q + 32.5 KiB partials + 128 KiB) fit
  # the 227 KiB of an SM, 128-key steps only 2 (3 would take 240.5 KiB).
  assert decode_mosaic.default_num_slots(128, 2, 64) == 4
  assert decode_mosaic.default_num_slots(128, 2, 128) == 2
  for d, tile, smem_p in ((64, 64, False), (128, 64, True), (64, 128, False), (128, 128, True)):
    slots = decode_mosaic.default_num_slots(d, 2, tile, smem_p)
    need = decode_mosaic.smem_bytes(d, 2, tile, slots, smem_p)
    assert need + 1024 <= decode_mosaic.SMEM_LIMIT_BYTES
    if slots < decode_mosaic.MAX_SLOTS:  # the deepest that fits
      assert decode_mosaic.smem_bytes(d, 2, tile, slots + 1, smem_p) + 1024 > (
        decode_mosaic.SMEM_LIMIT_BYTES
      )
  args = _inputs([10], block_size=16, hq=4, hkv=2, head_dim=128, dtype=jnp.bfloat16)
  p = plan_decode(np.asarray([10]), 16, 2)
  with pytest.raises(ValueError, match="shared memory"):
    decode_mosaic.planned_decode_mosaic(
      *args[:3],
      jnp.asarray(args[3]),
      jnp.asarray(args[4]),
      p,
      scale=0.1,
      sliding_window=None,
      logit_soft_cap=None,
      kv_tile=128,
      num_slots=4,
      pv_via_smem=False,
    )


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(dtype=jnp.float32), "float32.*Triton planned decode"),
    (dict(head_dim=96), "head_dim 96.*Triton planned decode"),
    (dict(block_size=4), "block_size 4.*Triton planned decode"),
    (dict(hq=128, hkv=1), "128 query heads per KV head.*Triton planned decode"),
  ],
)
def test_unsupported_inputs_raise_naming_the_triton_fallback(kw, match):
  base = dict(block_size=16, hq=4, hkv=2, head_dim=64, dtype=jnp.bfloat16)
  q, k, v, table, lens = _inputs([20, 3], **{**base, **kw})
  with pytest.raises(ValueError, match=match):
    _run(q, k, v, table, lens)


def test_8bit_kv_and_missing_plan_raise():
  q, k, v, table, lens = _inputs(
    [20, 3], block_size=16, hq=4, hkv=2, head_dim=64, dtype=jnp.bfloat16
  )
  kq, ks = kernels.quantize(jnp.nan_to_num(k), jnp.int8)
  vq, vs = kernels.quantize(jnp.nan_to_num(v), jnp.int8)
  p = plan_decode(lens, 16, 2)
  with pytest.raises(ValueError, match="8-bit K/V.*Triton planned decode"):
    gpu.paged_attention(
      q,
      kq,
      vq,
      table,
      lens,
      block_sizes=MOSAIC,
      interpret=True,
      decode_plan=p,
      k_scales=ks,
      v_scales=vs,
    )
  with pytest.raises(ValueError, match="decode_plan"):
    gpu.paged_attention(q, k, v, table, lens, block_sizes=MOSAIC, interpret=True)


def test_decode_backend_choice():
  kw = dict(q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16, head_dim=128, block_size=16, group=4)
  assert gpu.kernel_backend("decode", **kw) == "triton"  # "auto": Triton until measured
  assert gpu.kernel_backend("decode", requested="triton", **kw) == "triton"
  assert gpu.kernel_backend("decode", requested="mosaic", interpret=True, **kw) == "mosaic"
  if not gpu.is_hopper():  # asked for off Hopper, not interpreting: an error, no fallback
    with pytest.raises(ValueError, match="Hopper"):
      gpu.kernel_backend("decode", requested="mosaic", **kw)
  with pytest.raises(ValueError, match="needs .*group"):
    gpu.kernel_backend("decode", requested="mosaic", interpret=True, head_dim=128)
  with pytest.raises(ValueError, match="requested"):
    gpu.kernel_backend("decode", requested="cuda")


@pytest.mark.parametrize(
  "field,value",
  [
    ("decode_kernel", "cuda"),
    ("mosaic_decode_kv_tile", 32),
    ("mosaic_decode_kv_tile", 64.0),
    ("mosaic_decode_num_slots", 1),
    ("mosaic_decode_num_slots", 5),
    ("mosaic_decode_programs_per_sm", 0),
    ("mosaic_decode_merge", "numpy"),
  ],
)
def test_mosaic_decode_block_sizes_validated(field, value):
  with pytest.raises(ValueError, match=field):
    gpu.BlockSizes(**{field: value})


@pytest.mark.parametrize(
  "head_dim,group,block_size,kv_tile,programs,options",
  [
    (128, 4, 16, 64, None, {}),
    (64, 1, 256, 128, None, dict(sliding_window=100, logit_soft_cap=30.0)),
    (128, 8, 8, 128, None, {}),
    (128, 4, 16, 64, 132, {}),  # persistent: an H200's SMs
  ],
)
def test_lowers_for_an_h200_with_p_in_registers(
  monkeypatch, head_dim, group, block_size, kv_tile, programs, options
):
  # No GPU here: lowering the GPU build (P V with P from registers, pl.run_state; the
  # path interpret mode cannot run) to Mosaic GPU's custom call checks that every
  # primitive, layout and copy lowers; the Triton merge needs an H200's compute capability
  # (a private JAX module, pinned to jax 0.11). Compiling to PTX happens only on a GPU.
  from jax._src.pallas.triton import gpu_info, pallas_call_registration

  info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: info)
  lengths = np.array([300, 5, 1000, 0], np.int32)
  need = -(-lengths // block_size)
  table = np.full((4, int(need.max())), -1, np.int32)
  table[np.arange(table.shape[1])[None] < need[:, None]] = np.arange(int(need.sum()))
  kv = jax.ShapeDtypeStruct((2, int(need.sum()) + 1, block_size, head_dim), jnp.bfloat16)
  q = jax.ShapeDtypeStruct((4, 2 * group, head_dim), jnp.bfloat16)
  p = plan_decode(lengths, block_size, 2, sliding_window=options.get("sliding_window"))

  def call(q, k, v, table, lengths, plan):
    return decode_mosaic.planned_decode_mosaic(
      q,
      k,
      v,
      table,
      lengths,
      plan,
      scale=head_dim**-0.5,
      sliding_window=options.get("sliding_window"),
      logit_soft_cap=options.get("logit_soft_cap"),
      kv_tile=kv_tile,
      num_programs=programs,
      interpret=False,
    )

  traced = jax.jit(call).trace(q, kv, kv, jnp.asarray(table), jnp.asarray(lengths), p)
  text = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text and "paxcache_mosaic_decode_merge" in text


def test_xla_merge_ignores_padding_chunks_and_empty_ones():
  # Partials laid out as the kernel writes them (R = 8 rows per (chunk, KV head), group
  # 2): padding chunks' rows never written (finite garbage here, a large m that would
  # dominate sequence 0, their chunk_seq), one real chunk that saw no key (m = -inf,
  # den = 0, o = 0). Against a NumPy merge of each sequence's real chunks.
  rng = np.random.default_rng(5)
  p = plan_decode(np.asarray([200, 0, 30]), 16, 2, kv_tile=64, chunk_tokens=64)
  num_chunks, hkv, group, rows, d = p.num_padded_chunks, 2, 2, 8, 4
  o = rng.standard_normal((num_chunks, hkv, rows, d)).astype(np.float32)
  m = rng.standard_normal((num_chunks, hkv, rows)).astype(np.float32) * 4
  den = rng.uniform(0.5, 3.0, (num_chunks, hkv, rows)).astype(np.float32)
  real = np.asarray(p.chunk_end) > np.asarray(p.chunk_start)
  o[~real], m[~real], den[~real] = 1e3, 100.0, 1.0
  o[1], m[1], den[1] = 0.0, -np.inf, 0.0  # chunk 1 (of the 200-key row) saw no key
  got = decode_mosaic._merge_xla(
    p,
    jnp.asarray(o.reshape(-1, d)),
    jnp.asarray(m.reshape(-1)),
    jnp.asarray(den.reshape(-1)),
    3,
    hkv,
    group,
    rows,
    d,
  )
  want = np.zeros((3, hkv * group, d))
  for b in range(3):
    first, count = int(p.seq_first_chunk[b]), int(p.seq_num_chunks[b])
    if count == 0:
      continue
    cs = np.arange(first, first + count)
    for h in range(hkv):
      for g in range(group):
        mm = m[cs, h, g].astype(np.float64)
        w = np.exp2(mm - mm.max())
        want[b, h * group + g] = (w[:, None] * o[cs, h, g]).sum(0) / (w * den[cs, h, g]).sum()
  assert int(p.seq_num_chunks[0]) == 4 and not real.all()
  np.testing.assert_allclose(
    np.asarray(got), want, **tolerance("attention_vs_float64", jnp.float32)
  )
