"""Denoisers: a conditional U-Net and a DiT, both diffusers ``ModelMixin``/``ConfigMixin`` models."""

from .common import DenoiserOutput
from .dit import DIT_SIZES, DiTModel, dit_size_config
from .unet import UNET_SIZES, UNetModel, unet_size_config

__all__ = ["DenoiserOutput", "DiTModel", "DIT_SIZES", "UNET_SIZES", "UNetModel", "dit_size_config", "unet_size_config"]
