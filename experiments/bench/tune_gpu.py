"""Tunes the GPU kernels' defaults on the card it runs on and writes that card's tuning table.

Issue 15, item 4. One process, one GPU: the HBM read ceiling (as ``gpu_decode`` measures
it), then for each shape class (``kernels.gpu.tuning_table.shape_class``) a small grid of
settings of that class's fields timed at the class's shapes, the rule's setting
(``kernels.gpu.tuning.rule_block_sizes``) first. Every setting's output is checked against
the rule's (relative L2 under the bf16 bound of ``gpu_kernel_vs_reference_rel_l2``); one
that fails to compile or to agree counts as failed. Then ``tuning_table.select`` (the rule
that derived the committed H100 / H200 tables) picks each class's entry, and the table
goes to ``OUT/<card>.json`` in the format ``kernels/gpu/tuning_tables/`` holds::

  python -m experiments.bench.tune_gpu --out /tmp/tune
  python -m experiments.bench.tune_gpu --classes decode/w128/i1/large --out /tmp/tune8
  python -m experiments.bench.tune_gpu --smoke --out /tmp/tune_smoke

To keep a card's results, append ``OUT/tune_gpu.jsonl`` to
``docs/results/tune_gpu.jsonl`` and run ``python -m kernels.gpu.tuning_tables.derive``,
which writes the card's table into ``kernels/gpu/tuning_tables/`` from the committed rows
(the same choices as ``OUT/<card>.json``; docs/gpu_notes.md, "Defaults per card"). To try
a table first, ``OUT/<card>.json`` is already in the format the loader takes.

Classes and shapes (``CLASSES``; 32 query / 8 KV heads, block 16, blocks scattered, every
sequence full length; decode ``batch x context``, prefill ``sequences x tokens`` causal):
decode at tile widths 128 and 64, small (8 x 4096: 64 sequence x KV-head pairs) and large
(64 x 8192 at width 128, 256 x 1024 at width 64) batches; the Triton prefill and, on
Hopper, the Mosaic GPU prefill at 4 x 2048; ``decode/w128/i1/large`` (int8 K/V) only when
``--classes`` (a comma-separated list that replaces the default one) names it. Grids:
``DECODE_GRID`` (K/V step 32/64/128 tokens x 4/8 warps x 2/3 stages; splits stay chosen
per shape: a fixed count would apply to every batch of the class), ``PREFILL_GRID``,
``MOSAIC_GRID``.

Device time: each timed function is one jit running ``--calls`` kernel calls on distinct
queries, dispatched 3 times back to back per sample, ``--repeats`` samples
(``experiments._timing.time_calls``); the rate is K/V bytes (decode, TB/s) or causal
FLOPs (prefill, TFLOP/s) per median call, with the interval of the median as its range.
``--budget-s`` (default 180 s) is shared out over the classes: a class starts no new
setting once its share is spent (the rule's is always timed). With the defaults it
finished in 70 s on one H200 (its first GPU run, c94328d; docs/results/tune_gpu.jsonl). Rows go
to ``OUT/tune_gpu.jsonl`` as each setting finishes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments._timing import time_calls
from experiments.bench import _flags
from experiments.bench._gpu_common import env_info, make_paged, write_jsonl
from kernels import gpu
from kernels.gpu import tuning, tuning_table
from kernels.testing import rel_l2_error, tolerance

HQ, HKV, BLOCK = 32, 8, 16
INTERPRET = False  # --smoke: tiny shapes in interpret mode on CPU
INNER = 3  # timed jit dispatches per sample (--smoke: 1)
# class -> shapes: decode (batch, context), prefill (sequences, tokens each).
CLASSES = {
  "decode/w128/i2/small": [(8, 4096)],
  "decode/w128/i2/large": [(64, 8192)],
  "decode/w64/i2/small": [(8, 4096)],
  "decode/w64/i2/large": [(256, 1024)],
  "prefill/w128/i2": [(4, 2048)],
  "mosaic/w128/i2": [(4, 2048)],
}
OPTIONAL_CLASSES = {"decode/w128/i1/large": [(64, 8192)]}
DEFAULT_CLASSES = tuple(CLASSES)
SMOKE_CLASSES = {"decode/w64/i2/small": [(2, 40)], "prefill/w64/i2": [(2, 24)]}
DECODE_GRID = tuple(
  dict(decode_kv_tile=t, decode_num_splits=None, decode_num_warps=w, decode_num_stages=s)
  for t in (32, 64, 128)
  for w in (4, 8)
  for s in (2, 3)
)
PREFILL_GRID = tuple(
  dict(
    prefill_q_tile=q,
    prefill_kv_tile=kv,
    prefill_heads_per_program=None,
    prefill_num_warps=w,
    prefill_num_stages=s,
  )
  for q, kv, w, s in [
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 32, 4, 3),
    (64, 64, 4, 3),
    (128, 128, 8, 2),
    (64, 32, 4, 2),
  ]
)
MOSAIC_GRID = tuple(
  dict(mosaic_kv_tile=t, mosaic_num_slots=n) for t, n in [(128, 2), (64, 2), (64, 3), (64, 4)]
)
GRIDS = {"decode": DECODE_GRID, "prefill": PREFILL_GRID, "mosaic": MOSAIC_GRID}
DTYPES = {1: jnp.int8, 2: jnp.bfloat16}


def settings(cls: str, grid_limit: int | None = None) -> list[dict]:
  """The rule's setting for ``cls`` first, then the grid's others (at most ``grid_limit``)."""
  kind = tuning_table.parse_class(cls)[0]
  rule = tuning_table.rule_fields(cls)
  others = [g for g in GRIDS[kind] if g != rule]
  return [rule, *others[:grid_limit]]


def make_inputs(cls, shape, calls, seed=0):
  """(args of one call minus q, list of ``calls`` q arrays, rate denominator, shape text)."""
  kind, width, itemsize, _ = tuning_table.parse_class(cls)
  dtype = DTYPES[itemsize]
  rng = np.random.default_rng(seed)
  n_seq, length = shape
  kb, vb, table, lengths, _, _ = make_paged(
    rng,
    batch=n_seq,
    context=length,
    block_size=BLOCK,
    num_kv_heads=HKV,
    head_dim=width,
    dtype=jnp.bfloat16,
    poison=False,
  )
  extra = {}
  if itemsize == 1:  # 8-bit K/V: integer values, scale 1 per token (the decode reads both)
    kb = jnp.clip(jnp.round(kb.astype(jnp.float32) * 32), -127, 127).astype(dtype)
    vb = jnp.clip(jnp.round(vb.astype(jnp.float32) * 32), -127, 127).astype(dtype)
    scales = jnp.full(kb.shape[:3], 1 / 32, jnp.float32)
    extra = dict(k_scales=scales, v_scales=scales)
  keys = jax.random.split(jax.random.key(seed + 1), calls)
  if kind == "decode":
    rows = n_seq
    nbytes = n_seq * length * 2 * HKV * width * itemsize
    denom = nbytes / 1e12  # TB per call
    cu = None
    text = f"{n_seq}x{length} block {BLOCK} heads {HQ}/{HKV} d{width} {jnp.dtype(dtype).name}"
  else:
    rows = n_seq * length
    pairs = n_seq * length * (length + 1) // 2
    denom = 4 * width * HQ * pairs / 1e12  # TFLOP per call
    cu = jnp.arange(n_seq + 1, dtype=jnp.int32) * length
    text = f"{n_seq}x{length} causal block {BLOCK} heads {HQ}/{HKV} d{width}"
  qs = [jax.random.normal(k, (rows, HQ, width), jnp.float32).astype(jnp.bfloat16) for k in keys]
  return (kb, vb, table, lengths, cu, extra), qs, denom, text


def block_sizes_for(cls, shape, fields) -> gpu.BlockSizes:
  """The rule's BlockSizes for the call with ``fields`` laid over (prefill pins its kernel)."""
  kind, width, itemsize, _ = tuning_table.parse_class(cls)
  n_seq, length = shape
  base = tuning.rule_block_sizes(
    head_dim=width,
    kv_dtype=DTYPES[itemsize],
    num_tokens=None if kind == "decode" else n_seq * length,
    decode=kind == "decode",
    batch=n_seq,
    num_kv_heads=HKV,
  )
  pin = {} if kind == "decode" else {"prefill_kernel": "triton" if kind == "prefill" else "mosaic"}
  return dataclasses.replace(base, **fields, **pin)


