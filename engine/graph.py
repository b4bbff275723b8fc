"""The whole optimizer step in one CUDA graph: forward, backward, clipping, accumulation over
the micro-batches, the non-finite skip and fused AdamW, captured once and replayed.

    update = GraphStep(optimizer_update)       # reca.engine.train builds it for train.cuda_graph
    loss, grad_norm, skipped = update(c, batches)

What makes the step capturable (the rest of the engine keeps to it):
- shapes never change: prompts are padded to P, images have the model's view sizes, the
  micro-batch count is `optim.grad_accum`;
- inputs are static buffers: each call copies the batches into them (device to device; the
  loader's pinned host memory or fixed CUDA decode buffers, copied asynchronously upstream);
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

import copy
from typing import Callable

import torch

from reca.engine.errors import UserError
from reca.models.adapter import PromptBatch


class GraphStep:
    def __init__(self, update: Callable, warmup: int = 3):
        if not torch.cuda.is_available():
            raise UserError("train.cuda_graph needs CUDA")
        self.update, self.warmup = update, warmup
        self.calls = 0
        self.static: list | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: tuple | None = None
        self.stream: torch.cuda.Stream | None = None

    def __call__(self, c, batches: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.static is None:
            self.static = [_like(b) for b in batches]
            self.stream = torch.cuda.Stream(c.device)
        for dst, src in zip(self.static, batches):
            _fill(dst, src)
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


def _like(batch):
    """A static twin of a micro-batch: same structure, fresh device tensors."""
    twin = copy.copy(batch)
    twin.und = _empty(batch.und)
    twin.gen = twin.und if batch.gen is batch.und else _empty(batch.gen)  # shared views stay one buffer
    twin.prompt = PromptBatch(torch.empty_like(batch.prompt.input_ids), torch.empty_like(batch.prompt.mask))
    twin.answer_ids, twin.answer_mask = _empty(batch.answer_ids), _empty(batch.answer_mask)
    return twin


def _empty(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else torch.empty_like(t)


def _fill(dst, src) -> None:
    if dst.kind != src.kind:
        raise ValueError(f"a CUDA-graph step needs a fixed objective order: got {src.kind} where {dst.kind} was captured")
    for d, s in zip(dst.tensors(), src.tensors()):
        if d.shape != s.shape:
            raise ValueError(f"a CUDA-graph step needs fixed shapes: got {tuple(s.shape)} after {tuple(d.shape)}")
        d.copy_(s, non_blocking=True)
