"""8-bit K/V: symmetric quantization with one float32 scale per (KV head, token slot).

A quantized pool stores ``q = round(x / s)`` (int8) or ``q = fp8(x / s)`` (float8 e4m3)
for each row ``x [head_dim]`` of one token and one KV head, with ``s = max|x| / QMAX``,
and the scale ``s`` beside it in a scale pool ``[num_kv_heads, num_blocks, block_size]``
float32 (the K/V pool's shape without head_dim, so a block's scales are addressed like
its rows). ``x`` is read back as ``q * s``. A zero row has ``s = 0`` and stores 0, which
reads back as 0 (never 0 / 0).

Why float32 scales: 8 bytes per token and KV head (K and V) beside ``2 * head_dim`` bytes
of data, 3.1% at head_dim 128 (bf16 scales would save 1.6%); a float32 scale is exact,
so the read-back error is the 8-bit rounding alone, while a bf16 scale would add up to
2**-9 relative to every element, as much as half of int8's own step at a row's max.

The kernels never dequantise a pool: they load the 8-bit rows and the rows' scales and
fold the scales into the scores (``q . k_row * k_scale``) and into the probabilities
(``p * v_scale`` before ``p @ v``). Int8 and e4m3 values are exact in bf16, f16 and f32,
so the 8-bit operand can be widened for the dot without rounding: to q's dtype (the
reference, the TPU kernels), or to f16 by integer ops with f16 dots (the GPU kernels'
default with 16-bit q, ``kernels/gpu/_widen.py``).

This module imports nothing from paxcache or flax.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# dtype name -> largest magnitude the format holds (the symmetric range is [-QMAX, QMAX]).
QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}
QUANT_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
SCALE_DTYPE = jnp.dtype(jnp.float32)


# The K/V dtypes a paged cache may hold: what every backend's kernels read.
FLOAT_KV_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
KV_DTYPES = FLOAT_KV_DTYPES + QUANT_DTYPES


def check_kv_dtype(dtype, name: str = "kv_dtype"):
  """``dtype`` as a NumPy dtype if a paged cache may hold it (``KV_DTYPES``: float32,
  bfloat16, float16, and the 8-bit int8 and float8_e4m3fn with their scales); else a
  ``ValueError`` naming ``name`` and the choices. Other dtypes (float64, float8_e5m2,
  int4, ...) have no kernel that reads them, and no byte count a capacity could trust."""
  choices = ", ".join(d.name for d in KV_DTYPES)
  if dtype is None:  # jnp.dtype(None) is float64: name what was given
    raise ValueError(f"{name} must be one of {choices}, got None")
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f"{name} must be one of {choices}, got {dtype!r}") from None
  if dt not in KV_DTYPES:
    raise ValueError(f"{name} must be one of {choices}, got {dt.name}")
  return dt


def is_quantized(dtype) -> bool:
  """Whether ``dtype`` is one of the 8-bit K/V dtypes (``QUANT_DTYPES``)."""
  try:
    return jnp.dtype(dtype) in QUANT_DTYPES
  except TypeError:
    return False


def quantize(x, dtype):
  """Rows of ``x [..., head_dim]`` (any float dtype) -> ``(q [..., head_dim] dtype,
  scale f32[...])`` with ``x ~ q * scale``; symmetric, one scale per row. A row holding
  NaN gets a NaN scale and a zero row.

  Written with operations Pallas's Triton lowering has too (no ``round``, no boolean
  reduction), so that the GPU decode kernels' fused write (``kernels/gpu/decode.py``)
  quantizes by this very function and stores the bytes the cache write stores."""
  dtype = jnp.dtype(dtype)
  if dtype not in QUANT_DTYPES:
    raise ValueError(f"dtype must be one of {[d.name for d in QUANT_DTYPES]}, got {dtype.name}")
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) / QMAX[dtype.name]
  # XLA's max keeps NaN, Triton's drops it: the NaN row is found apart, the same on both.
  has_nan = jnp.max(jnp.where(x != x, 1.0, 0.0), axis=-1) > 0.0
  scale = jnp.where(has_nan, jnp.nan, scale)
  safe = jnp.where(scale > 0, scale, 1.0)[..., None]
  y = jnp.where(scale[..., None] > 0, x / safe, 0.0)
  if dtype == jnp.int8:
    q = jnp.clip(round_half_even(y), -127, 127).astype(jnp.int8)
  else:
    # x / scale is within [-448, 448] up to one float32 rounding; clip so that it can
    # never round past the largest finite e4m3 value (e4m3fn has no inf: it would be NaN).
    q = jnp.clip(y, -448.0, 448.0).astype(dtype)
  return q, scale.astype(SCALE_DTYPE)


def round_half_even(y):
  """``jnp.round`` (to nearest, ties to even) of float32 ``y`` from ``floor``, exact for
  ``|y| < 2**22`` (``y - floor(y)`` is then exact): Triton has no round instruction."""
  r = jnp.floor(y)
  d = y - r
  odd = (r - 2.0 * jnp.floor(r * 0.5)) != 0.0
  return r + jnp.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)


def dequantize(q, scale):
  """``q [..., head_dim]`` 8-bit and ``scale f32[...]`` -> float32 ``q * scale``."""
  return q.astype(jnp.float32) * scale[..., None].astype(jnp.float32)


def rotation_block(head_dim: int) -> int:
  """The block of :func:`hadamard_rotate` for rows of ``head_dim``: the largest power of two
  dividing it (64 -> 64, 128 -> 128, 80 -> 16, 96 -> 32, 192 -> 64)."""
  if head_dim < 1:
    raise ValueError(f"head_dim must be >= 1, got {head_dim}")
  return head_dim & -head_dim


@functools.lru_cache(maxsize=16)
def _rotation_matrix(head_dim: int) -> np.ndarray:
  b = rotation_block(head_dim)
  h = np.ones((1, 1), np.float64)
  while h.shape[0] < b:
    h = np.block([[h, h], [h, -h]])
  r = np.kron(np.eye(head_dim // b), h / math.sqrt(b)).astype(np.float32)
  r.setflags(write=False)  # shared by every call (cached)
  return r


def hadamard_rotate(x):
  """Rows of ``x [..., head_dim]`` times ``R``, the normalised Walsh-Hadamard matrix of
  :func:`rotation_block`'s size on the diagonal (``head_dim / b`` blocks ``H_b /
  sqrt(b)``, Sylvester's order), in float32.

  ``R`` is orthonormal and symmetric, so it is its own inverse (``hadamard_rotate`` twice
  gives ``x`` back up to float32 rounding) and keeps dot products: ``(q R) . (k R) = q .
  k``. An int8 cache stores ``k R`` and ``v R`` (``paxcache.nn.PagedAttention``,
  ``DecoderConfig.kv_rotation``): a row's large channels (RoPE'd keys have a few) are
  spread over all ``b`` lanes of their block before the row's one scale is taken, so the
  other channels are not rounded in steps of the largest one's 1/127. One matrix product
  with the constant ``R`` at full float32 precision (``Precision.HIGHEST``: TF32 would
  round the rows to 10 bits first); on an H100 a form in ``log2(b)`` butterfly stages of
  sums and differences made the engine's int8 step 1.2-2.3x slower (docs/benchmarks.md,
  "Run40"). float64 inputs are computed in float32 too.
  """
  x = jnp.asarray(x, jnp.float32)
  r = jnp.asarray(_rotation_matrix(x.shape[-1]))
  return jnp.einsum("...d,de->...e", x, r, precision=jax.lax.Precision.HIGHEST)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype) -> int:
  """Bytes one token's K and V take in a paged cache of ``dtype``, scales counted:
  ``2 * layers * kv_heads * (head_dim * itemsize + 4 if 8-bit else 0)`` (a float32 K
  scale and V scale per KV head for 8-bit dtypes). ``dtype`` must be one a cache may hold
  (:func:`check_kv_dtype`); the counts ints >= 1 (ValueError otherwise)."""
  for name, n in (
    ("num_layers", num_layers),
    ("num_kv_heads", num_kv_heads),
    ("head_dim", head_dim),
  ):
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
      raise ValueError(f"kv_bytes_per_token: {name} must be an int >= 1, got {n!r}")
  dtype = check_kv_dtype(dtype, "dtype")
  per_head = head_dim * dtype.itemsize + (SCALE_DTYPE.itemsize if dtype in QUANT_DTYPES else 0)
  return 2 * num_layers * num_kv_heads * per_head
