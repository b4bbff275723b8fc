"""Speed applied from outside the model: per-block torch.compile, the kernel ops compiled into
graphs, activation checkpointing over the same blocks, the attention implementation.

Nothing here runs at import and no global compiler flag is set: `apply_compile` calls
`Module.compile` on each repeated block (state-dict names do not change, so checkpoints and
`--init-from` are unaffected), the way torchtitan compiles one transformer block at a time.
Blocks are what the model's optional `blocks()` returns, else every child of an
`nn.ModuleList` whose children are at least two modules of one class (innermost lists win:
the VAE's ResNet blocks, not its levels). One graph serves every block of a class; shapes
are fixed (`dynamic=False`): prompts are padded to P, so the step never recompiles.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn

from reca.engine.errors import UserError
from reca.kernels import KernelOps

ATTENTION = ("sdpa", "flash", "xformers")


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every repeated block: `model.blocks()` when defined, else found."""
    if hasattr(model, "blocks") and callable(model.blocks):
        names = {id(m): n for n, m in model.named_modules()}
        return [(names.get(id(m), "?"), m) for m in model.blocks()]
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and _repeated(m)]
    inner = [(n, m) for n, m in lists if not any(o.startswith(n + ".") for o, _ in lists if o != n)]
    return [(f"{n}.{i}", b) for n, m in inner for i, b in enumerate(m)]


@contextlib.contextmanager
def blocks_checked(model: nn.Module, cfg, *, sharded: bool = False):
    """Around a run's first step: every block that compile (`train.compile`), activation
    checkpointing (`train.checkpoint_every`, the trainable blocks) or FSDP (`sharded`) wrapped
    must be called through its own forward. A submodule of a block that runs while the block's
    own forward never has (a container indexed as `down[i].block[j]`: compile and checkpointing
    would silently not apply, FSDP would fail on mixed Tensor and DTensor) stops the run there,
    in one line naming the block. The step runs eagerly (`eager`): the hooks that watch it are
    gone before anything is compiled. Nothing to check: a plain step."""
    if cfg.train.compile or sharded:
        blocks = find_blocks(model)
    elif cfg.train.checkpoint_every > 0:
        blocks = [(n, b) for n, b in find_blocks(model) if any(p.requires_grad for p in b.parameters())]
    else:
        blocks = []
    if not blocks:
        yield
        return
    ran: set[int] = set()

    def entered(block_id: int):
        return lambda module, args: ran.add(block_id)

    def inside(name: str, sub: str, block_id: int):
        def check(module, args):
            if block_id not in ran:
                raise UserError(f"block {name} never ran its own forward, yet its submodule {sub} did (the model calls "
                                "into the block, e.g. down[i].block[j]): compile, activation checkpointing and FSDP "
                                "wrap a block's forward, so return modules whose forward runs from the model's blocks()")
        return check

    handles = []
    for name, block in blocks:
        handles.append(block.register_forward_pre_hook(entered(id(block))))
        for sub_name, sub in block.named_modules():
            if sub is not block:
                handles.append(sub.register_forward_pre_hook(inside(name, f"{name}.{sub_name}", id(block))))
    try:
        with eager():
            yield
    finally:
        for h in handles:
            h.remove()


def _repeated(m: nn.ModuleList) -> bool:
    kinds = {type(c) for c in m}
    return len(m) >= 2 and len(kinds) == 1 and any(True for _ in m[0].parameters())


def apply_compile(model: nn.Module) -> list[str]:
    """Compile every block in place (fullgraph: a graph break is an error, not a slow path). A
    block of torch.nn's own classes is refused in one line: dynamo starts no frame in torch's
    files, so fullgraph would fail at the first step with "found no compiled frames"."""
    blocks = find_blocks(model)
    for name, block in blocks:
        kind = type(block)
        if kind.__module__.split(".")[0] == "torch":
            raise UserError(f"train.compile: block {name} is a {kind.__module__}.{kind.__name__}, which torch.compile "
                            "does not trace at the top of a frame; wrap it in a module class of your own (or return "
                            "other modules from the model's blocks())")
        plain_forwards(block)
        block.compile(fullgraph=True, dynamic=False)
    return [n for n, _ in blocks]


def plain_forwards(block: nn.Module) -> list[str]:
    """Give each module of `block` whose class Hugging Face's `kernels` package decorated
    (`use_kernelized_func`: transformers' attention classes, when `kernels` is installed, as
    transformers 5 requires) its own undecorated forward, as an instance attribute -> their
    names. The decorator routes calls through a context variable that it writes, under
    compile, as a global: inside a checkpointed compiled block (a higher-order op that refuses
    side effects) dynamo stops with "HOP: Unsafe side effect" from the second step. Hub kernels
    are never selected here (the engine picks its kernels through `KernelConfig`), so the plain
    forward computes exactly what the decorated one did; the class itself is left as it was."""
    import types

    done = []
    for name, m in block.named_modules():
        forward = type(m).forward
        inner = getattr(forward, "__wrapped__", None)
        # the wrapper's own module (functools.wraps copied the class's __module__ onto it)
        home = getattr(forward, "__globals__", {}).get("__name__", "")
        if inner is not None and home.split(".")[0] == "kernels":
            m.forward = types.MethodType(inner, m)
            done.append(name)
    return done


