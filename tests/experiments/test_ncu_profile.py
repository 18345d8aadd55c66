"""experiments.bench.ncu_profile's readers of Nsight Compute pages, on hand-made pages whose
sums are worked out by hand below, and its run of ncu against a stand-in ncu (no GPU)."""

from __future__ import annotations

import csv
import json
import stat
import sys

import pytest

from experiments.bench.ncu_profile import (
  DETAIL_METRICS,
  ROW_FIELDS,
  parse_details,
  summarize_source,
)
from tests.experiments.test_bench import _bench_rows, _python

# A details page in ncu's layout (name, unit, value), with lines that share a prefix with a
# metric ("Executed Instructions Per Scheduler", "Executed Ipc Active") or carry two numbers.
DETAILS = """
  paxcache_paged_decode_bs16_t128_s1 (8, 1, 64)x(128, 1, 1), Context 1, Stream 7
    Section: GPU Speed Of Light Throughput
    DRAM Throughput                   %        63.88
    Duration                         ms         1.06
    Executed Ipc Active   inst/cycle         2.19
    Issue Slots Busy               %        52.26
    Avg. Executed Instructions Per Scheduler        inst   327,858.42
    Executed Instructions                           inst  173,109,248
    Block Size                                                     128
    Grid Size                                                 999      3
    Grid Size                                                      512
    Registers Per Thread             register/thread               168
    Dynamic Shared Memory Per Block      Kbyte/block             75.78
    Waves Per SM                                                  1.29
    Block Limit Registers                 block            3
    Block Limit Shared Mem                block            3
    Block Limit Warps                     block           16
    Theoretical Occupancy                     %        18.75
    Achieved Occupancy                        %        15.34
    DRAM Throughput                   %        11.00
"""


def test_parse_details_reads_each_metric_once_in_its_units():
  got = parse_details(DETAILS)
  assert got == {
    "dram_throughput_pct": 63.88,  # the first line of the name, not the later 11.00
    "duration_us": 1060.0,  # 1.06 ms
    "issue_slots_busy_pct": 52.26,
    "executed_instructions": 173109248.0,  # not "... Per Scheduler"
    "threads_per_program": 128.0,
    "grid_size": 512.0,  # the line with two numbers is not read
    "registers_per_thread": 168.0,
    "dynamic_shared_kib": 75.78 * 1000 / 1024,  # ncu's Kbyte is 1000 bytes
    "waves_per_sm": 1.29,
    "block_limit_registers": 3.0,
    "block_limit_shared_mem": 3.0,
    "block_limit_warps": 16.0,
    "theoretical_occupancy_pct": 18.75,
    "achieved_occupancy_pct": 15.34,
  }


def test_parse_details_refuses_an_unknown_duration_unit():
  with pytest.raises(ValueError, match="unknown duration unit"):
    parse_details("    Duration                         cycles         12")


def test_parse_details_converts_shared_memory_to_kib():
  line = "    Dynamic Shared Memory Per Block      {}             {}"
  assert parse_details(line.format("byte/block", "2048")) == {"dynamic_shared_kib": 2.0}
  assert parse_details(line.format("Mbyte/block", "1.024")) == {"dynamic_shared_kib": 1000.0}
  with pytest.raises(ValueError, match="unknown shared-memory unit"):
    parse_details(line.format("Kibyte/block", "4"))


HEADER = [
  "Address",
  "Source",
  "Warp Stall Sampling (All Samples)",
  "Instructions Executed",
  "stall_long_sb",
  "stall_wait",
  "stall_long_sb (Not Issued)",
]
# (source, samples, executed, long_sb, wait, long_sb not issued). The reasons' columns need
# not add up to the samples (ncu has more reasons than these): shares are of the samples.
SASS = [
  ("LDG.E.128 R4, desc[UR4][R2.64]", 10, 100, 8, 2, 99),
  ("@P0 LDG.E.U8 R5, desc[UR4][R2.64]", 30, 300, 25, 0, 99),
  ("HMMA.16816.F32.BF16 R8, R4, R6, R8", 60, 400, 0, 60, 99),
  ("BAR.SYNC.DEFER_BLOCKING 0x0", 0, 200, 0, 0, 99),
]


def _write_csv(path):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["Kernel Name", "paxcache_paged_decode_bs16_t128_s1"])
    w.writerow(HEADER)
    for i, (src, s, ex, lsb, wait, ni) in enumerate(SASS):
      w.writerow([hex(i * 16), src, s, ex, lsb, wait, ni])
    w.writerow(["0x40", "EXIT"])  # a short row: skipped


def test_summarize_source_sums_by_reason_and_opcode(tmp_path):
  path = tmp_path / "sass.csv"
  _write_csv(path)
  got = summarize_source(str(path))
  assert got["samples"] == 100
  # long_sb: 8 + 25 = 33 of 100 samples; wait: 2 + 60 = 62. "Not Issued" columns ignored.
  assert got["stalls"] == pytest.approx({"wait": 0.62, "long_sb": 0.33})
  assert list(got["stalls"]) == ["wait", "long_sb"]  # largest first
  # LDG (predicated or not, any width): 400 of 1000 executed, 40 of 100 samples.
  # Ties keep the order opcodes first appear in (Counter.most_common is stable).
  assert [op for op, _, _ in got["ops"]] == ["LDG", "HMMA", "BAR"]
  assert [ex for _, ex, _ in got["ops"]] == pytest.approx([0.4, 0.4, 0.2])
  assert [st for _, _, st in got["ops"]] == pytest.approx([0.4, 0.6, 0.0])


