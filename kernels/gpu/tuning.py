"""Tuning knobs of the GPU paged-attention kernels: one frozen, hashable dataclass.

``BlockSizes`` is what ``kernels.paged_attention(..., block_sizes=...)`` takes on the
GPU backend. It is hashable so it can be a static jit argument; every field is
checked in ``__post_init__``, so a bad setting fails before anything compiles.
``default_block_sizes`` picks the settings per shape and per card: the entry of the
card's tuning table (``kernels/gpu/tuning_tables/``, keyed by
``jax.devices()[0].device_kind``; ``kernels.gpu.tuning_table``) where one covers the
shape's class, else ``rule_block_sizes``, a rule by shared-memory bytes measured on an
H100 (docs/gpu_notes.md, "Defaults per card").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels.gpu import _widen, tuning_table

# Shared memory one pipeline stage of K plus V may take. Triton keeps `num_stages`
# such stages in flight; 3 x 48 KiB leaves room for a second program per SM on an
# H100 (227 KiB per SM) for the usual bf16 / head_dim 128 case at 64 tokens a step.
_STAGE_BYTES = 48 * 1024
# Large decode batches: one program per SM, 3 stages of 64 KiB (192 of the 227 KiB).
_LARGE_STAGE_BYTES = 64 * 1024
# The planned decode: steps of up to 64 KiB of K plus V; 2 stages where a step is over
# 32 KiB (one program per SM at bf16 head_dim 128: 128 of the 227 KiB), else 3.
_PLANNED_STAGE_BYTES = 64 * 1024


PREFILL_KERNELS = ("auto", "triton", "mosaic")
DECODE_KERNELS = ("auto", "triton", "mosaic")
# The cascade's shared part (kernels.gpu.cascade.CascadeBlockSizes.shared_kernel).
CASCADE_SHARED_KERNELS = ("auto", "triton", "mosaic")


def padded_head_dim(head_dim: int) -> int:
  """Width of the kernels' head-dim tiles: ``head_dim`` rounded up to a power of two.

  Triton block shapes must be powers of two, so a head_dim of 80, 96 or 112 is computed
  in 128-wide tiles and 192 in 256-wide ones. Only the tiles are wider: q, K/V and the
  output keep their real head_dim in memory, and the kernels mask the columns past it on
  every load (read as zeros, which add nothing to ``q . k`` and give zero output columns)
  and every store, so no extra byte moves (``kernels.gpu.decode.head_cols``).
  """
  return 1 << (int(head_dim) - 1).bit_length()


def _is_pow2(x: int) -> bool:
  return isinstance(x, int) and x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and launch settings of the Pallas GPU kernels.

  Attributes:
    decode_kv_tile: K/V tokens one decode program reads per inner step (power of
      two, 16..512). Independent of the cache's block_size: a step gathers
      ``decode_kv_tile // block_size`` blocks, or a slice of one block.
    decode_num_splits: split-K factor (flash-decoding): each (sequence, KV head) is
      cut into this many chunks run by separate programs and merged afterwards.
      None picks one per shape so that the grid fills the GPU.
    decode_num_warps, decode_num_stages: Triton warps per program and software
      pipeline depth of the decode kernel.
    prefill_q_tile: query rows (of one query head, one sequence) per prefill program.
    prefill_kv_tile: K/V tokens per prefill inner step.
    prefill_heads_per_program: query heads of one GQA group that one prefill program
      takes together (rows = q_tile // heads tokens x heads); must divide the group.
      None: the largest power of two dividing the group with >= 16 tokens per tile.
    prefill_num_warps, prefill_num_stages: as for decode, for the (Triton) prefill kernel.
    prefill_kernel: which prefill kernel runs: "auto" (``kernels.gpu.kernel_backend``
      decides: the Mosaic GPU kernel on Hopper for prefill-heavy calls it supports, the
      Triton one otherwise), "triton" or "mosaic" (an error where Mosaic does not apply).
    mosaic_kv_tile: K/V tokens per step of the Mosaic GPU prefill (64 or 128).
    mosaic_num_slots: shared-memory ring depth (K/V steps in flight) of the Mosaic GPU
      prefill, 2..4; K, V and the query/output tiles must fit the 227 KiB of an SM
      (bf16 head_dim 128: 128-key steps take 2 slots, 64-key steps up to 4), which the
      kernel checks per call, before compiling.
    decode_kernel: which kernel runs a planned decode (a call with a ``decode_plan``):
      "auto" (``kernels.gpu.kernel_backend`` decides; the Triton planned decode for now,
      until the H200 says the Mosaic one is at least as fast), "triton" or "mosaic" (the
      Mosaic GPU decode, ``decode_mosaic.py``: Hopper, bf16/f16, head_dim 64 or 128; an
      error where it does not apply, and for a decode call without a plan).
    mosaic_decode_kv_tile: K/V tokens per step of the Mosaic GPU decode (64 or 128).
    mosaic_decode_num_slots: its shared-memory ring depth, 2..4, or None for the deepest
      that fits an SM (``decode_mosaic.default_num_slots``; bf16 head_dim 128: 4 slots of
      64 keys, 2 of 128).
    mosaic_decode_programs_per_sm: None (one CUDA block per (KV head, chunk)) or 1..4: a
      persistent grid of that many blocks per SM, each walking several chunks, its
      producer copying the next chunk's K/V while the consumer finishes the last.
    mosaic_decode_merge: how the Mosaic GPU decode merges a sequence's chunks: "triton"
      (the planned decode's merge kernel) or "xla" (segment sums; no Pallas Triton).
    quant_widen: how the Triton kernels (decode, planned decode, prefill, cascade) widen
      8-bit K/V for their dots when q is 16-bit (``kernels/gpu/_widen.py``): "auto"
      (default) takes the mode measured fastest in decode on the H200 per dtype
      (``_widen.AUTO_WIDEN``: "int8_qk" for int8, "f16" for e4m3; the prefill and the
      cascade's shared kernel, never timed over 8-bit K/V, keep int8 on "q_dtype");
      "f16" runs both dots in float16, int8 widened by integer ops (the f16 "magic
      number") and e4m3 by ``astype(float16)``; "f16_bits" is
      the same with e4m3 widened by integer ops too; "int8_qk" runs int8's q . K as two
      int8 x int8 dots on the raw K tile (q split in two int8 parts) and widens V to q's
      dtype, "int8_qkv" p @ V that way too; "q_dtype" is the old path, ``astype`` to q's
      dtype (bf16 dots for bf16 q). Float32 q and non-8-bit K/V take no notice of it.
    mosaic_tiles_per_block: 128-row query tiles one CUDA block of the Mosaic GPU prefill
      works through in turn, 1..8 (``prefill_mosaic.paged_prefill_mosaic``'s
      ``tiles_per_block``); 1, one tile per block, is the measured default, more amortises
      the per-block costs over ragged batches of short prompts.
  """

  decode_kv_tile: int = 64
  decode_num_splits: int | None = None
  decode_num_warps: int = 4
  decode_num_stages: int = 3
  prefill_q_tile: int = 128
  prefill_kv_tile: int = 64
  prefill_heads_per_program: int | None = None
  prefill_num_warps: int = 8
  prefill_num_stages: int = 3
  prefill_kernel: str = "auto"
  mosaic_kv_tile: int = 128
  mosaic_num_slots: int = 2
  decode_kernel: str = "auto"
  mosaic_decode_kv_tile: int = 64
  mosaic_decode_num_slots: int | None = None
  mosaic_decode_programs_per_sm: int | None = None
  mosaic_decode_merge: str = "triton"
  quant_widen: str = _widen.DEFAULT_QUANT_WIDEN
  mosaic_tiles_per_block: int = 1

  def __post_init__(self):
    pow2_fields = {
      "decode_kv_tile": (16, 512),
      "prefill_q_tile": (16, 256),
      "prefill_kv_tile": (16, 256),
      "decode_num_warps": (1, 16),
      "prefill_num_warps": (1, 16),
    }
    for name, (lo, hi) in pow2_fields.items():
      value = getattr(self, name)
      if not (_is_pow2(value) and lo <= value <= hi):
        raise ValueError(f"BlockSizes.{name} must be a power of two in [{lo}, {hi}], got {value!r}")
    for name in ("decode_num_stages", "prefill_num_stages"):
      value = getattr(self, name)
      if not (isinstance(value, int) and 1 <= value <= 8):
        raise ValueError(f"BlockSizes.{name} must be an int in [1, 8], got {value!r}")
    hp = self.prefill_heads_per_program
    if hp is not None and not (_is_pow2(hp) and hp <= self.prefill_q_tile):
      raise ValueError(
        "BlockSizes.prefill_heads_per_program must be None or a power of two <= "
        f"prefill_q_tile ({self.prefill_q_tile}), got {hp!r}"
      )
    if self.prefill_kernel not in PREFILL_KERNELS:
      raise ValueError(
        f"BlockSizes.prefill_kernel must be one of {PREFILL_KERNELS}, got {self.prefill_kernel!r}"
      )
    if not (isinstance(self.mosaic_kv_tile, int) and self.mosaic_kv_tile in (64, 128)):
      raise ValueError(f"BlockSizes.mosaic_kv_tile must be 64 or 128, got {self.mosaic_kv_tile!r}")
    if not (isinstance(self.mosaic_num_slots, int) and 2 <= self.mosaic_num_slots <= 4):
      raise ValueError(
        f"BlockSizes.mosaic_num_slots must be an int in [2, 4], got {self.mosaic_num_slots!r}"
      )
    if self.decode_kernel not in DECODE_KERNELS:
      raise ValueError(
        f"BlockSizes.decode_kernel must be one of {DECODE_KERNELS}, got {self.decode_kernel!r}"
      )
    if not (
      isinstance(self.mosaic_decode_kv_tile, int) and self.mosaic_decode_kv_tile in (64, 128)
    ):
      raise ValueError(
        f"BlockSizes.mosaic_decode_kv_tile must be 64 or 128, got {self.mosaic_decode_kv_tile!r}"
      )
    slots = self.mosaic_decode_num_slots
    if slots is not None and not (isinstance(slots, int) and 2 <= slots <= 4):
      raise ValueError(
        f"BlockSizes.mosaic_decode_num_slots must be None or an int in [2, 4], got {slots!r}"
      )
    per_sm = self.mosaic_decode_programs_per_sm
    if per_sm is not None and not (isinstance(per_sm, int) and 1 <= per_sm <= 4):
      raise ValueError(
        f"BlockSizes.mosaic_decode_programs_per_sm must be None or an int in [1, 4], got {per_sm!r}"
      )
    if self.mosaic_decode_merge not in ("triton", "xla"):
      raise ValueError(
        "BlockSizes.mosaic_decode_merge must be 'triton' or 'xla', got "
        f"{self.mosaic_decode_merge!r}"
      )
    if self.quant_widen not in _widen.QUANT_WIDEN_MODES:
      raise ValueError(
        f"BlockSizes.quant_widen must be one of {_widen.QUANT_WIDEN_MODES}, "
        f"got {self.quant_widen!r}"
      )
    tpb = self.mosaic_tiles_per_block
    if not (isinstance(tpb, int) and 1 <= tpb <= 8):
      raise ValueError(f"BlockSizes.mosaic_tiles_per_block must be an int in [1, 8], got {tpb!r}")
    splits = self.decode_num_splits
    if splits is not None and not (isinstance(splits, int) and splits >= 1):
      raise ValueError(f"BlockSizes.decode_num_splits must be None or an int >= 1, got {splits!r}")


