"""A small Python client of the HTTP API, on httpx (HTTP) and httpx-sse (server-sent events).

```python
from serve.http.client import StcClient
with StcClient("http://127.0.0.1:8000", api_key=None) as c:
    sid = c.create_stream()["stream_id"]                       # a pushed stream
    c.push_frames(sid, rgb, pts, encoding="jpeg", flush=True)  # rgb [N, H, W, 3] uint8
    for piece in c.ask(sid, "What is happening?", wait_s=10):
        print(piece, end="")
    c.close_stream(sid)
```
Errors come back as :class:`ServiceError` with the service's ``status``, ``type`` and ``message``.
"""
from __future__ import annotations

import json
import urllib.parse
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import httpx
import numpy as np
from httpx_sse import EventSource

from serve.core.protocol import CONTENT_TYPE, encode_frames
from stream.errors import StcError


class ServiceError(StcError):
    """An error answer of the service (4xx/5xx, or an ``error`` event in an answer stream)."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status, self.kind, self.message = status, kind, message


def iter_sse(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """The server-sent events of a streaming ``response`` as ``(event, data)`` pairs (``data`` is JSON)."""
    for sse in EventSource(response).iter_sse():
        if sse.data:
            yield sse.event, json.loads(sse.data)


class StcClient:
    """Talks to a running stc-serve (one connection pool; use it as a context manager or call :meth:`close`).

    Args:
        url: base URL of the service (with its route prefix).
        api_key: sent as ``Authorization: Bearer <key>`` when given.
        timeout_s: connect/read timeout per request.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout_s: float = 120.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def __enter__(self) -> "StcClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # -- streams --
    def create_stream(self, source: str | None = None, *, stream_id: str | None = None, fps: float | None = None,
                      frames_per_chunk: int | None = None, options: dict[str, Any] | None = None,
                      labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Open a stream (``source`` None: a pushed stream). Returns its stats, including ``stream_id``."""
        body = {"source": source, "stream_id": stream_id, "fps": fps, "frames_per_chunk": frames_per_chunk,
                "options": options or {}, "labels": labels or None}
        return self._json("POST", "/streams", json={k: v for k, v in body.items() if v is not None})

    def push_frames(self, stream_id: str, rgb: np.ndarray, pts: Sequence[float], encoding: str = "jpeg",
                    flush: bool = False, jpeg_quality: int = 90) -> dict[str, Any]:
        """Push ``rgb [N, H, W, 3]`` uint8 frames with their ``pts`` (seconds)."""
        body = encode_frames(rgb, pts, encoding=encoding, jpeg_quality=jpeg_quality)
        return self._json("POST", f"/streams/{_q(stream_id)}/frames", content=body,
                          headers={"Content-Type": CONTENT_TYPE}, params={"flush": "true"} if flush else None)

    def stats(self, stream_id: str) -> dict[str, Any]:
        """One stream's stats."""
        return self._json("GET", f"/streams/{_q(stream_id)}")

    def list_streams(self, selector: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Every open stream's stats (or those whose labels include all of ``selector``)."""
        params = {"selector": ",".join(f"{k}={v}" for k, v in selector.items())} if selector else None
        return self._json("GET", "/streams", params=params)["streams"]

    def close_stream(self, stream_id: str) -> dict[str, Any]:
        """Close a stream; returns its final stats."""
        return self._json("DELETE", f"/streams/{_q(stream_id)}")

    # -- questions --
    def ask(self, stream_id: str, question: str, max_new_tokens: int = 64, wait_s: float = 0.0,
            done: dict[str, Any] | None = None) -> Iterator[str]:
        """Yield the answer's text pieces as they stream; the final ``done`` event is stored into ``done``."""
        body = {"question": question, "max_new_tokens": max_new_tokens, "wait_s": wait_s}
        with self._sse("POST", f"/streams/{_q(stream_id)}/questions", json=body) as events:
            for event, data in events:
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

    # -- many streams at once; when it happened --
    def ask_fleet(self, question: str, streams: Sequence[str] | None = None, selector: dict[str, str] | None = None,
                  mode: str = "text", max_new_tokens: int = 32, wait_s: float = 0.0
                  ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Ask many streams at once; yields ``("answer", answer)`` per stream as it finishes (``status`` 200 or the
        stream's error), then ``("done", summary)`` with the yes/no ``ranking``."""
        body = {"question": question, "mode": mode, "max_new_tokens": max_new_tokens, "wait_s": wait_s,
                **({"streams": list(streams)} if streams is not None else {"selector": selector or {}})}
        with self._sse("POST", "/questions", json=body) as events:
            for event, data in events:
                if event == "error":
                    raise ServiceError(int(data.get("status", 500)), data.get("type", "Error"), data.get("message", ""))
                yield event, data

    def fleet(self, question: str, **kwargs: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """:meth:`ask_fleet` collected: every stream's answer (in the order they finished) and the ``done`` event."""
        answers, done = [], {}
        for event, data in self.ask_fleet(question, **kwargs):
            if event == "answer":
                answers.append(data)
            elif event == "done":
                done = data
        return answers, done

    def moments(self, stream_id: str, query: str, top_k: int = 5, **fields: Any) -> dict[str, Any]:
        """When did it happen on one stream: ``moments`` (pts range, score, thumbnail), best first. ``fields``:
        ``since``, ``until``, ``method`` (``yes_no`` / ``retrieval``), ``threshold``."""
        return self._json("POST", f"/streams/{_q(stream_id)}/moments", json={"query": query, "top_k": top_k, **fields})

    def fleet_moments(self, query: str, streams: Sequence[str] | None = None, selector: dict[str, str] | None = None,
                      top_k: int = 5, **fields: Any) -> dict[str, Any]:
        """Moments of many streams ranked together (each moment names its ``stream_id``)."""
        target = {"streams": list(streams)} if streams is not None else {"selector": selector or {}}
        return self._json("POST", "/moments", json={"query": query, "top_k": top_k, **target, **fields})

    def timeline(self, stream_id: str, since: float | None = None, until: float | None = None,
                 kinds: Sequence[str] | None = None) -> dict[str, Any]:
        """The stream's alerts, yes/no scores, captions and moments in pts order, with thumbnails."""
        params = {k: v for k, v in {"since": since, "until": until,
                                    "kinds": ",".join(kinds) if kinds else None}.items() if v is not None}
        return self._json("GET", f"/streams/{_q(stream_id)}/timeline", params=params)

    def thumbnail(self, stream_id: str, thumb_id: int) -> bytes:
        """One chunk thumbnail (JPEG bytes); ids come with moments and timeline entries."""
        return self._send("GET", f"/streams/{_q(stream_id)}/thumbnails/{int(thumb_id)}.jpg").content

    # -- watches --
    def add_watch(self, stream_id: str, question: str, every_s: float, **fields: Any) -> dict[str, Any]:
        """Start a standing question (``mode``, ``threshold``, ``hysteresis``, ``max_new_tokens``, ``webhook``)."""
        return self._json("POST", f"/streams/{_q(stream_id)}/watches",
                          json={"question": question, "every_s": every_s, **fields})

    def list_watches(self, stream_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/streams/{_q(stream_id)}/watches")["watches"]

    def delete_watch(self, stream_id: str, watch_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/streams/{_q(stream_id)}/watches/{_q(watch_id)}")

    def events(self, stream_id: str, since: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
        """The stream's watch events as ``(type, event)`` until its ``end`` event (the server closes the stream)."""
        with self._sse("GET", f"/streams/{_q(stream_id)}/events", params={"since": since}) as events:
            yield from events

    # -- service --
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def metrics(self) -> str:
        """Prometheus text exposition."""
        return self._send("GET", "/metrics").text

    # -- plumbing --
    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        if response.is_error:
            raise _service_error(response.status_code, response.content)
        return response

    @contextmanager
    def _sse(self, method: str, path: str, **kwargs: Any) -> Iterator[Iterator[tuple[str, dict[str, Any]]]]:
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if response.is_error:
                    raise _service_error(response.status_code, response.read())
                yield iter_sse(response)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None


def _unreachable(url: str, exc: Exception) -> ServiceError:
    return ServiceError(0, "ConnectionError", f"cannot reach {url}: {exc}. Fix: start the service with "
                        "`stc-serve serve`, or pass the right --url.")


def _service_error(status: int, raw: bytes) -> ServiceError:
    try:
        err = json.loads(raw)["error"]
        return ServiceError(int(err["status"]), str(err["type"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        return ServiceError(status, "HTTPError", raw.decode(errors="replace")[:500])


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")
