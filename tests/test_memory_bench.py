"""`reca bench memory`: the training step measured on fake tensors (engine/bench/fake.py,
memstep.py, memreport.py), its stand-ins for the CUDA kernels, and the options it measures."""
import json

import pytest
import torch
import torch.nn.functional as F

from reca.engine.bench.fake import CATEGORIES, cuda_like
from reca.engine.bench.memstep import measure_step
from reca.engine.cli import main
from reca.engine.config import apply_overrides
from reca.engine.presets import preset


def test_categories_add_up_and_a_doubled_batch_doubles_the_activations():
    """The categories at the peak sum to the peak, one process and one FSDP rank alike; twice the
    images a micro-batch shows as twice the activations (fp32 tiny: no weight casts, which do
    not grow with the batch) and the peak grows by at least the added activations.""" 
    one = measure_step(preset("tiny"))
    two = measure_step(apply_overrides(preset("tiny"), ["data.batch_size=16"]))
    for m in (one, two):
        assert sum(m["categories"][k] for k in CATEGORIES) == m["peak_device_bytes"] > 0
        assert m["categories"]["parameters"] > 0 and m["categories"]["optimizer"] > 0
    a1, a2 = one["categories"]["activations"], two["categories"]["activations"]
    assert 1.95 < a2 / a1 < 2.05, (a1, a2)
    assert two["peak_device_bytes"] - one["peak_device_bytes"] >= 0.95 * (a2 - a1)
    sharded = measure_step(preset("tiny"), world_size=2)
    assert sum(sharded["categories"][k] for k in CATEGORIES) == sharded["peak_device_bytes"]
    assert sharded["categories"]["parameters"] < one["categories"]["parameters"]  # each rank its half


@pytest.mark.parametrize("name", ["harmon-tiny", "bagel-tiny"])
def test_validate_fake_against_real_tensors(tmp_path, capsys, name):
    """`--validate`: the same step on real CPU tensors peaks within 10 % of the fake one."""
    out = tmp_path / "v.json"
    main(["bench", "memory", "--preset", name, "--validate", "--json", str(out)])
    assert "measured_over_real" in capsys.readouterr().out
    v = json.loads(out.read_text())
    assert abs(v["measured_over_real"] - 1) < 0.10, v
    assert v["real"] > 1_000_000
    assert v["fake_categories"]["parameters"] == v["real_categories"]["parameters"]  # tied weights once


def test_bench_memory_cli_table_and_json(tmp_path, capsys):
    """The table a user reads and the JSON fields, for one rank of an FSDP2 job of 2; with
    distributed.cpu_offload the shards, gradients and AdamW state are host memory, not the
    device's; with train.ema_on_host the EMA's shard is; an accumulated micro-batch keeps the
    gradients unsharded in fp32, unless distributed.reduce_every_micro_batch."""
    out = tmp_path / "m.json"
    main(["bench", "memory", "--preset", "bagel-tiny", "--world-size", "2", "--json", str(out)])
    text = capsys.readouterr().out
    for word in ("measured", "projected", "activations", "the peak:", "rank 0's host at start-up", "not covered",
                 "fits", "tokens a pack"):
        assert word in text, word
    r = json.loads(out.read_text())
    assert r["path"] == "fsdp2" and r["world_size"] == 2 and r["tokens_per_rank"] == 1024
    assert r["peak_device_bytes"] == sum(r["categories"].values()) and r["peak_host_bytes"] > 0
    assert r["measured_over_projected"] == pytest.approx(r["peak_device_bytes"] / r["projected"]["total"])
    assert r["categories"]["ema"] > 0 and r["peak_step_host_bytes"] == 0
    host = measure_step(apply_overrides(preset("bagel-tiny"), ["train.ema_on_host=true"]), world_size=2)
    assert host["categories"]["ema"] == 0 and host["peak_step_host_bytes"] >= r["categories"]["ema"]
    off = measure_step(apply_overrides(preset("bagel-tiny"), ["distributed.cpu_offload=true"]), world_size=2)
    assert off["categories"]["parameters"] == off["categories"]["optimizer"] == 0
    assert off["peak_device_bytes"] < r["peak_device_bytes"] and off["peak_step_host_bytes"] > 0
    # accumulating 2 micro-batches keeps whole fp32 gradients between them, unless each is reduced
    kept, reduced = (measure_step(apply_overrides(preset("bagel-tiny"), ["optim.grad_accum=2", "data.batch_size=4",
                                                                         f"distributed.reduce_every_micro_batch={e}"]),
                                  world_size=2)["categories"]["gradients"] for e in (False, True))
    trained = sum(p.numel() for p in _trained(preset("bagel-tiny")))
    assert kept >= 4 * trained and reduced <= kept / 2, (kept, reduced, trained)  # whole fp32 vs a half each


