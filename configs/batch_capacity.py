r"""Experiment 2c: requests that fit one KV memory budget, contiguous against paged.

Full run (1,000 ShareGPT-like requests, and 128 scaled-down requests through the engine;
about 2-3 minutes on CPU, most of it compiling the engine's step shapes)::

  python -m experiments.run --config=configs/batch_capacity.py --workdir=/tmp/batch_capacity

Steps charged by another step-cost model (default: the CPU default, 1 ms per computed
token): ``--config.cost_model=opt13b_a100_roofline``, or a fit to the H200 steps measured
for request_rate, ``--config.step_records=docs/results/engine_steps.jsonl
--config.step_records_where=model=smollm2-135m,block_size=16``.

Quick run (300 requests, no engine run; a few seconds)::

  python -m experiments.run --config=configs/batch_capacity.py:quick --workdir=/tmp/capacity_quick

The quick run with steps charged by the OPT-13B-on-A100 roofline estimate (the model shape
of the default KV budget) instead of the CPU default::

  python -m experiments.run --config=configs/batch_capacity.py:roofline --workdir=/tmp/cap_roof

The seed's setting (8,192-token reservations in a budget of four of them; no engine run,
a few seconds)::

  python -m experiments.run --config=configs/batch_capacity.py:seed --workdir=/tmp/capacity_seed
"""

from ml_collections import ConfigDict

from experiments import _engine_bench


def get_config(arg: str | None = None) -> ConfigDict:
  config = ConfigDict()
  config.experiment = "batch_capacity"  # experiments.run looks the function up by this name
  config.workload = "sharegpt"  # "sharegpt", "alpaca" or a ShareGPT-format JSON path
  config.num_requests = 1000  # requests drawn from the workload
  config.max_seq_len = 2048  # contiguous Max reserves this per request
  config.seed = 0  # seeds the request lengths
  # Model shape for the KV budget (default OPT-13B; 800 KiB of K and V per token).
  config.num_layers = 40  # decoder layers
  config.num_kv_heads = 40  # KV heads per layer
  config.head_dim = 128  # dims per head
  config.kv_dtype = "float16"  # KV dtype: float32, bfloat16, float16, int8, float8_e4m3fn
  # Paged in the same bytes at each of these K/V dtypes (the kv_dtype table; 8-bit with
  # scales counted). Empty: no such table.
  config.kv_dtype_axis = ("bfloat16", "int8", "float8_e4m3fn")
  config.kv_budget_gib = 12.0  # GiB for KV: a 40 GB A100 after OPT-13B's 26 GB of weights
  config.block_size = 16  # paged block size (vLLM's default)
  config.contiguous_policies = ("max", "pow2", "oracle")  # Orca (Max), (Pow2), (Oracle)
  config.watermark = 0.01  # paged admission keeps this share of blocks free, as vLLM does
  # Step-cost model charging the serving simulation's steps (experiments/_cost_config.py):
  # a preset of paxcache/engine/_cost.py ("cpu_default": 1 ms per computed token, a stated
  # assumption; "opt13b_a100_roofline"), or a fit to measured steps in step_records.
  config.cost_model = "cpu_default"
  config.step_records = ""  # JSON lines of measured steps: fit the cost model to them
  config.step_records_where = ""  # only the records matching "key=value[,key=value]"
  config.heldout_fraction = 0.2  # of step_records, held out to report the fit's error
  config.swap_ms = 0.0  # ms per swapped token of a fitted model (the simulation never swaps)
  # Engine throughput on the device present (fields: experiments/_engine_bench.py).
  config.engine = _engine_bench.default_engine_config(requests=128)

  if arg in ("quick", "roofline"):
    config.num_requests = 300
    config.engine.requests = 0  # compiling the engine's step shapes takes ~1 min on CPU
    if arg == "roofline":
      config.cost_model = "opt13b_a100_roofline"  # not fitted: paxcache/engine/_cost.py
  elif arg == "seed":
    config.max_seq_len = 8192  # the seed's example reservation
    config.kv_budget_gib = 4 * 8192 * 819200 / 2**30  # exactly four such reservations
    config.engine.requests = 0  # the engine run would repeat the full run's (same pool)
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; known: 'quick', 'roofline', 'seed'")
  return config
