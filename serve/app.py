"""Ray Serve shims over the plain classes: deployments, service-owned ingest hosts, and ``build_app(config)``.

Topology (names are fixed; replicas, CPUs/GPUs and autoscaling come from ``config.serve``)::

    HTTP -> ingress (FastAPI, stateless) --create/push--> ingest host "<app>/ingest/<k>" (a few detached actors,
                                          many streams each: decode + sample + chunk; serve/hosts.py)
                                                             |  chunk                     |  EncodedChunk (CPU)
                                                             v                            v
                                                      "vision" replicas             "llm" replicas
                                                      (ViT + cacher + pruner)        (LLM + KV sessions)
            ingress --question (SSE)-------------------------------------------------->  "llm"

Every stage call is routed by stream id (:class:`serve.routing.StreamAffinityRouter`, Serve's public request
router) and carries the stream incarnation's token; see :mod:`serve.replicas`. A stream's life on the stages is
:class:`serve.flow.StageFlow`, the same code the in-process pipeline runs. Ingest hosts are owned by the service
(detached, restarted by Ray), not by an ingress replica: ingress replicas scale or die without touching streams.
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import Any, AsyncIterator

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from serve.api import (
    AnswerUsage,
    CapacityError,
    CreateStreamRequest,
    HealthResponse,
    PushResponse,
    QuestionRequest,
    StreamMisroutedError,
    StreamNotFoundError,
    StreamStateError,
    StreamStats,
)
from serve.directory import StreamDirectory
from serve.hosts import STREAM_NAMESPACE, IngestHostActor, directory_name
from serve.http_app import make_api
from serve.replicas import (
    LLM,
    VISION,
    LLMDeployment,
    StageFactory,
    VisionDeployment,
    acall_stream,
    default_stage_factory,
    replica_gone,
    unwrap,
)
from serve.routing import StreamAffinityRouter, rendezvous_pick
from serve.service_config import ServeSettings
from serve.streams import new_stream_id, resolve_source, stream_options, summarize_stage_stats
from stream.errors import ConfigError

__all__ = ["INGRESS", "LLM", "VISION", "Ingress", "LLMDeployment", "RayBackend", "StreamMisroutedError",
           "VisionDeployment", "app_builder", "build_app", "check_fits", "default_stage_factory", "start_service",
           "stop_service", "unwrap"]

INGRESS = "ingress"


# ---- the ingress ---------------------------------------------------------------------------------------------------
class RayBackend:
    """:class:`serve.http_app.StreamBackend` over the ingest hosts and the two stream-routed deployments."""

    def __init__(self, config: Any, vision: Any, llm: Any) -> None:
        self.config = config
        self.settings: ServeSettings = config.serve
        self.source_config = config.source.model_copy(update={"media_root": self.settings.media_root})
        self.defaults = config.stream_options()
        self.vision, self.llm = vision, llm
        self.host_names = [f"{self.settings.app_name}/ingest/{k}" for k in range(self.settings.ingest.hosts)]
        self._remote = ray.remote(IngestHostActor)
        self._hosts: dict[str, Any] = {}
        self._directory: Any | None = None

    def _host_by_name(self, name: str) -> Any:
        if name not in self._hosts:
            if self._directory is None:  # before any host: a restarted host looks its streams up there
                self._directory = ray.remote(StreamDirectory).options(
                    name=directory_name(self.settings.app_name), namespace=STREAM_NAMESPACE, get_if_exists=True,
                    lifetime="detached", max_restarts=-1, num_cpus=0,
                ).remote(4 * self.settings.max_streams + 16)
            ing = self.settings.ingest
            self._hosts[name] = self._remote.options(
                name=name, namespace=STREAM_NAMESPACE, get_if_exists=True, lifetime="detached", max_restarts=-1,
                num_cpus=ing.num_cpus, max_concurrency=ing.host_concurrency,
                runtime_env=self.settings.process.runtime_env(host=True) or None,
            ).remote(self.settings.app_name, self.source_config, ing, self.settings.stream_ttl_s,
                     self.settings.watches, self.settings.process.trim_on_close, self.settings.process.gc_freeze)
        return self._hosts[name]

    def _host(self, stream_id: str) -> Any:
        return self._host_by_name(rendezvous_pick(stream_id, self.host_names))

    async def _call(self, stream_id: str, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._host(stream_id), method).remote(stream_id, *args)
        except ray.exceptions.RayActorError as exc:  # the host died mid-call: Ray restarts it, the stream failed
            raise StreamStateError(
                f"stream {stream_id!r} failed: its ingest host died during this call ({type(exc).__name__}); once "
                "Ray restarted the host, GET /streams lists it as failed. Fix: DELETE it and create it again."
            ) from None
        except Exception as exc:
            raise unwrap(exc) from None

    async def _stream_ids(self) -> list[str]:
        out: list[str] = []
        for ids in await asyncio.gather(*(self._host_by_name(n).ids.remote() for n in self.host_names),
                                        return_exceptions=True):
            if isinstance(ids, list):
                out.extend(ids)
        return sorted(out)

    async def create(self, request: CreateStreamRequest) -> StreamStats:
        resolved = resolve_source(request.source, self.settings)
        options = stream_options(self.defaults, request)
        sid = new_stream_id(request.stream_id)
        if len(await self._stream_ids()) >= self.settings.max_streams:
            raise CapacityError(f"the service holds its maximum of {self.settings.max_streams} streams. Fix: close "
                                "one, or raise serve.max_streams.")
        return await self._call(sid, "create", request.source, resolved, options)

    async def push(self, stream_id: str, batch: Any, flush: bool) -> PushResponse:
        return await self._call(stream_id, "push", batch, flush)

    async def ask(self, stream_id: str, request: QuestionRequest,
                  usage: AnswerUsage | None = None) -> AsyncIterator[str]:
        """The answer's text pieces; ``usage`` (if given) takes the LLM replica's :class:`AnswerUsage` messages."""
        if request.wait_s > 0:
            await self._call(stream_id, "wait_idle", request.wait_s)
        token = await self._call(stream_id, "begin_question")
        gen, first = await self._start_answer(stream_id, token, request)
        if gen is None:
            return
        try:
            async for item in _chain(first, gen):
                if isinstance(item, AnswerUsage):
                    if usage is not None:
                        usage.update(item)
                    continue
                yield item
        except Exception as exc:  # e.g. the stream was closed mid-answer: the user error, not Ray's wrapper
            raise unwrap(exc) from None

    async def _start_answer(self, stream_id: str, token: str, request: QuestionRequest) -> tuple[Any, str]:
        """Start the answer and await its first piece; retry misroutes, then reopen the LLM state once."""
        for attempt in (0, 1):
            deadline = time.monotonic() + self.settings.ingest.misroute_retry_s
            while True:
                gen = self.llm.options(stream=True).ask.remote(stream_id, token, request.question,
                                                               request.max_new_tokens, request.sampling())
                try:
                    return gen, await gen.__anext__()
                except StopAsyncIteration:
                    return None, ""
                except Exception as exc:
                    err = unwrap(exc)
                    if not isinstance(err, StreamMisroutedError) and not replica_gone(err):
                        raise err from None
                    if time.monotonic() > deadline:
                        break
                await asyncio.sleep(0.05)
            if attempt == 0:  # the LLM replica holding the stream is gone: rebuild cold
                token = await self._call(stream_id, "reopen", LLM)
        raise StreamMisroutedError(f"no LLM replica holds stream {stream_id!r} even after reopening it")

    # -- watches: owned by the stream's ingest host (serve/watchset.py), so every ingress replica sees them ----------
    async def add_watch(self, stream_id: str, request: Any) -> Any:
        return await self._call(stream_id, "add_watch", request)

    async def list_watches(self, stream_id: str) -> list[Any]:
        return await self._call(stream_id, "list_watches")

    async def delete_watch(self, stream_id: str, watch_id: str) -> Any:
        return await self._call(stream_id, "delete_watch", watch_id)

    async def watch_events(self, stream_id: str, since: int, timeout_s: float) -> Any:
        return await self._call(stream_id, "watch_events", since, timeout_s)

    async def frame_jpeg(self, stream_id: str) -> bytes | None:
        """The stream's newest sampled frame as JPEG (None before the first chunk)."""
        return await self._call(stream_id, "frame_jpeg")

    async def stats(self, stream_id: str) -> StreamStats:
        base, tokens = await self._call(stream_id, "stats")
        if not tokens:  # a stream its dead host lost: failed, no stage state left to ask
            return base
        retry_s = min(2.0, self.settings.ingest.misroute_retry_s)

        async def stage(handle: Any, kind: str) -> dict[str, Any]:
            try:
                return await acall_stream(handle, "stats", stream_id, tokens[kind], retry_s=retry_s)
            except Exception as exc:  # best effort: report, do not fail the whole stats call
                return {"error": f"{type(exc).__name__}: {exc}"}

        vision, llm = await asyncio.gather(stage(self.vision, VISION), stage(self.llm, LLM))
        return base.model_copy(update={**summarize_stage_stats(vision, llm), "vision": vision, "llm": llm})

    async def list(self) -> list[StreamStats]:
        out = []
        for sid in await self._stream_ids():
            try:
                out.append(await self.stats(sid))
            except StreamNotFoundError:
                continue  # closed meanwhile
        return out

    async def close(self, stream_id: str) -> StreamStats:
        final = await self.stats(stream_id)
        closed = await self._call(stream_id, "close")
        return final.model_copy(update={"state": "closed", "ingest": closed.ingest})

    async def health(self) -> HealthResponse:
        deployments, sizes = {}, {}
        for name, handle in ((VISION, self.vision), (LLM, self.llm)):
            try:
                info = await asyncio.wait_for(_await(handle.ping.remote()), timeout=10)
                deployments[name] = "HEALTHY"
                sizes[name] = int(info.get("parameter_bytes", 0))
            except Exception as exc:
                deployments[name] = f"UNREACHABLE ({type(unwrap(exc)).__name__})"
        ok = all(v == "HEALTHY" for v in deployments.values())
        return HealthResponse(status="ok" if ok else "degraded", streams=len(await self._stream_ids()),
                              deployments={INGRESS: "HEALTHY", **deployments}, parameter_bytes=sizes)


