"""The optimizer step: modes, per-block compile == eager, the non-finite skip, no host reads,
the FLOP count; and (GPU) the CUDA-graph step == eager without a host sync."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from reca.engine.compile import find_blocks
from reca.engine.config import apply_overrides
from reca.engine.errors import UserError
from reca.engine.bench.flops import codec_flops, counted_flops, step_flops
from reca.engine.metrics import read_metrics
from reca.engine.presets import preset, tiny
from reca.engine.build import build, resolve_mode
from reca.engine.train import next_batches, train, train_step
import reca.engine.train as train_module


def _cfg(tmp_path, *sets):
    return apply_overrides(tiny(), [f"output.dir={tmp_path / 'run'}", "output.tensorboard=false",
                                    "output.preview_images=2", "output.preview_steps=2", *sets])


def _losses(c, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        loss = c.update(c, next_batches(c))["loss"]
        c.scheduler.step()
        out.append(loss.detach().clone())  # a CUDA graph returns the same output tensors every replay
    return torch.stack(out).tolist()


def test_modes_resolve(tmp_path):
    cpu = torch.device("cpu")
    ref = resolve_mode(_cfg(tmp_path, "train.mode=reference", "train.compile=true"), cpu)
    assert (ref.train.compile, ref.train.cuda_graph, ref.kernels.backend, ref.data.decoder) == (False, False, "torch", "pil")
    fast = resolve_mode(_cfg(tmp_path, "train.mode=fast"), cpu)
    assert (fast.train.compile, fast.train.cuda_graph, fast.kernels.backend) == (True, False, "auto")
    with pytest.raises(UserError, match="train.cuda_graph needs CUDA"):
        resolve_mode(_cfg(tmp_path, "train.cuda_graph=true"), cpu)
    with pytest.raises(UserError, match="train.mode"):
        resolve_mode(_cfg(tmp_path, "train.mode=turbo"), cpu)
    with pytest.raises(UserError, match="xformers"):
        build(_cfg(tmp_path, "train.attention=xformers"))


def test_blocks_are_found_generically(tmp_path):
    names = [n for n, _ in find_blocks(build(_cfg(tmp_path)).model)]
    tails = [n.split(".", 1)[0] + "." + ".".join(n.rsplit(".", 2)[-2:]) for n in names]  # HF versions nest ViTs differently
    assert tails == [f"vit.layers.{i}" for i in range(3)] + [f"llm.layers.{i}" for i in range(4)], names


@pytest.mark.parametrize("name,sets", [("tiny", ()), ("harmon-tiny", ("train.checkpoint_every=1",))],
                         ids=["tiny", "harmon-tiny-checkpointed"])
def test_compiled_matches_eager(tmp_path, name, sets):
    """10 steps, fp32 on CPU, every repeated block compiled with fullgraph (Qwen2 layers, SigLIP
    layers, MAR blocks, the head's AdaLN blocks); harmon-tiny with every block checkpointed, as
    the real Harmon presets run (checkpointing inside a compiled block is a higher-order op that
    refuses side effects: Hugging Face `kernels`' attention wrapper made one from the second
    step, `engine.compile.plain_forwards`). Inductor fuses and reorders reductions (RMSNorm,
    softmax, the loss mean), so single ops differ by ~1e-6 relative; ten AdamW steps grow that,
    never past 1e-4."""
    def run(*more):
        return _losses(build(apply_overrides(preset(name), [f"output.dir={tmp_path / 'run'}",
                                                            "output.tensorboard=false", *sets, *more])), 10)

    eager, compiled = run(), run("train.mode=fast")
    assert compiled == pytest.approx(eager, rel=1e-4), (eager, compiled)


def test_nonfinite_loss_skips_update_and_is_counted(tmp_path, monkeypatch):
    """A NaN loss at step 3: the update is skipped on the device (weights and AdamW state
    untouched), the run goes on, metrics.jsonl counts it."""
    calls = []

    def poison(module, args, out):  # the model's third forward returns a NaN loss
        calls.append(1)
        if len(calls) == 3:
            out.loss = out.loss * float("nan")
        return out

    c = build(_cfg(tmp_path))
    hook = c.model.register_forward_hook(poison)
    for _ in range(2):
        c.update(c, next_batches(c))
    before = {k: v.clone() for k, v in c.model.state_dict().items()}
    steps = [s["step"].clone() for s in c.optimizer.state.values()]
    out = c.update(c, next_batches(c))
    assert out["skip"].item() == 1 and not out["loss"].isfinite()
    assert all(torch.equal(before[k], v) for k, v in c.model.state_dict().items())
    assert all(torch.equal(a, s["step"]) for a, s in zip(steps, c.optimizer.state.values()))
    assert c.update(c, next_batches(c))["skip"].item() == 0
    assert any(not torch.equal(before[k], v) for k, v in c.model.state_dict().items())
    hook.remove()

    calls.clear()  # the same poison in a whole run, through the model the run builds
    real_build = train_module.build

    def poisoned_build(cfg):
        built = real_build(cfg)
        built.model.register_forward_hook(poison)
        return built

    monkeypatch.setattr(train_module, "build", poisoned_build)
    train(_cfg(tmp_path, "train.steps=6", "output.log_every=2", "output.overwrite=true"), quiet=True)
    rows = read_metrics(tmp_path / "run")
    assert [r.get("nonfinite") for r in rows if "nonfinite" in r] == [0, 1, 1]
    assert all(torch.isfinite(p).all() for p in c.model.parameters())


class _HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's value back to the host (a device sync on CUDA), and
    tensors made from host data (`torch.tensor(...)`: a host-to-device copy on CUDA, which
    CUDA-graph capture forbids). Besides the names, ATen's own tags: an op whose output shape
    depends on the data (`masked_select`, `nonzero`, `unique`: on CUDA each waits for a count)
    or whose output is a host value. CPU kernels of such ops read no value through the
    dispatcher (CPU `masked_select` counts in place), so the tags are what sees them here."""

    # masked_scatter_backward: a masked_select inside one op (a sync on CUDA, none seen on CPU)
    READS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "item", "lift_fresh", "masked_scatter_backward"}
    TAGS = {torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.READS or (self.TAGS & set(func.tags) and _data_dependent(func, args)):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _data_dependent(func, args) -> bool:
    """`index` is tagged for its boolean-mask form alone: integer indices keep the shape static."""
    if func.__name__.split(".")[0] in ("index", "index_put", "index_put_", "_index_put_impl_"):
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None)
    return True


