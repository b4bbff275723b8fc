"""Previews: RUN/recon_step{N}.png, a fixed set of held-out, uncropped, unflipped images beside
the images the model generates from their visual prompts alone (the fixed instruction), drawn
through the model's own forward (`model(SampleBatch, "sample")`), as training does."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from reca.engine.build import Components, autocast
from reca.engine.data import build_loader
from reca.engine.metrics import save_grid
from reca.engine.objectives import prompt_to
from reca.models.adapter import SampleBatch


class Previewer:
    def __init__(self, c: Components, run: Path):
        self.c, self.run = c, run
        self.batch = _fixed_images(c)

    def path(self, step: int) -> Path:
        return self.run / f"recon_step{step}.png"

    def exists(self, step: int) -> bool:
        return self.path(step).exists()

    @torch.no_grad()
    def draw(self, step: int) -> None:
        """input | image sampled from its visual prompt alone, for each preview image."""
        if self.batch is None:
            return
        c, model = self.c, self.c.model
        was_training = model.training
        model.eval()
        n = self.batch.und.shape[0]
        prompt = prompt_to(c.builder.build(list(range(n)), fixed=True), c.device)
        request = SampleBatch(self.batch.und.to(c.device), prompt, c.cfg.output.preview_steps)
        with autocast(c.cfg, c.device):
            images = model(request, "sample", generator=torch.Generator(c.device).manual_seed(0))
        model.train(was_training)
        save_grid([self.batch.gen, images.float().cpu()], self.path(step))


def _fixed_images(c: Components):
    """The first `output.preview_images` images of the RecA data, whole and unflipped."""
    k = c.cfg.output.preview_images
    if k <= 0:
        return None
    data = dataclasses.replace(c.cfg.data, batch_size=k, crop_scale=1.0, hflip=False, num_workers=0)
    loader = build_loader(data, c.model.views)
    try:
        return next(loader)
    finally:
        loader.close()
