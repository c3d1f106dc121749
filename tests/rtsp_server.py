"""Real loopback servers for live-source tests: RTSP (GStreamer, in a subprocess) and HTTP (a thread).

``rtsp_server(video)`` starts ``tests/gst_rtsp_server.py`` with Debian's ``/usr/bin/python3`` (the GStreamer
bindings live there, not in the project's Python) and yields a :class:`RtspServer` once the port answers; tests
skip with the reason when GStreamer is missing. Needed packages (Debian/Ubuntu):

    apt-get install -y --no-install-recommends gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-base \\
        gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER_SCRIPT = Path(__file__).with_name("gst_rtsp_server.py")
APT_PACKAGES = (
    "gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-base gstreamer1.0-plugins-good "
    "gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav"
)
_START_TIMEOUT_S = 15.0


@functools.lru_cache(maxsize=1)
def gstreamer_missing() -> str | None:
    """``None`` if the GStreamer RTSP server can run here, else why not (with the fix)."""
    if not Path(SYSTEM_PYTHON).is_file():
        return f"{SYSTEM_PYTHON} not found (the GStreamer bindings need Debian's python3)"
    check = (
        "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
        "from gi.repository import Gst; Gst.init(None); "
        "missing = [e for e in ('x264enc', 'rtph264pay', 'decodebin', 'appsrc', 'appsink') "
        "if Gst.ElementFactory.find(e) is None]; print(' '.join(missing))"
    )
    try:
        done = subprocess.run([SYSTEM_PYTHON, "-c", check], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {SYSTEM_PYTHON}: {exc}"
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"GStreamer RTSP bindings missing ({why}); apt-get install {APT_PACKAGES}"
    if done.stdout.strip():
        return f"GStreamer elements missing: {done.stdout.strip()}; apt-get install {APT_PACKAGES}"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class RtspServer:
    """A running ``gst_rtsp_server.py``; :meth:`kill` stops it (mid-stream), :meth:`start` (re)starts it on the
    same port."""

    def __init__(self, video: Path, port: int, mount: str = "/stream", width: int = 0, fps: int = 0) -> None:
        self.video, self.port, self.mount, self.width, self.fps = video, port, mount, width, fps
        self.url = f"rtsp://127.0.0.1:{port}{mount}"
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Start the server and wait until its port answers (fails the test with its stderr if it does not)."""
        command = [SYSTEM_PYTHON, str(SERVER_SCRIPT), str(self.video), "--port", str(self.port), "--mount", self.mount]
        command += ["--width", str(self.width), "--fps", str(self.fps)]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"RTSP server exited with {self._process.returncode}: {self._process.stderr.read()}")
            if _port_answers(self.port):
                return
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"RTSP server did not listen on port {self.port} within {_START_TIMEOUT_S}s")

    def kill(self) -> None:
        """Stop the server at once (SIGKILL: connections drop without an RTSP TEARDOWN)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        if self._process is not None:
            for pipe in (self._process.stdout, self._process.stderr):
                if pipe is not None:
                    pipe.close()
        self._process = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None


@contextlib.contextmanager
def rtsp_server(video: Path, width: int = 0, fps: int = 0) -> Iterator[RtspServer]:
    """Serve ``video`` in a loop over RTSP on 127.0.0.1 for the duration of the ``with`` block.

    Skips the calling test (with the install line) when GStreamer's RTSP server is unavailable. Use ``.url``.
    """
    missing = gstreamer_missing()
    if missing is not None:
        pytest.skip(f"no RTSP test server: {missing}")
    server = RtspServer(Path(video), free_port(), width=width, fps=fps)
    server.start()
    try:
        yield server
    finally:
        server.kill()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 from a thread; yields the base URL (``http://127.0.0.1:PORT``)."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="test http server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
