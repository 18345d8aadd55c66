"""A length-aware work plan for GPU decode, built on the host from the real lengths.

The default decode kernel (``decode.py``) sizes its grid by the longest row and picks its
split-K factor from static shapes, so on a ragged batch one long sequence is read by a
few programs while the rest of the GPU idles. A plan instead cuts the visible keys of
every sequence into chunks of about equal tokens, ``(sequence, [start, end))``; the
planned kernel (``planned.py``) runs one program per (KV head, chunk) and a second, small
kernel merges each sequence's chunks.

:func:`plan_decode` is NumPy only and runs outside jit (in the engine's host step, where
the lengths are known). Its chunk arrays are padded to a bucketed count (a power of two by
default, see :func:`bucket`), so the jitted kernel sees one of a few shapes whatever the
lengths: no shape depends on a length.

How the chunk size is chosen: the batch holds ``T`` visible tokens per KV head, so ``T *
num_kv_heads`` token-heads of work; cut into ``target_programs`` (default
``PROGRAMS_PER_SM`` per SM) pieces, rounded up to a multiple of ``kv_tile`` and at least
``min_chunk_tokens`` (by default 1024 tokens, or less for a batch whose chunks at 1024
would not give every SM two programs: :func:`min_chunk_for`). A row longer than that is
cut into ``ceil(span / chunk)`` pieces of equal size (rounded up to ``kv_tile``; the last
one may be shorter); a shorter row is one chunk. Internal chunk boundaries are multiples
of ``kv_tile`` (absolute positions), so no kernel step is shared by two chunks. Chunks are
ordered longest row first, so the largest pieces start first and the short ones fill the
tail of the grid; a sequence's chunks stay contiguous (``seq_first_chunk`` .. ``+
seq_num_chunks``), which the merge reads.

This module imports nothing from paxcache or flax, and no Pallas.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import numpy as np

# Programs (chunk x KV head) aimed at per SM: several waves (one program per SM is
# resident with the planned defaults at bf16 head_dim 128), so that the tail of the grid is
# short against the whole.
PROGRAMS_PER_SM = 8
# The smallest chunk of a batch that fills the GPU at this floor: shorter chunks spend more
# on their prologue (plan entries, the q tile, the pipeline's first steps) and on writing
# and merging float32 partials than they read. On an H200 (device time, af45169), with the
# planned kernel's 128-token steps, 1024 and 768 read fastest of 256-1024 (level) for the
# batches whose total is small enough for this to bind: one 32,768-token row among 63 of
# 128 3.53 TB/s against 3.32 at 256, 8 x 4096 3.36 against 3.19 (8 KV heads, head_dim 128;
# docs/benchmarks.md "The planned defaults re-measured").
MIN_CHUNK_TOKENS = 1024
# The smallest chunk of a small batch. A batch whose chunks at MIN_CHUNK_TOKENS, one
# program each per KV head, number fewer than SMALL_BATCH_PROGRAMS_PER_SM per SM leaves
# SMs idle, and its time is its longest program's steps one after another (each a memory
# round trip); its floor is instead the share of the work that gives every SM that many
# programs, down to SMALL_MIN_CHUNK_TOKENS (:func:`min_chunk_for`). Two planned programs
# fit an SM at head_dim 64 bf16 (three 32 KiB stages); the rule is measured there only
# (one decode step of an engine, one H200 process, eadb396: docs/benchmarks.md "The
# smallest chunk of a small batch"): 61 ShareGPT-like rows (mean 272 keys, longest 664) at
# 9/3 heads of 64 (183 programs at 1024) read fastest at a floor of 256 of 128-1024 (1.44
# TB/s, 1024 1.17); at 32/8 heads (488 programs) 768 and 1024 did (2.34 TB/s, 256 2.04).
SMALL_MIN_CHUNK_TOKENS = 256
SMALL_BATCH_PROGRAMS_PER_SM = 2
# Chunk boundaries inside a row are multiples of this; the kernel's decode_kv_tile should
# divide it (16..128 do), else a step straddles two chunks and is read twice (still
# correct: the kernel masks by the chunk's range).
DEFAULT_KV_TILE = 128
# The padded chunk count is at least this (and by default a power of two; see bucket()).
MIN_CHUNK_BUCKET = 16


@functools.cache
def num_sms() -> int:
  """SMs of JAX's first GPU (``core_count``); 132 (an H100 / H200) off a GPU."""
  try:
    dev = jax.devices()[0]
    if dev.platform == "gpu":
      return int(getattr(dev, "core_count", 132) or 132)
  except Exception:  # noqa: BLE001 - no device info: assume an H100 / H200
    pass
  return 132


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=("chunk_seq", "chunk_start", "chunk_end", "seq_first_chunk", "seq_num_chunks"),
  meta_fields=("block_size", "num_kv_heads", "kv_tile", "sliding_window"),
)
@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """The work of one decode call, cut into chunks: a pytree (arrays are its leaves).

  ``C`` (the padded chunk count) is a :func:`bucket` size >= ``MIN_CHUNK_BUCKET``; chunks
  ``num_chunks ..  C - 1`` are padding (``chunk_seq = 0``, ``start = end = 0``: they
  read nothing and no sequence merges them).

  Attributes:
    chunk_seq: i32[C], the sequence (block-table row) of each chunk.
    chunk_start, chunk_end: i32[C], the chunk's key positions ``[start, end)``.
    seq_first_chunk: i32[batch], index of each sequence's first chunk (0 if it has none).
    seq_num_chunks: i32[batch], how many chunks each sequence has (0 for length 0).
    block_size, num_kv_heads: of the cache the plan was built for (checked per call).
    kv_tile: internal chunk boundaries are multiples of it.
    sliding_window: the window the plan left out keys for (chunks cover only the last
      ``window`` positions), or None (all positions; the kernel still masks any window).
  """

  chunk_seq: np.ndarray
  chunk_start: np.ndarray
  chunk_end: np.ndarray
  seq_first_chunk: np.ndarray
  seq_num_chunks: np.ndarray
  block_size: int
  num_kv_heads: int
  kv_tile: int
  sliding_window: int | None

  @property
  def num_padded_chunks(self) -> int:
    return int(self.chunk_seq.shape[0])

  @property
  def batch(self) -> int:
    return int(self.seq_first_chunk.shape[0])

  def num_chunks(self) -> int:
    """Real (unpadded) chunks; a host read when the arrays are on the device."""
    return int(np.asarray(self.seq_num_chunks).sum())

  def device_put(self, device=None) -> DecodePlan:
    """The plan with its arrays on ``device`` (one transfer of the five small arrays)."""
    return jax.device_put(self, device)


