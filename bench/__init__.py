"""The benchmark against Hugging Face PEFT (``python -m bench --help``); the library never imports it."""

from .cli import main
from .measure import run_config, svd_report
from .report import chart, markdown, pool, table

__all__ = ["chart", "main", "markdown", "pool", "run_config", "svd_report", "table"]
