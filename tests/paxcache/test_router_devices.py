"""Data-parallel replicas on simulated CPU devices (issue 17 items 3 and 4): 2 replicas x 2
devices in one process, and in two processes on localhost (``jax.distributed``, CPU
collectives over gloo), against each replica's requests served alone, one replica at a
time. The device count is fixed when jax starts, so everything runs in subprocesses of
tests/paxcache/router_checks.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from paxcache import distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKS = os.path.join(REPO, "tests", "paxcache", "router_checks.py")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)


def _last_json(text: str) -> dict:
  return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single():
  proc = subprocess.run(
    [sys.executable, CHECKS, "single"],
    cwd=REPO,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return _last_json(proc.stdout)


def spawn(num_processes: int, timeout: float) -> list[dict]:
  """Runs ``router_checks.py worker`` as ``num_processes`` processes of one job on this
  machine with ``paxcache.distributed.launch`` (a coordinator on a free 127.0.0.1 port,
  the job in ``PAXCACHE_*`` variables); returns each process's result, by process index.
  The launcher stops every process if one fails or the time runs out."""
  lines: list[str] = []
  with tempfile.TemporaryDirectory() as tmp:
    env = dict(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, ROUTER_CHECKS_OUT=tmp)
    rc = distributed.launch(
      [CHECKS, "worker"], num_processes, timeout_s=timeout, cwd=REPO, env=env, output=lines.append
    )
    assert rc == 0, "\n".join(line for line in lines if "Gloo" not in line)[-4000:]
    results = []
    for p in range(num_processes):
      with open(os.path.join(tmp, f"worker{p}.json")) as f:
        results.append(json.load(f))
  return results


def _check_prefix_and_balance(run: dict):
  # The five requests sharing a two-block prefix (odd ids) went to one replica, the five
  # others to the other: the least loaded while the shared replica filled up.
  assert run["placed"] == [0, 1] * 5 and run["routed"] == [5, 5]
  assert run["affinity_hits"] == 4
  shared = run["replicas"][1]
  assert shared["prefix_hit_tokens"] == 4 * 16  # the four later ones hit both blocks
  assert run["replicas"][0]["prefix_hit_tokens"] == 0


def test_two_replicas_in_one_process(single):
  assert single["device_count"] == 4 and single["local"] == [0, 1]
  assert single["mesh_devices"] == [[0, 1], [2, 3]]
  assert single["pool_devices"] == [[0, 1], [2, 3]]  # each replica's pool on its own row
  _check_prefix_and_balance(single)
  alone = single["alone"]
  assert len(single["outputs"]) == 10
  assert single["outputs"] == alone["outputs"]
  for got, want in zip(single["replicas"], alone["replicas"], strict=True):
    for k in ("steps", "generated_tokens", "prefix_hit_tokens", "preemptions_swap", "cow_copies"):
      assert got[k] == want[k], k
  # The shared replica ran short of blocks: swap preemptions happened and came back.
  assert single["replicas"][1]["preemptions_swap"] > 0
  assert single["used_blocks"] == [0, 0] and single["used_host_blocks"] == [0, 0]
  assert single["model_untouched"]  # Router.build shards copies, not the decoder it is given
  # The data axis second: replica r is column r, with the model axis kept.
  assert single["meshes"]["columns"] == [[[0, 2], ["model"]], [[1, 3], ["model"]]]
  assert single["meshes"]["span_error"] is None  # one process owns every replica
  total = single["total"]
  assert total["finished_requests"] == 10
  assert total["generated_tokens"] == sum(r["generated_tokens"] for r in single["replicas"])


def test_two_replicas_in_two_processes(single):
  runs = spawn(2, timeout=240)
  for p, run in enumerate(runs):
    assert run["process_index"] == p and run["device_count"] == 4
    assert run["local"] == [p]  # each process serves the replica on its own two devices
    assert run["pool_devices"] == [run["mesh_devices"][p]]
    _check_prefix_and_balance(run)
    # Every process returns every output: those of each replica served alone.
    assert run["outputs"] == single["alone"]["outputs"]
    assert run["used_blocks"] == [0] and run["used_host_blocks"] == [0]
    # Replicas whose devices lie in two processes are refused, naming them.
    assert "belong to processes [0, 1]" in run["meshes"]["span_error"]
    for got, want in zip(run["replicas"], single["alone"]["replicas"], strict=True):
      for k in ("steps", "generated_tokens", "prefix_hit_tokens", "preemptions_swap"):
        assert got[k] == want[k], k
  # The two processes agree on the other's metrics (exchanged every step).
  assert runs[0]["replicas"] == runs[1]["replicas"]
