"""experiments/bench runs on the GPU machine, which has absl-py and not ml_collections.

Every bench module imports with ``import ml_collections`` failing, defines its absl flags,
and parses the commands the docs give for it; host_step (CPU only) runs end to end.
"""

import ast
import json
import os
import pathlib
import pkgutil
import re
import shlex
import subprocess
import sys

import pytest

import experiments.bench
from kernels.testing import tolerance

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODULES = sorted(m.name for m in pkgutil.iter_modules(experiments.bench.__path__))
SCRIPTS = [m for m in MODULES if not m.startswith("_")]
# sys.modules[name] = None makes `import name` raise ImportError, as on the GPU machine.
NO_ML_COLLECTIONS = "import sys; sys.modules['ml_collections'] = None\n"


def _python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-c", NO_ML_COLLECTIONS + code],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _bench_rows(module: str, argv: list[str], out, rows_file: str) -> list[dict]:
  """Runs ``experiments.bench.<module>`` with ``argv`` plus ``--out out`` in a fresh CPU
  process (as ``_python``), asserts it exits 0 and returns the JSON rows of
  ``out/rows_file`` (one a line; a ``.json`` file holds one list of them)."""
  code = (
    "import runpy\n"
    f"sys.argv = {[module, *argv, '--out', str(out)]!r}\n"
    f"runpy.run_module('experiments.bench.{module}', run_name='__main__')\n"
  )
  proc = _python(code)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  text = (out / rows_file).read_text()
  if rows_file.endswith(".json"):
    return json.loads(text)
  return [json.loads(line) for line in text.splitlines()]


def documented_commands(script: str) -> list[list[str]]:
  """The flags of every ``python -m experiments.bench.<script> ...`` in the README, the
  docs and the script's docstring (optional ``[--flag]`` parts included, text after a
  pipe or a redirection dropped)."""
  texts = [p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]
  source = (ROOT / "experiments" / "bench" / f"{script}.py").read_text()
  texts.append(ast.get_docstring(ast.parse(source)))
  pattern = re.compile(rf"python -m experiments\.bench\.{script}\b([^`\n]*)")
  out = []
  for text in texts:
    for match in pattern.finditer(text):
      args = match.group(1).split("#")[0]
      args = re.split(r"\s(?:\||&&|;|>|2>)", args)[0]
      tokens = [t.strip("[]") for t in shlex.split(args.replace("[", " ").replace("]", " "))]
      out.append([t for t in tokens if t and t != "..."])
  return out


def test_bench_package_lists_the_scripts():
  assert SCRIPTS == [
    "cascade",
    "dp_router",
    "engine_host",
    "engine_step",
    "gemm_rows",
    "gpu_check",
    "gpu_decode",
    "gpu_prefill_ragged",
    "gpu_ragged",
    "host_copies",
    "host_step",
    "ncu_profile",
    "plan_host",
    "prefix_time",
    "probe_step",
    "profile_step",
    "spmd_scaling",
    "tune_gpu",
  ]
  assert not (ROOT / "benchmarks").exists()  # one home for measurements


def first_party_imports() -> list[str]:
  """Every project module a bench script imports, inside its functions too (those imports
  run only on the GPU machine, in the middle of a run)."""
  names = set()
  for m in MODULES:
    tree = ast.parse((ROOT / "experiments" / "bench" / f"{m}.py").read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names.add(node.module)
  return sorted(n for n in names if n.split(".")[0] in ("experiments", "paxcache", "kernels"))


def test_every_bench_module_imports_without_ml_collections():
  lazy = first_party_imports()
  assert "experiments.workloads" in lazy and "paxcache.engine" in lazy  # imported in functions
  imports = "".join(f"import experiments.bench.{m}\n" for m in MODULES)
  imports += "".join(f"import {name}\n" for name in lazy)
  code = imports + (
    "import experiments._timing\n"
    "assert sys.modules['ml_collections'] is None, 'something replaced the block'\n"
    "print('ok')\n"
  )
  proc = _python(code)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().endswith("ok")


@pytest.mark.parametrize("script", SCRIPTS)
def test_documented_commands_parse_with_the_scripts_absl_flags(script):
  commands = documented_commands(script)
  assert commands, f"no documented command for experiments.bench.{script}"
  code = (
    "from absl import flags\n"
    f"from experiments.bench import {script} as m\n"
    "m.define_flags()\n"
    "parts = set(getattr(m, 'PARTS', ()))  # probe_step's one positional argument\n"
    f"for argv in {commands!r}:\n"
    "  flags.FLAGS.unparse_flags()\n"
    "  rest = flags.FLAGS([m.__name__] + argv)\n"
    "  words = [w for r in rest[1:] for w in r.split('|')]\n"
    "  assert rest[0] == m.__name__ and set(words) <= parts, (argv, rest)\n"
    "print('ok')\n"
  )
  proc = _python(code)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_host_step_runs_without_ml_collections():
  code = (
    "import runpy\n"
    "sys.argv = ['host_step', '--batch', '2,4', '--steps', '5', '--warmup', '1',\n"
    "            '--seq-len', '40', '--block-size', '4']\n"
    "runpy.run_module('experiments.bench.host_step', run_name='__main__')\n"
  )
  proc = _python(code)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line for line in proc.stdout.splitlines() if re.match(r"\| [24] \|", line)]
  assert len(rows) == 2, proc.stdout
  # median, p10, p90, min-max, interval, the loop's "median (min-max)", its interval and
  # the verdict from the intervals.
  cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
  assert all(len(c) == 9 for c in cells), rows
  assert all(c[-1] in ("faster", "slower", "indistinguishable") for c in cells), rows


def test_plan_host_times_the_plan_and_the_step_build_per_case(tmp_path):
  code = (
    "import runpy\n"
    "sys.argv = ['plan_host', '--cases', 'full256x2048,long1_short255', '--repeats', '5',\n"
    f"            '--warmup', '0', '--out', '{tmp_path}']\n"
    "runpy.run_module('experiments.bench.plan_host', run_name='__main__')\n"
  )
  proc = _python(code)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "plan_host.jsonl").read_text().splitlines()]
  assert [r["case"] for r in rows] == ["full256x2048", "long1_short255"]
  for r in rows:
    assert r["batch"] == 256 and r["repeats"] == 5
    for key in ("plan", "build_off", "build_auto", "build_on", "pack_off", "pack_on"):
      assert 0 < r[f"{key}_us_min"] <= r[f"{key}_us"] <= r[f"{key}_us_max"], key
  # A level batch: "auto" declines it, "on" plans it anyway; one long row among short ones
  # is ragged (max 32,768 over mean 256) and is cut into many chunks.
  assert rows[0]["auto_plans"] is False and rows[1]["auto_plans"] is True
  assert rows[1]["num_chunks"] > 256 and rows[1]["padded_chunks"] >= rows[1]["num_chunks"]
  table = [line for line in proc.stdout.splitlines() if line.startswith("| full256x2048 |")]
  assert len(table) == 1, proc.stdout


