"""Per-card tuning tables (kernels.gpu.tuning_table, kernels/gpu/tuning_tables/*.json).

The lookup through ``default_block_sizes`` (a known card's entry, an unknown card's rule,
the user's BlockSizes first), the errors of a malformed table, the selection rule on
hand-made measurements, that the derivation script reproduces the committed tables from
the committed rows, and that a table-chosen setting decodes as the reference does
(interpret mode, against a float64 loop).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import gpu
from kernels.gpu import tuning, tuning_table
from kernels.gpu.tuning_table import Measurement, TuningTableError
from kernels.gpu.tuning_tables import derive
from kernels.testing import rel_l2_error, tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE = "Test GPU 7"
# A decode entry unlike the rule's (64-token steps at bf16 head_dim 128 small batches).
FAKE_DECODE = dict(decode_kv_tile=32, decode_num_splits=2, decode_num_warps=2, decode_num_stages=4)
FAKE_PREFILL = dict(
  prefill_q_tile=64,
  prefill_kv_tile=32,
  prefill_heads_per_program=None,
  prefill_num_warps=8,
  prefill_num_stages=2,
)


def _entry(cls, bs, choice="measured"):
  return {"class": cls, "block_sizes": bs, "choice": choice, "source": {"file": "hand-made"}}


def _table(device_kind, entries):
  return {"format": 1, "device_kind": device_kind, "note": "test", "entries": entries}


@pytest.fixture
def fake_tables(tmp_path, monkeypatch):
  """The packaged tables plus one for FAKE, seen by default_block_sizes."""
  (tmp_path / "fake.json").write_text(
    json.dumps(
      _table(
        FAKE,
        [
          _entry("decode/w128/i2/small", FAKE_DECODE),
          _entry("prefill/w128/i2", FAKE_PREFILL),
        ],
      )
    )
  )
  tables = {**tuning_table.load_tables(), **tuning_table.load_tables(str(tmp_path))}
  monkeypatch.setattr(tuning_table, "_packaged_tables", lambda: tables)
  return tables


def _decode_fields(bs):
  return {k: getattr(bs, k) for k in tuning_table.KIND_FIELDS["decode"]}


# ------------------------------------------------------------------------------- lookup


def test_known_card_gets_its_entry_and_the_rule_elsewhere(fake_tables):
  kw = dict(head_dim=128, kv_dtype=jnp.bfloat16, batch=4, num_kv_heads=8)  # 32 pairs: small
  got = gpu.default_block_sizes(device_kind=FAKE, **kw)
  rule = tuning.rule_block_sizes(**kw)
  assert _decode_fields(got) == FAKE_DECODE != _decode_fields(rule)
  # The prefill entry is laid over too; the fields no entry sets keep the rule's.
  assert (got.prefill_q_tile, got.prefill_kv_tile, got.prefill_num_warps) == (64, 32, 8)
  assert (got.mosaic_kv_tile, got.mosaic_num_slots) == (rule.mosaic_kv_tile, rule.mosaic_num_slots)
  # head_dim 96 is computed in 128-wide tiles: the same class.
  assert gpu.default_block_sizes(device_kind=FAKE, **{**kw, "head_dim": 96}) == got
  # A large batch (256 x 8 pairs) and head_dim 64 are classes FAKE's table lacks.
  large = dict(kw, batch=256)
  assert _decode_fields(gpu.default_block_sizes(device_kind=FAKE, **large)) == _decode_fields(
    tuning.rule_block_sizes(**large)
  )
  narrow = dict(kw, head_dim=64, decode=False, num_tokens=None)
  assert gpu.default_block_sizes(device_kind=FAKE, **narrow) == tuning.rule_block_sizes(**narrow)


def test_planned_decode_has_its_own_decode_fields_and_takes_the_prefill_entry(fake_tables):
  # The decode entries are the split-K kernel's measurements; the planned kernel keeps its
  # own step settings on every card (by bytes: steps of up to 64 KiB of K + V, at most
  # 128 tokens, 4 warps, 2 stages above 32 KiB a step), and the other kinds' entries still
  # apply.
  for kind in (FAKE, "NVIDIA H200", None):
    got = gpu.planned_block_sizes(head_dim=128, kv_dtype=jnp.bfloat16, device_kind=kind)
    # bf16 head_dim 128: 512 bytes a token, 128 tokens = 64 KiB a step -> 2 stages.
    assert _decode_fields(got) == dict(
      decode_kv_tile=128, decode_num_splits=None, decode_num_warps=4, decode_num_stages=2
    ), kind
  # Worked by hand: (head_dim, dtype) -> (kv_tile, warps, stages).
  cases = {
    (64, jnp.bfloat16): (128, 4, 3),  # 256 B a token: 32 KiB steps keep 3 stages
    (256, jnp.bfloat16): (64, 4, 2),  # 1 KiB a token: 64 tokens
    (96, jnp.bfloat16): (128, 4, 2),  # tiles 128 wide
    (128, jnp.int8): (128, 4, 3),  # 256 B a token
    (128, jnp.float32): (64, 4, 2),
    (256, jnp.float32): (32, 4, 2),
  }
  for (d, dt), want in cases.items():
    got = gpu.planned_block_sizes(head_dim=d, kv_dtype=dt, device_kind=None)
    assert (got.decode_kv_tile, got.decode_num_warps, got.decode_num_stages) == want, (d, dt)
  got = gpu.planned_block_sizes(head_dim=128, kv_dtype=jnp.bfloat16, device_kind=FAKE)
  assert (got.prefill_q_tile, got.prefill_kv_tile, got.prefill_num_warps) == (64, 32, 8)
  # The H200 table's small entry differs from the planned settings (so the check above
  # has teeth): 8 warps there.
  h200 = gpu.default_block_sizes(head_dim=128, kv_dtype=jnp.bfloat16, device_kind="NVIDIA H200")
  planned = gpu.planned_block_sizes(head_dim=128, kv_dtype=jnp.bfloat16, device_kind="NVIDIA H200")
  assert _decode_fields(h200) != _decode_fields(planned)


def test_short_prefill_still_cuts_the_table_query_tile(fake_tables):
  bs = gpu.default_block_sizes(
    device_kind=FAKE, head_dim=128, kv_dtype=jnp.bfloat16, num_tokens=20, decode=False
  )
  assert bs.prefill_q_tile == 16  # 20 rows -> 16, as the rule cuts its own tile
  assert (bs.prefill_kv_tile, bs.prefill_num_warps) == (32, 8)  # the rest from the table


def test_packaged_tables_cover_h100_and_h200_with_their_entries():
  for kind, name in [
    ("NVIDIA H100 80GB HBM3", "nvidia_h100_80gb_hbm3.json"),
    ("NVIDIA H200", "nvidia_h200.json"),
  ]:
    with open(os.path.join(tuning_table.TABLE_DIR, name)) as f:
      doc = json.load(f)
    assert doc["device_kind"] == kind and doc["entries"]
    for e in doc["entries"]:
      assert tuning_table.lookup(kind, e["class"]) == e["block_sizes"]
      assert e["source"]["files"] and e["source"]["shapes"]
  # H200, head_dim 64 bf16, 256 x 8 pairs: the entry from the engine probe's sweep.
  bs = gpu.default_block_sizes(
    device_kind="NVIDIA H200", head_dim=64, kv_dtype=jnp.bfloat16, batch=256, num_kv_heads=8
  )
  assert (bs.decode_kv_tile, bs.decode_num_warps, bs.decode_num_stages) == (128, 4, 3)


H200 = "NVIDIA H200"


@pytest.fixture
def h200_sms(monkeypatch):
  """The H200's 132 SMs whatever the host (a GPU host would report its own)."""
  from kernels.gpu import decode

  monkeypatch.setattr(decode, "_num_sms", lambda: 132)


