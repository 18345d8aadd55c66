"""paxcache: paged KV caches (PagedAttention) for JAX research on TPU and GPU."""

__version__ = "0.1.0"
