"""Derives the H100 and H200 tuning tables from the measured rows committed in docs/results.

  python -m kernels.gpu.tuning_tables.derive           # rewrite the tables
  python -m kernels.gpu.tuning_tables.derive --check   # exit 1 if a table differs

Run from the repository root (or pass ``--root``). Deterministic: it reads only the files
below, groups their rows by (card, shape class) and applies ``tuning_table.select`` (the
same rule ``experiments/bench/tune_gpu.py`` applies to a new card's sweep) against
today's ``rule_block_sizes``. A class gets an entry only where the rule's setting and at
least one other were timed at the same shapes in the same process.

Sources, and how their rows are read:

Rates are TB/s (decode) and TFLOP/s (prefill) as the rows give them; their range is the
min-max of a run's repeated passes (H100 runs 2-4), or the row's own interval of the
median, ``time_ci_lo_ms`` / ``time_ci_hi_ms`` (kv_quant_sweep). Run 1, run 5 and the
engine probe timed each setting once with no spread recorded, so no setting of theirs can
replace the rule (``select``).

* ``docs/results/gpu_raw/run{1..5}/raw.jsonl`` (H100 80GB HBM3, 2026-11-25; runs of
  docs/gpu_notes.md, made by the benchmark of commits db582ef, 393c9f4, ea413ce, 49d8eef
  and 185e9f6). Decode rows ``impl`` "ours" / "ours_sweep"; prefill rows "ours_prefill".
  Runs 1-3 record a setting as the fields that differ from that commit's defaults (or
  "default"), which ``RUN_BASE`` fills in (from ``kernels/gpu/tuning.py`` at each commit).
  Run 1's prefill rows are left out: its prefill kernel took one query head per program,
  changed at 393c9f4, so they time another kernel. Each run is its own set of shapes
  (settings are compared within one process only).
* ``docs/results/gpu_decode.jsonl``: run 4's summary rows, the same timings as run 4's raw
  rows: not read again.
* ``docs/results/engine_probe.jsonl`` "attn" rows (H200, 2026-12-02, commit 30c8381;
  head_dim 64, bf16, block 16 as ``experiments/bench/probe_step.py`` fixes them; ``cfg``
  overrides that commit's default, 128-token steps, 8 warps, 3 stages, splits by shape).
  Context-512 rows are left out: one call there is shorter than its dispatch, so they time
  the host (the script's docstring and docs/gpu_notes.md run 7 say so).
* ``docs/results/kv_quant_sweep.jsonl`` (H200, commits 93e3c3e and 3da8655): 8-bit K/V
  decode at 64 x 8192, settings built as ``BlockSizes(decode_kv_tile, decode_num_warps,
  decode_num_stages)``, splits left to the shape; each row's widening (``widen_kind``, as
  resolved when it ran; "cast" before it was recorded) is part of its shape, so rows of
  different widenings are never compared.
* ``docs/results/gpu_decode_ragged.jsonl`` (H200): its two variants are two kernels
  (split-K and planned), not two settings of one, so it tunes nothing here.
* ``docs/results/tune_gpu.jsonl``, where it exists: rows of
  ``experiments/bench/tune_gpu.py`` (any card), read as that script wrote them; each
  run (``run_id``) is its own set of shapes. Committing a run's rows there and re-running
  this script is how a card's measured table enters the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp

from kernels.gpu import tuning_table
from kernels.gpu.tuning import padded_head_dim

H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"
DECODE_BASE_OLD = dict(
  decode_kv_tile=64, decode_num_splits=None, decode_num_warps=4, decode_num_stages=3
)
PREFILL_BASE = dict(
  prefill_q_tile=128, prefill_kv_tile=64, prefill_heads_per_program=None, prefill_num_stages=3
)
# The defaults at bf16 head_dim 128 of the commit whose benchmark made each H100 run.
RUN_BASE = {
  1: ("db582ef", {**DECODE_BASE_OLD, **PREFILL_BASE, "prefill_num_warps": 8}),
  2: ("393c9f4", {**DECODE_BASE_OLD, **PREFILL_BASE, "prefill_num_warps": 8}),
  3: ("ea413ce", {**DECODE_BASE_OLD, **PREFILL_BASE, "prefill_num_warps": 4}),
  4: ("49d8eef", {**DECODE_BASE_OLD, **PREFILL_BASE, "prefill_num_warps": 4}),
  5: ("185e9f6", {**DECODE_BASE_OLD, **PREFILL_BASE, "prefill_num_warps": 4}),
}
PROBE_COMMIT_DEFAULT = dict(
  decode_kv_tile=128, decode_num_splits=None, decode_num_warps=8, decode_num_stages=3
)
PROBE_HEAD_DIM = 64
PROBE_MIN_CONTEXT = 1024
MOSAIC_BASE = dict(mosaic_kv_tile=128, mosaic_num_slots=2)
TUNE_ROWS = "docs/results/tune_gpu.jsonl"
NOTE = (
  "Derived by python -m kernels.gpu.tuning_tables.derive from the committed rows named in "
  "each entry's source (kernels/gpu/tuning_tables/derive.py says how each file is read); "
  "classes without an entry keep kernels.gpu.tuning.rule_block_sizes."
)


def _rows(root, rel):
  with open(os.path.join(root, rel), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _pick(fields, kind):
  return {k: fields[k] for k in tuning_table.KIND_FIELDS[kind]}


def _cls(kind, head_dim, kv_dtype, pairs=None):
  return tuning_table.shape_class(
    kind,
    width=padded_head_dim(head_dim),
    itemsize=jnp.dtype(kv_dtype).itemsize,
    pairs=pairs,
  )


def gather(root):
  """``{(device_kind, class): ([Measurement], {file: {"date":..., "commit":...}})}``."""
  groups = {}

  def add(device, cls, shape, fields, rate, rel, date, commit, lo=None, hi=None):
    meas, files = groups.setdefault((device, cls), ([], {}))
    meas.append(tuning_table.Measurement(shape, fields, rate, lo, hi))
    seen = files.setdefault(rel, {"date": date, "commit": commit})
    # Rows of one file from several runs: every run's commit (and date) is named.
    if commit not in seen["commit"].split(", "):
      seen["commit"] += f", {commit}"
      if date not in seen["date"].split(", "):
        seen["date"] += f", {date}"

  for run, (commit, base) in sorted(RUN_BASE.items()):
    rel = f"docs/results/gpu_raw/run{run}/raw.jsonl"
    for r in _rows(root, rel):
      if r.get("impl") not in ("ours", "ours_sweep", "ours_prefill"):
        continue
      cfg = r.get("config")
      fields = {**base, **({} if cfg in (None, "default") else cfg)}
      shape = (
        f"run{run} {r['batch']}x{r['context']} block {r['block_size']} "
        f"heads {r['num_q_heads']}/{r['num_kv_heads']}"
      )
      rate = None if r.get("error") else r.get("tbps", r.get("tflops"))
      args = (rel, r["date"], commit)
      if r["kind"] == "decode":
        pairs = r["batch"] * r["num_kv_heads"]
        cls = _cls("decode", r["head_dim"], r["dtype"], pairs)
        add(r["device"], cls, shape, _pick(fields, "decode"), rate, *args)
      elif run >= 2:  # run 1 timed the prefill kernel before heads shared a program
        kernel = r.get("kernel", "triton")
        kind = "mosaic" if kernel == "mosaic" else "prefill"
        cls = _cls(kind, r["head_dim"], r["dtype"])
        fields = {**MOSAIC_BASE, **fields}
        add(r["device"], cls, f"{shape} causal", _pick(fields, kind), rate, *args)

  rel = "docs/results/engine_probe.jsonl"
  for r in _rows(root, rel):
    if r.get("part") != "attn" or r["context"] < PROBE_MIN_CONTEXT:
      continue
    hq, hkv = (int(x) for x in r["heads"].split("/"))
    fields = {**PROBE_COMMIT_DEFAULT, **r["cfg"]}
    rate = None if r.get("error") else r["tbs"]
    shape = f"{r['batch']}x{r['context']} block 16 heads {hq}/{hkv}"
    cls = _cls("decode", PROBE_HEAD_DIM, jnp.bfloat16, r["batch"] * hkv)
    add(r["device"], cls, shape, _pick(fields, "decode"), rate, rel, r["date"], r["commit"])

  rel = "docs/results/kv_quant_sweep.jsonl"
  for r in _rows(root, rel):
    fields = dict(
      decode_kv_tile=r["kv_tile"],
      decode_num_splits=None,
      decode_num_warps=r["num_warps"],
      decode_num_stages=r["num_stages"],
    )
    # The widening the row's kernel ran, as recorded when it ran (rows from before it was
    # recorded ran the astype to bf16, "cast"; "auto" is not resolved here, since what it
    # picks changes): rows of different widenings are different kernels, never compared.
    kind = r.get("widen_kind", "cast")
    shape = (
      f"{r['batch']}x{r['context']} block {r['block_size']} heads "
      f"{r['num_q_heads']}/{r['num_kv_heads']} {r['kv_dtype']} widen {kind}"
    )
    cls = _cls("decode", r["head_dim"], r["kv_dtype"], r["batch"] * r["num_kv_heads"])
    # The rate's interval from the time's interval of the median (experiments._timing).
    lo = r["tbps"] * r["time_ms"] / r["time_ci_hi_ms"]
    hi = r["tbps"] * r["time_ms"] / r["time_ci_lo_ms"]
    add(r["device"], cls, shape, fields, r["tbps"], rel, r["date"], r["commit"], lo, hi)

  if os.path.exists(os.path.join(root, TUNE_ROWS)):
    for r in _rows(root, TUNE_ROWS):
      if "shape_class" not in r:  # the ceiling's row
        continue
      rate = None if r.get("error") else r["rate"]
      shape = f"{r['shape']} run {r['run_id']}"
      lo, hi = r.get("rate_lo"), r.get("rate_hi")
      args = (TUNE_ROWS, r["date"], r["commit"], lo, hi)
      add(r["device"], r["shape_class"], shape, r["block_sizes"], rate, *args)
  return groups


def derive(root):
  """``{device_kind: table JSON text}`` from the committed rows under ``root``."""
  entries = {}
  for (device, cls), (meas, files) in sorted(gather(root).items()):
    sel = tuning_table.select(meas, tuning_table.rule_fields(cls))
    if sel is None or sel["candidates"] < 2:
      continue
    unit = "TFLOP/s" if cls.startswith(("prefill", "mosaic")) else "TB/s"
    source = {
      "files": files,
      "rate_unit": unit,
      "derived_by": "kernels/gpu/tuning_tables/derive.py",
    }
    entries.setdefault(device, []).append(tuning_table.make_entry(cls, sel, source))
  return {d: tuning_table.dump_table(d, e, NOTE) for d, e in entries.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", default=".", help="repository root")
  p.add_argument("--check", action="store_true", help="compare, do not write")
  p.add_argument(
    "--out-dir", default=None, help="where to write (default: kernels/gpu/tuning_tables)"
  )
  args = p.parse_args(argv)
  out_dir = args.out_dir or os.path.join(args.root, "kernels", "gpu", "tuning_tables")
  differ = []
  for device, text in derive(args.root).items():
    path = os.path.join(out_dir, tuning_table.table_slug(device) + ".json")
    if args.check:
      old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
      if old != text:
        differ.append(path)
    else:
      with open(path, "w", encoding="utf-8") as f:
        f.write(text)
      print(f"wrote {path}")
  if differ:
    print("differs from the committed rows' derivation: " + ", ".join(differ))
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
