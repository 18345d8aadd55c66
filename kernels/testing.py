"""The numerical tolerances of the tests and of ``experiments/bench/gpu_check.py``, in one table.

Every comparison of computed floating-point results (against an oracle, or between two
paths that should agree) in ``tests/`` and in the GPU check script looks its bound up
here, by *comparison kind* and *dtype*, instead of writing a literal::

  from kernels.testing import rel_l2_error, tolerance

  np.testing.assert_allclose(out, want, **tolerance("attention_vs_float64", out.dtype))
  assert rel_l2_error(out, ref) < tolerance("gpu_kernel_vs_reference_rel_l2", q.dtype).rtol

A :class:`Tol` unpacks as ``rtol=..., atol=...`` (``np.testing.assert_allclose``,
``chex.assert_trees_all_close``). The dtype is the dtype of the result compared (for the
attention kernels, the query's). A (kind, dtype) pair that is not in the table raises
``KeyError``: no test runs that comparison, so there is no measured bound to give.

Two metrics appear:

- elementwise (every kind but one): ``|got - want| <= atol + rtol * |want|``, as in
  ``np.testing.assert_allclose``; with ``rtol=0`` it is a bound on ``max |got - want|``;
- relative L2 (``*_rel_l2``): ``||got - want||_2 / ||want||_2 <= rtol`` over the whole
  output (:func:`rel_l2_error`); ``atol`` is unused and 0.

Checks of sampled statistics (token frequencies, means of sampled workloads) and of values
rounded for reporting (experiment tables) are not in the table: their bounds come from the
sample size or the rounding, and stay beside that reasoning.

The comment of each entry says where its value comes from: the error the arithmetic
allows, what was measured, and the margin. Where two places held the same comparison to
different bounds, the table keeps the tighter one (noted at the entry). ``docs/tpu.md``
and ``docs/smollm2.md`` quote some of these values: change them with the table.

Two helpers build the float64 oracle of the merges of attention partials (the split-K
combine, the cascade's merge): :func:`random_partials` and :func:`softmax_over_keys`.

This module imports nothing from paxcache or flax (``kernels`` is the bottom layer), so
``experiments/bench/gpu_check.py`` and every test can import it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

__all__ = [
  "TOLERANCES",
  "Tol",
  "random_partials",
  "rel_l2_error",
  "softmax_over_keys",
  "tolerance",
]


@dataclasses.dataclass(frozen=True)
class Tol:
  """A relative and an absolute tolerance; ``**tol`` gives ``rtol=..., atol=...``."""

  rtol: float
  atol: float

  def keys(self):
    return ("rtol", "atol")

  def __getitem__(self, name: str) -> float:
    if name not in self.keys():
      raise KeyError(name)
    return getattr(self, name)


# Unit roundoff (largest relative error of one round-to-nearest) for reference:
# float32 2**-24 ~ 6.0e-8, float16 2**-11 ~ 4.9e-4, bfloat16 2**-8 ~ 3.9e-3.
TOLERANCES: dict[str, dict[str, Tol]] = {
  # Any paged-attention path (kernels.reference, the Pallas TPU kernels in TPU interpret
  # mode, the Pallas GPU kernels in interpret mode, the public API, the README example)
  # against an independent float64 NumPy loop over the same, already dtype-rounded, inputs.
  # Outputs are convex combinations of unit-normal V rows: of order one, but they can
  # cancel to ~0, where a relative bound alone means nothing; hence atol beside rtol.
  # tests/kernels/test_reference.py, test_tpu.py, test_gpu.py; tests/test_readme.py.
  "attention_vs_float64": {
    # float32 accumulation in another order than the loop (online softmax over chunks and
    # tiles; HIGHEST-precision einsums in the reference) over at most a few hundred keys:
    # a few float32 ulps. Measured max |err| 1.9e-6 (TPU ragged, window + soft cap), at
    # most 0.16 of what this allows; 1e-5 is the bound the kernels' issue asked for. f32 q
    # with bf16 K/V is held to this too: the reference and the TPU kernels widen K/V and
    # never narrow q (nor, with f32 q, the probabilities).
    "float32": Tol(rtol=1e-5, atol=1e-5),
    # The loop sees the same bf16 inputs (exact in float64); the reference and the TPU
    # kernels keep scores and probabilities in float32 (bf16 x bf16 products are exact);
    # what remains is rounding the output to bf16, at most 2**-8 relative.
    # Doubled, so that a value near a rounding tie may round the other way; atol covers
    # the float32 error of outputs near zero. Measured (TPU kernel, bf16 q): max relative
    # error 3.85e-3 (= 0.99 * 2**-8), at most 0.49 of what this allows. test_tpu.py used
    # atol 2**-7 here, test_reference.py 1e-5; the tighter 1e-5 holds for both.
    "bfloat16": Tol(rtol=2**-7, atol=1e-5),
  },
  # Attention over 8-bit K/V (int8, float8 e4m3; tests/kernels/test_quant.py): every path
  # (reference, Pallas GPU and TPU in interpret mode) against dequantise-then-attend in
  # float64 NumPy on the same 8-bit rows and float32 scales. The quantization error itself
  # is not in this comparison (the oracle sees the same rounded rows); what remains is how
  # the kernel folds the scales in: (q . k_row) * k_scale and (p * v_scale) @ v instead of
  # q . (k_row * k_scale), one more float32 rounding per product, and the int8/e4m3 -> q
  # dtype widening, which is exact. So the bounds of attention_vs_float64 apply, on the
  # same O(1) outputs (the tests' rows have magnitudes e**-1..e, so scales differ 7x).
  # Measured, as a share of what the bound allows (|err| / (atol + rtol |want|)): float32
  # q <= 0.03 (reference), <= 0.32 (TPU, 300 keys), max |err| 4.7e-6 (GPU); bf16 q (reference:
  # only the output is rounded to bf16) <= 0.50, as for attention_vs_float64.
  "quantized_attention_vs_float64": {
    "float32": Tol(rtol=1e-5, atol=1e-5),
    "bfloat16": Tol(rtol=2**-7, atol=1e-5),
  },
  # The Pallas GPU kernels with bf16 q over 8-bit K/V against the same float64 oracle,
  # as a relative L2 error. BlockSizes.quant_widen="q_dtype": K/V are widened to bf16
  # exactly, but p * v_scale is rounded to bf16 before the p @ v dot and the output to
  # bf16, as in gpu_kernel_vs_reference_rel_l2 (2**-8 relative each, partly averaging
  # out). Measured: <= 2.7e-3 (int8 and fp8, decode and ragged) in interpret mode: the bf16
  # bound of gpu_kernel_vs_reference_rel_l2 (5e-3) holds here too, with 1.8x room. The
  # default "f16" and "f16_bits" modes (kernels/gpu/_widen.py) round q (exactly: bf16 fits
  # f16 in range) and p * v_scale / vmax to f16 (2**-11) instead, so only the bf16 output
  # rounding is left at bf16's size: measured 1.6e-3 to 1.7e-3 (same cases), and 1.6e-3 to
  # 1.7e-3 with V scales 1e-4 and 1e5 times larger (test_quant.py); the same bound. The
  # TPU kernels with bf16 q do as the "q_dtype" mode since issue 18's item 3 (p * v_scale
  # rounded to bf16, one MXU pass): measured 1.8e-3 to 2.5e-3 (int8 and fp8, decode and
  # ragged, tests/kernels/test_quant.py).
  "quantized_gpu_vs_float64_rel_l2": {
    "bfloat16": Tol(rtol=5e-3, atol=0.0),
  },
  # Relative L2 error of the Pallas TPU kernels with bf16 q and bf16 K/V against the float64
  # loop (tests/kernels/test_tpu.py). Since issue 18's item 3 the p @ V product runs in bf16
  # with a float32 accumulator (one MXU pass instead of a float32 product at HIGHEST
  # precision), so the probabilities are rounded to bf16 as in the GPU kernels; outputs
  # near zero then miss an elementwise bound (max abs error 1.5e-3 where atol was 1e-5),
  # and the comparison is over the whole output, as for the GPU kernels below. Measured:
  # 1.18e-3 (TPU decode, interpret mode, 5 sequences up to 40 keys); the GPU kernels' bf16
  # bound of 5e-3 leaves 4.2x room.
  "attention_bf16_probs_rel_l2": {
    "bfloat16": Tol(rtol=5e-3, atol=0.0),
  },
  # Relative L2 error of the Pallas GPU kernels (Triton decode and prefill, Mosaic GPU
  # prefill) against kernels.reference: in interpret mode on CPU in
  # tests/kernels/test_gpu.py, and on the GPU at benchmark shapes (up to 8192 keys) in
  # experiments/bench/gpu_check.py. A NaN in the output fails separately.
  "gpu_kernel_vs_reference_rel_l2": {
    # Interpret mode computes the kernels' float32 dots as XLA on CPU does, and on the GPU
    # they are IEEE float32 dots (HIGHEST precision, not tf32); only the accumulation
    # order differs (split-K, tiles). Measured: <= 1.8e-7 in interpret mode, <= 1.43e-7
    # on the H100 (docs/results/gpu_raw, runs 1-6): 1e-5 is 55x the worst seen.
    # gpu_check.py used 1e-4 here; the tests' 1e-5 is tighter and the recorded H100
    # errors are 70x below it.
    "float32": Tol(rtol=1e-5, atol=0.0),
    # The kernels round the softmax probabilities to bf16 before the p @ V dot (as every
    # bf16 flash kernel does) and round the output to bf16: up to 2**-8 relative per
    # element each, which partly averages out over the norm. Measured: <= 2.2e-3 in
    # interpret mode, <= 2.5e-3 on the H100 at 4096-8192 keys: 5e-3 is 2x the worst seen.
    # The tests used 1e-2, and so did gpu_check.py's table; but from H100 run 5 on its
    # dtype-from-name test ("f16" in "bf16") held every bf16 case to the float16 bound,
    # 5e-3, and they passed. The tighter 5e-3 is kept, and the tests pass under it.
    "bfloat16": Tol(rtol=5e-3, atol=0.0),
    # The same two roundings with float16's 11 significant bits (2**-11 each). Measured:
    # 2.2e-4 in interpret mode (Mosaic prefill), 2.7e-4 on the H100: 5e-3 is 19x that.
    # gpu_check.py's value; the tests held float16 to the bf16 bound (1e-2), looser.
    "float16": Tol(rtol=5e-3, atol=0.0),
  },
  # JAX's built-in TPU paged_attention against ours (test_tpu.py), on K/V that are
  # exactly bf16-representable, so that its bf16 cast of K/V loses nothing: both then
  # compute in float32 and must agree to float32 precision, the 1e-5 of
  # attention_vs_float64. (On general f32 K/V its error is above 1e-4; ours stays within
  # attention_vs_float64.)
  "builtin_tpu_kernel_vs_ours": {
    "float32": Tol(rtol=1e-5, atol=1e-5),
  },
  # kernels.reference with NumPy-scalar options against the same call with Python
  # scalars (tests/kernels/test_api.py): the same float32 values, traced separately; only
  # XLA's constant folding may move a last bit. rtol 1e-6 is 8-17 float32 ulps.
  "same_math_traced_twice": {
    "float32": Tol(rtol=1e-6, atol=0.0),
  },
  # paxcache.nn layers and small decoders against a float64 NumPy oracle, and against
  # another float32 path of the same model (paged vs dense vs no cache, logit_rows vs
  # the full forward, the packaged model loaded in a fresh process): test_nn.py.
  # Projections, RoPE and the MLP add their own rounding to attention's, hence looser
  # than attention_vs_float64: the matmuls reduce over <= 192 terms, and the
  # differences stay near 1e-6; 2e-5 leaves 10x room.
  "layer_vs_float64": {
    "float32": Tol(rtol=2e-5, atol=2e-5),
  },
  # Sharded attention, writes and layers on meshes of 1, 4 and 8 simulated CPU devices
  # against one device (tests/paxcache/test_sharding.py). Each device runs the same
  # per-head math, but XLA fuses and vectorises [tokens, heads/devices, ...] arrays
  # differently from [tokens, heads, ...] ones, which moves the last bits of the softmax
  # sums: measured <= 2.4e-7 on O(1) outputs. An absolute 2e-6 leaves room and still
  # catches a wrong head, block or mask.
  "sharded_vs_single_device": {
    "float32": Tol(rtol=0.0, atol=2e-6),
  },
  # The Pallas GPU decode kernel (interpret mode) as the per-device kernel under
  # shard_map on 8 simulated devices, against the reference on one device
  # (test_sharding.py): max |err| held to the kernels' own float32 bound, the 1e-5 of
  # attention_vs_float64, on O(1) outputs.
  "sharded_pallas_vs_reference": {
    "float32": Tol(rtol=0.0, atol=1e-5),
  },
  # SmolLM2-135M first-step logits (values of order 10-30) through the paged model with
  # shuffled blocks against Decoder.forward without a cache (test_smollm2.py): the same
  # weights and float32 math, but attention summed in another order (block by block vs
  # one softmax over the row) and fused differently by XLA; through 30 layers that moves
  # logits by ~1e-4 (measured max 9.5e-5 prefill, 5.3e-5 decode; docs/smollm2.md). An
  # absolute 1e-3 leaves 10x room for other CPUs and XLA versions; token-for-token
  # parity of the engine is checked separately.
  "smollm2_logits_paged_vs_no_cache": {
    "float32": Tol(rtol=0.0, atol=1e-3),
  },
  # GGUF weights as paxcache loads them (Q4_1 and Q8_0 blocks dequantized by the gguf
  # package in float32) against a float64 hand decoding of the same blocks
  # (test_smollm2.py). d and m are float16, q has 4 or 8 bits: d * q and m are exact in
  # float32, and their sum is rounded once, at most 2**-24 relative even where d * q and m
  # cancel. So no atol; rtol 1e-6 is 8-17 ulps. The Q4_1 checks had atol 1e-7 beside it,
  # the Q8_0 one none; the tighter atol 0 holds for both.
  "gguf_dequant_vs_hand_decoding": {
    "float32": Tol(rtol=1e-6, atol=0.0),
  },
}


def _dtype_name(dtype) -> str:
  return dtype if isinstance(dtype, str) else jnp.dtype(dtype).name


def tolerance(kind: str, dtype) -> Tol:
  """The :class:`Tol` for comparison ``kind`` of results of ``dtype`` (a name or a dtype)."""
  if kind not in TOLERANCES:
    raise KeyError(f"no comparison kind {kind!r}; the table has {sorted(TOLERANCES)}")
  name = _dtype_name(dtype)
  by_dtype = TOLERANCES[kind]
  if name not in by_dtype:
    raise KeyError(
      f"no {name} tolerance for {kind!r} (it has {sorted(by_dtype)}): no test measured one"
    )
  return by_dtype[name]


def rel_l2_error(got, want) -> float:
  """``||got - want||_2 / ||want||_2`` in float64 (the ``*_rel_l2`` kinds' metric).

  NaN in ``got`` gives NaN, which no bound admits.
  """
  got = np.asarray(got).astype(np.float64)
  want = np.asarray(want).astype(np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def random_partials(rng, shape, parts: int, head_dim: int, *, keys: int = 5, empty: float = 0.3):
  """Attention partials of random scores, as the kernels write them (float64).

  Every row of ``shape`` (e.g. ``(batch, heads)``) gets ``parts`` key ranges of ``keys``
  keys each, scores in log2 units; a range is empty (no key seen) with probability
  ``empty``. Returns ``(o, m, den, scores, values)``: ``o [*shape, parts, head_dim]`` the
  sum of ``p @ v``, ``m [*shape, parts]`` the largest score (-inf for an empty range),
  ``den`` the sum of ``p`` (``p = 2**(score - m)``), and the scores ``[*shape, parts,
  keys]`` (-inf where not seen) and values ``[*shape, parts, keys, head_dim]`` they came
  from, for :func:`softmax_over_keys`.
  """
  x = rng.normal(size=(*shape, parts, keys)) * 4
  values = rng.normal(size=(*shape, parts, keys, head_dim))
  seen = np.broadcast_to(rng.random((*shape, parts, 1)) >= empty, x.shape)
  scores = np.where(seen, x, -np.inf)
  with np.errstate(invalid="ignore"):
    m = scores.max(-1)
  p = np.where(seen, np.exp2(scores - np.where(np.isneginf(m), 0.0, m)[..., None]), 0.0)
  return (p[..., None] * values).sum(-2), m, p.sum(-1), scores, values


def softmax_over_keys(scores, values):
  """``softmax_2(scores) @ values`` in float64: ``scores [..., N]`` in log2 units (-inf:
  not seen), ``values [..., N, D]``; 0 for a row that sees no key."""
  scores = np.asarray(scores, np.float64)
  with np.errstate(invalid="ignore"):
    top = scores.max(-1, keepdims=True)
  w = np.where(np.isneginf(scores), 0.0, np.exp2(scores - np.where(np.isneginf(top), 0.0, top)))
  total = w.sum(-1)
  return (w[..., None] * np.asarray(values, np.float64)).sum(-2) / np.where(total > 0, total, 1.0)[
    ..., None
  ]
