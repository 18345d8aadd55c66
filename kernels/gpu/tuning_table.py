"""Per-card tuning tables of the GPU kernels: format, loading, lookup and the selection rule.

A table is one JSON file per card in ``kernels/gpu/tuning_tables/`` (``TABLE_DIR``)::

  {
    "format": 1,
    "device_kind": "NVIDIA H200",          # jax.devices()[0].device_kind, exactly
    "note": "...",                         # free text: how the table was made
    "entries": [
      {
        "class": "decode/w64/i2/large",    # shape_class(); one entry per class
        "block_sizes": {"decode_kv_tile": 128, "decode_num_splits": null,
                        "decode_num_warps": 4, "decode_num_stages": 3},
        "choice": "rule",                  # "rule": the rule's setting, measured and not
                                           # beaten by MARGIN; "measured": a faster one
        "source": {...}                    # where it came from: file, commit or date,
      }                                    # shapes and the measured figures
    ]
  }

A class is ``KIND/wWIDTH/iITEMSIZE[/BUCKET]``: ``KIND`` is ``decode`` (the split-K decode's
fields), ``prefill`` (the Triton prefill's) or ``mosaic`` (the Mosaic GPU prefill's);
``WIDTH`` the kernels' head-dim tile width (``padded_head_dim``); ``ITEMSIZE`` the K/V
dtype's bytes; ``BUCKET`` (decode only) ``small`` below ``LARGE_PAIRS`` (sequence, KV head)
pairs and ``large`` from there, the split today's rule makes. An entry sets only its kind's
fields (``KIND_FIELDS``; ``prefill_heads_per_program`` only as null, since it must divide
the model's GQA group, which no class keys); ``tuning.default_block_sizes`` lays the
entries of the calling card over the rule's settings, so a class without an entry keeps
the rule.

Selection (``select``), the same for tables derived from committed rows
(``python -m kernels.gpu.tuning_tables.derive``) and for tables a sweep writes
(``experiments/bench/tune_gpu.py``): settings are compared only at shapes where the rule's
setting was timed in the same process; a candidate replaces it only where it ran at every
shape it was tried (no shared-memory failure), was faster at each, had its range apart
from the rule's wherever both have one (at least one shape), and its geometric-mean
speed-up is at least ``MARGIN``; otherwise the entry keeps the rule's setting (``choice``
"rule").

This module imports nothing from paxcache or flax.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re

FORMAT = 1
TABLE_DIR = os.path.join(os.path.dirname(__file__), "tuning_tables")
LARGE_PAIRS = 128  # (sequence, KV head) pairs from which a decode call is "large"
# A candidate must beat the rule's setting by this factor (geometric mean over the shapes).
# Repeated passes of one shape on the H100 agreed within 1-2% at the large shapes
# (docs/benchmarks.md, "GPU decode"), so a smaller gain is not told apart from noise.
MARGIN = 1.03

KIND_FIELDS = {
  "decode": ("decode_kv_tile", "decode_num_splits", "decode_num_warps", "decode_num_stages"),
  "prefill": (
    "prefill_q_tile",
    "prefill_kv_tile",
    "prefill_heads_per_program",
    "prefill_num_warps",
    "prefill_num_stages",
  ),
  "mosaic": ("mosaic_kv_tile", "mosaic_num_slots"),
}
CHOICES = ("rule", "measured")
_CLASS_RE = re.compile(r"^(decode|prefill|mosaic)/w(\d+)/i(\d+)(?:/(small|large))?$")


class TuningTableError(ValueError):
  """A tuning table file that does not follow the format (the message names file and entry)."""


def shape_class(kind: str, *, width: int, itemsize: int, pairs: int | None = None) -> str:
  """The table key of a call: ``KIND/wWIDTH/iITEMSIZE`` plus ``/small`` or ``/large`` for
  decode (``pairs``: batch x KV heads; None counts as small, as the rule does)."""
  if kind not in KIND_FIELDS:
    raise ValueError(f"kind must be one of {tuple(KIND_FIELDS)}, got {kind!r}")
  key = f"{kind}/w{int(width)}/i{int(itemsize)}"
  if kind == "decode":
    key += "/large" if pairs is not None and pairs >= LARGE_PAIRS else "/small"
  return key


def parse_class(cls: str) -> tuple[str, int, int, str | None]:
  """``(kind, width, itemsize, bucket)`` of a class key (bucket None except for decode).

  Raises:
    ValueError: not a class key.
  """
  m = _CLASS_RE.match(cls) if isinstance(cls, str) else None
  if m is None or (m.group(1) == "decode") != (m.group(4) is not None):
    raise ValueError(
      f"class {cls!r} is not KIND/wWIDTH/iITEMSIZE (KIND decode, prefill or mosaic; "
      "decode with /small or /large)"
    )
  return m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)


def rule_fields(cls: str) -> dict:
  """The fields of ``cls``'s kind that ``tuning.rule_block_sizes`` gives the class (at a
  representative shape: a decode call with ``LARGE_PAIRS`` pairs or none, a prefill call
  of unknown length)."""
  from kernels.gpu.tuning import rule_block_sizes  # tuning imports this module

  kind, width, itemsize, bucket = parse_class(cls)
  dtypes = {1: "int8", 2: "bfloat16", 4: "float32"}
  if itemsize not in dtypes:
    raise ValueError(f"class {cls!r}: no K/V dtype of {itemsize} bytes")
  large = bucket == "large"
  bs = rule_block_sizes(
    head_dim=width,
    kv_dtype=dtypes[itemsize],
    decode=kind == "decode",
    batch=LARGE_PAIRS if large else None,
    num_kv_heads=1 if large else None,
  )
  return {k: getattr(bs, k) for k in KIND_FIELDS[kind]}


def _check_entry(path: str, i: int, entry) -> tuple[str, dict]:
  from kernels.gpu.tuning import BlockSizes  # tuning imports this module

  where = f"{path}: entries[{i}]"
  if not isinstance(entry, dict):
    raise TuningTableError(f"{where} must be an object, got {type(entry).__name__}")
  missing = {"class", "block_sizes", "choice", "source"} - set(entry)
  if missing:
    raise TuningTableError(f"{where} lacks {sorted(missing)}")
  cls = entry["class"]
  try:
    kind = parse_class(cls)[0]
  except ValueError as e:
    raise TuningTableError(f"{where}: {e}") from None
  bs = entry["block_sizes"]
  if not isinstance(bs, dict) or not bs:
    raise TuningTableError(f"{where} ({cls}): block_sizes must be a non-empty object")
  stray = set(bs) - set(KIND_FIELDS[kind])
  if stray:
    raise TuningTableError(
      f"{where} ({cls}): a {kind} entry sets only {KIND_FIELDS[kind]}, got {sorted(stray)}"
    )
  if bs.get("prefill_heads_per_program") is not None:
    raise TuningTableError(
      f"{where} ({cls}): prefill_heads_per_program must be null in a table: it must divide "
      "the model's GQA group, which a class does not key"
    )
  try:
    BlockSizes(**bs)
  except (TypeError, ValueError) as e:
    raise TuningTableError(f"{where} ({cls}): {e}") from None
  if entry["choice"] not in CHOICES:
    raise TuningTableError(f"{where} ({cls}): choice must be one of {CHOICES}")
  if not isinstance(entry["source"], dict) or not entry["source"]:
    raise TuningTableError(f"{where} ({cls}): source must be a non-empty object")
  return cls, dict(bs)


def parse_table(text: str, path: str = "<table>") -> tuple[str, dict[str, dict]]:
  """``(device_kind, {class: block_sizes fields})`` of one table file's text.

  Raises:
    TuningTableError: not JSON, another format, a missing device kind, a malformed or
      repeated entry, or fields ``BlockSizes`` refuses.
  """
  try:
    doc = json.loads(text)
  except json.JSONDecodeError as e:
    raise TuningTableError(f"{path}: not JSON ({e})") from None
  if not isinstance(doc, dict) or doc.get("format") != FORMAT:
    raise TuningTableError(f'{path}: expected an object with "format": {FORMAT}')
  kind = doc.get("device_kind")
  if not isinstance(kind, str) or not kind:
    raise TuningTableError(f"{path}: device_kind must be a non-empty string")
  entries = doc.get("entries")
  if not isinstance(entries, list):
    raise TuningTableError(f"{path}: entries must be a list")
  out: dict[str, dict] = {}
  for i, entry in enumerate(entries):
    cls, bs = _check_entry(path, i, entry)
    if cls in out:
      raise TuningTableError(f"{path}: class {cls} appears twice")
    out[cls] = bs
  return kind, out


def load_tables(directory: str = TABLE_DIR) -> dict[str, dict[str, dict]]:
  """Every ``*.json`` table in ``directory``: ``{device_kind: {class: fields}}``.

  Raises:
    TuningTableError: a malformed file, or two files for one device kind.
  """
  tables: dict[str, dict[str, dict]] = {}
  origin: dict[str, str] = {}
  if not os.path.isdir(directory):
    return tables
  for name in sorted(os.listdir(directory)):
    if not name.endswith(".json"):
      continue
    path = os.path.join(directory, name)
    with open(path, encoding="utf-8") as f:
      kind, table = parse_table(f.read(), path)
    if kind in tables:
      raise TuningTableError(f"{path}: device_kind {kind!r} already has {origin[kind]}")
    tables[kind], origin[kind] = table, path
  return tables


@functools.cache
def _packaged_tables() -> dict[str, dict[str, dict]]:
  return load_tables(TABLE_DIR)


def lookup(device_kind: str | None, cls: str, tables=None) -> dict | None:
  """The fields the table of ``device_kind`` sets for ``cls``, or None (no table or entry).

  ``tables`` defaults to the packaged ones (``TABLE_DIR``, read once per process).
  """
  if device_kind is None:
    return None
  tables = _packaged_tables() if tables is None else tables
  return tables.get(device_kind, {}).get(cls)


def table_slug(device_kind: str) -> str:
  """A file name for a card's table: ``NVIDIA H100 80GB HBM3`` -> ``nvidia_h100_80gb_hbm3``."""
  return re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_") or "unknown"


