"""Multi-controller JAX: 2 processes on 127.0.0.1 with 2 CPU devices each (gloo collectives),
one 4-device mesh, against a single-process run of the same engine (and, in process, the
launcher, the per-host swap pool and DistributedEngine on one process)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paxcache import cache as cache_ops
from paxcache import distributed
from paxcache import sharding as sh
from paxcache.engine import DistributedEngine, Engine, RequestError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKS = os.path.join(REPO, "tests", "paxcache", "multiprocess_checks.py")
sys.path.insert(0, os.path.dirname(CHECKS))
import multiprocess_checks as mc  # noqa: E402

# Seconds for each 2-process job (their sum, 240 s, bounds this file's multi-process part):
# the serve job took 48-78 s on this shared 2-core machine, the divergence job 16-27 s.
SERVE_TIMEOUT_S, DIVERGE_TIMEOUT_S = 150, 90
# |beam score, 4 devices over 2 processes - one device|: each score sums 6 log-softmax
# values of a whole forward pass whose all-reduces add the 4 devices' parts in another
# order than one device's matmuls; measured 2.4e-6, so atol 1e-5 leaves 4x.
BEAM_SCORE_ATOL = 1e-5


def _launch(mode: str, out_dir, timeout_s: float) -> list[dict]:
  lines: list[str] = []
  rc = distributed.launch(
    [CHECKS, str(out_dir), mode],
    2,
    cpu_devices=2,
    timeout_s=timeout_s,
    cwd=REPO,
    env={"PYTHONPATH": REPO},
    output=lines.append,
  )
  assert rc == 0, "\n".join(line for line in lines if "Gloo" not in line)[-6000:]
  out = []
  for p in range(2):
    with open(os.path.join(out_dir, f"p{p}.json")) as f:
      out.append(json.load(f))
  return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  return _launch("serve", tmp_path_factory.mktemp("serve"), SERVE_TIMEOUT_S)


@pytest.fixture(scope="module")
def reference():
  """The same requests through the plain Engine in this process, on one device."""
  from paxcache.nn import load_decoder

  out = {}
  for mode in ("swap", "recompute"):
    engine = Engine(load_decoder(), mc.engine_config(mode))
    res = engine.run(mc.requests(beam=mode == "swap"))
    out[mode] = (
      {str(k): o.samples for k, o in sorted(res.items())},
      engine.metrics,
      {str(k): o.scores for k, o in sorted(res.items()) if o.scores is not None},
    )
  return out


def test_two_processes_four_devices(served):
  for p, res in enumerate(served):
    assert (res["process"], res["processes"]) == (p, 2)
    assert (res["devices"], res["local_devices"]) == (4, 2)


def test_tokens_sharded_over_processes_are_read_whole(served):
  for res in served:
    assert res["host_readable"] == {"was_addressable": False, "equal": True}


def test_per_host_swap_against_numpy(served):
  for p, res in enumerate(served):
    for check in res["swap"]:
      # 4 pool heads over 4 devices: each process holds the 2 heads of its 2 devices.
      assert check["heads"] == [2 * p, 2 * p + 1], check
      assert check["host_shape"] == [2, 2, 5, 4, 8], check
      assert check["swap_out_equal"] and check["swap_in_equal"], check
  assert [c["quantized"] for c in served[0]["swap"]] == [False, True]


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_tensor_parallel_outputs_match_one_process(served, reference, mode):
  want, want_metrics, want_scores = reference[mode]
  for p, res in enumerate(served):
    run = res["runs"][mode]
    assert run["samples"] == want, f"process {p}, {mode}"
    # Beam search (swap run): the same beams, their scores up to float rounding.
    assert run["scores"].keys() == want_scores.keys() == ({"5"} if mode == "swap" else set())
    for k, scores in want_scores.items():
      np.testing.assert_allclose(run["scores"][k], scores, rtol=0, atol=BEAM_SCORE_ATOL)
    # What the run went through (the same decisions as the single process made).
    assert run["preemptions_swap"] == want_metrics.preemptions_swap
    assert run["preemptions_recompute"] == want_metrics.preemptions_recompute
    assert run["prefix_hit_tokens"] == want_metrics.prefix_hit_tokens > 0
    assert run["cow_copies"] == want_metrics.cow_copies > 0  # the forks
    if mode == "swap":
      assert run["preemptions_swap"] >= 1 and run["swapped_in_blocks"] >= 1
      assert run["swapped_in_blocks"] == want_metrics.swapped_in_blocks
    else:
      assert run["preemptions_recompute"] >= 1
    assert run["guard_checks"] == -(-run["steps"] // 2)  # guard_every=2, from step 0
    # Every block freed in every process; each host pool holds its process's heads.
    assert run["used_blocks"] == 0
    assert run["free_host_blocks"] == run["num_host_blocks"] == 32
    assert run["host_pool_heads"] == [2 * p, 2 * p + 1]
    assert (run["pool_shards"], run["pool_heads"]) == (2, 4)
  # Forks and sampling: the fork's two greedy samples agree; the sampled ones differ.
  samples = want["3"]
  assert samples[0] != samples[1]
  assert want["2"][0] == want["2"][1]


def test_injected_divergence_stops_every_process(tmp_path):
  res = _launch("diverge", tmp_path, DIVERGE_TIMEOUT_S)
  step = mc.DIVERGE_AT
  for p, r in enumerate(res):
    assert r["error"] is not None, f"process {p} did not stop"
    assert r["error"].startswith(f"step {step}: the processes' step inputs differ"), r["error"]
    assert f"last step whose inputs matched when compared: {step - 1}" in r["error"]
    assert r["steps"] == step  # stopped before running the diverged step


# ---------------------------------------------------------------------------------------------
# In this process (one device, no jax.distributed).


def test_local_host_pool_on_one_device_matches_host_kv_pool():
  rng = np.random.default_rng(1)
  mesh = sh.make_mesh(1)
  k = rng.standard_normal((2, 2, 6, 4, 8)).astype(np.float32)
  v = rng.standard_normal((2, 2, 6, 4, 8)).astype(np.float32)
  cache = sh.shard_cache(cache_ops.PagedKVCache.from_stacked(k, v), mesh)
  local = sh.LocalHostKVPool(cache, 5)
  assert local.heads == (0, 1) and local.k.shape == (2, 2, 5, 4, 8)
  local.swap_out(cache, [4, 1], [0, 3])
  np.testing.assert_array_equal(local.k[:, :, [0, 3]], k[:, :, [4, 1]])
  np.testing.assert_array_equal(local.v[:, :, [0, 3]], v[:, :, [4, 1]])
  cache = local.swap_in(cache, [3, 0], [0, 2])
  want_k = k.copy()
  want_k[:, :, [0, 2]] = k[:, :, [1, 4]]
  np.testing.assert_array_equal(np.stack([np.asarray(a) for a in cache.k]), want_k)
  # Errors as HostKVPool's swaps give them.
  with pytest.raises(ValueError, match=r"device_ids \[6\] out of range \[0, 6\)"):
    local.swap_out(cache, [6], [0])
  with pytest.raises(ValueError, match="host_ids has repeated ids"):
    local.swap_out(cache, [0, 1], [2, 2])
  with pytest.raises(ValueError, match="must have one shape"):
    local.swap_in(cache, [0, 1], [2])
  with pytest.raises(ValueError, match="needs a cache placed on a mesh"):
    sh.LocalHostKVPool(
      cache_ops.PagedKVCache.create(1, 2, 4, 4, 8, jnp.float32).replace(
        k=(jax.device_put(jnp.zeros((2, 4, 4, 8)), jax.devices()[0]),),
        v=(jax.device_put(jnp.zeros((2, 4, 4, 8)), jax.devices()[0]),),
      ),
      2,
    )


def test_distributed_engine_in_one_process_matches_engine(reference):
  from paxcache.nn import load_decoder

  config = mc.engine_config("swap", sh.make_mesh(1))
  engine = DistributedEngine(load_decoder(), config, guard_every=1)
  out = engine.run(mc.requests(beam=True))
  got = {str(k): o.samples for k, o in sorted(out.items())}
  assert got == reference["swap"][0]
  assert engine.guard_checks == engine.metrics.steps  # every step compared (with itself)
  assert engine.allocator.num_used_blocks == 0 and not engine.has_unfinished()
  # run() checks every request before it queues any: an id given twice queues none.
  with pytest.raises(RequestError, match="request id 0 appears twice"):
    engine.run(mc.requests()[:1] * 2)
  assert not engine.has_unfinished()
  # add_request / step loop, as the experiments drive it.
  for r in mc.requests()[:2]:
    engine.add_request(r)
  with pytest.raises(RequestError, match="already in the engine"):
    engine.add_request(mc.requests()[0])
  done = {}
  while engine.has_unfinished():
    done.update((o.request_id, o.samples) for o in engine.step())
  assert {str(k): v for k, v in done.items()} == {k: reference["swap"][0][k] for k in ("0", "1")}
  with pytest.raises(NotImplementedError, match="abort"):
    engine.abort(0)


def test_an_idle_gap_longer_than_the_timeout_passes_as_several_boundaries():
  # Process 0 waits for the next arrival before it publishes a boundary; the others wait
  # for that boundary at most timeout_s, so process 0 never waits longer than half of it.
  from paxcache.engine import SimulatedClock
  from paxcache.nn import load_decoder

  clock = SimulatedClock()
  config = mc.engine_config("swap", sh.make_mesh(1))
  engine = DistributedEngine(load_decoder(), config, clock=clock, timeout_s=10.0)
  waits = []
  wait_until = clock.wait_until
  clock.wait_until = lambda t: (waits.append(t - clock.now()), wait_until(t))
  request = dataclasses.replace(mc.requests()[0], arrival_time=clock.now() + 12.0)
  out = engine.run([request])
  assert list(out) == [request.request_id] and out[request.request_id].samples
  assert waits[:3] == [5.0, 5.0, 2.0]  # 12 s of gap in waits of at most 10 / 2 s
  assert engine.allocator.num_used_blocks == 0


def test_distributed_engine_gives_back_the_requests_not_yet_sent_too():
  # Process 0 holds added requests in its outbox until a step boundary sends them: those
  # are unfinished too (Engine.unfinished_requests), given the seeds they would derive.
  from paxcache.engine import SimulatedClock
  from paxcache.nn import load_decoder

  config = mc.engine_config("swap", sh.make_mesh(1))
  engine = DistributedEngine(load_decoder(), config, clock=SimulatedClock(), timeout_s=10.0)
  first, second = mc.requests()[:2]
  late = dataclasses.replace(second, arrival_time=30.0)
  engine.add_request(first)
  engine.add_request(late)
  seeds = [(r.request_id, r.seed) for r in engine.unfinished_requests()]
  assert seeds == [(first.request_id, 0), (late.request_id, 1)]
  engine.step()  # the boundary sends the first; the late one stays in the outbox
  again = engine.unfinished_requests()
  assert [(r.request_id, r.seed) for r in again] == seeds
  assert [r.arrival_time for r in again] == [None, 30.0]
  while engine.has_unfinished():
    engine.step()
  assert engine.unfinished_requests() == []


def test_distributed_engine_errors():
  from paxcache.nn import load_decoder

  with pytest.raises(ValueError, match="needs EngineConfig.mesh"):
    DistributedEngine(load_decoder(), mc.engine_config("swap"))
  with pytest.raises(ValueError, match="guard_every must be an int >= 0"):
    DistributedEngine(load_decoder(), mc.engine_config("swap", sh.make_mesh(1)), guard_every=-1)


def test_launch_stops_the_others_and_reports_the_failure():
  lines: list[str] = []
  prog = (
    "import os, sys, time\n"
    "print('process', os.environ['PAXCACHE_PROCESS_ID'], os.environ['PAXCACHE_COORDINATOR'])\n"
    "time.sleep(1)\n"
    "sys.exit(3) if os.environ['PAXCACHE_PROCESS_ID'] == '0' else time.sleep(60)\n"
  )
  rc = distributed.launch(["-c", prog], 2, timeout_s=30, output=lines.append)
  assert rc == 3
  assert any(line.startswith("[p0] process 0 127.0.0.1:") for line in lines), lines
  assert any(line.startswith("[p1] process 1 127.0.0.1:") for line in lines), lines
  assert "[launch] a process exited with status 3: stopping the others" in lines
  rc = distributed.launch(["-c", "import time; time.sleep(60)"], 1, timeout_s=1, output=print)
  assert rc == 124


def test_launched_processes_die_with_the_launcher(tmp_path):
  # A launcher killed outright (no finally) takes its processes with it (PR_SET_PDEATHSIG).
  import signal
  import subprocess
  import time

  pid_file = tmp_path / "pid"
  child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
  launcher = subprocess.Popen(
    [sys.executable, "-m", "paxcache.launch", "-n", "1", "--", "-c", child],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO),
  )
  try:
    for _ in range(200):
      if pid_file.exists() and pid_file.read_text():
        break
      time.sleep(0.05)
    pid = int(pid_file.read_text())
    launcher.send_signal(signal.SIGKILL)
    launcher.wait(timeout=10)
    for _ in range(100):  # gone (or a zombie no one has reaped yet) within 5 s
      try:
        with open(f"/proc/{pid}/stat") as f:
          if f.read().rsplit(")", 1)[1].split()[0] == "Z":
            break
      except FileNotFoundError:
        break
      time.sleep(0.05)
    else:
      os.kill(pid, signal.SIGKILL)
      pytest.fail("the launched process outlived its launcher")
  finally:
    if launcher.poll() is None:
      launcher.kill()
  with pytest.raises(ValueError, match="num_processes must be an int >= 1"):
    distributed.launch(["-c", "pass"], 0)
  with pytest.raises(ValueError, match="nothing to run"):
    distributed.launch([], 1)
  with pytest.raises(ValueError, match="gpus_per_process must be None or an int >= 1"):
    distributed.launch(["-c", "pass"], 1, gpus_per_process=0)
  # Each process sees its own GPUs (the variable is only read here, no GPU is needed).
  lines = []
  prog = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"
  assert distributed.launch(["-c", prog], 2, gpus_per_process=2, output=lines.append) == 0
  assert sorted(lines) == ["[p0] 0,1", "[p1] 2,3"]
  # Under a scheduler's share of the GPUs, the split counts in that share, and a share too
  # small is refused before anything starts.
  lines = []
  share = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
  assert (
    distributed.launch(["-c", prog], 2, gpus_per_process=2, env=share, output=lines.append) == 0
  )
  assert sorted(lines) == ["[p0] 4,5", "[p1] 6,7"]
  with pytest.raises(ValueError, match="need 6, but CUDA_VISIBLE_DEVICES='4,5,6,7' has 4"):
    distributed.launch(["-c", "pass"], 3, gpus_per_process=2, env=share)
  with pytest.raises(ValueError, match="give one"):
    distributed.launch(["-c", "pass"], 1, cpu_devices=1, gpus_per_process=1)
