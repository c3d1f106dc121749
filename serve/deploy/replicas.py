"""The two stateful Ray Serve deployments (vision encoder, LLM) and the stream-routed calls to them.

A stream's state lives on one vision and one LLM replica, chosen by :class:`serve.core.slots.StreamAffinityRouter`
(Serve's public request-router extension point: consistent hashing of the stream id over the live replicas). Every
call is ``method(stream_id, token, ...)``; the replica checks the incarnation token with :class:`StreamSlots` and
answers :class:`StreamMisroutedError` -- never touching state -- for a stream incarnation it does not hold (router
not yet updated, owner gone). :func:`call_stream` retries misroutes for a while; the stream's flow then reopens the
state cold under a new token (counted in ``state_resets``). State left behind by a dead stream is reaped after
``serve.state_ttl_s`` without use. Visual tokens leave the vision replica as CPU tensors (:func:`to_cpu`); numbers as
the typed models of :mod:`serve.core.stats`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterator

import ray
import ray.serve.exceptions
import torch
from ray import serve

from serve.core.api import StreamMisroutedError
from serve.core.config import ServiceConfig
from serve.core.flow import started
from serve.core.local import iterate_in_thread
from serve.core.messages import AnswerItem, EncodedChunk
from serve.core.moments import BlockQuery, BlockScan, with_moments
from serve.core.slots import SlottedStage, StreamSlots
from serve.core.stages import LLMStage, VisionStage
from serve.core.stats import AppendStats, KVStats, ReplicaInfo, VisionStats
from stream.frames import FrameBatch
from stream.memory import trim_heap

VISION, LLM = "vision", "llm"
StageFactory = Callable[[str, ServiceConfig], Any]  # (kind, config) -> a stage (real, or a test double)


def default_stage_factory(kind: str, config: ServiceConfig) -> VisionStage | LLMStage:
    """Build the real stage of ``kind`` (``"vision"`` or ``"llm"``) from the service config (loads the model)."""
    from stream.models.loading import load_adapter_part

    # half the weights per replica: the vision replica never holds the LLM, the LLM replica never the vision tower
    adapter = load_adapter_part(config.model.name, config.model.device, config.model.dtype, part=kind)
    if kind == VISION:
        return VisionStage(adapter, config.stream_options())
    return LLMStage(adapter, config.stream_options(), config.kv_replica_budget_bytes())


def replica_gone(err: BaseException) -> bool:
    """The call's replica died or is unreachable (Serve has not yet noticed): like a misroute, retry elsewhere."""
    return isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                            ray.serve.exceptions.ReplicaUnavailableError))


def unwrap(exc: BaseException) -> BaseException:
    """The user exception inside Ray's task/actor error wrappers (or ``exc`` itself)."""
    for _ in range(8):
        cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayError) else None
        if not isinstance(cause, BaseException):
            break
        exc = cause
    return exc


def to_cpu(message: Any) -> Any:
    """A copy of a dataclass message whose tensor fields (also inside lists/tuples) are on the CPU.

    What crosses a process boundary must not carry a device: the receiver may have no GPU, or another one.
    """
    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu()
        if isinstance(value, (list, tuple)):
            return type(value)(move(v) for v in value)
        return value

    return dataclasses.replace(message, **{f.name: move(getattr(message, f.name))
                                           for f in dataclasses.fields(message) if f.init})


def parameter_bytes(stage: Any) -> int:
    """Bytes of the model parameters a stage's adapter holds (0 for stages without a model, e.g. test doubles)."""
    from stream.models.loading import parameter_bytes as module_bytes

    model = getattr(getattr(stage, "adapter", None), "model", None)
    return module_bytes(model) if isinstance(model, torch.nn.Module) else 0


# ---- stateful deployments ------------------------------------------------------------------------------------------
class _StreamStage:
    """Shared part of the vision and LLM deployments: the stage behind its slots (:class:`SlottedStage`, where the
    open/close/reap logic lives), TTL reaping on the replica's event loop."""

    kind = "stage"

    def __init__(self, config: ServiceConfig, stage_factory: StageFactory | None) -> None:
        self.config = config
        self.stage = (stage_factory or default_stage_factory)(self.kind, config)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.slots = StreamSlots(self.kind, self.replica, config.serve.max_streams_per_replica)
        trim = trim_heap if config.serve.process.trim_on_close else None  # freed tensors: give their pages back
        self.core = SlottedStage(self.stage, self.slots, trim)
        self.ttl_s = config.serve.state_ttl_s
        self._reaper: asyncio.Task | None = None

    @property
    def reaped(self) -> int:
        return self.core.reaped

    def _start_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self.ttl_s / 4))
            await self.reap()

    async def reap(self) -> list[str]:
        """Free the state of streams unused for ``serve.state_ttl_s`` (their stream died or was reopened)."""
        return await asyncio.to_thread(self.core.reap, self.ttl_s)

    async def open(self, stream_id: str, token: str, options: Any) -> str:
        """Create the state of this stream incarnation here (idempotent); frees an earlier incarnation's state."""
        self._start_reaper()
        await asyncio.to_thread(self.core.open, stream_id, token, options)
        return self.replica

    async def close(self, stream_id: str, token: str) -> bool:
        """Free this incarnation's state here; False when this replica does not hold it (nothing to do)."""
        return await asyncio.to_thread(self.core.close, stream_id, token)

    async def stats(self, stream_id: str, token: str) -> VisionStats | KVStats:
        """The stage's counters for this stream, with which replica holds it."""
        out = await asyncio.to_thread(self.core.call, "stats", stream_id, token)
        return out.model_copy(update={"replica": self.replica})

    async def ping(self) -> ReplicaInfo:
        """Liveness and size: this replica's id, streams held and model parameter bytes."""
        self._start_reaper()
        return ReplicaInfo(replica=self.replica, streams=len(self.slots), parameter_bytes=parameter_bytes(self.stage))

    async def where(self) -> ReplicaInfo:
        """This replica's id, node id, streams and GPUs (placement checks and debugging)."""
        ctx = ray.get_runtime_context()
        return ReplicaInfo(replica=self.replica, streams=len(self.slots), stream_ids=self.slots.ids(),
                           node_id=ctx.get_node_id(), pid=os.getpid(), gpu_ids=ray.get_gpu_ids(),
                           parameter_bytes=parameter_bytes(self.stage), reaped=self.reaped)


