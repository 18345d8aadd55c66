"""Tuning knobs of the TPU kernels, their per-shape defaults, and static shape checks.

TPU constraints (why each check exists):

- ``head_dim`` must be a multiple of 128 (``kernels._validate.head_dim_supported``): it is
  the lane axis of every VMEM tile (the (8, 128) f32 / (16, 128) bf16 tile). The kernels
  compile for other sizes (Mosaic pads the VMEM tiles to 128 lanes; ``[block_size,
  head_dim]`` DMAs of the real width), but at real pool sizes XLA's default TPU layout of
  such a pool is not row-major (bf16 ``[8, 4096, 16, 64]``: ``{1,3,2,0}``, num_blocks along
  the lanes) and the kernels take their HBM operands row-major, so XLA would copy the
  whole pool into that layout on every call (``kernels.tpu.aot.pool_relayout`` shows it).
  Padding K/V in the wrapper would copy the pool as well. Packing two heads of 64 in the
  128 lanes does not help either: Mosaic refuses a DMA into a 64-lane half of a VMEM row
  (``kernels.tpu.aot.packed_lanes_dma``), and it tiles a row-major 64-wide pool (8, 128)
  in HBM, the bytes of a padded one; it would take a cache layout whose rows are 128 wide.
  Other head_dims reach these kernels through a lane-padded pool (``kernels._layout``,
  ``lane_padded=True`` on the ``kernels`` entry points: rows of head_dim rounded up to
  128, q zero-padded by the entry point, the real head_dim's scale), or for 32 and 64 a
  lane-dense one; the kernels then see a head_dim of 128 or 256.
- ``block_size`` must be a multiple of the sublane tile of the K/V dtype (8 rows of 32-bit,
  16 rows of 16-bit): each block is DMA'd into its own row range of one VMEM buffer, and
  a DMA destination must start on a tile boundary.
- 8-bit K/V (int8, float8 e4m3): ``block_size`` must be a multiple of 128
  (``QUANT_BLOCK_MULTIPLE``). Each block's float32 scales ``[heads, block_size]`` are DMA'd
  with it, and Mosaic requires the contiguous inner slice of a DMA to be a multiple of 512
  bytes: ``block_size * 4`` bytes per head. Found by compiling for v5e and v6e
  (``kernels.tpu.aot``): block 32 and 64 fail with "The contiguous inner slice in the DMA
  transfer must be divisible by 512 bytes"; 128 and 256 compile.
- ``queries_per_tile`` (ragged kernel) must be a power of two and a multiple of the
  sublane tile of ``q.dtype``: a q tile ``[group, queries_per_tile, head_dim]`` is
  flattened to ``[group * queries_per_tile, head_dim]`` (a tile-aligned collapse on
  Mosaic), and a row's token index is ``row & (queries_per_tile - 1)``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kernels._quant import SCALE_DTYPE, is_quantized
from kernels._validate import validate_head_dim, validate_layout

LANES = 128
# SMEM is 1 MiB on TPU v4 through v6e and holds every scalar-prefetch operand at once
# (vllm-project/vllm#16871; a 1.125 MiB table fails with "Allocation ... would exceed
# memory (size=1048576)" in vllm-project/tpu-inference#3316). Half of it is left to
# Mosaic's own scalars and to the per-tile metadata.
DEFAULT_SMEM_BUDGET_BYTES = 512 * 1024
# Tokens of K (and of V) one compute step of the decode kernel covers. At the benchmark
# shape (8 KV heads per step, bf16, head_dim 128) a chunk is 2 x 8 x 2048 x 128 x 2 B =
# 8 MiB of K and V, 10 us of HBM time on v5e (5 us on v6e): a grid step's fixed cost and
# the chunk's one semaphore wait are small against it, and two slots (16 MiB) stay far
# inside the 128 MiB of VMEM of v5e and v6e.
DECODE_CHUNK_TOKENS = 2048
# The ragged kernel's logits tile is [group * queries_per_tile, chunk]: 128 x 256 f32 is
# 128 KiB (1 MiB at a prefill tile's 1,024 rows), one head at a time.
RAGGED_CHUNK_TOKENS = 256
# VMEM for the decode kernel's double-buffered K/V chunks when choosing kv_heads_per_step:
# all 8 KV heads of the benchmark shape at 2048 bf16 tokens (2 x 2 x 8 x 2048 x 128 x 2 B).
DECODE_KV_VMEM_BYTES = 16 * 1024 * 1024
# The same for the ragged kernel: all 8 KV heads at 256 bf16 tokens (2 x 2 x 8 x 256 x 128
# x 2 B). A ragged step whose whole estimate (ragged_vmem_bytes) stays under it compiles
# under Mosaic's default scoped VMEM limit (16 MiB on v5e); a larger one (the prefill
# tiles) sets its own, as decode does.
RAGGED_KV_VMEM_BYTES = 2 * 1024 * 1024
# VMEM per TensorCore (JAX's own table, jax._src.tpu_info): v4 16 MiB, v5e 128 MiB, v5p
# 64 MiB, v6e 128 MiB, TPU7x 64 MiB. The default scoped limit Mosaic compiles under is
# lower (16 MiB on v5e, 32 MiB on v6e), so the kernels ask for their own.
VMEM_BYTES = {"v4": 16 << 20, "v5e": 128 << 20, "v5p": 64 << 20, "v6e": 128 << 20}
# The chip assumed when none is attached (compiling ahead of time from a CPU host): the
# smallest of v5e, v6e and v5p, so a default limit fits all three.
ASSUMED_VMEM_BYTES = VMEM_BYTES["v5p"]
# vmem_limit_bytes = slots x DECODE_VMEM_SLOT_FACTOR + DECODE_VMEM_HEADROOM (the q/o tiles,
# each head's logits, probabilities and masked V, Mosaic's own scratch), at most
# VMEM_LIMIT_FRACTION of the chip's VMEM: a margin for what the estimate misses.
DECODE_VMEM_SLOT_FACTOR = 2
DECODE_VMEM_HEADROOM = 16 << 20
VMEM_LIMIT_FRACTION = 0.75
RAGGED_ROWS = 128
# Ridge points (flop per byte of HBM) of the chips the kernels are compiled for: bf16 MXU
# peak over HBM bandwidth, v5e 197 TFLOP/s / 819 GB/s = 240, v6e 918 TFLOP/s / 1.64 TB/s
# = 560 (Google's Cloud TPU pages). A ragged tile of R matmul rows does 4 * R * head_dim
# flops per key token against 2 * head_dim * 2 bytes of bf16 K and V: R flop/byte. Prefill
# tiles (the decodes of a mixed batch run in their own launch) take at least the largest
# ridge's worth of rows, so that a long prefill is bound by the MXU, not by re-reading K/V
# once per tile (docs/tpu.md).
PEAK_BF16_FLOPS = {"v5e": 197e12, "v6e": 918e12}
RAGGED_PREFILL_ROWS = 560
# The ragged kernel's VMEM beside its K/V slots, per matmul row of a grid step, per KV head:
# the f32 accumulator (4 * head_dim bytes) and running max and sum ([rows, 1] f32, each
# padded to 128 lanes: 512 bytes), and the q and output tiles, double-buffered by the
# pipeline (4 * head_dim * itemsize). The limit is twice the estimate plus the decode
# kernel's headroom (logits and probabilities of a chunk, Mosaic's own scratch).
RAGGED_ROW_STATE_BYTES = 2 * 512
# 8-bit K/V: block_size a multiple of this, so that a block's scales (block_size float32
# per head) are one DMA of a multiple of 512 bytes (see the module docstring).
QUANT_BLOCK_MULTIPLE = 512 // SCALE_DTYPE.itemsize


def sublane_tile(dtype) -> int:
  """Rows of one VMEM tile for ``dtype``: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit."""
  return 8 * (4 // jnp.dtype(dtype).itemsize)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tuning of the TPU paged-attention kernels (frozen and hashable: a static jit argument).

  Attributes:
    blocks_per_chunk: KV blocks DMA'd together and handled in one compute step; None picks
      ``DECODE_CHUNK_TOKENS`` (decode) or ``RAGGED_CHUNK_TOKENS`` (ragged) worth of blocks,
      at most ``max_blocks``.
    queries_per_tile: ragged kernel only: query tokens per grid step (times the query
      heads of one KV head); a power of two, a multiple of the sublane tile of q's dtype.
      None picks about ``RAGGED_ROWS // group`` rows.
    smem_budget_bytes: bytes of scalar-prefetch operands (block table, lengths, cu_q_lens,
      tile metadata) one kernel call may use; larger batches are split into several calls.
    kv_heads_per_step: KV heads one grid step handles (a divisor of num_kv_heads); each
      block is one DMA for K and one for V covering all of them. Fewer, larger steps and
      DMAs amortize their fixed costs; None picks the most heads whose double-buffered K/V
      chunks fit ``DECODE_KV_VMEM_BYTES`` (decode) or ``RAGGED_KV_VMEM_BYTES`` (ragged).
    num_cores: decode kernel only: TensorCores the batch is split over (a "parallel" grid
      axis). 2 on megacore chips (v4, v5p); 1 on v5e and v6e (one TensorCore per chip).
      Any value is correct on any chip; a wrong one only costs speed.
    vmem_limit_bytes: the scoped VMEM limit the kernels compile under; None picks
      ``DECODE_VMEM_SLOT_FACTOR`` times the VMEM estimate (decode: its K/V slots; ragged:
      the slots and the per-row state of :func:`ragged_vmem_bytes`) plus
      ``DECODE_VMEM_HEADROOM``, at most ``VMEM_LIMIT_FRACTION`` of the chip's VMEM
      (:func:`vmem_capacity`); the ragged kernel keeps Mosaic's default limit when its
      estimate is under 2 MiB.
    split_decode: ragged calls only: run the sequences with one query row (the decodes of
      a mixed batch) through the decode kernel in a launch of their own and the others
      through the ragged kernel, whose default tiles are then sized for prefill
      (``RAGGED_PREFILL_ROWS``). False runs every sequence through the ragged kernel with
      ``RAGGED_ROWS``-row tiles.
  """

  blocks_per_chunk: int | None = None
  queries_per_tile: int | None = None
  kv_heads_per_step: int | None = None
  smem_budget_bytes: int = DEFAULT_SMEM_BUDGET_BYTES
  num_cores: int = 1
  vmem_limit_bytes: int | None = None
  split_decode: bool = True

  def __post_init__(self):
    if self.blocks_per_chunk is not None and (
      not isinstance(self.blocks_per_chunk, int) or self.blocks_per_chunk < 1
    ):
      raise ValueError(f"blocks_per_chunk must be a positive int, got {self.blocks_per_chunk!r}")
    if self.kv_heads_per_step is not None and (
      not isinstance(self.kv_heads_per_step, int) or self.kv_heads_per_step < 1
    ):
      raise ValueError(f"kv_heads_per_step must be a positive int, got {self.kv_heads_per_step!r}")
    if self.queries_per_tile is not None:
      t = self.queries_per_tile
      if not isinstance(t, int) or t < 1 or t & (t - 1):
        raise ValueError(f"queries_per_tile must be a power of two, got {t!r}")
    if self.vmem_limit_bytes is not None and (
      not isinstance(self.vmem_limit_bytes, int) or self.vmem_limit_bytes < 1 << 20
    ):
      raise ValueError(
        f"vmem_limit_bytes must be an int of at least 1 MiB, got {self.vmem_limit_bytes!r}"
      )
    if not isinstance(self.split_decode, bool):
      raise ValueError(f"split_decode must be a bool, got {self.split_decode!r}")
    if not isinstance(self.num_cores, int) or self.num_cores < 1:
      raise ValueError(f"num_cores must be a positive int, got {self.num_cores!r}")
    if not isinstance(self.smem_budget_bytes, int) or self.smem_budget_bytes < 16:
      raise ValueError(f"smem_budget_bytes must be an int >= 16, got {self.smem_budget_bytes!r}")


