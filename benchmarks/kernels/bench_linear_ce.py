"""Linear cross-entropy, Show-o shapes: N=8192 rows, D=2048 (Phi-1.5), V=58,498 (unified vocab).

Providers: ours (never materialises the logits), torch eager reference (F.linear +
F.cross_entropy in fp32), torch.compile of it, and Liger-Kernel's fused linear cross-entropy
when `liger_kernel` imports (it materialises logits chunk by chunk). TFLOP/s use the model
FLOPs: forward 2NDV, backward 4NDV (our backward also recomputes the logits: 6NDV done).
On CUDA it also prints each provider's peak memory, and the extra peak (less the gradients) as
a fraction of the bf16 logits, against the goal of < 5%.

    python benchmarks/kernels/bench_linear_ce.py            # GPU
    python benchmarks/kernels/bench_linear_ce.py --smoke    # CPU, interpreter, tiny shapes
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import torch  # noqa: E402

from reca.kernels.linear_ce.kernel import linear_cross_entropy  # noqa: E402
from reca.kernels.linear_ce.reference import linear_cross_entropy_ref  # noqa: E402


def _liger():
    """Liger's fused linear CE as (h, w, targets) -> mean loss. Checked against liger-kernel 0.8.5
    (the version PENDING.md unpacks into .gpu_deps): forward(lin_weight, _input, target, bias=None)
    returns the loss tensor while no z-loss / accuracy output is asked for."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
    return lambda h, w, tgt: loss(w, h, tgt)


def main():
    args = harness.parse_args(__doc__)
    N, D, V = (64, 96, 1000) if args.smoke else (8192, 2048, 58498)
    dev, dt = args.device, args.dtype
    targets = torch.randint(0, V, (N,), device=dev)
    targets[::10] = -100  # prompt / padding rows

    def make(fn):
        def build():
            h = (torch.randn(N, D, device=dev, dtype=dt)).requires_grad_()
            w = (torch.randn(V, D, device=dev, dtype=dt) * D**-0.5).requires_grad_()
            return (lambda: fn(h, w, targets)), [h, w]
        return build

    providers = {"triton": make(linear_cross_entropy), "torch": make(linear_cross_entropy_ref)}
    if not args.no_compile and not args.smoke:
        providers["compile"] = make(harness.compile_fn(linear_cross_entropy_ref))
    if not args.smoke:
        try:
            providers["liger"] = make(_liger())
        except Exception as e:  # not installed, or built for another torch / triton: no baseline
            print(f"liger_kernel not usable ({type(e).__name__}: {e}): no Liger baseline")
    f = 2 * N * D * V
    cost = {"fwd": {"flops": f}, "bwd": {"flops": 2 * f}, "fwd+bwd": {"flops": 3 * f}}
    # The memory goal: beyond its inputs and gradients, the op may hold < 5% of the
    # logits it avoids materialising (N x V in bf16).
    logits = {"name": "logits", "bytes": N * V * 2, "goal": 0.05}
    harness.run_op("linear_cross_entropy", args, {"N": N, "D": D, "V": V}, providers, cost, memory_ref=logits)


if __name__ == "__main__":
    main()
