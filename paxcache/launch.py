r"""Starts several processes of one JAX job on this machine (``paxcache.distributed.launch``).

Usage::

  python -m paxcache.launch --num-processes 2 [--cpu-devices 2 | --gpus-per-process 1] \
      [--port P] [--timeout S] \
      -- -m experiments.run --config=configs/batch_capacity.py --workdir=/tmp/bc \
      --config.engine.distributed=True

Everything after ``--`` is what ``python`` runs in every process; the program calls
``paxcache.distributed.initialize()`` first (``experiments.run`` does when the config asks
for the distributed engine, and refuses to run under a launcher otherwise). Exits with 0
when every process does, else with the first failure's status (the others are stopped).
"""

from __future__ import annotations

import argparse
import sys

from paxcache.distributed import launch


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv and not {"-h", "--help"} & set(argv):
    print("usage: python -m paxcache.launch [options] -- <python args>", file=sys.stderr)
    return 2
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(prog="python -m paxcache.launch")
  parser.add_argument("--num-processes", "-n", type=int, required=True)
  devices = parser.add_mutually_exclusive_group()
  devices.add_argument(
    "--cpu-devices", type=int, default=None, help="run on the CPU with this many devices each"
  )
  devices.add_argument(
    "--gpus-per-process", type=int, default=None, help="CUDA_VISIBLE_DEVICES split per process"
  )
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
  parser.add_argument("--timeout", type=float, default=None, help="seconds, then stop all")
  opts = parser.parse_args(argv[:split])
  return launch(
    argv[split + 1 :],
    opts.num_processes,
    cpu_devices=opts.cpu_devices,
    gpus_per_process=opts.gpus_per_process,
    port=opts.port,
    timeout_s=opts.timeout,
  )


if __name__ == "__main__":
  sys.exit(main())
