"""What `reca bench memory` runs the real step under: fake tensors that stand for CUDA ones, and
a tracker of every tensor's bytes by category.

The step runs on fake CPU tensors (`FakeTensorMode`: shapes and dtypes, no storage). Fake CUDA
tensors would need a CUDA build (streams, generators, device guards: SDPA on them aborts), so
`cuda_like()` makes the CPU step do what the CUDA one does wherever memory differs:

    attention    F.scaled_dot_product_attention and BAGEL's compiled flex attention run as
                 `Attention`: the inputs cast to the autocast dtype (CUDA autocast lists SDPA),
                 a boolean mask turned into a bias of that dtype and padded to 8 columns
                 (what SDPA and mem-efficient attention do before the kernel), grouped K/V
                 heads never expanded, and saved for the backward exactly what flash or
                 mem-efficient attention saves: q, k, v, the bias, the output and the fp32
                 log-sum-exp [B, H, L]. The values come from torch's CPU flash kernel (real
                 tensors in `--validate`); dropout inside attention is not drawn (the CUDA
                 kernels keep only a seed for it). BAGEL's block mask is a few block tables
                 on a GPU (`create_block_mask` compiled); it stands in as those tables.
    dropout      CUDA's fused `native_dropout` (the output and a bool mask), not the CPU's
                 in-place `bernoulli_`, so selective checkpointing keeps what it keeps on CUDA.
    autocast     CPU autocast casts to bf16 what CUDA autocast does (matmuls, convolutions);
                 the ops CUDA autocast runs in fp32 (layer/group norm, softmax, exp, log, pow,
                 rsqrt, sum, mse_loss) are cast to fp32 here too.

`StepTracker` (one process) and `FSDPStepTracker` (FSDP2, one rank of a fake process group)
are torch's `MemTracker` / `FSDPMemTracker` with an O(1) peak (torch's walks every module on
every op), gradient hooks on trainable parameters only, a second peak of the device alone (the
categories `host` names live in host memory: FSDP2's CPU offload, the EMA on the host) and
where in the step that peak happened.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

# Report categories from the trackers' reference types. The EMA's shadows are registered under
# a type nothing else uses (one process: "Other"; FSDP: "Inputs": the batch is created inside the
# tracker, so it counts as activations).
CATEGORIES = ("parameters", "gathered", "gradients", "optimizer", "ema", "activations", "temporaries")
_ONE_PROCESS = {_MemRefType.PARAM: "parameters", _MemRefType.BUFFER: "parameters", _MemRefType.GRAD: "gradients",
                _MemRefType.OPT: "optimizer", _MemRefType.OTH: "ema", _MemRefType.ACT: "activations",
                _MemRefType.TEMP: "temporaries"}
_FSDP = {_FSDPRefType.SHARDED_PARAM: "parameters", _FSDPRefType.BUFFER: "parameters",
         _FSDPRefType.UNSHARDED_PARAM: "gathered", _FSDPRefType.ALL_GATHER: "gathered",
         _FSDPRefType.SHARDED_GRAD: "gradients", _FSDPRefType.UNSHARDED_GRAD: "gradients",
         _FSDPRefType.REDUCE_SCATTER: "gradients", _FSDPRefType.OPT: "optimizer", _FSDPRefType.INP: "ema",
         _FSDPRefType.ACT: "activations", _FSDPRefType.TEMP: "temporaries"}


class _Peaks:
    """The parts both trackers share. `host`: report categories held in host memory during the
    step (not counted in the device's peak). `phase`: what the step is doing (set from outside)."""

    names: dict
    host: frozenset = frozenset()

    def _init_peaks(self, host: frozenset) -> None:
        self.host = frozenset(host)
        self.enter_phase("start")
        self.reset_peaks()

    def enter_phase(self, phase: str) -> None:
        """Name what the step does next ("micro-batch 2 of 4", "the EMA update")."""
        self.phase, self._backward_seen = phase, False

    def reset_peaks(self) -> None:
        self.device_peak, self.host_peak, self.total_peak = 0, 0, 0
        self.device_snap: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.where = ""

    def categories(self) -> dict[str, int]:
        """Bytes per report category now."""
        out = dict.fromkeys(CATEGORIES, 0)
        for snap in self._curr_mem_snap.values():
            for ref, n in snap.items():
                if ref != _TOTAL_KEY:
                    out[self.names[ref]] += n
        return out

    def _update_peak_stats(self, peak_state) -> None:  # noqa: ARG002: torch's per-module peaks are not kept
        self._backward_seen |= self._mod_tracker.is_bw
        now = self.categories()
        host = sum(now[k] for k in self.host)
        device = sum(now.values()) - host
        self.total_peak = max(self.total_peak, device + host)
        self.host_peak = max(self.host_peak, host)
        if device > self.device_peak:  # the categories on the device: the host's read 0
            self.device_snap = {k: 0 if k in self.host else v for k, v in now.items()}
            self.device_peak, self.where = device, self._where()

    def _where(self) -> str:
        if self._in_opt:
            return "the optimizer step"
        inside = [p for p in self._mod_tracker.parents if p != "Global"]
        bw = self._mod_tracker.is_bw
        if not inside and not bw and self.phase.startswith("micro-batch"):
            return f"{self.phase}, after its {'backward' if self._backward_seen else 'forward (the loss)'}"
        module = max(inside, key=lambda p: (p.count("."), p), default="")
        module = module.split(".", 1)[1] if "." in module else ""  # the root's class name dropped
        part = "backward (recomputing a checkpointed block)" if self._in_ac else "backward" if bw else "forward"
        return f"{self.phase}, {part}" + (f", in {module}" if module else "")


class StepTracker(_Peaks, MemTracker):
    """`MemTracker` for the one-process step (see the module)."""

    names = _ONE_PROCESS

    def __init__(self, host: frozenset = frozenset()):
        super().__init__()
        self._init_peaks(host)

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        # torch's registers a gradient hook on every parameter, which a frozen one refuses
        out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for p in module.parameters():
                if p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (p.register_hook(self._grad),
                                                           p.register_post_accumulate_grad_hook(
                                                               lambda q: self._grad(q.grad)))
        return out

    def _grad(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def track_ema(self, shadows: list[torch.Tensor]) -> None:
        self.track_external(*shadows)  # "Other": reported as the EMA


class FSDPStepTracker(_Peaks, FSDPMemTracker):
    """`FSDPMemTracker` for one rank of the FSDP2 step (see the module)."""

    names = _FSDP

    def __init__(self, model, optimizer, host: frozenset = frozenset()):
        super().__init__(model, optimizer)
        self._init_peaks(host)

    def track_ema(self, shadows: list[torch.Tensor]) -> None:
        self.track_inputs(tuple(shadows))  # "Inputs": reported as the EMA

    def _fsdp_param_group_post_backward(self, fsdp_mod, orig):
        tracked = super()._fsdp_param_group_post_backward(fsdp_mod, orig)

        @functools.wraps(orig)
        def inner(*args, **kwargs):
            # torch's wrapper reads every parameter's unsharded gradient and the block's stats;
            # a block whose forward never ran (since the micro-batch began: a frozen VAE decoder)
            # has neither, and nothing to attribute
            group = fsdp_mod._get_fsdp_state()._fsdp_param_group
            if fsdp_mod not in self.memory_tracking or (
                    group is not None and not all(hasattr(p, "_unsharded_param") for p in group.fsdp_params)):
                return orig(*args, **kwargs)
            return tracked(*args, **kwargs)

        return inner


# --- CUDA stand-ins ---------------------------------------------------------------------------

class Attention(torch.autograd.Function):
    """Attention saving what flash / mem-efficient attention save (see the module).
    q [B, H, L, D], k/v [B, Hkv, S, D] (Hkv divides H), bias broadcastable to [B, H, L, S] or
    None -> [B, H, L, D]."""

    @staticmethod
    def forward(ctx, q, k, v, bias, causal: bool, scale: float | None):
        kx, vx = _expand(k, q), _expand(v, q)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, kx.to(q.dtype), vx.to(q.dtype), 0.0, causal, attn_mask=bias, scale=scale)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, bias, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.contiguous(), q, _expand(k, q).to(q.dtype), _expand(v, q).to(q.dtype), out, lse, 0.0, ctx.causal,
            attn_mask=bias, scale=ctx.scale)
        return dq, _group(dk, k).to(k.dtype), _group(dv, v).to(v.dtype), None, None, None


