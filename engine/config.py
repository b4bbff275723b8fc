"""Typed configuration: one keyword-only dataclass per component, composed into `RunConfig`.

Presets (`reca.engine.presets`) are plain functions returning a `RunConfig`; the CLI only
overrides fields (`--set optim.lr=2e-5`). The resolved config is saved as `RUN/config.json`
and `RunConfig.from_dict` reads it back on `--resume` (or `--config` for a new run).

Every config is validated when it is built: enumerations are `Literal` types (checked by
`_coerce` for CLI/JSON values and by `__post_init__` for Python callers), ranges are checked in
each component's `__post_init__`, and a bad value is one `UserError` line naming the field, so
`--set optim.schedule=cosin` stops before anything is built, not at step 1,000. Checks that
need the device (kernels.backend=triton, train.attention's library, a CUDA GPU) or the built
model (its views, its objectives) stay in `reca.engine.train.build`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from reca.engine.errors import UserError
from reca.models import FAMILIES, ModelConfig

# Objectives a `mix.cycle` entry may name. One place: the objective registry
# (reca.engine.objectives) extends it when it registers one, by reassigning this module
# attribute (MixConfig reads it when a config is built, not at import).
OBJECTIVES: tuple[str, ...] = ("recon", "caption")

Decoder = Literal["auto", "dali", "nvjpeg", "pil"]
SquareOffset = Literal["centre", "random"]
UndResize = Literal["auto", "same", "pad"]
Schedule = Literal["cosine", "constant"]
Backend = Literal["auto", "torch", "triton"]
Mode = Literal["custom", "fast", "reference"]
Precision = Literal["auto", "bf16", "fp32"]
Attention = Literal["sdpa", "xformers", "flash"]

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(kw_only=True)
class DataConfig:
    """Where images come from and how a RecA sample's two views are cut from one decode."""

    SECTION: ClassVar[str] = "data"

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
    # where the square of a whole image (crop_scale 1, "crop" views) lies along its long side:
    # "centre", or "random" (OpenUni's crop2square: a uniform offset, from the sample's own draws)
    square_offset: SquareOffset = "centre"
    # a LLaVA conversation JSON as source: the folder its image paths are relative to ("" = the JSON's)
    json_image_root: str = ""
    und_downscale: float = 1.0  # < 1 blurs the understanding view on purpose (an information bottleneck)
    # the understanding view: "auto" (the family's ViewSpec.und_resize), "same" (the generation
    # view's region), "pad" (the whole image padded to a square with the understanding mean,
    # int(255 x mean) per channel, as Janus's and LLaVA's image processors pad)
    und_resize: UndResize = "auto"
    min_side: int = 16  # images with a shorter side are skipped as broken
    max_pixels: int = 64_000_000  # header sizes beyond this are skipped unread (decompression bombs)
    parquet_image_column: str = "image"  # raw bytes, or the HF datasets struct {bytes, path}
    parquet_caption_column: str = ""  # a string column kept as the caption; "" = none
    shuffle_window: int = 8  # Parquet: rows are shuffled within runs of this many shuffled row groups; 0 = full shuffle
    decoder: Decoder = "auto"  # auto = dali, else nvjpeg, on CUDA; pil on CPU
    decode_device: str = "auto"  # where a batch decoder runs: "auto" (current CUDA device, else cpu) | "cpu" | "cuda:N"
    decode_threads: int = 2  # DALI's CPU threads
    # CUDA batch decoders (nvjpeg, dali on cuda) decode the next batch in a background thread on
    # their own CUDA stream while the step runs; false decodes in the training thread, in line
    prefetch: bool = True
    # where tar shard indexes are cached (keyed by path, size, mtime: a changed shard is rescanned);
    # never beside the data, which may be read-only; left at this default, $RECA_CACHE_DIR/tar_index
    # when that is set; "" scans every shard at every start
    tar_index_cache: str = "~/.cache/reca/tar_index"

    def __post_init__(self) -> None:
        _literals(self)
        _require(self, "source", bool(self.source.strip()), "a data source (a folder, shards, Parquet or 'demo')")
        _at_least(self, 1, "batch_size", "min_side", "max_pixels", "decode_threads")
        _at_least(self, 0, "num_workers", "seed", "shuffle_window")
        _require(self, "crop_scale", 0 < self.crop_scale <= 1, "in (0, 1] (1 disables cropping)")
        _require(self, "und_downscale", 0 < self.und_downscale <= 1, "in (0, 1]")
        _require(self, "decode_device", _DEVICE.fullmatch(self.decode_device) is not None, "auto, cpu or cuda[:N]")
        if self.decoder == "nvjpeg" and self.decode_device == "cpu":
            raise UserError("data.decoder=nvjpeg decodes on a GPU; data.decode_device=cpu contradicts it")


