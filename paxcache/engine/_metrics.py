"""Per-step and per-run engine metrics."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StepMetrics:
  """One engine iteration (host scheduling + one device step)."""

  step: int
  num_seqs: int  # block-table rows with query tokens this step (the batch size)
  num_tokens: int  # query tokens computed (prefill chunks + decode tokens)
  num_prefill_tokens: int  # of those, tokens of sequences with more than one new token
  num_sampled: int  # tokens sampled (forks sample several from one row)
  padded_shape: tuple[int, int, int]  # (num_tokens, batch, max_blocks) bucket given to jit
  blocks_used: int
  blocks_cached: int
  blocks_free: int
  host_blocks_used: int
  prefix_hit_tokens: int  # prompt tokens served from the prefix cache at admission
  preemptions_swap: int
  preemptions_recompute: int
  swapped_out_blocks: int
  swapped_in_blocks: int
  cow_copies: int
  seconds: float  # wall time of the whole iteration
  tokens_per_s: float  # num_tokens / seconds
  decode_batch: int = 0  # rows with exactly one query token
  kv_tokens: int = 0  # K/V tokens attention reads: the sum of the rows' context lengths
  clock: float = 0.0  # the engine clock's time after the step (seconds)
  # Cascade attention (EngineConfig.cascade_min_shared_blocks): groups planned this step,
  # their member rows, and the K/V token reads saved per layer and KV head
  # (sum over groups of (members - 1) * shared tokens); all 0 on a plain step.
  cascade_groups: int = 0
  cascade_rows: int = 0
  cascade_saved_tokens: int = 0
  # The planned GPU decode (EngineConfig.decode_plan): real chunks of the step's plan
  # (sequence x key-range pieces, before padding to a bucket); 0 on a step without one.
  decode_plan_chunks: int = 0
  # Decode steps the step's call ran (EngineConfig.decode_steps: a burst runs several, each
  # a token for every one of its decode_batch rows; num_tokens and kv_tokens count them
  # all); 1 on a plain step with decodes, 0 on one without.
  decode_steps: int = 0


@dataclasses.dataclass
class RunMetrics:
  """Totals since the engine was created."""

  steps: int = 0
  seconds: float = 0.0
  computed_tokens: int = 0
  prefill_tokens: int = 0
  generated_tokens: int = 0
  prefix_hit_tokens: int = 0
  prompt_tokens: int = 0  # prompt tokens of admitted requests (first admission only)
  preemptions_swap: int = 0
  preemptions_recompute: int = 0
  # Tokens a recompute preemption threw away (computed, or prefix-cache hits), computed
  # again at re-admission less any prefix-cache hits then: exact without prefix caching,
  # an upper bound with it.
  recomputed_tokens: int = 0
  swapped_out_blocks: int = 0
  swapped_in_blocks: int = 0
  cow_copies: int = 0
  max_batch: int = 0
  max_blocks_used: int = 0
  finished_requests: int = 0
  aborted_requests: int = 0
  compiled_shapes: int = 0  # distinct padded shapes the step was called with
  cascade_steps: int = 0  # steps that ran cascade attention (a plan with >= 1 group)
  cascade_groups: int = 0  # groups over those steps
  cascade_saved_tokens: int = 0  # K/V token reads saved per layer and KV head, summed
  planned_steps: int = 0  # steps that ran the planned GPU decode (EngineConfig.decode_plan)
  decode_plan_chunks: int = 0  # real plan chunks over those steps

  @property
  def preemptions(self) -> int:
    return self.preemptions_swap + self.preemptions_recompute

  @property
  def tokens_per_s(self) -> float:
    return self.computed_tokens / self.seconds if self.seconds else 0.0

  @property
  def generated_tokens_per_s(self) -> float:
    return self.generated_tokens / self.seconds if self.seconds else 0.0

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(
      preemptions=self.preemptions,
      tokens_per_s=self.tokens_per_s,
      generated_tokens_per_s=self.generated_tokens_per_s,
    )
    return d
