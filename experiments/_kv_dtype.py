"""The K/V dtype of a simulated pool: how many token slots its bytes hold.

``memory_waste`` and ``block_size_ablation`` size their pool in token slots
(``config.pool_tokens``) at float16 for a model shape (``config.kv_shape``: layers, KV heads,
head_dim; default OPT-13B's 40 x 40 x 128, 800 KiB per token). ``config.kv_dtype`` keeps
those bytes and changes what one token costs: an 8-bit pool (int8, float8_e4m3fn) counts a
float32 K and V scale per token and KV head (``kernels.kv_bytes_per_token``), so the same
bytes hold 1.94x the float16 slots at head_dim 128.
"""

from __future__ import annotations

from ml_collections import ConfigDict

import kernels

BASE_DTYPE = "float16"  # the dtype config.pool_tokens is counted in
OPT_13B = (40, 40, 128)  # layers, KV heads, head_dim


def pool_tokens(config: ConfigDict) -> int:
  """Token slots the bytes of ``config.pool_tokens`` float16 slots hold at ``config.kv_dtype``
  (``config.pool_tokens`` itself when the field is absent or float16)."""
  kv_dtype = config.get("kv_dtype") or BASE_DTYPE
  if kv_dtype == BASE_DTYPE:
    return config.pool_tokens
  shape = tuple(config.get("kv_shape") or OPT_13B)
  base = kernels.kv_bytes_per_token(*shape, BASE_DTYPE)
  return config.pool_tokens * base // kernels.kv_bytes_per_token(*shape, kv_dtype)


def pool_label(config: ConfigDict) -> str:
  """``"15360 slots (float16)"``: the pool's size and K/V dtype, for captions."""
  return f"{pool_tokens(config)} slots ({config.get('kv_dtype') or BASE_DTYPE})"
