"""Loading pretrained weights from a local directory (`reca train --init-from DIR`).

The rule every family follows: each tensor of a file is copied into the model, or is on the
family's declared list of tensors it does not use (`unused=`, each with its reason where it is
declared), or the load is refused; each parameter a file is meant to supply is in it, or is on
the declared list of those it may lack (`optional=`), or the load is refused. A refusal is a
`ValueError` of one line naming the file, the count and one tensor. `recording()` collects
what each file supplied, for the report at the start of a run and `reca info --init-from`.

The flow family's directory (the other families' layouts are in their `weights.py`):

    DIR/llm/    a Hugging Face Qwen2 directory (config.json + *.safetensors, sharded or not);
                `Qwen2ForCausalLM` keys ("model." prefix) are accepted; its `lm_head` is not
                used (the family reads no text logits)
    DIR/vit/    a Hugging Face SigLIP vision directory ("vision_model." prefix accepted; the
                last layer and the pooling head are not used: the family takes the
                second-to-last layer's features)
    DIR/vae/    or DIR/vae.safetensors: latent-diffusion AutoencoderKL keys (e.g. FLUX's ae;
                an LDM training file's `loss.*` discriminator and LPIPS are not used)
    DIR/model.safetensors   any of the model's own tensors by their reca names (connector,
                gen_in, ...), e.g. a previous reca export: the one file that may be partial

Every part is optional; parameters no file supplies keep their initialisation, and the report
names them. Shapes must match the configured ones exactly.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import pickle
import re
from pathlib import Path
from typing import Callable, Iterable, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

Rule = Union[str, Callable[[str], bool]]  # a regular expression (re.search) or a predicate on the key
_HEADERS = contextvars.ContextVar("reca_headers_only", default=False)
_RECORD: contextvars.ContextVar = contextvars.ContextVar("reca_load_record", default=None)
_MAPPED: contextvars.ContextVar = contextvars.ContextVar("reca_mapped", default=None)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@contextlib.contextmanager
def headers_only():
    """Inside, files are read for their keys and shapes alone (meta tensors) and nothing is
    copied: what `reca info --init-from` uses to check a directory against a preset on the meta
    device without reading gigabytes."""
    token = _HEADERS.set(True)
    try:
        yield
    finally:
        _HEADERS.reset(token)


@contextlib.contextmanager
def mapped(model: torch.nn.Module):
    """Inside, files are read a slice at a time (`reca.models.mapped`): `load_into` copies into
    `model`'s real tensors and, for its meta ones, records the file's tensor under its full name
    in the yielded `Mapped`'s `sink`, for `Mapped.read` to read each rank's rows of later."""
    from reca.models.mapped import Mapped

    m = Mapped({id(mod): f"{name}." if name else "" for name, mod in model.named_modules()})
    token = _MAPPED.set(m)
    try:
        yield m
    finally:
        _MAPPED.reset(token)
        m.close()


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)` where a family fills part of a tensor itself (Show-o's resized embedding
    rows): nothing with `headers_only`, or where `dst` is a meta tensor (`mapped`)."""
    if _HEADERS.get() or dst.is_meta:
        return
    m = _MAPPED.get()
    with torch.no_grad():
        dst.copy_(m.read(src) if m is not None else src)


@contextlib.contextmanager
def recording():
    """Collect what every `load_into` inside supplies: {"files": {where: (loaded, unused)},
    "set": ids of the parameters written}."""
    record = {"files": {}, "set": set(), "notes": []}
    token = _RECORD.set(record)
    try:
        yield record
    finally:
        _RECORD.reset(token)


def note(text: str) -> None:
    """A line for the report of what --init-from did beyond copying tensors (a setting read from a
    release's config, say)."""
    record = _RECORD.get()
    if record is not None:
        record["notes"].append(text)


def _first_line(e: BaseException) -> str:
    """One line for an error: torch's weights-only refusal wraps its cause in a page of advice."""
    advice = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line and not line.startswith(advice)]
    return (lines[0] if lines else type(e).__name__)[:200]


