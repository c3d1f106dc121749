"""Ray Serve shims over the plain classes: deployments, per-stream actors, and ``build_app(config)``.

Topology (names are fixed; replicas, CPUs/GPUs and autoscaling come from ``config.serve``)::

    HTTP -> ingress (FastAPI, stateless) --create/push--> StreamActor "<app>/stream/<id>" (one per stream:
                                          decode + sample + chunk, bounded queue; serve/ingest.py)
                                                             |  chunk                     |  EncodedChunk
                                                             v                            v
                                                      "vision" replicas             "llm" replicas
                                                      (ViT + cacher + pruner)        (LLM + KV sessions)
            ingress --question (SSE)-------------------------------------------------->  "llm"

Stickiness and the misroute guard are described in :mod:`serve.replicas`. Streams are named actors
(``<app>/stream/<id>`` in namespace ``stc-serve``) owned by the ingress replica that created them, so any ingress
replica finds a stream by name; a stream lives as long as its owning ingress replica.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import ray
from ray import serve

from serve.api import (
    CapacityError,
    CreateStreamRequest,
    HealthResponse,
    PushResponse,
    QuestionRequest,
    StreamExistsError,
    StreamMisroutedError,
    StreamNotFoundError,
    StreamStats,
)
from serve.http_app import make_api
from serve.replicas import (
    LLM,
    VISION,
    LLMDeployment,
    StageFactory,
    VisionDeployment,
    acall_sticky,
    call_sticky,
    default_stage_factory,
    unwrap,
)
from serve.service_config import IngestSettings, ServeSettings
from serve.streams import StreamRunner, jpeg_bytes, new_stream_id, resolve_source, stream_options, summarize_stage_stats
from stream.config import SourceConfig
from stream.errors import ConfigError, RequestError
from stream.frames import FrameBatch

__all__ = ["INGRESS", "LLM", "VISION", "Ingress", "LLMDeployment", "RayBackend", "StreamActor", "StreamMisroutedError",
           "VisionDeployment", "app_builder", "build_app", "check_fits", "default_stage_factory", "start_service", "stop_service",
           "unwrap"]

STREAM_NAMESPACE = "stc-serve"
INGRESS = "ingress"


class RayStageClient:
    """Stage client of a :class:`StreamActor`: vision then LLM through Serve handles, reopening lost state cold."""

    def __init__(self, vision: Any, llm: Any, ingest: IngestSettings) -> None:
        self.vision, self.llm = vision, llm  # deployment handles
        self.ingest = ingest
        self.options: Any = None
        self.resets = 0
        self.replicas: dict[str, str] = {}

    def _call(self, handle: Any, method: str, stream_id: str, *args: Any) -> Any:
        return call_sticky(handle, method, stream_id, *args, timeout_s=self.ingest.call_timeout_s,
                           retry_s=self.ingest.misroute_retry_s)

    def open(self, stream_id: str, options: Any) -> None:
        self.options = options
        self.replicas[VISION] = self._call(self.vision, "open", stream_id, options)
        try:
            self.replicas[LLM] = self._call(self.llm, "open", stream_id, options)
        except BaseException:
            self._close_quietly(self.vision, stream_id)
            raise

    def reopen(self, kind: str, stream_id: str) -> None:
        """Recreate one stage's state for the stream (its replica was lost); counted in ``resets``."""
        handle = self.vision if kind == VISION else self.llm
        self.replicas[kind] = self._call(handle, "open", stream_id, self.options)
        self.resets += 1

    def encode_append(self, stream_id: str, batch: FrameBatch) -> dict[str, Any]:
        chunk = self._with_reopen(VISION, "encode", stream_id, batch)
        llm = self._with_reopen(LLM, "append", stream_id, chunk)
        return {"vision": chunk.stats, "llm": llm}

    def _with_reopen(self, kind: str, method: str, stream_id: str, arg: Any) -> Any:
        handle = self.vision if kind == VISION else self.llm
        try:
            return self._call(handle, method, stream_id, arg)
        except StreamMisroutedError:
            self.reopen(kind, stream_id)
            return self._call(handle, method, stream_id, arg)

    def close(self, stream_id: str) -> None:
        for handle in (self.vision, self.llm):
            self._close_quietly(handle, stream_id)

    def _close_quietly(self, handle: Any, stream_id: str) -> None:
        try:
            call_sticky(handle, "close", stream_id, timeout_s=self.ingest.call_timeout_s, retry_s=1.0)
        except (StreamMisroutedError, RequestError):
            pass  # nothing held for it (any more)


