"""GPU prefill on ragged, chunked and mixed batches: our prefill kernels and vLLM's Triton kernel.

Issue 15, item 2. One process, one GPU; per case and block size the same K/V, block table,
``cu_q_lens`` and queries timed through

* ``auto``: ``kernels.gpu.paged_attention`` with the default block sizes (``prefill_kernel=
  "auto"``: ``kernels.gpu.kernel_backend`` picks the Mosaic GPU kernel on Hopper for
  prefill-heavy calls, Triton otherwise; ``kernel`` records which one ran);
* ``triton``: the same with ``prefill_kernel="triton"``;
* ``mosaic_tpb2``: the Mosaic GPU kernel with two 128-row query tiles per CUDA block
  (``BlockSizes.mosaic_tiles_per_block=2``, not the default: ``prefill_mosaic``'s
  ``tiles_per_block``), which amortises the per-block costs over short tiles;
* on request (``--kernels``): ``mosaic`` (forced, also where ``auto`` picks Triton),
  ``mosaic_tpb4`` and ``mosaic_kv64`` (64-key steps, 3 slots); ``VARIANTS`` lists them.
  Off Hopper the Mosaic variants' rows hold an error;
* the peer: vLLM's Triton "unified attention" kernel as vendored in the PyPI package
  ``conch-triton-kernels`` (torch + triton), when importable, on the same tokens (its
  varlen queries take our ``cu_q_lens``, its block table ours; the pools are copied into
  its layout before timing). Not importable: ``vllm_tflops`` is null and
  ``vllm_error`` says why.

32 query / 8 KV heads, head_dim 128, bf16, K/V blocks at shuffled ids. Cases (``--cases``
picks some, comma-separated; ``--blocks`` replaces every case's block sizes)::

  uniform32_16_1024      32 fresh prompts, lengths uniform in [16, 1024] (seed 0); blocks
                         16 and 64
  chunked16x512_ctx2048  16 sequences, each 2048 cached tokens and a 512-token chunk
                         (cache + causal within the chunk); block 16
  mixed4x512_252dec      4 fresh 512-token prompts and 252 decode rows (one query each)
                         whose lengths are drawn as experiments/workloads.py draws
                         ShareGPT-like requests (prompt + output, seed 0, <= 8192), in one
                         call; block 16
  full4x4096             4 x 4096 causal (gpu_decode's prefill shape), the control; block 16

TFLOP/s = ``4 * head_dim * num_q_heads * pairs`` / median time, ``pairs`` the (query, key)
pairs the causal mask lets through: a sequence of ``c`` cached tokens and ``n`` queries
has ``n * c + n * (n + 1) / 2`` (a fresh prompt ``n (n + 1) / 2``, a decode row its
length). Device time: each timed function is one jit running ``--calls`` kernel calls on
distinct queries, dispatched 3 times back to back per sample, 21 samples
(``experiments._timing.time_calls``; ``ms`` the median per call, ``ms_min``/``ms_max``
the spread); the peer runs ``--calls`` calls captured in one CUDA graph. Every output is
checked against ``kernels.reference.paged_attention`` on the same device (``rel_l2``,
relative L2; ``check_ok`` under the bf16 bound of ``gpu_kernel_vs_reference_rel_l2`` in
kernels/testing.py); where the reference cannot run, against the Triton kernel's output
(``check_against`` says which). Rows go to ``OUT/gpu_prefill_ragged.jsonl``, one per
(case, block size, variant), as each case finishes; a failing case or peer loses nothing
else; no case starts after ``--budget-s`` seconds (its rows say so)::

  python -m experiments.bench.gpu_prefill_ragged --out /tmp/pfr
  python -m experiments.bench.gpu_prefill_ragged --cases full4x4096 --blocks 16,64 --out /tmp/p2
  python -m experiments.bench.gpu_prefill_ragged --kernels mosaic,mosaic_tpb4 --out /tmp/p3
  python -m experiments.bench.gpu_prefill_ragged --smoke --out /tmp/pfr_smoke

``--smoke``: every case shrunk to a few short sequences (4/2 heads, head_dim 64) in
interpret mode on CPU (``auto`` is then Triton: interpret mode never picks Mosaic), one
call per sample, no peer, ``auto`` and ``triton`` only unless ``--kernels`` names
others. ``--smoke --kernels mosaic`` runs the Mosaic GPU kernel in GPU interpret
mode (it needs ``NPROC >= 4`` in the environment, ``kernels.gpu._mosaic_interpret_params``),
at about 10 s per call on two CPU cores, so the smoke test leaves it out.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import traceback
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments._timing import time_calls
from experiments.bench import _flags
from experiments.bench._gpu_common import (
  commit_of,
  env_info,
  shuffled_pool,
  vllm_unified_attention,
  write_jsonl,
)
from kernels import gpu, reference
from kernels.testing import rel_l2_error, tolerance

HQ, HKV, D = 32, 8, 128
DTYPE = jnp.bfloat16
INTERPRET = False  # --smoke: tiny shapes in interpret mode on CPU
CASES = ("uniform32_16_1024", "chunked16x512_ctx2048", "mixed4x512_252dec", "full4x4096")
BLOCKS = {"uniform32_16_1024": (16, 64)}  # other cases: (16,)
# --kernels: BlockSizes overrides of paged_attention's defaults, by name.
MOSAIC = dict(prefill_kernel="mosaic")
VARIANTS = {
  "auto": {},
  "triton": dict(prefill_kernel="triton"),
  "mosaic": MOSAIC,
  # Several 128-row tiles per CUDA block, one K/V ring (prefill_mosaic's tiles_per_block).
  "mosaic_tpb2": dict(MOSAIC, mosaic_tiles_per_block=2),
  "mosaic_tpb4": dict(MOSAIC, mosaic_tiles_per_block=4),
  # 64-key steps: half the masked work on the causal diagonal, three slots in flight.
  "mosaic_kv64": dict(MOSAIC, mosaic_kv_tile=64, mosaic_num_slots=3),
}
DEFAULT_KERNELS = ("auto", "triton", "mosaic_tpb2")


@dataclasses.dataclass(frozen=True)
class Batch:
  """One call's sequences: ``q_lens[b]`` queries after ``ctx_lens[b]`` cached tokens."""

  q_lens: np.ndarray  # i32[batch]
  ctx_lens: np.ndarray  # i32[batch]

  @property
  def lengths(self) -> np.ndarray:
    return (self.q_lens + self.ctx_lens).astype(np.int32)

  @property
  def cu_q_lens(self) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(self.q_lens)]).astype(np.int32)

  @property
  def tokens(self) -> int:
    return int(self.q_lens.sum())

  @property
  def pairs(self) -> int:
    """(query, key) pairs the causal mask lets through."""
    n = self.q_lens.astype(np.int64)
    return int((n * self.ctx_lens + n * (n + 1) // 2).sum())


def _batch(q_lens, ctx_lens=None) -> Batch:
  q_lens = np.asarray(q_lens, np.int32)
  ctx = np.zeros_like(q_lens) if ctx_lens is None else np.asarray(ctx_lens, np.int32)
  return Batch(q_lens, ctx)


def case_batch(name: str, smoke: bool = False) -> Batch:
  """The sequences of a case (``smoke``: the same kind of batch, a few short rows)."""
  rng = np.random.default_rng(0)
  if name == "uniform32_16_1024":
    lo, hi, n = (16, 200, 3) if smoke else (16, 1024, 32)
    return _batch(rng.integers(lo, hi + 1, size=n))
  if name == "chunked16x512_ctx2048":
    n, chunk, ctx = (2, 24, 40) if smoke else (16, 512, 2048)
    return _batch([chunk] * n, [ctx] * n)
  if name == "mixed4x512_252dec":
    if smoke:
      dec = rng.integers(5, 60, size=3)
      prompts, plen = 1, 40
    else:
      from experiments import workloads

      pairs = workloads.sample_synthetic(workloads.SHAREGPT, 252, max_seq_len=8192, seed=0)
      dec = pairs.sum(axis=1)
      prompts, plen = 4, 512
    # A decode row of length L is one query after L - 1 cached tokens.
    q = [plen] * prompts + [1] * len(dec)
    return _batch(q, [0] * prompts + [int(x) - 1 for x in dec])
  if name == "full4x4096":
    n, length = (2, 64) if smoke else (4, 4096)
    return _batch([length] * n)
  raise ValueError(f"unknown case {name!r}; cases: {', '.join(CASES)}")


def make_pool(rng, lengths, block_size):
  """``shuffled_pool`` at this script's heads, head_dim and dtype."""
  return shuffled_pool(rng, lengths, block_size, num_kv_heads=HKV, head_dim=D, dtype=DTYPE)


def block_sizes_for(variant: str, batch: Batch) -> gpu.BlockSizes:
  """``paged_attention``'s defaults for the call, with ``VARIANTS[variant]``'s overrides."""
  base = gpu.default_block_sizes(
    head_dim=D,
    kv_dtype=DTYPE,
    num_tokens=batch.tokens,
    decode=False,
    batch=len(batch.q_lens),
    num_kv_heads=HKV,
  )
  return dataclasses.replace(base, **VARIANTS[variant])


def kernel_that_runs(bsz: gpu.BlockSizes, batch: Batch, block_size: int) -> str:
  return gpu.kernel_backend(
    "prefill",
    q_dtype=DTYPE,
    kv_dtype=DTYPE,
    head_dim=D,
    block_size=block_size,
    num_tokens=batch.tokens,
    batch=len(batch.q_lens),
    requested=bsz.prefill_kernel,
    interpret=INTERPRET,
  )


def many_calls(num_calls, bsz):
  """One jit running ``num_calls`` prefill calls, one per query array: device time per jit."""
  fn = functools.partial(gpu.paged_attention, scale=D**-0.5, block_sizes=bsz, interpret=INTERPRET)

  def run(qs, kb, vb, table, lengths, cu):
    return [fn(q, kb, vb, table, lengths, cu) for q in qs]

  return jax.jit(run)


def check(out, want) -> dict:
  err = rel_l2_error(out, want)
  ok = (
    bool(np.isfinite(out).all()) and err < tolerance("gpu_kernel_vs_reference_rel_l2", DTYPE).rtol
  )
  if not ok:
    print(f"CHECK FAILED: relative L2 {err:.3g}", flush=True)
  return dict(rel_l2=err, check_ok=ok)


def run_case(name, block_size, args, env, peer):
  """Times one (case, block size); returns its rows (one per kernel)."""
  batch = case_batch(name, args.smoke)
  lengths, cu = batch.lengths, batch.cu_q_lens
  rng = np.random.default_rng(zlib.crc32(f"{name}/{block_size}".encode()))
  kb, vb, table = make_pool(rng, lengths, block_size)
  keys = jax.random.split(jax.random.key(7), args.calls)
  qs = [jax.random.normal(k, (batch.tokens, HQ, D), jnp.float32).astype(DTYPE) for k in keys]
  lens_dev, table_dev, cu_dev = jnp.asarray(lengths), jnp.asarray(table), jnp.asarray(cu)
  flops = 4 * D * HQ * batch.pairs
  base = dict(
    case=name,
    block_size=block_size,
    tokens=batch.tokens,
    pairs=batch.pairs,
    batch=len(lengths),
    max_q_len=int(batch.q_lens.max()),
    max_len=int(lengths.max()),
    head_dim=D,
    num_q_heads=HQ,
    num_kv_heads=HKV,
    dtype=jnp.dtype(DTYPE).name,
    commit=args.commit,
    **env,
  )
  print(
    f"{name} block {block_size}: {len(lengths)} sequences, {batch.tokens} query tokens, "
    f"{batch.pairs} pairs",
    flush=True,
  )
  call_args = (qs, kb, vb, table_dev, lens_dev, cu_dev)
  # The reference on the same device; should it not run (memory), the Triton kernel's
  # output (timed below) stands in.
  want, against = None, "reference"
  try:
    want = np.asarray(
      reference.paged_attention(qs[0], kb, vb, table_dev, lens_dev, cu_dev, scale=D**-0.5),
      np.float32,
    )
  except Exception:  # noqa: BLE001 - recorded as check_against="triton"
    traceback.print_exc()
    against = "triton"
  results = []
  for variant in args.kernels:
    bsz = block_sizes_for(variant, batch)
    row = dict(base, variant=variant, requested=bsz.prefill_kernel)
    try:
      row["kernel"] = kernel_that_runs(bsz, batch, block_size)
      fn = many_calls(args.calls, bsz)
      t = time_calls(
        functools.partial(fn, *call_args), repeats=args.repeats, inner=args.inner, warmup=2
      )
      t = t.map(lambda s: s / args.calls)
      out = np.asarray(jnp.asarray(fn(*call_args)[0], jnp.float32))
      tf = t.map(lambda s: flops / s / 1e12)
      row.update(
        ours_tflops=tf.median,
        ours_tflops_min=tf.min,
        ours_tflops_max=tf.max,
        ms=t.median * 1e3,
        ms_min=t.min * 1e3,
        ms_max=t.max * 1e3,
        **t.fields("time", digits=5),
        config={
          k: v for k, v in dataclasses.asdict(bsz).items() if k.startswith(("prefill", "mosaic"))
        },
      )
      results.append((row, out))
    except Exception as e:  # noqa: BLE001 - one kernel failing loses no other row
      traceback.print_exc()
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      results.append((row, None))
  if want is None:
    want = next((o for r, o in results if r["variant"] == "triton" and o is not None), None)
  peer_row = dict(vllm_tflops=None)
  if peer is not None:
    peer_row["vllm_error"] = peer
  else:
    try:
      t_v, out_v, how = vllm_unified_attention(
        qs[0],
        kb,
        vb,
        table,
        lengths,
        cu,
        max_q_len=int(batch.q_lens.max()),
        scale=D**-0.5,
        num_calls=args.calls,
        repeats=args.repeats,
      )
      tv = t_v.map(lambda s: flops / s / 1e12)
      peer_row = dict(
        vllm_tflops=tv.median,
        vllm_tflops_min=tv.min,
        vllm_tflops_max=tv.max,
        vllm_ms=t_v.median * 1e3,
        vllm_timing=how,
      )
      if want is not None:
        c = check(out_v, want)
        peer_row.update(vllm_rel_l2=c["rel_l2"], vllm_check_ok=c["check_ok"])
    except Exception as e:  # noqa: BLE001 - a failing peer is recorded, not fatal
      traceback.print_exc()
      peer_row = dict(vllm_tflops=None, vllm_error=f"{type(e).__name__}: {str(e)[:300]}")
  rows = []
  for row, out in results:
    if out is not None and want is not None:
      row.update(check(out, want), check_against=against)
    rows.append(dict(row, **peer_row))
  return rows


def define_flags():
  flags.DEFINE_string("out", os.environ.get("OUT", "/tmp/gpu_prefill_ragged"), "output folder")
  flags.DEFINE_list("cases", list(CASES), f"cases to run, of {', '.join(CASES)}")
  flags.DEFINE_list("blocks", [], "block sizes for every case (default: each case's own)")
  flags.DEFINE_list("kernels", list(DEFAULT_KERNELS), f"variants to time, of {', '.join(VARIANTS)}")
  flags.DEFINE_integer("calls", 8, "kernel calls per timed jit (and per CUDA graph)", lower_bound=1)
  flags.DEFINE_integer("repeats", 21, "timing samples per measurement", lower_bound=5)
  flags.DEFINE_bool("no-peer", False, "skip vLLM's Triton kernel")
  flags.DEFINE_float("budget-s", 150.0, "start no case after this many seconds")
  flags.DEFINE_string("commit", os.environ.get("PAXCACHE_COMMIT", "unknown"), "recorded commit")
  flags.DEFINE_bool("smoke", False, "tiny shapes, interpret mode (CPU), no peer")


def main(args):
  global HQ, HKV, D, INTERPRET
  unknown = [c for c in args.cases if c not in CASES] + [
    k for k in args.kernels if k not in VARIANTS
  ]
  if unknown:
    raise SystemExit(f"unknown {unknown}; cases: {', '.join(CASES)}; kernels: {list(VARIANTS)}")
  blocks = [int(b) for b in args.blocks]
  if args.smoke:
    HQ, HKV, D, INTERPRET = 4, 2, 64, True
    args.calls, args.repeats = min(args.calls, 2), 5
    if list(args.kernels) == list(DEFAULT_KERNELS):  # Mosaic interpret: ~10 s a call
      args.kernels = ["auto", "triton"]
  args.inner = 1 if args.smoke else 3
  args.commit = commit_of(args.commit)
  deadline = time.time() + args.budget_s
  os.makedirs(args.out, exist_ok=True)
  env = env_info()
  print(env, flush=True)
  peer = None  # None: the peer runs; else why it does not
  if args.no_peer or args.smoke:
    peer = "skipped (--no-peer or --smoke)"
  else:
    try:
      import conch.third_party.vllm.unified_attention  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the peer is optional
      peer = f"not importable: {type(e).__name__}: {str(e)[:200]}"
      print(f"vLLM peer {peer}; timing ours only", flush=True)
  out_path = os.path.join(args.out, "gpu_prefill_ragged.jsonl")
  rows = []
  for name in args.cases:
    for bs in blocks or BLOCKS.get(name, (16,)):
      if time.time() > deadline:
        case_rows = [dict(case=name, block_size=bs, error="skipped: --budget-s spent", **env)]
      else:
        try:
          case_rows = run_case(name, bs, args, env, peer)
        except Exception as e:  # noqa: BLE001 - one failing case loses no other row
          traceback.print_exc()
          case_rows = [dict(case=name, block_size=bs, error=f"{type(e).__name__}: {e}"[:300])]
          case_rows[0].update(env)
      write_jsonl(out_path, case_rows)
      rows += case_rows

  def f(x, fmt=".1f"):
    return format(x, fmt) if isinstance(x, float) else "-"

  print(f"\n{env}, commit {args.commit}")
  print(
    "| case | block | tokens | variant | kernel | TFLOP/s (min-max) | ms | vLLM TFLOP/s | rel L2 |"
  )
  print("| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |")
  for r in rows:
    if "error" in r:
      print(
        f"| {r['case']} | {r.get('block_size')} | | {r.get('variant', '')} | error "
        f"| {r['error'][:60]} | | | |"
      )
      continue
    print(
      f"| {r['case']} | {r['block_size']} | {r['tokens']} | {r['variant']} | {r['kernel']} | "
      f"{f(r['ours_tflops'])} ({f(r['ours_tflops_min'])}-{f(r['ours_tflops_max'])}) | "
      f"{f(r['ms'], '.3f')} | {f(r.get('vllm_tflops'))} | {f(r.get('rel_l2'), '.2g')} |"
    )
  return 0


if __name__ == "__main__":
  _flags.run(define_flags, main)
