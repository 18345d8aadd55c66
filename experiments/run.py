r"""Runs one experiment config and writes its tables, results and plots to a workdir.

Usage::

  python -m experiments.run --config=configs/memory_waste.py:quick --workdir=/tmp/paxcache_run
  python -m experiments.run --config=configs/memory_waste.py \
      --config.block_sizes='(8, 16, 32)' --config.num_requests=500 --workdir=/tmp/mw

Every config file exposes ``get_config(arg=None)`` (``arg`` is the ``:variant`` after the
file name) and names the experiment in ``config.experiment``. Fields are overridden with
``--config.<field>=<value>``; tuple fields (the sweeps, e.g. ``block_sizes``) take
``--config.block_sizes='(1, 2, 4)'``. ``--sweep=<field>=<v1>,<v2>,...`` runs the experiment
once per value of any scalar field and stacks the tables, with the field as first column.

Written to the workdir: ``config.json`` (the resolved config, with ``"variant"``, the
``:variant`` picked or null, and ``"sweep"``, ``{"field", "values"}`` or null; a swept field
holds the list of values run, not the base value), ``run_info.json`` (date, versions, git
commit and whether the tree was clean, command, seconds, and ``files``: every file the run
wrote), ``results.jsonl`` (every table row, with a ``"table"`` key), per table
``<name>.csv``, ``<name>.md``, ``<name>.tex`` (booktabs), ``summary.md``, and per plot
``<name>.png`` and ``<name>.pdf``. Nothing in the workdir changes until the experiment has
run: a run that fails leaves the files of the run before it as they were. A run that
succeeds removes the files the run before it wrote (its ``run_info.json`` lists them) and
it did not write again, such as an earlier sweep's plots, and what an earlier run of more
processes wrote to ``process<i>/`` folders this run has no process for (listed in their
own ``run_info.json``); other files are left alone. A
workdir under ``docs/results/`` is refused while the tree has uncommitted changes.
"""

from __future__ import annotations

import ast
import copy
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from experiments import _outputs
from experiments._timing import MIN_REPEATS

# name in ``config.experiment`` -> "module:function"
EXPERIMENTS = {
  "memory_waste": "experiments.memory_waste:run",
  "prefix_sharing": "experiments.prefix_sharing:run",
  "batch_capacity": "experiments.batch_capacity:run",
  "block_size_ablation": "experiments.block_size_ablation:run",
  "swap_vs_recompute": "experiments.swap_vs_recompute:run",
  "request_rate": "experiments.request_rate:run",
}

_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file, e.g. configs/memory_waste.py:quick.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the outputs (created if missing).")
_SWEEP = flags.DEFINE_string(
  "sweep", None, "Optional '<field>=<v1>,<v2>,...': run once per value of a scalar field."
)


def resolve_experiment(name: str) -> Callable[[ConfigDict], _outputs.Result]:
  """``name`` is a key of :data:`EXPERIMENTS` or a ``"package.module:function"`` path."""
  target = EXPERIMENTS.get(name, name)
  if ":" not in target:
    raise ValueError(
      f"config.experiment={name!r} is neither one of {sorted(EXPERIMENTS)} nor a "
      "'package.module:function' path"
    )
  module_name, fn_name = target.split(":", 1)
  module = importlib.import_module(module_name)
  try:
    return getattr(module, fn_name)
  except AttributeError:
    raise ValueError(f"config.experiment={name!r}: {module_name} has no {fn_name!r}") from None


def parse_sweep(spec: str) -> tuple[str, list]:
  """``"block_size=8,16,32"`` -> ``("block_size", [8, 16, 32])``; non-literals stay strings."""
  field, sep, values = spec.partition("=")
  field = field.strip()
  if not sep or not field or not values.strip():
    raise ValueError(f"--sweep must look like '<field>=<v1>,<v2>,...', got {spec!r}")
  parsed = []
  for text in values.split(","):
    text = text.strip()
    try:
      parsed.append(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      parsed.append(text)
  return field, parsed


def _set_field(config: ConfigDict, path: str, value, *, scalar: bool = False) -> None:
  *parents, leaf = path.split(".")
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise ValueError(f"--sweep field {path!r} is not in the config (fields: {sorted(node)})")
  if scalar and isinstance(node[leaf], tuple | list):
    raise ValueError(
      f"--sweep takes a scalar field; {path} is a {type(node[leaf]).__name__}: give its "
      f"values as --config.{path}='(v1, v2, ...)' (the experiment sweeps them itself)"
    )
  try:
    node[leaf] = value  # ConfigDict type-checks: an int field rejects a str
  except TypeError as e:
    raise ValueError(f"--sweep {path}={value!r}: {e}") from None


def _sweep_value_str(value) -> str:
  return str(value).replace("/", "_").replace(" ", "")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool)


