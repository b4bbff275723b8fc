"""Typed configuration: one keyword-only dataclass per component, composed into `RunConfig`.

Presets (`reca.engine.presets`) are plain functions returning a `RunConfig`; the CLI only
overrides fields (`--set optim.lr=2e-5`). The resolved config is saved as `RUN/config.json`
and `RunConfig.from_dict` reads it back on `--resume`.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from reca.engine.errors import UserError
from reca.models import FAMILIES, ModelConfig


@dataclass(kw_only=True)
class DataConfig:
    """Where images come from and how a RecA sample's two views are cut from one decode."""

    # "demo" (photographs bundled in scikit-image), an image folder (recursive; NAME.txt is the
    # caption), WebDataset tar shards (a .tar, a folder of *.tar, or a pattern 's-{000..099}.tar'
    # / 's-*.tar'), or Parquet (a .parquet, a folder of them, a pattern); mix sources with
    # weights: "a/:0.7,b.tar:0.3" (weights hold exactly over every 1024 positions)
    source: str = "demo"
    batch_size: int = 8  # images per micro-batch
    num_workers: int = 0  # decoding processes; 0 decodes in the training process
    seed: int = 0  # shuffle order and augmentation are pure functions of (seed, stream position)
    crop_scale: float = 0.6  # random square crops cover between this fraction and all of the short side; 1.0 disables
    hflip: bool = True  # random horizontal flips (one draw shared by both views)
    und_downscale: float = 1.0  # < 1 blurs the understanding view on purpose (an information bottleneck)
    min_side: int = 16  # images with a shorter side are skipped as broken
    max_pixels: int = 64_000_000  # header sizes beyond this are skipped unread (decompression bombs)
    parquet_image_column: str = "image"  # raw bytes, or the HF datasets struct {bytes, path}
    parquet_caption_column: str = ""  # a string column kept as the caption; "" = none
    shuffle_window: int = 8  # Parquet: rows are shuffled within runs of this many shuffled row groups; 0 = full shuffle
    decoder: str = "auto"  # "auto" | "dali" | "nvjpeg" | "pil"; auto = dali, else nvjpeg, on CUDA; pil on CPU
    decode_device: str = "auto"  # where a batch decoder runs: "auto" (current CUDA device, else cpu) | "cpu" | "cuda:N"
    decode_threads: int = 2  # DALI's CPU threads
    # CUDA batch decoders (nvjpeg, dali on cuda) decode the next batch in a background thread on
    # their own CUDA stream while the step runs; false decodes in the training thread, in line
    prefetch: bool = True
    # where tar shard indexes are cached (keyed by path, size, mtime: a changed shard is rescanned);
    # never beside the data, which may be read-only; left at this default, $RECA_CACHE_DIR/tar_index
    # when that is set; "" scans every shard at every start
    tar_index_cache: str = "~/.cache/reca/tar_index"


@dataclass(kw_only=True)
class SampleConfig:
    """How the RecA prompt around the visual tokens is built."""

    prompts: str = ""  # a file with one instruction a line; empty = the pool shipped with reca
    fixed_instruction: str = "Generate an image."
    fixed_prob: float = 0.1  # probability of the fixed instruction instead of a pooled one (visual tokens kept)
    max_text_tokens: int = 128  # instructions are cut to this many tokens; prompts are padded to a fixed length


@dataclass(kw_only=True)
class MixConfig:
    """Objectives of successive micro-batches, cycled (Harmon: 2 reconstruction : 2 captioning)."""

    cycle: tuple[str, ...] = ("recon",)  # "recon" (RecA) | "caption" (image-to-text cross-entropy)
    caption_source: str = ""  # captioned images for "caption" micro-batches (any data.source form)
    caption_prompt: str = "Describe this image in detail."  # the question of a captioning sample
    max_answer_tokens: int = 64  # captions are cut to this many tokens (the end-of-turn included)


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with warm-up then cosine (to `min_lr_ratio` x lr) or constant; clipping."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0  # never applied to 1-D parameters and biases
    warmup_steps: int = 10
    schedule: str = "cosine"  # "cosine" | "constant"
    min_lr_ratio: float = 0.0
    clip_grad: float = 1.0  # 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclass(kw_only=True)
