"""Image data for RecA: a source of encoded images -> decoded RGB -> batches of two views.

    loader = build_loader(cfg.data, model.views, rank=rank, world_size=world_size)
    batch = next(loader)          # ImageBatch: und [B, 3, Hu, Wu], gen [B, 3, Hg, Wg], keys, positions
    state = loader.state_dict()   # {"position", "skipped"}: save per rank, load to resume exactly

Order: stream position p = 0, 1, 2, ... reads sample `perm_e[p % n]`, where `perm_e` is a
permutation seeded by (seed, epoch e = p // n); rank r of w takes positions r, r + w, ...
Augmentation for position p is seeded by (seed, p) alone. Nothing depends on what was read
before, so resuming from a position reproduces the uninterrupted run bit for bit, with or
without worker processes. Broken images are skipped (the next position takes their place),
counted in `loader.skipped` and named once in a warning on the `reca.engine.data` logger.

Sources (`ImageSource`) and the decoder (`ImageDecoder`, in `data_decode`) are small
interfaces so that WebDataset/Parquet sources and GPU decoding can be dropped in later.
"""
from __future__ import annotations

import io
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from reca.engine.data_decode import (
    IMAGE_EXTENSIONS, BadImage, ImageDecoder, PillowDecoder, make_views, needed_side,
)
from reca.engine.errors import UserError
if TYPE_CHECKING:  # duck-typed at run time: any object with ViewSpec's fields works
    from reca.models.adapter import ViewSpec

__all__ = [
    "BadImage", "DemoSource", "FolderSource", "ImageBatch", "ImageDecoder", "ImageSource",
    "Loader", "PillowDecoder", "build_loader", "make_views", "open_source",
]

log = logging.getLogger(__name__)

CACHE_BYTES = 256 << 20  # decoded-image LRU per process: holds a demo or small folder entirely


@runtime_checkable
class ImageSource(Protocol):
    """Indexable encoded images; `key(i)` names sample i in logs and batches."""

    def __len__(self) -> int: ...

    def key(self, i: int) -> str: ...

    def read(self, i: int) -> bytes: ...


class FolderSource:
    """Image files under `root`, searched recursively, in sorted relative-path order.

    Picked by extension (IMAGE_EXTENSIONS, any case); the decoder then trusts content only.
    Hidden files and folders (leading '.', e.g. macOS '._x.jpg') are ignored; symlinked files
    are read, symlinked folders are not followed (no cycles).
    """

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))
        if not os.path.exists(self.root):
            raise UserError(f"data source {root!r}: no such folder (give an image folder or 'demo')")
        if not os.path.isdir(self.root):
            raise UserError(f"data source {root!r} is a file, not a folder of images")
        found = []
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = os.path.relpath(folder, self.root)
            found += [
                name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
                for name in files
                if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
            ]
        if not found:
            exts = " ".join(IMAGE_EXTENSIONS)
            raise UserError(f"data source {root!r}: no image files ({exts}) found")
        self.files = sorted(found)

    def __len__(self) -> int:
        return len(self.files)

    def key(self, i: int) -> str:
        return self.files[i]

    def read(self, i: int) -> bytes:
        with open(os.path.join(self.root, self.files[i]), "rb") as f:
            return f.read()


# (key, skimage.data function, tuple item or None): the photographs that ship inside
# scikit-image; eagle/kidney/lily/skin are left out because they need a download.
_DEMO = [("astronaut", "astronaut", None), ("chelsea", "chelsea", None), ("coffee", "coffee", None),
         ("rocket", "rocket", None), ("hubble_deep_field", "hubble_deep_field", None),
         ("immunohistochemistry", "immunohistochemistry", None), ("retina", "retina", None),
         ("stereo_motorcycle_left", "stereo_motorcycle", 0),
         ("stereo_motorcycle_right", "stereo_motorcycle", 1),
         ("camera", "camera", None), ("moon", "moon", None), ("grass", "grass", None),
         ("gravel", "gravel", None), ("brick", "brick", None)]