def _is_json_path(workload) -> bool:
  return isinstance(workload, str) and workload.endswith(".json")


def check_config_values(config: ConfigDict, prefix: str = "config") -> None:
  """Raises ``ValueError`` naming the first field whose value no experiment can run with.

  Types are checked against the default config (:func:`check_field_types`); these are the
  values that used to end halfway through a run in a NumPy or ZeroDivisionError traceback.
  Checked wherever the field appears, nested ConfigDicts (``config.engine``) included:

  * ``seed``: ``>= 0`` (NumPy's generators take no negative seed);
  * ``block_size`` ``>= 1``; ``block_sizes`` not empty, every element ``>= 1``;
  * ``rates`` (requests/s) not empty, every element a finite number ``> 0``;
  * ``num_requests`` ``>= 1``, except when every workload beside it (``workload`` or
    ``workloads``) is a ShareGPT JSON file, where ``<= 0`` takes all its conversations;
  * the repeats behind a timing (``iters``, ``kernel_iters``, ``repeats``) ``>= 5``
    (:data:`experiments._timing.MIN_REPEATS`): every reported time is such a median;
    ``kernel_inner`` (calls per sample) ``>= 1``;
  * ``pool_tokens`` ``>= 1``, ``host_pool_tokens`` ``>= 0``; ``watermark`` (the share of
    blocks paged admission keeps free) in ``[0, 1)``;
  * ``kv_dtype``, every element of ``kv_dtype_axis`` (empty: no such table) and
    ``kernel_kv_dtype`` (empty: the kernel's dtype) a dtype a paged cache may hold
    (``kernels.check_kv_dtype``: float32, bfloat16, float16, int8, float8_e4m3fn);
  * ``workloads`` not empty and ``workload``, each a synthetic workload's name or an
    existing ShareGPT ``*.json`` file (:func:`experiments.workloads.check_workload_name`);
    ``contiguous_policies`` not empty, each one of ``experiments._serving``'s policies;
  * ``max_seq_len`` ``>= 2``; ``arrival_rate`` (requests a step, 0: all at once) and
    ``max_batch`` (0: no limit) ``>= 0``; ``kv_budget_gib`` a finite number ``> 0``;
  * with engine runs on, every block size a multiple of ``engine.length_scale``
    (:func:`experiments._engine_bench.check_scaled_block_sizes`);
  * a top-level ``cost_model`` and the fields of a fitted one
    (:func:`experiments._cost_config.check_cost_config`).

  An experiment function may carry its own checks as an attribute,
  ``fn.check_config(config)`` raising ``ValueError``; :func:`prepare_run` calls it after
  these (``experiments.request_rate.run`` has one).
  """
  if prefix == "config":
    from experiments import _engine_bench
    from experiments._cost_config import check_cost_config

    _engine_bench.check_scaled_block_sizes(config)
    if "cost_model" in config:
      check_cost_config(config)
  for key, value in config.items():
    path = f"--{prefix}.{key}={value!r}"
    if isinstance(value, ConfigDict):
      check_config_values(value, f"{prefix}.{key}")
    elif key == "seed" and _is_int(value) and value < 0:
      raise ValueError(f"{path}: seed must be >= 0 (NumPy takes no negative seed)")
    elif key == "block_size" and _is_int(value) and value < 1:
      raise ValueError(f"{path}: block_size must be >= 1")
    elif key == "block_sizes" and isinstance(value, tuple | list):
      if not value:
        raise ValueError(f"{path}: block_sizes needs at least one block size")
      bad = [b for b in value if _is_int(b) and b < 1]
      if bad:
        raise ValueError(f"{path}: every block size must be >= 1, got {bad[0]!r}")
    elif key in ("iters", "kernel_iters", "repeats") and _is_int(value) and value < MIN_REPEATS:
      raise ValueError(
        f"{path}: {key} must be >= {MIN_REPEATS} (every timing is the median of at least "
        f"{MIN_REPEATS} repeats, reported with its min-max spread)"
      )
    elif key == "kernel_inner" and _is_int(value) and value < 1:
      raise ValueError(f"{path}: kernel_inner (calls per timed sample) must be >= 1")
    elif key == "rates" and isinstance(value, tuple | list):
      if not value:
        raise ValueError(f"{path}: rates needs at least one request rate")
      bad = [r for r in value if not isinstance(r, int | float) or not r > 0 or r == float("inf")]
      if bad:
        raise ValueError(f"{path}: every rate must be a finite number > 0 (req/s), got {bad[0]!r}")
    elif key == "pool_tokens" and _is_int(value) and value < 1:
      raise ValueError(f"{path}: pool_tokens (K/V token slots) must be >= 1")
    elif key == "host_pool_tokens" and _is_int(value) and value < 0:
      raise ValueError(f"{path}: host_pool_tokens (swap slots) must be >= 0")
    elif key == "watermark" and isinstance(value, int | float) and not 0 <= value < 1:
      raise ValueError(
        f"{path}: watermark is the share of the pool's blocks paged admission keeps free: "
        "it must be in [0, 1) (0.01 is vLLM's)"
      )
    elif key in ("kv_dtype", "kv_dtype_axis", "kernel_kv_dtype"):
      _check_kv_dtype_field(key, value, path)
    elif key in ("workloads", "workload"):
      from experiments.workloads import check_workload_name

      names = value if key == "workloads" and isinstance(value, tuple | list) else (value,)
      if not names:
        raise ValueError(f"{path}: workloads needs at least one workload")
      for name in names:
        try:
          check_workload_name(name)
        except ValueError as e:
          raise ValueError(f"{path}: {e}") from None
    elif key == "contiguous_policies" and isinstance(value, tuple | list):
      from experiments._serving import CONTIGUOUS_POLICIES

      bad = [p for p in value if p not in CONTIGUOUS_POLICIES]
      if not value or bad:
        raise ValueError(f"{path}: at least one policy, each one of {CONTIGUOUS_POLICIES}")
    elif key == "max_seq_len" and _is_int(value) and value < 2:
      raise ValueError(f"{path}: max_seq_len (prompt + output tokens) must be >= 2")
    elif key == "arrival_rate" and _is_number(value) and not 0 <= value < math.inf:
      raise ValueError(
        f"{path}: arrival_rate (requests a step) must be a finite number >= 0 (0: all at once)"
      )
    elif key == "max_batch" and _is_int(value) and value < 0:
      raise ValueError(f"{path}: max_batch must be >= 0 (0: only memory limits the batch)")
    elif key == "kv_budget_gib" and _is_number(value) and not 0 < value < math.inf:
      raise ValueError(f"{path}: kv_budget_gib (GiB of K/V) must be a finite number > 0")
    elif key == "num_requests" and _is_int(value) and value < 1:
      workloads = config.get("workloads", config.get("workload"))
      workloads = workloads if isinstance(workloads, tuple | list) else [workloads]
      if workloads == [None] or not all(_is_json_path(w) for w in workloads):
        raise ValueError(
          f"{path}: num_requests must be >= 1 (only a run on ShareGPT JSON files alone "
          "takes <= 0 as all of their conversations)"
        )


