"""Tests for paxcache.nn: the paged attention layer and the decoder against independent oracles."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels
import paxcache
from kernels.gpu import matmul as gpu_matmul
from kernels.testing import tolerance
from paxcache.cache import PagedKVCache
from paxcache.nn import (
  TINY_CHECKPOINT,
  TINY_CORPUS,
  Decoder,
  DecoderConfig,
  PagedAttention,
  SwiGLU,
  apply_rope,
  greedy_generate_dense_cache,
  greedy_generate_no_cache,
  load_decoder,
  save_decoder,
)

# The float32 tolerance of every comparison here: against the float64 oracle and between the
# paged, dense and no-cache paths (kernels/testing.py says why).
TOL = tolerance("layer_vs_float64", "float32")


def _np_rope(x, pos, theta):
  half = x.shape[-1] // 2
  inv = theta ** (-np.arange(half, dtype=np.float64) / half)
  ang = pos.astype(np.float64)[:, None, None] * inv
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate(
    [x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1
  )


def _np_layer(layer: PagedAttention, xs, theta):
  """Float64 NumPy oracle: each sequence's causal attention over its full token list."""
  hq, hkv, d = layer.num_q_heads, layer.num_kv_heads, layer.head_dim
  qkv = np.asarray(layer.canonical_qkv(), np.float64)  # [q | k | v] columns
  parts = np.split(qkv, [hq * d, (hq + hkv) * d], axis=1)
  w = dict(zip(("q_proj", "k_proj", "v_proj"), parts, strict=True))
  w["o_proj"] = np.asarray(layer.o_proj.kernel[...], np.float64)
  outs = []
  for x in xs:
    x = np.asarray(x, np.float64)
    t = x.shape[0]
    pos = np.arange(t)
    q = _np_rope((x @ w["q_proj"]).reshape(t, hq, d), pos, theta)
    k = _np_rope((x @ w["k_proj"]).reshape(t, hkv, d), pos, theta)
    v = (x @ w["v_proj"]).reshape(t, hkv, d)
    outs.append(_np_attend(layer, q, k, v))
  return outs


def test_rope_matches_numpy_float64():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((7, 3, 8)).astype(np.float32)
  pos = np.array([0, 1, 5, 17, 100, 1000, 4999], np.int32)
  got = apply_rope(jnp.asarray(x), jnp.asarray(pos), 10_000.0)
  np.testing.assert_allclose(got, _np_rope(x.astype(np.float64), pos, 10_000.0), **TOL)


