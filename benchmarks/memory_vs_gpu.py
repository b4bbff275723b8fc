"""`reca bench memory`'s fake-tensor figure beside a real GPU's `torch.cuda.max_memory_allocated`:
the harmon-1.5b measurements of the first GPU run (H200, 2026-12-04, commit bcfe344:
`reca bench step` at batch 8 and 32, `reca bench batch` at 48; RecA micro-batches alone,
4 accumulated, eager, bf16 autocast, every block checkpointed). That commit checkpointed blocks
with dropout by rewinding the RNG (`preserve_rng_state`), not selectively as today: the bench
is run with that policy here, so both figures are of the same step.

    python benchmarks/memory_vs_gpu.py [--out FILE]
"""
import argparse
import datetime as _dt
import json
import warnings
from pathlib import Path

import torch

import reca.models.layers as layers
from reca.engine.bench.memstep import measure_step
from reca.engine.config import apply_overrides
from reca.engine.presets import preset
from reca.models.layers import has_dropout

H200 = {8: 49.70986795425415, 32: 72.51992130279541, 48: 88.36125421524048}  # GiB, benchmarks/results/*h200.json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON (default: benchmarks/results/memory_fake_vs_h200_<date>.json)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    # bcfe344's models.layers.checkpoint_kwargs
    layers.checkpoint_kwargs = lambda module, device_type="cuda", captured=False: {
        "use_reentrant": False, "preserve_rng_state": has_dropout(module)}
    rows = {}
    for b, gpu in H200.items():
        m = measure_step(apply_overrides(preset("harmon-1.5b"), ["mix.cycle=recon", f"data.batch_size={b}"]))
        fake = m["peak_device_bytes"] / 2**30
        rows[b] = {"fake_gib": fake, "h200_max_memory_allocated_gib": gpu, "fake_over_h200": fake / gpu,
                   "where": m["where"], "categories_gib": {k: v / 2**30 for k, v in m["categories"].items()}}
        print(f"harmon-1.5b batch {b}: fake {fake:.2f} GiB, H200 {gpu:.2f} GiB, fake / H200 {fake / gpu:.3f}",
              flush=True)
    date = _dt.date.today().isoformat()
    out = Path(args.out or Path(__file__).parent / "results" / f"memory_fake_vs_h200_{date}.json")
    out.write_text(json.dumps({"kind": "fake-tensor figure (CPU) beside the H200's 2026-12-04 max_memory_allocated",
                               "torch": torch.__version__, "date": date, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
