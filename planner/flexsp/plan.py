"""FlexSP plan: per training step, per micro-batch, a set of concurrent SP groups of power-of-two degree,
each with its ranks and the sequences it runs. The runtime reads this through the model only."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..plan import Plan

__all__ = ["SPGroup", "SPMicroBatch", "SPStep", "SPPlan"]


class SPGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    degree: int = Field(ge=1, description="SP degree (power of two) = len(ranks)")
    ranks: list[int] = Field(description="global ranks, contiguous and aligned to the degree (buddy placement)")
    seq_ids: list[int] = Field(description="indices into the step's sequence list")
    seqlens: list[int] = Field(description="lengths (tokens) of those sequences, same order")
    predicted_ms: float = Field(ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> "SPGroup":
        if self.degree & (self.degree - 1):
            raise ValueError(f"degree {self.degree} is not a power of two")
        if len(self.ranks) != self.degree:
            raise ValueError(f"group of degree {self.degree} lists {len(self.ranks)} ranks")
        if len(self.seq_ids) != len(self.seqlens):
            raise ValueError("seq_ids and seqlens differ in length")
        if any(s <= 0 for s in self.seqlens):
            raise ValueError("seqlens must be positive")
        return self


class SPMicroBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    groups: list[SPGroup]
    predicted_ms: float = Field(ge=0.0, description="makespan over the concurrent groups")


class SPStep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=0)
    seqlens: list[int] = Field(description="the global batch's sequence lengths; seq_ids index this list")
    micro_batches: list[SPMicroBatch]
    predicted_ms: float = Field(ge=0.0)
    baselines_ms: dict[str, float] = Field(default_factory=dict)


class SPPlan(Plan):
    kind: Literal["sp"] = "sp"
    world_size: int = Field(ge=1)
    model: str = Field(description="model preset name or shape description")
    max_context: int | None = None
    steps: list[SPStep]

    @model_validator(mode="after")
    def _check_world(self) -> "SPPlan":
        for st in self.steps:
            for mi, mb in enumerate(st.micro_batches):
                used: set[int] = set()
                for g in mb.groups:
                    for r in g.ranks:
                        if r < 0 or r >= self.world_size:
                            raise ValueError(f"steps.{st.step}.micro_batches.{mi}: rank {r} outside world size {self.world_size}")
                        if r in used:
                            raise ValueError(f"steps.{st.step}.micro_batches.{mi}: rank {r} in two groups")
                        used.add(r)
        return self
