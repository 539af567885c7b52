"""attenuation: CNN filter pruning by filter attenuation (Mousa-Pasandi et al., ICIP 2020)."""
from . import ops
from .batch_norm import ChannelsLastBatchNorm2d, convert_batch_norms
from .channels_last import as_channels_last
from .max_pool import ChannelsLastMaxPool2d, convert_max_pools
from .criteria import available_criteria, register_criterion
from .layers import ModelGroups, find_groups
from .methods import available_methods, method_config
from .modules import AttenuatedConv2d, convert_model
from .pruner import Pruner
from .pruning_config import PruningConfig

__version__ = "0.1.0"

__all__ = [
    "ops", "AttenuatedConv2d", "convert_model", "ModelGroups", "find_groups",
    "Pruner", "PruningConfig", "method_config", "available_methods", "register_criterion",
    "available_criteria", "ChannelsLastBatchNorm2d", "convert_batch_norms", "ChannelsLastMaxPool2d",
    "convert_max_pools", "as_channels_last",
]
