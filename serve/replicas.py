"""The two stateful Ray Serve deployments (vision encoder, LLM) and sticky calls to them.

A stream's state lives on one vision and one LLM replica. Every call for a stream carries
``multiplexed_model_id=<stream id>``; ``open`` registers the id with Serve's model multiplexing on the replica that
got it, and Serve's router then sends that id's requests to that replica. A replica that receives a request for a
stream it does not hold (router not yet updated, owner busy, owner gone) answers :class:`StreamMisroutedError`
instead of touching state; :func:`call_sticky` retries with backoff, and the stream's actor then reopens the state
cold on another replica (counted in ``state_resets``). State is never split or silently recreated.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Callable

import ray
from ray import serve

from serve.api import CapacityError, StreamMisroutedError
from serve.streams import iterate_in_thread
from stream.frames import FrameBatch

VISION, LLM = "vision", "llm"
StageFactory = Callable[[str, Any], Any]


def default_stage_factory(kind: str, config: Any) -> Any:
    """Build the real stage of ``kind`` (``"vision"`` or ``"llm"``) from the service config (loads the model)."""
    from serve.stages import LLMStage, VisionStage
    from stream.models import load_adapter

    adapter = load_adapter(config.model.name, config.model.device, config.model.dtype)
    if kind == VISION:
        return VisionStage(adapter, config.stream_options())
    return LLMStage(adapter, config.stream_options(), config.kv_replica_budget_bytes())


def unwrap(exc: BaseException) -> BaseException:
    """The user exception inside Ray's task/actor error wrappers (or ``exc`` itself)."""
    for _ in range(8):
        cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayError) else None
        if not isinstance(cause, BaseException):
            break
        exc = cause
    return exc


# ---- stateful deployments ------------------------------------------------------------------------------------------
class _StickyStage:
    """Shared part of the vision and LLM deployments: the stage, the streams this replica owns, multiplex bookkeeping."""

    kind = "stage"

    def __init__(self, config: Any, stage_factory: StageFactory | None) -> None:
        self.config = config
        self.stage = (stage_factory or default_stage_factory)(self.kind, config)
        self.max_streams = config.serve.max_streams_per_replica
        self.owned: set[str] = set()
        self.replica = serve.get_replica_context().replica_id.unique_id

    @serve.multiplexed(max_num_models_per_replica=-1)  # never evict: a stream's state leaves only by close()
    async def _claim(self, stream_id: str) -> str:
        return stream_id

    async def open(self, stream_id: str, options: Any) -> str:
        """Create the stream's state on this replica and register the stream id with the router."""
        self._check_id(stream_id)
        if stream_id in self.owned:
            return self.replica
        if len(self.owned) >= self.max_streams:
            raise CapacityError(
                f"{self.kind} replica {self.replica} holds its maximum of {self.max_streams} streams. Fix: close "
                "streams, add replicas, or raise serve.max_streams_per_replica."
            )
        await asyncio.to_thread(self.stage.open, stream_id, options)
        self.owned.add(stream_id)
        await self._claim(stream_id)
        return self.replica

    async def close(self, stream_id: str) -> None:
        """Free the stream's state here and drop its id from the router's table."""
        self._require(stream_id)
        self.owned.discard(stream_id)
        self._forget(stream_id)
        await asyncio.to_thread(self.stage.close, stream_id)

    async def stats(self, stream_id: str) -> dict[str, Any]:
        """The stage's counters for this stream, plus which replica holds it."""
        self._require(stream_id)
        out = await asyncio.to_thread(self.stage.stats, stream_id)
        return {**out, "replica": self.replica}

    async def ping(self) -> str:
        """Liveness check: this replica's id."""
        return self.replica

    async def where(self) -> dict[str, Any]:
        """This replica's id, node id and streams (placement checks and debugging)."""
        ctx = ray.get_runtime_context()
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        routed = sorted(getattr(wrapper, "models", {}))
        return {"replica": self.replica, "node_id": ctx.get_node_id(), "streams": sorted(self.owned),
                "routed_ids": routed, "gpu_ids": ray.get_gpu_ids()}

    def _check_id(self, stream_id: str) -> None:
        routed = serve.get_multiplexed_model_id()
        if routed and routed != stream_id:
            raise StreamMisroutedError(f"request routed for stream {routed!r} but names {stream_id!r}")

    def _require(self, stream_id: str) -> None:
        self._check_id(stream_id)
        if stream_id not in self.owned:
            raise StreamMisroutedError(
                f"{self.kind} replica {self.replica} holds no state for stream {stream_id!r} "
                f"(it holds {len(self.owned)} streams)"
            )

    def _forget(self, stream_id: str) -> None:
        """Remove a closed stream from Serve's multiplexing table, so routers stop sending its id here.

        Serve has no public 'unload this id' call; its wrapper keeps loaded ids in ``models`` and re-publishes them
        when ``_push_multiplexed_replica_info`` is set (tests/test_service_ray.py checks this still holds).
        """
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        if wrapper is not None and stream_id in getattr(wrapper, "models", {}):
            wrapper.models.pop(stream_id, None)
            wrapper._push_multiplexed_replica_info = True


