"""ldm: latent text-to-image diffusion on the Hugging Face stack.

Importing this package imports every model and scheduler module, which is what lets diffusers find
``["ldm.models.unet", "UNetModel"]``-style entries of a saved ``model_index.json``.
"""

from .models import DIT_SIZES, UNET_SIZES, DenoiserOutput, DiTModel, UNetModel, dit_size_config, unet_size_config
from .schedulers import ProgressiveDistillationScheduler

__version__ = "0.1.0"
IS_LDM_HF = True  # tells this project's ldm from other packages of the same name (pipelines checks it)



def __getattr__(name: str):
    """``from ldm import LatentPipeline`` (the pipeline lives in the top-level ``pipelines`` package, which imports
    this one, so it is looked up on first use)."""
    if name == "LatentPipeline":
        from pipelines import LatentPipeline

        return LatentPipeline
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")


__all__ = [
    "DIT_SIZES",
    "LatentPipeline",
    "DenoiserOutput",
    "DiTModel",
    "ProgressiveDistillationScheduler",
    "UNET_SIZES",
    "UNetModel",
    "dit_size_config",
    "unet_size_config",
    "__version__",
]
