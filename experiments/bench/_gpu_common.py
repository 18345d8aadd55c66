"""Shared helpers of the GPU benchmark and check scripts (inputs, environment).

Run the scripts from the repository root as ``python -m experiments.bench.<name>``; they
time with :func:`experiments._timing.time_calls`.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import traceback

# Let torch (ceiling) and JAX share the GPU; JAX would otherwise take 75% up front. Read
# when JAX's backend starts, so importing this module before any computation suffices.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from experiments._timing import Timing, time_calls


def device_name() -> str:
  dev = jax.devices()[0]
  return getattr(dev, "device_kind", str(dev))


def env_info() -> dict:
  return dict(
    device=device_name(),
    jax_version=jax.__version__,
    date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
  )


def make_paged(
  rng,
  *,
  batch,
  context,
  block_size,
  num_kv_heads,
  head_dim,
  dtype,
  lengths=None,
  extra_blocks=0,
  contiguous=False,
  poison=True,
):
  """A block pool holding ``batch`` sequences, blocks scattered at random.

  Returns (k_blocks, v_blocks, block_table, lengths, k_dense, v_dense) where the
  dense arrays [batch, context, num_kv_heads, head_dim] hold the same tokens (for
  references). Unused blocks and slots past each length are NaN when ``poison``.
  """
  max_blocks = -(-context // block_size)
  if lengths is None:
    lengths = np.full((batch,), context, np.int32)
  lengths = np.asarray(lengths, np.int32)
  num_used = batch * max_blocks
  num_blocks = num_used + extra_blocks
  ids = np.arange(num_blocks) if contiguous else rng.permutation(num_blocks)
  table = ids[:num_used].reshape(batch, max_blocks).astype(np.int32)
  need = -(-lengths // block_size)
  table = np.where(np.arange(max_blocks)[None, :] < need[:, None], table, -1).astype(np.int32)
  key = jax.random.key(int(rng.integers(1 << 30)))
  k1, k2 = jax.random.split(key)
  shape = (batch, max_blocks * block_size, num_kv_heads, head_dim)
  k_dense = jax.random.normal(k1, shape, jnp.float32).astype(dtype)
  v_dense = jax.random.normal(k2, shape, jnp.float32).astype(dtype)
  pos = jnp.arange(max_blocks * block_size)
  if poison:
    live = (pos[None, :] < jnp.asarray(lengths)[:, None])[:, :, None, None]
    k_dense = jnp.where(live, k_dense, jnp.nan).astype(dtype)
    v_dense = jnp.where(live, v_dense, jnp.nan).astype(dtype)
  fill = jnp.nan if poison else 0.0
  pool_shape = (num_kv_heads, num_blocks, block_size, head_dim)
  src = k_dense.reshape(batch, max_blocks, block_size, num_kv_heads, head_dim)
  src = src.transpose(3, 0, 1, 2, 4).reshape(num_kv_heads, num_used, block_size, head_dim)
  vsrc = v_dense.reshape(batch, max_blocks, block_size, num_kv_heads, head_dim)
  vsrc = vsrc.transpose(3, 0, 1, 2, 4).reshape(num_kv_heads, num_used, block_size, head_dim)
  dest = jnp.asarray(ids[:num_used])
  k_blocks = jnp.full(pool_shape, fill, dtype).at[:, dest].set(src)
  v_blocks = jnp.full(pool_shape, fill, dtype).at[:, dest].set(vsrc)
  return (k_blocks, v_blocks, jnp.asarray(table), jnp.asarray(lengths), k_dense, v_dense)


def shuffled_pool(rng, lengths, block_size, *, num_kv_heads, head_dim, dtype):
  """``(k_blocks, v_blocks, table)``: pools holding exactly the blocks ``lengths`` use
  (plus one spare) at shuffled ids, random normal K/V, and the NumPy block table (-1
  where unused)."""
  need = -(-lengths.astype(np.int64) // block_size)
  max_blocks = max(1, int(need.max()))
  num_blocks = int(need.sum()) + 1
  ids = rng.permutation(num_blocks)[: int(need.sum())]
  table = np.full((len(lengths), max_blocks), -1, np.int32)
  table[np.arange(max_blocks)[None, :] < need[:, None]] = ids
  k1, k2 = jax.random.split(jax.random.key(int(rng.integers(1 << 30))))
  shape = (num_kv_heads, num_blocks, block_size, head_dim)
  kb = jax.random.normal(k1, shape, jnp.float32).astype(dtype)
  vb = jax.random.normal(k2, shape, jnp.float32).astype(dtype)
  return kb, vb, table


def device_kernel_events(path: str):
  """(name, start_ns, duration_ns) of every kernel and copy on the GPU planes of a
  ``jax.profiler`` trace (``jax.profiler.ProfileData`` reads it; no TensorBoard needed)."""
  from jax.profiler import ProfileData

  data = ProfileData.from_file(path)
  out = []
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      # Stream lines hold the kernels and copies; skip the per-op summary lines.
      if "Stream" not in line.name:
        continue
      for e in line.events:
        out.append((e.name, e.start_ns, e.duration_ns))
  return out


def trace_kernels(call, runs: int):
  """Device kernels of ``runs`` calls of ``call`` (already compiled), traced by
  ``jax.profiler``: ``(name, start_ns, duration_ns)`` sorted by start."""
  import glob
  import tempfile

  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(runs):
        out = call()
      jax.block_until_ready(out)
    path = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))[-1]
    return sorted(device_kernel_events(path), key=lambda e: e[1])


def device_time(call, *, runs: int, per_run: int) -> Timing:
  """Device seconds per unit of work from a ``jax.profiler`` trace: ``runs`` calls of
  ``call`` (compiled already, each doing ``per_run`` units, e.g. kernel calls inside one
  jit), dispatched back to back; each run's time is the span from its first kernel's start
  to its last kernel's end (its kernels being the trace's events in start order, split
  into ``runs`` equal groups), divided by ``per_run``.

  Unlike :func:`experiments._timing.time_calls` this leaves out the host: the dispatch
  before the first kernel and the wait after the last (12-37 us per decode call with 8
  calls per jit and 3 jits per sample on the H200, docs/benchmarks.md), and idle gaps
  *between* runs; idle gaps between a run's own kernels count.

  Raises:
    RuntimeError: no GPU events, or a count that does not split into ``runs`` groups.
  """
  return device_spans(call, runs=runs, per_run=per_run)[0]


def device_spans(call, *, runs: int, per_run: int) -> tuple[Timing, Timing]:
  """``(span, busy)``: :func:`device_time`'s spans, and beside them each run's kernel
  time alone (the sum of its kernels' durations, per ``per_run``). Span minus busy is the
  device idle inside a run: launch gaps, which the tracer's own work may lengthen."""
  events = trace_kernels(call, runs)
  if not events or len(events) % runs:
    raise RuntimeError(f"{len(events)} device events do not split into {runs} runs")
  k = len(events) // runs
  spans, busy = [], []
  for i in range(runs):
    group = events[i * k : (i + 1) * k]
    spans.append((max(s + d for _, s, d in group) - group[0][1]) / 1e9 / per_run)
    busy.append(sum(d for _, _, d in group) / 1e9 / per_run)
  return Timing.of(spans), Timing.of(busy)


def call_spans(call, *, runs: int) -> Timing:
  """Device seconds of one call of ``call`` (compiled already): ``runs`` calls, each
  waited for before the next is dispatched, under ``jax.profiler``; the trace's events are
  cut into ``runs`` groups at its ``runs - 1`` longest idle gaps (the host's wait and next
  dispatch, tens of microseconds, against launch gaps of a few inside one call), and each
  group's time is its first kernel's start to its last kernel's end. Unlike
  :func:`device_spans` a call may launch a varying number of kernels and copies.

  Raises:
    RuntimeError: fewer device events than ``runs``.
  """
  import glob
  import tempfile

  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(runs):
        jax.block_until_ready(call())
    path = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))[-1]
    events = sorted(device_kernel_events(path), key=lambda e: e[1])
  return Timing.of(split_spans(events, runs))


