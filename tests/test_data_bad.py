"""Bad samples are remembered: each broken file is read once, warned once and counted once
(`loader.skipped` counts distinct files) over runs of several epochs, with and without worker
processes, and the known-bad set travels in `state_dict()` so that resume stays exact.
"""
from __future__ import annotations

import io
import logging

import pytest
import torch

from reca.engine.data import FolderSource, Loader, build_loader
from test_data import VIEWS, assert_same, broken_images, cfg, copied, photos, producer_idle, take, write

BAD = {"broken.jpg": b"nope", "page.png": b"<!doctype html><html></html>", "tiny.png": broken_images()["tiny.png"]}


class Logged(FolderSource):
    """A folder whose reads are appended to a log file: counts them across worker processes."""

    def __init__(self, root, log_path):
        super().__init__(str(root))
        self.log_path = str(log_path)

    def read(self, i):
        with open(self.log_path, "a") as f:  # one short O_APPEND write per read: no interleaving
            f.write(self.key(i) + "\n")
        return super().read(i)


def reads(log_path) -> dict[str, int]:
    lines = log_path.read_text().split() if log_path.exists() else []
    return {k: lines.count(k) for k in set(lines)}


def warned(caplog) -> dict[str, int]:
    return {name: sum(name in r.getMessage() for r in caplog.records) for name in BAD}


def checkpointed(state: dict) -> dict:
    """The state as a checkpoint gives it back (torch.save, then torch.load with weights_only)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_counted_once_and_resume_stays_exact(tmp_path, caplog, workers):
    root = write(photos(tmp_path, 6), BAD)  # 9 files: each epoch passes 3 bad positions
    c = cfg(root, batch_size=3, num_workers=workers)
    loaders = []
    try:
        straight = build_loader(c, VIEWS)
        loaders.append(straight)
        with caplog.at_level(logging.WARNING, logger="reca.engine.data"):
            ref = take(straight, 14)  # 42 good samples: 7 epochs of the 6 good files
        state = straight.state_dict()
        assert state["position"] - 42 >= 3 * 6  # bad positions passed over in >= 6 whole epochs
        assert straight.skipped == state["skipped"] == len(state["bad"]) == 3
        assert warned(caplog) == {name: 1 for name in BAD}
        src = FolderSource(str(root))
        assert sorted(src.key(i) for _, i in state["bad"]) == sorted(BAD)
        found = []
        for split in (1, 5):  # in the first epoch (not all found yet), and after it
            first = build_loader(c, VIEWS)
            loaders.append(first)
            part = [copied(b) for b in take(first, split)]
            saved = checkpointed(first.state_dict())
            known = {src.key(i) for _, i in saved["bad"]}
            found.append(len(known))
            caplog.clear()
            resumed = build_loader(c, VIEWS)
            loaders.append(resumed)
            resumed.load_state_dict(saved)
            assert resumed.skipped == saved["skipped"] == len(known)
            with caplog.at_level(logging.WARNING, logger="reca.engine.data"):
                assert_same(ref, part + take(resumed, len(ref) - split))
            assert resumed.skipped == 3 and resumed.state_dict() == state
            assert warned(caplog) == {name: int(name not in known) for name in BAD}  # the rest, once
        assert found[0] < 3 == found[1]  # both cases happened
    finally:
        for loader in loaders:
            loader.close()


def test_a_bad_file_is_never_read_again(tmp_path):
    """In process: one read of each bad file over 7 epochs, none after a resume that knows it."""
    root = write(photos(tmp_path, 6), BAD)
    c = cfg(root, batch_size=3)
    log_path = tmp_path.parent / f"{tmp_path.name}.reads"
    loader = Loader(Logged(root, log_path), VIEWS, c, cache_bytes=0)  # good files are read every time
    take(loader, 14)
    n = reads(log_path)
    assert {k: n[k] for k in BAD} == {k: 1 for k in BAD} and n["img00.png"] == 7
    log_path.unlink()
    resumed = Loader(Logged(root, log_path), VIEWS, c, cache_bytes=0)
    resumed.load_state_dict(loader.state_dict())
    take(resumed, 6)
    n = reads(log_path)
    assert not any(k in n for k in BAD) and sum(n.values()) == 18


def test_workers_read_a_bad_file_once_and_report_it_to_the_main_process(tmp_path, caplog):
    """Two workers, each with its own memo: the main process remembers what either found, and its
    sampler sends known-bad positions to neither (before, each worker decoded each bad file)."""
    root = write(photos(tmp_path, 29), BAD)  # 32 files
    # A position dispatched before its file was found bad reads it again. Batches of 2 keep 4
    # positions in flight; with seed 10 a bad file comes back at the earliest 25 positions later.
    c = cfg(root, batch_size=2, num_workers=2, seed=10)
    log_path = tmp_path.parent / f"{tmp_path.name}.reads"
    loader = Loader(Logged(root, log_path), VIEWS, c, cache_bytes=0)
    try:
        with caplog.at_level(logging.WARNING, logger="reca.engine.data"):
            batches = take(loader, 50)  # 100 good samples: 3.4 epochs
        assert loader.skipped == 3 and warned(caplog) == {name: 1 for name in BAD}
        n = reads(log_path)
        assert {k: n[k] for k in BAD} == {k: 1 for k in BAD}
        assert all(k not in BAD for b in batches for k in b.keys)
    finally:
        loader.close()


def test_a_state_from_before_bad_files_were_remembered_still_loads(tmp_path):
    root = write(photos(tmp_path, 6), BAD)
    c = cfg(root, batch_size=3)
    straight = build_loader(c, VIEWS)
    ref = take(straight, 8)
    first = build_loader(c, VIEWS)
    part = take(first, 3)
    old = {"position": first.state_dict()["position"], "skipped": 5}  # the old format: skip events
    resumed = build_loader(c, VIEWS)
    resumed.load_state_dict(old)
    assert resumed.skipped == 0  # none known: found again as they are read, counted from zero
    assert_same(ref, part + take(resumed, 5))  # the same samples: skipping never moved the order
    assert resumed.skipped == 3


def test_prefetch_state_counts_only_what_the_taken_batches_found(tmp_path):
    """The producer thread runs ahead: a bad file it meets in a batch not yet taken is neither
    in `skipped` nor in the state, and a rewind (close) finds it again in order."""
    root = write(photos(tmp_path, 6), BAD)
    c = cfg(root, batch_size=3)
    inline = build_loader(c, VIEWS)
    states = []
    for _ in range(6):
        next(inline)
        states.append(inline.state_dict())
    k0 = next(k for k in range(5) if states[k + 1]["skipped"] > states[k]["skipped"])
    ahead = Loader(FolderSource(str(root)), VIEWS, c, hold=1, prefetch=True)
    try:
        for k in range(6):
            next(ahead)
            if k == k0:
                producer_idle(ahead, 1)  # batch k0 + 1, which finds a new bad file, is prefetched
                assert len(ahead._bad_order) > ahead.state_dict()["skipped"]
            assert ahead.state_dict() == states[k] and ahead.skipped == states[k]["skipped"], k
            if k == k0:
                ahead.close()  # drops the prefetched batch: iteration goes on from the step
    finally:
        ahead.close()