def test_host_copies_times_the_swap_and_its_parts(tmp_path):
  code = (
    "import runpy\n"
    "sys.argv = ['host_copies', '--tokens', '64', '--layers', '1', '--repeats', '3',\n"
    f"            '--out', '{tmp_path}']\n"
    "runpy.run_module('experiments.bench.host_copies', run_name='__main__')\n"
  )
  proc = _python(code)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "host_copies.jsonl").read_text().splitlines()]
  names = [r["figure"] for r in rows]
  assert names[:8] == [
    "swap_out", "swap_in", "swap_out_direct", "swap_in_direct",
    "d2h_pageable", "h2d_pageable", "host_scatter", "host_gather",
  ]  # fmt: skip
  pinned = ["d2h_pinned", "h2d_pinned", "pinned_to_numpy", "numpy_to_pinned"]
  pinned += ["swap_out_pinned", "swap_in_pinned"]
  assert sorted(names[8:]) == sorted(pinned)  # timed, or skipped with a reason
  # 1 layer x 8 heads x 64 tokens x 128 x bf16, K and V: 256 KiB.
  assert all(r["mib"] == 0.25 and r["block_size"] == 16 for r in rows)
  for r in rows:
    if "skipped" not in r:
      assert 0 < r["ms_min"] <= r["ms"] <= r["ms_max"] and r["repeats"] == 3, r
      # GB/s is the bytes over the median; ms is rounded to 3 places, so allow its half-unit.
      lo, hi = (0.25 * 2**20 / ((r["ms"] + d) / 1e3) / 1e9 for d in (0.0005, -0.0005))
      assert lo - 0.01 <= r["gbs"] <= hi + 0.01, r
    else:
      assert r["skipped"], r
  assert sum(line.startswith("| swap_out |") for line in proc.stdout.splitlines()) == 1


def test_engine_host_runs_without_ml_collections(tmp_path):
  code = (
    "import runpy\n"
    "sys.argv = ['engine_host', '--batch', '2,4', '--steps', '5', '--warmup', '1',\n"
    f"            '--out', {str(tmp_path)!r}]\n"
    "runpy.run_module('experiments.bench.engine_host', run_name='__main__')\n"
  )
  proc = _python(code)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line for line in proc.stdout.splitlines() if re.match(r"\| [24] \|", line)]
  assert len(rows) == 2, proc.stdout
  records = [json.loads(line) for line in (tmp_path / "engine_host.jsonl").read_text().splitlines()]
  assert [r["batch"] for r in records] == [2, 4]
  for r in records:
    # Host work is the step less its jitted call (waited for): both positive.
    assert r["host_repeats"] == 5 and 0 < r["host_ms"] and 0 < r["jit_ms"]
    assert r["host_min_ms"] <= r["host_ms"] <= r["host_max_ms"]
    assert r["wall_min_ms"] <= r["wall_ms"] <= r["wall_max_ms"] and not r["dispatch_thread"]


def test_engine_host_with_the_dispatch_thread(tmp_path):
  # The calls on the engine's worker thread: every measured step still makes one call
  # (the bench waits for the last one before it counts them), and the step's wall time
  # is recorded.
  argv = ["--batch", "4", "--steps", "5", "--warmup", "1", "--dispatch-thread"]
  (r,) = _bench_rows("engine_host", argv, tmp_path, "engine_host.jsonl")
  assert r["dispatch_thread"] and r["wall_repeats"] == 5 and r["jit_repeats"] == 5
  assert 0 < r["wall_min_ms"] <= r["wall_ms"] <= r["wall_max_ms"]


def test_engine_host_times_bursts_per_decode_step(tmp_path):
  # --decode-steps 3 with a fake device (a step of 2 ms, a launch of 1 ms): every measured
  # step is a burst of 3 (the bench checks it) and the figures are per decode step.
  argv = "--batch 4 --steps 6 --warmup 2 --decode-steps 3 --emulate-device-ms 2"
  argv = [*argv.split(), "--emulate-launch-ms", "1"]
  (r,) = _bench_rows("engine_host", argv, tmp_path, "engine_host.jsonl")
  assert r["decode_steps"] == 3 and r["wall_repeats"] == 6
  # A burst takes 6 ms on the fake device, and its call sleeps 3 ms: per decode step at
  # least 2 and 1 ms (sleeps take at least their time); figures not divided by the burst
  # would be at least 6 and 3 (the upper bounds leave room for a loaded machine).
  assert 1.95 <= r["wall_ms"] < 5.5
  assert 0.99 <= r["jit_ms"] < 2.9


def test_prefix_time_runs_on_the_cpu_reference_without_ml_collections(tmp_path):
  code = (
    "import runpy\n"
    "sys.argv = ['prefix_time', '--users', '3', '--shared-len', '40', '--own-len', '5',\n"
    "            '--block-sizes', '8,16', '--num-q-heads', '4', '--num-kv-heads', '2',\n"
    "            '--head-dim', '16', '--dtype', 'float32', '--repeats', '5', '--inner', '1',\n"
    f"            '--out', {str(tmp_path)!r}]\n"
    "runpy.run_module('experiments.bench.prefix_time', run_name='__main__')\n"
  )
  proc = _python(code)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "prefix_time.jsonl").read_text().splitlines()]
  assert [r["block_size"] for r in rows] == [8, 16]
  for r in rows:
    assert r["backend"] == "reference" and r["groups"] == 1 and r["plain_repeats"] == 5
    assert r["max_abs_diff"] < 1e-5  # the two paths agree (float32, 45 keys)
    # Hand-worked bytes: (K + V) x 2 heads x 16 x 4 B = 256 B a token; plain reads 3 rows x
    # 45 tokens; cascade reads the prompt's full blocks once (40 at block 8, 32 at block
    # 16), then each row's other 5 or 13 tokens.
    assert r["plain_kv_bytes"] == 3 * 45 * 256 == 34_560
    own = {8: 5, 16: 13}[r["block_size"]]
    assert r["cascade_kv_bytes"] == (45 - own + 3 * own) * 256
  assert (
    sum(line.startswith("| 8 |") or line.startswith("| 16 |") for line in proc.stdout.splitlines())
    == 2
  )


