r"""Experiment 2b: memory saved by sharing KV blocks (system prompt, parallel sampling, forks).

Full run (block sizes 16 and 32, 1,000 Alpaca-like requests, 200 of them through the engine's
beam search, and the decode-time axis on the CPU reference; about 4 minutes on the shared
2-core machine)::

  python -m experiments.run --config=configs/prefix_sharing.py --workdir=/tmp/prefix_sharing

Quick run (block 16, 200 requests, 100 through the engine's beam search; 2-4 minutes)::

  python -m experiments.run --config=configs/prefix_sharing.py:quick --workdir=/tmp/prefix_quick

The seed's scenario alone, with other sizes::

  python -m experiments.run --config=configs/prefix_sharing.py:quick \
      --config.num_users=100 --config.system_prompt_len=5000 --config.widths='(2,)' \
      --workdir=/tmp/prefix_seed

The time axis on an accelerator (decode attention per step, plain against cascade, on the
backend the device has; 32 query / 8 KV heads of 128, bf16, as the GPU benchmarks; where
ml_collections is missing, ``experiments.bench.prefix_time`` computes the same rows)::

  python -m experiments.run --config=configs/prefix_sharing.py:device --workdir=/tmp/prefix_dev

ShareGPT-like lengths, beside the paper's ShareGPT figures (3-6 minutes)::

  python -m experiments.run --config=configs/prefix_sharing.py:quick --config.workload=sharegpt \
      --workdir=/tmp/prefix_sharegpt
"""

from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
  config = ConfigDict()
  config.experiment = "prefix_sharing"  # experiments.run looks the function up by this name
  config.block_sizes = (16, 32)  # block sizes to sweep (vLLM's default is 16)
  config.seed = 0  # seeds token ids, lengths and the forks' parents
  # The seed's scenario: users sharing one system prompt.
  config.num_users = 100  # users resident at once
  config.system_prompt_len = 5000  # tokens of the shared system prompt
  config.user_prompt_len = 32  # each user's own prompt tokens after the system prompt
  config.output_len = 64  # tokens each user generates
  # Parallel sampling and random (beam-search-like) forks on a length workload; the paper
  # reports Alpaca and ShareGPT, and each workload is shown beside its own figures only.
  config.workload = "alpaca"  # "sharegpt", "alpaca" or a ShareGPT-format JSON path
  config.num_requests = 1000  # requests per width
  config.widths = (2, 4, 6)  # parallel samples n / forked beams k (the paper's n and k)
  config.max_seq_len = 2048  # prompt + output cap for drawn lengths
  # Real beam search through the engine on the packaged tiny model (experiments.prefix_sharing
  # beam_rows); lengths and block sizes divided by length_scale, as in the other engine runs.
  config.engine = ConfigDict()
  config.engine.requests = 200  # beam requests per width (the first drawn ones); 0 skips them
  config.engine.length_scale = 8.0  # lengths and block sizes are divided by this
  config.engine.max_seq_len = 512  # the tiny model's; longer scaled requests are dropped
  config.engine.max_num_seqs = 48  # beams resident at once (requests run concurrently)
  config.engine.max_num_batched_tokens = 256  # query tokens per step
  # The time axis: one decode step's attention for the system-prompt scenario, plain paged
  # against cascade attention (kernels.cascade_attention), on the current backend.
  config.timing = ConfigDict()
  config.timing.repeats = 5  # timed samples per kernel (>= 5: experiments._timing); 0 skips
  config.timing.inner = 1  # calls per sample (> 1 on an accelerator: device time)
  config.timing.backend = "auto"  # the reference on CPU, the Pallas kernels on GPU / TPU
  config.timing.users = 0  # rows; 0: num_users
  config.timing.shared_len = 0  # shared tokens; 0: system_prompt_len
  config.timing.own_len = 0  # each row's own tokens; 0: user_prompt_len + output_len
  # A small head layout by default, so that the reference's per-row gather of 100 x 5,096
  # tokens stays within a CPU's memory and a few seconds; :device uses the GPU benchmarks'.
  config.timing.num_q_heads = 8
  config.timing.num_kv_heads = 2
  config.timing.head_dim = 128
  config.timing.dtype = "float32"

  if arg == "quick":
    config.block_sizes = (16,)
    config.num_requests = 200
    config.engine.requests = 100
    config.timing.users = 16
    config.timing.shared_len = 1000
  elif arg == "device":
    # Only the time axis matters here: the memory rows are the same on every machine.
    config.block_sizes = (16,)
    config.num_requests = 200
    config.engine.requests = 0
    config.timing.inner = 10
    config.timing.num_q_heads = 32
    config.timing.num_kv_heads = 8
    config.timing.dtype = "bfloat16"
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; known: 'quick', 'device'")
  return config
