"""Experiment 2e: the cost of preempting a sequence, by swapping against recomputing.

Microbenchmark (the paper's Figure 19a), on the device present, per block size and per
sequence length ``L``:

* ``swap out``: ``paxcache.cache.swap_out`` of the sequence's ``ceil(L / block_size)``
  blocks (scattered over the pool) to a host pool; ``swap in``: ``paxcache.cache.swap_in``
  back to fresh device blocks. Both move every layer's K and V.
* ``recompute``: one jitted prefill of the ``L`` tokens through ``paxcache.nn.Decoder``
  over the paged cache (what the engine runs to rebuild a preempted sequence's K/V).

Each time is the median of ``iters`` calls after a warm-up, with its min-max spread
(:func:`experiments._timing.time_calls`); swap's interval adds the ends of swap out's and
swap in's, and the ``swap vs recompute`` column says ``faster`` or ``slower`` only where the
intervals of swap and recompute separate (else ``indistinguishable``). The paper found swapping
expensive at small block sizes (many small PCIe copies) and recomputation flat in the
block size, crossing over around block sizes 16-64. paxcache's swap gathers all the
blocks of one sequence into a single array and crosses once, so small blocks cost it
index work, not extra transfers; on CPU "host" and "device" memory are the same RAM.

End to end (the paper's Figure 19b: serving throughput with each preemption mode):
``config.engine.requests > 0`` pushes scaled-down workload requests through the engine
in a pool small enough to preempt, once per block size and mode.
"""

from __future__ import annotations

import functools

import numpy as np
from absl import logging
from ml_collections import ConfigDict

from experiments import _timing
from experiments._outputs import Column, Plot, Result, Table, plain_ticks


def _ms_fields(name: str, lo: float, med: float, hi: float) -> dict:
  """``{name}_ms`` (median), ``{name}_min_ms``, ``{name}_max_ms`` and the spread's text."""
  lo, med, hi = (round(x * 1e3, 3) for x in (lo, med, hi))
  return {
    f"{name}_ms": med,
    f"{name}_min_ms": lo,
    f"{name}_max_ms": hi,
    f"{name}_spread_ms": _timing.range_text(lo, hi, ".3f"),
  }


def _model(config: ConfigDict, max_seq_len: int):
  from flax import nnx

  from paxcache.nn import Decoder, DecoderConfig

  model_config = DecoderConfig(
    vocab_size=config.vocab_size,
    d_model=config.d_model,
    num_layers=config.num_layers,
    num_q_heads=config.num_q_heads,
    num_kv_heads=config.num_kv_heads,
    head_dim=config.head_dim,
    mlp_dim=config.mlp_dim,
    max_seq_len=max_seq_len,
    dtype=config.dtype,
  )
  return Decoder(model_config, rngs=nnx.Rngs(config.seed))