@serve.deployment(name=VISION)
class VisionDeployment(_StreamStage):
    """ViT + STC cacher + pruner (:class:`serve.core.stages.VisionStage`); per-stream cache state on one replica."""

    kind = VISION

    async def encode(self, stream_id: str, token: str, batch: FrameBatch) -> EncodedChunk:
        """One chunk of frames -> :class:`serve.core.messages.EncodedChunk` (kept visual tokens, on the CPU)."""
        self.slots.require(stream_id, token)
        return to_cpu(await asyncio.to_thread(self.stage.encode, stream_id, batch))


@serve.deployment(name=LLM)
class LLMDeployment(_StreamStage):
    """The shared LLM with every stream's bounded KV session (:class:`serve.core.stages.LLMStage`)."""

    kind = LLM

    async def append(self, stream_id: str, token: str, chunk: EncodedChunk) -> AppendStats:
        """Prefill one encoded chunk into the stream's KV session."""
        self.slots.require(stream_id, token)
        # An append blocks until the engine's step loop has run it. A pool as wide as the replica's request cap
        # lets every concurrent append wait at once, so they meet in one batched step (asyncio's default pool has
        # cpu + 4 threads). Created in the replica (an executor cannot be pickled with the class).
        if getattr(self, "_calls", None) is None:
            self._calls = ThreadPoolExecutor(max_workers=256, thread_name_prefix="llm-call")
        return await asyncio.get_running_loop().run_in_executor(self._calls, self.stage.append, stream_id, chunk)

    async def ask(self, stream_id: str, token: str, question: str, max_new_tokens: int,
                  sampling: Any = None) -> AsyncIterator[AnswerItem]:
        """Stream the answer's items (:meth:`serve.core.stages.LLMStage.ask`: text pieces and answer stats); the
        stream's context is restored afterwards by the stage."""
        self.slots.require(stream_id, token)
        async for item in iterate_in_thread(lambda: self.stage.ask(stream_id, question, max_new_tokens, sampling)):
            yield item

    async def score_choices(self, stream_id: str, token: str, question: str, choices: list[str]) -> list[float]:
        """Next-token probability of each choice over the stream's context (yes/no watches)."""
        self.slots.require(stream_id, token)
        return await asyncio.to_thread(self.stage.score_choices, stream_id, question, choices)

    async def score_blocks(self, stream_id: str, token: str, query: BlockQuery) -> BlockScan:
        """The stream's retained history scored block by block (moment searches); the context is unchanged."""
        self.slots.require(stream_id, token)
        return await asyncio.to_thread(with_moments(self.stage).score_blocks, stream_id, query)


# ---- stream-routed calls --------------------------------------------------------------------------------------------
def _retrying(attempt: Callable[[], Any], stream_id: str, retry_s: float) -> Any:
    """``attempt()`` retried while the stream is misrouted (or its replica is gone) for up to ``retry_s``.

    Raises:
        StreamMisroutedError: still misrouted after ``retry_s`` (the owner is gone: the flow reopens the state).
        RequestError and others: the remote error, unwrapped.
    """
    deadline, delay = time.monotonic() + retry_s, 0.02
    while True:
        try:
            return attempt()
        except Exception as exc:
            err = misroute_or_error(exc, stream_id)
            if not isinstance(err, StreamMisroutedError) or time.monotonic() > deadline:
                raise err from None
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def misroute_or_error(exc: BaseException, stream_id: str) -> BaseException:
    """The remote error unwrapped; a dead or unreachable replica reads as a misroute (retry, then reopen)."""
    err = unwrap(exc)
    if replica_gone(err):
        return StreamMisroutedError(f"the replica serving stream {stream_id!r} is gone ({type(err).__name__})")
    return err


def call_stream(handle: Any, method: str, stream_id: str, token: str, *args: Any, timeout_s: float,
                retry_s: float) -> Any:
    """Blocking ``handle.<method>(stream_id, token, *args)`` (routed by stream id); retries misroutes for
    ``retry_s`` (see :func:`_retrying`)."""
    return _retrying(lambda: getattr(handle, method).remote(stream_id, token, *args).result(timeout_s=timeout_s),
                     stream_id, retry_s)


def stream_call(handle: Any, method: str, stream_id: str, token: str, *args: Any, retry_s: float) -> Iterator[Any]:
    """Blocking streaming ``handle.<method>(...)``: its items, started with the same misroute retries as
    :func:`call_stream` (a misroute before the first item retries; an error after it is the caller's)."""
    def attempt() -> Iterator[Any]:
        return started(iter(getattr(handle.options(stream=True), method).remote(stream_id, token, *args)))

    items = _retrying(attempt, stream_id, retry_s)

    def relay() -> Iterator[Any]:
        try:
            for item in items:
                yield item
        except Exception as exc:
            raise misroute_or_error(exc, stream_id) from None

    return relay()