def test_host_reads_sees_what_capture_forbids():
    with _HostReads() as reads:
        torch.tensor(0.5) + 1
        torch.ones(2).sum().item()
    assert reads.seen == ["aten.lift_fresh.default", "aten._local_scalar_dense.default"]
    # what the GPU found under capture (2026-12-04): masked_scatter's backward is a masked_select
    x, v, mask = torch.zeros(2, 3, requires_grad=True), torch.ones(6, requires_grad=True), torch.ones(2, 3) > 0
    with _HostReads() as reads:
        x.masked_scatter(mask, v).sum().backward()
        x[mask].sum()
    assert reads.seen == ["aten.masked_scatter_backward.default", "aten.index.Tensor"]


@pytest.mark.parametrize("name,extra", [("tiny", ()), ("harmon-tiny", ()),
                                        ("harmon-tiny", ("train.checkpoint_every=1", "model.mar.dropout=0.1")),
                                        ("bagel-tiny", ()), ("openuni-tiny", ()), ("showo-tiny", ())])
def test_step_reads_nothing_back(tmp_path, name, extra):
    """No host sync in the step: on CPU, no op of it reads a value back (what `.item()`, `bool()`,
    `nonzero` would do; on CUDA each is a sync) or makes a tensor from host data."""
    c = build(apply_overrides(preset(name), [f"output.dir={tmp_path / 'run'}", "output.tensorboard=false",
                                             "optim.grad_accum=2", *extra]))
    batches = next_batches(c)
    train_step(c, batches)  # lazy optimizer state first
    batches = next_batches(c)  # the sample builder reads positions on the host: data, not step
    with _HostReads() as reads:
        train_step(c, batches)
    assert reads.seen == []


