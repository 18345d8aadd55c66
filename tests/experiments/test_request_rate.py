"""The request-rate experiment (issue 14): arrivals, summaries, sustainable rates, configs,
and the quick variant end to end."""

import json
import math
import os

import numpy as np
import pytest

from configs.request_rate import get_config
from experiments import _cost_config, run
from experiments import request_rate as rr
from paxcache.engine import CPU_DEFAULT, Request, SimulatedEngine, StepCostModel, load_step_records

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

FIELDS = (
  "workload",
  "system",
  "block_size",
  "rate",
  "clock",
  "normalized_latency",
  "ttft_p50",
  "ttft_p99",
  "tpot_p50",
  "tpot_p99",
  "requests",
  "device",
)


def test_poisson_arrivals_come_in_10ms_slots_at_the_rate():
  t = rr.poisson_arrivals(5.0, 4000, np.random.default_rng(0))
  assert len(t) == 4000 and (np.diff(t) >= 0).all()
  assert np.allclose(t / 0.01, np.round(t / 0.01))
  assert 4000 / t[-1] == pytest.approx(5.0, rel=0.05)
  again = rr.poisson_arrivals(5.0, 4000, np.random.default_rng(0))
  assert (t == again).all()


@pytest.mark.parametrize("rate", [0, -1.0, math.nan, math.inf, True])
def test_bad_rates_raise(rate):
  with pytest.raises(ValueError, match="rate"):
    rr.poisson_arrivals(rate, 10, np.random.default_rng(0))


def test_hand_worked_normalized_latency_under_a_constant_cost_model():
  """1 ms per computed token. Step 1 (0 -> 3 ms): A's 3-token prefill (B, arriving at
  1 ms, is not there yet); A's first token at 3 ms. Step 2 (3 -> 6 ms): A's decode and B's
  2-token prefill; A finishes (2 tokens), B's first token. Steps 3-5 (6 -> 9 ms): B decodes
  alone. A: 6 ms / 2 tokens = 3 ms/token; B: (9 - 1) ms / 4 tokens = 2 ms/token; mean 2.5."""
  engine = SimulatedEngine(rr.EngineConfig(enable_prefix_caching=False), max_seq_len=64)
  assert engine.clock.cost == CPU_DEFAULT
  reqs = [
    Request("A", [1, 2, 3], max_new_tokens=2, arrival_time=0.0),
    Request("B", [4, 5], max_new_tokens=4, arrival_time=0.001),
  ]
  metrics, totals = rr.serve(engine, reqs, rr.Progress("t"))
  by_arrival = sorted(metrics, key=lambda m: m.arrival_time)
  assert [m.finish_time for m in by_arrival] == pytest.approx([0.006, 0.009])
  s = rr.summarize(metrics)
  assert s["normalized_latency"] == pytest.approx((0.006 / 2 + 0.008 / 4) / 2)
  assert s["ttft_p50"] == pytest.approx((0.003 + 0.005) / 2)  # A at 3 ms, B at 6 - 1 ms
  assert s["requests"] == 2 and totals["steps"] == 5
  with pytest.raises(ValueError, match="warmup_s"):
    rr.summarize(metrics, warmup_s=1.0)


def test_sustainable_rate_interpolates_and_flags_censored_sweeps():
  assert rr.sustainable_rate([1, 2, 3], [0.1, 0.2, 0.6], 0.4) == (2.5, False)
  assert rr.sustainable_rate([3, 1, 2], [0.6, 0.1, 0.2], 0.4) == (2.5, False)
  assert rr.sustainable_rate([1, 2], [0.1, 0.2], 0.4) == (2, True)
  assert rr.sustainable_rate([1, 2], [0.5, 0.6], 0.4) == (0.0, False)


def _small(**kw):
  config = get_config("quick")
  config.num_requests = 30
  config.rates = (1.0, 8.0)
  config.update(kw)
  return config


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("rates", (), "rates needs at least one"),
    ("rates", (1.0, -2.0), "finite number > 0"),
    ("systems", ("paged", "orca"), "pick from"),
    ("preemption_modes", ("drop",), "pick from"),
    ("clock", "sundial", "clock"),
    ("latency_bound", 0.0, "latency_bound"),
    ("warmup_s", -1.0, "warmup_s"),
    ("cost_model", "gpu", "cost_model"),
    ("pool_tokens", 512, "fewer than one max_seq_len"),
    ("system_rates", {"orca": (1.0,)}, "not a system"),
    ("system_rates", {"paged": ()}, "at least one rate"),
    ("trace_s", -1.0, "trace_s"),
    ("max_wall_s", -1.0, "max_wall_s"),
    ("warmup_threads", 0, "warmup_threads"),
    ("cost_form", "cubic", "cost_form"),
    ("num_samples", (), "num_samples"),
    ("num_samples", (2, 0), "num_samples"),
    ("num_samples", (True,), "num_samples"),
    ("num_samples", (300,), "max_num_seqs=256"),
    # quick: 4,096 token slots; 5 samples of max_seq_len 1,024 need 5,120.
    ("num_samples", (5,), "request of 5 samples needs"),
  ],
)
def test_bad_config_values_raise_naming_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    rr.run(_small(**{field: value}))


