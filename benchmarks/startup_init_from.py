"""Start-up of an FSDP job with `--init-from`: rank 0's host memory and the time to a built,
filled model, with rank 0's whole copy (`distributed.init_from_shards=false`, as before) and with
every rank reading its own shards from the files (`=true`, the default), in the same run.

    python benchmarks/startup_init_from.py [--layers 12] [--out FILE]

A BAGEL release directory as downloaded (`ema.safetensors`, its configs and tokenizer; written
here from a seeded donor) of a bagel-tiny widened to 1024 (12 MoT layers by default: ~270M
parameters, 1.1 GB in fp32), then for each mode one `torchrun --nproc-per-node 2` job on the CPU
(gloo) that trains one step. Rank 0 reports, at the moment its model is built and filled
(`apply_strategy`, after the frozen weights' fingerprint): the seconds since `train_distributed`
began, its peak resident memory (VmHWM) and the peak of its anonymous memory (RssAnon sampled
every 5 ms: what a whole copy costs; the file pages a read leaves in the page cache are not the
process's), each also above the same process's memory before the start-up, and the bytes of
the rank's own shards, buffers and EMA (host memory here, device memory on a GPU). CPU figures:
the GPU job's host memory differs by those and the CUDA context, not by the copy.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SETS = ["model.llm.hidden_size=1024", "model.llm.intermediate_size=2816", "model.llm.num_heads=16",
        "model.llm.num_kv_heads=4", "data.batch_size=2", "data.num_workers=0", "train.device=cpu",
        "output.tensorboard=false", "output.preview_images=0", "sample.max_text_tokens=64"]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _own_state(c) -> int:
    """Bytes of this rank's shards, buffers and EMA shards: on the CPU they are host memory too."""
    from torch.distributed.tensor import DTensor

    local = [p.to_local() if isinstance(p, DTensor) else p for p in c.model.parameters()]
    local += list(c.model.buffers())
    if c.ema is not None:
        local += [s.to_local() if isinstance(s, DTensor) else s for s in c.ema.shadows]
    return sum(t.numel() * t.element_size() for t in local)


def worker(root: Path, mode: str, layers: int) -> None:
    """Under torchrun: one step of bagel-tiny (widened) from the release; rank 0 writes its figures."""
    from reca.engine import distributed
    from reca.engine.config import apply_overrides
    from reca.engine.presets import preset

    peak = {"anon": _status("RssAnon")}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], _status("RssAnon"))
            time.sleep(0.005)

    before = {"hwm": _status("VmHWM"), "anon": _status("RssAnon")}
    threading.Thread(target=sample, daemon=True).start()
    figures = {}
    apply = distributed.apply_strategy

    def built(c, r):  # the model is built, filled and fingerprinted: start-up is over
        stop.set()
        figures.update(seconds=time.perf_counter() - t0, peak_rss=_status("VmHWM"), peak_anon=peak["anon"],
                       own_state=_own_state(c))
        return apply(c, r)

    distributed.apply_strategy = built
    cfg = apply_overrides(preset("bagel-tiny"), [*SETS, f"model.llm.num_layers={layers}", "train.steps=1",
                                                f"train.init_from={root / 'release'}", f"output.dir={root / mode}",
                                                f"distributed.init_from_shards={mode == 'shards'}"])
    t0 = time.perf_counter()
    distributed.train_distributed(cfg, quiet=True)
    if int(os.environ["RANK"]) == 0:
        figures.update(rss_before=before["hwm"], anon_before=before["anon"])
        (root / f"{mode}.json").write_text(json.dumps(figures))


def release(root: Path, layers: int) -> int:
    """The release directory (as tests/test_release_layouts.py writes BAGEL's) -> parameters."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from test_release_layouts import write_bagel

    from reca.engine.build import seeded_model
    from reca.engine.config import apply_overrides
    from reca.engine.presets import preset
    from reca.kernels import get_ops
    from reca.models.tokenizer import tiny_tokenizer

    tiny_tokenizer(512).save(str(root / "tokenizer"))
    cfg = apply_overrides(preset("bagel-tiny"), [*SETS, f"model.llm.num_layers={layers}",
                                                f"model.tokenizer={root / 'tokenizer'}"])
    donor = seeded_model(cfg, get_ops("torch"), torch.device("cpu"))
    (root / "release").mkdir()
    write_bagel(donor, root / "release")
    return sum(p.numel() for p in donor.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--out", help="JSON file (default: benchmarks/results/startup_init_from_cpu_<date>.json)")
    p.add_argument("--worker", nargs=2, metavar=("ROOT", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), args.worker[1], args.layers)
        return
    import torch

    root = Path(tempfile.mkdtemp(prefix="reca-startup-"))
    params = release(root, args.layers)
    size = (root / "release" / "ema.safetensors").stat().st_size
    print(f"bagel-tiny widened: {params:,} parameters, ema.safetensors {size / 2**30:.2f} GiB; 2 gloo ranks",
          flush=True)
    rows = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for mode in ("whole", "shards"):  # the baseline first
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                        __file__, "--layers", str(args.layers), "--worker", str(root), mode], check=True, env=env)
        r = json.loads((root / f"{mode}.json").read_text())
        rows[mode] = {**r, "rss_added": r["peak_rss"] - r["rss_before"],
                      "anon_added": r["peak_anon"] - r["anon_before"],
                      "anon_beyond_own_state": r["peak_anon"] - r["anon_before"] - r["own_state"]}
        print(f"  {mode:>6}: start-up {r['seconds']:6.2f} s; rank 0 peak RSS {r['peak_rss'] / 2**30:5.2f} GiB "
              f"(+{rows[mode]['rss_added'] / 2**30:.2f} over its {r['rss_before'] / 2**30:.2f} before), anonymous "
              f"peak +{rows[mode]['anon_added'] / 2**30:.2f} GiB, of which its own shards, buffers and EMA "
              f"{r['own_state'] / 2**30:.2f} (on a GPU, device memory)", flush=True)
    w, s = rows["whole"], rows["shards"]
    ratios = {"seconds": s["seconds"] / w["seconds"], "rss_added": s["rss_added"] / w["rss_added"],
              "anon_added": s["anon_added"] / w["anon_added"],
              "anon_beyond_own_state": s["anon_beyond_own_state"] / w["anon_beyond_own_state"]}
    print(f"  shards / whole: start-up {ratios['seconds']:.2f}x, added RSS {ratios['rss_added']:.2f}x, "
          f"added anonymous memory {ratios['anon_added']:.2f}x, beyond the rank's own state "
          f"{w['anon_beyond_own_state'] / 2**30:.2f} -> {s['anon_beyond_own_state'] / 2**30:.2f} GiB "
          f"({ratios['anon_beyond_own_state']:.2f}x)", flush=True)
    report = {"benchmark": "startup_init_from", "kind": "CPU, 2 gloo ranks (torchrun), not a GPU run",
              "preset": "bagel-tiny", "sets": [*SETS, f"model.llm.num_layers={args.layers}"], "parameters": params,
              "release_bytes": size, "modes": rows, "shards_over_whole": ratios, "torch": torch.__version__,
              "date": _dt.date.today().isoformat(), "cpu_count": os.cpu_count()}
    out = Path(args.out or Path(__file__).parent / "results" / f"startup_init_from_cpu_{report['date']}.json")
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
