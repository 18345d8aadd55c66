"""Building blocks of the decoder: RMSNorm, SwiGLU MLP and rotary position embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


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

  The gate and up weights are one parameter, ``gate_up`` ``[d_model, 2, mlp_dim]``
  (``[:, 0]`` the gate's kernel, ``[:, 1]`` the up projection's), read by one matrix
  product. Given two products with one input, XLA merges them into one GEMM over their
  weights concatenated inside the kernel, and on the H200 that GEMM ran at 256 rows in
  1.4x the time of the same product over one weight (docs/benchmarks.md, "One weight for
  gate and up"): a decode step reads every weight byte once, so its speed is the GEMM's.
  The middle axis keeps each gate column beside its up column when the last axis is
  sharded over devices (``paxcache.sharding.shard_model``).
  """

  def __init__(
    self,
    d_model: int,
    mlp_dim: int,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    # nnx.Linear's initialiser (LeCun normal over the input axis), for both halves.
    init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    self.gate_up = nnx.Param(init(rngs.params(), (d_model, 2, mlp_dim), param_dtype))
    self.down = nnx.Linear(
      mlp_dim, d_model, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    # As nnx.Linear: input and kernel promoted to the computation dtype.
    x, w = nnx.nn.dtypes.promote_dtype((x, self.gate_up[...]), dtype=self.dtype)
    h = jnp.einsum("...d,dgf->...gf", x, w)
    return self.down(jax.nn.silu(h[..., 0, :]) * h[..., 1, :])
