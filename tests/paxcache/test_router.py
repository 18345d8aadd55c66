"""Router over data-parallel replicas: routing by hand, prefix hits kept on one replica,
outputs equal to each replica's requests served alone, the multi-process exchange (threads
standing in for processes), bad input. Real devices and processes: test_router_devices.py."""

from __future__ import annotations

import dataclasses
import threading

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from paxcache.engine import (
  Engine,
  EngineConfig,
  Request,
  RequestError,
  Router,
  SimulatedEngine,
  allgather_exchange,
)
from paxcache.nn import TINY_CORPUS, load_decoder
from paxcache.prefix_cache import block_hash
from paxcache.sharding import make_data_mesh, make_mesh, replica_meshes

A, B = [1, 2, 3, 4], [5, 6, 7, 8]


def _config(**kw) -> EngineConfig:
  base = dict(
    num_blocks=32,
    block_size=4,
    num_host_blocks=8,
    max_num_seqs=4,
    max_num_batched_tokens=32,
    check_invariants=True,
  )
  return EngineConfig(**(base | kw))


def _sim(n=2, **kw) -> list[SimulatedEngine]:
  return [SimulatedEngine(_config(**kw), max_seq_len=64) for _ in range(n)]


def _hand_requests() -> list[Request]:
  return [
    Request(0, A + [9, 9, 9, 9], max_new_tokens=4),  # new key A -> 0 (tie)   loads 12, 0
    Request(1, [7, 7], max_new_tokens=2),  # no full block -> 1                  12, 4
    Request(2, B + [1], max_new_tokens=1),  # new key B -> 1 (4 < 12)           12, 10
    Request(3, A + [3], max_new_tokens=2),  # key A -> 0 although 12 > 10        19, 10
    Request(4, [1, 2, 3], max_new_tokens=3, n=2),  # 3 tokens: no key -> 1      19, 19
    Request(5, [8], max_new_tokens=1),  # tokens tie; 2 < 3 requests -> 0      21, 19
    Request(6, B + B, max_new_tokens=1),  # key B -> 1                          21, 28
  ]


def test_routing_by_hand():
  router = Router(_sim())
  got = [router.add_request(r) for r in _hand_requests()]
  assert got == [0, 1, 1, 0, 1, 0, 1]
  assert router.outstanding_tokens == [21, 28]
  assert router.outstanding_requests == [3, 4]
  m = router.metrics
  assert (m.routed, m.affinity_hits, m.affinity_new, m.unkeyed) == ([3, 4], 2, 2, 3)
  assert [router.replica_of(i) for i in range(7)] == got
  # Each engine got exactly its requests.
  assert router.replicas[0].num_unfinished() == 3 and router.replicas[1].num_unfinished() == 4
  outs = {}
  while router.has_unfinished():
    outs.update((o.request_id, o) for o in router.step())
  assert sorted(outs) == list(range(7))
  assert router.outstanding_tokens == [0, 0] and router.outstanding_requests == [0, 0]
  for e in router.replicas:
    assert e.allocator.num_used_blocks == 0
  m = router.metrics
  # Totals: counts summed over replicas, maxima the larger replica's.
  r0, r1 = m.replicas
  assert m.total.finished_requests == 7 == r0.finished_requests + r1.finished_requests
  assert m.total.generated_tokens == 4 + 2 + 1 + 2 + 6 + 1 + 1
  assert m.total.steps == r0.steps + r1.steps
  assert m.total.max_batch == max(r0.max_batch, r1.max_batch)
  assert m.total.seconds == m.seconds > 0
  assert m.as_dict()["total"]["finished_requests"] == 7


def test_prefix_key_is_the_allocators_chained_block_hash():
  router = Router(_sim(), affinity_blocks=2)
  assert router.prefix_key(A + B + [1]) == block_hash(block_hash(None, A), B)
  assert router.prefix_key(A + B) != router.prefix_key(A + A)
  assert router.prefix_key(A + [1, 2, 3]) is None  # 7 tokens: one full block of two
  # Two blocks: prompts sharing only the first block are routed by load, apart.
  assert [router.add_request(Request(i, A + p)) for i, p in enumerate([B, A])] == [0, 1]


