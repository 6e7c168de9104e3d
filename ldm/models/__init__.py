"""Denoisers: a conditional U-Net and a DiT, both diffusers ``ModelMixin``/``ConfigMixin`` models."""

from .common import DenoiserOutput
from .dit import DIT_SIZES, DiTModel, dit_size_config
from .unet import UNetModel

__all__ = ["DenoiserOutput", "DiTModel", "DIT_SIZES", "UNetModel", "dit_size_config"]
