"""The offline assets: the VTAB-offline tasks, the digits set, the shipped backbone and the pretraining of the
backbone and of the tiny text-to-image pipeline."""
