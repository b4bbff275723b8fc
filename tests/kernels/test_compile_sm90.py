"""Every Triton kernel in reca.kernels compiles for an H100 (CUDA sm_90) without a GPU.

The CPU tests run the kernels under TRITON_INTERPRET=1, which accepts code the real compiler
rejects (non-constexpr shapes, tl.dot minimum sizes, type promotion, non power-of-two blocks) and
never checks shared memory. Here each public op runs on `meta` tensors with its kernels replaced
by recorders, so the launchers choose the block sizes, warps, stages and flags themselves; each
recorded launch is then specialised by Triton's own binder (the path `kernel[grid](...)` takes
on a GPU: pointer dtypes, int widths, divisibility by 16) and compiled to a cubin with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`. That needs ptxas (bundled
with the Linux triton wheel) and no TRITON_INTERPRET, which decides at `@triton.jit` time what
a kernel is: so the compiling runs in a subprocess (this file as a script) with the variable
removed, and the tests here only read its JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

MODULES = ("condition", "flow_matching", "ddpm", "linear_ce")
# H100's largest dynamic shared memory per block (227 KiB): Triton refuses to launch above it.
SM90_MAX_SHARED = 232448
IMG = 151655  # Qwen2.5's <|image_pad|>, as in benchmarks/kernels/bench_condition.py

# The benchmark shapes (benchmarks/kernels/bench_*.py) and small odd ones: the launchers pick
# different blocks for each, and Triton specialises odd ints differently from multiples of 16.
SHAPES = {
    # B, S, D, V, visual tokens per sample
    "condition": {"real": (48, 1216, 1536, 151936, 1088), "small": (2, 7, 40, 50, 3)},
    # B, T, C
    "flow_matching": {"real": (48, 1024, 64), "small": (3, 5, 7)},
    # tokens, C
    "ddpm": {"real": (196608, 16), "small": (37, 5)},
    # N, D, V
    "linear_ce": {"real": (8192, 2048, 58498), "small": (37, 40, 101)},
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # the dtypes the GPU tests run


def _meta(shape, dtype, grad=False):
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)


def _backward(out):
    out.backward(torch.empty_like(out))


def _condition(shape, dtype, deterministic, embed_grad):
    from reca.kernels.condition.kernel import condition

    B, S, D, V, nv = shape
    ids = torch.empty((B, S), dtype=torch.int64, device="meta")
    embed, visual = _meta((V, D), dtype, embed_grad), _meta((B * nv, D), dtype, True)
    _backward(condition(ids, embed, visual, IMG, grad_scale=0.1, deterministic=deterministic))


def _flow_noise(shape, dtype, all_grads):
    from reca.kernels.flow_matching.kernel import flow_matching_noise

    B = shape[0]
    x0, noise = _meta(shape, dtype, True), _meta(shape, dtype, all_grads)
    _backward(flow_matching_noise(x0, noise, _meta((B,), dtype, all_grads)))


def _flow_loss(shape, dtype, masked):
    from reca.kernels.flow_matching.kernel import flow_matching_loss

    mask = torch.empty(shape[:2], dtype=torch.bool, device="meta") if masked else None
    flow_matching_loss(_meta(shape, dtype, True), _meta(shape, dtype), _meta(shape, dtype), mask)


def _ddpm(shape, dtype, masked):
    from reca.kernels.ddpm.kernel import cosine_schedule, ddpm_loss

    N, C = shape
    t = torch.empty((N,), dtype=torch.int64, device="meta")
    mask = torch.empty((N,), dtype=torch.bool, device="meta") if masked else None
    ddpm_loss(_meta((N, 2 * C), dtype, True), _meta((N, C), dtype), _meta((N, C), dtype), t,
              cosine_schedule(), mask)


def _linear_ce(shape, dtype, bias, weight_grad):
    from reca.kernels.linear_ce.kernel import linear_cross_entropy

    N, D, V = shape
    targets = torch.empty((N,), dtype=torch.int64, device="meta")
    b = _meta((V,), dtype, True) if bias else None
    _backward(linear_cross_entropy(_meta((N, D), dtype, True), _meta((V, D), dtype, weight_grad), targets, b))


# name -> (module, op, variant kwargs). Every op runs forward and (where it has one) backward.
VARIANTS = {
    "condition-atomic": ("condition", _condition, {"deterministic": False, "embed_grad": True}),
    "condition-sorted": ("condition", _condition, {"deterministic": True, "embed_grad": True}),
    "condition-visual-only": ("condition", _condition, {"deterministic": False, "embed_grad": False}),
    "flow-noise": ("flow_matching", _flow_noise, {"all_grads": True}),
    "flow-noise-x0-grad": ("flow_matching", _flow_noise, {"all_grads": False}),
    "flow-loss": ("flow_matching", _flow_loss, {"masked": False}),
    "flow-loss-masked": ("flow_matching", _flow_loss, {"masked": True}),
    "ddpm": ("ddpm", _ddpm, {"masked": False}),
    "ddpm-masked": ("ddpm", _ddpm, {"masked": True}),
    "linear-ce": ("linear_ce", _linear_ce, {"bias": False, "weight_grad": True}),
    "linear-ce-bias": ("linear_ce", _linear_ce, {"bias": True, "weight_grad": True}),
    "linear-ce-frozen-head": ("linear_ce", _linear_ce, {"bias": False, "weight_grad": False}),
}
CASES = [f"{v}/{s}/{d}" for v in VARIANTS for s in ("real", "small") for d in DTYPES]


# --- the subprocess: record launches, specialise, compile -----------------------------------------


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` appends the launch instead."""

    def __init__(self, kernel, sink):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.kernel, args, kwargs))


