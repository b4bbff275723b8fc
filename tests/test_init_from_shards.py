"""`--init-from` under FSDP with every rank reading its own shards from the release's files
(engine/shards.py, `distributed.init_from_shards`), no whole copy of the model on rank 0: the
same weights and frozen-weight fingerprint as rank 0's whole copy, drawn tensors the same at
every world size, refusals in one line, and a job that trains and resumes across both modes.
Also FSDP's gradient accumulation: past frozen blocks that never run (engine/fsdp.py), and
reducing every micro-batch (`distributed.reduce_every_micro_batch`).

One torchrun launch of this file (its `__main__`, 2 gloo ranks on CPU) does the distributed part.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import run_ok, torchrun  # noqa: E402
from test_release_layouts import LAYOUTS, _donor  # noqa: E402

from reca.engine.config import apply_overrides  # noqa: E402
from reca.engine.presets import preset  # noqa: E402

SETS = ["data.batch_size=2", "train.device=cpu", "output.tensorboard=false", "output.preview_images=0",
        "optim.schedule=constant", "sample.max_text_tokens=64"]


def releases(root: Path) -> dict[str, Path]:
    """bagel-tiny's release as downloaded; tiny's (flow) without its model.safetensors, so the
    connector, gen_in, time_embed and gen_out are drawn."""
    out = {}
    for name in ("bagel-tiny", "tiny"):
        donor = _donor(name, root / f"{name}-tokenizer")
        out[name] = root / f"{name}-release"
        out[name].mkdir()
        LAYOUTS[name](donor, out[name])
        torch.save(donor.state_dict(), root / f"{name}-donor.pt")
    (out["tiny"] / "model.safetensors").unlink()
    return out


def config(name: str, release: Path, *extra: str):
    from reca.engine.build import with_release_tokenizer

    return with_release_tokenizer(apply_overrides(preset(name), [*SETS, f"train.init_from={release}", *extra]))


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    releases(root)
    run_ok(torchrun(__file__, str(root)), timeout=600)
    return root


def test_each_rank_reads_its_shards_and_gets_the_whole_copys_weights(job):
    """Every tensor the release holds equals rank 0's whole copy's (and the donor's) bit for bit;
    the frozen weights' fingerprint, summed shard by shard, equals the whole copy's."""
    streamed = torch.load(job / "bagel-tiny-stream.pt")
    whole = torch.load(job / "bagel-tiny-whole.pt")
    donor = torch.load(job / "bagel-tiny-donor.pt")
    assert streamed["state"].keys() == whole["state"].keys()
    for key, value in streamed["state"].items():
        assert torch.equal(value, whole["state"][key]), key
        if key in donor:
            assert torch.equal(value, donor[key]), key
    assert streamed["frozen"] == whole["frozen"] and len(streamed["frozen"]) > 10
    assert streamed["report"] == whole["report"] and "ema.safetensors" in streamed["report"]


def test_drawn_tensors_are_the_same_at_every_world_size(job):
    """A release without the flow family's own tensors: those are drawn from train.seed in a
    build of their own, the same on 2 ranks as in one process; the rest is the files'."""
    from reca.engine.shards import _fill
    from reca.models import build_model

    cfg = config("tiny", job / "tiny-release")
    with torch.device("meta"):
        model = build_model(cfg.model)
    model.to_empty(device="cpu")
    report = _fill(model, cfg)
    two = torch.load(job / "tiny-stream.pt")
    donor = torch.load(job / "tiny-donor.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, two["state"][key]), key
    drawn = [k for k in two["state"] if k.startswith(("connector.", "gen_in.", "time_embed.", "gen_out."))]
    assert drawn and "left at their initialisation: connector" in report
    assert not torch.equal(two["state"]["connector.fc1.weight"], donor["connector.fc1.weight"])  # drawn here
    assert all(torch.equal(two["state"][k], donor[k]) for k in two["state"] if k.startswith(("llm.", "vit.")))


def test_a_job_trains_and_resumes_across_both_modes(job):
    """bagel-tiny under torchrun from its release: 2 steps reading shards, resumed to 4 by a job
    that builds the whole copy, resumed to 6 reading shards again: each resume proves the
    frozen weights (the fingerprints agree) and continues."""
    run = job / "run"
    assert sorted(p.name for p in run.glob("step-*")) == ["step-4", "step-6"]
    assert (job / "resumed.txt").read_text().split() == ["2", "4"]


def test_fsdp_accumulates_past_frozen_blocks_that_never_run(job):
    """harmon-tiny with a KL VAE, 2 micro-batches a step under FSDP: the VAE's decoder blocks
    (frozen, never run in training) made FSDP2's backward of the first micro-batch fail
    ("'FSDPParam' object has no attribute '_unsharded_param'"), as harmon-1.5b's (accumulation
    4), OpenUni's and Show-o's would on GPUs; frozen blocks now always take the reducing path."""
    assert (job / "accum" / "step-2").is_dir()


def test_reducing_every_micro_batch_keeps_the_losses(job):
    """distributed.reduce_every_micro_batch: the same losses over 3 steps of 2 micro-batches as
    reducing once a step (the sums in another order: relative 1e-5, as tests/test_distributed.py)."""
    from test_distributed import TOL, losses

    once, every = losses(job / "reduce-once"), losses(job / "reduce-every")
    assert len(once) == len(every) == 3
    for a, b in zip(once, every):
        assert abs(a - b) <= TOL * abs(a), (once, every)


def test_a_refusal_is_one_line_on_every_rank(job):
    """A release with a tensor the model has no place for: every rank raises the loader's line."""
    lines = (job / "refusals.txt").read_text().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1] and "this model has no place for" in lines[0], lines


if __name__ == "__main__":  # under torchrun: build, train and resume (see `job`)
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from reca.engine.checkpoint.dcp import latest, step_of
    from reca.engine.distributed import init_process_group, train_distributed, whole_on_rank0
    from reca.engine.errors import UserError
    from reca.engine.fsdp import sharded_model
    from reca.engine.shards import sharded_fingerprint
    from reca.kernels import get_ops

    root = Path(sys.argv[1])
    r, device = init_process_group()

    def dump(cfg, stream: bool, out: Path) -> None:
        from reca.engine.checkpoint.guard import frozen_fingerprint

        whole = None if stream else whole_on_rank0(cfg, r)
        frozen = None if stream else (frozen_fingerprint(whole) if r.main else None)
        model = sharded_model(cfg, get_ops("torch"), device, r=r, whole=whole, stream=stream)
        if stream:
            frozen = sharded_fingerprint(model)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if r.main:
            report = model.init_from_report if stream else whole.init_from_report
            torch.save({"state": state, "frozen": frozen, "report": report}, out)

    for name in ("bagel-tiny", "tiny"):
        dump(config(name, root / f"{name}-release"), True, root / f"{name}-stream.pt")
    dump(config("bagel-tiny", root / "bagel-tiny-release"), False, root / "bagel-tiny-whole.pt")

    run, resumed = root / "run", []
    for steps, shards, resume in ((2, True, False), (4, False, True), (6, True, True)):
        cfg = config("bagel-tiny", root / "bagel-tiny-release", f"output.dir={run}", f"train.steps={steps}",
                     "output.ckpt_every=2", "distributed.keep_checkpoints=2", f"distributed.init_from_shards={shards}")
        if resume:
            resumed.append(str(step_of(latest(run))))
        train_distributed(cfg, resume=resume, quiet=True)
    if r.main:
        (root / "resumed.txt").write_text(" ".join(resumed))

    cfg = apply_overrides(preset("harmon-tiny"), [*SETS, "model.vae.kind=kl", "optim.grad_accum=2", "train.steps=2",
                                                  "data.source=demo", f"output.dir={root / 'accum'}"])
    train_distributed(cfg, quiet=True)

    for name, every in (("reduce-once", False), ("reduce-every", True)):
        cfg = apply_overrides(preset("tiny"), [*SETS, "optim.grad_accum=2", "train.steps=3", "output.log_every=1",
                                               "data.source=demo", f"distributed.reduce_every_micro_batch={every}",
                                               f"output.dir={root / name}"])
        train_distributed(cfg, quiet=True)

    bad = root / "bad-release"
    if r.main:
        import shutil

        shutil.copytree(root / "bagel-tiny-release", bad)
        state = load_file(str(bad / "ema.safetensors"))
        state["connector.extra.weight"] = torch.zeros(2)
        save_file(state, str(bad / "ema.safetensors"))
    dist.barrier()
    try:
        sharded_model(config("bagel-tiny", bad), get_ops("torch"), device, r=r, whole=None, stream=True)
        line = "no refusal"
    except UserError as e:
        line = str(e)
    lines = [None] * r.world_size
    dist.all_gather_object(lines, line)
    if r.main:
        (root / "refusals.txt").write_text("\n".join(lines) + "\n")
    dist.destroy_process_group()
