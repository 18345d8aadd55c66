"""The device-side K/V cache: block pools for every layer, and the host pool they swap to.

Layout (one for every backend; docs/ARCHITECTURE.md says why heads come first)::

  PagedKVCache.k, .v   [num_layers, num_kv_heads, num_blocks, block_size, head_dim]
  cache.k[layer]       [num_kv_heads, num_blocks, block_size, head_dim]   what the kernels take
  HostKVPool.k, .v     [num_layers, num_kv_heads, num_host_blocks, block_size, head_dim]  NumPy

Every function here is pure on the device side: it returns a new ``PagedKVCache``.
``write``, ``copy_blocks`` and ``swap_in`` donate the cache they are given (jit
``donate_argnums``), so outside an enclosing ``jit`` the update happens in place
and costs O(tokens or blocks touched) instead of a copy of the pool. The caller
must use the returned cache: the arrays of the one passed in are deleted. Under
an enclosing ``jit`` the inner jit is inlined and the enclosing function's own
donation decides (donate the cache there too).

Slot contents are only defined where a sequence wrote a token: unused blocks and
the slots past each sequence's length may hold anything (stale K/V of a freed
request, NaN); every kernel masks them. ``create`` happens to fill with zeros.

Block and slot ids that come from the host (NumPy arrays, lists, ints) are checked
before anything runs and raise ``ValueError`` naming the ids; ids already on the
device (``jax.Array`` or tracers) cannot be checked without a sync and are trusted
(``write`` and ``copy_blocks`` drop out-of-range destinations).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kernels import INVALID_BLOCK, check_host_slot_mapping, write_kv

# ---------------------------------------------------------------------------------------------
# The device cache.


@flax.struct.dataclass
class PagedKVCache:
  """K and V block pools of every layer; an immutable pytree (safe to pass through jit).

  Sizes are read from the array shapes rather than stored as static fields, so they can
  never disagree with the arrays and the treedef stays the same for every pool size.
  """

  k: jax.Array  # [num_layers, num_kv_heads, num_blocks, block_size, head_dim]
  v: jax.Array  # [num_layers, num_kv_heads, num_blocks, block_size, head_dim]

  @classmethod
  def create(
    cls,
    num_layers: int,
    num_kv_heads: int,
    num_blocks: int,
    block_size: int,
    head_dim: int,
    dtype=jnp.float32,
  ) -> PagedKVCache:
    """Allocates the pools (zero-filled, but callers must not rely on unused slots' values)."""
    dims = dict(
      num_layers=num_layers,
      num_kv_heads=num_kv_heads,
      num_blocks=num_blocks,
      block_size=block_size,
      head_dim=head_dim,
    )
    shape = _check_dims(dims)
    dtype = _check_float_dtype(dtype, "dtype")
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  @property
  def num_layers(self) -> int:
    return self.k.shape[0]

  @property
  def num_kv_heads(self) -> int:
    return self.k.shape[1]

  @property
  def num_blocks(self) -> int:
    return self.k.shape[2]

  @property
  def block_size(self) -> int:
    return self.k.shape[3]

  @property
  def head_dim(self) -> int:
    return self.k.shape[4]

  @property
  def dtype(self):
    return self.k.dtype

  def layer(self, layer) -> tuple[jax.Array, jax.Array]:
    """``(k_blocks, v_blocks)`` of one layer, each ``[num_kv_heads, num_blocks, block_size,
    head_dim]``: the arguments ``kernels.paged_attention`` takes."""
    _check_layer(layer, self.num_layers)
    return self.k[layer], self.v[layer]


def _check_dims(dims: dict[str, int]) -> tuple[int, ...]:
  for name, value in dims.items():
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  return tuple(int(x) for x in dims.values())


def _check_float_dtype(dtype, name: str):
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"{name} must be a floating dtype, got {dtype!r}") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating dtype, got {dtype.name}")
  return dtype


def _shape_str(x) -> str:
  return f"{tuple(x.shape)} {jnp.dtype(x.dtype).name}"


def _check_cache(cache) -> None:
  if not isinstance(cache, PagedKVCache):
    raise ValueError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
  if cache.k.ndim != 5 or cache.v.shape != cache.k.shape or cache.v.dtype != cache.k.dtype:
    raise ValueError(
      "cache.k and cache.v must both be [num_layers, num_kv_heads, num_blocks, block_size, "
      f"head_dim] of one dtype, got k {_shape_str(cache.k)} and v {_shape_str(cache.v)}"
    )