@dataclass(kw_only=True)
class SampleConfig:
    """How the RecA prompt around the visual tokens is built."""

    SECTION: ClassVar[str] = "sample"

    prompts: str = ""  # a file with one instruction a line; empty = the pool shipped with reca
    fixed_instruction: str = "Generate an image."
    fixed_prob: float = 0.1  # probability of the fixed instruction instead of a pooled one (visual tokens kept)
    max_text_tokens: int = 128  # the longest instruction allowed (a longer one is refused, never cut); prompts are padded to fit it

    def __post_init__(self) -> None:
        _require(self, "fixed_prob", 0 <= self.fixed_prob <= 1, "in [0, 1]")
        _at_least(self, 1, "max_text_tokens")


@dataclass(kw_only=True)
class MixConfig:
    """Objectives of successive micro-batches, cycled (Harmon: 2 reconstruction : 2 captioning)."""

    SECTION: ClassVar[str] = "mix"

    cycle: tuple[str, ...] = ("recon",)  # OBJECTIVES: "recon" (RecA) | "caption" (image-to-text cross-entropy)
    # captioned images for "caption" micro-batches: any data.source form (NAME.txt captions), or a
    # LLaVA conversation JSON (every assistant turn a target; data.json_image_root)
    caption_source: str = ""
    caption_prompt: str = "Describe this image in detail."  # the question of a captioning sample
    max_answer_tokens: int = 64  # captions are cut to this many tokens (the end-of-turn included)

    def __post_init__(self) -> None:
        # whether the family has the objective, and caption_source for "caption", are the engine's checks
        unknown = [c for c in self.cycle if c not in OBJECTIVES]
        _require(self, "cycle", bool(self.cycle) and not unknown, f"a non-empty list of {', '.join(OBJECTIVES)}")
        _at_least(self, 1, "max_answer_tokens")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with warm-up then cosine (to `min_lr_ratio` x lr) or constant; clipping."""

    SECTION: ClassVar[str] = "optim"

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0  # never applied to 1-D parameters and biases
    warmup_steps: int = 10
    # step k of the warm-up gets k / warmup_steps (transformers' schedules, which BAGEL and Show-o
    # use: the first update has lr 0) instead of (k + 1) / warmup_steps
    warmup_from_zero: bool = False
    schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.0
    clip_grad: float = 1.0  # 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step

    def __post_init__(self) -> None:
        _literals(self)
        _require(self, "lr", _finite(self.lr) and self.lr > 0, "finite and > 0")
        _require(self, "betas", all(0 <= b < 1 for b in self.betas), "two values in [0, 1)")
        _require(self, "eps", _finite(self.eps) and self.eps > 0, "finite and > 0")
        _require(self, "weight_decay", _finite(self.weight_decay) and self.weight_decay >= 0, "finite and >= 0")
        _require(self, "min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        _require(self, "clip_grad", _finite(self.clip_grad) and self.clip_grad >= 0, "finite and >= 0 (0 disables)")
        _at_least(self, 0, "warmup_steps")  # longer than train.steps is allowed: the run ends warming up
        _at_least(self, 1, "grad_accum")


@dataclass(kw_only=True)
class KernelConfig:
    """Which implementation of the fused ops (`reca.kernels`) models call."""

    SECTION: ClassVar[str] = "kernels"
    # auto: triton on CUDA, torch on CPU. Whether triton imports on the run's device is checked
    # when the run is built (reca.kernels.get_ops), where the device is known.
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        _literals(self)


@dataclass(kw_only=True)
class TrainConfig:
    SECTION: ClassVar[str] = "train"
    steps: int = 100  # optimizer steps
    seed: int = 0  # model initialisation and the training noise
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    precision: Precision = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    init_from: str = ""  # a local directory of pretrained weights (see reca.models.loading)
    # "custom": the fields below as set; "reference": the straightforward baseline (eager, SDPA,
    # kernels.backend torch, Pillow decoding, no graph); "fast": compile + kernels auto (Triton
    # on CUDA) + CUDA graph on CUDA (compile only on CPU). See reca.engine.train.resolve_mode.
    mode: Mode = "custom"
    compile: bool = False  # torch.compile every repeated block (fullgraph) and the kernel ops
    cuda_graph: bool = False  # capture forward, backward, clip, accumulation and AdamW in one CUDA graph
    attention: Attention = "sdpa"  # flash (flash-attn): causal only, refused for RecA masks
    checkpoint_every: int = 0  # activation checkpointing: recompute every k-th block (engine/compile.py find_blocks) in the backward; 1 = all, 0 = none
    ema: float = 0.0  # decay of an exponential moving average of the trained weights, updated every step (BAGEL: 0.9999); 0 = none
    ema_on_host: bool = False  # keep the EMA (each rank's shard of it) in host memory; the update copies the trained weights there once a step

    def __post_init__(self) -> None:
        _literals(self)
        _at_least(self, 1, "steps")
        _at_least(self, 0, "seed", "threads", "checkpoint_every")
        _require(self, "device", _DEVICE.fullmatch(self.device) is not None, "auto, cpu, cuda or cuda:N")
        _require(self, "ema", _finite(self.ema) and 0.0 <= self.ema < 1.0, "in [0, 1) (0: no EMA)")
        if self.mode == "custom" and self.cuda_graph and self.device == "cpu":
            raise UserError("train.cuda_graph needs CUDA, and train.device is cpu")


@dataclass(kw_only=True)
class OutputConfig:
    SECTION: ClassVar[str] = "output"
    dir: str = "runs/default"
    overwrite: bool = False  # a new run may replace a finished or interrupted run in `dir`
    log_every: int = 10  # steps between metrics.jsonl lines
    ckpt_every: int = 100  # steps between checkpoints (one is always written at the end)
    preview_every: int = 0  # steps between reconstruction grids; 0 = only at the end
    preview_images: int = 4
    preview_steps: int = 8  # Euler steps for the previews
    tensorboard: bool = True  # also log to RUN/tb when tensorboard is installed

    def __post_init__(self) -> None:
        _require(self, "dir", bool(self.dir.strip()), "a directory")
        _at_least(self, 1, "log_every", "ckpt_every", "preview_steps")
        _at_least(self, 0, "preview_every", "preview_images")


@dataclass(kw_only=True)
class DistributedConfig:
    """Several processes under `torchrun` (`reca.engine.distributed`); one process ignores it."""

    SECTION: ClassVar[str] = "distributed"
    # ddp: every rank holds the whole model and AdamW state, gradients all-reduced; fsdp: FSDP2's
    # fully_shard per block then the root, parameters, gradients and AdamW state sharded
    strategy: Literal["ddp", "fsdp"] = "fsdp"
    replicate: int = 1  # fsdp across nodes (HSDP): shard within groups of world_size / replicate ranks
    cpu_offload: bool = False  # fsdp: sharded parameters, gradients and AdamW state in host memory
    # fsdp with train.init_from: every rank reads its own shards from the weight files (reca.engine.shards);
    # false: rank 0 builds the whole model on the CPU and sends every rank its shards (the seed's draws as one process)
    init_from_shards: bool = True
    # fsdp with optim.grad_accum > 1: reduce-scatter every micro-batch's gradients (one reduce-scatter each) instead of
    # keeping them unsharded, in fp32, until the step's last micro-batch (4 bytes a trained parameter on every rank)
    reduce_every_micro_batch: bool = False
    keep_checkpoints: int = 2  # RUN/step-N/ folders kept (the newest)

    def __post_init__(self) -> None:
        _literals(self)
        _at_least(self, 1, "replicate", "keep_checkpoints")


@dataclass(kw_only=True)
class CodeConfig:
    """The Python modules a run's model family (and preset) come from, recorded when a run is
    built and imported before the rest of a saved config is read back (`--resume`, `--config`,
    `reca sample RUN`, `reca export RUN`): the module that called `register_family`, the module
    of a `--preset module:function`. Importing a module runs its code: a run directory is read
    back only by those who would run its code (README: Using reca from another repository)."""

    SECTION: ClassVar[str] = "code"
    modules: tuple[str, ...] = ()  # imported in order; reca's own families need none
    # the sys.path entries they were imported from: appended to sys.path (never prepended: an
    # installed package is never shadowed) only for a module that is not importable without them
    paths: tuple[str, ...] = ()


@dataclass(kw_only=True)
class RunConfig:
    preset: str = ""
    code: CodeConfig = field(default_factory=CodeConfig)
    model: ModelConfig = field(default_factory=lambda: FAMILIES["flow"].config())
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        # Each section checked itself when it was built; what spans two sections goes here. (Today
        # none does: warm-up longer than train.steps is allowed, and mix.cycle's "caption" needing
        # mix.caption_source and a family with that objective is checked by the engine.)
        family = FAMILIES.get(getattr(self.model, "family", None))
        if family is None or not isinstance(self.model, family.config):
            raise UserError(f"model must be the config of a registered family (known: {', '.join(sorted(FAMILIES))}; "
                            f"reca.models.register_family adds one), got {type(self.model).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        if not isinstance(d, dict):
            raise UserError(f"a config is a table of sections, got {type(d).__name__}")
        d = dict(d)
        model = d.pop("model", {})
        if not isinstance(model, dict):
            raise UserError(f"model expects a table of fields, got {model!r}")
        code = _build(CodeConfig, d.pop("code", {}), "code")
        import_code(code)  # the family's module registers it
        family = model.get("family", "flow")
        if family not in FAMILIES:
            where = (f"; the run's code.modules ({', '.join(code.modules)}) did not register it" if code.modules
                     else "; a family of another repository is registered by importing its module")
            if "__main__" in code.modules:
                where = ("; it was registered by a script run as __main__, which reca cannot import again: call "
                         "register_family at the top level of an importable module")
            raise UserError(f"unknown model family {family!r} (known: {', '.join(sorted(FAMILIES))}{where})")
        return _build(cls, d, "", code=code, model=_build(FAMILIES[family].config, model, "model"))


def import_code(code: CodeConfig) -> None:
    """Import `code.modules` (see `CodeConfig`): a module already imported is left as it is; one
    that cannot be imported is one line naming it. `code.paths` and the working directory (where
    `--preset module:function` finds a .py file) are appended to sys.path for a module that is
    not importable without them."""
    for name in code.modules:
        if name in sys.modules or name == "__main__":  # __main__: a script's, never imported again
            continue
        try:
            importlib.import_module(name)
            continue
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise UserError(f"importing {name} (the run's code.modules) failed: {e}") from None
        except Exception as e:  # noqa: BLE001: the module's own error, on one line
            raise UserError(f"importing {name} (the run's code.modules) failed: {type(e).__name__}: "
                            f"{' '.join(str(e).split())}") from None
        extra = [p for p in (*code.paths, os.getcwd()) if p not in sys.path and os.path.isdir(p)]
        sys.path.extend(dict.fromkeys(extra))
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise UserError(f"importing {name} (the run's code.modules) failed: {e}") from None
            raise UserError(f"this run's model family comes from module {name} (config.json code.modules), which "
                            f"cannot be imported here (looked in {', '.join(code.paths + (os.getcwd(),))}); run reca "
                            "where it can be imported: its project directory, PYTHONPATH, or installed") from None
        except Exception as e:  # noqa: BLE001
            raise UserError(f"importing {name} (the run's code.modules) failed: {type(e).__name__}: "
                            f"{' '.join(str(e).split())}") from None


def with_code(cfg: RunConfig) -> RunConfig:
    """`cfg` with `code` naming what reading it back must import: the module that registered its
    family (a family of another repository) after what `code` already lists, and the sys.path
    entries they came from."""
    family = FAMILIES.get(cfg.model.family)
    modules = list(cfg.code.modules)
    if family is not None and not family.builtin and family.module not in modules:
        modules.append(family.module)
    paths = list(cfg.code.paths)
    for name in modules:
        root = _import_root(name)
        if root and root not in paths:
            paths.append(root)
    if tuple(modules) == cfg.code.modules and tuple(paths) == cfg.code.paths:
        return cfg
    return dataclasses.replace(cfg, code=CodeConfig(modules=tuple(modules), paths=tuple(paths)))


def _import_root(name: str) -> str:
    """The sys.path entry module `name` was imported from ("" when unknown: a script, a module
    without a file)."""
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if name == "__main__" or not path:
        return ""
    root = os.path.dirname(os.path.abspath(path))
    for _ in range(name.count(".") + (os.path.basename(path).startswith("__init__.") and 1)):
        root = os.path.dirname(root)
    return root


def load_config(path: str | Path) -> RunConfig:
    """A saved `RUN/config.json` (or any file of that form); a file that no longer parses or no
    longer fits this version's fields is one UserError line naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config {path}: {e}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    try:
        return RunConfig.from_dict(d)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


