"""Compile the TPU kernels for real TPU chips on a machine without one (ahead of time).

With ``libtpu`` installed (the version ``jax[tpu]`` pins: 0.0.48.* for jax 0.11.2), JAX
compiles for a TPU topology on any host: ``jax.experimental.topologies`` describes the
chips, and ``jax.jit(f).trace(<ShapeDtypeStructs on a topology device>).lower(...)
.compile()`` runs the whole TPU compiler, Mosaic's passes included (layouts, tiling, the
VMEM and SMEM allocation). ``jax.export`` stops at the MLIR a compile starts from, so a
kernel that exports can still fail here (a window too big for VMEM, say: the tests keep
such a kernel as a negative control).

  python -m kernels.tpu.aot --topology v5e:2x2 --topology v6e:2x2

compiles every configuration of :func:`shipped_cases` for each topology, prints one JSON
line per (topology, case) and exits with status 1 if any fails (``--kernel decode`` or
``--case NAME`` for fewer; the tests run one process per topology and kernel). Run it in its
own process:
it sets the environment libtpu needs (and ``JAX_PLATFORMS=cpu``, so that libtpu does not
look for a chip) before JAX starts a backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

TOPOLOGIES = ("v5e:2x2", "v6e:2x2")

_ENV = {
  # libtpu, on a host with no TPU: one local worker, no metadata server, CPU as JAX's
  # default platform (the topology is asked for by name, not found).
  "TPU_WORKER_HOSTNAMES": "localhost",
  "TPU_SKIP_MDS_QUERY": "1",
  "JAX_PLATFORMS": "cpu",
  # libtpu takes /tmp/libtpu_lockfile so that two processes do not drive one chip; there
  # is no chip here, and the tests (two pytest-xdist workers) compile in two processes at
  # once: without this the second fails with "Internal error when accessing libtpu
  # multi-process lockfile".
  "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


@dataclasses.dataclass(frozen=True)
class Case:
  """One kernel configuration: ``batch`` sequences of up to ``context`` tokens (the ragged
  kernel with 64 query tokens). Shapes, not values, decide what compiles; the context sets
  the block table's width and so the chunk sizes the kernels pick."""

  name: str
  kernel: str  # "decode", "ragged" or "cascade" (kernels.tpu.cascade: batch / 4 groups of 4
  # rows sharing half the context)
  block_size: int
  head_dim: int
  kv_dtype: str
  num_q_heads: int = 32
  num_kv_heads: int = 8
  window_and_cap: bool = False  # sliding_window=64, logit_soft_cap=30.0
  block_sizes: tuple = ()  # (field, value) pairs of kernels.tpu.BlockSizes
  batch: int = 8
  context: int = 4096
  q_dtype: str | None = None  # None: kv_dtype (8-bit K/V need a float q)
  lane_dense: bool = False  # the pool in rows of 128 (head_dim 32 or 64; kernels._layout)


