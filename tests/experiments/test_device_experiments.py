"""Block-size ablation, swap vs recompute and the engine bench, at tiny sizes on CPU."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from experiments import (
  _engine_bench,
  _kernel_timing,
  block_size_ablation,
  swap_vs_recompute,
)


def run_config(name, variant):
  """``configs/<name>.py``'s ``get_config(variant)``."""
  import importlib.util
  import os

  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _ablation_config():
  return ConfigDict(
    dict(
      block_sizes=(4, 16),
      seed=0,
      workloads=("alpaca",),
      num_requests=30,
      max_seq_len=256,
      pool_tokens=512,
      watermark=0.01,
      backends=("reference", "gpu"),
      kernel_batch=2,
      kernel_context=40,
      num_q_heads=2,
      num_kv_heads=1,
      head_dim=8,
      kernel_dtype="float32",
      kernel_iters=3,
      engine=_engine_bench.default_engine_config(requests=0),
    )
  )


def test_block_size_ablation_rows_per_block_size_and_native_backends_only():
  result = block_size_ablation.run(_ablation_config())
  tables = {t.name: t for t in result.tables}
  wide = tables["ablation"].rows
  assert [r["block_size"] for r in wide] == [4, 16]
  assert all(r["reference_ms"] > 0 for r in wide)
  kernel = tables["kernel_time"].rows
  assert {r["backend"] for r in kernel} == {"reference"}  # the GPU kernel never runs on CPU
  assert all(r["status"] == "ok" and r["gbps"] > 0 for r in kernel)
  for r in kernel:  # the median of 3 calls, with its spread
    assert r["time_repeats"] == 3
    assert r["time_min_ms"] <= r["time_ms"] <= r["time_max_ms"]
    assert r["time_spread_ms"] == f"{r['time_min_ms']:.4g}-{r['time_max_ms']:.4g}"
  assert all(r["reference_spread_ms"] for r in wide)
  # The smallest block against the largest: a verdict from the intervals, not the medians.
  assert any(n.startswith("Decode kernel (reference): block 4 ") for n in result.notes)
  assert any("Backend 'gpu' not timed here" in n for n in result.notes)
  # Smaller blocks never hold fewer tokens per reserved slot.
  mem = tables["memory"].rows
  assert mem[0]["token_of_reserved_pct"] >= mem[1]["token_of_reserved_pct"]


def test_kernel_timing_bytes_per_second_arithmetic():
  res = _kernel_timing.time_decode(
    "reference",
    8,
    batch=2,
    context=24,
    num_q_heads=2,
    num_kv_heads=1,
    head_dim=8,
    dtype="float32",
    iters=2,
  )
  kv_bytes = 2 * 2 * 24 * 1 * 8 * 4  # K and V, batch x context x heads x dim x 4 bytes
  # Both are rounded to 4 significant digits.
  assert res["gbps"] == pytest.approx(kv_bytes / (res["time_ms"] * 1e-3) / 1e9, rel=1e-3)


def test_swap_vs_recompute_counts_blocks_and_bytes():
  config = ConfigDict(
    dict(
      block_sizes=(4, 32),
      seq_lens=(20,),
      iters=1,
      seed=0,
      vocab_size=32,
      d_model=16,
      num_layers=1,
      num_q_heads=2,
      num_kv_heads=1,
      head_dim=8,
      mlp_dim=32,
      dtype="float32",
      workload="alpaca",
      engine=_engine_bench.default_engine_config(requests=0),
    )
  )
  rows = swap_vs_recompute.run(config).tables[0].rows
  assert [(r["block_size"], r["blocks"]) for r in rows] == [(4, 5), (32, 1)]
  # K and V x 1 layer x 1 KV head x blocks x block_size x 8 dims x 4 bytes.
  assert rows[0]["kv_mib"] == round(2 * 5 * 4 * 8 * 4 / 2**20, 2)
  for r in rows:
    assert r["swap_out_ms"] > 0 and r["swap_in_ms"] > 0 and r["recompute_ms"] > 0
    assert r["swap_ms"] == pytest.approx(r["swap_out_ms"] + r["swap_in_ms"], abs=2e-3)
    for name in ("swap_out", "swap_in", "swap", "recompute"):
      assert r[f"{name}_min_ms"] <= r[f"{name}_ms"] <= r[f"{name}_max_ms"]
    assert r["swap_min_ms"] == pytest.approx(r["swap_out_min_ms"] + r["swap_in_min_ms"], abs=2e-3)
    # A verdict only where the intervals separate.
    swap, re = (r["swap_min_ms"], r["swap_max_ms"]), (r["recompute_min_ms"], r["recompute_max_ms"])
    expected = "faster" if swap[1] < re[0] else "slower" if re[1] < swap[0] else "indistinguishable"
    assert r["swap_vs_recompute"] == expected


