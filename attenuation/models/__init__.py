"""Model definitions."""

from .vgg import VGG, VGG_CONFIGS, build_model, vgg, vgg_config

__all__ = ["VGG", "VGG_CONFIGS", "build_model", "vgg", "vgg_config"]