@pytest.mark.parametrize(
  "batch,num_kv_heads,context,stages",
  [
    (99, 4, 512, 3),  # 396 programs: exactly 3 an SM, not more
    (100, 4, 512, 2),  # 400
    # Programs = batch x KV heads x splits (decode.grid_splits: 2 x 132 SMs wanted, at
    # least 4 steps of 128 tokens a split), against 3 x 132 = 396 on a CPU host.
    (64, 8, 512, 2),  # 512 programs, 8 KV heads: the Llama-1B step at 64 x 512
    (256, 8, 1024, 2),  # 2,048 programs
    (32, 8, 2048, 2),  # 256 pairs x 2 splits = 512
    (16, 8, 4096, 3),  # 128 pairs x 3 splits = 384: not deeper than 3 an SM
    (64, 4, 512, 3),  # 256 programs
    (64, 3, 512, 3),  # SmolLM2's 3 KV heads: kept on 3 stages at any depth
    (256, 3, 1024, 3),  # 768 programs, 3 KV heads (measured slower with 2)
  ],
)
@pytest.mark.parametrize("card", [H200, "NVIDIA H100 80GB HBM3"])  # both measured
def test_deep_head_dim_64_grids_take_two_stages(
  batch, num_kv_heads, context, stages, card, h200_sms
):
  kw = dict(head_dim=64, kv_dtype=jnp.bfloat16, batch=batch, num_kv_heads=num_kv_heads)
  bs = gpu.default_block_sizes(device_kind=card, max_context=context, **kw)
  assert (bs.decode_kv_tile, bs.decode_num_warps, bs.decode_num_stages) == (128, 4, stages)
  # Only the stages move, and only with the context given and on a GPU.
  without = gpu.default_block_sizes(device_kind=card, **kw)
  assert without.decode_num_stages == 3
  assert bs == dataclasses.replace(without, decode_num_stages=stages)
  assert gpu.default_block_sizes(device_kind=None, max_context=context, **kw) == (
    tuning.rule_block_sizes(**kw)
  )


