r"""Experiment 2e: preemption cost per block size, swapping against recomputation.

Full run (block sizes 1..256, sequences of 512 and 2,048 tokens, a 4-layer model; a few
minutes on CPU)::

  python -m experiments.run --config=configs/swap_vs_recompute.py --workdir=/tmp/swap

Quick run (about 20 seconds on CPU)::

  python -m experiments.run --config=configs/swap_vs_recompute.py:quick --workdir=/tmp/swap_q

Quick run plus end-to-end engine throughput with each preemption mode on CPU (48 requests,
lengths and block sizes divided by config.engine.length_scale = 8, in a 512-slot pool of
scaled tokens; 2-5 minutes, mostly compiling)::

  python -m experiments.run --config=configs/swap_vs_recompute.py:engine_cpu --workdir=/tmp/swap_e

On a GPU (Fig. 19a), a larger bfloat16 model (d_model 2,048, 16 layers, 16/8 heads x 128)
and one 2,048-token sequence at block sizes 1..256, 10 samples each; 88 s on one H200
(a5ffdcc; docs/results/swap_vs_recompute/gpu/)::

  python -m experiments.run --config=configs/swap_vs_recompute.py:gpu --workdir=/tmp/swap_gpu

Fig. 19b on a GPU: the engine_cpu engine run on the device present (mostly compiling the
engine's step shapes; 193 s on one H200; gpu_engine/)::

  python -m experiments.run --config=configs/swap_vs_recompute.py:gpu_engine --workdir=/tmp/swap_ge

On a copy of the tree (a device machine) set PAXCACHE_COMMIT (and PAXCACHE_GIT_CLEAN=1
for a clean tree) so that run_info.json names the commit (experiments/run.py git_state).
"""

from ml_collections import ConfigDict

from experiments import _engine_bench


def get_config(arg: str | None = None) -> ConfigDict:
  config = ConfigDict()
  config.experiment = "swap_vs_recompute"  # experiments.run looks the function up by this name
  config.block_sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # the sweep
  config.seq_lens = (512, 2048)  # tokens of the preempted sequence
  config.iters = 5  # timed calls after a warm-up (>= 5): median and min-max reported
  config.seed = 0  # seeds parameters, tokens and block placement
  # The model that recomputes (paxcache.nn.Decoder); its K/V shape is what swaps.
  config.vocab_size = 256  # tokens
  config.d_model = 256  # residual width
  config.num_layers = 4  # decoder layers
  config.num_q_heads = 8  # query heads
  config.num_kv_heads = 2  # KV heads
  config.head_dim = 32  # dims per head
  config.mlp_dim = 768  # SwiGLU hidden width
  config.dtype = "float32"  # activations and K/V
  # End to end through the engine (fields: experiments/_engine_bench.py); 0 requests skips.
  config.workload = "sharegpt"  # request lengths for the engine run
  config.engine = _engine_bench.default_engine_config(requests=0)
  config.engine.pool_tokens = 512  # small, so that requests are preempted

  if arg in ("quick", "engine_cpu"):
    config.block_sizes = (1, 4, 16, 64, 256)
    config.seq_lens = (256,)
    config.num_layers = 2
    config.iters = 7
    if arg == "engine_cpu":
      config.block_sizes = (8, 32, 128)
      config.engine.requests = 48
  elif arg == "gpu":
    # Fig. 19a: one 2,048-token sequence (one prefill compile per block size, 9 in all, so
    # that the run stays well under 4 minutes) of a ~0.85B-parameter bf16 model.
    config.seq_lens = (2048,)
    config.d_model = 2048
    config.num_layers = 16
    config.num_q_heads = 16
    config.num_kv_heads = 8
    config.head_dim = 128
    config.mlp_dim = 5632
    config.dtype = "bfloat16"
    config.vocab_size = 32000
    config.iters = 10
  elif arg == "gpu_engine":
    # Fig. 19b on a device: the engine_cpu run (48 scaled requests, blocks 8 / 32 / 128 as
    # engine blocks 1 / 4 / 16, 5 measured passes per mode) beside the quick microbenchmark.
    config.block_sizes = (8, 32, 128)
    config.seq_lens = (256,)
    config.num_layers = 2
    config.engine.requests = 48
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; known: 'quick', 'engine_cpu', 'gpu', 'gpu_engine'")
  return config
