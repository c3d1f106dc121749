"""Replicas and resources of one Ray Serve deployment (``DeploymentSettings``, with optional autoscaling): part of
:class:`serve.core.settings.ServeSettings`. Plain pydantic models: they describe Ray options but import no Ray."""
from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from stream.config_base import StrictModel
from stream.errors import ConfigError


class AutoscalingSettings(StrictModel):
    """Ray Serve autoscaling of one deployment (replicas follow the number of ongoing requests)."""

    min_replicas: int = Field(
        1, ge=1, le=1024, description="Replicas kept when idle (>= 1: replicas hold stream state, zero would drop it)."
    )
    max_replicas: int = Field(4, ge=1, le=1024, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, le=10_000, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(10.0, ge=0, le=3600, description="Load must stay high this long before upscaling.")
    downscale_delay_s: float = Field(
        600.0,
        ge=0,
        le=86_400,
        description="Load must stay low this long before downscaling (a removed replica's streams restart cold).",
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> "AutoscalingSettings":
        if self.max_replicas < self.min_replicas:
            raise ConfigError(
                f"autoscaling.max_replicas={self.max_replicas} is below min_replicas={self.min_replicas}. "
                "Fix: make max_replicas >= min_replicas."
            )
        return self

    def to_ray(self) -> dict[str, Any]:
        """The ``autoscaling_config`` dict Ray Serve takes."""
        return self.model_dump()


class DeploymentSettings(StrictModel):
    """Replicas and resources of one Ray Serve deployment."""

    num_replicas: int | None = Field(
        None, ge=1, le=1024, description="Fixed replica count (default 1). Leave unset when `autoscaling` is given."
    )
    autoscaling: AutoscalingSettings | None = Field(None, description="Autoscale between min and max replicas.")
    num_cpus: float = Field(
        0.5, ge=0, le=1024, description="CPUs Ray reserves per replica (a scheduling share; torch threads are separate)."
    )
    num_gpus: float = Field(0.0, ge=0, le=64, description="GPUs per replica (fractions share one GPU).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray custom resources per replica, e.g. {'encoder_node': 1}."
    )
    max_ongoing_requests: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Requests a replica accepts at once. Keep it high on stateful replicas: a full replica makes "
        "the router try another one, which then answers 'misrouted' and the caller retries.",
    )

    @model_validator(mode="after")
    def _check_replicas(self) -> "DeploymentSettings":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ConfigError(
                f"num_replicas={self.num_replicas} and autoscaling are both set. "
                "Fix: give either a fixed num_replicas or an autoscaling section, not both."
            )
        return self

    def ray_actor_options(self, runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
        """``ray_actor_options`` for ``serve.deployment`` (with ``runtime_env`` when given and not empty)."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            opts["resources"] = dict(self.resources)
        if runtime_env:
            opts["runtime_env"] = runtime_env
        return opts

    def deployment_options(self, runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options(...)`` (replicas, autoscaling, resources, runtime_env)."""
        opts: dict[str, Any] = {
            "ray_actor_options": self.ray_actor_options(runtime_env),
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.to_ray()
        else:
            opts["num_replicas"] = self.num_replicas or 1
        return opts

    @property
    def min_replicas(self) -> int:
        """Replicas guaranteed to exist (fixed count, or the autoscaling minimum)."""
        return self.autoscaling.min_replicas if self.autoscaling else (self.num_replicas or 1)