def test_load_counts_finished_requests_out():
  router = Router(_sim())
  assert router.add_request(Request("long", [3] * 3, max_new_tokens=20)) == 0
  assert router.add_request(Request("short", [4] * 3, max_new_tokens=1)) == 1
  done = []
  while "short" not in done:
    done += [o.request_id for o in router.step()]
  assert router.outstanding_tokens == [23, 0]
  # Replica 1 is idle again: the next request goes there, then the one after to 1 again.
  assert router.add_request(Request("next", [5] * 3, max_new_tokens=4)) == 1
  assert router.add_request(Request("next2", [6] * 3, max_new_tokens=4)) == 1
  assert router.add_request(Request("next3", [6] * 3, max_new_tokens=20)) == 1
  assert router.add_request(Request("next4", [6] * 3, max_new_tokens=1)) == 0


def test_affinity_map_keeps_most_recent_keys():
  router = Router(_sim(), max_affinity_entries=1)
  assert router.add_request(Request(0, A, max_new_tokens=8)) == 0
  assert router.add_request(Request(1, B, max_new_tokens=1)) == 1  # A's entry dropped
  assert router.add_request(Request(2, B, max_new_tokens=1)) == 1  # B remembered
  assert router.add_request(Request(3, A, max_new_tokens=1)) == 1  # A new again: least loaded
  assert router.metrics.affinity_hits == 1


def test_same_order_same_routing_and_outputs():
  reqs = _hand_requests()
  runs = []
  for _ in range(2):
    router = Router(_sim())
    outs = router.run(reqs)
    runs.append(([router.metrics.replicas[r].steps for r in range(2)], outs))
  assert runs[0] == runs[1]


def test_bad_input():
  with pytest.raises(ValueError, match="at least one replica"):
    Router([])
  with pytest.raises(ValueError, match="no replica is served"):
    Router([None, None])
  with pytest.raises(ValueError, match="Engines or None"):
    Router([object()])
  with pytest.raises(ValueError, match="different block sizes"):
    Router([_sim(1)[0], _sim(1, block_size=8)[0]])
  e = _sim(1)[0]
  with pytest.raises(ValueError, match="twice"):
    Router([e, e])
  for kw in (dict(affinity_blocks=0), dict(max_affinity_entries=True)):
    with pytest.raises(ValueError, match="int >= 1"):
      Router(_sim(), **kw)
  router = Router(_sim())
  router.add_request(Request("x", A))
  with pytest.raises(RequestError, match="already in the router"):
    router.add_request(Request("x", B))
  with pytest.raises(RequestError, match="empty prompt"):
    router.add_request(Request("y", []))
  with pytest.raises(RequestError, match="appears twice"):
    router.run([Request("z", A), Request("z", B)])
  with pytest.raises(RequestError, match="expected a Request"):
    router.add_request(("w", A))
  # Nothing was routed by the failed calls.
  assert router.metrics.routed == [1, 0] and router.num_unfinished() == 1
  with pytest.raises(RequestError, match="unknown request id"):
    router.abort("nope")
  with pytest.raises(ValueError, match="mesh=None"):
    Router.build(load_decoder, _config(mesh=_one_device_mesh()), _one_device_mesh())


def _one_device_mesh():
  return make_data_mesh(1, 1)


def test_abort_frees_blocks_and_load():
  router = Router(_sim())
  router.add_request(Request("a", A * 3, max_new_tokens=10))
  router.add_request(Request("b", B * 3, max_new_tokens=10))
  router.step()
  out = router.abort("b")
  assert out.request_id == "b" and out.finish_reasons == ["abort"]
  assert router.outstanding_tokens == [22, 0] and router.replicas[1].allocator.num_used_blocks == 0
  assert router.replicas[0].allocator.num_used_blocks > 0
  assert set(router.run()) == {"a"}
  assert router.replicas[0].allocator.num_used_blocks == 0


def _threaded_exchange(n):
  """An exchange between ``n`` threads standing in for processes."""
  slots, barrier = [None] * n, threading.Barrier(n, timeout=30)

  def make(p):
    def exchange(payload):
      slots[p] = payload
      barrier.wait()
      got = list(slots)
      barrier.wait()  # nobody writes the next round's payload before all have read
      return got

    return exchange

  return [make(p) for p in range(n)]


def _scenario(router: Router) -> list:
  """Requests added while others run, two aborts (one on each replica), then to the end;
  returns what each call returned."""
  reqs = _hand_requests() + [Request(7 + i, A + [i] * 5, max_new_tokens=3 + i) for i in range(5)]
  log = [[router.add_request(r) for r in reqs[:7]]]
  log.append(sorted(o.request_id for o in router.step()))
  log.append(router.abort(4))  # on replica 1
  log.append(router.abort(0))  # on replica 0
  log.append([router.add_request(r) for r in reqs[7:]])
  log.append(router.run())
  return log


