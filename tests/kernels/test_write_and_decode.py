"""kernels.write_and_decode: a decode step's K/V write and its attention in one call.

On the GPU backend (Pallas interpret mode here) the decode kernel writes the rows itself and
takes each row's last key from them; checked against ``kernels.write_kv`` followed by the
reference attention. The slot each row writes holds NaN before the call, so a kernel that
read its last key back from the pool instead of from ``k_new``/``v_new`` would fail; the new
K/V of rows that write nothing (slot -1) are NaN, so a kernel that used them would fail;
unused blocks and slots past the lengths are NaN as in test_gpu.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import gpu, reference
from kernels.testing import tolerance
from tests.kernels.test_gpu import SMALL, _bound, _rel_err, decode_inputs


def _step(seed, *, lengths, block_size=8, num_kv_heads=2, head_dim=64, q_dtype, kv_dtype,
          no_write=()):  # fmt: skip
  """Decode inputs whose rows write their last position's slot (NaN there before), but for
  the rows in ``no_write`` (slot -1: they attend over the pool as it is)."""
  q, k, v, table, lens = decode_inputs(
    seed,
    lengths=lengths,
    block_size=block_size,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    q_dtype=q_dtype,
    kv_dtype=kv_dtype,
  )
  rng = np.random.default_rng(seed + 1000)
  shape = (len(lengths), num_kv_heads, head_dim)
  k_new = jnp.asarray(rng.standard_normal(shape), q_dtype)
  v_new = jnp.asarray(rng.standard_normal(shape), q_dtype)
  tab = np.asarray(table)
  slots = np.full(len(lengths), kernels.INVALID_SLOT, np.int32)
  k_np, v_np = np.array(k, np.float32), np.array(v, np.float32)
  for b, n in enumerate(lengths):
    if n == 0 or b in no_write:
      continue
    blk, off = tab[b, (n - 1) // block_size], (n - 1) % block_size
    slots[b] = blk * block_size + off
    k_np[:, blk, off] = np.nan
    v_np[:, blk, off] = np.nan
  k, v = jnp.asarray(k_np, kv_dtype), jnp.asarray(v_np, kv_dtype)
  # Rows that write nothing carry NaN in their new K/V: nothing may read them.
  silent = jnp.asarray(slots < 0)[:, None, None]
  k_new, v_new = jnp.where(silent, jnp.nan, k_new), jnp.where(silent, jnp.nan, v_new)
  return q, k, v, k_new, v_new, slots, table, lens


def _write_then_reference(q, k, v, k_new, v_new, slots, table, lens, **kw):
  k2, v2 = kernels.write_kv(k, v, k_new, v_new, jnp.asarray(slots))
  return reference.paged_attention(q, k2, v2, table, lens, **kw), k2, v2


def _check(got, want, q_dtype):
  out, k2, v2 = got
  ref, kw, vw = want
  assert _rel_err(out, ref) < _bound(q_dtype)
  # The kernel stores the rows cast to the pool's dtype, as the scatter does; every other
  # slot (NaN ones too) is untouched.
  np.testing.assert_array_equal(np.asarray(k2, np.float32), np.asarray(kw, np.float32))
  np.testing.assert_array_equal(np.asarray(v2, np.float32), np.asarray(vw, np.float32))


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("block_size", [1, 8])
@pytest.mark.parametrize(
  "q_dtype,kv_dtype,head_dim",
  [
    (jnp.float32, jnp.float32, 64),
    (jnp.bfloat16, jnp.bfloat16, 128),
    (jnp.bfloat16, jnp.float32, 80),
  ],
)
def test_gpu_kernel_writes_and_attends_as_write_then_reference(
  splits, block_size, q_dtype, kv_dtype, head_dim
):
  # Lengths 0 and 1, one at a block's end, longer ones; row 4 writes nothing (slot -1).
  # With 3 splits the last key falls in the last split of a long row, and rows of one
  # position have it in their first.
  lengths = [37, 0, 1, 16, 21, 70]
  args = _step(
    splits * 10 + block_size,
    lengths=lengths,
    block_size=block_size,
    head_dim=head_dim,
    q_dtype=q_dtype,
    kv_dtype=kv_dtype,
    no_write=(4,),
  )
  bsz = dataclasses.replace(SMALL, decode_num_splits=splits)
  got = kernels.write_and_decode(*args, backend="gpu", interpret=True, block_sizes=bsz)
  _check(got, _write_then_reference(*args), q_dtype)
  np.testing.assert_array_equal(np.asarray(got[0][1]), 0.0)  # length 0 sees nothing


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(
  "kernel,stages,splits,head_dim,dtype,window,cap",
  [
    ("split_k", 2, 1, 64, jnp.bfloat16, None, None),
    ("split_k", 3, 1, 64, jnp.bfloat16, None, None),
    ("split_k", 3, 3, 64, jnp.bfloat16, None, None),
    ("split_k", 3, 1, 80, jnp.bfloat16, None, None),  # columns past 80 masked
    ("split_k", 3, 2, 64, jnp.float32, 5, 2.0),
    ("planned", 2, 1, 64, jnp.bfloat16, None, None),
    ("planned", 3, 1, 64, jnp.bfloat16, None, None),
    ("planned", 3, 1, 80, jnp.float32, 5, None),
  ],
)
def test_own_row_preloaded_with_three_stages(
  kernel, stages, splits, head_dim, dtype, window, cap, packed, monkeypatch
):
  # With 3 stages the split-K and planned kernels load the step's own K/V row before
  # their key loops and hand it to own_key (decode.preloads_own_row; the spy sees which);
  # with 2, own_key loads it after the loop. Both must write and attend as write_kv then
  # the reference, NaN rows that write nothing included (row 4), with the owner in the
  # first or the last split or chunk, padded columns, float32 pools, a window and a cap.
  from kernels.gpu import decode

  jax.clear_caches()  # the kernels must be traced here, with the spy in place
  seen = []
  real = decode.own_key

  def spy(*a, **kw):
    seen.append(kw.get("new") is not None)
    return real(*a, **kw)

  # Both kernels reach it through decode.add_own_key, which looks it up in decode.
  monkeypatch.setattr(decode, "own_key", spy)
  lengths = [37, 0, 1, 16, 21, 70]
  args = _step(
    40 + stages + splits + head_dim, lengths=lengths, head_dim=head_dim, q_dtype=dtype,
    kv_dtype=dtype, no_write=(4,),
  )  # fmt: skip
  bsz = dataclasses.replace(SMALL, decode_num_splits=splits, decode_num_stages=stages)
  assert decode.preloads_own_row(bsz) == (stages >= 3)
  kw = dict(sliding_window=window, logit_soft_cap=cap)
  opts = dict(backend="gpu", interpret=True, block_sizes=bsz, **kw)
  if kernel == "planned":
    opts["decode_plan"] = gpu.plan_decode(
      np.asarray(lengths), 8, 2, kv_tile=16, sliding_window=window, chunk_tokens=16
    )
  if packed:
    q, k, v, k_new, v_new, slots, table, lens = args
    qkv = jnp.concatenate([q, k_new, v_new], axis=1)
    got = kernels.write_and_decode_packed(qkv, k, v, slots, table, lens, **opts)
  else:
    got = kernels.write_and_decode(*args, **opts)
  _check(got, _write_then_reference(*args, **kw), dtype)
  assert seen and set(seen) == {stages >= 3}


@pytest.mark.parametrize("window,cap", [(1, None), (5, 2.0), (None, 5.0)])
def test_gpu_kernel_window_and_soft_cap(window, cap):
  # A window of 1: each row sees only its new key, which no pool read provides.
  args = _step(3, lengths=[45, 3, 17, 64], q_dtype=jnp.float32, kv_dtype=jnp.float32)
  kw = dict(sliding_window=window, logit_soft_cap=cap, scale=0.3)
  got = kernels.write_and_decode(*args, backend="gpu", interpret=True, block_sizes=SMALL, **kw)
  _check(got, _write_then_reference(*args, **kw), jnp.float32)


def _equations(jaxpr, kernels_too=True) -> list:
  """Every equation of ``jaxpr`` and its sub-jaxprs (with ``kernels_too=False`` not the
  bodies of Pallas kernels)."""
  found = []
  for eqn in jaxpr.eqns:
    found.append(eqn)
    if eqn.primitive.name == "pallas_call" and not kernels_too:
      continue
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _equations(sub, kernels_too)
  return found


def _primitives(jaxpr, kernels_too=True) -> list:
  """:func:`_equations` as ``(primitive name, params)``."""
  return [(e.primitive.name, e.params) for e in _equations(jaxpr, kernels_too)]


def test_gpu_backend_runs_one_kernel_and_no_scatter():
  args = _step(5, lengths=[9, 30], q_dtype=jnp.float32, kv_dtype=jnp.float32)
  fn = functools.partial(kernels.write_and_decode, backend="gpu", interpret=True, block_sizes=SMALL)
  prims = _primitives(jax.make_jaxpr(fn)(*args).jaxpr)
  calls = [p for name, p in prims if name == "pallas_call"]
  assert len(calls) == 1
  assert calls[0]["name"].endswith("_write")
  assert dict(calls[0]["input_output_aliases"]) == {3: 1, 4: 2}  # the pools, in place
  assert not [name for name, _ in prims if "scatter" in name]


def test_other_backends_run_write_kv_then_paged_attention():
  args = _step(6, lengths=[12, 1, 40], q_dtype=jnp.float32, kv_dtype=jnp.float32)
  out, k2, v2 = kernels.write_and_decode(*args, backend="reference")
  ref, kw, vw = _write_then_reference(*args)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  np.testing.assert_array_equal(np.asarray(k2), np.asarray(kw))
  np.testing.assert_array_equal(np.asarray(v2), np.asarray(vw))


def test_bad_calls_raise_before_running():
  q, k, v, k_new, v_new, slots, table, lens = _step(
    8, lengths=[10, 20], q_dtype=jnp.float32, kv_dtype=jnp.float32
  )
  table, lens = np.asarray(table), np.asarray(lens)
  wrong = slots.copy()
  wrong[1] -= 1  # the slot of position 18, not 19
  with pytest.raises(ValueError, match=r"rows \[1\] .*lengths - 1 = \[19\]"):
    kernels.write_and_decode(q, k, v, k_new, v_new, wrong, table, lens, backend="reference")
  with pytest.raises(ValueError, match="16-bit or float32 pools"):
    kernels.write_and_decode(
      q, k.astype(jnp.int8), v.astype(jnp.int8), k_new, v_new, slots, table, lens
    )
  with pytest.raises(ValueError, match="same batch"):
    kernels.write_and_decode(q, k, v, k_new[:1], v_new[:1], slots[:1], table, lens)
  with pytest.raises(ValueError, match="out of range"):
    bad = slots.copy()
    bad[0] = k.shape[1] * k.shape[2]
    kernels.write_and_decode(q, k, v, k_new, v_new, bad, table, lens)
  # The Mosaic GPU decode runs only a planned decode: refused without a plan, as
  # paged_attention refuses it, never run on the Triton kernel instead.
  with pytest.raises(ValueError, match="decode_kernel='mosaic'.*decode_plan"):
    kernels.write_and_decode(
      q, k, v, k_new, v_new, slots, table, lens, backend="gpu", interpret=True,
      block_sizes=gpu.BlockSizes(decode_kernel="mosaic"),
    )  # fmt: skip


def test_gpu_kernel_with_nothing_to_read_returns_zeros_and_the_pools():
  q, k, v, k_new, v_new, slots, table, lens = _step(
    9, lengths=[3], q_dtype=jnp.float32, kv_dtype=jnp.float32
  )
  empty = jnp.zeros((1, 0), jnp.int32)  # no block-table columns: nothing to read or write
  out, k2, v2 = gpu.decode_with_write(
    q, k, v, k_new, v_new, jnp.asarray([-1], jnp.int32), empty, jnp.zeros(1, jnp.int32),
    interpret=True, block_sizes=SMALL,
  )  # fmt: skip
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  assert k2 is k and v2 is v


@pytest.mark.parametrize("window", [None, 7])
def test_planned_gpu_kernel_writes_and_attends_as_write_then_reference(window):
  # Chunks of 16 keys: the long rows' last keys sit in their last chunks, a 16-token row's
  # in its only one; row 4 writes nothing.
  lengths = [37, 0, 1, 16, 21, 70]
  args = _step(21, lengths=lengths, q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16, no_write=(4,))
  plan = gpu.plan_decode(
    np.asarray(lengths), 8, 2, kv_tile=16, sliding_window=window, chunk_tokens=16
  )
  assert plan.num_chunks() > len(lengths)  # several rows cut into several chunks
  kw = dict(sliding_window=window)
  got = kernels.write_and_decode(
    *args, backend="gpu", interpret=True, block_sizes=SMALL, decode_plan=plan, **kw
  )
  _check(got, _write_then_reference(*args, **kw), jnp.bfloat16)
  prims = _primitives(
    jax.make_jaxpr(
      functools.partial(
        kernels.write_and_decode, backend="gpu", interpret=True, block_sizes=SMALL, **kw
      )
    )(*args, decode_plan=plan).jaxpr
  )
  names = [p["name"] for name, p in prims if name == "pallas_call"]
  assert len(names) == 2 and names[0].endswith("_write")  # chunks (writing), then the merge
  assert not [name for name, _ in prims if "scatter" in name]


@pytest.mark.parametrize("planned,head_dim", [(False, 64), (True, 64), (False, 80), (True, 80)])
def test_packed_qkv_reads_queries_and_rows_from_one_array(planned, head_dim):
  # q, then the step's K rows, then its V rows, in one [batch, Hq + 2 Hkv, D] array (as the
  # layer's projection gives it): the kernel reads all three from it, nothing splits it.
  # head_dim 80: rows of 80 in tiles of 128, every column past 80 masked.
  lengths = [37, 0, 1, 16, 21, 70]
  args = _step(
    31, lengths=lengths, head_dim=head_dim, q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16,
    no_write=(4,),
  )  # fmt: skip
  q, k, v, k_new, v_new, slots, table, lens = args
  qkv = jnp.concatenate([q, k_new, v_new], axis=1)
  opts = dict(backend="gpu", interpret=True)
  if planned:
    opts.update(
      block_sizes=SMALL,
      decode_plan=gpu.plan_decode(np.asarray(lengths), 8, 2, kv_tile=16, chunk_tokens=16),
    )
  else:
    opts.update(block_sizes=dataclasses.replace(SMALL, decode_num_splits=3))
  got = kernels.write_and_decode_packed(qkv, k, v, slots, table, lens, **opts)
  _check(got, _write_then_reference(*args), jnp.bfloat16)
  fn = functools.partial(kernels.write_and_decode_packed, **opts)
  jaxpr = jax.make_jaxpr(fn)(qkv, k, v, slots, table, lens).jaxpr
  prims = _primitives(jaxpr, kernels_too=False)
  names = [p["name"] for name, p in prims if name == "pallas_call"]
  assert len(names) == 1 + planned and names[0].endswith("_write")
  assert not [name for name, _ in prims if "scatter" in name]
  # Nothing slices or joins the packed array (the split-K combine slices its own partials).
  splits = [
    e.primitive.name
    for e in _equations(jaxpr, kernels_too=False)
    if e.primitive.name in ("slice", "dynamic_slice", "gather", "concatenate")
    and any(getattr(x.aval, "shape", None) == qkv.shape for x in e.invars)
  ]
  assert not splits
  # The reference splits it and gives write_and_decode's result.
  ref = kernels.write_and_decode_packed(qkv, k, v, slots, table, lens, backend="reference")
  want = kernels.write_and_decode(*args, backend="reference")
  for a, b in zip(ref, want, strict=True):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_packed_qkv_bad_calls_raise():
  q, k, v, k_new, v_new, slots, table, lens = _step(
    32, lengths=[10, 20], q_dtype=jnp.float32, kv_dtype=jnp.bfloat16
  )
  qkv = jnp.concatenate([q, k_new, v_new], axis=1)
  with pytest.raises(ValueError, match="pools' dtype"):
    kernels.write_and_decode_packed(qkv, k, v, slots, table, lens, backend="gpu", interpret=True)
  with pytest.raises(ValueError, match=r"num_q_heads \+ 2 \* num_kv_heads"):
    kernels.write_and_decode_packed(qkv[:, :5], k, v, slots, table, lens, backend="reference")


def test_a_device_slot_outside_the_pool_writes_nothing_as_the_scatter_drops_it():
  # Device arrays are not checked (a kernel cannot raise): a slot past the pool must not
  # land in another head's rows or past the buffer. Row 2 (no write in _step) gets one.
  q, k, v, k_new, v_new, slots, table, lens = _step(
    41, lengths=[9, 30, 12], q_dtype=jnp.float32, kv_dtype=jnp.float32, no_write=(2,)
  )
  k_new, v_new = jnp.nan_to_num(k_new), jnp.nan_to_num(v_new)  # row 2's are read by no one
  slots = slots.copy()
  slots[2] = k.shape[1] * k.shape[2] + 3
  args = (q, k, v, k_new, v_new, jnp.asarray(slots), table, lens)
  got = jax.jit(
    functools.partial(kernels.write_and_decode, backend="gpu", interpret=True, block_sizes=SMALL)
  )(*args)
  _check(got, _write_then_reference(*args), jnp.float32)


def _quantized_step(seed, *, kv_dtype, lengths, head_dim=64, qkv_dtype=jnp.bfloat16):
  """8-bit pools and a packed float q/k/v for one decode step. The pools are _step's float
  pools quantized: every unused slot, and every slot the step writes, holds a NaN scale
  (its rows NaN before), so a kernel that read a scale it should not (the own key's from
  the pool, say) gives NaN. Row 4 writes nothing (its new K/V are NaN); row 0's new K row
  for KV head 0 is a row of ties, ``[127, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, ...]``
  (scale exactly 1 in int8), which only rounding half to even stores as the reference does."""
  q, k, v, k_new, v_new, slots, table, lens = _step(
    seed, lengths=lengths, head_dim=head_dim, q_dtype=jnp.float32, kv_dtype=jnp.float32,
    no_write=(4,),
  )  # fmt: skip
  ties = np.resize(np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5], np.float32), head_dim)
  ties[0] = 127.0
  k_new = k_new.at[0, 0].set(jnp.asarray(ties))
  stale = np.isnan(np.asarray(k)).any(-1)  # unused slots and the ones the step writes
  assert stale.any() and (np.isnan(np.asarray(v)).any(-1) == stale).all()
  kq, ks = kernels.quantize(jnp.nan_to_num(k), kv_dtype)
  vq, vs = kernels.quantize(jnp.nan_to_num(v), kv_dtype)
  ks = jnp.where(jnp.asarray(stale), jnp.nan, ks)
  vs = jnp.where(jnp.asarray(stale), jnp.nan, vs)
  qkv = jnp.concatenate([q, k_new, v_new], axis=1).astype(qkv_dtype)
  return qkv, (kq, vq, ks, vs), slots, table, lens


def _quantized_opts(kernel, lengths, stages=2):
  if kernel == "planned":
    plan = gpu.plan_decode(np.asarray(lengths), 8, 2, kv_tile=16, chunk_tokens=16)
    return dict(block_sizes=dataclasses.replace(SMALL, decode_num_stages=stages), decode_plan=plan)
  splits = int(kernel.split("-")[1])
  bsz = dataclasses.replace(SMALL, decode_num_splits=splits, decode_num_stages=stages)
  return dict(block_sizes=bsz)


@pytest.mark.parametrize(
  "kv_dtype,kernel,head_dim,qkv_dtype,stages",
  [
    (jnp.int8, "split_k-1", 64, jnp.bfloat16, 2),
    (jnp.int8, "split_k-3", 64, jnp.float32, 3),  # own row preloaded; owner in any split
    (jnp.int8, "split_k-3", 80, jnp.bfloat16, 2),  # columns past 80 masked
    (jnp.int8, "planned", 64, jnp.float32, 2),
    (jnp.int8, "planned", 80, jnp.bfloat16, 3),
    (jnp.float8_e4m3fn, "split_k-1", 64, jnp.float32, 2),
    (jnp.float8_e4m3fn, "split_k-3", 80, jnp.bfloat16, 3),
    (jnp.float8_e4m3fn, "planned", 64, jnp.bfloat16, 2),
  ],
)
def test_8bit_pools_are_written_by_the_kernel_as_write_kv_quantized(
  kv_dtype, kernel, head_dim, qkv_dtype, stages
):
  # The decode kernel quantizes each new K/V row of a packed float q/k/v itself and stores
  # it and its scale: the four pools must be write_kv_quantized's, byte for byte (every
  # other slot, NaN scales included, untouched), and the output float64 attention over
  # the written pools with q in bf16 (q_dtype), from one kernel (and the planned merge)
  # with no scatter.
  lengths = [37, 0, 1, 16, 21, 70]
  qkv, pools, slots, table, lens = _quantized_step(
    50 + head_dim + stages, kv_dtype=kv_dtype, lengths=lengths, head_dim=head_dim,
    qkv_dtype=qkv_dtype,
  )  # fmt: skip
  kq, vq, ks, vs = pools
  opts = dict(backend="gpu", interpret=True, q_dtype=jnp.bfloat16)
  opts.update(_quantized_opts(kernel, lengths, stages))
  out, *got = kernels.write_and_decode_packed(
    qkv, kq, vq, slots, table, lens, k_scales=ks, v_scales=vs, **opts
  )
  assert out.dtype == jnp.bfloat16 and out.shape == (len(lengths), 4, head_dim)
  q, k_new, v_new = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
  want = kernels.write_kv_quantized(kq, vq, ks, vs, k_new, v_new, jnp.asarray(slots))
  for a, b in zip(got, want, strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  # The row of ties went where a tie-breaking half-to-even rounding puts it.
  blk, off = np.asarray(table)[0, 36 // 8], 36 % 8
  if kv_dtype == jnp.int8:
    stored = np.asarray(got[0][0, blk, off, :8], np.int32)
    np.testing.assert_array_equal(stored, [127, 2, 2, 0, -2, -2, 4, 126])
  case = dict(
    q=q.astype(jnp.bfloat16), k_blocks=got[0], v_blocks=got[1], block_table=table,
    lengths=lens, cu_q_lens=None, k_scales=got[2], v_scales=got[3],
  )  # fmt: skip
  from tests.kernels.test_quant import check

  check(out, case, jnp.bfloat16, rel_l2=True)
  fn = functools.partial(kernels.write_and_decode_packed, k_scales=ks, v_scales=vs, **opts)
  jaxpr = jax.make_jaxpr(fn)(qkv, kq, vq, slots, table, lens).jaxpr
  prims = _primitives(jaxpr, kernels_too=False)
  calls = [p for name, p in prims if name == "pallas_call"]
  assert len(calls) == 1 + (kernel == "planned") and "_write" in calls[0]["name"]
  assert len(calls[0]["input_output_aliases"]) == 4  # the two pools and two scale pools
  assert not [name for name, _ in prims if "scatter" in name]
  # The reference backend writes with write_kv_quantized, then attends: the same pools.
  ref = kernels.write_and_decode_packed(
    qkv, kq, vq, slots, table, lens, k_scales=ks, v_scales=vs, q_dtype=jnp.bfloat16,
    backend="reference",
  )  # fmt: skip
  for a, b in zip(ref[1:], want, strict=True):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  check(ref[0], case, jnp.bfloat16, rel_l2=True)


def test_8bit_packed_bad_calls_raise():
  lengths = [10, 20]
  qkv, (kq, vq, ks, vs), slots, table, lens = _quantized_step(
    51, kv_dtype=jnp.int8, lengths=lengths + [3, 4, 5, 6]
  )
  call = functools.partial(kernels.write_and_decode_packed, backend="gpu", interpret=True)
  with pytest.raises(ValueError, match=r"8-bit \(int8\) pools take k_scales and v_scales"):
    call(qkv, kq, vq, slots, table, lens)
  with pytest.raises(ValueError, match="k_scales must be"):
    call(qkv, kq, vq, slots, table, lens, k_scales=ks[:, :1], v_scales=vs)
  with pytest.raises(ValueError, match="qkv must be float32, bfloat16 or float16"):
    call(qkv.astype(jnp.int8), kq, vq, slots, table, lens, k_scales=ks, v_scales=vs)
  with pytest.raises(ValueError, match="q_dtype must be float32, bfloat16 or float16"):
    call(qkv, kq, vq, slots, table, lens, k_scales=ks, v_scales=vs, q_dtype=jnp.int8)
  with pytest.raises(ValueError, match="k_scales, v_scales and q_dtype are for 8-bit pools"):
    f = jnp.zeros(kq.shape, jnp.bfloat16)
    call(qkv, f, f, slots, table, lens, k_scales=ks, v_scales=vs)
  # The slot checks of write_and_decode hold here too, on every backend (the slot of
  # position 8, not 9).
  wrong = slots.copy()
  wrong[0] -= 1
  for backend in ("gpu", "reference"):
    with pytest.raises(ValueError, match=r"lengths - 1"):
      call(
        qkv, kq, vq, wrong, np.asarray(table), np.asarray(lens), k_scales=ks, v_scales=vs,
        backend=backend,
      )  # fmt: skip
  # Refused before anything ran: the pools still hold what they held, and the same call
  # with good arguments runs.
  before = [np.asarray(a, np.float32) for a in (kq, vq, ks, vs)]
  out, *pools = call(qkv, kq, vq, slots, table, lens, k_scales=ks, v_scales=vs)
  assert out.shape == (6, 4, 64) and len(pools) == 4
  for a, b in zip((kq, vq, ks, vs), before, strict=True):
    np.testing.assert_array_equal(np.asarray(a, np.float32), b)


@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_8bit_fused_write_of_a_nan_row_and_float32_queries(kv_dtype):
  # A written row holding NaN gets a NaN scale and a zero row, as write_kv_quantized stores
  # it (XLA's max keeps NaN; the kernel checks for it, since Triton's max drops NaN); with
  # q_dtype None a float32 q/k/v gives float32 queries and output (float32 dots). Row 2
  # writes a K row with a NaN (its own attention is then NaN, as the reference's), row 0 a
  # V row of zeros (scale 0).
  lengths = [37, 0, 9, 16, 21, 70]
  qkv, (kq, vq, ks, vs), slots, table, lens = _quantized_step(
    61, kv_dtype=kv_dtype, lengths=lengths, qkv_dtype=jnp.float32
  )
  qkv = qkv.at[2, 4, 5].set(jnp.nan).at[0, 6].set(0.0)
  args = (qkv, kq, vq, slots, table, lens)
  got = kernels.write_and_decode_packed(
    *args, k_scales=ks, v_scales=vs, backend="gpu", interpret=True, block_sizes=SMALL
  )
  want = kernels.write_kv_quantized(kq, vq, ks, vs, qkv[:, 4:6], qkv[:, 6:], jnp.asarray(slots))
  for a, b in zip(got[1:], want, strict=True):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  tab = np.asarray(table)
  blk, off = tab[2, 8 // 8], 8 % 8
  assert np.isnan(np.asarray(got[3])[0, blk, off])  # the K scale of row 2's new row
  np.testing.assert_array_equal(np.asarray(got[1], np.float32)[0, blk, off], 0.0)
  assert got[0].dtype == jnp.float32
  out = np.asarray(got[0], np.float64)
  assert np.isnan(out[2, :2]).all() and not np.isnan(np.delete(out, 2, axis=0)).any()
  case = dict(
    q=qkv[:, :4], k_blocks=got[1], v_blocks=got[2], block_table=table, lengths=lens,
    cu_q_lens=None, k_scales=got[3], v_scales=got[4],
  )  # fmt: skip
  from tests.kernels.test_quant import dequantised_oracle

  want_out = dequantised_oracle(**case)
  keep = [b for b in range(len(lengths)) if b != 2]
  # float32 q and dots: the elementwise float32 bound of 8-bit attention (kernels/testing.py)
  np.testing.assert_allclose(
    out[keep], want_out[keep], **tolerance("quantized_attention_vs_float64", "float32")
  )


@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn])
@pytest.mark.parametrize("planned", [False, True])
def test_fused_write_kernels_use_only_what_the_triton_lowering_has(kv_dtype, planned):
  # Interpret mode runs any jax primitive; the compiled GPU kernel only those Pallas's
  # Triton lowering has a rule for. A first 8-bit fused write found NaN rows with jnp.any
  # (reduce_or, which has none): it passed here and would not have compiled on a GPU. No
  # GPU on CI, so the kernels' bodies are checked against the rules (a private table of
  # jax's; if it moves, this test says so rather than passing).
  from jax._src.pallas.triton import lowering as triton_lowering

  rules = {p.name for p in triton_lowering.triton_lowering_rules}
  lengths = [37, 0, 1, 16, 21, 70]
  opts = dict(backend="gpu", interpret=True, block_sizes=SMALL)
  if planned:
    opts["decode_plan"] = gpu.plan_decode(np.asarray(lengths), 8, 2, kv_tile=16, chunk_tokens=16)
  if kv_dtype == jnp.bfloat16:
    q, k, v, k_new, v_new, slots, table, lens = _step(
      70, lengths=lengths, q_dtype=kv_dtype, kv_dtype=kv_dtype
    )
    args = (jnp.concatenate([q, k_new, v_new], axis=1), k, v, slots, table, lens)
  else:
    qkv, (kq, vq, ks, vs), slots, table, lens = _quantized_step(
      70, kv_dtype=kv_dtype, lengths=lengths
    )
    args = (qkv, kq, vq, slots, table, lens)
    opts.update(k_scales=ks, v_scales=vs)
  jaxpr = jax.make_jaxpr(functools.partial(kernels.write_and_decode_packed, **opts))(*args)
  calls = [
    e for e in _equations(jaxpr.jaxpr, kernels_too=False) if e.primitive.name == "pallas_call"
  ]
  assert calls and "_write" in calls[0].params["name"]
  for call in calls:
    used = {e.primitive.name for e in _equations(call.params["jaxpr"])}
    assert used <= rules, (call.params["name"], sorted(used - rules))


def test_a_lane_dense_pool_is_named_as_such():
  """A lane-dense pool ([heads, blocks, block_size * head_dim / 128, 128]) used to be met
  with "k_new/v_new must be [num_tokens, 2, 128]", as if the rows were the mistake."""
  q = jnp.zeros((2, 4, 32), jnp.float32)
  pool = jnp.zeros((2, 4, 2, 128), jnp.float32)  # head_dim 32, block_size 8, lane-dense
  rows = jnp.zeros((2, 2, 32), jnp.float32)
  table, lengths = jnp.asarray([[0], [1]], jnp.int32), jnp.asarray([3, 5], jnp.int32)
  slots = jnp.asarray([2, 12], jnp.int32)
  with pytest.raises(ValueError, match=r"rows are 128 wide but q's head_dim is 32.*lane_dense="):
    kernels.write_and_decode(q, pool, pool, rows, rows, slots, table, lengths)
