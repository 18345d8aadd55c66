"""The experiment runner: config files, variants, overrides, sweeps and every output file."""

import copy
import csv
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
from absl import app, flags
from ml_collections import ConfigDict, config_flags

from experiments import _outputs, run

# ml_collections loads config files with the deprecated load_module(); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
# The paper's experiments (issue 7); other configs (e.g. serving a downloaded model) may
# need extras and have no quick variant.
PAPER_EXPERIMENTS = (
  "memory_waste",
  "prefix_sharing",
  "batch_capacity",
  "block_size_ablation",
  "swap_vs_recompute",
  "request_rate",
)


def _parse(argv):
  """Parses ``--config...`` flags the way experiments.run does, into a fresh flag registry."""
  argv = ["prog", *argv]
  fv = flags.FlagValues()
  # config_flags finds the --config.<field> overrides in sys_argv (sys.argv by default).
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
  )
  fv(argv)
  return fv.config


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_is_one_config_per_experiment():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  assert set(PAPER_EXPERIMENTS) <= names
  assert set(PAPER_EXPERIMENTS) == set(run.EXPERIMENTS)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_names_its_experiment_and_documents_its_command(path):
  module = _load(path)
  name = os.path.basename(path)
  doc = module.__doc__
  assert f"python -m experiments.run --config=configs/{name}" in doc
  assert "minute" in doc or "second" in doc, "the docstring gives the expected runtime"
  experiment = module.get_config().experiment
  assert experiment in run.EXPERIMENTS or ":" in experiment
  with pytest.raises(ValueError, match="unknown variant"):
    module.get_config("nope")


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_variant_named_in_a_config_docstring_exists(path):
  module = _load(path)
  name = os.path.basename(path)
  variants = set(re.findall(rf"configs/{re.escape(name)}:(\w+)", module.__doc__))
  for variant in variants:
    assert module.get_config(variant).experiment, variant


@pytest.mark.parametrize("name", PAPER_EXPERIMENTS)
def test_paper_configs_have_a_quick_variant_that_resolves(name):
  module = _load(os.path.join(REPO, "configs", f"{name}.py"))
  for variant in (None, "quick"):
    config = module.get_config(variant)
    assert config.experiment == name
    assert callable(run.resolve_experiment(config.experiment))
  assert f"--config=configs/{name}.py:quick" in module.__doc__


def test_variant_and_overrides_parse_through_config_flags():
  path = os.path.join(REPO, "configs", "memory_waste.py")
  base = _parse([f"--config={path}"])
  quick = _parse([f"--config={path}:quick"])
  assert quick.num_requests < base.num_requests
  over = _parse(
    [
      f"--config={path}:quick",
      "--config.num_requests=17",
      "--config.block_sizes=(4, 8)",
      "--config.workloads=('alpaca',)",
    ]
  )
  assert over.num_requests == 17
  assert over.block_sizes == (4, 8)
  assert over.workloads == ("alpaca",)
  # Repeated flags also set a tuple field: a sweep is one flag per value or one tuple.
  rep = _parse([f"--config={path}", "--config.block_sizes=2", "--config.block_sizes=32"])
  assert rep.block_sizes == (2, 32)


def test_unknown_field_or_wrong_type_is_rejected():
  path = os.path.join(REPO, "configs", "memory_waste.py")
  # ml_collections raises AttributeError for a field that is not in the config.
  with pytest.raises((flags.Error, AttributeError), match="no_such_field"):
    _parse([f"--config={path}", "--config.no_such_field=1"])
  with pytest.raises(flags.Error):
    _parse([f"--config={path}", "--config.num_requests=many"])


def test_unknown_override_field_is_named_with_the_fields_there():
  config = _parse([f"--config={os.path.join(REPO, 'configs', 'memory_waste.py')}"])
  assert run.unknown_field_message(config, ["num_requests", "block_sizes"]) is None
  message = run.unknown_field_message(config, ["seed", "nonexistent"])
  assert message.startswith("--config.nonexistent: config has no field 'nonexistent'")
  assert "block_sizes, contiguous_policies" in message
  nested = ConfigDict({"model": {"width": 8}, "seed": 0})
  assert "config.model has no field 'depth' (fields: width)" in run.unknown_field_message(
    nested, ["model.depth"]
  )
  assert "config.seed is not a ConfigDict" in run.unknown_field_message(nested, ["seed.x"])


