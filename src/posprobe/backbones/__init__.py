"""Registered backbones. Importing this package registers every built-in family."""

# Registration order is listing order: the control, the paper's CNNs, then the bundled-weights models.
# tv_models and timm_models resolve the "tv:NAME" and "timm:NAME" backbones on demand (timm imported lazily).
from . import posenet, torchvision_cnns, hed, efficientnet_lite, tv_models, timm_models  # noqa: F401,I001
from .padding import BACKBONE_PADDINGS, PaddingReport, repad
from .pos_embed import POS_EMBEDS, set_pos_embed
from .registry import (
    INPUT_NORMS,
    Backbone,
    BackboneSpec,
    LayerInfo,
    Level,
    create_backbone,
    get_backbone_spec,
    layer_table,
    list_backbones,
    parse_layers,
    register_backbone,
    register_resolver,
)

__all__ = [
    "BACKBONE_PADDINGS",
    "INPUT_NORMS",
    "POS_EMBEDS",
    "Backbone",
    "BackboneSpec",
    "LayerInfo",
    "Level",
    "PaddingReport",
    "create_backbone",
    "get_backbone_spec",
    "layer_table",
    "list_backbones",
    "parse_layers",
    "register_backbone",
    "register_resolver",
    "repad",
    "set_pos_embed",
]