def _check_kv_dtype_field(key: str, value, path: str) -> None:
  """``kv_dtype`` / ``kv_dtype_axis`` / ``kernel_kv_dtype`` of a config: K/V dtypes a paged
  cache may hold (``kernel_kv_dtype`` may be "", the kernel's dtype); ValueError naming
  ``path``."""
  import kernels

  if key == "kernel_kv_dtype" and value == "":  # "": the kernel's own dtype
    return
  # kv_dtype_axis: () is "no such table" (batch_capacity).
  values = value if key == "kv_dtype_axis" else (value,)
  for v in values:
    try:
      kernels.check_kv_dtype(v, key)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None


# Keys config.json adds beside the config's own fields; no config may have a field named so.
RUN_KEYS = ("variant", "sweep")


def config_variant(config_arg: str | None) -> str | None:
  """``"configs/x.py:quick"`` -> ``"quick"``; no ``:variant`` (or an empty one) -> None.

  Split as ml_collections splits ``--config`` (at the first colon)."""
  if not config_arg:
    return None
  _, sep, variant = config_arg.partition(":")
  return variant if sep and variant else None


def config_record(
  config: ConfigDict, variant: str | None = None, field: str | None = None, values=None
) -> dict:
  """What ``config.json`` holds: the run's variant, its sweep, then the config's fields.

  A swept field holds the list of values the experiment ran with rather than the base
  value no run used."""
  fields = json.loads(config.to_json_best_effort(sort_keys=True))
  if field is not None:
    *parents, leaf = field.split(".")
    node = fields
    for p in parents:
      node = node[p]
    node[leaf] = list(values)
  sweep = None if field is None else {"field": field, "values": list(values)}
  return {"variant": variant, "sweep": sweep, **fields}