def config_key(fields: dict) -> str:
  """A canonical text for a setting (sorted JSON), for grouping measurements."""
  return json.dumps(fields, sort_keys=True)


@dataclasses.dataclass(frozen=True, eq=False)
class Measurement:
  """One timed setting at one shape: ``rate`` (higher is faster; TB/s or TFLOP/s), or
  ``rate=None`` where the setting failed there (e.g. shared memory exceeded). ``lo`` and
  ``hi``: an interval for the median rate (``experiments._timing.Timing.interval`` of
  the timing, as a rate), where the row records one."""

  shape: str
  fields: dict
  rate: float | None
  lo: float | None = None
  hi: float | None = None


def _median(xs):
  xs = sorted(xs)
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _summary(ms):
  """Median rate and min-max range of one (setting, shape)'s measurements: the range over
  repeated measurements and their own ranges; None for one measurement without a range
  (a single number cannot show that two settings differ)."""
  rates = [m.rate for m in ms]
  ends = rates + [x for m in ms for x in (m.lo, m.hi) if x is not None]
  known = len(ms) >= 2 or all(m.lo is not None and m.hi is not None for m in ms)
  return _median(rates), ((min(ends), max(ends)) if known else None)


def select(measurements, rule_fields: dict, margin: float = MARGIN) -> dict | None:
  """The selection rule over one class's measurements.

  At the shapes where the rule's setting was measured, a candidate qualifies where it
  never failed, its median rate beats the rule's at every shape it was tried, its range
  lies wholly above the rule's at every such shape where both have a range and there is
  at least one (``experiments._timing.compare``'s test: so settings timed once, with no
  range, never replace the rule), and the geometric mean of its speed-ups is at least
  ``margin``. The qualifying candidate with the largest mean
  wins; with none the rule's setting stays. Repeated measurements of one (shape, setting)
  count by their median and the range over them.

  Returns None where the rule's setting was measured at no shape (the class gets no
  entry), else a dict: ``block_sizes`` (the chosen fields), ``choice`` ("rule" or
  "measured"), ``shapes`` (per shape: the chosen and the rule's median rate and ranges),
  ``speedup`` (geometric mean of chosen / rule), ``best_other`` (the candidate with the
  largest mean, whether it qualified and why not), ``candidates`` (settings compared,
  the rule's included).
  """
  rule_key = config_key(rule_fields)
  groups: dict[tuple[str, str], list[Measurement]] = {}
  failed: set[str] = set()
  fields_of: dict[str, dict] = {}
  for m in measurements:
    key = config_key(m.fields)
    fields_of[key] = dict(m.fields)
    if m.rate is None:
      failed.add(key)
    else:
      groups.setdefault((key, m.shape), []).append(m)
  stats = {k: _summary(v) for k, v in groups.items()}
  rule_at = {shape: st for (key, shape), st in stats.items() if key == rule_key}
  if not rule_at:
    return None
  scored = []
  for key in sorted(fields_of):
    if key == rule_key:
      continue
    at = {s: st for (k, s), st in stats.items() if k == key and s in rule_at}
    if not at:
      continue
    ratios = [st[0] / rule_at[s][0] for s, st in at.items()]
    gm = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    ranged = [s for s, st in at.items() if st[1] is not None and rule_at[s][1] is not None]
    apart = bool(ranged) and all(at[s][1][0] > rule_at[s][1][1] for s in ranged)
    ok = key not in failed and min(ratios) > 1.0 and apart and gm >= margin
    scored.append((gm, ok, apart, key))
  best = max(scored, default=None)
  win = max((s for s in scored if s[1]), default=None)
  chosen = rule_key if win is None else win[3]

  def sig(x):  # 5 significant digits: rates in TB/s, TFLOP/s or (interpret mode) far less
    return float(f"{x:.5g}")

  def rng(r):
    return None if r is None else [sig(r[0]), sig(r[1])]

  shapes = sorted(s for (k, s) in stats if k == chosen and s in rule_at)
  return {
    "block_sizes": fields_of[chosen],
    "choice": "rule" if win is None else "measured",
    "shapes": [
      {
        "shape": s,
        "rate": sig(stats[(chosen, s)][0]),
        "range": rng(stats[(chosen, s)][1]),
        "rule_rate": sig(rule_at[s][0]),
        "rule_range": rng(rule_at[s][1]),
      }
      for s in shapes
    ],
    "speedup": 1.0 if win is None else round(win[0], 4),
    "best_other": None
    if best is None
    else {
      "block_sizes": fields_of[best[3]],
      "speedup": round(best[0], 4),
      "ranges_apart": best[2],
      "failed_somewhere": best[3] in failed,
    },
    "candidates": len(scored) + 1,
  }


def make_entry(cls: str, selected: dict, source: dict) -> dict:
  """A table entry from ``select``'s result and a ``source`` (file, commit / date, ...)."""
  src = dict(source)
  src.update(
    shapes=selected["shapes"],
    speedup_over_rule=selected["speedup"],
    best_other=selected["best_other"],
    candidates=selected["candidates"],
  )
  return {
    "class": cls,
    "block_sizes": selected["block_sizes"],
    "choice": selected["choice"],
    "source": src,
  }


def dump_table(device_kind: str, entries: list[dict], note: str) -> str:
  """The JSON text of a table (entries sorted by class; stable, ends in a newline)."""
  doc = {
    "format": FORMAT,
    "device_kind": device_kind,
    "note": note,
    "entries": sorted(entries, key=lambda e: e["class"]),
  }
  text = json.dumps(doc, indent=1, sort_keys=False) + "\n"
  parse_table(text, f"<table for {device_kind}>")  # never write a table the loader refuses
  return text
