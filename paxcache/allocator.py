"""Host-side block allocator: sequences' block tables, copy-on-write, host swap, metrics.

Pure Python and NumPy, outside ``jit``. The allocator only hands out block ids and slots; the
device-side copies it asks for (copy-on-write pairs, swap pairs) are done by the caller.

It is the sequence-facing manager over two smaller pieces:

- :class:`paxcache.block_pool.BlockPool`: per-block reference counts and fill, the free list;
- :class:`paxcache.prefix_cache.PrefixCache`: block keys (the one hashing path), the
  ``key -> block`` map and LRU eviction of cached blocks.

State per sequence lives in rows of preallocated NumPy arrays (``_table[row]`` is the sequence's
block table, ``-1`` past its last block), so a decode step's appends and the block-table build are
a handful of vectorised NumPy operations, with Python work only for the few sequences that need a
new block, a copy-on-write copy or a new prefix-cache hash in that step.

Words: a block is *used* (reference count > 0), *cached* (reference count 0 but it holds a full
block whose hash is in the prefix cache, so a later sequence may reuse it; evicted least recently
used first) or *free*. ``used + cached + free == num_blocks`` always. See ``docs/allocator.md``.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from paxcache.block_pool import BlockPool
from paxcache.prefix_cache import PrefixCache
from paxcache.prefix_cache import block_hash as block_hash  # re-exported: paxcache.block_hash

# Same value as ``kernels.INVALID_BLOCK`` / ``kernels.INVALID_SLOT``; repeated here so that the
# allocator stays free of jax (a test checks they agree).
INVALID_BLOCK = -1
PENDING_TOKEN = -1  # a token appended before its id is known (see append_batch)

_FORGOTTEN_LIMIT = 1 << 16  # how many freed ids we remember, only to word error messages better


def _is_int(value) -> bool:
  """A Python or NumPy integer, not a bool (``True`` is an int to Python, never a count here)."""
  return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _names(seqs) -> str:
  """``sequence 'a'`` or ``sequences 'a', 'b'``, for error messages."""
  ids = ", ".join(repr(seq.seq_id) for seq in seqs)
  return f"sequence{'s' if len(seqs) > 1 else ''} {ids}"


def _expect(condition, what) -> None:
  if not condition:
    raise AssertionError(f"allocator invariant broken: {what}")


class AllocatorError(Exception):
  """Base class of the allocator's errors; after any of them the allocator is unchanged."""


class OutOfBlocksError(AllocatorError):
  """Not enough free (device or host) blocks; nothing was changed.

  Attributes:
    pool: ``"device"`` or ``"host"``.
    needed: blocks the operation needed.
    available: blocks that could have been given (free plus evictable cached ones).
  """

  def __init__(self, message: str, *, pool: str, needed: int, available: int):
    super().__init__(message)
    self.pool = pool
    self.needed = needed
    self.available = available


class SequenceError(AllocatorError, ValueError):
  """Misuse naming a sequence: unknown or freed id, duplicate id, wrong state (e.g. swapped)."""


class AppendResult(NamedTuple):
  """What one sequence's append asks of the device.

  slots: ``i32[num_new_tokens]``, ``block_id * block_size + offset`` of each new token.
  cow: ``(src_block, dst_block)`` to copy before writing the new tokens, or ``None``.
  """

  slots: np.ndarray
  cow: tuple[int, int] | None


class BatchAppendResult(NamedTuple):
  """What a batched one-token-per-sequence append asks of the device.

  slots: ``i32[batch]``, the slot of each sequence's new token, in the order given.
  cow_pairs: ``i32[num_copies, 2]`` of ``(src_block, dst_block)``; copy before writing.
  """

  slots: np.ndarray
  cow_pairs: np.ndarray


@dataclasses.dataclass(frozen=True)
class SequenceView:
  """Read-only snapshot of one sequence.

  block_ids: ``i32[num_seq_blocks]``, device blocks in logical order (empty while swapped out).
  host_block_ids: ``i32[num_seq_blocks]`` while swapped out, else empty.
  """

  seq_id: Hashable
  num_tokens: int
  num_blocks: int
  block_ids: np.ndarray
  host_block_ids: np.ndarray
  swapped: bool


@dataclasses.dataclass(frozen=True)
class AllocatorMetrics:
  """Pool occupancy and waste at one moment, plus running totals.

  Waste is reserved slots holding no token over reserved slots. Paged: reserved slots are the
  used device blocks times ``block_size`` (a shared block counts once). Contiguous: each resident
  sequence reserves ``max_seq_len`` slots and holds its own tokens (nothing is shared).
  """

  num_blocks: int
  block_size: int
  num_used_blocks: int
  num_free_blocks: int
  num_cached_blocks: int
  num_host_blocks: int
  num_host_used_blocks: int
  num_host_free_blocks: int
  num_sequences: int  # resident on device
  num_swapped_sequences: int
  num_tokens: int  # sum over resident sequences (shared tokens counted once per sequence)
  filled_slots: int  # slots of used blocks that hold a token (a shared block counts once)
  reserved_slots: int  # num_used_blocks * block_size
  waste: float  # paged: 1 - filled_slots / reserved_slots (0.0 when nothing is reserved)
  max_seq_len: int | None
  contiguous_reserved_slots: int | None  # num_sequences * max_seq_len
  contiguous_waste: float | None  # 1 - num_tokens / contiguous_reserved_slots
  prefix_query_tokens: int  # prompt tokens given to add_sequence so far
  prefix_hit_tokens: int  # of those, tokens served from the prefix cache
  num_evictions: int
  num_cow_copies: int
  num_swapped_out_blocks: int
  num_swapped_in_blocks: int  # blocks copied host -> device (prefix-cache reuses not counted)


class _SwapInPlan(NamedTuple):
  """Where a swap-in puts each distinct host block of its sequences."""

  fresh: dict[int, tuple[bytes | None, int]]  # to a new device block: (hash or None, fill)
  reused: dict[int, int]  # to the prefix cache's device block of its hash
  same_as: dict[int, int]  # to the new block of an earlier host block of the same hash


class _Seq:
  """Python-side per-sequence state that does not vectorise (hash chain, host blocks)."""

  __slots__ = ("seq_id", "row", "hashes", "host_blocks")

  def __init__(self, seq_id: Hashable, row: int):
    self.seq_id = seq_id
    self.row = row
    self.hashes: list[bytes] = []  # hash of each full block, in logical order
    self.host_blocks: list[int] | None = None  # set while swapped out