class DemoSource:
    """Photographs bundled in scikit-image, offline: 14 images, 9 colour and 5 grey.

    Each is encoded as PNG on first read (lazily, once per process) so the demo runs exactly
    the decode path a folder of files does.
    """

    def __init__(self):
        self._png: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(_DEMO)

    def key(self, i: int) -> str:
        return f"skimage/{_DEMO[i][0]}"

    def read(self, i: int) -> bytes:
        if i not in self._png:
            import skimage.data  # slow import, and only the demo needs it

            _, fn, item = _DEMO[i]
            pixels = getattr(skimage.data, fn)()
            pixels = pixels if item is None else pixels[item]
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "PNG", compress_level=1)  # fast; size is irrelevant
            self._png[i] = buf.getvalue()
        return self._png[i]


def open_source(spec: str) -> ImageSource:
    """'demo' -> DemoSource; anything else is a folder (write './demo' for a folder so named)."""
    return DemoSource() if spec == "demo" else FolderSource(spec)


@dataclass
class ImageBatch:
    und: torch.Tensor  # [B, 3, Hu, Wu] float32, normalised by the model's und_mean/und_std
    gen: torch.Tensor  # [B, 3, Hg, Wg] float32 in [-1, 1]
    keys: list[str]  # source key of each sample
    positions: torch.Tensor  # [B] int64 stream positions the samples came from

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ImageBatch":
        return ImageBatch(self.und.to(device, non_blocking=non_blocking),
                          self.gen.to(device, non_blocking=non_blocking), self.keys, self.positions)


Sample = tuple[int, int, str, Any, Any, str]  # position, index, key, und | None, gen | None, reason


class _Samples(torch.utils.data.Dataset):
    """Map-style dataset over stream positions: what both the in-process path and the
    DataLoader workers run. Each process keeps its own decoded-image LRU and bad-index memo."""

    def __init__(self, source: ImageSource, decoder: ImageDecoder, views: ViewSpec, cfg: Any,
                 cache_bytes: int):
        self.source, self.decoder, self.views, self.cfg = source, decoder, views, cfg
        self.n = len(source)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, Image.Image] = OrderedDict()
        self._cached = 0
        self._bad: dict[int, str] = {}
        self._perm: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))

    def index(self, position: int) -> int:
        epoch = position // self.n
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.cfg.seed, 0, epoch]).permutation(self.n))
        return int(self._perm[1][position % self.n])

    def __getitem__(self, position: int) -> Sample:
        i = self.index(position)
        key = self.source.key(i)
        try:
            img = self._image(i, key)
        except BadImage as e:
            return position, i, key, None, None, " ".join(str(e).split())
        rng = np.random.default_rng([self.cfg.seed, 1, position])
        und, gen = make_views(img, self.views, self.cfg, rng)
        return position, i, key, und, gen, ""

    def _image(self, i: int, key: str) -> Image.Image:
        if i in self._bad:
            raise BadImage(self._bad[i])
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        try:
            data = self.source.read(i)
        except OSError as e:
            raise BadImage(f"cannot read: {e}") from None
        try:
            img = self.decoder.decode(data, key)
        except BadImage as e:
            self._bad[i] = str(e)  # decoding is deterministic: never try this one again
            raise
        self._remember(i, img)
        return img

    def _remember(self, i: int, img: Image.Image) -> None:
        size = img.width * img.height * 3
        if size > self.cache_bytes:
            return
        self._cache[i] = img
        self._cached += size
        while self._cached > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.width * old.height * 3


class _Positions(torch.utils.data.Sampler):
    """start, start + step, ... forever: this rank's stream positions from a resume point."""

    def __init__(self, start: int, step: int):
        self.start, self.step = start, step

    def __iter__(self) -> Iterator[int]:
        p = self.start
        while True:
            yield p
            p += self.step


