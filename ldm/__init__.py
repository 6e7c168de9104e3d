"""ldm: latent text-to-image diffusion on the Hugging Face stack.

Importing this package imports every model and scheduler module, which is what lets diffusers find
``["ldm.models.unet", "UNetModel"]``-style entries of a saved ``model_index.json``.
"""

from .models import DIT_SIZES, DenoiserOutput, DiTModel, UNetModel, dit_size_config
from .schedulers import ProgressiveDistillationScheduler

__version__ = "0.1.0"

__all__ = [
    "DIT_SIZES",
    "DenoiserOutput",
    "DiTModel",
    "ProgressiveDistillationScheduler",
    "UNetModel",
    "dit_size_config",
    "__version__",
]