def test_gpu_ragged_smoke_writes_a_row_per_case_and_variant(tmp_path):
  # Interpret mode on CPU, one ragged case: the three variants timed on the same data
  # (the Mosaic GPU one in GPU interpret mode), the planned outputs checked against the
  # default kernel's, the plan's host time recorded.
  argv = ["--smoke", "--cases", "long1_short63_b16"]
  rows = _bench_rows("gpu_ragged", argv, tmp_path, "gpu_decode_ragged.jsonl")
  assert [r["variant"] for r in rows] == ["default", "planned", "mosaic"]
  assert [r["kernel"] for r in rows] == ["triton", "triton", "mosaic"]
  for r in rows:
    for key in ("device", "case", "batch", "block_size", "head_dim", "mean_len", "max_len"):
      assert key in r
    assert r["ours_tbs_min"] <= r["ours_tbs"] <= r["ours_tbs_max"]
    assert r["vllm_tbs"] is None and r["ceiling_tbs"] > 0
    # Two bf16 kernels that sum in other orders: the GPU kernels' bf16 bound.
    assert r["check_rel_l2"] < tolerance("gpu_kernel_vs_reference_rel_l2", "bfloat16").rtol
    assert r["check_ok"] is True
  for r in rows[1:]:
    assert r["num_chunks"] >= 2 and r["plan_us"] > 0


def test_gpu_ragged_sweep_smoke_sets_and_restores_the_plan_and_merge_settings(tmp_path):
  # Interpret mode on CPU: each SWEEP setting (block sizes, plan chunk sizes, the merge's
  # module constants) runs and is checked against the default kernel; a setting's merge
  # is set only for its own row (the rows after BEFORE's report the default merge again).
  from experiments.bench import gpu_ragged
  from kernels import gpu
  from kernels.gpu import planned

  argv = ["--smoke", "--sweep", "--nomosaic", "--cases", "long1_short63_b16"]
  rows = _bench_rows("gpu_ragged", argv, tmp_path, "gpu_decode_ragged_sweep.jsonl")
  assert len(rows) == len(gpu_ragged.SWEEP) and all("error" not in r for r in rows)
  default_merge = [planned.MERGE_TILE, planned.MERGE_NUM_WARPS, planned.MERGE_NUM_STAGES]
  assert rows[0]["merge"] == [64, 8, 1] and rows[0]["min_chunk_tokens"] == 256
  # BEFORE: the small-batch rule's settings at the smoke's head_dim 64 (bf16: 128 tokens).
  rule = gpu.rule_block_sizes(head_dim=64, kv_dtype="bfloat16")
  assert rows[0]["config"]["decode_kv_tile"] == rule.decode_kv_tile == 128
  assert rows[0]["config"]["decode_num_stages"] == rule.decode_num_stages == 3
  assert [r["merge"] for r in rows[1:]] == [
    list(s.get("merge", default_merge)) for s in gpu_ragged.SWEEP[1:]
  ]
  for r in rows:
    assert r["check_ok"] is True and r["num_chunks"] >= 1


def test_gpu_ragged_sweep_min_chunks_sets_the_plans_floor(tmp_path):
  # --sweep-min-chunks replaces SWEEP by the plan's floor alone: 0 is the default
  # (min_chunk_for: 4 chunks at 1024 x 2 KV heads are fewer than 264 programs, so the share
  # of 315 keys x 2 heads for 264, 3 tokens, raised to 256), which cuts the 300-key row in
  # two; a floor of 128 cuts it in three (128-key steps).
  argv = ["--smoke", "--sweep", "--nomosaic", "--cases", "long1_short63_b16"]
  argv += ["--sweep-min-chunks", "0,128"]
  rows = _bench_rows("gpu_ragged", argv, tmp_path, "gpu_decode_ragged_sweep.jsonl")
  assert [r["min_chunk_tokens"] for r in rows] == [256, 128]
  assert [r["min_chunk_default"] for r in rows] == [True, False]
  assert [r["num_chunks"] for r in rows] == [2 + 3, 3 + 3]
  assert [r["max_chunk_tokens"] for r in rows] == [256, 128]
  assert all(r["check_ok"] is True for r in rows)


def test_gpu_decode_kv_quant_smoke_times_each_widening_beside_the_old(tmp_path):
  # Interpret mode on CPU: per 8-bit dtype a row for each BlockSizes.quant_widen it has
  # (int8 has no separate "f16_bits", e4m3 no separate "int8_qk" / "int8_qkv"), each
  # checked against the reference.
  argv = ["--smoke", "--kv-quant", "--no-decode", "--no-prefill", "--passes", "1"]
  rows = _bench_rows("gpu_decode", argv, tmp_path, "kv_quant.jsonl")
  assert [(r["kv_dtype"], r["widen"], r["widen_kind"]) for r in rows] == [
    ("int8", "q_dtype", "cast"),
    ("int8", "f16", "int8_magic"),
    ("int8", "int8_qk", "int8_qk"),
    ("int8", "int8_qkv", "int8_qkv"),
    ("float8_e4m3fn", "q_dtype", "cast"),
    ("float8_e4m3fn", "f16", "e4m3_cast"),
    ("float8_e4m3fn", "f16_bits", "e4m3_bits"),
  ]
  bound = tolerance("quantized_gpu_vs_float64_rel_l2", "bfloat16").rtol
  for r in rows:
    assert r["rel_l2_vs_reference"] < bound and r["ours_ms"] > 0 and r["passes"] == 1
    assert r["speedup"] == pytest.approx(r["bf16_ms"] / r["ours_ms"])
    assert r["speedup_vs_old_widen"] == pytest.approx(
      next(o["ours_ms"] for o in rows if o["kv_dtype"] == r["kv_dtype"] and o["widen"] == "q_dtype")
      / r["ours_ms"]
    )


