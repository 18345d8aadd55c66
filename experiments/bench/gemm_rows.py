"""The decode step's weight products at few rows: how close to the read rate, and what a
split of the reduction axis does.

A decode step of ``B`` sequences multiplies ``[B, K]`` activations by each layer's weights
``[K, N]``: memory-bound products (the weight is read once, ``2 K N`` bytes in bf16) whose
output has few tiles at small ``B`` (``N / 128`` column tiles of a 64-row product: 24 for
the 1B shape's q/k/v), so that part of the GPU may sit idle. For each weight of a model's
layer (``engine_step.MODELS``: q/k/v, o, gate/up, down) and each row count, one jit runs
``--layers`` products of distinct activations by distinct weights (so that XLA merges no
two products, and, where ``--layers`` weights are well above the L2 cache, 50 MB on an
H200, no weight is served from L2 by the run before; smaller totals give lower bounds),
as:

* ``dot``: ``jnp.dot(x, w, preferred_element_type=f32)`` cast to bf16, XLA's choice of
  kernel (Triton or cuBLAS, autotuned);
* ``split{s}``: the reduction axis in ``s`` parts (``einsum('bsk,skn->sbn')`` then a float32
  sum over ``s``): ``s`` times the output tiles, plus one small reduction.

With ``--swiglu`` it times SwiGLU's front instead (the gate/up product and ``silu(gate) *
up``, bf16 out) for each model's gate/up weight, three ways:

* ``xla``: XLA's product, then the activation (XLA fuses it into a kernel of its own);
* ``auto``: ``paxcache.nn.project(gemm="auto")`` (the split-K kernel of
  ``kernels/gpu/matmul.py`` where its rule has a launch), then the activation, which XLA
  fuses with the sum of the partials: the model's path;
* ``fused``: ``kernels.gpu.matmul.swiglu_matmul`` (one unsplit kernel, the activation in
  its epilogue) with ``swiglu_settings``'s launch (``fit=True``).

Device time per product from a ``jax.profiler`` trace (median of ``--repeats`` runs,
min-max), as a share of the read rate of ``jnp.sum`` over 4 GiB measured in the same
process. Run it twice, once with ``XLA_FLAGS=--xla_gpu_enable_triton_gemm=false`` (cuBLAS
for every product), to compare XLA's pick with cuBLAS's.

  python -m experiments.bench.gemm_rows --out /tmp/gemm_rows
  python -m experiments.bench.gemm_rows --swiglu --rows 16,64,128 --layers 30 --out /tmp/swiglu

Writes ``OUT/gemm_rows.jsonl`` and prints a table last.
"""

from __future__ import annotations

import functools
import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
from absl import flags

from experiments.bench import _flags
from experiments.bench._gpu_common import commit_of, device_time, env_info, write_jsonl
from experiments.bench.engine_step import MODELS, read_rate


def weight_shapes(name: str) -> dict[str, tuple[int, int]]:
  """``{product: (K, N)}`` of one layer of ``engine_step.MODELS[name]``."""
  m = MODELS[name]
  d, hd = m["d_model"], m["head_dim"]
  return {
    "qkv": (d, (m["num_q_heads"] + 2 * m["num_kv_heads"]) * hd),
    "o": (m["num_q_heads"] * hd, d),
    "gate_up": (d, 2 * m["mlp_dim"]),
    "down": (m["mlp_dim"], d),
  }