def test_grid_splits_are_the_splits_the_kernel_launches():
  from kernels.gpu.decode import grid_splits

  # (batch, heads, context, step, asked) -> (splits, chunk), by hand: 264 programs wanted
  # (2 x 132 SMs off a GPU), at least 4 steps a split, then whole steps per chunk.
  assert grid_splits(1, 1, 512, 128, 3) == (2, 256)  # 3 asked of 4 steps: chunks of 2
  assert grid_splits(1, 1, 512, 128, None) == (1, 512)  # 4 steps: no split
  assert grid_splits(32, 3, 2048, 128, None) == (3, 768)  # 96 pairs: 3 splits of 6 steps
  assert grid_splits(32, 8, 2048, 128, None) == (2, 1024)  # 256 pairs: 2
  assert grid_splits(8, 8, 4096, 128, None) == (5, 896)  # 64 pairs: 5 asked, 7 steps each


@pytest.mark.parametrize(
  "kw",
  [
    dict(head_dim=128, kv_dtype=jnp.bfloat16),  # another width
    dict(head_dim=64, kv_dtype=jnp.int8),  # 8-bit K/V: a 128-token step is 16 KiB
    dict(head_dim=64, kv_dtype=jnp.float32),  # 64-token steps
    dict(head_dim=32, kv_dtype=jnp.bfloat16),  # 128-token steps in 3 stages, not measured
    dict(head_dim=48, kv_dtype=jnp.bfloat16),  # 64-wide tiles, fewer bytes: not measured
  ],
)
def test_deep_grid_stages_leave_other_kernels_alone(kw, h200_sms):
  deep = dict(batch=256, num_kv_heads=8, device_kind=H200, **kw)
  assert gpu.default_block_sizes(max_context=1024, **deep) == gpu.default_block_sizes(**deep)


@pytest.mark.parametrize("device_kind", ["NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"])
def test_deep_grid_stages_only_on_the_cards_measured(device_kind, h200_sms):
  deep = dict(head_dim=64, kv_dtype=jnp.bfloat16, batch=256, num_kv_heads=8)
  assert gpu.default_block_sizes(device_kind=device_kind, max_context=1024, **deep) == (
    gpu.default_block_sizes(device_kind=device_kind, **deep)
  )


