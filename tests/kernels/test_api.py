"""kernels.paged_attention's backend switch and its static input checks."""

from __future__ import annotations

import ast
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import _api
from kernels.testing import tolerance

# ---------------------------------------------------------------------------------------------
# Backend resolution.


@pytest.mark.parametrize(
  "platform,expected", [("cpu", "reference"), ("gpu", "gpu"), ("tpu", "tpu")]
)
def test_auto_picks_the_kernel_of_the_platform(monkeypatch, platform, expected):
  monkeypatch.setattr(_api, "_platform", lambda: platform)
  assert kernels.resolve_backend("auto") == expected


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the real CPU platform")
def test_auto_on_this_cpu_is_the_reference():
  assert kernels.resolve_backend("auto") == "reference"
  assert kernels.resolve_backend("reference") == "reference"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_pallas_backend_on_cpu_without_interpret_raises_with_the_reason(monkeypatch, backend):
  monkeypatch.setattr(_api, "_platform", lambda: "cpu")
  with pytest.raises(kernels.BackendUnavailableError, match=rf"needs a {backend.upper()}.*'cpu'"):
    kernels.resolve_backend(backend)
  # The error says how to get a result instead: interpret mode or the reference.
  with pytest.raises(kernels.BackendUnavailableError, match="interpret=True"):
    kernels.resolve_backend(backend)
  # With interpret mode the Pallas backend is allowed on CPU.
  assert kernels.resolve_backend(backend, interpret=True) == backend


def test_other_accelerator_is_unavailable_too(monkeypatch):
  monkeypatch.setattr(_api, "_platform", lambda: "gpu")
  with pytest.raises(kernels.BackendUnavailableError, match="needs a TPU"):
    kernels.resolve_backend("tpu")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="needs a platform without GPU")
def test_paged_attention_never_falls_back_silently():
  with pytest.raises(kernels.BackendUnavailableError, match="needs a GPU"):
    kernels.paged_attention(*valid_inputs(), backend="gpu")


@pytest.mark.parametrize("backend", ["cuda", "Reference", "", "pallas"])
def test_unknown_backend_is_a_value_error(backend):
  with pytest.raises(ValueError, match=r"backend must be one of .*"):
    kernels.resolve_backend(backend)
  with pytest.raises(ValueError, match="backend must be one of"):
    kernels.paged_attention(*valid_inputs(), backend=backend)


# ---------------------------------------------------------------------------------------------
# validate_inputs: every static error names the argument.

BATCH, HQ, HKV, NUM_BLOCKS, BS, D, MAX_BLOCKS = 3, 4, 2, 6, 4, 8, 2