def _safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return _read_safetensors_file(path)
    except SafetensorError as e:  # a bad, empty or cut header
        raise ValueError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    m = _MAPPED.get()
    if not _HEADERS.get() and m is None:
        return load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        out = {}
        for key in f.keys():
            part = f.get_slice(key)
            dtype = _DTYPES.get(part.get_dtype())
            if dtype is None and m is not None:
                raise ValueError(f"{path}: {key} is {part.get_dtype()}, a type reca does not read")
            out[key] = torch.empty(part.get_shape(), dtype=dtype or torch.float32, device="meta")
            if m is not None:
                m.register(out[key], path, key)
        return out


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of every shard in a directory."""
    path = Path(path)
    if path.is_file():
        return _safetensors_file(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else None
    files = [path / f for f in files] if files else sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_safetensors_file(f))
    return state


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from `.safetensors` or a torch file (tensors only: weights_only=True);
    a single wrapping key ("model", "state_dict", "module") is unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _safetensors_file(path)
    try:
        if _HEADERS.get():
            state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
        elif _MAPPED.get() is not None:  # pages are read as each rank copies its rows
            state = _load_mmap(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, ImportError) as e:
        # weights_only refuses anything but tensors and plain containers (a hostile pickle, a
        # pickled model), and a cut or foreign file fails to unpickle: one line, nothing run
        raise ValueError(f"{path}: not a plain tensor checkpoint (torch.load with weights_only=True: "
                         f"{_first_line(e)})") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state


def _load_mmap(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # only the pre-1.6 format cannot be memory-mapped: it is read whole
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _matcher(rules: Iterable[Rule]) -> Callable[[str], bool]:
    rules = [re.compile(r).search if isinstance(r, str) else r for r in rules]
    return lambda key: any(rule(key) for rule in rules)


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str, *,
              unused: Iterable[Rule] = (), optional: Iterable[Rule] = ()) -> int:
    """Copy `state` into `module`'s parameters and buffers; returns how many were set.

    Every key of `state` must name a tensor of `module` (same shape) or match `unused` (tensors
    the family does not use); every parameter of `module` must be in `state` or match
    `optional` (parameters this file may lack). Anything else is a one-line ValueError."""
    own = dict(module.state_dict())
    is_unused, is_optional = _matcher(unused), _matcher(optional)
    skipped = [k for k in state if k not in own and is_unused(k)]
    foreign = sorted(k for k in state if k not in own and not is_unused(k))
    if foreign:
        raise ValueError(f"{where}: {_count(foreign, 'tensor')} this model has no place for, e.g. {foreign[0]} "
                         "(another model, preset or layout?)")
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"{where}: {key} has shape {tuple(value.shape)} in the checkpoint but the "
                             f"model builds {tuple(own[key].shape)}; choose the preset (or --set model.*) that matches")
    params = dict(module.named_parameters())  # tied tensors once, under their first name
    missing = sorted(n for n in params if n not in state and not is_optional(n))
    if missing:
        raise ValueError(f"{where}: the checkpoint lacks {_count(missing, 'parameter')} of this model, e.g. {missing[0]}")
    matched = [k for k in state if k in own]
    m = _MAPPED.get()
    if not _HEADERS.get():
        with torch.no_grad():
            for key in matched:
                if m is not None and own[key].is_meta:  # read later, a shard at a time
                    m.sink[m.prefix(module) + key] = state[key]
                else:
                    own[key].copy_(m.read(state[key]) if m is not None else state[key])
    record = _RECORD.get()
    if record is not None:
        loaded, dropped = record["files"].get(where, (0, 0))
        record["files"][where] = (loaded + len(matched), dropped + len(skipped))
        record["set"].update(id(params[k]) for k in matched if k in params)
    return len(matched)


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def last_layers(kept: int, prefix: str = r"(^|\.)encoder\.layers\.") -> Callable[[str], bool]:
    """The layers at index >= `kept` of an encoder a family builds shorter than the release (it
    reads the second-to-last layer's features, so the last one is never built)."""
    pattern = re.compile(prefix + r"(\d+)\.")

    def beyond(key: str) -> bool:
        m = pattern.search(key)
        return m is not None and int(m.group(2)) >= kept

    return beyond


SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "head_dim", "patch_size", "rope_theta", "partial_rotary_factor", "layer_norm_eps",
              "rms_norm_eps", "qk_layernorm", "tie_word_embeddings")


