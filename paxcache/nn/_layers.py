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
# inputs, at most 128 rows, weights of at most 16 MiB: kernels.gpu.matmul.matmul_settings)
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
  norm: RMSNorm | None = None,
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
    norm: None, or an :class:`RMSNorm` to apply to x first: ``norm(x) @ w``. Where the
      Pallas product runs, the norm runs inside it (``kernels.gpu.matmul.skinny_matmul``'s
      ``norm_scale``: no kernel of its own; the bf16 rounding falls before the row factor
      instead of after it); elsewhere ``norm(x)``, then the product.

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
  xp, wp = nnx.nn.dtypes.promote_dtype((x, w), dtype=dtype)

  def xla():
    xn = x if norm is None else norm(x)
    return jnp.dot(*nnx.nn.dtypes.promote_dtype((xn, w), dtype=dtype))

  if gemm == "xla":
    return xla()
  if xp.ndim < 1 or wp.ndim != 2:
    if gemm == "pallas":
      raise ValueError(f"gemm='pallas' takes x [..., K] and w [K, N], got {x.shape}, {w.shape}")
    return xla()
  lead = xp.shape[:-1]
  rows = math.prod(lead)
  k, n = wp.shape
  dtype_ok = jnp.dtype(xp.dtype) in gpu_matmul.DTYPES
  fit = gemm == "pallas"
  settings = (
    gpu_matmul.matmul_settings(rows, k, n, itemsize=xp.dtype.itemsize, fit=fit)
    if dtype_ok
    else None
  )
  if gemm == "auto":
    cast = stored != wp.dtype
    if sharded or cast or settings is None or kernels.resolve_backend("auto") != "gpu":
      return xla()
  else:  # "pallas": no fallback
    _check_pallas(sharded=sharded, interpret=interpret, dtype=xp.dtype)
    if settings is None:
      raise ValueError(
        f"gemm='pallas' cannot run {rows} rows x [{k}, {n}] "
        f"(kernels.gpu.matmul: at most {gpu_matmul.FIT_MAX_ROWS} rows, K and N multiples of 16)"
      )
  norm_kwargs = {}
  if norm is not None:  # the norm's scale and epsilon, applied inside the product
    norm_kwargs = dict(norm_scale=norm.scale[...], norm_eps=norm.eps)
  y = gpu_matmul.skinny_matmul(
    xp.reshape(rows, k), wp, settings, interpret=interpret, **norm_kwargs
  )
  return y.astype(xp.dtype).reshape(*lead, n)