def test_scaled_lengths_divide_round_and_drop_what_the_model_cannot_hold():
  ec = _engine_bench.default_engine_config(requests=3)
  ec.length_scale = 10.0
  ec.max_seq_len = 30
  lengths = np.array([[4, 96], [100, 250], [15, 24], [1, 1], [50, 50]])
  np.testing.assert_array_equal(
    _engine_bench.scaled_lengths(ec, lengths), [[1, 10], [2, 2], [1, 1]]
  )


def test_engine_block_sizes_scale_with_the_lengths():
  # Lengths / 8, so blocks / 8: block 128 holds as much of a request as it would unscaled.
  assert [_engine_bench.engine_block_size(8.0, b) for b in (8, 16, 32, 64, 128)] == [
    1,
    2,
    4,
    8,
    16,
  ]
  assert _engine_bench.engine_block_size(1.0, 7) == 7
  for bad in (4, 12):  # below one token, or not a whole block
    with pytest.raises(ValueError, match=f"block size {bad} is not a multiple of length_scale=8"):
      _engine_bench.engine_block_size(8.0, bad)


def test_block_sizes_an_engine_run_cannot_scale_are_usage_errors_before_the_run():
  from experiments import run

  config = run_config("block_size_ablation", "engine_cpu")
  run.check_config_values(config)  # (8, 16, 32, 64, 128) at scale 8
  config.block_sizes = (16, 4)
  # The flag as given, then the element at fault.
  with pytest.raises(
    ValueError,
    match=r"--config.block_sizes=\(16, 4\) \(block size 4\): block size 4 .*length_scale",
  ):
    run.check_config_values(config)
  config.engine.requests = 0  # no engine run: any block size
  run.check_config_values(config)
  config = run_config("batch_capacity", None)
  config.engine.block_size = 12
  with pytest.raises(ValueError, match=r"--config.engine.block_size=12"):
    run.check_config_values(config)


@pytest.mark.slow
def test_engine_bench_generates_every_token_and_respects_the_batch_cap():
  ec = _engine_bench.default_engine_config(requests=6)
  ec.pool_tokens = 256
  ec.max_seq_len = 64
  model = _engine_bench.make_model(ec)
  lengths = np.array([[5, 7], [3, 12], [9, 4], [2, 9], [6, 6], [4, 10]])
  row = _engine_bench.measure(model, ec, lengths, block_size=16, max_num_seqs=2)
  assert row["generated_tokens"] == int(lengths[:, 1].sum())
  assert row["max_batch"] <= 2
  assert row["tokens_per_s"] > 0 and row["requests"] == 6
  assert row["repeats"] == 5  # the median of 5 measured passes, with its spread
  assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
  assert "steps_per_pass" not in row  # the same lengths take the same steps every pass
  # Block 16 on real lengths runs as block 16 / 8 = 2 on the scaled ones: 128 blocks.
  assert (row["block_size"], row["engine_block_size"], row["pool_tokens"]) == (16, 2, 256)


def test_memory_notes_say_what_the_memory_columns_show_and_no_more():
  def rows(wl, pcts):
    return [{"workload": wl, "block_size": b, "token_pct": p} for b, p in pcts]

  notes = block_size_ablation.memory_notes(
    rows("sharegpt", [(16, 97.1), (1, 98.7), (256, 77.1)])
    + rows("odd", [(1, 90.0), (16, 95.0), (64, 80.0)])
  )
  assert notes[0].startswith(
    "Memory alone, sharegpt: most tokens at block 1 (98.7%), falling as blocks grow: memory "
    "always favours the smallest block."
  )
  assert notes[1].startswith("Memory alone, odd: most tokens at block 16 (95.0%), not falling")
  assert all("lower bound of 16 comes from GPU kernel efficiency" in n for n in notes)
  assert all("do not confirm Figure 18" in n for n in notes)


def _rate_row(block_size, mode, lo, median, hi):
  return dict(
    block_size=block_size,
    mode=mode,
    tokens_per_s=median,
    tokens_per_s_min=lo,
    tokens_per_s_max=hi,
    repeats=5,
    device="cpu:cpu",
  )


