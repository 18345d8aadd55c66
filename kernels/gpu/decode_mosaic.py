"""Planned paged decode for Hopper in Pallas Mosaic GPU: TMA block copies, wgmma, a merge.

The Mosaic GPU twin of ``planned.py`` (issue 15, item 5: JAX deprecates the Pallas Triton
backend). It runs a :class:`kernels.gpu.plan.DecodePlan` whose work units are its
(chunk, KV head) pairs: by default one CUDA block per unit (grid ``num_padded_chunks *
num_kv_heads``); with ``num_programs`` a persistent grid whose blocks take every
``num_programs``-th unit, the producer running on into the next unit's K/V while the
consumer finishes the last (a block holds the SM's registers, so one runs per SM and the
start of a fresh block would leave its reads idle). :func:`kernels.gpu.kernel_backend`
decides when it runs (``BlockSizes.decode_kernel``); the Triton kernels stay for other GPUs.

Per unit, the two warpgroups of a block:

* warpgroup 1, the producer, walks the chunk's K/V steps (``kv_tile`` tokens each). For a
  step it reads the block ids from the block table and issues one TMA copy per cache
  block (or per ``kv_tile`` slice of a block larger than the step) of K and of V into a
  ring of ``num_slots`` shared-memory slots, with "full" barriers per slot; it waits on
  the slot's "free" barrier before reusing it.
* warpgroup 0, the consumer, holds the ``group`` query heads of its KV head for the
  chunk's sequence as the first rows of a 64-row wgmma tile (rows past the group are
  computed and dropped: decode is memory-bound, the spare matrix rows cost no bytes). Per
  step: ``S = Q K^T`` (wgmma), the mask of the chunk's key range, the online softmax in
  float32 (``_softmax.online_softmax_step``), ``P V`` (wgmma). It writes the chunk's
  unnormalised float32 partials, running max (log2 units) and denominator for its
  ``group`` rows; a Triton merge kernel (``planned._merge_row``, run for every sequence,
  one-chunk ones too) then combines each sequence's chunks. Unlike ``planned.py`` no
  one-chunk sequence writes its normalised output directly: every chunk goes through the
  float32 partials (a first version; a few MB more traffic on a GB-sized read).

Memory safety without masked loads, as in ``prefill_mosaic.py``: a TMA copy moves whole
blocks and cannot zero the slots past a sequence's length, which may hold NaN (and ``0 *
NaN`` in ``P V`` would reach the output). So the one step that holds a sequence's end is
copied from a small ``tail`` buffer gathered by XLA beforehand
(``[num_kv_heads, batch, kv_tile, head_dim]``, zero at or past the length and behind an
invalid block id). With a sliding window the step holding the window's first key, if it
starts before that key, comes the same way from a ``head`` buffer (zero before the
window, where an engine may have freed the blocks); where head and tail are one step the
tail buffer (zero outside ``[max(length - window, 0), length)``) serves both. Every other
step lies wholly inside the visible keys, where every block id is real. Block ids are
clamped into ``[0, num_blocks)`` before they address a copy, so a malformed traced table
cannot read outside the pool. Keys outside the chunk's range get ``-inf`` logits (their
values are finite: inside the sequence, or the buffers' zeros).

The queries are laid out by XLA as ``[batch * num_kv_heads * R, head_dim]`` with ``R`` the
group rounded up to 8 (no copy when the group is a multiple of 8), so the consumer copies
its ``R`` rows with one TMA at an 8-row-aligned offset (the swizzled layout needs it) into
the top of its 64-row tile. The partials keep ``R`` rows per (chunk, KV head); the
consumer stores the group's rows (all ``R`` where the group is not a multiple of 4, as a
TMA copy moves whole 16 bytes), and the merge reads the group's rows in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pltriton

from kernels._quant import is_quantized
from kernels.gpu import planned as _planned
from kernels.gpu._softmax import online_softmax_step
from kernels.gpu.plan import DecodePlan
from kernels.gpu.planned import _merge_row

ROWS = 64  # the wgmma M dimension: query rows of the consumer's tile
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
MIN_BLOCK_SIZE = 8  # one 8-row tile of the swizzled shared-memory layout
MAX_GROUP = ROWS  # query heads per KV head that fit the tile
KV_TILES = (64, 128)  # the 128-byte swizzle of a bf16 P tile needs >= 64 columns
# Shared memory of one SM on sm_90 that a CUDA block may take (227 KiB).
SMEM_LIMIT_BYTES = 232448
MAX_SLOTS = 4
MERGES = ("triton", "xla")
# Registers per thread of the warpgroups (setmaxnreg): the producer gives its registers
# up, the consumer takes what JAX's own warp-specialised pipelines give one compute
# warpgroup beside a 40-register producer (pipeline._compute_registers: min(256, 512 - 40)).
# So a CUDA block holds the SM's register file, and one runs per SM: the ring takes the
# shared memory (default_num_slots) and a persistent grid (num_programs) hides a block's
# start; both are for the H200 to confirm.
PRODUCER_REGISTERS = 40
CONSUMER_REGISTERS = 256


def unsupported_reason(q_dtype, kv_dtype, head_dim: int, block_size: int, group: int):
  """Why the Mosaic GPU decode cannot take these inputs, or None when it can."""
  if is_quantized(kv_dtype):
    return f"8-bit K/V ({jnp.dtype(kv_dtype).name})"
  if jnp.dtype(q_dtype) != jnp.dtype(kv_dtype) or not any(
    jnp.dtype(q_dtype) == jnp.dtype(d) for d in SUPPORTED_DTYPES
  ):
    return (
      f"q {jnp.dtype(q_dtype).name} with K/V {jnp.dtype(kv_dtype).name} (needs one dtype of "
      f"{[jnp.dtype(d).name for d in SUPPORTED_DTYPES]})"
    )
  if head_dim not in SUPPORTED_HEAD_DIMS:
    return f"head_dim {head_dim} (needs one of {SUPPORTED_HEAD_DIMS})"
  if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
    return f"block_size {block_size} (needs a power of two >= {MIN_BLOCK_SIZE})"
  if not 1 <= group <= MAX_GROUP:
    return f"{group} query heads per KV head (needs 1..{MAX_GROUP})"
  return None


def supports(q_dtype, kv_dtype, head_dim: int, block_size: int, group: int) -> bool:
  """Whether this kernel handles the dtypes and sizes (the device is checked elsewhere)."""
  return unsupported_reason(q_dtype, kv_dtype, head_dim, block_size, group) is None


def smem_bytes(head_dim: int, itemsize: int, kv_tile: int, num_slots: int, pv_via_smem: bool):
  """Shared memory one CUDA block takes (tiles; barriers are a few bytes more)."""
  q = ROWS * head_dim * itemsize
  out = ROWS * head_dim * 4 + 2 * ROWS * 4  # float32 partials, running max, denominator
  kv = 2 * num_slots * kv_tile * head_dim * itemsize
  p = ROWS * kv_tile * itemsize if pv_via_smem else 0
  return q + out + kv + p


def default_num_slots(head_dim: int, itemsize: int, kv_tile: int, pv_via_smem=False) -> int:
  """The deepest ring (2..MAX_SLOTS) whose block fits an SM's shared memory (1 KiB kept
  for barriers); 2 where no deeper one fits."""
  for slots in range(MAX_SLOTS, 2, -1):
    if smem_bytes(head_dim, itemsize, kv_tile, slots, pv_via_smem) + 1024 <= SMEM_LIMIT_BYTES:
      return slots
  return 2


def build_step(k_blocks, block_table, step, lo, lengths, kv_tile: int):
  """K (or V) of K/V step ``step[b]`` of each sequence, zero outside ``[lo[b], lengths[b])``.

  Returns [num_kv_heads, batch, kv_tile, head_dim]: row ``r`` of sequence ``b`` is token
  ``step[b] * kv_tile + r``; rows outside ``[lo, length)``, or behind a block id outside
  ``[0, num_blocks)`` or past the table, are zero.
  """
  _, num_blocks, block_size, _ = k_blocks.shape
  max_blocks = block_table.shape[1]
  tok = (step * kv_tile)[:, None] + jnp.arange(kv_tile, dtype=jnp.int32)
  lblk = tok // block_size
  blk = jnp.take_along_axis(block_table, jnp.clip(lblk, 0, max_blocks - 1), axis=1)
  ok = (tok >= lo[:, None]) & (tok < lengths[:, None])
  ok &= (lblk < max_blocks) & (blk >= 0) & (blk < num_blocks)
  rows = k_blocks[:, jnp.where(ok, blk, 0), jnp.where(ok, tok % block_size, 0)]
  return jnp.where(ok[None, :, :, None], rows, jnp.zeros((), k_blocks.dtype))


def _copy_when(pred, src, dst, barrier):
  pl.when(pred)(lambda: plgpu.copy_gmem_to_smem(src, dst, barrier))


def _kernel(
  # GMEM: whole arrays in GPU global memory; the kernel copies tiles into SMEM with TMA.
  chunk_seq_ref,  # i32[C]
  chunk_start_ref,  # i32[C]
  chunk_end_ref,  # i32[C]
  lengths_ref,  # i32[batch]
  table_ref,  # i32[batch, max_blocks], -1 where unused
  q_ref,  # [batch * num_kv_heads * R, head_dim]
  k_ref,  # [num_kv_heads, num_blocks, block_size, head_dim]
  v_ref,  # same
  tail_k_ref,  # [num_kv_heads, batch, kv_tile, head_dim]: build_step of the length's step
  tail_v_ref,
  # With a sliding window: head_k_ref, head_v_ref (build_step of the window's first
  # step). Then the outputs: o_ref f32[C * num_kv_heads * R, head_dim], m_ref and den_ref
  # f32[C * num_kv_heads * R]; row (chunk * num_kv_heads + kv_head) * R + query row.
  *refs,
  rows,
  store_rows,
  kv_tile,
  num_slots,
  num_programs,
  scale,
  sliding_window,
  logit_soft_cap,
  pv_via_smem,
):
  if sliding_window is None:
    head_k_ref = head_v_ref = None
    o_ref, m_ref, den_ref = refs
  else:
    head_k_ref, head_v_ref, o_ref, m_ref, den_ref = refs
  num_kv_heads, num_blocks, block_size, head_dim = k_ref.shape
  max_blocks = table_ref.shape[1]
  num_units = chunk_seq_ref.shape[0] * num_kv_heads
  dtype = q_ref.dtype
  copies_per_step = max(1, kv_tile // block_size)  # cache-block copies filling one slot
  kv_t = jnp.int32(kv_tile)

  # Work units u = chunk * num_kv_heads + KV head; program `pid` takes units pid,
  # pid + num_programs, ... (one each when the grid covers every unit). Both warpgroups
  # walk the same units and count the steps of all of them (`g`), which places each step
  # in the ring and in its barriers' phases.
  pid = lax.axis_index("programs")
  wg = lax.axis_index("wg")
  my_units = lax.div(num_units - 1 - pid, jnp.int32(num_programs)) + 1

  def unit(k):
    u = pid + k * num_programs
    c = lax.div(u, jnp.int32(num_kv_heads))
    kvh = lax.rem(u, jnp.int32(num_kv_heads))
    b = chunk_seq_ref[c]
    length = lengths_ref[b]
    start = chunk_start_ref[c]
    end = jnp.minimum(chunk_end_ref[c], length)
    lo = jnp.zeros_like(length)
    if sliding_window is not None:  # position length - 1 sees keys >= length - window
      lo = jnp.maximum(length - sliding_window, 0)
      start = jnp.maximum(start, lo)
    # Padding chunks (start = end = 0 in the plan) read and write nothing. A real chunk
    # may still see no key (a plan cut without the call's window: a chunk before it); it
    # reads nothing and writes empty partials (m = -inf, den = 0), which the merge reads.
    real = chunk_end_ref[c] > chunk_start_ref[c]
    j0 = lax.div(start, kv_t)
    num_steps = jnp.where(end > start, lax.div(end + kv_t - 1, kv_t) - j0, 0)
    return dict(
      c=c,
      kvh=kvh,
      b=b,
      length=length,
      start=start,
      end=end,
      lo=lo,
      j0=j0,
      num_steps=num_steps,
      real=real,
    )

  def body(
    q_smem,  # SMEM [ROWS, head_dim]: the query tile (rows [0, rows) loaded)
    k_smem,  # SMEM [num_slots, kv_tile, head_dim]: ring of K steps
    v_smem,  # SMEM [num_slots, kv_tile, head_dim]: ring of V steps
    o_smem,  # SMEM f32[ROWS, head_dim]: the partial output, for the TMA store
    m_smem,  # SMEM f32[ROWS]
    den_smem,  # SMEM f32[ROWS]
    p_smem,  # SMEM [ROWS, kv_tile]: P for the P V wgmma; None unless pv_via_smem
    q_full,  # barrier: the query rows have landed
    k_full,  # barrier [num_slots], copies_per_step arrivals: the slot's K has landed
    v_full,  # barrier [num_slots], copies_per_step arrivals: the slot's V has landed
    k_free,  # barrier [num_slots]: the consumer is done with the slot's K
    v_free,  # barrier [num_slots]: the consumer is done with the slot's V
  ):
    @pl.when(wg == 1)
    def _producer():
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

      def produce(k, g):
        w = unit(k)
        kvh, b, length = w["kvh"], w["b"], w["length"]
        tail_step = jnp.where(lax.rem(length, kv_t) != 0, lax.div(length, kv_t), jnp.int32(-1))
        head_step = jnp.where(lax.rem(w["lo"], kv_t) != 0, lax.div(w["lo"], kv_t), jnp.int32(-1))

        def block_ids(j):
          ids = []
          for p in range(copies_per_step):
            lblk = lax.div(j * kv_t, jnp.int32(block_size)) + p
            blk = table_ref[b, jnp.minimum(lblk, max_blocks - 1)]
            ids.append(jnp.clip(blk, 0, num_blocks - 1))
          return ids

        def issue(ref, tail_ref, head_ref, smem, barrier, j, ids):
          # Exactly one copy per piece whichever source it takes, so the barrier always
          # counts copies_per_step arrivals.
          is_tail = j == tail_step
          is_head = (j == head_step) & ~is_tail
          for p, blk in enumerate(ids):
            if block_size >= kv_tile:
              off = pl.multiple_of(lax.rem(j, jnp.int32(block_size // kv_tile)) * kv_t, kv_tile)
              src = ref.at[kvh, blk, pl.ds(off, kv_tile)]
              edge = pl.ds(0, kv_tile)
              dst = smem
            else:
              src = ref.at[kvh, blk]
              edge = pl.ds(p * block_size, block_size)
              dst = smem.at[pl.ds(p * block_size, block_size)]
            _copy_when(is_tail, tail_ref.at[kvh, b, edge], dst, barrier)
            if head_ref is None:
              _copy_when(~is_tail, src, dst, barrier)
            else:
              _copy_when(is_head, head_ref.at[kvh, b, edge], dst, barrier)
              _copy_when(~is_tail & ~is_head, src, dst, barrier)

        @pl.loop(0, w["num_steps"])
        def _step(i):
          j = w["j0"] + i
          n = g + i  # steps issued before this one, over all of this program's units
          slot = lax.rem(n, jnp.int32(num_slots))
          ids = block_ids(j)  # loaded before the waits, so their latency hides behind them

          @pl.when(n >= num_slots)
          def _():
            plgpu.barrier_wait(k_free.at[slot])

          issue(k_ref, tail_k_ref, head_k_ref, k_smem.at[slot], k_full.at[slot], j, ids)

          @pl.when(n >= num_slots)
          def _():
            plgpu.barrier_wait(v_free.at[slot])

          issue(v_ref, tail_v_ref, head_v_ref, v_smem.at[slot], v_full.at[slot], j, ids)

        return g + w["num_steps"]

      total = lax.fori_loop(0, my_units, produce, jnp.int32(0))

      # Wait for the consumer to release the last slots: the block's shared memory must
      # outlive every read of it (and each barrier phase is observed once).
      @pl.loop(jnp.maximum(total - num_slots, 0), total)
      def _drain(n):
        slot = lax.rem(n, jnp.int32(num_slots))
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])

    @pl.when(wg == 0)
    def _consumer():
      plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
      col = plgpu.broadcasted_iota(jnp.int32, (ROWS, kv_tile), 1, layout=plgpu.Layout.WGMMA)

      def consume(k, g):
        w = unit(k)
        start, end, j0 = w["start"], w["end"], w["j0"]

        @pl.when(w["real"])
        def _():
          q_row = pl.multiple_of((w["b"] * num_kv_heads + w["kvh"]) * rows, 8)
          # (The previous unit's wgmmas have finished reading q_smem: each is waited for.)
          plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_row, rows)], q_smem.at[pl.ds(0, rows)], q_full)
          plgpu.barrier_wait(q_full)

          def step(i, carry):
            j = j0 + i
            slot = lax.rem(g + i, jnp.int32(num_slots))
            plgpu.barrier_wait(k_full.at[slot])

            def scores(acc_ref):
              plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
              return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC((ROWS, kv_tile), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            key = j * kv_t + col
            vis = (key >= start) & (key < end)  # the chunk's keys (inside the sequence)
            (acc, m, den), p = online_softmax_step(
              carry, s, scale=scale, logit_soft_cap=logit_soft_cap, mask=vis
            )
            p = p.astype(dtype)
            plgpu.barrier_wait(v_full.at[slot])
            if pv_via_smem:  # P through shared memory into a fresh accumulator, then added

              def values(acc_ref):
                plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                return acc_ref[...]

              p_smem[...] = p
              plgpu.commit_smem()
              acc = acc + pl.run_scoped(values, plgpu.ACC((ROWS, head_dim), jnp.float32))
            else:  # P from registers, accumulating into acc's registers

              def values(acc_ref):
                plgpu.wgmma(acc_ref, p, v_smem.at[slot])

              acc = pl.run_state(values)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m, den

          acc = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
          m = plgpu.layout_cast(
            jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
          )
          den = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
          acc, m, den = lax.fori_loop(0, w["num_steps"], step, (acc, m, den))
          # The previous unit's stores must have read o_smem, m_smem, den_smem.
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          o_smem[...] = acc
          m_smem[...] = m
          den_smem[...] = den
          plgpu.commit_smem()
          part = pl.multiple_of((w["c"] * num_kv_heads + w["kvh"]) * rows, 8)
          # The group's rows only, where a row count of float32s makes whole 16 bytes (a
          # TMA copy's granule); else all R rows (the padding ones are never read).
          n = store_rows
          plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, n)], o_ref.at[pl.ds(part, n)])
          plgpu.copy_smem_to_gmem(m_smem.at[pl.ds(0, n)], m_ref.at[pl.ds(part, n)])
          plgpu.copy_smem_to_gmem(den_smem.at[pl.ds(0, n)], den_ref.at[pl.ds(part, n)])

        return g + w["num_steps"]

      lax.fori_loop(0, my_units, consume, jnp.int32(0))
      plgpu.wait_smem_to_gmem(0)

  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  pl.run_scoped(
    body,
    plgpu.SMEM((ROWS, head_dim), dtype, transforms=swizzled),
    plgpu.SMEM((num_slots, kv_tile, head_dim), dtype, transforms=swizzled),
    plgpu.SMEM((num_slots, kv_tile, head_dim), dtype, transforms=swizzled),
    plgpu.SMEM((ROWS, head_dim), jnp.float32),
    plgpu.SMEM((ROWS,), jnp.float32),
    plgpu.SMEM((ROWS,), jnp.float32),
    plgpu.SMEM((ROWS, kv_tile), dtype, transforms=swizzled) if pv_via_smem else None,
    plgpu.Barrier(),
    plgpu.Barrier(num_arrivals=copies_per_step, num_barriers=num_slots),
    plgpu.Barrier(num_arrivals=copies_per_step, num_barriers=num_slots),
    plgpu.Barrier(num_barriers=num_slots),
    plgpu.Barrier(num_barriers=num_slots),
    collective_axes="wg",
  )


def _merge_xla(plan, o, m, den, batch, num_kv_heads, group, rows, head_dim):
  """The merge in XLA (no Pallas Triton): f32[batch, num_q_heads, head_dim].

  Chunk ``i`` of the plan adds ``o_i * 2**(m_i - M)`` to its sequence's sum and ``den_i *
  2**(m_i - M)`` to its denominator, ``M`` the sequence's largest ``m``; padding chunks
  (``start = end`` in the plan: their partials were never written) and chunks that saw
  no key (``m = -inf``) add nothing."""
  num_chunks = plan.chunk_seq.shape[0]
  real = plan.chunk_end > plan.chunk_start  # [C]
  o = o.reshape(num_chunks, num_kv_heads, rows, head_dim)[:, :, :group]
  m = m.reshape(num_chunks, num_kv_heads, rows)[:, :, :group]
  den = den.reshape(num_chunks, num_kv_heads, rows)[:, :, :group]
  live = real[:, None, None] & (m > -jnp.inf)
  m = jnp.where(live, m, -jnp.inf)
  seq = plan.chunk_seq
  big = jax.ops.segment_max(m, seq, num_segments=batch)  # [batch, Hkv, group]
  big = jnp.where(big == -jnp.inf, 0.0, big)
  w = jnp.where(live, jnp.exp2(m - big[seq]), 0.0)
  num = jax.ops.segment_sum(jnp.where(live[..., None], o, 0.0) * w[..., None], seq, batch)
  tot = jax.ops.segment_sum(jnp.where(live, den, 0.0) * w, seq, batch)
  out = num / jnp.where(tot > 0, tot, 1.0)[..., None]
  return out.reshape(batch, num_kv_heads * group, head_dim)


def _merge_all_kernel(
  first_ref, count_ref, o_ref, m_ref, den_ref, out_ref, *, num_q_heads, head_dim, group, rows
):
  """planned.py's merge of one (query head, sequence), for every sequence (one chunk too),
  reading the partials where the chunk kernel wrote them: chunk ``i``'s row for query head
  ``hq`` is ``(i * num_kv_heads + hq // group) * rows + hq % group``."""
  hq = pl.program_id(0)
  b = pl.program_id(1)
  stride = (num_q_heads // group) * rows
  offset = lax.div(hq, group) * rows + lax.rem(hq, group)
  _merge_row(
    first_ref[b],
    count_ref[b],
    b,
    hq,
    o_ref,
    m_ref,
    den_ref,
    out_ref,
    num_q_heads,
    head_dim,
    part_rows=(stride, offset),
  )


@functools.partial(
  jax.jit,
  static_argnames=(
    "scale",
    "sliding_window",
    "logit_soft_cap",
    "kv_tile",
    "num_slots",
    "num_programs",
    "merge",
    "pv_via_smem",
    "interpret",
  ),
)
def planned_decode_mosaic(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  plan: DecodePlan,
  *,
  scale: float,
  sliding_window: int | None,
  logit_soft_cap: float | None,
  kv_tile: int = 64,
  num_slots: int | None = None,
  num_programs: int | None = None,
  merge: str = "triton",
  pv_via_smem: bool | None = None,
  interpret=False,
):
  """Decode attention by the chunks of ``plan``; same result as ``planned.planned_decode``.

  Args:
    q: [batch, num_q_heads, head_dim], bf16 or f16.
    k_blocks, v_blocks: [num_kv_heads, num_blocks, block_size, head_dim], q's dtype.
    block_table: i32[batch, max_blocks] (-1 where unused).
    lengths: i32[batch] (the lengths the plan was built from).
    plan: a DecodePlan for this batch (checked by the caller, kernels.gpu.paged_attention).
    kv_tile: K/V tokens per step (64 or 128; best a divisor of ``plan.kv_tile``, so no
      step straddles two chunks: one that does is read by both and masked, still right).
    num_slots: shared-memory ring depth (>= 2); None: :func:`default_num_slots`.
    num_programs: None: one CUDA block per (KV head, chunk) unit of work. An int: a
      persistent grid of that many blocks (at most the units), block ``p`` taking units
      ``p, p + num_programs, ...`` (chunk-major), its producer copying the next unit's
      K/V while the consumer finishes the last, so a block's start costs no idle reads.
    merge: how each sequence's chunks are combined: "triton" (``planned._merge_row`` in a
      Pallas Triton kernel, one program per (query head, sequence)) or "xla" (segment
      max and sums over the chunks, no Pallas Triton at all).
    pv_via_smem: how ``P V`` is issued, as in ``prefill_mosaic.paged_prefill_mosaic``
      (None: P in registers on the GPU, through shared memory in interpret mode, which
      supports only that).
    interpret: False, or ``plgpu.InterpretGPUParams()`` to run on CPU.

  Returns:
    [batch, num_q_heads, head_dim] in q.dtype (zeros for a sequence of length 0).

  Raises:
    ValueError: inputs the kernel does not support (the Triton planned decode,
      ``BlockSizes(decode_kernel="triton")``, takes them), or a ring that does not fit.
  """
  batch, num_q_heads, head_dim = q.shape
  num_kv_heads, num_blocks, block_size, _ = k_blocks.shape
  group = num_q_heads // num_kv_heads
  why = unsupported_reason(q.dtype, k_blocks.dtype, head_dim, block_size, group)
  if why is None and v_blocks.dtype != k_blocks.dtype:
    why = f"V {v_blocks.dtype.name} unlike K {k_blocks.dtype.name}"
  if why is not None:
    raise ValueError(
      f"the Mosaic GPU decode does not support {why}; the Triton planned decode does "
      "(BlockSizes(decode_kernel='triton' or 'auto'))"
    )
  if merge not in MERGES:
    raise ValueError(f"the Mosaic GPU decode's merge must be one of {MERGES}, got {merge!r}")
  if kv_tile not in KV_TILES:
    raise ValueError(f"the Mosaic GPU decode's kv_tile must be one of {KV_TILES}, got {kv_tile}")
  itemsize = q.dtype.itemsize
  pv_via_smem = bool(interpret) if pv_via_smem is None else pv_via_smem
  if num_slots is None:
    num_slots = default_num_slots(head_dim, itemsize, kv_tile, pv_via_smem)
  need = smem_bytes(head_dim, itemsize, kv_tile, num_slots, pv_via_smem)
  if num_slots < 2 or need > SMEM_LIMIT_BYTES:
    raise ValueError(
      f"the Mosaic GPU decode with head_dim {head_dim}, {q.dtype.name}, kv_tile {kv_tile} "
      f"and {num_slots} slots needs {need} bytes of shared memory (at most "
      f"{SMEM_LIMIT_BYTES} on an sm_90 SM) and >= 2 slots"
    )
  rows = -(-group // 8) * 8  # the group's rows, padded to the 8-row TMA granule
  num_chunks = plan.chunk_seq.shape[0]
  block_table = block_table.astype(jnp.int32)
  lengths = lengths.astype(jnp.int32)
  q_in = q.reshape(batch, num_kv_heads, group, head_dim)
  if rows != group:
    q_in = jnp.pad(q_in, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
  q_in = q_in.reshape(batch * num_kv_heads * rows, head_dim)
  step = lengths // kv_tile
  if sliding_window is None:
    lo = jnp.zeros_like(lengths)
  else:
    lo = jnp.maximum(lengths - sliding_window, 0)
  edges = [build_step(x, block_table, step, lo, lengths, kv_tile) for x in (k_blocks, v_blocks)]
  if sliding_window is not None:
    edges += [
      build_step(x, block_table, lo // kv_tile, lo, lengths, kv_tile) for x in (k_blocks, v_blocks)
    ]
  num_units = num_kv_heads * num_chunks
  programs = num_units if num_programs is None else max(1, min(num_programs, num_units))
  kernel = functools.partial(
    _kernel,
    rows=rows,
    store_rows=group if group % 4 == 0 else rows,
    kv_tile=kv_tile,
    num_slots=num_slots,
    num_programs=programs,
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    pv_via_smem=pv_via_smem,
  )
  n = num_chunks * num_kv_heads * rows
  o, m, den = plgpu.kernel(
    kernel,
    out_type=(
      jax.ShapeDtypeStruct((n, head_dim), jnp.float32),
      jax.ShapeDtypeStruct((n,), jnp.float32),
      jax.ShapeDtypeStruct((n,), jnp.float32),
    ),
    grid=(programs,),
    grid_names=("programs",),
    num_threads=2,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
    interpret=interpret or None,
  )(
    plan.chunk_seq,
    plan.chunk_start,
    plan.chunk_end,
    lengths,
    block_table,
    q_in,
    k_blocks,
    v_blocks,
    *edges,
  )
  if merge == "xla":
    out = _merge_xla(plan, o, m, den, batch, num_kv_heads, group, rows, head_dim)
    return out.astype(q.dtype)
  out = pl.pallas_call(
    functools.partial(
      _merge_all_kernel, num_q_heads=num_q_heads, head_dim=head_dim, group=group, rows=rows
    ),
    grid=(num_q_heads, batch),
    out_shape=jax.ShapeDtypeStruct((batch * num_q_heads * head_dim,), q.dtype),
    compiler_params=pltriton.CompilerParams(
      num_warps=_planned.MERGE_NUM_WARPS, num_stages=_planned.MERGE_NUM_STAGES
    ),
    interpret=bool(interpret),
    name="paxcache_mosaic_decode_merge",
  )(
    plan.seq_first_chunk,
    plan.seq_num_chunks,
    o,
    m,
    den,
  )
  return out.reshape(batch, num_q_heads, head_dim)
