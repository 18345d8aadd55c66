"""Split-K products of few rows by a large weight (a decode step's projections), Pallas Triton.

A decode step multiplies tens of rows by every weight of the model once: the product is
memory-bound on the weight, and at 64 rows XLA's own GEMMs read the small weights of a
layer (q/k/v, the output projection) at a fraction of the card's rate (docs/benchmarks.md,
"Run37"). Here the product is cut over K into ``splits`` equal slices; program ``(j, s)``
multiplies the rows by the weight's tile ``[slice s, columns j * block_n ...]`` and writes
its float32 ``[rows, block_n]`` partial to ``partials[s]``. :func:`skinny_matmul` sums the
partials in XLA, which fuses the sum into whatever elementwise work consumes the product
(the residual add, SwiGLU, RoPE), so the split costs no kernel of its own.

:func:`matmul_settings` picks the split and tiles from the shapes: about one program an SM
(``plan.num_sms``), columns in tiles of 64 (32 below 2,048 columns), K in steps of 128
(64 where 128 does not divide it); ``None`` where XLA's product should run (more than
:data:`MAX_ROWS` rows, a weight above :data:`MAX_WEIGHT_BYTES`, a K that is not a multiple
of 64 or an N not of 32, a product too small to give at least half the SMs a program of at
least two K steps).

Rows need not be a power of two: the program's row tile is the next power of two (at least
16, the tensor cores' smallest), its extra rows masked on every load (zeros), so no padded
copy of the input is made; the partials' extra rows are written and sliced off inside the
fusion that sums them.

:func:`swiglu_matmul` is the MLP's gate/up product with ``silu(gate) * up`` in its
epilogue (one unsplit kernel; :func:`swiglu_settings` is its rule).

This module imports nothing from paxcache or flax.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.gpu.plan import num_sms as _num_sms

# Where matmul_settings gives None (XLA's product), from run37's per-product timings on an
# H100 (docs/benchmarks.md): at 256 rows the kernel lost to XLA on 6 of the 7 products
# measured (all but the 1B shape's q/k/v). Weights above 32 MiB (the 1B shape's gate/up,
# 67 MB) stay with XLA, which was level or faster at 8-256 rows. Up to 32 MiB since run47:
# the 1B shape's down (8192 x 2048, 32 MiB) alone was level with XLA or slower at all but
# 64 rows (run37), but in the decode step, where XLA sums its float32 partials inside the
# residual add's fusion, the step at 8-128 rows was level or faster (run47, an H100: the
# product 13.5 against XLA's 16.1 us a layer at 64 rows; docs/benchmarks.md).
MAX_ROWS = 128
MAX_WEIGHT_BYTES = 32 << 20
# The rows a launch can take at all (matmul_settings(fit=True), an explicit request): the
# row tile's accumulators and shared-memory stages are sized for this many.
FIT_MAX_ROWS = 256
# Input dtypes the kernel takes (float32 would run its dots in TF32, unlike XLA's).
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class MatmulSettings:
  """A split-K product's launch: ``splits`` K slices, ``[rows, block_n]`` output tiles,
  ``block_k``-deep steps; ``num_warps`` and ``num_stages`` are Triton's."""

  splits: int
  block_n: int
  block_k: int
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for name in ("splits", "block_n", "block_k", "num_warps", "num_stages"):
      if getattr(self, name) < 1:
        raise ValueError(f"MatmulSettings.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("block_n", "block_k"):
      v = getattr(self, name)
      if v < 16 or v & (v - 1):
        raise ValueError(f"MatmulSettings.{name} must be a power of two >= 16, got {v}")


def row_tile(rows: int) -> int:
  """The programs' row tile: the next power of two >= ``rows``, at least 16."""
  return max(16, 1 << (max(rows, 1) - 1).bit_length())


def _largest_pow2_divisor(v: int, cap: int) -> int:
  p = cap
  while p > 16 and v % p:
    p //= 2
  return p


def matmul_settings(
  rows: int, k: int, n: int, *, itemsize: int = 2, num_sms: int | None = None, fit: bool = False
):
  """The split-K launch for ``[rows, k] @ [k, n]``, or None where XLA's product should run.

  Measured on an H100 (docs/benchmarks.md, "Run37"): the fastest launches of each of the
  SmolLM2-135M and Llama-3.2-1B shapes' four projections at 64 rows ran about one program
  an SM, each with 2 to 16 K steps; where no split gives at least half the SMs a program
  of at least two steps (SmolLM2's 576 x 576 output projection) XLA's product was faster.

  None also above :data:`MAX_ROWS` rows and for weights of more than
  :data:`MAX_WEIGHT_BYTES` (``k * n * itemsize``), where XLA's product was level or faster.
  Four pipeline stages up to 64 rows (faster than three on four of the five products
  that take the kernel at 8 rows and three of them at 64; level on SmolLM2's down at 64,
  1.5-4% slower on its gate/up), three above.

  ``fit=True`` (an explicit request for the kernel): the rule's launch where it has one,
  else, where the kernel can tile the product (at most :data:`FIT_MAX_ROWS` rows, K and N
  multiples of 16), a one-split launch with the largest tiles that divide K and N; None
  only where it cannot.
  """
  sms = _num_sms() if num_sms is None else num_sms
  if rows < 1 or rows > (FIT_MAX_ROWS if fit else MAX_ROWS):
    return None
  if rows > MAX_ROWS or k * n * itemsize > MAX_WEIGHT_BYTES or k % 64 or n % 32:
    return _plain(k, n, rows) if fit else None
  block_k = 128 if k % 128 == 0 and row_tile(rows) <= 128 else 64
  block_n = 64 if n >= 2048 and n % 64 == 0 else 32
  steps = k // block_k
  tiles = n // block_n
  best = None
  for s in range(1, min(steps, 16) + 1):
    if steps % s or steps // s < 2 or tiles * s < sms // 2:
      continue
    score = abs(math.log(tiles * s / sms))
    if best is None or score < best[0] - 1e-9:
      best = (score, s)
  if best is None:
    return _plain(k, n, rows) if fit else None
  stages = 4 if row_tile(rows) <= 64 else 3
  return MatmulSettings(splits=best[1], block_n=block_n, block_k=block_k, num_stages=stages)


def _plain(k: int, n: int, rows: int):
  if k % 16 or n % 16:
    return None
  cap_k = 128 if row_tile(rows) <= 128 else 64  # shared memory for the rows' tile
  return MatmulSettings(
    splits=1, block_n=_largest_pow2_divisor(n, 64), block_k=_largest_pow2_divisor(k, cap_k)
  )


def _check(x, w, settings: MatmulSettings) -> None:
  if x.ndim != 2 or w.ndim != 2:
    raise ValueError(f"x and w must be 2-D, got shapes {x.shape} and {w.shape}")
  if x.shape[1] != w.shape[0]:
    raise ValueError(f"x's columns ({x.shape[1]}) must equal w's rows ({w.shape[0]})")
  if x.dtype != w.dtype or jnp.dtype(x.dtype) not in DTYPES:
    raise ValueError(
      f"x and w must share one of {[str(d) for d in DTYPES]}, got {x.dtype} and {w.dtype}"
    )
  if x.shape[0] < 1:
    raise ValueError("x has no rows")
  k, n = w.shape
  s = settings
  if k % (s.splits * s.block_k) or n % s.block_n:
    raise ValueError(
      f"settings {s} do not tile [{k}, {n}]: K must be a multiple of splits * block_k "
      f"({s.splits * s.block_k}) and N of block_n ({s.block_n})"
    )


def _kernel(x_ref, w_ref, o_ref, *, rows, bm, slice_k, block_k, block_n):
  j = pl.program_id(0)
  s = pl.program_id(1)
  r = jnp.arange(bm, dtype=jnp.int32)
  row_ok = r < rows
  cols_k = jnp.arange(block_k, dtype=jnp.int32)
  cols_n = j * block_n + jnp.arange(block_n, dtype=jnp.int32)
  base = s * slice_k

  def step(i, acc):
    k0 = base + i * block_k + cols_k
    # Rows past `rows` are not read (zeros), so any row count runs without a padded copy.
    xt = plgpu.load(
      x_ref.at[jnp.minimum(r, rows - 1)[:, None], k0[None, :]], mask=row_ok[:, None], other=0.0
    )
    wt = plgpu.load(w_ref.at[k0[:, None], cols_n[None, :]])
    return acc + plgpu.dot(xt, wt)

  acc = lax.fori_loop(0, slice_k // block_k, step, jnp.zeros((bm, block_n), jnp.float32))
  # All bm rows (those past `rows` are zeros): the caller slices them off, inside the
  # fusion that sums the partials.
  plgpu.store(
    o_ref.at[pl.ds(s * bm, bm), pl.ds(pl.multiple_of(j * block_n, block_n), block_n)], acc
  )


@functools.partial(jax.jit, static_argnames=("settings", "interpret"))
def splitk_partials(x, w, settings: MatmulSettings, *, interpret: bool = False):
  """float32 ``[splits, rows, N]``: the products of ``x``'s and ``w``'s K slices.

  Args:
    x: ``[rows, K]``, bf16 or f16.
    w: ``[K, N]``, x's dtype.
    settings: the launch (:func:`matmul_settings`); K a multiple of ``splits * block_k``,
      N of ``block_n``.
    interpret: run in Pallas's interpret mode (CPU tests).

  Raises:
    ValueError: shapes, dtypes or settings that do not fit.
  """
  _check(x, w, settings)
  rows, k = x.shape
  n = w.shape[1]
  s = settings
  bm = row_tile(rows)
  kern = functools.partial(
    _kernel,
    rows=rows,
    bm=bm,
    slice_k=k // s.splits,
    block_k=s.block_k,
    block_n=s.block_n,
  )
  out = pl.pallas_call(
    kern,
    grid=(n // s.block_n, s.splits),
    out_shape=jax.ShapeDtypeStruct((s.splits * bm, n), jnp.float32),
    compiler_params=plgpu.CompilerParams(num_warps=s.num_warps, num_stages=s.num_stages),
    interpret=interpret,
    name=f"paxcache_splitk_s{s.splits}_n{s.block_n}_k{s.block_k}",
  )(x, w)
  return out.reshape(s.splits, bm, n)[:, :rows]


def skinny_matmul(x, w, settings: MatmulSettings | None = None, *, interpret: bool = False):
  """float32 ``x @ w`` for few rows: :func:`splitk_partials` summed (in XLA, which fuses
  the sum into the product's consumer).

  ``settings`` None: :func:`matmul_settings` (ValueError where it gives None).
  """
  if settings is None:
    settings = (
      matmul_settings(x.shape[0], w.shape[0], w.shape[1]) if x.ndim == w.ndim == 2 else None
    )
    if settings is None:
      raise ValueError(
        f"no split-K launch suits {x.shape} @ {w.shape} (matmul_settings gives None: "
        f"at most {MAX_ROWS} rows, a weight of at most {MAX_WEIGHT_BYTES >> 20} MiB, K a "
        "multiple of 64, N of 32, a program for at least half the SMs); pass settings"
      )
  return splitk_partials(x, w, settings, interpret=interpret).sum(axis=0)


# SwiGLU's gate and up products with the activation in the kernel's epilogue. A decode
# step's MLP runs ``silu(x @ W_gate) * (x @ W_up)`` on tens of rows: as two kernels (the
# product, then an XLA fusion that sums split-K partials and applies the activation) the
# second is a launch of its own on a layer's critical path. Here program ``j`` multiplies
# the rows by the gate's and the up's column tiles ``j`` (one weight, ``[gate | up]``) over
# the whole of K, and writes ``silu(g) * u`` in x's dtype: no split, so no partials and no
# second kernel.


# swiglu_settings' rule, from run39's layer chains on an H100 (docs/benchmarks.md): the fused
# front against the product's own path (the split-K kernel or XLA's, then XLA's activation)
# was faster at 32-128 rows for SmolLM2-135M's gate/up (3.4 MiB; 4.3-16%) and at 16-128
# for the 1B shape's (64 MiB; 1.2-4.9%), slower for SmolLM2's at 8 and 16 rows (23% and
# 2.2-2.6%); 17-31 rows were not timed.
SWIGLU_MIN_ROWS = 32
MAX_SWIGLU_WEIGHT_BYTES = 64 << 20


def swiglu_settings(
  rows: int, k: int, mlp: int, *, itemsize: int = 2, num_sms: int | None = None, fit: bool = False
):
  """The launch of :func:`swiglu_matmul` for ``[rows, k] @ [k, 2 * mlp]``, or None.

  The rule (measured on an H100, docs/benchmarks.md "Run39"; up to 128 KiB of shared
  memory, so for Hopper: ``SwiGLU`` takes it there only): :data:`SWIGLU_MIN_ROWS` to
  :data:`MAX_ROWS` rows, the weight at most :data:`MAX_SWIGLU_WEIGHT_BYTES`, K a multiple
  of 64 and ``mlp`` of 16; column tiles of 64, 32 or 16, the widest that gives at least
  half the SMs a program; K steps of 64 in four pipeline stages (within 0.7% of the
  fastest setting measured for the 1B shape at each of 16-128 rows). ``fit=True`` (an
  explicit request): the rule's launch, else any launch the kernel can run (at most
  :data:`FIT_MAX_ROWS` rows, K and ``mlp`` multiples of 16); None only where none can.
  """
  sms = _num_sms() if num_sms is None else num_sms
  if rows < 1 or rows > (FIT_MAX_ROWS if fit else MAX_ROWS):
    return None
  in_rule = (
    SWIGLU_MIN_ROWS <= rows <= MAX_ROWS
    and k * 2 * mlp * itemsize <= MAX_SWIGLU_WEIGHT_BYTES
    and k % 64 == 0
    and mlp % 16 == 0
  )
  if not in_rule:
    return _plain(k, mlp, rows) if fit else None
  block_n = 16
  for bn in (64, 32):
    if mlp % bn == 0 and mlp // bn >= sms // 2:
      block_n = bn
      break
  return MatmulSettings(splits=1, block_n=block_n, block_k=64, num_stages=4)


def _swiglu_kernel(x_ref, w_ref, o_ref, *, rows, bm, k, mlp, block_k, block_n):
  j = pl.program_id(0)
  r = jnp.arange(bm, dtype=jnp.int32)
  row_ok = r < rows
  safe_r = jnp.minimum(r, rows - 1)
  cols_k = jnp.arange(block_k, dtype=jnp.int32)
  cols_g = j * block_n + jnp.arange(block_n, dtype=jnp.int32)
  cols_u = mlp + cols_g

  def step(i, carry):
    g, u = carry
    k0 = i * block_k + cols_k
    # Rows past `rows` are not read (zeros).
    xt = plgpu.load(x_ref.at[safe_r[:, None], k0[None, :]], mask=row_ok[:, None], other=0.0)
    wg = plgpu.load(w_ref.at[k0[:, None], cols_g[None, :]])
    wu = plgpu.load(w_ref.at[k0[:, None], cols_u[None, :]])
    return g + plgpu.dot(xt, wg), u + plgpu.dot(xt, wu)

  zeros = jnp.zeros((bm, block_n), jnp.float32)
  g, u = lax.fori_loop(0, k // block_k, step, (zeros, zeros))
  # silu(g) = g * sigmoid(g) = g / (1 + exp(-g)), in float32 on the whole sums; a large
  # negative g gives g / inf = -0, as silu's limit.
  out = g / (1.0 + jnp.exp(-g)) * u
  # All bm rows (those past `rows` are silu(0) * 0 = 0): a masked store with clamped row
  # ids would write one row several times, which interpret mode does not order.
  plgpu.store(
    o_ref.at[pl.ds(0, bm), pl.ds(pl.multiple_of(j * block_n, block_n), block_n)],
    out.astype(o_ref.dtype),
  )


@functools.partial(jax.jit, static_argnames=("mlp", "settings", "interpret"))
def swiglu_matmul(
  x, w, *, mlp: int, settings: MatmulSettings | None = None, interpret: bool = False
):
  """``silu(x @ w[:, :mlp]) * (x @ w[:, mlp:])`` in x's dtype, the products' float32 sums
  put through the activation in the kernel.

  Args:
    x: ``[rows, K]``, bf16 or f16.
    w: ``[K, 2 * mlp]``, x's dtype: the gate's columns, then the up's.
    mlp: the MLP's width.
    settings: the launch; ``splits`` must be 1, K a multiple of ``block_k``, ``mlp`` of
      ``block_n``. None: :func:`swiglu_settings`'s rule (ValueError where it gives None).
    interpret: run in Pallas's interpret mode (CPU tests).

  Raises:
    ValueError: shapes, dtypes or settings that do not fit.
  """
  if settings is None:
    settings = swiglu_settings(x.shape[0], x.shape[1], mlp) if x.ndim == w.ndim == 2 else None
    if settings is None:
      raise ValueError(
        f"no swiglu_matmul launch suits {x.shape} @ {w.shape} (swiglu_settings gives None: "
        f"{SWIGLU_MIN_ROWS}-{MAX_ROWS} rows, a weight of at most "
        f"{MAX_SWIGLU_WEIGHT_BYTES >> 20} MiB, K a multiple of 64); pass settings"
      )
  _check(x, w, dataclasses.replace(settings, splits=1))
  rows, k = x.shape
  s = settings
  if w.shape[1] != 2 * mlp:
    raise ValueError(f"w must have 2 * mlp = {2 * mlp} columns, got {w.shape[1]}")
  if s.splits != 1:
    raise ValueError(f"swiglu_matmul runs unsplit products (splits=1), got splits={s.splits}")
  if mlp % s.block_n:
    raise ValueError(f"settings {s} do not tile mlp {mlp}: it must be a multiple of block_n")
  bm = row_tile(rows)
  kern = functools.partial(
    _swiglu_kernel, rows=rows, bm=bm, k=k, mlp=mlp, block_k=s.block_k, block_n=s.block_n
  )
  out = pl.pallas_call(
    kern,
    grid=(mlp // s.block_n,),
    out_shape=jax.ShapeDtypeStruct((bm, mlp), x.dtype),
    compiler_params=plgpu.CompilerParams(num_warps=s.num_warps, num_stages=s.num_stages),
    interpret=interpret,
    name=f"paxcache_swiglu_n{s.block_n}_k{s.block_k}",
  )(x, w)
  # A row count that is not its tile's (a power of two >= 16) costs XLA a slice (the
  # engine's decode steps have power-of-two row buckets: none there).
  return out if bm == rows else out[:rows]
