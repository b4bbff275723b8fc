"""`reca sample` and `reca export`: use a trained run (or pretrained weights) outside training.

    reca sample RUN --prompt "a red bus" --out DIR        text prompt (RecA's inference)
    reca sample RUN --image photo.jpg --out DIR           the image's visual prompt
    reca sample --preset P --init-from WEIGHTS ...         pretrained weights, no run
    reca export RUN --to DIR                              trained weights in the family's layout

A run's model is rebuilt as training built it (`train.seed` decides the frozen weights of
randomly initialised presets; `train.init_from` is loaded again), then the checkpoint's trained
tensors are loaded (RUN/checkpoint.pt, or a torchrun run's newest RUN/step-N/, gathered from
its shards in this one process) and the frozen weights are checked against the run's
fingerprint. A run trained with `train.ema` exports its EMA beside the weights.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reca.engine.build import resolve_device, seeded_model
from reca.engine.config import RunConfig
from reca.engine.errors import UserError
from reca.engine.sample import SampleBuilder
from reca.kernels import get_ops
from reca.models.adapter import PromptBatch, SampleBatch


def load_model(*, run: str | None = None, preset: str | None = None, init_from: str | None = None,
               sets: tuple[str, ...] = (), device: str = "auto") -> tuple[RunConfig, torch.nn.Module]:
    """The model of a run (RUN/config.json + RUN/checkpoint.pt), or of a preset with `init_from`
    weights -> (config, model in eval mode on the device)."""
    from reca.engine.config import apply_overrides, load_config
    from reca.engine.presets import preset as named

    if (run is None) == (preset is None):
        raise UserError("give a run directory, or --preset (with --init-from weights), not both")
    if run is not None:
        if not (Path(run) / "config.json").is_file():
            raise UserError(f"{run} is not a reca run: no config.json")
        cfg = load_config(Path(run))
    else:
        cfg = named(preset)
    overrides = list(sets) + ([f"train.init_from={init_from}"] if init_from else [])
    cfg = apply_overrides(cfg, overrides)
    dev = resolve_device(device)
    ckpt = run_weights(run) if run is not None else None
    drawn_on = torch.device("cpu") if ckpt is not None and ckpt["drawn_on"] == "cpu" else None
    model = seeded_model(cfg, get_ops("torch"), dev, draw_on=drawn_on)  # as training built it
    if ckpt is not None:
        from reca.engine.checkpoint import fingerprint_conflict, frozen_fingerprint, load_trainable

        load_trainable(model, ckpt["model"], source=ckpt["source"])
        conflict = fingerprint_conflict(ckpt["frozen"], frozen_fingerprint(model)) if ckpt["frozen"] else None
        if conflict:
            raise UserError(f"cannot rebuild the model of {run}: {conflict}")
    return cfg, model.eval()


def run_weights(run: str | Path) -> dict:
    """A run's trained tensors -> {"model", "ema" (None without train.ema), "frozen" (the
    fingerprint; {} where not stored), "drawn_on" (the device type that drew the random weights,
    None: the run's device), "source"}: from RUN/checkpoint.pt (checksum verified), else from a
    torchrun run's newest RUN/step-N/ (DCP, read whole by this one process)."""
    from reca.engine.checkpoint import load_checkpoint
    from reca.engine.checkpoint.dcp import latest

    run = Path(run)
    folder = latest(run)
    if (run / "checkpoint.pt").is_file() or folder is None:
        ckpt = load_checkpoint(run)  # a missing file is one line
        ema = ckpt.get("extra", {}).get("ema")
        return {"model": ckpt["model"], "ema": ema["shadows"] if ema else None, "frozen": ckpt["frozen"],
                "drawn_on": None, "source": str(run / "checkpoint.pt")}
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from reca.engine.checkpoint import verified_load

    extra = verified_load(folder / "extra.pt")  # the folder is whole (written through a temp folder and renamed)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(folder, Path(tmp) / "whole.pt")
        whole = torch.load(Path(tmp) / "whole.pt", map_location="cpu", weights_only=True)
    return {"model": whole["model"], "ema": whole.get("ema"), "frozen": extra.get("frozen") or {},
            "drawn_on": extra.get("drawn_on"), "source": str(folder)}


def text_prompt(model, cfg: RunConfig, texts: list[str]) -> PromptBatch:
    """Text-only prompts [B, P]: the family's text-to-image prompt (`model.text_prompt`; without
    one, `template.text` with `{image}` removed) with the text as the instruction. A family whose
    `generate` leaves the visual positions out itself (`text_prompt_keeps_image`: BAGEL drops its
    vit split by position) gets the full template."""
    if getattr(model, "text_prompt_keeps_image", False):
        return image_prompt(model, cfg, texts)
    tok, template = model.tokenizer, model.template
    layout = getattr(model, "text_prompt", None) or template.text.replace("{image}", "")
    if layout.count("{instruction}") != 1 or "{image}" in layout:
        raise UserError(f"the {cfg.model.family} family's text prompt must hold {{instruction}} once and no "
                        f"{{image}}: {layout!r}")
    head, tail = layout.split("{instruction}")
    rows = []
    for t in texts:
        ids = tok.encode(t)
        if len(ids) > cfg.sample.max_text_tokens:
            raise UserError(f"the prompt is {len(ids)} tokens with this model's tokenizer, past "
                            f"sample.max_text_tokens={cfg.sample.max_text_tokens} (prompts are never cut); shorten it "
                            "or --set sample.max_text_tokens=N")
        rows.append(tok.encode(head) + ids + tok.encode(tail))
    return _padded(rows, tok.token_id(template.pad_token))


def image_prompt(model, cfg: RunConfig, texts: list[str]) -> PromptBatch:
    """The family's RecA template with the visual-prompt placeholders, one instruction a row."""
    rows = []
    for text in texts:
        builder = SampleBuilder(model.tokenizer, model.template, model.num_visual_tokens, [text],
                                fixed_instruction=text, max_text_tokens=cfg.sample.max_text_tokens)
        rows.append(builder.ids(-1))
    return _padded(rows, model.tokenizer.token_id(model.template.pad_token))


def _padded(rows: list[list[int]], pad_id: int) -> PromptBatch:
    p = max(len(r) for r in rows)
    ids = torch.full((len(rows), p), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), p, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return PromptBatch(ids, mask)


def understanding_view(model, cfg: RunConfig, path: str) -> torch.Tensor:
    """An image file -> its understanding view [3, Hu, Wu], whole and unflipped, as the
    previews see their images."""
    from reca.engine.data.decode import BadImage, PillowDecoder, make_views, views_for

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e.strerror or e}") from None
    try:
        img = PillowDecoder().decode(data, path)
    except BadImage as e:
        raise UserError(f"{path}: {e}") from None
    views = dataclasses.replace(cfg.data, crop_scale=1.0, hflip=False, square_offset="centre")  # the image's centre
    und, _ = make_views(img, views_for(model.views, cfg.data), views, np.random.default_rng(0))
    return torch.from_numpy(np.array(und))