class KernelConfig:
    """Which implementation of the fused ops (`reca.kernels`) models call."""

    backend: str = "auto"  # "auto" (triton on CUDA, torch on CPU) | "torch" | "triton"


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 100  # optimizer steps
    seed: int = 0  # model initialisation and the training noise
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "fp32"
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    init_from: str = ""  # a local directory of pretrained weights (see reca.models.loading)
    # "custom": the fields below as set; "reference": the straightforward baseline (eager, SDPA,
    # kernels.backend torch, Pillow decoding, no graph); "fast": compile + kernels auto (Triton
    # on CUDA) + CUDA graph on CUDA (compile only on CPU). See reca.engine.train.resolve_mode.
    mode: str = "custom"
    compile: bool = False  # torch.compile every repeated block (fullgraph) and the kernel ops
    cuda_graph: bool = False  # capture forward, backward, clip, accumulation and AdamW in one CUDA graph
    attention: str = "sdpa"  # "sdpa" | "xformers" | "flash" (flash-attn: causal only, refused for RecA masks)
    checkpoint_every: int = 0  # recompute every k-th block in the backward (1 = all); 0 = model.gradient_checkpointing


@dataclass(kw_only=True)
class OutputConfig:
    dir: str = "runs/default"
    overwrite: bool = False  # a new run may replace a finished or interrupted run in `dir`
    log_every: int = 10  # steps between metrics.jsonl lines
    ckpt_every: int = 100  # steps between checkpoints (one is always written at the end)
    preview_every: int = 0  # steps between reconstruction grids; 0 = only at the end
    preview_images: int = 4
    preview_steps: int = 8  # Euler steps for the previews
    tensorboard: bool = True  # also log to RUN/tb when tensorboard is installed


@dataclass(kw_only=True)
class RunConfig:
    preset: str = ""
    model: ModelConfig = field(default_factory=lambda: FAMILIES["flow"].config())
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        d = dict(d)
        family = d.get("model", {}).get("family", "flow")
        if family not in FAMILIES:
            raise UserError(f"unknown model family {family!r} (known: {', '.join(sorted(FAMILIES))})")
        model = _build(FAMILIES[family].config, d.pop("model", {}), "model")
        return _build(cls, d, "", model=model)


def _build(cls, d: dict[str, Any], where: str, **given):
    """Instantiate dataclass `cls` from a (possibly nested) dict, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    kwargs = dict(given)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in d.items():
        if key not in names:
            raise UserError(f"unknown config key {_join(where, key)!r}")
        if key in given:
            continue
        kwargs[key] = _coerce(value, hints[key], _join(where, key))
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a JSON value or a CLI string to the annotated type of field `name`."""
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return _build(tp, value, name)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _coerce(value, args[0], name)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        args = typing.get_args(tp)
        elem = args[0] if args else str
        out = tuple(_coerce(v, elem, name) for v in value)
        if len(args) >= 2 and args[1] is not Ellipsis and len(out) != len(args):
            raise UserError(f"{name} takes {len(args)} values, got {len(out)}")
        return out
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, str):
                value = float(value) if any(c in value.lower() for c in ".e") else int(value.replace("_", ""))
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} expects {getattr(tp, '__name__', tp)}, got {value!r}") from None
    return value


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `key.path=value` strings (from `--set`) to `cfg` and return the new config."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = d
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise UserError(f"unknown config key {'.'.join(parts[: i + 1])!r}")
            node = node[part]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise UserError(f"unknown config key {key.strip()!r}")
        node[parts[-1]] = value
    return RunConfig.from_dict(d)
