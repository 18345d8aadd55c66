"""A small Llama-style decoder over the paged cache, and the same model without paging."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paxcache import sharding
from paxcache.cache import PagedKVCache
from paxcache.nn._attention import PagedAttention, check_fused_write_8bit
from paxcache.nn._config import DecoderConfig
from paxcache.nn._layers import RMSNorm, SwiGLU


class DecoderLayer(nnx.Module):
  """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(
    self,
    config: DecoderConfig,
    *,
    backend: str = "auto",
    interpret: bool = False,
    gemm: str = "auto",
    mesh=None,
    mesh_axis: str = "model",
    fused_write_8bit: bool | None = None,
    rngs: nnx.Rngs,
  ):
    c = config
    self.attn_norm = RMSNorm(c.d_model, eps=c.norm_eps)
    self.attn = PagedAttention(
      c.d_model,
      c.num_q_heads,
      c.num_kv_heads,
      c.head_dim,
      rope_theta=c.rope_theta,
      backend=backend,
      interpret=interpret,
      gemm=gemm,
      dtype=c.jnp_dtype,
      param_dtype=c.jnp_param_dtype,
      mesh=mesh,
      mesh_axis=mesh_axis,
      kv_rotation=c.kv_rotation,
      fused_write_8bit=fused_write_8bit,
      rngs=rngs,
    )
    self.mlp_norm = RMSNorm(c.d_model, eps=c.norm_eps)
    self.mlp = SwiGLU(
      c.d_model,
      c.mlp_dim,
      dtype=c.jnp_dtype,
      param_dtype=c.jnp_param_dtype,
      gemm=gemm,
      interpret=interpret,
      rngs=rngs,
    )
    # A mesh: the MLP's products are XLA's (paxcache.nn.project's ``sharded``), as under
    # paxcache.sharding.shard_model, which sets the same.
    self.mlp.mesh = mesh

  def __call__(self, x, positions, cache, **paged):
    h, cache = self.attn(self.attn_norm(x), positions, cache, **paged)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache

  def dense(self, x, positions, cache=None, cache_index=0, query_rows=None, exact=True):
    """Unpaged block; ``query_rows`` (no-cache path only) keeps just those rows' outputs."""
    if cache is None:
      h = self.attn.dense(self.attn_norm(x), positions, query_rows=query_rows, exact=exact)
      if query_rows is not None:
        x = jnp.take_along_axis(x, query_rows[:, :, None], axis=1)
      x = x + h
    else:
      h, cache = self.attn.dense(self.attn_norm(x), positions, cache, cache_index, exact=exact)
      x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


