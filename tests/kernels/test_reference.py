"""kernels.reference.paged_attention against a float64 NumPy loop written from its docstring.

The loop walks each sequence's block table one key position at a time, so it shares no
code (and no gather or masking trick) with the reference under test.
"""

from __future__ import annotations

import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import reference
from kernels.testing import tolerance


def attention_loop(
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
  """Float64 paged attention, one (query row, query head) at a time."""
  q = np.asarray(q).astype(np.float64)
  k_blocks = np.asarray(k_blocks).astype(np.float64)
  v_blocks = np.asarray(v_blocks).astype(np.float64)
  block_table = np.asarray(block_table)
  lengths = np.asarray(lengths)
  num_kv_heads, _, block_size, head_dim = k_blocks.shape
  num_q_heads = q.shape[1]
  group = num_q_heads // num_kv_heads
  if scale is None:
    scale = 1.0 / math.sqrt(head_dim)
  batch = lengths.shape[0]
  cu = np.arange(batch + 1) if cu_q_lens is None else np.asarray(cu_q_lens)
  out = np.zeros(q.shape, np.float64)  # rows past cu[-1] stay zero
  for b in range(batch):
    q_len = int(cu[b + 1] - cu[b])
    for i in range(q_len):
      row = int(cu[b]) + i
      pos = int(lengths[b]) - q_len + i
      first = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
      key_positions = range(first, pos + 1)
      if len(key_positions) == 0:
        continue  # no visible key: zeros
      for h in range(num_q_heads):
        kv = h // group
        keys, values = [], []
        for p in key_positions:
          block = int(block_table[b, p // block_size])
          assert block >= 0, "test data bug: a visible position in an unused table entry"
          keys.append(k_blocks[kv, block, p % block_size])
          values.append(v_blocks[kv, block, p % block_size])
        logits = scale * (np.stack(keys) @ q[row, h])
        if logit_soft_cap is not None:
          logits = logit_soft_cap * np.tanh(logits / logit_soft_cap)
        w = np.exp(logits - logits.max())
        out[row, h] = (w / w.sum()) @ np.stack(values)
  return out


def make_case(
  rng,
  lengths,
  q_lens=None,
  *,
  block_size=4,
  num_q_heads=4,
  num_kv_heads=2,
  head_dim=16,
  extra_blocks=3,
  pad_rows=0,
  spare_entry=False,
  dtype="float32",
  q_scale=1.0,
):
  """Random inputs with a shuffled block table.

  Each sequence gets ceil(length / block_size) physical blocks taken from a random
  permutation of the pool; ``spare_entry`` gives some sequences one more real block past
  their length (reserved, not yet written). ``extra_blocks`` blocks belong to nobody.

  Returns the arrays and a bool mask [num_blocks, block_size] of the slots that hold a
  token of some sequence.
  """
  lengths = np.asarray(lengths, np.int32)
  batch = len(lengths)
  need = [
    -(-int(n) // block_size) + (1 if spare_entry and b % 2 == 0 else 0)
    for b, n in enumerate(lengths)
  ]
  max_blocks = max(max(need), 1) + 1  # at least one trailing unused (-1) entry
  num_blocks = sum(need) + extra_blocks
  perm = rng.permutation(num_blocks)
  block_table = np.full((batch, max_blocks), kernels.INVALID_BLOCK, np.int32)
  used = np.zeros((num_blocks, block_size), bool)
  taken = 0
  for b in range(batch):
    block_table[b, : need[b]] = perm[taken : taken + need[b]]
    taken += need[b]
    for p in range(lengths[b]):
      used[block_table[b, p // block_size], p % block_size] = True
  if q_lens is None:
    num_rows, cu_q_lens = batch, None
  else:
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    num_rows = int(cu_q_lens[-1]) + pad_rows
  shape = (num_kv_heads, num_blocks, block_size, head_dim)
  to = lambda x: jnp.asarray(x, getattr(jnp, dtype))
  return dict(
    q=to(q_scale * rng.standard_normal((num_rows, num_q_heads, head_dim))),
    k_blocks=to(rng.standard_normal(shape)),
    v_blocks=to(rng.standard_normal(shape)),
    block_table=jnp.asarray(block_table),
    lengths=jnp.asarray(lengths),
    cu_q_lens=None if cu_q_lens is None else jnp.asarray(cu_q_lens),
  ), used


ARG_ORDER = ("q", "k_blocks", "v_blocks", "block_table", "lengths", "cu_q_lens")


def run_both(case, **options):
  """The reference called directly, and through the public API; both must agree exactly."""
  args = [case[name] for name in ARG_ORDER]
  # Positional, as the API passes them, so both calls share one compiled function.
  direct = reference.paged_attention(*args, **options)
  via_api = kernels.paged_attention(**case, **options, backend="reference")
  np.testing.assert_array_equal(np.asarray(direct), np.asarray(via_api))
  return direct


def check_against_loop(case, out, **options):
  chex.assert_shape(out, case["q"].shape)
  chex.assert_type(out, case["q"].dtype)
  expected = attention_loop(**case, **options)
  tol = tolerance("attention_vs_float64", out.dtype)  # per dtype of q/k/v
  # np.testing rather than chex: equal_nan=False, a NaN in both must still fail.
  np.testing.assert_allclose(np.asarray(out).astype(np.float64), expected, equal_nan=False, **tol)


BS = 4  # block_size in these tests: lengths 0, 1, BS-1, BS, BS+1 cover every block edge
EDGE_LENGTHS = [0, 1, BS - 1, BS, BS + 1, 2 * BS, 2 * BS + 1]
# (dtype, num_q_heads, num_kv_heads): every head grouping in float32; bf16 once, with GQA.
DTYPE_HEADS = [
  pytest.param("float32", 2, 2, id="mha-float32"),
  pytest.param("float32", 4, 2, id="gqa-float32"),
  pytest.param("float32", 4, 1, id="mqa-float32"),
  pytest.param("bfloat16", 4, 2, id="gqa-bfloat16"),
]


@pytest.mark.parametrize("dtype,num_q_heads,num_kv_heads", DTYPE_HEADS)
def test_decode_matches_float64_loop(dtype, num_q_heads, num_kv_heads):
  rng = np.random.default_rng(1)
  lengths = EDGE_LENGTHS + list(rng.integers(2, 6 * BS, size=3))
  case, _ = make_case(
    rng, lengths, block_size=BS, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, dtype=dtype
  )
  out = run_both(case)
  check_against_loop(case, out)
  # Length 0 sees no key at all.
  np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)


# (length, q_len) per sequence: empty, single token, whole prompts at every block edge,
# chunked prefill after existing context, a context with no queries this step, random.
PREFILL_SEQS = [
  (0, 0),
  (1, 1),
  (BS - 1, BS - 1),
  (BS, BS),
  (BS + 1, BS + 1),
  (2 * BS + 3, 5),
  (BS + 1, 1),
  (7, 0),
  (3 * BS, 2),
]


def _prefill_lengths(rng):
  lengths, q_lens = map(list, zip(*PREFILL_SEQS, strict=True))
  for _ in range(2):
    n = int(rng.integers(1, 5 * BS))
    lengths.append(n)
    q_lens.append(int(rng.integers(0, n + 1)))
  return lengths, q_lens


@pytest.mark.parametrize("dtype,num_q_heads,num_kv_heads", DTYPE_HEADS)
def test_ragged_prefill_matches_float64_loop(dtype, num_q_heads, num_kv_heads):
  rng = np.random.default_rng(2)
  lengths, q_lens = _prefill_lengths(rng)
  case, _ = make_case(
    rng,
    lengths,
    q_lens,
    block_size=BS,
    num_q_heads=num_q_heads,
    num_kv_heads=num_kv_heads,
    pad_rows=3,
    dtype=dtype,
  )
  out = run_both(case)
  check_against_loop(case, out)
  # Bucket padding rows past cu_q_lens[-1] hold random queries but must return zeros.
  real = int(case["cu_q_lens"][-1])
  assert out.shape[0] == real + 3
  np.testing.assert_array_equal(np.asarray(out[real:], np.float32), 0.0)


@pytest.mark.parametrize("rows_per_chunk", [1, 5])
def test_row_chunking_does_not_change_results(rows_per_chunk):
  """More rows than one chunk, with a ragged last chunk, through the lax.map path."""
  rng = np.random.default_rng(3)
  lengths, q_lens = _prefill_lengths(rng)
  case, _ = make_case(rng, lengths, q_lens, block_size=BS, pad_rows=2)
  out = reference.paged_attention(**case, rows_per_chunk=rows_per_chunk)
  check_against_loop(case, out)


OPTIONS = [
  pytest.param(dict(scale=0.37), id="scale"),
  pytest.param(dict(sliding_window=1), id="window1"),
  pytest.param(dict(sliding_window=3), id="window3"),
  pytest.param(dict(logit_soft_cap=2.0), id="softcap"),
  pytest.param(dict(scale=0.8, sliding_window=5, logit_soft_cap=3.0), id="all"),
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_options_match_float64_loop(mode, options):
  rng = np.random.default_rng(4)
  # q_scale 4 pushes logits to ~|10| so that the soft cap bends them for real.
  if mode == "decode":
    case, _ = make_case(rng, EDGE_LENGTHS + [17, 22], block_size=BS, q_scale=4.0)
  else:
    lengths, q_lens = _prefill_lengths(rng)
    case, _ = make_case(rng, lengths, q_lens, block_size=BS, pad_rows=1, q_scale=4.0)
  out = run_both(case, **options)
  check_against_loop(case, out, **options)


def test_options_change_the_result():
  """Guards the option tests: each option must actually move the output here."""
  rng = np.random.default_rng(5)
  lengths, q_lens = _prefill_lengths(rng)
  case, _ = make_case(rng, lengths, q_lens, block_size=BS, q_scale=4.0)
  plain = np.asarray(reference.paged_attention(**case))
  for options in (dict(scale=0.37), dict(sliding_window=3), dict(logit_soft_cap=2.0)):
    other = np.asarray(reference.paged_attention(**case, **options))
    assert np.abs(other - plain).max() > 1e-2, options


WINDOW_SOFTCAP = dict(sliding_window=3, logit_soft_cap=2.0)


def _fill_unused(case, used, fill):
  """Copies of k/v blocks where every slot that holds no token of any sequence is ``fill``
  (an array of the pool's shape)."""
  mask = jnp.asarray(used)[None, :, :, None]
  dtype = case["k_blocks"].dtype
  return {
    **case,
    "k_blocks": jnp.where(mask, case["k_blocks"], jnp.asarray(fill[0], dtype)),
    "v_blocks": jnp.where(mask, case["v_blocks"], jnp.asarray(fill[1], dtype)),
  }


@pytest.mark.parametrize(
  "mode,options,dtype",
  [
    pytest.param("decode", {}, "float32", id="decode"),
    pytest.param("decode", WINDOW_SOFTCAP, "float32", id="decode-window-softcap"),
    pytest.param("prefill", {}, "float32", id="prefill"),
    pytest.param("prefill", WINDOW_SOFTCAP, "float32", id="prefill-window-softcap"),
    pytest.param("prefill", {}, "bfloat16", id="prefill-bfloat16"),
  ],
)
def test_nan_in_unused_blocks_and_slots_never_changes_output(mode, options, dtype):
  """Freed blocks, blocks past a sequence's length (reserved but unwritten), and the slots
  past each length in its last block may hold anything: NaN must give bit for bit the same
  output as random finite values there."""
  rng = np.random.default_rng(6)
  if mode == "decode":
    case, used = make_case(rng, EDGE_LENGTHS + [13], block_size=BS, spare_entry=True, dtype=dtype)
  else:
    lengths, q_lens = _prefill_lengths(rng)
    case, used = make_case(
      rng, lengths, q_lens, block_size=BS, spare_entry=True, pad_rows=2, dtype=dtype
    )
  assert (~used).sum() > 2 * BS  # whole free blocks and partial blocks are both covered
  shape = (2,) + case["k_blocks"].shape
  with_nan = _fill_unused(case, used, np.full(shape, np.nan))
  with_noise = _fill_unused(case, used, 100.0 * rng.standard_normal(shape))
  out_nan = np.asarray(run_both(with_nan, **options))
  out_noise = np.asarray(run_both(with_noise, **options))
  assert np.isfinite(out_nan.astype(np.float32)).all()
  np.testing.assert_array_equal(out_nan, out_noise)
  check_against_loop(with_nan, out_nan, **options)


def test_no_query_rows_and_only_padding_rows():
  """A step with no real query (all rows are bucket padding) returns zeros of q's shape."""
  rng = np.random.default_rng(7)
  case, _ = make_case(rng, [5, 9], [0, 0], block_size=BS, pad_rows=3)
  out = run_both(case)
  assert out.shape == (3, 4, 16)
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  case, _ = make_case(rng, [5, 9], [0, 0], block_size=BS, pad_rows=0)
  assert run_both(case).shape == (0, 4, 16)


def test_nan_in_a_visible_slot_surfaces_as_nan():
  """A NaN a query can see (a model gone wrong, a bad kernel write) must not be hidden as
  a zero output: only the rows that see it turn NaN, like the float64 loop."""
  rng = np.random.default_rng(8)
  case, used = make_case(rng, [9, 6], block_size=BS)
  table = np.asarray(case["block_table"])
  k = np.asarray(case["k_blocks"]).copy()
  k[:, table[0, 0], 2, :] = np.nan  # position 2 of sequence 0, visible to its query
  out = np.asarray(run_both({**case, "k_blocks": jnp.asarray(k)}))
  assert np.isnan(out[0]).all()
  assert np.isfinite(out[1]).all()
