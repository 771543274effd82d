"""Passes and time of the exact linear probe's CG solver with and without its Nystrom preconditioner.

    python benchmarks/bench_linear.py --backbone resnet152 --device cuda --rank 0 --rank 800 --direct

Fits ``LinearProbe`` (5 patterns, alpha chosen on 20% held out, then refitted) on the same encoded images
once per setting and prints one markdown row each (for benchmarks/RESULTS.md). The pass count is what the
preconditioner is for: every pass reads all the features, whatever the device.
"""

from __future__ import annotations

import argparse
import platform

import torch

from posprobe.backbones import create_backbone
from posprobe.features.encode import encode
from posprobe.readouts.linear import LinearProbe
from posprobe.studies.bench import bench_images


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--kernel-size", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, action="append",
                    help="cg_rank, repeatable; 0: no preconditioner (default: 0 and 800)")  # fmt: skip
    ap.add_argument("--max-iter", type=int, default=10000)
    ap.add_argument("--direct", action="store_true", help="also the direct solve (needs three D x D float64 matrices)")
    args = ap.parse_args(argv)
    train, _ = bench_images(args.n_train, 1, 224)
    features = encode(create_backbone(args.backbone, args.weights), train, 28, device=args.device, progress=False)
    settings = [dict(solver="cg", cg_rank=r, cg_max_iter=args.max_iter) for r in args.rank or [0, 800]]
    print(f"{args.backbone} ({args.weights}), k={args.kernel_size}, {len(train)} {train.name} images, {args.device}, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}\n")  # fmt: skip
    print("| solver | inputs D | CG passes | max residual | fit s | alphas chosen |\n|---|---|---|---|---|---|")
    for kw in settings + ([dict(solver="direct")] if args.direct else []):
        probe = LinearProbe(None, kernel_size=args.kernel_size, device=args.device, progress=False, **kw).fit(features)
        s = probe.summary()
        solver = f"cg, preconditioner {s['cg_preconditioner']}" if s["solver"] == "cg" else s["solver"]
        residual = f"{max(s['cg_residual'].values()):.1e}" if s["cg_residual"] else "-"
        print(f"| {solver} | {s['inputs']:,} | {s['cg_iterations']} | {residual} | {s['seconds']:.1f} | "
              f"{', '.join(f'{a:g}' for a in sorted(set(s['alpha'].values())))} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