def _record(case: str) -> list:
    """The (kernel, args, kwargs) launches that one case's op makes, kernels not run."""
    import importlib

    from triton.runtime.jit import JITFunction

    variant, shape, dtype = case.split("/")
    module, op, kwargs = VARIANTS[variant]
    mods = [importlib.import_module(f"reca.kernels.{m}.kernel") for m in MODULES]
    launches, saved = [], []
    try:
        for mod in mods:
            for name, obj in list(vars(mod).items()):
                if isinstance(obj, JITFunction):
                    saved.append((mod, name, obj))
                    setattr(mod, name, _Recorder(obj, launches))
        op(SHAPES[module][shape], DTYPES[dtype], **kwargs)
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)
    return launches


def _specialise(kernel, args, kwargs, backend):
    """Triton's own launch-time specialisation: (signature, constexprs, attrs, options)."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    return signature, constexprs, attrs, options


def _compile(kernel, args, kwargs, target, backend, cache: dict) -> dict:
    import triton
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = _specialise(kernel, args, kwargs, backend)
    key = repr((kernel.__name__, signature, constexprs, attrs, options.num_warps, options.num_stages))
    if key not in cache:
        info = {"kernel": kernel.__name__, "num_warps": options.num_warps, "num_stages": options.num_stages,
                "constexprs": {kernel.arg_names[k[0]]: repr(v) for k, v in constexprs.items()}}
        try:
            src = ASTSource(kernel, signature, constexprs, attrs)
            compiled = triton.compile(src, target=target, options=options.__dict__)
            info.update(ok=True, shared=compiled.metadata.shared, cubin_bytes=len(compiled.asm["cubin"]))
        except Exception as e:  # a compile error is the finding: keep its message for the test
            info.update(ok=False, error=f"{type(e).__name__}: {e}"[-3000:])
        cache[key] = info
    return cache[key]


def _unavailable() -> str | None:
    """Why nothing can be compiled here, or None."""
    try:
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as e:
        return f"triton's CUDA backend does not import: {type(e).__name__}: {e}"
    if "nvidia" not in backends:
        return "triton has no CUDA backend"
    try:
        path = get_ptxas(90).path
    except Exception as e:
        return f"no ptxas: {type(e).__name__}: {e}"
    return None if path and os.path.exists(path) else f"no ptxas at {path!r}"


def _jit_functions() -> dict[str, str]:
    """name -> source of every @triton.jit function in the kernel modules."""
    import importlib
    import inspect

    from triton.runtime.jit import JITFunction

    out = {}
    for m in MODULES:
        for name, obj in vars(importlib.import_module(f"reca.kernels.{m}.kernel")).items():
            if isinstance(obj, JITFunction):
                out[name] = inspect.getsource(obj.fn)
    return out


def main(out_path: str) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    doc = {"triton": triton.__version__, "torch": torch.__version__, "skip": _unavailable()}
    if doc["skip"] is None:
        target = GPUTarget("cuda", 90, 32)
        backend = make_backend(target)
        cache: dict = {}
        doc["cases"] = {c: [_compile(*launch, target, backend, cache) for launch in _record(c)] for c in CASES}
        doc["jit_functions"] = _jit_functions()
        doc["distinct_compiles"] = len(cache)
    Path(out_path).write_text(json.dumps(doc, indent=1))


# --- the tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # compile for real, not from an earlier run's cache
    proc = subprocess.run([sys.executable, __file__, str(tmp / "out.json")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp / "out.json").read_text())
    if doc["skip"]:
        pytest.skip(f"cannot compile for sm_90 here: {doc['skip']}")
    return doc


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_compiles_for_sm90(compiled, case):
    launches = compiled["cases"][case]
    assert launches, f"{case}: the op launched no kernel"
    for k in launches:
        assert k["ok"], f"{case}: {k['kernel']} {k['constexprs']} failed to compile for sm_90:\n{k['error']}"
        assert k["cubin_bytes"] > 0, f"{case}: {k['kernel']}: ptxas produced no cubin"
        assert 0 <= k["shared"] <= SM90_MAX_SHARED, f"{case}: {k['kernel']} needs {k['shared']} B shared memory"


@pytest.mark.slow
def test_every_jit_function_is_compiled(compiled):
    """Each @triton.jit function is launched by some case, or inlined into a launched kernel."""
    launched = {k["kernel"] for ks in compiled["cases"].values() for k in ks}
    sources = compiled["jit_functions"]
    inlined = {name for name in sources if any(f"{name}(" in sources[k] for k in launched)}
    assert set(sources) - launched - inlined == set()
    assert len(launched) >= 9, launched  # the 9 kernels of the 4 modules today


@pytest.mark.slow
def test_launchers_use_gpu_configs(compiled):
    """The subprocess saw the GPU launch parameters, not the interpreter's (utils.pick)."""
    fwd = [k for k in compiled["cases"]["linear-ce/real/bf16"] if k["kernel"] == "_lce_fwd_kernel"]
    assert fwd and fwd[0]["num_warps"] > 4 and fwd[0]["num_stages"] > 1, fwd
    cond = compiled["cases"]["condition-atomic/real/bf16"][0]
    assert cond["constexprs"]["BLOCK_D"] == "512", cond


if __name__ == "__main__":
    main(sys.argv[1])
