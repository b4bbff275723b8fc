"""Harmon weights in and out: the public checkpoint layout (a flat state dict with the prefixes
`llm.`, `proj_in.`, `proj_out.`, `mar.`; see HARMON_LAYOUT.md) and local Qwen2.5 / KL-16 files.

`HarmonModel`'s parameter names equal the layout's, so loading and export are a filter on the
prefix, never a renaming table. A directory for `load_pretrained` may hold (each part optional,
later ones overriding earlier ones):

    DIR/llm/                 a Hugging Face Qwen2.5 directory (Qwen2ForCausalLM keys, lm_head optional when tied)
    DIR/*.pth                one Harmon checkpoint (torch.load(weights_only=True)), or
    DIR/harmon.safetensors   the same as safetensors
    DIR/vae.safetensors, DIR/vae/ or DIR/kl16.ckpt   the KL-16 VAE (LDM AutoencoderKL keys;
                             MAR's kl16.ckpt wraps them in {"model": ...})

Shapes must match the preset exactly; every tensor is used, or is one of those named here as
unused (the rotary `inv_freq` buffer some releases saved; an LDM file's `loss.*`), and every
parameter a file is for is in it: otherwise one line names the tensor (`reca.models.loading`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from reca.models.loading import (INV_FREQ, LDM_LOSS, check_release_config, expected_fields, load_into,
                                 read_checkpoint, read_safetensors)

PREFIXES = ("llm.", "proj_in.", "proj_out.", "mar.")
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some transformers releases saved; rebuilt from the config


def harmon_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors in Harmon's layout: every `llm.`/`proj_in.`/`proj_out.`/`mar.` entry
    (the tied `llm.lm_head.weight` included, as in the public files), no VAE."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(PREFIXES) and not k.endswith(_IGNORED)}


def export_harmon(model: torch.nn.Module, path: str | Path) -> Path:
    """Write the weights where Harmon's own code loads them: `.safetensors` or a torch `.pth`.
    Tensors are cloned to the CPU (tied weights become two entries, as safetensors requires)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in harmon_state_dict(model).items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save(state, path)
    return path


def load_harmon_checkpoint(model: torch.nn.Module, path: str | Path) -> int:
    """Copy a Harmon-layout checkpoint into `model`; returns how many tensors were set. Every
    parameter under the four prefixes must be present (the LM head may be absent when tied), and
    no other key may be (but the rotary buffer some transformers releases saved)."""
    return load_into(model, read_checkpoint(path), Path(path).name, unused=(INV_FREQ,),
                     optional=(lambda k: not k.startswith(PREFIXES),))  # the VAE is its own file


def load_vae(model: torch.nn.Module, path: Path) -> int:
    state = read_safetensors(path) if path.suffix == ".safetensors" or path.is_dir() else read_checkpoint(path)
    name = path.name + ("/" if path.is_dir() else "")
    return load_into(model.codec, state, name, unused=(LDM_LOSS,))  # MAR's kl16.ckpt also holds loss.*


def load_pretrained(model: torch.nn.Module, directory: str | Path) -> dict[str, int]:
    """Load whatever parts `directory` holds (see the module docstring); a file is read as a
    Harmon checkpoint. Returns the number of tensors set per part."""
    root = Path(directory)
    if root.is_file():
        return {root.name: load_harmon_checkpoint(model, root)}
    if not root.is_dir():
        raise ValueError(f"--init-from directory not found: {root}")
    loaded: dict[str, int] = {}
    if (root / "llm").is_dir():
        check_release_config(root / "llm" / "config.json", expected_fields(model.llm.config), "llm/config.json")
        loaded["llm/"] = load_into(model.llm, read_safetensors(root / "llm"), "llm/", unused=(INV_FREQ,))
    checkpoints = sorted(root.glob("*.pth")) + [p for p in (root / "harmon.safetensors",) if p.exists()]
    if len(checkpoints) > 1:
        names = ", ".join(p.name for p in checkpoints)
        raise ValueError(f"{root} holds {len(checkpoints)} Harmon checkpoints ({names}); keep one")
    if checkpoints:
        loaded[checkpoints[0].name] = load_harmon_checkpoint(model, checkpoints[0])
    for vae in (root / "vae.safetensors", root / "vae", root / "kl16.ckpt"):
        if vae.exists():
            loaded[vae.name + ("/" if vae.is_dir() else "")] = load_vae(model, vae)
            break
    if not loaded:
        raise ValueError(f"{root} holds none of llm/, *.pth, harmon.safetensors, vae.safetensors, vae/, kl16.ckpt")
    return loaded
