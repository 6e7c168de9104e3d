"""diffusers-compatible pipelines of ldm."""


def _check_ldm() -> None:
    """The ``ldm`` on the path must be this project's: CompVis' latent-diffusion also installs a package ``ldm``."""
    import ldm

    if not getattr(ldm, "IS_LDM_HF", False):
        raise ImportError(
            f"The module 'ldm' imported from {getattr(ldm, '__file__', '?')} is not this project's ldm (another "
            "package uses the same name, e.g. CompVis latent-diffusion). Uninstall it or remove it from the path "
            "(PYTHONPATH, the current folder), or load the pipeline's portable export with "
            "DiffusionPipeline.from_pretrained(..., trust_remote_code=True)."
        )


_check_ldm()

from .pipeline_latent import LatentPipeline  # noqa: E402

__all__ = ["LatentPipeline"]
