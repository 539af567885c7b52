"""Model definitions and the registry that builds them by name."""

from .registry import (available_models, create_model, create_model_from_spec, model_spec, model_title,
                       vgg_depth, vgg_name)
from .resnet import ResNet
from .vgg import VGG, VGG_CONFIGS, build_model, vgg, vgg_config

__all__ = ["ResNet", "VGG", "VGG_CONFIGS", "available_models", "build_model", "create_model",
           "create_model_from_spec", "model_spec", "model_title", "vgg", "vgg_config", "vgg_depth",
           "vgg_name"]
