"""Settings of the Ray Serve service: deployments (``serve.core.deployment_settings``), HTTP, ingest queues, media
root, limits, API key.

:class:`ServeSettings` is one section of the full service config (``serve.core.config.ServiceConfig`` composes it with the
stream/cache/pruner/KV configs and loads YAML). Every model rejects unknown keys; ``ServeSettings.parse(dict)``
raises :class:`stream.errors.ConfigError` naming the field, the bad value and the fix.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from serve.core.deployment_settings import DeploymentSettings
from stream.config_base import StrictModel
from stream.errors import ConfigError

DropPolicy = Literal["drop_oldest", "drop_newest"]
UrlScheme = Literal["rtsp", "rtsps", "http", "https"]
DEFAULT_DENY_NETWORKS = (
    "127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128",  # loopback, "this host"
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918 private networks
    "100.64.0.0/10",  # CGNAT (RFC 6598); holds 100.100.100.200, a cloud metadata address
    "fc00::/7",  # IPv6 unique-local (holds fd00:ec2::254, a cloud metadata address)
    "169.254.0.0/16", "fe80::/10",  # link-local (holds 169.254.169.254, the usual metadata address)
)
LONG_LIVED_SHARE = 0.75  # at most this share of an ingress replica's max_ongoing_requests may be long-lived


class HttpSettings(StrictModel):
    """Where Ray Serve's HTTP proxy listens."""

    host: str = Field("127.0.0.1", min_length=1, description="Bind address ('0.0.0.0' to listen on every interface).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port of the HTTP API.")
    proxy_location: Literal["HeadOnly", "EveryNode", "Disabled"] = Field(
        "HeadOnly",
        description="Where Serve runs HTTP proxies: the head node only, every node (behind a load balancer), or "
        "none (handles only).",
    )


class IngestSettings(StrictModel):
    """Per-stream ingest actors: decode + sample + chunk, then push chunks to the encoder."""

    queue_chunks: int = Field(
        4, ge=1, le=1024, description="Chunks waiting for the encoder per stream (the bounded queue)."
    )
    drop_policy: DropPolicy = Field(
        "drop_oldest",
        description="Live and pushed streams, queue full: 'drop_oldest' discards the oldest waiting chunk (answers "
        "stay about the most recent video), 'drop_newest' discards the incoming chunk. Dropped frames are counted. "
        "File streams never drop: their decoder waits for the encoder instead.",
    )
    num_cpus: float = Field(
        0.05, ge=0, le=64, description="CPUs Ray reserves per ingest host actor (it mostly waits on I/O)."
    )
    hosts: int = Field(
        2, ge=1, le=1024,
        description="Ingest host actors (detached, owned by the service): each runs many streams' ingest threads, "
        "so a stream costs threads and buffers, not a process. A stream id maps to one host by consistent hashing.",
    )
    host_concurrency: int = Field(
        256, ge=4, le=100_000, description="Calls one ingest host serves at once (push, stats, questions)."
    )
    call_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Longest wait for one encoder or LLM call before the stream fails."
    )
    misroute_retry_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="How long a call is retried while the router has not yet learned which replica holds a "
        "stream; after that the stream is reopened cold on another replica (counted in `state_resets`).",
    )


class WatchSettings(StrictModel):
    """Standing questions (``serve/core/watchset.py``): bounds, the rate limit (per ingest host) and the webhook allowlist."""

    max_watches_per_stream: int = Field(4, ge=1, le=64)
    max_events_per_stream: int = Field(256, ge=1, le=100_000)
    asks_per_s: float = Field(4.0, gt=0, le=1000, description="Watch questions per second per ingest host.")
    min_every_s: float = Field(0.2, gt=0, description="Smallest accepted every_s.")
    max_new_tokens: int = Field(32, ge=1, le=512)
    webhook_hosts: list[str] = Field(default_factory=list, description="Hosts webhooks may POST to.")
    webhook_timeout_s: float = Field(
        2.0, gt=0, le=60,
        description="Deadline of one webhook delivery attempt (connect, send, answer); a receiver slower than this "
        "fails the attempt. Each destination (scheme, host, port) has its own queue and thread, so a slow one only "
        "delays its own events.",
    )
    webhook_retries: int = Field(3, ge=0, le=10, description="Retries of a failed delivery (exponential backoff).")
    webhook_queue: int = Field(
        64, ge=1, le=10_000, description="Events waiting per destination; past it new events are dropped (counted).")
    max_destinations: int = Field(
        16, ge=1, le=1024, description="Webhook destinations (scheme, host, port) with a delivery thread at once.")
    captions_per_stream: int = Field(
        256, ge=1, le=100_000,
        description="Answers of text watches kept per stream as its caption track (GET /streams/{id}/timeline), "
        "apart from the event ring, so fast yes/no ticks never push captions out.")


