"""Saving and loading a decoder: ``config.json`` plus ``params.msgpack`` (flax serialization)."""

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


def save_decoder(model: Decoder, directory: str, extra: dict | None = None) -> None:
  """Writes ``config.json`` (with ``extra`` under key ``"extra"``) and ``params.msgpack``."""
  os.makedirs(directory, exist_ok=True)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for i, layer in enumerate(model.layers):  # a sharded model's gate/up columns, in order
    params["layers"][i]["mlp"]["gate_up"] = layer.mlp.canonical_gate_up()
  params = jax.tree.map(np.asarray, params)
  with open(os.path.join(directory, PARAMS_FILE), "wb") as f:
    f.write(serialization.msgpack_serialize(params))
  meta = json.loads(model.config.to_json())
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump({"config": meta, "extra": extra or {}}, f, indent=2, sort_keys=True)


def load_decoder(
  directory: str = TINY_CHECKPOINT,
  *,
  backend: str = "auto",
  interpret: bool = False,
  kv_dtype: str | None = None,
) -> Decoder:
  """Builds a :class:`Decoder` from ``directory`` (default: the tiny model in the package).

  ``kv_dtype`` overrides the checkpoint's ``DecoderConfig.kv_dtype`` (e.g. "int8" for an
  8-bit paged cache); None keeps it. Files written before the MLP's gate and up kernels
  became one weight load too (their two kernels side by side in ``gate_up``). A parameter
  whose shape differs from the model's is refused (ValueError)."""
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    meta = json.load(f)
  config = DecoderConfig.from_dict(meta["config"])
  if kv_dtype is not None:
    config = dataclasses.replace(config, kv_dtype=kv_dtype)
  model = Decoder(config, backend=backend, interpret=interpret, rngs=nnx.Rngs(0))
  with open(os.path.join(directory, PARAMS_FILE), "rb") as f:
    params = serialization.msgpack_restore(f.read())
  params = _upgrade(params)
  state = nnx.state(model, nnx.Param)
  # Each array takes the model's own dtype (a config with param_dtype="bfloat16" keeps it).
  like = nnx.to_pure_dict(state)

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


def _upgrade(params: dict) -> dict:
  """Parameters saved before the MLP's gate and up kernels became one weight: each layer's
  ``mlp.gate.kernel`` and ``mlp.up.kernel`` ``[d, f]`` side by side in ``mlp.gate_up``
  ``[d, 2f]`` (:class:`paxcache.nn.SwiGLU`); newer files pass through unchanged. A layer
  with only one of the two, or with both forms, is not a file this code wrote
  (ValueError)."""
  for key, layer in params.get("layers", {}).items():
    mlp = layer.get("mlp", {})
    old = [name for name in ("gate", "up") if name in mlp]
    if not old:
      continue
    if len(old) != 2 or "gate_up" in mlp:
      raise ValueError(
        f"layer {key}'s mlp holds {sorted(mlp)}: expected either 'gate_up' (this version) "
        "or 'gate' and 'up' (older files), not a mix"
      )
    gate, up = mlp.pop("gate")["kernel"], mlp.pop("up")["kernel"]
    mlp["gate_up"] = np.concatenate([np.asarray(gate), np.asarray(up)], axis=1)
  return params
