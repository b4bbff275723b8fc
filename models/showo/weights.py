"""Show-o weights in and out. `ShowoModel`'s names are the public checkpoints' own
(`showlab/show-o*`: a flat state dict, `showo.` = PhiForCausalLM with the 58,498-token
embedding and biased lm_head, `mm_projector.{0,2}` in the CLIP variants), so loading and export
filter by prefix. A directory for `load_pretrained` may hold (each part optional):

    DIR/*.safetensors | DIR/pytorch_model.bin   a Show-o checkpoint (`showo.*`, `mm_projector.*`)
    DIR/phi/      a Hugging Face Phi-1.5 directory (`model.*`, `lm_head.*`, vocabulary 51,200):
                  rows of the text tokens are copied, the rest keep their initialisation
                  (Show-o's `resize_token_embeddings` to 58,498)
    DIR/clip/     a Hugging Face CLIP vision (or full CLIP) directory; the last layer is not built
    DIR/magvitv2/ Show-o's MAGVIT-v2 (`encoder.*`, `decoder.*`, `quantize.*`)

Shapes must match the preset; an error is one line naming the tensor.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from reca.models.loading import load_into, read_safetensors

PREFIXES = ("showo.", "mm_projector.")
_IGNORED = ("rotary_emb.inv_freq",)


def showo_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(PREFIXES) and not k.endswith(_IGNORED)}


def export_showo(model, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in showo_state_dict(model).items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save(state, path)
    return path


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir() or path.suffix == ".safetensors":
        return read_safetensors(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _phi(model, state: dict[str, torch.Tensor]) -> int:
    """Phi-1.5 keys into `model.showo`; the 51,200-row tables fill the text rows only."""
    own = model.showo.state_dict()
    text = model.layout.text
    with torch.no_grad():
        for key in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
            if key in state and state[key].shape[0] != own[key].shape[0]:
                own[key][:text].copy_(state.pop(key)[:text])
    return load_into(model.showo, state, "phi", strict=False) + 3


def load_pretrained(model, directory: str | Path) -> dict[str, int]:
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"--init-from directory not found: {root}")
    loaded: dict[str, int] = {}
    if (root / "phi").is_dir():
        loaded["phi"] = _phi(model, read_safetensors(root / "phi"))
    if (root / "clip").is_dir() and hasattr(model, "clip"):
        kept = model.clip.config.num_hidden_layers
        state = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v
                 for k, v in read_safetensors(root / "clip").items()}

        def wanted(key: str) -> bool:
            layer = re.match(r"encoder\.layers\.(\d+)\.", key)
            return key.split(".")[0] in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm") and (
                layer is None or int(layer.group(1)) < kept)

        state = {"vision_model." + k: v for k, v in state.items() if wanted(k)}
        loaded["clip"] = load_into(model.clip, state, "clip")
    if (root / "magvitv2").is_dir():
        loaded["vq"] = load_into(model.vq, read_safetensors(root / "magvitv2"), "magvitv2")
    files = sorted(root.glob("*.safetensors")) or sorted(root.glob("pytorch_model*.bin"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(_read(f))
        state = {k: v for k, v in state.items() if k.startswith(PREFIXES) and not k.endswith(_IGNORED)}
        if not state:
            raise ValueError(f"{files[0]}: no showo.* or mm_projector.* tensors (not a Show-o checkpoint)")
        loaded["showo"] = load_into(model, state, "showo", strict=False)
        params = {n for n, _ in model.named_parameters() if n.startswith(PREFIXES)}
        missing = sorted(params - state.keys())
        if missing:
            raise ValueError(f"showo: the checkpoint lacks {len(missing)} parameters, e.g. {missing[0]}")
    if not loaded:
        raise ValueError(f"{root} holds none of a Show-o checkpoint, phi/, clip/, magvitv2/")
    return loaded
