"""diffusers-compatible pipelines of ldm."""

from .pipeline_latent import LatentPipeline

__all__ = ["LatentPipeline"]
