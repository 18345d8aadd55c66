"""Flax NNX model glue: a paged attention layer and a small Llama-style decoder.

``PagedAttention`` is the layer users drop into their own NNX models; ``Decoder``
is the small model the engine, the tests and the demos run.
"""

from paxcache._fixtures import TINY_CHECKPOINT, TINY_CORPUS
from paxcache.nn._attention import PagedAttention, dense_causal_attention
from paxcache.nn._checkpoint import load_decoder, save_decoder
from paxcache.nn._config import DecoderConfig
from paxcache.nn._decoder import Decoder, DecoderLayer
from paxcache.nn._generate import greedy_generate_dense_cache, greedy_generate_no_cache
from paxcache.nn._layers import GEMMS, RMSNorm, SwiGLU, apply_rope, project

__all__ = [
  "TINY_CHECKPOINT",
  "TINY_CORPUS",
  "GEMMS",
  "Decoder",
  "DecoderConfig",
  "DecoderLayer",
  "PagedAttention",
  "RMSNorm",
  "SwiGLU",
  "apply_rope",
  "dense_causal_attention",
  "greedy_generate_dense_cache",
  "greedy_generate_no_cache",
  "load_decoder",
  "project",
  "save_decoder",
]
