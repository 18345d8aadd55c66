"""Issue 19 item 1: the serving simulation charges prefill, recomputation and decode through
a step-cost model, and the batch-capacity tables report it."""

import importlib.util
import os

import numpy as np
import pytest

from experiments import _cost_config, _serving, batch_capacity
from paxcache.engine._cost import CPU_DEFAULT, StepCostModel

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def _trace(cost=CPU_DEFAULT):
  # 3 blocks of 2 slots, watermark 0; A = 2 prompt + 3 output, B = 1 + 3.
  # step 0: admit A (2) and B (1): prefill 3 prompt tokens, 2 blocks used, kv 3.
  # step 1: A 2->3 (new block), B 1->2: decode 2, no block free, kv 5.
  # step 2: B 2->3 needs a block, none free: B (1 generated) preempted; A 3->4; B
  #         readmitted with 1 + 1 = 2 tokens (recomputed), decode 1, kv 4 + 2 = 6.
  # step 3: A 4->5 and B 2->3 both need a block, none free: B preempted again; A grows to 5
  #         and finishes; B does not fit (no block): decode 1, kv 5.
  # step 4: B readmitted with 2 tokens (recomputed), kv 2.
  # steps 5, 6: B 3, 4: decode 1 each, kv 3 and 4; B finishes.
  lengths = np.array([[2, 3], [1, 3]])
  return _serving.simulate(_serving.PagedPool(2, 6, watermark=0.0), lengths, cost=cost)


def test_recomputation_and_prefill_are_counted_at_the_steps_worked_by_hand():
  stats = _trace()
  assert (stats.steps, stats.preemptions) == (7, 2)
  assert stats.prompt_tokens == 3
  assert stats.recomputed_tokens == 4  # 2 at step 2, 2 at step 4: prompt 1 + generated 1
  assert stats.decode_rows == 6  # 2 + 1 + 1 + 0 + 1 + 1, one per generated token
  assert stats.kv_tokens == 3 + 5 + 6 + 5 + 2 + 3 + 4
  assert stats.swap_tokens == 0
  # CPU default: 1 ms per computed token, 3 + 2 + 3 + 1 + 2 + 1 + 1.
  assert stats.sim_ms == pytest.approx(13.0)
  assert stats.cost_model == "cpu_default"


def test_a_step_cost_with_every_term_charges_each_step_by_hand():
  cost = StepCostModel(base_ms=10.0, prefill_ms=1.0, decode_ms=2.0, kv_ms=0.5, name="hand")
  stats = _trace(cost)
  # per step: 10 + prefill + 2 * decode + kv / 2
  steps = [10 + 3 + 1.5, 10 + 4 + 2.5, 10 + 2 + 2 + 3, 10 + 2 + 2.5, 10 + 2 + 1, 10 + 2 + 1.5,
           10 + 2 + 2]  # fmt: skip
  assert stats.sim_ms == pytest.approx(sum(steps)) == pytest.approx(103.0)
  assert stats.cost_model == "hand"


def test_a_step_with_nothing_to_compute_costs_nothing():
  cost = StepCostModel(base_ms=5.0, name="base")
  # One request of 1 + 1 arriving at step 3: steps 0-2 are idle (0 ms), step 3 prefills
  # 1 token (5 + 1 ms), step 4 decodes 1 row (5 + 1 ms).
  stats = _serving.simulate(
    _serving.ContiguousPool("oracle", 8, 8), np.array([[1, 1]]), arrivals=[3], cost=cost
  )
  assert stats.steps == 5 and stats.sim_ms == pytest.approx(12.0)


def _config(arg="quick", **fields):
  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "batch_capacity.py")
  spec = importlib.util.spec_from_file_location("config_batch_capacity", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.num_requests = 60
  config.kv_dtype_axis = ()
  for k, v in fields.items():
    setattr(config, k, v)
  return config


def test_batch_capacity_reports_recomputation_and_charged_time_and_names_the_model():
  result = batch_capacity.run(_config())
  table = result.tables[0]
  assert "CPU default step cost (1 ms per computed token" in table.caption
  rows = {r["policy"]: r for r in table.rows}
  for r in rows.values():
    # CPU default: every prompt, recomputed and generated token costs 1 ms.
    ms = r["prompt_tokens"] + r["recomputed_tokens"] + r["generated_tokens"]
    assert r["sim_s"] == pytest.approx(ms / 1e3, rel=1e-3)
    assert r["tokens_per_sim_s"] == pytest.approx(r["generated_tokens"] / r["sim_s"], rel=1e-3)
  assert rows["max"]["recomputed_tokens"] == 0
  base = rows["max"]
  for r in rows.values():
    assert r["speedup_vs_first_per_sim_s"] == pytest.approx(
      r["tokens_per_sim_s"] / base["tokens_per_sim_s"], abs=0.01
    )


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("cost_model", "gpu", "config.cost_model='gpu'"),
    ("heldout_fraction", 1.5, "config.heldout_fraction"),
    ("swap_ms", -1.0, "config.swap_ms"),
  ],
)
def test_a_bad_cost_model_config_raises_naming_the_field(field, value, match):
  config = _config(**{field: value})
  if field != "cost_model":
    config.step_records = "docs/results/engine_steps.jsonl"
  with pytest.raises(ValueError, match=match):
    batch_capacity.run(config)
  with pytest.raises(ValueError, match=match):
    _cost_config.step_cost(config)