def many_calls(bs):
  """One jit running one kernel call per q array: device time per jit, not dispatch."""
  fn = functools.partial(gpu.paged_attention, block_sizes=bs, interpret=INTERPRET)

  def run(qs, kb, vb, table, lengths, cu, extra):
    return [fn(q, kb, vb, table, lengths, cu, **extra) for q in qs]

  return jax.jit(run)


def measure(cls, shape, fields, inputs, qs, denom, want, args):
  """Times one setting; returns (row fields, output of the first call)."""
  bs = block_sizes_for(cls, shape, fields)
  fn = many_calls(bs)
  call_args = (qs, *inputs)
  outs = jax.block_until_ready(fn(*call_args))
  err = None if want is None else float(rel_l2_error(outs[0], want))
  bound = tolerance("gpu_kernel_vs_reference_rel_l2", jnp.bfloat16).rtol
  if err is not None and not err < bound:
    return dict(error=f"output differs from the rule's: rel L2 {err:.3g}", check_rel_l2=err), None
  t = time_calls(lambda: fn(*call_args), repeats=args.repeats, inner=INNER, warmup=2)
  t = t.map(lambda s: s / len(qs))
  lo_t, hi_t = t.interval
  row = dict(
    rate=denom / t.median,
    rate_lo=denom / hi_t,
    rate_hi=denom / lo_t,
    **t.fields("time", digits=5),
    check_rel_l2=err,
  )
  return row, outs[0]


