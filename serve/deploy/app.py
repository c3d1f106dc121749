"""Ray Serve shims over the plain classes: deployments, service-owned ingest hosts, and ``build_app(config)``.

Topology (names are fixed; replicas, CPUs/GPUs and autoscaling come from ``config.serve``)::

    HTTP -> ingress (FastAPI, stateless) --every stream call--> ingest host "<app>/ingest/<k>" (a few detached
                                          actors, many streams each: decode + sample + chunk, questions, watches;
                                          serve/deploy/hosts.py over serve/core/hosts.py)
                                                             |  chunk                     |  EncodedChunk (CPU)
                                                             v                            v
                                                      "vision" replicas             "llm" replicas
                                                      (ViT + cacher + pruner)        (LLM + KV sessions)

Every stage call is routed by stream id (:class:`serve.deploy.routing.StreamAffinityRouter`, Serve's public request
router) and carries the stream incarnation's token; see :mod:`serve.deploy.replicas`. A stream's life on the stages is
:class:`serve.core.flow.StageFlow` run by the stream's host (:class:`serve.core.hosts.IngestHost`), the same code the
in-process backend and pipeline run; the ingress only relays to the host (an answer streams back through it). Ingest
hosts are owned by the service (detached, restarted by Ray), not by an ingress replica: ingress replicas scale or die
without touching streams.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncIterator

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from serve.core.api import CapacityError, HealthResponse, StreamStateError, StreamStats
from serve.core.config import ServiceConfig
from serve.core.directory import StreamDirectory
from serve.core.local import HostBackend
from serve.core.runner import StreamPlan
from serve.core.settings import ServeSettings
from serve.core.slots import rendezvous_pick
from serve.deploy.hosts import STREAM_NAMESPACE, IngestHostActor, directory_name
from serve.deploy.replicas import (
    LLM,
    VISION,
    LLMDeployment,
    StageFactory,
    VisionDeployment,
    default_stage_factory,
    unwrap,
)
from serve.deploy.routing import StreamAffinityRouter
from serve.http.app import make_api
from stream.errors import ConfigError

__all__ = ["INGRESS", "LLM", "VISION", "Ingress", "LLMDeployment", "RayBackend", "VisionDeployment", "app_builder",
           "build_app", "check_fits", "default_stage_factory", "start_service", "stop_service", "unwrap"]

INGRESS = "ingress"


# ---- the ingress ---------------------------------------------------------------------------------------------------
class RayBackend(HostBackend):
    """:class:`serve.core.local.HostBackend` over the ingest host actors (the stages are reached from the hosts)."""

    def __init__(self, config: ServiceConfig, vision: DeploymentHandle, llm: DeploymentHandle) -> None:
        super().__init__(config.serve, config.stream_options())
        self.config = config
        self.source_config = config.source.model_copy(update={"media_root": self.settings.media_root})
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
                     self.settings.watches, self.settings.process.trim_on_close, self.settings.process.gc_freeze,
                     self.settings.timeline)
        return self._hosts[name]

    def _host(self, stream_id: str) -> Any:
        return self._host_by_name(self._host_key(stream_id))

    def _host_key(self, stream_id: str) -> str:
        return rendezvous_pick(stream_id, self.host_names)

    async def _host_call(self, key: str, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._host_by_name(key), method).remote(*args)
        except Exception as exc:
            raise self._host_error(key, exc) from None

    async def _host_stream(self, key: str, method: str, *args: Any) -> AsyncIterator[Any]:
        try:
            async for ref in getattr(self._host_by_name(key), method).remote(*args):
                yield await ref
        except Exception as exc:
            raise self._host_error(key, exc) from None

    def _host_error(self, key: str, exc: BaseException) -> BaseException:
        if isinstance(exc, ray.exceptions.RayActorError):
            return StreamStateError(f"ingest host {key} died during this call ({type(exc).__name__}): its streams "
                                    "failed. Fix: DELETE them and create them again.")
        return unwrap(exc)

    def _error(self, stream_id: str, exc: BaseException) -> BaseException:
        if isinstance(exc, ray.exceptions.RayActorError):  # the host died mid-call: Ray restarts it, the stream failed
            return StreamStateError(
                f"stream {stream_id!r} failed: its ingest host died during this call ({type(exc).__name__}); once "
                "Ray restarted the host, GET /streams lists it as failed. Fix: DELETE it and create it again.")
        return unwrap(exc)

    async def _call(self, stream_id: str, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._host(stream_id), method).remote(stream_id, *args)
        except Exception as exc:
            raise self._error(stream_id, exc) from None

    async def _stream(self, stream_id: str, method: str, *args: Any) -> AsyncIterator[Any]:
        try:
            async for ref in getattr(self._host(stream_id), method).remote(stream_id, *args):
                yield await ref
        except Exception as exc:
            raise self._error(stream_id, exc) from None

    async def _every_host(self, method: str) -> list[Any]:
        pages = await asyncio.gather(*(getattr(self._host_by_name(n), method).remote() for n in self.host_names),
                                     return_exceptions=True)
        return [page for page in pages if not isinstance(page, BaseException)]

    async def _create(self, plan: StreamPlan) -> StreamStats:
        if sum(await self._every_host("holding")) >= self.settings.max_streams:
            raise CapacityError(f"the service holds its maximum of {self.settings.max_streams} streams. Fix: close "
                                "one, or raise serve.max_streams.")
        try:
            return await self._host(plan.stream_id).create.remote(plan)
        except Exception as exc:
            raise self._error(plan.stream_id, exc) from None

    async def health(self) -> HealthResponse:
        deployments, sizes = {}, {}
        for name, handle in ((VISION, self.vision), (LLM, self.llm)):
            try:
                info = await asyncio.wait_for(_await(handle.ping.remote()), timeout=10)
                deployments[name] = "HEALTHY"
                sizes[name] = info.parameter_bytes
            except Exception as exc:
                deployments[name] = f"UNREACHABLE ({type(unwrap(exc)).__name__})"
        ok = all(v == "HEALTHY" for v in deployments.values())
        streams = sum(len(ids) for ids in await self._every_host("ids"))
        return HealthResponse(status="ok" if ok else "degraded", streams=streams,
                              deployments={INGRESS: "HEALTHY", **deployments}, parameter_bytes=sizes)


async def _await(response: Any) -> Any:
    return await response


@serve.deployment(name=INGRESS)
@serve.ingress()
class Ingress:
    """The HTTP entry point (stateless: streams are named actors, so ingress replicas can scale freely)."""

    def __init__(self, config: ServiceConfig, vision: DeploymentHandle, llm: DeploymentHandle) -> None:
        self.backend = RayBackend(config, vision, llm)
        self.settings: ServeSettings = config.serve

    def __serve_build_asgi_app__(self) -> Any:
        return make_api(self.backend, self.settings)


def build_app(config: ServiceConfig, stage_factory: StageFactory | None = None) -> serve.Application:
    """The Serve application: ingress + vision + LLM deployments, sized from ``config.serve``.

    Args:
        config: a :class:`serve.core.config.ServiceConfig`.
        stage_factory: ``(kind, config) -> stage`` building the vision/LLM stage in each replica (default: load
            the model and build :class:`serve.core.stages.VisionStage` / :class:`serve.core.stages.LLMStage`).
    """
    s: ServeSettings = config.serve
    router = RequestRouterConfig(request_router_class=StreamAffinityRouter)
    env = s.process.runtime_env()
    vision = VisionDeployment.options(**s.vision.deployment_options(env), request_router_config=router).bind(
        config, stage_factory)
    llm = LLMDeployment.options(**s.llm.deployment_options(env), request_router_config=router).bind(
        config, stage_factory)
    # the ingress decodes pushed JPEGs on a few threads: the same malloc settings keep its freed frames returnable
    return Ingress.options(**s.ingress.deployment_options(env)).bind(config, vision, llm)


def app_builder(args: dict[str, str]) -> serve.Application:
    """Entry point for ``serve run serve.deploy.app:app_builder config=configs/serve.yaml`` (Ray's CLI)."""
    return build_app(ServiceConfig.load(args.get("config")))


def start_service(config: ServiceConfig, stage_factory: StageFactory | None = None, **ray_init: Any) -> str:
    """Start (or join) Ray, start Serve's HTTP proxy and deploy the app; returns the base URL.

    Args:
        config: a :class:`serve.core.config.ServiceConfig`.
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
