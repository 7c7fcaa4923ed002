"""VTAB-1k classification: the trainer (``python -m train.vtab``), its data and the suite of methods x tasks x seeds
(``python -m train.vtab.suite``)."""