def split_spans(events, runs: int) -> list[float]:
  """Seconds of each of ``runs`` calls in ``events`` (``(name, start_ns, duration_ns)`` in
  start order): cut at the ``runs - 1`` longest idle gaps (a gap measured from the latest
  end so far, so an event inside a longer one opens none), each part from its first start
  to its latest end.

  Raises:
    RuntimeError: fewer events than ``runs``.
  """
  if runs < 1 or len(events) < runs:
    raise RuntimeError(f"{len(events)} device events for {runs} calls")
  ends = np.maximum.accumulate([s + d for _, s, d in events])
  gaps = np.array([events[i + 1][1] - ends[i] for i in range(len(events) - 1)])
  # A stable sort: of equal gaps the earliest are cut first.
  cuts = sorted(np.argsort(-gaps, kind="stable")[: runs - 1].tolist())
  spans, lo = [], 0
  for hi in cuts + [len(events) - 1]:
    spans.append(float(ends[hi] - events[lo][1]) / 1e9)
    lo = hi + 1
  return spans


def kernel_summary(events, per: int) -> dict:
  """Per-``per`` (calls or steps) totals of ``events``: kernels, kernel time, the span from
  the first start to the last end (span minus kernel time is the device idle between
  launches), and each kernel name's launches and time, longest first (times in us)."""
  if not events:
    return dict(kernels=0, kernel_us=0.0, span_us=0.0, by_name=[])
  by_name = {}
  for n, _, dur in events:
    c, t = by_name.get(n, (0, 0))
    by_name[n] = (c + 1, t + dur)
  span = max(s + d for _, s, d in events) - min(s for _, s, _ in events)
  busy = sum(d for _, _, d in events)
  return dict(
    kernels=len(events) / per,
    kernel_us=busy / per / 1e3,
    span_us=span / per / 1e3,
    by_name=[
      dict(name=n[:160], launches=c / per, us=t / per / 1e3)
      for n, (c, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])
    ],
  )