def test_modes_compare_only_where_their_ranges_separate():
  rows = [
    _rate_row(8, "swap", 100, 110, 120),
    _rate_row(8, "recompute", 130, 140, 150),  # above swap's range: recompute faster
    _rate_row(32, "recompute", 100, 110, 120),
    _rate_row(32, "swap", 119, 125, 130),  # overlaps
    _rate_row(128, "swap", 50, 60, 70),  # the other mode missing
  ]
  swap_vs_recompute.compare_modes(rows)
  assert [r["vs_other_mode"] for r in rows] == [
    "slower",
    "faster",
    "indistinguishable",
    "indistinguishable",
    None,
  ]


def test_engine_claims_name_a_difference_only_where_the_ranges_separate():
  small, large = _rate_row(8, None, 100, 110, 120), _rate_row(128, None, 130, 140, 150)
  (text,) = block_size_ablation.engine_claims([small, large])
  assert "block 8 (110.0 generated tokens/s, min-max 100.0-120.0 over 5 passes) is slower" in text
  large.update(tokens_per_s_min=120)  # touching ends overlap
  (text,) = block_size_ablation.engine_claims([small, large])
  assert "not distinguishable from" in text
  assert block_size_ablation.engine_claims([small]) == []


def test_kernel_claim_states_the_coverage_of_its_intervals():
  def row(bs, lo, hi, n):
    return dict(block_size=bs, time_ms=(lo + hi) / 2, time_ci_lo_ms=lo, time_ci_hi_ms=hi,
                time_repeats=n, inner=10)  # fmt: skip

  # 5 samples: min-max holds the median with probability 1 - 2**-4 = 93.75%, not 95%.
  (text,) = block_size_ablation._kernel_claims("gpu", [row(8, 1.0, 1.1, 5), row(256, 2, 3, 5)])
  assert "93.8% interval 1-1.1) is faster than block 256" in text
  (text,) = block_size_ablation._kernel_claims("gpu", [row(8, 1.0, 2.5, 20), row(256, 2, 3, 20)])
  assert "interval 1-2.5) is not distinguishable" in text and "93.8%" not in text


def test_capacity_engine_claim_is_tokens_per_step_and_separated_rates():
  from experiments import batch_capacity

  cap = dict(_rate_row(16, None, 100, 110, 120), system="capped", mean_batch=7.5)
  paged = dict(_rate_row(16, None, 200, 210, 220), system="paged", mean_batch=26.25)
  (text,) = batch_capacity.engine_claims([cap, paged])
  assert text.startswith("Engine: paged serves 3.50x the tokens per step of capped (counts)")
  assert "is faster than it in generated tokens/s (210.0, min-max 200.0-220.0" in text
  paged.update(tokens_per_s_min=115)
  assert "not distinguishable" in batch_capacity.engine_claims([cap, paged])[0]


def test_interleaved_passes_alternate_their_order_round_by_round(monkeypatch):
  order = []
  monkeypatch.setattr(
    _engine_bench, "_prepare", lambda model, ec, lengths, **kw: {"name": kw["block_size"]}
  )
  monkeypatch.setattr(_engine_bench, "_one_pass", lambda state, ec: order.append(state["name"]))
  monkeypatch.setattr(_engine_bench, "_row", lambda state: {"block_size": state["name"]})
  ec = _engine_bench.default_engine_config(requests=1)
  rows = _engine_bench.measure_interleaved(
    None, ec, None, [dict(block_size=b, max_num_seqs=1) for b in (8, 16, 32)]
  )
  assert order == [8, 16, 32, 32, 16, 8, 8, 16, 32, 32, 16, 8, 8, 16, 32]  # 5 rounds
  assert rows == [{"block_size": b, "interleaved": True} for b in (8, 16, 32)]


@pytest.mark.slow
def test_interleaved_measurements_count_what_separate_ones_do():
  ec = _engine_bench.default_engine_config(requests=4)
  ec.pool_tokens = 64  # small: the 8-token blocks preempt
  ec.max_seq_len = 64
  model = _engine_bench.make_model(ec)
  lengths = np.array([[5, 17], [3, 12], [9, 14], [2, 19]])
  settings = [dict(block_size=bs, max_num_seqs=4) for bs in (8, 64)]
  rows = _engine_bench.measure_interleaved(model, ec, lengths, settings)
  for kw, row in zip(settings, rows, strict=True):
    alone = _engine_bench.measure(model, ec, lengths, **kw)
    for key in ("steps", "preemptions", "recomputed_tokens", "generated_tokens", "block_size"):
      assert row[key] == alone[key], key
    assert row["repeats"] == 5 and row["interleaved"]
