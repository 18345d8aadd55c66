"""Length workloads: synthetic means, the token-count rule, the ShareGPT JSON loader."""

import json
import os

import numpy as np
import pytest

from experiments import workloads

DATA = os.path.join(os.path.dirname(__file__), "data", "sharegpt_tiny.json")


@pytest.mark.parametrize("dist", [workloads.SHAREGPT, workloads.ALPACA], ids=lambda d: d.name)
def test_synthetic_means_match_published_statistics(dist):
  lengths = workloads.sample_synthetic(dist, 40_000, max_seq_len=2048, seed=1)
  assert lengths.shape == (40_000, 2) and lengths.dtype == np.int64
  # The calibration matches the means on its own 100k draws; 40k fresh draws of a
  # log-normal with sigma <= 1 have a relative standard error of the mean under 1%.
  np.testing.assert_allclose(lengths.mean(axis=0), [dist.input_mean, dist.output_mean], rtol=0.03)
  assert lengths.min() >= 1
  assert lengths.sum(axis=1).max() <= 2048


def test_synthetic_is_deterministic_per_seed_and_respects_max_seq_len():
  a = workloads.sample_synthetic(workloads.SHAREGPT, 500, max_seq_len=512, seed=3)
  b = workloads.sample_synthetic(workloads.SHAREGPT, 500, max_seq_len=512, seed=3)
  c = workloads.sample_synthetic(workloads.SHAREGPT, 500, max_seq_len=512, seed=4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.sum(axis=1).max() <= 512


@pytest.mark.parametrize(
  "text, tokens",
  [
    ("", 1),  # at least one token
    ("abcd", 1),
    ("abcde", 2),
    ("é", 1),  # 2 UTF-8 bytes
    ("日本語", 3),  # 9 UTF-8 bytes -> ceil(9 / 4)
  ],
)
def test_token_count_rule_is_ceil_utf8_bytes_over_four(text, tokens):
  assert workloads.count_tokens(text) == tokens


def test_load_sharegpt_uses_first_two_turns_and_skips_single_turns():
  lengths = workloads.load_sharegpt(DATA, max_seq_len=2048)
  # Hand-counted UTF-8 bytes: a = 19 and 82 bytes, b has one turn (skipped),
  # c = 28 and 4 bytes, d = 42 and 18 bytes (accented letters and guillemets are 2 bytes).
  np.testing.assert_array_equal(lengths, [[5, 21], [7, 1], [11, 5]])


def test_load_sharegpt_drops_pairs_longer_than_max_seq_len():
  lengths = workloads.load_sharegpt(DATA, max_seq_len=16)
  np.testing.assert_array_equal(lengths, [[7, 1], [11, 5]])


def test_workload_lengths_reads_json_paths_shuffled_and_capped():
  lengths = workloads.workload_lengths(DATA, 2, max_seq_len=2048, seed=0)
  assert lengths.shape == (2, 2)
  all_rows = {tuple(r) for r in [[5, 21], [7, 1], [11, 5]]}
  assert {tuple(r) for r in lengths.tolist()} <= all_rows
  assert workloads.workload_label(DATA) == "sharegpt_tiny.json"


@pytest.mark.parametrize(
  "content, message",
  [
    ({"conversations": []}, "expected a JSON list"),
    ([{"id": 1}], "no 'conversations' list"),
    ([{"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}], "string 'value'"),
    ([{"conversations": [{"from": "human", "value": "only one"}]}], "no conversation"),
  ],
)
def test_load_sharegpt_rejects_malformed_files(tmp_path, content, message):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(content))
  with pytest.raises(ValueError, match=message):
    workloads.load_sharegpt(str(path), max_seq_len=2048)


def test_unknown_workload_names_the_choices():
  with pytest.raises(ValueError, match="unknown workload 'lmsys'.*alpaca"):
    workloads.workload_lengths("lmsys", 10, max_seq_len=2048, seed=0)
  with pytest.raises(ValueError, match="does not exist"):
    workloads.workload_lengths("/nonexistent/file.json", 10, max_seq_len=2048, seed=0)


def test_a_max_seq_len_that_keeps_almost_nothing_is_an_error():
  with pytest.raises(ValueError, match="keeps under 1%"):
    workloads.sample_synthetic(workloads.SHAREGPT, 10, max_seq_len=8, seed=0)
