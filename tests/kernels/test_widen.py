"""The GPU kernels' 8-bit K/V widenings (kernels/gpu/_widen.py), value by value.

Every int8 value and every e4m3 byte goes through each widening and is compared with the
value NumPy / ml_dtypes give it in float64: the widenings must be exact, not close. The
kernels that use them are checked end to end in test_quant.py and test_gpu_plan.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import kernels
from kernels import gpu
from kernels.gpu import _widen

ALL_BYTES = np.arange(256, dtype=np.uint8)


def test_int8_magic_number_is_exact_for_every_value():
  x = np.arange(-128, 128, dtype=np.int8)
  got = np.asarray(jax.jit(_widen.widen_int8_f16)(jnp.asarray(x)))
  assert got.dtype == np.float16
  np.testing.assert_array_equal(got.astype(np.float64), x.astype(np.float64))
  assert not np.signbit(got[x == 0]).any()  # 0 is +0, never -0


def test_e4m3_bit_trick_is_exact_for_every_finite_byte():
  e4m3 = ALL_BYTES.view(ml_dtypes.float8_e4m3fn)
  want = e4m3.astype(np.float64)
  finite = np.isfinite(want)
  assert finite.sum() == 254  # e4m3fn: no inf, NaN at 0x7F and 0xFF only
  got = np.asarray(jax.jit(_widen.widen_e4m3_f16_bits)(jnp.asarray(e4m3)))
  assert got.dtype == np.float16
  scaled = got.astype(np.float64) * _widen.E4M3_BITS_FACTOR
  np.testing.assert_array_equal(scaled[finite], want[finite])
  # Signs too: -0 (0x80) stays -0, so that every bit of the f16 is as the rule says.
  np.testing.assert_array_equal(np.signbit(got[finite]), np.signbit(want[finite]))
  # Subnormal e4m3 (exponent field 0, mantissa != 0) became f16 subnormals: still exact.
  sub = (ALL_BYTES & 0x78 == 0) & (ALL_BYTES & 0x07 != 0)
  assert sub.sum() == 14 and (np.abs(got[sub]) < np.float16(2**-14)).all()
  # The NaN bytes come out finite (why the kernels mask unused slots at the load).
  assert np.isfinite(got[~finite]).all()


def test_e4m3_cast_to_f16_is_exact_for_every_finite_byte():
  e4m3 = ALL_BYTES.view(ml_dtypes.float8_e4m3fn)
  want = e4m3.astype(np.float64)
  finite = np.isfinite(want)
  w = _widen.widening(jnp.bfloat16, jnp.float8_e4m3fn, "f16")
  got = np.asarray(w.widen(jnp.asarray(e4m3)))
  assert got.dtype == np.float16 and w.k_factor == 1.0
  np.testing.assert_array_equal(got[finite].astype(np.float64), want[finite])


@pytest.mark.parametrize(
  "q_dtype, kv_dtype, mode, cdtype, kind",
  [
    (jnp.bfloat16, jnp.int8, "f16", "float16", "int8_magic"),
    (jnp.bfloat16, jnp.int8, "f16_bits", "float16", "int8_magic"),
    (jnp.float16, jnp.int8, "f16", "float16", "int8_magic"),
    (jnp.bfloat16, jnp.float8_e4m3fn, "f16", "float16", "e4m3_cast"),
    (jnp.bfloat16, jnp.float8_e4m3fn, "f16_bits", "float16", "e4m3_bits"),
    (jnp.bfloat16, jnp.int8, "q_dtype", "bfloat16", "cast"),  # the old path
    (jnp.bfloat16, jnp.int8, "int8_qk", "bfloat16", "int8_qk"),  # V as q_dtype
    (jnp.float16, jnp.int8, "int8_qk", "float16", "int8_qk"),
    (jnp.bfloat16, jnp.int8, "int8_qkv", "bfloat16", "int8_qkv"),
    (jnp.bfloat16, jnp.float8_e4m3fn, "int8_qkv", "float16", "e4m3_cast"),
    (jnp.bfloat16, jnp.float8_e4m3fn, "int8_qk", "float16", "e4m3_cast"),  # e4m3: as "f16"
    (jnp.float32, jnp.int8, "int8_qk", "float32", "cast"),
    # "auto": the fastest measured on the H200 per dtype (_widen.AUTO_WIDEN).
    (jnp.bfloat16, jnp.int8, "auto", "bfloat16", "int8_qk"),
    (jnp.bfloat16, jnp.float8_e4m3fn, "auto", "float16", "e4m3_cast"),
    (jnp.float32, jnp.float8_e4m3fn, "auto", "float32", "cast"),
    (jnp.bfloat16, jnp.bfloat16, "auto", "bfloat16", "cast"),
    (jnp.float32, jnp.int8, "f16", "float32", "cast"),  # f32 q keeps f32 dots
    (jnp.float32, jnp.float8_e4m3fn, "f16_bits", "float32", "cast"),
    (jnp.bfloat16, jnp.bfloat16, "f16", "bfloat16", "cast"),  # not 8-bit: unchanged
    (jnp.bfloat16, jnp.float32, "f16", "float32", "cast"),
  ],
)
def test_widening_per_dtype_and_mode(q_dtype, kv_dtype, mode, cdtype, kind):
  w = _widen.widening(q_dtype, kv_dtype, mode)
  assert (w.cdtype, w.kind) == (cdtype, kind)
  assert w.k_factor == (256.0 if kind == "e4m3_bits" else 1.0)


def test_auto_keeps_int8_on_q_dtype_in_the_matmul_kernels():
  # The prefill and the cascade's shared kernel (matmul=True) were never timed over 8-bit
  # K/V: "auto" keeps int8 on the bf16 widening there; explicit modes apply as given.
  w = _widen.widening
  assert w(jnp.bfloat16, jnp.int8, "auto", matmul=True).kind == "cast"
  assert w(jnp.bfloat16, jnp.int8, "auto").kind == "int8_qk"
  assert w(jnp.bfloat16, jnp.float8_e4m3fn, "auto", matmul=True).kind == "e4m3_cast"
  assert w(jnp.bfloat16, jnp.int8, "int8_qk", matmul=True).kind == "int8_qk"


def test_unknown_modes_are_refused():
  with pytest.raises(ValueError, match="quant_widen must be one of"):
    _widen.widening(jnp.bfloat16, jnp.int8, "bf16")
  with pytest.raises(ValueError, match=r"BlockSizes.quant_widen must be one of"):
    gpu.BlockSizes(quant_widen="int8")
  assert gpu.BlockSizes().quant_widen == _widen.DEFAULT_QUANT_WIDEN == "auto"
  from kernels.gpu.cascade import CascadeBlockSizes

  with pytest.raises(ValueError, match=r"CascadeBlockSizes.quant_widen must be one of"):
    CascadeBlockSizes(quant_widen="fp8")
  # Hashable, so it stays a static jit argument.
  assert hash(dataclasses.replace(gpu.BlockSizes(), quant_widen="q_dtype")) is not None


def test_query_is_clipped_to_the_f16_range_in_the_16bit_modes():
  q = jnp.asarray([[1e5, -3e38, 1.5, 2.0**-20, 0.0]], jnp.bfloat16)
  got = np.asarray(_widen.widening(jnp.bfloat16, jnp.int8, "f16").query(q), np.float64)
  want = np.clip(np.asarray(q, np.float64), -65504.0, 65504.0)
  np.testing.assert_array_equal(got, want)  # 2**-20: an f16 subnormal, still exact
  # The old path casts to bf16 as before (no clip needed: bf16 has f32's range).
  old = _widen.widening(jnp.bfloat16, jnp.int8, "q_dtype").query(q)
  assert old.dtype == jnp.bfloat16 and float(old[0, 1]) == float(q[0, 1])


def test_int8_query_split_is_within_its_bound_and_scores_match_float64():
  # hi * s_hi + lo * s_lo equals q within max|q_row| / 64516 per entry (hand-worked bound:
  # lo's rounding, s_lo / 2 = s_hi / 508 = max / (127 * 508)); rows of very different
  # magnitudes, a zero row, a row with one entry at the max.
  rng = np.random.default_rng(5)
  q = rng.standard_normal((7, 64)) * np.array([1.0, 1e-3, 3e2, 0.0, 1.0, 1e-8, 1e-36])[:, None]
  q[4] = 0.0
  q[4, 7] = -5.0
  q = jnp.asarray(q, jnp.bfloat16)
  w = _widen.widening(jnp.bfloat16, jnp.int8, "int8_qk")
  hi, lo, s_hi, s_lo = jax.jit(w.query_state)(q)
  assert hi.dtype == lo.dtype == jnp.int8
  hi64, lo64 = np.asarray(hi, np.float64), np.asarray(lo, np.float64)
  assert np.abs(hi64).max() <= 127 and np.abs(lo64).max() <= 127
  back = hi64 * np.asarray(s_hi, np.float64)[:, None] + lo64 * np.asarray(s_lo, np.float64)[:, None]
  q64 = np.asarray(q, np.float64)
  amax = np.abs(q64).max(axis=1)
  # float32 scale arithmetic adds a few ulps of amax on top of the rounding bound.
  assert (np.abs(back - q64).max(axis=1)[:6] <= (amax / 64516 + amax * 2**-21)[:6]).all()
  assert not hi64[3].any() and not lo64[3].any()  # the zero row
  # A row under INT8_SPLIT_TINY (2**-100) is split as zeros with finite scales (its scales
  # would be float32 subnormals): absolute error under 2**-100 per entry.
  assert not hi64[6].any() and not lo64[6].any()
  assert np.isfinite(np.asarray(s_hi)).all() and np.asarray(s_lo)[6] > 0
  assert np.abs(back[6] - q64[6]).max() < 2.0**-100
  # scores: the two integer dots against a float64 q . k, for int8 K with masked (zero) rows.
  k = rng.integers(-127, 128, (16, 64)).astype(np.int8)
  k[5] = 0

  def dot(a, b, trans_b=False):
    out = jnp.int32 if a.dtype == jnp.int8 else jnp.float32
    return jnp.dot(a, b.T if trans_b else b, preferred_element_type=out)

  scores = jax.jit(lambda qs, kk: w.scores(qs, kk, dot=dot))
  got = np.asarray(scores((hi, lo, s_hi, s_lo), jnp.asarray(k)))
  want = q64 @ k.astype(np.float64).T
  err = np.abs(got - want) / (amax[:, None] * np.abs(k).sum(axis=1)[None, :] + 1e-300)
  assert err[:6].max() <= 1 / 64516 + 2**-20  # (row 6: the absolute bound above)


def test_pv_operand_is_in_unit_range_and_scales_back():
  rng = np.random.default_rng(0)
  p = rng.uniform(0, 1, (4, 16)).astype(np.float32)
  vs = (rng.uniform(0.5, 1, 16) * 1e-6).astype(np.float32)  # V rows ~1e-4: tiny scales
  vs[3] = 0.0  # a masked key
  for mode, kv in (("f16", jnp.int8), ("f16_bits", jnp.float8_e4m3fn)):
    w = _widen.widening(jnp.bfloat16, kv, mode)
    op, factor = w.pv_operand(jnp.asarray(p), jnp.asarray(vs))
    op64 = np.asarray(op, np.float64)
    assert op.dtype == jnp.float16 and op64.max() <= 1.0 and op64.min() >= 0.0
    # op * factor / k_factor is p * vs to f16's rounding (relative 2**-11 at normal values).
    back = op64 * float(factor) / w.k_factor
    np.testing.assert_allclose(back, p * vs.astype(np.float64), rtol=2**-11, atol=0)
  all_masked = _widen.widening(jnp.bfloat16, jnp.int8, "f16").pv_operand(
    jnp.asarray(p), jnp.zeros(16, jnp.float32)
  )
  assert float(all_masked[1]) == 1.0 and not np.asarray(all_masked[0], np.float32).any()


@pytest.mark.parametrize("mode", _widen.QUANT_WIDEN_MODES)
@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
def test_8bit_kernels_lower_to_triton_ir_for_an_h200(monkeypatch, kv_dtype, mode):
  # As the other lowering tests (test_gpu_plan.py, test_cascade.py): an H200's compute
  # capability stubbed (a private JAX module, pinned to jax 0.11), then every Triton kernel
  # that reads 8-bit K/V lowered to Triton IR with bf16 q in each mode: the int16 add, the
  # shifts and the int16 -> f16 bitcast must have Triton lowerings (interpret mode cannot
  # tell). The kernel names carry the widening, so the mode is seen to reach each kernel.
  # Not compiled to PTX: the H200 run (experiments/bench/gpu_decode.py --kv-quant) does.
  from jax._src.pallas.triton import gpu_info, pallas_call_registration

  from kernels.gpu.cascade import CascadeBlockSizes, _cascade
  from kernels.gpu.plan import plan_decode

  info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: info)
  sds = jax.ShapeDtypeStruct
  lengths = np.array([300, 5, 1000, 0], np.int32)
  need = -(-lengths // 16)
  table = np.full((4, int(need.max())), -1, np.int32)
  table[np.arange(table.shape[1])[None] < need[:, None]] = np.arange(int(need.sum()))
  tb, ln = jnp.asarray(table), jnp.asarray(lengths)
  kv = sds((8, int(need.sum()) + 1, 16, 128), kv_dtype)
  sc = sds(kv.shape[:3], jnp.float32)
  w = _widen.widening(jnp.bfloat16, kv_dtype, mode)
  suffix = w.name_suffix
  resolved = _widen.AUTO_WIDEN[jnp.dtype(kv_dtype).name] if mode == "auto" else mode
  assert (suffix == "") == (resolved == "q_dtype")
  bsz = gpu.BlockSizes(decode_num_splits=4, quant_widen=mode)

  def text(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

  q = sds((4, 32, 128), jnp.bfloat16)

  def attend(q, k, v, table, lengths, ks, vs, *rest, **kw):
    return gpu.paged_attention(
      q, k, v, table, lengths, *rest, block_sizes=bsz, k_scales=ks, v_scales=vs, **kw
    )

  got = text(attend, q, kv, kv, tb, ln, sc, sc)
  assert f"paxcache_paged_decode_bs16_t64_s4{suffix}" in got
  p = plan_decode(lengths, 16, 8)
  got = text(lambda *a: attend(*a[:7], decode_plan=a[7]), q, kv, kv, tb, ln, sc, sc, p)
  assert f"paxcache_planned_decode_bs16_t64{suffix}" in got
  qp = sds((64, 32, 128), jnp.bfloat16)
  cu = jnp.array([0, 30, 31, 40, 40], jnp.int32)
  got = text(attend, qp, kv, kv, tb, ln, sc, sc, cu)
  # The prefill and the cascade's shared kernel resolve "auto" by AUTO_WIDEN_MATMUL (int8
  # keeps q_dtype there: unmeasured for 8-bit K/V), the decode kernels by AUTO_WIDEN.
  mm = _widen.widening(jnp.bfloat16, kv_dtype, mode, matmul=True).name_suffix
  if mode != "auto":
    assert mm == suffix
  assert "paxcache_paged_prefill" in got and (not mm or mm in got)
  plan = kernels.CascadePlan(
    sds((1, 32), jnp.int32), sds((1,), jnp.int32), sds((1, 4), jnp.int32), sds((4,), jnp.int32)
  )
  # 8-bit K/V: what cascade_attention resolves "auto" to on every card.
  sizes = CascadeBlockSizes(quant_widen=mode, shared_kernel="triton")
  got = text(
    lambda *a: _cascade(
      *a[:6], scale=0.1, logit_soft_cap=None, block_sizes=sizes, interpret=False,
      k_scales=a[6], v_scales=a[7],
    ),
    q, kv, kv, tb, ln, plan, sc, sc,
  )  # fmt: skip
  assert "paxcache_cascade_shared" in got
  if suffix and mm == suffix:
    assert got.count(suffix) >= 2  # shared and own
  elif suffix:
    assert suffix in got  # the own part's decode
