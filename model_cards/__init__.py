"""Model-card templates (Jinja, rendered with ``huggingface_hub.ModelCard.from_template`` by ``ldm.model_card``)."""
