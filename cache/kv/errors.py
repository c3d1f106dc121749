"""Errors of the LLM engine. All are request-level (this stream, this call); the replica keeps serving."""
from __future__ import annotations

from stream.errors import RequestError, StreamExistsError, StreamNotFoundError


UnknownStreamError = StreamNotFoundError  # 404, shared with the service (stream.errors)
__all__ = ["KVCapacityError", "StreamExistsError", "UnknownStreamError"]


class KVCapacityError(RequestError):
    """The replica's KV memory budget cannot hold another stream, even after dropping all offloaded history."""

    status = 503