def check_workdir(workdir: str) -> None:
  """Raises ``ValueError`` naming ``--workdir`` when it cannot be created or written; writes
  nothing itself (the first missing directory is created only once everything checks)."""
  path = os.path.abspath(workdir)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise ValueError(f"--workdir={workdir!r} exists and is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
      raise ValueError(f"--workdir={workdir!r} is not writable")
    return
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"--workdir={workdir!r} cannot be created: {parent!r} is not a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"--workdir={workdir!r} cannot be created: {parent!r} is not writable")


def prepare_run(
  config: ConfigDict, workdir: str, sweep: str | None = None
) -> tuple[Callable[[ConfigDict], _outputs.Result], str | None, list]:
  """Every check that needs no experiment run, before anything is written.

  Returns the experiment function, the swept field (or None) and the ``(value, config)``
  runs (one ``(None, config)`` without a sweep). Raises ``ValueError`` naming the bad
  field, ``--sweep`` value or ``--workdir`` (also a workdir under ``docs/results/`` while
  the tree has uncommitted changes: :func:`check_results_provenance`).
  """
  fn = resolve_experiment(config.experiment)
  for key in RUN_KEYS:
    if key in config:
      raise ValueError(f"config field {key!r} is reserved: config.json records the run's {key}")
  field, runs = None, [(None, config)]
  if sweep:
    field, values = parse_sweep(sweep)
    runs = []
    for value in values:
      cfg = copy.deepcopy(config)
      _set_field(cfg, field, value, scalar=True)
      runs.append((value, cfg))
  check_experiment = getattr(fn, "check_config", None)  # the experiment's own checks
  for value, cfg in runs:
    try:
      check_config_values(cfg)
      if check_experiment is not None:
        check_experiment(cfg)
    except ValueError as e:
      raise ValueError(f"--sweep {field}={value!r}: {e}" if sweep else str(e)) from None
  check_workdir(workdir)
  check_results_provenance(workdir)
  return fn, field, runs


def run_experiment(
  config: ConfigDict, workdir: str, sweep: str | None = None, *, variant: str | None = None
) -> _outputs.Result:
  """Runs ``config.experiment`` (once, or once per ``--sweep`` value) and writes the workdir.

  ``variant`` (the ``:variant`` the config came from) is recorded in ``config.json``. A bad
  config value, sweep or workdir raises ``ValueError`` (:func:`prepare_run`) before the
  workdir or anything in it is written; an experiment (or the writing of its files) that
  raises leaves the workdir's files as they were, and removes the folders this run
  created if they are still empty.
  """
  start = time.perf_counter()
  from experiments._engine_bench import wants_distributed

  if not wants_distributed(config) and int(os.environ.get("PAXCACHE_NUM_PROCESSES") or 1) > 1:
    raise ValueError(
      f"started as one of {os.environ['PAXCACHE_NUM_PROCESSES']} processes "
      "(PAXCACHE_NUM_PROCESSES, set by paxcache.launch), but the config does not ask for the "
      "distributed engine: every process would run the whole experiment alone and write the "
      "same workdir; add --config.engine.distributed=True (request_rate: "
      "--config.distributed=True)"
    )
  index, count = 0, 1
  # The folders this run makes (the workdir, and process<i>/ in a distributed run): a run
  # that fails removes those still empty, deepest first.
  made = [d for d in (workdir,) if not os.path.exists(d)]
  if wants_distributed(config):
    # One process of a multi-process JAX job: join it before anything touches a device.
    # Process 0 writes the workdir; process i > 0 writes the same files to process<i>/.
    from paxcache import distributed

    index, count = distributed.initialize()
    if index:
      workdir = os.path.join(workdir, f"process{index}")
      made += [workdir] if not os.path.exists(workdir) else []
  fn, field, runs = prepare_run(config, workdir, sweep)
  git = git_state()  # before this run writes anything into the tree
  record = config_record(config, variant, field, [value for value, _ in runs])
  try:
    _probe_workdir(workdir)
    # The experiment runs before anything in the workdir changes: a run that fails leaves
    # an earlier run's files as they were (its config.json still beside its own results).
    if sweep:
      results = []
      for value, cfg in runs:
        logging.info("sweep %s=%r", field, value)
        results.append((value, fn(cfg)))
      result = _stack_sweep(field, results)
    else:
      result = fn(config)
    # Every file is written into a staging folder first (writing can fail too: a plot's
    # drawing code, a duplicate table name), then moved into the workdir, run_info.json
    # last.
    staging = tempfile.mkdtemp(prefix=".paxcache_staging_", dir=workdir)
    try:
      with open(os.path.join(staging, "config.json"), "w") as f:
        f.write(json.dumps(record, indent=2, default=str) + "\n")
      written = _outputs.write_result(result, staging)
      names = ["config.json"] + [os.path.basename(p) for p in written]
      seconds = time.perf_counter() - start
      _write_run_info(staging, config, sweep, seconds, git, names)
      previous = _previous_outputs(workdir)
      for name in names + ["run_info.json"]:
        os.replace(os.path.join(staging, name), os.path.join(workdir, name))
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  except BaseException:
    for d in reversed(made):  # process<i>/ before the workdir holding it
      try:
        os.rmdir(d)  # only if nothing is in it (another process's files stay)
      except OSError:
        pass
    raise
  # Files of the run before this one that this run did not write again (a sweep's plots,
  # a table no longer produced) would sit beside results they do not belong to.
  for name in sorted(previous - {*names, "run_info.json"}):
    try:
      os.remove(os.path.join(workdir, name))
      logging.info("removed %s (written by the run before, not by this one)", name)
    except FileNotFoundError:
      pass
  if index == 0:
    _remove_stale_process_folders(workdir, count)
  for table in result.tables:
    logging.info("\n%s", _outputs.to_markdown(table))
  logging.info("wrote %d files to %s in %.1f s", len(names) + 1, workdir, seconds)
  return result


def _remove_stale_process_folders(workdir: str, count: int) -> None:
  """Removes what an earlier run of more processes wrote to ``process<i>/`` for every ``i
  >= count`` (this run's processes rewrite their own folders): the files its
  ``run_info.json`` lists, then the folder if nothing else is in it. A folder without that
  list, or with other files, keeps them (a workdir may hold other files)."""
  try:
    entries = os.listdir(workdir)
  except OSError:
    return
  for entry in sorted(entries):
    match = re.fullmatch(r"process([1-9][0-9]*)", entry)
    folder = os.path.join(workdir, entry)
    if not match or int(match.group(1)) < count or not os.path.isdir(folder):
      continue
    if os.path.islink(folder):
      continue  # never follow a link out of the workdir
    for name in sorted(_previous_outputs(folder)):
      try:
        os.remove(os.path.join(folder, name))
      except OSError as e:  # this run's results are written: a leftover is not an error
        logging.warning("could not remove %s/%s: %s", entry, name, e)
    try:
      os.rmdir(folder)
      logging.info("removed %s/ (written by an earlier run of more processes)", entry)
    except OSError:
      logging.info("kept %s/: it holds files no earlier run listed", entry)


def _stack_sweep(field: str, results: list) -> _outputs.Result:
  """One table per name, rows of every sweep value with ``field`` as the first column."""
  stacked: dict[str, _outputs.Table] = {}
  captions: dict[str, list[tuple]] = {}  # each value's own caption, by table
  plots, notes = [], []
  for value, result in results:
    for table in result.tables:
      if table.name not in stacked:
        columns = [_outputs.Column(field)] + [c for c in table.columns if c.key != field]
        stacked[table.name] = _outputs.Table(table.name, columns, [], table.caption)
        captions[table.name] = []
      stacked[table.name].rows += [{field: value, **row} for row in table.rows]
      captions[table.name].append((value, table.caption))
    for plot in result.plots:
      name = f"{plot.name}__{field.replace('.', '_')}-{_sweep_value_str(value)}"
      plots.append(_outputs.Plot(name, plot.draw, plot.figsize))
    notes += [f"### {field} = {value!r}", ""] + result.notes + [""]
  for name, table in stacked.items():
    # A caption states its run's settings (pool size, token totals, ...): where the values'
    # captions differ, each is kept with its value rather than the first said of all rows.
    if len({c for _, c in captions[name]}) > 1:
      table.caption = f"Rows of a sweep over {field}; each value's own caption. " + " ".join(
        f"{field} = {value!r}: {caption}" for value, caption in captions[name]
      )
  return _outputs.Result(list(stacked.values()), plots, notes)


def _git(*args: str, cwd: str | None = None) -> str | None:
  try:
    out = subprocess.run(
      ["git", *args],
      capture_output=True,
      text=True,
      timeout=10,
      cwd=cwd or os.path.dirname(os.path.abspath(__file__)),
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


COMMIT_ENV = "PAXCACHE_COMMIT"  # the commit of a copy that is not a git tree (a device machine)
CLEAN_ENV = "PAXCACHE_GIT_CLEAN"  # "1" / "0": whether that commit's tree was clean when copied


def git_state(cwd: str | None = None) -> dict:
  """The commit checked out at ``cwd`` (default: this file's tree) and whether the tree is
  clean: ``git status --porcelain`` empty, untracked files included.

  When ``$PAXCACHE_COMMIT`` is set (a copy of the tree on a device machine) and names
  another commit than git's HEAD, or there is no git tree, the commit is that value and
  cleanliness ``$PAXCACHE_GIT_CLEAN`` ("1" clean, "0" not), as the person who copied the
  tree recorded them: a device copy can carry a stale ``.git`` whose HEAD and status
  describe an older tree (seen on the H200 machine); ``git_head_seen`` then records that
  HEAD. Where the stated commit is git's HEAD, git decides (so the variables cannot make a
  dirty checkout look clean). ``git_commit_source`` says which (``"git"``,
  ``"PAXCACHE_COMMIT"``, or ``None`` with every value ``None``: unknown)."""
  status = _git("status", "--porcelain", cwd=cwd)
  commit = _git("rev-parse", "HEAD", cwd=cwd)
  stated = os.environ.get(COMMIT_ENV, "").strip()
  same = commit is not None and stated and (commit.startswith(stated) or stated.startswith(commit))
  if stated and not same:
    clean = {"1": True, "0": False}.get(os.environ.get(CLEAN_ENV, "").strip())
    state = {
      "git_commit": stated,
      "git_clean": clean,
      "git_uncommitted_files": None,
      "git_commit_source": COMMIT_ENV,
    }
    if commit is not None:
      state["git_head_seen"] = commit
    return state
  return {
    "git_commit": commit,
    "git_clean": None if status is None else not status,
    "git_uncommitted_files": None if status is None else len(status.splitlines()),
    "git_commit_source": None if commit is None else "git",
  }


RESULTS_DIR = os.path.join("docs", "results")  # committed results, relative to the repo root


def check_results_provenance(workdir: str, cwd: str | None = None) -> dict:
  """Returns :func:`git_state`; raises ``ValueError`` when ``workdir`` lies in the
  repository's ``docs/results/`` and the tree is not clean, so that every committed
  ``run_info.json`` names a commit that holds the code which wrote it."""
  state = git_state(cwd)
  top = _git("rev-parse", "--show-toplevel", cwd=cwd)
  if top is None:
    return state
  results = os.path.realpath(os.path.join(top, RESULTS_DIR))
  path = os.path.realpath(workdir)
  if (path == results or path.startswith(results + os.sep)) and not state["git_clean"]:
    raise ValueError(
      f"--workdir={workdir!r} is under {RESULTS_DIR}/, but the tree has "
      f"{state['git_uncommitted_files']} uncommitted or untracked file(s) (git status "
      "--porcelain): commit first, so that run_info.json names a commit holding the code, "
      f"or write scratch output to a workdir outside {RESULTS_DIR}/"
    )
  return state


def _version(pkg: str) -> str | None:
  try:
    return importlib.metadata.version(pkg)
  except importlib.metadata.PackageNotFoundError:
    return None


def _probe_workdir(workdir: str) -> None:
  """Creates ``workdir`` and checks that a file can be written in it (what
  :func:`check_workdir` cannot see: root on a read-only mount, a race), writing nothing
  that stays; ``ValueError`` otherwise."""
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".paxcache_probe_", dir=workdir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"--workdir={workdir!r} cannot be written: {e}") from e


def _previous_outputs(workdir: str) -> set[str]:
  """The files the workdir's last run wrote (``run_info.json``'s ``files``) that are still
  there; empty for a new workdir, or one whose run_info.json predates that list (nothing
  is then removed: a workdir may hold other files)."""
  try:
    with open(os.path.join(workdir, "run_info.json")) as f:
      names = json.load(f).get("files", [])
  except (OSError, ValueError, AttributeError):
    return set()
  # Names only (the runner writes none in subfolders): never a path out of the workdir.
  return {
    n
    for n in names
    if isinstance(n, str)
    and n == os.path.basename(n)
    and n not in ("", ".", "..")
    and os.path.isfile(os.path.join(workdir, n))
  }


def _write_run_info(
  workdir: str,
  config: ConfigDict,
  sweep: str | None,
  seconds: float,
  git: dict,
  written: list[str],
) -> None:
  """Writes ``run_info.json`` into ``workdir`` (with ``files``: the names of every file the
  run wrote, itself included, so that the next run in its workdir removes what it does
  not write again)."""
  path = os.path.join(workdir, "run_info.json")
  info = {
    "experiment": config.experiment,
    "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "argv": sys.argv,
    "sweep": sweep,
    "seconds": round(seconds, 3),
    # The commit, and whether the tree was clean (git status --porcelain empty) when the
    # run started; where $PAXCACHE_COMMIT is set from it and $PAXCACHE_GIT_CLEAN (see
    # git_state); None: unknown.
    **git,
    "python": platform.python_version(),
    "machine": platform.machine(),
    "versions": {p: _version(p) for p in ("paxcache", "jax", "jaxlib", "numpy", "matplotlib")},
  }
  # Only ask JAX for its device if the experiment already imported it (the memory
  # experiments never do, which keeps them fast on CPU).
  if "jax" in sys.modules:
    jax = sys.modules["jax"]
    dev = jax.devices()[0]
    info["device"] = {
      "platform": dev.platform,
      "kind": dev.device_kind,
      "count": jax.device_count(),
    }
  info["files"] = sorted({os.path.basename(p) for p in written} | {"run_info.json"})
  with open(path, "w") as f:
    json.dump(info, f, indent=2)
    f.write("\n")


def _config_spec_and_overrides(argv: list[str]) -> tuple[str | None, list[str]]:
  """The ``--config`` value (``path[:variant]``) and the ``--config.<path>`` fields in argv."""
  spec, overrides = None, []
  for i, arg in enumerate(argv):
    if m := re.match(r"^--?config(?:=(.*))?$", arg):
      spec = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else None)
    elif m := re.match(r"^--?(?:no)?config\.([^=]+)", arg):
      overrides.append(m.group(1))
  return spec, overrides


