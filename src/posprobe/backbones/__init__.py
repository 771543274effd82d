"""Registered backbones. Importing this package registers every built-in family."""
# Registration order is listing order: the control, the paper's CNNs, then the bundled-weights models.
from . import posenet, torchvision_cnns, hed, efficientnet_lite  # noqa: F401,I001
from .registry import (
    INPUT_NORMS,
    Backbone,
    BackboneSpec,
    Level,
    create_backbone,
    get_backbone_spec,
    list_backbones,
    register_backbone,
)

__all__ = ["INPUT_NORMS", "Backbone", "BackboneSpec", "Level", "create_backbone", "get_backbone_spec",
           "list_backbones", "register_backbone"]  # fmt: skip