def _scatter_table(rng, lengths, block_size, num_blocks, max_blocks):
  """Shuffled block tables: sequence b gets distinct random physical blocks."""
  perm = rng.permutation(num_blocks)
  table = np.full((len(lengths), max_blocks), kernels.INVALID_BLOCK, np.int32)
  used = 0
  for b, n in enumerate(lengths):
    nb = -(-n // block_size)
    table[b, :nb] = perm[used : used + nb]
    used += nb
  return table


def _slots(table, b, positions, block_size):
  return np.array(
    [table[b, p // block_size] * block_size + p % block_size for p in positions], np.int32
  )


# (start, stop) of each sequence's tokens in each call: a ragged prefill chunk, a second
# chunk after cached context, a decode step (two sequences of 11 and 6 tokens).
_CALLS = [[(0, 5), (0, 3)], [(5, 10), (3, 5)], [(10, 11), (5, 6)]]


def _run_layer_calls(attn, xs, cache, table, bs, **kw):
  """``_CALLS`` through the layer ``attn`` over ``cache`` (pools, or a PagedKVCache with
  ``layer=``); returns (each call's output rows split by sequence, the cache)."""
  outs = []
  for call in _CALLS:
    x = np.concatenate([xs[b][lo:hi] for b, (lo, hi) in enumerate(call)])
    pos = np.concatenate([np.arange(lo, hi) for lo, hi in call]).astype(np.int32)
    slots = np.concatenate([_slots(table, b, range(lo, hi), bs) for b, (lo, hi) in enumerate(call)])
    q_lens = [hi - lo for lo, hi in call]
    decode = all(q == 1 for q in q_lens)
    cu = None if decode else jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32))
    out, cache = attn(
      jnp.asarray(x),
      jnp.asarray(pos),
      cache,
      block_table=jnp.asarray(table),
      lengths=jnp.asarray(np.array([hi for _, hi in call], np.int32)),
      slot_mapping=jnp.asarray(slots),
      cu_q_lens=cu,
      **kw,
    )
    outs.append(np.split(np.asarray(out), np.cumsum(q_lens)[:-1]))
  return outs, cache


@pytest.mark.parametrize("num_kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_paged_layer_matches_numpy_over_chunked_prefill_and_decode(num_kv_heads):
  """Two sequences: a ragged prefill chunk, a second chunk after cached context, then a
  decode step; unused blocks hold NaN. Every output row matches the float64 oracle."""
  rng = np.random.default_rng(1)
  d_model, bs, num_blocks, theta = 32, 4, 16, 10_000.0
  layer = PagedAttention(d_model, 4, num_kv_heads, 8, rope_theta=theta, rngs=nnx.Rngs(3))
  lengths = [11, 6]
  xs = [rng.standard_normal((n, d_model)).astype(np.float32) for n in lengths]
  want = _np_layer(layer, xs, theta)
  table = _scatter_table(rng, lengths, bs, num_blocks, 4)
  nan = np.full((num_kv_heads, num_blocks, bs, 8), np.nan, np.float32)
  pools = (jnp.asarray(nan), jnp.asarray(nan))
  outs, _ = _run_layer_calls(layer, xs, pools, table, bs)
  for call, got in zip(_CALLS, outs, strict=True):
    chex.assert_trees_all_close(got, [want[b][lo:hi] for b, (lo, hi) in enumerate(call)], **TOL)


def _one_token_args():
  """A one-token decode step's arguments for a layer call: one sequence, slot 0."""
  return dict(
    block_table=jnp.zeros((1, 2), jnp.int32),
    lengths=jnp.ones((1,), jnp.int32),
    slot_mapping=jnp.zeros((1,), jnp.int32),
  )


def _np_hadamard(d):
  """Float64 ``R`` of ``kernels.hadamard_rotate``: Sylvester blocks of the largest power of
  two dividing d on the diagonal, normalised."""
  b = d & -d
  h = np.ones((1, 1))
  while h.shape[0] < b:
    h = np.block([[h, h], [h, -h]])
  return np.kron(np.eye(d // b), h / np.sqrt(b))


def _run_8bit_layer(layer, kv_dtype, rng_seed=5):
  """Two sequences through ``layer`` over an 8-bit PagedKVCache (prefill chunk, second
  chunk, decode: ``_CALLS``). Returns (outputs per call, the float64 oracle's q, k, v per
  sequence, the final cache, the table)."""
  rng = np.random.default_rng(rng_seed)
  d_model, bs, num_blocks, theta = layer.d_model, 4, 16, layer.rope_theta
  hq, hkv, d = layer.num_q_heads, layer.num_kv_heads, layer.head_dim
  lengths = [11, 6]
  xs = [rng.standard_normal((n, d_model)).astype(np.float32) for n in lengths]
  qkv = np.asarray(layer.canonical_qkv(), np.float64)
  wq, wk, wv = np.split(qkv, [hq * d, (hq + hkv) * d], axis=1)
  qkv64 = [
    (
      _np_rope((x.astype(np.float64) @ wq).reshape(len(x), hq, d), np.arange(len(x)), theta),
      _np_rope((x.astype(np.float64) @ wk).reshape(len(x), hkv, d), np.arange(len(x)), theta),
      (x.astype(np.float64) @ wv).reshape(len(x), hkv, d),
    )
    for x in xs
  ]
  table = _scatter_table(rng, lengths, bs, num_blocks, 4)
  rotated = layer.kv_rotation and jnp.dtype(kv_dtype) == jnp.int8
  cache = PagedKVCache.create(1, hkv, num_blocks, bs, d, kv_dtype, rotated=rotated)
  outs, cache = _run_layer_calls(layer, xs, cache, table, bs, layer=0)
  outs = [[np.asarray(o, np.float64) for o in out] for out in outs]
  return outs, qkv64, cache, table


def _stored_rows(cache, table, b, n, bs=4):
  """Sequence b's first n stored K and V rows, dequantized in float64: [n, hkv, d] each."""
  k, v = (np.asarray(a, np.float64) for a in cache.layer(0))
  sc = cache.scales(0)
  ks, vs = (np.asarray(sc[name], np.float64) for name in ("k_scales", "v_scales"))
  blk = np.array([table[b, p // bs] for p in range(n)])
  off = np.arange(n) % bs
  rows = lambda pool, scale: (pool[:, blk, off] * scale[:, blk, off][..., None]).transpose(1, 0, 2)
  return rows(k, ks), rows(v, vs)


def _np_attend(layer, q, k, v):
  """Float64 causal attention of one sequence's q over its k, v, then o_proj."""
  hq, hkv, d = layer.num_q_heads, layer.num_kv_heads, layer.head_dim
  t = q.shape[0]
  o = np.zeros((t, hq, d))
  for h in range(hq):
    kh = h // (hq // hkv)
    logits = q[:, h] @ k[:, kh].T / np.sqrt(d)
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    o[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, kh]
  return o.reshape(t, hq * d) @ np.asarray(layer.o_proj.kernel[...], np.float64)


@pytest.mark.parametrize("rotation", [True, False], ids=["rotated", "plain"])
def test_int8_cache_stores_rotated_rows_and_attends_over_them(rotation):
  """An int8 cache written by the layer holds ``round(k R / s)`` (``kv_rotation``; ``k`` as
  it is without), and every output row is float64 attention of the unrotated q over the
  stored rows dequantized and rotated back: the kernel path (q R in, output times R) is
  exact up to float32 rounding, and the only error left is the int8 rounding itself."""
  layer = PagedAttention(32, 4, 2, 16, kv_rotation=rotation, rngs=nnx.Rngs(3))
  outs, qkv64, cache, table = _run_8bit_layer(layer, jnp.int8)
  d = layer.head_dim
  r = _np_hadamard(d) if rotation else np.eye(d)
  for b, (q, k, v) in enumerate(qkv64):
    n = len(q)
    ks, vs = _stored_rows(cache, table, b, n)
    for want, got in ((k @ r, ks), (v @ r, vs)):
      # Round to nearest: within half a step (max |row| / 127 / 2) of the rotated row.
      step = np.abs(want).max(-1, keepdims=True) / 127
      assert np.all(np.abs(got - want) <= step * (0.5 + 1e-3)), np.abs(got - want).max()
    want = _np_attend(layer, q, ks @ r, vs @ r)  # R is its own inverse
    got = np.concatenate([out[b] for out in outs])
    np.testing.assert_allclose(got, want, **TOL)


def test_int8_rotation_lowers_the_error_where_a_channel_dominates():
  """With one key channel 30x the others (as RoPE'd keys of real models have a few), the
  rotated int8 cache's outputs are closer to the float64 layer than the plain int8 ones."""
  errs = {}
  for rotation in (True, False):
    layer = PagedAttention(32, 4, 2, 16, kv_rotation=rotation, rngs=nnx.Rngs(3))
    w = np.asarray(layer.qkv[...]).copy()
    hq, d = layer.num_q_heads, layer.head_dim
    w[:, hq * d + 3] *= 30.0  # KV head 0's key channel 3
    layer.qkv.set_value(jnp.asarray(w))
    outs, qkv64, *_ = _run_8bit_layer(layer, jnp.int8)
    errs[rotation] = np.mean(
      [
        np.abs(np.concatenate([out[b] for out in outs]) - _np_attend(layer, q, k, v)).mean()
        for b, (q, k, v) in enumerate(qkv64)
      ]
    )
  assert errs[True] < 0.5 * errs[False], errs


def test_e4m3_cache_is_never_rotated():
  """kv_rotation concerns int8 only: an e4m3 cache's rows and outputs are the same with it
  on and off."""
  runs = []
  for rotation in (True, False):
    layer = PagedAttention(32, 4, 2, 16, kv_rotation=rotation, rngs=nnx.Rngs(3))
    outs, qkv64, cache, table = _run_8bit_layer(layer, jnp.float8_e4m3fn)
    runs.append((outs, _stored_rows(cache, table, 0, 11)))
  chex.assert_trees_all_equal(runs[0], runs[1])
  k = runs[0][1][0]
  np.testing.assert_allclose(k, qkv64[0][1], rtol=2**-3, atol=1e-6)  # e4m3's step, unrotated


def test_a_cache_rotated_otherwise_than_the_layer_is_refused():
  """An int8 cache records whether its rows are rotated; a layer whose kv_rotation differs
  refuses it (reading it would be silently wrong), before writing anything. The model's
  init_cache sets the flag from its config."""
  args = _one_token_args()
  x, pos = jnp.ones((1, 16)), jnp.zeros((1,), jnp.int32)
  for rotation in (True, False):
    layer = PagedAttention(16, 2, 1, 8, kv_rotation=rotation, rngs=nnx.Rngs(0))
    other = PagedKVCache.create(1, 1, 4, 4, 8, jnp.int8, rotated=not rotation)
    with pytest.raises(
      ValueError, match=rf"PagedKVCache.rotated={not rotation}\) but the layer has kv_rotation="
    ):
      layer(x, pos, other, layer=0, **args)
    np.testing.assert_array_equal(np.asarray(other.k[0]), 0)  # nothing written
    out, new = layer(
      x, pos, PagedKVCache.create(1, 1, 4, 4, 8, jnp.int8, rotated=rotation), layer=0, **args
    )
    assert new.rotated == rotation and out.shape == (1, 16)
  with pytest.raises(ValueError, match="rotated=True is for int8 caches, got float8_e4m3fn"):
    PagedKVCache.create(1, 1, 4, 4, 8, jnp.float8_e4m3fn, rotated=True)
  with pytest.raises(ValueError, match="kv_rotation must be a bool, got 1"):
    PagedAttention(16, 2, 1, 8, kv_rotation=1, rngs=nnx.Rngs(0))
  for kv, rotation, want in (
    ("int8", True, True),
    ("int8", False, False),
    ("float8_e4m3fn", True, False),
  ):
    cfg = DecoderConfig(kv_dtype=kv, kv_rotation=rotation)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    assert model.init_cache(4, 4).rotated is want
    assert all(blk.attn.kv_rotation is rotation for blk in model.layers)


def test_whole_cache_with_layer_index_matches_per_layer_pools():
  """The PagedKVCache form writes only its layer and gives the same output."""
  rng = np.random.default_rng(2)
  layer = PagedAttention(16, 2, 1, 8, rngs=nnx.Rngs(0))
  cache = PagedKVCache.from_stacked(
    jnp.asarray(rng.standard_normal((3, 1, 8, 4, 8)), jnp.float32),
    jnp.asarray(rng.standard_normal((3, 1, 8, 4, 8)), jnp.float32),
  )
  before = jax.tree.map(np.asarray, cache)
  x = jnp.asarray(rng.standard_normal((5, 16)), jnp.float32)
  args = dict(
    block_table=jnp.asarray([[6, 2, -1]], jnp.int32),
    lengths=jnp.asarray([5], jnp.int32),
    slot_mapping=jnp.asarray([24, 25, 26, 27, 8], jnp.int32),
    cu_q_lens=jnp.asarray([0, 5], jnp.int32),
  )
  pos = jnp.arange(5, dtype=jnp.int32)
  out_pools, (k1, v1) = layer(x, pos, (cache.k[1], cache.v[1]), **args)
  out_cache, new = layer(x, pos, cache, layer=1, **args)
  np.testing.assert_array_equal(out_pools, out_cache)
  # Layer 1's K and V are the per-layer call's; every other pool is as it was.
  chex.assert_trees_all_equal(new, before.replace_layer(1, k1, v1))


def _run_calls(model, cache, seqs, table, bs, calls, want):
  """Runs ``calls`` (each a list of ``(lo, hi)`` token ranges, one per sequence) through
  the paged model in order, checking every call's logits against the no-cache ``want``
  rows; returns ``(each call's logits split by sequence, the cache)``."""
  out = []
  for call in calls:
    tok = np.concatenate([seqs[b][lo:hi] for b, (lo, hi) in enumerate(call)])
    pos = np.concatenate([np.arange(lo, hi) for lo, hi in call]).astype(np.int32)
    slots = np.concatenate([_slots(table, b, range(lo, hi), bs) for b, (lo, hi) in enumerate(call)])
    q_lens = [hi - lo for lo, hi in call]
    logits, cache = model(
      jnp.asarray(tok),
      jnp.asarray(pos),
      cache,
      block_table=jnp.asarray(table[: len(call)]),
      lengths=jnp.asarray(np.array([hi for _, hi in call], np.int32)),
      slot_mapping=jnp.asarray(slots),
      cu_q_lens=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
    )
    got = np.split(np.asarray(logits), np.cumsum(q_lens)[:-1])
    chex.assert_trees_all_close(got, [want[b][lo:hi] for b, (lo, hi) in enumerate(call)], **TOL)
    out.append(got)
  return out, cache


def test_decoder_paged_chunks_match_no_cache_forward():
  config = DecoderConfig(
    d_model=32, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=64
  )
  model = Decoder(config, rngs=nnx.Rngs(5))
  rng = np.random.default_rng(3)
  seqs = [rng.integers(0, 256, n).astype(np.int32) for n in (13, 7)]
  want = [np.asarray(model.forward(jnp.asarray(s)[None]))[0] for s in seqs]
  bs = 4
  table = _scatter_table(rng, [13, 7], bs, 12, 4)
  cache = model.init_cache(12, bs)
  _run_calls(model, cache, seqs, table, bs, ([(0, 9), (0, 7)], [(9, 13)]), want)


def test_forward_logit_rows_equals_full_forward_rows():
  model = Decoder(DecoderConfig(d_model=32, num_layers=2, head_dim=8, mlp_dim=64), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 20)), jnp.int32)
  rows = jnp.asarray([[19, 3], [0, 11]], jnp.int32)
  full = np.asarray(model.forward(tokens))
  got = np.asarray(model.forward(tokens, logit_rows=rows))
  np.testing.assert_allclose(got, np.take_along_axis(full, np.asarray(rows)[:, :, None], 1), **TOL)


@pytest.fixture(scope="module")
def tiny():
  return load_decoder()


def test_trained_checkpoint_writes_corpus_like_text(tiny):
  """The committed model learned the corpus: low loss on it and greedy text made of its words."""
  with open(TINY_CORPUS) as f:
    text = f.read()
  chunk = np.frombuffer(text[1000:1129].encode(), np.uint8).astype(np.int32)
  logits = tiny.forward(jnp.asarray(chunk[None, :-1]))
  nll = -np.mean(np.asarray(jax.nn.log_softmax(logits))[0, np.arange(128), chunk[1:]])
  assert nll < 0.7, f"{nll:.3f} nats/byte; uniform would be {np.log(256):.2f}"
  out = bytes(greedy_generate_no_cache(tiny, [list(b"the old man ")], 60)[0]).decode()
  words = set(text.replace(".", " ").split())
  got = out.replace(".", " ").split()[:-1]  # the last word may be cut off
  assert got and all(w in words for w in got), out


def test_contiguous_cache_generation_equals_no_cache_generation(tiny):
  prompts = [list(b"a young girl "), list(b"in the spring")]
  assert greedy_generate_dense_cache(tiny, prompts, 24) == greedy_generate_no_cache(
    tiny, prompts, 24
  )


def test_checkpoint_round_trip(tmp_path):
  config = DecoderConfig(
    d_model=16, num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32
  )
  model = Decoder(config, rngs=nnx.Rngs(9))
  save_decoder(model, str(tmp_path), {"note": "x"})
  loaded = load_decoder(str(tmp_path))
  assert loaded.config == config
  tokens = jnp.asarray([[1, 2, 3, 250]], jnp.int32)
  np.testing.assert_array_equal(loaded.forward(tokens), model.forward(tokens))


def test_swiglu_matches_numpy_float64():
  """One ``gate_up`` weight ``[d, 2f]``: ``[:, :f]`` is the gate's kernel, ``[:, f:]`` the
  up one's; the column blocks of ``set_shards`` give the same output and weight back."""
  mlp = SwiGLU(16, 24, rngs=nnx.Rngs(4))
  x = np.random.default_rng(2).standard_normal((2, 3, 16)).astype(np.float32)
  w = np.asarray(mlp.gate_up[...], np.float64)
  assert w.shape == (16, 48)
  g, u = x.astype(np.float64) @ w[:, :24], x.astype(np.float64) @ w[:, 24:]
  want = (g / (1.0 + np.exp(-g)) * u) @ np.asarray(mlp.down.kernel[...], np.float64)
  np.testing.assert_allclose(mlp(jnp.asarray(x)), want, **TOL)
  for shards in (2, 3, 4, 1):
    mlp.set_shards(shards)
    got = np.asarray(mlp.gate_up[...], np.float64)
    # Block s of the columns: gate columns [s f/n, (s+1) f/n), then the same up columns.
    per = 24 // shards
    for s in range(shards):
      block = got[:, 2 * s * per : 2 * (s + 1) * per]
      np.testing.assert_array_equal(block[:, :per], w[:, s * per : (s + 1) * per])
      np.testing.assert_array_equal(block[:, per:], w[:, 24 + s * per : 24 + (s + 1) * per])
    np.testing.assert_array_equal(mlp.canonical_gate_up(), w.astype(np.float32))
    np.testing.assert_allclose(mlp(jnp.asarray(x)), want, **TOL)
  with pytest.raises(ValueError, match="mlp_dim 24 is not a multiple of 5 shards"):
    mlp.set_shards(5)


@pytest.mark.parametrize(
  "dtype,param_dtype", [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")]
)
def test_swiglu_equals_two_linear_layers(dtype, param_dtype):
  """The one-weight MLP computes what nnx.Linear gate and up layers with the same kernels
  compute, dtype promotion included, bit for bit (one product over both is two products
  over the halves, element by element); its halves are LeCun-normal as nnx.Linear's."""
  dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
  mlp = SwiGLU(256, 512, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(6))
  assert mlp.gate_up[...].dtype == param_dtype
  kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  gate, up = nnx.Linear(256, 512, **kw), nnx.Linear(256, 512, **kw)
  gate.kernel[...] = mlp.gate_up[...][:, :512]
  up.kernel[...] = mlp.gate_up[...][:, 512:]
  x = jax.random.normal(jax.random.key(3), (5, 256), jnp.float32)
  want = mlp.down(jax.nn.silu(gate(x)) * up(x))
  got = mlp(x)
  assert got.dtype == want.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  # LeCun normal over fan-in 256: standard deviation 1/16 in each half (131,072 draws each).
  w = np.asarray(mlp.gate_up[...], np.float64)
  for half in (w[:, :512], w[:, 512:]):
    assert abs(half.std() * 16 - 1) < 0.03


def test_qkv_column_blocks_follow_whole_heads():
  """``qkv`` ``[d, (Hq + 2 Hkv) D]``: with ``shards`` n, block s holds q heads
  ``[s Hq/n, (s+1) Hq/n)``, then the same share of k heads, then of v heads; the layer's
  output (against the float64 oracle) and ``canonical_qkv`` do not change, and a sharded
  model saves the one-device order."""
  attn = PagedAttention(16, 8, 4, 4, rngs=nnx.Rngs(2))
  w = np.asarray(attn.qkv[...])
  assert w.shape == (16, (8 + 2 * 4) * 4)
  q, k, v = np.split(w, [32, 48], axis=1)
  xs = [np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)]
  want = _np_layer(attn, xs, 10_000.0)[0]
  for shards in (2, 4, 1):
    attn.set_shards(shards)
    got = np.asarray(attn.qkv[...])
    qs, ks = 32 // shards, 16 // shards  # columns of each part in one block
    for s in range(shards):
      block = got[:, s * (qs + 2 * ks) : (s + 1) * (qs + 2 * ks)]
      np.testing.assert_array_equal(block[:, :qs], q[:, s * qs : (s + 1) * qs])
      np.testing.assert_array_equal(block[:, qs : qs + ks], k[:, s * ks : (s + 1) * ks])
      np.testing.assert_array_equal(block[:, qs + ks :], v[:, s * ks : (s + 1) * ks])
    np.testing.assert_array_equal(attn.canonical_qkv(), w)
    x = jnp.asarray(xs[0])
    out = attn.dense(x[None], jnp.arange(5, dtype=jnp.int32)[None])[0]
    np.testing.assert_allclose(out, want, **TOL)
  # 8 query / 4 KV heads on 3 devices: KV heads copied unevenly, queries gathered.
  with pytest.raises(ValueError, match="8 query / 4 KV heads do not split into 3 blocks"):
    attn.set_shards(3)
  assert attn.shards == 1
  np.testing.assert_array_equal(attn.qkv[...], w)  # nothing changed by the refusal


@pytest.mark.parametrize("shards", [4, 8])
def test_qkv_column_blocks_copy_kv_heads_over_devices(shards):
  """8 query / 2 KV heads on 4 or 8 devices (``HeadLayout``: each KV head copied on 2 or 4
  devices, the query layout the identity): block s holds q heads ``[s 8/n, (s+1) 8/n)``
  and the k and v of KV head ``s // (n / 2)``, the pool head device s holds. ``_qkv`` gives
  the model's KV heads, or with ``pool_heads`` each pool head's; outputs do not change."""
  attn = PagedAttention(16, 8, 2, 4, rngs=nnx.Rngs(4))
  w = np.asarray(attn.qkv[...])
  q, k, v = np.split(w, [32, 40], axis=1)
  xs = [np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)]
  want = _np_layer(attn, xs, 10_000.0)[0]
  x, pos = jnp.asarray(xs[0]), jnp.arange(5, dtype=jnp.int32)
  q1, k1, v1 = attn._qkv(x, pos)
  attn.set_shards(shards)
  got = np.asarray(attn.qkv[...])
  qs = 32 // shards
  assert got.shape == (16, shards * (qs + 2 * 4))
  for s in range(shards):
    h = s // (shards // 2)
    block = got[:, s * (qs + 8) : (s + 1) * (qs + 8)]
    np.testing.assert_array_equal(block[:, :qs], q[:, s * qs : (s + 1) * qs])
    np.testing.assert_array_equal(block[:, qs : qs + 4], k[:, h * 4 : (h + 1) * 4])
    np.testing.assert_array_equal(block[:, qs + 4 :], v[:, h * 4 : (h + 1) * 4])
  np.testing.assert_array_equal(attn.canonical_qkv(), w)
  q2, k2, v2 = attn._qkv(x, pos)
  for a, b in ((q1, q2), (k1, k2), (v1, v2)):
    np.testing.assert_allclose(a, b, **TOL)
  _, kp, vp = attn._qkv(x, pos, pool_heads=True)
  pool_kv = np.arange(shards) // (shards // 2)
  assert kp.shape == (5, shards, 4)
  np.testing.assert_allclose(kp, np.asarray(k1)[:, pool_kv], **TOL)
  np.testing.assert_allclose(vp, np.asarray(v1)[:, pool_kv], **TOL)
  out = attn.dense(x[None], pos[None])[0]
  np.testing.assert_allclose(out, want, **TOL)
  attn.set_shards(1)
  np.testing.assert_array_equal(attn.qkv[...], w)


@pytest.mark.parametrize(
  "dtype,param_dtype", [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")]
)
def test_qkv_equals_three_linear_layers(dtype, param_dtype):
  """The one q/k/v product equals nnx.Linear q, k and v layers with the same kernels,
  dtype promotion included, bit for bit; each part is LeCun-normal as nnx.Linear's."""
  dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
  hq, hkv, d = 8, 2, 32
  attn = PagedAttention(
    256, hq, hkv, d, rope_theta=None, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(6)
  )
  assert attn.qkv[...].dtype == param_dtype
  kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  parts = np.split(np.asarray(attn.qkv[...], np.float32), [hq * d, (hq + hkv) * d], axis=1)
  x = jax.random.normal(jax.random.key(3), (5, 256), jnp.float32)
  got = attn._qkv(x, jnp.zeros(5, jnp.int32))
  for part, heads, out in zip(parts, (hq, hkv, hkv), got, strict=True):
    lin = nnx.Linear(256, heads * d, **kw)
    lin.kernel[...] = jnp.asarray(part, param_dtype)
    want = lin(x).reshape(5, heads, d)
    assert out.dtype == want.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
    # LeCun normal over fan-in 256: standard deviation 1/16 (16,384 draws or more each).
    assert abs(part.astype(np.float64).std() * 16 - 1) < 0.03


def test_checkpoint_with_separate_projection_kernels_loads(tmp_path):
  """A file saved before gate and up (``mlp.gate.kernel``, ``mlp.up.kernel``) and q, k and
  v (``attn.q_proj.kernel``, ...) became one weight each loads into ``gate_up`` and
  ``qkv`` and gives the saved model's logits; a file with part of an old form is
  refused."""
  from flax import serialization

  config = DecoderConfig(
    d_model=16, num_layers=2, num_q_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32
  )
  model = Decoder(config, rngs=nnx.Rngs(5))
  save_decoder(model, str(tmp_path))
  meta = json.loads((tmp_path / "config.json").read_text())
  assert meta["format"] == 2
  del meta["format"]  # files of that time had no format key (format 1)
  (tmp_path / "config.json").write_text(json.dumps(meta))
  path = tmp_path / "params.msgpack"
  saved = path.read_bytes()
  params = serialization.msgpack_restore(saved)
  for layer in params["layers"].values():
    gate_up = layer["mlp"].pop("gate_up")
    layer["mlp"]["gate"] = {"kernel": gate_up[:, :32]}
    layer["mlp"]["up"] = {"kernel": gate_up[:, 32:]}
    qkv = layer["attn"].pop("qkv")  # 2 query heads of 8, then 1 KV head's k and v
    for name, cols in (
      ("q_proj", slice(0, 16)),
      ("k_proj", slice(16, 24)),
      ("v_proj", slice(24, 32)),
    ):
      layer["attn"][name] = {"kernel": qkv[:, cols]}
  path.write_bytes(serialization.msgpack_serialize(params))
  loaded = load_decoder(str(tmp_path))
  for a, b in zip(loaded.layers, model.layers, strict=True):
    np.testing.assert_array_equal(a.mlp.gate_up[...], b.mlp.gate_up[...])
    np.testing.assert_array_equal(a.attn.qkv[...], b.attn.qkv[...])
  tokens = jnp.asarray([[1, 2, 3, 250]], jnp.int32)
  np.testing.assert_array_equal(loaded.forward(tokens), model.forward(tokens))
  del params["layers"][0]["attn"]["v_proj"]
  path.write_bytes(serialization.msgpack_serialize(params))
  with pytest.raises(ValueError, match="layer 0's attn holds \\['k_proj', 'o_proj', 'q_proj'\\]"):
    load_decoder(str(tmp_path))
  del params["layers"][1]["mlp"]["up"]
  params["layers"][0]["attn"]["v_proj"] = {"kernel": np.zeros((16, 8), np.float32)}
  path.write_bytes(serialization.msgpack_serialize(params))
  with pytest.raises(ValueError, match="layer 1's mlp holds \\['down', 'gate'\\]"):
    load_decoder(str(tmp_path))


def test_a_checkpoint_of_another_format_or_other_parameters_is_refused(tmp_path):
  """load_decoder names what does not fit: a format it does not read, a parameter missing
  or unexpected (the old separate kernels in a format-2 file), a shape; the model loads
  once the file is put back."""
  from flax import serialization

  config = DecoderConfig(
    d_model=16, num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32
  )
  model = Decoder(config, rngs=nnx.Rngs(6))
  save_decoder(model, str(tmp_path))
  cfg, path = tmp_path / "config.json", tmp_path / "params.msgpack"
  meta, saved = json.loads(cfg.read_text()), path.read_bytes()
  for fmt in (3, 0, "2", True, 2.0):
    cfg.write_text(json.dumps(dict(meta, format=fmt)))
    with pytest.raises(
      ValueError, match=f"checkpoint format {fmt!r}; .* reads formats 1 to 2"
    ) as e:
      load_decoder(str(tmp_path))
    assert ("newer paxcache" in str(e.value)) == (fmt == 3), e.value
  cfg.write_text(json.dumps(meta))
  params = serialization.msgpack_restore(saved)
  params["layers"][0]["attn"]["q_proj"] = {"kernel": np.zeros((16, 16), np.float32)}
  del params["final_norm"]
  path.write_bytes(serialization.msgpack_serialize(params))
  with pytest.raises(
    ValueError,
    match=r"params.msgpack: the parameters are not those of the model .*: "
    r"missing \['final_norm/scale'\], unexpected \['layers/0/attn/q_proj/kernel'\]",
  ):
    load_decoder(str(tmp_path))
  params = serialization.msgpack_restore(saved)
  params["layers"] = {"0": params["layers"][0]}  # the model's layer keys are ints
  params["embed"]["extra"] = {}  # no leaves, but not the model's tree either
  path.write_bytes(serialization.msgpack_serialize(params))
  with pytest.raises(
    ValueError,
    match=r"missing \[.*'layers/0/attn/qkv'.*\], unexpected \['embed/extra/{}', "
    r"\"layers/'0'/attn/o_proj/kernel\"",
  ):
    load_decoder(str(tmp_path))
  params = serialization.msgpack_restore(saved)
  params["layers"][0]["attn"]["qkv"] = params["layers"][0]["attn"]["qkv"][:, :24]
  path.write_bytes(serialization.msgpack_serialize(params))
  with pytest.raises(ValueError, match=r"parameter layers/0/attn/qkv is \(16, 24\) in the file"):
    load_decoder(str(tmp_path))
  path.write_bytes(saved)
  tokens = jnp.asarray([[3, 1, 4]], jnp.int32)
  np.testing.assert_array_equal(load_decoder(str(tmp_path)).forward(tokens), model.forward(tokens))


def test_a_sharded_models_checkpoint_loads_on_one_device(tmp_path):
  """save_decoder writes gate/up and q/k/v in the one-device column order whatever
  ``shards`` the model runs with (``shard_model`` sets it to the mesh size)."""
  config = DecoderConfig(
    d_model=16, num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32
  )
  model = Decoder(config, rngs=nnx.Rngs(7))
  tokens = jnp.asarray([[5, 6, 7]], jnp.int32)
  want = model.forward(tokens)
  model.layers[0].mlp.set_shards(4)
  model.layers[0].attn.set_shards(2)  # the one KV head copied in both blocks
  with pytest.raises(ValueError, match="2 query / 1 KV heads do not split into 4 blocks"):
    model.layers[0].attn.set_shards(4)  # queries would be padded
  np.testing.assert_allclose(model.forward(tokens), want, **TOL)
  save_decoder(model, str(tmp_path))
  loaded = load_decoder(str(tmp_path))
  assert loaded.layers[0].mlp.shards == 1 and loaded.layers[0].attn.shards == 1
  np.testing.assert_array_equal(loaded.forward(tokens), want)


def test_tiny_checkpoint_and_corpus_are_declared_package_data():
  """The default checkpoint and its corpus live inside the paxcache package, and every file
  there is declared as package data in pyproject.toml, so a wheel carries them."""
  package = pathlib.Path(paxcache.__file__).resolve().parent
  fixtures = pathlib.Path(TINY_CHECKPOINT).parent
  assert fixtures == package / "_fixtures"
  assert pathlib.Path(TINY_CORPUS).parent == fixtures
  files = sorted(
    p.relative_to(fixtures).as_posix()
    for p in fixtures.rglob("*")
    if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
  )
  assert files == ["tiny/config.json", "tiny/params.msgpack", "tiny_corpus.txt"]
  pyproject = tomllib.loads((package.parent / "pyproject.toml").read_text())
  assert sorted(pyproject["tool"]["setuptools"]["package-data"]["paxcache._fixtures"]) == files


def test_load_decoder_default_works_from_the_packages_alone(tmp_path, tiny):
  """What a non-editable install holds: the packages and their data, no repo root. A copy
  of paxcache/ and kernels/ alone, imported from elsewhere, loads the packaged model."""
  package = pathlib.Path(paxcache.__file__).resolve().parent
  site = tmp_path / "site"
  for name in ("paxcache", "kernels"):
    shutil.copytree(
      package.parent / name, site / name, ignore=shutil.ignore_patterns("__pycache__")
    )
  code = (
    "import json, paxcache, jax.numpy as jnp\n"
    "from paxcache.nn import TINY_CHECKPOINT, load_decoder\n"
    "logits = load_decoder().forward(jnp.asarray([[116, 104, 101, 32]], jnp.int32))\n"
    "print(json.dumps([paxcache.__file__, TINY_CHECKPOINT, logits[0, -1, :8].tolist()]))\n"
  )
  env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-2000:]
  module, checkpoint, logits = json.loads(out.stdout.strip().splitlines()[-1])
  assert module.startswith(str(site)) and checkpoint.startswith(str(site))
  want = tiny.forward(jnp.asarray([[116, 104, 101, 32]], jnp.int32))[0, -1, :8]
  np.testing.assert_allclose(logits, np.asarray(want), **TOL)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    PagedAttention(16, 3, 2, 8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="backend"):
    PagedAttention(16, 2, 1, 8, backend="cuda", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_q_heads"):
    DecoderConfig(num_q_heads=4, num_kv_heads=3)
  layer = PagedAttention(16, 2, 1, 8, rngs=nnx.Rngs(0))
  cache = PagedKVCache.create(2, 1, 4, 4, 8)
  args = _one_token_args()
  x, pos = jnp.zeros((1, 16)), jnp.zeros((1,), jnp.int32)
  with pytest.raises(ValueError, match="layer"):
    layer(x, pos, cache, **args)
  with pytest.raises(ValueError, match=r"x must be \[num_tokens, d_model\]"):
    layer(jnp.zeros((1, 1, 16)), pos, cache, layer=0, **args)


def test_x_of_the_wrong_width_is_named_before_any_projection():
  """x's last dim != d_model used to fail deep inside a dot_general of the q projection."""
  layer = PagedAttention(16, 2, 1, 8, rngs=nnx.Rngs(0))
  assert layer.d_model == 16
  cache = PagedKVCache.create(2, 1, 4, 4, 8)
  args = _one_token_args()
  pos = jnp.zeros((1,), jnp.int32)
  with pytest.raises(
    ValueError, match=r"x must be \[num_tokens, d_model\] with d_model=16, got x.shape \(1, 12\)"
  ):
    layer(jnp.zeros((1, 12)), pos, cache, layer=0, **args)
  with pytest.raises(ValueError, match=r"with d_model=16, got x.shape \(1, 12\)"):
    layer(jnp.zeros((1, 12)), pos, (cache.k[0], cache.v[0]), **args)
  with pytest.raises(
    ValueError, match=r"x must be \[batch, seq, d_model\] with d_model=16, got x.shape \(1, 3, 8\)"
  ):
    layer.dense(jnp.zeros((1, 3, 8)), jnp.zeros((1, 3), jnp.int32))
  with pytest.raises(ValueError, match=r"x must be \[batch, seq, d_model\] .* \(3, 16\)"):
    layer.dense(jnp.zeros((3, 16)), jnp.zeros((3,), jnp.int32))
  # The right width runs (a refused call changed nothing: the module holds no state but
  # its parameters).
  out, _ = layer(jnp.ones((1, 16)), pos, cache, layer=0, **args)
  assert out.shape == (1, 16)
  assert layer.dense(jnp.ones((1, 3, 16)), jnp.arange(3)[None]).shape == (1, 3, 16)


def test_a_cache_of_other_heads_is_named_at_the_layer():
  """Pools whose head_dim or KV heads are not the layer's used to fail in the cache write,
  naming k_new/v_new (arrays the caller never passed); the layer names its cache, and a
  refused call changes nothing."""
  layer = PagedAttention(16, 2, 1, 8, rngs=nnx.Rngs(0))  # 1 KV head of head_dim 8
  args = _one_token_args()
  x, pos = jnp.ones((1, 16)), jnp.zeros((1,), jnp.int32)
  for fused in (True, False):
    call = functools.partial(layer, x, pos, fused_write=fused, **args)
    wrong_dim = PagedKVCache.create(2, 1, 4, 4, 4)
    with pytest.raises(
      ValueError,
      match=r"the PagedKVCache has 1 KV heads of head_dim 4; this layer has 1 KV heads of "
      r"head_dim 8",
    ):
      call(wrong_dim, layer=0)
    with pytest.raises(ValueError, match=r"the pools \(2, 4, 4, 8\) have 2 KV heads of head_dim 8"):
      call(PagedKVCache.create(2, 2, 4, 4, 8).layer(0))
    with pytest.raises(ValueError, match=r"the pools \(1, 4, 4, 4\) have 1 KV heads of head_dim 4"):
      call(wrong_dim.layer(0))
    with pytest.raises(ValueError, match=r"cache must be a PagedKVCache or this layer's"):
      call((wrong_dim.k[0], wrong_dim.v[0][..., :2]))
    with pytest.raises(ValueError, match=r"cache must be a PagedKVCache or this layer's"):
      call((wrong_dim.k[0],))
    with pytest.raises(ValueError, match=r"got ndarray"):
      call(np.zeros((1, 4, 4, 8), np.float32))
    # Refused before anything ran: the wrong cache is neither written nor donated.
    np.testing.assert_array_equal(np.asarray(wrong_dim.k[0]), 0)
    # The layer's own shapes run, on either kind of cache, after the refusals.
    good = PagedKVCache.create(2, 1, 4, 4, 8)
    out, new = call(good, layer=0)
    assert out.shape == (1, 16) and isinstance(new, PagedKVCache)
    # (the call donated good's pools: a fresh, equal cache for the pair)
    out2, pools = call(PagedKVCache.create(2, 1, 4, 4, 8).layer(0))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
    assert pools[0].shape == (1, 4, 4, 8)


def test_unavailable_backend_raises_instead_of_falling_back():
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  layer = PagedAttention(16, 2, 1, 8, backend="gpu", rngs=nnx.Rngs(0))
  with pytest.raises(kernels.BackendUnavailableError):
    layer(
      jnp.zeros((1, 16)),
      jnp.zeros((1,), jnp.int32),
      PagedKVCache.create(1, 1, 4, 4, 8),
      layer=0,
      block_table=jnp.zeros((1, 2), jnp.int32),
      lengths=jnp.ones((1,), jnp.int32),
      slot_mapping=jnp.zeros((1,), jnp.int32),
    )


def test_readme_snippet_user_block_with_paged_attention():
  """The README's drop-in example, checked against the no-cache path of the same layer."""

  class MyBlock(nnx.Module):
    def __init__(self, rngs):
      self.attn = PagedAttention(d_model=64, num_q_heads=4, num_kv_heads=2, head_dim=16, rngs=rngs)
      self.mlp = nnx.Linear(64, 64, rngs=rngs)

    def __call__(self, x, positions, kv, **paged):  # kv: this layer's (k_blocks, v_blocks)
      h, kv = self.attn(x, positions, kv, **paged)  # writes the new K/V, runs paged attention
      return x + self.mlp(x + h), kv

  block = MyBlock(nnx.Rngs(0))
  kv = (jnp.zeros((2, 16, 8, 16)),) * 2  # [num_kv_heads, num_blocks, block_size, head_dim]
  x = jax.random.normal(jax.random.key(1), (5, 64))
  y, kv = block(
    x,
    jnp.arange(5),
    kv,  # 5 prompt tokens of one sequence, blocks 3 and 7
    block_table=jnp.array([[3, 7]]),
    lengths=jnp.array([5]),
    slot_mapping=jnp.array([24, 25, 26, 27, 28]),
    cu_q_lens=jnp.array([0, 5]),
  )
  h = block.attn.dense(x[None], jnp.arange(5)[None])[0]
  np.testing.assert_allclose(y, x + block.mlp(x + h), **TOL)
  k = np.asarray(kv[0])
  # Slots 24..28 are offsets 0..4 of block 3 (block_size 8); nothing else is written.
  assert np.abs(k[:, 3, :5]).sum(-1).all()
  assert not k[:, 3, 5:].any() and not np.delete(k, 3, axis=1).any()


def test_train_tiny_script_learns():
  """experiments/train_tiny.py's loop (few steps, small model) lowers the loss well below
  uniform: the script that made the packaged tiny checkpoint still works."""
  from experiments.train_tiny import encode, train

  with open(TINY_CORPUS) as f:
    data = np.asarray(encode(f.read()[:20_000]), np.int32)
  config = DecoderConfig(
    d_model=32, num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=64
  )
  _, losses = train(config, data, steps=40, batch_size=8, seq_len=32, learning_rate=1e-2, seed=0)
  assert losses[0] > 5.0  # ~log(256) at initialisation
  assert np.mean(losses[-5:]) < 3.2, losses[-5:]


def test_param_dtype_bfloat16_stores_weights_in_bf16_and_computes_like_rounded_float32():
  """param_dtype="bfloat16" keeps every projection and the embedding in bf16 (half the bytes
  a decode step reads); with float32 activations it computes exactly what the float32 model
  computes on the same weights rounded to bf16."""
  base = dict(
    d_model=32, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=32
  )
  bf16 = Decoder(DecoderConfig(**base, param_dtype="bfloat16"), rngs=nnx.Rngs(3))
  f32 = Decoder(DecoderConfig(**base), rngs=nnx.Rngs(3))
  params = nnx.state(bf16, nnx.Param)
  kinds = {leaf.dtype for leaf in jax.tree.leaves(params) if leaf.ndim == 2}
  assert kinds == {jnp.dtype(jnp.bfloat16)}  # every matrix (norm scales are vectors)
  rounded = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  nnx.update(f32, rounded)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 9)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(bf16.forward(tokens)), np.asarray(f32.forward(tokens)))
  with pytest.raises(ValueError, match=r"param_dtype must be a floating dtype, got 'int8'"):
    DecoderConfig(**base, param_dtype="int8")
  with pytest.raises(ValueError, match=r"param_dtype must be a dtype name, got 'bf17'"):
    DecoderConfig(**base, param_dtype="bf17")
  # kv_dtype: what a cache holds and the kernels read (kernels.check_kv_dtype), refused at
  # the config rather than at the first attention call.
  for bad in ("float64", "float8_e5m2", "int32", "bf17"):
    with pytest.raises(ValueError, match=r"DecoderConfig.kv_dtype must be one of float32, "):
      DecoderConfig(**base, kv_dtype=bad)


@pytest.mark.parametrize("backend", ["reference", "tpu"])
def test_decoder_over_a_lane_dense_cache_matches_no_cache_forward(backend):
  # head_dim 64 in rows of 128 (Decoder.init_cache(lane_dense=True)): the cache writes and
  # the attention of every backend read it like the plain cache; the TPU kernels (in TPU
  # interpret mode) read the packed rows as they are. Chunked prefill, then a decode.
  config = DecoderConfig(
    d_model=32, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=64, max_seq_len=64
  )
  model = Decoder(config, backend=backend, interpret=backend == "tpu", rngs=nnx.Rngs(6))
  rng = np.random.default_rng(4)
  seqs = [rng.integers(0, 256, n).astype(np.int32) for n in (21, 10)]
  want = [np.asarray(model.forward(jnp.asarray(s)[None]))[0] for s in seqs]
  bs = 16  # 8 rows of 128 a block: a float32 sublane tile
  table = _scatter_table(rng, [21, 10], bs, 6, 2)
  cache = model.init_cache(6, bs, lane_dense=True)
  assert cache.k[0].shape == (2, 6, 8, 128)
  calls = ([(0, 12), (0, 9)], [(12, 20), (9, 10)], [(20, 21)])
  _, cache = _run_calls(model, cache, seqs, table, bs, calls, want)
  assert cache.lane_dense


@pytest.mark.parametrize("backend", ["reference", "gpu", "tpu"])
def test_decoder_over_a_lane_padded_cache_matches_the_plain_cache_and_no_cache(backend):
  # head_dim 80 in rows of 128 (Decoder.init_cache(lane_padded=True)): chunked prefill, then
  # a decode. On the reference and GPU backends (GPU in interpret mode) the logits are the
  # plain cache's; on the TPU backend (TPU interpret mode), which refuses a plain head_dim
  # 80 pool, the lane-padded one is how the model runs at all. Every backend's logits match
  # the no-cache forward.
  config = DecoderConfig(
    d_model=32, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=80, mlp_dim=64, max_seq_len=64
  )
  model = Decoder(config, backend=backend, interpret=backend != "reference", rngs=nnx.Rngs(7))
  rng = np.random.default_rng(5)
  seqs = [rng.integers(0, 256, n).astype(np.int32) for n in (21, 10)]
  want = [np.asarray(model.forward(jnp.asarray(s)[None]))[0] for s in seqs]
  bs = 8  # a float32 sublane tile
  table = _scatter_table(rng, [21, 10], bs, 6, 3)
  calls = ([(0, 12), (0, 9)], [(12, 20), (9, 10)], [(20, 21)])

  def run(cache):
    return _run_calls(model, cache, seqs, table, bs, calls, want)

  cache = model.init_cache(6, bs, lane_padded=True)
  assert cache.k[0].shape == (2, 6, bs, 128) and cache.head_dim == 80
  padded, cache = run(cache)
  assert cache.lane_padded
  assert all((np.asarray(p)[..., 80:] == 0).all() for p in cache.k + cache.v)
  if backend == "tpu":
    with pytest.raises(ValueError, match="lane_padded=True"):
      run(model.init_cache(6, bs))
  else:
    plain, _ = run(model.init_cache(6, bs))
    chex.assert_trees_all_close(padded, plain, **TOL)


def _bf16_config(**kw):
  base = dict(
    vocab_size=256,
    d_model=64,
    num_layers=2,
    num_q_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=192,
    dtype="bfloat16",
    param_dtype="bfloat16",
  )
  return DecoderConfig(**{**base, **kw})


def _pallas_calls(fn, *args) -> list[str]:
  text = str(jax.make_jaxpr(fn)(*args))
  return [line for line in text.splitlines() if "pallas_call" in line]


def test_gemm_pallas_projections_match_xla_and_run_the_kernel(monkeypatch):
  """gemm="pallas" (interpret mode) runs every projection (q/k/v, o, gate/up, down) through
  kernels.gpu.matmul and gives XLA's logits within bf16 rounding; "auto" on the CPU and
  "xla" run no Pallas product."""
  config = _bf16_config()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 9)), jnp.int32)
  models = {
    g: Decoder(config, gemm=g, interpret=g == "pallas", rngs=nnx.Rngs(1))
    for g in ("xla", "auto", "pallas")
  }
  logits = {g: np.asarray(m.forward(tokens), np.float64) for g, m in models.items()}
  np.testing.assert_array_equal(logits["auto"], logits["xla"])
  # The kernels sum float32 products in their own order (split-K partials), and the fused
  # SwiGLU front rounds once after the activation where XLA rounds the product before it:
  # the logits may differ by bf16 roundings of the activations between layers, well under
  # 2% of their scale.
  scale = np.abs(logits["xla"]).max()
  assert np.abs(logits["pallas"] - logits["xla"]).max() < 0.02 * scale
  shapes = []
  real = gpu_matmul.skinny_matmul
  monkeypatch.setattr(
    gpu_matmul, "skinny_matmul", lambda x, w, *a, **k: shapes.append(w.shape) or real(x, w, *a, **k)
  )
  real_swiglu = gpu_matmul.swiglu_matmul
  monkeypatch.setattr(
    gpu_matmul,
    "swiglu_matmul",
    lambda x, w, **k: shapes.append(("swiglu", w.shape)) or real_swiglu(x, w, **k),
  )
  models["pallas"].forward(tokens)
  d, f, width = config.d_model, config.mlp_dim, (4 + 2 * 2) * 16
  # gate/up with the activation in one kernel (kernels.gpu.matmul.swiglu_matmul)
  assert shapes == [(d, width), (4 * 16, d), ("swiglu", (d, 2 * f)), (f, d)] * config.num_layers
  assert _pallas_calls(models["pallas"].forward, tokens)
  assert not _pallas_calls(models["auto"].forward, tokens)
  assert not _pallas_calls(models["xla"].forward, tokens)