def run_class(cls, shapes, args, env, deadline, out_path):
  """Times every setting of ``cls`` at its shapes; returns (measurements, rows)."""
  kind = tuning_table.parse_class(cls)[0]
  meas, rows = [], []
  grid = settings(cls, 1 if args.smoke else None)
  for shape in shapes:
    inputs, qs, denom, text = make_inputs(cls, shape, args.calls)
    want = None
    for i, fields in enumerate(grid):
      if i > 0 and time.time() > deadline:
        print(f"{cls}: budget spent, {len(grid) - i} settings not timed at {text}", flush=True)
        break
      base = dict(
        **env,
        commit=args.commit,
        run_id=args.run_id,
        ceiling_tbs=args.ceiling,
        shape_class=cls,
        shape=text,
        is_rule=i == 0,
        block_sizes=fields,
        unit="TB/s" if kind == "decode" else "TFLOP/s",
        interpret=INTERPRET,
      )
      try:
        row, out = measure(cls, shape, fields, inputs, qs, denom, want, args)
      except Exception as e:  # noqa: BLE001 - a setting the kernel refuses is a result
        if i == 0:
          traceback.print_exc()
        row, out = dict(error=f"{type(e).__name__}: {str(e)[:300]}"), None
      if i == 0 and out is None:
        print(f"{cls}: the rule's setting failed at {text}; class skipped", flush=True)
        write_jsonl(out_path, [{**base, **row}])
        return meas, rows + [{**base, **row}]
      if i == 0:
        want = out
      r = {**base, **row}
      write_jsonl(out_path, [r])
      rows.append(r)
      m = tuning_table.Measurement(text, fields, r.get("rate"), r.get("rate_lo"), r.get("rate_hi"))
      meas.append(m)
      rate = "failed" if m.rate is None else f"{m.rate:.4g} ({m.lo:.4g}-{m.hi:.4g})"
      print(f"{cls} {text} {fields}: {rate} {base['unit']}", flush=True)
    del inputs, qs, want
  return meas, rows


def define_flags():
  flags.DEFINE_string("out", os.environ.get("OUT", "/tmp/tune_gpu"), "output folder")
  flags.DEFINE_list(
    "classes",
    list(DEFAULT_CLASSES),
    f"shape classes to tune, of {', '.join([*CLASSES, *OPTIONAL_CLASSES])}",
  )
  flags.DEFINE_integer("calls", 8, "kernel calls per timed jit", lower_bound=1)
  flags.DEFINE_integer("repeats", 21, "timing samples per setting", lower_bound=5)
  flags.DEFINE_float("budget-s", 180.0, "seconds shared out over the classes' sweeps")
  flags.DEFINE_string("commit", os.environ.get("PAXCACHE_COMMIT", "unknown"), "recorded commit")
  flags.DEFINE_bool("smoke", False, "tiny shapes, two settings per class, interpret mode (CPU)")