class FleetSettings(StrictModel):
    """Questions over many streams at once (``POST /questions``, ``POST /moments``, several ``stream://`` parts)."""

    max_streams: int = Field(
        64, ge=1, le=4096, description="Streams one fleet question or fleet moment search may name or select (413).")
    max_concurrent: int = Field(
        4, ge=1, le=1024,
        description="Fleet questions and moment searches one ingress replica runs at once (429 with Retry-After).")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Longest answer per stream of a text fleet question.")


class TimelineSettings(StrictModel):
    """What a stream keeps of its past for moments and its timeline: thumbnails per chunk and found moments."""

    thumbnails_per_stream: int = Field(
        512, ge=1, le=100_000,
        description="Chunk thumbnails kept per stream (a ring, oldest dropped): at the default 8 frames per chunk "
        "and 1 fps, 68 minutes. Each is one JPEG of at most thumbnail_side px.")
    thumbnail_side: int = Field(160, ge=16, le=1024, description="Longer side of a thumbnail (pixels).")
    thumbnail_quality: int = Field(70, ge=10, le=95, description="JPEG quality of a thumbnail.")
    moments_kept: int = Field(64, ge=1, le=10_000, description="Moments found per stream kept for its timeline.")
    max_top_k: int = Field(20, ge=1, le=1000, description="Largest top_k of a moment search (422 above).")
    max_scored_blocks: int = Field(
        256, ge=1, le=100_000,
        description="Blocks a yes/no moment search scores per stream; when a stream holds more in the searched "
        "range, the retrieval score picks which (a shortlist).")
    max_entries: int = Field(500, ge=1, le=100_000, description="Entries of one timeline answer (the newest).")


class ProcessSettings(StrictModel):
    """How the service's long-running processes hold memory (vision/LLM replicas and ingest hosts)."""

    env: dict[str, str] = Field(
        default_factory=lambda: {"MALLOC_ARENA_MAX": "2"},
        description="Environment variables of the ingress, vision and LLM replicas and the ingest hosts (Ray "
        "`runtime_env`), and of "
        "every process of a local Ray instance the service starts itself (GCS, raylet). "
        "The default caps glibc's malloc arenas at 2: a many-threaded replica otherwise gets up to 8 per core, and "
        "memory freed in one thread's arena is never reused by another, so RSS creeps up for tens of minutes.",
    )
    host_env: dict[str, str] = Field(
        default_factory=lambda: {"MALLOC_MMAP_THRESHOLD_": "131072"},
        description="Extra environment variables of the ingest hosts only (over `env`). The default fixes glibc's "
        "mmap threshold at 128 KiB: decoded frames (a 768x576 RGB frame is 1.3 MB) are then mapped and unmapped "
        "one by one instead of carved from the heap, where frames of different lifetimes (sampled and kept, or "
        "dropped) fragment it and the heap only grows. Not for model replicas: their CPU tensors would pay a "
        "page fault per page on every allocation.",
    )
    trim_on_close: bool = Field(
        True,
        description="Return freed heap pages to the OS (glibc malloc_trim) after a stream's state is freed "
        "(vision/LLM replicas) or the stream closed (ingest hosts).",
    )
    gc_freeze: bool = Field(
        True,
        description="Ingest hosts freeze the objects alive after start-up out of Python's cyclic garbage collector "
        "(gc.freeze). With torch and Ray loaded a host starts with ~470,000 tracked objects, and a full collection "
        "then waits until a quarter as many again have become long-lived: in a 30-minute soak none ran, so any "
        "cyclic garbage (and the frames it held) stayed. Frozen, full collections are no longer gated on the "
        "start-up objects and cost ~0 ms instead of ~185 ms holding the GIL.",
    )
    ray_task_events: int = Field(
        10_000, ge=100, le=10_000_000,
        description="Task events the GCS keeps when this service starts its own local Ray instance "
        "(RAY_task_events_max_num_task_in_gcs; Ray's default 100,000). Every stage call is a Ray task, so this is "
        "the GCS's memory bound; it only limits the dashboard's task history. Ignored when joining a cluster.",
    )

    def runtime_env(self, host: bool = False) -> dict[str, Any]:
        """The Ray ``runtime_env`` of the vision/LLM replicas, or with ``host`` of the ingest hosts ({} when no
        variables are set)."""
        env = {**self.env, **self.host_env} if host else dict(self.env)
        return {"env_vars": env} if env else {}