def test_summarize_source_refuses_a_page_without_its_columns(tmp_path):
  path = tmp_path / "bad.csv"
  path.write_text('"Kernel Name","k"\n"Address","Source"\n"0x0","EXIT"\n')
  with pytest.raises(ValueError, match="no header"):
    summarize_source(str(path))


def test_summarize_csv_command_writes_a_row(tmp_path):
  path = tmp_path / "sass.csv"
  _write_csv(path)
  rows = _bench_rows(
    "ncu_profile", ["--summarize-csv", str(path)], tmp_path / "out", "ncu_profile.jsonl"
  )
  assert len(rows) == 1
  assert rows[0]["source"] == str(path)
  assert rows[0]["samples"] == 100
  assert rows[0]["stalls"] == pytest.approx({"wait": 0.62, "long_sb": 0.33})
  json.dumps(rows[0])  # a plain JSON row


def test_a_profile_rows_fields_are_distinct():
  details = {"duration_us" if label == "duration" else label for label, _ in DETAIL_METRICS}
  groups = [set(ROW_FIELDS), details, {"samples", "stalls", "ops"}]
  assert sum(len(g) for g in groups) == len(set().union(*groups))


# A stand-in for ncu: "-o REPORT ..." writes REPORT.ncu-rep (unless FAKE_NCU_NONE is set:
# then it says what ncu says when its filter matches nothing) and records its arguments;
# "-i REPORT --page details|source" prints the pages above. It never runs the child.
FAKE_NCU = """import os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_NCU_LOG"], "a") as f:
  f.write(" ".join(args) + "\\n")
if "-o" in args:
  if os.environ.get("FAKE_NCU_NONE"):
    print("==WARNING== No kernels were profiled.")
  else:
    open(args[args.index("-o") + 1] + ".ncu-rep", "w").write("report")
elif "details" in args:
  sys.stdout.write(open(os.environ["FAKE_NCU_DETAILS"]).read())
else:
  sys.stdout.write(open(os.environ["FAKE_NCU_CSV"]).read())
"""


def _fake_ncu(tmp_path, monkeypatch):
  ncu = tmp_path / "ncu"
  ncu.write_text(f"#!{sys.executable}\n" + FAKE_NCU)
  ncu.chmod(ncu.stat().st_mode | stat.S_IEXEC)
  (tmp_path / "details.txt").write_text(DETAILS)
  _write_csv(tmp_path / "sass.csv")
  monkeypatch.setenv("FAKE_NCU_LOG", str(tmp_path / "ncu.log"))
  monkeypatch.setenv("FAKE_NCU_DETAILS", str(tmp_path / "details.txt"))
  monkeypatch.setenv("FAKE_NCU_CSV", str(tmp_path / "sass.csv"))
  return ncu


def test_profile_runs_ncu_on_the_decode_kernels_and_reads_its_pages(tmp_path, monkeypatch):
  monkeypatch.delenv("FAKE_NCU_NONE", raising=False)
  ncu = _fake_ncu(tmp_path, monkeypatch)
  argv = ["--ncu", str(ncu), "--kv", "int8", "--shape", "8x256", "--block-size", "32"]
  rows = _bench_rows("ncu_profile", argv, tmp_path / "out", "ncu_profile.jsonl")
  (row,) = rows
  assert row["case"] == "split_k_int8_8x256_b32"
  assert row["kernel_name"] == "paxcache_paged_decode_bs16_t128_s1"  # from the details page
  assert (row["kv"], row["shape"], row["block_size"]) == ("int8", "8x256", 32)
  assert row["registers_per_thread"] == 168.0 and row["samples"] == 100
  profile = (tmp_path / "ncu.log").read_text().splitlines()[0].split()
  # The decode kernels only (not the planned merge), the third call's launch, full set.
  assert profile[profile.index("-k") + 1] == "regex:paxcache_(paged|planned)_decode_bs"
  assert profile[profile.index("--launch-skip") + 1] == "2"
  assert profile[profile.index("--set") + 1] == "full"
  assert "--child" in profile and "--clock-control" in profile


def test_profile_refuses_a_run_that_profiled_nothing_even_with_an_old_report(tmp_path, monkeypatch):
  ncu = _fake_ncu(tmp_path, monkeypatch)
  out = tmp_path / "out"
  out.mkdir()
  (out / "ncu_split_k_bf16_64x8192_b16.ncu-rep").write_text("an earlier run's report")
  code = (
    "import os, runpy\n"
    "os.environ['FAKE_NCU_NONE'] = '1'\n"
    f"sys.argv = ['ncu_profile', '--ncu', {str(ncu)!r}, '--out', {str(out)!r}]\n"
    "runpy.run_module('experiments.bench.ncu_profile', run_name='__main__')\n"
  )
  proc = _python(code)
  assert proc.returncode != 0
  assert "profiled no kernel matching" in proc.stderr
  assert not (out / "ncu_profile.jsonl").exists()


def test_profile_says_when_ncu_is_missing(tmp_path):
  argv = ["ncu_profile", "--ncu", str(tmp_path / "no-ncu"), "--out", str(tmp_path)]
  code = (
    "import runpy\n"
    f"sys.argv = {argv!r}\n"
    "runpy.run_module('experiments.bench.ncu_profile', run_name='__main__')\n"
  )
  proc = _python(code)
  assert proc.returncode != 0 and "not found: pass --ncu" in proc.stderr
