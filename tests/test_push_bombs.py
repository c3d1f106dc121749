"""Pushed JPEGs as decompression bombs: the declared pixels are bounded per push and per stream before a single
pixel is decoded, decoding runs off the event loop (the API keeps answering meanwhile), and large decodes give their
freed heap back. In process (LocalBackend + stage doubles); the bombs are built here, a few hundred bytes each."""
from __future__ import annotations

import asyncio
import io
import time

import httpx
import msgpack
import numpy as np
import pytest
from PIL import Image

import serve.core.protocol as protocol
from serve.core.config import ServiceConfig
from serve.core.local import LocalBackend
from serve.core.protocol import CONTENT_TYPE, FrameLimits, PayloadTooLargeError, decode_frames, jpeg_bytes
from serve.http.app import make_api
from tests.service_doubles import FakeLLMStage, FakeVisionStage

MSGPACK = {"Content-Type": CONTENT_TYPE}


def bomb(width: int = 4096, height: int = 4096) -> bytes:
    """A JPEG of a few hundred bytes whose header declares ``width`` x ``height`` pixels (an 8x8 image with its
    frame header rewritten: decoding it would allocate the declared size)."""
    data = bytearray(jpeg_bytes(np.zeros((8, 8, 3), np.uint8), 50))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _jpeg_batch(images: list[bytes]) -> bytes:
    return msgpack.packb({"v": 1, "encoding": "jpeg", "pts": [i / 10 for i in range(len(images))], "images": images},
                         use_bin_type=True)


def _solid(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (40, 80, 120)).save(buf, format="JPEG", quality=50)
    return buf.getvalue()


@pytest.fixture()
def decodes(monkeypatch):
    """Count (and optionally slow down) every JPEG pixel decode."""
    calls: list[float] = []
    original = protocol._decode_jpeg

    def counted(*args, **kwargs):
        calls.append(time.monotonic())
        if getattr(counted, "delay", 0):
            time.sleep(counted.delay)
        return original(*args, **kwargs)

    monkeypatch.setattr(protocol, "_decode_jpeg", counted)
    counted.calls = calls
    return counted


def _cfg(**serve) -> ServiceConfig:
    return ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 4},
                                "serve": {"max_streams": 4, **serve}})


def _backend(cfg: ServiceConfig) -> LocalBackend:
    return LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), FakeVisionStage(), FakeLLMStage())


def test_a_bomb_is_refused_by_its_declared_pixels_before_any_decoding(decodes):
    body = _jpeg_batch([bomb()] * 32)  # ~20 KB declaring 32 x 4096 x 4096 = 537 M pixels
    assert len(body) < 32_000
    with pytest.raises(PayloadTooLargeError) as info:
        decode_frames(body, FrameLimits(max_pixels=1 << 24))
    msg = str(info.value)
    assert "536,870,912 pixels" in msg and "16,777,216" in msg and "serve.max_push_pixels" in msg and "Fix:" in msg
    assert decodes.calls == []  # refused on the headers alone
    with pytest.raises(PayloadTooLargeError):  # valid solid frames of that size too: 2 x 4096^2 > 2^24
        decode_frames(_jpeg_batch([_solid(4096)] * 2))
    assert decodes.calls == []
    ok = decode_frames(_jpeg_batch([_solid(64)] * 3))
    assert ok.rgb.shape == (3, 64, 64, 3) and len(decodes.calls) == 3


def test_a_bomb_over_http_is_a_413_and_the_stream_carries_on(decodes):
    cfg = _cfg()
    backend = _backend(cfg)
    from fastapi.testclient import TestClient

    client = TestClient(make_api(backend, cfg.serve))
    try:
        assert client.post("/streams", json={"stream_id": "cam"}).status_code == 201
        resp = client.post("/streams/cam/frames", content=_jpeg_batch([bomb()] * 32), headers=MSGPACK)
        assert resp.status_code == 413 and resp.json()["error"]["type"] == "PayloadTooLargeError", resp.text
        assert decodes.calls == []
        good = client.post("/streams/cam/frames", content=_jpeg_batch([_solid(32)] * 2), headers=MSGPACK)
        assert good.status_code == 200 and good.json()["accepted"] == 2
    finally:
        backend.shutdown()