def test_field_types_must_match_the_default_config():
  path = os.path.join(REPO, "configs", "memory_waste.py")
  default = _parse([f"--config={path}"])
  ok = _parse(
    [
      f"--config={path}",
      "--config.block_sizes=(4, 8)",
      "--config.workloads=('alpaca',)",
      "--config.arrival_rate=2",  # an int for a float field is fine
    ]
  )
  run.check_field_types(ok, default)
  bad = {
    "block_sizes": "--config.block_sizes=abc",  # ml_collections makes it ('abc',)
    "block_sizes ": "--config.block_sizes=(1, 2.5)",
    "workloads": "--config.workloads=(1,)",
  }
  for field, override in bad.items():
    config = _parse([f"--config={path}", override])
    with pytest.raises(app.UsageError, match=rf"^--config\.{field.strip()}="):
      run.check_field_types(config, default)
  # Nested fields are checked too; a bool is not an int.
  nested_default = ConfigDict({"model": {"sizes": (1, 2)}})
  for value in ((1, True), (1, "2")):
    nested = copy.deepcopy(nested_default)
    nested.model.sizes = value
    with pytest.raises(app.UsageError, match=r"--config\.model\.sizes=.*has type (bool|str)"):
      run.check_field_types(nested, nested_default)


@pytest.mark.parametrize(
  "override, wanted",
  [
    ("--config.nonexistent=1", r"no field 'nonexistent' \(fields: arrival_rate, block_sizes"),
    ("--config.block_sizes=abc", r"--config.block_sizes=\('abc',\): element 'abc' has type str"),
    # Values that used to end in a NumPy or ZeroDivisionError traceback mid-run.
    ("--config.num_requests=0", r"--config.num_requests=0: num_requests must be >= 1"),
    ("--config.block_sizes=(0,)", r"--config.block_sizes=\(0,\): every block size must be >= 1"),
    ("--config.block_sizes=()", r"--config.block_sizes=\(\): block_sizes needs at least one"),
    ("--config.seed=-1", r"--config.seed=-1: seed must be >= 0"),
    ("--sweep=seed=0,-1", r"--sweep seed=-1: --config.seed=-1: seed must be >= 0"),
    # A later --config wins: a file that is not there (a 36-line traceback before).
    ("--config=configs/nope.py:quick", r"no config file 'configs/nope.py' \(this .*memory_waste"),
  ],
)
def test_bad_override_on_the_command_line_is_a_usage_error_and_writes_nothing(
  tmp_path, override, wanted
):
  workdir = tmp_path / "out"
  cmd = [
    sys.executable,
    "-m",
    "experiments.run",
    "--config=configs/memory_waste.py:quick",
    override,
    f"--workdir={workdir}",
  ]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert re.search(wanted, out.stderr), out.stderr[-3000:]
  assert not workdir.exists()


@pytest.mark.parametrize(
  "make_workdir, wanted",
  [
    (
      lambda tmp: tmp / "file" / "out",
      r"--workdir='.*/file/out' cannot be created: '.*/file' is not",
    ),
    (lambda tmp: tmp / "file", r"--workdir='.*/file' exists and is not a directory"),
  ],
  ids=["parent_is_a_file", "workdir_is_a_file"],
)
def test_unwritable_workdir_is_a_usage_error_naming_it(tmp_path, make_workdir, wanted):
  (tmp_path / "file").write_text("not a directory")
  workdir = make_workdir(tmp_path)
  cmd = [
    sys.executable,
    "-m",
    "experiments.run",
    "--config=configs/memory_waste.py:quick",
    f"--workdir={workdir}",
  ]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert re.search(wanted, out.stderr), out.stderr[-3000:]
  assert (tmp_path / "file").read_text() == "not a directory"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
  with pytest.raises(ValueError, match=wanted):
    run.run_experiment(_tiny_memory_config(), str(workdir))


def test_unwritable_directory_is_named(tmp_path, monkeypatch):
  # os.access is what the check asks (root may write anywhere, so it is faked here).
  monkeypatch.setattr(run.os, "access", lambda path, mode: False)
  with pytest.raises(ValueError, match=r"--workdir='.*' is not writable"):
    run.check_workdir(str(tmp_path))
  missing = tmp_path / "new" / "deeper"
  with pytest.raises(
    ValueError,
    match=rf"--workdir='{re.escape(str(missing))}' cannot be created: "
    rf"'{re.escape(str(tmp_path))}' is not writable",
  ):
    run.check_workdir(str(missing))