class Decoder(nnx.Module):
  """Llama-style decoder: embed, ``num_layers`` x (RMSNorm, attention, RMSNorm, SwiGLU), norm.

  Three ways to run the same parameters:

  * :meth:`__call__`: a ragged batch of new tokens over a paged KV cache (what the
    engine runs; prefill chunks and decode steps mixed in one call);
  * :meth:`forward`: no cache, causal attention over whole sequences (the parity
    oracle: full recomputation);
  * :meth:`forward_cached`: a plain contiguous cache, for comparison with paging.

  ``mesh`` / ``mesh_axis`` are passed to every layer's :class:`PagedAttention` (tensor
  parallelism over KV heads); ``paxcache.sharding.shard_model`` sets them on a built model
  and also places the parameters, which is what the engine does with ``EngineConfig.mesh``.

  ``gemm`` (:data:`paxcache.nn.GEMMS`) is how every layer's projections multiply: "auto"
  (the default) runs the Pallas split-K product of ``kernels.gpu.matmul`` on a GPU for
  calls of at most 128 token rows (decode steps; a short prefill chunk too) and weights of
  at most 32 MiB, stored in the computation dtype, where its rule has a launch
  (``kernels.gpu.matmul.matmul_settings``), and XLA's product elsewhere (more rows, larger
  weights, CPU, TPU, float32, a mesh); "xla" never the kernel; "pallas" every projection
  (``interpret=True`` on CPU), raising where the kernel cannot run it (above 256 rows, a
  mesh, float32). The embedding and the logits stay XLA's.

  ``fused_write_8bit`` (None, True or False) is every layer's :class:`PagedAttention`
  ``fused_write_8bit``: over an 8-bit cache, whether a decode step writes and quantizes the
  new rows inside the decode kernel (None: the card's default,
  ``kernels.gpu.quant_fused_write``). The same tokens either way; a speed choice.
  """

  def __init__(
    self,
    config: DecoderConfig,
    *,
    backend: str = "auto",
    interpret: bool = False,
    gemm: str = "auto",
    mesh=None,
    mesh_axis: str = "model",
    fused_write_8bit: bool | None = None,
    rngs: nnx.Rngs,
  ):
    c = config
    self.config = c
    check_fused_write_8bit(fused_write_8bit)
    self.embed = nnx.Embed(
      c.vocab_size, c.d_model, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype, rngs=rngs
    )
    self.layers = nnx.List(
      [
        DecoderLayer(
          c,
          backend=backend,
          interpret=interpret,
          gemm=gemm,
          mesh=mesh,
          mesh_axis=mesh_axis,
          fused_write_8bit=fused_write_8bit,
          rngs=rngs,
        )
        for _ in range(c.num_layers)
      ]
    )
    self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps)
    if not c.tie_embeddings:
      self.lm_head = nnx.Linear(
        c.d_model,
        c.vocab_size,
        use_bias=False,
        dtype=c.jnp_dtype,
        param_dtype=c.jnp_param_dtype,
        rngs=rngs,
      )

  def logits(self, h: jax.Array) -> jax.Array:
    """``[..., d_model] -> float32 [..., vocab_size]``."""
    h = self.final_norm(h)
    out = self.embed.attend(h) if self.config.tie_embeddings else self.lm_head(h)
    return out.astype(jnp.float32)

  @property
  def mesh(self):
    """``(mesh, mesh_axis)`` of the attention layers, or ``(None, None)`` on one device."""
    meshes = {(layer.attn.mesh, layer.attn.mesh_axis) for layer in self.layers}
    if len(meshes) > 1:
      raise ValueError(f"the layers' attention runs on {len(meshes)} different meshes")
    mesh, axis = meshes.pop() if meshes else (None, None)
    return (None, None) if mesh is None else (mesh, axis)

  def init_cache(
    self,
    num_blocks: int,
    block_size: int,
    *,
    lane_dense: bool = False,
    lane_padded: bool = False,
  ) -> PagedKVCache:
    """A zero-filled paged cache for this model: per layer ``[num_kv_heads, num_blocks,
    block_size, head_dim]`` in the config's ``kv_dtype`` (default: its ``dtype``); 8-bit
    with float32 scale pools; an int8 one ``rotated`` under ``DecoderConfig.kv_rotation``
    (``PagedKVCache``).

    ``lane_dense``: pools in rows of 128 (head_dim 32 or 64; ``PagedKVCache.create``): what
    the TPU kernels read without padding; the same results on every backend.
    ``lane_padded``: pools in rows of head_dim rounded up to a multiple of 128 (a head_dim
    that is not one, e.g. 80 or 96; ``PagedKVCache.create``): how the TPU kernels take
    such a head_dim; the same results on every backend.

    With a mesh on the layers, the cache is ``paxcache.sharding.init_sharded_cache``'s:
    ``pool_heads`` heads sharded over the mesh axis, each device allocating only its own
    (the whole pool never exists on one device).
    """
    c = self.config
    mesh, axis = self.mesh
    # int8 rows written rotated (DecoderConfig.kv_rotation): the cache says so, and the
    # layers refuse a cache whose flag is not theirs.
    rotated = c.kv_rotation and c.jnp_kv_dtype == jnp.int8
    if mesh is not None and lane_dense:
      raise ValueError("a lane-dense cache is not sharded yet: pass lane_dense=False with a mesh")
    if mesh is not None and lane_padded:
      raise ValueError("a lane-padded cache is not sharded yet: pass lane_padded=False with a mesh")
    if mesh is not None:
      return sharding.init_sharded_cache(
        mesh,
        c.num_layers,
        c.num_kv_heads,
        num_blocks,
        block_size,
        c.head_dim,
        c.jnp_kv_dtype,
        axis=axis,
        rotated=rotated,
      )
    return PagedKVCache.create(
      c.num_layers,
      c.num_kv_heads,
      num_blocks,
      block_size,
      c.head_dim,
      c.jnp_kv_dtype,
      lane_dense=lane_dense,
      lane_padded=lane_padded,
      rotated=rotated,
    )

  def __call__(
    self,
    tokens: jax.Array,
    positions: jax.Array,
    cache: PagedKVCache,
    *,
    block_table: jax.Array,
    lengths: jax.Array,
    slot_mapping: jax.Array,
    cu_q_lens: jax.Array | None = None,
    logit_rows: jax.Array | None = None,
    cascade=None,
    decode_plan=None,
    fused_write: bool = True,
  ):
    """Runs new tokens through the model over the paged cache.

    Args:
      tokens: ``i32[num_tokens]``, new tokens of every sequence concatenated.
      positions: ``i32[num_tokens]``.
      cache: the paged cache, per layer ``[num_kv_heads, num_blocks, block_size, head_dim]``.
      block_table, lengths, slot_mapping, cu_q_lens: as in
        :class:`paxcache.nn.PagedAttention`.
      logit_rows: optional ``i32[rows]``: compute logits only for these token rows
        (e.g. each sequence's last new token); None computes all rows.
      cascade: decode only: a :class:`kernels.CascadePlan` for this step's block table and
        lengths; every layer then runs :func:`kernels.cascade_attention` (see
        :class:`paxcache.nn.PagedAttention`). None: plain paged attention.
      decode_plan: decode only: a ``kernels.gpu.plan.DecodePlan`` of this step's lengths,
        passed to every layer's :func:`kernels.paged_attention` (the GPU backend's planned
        decode; see :class:`paxcache.nn.PagedAttention`). None: the default decode.
      fused_write: decode only: whether the layers may write the step's K/V inside the
        attention kernel (:class:`paxcache.nn.PagedAttention`, ``fused_write``). Pass False
        when a row reads a slot another row writes in this call (a prefix hit on a block
        this very step fills): the fused kernel writes and reads in one launch, so only a
        write before the attention orders them.

    Returns:
      ``(logits f32[rows or num_tokens, vocab_size], cache)`` with the new K/V written.
    """
    self._check_call(tokens, cache, logit_rows)
    paged = dict(
      block_table=block_table, lengths=lengths, slot_mapping=slot_mapping, cu_q_lens=cu_q_lens
    )
    if cascade is not None:
      paged["cascade"] = cascade
    if decode_plan is not None:
      paged["decode_plan"] = decode_plan
    if not fused_write:
      paged["fused_write"] = False
    x = self.embed(tokens)
    for i, layer in enumerate(self.layers):
      x, cache = layer(x, positions, cache, layer=i, **paged)
    if logit_rows is not None:
      x = x[logit_rows]
    return self.logits(x), cache

  def _check_call(self, tokens, cache, logit_rows) -> None:
    """What :meth:`__call__` checks before any layer writes (the writes donate the cache's
    pools): a cache of as many layers as the model (one built for another model is
    refused, more layers included); host (NumPy) tokens in ``[0, vocab_size)`` (the
    embedding would give NaN rows for a larger id, written into the cache, and take -1 as
    the last id) and host ``logit_rows`` in ``[-num_tokens, num_tokens)`` (NumPy's
    negative indices; indexing would clamp others). Traced values are trusted, as the
    kernels trust them."""
    if not isinstance(cache, PagedKVCache):
      raise ValueError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    if cache.num_layers != len(self.layers):
      raise ValueError(
        f"the cache has {cache.num_layers} layers and the model {len(self.layers)}: build it "
        "with the model's init_cache"
      )
    if isinstance(tokens, np.ndarray) and tokens.size:
      if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got {tokens.dtype}")
      lo, hi = int(tokens.min()), int(tokens.max())
      if lo < 0 or hi >= self.config.vocab_size:
        raise ValueError(
          f"tokens must be in [0, vocab_size={self.config.vocab_size}), got ids in [{lo}, {hi}]"
        )
    if isinstance(logit_rows, np.ndarray) and logit_rows.size:
      n = np.shape(tokens)[0]
      if int(logit_rows.min()) < -n or int(logit_rows.max()) >= n:
        raise ValueError(
          f"logit_rows must be in [-{n}, {n}) for {n} token rows (negative from the end), got "
          f"{logit_rows.min()}..{logit_rows.max()}"
        )

  def forward(self, tokens: jax.Array, logit_rows: jax.Array | None = None) -> jax.Array:
    """No cache: full causal recomputation over whole sequences.

    Args:
      tokens: ``i32[batch, seq]``. Right padding never changes earlier rows
        (causality), so sequences of mixed lengths can share one padded batch.
      logit_rows: optional ``i32[batch, rows]``: only these positions' logits are
        wanted. The last layer then computes queries only there (its other rows feed
        nothing), which makes long no-cache oracles affordable; earlier layers still
        run every row.

    Returns:
      ``f32[batch, seq or rows, vocab_size]``.
    """
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = self.embed(tokens)
    last = len(self.layers) - 1
    for i, layer in enumerate(self.layers):
      x, _ = layer.dense(x, positions, query_rows=logit_rows if i == last else None)
    return self.logits(x)

  def init_dense_cache(self, batch: int, max_len: int):
    """A contiguous cache: per layer ``(k, v)``, each ``[batch, max_len, num_kv_heads,
    head_dim]``, zero-filled."""
    c = self.config
    shape = (batch, max_len, c.num_kv_heads, c.head_dim)
    return [
      (jnp.zeros(shape, c.jnp_dtype), jnp.zeros(shape, c.jnp_dtype)) for _ in range(c.num_layers)
    ]

  def forward_cached(self, tokens: jax.Array, cache, cache_index, *, exact: bool = True):
    """Contiguous cache: ``tokens i32[batch, seq]`` at positions ``cache_index + j``.

    ``exact=False`` multiplies in the cache dtype with float32 accumulation instead of
    float32 at HIGHEST precision (what a contiguous serving step does; the benchmarks'
    no-paging peer).

    Returns ``(logits f32[batch, seq, vocab_size], new cache)``.
    """
    b, s = tokens.shape
    positions = jnp.broadcast_to(cache_index + jnp.arange(s, dtype=jnp.int32), (b, s))
    x = self.embed(tokens)
    new_cache = []
    for layer, layer_cache in zip(self.layers, cache, strict=True):
      x, layer_cache = layer.dense(x, positions, layer_cache, cache_index, exact=exact)
      new_cache.append(layer_cache)
    return self.logits(x), new_cache
