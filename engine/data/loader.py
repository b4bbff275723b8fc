"""Image data for RecA: sources of encoded images -> decoded RGB -> batches of two views.

    loader = build_loader(cfg.data, model.views, rank=rank, world_size=world_size)
    batch = next(loader)          # ImageBatch: und [B, 3, Hu, Wu], gen [B, 3, Hg, Wg], keys,
                                  #             positions [B], captions (str | None each)
    state = loader.state_dict()   # {"position", "skipped", "bad"}: save per rank, load to resume exactly

Sources (`sources`): an image folder, WebDataset tar shards, Parquet files or the demo;
`data.source = "a/:0.7,b.tar:0.3"` mixes several with weights (`order`).
Order (`order.Order`): stream position p reads a sample that is a pure function of
(seed, p); rank r of w takes positions r, r + w, ...; augmentation for position p is seeded
by (seed, p) alone. Nothing depends on what was read before, so resuming from a position
reproduces the uninterrupted run bit for bit, with or without worker processes. Broken
images are skipped (the next position takes their place) and remembered: a file found bad is
named once in a warning on the `reca.engine.data` logger, never read again (positions that
reach it later are skipped unread), and counted once in `loader.skipped` (distinct files).
Badness is a property of the file, so skipping a known-bad one unread leaves the position ->
sample mapping as it was; the known-bad (source, index) pairs are part of `state_dict()`, so a
resumed run remembers what the interrupted one found (a file that failed to read for a passing
reason stays skipped for the rest of the run, in both). Worker processes report a bad sample
with its position; the main process remembers it and its sampler hands known-bad positions to
no worker.

Stop signals: worker processes ignore SIGINT and SIGTERM. A Ctrl-C or a stop sent to the whole
process group (a container stop, a batch scheduler) reaches the main process alone, which owns
the stop (checkpoint, then `close()`); workers a run leaves open are ended at interpreter exit.

Decoding (`data.decoder`): Pillow in the workers, or a batch backend (`backends/`: DALI, or
nvJPEG via torchvision) that decodes a whole batch in the training process, on the GPU when
there is one. With a CUDA backend `und`/`gen` are FIXED device buffers: a ring of sets reused
in turn (same storages, same shapes). A batch stays valid until `hold` more batches have been
taken (`build_loader(..., hold=)`: the micro-batches one step holds at once); copy it (as
`graph.GraphStep` does) if it must live longer.

Prefetch (`data.prefetch`, CUDA backends): a background thread reads and decodes batch k+1 on
its own CUDA stream into the next free buffer set while the step runs on batch k. The step's
stream waits on an event recorded after the decode (no host wait), and a set is refilled only
after an event recorded on the step's stream when the set was released (`hold` batches later:
by then the step that read it has been enqueued). `state_dict()` and `skipped` describe the
batches taken, not those prefetched; an error in the thread is raised by `next(loader)`;
`close()` stops the thread. On CPU the same thread and ring run with the stream steps as no-ops
(`Loader(..., prefetch=True)`: what the tests drive). A CUDA graph captured while the thread
runs needs `capture_error_mode="thread_local"`: "global" forbids the thread's CUDA calls.
"""
from __future__ import annotations

import atexit
import logging
import signal
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image

from reca.engine.data.backends.dali import PLAIN_MODES, BatchBackend, make_backend
from reca.engine.data.decode import (
    BadImage, ImageDecoder, PillowDecoder, crop_box, make_views, needed_side, probe, views_for,
)
from reca.engine.data.order import Order, parse_source_spec
from reca.engine.data.prefetch import Prefetch, Streams
from reca.engine.data.sources import (
    DemoSource, FolderSource, ImageSource, ParquetSource, TarSource, caption_of, open_one,
)
from reca.engine.errors import UserError
if TYPE_CHECKING:  # duck-typed at run time: any object with ViewSpec's fields works
    from reca.models.adapter import ViewSpec

log = logging.getLogger(__name__)

CACHE_BYTES = 256 << 20  # decoded-image LRU per process: holds a demo or small folder entirely
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # the main process's to handle, never a worker's


def open_source(spec: str, cfg: Any = None) -> ImageSource:
    """One source: 'demo', an image folder, tar shard(s), Parquet file(s) (see `sources`)."""
    return open_one(spec, cfg)


def open_sources(spec: str, cfg: Any = None) -> list[tuple[str, ImageSource, float]]:
    """'a/:0.7,b.tar:0.3' -> [(name, source, weight)]; one entry for a plain spec."""
    return [(name, open_one(name, cfg), w) for name, w in parse_source_spec(spec)]


