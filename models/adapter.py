"""The adapter protocol: the few things the engine needs from a unified multimodal model.

A RecA step, for any family, is

    visual  = model.encode_visual_prompt(und)             # [B, Nv, D]   understanding path
    target  = model.make_target(gen)                      # family's target (e.g. latents)
    embeds  = condition(prompt.input_ids, model.input_embeddings(), visual)   # placeholders <- visual
    loss    = model.generation_loss(embeds, prompt, target, generator)

where `prompt` (a `PromptBatch`: ids [B, P], mask [B, P]) comes from the engine's sample builder, which lays out
`model.template` with the image placeholder expanded to `model.num_visual_tokens` positions.
Another repository plugs its own model in by implementing this protocol on an `nn.Module`:
nothing else in the engine looks inside the model. Shapes: B batch, P prompt length (fixed),
D LLM width, Nv = B * num_visual_tokens, Hu/Wu the understanding view, Hg/Wg the generation view.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True, kw_only=True)
class ViewSpec:
    """The two views one decode of an image must produce for this model."""

    und_size: int  # understanding encoder's square input side, pixels
    und_mean: tuple[float, float, float]  # per-channel normalisation of the [0, 1] image
    und_std: tuple[float, float, float]
    gen_size: int  # generation target's square side, pixels; values in [-1, 1]
    gen_resize: str = "crop"  # "crop": aspect-preserving resize + centre crop | "stretch": to square (Harmon)
    #                           | "pad": to square with grey (127) bands (Harmon's image-to-text input)

    def same_pixels(self, und_downscale: float = 1.0) -> bool:
        """Both views hold the same pixels: equal sides, no deliberate downscale, and an
        understanding normalisation that maps [0, 1] to [-1, 1] as the generation view does
        (Harmon, whose visual prompt is the image's own latents). The loader then hands ONE
        tensor as both views (one resize, one copy), and `encode_views` may encode it once."""
        return (self.und_size == self.gen_size and und_downscale == 1.0
                and tuple(self.und_mean) == (0.5,) * 3 and tuple(self.und_std) == (0.5,) * 3)


@dataclass(frozen=True, kw_only=True)
class PromptTemplate:
    """A family's prompt around the visual tokens, e.g. Harmon's chat turn.

    `text` holds `{image}` (expanded to `num_visual_tokens` copies of `image_token`) and
    `{instruction}`; everything else is literal text, special tokens included.
    """

    text: str
    image_token: str = "<|image_pad|>"
    pad_token: str = "<|endoftext|>"


@dataclass
class PromptBatch:
    """Token ids of a batch of prompts, right-padded to a fixed length P so shapes never change."""

    input_ids: torch.Tensor  # [B, P] int64; image placeholders where the visual tokens go
    mask: torch.Tensor  # [B, P] bool; False on padding

    def to(self, device: torch.device | str) -> "PromptBatch":
        return PromptBatch(self.input_ids.to(device, non_blocking=True), self.mask.to(device, non_blocking=True))


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, what backward() is called on
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars, read back lazily


@runtime_checkable
class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...  # no special tokens added

    def token_id(self, token: str) -> int: ...  # id of a special token; KeyError if absent

    def save(self, directory: str) -> None: ...


@runtime_checkable
class RecaAdapter(Protocol):
    """What `reca.engine` calls. Implement it on an `nn.Module`; freeze what must stay frozen by
    `requires_grad_(False)` (the engine optimises exactly the parameters that require grad)."""

    views: ViewSpec
    template: PromptTemplate
    tokenizer: TextTokenizer
    num_visual_tokens: int  # visual-prompt tokens per image
    image_token_id: int  # id of `template.image_token`
    visual_grad_scale: float  # gradient scale on the visual-prompt path (Harmon: 0.1; 1.0 = off)

    def input_embeddings(self) -> torch.Tensor:
        """The LLM's token-embedding matrix [V, D] (the conditioning op gathers from it)."""
        ...

    def encode_visual_prompt(self, und: torch.Tensor) -> torch.Tensor:
        """Understanding view [B, 3, Hu, Wu] (normalised) -> visual-prompt embeddings [B, Nv/B, D]."""
        ...

    def make_target(self, gen: torch.Tensor, generator: torch.Generator | None = None) -> Any:
        """Generation view [B, 3, Hg, Wg] in [-1, 1] -> the family's target (e.g. VAE latents
        [B, T, C] or VQ codes [B, T]); no gradient flows through it. `generator` feeds a
        sampled posterior."""
        ...

    def generation_loss(
        self,
        prompt_embeds: torch.Tensor,
        prompt: PromptBatch,
        target: Any,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """The family's native generation loss on the target only, conditioned on the prompt.

        prompt_embeds [B, P, D] (the visual prompt already in place), `prompt` the ids and
        padding mask it came from. No loss term may fall on a prompt position. Randomness
        (timesteps, noise, masks) draws from `generator`.
        """
        ...

    # Optional: `load_pretrained(directory)` for `--init-from`; `no_weight_decay_modules()` ->
    # parameter-name prefixes the optimizer must not decay (beyond 1-D tensors and biases);
    # `caption_loss(embeds, prompt_mask, answer_ids, answer_mask) -> LossOutput` and
    # `caption_views: ViewSpec` for image-to-text micro-batches (`mix.cycle`);
    # `encode_views(und, gen, generator) -> (visual, target)`, both steps in one call, for a
    # family that can share work between them (Harmon encodes the image once when `und is gen`);
    # `flop_plan(prompt_len, useful) -> [Stage]`, the tokens each module processes per sample
    # (`reca.engine.flops`; without it `reca bench step` counts FLOPs with FlopCounterMode).

    def sample(
        self,
        prompt_embeds: torch.Tensor,
        prompt: PromptBatch,
        steps: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Generate images [B, 3, Hg, Wg] in [-1, 1] from a prompt (used for preview grids)."""
        ...
