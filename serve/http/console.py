"""The web console at ``/ui`` (static HTML/JS/CSS from serve/http/static/, no build step, no CDN) and the
``GET /streams/{id}/frame.jpg`` route it shows. The static files need no API key (they hold no data); every API call
the page makes sends the key (typed into the page, or ``/ui?key=...``) as ``Authorization: Bearer``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import FileResponse, Response

CONSOLE = Path(__file__).with_name("static")
_FILES = {"console.js": "text/javascript", "console.css": "text/css"}


def add_console_routes(app: FastAPI, backend: Any) -> None:
    """Mount ``/ui``, its two assets, and ``/streams/{id}/frame.jpg``."""
    router = APIRouter()

    @router.get("/ui", include_in_schema=False)
    @router.get("/ui/", include_in_schema=False)
    async def console() -> FileResponse:
        return FileResponse(CONSOLE / "index.html", media_type="text/html")

    @router.get("/ui/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in _FILES:
            raise HTTPException(404, f"no console file {name!r}")
        return FileResponse(CONSOLE / name, media_type=_FILES[name])

    @router.get("/streams/{stream_id}/frame.jpg", tags=["streams"], response_class=Response,
                responses={200: {"content": {"image/jpeg": {}}}, 204: {"description": "No frame sampled yet."}})
    async def frame(stream_id: str) -> Response:
        """The newest sampled frame of the stream as JPEG (204 before the first chunk)."""
        data = await backend.frame_jpeg(stream_id)
        if data is None:
            return Response(status_code=204)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    app.include_router(router)