def test_gemm_errors():
  with pytest.raises(ValueError, match="gemm must be one of"):
    Decoder(_bf16_config(), gemm="cublas", rngs=nnx.Rngs(0))
  tokens = jnp.zeros((1, 4), jnp.int32)
  # float32 weights: the kernel takes 16-bit inputs only (no silent fallback).
  f32 = Decoder(_bf16_config(dtype="float32", param_dtype="float32"), gemm="pallas",
                interpret=True, rngs=nnx.Rngs(0))  # fmt: skip
  with pytest.raises(ValueError, match="bf16 or f16"):
    f32.forward(tokens)
  # Off a GPU without interpret mode.
  with pytest.raises(kernels.BackendUnavailableError, match="needs a GPU"):
    Decoder(_bf16_config(), gemm="pallas", rngs=nnx.Rngs(0)).forward(tokens)
  # More rows than the kernel takes.
  model = Decoder(_bf16_config(), gemm="pallas", interpret=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="at most 256 rows"):  # (kernels.gpu.matmul.FIT_MAX_ROWS)
    model.forward(jnp.zeros((2, 129), jnp.int32))
  # A weight that is not [K, N].
  with pytest.raises(ValueError, match=r"takes x \[..., K\] and w \[K, N\]"):
    paxcache.nn.project(jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8,), jnp.bfloat16), gemm="pallas")
  # SwiGLU's fused front (gate/up and the activation in one kernel) where it cannot tile:
  # an MLP width that is not a multiple of 16.
  mlp = paxcache.nn.SwiGLU(
    64, 40, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, gemm="pallas", interpret=True,
    rngs=nnx.Rngs(0),
  )  # fmt: skip
  with pytest.raises(ValueError, match=r"cannot run SwiGLU's 3 rows x \[64, 2 x 40\]"):
    mlp(jnp.ones((3, 64), jnp.bfloat16))
  # A weight split over a mesh (shard_model and Decoder(mesh=) mark the MLP): an error.
  model.layers[0].mlp.mesh = object()
  with pytest.raises(ValueError, match="does not run under a mesh"):
    model.forward(tokens)


