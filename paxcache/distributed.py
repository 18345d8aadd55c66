"""Several processes, one mesh: joining a multi-controller JAX job, and starting one.

Multi-controller JAX runs one Python process per host (or, for tests, several on one
machine); after :func:`initialize` every process sees every process's devices in
``jax.devices()`` and a mesh over them (``paxcache.sharding.make_mesh()``) spans them all.
``paxcache.engine.DistributedEngine`` serves on such a mesh. docs/scaling.md gives the
commands.

The API is three things:

* :func:`initialize` joins the job: with arguments, or from the environment variables
  that :func:`launch` sets, or, with neither, by ``jax.distributed.initialize()``'s own
  auto-detection (SLURM, TPU pods, Open MPI).
* :func:`launch` (and ``python -m paxcache.launch``) starts ``num_processes`` copies of one
  Python command on this machine with a 127.0.0.1 coordinator on a free port, prefixes
  their output with ``[p<i>]``, stops them all when one fails or a time limit passes, and
  returns the first failure's exit status (0 when all succeed). On Linux the processes
  also get SIGTERM if the launching process (the thread that called this) dies.
* :class:`KeyValueChannel`: small byte messages between the processes through the JAX
  coordination service's key-value store (no device work); what the engine uses to send
  new requests and compare digests at step boundaries.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

__all__ = [
  "ENV_COORDINATOR",
  "ENV_NUM_PROCESSES",
  "ENV_PROCESS_ID",
  "KeyValueChannel",
  "free_port",
  "initialize",
  "is_initialized",
  "launch",
]

ENV_COORDINATOR = "PAXCACHE_COORDINATOR"  # host:port of process 0's coordination service
ENV_NUM_PROCESSES = "PAXCACHE_NUM_PROCESSES"
ENV_PROCESS_ID = "PAXCACHE_PROCESS_ID"
_LOOPBACK = ("127.0.0.1", "localhost")


def is_initialized() -> bool:
  """Whether ``jax.distributed`` is initialised in this process."""
  from jax._src import distributed

  return distributed.global_state.client is not None


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  cpu_collectives: str | None = "gloo",
  **kwargs,
) -> tuple[int, int]:
  """Joins this process to a multi-controller JAX job; returns ``(process_index,
  process_count)``.

  Call it first, before anything touches a device. Arguments left None are read from
  ``PAXCACHE_COORDINATOR``, ``PAXCACHE_NUM_PROCESSES`` and ``PAXCACHE_PROCESS_ID`` (set by
  :func:`launch`); where those are unset too, ``jax.distributed.initialize()`` detects the
  job itself (SLURM, TPU pods, Open MPI) or fails saying what it needs.

  Args:
    coordinator_address: ``host:port`` of process 0.
    num_processes, process_id: this job's size and this process's index.
    cpu_collectives: the CPU backend's collectives (``"gloo"``: needed for a mesh of CPU
      devices of several processes; it does not affect GPU or TPU devices); None leaves
      JAX's setting.
    **kwargs: passed to ``jax.distributed.initialize`` (e.g. ``initialization_timeout``).
      With a ``127.0.0.1`` / ``localhost`` coordinator, ``coordinator_bind_address``
      defaults to that address (the service listens on loopback only).

  Calling it again in an initialised process only returns the indices.
  """
  import jax

  if is_initialized():
    return jax.process_index(), jax.process_count()
  env = os.environ
  if coordinator_address is None:
    coordinator_address = env.get(ENV_COORDINATOR)
  if num_processes is None and env.get(ENV_NUM_PROCESSES):
    num_processes = int(env[ENV_NUM_PROCESSES])
  if process_id is None and env.get(ENV_PROCESS_ID):
    process_id = int(env[ENV_PROCESS_ID])
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  given = dict(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  if coordinator_address and coordinator_address.rsplit(":", 1)[0] in _LOOPBACK:
    # A one-machine job: process 0's coordination service listens on loopback only (JAX
    # binds every interface by default).
    kwargs.setdefault("coordinator_bind_address", coordinator_address)
  jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None}, **kwargs)
  return jax.process_index(), jax.process_count()


class KeyValueChannel:
  """Byte messages under ``namespace`` in the coordination service's key-value store.

  ``put(key, data)`` sets a key once; ``get(key)`` waits for it (up to ``timeout_s``, then
  ``TimeoutError`` naming the key); ``delete(key)`` drops it. Without ``jax.distributed``
  (one process) the store is a dict in this process, so code written for several processes
  runs unchanged in one.
  """

  def __init__(self, namespace: str, timeout_s: float = 300.0):
    from jax._src import distributed

    self.namespace = namespace.rstrip("/")
    self.timeout_s = float(timeout_s)
    self._client = distributed.global_state.client
    self._local: dict[str, bytes] = {}

  def _key(self, key: str) -> str:
    return f"{self.namespace}/{key}"

  def put(self, key: str, data: bytes) -> None:
    if self._client is None:
      self._local[self._key(key)] = bytes(data)
    else:
      self._client.key_value_set_bytes(self._key(key), bytes(data))

  def get(self, key: str) -> bytes:
    if self._client is None:
      try:
        return self._local[self._key(key)]
      except KeyError:
        raise TimeoutError(f"key {self._key(key)!r} was never set (one process)") from None
    try:
      return self._client.blocking_key_value_get_bytes(self._key(key), int(self.timeout_s * 1000))
    except Exception as e:  # the client raises its own error type on a deadline
      raise TimeoutError(
        f"waited {self.timeout_s:g} s for {self._key(key)!r} from another process: {e}"
      ) from e

  def delete(self, key: str) -> None:
    if self._client is None:
      self._local.pop(self._key(key), None)
    else:
      self._client.key_value_delete(self._key(key))


# ---------------------------------------------------------------------------------------------
# Starting several processes on one machine.


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port free on ``host`` now (the OS picks it; another program could take it
  before it is used, which the coordinator would report)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def launch(
  args: Sequence[str],
  num_processes: int,
  *,
  cpu_devices: int | None = None,
  gpus_per_process: int | None = None,
  port: int | None = None,
  timeout_s: float | None = None,
  env: dict[str, str] | None = None,
  cwd: str | None = None,
  output: Callable[[str], None] | None = None,
) -> int:
  """Runs ``python <args>`` as ``num_processes`` processes of one JAX job on this machine.

  Each process gets ``PAXCACHE_COORDINATOR=127.0.0.1:<port>``, ``PAXCACHE_NUM_PROCESSES``
  and ``PAXCACHE_PROCESS_ID``, which :func:`initialize` reads, and one ``PYTHONHASHSEED``
  (``0`` unless set). Output lines (stdout and
  stderr together) go to ``output`` (default: this process's stdout), each prefixed with
  ``[p<i>] ``.

  Args:
    args: the arguments after ``python`` (``["-m", "module", ...]`` or ``["script.py",
      ...]``), the same for every process.
    num_processes: processes to start (>= 1).
    cpu_devices: run on the CPU with this many devices per process (sets ``JAX_PLATFORMS=cpu``
      and ``--xla_force_host_platform_device_count``); None keeps the platform.
    gpus_per_process: give process ``i`` the GPUs ``i * g .. (i + 1) * g - 1``
      (``CUDA_VISIBLE_DEVICES``), counted in the inherited ``CUDA_VISIBLE_DEVICES`` when
      one is set (a scheduler's share of the machine, e.g. ``4,5,6,7``), else in the
      machine's GPUs; None leaves every GPU visible to every process. Not with
      ``cpu_devices``.
    port: the coordinator's port on 127.0.0.1 (default: a free one).
    timeout_s: stop every process after this many seconds (exit status 124).
    env: extra environment variables for every process.
    cwd: the processes' working directory.
    output: called with each prefixed line.

  Returns:
    0 when every process exits 0; otherwise the first failing exit status (a process
    killed by a signal counts as ``128 + signal``), after stopping the others
    (SIGTERM, then SIGKILL after 5 s).
  """
  if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
    raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
  if cpu_devices is not None and (
    isinstance(cpu_devices, bool) or not isinstance(cpu_devices, int) or cpu_devices < 1
  ):
    raise ValueError(f"cpu_devices must be None or an int >= 1, got {cpu_devices!r}")
  if gpus_per_process is not None and (
    isinstance(gpus_per_process, bool)
    or not isinstance(gpus_per_process, int)
    or gpus_per_process < 1
  ):
    raise ValueError(f"gpus_per_process must be None or an int >= 1, got {gpus_per_process!r}")
  if cpu_devices is not None and gpus_per_process is not None:
    raise ValueError("cpu_devices and gpus_per_process: give one (the CPU, or GPUs), not both")
  if not args:
    raise ValueError("args: nothing to run (give a script or -m module)")
  port = free_port() if port is None else int(port)
  emit = output or (lambda line: print(line, flush=True))
  base = dict(os.environ)
  base.update(env or {})
  base[ENV_COORDINATOR] = f"127.0.0.1:{port}"
  base[ENV_NUM_PROCESSES] = str(num_processes)
  # One hash seed for every process, in case host code ever iterates a set of str ids.
  base.setdefault("PYTHONHASHSEED", "0")
  visible = None  # the inherited CUDA_VISIBLE_DEVICES, split
  if gpus_per_process is not None and base.get("CUDA_VISIBLE_DEVICES", "").strip():
    visible = [g.strip() for g in base["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    if num_processes * gpus_per_process > len(visible):
      raise ValueError(
        f"{num_processes} processes x {gpus_per_process} GPUs need "
        f"{num_processes * gpus_per_process}, but CUDA_VISIBLE_DEVICES="
        f"{base['CUDA_VISIBLE_DEVICES']!r} has {len(visible)}"
      )
  if cpu_devices is not None:
    base["JAX_PLATFORMS"] = "cpu"
    flags = base.get("XLA_FLAGS", "")
    base["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()
  procs: list[subprocess.Popen] = []
  readers: list[threading.Thread] = []
  lock = threading.Lock()

  def pump(i: int, stream) -> None:
    for line in stream:
      with lock:
        emit(f"[p{i}] {line.rstrip()}")

  def status(rc: int) -> int:
    return 128 - rc if rc < 0 else rc

  try:
    for i in range(num_processes):
      proc_env = dict(base, **{ENV_PROCESS_ID: str(i)})
      if gpus_per_process is not None:
        first = i * gpus_per_process
        gpus = [str(g) for g in range(first, first + gpus_per_process)]
        if visible is not None:
          gpus = visible[first : first + gpus_per_process]
        proc_env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
      command = [sys.executable, *args]
      if sys.platform == "linux":
        command = [sys.executable, "-c", _DIE_WITH_PARENT, *args]
        proc_env[_ENV_LAUNCHER_PID] = str(os.getpid())
      p = subprocess.Popen(
        command,
        env=proc_env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
      )
      procs.append(p)
      t = threading.Thread(target=pump, args=(i, p.stdout), daemon=True)
      t.start()
      readers.append(t)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        with lock:
          emit(f"[launch] a process exited with status {status(failed[0])}: stopping the others")
        return status(failed[0])
      if all(c == 0 for c in codes):
        return 0
      if deadline is not None and time.monotonic() > deadline:
        with lock:
          emit(f"[launch] time limit of {timeout_s:g} s passed: stopping every process")
        return 124
      time.sleep(0.05)
  finally:
    _stop(procs)
    for t in readers:
      t.join(timeout=5)


# Run first in each launched process (Linux): ask for SIGTERM when the launcher dies (a
# launcher killed outright runs no ``finally``), then exec the real program (the request
# survives exec). If the launcher died before the request, stop at once. A shim rather
# than ``preexec_fn``: forking a multithreaded process (JAX's) to run Python is unsafe.
_ENV_LAUNCHER_PID = "PAXCACHE_LAUNCHER_PID"
_DIE_WITH_PARENT = f"""
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(os.environ.pop({_ENV_LAUNCHER_PID!r})):
  sys.exit(1)
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""


def _stop(procs: list[subprocess.Popen]) -> None:
  """SIGTERM to the processes still running, then SIGKILL to those alive after 5 s."""
  running = [p for p in procs if p.poll() is None]
  for p in running:
    try:
      p.send_signal(signal.SIGTERM)
    except ProcessLookupError:
      pass
  end = time.monotonic() + 5
  for p in running:
    try:
      p.wait(timeout=max(0.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
