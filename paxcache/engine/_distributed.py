"""The engine under multi-controller JAX: one engine per process, one mesh over all of them.

Every process runs a :class:`DistributedEngine` over the same mesh (``jax.distributed``
initialised, e.g. by ``paxcache.distributed.initialize``) and keeps its own, identical copy
of the host state: allocator, scheduler, queues. What keeps the copies identical:

* requests enter at process 0; at every step boundary process 0 sends the requests that
  arrived (by its clock) to every process, through the coordination service's key-value
  store, and every process queues them in that order before scheduling;
* the host code is deterministic (counts and queue order, blake2b prefix hashes, sampling
  from one key folded with each row's seed), so every process makes the same decisions and
  builds the same step batch, which the jitted step takes as a replicated input;
* the sampled tokens come out of the step replicated: each process reads its own copy;
* a guard: every ``guard_every`` steps each process publishes a blake2b digest of the
  step's inputs (the packed batch, its static layout and the swaps) and compares it with
  every other process's before anything runs on the devices; on a mismatch every process
  raises :class:`DivergenceError` naming the step.

Swaps move only each process's own heads (``paxcache.sharding.LocalHostKVPool``); host
block ids stay global.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import pickle
from collections.abc import Hashable, Iterable

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from paxcache import sharding
from paxcache.distributed import KeyValueChannel
from paxcache.engine._engine import Engine, EngineConfig, check_requests, seeded
from paxcache.engine._request import Request, RequestError, RequestOutput
from paxcache.engine._scheduler import Plan
from paxcache.nn import Decoder

_ENGINES = itertools.count()  # namespaces: engines made in the same order on every process


class DivergenceError(RuntimeError):
  """The processes' step inputs differ: their host states are no longer the same."""


