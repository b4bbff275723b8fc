"""Objectives: what a micro-batch trains, one registry entry each.

An entry says which images feed it (its data source and loader view), how a batch of them
becomes the model's input (prompt building, answers), and the name the model's forward is
called with (`model(batch, name)`: which loss). `mix.cycle` picks the objective of each
micro-batch; the cycle position follows the optimizer step, so a resumed run continues it.

    recon    RecA: the image's own visual prompt + an instruction -> regenerate the image
    caption  image-to-text cross-entropy on a caption (Harmon's 2 : 2 mix, Show-o's mmu)

A family's new objective is one more entry here (and the model's `<name>_loss`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from reca.engine.config import RunConfig
from reca.engine.errors import UserError
from reca.engine.sample import SampleBuilder, load_instructions
from reca.models.adapter import CaptionBatch, PromptBatch, ReconBatch, ViewSpec


@dataclass(frozen=True)
class Objective:
    name: str  # what the model's forward is called with
    state_key: str  # its loader's position in the checkpoint's data state
    data: Callable[[RunConfig], Any]  # the DataConfig of its loader
    views: Callable[[Any], ViewSpec]  # the model's view spec for it
    builder: Callable[[Any, RunConfig], SampleBuilder]  # its prompt builder
    batch: Callable[[Any, RunConfig, Any, torch.device], Any]  # (builder, cfg, ImageBatch, device) -> model input


def _recon_data(cfg: RunConfig):
    return cfg.data


def _caption_data(cfg: RunConfig):
    if not cfg.mix.caption_source:
        raise UserError(f"mix.cycle {','.join(cfg.mix.cycle)} has captioning micro-batches: name the captioned "
                        "images with --set mix.caption_source=DIR (NAME.txt beside each image), "
                        "or train RecA alone with --set mix.cycle=recon")
    # whole images, unflipped: a caption may speak of any corner, or of left and right
    return dataclasses.replace(cfg.data, source=cfg.mix.caption_source, crop_scale=1.0, hflip=False)


def _recon_builder(model, cfg: RunConfig) -> SampleBuilder:
    s = cfg.sample
    return SampleBuilder(model.tokenizer, model.template, model.num_visual_tokens, load_instructions(s.prompts),
                         fixed_instruction=s.fixed_instruction, fixed_prob=s.fixed_prob,
                         max_text_tokens=s.max_text_tokens, seed=cfg.data.seed)


def _caption_builder(model, cfg: RunConfig) -> SampleBuilder:
    template = model.caption_template or model.template
    return SampleBuilder(model.tokenizer, template, model.num_visual_tokens, load_instructions(cfg.sample.prompts),
                         max_text_tokens=cfg.sample.max_text_tokens, seed=cfg.data.seed)


def _recon_batch(builder: SampleBuilder, cfg: RunConfig, images, device: torch.device) -> ReconBatch:
    und = to_device(images.und, device)
    gen = und if images.gen is images.und else to_device(images.gen, device)  # shared views: one copy
    return ReconBatch(und, gen, prompt_to(builder.build(images.positions), device))


def _caption_batch(builder: SampleBuilder, cfg: RunConfig, images, device: torch.device) -> CaptionBatch:
    prompt, ids, mask, target = builder.build_caption(builder.tokenizer, images.captions, cfg.mix.caption_prompt,
                                                      cfg.mix.max_answer_tokens)
    return CaptionBatch(to_device(images.und, device), prompt_to(prompt, device), to_device(ids, device),
                        to_device(mask, device), to_device(target, device))


OBJECTIVES: dict[str, Objective] = {
    "recon": Objective("recon", "images", _recon_data, lambda m: m.views, _recon_builder, _recon_batch),
    "caption": Objective("caption", "captions", _caption_data, lambda m: m.caption_views or m.views,
                         _caption_builder, _caption_batch),
}


def objectives_of(cfg: RunConfig, model) -> list[Objective]:
    """The registry entries `mix.cycle` names, checked against what the model declares."""
    names = list(dict.fromkeys(cfg.mix.cycle))
    if not names:
        raise UserError("mix.cycle is empty: name at least one objective (e.g. recon)")
    out = []
    for name in names:
        if name not in OBJECTIVES:
            raise UserError(f"mix.cycle names an unknown objective {name!r} (known: {', '.join(OBJECTIVES)})")
        if name not in model.objectives:
            raise UserError(f"the {cfg.model.family} family has no {name!r} objective; drop it from mix.cycle "
                            f"(it has: {', '.join(sorted(o for o in model.objectives if o in OBJECTIVES))})")
        out.append(OBJECTIVES[name])
    return out


def prompt_to(p: PromptBatch, device: torch.device) -> PromptBatch:
    return PromptBatch(to_device(p.input_ids, device), to_device(p.mask, device))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()  # pageable host memory would make the copy synchronous
    return t.to(device, non_blocking=True)
