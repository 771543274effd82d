"""The embedded default: the paper's tables on the bundled photos, with encoders that need no download.

It is ``reproduce`` in the quick profile with bundled stand-ins for the paper's ImageNet CNNs where their
weights are missing (``--backbone-map auto``): the HED VGG16 (a trained VGG16, edge detection, not
ImageNet) for VGG16, EfficientNet-Lite0 (real ImageNet weights) for ResNet-152. Table 1 gains a VGG16
with random weights, which shows what the architecture alone (zero padding, depth) encodes.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .cache import FeatureCache
from .presets import PRESETS, Variant
from .reproduce import build_image_sets, describe_data, run_reproduce
from .train import get_profile

DEMO_TABLE1 = replace(
    PRESETS["table1"],
    variants=PRESETS["table1"].variants + (Variant("vgg16-random", "VGG16 (random weights)", "vgg16", "random"),),
)
DEMO_PRESETS = (DEMO_TABLE1, PRESETS["table2a"], PRESETS["table2b"], PRESETS["table4"], PRESETS["fig-qualitative"],
                PRESETS["fig-padding"], PRESETS["fig-content-loss"])  # fmt: skip


def run_demo(out: Path, profile: str = "quick", device: str = "cpu", overwrite: bool = False,
             progress: bool = True, crops_per_photo: int = 8, cache: FeatureCache | None = None) -> str:  # fmt: skip
    """Run the demo presets on the bundled photos and write the report directory; returns report.md's text."""
    train, tests = build_image_sets(None, None, DEMO_PRESETS, crops_per_photo=crops_per_photo)
    report, _ = run_reproduce(DEMO_PRESETS, out, get_profile(profile), profile, train, tests, seeds=1,
                              auto_substitute=True, device=device, overwrite=overwrite, progress=progress,
                              data_label=describe_data(None, None), cache=cache)  # fmt: skip
    return report
