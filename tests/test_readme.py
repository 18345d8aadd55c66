"""The README's Python examples run as written and compute what they say.

The blocks are read out of README.md, so an edit there that breaks them fails here.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np

from kernels.testing import tolerance

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _attend(q, k, v):
  """float64 softmax attention of one query row [Hq, D] over keys [T, Hkv, D] (GQA)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[0] // k.shape[1]
  out = np.zeros_like(q)
  for h in range(q.shape[0]):
    s = k[:, h // group] @ q[h] / np.sqrt(q.shape[1])
    p = np.exp(s - s.max())
    out[h] = p @ v[:, h // group] / p.sum()
  return out


def test_readme_has_the_two_examples():
  assert len(_python_blocks()) == 2


def test_api_example_shares_the_prefix_and_attends_over_it(capsys):
  ns: dict = {}
  exec(compile(_python_blocks()[0], "README.md[api]", "exec"), ns)
  printed = capsys.readouterr().out
  assert printed.split()[:1] == ["32"]
  # The prose under the example quotes its output on CPU (8 rows: bucket padding).
  quoted = re.search(r"It prints `([^`]*)` on CPU", README.read_text())
  assert quoted and quoted.group(1).split()[:-1] == printed.split()[:-1]  # all but backend
  out, q, k_new, v_new = (np.asarray(ns[n]) for n in ("out", "q", "k_new", "v_new"))
  tol = tolerance("attention_vs_float64", out.dtype)
  # Sequence "a": its 42 tokens are rows 0..41 of k_new/v_new.
  np.testing.assert_allclose(out[0], _attend(q[0], k_new[:42], v_new[:42]), **tol)
  # Sequence "b": the 32 cached prefix tokens are "a"'s, then its own 9 (rows 42..50).
  kb = np.concatenate([k_new[:32], k_new[42:]])
  vb = np.concatenate([v_new[:32], v_new[42:]])
  np.testing.assert_allclose(out[1], _attend(q[1], kb, vb), **tol)
  np.testing.assert_array_equal(out[2:], 0.0)  # bucket padding rows


def test_nnx_snippet_writes_block_3_only():
  ns: dict = {}
  exec(compile(_python_blocks()[1], "README.md[nnx]", "exec"), ns)
  y, (k, v) = np.asarray(ns["y"]), (np.asarray(x) for x in ns["kv"])
  assert y.shape == (5, 64) and np.isfinite(y).all()
  for pool in (k, v):
    assert np.abs(pool[:, 3, :5]).sum(-1).all()  # slots 24..28 = block 3, offsets 0..4
    assert not pool[:, 3, 5:].any() and not np.delete(pool, 3, axis=1).any()
