"""Hostile finding: SIGTERM to ``stc-serve serve`` left Ray's processes behind. Now it stops Ray like Ctrl-C: every
process the service started (GCS, raylet, agents, workers) is gone shortly after."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

from tests.rtsp_server import free_port  # noqa: E402

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def test_sigterm_stops_the_service_and_its_ray_processes(tiny_llava_dir):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "serve", "--port", str(port), "--model",
                             str(tiny_llava_dir)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(1.0)
            assert proc.poll() is None, proc.stdout.read()[-3000:]
        else:
            raise AssertionError("the service did not come up in 240 s")
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in started)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        gone, alive = psutil.wait_procs(started, timeout=60)
        assert alive == [], [" ".join(p.cmdline())[:80] for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
