"""Paged attention kernels: one API, one layout, several backends.

``kernels`` imports nothing from ``paxcache`` or flax, so a Flax model (or any JAX
code) can use it on its own.
"""

from kernels._api import (
  BACKENDS,
  BackendUnavailableError,
  check_paged_attention,
  paged_attention,
  resolve_backend,
  write_and_decode,
  write_and_decode_packed,
)
from kernels._quant import (
  KV_DTYPES,
  QUANT_DTYPES,
  check_kv_dtype,
  dequantize,
  hadamard_rotate,
  is_quantized,
  kv_bytes_per_token,
  quantize,
)
from kernels._validate import validate_inputs
from kernels._write import (
  INVALID_SLOT,
  check_host_slot_mapping,
  check_host_slots_match_table,
  write_kv,
  write_kv_quantized,
)
from kernels.cascade import CascadePlan, cascade_attention, check_cascade_attention, plan_cascade
from kernels.reference import INVALID_BLOCK

__all__ = [
  "BACKENDS",
  "INVALID_BLOCK",
  "INVALID_SLOT",
  "KV_DTYPES",
  "QUANT_DTYPES",
  "BackendUnavailableError",
  "CascadePlan",
  "cascade_attention",
  "check_cascade_attention",
  "check_host_slot_mapping",
  "check_host_slots_match_table",
  "check_kv_dtype",
  "check_paged_attention",
  "dequantize",
  "hadamard_rotate",
  "is_quantized",
  "kv_bytes_per_token",
  "paged_attention",
  "plan_cascade",
  "quantize",
  "resolve_backend",
  "validate_inputs",
  "write_and_decode",
  "write_and_decode_packed",
  "write_kv",
  "write_kv_quantized",
]