def test_config_values_no_experiment_can_run_with_are_named():
  config = ConfigDict(
    {
      "seed": 0,
      "num_requests": 10,
      "block_sizes": (4, 16),
      "workloads": ("sharegpt",),
      "kernel_iters": 5,
      "kernel_inner": 1,
      "engine": {"seed": 0, "block_size": 16, "repeats": 5},
    }
  )
  run.check_config_values(config)
  bad = [
    ("seed", -1, r"^--config\.seed=-1: seed must be >= 0"),
    ("num_requests", 0, r"^--config\.num_requests=0: num_requests must be >= 1"),
    ("num_requests", -5, r"^--config\.num_requests=-5:"),
    (
      "block_sizes",
      (4, 0),
      r"^--config\.block_sizes=\(4, 0\): every block size must be >= 1, got 0",
    ),
    ("block_sizes", (), r"^--config\.block_sizes=\(\): block_sizes needs at least one"),
    ("engine.seed", -3, r"^--config\.engine\.seed=-3: seed must be >= 0"),
    ("engine.block_size", 0, r"^--config\.engine\.block_size=0: block_size must be >= 1"),
    # Every timing is the median of at least 5 repeats (issue 19, item 5).
    ("kernel_iters", 1, r"^--config\.kernel_iters=1: kernel_iters must be >= 5"),
    ("engine.repeats", 4, r"^--config\.engine\.repeats=4: repeats must be >= 5"),
    ("kernel_inner", 0, r"^--config\.kernel_inner=0: kernel_inner \(calls per timed sample\)"),
  ]
  for path, value, match in bad:
    cfg = copy.deepcopy(config)
    run._set_field(cfg, path, value)
    with pytest.raises(ValueError, match=match):
      run.check_config_values(cfg)
  # A ShareGPT JSON file alone takes num_requests <= 0 as "all of its conversations"
  # (documented in experiments.workloads); a synthetic workload beside it does not.
  tiny = os.path.join(os.path.dirname(__file__), "data", "sharegpt_tiny.json")
  json_only = copy.deepcopy(config)
  json_only.workloads = (tiny, tiny)
  json_only.num_requests = 0
  run.check_config_values(json_only)
  json_only.workloads = (tiny, "alpaca")
  with pytest.raises(ValueError, match="num_requests must be >= 1"):
    run.check_config_values(json_only)
  single = ConfigDict({"workload": tiny, "num_requests": 0})
  run.check_config_values(single)
  single.workload = "sharegpt"
  with pytest.raises(ValueError, match="num_requests must be >= 1"):
    run.check_config_values(single)


def test_bad_values_and_sweeps_raise_before_the_workdir_is_written(tmp_path):
  config = _tiny_memory_config()
  workdir = tmp_path / "out"
  bad = copy.deepcopy(config)
  bad.seed = -1
  with pytest.raises(ValueError, match=r"--config\.seed=-1"):
    run.run_experiment(bad, str(workdir))
  with pytest.raises(ValueError, match=r"--sweep seed=-1: --config\.seed=-1"):
    run.run_experiment(config, str(workdir), sweep="seed=3,-1")
  with pytest.raises(ValueError, match=r"--sweep seed='x': .*seed"):
    run.run_experiment(config, str(workdir), sweep="seed=3,x")
  with pytest.raises(ValueError, match="not in the config"):
    run.run_experiment(config, str(workdir), sweep="nope=1,2")
  with pytest.raises(ValueError, match=r"--sweep takes a scalar field; block_sizes is a tuple"):
    run.run_experiment(config, str(workdir), sweep="block_sizes=8,16")
  assert not workdir.exists()


def _fail_after_the_experiment(monkeypatch):
  """Every experiment the runner resolves runs whole, then raises RuntimeError."""
  real = run.resolve_experiment

  def failing(name):
    fn = real(name)

    def experiment(cfg):
      fn(cfg)
      raise RuntimeError("it failed")

    return experiment

  monkeypatch.setattr(run, "resolve_experiment", failing)


@pytest.mark.parametrize("where", ["experiment", "writing"])
def test_a_run_that_fails_leaves_the_earlier_runs_files_as_they_were(tmp_path, monkeypatch, where):
  run.run_experiment(_tiny_memory_config(), str(tmp_path))
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  if where == "experiment":  # the whole run, then a failure at its end
    _fail_after_the_experiment(monkeypatch)
  else:  # every table and plot written, then a failure (a plot's drawing code)
    real = _outputs.write_result

    def half_written(result, workdir):
      real(result, workdir)
      raise RuntimeError("it failed")

    monkeypatch.setattr(_outputs, "write_result", half_written)
  config = _tiny_memory_config()
  config.pool_tokens = 2048
  with pytest.raises(RuntimeError, match="it failed"):
    run.run_experiment(config, str(tmp_path))
  # Nothing new in the workdir, no staging folder left behind: config.json still describes
  # the results beside it (pool_tokens 1024, not 2048).
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
  assert json.loads((tmp_path / "config.json").read_text())["pool_tokens"] == 1024


