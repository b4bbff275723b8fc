"""Memory per rank of a preset under FSDP2 at 1, 2, 4, 8 ... ranks, from its meta-device model
(`reca info --world-size N`), so a user knows what fits before renting machines.

Per rank, in bytes, with N ranks, `distributed.strategy=fsdp` as `reca.engine.distributed`
applies it (`fully_shard` on every block of `find_blocks`, then the root; parameters stored in
their own dtype and gathered in bf16, gradients reduced and kept in fp32):

    parameters   every parameter (frozen ones too: they sit in the sharded blocks) / N
    gradients    trainable parameters in fp32 / N
    optimizer    AdamW's two fp32 moments of the trainable parameters / N (frozen ones hold none),
                 and with `train.ema` the EMA's shadow of them in their own dtype / N
    gathered     bf16 working copies alive at once: the root's own parameters (kept gathered
                 between forward and backward, as FSDP2 does for the root) and two blocks (the
                 one running and the one prefetched)
    activations  an estimate for one micro-batch of `data.batch_size` samples (the per-rank
                 batch: it does not shrink with N): a trainable block saves, in bf16, the inputs
                 and outputs of its Linear layers for the backward (2 bytes x tokens x (sum of
                 in + out widths)); a checkpointed block (`train.checkpoint_every`) saves only
                 its input (2 bytes x tokens x width) and recomputes the rest, one block at a
                 time (the largest counted once). Tokens per sample: the family's `flop_plan`
                 for the block's module, else visual + instruction + generation tokens.
                 Frozen blocks save nothing (no gradient flows into them). Not counted: the
                 loss head's logits, the allocator's fragmentation, the CUDA context.

A card fits when the total is at most `usable` of its memory (90%: the rest for the CUDA
context, NCCL buffers and fragmentation). Host memory: without `train.init_from`, rank 0 builds the
whole model on the CPU once, in the dtypes it trains in, to fill every rank's shards
(`reca.engine.fsdp`); with it each rank reads its own (`reca.engine.shards`). `reca bench memory`
measures what this projects (`reca.engine.bench.memstep`).
"""
from __future__ import annotations

import torch.nn as nn

from reca.engine.compile import find_blocks

CARD_GIB = 80
USABLE = 0.9
WORLD_SIZES = (1, 2, 4, 8)
_BF16, _FP32 = 2, 4