def expected_fields(config, keys: Iterable[str] = SHAPE_KEYS, **override) -> dict:
    """The fields of a config the model builds (a transformers or diffusers config, or a dict)
    that a release's config file must agree with; `override` replaces or adds some (None drops)."""
    d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    rope = d.get("rope_parameters") or {}
    if "rope_theta" not in d and isinstance(rope, dict) and "rope_theta" in rope:
        d["rope_theta"] = rope["rope_theta"]
    out = {k: d[k] for k in keys if k in d and d[k] is not None}
    out.update(override)
    return {k: v for k, v in out.items() if v is not None}


def check_release_config(path: Path, expected: dict, where: str, section: str | tuple[str, ...] = ()) -> None:
    """A release's config file (`path`, if it exists) against the shapes the preset builds: a
    field present in both that differs is one line naming it and both values. `section` names
    the nested config to read (a full CLIP's "vision_config"; tried in order)."""
    if not path.exists():
        return
    try:
        release = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{where}: not a JSON config ({e})") from None
    for name in (section,) if isinstance(section, str) else section:
        if isinstance(release.get(name), dict):
            release = release[name]
            break
    if isinstance(release.get("rope_parameters"), dict) and "rope_theta" not in release:
        release["rope_theta"] = release["rope_parameters"].get("rope_theta")
    checked = 0
    for key, want in expected.items():
        if key not in release or release[key] is None:
            continue
        have = release[key]
        same = (abs(float(have) - float(want)) <= 1e-9 * max(1.0, abs(float(want)))
                if isinstance(want, float) and isinstance(have, (int, float)) else
                (list(have) == list(want) if isinstance(want, (list, tuple)) and isinstance(have, (list, tuple))
                 else have == want))
        if not same:
            raise ValueError(f"{where}: {key} is {have!r} there but the preset builds {want!r}; choose the preset "
                             "(or --set model.*) that matches the release")
        checked += 1
    note(f"{where} agrees with the preset ({checked} fields)")


INV_FREQ = r"rotary_emb\.inv_freq$"  # a buffer some transformers releases saved; rebuilt from the config
POSITION_IDS = r"position_ids$"  # likewise (older CLIP/SigLIP files)
LDM_LOSS = r"^loss\."  # an LDM training file's discriminator and LPIPS: training-only


def load_pretrained(model: torch.nn.Module, directory: str | Path) -> dict[str, int]:
    """Load whatever parts `directory` holds into a flow-family model; returns tensors per file."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"--init-from directory not found: {root}")
    loaded: dict[str, int] = {}
    if (root / "llm").is_dir():
        check_release_config(root / "llm" / "config.json", expected_fields(model.llm.config), "llm/config.json")
        state = _strip(read_safetensors(root / "llm"), "model.")
        loaded["llm/"] = load_into(model.llm, state, "llm/", unused=(r"^lm_head\.", INV_FREQ))
    if (root / "vit").is_dir():
        # transformers releases differ on whether SiglipVisionModel nests a `vision_model`.
        own = "vision_model." if any(k.startswith("vision_model.") for k in model.vit.state_dict()) else ""
        state = {own + k: v for k, v in _strip(read_safetensors(root / "vit"), "vision_model.").items()}
        kept = model.vit.config.num_hidden_layers  # the last pretrained layer is never built
        check_release_config(root / "vit" / "config.json", expected_fields(model.vit.config, num_hidden_layers=kept + 1),
                             "vit/config.json", section="vision_config")
        loaded["vit/"] = load_into(model.vit, state, "vit/", unused=(r"(^|\.)head\.", last_layers(kept), POSITION_IDS))
    vae = root / "vae.safetensors" if (root / "vae.safetensors").exists() else root / "vae"
    if vae.exists():
        name = vae.name + ("" if vae.is_file() else "/")
        loaded[name] = load_into(model.codec, read_safetensors(vae), name, unused=(LDM_LOSS,))
    if (root / "model.safetensors").exists():
        # reca's own file (an export, or a few tensors by their reca names): may be partial
        loaded["model.safetensors"] = load_into(model, read_safetensors(root / "model.safetensors"),
                                                "model.safetensors", optional=(lambda k: True,))
    if not loaded:
        raise ValueError(f"{root} holds none of llm/, vit/, vae/, vae.safetensors, model.safetensors")
    return loaded