def write_jsonl(path, rows):
  with open(path, "a") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def commit_of(default: str) -> str:
  """``default`` unless it is "unknown"; then the repository's short HEAD (if git runs)."""
  if default != "unknown":
    return default
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
      ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or default
  except Exception:  # noqa: BLE001 - no git on the machine: keep "unknown"
    return default


def pad_query_groups(q, num_kv_heads: int):
  """``q`` [tokens, num_q_heads, head_dim] with each KV head's group of query heads padded
  with zero heads to a power of two (vLLM's Triton kernel as vendored in conch indexes a
  group with ``tl.arange``, which needs one; SmolLM2's 9/3 heads give groups of 3), and
  the group sizes ``(group, padded)``. The K/V a call reads is unchanged; the padded
  heads' outputs are dropped by :func:`unpad_query_groups`."""
  tokens, num_q_heads, head_dim = q.shape
  group = num_q_heads // num_kv_heads
  padded = 1 << (group - 1).bit_length()
  if padded == group:
    return q, (group, padded)
  qg = q.reshape(tokens, num_kv_heads, group, head_dim)
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, padded - group), (0, 0)))
  return qg.reshape(tokens, num_kv_heads * padded, head_dim), (group, padded)


def unpad_query_groups(out: np.ndarray, num_kv_heads: int, groups) -> np.ndarray:
  """The outputs of the real query heads of a :func:`pad_query_groups` call."""
  group, padded = groups
  if padded == group:
    return out
  tokens, _, head_dim = out.shape
  out = out.reshape(tokens, num_kv_heads, padded, head_dim)[:, :, :group]
  return out.reshape(tokens, num_kv_heads * group, head_dim)


def vllm_unified_attention(
  q, kb, vb, table, lengths, cu_q_lens, *, max_q_len, scale, num_calls, repeats
):
  """vLLM's unified-attention Triton kernel (as vendored in the PyPI package
  ``conch-triton-kernels``; torch + triton) on the tokens of one of our calls.

  ``q`` [num_tokens, num_q_heads, head_dim] (a JAX array), the pools ``kb``/``vb``
  [num_kv_heads, num_blocks, block_size, head_dim], ``table`` i32[batch, max_blocks],
  ``lengths`` i32[batch] (keys of each sequence, this call's queries included) and
  ``cu_q_lens`` i32[batch + 1] (NumPy or JAX), as for ``kernels.gpu.paged_attention``.
  The pools are copied once into the peer's ``[num_blocks, block_size, num_kv_heads,
  head_dim]`` layout outside the timing. ``num_calls`` calls are captured in one CUDA
  graph (plain back-to-back launches if capture fails) and timed with ``time_calls``
  (``repeats`` samples of 3 replays).

  A group of query heads per KV head that is not a power of two is padded with zero heads
  (:func:`pad_query_groups`; ``how`` then says so).

  Returns ``(seconds per call Timing, output as a NumPy float32 array, how it was timed:
  "cuda_graph" or "launch_loop")``. Raises ImportError where torch or conch is missing.
  """
  import torch
  from conch.third_party.vllm.unified_attention import unified_attention

  def to_torch(x):
    return torch.from_dlpack(jax.block_until_ready(x))

  k_t = to_torch(jnp.transpose(kb, (1, 2, 0, 3))).contiguous()
  v_t = to_torch(jnp.transpose(vb, (1, 2, 0, 3))).contiguous()
  num_kv_heads = kb.shape[0]
  q, groups = pad_query_groups(q, num_kv_heads)
  q_t = to_torch(q).contiguous()
  table_t = torch.as_tensor(np.asarray(table, np.int32), device="cuda")
  lens_t = torch.as_tensor(np.asarray(lengths, np.int32), device="cuda")
  cu_t = torch.as_tensor(np.asarray(cu_q_lens, np.int32), device="cuda")
  out = torch.empty_like(q_t)
  ones = torch.ones(1, dtype=torch.float32, device="cuda")

  def call():
    unified_attention(
      q=q_t,
      k=k_t,
      v=v_t,
      out=out,
      cu_seqlens_q=cu_t,
      max_seqlen_q=int(max_q_len),
      seqused_k=lens_t,
      max_seqlen_k=int(np.max(np.asarray(lengths))),
      softmax_scale=scale,
      causal=True,
      window_size=(-1, -1),
      block_table=table_t,
      softcap=0,
      q_descale=None,
      k_descale=ones,
      v_descale=ones,
    )

  call()  # compiles
  torch.cuda.synchronize()
  how = "cuda_graph"
  try:
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
      call()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
      for _ in range(num_calls):
        call()

    def run():
      graph.replay()

  except Exception:  # noqa: BLE001 - capture refused: plain back-to-back launches
    traceback.print_exc()
    how = "launch_loop"

    def run():
      for _ in range(num_calls):
        call()

  t = time_calls(run, repeats=repeats, inner=3, warmup=2, sync=lambda _: torch.cuda.synchronize())
  call()
  torch.cuda.synchronize()
  if groups[0] != groups[1]:
    how += f", q heads padded {groups[0]}->{groups[1]} per KV head"
  result = unpad_query_groups(out.float().cpu().numpy(), num_kv_heads, groups)
  return t.map(lambda s: s / num_calls), result, how
