"""The package version, in a module of its own so that the modules that record it (adapter files) need not import
the package's ``__init__`` and with it every other module."""

__version__ = "0.2.0"
