"""Show-o weights in and out. `ShowoModel`'s names are the public checkpoints' own
(`showlab/show-o*`: a flat state dict, `showo.` = PhiForCausalLM with the 58,498-token
embedding and biased lm_head, `mm_projector.{0,2}` in the CLIP variants), so loading and export
filter by prefix. A directory for `load_pretrained` may hold (each part optional):

    DIR/*.safetensors | DIR/pytorch_model.bin   a Show-o checkpoint (`showo.*`, `mm_projector.*`)
    DIR/phi/      a Hugging Face Phi-1.5 directory (`model.*`, `lm_head.*`, vocabulary 51,200):
                  rows of the text tokens are copied, the rest keep their initialisation
                  (Show-o's `resize_token_embeddings` to 58,498); Phi-1.5 has no q/k LayerNorms,
                  which keep theirs (ones and zeros), as Show-o's training from Phi-1.5 starts
    DIR/clip/     a Hugging Face CLIP vision (or full CLIP) directory; the last layer is not built,
                  and a full CLIP's text model, projections and logit scale are not used
    DIR/magvitv2/ Show-o's MAGVIT-v2 (`encoder.*`, `decoder.*`, `quantize.*`)

Shapes must match the preset; every other tensor is used, and a Show-o checkpoint holds every
`showo.*` and `mm_projector.*` parameter; an error is one line naming the tensor.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from reca.models.loading import (INV_FREQ, POSITION_IDS, check_release_config, copy_into, expected_fields,
                                 last_layers, load_into, read_checkpoint, read_safetensors)

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
    return read_checkpoint(path)


QK_NORM = r"self_attn\.[qk]_layernorm\."  # Show-o's q/k LayerNorms: Phi-1.5 has none (init: ones, zeros)
CLIP_UNUSED = (  # of a full CLIP directory (openai/clip-vit-large-patch14-336), what the tower does not use
    r"^text_model\.", r"^(visual|text)_projection\.", r"^logit_scale$",  # the text side
    POSITION_IDS,
)


def _phi(model, state: dict[str, torch.Tensor]) -> int:
    """Phi-1.5 keys into `model.showo`; the 51,200-row tables fill the text rows only (the rest
    keep their initialisation, as Show-o's `resize_token_embeddings` leaves them)."""
    own = model.showo.state_dict()
    text = model.layout.text
    resized: set[str] = set()
    with torch.no_grad():
        for key in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
            if key in state and state[key].shape[0] != own[key].shape[0]:
                if state[key].shape[0] < text:
                    raise ValueError(f"phi/: {key} has {state[key].shape[0]} rows, fewer than the {text} text tokens")
                copy_into(own[key][:text], state[key][:text])
                state.pop(key)
                resized.add(key)
    return load_into(model.showo, state, "phi/", unused=(INV_FREQ,),
                     optional=(QK_NORM, lambda k: k in resized)) + len(resized)


def load_pretrained(model, directory: str | Path) -> dict[str, int]:
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"--init-from directory not found: {root}")
    loaded: dict[str, int] = {}
    if (root / "phi").is_dir():  # Phi-1.5's own vocabulary and no q/k LayerNorms: Show-o resizes and adds them
        check_release_config(root / "phi" / "config.json",
                             expected_fields(model.showo.config, vocab_size=None, qk_layernorm=None), "phi/config.json")
        loaded["phi/"] = _phi(model, read_safetensors(root / "phi"))
    if (root / "clip").is_dir() and hasattr(model, "clip"):
        kept = model.clip.config.num_hidden_layers  # the tower's last layer is never built
        check_release_config(root / "clip" / "config.json",
                             expected_fields(model.clip.config, ("hidden_size", "intermediate_size", "num_attention_heads",
                                                                 "patch_size", "image_size"), num_hidden_layers=kept + 1),
                             "clip/config.json", section="vision_config")
        # transformers releases differ on whether CLIPVisionModel nests a `vision_model`; a full
        # CLIP's text side keeps its own names (not used)
        own = "vision_model." if any(k.startswith("vision_model.") for k in model.clip.state_dict()) else ""
        state = {own + k[len("vision_model."):] if k.startswith("vision_model.") else
                 (own + k if k.split(".")[0] in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm") else k): v
                 for k, v in read_safetensors(root / "clip").items()}
        loaded["clip/"] = load_into(model.clip, state, "clip/", unused=CLIP_UNUSED + (last_layers(kept),))
    if (root / "magvitv2").is_dir():
        loaded["magvitv2/"] = load_into(model.vq, read_safetensors(root / "magvitv2"), "magvitv2/")
    files = sorted(root.glob("*.safetensors")) or sorted(root.glob("pytorch_model*.bin"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(_read(f))
        if not any(k.startswith(PREFIXES) for k in state):
            raise ValueError(f"{files[0].name}: no showo.* or mm_projector.* tensors (not a Show-o checkpoint)")
        name = files[0].name if len(files) == 1 else f"{files[0].name} (+{len(files) - 1} shards)"
        check_release_config(root / "config.json", {  # Showo's own config (modeling_showo.py register_to_config)
            "vocab_size": model.layout.size, "llm_vocab_size": model.layout.text, "codebook_size": model.vq.codebook_size,
            "num_vq_tokens": model.num_codes, "w_clip_vit": model.cfg.visual == "clip"}, "config.json")
        # a Show-o checkpoint holds showo.* and mm_projector.* whole; the CLIP tower and MAGVIT-v2 are their own
        loaded[name] = load_into(model, state, name, unused=(INV_FREQ,),
                                 optional=(lambda k: not k.startswith(PREFIXES),))
    if not loaded:
        raise ValueError(f"{root} holds none of a Show-o checkpoint, phi/, clip/, magvitv2/")
    return loaded
