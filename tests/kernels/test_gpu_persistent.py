"""The persistent planned decode (kernels.gpu.persistent, an experiment), in interpret mode.

The schedule is checked by loops over programs and steps (every step of every chunk run
once, by one program, in order, whole chunks per program), and the kernel against a
float64 NumPy loop over positions (tests/kernels/test_gpu_plan.py's), on ragged batches
whose unused slots are NaN, at program counts from one to more than there are chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import gpu
from kernels.gpu.persistent import FIRST, LAST, SINGLE, persistent_decode, persistent_schedule
from kernels.gpu.plan import plan_decode
from kernels.testing import rel_l2_error, tolerance
from tests.kernels.test_gpu_plan import decode_float64, make_cache

HQ, HKV = 4, 2


@pytest.mark.parametrize("num_programs", [1, 3, 7, 64])
@pytest.mark.parametrize("window", [None, 40])
def test_schedule_runs_every_step_of_every_chunk_once_in_whole_chunks(num_programs, window):
  lengths = np.array([200, 1, 0, 90, 33, 517], np.int32)
  kv_tile = 16
  p = plan_decode(lengths, 16, HKV, kv_tile=kv_tile, sliding_window=window, chunk_tokens=48)
  s = persistent_schedule(p, num_programs, kv_tile)
  assert s.program_steps.shape == (num_programs + 1,) and s.program_steps[0] == 0
  assert (np.diff(s.program_steps) >= 0).all()
  seen = []
  for prog in range(num_programs):
    lo, hi = int(s.program_steps[prog]), int(s.program_steps[prog + 1])
    if lo < hi:  # whole chunks: the range starts a chunk and ends one
      assert s.steps[5, lo] & FIRST and s.steps[5, hi - 1] & LAST
    seen += range(lo, hi)
  total = int(s.program_steps[-1])
  assert seen == list(range(total))
  # The steps of each real chunk, by a loop: its kv_tile-aligned steps in order.
  want = []
  for c in range(p.num_padded_chunks):
    start, end = int(p.chunk_start[c]), int(p.chunk_end[c])
    seq = int(p.chunk_seq[c])
    keys = list(range(start // kv_tile * kv_tile, end, kv_tile)) if end > start else []
    for i, key in enumerate(keys):
      flags = (FIRST if i == 0 else 0) | (LAST if i == len(keys) - 1 else 0)
      flags |= SINGLE if p.seq_num_chunks[seq] == 1 else 0
      want.append((c, seq, key, start, end, flags))
  assert s.steps.shape[0] == 6 and s.steps.dtype == np.int32
  got = [tuple(col) for col in s.steps[:, :total].T.tolist()]
  assert got == want
  # Balanced: no program has more steps than its share plus one chunk's.
  spans = zip(p.chunk_start.tolist(), p.chunk_end.tolist(), strict=True)
  longest_chunk = max(-(-(e - b) // kv_tile) + 1 for b, e in spans)
  assert np.diff(s.program_steps).max() <= -(-total // num_programs) + longest_chunk


def test_schedule_refuses_bad_input():
  p = plan_decode(np.array([5, 9], np.int32), 16, HKV)
  with pytest.raises(ValueError, match="num_programs must be >= 1"):
    persistent_schedule(p, 0, 16)
  with pytest.raises(ValueError, match="kv_tile must be a power of two"):
    persistent_schedule(p, 4, 24)


def _run(
  lengths, *, num_programs, dtype=jnp.float32, window=None, cap=None, head_dim=64, plan_window=0
):
  rng = np.random.default_rng(len(lengths) + num_programs)
  k, v, table, lens = make_cache(
    rng, lengths=lengths, block_size=16, num_kv_heads=HKV, head_dim=head_dim, kv_dtype=dtype
  )
  q = jnp.asarray(rng.standard_normal((len(lengths), HQ, head_dim)), dtype)
  bs = gpu.BlockSizes(decode_kv_tile=16, decode_num_stages=2)
  pw = window if plan_window == 0 else plan_window  # 0: the call's window
  p = plan_decode(np.asarray(lens), 16, HKV, kv_tile=16, sliding_window=pw, chunk_tokens=48)
  s = persistent_schedule(p, num_programs, 16)
  out = persistent_decode(
    q,
    k,
    v,
    jnp.asarray(table),
    jnp.asarray(lens),
    jax.tree.map(jnp.asarray, p),
    jax.tree.map(jnp.asarray, s),
    scale=head_dim**-0.5,
    sliding_window=window,
    logit_soft_cap=cap,
    block_sizes=bs,
    interpret=True,
  )
  assert out.shape == q.shape and out.dtype == q.dtype
  assert not np.isnan(np.asarray(out, np.float32)).any(), "NaN leaked into the output"
  want = decode_float64(q, k, v, table, lens, scale=head_dim**-0.5, window=window, cap=cap)
  return np.asarray(jnp.asarray(out, jnp.float32), np.float64), want, p


@pytest.mark.parametrize("num_programs", [1, 2, 5, 40])
def test_persistent_decode_matches_float64_loop(num_programs):
  # Ragged rows: one of 11 chunks (merged), length-1 rows, an empty row; one program runs
  # every chunk, or several chunks of several rows, or some programs run nothing.
  got, want, p = _run([517, 1, 0, 90, 33, 1], num_programs=num_programs)
  assert int(p.seq_num_chunks.max()) >= 2
  np.testing.assert_allclose(got, want, **tolerance("attention_vs_float64", jnp.float32))


@pytest.mark.parametrize("plan_window", [0, None], ids=["plan_cut_by_window", "plan_of_all"])
def test_persistent_decode_window_soft_cap_and_padded_head_dim(plan_window):
  # The plan cut by the window, or over all keys (then the kernel masks the window).
  got, want, _ = _run(
    [200, 1, 90, 33], num_programs=3, window=40, cap=5.0, head_dim=80, plan_window=plan_window
  )
  np.testing.assert_allclose(got, want, **tolerance("attention_vs_float64", jnp.float32))


def test_persistent_decode_bf16():
  got, want, _ = _run([130, 2, 77, 1], num_programs=3, dtype=jnp.bfloat16)
  # bf16 probabilities before p @ V and a bf16 output: the planned kernel's bound.
  assert rel_l2_error(got, want) < tolerance("attention_bf16_probs_rel_l2", jnp.bfloat16).rtol


def test_persistent_decode_refuses_8bit_kv():
  k = jnp.zeros((HKV, 4, 16, 64), jnp.int8)
  q = jnp.zeros((1, HQ, 64), jnp.float32)
  p = plan_decode(np.array([5], np.int32), 16, HKV)
  with pytest.raises(ValueError, match="16-bit or float32 K/V"):
    persistent_decode(
      q,
      k,
      k,
      jnp.zeros((1, 1), jnp.int32),
      jnp.array([5], jnp.int32),
      p,
      persistent_schedule(p, 2, 16),
      scale=1.0,
      sliding_window=None,
      logit_soft_cap=None,
      block_sizes=gpu.BlockSizes(),
      interpret=True,
    )


def test_persistent_decode_refuses_a_schedule_or_plan_made_for_another_call():
  rng = np.random.default_rng(3)
  k, v, table, lens = make_cache(
    rng, lengths=[40, 7], block_size=16, num_kv_heads=HKV, head_dim=64, kv_dtype=jnp.float32
  )
  q = jnp.zeros((2, HQ, 64), jnp.float32)
  bs = gpu.BlockSizes(decode_kv_tile=16)
  p = plan_decode(lens, 16, HKV, kv_tile=16)
  call = dict(scale=1.0, sliding_window=None, logit_soft_cap=None, block_sizes=bs, interpret=True)
  # Steps of 32 keys read by a kernel stepping 16 would skip half of every step.
  with pytest.raises(ValueError, match="the schedule's steps are 32 keys, .*decode_kv_tile is 16"):
    persistent_decode(q, k, v, table, lens, p, persistent_schedule(p, 2, 32), **call)
  # The plan checks of kernels.paged_attention: another cache's heads, a plan's window.
  other = plan_decode(lens, 16, HKV + 1, kv_tile=16)
  with pytest.raises(ValueError, match="decode_plan was built for num_kv_heads 3"):
    persistent_decode(q, k, v, table, lens, other, persistent_schedule(other, 2, 16), **call)
  windowed = plan_decode(lens, 16, HKV, kv_tile=16, sliding_window=8)
  with pytest.raises(ValueError, match="decode_plan covers only the last 8 keys"):
    persistent_decode(q, k, v, table, lens, windowed, persistent_schedule(windowed, 2, 16), **call)


def test_persistent_kernel_lowers_to_triton_ir_for_an_h200(monkeypatch):
  # As test_gpu_plan's lowering test: every primitive has a Triton lowering (interpret
  # mode does not check that); the PTX compile happens only on a GPU.
  from jax._src.pallas.triton import gpu_info, pallas_call_registration

  info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: info)
  lengths = np.array([300, 5, 1000, 0], np.int32)
  need = -(-lengths // 16)
  table = np.full((4, int(need.max())), -1, np.int32)
  table[np.arange(table.shape[1])[None] < need[:, None]] = np.arange(int(need.sum()))
  kv = jax.ShapeDtypeStruct((8, int(need.sum()) + 1, 16, 128), jnp.bfloat16)
  q = jax.ShapeDtypeStruct((4, 32, 128), jnp.bfloat16)
  p = plan_decode(lengths, 16, 8)
  s = persistent_schedule(p, 17, 128)

  def call(q, k, v, table, lengths, plan, sched):
    return persistent_decode(
      q,
      k,
      v,
      table,
      lengths,
      plan,
      sched,
      scale=128**-0.5,
      sliding_window=None,
      logit_soft_cap=None,
      block_sizes=gpu.BlockSizes(decode_kv_tile=128, decode_num_warps=4, decode_num_stages=2),
    )

  text = (
    jax.jit(call)
    .trace(q, kv, kv, jnp.asarray(table), jnp.asarray(lengths), p, s)
    .lower(lowering_platforms=("cuda",))
    .as_text()
  )
  assert "paxcache_persistent_decode_bs16" in text and "paxcache_planned_decode_merge" in text
