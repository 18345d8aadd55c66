"""A Flax NNX attention layer over a paged KV cache.

Flax's own attention (``nnx.MultiHeadAttention``) keeps a dense ``[batch, max_len,
heads, dim]`` decode cache with one shared index, so a paged cache cannot plug in
through ``attention_fn``. :class:`PagedAttention` takes the K/V block pools and the
block table explicitly, writes the new tokens' K/V with
:func:`kernels.write_kv`, runs :func:`kernels.paged_attention` and returns the
output together with the updated pools. Nothing is stored on the module but
parameters and static settings (sizes, backend, mesh), so the same module runs under
``jit`` with the pools donated.

The cache is either one layer's ``(k_blocks, v_blocks)`` or a whole
:class:`paxcache.cache.PagedKVCache` with a layer index (what the decoder uses).

With ``mesh`` set, the same module runs tensor-parallel over KV heads: the K/V write and
the kernel run per device under ``shard_map`` (:mod:`paxcache.sharding`), on a cache
placed by ``paxcache.sharding.init_sharded_cache`` / ``shard_cache``. With ``mesh=None``
(the default) the single-device code path runs, unchanged.

The same module also runs without paging (:meth:`PagedAttention.dense`): causal
attention over the whole sequence, or over a plain contiguous cache; the decoder's
no-cache path uses it as the parity oracle for the paged path.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kernels
import kernels.gpu  # kernels.gpu.quant_fused_write (PagedAttention._fuses_8bit_write)
from kernels._validate import validate_options
from paxcache import cache as cache_ops
from paxcache import sharding
from paxcache.cache import PagedKVCache
from paxcache.nn._layers import apply_rope, check_gemm, project, split_column_blocks

_MASK_VALUE = -1e30  # finite, so a fully masked row stays finite


def dense_causal_attention(q, k, v, q_positions, *, scale, k_length=None, exact=True):
  """Plain (unpaged) attention: each query sees keys at positions ``<= its own``.

  Args:
    q: ``[batch, q_len, num_q_heads, head_dim]``.
    k, v: ``[batch, kv_len, num_kv_heads, head_dim]``; key ``j`` sits at position ``j``.
    q_positions: ``i32[batch, q_len]``.
    scale: softmax scale.
    k_length: optional ``i32[batch]``; keys at positions ``>= k_length`` are ignored.
    exact: float32 operands at HIGHEST precision (the parity oracle); False multiplies in
      the K/V dtype with float32 accumulation, as a serving kernel does
      (``Decoder.forward_cached(..., exact=False)``: the no-paging peer of the benchmarks).

  Returns:
    ``[batch, q_len, num_q_heads, head_dim]`` in ``q.dtype``; float32 accumulation.
  """
  b, s, num_q_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_q_heads // num_kv_heads
  if exact:
    cdtype, prec = jnp.float32, jax.lax.Precision.HIGHEST
  else:
    cdtype, prec = k.dtype, None
  qf = q.astype(cdtype).reshape(b, s, num_kv_heads, group, head_dim)
  einsum = functools.partial(jnp.einsum, precision=prec, preferred_element_type=jnp.float32)
  logits = einsum("bskgd,btkd->bkgst", qf, k.astype(cdtype)) * scale
  key_pos = jnp.arange(kv_len, dtype=jnp.int32)
  mask = key_pos[None, None, :] <= q_positions[:, :, None]  # [b, s, t]
  if k_length is not None:
    mask &= key_pos[None, None, :] < k_length[:, None, None]
  mask = mask[:, None, None]
  logits = jnp.where(mask, logits, _MASK_VALUE)
  p = jnp.where(mask, jnp.exp(logits - logits.max(-1, keepdims=True)), 0.0)
  denom = p.sum(-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = einsum("bkgst,btkd->bskgd", p.astype(cdtype), v.astype(cdtype))
  return out.reshape(b, s, num_q_heads, head_dim).astype(q.dtype)


def check_fused_write_8bit(value):
  """``value`` if it is None or a bool (``PagedAttention``'s ``fused_write_8bit``), else
  ValueError (a string such as "false" would be truthy)."""
  if value is not None and not isinstance(value, bool):
    raise ValueError(f"fused_write_8bit must be None, True or False, got {value!r}")
  return value


def _plain_float_pools(cache) -> bool:
  """Whether ``cache`` (a ``PagedKVCache`` or one layer's ``(k_blocks, v_blocks)``) holds
  16- or 32-bit K/V in the plain layout: what ``kernels.write_and_decode_packed`` takes."""
  if isinstance(cache, PagedKVCache):
    return not (cache.quantized or cache.lane_dense or cache.lane_padded)
  k_blocks = cache[0]
  return k_blocks.ndim == 4 and not kernels.is_quantized(k_blocks.dtype)


def _plain_quantized_cache(cache) -> bool:
  """Whether ``cache`` is an 8-bit ``PagedKVCache`` in the plain layout: what
  ``kernels.write_and_decode_packed`` takes with its scale pools (pools passed as a pair
  have no scales, and take the write and the attention apart)."""
  return (
    isinstance(cache, PagedKVCache)
    and cache.quantized
    and not (cache.lane_dense or cache.lane_padded)
  )


def _query_dtype(q_dtype, kv_dtype):
  """q goes to the kernel in the cache's dtype (as before), but never in an 8-bit one:
  with an 8-bit cache it keeps the activation dtype."""
  return q_dtype if kernels.is_quantized(kv_dtype) else kv_dtype


class PagedAttention(nnx.Module):
  """Multi-head attention (MHA / GQA / MQA) with RoPE over a paged KV cache.

  Query head ``h`` reads KV head ``h // (num_q_heads // num_kv_heads)``, the
  grouping ``kernels.paged_attention`` uses.

  The q, k and v kernels are one parameter, ``qkv`` ``[d_model, (num_q_heads + 2 *
  num_kv_heads) * head_dim]``, read by one matrix product, for the reason
  :class:`paxcache.nn.SwiGLU` keeps gate and up as one (docs/benchmarks.md, "One weight
  for q, k and v"). Column order: ``shards`` blocks of ``[q | k | v]`` columns, whole heads
  of each (a KV head copied over devices in each of their blocks); with ``shards == 1`` (as
  built, loaded and saved) ``[:, :Hq * D]`` is q's kernel, then k's, then v's, heads in
  order. ``paxcache.sharding.shard_model`` sets ``shards`` to the mesh size where the query
  layout is the identity (:meth:`set_shards`); :meth:`canonical_qkv` gives the
  ``shards == 1`` order back.

  Args:
    d_model: input and output width.
    num_q_heads, num_kv_heads, head_dim: head layout; ``num_q_heads`` must be a
      multiple of ``num_kv_heads``.
    rope_theta: RoPE base; None disables RoPE.
    backend: ``kernels.paged_attention`` backend (``"auto"`` picks the Pallas kernel on
      GPU/TPU and the reference on CPU; there is no silent fallback).
    interpret: run a Pallas backend in interpret mode (tests on CPU).
    gemm: how the q/k/v and output projections multiply (``paxcache.nn.GEMMS``: "auto"
      takes the Pallas split-K product on a GPU for few rows, ``paxcache.nn.project``).
    sliding_window, logit_soft_cap: passed to the kernel.
    dtype: activation dtype of the projections.
    param_dtype: dtype of the projection weights.
    mesh: a ``jax.sharding.Mesh`` with a ``mesh_axis`` axis: write and attend per device,
      KV heads over that axis (``paxcache.sharding.shard_model`` sets it on a built model
      and places the parameters). None: one device.
    mesh_axis: the tensor-parallel axis of ``mesh``.
    kv_rotation: over an int8 cache (ignored for others), write ``k R`` and ``v R`` and
      attend with ``q R``, then multiply the output by ``R`` again, ``R`` the normalised
      Walsh-Hadamard matrix of ``kernels.hadamard_rotate`` (orthonormal and its own
      inverse: the same attention up to the int8 rounding, which it makes smaller;
      docs/engine.md, "8-bit K/V"). The cache must say so (``PagedKVCache.rotated``,
      which ``Decoder.init_cache`` sets); a cache whose flag differs raises ValueError.
      False: rows as they are. float8_e4m3fn rows are never rotated (its steps are
      relative to each value).
    rngs: parameter initialisation.

    fused_write_8bit: over an 8-bit cache, whether a decode step writes the new rows inside
      the decode kernel (quantizing them there) rather than with the cache write before it:
      None (default) does on the GPU backend on the cards of
      ``kernels.gpu.quant_fused_write`` (the H100, where it was measured faster; on the
      H200 it is not measured yet, docs/benchmarks.md "Run41" and "Run42"); True or False
      decide on every backend. The same result either way. Also an attribute, which may be
      set on a built layer or on the class (every layer left at None).

  Attribute ``fused_write`` (True): decode steps over plain-layout pools on one device (16-
  or 32-bit pools, or an 8-bit ``PagedKVCache`` with its scales where
  ``fused_write_8bit`` allows) write and attend with one ``kernels.write_and_decode_packed``
  (on the GPU backend the decode kernel writes the step's K/V itself, quantizing 8-bit
  rows); False keeps the write then ``paged_attention`` (the same result; tests inspect
  the step around the kernels with it,
  since Pallas's interpret mode copies a pool its kernel writes in place, which the
  compiled GPU kernel does not).
  """

  fused_write = True
  # The class default (None: the card's choice); the constructor's argument, where not
  # None, sets it on the instance.
  fused_write_8bit = None

  def _fuses_8bit_write(self) -> bool:
    """Whether a decode step over an 8-bit cache writes inside the decode kernel:
    ``fused_write_8bit`` if set, else on the GPU backend where
    ``kernels.gpu.quant_fused_write`` says the card gains from it (the H100; elsewhere the
    separate write was measured faster or not measured)."""
    forced = check_fused_write_8bit(self.fused_write_8bit)  # also when set after building
    if forced is not None:
      return forced
    if kernels.resolve_backend(self.backend, interpret=self.interpret) != "gpu":
      return False
    return kernels.gpu.quant_fused_write()

  def __init__(
    self,
    d_model: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    rope_theta: float | None = 10_000.0,
    backend: str = "auto",
    interpret: bool = False,
    gemm: str = "auto",
    sliding_window: int | None = None,
    logit_soft_cap: float | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh=None,
    mesh_axis: str = "model",
    kv_rotation: bool = True,
    fused_write_8bit: bool | None = None,
    rngs: nnx.Rngs,
  ):
    for name, value in (
      ("d_model", d_model),
      ("num_q_heads", num_q_heads),
      ("num_kv_heads", num_kv_heads),
      ("head_dim", head_dim),
    ):
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"PagedAttention {name} must be an int >= 1, got {value!r}")
    if num_q_heads % num_kv_heads:
      raise ValueError(
        f"num_q_heads {num_q_heads} must be a multiple of num_kv_heads {num_kv_heads}"
      )
    if rope_theta is not None and head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {head_dim} (or rope_theta=None)")
    # Checked here, not first at a call (where a prefill would have written its K/V).
    validate_options(None, sliding_window, logit_soft_cap)
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
      try:
        floating = jnp.issubdtype(jnp.dtype(value), jnp.floating)
      except TypeError:
        floating = False
      if not floating:
        raise ValueError(f"PagedAttention {name} must be a floating dtype, got {value!r}")
    if backend not in kernels.BACKENDS:
      raise ValueError(f"backend must be one of {kernels.BACKENDS}, got {backend!r}")
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # nnx.Linear's initialiser (LeCun normal: fan-in d_model), for q, k and v alike.
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    self.qkv = nnx.Param(
      nnx.initializers.lecun_normal()(rngs.params(), (d_model, width), param_dtype)
    )
    self.o_proj = nnx.Linear(num_q_heads * head_dim, d_model, **kw)
    self.dtype = dtype
    self.shards = 1
    self.d_model = d_model
    self.num_q_heads = num_q_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.rope_theta = rope_theta
    self.backend = backend
    self.interpret = interpret
    self.gemm = check_gemm(gemm)
    self.sliding_window = sliding_window
    self.logit_soft_cap = logit_soft_cap
    if not isinstance(kv_rotation, bool):
      raise ValueError(f"kv_rotation must be a bool, got {kv_rotation!r}")
    self.kv_rotation = kv_rotation
    if check_fused_write_8bit(fused_write_8bit) is not None:
      self.fused_write_8bit = fused_write_8bit
    self.set_mesh(mesh, mesh_axis)

  def set_mesh(self, mesh, mesh_axis: str = "model") -> None:
    """Sets (or with None clears) the mesh; checks it has ``mesh_axis``. Placing the
    parameters and the cache is the caller's (``paxcache.sharding.shard_model``)."""
    if mesh is not None:
      sharding.head_layout(sharding._axis_size(mesh, mesh_axis), self.num_kv_heads)
    self.mesh = mesh
    self.mesh_axis = mesh_axis

  def _kv_heads_in_blocks(self, shards: int) -> tuple[int, ...]:
    """The KV heads whose k and v columns ``qkv`` holds with ``shards`` blocks, in order:
    each block's pool heads (``paxcache.sharding.HeadLayout.kv_heads``; a KV head
    copied over devices has its columns in each of their blocks)."""
    if shards == 1:
      return tuple(range(self.num_kv_heads))
    return sharding.head_layout(shards, self.num_kv_heads, self.num_q_heads).kv_heads

  def _qkv_columns(self, shards: int) -> np.ndarray:
    """For each column of ``qkv`` with ``shards`` blocks, its column in the one-block
    ``[q | k | v]`` order."""
    d, hq, hkv = self.head_dim, self.num_q_heads, self.num_kv_heads
    kv = np.asarray(self._kv_heads_in_blocks(shards)).reshape(shards, -1)
    q = np.arange(hq).reshape(shards, -1)
    heads = np.concatenate([q, hq + kv, hq + hkv + kv], axis=1)  # [shards, heads per block]
    return (heads[..., None] * d + np.arange(d)).reshape(-1)

  def canonical_qkv(self) -> jax.Array:
    """``qkv`` in the ``shards == 1`` column order: ``[q | k | v]``."""
    if self.shards == 1:
      return self.qkv[...]
    # Each one-block column's first place (np.unique's indices are of first occurrences;
    # every column occurs, so the unique values are 0, 1, ...).
    _, first = np.unique(self._qkv_columns(self.shards), return_index=True)
    return self.qkv[...][:, first]

  def set_shards(self, shards: int) -> None:
    """Reorders ``qkv``'s columns into ``shards`` blocks of ``[q | k | v]``, whole heads of
    each: block ``s`` holds query heads ``[s Hq/S, (s+1) Hq/S)`` and the k and v of the
    pool heads device ``s`` holds (a KV head copied over devices, as
    ``paxcache.sharding.HeadLayout`` copies it, is in each of their blocks). A copy of the
    weight, once. The query layout must be the identity (``HeadLayout.q_identity``;
    ValueError otherwise)."""
    shards = int(shards)
    if shards < 1:
      raise ValueError(f"PagedAttention.set_shards: shards must be >= 1, got {shards}")
    if shards > 1 and not (
      sharding.head_layout(shards, self.num_kv_heads, self.num_q_heads).q_identity
    ):
      raise ValueError(
        f"PagedAttention.set_shards: {self.num_q_heads} query / {self.num_kv_heads} KV heads "
        f"do not split into {shards} blocks of whole heads (the query layout on {shards} "
        "devices is not the identity: paxcache.sharding.HeadLayout)"
      )
    if shards != self.shards:
      self.qkv.set_value(self.canonical_qkv()[:, self._qkv_columns(shards)])
      self.shards = shards

  def _qkv(self, x, positions, *, pool_heads: bool = False):
    """x: [..., d_model] -> q [..., Hq, D], k/v [..., Hkv, D], RoPE applied to q and k.

    ``pool_heads``: k and v in the blocks' heads (``_kv_heads_in_blocks``), each device's
    own pool heads under ``shard_model``, as the sharded cache write takes them; else (and
    always with one block) the model's KV heads."""
    lead = x.shape[:-1]
    # As nnx.Linear: input and kernel promoted to the computation dtype (in project).
    whole = self.mesh is not None and self.shards == 1
    h = self._project(x, self.qkv[...])
    if whole:
      # The weight is replicated (the query layout is not the identity, shard_model):
      # every device computes q, k and v whole, RoPE included, and the attention takes its
      # own heads from them. Left to itself, GSPMD splits these products' columns evenly,
      # which does not cut at whole heads, and then moves heads between devices.
      h = self._replicated(h)
    kv = self._kv_heads_in_blocks(self.shards)
    d = self.head_dim
    q, k, v = split_column_blocks(h, (self.num_q_heads * d, len(kv) * d, len(kv) * d), self.shards)
    q = q.reshape(*lead, self.num_q_heads, d)
    k = k.reshape(*lead, len(kv), d)
    v = v.reshape(*lead, len(kv), d)
    if len(kv) != self.num_kv_heads and not pool_heads:  # copies: the first of each
      layout = sharding.head_layout(self.shards, self.num_kv_heads, self.num_q_heads)
      first = np.asarray(layout.kv_first_copy)
      k, v = k[..., first, :], v[..., first, :]
    if self.rope_theta is not None:
      q = apply_rope(q, positions, self.rope_theta)
      k = apply_rope(k, positions, self.rope_theta)
    if whole:
      q, k, v = self._replicated(q), self._replicated(k), self._replicated(v)
    return q, k, v

  def _qkv_packed(self, x, positions):
    """x: [T, d_model] -> ``[T, Hq + 2 * Hkv, D]``: :meth:`_qkv`'s q, k and v as one array,
    heads in that order (one device, ``shards == 1``: the columns are ``[q | k | v]``).

    RoPE goes on the first ``Hq + Hkv`` heads in one elementwise pass over the whole array,
    so that the projection's output, RoPE and the layout of the three are one fusion."""
    heads = self.num_q_heads + 2 * self.num_kv_heads
    h = self._project(x, self.qkv[...]).reshape(x.shape[0], heads, self.head_dim)
    if self.rope_theta is None:
      return h
    roped = jnp.arange(heads) < self.num_q_heads + self.num_kv_heads
    return jnp.where(roped[:, None], apply_rope(h, positions, self.rope_theta), h)

  def _project(self, x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` (w a parameter's value) in the computation dtype, by ``self.gemm``."""
    sharded = self.mesh is not None
    return project(
      x, w, dtype=self.dtype, gemm=self.gemm, interpret=self.interpret, sharded=sharded
    )

  def _out(self, a: jax.Array) -> jax.Array:
    """The output projection (``o_proj``'s kernel, promoted as ``nnx.Linear`` does)."""
    return self._project(a, self.o_proj.kernel[...])

  def _replicated(self, a: jax.Array) -> jax.Array:
    return jax.lax.with_sharding_constraint(a, NamedSharding(self.mesh, P()))

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    cache,
    *,
    block_table: jax.Array,
    lengths: jax.Array,
    slot_mapping: jax.Array,
    cu_q_lens: jax.Array | None = None,
    layer=None,
    cascade: kernels.CascadePlan | None = None,
    decode_plan=None,
    fused_write: bool = True,
  ):
    """Attention for a ragged batch of new tokens over the paged cache.

    Args:
      x: ``[num_tokens, d_model]``, the new tokens of every sequence, concatenated
        (rows past ``cu_q_lens[-1]`` are bucket padding).
      positions: ``i32[num_tokens]``, each token's position in its sequence.
      cache: either this layer's pools ``(k_blocks, v_blocks)``, each ``[num_kv_heads,
        num_blocks, block_size, head_dim]`` (written with ``kernels.write_kv``), or a whole
        :class:`paxcache.cache.PagedKVCache` together with ``layer`` (written with
        ``paxcache.cache.write`` into that layer's own buffers: the kernel then reads the
        pool in place, never a copy of it).
      block_table: ``i32[batch, max_blocks]``, ``-1`` where unused.
      lengths: ``i32[batch]``, tokens in each sequence including this call's.
      slot_mapping: ``i32[num_tokens]``, where each new token's K/V goes; ``-1`` for
        padding rows. NumPy metadata (not traced) is checked: each slot must be the one
        the row's position has in ``block_table``, and ``positions`` where the lengths put
        the rows (``kernels.check_host_slots_match_table``; ValueError).
      cu_q_lens: ``i32[batch + 1]``; None means decode (one token per sequence,
        ``num_tokens == batch``).
      layer: the layer index when ``cache`` is a ``PagedKVCache``.
      cascade: decode only (``cu_q_lens`` None): a :class:`kernels.CascadePlan` of this
        step's block table and lengths (``kernels.plan_cascade``, built on the host); the
        layer then runs :func:`kernels.cascade_attention` (each group's shared prefix read
        once for the group) instead of :func:`kernels.paged_attention`: the same result
        up to float rounding. Not with ``mesh`` or ``sliding_window`` (ValueError).
      decode_plan: decode only: a ``kernels.gpu.plan.DecodePlan`` of this step's lengths
        (``kernels.gpu.plan_decode``, built on the host), passed to
        :func:`kernels.paged_attention`: the GPU backend runs its planned decode by it
        (the same result: a plan is a schedule), the reference ignores it, the TPU backend
        refuses it. Not with ``cascade`` or ``mesh`` (ValueError).
      fused_write: decode only: with the module's ``fused_write`` also True, a step over
        plain 16- or 32-bit pools on one device writes and attends in one
        ``kernels.write_and_decode_packed``, which needs each row's slot to be that of
        its position ``lengths[b] - 1`` (or -1) and no row to read a slot another row
        writes in this call (the kernel writes and reads in one launch). False: the write
        runs first (``write_kv``), then the attention.

    Returns:
      ``(out [num_tokens, d_model], cache)``: the cache of the same kind as given, with
      the new tokens' K/V written.
    """
    if x.ndim != 2 or x.shape[1] != self.d_model:
      raise ValueError(
        f"x must be [num_tokens, d_model] with d_model={self.d_model}, got x.shape {x.shape}"
      )
    if positions.shape != x.shape[:1]:
      raise ValueError(f"positions must be [{x.shape[0]}], got {positions.shape}")
    if isinstance(cache, PagedKVCache):
      if layer is None:
        raise ValueError("a PagedKVCache needs the layer index: pass layer=")
    elif layer is not None:
      raise ValueError("layer= is only for a PagedKVCache; got per-layer (k_blocks, v_blocks)")
    self._check_cache(cache)
    # Host (NumPy) metadata: each row's slot is the one its position has in the table (a
    # wrong slot writes K/V no query reads); traced metadata (the engine's jit) is trusted.
    block_size = cache.block_size if isinstance(cache, PagedKVCache) else cache[0].shape[2]
    kernels.check_host_slots_match_table(
      slot_mapping, block_table, lengths, cu_q_lens, block_size, positions=positions
    )
    kernel_kwargs = dict(
      sliding_window=self.sliding_window,
      logit_soft_cap=self.logit_soft_cap,
      backend=self.backend,
      interpret=self.interpret,
    )
    if cascade is not None:
      if cu_q_lens is not None:
        raise ValueError("cascade is for decode steps only: pass cu_q_lens=None with a plan")
      if self.mesh is not None:
        raise ValueError("cascade attention does not run under a mesh yet: pass cascade=None")
    if decode_plan is not None:
      if cu_q_lens is not None:
        raise ValueError("decode_plan is for decode steps only: pass cu_q_lens=None with a plan")
      if cascade is not None:
        raise ValueError("pass a cascade plan or a decode_plan, not both (cascade runs its own)")
      if self.mesh is not None:
        raise ValueError("the planned decode does not run under a mesh: pass decode_plan=None")
      kernel_kwargs["decode_plan"] = decode_plan
    # A decode step over a plain 16- or 32-bit pool on one device: the K/V write and the
    # attention in one call (on the GPU backend one kernel, planned or not), with q, k and v
    # as the one array the projection gives (kernels.write_and_decode_packed: the GPU decode
    # kernel reads the three from it, so no kernel splits it first).
    rotate = self._rotated(cache)
    fused = (
      self.fused_write
      and fused_write
      and self.mesh is None
      and self.shards == 1
      and cu_q_lens is None
      and cascade is None
    )
    if fused and _plain_float_pools(cache):
      pools = cache.layer(layer) if isinstance(cache, PagedKVCache) else cache
      out, k_blocks, v_blocks = kernels.write_and_decode_packed(
        self._qkv_packed(x, positions).astype(pools[0].dtype),
        *pools,
        slot_mapping,
        block_table,
        lengths,
        **kernel_kwargs,
      )
      if isinstance(cache, PagedKVCache):
        cache = cache.replace_layer(layer, k_blocks, v_blocks)
      else:
        cache = (k_blocks, v_blocks)
      out = self._out(out.astype(x.dtype).reshape(x.shape[0], -1))
      return out, cache
    if fused and _plain_quantized_cache(cache) and self._fuses_8bit_write():
      # An 8-bit cache: the decode kernel quantizes and stores the step's K/V rows and their
      # scales itself (on the GPU backend; the others write, then attend). Rotated rows
      # (int8, kv_rotation): the packed q/k/v is rotated as one float32 product, the rows
      # quantized from float32 and q taken in its own dtype, as on the path below.
      qkv = self._qkv_packed(x, positions)
      q_dtype = qkv.dtype
      if rotate:
        qkv = kernels.hadamard_rotate(qkv)
      out, *pools = kernels.write_and_decode_packed(
        qkv,
        *cache.layer(layer),
        slot_mapping,
        block_table,
        lengths,
        **cache.scales(layer),
        q_dtype=q_dtype,
        **kernel_kwargs,
      )
      cache = cache.replace_layer(layer, *pools)
      if rotate:  # back from the rotated lanes (R is its own inverse)
        out = kernels.hadamard_rotate(out)
      out = self._out(out.astype(x.dtype).reshape(x.shape[0], -1))
      return out, cache
    # Under a mesh, k and v in the pool heads of each device's block of qkv (KV heads copied
    # over devices computed on each of them), which the sharded write takes as they are.
    q, k, v = self._qkv(x, positions, pool_heads=self.mesh is not None)
    if rotate and self.mesh is None:
      # One product for the three (q, k and v of a token side by side); the rows go to the
      # write in float32 (it quantizes them), q in its own dtype.
      hq, hk = q.shape[-2], k.shape[-2]
      rotated = kernels.hadamard_rotate(jnp.concatenate([q, k, v], axis=-2))
      q = rotated[..., :hq, :].astype(q.dtype)
      k, v = rotated[..., hq : hq + hk, :], rotated[..., hq + hk :, :]
    elif rotate:  # under a mesh each is rotated as it is laid out (no concatenation of
      # differently split arrays)
      q = kernels.hadamard_rotate(q).astype(q.dtype)
      k, v = kernels.hadamard_rotate(k), kernels.hadamard_rotate(v)
    if self.mesh is None:
      scales = {}
      if isinstance(cache, PagedKVCache):
        # The write donates this layer's pools: the attention's checks go first, on the
        # pools as they are (the same shapes), so that a call refused for its metadata
        # leaves the caller's cache whole.
        k_blocks, v_blocks = cache.layer(layer)
        q_in = q.astype(_query_dtype(q.dtype, k_blocks.dtype))
        plain = cascade is None
        (kernels.check_paged_attention if plain else kernels.check_cascade_attention)(
          q_in,
          k_blocks,
          v_blocks,
          block_table,
          lengths,
          cu_q_lens if plain else cascade,
          **kernel_kwargs,
          **cache.kernel_kwargs(layer),
        )
        cache = cache_ops.write(cache, layer, k, v, slot_mapping)
        k_blocks, v_blocks = cache.layer(layer)
        # 8-bit: the scales, which the kernel multiplies in; a lane-dense cache: the flag.
        scales = cache.kernel_kwargs(layer)
      else:
        k_blocks, v_blocks = kernels.write_kv(*cache, k, v, slot_mapping)
        cache = (k_blocks, v_blocks)
      q_in = q.astype(_query_dtype(q.dtype, k_blocks.dtype))
      if cascade is None:
        out = kernels.paged_attention(
          q_in, k_blocks, v_blocks, block_table, lengths, cu_q_lens, **kernel_kwargs, **scales
        )
      else:  # (kernels.cascade_attention refuses a sliding_window with a ValueError)
        out = kernels.cascade_attention(
          q_in, k_blocks, v_blocks, block_table, lengths, cascade, **kernel_kwargs, **scales
        )
    else:
      mesh, axis = self.mesh, self.mesh_axis
      scales = {}
      if isinstance(cache, PagedKVCache):
        # As above: the checks before the (donating) write.
        k_blocks, v_blocks = cache.layer(layer)
        sharding.check_sharded_paged_attention(
          mesh,
          q.astype(_query_dtype(q.dtype, k_blocks.dtype)),
          k_blocks,
          v_blocks,
          block_table,
          lengths,
          cu_q_lens,
          num_kv_heads=self.num_kv_heads,
          axis=axis,
          **kernel_kwargs,
          **cache.scales(layer),
        )
        cache = sharding.sharded_cache_write(mesh, cache, layer, k, v, slot_mapping, axis=axis)
        k_blocks, v_blocks = cache.layer(layer)
        scales = cache.scales(layer)
      else:
        k_blocks, v_blocks = sharding.sharded_write_kv(mesh, *cache, k, v, slot_mapping, axis=axis)
        cache = (k_blocks, v_blocks)
      out = sharding.sharded_paged_attention(
        mesh,
        q.astype(_query_dtype(q.dtype, k_blocks.dtype)),
        k_blocks,
        v_blocks,
        block_table,
        lengths,
        cu_q_lens,
        num_kv_heads=self.num_kv_heads,
        axis=axis,
        **kernel_kwargs,
        **scales,
      )
    if rotate:  # back from the rotated lanes (R is its own inverse)
      out = kernels.hadamard_rotate(out)
    out = self._out(out.astype(x.dtype).reshape(x.shape[0], -1))
    return out, cache

  def _rotated(self, cache) -> bool:
    """Whether ``cache``'s rows are rotated (an int8 ``PagedKVCache`` with ``rotated``);
    ValueError where that is not what this layer's ``kv_rotation`` writes: such a cache
    was written by another setting, and reading it with this one would be silently wrong.
    Pools passed as a pair are never rotated (the int8 write needs a ``PagedKVCache``)."""
    if not isinstance(cache, PagedKVCache) or jnp.dtype(cache.dtype) != jnp.int8:
      return False
    if cache.rotated != self.kv_rotation:
      raise ValueError(
        f"this int8 cache holds {'rotated' if cache.rotated else 'unrotated'} rows "
        f"(PagedKVCache.rotated={cache.rotated}) but the layer has kv_rotation="
        f"{self.kv_rotation}: build the cache with the model's init_cache, or "
        f"PagedKVCache.create(..., rotated={self.kv_rotation})"
      )
    return cache.rotated

  def _check_cache(self, cache) -> None:
    """ValueError where ``cache`` is not a ``PagedKVCache`` or a pair of 4-D pools, or where
    its head_dim (or, on one device, its KV heads) is not this layer's: named here, where the
    kernels would name their own arguments (``k_new``/``v_new``) instead. Under a mesh the
    pools may hold copies of KV heads (``paxcache.sharding``), which the sharded write
    checks."""
    if isinstance(cache, PagedKVCache):
      heads, dim, what = cache.num_kv_heads, cache.head_dim, "the PagedKVCache has"
    else:
      ok = isinstance(cache, tuple | list) and len(cache) == 2
      k, v = cache if ok else (None, None)
      if not ok or getattr(k, "ndim", None) != 4 or getattr(v, "shape", None) != k.shape:
        got = (
          [tuple(getattr(p, "shape", ())) for p in cache]
          if isinstance(cache, tuple | list)
          else type(cache).__name__
        )
        raise ValueError(
          "cache must be a PagedKVCache or this layer's (k_blocks, v_blocks), both "
          f"[num_kv_heads, num_blocks, block_size, head_dim], got {got}"
        )
      heads, dim, what = k.shape[0], k.shape[3], f"the pools {tuple(k.shape)} have"
      if kernels.is_quantized(k.dtype):
        raise ValueError(
          f"8-bit pools ({jnp.dtype(k.dtype).name}) need their scales: pass a PagedKVCache "
          "(PagedKVCache.create(..., dtype=...) or the model's init_cache), not a pair"
        )
    if dim != self.head_dim or (self.mesh is None and heads != self.num_kv_heads):
      raise ValueError(
        f"{what} {heads} KV heads of head_dim {dim}; this layer has {self.num_kv_heads} "
        f"KV heads of head_dim {self.head_dim}"
      )

  def dense(
    self,
    x: jax.Array,
    positions: jax.Array,
    cache: tuple | None = None,
    cache_index: jax.Array | int = 0,
    query_rows: jax.Array | None = None,
    exact: bool = True,
  ):
    """The same attention without paging.

    Args:
      x: ``[batch, seq, d_model]``.
      positions: ``i32[batch, seq]``.
      cache: None for full recomputation (causal attention over ``x`` alone), or a
        contiguous cache ``(k, v)``, each ``[batch, max_len, num_kv_heads, head_dim]``,
        into which this call's K/V are written at ``[cache_index, cache_index + seq)``.
      cache_index: where this call's tokens start in the contiguous cache (shared by
        the batch, as in Flax's own decode cache).
      query_rows: no-cache path only: ``i32[batch, rows]``, compute the output only for
        these rows (keys and values still cover the whole sequence).
      exact: see :func:`dense_causal_attention` (False: products in the cache dtype).

    Returns:
      ``out [batch, seq or rows, d_model]``, and the updated ``(k, v)`` cache when one was
      given.
    """
    if self.sliding_window is not None or self.logit_soft_cap is not None:
      raise NotImplementedError("dense path: no sliding window / soft cap")
    if x.ndim != 3 or x.shape[2] != self.d_model:
      raise ValueError(
        f"x must be [batch, seq, d_model] with d_model={self.d_model}, got x.shape {x.shape}"
      )
    q, k, v = self._qkv(x, positions)
    scale = self.head_dim**-0.5
    if cache is None:
      if query_rows is not None:
        q = jnp.take_along_axis(q, query_rows[:, :, None, None], axis=1)
        positions = jnp.take_along_axis(positions, query_rows, axis=1)
      out = dense_causal_attention(q, k, v, positions, scale=scale, exact=exact)
      return self._out(out.astype(x.dtype).reshape(*q.shape[:2], -1))
    k_cache, v_cache = cache
    start = (0, cache_index, 0, 0)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
    out = dense_causal_attention(q, k_cache, v_cache, positions, scale=scale, exact=exact)
    return self._out(out.astype(x.dtype).reshape(*x.shape[:2], -1)), (k_cache, v_cache)
