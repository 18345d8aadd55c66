r"""Experiment 2a: share of reserved KV memory holding tokens, contiguous against paged.

Full run (2 synthetic workloads x 12 systems, 2,000 requests each; about 1-2 minutes on
one CPU core)::

  python -m experiments.run --config=configs/memory_waste.py --workdir=/tmp/memory_waste

Quick run (the README's main command; about 10 seconds on one CPU core)::

  python -m experiments.run --config=configs/memory_waste.py:quick --workdir=/tmp/paxcache_run

Your own ShareGPT-format trace (token count = ceil(UTF-8 bytes / 4), see
experiments/workloads.py)::

  python -m experiments.run --config=configs/memory_waste.py \
      --config.workloads='("/path/to/ShareGPT_V3_unfiltered_cleaned_split.json",)' \
      --workdir=/tmp/memory_waste_sharegpt

Sweep the block size (a tuple field) or any scalar field (``--sweep``)::

  python -m experiments.run --config=configs/memory_waste.py:quick \
      --config.block_sizes='(8, 16, 32)' --sweep=pool_tokens=7680,15360 --workdir=/tmp/mw
"""

from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
  config = ConfigDict()
  config.experiment = "memory_waste"  # experiments.run looks the function up by this name
  config.workloads = ("sharegpt", "alpaca")  # synthetic names, or paths to ShareGPT JSON files
  config.num_requests = 2000  # requests per workload (a JSON file: <= 0 takes all)
  config.max_seq_len = 2048  # context of the paper's OPT models; Orca (Max) reserves this
  # ~12 GiB of KV at OPT-13B's 800 KiB per token: what a 40 GB A100 leaves after the weights.
  config.pool_tokens = 15360
  # K/V dtype of the pool: pool_tokens counts float16 slots of a kv_shape model (layers, KV
  # heads, head_dim); another dtype keeps those bytes (int8 / float8_e4m3fn: 1.94x the
  # slots at head_dim 128, scales counted; experiments/_kv_dtype.py).
  config.kv_dtype = "float16"
  config.kv_shape = (40, 40, 128)  # OPT-13B
  config.block_sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # paged block sizes to sweep
  config.contiguous_policies = ("max", "pow2", "oracle")  # Orca (Max), (Pow2), (Oracle)
  config.arrival_rate = 0.0  # Poisson requests per step; 0: all arrive at step 0 (saturated)
  config.max_batch = 0  # most requests running at once (vLLM: 256); 0: only memory limits it
  config.watermark = 0.01  # paged admission keeps this share of blocks free, as vLLM does
  config.seed = 0  # seeds the request lengths and arrivals

  if arg == "quick":
    config.num_requests = 1000  # enough that Alpaca's prompts alone overflow the pool
    config.block_sizes = (1, 4, 16, 64, 256)
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; known: 'quick'")
  return config
