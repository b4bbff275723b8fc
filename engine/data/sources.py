"""Where encoded images come from: folders, WebDataset tar shards, Parquet files, the demo.

Every source is a random-access list of samples (`ImageSource`): `key(i)` names sample i in
logs and batches, `read(i)` returns its encoded bytes, `caption(i)` its text or None. Random
access is what lets the loader's order be a pure function of (seed, position), so resume is
exact. How each source makes random access cheap:

- folders: one file per sample (an optional sidecar `NAME.txt` is the caption);
- a LLaVA conversation JSON (`conversations.LlavaSource`): an image and its turns a sample;
- tar shards: each shard is indexed once (tarfile reads the member headers and seeks over the
  data; `TarInfo.offset_data`/`size` give each member's bytes); a sample is then one seek + read
  of the shard file. Nothing is ever extracted: member names are only strings (absolute paths,
  `..`, links and devices never touch the filesystem; only regular members are indexed). A
  truncated or corrupt shard keeps the samples whose bytes are complete before the damage and
  warns once per process. Indexes are cached on disk (`data.tar_index_cache`, never beside the
  data, which may be read-only), keyed by the shard's absolute path, size and mtime_ns: a
  changed shard is rescanned, a corrupt cache file or an unwritable cache folder costs a scan;
- Parquet: row counts come from the file footers; a read decodes the row group holding the row
  (a small per-process LRU keeps recent row groups), so the loader shuffles row groups and
  mixes rows within a window of them (`block_starts`, see `data_order`).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
from collections import OrderedDict
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from reca.engine.data.decode import IMAGE_EXTENSIONS
from reca.engine.errors import UserError, os_reason

log = logging.getLogger("reca.engine.data")

TAR_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # WebDataset member suffixes
ROW_GROUP_CACHE = 4  # Parquet row groups kept decoded per process (a shuffle window spans more)
TAR_INDEX_CACHE = "~/.cache/reca/tar_index"  # DataConfig.tar_index_cache's default
TAR_INDEX_VERSION = 1  # bump when the cached index's layout or meaning changes
_WARNED: set[tuple] = set()  # warnings already given in this process (each once per run)


@runtime_checkable
class ImageSource(Protocol):
    """Indexable encoded images; `key(i)` names sample i in logs and batches."""

    def __len__(self) -> int: ...

    def key(self, i: int) -> str: ...

    def read(self, i: int) -> bytes: ...


def caption_of(source: Any, i: int) -> "str | tuple | None":
    """The caption of sample i (text, or a conversation's turns: `conversations.Turns`), or None
    (sources without captions need no method)."""
    fn = getattr(source, "caption", None)
    return fn(i) if fn is not None else None


def printable(name: str) -> str:
    """A name safe for one log line: hostile tar/parquet names may hold newlines or escapes."""
    return "".join(c if c.isprintable() else "?" for c in name)


class FolderSource:
    """Image files under `root`, searched recursively, in sorted relative-path order.

    Picked by extension (IMAGE_EXTENSIONS, any case); the decoder then trusts content only.
    Hidden files and folders (leading '.', e.g. macOS '._x.jpg') are ignored; symlinked files
    are read, symlinked folders are not followed (no cycles). `a/b.jpg`'s caption is `a/b.txt`.
    """

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))
        if not os.path.exists(self.root):
            raise UserError(f"data source {root!r}: no such folder (give an image folder or 'demo')")
        if not os.path.isdir(self.root):
            raise UserError(f"data source {root!r} is a file, not a folder of images")
        found, texts, unreadable = [], set(), []
        # os.walk skips a folder it cannot list without a word: a folder without read permission
        # would read as one without images, or drop its images from the data silently
        for folder, dirs, files in os.walk(self.root, onerror=unreadable.append):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = os.path.relpath(folder, self.root)
            for name in files:
                if name.startswith("."):
                    continue
                path = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(path)
                elif name.endswith(".txt"):
                    texts.add(path)
        if unreadable:
            e = unreadable[0]
            raise UserError(f"data source {root!r}: cannot list the folder {e.filename}: {os_reason(e)}"
                            f"{f' (and {len(unreadable) - 1} more)' if len(unreadable) > 1 else ''}")
        if not found:
            exts = " ".join(IMAGE_EXTENSIONS)
            raise UserError(f"data source {root!r}: no image files ({exts}) found")
        self.files = sorted(found)
        self.texts = texts

    def __len__(self) -> int:
        return len(self.files)

    def key(self, i: int) -> str:
        return self.files[i]

    def read(self, i: int) -> bytes:
        with open(os.path.join(self.root, self.files[i]), "rb") as f:
            return f.read()

    def caption(self, i: int) -> str | None:
        txt = os.path.splitext(self.files[i])[0] + ".txt"
        if txt not in self.texts:
            return None
        with open(os.path.join(self.root, txt), "rb") as f:
            return f.read().decode("utf-8", "replace").strip()


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

    def __init__(self) -> None:
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


class _Files:
    """Per-process open file handles (a pickled source reopens them in each worker)."""

    def __init__(self) -> None:
        self._open: dict[str, Any] = {}
        self._pid = -1

    def get(self, path: str) -> Any:
        if self._pid != os.getpid():  # forked or unpickled into a worker: never share offsets
            self._open, self._pid = {}, os.getpid()
        if path not in self._open:
            self._open[path] = open(path, "rb")
        return self._open[path]

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


class TarSource:
    """WebDataset shards: members `KEY.jpg|png|webp|...` with optional `KEY.txt` / `KEY.json`.

    KEY is the member path up to the first '.' of its base name (the WebDataset rule); a sample
    is keyed `SHARD/KEY` (shard base name) in batches. Index arrays (one entry per sample):
    shard, image offset and size, caption offset and size (size -1: none), caption kind.
    `index_cache`: the folder shard indexes are cached in (see `_IndexCache`); "" scans always.
    """

    def __init__(self, paths: list[str], index_cache: str = ""):
        self.paths = paths
        cache = _IndexCache(index_cache) if index_cache else None
        self.keys: list[str] = []
        tables = []
        for s, path in enumerate(paths):
            keys, rows = _index_shard(path, cache)
            base = os.path.basename(path)
            self.keys += [f"{base}/{k}" for k in keys]
            tables.append(np.column_stack([np.full(len(keys), s, np.int64), rows]))
        if not self.keys:
            raise UserError(f"tar shards {paths[0]!r}...: no image members "
                            f"({', '.join(TAR_IMAGE_EXTS)}) found")
        table = np.concatenate(tables)
        self.shard, self.off, self.size, self.cap_off, self.cap_size, self.cap_kind = (
            np.ascontiguousarray(table[:, c]) for c in range(6))
        self._files = _Files()

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, i: int) -> str:
        return self.keys[i]

    def _bytes(self, i: int, off: int, size: int) -> bytes:
        f = self._files.get(self.paths[self.shard[i]])
        f.seek(off)
        data = f.read(size)
        if len(data) != size:  # the shard shrank after indexing
            raise OSError(f"short read: {len(data)} of {size} bytes")
        return data

    def read(self, i: int) -> bytes:
        return self._bytes(i, int(self.off[i]), int(self.size[i]))

    def caption(self, i: int) -> str | None:
        if self.cap_size[i] < 0:
            return None
        try:
            raw = self._bytes(i, int(self.cap_off[i]), int(self.cap_size[i]))
        except OSError:
            return None
        return _caption_text(raw, int(self.cap_kind[i]))


def _caption_text(raw: bytes, kind: int) -> str | None:
    text = raw.decode("utf-8", "replace")
    if kind == 1:
        return text.strip()
    try:  # json: the usual caption fields; a malformed file costs the caption, not the image
        obj = json.loads(text)
    except ValueError:
        return None
    if isinstance(obj, dict):
        for field in ("caption", "text", "txt", "prompt"):
            if isinstance(obj.get(field), str):
                return obj[field]
    return None


def _warn_once(key: tuple, msg: str, *args: Any) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg, *args)


def _index_shard(path: str, cache: "_IndexCache | None") -> tuple[list[str], np.ndarray]:
    """(KEYs, rows [n, 5] int64: img offset, img size, caption offset, caption size (-1: none),
    caption kind (0 none, 1 txt, 2 json)) of one shard, from the cache when it is current."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"cannot read tar shard {path!r}: {e}") from None
    hit = cache.load(path, st) if cache is not None else None
    keys, rows, damaged = hit if hit is not None else _scan_shard(path)
    if hit is None and cache is not None:
        cache.store(path, st, keys, rows, damaged)
    if damaged:  # from the cache too: a damaged shard is named in every run that reads it
        _warn_once(("damaged", os.path.abspath(path), st.st_size, st.st_mtime_ns),
                   "tar shard %s is truncated or damaged (%s): using its %d complete samples",
                   path, damaged, len(keys))
    return keys, rows


def _scan_shard(path: str) -> tuple[list[str], np.ndarray, str]:
    """Read one shard's member headers: (KEYs, rows, "" or why the shard ends early).

    Headers are read and data seeked over (random-access mode, never extracted); a member whose
    bytes end past the file's end, or any header error, ends the shard there.
    """
    end = os.path.getsize(path)
    images: dict[str, tuple[int, int, int]] = {}  # key -> (rank of extension, offset, size)
    captions: dict[str, tuple[int, int, int]] = {}  # key -> (kind, offset, size); txt wins
    damaged = ""
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            while True:
                try:
                    m = tf.next()
                except (tarfile.TarError, EOFError, OSError) as e:
                    damaged = f"{type(e).__name__}: {e}"
                    break
                if m is None:  # tarfile also ends here on a header cut short: look at what is left
                    f.seek(tf.offset)
                    if f.read(min(end - tf.offset, 1 << 16)).strip(b"\0"):
                        damaged = f"cut inside a member header at byte {tf.offset}"
                    break
                if m.offset_data + m.size > end:
                    damaged = f"member {printable(m.name)!r} ends past the end of the file"
                    break
                if not m.isreg() or m.issparse():  # links, devices, dirs: never followed
                    continue
                folder, _, base = m.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or not stem:
                    continue
                key, ext = printable(f"{folder}/{stem}" if folder else stem), ext.lower()
                if ext in TAR_IMAGE_EXTS:
                    rank = TAR_IMAGE_EXTS.index(ext)
                    if key not in images or rank < images[key][0]:
                        images[key] = (rank, m.offset_data, m.size)
                elif ext in ("txt", "json") and (key not in captions or ext == "txt"):
                    captions[key] = (1 if ext == "txt" else 2, m.offset_data, m.size)
    except (tarfile.TarError, EOFError) as e:  # not even a first header: no samples at all
        damaged = f"{type(e).__name__}: {e}"
    except OSError as e:
        raise UserError(f"cannot read tar shard {path!r}: {e}") from None
    keys = sorted(images)
    rows = np.zeros((len(keys), 5), np.int64)
    for j, key in enumerate(keys):
        _, off, size = images[key]
        kind, c_off, c_size = captions.get(key, (0, 0, -1))
        rows[j] = (off, size, c_off, c_size, kind)
    return keys, rows, " ".join(damaged.split())


class _IndexCache:
    """Shard indexes on disk: one `.npz` per shard, named by a hash of its absolute path and
    holding the (size, mtime_ns) it was scanned at, so a rewritten shard replaces its entry.

    Only ever a speed-up: a missing, stale or unreadable entry means a scan, and an unwritable
    folder means scanning every start (one warning per process). Keys are `printable`, so
    newline-joined UTF-8 holds them without pickling.
    """

    def __init__(self, folder: str):
        self.folder = folder

    def _file(self, path: str) -> str:
        name = hashlib.sha256(os.path.abspath(path).encode("utf-8", "surrogateescape")).hexdigest()
        return os.path.join(self.folder, name[:40] + ".npz")

    @staticmethod
    def _meta(path: str, st: os.stat_result) -> dict[str, Any]:
        return {"version": TAR_INDEX_VERSION, "path": os.path.abspath(path), "size": st.st_size,
                "mtime_ns": st.st_mtime_ns}

    def load(self, path: str, st: os.stat_result) -> tuple[list[str], np.ndarray, str] | None:
        file = self._file(path)
        try:
            with np.load(file, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode("utf-8"))
                rows = z["rows"]
                text = bytes(z["keys"]).decode("utf-8")
        except (FileNotFoundError, NotADirectoryError):  # not cached yet (or no folder): store says why
            return None
        except Exception as e:  # garbage of any kind (zip, npy, json, utf-8): scan instead
            self._warn(f"unreadable cache file {file} ({type(e).__name__}); rescanning")
            return None
        damaged = meta.pop("damaged", None) if isinstance(meta, dict) else None
        if meta != self._meta(path, st):
            return None  # another shard version (or a hash collision): rescan and replace
        keys = text.split("\n") if text else []
        if (not isinstance(damaged, str) or rows.dtype != np.int64 or rows.shape != (len(keys), 5)
                or (rows[:, 0] + rows[:, 1] > st.st_size).any()):
            self._warn(f"inconsistent cache file {file}; rescanning")
            return None
        return keys, rows, damaged

    def store(self, path: str, st: os.stat_result, keys: list[str], rows: np.ndarray, damaged: str) -> None:
        try:
            now = os.stat(path)
        except OSError:
            return
        if (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            return  # changed while being scanned: what was read may belong to neither version
        meta = json.dumps({**self._meta(path, st), "damaged": damaged}).encode("utf-8")
        tmp = ""
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:  # readers see the old entry or the new, never half
                np.savez(f, meta=np.frombuffer(meta, np.uint8), rows=rows,
                         keys=np.frombuffer("\n".join(keys).encode("utf-8"), np.uint8))
            os.replace(tmp, self._file(path))
        except OSError as e:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            self._warn(f"cannot write to {self.folder} ({e.strerror or e}); shards are scanned at every "
                       "start (set data.tar_index_cache to a writable folder, or '' to silence this)")

    def _warn(self, why: str) -> None:
        _warn_once(("index cache",), "tar index cache: %s", why)


class ParquetSource:
    """Rows of Parquet files with an image column: raw bytes, or the HF datasets struct
    {bytes, path} (path is ignored: content only). Keyed `FILE#ROW` in batches.

    `block_starts[j]` is the first sample index of row group j (the unit a read decodes).
    """

    def __init__(self, paths: list[str], image_column: str, caption_column: str = ""):
        pq = _pyarrow_parquet()
        self.paths, self.image_column, self.caption_column = paths, image_column, caption_column
        groups = []  # (file index, row group, rows)
        for f, path in enumerate(paths):
            try:
                meta = pq.ParquetFile(path)
            except Exception as e:  # ArrowInvalid and friends: not a Parquet file
                raise UserError(f"cannot open Parquet file {path!r}: {e}") from None
            names = meta.schema_arrow.names
            for col in filter(None, (image_column, caption_column)):
                if col not in names:
                    raise UserError(f"Parquet file {path!r} has no column {col!r} "
                                    f"(columns: {', '.join(names)}); see data.parquet_image_column")
            groups += [(f, g, meta.metadata.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        rows = np.asarray([r for _, _, r in groups], np.int64)
        self.block_starts = np.concatenate([[0], np.cumsum(rows)])[:-1]
        self.groups = [(f, g) for f, g, _ in groups]
        self.file_start = {f: int(self.block_starts[j]) for j, (f, _) in reversed(list(enumerate(self.groups)))}
        self.n = int(rows.sum())
        if self.n == 0:
            raise UserError(f"Parquet files {paths[0]!r}...: no rows")
        self._cache: OrderedDict[int, tuple[list[Any], list[Any] | None]] = OrderedDict()

    def __len__(self) -> int:
        return self.n

    def _locate(self, i: int) -> tuple[int, int]:
        j = int(np.searchsorted(self.block_starts, i, side="right")) - 1
        return j, i - int(self.block_starts[j])

    def key(self, i: int) -> str:
        j, r = self._locate(i)
        f, _ = self.groups[j]
        return f"{os.path.basename(self.paths[f])}#{int(self.block_starts[j]) - self.file_start[f] + r}"

    def _group(self, j: int) -> tuple[list[Any], list[Any] | None]:
        if j in self._cache:
            self._cache.move_to_end(j)
            return self._cache[j]
        f, g = self.groups[j]
        cols = [c for c in (self.image_column, self.caption_column) if c]
        table = _pyarrow_parquet().ParquetFile(self.paths[f]).read_row_group(g, columns=cols)
        images = table.column(self.image_column).to_pylist()
        caps = table.column(self.caption_column).to_pylist() if self.caption_column else None
        self._cache[j] = (images, caps)
        while len(self._cache) > ROW_GROUP_CACHE:
            self._cache.popitem(last=False)
        return images, caps

    def read(self, i: int) -> bytes:
        j, r = self._locate(i)
        value = self._group(j)[0][r]
        if isinstance(value, dict):  # HF datasets Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes")
        if isinstance(value, str):
            value = value.encode("latin-1", "replace")  # a string column: let the decoder judge
        return bytes(value) if value else b""

    def caption(self, i: int) -> str | None:
        if not self.caption_column:
            return None
        j, r = self._locate(i)
        value = self._group(j)[1][r]  # type: ignore[index]
        return value if isinstance(value, str) else None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": OrderedDict()}


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq  # optional: only Parquet sources need it
    except ImportError:
        raise UserError("Parquet sources need pyarrow: pip install pyarrow "
                        "(or install reca with the 'parquet' extra)") from None
    return pq


def expand_braces(pattern: str) -> list[str]:
    """'s-{000..002}.tar' -> s-000.tar s-001.tar s-002.tar; '{a,b}' -> a b (nesting allowed).
    Numeric ranges keep the zero padding of their first bound."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.groups()
        items = [str(k).zfill(len(a)) for k in range(int(a), int(b) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def tar_index_dir(setting: str) -> str:
    """The folder tar indexes are cached in: `setting` ("" = no cache); left at its default,
    $RECA_CACHE_DIR/tar_index when that variable is set (a shared or scratch cache)."""
    env = os.environ.get("RECA_CACHE_DIR", "")
    if setting == TAR_INDEX_CACHE and env:
        return os.path.join(os.path.abspath(os.path.expanduser(env)), "tar_index")
    return os.path.abspath(os.path.expanduser(setting)) if setting else ""


def open_one(spec: str, cfg: Any = None) -> ImageSource:
    """One source from a spec: 'demo', a folder, a .tar, a folder of *.tar shards, a .parquet,
    a folder of *.parquet files, or a brace/glob pattern of .tar or .parquet files."""
    if spec == "demo":
        return DemoSource()
    if spec.endswith(".json"):
        from reca.engine.data.conversations import LlavaSource

        return LlavaSource(spec, getattr(cfg, "json_image_root", ""))
    index_cache = tar_index_dir(getattr(cfg, "tar_index_cache", TAR_INDEX_CACHE))
    image_col = getattr(cfg, "parquet_image_column", "image")
    caption_col = getattr(cfg, "parquet_caption_column", "")
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        shards = sorted(glob.glob(os.path.join(path, "*.tar")))
        tables = sorted(glob.glob(os.path.join(path, "*.parquet")))
        if shards:
            return TarSource(shards, index_cache)
        if tables:
            return ParquetSource(tables, image_col, caption_col)
        return FolderSource(spec)
    if any(c in path for c in "{*?["):
        files = sorted({f for p in expand_braces(path) for f in glob.glob(p)})
        if not files:
            raise UserError(f"data source {spec!r}: the pattern matches no files")
    else:
        files = [path]
    if all(f.endswith(".tar") for f in files):
        for f in files:
            if not os.path.isfile(f):
                raise UserError(f"data source {spec!r}: no such tar shard {f!r}")
        return TarSource(files, index_cache)
    if all(f.endswith(".parquet") for f in files):
        return ParquetSource(files, image_col, caption_col)
    return FolderSource(spec)  # its own errors: no such folder, a file not a folder