def test_a_mesh_marks_the_mlp():
  """Decoder(mesh=) and shard_model set the MLP's mesh, so that its products are XLA's
  (paxcache.nn.project's sharded) like the attention's."""
  from jax.sharding import Mesh

  from paxcache.sharding import shard_model

  mesh = Mesh(np.asarray(jax.devices()[:1]), ("model",))
  assert Decoder(_bf16_config(), mesh=mesh, rngs=nnx.Rngs(0)).layers[1].mlp.mesh is mesh
  model = Decoder(_bf16_config(), rngs=nnx.Rngs(0))
  assert model.layers[0].mlp.mesh is None
  shard_model(model, mesh)
  assert all(layer.mlp.mesh is mesh for layer in model.layers)


def test_gemm_pallas_with_several_splits_in_the_model(monkeypatch):
  """With the rule's launches of several K slices (its SM count faked to 64, so that these
  small weights get 2-4 splits), the model's logits stay XLA's within bf16 rounding."""
  monkeypatch.setattr(gpu_matmul, "_num_sms", lambda: 64)
  config = _bf16_config(d_model=512, num_q_heads=8, num_kv_heads=2, head_dim=64, mlp_dim=1024,
                        num_layers=1)  # fmt: skip
  taken = []
  real = gpu_matmul.skinny_matmul
  monkeypatch.setattr(
    gpu_matmul, "skinny_matmul", lambda x, w, s, **k: taken.append(s.splits) or real(x, w, s, **k)
  )
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 9)), jnp.int32)
  got = np.asarray(Decoder(config, gemm="pallas", interpret=True, rngs=nnx.Rngs(3)).forward(tokens))
  want = np.asarray(Decoder(config, gemm="xla", rngs=nnx.Rngs(3)).forward(tokens))
  assert taken == [2, 2, 4]  # q/k/v, o, down (gate/up: swiglu_matmul, unsplit)
  assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def test_gemm_auto_takes_the_kernel_only_where_its_rule_has_a_launch(monkeypatch):
  """ "auto" on a GPU (faked here: the product is a spy): the Pallas product for 16-bit
  inputs, at most 128 rows and weights of at most 32 MiB with a launch
  (kernels.gpu.matmul.matmul_settings); XLA's product for more rows, larger weights,
  float32, under a mesh, and on this CPU."""
  from paxcache.nn import project

  taken = []

  def spy(x, w, settings, **k):
    taken.append((x.shape[0], w.shape, settings))
    return jnp.dot(x, w, preferred_element_type=jnp.float32)

  monkeypatch.setattr(gpu_matmul, "skinny_matmul", spy)

  def swiglu_spy(x, w, *, mlp, settings, **k):
    taken.append((x.shape[0], ("swiglu", w.shape), settings))
    h = jnp.dot(x, w, preferred_element_type=jnp.float32)
    return (jax.nn.silu(h[:, :mlp]) * h[:, mlp:]).astype(x.dtype)

  monkeypatch.setattr(gpu_matmul, "swiglu_matmul", swiglu_spy)
  w = jnp.ones((576, 960), jnp.bfloat16)  # SmolLM2's q/k/v: a launch at 1-128 rows
  x = jnp.ones((64, 576), jnp.bfloat16)
  project(x, w, gemm="auto")
  assert taken == []  # this CPU: XLA's product
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  out = project(x, w, gemm="auto")
  assert out.dtype == jnp.bfloat16 and out.shape == (64, 960)
  # x is promoted to the computation dtype first, as nnx.Linear does.
  assert project(x.astype(jnp.float32), w, dtype=jnp.bfloat16, gemm="auto").dtype == jnp.bfloat16
  assert taken[0] == (64, (576, 960), gpu_matmul.matmul_settings(64, 576, 960))
  project(jnp.ones((2, 3, 576), jnp.bfloat16), w, gemm="auto")  # leading axes flattened
  assert taken[-1][0] == 6
  n = len(taken)
  project(jnp.ones((129, 576), jnp.bfloat16), w, gemm="auto")  # too many rows
  project(x.astype(jnp.float32), w.astype(jnp.float32), gemm="auto")  # float32
  project(x, w, gemm="auto", sharded=True)  # a mesh splits the weight
  project(x, w.astype(jnp.float32), dtype=jnp.bfloat16, gemm="auto")  # a cast of f32 weights
  project(x, jnp.ones((576, 576), jnp.bfloat16), gemm="auto")  # SmolLM2's o: no launch
  project(jnp.ones((64, 2048), jnp.bfloat16), jnp.ones((2048, 16384), jnp.bfloat16), gemm="auto")
  project(x, w, gemm="xla")
  assert len(taken) == n
  big = jnp.ones((8192, 2048), jnp.bfloat16)  # the 1B shape's down: 32 MiB, the cap
  project(jnp.ones((64, 8192), jnp.bfloat16), big, gemm="auto")
  assert taken[n:] == [(64, (8192, 2048), gpu_matmul.matmul_settings(64, 8192, 2048))]
  n = len(taken)
  # The model: every product with a launch takes the kernel (an SM count of 64 gives these
  # small weights launches), but not in a bf16 model with float32 weights (its products are
  # casts of them: XLA's).
  monkeypatch.setattr(gpu_matmul, "_num_sms", lambda: 64)
  shape = dict(d_model=512, num_q_heads=8, num_kv_heads=2, head_dim=64, mlp_dim=1024)
  tokens = jnp.zeros((1, 4), jnp.int32)
  model = Decoder(_bf16_config(**shape), gemm="auto", rngs=nnx.Rngs(0))
  model.forward(tokens)
  assert len(taken) == n + 4 * 2  # q/k/v, o, gate/up, down; two layers
  # 4 rows: SwiGLU's front is the split-K product, then XLA's activation (the fused
  # kernel's rule starts at 32 rows); 32 rows on a Hopper GPU: the fused kernel
  # (swiglu_matmul), which its rule's launches are for.
  assert [t[1] for t in taken[n : n + 4]] == [(512, 768), (512, 512), (512, 2048), (1024, 512)]
  model.forward(jnp.zeros((1, 32), jnp.int32))  # not Hopper (this CPU's device): no
  assert ("swiglu", (512, 2048)) not in [t[1] for t in taken]
  n = len(taken)
  monkeypatch.setattr(kernels.gpu, "is_hopper", lambda device=None: True)
  model.forward(jnp.zeros((1, 32), jnp.int32))
  assert [t[1] for t in taken[n : n + 4]] == [
    (512, 768),
    (512, 512),
    ("swiglu", (512, 2048)),
    (1024, 512),
  ]
  assert taken[n + 2][2] == gpu_matmul.swiglu_settings(32, 512, 1024)
  # One block of columns only: with shards > 1 the gate and up columns interleave by
  # block, which the kernel's pairing (gate j, up mlp + j) would mix up: XLA's product.
  n = len(taken)
  model.layers[0].mlp.set_shards(2)
  model.forward(jnp.zeros((1, 32), jnp.int32))
  assert [t[1] for t in taken[n:]].count(("swiglu", (512, 2048))) == 1  # layer 1 only
  n = len(taken)
  f32 = Decoder(_bf16_config(**shape, param_dtype="float32"), gemm="auto", rngs=nnx.Rngs(0))
  f32.forward(tokens)
  f32.forward(jnp.zeros((1, 32), jnp.int32))
  assert len(taken) == n