@pytest.mark.parametrize("name,big,small", [("tiny", "llm", "vit"), ("harmon-tiny", "llm.model", "proj_out")])
def test_flop_count_matches_flop_counter(tmp_path, name, big, small):
    """The analytic count (engine/flops.py) vs PyTorch's FlopCounterMode over one whole step on
    the tiny presets, attention forced to the math path (the counter does not see CPU SDPA
    kernels). Measured 0.2 % (flow) and 2.3 % (harmon) apart; 5 % allowed (norms, biases, the
    first conv's unneeded input gradient and the head's timestep MLP input are what the formula
    leaves out)."""
    c = build(apply_overrides(preset(name), [f"output.dir={tmp_path / 'run'}", "output.tensorboard=false"]))
    batches = next_batches(c)
    prompt_len = batches[0].batch.prompt.input_ids.shape[1]
    analytic = step_flops(c.model, prompt_len, c.cfg.data.batch_size, codec_flops(c.model))
    with sdpa_kernel(SDPBackend.MATH):
        counted = counted_flops(lambda: train_step(c, batches))
    c.close()
    assert analytic["total"] == pytest.approx(counted, rel=0.05)
    assert analytic["modules"][big] > analytic["modules"][small] > 0


class _Noisy(torch.nn.Module):
    """Random draws as CUDA makes them: dropout is `native_dropout` there (functional), plus a
    `rand_like`; the nn.Dropout marks the block as one with dropout."""

    def __init__(self):
        super().__init__()
        self.lin, self.drop = torch.nn.Linear(7, 7), torch.nn.Dropout(0.3)

    def forward(self, x):
        h, _ = torch.native_dropout(self.lin(x), 0.3, True)
        return (h * torch.rand_like(h)).tanh()