def main(args):
  global HQ, HKV, INTERPRET, INNER
  from experiments.bench.gpu_ragged import commit_of

  known = {**CLASSES, **OPTIONAL_CLASSES}
  if args.smoke:
    HQ, HKV, INTERPRET, INNER = 4, 2, True, 1
    args.calls, args.repeats = min(args.calls, 2), 5
    known = SMOKE_CLASSES
    if args.classes == list(DEFAULT_CLASSES):  # no --classes given: every smoke class
      args.classes = list(known)
  unknown = [c for c in args.classes if c not in known]
  if unknown:
    raise SystemExit(f"unknown classes {unknown}; classes: {', '.join(known)}")
  classes = list(args.classes)
  if "mosaic/w128/i2" in classes and not gpu.is_hopper():
    print("mosaic/w128/i2 skipped: the Mosaic GPU prefill runs on Hopper only", flush=True)
    classes.remove("mosaic/w128/i2")
  args.commit = commit_of(args.commit)
  args.run_id = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # one process's rows
  os.makedirs(args.out, exist_ok=True)
  env = env_info()
  print(env, flush=True)
  from experiments.bench.gpu_decode import hbm_read_ceiling

  ceiling = hbm_read_ceiling(1 << 16 if args.smoke else 1 << 30)
  args.ceiling = ceiling["ceiling_tbps"]
  print("ceiling", ceiling, flush=True)
  out_path = os.path.join(args.out, "tune_gpu.jsonl")
  write_jsonl(
    out_path, [dict(**env, commit=args.commit, run_id=args.run_id, ceiling=True, **ceiling)]
  )
  start, entries, rows = time.time(), [], []
  for n, cls in enumerate(classes):
    share = (args.budget_s - (time.time() - start)) / (len(classes) - n)
    meas, class_rows = run_class(cls, known[cls], args, env, time.time() + share, out_path)
    rows += class_rows
    sel = tuning_table.select(meas, tuning_table.rule_fields(cls))
    if sel is None or sel["candidates"] < 2:
      print(f"{cls}: no entry (the rule's setting or every other failed)", flush=True)
      continue
    source = dict(
      files={"tune_gpu.jsonl": {"date": env["date"], "commit": args.commit}},
      rate_unit=class_rows[0]["unit"],
      ceiling_tbs=round(args.ceiling, 4),
      derived_by="experiments/bench/tune_gpu.py",
    )
    entries.append(tuning_table.make_entry(cls, sel, source))
  note = (
    f"Written by python -m experiments.bench.tune_gpu on {env['device']} ({env['date']}, "
    f"commit {args.commit}, jax {env['jax_version']}); the rows are tune_gpu.jsonl beside it."
  )
  path = os.path.join(args.out, tuning_table.table_slug(env["device"]) + ".json")
  if entries:
    with open(path, "w", encoding="utf-8") as f:
      f.write(tuning_table.dump_table(env["device"], entries, note))

  print(f"\nceiling {args.ceiling:.2f} TB/s; {env}; {time.time() - start:.0f} s of sweeps")
  print("| class | shape | setting | rate (interval) | % ceiling |")
  print("| --- | --- | --- | ---: | ---: |")
  for r in rows:
    if r.get("rate") is None:
      rate, pct = "failed: " + r.get("error", "")[:60], ""
    else:
      rate = f"{r['rate']:.4g} ({r['rate_lo']:.4g}-{r['rate_hi']:.4g}) {r['unit']}"
      pct = f"{100 * r['rate'] / args.ceiling:.1f}" if r["unit"] == "TB/s" else ""
    rule = " (rule)" if r["is_rule"] else ""
    print(f"| {r['shape_class']} | {r['shape']} | {r['block_sizes']}{rule} | {rate} | {pct} |")
  print()
  for e in entries:
    s = e["source"]
    print(
      f"{e['class']}: {e['choice']} {e['block_sizes']} (x{s['speedup_over_rule']} over the "
      f"rule; best other x{(s['best_other'] or {}).get('speedup')})"
    )
  print(f"table: {path if entries else 'none (no class had an entry)'}; rows: {out_path}")
  return 0


if __name__ == "__main__":
  _flags.run(define_flags, main)