def memory_per_rank(model: nn.Module, cfg, world_sizes=WORLD_SIZES) -> dict:
    """{"rows": [{"world_size", "parameters", "gradients", "optimizer", "gathered", "activations",
    "total", "fits"} in bytes ("ema": the EMA's part of "optimizer")], "card_bytes",
    "tokens_per_sample"} for a (meta-device) model."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    train_numel = sum(p.numel() for p in trainable)
    ema_bytes = sum(p.numel() * p.element_size() for p in trainable) if cfg.train.ema else 0
    blocks = find_blocks(model)
    in_blocks = {id(p) for _, b in blocks for p in b.parameters()}
    root_numel = sum(p.numel() for p in params if id(p) not in in_blocks)
    block_numel = sorted((sum(p.numel() for p in b.parameters()) for _, b in blocks), reverse=True)
    gathered = _BF16 * (root_numel + sum(block_numel[:2]))
    activations, tokens = activation_bytes(model, cfg, blocks)
    card = CARD_GIB * 2**30
    rows = []
    for n in world_sizes:
        row = {"world_size": n, "parameters": param_bytes / n, "gradients": _FP32 * train_numel / n,
               "optimizer": (2 * _FP32 * train_numel + ema_bytes) / n, "ema": ema_bytes / n,
               "gathered": float(gathered),
               "activations": float(activations)}
        row["total"] = sum(row[k] for k in ("parameters", "gradients", "optimizer", "gathered", "activations"))
        row["fits"] = row["total"] <= USABLE * card
        rows.append(row)
    return {"rows": rows, "card_bytes": card, "usable": USABLE, "tokens_per_sample": tokens,
            "rank0_host_bytes": float(param_bytes)}


def activation_bytes(model: nn.Module, cfg, blocks: list[tuple[str, nn.Module]]) -> tuple[float, dict]:
    """(bytes saved for the backward by one micro-batch, tokens per sample of each trained
    block's Linear layers): the module docstring's estimate. Tokens of a Linear: those of the
    longest `flop_plan` stage that names it or a module above it (a Mixture-of-Transformers
    expert sees only its own tokens); a block's input: the most any of its Linear layers sees.
    Frozen Linear layers inside a trained block (BAGEL's understanding expert) save nothing."""
    batch, every = cfg.data.batch_size, cfg.train.checkpoint_every
    trained = [(n, b) for n, b in blocks if any(p.requires_grad for p in b.parameters())]
    per_module = _tokens_per_module(model, cfg)
    fallback = _fallback_tokens(model, cfg)
    saved, recompute, seen = 0.0, 0.0, {}
    for i, (name, block) in enumerate(trained):
        full, widest, width = 0.0, 0.0, None
        for sub, m in block.named_modules():
            if not isinstance(m, nn.Linear) or not m.weight.requires_grad:
                continue
            t = _tokens(f"{name}.{sub}", per_module, fallback)
            full += _BF16 * batch * t * (m.in_features + m.out_features)
            widest = max(widest, t)
            width = m.in_features if width is None else min(width, m.in_features)
        if width is None:
            continue
        seen[name.rsplit(".", 1)[0]] = widest
        if every > 0 and i % every == 0:
            saved += _BF16 * batch * widest * width
            recompute = max(recompute, full)
        else:
            saved += full
    return saved + recompute, seen


def _tokens(name: str, per_module: dict[str, float], fallback: float) -> float:
    hits = [m for m, t in per_module.items() if t > 0 and (name == m or name.startswith(m + "."))]
    return per_module[max(hits, key=len)] if hits else fallback


def _tokens_per_module(model: nn.Module, cfg) -> dict[str, float]:
    if "flop_plan" not in model.capabilities:
        return {}
    prompt = model.num_visual_tokens + cfg.sample.max_text_tokens
    out: dict[str, float] = {}
    for stage in model.flop_plan(prompt):
        out[stage.module] = out.get(stage.module, 0.0) + float(stage.tokens)
    return out


def _fallback_tokens(model: nn.Module, cfg) -> float:
    return float(model.num_visual_tokens + cfg.sample.max_text_tokens + getattr(model, "latent_grid", 0) ** 2)


def format_table(report: dict, asked: int | None = None) -> list[str]:
    """Lines of `reca info --world-size`: GiB per rank for each world size, and the verdict."""
    gib = 2**30
    lines = [f"  memory per rank under FSDP (GiB; bf16 compute, fp32 gradients and AdamW state; one "
             f"micro-batch of activations, estimated; fits = at most {report['usable']:.0%} of an "
             f"{report['card_bytes'] / gib:.0f} GiB card):",
             f"    {'ranks':>5}  {'params':>7}  {'grads':>7}  {'optim':>7}  {'gathered':>8}  {'activ.':>7}  "
             f"{'total':>7}  fits"]
    for r in report["rows"]:
        mark = "  <- --world-size" if r["world_size"] == asked else ""
        lines.append(f"    {r['world_size']:>5}  {r['parameters'] / gib:>7.1f}  {r['gradients'] / gib:>7.1f}  "
                     f"{r['optimizer'] / gib:>7.1f}  {r['gathered'] / gib:>8.1f}  {r['activations'] / gib:>7.1f}  "
                     f"{r['total'] / gib:>7.1f}  {'yes' if r['fits'] else 'no'}{mark}")
    lines.append(f"  rank 0's host holds the whole model once at the start ({report['rank0_host_bytes'] / gib:.1f} "
                 "GiB: every rank's shards are filled from it, then it is freed), unless --init-from's files "
                 "fill them (each rank reads its own)")
    fitting = [r["world_size"] for r in report["rows"] if r["fits"]]
    lines.append(f"  fits an {report['card_bytes'] / gib:.0f} GiB card from {fitting[0]} rank(s)" if fitting
                 else "  fits no listed world size: raise the ranks, lower data.batch_size or set "
                      "train.checkpoint_every=1")
    return lines