async def _await(response: Any) -> Any:
    return await response


async def _chain(first: Any, rest: Any) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


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
    router = RequestRouterConfig(request_router_class=StreamAffinityRouter)
    env = s.process.runtime_env()
    vision = VisionDeployment.options(**s.vision.deployment_options(env), request_router_config=router).bind(
        config, stage_factory)
    llm = LLMDeployment.options(**s.llm.deployment_options(env), request_router_config=router).bind(
        config, stage_factory)
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
        if s.ray_address is None:  # the local instance this starts: a bounded GCS task history, and Ray's own
            os.environ.setdefault("RAY_task_events_max_num_task_in_gcs", str(s.process.ray_task_events))
            for key, value in s.process.env.items():  # processes (GCS, raylet) get serve.process.env too
                os.environ.setdefault(key, value)  # an operator's own environment wins
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
            "llm, plus ingest.hosts x ingest.num_cpus). Fix: lower serve.*.num_cpus / num_gpus or max_streams, "
            "or join a bigger cluster with serve.ray_address."
        )


def stop_service(app_name: str | None = None) -> None:
    """Shut Serve down, kill the service's ingest hosts (detached: they outlive Serve otherwise), leave Ray."""
    try:
        if ray.is_initialized():
            for actor in ray.util.list_named_actors(all_namespaces=True):
                named = actor["name"]
                owned = "/ingest/" in named or named.endswith("/directory")
                if actor["namespace"] == STREAM_NAMESPACE and owned and (
                        app_name is None or named.startswith(f"{app_name}/")):
                    try:
                        ray.kill(ray.get_actor(named, namespace=STREAM_NAMESPACE), no_restart=True)
                    except ValueError:
                        pass
        serve.shutdown()
    finally:
        ray.shutdown()
