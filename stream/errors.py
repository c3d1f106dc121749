"""Typed errors shared by every package.

Two families, kept apart on purpose:

* :class:`RequestError` -- the caller's input is wrong (bad file, bad frame, bad config value). The service maps
  it to a 4xx answer for that request alone; the replica and the other streams carry on.
* anything else -- a bug or a broken replica (5xx, restart).

Source errors also subclass the matching builtin (``FileNotFoundError``, ``TimeoutError``, ...), as PyAV's do, so a
caller can catch either.
"""
from __future__ import annotations


class StcError(Exception):
    """Base of every error raised on purpose by stc-serve."""


class RequestError(StcError):
    """The request (input, argument, config value) is invalid. ``status`` is the HTTP code the service answers;
    ``retry_after_s`` (when set) is sent as ``Retry-After``: the same request may succeed after that long."""

    status: int = 400
    retry_after_s: float | None = None


class ConfigError(RequestError, ValueError):
    """A configuration value is invalid; the message names the field, the bad value, what is allowed and the fix."""


class StreamNotFoundError(RequestError, LookupError):
    """No open stream has this id (never opened, or closed) -- on this replica, engine or service."""

    status = 404

    def __str__(self) -> str:  # LookupError's KeyError cousins would quote the message
        return str(self.args[0]) if self.args else ""


class StreamExistsError(RequestError):
    """A stream with this id is already open."""

    status = 409


class SourceError(RequestError):
    """A frame source cannot be opened or read."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """The file does not exist (or is outside the allowed media root)."""

    status = 404


class SourceFormatError(SourceError, ValueError):
    """The input exists but is not a decodable video (wrong format, truncated, no video stream)."""

    status = 415


class SourceTimeoutError(SourceError, TimeoutError):
    """A live source did not answer within its open/read timeout."""

    status = 504


class SourceUnreachableError(SourceError, ConnectionError):
    """A live source (rtsp/http) refused the connection or could not be resolved."""

    status = 502
