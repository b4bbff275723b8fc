"""`reca` command line: `reca train`, `reca sample`, `reca export`, `reca info`, `reca bench step`,
`reca bench batch`, `reca bench memory`, and `reca launch` (torchrun with reca's endings:
`reca.engine.launch`).

User errors (a missing folder, an unknown preset or config key, a GPU asked for and absent)
print one line on stderr and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reca.engine.errors import UserError

EPILOG = "Any config field can be overridden with --set SECTION.FIELD=VALUE (e.g. --set optim.lr=2e-5)."


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reca", description="RecA post-training engine for unified multimodal models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run RecA post-training", epilog=EPILOG)
    t.add_argument("--preset", help="named preset (default: tiny), or module:function returning a RunConfig")
    t.add_argument("--config", metavar="FILE", help="start a new run from a saved config (RUN/config.json or RUN); "
                                                     "--set and the other flags apply on top")
    t.add_argument("--data", help="image folder (searched recursively), or 'demo' for the bundled photographs")
    t.add_argument("--steps", type=int, help="optimizer steps")
    t.add_argument("--out", help="run directory (config, metrics, checkpoints, previews)")
    t.add_argument("--prompts", help="file of instructions, one a line (default: the pool shipped with reca)")
    t.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--init-from", help="local directory of pretrained weights (see README)")
    t.add_argument("--resume", metavar="RUN", help="continue the run in RUN exactly where its checkpoint left off")
    t.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out instead of refusing")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    t.add_argument("--quiet", action="store_true", help="no config print-out and no progress bar")

    g = sub.add_parser("sample", help="generate images from a trained run (or --preset with --init-from weights)",
                       epilog=EPILOG)
    g.add_argument("run", nargs="?", help="run directory (config.json + checkpoint.pt)")
    g.add_argument("--preset", help="instead of a run: a named preset, with --init-from weights")
    g.add_argument("--init-from", help="local directory of pretrained weights (with --preset)")
    g.add_argument("--prompt", help="text prompt (text-to-image: RecA's inference), or the instruction with --image")
    g.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="generate from this image's visual prompt (repeatable)")
    g.add_argument("--out", required=True, help="folder for the PNGs")
    g.add_argument("--num", type=int, default=1, help="images per text prompt")
    g.add_argument("--steps", type=int, help="sampling steps (default: the run's output.preview_steps)")
    g.add_argument("--seed", type=int, default=0, help="noise seed")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")

    e = sub.add_parser("export", help="write a run's trained weights in the family's original layout")
    e.add_argument("run", help="run directory (config.json + checkpoint.pt)")
    e.add_argument("--to", required=True, metavar="DIR", help="folder that receives model.safetensors")
    e.add_argument("--overwrite", action="store_true", help="replace the files an earlier export left in DIR")

    i = sub.add_parser("info", help="print a preset's resolved config and parameter counts (no weights allocated)",
                       epilog=EPILOG)
    i.add_argument("--preset", default="tiny", help="named preset, or module:function returning a RunConfig")
    i.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--world-size", type=int, metavar="N",
                   help="also project the memory per rank under FSDP at 1, 2, 4, 8 and N ranks")
    i.add_argument("--init-from", metavar="DIR",
                   help="check a weights directory against the preset (keys and shapes only, nothing read whole): "
                        "the tensors each file supplies, or the one line that refuses it")

    sub.add_parser("launch", help="torchrun in this process, with reca's exit statuses and its line last: reca "
                                  "launch [torchrun options] train ... (see `reca launch --help`)", add_help=False)

    b = sub.add_parser("bench", help="benchmarks: `reca bench step` times whole training steps", epilog=EPILOG)
    bsub = b.add_subparsers(dest="bench", required=True)
    s = bsub.add_parser("step", help="images/s, tokens/s, TFLOP/s, MFU of the fast mode beside the reference mode",
                        epilog=EPILOG)
    s.add_argument("--preset", default="tiny", help="named preset, or module:function returning a RunConfig")
    s.add_argument("--batch", type=int, help="images per micro-batch (default: the preset's)")
    s.add_argument("--steps", type=int, default=10, help="timed optimizer steps per mode")
    s.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, CUDA-graph capture)")
    s.add_argument("--modes", default="reference,fast", help="comma-separated train.mode values to time")
    s.add_argument("--device", default="auto")
    s.add_argument("--data", default="demo", help="'demo', an image folder, or 'synthetic' (no decoding)")
    s.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile N more steps of the last mode and print its top costs (kernels by device time)")
    s.add_argument("--out", help="JSON file or directory (default: benchmarks/results on CUDA, a temp dir on CPU)")
    s.add_argument("--no-baseline", action="store_true",
                   help="under torchrun: skip rank 0's one-device baseline (a model that does not fit one device)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    y = bsub.add_parser("memory", help="peak memory per rank of a preset's training step, measured on fake tensors "
                                       "(no GPU), beside reca info's projection", epilog=EPILOG)
    y.add_argument("--preset", default="tiny", help="named preset, or module:function returning a RunConfig")
    y.add_argument("--world-size", type=int, default=1, metavar="N",
                   help="ranks: 1 = one process (reca train), N > 1 = one rank of an FSDP2 job of N")
    y.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    y.add_argument("--cards", default="80,48,40", help="card sizes in GiB the verdicts name (comma-separated)")
    y.add_argument("--largest", action="store_true",
                   help="also find the largest micro-batch that fits each card (a few more measured steps)")
    y.add_argument("--validate", action="store_true",
                   help="measure the step on fake and on real CPU tensors and print measured_over_real (tiny presets)")
    y.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    m = bsub.add_parser("batch", help="the largest micro-batch of a preset that trains on this device", epilog=EPILOG)
    m.add_argument("--preset", default="tiny", help="named preset, or module:function returning a RunConfig")
    m.add_argument("--max", type=int, help="largest batch tried (default: the preset's micro-batch)")
    m.add_argument("--start", type=int, default=1, help="first batch tried; doubled until one does not fit")
    m.add_argument("--device", default="auto")
    m.add_argument("--out", help="JSON file or directory (default: benchmarks/results on CUDA, none on CPU)")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return p


def _train(args) -> None:
    from reca.engine.config import apply_overrides, load_config
    from reca.engine.presets import preset

    if args.config and (args.preset or args.resume):
        raise UserError("--config starts a new run from a saved config; leave out --preset and --resume")
    overrides = []
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.json").is_file():
            raise UserError(f"nothing to resume in {run}: no config.json")
        cfg = load_config(run / "config.json")
        overrides.append(f"output.dir={run}")
        if args.out and Path(args.out) != run:
            raise UserError("--resume continues in its own run directory; leave out --out")
    elif args.config:
        cfg = load_config(args.config)
    else:
        cfg = preset(args.preset or "tiny")
    for flag, key in (("data", "data.source"), ("steps", "train.steps"), ("out", "output.dir"),
                      ("prompts", "sample.prompts"), ("device", "train.device"), ("init_from", "train.init_from")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.overwrite:
        overrides.append("output.overwrite=true")
    cfg = apply_overrides(cfg, overrides + args.set)  # every field validated here (reca.engine.config)
    if cfg.sample.prompts:
        from reca.engine.sample import load_instructions

        load_instructions(cfg.sample.prompts)  # a bad file refused now, not after the model is built

    from reca.engine.checkpoint.dcp import latest
    from reca.engine.distributed import launched

    # one rank of a torchrun job, or one process continuing a torchrun job's step-N/ folders
    if launched() or (args.resume and latest(cfg.output.dir) is not None):
        from reca.engine.distributed import train_distributed as train
    else:
        from reca.engine.train import train
    from reca.engine.train import Stopped

    try:
        if launched():  # a refusal, a lost rank: one line for the job (`reca.engine.ending`)
            from reca.engine.ending import ended

            ended(cfg.output.dir, lambda: train(cfg, resume=bool(args.resume), quiet=args.quiet))
            _leave_group()
        else:
            train(cfg, resume=bool(args.resume), quiet=args.quiet)
    except Stopped as e:  # checkpoint written, message printed: exit as a shell expects (130, 143)
        if launched():
            _leave_group()
        sys.exit(e.exit_status)


def _leave_group() -> None:
    """A torchrun rank whose job ended well leaves the process group before the interpreter
    exits: a gloo group still alive at exit is torn down with the process's statics and can
    abort it ("terminate called without an active exception", status -6: a finished job reported
    as failed by torchrun)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _sample(args) -> None:
    if args.preset is None and args.run is None:
        raise UserError("give a run directory, or --preset with --init-from weights")
    if args.init_from and args.preset is None:
        raise UserError("--init-from goes with --preset (a run loads its own weights)")
    weights = args.init_from or any(s.startswith("train.init_from=") for s in args.set)
    if args.preset is not None and not weights:  # a preset alone holds random weights
        raise UserError("--preset needs --init-from WEIGHTS (or give a run directory)")
    if args.prompt is not None:
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:  # bytes the shell's locale could not decode arrive as surrogates
            raise UserError("--prompt is not valid UTF-8 text (check the terminal's encoding)") from None
    if args.prompt is None and not args.image:  # before the model is built: it takes seconds
        raise UserError("give --prompt TEXT (text-to-image) or --image FILE (the image's visual prompt)")
    from reca.engine.generate import load_model, sample  # after the checks: it imports torch (seconds)

    cfg, model = load_model(run=args.run, preset=args.preset, init_from=args.init_from, sets=tuple(args.set),
                            device=args.device)
    for path in sample(model, cfg, out=args.out, prompt=args.prompt, images=tuple(args.image), num=args.num,
                       steps=args.steps, seed=args.seed):
        print(path)


