"""Accuracy of 8-bit K/V caches (issue 16 part 2): logits and greedy tokens against a float cache.

Two measurements per model and ``kv_dtype`` (bfloat16, int8, float8_e4m3fn), each against
the same model with its float32 cache (``DecoderConfig.dtype``; the bf16 row is the
baseline the 8-bit rows are read against):

* teacher-forced: one token stream run through the paged model in chunks of ``--chunk``
  tokens (chunked prefill: each chunk's K/V are written, quantized, before it attends), the
  logits of every position compared: ``top1_agreement`` (argmax equal) and
  ``mean_abs_logit_err`` (mean over positions and vocabulary of |logit_8bit - logit_ref|);
* greedy generation through the engine: the fraction of generated tokens equal to the
  float cache's, position by position (after the first difference the two continuations
  see different contexts, so this is a lower bound of per-step agreement).

  python -m experiments.kv_quant_accuracy --model tiny
  python -m experiments.kv_quant_accuracy --model smollm2 --tokens 1024 --record

``--record`` appends rows to docs/results/kv_quant.jsonl (device, kv_dtype, kv_rotation,
case, top1_agreement, mean_abs_logit_err, date, commit and whether the tree was clean; the
GPU throughput fields are left out). ``--no-kv-rotation`` stores int8 rows as they are
(``DecoderConfig.kv_rotation=False``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from paxcache.cache import PagedKVCache

RESULTS = os.path.join(os.path.dirname(__file__), "..", "docs", "results", "kv_quant.jsonl")

# ShareGPT-like: a system prompt, a user turn and a long assistant answer (prose, lists,
# code, numbers), so the stream mixes the token kinds a chat server sees.
TEXT = """<|im_start|>system
You are a helpful assistant. Answer carefully and explain your reasoning.<|im_end|>
<|im_start|>user
I run a small bakery and want to understand my costs. Flour costs 0.80 per kilogram, butter
7.50 per kilogram, sugar 1.20 per kilogram. A batch of 24 croissants uses 1 kg of flour,
0.6 kg of butter and 0.1 kg of sugar. How much does one croissant cost in ingredients, and
how should I price it? Also, can you write a short Python function that computes it?<|im_end|>
<|im_start|>assistant
Let's work through the ingredient cost of one batch first, then divide by the number of
croissants.

1. Flour: 1 kg x 0.80 = 0.80
2. Butter: 0.6 kg x 7.50 = 4.50
3. Sugar: 0.1 kg x 1.20 = 0.12

The batch costs 0.80 + 4.50 + 0.12 = 5.42 in ingredients, so one croissant costs
5.42 / 24, about 0.226. Ingredients are usually 25 to 35 percent of the price of baked
goods, because labour, rent, energy and waste must be covered too. At 30 percent the
price would be 0.226 / 0.30, about 0.75; many bakeries round up to a price that is easy to
pay, such as 0.80 or 1.00, and check it against the prices of nearby shops.

Here is a small function:

```python
def croissant_cost(flour_kg, butter_kg, sugar_kg, prices, batch=24):
    total = (flour_kg * prices["flour"] + butter_kg * prices["butter"]
             + sugar_kg * prices["sugar"])
    return total / batch

prices = {"flour": 0.80, "butter": 7.50, "sugar": 1.20}
print(round(croissant_cost(1.0, 0.6, 0.1, prices), 3))  # 0.226
```

