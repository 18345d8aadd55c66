"""The request-rate experiment as one JAX job of 2 processes (2 CPU devices each), turned on
by its one config field, and the engine bench's switch in this process."""

from __future__ import annotations

import json
import os

import jax
import pytest
from ml_collections import ConfigDict

from experiments import _engine_bench
from paxcache import distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rows(path: str) -> list[dict]:
  with open(os.path.join(path, "results.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_request_rate_runs_on_two_processes(tmp_path):
  lines: list[str] = []
  args = [
    "-m",
    "experiments.run",
    "--config=configs/request_rate.py:wall",
    "--config.distributed=True",
    "--config.num_requests=5",
    "--config.warmup_requests=5",
    "--config.max_seq_len=48",
    "--config.rates=(50.0,)",
    "--config.systems=('paged',)",
    f"--workdir={tmp_path}",
  ]
  env = {"PYTHONPATH": REPO}
  rc = distributed.launch(
    args, 2, cpu_devices=2, timeout_s=150, cwd=REPO, env=env, output=lines.append
  )
  assert rc == 0, "\n".join(line for line in lines if "Gloo" not in line)[-6000:]
  # Process 0 writes the workdir, process 1 its own copy under process1/. Each process
  # times the run on its own wall clock, so a "sustainable_rate" row (written for a single
  # rate only when its latency is past the bound) may appear on one process and not on
  # the other on a loaded machine (CI saw it): only the measured rows are compared.
  rows0, rows1 = (
    [r for r in _rows(path) if r["table"] == "request_rate"]
    for path in (str(tmp_path), str(tmp_path / "process1"))
  )
  assert len(rows0) == len(rows1) == 1
  r0, r1 = rows0[0], rows1[0]
  assert r0["device"] == r1["device"] == "cpu x 4 over 2 processes"
  # The same schedule on both processes (timings differ: each reads its own clock).
  for key in ("requests", "steps", "max_batch", "preemptions"):
    assert r0[key] == r1[key], key
  assert r0["requests"] == 5 and r0["steps"] > 0


def test_one_config_field_turns_the_distributed_engine_on():
  from paxcache.engine import DistributedEngine, Engine, EngineConfig

  ec = _engine_bench.default_engine_config(requests=1)
  assert ec.distributed is False
  assert not _engine_bench.wants_distributed(ConfigDict({"engine": ec}))
  ec.distributed = True
  assert _engine_bench.wants_distributed(ConfigDict({"engine": ec}))
  assert _engine_bench.wants_distributed(ConfigDict({"distributed": True}))
  ec.d_model, ec.mlp_dim, ec.max_seq_len = 16, 32, 32
  model = _engine_bench.make_model(ec)
  cfg = EngineConfig(num_blocks=8, block_size=4, num_host_blocks=4)
  plain = _engine_bench.make_engine(model, cfg)
  assert type(plain) is Engine and plain.config.mesh is None
  # One process, no jax.distributed: a mesh over this process's devices.
  engine = _engine_bench.make_engine(_engine_bench.make_model(ec), cfg, True)
  assert isinstance(engine, DistributedEngine)
  assert engine.config.mesh.devices.size == jax.device_count()