def test_a_run_removes_what_the_run_before_it_wrote_and_it_did_not(tmp_path):
  config = _tiny_memory_config()
  run.run_experiment(config, str(tmp_path), sweep="pool_tokens=512,1024")
  swept = sorted(p.name for p in tmp_path.glob("*__pool_tokens-*"))
  assert swept and all(n.endswith((".png", ".pdf")) for n in swept)
  (tmp_path / "notes.txt").write_text("mine")  # not the runner's: stays
  run.run_experiment(config, str(tmp_path))
  names = {p.name for p in tmp_path.iterdir()}
  assert not names & set(swept)  # the sweep's plots went with the sweep
  assert "notes.txt" in names and "memory_breakdown.png" in names
  info = json.loads((tmp_path / "run_info.json").read_text())
  assert set(info["files"]) == names - {"notes.txt"}
  # run_info.json lists names only; a doctored list cannot remove files outside the workdir
  outside = tmp_path.parent / f"{tmp_path.name}_outside.txt"
  outside.write_text("keep")
  info["files"] += [f"../{outside.name}", str(outside), "notes.txt/.."]
  (tmp_path / "run_info.json").write_text(json.dumps(info))
  run.run_experiment(config, str(tmp_path))
  assert outside.read_text() == "keep" and (tmp_path / "notes.txt").exists()


def test_a_sweeps_captions_say_each_values_setting(tmp_path):
  # The stacked tables used the first value's caption for every row: a pool of 512 slots
  # said of the rows that ran at 1024 (and in the LaTeX a paper would paste).
  run.run_experiment(_tiny_memory_config(), str(tmp_path), sweep="pool_tokens=512,1024")
  for name in ("serving.md", "serving.tex", "summary.md"):
    text = (tmp_path / name).read_text().replace("\\_", "_")  # (LaTeX escapes _)
    assert "Rows of a sweep over pool_tokens" in text, name
    assert "pool_tokens = 512: " in text and "pool_tokens = 1024: " in text, name
    assert "pool of 512 slots" in text and "pool of 1024 slots" in text, name


def test_a_run_removes_the_process_folders_of_an_earlier_run_of_more_processes(tmp_path):
  """A distributed run's process i > 0 writes workdir/process<i>/; a later run of fewer
  processes leaves no such folder beside its results, removing only the files each folder's
  run_info.json lists (a folder holding other files keeps them; a link is not followed)."""
  config = _tiny_memory_config()
  for i in (1, 2, 3):  # what processes 1-3 of a 4-process run write
    run.run_experiment(config, str(tmp_path / f"process{i}"))
  (tmp_path / "process2" / "mine.txt").write_text("mine")
  (tmp_path / "process3" / "run_info.json").unlink()  # no list: nothing in it is removed
  outside = tmp_path.parent / f"{tmp_path.name}_elsewhere"
  run.run_experiment(config, str(outside))
  (tmp_path / "process4").symlink_to(outside, target_is_directory=True)
  (tmp_path / "processX").mkdir()  # not a process folder's name
  listed = json.loads((outside / "run_info.json").read_text())["files"]

  run._remove_stale_process_folders(str(tmp_path), 3)  # processes 1 and 2 rewrite theirs
  assert (tmp_path / "process1" / "run_info.json").exists()
  assert (tmp_path / "process2" / "run_info.json").exists()
  run.run_experiment(config, str(tmp_path))  # one process
  names = {p.name for p in tmp_path.iterdir()}
  assert "process1" not in names
  assert [p.name for p in (tmp_path / "process2").iterdir()] == ["mine.txt"]
  assert {p.name for p in (tmp_path / "process3").iterdir()} == set(listed) - {"run_info.json"}
  assert sorted(p.name for p in outside.iterdir()) == sorted(listed)
  assert (tmp_path / "process4").is_symlink() and (tmp_path / "processX").is_dir()


def test_config_values_of_pools_and_kv_dtypes_are_checked_before_a_run(tmp_path):
  config = _tiny_memory_config()
  workdir = tmp_path / "out"
  for path, value, match in [
    ("pool_tokens", -5, r"^--config\.pool_tokens=-5: pool_tokens \(K/V token slots\) must be"),
    ("pool_tokens", 0, r"^--config\.pool_tokens=0:"),
    ("watermark", 1.5, r"^--config\.watermark=1\.5: watermark .* must be in \[0, 1\)"),
    ("watermark", -0.1, r"^--config\.watermark=-0\.1:"),
    ("kv_dtype", "int4", r"^--config\.kv_dtype='int4': kv_dtype must be one of float32, bfloat16"),
    ("kv_dtype", "float8_e5m2", r"got float8_e5m2"),
  ]:
    cfg = copy.deepcopy(config)
    run._set_field(cfg, path, value)
    with pytest.raises(ValueError, match=match):
      run.run_experiment(cfg, str(workdir))
  assert not workdir.exists()
  for key, value, match in [
    ("kv_dtype_axis", ("bfloat16", "uint8"), r"kv_dtype_axis must be one of .*, got uint8"),
    ("kernel_kv_dtype", "int4", r"kernel_kv_dtype must be one of .*, got int4"),
    ("host_pool_tokens", -1, r"host_pool_tokens \(swap slots\) must be >= 0"),
  ]:
    with pytest.raises(ValueError, match=match):
      run.check_config_values(ConfigDict({key: value}))
  for ok in (
    {"kv_dtype_axis": ("bfloat16", "int8", "float8_e4m3fn"), "kernel_kv_dtype": ""},
    {"kv_dtype_axis": (), "kernel_kv_dtype": "int8"},  # (): batch_capacity's "no such table"
    {"kernel_kv_dtype": "bfloat16", "watermark": 0.0, "host_pool_tokens": 0},
  ):
    run.check_config_values(ConfigDict(ok))