def _keep(sample: Sample) -> Sample:  # DataLoader's collate_fn: module-level so it pickles
    return sample


class Loader:
    """Endless iterator of full `ImageBatch`es for one rank (see the module docstring).

    Attributes the train loop reads: `skipped` (bad-sample skip events so far), `wait_seconds`
    (cumulative time spent inside `__next__`, i.e. the loop waiting for data).
    """

    def __init__(self, source: ImageSource, views: ViewSpec, cfg: Any, *, rank: int = 0,
                 world_size: int = 1, decoder: ImageDecoder | None = None,
                 cache_bytes: int = CACHE_BYTES):
        if decoder is None:
            decoder = PillowDecoder(min_side=cfg.min_side, max_pixels=cfg.max_pixels,
                                    target_side=needed_side(views, cfg.crop_scale))
        self.cfg, self.views = cfg, views
        self.rank, self.world_size = rank, world_size
        self.samples = _Samples(source, decoder, views, cfg, cache_bytes)
        self.skipped = 0
        self.wait_seconds = 0.0
        self._next = rank  # next stream position of this rank not yet in a yielded batch
        self._bad: dict[int, str] = {}  # index -> reason, for warn-once and the all-bad check
        self._dataloader: torch.utils.data.DataLoader | None = None
        self._workers: Iterator[Sample] | None = None

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> ImageBatch:
        t0 = time.perf_counter()
        try:
            return self._batch()
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def _batch(self) -> ImageBatch:
        und, gen, keys, positions = [], [], [], []
        while len(keys) < self.cfg.batch_size:
            p, i, key, u, g, reason = self._sample()
            self._next = p + self.world_size
            if u is None:
                self._skip(i, key, reason)
                continue
            und.append(u)
            gen.append(g)
            keys.append(key)
            positions.append(p)
        return ImageBatch(torch.from_numpy(np.stack(und)), torch.from_numpy(np.stack(gen)),
                          keys, torch.tensor(positions, dtype=torch.int64))

    def _sample(self) -> Sample:
        if self.cfg.num_workers <= 0:
            return self.samples[self._next]
        if self._workers is None:
            self._workers = self._start_workers()
        return next(self._workers)

    def _start_workers(self) -> Iterator[Sample]:
        w = self.cfg.num_workers
        self._dataloader = torch.utils.data.DataLoader(
            self.samples, batch_size=None, sampler=_Positions(self._next, self.world_size),
            num_workers=w, collate_fn=_keep, persistent_workers=True,
            prefetch_factor=max(2, -(-2 * self.cfg.batch_size // w)))  # ~2 batches in flight
        return iter(self._dataloader)

    def _skip(self, i: int, key: str, reason: str) -> None:
        self.skipped += 1
        if i not in self._bad:
            self._bad[i] = reason
            log.warning("skipping image %s: %s", key, reason)
            if len(self._bad) >= self.samples.n:
                self.close()
                raise UserError(f"no decodable images in {self.cfg.source}")

    def state_dict(self) -> dict[str, int]:
        return {"position": self._next, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved state; a position of another rank moves up to this rank's next."""
        p = int(state["position"])
        self._next = p + (self.rank - p) % self.world_size
        self.skipped = int(state.get("skipped", 0))
        self.close()  # in-flight worker results belong to the old position

    def close(self) -> None:
        """Stop worker processes (started again on the next batch if iteration continues)."""
        workers, self._workers, self._dataloader = self._workers, None, None
        shutdown = getattr(workers, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_loader(cfg: Any, views: ViewSpec, *, rank: int = 0, world_size: int = 1) -> Loader:
    """The loader for a `DataConfig` and a model's `ViewSpec`; workers start on the first batch."""
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
    if views.gen_resize not in ("crop", "stretch"):
        raise UserError(f"gen_resize must be 'crop' or 'stretch', got {views.gen_resize!r}")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world_size {world_size}")
    return Loader(open_source(cfg.source), views, cfg, rank=rank, world_size=world_size)
