"""Image data for RecA: sources -> order -> decode -> two views -> batches (`loader`), with
CUDA batch decoders under `backends/` (DALI, nvJPEG) and their decode-ahead in `prefetch`.

    loader = build_loader(cfg.data, model.views, rank=rank, world_size=world_size)
    batch = next(loader)          # ImageBatch: und, gen, keys, positions, captions
"""
from reca.engine.data.decode import BadImage, ImageDecoder, PillowDecoder, make_views
from reca.engine.data.loader import ImageBatch, Loader, build_loader, decode_device, open_source, open_sources
from reca.engine.data.sources import DemoSource, FolderSource, ImageSource, ParquetSource, TarSource

__all__ = [
    "BadImage", "DemoSource", "FolderSource", "ImageBatch", "ImageDecoder", "ImageSource", "Loader",
    "ParquetSource", "PillowDecoder", "TarSource", "build_loader", "decode_device", "make_views", "open_source",
    "open_sources",
]
