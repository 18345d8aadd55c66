r"""Starts several processes of one JAX job on this machine (``paxcache.distributed.launch``).

Usage::

  python -m paxcache.launch --num-processes 2 [--cpu-devices 2 | --gpus-per-process 1] \
      [--port P] [--timeout S] \
      -- -m experiments.run --config=configs/batch_capacity.py --workdir=/tmp/bc

Everything after ``--`` is what ``python`` runs in every process; the program calls
``paxcache.distributed.initialize()`` first. Exits with 0 when every process does, else with
the first failure's status (the others are stopped).
"""

from __future__ import annotations

import argparse
import sys

from paxcache.distributed import launch


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    print("usage: python -m paxcache.launch [options] -- <python args>", file=sys.stderr)
    return 2
  split = argv.index("--")
  parser = argparse.ArgumentParser(prog="python -m paxcache.launch")
  parser.add_argument("--num-processes", "-n", type=int, required=True)
  parser.add_argument(
    "--cpu-devices", type=int, default=None, help="run on the CPU with this many devices each"
  )
  parser.add_argument(
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
