"""``experiments.bench.cascade --plan-only``: the host planner's time on each case's table.

Runs on any machine (NumPy only, no pools, no device): one run on the 100-row case here,
in a subprocess without ml_collections, as on the GPU machine.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_plan_only_times_the_planner_on_the_case_table(tmp_path):
  code = (
    "import sys, runpy; sys.modules['ml_collections'] = None\n"
    "sys.argv = ['cascade', '--plan-only', '--cases', '100x5000', '--repeats', '5',"
    f" '--out', {str(tmp_path)!r}]\n"
    "runpy.run_module('experiments.bench.cascade', run_name='__main__')\n"
  )
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  (line,) = (tmp_path / "cascade_plan.jsonl").read_text().splitlines()
  row = json.loads(line)
  assert row["case"] == "100x(5000+U[100,500])" and row["batch"] == 100
  assert row["plan_repeats"] == 100  # 20 single-call samples per --repeats
  assert 0 < row["plan_min_ms"] <= row["plan_ms"] <= row["plan_max_ms"]
  # One group: the prompt's 312 full blocks of 16 (5,000 // 16), read once.
  assert row["groups"] == 1 and row["planned_shared_len"] == 312 * 16
  assert row["table_blocks"] == int(np.ceil(5500 / 16))
  assert row["device"].startswith("host CPU") and "load_avg_1min" in row
  assert "| 100x(5000+U[100,500]) | 100 x 344 |" in proc.stdout
  assert not (tmp_path / "cascade.jsonl").exists()  # no device timing in this mode
