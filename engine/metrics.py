"""What a user looks at: RUN/metrics.jsonl (one row per step), TensorBoard when installed,
RUN/loss.png, RUN/alignment.png and the reconstruction grids RUN/recon_step{N}.png."""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reca.engine.errors import UserError

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends rows to RUN/metrics.jsonl, one JSON object a line. On resume the lines past the
    checkpoint's step go (the resumed run writes them again), and so does a torn last line a
    kill mid-write left: the next line written is always valid JSON on its own line.
    `append=True` leaves the file as it is (the previewer's rows, written beside the loop's)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int = 0, *, append: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        if not append and resume_step == 0:
            self.path.unlink(missing_ok=True)
        elif not append:
            self._truncate(resume_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def _truncate(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [row for row in read_metrics(self.path.parent) if row["step"] <= step]
        text = "".join(json.dumps(row) + "\n" for row in keep)
        # atomically: a kill during this rewrite must not lose the lines before the checkpoint
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write(self, rows: list[dict]) -> None:
        with self.path.open("a") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))  # one write: a kill tears one line at most
        if self.tb is not None:
            for row in rows:
                for key, value in row.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of RUN/metrics.jsonl, one per step in step order: lines of the same step are
    merged (the loop's readback and a preview's alignment numbers are written apart, in either
    order). A last line that does not parse (a kill mid-write tore it) is skipped; a bad line
    anywhere else is a one-line `UserError` naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a row with a step")
        except ValueError:
            if i == len(lines) - 1:
                break  # torn by a kill: the resumed run writes it again
            raise UserError(f"{path} line {i + 1} is not a metrics row (edited by hand?)") from None
        rows.append(row)
    merged: dict[int, dict] = {}
    for row in rows:
        merged.setdefault(row["step"], {}).update(row)
    return sorted(merged.values(), key=lambda r: r["step"])


def plot_loss(run_dir: str | Path) -> Path | None:
    """loss.png from metrics.jsonl; None (and a log line) where matplotlib is not installed, e.g.
    a GPU image that runs the checkout without installing it: the metrics are what count."""
    rows = [r for r in read_metrics(run_dir) if "loss" in r and math.isfinite(r["loss"])]
    if not rows:
        return None
    plt = _pyplot("loss.png")
    if plt is None:
        return None
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.4, label="loss")
    k = max(1, len(loss) // 50)
    if k > 1:
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.6, label=f"mean of {k}")
    ax.set_ylabel("generation loss")
    ax.set_yscale("log")
    return _save(plt, fig, ax, Path(run_dir) / "loss.png")


def plot_alignment(run_dir: str | Path) -> Path | None:
    """alignment.png from metrics.jsonl: reconstruction PSNR from each preview image's own visual
    prompt and from another image's, by step (the gap between them is the alignment). None
    where there is no preview row yet or matplotlib is missing."""
    rows = [r for r in read_metrics(run_dir) if "align/psnr_own" in r]
    if not rows:
        return None
    plt = _pyplot("alignment.png")
    if plt is None:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [r["align/psnr_own"] for r in rows], "o-", label="own visual prompt")
    shuffled = [r for r in rows if "align/psnr_shuffled" in r]
    if shuffled:
        ax.plot([r["step"] for r in shuffled], [r["align/psnr_shuffled"] for r in shuffled], "s--",
                label="another image's visual prompt")
    ax.set_ylabel("reconstruction PSNR (dB)")
    ax.set_title("alignment: generation from the model's own understanding")
    return _save(plt, fig, ax, Path(run_dir) / "alignment.png")


def _pyplot(name: str):
    """matplotlib.pyplot drawing to files only (no display on training machines), or None and a
    log line where matplotlib is not installed (a GPU image running the checkout uninstalled:
    the numbers in metrics.jsonl are what count)."""
    try:
        import matplotlib
    except ImportError:
        log.warning(f"matplotlib is not installed: no {name} (the numbers are in metrics.jsonl)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, out: Path) -> Path:
    """The plots' common frame (steps on x, a grid, the legend), written to `out`."""
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def save_grid(columns: list[torch.Tensor], path: str | Path, pad: int = 2) -> Path:
    """Images [N, 3, H, W] in [-1, 1], one tensor per column (input | reconstruction ...) -> PNG."""
    cols = [((c.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8) for c in columns]
    n, _, h, w = cols[0].shape
    grid = np.full((n * (h + pad) + pad, len(cols) * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for j, col in enumerate(cols):
        for i in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = col[i].permute(1, 2, 0).numpy()
    scale = max(1, 128 // h)  # tiny previews are upscaled (nearest) so they can be seen
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    img.save(path)
    return path
