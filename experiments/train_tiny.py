r"""Trains the tiny byte-level decoder on its corpus and saves the packaged checkpoint.

Reads ``paxcache/_fixtures/tiny_corpus.txt`` and writes ``paxcache/_fixtures/tiny/``
(package data: ``paxcache.nn.TINY_CORPUS`` and ``paxcache.nn.TINY_CHECKPOINT``).

The checkpoint is what the engine demos and the parity tests load, so that they
run on a trained model (readable text, real logit margins) rather than random
weights. About a minute on a loaded 2-core CPU:

  python -m experiments.train_tiny --out_dir=paxcache/_fixtures/tiny
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx

import paxcache
from paxcache.nn import (
  TINY_CHECKPOINT,
  TINY_CORPUS,
  Decoder,
  DecoderConfig,
  greedy_generate_no_cache,
  save_decoder,
)

# The directory holding the paxcache package: the repo root in a checkout, site-packages
# in an install. The corpus path saved with the checkpoint is relative to it.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(paxcache.__file__)))

flags.DEFINE_string("corpus", TINY_CORPUS, "Training text.")
flags.DEFINE_string("out_dir", TINY_CHECKPOINT, "Checkpoint dir.")
flags.DEFINE_integer("steps", 400, "Optimizer steps.")
flags.DEFINE_integer("batch_size", 32, "Sequences per step.")
flags.DEFINE_integer("seq_len", 128, "Tokens per training sequence.")
flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate (warmup then cosine decay).")
flags.DEFINE_integer("seed", 0, "Initialisation and batch sampling seed.")
flags.DEFINE_integer("d_model", 64, "Model width.")
flags.DEFINE_integer("num_layers", 2, "Decoder layers.")
flags.DEFINE_integer("num_q_heads", 4, "Query heads.")
flags.DEFINE_integer("num_kv_heads", 2, "KV heads (GQA).")
flags.DEFINE_integer("head_dim", 16, "Head width.")
flags.DEFINE_integer("mlp_dim", 192, "SwiGLU hidden width.")
flags.DEFINE_integer("max_seq_len", 512, "Longest sequence the model accepts (RoPE positions).")
FLAGS = flags.FLAGS

PROMPT = "the old man "


def encode(text: str) -> list[int]:
  """Byte-level tokenizer: vocab 256, token = byte."""
  return list(text.encode("utf-8"))


def decode(tokens) -> str:
  return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def loss_fn(model: Decoder, batch: jax.Array) -> jax.Array:
  """Mean next-byte cross entropy over ``batch i32[b, seq_len + 1]``."""
  logits = model.forward(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@nnx.jit
def train_step(model: Decoder, optimizer: nnx.Optimizer, batch: jax.Array) -> jax.Array:
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  return loss


def train(
  config: DecoderConfig,
  data: np.ndarray,
  *,
  steps: int,
  batch_size: int,
  seq_len: int,
  learning_rate: float,
  seed: int,
) -> tuple[Decoder, list[float]]:
  """Trains a fresh decoder; returns it and the loss per step."""
  model = Decoder(config, rngs=nnx.Rngs(seed))
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, learning_rate, min(50, steps // 10 + 1), steps, learning_rate / 10
  )
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  losses = []
  for step in range(steps):
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
    batch = np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)
    losses.append(float(train_step(model, optimizer, jnp.asarray(batch))))
    if step % 100 == 0 or step == steps - 1:
      logging.info("step %d loss %.3f", step, losses[-1])
  return model, losses


def main(argv):
  del argv
  with open(FLAGS.corpus, encoding="utf-8") as f:
    data = np.asarray(encode(f.read()), np.int32)
  config = DecoderConfig(
    d_model=FLAGS.d_model,
    num_layers=FLAGS.num_layers,
    num_q_heads=FLAGS.num_q_heads,
    num_kv_heads=FLAGS.num_kv_heads,
    head_dim=FLAGS.head_dim,
    mlp_dim=FLAGS.mlp_dim,
    max_seq_len=FLAGS.max_seq_len,
  )
  t0 = time.perf_counter()
  model, losses = train(
    config,
    data,
    steps=FLAGS.steps,
    batch_size=FLAGS.batch_size,
    seq_len=FLAGS.seq_len,
    learning_rate=FLAGS.learning_rate,
    seed=FLAGS.seed,
  )
  seconds = time.perf_counter() - t0
  sample = decode(greedy_generate_no_cache(model, [encode(PROMPT)], 80)[0])
  logging.info("trained %d steps in %.1f s; final loss %.3f", FLAGS.steps, seconds, losses[-1])
  logging.info("greedy sample: %r", PROMPT + sample)
  extra = dict(
    steps=FLAGS.steps,
    batch_size=FLAGS.batch_size,
    seq_len=FLAGS.seq_len,
    learning_rate=FLAGS.learning_rate,
    seed=FLAGS.seed,
    final_loss=float(np.mean(losses[-20:])),
    train_seconds=round(seconds, 1),
    corpus=os.path.relpath(FLAGS.corpus, _PACKAGE_PARENT),
    tokenizer="bytes (vocab 256)",
    sample=PROMPT + sample,
    jax_version=jax.__version__,
  )
  save_decoder(model, FLAGS.out_dir, extra)
  print(f"saved {FLAGS.out_dir}: loss {losses[-1]:.3f}, {seconds:.1f} s\n{PROMPT + sample}")


if __name__ == "__main__":
  app.run(main)