# --- validation helpers -------------------------------------------------------------------------

@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _literals(obj: Any) -> None:
    """Every `Literal` field of a section config holds one of its values."""
    for name, tp in _hints(type(obj)).items():
        if typing.get_origin(tp) is Literal:
            _check_literal(getattr(obj, name), tp, f"{obj.SECTION}.{name}")


def _check_literal(value: Any, tp: Any, name: str) -> Any:
    allowed = typing.get_args(tp)
    if value not in allowed:
        raise UserError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return value


def _require(obj: Any, name: str, ok: bool, rule: str) -> None:
    if not ok:
        raise UserError(f"{obj.SECTION}.{name} must be {rule}, got {getattr(obj, name)!r}")


def _at_least(obj: Any, low: int, *names: str) -> None:
    for name in names:
        _require(obj, name, getattr(obj, name) >= low, f">= {low}")


def _finite(x: float) -> bool:
    return math.isfinite(x)


# --- building from dicts (JSON, --set) ----------------------------------------------------------

def _build(cls, d: dict[str, Any], where: str, **given):
    """Instantiate dataclass `cls` from a (possibly nested) dict, rejecting unknown keys."""
    if not isinstance(d, dict):
        raise UserError(f"{where or 'config'} expects a table of fields, got {d!r}")
    hints = _hints(cls)
    kwargs = dict(given)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in d.items():
        if key not in names:
            raise UserError(f"unknown config key {_join(where, key)!r}")
        if key in given:
            continue
        kwargs[key] = _coerce(value, hints[key], _join(where, key))
    try:
        return cls(**kwargs)
    except ValueError as e:  # a model shape's own check (models raise ValueError; the engine, UserError)
        raise UserError(f"{where}: {e}" if where else str(e)) from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a JSON value or a CLI string to the annotated type of field `name`."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return _check_literal(value, tp, name)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _coerce(value, args[0], name)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name} expects a list, got {value!r}")
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
    except (TypeError, ValueError, OverflowError):  # OverflowError: int("inf")
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