def unknown_field_message(config: ConfigDict, overrides: list[str]) -> str | None:
  """Names the first override that is not a field of ``config``, with the fields there."""
  for path in overrides:
    node, walked = config, "config"
    for key in path.split("."):
      if not isinstance(node, ConfigDict) or key not in node:
        fields = sorted(node) if isinstance(node, ConfigDict) else []
        return f"--config.{path}: {walked} has no field {key!r}" + (
          f" (fields: {', '.join(fields)})" if fields else f" ({walked} is not a ConfigDict)"
        )
      node, walked = node[key], f"{walked}.{key}"
  return None


def _fits(value, default) -> bool:
  """``value`` may replace ``default``: same type, an int for a float, never a bool for an int."""
  if isinstance(default, bool) or isinstance(value, bool):
    return type(value) is type(default)
  if isinstance(default, float):
    return isinstance(value, int | float)
  return isinstance(value, type(default))


def check_field_types(config: ConfigDict, default: ConfigDict, prefix: str = "config") -> None:
  """Raises ``app.UsageError`` naming the first field whose type is not its default's.

  ConfigDict checks scalar overrides itself, but a tuple field takes any tuple: a tuple of
  ints (``block_sizes``) must stay a tuple of ints, or the run dies halfway through.
  """
  for key, want in default.items():
    if key not in config or want is None:
      continue
    got, path = config[key], f"{prefix}.{key}"
    if isinstance(want, ConfigDict):
      if not isinstance(got, ConfigDict):
        raise app.UsageError(f"--{path}={got!r}: expected a ConfigDict")
      check_field_types(got, want, path)
      continue
    if isinstance(want, tuple | list):
      if type(got) is not type(want):
        raise app.UsageError(
          f"--{path}={got!r}: expected a {type(want).__name__} like the default {want!r}"
        )
      for item in got:
        if want and not any(_fits(item, w) for w in want):
          kinds = sorted({type(w).__name__ for w in want})
          raise app.UsageError(
            f"--{path}={got!r}: element {item!r} has type {type(item).__name__}, expected "
            f"{' or '.join(kinds)} like the default {want!r}"
          )
    elif not _fits(got, want):
      raise app.UsageError(
        f"--{path}={got!r}: expected a {type(want).__name__} like the default {want!r}"
      )