def _expand(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return t if t.shape[1] == q.shape[1] else t.repeat_interleave(q.shape[1] // t.shape[1], dim=1)


def _group(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b, h, s, d = grad.shape
    hk = like.shape[1]
    return grad if hk == h else grad.view(b, hk, h // hk, s, d).sum(2)


def attention(q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None,
              enable_gqa: bool = False):
    """F.scaled_dot_product_attention's signature, run as on CUDA (see the module)."""
    del dropout_p, enable_gqa  # the CUDA kernels keep a seed for dropout; grouped heads are read in place
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        q, k, v = (t.to(dtype) if t.is_floating_point() else t for t in (q, k, v))
    bias = None
    if attn_mask is not None:
        bias = (torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, -math.inf)
                if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype))
        cols = bias.shape[-1]
        if cols % 8:  # mem-efficient attention's alignment: padded, then sliced back
            bias = F.pad(bias, (0, 8 - cols % 8))[..., :cols]
    if q.dtype != k.dtype or q.dtype != v.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    return Attention.apply(q, k, v, bias, is_causal, scale)


def flex_attention(q, k, v, block_mask=None, enable_gqa: bool = False, **kwargs):
    """BAGEL's compiled flex attention: the same memory as `attention` with no dense mask (its
    block tables are `block_mask_tables`)."""
    del block_mask, enable_gqa, kwargs
    return attention(q, k, v)


def block_mask_tables(pack, kind: str, block_size: int = 128, seen: list | None = None, **kwargs):
    """A compiled `create_block_mask`'s tensors for a pack of S tokens: four int32 tables of
    [1, 1, S/128] and [1, 1, S/128, S/128] (full and partial blocks, by rows and by columns).
    `seen` receives S."""
    del kind, kwargs
    if seen is not None:
        seen.append(pack.doc.numel())
    n = -(-pack.doc.numel() // block_size)
    return [torch.zeros(1, 1, n, n, dtype=torch.int32) for _ in range(4)] + \
        [torch.zeros(1, 1, n, dtype=torch.int32) for _ in range(4)]


def dropout(input, p: float = 0.5, training: bool = True, inplace: bool = False):
    if not training or p == 0.0:
        return input
    out = torch.native_dropout(input, p, True)[0]
    return input.copy_(out) if inplace else out


# CUDA autocast's fp32 list (aten/src/ATen/autocast_mode.cpp) as far as these models call it
_FP32 = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.mse_loss, torch.softmax, torch.log_softmax,
         torch.exp, torch.log, torch.pow, torch.rsqrt, torch.sum, torch.Tensor.softmax, torch.Tensor.log_softmax,
         torch.Tensor.exp, torch.Tensor.log, torch.Tensor.pow, torch.Tensor.__pow__, torch.Tensor.rsqrt,
         torch.Tensor.sum}
_LOW = (torch.bfloat16, torch.float16)


class _CudaLike(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return attention(*args, **kwargs)
        if func is F.dropout:
            return dropout(*args, **kwargs)
        if func in _FP32 and torch.is_autocast_enabled("cpu"):
            args, kwargs = _to_fp32(args), _to_fp32(kwargs)
        return func(*args, **kwargs)


def _to_fp32(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype in _LOW:
        return x.float()
    if isinstance(x, (list, tuple)):
        return type(x)(_to_fp32(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_fp32(v) for k, v in x.items()}
    return x


@contextlib.contextmanager
def untracked_propagation():
    """DTensor's sharding propagation runs each op once more on global-shape fake tensors to learn
    the output's shape, in the active fake mode when there is one: ours, so the tracker would
    count those tensors (a foreach op over a model's parameters: the whole model). Inside, it
    makes a fake mode of its own, as it does outside one, which the tracker leaves out."""
    from torch.distributed.tensor import _sharding_prop

    saved = getattr(_sharding_prop, "detect_fake_mode", None)
    if saved is None:  # another torch: its propagation is left as it is
        yield
        return
    _sharding_prop.detect_fake_mode = lambda *args: None
    try:
        yield
    finally:
        _sharding_prop.detect_fake_mode = saved


def in_recompute(forward):
    """`forward` (a block's, before `apply_checkpointing` wraps it) run inside the stand-ins: a
    checkpointed block's recomputation in the backward does not see the function mode the
    forward was called under."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if any(isinstance(m, _CudaLike) for m in _get_current_function_mode_stack()):
            return forward(*args, **kwargs)
        with _CudaLike():
            return forward(*args, **kwargs)

    return run


@contextlib.contextmanager
def cuda_like():
    """Inside: the CPU step does what the CUDA step does wherever memory differs (see the
    module). BAGEL's flex attention and its block mask are swapped for the stand-ins, and put
    back on the way out. Yields the list that receives each BAGEL pack's length in tokens.
    Blocks that are checkpointed need `in_recompute` as well."""
    from reca.models.bagel import model as bagel_model
    from reca.models.bagel import mot

    saved, packs = (mot._flex, bagel_model.attention_mask), []
    mot._flex = flex_attention
    bagel_model.attention_mask = lambda pack, kind, **kw: (block_mask_tables(pack, kind, seen=packs)
                                                           if kind == "flex" else saved[1](pack, kind, **kw))
    try:
        with _CudaLike():
            yield packs
    finally:
        mot._flex, bagel_model.attention_mask = saved