class StreamActor:
    """One stream in the cluster: a :class:`serve.streams.StreamRunner` whose chunks go through the deployments."""

    def __init__(self, stream_id: str, source_spec: str | None, resolved: str, options: Any,
                 source_config: SourceConfig, ingest: IngestSettings, app_name: str) -> None:
        handles = [serve.get_deployment_handle(kind, app_name=app_name) for kind in (VISION, LLM)]
        self.client = RayStageClient(*handles, ingest)
        self.runner = StreamRunner(stream_id, source_spec, resolved, options, source_config, ingest, self.client)

    def start(self) -> StreamStats:
        self.runner.start()
        return self.runner.stats()

    def push(self, batch: FrameBatch, flush: bool) -> PushResponse:
        return self.runner.push(batch, flush)

    def wait_idle(self, timeout_s: float) -> bool:
        return self.runner.wait_idle(timeout_s)

    def note_question(self) -> None:
        self.runner.questions += 1

    def reopen(self, kind: str) -> None:
        self.client.reopen(kind, self.runner.stream_id)

    def stats(self) -> StreamStats:
        return self.runner.stats()

    def frame_jpeg(self) -> bytes | None:
        frame = getattr(self.runner, "last_frame", None)
        return None if frame is None else jpeg_bytes(frame)

    def close(self) -> StreamStats:
        final = self.runner.stats()
        self.runner.close()
        return final


