"""Building blocks of the decoder: RMSNorm, SwiGLU MLP, rotary position embeddings, and the
projection that picks the product's kernel."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from kernels.gpu import matmul as gpu_matmul

# How the decoder's projections (q/k/v, output, gate/up, down) multiply: "auto" takes the
# Pallas split-K product (kernels.gpu.matmul) on a GPU where its rule has a launch (16-bit
# inputs, at most 128 rows, weights of at most 32 MiB: kernels.gpu.matmul.matmul_settings)
# and no mesh splits the weight, and XLA's product everywhere else; SwiGLU's gate/up
# product and its activation are one Pallas kernel (kernels.gpu.matmul.swiglu_matmul) where
# that kernel's rule has a launch on a Hopper GPU (32-128 rows, weights of at most 64 MiB:
# swiglu_settings). "xla" always XLA's; "pallas" always the Pallas kernels (a GPU, or
# interpret=True; ValueError where they cannot run the product).
GEMMS = ("auto", "xla", "pallas")


def check_gemm(gemm: str) -> str:
  if gemm not in GEMMS:
    raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
  return gemm


def project(
  x: jax.Array,
  w: jax.Array,
  *,
  dtype=None,
  gemm: str,
  interpret: bool = False,
  sharded: bool = False,
):
  """``x @ w`` over x's last axis, both promoted to ``dtype`` first as ``nnx.Linear`` does
  (None: their common dtype); the result is in that dtype.

  Args:
    x: ``[..., K]``.
    w: ``[K, N]``, the weight as stored (its parameter's value).
    dtype: the computation dtype.
    gemm: one of :data:`GEMMS`.
    interpret: run the Pallas kernel in interpret mode (``gemm="pallas"`` on CPU).
    sharded: a mesh splits the weight (``paxcache.sharding.shard_model``): XLA's product.

  A weight stored in another dtype than ``dtype`` (float32 weights in a bfloat16 model)
  takes XLA's product under "auto", which fuses the cast into its GEMM, where the kernel
  would read a cast copy made every call.

  Raises:
    ValueError: an unknown ``gemm``; ``gemm="pallas"`` under a mesh, for dtypes other than
      bf16 / f16, for a w that is not 2-D, or for shapes the kernel cannot tile
      (:func:`kernels.gpu.matmul.matmul_settings` with ``fit=True``: at most 256 rows).
    kernels.BackendUnavailableError: ``gemm="pallas"`` off a GPU without ``interpret``.
  """
  check_gemm(gemm)
  stored = w.dtype
  x, w = nnx.nn.dtypes.promote_dtype((x, w), dtype=dtype)
  if gemm == "xla":
    return jnp.dot(x, w)
  if x.ndim < 1 or w.ndim != 2:
    if gemm == "pallas":
      raise ValueError(f"gemm='pallas' takes x [..., K] and w [K, N], got {x.shape}, {w.shape}")
    return jnp.dot(x, w)
  lead = x.shape[:-1]
  rows = math.prod(lead)
  k, n = w.shape
  dtype_ok = jnp.dtype(x.dtype) in gpu_matmul.DTYPES
  fit = gemm == "pallas"
  settings = (
    gpu_matmul.matmul_settings(rows, k, n, itemsize=x.dtype.itemsize, fit=fit) if dtype_ok else None
  )
  if gemm == "auto":
    cast = stored != w.dtype
    if sharded or cast or settings is None or kernels.resolve_backend("auto") != "gpu":
      return jnp.dot(x, w)
  else:  # "pallas": no fallback
    _check_pallas(sharded=sharded, interpret=interpret, dtype=x.dtype)
    if settings is None:
      raise ValueError(
        f"gemm='pallas' cannot run {rows} rows x [{k}, {n}] "
        f"(kernels.gpu.matmul: at most {gpu_matmul.FIT_MAX_ROWS} rows, K and N multiples of 16)"
      )
  y = gpu_matmul.skinny_matmul(x.reshape(rows, k), w, settings, interpret=interpret)
  return y.astype(x.dtype).reshape(*lead, n)


def _check_pallas(*, sharded: bool, interpret: bool, dtype) -> None:
  """What ``gemm="pallas"`` needs of every product: no mesh, a GPU (or interpret mode),
  16-bit inputs (ValueError / BackendUnavailableError naming the one missing)."""
  if sharded:
    raise ValueError("gemm='pallas' does not run under a mesh (the weight is split)")
  try:
    kernels.resolve_backend("gpu", interpret=interpret)
  except kernels.BackendUnavailableError as e:
    raise kernels.BackendUnavailableError(
      f"gemm='pallas' runs the Pallas GPU product (gemm='auto' or 'xla' run anywhere): {e}"
    ) from e
  if jnp.dtype(dtype) not in gpu_matmul.DTYPES:
    raise ValueError(f"gemm='pallas' takes bf16 or f16 inputs, got {jnp.dtype(dtype)}")


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half form, as in Llama).

  Args:
    x: ``[..., num_heads, head_dim]``.
    positions: integer positions broadcastable to ``x.shape[:-2]``.
    theta: RoPE base.

  Returns:
    ``x`` rotated, same shape and dtype. Angles are computed in float32 so that
    long positions (thousands of tokens) keep their precision.
  """
  head_dim = x.shape[-1]
  half = head_dim // 2
  inv_freq = theta ** (-jnp.arange(0, half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [..., 1, half]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned scale; statistics in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-5, rngs: nnx.Rngs | None = None):
    del rngs  # no random initialisation; taken for a uniform constructor signature
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


class SwiGLU(nnx.Module):
  """``down(silu(x @ W_gate) * (x @ W_up))``, no biases.

  On a Hopper GPU, ``gemm="auto"`` computes ``silu(x @ W_gate) * (x @ W_up)`` in one kernel
  (:meth:`_fused_front`) where its rule has a launch, which removes the activation's own
  launch from every decode step's layer; elsewhere the product (:func:`project`), then the
  activation in XLA.

  The gate and up kernels are one parameter, ``gate_up`` ``[d_model, 2 * mlp_dim]``, read
  by one matrix product. Given two products of one input, XLA merges them into one GEMM
  over the two weights concatenated inside the kernel, and on the H200 that product (with
  ``silu(gate) * up``) took 1.4x the time of the same product over one weight at 256 rows
  (docs/benchmarks.md, "One weight for gate and up"): a decode step reads every weight
  byte once, so its speed is the GEMM's. Two dimensions, not ``[d_model, 2, mlp_dim]``:
  the TPU compiler copies a weight whose second-minor axis is 2 into another layout on
  every call, and a ``[2, d_model, mlp_dim]`` one is transposed by XLA on the GPU.

  Column order: ``shards`` blocks of ``[gate columns | up columns]``, ``mlp_dim / shards``
  of each. With ``shards == 1`` (as built, loaded and saved) that is ``[:, :mlp_dim]`` the
  gate's kernel and ``[:, mlp_dim:]`` the up one's. ``paxcache.sharding.shard_model``
  sets ``shards`` to the mesh size (:meth:`set_shards`), so that a device's slice of the
  columns holds its gate columns beside its up columns; :meth:`canonical_gate_up` gives
  the ``shards == 1`` order back (``save_decoder`` writes it).
  """

  def __init__(
    self,
    d_model: int,
    mlp_dim: int,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    gemm: str = "auto",
    interpret: bool = False,
    rngs: nnx.Rngs,
  ):
    # nnx.Linear's initialiser (LeCun normal: fan-in d_model), for both halves.
    init = nnx.initializers.lecun_normal()
    self.gate_up = nnx.Param(init(rngs.params(), (d_model, 2 * mlp_dim), param_dtype))
    self.down = nnx.Linear(
      mlp_dim, d_model, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.mlp_dim = mlp_dim
    self.dtype = dtype
    self.shards = 1
    self.gemm = check_gemm(gemm)
    self.interpret = interpret
    # Set by paxcache.sharding.shard_model and Decoder(mesh=): the weights are (or may be)
    # split over a mesh, so the products are XLA's (``project``'s ``sharded``).
    self.mesh = None

  def __call__(self, x: jax.Array) -> jax.Array:
    # As nnx.Linear: input and kernel promoted to the computation dtype (in project).
    a = self._fused_front(x)
    if a is None:
      gate, up = split_column_blocks(
        self._project(x, self.gate_up[...]), (self.mlp_dim,) * 2, self.shards
      )
      a = jax.nn.silu(gate) * up
    return self._project(a, self.down.kernel[...])

  def _fused_front(self, x: jax.Array):
    """``silu(gate) * up`` by one Pallas kernel (``kernels.gpu.matmul.swiglu_matmul``, the
    activation in the product's epilogue), or None where the two-step path runs.

    As :func:`project` decides for a product: "auto" takes the kernel on a Hopper GPU
    (where it was measured, and whose shared memory its launches need) where
    :func:`kernels.gpu.matmul.swiglu_settings` has a launch, for 16-bit inputs and a
    weight stored in the computation dtype, with no mesh and one block of columns
    (``shards == 1``: the kernel pairs gate column ``j`` with up column ``mlp + j``);
    "pallas" always (ValueError or BackendUnavailableError where it cannot); "xla"
    never."""
    if self.gemm == "xla":
      return None
    w = self.gate_up[...]
    stored = w.dtype
    xp, wp = nnx.nn.dtypes.promote_dtype((x, w), dtype=self.dtype)
    sharded = self.mesh is not None or self.shards > 1
    lead = xp.shape[:-1]
    rows, k = math.prod(lead), xp.shape[-1]
    dtype_ok = jnp.dtype(xp.dtype) in gpu_matmul.DTYPES
    pallas = self.gemm == "pallas"
    settings = (
      gpu_matmul.swiglu_settings(rows, k, self.mlp_dim, itemsize=xp.dtype.itemsize, fit=pallas)
      if dtype_ok
      else None
    )
    if not pallas:
      if sharded or stored != wp.dtype or settings is None:
        return None
      if kernels.resolve_backend("auto") != "gpu" or not kernels.gpu.is_hopper():
        return None
    else:
      _check_pallas(sharded=sharded, interpret=self.interpret, dtype=xp.dtype)
      if settings is None:
        raise ValueError(
          f"gemm='pallas' cannot run SwiGLU's {rows} rows x [{k}, 2 x {self.mlp_dim}] "
          f"(kernels.gpu.matmul.swiglu_settings: at most {gpu_matmul.FIT_MAX_ROWS} rows, K "
          "and the MLP width multiples of 16)"
        )
    a = gpu_matmul.swiglu_matmul(
      xp.reshape(rows, k), wp, mlp=self.mlp_dim, settings=settings, interpret=self.interpret
    )
    return a.reshape(*lead, self.mlp_dim)

  def _project(self, x: jax.Array, w: jax.Array) -> jax.Array:
    sharded = self.mesh is not None or self.shards > 1
    return project(
      x, w, dtype=self.dtype, gemm=self.gemm, interpret=self.interpret, sharded=sharded
    )

  def canonical_gate_up(self) -> jax.Array:
    """``gate_up`` in the ``shards == 1`` column order: ``[gate | up]``."""
    return reorder_column_blocks(self.gate_up[...], (self.mlp_dim,) * 2, self.shards, 1)

  def set_shards(self, shards: int) -> None:
    """Reorders ``gate_up``'s columns into ``shards`` blocks of ``[gate | up]`` (a copy of
    the weight, once); ``mlp_dim`` must be a multiple of ``shards`` (ValueError)."""
    shards = int(shards)
    if shards < 1 or self.mlp_dim % shards:
      raise ValueError(
        f"SwiGLU.set_shards: mlp_dim {self.mlp_dim} is not a multiple of {shards} shards"
      )
    if shards != self.shards:
      widths = (self.mlp_dim,) * 2
      self.gate_up.set_value(reorder_column_blocks(self.gate_up[...], widths, self.shards, shards))
      self.shards = shards


# One weight for several products of one input (the MLP's gate and up, attention's q, k
# and v): ``shards`` blocks of columns, each holding its share of every part in order, so
# that a device's slice of a column-sharded weight computes its share of each part.


def split_column_blocks(h: jax.Array, widths: tuple[int, ...], shards: int) -> list[jax.Array]:
  """``h [..., sum(widths)]`` in ``shards`` column blocks -> one ``[..., width]`` per part."""
  lead = h.shape[:-1]
  per = [w // shards for w in widths]
  h = h.reshape(*lead, shards, sum(per))
  starts = [sum(per[:i]) for i in range(len(per))]
  return [h[..., s : s + c].reshape(*lead, c * shards) for s, c in zip(starts, per, strict=True)]


def reorder_column_blocks(w: jax.Array, widths: tuple[int, ...], src: int, dst: int) -> jax.Array:
  """``w [d, sum(widths)]`` from ``src`` column blocks (each part's share of each block, in
  order) to ``dst`` blocks; every width must be a multiple of both."""
  if src == dst:
    return w
  d = w.shape[0]
  parts = split_column_blocks(w, widths, src)  # each [d, width], in the one-block order
  out = [p.reshape(d, dst, c // dst) for p, c in zip(parts, widths, strict=True)]
  return jnp.concatenate(out, axis=2).reshape(d, sum(widths))
