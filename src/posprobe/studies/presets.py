"""The paper's tables and figures as declarative presets (run by ``study.run_study``).

Row keys match ``resources/paper_values.json`` so each cell finds the paper's printed value. A new table
is written the same way: a StudyPreset naming variants, patterns and test sets.
"""

from __future__ import annotations

from ..errors import unknown_choice
from .study import Direction, StudyPreset, Variant

ALL_TESTS = ("natural", "black", "white", "noise")
VGG16_LEVEL_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")

POSENET = Variant("posenet", "PosENet", "posenet")
VGG16 = Variant("vgg16", "VGG16", "vgg16")
RESNET152 = Variant("resnet152", "ResNet-152", "resnet152")


def _readouts(backbone: str, label: str, kind: str, values) -> tuple[Variant, ...]:
    """Variants of one backbone that differ in one readout setting (depth, kernel size or padding)."""
    out = []
    for value in values:
        key, settings = {
            "depth": (f"depth{value}", {"depth": value}),
            "kernel": (f"k{value}", {"kernel_size": value}),
            "padding": (f"pad{value}", {"padding": value}),
        }[kind]
        out.append(Variant(f"{backbone}/{key}", f"{label}, {kind} {value}", backbone, **settings))
    return tuple(out)


PRESETS: dict[str, StudyPreset] = {}


def _add(preset: StudyPreset) -> None:
    PRESETS[preset.name] = preset


_add(
    StudyPreset(
        "table1",
        "Table 1: position read out by a 3x3 readout (no padding) on natural and synthetic images",
        variants=(POSENET, VGG16, RESNET152),
        patterns=("H", "V", "G", "HS", "VS"),
        test_sets=ALL_TESTS,
        paper_table="table1",
        directions=(
            Direction("VGG16 features carry more position than PosENet alone", ("posenet", "vgg16"), ("H", "V", "G")),
            Direction(
                "ResNet-152 features carry more position than PosENet alone", ("posenet", "resnet152"), ("H", "V", "G")
            ),
            Direction("ResNet-152 carries more position than VGG16", ("vgg16", "resnet152"), ("H", "V", "G")),
        ),
    )
)
_add(
    StudyPreset(
        "table2a",
        "Table 2(a): stacking 3x3 readout layers",
        variants=_readouts("posenet", "PosENet", "depth", (1, 2, 3)) + _readouts("vgg16", "VGG16", "depth", (1, 2, 3)),
        patterns=("H", "G", "HS"),
        paper_table="table2a",
        directions=(
            Direction(
                "a deeper readout reads out more from VGG16 features",
                ("vgg16/depth1", "vgg16/depth2", "vgg16/depth3"),
                ("H", "G", "HS"),
            ),
        ),
    )
)
_add(
    StudyPreset(
        "table2b",
        "Table 2(b): readout kernel size (one layer; the paper prints no 5x5 row)",
        variants=_readouts("posenet", "PosENet", "kernel", (1, 3, 5, 7))
        + _readouts("vgg16", "VGG16", "kernel", (1, 3, 5, 7)),
        patterns=("H", "G", "HS"),
        paper_table="table2b",
        directions=(
            Direction(
                "a wider readout kernel reads out more from VGG16 features",
                ("vgg16/k1", "vgg16/k3", "vgg16/k7"),
                ("H", "G", "HS"),
            ),
        ),
    )
)
_add(
    StudyPreset(
        "table3",
        "Table 3: VGG16 with one tapped level at a time (f1..f5) and all levels",
        variants=tuple(
            Variant(f"vgg16/f{i}", f"VGG16 f{i} ({name})", "vgg16", levels=(name,))
            for i, name in enumerate(VGG16_LEVEL_NAMES, start=1)
        )
        + (Variant("vgg16/all", "VGG16 all levels", "vgg16"),),
        patterns=("H", "G", "HS"),
        paper_table="table3",
        directions=(
            Direction(
                "deeper VGG16 levels carry more position than shallow ones",
                ("vgg16/f1", "vgg16/f2", "vgg16/f3", "vgg16/f4", "vgg16/f5"),
                ("H", "G"),
            ),
        ),
        notes="The paper reports no HS row for Table 3.",
    )
)
_add(
    StudyPreset(
        "table4",
        "Table 4: zero padding in the readout (PosENet) and in the encoder (VGG16 with and without)",
        variants=_readouts("posenet", "PosENet", "padding", (0, 1, 2))
        + (
            Variant("vgg16", "VGG16 (zero padding 1)", "vgg16"),
            Variant("vgg16_nopad", "VGG16 without padding", "vgg16_nopad"),
        ),
        patterns=("H", "G", "HS"),
        paper_table="table4",
        directions=(
            Direction(
                "readout zero padding lets PosENet read position",
                ("posenet/pad0", "posenet/pad1", "posenet/pad2"),
                ("H", "G", "HS"),
            ),
            Direction(
                "VGG16 with padding carries more position than the same weights without",
                ("vgg16_nopad", "vgg16"),
                ("H", "G", "HS"),
            ),
        ),
    )
)
_add(
    StudyPreset(
        "fig-qualitative",
        "Fig. 4/5: targets and predictions across backbones and readout settings",
        variants=(
            POSENET,
            Variant("posenet/pad2", "PosENet, padding 2", "posenet", padding=2),
            VGG16,
            Variant("vgg16/k7", "VGG16, 7x7 readout", "vgg16", kernel_size=7),
            RESNET152,
        ),
        patterns=("H", "G", "HS"),
        paper_table=None,
        figure="qualitative",
    )
)
_add(
    StudyPreset(
        "fig-padding",
        "Fig. 6: readout zero padding and the Gaussian (PosENet, padding 0, 1, 2)",
        variants=_readouts("posenet", "PosENet", "padding", (0, 1, 2)),
        patterns=("G",),
        test_sets=ALL_TESTS,
        paper_table="table4",
        figure="padding",
    )
)
_add(
    StudyPreset(
        "fig-content-loss",
        "Fig. 7: where image content disturbs the position readout, L = mean |target - prediction| over H, V, G",
        variants=(VGG16, RESNET152),
        patterns=("H", "V", "G"),
        paper_table=None,
        figure="content_loss",
    )
)

TABLES = tuple(name for name, p in PRESETS.items() if p.figure is None)
FIGURES = tuple(name for name, p in PRESETS.items() if p.figure is not None)


def get_preset(name: str) -> StudyPreset:
    if name not in PRESETS:
        raise unknown_choice("table or figure", name, [*PRESETS, "all"])
    return PRESETS[name]
