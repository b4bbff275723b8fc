"""Benchmarks that run in CI: a pytest-benchmark entry for one tiny training step per CPU mode,
and `reca bench step` end to end (its numbers on CPU only show that it runs)."""
import json

import pytest
import torch

from reca.engine.cli import main
from reca.engine.config import apply_overrides
from reca.engine.presets import tiny
from reca.engine.train import build, next_batches


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_tiny_step(benchmark, tmp_path, mode):
    c = build(apply_overrides(tiny(), [f"train.mode={mode}", f"output.dir={tmp_path}", "output.tensorboard=false"]))
    batches = next_batches(c)
    for _ in range(2):  # compile (fast) outside the timing
        c.update(c, batches)
    before = [p.detach().clone() for p in c.params]
    out = benchmark.pedantic(c.update, args=(c, batches), rounds=5, iterations=1)
    assert out["loss"].isfinite() and out["skip"].item() == 0
    assert all(not torch.equal(a, p) for a, p in zip(before, c.params))  # every trainable tensor was updated


def test_reca_bench_step_cli(tmp_path, capsys):
    out = tmp_path / "step.json"
    main(["bench", "step", "--preset", "tiny", "--steps", "2", "--warmup", "2", "--profile", "1", "--out", str(out)])
    text = capsys.readouterr().out
    for word in ("img/s", "tok/s", "TFLOP/s", "MFU", "peak", "fast / reference", "recipe"):
        assert word in text, word
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["modes"]] == ["reference", "fast"]
    assert report["peak_tflops"] > 0 and all(r["tflops"] > 0 and r["mfu"] > 0 for r in report["modes"])
    assert report["versions"]["torch"] and report["device"]
    ref, fast = report["modes"]
    assert ref["profile_top"] is None and 5 <= len(fast["profile_top"]) <= 15  # the last mode is profiled
    shares = [e["share"] for e in fast["profile_top"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert any("mm" in e["name"] for e in fast["profile_top"])  # the matmuls are among the top costs


def test_bench_step_on_a_mixed_preset_measures_reca_alone(tmp_path, capsys, monkeypatch):
    """harmon-1.5b mixes 2 RecA : 2 captioning micro-batches and needs captioned images; the
    benchmark measures RecA alone (and says so) unless the run names them, with the analytic
    Harmon FLOP plan."""
    import reca.engine.bench.step as bench
    from reca.engine.presets import preset

    mixed = apply_overrides(preset("harmon-tiny"), ["mix.cycle=recon,recon,caption,caption", "optim.grad_accum=4"])
    monkeypatch.setattr(bench, "get_preset", lambda name: mixed)
    out = tmp_path / "step.json"
    main(["bench", "step", "--preset", "harmon-tiny", "--steps", "1", "--warmup", "1", "--modes", "custom",
          "--out", str(out)])
    assert "measuring RecA micro-batches alone (mix.cycle=recon)" in capsys.readouterr().out
    row = json.loads(out.read_text())["modes"][0]
    assert row["flop_count"] == "analytic" and row["tflops"] > 0


def test_gpu_suite_imports_through_its_shim():
    """benchmarks/gpu_suite.sh installs nothing: the GPU image imports reca through a symlink
    shim. Its --dry-run checks that reca.engine comes through the shim (the checkout's own reca/
    must not shadow it) with this interpreter first on PATH."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(root / "benchmarks/gpu_suite.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run: imports resolve" in proc.stdout


@pytest.mark.parametrize("limit,start,fit", [(48, 1, 20), (48, 1, 48), (48, 8, 3), (48, 8, 0), (5, 1, 5), (1, 4, 1)])
def test_largest_fitting_batch_search(limit, start, fit):
    from reca.engine.bench.batch import largest_fitting

    tried = []
    assert largest_fitting(lambda b: tried.append(b) or b <= fit, limit, start) == fit
    assert all(1 <= b <= limit for b in tried) and len(tried) == len(set(tried)) <= 2 * limit.bit_length()


def test_reca_bench_batch_stops_at_out_of_memory(tmp_path, capsys, monkeypatch):
    """The real step, with out-of-memory simulated above 5 images: the search reports 5, and the
    run goes on after each failure (gradients dropped)."""
    import torch

    import reca.engine.bench.batch as bb

    real = bb.next_batches

    def batches(c):
        out = real(c)
        if out[0].batch.und.shape[0] > 5:
            raise torch.OutOfMemoryError("simulated")
        return out

    monkeypatch.setattr(bb, "next_batches", batches)
    out = tmp_path / "batch.json"
    main(["bench", "batch", "--preset", "tiny", "--max", "12", "--start", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["largest_batch"] == 5 and "largest micro-batch 5" in capsys.readouterr().out
    assert [t["batch"] for t in report["tries"]] == [2, 4, 8, 6, 5]


def test_data_benchmark_scripts_run(tmp_path):
    """The gpu suite's corpus and decode stages, at toy size on CPU: the corpus is written and
    the decode benchmark prints Pillow as its baseline and writes its JSON."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "data"
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    subprocess.run([sys.executable, str(root / "make_corpus.py"), str(corpus), "--n", "8", "--side", "160",
                    "--captions"], check=True, timeout=120)
    assert len(list(corpus.glob("*.jpg"))) == 8 and len(list(corpus.glob("*.txt"))) == 8
    assert len((corpus / "img00003.txt").read_text().split()) >= 20
    proc = subprocess.run([sys.executable, str(root / "bench_decode.py"), str(corpus), "--batch", "4",
                           "--batches", "2", "--views", "64,64", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pil" in proc.stdout
    report = json.loads(next(out.glob("data_*.json")).read_text())
    assert report and "pil" in json.dumps(report)
    # the suite's mixed-recipe stage: 2 RecA : 2 captioning micro-batches over the captioned corpus
    main(["bench", "step", "--preset", "harmon-tiny", "--steps", "1", "--warmup", "1", "--modes", "custom",
          "--data", str(corpus), "--set", "mix.cycle=recon,recon,caption,caption", "--set", "optim.grad_accum=4",
          "--set", f"mix.caption_source={corpus}", "--out", str(out / "mix.json")])
    row = json.loads((out / "mix.json").read_text())["modes"][0]
    assert row["flop_count"].startswith("FlopCounterMode") and row["tflops"] > 0


def test_gpu_results_default_to_the_checkouts_benchmarks_results():
    """Without --out a GPU run's JSON lands beside the committed ones (it resolved to
    engine/benchmarks/results, a folder nobody reads, before)."""
    from pathlib import Path

    import reca
    from reca.engine.bench.step import RESULTS

    root = Path(reca.__file__).resolve().parents[2]  # <checkout>/src/reca/__init__.py
    assert RESULTS == root / "benchmarks" / "results" and (RESULTS / "PENDING.md").is_file()
