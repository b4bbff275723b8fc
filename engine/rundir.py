"""The run directory: checked writable before any training, locked for the run's life, its
leftovers from a killed write removed, and an earlier run moved aside (never deleted) by
`--overwrite`. Call order at start: `check_run_dir` -> `RunLock` -> `clean_orphans` ->
(`replace_run` for --overwrite) -> anything new is written."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path

from reca.engine.errors import UserError, os_reason

LOCK = ".lock"
# What a run writes (config.json, tokenizer/ and metrics beside the checkpoint): moved together
# by `replace_run`, so the moved folder is itself a run that `--resume` can continue.
RUN_FILES = ("checkpoint.pt", "config.json", "metrics.jsonl", "loss.png", "alignment.png", "tb", "tokenizer")
RUN_GLOBS = ("recon_step*.png", "step-*")  # step-*: a torchrun job's checkpoint folders
# Temporary files of atomic writes (integrity.atomic_save, MetricsWriter): ".NAME.<random>.tmp".
ATOMIC = ("checkpoint.pt", "metrics.jsonl", "config.json")


def check_run_dir(path: str | Path) -> Path:
    """Create `path` if needed and prove a file can be written in it, or raise one line: a
    path that is a file or lies under one, permission denied, a read-only or full file system."""
    path = Path(path)
    try:
        for parent in [path, *path.parents]:
            if parent.exists() and not parent.is_dir():
                where = "is a file" if parent == path else f"lies under {parent}, which is a file"
                raise UserError(f"run directory {path} {where}, not a directory")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe.{os.getpid()}.tmp"
        try:
            with probe.open("wb") as f:
                f.write(b"reca")
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"run directory {path} cannot be written: {os_reason(e)}") from None
    return path


def check_free_space(path: str | Path, need: int, *, what: str = "a checkpoint of this run") -> None:
    """Refuse at start a run whose checkpoint (`need` bytes, `checkpoint.checkpoint_bytes`) would
    not fit beside the previous one: a write needs room for both until its rename. `what` names
    what needs the room (a torchrun job: its step-N/ folders, `checkpoint.dcp.check_space`)."""
    free = shutil.disk_usage(path).free
    if free < need:
        raise UserError(f"run directory {path} has {free / 2**30:.2f} GiB free; {what} needs "
                        f"about {need / 2**30:.2f} GiB (no space left on device would end the run later)")


class RunLock:
    """An advisory lock on RUN/.lock held for the run's life (`with RunLock(run):` or `close()`).
    A second process on the same directory fails at once with one line naming the holder's pid.
    `flock` is released by the kernel when its holder dies, so a stale lock of a killed run is
    simply taken over; the pid in the file is only for the message. Advisory: other programs
    and file systems without flock (some network mounts) are not stopped by it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot lock run directory {self.path.parent}: {os_reason(e)}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self.fd)
            raise UserError(f"run directory {self.path.parent} is in use by another reca process (pid {holder}); "
                            "wait for it to end or stop it, or use another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def close(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def clean_orphans(run_dir: str | Path) -> list[Path]:
    """Remove the temporary files of atomic writes that a kill interrupted; returns them.
    Only safe under `RunLock`: no other process may be writing in the directory."""
    run = Path(run_dir)
    removed = []
    for pattern in [f".{name}.*.tmp" for name in ATOMIC] + [".write-probe.*.tmp"]:
        for tmp in run.glob(pattern):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def replace_run(run_dir: str | Path) -> Path | None:
    """`--overwrite`: move the earlier run's files (`RUN_FILES`, previews) into
    RUN/replaced-<YYYYmmdd-HHMMSS>/ before anything new is written, and return that folder
    (None when there was nothing to move). Moved, not deleted: nothing a user made is lost,
    the moved folder can still be resumed, and renames within one directory cost nothing and
    cannot fail half-way through a file. The checkpoint goes first, so a kill in between never
    leaves an old checkpoint beside a new config. Delete the folder to reclaim the space."""
    run = Path(run_dir)
    old = [run / n for n in RUN_FILES if (run / n).exists()]
    old += sorted(p for g in RUN_GLOBS for p in run.glob(g))
    if not old:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, k = run / f"replaced-{stamp}", 1
    while dest.exists():
        dest, k = run / f"replaced-{stamp}-{k}", k + 1
    try:
        dest.mkdir()
        for p in old:
            os.rename(p, dest / p.name)
        fd = os.open(run, os.O_RDONLY)  # the renames themselves durable before the new run writes
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise UserError(f"--overwrite cannot move the earlier run in {run} aside: {os_reason(e)}") from None
    return dest


def read_run_config(run_dir: str | Path) -> dict:
    """RUN/config.json as a dict, or one line: missing, unreadable, not JSON, not an object."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"nothing to resume in {path.parent}: no config.json")
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read {path}: {os_reason(e)}") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise UserError(f"{path} does not parse as JSON ({e}); was it edited by hand?") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a config object")
    return data