def test_gpu_prefill_ragged_smoke_writes_a_row_per_case_block_and_kernel(tmp_path):
  # Interpret mode on CPU, Triton only (the Mosaic kernel takes ~10 s a call in GPU
  # interpret mode, so smoke mode leaves the default Mosaic variant out): a ragged prompt
  # batch and a mixed prefill + decode batch, both variants timed on the same tokens and
  # checked against the reference.
  code = (
    "import runpy\n"
    "sys.argv = ['gpu_prefill_ragged', '--smoke', '--cases', "
    f"'uniform32_16_1024,mixed4x512_252dec', '--blocks', '16', '--out', '{tmp_path}']\n"
    "runpy.run_module('experiments.bench.gpu_prefill_ragged', run_name='__main__')\n"
  )
  proc = _python(code)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = (tmp_path / "gpu_prefill_ragged.jsonl").read_text().splitlines()
  rows = [json.loads(line) for line in lines]
  assert [(r["case"], r["block_size"], r["variant"]) for r in rows] == [
    ("uniform32_16_1024", 16, "auto"),
    ("uniform32_16_1024", 16, "triton"),
    ("mixed4x512_252dec", 16, "auto"),
    ("mixed4x512_252dec", 16, "triton"),
  ]
  from experiments.bench.gpu_prefill_ragged import case_batch

  for r in rows:
    for key in ("device", "date", "commit", "tokens", "ms", "ms_min", "ms_max", "pairs"):
      assert key in r
    # Interpret mode never picks the Mosaic GPU kernel; no peer in smoke mode.
    assert r["kernel"] == "triton" and r["vllm_tflops"] is None and "vllm_error" in r
    assert r["requested"] == r["variant"]  # "auto" or "triton"
    assert r["ms_min"] <= r["ms"] <= r["ms_max"]
    assert r["ours_tflops"] == pytest.approx(4 * 64 * 4 * r["pairs"] / (r["ms"] * 1e-3) / 1e12)
    b = case_batch(r["case"], smoke=True)
    assert r["tokens"] == b.q_lens.sum()
    # Pairs counted by brute force: each query at position p sees keys 0..p.
    pos = [c + i for q, c in zip(b.q_lens, b.ctx_lens, strict=True) for i in range(q)]
    assert r["pairs"] == sum(p + 1 for p in pos)
    assert r["check_against"] == "reference" and r["check_ok"] is True
    assert r["rel_l2"] < tolerance("gpu_kernel_vs_reference_rel_l2", "bfloat16").rtol
  mixed = case_batch("mixed4x512_252dec", smoke=True)
  assert (mixed.q_lens == 1).sum() == 3 and mixed.ctx_lens[mixed.q_lens == 1].min() > 0
  assert "| uniform32_16_1024 | 16 | " in proc.stdout


def _gpu_check_smoke(tmp_path, *argv: str) -> subprocess.CompletedProcess:
  """``gpu_check --smoke ARGV --out tmp_path`` in a fresh process (interpret mode, CPU)."""
  code = (
    "import runpy\n"
    f"sys.argv = ['gpu_check', '--smoke', *{list(argv)!r}, '--out', '{tmp_path}']\n"
    "runpy.run_module('experiments.bench.gpu_check', run_name='__main__')\n"
  )
  proc = _python(code)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def test_gpu_check_head_dims_smoke_checks_every_kernel_and_times_decode(tmp_path):
  # Interpret mode on CPU: head_dim 96 (128-wide tiles) through the three kernels against
  # the reference, then the decode timing; one JSON row and one table row.
  proc = _gpu_check_smoke(tmp_path, "--head-dims", "96")
  (row,) = [json.loads(line) for line in (tmp_path / "head_dims.jsonl").read_text().splitlines()]
  assert row["head_dim"] == 96 and row["tile_width"] == 128 and row["ok"] is True
  bound = tolerance("gpu_kernel_vs_reference_rel_l2", "bfloat16").rtol
  for kernel in ("decode", "planned", "prefill"):
    assert row[f"{kernel}_ok"] is True and row[f"{kernel}_rel_err"] < bound
  assert row["decode_time_min_us"] <= row["decode_time_us"] <= row["decode_time_max_us"]
  assert re.search(r"^\| 96 \| 128 \| .* \| yes \|$", proc.stdout, re.M), proc.stdout


def test_gpu_check_8bit_write_smoke_compares_pools_with_the_xla_write(tmp_path):
  # Interpret mode on CPU: the decode kernel writing 8-bit rows itself (split-K and planned,
  # int8 and e4m3): its pools and scale pools equal kernels.write_kv_quantized's (the case
  # asserts it; a kernel storing a scale off by 1e-4 fails there), its output the
  # reference's over the pools it wrote.
  _gpu_check_smoke(tmp_path, "--only", "smoke packed ")
  rows = [json.loads(line) for line in (tmp_path / "check.jsonl").read_text().splitlines()]
  assert sorted(r["kernel"] for r in rows) == sorted(
    f"triton-{p}packed-write-{kv}" for kv in ("int8", "float8_e4m3fn") for p in ("", "planned-")
  )
  for r in rows:
    assert r["ok"] is True and not r["nan"] and r["rel_err"] < r["bound"], r


@pytest.mark.slow
def test_spmd_scaling_reports_the_median_of_its_passes_on_one_cpu_device():
  from experiments.bench import spmd_scaling

  s = spmd_scaling.Setup(
    d_model=32,
    num_layers=1,
    num_q_heads=2,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    vocab_size=64,
    dtype="float32",
    blocks_per_gpu=32,
    requests=3,
    prompt_range=(4, 8),
    output_range=(2, 4),
    max_num_seqs=4,
    max_num_batched_tokens=32,
  )
  lengths = spmd_scaling.make_lengths(s)
  row = spmd_scaling.run_config(s, lengths, 1, repeats=3)
  assert row["repeats"] == 3 and row["generated_tokens"] == int(lengths[:, 1].sum())
  assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
  assert "steps_per_pass" not in row  # the same lengths take the same steps every pass


