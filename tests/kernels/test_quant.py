"""8-bit K/V (int8, float8 e4m3) with per-(KV head, token) scales: quantize, write, attend.

Every quantized attention path (reference, Pallas GPU in interpret mode, Pallas TPU in
TPU interpret mode; decode and ragged) is checked against dequantise-then-attend in
float64 NumPy: the 8-bit rows and their scales are widened to float64 and multiplied
there, then a plain loop attends. Unused blocks and the slots past each length hold NaN
scales and NaN (fp8) or extreme (int8) values, so a kernel that reads or multiplies one
fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.testing import rel_l2_error, tolerance

QDTYPES = [pytest.param(jnp.int8, id="int8"), pytest.param(jnp.float8_e4m3fn, id="fp8")]


# ------------------------------------------------------------------- quantize round trip


@pytest.mark.parametrize("dtype", QDTYPES)
def test_round_trip_error_bound(dtype):
  rng = np.random.default_rng(0)
  # Rows of very different magnitudes, a zero row, a row with one huge outlier.
  x = rng.standard_normal((6, 3, 64)) * np.array([1e-3, 1.0, 30.0, 1e4, 1.0, 1.0])[:, None, None]
  x[4] = 0.0
  x[5, :, 7] = 1e3
  x = jnp.asarray(x, jnp.float32)
  q, s = kernels.quantize(x, dtype)
  assert q.dtype == jnp.dtype(dtype) and s.dtype == jnp.float32 and s.shape == x.shape[:2]
  x64 = np.asarray(x, np.float64)
  s64 = np.asarray(s, np.float64)
  qmax = 127.0 if dtype == jnp.int8 else 448.0
  # scale = max|x| / qmax, to float32 rounding.
  np.testing.assert_allclose(s64, np.abs(x64).max(-1) / qmax, rtol=2**-23, atol=0)
  deq = np.asarray(q, np.float64) * s64[..., None]
  err = np.abs(x64 - deq)
  assert not np.isnan(deq).any()
  assert (deq[4] == 0).all() and (s64[4] == 0).all()  # zero rows: scale 0, reads back 0
  if dtype == jnp.int8:
    # Rounding x / s to an integer moves it by at most 1/2: |x - q s| <= s / 2; x / s is
    # one float32 division (relative 2**-24 of |x/s| <= 127), hence the tiny slack.
    bound = s64[..., None] * (0.5 + 127 * 2**-23)
  else:
    # e4m3: 3 mantissa bits, so a normal value (>= 2**-6) rounds by at most 2**-4 of
    # itself; below that the step is the subnormal 2**-9, so at most 2**-10 (times s).
    bound = np.maximum(np.abs(x64) * 2**-4, s64[..., None] * 2**-10) * (1 + 2**-20)
  assert (err <= bound).all(), float((err / np.maximum(bound, 1e-300)).max())
  # ... and the bound is not vacuous: int8 error reaches a sizeable part of it.
  if dtype == jnp.int8:
    assert (err / np.maximum(bound, 1e-300)).max() > 0.9


def test_round_half_even_is_numpys_round():
  # kernels._quant.round_half_even (floor-based, so that the GPU kernels' fused write can run
  # the cache write's quantizer) against NumPy's round, which also breaks ties to even:
  # every half-integer in [-130, 130], and random values.
  from kernels._quant import round_half_even

  halves = np.arange(-260, 261, dtype=np.float32) / 2
  rand = np.random.default_rng(3).uniform(-127.5, 127.5, 10_000).astype(np.float32)
  for y in (halves, rand):
    np.testing.assert_array_equal(np.asarray(round_half_even(jnp.asarray(y))), np.round(y))


@pytest.mark.parametrize("dtype", QDTYPES)
def test_a_row_holding_nan_gets_a_nan_scale_and_a_zero_row(dtype):
  # Found apart from the max (a Triton max drops NaN, XLA's keeps it), so the decode
  # kernels' fused write, which runs this function, stores what the cache write stores.
  x = np.ones((3, 8), np.float32)
  x[1, 3] = np.nan
  q, s = kernels.quantize(jnp.asarray(x), dtype)
  s = np.asarray(s)
  assert np.isnan(s[1]) and not np.isnan(s[[0, 2]]).any()
  np.testing.assert_array_equal(np.asarray(q, np.float32)[1], 0.0)
  np.testing.assert_array_equal(np.asarray(q, np.float32)[[0, 2]] * s[[0, 2], None], 1.0)


def test_write_quantizes_into_slots_and_pads_nothing():
  rng = np.random.default_rng(1)
  h, nb, bs, d = 2, 3, 4, 8
  k = jnp.zeros((h, nb, bs, d), jnp.int8)
  ks = jnp.full((h, nb, bs), -1.0, jnp.float32)
  new_k = jnp.asarray(rng.standard_normal((3, h, d)), jnp.float32)
  new_v = jnp.asarray(rng.standard_normal((3, h, d)), jnp.float32)  # unlike K's rows
  slots = np.array([5, -1, 11], np.int32)
  v = jnp.full((h, nb, bs, d), 7, jnp.int8)  # V's own pool, so a V row written wrong shows
  k2, v2, ks2, vs2 = kernels.write_kv_quantized(k, v, ks, ks, new_k, new_v, slots)
  want_q, want_s = kernels.quantize(new_k, jnp.int8)
  want_vq, want_vs = kernels.quantize(new_v, jnp.int8)
  for row, slot in ((0, 5), (2, 11)):
    b, i = divmod(slot, bs)
    np.testing.assert_array_equal(np.asarray(k2[:, b, i]), np.asarray(want_q[row]))
    np.testing.assert_array_equal(np.asarray(ks2[:, b, i]), np.asarray(want_s[row]))
    np.testing.assert_array_equal(np.asarray(v2[:, b, i]), np.asarray(want_vq[row]))
    np.testing.assert_array_equal(np.asarray(vs2[:, b, i]), np.asarray(want_vs[row]))
  untouched = np.ones((nb * bs,), bool)
  untouched[[5, 11]] = False
  assert (np.asarray(ks2).reshape(h, -1)[:, untouched] == -1).all()
  assert (np.asarray(v2).reshape(h, -1, d)[:, untouched] == 7).all()
  assert (np.asarray(k2).reshape(h, -1, d)[:, untouched] == 0).all()
  with pytest.raises(ValueError, match="write_kv_quantized"):
    kernels.write_kv(k, k, new_k, new_v, slots)
  with pytest.raises(ValueError, match="k_scales"):
    kernels.write_kv_quantized(k, k, ks[:, :, :2], ks, new_k, new_v, slots)


# ------------------------------------------------------------------- attention cases


def make_case(rng, lengths, q_lens=None, *, dtype, block_size, head_dim, heads=(4, 2), q_dtype):
  """Quantized pools with a shuffled block table; unused slots hold poison."""
  num_q_heads, num_kv_heads = heads
  lengths = np.asarray(lengths, np.int32)
  need = [-(-int(n) // block_size) for n in lengths]
  max_blocks = max(max(need), 1) + 1
  num_blocks = sum(need) + 2
  perm = rng.permutation(num_blocks)
  table = np.full((len(lengths), max_blocks), -1, np.int32)
  used = np.zeros((num_blocks, block_size), bool)
  taken = 0
  for b, n in enumerate(need):
    table[b, :n] = perm[taken : taken + n]
    taken += n
    for p in range(lengths[b]):
      used[table[b, p // block_size], p % block_size] = True
  shape = (num_kv_heads, num_blocks, block_size, head_dim)
  # Rows of different magnitudes, so that the scales matter.
  mag = np.exp(rng.uniform(-1, 1, shape[:3]))[..., None]  # scales differ 7x between rows
  kq, ks = kernels.quantize(jnp.asarray(rng.standard_normal(shape) * mag, jnp.float32), dtype)
  vq, vs = kernels.quantize(jnp.asarray(rng.standard_normal(shape) * mag, jnp.float32), dtype)
  poison = np.broadcast_to(~used, shape[:3])
  if jnp.dtype(dtype) == jnp.int8:
    bad = np.int8(-128)  # outside the symmetric range: a read shows up in the output
  else:
    bad = np.asarray(np.nan, jnp.float8_e4m3fn)
  kq, vq = (np.asarray(x).copy() for x in (kq, vq))
  kq[poison], vq[poison] = bad, bad
  ks, vs = (np.asarray(x).copy() for x in (ks, vs))
  ks[poison], vs[poison] = np.nan, np.nan
  if q_lens is None:
    cu, rows = None, len(lengths)
  else:
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    rows = int(cu[-1]) + 2  # two padding rows past cu[-1]
  q = jnp.asarray(rng.standard_normal((rows, num_q_heads, head_dim)), q_dtype)
  return dict(
    q=q,
    k_blocks=jnp.asarray(kq),
    v_blocks=jnp.asarray(vq),
    block_table=jnp.asarray(table),
    lengths=jnp.asarray(lengths),
    cu_q_lens=None if cu is None else jnp.asarray(cu),
    k_scales=jnp.asarray(ks),
    v_scales=jnp.asarray(vs),
  )


def dequantised_oracle(q, k_blocks, v_blocks, block_table, lengths, cu_q_lens, k_scales, v_scales):
  """Dequantise in float64 (row * scale), then paged attention one row and head at a time."""
  q = np.asarray(jnp.asarray(q, jnp.float32), np.float64)
  k = np.asarray(k_blocks, np.float64) * np.asarray(k_scales, np.float64)[..., None]
  v = np.asarray(v_blocks, np.float64) * np.asarray(v_scales, np.float64)[..., None]
  table, lengths = np.asarray(block_table), np.asarray(lengths)
  num_kv_heads, _, block_size, head_dim = k.shape
  group = q.shape[1] // num_kv_heads
  batch = len(lengths)
  cu = np.arange(batch + 1) if cu_q_lens is None else np.asarray(cu_q_lens)
  out = np.zeros(q.shape)
  for b in range(batch):
    q_len = cu[b + 1] - cu[b]
    for i in range(q_len):
      row, pos = cu[b] + i, lengths[b] - q_len + i
      keys = np.arange(pos + 1)
      if not len(keys):
        continue
      blocks, slots = table[b, keys // block_size], keys % block_size
      for h in range(q.shape[1]):
        kk, vv = k[h // group, blocks, slots], v[h // group, blocks, slots]
        s = (kk @ q[row, h]) * head_dim**-0.5
        p = np.exp(s - s.max())
        out[row, h] = p @ vv / p.sum()
  return out


def check(out, case, q_dtype, *, rel_l2=False):
  """Elementwise against the oracle; ``rel_l2``: relative L2 (the GPU kernels, and the TPU
  kernels with bf16 q, round p to q's dtype before p @ v, as every bf16 flash kernel does,
  see kernels/testing.py)."""
  want = dequantised_oracle(**case)
  got = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  assert not np.isnan(got).any(), "NaN from an unused slot leaked into the output"
  if rel_l2:
    err = rel_l2_error(got, want)
    assert err < tolerance("quantized_gpu_vs_float64_rel_l2", q_dtype).rtol, err
    return
  np.testing.assert_allclose(
    got, want, **tolerance("quantized_attention_vs_float64", q_dtype), equal_nan=False
  )


DECODE_LENGTHS = [0, 1, 3, 4, 5, 9, 17]
RAGGED = ([9, 6, 1, 0, 12], [4, 6, 1, 0, 3])  # lengths, q_lens: prefill, chunk, decode, empty


@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize("ragged", [False, True], ids=["decode", "ragged"])
def test_reference(dtype, ragged):
  rng = np.random.default_rng(2)
  lengths, q_lens = RAGGED if ragged else (DECODE_LENGTHS, None)
  case = make_case(
    rng, lengths, q_lens, dtype=dtype, block_size=4, head_dim=16, q_dtype=jnp.float32
  )
  out = kernels.paged_attention(**case, backend="reference")
  check(out, case, jnp.float32)


@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize("ragged", [False, True], ids=["decode", "ragged"])
@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16], ids=["f32q", "bf16q"])
def test_gpu_interpret(dtype, ragged, q_dtype):
  from kernels import gpu

  rng = np.random.default_rng(3)
  lengths, q_lens = RAGGED if ragged else (DECODE_LENGTHS, None)
  case = make_case(rng, lengths, q_lens, dtype=dtype, block_size=4, head_dim=64, q_dtype=q_dtype)
  # A kv tile of 16 spans four blocks; two splits exercise the split-K combine.
  bs = gpu.BlockSizes(decode_kv_tile=16, decode_num_splits=2, prefill_q_tile=16, prefill_kv_tile=16)
  out = kernels.paged_attention(**case, backend="gpu", interpret=True, block_sizes=bs)
  check(out, case, q_dtype, rel_l2=q_dtype == jnp.bfloat16)


@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize("ragged", [False, True], ids=["decode", "ragged"])
@pytest.mark.parametrize("mode", ["q_dtype", "f16_bits", "int8_qk", "int8_qkv"])
def test_gpu_interpret_other_widenings(dtype, ragged, mode):
  # test_gpu_interpret runs the default widening (kernels/gpu/_widen.py); the old bf16
  # path, the e4m3 bit trick (int8 takes the magic number in both f16 modes) and int8's
  # q . K (and p @ V) by integer dots (e4m3 takes "f16" there) must meet the same bound.
  from kernels import gpu

  rng = np.random.default_rng(3)
  lengths, q_lens = RAGGED if ragged else (DECODE_LENGTHS, None)
  case = make_case(
    rng, lengths, q_lens, dtype=dtype, block_size=4, head_dim=64, q_dtype=jnp.bfloat16
  )
  bs = gpu.BlockSizes(
    decode_kv_tile=16,
    decode_num_splits=2,
    prefill_q_tile=16,
    prefill_kv_tile=16,
    quant_widen=mode,
  )
  out = kernels.paged_attention(**case, backend="gpu", interpret=True, block_sizes=bs)
  check(out, case, jnp.bfloat16, rel_l2=True)


@pytest.mark.parametrize(
  "dtype, mode",
  [
    pytest.param(jnp.int8, "f16", id="int8"),
    pytest.param(jnp.float8_e4m3fn, "f16", id="fp8"),
    pytest.param(jnp.float8_e4m3fn, "f16_bits", id="fp8-bits"),
  ],
)
@pytest.mark.parametrize("v_scale", [1e-4, 1e5])
def test_gpu_f16_widening_with_tiny_and_huge_v_scales(dtype, mode, v_scale):
  # V rows of magnitude ~1e-4 (scales ~1e-6): p * v_scale alone would be an f16 subnormal
  # (measured 1.0e-2 (int8) and 4.0e-2 (fp8, bit trick) relative L2 without the per-step
  # normalisation of kernels/gpu/_widen.py, against 1.7e-3 with it). V rows ~1e5 times
  # larger: p * v_scale * 2**8 (the bit trick's factor put on p) passes f16's 65504 (measured:
  # NaN), p * v_scale / vmax cannot. Decode only: prefill shares the code.
  from kernels import gpu

  rng = np.random.default_rng(7)
  case = make_case(
    rng, DECODE_LENGTHS, dtype=dtype, block_size=4, head_dim=64, q_dtype=jnp.bfloat16
  )
  case["v_scales"] = case["v_scales"] * v_scale  # NaN stays NaN in the unused slots
  bs = gpu.BlockSizes(decode_kv_tile=16, decode_num_splits=2, quant_widen=mode)
  out = kernels.paged_attention(**case, backend="gpu", interpret=True, block_sizes=bs)
  check(out, case, jnp.bfloat16, rel_l2=True)


# ------------------------------------------------------------------- refused inputs


def _small(dtype=jnp.int8):
  rng = np.random.default_rng(4)
  return make_case(
    rng, [3, 5], dtype=dtype, block_size=4, head_dim=16, q_dtype=jnp.float32, heads=(2, 2)
  )


def test_missing_scales_raise_naming_the_argument():
  case = _small()
  for name in ("k_scales", "v_scales"):
    bad = dict(case, **{name: None})
    with pytest.raises(ValueError, match=f"{name} is required"):
      kernels.paged_attention(**bad, backend="reference")


def test_scales_with_float_kv_raise():
  case = _small()
  f = dict(
    case,
    k_blocks=case["k_blocks"].astype(jnp.bfloat16),
    v_blocks=case["v_blocks"].astype(jnp.bfloat16),
  )
  with pytest.raises(ValueError, match="k_scales given with bfloat16"):
    kernels.paged_attention(**f, backend="reference")
  with pytest.raises(ValueError, match="v_scales given with bfloat16"):
    kernels.paged_attention(**dict(f, k_scales=None), backend="reference")


@pytest.mark.parametrize(
  "name,bad",
  [
    ("k_scales", lambda s: s[:, :, :2]),
    ("v_scales", lambda s: s[None]),
    ("k_scales", lambda s: s.astype(jnp.bfloat16)),
  ],
  ids=["short", "rank", "dtype"],
)
def test_wrong_scale_shapes_raise(name, bad):
  case = _small()
  case[name] = bad(case[name])
  with pytest.raises(ValueError, match=f"{name} must be float32"):
    kernels.paged_attention(**case, backend="reference")


def test_q_must_stay_float():
  case = _small()
  case["q"] = case["q"].astype(jnp.int8)
  with pytest.raises(ValueError, match="q must be float32"):
    kernels.paged_attention(**case, backend="reference")


def test_mosaic_prefill_refuses_8bit():
  from kernels import gpu

  with pytest.raises(ValueError, match="Mosaic GPU prefill"):
    gpu.kernel_backend(
      "prefill",
      q_dtype=jnp.bfloat16,
      kv_dtype=jnp.int8,
      head_dim=64,
      block_size=16,
      requested="mosaic",
      interpret=True,
    )
  assert (
    gpu.kernel_backend(
      "prefill", q_dtype=jnp.bfloat16, kv_dtype=jnp.int8, head_dim=64, block_size=16
    )
    == "triton"
  )


# ------------------------------------------------------------------- TPU interpret mode


@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize("ragged", [False, True], ids=["decode", "ragged"])
@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16], ids=["f32q", "bf16q"])
def test_tpu_interpret(dtype, ragged, q_dtype):
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as state
  from jax.experimental.pallas import tpu as pltpu

  from kernels import tpu

  pltpu.reset_tpu_interpret_mode_state()
  params = pltpu.InterpretParams(
    detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan"
  )
  rng = np.random.default_rng(5)
  # block_size 128: the smallest an 8-bit TPU pool takes (kernels/tpu/_config.py). Lengths
  # cover 0, one slot, a block edge, and more blocks than one chunk of 2 blocks.
  lengths, q_lens = ([140, 7, 0, 300], [9, 7, 0, 1]) if ragged else ([0, 1, 128, 129, 300], None)
  case = make_case(rng, lengths, q_lens, dtype=dtype, block_size=128, head_dim=128, q_dtype=q_dtype)
  bs = tpu.BlockSizes(blocks_per_chunk=2, kv_heads_per_step=None if ragged else 2)
  out = kernels.paged_attention(**case, backend="tpu", interpret=params, block_sizes=bs)
  # bf16 q: p * v_scale is rounded to bf16 for the p @ V product (issue 18, item 3), as in
  # the GPU kernels, so the bound is theirs.
  check(out, case, q_dtype, rel_l2=jnp.dtype(q_dtype) == jnp.bfloat16)
  assert not state.races.races_found


def test_tpu_refuses_8bit_blocks_whose_scales_are_not_one_512_byte_dma():
  from kernels import tpu

  rng = np.random.default_rng(6)
  case = make_case(rng, [5], dtype=jnp.int8, block_size=32, head_dim=128, q_dtype=jnp.float32)
  with pytest.raises(ValueError, match="block_size must be a multiple of 128 for 8-bit"):
    tpu.paged_attention(**case, interpret=True)


@pytest.mark.parametrize("head_dim", [2, 16, 64, 80, 96, 112, 128, 192, 256])
def test_hadamard_rotate_is_the_normalised_sylvester_matrix(head_dim):
  """Against the explicit float64 matrix: blocks H_b / sqrt(b) (Sylvester's order, b the
  largest power of two dividing head_dim) on the diagonal; orthonormal and its own
  inverse, so dot products are kept."""
  b = head_dim & -head_dim
  assert kernels._quant.rotation_block(head_dim) == b
  h = np.ones((1, 1))
  while h.shape[0] < b:
    h = np.block([[h, h], [h, -h]])
  r = np.kron(np.eye(head_dim // b), h / np.sqrt(b))
  rng = np.random.default_rng(head_dim)
  x = rng.standard_normal((3, 5, head_dim)) * np.exp(rng.uniform(-3, 3, (3, 5, 1)))
  got = np.asarray(kernels.hadamard_rotate(jnp.asarray(x, jnp.float32)), np.float64)
  assert kernels.hadamard_rotate(x).dtype == jnp.float32
  # One product at full float32 precision (a GPU would otherwise round to TF32 first; the
  # CPU computes the same either way, so the jaxpr is what shows it).
  eqns = [e for e in jax.make_jaxpr(kernels.hadamard_rotate)(x).jaxpr.eqns]
  dots = [e for e in eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 1 and "HIGHEST" in str(dots[0].params["precision"]), dots
  np.testing.assert_allclose(got, x @ r, rtol=1e-5, atol=1e-5 * np.abs(x).max())
  back = np.asarray(kernels.hadamard_rotate(kernels.hadamard_rotate(x)), np.float64)
  np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-5 * np.abs(x).max())
  y = rng.standard_normal((3, 5, head_dim))
  dots = np.sum(got * np.asarray(kernels.hadamard_rotate(y), np.float64), -1)
  # The same bound as above: the dots' float32 error measured at most a tenth of it.
  np.testing.assert_allclose(dots, np.sum(x * y, -1), rtol=1e-5, atol=1e-5 * np.abs(x).max())


def test_rotation_block_refuses_a_width_below_one():
  with pytest.raises(ValueError, match="head_dim must be >= 1, got 0"):
    kernels._quant.rotation_block(0)
