"""Shared benchmark harness of the kernel scripts: timing, ceilings, throughput, JSON.

Each script builds its inputs at the family's real shapes, hands `run_op` a dict of providers
(ours, torch eager reference, torch.compile of the reference, optional third-party kernels) and
the op's algorithmic bytes / FLOPs, and gets back rows it prints and writes to
`benchmarks/results/kernels_<op>_<device>.json` next to the device name, library versions and
the ceilings measured in the same run (a large bf16 matmul for TFLOP/s, a large device copy for
GB/s). On CUDA each provider's forward and forward+backward also get their peak memory: the
most the caching allocator held during one call beyond what was allocated before it, and the
"extra" part of it, that peak less the gradients the pass leaves in the leaves' `.grad` (what
every implementation must allocate); null elsewhere. `--smoke` runs tiny shapes on CPU under
TRITON_INTERPRET=1: it checks that the script works (CI), its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():  # before triton is imported anywhere: the CPU smoke path
    os.environ.setdefault("TRITON_INTERPRET", "1")

RESULTS = Path(__file__).resolve().parents[1] / "results"
MODES = ("fwd", "bwd", "fwd+bwd")


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU under the Triton interpreter")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of fwd,bwd,fwd+bwd")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<op>_<device>.json)")
    if extra:
        extra(p)
    args = p.parse_args()
    args.dtype = getattr(torch, args.dtype)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and not args.smoke:
        sys.exit("no CUDA device: real numbers need a GPU (use --smoke to check the script runs)")
    args.modes = [m for m in args.modes.split(",") if m]
    return args


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu-{platform.machine()}"


def bench(fn: Callable[[], object], device: str, grad_to_none=None, warmup_ms: int = 25, rep_ms: int = 100) -> dict:
    """Median / p20 / p80 milliseconds of fn()."""
    if device == "cuda":
        import triton.testing

        med, lo, hi = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                              quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "ms_p20": lo, "ms_p80": hi}
    times = []
    for _ in range(3):
        if grad_to_none:
            for x in grad_to_none:
                x.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_p20": min(times), "ms_p80": max(times)}


def peak_memory(fn: Callable[[], object], device: str, leaves) -> dict:
    """Bytes one call of fn() allocates at its peak beyond what was allocated before it, and that
    peak less the gradients it leaves on `leaves` (cleared first); None off CUDA."""
    if device != "cuda":
        return {"peak_bytes": None, "extra_bytes": None}
    for x in leaves:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    grads = sum(x.grad.numel() * x.grad.element_size() for x in leaves if x.grad is not None)
    for x in leaves:
        x.grad = None
    return {"peak_bytes": peak, "extra_bytes": peak - grads}


def ceilings(device: str, smoke: bool) -> dict:
    """Measured in this run: bf16 matmul TFLOP/s and device-to-device copy GB/s (read + write)."""
    if device != "cuda" or smoke:
        return {"matmul_bf16_tflops": None, "copy_gbps": None}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm = bench(lambda: a @ b, device)["ms"]
    src = torch.empty(2**28, device=device, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    cp = bench(lambda: dst.copy_(src), device)["ms"]
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {"matmul_bf16_tflops": 2 * n**3 / mm / 1e9, "copy_gbps": 2 * 2**30 / cp / 1e6}


def compile_fn(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def run_op(
    op: str,
    args,
    shape: dict,
    providers: dict[str, Callable[[], tuple[Callable, list]]],
    cost: dict[str, dict],
    memory_ref: dict | None = None,
) -> list[dict]:
    """Time every provider in every mode, and measure the peak memory of fwd and fwd+bwd.

    providers: name -> make(), which builds fresh leaf inputs and returns (forward, leaves):
      forward() runs the op and returns a tensor (a scalar loss, or an output that a fixed
      random gradient is pushed through). Backward is timed alone by retaining the graph.
    cost: mode -> {"bytes": ..., "flops": ...}, the algorithmic minimum the op must move / do
      (what throughput is computed from, for every provider alike).
    memory_ref: {"name", "bytes", "goal"}: a size (e.g. the logits an op avoids) that each extra
      peak is also given as a fraction of, next to the goal fraction.
    """
    ceil = ceilings(args.device, args.smoke)
    rows = []
    base = {}
    for name, make in providers.items():
        try:
            forward, leaves = make()
            out = forward()
        except Exception as e:  # an optional provider missing, or out of memory
            print(f"  {name:>10}: skipped ({type(e).__name__}: {str(e)[:120]})")
            continue
        grad = torch.randn_like(out) if out.dim() else torch.ones_like(out)
        for mode in args.modes:
            if mode == "fwd":  # with autograd recording, as in a training step
                t = bench(forward, args.device)
            elif mode == "bwd":
                out = forward()
                t = bench(lambda: out.backward(grad, retain_graph=True), args.device, grad_to_none=leaves)
            else:
                t = bench(lambda: forward().backward(grad), args.device, grad_to_none=leaves)
            c = cost.get(mode, {})
            row = {"provider": name, "mode": mode, **t, **_mode_memory(mode, forward, grad, leaves, args.device)}
            if memory_ref and row["extra_bytes"] is not None:
                row["extra_vs_" + memory_ref["name"]] = row["extra_bytes"] / memory_ref["bytes"]
            if c.get("bytes"):
                row["gbps"] = c["bytes"] / t["ms"] / 1e6
            if c.get("flops"):
                row["tflops"] = c["flops"] / t["ms"] / 1e9
            if name == "torch":
                base[mode] = t["ms"]
            rows.append(row)
        del out
        if args.device == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        if row["mode"] in base:
            row["speedup_vs_torch"] = base[row["mode"]] / row["ms"]
    _print(op, shape, ceil, rows, memory_ref)
    _write(op, args, shape, ceil, rows, memory_ref)
    return rows


def _mode_memory(mode, forward, grad, leaves, device) -> dict:
    """Peak memory of one fwd or fwd+bwd call (bwd alone is not measured: its inputs, the saved
    graph, were allocated by a forward outside the call)."""
    if mode == "fwd":
        return peak_memory(forward, device, leaves)
    if mode == "fwd+bwd":
        return peak_memory(lambda: forward().backward(grad), device, leaves)
    return {"peak_bytes": None, "extra_bytes": None}


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _print(op, shape, ceil, rows, memory_ref=None):
    print(f"\n{op} {shape}")
    if ceil["matmul_bf16_tflops"]:
        print(f"  ceilings (this run): bf16 matmul {ceil['matmul_bf16_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbps']:.0f} GB/s")
    ref = memory_ref and "extra_vs_" + memory_ref["name"]
    if ref:
        print(f"  extra peak (peak less the gradients) vs {memory_ref['name']} ({memory_ref['bytes'] / 2**20:.1f} MiB); "
              f"goal < {memory_ref['goal']:.0%}")
    head = f"  {'provider':>10} {'mode':>8} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} {'vs torch':>8} {'peak MiB':>9} {'extra MiB':>9}"
    print(head + (f" {'extra/ref':>9}" if ref else ""))
    for r in rows:
        gb = f"{r['gbps']:.0f}" if "gbps" in r else "-"
        tf = f"{r['tflops']:.1f}" if "tflops" in r else "-"
        sp = f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else "-"
        line = (f"  {r['provider']:>10} {r['mode']:>8} {r['ms']:>9.3f} {gb:>8} {tf:>8} {sp:>8} "
                f"{_mib(r['peak_bytes']):>9} {_mib(r['extra_bytes']):>9}")
        if ref:
            line += f" {(f'{r[ref]:.1%}' if ref in r else '-'):>9}"
        print(line)


def _write(op, args, shape, ceil, rows, memory_ref=None):
    import triton

    dev = device_name(args.device)
    # Smoke numbers are meaningless: they go to the temp dir unless --out says otherwise.
    folder = Path(tempfile.gettempdir()) / "reca_bench_smoke" if args.smoke else RESULTS
    path = Path(args.out) if args.out else folder / f"kernels_{op}_{dev.replace(' ', '_')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "op": op,
        "device": dev,
        "smoke": args.smoke,
        "dtype": str(args.dtype).removeprefix("torch."),
        "shape": shape,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ceilings": ceil,
        "memory_ref": memory_ref,
        "rows": rows,
    }
    path.write_text(json.dumps(doc, indent=2))
    print(f"  -> {path}")
