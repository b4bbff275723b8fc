"""Weight files read a slice at a time (`reca.models.loading.mapped`): what lets every rank of an
FSDP job read only its own shard of each tensor straight from a release's files.

Inside `mapped`, a safetensors file's tensors are meta tensors that remember their file and key
(safetensors files are sliceable: a tensor's rows a..b are one byte range of the file), a
torch file is memory-mapped (`torch.load(mmap=True)`: pages are read when touched). A family's
loader renames, chunks and slices them as it does real tensors: every such result is a view of
the tensor in the file, and `Mapped.read` reads the rows a view needs and nothing else.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class Mapped:
    """The sources of a `mapped` load and what it supplied.

    `sink`: full parameter or buffer name -> the file's tensor (meta view, or a memory-mapped
    tensor) for every meta tensor of the model `load_into` met; real tensors were copied into.
    `prefixes`: id(module) -> its name in the model, with a trailing dot ("" for the root)."""

    def __init__(self, prefixes: dict[int, str]):
        self.prefixes, self.sink = prefixes, {}
        self._sources: dict[int, tuple[torch.Tensor, str, str]] = {}
        self._files: dict[str, tuple[int, int, dict[str, int]]] = {}

    def register(self, t: torch.Tensor, path: Path, key: str) -> None:
        self._sources[id(t)] = (t, str(path), key)  # the tensor kept alive: its id stays its own

    def prefix(self, module: torch.nn.Module) -> str:
        try:
            return self.prefixes[id(module)]
        except KeyError:
            raise ValueError(f"a weight file was loaded into a {type(module).__name__} outside the model") from None

    def read(self, value: torch.Tensor, index: tuple | None = None) -> torch.Tensor:
        """`value[index]` as a real CPU tensor, reading from its file only the rows it spans."""
        view = value if index is None else value[index]
        if not view.is_meta:
            return view
        root = view if view._base is None else view._base
        source = self._sources.get(id(root))
        if source is None or source[0] is not root:
            raise ValueError("a weight file's tensor was transformed into a new tensor by the family's loader "
                             "(not a view of it), so it cannot be read a shard at a time; set "
                             "distributed.init_from_shards=false")
        if view.numel() == 0:
            return torch.empty(view.shape, dtype=view.dtype)
        start = view.storage_offset()
        end = start + sum((n - 1) * s for n, s in zip(view.shape, view.stride())) + 1
        row = root.stride(0) if root.dim() else 1
        first, last = start // row, -(-end // row)
        rows = self._rows(source[1], source[2], root.dtype, first * row, last * row)
        return rows.as_strided(view.shape, view.stride(), start - first * row)

    def _rows(self, path: str, key: str, dtype: torch.dtype, begin: int, end: int) -> torch.Tensor:
        """Elements begin..end of a file's tensor, read with one pread into memory of their own
        (nothing of the file stays mapped into the process)."""
        fd, data, offsets = self._file(path)
        size = torch.empty((), dtype=dtype).element_size()
        first = data + offsets[key] + begin * size
        buf = bytearray(os.pread(fd, (end - begin) * size, first))
        if len(buf) != (end - begin) * size:
            raise ValueError(f"{path}: {key} is cut short (the file ends inside it)")
        return torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)

    def _file(self, path: str) -> tuple[int, int, dict[str, int]]:
        """(fd, where the data starts, key -> its byte offset in the data) of a safetensors file."""
        if path not in self._files:
            fd = os.open(path, os.O_RDONLY)
            n = int.from_bytes(os.pread(fd, 8, 0), "little")
            header = json.loads(os.pread(fd, n, 8))
            offsets = {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
            self._files[path] = (fd, 8 + n, offsets)
        return self._files[path]

    def close(self) -> None:
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files.clear()
