"""The serving simulation and the memory-waste and prefix-sharing experiments, hand-worked."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from experiments import _serving, memory_waste, prefix_sharing
from paxcache.engine._reservation import FirstFitRanges


def test_pow2_reservation_follows_the_papers_example():
  # Kwon et al. §6: "if the true output length is 25, it reserves 32 positions for outputs".
  assert _serving.contiguous_reservation("pow2", 10, 25, 2048) == 10 + 32
  assert _serving.contiguous_reservation("pow2", 10, 32, 2048) == 10 + 32
  assert _serving.contiguous_reservation("pow2", 2000, 100, 2048) == 2048  # capped
  assert _serving.contiguous_reservation("max", 10, 25, 2048) == 2048
  assert _serving.contiguous_reservation("oracle", 10, 25, 2048) == 35
  with pytest.raises(ValueError, match="policy must be one of"):
    _serving.contiguous_reservation("best", 1, 1, 8)


def test_first_fit_matches_a_slot_array_reference():
  rng = np.random.default_rng(0)
  space = FirstFitRanges(64)  # the one first-fit space (engine and serving simulation)
  owner = np.full(64, -1)  # reference: which reservation holds each slot
  live = {}
  for step in range(400):
    if live and rng.random() < 0.45:
      rid = int(rng.choice(list(live)))
      start, size = live.pop(rid)
      space.release(start, size)
      owner[start : start + size] = -1
    else:
      size = int(rng.integers(1, 20))
      start = space.reserve(size)
      # Reference first fit: the lowest start of `size` consecutive free slots.
      free = owner == -1
      expected = next((s for s in range(64 - size + 1) if free[s : s + size].all()), None)
      assert start == expected, (step, size)
      if start is not None:
        owner[start : start + size] = step
        live[step] = (start, size)
    assert space.free == int((owner == -1).sum())


def test_contiguous_oracle_serving_hand_worked():
  # Pool of 8 slots, three requests of 2 prompt + 2 output tokens, Oracle reserves 4 each.
  # Steps 0-2: A and B run (C waits): tokens 4, 6, 8 of 8 slots, reservation 4, 2, 0.
  # Steps 3-5: C alone, nothing waits.
  lengths = np.array([[2, 2]] * 3)
  stats = _serving.simulate(_serving.ContiguousPool("oracle", 8, 16), lengths)
  assert (stats.steps, stats.saturated_steps, stats.preemptions) == (6, 3, 0)
  shares = stats.shares()
  assert shares["token_share_of_pool"] == pytest.approx(18 / 24)
  assert shares["reserved_future_of_pool"] == pytest.approx(6 / 24)
  assert shares["internal_frag_of_pool"] == 0
  assert shares["external_frag_free_of_pool"] == 0
  assert shares["token_share_of_reserved"] == pytest.approx((18 + 2 + 3 + 4) / (24 + 12))
  assert shares["mean_batch"] == 2


def test_paged_serving_hand_worked_with_a_preemption():
  # 4 blocks of 2 slots, watermark 0. Step 0 admits A, B, C (one block each). Step 1 all
  # three need a new block, one is free: C is preempted (recompute), A and B grow to 3.
  # Step 2: A and B reach 4 and finish, C still waits (no free block). Steps 3-5: C.
  lengths = np.array([[2, 2]] * 3)
  stats = _serving.simulate(_serving.PagedPool(2, 8, watermark=0.0), lengths)
  assert (stats.steps, stats.saturated_steps, stats.preemptions) == (6, 2, 1)
  shares = stats.shares()
  assert shares["token_share_of_pool"] == pytest.approx((6 + 8) / 16)
  assert shares["internal_frag_of_pool"] == pytest.approx(2 / 16)
  assert shares["reserved_future_of_pool"] == 0
  assert shares["token_share_of_reserved"] == pytest.approx(29 / 32)


def test_serving_rejects_a_request_larger_than_the_pool():
  with pytest.raises(ValueError, match="more than the pool"):
    _serving.simulate(_serving.ContiguousPool("max", 100, 200), np.array([[1, 1]]))
  with pytest.raises(ValueError, match="more than the pool's 4"):
    _serving.simulate(_serving.PagedPool(4, 16), np.array([[10, 10]]))


def _mw_config(**kw):
  config = ConfigDict(
    dict(
      workloads=("alpaca",),
      num_requests=60,
      max_seq_len=256,
      pool_tokens=1024,
      block_sizes=(1, 8),
      contiguous_policies=("max", "pow2", "oracle"),
      arrival_rate=0.0,
      max_batch=0,
      watermark=0.01,
      seed=0,
    )
  )
  config.update(kw)
  return config


def test_memory_waste_snapshot_matches_hand_arithmetic():
  config = _mw_config()
  lengths = np.array([[3, 4], [10, 7], [1, 1]])
  rows = {r["system"]: r for r in memory_waste.snapshot_rows(config, "alpaca", lengths)}
  tokens = 7 + 17 + 2
  assert rows["Orca (Max)"]["reserved_slots"] == 3 * 256
  assert rows["Orca (Oracle)"]["reserved_slots"] == tokens
  assert rows["Orca (Pow2)"]["reserved_slots"] == (3 + 4) + (10 + 8) + (1 + 1)
  assert rows["paged (block 1)"]["waste_pct"] == 0
  # Block 8: 7 -> 8, 17 -> 24, 2 -> 8 slots.
  assert rows["paged (block 8)"]["reserved_slots"] == 40
  assert rows["paged (block 8)"]["token_of_reserved_pct"] == pytest.approx(100 * 26 / 40, abs=0.01)


def test_memory_waste_run_orders_systems_and_splits_the_whole_pool():
  result = memory_waste.run(_mw_config())
  serving = next(t for t in result.tables if t.name == "serving")
  systems = [r["system"] for r in serving.rows]
  assert systems == [
    "Orca (Max)",
    "Orca (Pow2)",
    "Orca (Oracle)",
    "paged (block 1)",
    "paged (block 8)",
  ]
  # Figure 2's numbers belong to one run, shown beside the ShareGPT-like rows only.
  assert all(r["paper_token_pct"] is None for r in serving.rows)
  assert serving.caption.endswith("on the sharegpt-like rows only (none in this run).")
  by = {r["system"]: r for r in serving.rows}
  # Paged at block 1 wastes nothing inside blocks; contiguous Max holds the fewest tokens.
  assert by["paged (block 1)"]["internal_frag_pct"] == 0
  assert by["Orca (Max)"]["token_pct"] < by["Orca (Oracle)"]["token_pct"]
  assert by["Orca (Oracle)"]["token_pct"] < by["paged (block 1)"]["token_pct"]
  for r in serving.rows:
    parts = [r["token_pct"], r["reservation_pct"], r["internal_frag_pct"], r["external_free_pct"]]
    assert sum(parts) == pytest.approx(100, abs=0.05)


def _ps_config(**kw):
  config = ConfigDict(
    dict(
      block_sizes=(16,),
      seed=0,
      num_users=4,
      system_prompt_len=40,
      user_prompt_len=3,
      output_len=5,
      workload="alpaca",
      num_requests=5,
      widths=(1, 2),
      max_seq_len=256,
    )
  )
  config.update(kw)
  return config


def test_system_prompt_block_counts_hand_worked():
  # Each user holds 40 + 3 + 5 = 48 tokens = 3 blocks of 16. The system prompt has 2 full
  # blocks and 8 tokens in a third.
  rows = {r["mode"]: r for r in prefix_sharing.system_prompt_rows(_ps_config(), 16)}
  assert rows["no sharing"]["reserved_slots"] == 4 * 48
  # Prefix cache: the first user takes 3 blocks; the others hit the 2 full system blocks
  # and take 1 block of their own.
  assert rows["prefix cache"]["blocks_used"] == 3 + 3 * 1
  assert rows["prefix cache"]["prefix_hit_tokens"] == 3 * 32
  assert rows["prefix cache"]["shared_blocks"] == 2
  # Fork: every user copies the shared partial block once (copy-on-write) and fills it.
  assert rows["fork"]["blocks_used"] == 2 + 4
  assert rows["fork"]["cow_copies"] == 4
  assert rows["ideal"]["reserved_slots"] == 40 + 4 * 8
  assert rows["no sharing"]["seed_slots"] == 4 * 48
  assert rows["fork"]["seed_slots"] == 40 + 4 * 8


def test_fork_savings_hand_worked():
  from paxcache.allocator import BlockAllocator

  # One request, a 16-token prompt (one full block), two samples of one token each: the
  # samples share the prompt block and each take a block: 3 used against 2 x 2 alone.
  lengths = np.array([[16, 1]])
  rng = np.random.default_rng(0)
  alloc = BlockAllocator(num_blocks=8, block_size=16, enable_prefix_caching=False)
  sums, cow = prefix_sharing.parallel_sampling(alloc, lengths, 2, rng, np.array([[1, 1]]))
  assert (sums.shared, sums.alone, cow) == (3, 4, 0)
  alloc = BlockAllocator(num_blocks=8, block_size=16, enable_prefix_caching=False)
  sums, cow = prefix_sharing.random_forks(alloc, lengths, 2, rng)
  assert (sums.shared, sums.alone) == (3, 4)
  assert alloc.num_used_blocks == 0


def test_width_one_shares_nothing_and_wider_forks_save_memory():
  rows = prefix_sharing.fork_rows(_ps_config(), 16, np.array([[19, 30], [40, 12], [5, 60]]))
  by = {(r["kind"], r["width"]): r["saved_pct"] for r in rows}
  forks = "random forks (beam-search-like)"  # not beam search: no scores
  assert by[("parallel sampling", 1)] == 0
  assert by[(forks, 1)] == 0
  assert by[("parallel sampling", 2)] > 0
  assert by[(forks, 2)] > by[("parallel sampling", 2)]


def test_beam_search_through_the_engine_shares_blocks_and_width_one_shares_none():
  engine = ConfigDict(
    dict(requests=4, length_scale=8.0, max_seq_len=512, max_num_seqs=8, max_num_batched_tokens=64)
  )
  lengths = np.array([[19, 60], [40, 48], [8, 80], [30, 40]])
  rows = prefix_sharing.beam_rows(_ps_config(engine=engine), 16, lengths)
  by = {(r["kind"], r["width"]): r for r in rows}
  beam, forks = prefix_sharing.BEAM, prefix_sharing.RANDOM_SCALED
  assert by[(beam, 1)]["saved_pct"] == 0 and by[(forks, 1)]["saved_pct"] == 0
  assert by[(beam, 2)]["saved_pct"] > 0 and by[(beam, 2)]["cow_copies_per_request"] > 0
  assert by[(beam, 1)]["common_prefix_pct"] == 100  # one hypothesis shares all of itself
  # The same scaled lengths and block (16 / 8 = 2) for both kinds.
  assert by[(beam, 2)]["block_steps_alone"] == by[(forks, 2)]["block_steps_alone"]
  assert {r["engine_block_size"] for r in rows} == {2}
  # Without an engine block, or with requests = 0, there are no beam rows.
  assert prefix_sharing.beam_rows(_ps_config(), 16, lengths) == []


@pytest.mark.parametrize(
  "workload, parallel, forks, trace",
  [
    # Kwon et al. §6.3: Alpaca 6.1-9.8% (parallel) and 37.6-55.2% (beam search); ShareGPT
    # 16.2-30.5% and 44.3-66.3%.
    ("alpaca", "6.1-9.8", "37.6-55.2", "Alpaca trace"),
    ("sharegpt", "16.2-30.5", "44.3-66.3", "ShareGPT trace"),
    ("tests/experiments/data/sharegpt_tiny.json", None, None, None),
  ],
)
def test_fork_rows_carry_their_own_workloads_paper_figures(workload, parallel, forks, trace):
  import os

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), workload)
  workload = path if workload.endswith(".json") else workload
  config = _ps_config(workload=workload, widths=(2,), num_users=2, num_requests=2)
  result = prefix_sharing.run(config)
  table = next(t for t in result.tables if t.name == "forks")
  paper = {r["kind"]: r["paper_saved_pct"] for r in table.rows}
  assert paper == {"parallel sampling": parallel, "random forks (beam-search-like)": forks}
  if trace is None:
    assert "no paper figures for sharegpt_tiny.json" in table.caption
  else:
    assert trace in table.caption and "Alpaca" not in table.caption.replace(trace, "")
  assert f"({os.path.basename(workload)} lengths" in table.caption


def test_poisson_arrivals_are_non_decreasing_with_the_requested_rate():
  assert _serving.poisson_arrivals(10, 0.0, seed=0) is None
  arrivals = _serving.poisson_arrivals(4000, 0.5, seed=0)
  assert all(a <= b for a, b in zip(arrivals, arrivals[1:], strict=False))
  # 4000 arrivals at 0.5 per step span about 8000 steps (standard deviation ~126).
  assert 7500 < arrivals[-1] < 8500


def test_paper_figures_only_on_the_sharegpt_like_rows():
  """Figure 2's token shares sit on the ShareGPT-like rows (Orca's three policies and paged
  at block 16), and are not repeated on the Alpaca-like rows of the same table."""
  assert memory_waste.paper_token_pct("alpaca", "max", None) is None
  assert memory_waste.paper_token_pct("sharegpt", "paged", 8) is None
  config = _mw_config(workloads=("sharegpt", "alpaca"), num_requests=30, block_sizes=(8, 16))
  result = memory_waste.run(config)
  serving = next(t for t in result.tables if t.name == "serving")
  paper = {(r["workload"], r["system"]): r["paper_token_pct"] for r in serving.rows}
  assert paper == {
    ("sharegpt", "Orca (Max)"): 20.4,
    ("sharegpt", "Orca (Pow2)"): 26.8,
    ("sharegpt", "Orca (Oracle)"): 38.2,
    ("sharegpt", "paged (block 8)"): None,
    ("sharegpt", "paged (block 16)"): 96.3,
    ("alpaca", "Orca (Max)"): None,
    ("alpaca", "Orca (Pow2)"): None,
    ("alpaca", "Orca (Oracle)"): None,
    ("alpaca", "paged (block 8)"): None,
    ("alpaca", "paged (block 16)"): None,
  }
  assert serving.caption.endswith("on the sharegpt-like rows only.")


def test_a_pool_that_never_fills_reports_no_pool_share():
  # One request at a time into a large pool: nothing ever waits, so the "while requests
  # wait" averages are undefined (None in the tables), the all-steps share is not.
  config = _mw_config(arrival_rate=0.001, num_requests=5, block_sizes=(4,))
  serving = next(t for t in memory_waste.run(config).tables if t.name == "serving").rows
  for row in serving:
    assert row["token_pct"] is None and row["mean_batch"] is None
    assert row["token_of_reserved_pct"] > 0


def test_memory_waste_reads_a_sharegpt_json_workload():
  import os

  path = os.path.join(os.path.dirname(__file__), "data", "sharegpt_tiny.json")
  config = _mw_config(workloads=(path,), pool_tokens=64, max_seq_len=32, block_sizes=(4,))
  tables = {t.name: t for t in memory_waste.run(config).tables}
  # max_seq_len 32 keeps the three pairs of 26, 8 and 16 tokens (50 tokens in all).
  (stats,) = tables["workloads"].rows
  assert stats["workload"] == "sharegpt_tiny.json" and stats["requests"] == 3
  snap = {r["system"]: r for r in tables["snapshot"].rows}
  assert snap["Orca (Oracle)"]["tokens"] == 50
  assert snap["paged (block 4)"]["reserved_slots"] == 28 + 8 + 16


def test_a_request_as_large_as_the_pool_is_admitted_despite_the_watermark():
  # 100 blocks of 1 with a 10% watermark: one request needs every block; with nothing
  # running the watermark must not lock it out.
  stats = _serving.simulate(_serving.PagedPool(1, 100, watermark=0.1), np.array([[60, 40]]))
  assert stats.steps == 41 and stats.preemptions == 0


def test_batch_capacity_says_the_max_row_holds_by_construction():
  import importlib.util
  import os

  from experiments import batch_capacity

  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "batch_capacity.py")
  spec = importlib.util.spec_from_file_location("config_batch_capacity", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  # The seed's setting: a budget of exactly four 8,192-token reservations at 800 KiB each.
  config = module.get_config("seed")
  config.num_requests = 40
  config.engine.requests = 0
  result = batch_capacity.run(config)
  rows = {r["system"]: r for r in result.tables[0].rows}
  assert rows["Orca (Max)"]["pool_tokens"] == 4 * 8192
  assert rows["Orca (Max)"]["static_capacity"] == 4
  assert "Orca (Max) fits 4 = 32768 // 8192 requests by construction" in " ".join(result.notes)
  assert "(sharegpt lengths)" in result.tables[0].caption


def test_decode_time_rows_time_plain_and_cascade_on_the_config_scenario():
  timing = ConfigDict(
    dict(
      repeats=5,
      inner=1,
      backend="auto",
      users=0,
      shared_len=0,
      own_len=0,
      num_q_heads=4,
      num_kv_heads=2,
      head_dim=16,
      dtype="float32",
    )
  )
  (row,) = prefix_sharing.decode_time_rows(_ps_config(timing=timing), 16)
  # users, shared and own tokens from the scenario (4 users, 40 + (3 + 5)); on CPU the
  # reference backend; one group of all 4 users on the prompt's 2 full blocks.
  assert (row["users"], row["shared_len"], row["own_len"]) == (4, 40, 8)
  assert row["backend"] == "reference" and row["groups"] == 1
  assert row["max_abs_diff"] < 1e-5
  assert row["plain_repeats"] == row["cascade_repeats"] == 5
  assert row["plain_min_ms"] <= row["plain_ms"] <= row["plain_max_ms"]
  assert row["cascade_vs_plain"] in ("faster", "slower", "indistinguishable")
  # Without a timing block (or with repeats 0) there is no time axis.
  assert prefix_sharing.decode_time_rows(_ps_config(), 16) == []
  timing.repeats = 0
  assert prefix_sharing.decode_time_rows(_ps_config(timing=timing), 16) == []