class BlockAllocator:
  """Block allocator for one paged KV pool of ``num_blocks`` blocks of ``block_size`` slots.

  Args:
    num_blocks: device blocks in the pool (ids ``0 .. num_blocks - 1``, all usable).
    block_size: token slots per block.
    num_host_blocks: host (CPU) blocks for swapping; 0 disables swapping.
    enable_prefix_caching: hash full blocks and reuse them across sequences.
    max_seq_len: if set, adding or appending past it raises ``ValueError``, and metrics report
      contiguous reservation of ``max_seq_len`` slots per sequence.
    max_pending_tokens: how many ``PENDING_TOKEN`` appends (tokens still being sampled on
      the device) a sequence may hold at once, 1 to ``block_size + 1``: 1 for an engine
      whose host learns step n's tokens before it schedules step n + 2, 2 for one that
      keeps two steps on the device (see :meth:`append_batch`).

  The sizes are Python or NumPy ints (a bool or a float raises ``ValueError``), as are the
  token positions given to :meth:`slots`.

  Every method costs O(blocks it touches) (plus O(tokens) for hashing); none scans the pool.
  Every error leaves the allocator exactly as before the call.
  """

  def __init__(
    self,
    num_blocks: int,
    block_size: int,
    *,
    num_host_blocks: int = 0,
    enable_prefix_caching: bool = True,
    max_seq_len: int | None = None,
    max_pending_tokens: int = 1,
  ):
    for name, value, low in (
      ("num_blocks", num_blocks, 1),
      ("block_size", block_size, 1),
      ("num_host_blocks", num_host_blocks, 0),
    ):
      if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if max_seq_len is not None and (not _is_int(max_seq_len) or max_seq_len < 1):
      raise ValueError(f"max_seq_len must be None or an int >= 1, got {max_seq_len!r}")
    if not _is_int(max_pending_tokens) or not 1 <= max_pending_tokens <= block_size + 1:
      raise ValueError(
        f"max_pending_tokens must be an int in [1, block_size + 1 = {block_size + 1}], got "
        f"{max_pending_tokens!r}"
      )
    if not isinstance(enable_prefix_caching, bool | np.bool_):
      # bool("no") is True: a string or a number here is a mistake, not a choice.
      raise ValueError(f"enable_prefix_caching must be a bool, got {enable_prefix_caching!r}")
    self.num_blocks = int(num_blocks)
    self.block_size = int(block_size)
    self.num_host_blocks = int(num_host_blocks)
    self.enable_prefix_caching = bool(enable_prefix_caching)
    self.max_seq_len = None if max_seq_len is None else int(max_seq_len)
    self.max_pending_tokens = int(max_pending_tokens)

    # Device blocks: the prefix cache (keys, LRU of cached blocks) and the pool (reference
    # counts, fill, free list) that parks released blocks in it. With prefix caching off the
    # cache stays empty: nothing is hashed, so nothing is registered or cached.
    self._cache = PrefixCache(self.num_blocks, self.block_size)
    self._pool = BlockPool(self.num_blocks, self._cache)
    # Host blocks, each held by the swapped-out sequences whose tables name it: one, or
    # several when a group swapped out together shared it on the device (swap_out_group).
    self._host_free: collections.deque[int] = collections.deque(range(self.num_host_blocks))
    self._host_ref = np.zeros(self.num_host_blocks, np.int32)

    # Per-sequence rows; grown by doubling.
    rows = 16
    width = 8 if self.max_seq_len is None else -(-self.max_seq_len // self.block_size)
    self._table = np.full((rows, width), INVALID_BLOCK, np.int32)
    self._ntok = np.zeros(rows, np.int32)
    self._nblk = np.zeros(rows, np.int32)
    self._swapped = np.zeros(rows, np.bool_)
    # Tokens of each sequence's blocks not hashed yet (its partly filled last block, and
    # with pending tokens the block before it), needed to hash them once they fill: a ring
    # of ``_ring_blocks`` blocks, position p at column p % (_ring_blocks * block_size).
    # Pending tokens are the last ones, so the unhashed positions span at most
    # max_pending_tokens + block_size - 1 <= 2 * block_size of them.
    self._ring_blocks = 1 if self.max_pending_tokens == 1 else 2
    self._partial = np.zeros((rows, self._ring_blocks * self.block_size), np.int64)
    # Pending tokens of each row (the row's last ``_npend`` tokens).
    self._npend = np.zeros(rows, np.int32)
    self._free_rows: list[int] = list(range(rows - 1, -1, -1))
    self._seqs: dict[Hashable, _Seq] = {}
    self._row_of: dict[Hashable, int] = {}
    self._forgotten: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
    # Sequences whose last appended tokens are PENDING_TOKEN (an engine that schedules step
    # n + 1 before step n's token is back): ``_npend[row]`` of them, always the sequence's
    # last (only more pending tokens are appended after one; nothing forks or swaps it
    # until all are resolved, oldest first), so the oldest is at position
    # ``num_tokens - _npend[row]``; a block it fills is hashed by resolve_tokens. A set, so
    # that a decode step adds and resolves a whole batch without a per-sequence Python loop.
    self._pending: set[Hashable] = set()
    # The rows of the last batch of ids looked up, while no sequence was added, freed or
    # swapped since (``_epoch`` counts those): an engine step passes the same decoding
    # sequences to several batched calls, and consecutive steps mostly the same ones.
    self._epoch = 0
    self._memo_rows: tuple[int, list, np.ndarray] = (-1, [], np.zeros(0, np.intp))

    # Running totals (filled slots are the pool's, evictions the prefix cache's).
    self._resident_tokens = 0
    self._num_resident = 0
    self._prefix_query_tokens = 0
    self._prefix_hit_tokens = 0
    self._num_cow_copies = 0
    self._num_swapped_out_blocks = 0
    self._num_swapped_in_blocks = 0

  # ------------------------------------------------------------------ queries

  @property
  def num_free_blocks(self) -> int:
    """Blocks a new allocation can take now: free ones plus evictable cached ones."""
    return self._pool.num_available

  @property
  def num_cached_blocks(self) -> int:
    return self._cache.num_cached

  @property
  def num_used_blocks(self) -> int:
    return self._pool.num_used

  @property
  def _block_of_hash(self) -> Mapping[bytes, int]:
    """Read-only view of the prefix cache's ``key -> block`` map (tests look inside)."""
    return self._cache.entries

  @property
  def num_free_host_blocks(self) -> int:
    return len(self._host_free)

  def __contains__(self, seq_id: Hashable) -> bool:
    return seq_id in self._seqs

  def __len__(self) -> int:
    return len(self._seqs)

  def seq_ids(self) -> Iterator[Hashable]:
    return iter(list(self._seqs))

  def num_tokens(self, seq_id: Hashable) -> int:
    return int(self._ntok[self._get(seq_id).row])

  def is_swapped(self, seq_id: Hashable) -> bool:
    return bool(self._swapped[self._get(seq_id).row])

  def ref_count(self, block_id: int) -> int:
    """Number of sequences whose block table holds ``block_id`` (0 for free or cached blocks)."""
    if not _is_int(block_id):
      raise ValueError(f"block_id must be an int, got {block_id!r} ({type(block_id).__name__})")
    if not 0 <= block_id < self.num_blocks:
      raise ValueError(f"block_id must be in [0, {self.num_blocks}), got {block_id}")
    return int(self._pool.ref[block_id])

  def sequence(self, seq_id: Hashable) -> SequenceView:
    """A read-only snapshot of ``seq_id``'s blocks and token count."""
    seq = self._get(seq_id)
    row = seq.row
    nb = int(self._nblk[row])
    empty = np.zeros(0, np.int32)
    if seq.host_blocks is not None:
      dev, host = empty, np.array(seq.host_blocks, np.int32)
    else:
      dev, host = self._table[row, :nb].copy(), empty
    dev.flags.writeable = False
    host.flags.writeable = False
    return SequenceView(
      seq_id=seq_id,
      num_tokens=int(self._ntok[row]),
      num_blocks=nb,
      block_ids=dev,
      host_block_ids=host,
      swapped=seq.host_blocks is not None,
    )

  def num_cached_tokens(self, prompt: Sequence[int] | np.ndarray) -> int:
    """Tokens of ``prompt`` that ``add_sequence`` would take from the prefix cache now."""
    prompt = self._as_tokens(prompt, "prompt")
    return len(self._prefix_hits(self._prompt_keys(prompt), len(prompt))[0]) * self.block_size

  def blocks_needed_to_add(self, prompt: Sequence[int] | np.ndarray) -> int:
    """Blocks ``add_sequence(prompt)`` takes from ``num_free_blocks`` (prefix hits counted)."""
    prompt = self._as_tokens(prompt, "prompt")
    hits, hits_cached = self._prefix_hits(self._prompt_keys(prompt), len(prompt))
    return self._cdiv(len(prompt)) - len(hits) + hits_cached

  def can_add(self, prompt: Sequence[int] | np.ndarray) -> bool:
    return self.blocks_needed_to_add(prompt) <= self.num_free_blocks

  def blocks_needed_to_append(self, seq_ids: Sequence[Hashable], num_tokens: int = 1) -> int:
    """New blocks that appending ``num_tokens`` to each of ``seq_ids`` needs (copy-on-write too)."""
    if not _is_int(num_tokens):
      raise ValueError(
        f"num_tokens must be an int, got {num_tokens!r} ({type(num_tokens).__name__})"
      )
    num_tokens = int(num_tokens)
    if num_tokens < 0:
      raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if num_tokens > np.iinfo(np.int64).max // 2:
      # No sequence holds that many tokens (nor can the int64 arithmetic below).
      raise ValueError(f"num_tokens={num_tokens} is past any sequence length")
    rows = self._rows(seq_ids, "append to")
    if num_tokens == 0:
      return 0
    n = self._ntok[rows].astype(np.int64)
    nb = self._nblk[rows]
    grow = -(-(n + num_tokens) // self.block_size) - nb
    return int(grow.sum()) + self._num_copies(rows, nb, self._shared_partial(rows, n, nb))

  def can_append(self, seq_ids: Sequence[Hashable], num_tokens: int = 1) -> bool:
    return self.blocks_needed_to_append(seq_ids, num_tokens) <= self.num_free_blocks

  def blocks_needed_to_swap_in(self, seq_id: Hashable) -> int:
    return self.blocks_needed_to_swap_in_group([seq_id])

  def blocks_needed_to_swap_in_group(self, seq_ids: Sequence[Hashable]) -> int:
    """Device blocks :meth:`swap_in_group` of ``seq_ids`` would take from the free pool."""
    return self._blocks_to_take(self._plan_swap_in(self._swapped_group(seq_ids, "swap in")))

  def can_swap_in(self, seq_id: Hashable) -> bool:
    return self.blocks_needed_to_swap_in(seq_id) <= self.num_free_blocks

  def host_blocks_needed_to_swap_out(self, seq_ids: Sequence[Hashable]) -> int:
    """Host blocks :meth:`swap_out_group` of ``seq_ids`` takes: their distinct device blocks."""
    rows = [seq.row for seq in self._resident_group(seq_ids, "swap out")]
    return len(self._group_blocks(rows))

  def can_swap_out(self, seq_id: Hashable) -> bool:
    return self.host_blocks_needed_to_swap_out([seq_id]) <= len(self._host_free)

  def slots(self, seq_id: Hashable, start: int, stop: int) -> np.ndarray:
    """Slots of tokens ``start .. stop - 1`` of ``seq_id``: ``i32[stop - start]`` (for prefill)."""
    for name, value in (("start", start), ("stop", stop)):
      if not _is_int(value):
        raise ValueError(
          f"slots of sequence {seq_id!r}: {name} must be an int token position, got "
          f"{value!r} ({type(value).__name__})"
        )
    seq = self._resident(seq_id, "get slots of")
    n = int(self._ntok[seq.row])
    if not 0 <= start <= stop <= n:
      raise ValueError(
        f"slots of sequence {seq_id!r}: need 0 <= start <= stop <= num_tokens={n}, "
        f"got start={start}, stop={stop}"
      )
    pos = np.arange(start, stop, dtype=np.int64)
    blocks = self._table[seq.row, pos // self.block_size].astype(np.int64)
    return (blocks * self.block_size + pos % self.block_size).astype(np.int32)

  def gather(
    self,
    seq_ids: Sequence[Hashable],
    batch_size: int,
    max_blocks: int | Callable[[int], int],
  ) -> tuple[np.ndarray, np.ndarray]:
    """Block ids ``i32[batch_size, max_blocks]`` (-1 unused) and lengths ``i32[batch_size]``.

    One vectorised gather over the sequences' rows; rows past ``len(seq_ids)`` are padding
    (all -1, length 0). ``max_blocks`` may be a function of the longest block list (e.g. a
    bucketing function). Used by ``BlockTable.from_allocator``.
    """
    k = len(seq_ids)
    if k > batch_size:
      raise ValueError(f"batch_size={batch_size} is smaller than len(seq_ids)={k}")
    rows = self._rows(seq_ids, "build a block table for") if k else np.zeros(0, np.intp)
    need = int(self._nblk[rows].max()) if k else 0
    if callable(max_blocks):
      max_blocks = max_blocks(need)
    block_ids = np.full((batch_size, max_blocks), INVALID_BLOCK, np.int32)
    lengths = np.zeros(batch_size, np.int32)
    if k == 0:
      return block_ids, lengths
    if need > max_blocks:
      raise ValueError(f"max_blocks={max_blocks} is smaller than the longest block list ({need})")
    w = min(max_blocks, self._table.shape[1])
    # take() on a C-contiguous table copies whole row prefixes.
    block_ids[:k, :w] = self._table[rows, :w]
    lengths[:k] = self._ntok[rows]
    return block_ids, lengths

  def metrics(self, max_seq_len: int | None = None) -> AllocatorMetrics:
    """Occupancy, waste (paged and contiguous at ``max_seq_len``) and running totals; O(1)."""
    max_seq_len = self.max_seq_len if max_seq_len is None else max_seq_len
    used = self.num_used_blocks
    reserved = used * self.block_size
    filled = self._pool.filled_slots
    waste = 1.0 - filled / reserved if reserved else 0.0
    contiguous_reserved = contiguous_waste = None
    if max_seq_len is not None:
      contiguous_reserved = self._num_resident * max_seq_len
      if contiguous_reserved:
        contiguous_waste = 1.0 - self._resident_tokens / contiguous_reserved
      else:
        contiguous_waste = 0.0
    return AllocatorMetrics(
      num_blocks=self.num_blocks,
      block_size=self.block_size,
      num_used_blocks=used,
      num_free_blocks=self._pool.num_free,
      num_cached_blocks=self._cache.num_cached,
      num_host_blocks=self.num_host_blocks,
      num_host_used_blocks=self.num_host_blocks - len(self._host_free),
      num_host_free_blocks=len(self._host_free),
      num_sequences=self._num_resident,
      num_swapped_sequences=len(self._seqs) - self._num_resident,
      num_tokens=self._resident_tokens,
      filled_slots=filled,
      reserved_slots=reserved,
      waste=waste,
      max_seq_len=max_seq_len,
      contiguous_reserved_slots=contiguous_reserved,
      contiguous_waste=contiguous_waste,
      prefix_query_tokens=self._prefix_query_tokens,
      prefix_hit_tokens=self._prefix_hit_tokens,
      num_evictions=self._cache.num_evictions,
      num_cow_copies=self._num_cow_copies,
      num_swapped_out_blocks=self._num_swapped_out_blocks,
      num_swapped_in_blocks=self._num_swapped_in_blocks,
    )

  # ------------------------------------------------------------------ mutations

  def add_sequence(self, seq_id: Hashable, prompt: Sequence[int] | np.ndarray) -> int:
    """Adds ``seq_id`` holding ``prompt``'s tokens; returns how many of them are cached.

    The first ``num_cached`` tokens (a multiple of ``block_size``) reuse blocks from the prefix
    cache and already hold K/V; the caller computes tokens ``num_cached .. len(prompt) - 1``
    and writes them at ``slots(seq_id, num_cached, len(prompt))``. The hit is capped at
    ``len(prompt) - 1`` rounded down to a block boundary, so that at least the last prompt token
    is always computed (its logits are needed), and no shared cached block is ever written.

    Full prompt blocks are entered in the prefix cache at once: the caller must write their K/V
    no later than the device step in which another sequence first reads them as a hit.

    Raises:
      SequenceError: ``seq_id`` already exists.
      OutOfBlocksError: not enough device blocks (nothing changed).
      ValueError: bad ``prompt`` or longer than ``max_seq_len``.
    """
    if seq_id in self._seqs:
      raise SequenceError(f"sequence {seq_id!r} already exists")
    prompt = self._as_tokens(prompt, "prompt", (seq_id,))
    length = len(prompt)
    self._check_max_len(seq_id, length)
    keys = self._prompt_keys(prompt)
    hits, hits_cached = self._prefix_hits(keys, length)
    total = self._cdiv(length)
    self._require(total - len(hits) + hits_cached, f"add sequence {seq_id!r} ({length} tokens)")
    self._ensure_width(total)

    seq = self._new_seq(seq_id)
    row = seq.row
    bs = self.block_size
    pool = self._pool
    for b in hits:
      pool.acquire(b)
    blocks = hits + [pool.take() for _ in range(total - len(hits))]
    self._table[row, :total] = blocks
    for j in range(len(hits), total):
      pool.set_fill(blocks[j], min(bs, length - j * bs))
    for j in range(len(hits), len(keys)):
      self._cache.register(keys[j], blocks[j])
    seq.hashes = keys
    rem = length - len(keys) * bs
    if self.enable_prefix_caching and rem:
      base = self._ring_base(len(keys))
      self._partial[row, base : base + rem] = prompt[length - rem :]
    self._ntok[row] = length
    self._nblk[row] = total
    self._resident_tokens += length
    self._prefix_query_tokens += length
    hit_tokens = len(hits) * bs
    self._prefix_hit_tokens += hit_tokens
    return hit_tokens

  def append_tokens(self, seq_id: Hashable, tokens: Sequence[int] | np.ndarray) -> AppendResult:
    """Appends ``tokens`` to ``seq_id``; returns their slots and a copy-on-write pair if any.

    A new block is taken only when the last one is full. If the partly filled last block is
    shared (after ``fork``), a fresh block replaces it in this sequence's table and
    ``cow=(src, dst)`` asks the device to copy ``src`` to ``dst`` before writing; other sharers
    keep ``src`` untouched.
    """
    seq = self._seqs.get(seq_id)
    if seq is None or seq.host_blocks is not None:
      seq = self._resident(seq_id, "append to")  # raises, naming the sequence
    tokens = self._as_tokens(tokens, "tokens", (seq_id,))
    if self._pending and seq_id in self._pending:
      # Its next blocks' keys chain from the pending token's block, not hashed yet.
      raise SequenceError(
        f"cannot append to sequence {seq_id!r}: its last token is still pending "
        "(resolve_tokens first; only append_batch appends more pending tokens)"
      )
    k = len(tokens)
    if k == 0:
      return AppendResult(np.zeros(0, np.int32), None)
    row, bs = seq.row, self.block_size
    n, nb = self._ntok.item(row), self._nblk.item(row)
    if self.max_seq_len is not None:
      self._check_max_len(seq_id, n + k)
    off = n % bs
    last = self._table.item(row, nb - 1) if nb else INVALID_BLOCK
    pool = self._pool
    cow = off != 0 and pool.ref.item(last) > 1
    new_nb = -(-(n + k) // bs)
    needed = new_nb - nb + cow
    if needed and needed > pool.num_available:  # most appends need no block
      self._require(needed, f"append {k} tokens to sequence {seq_id!r}")
    if new_nb > self._table.shape[1]:
      self._ensure_width(new_nb)

    pair = None
    if cow:
      pair = (last, self._copy_on_write(row, nb - 1, last, off))
    table_row = self._table[row]
    for j in range(nb, new_nb):
      table_row[j] = pool.take()
    first = n // bs
    for j in range(first, new_nb):
      pool.set_fill(table_row.item(j), min(bs, n + k - j * bs))
    if k == 1:
      slots = np.array([table_row.item(first) * bs + off], np.int32)
    elif k <= 8:
      slots = np.array([table_row.item(p // bs) * bs + p % bs for p in range(n, n + k)], np.int32)
    else:
      pos = np.arange(n, n + k, dtype=np.int64)
      slots = (table_row[pos // bs].astype(np.int64) * bs + pos % bs).astype(np.int32)

    if self.enable_prefix_caching:
      base = self._ring_base(first)
      if off + k < bs:  # no block fills: just remember the tokens
        self._partial[row, base + off : base + off + k] = tokens
      else:
        combined = np.concatenate([self._partial[row, base : base + off], tokens])
        full = (n + k) // bs - first  # blocks these tokens filled
        self._hash_full_blocks(
          [seq], combined[: full * bs].reshape(1, -1), table_row[first : first + full].tolist()
        )
        rem = (n + k) % bs
        if rem:
          base = self._ring_base((n + k) // bs)
          self._partial[row, base : base + rem] = combined[len(combined) - rem :]
    self._ntok[row] = n + k
    if new_nb != nb:
      self._nblk[row] = new_nb
    self._resident_tokens += k
    return AppendResult(slots, pair)

  def append_batch(
    self, seq_ids: Sequence[Hashable], tokens: Sequence[int] | np.ndarray
  ) -> BatchAppendResult:
    """Appends one token to each of ``seq_ids`` (a decode step), vectorised.

    Args:
      seq_ids: distinct resident sequences.
      tokens: ``[len(seq_ids)]`` the token each sequence appends (hashed into the prefix cache
        when it fills a block). ``PENDING_TOKEN`` (-1) appends a token whose id is not known
        yet (still being sampled on the device): its slot is taken now, and a block it fills
        is hashed when :meth:`resolve_tokens` gives the id. A sequence with a pending token
        takes no fork, swap or known token until every pending one is resolved, and at
        most ``max_pending_tokens`` pending ones.

    Returns:
      ``BatchAppendResult(slots i32[len(seq_ids)], cow_pairs i32[num_copies, 2])``.
    """
    k = len(seq_ids)
    tokens = self._as_tokens(tokens, "tokens", seq_ids, allow_pending=True)
    if len(tokens) != k:
      raise ValueError(f"tokens has {len(tokens)} entries but seq_ids has {k}")
    if k == 0:
      return BatchAppendResult(np.zeros(0, np.int32), np.zeros((0, 2), np.int32))
    bs = self.block_size
    pending = tokens == PENDING_TOKEN
    rows = self._rows(seq_ids, "append to")
    if self._pending and not self._pending.isdisjoint(seq_ids):
      npend = self._npend[rows]
      bad = (npend >= self.max_pending_tokens) | ((npend > 0) & ~pending)
      if bad.any():
        i = int(np.argmax(bad))
        if pending[i]:
          why = (
            "its last token is still pending"
            if self.max_pending_tokens == 1
            else f"it holds {int(npend[i])} pending tokens, max_pending_tokens="
            f"{self.max_pending_tokens}"
          )
        else:  # a known token after a pending one: its block could not be hashed in order
          why = "its last token is still pending and this one is not"
        raise SequenceError(
          f"cannot append to sequence {seq_ids[i]!r}: {why} (resolve_tokens first)"
        )
    n = self._ntok[rows]
    nb = self._nblk[rows]
    if self.max_seq_len is not None and int(n.max()) + 1 > self.max_seq_len:
      i = int(np.argmax(n))
      self._check_max_len(seq_ids[i], int(n[i]) + 1)
    off = n % bs
    new_block = off == 0
    shared = self._shared_partial(rows, n, nb)
    special = np.flatnonzero(new_block | shared)
    needed = int(new_block.sum()) + self._num_copies(rows, nb, shared)
    self._require(needed, f"append one token to each of {k} sequences")
    if len(special) and int(nb.max()) + 1 > self._table.shape[1]:
      self._ensure_width(int(nb.max()) + 1)

    pairs = []
    pool = self._pool
    for i in special.tolist():
      row, nbi = int(rows[i]), int(nb[i])
      if shared[i]:
        src = int(self._table[row, nbi - 1])
        # When every holder of src is in the batch, the last one to come writes in place.
        if pool.ref[src] > 1:
          pairs.append((src, self._copy_on_write(row, nbi - 1, src, int(off[i]))))
      else:
        self._table[row, nbi] = pool.take()
        self._nblk[row] = nbi + 1
    nb = nb + new_block
    last = self._table[rows, nb - 1]
    # Every row's last block is now exclusive to it, so this fancy-index update never collides.
    pool.add_one_token(last)
    slots = (last.astype(np.int64) * bs + off).astype(np.int32)
    self._ntok[rows] = n + 1
    self._resident_tokens += k
    if pending.all():  # an engine with overlap scheduling: every decode's token is pending
      self._pending.update(seq_ids)
      self._npend[rows] += 1
    elif pending.any():
      self._pending.update(seq_ids[i] for i in np.flatnonzero(pending).tolist())
      self._npend[rows[pending]] += 1
    if self.enable_prefix_caching:
      if self._ring_blocks == 1:
        self._partial[rows, off] = tokens
      else:
        self._partial[rows, n % (self._ring_blocks * bs)] = tokens
      # A known token after none pending (append refuses one after a pending token).
      filled = np.flatnonzero((off == bs - 1) & ~pending)
      if len(filled):
        seqs = self._seqs
        self._hash_full_blocks(
          [seqs[seq_ids[i]] for i in filled.tolist()],
          self._block_tokens(rows[filled], n[filled] // bs),
          last[filled].tolist(),
        )
    cow_pairs = np.array(pairs, np.int32).reshape(-1, 2)
    return BatchAppendResult(slots, cow_pairs)

  def resolve_tokens(self, seq_ids: Sequence[Hashable], tokens: Sequence[int] | np.ndarray):
    """Gives the ids of tokens appended as ``PENDING_TOKEN``; hashes the blocks they filled.

    Args:
      seq_ids: sequences with a pending token; each one's oldest pending token is resolved.
      tokens: ``[len(seq_ids)]`` their ids (>= 0).
    """
    tokens = self._as_tokens(tokens, "tokens", seq_ids)
    if len(tokens) != len(seq_ids):
      raise ValueError(f"tokens has {len(tokens)} entries but seq_ids has {len(seq_ids)}")
    if not self._pending.issuperset(seq_ids):
      missing = [s for s in seq_ids if s not in self._pending]
      raise SequenceError(f"resolve_tokens: sequences {missing[:8]!r} have no pending token")
    if not seq_ids:
      return
    # Pending sequences are resident (swap_out refuses them), so _rows only looks them up
    # (and refuses an id given twice, before anything changes).
    rows = self._rows(seq_ids, "resolve the pending token of")
    npend = self._npend[rows]
    pos = self._ntok[rows] - npend  # each one's oldest pending token
    self._npend[rows] = npend - 1
    if self.max_pending_tokens == 1 or not (npend > 1).any():
      self._pending.difference_update(seq_ids)
    else:
      self._pending.difference_update(seq_ids[i] for i in np.flatnonzero(npend == 1).tolist())
    if not self.enable_prefix_caching:
      return
    bs = self.block_size
    off = pos % bs
    if self._ring_blocks == 1:
      self._partial[rows, off] = tokens
    else:
      self._partial[rows, pos % (self._ring_blocks * bs)] = tokens
    filled = np.flatnonzero(off == bs - 1)
    if len(filled):
      rows, block = rows[filled], pos[filled] // bs
      self._hash_full_blocks(
        [self._seqs[seq_ids[i]] for i in filled.tolist()],
        self._block_tokens(rows, block),
        self._table[rows, block].tolist(),
      )

  def has_pending_token(self, seq_id: Hashable) -> bool:
    return seq_id in self._pending

  def num_pending_tokens(self, seq_id: Hashable) -> int:
    """Pending tokens ``seq_id`` holds (0 for an unknown id)."""
    if seq_id not in self._pending:
      return 0
    return int(self._npend[self._seqs[seq_id].row])

  def has_pending_tokens(self, seq_ids: Sequence[Hashable]) -> np.ndarray:
    """``bool[len(seq_ids)]``: :meth:`has_pending_token` of each (unknown ids: False)."""
    if self._pending.issuperset(seq_ids):  # overlap scheduling's steady state
      return np.ones(len(seq_ids), np.bool_)
    return np.fromiter(map(self._pending.__contains__, seq_ids), np.bool_, len(seq_ids))

  def fork(self, parent: Hashable, child: Hashable) -> None:
    """Makes ``child`` share every block of ``parent`` (reference counts + 1; no copy now)."""
    pseq = self._resident(parent, "fork")
    if parent in self._pending:
      raise SequenceError(f"cannot fork sequence {parent!r}: its last token is still pending")
    if child in self._seqs:
      raise SequenceError(f"cannot fork sequence {parent!r} into {child!r}: {child!r} exists")
    prow = pseq.row
    nb = int(self._nblk[prow])
    cseq = self._new_seq(child)
    # _new_seq may have grown the row arrays; read the parent's row only now.
    crow = cseq.row
    blocks = self._table[prow, :nb]
    self._table[crow, :nb] = blocks
    # A sequence never holds the same block twice, so this fancy-index add does not collide.
    self._pool.share(blocks)
    self._ntok[crow] = self._ntok[prow]
    self._nblk[crow] = nb
    self._partial[crow] = self._partial[prow]
    cseq.hashes = list(pseq.hashes)
    self._resident_tokens += int(self._ntok[prow])

  def free(self, seq_id: Hashable) -> None:
    """Frees ``seq_id``: its device blocks (or, swapped out, its host blocks) lose a reference.

    Blocks whose count drops to 0 become cached if they hold a prefix-cache block, else free.
    They are released last block first, so the tail of a sequence is evicted before its head.
    """
    seq = self._get(seq_id, "free")
    row = seq.row
    self._pending.discard(seq_id)  # its block is released unhashed
    self._npend[row] = 0
    if seq.host_blocks is not None:
      self._release_host(seq.host_blocks)
    else:
      self._release_blocks(row)
      self._resident_tokens -= int(self._ntok[row])
      self._num_resident -= 1
    self._ntok[row] = 0
    self._nblk[row] = 0
    self._swapped[row] = False
    self._epoch += 1
    self._free_rows.append(row)
    del self._seqs[seq_id]
    del self._row_of[seq_id]
    self._forgotten[seq_id] = None
    if len(self._forgotten) > _FORGOTTEN_LIMIT:
      self._forgotten.popitem(last=False)

  def swap_out(self, seq_id: Hashable) -> np.ndarray:
    """:meth:`swap_out_group` of one sequence."""
    return self.swap_out_group([seq_id])

  def swap_out_group(self, seq_ids: Sequence[Hashable]) -> np.ndarray:
    """Moves the sequences to host blocks together; returns ``i32[n, 2]`` (device, host) pairs.

    Each distinct device block of theirs is copied once, to one host block that every one of
    them holding it then names (a fork's shared prompt stays one copy on the host, and
    :meth:`swap_in_group` shares it again on the device); a block they share with a sequence
    not in ``seq_ids`` is copied too. The device blocks lose these sequences' references,
    exactly as in ``free``. The caller must copy the pairs before any write of the same step,
    since the device blocks may be reused.
    """
    seqs = self._resident_group(seq_ids, "swap out")
    for seq in seqs:
      if seq.seq_id in self._pending:
        raise SequenceError(
          f"cannot swap out sequence {seq.seq_id!r}: its last token is still pending"
        )
    what = _names(seqs)
    blocks = self._group_blocks([seq.row for seq in seqs])
    nb = len(blocks)
    if nb and self.num_host_blocks == 0:
      raise OutOfBlocksError(
        f"cannot swap out {what}: this allocator has no host pool (num_host_blocks=0)",
        pool="host",
        needed=nb,
        available=0,
      )
    if nb > len(self._host_free):
      raise OutOfBlocksError(
        f"swap out {what}: needs {nb} host blocks, {len(self._host_free)} free of "
        f"{self.num_host_blocks}",
        pool="host",
        needed=nb,
        available=len(self._host_free),
      )
    host = [self._host_free.popleft() for _ in range(nb)]
    host_of = dict(zip(blocks, host, strict=True))
    for seq in seqs:
      row = seq.row
      seq.host_blocks = [host_of[b] for b in self._table[row, : self._nblk[row]].tolist()]
      self._host_ref[seq.host_blocks] += 1
      self._release_blocks(row)
      self._swapped[row] = True
      self._resident_tokens -= int(self._ntok[row])
      self._num_resident -= 1
    self._epoch += 1
    self._num_swapped_out_blocks += nb
    return np.array([blocks, host], np.int32).T.reshape(-1, 2)

  def swap_in(self, seq_id: Hashable) -> np.ndarray:
    """:meth:`swap_in_group` of one sequence."""
    return self.swap_in_group([seq_id])

  def swap_in_group(self, seq_ids: Sequence[Hashable]) -> np.ndarray:
    """Brings the sequences back to device; returns ``i32[n, 2]`` (host, device) pairs.

    A host block several of them name comes back as one device block they share. Full
    blocks whose hash is still in the prefix cache are reused without a copy; the others get
    fresh device blocks (one per hash: two host copies of the same tokens come back as one).
    The sequences' references on their host blocks are dropped (a host block is freed when
    no swapped-out sequence names it).
    """
    seqs = self._swapped_group(seq_ids, "swap in")
    plan = self._plan_swap_in(seqs)
    held = len({hb for seq in seqs for hb in seq.host_blocks})
    self._require(self._blocks_to_take(plan), f"swap in {_names(seqs)} ({held} host blocks)")
    pool = self._pool
    # Take the reused blocks first, so that taking fresh ones cannot evict them.
    dev_of = dict(plan.reused)
    for b in set(plan.reused.values()):
      pool.acquire(b)
    pairs = []
    for hb, (key, fill) in plan.fresh.items():
      b = pool.take()
      pool.set_fill(b, fill)
      if key is not None:
        self._cache.register(key, b)
      dev_of[hb] = b
      pairs.append((hb, b))
    for hb, first in plan.same_as.items():
      dev_of[hb] = dev_of[first]
    # One reference per table entry: acquire and take gave each distinct block one.
    refs = collections.Counter(dev_of[hb] for seq in seqs for hb in seq.host_blocks)
    pool.share(np.fromiter(refs, np.intp, len(refs)), np.fromiter(refs.values(), np.int32) - 1)
    for seq in seqs:
      row = seq.row
      self._table[row, : len(seq.host_blocks)] = [dev_of[hb] for hb in seq.host_blocks]
      self._release_host(seq.host_blocks)
      seq.host_blocks = None
      self._swapped[row] = False
      self._resident_tokens += int(self._ntok[row])
      self._num_resident += 1
    self._epoch += 1
    self._num_swapped_in_blocks += len(pairs)
    return np.array(pairs, np.int32).reshape(-1, 2)

  def check_invariants(self) -> None:
    """Full consistency check, O(pool + tokens), for tests and debug runs.

    Raises:
      AssertionError: naming the first broken invariant (raised even under ``python -O``).
    """
    owners = np.zeros(self.num_blocks, np.int64)
    host_owned: list[int] = []
    tokens = 0
    for seq_id, seq in self._seqs.items():
      row = seq.row
      what = f"sequence {seq_id!r}"
      _expect(self._row_of[seq_id] == row, f"{what}: row index disagrees")
      n, nb = int(self._ntok[row]), int(self._nblk[row])
      _expect(nb == self._cdiv(n), f"{what}: {n} tokens in {nb} blocks")
      npend = int(self._npend[row])
      _expect(
        (npend > 0) == (seq_id in self._pending) and 0 <= npend <= min(n, self.max_pending_tokens),
        f"{what}: {npend} pending tokens, in the pending set: {seq_id in self._pending}",
      )
      # A block is hashed once every token of it is known (pending ones are resolved).
      full = (n - npend) // self.block_size if self.enable_prefix_caching else 0
      _expect(len(seq.hashes) == full, f"{what}: {len(seq.hashes)} hashes for {full} full blocks")
      if seq.host_blocks is not None:
        _expect(self._swapped[row], f"{what}: has host blocks but is not marked swapped")
        _expect(len(seq.host_blocks) == nb, f"{what}: {len(seq.host_blocks)} host blocks != {nb}")
        _expect((self._table[row] == INVALID_BLOCK).all(), f"{what}: swapped but has a table")
        _expect(len(set(seq.host_blocks)) == nb, f"{what}: a host block twice in {seq.host_blocks}")
        host_owned += seq.host_blocks
        continue
      _expect(not self._swapped[row], f"{what}: marked swapped without host blocks")
      blocks = self._table[row, :nb]
      _expect((blocks >= 0).all(), f"{what}: invalid block in {blocks.tolist()}")
      _expect(len(set(blocks.tolist())) == nb, f"{what}: a block twice in {blocks.tolist()}")
      _expect((self._table[row, nb:] == INVALID_BLOCK).all(), f"{what}: entries past its blocks")
      owners[blocks] += 1
      tokens += n
    # Reference counts, fill, free / cached / used, and the prefix cache's own consistency.
    self._pool.check_invariants(owners)
    _expect(tokens == self._resident_tokens, f"token total {self._resident_tokens} != {tokens}")
    host_refs = np.bincount(np.array(host_owned, np.int64), minlength=self.num_host_blocks)
    bad = np.flatnonzero(host_refs != self._host_ref)
    _expect(not bad.size, f"host blocks {bad.tolist()}: reference counts disagree with tables")
    host_set, host_free = set(host_owned), set(self._host_free)
    _expect(len(host_free) == len(self._host_free), "a host block is free twice")
    _expect(
      not (host_set & host_free), f"host blocks owned and free: {sorted(host_set & host_free)}"
    )
    host_leaked = self.num_host_blocks - len(host_set) - len(self._host_free)
    _expect(host_leaked == 0, f"{host_leaked} host blocks are neither owned nor free")

  # ------------------------------------------------------------------ internals

  def _cdiv(self, n: int) -> int:
    return -(-n // self.block_size)

  def _as_tokens(
    self, tokens, name: str, seq_ids: Sequence[Hashable] = (), *, allow_pending: bool = False
  ) -> np.ndarray:
    """``tokens`` as ``int64[k]``; ``seq_ids`` (one, or one per token) name the owner in errors."""
    arr = np.asarray(tokens)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
      raise ValueError(
        f"{name} must be a 1-D sequence of integer token ids, got {arr.dtype} {arr.shape}"
      )
    if arr.size and arr.dtype.kind == "u" and int(arr.max()) > np.iinfo(np.int64).max:
      raise ValueError(f"{name} holds a token id {int(arr.max())} past int64")
    arr = arr.astype(np.int64, copy=False)
    low = PENDING_TOKEN if allow_pending else 0
    if arr.size and int(arr.min()) < low:
      i = int(np.argmin(arr))
      if len(seq_ids) in (1, len(arr)):
        where = f"sequence {seq_ids[i if len(seq_ids) > 1 else 0]!r}: "
      else:
        where = ""
      raise ValueError(f"{where}{name} holds a negative token id {int(arr[i])} at index {i}")
    return arr

  def _check_max_len(self, seq_id: Hashable, length: int) -> None:
    if self.max_seq_len is not None and length > self.max_seq_len:
      raise ValueError(
        f"sequence {seq_id!r} would hold {length} tokens > max_seq_len={self.max_seq_len}"
      )

  def _get(self, seq_id: Hashable, action: str | None = None) -> _Seq:
    seq = self._seqs.get(seq_id)
    if seq is None:
      what = f"cannot {action} sequence {seq_id!r}: " if action else f"sequence {seq_id!r} "
      if seq_id in self._forgotten:
        raise SequenceError(f"{what}it was already freed")
      raise SequenceError(f"{what}it is unknown (never added)")
    return seq

  def _resident(self, seq_id: Hashable, action: str) -> _Seq:
    seq = self._get(seq_id, action)
    if seq.host_blocks is not None:
      raise SequenceError(f"cannot {action} sequence {seq_id!r}: it is swapped out to host")
    return seq

  def _resident_group(self, seq_ids: Sequence[Hashable], action: str) -> list[_Seq]:
    return [self._resident(s, action) for s in self._distinct(seq_ids, action)]

  def _swapped_group(self, seq_ids: Sequence[Hashable], action: str) -> list[_Seq]:
    seqs = [self._get(s, action) for s in self._distinct(seq_ids, action)]
    for seq in seqs:
      if seq.host_blocks is None:
        raise SequenceError(f"cannot {action} sequence {seq.seq_id!r}: it is not swapped out")
    return seqs

  @staticmethod
  def _distinct(seq_ids: Sequence[Hashable], action: str) -> list[Hashable]:
    ids = list(seq_ids)
    dup = [s for s, c in collections.Counter(ids).items() if c > 1]
    if dup:
      raise SequenceError(f"cannot {action} sequences: ids repeated in the group: {dup!r}")
    return ids

  def _group_blocks(self, rows: Sequence[int]) -> list[int]:
    """The distinct device blocks of ``rows``, in order of first appearance."""
    return list(dict.fromkeys(b for r in rows for b in self._table[r, : self._nblk[r]].tolist()))

  def _plan_swap_in(self, seqs: list[_Seq]) -> _SwapInPlan:
    """Where each distinct host block of swapped-out ``seqs`` goes on the device."""
    get = self._cache.get
    plan = _SwapInPlan({}, {}, {})
    fresh_of_key: dict[bytes, int] = {}
    for seq in seqs:
      n = int(self._ntok[seq.row])
      for j, hb in enumerate(seq.host_blocks):
        if hb in plan.fresh or hb in plan.reused or hb in plan.same_as:
          continue
        key = seq.hashes[j] if j < len(seq.hashes) else None
        if key is not None:
          b = get(key)
          if b is not None:
            plan.reused[hb] = b
            continue
          if key in fresh_of_key:
            plan.same_as[hb] = fresh_of_key[key]
            continue
          fresh_of_key[key] = hb
        plan.fresh[hb] = (key, min(self.block_size, n - j * self.block_size))
    return plan

  def _blocks_to_take(self, plan: _SwapInPlan) -> int:
    """Blocks a swap-in takes from the available ones: fresh blocks, and reused cache
    entries that are parked (acquiring them takes them out of the evictable pool)."""
    return len(plan.fresh) + sum(map(self._cache.is_cached, set(plan.reused.values())))

  def _release_host(self, blocks: list[int]) -> None:
    """Drops one reference on each host block; those no sequence names any more are freed."""
    ref = self._host_ref
    ref[blocks] -= 1
    self._host_free.extend(b for b in blocks if ref[b] == 0)

  def _rows(self, seq_ids: Sequence[Hashable], action: str) -> np.ndarray:
    """Rows of distinct resident ``seq_ids`` as ``intp[k]`` (read-only); raises naming the
    bad id."""
    epoch, ids, rows = self._memo_rows
    # A list compares element by element, identical ids by identity: no hashing.
    if epoch == self._epoch and type(seq_ids) is list and seq_ids == ids:
      return rows
    k = len(seq_ids)
    try:
      rows = (self._row_of[seq_ids[0]],) if k == 1 else operator.itemgetter(*seq_ids)(self._row_of)
    except (KeyError, TypeError):
      for s in seq_ids:
        self._get(s, action)
      raise
    if len(set(rows)) != k:
      dup = [s for s, c in collections.Counter(seq_ids).items() if c > 1]
      raise SequenceError(f"cannot {action} sequences: ids repeated in the batch: {dup!r}")
    rows = np.array(rows, np.intp)
    if self._swapped[rows].any():
      for s in seq_ids:
        self._resident(s, action)
    rows.flags.writeable = False
    if type(seq_ids) is list:
      self._memo_rows = (self._epoch, list(seq_ids), rows)
    return rows

  def _shared_partial(self, rows: np.ndarray, n: np.ndarray, nb: np.ndarray) -> np.ndarray:
    """bool[k]: the row's last block is partly filled and shared, so a write must copy it."""
    partial = (n % self.block_size) != 0
    last = self._table[rows, np.maximum(nb - 1, 0)]
    return partial & (self._pool.ref[np.maximum(last, 0)] > 1)

  def _num_copies(self, rows: np.ndarray, nb: np.ndarray, shared: np.ndarray) -> int:
    """Copy-on-write copies needed when each ``shared`` row writes its last block once: one per
    row, except that a block whose holders are all in the batch is left to the last of them."""
    if not shared.any():
      return 0
    blocks, counts = np.unique(self._table[rows[shared], nb[shared] - 1], return_counts=True)
    return int(shared.sum()) - int(np.count_nonzero(self._pool.ref[blocks] == counts))

  def _require(self, needed: int, what: str) -> None:
    available = self._pool.num_available
    if needed > available:
      raise OutOfBlocksError(
        f"{what}: needs {needed} device blocks, {available} available ({self._pool.num_free} "
        f"unused + {self._cache.num_cached} cached, evictable; num_free_blocks counts both) "
        f"of {self.num_blocks}",
        pool="device",
        needed=needed,
        available=available,
      )

  def _new_seq(self, seq_id: Hashable) -> _Seq:
    if not self._free_rows:
      self._grow_rows()
    row = self._free_rows.pop()
    seq = _Seq(seq_id, row)
    self._seqs[seq_id] = seq
    self._row_of[seq_id] = row
    self._epoch += 1
    self._forgotten.pop(seq_id, None)
    self._num_resident += 1
    return seq

  def _grow_rows(self) -> None:
    old = self._table.shape[0]
    new = 2 * old

    def grow(a, fill):
      b = np.full((new,) + a.shape[1:], fill, a.dtype)
      b[:old] = a
      return b

    self._table = grow(self._table, INVALID_BLOCK)
    self._ntok = grow(self._ntok, 0)
    self._nblk = grow(self._nblk, 0)
    self._swapped = grow(self._swapped, False)
    self._partial = grow(self._partial, 0)
    self._npend = grow(self._npend, 0)
    self._free_rows.extend(range(new - 1, old - 1, -1))

  def _ring_base(self, block):
    """First ``_partial`` column of logical block ``block`` (an int or an array)."""
    return (block % self._ring_blocks) * self.block_size

  def _block_tokens(self, rows: np.ndarray, block: np.ndarray) -> np.ndarray:
    """``[len(rows), block_size]``: the ring's tokens of each row's logical block."""
    if self._ring_blocks == 1:
      return self._partial[rows]
    cols = self._ring_base(block)[:, None] + np.arange(self.block_size)
    return self._partial[rows[:, None], cols]

  def _ensure_width(self, width: int) -> None:
    old = self._table.shape[1]
    if width <= old:
      return
    table = np.full((self._table.shape[0], max(width, 2 * old)), INVALID_BLOCK, np.int32)
    table[:, :old] = self._table
    self._table = table

  def _copy_on_write(self, row: int, j: int, src: int, fill: int) -> int:
    """Moves this row's block ``j`` (shared ``src``, ``fill`` tokens) to a fresh copy."""
    dst = self._pool.copy_on_write(src, fill)
    self._table[row, j] = dst
    self._num_cow_copies += 1
    return dst

  def _release_blocks(self, row: int) -> None:
    """Drops this row's reference on each of its blocks, last first, and clears the row."""
    nb = int(self._nblk[row])
    self._pool.release(reversed(self._table[row, :nb].tolist()))
    self._table[row, :nb] = INVALID_BLOCK

  def _hash_full_blocks(self, seqs: list[_Seq], tokens: np.ndarray, blocks: list[int]) -> None:
    """Enters blocks that appends filled in the prefix cache: the one path for every append.

    Args:
      seqs: the sequences, each with ``m`` newly full blocks (the same ``m`` for all).
      tokens: ``int64[len(seqs), m * block_size]``, those blocks' tokens, each row starting on
        a block boundary; keyed chained from each sequence's last key.
      blocks: the ``len(seqs) * m`` blocks holding them, sequence by sequence.

    ``append_tokens`` passes one sequence and any number of blocks; ``append_batch`` and
    ``resolve_tokens`` every sequence whose token filled its last block, in one call.
    """
    if not seqs:
      return
    keys = self._cache.hash_blocks([s.hashes[-1] if s.hashes else None for s in seqs], tokens)
    m = len(keys) // len(seqs)
    if m == 1:
      for seq, key in zip(seqs, keys, strict=True):
        seq.hashes.append(key)
    else:
      for i, seq in enumerate(seqs):
        seq.hashes += keys[i * m : (i + 1) * m]
    self._cache.register_all(keys, blocks)

  def _prompt_keys(self, prompt: np.ndarray) -> list[bytes]:
    """Keys of the prompt's full blocks (none with prefix caching off)."""
    full = len(prompt) // self.block_size * self.block_size
    if not self.enable_prefix_caching or not full:
      return []
    return self._cache.hash_blocks([None], prompt[:full].reshape(1, full))

  def _prefix_hits(self, keys: list[bytes], length: int) -> tuple[list[int], int]:
    """Blocks of the longest cached prefix (capped so one token is left to compute) and how
    many of them are cached (reference count 0), i.e. taken out of the evictable pool."""
    # keys covers length // bs full blocks; the cap (length - 1) // bs is one block fewer
    # exactly when the prompt ends on a block boundary.
    if not keys:
      return [], 0
    return self._cache.match_prefix(keys[: (length - 1) // self.block_size])
