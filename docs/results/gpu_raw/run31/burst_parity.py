"""Run31: decode bursts on the GPU backend give the synchronous engine's tokens (tiny model;
mixed prompts, forks, prefix hits, end tokens, sampled and greedy rows)."""
import dataclasses, time
import numpy as np
from paxcache.engine import Engine, EngineConfig, Request
from paxcache.nn import TINY_CORPUS, load_decoder
tiny = load_decoder()
print("backend", tiny.config.backend if hasattr(tiny.config, "backend") else "?")
corpus = open(TINY_CORPUS, "rb").read()
rng = np.random.default_rng(7)
shared = list(corpus[100:148])
spec = [(2, 30, 1), (150, 12, 1), (17, 40, 2), (60, 25, 1), (5, 8, 3), (90, 20, 1), (33, 35, 1), (120, 6, 2), (9, 40, 1), (70, 4, 1), (48, 30, 1), (100, 16, 1)]
reqs = []
for i, (p, g, n) in enumerate(spec):
  st = int(rng.integers(0, len(corpus) - 200)); prompt = list(corpus[st:st + p])
  if i % 3 == 0: prompt = shared + prompt[:10]
  reqs.append(Request(i, prompt, max_new_tokens=g, n=n, end_token=ord(".") if i % 2 else None,
    temperature=0.0 if i % 3 == 0 else 0.9, top_k=0 if i % 2 else 12))
def cfg(**kw):
  return EngineConfig(num_blocks=400, block_size=8, num_host_blocks=256, preemption_mode="swap", max_num_seqs=8, max_num_batched_tokens=64, check_invariants=True, **kw)
want = Engine(tiny, cfg()).run(reqs)
for kw in [dict(decode_steps=4), dict(async_scheduling=True, decode_steps=3), dict(async_scheduling=True, dispatch_thread=True, decode_steps=5)]:
  e = Engine(tiny, cfg(**kw)); t0 = time.time(); got = e.run(reqs)
  bursts = sum(s.decode_steps > 1 for s in e.step_metrics)
  same = got == want
  print("parity", kw, "same", same, "bursts", bursts, "generated", e.metrics.generated_tokens, f"{time.time()-t0:.1f}s", flush=True)
  if not same:
    for k in want:
      if got[k] != want[k]: print("  differs", k, want[k].samples, got[k].samples)