def shipped_cases() -> list[Case]:
  """Every configuration the TPU backend accepts, covered value by value: both kernels at
  each block size (8 only for float32: bf16 blocks are multiples of 16), head_dim 128 and
  256 (head_dim must be a multiple of 128 on this backend; a lane-padded pool of 80, 96,
  112 or 192 reaches the kernels as one of these) and 64 or 32 in a lane-dense pool (rows
  of 128 lanes), bf16, float32 and 8-bit K/V, cascade attention, with and
  without sliding window + soft cap, MHA / GQA / MQA head layouts, and the
  ``BlockSizes`` knobs that change the kernel (one KV head per step, two cores, a batch
  split by the SMEM budget, one-block chunks, a query tile, decodes kept in the ragged
  kernel). A ragged case compiles both of its launches (decode kernel for the decodes,
  ragged kernel with prefill-sized tiles) unless ``split_decode`` is off."""
  cases = []
  for kernel in ("decode", "ragged"):
    cases += [
      Case(f"{kernel}-bs8-f32-mqa", kernel, 8, 128, "float32", 8, 1),
      Case(f"{kernel}-bs16-bf16", kernel, 16, 128, "bfloat16"),
      Case(f"{kernel}-bs16-d256-f32-window", kernel, 16, 256, "float32", window_and_cap=True),
      Case(f"{kernel}-bs32-bf16-window", kernel, 32, 128, "bfloat16", window_and_cap=True),
      Case(f"{kernel}-bs64-d256-bf16-gqa2", kernel, 64, 256, "bfloat16", 16, 8),
      Case(f"{kernel}-bs128-f32-window", kernel, 128, 128, "float32", window_and_cap=True),
      Case(f"{kernel}-bs256-bf16-mha", kernel, 256, 128, "bfloat16", 8, 8),
    ]
  bf16 = dict(block_size=16, head_dim=128, kv_dtype="bfloat16")
  cases += [
    # The benchmark shape of docs/tpu.md.
    Case("decode-bs16-bf16-64x8192", "decode", **bf16, batch=64, context=8192),
    Case("decode-bs16-bf16-1head-2cores", "decode", **bf16,
         block_sizes=(("kv_heads_per_step", 1), ("num_cores", 2))),
    # A budget of two sequences' table rows: the batch of 8 runs as 4 calls.
    Case("decode-bs16-bf16-smem-split", "decode", **bf16,
         block_sizes=(("smem_budget_bytes", 2 * 1100),)),
    Case("decode-bs16-bf16-1block-chunks", "decode", **bf16,
         block_sizes=(("blocks_per_chunk", 1),)),
    Case("ragged-bs16-bf16-qtile32", "ragged", **bf16, block_sizes=(("queries_per_tile", 32),)),
    # Decodes kept in the ragged kernel's tiles (one launch, ~128-row tiles).
    Case("ragged-bs16-bf16-mixed", "ragged", **bf16, block_sizes=(("split_decode", False),)),
  ]  # fmt: skip
  # 8-bit K/V with float32 scales (block_size a multiple of 128, kernels/tpu/_config.py):
  # bf16 q over int8 and e4m3 pools, and f32 q with a window and soft cap.
  for kernel in ("decode", "ragged"):
    cases += [
      Case(f"{kernel}-bs128-int8", kernel, 128, 128, "int8", q_dtype="bfloat16"),
      Case(f"{kernel}-bs256-fp8-window", kernel, 256, 128, "float8_e4m3fn", q_dtype="float32",
           window_and_cap=True),
    ]  # fmt: skip
  # Cascade attention (decode with a shared prefix): its two decode-kernel calls (the shared
  # part with members x query heads as the q tile's rows, the own part from a first key)
  # and the merge. The window is refused for cascade; the cap is kept.
  # head_dim 64 in lane-dense pools (two tokens a 128-lane row, kernels._layout): bf16
  # blocks are multiples of 32 (16 rows, one bf16 sublane tile), float32 of 16; SmolLM2's
  # 9 / 3 heads and Llama-3.2-1B's 32 / 8.
  for kernel in ("decode", "ragged", "cascade"):
    cases += [
      Case(f"{kernel}-bs32-d64-bf16-dense", kernel, 32, 64, "bfloat16", lane_dense=True),
      Case(f"{kernel}-bs16-d64-f32-dense-9x3-cap", kernel, 16, 64, "float32", 9, 3,
           window_and_cap=True, lane_dense=True),
    ]  # fmt: skip
  cases += [
    Case("decode-bs128-d64-bf16-dense-64x8192", "decode", 128, 64, "bfloat16", batch=64,
         context=8192, lane_dense=True),
    Case("ragged-bs64-d32-bf16-dense-window", "ragged", 64, 32, "bfloat16", window_and_cap=True,
         lane_dense=True),
  ]  # fmt: skip
  cases += [
    Case("cascade-bs16-bf16", "cascade", **bf16),
    Case("cascade-bs8-f32-mqa-cap", "cascade", 8, 128, "float32", 8, 1, window_and_cap=True),
    Case("cascade-bs128-int8", "cascade", 128, 128, "int8", q_dtype="bfloat16"),
  ]
  return cases


def _prepare_env() -> None:
  for key, value in _ENV.items():
    os.environ.setdefault(key, value)


def topology_device(topology: str):
  """The first device of a TPU ``topology`` ("v5e:2x2", ...), described, not attached."""
  _prepare_env()
  from jax.experimental import topologies

  return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]