def valid_inputs(num_tokens=None):
  """Decode inputs (or ragged ones with ``num_tokens`` rows) that pass every check."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((num_tokens or BATCH, HQ, D)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((HKV, NUM_BLOCKS, BS, D)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((HKV, NUM_BLOCKS, BS, D)), jnp.float32)
  block_table = jnp.asarray([[0, 1], [2, -1], [3, 4]], jnp.int32)
  lengths = jnp.asarray([5, 2, 8], jnp.int32)
  return q, k, v, block_table, lengths


def test_valid_inputs_pass():
  """The base case of every error test below is itself valid, in both modes."""
  assert kernels.validate_inputs(*valid_inputs()) is None
  cu_q_lens = jnp.asarray([0, 2, 3, 7], jnp.int32)
  assert kernels.validate_inputs(*valid_inputs(num_tokens=9), cu_q_lens) is None


def _replace(index, value, num_tokens=None):
  args = list(valid_inputs(num_tokens))
  args[index] = value
  return args


Q, K, V, TABLE, LENGTHS = range(5)
f32 = jnp.float32
CASES = [
  # (id, args index, replacement, match)
  ("k_blocks_not_4d", K, jnp.zeros((HKV, NUM_BLOCKS * BS, D), f32), r"k_blocks must be"),
  (
    "v_shape_differs",
    V,
    jnp.zeros((HKV, NUM_BLOCKS, BS + 1, D), f32),
    r"v_blocks \(2, 6, 5, 8\) float32 must match k_blocks \(2, 6, 4, 8\)",
  ),
  (
    "v_dtype_differs",
    V,
    jnp.zeros((HKV, NUM_BLOCKS, BS, D), jnp.bfloat16),
    r"v_blocks .*bfloat16 must match k_blocks .*float32",
  ),
  ("q_not_3d", Q, jnp.zeros((BATCH, HQ * D), f32), r"q must be \[num_tokens or batch"),
  (
    "head_dim_mismatch",
    Q,
    jnp.zeros((BATCH, HQ, D + 8), f32),
    r"q head_dim 16 .* != k_blocks head_dim 8",
  ),
  (
    "heads_not_dividing",
    Q,
    jnp.zeros((BATCH, 3, D), f32),
    r"num_q_heads 3 .* not a multiple of num_kv_heads 2",
  ),
  ("q_int", Q, jnp.zeros((BATCH, HQ, D), jnp.int32), r"q must be float32, bfloat16 or float16"),
  ("k_v_int", None, None, r"k_blocks must be float32, bfloat16, float16 or 8-bit"),
  (
    "block_table_int64",
    TABLE,
    np.zeros((BATCH, MAX_BLOCKS), np.int64),
    r"block_table must be int32 .*int64",
  ),
  (
    "block_table_float",
    TABLE,
    jnp.zeros((BATCH, MAX_BLOCKS), f32),
    r"block_table must be int32 .*float32",
  ),
  (
    "block_table_1d",
    TABLE,
    jnp.zeros((BATCH * MAX_BLOCKS,), jnp.int32),
    r"block_table must be int32 \[batch, max_blocks\]",
  ),
  ("lengths_int64", LENGTHS, np.zeros((BATCH,), np.int64), r"lengths must be int32 .*int64"),
  ("lengths_uint32", LENGTHS, np.zeros((BATCH,), np.uint32), r"lengths must be int32"),
  ("lengths_2d", LENGTHS, jnp.zeros((BATCH, 1), jnp.int32), r"lengths must be int32 \[batch\]"),
  (
    "lengths_batch_mismatch",
    LENGTHS,
    jnp.zeros((BATCH + 1,), jnp.int32),
    r"lengths \(4,\) int32 and block_table \(3, 2\) int32 disagree on batch",
  ),
  (
    "decode_q_batch_mismatch",
    Q,
    jnp.zeros((BATCH + 2, HQ, D), f32),
    r"decode \(cu_q_lens=None\) needs one query per sequence: q \(5, 4, 8\)",
  ),
]


@pytest.mark.parametrize("index,value,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validate_inputs_names_the_argument(index, value, match):
  if index is None:  # integer K and V together, so the v-matches-k check passes first
    args = list(valid_inputs())
    args[K] = args[V] = jnp.zeros((HKV, NUM_BLOCKS, BS, D), jnp.int32)
  else:
    args = _replace(index, value)
  with pytest.raises(ValueError, match=match):
    kernels.validate_inputs(*args)
  # The public entry point runs the same checks before anything compiles.
  with pytest.raises(ValueError, match=match):
    kernels.paged_attention(*args, backend="reference")


@pytest.mark.parametrize(
  "pool,q_shape,match",
  [
    ((0, NUM_BLOCKS, BS, D), (BATCH, HQ, D), r"num_kv_heads, .* >= 1, got \(0, 6, 4, 8\)"),
    ((HKV, NUM_BLOCKS, 0, D), (BATCH, HQ, D), r"head_dim >= 1, got \(2, 6, 0, 8\)"),
    ((HKV, NUM_BLOCKS, BS, 0), (BATCH, HQ, 0), r"head_dim >= 1, got \(2, 6, 4, 0\)"),
    ((HKV, NUM_BLOCKS, BS, D), (BATCH, 0, D), r"q .* heads and head_dim >= 1, got \(3, 0, 8\)"),
  ],
  ids=["no_kv_heads", "block_size_0", "head_dim_0", "no_q_heads"],
)
def test_empty_pool_or_query_dimensions_are_refused(pool, q_shape, match):
  # Were: a modulo by zero, a max over an empty array, 0.0 to a negative power. (A pool
  # of 0 blocks stays allowed: test_every_backend_returns_zeros_when_there_is_no_block_to_read.)
  _, _, _, table, lengths = valid_inputs()
  q = jnp.zeros(q_shape, f32)
  k = v = jnp.zeros(pool, f32)
  with pytest.raises(ValueError, match=match):
    kernels.paged_attention(q, k, v, table, lengths, backend="reference")


@pytest.mark.parametrize(
  "cu_q_lens,match",
  [
    (
      jnp.asarray([0, 2, 9], jnp.int32),
      r"cu_q_lens must be int32 \[batch \+ 1\] = \[4\], "
      r"got \(3,\) int32",
    ),
    (jnp.asarray([0, 2, 3, 7, 9], jnp.int32), r"= \[4\], got \(5,\) int32"),
    (np.asarray([0, 2, 3, 9], np.int64), r"cu_q_lens must be int32 .*int64"),
    (jnp.asarray([[0, 2, 3, 9]], jnp.int32), r"cu_q_lens must be int32 .*\(1, 4\)"),
  ],
  ids=["too_short", "too_long", "int64", "2d"],
)
def test_bad_cu_q_lens_is_named(cu_q_lens, match):
  args = valid_inputs(num_tokens=9)
  with pytest.raises(ValueError, match=match):
    kernels.validate_inputs(*args, cu_q_lens)
  with pytest.raises(ValueError, match=match):
    kernels.paged_attention(*args, cu_q_lens, backend="reference")


BAD_OPTIONS = [
  # (id, options, match)
  (
    "window_0",
    dict(sliding_window=0),
    r"sliding_window must be None or an int >= 1, got 0 \(int\)",
  ),
  ("window_negative", dict(sliding_window=-2), r"sliding_window .* got -2"),
  # Fractional windows used to mean 3 keys on the reference, 2 on GPU, a TypeError on TPU.
  ("window_fraction", dict(sliding_window=2.5), r"sliding_window .* got 2.5 \(float\)"),
  ("window_whole_float", dict(sliding_window=3.0), r"sliding_window .* got 3.0 \(float\)"),
  ("window_bool", dict(sliding_window=True), r"sliding_window .* got True \(bool\)"),
  ("window_str", dict(sliding_window="4"), r"sliding_window .* got '4' \(str\)"),
  ("scale_nan", dict(scale=float("nan")), r"scale must be None or a finite real number, got nan"),
  ("scale_inf", dict(scale=float("inf")), r"scale must be .* got inf"),
  ("scale_np_nan", dict(scale=np.float32("nan")), r"scale must be .*nan"),
  ("scale_str", dict(scale="0.5"), r"scale must be .* got '0.5'"),
  # A static option: a 0-d array is refused with what to pass instead.
  ("scale_array", dict(scale=jnp.float32(0.5)), r"scale must be .*\(an array: pass a Python"),
  (
    "cap_0",
    dict(logit_soft_cap=0.0),
    r"logit_soft_cap must be None or a finite number > 0, got 0.0",
  ),
  ("cap_negative", dict(logit_soft_cap=-3.0), r"logit_soft_cap must be .*> 0, got -3.0"),
  ("cap_nan", dict(logit_soft_cap=float("nan")), r"logit_soft_cap must be .*got nan"),
  ("cap_inf", dict(logit_soft_cap=float("inf")), r"logit_soft_cap must be .*got inf"),
  ("cap_bool", dict(logit_soft_cap=True), r"logit_soft_cap must be .*got True"),
]


@pytest.mark.parametrize(
  "options,match",
  [c[1:] for c in BAD_OPTIONS] + [(dict(block_sizes=(8, 8)), r"block_sizes tunes a Pallas kernel")],
  ids=[c[0] for c in BAD_OPTIONS] + ["block_sizes_for_reference"],
)
def test_bad_options_are_named(options, match):
  with pytest.raises(ValueError, match=match):
    kernels.paged_attention(*valid_inputs(), backend="reference", **options)


def _inputs_every_backend_takes():
  """Decode inputs that the GPU (head_dim a multiple of 16 up to 256, power-of-two
  block_size) and the TPU (head_dim a multiple of 128, block_size a multiple of 8 for
  float32) backends accept."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((2, 2, 128)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 4, 8, 128)), jnp.float32)
  table = jnp.asarray([[0, 1], [2, -1]], jnp.int32)
  return q, k, k, table, jnp.asarray([11, 5], jnp.int32)