def test_deep_grid_stages_leave_other_step_settings_alone(h200_sms):
  deep = dict(head_dim=64, kv_dtype=jnp.bfloat16, batch=256, num_kv_heads=8, max_context=1024)
  for fields in [
    dict(decode_kv_tile=64),  # another step size (a table entry could set one)
    dict(decode_num_stages=4),
    dict(decode_num_stages=2),
  ]:
    bs = tuning.BlockSizes(**{**dict(decode_kv_tile=128, decode_num_stages=3), **fields})
    assert tuning.deep_grid_stages(bs, **deep) is bs
  bs = tuning.BlockSizes(decode_kv_tile=128, decode_num_stages=3)
  assert tuning.deep_grid_stages(bs, **deep).decode_num_stages == 2


def _spy_decode(monkeypatch, device_kind) -> list:
  """Makes ``device_kind`` the current card and swaps the decode kernel for a spy: the
  returned list gets the BlockSizes of every decode call."""
  seen = []

  def fake_decode(q, *args, block_sizes, **kw):
    seen.append(block_sizes)
    return q

  monkeypatch.setattr(tuning, "current_device_kind", lambda: device_kind)
  monkeypatch.setattr(gpu, "paged_decode", fake_decode)
  return seen


def test_paged_attention_sizes_the_grid_from_the_table_width(monkeypatch, h200_sms):
  seen = _spy_decode(monkeypatch, H200)
  block = 16
  for batch, width, heads, stages in [
    (64, 32, 8, 2),  # 512 keys a row: 512 programs
    (64, 32, 4, 3),  # 256
    (64, 32, 3, 3),  # 192
    # 4,096 keys a row: 256 pairs x 2 splits = 512 programs. The context is the table's
    # width times the block size: from the width alone (256 "keys") it would be 1 split.
    (32, 256, 8, 2),
  ]:
    table = jnp.arange(batch * width, dtype=jnp.int32).reshape(batch, width)
    lens = jnp.full((batch,), width * block, jnp.int32)
    pool = jnp.zeros((heads, batch * width, block, 64), jnp.bfloat16)
    q = jnp.zeros((batch, 4 * heads, 64), jnp.bfloat16)
    gpu.paged_attention(q, pool, pool, table, lens, interpret=True)
    assert seen[-1].decode_num_stages == stages, (batch, width, heads)


@pytest.mark.parametrize("device_kind", ["NVIDIA A100-SXM4-80GB", None])
def test_unknown_card_or_none_gets_the_rule(device_kind):
  for kw in [
    dict(head_dim=128, kv_dtype=jnp.bfloat16, batch=4, num_kv_heads=8),
    dict(head_dim=64, kv_dtype=jnp.bfloat16, batch=256, num_kv_heads=8),
    dict(head_dim=256, kv_dtype=jnp.float32, num_tokens=40, decode=False),
  ]:
    assert gpu.default_block_sizes(device_kind=device_kind, **kw) == tuning.rule_block_sizes(**kw)


def test_cpu_default_device_applies_no_table():
  assert tuning.current_device_kind() is None  # these tests run on CPU
  kw = dict(head_dim=128, kv_dtype=jnp.bfloat16, batch=64, num_kv_heads=8)
  assert gpu.default_block_sizes(**kw) == tuning.rule_block_sizes(**kw)


def test_paged_attention_takes_the_table_and_user_block_sizes_win(fake_tables, monkeypatch):
  seen = _spy_decode(monkeypatch, FAKE)
  q, k, v, table, lens = _inputs(0, lengths=[5, 9], head_dim=128, dtype=jnp.bfloat16)
  gpu.paged_attention(q, k, v, table, lens, interpret=True)
  assert _decode_fields(seen[-1]) == FAKE_DECODE
  mine = gpu.BlockSizes(decode_kv_tile=16, decode_num_splits=1)
  gpu.paged_attention(q, k, v, table, lens, block_sizes=mine, interpret=True)
  assert seen[-1] is mine


# ----------------------------------------------------------------------- malformed tables


def _good():
  return _table(FAKE, [_entry("decode/w128/i2/small", dict(FAKE_DECODE))])