def test_a_failed_run_removes_the_empty_workdir_it_created(tmp_path, monkeypatch):
  _fail_after_the_experiment(monkeypatch)
  workdir = tmp_path / "new" / "out"
  with pytest.raises(RuntimeError, match="it failed"):
    run.run_experiment(_tiny_memory_config(), str(workdir))
  assert not workdir.exists()  # (its parent, made on the way, stays: it was not the run's)
  (tmp_path / "kept").mkdir()  # a workdir that was there before the run stays
  with pytest.raises(RuntimeError, match="it failed"):
    run.run_experiment(_tiny_memory_config(), str(tmp_path / "kept"))
  assert (tmp_path / "kept").is_dir()
  # A failure while writing the files (after the experiment ran) likewise.
  monkeypatch.undo()

  def half_written(result, workdir):
    raise OSError("disk full")

  monkeypatch.setattr(_outputs, "write_result", half_written)
  with pytest.raises(OSError, match="disk full"):
    run.run_experiment(_tiny_memory_config(), str(workdir))
  assert not workdir.exists()


def test_without_matplotlib_the_tables_are_written_and_the_plots_named(tmp_path, monkeypatch):
  # The plot extra is optional (README): a finished run used to lose its tables to the
  # ImportError at the first plot.
  warnings = []
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
  monkeypatch.setattr(_outputs.logging, "warning", lambda msg, *a: warnings.append(msg % a))
  run.run_experiment(_tiny_memory_config(), str(tmp_path))
  names = {p.name for p in tmp_path.iterdir()}
  assert {"serving.md", "snapshot.md", "results.jsonl", "config.json", "run_info.json"} <= names
  assert not [n for n in names if n.endswith((".png", ".pdf"))]
  assert len(warnings) == 1 and "matplotlib is not installed" in warnings[0]
  assert "memory_breakdown" in warnings[0]


def test_workloads_policies_and_serving_fields_are_checked_before_a_run(tmp_path):
  # Each of these used to end the experiment with a traceback after the workdir was made,
  # or (workloads=(), arrival_rate < 0, max_batch < 0) run and write a silent wrong result.
  config = _tiny_memory_config()
  workdir = tmp_path / "out"
  for path, value, match in [
    ("workloads", (), r"^--config\.workloads=\(\): workloads needs at least one workload"),
    ("workloads", ("sharegptt",), r"unknown workload 'sharegptt': expected one of"),
    ("workloads", ("sharegpt", "/no/such.json"), r"workload file '/no/such\.json' does not"),
    ("contiguous_policies", ("maxx",), r"^--config\.contiguous_policies=\('maxx',\): at least"),
    ("contiguous_policies", (), r"^--config\.contiguous_policies=\(\): at least one policy"),
    ("max_seq_len", 0, r"^--config\.max_seq_len=0: max_seq_len \(prompt \+ output tokens\)"),
    ("arrival_rate", -1.0, r"^--config\.arrival_rate=-1\.0: arrival_rate \(requests a step\)"),
    ("arrival_rate", float("inf"), r"^--config\.arrival_rate=inf:"),
    ("max_batch", -2, r"^--config\.max_batch=-2: max_batch must be >= 0"),
  ]:
    cfg = copy.deepcopy(config)
    run._set_field(cfg, path, value)
    with pytest.raises(ValueError, match=match):
      run.run_experiment(cfg, str(workdir))
  assert not workdir.exists()
  for fields, match in [
    ({"kv_budget_gib": -1.0}, r"^--config\.kv_budget_gib=-1\.0: kv_budget_gib \(GiB of K/V\)"),
    ({"kv_budget_gib": 0}, r"kv_budget_gib"),
    ({"workload": "sharegptt"}, r"^--config\.workload='sharegptt': unknown workload"),
    ({"cost_model": "cpu_defualt"}, r"^--config\.cost_model='cpu_defualt': one of"),
  ]:
    with pytest.raises(ValueError, match=match):
      run.check_config_values(ConfigDict(fields))
  run.check_config_values(
    ConfigDict({"kv_budget_gib": 0.5, "arrival_rate": 0.0, "max_batch": 0, "max_seq_len": 2})
  )