def eager():
    """A context in which every compiled block and op runs as plain PyTorch
    (`torch.compiler.set_stance("force_eager")`; the compiled code is kept for later). Previews
    draw under it: a sampler's shapes may change every call (a token-by-token sampler's sequence
    grows each token), and blocks compiled for fixed shapes would recompile at every length up
    to dynamo's limit, then fail. FLOP counting too: compiled frames refuse FlopCounterMode."""
    return torch.compiler.set_stance("force_eager")


def compile_ops(ops: KernelOps) -> KernelOps:
    """The op table with each op compiled whole: the torch references fuse under inductor; the
    Triton kernels (user-defined kernels inside their autograd.Function) enter the graph as is."""
    return ops.map(lambda _, op: torch.compile(op, fullgraph=True, dynamic=False))


def apply_checkpointing(model: nn.Module, every: int, device_type: str | None = None,
                        captured: bool = False) -> list[str]:
    """Activation checkpointing from outside, over the blocks `apply_compile` compiles: every
    `every`-th trainable block (1 = all, 2 = half ...; 0 = none) recomputes its forward in the
    backward, trading compute for activation memory. The block's `forward` is wrapped on the
    instance, so parameter names, `Module.compile` (applied after, as torchtitan orders them) and
    later sharding see the same module. Frozen blocks are left alone (no activation they keep is
    needed by a gradient of theirs). `device_type` fixes the options to that device's (default: the
    device of the block's inputs; `reca bench memory` runs CUDA's on fake CPU tensors);
    `captured`: the step is a CUDA graph (`train.cuda_graph`), whose blocks with dropout save
    their random ops rather than rewind the generator (`models.layers.checkpoint_kwargs`).
    Returns the names of the blocks checkpointed."""
    if every <= 0:
        return []
    from reca.models.layers import checkpoint_kwargs

    trainable = [(n, b) for n, b in find_blocks(model) if any(p.requires_grad for p in b.parameters())]
    done = []
    for i, (name, block) in enumerate(trainable):
        if i % every == 0:
            kwargs = {d: checkpoint_kwargs(block, device_type or d, captured) for d in ("cpu", "cuda")}
            block.forward = _checkpointed(block.forward, kwargs)
            done.append(name)
    return done


def _checkpointed(forward, kwargs: dict[str, dict]):
    """`forward` under checkpoint, with the options for the device its inputs are on (how random
    draws survive the recomputation differs between CUDA and CPU: models.layers.checkpoint_kwargs)."""
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(*args, **kw):
        if not torch.is_grad_enabled():  # previews, evaluation: nothing to save or recompute
            return forward(*args, **kw)
        cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in (*args, *kw.values()))
        opts = kwargs["cuda" if cuda else "cpu"]
        fn = _uncached(forward, "cuda" if cuda else "cpu") if "context_fn" in opts else forward
        return checkpoint(fn, *args, **opts, **kw)

    return run


def _uncached(forward, device_type: str):
    """`forward` with autocast's cache of low-precision weight copies off. Selective
    checkpointing counts the ops of a region in the forward and again in the recomputation;
    with the cache on, a block that runs twice in one forward (Harmon's MAR encoder: the visual
    prompt, then the masked tokens) finds its weights already cast the second time, while the
    recomputation, under an autocast of its own, casts them again: the counts differ and the
    backward fails ("_to_copy ... not found in storage"). The copies inside the region are
    recomputed in the backward either way, so turning the cache off there keeps nothing more."""

    @functools.wraps(forward)
    def run(*args, **kw):
        if not torch.is_autocast_enabled(device_type):
            return forward(*args, **kw)
        with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False):
            return forward(*args, **kw)

    return run


def set_attention(model: nn.Module, name: str) -> None:
    """Attention of every Hugging Face submodule: "sdpa" (default, any mask), "xformers"
    (memory_efficient_attention with the boolean mask as an additive bias) or "flash"
    (flash-attn 2: causal or unmasked attention only)."""
    if name not in ATTENTION:
        raise UserError(f"train.attention must be one of {', '.join(ATTENTION)}, got {name!r}")
    if name == "sdpa":
        return
    module = {"flash": "flash_attn", "xformers": "xformers.ops"}[name]
    try:
        __import__(module)
    except Exception as e:  # ImportError, or a wheel built for another torch
        raise UserError(f"train.attention={name} but {module} cannot be imported ({type(e).__name__}: {e}); "
                        "use train.attention=sdpa") from None
    if name == "flash":
        # Every family here attends bidirectionally inside the visual and generation blocks of a
        # prefix mask; flash-attn has no arbitrary masks, so it would train the wrong model.
        raise UserError("train.attention=flash: flash-attn supports only causal or full attention, and the "
                        "RecA sequence uses a block (prefix) mask; use sdpa or xformers")
    from transformers import AttentionInterface, PreTrainedModel

    AttentionInterface.register("reca_xformers", _xformers_attention)
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            m.set_attn_implementation("reca_xformers")


def _xformers_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF attention signature: q [B, H, L, Dh], k/v [B, Hkv, L, Dh], mask [B, 1, L, L] bool or
    additive -> ([B, L, H, Dh], None)."""
    import xformers.ops as xops

    h, hkv = query.shape[1], key.shape[1]
    if hkv != h:
        key, value = (t.repeat_interleave(h // hkv, dim=1) for t in (key, value))
    bias = None
    if attention_mask is not None:
        bias = attention_mask
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=query.dtype, device=query.device).masked_fill(~bias, float("-inf"))
        bias = bias.expand(query.shape[0], h, query.shape[2], key.shape[2]).to(query.dtype)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout if module.training else 0.0,
                                          scale=scaling)
    return out, None
