"""Tensor parallelism over KV heads: K/V block pools sharded on a ``model`` mesh axis.

Only JAX's own SPMD machinery is used: a :class:`jax.sharding.Mesh`, ``NamedSharding``
placements, and ``jax.shard_map`` around the per-device kernels of :mod:`kernels`. The
allocator, block tables, lengths, slot mappings and ``cu_q_lens`` are unchanged and
replicated: a block id names the same block on every device, each device holding that
block's slab for its own KV heads. docs/scaling.md says what shards where and how to run
on several hosts.

Head layout (:class:`HeadLayout`). With ``S`` devices on the axis and ``Hkv`` KV heads
the pools hold ``E = S * ceil(Hkv / S)`` *pool heads*, ``ceil(Hkv / S)`` per device, so
every device holds whole heads and the same number of them:

* ``Hkv`` a multiple of ``S``: ``E == Hkv``, the plain split (no copy, nothing changes);
* ``Hkv < S`` or not a multiple: pool head ``x`` holds KV head ``x * Hkv // E``; each
  KV head gets one or more copies, on consecutive devices. This is replication, as
  vLLM does when the tensor-parallel size exceeds the KV heads: a device never holds
  part of a head, and per device memory is ``ceil(Hkv / S)`` heads, the least possible
  with whole heads. (Sharding only a divisor of ``S`` would need a second mesh axis
  and leaves the same per-device memory.)

The query heads of a KV head are split over its copies, ``q_per_pool_head`` each (padded
with a duplicate query when they do not split evenly; the duplicate's output is dropped).
When every KV head's query group splits evenly over its copies (``Hq % S == 0`` and
``Hkv`` a multiple or divisor of ``S``) the query layout is the identity: ``q`` is simply
sharded over its head axis, which is what column-parallel q/k/v projections produce, and
no data moves between devices before or after attention. Otherwise ``q`` is gathered
into pool-head order and the output gathered back (a small all-to-all over heads).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import kernels
from kernels import _api as kernels_api
from kernels._validate import validate_options
from paxcache import cache as cache_ops
from paxcache.cache import PagedKVCache

MODEL_AXIS = "model"
DATA_AXIS = "data"  # independent replicas (paxcache.engine.Router): nothing is sharded on it

__all__ = [
  "DATA_AXIS",
  "MODEL_AXIS",
  "HeadLayout",
  "KVSharding",
  "LocalHostKVPool",
  "head_layout",
  "init_sharded_cache",
  "kv_sharding",
  "make_data_mesh",
  "make_mesh",
  "replica_meshes",
  "shard_cache",
  "shard_model",
  "sharded_cache_write",
  "sharded_paged_attention",
  "sharded_write_kv",
  "unshard_cache",
]


# ---------------------------------------------------------------------------------------------
# Mesh and head layout.


def make_mesh(num_devices: int | None = None, axis: str = MODEL_AXIS, *, devices=None) -> Mesh:
  """A 1-D mesh ``(axis,)`` over the first ``num_devices`` devices (default: all).

  With ``jax.distributed`` initialised, ``jax.devices()`` lists every host's devices, so
  the default mesh spans all hosts.
  """
  devs = list(jax.devices() if devices is None else devices)
  n = len(devs) if num_devices is None else num_devices
  if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= len(devs):
    raise ValueError(f"num_devices must be an int in [1, {len(devs)}], got {num_devices!r}")
  return Mesh(np.array(devs[: int(n)]), (axis,))


def make_data_mesh(
  num_replicas: int,
  model_size: int = 1,
  *,
  data_axis: str = DATA_AXIS,
  model_axis: str = MODEL_AXIS,
  devices=None,
) -> Mesh:
  """A 2-D mesh ``(data_axis, model_axis)`` of ``num_replicas x model_size`` devices.

  Row ``r`` (``mesh.devices[r]``) is replica ``r``'s tensor-parallel group. The devices
  (default: all) are taken ordered by ``(process_index, id)``, so that with
  ``jax.distributed`` a replica lies within one process whenever ``model_size`` divides
  each process's device count: the router (``paxcache.engine.Router``) needs every replica
  inside one process.
  """
  devs = sorted(
    jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id)
  )
  for name, v in (("num_replicas", num_replicas), ("model_size", model_size)):
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  n = int(num_replicas) * int(model_size)
  if n > len(devs):
    raise ValueError(
      f"{num_replicas} replicas x {model_size} devices = {n} devices, but only {len(devs)} exist"
    )
  if data_axis == model_axis:
    raise ValueError(f"data_axis and model_axis are both {data_axis!r}")
  return Mesh(
    np.array(devs[:n]).reshape(int(num_replicas), int(model_size)), (data_axis, model_axis)
  )


def replica_meshes(mesh: Mesh, data_axis: str = DATA_AXIS) -> list[Mesh]:
  """The sub-meshes of ``mesh`` along ``data_axis``: replica ``r`` gets the devices at index
  ``r`` of that axis, with the mesh's other axes (in order). A mesh whose only axis is
  ``data_axis`` gives each replica a 1-device mesh with axis ``MODEL_AXIS``."""
  _axis_size(mesh, data_axis)
  i = mesh.axis_names.index(data_axis)
  rest = tuple(a for a in mesh.axis_names if a != data_axis)
  out = []
  for r in range(mesh.devices.shape[i]):
    devs = np.take(mesh.devices, [r], axis=i)  # keeps the axis: an object array of devices
    out.append(Mesh(devs.squeeze(axis=i), rest) if rest else Mesh(devs, (MODEL_AXIS,)))
  return out


def _axis_size(mesh: Mesh, axis: str) -> int:
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if axis not in mesh.axis_names:
    raise ValueError(f"mesh has axes {mesh.axis_names}, not {axis!r}")
  return mesh.shape[axis]


@dataclasses.dataclass(frozen=True)
class HeadLayout:
  """Where KV and query heads sit when sharded over ``num_shards`` devices (hashable).

  Attributes:
    num_shards: devices on the ``model`` axis.
    num_q_heads, num_kv_heads: the model's head counts.
  """

  num_shards: int
  num_q_heads: int
  num_kv_heads: int

  def __post_init__(self):
    for name in ("num_shards", "num_q_heads", "num_kv_heads"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    if self.num_q_heads % self.num_kv_heads:
      raise ValueError(
        f"num_q_heads {self.num_q_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
      )

  @property
  def kv_per_shard(self) -> int:
    """Pool heads on each device: ``ceil(num_kv_heads / num_shards)``."""
    return -(-self.num_kv_heads // self.num_shards)

  @property
  def pool_heads(self) -> int:
    """``E``: heads in the sharded pools (``num_kv_heads`` when it divides evenly)."""
    return self.num_shards * self.kv_per_shard

  @property
  def group(self) -> int:
    return self.num_q_heads // self.num_kv_heads

  @functools.cached_property
  def kv_heads(self) -> tuple[int, ...]:
    """For each pool head, the model KV head it holds (``[pool_heads]``, non-decreasing)."""
    e, h = self.pool_heads, self.num_kv_heads
    return tuple(x * h // e for x in range(e))

  @functools.cached_property
  def _copies(self) -> tuple[tuple[int, int], ...]:
    """Per KV head: (first pool head, number of copies)."""
    counts = np.bincount(self.kv_heads, minlength=self.num_kv_heads)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return tuple((int(s), int(c)) for s, c in zip(starts, counts, strict=True))

  @property
  def q_per_pool_head(self) -> int:
    """Query slots per pool head: the largest ``ceil(group / copies)`` over KV heads."""
    return max(-(-self.group // c) for _, c in self._copies)

  @functools.cached_property
  def q_heads(self) -> tuple[int, ...]:
    """For each query slot (``[pool_heads * q_per_pool_head]``) the model query head it
    computes; a padding slot repeats its group's first query head (output dropped)."""
    gq, g = self.q_per_pool_head, self.group
    out = []
    for x, h in enumerate(self.kv_heads):
      copy = x - self._copies[h][0]
      for j in range(gq):
        k = copy * gq + j
        out.append(h * g + (k if k < g else 0))
    return tuple(out)

  @functools.cached_property
  def q_source(self) -> tuple[int, ...]:
    """For each model query head (``[num_q_heads]``) the query slot whose output it takes."""
    gq, g = self.q_per_pool_head, self.group
    out = []
    for i in range(self.num_q_heads):
      h, k = divmod(i, g)
      out.append((self._copies[h][0] + k // gq) * gq + k % gq)
    return tuple(out)

  @property
  def kv_identity(self) -> bool:
    """The pools are the model's heads, split evenly (no copies)."""
    return self.pool_heads == self.num_kv_heads

  @property
  def q_identity(self) -> bool:
    """Query slots are the model's query heads in order: ``q`` is sharded as is."""
    return self.q_heads == tuple(range(self.num_q_heads))

  @property
  def kv_first_copy(self) -> tuple[int, ...]:
    """For each model KV head the pool head of its first copy (``[num_kv_heads]``)."""
    return tuple(s for s, _ in self._copies)


def head_layout(num_shards: int, num_kv_heads: int, num_q_heads: int | None = None) -> HeadLayout:
  """The :class:`HeadLayout` for ``num_shards`` devices (``num_q_heads`` defaults to MHA)."""
  return HeadLayout(
    int(num_shards), int(num_q_heads if num_q_heads else num_kv_heads), int(num_kv_heads)
  )


@dataclasses.dataclass(frozen=True)
class KVSharding:
  """Shardings of the paged-attention arrays on one mesh.

  Attributes:
    mesh, axis: the mesh and its tensor-parallel axis.
    layout: the head layout (which KV head each pool head holds, query slots).
    pool: each layer's pool, ``PagedKVCache.k[layer] [pool_heads, num_blocks, block_size,
      head_dim]``, heads (axis 0) over ``axis``.
    heads: ``q`` / attention output ``[tokens, query slots, head_dim]`` and new K/V
      ``[tokens, pool_heads, head_dim]``, heads (axis 1) over ``axis``; with an identity
      query layout this is also the sharding of the model's own ``q [tokens, num_q_heads,
      head_dim]``.
    replicated: block tables, lengths, slot mappings, ``cu_q_lens``.
  """

  mesh: Mesh
  axis: str
  layout: HeadLayout
  pool: NamedSharding
  heads: NamedSharding
  replicated: NamedSharding


def kv_sharding(
  mesh: Mesh, num_kv_heads: int, num_q_heads: int | None = None, *, axis: str = MODEL_AXIS
) -> KVSharding:
  """Shardings for the pools, queries and metadata (see :class:`KVSharding`)."""
  layout = head_layout(_axis_size(mesh, axis), num_kv_heads, num_q_heads)
  return KVSharding(
    mesh=mesh,
    axis=axis,
    layout=layout,
    pool=NamedSharding(mesh, P(axis)),
    heads=NamedSharding(mesh, P(None, axis)),
    replicated=NamedSharding(mesh, P()),
  )


# ---------------------------------------------------------------------------------------------
# Placing the cache.


def shard_cache(cache: PagedKVCache, mesh: Mesh, *, axis: str = MODEL_AXIS) -> PagedKVCache:
  """Places an unsharded cache on ``mesh``, KV heads over ``axis``.

  Args:
    cache: per layer ``[num_kv_heads, num_blocks, block_size, head_dim]`` with the model's
      KV heads.

  Returns:
    A cache of ``layout.pool_heads`` heads (copies where ``num_kv_heads`` does not split
    evenly), sharded with ``kv_sharding(...).pool``: each device holds ``kv_per_shard``
    whole heads of every block.
  """
  cache_ops._check_cache(cache)
  if cache.lane_dense or cache.lane_padded:
    raise ValueError(
      "shard_cache takes a cache in the plain layout; lane-dense caches (rows of 128, "
      "PagedKVCache.create(..., lane_dense=True)) and lane-padded ones (rows of head_dim "
      "rounded up to 128, PagedKVCache.create(..., lane_padded=True)) are not sharded yet"
    )
  spec = kv_sharding(mesh, cache.num_kv_heads, axis=axis)
  if spec.layout.kv_identity:
    return jax.device_put(cache, spec.pool)
  idx = np.asarray(spec.layout.kv_heads, np.int32)
  expand = jax.jit(lambda c: jax.tree.map(lambda a: a[idx], c), out_shardings=spec.pool)
  return expand(cache)


def init_sharded_cache(
  mesh: Mesh,
  num_layers: int,
  num_kv_heads: int,
  num_blocks: int,
  block_size: int,
  head_dim: int,
  dtype=jnp.float32,
  *,
  axis: str = MODEL_AXIS,
  rotated: bool = False,
) -> PagedKVCache:
  """A zero-filled cache laid out as :func:`shard_cache` lays one out, allocated in place:
  each device allocates only its own ``kv_per_shard`` heads (nothing is built on one device
  first, so a pool sized for several devices never has to fit on one). ``rotated``:
  ``PagedKVCache.create``'s."""
  spec = kv_sharding(mesh, num_kv_heads, axis=axis)
  create = functools.partial(
    PagedKVCache.create,
    num_layers,
    spec.layout.pool_heads,
    num_blocks,
    block_size,
    head_dim,
    dtype,
    rotated=rotated,
  )
  return jax.jit(create, out_shardings=spec.pool)()


def unshard_cache(cache: PagedKVCache, num_kv_heads: int, num_shards: int) -> PagedKVCache:
  """The model-head view of a sharded cache: the first copy of each KV head,
  per layer ``[num_kv_heads, ...]`` (for checks and for moving to another mesh)."""
  cache_ops._check_cache(cache)
  layout = head_layout(num_shards, num_kv_heads)
  if cache.num_kv_heads != layout.pool_heads:
    raise ValueError(
      f"cache has {cache.num_kv_heads} heads, but {num_kv_heads} KV heads on {num_shards} "
      f"shards make {layout.pool_heads} pool heads"
    )
  idx = np.asarray(layout.kv_first_copy, np.int32)
  # Scale pools (8-bit caches) lead with the same pool heads: the same rows of them.
  return jax.tree.map(lambda a: a[idx], cache)


def _pool_layout(mesh, axis, pool_heads: int, num_kv_heads: int, num_q_heads=None) -> HeadLayout:
  layout = head_layout(_axis_size(mesh, axis), num_kv_heads, num_q_heads)
  if layout.pool_heads != pool_heads:
    raise ValueError(
      f"the pools have {pool_heads} heads, but {num_kv_heads} KV heads on "
      f"{layout.num_shards} shards make {layout.pool_heads} pool heads (place the cache with "
      "shard_cache)"
    )
  return layout


def _expand_kv(x, layout: HeadLayout):
  """``[tokens, num_kv_heads, head_dim] -> [tokens, pool_heads, head_dim]``."""
  if layout.kv_identity:
    return x
  return x[:, np.asarray(layout.kv_heads, np.int32)]


# ---------------------------------------------------------------------------------------------
# Writing new K/V.


@functools.partial(jax.jit, static_argnames=("mesh", "axis"), donate_argnums=(1, 2))
def sharded_write_kv(mesh, k_blocks, v_blocks, k_new, v_new, slot_mapping, *, axis=MODEL_AXIS):
  """``kernels.write_kv`` on pools sharded over heads, each device writing its own heads.

  Args:
    mesh: the mesh.
    k_blocks, v_blocks: ``[pool_heads, num_blocks, block_size, head_dim]``, heads over
      ``axis``; donated.
    k_new, v_new: ``[num_tokens, num_kv_heads, head_dim]`` in the model's KV heads (copied
      to every pool head that holds them), or ``[num_tokens, pool_heads, head_dim]``, one
      per pool head already (as ``PagedAttention`` under a mesh computes them: the pool
      heads split evenly, so they are taken as they are).
    slot_mapping: ``i32[num_tokens]``, replicated; ``-1`` writes nothing.

  Returns:
    The updated ``(k_blocks, v_blocks)``, sharded as given.
  """
  layout = _pool_layout(mesh, axis, k_blocks.shape[0], k_new.shape[1])
  k_new, v_new = _expand_kv(k_new, layout), _expand_kv(v_new, layout)
  heads = P(None, axis)
  return jax.shard_map(
    kernels.write_kv,
    mesh=mesh,
    in_specs=(P(axis), P(axis), heads, heads, P()),
    out_specs=(P(axis), P(axis)),
  )(k_blocks, v_blocks, k_new, v_new, slot_mapping)


@functools.partial(jax.jit, static_argnames=("mesh", "axis"), donate_argnums=(1, 2, 3, 4))
def sharded_write_kv_quantized(
  mesh, k_blocks, v_blocks, k_scales, v_scales, k_new, v_new, slot_mapping, *, axis=MODEL_AXIS
):
  """``kernels.write_kv_quantized`` on 8-bit pools and their scale pools sharded over heads:
  each device quantizes and writes its own heads (a row's scale depends on that row
  alone, so no device needs another's). Arguments as :func:`sharded_write_kv`, plus the
  scale pools ``f32[pool_heads, num_blocks, block_size]`` (heads over ``axis``; donated).

  Returns:
    The updated ``(k_blocks, v_blocks, k_scales, v_scales)``, sharded as given.
  """
  layout = _pool_layout(mesh, axis, k_blocks.shape[0], k_new.shape[1])
  k_new, v_new = _expand_kv(k_new, layout), _expand_kv(v_new, layout)
  heads = P(None, axis)
  pools = (P(axis),) * 4
  return jax.shard_map(
    kernels.write_kv_quantized,
    mesh=mesh,
    in_specs=(*pools, heads, heads, P()),
    out_specs=pools,
  )(k_blocks, v_blocks, k_scales, v_scales, k_new, v_new, slot_mapping)


def sharded_cache_write(
  mesh, cache: PagedKVCache, layer: int, k_new, v_new, slot_mapping, *, axis=MODEL_AXIS
) -> PagedKVCache:
  """``paxcache.cache.write`` on a cache placed by :func:`shard_cache`.

  ``k_new, v_new: [num_tokens, num_kv_heads, head_dim]`` in the model's KV heads, or one per
  pool head (:func:`sharded_write_kv`); ``layer``
  a Python int; ``slot_mapping`` replicated. Each device scatters into its own heads of
  that layer's pool (:func:`sharded_write_kv`). Call it inside ``jit`` with the cache
  donated, as the model does.
  """
  cache_ops._check_cache(cache)
  if cache.quantized:
    scales = (cache.k_scale[layer], cache.v_scale[layer])
    out = sharded_write_kv_quantized(
      mesh, *cache.layer(layer), *scales, k_new, v_new, jnp.asarray(slot_mapping), axis=axis
    )
    return cache.replace_layer(layer, *out)
  k_blocks, v_blocks = sharded_write_kv(
    mesh, *cache.layer(layer), k_new, v_new, jnp.asarray(slot_mapping), axis=axis
  )
  return cache.replace_layer(layer, k_blocks, v_blocks)


# ---------------------------------------------------------------------------------------------
# Attention.


def sharded_paged_attention(
  mesh: Mesh,
  q: jax.Array,
  k_blocks: jax.Array,
  v_blocks: jax.Array,
  block_table: jax.Array,
  lengths: jax.Array,
  cu_q_lens: jax.Array | None = None,
  *,
  num_kv_heads: int | None = None,
  axis: str = MODEL_AXIS,
  k_scales: jax.Array | None = None,
  v_scales: jax.Array | None = None,
  **kwargs,
) -> jax.Array:
  """``kernels.paged_attention`` with heads over ``axis``: each device runs the kernel on
  its own KV heads and their query heads; no communication inside.

  Args:
    mesh: the mesh.
    q: ``[batch or num_tokens, num_q_heads, head_dim]`` in the model's query heads.
    k_blocks, v_blocks: ``[pool_heads, num_blocks, block_size, head_dim]`` sharded over
      ``axis`` (one layer of a cache placed by :func:`shard_cache`).
    block_table, lengths, cu_q_lens: as for ``kernels.paged_attention``, replicated.
    num_kv_heads: the model's KV heads; needed only when the pools hold copies and the
      query layout is not the identity (default: ``pool_heads``, i.e. treat every pool
      head as a KV head, which is exact whenever the query layout is the identity).
    axis: the mesh axis.
    k_scales, v_scales: 8-bit pools only: ``f32[pool_heads, num_blocks, block_size]``,
      heads over ``axis`` like the pools.
    **kwargs: passed to ``kernels.paged_attention`` (``scale``, ``sliding_window``,
      ``logit_soft_cap``, ``backend``, ``block_sizes``, ``interpret``). ``scale`` defaults
      to ``head_dim ** -0.5`` on every device, as unsharded.

  Returns:
    ``[batch or num_tokens, num_q_heads, head_dim]`` in ``q.dtype``; sharded over heads
    when the query layout is the identity.
  """
  q, layout = _sharded_checked(
    mesh, q, k_blocks, v_blocks, block_table, lengths, cu_q_lens, num_kv_heads, axis,
    k_scales, v_scales, kwargs,
  )  # fmt: skip
  heads = P(None, axis)
  args = [q, k_blocks, v_blocks, block_table, lengths]
  specs = [heads, P(axis), P(axis), P(), P()]
  quantized = k_scales is not None
  if quantized:
    args += [k_scales, v_scales]
    specs += [P(axis), P(axis)]
  if cu_q_lens is not None:
    args.append(cu_q_lens)
    specs.append(P())

  def body(q, k, v, table, lens, *rest):
    scales = {}
    if quantized:
      ks, vs, *rest = rest
      scales = dict(k_scales=ks, v_scales=vs)
    cu = rest[0] if rest else None
    return kernels.paged_attention(q, k, v, table, lens, cu, **kwargs, **scales)

  # check_vma=False: the Pallas kernels carry no varying-manual-axes rules; the output
  # spec claims no replication, so the check would prove nothing here.
  out = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=heads, check_vma=False)(
    *args
  )
  if not layout.q_identity:
    out = out[:, np.asarray(layout.q_source, np.int32)]
  return out


def _sharded_checked(
  mesh, q, k_blocks, v_blocks, block_table, lengths, cu_q_lens, num_kv_heads, axis, k_scales,
  v_scales, kwargs,
):  # fmt: skip
  """:func:`sharded_paged_attention`'s checks before any device runs; returns q in the
  pools' head order and the head layout."""
  if q.ndim != 3 or k_blocks.ndim != 4:
    raise ValueError(
      f"q must be [tokens, num_q_heads, head_dim] and k_blocks [pool_heads, num_blocks, "
      f"block_size, head_dim], got q {tuple(q.shape)} and k_blocks {tuple(k_blocks.shape)}"
    )
  if kwargs.get("lane_padded") or kwargs.get("lane_dense"):
    raise ValueError(
      "sharded_paged_attention takes plain pools; lane-dense and lane-padded pools "
      "(kernels._layout) are not sharded yet"
    )
  pool_heads = k_blocks.shape[0]
  if num_kv_heads is None:
    num_kv_heads = pool_heads
  layout = _pool_layout(mesh, axis, pool_heads, num_kv_heads, q.shape[1])
  if not layout.q_identity:
    q = q[:, np.asarray(layout.q_heads, np.int32)]
  # On the pool-head view: the same checks every device's kernel call would make.
  kernels.validate_inputs(
    q, k_blocks, v_blocks, block_table, lengths, cu_q_lens, k_scales, v_scales
  )
  validate_options(kwargs.get("scale"), kwargs.get("sliding_window"), kwargs.get("logit_soft_cap"))
  return q, layout


def check_sharded_paged_attention(
  mesh: Mesh, q, k_blocks, v_blocks, block_table, lengths, cu_q_lens=None, **options
) -> None:
  """Raises what :func:`sharded_paged_attention` with these arguments would raise before
  any device computes, and computes nothing (as ``kernels.check_paged_attention``): for
  the layer, whose sharded write donates the pools."""
  num_kv_heads = options.pop("num_kv_heads", None)
  axis = options.pop("axis", MODEL_AXIS)
  k_scales, v_scales = options.pop("k_scales", None), options.pop("v_scales", None)
  q, _ = _sharded_checked(
    mesh, q, k_blocks, v_blocks, block_table, lengths, cu_q_lens, num_kv_heads, axis,
    k_scales, v_scales, options,
  )  # fmt: skip
  # Each device's kernel call: its backend's static rules (head and block sizes, the group
  # of query heads per KV head, the same on every device). The pools are plain (checked
  # above), so nothing here copies them.
  chosen = kernels.resolve_backend(
    options.get("backend", "auto"), interpret=options.get("interpret", False)
  )
  kernels_api.backend_static_checks(
    chosen, q, k_blocks, v_blocks, block_table, lengths, cu_q_lens,
    block_sizes=options.get("block_sizes"), k_scales=k_scales, v_scales=v_scales,
    pads_head_dim=True,
  )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Model and engine: placing parameters (the layers and the engine take the mesh themselves).


def _put(variable, sharding) -> None:
  variable.set_value(jax.device_put(variable.get_value(), sharding))


def shard_model(model, mesh: Mesh, *, axis: str = MODEL_AXIS):
  """Shards a :class:`paxcache.nn.Decoder` in place for tensor parallelism; returns it.

  Sets every layer's :class:`paxcache.nn.PagedAttention` to run on ``mesh`` (K/V write and
  attention per device under ``shard_map``) and places the parameters Megatron-style
  where the head layout allows it: the one q/k/v weight split by output columns (whole
  heads per device, reordered first so that each device's columns hold its q, k and v
  heads, a KV head copied over devices in each of their blocks:
  ``PagedAttention.set_shards``), the MLP's one gate/up weight by columns too
  (``SwiGLU.set_shards``), o/down projections by input rows (GSPMD adds the all-reduce
  after them). The q/k/v and o weights are replicated when the query layout is not the
  identity (each device then computes every head's q, k and v); everything else
  (embedding, norms) is replicated.
  ``model.init_cache`` then returns a sharded pool. ``Engine`` does this itself when
  ``EngineConfig.mesh`` is set.
  """
  n = _axis_size(mesh, axis)
  rep = NamedSharding(mesh, P())
  cols, rows = NamedSharding(mesh, P(None, axis)), NamedSharding(mesh, P(axis, None))
  for layer in model.layers:
    layer.attn.set_mesh(mesh, axis)
    layer.mlp.mesh = mesh  # split weights: the MLP's products are XLA's (paxcache.nn.project)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable):
      _put(node, rep)
  for layer in model.layers:
    a = layer.attn
    layout = head_layout(n, a.num_kv_heads, a.num_q_heads)
    if layout.q_identity:
      # Columns in n blocks of [q | k | v] heads: each device's slice computes its own
      # query heads and the k and v of its own pool heads.
      a.set_shards(n)
      _put(a.qkv, cols)
      _put(a.o_proj.kernel, rows)
    mlp = layer.mlp
    if mlp.mlp_dim % n == 0:
      # Columns in n blocks of [gate | up]: each device's slice holds its gate columns
      # beside its up columns (paxcache.nn.SwiGLU).
      mlp.set_shards(n)
      _put(mlp.gate_up, cols)
      _put(mlp.down.kernel, rows)
  return model


# ---------------------------------------------------------------------------------------------
# Swapping on several hosts: each process moves the shards on its own devices.


class LocalHostKVPool(cache_ops.HostKVPool):
  """The host (swap) pool of one process for a cache sharded over heads: this process's
  pool heads of every host block.

  A process can read and write only the shards on its own devices, so under multi-controller
  JAX (``jax.distributed``) each process keeps the heads its devices hold, ``heads`` (pool
  head ids, ascending), and :meth:`swap_out` / :meth:`swap_in` move just those. Host block
  ids are global, as the allocator hands them out: block ``b`` of every process's pool holds
  that process's heads of the same swapped block. In one process ``heads`` is every pool
  head and the pool is ``HostKVPool.like(cache, num_host_blocks)``.

  ``k, v: [num_layers, len(heads), num_host_blocks, block_size, head_dim]`` (and the scale
  pools of an 8-bit cache), NumPy, as :class:`paxcache.cache.HostKVPool`: views of
  block-major storage. The gather puts the blocks in that order on the devices, and a
  shard holding all of this process's heads lands with one contiguous copy per block
  (a shard of some of them: one copy per block x layer x K/V).
  """

  def __init__(self, cache: PagedKVCache, num_host_blocks: int):
    cache_ops._check_cache(cache)
    pool = cache.k[0]
    sharding = pool.sharding
    if not isinstance(sharding, NamedSharding):
      raise ValueError(
        f"LocalHostKVPool needs a cache placed on a mesh (NamedSharding), got {sharding!r}"
      )
    num_heads = pool.shape[0]
    heads = set()
    for index in sharding.addressable_devices_indices_map(pool.shape).values():
      heads.update(range(*index[0].indices(num_heads)))
    self.heads = tuple(sorted(heads))
    self._position = {h: i for i, h in enumerate(self.heads)}
    self._mesh = sharding.mesh
    spec = tuple(sharding.spec) + (None,) * (pool.ndim - len(sharding.spec))
    if any(s is not None for s in spec[1:]):
      raise ValueError(f"the pools must be sharded over heads (axis 0) only, got {sharding.spec}")
    # Blocks moved between pool and host, block-major as the host pool stores them:
    # [n, 2 (K, V), num_layers, heads, block_size, ...], heads sharded as in the pools.
    self._moved = NamedSharding(self._mesh, P(None, None, None, spec[0]))
    host = cache_ops.HostKVPool.create(
      cache.num_layers,
      len(self.heads),
      num_host_blocks,
      cache.block_size,
      cache.head_dim,
      cache.dtype,
    )
    super().__init__(host.k, host.v, host.k_scale, host.v_scale)
    self._num_heads = num_heads

  def __repr__(self) -> str:
    return f"LocalHostKVPool(heads={self.heads}, k={cache_ops._shape_str(self.k)})"

  def _storage(self) -> list[np.ndarray]:
    return [self._kv] + ([self._scales] if self._scales is not None else [])

  def _ids(self, cache: PagedKVCache, device_ids, host_ids, dst_name: str):
    cache_ops._check_cache(cache)
    if cache.k[0].shape[0] != self._num_heads or cache.num_layers != self.k.shape[0]:
      raise ValueError(
        f"cache of {cache.num_layers} layers x {cache.k[0].shape[0]} heads does not fit this "
        f"pool ({self.k.shape[0]} layers x {self._num_heads} heads)"
      )
    device_ids = np.asarray(cache_ops._as_ids(np.asarray(device_ids), "device_ids"))
    host_ids = np.asarray(cache_ops._as_ids(np.asarray(host_ids), "host_ids"))
    if device_ids.shape != host_ids.shape:
      raise ValueError(
        f"device_ids {device_ids.shape} and host_ids {host_ids.shape} must have one shape"
      )
    cache_ops._check_range(device_ids, "device_ids", cache.num_blocks, allow_invalid=False)
    cache_ops._check_range(host_ids, "host_ids", self.num_host_blocks, allow_invalid=False)
    cache_ops._check_unique(device_ids if dst_name == "device_ids" else host_ids, dst_name)
    return device_ids.astype(np.int32), host_ids.astype(np.int64)

  def swap_out(self, cache: PagedKVCache, device_ids, host_ids) -> None:
    """Copies this process's heads of device blocks ``device_ids[i]`` into host blocks
    ``host_ids[i]``. Every process calls it with the same ids (it runs one jitted gather
    over the mesh); each then reads only its own devices' shards."""
    device_ids, host_ids = self._ids(cache, device_ids, host_ids, "host_ids")
    if device_ids.size == 0:
      return
    moved = _gather_local(self._moved)(cache, device_ids)  # [n, 2, L, heads, bs, ...]
    for storage, arr in zip(self._storage(), moved, strict=True):
      shards = arr.addressable_shards
      datas = jax.device_get([s.data for s in shards])
      for s, data in zip(shards, datas, strict=True):
        heads = range(*s.index[3].indices(self._num_heads))
        first = self._position[heads[0]]  # a shard's heads are consecutive local heads
        if first == 0 and len(heads) == len(self.heads):
          storage[host_ids] = data  # one contiguous copy per block
        else:
          storage[host_ids, :, :, first : first + len(heads)] = data

  def swap_in(self, cache: PagedKVCache, host_ids, device_ids) -> PagedKVCache:
    """Copies this process's heads of host blocks ``host_ids[i]`` into device blocks
    ``device_ids[i]``; returns the new cache (``cache`` is donated). Every process calls it
    with the same ids; each supplies its own heads."""
    device_ids, host_ids = self._ids(cache, device_ids, host_ids, "device_ids")
    if device_ids.size == 0:
      return cache
    arrays = []
    for storage in self._storage():
      picked = storage[host_ids]  # [n, 2, L, local heads, ...]: one copy per block
      shape = picked.shape[:3] + (self._num_heads,) + picked.shape[4:]

      def local(index, picked=picked):
        rows = [self._position[h] for h in range(*index[3].indices(self._num_heads))]
        return picked[:, :, :, rows][tuple(index[:3]) + (slice(None),) + tuple(index[4:])]

      arrays.append(jax.make_array_from_callback(shape, self._moved, local))
    return _scatter_local(self._moved)(cache, tuple(arrays), device_ids)


@functools.lru_cache(maxsize=16)
def _gather_local(moved: NamedSharding):
  def gather(cache, ids):
    def layers(pools):  # [n, L, heads, bs, (D)]: transposed here, not on the host
      return jnp.stack([jnp.swapaxes(p[:, ids], 0, 1) for p in pools], axis=1)

    def block_major(k, v):  # [n, 2, L, heads, bs, (D)]
      return jnp.stack([layers(k), layers(v)], axis=1)

    if not cache.k_scale:
      return (block_major(cache.k, cache.v),)
    return block_major(cache.k, cache.v), block_major(cache.k_scale, cache.v_scale)

  return jax.jit(gather, out_shardings=moved)


@functools.lru_cache(maxsize=16)
def _scatter_local(moved: NamedSharding):
  pool = NamedSharding(moved.mesh, P(moved.spec[3]))

  def scatter(cache, blocks, ids):
    def put(pools, new):  # new: [n, L, heads, bs, (D)]
      new = jnp.moveaxis(new, 0, 2)
      return tuple(p.at[:, ids].set(new[i]) for i, p in enumerate(pools))

    kv = blocks[0]
    if not cache.k_scale:
      return cache.replace(k=put(cache.k, kv[:, 0]), v=put(cache.v, kv[:, 1]))
    sc = blocks[1]
    return cache.replace(
      k=put(cache.k, kv[:, 0]),
      v=put(cache.v, kv[:, 1]),
      k_scale=put(cache.k_scale, sc[:, 0]),
      v_scale=put(cache.v_scale, sc[:, 1]),
    )

  return jax.jit(scatter, donate_argnums=0, out_shardings=pool)