def test_the_runner_rejects_bad_rates_before_writing(tmp_path):
  config = _small(rates=(0.0,))
  with pytest.raises(ValueError, match="rates"):
    run.prepare_run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_a_cost_model_fitted_from_step_records_reports_its_error(tmp_path):
  true = StepCostModel(base_ms=10.0, prefill_ms=0.1, decode_ms=0.2, kv_ms=0.001)
  rng = np.random.default_rng(1)
  with open(tmp_path / "steps.jsonl", "w") as f:
    for _ in range(50):
      p, d, kv = (int(x) for x in rng.integers(0, 300, size=3))
      ms = true.step_ms(p, d, kv)
      f.write(json.dumps(dict(prefill_tokens=p, decode_batch=d, kv_tokens=kv, step_ms=ms)))
      f.write("\n")
  result = rr.run(_small(step_records=str(tmp_path / "steps.jsonl"), systems=("paged",)))
  note = next(n for n in result.notes if "held-out" in n)
  assert "40 steps" in note and "0.0%" in note
  assert result.tables[0].rows[0]["cost_model"].startswith("fitted:")


def test_quick_variant_end_to_end(tmp_path):
  config = get_config("quick")
  result = run.run_experiment(config, str(tmp_path), variant="quick")
  with open(tmp_path / "results.jsonl") as f:
    rows = [json.loads(line) for line in f]
  latency = [r for r in rows if r["table"] == "request_rate"]
  assert len(latency) == len(config.rates) * 4
  for r in latency:
    assert all(k in r for k in FIELDS), r
    assert r["clock"] == "simulated" and r["requests"] == config.num_requests
  assert {r["system"] for r in latency} == {"paged", "orca_max", "orca_pow2", "orca_oracle"}
  sus = {r["system"]: r["sustainable_rate"] for r in rows if r["table"] == "sustainable_rate"}
  assert sus["paged"] >= sus["orca_oracle"] >= sus["orca_max"] > 0
  assert sus["paged"] > sus["orca_max"]
  assert os.path.exists(tmp_path / "latency_vs_rate_sharegpt_bs16_recompute.png")
  assert result.tables[1].name == "sustainable_rate"


def test_wall_clock_variant_runs_the_real_engine():
  config = get_config("wall")
  config.num_requests = 6
  config.warmup_requests = 6
  config.max_seq_len = 64
  config.rates = (50.0,)
  config.systems = ("paged", "orca_oracle")
  result = rr.run(config)
  rows = result.tables[0].rows
  assert [r["system"] for r in rows] == ["paged", "orca_oracle"]
  assert all(r["clock"] == "wall" and r["requests"] == 6 for r in rows)
  assert all(r["normalized_latency"] > 0 and r["cost_model"] is None for r in rows)
  config.max_seq_len = 1024
  with pytest.raises(ValueError, match="max_seq_len=1024 exceeds the model's 512"):
    rr.run(config)
  config.model = "gpt-5"
  with pytest.raises(ValueError, match="config.model='gpt-5'"):
    rr.run(config)


def test_step_records_where_keeps_matching_records(tmp_path):
  path = tmp_path / "steps.jsonl"
  recs = [
    {"model": m, "block_size": b, "prefill_tokens": 0, "decode_batch": d, "kv_tokens": 10 * d,
     "step_ms": 1.0 + 0.5 * d}
    for m in ("a", "b") for b in (16, 32) for d in range(1, 9)
  ]  # fmt: skip
  path.write_text("".join(json.dumps(r) + "\n" for r in recs))
  kept = _cost_config.records_where(load_step_records(str(path)), "model=a,block_size=16")
  assert len(kept) == 8 and {(r["model"], r["block_size"]) for r in kept} == {("a", 16)}
  with pytest.raises(ValueError, match="keeps none"):
    _cost_config.records_where(recs, "model=c")
  with pytest.raises(ValueError, match="key=value"):
    _cost_config.records_where(recs, "model")