def _export(args) -> None:
    from reca.engine.generate import export, load_model, run_weights

    weights = run_weights(args.run) if (Path(args.run) / "config.json").is_file() else None  # read once
    cfg, model = load_model(run=args.run, device="cpu", weights=weights)
    for path in export(model, cfg, args.to, ema=weights["ema"], overwrite=args.overwrite):
        print(path)


def _info(args) -> None:
    from reca.engine.config import apply_overrides
    from reca.engine.bench.info import describe
    from reca.engine.presets import preset

    cfg = apply_overrides(preset(args.preset), args.set + ([f"train.init_from={args.init_from}"] if args.init_from else []))
    if cfg.train.init_from:
        from reca.engine.build import with_release_tokenizer

        cfg = with_release_tokenizer(cfg)  # the release's own tokenizer decides Show-o's vocabulary
    if args.world_size is not None and args.world_size < 1:
        raise UserError("--world-size must be at least 1")
    try:
        report = describe(cfg, args.world_size)
    except ValueError as e:  # a family's cross-field check (e.g. image size vs the VAE's factor)
        raise UserError(f"model config: {e}") from None
    if cfg.train.init_from:
        from reca.engine.build import load_init_from
        from reca.models import build_model
        from reca.models.loading import headers_only

        import torch

        with torch.device("meta"), headers_only():
            report["init_from"] = load_init_from(build_model(cfg.model), cfg)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"preset {args.preset}: family {cfg.model.family}")
    width = max(len(m) for m in report["modules"])
    print(f"  {'module':<{width}}  {'parameters':>15}  trainable")
    for name, row in report["modules"].items():
        print(f"  {name:<{width}}  {row['parameters']:>15,}  {'yes' if row['trainable'] else 'no'}")
    print(f"  {'total':<{width}}  {report['parameters']:>15,}")
    print(f"  {'trainable':<{width}}  {report['trainable']:>15,}")
    if report["parts"]:
        print("  parts:")
        for name, n in report["parts"].items():
            print(f"    {name}: {n:,}")
    for key, value in report["shapes"].items():
        print(f"  {key}: {value}")
    if "init_from" in report:
        print(f"  {report['init_from']}")
    if "memory" in report:
        from reca.engine.bench.memory import format_table

        print("\n".join(format_table(report["memory"], args.world_size)))


