"""Real models served through paxcache: GGUF Llama files (SmolLM2-135M-Instruct by default).

Needs the ``smollm`` extra (``gguf``, ``tokenizers``, ``jinja2``); imported lazily so
that ``import paxcache`` never needs them.
"""

from paxcache.models.gguf_llama import (
  ChatTemplate,
  GGUFError,
  GGUFLlamaMeta,
  GGUFModel,
  build_tokenizer,
  default_gguf_path,
  load_gguf_llama,
  unpermute_qk,
)

__all__ = [
  "ChatTemplate",
  "GGUFError",
  "GGUFLlamaMeta",
  "GGUFModel",
  "build_tokenizer",
  "default_gguf_path",
  "load_gguf_llama",
  "unpermute_qk",
]