@pytest.mark.parametrize(
  "kv_dtype,rotation,dtype",
  [
    (jnp.int8, True, jnp.float32),
    (jnp.int8, False, jnp.float32),
    (jnp.int8, True, jnp.bfloat16),  # f32 rotated rows, bf16 queries
    (jnp.float8_e4m3fn, True, jnp.float32),  # never rotated
  ],
)
def test_an_8bit_decode_step_is_written_in_the_kernel_as_by_the_cache_write(
  kv_dtype, rotation, dtype, monkeypatch
):
  """On the GPU backend (interpret mode) a decode step over an 8-bit PagedKVCache goes to
  ``kernels.write_and_decode_packed`` with the cache's scales, whose kernel quantizes and
  stores the step's rows: the cache it leaves is, byte for byte, the one the cache write
  then attention leaves (``fused_write=False``), and so are the outputs up to the kernels'
  own rounding of the one key they compute apart."""
  seen = []
  real = kernels.write_and_decode_packed

  def spy(*a, **kw):
    seen.append("k_scales" in kw)
    return real(*a, **kw)

  monkeypatch.setattr(kernels, "write_and_decode_packed", spy)
  runs = {}
  for fused in (True, False):
    layer = PagedAttention(
      32, 4, 2, 16, kv_rotation=rotation, backend="gpu", interpret=True, dtype=dtype,
      fused_write_8bit=True,  # whatever the card (test_..._measured_faster_on)
      rngs=nnx.Rngs(3),
    )  # fmt: skip
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((n, 32)).astype(np.float32) for n in (11, 6)]
    table = _scatter_table(rng, [11, 6], 4, 16, 4)
    rotated = rotation and jnp.dtype(kv_dtype) == jnp.int8
    cache = PagedKVCache.create(1, 2, 16, 4, 16, kv_dtype, rotated=rotated)
    outs, cache = _run_layer_calls(layer, xs, cache, table, 4, layer=0, fused_write=fused)
    runs[fused] = outs, cache
  assert seen == [True]  # the decode step of the fused run, and only that
  (fused_outs, fused_cache), (plain_outs, plain_cache) = runs[True], runs[False]
  for a, b in zip(jax.tree.leaves(fused_cache), jax.tree.leaves(plain_cache), strict=True):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  for call in range(2):  # the prefill calls ran the same path
    for a, b in zip(fused_outs[call], plain_outs[call], strict=True):
      np.testing.assert_array_equal(a, b)
  got, want = (np.concatenate(o[-1]).astype(np.float64) for o in (fused_outs, plain_outs))
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want, **TOL)
  else:
    # bf16 outputs: the two paths round the own key's p and the output to bf16 apart
    # (2**-8 each); as the GPU kernels' bf16 bound against float64 attention.
    bound = tolerance("quantized_gpu_vs_float64_rel_l2", "bfloat16").rtol
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < bound


