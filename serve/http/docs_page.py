"""``/docs``: the API reference as one self-contained HTML page rendered from the app's OpenAPI schema.

FastAPI's own Swagger UI loads its JavaScript and CSS from a CDN, so it is blank on a machine without internet
access. This page needs nothing outside the service: every route with its summary, description, parameters,
request body and answers, and the schema of every model. Swagger UI stays at ``/docs/swagger`` for machines that
can reach the CDN (the page says so).
"""
from __future__ import annotations

import html
import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

_STYLE = ("body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
          "h2{margin-top:2em;border-bottom:1px solid #ccc}code,pre{background:#f4f4f4;padding:1px 4px}"
          "pre{padding:8px;overflow:auto;font-size:12px}.m{display:inline-block;min-width:4em;font-weight:bold}")


def add_docs_routes(app: FastAPI) -> None:
    """Mount ``/docs`` (offline reference) and ``/docs/swagger`` (Swagger UI, assets from its CDN)."""

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(render_reference(app.openapi()))

    @app.get("/docs/swagger", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - Swagger UI")


def render_reference(spec: dict[str, Any]) -> str:
    """The whole reference page (HTML, no external asset) of an OpenAPI ``spec``."""
    info = spec.get("info", {})
    out = [f"<!doctype html><meta charset=utf-8><title>{_e(info.get('title', 'API'))} API</title>",
           f"<style>{_STYLE}</style><h1>{_e(info.get('title', 'API'))} API {_e(info.get('version', ''))}</h1>",
           f"<p>{_e(info.get('description', ''))}</p>",
           "<p>Self-contained (works offline). Machine-readable: <a href=/openapi.json>/openapi.json</a>. "
           "Swagger UI: <a href=/docs/swagger>/docs/swagger</a> (loads its assets from a CDN: needs internet).</p>"]
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            out.append(_operation(method, path, op))
    schemas = spec.get("components", {}).get("schemas", {})
    if schemas:
        out.append("<h2>Schemas</h2>")
        for name, schema in sorted(schemas.items()):
            out.append(f"<h3 id='{_e(name)}'>{_e(name)}</h3><pre>{_e(json.dumps(schema, indent=1))}</pre>")
    return "\n".join(out)


def _operation(method: str, path: str, op: dict[str, Any]) -> str:
    parts = [f"<h2><span class=m>{_e(method.upper())}</span> <code>{_e(path)}</code></h2>",
             f"<p><b>{_e(op.get('summary', ''))}</b></p><p>{_e(op.get('description', ''))}</p>"]
    params = op.get("parameters", [])
    if params:
        rows = "".join(f"<li><code>{_e(p.get('name'))}</code> ({_e(p.get('in'))}"
                       f"{', required' if p.get('required') else ''}): {_e(p.get('description', ''))}</li>"
                       for p in params)
        parts.append(f"<p>Parameters:</p><ul>{rows}</ul>")
    body = op.get("requestBody", {}).get("content", {})
    for ctype, media in body.items():
        parts.append(f"<p>Body ({_e(ctype)}): {_schema_ref(media.get('schema', {}))}</p>")
    answers = "".join(f"<li>{_e(code)}: {_e(r.get('description', ''))}</li>"
                      for code, r in op.get("responses", {}).items())
    parts.append(f"<p>Answers:</p><ul>{answers}</ul>")
    return "".join(parts)


def _schema_ref(schema: dict[str, Any]) -> str:
    ref = schema.get("$ref", "")
    if ref:
        name = ref.rsplit("/", 1)[-1]
        return f"<a href='#{_e(name)}'>{_e(name)}</a>"
    return f"<code>{_e(json.dumps(schema))}</code>"


def _e(value: Any) -> str:
    return html.escape(str(value))
