"""Conditioning (embedding + visual prompt scatter), Harmon shapes: B=48, S=1216, D=1536,
1088 visual tokens per sample, Qwen2.5 vocabulary 151,936; grad_scale 0.1 on the visual prompt.

    python benchmarks/kernels/bench_condition.py            # GPU
    python benchmarks/kernels/bench_condition.py --smoke    # CPU, interpreter, tiny shapes
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (sets TRITON_INTERPRET before triton is imported on CPU)

import torch  # noqa: E402

from reca.kernels.condition.kernel import condition  # noqa: E402
from reca.kernels.condition.reference import condition_ref  # noqa: E402

IMG = 151655  # Qwen2.5's <|image_pad|>


def main():
    args = harness.parse_args(__doc__)
    B, S, D, V, NV = (2, 40, 48, 1000, 32) if args.smoke else (48, 1216, 1536, 151936, 1088)
    dev, dt = args.device, args.dtype
    img = IMG if V > IMG else V - 1
    ids = torch.randint(0, img, (B, S), device=dev)
    ids[:, 1 : 1 + NV] = img

    def make(fn):
        def build():
            embed = torch.randn(V, D, device=dev, dtype=dt, requires_grad=True)
            visual = torch.randn(B * NV, D, device=dev, dtype=dt, requires_grad=True)
            return (lambda: fn(ids, embed, visual, img, grad_scale=0.1)), [embed, visual]
        return build

    providers = {
        "triton": make(condition),
        "triton-det": make(lambda *a, **k: condition(*a, deterministic=True, **k)),
        "torch": make(condition_ref),
    }
    if not args.no_compile and not args.smoke:
        providers["compile"] = make(harness.compile_fn(condition_ref))
    es = torch.finfo(dt).bits // 8
    M = B * S
    # Minimum traffic: forward reads one D-row per position and writes it; backward reads the
    # gradient, writes the visual rows and (at least) the touched embedding rows.
    fwd = 2 * M * D * es
    cost = {"fwd": {"bytes": fwd}, "bwd": {"bytes": fwd}, "fwd+bwd": {"bytes": 2 * fwd}}
    harness.run_op("condition", args, {"B": B, "S": S, "D": D, "V": V, "visual_per_sample": NV}, providers, cost)


if __name__ == "__main__":
    main()
