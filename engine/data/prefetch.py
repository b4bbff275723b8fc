"""The decode-ahead hand-off of CUDA batch decoders (`data.prefetch`): a producer thread decodes
batch k+1 on its own CUDA stream into a free set of a ring of fixed buffers while the step runs
on batch k (the loader drives it; see `reca.engine.data.loader`). On CPU the same thread and
ring run with the stream steps as no-ops, which is what the tests drive."""
from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any

import torch


class Prefetch:
    """One run of the producer thread: ring sets flow free -> filled (ready) -> taken (the
    loader's `_held`) -> free."""

    def __init__(self) -> None:
        self.free: queue.SimpleQueue = queue.SimpleQueue()  # (set, event it may be refilled after)
        self.ready: queue.SimpleQueue = queue.SimpleQueue()  # (batch, set, state, event) | error
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None


class Streams:
    """The CUDA half of the hand-off. The producer thread runs on its own stream; events order
    it against the consumer's current stream without blocking the host. On CPU every step is a
    no-op: the work is done when the producer hands it over."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:  # "cuda" means this thread's device, not the producer's
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def producing(self) -> contextlib.AbstractContextManager:
        """In the producer thread: its device and stream become current (both are per thread)."""
        if not self.cuda:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def mark(self) -> Any:
        """An event after all work enqueued so far on this thread's current stream."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait(self, event: Any) -> None:
        """Later work on this thread's current stream waits for `event` (the host does not)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def used_by_producer(self, *tensors: torch.Tensor) -> None:
        """The ring is allocated on the consumer's stream and written on the producer's: the
        allocator must not hand its memory out again before the producer's writes are done."""
        if self.cuda:
            for t in tensors:
                t.record_stream(self.stream)