def _bench(args) -> None:
    if args.bench == "memory":
        _bench_memory(args)
        return
    if args.bench == "batch":
        from reca.engine.bench.batch import bench_batch

        if args.start < 1 or (args.max is not None and args.max < 1):
            raise UserError("--start and --max must be at least 1")
        bench_batch(args.preset, limit=args.max, start=args.start, device=args.device, sets=args.set, out=args.out)
        return
    from reca.engine.bench.step import bench_step
    from reca.engine.distributed import launched

    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be at least 1 and --warmup at least 0")
    modes = [m for m in args.modes.split(",") if m]
    if not modes:
        raise UserError("--modes names no mode")
    if launched():  # per-GPU and aggregate throughput at N ranks beside one rank's (engine/bench/scaling.py)
        from reca.engine.bench.scaling import bench_scaling

        bench_scaling(args.preset, batch=args.batch, steps=args.steps, warmup=args.warmup, mode=modes[-1],
                      data=args.data, sets=args.set, out=args.out, baseline=not args.no_baseline)
        return
    bench_step(args.preset, batch=args.batch, steps=args.steps, warmup=args.warmup,
               modes=[m for m in args.modes.split(",") if m], device=args.device, data=args.data, profile=args.profile,
               sets=args.set, out=args.out)


def _under_torchrun() -> bool:
    import os

    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ  # distributed.launched


def _bench_memory(args) -> None:
    from reca.engine.config import apply_overrides
    from reca.engine.presets import preset

    if args.world_size < 1:
        raise UserError("--world-size must be at least 1")
    try:
        cards = tuple(int(c) for c in args.cards.split(",") if c.strip())
    except ValueError:
        raise UserError(f"--cards takes card sizes in GiB, e.g. 80,48,40; got {args.cards!r}") from None
    if not cards or min(cards) < 1:
        raise UserError(f"--cards takes card sizes in GiB, e.g. 80,48,40; got {args.cards!r}")
    cfg = apply_overrides(preset(args.preset), args.set)
    if args.validate:
        from reca.engine.bench.memreport import validate

        v = validate(cfg, args.world_size)
        print(f"reca bench memory --validate: {args.preset} at {args.world_size} rank(s): peak {v['fake']:,} bytes on "
              f"fake tensors, {v['real']:,} on real CPU tensors; measured_over_real {v['measured_over_real']:.4f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"preset": args.preset, "world_size": args.world_size, **v}, indent=2))
        return
    from reca.engine.bench.memreport import bench_memory

    bench_memory(cfg, name=args.preset, world_size=args.world_size, cards=cards, largest=args.largest,
                 json_out=args.json)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:  # torchrun's own options follow: not for this parser
        from reca.engine.launch import main as launch

        launch(argv[1:])
        return
    args = _parser().parse_args(argv)
    try:
        {"train": _train, "sample": _sample, "export": _export, "info": _info, "bench": _bench}[args.command](args)
    except UserError as e:
        if args.command == "train" and _under_torchrun():  # the job's ranks refuse together, one line
            from reca.engine.ending import refuse

            refuse(str(e))
        print(f"reca: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("reca: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
