"""Data-parallel replicas behind a router: independent engines, one per group of devices.

Each replica is a whole :class:`Engine` (its own allocator, block pool, scheduler and
device pool) over its own sub-mesh: on a mesh ``("data", "model")`` replica ``r`` serves
on ``mesh.devices[r]`` with its KV heads sharded over ``model`` as any engine with a mesh.
Block ids are local to a replica; nothing crosses replicas but requests and results.

Routing (:meth:`Router.add_request`, deterministic given the order of requests):

* a prompt with at least ``affinity_blocks`` full blocks has a *prefix key*: the
  allocator's chained blake2b hash of those blocks (``prefix_cache.block_hash``). The
  first request with a key goes to the least loaded replica and the key is mapped to it;
  every later request with the key goes there too, so requests sharing a prefix share one
  replica's prefix cache. The map keeps the ``max_affinity_entries`` most recently used
  keys (least recently used dropped first).
* a shorter prompt goes to the least loaded replica: the fewest outstanding tokens
  (``len(prompt) + max(n, beam_width) * max_new_tokens`` summed over the requests routed
  to it and not yet returned), then the fewest outstanding requests, then the lowest index.

Arrival times: a request's ``arrival_time`` is kept by its replica's engine on that
engine's own clock. With simulated clocks (``SimulatedEngine`` sweeps) each replica's time
is its own, as for replicas on separate devices; a waiting engine on a :class:`WallClock`
would sleep and hold up the other replicas of its process, so a router with one refuses
requests with an ``arrival_time`` (add them as they arrive instead).

A request without a seed gets the router's arrival index as its seed (what one engine
given all the requests in the same order would pick), so a sampled request's output does
not depend on its replica.

Several processes (``jax.distributed``): the router runs identically in every process
(same requests, same order), each process builds and steps only the replicas whose devices
it owns, and every :meth:`Router.step` ends with one exchange between processes (the
requests that finished, with their outputs, and each replica's metrics;
``multihost_utils.process_allgather`` of a pickled payload). Every process therefore
knows every finish at the same step, keeps the same load counts, routes the same way and
returns the same outputs. A replica must lie within one process.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import time
from collections.abc import Callable, Hashable, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from paxcache import sharding
from paxcache.allocator import _is_int
from paxcache.engine._clock import WallClock
from paxcache.engine._engine import SEED_LIMIT, Engine, EngineConfig, run_until_done
from paxcache.engine._metrics import RunMetrics
from paxcache.engine._request import Request, RequestError, RequestOutput
from paxcache.nn import Decoder
from paxcache.prefix_cache import block_hash

# RunMetrics fields that are maxima, not counts: their total is the largest replica's.
_MAX_FIELDS = frozenset({"max_batch", "max_blocks_used", "compiled_shapes"})


@dataclasses.dataclass
class RouterMetrics:
  """Per-replica and total metrics of a :class:`Router`.

  Attributes:
    replicas: each replica's :class:`RunMetrics` (another process's replica: as of the
      last :meth:`Router.step`).
    routed: requests routed to each replica.
    affinity_hits: requests sent where their prefix key was already mapped.
    affinity_new: requests with a new prefix key (mapped to the least loaded replica).
    unkeyed: requests with a prompt shorter than the key (sent to the least loaded).
    seconds: wall time spent in :meth:`Router.step` in this process (every replica's
      steps and the exchange between processes).
  """

  replicas: list[RunMetrics]
  routed: list[int]
  affinity_hits: int = 0
  affinity_new: int = 0
  unkeyed: int = 0
  seconds: float = 0.0

  @property
  def total(self) -> RunMetrics:
    """Counts summed over replicas; ``max_batch``, ``max_blocks_used`` and
    ``compiled_shapes`` the largest replica's; ``seconds`` the router's own (so
    ``tokens_per_s`` is the throughput of all replicas together)."""
    total = RunMetrics()
    for f in dataclasses.fields(RunMetrics):
      values = [getattr(m, f.name) for m in self.replicas]
      setattr(total, f.name, max(values, default=0) if f.name in _MAX_FIELDS else sum(values))
    total.seconds = self.seconds
    return total

  def as_dict(self) -> dict:
    return dict(
      total=self.total.as_dict(),
      replicas=[m.as_dict() for m in self.replicas],
      routed=list(self.routed),
      affinity_hits=self.affinity_hits,
      affinity_new=self.affinity_new,
      unkeyed=self.unkeyed,
      seconds=self.seconds,
    )


def _local_exchange(payload) -> list:
  return [payload]


def allgather_exchange(payload) -> list:
  """Every process's ``payload`` (any picklable object), in process order, in every process:
  a collective (every process must call it, the same number of times)."""
  from jax.experimental import multihost_utils

  data = np.frombuffer(pickle.dumps(payload), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int64)).reshape(-1)
  # Pad to a power of two so that few buffer shapes (each a compiled gather) ever occur.
  n = 1 << max(int(sizes.max()) - 1, 1).bit_length()
  buf = np.zeros(n, np.uint8)
  buf[: data.size] = data
  parts = multihost_utils.process_allgather(buf)
  return [pickle.loads(parts[p, : int(s)].tobytes()) for p, s in enumerate(sizes)]


class Router:
  """Sends requests to independent engine replicas and steps them (module docstring).

  Args:
    replicas: one entry per replica: its :class:`Engine` (or :class:`SimulatedEngine`),
      or None for a replica another process serves. At least one must be an engine here;
      every engine must have the same ``block_size``. :meth:`build` makes them from a mesh.
    affinity_blocks: full leading blocks that make a prompt's prefix key (>= 1).
    max_affinity_entries: prefix keys remembered at most (>= 1).
    exchange: ``payload -> [payload of each process]``, called once per :meth:`step` (and
      per :meth:`abort`) when some replica is another process's; default
      :func:`allgather_exchange`.
  """

  def __init__(
    self,
    replicas: Sequence[Engine | None],
    *,
    affinity_blocks: int = 1,
    max_affinity_entries: int = 1 << 16,
    exchange: Callable[[object], list] | None = None,
  ):
    replicas = list(replicas)
    if not replicas:
      raise ValueError("Router needs at least one replica")
    bad = [i for i, e in enumerate(replicas) if e is not None and not isinstance(e, Engine)]
    if bad:
      raise ValueError(f"replicas must be Engines or None; entries {bad} are not")
    local = [e for e in replicas if e is not None]
    if not local:
      raise ValueError("no replica is served by this process (every entry is None)")
    sizes = {e.config.block_size for e in local}
    if len(sizes) > 1:
      raise ValueError(f"replicas have different block sizes {sorted(sizes)}")
    if len({id(e) for e in local}) < len(local):
      raise ValueError("the same engine appears twice among the replicas")
    for name, v in (
      ("affinity_blocks", affinity_blocks),
      ("max_affinity_entries", max_affinity_entries),
    ):
      if not _is_int(v) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    self.replicas = replicas
    self.block_size = local[0].config.block_size
    self.affinity_blocks = int(affinity_blocks)
    self.max_affinity_entries = int(max_affinity_entries)
    self._multi = len(local) < len(replicas)
    self._exchange = exchange or allgather_exchange
    # With replicas in several processes: the first failed step of any, as the exchange
    # told every process (None: none failed).
    self._failure: str | None = None
    # Requests are checked by a local engine: every replica has the same model and config,
    # and every process must reject the same requests.
    self._validator = local[0]
    self._wall_clock = any(isinstance(e.clock, WallClock) for e in local)
    n = len(replicas)
    self.outstanding_tokens = [0] * n
    self.outstanding_requests = [0] * n
    # Request id -> (replica, tokens, the request as routed: with its seed).
    self._live: dict[Hashable, tuple[int, int, Request]] = {}
    self._affinity: collections.OrderedDict[bytes, int] = collections.OrderedDict()
    self._arrivals = 0
    self._metrics = RouterMetrics(replicas=[RunMetrics() for _ in replicas], routed=[0] * n)

  @classmethod
  def build(
    cls,
    model: Decoder | Callable[[], Decoder],
    config: EngineConfig,
    mesh: Mesh,
    *,
    data_axis: str = sharding.DATA_AXIS,
    **kwargs,
  ) -> Router:
    """One replica per index of ``mesh``'s ``data_axis``, each an :class:`Engine` over its
    sub-mesh (``sharding.replica_meshes``) with ``config`` (whose ``mesh`` must be None;
    ``config.mesh_axis`` names the sub-meshes' tensor-parallel axis).

    ``model`` is a decoder, copied for each replica (``nnx.clone``; the engine shards its
    copy in place, the original is left as it is), or a function returning a new decoder.
    Only the replicas whose devices this process owns are built (others are None);
    :class:`ValueError` if a replica's devices belong to several processes. ``kwargs`` go
    to :class:`Router`.
    """
    if config.mesh is not None:
      raise ValueError("Router.build places each replica itself: pass config with mesh=None")
    if isinstance(model, Decoder):
      original = model
      model = lambda: nnx.clone(original)  # noqa: E731
    elif not callable(model):
      raise ValueError(f"model must be a Decoder or a function returning one, got {model!r}")
    me = jax.process_index()
    engines = []
    for r, sub in enumerate(sharding.replica_meshes(mesh, data_axis)):
      owners = sorted({d.process_index for d in sub.devices.flat})
      if owners == [me]:
        engines.append(Engine(model(), dataclasses.replace(config, mesh=sub)))
      elif me in owners:
        raise ValueError(
          f"replica {r}'s devices belong to processes {owners}: a replica must lie within one "
          "process (order the mesh with sharding.make_data_mesh)"
        )
      else:
        engines.append(None)
    return cls(engines, **kwargs)

  # ------------------------------------------------------------------ routing

  @property
  def num_replicas(self) -> int:
    return len(self.replicas)

  def prefix_key(self, prompt: Sequence[int]) -> bytes | None:
    """The routing key of ``prompt``: the chained hash of its first ``affinity_blocks``
    blocks, or None if it has fewer full blocks."""
    b, k = self.block_size, self.affinity_blocks
    if len(prompt) < b * k:
      return None
    key = None
    for i in range(k):
      key = block_hash(key, prompt[i * b : (i + 1) * b])
    return key

  def _least_loaded(self) -> int:
    return min(
      range(len(self.replicas)),
      key=lambda r: (self.outstanding_tokens[r], self.outstanding_requests[r], r),
    )

  def _choose(self, prompt) -> tuple[int, bytes | None, str]:
    """``(replica, prefix key, how)``: the decision only (nothing is changed)."""
    key = self.prefix_key(prompt)
    if key is None:
      return self._least_loaded(), None, "unkeyed"
    replica = self._affinity.get(key)
    if replica is not None:
      return replica, key, "affinity_hits"
    return self._least_loaded(), key, "affinity_new"

  def _check(self, request: Request) -> Request:
    if not isinstance(request, Request):
      raise RequestError(f"expected a Request, got {type(request).__name__}")
    if request.request_id in self._live:
      raise RequestError(f"request id {request.request_id!r} is already in the router")
    if request.arrival_time is not None and self._wall_clock:
      raise RequestError(
        f"request {request.request_id!r}: a router over engines on a WallClock takes requests "
        "as they arrive (arrival_time=None): an engine waiting for an arrival would hold up "
        "the other replicas"
      )
    # The engine's own checks (a RequestError naming the bad field), without queuing.
    return self._validator._validate(request)

  def add_request(self, request: Request) -> int:
    """Routes ``request`` and queues it on its replica (if this process serves it);
    returns the replica's index. Raises :class:`RequestError` (changing nothing) if the
    request is bad."""
    self._raise_if_a_replica_failed()
    return self._add(self._check(request))

  def _raise_if_a_replica_failed(self) -> None:
    """A replica whose step raised ends the router: its error (named) before any other
    replica is stepped or given a request, whose outputs would never be returned. With
    replicas in several processes every process learns it in the step's exchange."""
    for engine in self.replicas:
      if engine is not None:
        engine._raise_if_a_call_failed()
    if self._failure is not None:
      raise RuntimeError(f"{self._failure}; this router cannot go on (make a new one)")

  def _add(self, r: Request) -> int:
    if r.seed is None:
      r = dataclasses.replace(r, seed=self._arrivals % SEED_LIMIT)
    replica, key, how = self._choose(r.prompt)
    engine = self.replicas[replica]
    if engine is not None:
      engine.add_request(r)  # first: if it raised, nothing would have changed
    if key is not None:
      self._affinity[key] = replica
      self._affinity.move_to_end(key)
      if len(self._affinity) > self.max_affinity_entries:
        self._affinity.popitem(last=False)
    m = self._metrics
    setattr(m, how, getattr(m, how) + 1)
    self._arrivals += 1
    tokens = len(r.prompt) + max(r.n, r.beam_width) * r.max_new_tokens
    self._live[r.request_id] = (replica, tokens, r)
    self.outstanding_tokens[replica] += tokens
    self.outstanding_requests[replica] += 1
    m.routed[replica] += 1
    return replica

  def replica_of(self, request_id: Hashable) -> int:
    """The replica serving an unfinished request."""
    if request_id not in self._live:
      raise RequestError(f"unknown request id {request_id!r} (finished or never added)")
    return self._live[request_id][0]

  def _retire(self, request_id: Hashable) -> None:
    replica, tokens, _ = self._live.pop(request_id)
    self.outstanding_tokens[replica] -= tokens
    self.outstanding_requests[replica] -= 1

  # ------------------------------------------------------------------ serving

  def has_unfinished(self) -> bool:
    """Whether a routed request has not been returned yet (on any replica)."""
    return bool(self._live)

  def num_unfinished(self) -> int:
    return len(self._live)

  def unfinished_requests(self) -> list[Request]:
    """Every routed request the router has not returned, in routing order, with the seed
    the router gave it: to route again after a replica's failure ended the router. Those a
    replica of this process holds come as its :meth:`Engine.unfinished_requests` gives
    them (``arrival_time=None`` once arrived); the others as they were routed: those of
    other processes' replicas, and those a replica finished in the step that failed, whose
    outputs that step never returned."""
    held = {
      r.request_id: r for e in self.replicas if e is not None for r in e.unfinished_requests()
    }
    return [held.get(rid, r) for rid, (_, _, r) in self._live.items()]

  def step(self) -> list[RequestOutput]:
    """One :meth:`Engine.step` of every replica here with unfinished requests; returns the
    requests that finished (on every replica, in every process: with replicas in other
    processes this is a collective that every process must call)."""
    self._raise_if_a_replica_failed()
    t0 = time.perf_counter()
    finished = []
    error = None
    for replica, engine in enumerate(self.replicas):
      if engine is not None and engine.has_unfinished():
        try:
          finished.extend(engine.step())
        except BaseException as e:
          if not self._multi:
            raise
          # Every process must reach the exchange (the others would wait in it for ever):
          # the error goes with it, and every process stops after it.
          error = e
          self._failure = f"replica {replica}'s step raised {e!r}"
          break
    if self._multi:
      mine = {r: e.metrics for r, e in enumerate(self.replicas) if e is not None}
      here, finished = finished, []
      failures = []
      for outs, metrics, failure in self._exchange((here, mine, self._failure)):
        finished.extend(outs)
        failures += [failure] if failure is not None else []
        for r, m in metrics.items():
          self._metrics.replicas[r] = m
      if error is not None:
        raise error
      if failures:
        self._failure = failures[0]
        self._raise_if_a_replica_failed()
    for out in finished:
      self._retire(out.request_id)
    self._metrics.seconds += time.perf_counter() - t0
    return finished

  def run(
    self, requests: Iterable[Request] = (), max_steps: int | None = None
  ) -> dict[Hashable, RequestOutput]:
    """Routes ``requests`` and steps until every request finished; returns outputs by id.

    Every request is checked before any is routed: one bad request raises
    :class:`RequestError` and routes none of them.
    """
    return run_until_done(self, self._check, requests, max_steps)

  def abort(self, request_id: Hashable) -> RequestOutput:
    """Stops a request on its replica (:meth:`Engine.abort`); returns what it produced.
    With replicas in other processes this is a collective (every process calls it)."""
    self._raise_if_a_replica_failed()
    replica = self.replica_of(request_id)
    engine = self.replicas[replica]
    out = engine.abort(request_id) if engine is not None else None
    if self._multi:
      out = next(o for o in self._exchange(out) if o is not None)
    self._retire(request_id)
    return out

  # ------------------------------------------------------------------ metrics

  @property
  def metrics(self) -> RouterMetrics:
    """Per-replica and total metrics (:class:`RouterMetrics`; a snapshot)."""
    m = self._metrics
    for r, engine in enumerate(self.replicas):
      if engine is not None:
        m.replicas[r] = engine.metrics
    return dataclasses.replace(
      m, replicas=[dataclasses.replace(x) for x in m.replicas], routed=list(m.routed)
    )