def test_decoding_runs_off_the_event_loop(decodes):
    """A push whose decoding takes ~1.2 s: /health answers meanwhile within a fraction of that."""
    decodes.delay = 0.3
    cfg = _cfg()
    backend = _backend(cfg)
    app = make_api(backend, cfg.serve)

    async def run() -> tuple[int, list[float]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.post("/streams", json={"stream_id": "cam"})).status_code == 201
            start = time.monotonic()
            push = asyncio.create_task(c.post("/streams/cam/frames", content=_jpeg_batch([_solid(32)] * 4),
                                              headers=MSGPACK))
            await asyncio.sleep(0.05)  # the push is decoding now
            answered = []  # seconds since the push started, while it is still in flight
            while not push.done() and len(answered) < 4:
                assert (await c.get("/health")).status_code == 200
                answered.append(time.monotonic() - start)
                await asyncio.sleep(0.05)
            return (await push).status_code, answered

    try:
        status, waits = asyncio.run(run())
    finally:
        backend.shutdown()
    assert status == 200 and len(decodes.calls) == 4
    assert len(waits) == 4 and waits[0] < 0.5, waits  # on the loop, decoding would hold /health for ~1.2 s


def test_a_streams_concurrent_pushes_share_one_pixel_budget():
    """Pixels being decoded or handed over for one stream are bounded: a second concurrent push past the budget is
    429 with Retry-After; another stream is not affected; the budget comes back once the first is delivered."""
    from serve.core.api import TooManyRequestsError
    from serve.http.limits import PushDecoder

    gate = asyncio.Event

    async def run() -> list[object]:
        decoder = PushDecoder(FrameLimits(max_pixels=10_000), stream_pixels=12_000)
        hold = gate()
        body = _jpeg_batch([_solid(48)] * 4)  # 9,216 pixels

        async def slow(batch):
            await hold.wait()
            return len(batch)

        first = asyncio.create_task(decoder.push("cam", body, slow))
        while decoder.inflight() == 0:
            await asyncio.sleep(0.01)
        out: list[object] = []
        try:
            await decoder.push("cam", body, slow)
        except TooManyRequestsError as exc:
            out.append(exc)
        other = asyncio.create_task(decoder.push("other", body, slow))
        await asyncio.sleep(0.05)
        hold.set()
        out += [await first, await other, await decoder.push("cam", body, slow), decoder.inflight()]
        return out

    refused, first, other, again, left = asyncio.run(run())
    assert isinstance(refused, TooManyRequestsError) and refused.status == 429 and refused.retry_after_s == 1.0
    assert "serve.max_stream_push_pixels" in str(refused) and "9,216 pixels" in str(refused)
    assert (first, other, again, left) == (4, 4, 4, 0)


def test_a_429_push_carries_retry_after_over_http(monkeypatch):
    cfg = _cfg(max_push_pixels=10_000, max_stream_push_pixels=12_000)
    backend = _backend(cfg)
    app = make_api(backend, cfg.serve)
    release = asyncio.Event

    async def run():
        hold = release()
        original = backend.push

        async def slow(stream_id, batch, flush):
            await hold.wait()
            return await original(stream_id, batch, flush)

        backend.push = slow
        body = _jpeg_batch([_solid(48)] * 4)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.post("/streams", json={"stream_id": "cam"})).status_code == 201
            first = asyncio.create_task(c.post("/streams/cam/frames", content=body, headers=MSGPACK))
            await asyncio.sleep(0.2)
            second = await c.post("/streams/cam/frames", content=body, headers=MSGPACK)
            hold.set()
            return (await first).status_code, second

    try:
        first, second = asyncio.run(run())
    finally:
        backend.shutdown()
    assert first == 200 and second.status_code == 429 and second.headers["Retry-After"] == "1"


def test_a_large_decode_gives_its_heap_back(monkeypatch):
    import serve.http.limits as limits
    from serve.http.limits import PushDecoder

    trims: list[int] = []
    monkeypatch.setattr(limits, "trim_heap", lambda: trims.append(1) or True)

    async def run() -> None:
        decoder = PushDecoder(FrameLimits(), stream_pixels=1 << 25)

        async def deliver(batch):
            return len(batch)

        await decoder.push("s", _jpeg_batch([_solid(64)]), deliver)  # small: no trim
        assert trims == []
        await decoder.push("s", _jpeg_batch([_solid(2048)]), deliver)  # 4.2 M pixels
        for _ in range(50):
            if trims:
                return
            await asyncio.sleep(0.02)

    asyncio.run(run())
    assert trims == [1]
