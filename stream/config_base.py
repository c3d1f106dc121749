"""Strict pydantic base for every package's config, and readable validation errors.

Every package keeps one config model (``stream.config``, ``cache.config``, ``pruner.config``) built on
:class:`StrictModel`; ``serve.config.ServiceConfig`` composes them and loads YAML.
"""
from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from stream.errors import ConfigError

M = TypeVar("M", bound="StrictModel")


class StrictModel(BaseModel):
    """Unknown keys are rejected, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @classmethod
    def parse(cls: type[M], data: dict[str, Any] | None = None, where: str = "") -> M:
        """Validate ``data`` and raise :class:`ConfigError` with a readable message on failure."""
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, cls, where)) from None


def format_validation_error(exc: ValidationError, model: type[BaseModel], where: str = "") -> str:
    """One line per problem: field path, the bad value, what is allowed, and how to fix it."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        if where:
            path = f"{where}.{path}" if path else where
        bad = err.get("input")
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(model.model_fields)) if len(err["loc"]) == 1 else "see the docs"
            lines.append(f"{path}: unknown key. Allowed keys here: {allowed}. Fix: remove or rename it.")
            continue
        if err["type"] == "value_error":  # our validators already say what is allowed and the fix
            lines.append(f"{path}: got {_short(bad)}; {err['msg'].removeprefix('Value error, ')}")
            continue
        lines.append(f"{path}: got {_short(bad)}; {err['msg']}. Fix: {_fix_hint(err)}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(cut)"


def _fix_hint(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return f"use one of {ctx['expected']}."
    for key, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in ctx:
            return f"use a value {word} {ctx[key]}."
    return "give a value of the described type (see the field's description)."