def test_an_experiments_own_check_config_runs_before_the_workdir_is_written(tmp_path):
  # request_rate.check_config names fields only it has (systems, clock, ...): it ran inside
  # the experiment, after the workdir was created.
  config = _load(os.path.join(REPO, "configs", "request_rate.py")).get_config("quick")
  workdir = tmp_path / "out"
  for path, value, match in [
    ("systems", ("pagd",), r"^--config\.systems=\('pagd',\): pick from"),
    ("clock", "simulted", r"^--config\.clock='simulted': one of"),
  ]:
    cfg = copy.deepcopy(config)
    run._set_field(cfg, path, value)
    with pytest.raises(ValueError, match=match):
      run.run_experiment(cfg, str(workdir))
    # Under a sweep, the message names the swept value first.
    with pytest.raises(ValueError, match="^--sweep seed=0: " + match.lstrip("^")):
      run.prepare_run(cfg, str(workdir), "seed=0,1")
  assert not workdir.exists()


def test_resolve_experiment_errors_name_the_choices():
  with pytest.raises(ValueError, match="neither one of.*memory_waste"):
    run.resolve_experiment("nonsense")
  with pytest.raises(ValueError, match="has no 'nope'"):
    run.resolve_experiment("experiments.memory_waste:nope")


def test_parse_sweep():
  assert run.parse_sweep("pool_tokens=1024, 2048") == ("pool_tokens", [1024, 2048])
  assert run.parse_sweep("workload=alpaca,sharegpt") == ("workload", ["alpaca", "sharegpt"])
  with pytest.raises(ValueError, match="--sweep must look like"):
    run.parse_sweep("pool_tokens")


def _tiny_memory_config():
  path = os.path.join(REPO, "configs", "memory_waste.py")
  return _parse(
    [
      f"--config={path}:quick",
      "--config.num_requests=40",
      "--config.pool_tokens=1024",
      "--config.max_seq_len=256",
      "--config.block_sizes=(4, 16)",
      "--config.workloads=('alpaca',)",
    ]
  )


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_run_writes_every_output_with_the_right_rows(tmp_path):
  result = run.run_experiment(_tiny_memory_config(), str(tmp_path))
  tables = {t.name: t for t in result.tables}
  assert set(tables) == {"serving", "snapshot", "workloads"}
  assert len(tables["serving"].rows) == 3 + 2  # Orca x 3 + two block sizes

  for name in ("config.json", "run_info.json", "results.jsonl", "summary.md"):
    assert os.path.getsize(tmp_path / name) > 0, name
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["num_requests"] == 40 and config["block_sizes"] == [4, 16]
  assert config["variant"] is None and config["sweep"] is None  # no :variant, no --sweep
  info = json.loads((tmp_path / "run_info.json").read_text())
  assert info["experiment"] == "memory_waste" and info["seconds"] > 0
  # Provenance: the commit checked out here, and whether the tree was clean at the start.
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
  assert info["git_commit"] == head.stdout.strip()
  assert isinstance(info["git_clean"], bool)
  assert info["git_clean"] == (info["git_uncommitted_files"] == 0)

  lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert len(lines) == sum(len(t.rows) for t in result.tables)
  assert [x["system"] for x in lines if x["table"] == "serving"] == [
    r["system"] for r in tables["serving"].rows
  ]

  for name, table in tables.items():
    rows = _read_csv(tmp_path / f"{name}.csv")
    assert len(rows) == len(table.rows)
    assert list(rows[0])[: len(table.columns)] == [c.key for c in table.columns]
    md = (tmp_path / f"{name}.md").read_text().splitlines()
    table_lines = [x for x in md if x.startswith("|")]
    assert len(table_lines) == 2 + len(table.rows)  # header, rule, rows
    tex = (tmp_path / f"{name}.tex").read_text()
    for token in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}"):
      assert token in tex
    assert tex.count(r" \\") == 1 + len(table.rows)

  for plot in result.plots:
    png = (tmp_path / f"{plot.name}.png").read_bytes()
    pdf = (tmp_path / f"{plot.name}.pdf").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert pdf.startswith(b"%PDF") and len(pdf) > 1000