def compile_case(case: Case, device) -> dict:
  """Compiles ``case`` for ``device``; returns a JSON-able row (``ok``, ``seconds``,
  ``error``, whether the compiled module holds the Mosaic custom call)."""
  import jax
  import jax.numpy as jnp

  from kernels import tpu

  batch, tokens = case.batch, 64
  blocks_per_seq = -(-case.context // case.block_size)
  sharding = jax.sharding.SingleDeviceSharding(device)

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)

  num_blocks = batch * blocks_per_seq
  pool = (case.num_kv_heads, num_blocks, case.block_size, case.head_dim)
  if case.lane_dense:
    from kernels import _layout

    pool = _layout.lane_dense_shape(*pool, jnp.dtype(case.kv_dtype))
  k = spec(pool, case.kv_dtype)
  table = spec((batch, blocks_per_seq), jnp.int32)
  lengths = spec((batch,), jnp.int32)
  kw = dict(block_sizes=tpu.BlockSizes(**dict(case.block_sizes)) if case.block_sizes else None)
  if case.lane_dense:
    kw.update(lane_dense=True)
  if case.window_and_cap:
    kw.update(logit_soft_cap=30.0)
    if case.kernel != "cascade":
      kw.update(sliding_window=64)
  rows = tokens if case.kernel == "ragged" else batch
  q = spec((rows, case.num_q_heads, case.head_dim), case.q_dtype or case.kv_dtype)
  args = [q, k, k, table, lengths]
  if case.kernel == "ragged":
    args.append(spec((batch + 1,), jnp.int32))
  scales = ()
  if case.kv_dtype in ("int8", "float8_e4m3fn"):
    s = spec((case.num_kv_heads, num_blocks, case.block_size), jnp.float32)
    scales = (s, s)

  attention = tpu.paged_attention
  if case.kernel == "cascade":
    from types import SimpleNamespace

    from kernels.tpu.cascade import cascade_attention

    groups = batch // 4
    # The plan's arrays (group_table, group_lens, group_rows, row_starts) as four arguments.
    args += [
      spec((groups, blocks_per_seq // 2), jnp.int32),
      spec((groups,), jnp.int32),
      spec((groups, 4), jnp.int32),
      spec((batch,), jnp.int32),
    ]

    def attention(q, k, v, t, n, gt, gl, gr, rs, **options):
      plan = SimpleNamespace(group_table=gt, group_lens=gl, group_rows=gr, row_starts=rs)
      return cascade_attention(q, k, v, t, n, plan, **options)

  def fn_body(*a):
    if scales:  # the last two arguments: k_scales, v_scales
      return attention(*a[:-2], k_scales=a[-2], v_scales=a[-1], **kw)
    return attention(*a, **kw)

  args += list(scales)
  fn = jax.jit(fn_body)
  row = dict(case=case.name, topology=str(getattr(device, "device_kind", device)))
  t0 = time.perf_counter()
  try:
    compiled = fn.trace(*args).lower(lowering_platforms=("tpu",)).compile()
  except Exception as e:  # noqa: BLE001  (every failure is reported, not raised)
    return dict(row, ok=False, seconds=time.perf_counter() - t0, error=str(e)[:2000])
  text = compiled.as_text()
  return dict(
    row,
    ok=True,
    seconds=time.perf_counter() - t0,
    mosaic="tpu_custom_call" in text,
    error=None,
  )


def pool_relayout(
  device,
  *,
  head_dim: int,
  num_blocks: int = 4096,
  kv_dtype="bfloat16",
  block_size: int = 16,
  lane_dense: bool = False,
) -> dict:
  """Why the TPU backend takes only head_dim multiples of 128 in the plain layout: compiles
  one decode call on a pool ``[8, num_blocks, block_size, head_dim]`` (32 query heads,
  batch 8) with the backend's head_dim check bypassed, and reports XLA's default layout of
  the pool (the layout any array of that shape has on the device, hence the layout a cache
  would have) and whether the compiled module copies the pool before the kernel (a
  whole-pool relayout on every call: the Mosaic kernel takes its HBM operands row-major).
  ``lane_dense``: the same pool in rows of 128 (``kernels._layout``, head_dim 32 or 64),
  the backend's checks kept.

  Returns ``{"layout": "{3,2,1,0:T(8,128)(2,1)}" ..., "row_major": bool, "pool_copies":
  int}``: ``pool_copies`` counts copy instructions whose result has the pool's shape.
  """
  import re

  import jax
  import jax.numpy as jnp

  from kernels import _layout
  from kernels.tpu import decode

  sharding = jax.sharding.SingleDeviceSharding(device)
  shape = (8, num_blocks, block_size, head_dim)
  if lane_dense:
    shape = _layout.lane_dense_shape(*shape, jnp.dtype(kv_dtype))
  kv = jax.ShapeDtypeStruct(shape, jnp.dtype(kv_dtype), sharding=sharding)
  q = jax.ShapeDtypeStruct((8, 32, head_dim), jnp.dtype(kv_dtype), sharding=sharding)
  table = jax.ShapeDtypeStruct((8, 64), jnp.int32, sharding=sharding)
  lengths = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=sharding)
  check = decode._config.check_shapes
  if not lane_dense:
    decode._config.check_shapes = lambda *a, **k: None  # the head_dim check, for this trace
  try:
    decode_call = functools.partial(decode.paged_attention_decode, lane_dense=lane_dense)
    lowered = jax.jit(decode_call).trace(q, kv, kv, table, lengths)
  finally:
    decode._config.check_shapes = check
  text = lowered.lower(lowering_platforms=("tpu",)).compile().as_text()
  dims = r"\[" + ",".join(map(str, shape)) + r"\]"
  layout = re.search(dims + r"(\{[^}]*\})", text.splitlines()[0]).group(1)
  copies = sum(
    1 for line in text.splitlines() if re.search(r"= \S*" + dims + r"\S* copy(-start)?\(", line)
  )
  return dict(layout=layout, row_major=layout.startswith("{3,2,1,0"), pool_copies=copies)


def write_copies(
  device,
  *,
  head_dim: int = 128,
  block_size: int = 16,
  num_blocks: int = 4096,
  kv_dtype="bfloat16",
  lane_dense: bool = False,
  with_attention: bool = True,
  lane_padded: bool = False,
) -> dict:
  """Whether writing new tokens' K/V copies the pool on TPU: compiles ``kernels.write_kv``
  (``write_kv_quantized`` for 8-bit K/V, with its scale pools) of 64 tokens into donated
  pools ``[8, num_blocks, block_size, head_dim]`` (lane-dense: in rows of 128), followed,
  with ``with_attention``, by the decode kernel over the written pools, as one step of a
  model does. ``lane_padded`` (a head_dim that is not a multiple of 128): pools in rows of
  head_dim rounded up to 128, written by ``kernels.write_kv(..., lane_padded=True)`` and
  read as ``kernels.paged_attention(..., lane_padded=True)`` does on TPU (q padded, the
  decode kernel, the output cut, inside the same jit). Returns ``{"pool_copies": int,
  "scale_copies": int}``: copy instructions whose result has a pool's (or a scale pool's)
  shape."""
  import re

  import jax
  import jax.numpy as jnp

  import kernels
  from kernels import _layout
  from kernels.tpu import decode

  sharding = jax.sharding.SingleDeviceSharding(device)
  dtype = jnp.dtype(kv_dtype)
  shape = (8, num_blocks, block_size, head_dim)
  if lane_dense:
    shape = _layout.lane_dense_shape(*shape, dtype)
  if lane_padded:
    shape = (*shape[:3], _layout.padded_width(head_dim))
  quantized = kernels.is_quantized(dtype)

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)

  kv = spec(shape, dtype)
  scales = (spec(shape[:3], jnp.float32),) * 2 if quantized else ()
  q_dtype = jnp.bfloat16 if quantized else dtype
  new = spec((64, 8, head_dim), q_dtype)
  slots = spec((64,), jnp.int32)
  q = spec((8, 32, head_dim), q_dtype)
  table = spec((8, 64), jnp.int32)
  lengths = spec((8,), jnp.int32)

  def step(k, v, *rest):
    sc, (k_new, v_new, slots, q, table, lengths) = rest[: len(scales)], rest[len(scales) :]
    if quantized:
      k, v, ks, vs = kernels.write_kv_quantized(k, v, *sc, k_new, v_new, slots)
      extra = dict(k_scales=ks, v_scales=vs)
      out = (k, v, ks, vs)
    else:
      kw = dict(lane_padded=True) if lane_padded else dict(lane_dense=lane_dense)
      k, v = kernels.write_kv(k, v, k_new, v_new, slots, **kw)
      extra, out = {}, (k, v)
    if with_attention and lane_padded:
      # What kernels.paged_attention(..., lane_padded=True) does on the TPU backend (its
      # backend check wants a TPU device; this compiles for one from a CPU host).
      qp, scale, real = _layout.padded_query(q, k, None, False, "write_copies")
      out += (decode.paged_attention_decode(qp, k, v, table, lengths, scale=scale)[..., :real],)
    elif with_attention:
      out += (
        decode.paged_attention_decode(q, k, v, table, lengths, lane_dense=lane_dense, **extra),
      )
    return out

  donate = tuple(range(2 + len(scales)))
  args = (kv, kv, *scales, new, new, slots, q, table, lengths)
  text = (
    jax.jit(step, donate_argnums=donate)
    .trace(*args)
    .lower(lowering_platforms=("tpu",))
    .compile()
    .as_text()
  )

  def copies(shape):
    dims = r"\[" + ",".join(map(str, shape)) + r"\]"
    return sum(
      1 for line in text.splitlines() if re.search(r"= \S*" + dims + r"\S* copy(-start)?\(", line)
    )

  return dict(pool_copies=copies(shape), scale_copies=copies(shape[:3]) if quantized else 0)