@pytest.mark.parametrize(
  "edit,match",
  [
    (lambda d: "{not json", "not JSON"),
    (lambda d: {**d, "format": 2}, "format"),
    (lambda d: {**d, "device_kind": ""}, "device_kind"),
    (lambda d: {**d, "entries": {}}, "entries must be a list"),
    (lambda d: {**d, "entries": [d["entries"][0]] * 2}, "appears twice"),
    (lambda d: _table(FAKE, [_entry("decode/w128/i2", FAKE_DECODE)]), "not KIND"),
    (lambda d: _table(FAKE, [_entry("prefill/w128/i2/large", FAKE_PREFILL)]), "not KIND"),
    (lambda d: _table(FAKE, [_entry("decode/w128/i2/small", FAKE_PREFILL)]), "sets only"),
    (
      lambda d: _table(FAKE, [_entry("decode/w128/i2/small", {"decode_kv_tile": 48})]),
      "decode_kv_tile must be a power of two",
    ),
    (lambda d: _table(FAKE, [_entry("mosaic/w128/i2", FAKE_DECODE, "best")]), "sets only"),
    (
      lambda d: _table(FAKE, [_entry("decode/w128/i2/small", FAKE_DECODE, "best")]),
      "choice must be",
    ),
    (lambda d: _table(FAKE, [{"class": "decode/w128/i2/small"}]), "lacks"),
    (
      lambda d: _table(
        FAKE, [_entry("prefill/w128/i2", dict(FAKE_PREFILL, prefill_heads_per_program=2))]
      ),
      "GQA group",
    ),
  ],
)
def test_malformed_table_is_a_clear_error(tmp_path, edit, match):
  doc = edit(_good())
  path = tmp_path / "bad.json"
  path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
  with pytest.raises(TuningTableError, match=match) as e:
    tuning_table.load_tables(str(tmp_path))
  assert "bad.json" in str(e.value)  # the message names the file


def test_two_tables_for_one_card_is_an_error(tmp_path):
  for name in ("a.json", "b.json"):
    (tmp_path / name).write_text(json.dumps(_good()))
  with pytest.raises(TuningTableError, match="already has"):
    tuning_table.load_tables(str(tmp_path))


# ----------------------------------------------------------------------- selection rule

RULE = {"decode_kv_tile": 64}
FAST = {"decode_kv_tile": 128}


def _m(shape, fields, rate, spread=0.01):
  return Measurement(shape, fields, rate, rate * (1 - spread), rate * (1 + spread))


def test_select_replaces_the_rule_only_with_a_clear_gain():
  meas = [_m("a", RULE, 2.0), _m("b", RULE, 3.0), _m("a", FAST, 2.2), _m("b", FAST, 3.3)]
  sel = tuning_table.select(meas, RULE)
  assert sel["choice"] == "measured" and sel["block_sizes"] == FAST
  assert math.isclose(sel["speedup"], 1.1, rel_tol=1e-3)
  # 2% is under the margin; overlapping ranges; one slower shape; a failure elsewhere;
  # a single number with no range: each keeps the rule.
  for bad in [
    [_m("a", FAST, 2.04), _m("b", FAST, 3.06)],
    [_m("a", FAST, 2.2, 0.2), _m("b", FAST, 3.3, 0.2)],
    [_m("a", FAST, 2.6), _m("b", FAST, 2.9)],
    [_m("a", FAST, 2.2), _m("b", FAST, 3.3), Measurement("c", FAST, None)],
    [Measurement("a", FAST, 2.6), Measurement("b", FAST, 3.9)],
  ]:
    sel = tuning_table.select(meas[:2] + bad, RULE)
    assert sel["choice"] == "rule" and sel["block_sizes"] == RULE, bad
  # A range-less shape (an older single-pass row) counts in the mean but does not veto
  # the shapes with ranges, which must be apart.
  mixed = meas + [Measurement("c", RULE, 1.0), Measurement("c", FAST, 1.1)]
  sel = tuning_table.select(mixed + [_m("a", FAST, 2.2), _m("b", FAST, 3.3)], RULE)
  assert sel["choice"] == "measured" and [s["shape"] for s in sel["shapes"]] == ["a", "b", "c"]
  slower_there = mixed + [_m("a", FAST, 2.2), _m("b", FAST, 3.3), Measurement("c", FAST, 0.9)]
  assert tuning_table.select(slower_there, RULE)["choice"] == "rule"
  # The rule's setting never timed: no entry.
  assert tuning_table.select([_m("a", FAST, 2.0)], RULE) is None