@pytest.mark.slow
def test_dp_router_tiny_on_two_cpu_devices(tmp_path):
  env = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
  }
  code = NO_ML_COLLECTIONS + (
    "import sys; from experiments.bench import dp_router, _flags\n"
    f"sys.argv = ['dp_router', '--out', {str(tmp_path)!r}, '--tiny', '--repeats', '1']\n"
    "_flags.run(dp_router.define_flags, dp_router.main)\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| 2 x 1 | load |" in proc.stdout
  rows = [json.loads(line) for line in (tmp_path / "dp_router.jsonl").read_text().splitlines()]
  assert [(r["replicas"], r["routing"]) for r in rows] == [
    (1, "affinity"),
    (2, "affinity"),
    (2, "load"),
  ]
  from experiments.bench import dp_router

  s = dp_router.Setup(**dp_router.TINY)
  lengths = dp_router.make_lengths(s)
  for r in rows:
    assert r["generated_tokens"] == int(lengths[:, 2].sum())
    assert sum(r["routed"]) == len(lengths) == r["requests"]
    assert r["preemptions"] == 0
  one, aff, load = rows
  assert len(one["routed"]) == 1 and min(aff["routed"]) > 0 and min(load["routed"]) > 0
  # Without preemption every prompt token is either computed or a prefix hit, so a hit lost
  # by routing on load alone is a token computed again.
  for r in (aff, load):
    assert r["computed_tokens"] + r["prefix_hit_tokens"] == (
      one["computed_tokens"] + one["prefix_hit_tokens"]
    )
  # Spread over both replicas, each prefix is computed on each: fewer hits than with affinity.
  assert load["prefix_hit_tokens"] < aff["prefix_hit_tokens"]


def test_cascade_smoke_runs_without_ml_collections(tmp_path):
  # One tiny case in interpret mode on CPU: plain and cascade outputs must agree (the
  # script asserts it), and one JSON line per config carries the fields.
  code = (
    "import runpy\n"
    f"sys.argv = ['cascade', '--smoke', '--out', {str(tmp_path)!r}]\n"
    "runpy.run_module('experiments.bench.cascade', run_name='__main__')\n"
  )
  proc = _python(code)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = (tmp_path / "cascade.jsonl").read_text().splitlines()
  assert len(lines) == 1
  row = json.loads(lines[0])
  for field in ("device", "case", "batch", "shared_len", "own_len", "plain_ms", "cascade_ms"):
    assert field in row, field
  assert row["speedup"] == pytest.approx(row["plain_ms"] / row["cascade_ms"])
  assert row["batch"] == 3 and row["shared_len"] == 40 and row["planned_shared_len"] == 32
  assert not (tmp_path / "cascade_errors.jsonl").exists()
  assert "| 3x(40+U[4,12]) | bfloat16 | default |" in proc.stdout


def test_cascade_keeps_the_rows_of_settings_that_ran(tmp_path):
  # A sweep setting that fails (here: refused by CascadeBlockSizes) is written to
  # cascade_errors.jsonl and makes the exit status 1; the default's row is still there.
  code = (
    "from experiments.bench import _flags, cascade as m\n"
    "m.SWEEP = (dict(shared_num_stages=0),)\n"
    f"sys.argv = ['cascade', '--smoke', '--sweep', '--out', {str(tmp_path)!r}]\n"
    "_flags.run(m.define_flags, m.main)\n"
  )
  proc = _python(code)
  assert proc.returncode == 1, proc.stderr[-3000:]
  rows = [json.loads(x) for x in (tmp_path / "cascade.jsonl").read_text().splitlines()]
  assert [r["config"] for r in rows] == ["default"]
  errors = [json.loads(x) for x in (tmp_path / "cascade_errors.jsonl").read_text().splitlines()]
  assert [e["config"] for e in errors] == ["sweep0"] and "shared_num_stages" in errors[0]["error"]


def test_tune_gpu_smoke_writes_rows_and_a_table_the_loader_takes(tmp_path):
  # Interpret mode on CPU: per smoke class the rule's setting and one other, each output
  # checked against the rule's, then the table for this "card" in the packaged format.
  from kernels.gpu import tuning_table

  code = (
    "import runpy\n"
    f"sys.argv = ['tune_gpu', '--smoke', '--out', {str(tmp_path)!r}]\n"
    "runpy.run_module('experiments.bench.tune_gpu', run_name='__main__')\n"
  )
  proc = _python(code)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "tune_gpu.jsonl").read_text().splitlines()]
  assert rows[0]["ceiling"] is True and rows[0]["ceiling_tbps"] > 0
  timed = rows[1:]
  assert [(r["shape_class"], r["is_rule"]) for r in timed] == [
    ("decode/w64/i2/small", True),
    ("decode/w64/i2/small", False),
    ("prefill/w64/i2", True),
    ("prefill/w64/i2", False),
  ]
  bound = tolerance("gpu_kernel_vs_reference_rel_l2", "bfloat16").rtol
  for r in timed:
    assert r["device"] == "cpu" and r["interpret"] is True
    assert r["rate_lo"] <= r["rate"] <= r["rate_hi"]
    if r["is_rule"]:
      assert r["block_sizes"] == tuning_table.rule_fields(r["shape_class"])
      assert r["check_rel_l2"] is None
    else:  # another setting's output against the rule's: the GPU kernels' bf16 bound
      assert r["block_sizes"] != tuning_table.rule_fields(r["shape_class"])
      assert 0 <= r["check_rel_l2"] < bound
  tables = tuning_table.load_tables(str(tmp_path))  # the loader's checks pass
  assert list(tables) == ["cpu"]
  assert set(tables["cpu"]) == {"decode/w64/i2/small", "prefill/w64/i2"}
  doc = json.loads((tmp_path / "cpu.json").read_text())
  for e in doc["entries"]:
    chosen = [
      r for r in timed if r["shape_class"] == e["class"] and r["block_sizes"] == e["block_sizes"]
    ]
    assert chosen and e["source"]["files"] == {
      "tune_gpu.jsonl": {"date": rows[0]["date"], "commit": rows[0]["commit"]}
    }
    assert e["source"]["shapes"][0]["rate"] == float(f"{chosen[0]['rate']:.5g}")


def test_peer_query_groups_pad_to_a_power_of_two_and_back():
  # SmolLM2's 9/3 heads: groups of 3 padded to 4 with zero heads, each KV head's real
  # heads first in its group; unpadding returns exactly the real heads' rows.
  import jax.numpy as jnp
  import numpy as np

  from experiments.bench._gpu_common import pad_query_groups, unpad_query_groups

  q = np.arange(2 * 9 * 4, dtype=np.float32).reshape(2, 9, 4)
  padded, groups = pad_query_groups(jnp.asarray(q), 3)
  padded = np.asarray(padded)
  assert groups == (3, 4) and padded.shape == (2, 12, 4)
  for kv in range(3):
    np.testing.assert_array_equal(padded[:, 4 * kv : 4 * kv + 3], q[:, 3 * kv : 3 * kv + 3])
    assert not padded[:, 4 * kv + 3].any()
  np.testing.assert_array_equal(unpad_query_groups(padded, 3, groups), q)
  same, groups8 = pad_query_groups(jnp.asarray(q[:, :8]), 2)  # groups of 4: unchanged
  assert groups8 == (4, 4) and np.asarray(same).shape == (2, 8, 4)


