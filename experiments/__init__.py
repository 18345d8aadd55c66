"""Experiments that reproduce the PagedAttention paper's results from config files.

Run one with ``python -m experiments.run --config=configs/<name>.py[:variant] --workdir=DIR``
(see :mod:`experiments.run` and docs/experiments.md). Nothing heavy is imported here, so the
CPU-only experiments start fast.
"""
