"""The TPU kernels compiled for real chips (v5e, v6e) through libtpu, on this CPU machine.

``kernels.tpu.aot`` runs in a subprocess with libtpu on its path: libtpu is installed
beside the test environment, not in it (README: ``pip install --target .venv/libtpu``),
so that no other JAX process here loads it and looks for a chip. Where it is installed
in the environment itself (``pip install .[tpu]``), that copy is used.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from kernels.tpu import aot

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _libtpu_requirement() -> str:
  """The libtpu pin of jax's ``tpu`` extra (``libtpu==0.0.48.*`` for jax 0.11.2)."""
  for req in importlib.metadata.requires("jax") or ():
    if req.startswith("libtpu") and 'extra == "tpu"' in req:
      return req.split(";")[0].strip()
  return "libtpu"


def _libtpu_path() -> str:
  """'' when libtpu is importable here; else the --target folder holding it; else skip."""
  spec = importlib.util.find_spec("libtpu")
  if spec is not None and spec.origin is not None:  # not a stray folder named libtpu
    return ""
  folder = pathlib.Path(os.environ.get("PAXCACHE_LIBTPU_DIR", pathlib.Path(sys.prefix) / "libtpu"))
  if (folder / "libtpu").is_dir():
    return str(folder)
  # CI installs it (the README's set-up): there a missing libtpu must fail, not skip.
  (pytest.fail if os.environ.get("CI") else pytest.skip)(
    f"libtpu is not installed, so nothing can be compiled for a TPU: run "
    f"`{sys.executable} -m pip install --target {folder} '{_libtpu_requirement()}'` "
    "(the README's set-up does) or set PAXCACHE_LIBTPU_DIR"
  )


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
  extra = _libtpu_path()
  path = os.pathsep.join(p for p in (extra, str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
  env = dict(os.environ, PYTHONPATH=path)
  return subprocess.run(
    [sys.executable, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


_KERNELS = sorted({c.kernel for c in aot.shipped_cases()})


# One test per (topology, kernel), each its own process, so that pytest-xdist's workers
# share the ~13 minutes these compiles take instead of one worker running them all.
@pytest.mark.slow
@pytest.mark.parametrize("kernel", _KERNELS)
@pytest.mark.parametrize("topology", aot.TOPOLOGIES)
def test_every_shipped_tpu_kernel_configuration_compiles_for_v5e_and_v6e(topology, kernel):
  proc = _run(["-m", "kernels.tpu.aot", "--topology", topology, "--kernel", kernel], timeout=900)
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  cases = [c for c in aot.shipped_cases() if c.kernel == kernel]
  failed = [(r["topology_name"], r["case"], r["error"][:300]) for r in rows if not r["ok"]]
  assert not failed, failed
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = {(r["topology_name"], r["case"]) for r in rows}
  assert got == {(topology, c.name) for c in cases}, proc.stderr[-3000:]
  # A Mosaic kernel in every compiled module: the Pallas call reached the TPU compiler.
  assert all(r["mosaic"] for r in rows)
  chip = {"v5e:2x2": "v5", "v6e:2x2": "v6"}[topology]
  assert all(chip in r["topology"].lower() for r in rows), {r["topology"] for r in rows}


def test_shipped_cases_cover_every_accepted_value():
  cases = aot.shipped_cases()
  assert len({c.name for c in cases}) == len(cases)
  for kernel in ("decode", "ragged"):
    mine = [c for c in cases if c.kernel == kernel]
    assert {c.block_size for c in mine} == {8, 16, 32, 64, 128, 256}
    assert {c.head_dim for c in mine if not c.lane_dense} == {128, 256}
    # head_dim 64 in lane-dense pools, bf16 and float32, with and without window + cap.
    dense = [c for c in mine if c.lane_dense]
    assert {c.head_dim for c in dense} >= {64} and {c.kv_dtype for c in dense} == {
      "bfloat16",
      "float32",
    }
    assert {c.window_and_cap for c in dense} == {True, False}
    assert {c.kv_dtype for c in mine} == {"bfloat16", "float32", "int8", "float8_e4m3fn"}
    assert {c.window_and_cap for c in mine} == {True, False}
    assert {c.num_q_heads // c.num_kv_heads for c in mine} >= {1, 2, 4, 8}
  assert {c.head_dim for c in cases if c.lane_dense and c.kernel == "ragged"} == {32, 64}
  assert {c.kv_dtype for c in cases if c.lane_dense and c.kernel == "cascade"} == {
    "bfloat16",
    "float32",
  }
  knobs = {k for c in cases for k, _ in c.block_sizes}
  assert knobs == {
    "kv_heads_per_step",
    "num_cores",
    "smem_budget_bytes",
    "blocks_per_chunk",
    "queries_per_tile",
    "split_decode",
  }


@pytest.mark.slow
def test_compile_runs_the_tpu_compiler_not_only_the_lowering():
  # Negative control: a kernel whose window needs 256 MiB of VMEM exports (lowering
  # only), but the TPU compiler's VMEM allocation refuses it.
  code = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    from jax.experimental import pallas as pl
    from kernels.tpu import aot

    device = aot.topology_device("v5e:2x2")

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...] * 2

    def f(x):
      spec = pl.BlockSpec((4096, 8192), lambda i: (i, 0))
      out = jax.ShapeDtypeStruct(x.shape, x.dtype)
      return pl.pallas_call(kernel, out_shape=out, grid=(2,), in_specs=[spec], out_specs=spec)(x)

    shape = (8192, 8192)
    jax.export.export(jax.jit(f), platforms=["tpu"])(jax.ShapeDtypeStruct(shape, jnp.float32))
    print("exported", flush=True)
    x = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
    try:
      jax.jit(f).trace(x).lower(lowering_platforms=("tpu",)).compile()
      print("compiled")
    except Exception as e:
      print("refused:", str(e)[:300])
    """
  )
  proc = _run(["-c", code], timeout=600)
  assert "exported" in proc.stdout, proc.stderr[-3000:]
  assert "refused:" in proc.stdout and "vmem" in proc.stdout.lower(), proc.stdout + proc.stderr


@pytest.mark.slow
def test_decode_needs_the_vmem_limit_it_sets():
  # The benchmark-shape decode (2,048-token chunks of 8 KV heads: 16 MiB of K/V slots)
  # compiles for v5e under the limit the kernel sets, and not under v5e's default scoped
  # limit of 16 MiB: so the limit is passed to Mosaic, and needed. A 4,096-token chunk
  # (4 heads per step by default) compiles too.
  code = textwrap.dedent(
    """
    import json
    from kernels.tpu import aot

    device = aot.topology_device("v5e:2x2")
    base = dict(kernel="decode", block_size=16, head_dim=128, kv_dtype="bfloat16",
                batch=64, context=8192)
    rows = {}
    for name, knobs in [("default", ()), ("16mib", (("vmem_limit_bytes", 16 << 20),)),
                        ("4096-token-chunks", (("blocks_per_chunk", 256),))]:
      row = aot.compile_case(aot.Case(name, block_sizes=knobs, **base), device)
      rows[name] = dict(ok=row["ok"], error=(row["error"] or "")[:300])
    print(json.dumps(rows))
    """
  )
  proc = _run(["-c", code], timeout=900)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  assert lines, proc.stderr[-3000:]
  rows = json.loads(lines[-1])
  assert rows["default"]["ok"] and rows["4096-token-chunks"]["ok"], rows
  assert not rows["16mib"]["ok"] and "vmem" in rows["16mib"]["error"].lower(), rows


@pytest.mark.slow
def test_head_dim_64_and_192_pools_would_be_copied_every_call_unless_lane_dense():
  # Why the TPU backend refuses head_dim that is not a multiple of 128 (docs/tpu.md): the
  # kernels compile for 64 and 192, but XLA's default layout of such a pool at a real size
  # is not row-major, so the compiled call copies the whole pool into the kernel's layout.
  # 128 and 256 (row-major, no copy) are the control; a small pool of head_dim 64 gets the
  # row-major layout, which is why the check is by head_dim and not left to the sizes that
  # a test happens to use. If XLA ever keeps these pools row-major, this fails: the check
  # can then be relaxed.
  code = textwrap.dedent(
    """
    import json
    from kernels.tpu import aot

    device = aot.topology_device("v5e:2x2")
    rows = {str(d): aot.pool_relayout(device, head_dim=d) for d in (64, 128, 192, 256)}
    rows["64-small"] = aot.pool_relayout(device, head_dim=64, num_blocks=64)
    # The same head_dim 64 in lane-dense pools (kernels._layout), both chips, at full size.
    for topology in ("v5e:2x2", "v6e:2x2"):
      dev = aot.topology_device(topology)
      for dtype, bs in (("bfloat16", 32), ("float32", 16)):
        rows[f"64-dense-{topology}-{dtype}"] = aot.pool_relayout(
          dev, head_dim=64, block_size=bs, kv_dtype=dtype, lane_dense=True
        )
    print(json.dumps(rows))
    """
  )
  proc = _run(["-c", code], timeout=600)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  assert lines, proc.stderr[-3000:]
  rows = json.loads(lines[-1])
  dense = [d for d in rows if "dense" in d]
  assert len(dense) == 4, rows
  for d in ("128", "256", "64-small", *dense):
    assert rows[d]["row_major"] and rows[d]["pool_copies"] == 0, rows
  for d in ("64", "192"):
    assert not rows[d]["row_major"] and rows[d]["pool_copies"] >= 2, rows  # K and V


def test_the_fused_projection_weights_are_not_copied_on_tpu():
  # paxcache.nn.SwiGLU holds gate and up as one [d, 2f] weight, PagedAttention q, k and v
  # as one [d, (Hq + 2 Hkv) D] (the 1B shape: 32 / 8 heads of 64): compiled for v5e and
  # v6e, their products read the weights as they are. The control: the same product over a [d, 2, f]
  # weight (the first version of that parameter), which the TPU compiler tiles T(2,128)
  # and copies into another layout before every call (docs/benchmarks.md, "One weight for
  # gate and up"). A copy is a copy-start / copy of the weight parameter in the compiled
  # module.
  code = textwrap.dedent(
    """
    import json, re
    from kernels.tpu import aot

    aot._prepare_env()
    import jax, jax.numpy as jnp
    from flax import nnx
    from paxcache.nn import PagedAttention, SwiGLU

    rows = {}
    for topology in ("v5e:2x2", "v6e:2x2"):
      device = aot.topology_device(topology)
      sharding = jax.sharding.SingleDeviceSharding(device)

      def spec(shape):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)

      mlp = SwiGLU(2048, 8192, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
      graph, state = nnx.split(mlp)
      state = jax.tree.map(lambda a: spec(a.shape), state)

      def ours(x, state):
        return nnx.merge(graph, state)(x)

      def three_d(x, w):
        h = jnp.einsum("md,dgf->mgf", x, w)
        return jax.nn.silu(h[:, 0]) * h[:, 1]

      attn = PagedAttention(
        2048, 32, 8, 64, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
      )
      attn_graph, attn_state = nnx.split(attn)
      attn_state = jax.tree.map(lambda a: spec(a.shape), attn_state)

      def qkv(x, positions, state):
        return nnx.merge(attn_graph, state)._qkv(x, positions)

      positions = jax.ShapeDtypeStruct((64,), jnp.int32, sharding=sharding)
      for name, fn, args in (
        ("ours", ours, (spec((64, 2048)), state)),
        ("d2f", three_d, (spec((64, 2048)), spec((2048, 2, 8192)))),
        ("qkv", qkv, (spec((64, 2048)), positions, attn_state)),
      ):
        text = jax.jit(fn).trace(*args).lower().compile().as_text()
        weight = r"bf16\\[2048,(16384|2,8192|3072)\\]"
        copy = re.compile(r"= *" + weight + r"\\{[^}]*\\} copy(-start)?\\(")
        copies = [line for line in text.splitlines() if copy.search(line)]
        # The weight is a parameter of the module, so a copy of it would match above.
        assert any("parameter(" in line and re.search(weight, line) for line in text.splitlines())
        rows[f"{topology}-{name}"] = len(copies)
    print(json.dumps(rows))
    """
  )
  proc = _run(["-c", code], timeout=600)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  assert lines, proc.stderr[-3000:]
  rows = json.loads(lines[-1])
  assert rows == {
    "v5e:2x2-ours": 0, "v5e:2x2-d2f": 1, "v5e:2x2-qkv": 0,
    "v6e:2x2-ours": 0, "v6e:2x2-d2f": 1, "v6e:2x2-qkv": 0,
  }, rows  # fmt: skip


@pytest.mark.slow
def test_ragged_prefill_tile_needs_the_vmem_limit_it_sets():
  # The default prefill tile (1,024 rows of 8 KV heads, bf16) compiles for v5e under the
  # limit the ragged kernel sets (2 x its 22 MiB estimate + 16 MiB, capped at 48 MiB), and
  # its ragged launch (output bf16[8,4,256,128]) is refused under v5e's default 16 MiB;
  # blocks_per_chunk=16 keeps the decode launch's chunks small enough for 16 MiB, so the
  # refusal is the ragged kernel's. 20 MiB suffices: the estimate is not below the need.
  code = textwrap.dedent(
    """
    import json
    from kernels.tpu import aot

    device = aot.topology_device("v5e:2x2")
    base = dict(kernel="ragged", block_size=16, head_dim=128, kv_dtype="bfloat16")
    rows = {}
    for name, knobs in [("default", ()),
                        ("16mib", (("blocks_per_chunk", 16), ("vmem_limit_bytes", 16 << 20))),
                        ("20mib", (("blocks_per_chunk", 16), ("vmem_limit_bytes", 20 << 20)))]:
      row = aot.compile_case(aot.Case(name, block_sizes=knobs, **base), device)
      rows[name] = dict(ok=row["ok"], error=(row["error"] or "")[:400])
    print(json.dumps(rows))
    """
  )
  proc = _run(["-c", code], timeout=600)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  assert lines, proc.stderr[-3000:]
  rows = json.loads(lines[-1])
  assert rows["default"]["ok"] and rows["20mib"]["ok"], rows
  error = rows["16mib"]["error"]
  assert not rows["16mib"]["ok"] and "vmem" in error.lower(), rows
  assert "bf16[8,4,256,128]" in error, rows  # the ragged launch's output, 256-token tiles


@pytest.mark.slow
def test_two_heads_of_64_cannot_share_a_128_lane_row_by_dma():
  # Issue 18 item 4 asks for head_dim 64 packed in the 128 lanes. From the one cache
  # layout [num_kv_heads, num_blocks, block_size, 64], a DMA of a head's [16, 64] slab into
  # a 64-lane half of a VMEM row is refused by Mosaic (a DMA's contiguous inner slice must
  # be a multiple of 512 bytes; 64 bf16 lanes are 128), and the slab's HBM tiling is
  # (8, 128): a row-major 64-wide pool takes 128 lanes per row in HBM, the bytes of a pool
  # padded to 128. (XLA keeps a real-size pool not row-major at all: the pool copy of
  # test_head_dim_64_and_192_pools_would_be_copied_every_call.)
  code = textwrap.dedent(
    """
    import json
    from kernels.tpu import aot

    rows = {t: aot.packed_lanes_dma(aot.topology_device(t)) for t in aot.TOPOLOGIES}
    print(json.dumps(rows))
    """
  )
  proc = _run(["-c", code], timeout=600)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  assert lines, proc.stderr[-3000:]
  rows = json.loads(lines[-1])
  assert set(rows) == set(aot.TOPOLOGIES), rows
  for row in rows.values():
    assert not row["ok"] and "divisible by 512 bytes" in row["error"], row
    assert row["hbm_tiling"] == "(8,128)", row


@pytest.mark.slow
def test_cache_writes_and_decode_update_the_pool_in_place_on_tpu():
  # kernels.write_kv (and write_kv_quantized with its scale pools) followed by the decode
  # kernel, pools donated, compiled for v5e and v6e: no copy of a pool or a scale pool, in
  # the plain layout, a lane-dense one, 8-bit and lane-padded head_dim 80 and 192 (q padded
  # and the output cut in the same jit). The control: the scatter this replaced
  # (the pool flattened to [heads, slots, head_dim], one window across every head) made
  # XLA relayout the pool (heads inside) and back, two copies per pool per write.
  code = textwrap.dedent(
    """
    import json
    import jax.numpy as jnp
    from kernels import _write
    from kernels.tpu import aot

    rows = {}
    for topology in ("v5e:2x2", "v6e:2x2"):
      dev = aot.topology_device(topology)
      for name, kw in [("bf16", {}), ("dense-d64", dict(head_dim=64, block_size=32,
                        lane_dense=True)), ("int8", dict(block_size=128, kv_dtype="int8")),
                       ("padded-d80", dict(head_dim=80, lane_padded=True)),
                       ("padded-d192-f32", dict(head_dim=192, kv_dtype="float32",
                        block_size=8, lane_padded=True))]:
        rows[f"{topology}-{name}"] = aot.write_copies(dev, **kw)

    def flat(pool, new, slots):
      h, n, bs = pool.shape[:3]
      pool2 = pool.reshape(h, n * bs, *pool.shape[3:])
      pool2 = pool2.at[:, slots].set(jnp.swapaxes(new, 0, 1).astype(pool.dtype), mode="drop")
      return pool2.reshape(pool.shape)

    _write._scatter_rows = flat
    rows["control"] = aot.write_copies(aot.topology_device("v5e:2x2"), with_attention=False)
    print(json.dumps(rows))
    """
  )
  proc = _run(["-c", code], timeout=900)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  assert lines, proc.stderr[-3000:]
  rows = json.loads(lines[-1])
  control = rows.pop("control")
  assert len(rows) == 10, rows
  for name, row in rows.items():
    assert row == {"pool_copies": 0, "scale_copies": 0}, (name, row)
  assert control["pool_copies"] >= 2, control
