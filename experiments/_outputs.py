"""What an experiment returns, and how the runner writes it to the workdir.

An experiment returns a :class:`Result`: named :class:`Table` objects (rows of plain
dicts) and :class:`Plot` objects (a function that draws on one matplotlib Axes).
The runner turns every table into ``<name>.csv``, ``<name>.md`` and ``<name>.tex``
(LaTeX booktabs), appends every row to ``results.jsonl`` (with a ``"table"`` key), and
saves every plot as ``<name>.png`` and ``<name>.pdf``. Tables and plots stay plain
data until written, so tests can check rows without touching files.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging


@dataclasses.dataclass(frozen=True)
class Column:
  """One table column: the row key, its printed header and a format spec for tables."""

  key: str
  header: str | None = None  # None: the key itself
  fmt: str = ""  # format spec for .md/.tex cells ("" = str()); CSV/JSON keep raw values

  @property
  def title(self) -> str:
    return self.header if self.header is not None else self.key

  def cell(self, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
      return "-"
    if self.fmt and isinstance(value, int | float):
      return format(value, self.fmt)
    return str(value)


@dataclasses.dataclass
class Table:
  """Rows of one result table.

  Attributes:
    name: file stem, e.g. ``"serving"`` -> ``serving.csv``, ``serving.md``, ``serving.tex``.
    columns: printed columns in order; rows may carry more keys (kept in CSV and JSON).
    rows: one dict per row, JSON-serialisable values.
    caption: one sentence saying what the table measures (used in .md and .tex).
  """

  name: str
  columns: Sequence[Column]
  rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  caption: str = ""

  def __post_init__(self):
    keys = [c.key for c in self.columns]
    if len(set(keys)) != len(keys):
      raise ValueError(f"table {self.name!r}: duplicate column keys in {keys}")

  def all_keys(self) -> list[str]:
    """Printed columns first, then any other key that some row carries, in first-seen order."""
    keys = [c.key for c in self.columns]
    for row in self.rows:
      for k in row:
        if k not in keys:
          keys.append(k)
    return keys


@dataclasses.dataclass
class Plot:
  """One figure: ``draw(ax)`` fills a single matplotlib Axes."""

  name: str
  draw: Callable[[Any], None]
  figsize: tuple[float, float] = (6.0, 4.0)


@dataclasses.dataclass
class Result:
  """Everything one experiment produced. ``notes`` are Markdown lines for summary.md."""

  tables: list[Table] = dataclasses.field(default_factory=list)
  plots: list[Plot] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)


# --- text renderers ---------------------------------------------------------------------------


def to_csv(table: Table) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=table.all_keys(), lineterminator="\n")
  writer.writeheader()
  for row in table.rows:
    writer.writerow({k: _csv_value(v) for k, v in row.items()})
  return buf.getvalue()


def _csv_value(v: Any) -> Any:
  if isinstance(v, list | tuple | dict):
    return json.dumps(v)
  return v


def _json_value(v: Any) -> Any:
  """NaN and infinities are not JSON; they become null."""
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def to_markdown(table: Table) -> str:
  lines = []
  if table.caption:
    lines += [f"**{table.name}**: {table.caption}", ""]
  lines.append("| " + " | ".join(c.title for c in table.columns) + " |")
  lines.append("| " + " | ".join("---" for _ in table.columns) + " |")
  for row in table.rows:
    lines.append("| " + " | ".join(c.cell(row.get(c.key)) for c in table.columns) + " |")
  return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
  "&": r"\&",
  "%": r"\%",
  "$": r"\$",
  "#": r"\#",
  "_": r"\_",
  "{": r"\{",
  "}": r"\}",
  "~": r"\textasciitilde{}",
  "^": r"\textasciicircum{}",
  "\\": r"\textbackslash{}",
}


def latex_escape(text: str) -> str:
  return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
  """A booktabs table (needs ``\\usepackage{booktabs}``); numbers right-aligned."""
  align = "".join("r" if _is_numeric_column(table, c.key) else "l" for c in table.columns)
  lines = [
    r"\begin{table}[t]",
    r"\centering",
  ]
  if table.caption:
    lines.append(r"\caption{" + latex_escape(table.caption) + "}")
  lines += [
    r"\label{tab:" + table.name.replace("_", "-") + "}",
    r"\begin{tabular}{" + align + "}",
    r"\toprule",
    " & ".join(latex_escape(c.title) for c in table.columns) + r" \\",
    r"\midrule",
  ]
  for row in table.rows:
    lines.append(" & ".join(latex_escape(c.cell(row.get(c.key))) for c in table.columns) + r" \\")
  lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
  return "\n".join(lines) + "\n"


def _is_numeric_column(table: Table, key: str) -> bool:
  values = [r.get(key) for r in table.rows if r.get(key) is not None]
  return bool(values) and all(
    isinstance(v, int | float) and not isinstance(v, bool) for v in values
  )


# --- plots -----------------------------------------------------------------------------------


def plain_number(value: float) -> str:
  """A tick label as a paper prints it: ``16``, ``1,024``, ``0.25``; never ``1e+06`` or
  ``2^4``."""
  r = round(float(value), 9)
  if r == int(r):
    return f"{int(r):,}"
  return np.format_float_positional(r, precision=6, unique=True, fractional=False, trim="-")


def plain_ticks(ax, x: Sequence[float] | None = None) -> None:
  """Plain tick labels on ``ax``'s y axis, and on its x axis at the values ``x`` (e.g. the
  block sizes swept) when given: no offset, no scientific notation, no powers of a log
  axis's base. On a log y axis the minor ticks matplotlib would label (when few decades
  show) keep their labels, as plain numbers."""
  import matplotlib.ticker as mt

  class PlainLog(mt.LogFormatter):
    def __call__(self, value, pos=None):
      return plain_number(value) if super().__call__(value, pos) else ""

  plain = mt.FuncFormatter(lambda value, _: plain_number(value))
  if ax.get_yscale() == "log":
    ax.yaxis.set_major_formatter(PlainLog(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
  else:
    ax.yaxis.set_major_formatter(plain)
  if x is not None:
    ax.set_xticks(sorted(set(x)))
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_locator(mt.NullLocator())


# --- writing to the workdir -------------------------------------------------------------------


def write_result(result: Result, workdir: str) -> list[str]:
  """Writes tables, results.jsonl, summary.md and plots into ``workdir``; returns the paths."""
  os.makedirs(workdir, exist_ok=True)
  written = []
  for kind, names in (
    ("table", [t.name for t in result.tables]),
    ("plot", [p.name for p in result.plots]),
  ):
    if len(set(names)) != len(names):
      raise ValueError(f"{kind} names must be unique (they name files), got {names}")

  jsonl_path = os.path.join(workdir, "results.jsonl")
  with open(jsonl_path, "w") as f:
    for table in result.tables:
      for row in table.rows:
        clean = {k: _json_value(v) for k, v in row.items()}
        f.write(json.dumps({"table": table.name, **clean}, allow_nan=False) + "\n")
  written.append(jsonl_path)

  for table in result.tables:
    for ext, render in (("csv", to_csv), ("md", to_markdown), ("tex", to_latex)):
      path = os.path.join(workdir, f"{table.name}.{ext}")
      with open(path, "w") as f:
        f.write(render(table))
      written.append(path)

  summary = os.path.join(workdir, "summary.md")
  with open(summary, "w") as f:
    for table in result.tables:
      f.write(to_markdown(table) + "\n")
    if result.notes:
      f.write("\n".join(result.notes) + "\n")
  written.append(summary)

  if result.plots:
    written += write_plots(result.plots, workdir)
  return written


def write_plots(plots: Sequence[Plot], workdir: str) -> list[str]:
  """Draws every plot as PNG and PDF; without matplotlib (the ``plot`` extra) it draws none
  and says so in a warning, so that the tables of a finished run are still written."""
  try:
    import matplotlib
  except ImportError:
    logging.warning(
      "matplotlib is not installed (pip install -e '.[plot]'): %d plot(s) not drawn: %s",
      len(plots),
      ", ".join(p.name for p in plots),
    )
    return []

  matplotlib.use("Agg")  # no display on CI or the device machines
  import matplotlib.pyplot as plt

  written = []
  for plot in plots:
    fig, ax = plt.subplots(figsize=plot.figsize)
    try:
      plot.draw(ax)
      fig.tight_layout()
      for ext in ("png", "pdf"):
        path = os.path.join(workdir, f"{plot.name}.{ext}")
        # No creation date in the files, so committed figures only change when the data do.
        metadata = {"CreationDate": None} if ext == "pdf" else {"Software": None}
        fig.savefig(path, dpi=150, metadata=metadata)
        written.append(path)
    finally:
      plt.close(fig)
  return written
