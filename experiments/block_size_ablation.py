"""Experiment 2d: the block-size table -- memory waste, batch, kernel time per backend.

Per block size:

* memory (per workload): share of the KV pool holding tokens and mean batch while
  requests wait, and tokens generated per step over the whole run (its drain after the
  last admission included: for Alpaca-like lengths, all admitted early, that count is
  set by the longest output, not by the block size), from the serving simulation of
  :mod:`experiments._serving` with the real allocator (the simulation of the
  memory-waste experiment's paged rows: the same numbers where both configs draw the
  same requests; their default request counts differ);
* kernel: median time of one ``kernels.paged_attention`` decode call at a fixed shape
  (every sequence at ``kernel_context`` tokens, blocks scattered over the pool) over
  ``kernel_iters`` calls, with its min-max spread, for each backend in ``config.backends``
  that runs natively here (CPU: the reference; GPU: the Pallas GPU kernel and the
  reference; TPU likewise), and the K/V bytes read per second; a note says whether the
  smallest and the largest block's intervals of the median separate (95% where the
  samples allow, else min-max, whose coverage the note states;
  :func:`experiments._timing.compare`);
* end to end (when ``config.engine.requests > 0``): the engine's generated tokens/s on
  the device present (:mod:`experiments._engine_bench`).

Small blocks waste no memory but cost more per block in the kernel (more block-table
entries, smaller tiles); large blocks waste the tail of every sequence. The paper
(Figure 18, OPT-13B) finds 16-128 best on ShareGPT and 16-32 on Alpaca.
"""

from __future__ import annotations

import itertools
import math

from absl import logging
from ml_collections import ConfigDict

from experiments import _kernel_timing, _kv_dtype, _serving, _timing, workloads
from experiments._outputs import Column, Plot, Result, Table, plain_ticks


def memory_rows(config: ConfigDict) -> list[dict]:
  rows = []
  for workload in config.workloads:
    lengths = workloads.workload_lengths(
      workload, config.num_requests, max_seq_len=config.max_seq_len, seed=config.seed
    )
    label = workloads.workload_label(workload)
    generated = int(lengths[:, 1].sum())
    for bs in config.block_sizes:
      pool = _serving.PagedPool(bs, _kv_dtype.pool_tokens(config), config.watermark)
      stats = _serving.simulate(pool, lengths, desc=f"{label} paged (block {bs})")
      shares = stats.shares()
      rows.append(
        {
          "workload": label,
          "block_size": bs,
          "token_pct": _pct(shares["token_share_of_pool"]),
          "token_of_reserved_pct": _pct(shares["token_share_of_reserved"]),
          "mean_batch": _round(shares["mean_batch"], 1),
          "tokens_per_step": round(generated / stats.steps, 2),
          "preemptions": stats.preemptions,
          "recomputed_tokens": stats.recomputed_tokens,
        }
      )
  return rows


def kernel_rows(config: ConfigDict) -> tuple[list[dict], list[str]]:
  rows, notes = [], []
  device = _kernel_timing.device_label()
  for backend, reason in _kernel_timing.available_backends(config.backends):
    if reason is not None:
      notes.append(f"Backend {backend!r} not timed here: {reason}.")
      continue
    for bs in config.block_sizes:
      res = _kernel_timing.time_decode(
        backend,
        bs,
        batch=config.kernel_batch,
        context=config.kernel_context,
        num_q_heads=config.num_q_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=config.kernel_dtype,
        kv_dtype=config.get("kernel_kv_dtype") or None,
        iters=config.kernel_iters,
        inner=config.get("kernel_inner", 1),
        seed=config.seed,
      )
      rows.append({"backend": backend, "block_size": bs, **res, "device": device})
      logging.info("kernel %s block %d: %s", backend, bs, res)
    notes += _kernel_claims(backend, [r for r in rows if r["backend"] == backend])
  return rows, notes


def _kernel_claims(backend: str, rows: list[dict]) -> list[str]:
  """Smallest against largest block: a difference only where the intervals of the median
  (``time_ci_lo_ms``-``time_ci_hi_ms``: min-max up to 8 calls) separate."""
  timed = [r for r in rows if r.get("time_ms") is not None]
  if len(timed) < 2:
    return []
  a, b = timed[0], timed[-1]
  ci_a, ci_b = (a["time_ci_lo_ms"], a["time_ci_hi_ms"]), (b["time_ci_lo_ms"], b["time_ci_hi_ms"])
  text = {
    "faster": "faster than",
    "slower": "slower than",
    "indistinguishable": "not distinguishable from (the intervals overlap)",
  }[_timing.compare(ci_a, ci_b)]
  _, coverage = _timing.median_interval_rank(a["time_repeats"])
  return [
    f"Decode kernel ({backend}): block {a['block_size']} (median {a['time_ms']:.4g} ms, "
    f"{coverage:.1%} interval {_timing.range_text(*ci_a)}) is {text} block "
    f"{b['block_size']} (median {b['time_ms']:.4g} ms, {_timing.range_text(*ci_b)}), over "
    f"{a['time_repeats']} samples of {a.get('inner', 1)} call(s) each."
  ]


