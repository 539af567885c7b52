"""attenuation: CNN filter pruning by filter attenuation (Mousa-Pasandi et al., ICIP 2020)."""
from . import ops
from .criteria import available_criteria, register_criterion
from .layers import PrunableLayer, find_prunable_layers
from .methods import available_methods, method_config
from .modules import AttenuatedConv2d, convert_model
from .pruner import Pruner, PruningConfig

__version__ = "0.1.0"

__all__ = [
    "ops", "AttenuatedConv2d", "convert_model", "PrunableLayer", "find_prunable_layers",
    "Pruner", "PruningConfig", "method_config", "available_methods", "register_criterion",
    "available_criteria",
]
