"""How the GPU kernels widen 8-bit K/V (int8, float8_e4m3fn) for their two dots.

The decode of an 8-bit pool is memory-bound, so the instructions spent per loaded byte
count. The old path (``quant_widen="q_dtype"``) widens every K and V element to q's dtype
with ``astype``: with bf16 q that is an int->float conversion per int8 element (a
quarter-rate instruction on Hopper) and e4m3 -> f16 -> f32 -> bf16 per e4m3 element (how
Triton's Hopper lowering reads, docs/benchmarks.md). The 16-bit modes run both dots in
float16 instead (still f32 accumulation) and widen cheaply:

* int8 -> f16, "magic number": sign-extend to int16, add ``0x6480``, bitcast to f16,
  subtract 1152. f16 ``0x6400`` is 1024 with a mantissa step of exactly 1 up to 2048, and
  ``x + 0x6480 = 0x6400 + (x + 128)`` with ``x + 128`` in [0, 255], so the bits are the
  f16 ``1152 + x`` exactly and the subtraction (of a value within 2x) is exact (Sterbenz):
  integer add, a free bitcast and one f16 subtract, no int->float conversion.
* e4m3 -> f16 (mode ``"f16"``): ``astype(float16)`` (``tt.fp_to_fp``), which Hopper can do
  with one native e4m3x2 -> f16x2 conversion per two elements (whether Triton emits that is
  for the H200's PTX to show); exact, since f16 holds every e4m3 value.
* e4m3 -> f16 (mode ``"f16_bits"``): integer ops only. The f16 with bits
  ``((b & 0x80) << 8) | ((b & 0x7F) << 7)`` is the e4m3 value of byte ``b`` times 2**-8:
  the sign moves to bit 15, the 4 exponent bits land in the low 4 of f16's 5 (so the
  biased exponent is the same number, and the biases 7 and 15 differ by 8) and the 3
  mantissa bits become the top 3 of f16's 10. Subnormals map to subnormals by the same
  rule (e4m3 ``m * 2**-9`` -> f16 ``m * 2**-17``, which f16's subnormals, down to
  2**-24, hold exactly), zero to zero, and 448 to 1.75. The 2**8 goes into the scales
  (K: folded into the softmax's static scale; V: into the per-step factor below), so
  nothing is rounded. e4m3fn has no infinities; its NaN bytes (``0x7F``, ``0xFF``) would
  come out finite (+-1.875), but NaN never sits in a slot the kernels read: every slot
  that is not valid is masked at the load (``other=0``), never multiplied by 0.

f16 has 5 exponent bits, so the 16-bit modes keep both dots' operands in range:

* q is clipped to +-65504 (f16's largest) before the cast: a q entry beyond it would be
  inf, and ``inf * 0`` against a masked zero row NaN. Entries of magnitude under 2**-14
  (f16 subnormal) keep fewer bits, under 2**-25 they become 0: for q entries next to the
  row's larger ones that is a relative error of the dot below f16's 2**-11. Real decode
  queries (before the softmax scale, which the kernels apply to the float32 scores) are
  within both bounds; a q outside them is a loss of accuracy, not an error.
* p @ V takes ``p * v_scale / vmax`` in f16 with ``vmax`` the largest V scale of the step
  (1 where all are 0), and the f32 product is multiplied back by ``vmax``: p is in [0, 1],
  so the operand is in [0, 1] however small or large the V scales are (``p * v_scale``
  alone would sink into f16's subnormals for V rows of magnitude ~1e-2, losing precision
  that bf16's wider exponent kept).

With float32 q every mode keeps float32 dots and widens by ``astype`` (the accurate path;
not what the 16-bit modes are for).

Mode ``"int8_qk"`` (int8 K/V with 16-bit q) takes K's widening out altogether: q is split
once per program into two int8 parts, ``q ~ hi * s_hi + lo * s_lo`` per row (``s_hi =
max|q| / 127``, ``hi = round(q / s_hi)``, ``s_lo = s_hi / 254``, ``lo = round((q - hi *
s_hi) / s_lo)``, both in [-127, 127]), and ``q . k`` is two int8 x int8 dots with exact
int32 sums (``|sum| <= 256 * 127 * 127 < 2**23`` at head_dim 256), scaled by ``s_hi`` and
``s_lo`` in float32: the raw int8 K tile goes to the tensor cores as it was loaded. The
split's error is at most ``s_lo / 2 = max|q| / 64516`` per q entry
(q itself, bf16, is exact to 2**-9 of each entry); V is widened to q's dtype as in
``"q_dtype"``. For float8 e4m3 K/V this mode is the e4m3 ``"f16"`` path (nothing integer
to multiply).

Mode ``"int8_qkv"`` does the same for ``p @ V``: the step's ``p * v_scale / vmax`` (in [0,
1], as in the 16-bit modes) is split into two int8 parts, ``hi = round(127 p')`` and ``lo =
round(254 (127 p' - hi))``, and ``p @ V`` is two int8 dots on the raw int8 V tile,
``(hi @ V + lo @ V / 254) * vmax / 127``: no element of K or V is converted. The split's
error is at most ``1 / (2 * 254 * 127)`` (1.6e-5) of ``vmax`` per probability, against bf16's
2**-9 of each ``p * v_scale``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from kernels._quant import is_quantized

# BlockSizes.quant_widen values. "q_dtype": the old astype to q's dtype (bf16 dots for bf16
# q). "f16": f16 dots, int8 by the magic number, e4m3 by astype(f16). "f16_bits": f16 dots,
# int8 by the magic number, e4m3 by the bit trick. "int8_qk": int8 q . K by two integer dots
# (V as "q_dtype"; e4m3 as "f16"); "int8_qkv": p @ V too. "auto": the fastest measured per
# dtype (AUTO_WIDEN).
QUANT_WIDEN_MODES = ("auto", "q_dtype", "f16", "f16_bits", "int8_qk", "int8_qkv")
DEFAULT_QUANT_WIDEN = "auto"
# What "auto" picks per 8-bit dtype, from experiments/bench/gpu_decode.py --kv-quant on one
# H200 (docs/results/kv_quant.jsonl; passes of 21 samples of 10 calls). At 8b997d7
# (2026-12-03): int8 "q_dtype" 0.405-0.408 ms at 64 x 8192 against "f16" (magic number)
# 0.481-0.486; e4m3 "f16" (astype to f16) 0.427-0.431 ms against "q_dtype" 0.528-0.540 and
# "f16_bits" 0.471-0.476; the same order at 128 x 4096. At c669d1a (same day): int8
# "int8_qk" 0.387 ms against "q_dtype" 0.409 (128 x 4096: 0.378 against 0.399), and in
# device time (a profiler trace, 15 runs of 8 calls) 349.6-353.8 us against 371.2-373.3 at
# 64 x 8192, 333.2-334.9 against 352.2-361.4 at 128 x 4096, ranges apart; "int8_qkv" was
# slower than both (402 us at 64 x 8192): the int8 p @ V costs more than V's conversion
# (docs/benchmarks.md, "8-bit K/V decode").
AUTO_WIDEN = {"int8": "int8_qk", "float8_e4m3fn": "f16"}
# "auto" in the kernels whose products are matrix-sized (the Triton prefill and the cascade's
# shared part): int8 keeps "q_dtype" there. "int8_qk" doubles the q . K products (two int8
# dots for one bf16 one), which a decode step's 16-row tile does not notice and a
# compute-bound prefill tile may; neither kernel was timed over 8-bit K/V in any mode.
AUTO_WIDEN_MATMUL = {"int8": "q_dtype", "float8_e4m3fn": "f16"}
# Rows whose largest |q| is under this are split as zero rows (split_query_int8): the scales
# of a smaller row would sink into float32's subnormals (or flush to zero).
INT8_SPLIT_TINY = 2.0**-100

F16_MAX = 65504.0
INT8_MAGIC = 0x6480  # f16 bits of 1152 = 1024 + 128: int16(x) + this is f16(1152 + x)
INT8_OFFSET = 1152.0
E4M3_BITS_MASK = 0xBF80 - 0x10000  # int16 of bits 0xBF80: sign and bits 13..7
E4M3_BITS_FACTOR = 256.0  # the f16 of the bit trick is the e4m3 value times 2**-8


def widen_int8_f16(x):
  """int8 -> float16, exact, by integer ops: ``bitcast_f16(int16(x) + 0x6480) - 1152``."""
  bits = x.astype(jnp.int16) + jnp.int16(INT8_MAGIC)
  return lax.bitcast_convert_type(bits, jnp.float16) - jnp.float16(INT8_OFFSET)


def split_query_int8(q):
  """``(hi, lo, s_hi, s_lo)``: a [rows, D] query tile as two int8 tiles and float32 row
  scales[rows], ``q ~ hi * s_hi + lo * s_lo`` within ``max|q_row| / 64516`` per entry (module
  docstring). A row whose largest |q| is under ``INT8_SPLIT_TINY`` (2**-100; zero rows too)
  gives zeros with scales 1 and 1/254: an absolute error under 2**-100 per entry."""
  qf = q.astype(jnp.float32)
  amax = jnp.max(jnp.abs(qf), axis=1)
  big = amax >= INT8_SPLIT_TINY
  qf = jnp.where(big[:, None], qf, 0.0)
  s_hi = jnp.where(big, amax * (1.0 / 127.0), 1.0)
  # floor(x + 0.5): round half up (Triton has no round-to-nearest lowering); |x| <= 127.
  hi = jnp.floor(qf / s_hi[:, None] + 0.5)
  s_lo = s_hi * (1.0 / 254.0)
  lo = jnp.clip(jnp.floor((qf - hi * s_hi[:, None]) / s_lo[:, None] + 0.5), -127.0, 127.0)
  return hi.astype(jnp.int8), lo.astype(jnp.int8), s_hi, s_lo


def widen_e4m3_f16_bits(x):
  """float8_e4m3fn -> float16 equal to ``x * 2**-8``, exact for every finite byte, by
  integer ops (module docstring); NaN bytes come out finite, so mask them before.

  ``((b & 0x80) << 8) | ((b & 0x7F) << 7)`` in two ops after a sign extension: ``int16(b)
  << 7`` puts the sign at bit 15 (from the extension's bit 8) and bits 6..0 at 13..7, with
  a copy of the sign at bit 14 that ``& 0xBF80`` clears."""
  bits = lax.bitcast_convert_type(x, jnp.int8).astype(jnp.int16)
  bits = jnp.left_shift(bits, jnp.int16(7)) & jnp.int16(E4M3_BITS_MASK)
  return lax.bitcast_convert_type(bits, jnp.float16)


@dataclasses.dataclass(frozen=True)
class Widening:
  """Static description of how one kernel call widens its K/V for the dots.

  Attributes:
    cdtype: dtype name of both dots' operands.
    kind: "cast" (``astype(cdtype)``, also every non-8-bit pool), "int8_magic",
      "e4m3_cast" (``astype(float16)``), "e4m3_bits" or "int8_qk" (q . K by integer
      dots on the raw int8 K; V by ``astype(cdtype)``) or "int8_qkv" (both products by
      integer dots on the raw int8 tiles).
  """

  cdtype: str
  kind: str

  @property
  def quantized16(self) -> bool:
    """Whether this is a 16-bit mode on 8-bit K/V: q clipped, p @ V normalised."""
    return self.kind not in ("cast", "int8_qk", "int8_qkv")

  @property
  def k_factor(self) -> float:
    """What the widened K must be multiplied by to be the stored value (2**8 for the bit
    trick, which the kernels fold into the softmax's static scale)."""
    return E4M3_BITS_FACTOR if self.kind == "e4m3_bits" else 1.0

  @property
  def name_suffix(self) -> str:
    """Tail of the Pallas kernel's name ("" for "cast"), so profiles tell the modes apart."""
    return "" if self.kind == "cast" else f"_{self.kind}"

  def widen(self, x):
    """A loaded K or V tile (8-bit or not) -> ``cdtype`` (unchanged int8 in "int8_qkv")."""
    if self.kind == "int8_qkv":
      return x
    if self.kind == "int8_magic":
      return widen_int8_f16(x)
    if self.kind == "e4m3_bits":
      return widen_e4m3_f16_bits(x)
    return x.astype(self.cdtype)

  def query(self, q):
    """The query tile -> ``cdtype`` (clipped to f16's range in the 16-bit modes)."""
    if self.quantized16:
      q = jnp.clip(q.astype(jnp.float32), -F16_MAX, F16_MAX)
    return q.astype(self.cdtype)

  def query_state(self, q):
    """What :meth:`scores` takes for the query tile, prepared once per program: a tuple
    (``(query(q),)``, or :func:`split_query_int8`'s four arrays in ``"int8_qk"`` and
    ``"int8_qkv"``)."""
    if self.kind in ("int8_qk", "int8_qkv"):
      return split_query_int8(q)
    return (self.query(q),)

  def scores(self, q_state, k, *, dot):
    """f32[rows, keys] = q . k for a K tile as loaded (8-bit or not; masked rows zero),
    before any K scale. ``dot(a, b, trans_b=True)`` is the kernel's matrix product."""
    if self.kind in ("int8_qk", "int8_qkv"):
      hi, lo, s_hi, s_lo = q_state
      s = dot(hi, k, trans_b=True).astype(jnp.float32) * s_hi[:, None]
      return s + dot(lo, k, trans_b=True).astype(jnp.float32) * s_lo[:, None]
    return dot(q_state[0], self.widen(k), trans_b=True)

  def accumulate(self, acc, p, v, v_scales, *, dot):
    """``acc + p @ v``: p f32[rows, keys] probabilities, v the widened V tile, ``v_scales``
    f32[keys] for 8-bit V (0 where masked; None otherwise), applied on p as
    ``sum_j p_j (v_j s_j) = sum_j (p_j s_j) v_j`` (:meth:`pv_operand`). ``dot(a, b)`` is the
    kernel's matrix product (``plgpu.dot`` with its precision)."""
    if v_scales is None:
      return acc + dot(p.astype(self.cdtype), v)
    if self.kind == "int8_qkv":
      vmax = jnp.max(v_scales)
      vmax = jnp.where(vmax > 0, vmax, 1.0)
      a = p * (v_scales * (127.0 / vmax))[None, :]  # in [0, 127]
      hi = jnp.floor(a + 0.5)
      lo = jnp.clip(jnp.floor((a - hi) * 254.0 + 0.5), -127.0, 127.0)
      prod = dot(hi.astype(jnp.int8), v).astype(jnp.float32)
      prod = prod + dot(lo.astype(jnp.int8), v).astype(jnp.float32) * (1.0 / 254.0)
      return acc + prod * (vmax * (1.0 / 127.0))
    pv, factor = self.pv_operand(p, v_scales)
    prod = dot(pv, v)
    return acc + (prod if factor is None else prod * factor)

  def pv_operand(self, p, v_scales):
    """``(operand, factor)`` for ``acc += dot(operand, v) * factor``: p f32[rows, keys],
    v_scales f32[keys] (0 where masked). factor is None where there is none to apply."""
    if not self.quantized16:
      return (p * v_scales[None, :]).astype(self.cdtype), None
    vmax = jnp.max(v_scales)
    vmax = jnp.where(vmax > 0, vmax, 1.0)
    w = v_scales * (1.0 / vmax)  # per key, in [0, 1]
    return (p * w[None, :]).astype(self.cdtype), vmax * self.k_factor


def widening(
  q_dtype, kv_dtype, mode: str = DEFAULT_QUANT_WIDEN, *, matmul: bool = False
) -> Widening:
  """The widening a kernel call uses (``mode`` one of ``QUANT_WIDEN_MODES``).

  Non-8-bit K/V: ``astype`` to the common dtype, float32 when q and K/V differ. 8-bit K/V
  with float32 q, or mode "q_dtype": ``astype`` to q's dtype (int8 and e4m3 values are
  exact in bf16, f16 and f32). 8-bit K/V with 16-bit q in mode "f16" / "f16_bits": f16
  dots, widened as the module docstring says; mode "int8_qk": int8 q . K by integer dots and
  V widened to q's dtype, "int8_qkv": both products by integer dots (e4m3 K/V: both as
  "f16"). Mode "auto" is ``AUTO_WIDEN``'s mode for the
  K/V dtype ("int8_qk" for int8, "f16" for e4m3: the fastest decode on the H200), or with
  ``matmul`` (the prefill and the cascade's shared kernel) ``AUTO_WIDEN_MATMUL``'s (int8
  keeps "q_dtype").
  """
  if mode not in QUANT_WIDEN_MODES:
    raise ValueError(f"quant_widen must be one of {QUANT_WIDEN_MODES}, got {mode!r}")
  q_dtype, kv_dtype = jnp.dtype(q_dtype), jnp.dtype(kv_dtype)
  if mode == "auto":
    mode = (AUTO_WIDEN_MATMUL if matmul else AUTO_WIDEN).get(kv_dtype.name, "q_dtype")
  if not is_quantized(kv_dtype):
    cdtype = q_dtype if q_dtype == kv_dtype else jnp.dtype(jnp.float32)
    return Widening(cdtype.name, "cast")
  if mode == "q_dtype" or q_dtype.itemsize != 2:
    return Widening(q_dtype.name, "cast")
  if kv_dtype == jnp.int8:
    if mode in ("int8_qk", "int8_qkv"):
      return Widening(q_dtype.name, mode)
    return Widening("float16", "int8_magic")
  if mode in ("int8_qk", "int8_qkv"):
    mode = "f16"
  return Widening("float16", "e4m3_bits" if mode == "f16_bits" else "e4m3_cast")