def test_select_takes_the_median_and_range_of_repeated_passes():
  meas = [Measurement("a", RULE, r) for r in (1.0, 1.1, 1.05)]
  meas += [Measurement("a", FAST, r) for r in (1.3, 1.2, 1.25)]
  sel = tuning_table.select(meas, RULE)
  assert sel["choice"] == "measured"
  assert sel["shapes"] == [
    {"shape": "a", "rate": 1.25, "range": [1.2, 1.3], "rule_rate": 1.05, "rule_range": [1.0, 1.1]}
  ]


# ---------------------------------------------------------------------------- derivation


def test_derivation_reproduces_the_committed_tables():
  derived = derive.derive(ROOT)
  assert {"NVIDIA H100 80GB HBM3", "NVIDIA H200"} <= set(derived)  # and any tuned card
  assert set(derived) == set(tuning_table.load_tables())  # no table without its rows
  for kind, text in derived.items():
    path = os.path.join(tuning_table.TABLE_DIR, tuning_table.table_slug(kind) + ".json")
    with open(path) as f:
      assert f.read() == text, f"{path} differs: run python -m kernels.gpu.tuning_tables.derive"


def test_derivation_compares_settings_within_one_run():
  # H100 run 3 timed the rule's large-batch setting (128-token steps, 8 warps) beside the
  # then-default 64-token steps at 64 x 8192, block 64, in 3 passes: hand-read medians.
  groups = derive.gather(ROOT)
  meas, files = groups[("NVIDIA H100 80GB HBM3", "decode/w128/i2/large")]
  shape = "run3 64x8192 block 64 heads 32/8"
  rule = tuning_table.rule_fields("decode/w128/i2/large")
  assert rule == dict(
    decode_kv_tile=128, decode_num_splits=None, decode_num_warps=8, decode_num_stages=3
  )
  got = sorted(m.rate for m in meas if m.shape == shape and m.fields == rule)
  assert [round(x, 3) for x in got] == [2.917, 2.933, 2.942]
  assert "docs/results/gpu_raw/run3/raw.jsonl" in files


