"""Ragged (chunked) prefill paged attention for Hopper in Pallas Mosaic GPU.

The compute-bound half of ``kernels.paged_attention`` on H100-class GPUs (sm_90): TMA
copies of whole K/V blocks into shared memory, warpgroup matrix products (wgmma) and warp
specialisation. :func:`kernels.gpu.kernel_backend` decides when it runs; the Pallas
Triton kernel in ``prefill.py`` stays the portable one (older GPUs, CPU interpret tests of
every option).

Work split. The ragged batch is cut into tiles of up to 128 consecutive query tokens of
one sequence (``prefill.build_schedule``, heaviest first); one CUDA block takes one
(query head, tile) pair, or with ``tiles_per_block > 1`` that many tiles of one query
head in turn (snake order: a heavy tile with a light one), its K/V ring running on from
one tile into the next. The grid runs the query heads fastest, so the blocks of one GQA
group, which read the same K/V, run side by side and share them in L2.

Inside a block three warpgroups work on one tile:

* warpgroup 2, the producer, walks the tile's K/V steps (``kv_tile`` tokens each). For a
  step it reads the block ids from the block table and issues one TMA copy per cache
  block (or per ``kv_tile`` slice of a block larger than the step) into a ring of
  ``num_slots`` shared-memory slots; K and V have their own "full" barriers, so the
  score product starts as soon as K is in.
* warpgroups 0 and 1, the consumers, take 64 query rows each and run the online softmax
  over the same steps. Each computes ``S = Q K^T`` (wgmma, Q and K from shared memory),
  masks and exponentiates in registers, and accumulates ``P V`` (wgmma, P from
  registers). After a step each arrives on the slot's "free" barriers, which the
  producer waits for before reusing the slot. The two consumers take turns on the tensor
  cores through a two-party rendezvous barrier: while one runs its softmax the other's
  matrix products run, so neither the tensor cores nor the exponentials wait.

Memory safety without masked loads. A TMA copy moves a whole block; it cannot zero the
slots past a sequence's length. Those slots may hold anything (stale values, NaN), and a
NaN there would reach the output through ``0 * NaN`` in ``P V``. So the one K/V step that
contains a sequence's end is not read from the pool: XLA gathers it beforehand into a
small ``tail`` buffer ``[num_kv_heads, batch, kv_tile, head_dim]`` with every slot at or
past the length (and every slot behind an invalid block id) set to zero, and the producer
copies that step from there. Every other step lies wholly inside the sequence, where all
block ids are real. Block ids are clamped into ``[0, num_blocks)`` before they address a
copy, so even a malformed traced table cannot make the kernel read outside the pool
(concrete tables are checked on the host by ``kernels.validate_inputs``).

Query rows are read through TMA as two 64-row windows starting at the tile's first row
rounded down to a multiple of 8 (the tiles are laid out so, by ``build_schedule(align=8)``,
because the swizzled shared-memory layout needs 8-row-aligned copies); rows outside the
tile are computed and dropped, and TMA reads rows past the end of ``q`` as zeros. Only a
warpgroup's own rows are stored: a full 64-row window in one TMA store, a partial one as a
ladder of power-of-two stores (64, 32, ..., 1 rows).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels._quant import is_quantized
from kernels.gpu._softmax import online_softmax_step
from kernels.gpu.prefill import build_schedule

ROWS = 64  # query rows of one consumer warpgroup (the wgmma M dimension)
NUM_CONSUMERS = 2
TILE = ROWS * NUM_CONSUMERS  # query tokens of one CUDA block
# Schedule columns written by prefill.build_schedule; _QSHIFT (0 there) moves a tile's query
# window: its rows are read from q at the output rows plus the shift (the cascade's chunks
# of one group read the same query rows into outputs of their own).
_START, _END, _POS0, _SEQ, _KLEN, _QSHIFT = range(6)

# The shapes this kernel is built for (kernel_backend() sends everything else to Triton).
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
MIN_BLOCK_SIZE = 8  # one 8-row tile of the swizzled shared-memory layout
MAX_TILES_PER_BLOCK = 8  # schedule rows one CUDA block may take (an unrolled loop)


def supports(q_dtype, kv_dtype, head_dim: int, block_size: int) -> bool:
  """Whether this kernel handles the dtypes and sizes (the device is checked elsewhere)."""
  return (
    jnp.dtype(q_dtype) == jnp.dtype(kv_dtype)
    and any(jnp.dtype(q_dtype) == jnp.dtype(d) for d in SUPPORTED_DTYPES)
    and head_dim in SUPPORTED_HEAD_DIMS
    and block_size >= MIN_BLOCK_SIZE
    and block_size & (block_size - 1) == 0
  )


# Shared memory of one SM on sm_90 that a CUDA block may take (227 KiB).
SMEM_LIMIT_BYTES = 232448


def smem_bytes(head_dim: int, itemsize: int, kv_tile: int, num_slots: int, pv_via_smem: bool):
  """Shared memory one CUDA block of the kernel takes (tiles only; barriers are bytes)."""
  q_and_o = 2 * NUM_CONSUMERS * ROWS * head_dim * itemsize
  kv = 2 * num_slots * kv_tile * head_dim * itemsize
  p = NUM_CONSUMERS * ROWS * kv_tile * itemsize if pv_via_smem else 0
  return q_and_o + kv + p


def build_tail(k_blocks, block_table, lengths, kv_tile: int):
  """K (or V) of the K/V step that holds each sequence's end, zero at/past the end.

  Returns [num_kv_heads, batch, kv_tile, head_dim]: row ``r`` of sequence ``b`` is token
  ``(lengths[b] // kv_tile) * kv_tile + r``; rows at or past ``lengths[b]``, or behind a
  block id outside ``[0, num_blocks)`` or past the table, are zero.
  """
  _, num_blocks, block_size, _ = k_blocks.shape
  max_blocks = block_table.shape[1]
  lengths = lengths.astype(jnp.int32)
  tok = (lengths // kv_tile * kv_tile)[:, None] + jnp.arange(kv_tile, dtype=jnp.int32)
  lblk = tok // block_size
  blk = jnp.take_along_axis(block_table, jnp.minimum(lblk, max_blocks - 1), axis=1)
  ok = (tok < lengths[:, None]) & (lblk < max_blocks) & (blk >= 0) & (blk < num_blocks)
  rows = k_blocks[:, jnp.where(ok, blk, 0), tok % block_size]  # [Hkv, B, kv_tile, D]
  return jnp.where(ok[None, :, :, None], rows, jnp.zeros((), k_blocks.dtype))


def _copy_when(pred, src, dst, barrier):
  pl.when(pred)(lambda: plgpu.copy_gmem_to_smem(src, dst, barrier))


def _store_when(pred, src, dst):
  pl.when(pred)(lambda: plgpu.copy_smem_to_gmem(src, dst))


def _kernel(
  # GMEM: whole arrays in GPU global memory; the kernel copies tiles into SMEM with TMA.
  sched_ref,  # GMEM i32[num_tiles, 8]: prefill.build_schedule's rows
  table_ref,  # GMEM i32[batch, max_blocks], -1 where unused
  q_ref,  # GMEM [num_tokens (padded to a multiple of 8), num_q_heads, head_dim]
  k_ref,  # GMEM [num_kv_heads, num_blocks, block_size, head_dim]
  v_ref,  # GMEM [num_kv_heads, num_blocks, block_size, head_dim]
  tail_k_ref,  # GMEM [num_kv_heads, batch, kv_tile, head_dim]: build_tail of K
  tail_v_ref,  # GMEM [num_kv_heads, batch, kv_tile, head_dim]: build_tail of V
  o_ref,  # GMEM [out rows (num_tokens padded to a multiple of 8), num_q_heads, head_dim]
  *lse_refs,  # with_lse only: GMEM f32[num_q_heads, out rows], log2 of each row's sum
  group,
  kv_tile,
  num_slots,
  scale,
  sliding_window,
  logit_soft_cap,
  pv_via_smem,
  tiles_per_block,
  num_groups,
  with_lse,
):
  head_dim = q_ref.shape[2]
  num_blocks, block_size = k_ref.shape[1], k_ref.shape[2]
  max_blocks = table_ref.shape[1]
  dtype = q_ref.dtype
  copies_per_step = max(1, kv_tile // block_size)  # cache-block copies filling one slot

  h = lax.axis_index("heads")
  g = lax.axis_index("tiles")
  wg = lax.axis_index("wg")
  kvh = lax.div(h, jnp.int32(group))
  kv_t = jnp.int32(kv_tile)

  def tile_info(k):
    """Schedule row of this block's ``k``-th tile (``tiles_per_block`` rows, snake order:
    rows g, 2G-1-g, 2G+g, ... for G blocks along "tiles", so a heavy row goes with a light
    one) and its K/V step range: a dict of traced scalars."""
    row = k * num_groups + g if k % 2 == 0 else (k + 1) * num_groups - 1 - g
    start = sched_ref[row, _START]
    end = sched_ref[row, _END]
    pos0 = sched_ref[row, _POS0]
    klen = sched_ref[row, _KLEN]
    # Keys [lo, hi) are seen by some row of the tile; [full_lo, full_hi) by every row.
    pos_last = pos0 + (end - start) - 1
    hi = jnp.clip(pos_last + 1, 0, klen)
    full_hi = jnp.clip(pos0 + 1, 0, hi)
    if sliding_window is None:
      lo = jnp.zeros_like(hi)
      full_lo = lo
    else:
      lo = jnp.clip(pos0 - sliding_window + 1, 0, hi)
      full_lo = jnp.clip(pos_last - sliding_window + 1, 0, hi)
    j0 = lax.div(lo, kv_t)
    j3 = lax.div(hi + kv_t - 1, kv_t)
    j1 = jnp.clip(lax.div(full_lo + kv_t - 1, kv_t), j0, j3)
    j2 = jnp.clip(lax.div(full_hi, kv_t), j1, j3)
    return dict(
      start=start,
      end=end,
      pos0=pos0,
      qshift=sched_ref[row, _QSHIFT],
      seq=sched_ref[row, _SEQ],
      klen=klen,
      j0=j0,
      j1=j1,
      j2=j2,
      j3=j3,
      num_steps=j3 - j0,
      tail_step=jnp.where(lax.rem(klen, kv_t) != 0, lax.div(klen, kv_t), jnp.int32(-1)),
    )

  def body(
    q_smem,  # SMEM [NUM_CONSUMERS, ROWS, head_dim]: each consumer's query window
    k_smem,  # SMEM [num_slots, kv_tile, head_dim]: ring of K steps
    v_smem,  # SMEM [num_slots, kv_tile, head_dim]: ring of V steps
    o_smem,  # SMEM [NUM_CONSUMERS, ROWS, head_dim]: each consumer's output, for TMA stores
    p_smem,  # SMEM [NUM_CONSUMERS, ROWS, kv_tile]: P for the P V wgmma; None unless pv_via_smem
    lse_smem,  # SMEM f32[NUM_CONSUMERS, ROWS]: each consumer's log-sum-exp; None unless with_lse
    q_full,  # barrier [NUM_CONSUMERS]: consumer wg's query window has landed
    k_full,  # barrier [num_slots], copies_per_step arrivals: the slot's K has landed
    v_full,  # barrier [num_slots], copies_per_step arrivals: the slot's V has landed
    k_free,  # barrier [num_slots], NUM_CONSUMERS arrivals: both consumers are done with K
    v_free,  # barrier [num_slots], NUM_CONSUMERS arrivals: both consumers are done with V
    turn,  # barrier, NUM_CONSUMERS arrivals: the consumers' rendezvous on the tensor cores
  ):
    def rendezvous():
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    @pl.when(wg == NUM_CONSUMERS)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def block_ids(seq, j):
        ids = []
        for c in range(copies_per_step):
          lblk = lax.div(j * kv_t, jnp.int32(block_size)) + c
          blk = table_ref[seq, jnp.minimum(lblk, max_blocks - 1)]
          ids.append(jnp.clip(blk, 0, num_blocks - 1))
        return ids

      def issue(ref, tail_ref, smem, barrier, j, ids, t):
        # Exactly one copy per piece whichever source it takes, so the barrier always
        # counts copies_per_step arrivals.
        is_tail = j == t["tail_step"]
        seq = t["seq"]
        for c, blk in enumerate(ids):
          if block_size >= kv_tile:
            off = pl.multiple_of(lax.rem(j, jnp.int32(block_size // kv_tile)) * kv_t, kv_tile)
            src = ref.at[kvh, blk, pl.ds(off, kv_tile)]
            tail_src = tail_ref.at[kvh, seq]
            dst = smem
          else:
            src = ref.at[kvh, blk]
            tail_src = tail_ref.at[kvh, seq, pl.ds(c * block_size, block_size)]
            dst = smem.at[pl.ds(c * block_size, block_size)]
          _copy_when(is_tail, tail_src, dst, barrier)
          _copy_when(~is_tail, src, dst, barrier)

      # The ring's step counter runs on across the block's tiles: the next tile's first
      # K/V copies start as soon as slots free up, while the consumers finish this one.
      done = jnp.int32(0)  # steps issued by the tiles before this one
      for k in range(tiles_per_block):
        t = tile_info(k)

        @pl.loop(0, t["num_steps"])
        def _step(i, t=t, done=done):
          j = t["j0"] + i
          n = done + i
          slot = lax.rem(n, jnp.int32(num_slots))
          ids = block_ids(t["seq"], j)  # loaded before the waits, hiding their latency

          @pl.when(n >= num_slots)
          def _():
            plgpu.barrier_wait(k_free.at[slot])

          issue(k_ref, tail_k_ref, k_smem.at[slot], k_full.at[slot], j, ids, t)

          @pl.when(n >= num_slots)
          def _():
            plgpu.barrier_wait(v_free.at[slot])

          issue(v_ref, tail_v_ref, v_smem.at[slot], v_full.at[slot], j, ids, t)

        done = done + t["num_steps"]

      # Wait for the consumers to release the last slots: the block's shared memory must
      # outlive every read of it (and each barrier phase is observed once).
      @pl.loop(jnp.maximum(done - num_slots, 0), done)
      def _drain(i):
        slot = lax.rem(i, jnp.int32(num_slots))
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])

    @pl.when(wg < NUM_CONSUMERS)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      col = plgpu.broadcasted_iota(jnp.int32, (ROWS, kv_tile), 1, layout=plgpu.Layout.WGMMA)

      def step(j, carry, masked, t, done, row_pos):
        slot = lax.rem(done + j - t["j0"], jnp.int32(num_slots))
        plgpu.barrier_wait(k_full.at[slot])

        def scores(acc_ref):
          plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.at[slot].transpose((1, 0)))
          rendezvous()  # the other consumer's softmax runs while this product does
          return acc_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((ROWS, kv_tile), jnp.float32))  # f32[ROWS, kv_tile]
        plgpu.barrier_arrive(k_free.at[slot])
        vis = None  # a step every row sees in full
        if masked:  # bool[ROWS, kv_tile]
          key = j * kv_t + col
          vis = (key <= row_pos) & (key < t["klen"])
          if sliding_window is not None:
            vis &= key > row_pos - sliding_window
        (acc, m, den), p = online_softmax_step(
          carry, s, scale=scale, logit_soft_cap=logit_soft_cap, mask=vis
        )
        p = p.astype(dtype)
        plgpu.barrier_arrive(turn)  # softmax done: hand the tensor cores over
        plgpu.barrier_wait(v_full.at[slot])
        plgpu.barrier_wait(turn)

        if pv_via_smem:  # P through shared memory into a fresh accumulator, then added

          def values(acc_ref):
            plgpu.wgmma(acc_ref, p_smem.at[wg], v_smem.at[slot])
            return acc_ref[...]

          p_smem.at[wg][...] = p
          plgpu.commit_smem()
          acc = acc + pl.run_scoped(values, plgpu.ACC((ROWS, head_dim), jnp.float32))
        else:  # P from registers, accumulating into acc's registers

          def values(acc_ref):
            plgpu.wgmma(acc_ref, p, v_smem.at[slot])

          acc = pl.run_state(values)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m, den

      def tile(t, done):
        """One schedule row: query window in, online softmax over its steps, rows out.
        ``done``: K/V steps of this block's earlier tiles (the ring's position)."""
        start, end = t["start"], t["end"]
        # The tile lies in the 128-row window from `start` rounded down to a multiple of 8
        # (build_schedule(align=8)); this warpgroup takes its 64-row half. TMA reads past
        # the end of q as zeros; those rows are never stored.
        win = pl.multiple_of(start - lax.rem(start, jnp.int32(8)) + wg * ROWS, 8)
        row0 = jnp.maximum(start, win)  # this warpgroup's rows: [row0, row_end)
        row_end = jnp.minimum(end, win + ROWS)

        qwin = pl.multiple_of(win + t["qshift"], 8)

        def load_q():
          plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(qwin, ROWS), h], q_smem.at[wg], q_full.at[wg])
          plgpu.barrier_wait(q_full.at[wg])

        if tiles_per_block == 1:
          load_q()
        else:  # the padding rows of a multi-tile block are empty: no query to read
          pl.when(end > start)(load_q)
        # Query position of each window row (rows outside [row0, row_end) are dropped).
        row_pos = (t["pos0"] + win - start) + plgpu.broadcasted_iota(
          jnp.int32, (ROWS, kv_tile), 0, layout=plgpu.Layout.WGMMA
        )
        # acc f32[ROWS, head_dim] (sum of p @ v), m and den f32[ROWS] (running max in log2
        # units, running sum of p), in the registers' wgmma layout.
        acc = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        m = plgpu.layout_cast(
          jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
        )
        den = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        # Consumer 1 starts one rendezvous behind consumer 0, so their turns alternate.
        pl.when(wg == 1)(rendezvous)
        carry = (acc, m, den)
        kw = dict(t=t, done=done, row_pos=row_pos)
        masked = functools.partial(step, masked=True, **kw)
        carry = lax.fori_loop(t["j0"], t["j1"], masked, carry)
        carry = lax.fori_loop(t["j1"], t["j2"], functools.partial(step, masked=False, **kw), carry)
        carry = lax.fori_loop(t["j2"], t["j3"], masked, carry)
        pl.when(wg == 0)(rendezvous)
        acc, m, den = carry
        if with_lse:  # log2 of the row's sum of exp2(logits): m + log2(den), -inf if empty
          lse_smem.at[wg][...] = m + jnp.log(den) * (1.0 / math.log(2.0))
        den = jnp.where(den > 0, den, 1.0)
        out = acc / lax.broadcast_in_dim(den, acc.shape, [0])
        o_smem.at[wg][...] = out.astype(dtype)
        plgpu.commit_smem()
        # Store rows [row0, row_end): the window's rows from row0 - win on.
        n = jnp.maximum(row_end - row0, 0)
        off = row0 - win
        size = ROWS
        while size >= 1:
          piece = lax.bitwise_and(n, jnp.int32(size))  # size rows, or none
          _store_when(piece != 0, o_smem.at[wg, pl.ds(off, size)], o_ref.at[pl.ds(row0, size), h])
          off = off + piece
          row0 = row0 + piece
          size //= 2
        if with_lse:  # the whole 64-row window: the caller's tiles own whole windows
          plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_refs[0].at[h, pl.ds(win, ROWS)])
        plgpu.wait_smem_to_gmem(0)  # o_smem (and q_smem) are free for the next tile

      done = jnp.int32(0)
      for k in range(tiles_per_block):
        t = tile_info(k)
        tile(t, done)
        done = done + t["num_steps"]

  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  pl.run_scoped(
    body,
    plgpu.SMEM((NUM_CONSUMERS, ROWS, head_dim), dtype, transforms=swizzled),
    plgpu.SMEM((num_slots, kv_tile, head_dim), dtype, transforms=swizzled),
    plgpu.SMEM((num_slots, kv_tile, head_dim), dtype, transforms=swizzled),
    plgpu.SMEM((NUM_CONSUMERS, ROWS, head_dim), dtype),
    plgpu.SMEM((NUM_CONSUMERS, ROWS, kv_tile), dtype, transforms=swizzled) if pv_via_smem else None,
    plgpu.SMEM((NUM_CONSUMERS, ROWS), jnp.float32) if with_lse else None,
    plgpu.Barrier(num_barriers=NUM_CONSUMERS),
    plgpu.Barrier(num_arrivals=copies_per_step, num_barriers=num_slots),
    plgpu.Barrier(num_arrivals=copies_per_step, num_barriers=num_slots),
    plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=num_slots),
    plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=num_slots),
    plgpu.Barrier(num_arrivals=NUM_CONSUMERS),
    collective_axes="wg",
  )


@functools.partial(
  jax.jit,
  static_argnames=(
    "scale",
    "sliding_window",
    "logit_soft_cap",
    "kv_tile",
    "num_slots",
    "pv_via_smem",
    "tiles_per_block",
    "interpret",
  ),
)
def paged_prefill_mosaic(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  cu_q_lens,
  *,
  scale: float,
  sliding_window: int | None,
  logit_soft_cap: float | None,
  kv_tile: int = 128,
  num_slots: int = 2,
  pv_via_smem: bool | None = None,
  tiles_per_block: int = 1,
  interpret=False,
):
  """Same arguments and result as ``prefill.paged_prefill`` (no BlockSizes).

  Args:
    q: [num_tokens, num_q_heads, head_dim], bf16 or f16.
    k_blocks, v_blocks: [num_kv_heads, num_blocks, block_size, head_dim], q's dtype.
    block_table: i32[batch, max_blocks] (-1 where unused).
    lengths: i32[batch], including this call's queries.
    cu_q_lens: i32[batch + 1].
    kv_tile: K/V tokens per step (64 or 128).
    num_slots: shared-memory ring depth of the K/V steps (>= 2).
    pv_via_smem: how ``P V`` is issued. False (the GPU default): P stays in registers
      as the wgmma A operand and the product accumulates into the output's registers.
      True: P is written to shared memory and multiplied into a fresh accumulator that
      is then added. GPU interpret mode supports only the second (its wgmma reads A
      from shared memory and it cannot run ``pl.run_state``), so None picks True there.
      Both are checked on the H100 (experiments/bench/gpu_check.py).
    tiles_per_block: schedule rows (128-row query tiles) one CUDA block works through in
      turn, 1 (the default: one tile per block) to 8. With more, the K/V ring runs on
      from one tile into the next (the producer fetches the next tile's first steps while
      the consumers finish this one), so the per-block costs (barrier set-up, pipeline
      fill and drain, launch) are paid once per ``tiles_per_block`` tiles; rows are dealt
      in snake order (block g of G takes rows g, 2G-1-g, 2G+g, ...) so that a heavy tile
      and a light one share a block, and the padding rows added to fill the last blocks
      (and the schedule's own empty rows) read no query. For ragged batches of short
      prompts, whose tiles have few steps each.
    interpret: False, or ``plgpu.InterpretGPUParams()`` to run on CPU.

  Returns:
    [num_tokens, num_q_heads, head_dim] in q.dtype; rows outside every sequence are 0.
  """
  if is_quantized(k_blocks.dtype):
    raise ValueError(
      f"the Mosaic GPU prefill does not read 8-bit K/V (k_blocks "
      f"{jnp.dtype(k_blocks.dtype).name}); kernels.gpu.kernel_backend sends them to the "
      "Triton prefill (BlockSizes(prefill_kernel='triton' or 'auto'))"
    )
  num_tokens, num_q_heads, head_dim = q.shape
  if not (isinstance(tiles_per_block, int) and 1 <= tiles_per_block <= MAX_TILES_PER_BLOCK):
    raise ValueError(
      f"tiles_per_block must be an int in [1, {MAX_TILES_PER_BLOCK}], got {tiles_per_block!r}"
    )
  pv_via_smem = bool(interpret) if pv_via_smem is None else pv_via_smem
  need = smem_bytes(head_dim, q.dtype.itemsize, kv_tile, num_slots, pv_via_smem)
  if need > SMEM_LIMIT_BYTES:  # (barriers add ~2 KiB; Mosaic's own check catches the edge)
    raise ValueError(
      f"the Mosaic GPU prefill with head_dim {head_dim}, {q.dtype.name}, kv_tile {kv_tile} "
      f"and {num_slots} slots needs {need} bytes of shared memory, more than the "
      f"{SMEM_LIMIT_BYTES} of an sm_90 SM; use fewer slots or 64-key steps"
    )
  block_table = block_table.astype(jnp.int32)
  lengths = lengths.astype(jnp.int32)
  sched = build_schedule(cu_q_lens, lengths, num_tokens, TILE, sliding_window, align=8)
  num_groups = -(-sched.shape[0] // tiles_per_block)  # CUDA blocks along "tiles"
  extra = num_groups * tiles_per_block - sched.shape[0]
  if extra:  # empty rows (no query rows, no keys): nothing read, nothing stored
    sched = jnp.pad(sched, ((0, extra), (0, 0)))
  # The TMA descriptors of q and the output need their row count a multiple of the
  # 8-row tile; other counts get a few zero rows (the engine's token buckets never do).
  pad = -num_tokens % 8
  q_in = jnp.pad(q, ((0, pad), (0, 0), (0, 0))) if pad else q
  (out,) = run_schedule(
    q_in,
    k_blocks,
    v_blocks,
    block_table,
    lengths,
    sched,
    num_groups=num_groups,
    kv_tile=kv_tile,
    num_slots=num_slots,
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    pv_via_smem=pv_via_smem,
    tiles_per_block=tiles_per_block,
    with_lse=False,
    interpret=interpret,
  )
  return out[:num_tokens] if pad else out


def run_schedule(
  q,
  k_blocks,
  v_blocks,
  block_table,
  lengths,
  sched,
  *,
  num_groups,
  kv_tile,
  num_slots,
  scale,
  sliding_window,
  logit_soft_cap,
  pv_via_smem,
  tiles_per_block,
  with_lse,
  interpret,
  num_out_rows=None,
):
  """The kernel over a given schedule (``build_schedule``'s columns; ``num_groups *
  tiles_per_block`` rows) with ``q``'s rows a multiple of 8: ``(out,)``, or ``(out, lse
  f32[num_q_heads, rows])`` with ``with_lse`` (log2 units: ``log2(sum_k exp2(logit_k))``,
  -inf for a row that sees no key). ``out`` has ``num_out_rows`` rows (a multiple of 8;
  None: q's), and a tile reads its query rows at its output rows plus its ``_QSHIFT``
  column (a multiple of 8; 0 in ``build_schedule``'s rows). With ``with_lse`` each
  consumer stores its whole 64-row window of ``lse``, so every tile must own the 128-row
  window it lies in (tiles start at multiples of 128 and no two share a window), as the
  cascade's shared part lays them out; ``paged_prefill_mosaic``'s schedules need not,
  and it never asks for ``lse``."""
  if with_lse and tiles_per_block != 1:
    # A multi-tile block's padding rows (start = end = 0) would store window 0's lse.
    raise ValueError("run_schedule(with_lse=True) takes one tile per CUDA block")
  num_q_heads = q.shape[1]
  tail_k = build_tail(k_blocks, block_table, lengths, kv_tile)
  tail_v = build_tail(v_blocks, block_table, lengths, kv_tile)
  kernel = functools.partial(
    _kernel,
    group=num_q_heads // k_blocks.shape[0],
    kv_tile=kv_tile,
    num_slots=num_slots,
    scale=scale,
    sliding_window=sliding_window,
    logit_soft_cap=logit_soft_cap,
    pv_via_smem=pv_via_smem,
    tiles_per_block=tiles_per_block,
    num_groups=num_groups,
    with_lse=with_lse,
  )
  rows = q.shape[0] if num_out_rows is None else num_out_rows
  if rows % 8:
    raise ValueError(f"run_schedule needs a multiple of 8 output rows, got {rows}")
  out_type = [jax.ShapeDtypeStruct((rows,) + q.shape[1:], q.dtype)]
  if with_lse:
    out_type.append(jax.ShapeDtypeStruct((num_q_heads, rows), jnp.float32))
  out = plgpu.kernel(
    kernel,
    out_type=tuple(out_type),
    grid=(num_q_heads, num_groups),
    grid_names=("heads", "tiles"),
    num_threads=NUM_CONSUMERS + 1,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
    interpret=interpret or None,
  )(sched, block_table, q, k_blocks, v_blocks, tail_k, tail_v)
  return tuple(out)
