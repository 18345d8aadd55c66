"""Saving and loading a decoder: ``config.json`` plus ``params.msgpack`` (flax serialization).

``config.json`` holds ``{"format": FORMAT, "config": DecoderConfig, "extra": {...}}``.
Formats: 1 (no ``"format"`` key; files written before it existed): each layer's MLP gate
and up kernels and attention's q, k and v kernels as separate parameters, or already fused;
2: ``mlp.gate_up`` and ``attn.qkv`` only, in the one-device column order.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx, serialization

from paxcache._fixtures import TINY_CHECKPOINT
from paxcache.nn._config import DecoderConfig
from paxcache.nn._decoder import Decoder

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.msgpack"
FORMAT = 2  # what save_decoder writes; load_decoder reads 1 and 2


def save_decoder(model: Decoder, directory: str, extra: dict | None = None) -> None:
  """Writes ``config.json`` (with ``extra`` under key ``"extra"``) and ``params.msgpack``."""
  os.makedirs(directory, exist_ok=True)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for i, layer in enumerate(model.layers):  # a sharded model's fused columns, in order
    params["layers"][i]["mlp"]["gate_up"] = layer.mlp.canonical_gate_up()
    params["layers"][i]["attn"]["qkv"] = layer.attn.canonical_qkv()
  params = jax.tree.map(np.asarray, params)
  with open(os.path.join(directory, PARAMS_FILE), "wb") as f:
    f.write(serialization.msgpack_serialize(params))
  meta = json.loads(model.config.to_json())
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump({"format": FORMAT, "config": meta, "extra": extra or {}}, f, indent=2, sort_keys=True)


def load_decoder(
  directory: str = TINY_CHECKPOINT,
  *,
  backend: str = "auto",
  interpret: bool = False,
  kv_dtype: str | None = None,
  gemm: str = "auto",
  kv_rotation: bool | None = None,
  fused_write_8bit: bool | None = None,
) -> Decoder:
  """Builds a :class:`Decoder` from ``directory`` (default: the tiny model in the package).

  ``backend``, ``interpret``, ``gemm`` and ``fused_write_8bit`` are :class:`Decoder`'s.

  ``kv_dtype`` overrides the checkpoint's ``DecoderConfig.kv_dtype`` (e.g. "int8" for an
  8-bit paged cache); None keeps it; ``kv_rotation`` (``DecoderConfig.kv_rotation``)
  likewise. Files written before the MLP's gate and up kernels,
  or attention's q, k and v kernels, became one weight (format 1, the module docstring)
  load too (their kernels side by side in ``gate_up`` and ``qkv``). ValueError, naming
  the file and the parameter, for a format this version does not read, a parameter the
  model lacks or the file lacks, or a shape that differs from the model's."""
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    meta = json.load(f)
  fmt = meta.get("format", 1)
  if isinstance(fmt, bool) or not isinstance(fmt, int) or not 1 <= fmt <= FORMAT:
    newer = isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > FORMAT
    raise ValueError(
      f"{os.path.join(directory, CONFIG_FILE)}: checkpoint format {fmt!r}; this version of "
      f"paxcache reads formats 1 to {FORMAT}" + (" (a newer paxcache wrote it?)" if newer else "")
    )
  config = DecoderConfig.from_dict(meta["config"])
  if kv_dtype is not None:
    config = dataclasses.replace(config, kv_dtype=kv_dtype)
  if kv_rotation is not None:
    config = dataclasses.replace(config, kv_rotation=kv_rotation)
  model = Decoder(
    config,
    backend=backend,
    interpret=interpret,
    gemm=gemm,
    fused_write_8bit=fused_write_8bit,
    rngs=nnx.Rngs(0),
  )
  with open(os.path.join(directory, PARAMS_FILE), "rb") as f:
    params = serialization.msgpack_restore(f.read())
  if fmt == 1:
    params = _upgrade(params)
  state = nnx.state(model, nnx.Param)
  # Each array takes the model's own dtype (a config with param_dtype="bfloat16" keeps it).
  like = nnx.to_pure_dict(state)
  _check_names(os.path.join(directory, PARAMS_FILE), params, like)

  def take(path, a, ref):
    a = np.asarray(a)
    if a.shape != ref.shape:
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      raise ValueError(
        f"{directory}: parameter {name} is {a.shape} in the file, {ref.shape} in the model "
        "its config.json builds"
      )
    return a.astype(ref.dtype)

  params = jax.tree_util.tree_map_with_path(take, params, like)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


def _paths(tree, prefix=()):
  """Key paths (typed: the int 0 and the string "0" differ) of ``tree``'s leaves and of its
  empty dicts, which have no leaves but still make two trees differ."""
  if isinstance(tree, dict):
    if not tree:
      yield (*prefix, "{}")
    for k, v in tree.items():
      yield from _paths(v, (*prefix, k))
  else:
    yield prefix


def _names(tree) -> dict[tuple, str]:
  """``{key path: its name}``; a digit string key is quoted, so that a file whose layer keys
  are strings shows where the model's are ints."""
  return {
    path: "/".join(repr(k) if isinstance(k, str) and k.isdigit() else str(k) for k in path)
    for path in _paths(tree)
  }


def _check_names(where: str, params, like) -> None:
  """ValueError unless the file's parameters are the model's, by (typed) name; then the
  two trees have the same structure."""
  got, want = _names(params), _names(like)
  missing = sorted(want[p] for p in set(want) - set(got))
  unexpected = sorted(got[p] for p in set(got) - set(want))
  if missing or unexpected:
    raise ValueError(
      f"{where}: the parameters are not those of the model its config.json builds: "
      f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
      f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
    )


def _upgrade(params: dict) -> dict:
  """Parameters saved before fused weights: each layer's ``mlp.gate`` and ``mlp.up``
  kernels ``[d, f]`` side by side in ``mlp.gate_up`` ``[d, 2f]`` (:class:`paxcache.nn.SwiGLU`),
  and its ``attn.q_proj``, ``attn.k_proj`` and ``attn.v_proj`` kernels in ``attn.qkv``
  (:class:`paxcache.nn.PagedAttention`); newer files pass through unchanged. A layer with
  only some of the old kernels, or with both forms, is not a file this code wrote
  (ValueError)."""
  for key, layer in params.get("layers", {}).items():
    _fuse(key, layer.get("mlp", {}), "mlp", ("gate", "up"), "gate_up")
    _fuse(key, layer.get("attn", {}), "attn", ("q_proj", "k_proj", "v_proj"), "qkv")
  return params


def _fuse(key, module: dict, where: str, old_names: tuple[str, ...], fused: str) -> None:
  old = [name for name in old_names if name in module]
  if not old:
    return
  if len(old) != len(old_names) or fused in module:
    raise ValueError(
      f"layer {key}'s {where} holds {sorted(module)}: expected either {fused!r} (this "
      f"version) or {' and '.join(map(repr, old_names))} (older files), not a mix"
    )
  kernels = [np.asarray(module.pop(name)["kernel"]) for name in old_names]
  module[fused] = np.concatenate(kernels, axis=1)
