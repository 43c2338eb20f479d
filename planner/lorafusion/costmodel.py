"""Per-microbatch pipeline-stage cost of multi-job LoRA fine-tuning, from a cluster profile (pure functions).

One pipeline stage holds ``layers / S`` transformer layers. For one microbatch a stage costs (fwd + bwd, ms)::

    layers_per_stage * ( linear.ms_per_token * padded_tokens + linear.b_ms
                         + sum_i (attention.a1 * L_i^2 + attention.a2 * L_i) + attention.b_ms )

- ``profile.linear`` is the fitted fwd+bwd time of one Llama-7B-like layer's linear layers (QKV, O, MLP)
  per token; ``padded_tokens`` counts every row the GEMMs touch, i.e. segment padding to the 128-row M tile
  (packed plans: each adapter's segment is rounded up, the multi-LoRA kernel's tiles hold one adapter) or
  padding to the longest sample, the whole batch then rounded up to the M tile once (mLoRA-style batches).
- ``profile.attention`` is the fitted fwd+bwd causal attention of one layer for one sequence; packed
  microbatches run one variable-length attention call over their samples (each sample attends only to
  itself), padded batches run every row at the padded length.
- The forward is taken as 1/3 and the backward as 2/3 of the fwd+bwd time (``FWD_FRACTION``).
- The same per-token cost is used for every schedule (LoRAFusion plan and baselines), so the ratios
  isolate scheduling and packing; the fused-kernel speed-up (kernels/lora.py) is NOT folded in.
- Point-to-point activation transfers between stages and the adapters' optimizer steps are not modelled
  (LoRA parameters are ~0.1 % of the base model).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from .jobs import SEGMENT_ALIGN

__all__ = ["FWD_FRACTION", "StageCost", "stage_cost_from_profile", "stage_layers", "padded", "SEGMENT_ALIGN"]

FWD_FRACTION = 1.0 / 3.0


def padded(tokens: int, align: int = SEGMENT_ALIGN) -> int:
    """``tokens`` rounded up to a multiple of ``align``."""
    return -(-int(tokens) // align) * align


@dataclass(frozen=True)
class StageCost:
    """Cost terms of one pipeline stage (ms), as stored in a LoRA plan so it can be re-simulated."""

    layers_per_stage: float
    linear_ms_per_token: float
    linear_b_ms: float
    attn_a1_ms_per_tok2: float
    attn_a2_ms_per_tok: float
    attn_b_ms: float
    profile: str = ""

    def packed_ms(self, padded_tokens: int, sample_lengths: Sequence[int]) -> float:
        """fwd+bwd ms of one packed microbatch on one stage (varlen attention per sample)."""
        if padded_tokens <= 0:
            return 0.0
        att = sum(self.attn_a1_ms_per_tok2 * L * L + self.attn_a2_ms_per_tok * L for L in sample_lengths)
        per_layer = self.linear_ms_per_token * padded_tokens + self.linear_b_ms + att + self.attn_b_ms
        return self.layers_per_stage * per_layer

    def padded_batch_ms(self, rows: int, row_length: int) -> float:
        """fwd+bwd ms of a [rows x row_length] padded batch on one stage (attention over the padded rows). The
        GEMMs run ``rows * row_length`` tokens rounded up to the M tile once (``padded``), as a packed
        microbatch's segments are: both kinds of batch pay the tile rounding of the kernels that run them."""
        if rows <= 0:
            return 0.0
        att = rows * (self.attn_a1_ms_per_tok2 * row_length ** 2 + self.attn_a2_ms_per_tok * row_length)
        per_layer = self.linear_ms_per_token * padded(rows * row_length) + self.linear_b_ms + att + self.attn_b_ms
        return self.layers_per_stage * per_layer

    def stage_scales(self, stages: int) -> list[float] | None:
        """Per-stage multipliers of ``packed_ms``/``padded_batch_ms`` for the split the trainer runs
        (:func:`stage_layers`: stage s holds floor(L (s+1) / S) - floor(L s / S) of the L layers);
        None when every stage holds ``layers_per_stage`` (L divisible by S). 5 layers over 4 stages are
        [1, 1, 1, 2]: the last stage takes 2 / 1.25 of the uniform share (the pipeline ran up to 1.39x slower than
        the plan said)."""
        total = self.layers_per_stage * stages
        L = round(total)
        if stages <= 1 or L < stages or abs(total - L) > 1e-6 * max(1.0, total) or L % stages == 0:
            return None
        return [(hi - lo) / self.layers_per_stage for lo, hi in (stage_layers(L, stages, s) for s in range(stages))]

    def as_dict(self) -> dict:
        return asdict(self)


def stage_layers(num_layers: int, stages: int, stage: int) -> tuple[int, int]:
    """Contiguous, balanced layer range [start, end) of ``stage``: the split the LoRA trainer runs
    (runtime.lora_trainer imports it) and :meth:`StageCost.stage_scales` simulates."""
    if not 0 <= stage < stages or stages > num_layers:
        raise ValueError(f"stage {stage} of {stages} over {num_layers} layers: need 0 <= stage < stages <= layers")
    return (num_layers * stage) // stages, (num_layers * (stage + 1)) // stages


def stage_cost_from_profile(profile, layers: int, stages: int) -> StageCost:
    """Stage cost terms from ``profile.linear`` and ``profile.attention`` for ``layers`` split over ``stages``."""
    profile.require("linear", "attention", who="plan lora")
    return StageCost(
        layers_per_stage=layers / stages,
        linear_ms_per_token=profile.linear.ms_per_token,
        linear_b_ms=profile.linear.b_ms,
        attn_a1_ms_per_tok2=profile.attention.a1_ms_per_tok2,
        attn_a2_ms_per_tok=profile.attention.a2_ms_per_tok,
        attn_b_ms=profile.attention.b_ms,
        profile=profile.name,
    )
