"""Experiments that reproduce the PagedAttention paper's results from config files.

Run one with ``python -m experiments.run --config=configs/<name>.py[:variant] --workdir=DIR``
(see :mod:`experiments.run` and docs/experiments.md). Nothing heavy is imported here, so the
CPU-only experiments start fast, and nothing from ml_collections, so that the GPU benchmark
and check scripts of :mod:`experiments.bench` (``python -m experiments.bench.<name>``, absl
flags) run where only absl-py is installed. Every timing goes through
:mod:`experiments._timing`.
"""