def test_gemm_rows_products_and_layer_shapes():
  # The timing needs a GPU trace; what it times is checked here: each split product is the
  # plain one (float64 NumPy), and the shapes are a layer's weights.
  import jax.numpy as jnp
  import numpy as np

  from experiments.bench.gemm_rows import products, weight_shapes

  assert weight_shapes("llama-1b") == {
    "qkv": (2048, (32 + 2 * 8) * 64),
    "o": (2048, 2048),
    "gate_up": (2048, 2 * 8192),
    "down": (8192, 2048),
  }
  rng = np.random.default_rng(0)
  xs = [rng.standard_normal((8, 64)).astype(np.float32) for _ in range(2)]
  ws = [rng.standard_normal((64, 24)).astype(np.float32) for _ in range(2)]
  want = [x.astype(np.float64) @ w.astype(np.float64) for x, w in zip(xs, ws, strict=True)]
  for split in (1, 2, 8):
    got = products([jnp.asarray(x) for x in xs], [jnp.asarray(w) for w in ws], split)
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(g, w, **tolerance("layer_vs_float64", jnp.float32))


def test_gemm_rows_swiglu_fronts_agree_with_float64():
  # What --swiglu times (the kernel in interpret mode here): each front is silu(x @ W_gate)
  # * (x @ W_up) of float64 NumPy within bf16 roundings (the XLA fronts round the product
  # to bf16 before the activation, the fused kernel once after it).
  import jax.numpy as jnp
  import numpy as np

  from experiments.bench.gemm_rows import SWIGLU_FRONTS, swiglu_fronts

  rng = np.random.default_rng(1)
  xs = [jnp.asarray(rng.standard_normal((5, 64)), jnp.bfloat16) for _ in range(2)]
  ws = [jnp.asarray(rng.standard_normal((64, 96)) / 8, jnp.bfloat16) for _ in range(2)]
  want = []
  for x, w in zip(xs, ws, strict=True):
    h = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    g, u = h[:, :48], h[:, 48:]
    want.append(g / (1 + np.exp(-g)) * u)
  for front in SWIGLU_FRONTS:
    got = swiglu_fronts(xs, ws, front, interpret=True)
    for g, w in zip(got, want, strict=True):
      assert g.shape == (5, 48) and g.dtype == jnp.bfloat16
      # Three bf16 roundings at most (g, u, the output): 3 * 2**-8 of the largest entry.
      np.testing.assert_allclose(
        np.asarray(g, np.float64), w, rtol=0, atol=3 * 2.0**-8 * np.abs(w).max()
      )


def test_engine_step_e2e_smoke_replays_captured_steps_on_the_device(tmp_path):
  # A one-layer model on the CPU: every captured step is replayed three ways; with no GPU
  # trace the device time is the device-resident batch's clock, and the row's medians and
  # ratios are those of the per-step rows written beside it.
  argv = (
    "--no-step --e2e --models micro --e2e-requests 4 --e2e-steady 4x8+24 --e2e-only-steady "
    "--e2e-repeats 1 --capture-every 2 --replay-max 5 --e2e-pool-gb 0.001 --async-scheduling "
    "--e2e-steps-out --compilation-cache="
  ).split()
  (row,) = _bench_rows("engine_step", argv, tmp_path, "engine_e2e.jsonl")
  assert row["model"] == "micro" and row["generated_tokens"] == 4 * 24
  assert row["device_timing"] == "put_clock" and row["replay_trace_ms"] is None
  assert row["replay_clock_ms"] > 0 and row["replay_put_clock_ms"] > 0
  assert row["decode_device_ms"] == row["replay_put_clock_ms"]
  steps = [json.loads(x) for x in (tmp_path / "engine_steps.jsonl").read_text().splitlines()]
  timed = [s for s in steps if s["device_ms"] is not None]
  assert len(timed) == row["captured_steps"] == 5  # --replay-max of the captured steps
  assert all(s["device_timing"] == "put_clock" and s["prefill_tokens"] == 0 for s in timed)
  assert all(s["device_timing"] is None for s in steps if s["device_ms"] is None)
  ratios = sorted(s["step_ms"] / s["device_ms"] for s in timed)
  assert row["wall_over_device"] == pytest.approx(ratios[2])
  walls = [s["step_ms"] for s in timed]
  assert row["captured_wall_mean_ms"] == pytest.approx(sum(walls) / 5)
  devices = [s["device_ms"] for s in timed]
  assert row["mean_wall_over_device"] == pytest.approx(sum(walls) / sum(devices))
  assert row["decode_device_ms"] == pytest.approx(sorted(devices)[2])
  # At the full batch: every decode step's mean wall (and pace) over the replayed steps'
  # mean device time there.
  full = [s for s in steps if s["rows"] == row["full_batch"] and s["prefill_tokens"] == 0]
  dev = [s["device_ms"] for s in full if s["device_ms"] is not None]
  assert row["full_batch"] == 4 and row["full_device_steps"] == len(dev) >= 1
  assert row["full_steps"] == len(full) > len(dev)
  # Captured: every --capture-every'th decode step (the engine's step count when its batch
  # is built); replayed: up to --replay-max of those, which carry a device time.
  decode = [s for s in steps if s["prefill_tokens"] == 0 and s["rows"]]
  assert [s["step"] for s in decode if s["captured"]] == [
    s["step"] for s in decode if s["step"] % 2 == 0
  ]
  assert all(s["captured"] for s in steps if s["device_ms"] is not None)
  assert sum(s["captured"] for s in steps) > len(timed)
  mean_dev = sum(dev) / len(dev)
  ratio = sum(s["step_ms"] for s in full) / len(full) / mean_dev
  assert row["full_wall_over_device"] == pytest.approx(ratio)
  # The pace: the engine clock between consecutive steps' ends, never shorter than the
  # step itself (it also holds the host work outside step()).
  paced = [s["pace_ms"] for s in full if s["pace_ms"] is not None]
  assert row["full_pace_over_device"] == pytest.approx(sum(paced) / len(paced) / mean_dev)
  assert all(s["pace_ms"] >= s["step_ms"] for s in steps if s["pace_ms"] is not None)


def test_engine_step_passes_xla_options_to_the_step_and_records_them(tmp_path):
  # --xla-options reaches EngineConfig.xla_options (xla_dump_to: the step's modules are
  # dumped) and every row says which options ran; a value that is not a JSON object exits.
  dump = tmp_path / "dump"
  argv = (
    "--no-step --e2e --models micro --e2e-steady 4x8+8 --e2e-only-steady --e2e-repeats 1 "
    "--e2e-pool-gb 0.001 --compilation-cache="
  ).split() + ["--xla-options", json.dumps({"xla_dump_to": str(dump)})]
  (row,) = _bench_rows("engine_step", argv, tmp_path, "engine_e2e.jsonl")
  assert row["xla_options"] == {"xla_dump_to": str(dump)} and row["generated_tokens"] == 32
  assert any("device_step" in p.name for p in dump.iterdir())
  proc = _python(
    "import runpy\n"
    f"sys.argv = ['engine_step', '--no-step', '--xla-options', '[1]', '--out', {str(tmp_path)!r}]\n"
    "runpy.run_module('experiments.bench.engine_step', run_name='__main__')\n"
  )
  assert proc.returncode != 0 and "--xla-options must be a JSON object" in proc.stderr