def _trained(cfg):
    from reca.models import build_model

    with torch.device("meta"):
        return [p for p in build_model(cfg.model).parameters() if p.requires_grad]


def test_checkpointed_blocks_with_dropout_under_bf16_autocast():
    """CUDA's checkpointing of a block that draws random numbers, in a captured step (fast), is
    selective (its random ops' outputs saved), and counts the block's ops in the forward and the recomputation. Harmon's
    MAR encoder runs twice a forward: under bf16 autocast the second run found its weights in
    autocast's cache and the recomputation did not ("_to_copy ... not found in storage"); the
    cache is off inside such blocks now. Measured as the bench runs the CUDA step; an uncaptured
    step rewinds the generator instead and keeps fewer activations."""
    sets = ["model.mar.dropout=0.1", "train.checkpoint_every=1", "train.precision=bf16"]
    captured = measure_step(apply_overrides(preset("harmon-tiny"), [*sets, "train.mode=fast"]))
    rewound = measure_step(apply_overrides(preset("harmon-tiny"), sets))  # uncaptured: the generator rewound
    assert captured["categories"]["activations"] > rewound["categories"]["activations"] > 0


def test_attention_stand_in_matches_sdpa_and_saves_what_flash_saves():
    """The bench's attention (grouped K/V heads, a boolean mask) gives SDPA's output and
    gradients, and keeps for the backward q, k, v, the mask as a bias, the output and an fp32
    log-sum-exp [B, H, L], not expanded K/V or the [L, S] scores."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 13, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 13, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 13, 8, generator=g, requires_grad=True)
    mask = torch.rand(2, 1, 13, 13, generator=g) > 0.3
    mask[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with cuda_like():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(2, 4, 13, 8), (2, 2, 13, 8), (2, 2, 13, 8), (2, 1, 13, 13), (2, 4, 13, 8), (2, 4, 13)])
    bias = next(t for t in saved if t.shape == (2, 1, 13, 13))
    assert bias.untyped_storage().nbytes() == 2 * 13 * 16 * 4  # padded to 8 columns, as mem-efficient attention pads


def test_ema_on_host_changes_nothing_in_the_step(tmp_path):
    """train.ema_on_host: the same weights and the same EMA after two steps, bit for bit, its
    shadows held apart from the weights' storage (on a GPU: in host memory)."""
    from reca.engine.build import build
    from reca.engine.train import next_batches

    runs = []
    for on_host in (False, True):
        c = build(apply_overrides(preset("tiny"), [f"output.dir={tmp_path}", "train.ema=0.9", "data.num_workers=0",
                                                    "data.batch_size=2", f"train.ema_on_host={on_host}",
                                                    "output.tensorboard=false"]))
        for _ in range(2):
            c.update(c, next_batches(c))
            c.scheduler.step()
        assert c.ema.on_host is on_host and all(s.device.type == "cpu" for s in c.ema.shadows)
        runs.append(([p.detach().clone() for p in c.params], [s.clone() for s in c.ema.shadows]))
        c.close()
    (w0, e0), (w1, e1) = runs
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
    assert all(torch.equal(a, b) for a, b in zip(e0, e1))
    assert not all(torch.equal(a, b) for a, b in zip(e0, w0))  # the EMA lags the weights


def test_largest_micro_batch_is_measured_to_fit(tmp_path, capsys):
    """`--largest`: the batch the measured line predicts under 90 % of the card is measured, and
    fits; one more image would not (on the line through the bracketing batches)."""
    from reca.engine.bench.memreport import GIB, USABLE

    out = tmp_path / "l.json"
    main(["bench", "memory", "--preset", "tiny", "--largest", "--cards", "1", "--json", str(out)])
    assert "largest micro-batch that fits (* measured): 1 GiB" in capsys.readouterr().out
    big = json.loads(out.read_text())["largest"]["1"]
    assert big["checked"] and big["batch"] > 8 and big["peak_device_bytes"] <= USABLE * GIB
    more = measure_step(apply_overrides(preset("tiny"), [f"data.batch_size={big['batch'] + 8}"]))
    assert more["peak_device_bytes"] > USABLE * GIB  # the line is close: 8 more images do not fit
