"""A stream's past as something to look at: a thumbnail per chunk, the moments found, and the timeline that puts
them in time order with the stream's watch events (alerts, yes/no scores, captions).

* :class:`ThumbnailRing` -- one small JPEG (longer side ``thumbnail_side``, 160 px by default) of each chunk that
  reached the LLM, with the chunk's pts range; a ring of ``thumbnails_per_stream`` (oldest dropped), so a moment
  can be shown after its frames are gone. Made on the stream's ingest sender thread after the chunk was appended
  (a resize and a JPEG encode of one frame: 3.9 ms for 768x576 on the loaded 2-core CPU machine).
* :class:`StreamTimeline` -- one stream's thumbnails and its last ``moments_kept`` moments (what its host holds).
* :func:`build_timeline` -- the entries of ``GET /streams/{id}/timeline`` in pts order: ``alert`` and ``score``
  (yes/no watch ticks) from the watch event ring, ``caption`` (text watch answers, from the caption track), and
  ``moment``; each with the thumbnail of the chunk at its time.
"""
from __future__ import annotations

import bisect
import collections
import io
import threading
from typing import Iterable, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from serve.core.moments import Moment, ThumbRef
from serve.core.settings import TimelineSettings
from serve.core.watch_events import WatchEvent
from stream.frames import FrameBatch

EntryKind = Literal["alert", "score", "caption", "moment"]
KINDS: tuple[str, ...] = ("alert", "score", "caption", "moment")


class TimelineEntry(BaseModel):
    """One thing that happened on a stream, at a pts."""

    kind: EntryKind
    pts: float | None = Field(None, description="When (s): the newest frame a watch tick saw, a moment's start.")
    pts_end: float | None = Field(None, description="moment: its end (s).")
    time: float = Field(..., description="Unix time it was recorded.")
    score: float | None = None
    threshold: float | None = None
    text: str | None = Field(None, description="caption: the answer; moment: the query.")
    question: str | None = None
    watch_id: str | None = None
    seq: int | None = Field(None, description="The watch event's sequence number.")
    thumbnail: ThumbRef | None = Field(None, description="The chunk thumbnail at this time, if still kept.")


class Timeline(BaseModel):
    """A stream's timeline: entries in pts order and the chunk thumbnails in the range."""

    stream_id: str
    entries: list[TimelineEntry]
    thumbnails: list[ThumbRef] = Field(default_factory=list, description="The kept chunk thumbnails, in pts order.")
    truncated: int = Field(0, description="Older entries left out by the limit.")