def _floor_pow2(x: int) -> int:
  return 1 << (max(int(x), 1).bit_length() - 1)


def rule_block_sizes(
  *,
  head_dim: int,
  kv_dtype,
  num_tokens: int | None = None,
  decode: bool = True,
  batch: int | None = None,
  num_kv_heads: int | None = None,
) -> BlockSizes:
  """The rule: per-shape settings by bytes (measured on an H100, docs/gpu_notes.md).

  What ``default_block_sizes`` gives on a card without a tuning table, and for the shape
  classes a card's table does not cover.

  Decode: with at least 128 (sequence, KV head) pairs the grid is several waves deep
  and one program per SM with large steps (64 KiB of K+V per stage, 3 stages, 8 warps;
  4 warps where a token of K plus V is under 512 bytes, e.g. bf16 head_dim 64) reads
  fastest and least variably; smaller batches keep 2 programs per SM (32 KiB
  stages) so split-K has more programs in flight.

  Sizes are of the kernels' tiles, whose head dim is ``head_dim`` rounded up to a power of
  two (80, 96, 112 -> 128; 192 -> 256): the tiles in shared memory and registers are that
  wide, whatever the bytes read, so head_dim 96 gets the settings of 128.

  Args:
    head_dim: D of q and K/V (its padded width sets the tiles).
    kv_dtype: dtype of the K/V pools.
    num_tokens: query rows of a prefill call (None for decode); a short call gets a
      smaller query tile so that fewer rows are padding.
    decode: whether the call is a decode step.
    batch, num_kv_heads: decode batch and KV heads (None: treated as a small batch).
  """
  itemsize = jnp.dtype(kv_dtype).itemsize
  width = padded_head_dim(head_dim)
  row_bytes = 2 * width * itemsize  # one token of K plus V, as tiled
  large = batch is not None and num_kv_heads is not None and batch * num_kv_heads >= 128
  if large:
    kv_tile = max(16, min(128, _floor_pow2(_LARGE_STAGE_BYTES // row_bytes)))
    # 8 warps were measured best at head_dim 128 (H100); at head_dim 64 (bf16) a 128-token
    # step is half the bytes and 4 warps read faster: on an H200 at 256 x 1024, 32/8 heads
    # 3.63 against 3.19 TB/s with 8, 9/3 heads 3.15 against 2.71 (docs/gpu_notes.md).
    warps, stages = (8 if row_bytes >= 512 else 4), 3
  else:
    kv_tile = max(16, min(128, _floor_pow2(_STAGE_BYTES // row_bytes)))
    warps, stages = 4, 3 if kv_tile * row_bytes <= 32 * 1024 else 2
  big = width * itemsize > 256  # head_dim 256 bf16 or >= 128 f32: registers run out
  prefill_q = 64 if big else 128
  if num_tokens is not None and not decode:
    prefill_q = max(16, min(prefill_q, _floor_pow2(max(num_tokens, 16))))
  return BlockSizes(
    decode_kv_tile=kv_tile,
    decode_num_splits=None,
    decode_num_warps=warps,
    decode_num_stages=stages,
    prefill_q_tile=prefill_q,
    prefill_kv_tile=32 if big else 64,
    # 4 warps measured best on the H100 for 128-row tiles too (289 vs 231 TFLOP/s with 8,
    # causal 4 x 4096, docs/gpu_notes.md).
    prefill_num_warps=4,
    prefill_num_stages=2 if big else 3,
  )


AUTO = "auto"


def current_device_kind() -> str | None:
  """``jax.devices()[0].device_kind`` where JAX's default device is a GPU, else None."""
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return None
  return device.device_kind if device.platform == "gpu" else None


# Cards on which a decode step over an 8-bit cache is shorter with the write inside the
# decode kernel (kernels.write_and_decode_packed with scale pools: the kernel quantizes and
# stores the rows) than with the cache write before the attention kernel, measured in the
# engine's step (docs/benchmarks.md, "Run41"): the H100 SXM (device kind "NVIDIA H100 80GB
# HBM3"; the PCIe and NVL cards are other kinds, not measured), 3-44% shorter wherever the
# ranges part (int8 rotated and e4m3 at 64 x 512, int8 rotated at 256 x 1024, SmolLM2 and the
# 1B shape; unrotated int8 at 64 x 512: 6% for the 1B shape, level for SmolLM2). The H200's
# figures (17-32% longer at 256 x 1024) were all of another kernel, 08d3763's, which also
# rotated q, the new rows and the output inside (reverted; run42 found the mix-up): this
# kernel, without that rotation, has not been timed in the H200's step. Until it is,
# :func:`quant_fused_write` leaves the H200 and unmeasured cards to the separate write.
QUANT_FUSED_WRITE_CARDS = ("NVIDIA H100 80GB HBM3",)


def quant_fused_write(device_kind: str | None | object = "auto") -> bool:
  """Whether a decode step over an 8-bit cache should write inside the decode kernel on
  ``device_kind`` (``"auto"``: :func:`current_device_kind`; None: off GPU, False):
  ``QUANT_FUSED_WRITE_CARDS``. ``paxcache.nn.PagedAttention`` asks it (its
  ``fused_write_8bit`` overrides it)."""
  kind = current_device_kind() if device_kind == "auto" else device_kind
  return kind in QUANT_FUSED_WRITE_CARDS


# A grid of more than this many decode programs per SM (two pipeline stages of 32 KiB let
# three programs share an SM, three stages two) takes 2 stages at head_dim 64 bf16 with
# 128-token steps: :func:`deep_grid_stages`.
DEEP_GRID_PROGRAMS_PER_SM = 3
# ... and only with this many KV heads or more (see deep_grid_stages).
DEEP_GRID_MIN_KV_HEADS = 4
# Cards it was measured on (the H200 at a8766e1, the H100 SXM at e6a7b6c: docs/benchmarks.md,
# "Two stages for deep head_dim 64 grids" and "Run32"); others keep their table's or the
# rule's stages (an A100's shared memory fits one 3-stage program an SM, not two: the
# reasoning would not carry).
DEEP_GRID_CARDS = ("NVIDIA H200", "NVIDIA H100 80GB HBM3")


def deep_grid_stages(
  bs: BlockSizes, *, head_dim: int, kv_dtype, batch: int, num_kv_heads: int, max_context: int
) -> BlockSizes:
  """``bs`` with 2 pipeline stages instead of 3 where a head_dim 64, 16-bit decode grid is
  deep: more than ``DEEP_GRID_PROGRAMS_PER_SM`` programs per SM (programs = sequences x KV
  heads x the splits the kernel launches, ``decode.grid_splits``) and at least
  ``DEEP_GRID_MIN_KV_HEADS`` KV heads. Other settings come back unchanged.

  Measured on an H200 (docs/benchmarks.md, "Two stages for deep head_dim 64 grids"):
  the decode kernel's traced duration at 128-token steps, 4 warps, over batch x context
  64 x 512, 256 x 1024 and 32 x 2048 and six head configurations. With 512 to 2,048
  programs and 4-16 KV heads 2 stages were 3-16% faster (512 programs: 14-16%), level at
  4,096; with 192-288 programs 3 stages were 7-15% faster, level at 384; with 3 KV
  heads and 768 programs (9/3 and 12/3 heads at 256 x 1024) 3 stages were 4-6% faster,
  which the KV-head floor keeps (not explained: a fit of 18 measured points, not a
  model), in bf16 (float16 moves the same bytes through the same tiles; not measured). In
  the engine's step that is the attention of a Llama-3.2-1B shape (8 KV heads), with
  SmolLM2's 3 KV heads kept on 3 stages. Programs count the launched grid: with a sliding
  window most splits of a long row find no key and return at once, so a windowed grid is
  shallower than it looks (not measured). On an H100 SXM (run32, 8 of those shapes) 2
  stages were 1-8% faster at 512 to 2,048 programs with 8 or 16 KV heads, level at 1,024
  with 4, and 3 stages 2-7% faster at 192 and 256 programs and 1% at 768 with 3 KV heads:
  every point on the side this rule picks, or level. :func:`default_block_sizes` applies
  it on the cards of ``DEEP_GRID_CARDS`` only, after their table.
  """
  from kernels.gpu.decode import _num_sms, grid_splits  # decode imports this module

  if not (
    head_dim == 64  # measured there only (48, also 64-wide tiles, moves fewer bytes)
    and jnp.dtype(kv_dtype).itemsize == 2
    and bs.decode_kv_tile == 128
    and bs.decode_num_stages == 3
    and num_kv_heads >= DEEP_GRID_MIN_KV_HEADS
  ):
    return bs
  splits, _ = grid_splits(batch, num_kv_heads, max_context, bs.decode_kv_tile, bs.decode_num_splits)
  if batch * num_kv_heads * splits <= DEEP_GRID_PROGRAMS_PER_SM * _num_sms():
    return bs
  return dataclasses.replace(bs, decode_num_stages=2)


def default_block_sizes(
  *,
  head_dim: int,
  kv_dtype,
  num_tokens: int | None = None,
  decode: bool = True,
  batch: int | None = None,
  num_kv_heads: int | None = None,
  device_kind: str | None = AUTO,
  max_context: int | None = None,
) -> BlockSizes:
  """Per-shape, per-card defaults: the card's tuning table over :func:`rule_block_sizes`.

  Starts from the rule's settings for the shape, then lays over them the fields of the
  card's table entries for the shape's classes (``tuning_table.shape_class``): the decode
  entry (``decode_*`` fields; class by tile width, K/V itemsize and whether ``batch *
  num_kv_heads`` reaches ``tuning_table.LARGE_PAIRS``), the Triton prefill entry
  (``prefill_*``) and the Mosaic GPU prefill entry (``mosaic_*``). A class the table does
  not cover, or a card with no table, keeps the rule. A prefill call of ``num_tokens``
  rows still gets its query tile cut to at most ``num_tokens`` rounded down to a power of
  two (at least 16), as the rule does. On a card of ``DEEP_GRID_CARDS``, a decode call
  whose ``max_context`` is given then goes through :func:`deep_grid_stages`. Explicit
  ``BlockSizes`` passed to ``kernels.paged_attention`` never come here.

  Args:
    head_dim, kv_dtype, num_tokens, decode, batch, num_kv_heads: as for
      :func:`rule_block_sizes`.
    device_kind: the card whose table applies: ``"auto"`` (default) is
      :func:`current_device_kind` (None off GPU); None applies no table (the rule alone).
    max_context: a decode call's longest possible context (block-table width times
      block size), which sets its grid; None skips :func:`deep_grid_stages`.

  Raises:
    kernels.gpu.tuning_table.TuningTableError: a malformed table file.
  """
  base = rule_block_sizes(
    head_dim=head_dim,
    kv_dtype=kv_dtype,
    num_tokens=num_tokens,
    decode=decode,
    batch=batch,
    num_kv_heads=num_kv_heads,
  )
  if device_kind == AUTO:
    device_kind = current_device_kind()
  if device_kind is None:
    return base
  bs = _tabled(base, head_dim, kv_dtype, num_tokens, decode, batch, num_kv_heads, device_kind)
  if (
    decode
    and device_kind in DEEP_GRID_CARDS
    and max_context is not None
    and batch is not None
    and num_kv_heads is not None
  ):
    bs = deep_grid_stages(
      bs,
      head_dim=head_dim,
      kv_dtype=kv_dtype,
      batch=batch,
      num_kv_heads=num_kv_heads,
      max_context=max_context,
    )
  return bs


def _tabled(base, head_dim, kv_dtype, num_tokens, decode, batch, num_kv_heads, device_kind):
  """``base`` with the card's table entries for the shape's classes laid over."""
  width = padded_head_dim(head_dim)
  itemsize = jnp.dtype(kv_dtype).itemsize
  pairs = batch * num_kv_heads if batch is not None and num_kv_heads is not None else None
  fields = {}
  for kind in ("decode", "prefill", "mosaic"):
    cls = tuning_table.shape_class(kind, width=width, itemsize=itemsize, pairs=pairs)
    fields.update(tuning_table.lookup(device_kind, cls) or {})
  if not fields:
    return base
  if "prefill_q_tile" in fields and num_tokens is not None and not decode:
    cap = max(16, _floor_pow2(max(num_tokens, 16)))
    fields["prefill_q_tile"] = max(16, min(fields["prefill_q_tile"], cap))
  return dataclasses.replace(base, **fields)


def planned_decode_fields(*, head_dim: int, kv_dtype) -> dict:
  """The planned decode's own step settings (``decode_kv_tile``, ``decode_num_warps``,
  ``decode_num_stages``), by bytes: steps of up to 64 KiB of K plus V (at most 128
  tokens), 4 warps, 2 stages where a step is over 32 KiB, else 3.

  At bf16 head_dim 128 that is 128-token steps in 2 stages (128 KiB of shared memory: one
  program per SM), which read faster than the small-batch rule's 64-token steps in 3
  stages (two programs per SM) on five of the six ``experiments/bench/gpu_ragged.py`` cases
  swept on an H200 and level on the sixth (device time, af45169; docs/benchmarks.md "The
  planned defaults re-measured"): one long among short 3.32 against 3.13 TB/s, 64 x 8192
  4.22 against 4.01, 256 x 2048 4.30 against 4.09, ShareGPT-like 3.75 and 3.75. A step of
  at most 32 KiB (bf16 head_dim 64, 8-bit head_dim 128) keeps 3 stages, as the rule has it
  (128-token steps).
  """
  row_bytes = 2 * padded_head_dim(head_dim) * jnp.dtype(kv_dtype).itemsize
  kv_tile = max(16, min(128, _floor_pow2(_PLANNED_STAGE_BYTES // row_bytes)))
  stages = 2 if kv_tile * row_bytes > 32 * 1024 else 3
  return dict(decode_kv_tile=kv_tile, decode_num_warps=4, decode_num_stages=stages)


def planned_block_sizes(*, head_dim: int, kv_dtype, device_kind: str | None = AUTO) -> BlockSizes:
  """Defaults of the planned decode (``kernels/gpu/planned.py``): its own step settings
  (:func:`planned_decode_fields`) whatever the batch, the rule's other decode fields, and
  the card's prefill and Mosaic prefill table entries laid over the rest.

  The card's ``decode/...`` table entries are not applied: they were measured on the
  split-K kernel (``experiments/bench/tune_gpu.py``), a different kernel with a different
  grid. Taking the H200's ``decode/w128/i2/small`` entry (128-token steps, 8 warps, 2
  stages, the split-K kernel's best at 8 x 4096) slowed the planned kernel on every
  ragged case of ``experiments/bench/gpu_ragged.py`` at 8b997d7 (ShareGPT-like 256: 2.79
  TB/s, 2.67-3.09, against 3.38, 3.25-3.55, with the rule's settings at 93e3c3e;
  docs/benchmarks.md "Ragged decode by a work plan"): 8 warps, where 4 read faster.
  """
  base = rule_block_sizes(head_dim=head_dim, kv_dtype=kv_dtype)
  tabled = default_block_sizes(head_dim=head_dim, kv_dtype=kv_dtype, device_kind=device_kind)
  decode_fields = tuning_table.KIND_FIELDS["decode"]
  fields = {f: getattr(base, f) for f in decode_fields}
  fields.update(planned_decode_fields(head_dim=head_dim, kv_dtype=kv_dtype))
  return dataclasses.replace(tabled, **fields)
