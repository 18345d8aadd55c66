"""Model configuration for the small Llama-style decoder."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

from kernels import check_kv_dtype


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shape of a Llama-style decoder (RMSNorm, SwiGLU MLP, RoPE, GQA).

  Frozen and hashable so that it can be a static argument of a jitted function.
  """

  vocab_size: int = 256  # byte-level tokenizer: one token per byte
  d_model: int = 64  # residual stream width
  num_layers: int = 2
  num_q_heads: int = 4
  num_kv_heads: int = 2  # < num_q_heads is GQA; 1 is MQA
  head_dim: int = 16
  mlp_dim: int = 192  # SwiGLU hidden width
  # Longest sequence (prompt + output) the engine serves with this model (it refuses longer
  # requests); the model's own calls do not check positions against it.
  max_seq_len: int = 512
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True  # the output projection reuses the embedding matrix
  dtype: str = "float32"  # activation / KV dtype
  # Weights of the projections and the embedding; "bfloat16" halves the bytes a
  # memory-bound decode step reads (norm scales stay float32: they are d_model floats).
  param_dtype: str = "float32"
  # Dtype of the paged K/V cache; None: ``dtype`` (as before this option existed).
  # "int8" or "float8_e4m3fn" makes an 8-bit cache with a float32 scale per (KV head,
  # token): about half the bytes of a bf16 cache (kernels._quant, docs/engine.md).
  kv_dtype: str | None = None
  # int8 caches only: K/V rows are stored rotated by a normalised Walsh-Hadamard matrix of
  # head_dim (queries rotated alike, outputs rotated back; kernels.hadamard_rotate), so
  # that a row's one scale is not set by a few large channels. False stores the rows as
  # they are (the ablation; docs/engine.md, "8-bit K/V"). float8_e4m3fn is never rotated.
  kv_rotation: bool = True

  def __post_init__(self):
    for name in (
      "vocab_size",
      "d_model",
      "num_layers",
      "num_q_heads",
      "num_kv_heads",
      "head_dim",
      "mlp_dim",
      "max_seq_len",
    ):
      if getattr(self, name) < 1:
        raise ValueError(f"DecoderConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.num_q_heads % self.num_kv_heads:
      raise ValueError(
        f"num_q_heads {self.num_q_heads} must be a multiple of num_kv_heads {self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      try:
        dt = jnp.dtype(value)
      except TypeError as e:
        raise ValueError(f"DecoderConfig.{name} must be a dtype name, got {value!r}") from e
      if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"DecoderConfig.{name} must be a floating dtype, got {value!r}")

    if not isinstance(self.kv_rotation, bool):
      raise ValueError(f"DecoderConfig.kv_rotation must be a bool, got {self.kv_rotation!r}")
    if self.kv_dtype is not None:
      # None (the activation dtype), or a dtype the cache and kernels hold.
      check_kv_dtype(self.kv_dtype, "DecoderConfig.kv_dtype")
    else:
      # The cache takes the activation dtype: one the kernels read (float64 refused here,
      # not at the first cache built).
      check_kv_dtype(self.dtype, "DecoderConfig.dtype (the K/V cache's dtype: kv_dtype is None)")

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_kv_dtype(self):
    """The paged cache's dtype: ``kv_dtype``, or ``dtype`` when it is None."""
    return jnp.dtype(self.dtype if self.kv_dtype is None else self.kv_dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> DecoderConfig:
    return cls(**d)
