"""Checksums of a torchrun job's RUN/step-N/ folders: no byte of one is used unverified.

    step-N/SHA256SUMS   "<sha256>  <name>" for every file of the folder but extra.pt: each
                        rank's DCP shards (__R_K.distcp) and .metadata (`sha256sum -c
                        SHA256SUMS` inside the folder checks them by hand)
    step-N/extra.pt     checksummed itself (`integrity.atomic_save`'s trailer), and holding the
                        sha256 of SHA256SUMS: one chain, extra.pt -> SHA256SUMS -> every file

Written: each rank hashes its own files as DCP writes them (`writer`: the digest of the bytes
as they are handed to the file, as `atomic_save` does; a file DCP wrote some other way is hashed
from disk), and rank 0 gathers the digests into SHA256SUMS.

Verified when written. "Verified" means read back and matched: once DCP has fsynced a rank's
files, the rank asks the kernel to drop them from its page cache (posix_fadvise DONTNEED, so the
read reaches the disk where the file system honours it) and reads them back against the digests
taken while writing (`read_back`). Only when every rank has matched every file it wrote is the
folder renamed into place, and only after that are older folders rotated out. So every folder
a job keeps was verified once, by the job that wrote it, or (the folder a job resumed from) by
that load, and rotation never deletes the last verified folder in favour of a newer one that
was not. The price, per save and rank, the ranks in parallel: sha256 over its own files twice
(as written, and read back: about 1 GB/s on one core of our CPU test machine) and one read of
them from the disk.

Verified at load (a resume, `reca sample RUN`, `reca export RUN`), before DCP reads a byte
(`verify`): extra.pt's trailer, SHA256SUMS against the digest in extra.pt, .metadata against
SHA256SUMS (only then is it unpickled), every file .metadata points to listed, then every file's
bytes, the ranks sharing the files. A fault is one line on every rank naming the file, and the
newest older folder that verifies whole. A folder written before step folders were checksummed
(its extra.pt records no SHA256SUMS) is still read, with one line saying it is unverified.
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from reca.engine.checkpoint.integrity import verified_load
from reca.engine.errors import UserError, os_reason

SUMS = "SHA256SUMS"
EXTRA = "extra.pt"
_CHUNK = 16 << 20


class Fault(Exception):
    """One file of a step folder that fails: `name` (relative to the folder) and why."""

    def __init__(self, name: str, why: str):
        super().__init__(f"{name} {why}")
        self.name, self.why = name, why


# --- writing -------------------------------------------------------------------------------

class _HashingStream(io.IOBase):
    """What DCP writes a file through: every buffer goes to the file and into the digest. The
    first OSError (a full disk) is kept on the file system object: torch's zip writer turns it
    into a RuntimeError ("unexpected pos") on its way out of DCP."""

    def __init__(self, f, fs: "_HashingFileSystem", name: str):
        super().__init__()
        self.f, self.fs, self.name = f, fs, name
        self.digest, self.hashable = hashlib.sha256(), True

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.fs.fault = self.fs.fault or (self.name, e)
            raise
        self.digest.update(data)
        return n

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, *args) -> int:  # a rewrite in place: the running digest no longer describes the file
        self.hashable = False
        return self.f.seek(*args)

    def fileno(self) -> int:
        return self.f.fileno()

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        if not self.closed:
            try:
                super().close()  # flushes
            finally:
                self.f.close()


def _hashing_file_system():
    from torch.distributed.checkpoint.filesystem import FileSystem

    class _HashingFileSystem(FileSystem):
        """DCP's local file system, hashing what it writes: `written` maps a file name to its
        digest (None: written in a way the digest cannot follow)."""

        def __init__(self):
            super().__init__()
            self.written: dict[str, str | None] = {}
            self.fault: tuple[str, OSError] | None = None

        @contextmanager
        def create_stream(self, path, mode):
            if "r" in mode and "+" not in mode:
                with super().create_stream(path, mode) as f:
                    yield f
                return
            name = Path(path).name
            self.written[name] = None
            with super().create_stream(path, mode) as f:
                stream = _HashingStream(f, self, name)
                yield stream
            self.written[name] = stream.digest.hexdigest() if stream.hashable else None

        def rename(self, path, new_path) -> None:  # .metadata is written as .metadata.tmp
            super().rename(path, new_path)
            if Path(path).name in self.written:
                self.written[Path(new_path).name] = self.written.pop(Path(path).name)

    return _HashingFileSystem()


def writer(folder: Path):
    """A DCP `FileSystemWriter` into `folder` that hashes every file as it writes it (its `fs`:
    `written`, `fault`). Files are fsynced (DCP's default)."""
    from torch.distributed.checkpoint import FileSystemWriter

    w = FileSystemWriter(str(folder))
    w.fs = _hashing_file_system()
    return w


def file_sha256(path: Path, *, uncached: bool = False) -> str:
    """The sha256 of a file's bytes; `uncached`: first ask the kernel to drop its cached pages
    (written and fsynced: clean), so the bytes come from the disk where it obeys."""
    with open(path, "rb") as f:
        if uncached and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        digest = hashlib.sha256()
        buf = bytearray(min(_CHUNK, max(1, os.fstat(f.fileno()).st_size)))
        view = memoryview(buf)
        while n := f.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()


def read_back(folder: Path, rank: int, w) -> dict[str, str]:
    """This rank's files in `folder`, written through `w` and fsynced, read back against the
    digests taken while writing -> {name: sha256}. A file that does not match raises `Fault`;
    this rank's shards that the digest could not follow are hashed from disk."""
    names = set(w.fs.written) | {p.name for p in folder.glob(f"__{rank}_*.distcp")}
    if rank == 0 and (folder / ".metadata").is_file():
        names.add(".metadata")
    out = {}
    for name in sorted(names):
        got = file_sha256(folder / name, uncached=True)
        want = w.fs.written.get(name)
        if want is not None and got != want:
            raise Fault(name, "does not read back as it was written (a disk, memory or file-system fault)")
        out[name] = got
    return out


def write_sums(folder: Path, sums: dict[str, str]) -> str:
    """SHA256SUMS of `sums` into `folder`, fsynced -> its own sha256 (kept in extra.pt)."""
    data = "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())).encode()
    with open(folder / SUMS, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def save_fault(w, error: BaseException | None) -> str | None:
    """Why this rank's part of a save failed, as a user reads it ("no space left on device
    writing __1_0.distcp"), or None when `error` is no operating-system failure (a bug: raised)."""
    if isinstance(error, Fault):
        return f"{error.name} {error.why}"
    if w.fs.fault is not None:
        name, e = w.fs.fault
        return f"{os_reason(e)} writing {name}"
    if isinstance(error, OSError):
        return f"{os_reason(error)}{f' at {Path(error.filename).name}' if error.filename else ''}"
    for exc, _ in getattr(error, "failures", {}).values():  # a CheckpointException: any rank's OSError
        if isinstance(exc, OSError):
            return os_reason(exc)
    return None


# --- verifying -----------------------------------------------------------------------------

def _head(folder: Path) -> tuple[dict, dict[str, str] | None]:
    """extra.pt, SHA256SUMS and .metadata verified, and every file .metadata points to listed
    -> (extra, {name: sha256} of the files left to check; None for a folder written before
    step folders were checksummed, whose extra.pt records no SHA256SUMS). Raises `Fault`."""
    from torch.distributed.checkpoint import FileSystemReader

    if not folder.is_dir():
        raise Fault("", "is not a folder")
    try:
        extra = verified_load(folder / EXTRA)
    except UserError as e:  # its words without the path and the advice for a checkpoint.pt
        msg, path = str(e).split("; restore")[0], str(folder / EXTRA)
        raise Fault(EXTRA, msg[len(path):].strip(" :") if msg.startswith(path) else
                    msg.replace(f"cannot read {path}:", "cannot be read:")) from None
    if not isinstance(extra, dict):
        raise Fault(EXTRA, f"holds a {type(extra).__name__}, not a step folder's record")
    if "sums" not in extra:
        return extra, None
    try:
        data = (folder / SUMS).read_bytes()
    except OSError as e:
        raise Fault(SUMS, f"cannot be read: {os_reason(e)}") from None
    if hashlib.sha256(data).hexdigest() != extra["sums"]:
        raise Fault(SUMS, "is damaged: its bytes no longer match the sha256 kept in extra.pt")
    sums = {}
    for line in data.decode().splitlines():
        digest, name = line.split("  ", 1)
        sums[name] = digest
    if ".metadata" not in sums:
        raise Fault(SUMS, "lists no .metadata")
    _check_file(folder, ".metadata", sums.pop(".metadata"))
    storage = FileSystemReader(str(folder)).read_metadata().storage_data  # ours: its digest matched
    for name in sorted({info.relative_path for info in storage.values()}):
        if name not in sums:
            raise Fault(name, f"is not listed in {SUMS}")
    return extra, sums


def _check_file(folder: Path, name: str, digest: str) -> None:
    try:
        got = file_sha256(folder / name)
    except FileNotFoundError:
        raise Fault(name, "is missing") from None
    except OSError as e:
        raise Fault(name, f"cannot be read: {os_reason(e)}") from None
    if got != digest:
        raise Fault(name, "is damaged: its bytes no longer match the sha256 written with them (a disk or copy fault)")


def check_folder(folder: Path) -> dict:
    """Every file of `folder` verified in this process -> its extra.pt. Raises `Fault`."""
    extra, sums = _head(folder)
    for name, digest in sorted((sums or {}).items()):
        _check_file(folder, name, digest)
    return extra


def _unchecked(folder: Path) -> None:
    print(f"reca: {folder} holds no {SUMS} (written by reca before step folders were checksummed): its files are "
          "read unverified", file=sys.stderr, flush=True)


def newest_whole(run: Path, below: Path) -> Path | None:
    """The newest step folder of `run` older than `below` that verifies whole (read in full)."""
    from reca.engine.checkpoint.dcp import folders, step_of

    for folder in reversed([f for f in folders(run) if step_of(f) < step_of(below)]):
        try:
            check_folder(folder)
        except Fault:
            continue
        return folder
    return None


def refusal(folder: Path, fault: Fault, what: str) -> str:
    """The line for a folder that fails: `what` ("cannot resume RUN"), the file and why, and
    the newest older folder that verifies whole."""
    run, where = folder.parent, f"{folder.name}/{fault.name}".rstrip("/")
    whole = newest_whole(run, folder)
    if whole is None:
        after = "no older step-N/ folder of it is whole"
    else:
        after = f"the newest whole folder is {whole.name}: move {folder.name} out of {run} to use it"
    return f"{what}: {where} {fault.why}; {after}"


def verify(folder: Path, r=None, *, what: str) -> dict:
    """Every rank of a job (`r`; None: one process without a group): `folder` verified whole
    before anything reads it -> its extra.pt, on every rank. Rank 0 checks extra.pt, SHA256SUMS
    and .metadata; the ranks share the files' bytes; a fault anywhere is the same one-line
    `UserError` on every rank (`refusal`, with `what`: "cannot resume RUN")."""
    folder = Path(folder)
    if r is None or not dist.is_initialized():
        try:
            extra, sums = _head(folder)
            for name, digest in sorted((sums or {}).items()):
                _check_file(folder, name, digest)
        except Fault as fault:
            raise UserError(refusal(folder, fault, what)) from None
        if sums is None:
            _unchecked(folder)
        return extra
    head = [None, None]
    if r.main:
        try:
            head[0] = _head(folder)
        except Fault as fault:
            head[1] = refusal(folder, fault, what)
    dist.broadcast_object_list(head, src=0)
    if head[1] is not None:
        raise UserError(head[1])
    extra, sums = head[0]
    if sums is None:
        if r.main:
            _unchecked(folder)
        return extra
    mine, fault = sorted(sums.items())[r.rank::r.world_size], None
    for name, digest in mine:
        try:
            _check_file(folder, name, digest)
        except Fault as f:
            fault = (f.name, f.why)
            break
    faults: list = [None] * r.world_size
    dist.all_gather_object(faults, fault)
    first = min((f for f in faults if f is not None), default=None)
    if first is not None:
        line = [refusal(folder, Fault(*first), what) if r.main else None]  # rank 0 looks for a whole one
        dist.broadcast_object_list(line, src=0)
        raise UserError(line[0])
    return extra
