"""reca.engine.data_sources / data_order: tar shards, Parquet, captions, hostile input, mixing.

Every file is generated in tmp_path. Resume tests compare the sequences of sample keys of an
interrupted run with an uninterrupted one: nothing may be skipped or repeated.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from reca.engine.data import TarSource, build_loader, open_source
from reca.engine.data_order import MIX_BLOCK, Order, apportion, parse_source_spec
from reca.engine.data_sources import expand_braces
from reca.engine.errors import UserError
from test_data import VIEWS, broken_images, cfg, encode, photo, photos


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
