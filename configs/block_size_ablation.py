r"""Experiment 2d: per block size, memory waste, batch and decode kernel time per backend.

Full run (block sizes 1..256, 1,000 requests per workload, kernel at 32 x 2,048 tokens; a
few minutes on CPU, most of it the reference kernel at small blocks)::

  python -m experiments.run --config=configs/block_size_ablation.py --workdir=/tmp/ablation

Quick run (about 20 seconds on CPU)::

  python -m experiments.run --config=configs/block_size_ablation.py:quick --workdir=/tmp/abl_q

Quick run plus the engine's end-to-end tokens/s per block size on CPU (64 requests per
block size, lengths and block sizes divided by config.engine.length_scale = 8, so blocks
8-128 run as 1-16; 1-4 minutes, most of it compiling the engine's steps)::

  python -m experiments.run --config=configs/block_size_ablation.py:engine_cpu --workdir=/tmp/abl_e

On a GPU (Fig. 18a) the Pallas kernel is timed beside the reference at block sizes 1..256
(bfloat16; 32 x 2,048 tokens, 32 query heads, 8 KV heads, head_dim 128, as in
docs/benchmarks.md; 20 samples of 10 calls each: device time); the memory columns are the
full run's (1,000 requests per workload). 32 s on one H200 (a5ffdcc;
docs/results/block_size_ablation/gpu/)::

  python -m experiments.run --config=configs/block_size_ablation.py:gpu --workdir=/tmp/abl_gpu

Fig. 18b on a GPU: the engine_cpu run's engine measurement (64 scaled ShareGPT-like
requests per block size 8..256, 5 measured passes each) on the device present; its
time is mostly compiling the engine's step shapes (170 s on one H200; gpu_engine/)::

  python -m experiments.run --config=configs/block_size_ablation.py:gpu_engine --workdir=/tmp/abl_ge

On a copy of the tree (a device machine) set PAXCACHE_COMMIT (and PAXCACHE_GIT_CLEAN=1
for a clean tree) so that run_info.json names the commit (experiments/run.py git_state).
"""

from ml_collections import ConfigDict

from experiments import _engine_bench


def get_config(arg: str | None = None) -> ConfigDict:
  config = ConfigDict()
  config.experiment = "block_size_ablation"  # experiments.run looks the function up by this name
  config.block_sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # the sweep
  config.seed = 0  # seeds lengths and kernel inputs
  # Memory: the serving simulation (see configs/memory_waste.py).
  config.workloads = ("sharegpt", "alpaca")  # synthetic names or ShareGPT JSON paths
  config.num_requests = 1000  # requests per workload
  config.max_seq_len = 2048  # prompt + output cap
  config.pool_tokens = 15360  # KV pool in token slots
  # K/V dtype of the pool: pool_tokens counts float16 slots of a kv_shape model (layers, KV
  # heads, head_dim); another dtype keeps those bytes (int8 / float8_e4m3fn: 1.94x the
  # slots at head_dim 128, scales counted; experiments/_kv_dtype.py).
  config.kv_dtype = "float16"
  config.kv_shape = (40, 40, 128)  # OPT-13B
  config.watermark = 0.01  # paged admission keeps this share of blocks free
  # Kernel: one decode call, every sequence at kernel_context tokens.
  config.backends = ("reference", "gpu", "tpu")  # timed where they run natively
  config.kernel_batch = 32  # sequences per call
  config.kernel_context = 2048  # tokens per sequence
  config.num_q_heads = 32  # query heads
  config.num_kv_heads = 8  # KV heads (GQA 4:1)
  config.head_dim = 128  # dims per head
  config.kernel_dtype = "float32"  # K/V and q dtype
  # K/V dtype of the timed kernel when it differs from kernel_dtype: "int8" or
  # "float8_e4m3fn" (8-bit pools with float32 scales, quantized before timing); "" = same.
  config.kernel_kv_dtype = ""
  config.kernel_iters = 5  # timed samples after the compile (>= 5): median and min-max reported
  # Calls per sample, back to back, synced once (1 on CPU; >= 10 on an accelerator, so that
  # a sample is device time rather than the dispatch of one short call).
  config.kernel_inner = 1
  # End to end through the engine (fields: experiments/_engine_bench.py); 0 requests skips.
  config.engine = _engine_bench.default_engine_config(requests=0)

  if arg in ("quick", "engine_cpu"):
    config.block_sizes = (1, 4, 16, 64, 256)
    config.num_requests = 500
    config.kernel_batch = 4
    config.kernel_context = 512
    config.num_q_heads = 8
    config.num_kv_heads = 2
    config.head_dim = 64
    config.kernel_iters = 15
    if arg == "engine_cpu":
      config.block_sizes = (8, 16, 32, 64, 128)
      config.engine.requests = 64
  elif arg == "gpu":
    # Fig. 18a: every block size 1..256 (the small ones are where kernel efficiency is the
    # question), the Pallas kernel beside the reference, device time per call.
    config.kernel_dtype = "bfloat16"
    config.kernel_iters = 20
    config.kernel_inner = 10
  elif arg == "gpu_engine":
    # Fig. 18b on a device: the engine_cpu run (64 scaled requests per block size, blocks
    # 8-256 as engine blocks 1-32) with a small kernel check beside it.
    config.block_sizes = (8, 16, 32, 64, 128, 256)
    config.workloads = ("sharegpt",)
    config.num_requests = 500
    config.kernel_batch = 4
    config.kernel_context = 512
    config.kernel_dtype = "bfloat16"
    config.kernel_inner = 10
    config.engine.requests = 64
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; known: 'quick', 'engine_cpu', 'gpu', 'gpu_engine'")
  return config