def test_cuda_checkpointing_saves_random_ops_instead_of_rewinding_the_generator():
    """In a step captured as a CUDA graph a checkpointed block with dropout keeps its random
    ops' outputs (no generator rewind, which a captured graph cannot follow into compiled
    blocks): its gradients equal the plain block's, where a recomputation without the rewind
    draws other masks. Uncaptured, it rewinds the generator as on the CPU (the saved outputs
    cost harmon-1.5b 144 GiB instead of 88 at 48 images)."""
    from torch.utils.checkpoint import checkpoint
    from reca.models.layers import checkpoint_kwargs

    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    cuda = checkpoint_kwargs(_Noisy(), "cuda", captured=True)
    assert cuda["preserve_rng_state"] is False and "context_fn" in cuda
    for device, captured in (("cuda", False), ("cpu", True), ("cpu", False)):
        assert checkpoint_kwargs(_Noisy(), device, captured) == {"use_reentrant": False, "preserve_rng_state": True}
    assert checkpoint_kwargs(torch.nn.Linear(2, 2), "cuda", True) == {"use_reentrant": False,
                                                                      "preserve_rng_state": False}
    grads = []
    for kwargs in (None, cuda, {"use_reentrant": False, "preserve_rng_state": False}):
        torch.manual_seed(0)
        block = _Noisy()
        out = block(x) if kwargs is None else checkpoint(block, x, **kwargs)
        out.sum().backward()
        grads.append(block.lin.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    assert not torch.allclose(grads[2], grads[0])


# --- CUDA ---------------------------------------------------------------------------------------

def _gpu_cfg(tmp_path, *sets, name="tiny"):
    return apply_overrides(preset(name), [f"output.dir={tmp_path / 'run'}", "output.tensorboard=false",
                                          "output.preview_images=2", "output.preview_steps=2",
                                          "train.device=cuda", "data.decoder=pil", *sets])


FAMILIES = ["tiny", "harmon-tiny"]  # flow matching; Harmon (MAR masking, DDPM head, fixed slots)


CKPT_DROPOUT = ("train.checkpoint_every=1", "model.mar.dropout=0.1")  # harmon-1.5b's setting


@pytest.mark.gpu
@pytest.mark.parametrize("name,extra", [("tiny", ()), ("harmon-tiny", ()), ("harmon-tiny", CKPT_DROPOUT)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_matches_eager(tmp_path, precision, name, extra):
    """20 steps (3 eager warm-up, capture, 16 replays) with the same data and RNG as eager.
    fp32: the same kernels in the same order, so equal to 1e-5; bf16: 1e-3 (cuBLAS may pick
    other algorithms under capture). With checkpointing and MAR dropout the recomputed blocks
    rewind the CUDA generator inside the graph (graph-safe in torch >= 2.10)."""
    sets = ("optim.grad_accum=2", f"train.precision={precision}", "kernels.backend=torch", *extra)
    eager = _losses(build(_gpu_cfg(tmp_path, *sets, name=name)), 20)
    graphed = _losses(build(_gpu_cfg(tmp_path, *sets, "train.cuda_graph=true", name=name)), 20)
    assert graphed == pytest.approx(eager, rel=1e-5 if precision == "fp32" else 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mode", ["fast", "custom"])
def test_cuda_graph_step_never_syncs(tmp_path, mode, name):
    """After capture, filling the static inputs and replaying run under sync debug mode "error"."""
    c = build(_gpu_cfg(tmp_path, f"train.mode={mode}", "train.cuda_graph=true", name=name))
    _losses(c, 5)  # warm-up and capture
    batches = [next_batches(c) for _ in range(5)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [c.update(c, b) for b in batches]
        count = sum(out["skip"] for out in outs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert count.item() == 0 and all(torch.isfinite(out["loss"]) for out in outs)


@pytest.mark.gpu
@pytest.mark.parametrize("name", FAMILIES)
def test_fast_mode_with_triton_kernels_matches_reference(tmp_path, name):
    """Compile (Triton ops inside the graph) + CUDA graph vs the reference mode, bf16, 10 steps:
    different kernels and bf16 rounding, so the losses agree to 2 %."""
    ref = _losses(build(_gpu_cfg(tmp_path, "train.mode=reference", name=name)), 10)
    fast = _losses(build(_gpu_cfg(tmp_path, "train.mode=fast", "kernels.backend=triton", name=name)), 10)
    assert fast == pytest.approx(ref, rel=2e-2)


def test_capturable_optimizer_keeps_one_lr_tensor_on_schedule():
    """A CUDA graph reads the lr from the tensor it captured: the scheduler must fill that same
    tensor in place each step (never replace it with a float, never compound it), and the
    updates must equal the float-lr optimizer's."""
    from reca.engine.config import OptimConfig
    from reca.engine.optim import build_optimizer, build_scheduler, lr_factor

    cfg = OptimConfig(lr=1e-3, warmup_steps=3)
    runs = []
    for capturable in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)
        opt = build_optimizer(model, cfg, torch.device("cpu"), capturable=capturable)
        sched = build_scheduler(opt, cfg, total_steps=10)
        lr0 = opt.param_groups[0]["lr"]
        for step in range(6):
            model.weight.grad = torch.full_like(model.weight, 0.5)
            model.bias.grad = torch.full_like(model.bias, -0.25)
            opt.step()
            sched.step()
            for group in opt.param_groups:
                assert float(group["lr"]) == pytest.approx(1e-3 * lr_factor(step + 1, cfg, 10), rel=1e-6)
                assert not capturable or group["lr"] is lr0
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
