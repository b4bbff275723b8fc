"""The token plan a family declares for the analytic FLOP count (`reca.engine.bench.flops`):
a neutral type, so that models never import the engine."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One module of the step (a dotted path under the model: "llm", "mar.encoder_blocks"):
    `tokens` it processes per sample; its attention layers (if any) over sequences of `attn_len`
    with query width `attn_width`. A module run twice (Harmon's MAR encoder: the visual prompt,
    then the kept tokens) is two stages; their FLOPs add up under its name."""

    module: str
    tokens: float
    attn_layers: int = 0
    attn_len: float = 0
    attn_width: int = 0
