"""Every experiment's plots are ones a paper would take: a legend entry for every line and
fill style, no overlapping labels, plain tick labels."""

import importlib.util
import itertools
import os

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from experiments import _outputs, run  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(name, variant, **overrides):
  path = os.path.join(REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  config.update(overrides)
  return config


# Each experiment at a size that runs in seconds; the plots see the same row keys as in a
# full run.
CASES = {
  "memory_waste": dict(num_requests=60, pool_tokens=1024, max_seq_len=256, block_sizes=(1, 16, 64)),
  "prefix_sharing": dict(num_users=4, system_prompt_len=40, num_requests=5, max_seq_len=256),
  "batch_capacity": dict(num_requests=60),
  "block_size_ablation": dict(
    num_requests=40,
    max_seq_len=256,
    pool_tokens=512,
    block_sizes=(4, 16, 64),
    kernel_batch=2,
    kernel_context=64,
    num_q_heads=2,
    num_kv_heads=1,
    head_dim=8,
    kernel_iters=1,
  ),
  "swap_vs_recompute": dict(
    block_sizes=(4, 16, 64), seq_lens=(64,), iters=1, d_model=32, mlp_dim=64, num_q_heads=2
  ),
}


def test_plain_number_hand_worked():
  assert [_outputs.plain_number(v) for v in (16, 1024.0, 510400, 1e6)] == [
    "16",
    "1,024",
    "510,400",
    "1,000,000",
  ]
  assert [_outputs.plain_number(v) for v in (0.25, 0.1 + 0.2, 3e-5, 2.5)] == [
    "0.25",
    "0.3",
    "0.00003",
    "2.5",
  ]


def test_plain_ticks_on_log_axes_print_the_numbers():
  fig, ax = plt.subplots()
  try:
    ax.plot([1, 4, 16, 64, 256], [2.9, 0.93, 0.97, 0.83, 0.6])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _outputs.plain_ticks(ax, x=[1, 4, 16, 64, 256])
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "4", "16", "64", "256"]
    assert [t.get_text() for t in ax.xaxis.get_minorticklabels()] == []  # no 2^k between
    lo, hi = ax.get_ylim()
    shown = [
      t.get_text()
      for t in ax.yaxis.get_majorticklabels() + ax.yaxis.get_minorticklabels()
      if t.get_text() and lo <= t.get_position()[1] <= hi
    ]
    # Less than one decade shows: matplotlib labels some minor ticks; all read as numbers.
    assert "1" in shown and {"0.6", "2", "3"} <= set(shown)
    assert all(float(s) for s in shown)
  finally:
    plt.close(fig)


def _style(line):
  return (to_hex(line.get_color()), line.get_linestyle(), line.get_marker())


def _check_axes(ax, where):
  fig = ax.figure
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  legend = ax.get_legend()
  handles = legend.legend_handles if legend is not None else []
  # Every line style drawn (colour, dashes, marker) has a legend entry of that style.
  drawn = {_style(line) for line in ax.lines}
  listed = {_style(h) for h in handles if isinstance(h, matplotlib.lines.Line2D)}
  assert drawn <= listed or (len(drawn) == 1 and legend is None), (where, drawn - listed)
  # Every fill (bars, shaded ranges) has an entry of its colour, unless there is one only.
  fills = {to_hex(p.get_facecolor(), keep_alpha=True) for p in ax.patches}
  listed = {
    to_hex(h.get_facecolor(), keep_alpha=True)
    for h in handles
    if isinstance(h, matplotlib.patches.Patch)
  }
  assert fills <= listed or (len(fills) == 1 and legend is None), (where, fills - listed)
  # Plain tick labels: numbers or category names, no powers, exponents or offsets.
  for axis in (ax.xaxis, ax.yaxis):
    assert axis.get_offset_text().get_text() == "", where
    for label in axis.get_majorticklabels() + axis.get_minorticklabels():
      text = label.get_text()
      assert not any(s in text for s in ("$", "^", "\N{MULTIPLICATION SIGN}", "e+", "e-")), (
        where,
        text,
      )
  # No two texts drawn in the axes (value labels, line names) overlap, nor two tick labels.
  texts = [t for t in ax.texts if t.get_text()]
  for a, b in itertools.combinations(texts, 2):
    ea, eb = a.get_window_extent(renderer), b.get_window_extent(renderer)
    assert not ea.overlaps(eb), (where, a.get_text(), b.get_text())
  for axis in (ax.xaxis, ax.yaxis):
    lo, hi = sorted(axis.get_view_interval())
    ticks = [
      t
      for t in axis.get_majorticklabels() + axis.get_minorticklabels()
      if t.get_text() and lo <= t.get_position()[axis is ax.yaxis] <= hi
    ]
    for a, b in itertools.combinations(ticks, 2):
      ea, eb = a.get_window_extent(renderer), b.get_window_extent(renderer)
      assert not ea.overlaps(eb), (where, a.get_text(), b.get_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_plot_lists_its_styles_and_prints_plain_separate_labels(name):
  config = _config(name, "quick", **CASES[name])
  result = run.resolve_experiment(config.experiment)(config)
  assert result.plots, name
  for plot in result.plots:
    fig, ax = plt.subplots(figsize=plot.figsize)
    try:
      plot.draw(ax)
      fig.tight_layout()
      _check_axes(ax, f"{name}/{plot.name}")
    finally:
      plt.close(fig)


def _engine_row(block_size, median, lo, hi, **extra):
  """An engine row with the keys the engine plots read (experiments._engine_bench.measure)."""
  return dict(
    block_size=block_size,
    tokens_per_s=median,
    tokens_per_s_min=lo,
    tokens_per_s_max=hi,
    repeats=5,
    device="cpu:cpu",
    **extra,
  )


def test_engine_plots_have_error_bars_legends_and_plain_labels():
  from experiments import block_size_ablation, swap_vs_recompute

  ablation = [_engine_row(b, 1000.0 + b, 900.0 + b, 1200.0 + b) for b in (8, 16, 32, 64, 128)]
  modes = [
    _engine_row(b, m, m - 100, m + 50, mode=mode)
    for b in (8, 32, 128)
    for mode, m in (("swap", 3000.0), ("recompute", 2000.0 + b))
  ]
  for name, draw, rows, bars in (
    ("ablation", block_size_ablation._plot_engine, ablation, 1),
    ("swap", swap_vs_recompute._plot_engine, modes, 2),
  ):
    fig, ax = plt.subplots()
    try:
      draw(ax, rows)
      fig.tight_layout()
      _check_axes(ax, name)
      # One min-max bar collection per line, spanning each row's range.
      assert len(ax.collections) == bars == len(ax.lines)
      segments = [s for c in ax.collections for s in c.get_segments()]
      want = sorted((r["tokens_per_s_min"], r["tokens_per_s_max"]) for r in rows)
      assert sorted((s[0][1], s[1][1]) for s in segments) == want
      assert [t.get_text() for t in ax.get_xticklabels()] == [
        str(b) for b in sorted({r["block_size"] for r in rows})
      ]
    finally:
      plt.close(fig)
