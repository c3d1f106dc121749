"""Which streams each ingest host runs, kept outside the hosts: a host that dies and restarts empty can still
account for the streams it held (lists them as ``failed`` with the reason, frees their replica state).

:class:`StreamDirectory` is a plain bounded class; the service runs it as one detached named actor per app
(``<app>/directory``). A host records a stream once it is open, updates the record when a stage's state is
rebuilt (new tokens), and forgets it on close. A restarted host :meth:`StreamDirectory.take`s its records.
This module imports nothing heavy (no torch): the directory actor's process stays small.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field



@dataclass(frozen=True)
class StreamRecord:
    """What outlives a stream's host.

    Attributes:
        stream_id: the stream.
        host: the ingest host's name.
        kind: ``push``, ``live`` or ``file``.
        source: the request's source spec (``None`` for pushed).
        created_at: creation time (epoch seconds).
        tokens: the stream's incarnation token per stage (to free that state).
    """

    stream_id: str
    host: str
    kind: str
    source: str | None
    created_at: float
    tokens: dict[str, str] = field(default_factory=dict)


class StreamDirectory:
    """Bounded ``(host, stream id) -> StreamRecord`` map; thread-safe.

    Args:
        max_records: bound (the service passes a multiple of ``serve.max_streams``); a record beyond it is refused.
    """

    def __init__(self, max_records: int) -> None:
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        self.max_records = max_records
        self._records: dict[tuple[str, str], StreamRecord] = {}
        self._lock = threading.Lock()

    def record(self, rec: StreamRecord) -> None:
        """Add or replace the record of ``(rec.host, rec.stream_id)``."""
        key = (rec.host, rec.stream_id)
        with self._lock:
            if key not in self._records and len(self._records) >= self.max_records:
                raise OverflowError(
                    f"the stream directory holds its maximum of {self.max_records} records. Fix: close streams, "
                    "or raise serve.max_streams."
                )
            self._records[key] = rec

    def forget(self, host: str, stream_id: str) -> bool:
        """Drop a record; ``False`` if there was none."""
        with self._lock:
            return self._records.pop((host, stream_id), None) is not None

    def get(self, host: str, stream_id: str) -> StreamRecord | None:
        """The record of ``(host, stream_id)``, or ``None``."""
        with self._lock:
            return self._records.get((host, stream_id))

    def take(self, host: str) -> list[StreamRecord]:
        """Remove and return every record of ``host`` (a restarted host accounting for its lost streams)."""
        with self._lock:
            keys = [k for k in self._records if k[0] == host]
            return [self._records.pop(k) for k in keys]

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)