def bucket(n: int, per_octave: int = 1) -> int:
  """The padded chunk count for ``n`` chunks: the smallest ``p * (1 + k / per_octave)``
  (``p`` a power of two, ``k`` in 1..per_octave) that holds ``n``, at least
  ``MIN_CHUNK_BUCKET``. ``per_octave=1`` gives powers of two (up to 2x padding, one shape
  per doubling); 2 or 4 pad at most 1.5x or 1.25x for 2 or 4 shapes per doubling."""
  if n <= MIN_CHUNK_BUCKET:
    return MIN_CHUNK_BUCKET
  p = 1 << ((n - 1).bit_length() - 1)  # p < n <= 2p
  step = p // per_octave
  return p + -(-(n - p) // step) * step


def min_chunk_for(
  total_tokens: int, num_kv_heads: int, spans=None, *, kv_tile: int = DEFAULT_KV_TILE
) -> int:
  """The smallest chunk :func:`chunk_tokens_for` gives when none is set.

  ``MIN_CHUNK_TOKENS`` when the rows' key ``spans`` (NumPy ints, 0 for a row without keys
  or a padding row) cut at that size give at least ``SMALL_BATCH_PROGRAMS_PER_SM``
  programs per SM (``sum(ceil(span / MIN_CHUNK_TOKENS)) * num_kv_heads``); otherwise (or
  when ``spans`` is None) the share of ``total_tokens * num_kv_heads`` token-heads that
  gives every SM that many programs, rounded up to ``kv_tile``, within
  ``[SMALL_MIN_CHUNK_TOKENS, MIN_CHUNK_TOKENS]``.
  """
  slots = SMALL_BATCH_PROGRAMS_PER_SM * num_sms()
  if spans is not None:
    # Rows with keys first (a lower bound of the chunks, one array call), then the chunks.
    if int(np.count_nonzero(spans)) * num_kv_heads >= slots or (
      int(((spans + (MIN_CHUNK_TOKENS - 1)) // MIN_CHUNK_TOKENS).sum()) * num_kv_heads >= slots
    ):
      return MIN_CHUNK_TOKENS
  share = -(-total_tokens * num_kv_heads // slots)
  share = -(-share // kv_tile) * kv_tile
  return min(max(share, SMALL_MIN_CHUNK_TOKENS), MIN_CHUNK_TOKENS)


def chunk_tokens_for(
  total_tokens: int,
  num_kv_heads: int,
  *,
  kv_tile: int = DEFAULT_KV_TILE,
  target_programs: int | None = None,
  min_chunk_tokens: int | None = None,
  spans=None,
) -> int:
  """The chunk size a batch of ``total_tokens`` visible tokens per KV head (its rows' key
  ``spans``, when known) is cut into: its share of ``target_programs`` (default
  ``PROGRAMS_PER_SM`` per SM), at least ``min_chunk_tokens`` (default
  :func:`min_chunk_for`), rounded up to ``kv_tile``."""
  if target_programs is None:
    target_programs = PROGRAMS_PER_SM * num_sms()
  if min_chunk_tokens is None:
    min_chunk_tokens = min_chunk_for(total_tokens, num_kv_heads, spans, kv_tile=kv_tile)
  per = -(-total_tokens * num_kv_heads // max(target_programs, 1))
  size = max(per, min_chunk_tokens, 1)
  return -(-size // kv_tile) * kv_tile


def _int_or_none(value) -> int | None:
  """``value`` as a Python int if it is an integer (NumPy's too), else None (bools too)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    return None
  return int(value)


def plan_decode(
  lengths,
  block_size: int,
  num_kv_heads: int,
  *,
  kv_tile: int = DEFAULT_KV_TILE,
  sliding_window: int | None = None,
  target_programs: int | None = None,
  min_chunk_tokens: int | None = None,
  chunk_tokens: int | None = None,
  buckets_per_octave: int = 1,
) -> DecodePlan:
  """Cuts a decode batch into balanced chunks over (sequence, key range); NumPy only.

  Args:
    lengths: int[batch] on the host, the tokens in each sequence's cache (this step's
      query included), as the call's ``lengths``.
    block_size, num_kv_heads: of the K/V cache the plan is for.
    kv_tile: chunk boundaries inside a row are multiples of it (a power of two).
    sliding_window: if set, each row's chunks cover only ``[length - window, length)``,
      the keys its query sees; the call must then use the same window.
    target_programs: (chunk, KV head) programs to aim at; default ``PROGRAMS_PER_SM`` per
      SM of the first GPU (132 SMs off a GPU).
    min_chunk_tokens: the smallest chunk size chosen; default :func:`min_chunk_for` of the
      batch (``SMALL_MIN_CHUNK_TOKENS`` .. ``MIN_CHUNK_TOKENS``).
    chunk_tokens: the chunk size itself (a multiple of ``kv_tile``), overriding the choice.
    buckets_per_octave: 1 (powers of two), 2, 4 or 8 padded chunk counts per doubling
      (:func:`bucket`): more shapes to compile, fewer empty padding programs.

  Returns:
    A :class:`DecodePlan` with NumPy int32 arrays (``jit`` moves them to the device; or
    ``plan.device_put()`` first).

  Raises:
    ValueError: on a negative length, a bad ``kv_tile`` / ``block_size`` /
      ``sliding_window`` / ``chunk_tokens`` / ``buckets_per_octave``.
  """
  lengths = np.asarray(lengths)
  # dtype.kind, not np.issubdtype: the plan is on the engine's per-step path (~2 us saved).
  if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
    raise ValueError(f"lengths must be a 1-D integer array, got {lengths.shape} {lengths.dtype}")
  # NumPy integers are ints here (a block size read from an array); bools are not.
  kv_tile = _int_or_none(kv_tile)
  if kv_tile is None or not (kv_tile > 0 and kv_tile & (kv_tile - 1) == 0):
    raise ValueError(f"kv_tile must be a power of two, got {kv_tile!r}")
  block_size, num_kv_heads = _int_or_none(block_size), _int_or_none(num_kv_heads)
  if block_size is None or block_size < 1:
    raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
  if num_kv_heads is None or num_kv_heads < 1:
    raise ValueError(f"num_kv_heads must be an int >= 1, got {num_kv_heads!r}")
  if sliding_window is not None:
    window = _int_or_none(sliding_window)
    if window is None or window < 1:
      raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
    sliding_window = window
  if buckets_per_octave not in (1, 2, 4, 8):
    raise ValueError(f"buckets_per_octave must be 1, 2, 4 or 8, got {buckets_per_octave!r}")
  if chunk_tokens is not None:
    tokens = _int_or_none(chunk_tokens)
    if tokens is None or tokens <= 0 or tokens % kv_tile:
      raise ValueError(
        f"chunk_tokens must be a positive multiple of {kv_tile}, got {chunk_tokens!r}"
      )
    chunk_tokens = tokens
  batch = lengths.shape[0]
  if batch and lengths.min() < 0:
    raise ValueError(f"lengths must be >= 0, got {lengths[lengths < 0][:8].tolist()}")
  # Every NumPy call here costs ~1 us on 256 rows whatever it computes, and the engine
  # builds a plan each decode step (issue 15: <= 0.1 ms at 256 sequences), so the work is
  # done in as few calls as possible: rows sorted once, per-row sizes computed in that
  # order, and the rows that are cut (span > chunk_tokens, a prefix of the sorted rows)
  # expanded apart from the one-chunk rows, which need no per-chunk arithmetic.
  length = lengths.astype(np.int64)
  if sliding_window is None:
    lo = lo_aligned = 0
    span = length  # tokens from the first aligned tile; 0 for an empty row
    visible = int(length.sum())
  else:
    lo = np.maximum(length - sliding_window, 0)
    lo_aligned = lo // kv_tile * kv_tile
    span = length - lo_aligned  # an empty row has lo = lo_aligned = 0: span 0
    visible = int((length - lo).sum())
  # (Array methods, not np.* wrappers: each wrapper adds ~1 us of Python.)
  order = (-span).argsort(kind="stable")  # longest rows first
  span_o = span[order]
  rows = int(np.count_nonzero(span_o))  # rows with keys: a prefix of the order
  if chunk_tokens is None:
    chunk_tokens = chunk_tokens_for(
      visible,
      num_kv_heads,
      kv_tile=kv_tile,
      target_programs=target_programs,
      min_chunk_tokens=min_chunk_tokens,
      spans=span_o[:rows],
    )
  cut = int(np.count_nonzero(span_o > chunk_tokens))  # rows of >= 2 chunks: a prefix too
  order_r = order[:rows]
  # A cut row: ceil(span / chunk_tokens) pieces, an equal piece size (a kv_tile multiple,
  # <= chunk_tokens), and the pieces that size needs (never more than the first count).
  # A row of span <= chunk_tokens is one chunk [lo, length).
  span_c = span_o[:cut]
  pieces = (span_c + (chunk_tokens - 1)) // chunk_tokens
  size = ((span_c - 1) // pieces + kv_tile) // kv_tile * kv_tile  # ceil, rounded up
  count_c = (span_c - 1) // size + 1
  num_cut = int(count_c.sum())
  num = num_cut + rows - cut
  padded = bucket(num, buckets_per_octave)
  chunks = np.zeros((3, padded), np.int32)  # chunk_seq, chunk_start, chunk_end
  seq_first = np.zeros(batch, np.int32)
  seq_count = np.zeros(batch, np.int32)
  if cut:
    first_c = count_c.cumsum() - count_c
    which = np.arange(cut).repeat(count_c)  # the cut row of each of their chunks
    k = np.arange(num_cut) - first_c[which]  # chunk index within its row
    seq = order[which]
    base = k * size[which]
    if sliding_window is not None:
      base += lo_aligned[seq]
    chunks[0, :num_cut] = seq
    chunks[1, :num_cut] = base if sliding_window is None else np.maximum(base, lo[seq])
    base += size[which]
    chunks[2, :num_cut] = np.minimum(base, length[seq])
    seq_first[order[:cut]] = first_c
    seq_count[order[:cut]] = count_c
  one = order_r[cut:]  # one chunk each: [lo, length)
  chunks[0, num_cut:num] = one
  if sliding_window is not None:
    chunks[1, num_cut:num] = lo[one]
  chunks[2, num_cut:num] = length[one]
  seq_first[one] = np.arange(num_cut, num, dtype=np.int32)
  seq_count[one] = 1
  return DecodePlan(
    chunk_seq=chunks[0],
    chunk_start=chunks[1],
    chunk_end=chunks[2],
    seq_first_chunk=seq_first,
    seq_num_chunks=seq_count,
    block_size=block_size,
    num_kv_heads=num_kv_heads,
    kv_tile=kv_tile,
    sliding_window=sliding_window,
  )