def test_sweep_stacks_rows_with_the_field_first(tmp_path):
  config = _tiny_memory_config()
  result = run.run_experiment(config, str(tmp_path), sweep="pool_tokens=512,1024")
  serving = next(t for t in result.tables if t.name == "serving")
  assert serving.columns[0].key == "pool_tokens"
  assert [r["pool_tokens"] for r in serving.rows] == [512] * 5 + [1024] * 5
  rows = _read_csv(tmp_path / "serving.csv")
  assert [int(r["pool_tokens"]) for r in rows] == [512] * 5 + [1024] * 5
  assert (tmp_path / "memory_breakdown__pool_tokens-512.png").exists()
  assert (tmp_path / "memory_breakdown__pool_tokens-1024.pdf").exists()
  # config.json shows the values run, not the base config's single value.
  written = json.loads((tmp_path / "config.json").read_text())
  assert config.pool_tokens == 1024 and written["pool_tokens"] == [512, 1024]
  assert written["sweep"] == {"field": "pool_tokens", "values": [512, 1024]}
  with pytest.raises(ValueError, match="not in the config"):
    run.run_experiment(config, str(tmp_path / "bad"), sweep="nope=1,2")


def test_config_json_records_the_variant_and_a_nested_sweep():
  assert run.config_variant("configs/memory_waste.py:quick") == "quick"
  assert run.config_variant("configs/memory_waste.py") is None
  assert run.config_variant("configs/memory_waste.py:") is None
  config = ConfigDict({"experiment": "x", "engine": {"requests": 8, "seed": 0}, "seed": 1})
  record = run.config_record(config, "quick", "engine.requests", [16, 32])
  assert record == {
    "variant": "quick",
    "sweep": {"field": "engine.requests", "values": [16, 32]},
    "engine": {"requests": [16, 32], "seed": 0},
    "experiment": "x",
    "seed": 1,
  }
  assert config.engine.requests == 8  # the config itself is left alone
  with pytest.raises(ValueError, match="'variant' is reserved"):
    run.prepare_run(ConfigDict({"experiment": "memory_waste", "variant": "a"}), "/tmp/unused")


def test_latex_escapes_and_markdown_formats():
  table = _outputs.Table(
    "t_1",
    [_outputs.Column("name"), _outputs.Column("pct", "share %", ".1f")],
    [{"name": "a_b & c", "pct": 12.345}, {"name": "x", "pct": float("nan")}],
    caption="50% of #1",
  )
  tex = _outputs.to_latex(table)
  assert r"a\_b \& c & 12.3 \\" in tex
  assert r"\caption{50\% of \#1}" in tex and r"\label{tab:t-1}" in tex
  assert r"{lr}" in tex  # text left, numbers right
  md = _outputs.to_markdown(table)
  assert "| a_b & c | 12.3 |" in md and "| x | - |" in md