def test_derivation_reads_committed_tune_rows_for_a_new_card(tmp_path):
  # A card tuned by experiments/bench/tune_gpu.py enters through its rows: committed to
  # docs/results/tune_gpu.jsonl, re-derived. Here hand-made rows in the script's format.
  results = tmp_path / "docs" / "results"
  (results / "gpu_raw").mkdir(parents=True)
  real = os.path.join(ROOT, "docs", "results")
  for name in ("engine_probe.jsonl", "kv_quant_sweep.jsonl"):
    (results / name).symlink_to(os.path.join(real, name))
  for run in range(1, 6):
    (results / "gpu_raw" / f"run{run}").symlink_to(os.path.join(real, "gpu_raw", f"run{run}"))
  rule = tuning_table.rule_fields("decode/w128/i2/small")
  other = dict(rule, decode_num_stages=4)
  common = dict(
    device=FAKE, date="2026-12-03", commit="abc1234", shape_class="decode/w128/i2/small"
  )
  rows = [dict(device=FAKE, ceiling=True, ceiling_tbps=5.0, run_id="r1")]
  for run, (fast, rate_lo, rate_hi) in {"r1": (2.4, 2.35, 2.45), "r2": (2.3, 2.25, 2.35)}.items():
    shape = "8x4096 block 16 heads 32/8 d128 bfloat16"
    rows.append(
      dict(common, run_id=run, shape=shape, block_sizes=rule, rate=2.0, rate_lo=1.95, rate_hi=2.05)
    )
    rows.append(
      dict(
        common,
        run_id=run,
        shape=shape,
        block_sizes=other,
        rate=fast,
        rate_lo=rate_lo,
        rate_hi=rate_hi,
      )
    )
  (results / "tune_gpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  derived = derive.derive(str(tmp_path))
  assert set(derived) == {"NVIDIA H100 80GB HBM3", "NVIDIA H200", FAKE}
  kind, table = tuning_table.parse_table(derived[FAKE])
  assert kind == FAKE and table == {"decode/w128/i2/small": other}
  entry = json.loads(derived[FAKE])["entries"][0]
  assert entry["choice"] == "measured"
  # Two runs, two sets of shapes: speed-ups 1.2 and 1.15, geometric mean sqrt(1.38).
  assert math.isclose(entry["source"]["speedup_over_rule"], math.sqrt(1.2 * 1.15), rel_tol=1e-4)
  assert entry["source"]["files"] == {
    "docs/results/tune_gpu.jsonl": {"date": "2026-12-03", "commit": "abc1234"}
  }


# ------------------------------------------------------------------ decode results unchanged


def _inputs(seed, *, lengths, head_dim, dtype, block_size=8, num_q_heads=4, num_kv_heads=2):
  rng = np.random.default_rng(seed)
  need = [-(-n // block_size) for n in lengths]
  num_blocks = sum(need) + 2
  perm = rng.permutation(num_blocks)
  table = np.full((len(lengths), max(need) + 1), -1, np.int32)
  k = rng.standard_normal((num_kv_heads, num_blocks, block_size, head_dim))
  v = rng.standard_normal((num_kv_heads, num_blocks, block_size, head_dim))
  live = np.zeros((num_blocks, block_size), bool)
  used = 0
  for b, n in enumerate(need):
    table[b, :n] = perm[used : used + n]
    used += n
    for i in range(n):
      live[table[b, i], : min(block_size, lengths[b] - i * block_size)] = True
  k[:, ~live] = np.nan  # a kernel that reads past a length or into a free block fails
  v[:, ~live] = np.nan
  q = rng.standard_normal((len(lengths), num_q_heads, head_dim))
  return (
    jnp.asarray(q, dtype),
    jnp.asarray(k, dtype),
    jnp.asarray(v, dtype),
    jnp.asarray(table),
    jnp.asarray(lengths, jnp.int32),
  )


def _float64_decode(q, k, v, table, lens):
  qn, kn, vn = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v))
  bsz, hq, d = qn.shape
  group, block = hq // kn.shape[0], kn.shape[2]
  want = np.zeros(qn.shape)
  for b, n in enumerate(np.asarray(lens)):
    rows = [int(table[b, p // block]) for p in range(n)]
    for h in range(hq):
      kk = np.stack([kn[h // group, rows[p], p % block] for p in range(n)])
      vv = np.stack([vn[h // group, rows[p], p % block] for p in range(n)])
      s = kk @ qn[b, h] / math.sqrt(d)
      p = np.exp(s - s.max())
      want[b, h] = p @ vv / p.sum()
  return want


@pytest.mark.parametrize("device_kind", ["NVIDIA H100 80GB HBM3", FAKE])
def test_table_chosen_block_sizes_decode_as_the_reference(fake_tables, device_kind):
  q, k, v, table, lens = _inputs(3, lengths=[37, 70, 1], head_dim=128, dtype=jnp.bfloat16)
  bs = gpu.default_block_sizes(
    device_kind=device_kind, head_dim=128, kv_dtype=jnp.bfloat16, batch=3, num_kv_heads=2
  )
  cls = tuning_table.shape_class("decode", width=128, itemsize=2, pairs=6)
  assert _decode_fields(bs) == tuning_table.lookup(device_kind, cls)  # from the table
  out = gpu.paged_attention(q, k, v, table, lens, block_sizes=bs, interpret=True)
  assert not np.isnan(np.asarray(out, np.float32)).any()
  # bf16 q, K/V and output: the kernels' bound on the relative L2 error (kernels/testing.py),
  # against the float64 loop and against kernels.reference.
  bound = tolerance("gpu_kernel_vs_reference_rel_l2", q.dtype).rtol
  assert rel_l2_error(out, _float64_decode(q, k, v, table, lens)) < bound
  assert rel_l2_error(out, kernels.reference.paged_attention(q, k, v, table, lens)) < bound