def test_replicas_in_two_processes_agree_with_one_process():
  # Each "process" (a thread) serves one replica; the router runs in both.
  want_router = Router(_sim())
  want = _scenario(want_router)
  assert want[2].finish_reasons == ["abort"] * 2 and want[3].finish_reasons == ["abort"]
  exchanges = _threaded_exchange(2)
  engines = _sim()
  routers = [
    Router([engines[0], None], exchange=exchanges[0]),
    Router([None, engines[1]], exchange=exchanges[1]),
  ]
  results, errors = [None, None], []

  def serve(p):
    try:
      results[p] = _scenario(routers[p])
    except Exception as e:  # reported below
      errors.append(e)

  threads = [threading.Thread(target=serve, args=(p,)) for p in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert not errors, errors
  for p in range(2):
    # Every process routes the same way and gets every output (aborts included), the same
    # as one process serving both replicas.
    assert results[p] == want
    m, w = routers[p].metrics, want_router.metrics
    assert m.routed == w.routed and m.replicas == [
      dataclasses.replace(x, seconds=y.seconds) for x, y in zip(w.replicas, m.replicas, strict=True)
    ]
    assert m.total.aborted_requests == 2
    assert routers[p].outstanding_tokens == [0, 0]
  assert [e.allocator.num_used_blocks for e in engines] == [0, 0]


def test_a_replica_that_fails_in_one_process_stops_every_process():
  # The failing process used to raise before the step's exchange, and the others waited in
  # it for ever; now the failure goes through the exchange and every process stops.
  exchanges = _threaded_exchange(2)
  engines = _sim()
  routers = [
    Router([engines[0], None], exchange=exchanges[0]),
    Router([None, engines[1]], exchange=exchanges[1]),
  ]
  execute = engines[1]._execute

  def fail(plan):
    raise ValueError("device lost")

  engines[1]._execute = fail
  raised = [[], []]

  def serve(p):
    for r in _hand_requests():
      routers[p].add_request(r)
    for _ in range(3):  # the failing step, then two more: each raises, none waits
      try:
        routers[p].step()
      except Exception as e:
        raised[p].append(e)
    try:
      routers[p].add_request(Request(99, [1, 2]))
    except Exception as e:
      raised[p].append(e)

  threads = [threading.Thread(target=serve, args=(p,)) for p in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert not any(t.is_alive() for t in threads)
  assert isinstance(raised[1][0], ValueError)  # the failing process: its own error
  assert isinstance(raised[0][0], RuntimeError)  # the other: named, after the exchange
  assert "replica 1's step raised ValueError('device lost')" in str(raised[0][0])
  for p in range(2):
    assert len(raised[p]) == 4 and all(isinstance(e, RuntimeError) for e in raised[p][1:])
  engines[1]._execute = execute


# ---------------------------------------------------------------------------------------------
# The tiny model on one CPU device (two engines share it): outputs against each replica's
# requests served alone.


def _model_requests():
  with open(TINY_CORPUS, "rb") as f:
    corpus = f.read()
  shared = list(corpus[40:56])  # two blocks of 8
  reqs = []
  for i in range(8):
    start = 53 * i + 7
    own = list(corpus[start : start + 3 + 2 * i])
    prompt = shared + own if i % 2 else own
    reqs.append(
      Request(
        i,
        prompt,
        max_new_tokens=4 + i % 3,
        n=1 + (i == 3),
        temperature=0.0 if i % 3 else 0.8,  # sampled ones get the router's arrival seed
      )
    )
  return reqs


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_outputs_equal_each_replica_alone(async_scheduling):
  config = EngineConfig(
    async_scheduling=async_scheduling,
    num_blocks=24,
    block_size=8,
    num_host_blocks=8,
    max_num_seqs=4,
    max_num_batched_tokens=32,
    min_token_bucket=32,
    min_batch_bucket=4,
    check_invariants=True,
  )
  reqs = _model_requests()
  router = Router([Engine(load_decoder(), config) for _ in range(2)])
  placed = {r.request_id: router.add_request(r) for r in reqs}
  got = router.run()
  assert sorted(got) == list(range(8))
  # Requests sharing the two-block prefix (odd ids) went to one replica; the others were
  # balanced onto both.
  assert len({placed[i] for i in range(1, 8, 2)}) == 1
  assert sorted(set(placed.values())) == [0, 1]
  for rep in range(2):
    mine = [
      dataclasses.replace(r, seed=i)  # the router's arrival index
      for i, r in enumerate(reqs)
      if placed[r.request_id] == rep
    ]
    alone = Engine(load_decoder(), config)
    want = alone.run(mine)
    assert {k: got[k] for k in want} == want
    m = router.metrics.replicas[rep]
    assert m.prefix_hit_tokens == alone.metrics.prefix_hit_tokens
    assert m.generated_tokens == alone.metrics.generated_tokens
    assert router.replicas[rep].allocator.num_used_blocks == 0
  # The shared prefix was computed once on its replica: three later requests hit 16 tokens.
  assert router.metrics.replicas[placed[1]].prefix_hit_tokens == 3 * 16


def test_arrival_times_on_each_replicas_simulated_clock():
  router = Router(_sim())
  reqs = [Request(i, [i + 1] * 3, max_new_tokens=2, arrival_time=0.5 * i) for i in range(4)]
  outs = router.run(reqs)
  assert router.metrics.routed == [2, 2]
  for r in reqs:
    assert outs[r.request_id].metrics.arrival_time == r.arrival_time
    assert outs[r.request_id].metrics.first_token_time >= r.arrival_time


def test_wall_clock_router_refuses_arrival_times():
  router = Router([Engine(load_decoder(), _config())])
  with pytest.raises(RequestError, match="as they arrive"):
    router.add_request(Request(0, A, arrival_time=1.0))
  assert router.num_unfinished() == 0


def test_allgather_exchange_in_one_process():
  payload = ([("id", 3)], {0: {"steps": 2}})
  assert allgather_exchange(payload) == [payload]


def test_mesh_helpers_on_one_device():
  mesh = make_data_mesh(1, 1)
  assert mesh.axis_names == ("data", "model") and mesh.devices.shape == (1, 1)
  (sub,) = replica_meshes(mesh)
  assert sub.axis_names == ("model",) and list(sub.devices.flat) == [jax.devices()[0]]
  # A data-only mesh: each replica a 1-device "model" mesh.
  (sub,) = replica_meshes(Mesh(np.array(jax.devices()[:1]), ("data",)))
  assert sub.axis_names == ("model",) and sub.devices.shape == (1,)
  with pytest.raises(ValueError, match="only 1 exist"):
    make_data_mesh(2, 1, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="positive int"):
    make_data_mesh(0)
  with pytest.raises(ValueError, match="both 'x'"):
    make_data_mesh(1, data_axis="x", model_axis="x")
  with pytest.raises(ValueError, match="not 'data'"):
    replica_meshes(make_mesh(1))


def test_a_replica_whose_step_raises_ends_the_router():
  router = Router(_sim())
  for r in _hand_requests():
    router.add_request(r)
  failing = router.replicas[1]
  execute, calls = failing._execute, []

  def fail(plan):
    calls.append(1)
    if len(calls) == 2:
      raise ValueError("device lost")
    return execute(plan)

  failing._execute = fail
  done = {}
  with pytest.raises(ValueError, match="device lost"):
    while router.has_unfinished():
      done.update((o.request_id, o) for o in router.step())
  assert len(calls) == 2
  # The failed replica's half-done step is never stepped on, and no other replica is
  # stepped or given a request either: their outputs would never be returned.
  healthy = router.replicas[0]
  unfinished, steps = healthy.num_unfinished(), healthy.metrics.steps
  for again in (router.step, router.step, lambda: router.add_request(Request(9, [1, 2]))):
    with pytest.raises(RuntimeError, match=r"a step raised \(ValueError\('device lost'\)\)"):
      again()
  assert len(calls) == 2
  assert (healthy.num_unfinished(), healthy.metrics.steps) == (unfinished, steps)
  # What neither replica returned goes to a new router, which finishes it as the failed
  # one would have: the outputs of a router that did not fail.
  again = router.unfinished_requests()
  assert done and again
  # Replica 0 returned request 3 in the step replica 1 failed: the router never did.
  assert 3 not in {r.request_id for r in healthy.unfinished_requests()}
  assert {r.request_id for r in again} == {r.request_id for r in _hand_requests()} - set(done)
  want = Router(_sim()).run(_hand_requests())
  got = dict(done) | Router(_sim()).run(again)
  assert {k: v.samples for k, v in got.items()} == {k: v.samples for k, v in want.items()}
