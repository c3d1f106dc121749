"""Config of the ``stream`` package: how frames are read (:class:`SourceConfig`) and sampled (:class:`SamplerConfig`).

:class:`StreamConfig` composes them; the model adapter's config joins it later. Every model rejects unknown keys
and raises :class:`stream.errors.ConfigError` with a readable message through ``.parse(dict, where)``.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stream.config_base import StrictModel
from stream.errors import ConfigError

OverflowPolicy = Literal["drop_oldest", "block"]
RtspTransport = Literal["tcp", "udp"]


class SourceConfig(StrictModel):
    """How a frame source is opened and read (files, RTSP/HTTP, pushed frames)."""

    open_timeout_s: float = Field(
        10.0, gt=0, le=600, description="Seconds a live source (rtsp/http) may take to connect and send its header."
    )
    read_timeout_s: float = Field(
        10.0, gt=0, le=600, description="Seconds a live source may stay silent mid-stream before it counts as dead."
    )
    rtsp_transport: RtspTransport = Field(
        "tcp", description="RTSP transport: 'tcp' (interleaved, robust through NAT/firewalls) or 'udp' (lower latency)."
    )
    queue_size: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Frames held by a pushed (memory) source or a live source's read-ahead buffer.",
    )
    overflow: OverflowPolicy = Field(
        "drop_oldest",
        description="When the queue is full: 'drop_oldest' discards the oldest queued frame (counted in `dropped`) "
        "so the consumer stays near real time; 'block' makes the producer wait.",
    )
    live_buffer: bool = Field(
        True,
        description="Decode live sources in a background thread into the bounded queue, so a slow consumer sees "
        "recent frames instead of falling further behind.",
    )
    reconnect_attempts: int = Field(
        3, ge=0, le=1000, description="Times a live source is reopened after a disconnect before giving up (0 = never)."
    )
    reconnect_backoff_s: float = Field(
        0.5, gt=0, le=600, description="Wait before the first reconnect attempt; doubled after each failed attempt."
    )
    reconnect_backoff_max_s: float = Field(
        8.0, gt=0, le=3600, description="Upper bound on the wait between two reconnect attempts."
    )
    decode_batch: int = Field(
        8, ge=1, le=1024, description="Frames a file source decodes at once (memory bound of the file reader)."
    )
    decode_threads: int = Field(1, ge=0, le=64, description="Decoder threads for file sources (0 = let FFmpeg pick).")
    file_decoder: Literal["pyav", "decord"] = Field(
        "pyav", description="Decoder of file sources: 'pyav' (sequential, flat memory) or 'decord' (its native "
        "buffers grew RSS by up to ~1.5 GB per host with 2 streams; kept for comparison).")
    media_root: str | None = Field(
        None,
        description="If set, file paths must resolve inside this folder (others are refused as not found); "
        "use it when paths come from untrusted requests.",
    )

    @model_validator(mode="after")
    def _check_backoff(self) -> "SourceConfig":
        if self.reconnect_backoff_max_s < self.reconnect_backoff_s:
            raise ConfigError(
                f"reconnect_backoff_max_s={self.reconnect_backoff_max_s} is below reconnect_backoff_s="
                f"{self.reconnect_backoff_s}. Fix: make the maximum >= the first wait."
            )
        return self


class SamplerConfig(StrictModel):
    """Which frames reach the model: a target rate by timestamp, then fixed-size chunks."""

    fps: float = Field(1.0, gt=0, le=1000, description="Target frames per second kept, chosen by presentation time.")
    frames_per_chunk: int = Field(
        8, ge=1, le=4096, description="Frames per chunk sent to the encoder (a chunk ends early on a size change)."
    )


class StreamConfig(StrictModel):
    """Everything about one stream's input side: the source and the sampler."""

    source: SourceConfig = Field(default_factory=SourceConfig, description="How frames are read.")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="Which frames are kept and chunked.")
