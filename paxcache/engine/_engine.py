"""The continuous-batching engine: host scheduling, then one jitted device call per step."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import heapq
import itertools
import math
import numbers
import time
import weakref
from collections.abc import Hashable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from paxcache import cache as cache_ops
from paxcache import sharding
from paxcache.allocator import (
  PENDING_TOKEN,
  BlockAllocator,
  _is_int,  # a Python or NumPy int, not a bool
)
from paxcache.block_table import BlockTable, bucket_size
from paxcache.engine import _beam
from paxcache.engine._batch import StepBatch, build_step_batch
from paxcache.engine._clock import SimulatedClock, WallClock
from paxcache.engine._decode_plan import DECODE_PLAN_MODES, cascade_threshold, decode_planner
from paxcache.engine._metrics import RunMetrics, StepMetrics
from paxcache.engine._request import Group, Request, RequestError, RequestOutput, Seq, Status
from paxcache.engine._reservation import RESERVATION_POLICIES
from paxcache.engine._sampling import sample_tokens
from paxcache.engine._scheduler import Plan, Scheduler
from paxcache.nn import Decoder
from paxcache.sharding import MODEL_AXIS

PREEMPTION_MODES = ("swap", "recompute")
SEED_LIMIT = 2**31  # request seeds are folded into the sampling key as int32


@dataclasses.dataclass
class _InFlight:
  """A dispatched step: its device tokens, its plain decodes (sample rows ``0 .. D - 1``,
  as columns: see :class:`_DecodeFacts`) and, per later sample row, (sequence, index of the
  row's ``PENDING_TOKEN`` in ``sequence.tokens``; None for a beam row, whose token
  ``_beam.py`` picks from ``candidates``)."""

  tokens: jax.Array | _Later  # i32[cap] (a _Later while its call is on the dispatch thread)
  entries: list[tuple[Seq, int | None]]
  candidates: tuple | None = None  # (f32[S, C] log-probs, i32[S, C] ids) when beam rows ran
  decodes: list[Seq] = dataclasses.field(default_factory=list)
  facts: _DecodeFacts | None = None  # of ``decodes``
  pending_pos: list[int] = dataclasses.field(default_factory=list)  # each decode's new token
  done: list[int] = dataclasses.field(default_factory=list)  # decodes stopped by length
  # The decodes' tokens once read, when the next step's commit has already written them
  # into the sequences (overlap scheduling's steady state: see Engine._commit).
  values: list[int] | None = None
  # A decode burst's sub-step after a row stopped by length in it: the device row of each
  # of ``decodes`` (None: decode i is row i).
  device_rows: np.ndarray | None = None


def seeded(request: Request, arrival: int) -> Request:
  """``request`` with the seed it samples with as the ``arrival``-th request to arrive:
  its own, or (None) one derived from the arrival number."""
  if request.seed is not None:
    return request
  return dataclasses.replace(request, seed=arrival % SEED_LIMIT)


class _AfterFailedCall(Exception):
  """A call the dispatch thread did not run because an earlier one failed (its cause)."""


def _lost_step(e: BaseException, on_thread: bool = True) -> RuntimeError:
  """The error every later use of an engine raises once a step failed with ``e`` (its
  call on the dispatch thread, or anything the step ran on the engine's thread)."""
  where = "a step's jitted call failed on the dispatch thread" if on_thread else "a step raised"
  return RuntimeError(
    f"{where} ({e!r}); this engine cannot go on: its pool and host state are those of the "
    "lost step (make a new Engine and add it the requests of Engine.unfinished_requests())"
  )


class _Later:
  """The sampled tokens of a call queued on the dispatch thread
  (``EngineConfig.dispatch_thread``)."""

  __slots__ = ("call",)

  def __init__(self, call: concurrent.futures.Future):
    self.call = call

  def get(self):
    e = self.call.exception()  # waits for the call
    if e is not None:
      if isinstance(e, _AfterFailedCall):  # not run: an earlier call failed
        e = e.__cause__
      raise _lost_step(e) from e
    return self.call.result()


def _arrived(x):
  """A step's device output, waiting for its call first when it ran on the dispatch thread."""
  return x.get() if isinstance(x, (_Later, _BurstTokens)) else x


class _BurstOut:
  """A decode burst's tokens, ``i32[K, cap]`` (on the device, or a :class:`_Later`), read
  to the host once for all its sub-steps."""

  __slots__ = ("every", "host")

  def __init__(self, every):
    self.every = every
    self.host = None

  def get(self) -> np.ndarray:
    if self.host is None:
      self.host = np.asarray(_arrived(self.every))
    return self.host


class _BurstTokens:
  """Sub-step ``j``'s sampled tokens of a burst, for the rows ``rows`` (None: all)."""

  __slots__ = ("out", "j", "rows")

  def __init__(self, out: _BurstOut, j: int, rows: np.ndarray | None):
    self.out, self.j, self.rows = out, j, rows

  def get(self) -> np.ndarray:
    tokens = self.out.get()[self.j]
    return tokens if self.rows is None else tokens[self.rows]


class _DecodeFacts:
  """What the host reads of each plain decode row (``Plan.decodes``) that does not change
  while the same sequences keep decoding: sampling parameters, the length at which a
  sample stops, its request's end token. Kept from step to step; a step whose decodes
  differ from the last one's gathers the rows of the sequences it already knew and reads
  only the new ones (one dict look-up per row, no per-row attribute walk)."""

  def __init__(self):
    self.seqs: list[Seq] = []
    self.groups: list[Group] = []
    self.ids: list = []
    self._where: dict[Seq, int] = {}
    self.temperature = np.zeros(0, np.float32)
    # Columns of ints: top_k, seed, sample index, stop length, end token (-1: none).
    self.ints = np.zeros((0, 5), np.int64)
    self.any_end = False
    self.all_first = False  # every group has its first token's time

  def update(self, plan: Plan, max_seq_len: int) -> _DecodeFacts:
    """These facts for ``plan.decodes`` (self if the decodes are the last step's)."""
    seqs = plan.decodes
    if seqs == self.seqs:  # identity per element: the steady state
      return self
    facts = _DecodeFacts()
    facts.seqs, facts.groups, facts.ids = seqs, plan.decode_groups, plan.decode_ids
    facts._where = {s: i for i, s in enumerate(seqs)}
    where = self._where
    idx = np.array([where.get(s, -1) for s in seqs], np.intp).reshape(-1)
    known = idx >= 0
    facts.temperature = np.zeros(len(seqs), np.float32)
    facts.temperature[known] = self.temperature[idx[known]]
    facts.ints = np.zeros((len(seqs), 5), np.int64)
    facts.ints[known] = self.ints[idx[known]]
    new = np.flatnonzero(~known).tolist()
    if new:
      groups = plan.decode_groups
      rows = []
      for i in new:
        s, r = seqs[i], groups[i].request
        rows.append(
          (
            r.top_k,
            groups[i].seed,
            s.index,
            min(s.prompt_len + r.max_new_tokens, max_seq_len),
            -1 if r.end_token is None else r.end_token,
          )
        )
        facts.temperature[i] = r.temperature
      facts.ints[new] = rows
    facts.any_end = bool((facts.ints[:, 4] >= 0).any())
    return facts

  @property
  def sampling(self) -> tuple:
    """``(temperature, top_k, seeds, sample_index)`` for ``build_step_batch``."""
    return self.temperature, self.ints[:, 0], self.ints[:, 1], self.ints[:, 2]


class _PendingRows(Mapping):
  """Sequence -> its sample row in the step still on the device; built on first look-up
  (the steady state needs none: ``build_step_batch`` matches whole decode lists)."""

  def __init__(self, step: _InFlight):
    self._step = step
    self._rows: dict | None = None

  def _map(self) -> dict:
    if self._rows is None:
      step = self._step
      if step.device_rows is None:
        self._rows = {s: i for i, s in enumerate(step.decodes)}
      else:
        self._rows = dict(zip(step.decodes, step.device_rows.tolist(), strict=True))
      self._rows.update((s, j) for j, (s, _) in enumerate(step.entries, len(step.decodes)))
    return self._rows

  def __getitem__(self, seq):
    return self._map()[seq]

  def __iter__(self):
    return iter(self._map())

  def __len__(self):
    return len(self._map())


def _xla_option_pairs(options) -> tuple[tuple[str, bool | int | float | str], ...]:
  """``EngineConfig.xla_options`` as sorted ``(name, value)`` pairs (hashable: the step's
  compile cache keys on them); ValueError naming what is wrong."""
  if isinstance(options, Mapping):
    pairs = list(options.items())
  elif isinstance(options, tuple | list) and all(
    isinstance(p, tuple | list) and len(p) == 2 for p in options
  ):
    pairs = [tuple(p) for p in options]
  else:
    raise ValueError(
      "EngineConfig.xla_options must be a mapping or (name, value) pairs, got "
      f"{options!r} ({type(options).__name__})"
    )
  checked = []
  for name, value in pairs:
    if not isinstance(name, str) or not name.startswith("xla_"):
      raise ValueError(f"EngineConfig.xla_options: {name!r} is not an XLA option name (xla_...)")
    if isinstance(value, np.generic):
      value = value.item()
    if not isinstance(value, bool | int | float | str):
      raise ValueError(
        f"EngineConfig.xla_options[{name!r}] must be a bool, int, float or str, got "
        f"{value!r} ({type(value).__name__})"
      )
    checked.append((name, value))
  names = [name for name, _ in checked]
  if len(set(names)) != len(names):
    raise ValueError(f"EngineConfig.xla_options names an option twice: {sorted(names)}")
  return tuple(sorted(checked))


def _check_xla_options(pairs) -> None:
  """ValueError where XLA does not take one of ``pairs`` (an unknown name, a value of the
  wrong kind): a trivial function compiled with them, once, before the step's buckets."""
  if not pairs:
    return
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(pairs)).lower(np.int32(0)).compile()
  except Exception as e:  # noqa: BLE001 - XLA's own message says which option and why
    raise ValueError(f"EngineConfig.xla_options {dict(pairs)}: XLA refused them: {e}") from e


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Pool sizes and scheduling knobs.

  Attributes:
    num_blocks: device KV blocks (every layer has this many).
    block_size: token slots per block.
    num_host_blocks: host pool blocks for swapping (``"swap"`` mode needs > 0).
    preemption_mode: ``"swap"`` (blocks to host memory and back) or ``"recompute"``
      (free the blocks, recompute prompt + output later).
    enable_prefix_caching: share full prompt blocks across requests (allocator hashes).
    max_num_seqs: resident live sequences at most (block-table rows per step).
    max_num_batched_tokens: query tokens per step at most; longer prompts are prefilled
      in chunks.
    watermark_blocks: free blocks admission keeps in reserve while others run.
    min_batch_bucket, min_token_bucket, min_blocks_bucket, min_copy_bucket: smallest
      padded sizes (batch rows, query tokens, block-table columns, copy-on-write pairs);
      sizes grow by powers of two, so few shapes ever compile. A step with no
      copy-on-write pair pads to 0 pairs (and compiles without the copy), not to
      ``min_copy_bucket``.
    seed: base PRNG seed for sampling.
    metrics_history: per-step metrics kept (a bounded deque: host memory stays flat).
    check_invariants: run the allocator's full consistency check after every step
      (tests only: O(pool)).
    mesh: a ``jax.sharding.Mesh`` for tensor parallelism over KV heads (e.g.
      ``paxcache.sharding.make_mesh(2)``), or None for one device. The engine shards the
      model it is given in place (``paxcache.sharding.shard_model``) and allocates the
      device pool sharded (``num_blocks`` blocks, each device holding its own heads of
      every block); block ids, the allocator and the host pool (all the pool heads, on
      this host) work as on one device. A mesh over several processes' devices takes
      ``DistributedEngine`` (docs/scaling.md).
    mesh_axis: the tensor-parallel axis of ``mesh``.
    async_scheduling: schedule step n + 1 on the host while step n runs on the device
      (vLLM v1's and SGLang's overlap scheduling). Step n + 1 reads the tokens step n
      samples on the device; the host learns them one iteration later, so a sample that
      stops at its end token runs one extra (discarded) row, and a request is returned by
      the ``step`` after the one that finished it. Outputs are the same as without it.
    dispatch_thread: with ``async_scheduling``, make each step's jitted call on one
      worker thread instead of the engine's, so that the host work after the call
      (committing, reading the previous step's tokens, metrics) and the next step's
      scheduling run while the call launches the step's kernels (JAX releases the GIL
      while it executes; a GPU step of a few hundred kernels takes ~1 ms of the host to
      launch, docs/benchmarks.md). Calls run in order, one at a time; ``Engine.cache``
      waits for them. Outputs are the same as without it. Not with a ``mesh``.
    pipeline_depth: with ``async_scheduling``, how many dispatched steps the host keeps
      unread: 1 (the default) reads step n's tokens right after dispatching step n + 1,
      so planning step n + 2 waits for step n; 2 reads them after dispatching step n + 2,
      so the host plans a step while the two before it are queued on the device and a
      slow host's work per step hides behind the device's as long as it is shorter
      (docs/engine.md, "Two steps on the device"). A sample that stops at its end token
      then runs up to two extra (discarded) rows and is returned one step later; the
      allocator holds up to two pending tokens per sequence. Before a step that could
      preempt (free blocks below ``2 * max_num_seqs + ceil(max_num_batched_tokens /
      block_size) + 1``), or while a running sample of the older step has no row in the
      newer one, the engine reads the older step first, as with 1: with requests waiting,
      admission fills the pool down to ``watermark_blocks``, so set that to at least the
      bound to keep two steps unread under load. Outputs are the same. Not with a
      ``mesh``.
    decode_steps: decode bursts: a step whose rows are all plain decodes (no prefill
      chunk, copy, swap or preemption, no request waiting or swapped out, no row within
      ``decode_steps`` tokens of the model's ``max_seq_len``, free blocks for every row's
      ``decode_steps`` tokens after the step's own, so that the step after a burst, which
      plans before the burst's tokens are read, never preempts) runs ``decode_steps``
      decode steps in one device call: each feeds the tokens the one before sampled, and
      the host schedules, packs and launches once for ``decode_steps`` tokens a row
      (vLLM's multi-step scheduling). A row that stops in a burst (by length or at its
      end token) keeps its output up to its stop; the burst's later tokens of it are
      dropped, as with overlap scheduling. Requests that arrive meanwhile are admitted
      after the burst. A burst runs the default decode kernel (no cascade or decode
      plan). Outputs are the same as with 1 (the default). With ``pipeline_depth=1``
      only, at most ``block_size // 2 + 1``, not with a ``mesh`` (docs/engine.md,
      "Decode bursts").
    reservation: memory management: ``"paged"`` (blocks on demand, the default) or an
      Orca baseline that reserves each request's blocks contiguously at admission:
      ``"max"`` (the model's max_seq_len), ``"pow2"`` (prompt + output length rounded up
      to a power of two) or ``"oracle"`` (prompt + max_new_tokens). The Orca policies
      need ``enable_prefix_caching=False`` (no sharing). See ``_reservation.py``.
    cascade_min_shared_blocks: cascade attention (``kernels.cascade_attention``) for decode
      steps: when a group of at least two decode rows shares at least this many leading
      blocks (prefix-cache hits, forks), the host plans the step's groups
      (``kernels.plan_cascade``, outside jit) and every layer reads each group's shared
      prefix once for the whole group instead of once per row. 0 turns it off. Decode-only
      steps only: a step with a prefill chunk, and an engine with a ``mesh``, run plain
      paged attention. Outputs are the plain path's up to float rounding.
    decode_plan: the planned GPU decode (``kernels.gpu.plan_decode``: the step's keys cut
      into chunks of about equal tokens on the host, from the real lengths, outside jit,
      passed to every layer's ``kernels.paged_attention``). ``"auto"`` (default) plans a
      decode-only step when the model's attention runs on the GPU backend and the step is
      ragged (longest row > 1.5x the mean, ``_decode_plan.RAGGED_MAX_OVER_MEAN``);
      ``"on"`` plans every decode-only step (ValueError at construction where the plan
      cannot run: another backend, or a ``mesh``); ``"off"`` never. A step with a cascade
      plan runs cascade attention instead; a mixed prefill/decode step, and every step of
      an engine with a ``mesh``, run the default kernels. Outputs are the same up to float
      rounding (docs/engine.md, "Planned decode").
    lane_dense_cache: the device cache in rows of 128 lanes (head_dim 32 or 64, 16- or
      32-bit K/V: ``PagedKVCache.create(..., lane_dense=True)``), the layout the TPU
      kernels read without padding the head_dim to 128; the same outputs on every
      backend. ValueError at construction for another head_dim or dtype, or a ``mesh``.
    lane_padded_cache: the device cache in rows of head_dim rounded up to a multiple of
      128 lanes, zeros after the real ones (a head_dim that is not a multiple of 128, e.g.
      80, 96, 112, 192, any K/V dtype: ``PagedKVCache.create(..., lane_padded=True)``),
      the layout in which the TPU kernels take such a head_dim, at the padding's cost in
      HBM (and in the host swap pool, which holds whole rows); the same outputs on every
      backend. ValueError at construction for a head_dim that is a multiple of 128, with
      ``lane_dense_cache``, or with a ``mesh``.
    xla_options: XLA options for the engine's jitted step alone (``jax.jit``'s
      ``compiler_options``), as a mapping or ``(name, value)`` pairs, e.g.
      ``{"xla_gpu_exhaustive_tiling_search": True}`` (Triton GEMM tiles searched over
      XLA's whole space: SmolLM2's step at batch 64, context 512 6.5% faster on an H100,
      at ~100 s of compiling per batch bucket, docs/benchmarks.md "Run33") or
      ``{"xla_gpu_enable_triton_gemm": False}`` (cuBLAS). Unlike ``XLA_FLAGS`` they leave
      every other function of the process alone. Stored as sorted pairs; names are
      XLA's debug options (``xla_...``), values Python bools, ints, floats or strings
      (checked here); building the ``Engine`` raises ValueError where XLA does not take
      one (which shows it parses, not that it acts). GEMM options change rounding, so
      greedy tokens may differ from the default step's (docs/engine.md). Empty
      (default): none.
  """

  num_blocks: int = 256
  block_size: int = 16
  num_host_blocks: int = 256
  preemption_mode: str = "swap"
  enable_prefix_caching: bool = True
  max_num_seqs: int = 32
  max_num_batched_tokens: int = 256
  watermark_blocks: int = 0
  min_batch_bucket: int = 8
  min_token_bucket: int = 8
  min_blocks_bucket: int = 8
  min_copy_bucket: int = 8
  seed: int = 0
  metrics_history: int = 4096
  check_invariants: bool = False
  mesh: Mesh | None = None
  mesh_axis: str = MODEL_AXIS
  async_scheduling: bool = False
  dispatch_thread: bool = False
  pipeline_depth: int = 1
  decode_steps: int = 1
  reservation: str = "paged"
  cascade_min_shared_blocks: int = 8
  decode_plan: str = "auto"
  lane_dense_cache: bool = False
  lane_padded_cache: bool = False
  xla_options: Mapping | tuple = ()

  def __post_init__(self):
    object.__setattr__(self, "xla_options", _xla_option_pairs(self.xla_options))
    if self.mesh is not None:
      if not isinstance(self.mesh, Mesh):
        raise ValueError(
          f"EngineConfig.mesh must be a jax.sharding.Mesh or None, got {type(self.mesh).__name__}"
        )
      if self.mesh_axis not in self.mesh.axis_names:
        raise ValueError(
          f"EngineConfig.mesh has axes {self.mesh.axis_names}, not mesh_axis {self.mesh_axis!r}"
        )
    for name in (
      "num_blocks",
      "block_size",
      "num_host_blocks",
      "max_num_seqs",
      "max_num_batched_tokens",
      "watermark_blocks",
      "min_batch_bucket",
      "min_token_bucket",
      "min_blocks_bucket",
      "min_copy_bucket",
      "seed",
      "metrics_history",
      "cascade_min_shared_blocks",
      "pipeline_depth",
      "decode_steps",
    ):
      value = getattr(self, name)
      if not _is_int(value):
        raise ValueError(
          f"EngineConfig.{name} must be an int, got {value!r} ({type(value).__name__})"
        )
    for name in (
      "enable_prefix_caching",
      "check_invariants",
      "async_scheduling",
      "dispatch_thread",
      "lane_dense_cache",
      "lane_padded_cache",
    ):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"EngineConfig.{name} must be a bool, got {getattr(self, name)!r}")
    if self.lane_dense_cache and self.mesh is not None:
      raise ValueError(
        "EngineConfig.lane_dense_cache with a mesh: a lane-dense cache is not sharded yet"
      )
    if self.lane_padded_cache and self.mesh is not None:
      raise ValueError(
        "EngineConfig.lane_padded_cache with a mesh: a lane-padded cache is not sharded yet"
      )
    if self.dispatch_thread and not self.async_scheduling:
      raise ValueError(
        "EngineConfig.dispatch_thread needs async_scheduling=True: without it every step "
        "waits for its own tokens, and a call on another thread hides nothing"
      )
    if self.dispatch_thread and self.mesh is not None:
      raise ValueError("EngineConfig.dispatch_thread with a mesh: not supported yet")
    if self.pipeline_depth not in (1, 2):
      raise ValueError(f"EngineConfig.pipeline_depth must be 1 or 2, got {self.pipeline_depth}")
    if self.pipeline_depth == 2 and not self.async_scheduling:
      raise ValueError(
        "EngineConfig.pipeline_depth=2 needs async_scheduling=True: without it every step "
        "waits for its own tokens"
      )
    if self.pipeline_depth == 2 and self.mesh is not None:
      raise ValueError("EngineConfig.pipeline_depth=2 with a mesh: not supported yet")
    if self.decode_steps > 1:
      if self.pipeline_depth != 1:
        raise ValueError(
          "EngineConfig.decode_steps > 1 needs pipeline_depth=1: a burst already gives the "
          "device several steps per call"
        )
      if self.mesh is not None:
        raise ValueError("EngineConfig.decode_steps > 1 with a mesh: not supported yet")
    if not 1 <= self.decode_steps <= self.block_size // 2 + 1:
      # A row then holds up to 2 * decode_steps - 1 tokens still being sampled (one burst
      # unread while the next is queued), which the allocator bounds by block_size + 1.
      raise ValueError(
        f"EngineConfig.decode_steps must be in [1, block_size // 2 + 1 = "
        f"{self.block_size // 2 + 1}], got {self.decode_steps}: 1 runs one decode step a "
        "call (no bursts); a burst of K leaves up to 2K - 1 tokens a row still being "
        "sampled, which the allocator bounds by block_size + 1: lower decode_steps or raise "
        "block_size"
      )
    if self.lane_padded_cache and self.lane_dense_cache:
      raise ValueError(
        "EngineConfig.lane_dense_cache and lane_padded_cache are two layouts; set one of them"
      )
    if self.preemption_mode not in PREEMPTION_MODES:
      raise ValueError(
        f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}"
      )
    if not isinstance(self.decode_plan, str) or self.decode_plan not in DECODE_PLAN_MODES:
      raise ValueError(
        f"EngineConfig.decode_plan must be one of {DECODE_PLAN_MODES}, got {self.decode_plan!r}"
      )
    if self.reservation not in RESERVATION_POLICIES:
      raise ValueError(
        f"EngineConfig.reservation must be one of {RESERVATION_POLICIES}, got {self.reservation!r}"
      )
    if self.reservation != "paged" and self.enable_prefix_caching:
      raise ValueError(
        f"EngineConfig.reservation={self.reservation!r} (an Orca baseline) shares nothing: "
        "set enable_prefix_caching=False"
      )
    if self.preemption_mode == "swap" and self.num_host_blocks < 1:
      raise ValueError("preemption_mode='swap' needs num_host_blocks >= 1")
    for name in (
      "num_blocks",
      "block_size",
      "max_num_seqs",
      "max_num_batched_tokens",
      "min_batch_bucket",
      "min_token_bucket",
      "min_blocks_bucket",
      "min_copy_bucket",
      "metrics_history",
    ):
      if getattr(self, name) < 1:
        raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.num_host_blocks < 0 or self.watermark_blocks < 0:
      raise ValueError("num_host_blocks and watermark_blocks must be >= 0")
    if self.watermark_blocks >= self.num_blocks:
      # Admission keeps these free while others run: as many as the pool holds would
      # admit one request at a time, for ever, without a word.
      raise ValueError(
        f"EngineConfig.watermark_blocks ({self.watermark_blocks}) must be < num_blocks "
        f"({self.num_blocks}): admission keeps that many blocks free while others run"
      )
    if not 0 <= self.seed < SEED_LIMIT:
      # jax.random.key keeps a seed's low 32 bits: a wider one would sample as another
      # seed does (and past 64 bits it fails inside JAX). As for Request.seed.
      raise ValueError(f"EngineConfig.seed must be in [0, 2**31), got {self.seed}")
    if self.cascade_min_shared_blocks < 0:
      raise ValueError(
        f"EngineConfig.cascade_min_shared_blocks must be >= 0 (0 = off), got "
        f"{self.cascade_min_shared_blocks}"
      )


def no_preemption_blocks(config: EngineConfig) -> int:
  """A bound on the blocks one step can take: a decode's next block or its copy-on-write
  copy per row, and a prefill budget's blocks. With at least this many free no step
  preempts, which ``pipeline_depth=2`` needs to keep two steps unread."""
  return 2 * config.max_num_seqs + -(-config.max_num_batched_tokens // config.block_size) + 1


def _device_step(graphdef, treedef, params, cache, packed, layout, key, prev_tokens):
  """The one jitted call of an iteration: copy-on-write copies, model, sampling.

  ``params`` is the model state's flat tuple of leaves (``treedef`` rebuilds it): flattening
  an ``nnx.State`` on every call costs Python time per node, a tuple of arrays does not.
  ``packed`` and ``layout`` are a :class:`StepBatch` as :meth:`StepBatch.pack` makes them
  (one host -> device transfer per step; ``layout`` is static).
  ``prev_tokens i32[cap]`` are the previous step's sampled tokens, still on the device:
  rows with ``batch.prev_index >= 0`` take their input token from there.
  Returns the sampled tokens ``i32[cap]`` (rows past the batch's sample rows are 0) and
  the new cache (donated: every layer's pool is updated in place, and nothing in the step
  copies a pool). With ``batch.num_candidates = C > 0`` (static: a step with beam rows)
  the first output is ``(tokens, f32[S, C], i32[S, C])``: each sample row's ``C`` largest
  log-softmax values and their token ids, for beam search on the host.
  """
  batch = StepBatch.unpack(packed, layout)
  model = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
  if batch.cow_src.shape[0]:  # static: a step without copies compiles without them
    cache = cache_ops.copy_blocks(cache, batch.cow_src, batch.cow_dst)
  fed = prev_tokens[jnp.maximum(batch.prev_index, 0)]
  logits, cache = model(
    jnp.where(batch.prev_index >= 0, fed, batch.tokens),
    batch.positions,
    cache,
    block_table=batch.block_table,
    lengths=batch.lengths,
    slot_mapping=batch.slot_mapping,
    cu_q_lens=None if batch.decode_only else batch.cu_q_lens,
    logit_rows=batch.logit_rows,
    cascade=batch.cascade_plan(),
    decode_plan=batch.decode_plan(),
    fused_write=batch.fused_write,
  )
  pad = prev_tokens.shape[0] - logits.shape[0]
  if batch.num_candidates:  # static: only a step with beam rows computes candidates
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    values, ids = jax.lax.top_k(logprobs, batch.num_candidates)
    tokens = jnp.pad(ids[:, 0], (0, pad))  # greedy; only non-beam rows' tokens are read
    if batch.any_sampled:
      tokens = _sampled(batch, logits, key, pad)
    return (tokens, values, ids.astype(jnp.int32)), cache
  tokens = _pick(batch, logits, key, pad)
  if batch.burst_slots.shape[0]:  # static: a decode burst (EngineConfig.decode_steps)
    return _burst(model, batch, cache, key, tokens)
  return tokens, cache


def _pick(batch: StepBatch, logits, key, pad):
  if not batch.any_sampled:  # static: an all-greedy step needs no sort of the vocabulary
    return jnp.pad(jnp.argmax(logits, axis=-1).astype(jnp.int32), (0, pad))
  return _sampled(batch, logits, key, pad)


def _burst(model, batch: StepBatch, cache, key, first):
  """Sub-steps ``1 .. K - 1`` of a decode burst, after sub-step 0 sampled ``first``
  (``i32[cap]``): each feeds the tokens the one before sampled to the same rows, at
  positions, lengths and sample positions ``+ j``, writing K/V at ``burst_slots[j - 1]``.
  One loop on the device: the host plans, packs and launches once for ``K`` tokens a row.
  Returns ``((last i32[cap], every i32[K, cap]), cache)``: ``last`` is what the next
  step reads on the device (``prev_tokens``), ``every[j]`` sub-step j's tokens."""
  n = batch.tokens.shape[0]  # decode-only: token row i is block-table row i and sample row i
  pad = first.shape[0] - batch.logit_rows.shape[0]
  steps = batch.burst_slots.shape[0] + 1
  real_tokens = batch.slot_mapping >= 0  # padding rows write nothing and keep position 0
  real_rows = batch.lengths > 0

  def body(j, carry):
    cache, prev, every = carry
    logits, cache = model(
      prev[:n],
      batch.positions + jnp.where(real_tokens, j, 0),
      cache,
      block_table=batch.block_table,
      lengths=batch.lengths + jnp.where(real_rows, j, 0),
      slot_mapping=batch.burst_slots[j - 1],
      cu_q_lens=None,
      logit_rows=batch.logit_rows,
      cascade=None,
      decode_plan=None,
      fused_write=batch.fused_write,
    )
    sub = batch.replace(sample_positions=batch.sample_positions + j)
    tokens = _pick(sub, logits, key, pad)
    return cache, tokens, every.at[j].set(tokens)

  every = jnp.zeros((steps, first.shape[0]), jnp.int32).at[0].set(first)
  cache, last, every = jax.lax.fori_loop(1, steps, body, (cache, first, every))
  return (last, every), cache


def _sampled(batch: StepBatch, logits, key, pad):
  tokens = sample_tokens(
    logits,
    batch.temperature,
    batch.top_k,
    key,
    batch.seeds,
    batch.sample_index,
    batch.sample_positions,
  )
  return jnp.pad(tokens, (0, pad))


class _StepFn:
  """The jitted step behind a :class:`StepBatch` interface: packs the batch, then calls."""

  def __init__(self, graphdef, treedef, xla_options=()):
    self._jitted = jax.jit(
      functools.partial(_device_step, graphdef, treedef),
      static_argnums=(3,),
      donate_argnums=(1,),
      compiler_options=dict(xla_options) or None,
    )

  @property
  def jitted(self):
    """``jitted(params, cache, packed, layout, key, prev_tokens)``: the step over a batch
    packed already (:meth:`StepBatch.pack`), for a caller that puts the packed buffer on
    the device itself (a benchmark replaying one batch without its transfer)."""
    return self._jitted

  def __call__(self, params, cache, batch: StepBatch, key, prev_tokens):
    packed, layout = batch.pack()
    return self._jitted(params, cache, packed, layout, key, prev_tokens)

  def lower(self, params, cache, batch: StepBatch, key, prev_tokens):
    packed, layout = batch.pack()
    return self._jitted.lower(params, cache, packed, layout, key, prev_tokens)


@functools.lru_cache(maxsize=8)
def _jitted_step(graphdef, treedef, xla_options=()) -> _StepFn:
  # Keyed on the (hashable) graph and state definitions and the XLA options, so that
  # engines over the same model and options share compiled steps instead of compiling
  # every bucket again.
  return _StepFn(graphdef, treedef, xla_options)


def device_step(model: Decoder, xla_options=()):
  """The engine's jitted step for ``model`` and the parameters it takes, compiled with
  ``xla_options`` (``EngineConfig.xla_options``: a mapping or pairs; none by default).

  Returns ``(step, params)``: ``step(params, cache, batch, key, prev_tokens) -> (tokens
  i32[cap], cache)`` with ``batch`` a :class:`StepBatch` (host arrays: it crosses to the
  device packed in one buffer), ``cache`` donated and ``prev_tokens`` the previous step's
  tokens (any ``i32[cap]`` when ``batch.prev_index`` is all -1); ``params`` the model
  state as a flat tuple of arrays (benchmarks time the engine's step through this).
  """
  pairs = _xla_option_pairs(xla_options)
  _check_xla_options(pairs)
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  return _jitted_step(graphdef, treedef, pairs), tuple(leaves)


class _SamplingView(Mapping):
  """Request id -> ``(temperature, top_k, seed)``, read from the engine's groups (no
  per-step dict to build)."""

  def __init__(self, groups: dict[Hashable, Group]):
    self._groups = groups

  def __getitem__(self, request_id):
    g = self._groups[request_id]
    return g.request.temperature, g.request.top_k, g.seed

  def __iter__(self):
    return iter(self._groups)

  def __len__(self):
    return len(self._groups)


class Engine:
  """Serves :class:`Request` s with a paged KV cache.

  Every :meth:`step` does the host work (scheduler and allocator: admission,
  preemption, swaps, appends, forks), then one jitted device call with bucketed
  shapes that copies the copy-on-write blocks, writes the new tokens' K/V, runs
  paged attention and samples. The sampled tokens are the only device -> host copy
  (swap-outs, when a preemption swaps, are the preemption's own transfer).

  Args:
    model: the decoder (its ``backend`` picks the attention kernel).
    config: pool and scheduling configuration.
    clock: what request arrivals and per-request times are read on: a
      :class:`WallClock` (the default, started now) or a :class:`SimulatedClock` (advanced
      by its step-cost model each step).
  """

  def __init__(
    self,
    model: Decoder,
    config: EngineConfig = EngineConfig(),
    *,
    clock: WallClock | SimulatedClock | None = None,
  ):
    self.model = model
    self._init_host(config, model.config.max_seq_len, model.config.vocab_size, clock)
    # The host planner of decode steps (EngineConfig.decode_plan), or None: no step is
    # planned. A DecodePlanner; tests replace it to cut smaller plans.
    self.decode_planner = decode_planner(model, config)
    # EngineConfig.cascade_min_shared_blocks as applied: 0, with the reason, where cascade
    # attention cannot run for this model (a mesh, a sliding window, a GPU head_dim its
    # cascade kernel does not take).
    self.cascade_min_shared_blocks, self.cascade_off_reason = cascade_threshold(model, config)
    if config.mesh is not None:
      # Before nnx.split: the step is compiled for the sharded layers and parameters.
      sharding.shard_model(model, config.mesh, axis=config.mesh_axis)
    # Sharded when the model's layers carry a mesh: no device ever holds the whole pool.
    self.cache = model.init_cache(
      config.num_blocks,
      config.block_size,
      lane_dense=config.lane_dense_cache,
      lane_padded=config.lane_padded_cache,
    )
    self.host_pool = (
      cache_ops.HostKVPool.like(self.cache, config.num_host_blocks)
      if config.num_host_blocks
      else None
    )
    self._step_fn, self._params = device_step(model, config.xla_options)
    self._prev_tokens = jnp.zeros(self._cap, jnp.int32)
    self._key = jax.random.key(config.seed)
    if config.dispatch_thread:
      self._dispatcher = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="paxcache-dispatch"
      )
      # The worker ends with the engine (a queued call still runs; nothing waits for it).
      weakref.finalize(self, self._dispatcher.shutdown, wait=False)

  @property
  def cache(self):
    """The device pool (``PagedKVCache``), after every dispatched call has made it."""
    self._wait_dispatched()
    try:
      return self._cache
    except AttributeError:
      raise AttributeError(f"{type(self).__name__} has no device pool") from None

  @cache.setter
  def cache(self, value) -> None:
    self._wait_dispatched()
    self._cache = value

  def _wait_dispatched(self) -> None:
    """Waits for the calls on the dispatch thread (each runs after the one before); after
    a call failed, raises its error (wrapped) every time: the pool may be lost."""
    last = getattr(self, "_last_call", None)
    if last is not None:
      self._last_call = None
      last.exception()  # waits; the error, if any, is _call_error
    self._raise_if_a_call_failed()

  def _raise_if_a_call_failed(self) -> None:
    e = getattr(self, "_call_error", None)
    if e is not None:
      raise _lost_step(e) from e
    e = getattr(self, "_step_error", None)
    if e is not None:
      raise _lost_step(e, on_thread=False) from e

  def _fail_stop(self, e: BaseException) -> None:
    """Called with whatever a step (or an abort's read of one) raised, before it goes on
    up: the allocator may hold the step's appends, swaps and copies, its call may have
    taken the donated pool, and going on would lose requests or jam; every later use of
    the engine raises instead (:meth:`_raise_if_a_call_failed`)."""
    if self._call_error is None and self._step_error is None:
      self._step_error = e

  def _call_on_thread(self, batch: StepBatch):
    """The dispatch thread's call (packing the batch included): the only code that touches
    the pool and the previous tokens while a call is queued (a failed call fails every
    call after it)."""
    if self._call_error is not None or self._step_error is not None:
      raise _AfterFailedCall() from (self._call_error or self._step_error)
    try:
      out, self._cache = self._step_fn(
        self._params, self._cache, batch, self._key, self._prev_tokens
      )
    except BaseException as e:
      self._call_error = e
      raise
    # No beam rows here (beam search needs async_scheduling off); a burst returns its last
    # sub-step's tokens and every sub-step's.
    if batch.burst_slots.shape[0]:
      self._prev_tokens, out = out
      return out
    self._prev_tokens = out
    return out

  def _init_host(self, config: EngineConfig, max_seq_len: int, vocab_size: int, clock) -> None:
    """Everything but the model and the device pool: allocator, scheduler, queues, clock."""
    if not isinstance(config, EngineConfig):
      raise TypeError(
        f"the engine's config must be an EngineConfig, got {type(config).__name__}: {config!r:.80}"
      )
    self.config = config
    self.max_seq_len = max_seq_len
    self.vocab_size = vocab_size
    self.clock = clock if clock is not None else WallClock()
    self.allocator = BlockAllocator(
      config.num_blocks,
      config.block_size,
      num_host_blocks=config.num_host_blocks,
      enable_prefix_caching=config.enable_prefix_caching,
      max_seq_len=self.max_seq_len,
      max_pending_tokens=max(config.pipeline_depth, 2 * config.decode_steps - 1),
    )
    self.scheduler = Scheduler(
      self.allocator,
      preemption_mode=config.preemption_mode,
      max_num_seqs=config.max_num_seqs,
      max_num_batched_tokens=config.max_num_batched_tokens,
      watermark_blocks=config.watermark_blocks,
      reservation=config.reservation,
      max_seq_len=self.max_seq_len,
    )
    # Every step returns this many sampled tokens (the most sample rows a step can have),
    # so that the next step can read them on the device whatever its own shape.
    self._cap = bucket_size(config.max_num_seqs, minimum=config.min_batch_bucket)
    self._in_flight: _InFlight | None = None
    # pipeline_depth=2: the step dispatched before _in_flight, its tokens not read yet.
    self._older: _InFlight | None = None
    # A decode burst's sub-steps before _in_flight (its last), resolved before it.
    self._burst_rest: list[_InFlight] = []
    self._no_preemption_blocks = no_preemption_blocks(config)
    # EngineConfig.dispatch_thread: the worker, its last queued call and its first error.
    self._dispatcher: concurrent.futures.ThreadPoolExecutor | None = None
    self._last_call: concurrent.futures.Future | None = None
    self._call_error: BaseException | None = None
    # The first error a step raised on the engine's thread (_fail_stop).
    self._step_error: BaseException | None = None
    # Samples stopped at an end token after their next rows were dispatched: how many of
    # those rows (1, or 2 with pipeline_depth=2) the resolves still to come skip.
    self._ignore: collections.Counter[Seq] = collections.Counter()
    self._ready: list[RequestOutput] = []  # finished while draining (abort)
    self._to_free: list = []  # samples that stopped by length at the step just dispatched
    self._facts = _DecodeFacts()  # the last step's plain decodes, reused while unchanged
    self._groups: dict[Hashable, Group] = {}
    # Requests added with an arrival_time the clock has not reached: (time, order, request).
    self._pending: list[tuple[float, int, Request]] = []
    self._pending_ids: set[Hashable] = set()
    self._pending_order = itertools.count()
    # Beam search's host side (paxcache/engine/_beam.py), reading and updating the groups.
    self.beams = _beam.BeamSearch(
      self.allocator, self.scheduler, self._groups, self.max_seq_len, self.vocab_size
    )
    self._arrivals = 0  # requests arrived so far (the next one's arrival number)
    # Every request added and not yet returned by step or abort, by id: (its arrival
    # number, None until it arrives; the request, with the seed it samples with once it
    # has arrived). What unfinished_requests gives back, whatever state a failed step
    # left the groups and queues in.
    self._unreturned: dict[Hashable, tuple[int | None, Request]] = {}
    self._shapes: set[tuple] = set()
    self._cascade = (0, 0, 0)  # the current step's cascade (groups, rows, saved tokens)
    self._plan_chunks = 0  # the current step's decode-plan chunks (0: no plan)
    self.decode_planner = None  # Engine sets it from the model
    self.cascade_min_shared_blocks, self.cascade_off_reason = 0, "no model"  # Engine sets them
    self.step_metrics: collections.deque[StepMetrics] = collections.deque(
      maxlen=config.metrics_history
    )
    self.metrics = RunMetrics()

  # ------------------------------------------------------------------ requests

  def blocks_needed(self, request: Request) -> int:
    """Device blocks a request may need at once, assuming no sharing (a group preempted by
    recomputation loses it): ``n * ceil((len(prompt) + max_new_tokens) / block_size)``, with
    ``beam_width`` in place of ``n`` for beam search."""
    per_seq = -(-(len(request.prompt) + request.max_new_tokens) // self.config.block_size)
    return max(request.n, request.beam_width) * per_seq

  def add_request(self, request: Request) -> None:
    """Queues ``request`` (at its ``arrival_time``, if it has one); raises
    :class:`RequestError` (changing nothing) if it is bad."""
    self._raise_if_a_call_failed()
    self._add(self._validate(request))

  def _add(self, request: Request) -> None:
    now = self.clock.now()
    if request.arrival_time is not None and request.arrival_time > now:
      heapq.heappush(self._pending, (request.arrival_time, next(self._pending_order), request))
      self._pending_ids.add(request.request_id)
      self._unreturned[request.request_id] = (None, request)
      return
    # It has arrived: requests still set aside that arrived before it go first (FCFS).
    self._release_due(now if request.arrival_time is None else request.arrival_time)
    self._enqueue(request)

  def _release_due(self, t: float) -> None:
    while self._pending and self._pending[0][0] <= t:
      _, _, request = heapq.heappop(self._pending)
      self._pending_ids.discard(request.request_id)
      self._enqueue(request)

  def _admit_arrivals(self) -> None:
    """Moves the requests whose arrival time has come to the scheduler's queue, in arrival
    order; an idle engine first waits (or, simulated, jumps) to the next arrival."""
    if not self._pending:
      return
    if not self.scheduler.has_work() and self._in_flight is None and not self._ready:
      self.clock.wait_until(self._pending[0][0])
    self._release_due(self.clock.now())

  def _enqueue(self, request: Request) -> None:
    arrival, self._arrivals = self._arrivals, self._arrivals + 1
    request = seeded(request, arrival)
    self._unreturned[request.request_id] = (arrival, request)
    seq = Seq(
      seq_id=(request.request_id, 0),
      index=0,
      tokens=list(request.prompt),
      prompt_len=len(request.prompt),
    )
    group = Group(
      request=request,
      arrival=arrival,
      seed=request.seed,
      seqs=[seq],
      arrival_time=self.clock.now() if request.arrival_time is None else request.arrival_time,
    )
    self._groups[request.request_id] = group
    if request.beam_width:
      self.beams.start(group)
    self.scheduler.add(group)

  def _validate(self, r: Request) -> Request:
    """Returns ``r`` with its prompt as a tuple of ints and its int fields as ints; raises
    :class:`RequestError` naming the first bad field."""
    if not isinstance(r, Request):
      raise RequestError(f"expected a Request, got {type(r).__name__}")
    rid = r.request_id
    if rid in self._groups or rid in self._pending_ids:
      raise RequestError(f"request id {rid!r} is already in the engine")
    if isinstance(r.prompt, str):
      raise RequestError(f"request {rid!r}: prompt is a str; pass token ids, not text")
    try:
      # Read once: a generator prompt would be empty on a second pass.
      prompt = tuple(r.prompt)
    except TypeError:
      raise RequestError(
        f"request {rid!r}: prompt must be an iterable of token ids, got {type(r.prompt).__name__}"
      ) from None
    if not prompt:
      raise RequestError(f"request {rid!r}: empty prompt (need at least one token)")
    bad = [t for t in prompt if not _is_int(t) or not 0 <= int(t) < self.vocab_size]
    if bad:
      raise RequestError(
        f"request {rid!r}: prompt tokens {bad[:8]} are not ints in [0, {self.vocab_size})"
      )
    for name in ("max_new_tokens", "n", "top_k", "beam_width"):
      value = getattr(r, name)
      if not _is_int(value):
        raise RequestError(
          f"request {rid!r}: {name} must be an int, got {value!r} ({type(value).__name__})"
        )
    t = r.temperature
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
      raise RequestError(f"request {rid!r}: temperature must be a finite number >= 0, got {t!r}")
    if r.max_new_tokens < 1 or r.n < 1 or r.top_k < 0:
      raise RequestError(
        f"request {rid!r}: need max_new_tokens >= 1, n >= 1, top_k >= 0; "
        f"got max_new_tokens={r.max_new_tokens}, n={r.n}, top_k={r.top_k}"
      )
    a = r.arrival_time
    if a is not None and (
      isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a) or a < 0
    ):
      raise RequestError(
        f"request {rid!r}: arrival_time must be None or a finite number of seconds >= 0, got {a!r}"
      )
    if r.seed is not None and (not _is_int(r.seed) or not 0 <= r.seed < SEED_LIMIT):
      # Sampling keys fold the seed in as a 32-bit integer: a wider seed would collide.
      raise RequestError(
        f"request {rid!r}: seed must be None or an int in [0, 2**31), got {r.seed!r} "
        f"({type(r.seed).__name__})"
      )
    if r.end_token is not None and (
      not _is_int(r.end_token) or not 0 <= r.end_token < self.vocab_size
    ):
      raise RequestError(
        f"request {rid!r}: end_token {r.end_token!r} is not an int in [0, {self.vocab_size})"
      )
    r = dataclasses.replace(
      r,
      prompt=tuple(int(t) for t in prompt),
      max_new_tokens=int(r.max_new_tokens),
      n=int(r.n),
      temperature=float(t),
      # At least the vocabulary means all of it (the sampler clips k to it): clipped here,
      # so that no top_k past int32 reaches the step's i32 sampling arrays.
      top_k=min(int(r.top_k), self.vocab_size),
      end_token=None if r.end_token is None else int(r.end_token),
      seed=None if r.seed is None else int(r.seed),
      arrival_time=None if a is None else float(a),
      beam_width=int(r.beam_width),
    )
    if len(prompt) + r.max_new_tokens > self.max_seq_len:
      raise RequestError(
        f"request {rid!r}: prompt of {len(prompt)} tokens + max_new_tokens "
        f"{r.max_new_tokens} exceeds the model's max_seq_len {self.max_seq_len}"
      )
    cfg = self.config
    _beam.check_request(
      r,
      async_scheduling=cfg.async_scheduling,
      max_rows=min(cfg.max_num_seqs, cfg.max_num_batched_tokens),
      vocab_size=self.vocab_size,
    )
    if r.n > min(cfg.max_num_seqs, cfg.max_num_batched_tokens):
      raise RequestError(
        f"request {rid!r}: n={r.n} samples can never be resident at once (max_num_seqs "
        f"{cfg.max_num_seqs}, max_num_batched_tokens {cfg.max_num_batched_tokens})"
      )
    need = self.blocks_needed(r)
    if need > self.config.num_blocks:
      raise RequestError(
        f"request {rid!r} can never fit the pool: n={max(r.n, r.beam_width)} x ceil(("
        f"{len(prompt)} + "
        f"{r.max_new_tokens}) / block_size {self.config.block_size}) = {need} blocks > "
        f"num_blocks {self.config.num_blocks}"
      )
    reserve = self.scheduler.reservation_size(Group(r, 0, 0, []))
    if reserve > self.config.num_blocks:
      raise RequestError(
        f"request {rid!r} reserves {reserve} blocks under reservation="
        f"{cfg.reservation!r}, more than num_blocks {cfg.num_blocks}: it could never run"
      )
    return r

  def abort(self, request_id: Hashable) -> RequestOutput:
    """Stops ``request_id`` now and frees its blocks; returns what it produced so far.

    With ``async_scheduling`` the steps still on the device are read first (one, or two
    with ``pipeline_depth=2``); if they finished the request, its complete output is
    returned (finish reasons "stop" or "length", counted as finished, not aborted)."""
    self._raise_if_a_call_failed()
    out = self._abort(request_id)
    self._unreturned.pop(out.request_id, None)
    return out

  def _abort(self, request_id: Hashable) -> RequestOutput:
    group = self._groups.get(request_id)
    if group is None and request_id in self._pending_ids:  # not arrived yet
      entry = next(e for e in self._pending if e[2].request_id == request_id)
      self._pending.remove(entry)
      heapq.heapify(self._pending)
      self._pending_ids.discard(request_id)
      self.metrics.aborted_requests += 1
      r = entry[2]
      return RequestOutput(r.request_id, len(r.prompt), [[] for _ in range(r.n)], ["abort"] * r.n)
    if group is None:
      raise RequestError(f"abort: unknown request id {request_id!r} (finished or never added)")
    try:
      self._drain()
    except BaseException as e:
      self._fail_stop(e)
      raise
    if request_id not in self._groups:
      # Its last token came back in the step just read: it finished (and is counted as
      # finished, with its own finish reasons), so it is returned here, not by step().
      out = next(o for o in self._ready if o.request_id == request_id)
      self._ready.remove(out)
      return out
    self.scheduler.remove(group)
    for s in group.seqs:
      if not s.finished:
        s.finish_reason = "abort"
    del self._groups[request_id]
    self.beams.forget(group)
    self.metrics.aborted_requests += 1
    return group.output()

  def has_unfinished(self) -> bool:
    """Whether a request is still to be returned by :meth:`step`."""
    return bool(self._groups or self._ready or self._in_flight or self._pending)

  def num_unfinished(self) -> int:
    return len(self._groups) + len(self._ready) + len(self._pending)

  def unfinished_requests(self) -> list[Request]:
    """Every request added and not yet returned by :meth:`step` or :meth:`abort`, to add
    to a new engine, also (above all) after a step failed and this engine cannot go on.

    Those that have arrived come first, in arrival order, with the ``seed`` they sample
    with (a ``None`` seed is derived from the arrival order: given back as it was, a new
    engine would derive another) and ``arrival_time=None`` (they are due). Then those whose
    ``arrival_time`` the clock has not reached, in the order they would arrive, each
    keeping its ``arrival_time`` (on this engine's clock: shift it for a new clock that
    starts at 0) and given the seed it would have derived had nothing else been added. A
    new engine with the same ``EngineConfig.seed`` then samples the same tokens as this
    one would have: a sample's key is (engine seed, request seed, sample index, position),
    not its batch (docs/engine.md, "Errors"). What the requests had generated is not kept:
    they start again from their prompts."""
    arrived = sorted((a, r) for a, r in self._unreturned.values() if a is not None)
    out = [dataclasses.replace(r, arrival_time=None) for _, r in arrived]
    # (time, order, request): the order is unique, so requests are never compared.
    out += [seeded(r, self._arrivals + i) for i, (_, _, r) in enumerate(sorted(self._pending))]
    return out

  # ------------------------------------------------------------------ one iteration

  def step(self) -> list[RequestOutput]:
    """One iteration: schedule, swap, one device call; returns requests finished in it
    (with ``async_scheduling``, those whose last token came back in it).

    Whatever the iteration raises (a failed call, a device error read with the tokens, an
    interrupt) is raised as it is, and every later use of the engine raises a
    ``RuntimeError`` naming it: the step may be half done (docs/engine.md, "Errors")."""
    self._raise_if_a_call_failed()
    self._admit_arrivals()
    try:
      finished = self._iterate()
    except BaseException as e:
      self._fail_stop(e)
      raise
    for out in finished:
      self._unreturned.pop(out.request_id, None)
    return finished

  def _iterate(self) -> list[RequestOutput]:
    t0 = time.perf_counter()
    self._cascade = (0, 0, 0)  # (groups, rows, saved tokens): set by _execute's batch
    self._plan_chunks = 0  # set by _execute's batch
    kept_older = self._older is not None
    read_first = 0  # tokens of the older step read before planning (pipeline_depth=2)
    if kept_older and not self._can_keep_older():
      read_first = self._read_older(self._ready)
      self._free_finished()
      kept_older = False
    self.scheduler.may_preempt = not kept_older  # _can_keep_older's bound: it will not
    plan = self.scheduler.schedule()
    self._swap(plan)
    num_tokens = prefill = decodes = kv_tokens = 0
    sampled = read_first
    shape = (0, 0, 0)
    dispatched = None
    rest: list[_InFlight] = []  # a burst's sub-steps before `dispatched`
    has_rows = bool(plan.decodes or plan.rows)
    burst = self._burst_size(plan) if has_rows else 1
    if has_rows:
      # (Subclasses and benches replace _execute and _build_batch with one-argument ones.)
      tokens, shape, candidates = self._execute(plan, burst) if burst > 1 else self._execute(plan)
      if burst > 1:
        *rest, dispatched = self._commit_burst(plan, tokens, burst)
      else:
        dispatched = self._commit(plan, tokens)
      dispatched.candidates = candidates
      # The plain decodes: one token each (burst: one a sub-step), K/V of start + 1 tokens.
      decodes = len(plan.decodes)
      num_tokens = decodes * burst
      # Sub-step j reads start + j + 1 tokens a row.
      starts_sum = int(plan.decode_starts.sum())
      kv_tokens = burst * starts_sum + decodes * burst * (burst + 1) // 2
      for r in plan.rows:  # one pass over the other rows (few)
        n = r.stop - r.start
        num_tokens += n
        kv_tokens += r.stop
        if n > 1:
          prefill += n
        elif n == 1:
          decodes += 1
    swapped = sum(len(p) for p in plan.swap_out) + sum(len(p) for p in plan.swap_in)
    if burst > 1:  # a simulated clock charges each decode step of the burst
      for j in range(burst):
        self.clock.on_step(0, decodes, starts_sum + decodes * (j + 1), 0)
    elif has_rows or swapped:
      self.clock.on_step(prefill, decodes, kv_tokens, swapped * self.config.block_size)
    previous, self._in_flight = self._in_flight, dispatched
    previous_rest, self._burst_rest = self._burst_rest, rest
    finished, self._ready = self._ready, []
    if self.config.async_scheduling:
      # Step n + 1 is queued on the device; now read step n's tokens (the one device ->
      # host copy), which overlaps with step n + 1's device time. With pipeline_depth=2,
      # step n - 1's: steps n and n + 1 are both queued.
      if self.config.pipeline_depth == 2 and dispatched is not None:
        older, self._older = self._older, previous
        if older is not None:
          sampled += self._resolve(older, finished)
      else:
        sampled += self._read_older(finished)
        for sub in previous_rest:
          sampled += self._resolve(sub, finished)
        if previous is not None:
          sampled += self._resolve(previous, finished)
    elif dispatched is not None:
      self._in_flight, self._burst_rest = None, []
      for sub in rest:
        sampled += self._resolve(sub, finished)
      sampled += self._resolve(dispatched, finished)
    self._free_finished()
    if not has_rows and previous is None:
      if not (plan.swap_in or plan.swap_out or plan.preemptions_recompute):
        if self.scheduler.has_work():
          # Cannot happen by construction (the oldest group always fits alone); fail
          # loudly rather than spin.
          raise RuntimeError(
            f"engine made no progress: {len(self.scheduler.waiting)} waiting, "
            f"{len(self.scheduler.running)} running, {len(self.scheduler.swapped)} swapped, "
            f"{self.allocator.num_free_blocks} free blocks"
          )
    if self.config.check_invariants:
      self.allocator.check_invariants()
    self._record(plan, t0, num_tokens, prefill, sampled, shape, decodes, kv_tokens, burst)
    return finished

  def run(
    self, requests: Iterable[Request] = (), max_steps: int | None = None
  ) -> dict[Hashable, RequestOutput]:
    """Adds ``requests`` and steps until every request finished; returns outputs by id.

    Every request is checked before any is queued: one bad request raises
    :class:`RequestError` and queues none of them.
    """
    return run_until_done(self, self._validate, requests, max_steps)

  # ------------------------------------------------------------------ internals

  def _swap(self, plan: Plan) -> None:
    # Swaps are the preemption's own transfers, one call each way per iteration; swap-outs
    # read the device blocks before anything of this iteration writes them.
    if plan.swap_out:
      pairs = np.concatenate(plan.swap_out)
      cache_ops.swap_out(self.cache, self.host_pool, pairs[:, 0], pairs[:, 1])
    if plan.swap_in:
      pairs = np.concatenate(plan.swap_in)
      if len(pairs):
        self.cache = cache_ops.swap_in(self.cache, self.host_pool, pairs[:, 0], pairs[:, 1])

  def _burst_size(self, plan: Plan) -> int:
    """How many decode steps this step's call runs (``EngineConfig.decode_steps`` where
    the step may burst, else 1)."""
    k = self.config.decode_steps
    if (
      k == 1
      or plan.rows
      or plan.cow_pairs
      or plan.swap_in
      or plan.swap_out
      or plan.preemptions_swap
      or plan.preemptions_recompute
      or plan.forked
      or self.scheduler.waiting
      or self.scheduler.swapped
    ):
      return 1
    if int(plan.decode_starts.max()) + k > self.max_seq_len:
      return 1  # the allocator holds no token past the model's length
    # Room for the burst's k - 1 tokens a row and one more: with overlap scheduling the
    # next step plans before this burst's tokens are read, and a row with pending tokens
    # cannot be preempted (swapped out), so that step's appends must fit as they are.
    alloc = self.allocator
    if alloc.blocks_needed_to_append(plan.decode_ids, k) > alloc.num_free_blocks:
      return 1
    return k

  def _build_burst_batch(self, plan: Plan, burst: int) -> StepBatch:
    """The batch of a burst of ``burst`` decode steps (:meth:`_burst_size`): the allocator
    takes each row's next ``burst - 1`` tokens (pending) first, for their slots."""
    pending = [PENDING_TOKEN] * len(plan.decode_ids)
    extra = [self.allocator.append_batch(plan.decode_ids, pending) for _ in range(burst - 1)]
    if any(len(r.cow_pairs) for r in extra):  # the first append made every last block private
      raise RuntimeError("a decode burst's appends asked for copy-on-write copies")
    return self._build_batch(plan, np.stack([r.slots for r in extra]).astype(np.int32))

  def _execute(self, plan: Plan, burst: int = 1):
    """Dispatches the device step; returns its sampled tokens (on the device, or a
    :class:`_Later` of the dispatch thread's call; a :class:`_BurstOut` of every sub-step's
    for a burst of ``burst > 1`` decode steps), the padded shape and, when the batch has
    beam rows, their top candidates (log-probs, ids)."""
    batch = self._build_batch(plan) if burst == 1 else self._build_burst_batch(plan, burst)
    self._shapes.add(batch.shape_key)
    self._cascade = batch.cascade_counts()
    self._plan_chunks = batch.decode_plan_chunks()
    # One fixed key: each row folds in its own (seed, sample, position).
    if self._dispatcher is not None:
      # (Never a step with beam rows: beam search needs async_scheduling=False.)
      assert not batch.num_candidates
      call = self._dispatcher.submit(self._call_on_thread, batch)
      self._last_call = call
      out = _Later(call)
      return (_BurstOut(out) if burst > 1 else out), batch.shape_key[:3], None
    tokens, self.cache = self._step_fn(
      self._params, self.cache, batch, self._key, self._prev_tokens
    )
    candidates = None
    if batch.num_candidates:  # beam rows: (tokens, log-probs, ids)
      tokens, *candidates = tokens
    if burst > 1:  # (last sub-step's tokens, every sub-step's)
      self._prev_tokens, every = tokens
      return _BurstOut(every), batch.shape_key[:3], None
    self._prev_tokens = tokens
    return tokens, batch.shape_key[:3], candidates

  def _build_batch(self, plan: Plan, burst_slots: np.ndarray | None = None) -> StepBatch:
    cfg = self.config
    seq_ids = plan.decode_ids
    if plan.rows:
      seq_ids = seq_ids + [r.seq.seq_id for r in plan.rows]
    table = BlockTable.from_allocator(
      self.allocator,
      seq_ids,
      min_batch=cfg.min_batch_bucket,
      min_blocks=cfg.min_blocks_bucket,
    )
    self._facts = facts = self._facts.update(plan, self.max_seq_len)
    # The step still on the device (overlap scheduling) samples these rows' input tokens.
    in_flight = self._in_flight
    return build_step_batch(
      plan,
      table,
      _SamplingView(self._groups),
      min_tokens=cfg.min_token_bucket,
      min_copies=cfg.min_copy_bucket,
      pending_rows={} if in_flight is None else _PendingRows(in_flight),
      num_candidates=self.beams.num_candidates(plan),
      # (A burst's sub-step whose rows are not the device's: the look-up maps them.)
      prev_decodes=None
      if in_flight is None or in_flight.device_rows is not None
      else in_flight.decodes,
      decode_sampling=facts.sampling,
      cascade_min_shared_blocks=self.cascade_min_shared_blocks,
      block_size=cfg.block_size,
      decode_planner=self.decode_planner,
      burst_slots=burst_slots,
    )

  def _commit(self, plan: Plan, tokens, steady: bool = True) -> _InFlight:
    """Host update right after the device call, before its tokens are known: computed
    counts, a ``PENDING_TOKEN`` placeholder per sample, stops by length (known now).
    ``steady=False``: never read the step before's tokens here (a burst's later sub-step,
    whose step before is its own sub-step, or a step after a burst)."""
    # The plain decodes, as columns: per row only the two updates the scheduler reads.
    self._facts = facts = self._facts.update(plan, self.max_seq_len)
    decodes = plan.decodes
    prev = self._in_flight
    if (
      steady
      and prev is not None
      and decodes
      and not self._burst_rest
      and not self._ignore
      and self.config.pipeline_depth == 1  # with 2, reading prev's tokens would wait
      and prev.decodes == decodes
    ):
      # Overlap scheduling's steady state: the same sequences decoded in the step still on
      # the device. Read its tokens now (this step is queued behind it) and write them
      # with this step's placeholders in one pass over the rows; _resolve then only reads
      # them. The same writes as placeholders now and tokens in _resolve, one pass fewer.
      values = np.asarray(_arrived(prev.tokens))[: len(decodes)].tolist()
      for s, p, t in zip(decodes, prev.pending_pos, values, strict=True):
        s.tokens[p] = t
        s.num_computed += 1
        s.tokens.append(PENDING_TOKEN)
      prev.values = values
    else:
      for s in decodes:
        s.num_computed += 1
        s.tokens.append(PENDING_TOKEN)
    done = []
    if decodes:
      # Stops by length: the sequence now holds start + 2 tokens (input and pending).
      done = np.flatnonzero(plan.decode_starts + 2 >= facts.ints[:, 3]).tolist()
      for i in done:
        s, g = decodes[i], plan.decode_groups[i]
        s.finish_reason = "length"
        self._to_free.append(s.seq_id)
        if not g.live and g.status is Status.RUNNING:
          self.scheduler.finish(g)
    entries = []
    groups = self._groups
    for r in plan.rows:
      r.seq.num_computed = r.stop
      for s in r.samplers:
        s.num_computed = r.stop
        g = groups[s.seq_id[0]]
        if g.beam is not None:  # beam search picks its token on the host (_beam.py)
          entries.append((s, None))
          continue
        entries.append((s, len(s.tokens)))
        s.tokens.append(PENDING_TOKEN)
        n = len(s.tokens)
        if n - s.prompt_len >= g.request.max_new_tokens or n >= self.max_seq_len:
          # Its blocks are freed in this iteration, after the previous step's tokens are
          # given to the allocator (so that a block they filled is hashed, as without
          # overlap); the device runs this step before any later step that reuses them.
          s.finish_reason = "length"
          self._to_free.append(s.seq_id)
          if not g.live and g.status is Status.RUNNING:
            self.scheduler.finish(g)
    return _InFlight(
      tokens=tokens,
      entries=entries,
      decodes=decodes,
      facts=facts,
      pending_pos=(plan.decode_starts + 1).tolist(),
      done=done,
    )

  def _commit_burst(self, plan: Plan, out: _BurstOut, burst: int) -> list[_InFlight]:
    """:meth:`_commit` of each of a burst's ``burst`` sub-steps, in order: sub-step j's
    rows are the plan's decodes at ``start + j``, less those stopped by length at an
    earlier sub-step (the device computes them, the host reads none of their tokens)."""
    subs = []
    keep = None  # device rows still decoding (None: all)
    sub = plan
    for j in range(burst):
      if j:
        sub = Plan(
          decodes=sub.decodes,
          decode_groups=sub.decode_groups,
          decode_ids=sub.decode_ids,
          decode_starts=sub.decode_starts + 1,
        )
      step = self._commit(sub, _BurstTokens(out, j, keep), steady=j == 0)
      step.device_rows = keep
      subs.append(step)
      if step.done and j + 1 < burst:
        live = np.ones(len(sub.decodes), np.bool_)
        live[step.done] = False
        idx = np.flatnonzero(live)
        keep = idx if keep is None else keep[idx]
        ix = idx.tolist()
        sub = Plan(
          decodes=[sub.decodes[i] for i in ix],
          decode_groups=[sub.decode_groups[i] for i in ix],
          decode_ids=[sub.decode_ids[i] for i in ix],
          decode_starts=sub.decode_starts[idx],
        )
        if not ix:
          break
    return subs

  def _resolve(self, step: _InFlight, finished: list[RequestOutput]) -> int:
    """Host update once a step's tokens are back: token ids, stops at an end token, the
    allocator's pending tokens, finished requests (appended to ``finished``). Returns the
    number of tokens sampled."""
    tokens = np.asarray(_arrived(step.tokens))  # the one device -> host copy of the step
    now = self.clock.now()
    resolve_ids, resolve_tokens, stopped, groups = [], [], [], []
    sampled = 0
    nd = len(step.decodes)
    if nd:
      sampled += self._resolve_decodes(
        step, tokens[:nd], now, resolve_ids, resolve_tokens, stopped, groups
      )
    for j, (s, pos) in enumerate(step.entries, nd):
      if pos is None:  # a beam row: read below
        continue
      if s in self._ignore:  # stopped at its end token after this row was dispatched
        self._unignore(s)
        continue
      t = int(tokens[j])
      s.tokens[pos] = t
      sampled += 1
      g = self._groups[s.seq_id[0]]
      if g.first_token_time is None:
        g.first_token_time = now
      req = g.request
      if req.end_token is not None and t == req.end_token:
        self._drop_later_rows(s, pos)
        if s.finish_reason is None or self._stopped_later(s):
          stopped.append(s)
        s.finish_reason = "stop"
      elif self.allocator.has_pending_token(s.seq_id):
        resolve_ids.append(s.seq_id)
        resolve_tokens.append(t)
      if s.finished and g not in groups:
        groups.append(g)
    self.allocator.resolve_tokens(resolve_ids, resolve_tokens)
    for s in stopped:
      if s.seq_id in self.allocator:
        self.allocator.free(s.seq_id)
    outs = []
    for g in groups:
      if g.live:
        continue
      if g.status is not Status.FINISHED:
        self.scheduler.remove(g)  # running, or preempted before its stop was known
        g.status = Status.FINISHED
      # A sample that stopped by length at the step still on the device waits for it.
      if any(s.tokens[-1] == PENDING_TOKEN for s in g.seqs):
        continue
      del self._groups[g.request.request_id]
      g.finish_time = now
      outs.append(g.output())
    if step.candidates is not None:
      # Beam rows are never plain decodes: the entries are sample rows nd, nd + 1, ...
      candidates = tuple(np.asarray(c)[nd:] for c in step.candidates)
      sampled += self.beams.advance(step.entries, candidates, outs)
    self.metrics.finished_requests += len(outs)
    self.metrics.generated_tokens += sampled
    finished.extend(outs)
    return sampled

  def _resolve_decodes(
    self, step: _InFlight, tokens: np.ndarray, now, resolve_ids, resolve_tokens, stopped, groups
  ) -> int:
    """:meth:`_resolve` for the plain decodes (sample rows ``0 .. D - 1``): one Python
    statement per row (its token into its list); stops, first tokens and the allocator's
    pending tokens found with NumPy. Appends to the lists as the per-row loop would;
    returns the number of tokens sampled."""
    seqs, facts = step.decodes, step.facts
    if step.values is not None:  # already written by the next step's commit
      values = step.values
    else:
      values = tokens.tolist()
    skip = ()
    if self._ignore:  # stopped at an end token after these rows were dispatched
      ignore = self._ignore
      skip = [i for i, s in enumerate(seqs) if s in ignore]
      for i in skip:
        self._unignore(seqs[i])
    if skip:
      skipped = set(skip)
      for i, (s, p, t) in enumerate(zip(seqs, step.pending_pos, values, strict=True)):
        if i not in skipped:
          s.tokens[p] = t
    elif step.values is None:
      for s, p, t in zip(seqs, step.pending_pos, values, strict=True):
        s.tokens[p] = t
    if not facts.all_first:
      missing = False
      for i, g in enumerate(facts.groups):
        if g.first_token_time is None:
          if skip and i in skipped:
            missing = True
          else:
            g.first_token_time = now
      facts.all_first = not missing
    hits = []
    if facts.any_end:
      hits = np.flatnonzero(tokens == facts.ints[:, 4]).tolist()
      if skip:
        hits = [i for i in hits if i not in skipped]
      for i in hits:
        s = seqs[i]
        self._drop_later_rows(s, step.pending_pos[i])
        if s.finish_reason is None or self._stopped_later(s):
          stopped.append(s)
        s.finish_reason = "stop"
    # Finished samples (by length at dispatch, or at their end token now), in row order.
    for i in sorted(set(hits).union(step.done).difference(skip)):
      g = facts.groups[i]
      if g not in groups:
        groups.append(g)
    # The allocator's pending tokens (overlap scheduling: each sequence decoding again).
    ids = facts.ids
    pending = self.allocator.has_pending_tokens(ids)
    if hits or skip:
      pending[hits] = False
      pending[list(skip)] = False
    if pending.all():
      resolve_ids.extend(ids)
      resolve_tokens.extend(values)
    elif pending.any():
      keep = np.flatnonzero(pending).tolist()
      resolve_ids.extend(ids[i] for i in keep)
      resolve_tokens.extend(values[i] for i in keep)
    return len(seqs) - len(skip)

  def _drop_later_rows(self, s: Seq, pos: int) -> None:
    """``s`` stopped at its end token at ``pos``: its placeholders after it belong to rows
    already dispatched (one, or two with pipeline_depth=2); drop them, and have those
    rows' resolves skip ``s``."""
    extra = len(s.tokens) - 1 - pos
    if extra > 0:
      del s.tokens[pos + 1 :]
      self._ignore[s] += extra

  def _read_older(self, finished: list[RequestOutput]) -> int:
    """Reads the older of two unread steps (pipeline_depth=2), if there is one; returns
    the tokens it sampled."""
    older, self._older = self._older, None
    return 0 if older is None else self._resolve(older, finished)

  def _stopped_later(self, s: Seq) -> bool:
    """pipeline_depth=2: ``s``, at its end token now, was stopped by length at a later row
    already: freed here, since _free_finished waits for pending tokens that the end token
    leaves unread. (With one step unread _free_finished frees it later in this step.)"""
    return self.config.pipeline_depth == 2 and s.finish_reason == "length"

  def _unignore(self, s: Seq) -> None:
    if self._ignore[s] > 1:
      self._ignore[s] -= 1
    else:
      del self._ignore[s]

  def _can_keep_older(self) -> bool:
    """pipeline_depth=2, before planning: whether the next step may be planned with the
    tokens of two steps unread. Not when it could preempt (a preempted sequence must
    have no pending token), nor when a running sample of the older step has no row in the
    newer one (its next input token would be the older step's, which the device no longer
    holds)."""
    if self.allocator.num_free_blocks < self._no_preemption_blocks:
      return False
    older, newer = self._older, self._in_flight
    if not older.entries and not newer.entries and older.decodes == newer.decodes:
      return True  # the steady state: the same plain decodes in both
    sampled = {s for s, _ in newer.entries}
    sampled.update(newer.decodes)
    return all(
      s.finished or s in sampled
      for s in itertools.chain(older.decodes, (e[0] for e in older.entries))
    )

  def _free_finished(self) -> None:
    keep = []
    for seq_id in self._to_free:
      if seq_id in self.allocator:  # not if its request was removed meanwhile
        if self.config.pipeline_depth == 2 and self.allocator.num_pending_tokens(seq_id):
          # A token of a step still unread: freed once it is read (and its block hashed,
          # as with one step on the device).
          keep.append(seq_id)
          continue
        self.allocator.free(seq_id)
    self._to_free = keep

  def _drain(self) -> None:
    """Reads the steps still on the device (async scheduling), so that the host state is
    complete; what finishes is returned by the next :meth:`step`."""
    self._read_older(self._ready)
    rest, self._burst_rest = self._burst_rest, []
    for sub in rest:
      self._resolve(sub, self._ready)
    if self._in_flight is not None:
      step, self._in_flight = self._in_flight, None
      self._resolve(step, self._ready)
    self._free_finished()

  def _record(
    self,
    plan: Plan,
    t0: float,
    num_tokens: int,
    prefill: int,
    sampled: int,
    shape,
    decodes: int = 0,
    kv_tokens: int = 0,
    burst: int = 1,
  ) -> None:
    m = self.metrics
    alloc = self.allocator
    seconds = time.perf_counter() - t0
    swapped_out = sum(len(p) for p in plan.swap_out)
    swapped_in = sum(len(p) for p in plan.swap_in)
    sm = StepMetrics(
      step=m.steps,
      num_seqs=plan.num_rows,
      num_tokens=num_tokens,
      num_prefill_tokens=prefill,
      num_sampled=sampled,
      padded_shape=shape,
      blocks_used=alloc.num_used_blocks,
      blocks_cached=alloc.num_cached_blocks,
      blocks_free=alloc.num_free_blocks - alloc.num_cached_blocks,
      host_blocks_used=alloc.num_host_blocks - alloc.num_free_host_blocks,
      prefix_hit_tokens=plan.prefix_hit_tokens,
      preemptions_swap=plan.preemptions_swap,
      preemptions_recompute=plan.preemptions_recompute,
      swapped_out_blocks=swapped_out,
      swapped_in_blocks=swapped_in,
      cow_copies=len(plan.cow_pairs),
      seconds=seconds,
      tokens_per_s=num_tokens / seconds if seconds else 0.0,
      decode_batch=decodes,
      kv_tokens=kv_tokens,
      clock=self.clock.now(),
      cascade_groups=self._cascade[0],
      cascade_rows=self._cascade[1],
      cascade_saved_tokens=self._cascade[2],
      decode_plan_chunks=self._plan_chunks,
      decode_steps=burst if decodes else 0,
    )
    self.step_metrics.append(sm)
    m.steps += 1
    m.seconds += seconds
    m.computed_tokens += num_tokens
    m.prefill_tokens += prefill
    m.prefix_hit_tokens += plan.prefix_hit_tokens
    m.prompt_tokens += plan.admitted_prompt_tokens
    m.preemptions_swap += plan.preemptions_swap
    m.preemptions_recompute += plan.preemptions_recompute
    m.recomputed_tokens += plan.recomputed_tokens
    m.swapped_out_blocks += swapped_out
    m.swapped_in_blocks += swapped_in
    m.cow_copies += len(plan.cow_pairs)
    m.max_batch = max(m.max_batch, plan.num_rows)
    m.max_blocks_used = max(m.max_blocks_used, alloc.num_used_blocks)
    m.compiled_shapes = len(self._shapes)
    if self._cascade[0]:
      m.cascade_steps += 1
      m.cascade_groups += self._cascade[0]
      m.cascade_saved_tokens += self._cascade[2]
    if self._plan_chunks:
      m.planned_steps += 1
      m.decode_plan_chunks += self._plan_chunks


