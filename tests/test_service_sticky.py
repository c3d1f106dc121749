"""Sticky calls without a cluster: fake Serve handles whose 'router' misroutes or loses a replica. A misroute is
retried (state never touched elsewhere); a lost owner leads to exactly one cold reopen, counted in ``resets``."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ray")

from serve.api import StreamMisroutedError  # noqa: E402
from serve.app import RayStageClient  # noqa: E402
from serve.replicas import call_sticky  # noqa: E402
from serve.service_config import IngestSettings  # noqa: E402
from stream.errors import RequestError  # noqa: E402
from stream.frames import FrameBatch  # noqa: E402
from tests.service_doubles import FakeLLMStage, FakeVisionStage  # noqa: E402


class _Response:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def result(self, timeout_s=None):
        return self.fn(*self.args)


class FakeHandle:
    """A deployment handle over one stage 'replica'; the first ``misroutes`` calls land on a replica without the
    stream; ``lose()`` drops the owner's state as if its replica died."""

    def __init__(self, stage, misroutes: int = 0) -> None:
        self.stage, self.misroutes = stage, misroutes
        self.owned: set[str] = set()
        self.calls: list[str] = []

    def options(self, multiplexed_model_id: str):
        assert multiplexed_model_id
        return self

    def lose(self) -> None:
        self.owned.clear()

    def __getattr__(self, method):
        handle = self

        class _Method:
            def remote(self, stream_id, *args):
                return _Response(handle._call, (method, stream_id, *args))

        return _Method()

    def _call(self, method, stream_id, *args):
        self.calls.append(method)
        if method == "open":
            self.stage.open(stream_id, args[0])
            self.owned.add(stream_id)
            return "replica-1"
        if self.misroutes > 0 or stream_id not in self.owned:
            self.misroutes = max(0, self.misroutes - 1)
            raise StreamMisroutedError(f"replica holds no state for stream {stream_id!r}")
        if method == "append":
            return self.stage.append(args[0])
        return getattr(self.stage, method)(stream_id, *args)


def _batch(start: int) -> FrameBatch:
    return FrameBatch(rgb=np.zeros((2, 4, 4, 3), np.uint8), pts=np.array([start, start + 1.0]),
                      indices=np.arange(start, start + 2))


def _client(vision: FakeHandle, llm: FakeHandle) -> RayStageClient:
    return RayStageClient(vision, llm, IngestSettings(misroute_retry_s=0.3, call_timeout_s=5))


def test_misroutes_are_retried_without_reopening():
    vision, llm = FakeHandle(FakeVisionStage()), FakeHandle(FakeLLMStage(), misroutes=3)
    client = _client(vision, llm)
    client.open("s", None)
    out = client.encode_append("s", _batch(0))
    assert out["llm"] == {"llm_tokens": 2}
    assert client.resets == 0 and llm.calls.count("append") == 4  # 3 misroutes, then the owner
    assert llm.stage.seen["s"] == [0.0, 1.0]


def test_a_lost_replica_is_reopened_cold_once():
    vision, llm = FakeHandle(FakeVisionStage()), FakeHandle(FakeLLMStage())
    client = _client(vision, llm)
    client.open("s", None)
    client.encode_append("s", _batch(0))
    vision.lose()
    vision.stage.streams.pop("s")  # the replica and its cache state are gone
    client.encode_append("s", _batch(2))
    assert client.resets == 1 and vision.calls.count("open") == 2 and llm.calls.count("open") == 1
    assert vision.stage.streams["s"]["frames"] == 2  # cold: only the chunk after the loss
    assert llm.stage.seen["s"] == [0.0, 1.0, 2.0, 3.0]  # the LLM kept its context


def test_request_errors_are_not_retried():
    calls = []

    class Refusing:
        def options(self, multiplexed_model_id):
            return self

        def __getattr__(self, name):
            class _M:
                def remote(self, *args):
                    calls.append(name)
                    return _Response(lambda: (_ for _ in ()).throw(RequestError("bad frame")), ())

            return _M()

    with pytest.raises(RequestError, match="bad frame"):
        call_sticky(Refusing(), "encode", "s", None, timeout_s=1, retry_s=5)
    assert calls == ["encode"]
    with pytest.raises(StreamMisroutedError):
        call_sticky(FakeHandle(FakeVisionStage()), "stats", "ghost", timeout_s=1, retry_s=0.1)
