"""Errors of the LLM engine. All are request-level (this stream, this call); the replica keeps serving."""
from __future__ import annotations

from stream.errors import RequestError


class UnknownStreamError(RequestError, KeyError):
    """No open stream has this id (never opened, or closed)."""

    status = 404

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0]) if self.args else ""


class StreamExistsError(RequestError):
    """A stream with this id is already open."""

    status = 409


class KVCapacityError(RequestError):
    """The replica's KV memory budget cannot hold another stream, even after dropping all offloaded history."""

    status = 503