def thumbnail_jpeg(rgb: np.ndarray, side: int, quality: int) -> bytes:
    """``[H, W, 3]`` uint8 -> a JPEG whose longer side is ``side`` pixels (never enlarged)."""
    img = Image.fromarray(np.ascontiguousarray(rgb))
    img.thumbnail((side, side), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


class ThumbnailRing:
    """One stream's chunk thumbnails, oldest dropped past ``size``; thread-safe."""

    def __init__(self, stream_id: str, size: int, side: int = 160, quality: int = 70) -> None:
        self.stream_id, self.size, self.side, self.quality = stream_id, size, side, quality
        self._refs: collections.deque[ThumbRef] = collections.deque()  # pts order (chunks arrive in order)
        self._jpegs: dict[int, bytes] = {}
        self._next = 0
        self._lock = threading.Lock()

    def add(self, rgb: np.ndarray, pts_start: float, pts_end: float) -> ThumbRef:
        """Keep a thumbnail of ``rgb`` for the chunk ``[pts_start, pts_end]``."""
        data = thumbnail_jpeg(rgb, self.side, self.quality)
        with self._lock:
            ref = ThumbRef(id=self._next, pts_start=pts_start, pts_end=pts_end,
                           url=f"/streams/{self.stream_id}/thumbnails/{self._next}.jpg")
            self._next += 1
            self._refs.append(ref)
            self._jpegs[ref.id] = data
            while len(self._refs) > self.size:
                self._jpegs.pop(self._refs.popleft().id, None)
            return ref

    def get(self, thumb_id: int) -> bytes | None:
        with self._lock:
            return self._jpegs.get(thumb_id)

    def find(self, pts: float | None) -> ThumbRef | None:
        """The thumbnail of the chunk holding ``pts``, else of the last chunk starting before it (None: none)."""
        if pts is None:
            return None
        with self._lock:
            starts = [r.pts_start for r in self._refs]
            i = bisect.bisect_right(starts, pts) - 1
            return self._refs[i] if i >= 0 else None

    def refs(self, since: float | None = None, until: float | None = None) -> list[ThumbRef]:
        with self._lock:
            return [r for r in self._refs if (since is None or r.pts_end >= since) and
                    (until is None or r.pts_start <= until)]

    def nbytes(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._jpegs.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._refs)

    def clear(self) -> None:
        with self._lock:
            self._refs.clear()
            self._jpegs.clear()


class StreamTimeline:
    """What one stream keeps of its past for moments and its timeline (held with the stream by its host)."""

    def __init__(self, stream_id: str, settings: TimelineSettings | None = None) -> None:
        s = settings or TimelineSettings()
        self.thumbs = ThumbnailRing(stream_id, s.thumbnails_per_stream, s.thumbnail_side, s.thumbnail_quality)
        self._moments: collections.deque[Moment] = collections.deque(maxlen=s.moments_kept)
        self._lock = threading.Lock()
        self.thumbnail_errors = 0  # chunks whose thumbnail could not be made (the stream carried on)

    def add_chunk(self, batch: FrameBatch) -> None:
        """Keep the thumbnail of a chunk that reached the LLM (its middle frame)."""
        if len(batch):
            self.thumbs.add(batch.rgb[len(batch) // 2], float(batch.pts[0]), float(batch.pts[-1]))

    def add_moments(self, moments: Iterable[Moment]) -> None:
        with self._lock:
            self._moments.extend(moments)

    def moments(self) -> list[Moment]:
        with self._lock:
            return list(self._moments)

    def clear(self) -> None:
        self.thumbs.clear()
        with self._lock:
            self._moments.clear()


def _entry(event: WatchEvent) -> TimelineEntry | None:
    if event.type == "alert":
        kind = "alert"
    elif event.type == "answer" and event.answer is not None:
        kind = "caption"
    elif event.type == "answer" and event.score is not None:
        kind = "score"
    else:
        return None
    return TimelineEntry(kind=kind, pts=event.pts, time=event.time, score=event.score, threshold=event.threshold,
                         text=event.answer, question=event.question, watch_id=event.watch_id, seq=event.seq)


def build_timeline(stream_id: str, timeline: StreamTimeline, events: list[WatchEvent], captions: list[WatchEvent],
                   since: float | None = None, until: float | None = None, kinds: Iterable[str] = KINDS,
                   limit: int = 500) -> Timeline:
    """The stream's timeline in pts order (entries without a pts first; with ``since``/``until`` they are left
    out), at most the newest ``limit`` entries, each with the thumbnail of the chunk at its time."""
    wanted = set(kinds)
    by_seq = {e.seq: e for e in captions}
    by_seq.update({e.seq: e for e in events})
    entries = [x for x in map(_entry, by_seq.values()) if x is not None and x.kind in wanted]
    if "moment" in wanted:
        entries += [TimelineEntry(kind="moment", pts=m.pts_start, pts_end=m.pts_end, time=m.found_at, score=m.score,
                                  text=m.query, thumbnail=m.thumbnail) for m in timeline.moments()]
    if since is not None or until is not None:
        entries = [e for e in entries if e.pts is not None and (since is None or (e.pts_end or e.pts) >= since)
                   and (until is None or e.pts <= until)]
    entries.sort(key=lambda e: (e.pts if e.pts is not None else float("-inf"), e.time))
    truncated = max(0, len(entries) - limit)
    entries = entries[truncated:]
    for e in entries:
        if e.thumbnail is None:
            e.thumbnail = timeline.thumbs.find(e.pts)
    return Timeline(stream_id=stream_id, entries=entries, thumbnails=timeline.thumbs.refs(since, until),
                    truncated=truncated)
