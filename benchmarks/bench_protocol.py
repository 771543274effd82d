"""Time a Table 1 column against the encoder floor and the authors' protocol, for several backbones.

    python benchmarks/bench_protocol.py --backbone vgg16 --backbone resnet152 --out benchmarks/results.json
    python benchmarks/bench_protocol.py --backbone vgg16 --synthetic-dataset 11403 --repeats 1   # paper scale

The same as ``posprobe bench``, plus a markdown table of the figures (for benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from posprobe.studies.bench import run_bench


def markdown(results: list[dict]) -> str:
    """One row per backbone: the three timings, the ratios and the peak memory of each phase."""
    lines = [
        "| backbone | images | updates | (d) decode s | (a) floor s | (b) posprobe s | (b2) warm cache s "
        "| (c) authors s | b/a | c/b | img/s a / b | peak RSS MB a / b / c |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d, a, b, b2, c = r["decode"], r["floor"], r["posprobe"], r["posprobe_warm"], r["authors"]
        rate = r["images_per_s"]
        lines.append(
            f"| {r['backbone']} ({r['weights']}) | {r['images']:,} | {r['updates']:,} | {d['wall_s']:.1f} | "
            f"{a['wall_s']:.1f} | {b['wall_s']:.1f} | {b2['wall_s']:.1f} | {c['wall_s']:.0f} | {r['b_over_a']:.2f} | "
            f"{r['c_over_b']:.1f} | {rate['floor']:.2f} / {rate['posprobe']:.2f} | "
            f"{a['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} / {c['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", action="append", help="repeatable (default: vgg16 and resnet152)")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-test", type=int, default=12)
    ap.add_argument("--profile", default="official")
    ap.add_argument("--steps", type=int, help="exactly this many SGD updates instead of the profile's")
    ap.add_argument("--epochs", type=int, help="exactly this many passes, as the authors' code counts them")
    ap.add_argument("--authors-batches", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--synthetic-dataset", type=int, help="N JPEGs at DUT-S sizes (11403 = 10,553 + 850)")
    ap.add_argument("--dataset-dir", type=Path, help="keep the synthetic JPEGs here (reused next time)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, help="write the measurements as JSON here")
    args = ap.parse_args(argv)
    results = []
    for name in args.backbone or ["vgg16", "resnet152"]:
        r = run_bench(name, args.weights, args.n_train, args.n_test, profile=args.profile, steps=args.steps,
                      epochs=args.epochs, authors_batches=args.authors_batches, repeats=args.repeats,
                      synthetic_dataset=args.synthetic_dataset, dataset_dir=args.dataset_dir, device=args.device,
                      log=lambda m: print(m, file=sys.stderr))  # fmt: skip
        print(r.report(), end="\n\n")
        results.append(r.to_dict())
    print(markdown(results))
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