@dataclass
class ImageBatch:
    und: torch.Tensor  # [B, 3, Hu, Wu] float32, normalised by the model's und_mean/und_std
    gen: torch.Tensor  # [B, 3, Hg, Wg] float32 in [-1, 1]
    keys: list[str]  # source key of each sample ("S:key" in a mix of sources, S its index)
    positions: torch.Tensor  # [B] int64 stream positions the samples came from
    captions: list | None = None  # text (or conversation turns) that came with each image (RecA ignores it)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ImageBatch":
        und = self.und.to(device, non_blocking=non_blocking)
        gen = und if self.gen is self.und else self.gen.to(device, non_blocking=non_blocking)  # shared views stay one
        return ImageBatch(und, gen, self.keys, self.positions, self.captions)


class Sample(NamedTuple):
    """One stream position, as a worker hands it over (pickled)."""

    position: int
    item: tuple[int, int]  # (source, index): what bad-sample memos are keyed by
    key: str
    caption: Any  # str | None, or a conversation's turns (conversations.Turns)
    und: np.ndarray | None  # [3, Hu, Wu] (Pillow path) or None
    gen: np.ndarray | None  # [3, Hg, Wg] (Pillow path) or None
    raw: tuple[bytes, tuple[int, int, int, int], bool] | None  # for a batch backend
    reason: str  # non-empty: a bad sample


class _Samples(torch.utils.data.Dataset):
    """Map-style dataset over stream positions: what both the in-process path and the
    DataLoader workers run. Each process keeps its own decoded-image LRU and bad-item memo.

    `formats`: image formats a batch backend decodes; those samples come back as `raw`
    (bytes + the shared crop box + flip, from the header alone), the rest as Pillow views.
    """

    def __init__(self, sources: list[tuple[str, ImageSource, float]], decoder: ImageDecoder,
                 views: ViewSpec, cfg: Any, cache_bytes: int, formats: frozenset[str] = frozenset()):
        self.sources = [s for _, s, _ in sources]
        self.prefix = [f"{k}:" if len(sources) > 1 else "" for k in range(len(sources))]
        self.decoder, self.views, self.cfg = decoder, views, cfg
        self.formats = formats
        self.order = Order(self.sources, [w for _, _, w in sources], seed=cfg.seed,
                           window=getattr(cfg, "shuffle_window", 0))
        self.n = sum(len(s) for s in self.sources)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[int, int], Image.Image] = OrderedDict()
        self._cached = 0
        self._bad: dict[tuple[int, int], str] = {}

    def __getitem__(self, position: int) -> Sample:
        s, i = self.order.locate(position)
        src = self.sources[s]
        key = self.prefix[s] + src.key(i)
        rng = np.random.default_rng([self.cfg.seed, 1, position])
        try:
            caption = caption_of(src, i)
            if self.formats and (s, i) not in self._cache:
                raw = self._raw(s, i, rng)
                if raw is not None:
                    return Sample(position, (s, i), key, caption, None, None, raw, "")
                rng = np.random.default_rng([self.cfg.seed, 1, position])  # Pillow redraws
            img = self._image(s, i, key)
        except BadImage as e:
            return Sample(position, (s, i), key, None, None, None, None, " ".join(str(e).split()))
        und, gen = make_views(img, self.views, self.cfg, rng)
        return Sample(position, (s, i), key, caption, und, gen, None, "")

    def _read(self, s: int, i: int) -> bytes:
        if (s, i) in self._bad:
            raise BadImage(self._bad[(s, i)])
        try:
            return self.sources[s].read(i)
        except OSError as e:
            raise BadImage(f"cannot read: {e}") from None

    def _raw(self, s: int, i: int, rng: np.random.Generator) -> Any:
        """(bytes, box, flip) when the backend takes this image; None: Pillow decodes it."""
        data = self._read(s, i)
        try:
            fmt, mode, w, h = probe(data, max_pixels=self.cfg.max_pixels, min_side=self.cfg.min_side)
        except BadImage as e:
            self._bad[(s, i)] = str(e)
            raise
        if fmt not in self.formats or mode not in PLAIN_MODES or "pad" in (self.views.gen_resize, self.views.und_resize):
            return None  # padding to a square is done by the Pillow path alone
        box, flip = crop_box(w, h, self.views, self.cfg, rng)
        return data, box, flip

    def _image(self, s: int, i: int, key: str) -> Image.Image:
        if (s, i) in self._cache:
            self._cache.move_to_end((s, i))
            return self._cache[(s, i)]
        data = self._read(s, i)
        try:
            img = self.decoder.decode(data, key)
        except BadImage as e:
            self._bad[(s, i)] = str(e)  # decoding is deterministic: never try this one again
            raise
        self._remember((s, i), img)
        return img

    def _remember(self, item: tuple[int, int], img: Image.Image) -> None:
        size = img.width * img.height * 3
        if size > self.cache_bytes:
            return
        self._cache[item] = img
        self._cached += size
        while self._cached > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.width * old.height * 3


