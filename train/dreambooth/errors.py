"""The DreamBooth trainer's named error."""


class DreamBoothError(ValueError):
    """Bad input to the DreamBooth trainer: a missing folder, no images, an unknown method or pipeline."""
