"""`reca bench step`: throughput of whole training steps, the reference mode beside the fast
one in the same run, against the matmul peak measured in the same run.

Per mode: images/s, tokens/s (the LLM's real tokens, padding aside), achieved TFLOP/s from the
analytic count (`reca.engine.bench.flops`), MFU against the peak of a large matmul in the step's dtype
(bf16 on CUDA, fp32 on CPU) on model FLOPs (padding and masked-out slots excluded), beside the
utilisation of what the fixed shapes execute ("executed"), peak CUDA memory, the data-wait fraction, and the GPU-hours the preset's
published recipe would take at that throughput. JSON (device, library versions, date) goes to
`--out`, else `benchmarks/results/step_<device>.json` on CUDA and a temporary directory on CPU
(CPU times are checks that the benchmark runs, not results).
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from reca.engine.config import RunConfig, apply_overrides
from reca.engine.data import ImageBatch
from reca.engine.bench.flops import codec_flops, codec_passes, counted_flops, step_flops
from reca.engine.presets import preset as get_preset
from reca.engine.build import build, resolve_device
from reca.engine.train import next_batches

# Published RecA budgets: the images a recipe trains on come from the preset (steps x accum x batch).
PAPER_GPU_HOURS = {"flow-7b": (27.0, "BAGEL RecA: 6 x A100-80GB x 4.5 h"),
                   "bagel-7b-mot": (27.0, "BAGEL RecA: 6 x A100-80GB x 4.5 h")}


def _results_dir() -> Path:
    """Where a GPU run's JSON goes without --out: the checkout's benchmarks/results/ (this file is
    engine/bench/step.py), else reca-bench-results/ under the working directory (an installed
    wheel has no checkout to write into)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "setup.py").is_file() and (root / "benchmarks" / "results").is_dir():
        return root / "benchmarks" / "results"
    return Path("reca-bench-results")


RESULTS = _results_dir()


