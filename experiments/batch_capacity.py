"""Experiment 2c: how many requests fit one KV memory budget, contiguous against paged.

The budget is given in bytes for a model shape (default: OPT-13B, 40 layers x 40 KV heads
x 128 dims in float16 = 800 KiB per token, with 12 GiB for KV as on a 40 GB A100), and
turned into token slots. Per system (Orca's three contiguous policies, paged at
``block_size``) we report

* ``static``: requests of the workload, at their final lengths, packed in arrival order
  until the next one does not fit (contiguous: its reservation; paged: its blocks,
  through the real allocator);
* ``serving``: the mean and largest number of requests running at once in the serving
  simulation of :mod:`experiments._serving` while requests wait for memory (one token per
  running request per step: the throughput a memory-bound server gets while memory binds,
  before step time grows with the batch), and the tokens generated per step over the whole
  run, the drain after the last admission included (where few long requests finish alone,
  that drain's steps, set by the longest output, weigh in as much as the others);
* ``charged``: the same run with every step charged by the config's step-cost model
  (:mod:`experiments._cost_config`; default the CPU default, 1 ms per computed token):
  prompt tokens prefilled, tokens recomputed after preemptions (count and share of the
  prompt tokens), simulated seconds and generated tokens per simulated second;
* ``engine`` (when ``config.engine.requests > 0``): measured tokens/s of the real engine
  (:mod:`experiments._engine_bench`) on the device present, with a small model, lengths
  scaled down and a pool of ``config.engine.pool_tokens``: paged against the same engine
  with its batch capped at what contiguous ``max_seq_len`` reservation would fit.

With ``config.kv_dtype_axis`` (default bfloat16, int8, float8_e4m3fn) the paged system is
also simulated in the same bytes at each of those K/V dtypes (8-bit: scales counted, a
float32 K and V scale per token and KV head): the ``kv_dtype`` table.

The seed claims "4 requests" contiguous against "20-30" paged; the paper reports 2-4x
more requests batched (and 2-4x throughput at the same latency) than Orca.
"""

from __future__ import annotations

import math

import numpy as np
from absl import logging
from ml_collections import ConfigDict

import kernels
from experiments import _serving, _timing, workloads
from experiments._cost_config import describe, step_cost
from experiments._outputs import Column, Plot, Result, Table, plain_ticks


def kv_bytes_per_token(config: ConfigDict, kv_dtype: str | None = None) -> int:
  """K and V for every layer and KV head: ``2 * layers * kv_heads * head_dim * bytes``,
  plus ``2 * layers * kv_heads * 4`` of scales for 8-bit dtypes (``kernels.kv_bytes_per_token``);
  ``kv_dtype`` None: ``config.kv_dtype``."""
  return kernels.kv_bytes_per_token(
    config.num_layers, config.num_kv_heads, config.head_dim, kv_dtype or config.kv_dtype
  )