def _samples(config: ConfigDict) -> str:
  inner = config.get("kernel_inner", 1)
  if inner == 1:
    return f"{config.kernel_iters} calls"
  return f"{config.kernel_iters} samples of {inner} calls back to back"


def engine_claims(rows: list[dict]) -> list[str]:
  """Smallest against largest block end to end: a difference in tokens/s only where the
  min-max ranges of the passes separate."""
  if len(rows) < 2:
    return []
  a, b = rows[0], rows[-1]
  ra, rb = (
    (a["tokens_per_s_min"], a["tokens_per_s_max"]),
    (b["tokens_per_s_min"], b["tokens_per_s_max"]),
  )
  text = _timing.rate_verdict(ra, rb)
  return [
    f"Engine end to end: block {a['block_size']} ({a['tokens_per_s']:.1f} generated tokens/s, "
    f"min-max {_timing.range_text(*ra, '.1f')} over {a['repeats']} passes) is {text} block "
    f"{b['block_size']} ({b['tokens_per_s']:.1f}, {_timing.range_text(*rb, '.1f')}) on "
    f"{a['device']}."
  ]


def run(config: ConfigDict) -> Result:
  memory = memory_rows(config)
  kernel, notes = kernel_rows(config)
  # The wide table a paper prints: one row per block size.
  wide = []
  labels = [workloads.workload_label(w) for w in config.workloads]
  backends = sorted({r["backend"] for r in kernel})
  for bs in config.block_sizes:
    row = {"block_size": bs}
    for r in memory:
      if r["block_size"] == bs:
        row[f"{r['workload']}_token_pct"] = r["token_pct"]
        row[f"{r['workload']}_mean_batch"] = r["mean_batch"]
    for r in kernel:
      if r["block_size"] == bs:
        row[f"{r['backend']}_ms"] = r["time_ms"]
        row[f"{r['backend']}_spread_ms"] = r.get("time_spread_ms")
    wide.append(row)
  columns = [Column("block_size", "block")]
  for wl in labels:
    columns += [
      Column(f"{wl}_token_pct", f"{wl} tokens %", ".1f"),
      Column(f"{wl}_mean_batch", f"{wl} batch", ".1f"),
    ]
  for b in backends:
    columns += [
      Column(f"{b}_ms", f"{b} decode ms", ".3f"),
      Column(f"{b}_spread_ms", f"{b} min-max ms"),
    ]
  shape = (
    f"batch {config.kernel_batch} x {config.kernel_context} tokens, {config.num_q_heads}/"
    f"{config.num_kv_heads} heads, head_dim {config.head_dim}, {config.kernel_dtype}"
    + (f" q, {config.kernel_kv_dtype} K/V" if config.get("kernel_kv_dtype") else "")
  )
  tables = [
    Table(
      "ablation",
      columns,
      wide,
      caption=(
        f"Per block size: share of a pool of {_kv_dtype.pool_label(config)} holding tokens and "
        f"mean batch while serving; decode kernel time ({shape}; median of "
        f"{_samples(config)} and min-max) on "
        f"{kernel[0]['device'] if kernel else 'no backend'}."
      ),
    ),
    Table(
      "memory",
      [
        Column("workload"),
        Column("block_size", "block"),
        Column("token_pct", "tokens % of pool", ".1f"),
        Column("token_of_reserved_pct", "tokens % of reserved", ".1f"),
        Column("mean_batch", "mean batch", ".1f"),
        Column("tokens_per_step", "tokens / step", ".2f"),
        Column("preemptions", "preempted"),
        Column("recomputed_tokens", "recomputed tokens"),
      ],
      memory,
      caption=(
        "Paged allocation per block size in the serving simulation: tokens % of pool and "
        "mean batch over the steps where requests wait for memory, tokens / step over every "
        "step (the drain after the last admission included, which the longest output sets "
        "where all requests are admitted early)."
      ),
    ),
    Table(
      "kernel_time",
      [
        Column("backend"),
        Column("block_size", "block"),
        Column("time_ms", "ms", ".3f"),
        Column("time_spread_ms", "min-max ms"),
        Column("time_repeats", "samples"),
        Column("gbps", "K/V GB/s", ".1f"),
        Column("status"),
        Column("device"),
      ],
      kernel,
      caption=(
        f"Median decode time per call over {_samples(config)} with its min-max "
        f"spread ({shape}), blocks scattered."
      ),
    ),
  ]
  plots = [
    Plot("memory_vs_block_size", lambda ax: _plot_memory(ax, memory)),
    Plot("kernel_time_vs_block_size", lambda ax: _plot_kernel(ax, kernel), (9.0, 4.0)),
  ]
  if config.engine.requests > 0:
    from experiments import _engine_bench

    lengths = workloads.workload_lengths(
      config.workloads[0],
      4 * config.engine.requests,
      max_seq_len=config.max_seq_len,
      seed=config.seed,
    )
    engine_rows = _engine_bench.block_size_throughput(config, lengths)
    notes += engine_claims(engine_rows)
    plots.append(Plot("engine_vs_block_size", lambda ax: _plot_engine(ax, engine_rows), (9.0, 4.0)))
    tables.append(
      Table(
        "engine_throughput",
        [
          Column("block_size", "block"),
          Column("engine_block_size", "engine block"),
          Column("tokens_per_s", "generated tokens/s", ".1f"),
          Column("tokens_per_s_spread", "min-max"),
          Column("mean_batch", "tokens / step", ".1f"),
          Column("preemptions", "preempted"),
          Column("recomputed_tokens", "recomputed tokens"),
          Column("requests"),
          Column("device"),
        ],
        engine_rows,
        caption=(
          f"Engine throughput per block size ({labels[0]} lengths and block sizes / "
          f"{config.engine.length_scale:g}: 'engine block' runs on the scaled lengths; "
          f"{config.engine.pool_tokens}-slot pool of scaled tokens; median of "
          f"{config.engine.repeats} passes, min-max)."
        ),
      )
    )
  else:
    notes.append(
      "End-to-end throughput: not measured in this run (set --config.engine.requests=N)."
    )
  notes.append(
    "Paper (Figure 18, OPT-13B, serving latency on a GPU): block sizes 16-128 best on "
    "ShareGPT, 16-32 on Alpaca; below 16 the kernel underuses the GPU, above the range "
    "the tails of blocks waste memory."
  )
  notes += memory_notes(memory)
  return Result(tables, plots, notes)