def _check_layer(layer, num_layers: int) -> None:
  """Python ints are range-checked; a traced or device layer index must be an int scalar."""
  if isinstance(layer, bool):
    raise ValueError(f"layer must be an int, got {layer!r}")
  if isinstance(layer, int | np.integer):
    if not 0 <= layer < num_layers:
      raise ValueError(f"layer {layer} out of range for a cache of {num_layers} layers")
    return
  if getattr(layer, "ndim", None) != 0 or not jnp.issubdtype(layer.dtype, jnp.integer):
    raise ValueError(f"layer must be an int or an integer scalar array, got {layer!r}")


# ---------------------------------------------------------------------------------------------
# Writing new tokens.


def write(cache: PagedKVCache, layer, k_new, v_new, slot_mapping) -> PagedKVCache:
  """Writes the new tokens' K/V of one layer into their slots; returns the new cache.

  Args:
    cache: the cache; donated (use the returned one).
    layer: layer index, a Python int (range-checked) or an int32 scalar array (e.g. the
      index of a ``lax.scan`` over layers; not checked).
    k_new, v_new: ``[num_tokens, num_kv_heads, head_dim]``, any float dtype (cast to the
      cache dtype).
    slot_mapping: ``i32[num_tokens]``, ``block_id * block_size + offset``;
      ``kernels.INVALID_SLOT`` (-1) marks padding rows, which write nothing. A NumPy
      slot_mapping is checked (in range, no slot twice); a device one is trusted.

  ``kernels.write_kv(..., layer=layer)`` on the 5-D pools: one scatter into the pool, since
  slicing the layer out, scattering and writing it back makes XLA copy the whole layer
  (measured on CPU: 18.7 ms vs 66 us for 4 tokens in a 16 MiB layer).
  """
  _check_cache(cache)
  _check_layer(layer, cache.num_layers)
  want = (cache.num_kv_heads, cache.head_dim)
  for name, x in (("k_new", k_new), ("v_new", v_new)):
    if x.ndim != 3 or tuple(x.shape[1:]) != want:
      raise ValueError(
        f"{name} must be [num_tokens, {want[0]}, {want[1]}] (num_kv_heads, head_dim of the "
        f"cache), got {_shape_str(x)}"
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a float array, got {_shape_str(x)}")
  if k_new.shape != v_new.shape:
    raise ValueError(f"k_new {_shape_str(k_new)} and v_new {_shape_str(v_new)} differ")
  if slot_mapping.shape != (k_new.shape[0],) or slot_mapping.dtype != jnp.int32:
    raise ValueError(
      f"slot_mapping must be int32 [{k_new.shape[0]}] (one per new token), got "
      f"{_shape_str(slot_mapping)}"
    )
  check_host_slot_mapping(slot_mapping, cache.num_blocks * cache.block_size)
  return _write(cache, jnp.asarray(layer, jnp.int32), k_new, v_new, slot_mapping)


@functools.partial(jax.jit, donate_argnums=0)
def _write(cache, layer, k_new, v_new, slot_mapping):
  k, v = write_kv(cache.k, cache.v, k_new, v_new, slot_mapping, layer=layer)
  return PagedKVCache(k=k, v=v)


# ---------------------------------------------------------------------------------------------
# Copy-on-write.


def copy_blocks(cache: PagedKVCache, src, dst) -> PagedKVCache:
  """Copies blocks ``src[i] -> dst[i]`` in every layer and head; returns the new cache.

  Args:
    cache: the cache; donated (use the returned one).
    src, dst: ``i32[num_pairs]`` physical block ids (any integer dtype from the host is
      cast). A pair with ``INVALID_BLOCK`` (-1) in both is padding and copies nothing, so
      the engine can pad the pairs to a bucket size and not recompile.

  All sources are read before any destination is written, so the result does not depend
  on the order of the pairs. Host ids are checked: in range, padding in both or neither,
  and no destination twice (the scatter order would decide which copy wins).
  """
  _check_cache(cache)
  src = _as_ids(src, "src")
  dst = _as_ids(dst, "dst")
  if src.shape != dst.shape:
    raise ValueError(f"src {_shape_str(src)} and dst {_shape_str(dst)} must have one shape")
  if _on_host(src) and _on_host(dst):
    s, d = np.asarray(src), np.asarray(dst)
    _check_range(s, "src", cache.num_blocks, allow_invalid=True)
    _check_range(d, "dst", cache.num_blocks, allow_invalid=True)
    half = (s == INVALID_BLOCK) != (d == INVALID_BLOCK)
    if half.any():
      raise ValueError(
        f"copy pairs must be padded in both src and dst; half-padded pairs at positions "
        f"{np.flatnonzero(half).tolist()}: src {s[half].tolist()}, dst {d[half].tolist()}"
      )
    _check_unique(d[d != INVALID_BLOCK], "dst")
  if src.shape[0] == 0:
    return cache
  return _copy_blocks(cache, jnp.asarray(src, jnp.int32), jnp.asarray(dst, jnp.int32))


@functools.partial(jax.jit, donate_argnums=0)
def _copy_blocks(cache, src, dst):
  pad = (src < 0) | (dst < 0)
  src = jnp.where(pad, 0, src)
  dst = jnp.where(pad, cache.num_blocks, dst)  # out of range: dropped by the scatter

  def copy(pool):
    return pool.at[:, :, dst].set(pool[:, :, src], mode="drop")

  return PagedKVCache(k=copy(cache.k), v=copy(cache.v))


# ---------------------------------------------------------------------------------------------
# Host pool and swapping.


class HostKVPool:
  """Host (CPU) memory for swapped-out blocks: plain NumPy arrays, mutated in place.

  ``k, v: [num_layers, num_kv_heads, num_host_blocks, block_size, head_dim]``. Which host
  block holds what is the allocator's business; this class only holds the bytes.
  """

  def __init__(self, k: np.ndarray, v: np.ndarray):
    if not isinstance(k, np.ndarray) or not isinstance(v, np.ndarray):
      raise ValueError(
        f"HostKVPool needs NumPy arrays, got {type(k).__name__} and {type(v).__name__}"
      )
    if k.ndim != 5 or v.shape != k.shape or v.dtype != k.dtype:
      raise ValueError(
        "host k and v must both be [num_layers, num_kv_heads, num_host_blocks, block_size, "
        f"head_dim] of one dtype, got k {_shape_str(k)} and v {_shape_str(v)}"
      )
    self.k = k
    self.v = v

  @classmethod
  def create(
    cls,
    num_layers: int,
    num_kv_heads: int,
    num_host_blocks: int,
    block_size: int,
    head_dim: int,
    dtype=np.float32,
  ) -> HostKVPool:
    """Allocates the host pools (zero-filled; np.zeros maps memory lazily)."""
    dims = dict(
      num_layers=num_layers,
      num_kv_heads=num_kv_heads,
      num_host_blocks=num_host_blocks,
      block_size=block_size,
      head_dim=head_dim,
    )
    shape = _check_dims(dims)
    dtype = _check_float_dtype(dtype, "dtype")
    return cls(np.zeros(shape, dtype), np.zeros(shape, dtype))

  @classmethod
  def like(cls, cache: PagedKVCache, num_host_blocks: int) -> HostKVPool:
    """A host pool whose blocks fit ``cache``'s blocks (same layers, heads, sizes, dtype)."""
    _check_cache(cache)
    return cls.create(
      cache.num_layers,
      cache.num_kv_heads,
      num_host_blocks,
      cache.block_size,
      cache.head_dim,
      cache.dtype,
    )

  @property
  def num_host_blocks(self) -> int:
    return self.k.shape[2]

  def __repr__(self) -> str:
    return f"HostKVPool(k={_shape_str(self.k)}, v={_shape_str(self.v)})"


def swap_out(cache: PagedKVCache, host_pool: HostKVPool, device_ids, host_ids) -> None:
  """Copies device blocks ``device_ids[i]`` into host blocks ``host_ids[i]`` (all layers).

  The blocks are gathered on the device and cross to the host in one transfer of just
  those blocks. ``cache`` is not changed (nor donated): freeing the device blocks is the
  allocator's job. ``host_pool`` is written in place. Ids are checked on the host first;
  after an error nothing has been read or written.
  """
  device_ids, host_ids = _check_swap(cache, host_pool, device_ids, host_ids, "host_ids")
  if device_ids.size == 0:
    return
  blocks = np.asarray(_gather_blocks(cache, device_ids))  # the one device -> host transfer
  host_pool.k[:, :, host_ids] = blocks[0]
  host_pool.v[:, :, host_ids] = blocks[1]


def swap_in(cache: PagedKVCache, host_pool: HostKVPool, host_ids, device_ids) -> PagedKVCache:
  """Copies host blocks ``host_ids[i]`` into device blocks ``device_ids[i]``; returns the new
  cache.

  The host blocks are gathered in NumPy and cross to the device in one transfer; ``cache``
  is donated (use the returned one). Ids are checked on the host first; after an error the
  cache is untouched and still valid.
  """
  device_ids, host_ids = _check_swap(cache, host_pool, device_ids, host_ids, "device_ids")
  if device_ids.size == 0:
    return cache
  blocks = np.stack([host_pool.k[:, :, host_ids], host_pool.v[:, :, host_ids]])
  return _scatter_blocks(cache, blocks, device_ids)  # the array crosses once, into the jit


@jax.jit
def _gather_blocks(cache, ids):
  # One array, so that the device -> host copy is a single transfer.
  return jnp.stack([cache.k[:, :, ids], cache.v[:, :, ids]])  # [2, L, H, n, bs, D]


@functools.partial(jax.jit, donate_argnums=0)
def _scatter_blocks(cache, blocks, ids):
  return PagedKVCache(
    k=cache.k.at[:, :, ids].set(blocks[0]), v=cache.v.at[:, :, ids].set(blocks[1])
  )


def _check_swap(cache, host_pool, device_ids, host_ids, dst_name):
  _check_cache(cache)
  if not isinstance(host_pool, HostKVPool):
    raise ValueError(f"host_pool must be a HostKVPool, got {type(host_pool).__name__}")
  dev, host = cache.k.shape, host_pool.k.shape
  if dev[:2] + dev[3:] != host[:2] + host[3:] or jnp.dtype(cache.dtype) != host_pool.k.dtype:
    raise ValueError(
      f"host_pool blocks {_shape_str(host_pool.k)} do not fit the cache's {_shape_str(cache.k)}"
      " (layers, kv heads, block_size, head_dim and dtype must match)"
    )
  device_ids = np.asarray(_as_ids(device_ids, "device_ids"))
  host_ids = np.asarray(_as_ids(host_ids, "host_ids"))
  if device_ids.shape != host_ids.shape:
    raise ValueError(
      f"device_ids {_shape_str(device_ids)} and host_ids {_shape_str(host_ids)} must have one shape"
    )
  _check_range(device_ids, "device_ids", cache.num_blocks, allow_invalid=False)
  _check_range(host_ids, "host_ids", host_pool.num_host_blocks, allow_invalid=False)
  _check_unique(device_ids if dst_name == "device_ids" else host_ids, dst_name)
  return device_ids.astype(np.int32), host_ids.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Id checks (host side).


def _on_host(x) -> bool:
  return not isinstance(x, jax.Array)


def _as_ids(ids, name: str):
  """1-D integer ids; host ids become an int32 NumPy array, device ids stay on the device."""
  if _on_host(ids):
    ids = np.asarray(ids)
    if ids.size == 0 and ids.dtype == np.float64:  # np.asarray([]) is float64
      ids = ids.astype(np.int32)
  if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{name} must be a 1-D integer array of block ids, got {_shape_str(ids)}")
  if _on_host(ids):
    # Range first, then narrow: an int64 id past int32 must be reported, not wrapped.
    if ids.size and (ids.max() > np.iinfo(np.int32).max or ids.min() < np.iinfo(np.int32).min):
      raise ValueError(f"{name} has ids outside int32: {ids.tolist()}")
    ids = ids.astype(np.int32)
  return ids


def _check_range(ids: np.ndarray, name: str, limit: int, *, allow_invalid: bool) -> None:
  ok = (ids >= 0) & (ids < limit)
  if allow_invalid:
    ok |= ids == INVALID_BLOCK
  if not ok.all():
    extra = f" or {INVALID_BLOCK} (padding)" if allow_invalid else ""
    raise ValueError(f"{name} {ids[~ok].tolist()} out of range [0, {limit}){extra}")


def _check_unique(ids: np.ndarray, name: str) -> None:
  values, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    raise ValueError(f"{name} has repeated ids {values[counts > 1].tolist()}")