# ---- the ingress ---------------------------------------------------------------------------------------------------
class RayBackend:
    """:class:`serve.http_app.StreamBackend` over stream actors and the two sticky deployments."""

    def __init__(self, config: Any, vision: Any, llm: Any) -> None:
        self.config = config
        self.settings: ServeSettings = config.serve
        self.source_config = config.source.model_copy(update={"media_root": self.settings.media_root})
        self.defaults = config.stream_options()
        self.vision, self.llm = vision, llm
        self.prefix = f"{self.settings.app_name}/stream/"
        self._remote = ray.remote(StreamActor)
        self._owned: dict[str, Any] = {}  # handles of the actors this replica created (keeps them alive)

    def _actor(self, stream_id: str) -> Any:
        if stream_id in self._owned:
            return self._owned[stream_id]
        try:
            return ray.get_actor(self.prefix + stream_id, namespace=STREAM_NAMESPACE)
        except ValueError:
            raise StreamNotFoundError(
                f"no open stream {stream_id!r}. Fix: list streams with GET /streams, or create one with POST /streams."
            ) from None

    def _stream_ids(self) -> list[str]:
        names = ray.util.list_named_actors(all_namespaces=True)
        return sorted(a["name"][len(self.prefix):] for a in names
                      if a["namespace"] == STREAM_NAMESPACE and a["name"].startswith(self.prefix))

    async def create(self, request: CreateStreamRequest) -> StreamStats:
        resolved = resolve_source(request.source, self.settings)
        options = stream_options(self.defaults, request)
        sid = new_stream_id(request.stream_id)
        if len(self._stream_ids()) >= self.settings.max_streams:
            raise CapacityError(f"the service holds its maximum of {self.settings.max_streams} streams. Fix: close "
                                "one, or raise serve.max_streams.")
        try:
            actor = self._remote.options(
                name=self.prefix + sid, namespace=STREAM_NAMESPACE, num_cpus=self.settings.ingest.num_cpus,
                max_concurrency=16, max_restarts=0,
            ).remote(sid, request.source, resolved, options, self.source_config, self.settings.ingest,
                     self.settings.app_name)
        except ValueError:
            raise StreamExistsError(f"stream {sid!r} is already open. Fix: pick another id or DELETE it first.") from None
        self._owned[sid] = actor
        try:
            return await actor.start.remote()
        except Exception as exc:
            self._owned.pop(sid, None)
            ray.kill(actor, no_restart=True)
            raise unwrap(exc) from None

    async def push(self, stream_id: str, batch: FrameBatch, flush: bool) -> PushResponse:
        actor = self._actor(stream_id)
        try:
            return await actor.push.remote(batch, flush)
        except Exception as exc:
            raise unwrap(exc) from None

    async def ask(self, stream_id: str, request: QuestionRequest) -> AsyncIterator[str]:
        actor = self._actor(stream_id)
        if request.wait_s > 0:
            await actor.wait_idle.remote(request.wait_s)
        actor.note_question.remote()
        gen, first = await self._start_answer(actor, stream_id, request)
        if gen is None:
            return
        yield first
        async for piece in gen:
            yield piece

    async def _start_answer(self, actor: Any, stream_id: str, request: QuestionRequest) -> tuple[Any, str]:
        """Start the answer and await its first piece; retry misroutes, then reopen the LLM state once."""
        for attempt in (0, 1):
            deadline = time.monotonic() + self.settings.ingest.misroute_retry_s
            while True:
                routed = self.llm.options(multiplexed_model_id=stream_id, stream=True)
                gen = routed.ask.remote(stream_id, request.question, request.max_new_tokens)
                try:
                    return gen, await gen.__anext__()
                except StopAsyncIteration:
                    return None, ""
                except Exception as exc:
                    err = unwrap(exc)
                    if not isinstance(err, StreamMisroutedError):
                        raise err from None
                    if time.monotonic() > deadline:
                        break
                await asyncio.sleep(0.05)
            if attempt == 0:
                await actor.reopen.remote(LLM)  # the LLM replica holding the stream is gone: rebuild cold
        raise StreamMisroutedError(f"no LLM replica holds stream {stream_id!r} even after reopening it")

    async def score_yes_no(self, stream_id: str, question: str) -> float:
        """P(yes) / (P(yes) + P(no)) of the answer's first token, on the LLM replica that holds the stream."""
        self._actor(stream_id)
        retry_s = min(2.0, self.settings.ingest.misroute_retry_s)
        yes, no = await acall_sticky(self.llm, "score_choices", stream_id, question, ["yes", "no"], retry_s=retry_s)
        return float(yes / max(yes + no, 1e-12))

    async def frame_jpeg(self, stream_id: str) -> bytes | None:
        """The stream's newest sampled frame as JPEG (None before the first chunk)."""
        return await _await(self._actor(stream_id).frame_jpeg.remote())

    async def stats(self, stream_id: str) -> StreamStats:
        return await self._stats(stream_id, self._actor(stream_id))

    async def _stats(self, stream_id: str, actor: Any) -> StreamStats:
        retry_s = min(2.0, self.settings.ingest.misroute_retry_s)

        async def stage(handle: Any) -> dict[str, Any]:
            try:
                return await acall_sticky(handle, "stats", stream_id, retry_s=retry_s)
            except Exception as exc:  # best effort: report, do not fail the whole stats call
                return {"error": f"{type(exc).__name__}: {exc}"}

        try:
            base, vision, llm = await asyncio.gather(actor.stats.remote(), stage(self.vision), stage(self.llm))
        except Exception as exc:
            raise unwrap(exc) from None
        return base.model_copy(update={**summarize_stage_stats(vision, llm), "vision": vision, "llm": llm})

    async def list(self) -> list[StreamStats]:
        out = []
        for sid in self._stream_ids():
            try:
                out.append(await self.stats(sid))
            except StreamNotFoundError:
                continue  # closed meanwhile
        return out

    async def close(self, stream_id: str) -> StreamStats:
        actor = self._actor(stream_id)
        try:
            final = await self._stats(stream_id, actor)
            await actor.close.remote()
        except ray.exceptions.RayActorError as exc:  # the stream's actor died: remove what is left of it
            raise StreamNotFoundError(
                f"stream {stream_id!r} had failed (its ingest actor died: {exc.__class__.__name__}); it is removed "
                "now. Fix: create it again."
            ) from None
        finally:
            self._owned.pop(stream_id, None)
            ray.kill(actor, no_restart=True)
        return final.model_copy(update={"state": "closed"})

    async def health(self) -> HealthResponse:
        deployments = {}
        for name, handle in ((VISION, self.vision), (LLM, self.llm)):
            try:
                await asyncio.wait_for(_await(handle.ping.remote()), timeout=10)
                deployments[name] = "HEALTHY"
            except Exception as exc:
                deployments[name] = f"UNREACHABLE ({type(unwrap(exc)).__name__})"
        ok = all(v == "HEALTHY" for v in deployments.values())
        return HealthResponse(status="ok" if ok else "degraded", streams=len(self._stream_ids()),
                              deployments={INGRESS: "HEALTHY", **deployments})