def test_the_8bit_fused_write_is_taken_on_the_cards_it_was_measured_faster_on(monkeypatch):
  """kernels.gpu.quant_fused_write: the H100 SXM (run41: 3-44% shorter 8-bit steps where the
  ranges part), not the H200 (this kernel not timed there yet: run41's H200 figures were of
  one that also rotated inside) nor other
  cards nor no card; the layer follows it on
  the GPU backend only, and its ``fused_write_8bit`` overrides it either way."""
  from kernels import gpu
  from kernels.gpu import tuning

  assert gpu.quant_fused_write("NVIDIA H100 80GB HBM3")
  assert not gpu.quant_fused_write("NVIDIA H200")
  assert not gpu.quant_fused_write("NVIDIA A100-SXM4-80GB")
  assert not gpu.quant_fused_write(None)
  ref = PagedAttention(16, 2, 1, 8, backend="reference", rngs=nnx.Rngs(0))
  on_gpu = PagedAttention(16, 2, 1, 8, backend="gpu", interpret=True, rngs=nnx.Rngs(0))
  for card, want in (("NVIDIA H100 80GB HBM3", True), ("NVIDIA H200", False), (None, False)):
    monkeypatch.setattr(tuning, "current_device_kind", lambda card=card: card)
    assert gpu.quant_fused_write() == want
    assert on_gpu._fuses_8bit_write() == want
    assert not ref._fuses_8bit_write()  # the reference backend writes apart (same result)
    for forced in (True, False):
      for layer in (ref, on_gpu):
        layer.fused_write_8bit = forced
        assert layer._fuses_8bit_write() == forced
        layer.fused_write_8bit = None


