"""``stc-serve push`` / ``query`` and the Python client against a real HTTP server (uvicorn on loopback, the
in-process backend with stage doubles; no Ray)."""
from __future__ import annotations

import json
import threading
import time

import pytest
import uvicorn

from serve.cli.main import main
from serve.http.client import ServiceError, StcClient
from serve.core.config import ServiceConfig
from serve.http.app import make_api
from serve.core.local import LocalBackend
from tests.media import make_clip
from tests.rtsp_server import free_port
from tests.service_doubles import FakeLLMStage, FakeVisionStage


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    key = tmp_path_factory.mktemp("secrets") / "key"
    key.write_text("k3y\n")
    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 4},
                               "serve": {"api_key_file": str(key), "allow_hosts": ["127.0.0.1"]}})  # loopback RTSP
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), FakeVisionStage(), FakeLLMStage())
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(make_api(backend, cfg.serve), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", str(key)
    srv.should_exit = True
    thread.join(10)
    backend.shutdown()


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_push_a_local_file_then_query(server, capsys, tmp_path):
    url, key = server
    clip = make_clip(tmp_path / "clip.mp4", num_frames=10, fps=10, size=(32, 24))
    code, out, _ = _run(capsys, "push", str(clip), "--url", url, "--api-key-file", key, "--stream-id", "cli1",
                        "--batch", "4")
    assert code == 0
    assert json.loads(out) == {"stream_id": "cli1", "frames_pushed": 10, "frames_dropped": 0}
    code, out, err = _run(capsys, "query", "cli1", "what?", "--url", url, "--api-key-file", key, "--wait", "5")
    assert code == 0 and out.strip() == "frames=10 last=0.90" and "ttft_ms=" in err
    code, out, _ = _run(capsys, "query", "cli1", "what?", "--url", url, "--api-key-file", key, "--json")
    done = json.loads(out)
    assert done["answer"] == "frames=10 last=0.90" and done["tokens"] == 3


def test_cli_errors_are_readable(server, capsys):
    url, key = server
    code, _, err = _run(capsys, "query", "ghost", "hi", "--url", url, "--api-key-file", key)
    assert code == 2 and "404 StreamNotFoundError" in err and "Fix:" in err
    code, _, err = _run(capsys, "push", f"rtsp://127.0.0.1:{free_port()}/cam", "--url", url, "--api-key-file", key)
    assert code == 2 and "422 SourceUnreachableError" in err
    code, _, err = _run(capsys, "query", "x", "hi", "--url", url)  # no key
    assert code == 2 and "401 UnauthorizedError" in err
    code, _, err = _run(capsys, "query", "x", "hi", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 2 and "cannot reach" in err


def test_python_client_round_trip(server):
    url, key = server
    client = StcClient(url, api_key="k3y")
    import numpy as np

    sid = client.create_stream(stream_id="py", frames_per_chunk=2)["stream_id"]
    rgb = np.zeros((3, 16, 16, 3), np.uint8)
    assert client.push_frames(sid, rgb, [0.0, 0.5, 1.0], flush=True)["accepted"] == 3
    text, done = client.ask_text(sid, "q", wait_s=5)
    assert text == "frames=3 last=1.00" == done["answer"]
    assert sid in [s["stream_id"] for s in client.list_streams()]
    assert client.health()["status"] == "ok" and "stc_streams_open" in client.metrics()
    assert client.close_stream(sid)["state"] == "closed"
    with pytest.raises(ServiceError) as info:
        client.stats(sid)
    assert info.value.status == 404 and info.value.kind == "StreamNotFoundError"