async def _await(response: Any) -> Any:
    return await response


@serve.deployment(name=INGRESS)
@serve.ingress()
class Ingress:
    """The HTTP entry point (stateless: streams are named actors, so ingress replicas can scale freely)."""

    def __init__(self, config: Any, vision: Any, llm: Any) -> None:
        self.backend = RayBackend(config, vision, llm)
        self.settings: ServeSettings = config.serve

    def __serve_build_asgi_app__(self) -> Any:
        return make_api(self.backend, self.settings)


def build_app(config: Any, stage_factory: StageFactory | None = None) -> serve.Application:
    """The Serve application: ingress + vision + LLM deployments, sized from ``config.serve``.

    Args:
        config: a :class:`serve.config.ServiceConfig`.
        stage_factory: ``(kind, config) -> stage`` building the vision/LLM stage in each replica (default: load
            the model and build :class:`serve.stages.VisionStage` / :class:`serve.stages.LLMStage`).
    """
    s: ServeSettings = config.serve
    vision = VisionDeployment.options(**s.vision.deployment_options()).bind(config, stage_factory)
    llm = LLMDeployment.options(**s.llm.deployment_options()).bind(config, stage_factory)
    return Ingress.options(**s.ingress.deployment_options()).bind(config, vision, llm)


def app_builder(args: dict[str, str]) -> serve.Application:
    """Entry point for ``serve run serve.app:app_builder config=configs/serve.yaml`` (Ray's CLI)."""
    from serve.config import ServiceConfig

    return build_app(ServiceConfig.load(args.get("config")))


def start_service(config: Any, stage_factory: StageFactory | None = None, **ray_init: Any) -> str:
    """Start (or join) Ray, start Serve's HTTP proxy and deploy the app; returns the base URL.

    Args:
        config: a :class:`serve.config.ServiceConfig`.
        stage_factory: see :func:`build_app`.
        ray_init: extra ``ray.init`` arguments (e.g. ``num_cpus``) when this call starts Ray.
    """
    s: ServeSettings = config.serve
    if not ray.is_initialized():
        ray.init(address=s.ray_address or "local", include_dashboard=False, **ray_init)
        if s.ray_address is None:  # a local instance cannot grow: refuse a config that would wait forever
            try:
                check_fits(s, ray.cluster_resources())
            except ConfigError:
                ray.shutdown()
                raise
    serve.start(proxy_location=s.http.proxy_location, http_options={"host": s.http.host, "port": s.http.port})
    serve.run(build_app(config, stage_factory), name=s.app_name, route_prefix=s.route_prefix, blocking=False)
    host = "127.0.0.1" if s.http.host in ("0.0.0.0", "::") else s.http.host
    return f"http://{host}:{s.http.port}{s.route_prefix.rstrip('/')}"


def check_fits(settings: ServeSettings, available: dict[str, float]) -> None:
    """Raise :class:`ConfigError` when the replicas (at their minimum) and ingest actors cannot all be scheduled."""
    need = settings.min_resources()
    short = {k: (v, float(available.get(k, 0.0))) for k, v in need.items() if v > float(available.get(k, 0.0)) + 1e-9}
    if short:
        detail = "; ".join(f"{k}: needs {v:g}, the Ray instance has {have:g}" for k, (v, have) in short.items())
        raise ConfigError(
            f"the service config cannot be scheduled ({detail}; replicas x num_cpus/num_gpus of ingress, vision and "
            "llm, plus serve.max_streams x ingest.num_cpus). Fix: lower serve.*.num_cpus / num_gpus or max_streams, "
            "or join a bigger cluster with serve.ray_address."
        )


def stop_service() -> None:
    """Shut Serve and this process's Ray connection down (stream actors and replicas go with them)."""
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
