"""reca.engine.data.sources / data_order: tar shards, Parquet, captions, hostile input, mixing.

Every file is generated in tmp_path. Resume tests compare the sequences of sample keys of an
interrupted run with an uninterrupted one: nothing may be skipped or repeated.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from reca.engine.data import sources as data_sources
from reca.engine.data import TarSource, build_loader, open_source
from reca.engine.data.order import MIX_BLOCK, Order, apportion, parse_source_spec
from reca.engine.data.sources import TAR_INDEX_CACHE, expand_braces, tar_index_dir
from reca.engine.errors import UserError
from test_data import VIEWS, cfg, encode, photo, photos


@pytest.fixture(autouse=True)
def index_cache(tmp_path_factory, monkeypatch):
    """Every test caches tar indexes in its own folder (never the home directory, never beside
    the data) and starts as a fresh run: no warning counts as already given."""
    root = tmp_path_factory.mktemp("reca_cache")
    monkeypatch.setenv("RECA_CACHE_DIR", str(root))
    monkeypatch.setattr(data_sources, "_WARNED", set())
    return root / "tar_index"


def jpeg(seed: int) -> bytes:
    return encode(Image.fromarray(photo(seed=seed)), "JPEG")


def add(tf: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = (len(data) if kind == tarfile.REGTYPE else 0), kind, link
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def shard(path, start: int, n: int, extra=()) -> str:
    with tarfile.open(path, "w") as tf:
        for i in range(start, start + n):
            add(tf, f"s{i:03d}.jpg", jpeg(i))
            if i % 2:
                add(tf, f"s{i:03d}.txt", f"caption {i}".encode())
            else:
                add(tf, f"s{i:03d}.json", json.dumps({"caption": f"json {i}"}).encode())
        for args in extra:
            add(tf, *args)
    return str(path)


def parquet(path, start: int, n: int, struct: bool = False, bad_row: int = -1, group: int = 4) -> str:
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    imgs = [b"not an image" if i == bad_row else jpeg(i) for i in range(start, start + n)]
    col = pa.array([{"bytes": b, "path": f"x{i}.jpg"} for i, b in enumerate(imgs)]) if struct else pa.array(imgs, pa.binary())
    table = pa.table({"image": col, "text": [f"row {i}" for i in range(start, start + n)]})
    pq.write_table(table, path, row_group_size=group)
    return str(path)


def keys_of(loader, batches: int) -> list[str]:
    return [k for _ in range(batches) for k in next(loader).keys]


def resume_keys(c, split: int, total: int, workers: int = 0) -> tuple[list[str], list[str]]:
    """(keys of `total` batches straight, keys of `split` batches + resume + the rest)."""
    straight = keys_of(build_loader(c, VIEWS), total)
    first = build_loader(c, VIEWS)
    part = keys_of(first, split)
    second = build_loader(c, VIEWS)
    second.load_state_dict(first.state_dict())
    return straight, part + keys_of(second, total - split)


# ---- tar ------------------------------------------------------------------------------------


def test_tar_members_captions_and_hostile_names(tmp_path, caplog):
    hostile = [("/etc/passwd.jpg", jpeg(50)), ("../../escape.jpg", jpeg(51)),
               ("link.jpg", b"", tarfile.SYMTYPE, "/etc/passwd"), ("dev.jpg", b"", tarfile.CHRTYPE),
               ("bad\nname.jpg", jpeg(52)), ("broken.jpg", b"<html>"), ("noext", b"x")]
    path = shard(tmp_path / "a.tar", 0, 4, hostile)
    src = open_source(path)
    keys = [src.key(i) for i in range(len(src))]
    assert "a.tar/link" not in keys and "a.tar/dev" not in keys  # links/devices: never read
    assert "a.tar//etc/passwd" in keys and "a.tar/../../escape" in keys  # plain strings only
    assert "a.tar/bad?name" in keys  # control characters never reach a log line
    assert src.caption(keys.index("a.tar/s001")) == "caption 1"
    assert src.caption(keys.index("a.tar/s002")) == "json 2"
    assert src.read(keys.index("a.tar/s003")) == jpeg(3)
    assert not (tmp_path / "escape.jpg").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"]
    loader = build_loader(cfg(path), VIEWS)
    with caplog.at_level(logging.WARNING, logger="reca.engine.data"):
        batches = [next(loader) for _ in range(3)]
    pairs = {k: c for b in batches for k, c in zip(b.keys, b.captions)}
    assert all(len(b.captions) == 4 for b in batches) and pairs.get("a.tar/s001", "caption 1") == "caption 1"
    assert all(c is None for k, c in pairs.items() if not k.startswith("a.tar/s0"))
    assert loader.skipped >= 1 and sum("broken" in r.getMessage() for r in caplog.records) == 1


def test_truncated_tar_keeps_its_complete_samples(tmp_path, caplog):
    path = shard(tmp_path / "t.tar", 0, 8)
    data = (tmp_path / "t.tar").read_bytes()
    whole = TarSource([path])
    cut = int(whole.off[5]) + 10  # inside sample 5's image
    (tmp_path / "t.tar").write_bytes(data[:cut])
    with caplog.at_level(logging.WARNING, logger="reca.engine.data"):
        src = TarSource([path])
    assert [src.key(i) for i in range(len(src))] == [f"t.tar/s{i:03d}" for i in range(5)]
    assert any("truncated" in r.getMessage() for r in caplog.records)
    batch = next(build_loader(cfg(path, batch_size=7), VIEWS))
    assert len(batch.keys) == 7  # 5 samples, a second epoch fills the batch


def test_a_tar_cut_inside_a_header_warns_as_a_cut_inside_a_member(tmp_path, caplog):
    """tarfile ends quietly at a header cut short: the shard's tail is looked at, and a cut
    header is a truncated shard like any other (its complete samples kept, one warning)."""
    path = shard(tmp_path / "h.tar", 0, 8)
    data = (tmp_path / "h.tar").read_bytes()
    image = int(TarSource([path]).off[5])  # sample 5's image data; its header is the 512 bytes before
    header = image - 512
    (tmp_path / "h.tar").write_bytes(data[:header + 100])  # inside the 512-byte header
    with caplog.at_level(logging.WARNING, logger="reca.engine.data"):
        src = TarSource([path])
    assert [src.key(i) for i in range(len(src))] == [f"h.tar/s{i:03d}" for i in range(5)]
    assert any("truncated" in r.getMessage() and "header" in r.getMessage() for r in caplog.records), caplog.text


def test_tar_specs_directory_brace_and_glob(tmp_path):
    for k in range(3):
        shard(tmp_path / f"s-{k:03d}.tar", 10 * k, 2)
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert len(open_source(str(tmp_path))) == 6
    assert len(open_source(str(tmp_path / "s-{000..001}.tar"))) == 4
    assert len(open_source(str(tmp_path / "s-*.tar"))) == 6
    with pytest.raises(UserError, match="matches no files"):
        open_source(str(tmp_path / "x-*.tar"))


@pytest.mark.parametrize("workers", [0, 2])
def test_tar_resume_is_exact(tmp_path, workers):
    shard(tmp_path / "a.tar", 0, 5, [("bad.jpg", b"")]); shard(tmp_path / "b.tar", 5, 6)
    straight, resumed = resume_keys(cfg(tmp_path, batch_size=3, num_workers=workers), 3, 7)
    assert straight == resumed and len(set(straight[:11])) == 11  # one epoch, no repeats


# ---- tar index cache ------------------------------------------------------------------------


def same_index(a: TarSource, b: TarSource) -> None:
    assert a.keys == b.keys
    for name in ("shard", "off", "size", "cap_off", "cap_size", "cap_kind"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def count_scans(monkeypatch) -> list[str]:
    scanned: list[str] = []
    real = data_sources._scan_shard

    def scan(path):
        scanned.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(data_sources, "_scan_shard", scan)
    return scanned


def no_scans(monkeypatch) -> None:
    def scan(path):
        raise AssertionError(f"{path} was scanned: the cache was not used")

    monkeypatch.setattr(data_sources, "_scan_shard", scan)


def test_tar_index_cache_is_used_and_equals_a_scan(tmp_path, index_cache, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    shard(data / "a.tar", 0, 5, [("bad\nname.jpg", jpeg(52)), ("noext", b"x")])
    shard(data / "b.tar", 5, 3)
    before = sorted(p.name for p in data.iterdir())
    scanned = count_scans(monkeypatch)
    first = open_source(str(data))
    assert sorted(scanned) == ["a.tar", "b.tar"] and len(list(index_cache.glob("*.npz"))) == 2
    assert sorted(p.name for p in data.iterdir()) == before  # nothing written beside the data
    assert not list(index_cache.glob("*.tmp"))
    no_scans(monkeypatch)
    cached = open_source(str(data))
    same_index(cached, first)
    monkeypatch.undo()
    same_index(cached, TarSource(sorted(str(p) for p in data.glob("*.tar"))))  # no cache at all
    assert cached.read(cached.keys.index("a.tar/bad?name")) == jpeg(52)
    assert cached.caption(cached.keys.index("b.tar/s005")) == "caption 5"


def test_a_changed_shard_is_rescanned(tmp_path, monkeypatch):
    shard(tmp_path / "a.tar", 0, 4)
    shard(tmp_path / "b.tar", 4, 2)
    open_source(str(tmp_path))
    st = os.stat(tmp_path / "a.tar")
    shard(tmp_path / "a.tar", 10, 6)  # rewritten in place: new contents, new size
    os.utime(tmp_path / "a.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    scanned = count_scans(monkeypatch)
    src = open_source(str(tmp_path))
    assert scanned == ["a.tar"]  # b.tar came from the cache
    assert src.keys == [f"a.tar/s{i:03d}" for i in range(10, 16)] + ["b.tar/s004", "b.tar/s005"]
    assert src.read(0) == jpeg(10)
    same_index(src, TarSource([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]))
    shard(tmp_path / "b.tar", 20, 2)  # same size, only the mtime tells
    os.utime(tmp_path / "b.tar", ns=(0, os.stat(tmp_path / "b.tar").st_mtime_ns + 5_000_000))
    scanned.clear()
    assert open_source(str(tmp_path)).keys[-2:] == ["b.tar/s020", "b.tar/s021"] and scanned == ["b.tar"]


@pytest.mark.parametrize("damage", ["garbage", "cut", "empty"])
def test_a_corrupt_cache_file_is_rescanned_with_one_warning(tmp_path, index_cache, monkeypatch, caplog, damage):
    path = shard(tmp_path / "a.tar", 0, 6)
    reference = open_source(path)
    (entry,) = index_cache.glob("*.npz")
    raw = entry.read_bytes()
    entry.write_bytes({"garbage": b"\x00garbage" * 50, "cut": raw[: len(raw) // 2], "empty": b""}[damage])
    scanned = count_scans(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="reca.engine.data"):
        same_index(open_source(path), reference)
        entry.write_bytes(raw[: len(raw) // 3])
        same_index(open_source(path), reference)
    assert scanned == ["a.tar", "a.tar"]
    assert sum("tar index cache" in r.getMessage() for r in caplog.records) == 1
    no_scans(monkeypatch)  # the entry was rewritten whole
    same_index(open_source(path), reference)


def test_an_unwritable_cache_folder_falls_back_to_scanning(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_bytes(b"x")  # a file where a folder should be: fails for root too
    path = shard(tmp_path / "a.tar", 0, 4)
    c = cfg(path, tar_index_cache=str(blocker / "tar_index"))
    scanned = count_scans(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="reca.engine.data"):
        loaders = [build_loader(c, VIEWS) for _ in range(2)]
        keys = [next(l).keys for l in loaders]
    assert scanned == ["a.tar", "a.tar"] and keys[0] == keys[1]
    warned = [r.getMessage() for r in caplog.records if "tar index cache" in r.getMessage()]
    assert len(warned) == 1 and "cannot write" in warned[0] and "\n" not in warned[0]
    same_index(loaders[0].samples.sources[0], TarSource([path]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "not_a_folder"]


def test_a_truncated_shard_from_the_cache_is_the_same_and_still_named(tmp_path, monkeypatch, caplog):
    path = shard(tmp_path / "t.tar", 0, 8)
    cut = int(TarSource([path]).off[5]) + 10
    (tmp_path / "t.tar").write_bytes((tmp_path / "t.tar").read_bytes()[:cut])
    truncated = lambda: sum("truncated" in r.getMessage() for r in caplog.records)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="reca.engine.data"):
        scanned = open_source(path)
        again = open_source(path)  # the same run: named once
        assert truncated() == 1
        monkeypatch.setattr(data_sources, "_WARNED", set())  # a new run, reading the cache
        no_scans(monkeypatch)
        cached = open_source(path)
        assert truncated() == 2
    assert scanned.keys == [f"t.tar/s{i:03d}" for i in range(5)]
    same_index(cached, scanned)
    same_index(again, scanned)


def test_tar_index_folder_setting_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RECA_CACHE_DIR", str(tmp_path / "env"))
    assert tar_index_dir(TAR_INDEX_CACHE) == str(tmp_path / "env" / "tar_index")
    assert tar_index_dir(str(tmp_path / "mine")) == str(tmp_path / "mine")  # a set value wins
    assert tar_index_dir("") == ""
    monkeypatch.delenv("RECA_CACHE_DIR")
    assert tar_index_dir(TAR_INDEX_CACHE) == os.path.expanduser("~/.cache/reca/tar_index")
    path = shard(tmp_path / "a.tar", 0, 2)
    open_source(path, cfg(path, tar_index_cache=""))
    open_source(path, cfg(path, tar_index_cache=str(tmp_path / "mine")))
    assert not (tmp_path / "env").exists() and len(list((tmp_path / "mine").glob("*.npz"))) == 1


# ---- parquet --------------------------------------------------------------------------------


@pytest.mark.parametrize("struct", [False, True])
def test_parquet_bytes_and_hf_struct_with_captions_and_a_bad_row(tmp_path, struct, caplog):
    path = parquet(tmp_path / "d.parquet", 0, 10, struct=struct, bad_row=3)
    c = cfg(path, parquet_caption_column="text", batch_size=5)
    loader = build_loader(c, VIEWS)
    with caplog.at_level(logging.WARNING, logger="reca.engine.data"):
        batches = [next(loader) for _ in range(4)]
    keys = [k for b in batches for k in b.keys]
    assert "d.parquet#3" not in keys and set(keys) == {f"d.parquet#{i}" for i in range(10) if i != 3}
    for b in batches:
        assert all(cap == f"row {int(k.split('#')[1])}" for k, cap in zip(b.keys, b.captions))
    assert sum("d.parquet#3" in r.getMessage() for r in caplog.records) == 1


def test_parquet_resume_and_row_group_window(tmp_path):
    parquet(tmp_path / "a.parquet", 0, 12); parquet(tmp_path / "b.parquet", 12, 9, bad_row=15)
    c = cfg(tmp_path, batch_size=4, shuffle_window=2)
    straight, resumed = resume_keys(c, 3, 8)
    assert straight == resumed
    src = open_source(str(tmp_path))
    order = Order([src], [1.0], seed=0, window=2)
    rows = [order.locate(p)[1] for p in range(len(src))]
    assert sorted(rows) == list(range(21))
    groups = [int(np.searchsorted(src.block_starts, r, side="right")) - 1 for r in rows]
    assert len(set(groups[:8])) <= 2  # the first 8 rows come from one window of 2 row groups


def test_parquet_errors_are_user_errors(tmp_path):
    path = parquet(tmp_path / "d.parquet", 0, 2)
    with pytest.raises(UserError, match="no column 'img'"):
        build_loader(cfg(path, parquet_image_column="img"), VIEWS)
    (tmp_path / "x.parquet").write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot open Parquet"):
        open_source(str(tmp_path / "x.parquet"))


# ---- mixing ---------------------------------------------------------------------------------


def test_source_spec_parsing_and_apportionment():
    assert parse_source_spec("a/:0.7,b-{0..3}.tar:0.3") == [("a/", 0.7), ("b-{0..3}.tar", 0.3)]
    assert parse_source_spec("demo") == [("demo", 1.0)]
    slots = apportion([0.7, 0.3, 1e-9], MIX_BLOCK)
    assert slots.sum() == MIX_BLOCK and slots[2] == 1 and abs(slots[0] / MIX_BLOCK - 0.7) < 0.002
    with pytest.raises(UserError):
        parse_source_spec("a:0,b:1")


def test_weighted_mix_follows_weights_and_resumes_exactly(tmp_path):
    folder = photos(tmp_path / "f", 6)
    tar = shard(tmp_path / "t.tar", 0, 5)
    spec = f"{folder}:0.75,{tar}:0.25"
    c = cfg(spec, batch_size=8)
    straight, resumed = resume_keys(c, 5, 12)
    assert straight == resumed
    share = sum(k.startswith("0:") for k in straight) / len(straight)
    assert abs(share - 0.75) < 0.08
    order = Order([range(6), range(5)], [0.75, 0.25], seed=0)  # every local position once, in order
    seen = [order.locate(p) for p in range(2 * MIX_BLOCK)]
    tars = [i for s, i in seen if s == 1]
    assert all(sorted(tars[k: k + 5]) == list(range(5)) for k in range(0, len(tars) - 5, 5))
