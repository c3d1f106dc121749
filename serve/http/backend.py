"""What the HTTP layer needs from the service: the :class:`StreamBackend` protocol, and reading an answer's items.

:class:`serve.core.local.HostBackend` implements it (in-process as :class:`serve.core.local.LocalBackend`, over the
Ray service as ``serve.deploy.app.RayBackend``); the routes in this package only call these methods.
"""
from __future__ import annotations

from typing import AsyncIterator, Protocol

from serve.core.api import AnswerUsage, CreateStreamRequest, HealthResponse, PushResponse, QuestionRequest, StreamStats
from serve.core.fleet import FleetAnswer, FleetGate, FleetQuestion, Targets
from serve.core.messages import AnswerItem, AnswerStats
from serve.core.moments import FleetMoments, FleetMomentsRequest, MomentsRequest, MomentsResult
from serve.core.timeline import Timeline
from serve.core.watchset import EventsPage, Watch, WatchRequest
from serve.core.webhooks import WebhookStats
from stream.frames import FrameBatch


class StreamBackend(Protocol):
    """What the HTTP layer needs from the service (:class:`serve.core.local.HostBackend` and its subclasses);
    raises :class:`RequestError` subclasses for 4xx answers."""

    async def create(self, request: CreateStreamRequest) -> StreamStats: ...

    async def push(self, stream_id: str, batch: FrameBatch, flush: bool) -> PushResponse: ...

    def ask(self, stream_id: str, request: QuestionRequest) -> AsyncIterator[AnswerItem]:
        """The answer's text pieces and :class:`serve.core.messages.AnswerStats` snapshots (exact token counts)."""
        ...

    async def stats(self, stream_id: str) -> StreamStats: ...

    async def list(self, selector: dict[str, str] | None = None) -> list[StreamStats]: ...

    async def close(self, stream_id: str) -> StreamStats: ...

    async def health(self) -> HealthResponse: ...

    async def frame_jpeg(self, stream_id: str) -> bytes | None: ...

    # watches (serve/core/watchset.py): owned by the stream's host; the routes in serve/http/watches.py relay to these
    async def add_watch(self, stream_id: str, request: WatchRequest) -> Watch: ...

    async def list_watches(self, stream_id: str) -> list[Watch]: ...

    async def delete_watch(self, stream_id: str, watch_id: str) -> Watch: ...

    async def watch_events(self, stream_id: str, since: int, timeout_s: float) -> EventsPage: ...

    # many streams at once and the past of a stream (serve/core/fleet.py, moments.py, timeline.py)
    fleet_gate: FleetGate

    async def targets(self, request: Targets) -> list[str]: ...

    def fleet(self, stream_ids: list[str], request: FleetQuestion) -> AsyncIterator[FleetAnswer]:
        """Each stream's answer as it finishes (all asked at once)."""
        ...

    async def moments(self, stream_id: str, request: MomentsRequest) -> MomentsResult: ...

    async def fleet_moments(self, stream_ids: list[str], request: FleetMomentsRequest) -> FleetMoments: ...

    async def timeline(self, stream_id: str, since: float | None, until: float | None,
                       kinds: list[str] | None) -> Timeline: ...

    async def thumbnail(self, stream_id: str, thumb_id: int) -> bytes | None: ...

    async def webhook_stats(self) -> list[WebhookStats]:
        """Webhook delivery counters per destination (``/metrics``)."""
        ...


async def answer_pieces(items: AsyncIterator[AnswerItem], usage: AnswerUsage) -> AsyncIterator[str]:
    """The text pieces of an answer; its stats snapshots update ``usage`` (exact counts, as soon as known)."""
    async for item in items:
        if isinstance(item, AnswerStats):
            usage.update(AnswerUsage.of(item))
        else:
            yield item