class SyntheticLoader:
    """Random views of the model's sizes, no decoding: isolates the step from the data path."""

    def __init__(self, batch: int, views, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.und = torch.rand(batch, 3, views.und_size, views.und_size, generator=g) * 2 - 1
        self.gen = torch.rand(batch, 3, views.gen_size, views.gen_size, generator=g) * 2 - 1
        self.position, self.wait_seconds, self.skipped = 0, 0.0, 0

    def __next__(self) -> ImageBatch:
        b = self.und.shape[0]
        pos = torch.arange(self.position, self.position + b)
        self.position += b
        return ImageBatch(self.und, self.gen, [str(int(p)) for p in pos], pos)

    def close(self) -> None:
        pass


def peak_tflops(device: torch.device) -> tuple[float, str]:
    """Measured dense-matmul TFLOP/s in the step's dtype: the MFU denominator."""
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    reps = 20 if cuda else 5
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12, str(dtype).replace("torch.", "")


def measure(cfg: RunConfig, steps: int, warmup: int, data: str, profile: int = 0) -> dict:
    c = build(cfg)
    use_synthetic(c, data)
    batch, accum = cfg.data.batch_size, cfg.optim.grad_accum
    micro_flops, micro_executed, llm_tokens, how = micro_batch_flops(c)
    dt, losses, wait = timed_steps(c, c, steps, warmup)
    top = profile_steps(c, profile) if profile > 0 else None
    c.close()
    images = steps * accum * batch
    return {"profile_top": top, **{
        "mode": cfg.train.mode, "compile": c.cfg.train.compile, "cuda_graph": c.cfg.train.cuda_graph,
        "kernels": c.ops.backend, "step_ms": 1e3 * dt / steps, "images_per_s": images / dt,
        "tokens_per_s": images * llm_tokens / dt, "tflops": micro_flops * accum * steps / dt / 1e12,
        "tflops_executed": micro_executed * accum * steps / dt / 1e12,
        "flops_per_image": micro_flops / batch, "flop_count": how,
        "peak_memory_gb": torch.cuda.max_memory_allocated(c.device) / 2**30 if c.device.type == "cuda" else None,
        "data_wait": wait / dt, "final_loss": float(losses[-1]),
    }}


def use_synthetic(c, data: str) -> None:
    """`--data synthetic`: the RecA loader replaced by fixed random views (no decoding)."""
    if data == "synthetic":
        c.loader.close()
        c.loaders[c.objectives[0].name] = SyntheticLoader(c.cfg.data.batch_size, c.model.views, c.cfg.data.seed)


def timed_steps(c, step_c, steps: int, warmup: int) -> tuple[float, list, float]:
    """`warmup` untimed optimizer steps, then `steps` timed ones -> (seconds, losses, seconds
    of them spent waiting for data). `step_c`: the Components the step runs with (`c` itself,
    or under torchrun the strategy's)."""
    for _ in range(warmup):
        c.update(step_c, next_batches(c))
        c.scheduler.step()
    if c.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(c.device)
    _sync(c.device)
    wait0, t0 = c.loader.wait_seconds, time.perf_counter()
    losses = []
    for _ in range(steps):
        out = c.update(step_c, next_batches(c))
        c.scheduler.step()
        losses.append(out["loss"].detach().clone())
    _sync(c.device)
    dt = time.perf_counter() - t0
    return dt, losses, c.loader.wait_seconds - wait0


def micro_batch_flops(c) -> tuple[float, float, float, str]:
    """-> (model FLOPs of one micro-batch, FLOPs its fixed shapes execute, LLM tokens a sample,
    how they were counted)."""
    cfg = c.cfg
    batch, accum = cfg.data.batch_size, cfg.optim.grad_accum
    prompts = c.builder.build(torch.arange(64))  # the padded length, and the mean valid one
    prompt_len, prompt_mean = prompts.input_ids.shape[1], float(prompts.mask.sum(1).float().mean())
    # Analytic where the family has a token plan (`flop_plan`) and the cycle is RecA alone;
    # otherwise one step under FlopCounterMode (what runs, padding included).
    if set(cfg.mix.cycle) == {"recon"} and "flop_plan" in c.model.capabilities:
        codec, passes = codec_flops(c.model, c.device), codec_passes(c.model, cfg.data.und_downscale)
        executed = step_flops(c.model, prompt_len, batch, codec, passes)
        useful = step_flops(c.model, prompt_mean, batch, codec, passes, useful=True)
        per = useful["tokens_per_sample"]  # tokens/s counts the LLM's real tokens ("llm" or "llm.model")
        llm_tokens = next((n for m, n in per.items() if m.split(".")[0] == "llm"), max(per.values()))
        how = "analytic"
        micro_flops, micro_executed = useful["total"], executed["total"]
    else:
        micro_flops = micro_executed = counted_flops(lambda: c.update(c, next_batches(c))) / accum
        llm_tokens, how = prompt_len, "FlopCounterMode (executed, padding included)"
    return micro_flops, micro_executed, llm_tokens, how


def profile_steps(c, steps: int, rows: int = 15) -> list[dict]:
    """The top costs of `steps` more optimizer steps under torch.profiler (what a missed goal is
    reported with): ops and kernels by self time on the device (CPU time on a CPU run), each with
    its ms per step, share of the total and calls per step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = c.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            c.update(c, next_batches(c))
            c.scheduler.step()
        _sync(c.device)

    def self_us(e) -> float:  # torch renamed the CUDA fields to "device" in 2.4; both exist for a while
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    events = prof.key_averages()
    total = sum(self_us(e) for e in events) or 1.0
    ranked = sorted(events, key=self_us, reverse=True)[:rows]
    return [{"name": e.key, "ms_per_step": self_us(e) / 1e3 / steps, "share": self_us(e) / total,
             "calls_per_step": e.count / steps} for e in ranked]


def bench_step(preset: str, *, batch: int | None, steps: int, warmup: int, modes: list[str], device: str, profile: int = 0,
               data: str, sets: list[str], out: str | None) -> dict:
    base = get_preset(preset)
    recipe_images = base.train.steps * base.optim.grad_accum * base.data.batch_size
    dev = resolve_device(device)
    peak, dtype = peak_tflops(dev)
    print(f"peak ({dtype} matmul, measured in this run): {peak:.2f} TFLOP/s on {_device_name(dev)}", flush=True)
    if reca_alone(base, sets):
        print(f"{preset} mixes {','.join(base.mix.cycle)}; measuring RecA micro-batches alone (mix.cycle=recon), "
              "an upper bound on the recipe's time: caption micro-batches skip the generation pass. "
              "--set mix.caption_source=DIR measures the mix.")
    rows = []
    for mode in modes:
        row = measure(mode_config(base, mode, batch=batch, steps=steps, warmup=warmup, device=device, data=data,
                                  sets=sets), steps, warmup, data,
                      profile if mode == modes[-1] else 0)  # the last mode (fast) is the one to explain
        row["mfu"] = row["tflops"] / peak  # model FLOPs: padding and masked-out slots excluded
        row["hfu"] = row["tflops_executed"] / peak  # what the fixed shapes execute (no recomputation)
        row["recipe_gpu_hours"] = recipe_images / row["images_per_s"] / 3600
        rows.append(row)
        _print_row(row)
        for e in row["profile_top"] or []:
            print(f"    {100 * e['share']:5.1f}% {e['ms_per_step']:9.2f} ms/step {e['calls_per_step']:7.1f} calls  "
                  f"{e['name'][:90]}")
    ref = next((r for r in rows if r["mode"] == "reference"), None)
    for r in rows:
        r["speedup_vs_reference"] = r["images_per_s"] / ref["images_per_s"] if ref else None
    report = {
        "benchmark": "step", "preset": preset, "batch": batch or base.data.batch_size, "steps": steps,
        "warmup": warmup, "data": data, "device": _device_name(dev), "peak_tflops": peak, "peak_dtype": dtype,
        "recipe_images": recipe_images, "paper_gpu_hours": PAPER_GPU_HOURS.get(preset),
        "versions": _versions(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "modes": rows,
    }
    if ref and len(rows) > 1:
        for r in rows:
            if r is not ref:
                print(f"{r['mode']} / reference: {r['speedup_vs_reference']:.2f}x images/s")
    paper = PAPER_GPU_HOURS.get(preset)
    print(f"{preset} recipe ({recipe_images:,} images), hours on one {report['device']}: "
          + ", ".join(f"{r['mode']} {r['recipe_gpu_hours']:.2f}" for r in rows)
          + (f"; paper: {paper[0]} GPU-h ({paper[1]})" if paper else ""))
    write_report(report, out, RESULTS if dev.type == "cuda" else Path(tempfile.mkdtemp(prefix="reca-bench-")),
                 f"step_{preset}")
    return report


def mode_config(base: RunConfig, mode: str, *, batch: int | None, steps: int, warmup: int, device: str, data: str,
                sets: list[str]) -> RunConfig:
    """The preset as one timed mode runs it: the mode, device, enough steps, the data."""
    overrides = [f"train.mode={mode}", f"train.device={device}", f"train.steps={warmup + steps + 1}",
                 "output.tensorboard=false", "optim.warmup_steps=1"]
    if batch:
        overrides.append(f"data.batch_size={batch}")
    if data != "synthetic":
        overrides.append(f"data.source={data}")
    if reca_alone(base, sets):
        overrides.append("mix.cycle=recon")  # RecA alone unless the run names its captioned images
    return apply_overrides(base, overrides + sets)


def write_report(report: dict, out: str | None, default: Path | None, stem: str) -> None:
    """JSON to `out` (a file, or a folder for STEM_DEVICE.json), else under `default` (None:
    not written)."""
    path = Path(out) if out else default
    if path is None:
        return
    if path.suffix != ".json":
        path = path / f"{stem}_{_slug(report['device'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


def reca_alone(base: RunConfig, sets: list[str]) -> bool:
    """A preset that mixes captioning micro-batches is measured on RecA ones alone
    (`mix.cycle=recon`) unless the run sets `mix.*` itself (e.g. its captioned images)."""
    return "caption" in base.mix.cycle and not any(x.startswith("mix.") for x in sets)


def _print_row(r: dict) -> None:
    mem = f"{r['peak_memory_gb']:.1f} GiB" if r["peak_memory_gb"] is not None else "-"
    print(f"{r['mode']:>9} (compile={r['compile']}, graph={r['cuda_graph']}, kernels={r['kernels']}): "
          f"{r['step_ms']:8.1f} ms/step {r['images_per_s']:9.1f} img/s {r['tokens_per_s']:11.0f} tok/s "
          f"{r['tflops']:7.3f} TFLOP/s MFU {100 * r['mfu']:5.1f}% (executed {100 * r['hfu']:5.1f}%) mem {mem} "
          f"data-wait {100 * r['data_wait']:.1f}%",
          flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out
