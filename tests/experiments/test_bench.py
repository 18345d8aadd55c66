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
    "engine_host",
    "engine_step",
    "gpu_check",
    "gpu_decode",
    "host_step",
    "probe_step",
    "profile_step",
    "spmd_scaling",
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
