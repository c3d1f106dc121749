"""Frame types, frame sources, sampling and the model adapters (no Ray here).

Layering: ``stream`` (I/O + model adapters) <- ``cache`` / ``pruner`` (algorithms, per-stream state)
<- ``serve`` (pipeline composition, CLI, Ray Serve shims).
"""
from stream.errors import (
    ConfigError,
    RequestError,
    SourceError,
    SourceFormatError,
    SourceNotFoundError,
    SourceTimeoutError,
    SourceUnreachableError,
    StcError,
    StreamExistsError,
    StreamNotFoundError,
)
from stream.frames import Frame, FrameBatch

__all__ = [
    "ConfigError",
    "Frame",
    "FrameBatch",
    "RequestError",
    "SourceError",
    "SourceFormatError",
    "SourceNotFoundError",
    "SourceTimeoutError",
    "SourceUnreachableError",
    "StcError",
    "StreamExistsError",
    "StreamNotFoundError",
]
