"""Per-card tuning tables of the GPU kernels (``*.json``, format in ``kernels.gpu.tuning_table``).

``derive.py`` writes the H100 and H200 tables from the measured rows in docs/results;
``experiments/bench/tune_gpu.py`` writes a table for the card it runs on.
"""