def residual_project(
  x: jax.Array,
  w: jax.Array,
  res: jax.Array,
  *,
  dtype=None,
  gemm: str,
  interpret: bool = False,
  sharded: bool = False,
):
  """``res + x @ w``: :func:`project` with the residual add after it, in ``res``'s dtype.

  Where "auto" takes a Pallas product on a Hopper GPU (as :func:`project` decides, with
  :func:`kernels.gpu.matmul.residual_settings`' rule: at most 128 rows, a weight of at
  most 64 MiB stored in the computation dtype, 16-bit inputs, no mesh) the add is the
  product kernel's epilogue (:func:`kernels.gpu.matmul.residual_matmul`), so that a
  decode step's residual add costs no kernel of its own; elsewhere ``res + project(...)``
  as the two ops. "pallas": the kernel always (ValueError / BackendUnavailableError where
  it cannot run); "xla": never.
  """
  check_gemm(gemm)
  stored = w.dtype
  xp, wp = nnx.nn.dtypes.promote_dtype((x, w), dtype=dtype)
  lead = xp.shape[:-1]
  ok = gemm != "xla" and xp.ndim >= 1 and wp.ndim == 2 and res.shape == (*lead, wp.shape[-1])
  settings = None
  if ok and jnp.dtype(xp.dtype) in gpu_matmul.DTYPES and res.dtype == xp.dtype:
    rows, (k, n) = math.prod(lead), wp.shape
    settings = gpu_matmul.residual_settings(
      rows, k, n, itemsize=xp.dtype.itemsize, fit=gemm == "pallas"
    )
  if gemm == "pallas":
    _check_pallas(sharded=sharded, interpret=interpret, dtype=xp.dtype)
    if settings is None:
      raise ValueError(
        f"gemm='pallas' cannot run the residual product {x.shape} @ {w.shape} + "
        f"{res.dtype}{res.shape} (kernels.gpu.matmul.residual_settings: at most "
        f"{gpu_matmul.FIT_MAX_ROWS} rows, K and N multiples of 16, res in x's dtype and shape)"
      )
  elif (
    settings is None
    or sharded
    or stored != wp.dtype
    or kernels.resolve_backend("auto") != "gpu"
    or not kernels.gpu.is_hopper()
  ):
    return res + project(x, w, dtype=dtype, gemm=gemm, interpret=interpret, sharded=sharded)
  rows, k = math.prod(lead), xp.shape[-1]
  y = gpu_matmul.residual_matmul(
    xp.reshape(rows, k), wp, res.reshape(rows, -1), settings=settings, interpret=interpret
  )
  return y.reshape(res.shape)


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

  def __call__(
    self, x: jax.Array, *, norm: RMSNorm | None = None, residual: jax.Array | None = None
  ) -> jax.Array:
    """The MLP of ``x``; ``norm(x)``'s with ``norm``; ``residual +`` it with ``residual``.

    ``norm`` and ``residual`` give what ``residual + self(norm(x))`` gives, with the norm
    inside the fused front's kernel and the add inside the down product's where those
    kernels run (:meth:`_fused_front`, :func:`residual_project`): a decode step's layer
    then has no kernel for either. Elsewhere they run as the ops they name.
    """
    # As nnx.Linear: input and kernel promoted to the computation dtype (in project).
    a = self._fused_front(x, norm)
    if a is None:
      if norm is not None:
        x = norm(x)
      gate, up = split_column_blocks(
        self._project(x, self.gate_up[...]), (self.mlp_dim,) * 2, self.shards
      )
      a = jax.nn.silu(gate) * up
    if residual is None:
      return self._project(a, self.down.kernel[...])
    sharded = self.mesh is not None or self.shards > 1
    return residual_project(
      a,
      self.down.kernel[...],
      residual,
      dtype=self.dtype,
      gemm=self.gemm,
      interpret=self.interpret,
      sharded=sharded,
    )

  def _fused_front(self, x: jax.Array, norm: RMSNorm | None = None):
    """``silu(gate) * up`` by one Pallas kernel (``kernels.gpu.matmul.swiglu_matmul``, the
    activation in the product's epilogue), or None where the two-step path runs.

    As :func:`project` decides for a product: "auto" takes the kernel on a Hopper GPU
    (where it was measured, and whose shared memory its launches need) where
    :func:`kernels.gpu.matmul.swiglu_settings` has a launch, for 16-bit inputs and a
    weight stored in the computation dtype, with no mesh and one block of columns
    (``shards == 1``: the kernel pairs gate column ``j`` with up column ``mlp + j``);
    "pallas" always (ValueError or BackendUnavailableError where it cannot); "xla"
    never. With ``norm`` (an :class:`RMSNorm`) the kernel normalizes x itself (its scale on
    each K tile, the row factor on the sums); where it does not run, None as without."""
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
    norm_kwargs = {}
    if norm is not None:  # the norm's scale and epsilon, applied inside the kernel
      norm_kwargs = dict(norm_scale=norm.scale[...], norm_eps=norm.eps)
    a = gpu_matmul.swiglu_matmul(
      xp.reshape(rows, k),
      wp,
      mlp=self.mlp_dim,
      settings=settings,
      interpret=self.interpret,
      **norm_kwargs,
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
