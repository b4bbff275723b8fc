"""What a resume must not change: the fields that decide the model or the data order, and
the frozen weights themselves.

A checkpoint stores only trainable parameters; frozen ones (a ViT, a connector, a VAE) are
rebuilt at start from `train.seed`, `train.init_from` and `model.*`. `resume_conflicts`
compares the run's saved config with the resumed one field by field; `frozen_fingerprint`
proves the rebuilt weights are the ones the run trained with (it also catches what no config
shows: weight files swapped under the same `--init-from` path, or random weights drawn by
another device type: a one-GPU run's on the GPU, an fsdp job's on rank 0's CPU; see
`build.seeded_model`).
"""
from __future__ import annotations

import json
from typing import Any

import torch

from reca.engine.errors import UserError

# A prefix stands for every field under it.
RESUME_FIELDS = ("model", "train.seed", "train.init_from", "data.source", "data.seed", "data.batch_size",
                 "data.shuffle_window", "optim.grad_accum", "mix.cycle", "mix.caption_source")
_CHUNK = 1 << 22  # elements per reduction: bounds the temporary int64 copy to 32 MiB on the device
_MOD = 65521  # position weights 1..65521: a moved or swapped value changes the weighted sum


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def resume_conflicts(saved: dict, new: dict) -> list[str]:
    """Lines like "train.seed changed from 0 to 1" for every field in `RESUME_FIELDS` that
    differs between a run's saved config dict and the one a resume would use."""
    saved, new = (_flat(json.loads(json.dumps(d))) for d in (saved, new))  # tuples and lists compare equal
    out = []
    for key in sorted(saved.keys() | new.keys()):
        if not any(key == f or key.startswith(f + ".") for f in RESUME_FIELDS):
            continue
        if key not in new:
            out.append(f"{key} (was {json.dumps(saved[key])}) is gone")
        elif key not in saved:
            out.append(f"{key} is new (set to {json.dumps(new[key])})")
        elif saved[key] != new[key]:
            out.append(f"{key} changed from {json.dumps(saved[key])} to {json.dumps(new[key])}")
    return out


def refuse_conflicts(saved: dict, new: dict, run) -> None:
    """One-line `UserError` when `resume_conflicts` finds anything (three named at most)."""
    lines = resume_conflicts(saved, new)
    if lines:
        more = f" and {len(lines) - 3} more" if len(lines) > 3 else ""
        raise UserError(f"cannot resume {run}: {'; '.join(lines[:3])}{more}. These decide the model or the data "
                        "order; resume with the run's own values, or start a new run (another --out)")


@torch.no_grad()
def frozen_fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """name -> "dtype shape sum weighted-sum" for every parameter with requires_grad False.
    The sums run over the raw bits (16-bit words, bytes for 1-byte dtypes) as int64 on the
    parameter's own device: exact, independent of reduction order, so identical weights give
    identical strings on any device, and no weight is copied to the host (14B parameters
    cost a few hundred small reductions and one host read)."""
    names, sums = [], []
    for name, p in model.named_parameters():
        if p.requires_grad or p.is_meta:
            continue
        names.append((name, p))
        sums.append(word_sums(p.detach(), 0))
    values = torch.stack(sums).cpu().tolist() if sums else []  # the one host read
    return {name: fingerprint_line(p, a, b) for (name, p), (a, b) in zip(names, values)}


def word_sums(t: torch.Tensor, first: int) -> torch.Tensor:
    """[sum of the words, sum of word x (position % 65521 + 1)] (int64, on t's device) of `t`'s
    raw bits, `t` being the elements of a whole tensor from its element `first` on (a shard:
    sums of shards add up to the whole's)."""
    flat = t.reshape(-1)
    words = flat.view(torch.uint8) if flat.element_size() == 1 else flat.view(torch.int16)
    offset = first * max(1, flat.element_size() // 2)
    total = torch.zeros(2, dtype=torch.int64, device=t.device)
    for start in range(0, words.numel(), _CHUNK):
        w = words[start : start + _CHUNK].to(torch.int64)
        pos = (torch.arange(start, start + w.numel(), device=t.device, dtype=torch.int64) + offset) % _MOD + 1
        total[0] += w.sum()
        total[1] += (w * pos).sum()
    return total


def fingerprint_line(p: torch.Tensor, a: int, b: int) -> str:
    return f"{str(p.dtype).removeprefix('torch.')} {list(p.shape)} {a:x} {b:x}"


def fingerprint_conflict(saved: dict[str, str], now: dict[str, str]) -> str | None:
    """None when the frozen weights match the checkpoint's, else a phrase naming the first
    parameter that differs. An empty `saved` (a checkpoint that stored none) matches."""
    if not saved:
        return None
    for name in sorted(saved.keys() | now.keys()):
        if name not in now:
            return f"frozen parameter {name} of the checkpoint's model is missing from this one"
        if name not in saved:
            return f"this model has a frozen parameter {name} that the checkpoint's model did not"
        if saved[name] != now[name]:
            return (f"frozen parameter {name} differs from the one the run trained with (the seed or the "
                    "--init-from weights changed, or another device type drew it: a one-GPU run draws on "
                    "the GPU, an fsdp job on the CPU)")
    return None