class ServeSettings(StrictModel):
    """The service section of the config: deployments, HTTP, ingest, security and request limits."""

    app_name: str = Field("stc", min_length=1, max_length=64, description="Ray Serve application name.")
    route_prefix: str = Field("/", pattern=r"^/", description="URL prefix of the HTTP API.")
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'ray://host:10001'); None starts a local Ray instance."
    )
    http: HttpSettings = Field(default_factory=HttpSettings, description="HTTP listen address.")
    ingress: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(num_cpus=0.1),
        description="The HTTP ingress (FastAPI) deployment.",
    )
    vision: DeploymentSettings = Field(
        default_factory=DeploymentSettings, description="Vision encoder deployment (ViT + STC cacher + pruner)."
    )
    llm: DeploymentSettings = Field(
        default_factory=DeploymentSettings, description="LLM deployment (stream sessions with bounded KV)."
    )
    ingest: IngestSettings = Field(default_factory=IngestSettings, description="Per-stream ingest actors.")
    media_root: str | None = Field(
        None,
        description="Folder that file sources must resolve into (symlinks and '..' are resolved first). "
        "None disables file sources over the API.",
    )
    allowed_schemes: list[UrlScheme] = Field(
        default_factory=lambda: ["rtsp", "rtsps", "http", "https"],
        description="URL schemes accepted for live sources.",
    )
    api_key: SecretStr | None = Field(
        None, description="If set, every endpoint needs 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."
    )
    api_key_file: str | None = Field(
        None, description="Read the API key from this file instead (first line); keeps secrets out of YAML."
    )
    allow_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts or networks (names, IPs or CIDRs such as '10.0.0.0/8') that URL sources may name even "
        "when `deny_networks` covers them; when `only_allowed` is true, the only ones accepted.",
    )
    deny_networks: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DENY_NETWORKS),
        description="Networks URL sources may not reach (checked on every address the host name resolves to; an "
        "IPv4-mapped IPv6 address counts as its IPv4 address): by default loopback (the service's own endpoints), "
        "private networks (RFC 1918, CGNAT 100.64.0.0/10, IPv6 unique-local fc00::/7), link-local and cloud "
        "metadata addresses. Admit a camera LAN with `allow_hosts`, e.g. ['192.168.1.0/24'].",
    )
    only_allowed: bool = Field(False, description="Accept URL sources only on hosts in `allow_hosts`.")
    stream_ttl_s: float = Field(
        900.0, gt=0, le=30 * 86400,
        description="Ended, failed and idle streams (no push, question or frame for this long) are closed.",
    )
    state_ttl_s: float = Field(
        1800.0, gt=0, le=60 * 86400,
        description="A replica frees a stream's vision/LLM state unused this long (its stream died); keep it above "
        "stream_ttl_s.",
    )
    max_streams: int = Field(16, ge=1, le=100_000, description="Open streams the service accepts in total.")
    max_streams_per_replica: int = Field(
        16, ge=1, le=10_000,
        description="Streams one vision or LLM replica holds state for (the default equals max_streams, so one "
        "replica of each takes every stream the service accepts).",
    )
    max_push_bytes: int = Field(
        64 * 2**20, ge=1024, le=2**31, description="Largest msgpack body accepted by the push endpoint (bytes)."
    )
    max_frames_per_push: int = Field(256, ge=1, le=100_000, description="Frames in one pushed batch at most.")
    max_frame_side: int = Field(4096, ge=16, le=16_384, description="Largest pushed frame height or width (pixels).")
    max_push_pixels: int = Field(
        1 << 24, ge=256, le=1 << 31,
        description="Decoded pixels one push may hold (frames x height x width as the JPEG headers declare them, "
        "checked before any pixel is decoded; 16.8 M = 48 MiB of RGB, below what a raw body of the default "
        "max_push_bytes carries).",
    )
    max_stream_push_pixels: int = Field(
        1 << 25, ge=256, le=1 << 32,
        description="Decoded pixels of one stream's pushes being decoded or handed to its host at once (concurrent "
        "pushes past it get 429 with Retry-After).",
    )
    max_readers_per_stream: int = Field(
        8, ge=1, le=10_000,
        description="Event readers on one stream at once, and streamed answers on one stream at once (each kind its "
        "own count, so a flood of readers never blocks the stream's questions), per ingress replica; past it: 429.",
    )
    max_long_lived_per_replica: int = Field(
        128, ge=1, le=100_000,
        description="Long-lived requests (event readers, streamed answers) one ingress replica serves at once; past "
        "it: 429. At most 3/4 of ingress.max_ongoing_requests, so short requests (health, push, create) always "
        "find a slot.",
    )
    max_question_chars: int = Field(
        960, ge=1, le=1_000_000,
        description="Longest question accepted (413 above). With max_new_tokens it must fit kv.reserve_tokens.",
    )
    max_new_tokens: int = Field(512, ge=1, le=65_536, description="Largest max_new_tokens a question may ask for.")
    watches: WatchSettings = Field(default_factory=WatchSettings, description="Standing questions and webhooks.")
    fleet: FleetSettings = Field(default_factory=FleetSettings, description="Questions over many streams at once.")
    timeline: TimelineSettings = Field(
        default_factory=TimelineSettings, description="Thumbnails, moments and the timeline of each stream.")
    process: ProcessSettings = Field(default_factory=ProcessSettings, description="Memory of long-running processes.")

    @model_validator(mode="after")
    def _check(self) -> "ServeSettings":
        if self.api_key is not None and self.api_key_file is not None:
            raise ConfigError("api_key and api_key_file are both set. Fix: keep one of them.")
        if self.api_key_file is not None and not Path(self.api_key_file).is_file():
            raise ConfigError(f"api_key_file={self.api_key_file!r} does not exist. Fix: point it at a readable file.")
        if self.state_ttl_s <= self.stream_ttl_s:
            raise ConfigError(
                f"state_ttl_s={self.state_ttl_s} must exceed stream_ttl_s={self.stream_ttl_s} (replicas would free "
                "state of streams still open). Fix: raise state_ttl_s."
            )
        from serve.core.sources_policy import parse_networks

        parse_networks(self.allow_hosts, "allow_hosts", names=True)
        parse_networks(self.deny_networks, "deny_networks", names=False)
        slots = self.ingress.max_ongoing_requests
        if self.max_long_lived_per_replica > LONG_LIVED_SHARE * slots:
            raise ConfigError(
                f"max_long_lived_per_replica={self.max_long_lived_per_replica} would let event readers and streamed "
                f"answers take more than {LONG_LIVED_SHARE:.0%} of ingress.max_ongoing_requests={slots}, starving "
                f"health checks, pushes and creates. Fix: lower it to <= {int(LONG_LIVED_SHARE * slots)} or raise "
                "ingress.max_ongoing_requests."
            )
        if self.fleet.max_new_tokens > self.max_new_tokens:
            raise ConfigError(
                f"fleet.max_new_tokens={self.fleet.max_new_tokens} exceeds max_new_tokens={self.max_new_tokens} (the "
                "limit of one question). Fix: lower fleet.max_new_tokens."
            )
        if self.media_root is not None and not Path(self.media_root).is_dir():
            raise ConfigError(
                f"media_root={self.media_root!r} is not a directory. Fix: create it or point it at the video folder."
            )
        return self

    def min_resources(self) -> dict[str, float]:
        """CPUs and GPUs the replicas need at their minimum count, plus one ingest actor per allowed stream."""
        deps = (self.ingress, self.vision, self.llm)
        cpus = sum(d.min_replicas * d.num_cpus for d in deps) + self.ingest.hosts * self.ingest.num_cpus
        gpus = sum(d.min_replicas * d.num_gpus for d in deps)
        return {"CPU": round(cpus, 6), "GPU": round(gpus, 6)}

    def resolved_api_key(self) -> str | None:
        """The API key (from ``api_key`` or the first line of ``api_key_file``), or ``None`` when auth is off."""
        if self.api_key is not None:
            return self.api_key.get_secret_value() or None
        if self.api_key_file is not None:
            with open(self.api_key_file, encoding="utf-8") as fh:
                return fh.readline().strip() or None
        return None

    def resolved_media_root(self) -> str | None:
        """``media_root`` with symlinks resolved (the form path checks compare against)."""
        return os.path.realpath(self.media_root) if self.media_root else None
