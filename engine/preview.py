"""Previews: RUN/recon_step{N}.png, a fixed set of uncropped, unflipped images (the first
`output.preview_images` of the RecA data) beside the images the model generates from their
visual prompts alone (the fixed instruction) and from another image's visual prompt (a fixed
derangement), drawn through the model's own forward (`model(SampleBatch, "sample")`) with the
same noise. Each preview also measures the alignment (`reca.engine.alignment`: PSNR and SSIM,
own vs shuffled prompt), writes it into the step's metrics row (RUN/metrics.jsonl, TensorBoard),
redraws RUN/alignment.png and prints one line."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from reca.engine.alignment import alignment_metrics, derangement, describe
from reca.engine.build import Components, autocast
from reca.engine.compile import eager
from reca.engine.data import build_loader
from reca.engine.metrics import MetricsWriter, plot_alignment, save_grid
from reca.engine.objectives import prompt_to
from reca.models.adapter import SampleBatch


class Previewer:
    def __init__(self, c: Components, run: Path, quiet: bool = False):
        self.c, self.run, self.quiet = c, run, quiet
        self.batch = _fixed_images(c)
        self.last: dict[str, float] = {}  # the latest alignment numbers

    def path(self, step: int) -> Path:
        return self.run / f"recon_step{step}.png"

    def exists(self, step: int) -> bool:
        return self.path(step).exists()

    @torch.no_grad()
    def generate(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> images [N, 3, Hg, Wg] from each preview image's own visual prompt, and from the
        deranged prompts (None with one preview image), both drawn from the same noise (seed 0):
        the visual prompt is the only difference between them."""
        c, model = self.c, self.c.model
        und = self.batch.und.to(c.device)
        n = und.shape[0]
        prompt = prompt_to(c.builder.build(list(range(n)), fixed=True), c.device)
        was_training = model.training
        model.eval()
        try:
            out = []
            for visual in (und, und[derangement(n).to(c.device)] if n > 1 else None):
                if visual is None:
                    out.append(None)
                    continue
                request = SampleBatch(visual, prompt, c.cfg.output.preview_steps)
                with autocast(c.cfg, c.device), eager():  # the sampler's shapes may change every call
                    images = model(request, "sample", generator=torch.Generator(c.device).manual_seed(0))
                out.append(images.float().cpu())
        finally:
            model.train(was_training)
        return out[0], out[1]

    def draw(self, step: int) -> dict[str, float]:
        """input | from its own visual prompt | from another image's, for each preview image;
        -> the alignment numbers (also in the step's metrics row and alignment.png)."""
        if self.batch is None:
            return {}
        own, shuffled = self.generate()
        target = self.batch.gen.float()
        save_grid([target, own] + ([shuffled] if shuffled is not None else []), self.path(step))
        self.last = alignment_metrics(target, own, shuffled)
        writer = MetricsWriter(self.run, self.c.cfg.output.tensorboard, append=True)
        try:
            writer.write([{"step": step, **self.last}])  # read_metrics merges it into the step's row
        finally:
            writer.close()
        plot_alignment(self.run)
        if not self.quiet:
            print(f"reca: {describe(step, self.last)} -> {self.path(step)}", file=sys.stderr, flush=True)
        return self.last


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