def pool_tokens(config: ConfigDict, kv_dtype: str | None = None) -> int:
  return int(config.kv_budget_gib * 2**30 // kv_bytes_per_token(config, kv_dtype))


def static_capacity(policy: str, lengths: np.ndarray, pool: int, config: ConfigDict) -> int:
  """Requests, in order, at their final lengths, that fit before the first that does not."""
  if policy == "paged":
    from paxcache.allocator import BlockAllocator, OutOfBlocksError

    alloc = BlockAllocator(
      num_blocks=pool // config.block_size,
      block_size=config.block_size,
      enable_prefix_caching=False,
    )
    for i, (p, o) in enumerate(lengths):
      try:
        alloc.add_sequence(i, np.zeros(int(p + o), np.int64))
      except OutOfBlocksError:
        return i
    return len(lengths)
  used = 0
  for i, (p, o) in enumerate(lengths):
    used += _serving.contiguous_reservation(policy, int(p), int(o), config.max_seq_len)
    if used > pool:
      return i
  return len(lengths)


def _serving_row(stats: _serving.ServingStats, lengths: np.ndarray) -> dict:
  """The counts and charged time every serving table reports."""
  shares = stats.shares()
  generated = int(lengths[:, 1].sum())
  prompt = int(lengths[:, 0].sum())
  sim_s = stats.sim_ms / 1e3
  return {
    "mean_batch": None if math.isnan(shares["mean_batch"]) else round(shares["mean_batch"], 1),
    "max_batch": stats.max_batch,
    "tokens_per_step": round(generated / stats.steps, 2),
    "steps": stats.steps,
    "preemptions": stats.preemptions,
    "generated_tokens": generated,
    "prompt_tokens": prompt,
    "recomputed_tokens": stats.recomputed_tokens,
    "recomputed_share": round(stats.recomputed_tokens / prompt, 3) if prompt else None,
    "kv_tokens_read": stats.kv_tokens,
    "sim_s": round(sim_s, 3),
    "tokens_per_sim_s": round(generated / sim_s, 1) if sim_s else None,
    "cost_model": stats.cost_model,
  }


def run(config: ConfigDict) -> Result:
  cost, fit = step_cost(config)
  pool = pool_tokens(config)
  lengths = workloads.workload_lengths(
    config.workload, config.num_requests, max_seq_len=config.max_seq_len, seed=config.seed
  )
  label = workloads.workload_label(config.workload)
  logging.info(
    "KV budget %.1f GiB at %d bytes/token = %d token slots",
    config.kv_budget_gib,
    kv_bytes_per_token(config),
    pool,
  )
  rows = []
  for policy in (*config.contiguous_policies, "paged"):
    if policy == "paged":
      sim_pool = _serving.PagedPool(config.block_size, pool, config.watermark)
      name = f"paged (block {config.block_size})"
    else:
      sim_pool = _serving.ContiguousPool(policy, pool, config.max_seq_len)
      name = _serving.PAPER_NAMES[policy]
    stats = _serving.simulate(sim_pool, lengths, cost=cost, desc=f"{label} {name}")
    rows.append(
      {
        "workload": label,
        "system": name,
        "policy": policy,
        "static_capacity": static_capacity(policy, lengths, pool, config),
        **_serving_row(stats, lengths),
        "pool_tokens": pool,
      }
    )
  base = rows[0]
  for row in rows:
    row["speedup_vs_first"] = round(row["tokens_per_step"] / base["tokens_per_step"], 2)
    row["speedup_vs_first_per_sim_s"] = round(row["tokens_per_sim_s"] / base["tokens_per_sim_s"], 2)
  charged = describe(cost, fit)

  tables = [
    Table(
      "capacity",
      [
        Column("workload"),
        Column("system"),
        Column("static_capacity", "fit at final length"),
        Column("mean_batch", "mean batch (serving)", ".1f"),
        Column("max_batch", "max batch"),
        Column("tokens_per_step", "tokens / step", ".2f"),
        Column("speedup_vs_first", f"x {rows[0]['system']} (per step)", ".2f"),
        Column("preemptions", "preempted"),
        Column("recomputed_tokens", "recomputed tokens"),
        Column("recomputed_share", "recomputed / prompt", ".3f"),
        Column("sim_s", "simulated s", ".1f"),
        Column("tokens_per_sim_s", "tokens / simulated s", ".1f"),
        Column("speedup_vs_first_per_sim_s", f"x {rows[0]['system']} (per sim. s)", ".2f"),
      ],
      rows,
      caption=(
        f"Requests ({label} lengths) that fit {config.kv_budget_gib} GiB of KV ({pool} token "
        f"slots at {kv_bytes_per_token(config)} bytes per token), max_seq_len "
        f"{config.max_seq_len}; {rows[0]['prompt_tokens']} prompt and "
        f"{rows[0]['generated_tokens']} generated tokens; mean batch over the steps where "
        "requests wait, tokens / step over every step (the drain after the last admission "
        "included). Simulated seconds charge every step "
        f"(prompt prefill, recomputation after preemption, decode) by {charged}."
      ),
    )
  ]
  notes = [
    f"Step-cost model charging the serving simulation: {cost.as_dict()}.",
    "Seed: 4 requests contiguous against 20-30 paged. Paper: vLLM batches 2-4x more "
    "requests than Orca and serves 2-4x the throughput at the same latency.",
  ]
  if "max" in config.contiguous_policies:
    notes.append(
      f"Orca (Max) fits {pool // config.max_seq_len} = {pool} // {config.max_seq_len} "
      "requests by construction: each reserves max_seq_len slots whatever its length, so "
      "that row checks the arithmetic of the budget; it is not a measured result."
    )
  if config.engine.requests > 0:
    from experiments import _engine_bench

    engine_rows = _engine_bench.capacity_throughput(config, lengths)
    tables.append(
      Table(
        "engine_throughput",
        [
          Column("system"),
          Column("batch_cap", "batch cap"),
          Column("engine_block_size", "engine block"),
          Column("tokens_per_s", "generated tokens/s", ".1f"),
          Column("tokens_per_s_spread", "min-max"),
          Column("mean_batch", "tokens / step", ".1f"),
          Column("max_batch", "max batch"),
          Column("preemptions", "preempted"),
          Column("recomputed_tokens", "recomputed tokens"),
          Column("requests"),
          Column("device"),
        ],
        engine_rows,
        caption=(
          f"Engine throughput in a {config.engine.pool_tokens}-slot pool, lengths and block size /"
          f" {config.engine.length_scale:g}, model max_seq_len {config.engine.max_seq_len}; the "
          "contiguous row is the paged engine with its batch capped at pool // max_seq_len; "
          f"tokens/s: median of {config.engine.repeats} passes, with their min-max."
        ),
      )
    )
    notes += engine_claims(engine_rows)
  else:
    notes.append("Engine throughput: not measured in this run (config.engine.requests = 0).")
  if config.get("kv_dtype_axis"):
    tables.append(_kv_dtype_table(config, lengths, label, cost, charged))
  plots = [Plot("capacity", lambda ax: _plot(ax, rows, f"{config.kv_budget_gib:g} GiB", label))]
  return Result(tables, plots, notes)


def engine_claims(rows: list[dict]) -> list[str]:
  """Paged against the capped engine: a difference in tokens/s only where the min-max
  ranges of their passes separate; tokens per step are counts."""
  if len(rows) < 2:
    return []
  a, b = rows[0], rows[-1]
  ra, rb = (
    (a["tokens_per_s_min"], a["tokens_per_s_max"]),
    (b["tokens_per_s_min"], b["tokens_per_s_max"]),
  )
  verdict = _timing.rate_verdict(rb, ra)
  return [
    f"Engine: {b['system']} serves {b['mean_batch'] / a['mean_batch']:.2f}x the tokens per "
    f"step of {a['system']} (counts) and is {verdict} it in generated tokens/s "
    f"({b['tokens_per_s']:.1f}, min-max {_timing.range_text(*rb, '.1f')}, against "
    f"{a['tokens_per_s']:.1f}, {_timing.range_text(*ra, '.1f')}; {a['repeats']} passes each, "
    f"{a['device']})."
  ]


def _kv_dtype_table(
  config: ConfigDict, lengths: np.ndarray, label: str, cost, charged: str
) -> Table:
  """Paged at ``config.block_size`` in the same bytes at each K/V dtype of the axis."""
  rows = []
  for kv_dtype in config.kv_dtype_axis:
    pool = pool_tokens(config, kv_dtype)
    sim_pool = _serving.PagedPool(config.block_size, pool, config.watermark)
    stats = _serving.simulate(sim_pool, lengths, cost=cost, desc=f"{label} paged {kv_dtype}")
    rows.append(
      {
        "kv_dtype": kv_dtype,
        "bytes_per_token": kv_bytes_per_token(config, kv_dtype),
        "pool_tokens": pool,
        **_serving_row(stats, lengths),
      }
    )
  base = next((r for r in rows if r["kv_dtype"] == "bfloat16"), rows[0])
  for row in rows:
    row["tokens_vs_" + base["kv_dtype"]] = round(row["pool_tokens"] / base["pool_tokens"], 3)
  return Table(
    "kv_dtype",
    [
      Column("kv_dtype", "K/V dtype"),
      Column("bytes_per_token", "bytes / token"),
      Column("pool_tokens", "token slots"),
      Column("tokens_vs_" + base["kv_dtype"], f"x {base['kv_dtype']} slots", ".3f"),
      Column("mean_batch", "mean batch (serving)", ".1f"),
      Column("max_batch", "max batch"),
      Column("tokens_per_step", "tokens / step", ".2f"),
      Column("preemptions", "preempted"),
      Column("recomputed_tokens", "recomputed tokens"),
      Column("recomputed_share", "recomputed / prompt", ".3f"),
      Column("sim_s", "simulated s", ".1f"),
      Column("tokens_per_sim_s", "tokens / simulated s", ".1f"),
    ],
    rows,
    caption=(
      f"Paged (block {config.block_size}) in the same {config.kv_budget_gib} GiB at each K/V "
      "dtype; 8-bit bytes count a float32 K and V scale per token and KV head "
      f"(head_dim {config.head_dim}: {config.head_dim} data bytes + 4 scale bytes per head "
      f"for each of K and V). Simulated seconds charge every step by {charged}."
    ),
  )


def _plot(ax, rows: list[dict], budget: str, workload: str) -> None:
  x = np.arange(len(rows))
  ax.bar(x - 0.2, [r["static_capacity"] for r in rows], 0.4, label="fit at final length")
  ax.bar(x + 0.2, [r["mean_batch"] or 0 for r in rows], 0.4, label="mean batch while serving")
  ax.set_xticks(x, [r["system"] for r in rows], rotation=20, ha="right", fontsize=8)
  ax.set_ylabel("requests")
  plain_ticks(ax)
  ax.set_title(f"Requests per {budget} KV budget ({workload} lengths)")
  ax.legend(fontsize=8)