class DistributedEngine(Engine):
  """:class:`Engine` for one process of a multi-controller JAX job (docs/scaling.md).

  Make one in every process, in the same order, with the same model and config; ``config.mesh``
  is a mesh over the devices of every process (``paxcache.sharding.make_mesh()`` after
  ``paxcache.distributed.initialize()``). Then drive every process alike:

  * ``run(requests)``: process 0's ``requests`` are served; other processes may pass the
    same list (it is not read) or nothing. Every process returns every output.
  * ``add_request`` / ``step`` / ``has_unfinished`` loops: call ``add_request`` with the same
    requests on every process (only process 0's are sent; the others' count as not yet
    arrived until process 0's copy arrives, so that every process's ``has_unfinished``
    agrees), then step every process while ``has_unfinished()``.

  ``abort`` is not supported (it would have to reach every process at a step boundary).

  Args:
    model, config, clock: as for :class:`Engine`; ``config.mesh`` is required. Only process
      0's clock decides when a request with an ``arrival_time`` has arrived.
    guard_every: compare the step-input digests across processes every this many steps
      (1: every step; 0: never).
    timeout_s: how long a process waits for another at a step boundary before raising
      ``TimeoutError``.
  """

  def __init__(
    self,
    model: Decoder,
    config: EngineConfig,
    *,
    clock=None,
    guard_every: int = 16,
    timeout_s: float = 300.0,
  ):
    if config.mesh is None:
      raise ValueError("DistributedEngine needs EngineConfig.mesh (a mesh over every process)")
    if isinstance(guard_every, bool) or not isinstance(guard_every, int) or guard_every < 0:
      raise ValueError(f"guard_every must be an int >= 0 (0: never), got {guard_every!r}")
    held = {d.process_index for d in config.mesh.devices.flat}
    if held != set(range(jax.process_count())):
      raise ValueError(
        f"EngineConfig.mesh holds devices of processes {sorted(held)}, not of every one of the "
        f"{jax.process_count()} processes"
      )
    super().__init__(model, config, clock=clock)
    if config.num_host_blocks:
      # This process's heads only (the Engine's pool of every head is dropped unused).
      self.host_pool = sharding.LocalHostKVPool(self.cache, config.num_host_blocks)
    self.process_index = jax.process_index()
    self.process_count = jax.process_count()
    self.guard_every = guard_every
    self.guard_checks = 0  # digests compared so far (every process the same)
    self._last_matched = None  # the last step whose digests were compared and matched
    self._channel = KeyValueChannel(f"paxcache/engine{next(_ENGINES)}", timeout_s)
    self._boundary = 0  # step boundaries passed (every process the same)
    self._more = False  # process 0 still held requests not yet arrived at the last boundary
    # Process 0: requests not yet sent, a heap of (arrival time, order, request). Other
    # processes: the requests added here, by id, until process 0's copy arrives.
    self._outbox: list[tuple[float, int, Request]] = []
    self._outbox_order = itertools.count()
    self._outbox_ids: set[Hashable] = set()
    self._prebuilt = None  # a guard step's batch, built before its digest
    self._delete_later: list[str] = []  # process 0: keys every process has read

  @property
  def is_leader(self) -> bool:
    return self.process_index == 0

  # ------------------------------------------------------------------ requests

  def add_request(self, request: Request) -> None:
    """Process 0: queues ``request`` for the next step boundary (raises
    :class:`RequestError` if it is bad). Other processes: notes its id, so that
    ``has_unfinished`` stays true until process 0's copy arrives."""
    self._raise_if_a_call_failed()
    request = self._validate(request)
    if request.request_id in self._outbox_ids:
      raise RequestError(f"request id {request.request_id!r} is already in the engine")
    self._outbox_ids.add(request.request_id)
    if self.is_leader:
      t = self.clock.now() if request.arrival_time is None else request.arrival_time
      heapq.heappush(self._outbox, (t, next(self._outbox_order), request))

  def abort(self, request_id: Hashable) -> RequestOutput:
    raise NotImplementedError(
      "DistributedEngine.abort: aborts are not sent to the other processes (not built)"
    )

  def has_unfinished(self) -> bool:
    return bool(super().has_unfinished() or self._more or self._outbox_ids)

  def unfinished_requests(self) -> list[Request]:
    """:meth:`Engine.unfinished_requests`, then (on process 0) the requests added and not
    yet sent to the other processes, in the order they would be sent."""
    out = super().unfinished_requests()
    first = self._arrivals + len(self._pending)  # (no request waits there: they wait here)
    return out + [seeded(r, first + i) for i, (_, _, r) in enumerate(sorted(self._outbox))]

  def num_unfinished(self) -> int:
    return super().num_unfinished() + len(self._outbox_ids)

  def _sync_requests(self) -> None:
    """The step boundary: process 0 sends the requests that have arrived; every process
    queues them in the order sent."""
    key = f"in/{self._boundary}"
    if self.is_leader:
      idle = not self.scheduler.has_work() and self._in_flight is None and not self._ready
      if self._outbox and idle:
        # Nothing to do before the next arrival; but the others wait for this boundary at
        # most timeout_s, so a longer gap passes as several (empty) boundaries.
        until = self.clock.now() + self._channel.timeout_s / 2
        self.clock.wait_until(min(self._outbox[0][0], until))
      now = self.clock.now()
      arrived = []
      while self._outbox and self._outbox[0][0] <= now:
        arrived.append(heapq.heappop(self._outbox)[2])
      message = pickle.dumps((arrived, bool(self._outbox)))
      self._channel.put(key, message)
      self._delete_later.append(key)
    else:
      message = self._channel.get(key)
    arrived, self._more = pickle.loads(message)
    for r in arrived:
      self._outbox_ids.discard(r.request_id)
      self._enqueue(r)
    self._boundary += 1

  # ------------------------------------------------------------------ iterations

  def step(self) -> list[RequestOutput]:
    """One iteration on every process: the step boundary (new requests from process 0),
    then :meth:`Engine.step`."""
    self._raise_if_a_call_failed()  # before the boundary's exchange, as Engine.step would
    self._sync_requests()
    return super().step()

  def run(
    self, requests: Iterable[Request] = (), max_steps: int | None = None
  ) -> dict[Hashable, RequestOutput]:
    """Serves process 0's ``requests`` on every process; returns every output, by id, on
    every process. Other processes' ``requests`` are not read. ``max_steps`` must be the
    same on every process."""
    requests = list(requests)
    if self.is_leader:
      for r in check_requests(self._validate, requests, self._outbox_ids):
        self.add_request(r)
    outputs: dict[Hashable, RequestOutput] = {}
    steps = 0
    while True:
      self._sync_requests()
      # The same on every process: it reads only state every process shares.
      if not (Engine.has_unfinished(self) or self._more):
        break
      for out in Engine.step(self):
        outputs[out.request_id] = out
      steps += 1
      if max_steps is not None and steps >= max_steps:
        break
    if not self.is_leader:
      self._outbox_ids.clear()  # this process's own copies of the requests are not read
    return outputs

  # ------------------------------------------------------------------ hooks of Engine.step

  def _swap(self, plan: Plan) -> None:
    # Called every step, after scheduling and before any device work: the guard's place
    # (a digest compared after a device call could wait forever on a diverged process).
    step = self.metrics.steps
    if self.guard_every and step % self.guard_every == 0:
      self._guard(step, plan)
    if plan.swap_out:
      pairs = np.concatenate(plan.swap_out)
      self.host_pool.swap_out(self.cache, pairs[:, 0], pairs[:, 1])
    if plan.swap_in:
      pairs = np.concatenate(plan.swap_in)
      if len(pairs):
        self.cache = self.host_pool.swap_in(self.cache, pairs[:, 0], pairs[:, 1])

  def _execute(self, plan: Plan):
    tokens, shape, candidates = super()._execute(plan)
    # Read on the host by every process: each must hold a whole copy (GSPMD returns the
    # step's tokens replicated; if a compiler ever shards them, gather them here).
    tokens = host_readable(tokens)
    if candidates is not None:
      candidates = [host_readable(c) for c in candidates]
    return tokens, shape, candidates

  def _build_batch(self, plan: Plan):
    batch, self._prebuilt = self._prebuilt, None
    return batch if batch is not None else super()._build_batch(plan)

  def step_digest(self, plan: Plan) -> str:
    """The digest of a step's inputs: the packed batch and its layout (when the step has
    rows; the batch is built here and reused by the step), and the swaps."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(("step", self.metrics.steps, self._boundary)).encode())
    for name in ("swap_out", "swap_in"):
      pairs = getattr(plan, name)
      h.update(name.encode())
      if pairs:
        h.update(np.ascontiguousarray(np.concatenate(pairs), np.int64).tobytes())
    if plan.decodes or plan.rows:
      self._prebuilt = super()._build_batch(plan)
      packed, layout = self._prebuilt.pack()
      h.update(repr(layout).encode())
      h.update(np.ascontiguousarray(packed).tobytes())
    return h.hexdigest()

  def _guard(self, step: int, plan: Plan) -> None:
    digest = self.step_digest(plan)
    self._channel.put(f"guard/{step}/{self.process_index}", digest.encode())
    digests = {self.process_index: digest}
    for p in range(self.process_count):
      if p != self.process_index:
        digests[p] = self._channel.get(f"guard/{step}/{p}").decode()
    self.guard_checks += 1
    if len(set(digests.values())) > 1:
      last = "none" if self._last_matched is None else self._last_matched
      mine = [p for p, d in digests.items() if d == digest]
      raise DivergenceError(
        f"step {step}: the processes' step inputs differ (digests by process: {digests}); "
        f"process {self.process_index} agrees with processes {mine}. Their host states "
        f"(scheduler, allocator, requests) are no longer the same: the engine stops. "
        f"The last step whose inputs matched when compared: {last} (guard_every="
        f"{self.guard_every})."
      )
    self._last_matched = step
    if self.is_leader:
      # Every process has passed this boundary: what they read before it can go.
      for key in self._delete_later:
        self._channel.delete(key)
      self._delete_later = [f"guard/{step}/{p}" for p in range(self.process_count)]


def host_readable(x: jax.Array) -> jax.Array:
  """``x`` itself when this process can read all of it (fully addressable, or replicated
  so that a local copy is whole); else a replicated copy (a collective: every process
  must call it with its part of the same array)."""
  if x.is_fully_addressable or x.sharding.is_fully_replicated:
    return x
  return _replicate(x.sharding.mesh)(x)


@functools.lru_cache(maxsize=8)
def _replicate(mesh):
  return jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))
