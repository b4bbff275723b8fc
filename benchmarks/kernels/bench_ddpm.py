"""DDPM loss of the MAR diffusion head, Harmon shapes: 4 x 48 x 1024 tokens (each latent token
repeated 4 times with its own t and noise), 16 channels, model output 2 x 16 (eps, variance),
cosine schedule of 1000 steps, loss on the ~90% masked tokens.

    python benchmarks/kernels/bench_ddpm.py            # GPU
    python benchmarks/kernels/bench_ddpm.py --smoke    # CPU, interpreter, tiny shapes
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import torch  # noqa: E402

from reca.kernels.ddpm.kernel import ddpm_loss  # noqa: E402
from reca.kernels.ddpm.reference import ddpm_loss_ref  # noqa: E402
from reca.kernels.ddpm.schedule import cosine_schedule  # noqa: E402


def main():
    args = harness.parse_args(__doc__)
    N, C = (256, 16) if args.smoke else (4 * 48 * 1024, 16)
    dev, dt = args.device, args.dtype
    sched = cosine_schedule(device=dev)
    x0 = torch.randn(N, C, device=dev, dtype=dt) * 0.5
    noise = torch.randn(N, C, device=dev, dtype=dt)
    t = torch.randint(0, 1000, (N,), device=dev)
    mask = torch.rand(N, device=dev) < 0.9

    def make(fn):
        def build():
            out = torch.randn(N, 2 * C, device=dev, dtype=dt).clamp(-1, 1).requires_grad_()
            return (lambda: fn(out, x0, noise, t, sched, mask)), [out]
        return build

    providers = {"triton": make(ddpm_loss), "torch": make(ddpm_loss_ref)}
    if not args.no_compile and not args.smoke:
        providers["compile"] = make(harness.compile_fn(ddpm_loss_ref))
    es = torch.finfo(dt).bits // 8
    # Minimum traffic: read model_out (2C), x0, noise (C each), t and mask; write d model_out (2C).
    read = N * (4 * C * es + 8 + 1)
    cost = {"fwd": {"bytes": read}, "bwd": {"bytes": 2 * C * N * es}, "fwd+bwd": {"bytes": read + 2 * C * N * es}}
    harness.run_op("ddpm_loss", args, {"N": N, "C": C, "mask": "90% tokens"}, providers, cost)


if __name__ == "__main__":
    main()