def test_engine_step_e2e_divides_a_bursts_times_by_its_decode_steps(tmp_path):
  # --decode-steps 4: a burst is one engine step of four decode steps; its wall, pace and
  # replayed device time are each divided by four before the medians and ratios.
  argv = (
    "--no-step --e2e --models micro --e2e-steady 4x8+24 --e2e-only-steady --e2e-repeats 1 "
    "--capture-every 2 --replay-max 5 --e2e-pool-gb 0.001 --async-scheduling --e2e-steps-out "
    "--compilation-cache= --decode-steps 4"
  ).split()
  (row,) = _bench_rows("engine_step", argv, tmp_path, "engine_e2e.jsonl")
  assert row["decode_steps"] == 4 and row["generated_tokens"] == 4 * 24
  steps = [json.loads(x) for x in (tmp_path / "engine_steps.jsonl").read_text().splitlines()]
  decode = [s for s in steps if s["prefill_tokens"] == 0 and s["rows"]]
  # 23 tokens after the prefill's first: five bursts and one more (a row stops in it).
  assert [s["decode_steps"] for s in decode] == [4] * 6 == [s["num_tokens"] // 4 for s in decode]
  assert row["bursts"] == 6
  per = {s["step"]: s["decode_steps"] for s in decode}
  walls = sorted(s["step_ms"] / per[s["step"]] for s in decode)
  assert row["decode_step_ms"] == pytest.approx((walls[2] + walls[3]) / 2)
  full = [s for s in decode if s["rows"] == row["full_batch"]]
  dev = [s["device_ms"] / 4 for s in full if s["device_ms"] is not None]
  paced = [s["pace_ms"] / 4 for s in full if s["pace_ms"] is not None]
  assert dev and row["full_device_steps"] == len(dev)
  mean_dev = sum(dev) / len(dev)
  assert row["full_pace_over_device"] == pytest.approx(sum(paced) / len(paced) / mean_dev)


def test_profile_step_host_phases_of_a_steady_batch_with_both_overlap_options(tmp_path):
  # --host-steady 4x8+24: four requests of 8 prompt tokens, all decoding together; the
  # prefill samples each request's first token, so 23 decode steps of 4 rows follow.
  argv = (
    "--host --models micro --host-steady 4x8+24 --host-dispatch-thread --host-pipeline-depth 2 "
    "--pool-gb 0.001 --trace-from 5 --trace-steps 10"
  ).split()
  window, phases = _bench_rows("profile_step", argv, tmp_path, "profile_host.json")
  for row in (window, phases):
    assert row["workload"] == "steady4x8+24" and row["model"] == "micro"
    assert row["dispatch_thread"] is True and row["pipeline_depth"] == 2
  assert window["window_mean_batch"] == 4 and window["window_prefill_steps"] == 0
  assert phases["batch_range"] == [1, 64] and phases["decode_steps"] == 23
  for k in ("schedule", "build", "commit", "resolve"):
    assert 0 < phases[f"{k}_ms"] < phases["wall_ms"] * 10
  # The call runs on the worker: its time may land in the next step's row (or none).
  assert 0 <= phases["dispatch_ms"] < phases["wall_ms"] * 10


def test_profile_step_host_refuses_a_steady_batch_it_cannot_serve_and_a_window_past_the_run(
  tmp_path,
):
  from experiments.bench.profile_step import _steady

  assert _steady("256x128+512") == (256, 128, 512)
  for bad in ("256x128", "0x8+8", "257x8+8", "4x0+8", "4x8+0", "4x1000+25", "4x8+8 "):
    with pytest.raises(ValueError, match="--host-steady"):
      _steady(bad)
  code = (
    "import runpy\n"
    "sys.argv = ['profile_step', '--host', '--models', 'micro', '--host-steady', '4x8+24',"
    f" '--pool-gb', '0.001', '--trace-from', '20', '--trace-steps', '10', '--out', '{tmp_path}']\n"
    "runpy.run_module('experiments.bench.profile_step', run_name='__main__')\n"
  )
  proc = _python(code)
  # The run (about 25 steps) ends inside the window 20-30: the trace is stopped, and it
  # says so rather than failing on the unset window clock.
  assert proc.returncode != 0
  message = r"ValueError: --trace-from 20 --trace-steps 10 end past the run's \d+ steps"
  assert re.search(message, proc.stderr)


def test_engine_step_replay_takes_the_traced_span_on_a_gpu(monkeypatch):
  # On a GPU _replay_ms traces the device-resident batch (_gpu_common.device_time); here
  # the backend and the trace are stand-ins that record what they were handed.
  import jax

  from experiments._timing import Timing
  from experiments.bench import _gpu_common
  from experiments.bench import engine_step as es
  from paxcache.engine import Engine, EngineConfig, Request

  model = es.build_model("micro", max_seq_len=64)
  engine = Engine(model, EngineConfig(num_blocks=32, block_size=16, async_scheduling=True))
  captured = []
  build = engine._build_batch

  def capture(plan):
    batch = build(plan)
    if batch.decode_only:
      captured.append(batch)
    return batch

  engine._build_batch = capture
  engine.run([Request(i, [1, 2, 3], max_new_tokens=6) for i in range(2)])
  assert len(captured) >= 3
  traced = []

  def fake_device_spans(call, *, runs, per_run):
    tokens = call()
    traced.append((runs, per_run, type(tokens)))
    if len(traced) == 2:
      raise RuntimeError("41 device events do not split into 7 runs")
    return Timing.of([0.001 * len(traced)] * runs), Timing.of([0.0005 * len(traced)] * runs)

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(_gpu_common, "device_spans", fake_device_spans)
  args = type("A", (), dict(inner=2, replay_max=3, replay_runs=7))
  out = es._replay_ms(engine, captured, args)
  n = len(captured)
  replayed = [i in (0, (n - 1) / 2, n - 1) or i == round((n - 1) / 2) for i in range(n)]
  assert [x is not None for x in out["clock"]] == replayed
  assert [r[:2] for r in traced] == [(7, 1)] * 3
  assert all(issubclass(t, jax.Array) for *_, t in traced)
  # The second batch's trace did not split: no traced time there, the others kept.
  first, middle = replayed.index(True), replayed.index(True, replayed.index(True) + 1)
  assert out["trace"][first] == pytest.approx(1.0) and out["busy"][first] == pytest.approx(0.5)
  assert out["trace"][middle] is None and out["busy"][middle] is None
  assert out["trace"][-1] == pytest.approx(3.0) and out["busy"][-1] == pytest.approx(1.5)
  assert all(x > 0 for x in out["put_clock"] if x is not None)
  # The pool went back to the engine, usable: one more request runs on it.
  engine._build_batch = build
  assert len(engine.run([Request(9, [4, 5], max_new_tokens=3)])[9].samples[0]) == 3


def test_device_time_is_each_runs_kernel_span(monkeypatch):
  # Three runs of two kernels each (ns): each run's span from its first start to its last
  # end, gaps between runs left out; a count that does not split into the runs raises.
  from experiments.bench import _gpu_common

  events = [("a", 0, 10), ("b", 15, 5), ("a", 100, 10), ("b", 112, 20)]
  events += [("a", 200, 5), ("b", 205, 5)]
  monkeypatch.setattr(_gpu_common, "trace_kernels", lambda call, runs: events)
  t = _gpu_common.device_time(None, runs=3, per_run=2)
  assert sorted(t.samples) == pytest.approx([5e-9, 10e-9, 16e-9])
  span, busy = _gpu_common.device_spans(None, runs=3, per_run=2)
  assert span.samples == t.samples
  assert busy.samples == pytest.approx([7.5e-9, 15e-9, 5e-9])  # kernel time, gaps left out
  monkeypatch.setattr(_gpu_common, "trace_kernels", lambda call, runs: events[:5])
  with pytest.raises(RuntimeError, match="do not split"):
    _gpu_common.device_time(None, runs=3, per_run=2)


def test_engine_step_e2e_with_a_shared_prefix_runs_cascade_steps_only_where_asked(tmp_path):
  # Four requests on one 160-token system prompt (10 blocks of 16): the prefix cache hits
  # in both runs; decode steps take cascade attention at the default threshold (8 blocks)
  # and never with 0.
  argv = (
    "--no-step --e2e --models micro --e2e-steady 4x8+12 --e2e-only-steady --e2e-repeats 1 "
    "--e2e-shared-prefix 160 --e2e-cascade 0,default --e2e-pool-gb 0.001 --async-scheduling "
    "--compilation-cache="
  ).split()
  off, on = _bench_rows("engine_step", argv, tmp_path, "engine_e2e.jsonl")
  for row in (off, on):
    assert row["workload"] == "steady4x8+12+prefix160" and row["shared_prefix"] == 160
    assert row["generated_tokens"] == 4 * 12
    assert row["prefix_hit_tokens"] >= 3 * 160  # every request after the first
  assert off["cascade_min_shared_blocks"] == 0 and off["cascade_steps"] == 0
  assert on["cascade_min_shared_blocks"] == 8 and on["cascade_steps"] > 0
  assert on["cascade_off_reason"] in (None, "")


def test_engine_step_e2e_keeps_every_step_of_a_pass_longer_than_the_default_history(tmp_path):
  # 4,210 decode steps in one pass: EngineConfig's default metrics_history (4,096) dropped
  # the first captured steps' records and the row failed with a KeyError.
  argv = (
    "--no-step --e2e --models micro --e2e-steady 1x8+4210 --e2e-only-steady --e2e-repeats 1 "
    "--capture-every 100 --e2e-pool-gb 0.001 --async-scheduling --compilation-cache="
  ).split()
  (row,) = _bench_rows("engine_step", argv, tmp_path, "engine_e2e.jsonl")
  # Steps 100, 200, ..., 4200 captured; 16 of them (--replay-max) replayed, step 100 first.
  assert row["generated_tokens"] == 4210 and row["captured_steps"] == 16


def test_gpu_ragged_smoke_times_the_persistent_experiment_beside_the_planned_kernel(tmp_path):
  # --persistent 1,2:32:3: the persistent planned decode (an experiment) on one and two
  # programs per SM (the second in 32-key steps, 3 stages), on the same data, checked
  # against the default kernel's output.
  argv = ["--smoke", "--nomosaic", "--cases", "long1_short63_b16", "--persistent", "1,2:32:3"]
  rows = _bench_rows("gpu_ragged", argv, tmp_path, "gpu_decode_ragged.jsonl")
  variants = ["default", "planned", "persistent1", "persistent2_32_3"]
  assert [r["variant"] for r in rows] == variants
  for r in rows[2:]:
    assert r["kernel"] == "triton" and r["check_ok"] is True
    assert r["check_rel_l2"] < tolerance("gpu_kernel_vs_reference_rel_l2", "bfloat16").rtol
    assert r["num_chunks"] == rows[1]["num_chunks"]


def test_split_spans_cuts_calls_at_the_longest_idle_gaps():
  # Three calls of a varying number of kernels (ns): the host's waits between them are the
  # longest idle gaps; a copy inside a longer kernel opens no gap of its own.
  from experiments.bench._gpu_common import split_spans

  events = [
    ("a", 0, 10_000),
    ("copy", 2_000, 1_000),  # inside a
    ("b", 12_000, 5_000),  # 2 us launch gap
    ("a", 80_000, 10_000),  # 63 us: the host
    ("a", 200_000, 9_000),  # 110 us: the host
    ("b", 210_000, 4_000),
    ("c", 215_000, 1_000),
  ]
  assert split_spans(events, 3) == pytest.approx([17e-6, 10e-6, 16e-6])
  assert split_spans(events, 1) == pytest.approx([216e-6])
  with pytest.raises(RuntimeError, match="7 device events for 8 calls"):
    split_spans(events, 8)


@pytest.mark.parametrize("module", ["engine_step", "profile_step"])
def test_step_scripts_refuse_an_unknown_gemm_before_building_anything(module, tmp_path):
  from experiments.bench.engine_step import gemm_values

  assert gemm_values("auto,xla") == ["auto", "xla"]
  for bad in ("", "auto,", "cublas", "auto,Pallas"):
    with pytest.raises(SystemExit, match="--gemm takes values of"):
      gemm_values(bad)
  code = (
    "import runpy\n"
    f"sys.argv = ['{module}', '--models', 'micro', '--gemm', 'auto,cublas',"
    f" '--out', '{tmp_path}']\n"
    f"runpy.run_module('experiments.bench.{module}', run_name='__main__')\n"
  )
  proc = _python(code)
  assert proc.returncode != 0
  assert "--gemm takes values of ('auto', 'xla', 'pallas'), got 'auto,cublas'" in proc.stderr
  assert not list(tmp_path.iterdir())  # refused before any output was written