class SimulatedEngine(Engine):
  """The engine's host side with the device step simulated: for sweeps of thousands of
  requests on a CPU.

  Scheduling, admission, reservation, preemption, swaps and block allocation run for real
  (the same :class:`Scheduler` and :class:`BlockAllocator` as :class:`Engine`); no model
  runs and no K/V is stored. Every sampled token is ``forced_token`` (0), so a request
  generates exactly ``max_new_tokens`` tokens (give requests no ``end_token``): a trace's
  output lengths go in as ``max_new_tokens``. The clock is a :class:`SimulatedClock`
  advanced by its step-cost model each step, so a run is deterministic.

  Args:
    config: as for :class:`Engine` (``async_scheduling`` must be off).
    max_seq_len: the simulated model's maximum sequence length.
    vocab_size: the simulated model's vocabulary (prompt token ids must lie below it).
    clock: a :class:`SimulatedClock` (default: the CPU-default cost model).
  """

  forced_token = 0

  def __init__(
    self,
    config: EngineConfig = EngineConfig(),
    *,
    max_seq_len: int,
    vocab_size: int = 256,
    clock: SimulatedClock | None = None,
  ):
    if config.async_scheduling:
      raise ValueError("SimulatedEngine runs steps synchronously: set async_scheduling=False")
    if config.mesh is not None:
      raise ValueError("SimulatedEngine has no device pool to shard: set mesh=None")
    if config.decode_steps != 1:
      raise ValueError("SimulatedEngine simulates one decode step a call: set decode_steps=1")
    for name, value in (("max_seq_len", max_seq_len), ("vocab_size", vocab_size)):
      if not _is_int(value) or value < 1:
        raise ValueError(f"SimulatedEngine {name} must be an int >= 1, got {value!r}")
    if clock is not None and not isinstance(clock, SimulatedClock):
      raise ValueError(f"SimulatedEngine needs a SimulatedClock, got {type(clock).__name__}")
    self.model = None
    self._init_host(config, max_seq_len, vocab_size, clock or SimulatedClock())

  def _validate(self, r: Request) -> Request:
    r = super()._validate(r)
    if r.beam_width:
      # Beams are chosen from the model's log-probabilities, which a simulated step has not.
      raise RequestError(
        f"request {r.request_id!r}: SimulatedEngine runs no model, so it cannot beam search "
        f"(beam_width={r.beam_width}); simulate beams as forks of a sampled request (n > 1)"
      )
    return r

  def _swap(self, plan: Plan) -> None:
    """No device pool: the allocator has already moved the blocks' bookkeeping."""

  def _execute(self, plan: Plan):
    return np.full(self._cap, self.forced_token, np.int32), (0, 0, 0), None


def run_until_done(
  server, check, requests: Iterable[Request], max_steps: int | None
) -> dict[Hashable, RequestOutput]:
  """What :meth:`Engine.run` and :meth:`Router.run` do: ``check`` every request before
  ``server._add`` queues any (one bad request, or one id twice, queues none), then
  ``server.step()`` until nothing is unfinished or ``max_steps`` steps ran."""
  for r in check_requests(check, requests):
    server._add(r)
  outputs: dict[Hashable, RequestOutput] = {}
  steps = 0
  while server.has_unfinished():
    for out in server.step():
      outputs[out.request_id] = out
    steps += 1
    if max_steps is not None and steps >= max_steps:
      break
  return outputs


def check_requests(check, requests: Iterable[Request], taken=()) -> list[Request]:
  """Every request through ``check`` (which returns it, or raises :class:`RequestError`),
  before any is queued; an id given twice, or already in ``taken``, is refused too."""
  checked, ids = [], set()
  for r in requests:
    r = check(r)
    if r.request_id in ids or r.request_id in taken:
      raise RequestError(f"request id {r.request_id!r} appears twice in the requests given")
    ids.add(r.request_id)
    checked.append(r)
  return checked
