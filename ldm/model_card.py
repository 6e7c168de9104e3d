"""Model cards for trained pipelines, rendered from the templates in ``model_cards/`` with huggingface_hub."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

# Never put these into a card, whatever the caller passes.
_SECRET_KEYS = {"hub_token", "token", "hf_token"}


def template_path(name: str) -> str:
    """Path of ``model_cards/<name>.md`` (the folder ships as a package next to ``ldm``)."""
    path = resources.files("model_cards") / f"{name}.md"
    if not path.is_file():
        available = sorted(p.name[:-3] for p in resources.files("model_cards").iterdir() if p.name.endswith(".md"))
        raise ValueError(f"No model card template {name!r}; available: {available}")
    return str(path)


def render_model_card(
    output_dir: str | Path,
    template: str = "text_to_image",
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    datasets: str | list[str] | None = None,
    license: str = "apache-2.0",
    tags: list[str] | None = None,
    hyperparameters: dict | None = None,
    **fields,
) -> ModelCard:
    """Render ``template`` into ``<output_dir>/README.md`` and return the card.

    The YAML header carries ``library_name: ldm``, ``pipeline_tag: text-to-image``, ``tags``, ``base_model``,
    ``datasets`` and ``license``; ``hyperparameters`` become a table (token-like keys are dropped); other ``fields``
    go to the template.
    """
    card_data = ModelCardData(
        library_name="ldm", pipeline_tag="text-to-image", license=license, base_model=base_model,
        datasets=[datasets] if isinstance(datasets, str) else datasets,
        tags=["text-to-image", "diffusion", "ldm", *(tags or [])],
    )
    params = {k: v for k, v in (hyperparameters or {}).items() if k not in _SECRET_KEYS}
    card = ModelCard.from_template(
        card_data, template_path=template_path(template), repo_id=repo_id or Path(output_dir).name,
        model_name=fields.pop("model_name", None) or repo_id or Path(output_dir).name, base_model=base_model,
        dataset=datasets, hyperparameters=params, **fields,
    )
    card.save(Path(output_dir) / "README.md")
    return card