@pytest.mark.parametrize(
  "options,match", [c[1:] for c in BAD_OPTIONS], ids=[c[0] for c in BAD_OPTIONS]
)
def test_bad_options_are_refused_by_every_backend_and_entry_point(options, match):
  """Every backend refuses the same options, through the dispatcher and called directly."""
  from kernels import gpu, tpu

  args = _inputs_every_backend_takes()
  for backend in ("gpu", "tpu"):
    with pytest.raises(ValueError, match=match):
      kernels.paged_attention(*args, backend=backend, interpret=True, **options)
  for entry_point in (gpu.paged_attention, tpu.paged_attention):
    with pytest.raises(ValueError, match=match):
      entry_point(*args, interpret=True, **options)


def test_numpy_scalar_options_mean_what_python_scalars_mean():
  args = valid_inputs()
  want = kernels.paged_attention(
    *args, backend="reference", scale=0.3, sliding_window=3, logit_soft_cap=2.0
  )
  got = kernels.paged_attention(
    *args,
    backend="reference",
    scale=np.float32(0.3),
    sliding_window=np.int64(3),
    logit_soft_cap=np.float64(2.0),
  )
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(want), **tolerance("same_math_traced_twice", "float32")
  )


# ---------------------------------------------------------------------------------------------
# Host (NumPy) metadata is value-checked: a gather would clamp a bad block id and silently
# read another request's block.