def memory_notes(rows: list[dict]) -> list[str]:
  """What the memory columns alone say about the block size, per workload."""
  notes = []
  for wl in dict.fromkeys(r["workload"] for r in rows):
    sel = sorted((r for r in rows if r["workload"] == wl), key=lambda r: r["block_size"])
    pcts = [r["token_pct"] for r in sel if r["token_pct"] is not None]
    if len(pcts) < 2:
      continue
    best = max(sel, key=lambda r: r["token_pct"] if r["token_pct"] is not None else -1)
    falls = all(a >= b for a, b in itertools.pairwise(pcts))
    notes.append(
      f"Memory alone, {wl}: most tokens at block {best['block_size']} "
      f"({best['token_pct']:.1f}%), "
      + (
        "falling as blocks grow: memory always favours the smallest block. "
        if falls
        else "not falling steadily as blocks grow. "
      )
      + "The paper's lower bound of 16 comes from GPU kernel efficiency, which these "
      "columns do not measure; they do not confirm Figure 18's range."
    )
  return notes


def _pct(x: float) -> float | None:
  return None if math.isnan(x) else round(100 * x, 2)


def _round(x: float, nd: int) -> float | None:
  return None if math.isnan(x) else round(x, nd)


def _plot_memory(ax, rows: list[dict]) -> None:
  for i, wl in enumerate(dict.fromkeys(r["workload"] for r in rows)):
    sel = [r for r in rows if r["workload"] == wl]
    ax.plot(
      [r["block_size"] for r in sel],
      [r["token_pct"] for r in sel],
      "o-",
      color=f"C{i}",
      label=f"{wl}: tokens % of pool",
    )
  ax.set_xscale("log", base=2)
  ax.set_xlabel("block size (tokens)")
  ax.set_ylabel("KV pool holding tokens (%)")
  ax.set_ylim(0, 102)
  plain_ticks(ax, x=[r["block_size"] for r in rows])
  ax.legend(fontsize=8)
  ax.set_title("Memory per block size (serving simulation)")


def _plot_kernel(ax, rows: list[dict]) -> None:
  for i, backend in enumerate(dict.fromkeys(r["backend"] for r in rows)):
    sel = [r for r in rows if r["backend"] == backend and r["time_ms"] is not None]
    _timing.errorbar(
      ax,
      [r["block_size"] for r in sel],
      [r["time_ms"] for r in sel],
      [r["time_min_ms"] for r in sel],
      [r["time_max_ms"] for r in sel],
      color=f"C{i}",
      label=f"{backend} ({sel[0]['device'] if sel else ''}), median and min-max",
    )
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("block size (tokens)")
  ax.set_ylabel("decode call (ms; median, min-max bars)")
  plain_ticks(ax, x=[r["block_size"] for r in rows])
  # Outside the axes: a min-max bar is no obstacle to matplotlib's "best" placement.
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  ax.set_title("Paged attention decode time per block size")


def _plot_engine(ax, rows: list[dict]) -> None:
  """Generated tokens/s per block size (median of the passes, min-max bars)."""
  device = rows[0]["device"] if rows else ""
  _timing.errorbar(
    ax,
    [r["block_size"] for r in rows],
    [r["tokens_per_s"] for r in rows],
    [r["tokens_per_s_min"] for r in rows],
    [r["tokens_per_s_max"] for r in rows],
    color="C0",
    label=f"engine ({device}), median and min-max of {rows[0]['repeats'] if rows else 0} passes",
  )
  ax.set_xscale("log", base=2)
  ax.set_xlabel("block size (tokens, real lengths)")
  ax.set_ylabel("generated tokens/s")
  ax.set_ylim(bottom=0)
  plain_ticks(ax, x=[r["block_size"] for r in rows])
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  ax.set_title("Engine throughput per block size")