@serve.deployment(name=VISION)
class VisionDeployment(_StickyStage):
    """ViT + STC cacher + pruner (:class:`serve.stages.VisionStage`); per-stream cache state on one replica."""

    kind = VISION

    async def encode(self, stream_id: str, batch: FrameBatch) -> Any:
        """One chunk of frames -> :class:`serve.messages.EncodedChunk` (kept visual tokens)."""
        self._require(stream_id)
        return await asyncio.to_thread(self.stage.encode, stream_id, batch)


@serve.deployment(name=LLM)
class LLMDeployment(_StickyStage):
    """The shared LLM with every stream's bounded KV session (:class:`serve.stages.LLMStage`)."""

    kind = LLM

    async def append(self, stream_id: str, chunk: Any) -> dict[str, Any]:
        """Prefill one encoded chunk into the stream's KV session."""
        self._require(stream_id)
        return await asyncio.to_thread(self.stage.append, chunk) or {}

    async def ask(self, stream_id: str, question: str, max_new_tokens: int) -> AsyncIterator[str]:
        """Stream the answer's text pieces (the stream's context is restored afterwards by the stage)."""
        self._require(stream_id)
        async for piece in iterate_in_thread(lambda: self.stage.ask(stream_id, question, max_new_tokens)):
            yield piece


    async def score_choices(self, stream_id: str, question: str, choices: list[str]) -> list[float]:
        """Next-token probability of each choice over the stream's context (yes/no watches)."""
        self._require(stream_id)
        return await asyncio.to_thread(self.stage.score_choices, stream_id, question, choices)

# ---- sticky calls ---------------------------------------------------------------------------------------------------
def call_sticky(handle: Any, method: str, stream_id: str, *args: Any, timeout_s: float, retry_s: float) -> Any:
    """Blocking call of ``handle.<method>(stream_id, *args)`` routed by stream id; retries misroutes for ``retry_s``.

    Raises:
        StreamMisroutedError: still misrouted after ``retry_s`` (the owner is gone).
        RequestError and others: the remote error, unwrapped.
    """
    deadline, delay = time.monotonic() + retry_s, 0.02
    routed = handle.options(multiplexed_model_id=stream_id)
    while True:
        try:
            return getattr(routed, method).remote(stream_id, *args).result(timeout_s=timeout_s)
        except Exception as exc:
            err = unwrap(exc)
            if not isinstance(err, StreamMisroutedError) or time.monotonic() > deadline:
                raise err from None
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


async def acall_sticky(handle: Any, method: str, stream_id: str, *args: Any, retry_s: float) -> Any:
    """Async :func:`call_sticky` (for the ingress event loop)."""
    deadline, delay = time.monotonic() + retry_s, 0.02
    routed = handle.options(multiplexed_model_id=stream_id)
    while True:
        try:
            return await getattr(routed, method).remote(stream_id, *args)
        except Exception as exc:
            err = unwrap(exc)
            if not isinstance(err, StreamMisroutedError) or time.monotonic() > deadline:
                raise err from None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
