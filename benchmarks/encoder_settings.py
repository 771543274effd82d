"""Which encoder settings are fastest on this machine: layout, threads, batch size, workers, OpenMP waiting.

    python benchmarks/encoder_settings.py [--backbone vgg16] [--images 32]

Every setting runs in its own process (OpenMP reads OMP_WAIT_POLICY once, at start-up): one warm-up pass
of ``features.encode`` over the same images, then one timed pass. The settings run in interleaved rounds and
each reports its fastest and its median round, so that load from other work on a shared machine falls on
every setting alike. The DataLoader-worker rows decode JPEG files from a temporary folder; the others
encode images already in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one(backbone: str, n: int, batch: int, threads: int, channels_last: bool, workers: int, folder: str | None,
         repeats: int) -> float:  # fmt: skip
    import torch

    torch.set_num_threads(threads)
    from posprobe.backbones import create_backbone
    from posprobe.data import FolderImages
    from posprobe.features.encode import encode as features
    from posprobe.studies.bench import bench_images

    bb = create_backbone(backbone, "random")
    images = FolderImages(folder, 224) if folder else bench_images(n, 1, 224)[0]
    if not channels_last:  # the layout switch: encode() decides it in prepare_encoder
        orig = features.prepare_encoder
        features.prepare_encoder = lambda b, d: (orig(b, d)[0].to(memory_format=torch.contiguous_format), False)
    features.encode(bb, images, 28, batch, num_workers=workers, progress=False)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        features.encode(bb, images, 28, batch, num_workers=workers, progress=False)
        times.append((time.perf_counter() - t) / len(images))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="vgg16")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        c = json.loads(args.child)
        print(json.dumps(_one(args.backbone, args.images, c["batch"], c["threads"], c["channels_last"], c["workers"],
                              c.get("folder"), 1)))  # fmt: skip
        return
    from posprobe.studies.bench import bench_images

    base = {"batch": 16, "threads": 2, "channels_last": True, "workers": 0, "omp_wait": "PASSIVE"}
    grid = [dict(base)]
    grid += [dict(base, channels_last=False), dict(base, threads=1), dict(base, batch=8), dict(base, batch=32),
             dict(base, omp_wait="default"), dict(base, workers=1)]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        train, _ = bench_images(args.images, 1, 224)
        from PIL import Image

        for i in range(len(train)):  # JPEG files, to time decoding in workers against decoding inline
            arr = (train[i].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            Image.fromarray(arr).save(Path(tmp) / f"{i:03d}.jpg", quality=90)
        grid += [dict(base, folder=tmp, workers=0), dict(base, folder=tmp, workers=1)]
        print(f"{args.backbone}, {args.images} images, {args.rounds} interleaved rounds; base: {base}")
        times: list[list[float]] = [[] for _ in grid]
        for _ in range(args.rounds):
            for k, setting in enumerate(grid):
                env = dict(os.environ)
                # libgomp's default is to spin before sleeping; ACTIVE is the closest explicit setting
                env["OMP_WAIT_POLICY"] = "ACTIVE" if setting["omp_wait"] == "default" else setting["omp_wait"]
                out = subprocess.run([sys.executable, __file__, "--backbone", args.backbone, "--images",
                                      str(args.images), "--child", json.dumps(setting)],
                                     env=env, capture_output=True, text=True, check=True)  # fmt: skip
                times[k].append(float(out.stdout.strip().splitlines()[-1]))
        for setting, ts in zip(grid, times):
            changed = {k: v for k, v in setting.items() if base.get(k) != v and k != "folder"}
            label = ", ".join(f"{k}={v}" for k, v in changed.items()) or "base"
            if "folder" in setting:
                label = f"JPEG folder, workers={setting['workers']}"
            ts = sorted(ts)
            print(f"{label:<40}fastest {ts[0] * 1000:6.0f}   median {ts[len(ts) // 2] * 1000:6.0f} ms/image")


if __name__ == "__main__":
    main()
