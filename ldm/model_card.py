"""Model cards for trained pipelines, rendered from the templates in ``model_cards/`` with huggingface_hub."""

from __future__ import annotations

import os
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


def hub_ids(value: str | list[str] | None) -> list[str]:
    """The entries of ``value`` that can name a Hub repo: local folders and paths are dropped (the Hub rejects card
    metadata such as ``base_model: /home/me/run``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    kept = []
    for item in [value] if isinstance(value, str) else (value or []):
        try:
            validate_repo_id(item)
        except HFValidationError:
            continue
        if not os.path.exists(item):
            kept.append(item)
    return kept


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
    library_name: str = "ldm",
    pipeline_tag: str = "text-to-image",
    **fields,
) -> ModelCard:
    """Render ``template`` into ``<output_dir>/README.md`` and return the card.

    The YAML header carries ``library_name`` (``ldm``), ``pipeline_tag`` (``text-to-image``), ``tags``, ``license``, and
    ``base_model`` / ``datasets`` when they are Hub ids (local paths only reach the text); ``hyperparameters`` become a
    table (token-like keys are dropped); other ``fields`` go to the template.
    """
    base_ids, dataset_ids = hub_ids(base_model), hub_ids(datasets)
    card_data = ModelCardData(
        library_name=library_name, pipeline_tag=pipeline_tag, license=license,
        base_model=base_ids[0] if len(base_ids) == 1 else base_ids or None, datasets=dataset_ids or None,
        tags=[*(["text-to-image", "diffusion"] if pipeline_tag == "text-to-image" else []), "ldm", *(tags or [])],
    )
    params = {k: v for k, v in (hyperparameters or {}).items() if k not in _SECRET_KEYS}
    card = ModelCard.from_template(
        card_data, template_path=template_path(template), repo_id=repo_id or Path(output_dir).name,
        model_name=fields.pop("model_name", None) or repo_id or Path(output_dir).name, base_model=base_model,
        dataset=datasets, hyperparameters=params, **fields,
    )
    card.save(Path(output_dir) / "README.md")
    return card
