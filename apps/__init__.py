"""Applications built on psoft_vision: ``python -m apps.gradio_app`` previews what an adapter does."""
