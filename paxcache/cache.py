"""The device-side K/V cache: block pools for every layer, and the host pool they swap to.

Layout (one for every backend; docs/ARCHITECTURE.md says why heads come first)::

  PagedKVCache.k, .v   tuples of num_layers arrays, one buffer per layer:
  cache.k[layer]       [num_kv_heads, num_blocks, block_size, head_dim]   what the kernels take
                       (lane-dense: [..., block_size / row_tokens, 128]; lane-padded:
                       [..., block_size, head_dim rounded up to 128]; PagedKVCache.create)
  cache.k_scale[layer] f32[num_kv_heads, num_blocks, block_size]   8-bit caches only (else ())
  HostKVPool.k, .v     [num_layers, num_kv_heads, num_host_blocks, block_size, head_dim]  NumPy
  HostKVPool.k_scale   f32[num_layers, num_kv_heads, num_host_blocks, block_size] (8-bit only)
                       (views of block-major storage: one contiguous slab per host block;
                       a lane-padded cache's host blocks hold its real head_dim)

An 8-bit cache (``dtype`` int8 or float8_e4m3fn) stores each token's K (and V) row of each
KV head quantized with its own float32 scale (``kernels.quantize``); the scales sit in
pools of the K/V pools' shape without head_dim, so a block's scales are block ``b`` of
the scale pool, and every function here that moves a block (write, copy_blocks,
swap_out, swap_in) moves its scales with it.

Each layer's pool is its own buffer, not a slice of one 5-D array, because a Pallas
kernel is a custom call: XLA must hand it a whole buffer, so a layer sliced out of a 5-D
pool is first copied, and a jitted model step then copies the entire pool every step
(measured on an H200: a step's time grew with the pool, 2.2 ms at 2,056 blocks to 16.4 ms
at 81,920, docs/benchmarks.md). With one buffer per layer the kernels read the pool in
place and a step costs what its live tokens cost, whatever the pool's size.

Every function here is pure on the device side: it returns a new ``PagedKVCache``.
``write`` (the layer it writes), ``copy_blocks`` and ``swap_in`` (every layer) donate the
pools they update (jit ``donate_argnums``), so outside an enclosing ``jit`` the update
happens in place and costs O(tokens or blocks touched) instead of a copy of the pool.
The caller must use the returned cache: the donated arrays of the one passed in are
deleted (the returned cache shares the others). Under
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

from kernels import (
  INVALID_BLOCK,
  _layout,
  check_host_slot_mapping,
  check_kv_dtype,
  is_quantized,
  write_kv,
  write_kv_quantized,
)
from kernels._quant import SCALE_DTYPE
from kernels._validate import check_arrays

# ---------------------------------------------------------------------------------------------
# The device cache.


@flax.struct.dataclass
class PagedKVCache:
  """K and V block pools of every layer; an immutable pytree (safe to pass through jit).

  Sizes are read from the array shapes rather than stored as static fields, so they can
  never disagree with the arrays and the treedef stays the same for every pool size. Two
  static fields say the layout (``kernels._layout``), which the kernels of every backend
  read with the same results as the plain one:

  - ``row_tokens``: how many tokens a pool row holds: 1 (the plain layout) or
    ``128 // head_dim`` for a lane-dense cache (``create(..., lane_dense=True)``, head_dim
    32 or 64: pools ``[num_kv_heads, num_blocks, block_size / row_tokens, 128]``), which
    the TPU stores without padding;
  - ``real_head_dim``: None, or for a lane-padded cache (``create(..., lane_padded=True)``,
    a head_dim that is not a multiple of 128: pools ``[num_kv_heads, num_blocks,
    block_size, padded_width(head_dim)]``, zeros after the real lanes) the head_dim its
    rows hold, which is how the TPU kernels take head_dim 80, 96, 112 or 192.

  One more says what the rows are: ``rotated`` (int8 caches only; ``create(...,
  rotated=True)``, which ``paxcache.nn.Decoder.init_cache`` passes under
  ``DecoderConfig.kv_rotation``): the rows are ``k R`` and ``v R``, ``R`` the matrix of
  ``kernels.hadamard_rotate``. ``paxcache.nn.PagedAttention`` writes and reads such a cache
  (q times ``R`` before the kernel, the output times ``R`` after it) and refuses a cache
  whose flag is not its own; a reader calling ``kernels.paged_attention`` on it directly
  does the same multiplications.
  """

  k: tuple[jax.Array, ...]  # num_layers x [num_kv_heads, num_blocks, block_size, head_dim]
  v: tuple[jax.Array, ...]  # num_layers x [num_kv_heads, num_blocks, block_size, head_dim]
  # 8-bit caches: num_layers x f32[num_kv_heads, num_blocks, block_size]; () otherwise.
  k_scale: tuple[jax.Array, ...] = ()
  v_scale: tuple[jax.Array, ...] = ()
  row_tokens: int = flax.struct.field(pytree_node=False, default=1)
  real_head_dim: int | None = flax.struct.field(pytree_node=False, default=None)
  rotated: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def create(
    cls,
    num_layers: int,
    num_kv_heads: int,
    num_blocks: int,
    block_size: int,
    head_dim: int,
    dtype=jnp.float32,
    *,
    lane_dense: bool = False,
    lane_padded: bool = False,
    rotated: bool = False,
  ) -> PagedKVCache:
    """Allocates the pools (zero-filled, but callers must not rely on unused slots' values).

    ``dtype``: float32, bfloat16 or float16, or int8 / float8_e4m3fn for an 8-bit cache
    (with float32 scale pools, one scale per KV head and slot); ``kernels.check_kv_dtype``
    refuses others (float64, float8_e5m2, ...: no kernel reads them). ``lane_dense``:
    pools in rows of 128 (``128 // head_dim`` tokens a row, ``kernels._layout``), for
    head_dim 32 or 64 and a 16- or 32-bit dtype (ValueError otherwise): the layout the TPU
    kernels read without padding the head_dim to 128; the same bytes, results and API on
    every backend.
    ``lane_padded``: pools in rows of head_dim rounded up to a multiple of 128
    (``kernels._layout.padded_width``), one token a row, its K/V in the first head_dim
    lanes and zeros after them, for a head_dim that is not a multiple of 128 (ValueError
    otherwise), any K/V dtype: the layout in which the TPU kernels take such a head_dim
    (80, 96, 112, 192), at the padding's cost in HBM and read time; the same results and
    API (sizes in real head_dim) on every backend. Not both (ValueError). ``rotated``: the
    rows will be written rotated (the class docstring); int8 only (ValueError otherwise)."""
    dims = dict(
      num_layers=num_layers,
      num_kv_heads=num_kv_heads,
      num_blocks=num_blocks,
      block_size=block_size,
      head_dim=head_dim,
    )
    shape = _check_dims(dims)
    dtype = check_kv_dtype(dtype, "dtype")
    if not isinstance(rotated, bool):
      raise ValueError(f"PagedKVCache.create: rotated must be a bool, got {rotated!r}")
    if rotated and dtype != jnp.int8:
      raise ValueError(
        f"PagedKVCache.create: rotated=True is for int8 caches, got {jnp.dtype(dtype).name}"
      )
    num_layers, layer_shape = shape[0], shape[1:]
    row_tokens, real_head_dim = 1, None
    if lane_dense and lane_padded:
      raise ValueError(
        "PagedKVCache.create: lane_dense and lane_padded are two layouts; pass one of them"
      )
    if lane_padded:
      width = _layout.padded_width(head_dim)
      _layout.check_lane_padded(head_dim, width, "PagedKVCache.create(lane_padded=True)")
      layer_shape = (*layer_shape[:3], width)
      real_head_dim = int(head_dim)
    if lane_dense:
      layer_shape = _layout.lane_dense_shape(*layer_shape, dtype)
      row_tokens = block_size // layer_shape[2]
    scales = {}
    if is_quantized(dtype):
      scales = {
        name: tuple(jnp.zeros(layer_shape[:3], SCALE_DTYPE) for _ in range(num_layers))
        for name in ("k_scale", "v_scale")
      }
    return cls(
      k=tuple(jnp.zeros(layer_shape, dtype) for _ in range(num_layers)),
      v=tuple(jnp.zeros(layer_shape, dtype) for _ in range(num_layers)),
      **scales,
      row_tokens=row_tokens,
      real_head_dim=real_head_dim,
      rotated=rotated,
    )

  @classmethod
  def from_stacked(cls, k, v, k_scale=None, v_scale=None) -> PagedKVCache:
    """A cache from 5-D ``k, v [num_layers, num_kv_heads, num_blocks, block_size, head_dim]``
    (JAX or NumPy), one buffer per layer (copies the layers apart). 8-bit ``k, v`` need
    ``k_scale, v_scale f32[num_layers, num_kv_heads, num_blocks, block_size]`` (both, or
    for 16- and 32-bit pools neither: ValueError otherwise)."""
    k, v = jnp.asarray(k), jnp.asarray(v)
    if k.ndim != 5 or v.shape != k.shape or v.dtype != k.dtype:
      raise ValueError(
        "k and v must both be [num_layers, num_kv_heads, num_blocks, block_size, head_dim] of "
        f"one dtype, got k {_shape_str(k)} and v {_shape_str(v)}"
      )
    check_kv_dtype(k.dtype, "PagedKVCache.from_stacked: k's dtype")
    given = (k_scale is not None, v_scale is not None)
    if given != (is_quantized(k.dtype),) * 2:
      need = "need both" if is_quantized(k.dtype) else "take neither of"
      raise ValueError(
        f"PagedKVCache.from_stacked: {jnp.dtype(k.dtype).name} k and v {need} k_scale and "
        "v_scale f32[num_layers, num_kv_heads, num_blocks, block_size] (kernels.quantize "
        f"gives the 8-bit rows and their scales); got k_scale "
        f"{'given' if given[0] else 'None'}, v_scale {'given' if given[1] else 'None'}"
      )
    cache = cls(k=tuple(k[i] for i in range(k.shape[0])), v=tuple(v[i] for i in range(v.shape[0])))
    if k_scale is not None:
      cache = cache.replace(
        k_scale=tuple(jnp.asarray(k_scale)[i] for i in range(cache.num_layers)),
        v_scale=tuple(jnp.asarray(v_scale)[i] for i in range(cache.num_layers)),
      )
      _check_cache(cache)
    return cache

  def stacked(self) -> tuple[jax.Array, jax.Array]:
    """``(k, v)`` as 5-D arrays ``[num_layers, num_kv_heads, num_blocks, block_size,
    head_dim]`` (a lane-dense cache's rows unpacked, a lane-padded cache's real lanes
    only, its padding sliced off): a copy of the whole pool, for checks and inspection
    (never in a step)."""
    shape = (self.num_layers, *self.logical_shape)

    def logical(pools):  # lane-padded: the real lanes; lane-dense: all 128 (a no-op slice)
      return jnp.stack(pools)[..., : self.head_dim * self.row_tokens].reshape(shape)

    return logical(self.k), logical(self.v)

  @property
  def logical_shape(self) -> tuple[int, int, int, int]:
    """``(num_kv_heads, num_blocks, block_size, head_dim)`` of one layer, in tokens."""
    return self.num_kv_heads, self.num_blocks, self.block_size, self.head_dim

  @property
  def lane_dense(self) -> bool:
    """Whether the pools hold ``row_tokens`` > 1 tokens a 128-lane row (``create``)."""
    return self.row_tokens > 1

  @property
  def lane_padded(self) -> bool:
    """Whether the pools' rows are ``real_head_dim`` lanes of K/V and zeros up to a
    multiple of 128 (``create``)."""
    return self.real_head_dim is not None

  @property
  def num_layers(self) -> int:
    return len(self.k)

  @property
  def num_kv_heads(self) -> int:
    return self.k[0].shape[0]

  @property
  def num_blocks(self) -> int:
    return self.k[0].shape[1]

  @property
  def block_size(self) -> int:
    return self.k[0].shape[2] * self.row_tokens

  @property
  def head_dim(self) -> int:
    """The model's head_dim (a lane-padded cache's real one, not its rows' width)."""
    if self.real_head_dim is not None:
      return self.real_head_dim
    return self.k[0].shape[3] // self.row_tokens

  @property
  def dtype(self):
    return self.k[0].dtype

  @property
  def quantized(self) -> bool:
    """Whether K/V are 8-bit (with ``k_scale``/``v_scale`` pools)."""
    return is_quantized(self.dtype)

  def kernel_kwargs(self, layer: int) -> dict:
    """What ``kernels.paged_attention`` (and ``cascade_attention``) need besides the pools
    to read one layer: its scales (8-bit, :meth:`scales`) and ``lane_dense=True`` for a
    lane-dense cache, ``lane_padded=True`` for a lane-padded one:
    ``kernels.paged_attention(q, *cache.layer(i), ..., **cache.kernel_kwargs(i))``."""
    out = self.scales(layer)
    if self.lane_dense:
      out["lane_dense"] = True
    if self.lane_padded:
      out["lane_padded"] = True
    return out

  def scales(self, layer: int) -> dict:
    """``{"k_scales": ..., "v_scales": ...}`` of one layer for ``kernels.paged_attention``
    (an empty dict for a float cache); :meth:`kernel_kwargs` adds the layout flag of a
    lane-dense or lane-padded cache."""
    _check_layer(layer, self.num_layers)
    if not self.quantized:
      return {}
    _check_not_donated((self.k_scale[layer], self.v_scale[layer]))
    return {"k_scales": self.k_scale[layer], "v_scales": self.v_scale[layer]}

  def layer(self, layer: int) -> tuple[jax.Array, jax.Array]:
    """``(k_blocks, v_blocks)`` of one layer, each ``[num_kv_heads, num_blocks, block_size,
    head_dim]`` (lane-dense: ``[..., block_size / row_tokens, 128]``; lane-padded:
    ``[..., block_size, padded_width(head_dim)]``): the arguments
    ``kernels.paged_attention`` takes (the layer's own buffers, not a copy)."""
    _check_layer(layer, self.num_layers)
    _check_not_donated((self.k[layer], self.v[layer]))
    return self.k[layer], self.v[layer]

  def replace_layer(self, layer: int, k_blocks, v_blocks, k_scale=None, v_scale=None):
    """The cache with ``layer``'s pools (and, 8-bit, scale pools) replaced; the other
    layers' buffers are shared."""
    _check_layer(layer, self.num_layers)
    k, v = list(self.k), list(self.v)
    k[layer], v[layer] = k_blocks, v_blocks
    ks, vs = list(self.k_scale), list(self.v_scale)
    if k_scale is not None:
      ks[layer], vs[layer] = k_scale, v_scale
    return self.replace(k=tuple(k), v=tuple(v), k_scale=tuple(ks), v_scale=tuple(vs))


def _check_dims(dims: dict[str, int]) -> tuple[int, ...]:
  for name, value in dims.items():
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  return tuple(int(x) for x in dims.values())


def _shape_str(x) -> str:
  return f"{tuple(x.shape)} {jnp.dtype(x.dtype).name}"


def _check_not_donated(arrays) -> None:
  """ValueError where a pool (a concrete array; tracers are not buffers) was donated."""
  if any(
    isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_deleted()
    for x in arrays
  ):
    # What JAX would say later is "Array has been deleted", from deep inside the call.
    raise ValueError(
      "this cache's pools were donated to an earlier write, copy_blocks or swap_in and "
      "are deleted: use the cache that call returned"
    )


def _check_cache(cache) -> None:
  if not isinstance(cache, PagedKVCache):
    raise ValueError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
  k, v = cache.k, cache.v
  if not isinstance(k, tuple) or not isinstance(v, tuple) or not k or len(k) != len(v):
    raise ValueError(
      "cache.k and cache.v must be tuples of one array per layer (build a cache from 5-D "
      f"arrays with PagedKVCache.from_stacked), got {type(k).__name__} and {type(v).__name__}"
    )
  # Each pool is donated on its own (write donates its layer's two): one array in two
  # places would be deleted under the other. Tracers (inside jit) are not buffers.
  arrays = [
    x
    for x in k + v + tuple(cache.k_scale) + tuple(cache.v_scale)
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
  ]
  _check_not_donated(arrays)
  concrete = [id(x) for x in arrays]
  if len(set(concrete)) < len(concrete):
    raise ValueError(
      "cache.k and cache.v must hold a distinct array per layer (one array appears twice; "
      "build the cache with PagedKVCache.create or from_stacked)"
    )
  first = k[0]
  for name, pools in (("k", k), ("v", v)):
    for i, x in enumerate(pools):
      if getattr(x, "ndim", None) != 4 or x.shape != first.shape or x.dtype != first.dtype:
        raise ValueError(
          f"cache.{name}[{i}] must be [num_kv_heads, num_blocks, block_size, head_dim] like "
          f"cache.k[0] {_shape_str(first)}, got "
          f"{_shape_str(x) if hasattr(x, 'shape') else type(x).__name__}"
        )
  if cache.row_tokens != 1:
    _layout.check_lane_dense(
      first.shape[3] // max(cache.row_tokens, 1),
      first.shape[3],
      first.dtype,
      f"cache.row_tokens {cache.row_tokens!r} does not fit pools {_shape_str(first)} (build "
      "a lane-dense cache with PagedKVCache.create(..., lane_dense=True))",
    )
  if cache.real_head_dim is not None:
    real = cache.real_head_dim
    what = (
      f"cache.real_head_dim {real!r} does not fit pools {_shape_str(first)} (build a "
      "lane-padded cache with PagedKVCache.create(..., lane_padded=True))"
    )
    if isinstance(real, bool) or not isinstance(real, int | np.integer) or real < 1:
      raise ValueError(f"{what}: it must be a positive int")
    if cache.row_tokens != 1:
      raise ValueError(f"{what}: lane-dense (row_tokens {cache.row_tokens}) and lane-padded")
    _layout.check_lane_padded(int(real), first.shape[3], what)
  scale_shape = tuple(first.shape[:3])
  for name in ("k_scale", "v_scale"):
    pools = getattr(cache, name)
    if not is_quantized(first.dtype):
      if pools:
        raise ValueError(
          f"cache.{name} must be () for a {jnp.dtype(first.dtype).name} cache (scales are "
          "for 8-bit K/V only)"
        )
      continue
    if not isinstance(pools, tuple) or len(pools) != len(k):
      raise ValueError(
        f"an 8-bit cache needs cache.{name}: a tuple of one float32 {scale_shape} array per "
        f"layer ({len(k)}), got {type(pools).__name__} of {len(pools)}"
      )
    for i, x in enumerate(pools):
      if getattr(x, "shape", None) != scale_shape or x.dtype != SCALE_DTYPE:
        raise ValueError(
          f"cache.{name}[{i}] must be float32 {scale_shape} ([num_kv_heads, num_blocks, "
          f"block_size] of cache.k[0]), got "
          f"{_shape_str(x) if hasattr(x, 'shape') else type(x).__name__}"
        )


def _check_layer(layer, num_layers: int) -> None:
  """A layer is a Python int in range: each layer is its own buffer, chosen at trace time."""
  if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
    raise ValueError(
      f"layer must be a Python int (each layer's pool is its own buffer), got {layer!r}"
    )
  if not 0 <= layer < num_layers:
    raise ValueError(f"layer {layer} out of range for a cache of {num_layers} layers")


# ---------------------------------------------------------------------------------------------
# Writing new tokens.


def write(cache: PagedKVCache, layer, k_new, v_new, slot_mapping) -> PagedKVCache:
  """Writes the new tokens' K/V of one layer into their slots; returns the new cache.

  Args:
    cache: the cache; donated (use the returned one).
    layer: layer index, a Python int (range-checked).
    k_new, v_new: ``[num_tokens, num_kv_heads, head_dim]``, any float dtype (cast to the
      cache dtype; an 8-bit cache quantizes each row and writes its scale to the same slot).
    slot_mapping: ``i32[num_tokens]``, ``block_id * block_size + offset``;
      ``kernels.INVALID_SLOT`` (-1) marks padding rows, which write nothing. A NumPy
      slot_mapping is checked (in range, no slot twice); a device one is trusted.

  ``kernels.write_kv`` on that layer's own buffers: one scatter, in place when donated.
  """
  _check_cache(cache)
  _check_layer(layer, cache.num_layers)
  want = (cache.num_kv_heads, cache.head_dim)
  check_arrays(k_new=k_new, v_new=v_new, slot_mapping=slot_mapping)
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
  layer = int(layer)
  if cache.quantized:
    scales = (cache.k_scale[layer], cache.v_scale[layer])
    k, v, ks, vs = _write_layer_quantized(
      *cache.layer(layer), *scales, k_new, v_new, slot_mapping, cache.lane_padded
    )
    return cache.replace_layer(layer, k, v, ks, vs)
  k, v = _write_layer(
    *cache.layer(layer), k_new, v_new, slot_mapping, cache.lane_dense, cache.lane_padded
  )
  return cache.replace_layer(layer, k, v)


@functools.partial(jax.jit, donate_argnums=(0, 1), static_argnums=(5, 6))
def _write_layer(k_blocks, v_blocks, k_new, v_new, slot_mapping, lane_dense, lane_padded):
  return write_kv(
    k_blocks,
    v_blocks,
    k_new,
    v_new,
    slot_mapping,
    lane_dense=lane_dense,
    lane_padded=lane_padded,
  )


@functools.partial(jax.jit, donate_argnums=(0, 1, 2, 3), static_argnums=7)
def _write_layer_quantized(
  k_blocks, v_blocks, k_scale, v_scale, k_new, v_new, slot_mapping, lane_padded
):
  return write_kv_quantized(
    k_blocks, v_blocks, k_scale, v_scale, k_new, v_new, slot_mapping, lane_padded=lane_padded
  )


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

  def copy(pool):  # one layer: [num_kv_heads, num_blocks, block_size, ...]
    return pool.at[:, dst].set(pool[:, src], mode="drop")

  # An 8-bit block's scales are block dst of the scale pools: copied with it.
  return cache.replace(
    k=tuple(map(copy, cache.k)),
    v=tuple(map(copy, cache.v)),
    k_scale=tuple(map(copy, cache.k_scale)),
    v_scale=tuple(map(copy, cache.v_scale)),
  )


# ---------------------------------------------------------------------------------------------
# Host pool and swapping.


class HostKVPool:
  """Host (CPU) memory for swapped-out blocks: plain NumPy arrays, mutated in place.

  Read as ``k, v: [num_layers, num_kv_heads, num_host_blocks, block_size, head_dim]``; for
  an 8-bit pool also ``k_scale, v_scale: f32[num_layers, num_kv_heads, num_host_blocks,
  block_size]`` (None otherwise). Which host block holds what is the allocator's
  business; this class only holds the bytes.

  Stored block-major: ``kv: [num_host_blocks, 2, num_layers, num_kv_heads, block_size,
  head_dim]`` (K then V) and, 8-bit only, ``scales: f32[num_host_blocks, 2, num_layers,
  num_kv_heads, block_size]``, so that each host block is one contiguous slab and a swap
  writes or reads it with one copy (``np.moveaxis`` of a layer-major pool would be one
  small strided copy per layer x head x block). ``k``, ``v`` and the scales are
  ``np.moveaxis`` views of that storage (no copy): writes through them reach the pool.

  The constructor takes the arrays in the read layout. Arrays that are already such views
  of one block-major storage (``HostKVPool(p.k, p.v, p.k_scale, p.v_scale)``) are shared;
  any others are copied into new storage, so the pool does not alias them.
  """

  def __init__(self, k: np.ndarray, v: np.ndarray, k_scale=None, v_scale=None):
    if not isinstance(k, np.ndarray) or not isinstance(v, np.ndarray):
      raise ValueError(
        f"HostKVPool needs NumPy arrays, got {type(k).__name__} and {type(v).__name__}"
      )
    if k.ndim != 5 or v.shape != k.shape or v.dtype != k.dtype:
      raise ValueError(
        "host k and v must both be [num_layers, num_kv_heads, num_host_blocks, block_size, "
        f"head_dim] of one dtype, got k {_shape_str(k)} and v {_shape_str(v)}"
      )
    check_kv_dtype(k.dtype, "HostKVPool: k's dtype")
    quantized = is_quantized(k.dtype)
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
      if not quantized and s is not None:
        raise ValueError(f"host {name} given with {k.dtype.name} k (scales are for 8-bit)")
      if quantized and (
        not isinstance(s, np.ndarray) or s.shape != k.shape[:4] or s.dtype != SCALE_DTYPE
      ):
        raise ValueError(
          f"an 8-bit host pool needs {name}: a float32 NumPy array {k.shape[:4]}, got "
          f"{_shape_str(s) if hasattr(s, 'shape') else type(s).__name__}"
        )
    self._kv = _block_major(k, v)
    self._scales = _block_major(k_scale, v_scale) if quantized else None

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
    dtype = check_kv_dtype(dtype, "dtype")
    # Block-major storage, handed over as the read layout's views (shared, not copied).
    kv = np.zeros((shape[2], 2, *shape[:2], *shape[3:]), dtype)
    arrays = [np.moveaxis(kv[:, 0], 0, 2), np.moveaxis(kv[:, 1], 0, 2)]
    if is_quantized(dtype):
      scales = np.zeros((shape[2], 2, *shape[:2], shape[3]), SCALE_DTYPE)
      arrays += [np.moveaxis(scales[:, 0], 0, 2), np.moveaxis(scales[:, 1], 0, 2)]
    return cls(*arrays)

  @classmethod
  def like(cls, cache: PagedKVCache, num_host_blocks: int) -> HostKVPool:
    """A host pool whose blocks fit ``cache``'s blocks (same layers, heads, sizes, dtype;
    ``head_dim`` the cache's: a lane-padded cache's blocks without their zero lanes, which
    a swap drops on the way out and puts back on the way in)."""
    _check_cache(cache)
    return cls.create(
      cache.num_layers,
      cache.num_kv_heads,
      num_host_blocks,
      cache.block_size,
      _host_row_width(cache),
      cache.dtype,
    )

  @property
  def k(self) -> np.ndarray:
    """``[num_layers, num_kv_heads, num_host_blocks, block_size, head_dim]``, a view."""
    return np.moveaxis(self._kv[:, 0], 0, 2)

  @property
  def v(self) -> np.ndarray:
    """As ``k``, for V."""
    return np.moveaxis(self._kv[:, 1], 0, 2)

  @property
  def k_scale(self) -> np.ndarray | None:
    """``f32[num_layers, num_kv_heads, num_host_blocks, block_size]`` view (8-bit), else None."""
    return None if self._scales is None else np.moveaxis(self._scales[:, 0], 0, 2)

  @property
  def v_scale(self) -> np.ndarray | None:
    """As ``k_scale``, for V."""
    return None if self._scales is None else np.moveaxis(self._scales[:, 1], 0, 2)

  @property
  def num_host_blocks(self) -> int:
    return self._kv.shape[0]

  def __repr__(self) -> str:
    return f"HostKVPool(k={_shape_str(self.k)}, v={_shape_str(self.v)})"


def _host_row_width(cache: PagedKVCache) -> int:
  """The last axis of the host blocks that hold ``cache``'s blocks: its head_dim (a
  lane-dense cache's rows are reshaped to token rows; a lane-padded cache's lose their
  zero lanes, so that neither the host pool nor the link carries the padding)."""
  return cache.head_dim


def _block_major(k: np.ndarray, v: np.ndarray) -> np.ndarray:
  """``[num_host_blocks, 2, ...]`` storage holding host pools ``k`` and ``v`` (read layout,
  host blocks on axis 2): their own storage when they are views of one such array, else a
  block-major copy."""
  owner = k.base
  if (
    owner is not None
    and owner is v.base
    and owner.flags.c_contiguous
    and owner.dtype == k.dtype
    and owner.shape == (k.shape[2], 2, *k.shape[:2], *k.shape[3:])
  ):
    ks, vs = np.moveaxis(k, 2, 0), np.moveaxis(v, 2, 0)
    ok, ov = owner[:, 0], owner[:, 1]
    if (ks.ctypes.data, ks.strides, vs.ctypes.data, vs.strides) == (
      ok.ctypes.data,
      ok.strides,
      ov.ctypes.data,
      ov.strides,
    ):
      return owner
  out = np.empty((k.shape[2], 2, *k.shape[:2], *k.shape[3:]), k.dtype)
  out[:, 0] = np.moveaxis(k, 2, 0)
  out[:, 1] = np.moveaxis(v, 2, 0)
  return out


SWAP_STAGING = ("auto", "pinned", "direct")


def swap_out(
  cache: PagedKVCache, host_pool: HostKVPool, device_ids, host_ids, *, staging: str = "auto"
) -> None:
  """Copies device blocks ``device_ids[i]`` into host blocks ``host_ids[i]`` (all layers).

  The blocks are gathered on the device into the host pool's block-major order, so they
  cross to the host as one contiguous array (plus one of their scales for an 8-bit cache)
  and each lands in its host block with one contiguous copy. ``cache`` is not changed (nor
  donated): freeing the device blocks is the allocator's job. ``host_pool`` is written in
  place. Ids are checked on the host first; after an error nothing has been read or
  written.

  ``staging`` is how the gathered blocks cross: ``"pinned"`` through JAX's pinned host
  memory (one DMA at the link's rate, then a host copy into the pool), ``"direct"`` by
  ``jax.device_get`` into pageable memory (on a GPU the driver stages pageable copies
  itself, at a small fraction of the link's rate: docs/engine.md "Limits"), ``"auto"``
  (the default) pinned where the cache is on one accelerator whose device offers pinned
  host memory, else direct (on the CPU both are the same RAM and staging only adds a
  copy). ``"pinned"`` where it is not available raises ``ValueError``.
  """
  device_ids, host_ids = _check_swap(cache, host_pool, device_ids, host_ids, "host_ids")
  pinned = _staging_sharding(cache, staging)
  if device_ids.size == 0:
    return
  gathered = _gather_blocks(cache, device_ids)
  if pinned is not None:
    gathered = jax.device_put(gathered, pinned)  # one DMA into page-locked host memory
  blocks, scales = jax.device_get(gathered)  # one transfer (or host copy) each
  # [n, 2, L, H, bs, D]: one copy per block (a lane-dense cache's rows, the same bytes,
  # reshaped to the host pool's token rows)
  host_pool._kv[host_ids] = blocks.reshape((len(host_ids), *host_pool._kv.shape[1:]))
  if scales is not None:  # 8-bit: the blocks' scales travel with them
    host_pool._scales[host_ids] = scales


def swap_in(
  cache: PagedKVCache, host_pool: HostKVPool, host_ids, device_ids, *, staging: str = "auto"
) -> PagedKVCache:
  """Copies host blocks ``host_ids[i]`` into device blocks ``device_ids[i]``; returns the new
  cache.

  The host blocks are read with one contiguous copy each into one array (plus one of their
  scales for an 8-bit cache), which crosses to the device once and is put back in the
  pools' layout there; ``cache`` is donated (use the returned one). ``staging`` as for
  :func:`swap_out` (pinned: the array is copied into pinned host memory, then crosses in
  one DMA). Ids are checked on the host first; after an error the cache is untouched and
  still valid.
  """
  device_ids, host_ids = _check_swap(cache, host_pool, device_ids, host_ids, "device_ids")
  pinned = _staging_sharding(cache, staging)
  if device_ids.size == 0:
    return cache
  blocks = host_pool._kv[host_ids]  # [n, 2, L, H, bs, D]
  if cache.lane_dense:  # as the device pools hold them: the same bytes in rows of 128
    blocks = blocks.reshape(blocks.shape[:4] + cache.k[0].shape[2:])
  scales = host_pool._scales[host_ids] if cache.quantized else None
  if pinned is not None:
    staged = jax.device_put((blocks, scales), pinned)  # host copies into pinned memory
    blocks, scales = jax.device_put(staged, cache.k[0].sharding)  # one DMA each
  return _scatter_blocks(cache, blocks, scales, device_ids)  # the arrays cross once


def _staging_sharding(cache: PagedKVCache, staging: str):
  """The pinned-host sharding a swap stages through, or None for a direct copy."""
  if staging not in SWAP_STAGING:
    raise ValueError(f"staging must be one of {SWAP_STAGING}, got {staging!r}")
  if staging == "direct":
    return None
  devices = cache.k[0].sharding.device_set
  device = next(iter(devices))
  kinds = {m.kind for m in device.addressable_memories()} if len(devices) == 1 else set()
  if "pinned_host" not in kinds:
    if staging == "pinned":
      raise ValueError(
        "staging='pinned' needs a cache on one device that has pinned host memory; "
        f"this cache is on {sorted(str(d) for d in devices)[:4]} with memory kinds "
        f"{sorted(kinds)}; use staging='direct'"
      )
    return None
  if staging == "auto" and device.platform == "cpu":
    return None
  return jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")


@jax.jit
def _gather_blocks(cache, ids):
  """The blocks at ``ids`` in the host pool's block-major order: ``[n, 2, L, H, bs, D]``
  (K, V) and, 8-bit only, their scales ``[n, 2, L, H, bs]`` (else None). The transpose
  runs here, on the device, so that the host gets contiguous blocks."""

  def gather(pools):  # each layer's [H, n, bs, (D)] as [n, H, ...], stacked: [n, L, H, ...]
    return jnp.stack([jnp.swapaxes(pool[:, ids], 0, 1) for pool in pools], axis=1)

  def gather_rows(pools):  # K/V rows: a lane-padded cache's without the zero lanes
    out = gather(pools)
    return out if cache.real_head_dim is None else out[..., : cache.real_head_dim]

  blocks = jnp.stack([gather_rows(cache.k), gather_rows(cache.v)], axis=1)  # [n, 2, L, H, bs, D]
  if not cache.k_scale:
    return blocks, None
  return blocks, jnp.stack([gather(cache.k_scale), gather(cache.v_scale)], axis=1)


@functools.partial(jax.jit, donate_argnums=0)
def _scatter_blocks(cache, blocks, scales, ids):
  """Writes block-major ``blocks`` (and ``scales``), as ``_gather_blocks`` returns them,
  into the pools at ``ids``."""

  def scatter(pools, new):  # new: [n, L, H, bs, (D)]
    new = jnp.moveaxis(new, 0, 2)  # [L, H, n, bs, (D)]
    if new.ndim == 5 and new.shape[-1] != pools[0].shape[-1]:  # lane-padded: zero lanes back
      new = jnp.pad(new, [(0, 0)] * 4 + [(0, pools[0].shape[-1] - new.shape[-1])])
    return tuple(pool.at[:, ids].set(new[i]) for i, pool in enumerate(pools))

  if scales is None:
    return cache.replace(k=scatter(cache.k, blocks[:, 0]), v=scatter(cache.v, blocks[:, 1]))
  return cache.replace(
    k=scatter(cache.k, blocks[:, 0]),
    v=scatter(cache.v, blocks[:, 1]),
    k_scale=scatter(cache.k_scale, scales[:, 0]),
    v_scale=scatter(cache.v_scale, scales[:, 1]),
  )


def _check_swap(cache, host_pool, device_ids, host_ids, dst_name):
  _check_cache(cache)
  if not isinstance(host_pool, HostKVPool):
    raise ValueError(f"host_pool must be a HostKVPool, got {type(host_pool).__name__}")
  dev = (cache.num_layers, cache.num_kv_heads, cache.block_size, _host_row_width(cache))
  host = host_pool.k.shape
  if dev != host[:2] + host[3:] or jnp.dtype(cache.dtype) != host_pool.k.dtype:
    raise ValueError(
      f"host_pool blocks {_shape_str(host_pool.k)} do not fit the cache's {cache.num_layers} "
      f"layers of {_shape_str(cache.k[0])} (layers, kv heads, block_size, head_dim and dtype "
      "must match; a lane-padded cache's host blocks have its real head_dim: HostKVPool.like)"
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
