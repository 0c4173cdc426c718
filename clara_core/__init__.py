"""clara core: hook specifications, plugin manager, registry, workspace and CLI."""

from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