def test_partial_path_gets_each_row_as_it_is_measured(tmp_path):
  config = get_config("quick")
  config.rates = (1.0, 4.0)
  config.systems = ("paged",)
  config.num_requests = 12
  config.partial_path = str(tmp_path / "partial.jsonl")
  rows = rr.run(config).tables[0].rows
  written = [json.loads(line) for line in open(config.partial_path)]
  assert [(r["system"], r["rate"]) for r in written] == [("paged", 1.0), ("paged", 4.0)]
  assert written == json.loads(json.dumps(rows))


def test_wall_run_compiles_every_step_shape_before_its_clock_starts():
  """The CPU smoke test of the GPU run's warm-up: with ``warmup_shapes`` and no warm-up
  trace, the timed runs meet no shape the enumeration missed and compile nothing."""
  config = get_config("wall")
  config.num_requests = 8
  config.warmup_requests = 0
  config.max_seq_len = 64
  config.rates = (50.0,)
  config.systems = ("paged", "orca_max")
  config.max_num_seqs = 8
  config.max_num_batched_tokens = 64
  config.min_token_bucket = 64
  config.warmup_shapes = True
  config.warmup_threads = 2
  rows = rr.run(config).tables[0].rows
  assert [r["system"] for r in rows] == ["paged", "orca_max"]
  for r in rows:
    # 8 rows; 8, 16 or 32 block-table columns (the tiny model's 512 tokens in blocks of
    # 16: the engine does not know the trace stops at 64); 64 query tokens: a decode and
    # a prefill shape per width.
    assert r["warmup_shapes"] == 6 and r["unwarmed_shapes"] == 0
    assert r["compile_excluded_s"] == 0.0  # the clock never stopped for a compile
  assert rows[0]["warmup_compile_s"] == rows[1]["warmup_compile_s"]  # compiled once


def test_fixed_duration_traces_per_system_rates_and_stopping_past_the_bound():
  config = _small(
    trace_s=3.0,
    systems=("paged", "orca_max"),
    system_rates={"paged": (4.0, 1.0, 200.0)},
    rates=(2.0, 50.0, 400.0),
    stop_past_bound=True,
  )
  result = rr.run(config)
  rows = result.tables[0].rows
  got = [(r["system"], r["rate"], r["requests"]) for r in rows]
  # paged sweeps its own rates in ascending order, orca_max the common ones; each trace
  # holds rate x 3 s requests; at 1 ms per token (the CPU default) 200 and 50 req/s are
  # past the 0.1 s/token bound of the quick variant, so the sweeps stop there.
  assert [g[:2] for g in got] == [
    ("paged", 1.0), ("paged", 4.0), ("paged", 200.0), ("orca_max", 2.0), ("orca_max", 50.0)
  ]  # fmt: skip
  assert all(n == round(rate * 3.0) for _, rate, n in got)
  assert rows[-1]["normalized_latency"] > config.latency_bound >= rows[-2]["normalized_latency"]
  assert any("Not run (past the bound)" in n and "400" in n for n in result.notes)
  assert any("3 s trace per rate" in n for n in result.notes)
  sus = {r["system"]: r for r in result.tables[1].rows}
  assert not sus["paged"]["censored"] and 4.0 < sus["paged"]["sustainable_rate"] < 200.0


def test_a_sweep_stopped_at_its_first_rate_is_below_the_sweep():
  rows = [
    dict(workload="w", block_size=16, preemption_mode="recompute", system="paged", rate=r,
         normalized_latency=lat)
    for r, lat in ((1.0, 0.05), (2.0, 0.15))
  ] + [dict(workload="w", block_size=16, preemption_mode="recompute", system="orca_max",
            rate=1.0, normalized_latency=0.3)]  # fmt: skip
  sus = {r["system"]: r for r in rr.sustainable_rows(rows, 0.1, ("paged", "orca_max"))}
  assert sus["paged"]["sustainable_rate"] == pytest.approx(1.5)
  assert sus["orca_max"]["sustainable_rate"] == 0.0 and not sus["orca_max"]["censored"]
  one_below = [dict(rows[0])]
  assert rr.sustainable_rows(one_below, 0.1, ("paged",)) == []


def test_a_time_budget_stops_starting_runs():
  result = rr.run(_small(max_wall_s=1e-9, systems=("paged",)))
  assert result.tables[0].rows == []
  assert any("Not run (time budget)" in n for n in result.notes)


