"""The Pallas TPU paged-attention kernels, run in TPU interpret mode on CPU.

TPU interpret mode simulates HBM, VMEM, SMEM, DMAs and semaphores. Every call here
raises on an out-of-bounds read, fills fresh VMEM with NaN, and runs the happens-before
race detector; each test checks that no race was found. Results are compared with a
float64 NumPy loop (independent of kernels.reference) on caches whose unused blocks and
slots past each length are NaN, with block tables shuffled over the pool.

Interpret mode is slow (each DMA and grid step is a host callback), so shapes are tiny
and each kernel call packs many cases (lengths 0, 1, bs - 1, bs, bs + 1, random) into
one batch.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as _interpret_state
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import kernels
from kernels import _layout, tpu
from kernels.testing import rel_l2_error, tolerance

INTERPRET = pltpu.InterpretParams(
  detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan"
)
HEAD_DIM = 128  # the lane width: the natural TPU head_dim (others must be multiples of it)


@pytest.fixture(autouse=True)
def _fresh_interpreter():
  """An exception inside an interpreted kernel leaves its simulated state behind."""
  pltpu.reset_tpu_interpret_mode_state()
  yield
  pltpu.reset_tpu_interpret_mode_state()


def _assert_no_races():
  races = _interpret_state.races
  assert races is not None and not races.races_found, "TPU interpret mode found a data race"


def test_race_detector_catches_a_read_while_its_dma_is_in_flight():
  """So that ``_assert_no_races`` in the other tests can fail."""

  def kernel(x_hbm, o_ref, buf, sem):
    copy = pltpu.make_async_copy(x_hbm, buf, sem)
    copy.start()
    o_ref[...] = buf[...]  # the bug: read before waiting on the DMA
    copy.wait()

  x = jnp.ones((8, HEAD_DIM), jnp.float32)
  pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
    in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
    scratch_shapes=[pltpu.VMEM(x.shape, x.dtype), pltpu.SemaphoreType.DMA(())],
    interpret=INTERPRET,
  )(x).block_until_ready()
  assert _interpret_state.races.races_found


def _oracle(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  cu_q_lens=None,
  *,
  scale=None,
  sliding_window=None,
  logit_soft_cap=None,
):
  """Paged attention in float64 NumPy, one query row and head at a time."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k_blocks, v_blocks))
  block_table, lengths = np.asarray(block_table), np.asarray(lengths)
  num_kv_heads, _, block_size, head_dim = k.shape
  num_tokens, num_q_heads, _ = q.shape
  group = num_q_heads // num_kv_heads
  scale = head_dim**-0.5 if scale is None else scale
  batch, max_blocks = block_table.shape
  cu = np.arange(batch + 1) if cu_q_lens is None else np.asarray(cu_q_lens)
  out = np.zeros(q.shape)
  for b in range(batch):
    q_len = cu[b + 1] - cu[b]
    for i in range(q_len):
      row, pos = cu[b] + i, lengths[b] - q_len + i
      keys = [
        p
        for p in range(min(pos + 1, max_blocks * block_size))
        if block_table[b, p // block_size] >= 0
        and (sliding_window is None or p > pos - sliding_window)
      ]
      if not keys:
        continue
      blocks = block_table[b, [p // block_size for p in keys]]
      slots = [p % block_size for p in keys]
      for h in range(num_q_heads):
        kk, vv = k[h // group, blocks, slots], v[h // group, blocks, slots]
        s = scale * (kk @ q[row, h])
        if logit_soft_cap is not None:
          s = logit_soft_cap * np.tanh(s / logit_soft_cap)
        p = np.exp(s - s.max())
        out[row, h] = p @ vv / p.sum()
  return out


def _cache(
  rng,
  lengths,
  *,
  num_kv_heads,
  block_size,
  max_blocks,
  dtype,
  spare_blocks=3,
  holes=(),
  head_dim=HEAD_DIM,
):
  """K/V pools and a shuffled block table; unused blocks and slots past length are NaN.

  ``holes``: (sequence, logical block) entries set to -1 although below the length (the
  kernels must treat them as absent, like the reference does).
  """
  lengths = np.asarray(lengths, np.int32)
  need = [-(-int(n) // block_size) for n in lengths]
  num_blocks = sum(need) + spare_blocks
  k = rng.standard_normal((num_kv_heads, num_blocks, block_size, head_dim))
  v = rng.standard_normal((num_kv_heads, num_blocks, block_size, head_dim))
  table = np.full((len(lengths), max_blocks), -1, np.int32)
  perm = rng.permutation(num_blocks)
  used = 0
  for b, n in enumerate(need):
    table[b, :n] = perm[used : used + n]
    used += n
    # Slots past the length in the last block hold garbage in a real cache.
    tail = int(lengths[b]) % block_size
    if n and tail:
      k[:, table[b, n - 1], tail:] = np.nan
      v[:, table[b, n - 1], tail:] = np.nan
  k[:, perm[used:]] = np.nan
  v[:, perm[used:]] = np.nan
  for b, j in holes:
    k[:, table[b, j]] = np.nan
    v[:, table[b, j]] = np.nan
    table[b, j] = -1
  return (jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(table), jnp.asarray(lengths))


def _check(out, want, dtype):
  out = np.asarray(jnp.asarray(out, jnp.float32))
  assert not np.isnan(out).any(), "NaN leaked into the output"
  if jnp.dtype(dtype) == jnp.bfloat16:
    # bf16 q and K/V: p is rounded to bf16 for the p @ V product (as on the GPU), so the
    # error is compared over the whole output, as the GPU kernels' is (kernels/testing.py).
    assert rel_l2_error(out, want) < tolerance("attention_bf16_probs_rel_l2", dtype).rtol
    return
  np.testing.assert_allclose(out, want, **tolerance("attention_vs_float64", dtype))


BS = 8  # f32 sublane tile; bf16 tests use 16
EDGE_LENGTHS = [0, 1, BS - 1, BS, BS + 1, 29]  # 29: a random length spanning 4 blocks


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize(
  "num_q_heads,num_kv_heads,blocks_per_chunk,kv_heads_per_step",
  [(4, 2, 2, 2), (4, 1, 3, 1), (2, 2, 1, 1)],
  ids=["gqa-2chunks-2heads", "mqa-3chunks", "mha-1block-chunks-1head"],
)
def test_decode_matches_oracle_on_edge_lengths(
  num_q_heads, num_kv_heads, blocks_per_chunk, kv_heads_per_step
):
  rng = np.random.default_rng(0)
  k, v, table, lengths = _cache(
    rng, EDGE_LENGTHS, num_kv_heads=num_kv_heads, block_size=BS, max_blocks=5, dtype=jnp.float32
  )
  q = jnp.asarray(rng.standard_normal((len(EDGE_LENGTHS), num_q_heads, HEAD_DIM)), jnp.float32)
  out = tpu.paged_attention_decode(
    q,
    k,
    v,
    table,
    lengths,
    block_sizes=tpu.BlockSizes(
      blocks_per_chunk=blocks_per_chunk, kv_heads_per_step=kv_heads_per_step
    ),
    interpret=INTERPRET,
  )
  _assert_no_races()
  chex.assert_equal_shape([out, q])
  chex.assert_type(out, q.dtype)
  _check(out, _oracle(q, k, v, table, lengths), jnp.float32)
  assert np.all(np.asarray(out)[0] == 0), "a length-0 sequence must return zeros"


@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16], ids=["q-f32", "q-bf16"])
def test_decode_bf16_kv_is_not_rounded_further(q_dtype):
  # With f32 q, bf16 K/V are widened (never q narrowed): the f32 tolerance must hold. With
  # bf16 q the products run in bf16 (probabilities rounded), held to the bf16 bound.
  rng = np.random.default_rng(1)
  lengths = [1, 15, 16, 17, 40]
  k, v, table, lengths = _cache(
    rng, lengths, num_kv_heads=2, block_size=16, max_blocks=3, dtype=jnp.bfloat16
  )
  q = jnp.asarray(rng.standard_normal((5, 4, HEAD_DIM)), q_dtype)
  out = tpu.paged_attention_decode(
    q, k, v, table, lengths, interpret=INTERPRET, block_sizes=tpu.BlockSizes(blocks_per_chunk=2)
  )
  _assert_no_races()
  chex.assert_type(out, q_dtype)
  _check(out, _oracle(q, k, v, table, lengths), q_dtype)


def test_decode_sliding_window_and_soft_cap_skip_blocks_outside_window():
  rng = np.random.default_rng(2)
  k, v, table, lengths = _cache(
    rng, [3, 20, 33], num_kv_heads=1, block_size=BS, max_blocks=5, dtype=jnp.float32
  )
  # Blocks wholly before the window are never fetched: poison them to prove it.
  table_np = np.asarray(table)
  k = k.at[:, table_np[2, 0]].set(jnp.nan)
  q = jnp.asarray(rng.standard_normal((3, 2, HEAD_DIM)) * 4, jnp.float32)
  kw = dict(scale=0.2, sliding_window=12, logit_soft_cap=3.0)
  out = tpu.paged_attention_decode(
    q,
    k,
    v,
    table,
    lengths,
    interpret=INTERPRET,
    block_sizes=tpu.BlockSizes(blocks_per_chunk=2),
    **kw,
  )
  _assert_no_races()
  _check(out, _oracle(q, k, v, table, lengths, **kw), jnp.float32)
  # The NaN block above cannot show a fetch (the kernel masks scores and V with a select,
  # so a fetched block outside the window still gives the right output), so the range the
  # kernel starts from (_visible_range's first block) is checked by hand instead; that the
  # kernel fetches from it is not observable here. Length 33, window 12: keys 21-32,
  # blocks 2-4 of 8 tokens (2 = 21 // 8), end 5 = ceil(33 / 8); blocks 0 and 1 are skipped.
  from kernels.tpu.decode import _visible_range

  for length, window, want in [(33, 12, (21, 2, 5)), (20, 12, (8, 1, 3)), (3, 12, (0, 0, 1))]:
    got = _visible_range(jnp.int32(length), block_size=BS, max_blocks=5, sliding_window=window)
    assert tuple(int(x) for x in got) == want, (length, window, got)
  # Without a window every block from 0; cascade's own part from its start's block.
  assert tuple(
    int(x) for x in _visible_range(jnp.int32(33), block_size=BS, max_blocks=5, sliding_window=None)
  ) == (0, 0, 5)
  assert tuple(
    int(x)
    for x in _visible_range(
      jnp.int32(33), block_size=BS, max_blocks=5, sliding_window=None, start=17
    )
  ) == (17, 2, 5)


def test_decode_holes_and_whole_chunks():
  # -1 entries below the length: one inside a chunk (a partial wait, the per-block mask),
  # and a chunk that is all holes (no DMA, no wait, every key masked). Lengths 16 and 32
  # are whole 2-block chunks: every chunk takes the unmasked fast path, next to NaN slots.
  rng = np.random.default_rng(13)
  k, v, table, lengths = _cache(
    rng, [29, 40, 16, 32, 13], num_kv_heads=2, block_size=BS, max_blocks=5,
    dtype=jnp.float32, holes=[(0, 1), (1, 2), (1, 3), (4, 0)],
  )  # fmt: skip
  q = jnp.asarray(rng.standard_normal((5, 4, HEAD_DIM)), jnp.float32)
  out = tpu.paged_attention_decode(
    q, k, v, table, lengths, interpret=INTERPRET, block_sizes=tpu.BlockSizes(blocks_per_chunk=2)
  )
  _assert_no_races()
  _check(out, _oracle(q, k, v, table, lengths), jnp.float32)


def test_decode_default_block_sizes_one_chunk_of_13_blocks():
  # Defaults: the 2,048-token chunk is capped at the table's 13 blocks, so every sequence
  # is one chunk of 13 (not a power of two): a full one (104 tokens, one wait, fast path),
  # partial ones whose fetched counts are 8 (1000b), 13 - 1 hole = 12 (1100b), 1 and 0.
  rng = np.random.default_rng(15)
  k, v, table, lengths = _cache(
    rng, [104, 57, 100, 1, 0], num_kv_heads=2, block_size=BS, max_blocks=13,
    dtype=jnp.float32, holes=[(2, 5)],
  )  # fmt: skip
  q = jnp.asarray(rng.standard_normal((5, 4, HEAD_DIM)), jnp.float32)
  out = tpu.paged_attention_decode(q, k, v, table, lengths, interpret=INTERPRET)
  _assert_no_races()
  _check(out, _oracle(q, k, v, table, lengths), jnp.float32)


def test_decode_megacore_split_over_two_simulated_cores():
  # 5 sequences over 2 cores: padded with an idle sequence; each core prefetches across its
  # own steps only, checked by two simulated cores running concurrently.
  rng = np.random.default_rng(10)
  k, v, table, lengths = _cache(
    rng, [9, 0, 17, 1, 24], num_kv_heads=2, block_size=BS, max_blocks=3, dtype=jnp.float32
  )
  q = jnp.asarray(rng.standard_normal((5, 2, HEAD_DIM)), jnp.float32)
  two_cores = dataclasses.replace(INTERPRET, num_cores_or_threads=2)
  out = tpu.paged_attention_decode(
    q,
    k,
    v,
    table,
    lengths,
    interpret=two_cores,
    block_sizes=tpu.BlockSizes(blocks_per_chunk=2, num_cores=2, kv_heads_per_step=1),
  )
  _assert_no_races()
  _check(out, _oracle(q, k, v, table, lengths), jnp.float32)


def _count_pallas_calls(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count("pallas_call")


def _kernels_called(fn, *args) -> dict:
  """{kernel function name: pallas_calls of it} in the jaxpr of ``fn(*args)`` (both
  branches of a ``lax.cond`` count)."""
  counts = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        name = eqn.params["jaxpr"].debug_info.func_name
        counts[name] = counts.get(name, 0) + 1
      for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else [value]:
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return counts


@dataclasses.dataclass
class _KernelDmas:
  """What the ``dma_start`` and ``dma_wait`` sites of a traced Pallas kernel do."""

  starts: list  # per site: (VMEM window shape, times it runs per pass: static loop trips)
  waits: list  # per site: bytes the wait consumes from its semaphore
  scratch: list  # shapes of the kernel's VMEM scratch refs


def _kernel_dmas(fn, *args, name=None) -> _KernelDmas:
  """The DMA sites inside the Pallas kernel ``fn(*args)`` traces to (there must be one, or
  one whose kernel function is called ``name``).
  A site inside a loop of static trip count (``lax.fori_loop`` over a chunk's blocks)
  counts once per trip; loops of traced trip count (over chunks) are per chunk anyway."""
  found = []

  def window(ref_and_transforms):
    (indexer,) = ref_and_transforms.transforms
    return tuple(i.size for i in indexer.indices if isinstance(i, pl.Slice))

  def walk(jaxpr, trips, out):
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if out is not None and name == "dma_start":
        _, dst = jax.tree_util.tree_unflatten(eqn.params["tree"], eqn.invars)[:2]
        out.starts.append((window(dst), trips))
      if out is not None and name == "dma_wait":
        src = jax.tree_util.tree_unflatten(eqn.params["tree"], eqn.invars)[0]
        itemsize = jnp.dtype(src.ref.aval.dtype).itemsize
        out.waits.append(int(np.prod(window(src))) * itemsize)
      inner_out = out
      if name == "pallas_call":
        kernel = eqn.params["jaxpr"]
        inner_out = _KernelDmas([], [], [])
        inner_out.scratch = [
          v.aval.shape for v in kernel.invars if str(getattr(v.aval, "memory_space", "")) == "vmem"
        ]
        if wanted is None or kernel.debug_info.func_name == wanted:
          found.append(inner_out)
      inner_trips = trips * eqn.params["length"] if name == "scan" else trips
      for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else [value]:
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner, inner_trips, inner_out)

  wanted = name
  walk(jax.make_jaxpr(fn)(*args).jaxpr, 1, None)
  (kernel,) = found
  return kernel


@pytest.mark.parametrize(
  "ragged,heads_per_step,bpc",
  [(False, None, 4), (False, 2, 4), (False, None, 6), (True, None, 4), (True, 2, 4)],
  ids=["decode", "decode-2heads", "decode-6blocks", "ragged", "ragged-2heads"],
)
def test_dma_counts_in_the_kernel_jaxpr_match_the_plan(ragged, heads_per_step, bpc):
  # Counted in the traced kernel: the DMAs that fill one chunk, the bytes each moves, the
  # slots in flight, and the waits: one for K and V of the whole chunk (every head, every
  # block), or one per bit of the fetched count for a partly fetched chunk.
  from kernels.tpu import _config

  block_size, max_blocks = 16, 16
  kv = jax.ShapeDtypeStruct((8, 64, block_size, HEAD_DIM), jnp.bfloat16)
  table = jax.ShapeDtypeStruct((4, max_blocks), jnp.int32)
  lengths = jax.ShapeDtypeStruct((4,), jnp.int32)
  bs = tpu.BlockSizes(blocks_per_chunk=bpc, kv_heads_per_step=heads_per_step)
  tuned = _config.resolve(
    bs,
    q_dtype=jnp.bfloat16,
    kv_dtype=jnp.bfloat16,
    num_kv_heads=8,
    block_size=block_size,
    head_dim=HEAD_DIM,
    max_blocks=max_blocks,
    group=4,
    ragged=ragged,
  )
  plan = _config.dma_plan(
    tuned, block_size=block_size, head_dim=HEAD_DIM, kv_dtype=jnp.bfloat16, ragged=ragged
  )
  if ragged:
    q = jax.ShapeDtypeStruct((32, 32, HEAD_DIM), jnp.bfloat16)
    cu = jax.ShapeDtypeStruct((5,), jnp.int32)
    got = _kernel_dmas(
      lambda q, k, v, t, n, c: tpu.paged_attention(q, k, v, t, n, c, block_sizes=bs),
      q, kv, kv, table, lengths, cu, name="_ragged_kernel",
    )  # fmt: skip
    sites = 2  # the first chunk, and the next chunk inside the loop
  else:
    q = jax.ShapeDtypeStruct((4, 32, HEAD_DIM), jnp.bfloat16)
    got = _kernel_dmas(
      lambda q, k, v, t, n: tpu.paged_attention(q, k, v, t, n, block_sizes=bs),
      q, kv, kv, table, lengths,
    )  # fmt: skip
    sites = 3  # the first chunk, the next one, and the next grid step's first
  want_heads = heads_per_step or 8  # by default all 8 KV heads in both kernels
  # DMAs: each start site is a loop over the chunk's blocks issuing K and V.
  assert sum(trips for _, trips in got.starts) == sites * plan.dmas_per_chunk == sites * 2 * bpc
  assert {w for w, _ in got.starts} == {(want_heads, block_size, HEAD_DIM)}
  assert plan.heads_per_dma == want_heads
  assert plan.bytes_per_dma == want_heads * block_size * HEAD_DIM * 2
  # In flight: two slots of K and V, each filled by one chunk's DMAs.
  (kv_slots,) = [shape for shape in got.scratch if len(shape) == 5]
  assert kv_slots == (2, 2, want_heads, plan.chunk_tokens, HEAD_DIM)
  assert plan.dmas_in_flight == kv_slots[0] * plan.dmas_per_chunk
  # Waits: one site consumes the bytes of all of a chunk's DMAs at once; the others the
  # bytes of 1, 2, 4, ... blocks (the binary digits of a partial count).
  block_bytes = 2 * plan.bytes_per_dma  # K and V of one block
  assert got.waits.count(plan.dmas_per_chunk * plan.bytes_per_dma) == plan.waits_per_chunk == 1
  partial = sorted(w for w in got.waits if w != bpc * block_bytes)
  assert partial == [block_bytes << bit for bit in range(3 if bpc == 6 else 2)]  # 5 = 101b
  assert plan.max_waits_per_chunk == 2  # 3 = 011b, 5 = 101b


def test_dma_plan_of_the_benchmark_shape():
  # 64 x 8192, 32/8 heads of 128, bf16, block 16, defaults: 2048-token chunks (128 blocks),
  # all 8 KV heads per step (2 x 2 x 8 x 2048 x 128 x 2 B = 16 MiB of K/V slots), a VMEM
  # limit of twice that plus 16 MiB.
  from kernels.tpu import _config

  tuned = _config.resolve(
    None,
    q_dtype=jnp.bfloat16,
    kv_dtype=jnp.bfloat16,
    num_kv_heads=8,
    block_size=16,
    head_dim=128,
    max_blocks=512,
    group=4,
    ragged=False,
  )
  assert tuned.vmem_limit_bytes == 48 * 2**20
  plan = _config.dma_plan(tuned, block_size=16, head_dim=128, kv_dtype=jnp.bfloat16, ragged=False)
  assert (plan.heads_per_dma, plan.dmas_per_chunk, plan.dmas_in_flight) == (8, 256, 512)
  assert (plan.bytes_per_dma, plan.chunk_tokens, plan.waits_per_chunk) == (32768, 2048, 1)
  assert plan.max_waits_per_chunk == 7  # 127 blocks fetched
  assert plan.ns_per_dma("v5e") == pytest.approx(32768 / 819e9 * 1e9)  # 40 ns
  assert plan.ns_per_dma("v6e") == pytest.approx(32768 / 1640e9 * 1e9)  # 20 ns

  # The limit follows the slots, capped at 3/4 of the 64 MiB assumed without a TPU: 8
  # heads of 4,096 tokens (32 MiB of slots) get 48 MiB, not 80; a given limit is kept.
  def limit(**knobs):
    bs = tpu.BlockSizes(**knobs)
    kw = dict(q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16, num_kv_heads=8, block_size=16)
    kw.update(head_dim=128, max_blocks=512, group=4, ragged=False)
    return _config.resolve(bs, **kw).vmem_limit_bytes

  assert limit(blocks_per_chunk=256, kv_heads_per_step=8) == 48 * 2**20
  assert limit(blocks_per_chunk=32, kv_heads_per_step=8) == (2 * 4 + 16) * 2**20
  assert limit(vmem_limit_bytes=100 * 2**20) == 100 * 2**20


def test_decode_splits_batch_whose_block_table_exceeds_smem_budget():
  rng = np.random.default_rng(3)
  k, v, table, lengths = _cache(
    rng, [5, 17, 0, 9, 24], num_kv_heads=2, block_size=BS, max_blocks=4, dtype=jnp.float32
  )
  q = jnp.asarray(rng.standard_normal((5, 2, HEAD_DIM)), jnp.float32)
  # 2 sequences of (4 table entries + 1 length) and 2 words of kernel state per call.
  tiny = tpu.BlockSizes(blocks_per_chunk=2, smem_budget_bytes=4 * (2 * 5 + 2))
  fn = lambda *a: tpu.paged_attention_decode(*a, block_sizes=tiny, interpret=INTERPRET)
  assert _count_pallas_calls(fn, q, k, v, table, lengths) == 3
  out = fn(q, k, v, table, lengths)
  _assert_no_races()
  _check(out, _oracle(q, k, v, table, lengths), jnp.float32)


def test_smem_budget_below_one_sequence_raises():
  rng = np.random.default_rng(4)
  k, v, table, lengths = _cache(
    rng, [5], num_kv_heads=1, block_size=BS, max_blocks=4, dtype=jnp.float32
  )
  q = jnp.zeros((1, 1, HEAD_DIM), jnp.float32)
  with pytest.raises(ValueError, match="smem_budget_bytes"):
    tpu.paged_attention_decode(
      q, k, v, table, lengths, interpret=INTERPRET, block_sizes=tpu.BlockSizes(smem_budget_bytes=16)
    )


def test_corrupt_table_entries_are_skipped_not_read_out_of_bounds():
  # An entry past the pool (a caller bug) must not make the DMA leave the pool: interpret
  # mode raises on any out-of-bounds read, so finishing at all is the check. (That its
  # keys are skipped like -1, as on every backend: test_api.py's out-of-range test.)
  rng = np.random.default_rng(5)
  k, v, table, lengths = _cache(
    rng, [12], num_kv_heads=1, block_size=BS, max_blocks=2, dtype=jnp.float32, spare_blocks=0
  )
  k = jnp.nan_to_num(k)
  v = jnp.nan_to_num(v)
  table = table.at[0, 1].set(k.shape[1] + 7)
  q = jnp.asarray(rng.standard_normal((1, 1, HEAD_DIM)), jnp.float32)
  out = tpu.paged_attention_decode(q, k, v, table, lengths, interpret=INTERPRET)
  _assert_no_races()
  assert np.isfinite(np.asarray(out)).all()


def test_both_kernels_at_head_dim_256():
  # Two 128-lane tiles per row: decode (bf16, two KV heads a step) and ragged (float32).
  rng = np.random.default_rng(21)
  k, v, table, lengths = _cache(
    rng, [1, 20, 33], num_kv_heads=2, block_size=16, max_blocks=3, dtype=jnp.bfloat16,
    head_dim=256,
  )  # fmt: skip
  q = jnp.asarray(rng.standard_normal((3, 4, 256)), jnp.bfloat16)
  out = tpu.paged_attention_decode(
    q, k, v, table, lengths, interpret=INTERPRET, block_sizes=tpu.BlockSizes(blocks_per_chunk=2)
  )
  _assert_no_races()
  assert out.shape == q.shape
  _check(out, _oracle(q, k, v, table, lengths), jnp.bfloat16)
  k, v, table, lengths = _cache(
    rng, [9, 14], num_kv_heads=1, block_size=8, max_blocks=2, dtype=jnp.float32, head_dim=256
  )
  cu = jnp.asarray([0, 9, 10], jnp.int32)
  q = jnp.asarray(rng.standard_normal((12, 2, 256)), jnp.float32)
  out = tpu.paged_attention_ragged(
    q, k, v, table, lengths, cu, interpret=INTERPRET,
    block_sizes=tpu.BlockSizes(blocks_per_chunk=1, queries_per_tile=8),
  )  # fmt: skip
  _assert_no_races()
  _check(out, _oracle(q, k, v, table, lengths, cu), jnp.float32)
  assert np.all(np.asarray(out)[10:] == 0), "padding rows must return zeros"


# ----------------------------------------------------------------------------- ragged


def _ragged_case(
  rng, *, dtype, num_q_heads=4, num_kv_heads=2, block_size=BS, pad_rows=5, head_dim=HEAD_DIM
):
  # Prefill from scratch, prefill of a chunk after cached context, decodes of edge lengths,
  # an empty sequence, then padding rows past cu_q_lens[-1].
  lengths = [11, 0, 21, 1, block_size, block_size + 1, 30]
  q_lens = [11, 0, 6, 1, 1, 1, 3]
  holes = [(6, 1)]  # a -1 entry below the length: treated as absent
  k, v, table, lengths = _cache(
    rng,
    lengths,
    num_kv_heads=num_kv_heads,
    block_size=block_size,
    max_blocks=5,
    dtype=dtype,
    holes=holes,
    head_dim=head_dim,
  )
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
  num_tokens = int(cu[-1]) + pad_rows
  q = jnp.asarray(rng.standard_normal((num_tokens, num_q_heads, head_dim)), dtype)
  return q, k, v, table, lengths, cu


@pytest.mark.parametrize(
  "kw",
  [{}, dict(sliding_window=5, logit_soft_cap=2.0, scale=0.3)],
  ids=["causal", "window-softcap"],
)
def test_ragged_mixed_prefill_and_decode_matches_oracle(kw):
  rng = np.random.default_rng(6)
  q, k, v, table, lengths, cu = _ragged_case(rng, dtype=jnp.float32)
  if kw:
    q = q * 4  # large logits, so the soft cap matters
  out = tpu.paged_attention_ragged(
    q,
    k,
    v,
    table,
    lengths,
    cu,
    interpret=INTERPRET,
    block_sizes=tpu.BlockSizes(blocks_per_chunk=2, queries_per_tile=8),
    **kw,
  )
  _assert_no_races()
  assert out.shape == q.shape
  _check(out, _oracle(q, k, v, table, lengths, cu, **kw), jnp.float32)
  assert np.all(np.asarray(out)[int(cu[-1]) :] == 0), "padding rows must return zeros"


@pytest.mark.parametrize("window", [None, 30], ids=["causal", "window"])
def test_ragged_fast_path_chunks_beside_holes_and_nan(window):
  # Tiles of 8 rows wholly inside one sequence whose early chunks every row sees (the
  # unmasked fast path; with the window, only chunks inside every row's window), next to
  # a sequence with a -1 entry, a chunk of only holes, and a decode row sharing a tile
  # (decodes kept in the ragged kernel: split_decode=False).
  rng = np.random.default_rng(14)
  lengths, q_lens = [48, 45, 33], [8, 16, 1]
  k, v, table, lengths = _cache(
    rng, lengths, num_kv_heads=1, block_size=BS, max_blocks=6, dtype=jnp.float32,
    holes=[(1, 0), (2, 2), (2, 3)],
  )  # fmt: skip
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
  q = jnp.asarray(rng.standard_normal((int(cu[-1]) + 3, 2, HEAD_DIM)), jnp.float32)
  out = tpu.paged_attention_ragged(
    q, k, v, table, lengths, cu, sliding_window=window, interpret=INTERPRET,
    block_sizes=tpu.BlockSizes(blocks_per_chunk=2, queries_per_tile=8, split_decode=False),
  )  # fmt: skip
  _assert_no_races()
  _check(out, _oracle(q, k, v, table, lengths, cu, sliding_window=window), jnp.float32)


def test_ragged_two_of_four_kv_heads_per_step():
  # Each block one DMA for K and one for V of the step's 2 KV heads, 2 steps per tile.
  rng = np.random.default_rng(16)
  q, k, v, table, lengths, cu = _ragged_case(rng, dtype=jnp.float32, num_q_heads=8, num_kv_heads=4)
  out = tpu.paged_attention_ragged(
    q, k, v, table, lengths, cu, interpret=INTERPRET,
    block_sizes=tpu.BlockSizes(blocks_per_chunk=2, queries_per_tile=8, kv_heads_per_step=2),
  )  # fmt: skip
  _assert_no_races()
  _check(out, _oracle(q, k, v, table, lengths, cu), jnp.float32)
  assert np.all(np.asarray(out)[int(cu[-1]) :] == 0), "padding rows must return zeros"


def test_ragged_mixed_batch_runs_decodes_in_a_decode_kernel_launch_of_their_own(monkeypatch):
  # The decodes of a mixed batch (sequences with one query row) go to the decode kernel
  # (decodes first, the other sequences at length 0), and only the other sequences' rows,
  # packed from row 0, to the ragged kernel; a batch without decodes (or without prefills)
  # skips that launch. What each launch gets is recorded from inside the jitted call.
  from kernels.tpu import ragged as ragged_mod

  seen = {"decode": [], "ragged": []}
  real_decode, real_call = ragged_mod.decode_rows, ragged_mod._ragged_call

  def decode_spy(qg, k, v, table, lengths, **kw):
    jax.debug.callback(lambda n: seen["decode"].append(np.asarray(n).tolist()), lengths)
    return real_decode(qg, k, v, table, lengths, **kw)

  def call_spy(qt, k, v, table_flat, lengths, cu, **kw):
    jax.debug.callback(lambda c: seen["ragged"].append(np.asarray(c).tolist()), cu)
    return real_call(qt, k, v, table_flat, lengths, cu, **kw)

  monkeypatch.setattr(ragged_mod, "decode_rows", decode_spy)
  monkeypatch.setattr(ragged_mod, "_ragged_call", call_spy)
  jax.clear_caches()  # no trace made before the spies were in place
  bs = tpu.BlockSizes(blocks_per_chunk=2, queries_per_tile=8)

  def run(q, k, v, table, lengths, cu):
    seen["decode"].clear()
    seen["ragged"].clear()
    out = ragged_mod.paged_attention_ragged(
      q, k, v, table, lengths, cu, block_sizes=bs, interpret=INTERPRET
    )
    jax.effects_barrier()
    _assert_no_races()
    _check(out, _oracle(q, k, v, table, lengths, cu), jnp.float32)
    assert np.all(np.asarray(out)[int(cu[-1]) :] == 0), "padding rows must return zeros"
    return dict(seen)

  rng = np.random.default_rng(17)
  # lengths [11, 0, 21, 1, 8, 9, 30], q_lens [11, 0, 6, 1, 1, 1, 3]: decodes 3, 4, 5.
  got = run(*_ragged_case(rng, dtype=jnp.float32))
  assert got["decode"] == [[1, BS, BS + 1, 0, 0, 0, 0]]
  assert got["ragged"] == [[0, 11, 11, 17, 17, 17, 17, 20]]
  # Only decodes: no ragged launch. Only prefills (and an empty sequence): no decode launch.
  k, v, table, lengths = _cache(
    rng, [5, 17, 12], num_kv_heads=1, block_size=BS, max_blocks=3, dtype=jnp.float32
  )
  q = jnp.asarray(rng.standard_normal((4, 2, HEAD_DIM)), jnp.float32)
  got = run(q, k, v, table, lengths, jnp.asarray([0, 1, 2, 3], jnp.int32))
  assert got == {"decode": [[5, 17, 12]], "ragged": []}
  got = run(q, k, v, table, lengths, jnp.asarray([0, 2, 2, 4], jnp.int32))
  assert got == {"decode": [], "ragged": [[0, 2, 2, 4]]}


def test_ragged_defaults_one_prefill_tile_of_1024_rows_beside_decodes():
  # Default BlockSizes with bf16 q and K/V at group 4: the prefill launch's tile is 256
  # tokens (1,024 matmul rows per KV head, both KV heads in one step, softmax state in
  # VMEM scratch), holding two prefills; the decodes go to the decode kernel's default
  # 2,048-token chunk (capped at the table).
  rng = np.random.default_rng(18)
  lengths, q_lens = [40, 17, 33, 64, 1], [40, 1, 9, 1, 1]
  k, v, table, lengths = _cache(
    rng, lengths, num_kv_heads=2, block_size=16, max_blocks=4, dtype=jnp.bfloat16
  )
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
  q = jnp.asarray(rng.standard_normal((int(cu[-1]) + 2, 8, HEAD_DIM)), jnp.bfloat16)
  out = tpu.paged_attention_ragged(q, k, v, table, lengths, cu, interpret=INTERPRET)
  _assert_no_races()
  chex.assert_type(out, q.dtype)
  _check(out, _oracle(q, k, v, table, lengths, cu), jnp.bfloat16)
  assert np.all(np.asarray(out, np.float32)[int(cu[-1]) :] == 0), "padding rows: zeros"


def test_prefill_tiles_pass_the_ridge_point_of_v5e_and_v6e():
  # Per key token a tile of R matmul rows does 4 R head_dim flops (q k^T and p V) against
  # 2 head_dim x 2 bytes of bf16 K and V: R flop/byte. The default prefill tile (decodes
  # split off) has at least the larger ridge point's worth of rows, and is the smallest
  # power-of-two tile that does; with decodes in the same launch it stays at ~128 rows.
  from kernels.tpu import _config

  ridge = {c: _config.PEAK_BF16_FLOPS[c] / _config.HBM_BYTES_PER_S[c] for c in ("v5e", "v6e")}
  assert ridge["v5e"] == pytest.approx(240.5, abs=0.1)
  assert ridge["v6e"] == pytest.approx(559.8, abs=0.1)
  for group in range(1, 9):
    kw = dict(q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16, num_kv_heads=8, block_size=16)
    kw.update(head_dim=128, max_blocks=256, group=group, ragged=True)
    tile = _config.resolve(None, prefill_only=True, **kw).queries_per_tile
    rows = group * tile
    flops_per_key, bytes_per_key = 4 * rows * 128, 2 * 128 * 2
    assert flops_per_key / bytes_per_key == rows
    assert rows > max(ridge.values()) and group * (tile // 2) < max(ridge.values()), group
    mixed = _config.resolve(None, **kw).queries_per_tile
    assert 128 <= group * mixed < 256 or mixed == 16, group


@pytest.mark.parametrize("seed", [11, 12])
def test_ragged_random_batches_match_oracle(seed):
  # Random lengths, query counts, GQA ratio, chunk and tile sizes: what the fixed cases miss.
  rng = np.random.default_rng(seed)
  batch = int(rng.integers(2, 5))
  lengths = rng.integers(0, 40, batch)
  q_lens = np.minimum(lengths, rng.integers(0, 12, batch))
  num_kv_heads = int(rng.choice([1, 2]))
  num_q_heads = num_kv_heads * int(rng.choice([1, 2, 4]))
  k, v, table, lengths = _cache(
    rng, lengths, num_kv_heads=num_kv_heads, block_size=BS, max_blocks=5, dtype=jnp.float32
  )
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
  num_tokens = int(cu[-1]) + int(rng.integers(0, 4)) + 1
  q = jnp.asarray(rng.standard_normal((num_tokens, num_q_heads, HEAD_DIM)), jnp.float32)
  window = int(rng.integers(1, 20)) if rng.random() < 0.5 else None
  block_sizes = tpu.BlockSizes(
    blocks_per_chunk=int(rng.integers(1, 4)), queries_per_tile=int(rng.choice([8, 16]))
  )
  out = tpu.paged_attention_ragged(
    q,
    k,
    v,
    table,
    lengths,
    cu,
    sliding_window=window,
    block_sizes=block_sizes,
    interpret=INTERPRET,
  )
  _assert_no_races()
  _check(out, _oracle(q, k, v, table, lengths, cu, sliding_window=window), jnp.float32)


def test_ragged_mqa_bf16_with_smem_split():
  rng = np.random.default_rng(7)
  q, k, v, table, lengths, cu = _ragged_case(
    rng, dtype=jnp.bfloat16, num_q_heads=2, num_kv_heads=1, block_size=16
  )
  q = q.astype(jnp.float32)
  # 7 sequences: 3 calls of at most 3 sequences (5 entries + length + cu each), plus the
  # per-tile metadata (2 tiles of 16 rows: 2 * 2 + 1 words).
  # The decode launch (5 entries + length each, 2 words of state): 2 calls of at most 4.
  tiny = tpu.BlockSizes(blocks_per_chunk=1, queries_per_tile=16, smem_budget_bytes=4 * (3 * 7 + 5))
  fn = lambda *a: tpu.paged_attention_ragged(*a, block_sizes=tiny, interpret=INTERPRET)
  calls = _kernels_called(fn, q, k, v, table, lengths, cu)
  assert calls == {"_ragged_kernel": 3, "_decode_kernel": 2}, calls
  out = fn(q, k, v, table, lengths, cu)
  _assert_no_races()
  # f32 q with bf16 K/V: no narrowing anywhere, so the f32 tolerance holds.
  _check(out, _oracle(q, k, v, table, lengths, cu), jnp.float32)


def test_public_api_runs_tpu_backend_in_interpret_mode():
  rng = np.random.default_rng(8)
  k, v, table, lengths = _cache(
    rng, [9, 2], num_kv_heads=1, block_size=BS, max_blocks=2, dtype=jnp.float32
  )
  q = jnp.asarray(rng.standard_normal((2, 2, HEAD_DIM)), jnp.float32)
  out = kernels.paged_attention(q, k, v, table, lengths, backend="tpu", interpret=True)
  _check(out, _oracle(q, k, v, table, lengths), jnp.float32)


def test_nan_in_a_visible_slot_surfaces_as_nan_in_both_kernels():
  """A NaN that a query can see (a model gone wrong) must come out as NaN, as in the
  reference, not be hidden as a zero row; the other sequence stays finite."""
  rng = np.random.default_rng(9)
  k, v, table, lengths = _cache(
    rng, [9, 5], num_kv_heads=1, block_size=BS, max_blocks=2, dtype=jnp.float32
  )
  k = k.at[:, int(table[0, 0]), 3].set(jnp.nan)  # position 3 of sequence 0
  q = jnp.asarray(rng.standard_normal((2, 2, HEAD_DIM)), jnp.float32)
  out = np.asarray(tpu.paged_attention_decode(q, k, v, table, lengths, interpret=INTERPRET))
  assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
  cu = jnp.asarray([0, 2, 3], jnp.int32)  # last 2 tokens of sequence 0, 1 of sequence 1
  qr = jnp.asarray(rng.standard_normal((3, 2, HEAD_DIM)), jnp.float32)
  out = np.asarray(tpu.paged_attention_ragged(qr, k, v, table, lengths, cu, interpret=INTERPRET))
  assert np.isnan(out[:2]).all() and np.isfinite(out[2]).all()


# ------------------------------------------------------- JAX's built-in TPU paged_attention


def test_builtin_tpu_paged_attention_differs_only_by_its_bf16_cast():
  """JAX's kernel takes (q, k, v, lengths, page_indices), applies no softmax scale (q must
  come pre-scaled), needs every table entry valid and max_blocks divisible by
  pages_per_compute_block, and casts K/V to bf16 before its matmuls. On K/V that are
  exactly bf16-representable (stored as f32) the cast is lossless and the two kernels
  agree to f32 precision; on general f32 K/V only ours stays within 1e-5 of the float64
  oracle."""
  from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as builtin

  rng = np.random.default_rng(9)
  lengths = jnp.asarray([7, 16, 27], jnp.int32)
  num_blocks, max_blocks = 12, 4
  table = jnp.asarray(
    rng.permutation(num_blocks)[: 3 * max_blocks].reshape(3, max_blocks), jnp.int32
  )
  k = rng.standard_normal((2, num_blocks, BS, HEAD_DIM)).astype(np.float32)
  v = rng.standard_normal((2, num_blocks, BS, HEAD_DIM)).astype(np.float32)
  q = jnp.asarray(rng.standard_normal((3, 4, HEAD_DIM)), jnp.float32)
  k_bf = jnp.asarray(k).astype(jnp.bfloat16).astype(jnp.float32)
  v_bf = jnp.asarray(v).astype(jnp.bfloat16).astype(jnp.float32)

  def theirs(kk, vv):
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
      return np.asarray(
        builtin(q * HEAD_DIM**-0.5, kk, vv, lengths, table, pages_per_compute_block=2)
      )

  def ours(kk, vv):
    return np.asarray(
      tpu.paged_attention_decode(
        q,
        kk,
        vv,
        table,
        lengths,
        block_sizes=tpu.BlockSizes(blocks_per_chunk=2),
        interpret=INTERPRET,
      )
    )

  np.testing.assert_allclose(
    theirs(k_bf, v_bf), ours(k_bf, v_bf), **tolerance("builtin_tpu_kernel_vs_ours", "float32")
  )
  want = _oracle(q, k, v, table, lengths)
  _check(ours(jnp.asarray(k), jnp.asarray(v)), want, jnp.float32)
  their_err = np.abs(theirs(jnp.asarray(k), jnp.asarray(v)) - want).max()
  assert their_err > 1e-4, f"built-in kernel now within {their_err}: update docs/tpu.md"
  # It also adds its mask to the logits instead of selecting, so NaN in the slots past a
  # length (garbage a real cache may hold there) reaches its output; ours zeroes them.
  tail = int(lengths[0]) % BS
  k_nan = jnp.asarray(k).at[:, table[0, 0], tail:].set(jnp.nan)
  assert np.isnan(theirs(k_nan, jnp.asarray(v))[0]).any(), "built-in now masks: update docs"
  _check(ours(k_nan, jnp.asarray(v)), want, jnp.float32)


# ------------------------------------------------------------------ lowering for a real TPU


@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_kernels_lower_to_mosaic_for_tpu(kv_dtype):
  """Cross-platform export runs the Pallas -> Mosaic lowering a TPU compile starts with, on
  the benchmark's head layout (32 q / 8 KV heads, head_dim 128), so a construct only the
  interpreter accepts (a ref reshape, say) fails here. Mosaic's own layout passes run in
  libtpu and are not exercised."""
  k = jax.ShapeDtypeStruct((8, 64, 16, HEAD_DIM), kv_dtype)
  table = jax.ShapeDtypeStruct((4, 8), jnp.int32)
  lengths = jax.ShapeDtypeStruct((4,), jnp.int32)
  kw = dict(sliding_window=64, logit_soft_cap=30.0)
  decode = jax.jit(lambda q, k, v, t, n: tpu.paged_attention(q, k, v, t, n, **kw))
  q = jax.ShapeDtypeStruct((4, 32, HEAD_DIM), kv_dtype)
  text = jax.export.export(decode, platforms=["tpu"])(q, k, k, table, lengths).mlir_module()
  assert "tpu_custom_call" in text
  ragged = jax.jit(lambda q, k, v, t, n, c: tpu.paged_attention(q, k, v, t, n, c, **kw))
  q = jax.ShapeDtypeStruct((40, 32, HEAD_DIM), kv_dtype)
  cu = jax.ShapeDtypeStruct((5,), jnp.int32)
  text = jax.export.export(ragged, platforms=["tpu"])(q, k, k, table, lengths, cu).mlir_module()
  assert "tpu_custom_call" in text


# ------------------------------------------------------------------- configuration errors


def test_block_sizes_is_frozen_hashable_and_validated():
  bs = tpu.BlockSizes(blocks_per_chunk=4, queries_per_tile=16)
  assert hash(bs) == hash(tpu.BlockSizes(blocks_per_chunk=4, queries_per_tile=16))
  with pytest.raises(dataclasses.FrozenInstanceError):
    bs.blocks_per_chunk = 2
  with pytest.raises(ValueError, match="blocks_per_chunk"):
    tpu.BlockSizes(blocks_per_chunk=0)
  with pytest.raises(ValueError, match="queries_per_tile"):
    tpu.BlockSizes(queries_per_tile=24)
  with pytest.raises(ValueError, match="smem_budget_bytes"):
    tpu.BlockSizes(smem_budget_bytes=0)
  with pytest.raises(ValueError, match="num_cores"):
    tpu.BlockSizes(num_cores=0)
  with pytest.raises(ValueError, match="kv_heads_per_step"):
    tpu.BlockSizes(kv_heads_per_step=0)
  with pytest.raises(ValueError, match="vmem_limit_bytes"):
    tpu.BlockSizes(vmem_limit_bytes=4096)
  with pytest.raises(ValueError, match="split_decode"):
    tpu.BlockSizes(split_decode=1)


def test_kv_heads_per_step_must_divide_num_kv_heads():
  k = jnp.zeros((2, 2, BS, HEAD_DIM), jnp.float32)
  q = jnp.zeros((1, 2, HEAD_DIM), jnp.float32)
  with pytest.raises(ValueError, match="kv_heads_per_step"):
    tpu.paged_attention(
      q,
      k,
      k,
      jnp.zeros((1, 1), jnp.int32),
      jnp.ones((1,), jnp.int32),
      block_sizes=tpu.BlockSizes(kv_heads_per_step=3),
      interpret=True,
    )


@pytest.mark.parametrize(
  "head_dim,block_size,kv_dtype,match",
  [
    (64, 8, jnp.float32, "head_dim"),
    # Compiles, but XLA would copy the pool every call (docs/tpu.md): refused too.
    (192, 8, jnp.float32, r"multiple of 128 .*head_dim 192"),
    (128, 4, jnp.float32, "block_size"),
    (128, 8, jnp.bfloat16, "block_size"),
  ],
)
def test_unsupported_tpu_shapes_raise_naming_the_argument(head_dim, block_size, kv_dtype, match):
  k = jnp.zeros((1, 2, block_size, head_dim), kv_dtype)
  q = jnp.zeros((1, 1, head_dim), jnp.float32)
  table = jnp.zeros((1, 1), jnp.int32)
  lengths = jnp.ones((1,), jnp.int32)
  with pytest.raises(ValueError, match=match):
    tpu.paged_attention(q, k, k, table, lengths, interpret=True)


def test_queries_per_tile_must_fit_q_dtype_tile():
  k = jnp.zeros((1, 2, 16, HEAD_DIM), jnp.bfloat16)
  q = jnp.zeros((4, 1, HEAD_DIM), jnp.bfloat16)
  cu = jnp.asarray([0, 4], jnp.int32)
  with pytest.raises(ValueError, match="queries_per_tile"):
    tpu.paged_attention(
      q,
      k,
      k,
      jnp.zeros((1, 1), jnp.int32),
      jnp.full((1,), 4, jnp.int32),
      cu,
      block_sizes=tpu.BlockSizes(queries_per_tile=8),
      interpret=True,
    )


# ------------------------------------------------------------------- lane-dense pools


# head_dim 64 (and 32) in lane-dense pools (kernels._layout): 128 // head_dim tokens a
# 128-lane row, the layout XLA keeps row-major on TPU without padding (issue 18, item 4).
# The oracle reads the same pools in the plain layout (a reshape: the same bytes).


def _dense(k, v):
  return _layout.pack(k), _layout.pack(v)


@pytest.mark.parametrize(
  "dtype,block_size,num_q_heads,num_kv_heads,head_dim,bpc",
  [
    (jnp.float32, 16, 6, 2, 64, 2),  # SmolLM2's group of 3; 8 rows a block
    (jnp.bfloat16, 32, 8, 2, 64, 1),  # 16 rows a block (a bf16 sublane tile)
    (jnp.float32, 32, 2, 1, 32, 2),  # 4 tokens a row
  ],
  ids=["f32-d64-group3", "bf16-d64", "f32-d32-mqa"],
)
def test_decode_lane_dense_matches_oracle(
  dtype, block_size, num_q_heads, num_kv_heads, head_dim, bpc
):
  # Edge lengths (0, 1, odd and even: a row whose second token is past the length), a hole,
  # NaN in every unused slot, chunks wholly visible (the unmasked path) and partial ones.
  rng = np.random.default_rng(30)
  lengths = [0, 1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5, 70]
  k, v, table, lengths = _cache(
    rng, lengths, num_kv_heads=num_kv_heads, block_size=block_size, max_blocks=5, dtype=dtype,
    holes=[(6, 1)], head_dim=head_dim,
  )  # fmt: skip
  q = jnp.asarray(rng.standard_normal((len(lengths), num_q_heads, head_dim)), dtype)
  kd, vd = _dense(k, v)
  assert kd.shape[3] == 128 and kd.shape[2] * 128 == block_size * head_dim
  out = tpu.paged_attention_decode(
    q, kd, vd, table, lengths, interpret=INTERPRET, lane_dense=True,
    block_sizes=tpu.BlockSizes(blocks_per_chunk=bpc),
  )  # fmt: skip
  _assert_no_races()
  chex.assert_equal_shape([out, q])
  chex.assert_type(out, q.dtype)
  _check(out, _oracle(q, k, v, table, lengths), dtype)
  assert np.all(np.asarray(out, np.float32)[0] == 0), "a length-0 sequence must return zeros"


def test_decode_lane_dense_window_soft_cap_and_public_api():
  rng = np.random.default_rng(31)
  k, v, table, lengths = _cache(
    rng, [3, 20, 33, 47], num_kv_heads=3, block_size=16, max_blocks=4, dtype=jnp.float32,
    head_dim=64,
  )  # fmt: skip
  q = jnp.asarray(rng.standard_normal((4, 9, 64)) * 4, jnp.float32)
  kw = dict(scale=0.2, sliding_window=13, logit_soft_cap=3.0)
  kd, vd = _dense(k, v)
  out = kernels.paged_attention(
    q, kd, vd, table, lengths, backend="tpu", interpret=INTERPRET, lane_dense=True, **kw
  )
  _assert_no_races()
  want = _oracle(q, k, v, table, lengths, **kw)
  _check(out, want, jnp.float32)
  # The reference reads the lane-dense pool through a reshape: the same result as the plain.
  ref = kernels.paged_attention(
    q, kd, vd, table, lengths, backend="reference", lane_dense=True, **kw
  )
  _check(ref, want, jnp.float32)


@pytest.mark.parametrize(
  "split_decode,window", [(True, None), (False, 5)], ids=["split", "one-launch-window"]
)
def test_ragged_lane_dense_matches_oracle(split_decode, window):
  rng = np.random.default_rng(32)
  q, k, v, table, lengths, cu = _ragged_case(rng, dtype=jnp.float32, block_size=16, head_dim=64)
  kd, vd = _dense(k, v)
  out = tpu.paged_attention_ragged(
    q, kd, vd, table, lengths, cu, sliding_window=window, interpret=INTERPRET, lane_dense=True,
    block_sizes=tpu.BlockSizes(blocks_per_chunk=2, queries_per_tile=8, split_decode=split_decode),
  )  # fmt: skip
  _assert_no_races()
  assert out.shape == q.shape
  _check(out, _oracle(q, k, v, table, lengths, cu, sliding_window=window), jnp.float32)
  assert np.all(np.asarray(out)[int(cu[-1]) :] == 0), "padding rows must return zeros"


def test_ragged_lane_dense_bf16_defaults_and_head_dim_32():
  rng = np.random.default_rng(33)
  lengths, q_lens = [40, 17, 70, 64, 1], [40, 1, 9, 1, 1]
  k, v, table, lengths = _cache(
    rng, lengths, num_kv_heads=2, block_size=32, max_blocks=3, dtype=jnp.bfloat16, head_dim=64
  )
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
  q = jnp.asarray(rng.standard_normal((int(cu[-1]) + 2, 8, 64)), jnp.bfloat16)
  out = tpu.paged_attention_ragged(
    q, *_dense(k, v), table, lengths, cu, interpret=INTERPRET, lane_dense=True
  )
  _assert_no_races()
  chex.assert_type(out, q.dtype)
  _check(out, _oracle(q, k, v, table, lengths, cu), jnp.bfloat16)
  # head_dim 32: four tokens a row, the merge of four parts in the ragged kernel; a window
  # of 6 starts at every position inside a row across the rows of a prefill.
  lengths, q_lens = [11, 0, 40, 1, 33, 70], [11, 0, 6, 1, 1, 3]
  k, v, table, lengths = _cache(
    rng, lengths, num_kv_heads=1, block_size=32, max_blocks=3, dtype=jnp.float32,
    holes=[(5, 1)], head_dim=32,
  )  # fmt: skip
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
  q = jnp.asarray(rng.standard_normal((int(cu[-1]) + 3, 2, 32)), jnp.float32)
  for window in (None, 6):
    out = tpu.paged_attention_ragged(
      q, *_dense(k, v), table, lengths, cu, interpret=INTERPRET, lane_dense=True,
      sliding_window=window,
      block_sizes=tpu.BlockSizes(blocks_per_chunk=1, queries_per_tile=8, split_decode=False),
    )  # fmt: skip
    _assert_no_races()
    _check(out, _oracle(q, k, v, table, lengths, cu, sliding_window=window), jnp.float32)


def test_decode_lane_dense_head_dim_32_window_at_every_row_offset():
  # Four tokens a row: windows of 5, 6 and 7 keys start at each offset inside a row.
  rng = np.random.default_rng(35)
  k, v, table, lengths = _cache(
    rng, [1, 3, 34, 35, 66, 90], num_kv_heads=1, block_size=32, max_blocks=3,
    dtype=jnp.float32, head_dim=32,
  )  # fmt: skip
  q = jnp.asarray(rng.standard_normal((6, 2, 32)), jnp.float32)
  for window in (5, 6, 7):
    out = tpu.paged_attention_decode(
      q, *_dense(k, v), table, lengths, sliding_window=window, interpret=INTERPRET,
      lane_dense=True, block_sizes=tpu.BlockSizes(blocks_per_chunk=1),
    )  # fmt: skip
    _assert_no_races()
    _check(out, _oracle(q, k, v, table, lengths, sliding_window=window), jnp.float32)


@pytest.mark.parametrize("pool", ["k", "v"])
def test_lane_dense_nan_in_a_visible_slot_surfaces_as_nan(pool):
  # A NaN a query sees (in K or in V) comes out as NaN through the parts' merge (decode:
  # outside the kernel; ragged: inside), and only for that sequence: in the ragged call
  # both sequences share one tile, and a NaN in V used to reach the other's rows through
  # their zero probabilities (0 x NaN; in the plain layout too, checked below).
  rng = np.random.default_rng(34)
  k, v, table, lengths = _cache(
    rng, [9, 5], num_kv_heads=1, block_size=16, max_blocks=1, dtype=jnp.float32, head_dim=64
  )
  where = (slice(None), int(table[0, 0]), 3)  # position 3: the second token of its row
  if pool == "k":
    k = k.at[where].set(jnp.nan)
  else:
    v = v.at[where].set(jnp.nan)
  q = jnp.asarray(rng.standard_normal((2, 2, 64)), jnp.float32)
  kd, vd = _dense(k, v)
  out = np.asarray(
    tpu.paged_attention_decode(q, kd, vd, table, lengths, interpret=True, lane_dense=True)
  )
  assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
  cu = jnp.asarray([0, 1, 2], jnp.int32)
  out = np.asarray(
    tpu.paged_attention_ragged(
      q, kd, vd, table, lengths, cu, interpret=True, lane_dense=True,
      block_sizes=tpu.BlockSizes(queries_per_tile=8, split_decode=False),
    )
  )  # fmt: skip
  assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


def test_ragged_nan_in_one_sequences_v_stays_out_of_the_other_rows_of_its_tile():
  # Plain layout: two sequences' rows in one ragged tile, a NaN in a V slot the first one
  # sees. Before rows_ok the second sequence came out all NaN (0 x NaN in p @ V).
  rng = np.random.default_rng(36)
  k, v, table, lengths = _cache(
    rng, [9, 5], num_kv_heads=1, block_size=BS, max_blocks=2, dtype=jnp.float32
  )
  v = v.at[:, int(table[0, 0]), 3].set(jnp.nan)
  q = jnp.asarray(rng.standard_normal((2, 2, HEAD_DIM)), jnp.float32)
  cu = jnp.asarray([0, 1, 2], jnp.int32)
  out = np.asarray(
    tpu.paged_attention_ragged(
      q, k, v, table, lengths, cu, interpret=True,
      block_sizes=tpu.BlockSizes(queries_per_tile=8, split_decode=False),
    )
  )  # fmt: skip
  assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


@pytest.mark.parametrize(
  "shape,q_head_dim,kv_dtype,lane_dense,match",
  [
    # 8 rows a block of bf16: half a sublane tile; block_size must be a multiple of 32.
    ((1, 2, 8, 128), 64, jnp.bfloat16, True, "multiple of 32"),
    ((1, 2, 8, 128), 48, jnp.float32, True, "head_dim 32 or 64 in rows of 128"),
    ((1, 2, 128, 128), 64, jnp.int8, True, "8-bit"),
    # Not said to be lane-dense: a head_dim 64 q against rows of 128 is a mistake (the pool
    # may be a plain head_dim 128 one), refused with the hint.
    ((1, 2, 8, 128), 64, jnp.float32, False, "head_dim 64 .* != k_blocks head_dim 128.*lane_dense"),
    ((1, 2, 16, 64), 64, jnp.float32, True, "rows of 128"),
  ],
  ids=["bf16-rows-8", "head-dim-48", "int8", "not-said", "plain-pool-said-dense"],
)
def test_unsupported_lane_dense_pools_raise(shape, q_head_dim, kv_dtype, lane_dense, match):
  k = jnp.zeros(shape, kv_dtype)
  q = jnp.zeros((1, 1, q_head_dim), jnp.float32)
  scales = {}
  if kv_dtype == jnp.int8:
    ones = jnp.ones(shape[:3], jnp.float32)
    scales = dict(k_scales=ones, v_scales=ones)
  table, lengths = jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32)
  with pytest.raises(ValueError, match=match):
    tpu.paged_attention(q, k, k, table, lengths, interpret=True, lane_dense=lane_dense, **scales)
  if kv_dtype != jnp.bfloat16:  # (bf16 rows of 8 are a TPU rule only)
    with pytest.raises(ValueError, match=match):
      kernels.paged_attention(
        q, k, k, table, lengths, backend="reference", lane_dense=lane_dense, **scales
      )
  if not lane_dense:  # the kernels called directly refuse it too
    with pytest.raises(ValueError, match="lane_dense"):
      tpu.paged_attention_decode(q, k, k, table, lengths, interpret=True)


@pytest.mark.parametrize("ragged", [False, True], ids=["decode", "ragged"])
def test_lane_dense_dmas_move_whole_rows_of_128(ragged):
  # head_dim 64, bf16, block 32 in a lane-dense pool: each block is one DMA for K and one
  # for V of all 8 heads, [8, 16 rows, 128 lanes] (32 KiB: the bytes of a head_dim 128
  # block of 16), into K/V slots of 128-lane rows, and one wait takes a whole chunk.
  from kernels.tpu import _config

  bpc, max_blocks = 4, 16
  kv = jax.ShapeDtypeStruct((8, 64, 16, 128), jnp.bfloat16)
  table = jax.ShapeDtypeStruct((4, max_blocks), jnp.int32)
  lengths = jax.ShapeDtypeStruct((4,), jnp.int32)
  bs = tpu.BlockSizes(blocks_per_chunk=bpc, split_decode=False)
  if ragged:
    q = jax.ShapeDtypeStruct((32, 32, 64), jnp.bfloat16)
    cu = jax.ShapeDtypeStruct((5,), jnp.int32)
    fn = lambda q, k, v, t, n, c: tpu.paged_attention(  # noqa: E731
      q, k, v, t, n, c, block_sizes=bs, lane_dense=True
    )
    got = _kernel_dmas(fn, q, kv, kv, table, lengths, cu, name="_ragged_kernel")
  else:
    q = jax.ShapeDtypeStruct((4, 32, 64), jnp.bfloat16)
    fn = lambda q, k, v, t, n: tpu.paged_attention(  # noqa: E731
      q, k, v, t, n, block_sizes=bs, lane_dense=True
    )
    got = _kernel_dmas(fn, q, kv, kv, table, lengths)
  tuned = _config.resolve(
    bs, q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16, num_kv_heads=8, block_size=16,
    head_dim=128, max_blocks=max_blocks, group=8, ragged=ragged,
  )  # fmt: skip
  plan = _config.dma_plan(tuned, block_size=16, head_dim=128, kv_dtype=jnp.bfloat16, ragged=ragged)
  assert {w for w, _ in got.starts} == {(8, 16, 128)}
  assert plan.bytes_per_dma == 8 * 16 * 128 * 2 == 32 * 1024
  assert plan.chunk_tokens == bpc * 16  # rows: 2 tokens each
  (kv_slots,) = [shape for shape in got.scratch if len(shape) == 5]
  assert kv_slots == (2, 2, 8, bpc * 16, 128)
  assert got.waits.count(plan.dmas_per_chunk * plan.bytes_per_dma) == 1