def measure(config: ConfigDict, block_size: int, seq_len: int, model) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from paxcache import cache as cache_ops

  rng = np.random.default_rng([config.seed, block_size, seq_len])
  nb = -(-seq_len // block_size)
  num_blocks = 2 * nb + 8  # room for a second copy (swap in) and some spread
  kv_cache = model.init_cache(num_blocks, block_size)
  host = cache_ops.HostKVPool.like(kv_cache, nb)
  ids = rng.permutation(num_blocks)
  src, dst = ids[:nb].astype(np.int32), ids[nb : 2 * nb].astype(np.int32)
  host_ids = np.arange(nb)

  def swap_out():
    cache_ops.swap_out(kv_cache, host, src, host_ids)

  state = {"cache": kv_cache}

  def swap_in():
    state["cache"] = cache_ops.swap_in(state["cache"], host, host_ids, dst)
    jax.block_until_ready(state["cache"])

  t_out = _timing.time_calls(swap_out, repeats=config.iters)  # one warm-up call compiles
  t_in = _timing.time_calls(swap_in, repeats=config.iters)

  graphdef, params = nnx.split(model)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def prefill(params, kv, tokens, positions, block_table, lengths, slots, cu, last):
    m = nnx.merge(graphdef, params)
    return m(
      tokens,
      positions,
      kv,
      block_table=block_table,
      lengths=lengths,
      slot_mapping=slots,
      cu_q_lens=cu,
      logit_rows=last,
    )

  pos = np.arange(seq_len)
  table = src
  args = (
    jnp.asarray(rng.integers(0, config.vocab_size, seq_len), jnp.int32),
    jnp.asarray(pos, jnp.int32),
    jnp.asarray(table[None, :]),
    jnp.asarray([seq_len], jnp.int32),
    jnp.asarray(table[pos // block_size] * block_size + pos % block_size, jnp.int32),
    jnp.asarray([0, seq_len], jnp.int32),
    jnp.asarray([seq_len - 1], jnp.int32),
  )

  def recompute():
    logits, state["cache"] = prefill(params, state["cache"], *args)
    jax.block_until_ready(logits)

  t_re = _timing.time_calls(recompute, repeats=config.iters)
  itemsize = jnp.dtype(config.dtype).itemsize
  kv_bytes = 2 * config.num_layers * config.num_kv_heads * nb * block_size * config.head_dim
  # Swap out then in: medians add; the interval adds the ends (both at their fastest, slowest).
  swap = (t_out.min + t_in.min, t_out.median + t_in.median, t_out.max + t_in.max)
  return {
    "block_size": block_size,
    "seq_len": seq_len,
    "blocks": nb,
    **_ms_fields("swap_out", t_out.min, t_out.median, t_out.max),
    **_ms_fields("swap_in", t_in.min, t_in.median, t_in.max),
    **_ms_fields("swap", *swap),
    **_ms_fields("recompute", t_re.min, t_re.median, t_re.max),
    "swap_over_recompute": round(swap[1] / t_re.median, 3),
    "swap_vs_recompute": _timing.compare((swap[0], swap[2]), t_re),
    "repeats": config.iters,
    "kv_mib": round(kv_bytes * itemsize / 2**20, 2),
  }


def run(config: ConfigDict) -> Result:
  from experiments._kernel_timing import device_label

  device = device_label()
  model = _model(config, max(config.seq_lens))
  rows = []
  for seq_len in config.seq_lens:
    for bs in config.block_sizes:
      row = measure(config, bs, seq_len, model)
      row["device"] = device
      rows.append(row)
      logging.info("swap vs recompute: %s", row)
  tables = [
    Table(
      "preemption_cost",
      [
        Column("seq_len", "tokens"),
        Column("block_size", "block"),
        Column("blocks"),
        Column("swap_out_ms", "swap out ms", ".3f"),
        Column("swap_in_ms", "swap in ms", ".3f"),
        Column("swap_spread_ms", "swap min-max ms"),
        Column("recompute_ms", "recompute ms", ".3f"),
        Column("recompute_spread_ms", "recompute min-max ms"),
        Column("swap_over_recompute", "swap / recompute", ".2f"),
        Column("swap_vs_recompute", "swap vs recompute"),
        Column("kv_mib", "K/V MiB", ".2f"),
      ],
      rows,
      caption=(
        f"Preempting one sequence on {device}: swap out + in of its blocks against a "
        f"prefill of its tokens (model d_model {config.d_model}, {config.num_layers} layers, "
        f"{config.num_q_heads}/{config.num_kv_heads} heads x {config.head_dim}, {config.dtype}); "
        f"medians of {config.iters} calls with min-max; swap is faster or slower than "
        f"recompute only where the two intervals separate."
      ),
    )
  ]
  notes = [
    "Paper (Figure 19a, OPT-13B on an A100 over PCIe): swap latency falls with the block "
    "size, recomputation is flat, and they cross between block sizes 16 and 64.",
  ]
  plots = [Plot("preemption_cost", lambda ax: _plot(ax, rows), (8.0, 4.0))]
  if config.engine.requests > 0:
    from experiments import _engine_bench, workloads

    lengths = workloads.workload_lengths(
      config.workload, 4 * config.engine.requests, max_seq_len=2048, seed=config.seed
    )
    engine_rows = _engine_bench.preemption_throughput(config, lengths)
    compare_modes(engine_rows)
    plots.append(Plot("engine_preemption", lambda ax: _plot_engine(ax, engine_rows), (8.5, 4.0)))
    tables.append(
      Table(
        "engine_preemption",
        [
          Column("block_size", "block"),
          Column("engine_block_size", "engine block"),
          Column("mode"),
          Column("tokens_per_s", "generated tokens/s", ".1f"),
          Column("tokens_per_s_spread", "min-max"),
          Column("vs_other_mode", "vs the other mode"),
          Column("preemptions", "preempted"),
          Column("recomputed_tokens", "recomputed tokens"),
          Column("swapped_blocks", "blocks swapped"),
          Column("steps"),
          Column("device"),
        ],
        engine_rows,
        caption=(
          f"Engine throughput with each preemption mode ({config.workload} lengths and block "
          f"sizes / {config.engine.length_scale:g}: 'engine block' runs on the scaled lengths; "
          f"{config.engine.pool_tokens}-slot pool of scaled tokens; median of "
          f"{config.engine.repeats} passes, min-max; a mode is faster or slower than the other "
          "at the same block only where their min-max ranges separate)."
        ),
      )
    )
  else:
    notes.append(
      "End-to-end throughput with each preemption mode: not measured in this run (set "
      "--config.engine.requests=N)."
    )
  return Result(tables, plots, notes)


def compare_modes(rows: list[dict]) -> None:
  """Sets ``vs_other_mode`` on every engine row: ``"faster"`` or ``"slower"`` (in tokens/s)
  than the other preemption mode at the same block size where the min-max ranges of their
  passes separate, else ``"indistinguishable"``."""
  by_block: dict[int, dict[str, dict]] = {}
  for r in rows:
    by_block.setdefault(r["block_size"], {})[r["mode"]] = r
  for modes in by_block.values():
    for mode, r in modes.items():
      other = [o for m, o in modes.items() if m != mode]
      if not other:
        r["vs_other_mode"] = None
        continue
      o = other[0]
      # compare() calls the smaller interval "faster"; for a rate the larger is faster.
      verdict = _timing.compare(
        (r["tokens_per_s_min"], r["tokens_per_s_max"]),
        (o["tokens_per_s_min"], o["tokens_per_s_max"]),
      )
      r["vs_other_mode"] = {"faster": "slower", "slower": "faster"}.get(verdict, verdict)


def _plot_engine(ax, rows: list[dict]) -> None:
  """Generated tokens/s per block size for each preemption mode (median, min-max bars)."""
  styles = {"swap": ("o-", "C0"), "recompute": ("s--", "C1")}
  modes = list(dict.fromkeys(r["mode"] for r in rows))
  for i, mode in enumerate(modes):
    sel = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["block_size"])
    fmt, color = styles.get(mode, ("^:", "C2"))
    # Each mode a little left or right of its block size (a log axis: a factor), so that
    # the two modes' min-max bars at one block size do not hide each other.
    dodge = 2.0 ** (0.12 * (i - (len(modes) - 1) / 2))
    _timing.errorbar(
      ax,
      [r["block_size"] * dodge for r in sel],
      [r["tokens_per_s"] for r in sel],
      [r["tokens_per_s_min"] for r in sel],
      [r["tokens_per_s_max"] for r in sel],
      fmt=fmt,
      color=color,
      label=f"{mode}, median and min-max of {sel[0]['repeats']} passes",
    )
  ax.set_xscale("log", base=2)
  ax.set_xlabel("block size (tokens, real lengths)")
  ax.set_ylabel("generated tokens/s")
  ax.set_ylim(bottom=0)
  plain_ticks(ax, x=[r["block_size"] for r in rows])
  ax.set_title(f"Engine throughput per preemption mode ({rows[0]['device'] if rows else ''})")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _plot(ax, rows: list[dict]) -> None:
  for i, seq_len in enumerate(dict.fromkeys(r["seq_len"] for r in rows)):
    sel = [r for r in rows if r["seq_len"] == seq_len]
    bs = [r["block_size"] for r in sel]
    for name, fmt, label in (("swap", "o-", "swap out+in"), ("recompute", "s--", "recompute")):
      _timing.errorbar(
        ax,
        bs,
        [r[f"{name}_ms"] for r in sel],
        [r[f"{name}_min_ms"] for r in sel],
        [r[f"{name}_max_ms"] for r in sel],
        fmt=fmt,
        color=f"C{i}",
        label=f"{label}, {seq_len} tokens",
      )
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("block size (tokens)")
  ax.set_ylabel("latency (ms; median, min-max bars)")
  plain_ticks(ax, x=[r["block_size"] for r in rows])
  ax.set_title("Preemption cost per sequence")
  # Outside the axes: a min-max bar is no obstacle to matplotlib's "best" placement.
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
