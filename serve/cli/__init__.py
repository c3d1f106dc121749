"""The ``stc-serve`` command (:func:`main`)."""
from serve.cli.main import main

__all__ = ["main"]
