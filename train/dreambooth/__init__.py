"""DreamBooth on diffusers pipelines: the trainer (``python -m train.dreambooth``), its offline metrics, the default
subject and the comparison of methods (``python -m train.dreambooth.compare``)."""