def products(xs, ws, split: int):
  """``xs[i] @ ws[i]`` for each ``i`` (no operand shared, so that XLA merges no two)."""
  out = []
  for x, w in zip(xs, ws, strict=True):
    k, n = w.shape
    if split == 1:
      y = jnp.dot(x, w, preferred_element_type=jnp.float32)
    else:
      y = jnp.einsum(
        "bsk,skn->sbn",
        x.reshape(x.shape[0], split, k // split),
        w.reshape(split, k // split, n),
        preferred_element_type=jnp.float32,
      ).sum(0)
    out.append(y.astype(x.dtype))
  return out


SWIGLU_FRONTS = ("xla", "auto", "fused")


def swiglu_fronts(xs, ws, front: str, *, interpret: bool = False):
  """``silu(x @ w[:, :mlp]) * (x @ w[:, mlp:])`` for each ``i`` (``w`` is ``[K, 2 mlp]``,
  gate then up), by ``front`` (one of :data:`SWIGLU_FRONTS`), in x's dtype."""
  from kernels.gpu import matmul as mm
  from paxcache.nn import project

  out = []
  for x, w in zip(xs, ws, strict=True):
    mlp = w.shape[1] // 2
    if front == "fused":
      settings = mm.swiglu_settings(x.shape[0], x.shape[1], mlp, fit=True)
      out.append(mm.swiglu_matmul(x, w, mlp=mlp, settings=settings, interpret=interpret))
      continue
    h = project(x, w, gemm=front, interpret=interpret)
    out.append((jax.nn.silu(h[:, :mlp]) * h[:, mlp:]).astype(x.dtype))
  return out


def measure(k, n, rows, fn, args):
  """Device time per product of ``fn(xs, ws)`` over ``--layers`` distinct random bf16
  ``[rows, k]`` activations and ``[k, n]`` weights, and one weight's bytes."""
  keys = jax.random.split(jax.random.key(0), 2 * args.layers)
  ws = [jax.random.normal(key, (k, n), jnp.bfloat16) * 0.02 for key in keys[: args.layers]]
  xs = [jax.random.normal(key, (rows, k), jnp.bfloat16) for key in keys[args.layers :]]
  f = jax.jit(fn)
  jax.block_until_ready(f(xs, ws))
  return device_time(lambda: f(xs, ws), runs=args.repeats, per_run=args.layers), 2 * k * n


def define_flags():
  flags.DEFINE_string("out", None, "output directory", required=True)
  flags.DEFINE_list("models", ["llama-1b", "smollm2-135m"], "engine_step.MODELS names")
  flags.DEFINE_list("rows", ["64", "256"], "rows of the activations")
  flags.DEFINE_list("splits", ["1", "2", "4", "8"], "parts of the reduction axis (1: dot)")
  flags.DEFINE_integer("layers", 16, "products (distinct weights) per run")
  flags.DEFINE_integer("repeats", 15, "runs traced")
  flags.DEFINE_string("label", "", "what this process is (e.g. cublas), kept in each row")
  flags.DEFINE_string("commit", "unknown", "commit measured")
  flags.DEFINE_bool(
    "swiglu", False, "time SwiGLU's front (gate/up and the activation) by SWIGLU_FRONTS instead"
  )


def main(args) -> int:
  os.makedirs(args.out, exist_ok=True)
  rate = read_rate(4.0)
  info = env_info()
  rows_out = []
  for name in args.models:
    for product, (k, n) in weight_shapes(name).items():
      if args.swiglu and product != "gate_up":
        continue
      for rows in map(int, args.rows):
        for split in SWIGLU_FRONTS if args.swiglu else map(int, args.splits):
          if args.swiglu:
            fn = functools.partial(swiglu_fronts, front=split)
          elif k % split:
            continue
          else:
            fn = functools.partial(products, split=split)
          t, nbytes = measure(k, n, rows, fn, args)
          rows_out.append(
            dict(
              device=info["device"],
              jax=info["jax_version"],
              model=name,
              product=f"swiglu_{split}" if args.swiglu else product,
              k=k,
              n=n,
              rows=rows,
              split=1 if args.swiglu else split,
              us=t.median * 1e6,
              us_min=t.min * 1e6,
              us_max=t.max * 1e6,
              weight_mb=nbytes / 1e6,
              share_of_read=nbytes / t.median / rate,
              read_tbs=rate / 1e12,
              xla_flags=os.environ.get("XLA_FLAGS", ""),
              label=args.label,
              commit=commit_of(args.commit),
              date=info["date"],
            )
          )
          print(json.dumps(rows_out[-1]), flush=True)
  write_jsonl(os.path.join(args.out, "gemm_rows.jsonl"), rows_out)
  print(f"\nread rate {rate / 1e12:.2f} TB/s; us per product, median (min-max), share of read")
  print("| model | product | K x N | rows | split | us | share |")
  print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
  for r in rows_out:
    print(
      f"| {r['model']} | {r['product']} | {r['k']} x {r['n']} | {r['rows']} | {r['split']} | "
      f"{r['us']:.2f} ({r['us_min']:.2f}-{r['us_max']:.2f}) | {r['share_of_read']:.1%} |"
    )
  return 0


if __name__ == "__main__":
  _flags.run(define_flags, main)
