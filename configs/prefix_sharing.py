r"""Experiment 2b: memory saved by sharing KV blocks (system prompt, parallel sampling, forks).

Full run (block sizes 16 and 32, 1,000 Alpaca-like requests, 200 of them through the engine's
beam search; about 3 minutes on the shared 2-core machine)::

  python -m experiments.run --config=configs/prefix_sharing.py --workdir=/tmp/prefix_sharing

Quick run (block 16, 200 requests, 100 through the engine's beam search; 2-4 minutes)::

  python -m experiments.run --config=configs/prefix_sharing.py:quick --workdir=/tmp/prefix_quick

The seed's scenario alone, with other sizes::

  python -m experiments.run --config=configs/prefix_sharing.py:quick \
      --config.num_users=100 --config.system_prompt_len=5000 --config.widths='(2,)' \
      --workdir=/tmp/prefix_seed

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

  if arg == "quick":
    config.block_sizes = (16,)
    config.num_requests = 200
    config.engine.requests = 100
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; known: 'quick'")
  return config
