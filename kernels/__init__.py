"""Paged attention kernels: one API, one layout, several backends.

``kernels`` imports nothing from ``paxcache`` or flax, so a Flax model (or any JAX
code) can use it on its own.
"""

from kernels._api import BACKENDS, BackendUnavailableError, paged_attention, resolve_backend
from kernels._validate import validate_inputs
from kernels._write import INVALID_SLOT, check_host_slot_mapping, write_kv
from kernels.reference import INVALID_BLOCK

__all__ = [
  "BACKENDS",
  "INVALID_BLOCK",
  "INVALID_SLOT",
  "BackendUnavailableError",
  "check_host_slot_mapping",
  "paged_attention",
  "resolve_backend",
  "validate_inputs",
  "write_kv",
]