def test_gpu_sim_fits_the_committed_h200_steps_within_the_goal():
  """Issue 14's goal on the committed records, with gpu_sim's form and loss (chosen by
  cross-validation on the training steps, experiments/step_cost_fit.py)."""
  cost, fit = _cost_config.step_cost(get_config("gpu_sim"))
  assert fit["form"] == "bucketed" and fit["loss"] == "relative" and cost.bucket_ms
  assert fit["median_rel_error"] <= 0.10


def test_step_cost_fit_chooses_by_cross_validation_on_the_training_steps():
  """Steps whose time is a fixed cost per padded batch: the CV picks a bucketed form, and
  the choice does not read the held-out steps (changing them changes no CV error)."""
  from experiments import step_cost_fit

  rng = np.random.default_rng(0)
  fixed = {8: 1.5, 16: 1.9, 32: 2.1, 64: 2.6}
  recs = []
  for i in range(200):
    d = int(rng.integers(1, 60))
    ms = fixed[1 << (max(d, 8) - 1).bit_length()] * float(rng.uniform(0.97, 1.03))
    recs.append(dict(model="m", block_size=16, prefill_tokens=0, decode_batch=d,
                     kv_tokens=int(rng.integers(0, 9000)), step_ms=ms, i=i))  # fmt: skip
  report = step_cost_fit.evaluate(recs, ("m", 16))
  assert report["chosen"].startswith("bucketed/")
  s = report["slices"][0]
  assert (s["train"], s["heldout"]) == (160, 40)
  assert s["heldout_error"][report["chosen"]] < 0.03 < s["heldout_error"]["linear/absolute"]
  _, held = step_cost_fit.split_records(recs, 0.2, 0)
  ids = {r["i"] for r in held}
  changed = [dict(r, step_ms=r["step_ms"] * 5) if r["i"] in ids else r for r in recs]
  again = step_cost_fit.evaluate(changed, ("m", 16))
  assert again["slices"][0]["cv_error"] == s["cv_error"]
  assert again["slices"][0]["heldout_error"] != s["heldout_error"]
  with pytest.raises(ValueError, match="select"):
    step_cost_fit.evaluate(recs, ("m", 32))


def test_parallel_sampling_runs_one_sweep_per_sample_count(tmp_path):
  """num_samples=(1, 3): the same trace with one and with three samples per request, at
  temperature 1; each request's output tokens count every sample; paged shares the prompt
  (and swaps a group's shared blocks once) where Orca (Oracle) reserves three ranges."""
  lengths = np.array([[5, 4], [9, 2]])
  reqs = rr.make_requests(lengths, np.array([0.0, 0.5]), vocab=256, seed=0, num_samples=3)
  assert [(r.n, r.temperature, len(r.prompt), r.max_new_tokens) for r in reqs] == [
    (3, 1.0, 5, 4),
    (3, 1.0, 9, 2),
  ]
  one = rr.make_requests(lengths, np.array([0.0, 0.5]), vocab=256, seed=0)
  assert [(r.n, r.temperature) for r in one] == [(1, 0.0), (1, 0.0)]
  assert [r.prompt for r in one] == [r.prompt for r in reqs]

  config = _small(
    num_samples=(1, 3),
    systems=("paged", "orca_oracle"),
    preemption_modes=("swap",),
    max_seq_len=512,
    rates=(2.0, 64.0),
  )
  result = run.run_experiment(config, str(tmp_path), variant="quick")
  rows = [r for r in result.tables[0].rows]
  assert [(r["num_samples"], r["system"]) for r in rows] == [
    (n, s) for n in (1, 3) for s in ("paged", "orca_oracle") for _ in (2.0, 64.0)
  ]
  sus = {(r["num_samples"], r["system"]): r for r in result.tables[1].rows}
  assert set(sus) == {(n, s) for n in (1, 3) for s in ("paged", "orca_oracle")}
  for n in (1, 3):
    assert sus[n, "paged"]["sustainable_rate"] >= sus[n, "orca_oracle"]["sustainable_rate"]
  assert os.path.exists(tmp_path / "latency_vs_rate_sharegpt_bs16_swap.png")
  assert os.path.exists(tmp_path / "latency_vs_rate_sharegpt_bs16_swap_n3.png")
  # Three samples of each request: three times the output tokens in less than three times
  # the time (a step of three rows costs less than three steps of one), so at the unloaded
  # rate a lower normalized latency than one sample's (0.53x here).
  low = {(r["num_samples"], r["system"]): r["normalized_latency"] for r in rows if r["rate"] == 2.0}
  assert low[3, "paged"] < low[1, "paged"]
