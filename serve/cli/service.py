"""``stc-serve serve | push | query``: start the service, feed it a stream, ask it a question.

``serve/cli/main.py`` calls :func:`add_service_commands` on its sub-parsers.
"""
from __future__ import annotations

import argparse
import signal
import json
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


def add_service_commands(sub: Any) -> None:
    """Register ``serve``, ``push`` and ``query`` on an ``argparse`` sub-parsers object."""
    p = sub.add_parser("serve", help="start the Ray Serve service (HTTP API) and block until Ctrl-C")
    p.add_argument("--config", type=Path, help="service YAML (see configs/serve.yaml); flags override it")
    p.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--model", help="model folder / hub id (default: built-in tiny model, random weights)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--media-root", help="folder that file sources must be inside (default: file sources off)")
    p.add_argument("--api-key-file", help="require the API key in this file on every request")
    p.add_argument("--ray-address", help="join this Ray cluster ('auto', 'ray://host:10001'); default: local Ray")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("push", help="feed a video into the running service (prints the stream id)")
    p.add_argument("source", help="rtsp:// or http(s):// URL (the service pulls it), or a local video file "
                   "(decoded here and pushed as JPEG frames)")
    _add_client_flags(p)
    p.add_argument("--stream-id", help="choose the stream id (default: random)")
    p.add_argument("--fps", type=float, help="frames per second kept (default: the service's)")
    p.add_argument("--chunk", type=int, help="frames per encoder chunk (default: the service's)")
    p.add_argument("--remote", action="store_true",
                   help="SOURCE is a path under the service's media root: let the service read it")
    p.add_argument("--realtime", action="store_true", help="pace pushed frames by their timestamps")
    p.add_argument("--batch", type=int, default=8, help="frames per push request (default 8)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("query", help="ask the running service about a stream; the answer streams to stdout")
    p.add_argument("stream", help="stream id (from `stc-serve push` or GET /streams)")
    p.add_argument("question")
    _add_client_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--wait", type=float, default=0.0, help="wait up to S seconds for received frames to be encoded")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streamed text")
    p.set_defaults(func=cmd_query)


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"service URL (default {DEFAULT_URL})")
    p.add_argument("--api-key-file", help="file holding the service's API key")


def _client(args: argparse.Namespace) -> Any:
    from serve.http.client import StcClient

    key = None
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().splitlines()[0].strip()
    return StcClient(args.url, api_key=key)


def cmd_serve(args: argparse.Namespace) -> int:
    """Start Ray (or join ``--ray-address``), deploy the app, print the URL, block until interrupted."""
    from serve.deploy.app import start_service, stop_service
    from serve.core.config import ServiceConfig

    serve_over: dict[str, Any] = {}
    for flag, key in (("media_root", "media_root"), ("api_key_file", "api_key_file"), ("ray_address", "ray_address")):
        if getattr(args, flag):
            serve_over[key] = getattr(args, flag)
    http = {k: getattr(args, k) for k in ("host", "port") if getattr(args, k) is not None}
    if http:
        serve_over["http"] = http
    model = {k: v for k, v in (("name", args.model), ("device", args.device)) if v}
    overrides = {k: v for k, v in (("serve", serve_over), ("model", model)) if v}
    cfg = ServiceConfig.load(args.config, overrides)
    url = start_service(cfg)
    print(f"stc-serve is up at {url} (OpenAPI docs: {url}/docs). Ctrl-C stops it.", flush=True)

    def on_sigterm(signum: int, frame: Any) -> None:  # SIGTERM (systemd, docker stop) stops Ray like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping...", file=sys.stderr)
    finally:
        stop_service()
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """URL or ``--remote``: the service reads the source. Local file: decode here, push JPEG batches."""
    client = _client(args)
    scheme = urllib.parse.urlsplit(args.source).scheme.lower() if "://" in args.source else ""
    if scheme in ("rtsp", "rtsps", "http", "https") or args.remote:
        info = client.create_stream(args.source, stream_id=args.stream_id, fps=args.fps,
                                    frames_per_chunk=args.chunk)
        print(json.dumps({"stream_id": info["stream_id"], "kind": info["kind"], "state": info["state"]}))
        return 0
    info = client.create_stream(None, stream_id=args.stream_id, fps=args.fps, frames_per_chunk=args.chunk)
    sid = info["stream_id"]
    print(f"stream {sid}: pushing {args.source}", file=sys.stderr)
    pushed = _push_local_file(client, sid, args.source, args.batch, args.realtime)
    stats = client.stats(sid)["ingest"]
    print(json.dumps({"stream_id": sid, "frames_pushed": pushed, "frames_dropped": stats["frames_dropped"]}))
    return 0


def _push_local_file(client: Any, stream_id: str, path: str, batch: int, realtime: bool) -> int:
    """Decode ``path`` here and push it in JPEG batches (same-size frames per batch); returns frames pushed."""
    import numpy as np

    from stream.sources import open_source

    pending: list[Any] = []
    pushed, start = 0, time.monotonic()
    with open_source(path) as source:
        for frame in source:
            if realtime:
                time.sleep(max(0.0, frame.pts - (time.monotonic() - start)))
            if pending and pending[0].rgb.shape != frame.rgb.shape:
                pushed += _send(client, stream_id, pending, np, flush=False)
                pending = []
            pending.append(frame)
            if len(pending) >= batch:
                pushed += _send(client, stream_id, pending, np, flush=False)
                pending = []
    if pending:
        pushed += _send(client, stream_id, pending, np, flush=True)
    return pushed


def _send(client: Any, stream_id: str, frames: list[Any], np: Any, flush: bool) -> int:
    rgb = np.stack([f.rgb for f in frames])
    client.push_frames(stream_id, rgb, [f.pts for f in frames], encoding="jpeg", flush=flush)
    return len(frames)


def cmd_query(args: argparse.Namespace) -> int:
    """Stream the answer to stdout (``--json``: one object with the answer and timings)."""
    client = _client(args)
    done: dict[str, Any] = {}
    pieces = []
    for piece in client.ask(args.stream, args.question, args.max_new_tokens, args.wait, done=done):
        pieces.append(piece)
        if not args.json:
            print(piece, end="", flush=True)
    if args.json:
        print(json.dumps({"stream_id": args.stream, **done}))
    else:
        print()
        print(f"ttft_ms={done.get('ttft_ms', 0):.1f} total_ms={done.get('total_ms', 0):.1f}", file=sys.stderr)
    return 0