A few more things to consider: butter prices change through the year, so recompute the
cost every month; weigh the waste (unsold croissants at the end of the day) and include it
as a percentage; and remember that a good croissant sells on quality, so a higher price
with a loyal clientele often beats a low one. If you tell me your monthly rent, wages and
how many croissants you sell per day, I can help you find the price at which the bakery
breaks even, and what margin each additional croissant brings.<|im_end|>
<|im_start|>user
Thanks! What if butter goes up by 20 percent next month?<|im_end|>
<|im_start|>assistant
"""


def _load(model_name: str, kv_dtype, *, backend: str, kv_rotation: bool = True):
  if model_name == "tiny":
    from paxcache.nn import load_decoder

    model = load_decoder(backend=backend, kv_dtype=kv_dtype, kv_rotation=kv_rotation)
    encode = lambda s: list(s.encode("utf-8"))  # the tiny model is byte-level
    return model, encode, None
  from paxcache.models import load_gguf_llama

  g = load_gguf_llama(max_seq_len=4096, backend=backend, kv_dtype=kv_dtype, kv_rotation=kv_rotation)
  return g.model, g.encode, g


# The chat prompts of docs/smollm2.md's answers table (and the README's France example).
CHAT_PROMPTS = (
  "What is the capital of France?",
  "What is the chemical symbol for water?",
  "How many days are in a week?",
  "Name the three primary colors.",
  "What is the largest planet in the solar system?",
  "Who wrote Romeo and Juliet?",
)


def chat_answers(gm, model, *, new_tokens: int) -> list[str]:
  """Greedy answers to CHAT_PROMPTS through the engine (one batch)."""
  from paxcache.engine import Engine, EngineConfig, Request

  reqs = [
    Request(i, gm.chat_prompt(p), max_new_tokens=new_tokens, end_token=gm.eos_id)
    for i, p in enumerate(CHAT_PROMPTS)
  ]
  out = Engine(model, EngineConfig(num_blocks=64, block_size=16)).run(reqs)
  return [gm.decode(out[i].samples[0]) for i in range(len(reqs))]


def teacher_forced_logits(model, tokens, *, chunk: int, block_size: int = 16):
  """Logits f32[len(tokens), vocab] of one sequence run in chunks over a paged cache."""
  n = len(tokens)
  num_blocks = -(-n // block_size) + 1
  cache = model.init_cache(num_blocks, block_size)
  table = jnp.arange(num_blocks, dtype=jnp.int32)[None, :]

  @jax.jit
  def step(cache, toks, start):
    pos = start + jnp.arange(chunk, dtype=jnp.int32)
    return model(
      toks,
      pos,
      cache,
      block_table=table,
      lengths=(start + chunk)[None],
      slot_mapping=pos,
      cu_q_lens=jnp.asarray([0, chunk], jnp.int32),
    )

  out = []
  usable = n - n % chunk
  for s in range(0, usable, chunk):
    logits, cache = step(cache, jnp.asarray(tokens[s : s + chunk], jnp.int32), jnp.int32(s))
    out.append(np.asarray(logits, np.float32))
  return np.concatenate(out)


def greedy_tokens(model, prompt, *, new_tokens: int):
  from paxcache.engine import Engine, EngineConfig, Request

  blocks = -(-(len(prompt) + new_tokens) // 16) + 4
  engine = Engine(model, EngineConfig(num_blocks=blocks, block_size=16))
  out = engine.run([Request("r", prompt, max_new_tokens=new_tokens)])
  return out["r"].samples[0]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
  ap.add_argument("--tokens", type=int, default=512, help="teacher-forced tokens (max)")
  ap.add_argument("--chunk", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens through the engine")
  # bfloat16 too: the error a bf16 cache makes against the float32 one is the baseline the
  # 8-bit errors are read against.
  ap.add_argument("--kv-dtypes", default="bfloat16,int8,float8_e4m3fn")
  ap.add_argument("--backend", default="auto")
  ap.add_argument("--ref-kv-dtype", default=None, help="reference cache dtype (default: dtype)")
  ap.add_argument(
    "--answers", type=int, default=0, help="smollm2: also compare greedy chat answers (tokens)"
  )
  ap.add_argument(
    "--no-kv-rotation",
    action="store_true",
    help="8-bit rows stored as they are (DecoderConfig.kv_rotation=False), the ablation",
  )
  ap.add_argument("--record", action="store_true", help="append to docs/results/kv_quant.jsonl")
  args = ap.parse_args(argv)

  ref_model, encode, gm = _load(args.model, args.ref_kv_dtype, backend=args.backend)
  ref_answers = chat_answers(gm, ref_model, new_tokens=args.answers) if args.answers else None
  text = TEXT
  tokens = encode(text)
  while len(tokens) < args.tokens:  # repeat the conversation to reach the length asked
    text += TEXT
    tokens = encode(text)
  tokens = tokens[: args.tokens]
  prompt = encode(TEXT)[:256]
  ref_logits = teacher_forced_logits(ref_model, tokens, chunk=args.chunk)
  ref_greedy = greedy_tokens(ref_model, prompt, new_tokens=args.new_tokens)
  ref_dtype = jnp.dtype(ref_model.config.jnp_kv_dtype).name
  from experiments.run import git_state  # the commit (and cleanliness) each row came from

  git = git_state()
  device = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"
  rows = []
  for kv in args.kv_dtypes.split(","):
    model, _, gm = _load(args.model, kv, backend=args.backend, kv_rotation=not args.no_kv_rotation)
    probe = model.init_cache(2, 16)
    assert isinstance(probe, PagedKVCache) and probe.dtype == jnp.dtype(kv), probe.dtype
    logits = teacher_forced_logits(model, tokens, chunk=args.chunk)
    agree = float(np.mean(logits.argmax(-1) == ref_logits.argmax(-1)))
    err = float(np.mean(np.abs(logits - ref_logits)))
    greedy = greedy_tokens(model, prompt, new_tokens=args.new_tokens)
    same = next(
      (i for i, (a, b) in enumerate(zip(greedy, ref_greedy, strict=False)) if a != b), len(greedy)
    )
    greedy_agree = float(np.mean(np.asarray(greedy) == np.asarray(ref_greedy)))
    row = dict(
      device=device,
      kv_dtype=kv,
      # whether the rows were stored rotated (int8 only: DecoderConfig.kv_rotation)
      kv_rotation=not args.no_kv_rotation and jnp.dtype(kv) == jnp.int8,
      case=f"{args.model}_teacher_forced_vs_{ref_dtype}_{len(logits)}tok",
      top1_agreement=round(agree, 4),
      mean_abs_logit_err=round(err, 5),
      mean_abs_logit_ref=round(float(np.mean(np.abs(ref_logits))), 4),
      tokens=len(logits),
      greedy_tokens=len(greedy),
      greedy_agreement=round(greedy_agree, 4),
      greedy_identical_prefix=same,
      date=datetime.date.today().isoformat(),
      commit=git["git_commit"],
      git_clean=git["git_clean"],
    )
    if ref_answers is not None:
      answers = chat_answers(gm, model, new_tokens=args.answers)
      row["chat_answers_identical"] = sum(a == b for a, b in zip(answers, ref_answers, strict=True))
      row["chat_answers"] = len(answers)
      for p, a, b in zip(CHAT_PROMPTS, answers, ref_answers, strict=True):
        print(f"{kv}: {p!r}: {a!r}" + ("" if a == b else f"  (reference: {b!r})"))
    rows.append(row)
    print(json.dumps(row))
  if args.record:
    with open(RESULTS, "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
