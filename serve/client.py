"""A small Python client of the HTTP API (standard library only).

```python
from serve.client import StcClient
c = StcClient("http://127.0.0.1:8000", api_key=None)
sid = c.create_stream()["stream_id"]                     # a pushed stream
c.push_frames(sid, rgb, pts, encoding="jpeg", flush=True)  # rgb [N, H, W, 3] uint8
for piece in c.ask(sid, "What is happening?", wait_s=10):
    print(piece, end="")
c.close_stream(sid)
```
Errors come back as :class:`ServiceError` with the service's ``status``, ``type`` and ``message``.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from serve.protocol import CONTENT_TYPE, encode_frames
from stream.errors import StcError


class ServiceError(StcError):
    """An error answer of the service (4xx/5xx, or an ``error`` event in an answer stream)."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status, self.kind, self.message = status, kind, message


def iter_sse(lines: Iterable[bytes | str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Parse server-sent events into ``(event, data)`` pairs (``data`` is JSON)."""
    event, data = "message", []
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        yield event, json.loads("\n".join(data))


class StcClient:
    """Talks to a running stc-serve.

    Args:
        url: base URL of the service (with its route prefix).
        api_key: sent as ``Authorization: Bearer <key>`` when given.
        timeout_s: socket timeout per request.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout_s: float = 120.0):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    # -- streams --
    def create_stream(self, source: str | None = None, *, stream_id: str | None = None, fps: float | None = None,
                      frames_per_chunk: int | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Open a stream (``source`` None: a pushed stream). Returns its stats, including ``stream_id``."""
        body = {"source": source, "stream_id": stream_id, "fps": fps, "frames_per_chunk": frames_per_chunk,
                "options": options or {}}
        return self._json("POST", "/streams", {k: v for k, v in body.items() if v is not None})

    def push_frames(self, stream_id: str, rgb: np.ndarray, pts: Sequence[float], encoding: str = "jpeg",
                    flush: bool = False, jpeg_quality: int = 90) -> dict[str, Any]:
        """Push ``rgb [N, H, W, 3]`` uint8 frames with their ``pts`` (seconds)."""
        body = encode_frames(rgb, pts, encoding=encoding, jpeg_quality=jpeg_quality)
        path = f"/streams/{_q(stream_id)}/frames" + ("?flush=true" if flush else "")
        with self._open("POST", path, body, CONTENT_TYPE) as resp:
            return json.loads(resp.read())

    def stats(self, stream_id: str) -> dict[str, Any]:
        """One stream's stats."""
        return self._json("GET", f"/streams/{_q(stream_id)}")

    def list_streams(self) -> list[dict[str, Any]]:
        """Every open stream's stats."""
        return self._json("GET", "/streams")["streams"]

    def close_stream(self, stream_id: str) -> dict[str, Any]:
        """Close a stream; returns its final stats."""
        return self._json("DELETE", f"/streams/{_q(stream_id)}")

    # -- questions --
    def ask(self, stream_id: str, question: str, max_new_tokens: int = 64, wait_s: float = 0.0,
            done: dict[str, Any] | None = None) -> Iterator[str]:
        """Yield the answer's text pieces as they stream; the final ``done`` event is stored into ``done``."""
        payload = json.dumps({"question": question, "max_new_tokens": max_new_tokens, "wait_s": wait_s}).encode()
        with self._open("POST", f"/streams/{_q(stream_id)}/questions", payload, "application/json") as resp:
            for event, data in iter_sse(resp):
                if event == "token":
                    yield data["text"]
                elif event == "error":
                    raise ServiceError(int(data.get("status", 500)), data.get("type", "Error"), data.get("message", ""))
                elif event == "done" and done is not None:
                    done.update(data)

    def ask_text(self, stream_id: str, question: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
        """The whole answer and its ``done`` event (``ttft_ms``, ``total_ms``, ``tokens``)."""
        done: dict[str, Any] = {}
        text = "".join(self.ask(stream_id, question, done=done, **kwargs))
        return text, done

    # -- service --
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def metrics(self) -> str:
        """Prometheus text exposition."""
        with self._open("GET", "/metrics") as resp:
            return resp.read().decode()

    # -- plumbing --
    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        with self._open(method, path, data, "application/json" if data is not None else None) as resp:
            return json.loads(resp.read())

    def _open(self, method: str, path: str, data: bytes | None = None, content_type: str | None = None) -> Any:
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            raise _service_error(exc) from None
        except urllib.error.URLError as exc:
            raise ServiceError(0, "ConnectionError", f"cannot reach {self.url}: {exc.reason}. Fix: start the service "
                               "with `stc-serve serve`, or pass the right --url.") from None


def _service_error(exc: urllib.error.HTTPError) -> ServiceError:
    raw = exc.read()
    try:
        err = json.loads(raw)["error"]
        return ServiceError(int(err["status"]), str(err["type"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        return ServiceError(exc.code, "HTTPError", raw.decode(errors="replace")[:500])


def _q(stream_id: str) -> str:
    return urllib.parse.quote(stream_id, safe="")