class _Positions(torch.utils.data.Sampler):
    """start, start + step, ... forever: this rank's stream positions from a resume point,
    less those that read a known-bad sample (`bad`, the loader's set, read as it grows)."""

    def __init__(self, start: int, step: int, bad: set[tuple[int, int]], order: Order):
        self.start, self.step, self.bad, self.order = start, step, bad, order

    def __iter__(self) -> Iterator[int]:
        p = self.start
        while True:
            if not (self.bad and self.order.locate(p) in self.bad):
                yield p
            p += self.step


def _keep(sample: Sample) -> Sample:  # DataLoader's collate_fn: module-level so it pickles
    return sample


def _worker_init(worker_id: int) -> None:
    """DataLoader worker_init_fn: the stop signals are ignored here (they were blocked across
    the start, so one sent meanwhile is dropped now, not fatal)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


_OPEN: "weakref.WeakSet[Loader]" = weakref.WeakSet()  # loaders whose workers may be running
_AT_EXIT: list[bool] = []  # the exit hook is registered once, when the first workers start


def _close_open_loaders() -> None:
    """At interpreter exit, before multiprocessing's own hook: that one ends daemon children
    with SIGTERM, which the workers ignore, then joins them, and would wait forever."""
    for loader in list(_OPEN):
        loader.close()


class Loader:
    """Endless iterator of full `ImageBatch`es for one rank (see the module docstring).

    `source`: one `ImageSource`, or [(name, source, weight)] to mix (see `open_sources`).
    `backend`: a batch decoder (`data_dali.make_backend`) or None for Pillow.
    `hold`: batches the consumer uses at once (a CUDA backend's buffer sets are reused after
    `hold` more batches); `prefetch`: decode ahead in a thread (see the module docstring).
    Attributes the train loop reads: `skipped` (distinct bad files met by the batches taken),
    `wait_seconds` (cumulative time spent inside `__next__`, i.e. the loop waiting for data).
    """

    def __init__(self, source: ImageSource | list[tuple[str, ImageSource, float]], views: ViewSpec,
                 cfg: Any, *, rank: int = 0, world_size: int = 1, decoder: ImageDecoder | None = None,
                 cache_bytes: int = CACHE_BYTES, backend: BatchBackend | None = None, hold: int = 1,
                 prefetch: bool = False):
        if hold < 1:
            raise ValueError(f"hold must be >= 1, got {hold}")
        if decoder is None:
            decoder = PillowDecoder(min_side=cfg.min_side, max_pixels=cfg.max_pixels,
                                    target_side=needed_side(views, cfg.crop_scale))
        sources = source if isinstance(source, list) else [(cfg.source, source, 1.0)]
        self.cfg, self.views, self.backend = cfg, views, backend
        self.rank, self.world_size = rank, world_size
        formats = backend.formats if backend is not None else frozenset()
        self.samples = _Samples(sources, decoder, views, cfg, cache_bytes, formats)
        self.wait_seconds = 0.0
        self.hold, self.prefetch = hold, prefetch
        self._next = rank  # next stream position of this rank not yet in a produced batch
        self._bad: set[tuple[int, int]] = set()  # known-bad (source, index): never read again
        self._bad_order: list[tuple[int, int]] = []  # the same, in the order found (append-only
        # while the producer runs: the first n are what the batches taken found, n in _taken)
        self._warned: set[tuple[int, int]] = set()  # named in a warning by this process
        self._taken = (rank, 0)  # (_next, len(_bad_order)) after the last batch handed out
        self._dataloader: torch.utils.data.DataLoader | None = None
        self._workers: Iterator[Sample] | None = None
        self._ring: list[tuple[torch.Tensor, torch.Tensor]] = []  # fixed buffer sets
        self._turn = 0  # next ring set of the in-line (not prefetched) path
        self._streams: Streams | None = None
        self._ahead: Prefetch | None = None
        self._held: deque[int] = deque()  # ring sets of the batches taken and still valid, oldest first

    def __iter__(self) -> "Loader":
        return self

    @property
    def skipped(self) -> int:
        return self._taken[1]

    def __next__(self) -> ImageBatch:
        t0 = time.perf_counter()
        try:
            if self.prefetch:
                return self._take()
            batch = self._batch(self._inline_buffers())
            self._taken = (self._next, len(self._bad_order))
            return batch
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def _inline_buffers(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Without prefetch, a CUDA backend cycles through `hold` fixed sets: each is refilled
        on the step's own stream, so after the work enqueued on it earlier (stream order)."""
        if self.backend is None or self.backend.device.type != "cuda":
            return None  # fresh tensors each batch, as the CPU paths always had
        j, self._turn = self._turn, (self._turn + 1) % self.hold
        return self._buffers(j)

    def _buffers(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ring set j, allocated on first use (on the calling thread's current stream)."""
        while len(self._ring) <= j:
            b, v = self.cfg.batch_size, self.views
            dev = self.backend.device if self.backend is not None else torch.device("cpu")
            self._ring.append((torch.empty(b, 3, v.und_size, v.und_size, device=dev),
                               torch.empty(b, 3, v.gen_size, v.gen_size, device=dev)))
        return self._ring[j]

    # ---- prefetch: a producer thread, a ring of hold + 1 buffer sets, events between streams

    def _take(self) -> ImageBatch:
        """The next prefetched batch: its buffers are ready for the step's stream, and the set
        `hold` batches older goes back to the producer, free after the work enqueued so far."""
        if self._ahead is None:
            self._start_prefetch()
        ahead, streams = self._ahead, self._streams
        assert ahead is not None and streams is not None
        item = ahead.ready.get()
        if isinstance(item, BaseException):  # the producer's error, raised here with its message
            self._stop_prefetch()
            raise item
        batch, j, state, done = item
        streams.wait(done)
        self._held.append(j)
        if len(self._held) > self.hold:
            ahead.free.put((self._held.popleft(), streams.mark()))
        self._taken = state
        return batch

    def _start_prefetch(self) -> None:
        if self._streams is None:
            dev = self.backend.device if self.backend is not None else torch.device("cpu")
            self._streams = Streams(dev)
        streams = self._streams
        ring = [self._buffers(j) for j in range(self.hold + 1)]
        for und, gen in ring:
            streams.used_by_producer(und, gen)
        after = streams.mark()  # whatever the consumer enqueued on any set so far comes first
        ahead = Prefetch()
        for j in range(len(ring)):
            if j not in self._held:  # batches taken before a stop stay valid, as they would have
                ahead.free.put((j, after))
        ahead.thread = threading.Thread(target=self._produce, args=(ahead, streams),
                                        name=f"reca-data-prefetch-{self.rank}", daemon=True)
        self._ahead = ahead
        ahead.thread.start()

    def _produce(self, ahead: "Prefetch", streams: "Streams") -> None:
        """Producer thread: fill free sets in order until told to stop; an error ends the thread
        and is handed over in its place. Owns the reading state (`_next`, the known-bad samples,
        workers) while it runs: the consumer touches them only after `_stop_prefetch`, but for
        the prefix of `_bad_order` that `state_dict` copies (the list only grows meanwhile)."""
        try:
            with streams.producing():
                while True:
                    j, free_after = ahead.free.get()
                    if j is None or ahead.stop.is_set():
                        return
                    streams.wait(free_after)  # the step that read this set is done with it
                    batch = self._batch(self._ring[j])
                    ahead.ready.put((batch, j, (self._next, len(self._bad_order)), streams.mark()))
        except BaseException as e:  # noqa: BLE001: every error must reach the consumer
            ahead.ready.put(e)

    def _stop_prefetch(self) -> None:
        """Join the producer and rewind the reading state to the batches taken: what it
        prefetched is dropped and is read again if iteration continues."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        ahead.stop.set()
        ahead.free.put((None, None))
        ahead.thread.join()  # type: ignore[union-attr]
        self._next, found = self._taken
        self._know(self._bad_order[:found])  # the dropped batches find theirs again, in order
        self._close_workers()  # their in-flight samples are those dropped

    def _know(self, bad: list[tuple[int, int]]) -> None:
        """The known-bad samples become exactly `bad` (same objects: the sampler reads the set)."""
        self._bad_order[:] = bad
        self._bad.clear()
        self._bad.update(bad)

    def _good(self) -> Sample:
        """The next usable sample of this rank's stream: known-bad positions are passed over
        unread (here, or by the workers' sampler), newly found bad ones remembered."""
        while True:
            if self.cfg.num_workers <= 0 and self._bad and self.samples.order.locate(self._next) in self._bad:
                self._next += self.world_size
                continue
            sample = self._sample()
            self._next = sample.position + self.world_size
            if sample.item in self._bad:  # found bad while this one was in flight (workers)
                continue
            if sample.reason:
                self._skip(sample.item, sample.key, sample.reason)
            else:
                return sample

    def _batch(self, bufs: tuple[torch.Tensor, torch.Tensor] | None = None) -> ImageBatch:
        """The next full batch, into the buffer set `bufs` if given, else fresh tensors."""
        b = self.cfg.batch_size
        shared = self.views.same_pixels(self.cfg.und_downscale)  # one tensor serves as both views
        if self.backend is None:
            got = [self._good() for _ in range(b)]
            gen = torch.from_numpy(np.stack([s.gen for s in got]))
            und = gen if shared else torch.from_numpy(np.stack([s.und for s in got]))
            if bufs is not None:
                gen = bufs[1].copy_(gen)
                und = gen if shared else bufs[0].copy_(und)
        else:
            got, und, gen = self._backend_batch(b, bufs)
            if shared:
                und = gen
        return ImageBatch(und, gen, [s.key for s in got],
                          torch.tensor([s.position for s in got], dtype=torch.int64),
                          [s.caption for s in got])

    def _backend_batch(self, b: int, bufs: tuple[torch.Tensor, torch.Tensor] | None
                       ) -> tuple[list[Sample], torch.Tensor, torch.Tensor]:
        """Fill [B] slots (of `bufs`, else fresh): backend-decoded samples in one call, Pillow
        ones copied in; a sample the backend rejects is dropped and the rows after it move up,
        then more are fetched. All device work goes to the calling thread's current stream."""
        dev, v = self.backend.device, self.views  # type: ignore[union-attr]
        if bufs is not None:
            und, gen = bufs
        else:
            und = torch.empty(b, 3, v.und_size, v.und_size, device=dev)
            gen = torch.empty(b, 3, v.gen_size, v.gen_size, device=dev)
        got: list[Sample] = []
        while len(got) < b:
            new = [self._good() for _ in range(b - len(got))]
            fast = [j for j, s in enumerate(new) if s.raw is not None]
            ok = [True] * len(new)
            base = len(got)
            for j, s in enumerate(new):
                if s.raw is None:
                    und[base + j].copy_(torch.from_numpy(s.und), non_blocking=True)
                    gen[base + j].copy_(torch.from_numpy(s.gen), non_blocking=True)
            if fast:
                u, g, reasons = self.backend.decode_views([new[j].raw for j in fast])  # type: ignore
                done = [j for j, r in zip(fast, reasons) if not r]
                rows = _index([base + j for j in done], dev)
                und.index_copy_(0, rows, u)
                gen.index_copy_(0, rows, g)
                for j, r in zip(fast, reasons):
                    if r:
                        ok[j] = False
                        self._skip(new[j].item, new[j].key, r)
            if not all(ok):  # rare: compact the rows that decoded
                keep = _index([base + j for j in range(len(new)) if ok[j]], dev)
                und[base: base + len(keep)] = und.index_select(0, keep)
                gen[base: base + len(keep)] = gen.index_select(0, keep)
            got += [s for s, good in zip(new, ok) if good]
        return got, und, gen

    def _sample(self) -> Sample:
        if self.cfg.num_workers <= 0:
            return self.samples[self._next]
        if self._workers is None:
            self._workers = self._start_workers()
        return next(self._workers)

    def _start_workers(self) -> Iterator[Sample]:
        w = self.cfg.num_workers
        self._dataloader = torch.utils.data.DataLoader(
            self.samples, batch_size=None, num_workers=w, collate_fn=_keep, persistent_workers=True,
            sampler=_Positions(self._next, self.world_size, self._bad, self.samples.order),
            worker_init_fn=_worker_init,
            prefetch_factor=max(2, -(-2 * self.cfg.batch_size // w)))  # ~2 batches in flight
        if not _AT_EXIT:  # registered after multiprocessing's hook, so it runs before it
            atexit.register(_close_open_loaders)
            _AT_EXIT.append(True)
        _OPEN.add(self)
        # A stop signal that arrives while a worker starts, before its _worker_init, would end
        # it: this thread blocks them across the start, and the workers inherit the mask.
        masking = hasattr(signal, "pthread_sigmask")  # POSIX
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if masking else None
        try:
            return iter(self._dataloader)
        finally:
            if masking:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _skip(self, item: tuple[int, int], key: str, reason: str) -> None:
        """Remember a newly found bad sample (warned once per process, counted once)."""
        if item in self._bad:
            return
        self._bad.add(item)
        self._bad_order.append(item)
        if item not in self._warned:
            self._warned.add(item)
            log.warning("skipping image %s: %s", key, reason)
        if len(self._bad) >= self.samples.n:
            self._close_workers()  # not close(): this may be the producer thread itself
            raise UserError(f"no decodable images in {self.cfg.source}")

    def state_dict(self) -> dict[str, Any]:
        """Where the batches taken so far end (prefetched ones are not counted): the next
        position, and the bad samples they found ([source, index] pairs; `skipped` = their count)."""
        position, found = self._taken
        return {"position": position, "skipped": found, "bad": [list(item) for item in self._bad_order[:found]]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; a position of another rank moves up to this rank's next.
        A state without "bad" (saved before bad samples were remembered) starts with none known:
        they are found again as they are read, and counted from zero."""
        self._stop_prefetch()
        p = int(state["position"])
        self._next = p + (self.rank - p) % self.world_size
        bad = list(dict.fromkeys((int(s), int(i)) for s, i in state.get("bad", ())))
        if len(bad) >= self.samples.n:
            raise UserError(f"no decodable images in {self.cfg.source} (the saved data state marks all bad)")
        self._know(bad)
        self._warned.update(bad)  # named by the run that found them
        self._taken = (self._next, len(bad))
        self._close_workers()  # in-flight worker results belong to the old position

    def close(self) -> None:
        """Stop the prefetch thread and the worker processes; iteration may go on afterwards
        (they start again) from the batches taken."""
        self._stop_prefetch()
        self._close_workers()

    def _close_workers(self) -> None:
        workers, self._workers, self._dataloader = self._workers, None, None
        _OPEN.discard(self)
        shutdown = getattr(workers, "_shutdown_workers", None)
        if shutdown is None:
            return
        shutdown()  # asks each to stop, and falls back on SIGTERM, which they ignore:
        if getattr(workers, "_shutdown", False):  # a worker stuck past its grace is killed
            for w in getattr(workers, "_workers", ()):
                if w.is_alive():
                    w.kill()
                    w.join()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    """Row numbers on `device` without a blocking copy (that would wait for the whole stream)."""
    t = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def decode_device(cfg: Any) -> torch.device:
    """`data.decode_device`: "auto" is this process's current CUDA device if any, else CPU."""
    spec = getattr(cfg, "decode_device", "auto")
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise UserError(f"data.decode_device must be auto, cpu or cuda[:N], got {spec!r}") from None


def build_loader(cfg: Any, views: ViewSpec, *, rank: int = 0, world_size: int = 1, hold: int = 1) -> Loader:
    """The loader for a `DataConfig` and a model's `ViewSpec`; workers (and the prefetch thread
    of a CUDA decoder) start on the first batch. `hold`: batches a step uses at once
    (`optim.grad_accum`): a CUDA decoder's buffers are reused only after that many more."""
    if cfg.batch_size < 1:
        raise UserError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.num_workers < 0:
        raise UserError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
    if cfg.seed < 0:
        raise UserError(f"data.seed must be >= 0, got {cfg.seed}")
    if not cfg.crop_scale > 0:
        raise UserError(f"data.crop_scale must be in (0, 1], got {cfg.crop_scale}")
    if not 0 < cfg.und_downscale <= 1:
        raise UserError(f"data.und_downscale must be in (0, 1], got {cfg.und_downscale}")
    if views.gen_resize not in ("crop", "stretch", "pad"):
        raise UserError(f"gen_resize must be 'crop', 'stretch' or 'pad', got {views.gen_resize!r}")
    views = views_for(views, cfg)  # data.und_resize
    if views.und_resize not in ("same", "pad"):
        raise UserError(f"und_resize must be 'same' or 'pad', got {views.und_resize!r}")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world_size {world_size}")
    backend = make_backend(cfg, views, cfg.batch_size, decode_device(cfg))
    prefetch = bool(getattr(cfg, "prefetch", True)) and backend is not None and backend.device.type == "cuda"
    return Loader(open_sources(cfg.source, cfg), views, cfg, rank=rank, world_size=world_size,
                  backend=backend, hold=hold, prefetch=prefetch)