def _host(num_tokens=None, **replace):
  q, k, v, table, lengths = valid_inputs(num_tokens)
  table, lengths = np.asarray(table), np.asarray(lengths)
  return [q, k, v, replace.get("block_table", table), replace.get("lengths", lengths)]


def test_valid_host_metadata_passes_and_matches_device_metadata():
  out_host = kernels.paged_attention(*_host(), backend="reference")
  out_device = kernels.paged_attention(*valid_inputs(), backend="reference")
  np.testing.assert_array_equal(np.asarray(out_host), np.asarray(out_device))


@pytest.mark.parametrize(
  "replace,match",
  [
    (
      dict(block_table=np.asarray([[0, 1], [2, -1], [3, NUM_BLOCKS]], np.int32)),
      rf"block_table holds ids outside \[0, {NUM_BLOCKS}\).*\[{NUM_BLOCKS}\] at \(row, entry\) "
      r"\[\(2, 1\)\]",
    ),
    (dict(block_table=np.asarray([[0, 1], [2, -2], [3, 4]], np.int32)), r"\[-2\]"),
    (
      dict(lengths=np.asarray([5, -3, 8], np.int32)),
      r"lengths must be in \[0, max_blocks \* block_size\] = \[0, 8\]; rows \[1\] hold \[-3\]",
    ),
    (dict(lengths=np.asarray([5, 2, 9], np.int32)), r"rows \[2\] hold \[9\]"),
    (dict(block_table=[[0, 1], [2, -1], [3, 4]]), r"block_table must be a JAX or NumPy array"),
    # Length 5 with block_size 4 uses entries 0 and 1 of row 0; length 8 both of row 2.
    (
      dict(block_table=np.asarray([[0, -1], [2, -1], [-1, 4]], np.int32)),
      r"block_table holds -1 \(unused\) inside the blocks that lengths use, at \(row, entry\) "
      r"\[\(0, 1\), \(2, 0\)\]; those rows' lengths are \[5, 8\], so entries below "
      r"ceil\(length / 4\)",
    ),
    (
      dict(
        block_table=np.asarray([[0, 1], [-1, -1], [3, 4]], np.int32),
        lengths=np.asarray([5, 1, 8], np.int32),
      ),
      r"at \(row, entry\) \[\(1, 0\)\]; those rows' lengths are \[1\]",
    ),
  ],
  ids=[
    "id_past_pool",
    "negative_id",
    "negative_length",
    "length_past_table",
    "list",
    "unused_inside_lengths",
    "unused_first_block",
  ],
)
def test_bad_host_metadata_values_are_named(replace, match):
  with pytest.raises(ValueError, match=match):
    kernels.paged_attention(*_host(**replace), backend="reference")


def test_unused_entries_past_the_lengths_are_fine_and_device_tables_are_trusted():
  # -1 only past ceil(length / block_size): what BlockTable.from_allocator builds.
  table = np.asarray([[0, -1], [-1, -1], [3, 4]], np.int32)
  lengths = np.asarray([4, 0, 5], np.int32)
  out = kernels.paged_attention(*_host(block_table=table, lengths=lengths), backend="reference")
  assert np.all(np.asarray(out)[1] == 0)  # length 0: no key, zeros
  # A hole inside the lengths of a device table is not checked (it would need a transfer;
  # a kernel cannot raise): its keys are skipped, as documented.
  hole = jnp.asarray([[0, -1], [2, -1], [3, 4]], jnp.int32)
  q, k, v, _, _ = valid_inputs()
  out = kernels.paged_attention(
    q, k, v, hole, jnp.asarray([5, 2, 8], jnp.int32), backend="reference"
  )
  # Float64 by hand: row 0 sees block 0's 4 keys (its 5th key, in the hole, is skipped),
  # row 1 block 2's first 2, row 2 blocks 3 and 4.
  qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
  for row, keys in ((0, [(0, t) for t in range(4)]), (1, [(2, 0), (2, 1)]),
                    (2, [(b, t) for b in (3, 4) for t in range(BS)])):  # fmt: skip
    for h in range(HQ):
      kv = h // (HQ // HKV)
      kk = np.stack([kn[kv, b, t] for b, t in keys])
      vv = np.stack([vn[kv, b, t] for b, t in keys])
      w = np.exp(kk @ qn[row, h] / np.sqrt(D))
      want = (w / w.sum()) @ vv
      np.testing.assert_allclose(
        np.asarray(out)[row, h], want, **tolerance("attention_vs_float64", "float32")
      )