def test_command_line_end_to_end(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "experiments.run",
    "--config=configs/memory_waste.py:quick",
    "--config.num_requests=20",
    "--config.pool_tokens=1024",
    "--config.max_seq_len=256",
    "--config.block_sizes=(16,)",
    "--config.workloads=('alpaca',)",
    f"--workdir={tmp_path}",
  ]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "wrote" in out.stderr
  assert len(_read_csv(tmp_path / "serving.csv")) == 4
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["variant"] == "quick" and config["num_requests"] == 20
  missing = subprocess.run(
    [sys.executable, "-m", "experiments.run", f"--workdir={tmp_path}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert missing.returncode != 0 and "--config" in missing.stderr


def _git(repo, *args):
  subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)


@pytest.fixture
def git_repo(tmp_path):
  """A repository with one commit and a docs/results/ directory holding a tracked file."""
  repo = tmp_path / "repo"
  (repo / "docs" / "results").mkdir(parents=True)
  (repo / "code.py").write_text("x = 1\n")
  (repo / "docs" / "results" / "old.md").write_text("| a |\n")
  _git(repo, "init", "-q")
  _git(repo, "add", ".")
  _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
  return repo


def test_git_state_records_commit_and_cleanliness(git_repo):
  head = subprocess.run(
    ["git", "rev-parse", "HEAD"], cwd=git_repo, capture_output=True, text=True
  ).stdout.strip()
  assert run.git_state(str(git_repo)) == {
    "git_commit": head,
    "git_clean": True,
    "git_uncommitted_files": 0,
    "git_commit_source": "git",
  }
  (git_repo / "code.py").write_text("x = 2\n")  # modified
  (git_repo / "new.py").write_text("")  # untracked counts too
  assert run.git_state(str(git_repo)) == {
    "git_commit": head,
    "git_clean": False,
    "git_uncommitted_files": 2,
    "git_commit_source": "git",
  }


def test_git_state_outside_a_repository_is_unknown(tmp_path, monkeypatch):
  monkeypatch.delenv("PAXCACHE_COMMIT", raising=False)
  assert run.git_state(str(tmp_path)) == {
    "git_commit": None,
    "git_clean": None,
    "git_uncommitted_files": None,
    "git_commit_source": None,
  }
  run.check_results_provenance(str(tmp_path / "docs" / "results"), cwd=str(tmp_path))


@pytest.mark.parametrize("clean, want", [("1", True), ("0", False), ("", None), ("yes", None)])
def test_git_state_outside_a_repository_takes_the_commit_from_the_environment(
  tmp_path, monkeypatch, clean, want
):
  # A copy of the tree on a device machine has no .git: whoever copied it names the commit.
  monkeypatch.setenv("PAXCACHE_COMMIT", " 0123abc\n")
  monkeypatch.setenv("PAXCACHE_GIT_CLEAN", clean)
  assert run.git_state(str(tmp_path)) == {
    "git_commit": "0123abc",
    "git_clean": want,
    "git_uncommitted_files": None,
    "git_commit_source": "PAXCACHE_COMMIT",
  }


def test_git_state_environment_wins_over_a_stale_git(git_repo, monkeypatch):
  # A device copy can carry an old .git: the stated commit wins and git's HEAD is recorded.
  head = run.git_state(str(git_repo))["git_commit"]
  monkeypatch.setenv("PAXCACHE_COMMIT", "0123abc")
  monkeypatch.setenv("PAXCACHE_GIT_CLEAN", "1")
  assert run.git_state(str(git_repo)) == {
    "git_commit": "0123abc",
    "git_clean": True,
    "git_uncommitted_files": None,
    "git_commit_source": "PAXCACHE_COMMIT",
    "git_head_seen": head,
  }
  # Stating git's own commit (short or full): git decides, so a dirty checkout stays dirty
  # whatever PAXCACHE_GIT_CLEAN says.
  monkeypatch.setenv("PAXCACHE_COMMIT", head[:7])
  assert run.git_state(str(git_repo)) == {
    "git_commit": head,
    "git_clean": True,
    "git_uncommitted_files": 0,
    "git_commit_source": "git",
  }
  (git_repo / "new.py").write_text("")
  assert run.git_state(str(git_repo))["git_clean"] is False


def test_dirty_tree_refuses_docs_results_but_not_scratch_dirs(git_repo, tmp_path, monkeypatch):
  results = git_repo / "docs" / "results"
  # Clean: docs/results/ and a new directory under it are fine.
  assert run.check_results_provenance(str(results / "x"), cwd=str(git_repo))["git_clean"]
  (git_repo / "code.py").write_text("x = 2\n")
  (git_repo / "scratch.txt").write_text("")
  (results / "old.md").write_text("| b |\n")
  for workdir in (results, results / "memory_waste" / "full"):
    with pytest.raises(ValueError, match=r"under docs/results/.* 3 uncommitted") as e:
      run.check_results_provenance(str(workdir), cwd=str(git_repo))
    assert "outside docs/results/" in str(e.value)  # says how to write scratch output
  # A relative workdir is resolved against the current directory, as the run writes it.
  monkeypatch.chdir(git_repo / "docs")
  with pytest.raises(ValueError, match="3 uncommitted"):
    run.check_results_provenance("results/new", cwd=str(git_repo))
  # Anywhere else is scratch output, dirty tree or not; a sibling named like it too.
  for workdir in (tmp_path / "scratch", git_repo / "docs" / "results_old", git_repo / "docs"):
    state = run.check_results_provenance(str(workdir), cwd=str(git_repo))
    assert state["git_clean"] is False and state["git_uncommitted_files"] == 3


def test_run_into_docs_results_from_a_dirty_tree_writes_nothing(tmp_path, monkeypatch):
  results = tmp_path / "docs" / "results" / "run"
  monkeypatch.setattr(
    run,
    "git_state",
    lambda cwd=None: {"git_commit": "abc", "git_clean": False, "git_uncommitted_files": 1},
  )
  monkeypatch.setattr(run, "_git", lambda *a, cwd=None: str(tmp_path))  # the "repo root"
  with pytest.raises(ValueError, match="1 uncommitted"):
    run.run_experiment(_tiny_memory_config(), str(results))
  assert not results.exists()


def test_a_launched_process_refuses_a_config_that_is_not_distributed(tmp_path, monkeypatch):
  # Under paxcache.launch every process would otherwise run the whole experiment alone.
  monkeypatch.setenv("PAXCACHE_NUM_PROCESSES", "2")
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match=r"one of 2 processes .*--config.engine.distributed=True"):
    run.run_experiment(_tiny_memory_config(), str(workdir))
  assert not workdir.exists()  # refused before anything was written
  monkeypatch.setenv("PAXCACHE_NUM_PROCESSES", "1")  # one process: runs as before
  run.run_experiment(_tiny_memory_config(), str(workdir))
  assert (workdir / "summary.md").exists()