def test_fused_write_8bit_is_an_argument_of_the_decoder_and_its_loaders(monkeypatch):
  """``Decoder(..., fused_write_8bit=...)`` reaches every layer (so a user picks the path
  without touching layers), ``load_decoder`` passes it on, and a value that is not None or
  a bool is refused where it is given (a string "false" would be truthy)."""
  from kernels.gpu import tuning
  from paxcache.nn import Decoder, DecoderConfig, load_decoder

  monkeypatch.setattr(tuning, "current_device_kind", lambda: "NVIDIA H200")
  config = DecoderConfig(num_layers=3, kv_dtype="int8")
  for value, fuses in ((None, False), (True, True), (False, False)):
    model = Decoder(config, backend="gpu", interpret=True, fused_write_8bit=value, rngs=nnx.Rngs(0))
    assert [layer.attn.fused_write_8bit for layer in model.layers] == [value] * 3
    assert [layer.attn._fuses_8bit_write() for layer in model.layers] == [fuses] * 3
  assert load_decoder(fused_write_8bit=True).layers[0].attn.fused_write_8bit is True
  for bad in ("false", 0, 1):
    with pytest.raises(ValueError, match="fused_write_8bit must be None, True or False"):
      Decoder(config, fused_write_8bit=bad, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="fused_write_8bit must be None, True or False"):
      PagedAttention(16, 2, 1, 8, fused_write_8bit=bad, rngs=nnx.Rngs(0))
  # Set after building, on a layer or on the class (layers left at None follow it).
  layer = model.layers[0].attn
  layer.fused_write_8bit = "false"
  with pytest.raises(ValueError, match="fused_write_8bit must be None, True or False"):
    layer._fuses_8bit_write()
  monkeypatch.setattr(PagedAttention, "fused_write_8bit", True)
  fresh = Decoder(config, backend="gpu", interpret=True, rngs=nnx.Rngs(0))
  assert all(layer.attn._fuses_8bit_write() for layer in fresh.layers)


