"""Chooses and fits the step-cost model of the request-rate experiment's simulated clock.

Reads measured engine steps (JSON lines, default ``docs/results/engine_steps.jsonl``: every
step of the H200 runs of docs/benchmarks.md) and, for each (model, block size) slice:

1. splits the steps once, as the experiment does (:func:`paxcache.engine._cost.
   split_records`: a seeded random 20% held out, seed 0);
2. scores every form (``linear``, ``bucketed``) and loss (``absolute``, ``relative``) of
   :mod:`paxcache.engine._cost` by 5-fold cross-validation **on the training part only**
   (median relative error on each fold's left-out steps, averaged over the folds);
3. picks the form and loss with the lowest cross-validated error on the ``--select`` slice
   (the one ``configs/request_rate.py:gpu_sim`` uses), and fits it to each slice's whole
   training part;
4. reports each candidate's median relative error on the held-out steps, which played no
   part in the choice.

Writes the table and ``--out`` (JSON: the split, the cross-validated and held-out errors,
the choice and each slice's fitted coefficients)::

  PYTHONPATH=. python -m experiments.step_cost_fit \\
      --out docs/results/request_rate/step_cost_fit.json
"""

from __future__ import annotations

import json
import sys

import numpy as np

from experiments.bench import _flags
from paxcache.engine._cost import (
  FORMS,
  LOSSES,
  fit_model,
  load_step_records,
  median_rel_error,
  split_records,
)

HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0  # configs/request_rate.py's seed: the split fit_step_cost makes there
CV_FOLDS = 5
CV_SEED = 1


def cross_validate(train: list[dict], form: str, loss: str) -> float:
  """Mean over ``CV_FOLDS`` folds of the training steps of the median relative error on
  the fold's steps of the model fitted to the other folds."""
  folds = np.array_split(np.random.default_rng(CV_SEED).permutation(len(train)), CV_FOLDS)
  errors = []
  for fold in folds:
    left_out = set(fold.tolist())
    fit_on = [r for i, r in enumerate(train) if i not in left_out]
    model = fit_model(fit_on, form=form, loss=loss)
    errors.append(median_rel_error(model, [train[i] for i in fold]))
  return float(np.mean(errors))


def evaluate(records: list[dict], select: tuple[str, int]) -> dict:
  slices = sorted({(r["model"], int(r["block_size"])) for r in records})
  if select not in slices:
    raise ValueError(f"--select={select} is not a (model, block size) of the records: {slices}")
  out = []
  for model, bs in slices:
    steps = [r for r in records if (r["model"], int(r["block_size"])) == (model, bs)]
    train, heldout = split_records(steps, HELDOUT_FRACTION, SPLIT_SEED)
    cv, held, fitted = {}, {}, {}
    for form in FORMS:
      for loss in LOSSES:
        key = f"{form}/{loss}"
        cv[key] = cross_validate(train, form, loss)
        m = fit_model(train, form=form, loss=loss)
        held[key] = median_rel_error(m, heldout)
        fitted[key] = m.as_dict()
    out.append(
      dict(
        model=model,
        block_size=bs,
        steps=len(steps),
        train=len(train),
        heldout=len(heldout),
        cv_error=cv,
        heldout_error=held,
        fitted=fitted,
      )
    )
  sel = next(s for s in out if (s["model"], s["block_size"]) == select)
  chosen = min(sel["cv_error"], key=sel["cv_error"].get)
  return dict(
    split=dict(
      heldout_fraction=HELDOUT_FRACTION,
      seed=SPLIT_SEED,
      how="paxcache.engine._cost.split_records: a seeded random permutation per slice",
    ),
    cross_validation=dict(folds=CV_FOLDS, seed=CV_SEED, on="the training part only"),
    select=dict(model=select[0], block_size=select[1]),
    chosen=chosen,
    slices=out,
  )


def define_flags():
  from absl import flags

  flags.DEFINE_string("records", "docs/results/engine_steps.jsonl", "measured steps (JSON lines)")
  flags.DEFINE_string("select", "smollm2-135m:16", "MODEL:BLOCK_SIZE slice the choice is made on")
  flags.DEFINE_string("out", "", "write the JSON report here")


def main(args) -> int:
  records = load_step_records(args.records)
  model, _, bs = args.select.rpartition(":")
  if not model or not bs.isdigit():
    raise ValueError(f"--select={args.select!r}: expected MODEL:BLOCK_SIZE")
  report = dict(records=args.records, **evaluate(records, (model, int(bs))))
  keys = [f"{f}/{lo}" for f in FORMS for lo in LOSSES]
  print(f"median relative error; chosen by {CV_FOLDS}-fold CV on {args.select}: {report['chosen']}")
  print("| model | block | " + " | ".join(f"{k} CV / held-out" for k in keys) + " |")
  print("| --- | ---: |" + " ---: |" * len(keys))
  for s in report["slices"]:
    cells = [f"{100 * s['cv_error'][k]:.1f}% / {100 * s['heldout_error'][k]:.1f}%" for k in keys]
    print(f"| {s['model']} | {s['block_size']} | " + " | ".join(cells) + " |")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
      f.write("\n")
  return 0


if __name__ == "__main__":
  sys.exit(_flags.run(define_flags, main))
