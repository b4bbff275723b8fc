"""Rectified-flow ops, BAGEL/OpenUni shapes: 48 samples x 1024 latent tokens x 64 channels
(2x2 patches of 16-channel latents). Times `flow_matching_loss` (pred requires grad, x0 and
noise are data, as in training) and `flow_matching_noise` (all of x0, noise, t requiring grad).

    python benchmarks/kernels/bench_flow_matching.py            # GPU
    python benchmarks/kernels/bench_flow_matching.py --smoke    # CPU, interpreter, tiny shapes
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import torch  # noqa: E402

from reca.kernels.flow_matching.kernel import flow_matching_loss, flow_matching_noise  # noqa: E402
from reca.kernels.flow_matching.reference import flow_matching_loss_ref, flow_matching_noise_ref  # noqa: E402


def main():
    args = harness.parse_args(__doc__)
    B, T, C = (2, 16, 64) if args.smoke else (48, 1024, 64)
    dev, dt = args.device, args.dtype
    x0 = torch.randn(B, T, C, device=dev, dtype=dt)
    noise = torch.randn(B, T, C, device=dev, dtype=dt)
    mask = torch.rand(B, T, device=dev) < 0.9
    n, es = B * T * C, torch.finfo(dt).bits // 8
    shape = {"B": B, "T": T, "C": C, "mask": "90% tokens"}
    compile_ok = not args.no_compile and not args.smoke

    def loss_provider(fn):
        def build():
            pred = torch.randn(B, T, C, device=dev, dtype=dt, requires_grad=True)
            return (lambda: fn(pred, x0, noise, mask)), [pred]
        return build

    providers = {"triton": loss_provider(flow_matching_loss), "torch": loss_provider(flow_matching_loss_ref)}
    if compile_ok:
        providers["compile"] = loss_provider(harness.compile_fn(flow_matching_loss_ref))
    # Minimum traffic: read pred, x0, noise; backward writes d pred (ours writes it in the forward
    # and scales it in backward: a read + write more, counted against us by this fixed figure).
    cost = {"fwd": {"bytes": 3 * n * es}, "bwd": {"bytes": n * es}, "fwd+bwd": {"bytes": 4 * n * es}}
    harness.run_op("flow_matching_loss", args, shape, providers, cost)

    def noise_provider(fn):
        def build():
            a = torch.randn(B, T, C, device=dev, dtype=dt, requires_grad=True)
            b = torch.randn(B, T, C, device=dev, dtype=dt, requires_grad=True)
            t = torch.rand(B, device=dev, dtype=dt, requires_grad=True)
            return (lambda: fn(a, b, t)), [a, b, t]
        return build

    providers = {"triton": noise_provider(flow_matching_noise), "torch": noise_provider(flow_matching_noise_ref)}
    if compile_ok:
        providers["compile"] = noise_provider(harness.compile_fn(flow_matching_noise_ref))
    # forward: read x0, noise, write x_t; backward: read g, x0, noise, write d x0, d noise.
    cost = {"fwd": {"bytes": 3 * n * es}, "bwd": {"bytes": 5 * n * es}, "fwd+bwd": {"bytes": 8 * n * es}}
    harness.run_op("flow_matching_noise", args, shape, providers, cost)


if __name__ == "__main__":
    main()
