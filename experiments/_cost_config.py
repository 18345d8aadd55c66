"""The step-cost model a config picks: one helper for every experiment that charges steps.

A config names a preset of :mod:`paxcache.engine._cost` in ``cost_model`` (``cpu_default``:
1 ms per computed token, a stated assumption; ``opt13b_a100_roofline``: a roofline
estimate), or fits one to measured steps: ``step_records`` (JSON lines ``{prefill_tokens,
decode_batch, kv_tokens, step_ms}``, e.g. ``docs/results/engine_steps.jsonl``), filtered by
``step_records_where`` (``key=value[,key=value]``), with ``heldout_fraction`` of them held
out to report the fit's error and ``swap_ms`` (not fitted) per swapped token;
``cost_form`` (``"linear"``, the default, or ``"bucketed"``: a fixed cost per padded batch)
and ``cost_loss`` (``"absolute"``, the default, or ``"relative"``) pick what is fitted
(:mod:`paxcache.engine._cost`; ``experiments/step_cost_fit.py`` chooses them by
cross-validation on the training steps).

The request-rate experiment's simulated clock and the serving simulation of the
batch-capacity experiment both take their model from :func:`step_cost`.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from paxcache.engine._cost import (
  FORMS,
  LOSSES,
  PRESETS,
  StepCostModel,
  fit_step_cost,
  load_step_records,
)


def check_cost_config(config: ConfigDict) -> None:
  """Raises ``ValueError`` naming the first cost-model field no run can use."""
  if config.get("cost_form", "linear") not in FORMS:
    raise ValueError(f"--config.cost_form={config.get('cost_form')!r}: one of {FORMS}")
  if config.get("cost_loss", "absolute") not in LOSSES:
    raise ValueError(f"--config.cost_loss={config.get('cost_loss')!r}: one of {LOSSES}")
  if not config.get("step_records", ""):
    if config.get("cost_model") not in PRESETS:
      raise ValueError(
        f"--config.cost_model={config.get('cost_model')!r}: one of {sorted(PRESETS)}"
      )
    return
  frac = config.get("heldout_fraction", 0.2)
  if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 < frac < 1:
    raise ValueError(f"--config.heldout_fraction={frac!r} must be in (0, 1)")
  swap = config.get("swap_ms", 0.0)
  if isinstance(swap, bool) or not isinstance(swap, int | float) or not swap >= 0:
    raise ValueError(f"--config.swap_ms={swap!r} must be a number >= 0")


def records_where(records: list[dict], where: str) -> list[dict]:
  """The records whose fields match every ``key=value`` of ``where`` (comma separated;
  values compared as text, so ``block_size=16`` matches 16)."""
  if not where:
    return records
  conds = []
  for part in where.split(","):
    key, sep, value = part.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"--config.step_records_where={where!r}: expected key=value[,key=value]")
    conds.append((key.strip(), value.strip()))
  kept = [r for r in records if all(str(r.get(k)) == v for k, v in conds)]
  if not kept:
    raise ValueError(f"--config.step_records_where={where!r} keeps none of the step records")
  return kept


def step_cost(config: ConfigDict) -> tuple[StepCostModel, dict | None]:
  """The config's step-cost model and, when fitted, its fit report as a dict."""
  check_cost_config(config)
  if not config.get("step_records", ""):
    return PRESETS[config.cost_model], None
  where = config.get("step_records_where", "")
  report = fit_step_cost(
    records_where(load_step_records(config.step_records), where),
    heldout_fraction=config.get("heldout_fraction", 0.2),
    seed=config.get("seed", 0),
    swap_ms=config.get("swap_ms", 0.0),
    form=config.get("cost_form", "linear"),
    loss=config.get("cost_loss", "absolute"),
    name=f"fitted:{config.step_records}" + (f" [{where}]" if where else ""),
  )
  fit = {
    "step_records": config.step_records + (f" [{where}]" if where else ""),
    "train_records": report.train_records,
    "heldout_records": report.heldout_records,
    "median_rel_error": report.median_rel_error,
    "form": config.get("cost_form", "linear"),
    "loss": config.get("cost_loss", "absolute"),
    **report.model.as_dict(),
  }
  return report.model, fit


def describe(cost: StepCostModel, fit: dict | None) -> str:
  """One sentence naming the model, for captions and notes."""
  if cost.name == "cpu_default":
    return (
      "the CPU default step cost (1 ms per computed token: prompt, recomputed or decode; "
      "nothing per step or per K/V token read; a stated assumption, not a measurement)"
    )
  if cost.bucket_ms:
    fixed = ", ".join(f"{ms:.3g} ms at {rows}" for rows, ms in cost.bucket_ms)
    terms = (
      f"a fixed cost by padded batch ({fixed} rows) + {cost.prefill_ms:.4g} ms per prefill "
      f"token + {cost.kv_ms:.4g} ms per K/V token read"
    )
  else:
    terms = (
      f"{cost.base_ms:.4g} ms per step + {cost.prefill_ms:.4g} ms per prefill token + "
      f"{cost.decode_ms:.4g} ms per decode row + {cost.kv_ms:.4g} ms per K/V token read"
    )
  if fit is not None:
    return (
      f"a step cost fitted to {fit['train_records']} measured steps of {fit['step_records']} "
      f"({terms}; median error {100 * fit['median_rel_error']:.1f}% on "
      f"{fit['heldout_records']} held-out steps)"
    )
  return f"the {cost.name} step cost ({terms}; an estimate, not a fit)"