# --- host memory of the loader's batches ------------------------------------------------------

def check_batch_memory(data: DataConfig, views: Any, grad_accum: int, *, available: int | None = None) -> int:
    """Refuse, with one UserError line, a micro-batch whose host copies would not fit in this
    machine's available memory, before the loader allocates them and the kernel's OOM killer
    ends the process without a word. Returns the estimated bytes.

    `views`: the model's `ViewSpec`. One image is both views in float32, `[3, Hu, Hu] + [3, Hg, Hg]`
    (one tensor when `views.same_pixels`). Images alive at once: the `grad_accum` batches a step
    holds, one being assembled, and what the decode workers prefetch (`Loader._start_workers`:
    each of `num_workers` holds max(2, ceil(2 B / num_workers)) samples, about two batches in all).
    `available`: bytes; by default /proc/meminfo's MemAvailable (no check where it is unreadable).
    """
    available = _mem_available() if available is None else available
    if available is None:
        return 0
    b, w = data.batch_size, data.num_workers
    pixels = views.und_size**2 + (0 if views.same_pixels(data.und_downscale) else views.gen_size**2)
    per_image = 3 * 4 * pixels
    prefetched = w * max(2, -(-2 * b // w)) if w > 0 else 0
    images = (grad_accum + 1) * b + prefetched
    need = images * per_image
    if need > available:
        raise UserError(
            f"data.batch_size {b} needs about {need / 2**30:,.1f} GiB of host memory for its images "
            f"({images:,} images of {per_image / 2**20:.1f} MiB alive: {grad_accum} + 1 batches and {prefetched:,} "
            f"prefetched by {w} workers), but {available / 2**30:,.1f} GiB is available; "
            "lower data.batch_size (or data.num_workers, optim.grad_accum)")
    return need


def _mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None where there is no such file (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        return None
    return None