# Set by _parse_flags when ml_collections fails on an override; main turns it into a UsageError.
_OVERRIDE_ERROR: list[Exception] = []


def _parse_flags(argv: list[str]) -> list[str]:
  """app.run's flag parser: an override naming no field reaches main as an error to explain,
  instead of ml_collections' chained tracebacks."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, IndexError, TypeError) as e:
    _OVERRIDE_ERROR.append(e)
    flags.FLAGS.mark_as_parsed()
    return argv[:1]


def main(argv):
  if _OVERRIDE_ERROR:
    spec, overrides = _config_spec_and_overrides(sys.argv)
    message = None
    if spec is not None:
      message = unknown_field_message(flags.FLAGS["config"].parser.parse(spec), overrides)
    raise app.UsageError(message or f"bad --config override: {_OVERRIDE_ERROR[0]}")
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/<name>.py[:variant] is required")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir=DIR is required")
  # Before the workdir or config.json exist: a bad override must leave nothing behind.
  config_flag = flags.FLAGS["config"]
  config_path = config_flag.config_filename.partition(":")[0]
  if not os.path.isfile(config_path):
    known = sorted(os.listdir(_CONFIGS_DIR)) if os.path.isdir(_CONFIGS_DIR) else []
    raise app.UsageError(
      f"--config={config_flag.config_filename}: no config file {config_path!r} (this "
      f"repository's: {', '.join(n for n in known if n.endswith('.py')) or 'none found'})"
    )
  check_field_types(_CONFIG.value, config_flag.parser.parse(config_flag.config_filename))
  try:
    prepare_run(_CONFIG.value, _WORKDIR.value, _SWEEP.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  variant = config_variant(config_flag.config_filename)
  run_experiment(_CONFIG.value, _WORKDIR.value, _SWEEP.value, variant=variant)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
