"""Which sample each stream position reads: a pure function of (seed, position).

    order = Order(sources, weights, seed=cfg.seed, window=cfg.shuffle_window)
    s, i = order.locate(p)        # position p reads sample i of source s

Mixing (several sources): positions are cut into blocks of MIX_BLOCK. Every block holds the
same number of slots per source (largest-remainder apportionment of the weights, at least one
slot for each source), in an order shuffled by (seed, block). So source s's local position for
global position p is `block * slots_s + (earlier slots of s in this block)`: closed form, no
history, and weights hold exactly over every block (resolution 1 / MIX_BLOCK).

Within a source, local position q reads `perm_e[q % n]`, `perm_e` a permutation seeded by
(seed, epoch e = q // n[, source]). Sources with `block_starts` (Parquet row groups) get a
locality-aware permutation when `window` > 0: row groups are shuffled, then rows are shuffled
within each run of `window` consecutive (shuffled) row groups, so a worker decodes each row
group about once per window instead of once per row.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from reca.engine.errors import UserError

MIX_BLOCK = 1024  # positions per mixing block: weights are exact over each block


def parse_source_spec(spec: str) -> list[tuple[str, float]]:
    """'a/:0.7,b.tar:0.3' -> [('a/', 0.7), ('b.tar', 0.3)]; weights default to 1, any scale.

    Entries are split on commas outside braces (so 's-{a,b}.tar' stays one entry); a weight is
    a trailing ':NUMBER'.
    """
    parts, depth, cur = [], 0, ""
    for c in spec:
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    parts.append(cur)
    out = []
    for part in (p.strip() for p in parts):
        m = re.fullmatch(r"(.*):\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)", part)
        name, weight = (m.group(1).strip(), float(m.group(2))) if m else (part, 1.0)
        if not name:
            raise UserError(f"data.source {spec!r}: an empty entry")
        if not weight > 0:
            raise UserError(f"data.source {spec!r}: weight of {name!r} must be > 0")
        out.append((name, weight))
    return out


def apportion(weights: list[float], total: int) -> np.ndarray:
    """Integer slots per source summing to `total`, proportional to weights, each >= 1."""
    w = np.asarray(weights, np.float64) / sum(weights)
    k = len(w)
    if total < k:
        raise UserError(f"at most {total} sources can be mixed")
    exact = w * (total - k)  # one slot each first, the rest by largest remainder
    slots = np.floor(exact).astype(np.int64)
    rest = np.argsort(-(exact - slots), kind="stable")[: total - k - int(slots.sum())]
    slots[rest] += 1
    return slots + 1


def epoch_permutation(n: int, rng: np.random.Generator, block_starts: np.ndarray | None,
                      window: int) -> np.ndarray:
    """[n] int64: a full shuffle, or the row-group-window shuffle described above."""
    if block_starts is None or window <= 0 or len(block_starts) <= 1:
        return rng.permutation(n)
    ends = np.append(block_starts[1:], n)
    blocks = rng.permutation(len(block_starts))
    runs = []
    for w0 in range(0, len(blocks), window):
        rows = np.concatenate([np.arange(block_starts[b], ends[b]) for b in blocks[w0: w0 + window]])
        runs.append(rng.permutation(rows))
    return np.concatenate(runs)


class Order:
    """position -> (source, sample); caches one permutation per source and one mixing block."""

    def __init__(self, sources: list[Any], weights: list[float], *, seed: int, window: int = 0):
        self.sizes = [len(s) for s in sources]
        self.blocks = [getattr(s, "block_starts", None) for s in sources]
        self.seed, self.window = seed, window
        self.mixed = len(sources) > 1
        self.slots = apportion(weights, MIX_BLOCK) if self.mixed else np.array([MIX_BLOCK])
        self._perm: list[tuple[int, np.ndarray]] = [(-1, np.empty(0, np.int64)) for _ in sources]
        self._block: tuple[int, np.ndarray, np.ndarray] = (-1, np.empty(0), np.empty(0))

    def locate(self, position: int) -> tuple[int, int]:
        if not self.mixed:
            return 0, self._sample(0, position)
        b, j = divmod(position, MIX_BLOCK)
        if self._block[0] != b:
            slot_src = np.random.default_rng([self.seed, 2, b]).permutation(
                np.repeat(np.arange(len(self.sizes)), self.slots))
            before = np.zeros(MIX_BLOCK, np.int64)  # earlier slots of the same source
            for s in range(len(self.sizes)):
                mine = slot_src == s
                before[mine] = np.arange(int(mine.sum()))
            self._block = (b, slot_src, before)
        s = int(self._block[1][j])
        return s, self._sample(s, b * int(self.slots[s]) + int(self._block[2][j]))

    def _sample(self, s: int, q: int) -> int:
        n = self.sizes[s]
        epoch = q // n
        if self._perm[s][0] != epoch:
            key = [self.seed, 0, epoch] + ([s] if self.mixed else [])  # single source: as before
            perm = epoch_permutation(n, np.random.default_rng(key), self.blocks[s], self.window)
            self._perm[s] = (epoch, perm)
        return int(self._perm[s][1][q % n])
