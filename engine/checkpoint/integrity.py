"""Checkpoint files that are written atomically and refuse to load when a byte has changed.

A file is what `torch.save` writes, then a fixed-size trailer holding the sha256 of those bytes:

    <torch.save zip archive> + b"\\nreca-checkpoint sha256=" + 64 hex digits + b"\\n"

The digest is computed on the bytes as they are handed to the file (no second pass over the
data at save time), and checked over the whole archive before anything is unpickled; the
archive is then read through a window that ends where the trailer starts, with
`torch.load(weights_only=True)`, so no pickle ever runs code. The zip archive itself stays a
plain `torch.save` file: `torch.load` of a checkpoint outside reca still works.

Writes go to a temporary file in the same directory (`.NAME.<random>.tmp`), are flushed and
fsynced, then renamed over the previous file and the directory fsynced: a reader sees the old
file or the new one, never half of either. A failed write (a full disk, a read-only mount,
Ctrl-C) removes the temporary file and leaves the previous one as it was.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from reca.engine.errors import UserError, os_reason

MAGIC = b"\nreca-checkpoint sha256="
TRAILER_BYTES = len(MAGIC) + 64 + 1
_CHUNK = 16 << 20  # bytes per read while hashing: large enough that hashing runs at memory speed


class _HashingWriter:
    """The file object torch.save writes to: every buffer goes to `f` and into the digest.
    An exception raised in here (ENOSPC from the file, KeyboardInterrupt from a second Ctrl-C)
    reaches the caller of torch.save as a RuntimeError ("unexpected pos") from torch's zip
    writer, so the first one is kept and re-raised by `atomic_save` as itself."""

    def __init__(self, f):
        self.f = f
        self.digest = hashlib.sha256()
        self.error: BaseException | None = None

    def write(self, data) -> int:
        if self.error is not None:  # torch keeps writing after a failure: stop it at once
            raise self.error
        try:
            n = self.f.write(data)
            self.digest.update(data)
        except BaseException as e:
            self.error = e
            raise
        return n

    def flush(self) -> None:
        self.f.flush()


class _Window(io.RawIOBase):
    """Bytes [0, size) of an open binary file, seekable: the archive without its trailer."""

    def __init__(self, f, size: int):
        self.f, self.size, self.pos = f, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self.size - self.pos))
        if n == 0:
            return 0
        self.f.seek(self.pos)
        got = self.f.readinto(view[:n])
        self.pos += got
        return got


def atomic_save(obj: Any, path: str | Path) -> str:
    """torch.save `obj` to `path` with the checksum trailer, atomically; returns the hex digest.
    A full disk, a read-only mount or a denied permission raise one-line `UserError`s that name
    the file and the reason; the previous file is kept and the temporary one removed."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            try:
                torch.save(obj, writer)
            except BaseException as e:
                if writer.error is not None:  # what torch's writer turned into "unexpected pos"
                    raise writer.error from None
                if _interrupted(e):  # a Ctrl-C anywhere in torch.save, masked by the zip writer's exit
                    raise KeyboardInterrupt from None
                raise
            hexdigest = writer.digest.hexdigest()
            f.write(MAGIC + hexdigest.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)  # make the rename itself durable
    except OSError as e:
        kept = "the previous one is kept unchanged" if path.is_file() else "no earlier one exists"
        raise UserError(f"cannot write {path}: {os_reason(e)}; {kept}") from None
    finally:  # also on Ctrl-C: no half-written file is left behind
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return hexdigest


def _interrupted(e: BaseException | None) -> bool:
    """Whether a KeyboardInterrupt is `e` or lies in the chain of exceptions it was raised during."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__context__
    return False


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (the entry itself, not only the file)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verified_load(path: str | Path, map_location="cpu") -> Any:
    """The object `atomic_save` wrote to `path`, after its checksum matched. A missing, empty,
    damaged, cut-short or foreign file raises a one-line `UserError` naming it and the fault."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a checkpoint file")
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise UserError(f"{path} is empty (a write that never finished, or a copy that failed)")
            body = size - TRAILER_BYTES
            f.seek(max(0, body))
            trailer = f.read(TRAILER_BYTES)
            if body <= 0 or not trailer.startswith(MAGIC) or not trailer.endswith(b"\n"):
                raise UserError(f"{path} is not a reca checkpoint: it has no checksum trailer (written by "
                                "another program, or cut short)")
            expected = trailer[len(MAGIC):-1].decode("ascii", "replace")
            if _digest(f, body) != expected:
                raise UserError(f"{path} is damaged: its bytes no longer match the sha256 written with them "
                                "(a disk or copy fault); restore a copy, or start again with --overwrite")
            return _load_window(f, body, path, map_location)
    except OSError as e:
        raise UserError(f"cannot read {path}: {os_reason(e)}") from None


def _digest(f, size: int) -> str:
    digest = hashlib.sha256()
    buf = bytearray(min(_CHUNK, size))
    view = memoryview(buf)
    f.seek(0)
    left = size
    while left > 0:
        n = f.readinto(view[: min(len(buf), left)])
        if n == 0:
            break  # the file shrank under us: the digest will not match
        digest.update(view[:n])
        left -= n
    return digest.hexdigest()


def _load_window(f, size: int, path: Path, map_location) -> Any:
    try:
        return torch.load(_Window(f, size), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, AttributeError, TypeError,
            zipfile.BadZipFile) as e:  # what torch raises for archives and pickles it will not read
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path} cannot be read as a checkpoint: {first}") from None


def first_nonfinite(tensors: Mapping[str, Any]) -> str | None:
    """The name of the first floating-point tensor in `tensors` holding a NaN or an inf, or None
    (a DTensor: this rank's shard of it; entries that are not tensors are passed over)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        if not bool(torch.isfinite(local).all()):
            return name
    return None


def refuse_nonfinite(tensors: Mapping[str, Any], source: str) -> None:
    """One line naming the first tensor of `source` that holds a NaN or an inf: weights like
    that would make every sample noise, every export useless, and a resume's first loss nan."""
    name = first_nonfinite(tensors)
    if name is not None:
        raise UserError(nonfinite_line(source, name))


def nonfinite_line(source: str, name: str) -> str:
    return f"{source}: tensor {name} holds NaN or inf values (a run that diverged, or an edited file); refused"