def check_shapes(q, k_blocks, block_sizes: BlockSizes | None = None, *, lane_dense=False) -> None:
  """TPU-specific static checks (the generic ones are in ``kernels.validate_inputs``);
  ``lane_dense``: the pool holds head_dim 32 or 64 in rows of 128 (``kernels._layout``)."""
  _, _, block_size, width = k_blocks.shape
  validate_layout(q, k_blocks, lane_dense)
  if not lane_dense:
    validate_head_dim(q, k_blocks, "tpu")
  tile = sublane_tile(k_blocks.dtype)
  if block_size % tile:
    pack = width // q.shape[-1]
    rows = (
      "block_size" if pack == 1 else f"a lane-dense pool's rows per block (block_size / {pack})"
    )
    raise ValueError(
      f"TPU backend: {rows} must be a multiple of {tile} for {k_blocks.dtype} K/V "
      f"(one VMEM sublane tile), got k_blocks {tuple(k_blocks.shape)}"
      + ("" if pack == 1 else f": block_size a multiple of {tile * pack}")
    )
  if is_quantized(k_blocks.dtype) and block_size % QUANT_BLOCK_MULTIPLE:
    raise ValueError(
      f"TPU backend: block_size must be a multiple of {QUANT_BLOCK_MULTIPLE} for 8-bit "
      f"({k_blocks.dtype}) K/V: each block's float32 scales are one DMA of block_size * 4 "
      f"bytes, which Mosaic needs to be a multiple of 512; got k_blocks "
      f"{tuple(k_blocks.shape)}"
    )
  if block_sizes is not None and block_sizes.queries_per_tile is not None:
    q_tile = sublane_tile(q.dtype)
    if block_sizes.queries_per_tile % q_tile:
      raise ValueError(
        f"block_sizes.queries_per_tile must be a multiple of {q_tile} for {q.dtype} q, got "
        f"{block_sizes.queries_per_tile}"
      )


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def resolve(
  block_sizes: BlockSizes | None,
  *,
  q_dtype,
  kv_dtype,
  num_kv_heads: int,
  block_size: int,
  head_dim: int,
  max_blocks: int,
  group: int,
  ragged: bool,
  prefill_only: bool = False,
) -> BlockSizes:
  """Fills the None fields of ``block_sizes`` with defaults for this shape.

  ``prefill_only`` (ragged): the launch holds no decode (``split_decode``), so the default
  query tile holds ``RAGGED_PREFILL_ROWS`` matmul rows instead of ``RAGGED_ROWS``.
  """
  bs = block_sizes if block_sizes is not None else BlockSizes()
  bpc = bs.blocks_per_chunk
  if bpc is None:
    tokens = RAGGED_CHUNK_TOKENS if ragged else DECODE_CHUNK_TOKENS
    bpc = max(1, min(max_blocks, tokens // block_size))
  bpc = max(1, min(bpc, max_blocks))
  tq = bs.queries_per_tile
  if tq is None:
    rows = RAGGED_PREFILL_ROWS if prefill_only else RAGGED_ROWS
    tq = max(sublane_tile(q_dtype), _next_pow2(-(-rows // group)))
  heads = bs.kv_heads_per_step
  if heads is None:
    per_head = kv_slot_bytes(1, bpc * block_size, head_dim, kv_dtype)
    fits = [
      d
      for d in range(1, num_kv_heads + 1)
      if num_kv_heads % d == 0
      and d * per_head <= (RAGGED_KV_VMEM_BYTES if ragged else DECODE_KV_VMEM_BYTES)
    ]
    heads = max(fits, default=1)
  elif num_kv_heads % heads:
    raise ValueError(
      f"block_sizes.kv_heads_per_step={heads} must divide num_kv_heads={num_kv_heads}"
    )
  limit = bs.vmem_limit_bytes
  if limit is None:
    need = kv_slot_bytes(heads, bpc * block_size, head_dim, kv_dtype)
    if ragged:
      need = ragged_vmem_bytes(heads, group * tq, bpc * block_size, head_dim, kv_dtype, q_dtype)
    if not ragged or need > RAGGED_KV_VMEM_BYTES:
      limit = min(
        DECODE_VMEM_SLOT_FACTOR * need + DECODE_VMEM_HEADROOM,
        int(VMEM_LIMIT_FRACTION * vmem_capacity()),
      )
  return dataclasses.replace(
    bs, blocks_per_chunk=bpc, queries_per_tile=tq, kv_heads_per_step=heads, vmem_limit_bytes=limit
  )


def kv_slot_bytes(heads: int, chunk_tokens: int, head_dim: int, kv_dtype) -> int:
  """VMEM bytes of the two K/V slots (and, 8-bit, their float32 scales)."""
  rows = 2 * 2 * heads * chunk_tokens
  scales = rows * SCALE_DTYPE.itemsize if is_quantized(kv_dtype) else 0
  return rows * head_dim * jnp.dtype(kv_dtype).itemsize + scales


def ragged_vmem_bytes(heads: int, rows: int, chunk_tokens: int, head_dim: int, kv_dtype, q_dtype):
  """VMEM estimate of a ragged grid step of ``heads`` KV heads and ``rows`` matmul rows each:
  the K/V slots and each row's state (``RAGGED_ROW_STATE_BYTES`` and an f32 accumulator)
  and its q and output tiles (double-buffered)."""
  per_row = RAGGED_ROW_STATE_BYTES + 4 * head_dim + 4 * head_dim * jnp.dtype(q_dtype).itemsize
  return kv_slot_bytes(heads, chunk_tokens, head_dim, kv_dtype) + heads * rows * per_row


def vmem_capacity() -> int:
  """VMEM bytes of one TensorCore of the attached TPU; ``ASSUMED_VMEM_BYTES`` when JAX's
  default backend is not a TPU (tests, interpret mode, compiling ahead of time)."""
  import jax

  if jax.default_backend() != "tpu":
    return ASSUMED_VMEM_BYTES
  from jax.experimental.pallas import tpu as pltpu

  return pltpu.get_tpu_info().vmem_capacity_bytes


def sequences_per_call(
  *, smem_budget_bytes: int, words_per_sequence: int, fixed_words: int, batch: int, what: str
) -> int:
  """How many sequences' scalar-prefetch data fit the SMEM budget in one kernel call."""
  free = smem_budget_bytes // 4 - fixed_words
  n = free // words_per_sequence if free > 0 else 0
  if n < 1:
    raise ValueError(
      f"{what}: one sequence needs {4 * (words_per_sequence + fixed_words)} bytes of SMEM "
      f"(block_table row and metadata) but block_sizes.smem_budget_bytes is "
      f"{smem_budget_bytes}; use a larger block_size (fewer blocks per sequence) or budget"
    )
  return min(n, batch)


# HBM read rates the roofline figures of docs/tpu.md use (vendor figures, bytes/s).
HBM_BYTES_PER_S = {"v5e": 819e9, "v6e": 1640e9}


@dataclasses.dataclass(frozen=True)
class DmaPlan:
  """What the kernels' DMAs look like for one configuration (tests count the same numbers
  in the kernel's jaxpr).

  Attributes:
    heads_per_dma: KV heads one DMA copies (all the heads of a grid step).
    dmas_per_chunk: DMAs that fill one chunk (K and V of each block).
    dmas_in_flight: at most this many at once (two chunk slots).
    bytes_per_dma: bytes one DMA moves.
    chunk_tokens: tokens of one chunk.
    waits_per_chunk: semaphore waits for a chunk whose blocks were all fetched (one, for
      K and V of every head and block together).
    max_waits_per_chunk: at most this many for a partly fetched chunk (one wait per binary
      digit set in the fetched count, which is below ``blocks_per_chunk``).
  """

  heads_per_dma: int
  dmas_per_chunk: int
  dmas_in_flight: int
  bytes_per_dma: int
  chunk_tokens: int
  waits_per_chunk: int
  max_waits_per_chunk: int

  def ns_per_dma(self, chip: str) -> float:
    """Nanoseconds one DMA may take, issue to completion, for the kernel to read at the
    chip's HBM rate (``HBM_BYTES_PER_S``) with one DMA in flight at a time; with
    ``dmas_in_flight`` of them overlapping, each may take that many times longer."""
    return self.bytes_per_dma / HBM_BYTES_PER_S[chip] * 1e9


def dma_plan(tuned: BlockSizes, *, block_size: int, head_dim: int, kv_dtype, ragged: bool):
  """The :class:`DmaPlan` of a resolved :class:`BlockSizes` (see :func:`resolve`), for
  either kernel (``ragged`` is kept for callers; both DMA a block of all a step's KV heads
  at once). 8-bit K/V add two scale DMAs per block and one more wait per chunk, not
  counted here."""
  del ragged
  heads = tuned.kv_heads_per_step
  bpc = tuned.blocks_per_chunk
  return DmaPlan(
    heads_per_dma=heads,
    dmas_per_chunk=2 * bpc,
    dmas_in_flight=2 * 2 * bpc,
    bytes_per_dma=heads * block_size * head_dim * jnp.dtype(kv_dtype).itemsize,
    chunk_tokens=bpc * block_size,
    waits_per_chunk=1,
    max_waits_per_chunk=max(bin(count).count("1") for count in range(bpc)),
  )
