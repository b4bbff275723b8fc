"""`RecaModule`: the base that turns a family's few native pieces into the engine's one call,

    out = model(batch, objective, generator=g)   # LossOutput for a training objective

so that a RecA micro-batch is one `forward` (FSDP2 gathers parameters around forwards) and the
conditioning runs inside the model. A family subclasses it and implements the pieces of the
objectives it declares in `objectives`:

    recon    encode_visual_prompt, make_target (or encode_views), generation_loss
    caption  caption_loss (the visual prompt, then cross-entropy on the answer)
    sample   generate (previews, `reca sample`)

`Conditioning` writes the visual prompt over the image placeholders through the kernel op, from
the LLM's own embedding table, inside the forward.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from reca.kernels import get_ops
from reca.models.adapter import (CaptionBatch, LossOutput, PromptBatch, PromptTemplate, ReconBatch, SampleBatch,
                                 ViewSpec)


class Conditioning(nn.Module):
    """Token embeddings [B, P, D] with the visual prompt [B, N, D] written over the image
    placeholders (`ops.condition`), the visual path's gradient scaled by `grad_scale` (Harmon:
    0.1). The embedding module is the LLM's: it is held, not registered, so that its parameter
    keeps the family's checkpoint name (`llm.model.embed_tokens.weight`)."""

    def __init__(self, embedding: nn.Embedding, ops, image_token_id: int, grad_scale: float = 1.0):
        super().__init__()
        self.__dict__["embedding"] = embedding  # a plain attribute: not a child, not in state_dict
        self.ops = ops if ops is not None else get_ops("torch")
        self.image_token_id, self.grad_scale = image_token_id, grad_scale

    def forward(self, input_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        scale = self.grad_scale if torch.is_grad_enabled() else 1.0
        return self.ops.condition(input_ids, self.embedding.weight, visual.flatten(0, 1), self.image_token_id, scale)


class RecaModule(nn.Module):
    """Base of every family (and of a user's adapter: see `reca.models.adapter.RecaAdapter`).

    Subclasses set `views`, `template`, `tokenizer`, `num_visual_tokens`, `image_token_id` and
    `self.conditioning` (a `Conditioning`) in `__init__`, list what they implement in
    `objectives` and `capabilities`, and implement those pieces."""

    objectives: frozenset[str] = frozenset({"recon", "sample"})
    capabilities: frozenset[str] = frozenset()  # "init_from", "export", "flop_plan"
    conditioning: Conditioning
    caption_template: PromptTemplate | None = None  # the image-to-text prompt; None: `template`
    caption_views: ViewSpec | None = None  # the image-to-text input view; None: `views`
    # `reca sample --prompt` (RecA's inference): the family's text-to-image prompt around
    # `{instruction}`, special tokens included; None: `template.text` with `{image}` removed
    text_prompt: str | None = None
    # True where the text-to-image prompt is the RecA template itself, visual slots kept
    # (BAGEL's `generate` drops its vit split by position); `text_prompt` is then unused
    text_prompt_keeps_image: bool = False
    # side of the generation target's token grid (latent_grid**2 generation tokens a sample):
    # `reca info` and the memory projection read it; 0 where the target is no square grid
    latent_grid: int = 0

    def train(self, mode: bool = True) -> "RecaModule":
        """`nn.Module.train`, then the submodules `eval_modules()` names back in eval mode: the
        engine calls `model.train()` once at build and after each preview, and PyTorch would put
        every submodule, frozen ones included, into training mode."""
        super().train(mode)
        if mode:
            for name in self.eval_modules():
                self.get_submodule(name).eval()
        return self

    def eval_modules(self) -> tuple[str, ...]:
        """Names of submodules (`named_modules` names) that stay in eval mode while the model
        trains: frozen parts whose dropout, drop path or batch-norm statistics the family's own
        trainer switches off. Default none: every submodule trains, frozen ones included, as
        `nn.Module.train()` sets them (OpenUni's frozen InternViT keeps its drop path so)."""
        return ()

    def forward(self, batch: Any, objective: str = "recon", generator: torch.Generator | None = None):
        if objective not in self.objectives:
            raise ValueError(f"{type(self).__name__} has no {objective!r} objective (it has {sorted(self.objectives)})")
        if objective == "recon":
            return self.recon_loss(batch, generator)
        if objective == "caption":
            return self.caption_loss(batch, generator)
        if objective == "sample":
            return self.generate(batch, generator)
        return getattr(self, f"{objective}_loss")(batch, generator)  # a family's own objective

    # --- recon: the RecA step ---------------------------------------------------------------
    def recon_loss(self, batch: ReconBatch, generator: torch.Generator | None = None) -> LossOutput:
        """The image's own understanding embeddings become the prompt of its regeneration."""
        visual, target = self.encode_views(batch.und, batch.gen, generator)
        embeds = self.conditioning(batch.prompt.input_ids, visual)  # [B, P, D]
        return self.generation_loss(embeds, batch.prompt, target, generator)

    def encode_views(self, und: torch.Tensor, gen: torch.Tensor, generator: torch.Generator | None = None):
        """(visual prompt [B, N, D], target): both paths; a family may share work between them."""
        return self.encode_visual_prompt(und), self.make_target(gen, generator)

    def encode_visual_prompt(self, und: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def make_target(self, gen: torch.Tensor, generator: torch.Generator | None = None) -> Any:
        raise NotImplementedError

    def generation_loss(self, prompt_embeds: torch.Tensor, prompt: PromptBatch, target: Any,
                        generator: torch.Generator | None = None) -> LossOutput:
        raise NotImplementedError

    # --- caption: image-to-text, when declared ----------------------------------------------
    def caption_loss(self, batch: CaptionBatch, generator: torch.Generator | None = None) -> LossOutput:
        raise NotImplementedError

    # --- sample: previews and `reca sample` ---------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: SampleBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, Hg, Wg] in [-1, 1] from the visual prompt of `batch.und` (or, with
        `batch.und` None, from the text prompt alone) in `batch.steps` steps."""
        ids = batch.prompt.input_ids
        if batch.und is None:  # text only: no placeholder to fill
            embeds = self.conditioning.embedding(ids)
        else:
            embeds = self.conditioning(ids, self.encode_visual_prompt(batch.und))
        return self.sample(embeds, batch.prompt, batch.steps, generator)

    def sample(self, prompt_embeds: torch.Tensor, prompt: PromptBatch, steps: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    # --- defaults of the optional members -----------------------------------------------------
    def no_weight_decay_modules(self) -> tuple[str, ...]:
        """Parameter-name prefixes exempt from weight decay beyond 1-D tensors and biases."""
        return ()

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameters per part, for `reca info` (beside the per-child table)."""
        return {}

    def codec_passes(self, same_pixels: bool) -> int:
        """Frozen-codec passes per RecA sample (the FLOP count): 1 unless the family encodes
        the understanding view with the codec too."""
        return 1
