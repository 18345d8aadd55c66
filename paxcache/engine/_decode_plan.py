"""Which engine steps run the planned GPU decode, and the host planner that builds the plan.

``EngineConfig.decode_plan`` (``"auto"``, ``"on"``, ``"off"``) decides; :func:`decode_planner`
turns it, the model and the engine config into a :class:`DecodePlanner` (or None: no step
is planned), and ``build_step_batch`` calls the planner on every decode-only step that has
no cascade plan. The plan itself is ``kernels.gpu.plan_decode``: NumPy on the host, from
the step's padded lengths, outside jit (docs/engine.md, "Planned decode").

``kernels.gpu`` is imported only when a plan is built: an engine on the reference or TPU
backend never loads the Pallas GPU code.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import kernels
from kernels._layout import padded_width
from kernels._validate import GPU_UNPADDED_HEAD_DIMS

DECODE_PLAN_MODES = ("auto", "on", "off")

# "auto" plans a decode step when its longest row holds more than this many times the mean
# row's keys. Measured on an H200 (docs/benchmarks.md, "Ragged decode by a work plan"; max
# / mean of the case, planned over default decode): 1.0 (full-length batches) 0.93-0.99x;
# 1.96 (uniform in [1, 8192]) 1.48x; 4.5 (ShareGPT-like) 1.52x; 51 (one long among short)
# 9x. The bar sits between the two measured sides, 1.0 and 1.96; 1.5 itself is not measured.
RAGGED_MAX_OVER_MEAN = 1.5


@dataclasses.dataclass(frozen=True)
class DecodePlanner:
  """Builds a decode step's ``kernels.gpu.plan.DecodePlan`` on the host, or declines.

  Attributes:
    mode: ``"on"`` (plan every decode step it is given) or ``"auto"`` (only ragged ones:
      :meth:`wants`).
    block_size, num_kv_heads: of the engine's cache.
    sliding_window: the window every attention layer shares (the plan then covers only
      the keys the queries see), or None: no window, or layers with different windows
      (a plan without a window covers every key, and each layer's kernel masks its own).
    min_ragged: ``"auto"`` plans when ``max(length) > min_ragged * mean(length)`` over the
      step's rows (visible keys with a window).
    kv_tile, min_chunk_tokens, chunk_tokens: passed to ``plan_decode`` when not None (its
      defaults otherwise); tests cut small plans with them.
  """

  mode: str
  block_size: int
  num_kv_heads: int
  sliding_window: int | None = None
  min_ragged: float = RAGGED_MAX_OVER_MEAN
  kv_tile: int | None = None
  min_chunk_tokens: int | None = None
  chunk_tokens: int | None = None

  def __post_init__(self):
    if self.mode not in ("auto", "on"):
      raise ValueError(f"DecodePlanner.mode must be 'auto' or 'on', got {self.mode!r}")

  def wants(self, lengths: np.ndarray) -> bool:
    """Whether ``"auto"`` plans a step of these row lengths (real rows, not padding)."""
    n = lengths.shape[0]
    if n < 2:
      return False
    if self.sliding_window is not None:
      lengths = np.minimum(lengths, self.sliding_window)
    return int(lengths.max()) * n > self.min_ragged * int(lengths.sum())

  def __call__(self, lengths: np.ndarray, rows: int):
    """The plan of a decode step, or None when ``"auto"`` declines it.

    Args:
      lengths: ``i32[batch]``, the step's padded lengths (padding rows 0).
      rows: the real rows (the first ``rows`` of ``lengths``).
    """
    if self.mode == "auto" and not self.wants(lengths[:rows]):
      return None
    from kernels.gpu.plan import plan_decode  # the GPU package is heavy: only when used

    options = {
      name: getattr(self, name)
      for name in ("kv_tile", "min_chunk_tokens", "chunk_tokens")
      if getattr(self, name) is not None
    }
    return plan_decode(
      lengths, self.block_size, self.num_kv_heads, sliding_window=self.sliding_window, **options
    )


def decode_planner(model, config) -> DecodePlanner | None:
  """The planner of an engine running ``model`` (a ``paxcache.nn.Decoder``) under
  ``config`` (an ``EngineConfig``), or None when no step is to be planned.

  ``"off"``: None. ``"auto"``: None unless every attention layer resolves to the GPU
  backend (``kernels.resolve_backend`` of its ``backend`` and ``interpret``, as the layer
  itself resolves it) and the engine has no mesh. ``"on"``: a planner, or ValueError where
  ``"auto"`` would give None (the plan cannot run there: never a silent fallback).
  """
  mode = config.decode_plan
  if mode == "off":
    return None
  layers = [layer.attn for layer in model.layers]
  backends = sorted({kernels.resolve_backend(a.backend, interpret=a.interpret) for a in layers})
  reason = None
  if backends != ["gpu"]:
    reason = f"the model's attention runs on {backends}, and only the GPU backend has a plan"
  elif config.mesh is not None:
    reason = "a sharded engine (mesh) runs attention under shard_map, which takes no plan yet"
  if reason is not None:
    if mode == "on":
      raise ValueError(f"EngineConfig.decode_plan='on': {reason}; use 'auto' or 'off'")
    return None
  windows = {a.sliding_window for a in layers}
  return DecodePlanner(
    mode=mode,
    block_size=config.block_size,
    num_kv_heads=model.config.num_kv_heads,
    sliding_window=windows.pop() if len(windows) == 1 else None,
  )


def cascade_threshold(model, config) -> tuple[int, str | None]:
  """``EngineConfig.cascade_min_shared_blocks`` as the engine applies it to ``model``.

  Returns ``(blocks, reason)``: the configured value and None where cascade attention can
  run, else ``(0, why not)``: under a mesh (no cascade under ``shard_map`` yet), with a
  sliding-window layer (``kernels.cascade_attention`` takes no window), and on the GPU
  backend at a head_dim its cascade kernel does not take (it does not pad the head dim:
  ``kernels._validate.GPU_UNPADDED_HEAD_DIMS``; a lane-padded cache,
  ``EngineConfig.lane_padded_cache``, runs it at the rows' width, 128 for head_dim 96).
  Turning it off changes no output: the plain path computes the same attention.
  """
  blocks = config.cascade_min_shared_blocks
  if blocks == 0:
    return 0, None
  layers = [layer.attn for layer in model.layers]
  if config.mesh is not None:
    return 0, "a sharded engine (mesh) runs attention under shard_map, which has no cascade yet"
  if any(a.sliding_window is not None for a in layers):
    return 0, "a sliding-window layer: kernels.cascade_attention takes no window"
  backends = {kernels.resolve_backend(a.backend, interpret=a.interpret) for a in layers}
  head_dim = model.config.head_dim
  # A lane-padded cache: the kernels run at the padded width (q zero-padded to it).
  width = padded_width(head_dim) if config.lane_padded_cache else head_dim
  if "gpu" in backends and width not in GPU_UNPADDED_HEAD_DIMS:
    return 0, (
      f"head_dim {head_dim} on the GPU backend: its cascade kernel takes head_dim in "
      f"{GPU_UNPADDED_HEAD_DIMS}"
    )
  return blocks, None