@pytest.mark.parametrize(
  "cu_q_lens,match",
  [
    ([0, 2, 3, 10], r"end <= the 9 query rows"),
    ([0, 3, 2, 7], r"non-decreasing"),
    ([0, 2, 5, 7], r"sequences \[1\] have more queries than tokens"),
  ],
  ids=["past_q_rows", "decreasing", "more_queries_than_tokens"],
)
def test_bad_host_cu_q_lens_values_are_named(cu_q_lens, match):
  args = _host(num_tokens=9)
  with pytest.raises(ValueError, match=match):
    kernels.paged_attention(*args, np.asarray(cu_q_lens, np.int32), backend="reference")


# ---------------------------------------------------------------------------------------------
# Module structure: the checks live in a leaf module, the backend switch is one table.


def _kernels_imports(path):
  """Modules a file imports (``from kernels import _api`` counts as ``kernels._api``)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
      found |= {f"{node.module}.{alias.name}" for alias in node.names}
  return found


def test_backends_and_checks_do_not_import_the_dispatcher():
  """kernels._api imports the backends; a backend importing _api back was an import circle."""
  root = os.path.dirname(kernels.__file__)
  files = [os.path.join(root, "_validate.py"), os.path.join(root, "reference.py")]
  for backend in ("gpu", "tpu"):
    files += glob.glob(os.path.join(root, backend, "*.py"))
  assert len(files) > 4
  for path in files:
    assert "kernels._api" not in _kernels_imports(path), path
  # The backends take the shared checks from the leaf module, which the public name re-exports.
  for backend in ("gpu", "tpu"):
    assert "kernels._validate" in _kernels_imports(os.path.join(root, backend, "__init__.py"))
  from kernels import _validate

  assert kernels.validate_inputs is _validate.validate_inputs


def test_every_concrete_backend_has_one_entry_in_the_switch_table():
  assert set(_api._BACKEND_FNS) == set(kernels.BACKENDS) - {"auto"}


def test_switch_table_routes_to_the_resolved_backend(monkeypatch):
  calls = []
  monkeypatch.setitem(
    _api._BACKEND_FNS, "tpu", lambda *args, **kw: calls.append((len(args), kw)) or "ran"
  )
  monkeypatch.setattr(_api, "_platform", lambda: "tpu")
  assert kernels.paged_attention(*valid_inputs(), backend="auto", sliding_window=3) == "ran"
  assert calls == [
    (
      6,
      dict(
        scale=None,
        sliding_window=3,
        logit_soft_cap=None,
        block_sizes=None,
        interpret=False,
      ),
    )
  ]


# ---------------------------------------------------------------------------------------------
# Nothing to attend to: every backend returns zeros.


def _nothing_to_read(max_blocks, num_blocks, *, ragged):
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((3, 2, 128)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, num_blocks, 8, 128)), jnp.float32)
  table = np.full((3, max_blocks), kernels.INVALID_BLOCK, np.int32)
  lengths = np.zeros(3, np.int32)
  cu_q_lens = np.zeros(4, np.int32) if ragged else None  # every row is padding
  return q, k, k, table, lengths, cu_q_lens


@pytest.mark.parametrize("ragged", [False, True], ids=["decode", "ragged"])
@pytest.mark.parametrize(
  "max_blocks,num_blocks", [(0, 4), (2, 0)], ids=["zero_width_table", "empty_pool"]
)
def test_every_backend_returns_zeros_when_there_is_no_block_to_read(max_blocks, num_blocks, ragged):
  """A [batch, 0] table used to crash the reference ("zero-size array to reduction
  operation") while the Pallas kernels returned zeros; a pool of 0 blocks crashed the
  reference and the TPU kernels (ZeroDivisionError) while the GPU kernels returned zeros."""
  host = _nothing_to_read(max_blocks, num_blocks, ragged=ragged)
  device = [None if x is None else jnp.asarray(x) for x in host]
  for backend in ("reference", "gpu", "tpu"):
    for args in (host, device):
      out = kernels.paged_attention(*args, backend=backend, interpret=True)
      assert out.shape == args[0].shape and out.dtype == args[0].dtype, backend
      np.testing.assert_array_equal(np.asarray(out), 0.0, err_msg=backend)


@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
@pytest.mark.parametrize("backend", ["reference", "gpu", "tpu"])
def test_an_out_of_range_id_in_a_traced_table_is_an_unused_entry_on_every_backend(backend, prefill):
  """A device table cannot be checked (a kernel cannot raise at run time), so a corrupt id
  there gets one rule on every backend: an id outside [0, num_blocks) is skipped like -1,
  its keys masked, never read from another block (the reference and the TPU kernels read
  the clamped block before, the GPU kernels masked: answers 0.5 apart)."""
  rng = np.random.default_rng(11)
  hq, hkv, d, bs, nb = 4, 2, 128, 8, 6
  k = rng.standard_normal((hkv, nb, bs, d)).astype(np.float32)
  v = rng.standard_normal((hkv, nb, bs, d)).astype(np.float32)
  k[:, 5], v[:, 5] = np.nan, np.nan  # a block no row names: must not leak either
  lengths = np.asarray([20, 11, 24], np.int32)
  good = np.asarray([[3, 0, 4], [1, 2, -1], [2, 4, 0]], np.int32)
  bad = good.copy()
  bad[0, 1], bad[2, 0] = nb, 10**6  # out of range, inside the rows' lengths
  holes = np.where((bad >= nb) | (bad < 0), -1, bad)
  q_lens = np.asarray([3, 1, 5]) if prefill else np.ones(3, int)
  cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  q = jnp.asarray(rng.standard_normal((int(cu[-1]), hq, d)), jnp.float32)
  args = dict(cu_q_lens=jnp.asarray(cu)) if prefill else {}
  kj, vj = jnp.asarray(k), jnp.asarray(v)

  def attend(table, backend):
    # Device arrays: trusted (a host table with these ids raises; test above).
    interpret = backend != "reference"
    return np.asarray(
      kernels.paged_attention(
        q, kj, vj, jnp.asarray(table), jnp.asarray(lengths), backend=backend,
        interpret=interpret, **args,
      )
    )  # fmt: skip

  want = attend(holes, "reference")
  got = attend(bad, backend)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, **tolerance("attention_vs_float64", "float32"))
  # ... and the id out of range mattered: reading another block (nb - 2) instead differs.
  clamped = attend(np.minimum(bad, nb - 2), "reference")
  assert np.max(np.abs(clamped - want)) > 0.01


@pytest.mark.parametrize(
  "change",
  [
    dict(k_blocks=np.zeros((2, 4, 16, 64)), v_blocks=np.zeros((2, 4, 16, 64))),  # float64
    dict(block_sizes=object()),  # the reference backend takes none
    dict(sliding_window=2.5),
    dict(block_table=np.array([[0, 99], [1, -1]], np.int32)),  # host ids: by value
    dict(backend="gpu", interpret=True, q=jnp.ones((2, 4, 8)), k_blocks=jnp.zeros((2, 4, 16, 8)),
         v_blocks=jnp.zeros((2, 4, 16, 8))),  # head_dim 8: the GPU kernels' own rule
  ],
)  # fmt: skip
def test_check_paged_attention_refuses_what_the_call_refuses(change):
  # The layer runs the check before its (donating) cache write; it must refuse exactly
  # what the call would, with the same error.
  base = dict(
    q=jnp.ones((2, 4, 64)), k_blocks=jnp.zeros((2, 4, 16, 64)), v_blocks=jnp.zeros((2, 4, 16, 64)),
    block_table=np.array([[0, 1], [2, -1]], np.int32), lengths=np.array([20, 5], np.int32),
    backend="reference",
  )  # fmt: skip
  kernels.check_paged_attention(**base)  # takes the call as it should be
  with pytest.raises(ValueError) as call:
    kernels.paged_attention(**(base | change))
  with pytest.raises(ValueError) as check:
    kernels.check_paged_attention(**(base | change))
  assert str(check.value) == str(call.value)