def test_host_slots_that_the_block_table_does_not_give_are_refused_by_the_layer():
  """With NumPy metadata the layer checks that each row's slot is the one its position has
  in the table, and that ``positions`` are where lengths and cu_q_lens put the rows: a slot
  elsewhere wrote K/V no query read (the output was silently zeros, reading an empty
  block). Traced metadata is trusted."""
  attn = PagedAttention(64, 4, 2, 16, rngs=nnx.Rngs(0))
  pools = (jnp.zeros((2, 16, 8, 16)), jnp.zeros((2, 16, 8, 16)))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 64)), jnp.float32)
  table, lengths, cu = np.array([[3, 7]], np.int32), np.array([5], np.int32), np.array([0, 5])
  good = np.arange(24, 29, dtype=np.int32)  # block 3, offsets 0-4
  kw = dict(block_table=table, lengths=lengths, cu_q_lens=cu.astype(np.int32))
  out, _ = attn(x, np.arange(5, dtype=np.int32), pools, slot_mapping=good, **kw)
  assert np.abs(np.asarray(out)).max() > 0
  with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 3\] have slots \[40, 41, 42, 43\].*\[24"):
    attn(x, np.arange(5, dtype=np.int32), pools, slot_mapping=good + 16, **kw)  # block 5
  with pytest.raises(ValueError, match=r"positions of rows \[0, 1, 2, 3\] are \[1, 2, 3, 4\]"):
    attn(x, np.arange(1, 6, dtype=np.int32), pools, slot_mapping=good, **kw)
  with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 3\] have slots \[40"):  # JAX positions
    attn(x, jnp.arange(5, dtype=jnp.int32), pools, slot_mapping=good + 16, **kw)
  padded = np.concatenate([good, [-1, -1]]).astype(np.int32)  # bucket padding rows: -1
  x7 = jnp.concatenate([x, jnp.zeros((2, 64))])
  attn(x7, np.arange(7, dtype=np.int32), pools, slot_mapping=padded, **kw)
  # decode: the row's slot is that of position lengths - 1
  dec = dict(block_table=table, lengths=np.array([6], np.int32))
  attn(x[:1], np.array([5], np.int32), pools, slot_mapping=np.array([29], np.int32), **dec)
  with pytest.raises(ValueError, match=r"lengths - 1 = \[5\], which are \[29\]"):
    attn(x[:1], np.array([5], np.int32), pools, slot_mapping=np.array([30], np.int32), **dec)
  # Decode padding as the engine builds it (length 0, position 0, slot -1) is fine ...
  pad = dict(block_table=np.array([[3, 7], [-1, -1]], np.int32), lengths=np.array([6, 0], np.int32))
  attn(x[:2], np.array([5, 0], np.int32), pools, slot_mapping=np.array([29, -1], np.int32), **pad)
  # ... and metadata that does not fit together is named by the kernels' checks, not here.
  with pytest.raises(ValueError, match=r"disagree on batch"):
    attn(x[:2], np.array([5, 0], np.int32), pools, slot_mapping=np.array([29, -1], np.int32),
         block_table=table, lengths=np.array([6, 0], np.int32))  # fmt: skip
  with pytest.raises(ValueError, match=r"more queries than tokens"):
    attn(x, np.arange(5, dtype=np.int32), pools, slot_mapping=good, block_table=table,
         lengths=np.array([4], np.int32), cu_q_lens=cu.astype(np.int32))  # fmt: skip


def _i32(*values):
  return np.array(values, np.int32)


_PREFILL = dict(
  block_table=np.array([[3, 7]], np.int32),
  lengths=_i32(5),
  slot_mapping=_i32(24, 25, 26, 27, 28),
  cu_q_lens=_i32(0, 5),
)
_DECODE = dict(
  block_table=np.array([[3, 7], [1, -1]], np.int32), lengths=_i32(9, 1), slot_mapping=_i32(56, 8)
)


@pytest.mark.parametrize(
  "kv_dtype,fused_write", [(jnp.float32, True), (jnp.float32, False), (jnp.int8, True)]
)
@pytest.mark.parametrize(
  "step,change,match",
  [
    ("prefill", {"block_table": np.array([[3, 7]])}, "block_table must be int32"),
    ("prefill", {"lengths": np.array([5])}, "lengths must be int32"),
    ("prefill", {"block_table": np.array([[3, 99]], np.int32)}, r"ids outside \[0, 16\)"),
    ("prefill", {"block_table": np.array([[3, -5]], np.int32)}, r"ids outside \[0, 16\)"),
    ("prefill", {"block_table": np.array([[3, 7], [1, 2]], np.int32)}, "disagree on batch"),
    ("prefill", {"cu_q_lens": _i32(0, 2, 5)}, r"cu_q_lens must be int32 \[batch \+ 1\]"),
    ("decode", {"block_table": np.array([[3, 7], [1, 99]], np.int32)}, r"ids outside \[0, 16\)"),
    ("decode", {"lengths": np.array([9, 1])}, "lengths must be int32"),
  ],
)
def test_a_layer_call_refused_for_its_metadata_leaves_the_cache_whole(
  kv_dtype, fused_write, step, change, match
):
  # The write before the attention donates the layer's pools: a check that ran after it
  # (prefill, 8-bit caches off the GPU, fused_write=False) deleted the caller's cache.
  layer = PagedAttention(d_model=64, num_q_heads=4, num_kv_heads=2, head_dim=16, rngs=nnx.Rngs(0))
  rotated = kv_dtype == jnp.int8
  cache = PagedKVCache.create(
    num_layers=1, num_kv_heads=2, num_blocks=16, block_size=8, head_dim=16, dtype=kv_dtype,
    rotated=rotated,
  )  # fmt: skip
  # Known contents, to see that nothing was written either.
  k0 = np.arange(np.prod(cache.k[0].shape)).reshape(cache.k[0].shape) % 7
  cache = cache.replace_layer(0, jnp.asarray(k0, kv_dtype), jnp.asarray(k0 + 1, kv_dtype))
  rows, meta = (5, _PREFILL) if step == "prefill" else (2, _DECODE)
  positions = _i32(0, 1, 2, 3, 4) if step == "prefill" else _i32(8, 0)
  with pytest.raises(ValueError, match=match):
    layer(
      jnp.ones((rows, 64)), positions, cache, layer=0, fused_write=fused_write, **(meta | change)
    )
  k, v = cache.layer(0)  # not donated
  np.testing.assert_array_equal(np.asarray(k), k0)
  np.testing.assert_array_equal(np.asarray(v), k0 + 1)
  # ... and the call as it should have been runs on it.
  out, _ = layer(jnp.ones((rows, 64)), positions, cache, layer=0, fused_write=fused_write, **meta)
  assert out.shape == (rows, 64) and np.isfinite(np.asarray(out)).all()


def test_a_decoder_call_refused_before_any_layer_writes():
  config = DecoderConfig(vocab_size=256, d_model=32, num_layers=2, head_dim=8, mlp_dim=64)
  model = Decoder(config, rngs=nnx.Rngs(0))
  meta = dict(block_table=np.array([[0]], np.int32), lengths=_i32(3), slot_mapping=_i32(0, 1, 2))
  meta["cu_q_lens"] = _i32(0, 3)
  tokens, positions = _i32(5, 6, 7), _i32(0, 1, 2)
  one_layer = PagedKVCache.create(
    num_layers=1, num_kv_heads=config.num_kv_heads, num_blocks=4, block_size=8, head_dim=8
  )
  # Layer 0 used to write (donating the pools) before layer 1 found no pool of its own.
  with pytest.raises(ValueError, match="the cache has 1 layers and the model 2"):
    model(tokens, positions, one_layer, **meta)
  assert one_layer.layer(0)[0].shape == (config.num_kv_heads, 4, 8, 8)  # not donated
  cache = model.init_cache(num_blocks=4, block_size=8)
  bad = [
    # An id past the vocabulary gave NaN logits and NaN K/V in the cache; -1 the last id's.
    (dict(tokens=_i32(5, 300, 7)), r"must be in \[0, vocab_size=256\), got ids in \[5, 300\]"),
    (dict(tokens=_i32(-1, 6, 7)), r"got ids in \[-1, 7\]"),
    (dict(tokens=np.array([5.0, 6.0, 7.0])), "tokens must be integers"),
    # JAX's indexing clamps: row 5 of 3 was row 2's logits.
    (dict(logit_rows=_i32(5)), r"logit_rows must be in \[-3, 3\) for 3 token rows"),
    (dict(logit_rows=_i32(-4)), r"logit_rows must be in \[-3, 3\)"),
  ]  # fmt: skip
  for change, match in bad:
    args = dict(tokens=tokens, positions=positions) | change
    with pytest.raises(ValueError, match=match):
      model(args.pop("tokens"), args.pop("positions"), cache, **meta, **args)
  # The cache is whole; -1 is the last row, as NumPy indexes.
  logits, _ = model(tokens, positions, cache, **meta, logit_rows=_i32(-1))
  want = model.forward(jnp.asarray(tokens)[None])[0, 2]
  np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(want), **TOL)


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(sliding_window=2.5), "sliding_window must be None or an int >= 1"),
    (dict(sliding_window=0), "sliding_window must be None or an int >= 1"),
    (dict(logit_soft_cap=-1.0), "logit_soft_cap must be None or a finite number > 0"),
    (dict(head_dim=15), "head_dim must be even for RoPE, got 15"),
    (dict(num_kv_heads=0), "num_kv_heads must be an int >= 1, got 0"),
    (dict(num_q_heads=4.0), "num_q_heads must be an int >= 1, got 4.0"),
    (dict(dtype=jnp.int32), "dtype must be a floating dtype"),
    (dict(param_dtype="int8"), "param_dtype must be a floating dtype"),
  ],
)
def test_paged_attention_checks_its_options_when_built(kw, match):
  # These were taken and failed at every call (a prefill after its write had donated the
  # cache), or deep inside JAX (odd head_dim: a shape error in RoPE; 0 KV heads: division
  # by zero).
  args = dict(d_model=64, num_q_heads=4, num_kv_heads=2, head_dim=16) | kw
  with pytest.raises(ValueError, match=match):
    PagedAttention(**args, rngs=nnx.Rngs(0))


def test_paged_attention_without_rope_takes_an_odd_head_dim_and_refuses_8bit_pairs():
  layer = PagedAttention(
    d_model=30, num_q_heads=2, num_kv_heads=2, head_dim=15, rope_theta=None, rngs=nnx.Rngs(0)
  )
  assert layer.head_dim == 15
  layer = PagedAttention(d_model=64, num_q_heads=4, num_kv_heads=2, head_dim=16, rngs=nnx.Rngs(0))
  pair = (jnp.zeros((2, 8, 8, 16), jnp.int8),) * 2
  with pytest.raises(
    ValueError, match=r"8-bit pools \(int8\) need their scales: pass a PagedKVCache"
  ):
    table = np.array([[3]], np.int32)
    x = jnp.ones((1, 64))
    layer(x, _i32(0), pair, block_table=table, lengths=_i32(1), slot_mapping=_i32(24))


@pytest.mark.parametrize(
  "backend,head_dim,block_size,match",
  [
    ("gpu", 8, 8, "head_dim"),  # the GPU kernels take multiples of 16
    ("gpu", 16, 12, "block_size a power of two"),
    ("tpu", 16, 8, "head_dim"),  # the TPU kernels: multiples of 128 (or a lane layout)
  ],
)
def test_a_backends_own_refusal_comes_before_the_write(backend, head_dim, block_size, match):
  # The backend's static rules (checked inside it, after the write had donated the pools)
  # are part of kernels.check_paged_attention, which the layer runs first.
  layer = PagedAttention(
    d_model=64, num_q_heads=4, num_kv_heads=2, head_dim=head_dim, backend=backend,
    interpret=True, rngs=nnx.Rngs(0),
  )  # fmt: skip
  cache = PagedKVCache.create(
    num_layers=1, num_kv_heads=2, num_blocks=16, block_size=block_size, head_dim=head_dim
  )
  with pytest.raises(ValueError, match=match):
    layer(
      jnp.ones((5, 64)), _i32(0, 1, 2, 3, 4), cache, layer=0,
      block_table=np.array([[3, 7]], np.int32), lengths=_i32(5),
      slot_mapping=_i32(*(3 * block_size + np.arange(5))), cu_q_lens=_i32(0, 5),
    )  # fmt: skip
  np.testing.assert_array_equal(np.asarray(cache.layer(0)[0]), 0)  # not donated
