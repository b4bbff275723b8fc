"""The whole optimizer step in one CUDA graph: forward, backward, clipping, accumulation over
the micro-batches, the non-finite skip and fused AdamW, captured once and replayed.

    update = GraphStep(train_step)             # reca.engine.build builds it for train.cuda_graph
    metrics = update(c, batches)               # the step's device scalars, replayed in place

What makes the step capturable (the rest of the engine keeps to it):
- shapes never change: prompts are padded to P, images have the model's view sizes, the
  micro-batch count is `optim.grad_accum`;
- inputs are static buffers: each call copies the batches into them (device to device; the
  loader's pinned host memory or fixed CUDA decode buffers, copied asynchronously upstream).
  The buffers are a twin of the micro-batches' structure (any dataclasses, lists, tuples, dicts
  of tensors: a pytree), so every objective's batch type is captured the same way; tensors
  that are one object in the batch (shared views: `gen is und`) stay one buffer;
- gradients live across replays and are zeroed in place (`zero_grad(set_to_none=False)`);
- AdamW is fused and capturable with its lr a device tensor that the scheduler fills in place;
  its `found_inf` input (the 0/1 skip flag computed in the graph) skips a non-finite update;
- randomness comes from the run's CUDA generator, registered with the graph, so each replay
  draws fresh noise and the sequence equals the eager one;
- autocast runs without its cast cache (cached casts would outlive the capture);
- nothing reads a value back to the host: outputs are device tensors the loop reads at log time.

The first `warmup` calls run eagerly on a side stream (they are real training steps: compile
and lazy optimizer state happen there); the next call captures, then replays. Capture does not
execute the work, so every call performs exactly one optimizer step, as the eager path does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from reca.engine.errors import UserError


class GraphStep:
    def __init__(self, update: Callable, warmup: int = 3):
        if not torch.cuda.is_available():
            raise UserError("train.cuda_graph needs CUDA")
        self.update, self.warmup = update, warmup
        self.calls = 0
        self.static: list | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: dict[str, torch.Tensor] | None = None
        self.stream: torch.cuda.Stream | None = None

    def __call__(self, c, batches: list) -> dict[str, torch.Tensor]:
        if self.static is None:
            self.static = _twin(batches, {})
            self.stream = torch.cuda.Stream(c.device)
        _fill(self.static, batches)
        if self.calls < self.warmup:
            self.calls += 1
            return self._side_stream(lambda: self.update(c, self.static))
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            if c.generator.device.type == "cuda":
                if not hasattr(self.graph, "register_generator_state"):
                    raise UserError(f"train.cuda_graph with a custom generator needs torch >= 2.5 (have {torch.__version__})")
                self.graph.register_generator_state(c.generator)
            torch.cuda.synchronize(c.device)
            # thread_local: the data prefetch thread keeps decoding (its own stream) during capture
            with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
                self.out = self.update(c, self.static)
        self.graph.replay()
        return self.out

    def _side_stream(self, fn: Callable):
        """Warm-up work on a side stream, as capture needs (cuBLAS workspaces, allocator state)."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        return out


def _twin(x: Any, memo: dict[int, torch.Tensor]) -> Any:
    """A static twin of a batch pytree: same structure and non-tensor values, fresh device
    tensors (one per distinct tensor object: aliases stay aliases)."""
    if isinstance(x, torch.Tensor):
        if id(x) not in memo:
            memo[id(x)] = torch.empty_like(x)
        return memo[id(x)]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _twin(getattr(x, f.name), memo) for f in dataclasses.fields(x)
                                         if f.init})
    if isinstance(x, (list, tuple)):
        return type(x)(_twin(v, memo) for v in x)
    if isinstance(x, dict):
        return {k: _twin(v, memo) for k, v in x.items()}
    return x


def _leaves(x: Any, out: list, seen: set[int]) -> list:
    """Every leaf in a fixed order: distinct tensors once; type names, keys and other values as
    they are (what must match between the captured step and a later one)."""
    if isinstance(x, torch.Tensor):
        if id(x) not in seen:
            seen.add(id(x))
            out.append(x)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        out.append(type(x).__name__)
        for f in dataclasses.fields(x):
            _leaves(getattr(x, f.name), out, seen)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _leaves(v, out, seen)
    elif isinstance(x, dict):
        for k, v in x.items():
            out.append(k)
            _leaves(v, out, seen)
    else:
        out.append(x)  # objective names, step counts: must match what was captured
    return out


def _fill(dst: Any, src: Any) -> None:
    """Copy a step's micro-batches into the captured buffers (device to device, asynchronous)."""
    d, s = _leaves(dst, [], set()), _leaves(src, [], set())
    if len(d) != len(s):
        raise ValueError("a CUDA-graph step needs the same batch structure every step (objectives, shared views)")
    for a, b in zip(d, s):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape:
                raise ValueError(f"a CUDA-graph step needs fixed shapes: got {tuple(b.shape)} after {tuple(a.shape)}")
            a.copy_(b, non_blocking=True)
        elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a != b:
            raise ValueError(f"a CUDA-graph step needs a fixed objective order and batch structure: got {b!r} "
                             f"where {a!r} was captured")