def sample(model, cfg: RunConfig, *, out: str, prompt: str | None = None, images: tuple[str, ...] = (),
           num: int = 1, steps: int | None = None, seed: int = 0) -> list[Path]:
    """Generate into `out`: `num` images from the text `prompt` alone (text_NN.png), or one per
    image from its visual prompt, with `prompt` (default: the run's fixed instruction) as the
    instruction (NAME.png). -> the files written."""
    steps = cfg.output.preview_steps if steps is None else steps  # 0 is refused, not the default
    if steps < 1 or num < 1:
        raise UserError("--steps and --num must be at least 1")
    if not images and prompt is None:
        raise UserError("give --prompt TEXT (text-to-image) or --image FILE (the image's visual prompt)")
    dev = next(model.parameters()).device
    if images:
        und = torch.stack([understanding_view(model, cfg, f) for f in images]).to(dev)
        request = SampleBatch(und, _to(image_prompt(model, cfg, [prompt or cfg.sample.fixed_instruction] * len(images)),
                                       dev), steps)
        names = [Path(f).stem for f in images]
    else:
        request = SampleBatch(None, _to(text_prompt(model, cfg, [prompt] * num), dev), steps)
        names = [f"text_{i:02d}" for i in range(num)]
    with torch.no_grad():
        pixels = model(request, "sample", generator=torch.Generator(dev).manual_seed(seed))
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {folder}: {e.strerror or e}") from None
    written = []
    for name, img in zip(names, pixels.float().cpu()):
        array = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        path = folder / f"{name}.png"
        Image.fromarray(array).save(path)
        written.append(path)
    return written


# The file each family's own loader looks for (and `--init-from DIR` reads back): Harmon's and
# OpenUni's read `harmon.safetensors` / `openuni.safetensors` beside their part folders; BAGEL's
# release, Show-o's and the flow family's read `model.safetensors`.
EXPORT_FILES = {"harmon": "harmon.safetensors", "openuni": "openuni.safetensors"}


def export(model, cfg: RunConfig, to: str, *, ema: dict[str, torch.Tensor] | None = None,
           overwrite: bool = False) -> list[Path]:
    """The trained weights in the family's original layout: TO/<file the family loads>; with
    `ema` (the run's EMA shadows by parameter name) also the EMA weights in the same layout:
    TO/ema.safetensors for BAGEL (its release's name), TO/ema/<file> for the others. OpenUni also
    gets TO/openuni.pth, what its trainer's `pretrained_pth` loads. -> paths."""
    if "export" not in model.capabilities:
        raise UserError(f"the {cfg.model.family} family has no export to another code base's layout "
                        "(its weights are RUN/checkpoint.pt's 'model' entry)")
    name = EXPORT_FILES.get(cfg.model.family, "model.safetensors")
    paths = [Path(to) / name]
    if cfg.model.family == "openuni":  # the form OpenUni's pretrained_pth reads (torch.load, torch 2.3 pinned)
        paths.append(paths[0].with_suffix(".pth"))
    if ema is not None:
        paths.append(Path(to) / ("ema.safetensors" if cfg.model.family == "bagel" else f"ema/{name}"))
    there = [str(p) for p in paths if p.exists()]
    if there and not overwrite:  # an earlier export's files are never replaced in silence
        raise UserError(f"{to} already holds {', '.join(there)}; give --overwrite to replace "
                        f"{'it' if len(there) == 1 else 'them'}, or another --to")
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        model.export(str(paths[0]))
        if cfg.model.family == "openuni":
            model.export(str(paths[1]))
        if ema is not None:  # the model's export with the EMA weights swapped in (reca.engine.ema)
            from reca.engine.ema import EMA

            averaged = EMA(model)
            try:
                averaged.load_state_dict({"decay": averaged.decay, "shadows": ema})
            except ValueError as e:
                raise UserError(f"the run's {e}") from None
            paths[-1].parent.mkdir(parents=True, exist_ok=True)
            averaged.export(paths[-1])
    except OSError as e:
        raise UserError(f"cannot write {e.filename or paths[0]}: {e.strerror or e}") from None
    return paths


def _to(p: PromptBatch, device: torch.device) -> PromptBatch:
    return PromptBatch(p.input_ids.to(device), p.mask.to(device))