def packed_lanes_dma(device, *, num_blocks: int = 4096) -> dict:
  """Whether two KV heads of head_dim 64 could share the 128 lanes of a VMEM row when
  DMA'd from the one cache layout ``[num_kv_heads, num_blocks, block_size, 64]`` (bf16,
  block 16): compiles a Pallas kernel that copies head 0's and head 1's ``[16, 64]`` slab
  of one block into lanes ``[0, 64)`` and ``[64, 128)`` of one ``[16, 128]`` buffer.

  Returns ``{"ok": bool, "error": str | None, "hbm_tiling": str | None}``: the compile
  error, and the tiling Mosaic gives the HBM slab (from the error's MLIR, when it names
  it): ``(8,128)`` means each 64-wide row of a row-major pool takes 128 lanes in HBM.
  """
  import re

  import jax
  import jax.numpy as jnp
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu

  def kernel(k_hbm, o_ref, buf, sem):
    for head in (0, 1):
      copy = pltpu.make_async_copy(k_hbm.at[head, 0], buf.at[:, pl.ds(64 * head, 64)], sem)
      copy.start()
      copy.wait()
    o_ref[...] = buf[...].astype(jnp.float32)

  def f(k):
    return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
      scratch_shapes=[pltpu.VMEM((16, 128), k.dtype), pltpu.SemaphoreType.DMA(())],
    )(k)

  sharding = jax.sharding.SingleDeviceSharding(device)
  k = jax.ShapeDtypeStruct((8, num_blocks, 16, 64), jnp.bfloat16, sharding=sharding)
  try:
    jax.jit(f).trace(k).lower(lowering_platforms=("tpu",)).compile()
  except Exception as e:  # noqa: BLE001  (the refusal is the result)
    text = str(e)
    found = re.search(
      r"memref<16x64xbf16, #tpu\.tiled<(\([0-9,]+\))[^>]*>, #tpu\.memory_space<hbm>", text
    )
    return dict(ok=False, error=text[:2000], hbm_tiling=found.group(1) if found else None)
  return dict(ok=True, error=None, hbm_tiling=None)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--topology", action="append", help=f"default: {', '.join(TOPOLOGIES)}")
  p.add_argument("--case", action="append", help="only these case names")
  p.add_argument("--kernel", action="append", help="only these kernels (decode, ragged, ...)")
  args = p.parse_args(argv)
  cases = [
    c
    for c in shipped_cases()
    if (not args.case or c.name in args.case) and (not args.kernel or c.kernel in args.kernel)
  ]
  if not cases:
    p.error(f"no shipped case matches --case {args.case} --kernel {args.kernel}")
  _prepare_env()
  failed = 0
  for topology in args.topology or TOPOLOGIES:
    device = topology_device(topology)
    for case in cases:
      row = dict(compile_case(case, device), topology_name=topology)
      failed += not row["ok"]
      print(json.dumps(row), flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
