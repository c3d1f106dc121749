"""A camera fleet for the web console in headless Chromium: four labelled cameras over real footage (vtest.avi,
box.mp4) with a red square planted in one of them at a known time, served by the HTTP app on 127.0.0.1 with stage
doubles that score by colour (the share of strongly red pixels: no model -- the console's plumbing, not meaning).

:func:`run_scene` drives the page: a yes/no fleet question whose answers land on each tile (the red camera ranked
first), a yes/no watch and a caption watch on that camera, a moment search and a click on its best moment; it saves
``console.png`` (the grid with the ranked answers) and ``console_moments.png`` (the moments, viewer and timeline)
into a folder and returns what the page showed. ``tests/test_console_fleet_browser.py`` runs it into a temporary
folder; the screenshots in docs/ come from the one-off command::

    python -m tests.console_scene docs
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve.core.config import ServiceConfig
from serve.core.local import LocalBackend
from serve.core.messages import EncodedChunk
from serve.core.protocol import CONTENT_TYPE, encode_frames
from serve.core.stats import AppendStats, ChunkStats
from serve.http.app import make_api
from tests.fleet_doubles import ScoringLLMStage
from tests.loopback import serve_app
from tests.service_doubles import FakeLLMStage, FakeVisionStage

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
CAMERAS = {"dock-1": ("vtest.avi", "fixed", {"site": "dock", "cam": "1"}),
           "dock-2": ("box.mp4", "fixed", {"site": "dock", "cam": "2"}),
           "gate-1": ("vtest.avi", "handheld", {"site": "gate", "cam": "1"}),
           "yard-1": ("box.mp4", "handheld", {"site": "yard", "cam": "1"})}
RED_CAMERA, ONSET_S, FRAMES = "dock-2", 10, 40  # 40 frames at 2 fps: 20 s; the square from 10 s on
QUESTION = "Is there a red square?"


class RedVisionStage(FakeVisionStage):
    """One token per frame: ``[20 x the share of strongly red pixels (at most 1), 0, 0]``."""

    def encode(self, stream_id: str, batch: Any) -> EncodedChunk:
        chunk = super().encode(stream_id, batch)
        rgb = batch.rgb.astype(np.int16)
        red = ((rgb[..., 0] > 170) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)).mean(axis=(1, 2))  # [F]
        embeds = torch.zeros_like(chunk.embeds)  # [F, 3]
        embeds[:, 0] = torch.from_numpy(np.minimum(1.0, 20 * red).astype(np.float32))
        return EncodedChunk(stream_id, embeds, chunk.tokens_per_frame, chunk.pts, ChunkStats())


class RedLLMStage(ScoringLLMStage):
    """P(yes) = the red share of the newest chunk's reddest frame; a block's score: that of its chunk."""

    def append(self, stream_id: str, chunk: EncodedChunk) -> AppendStats:
        out = FakeLLMStage.append(self, stream_id, chunk)
        self.chunks[stream_id].append((list(chunk.pts), 255.0 * float(chunk.embeds[:, 0].max())))
        return out


def camera_frames(name: str) -> dict[str, np.ndarray]:
    """Each camera's ``[FRAMES, 192, 256, 3]`` uint8 clip (footage + a red square in RED_CAMERA from ONSET_S)."""
    from serve.eval.synth_scene import Camera, PlantedObject, load_footage, render_frame  # noqa: PLC0415

    footage = {f: load_footage(MEDIA / f, "test") for f in {v[0] for v in CAMERAS.values()}}
    out = {}
    for i, (sid, (video, mode, _)) in enumerate(CAMERAS.items()):
        cam = Camera.random(mode, FRAMES, len(footage[video].frames), np.random.default_rng(i))
        planted = [PlantedObject(0, "square", "red", "large", ONSET_S, 10_000, (0.3, 0.6), (0.7, 0.5))] \
            if sid == RED_CAMERA else []
        out[sid] = np.stack([render_frame(footage[video], cam, planted, k) for k in range(FRAMES)])
    return out


def _driver(width: int = 1440, height: int = 1150) -> Any:
    from selenium import webdriver  # noqa: PLC0415
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def _until(fn: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def run_scene(out_dir: Path) -> dict[str, Any]:
    """Serve the fleet, drive the console, save the two screenshots into ``out_dir``; returns what it showed."""
    import httpx  # noqa: PLC0415
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 4},
                               "serve": {"max_streams": 8, "api_key": "secret"}})
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), RedVisionStage(), RedLLMStage())
    auth = {"Authorization": "Bearer secret"}
    clips = camera_frames(RED_CAMERA)
    shown: dict[str, Any] = {}
    try:
        with serve_app(make_api(backend, cfg.serve)) as url:
            for sid, (_, _, labels) in CAMERAS.items():
                httpx.post(url + "/streams", json={"stream_id": sid, "labels": labels}, headers=auth)
                for k in range(0, FRAMES, 8):
                    body = encode_frames(clips[sid][k:k + 8], [j / 2 for j in range(k, k + 8)], "jpeg")
                    httpx.post(f"{url}/streams/{sid}/frames?flush=true", content=body,
                               headers={**auth, "Content-Type": CONTENT_TYPE})
            _until(lambda: all(s["ingest"]["frames_encoded"] == FRAMES
                               for s in httpx.get(url + "/streams", headers=auth).json()["streams"]))
            drv = _driver()
            try:
                drv.get(url + "/ui?key=secret")
                _until(lambda: len(drv.find_elements(By.CSS_SELECTOR, ".tile img[src]")) == len(CAMERAS))
                drv.find_element(By.CSS_SELECTOR, f'.tile[data-stream="{RED_CAMERA}"]').click()
                drv.find_element(By.ID, "fquestion").send_keys(QUESTION)
                drv.find_element(By.CSS_SELECTOR, "#fleet button").click()
                _until(lambda: drv.find_element(By.ID, "fleet-status").get_attribute("data-done") == "true")
                shown["top"] = [t.get_attribute("data-stream") for t in drv.find_elements(By.CSS_SELECTOR, ".tile.top")]
                shown["scores"] = {t.get_attribute("data-stream"): t.find_element(By.CSS_SELECTOR, ".fleet").text
                                   for t in drv.find_elements(By.CSS_SELECTOR, ".tile")}
                for question, mode, every in ((QUESTION, "yes_no", "0.5"), ("What is on screen?", "text", "1")):
                    drv.find_element(By.ID, "wquestion").send_keys(question)
                    drv.find_element(By.ID, "wmode").send_keys("t" if mode == "text" else "y")
                    drv.find_element(By.ID, "wevery").clear()
                    drv.find_element(By.ID, "wevery").send_keys(every)
                    drv.find_element(By.CSS_SELECTOR, "#watch button").click()
                    drv.find_element(By.ID, "wquestion").clear()
                _until(lambda: drv.find_elements(By.CSS_SELECTOR, "#alerts li"))
                drv.find_element(By.ID, "mquery").send_keys(QUESTION)
                drv.find_element(By.CSS_SELECTOR, "#moments button").click()
                _until(lambda: drv.find_element(By.ID, "found").get_attribute("data-done") == "true")
                shown["moments"] = [li.text for li in drv.find_elements(By.CSS_SELECTOR, "#found li")]
                kinds = "return [...document.querySelectorAll('#timeline li')].map((li) => li.dataset.kind)"
                _until(lambda: set(drv.execute_script(kinds)) >= {"alert", "caption", "moment"})  # re-rendered 1/s
                shown["timeline"] = sorted(set(drv.execute_script(kinds)))
                time.sleep(1.5)  # a few chart samples and thumbnails
                out_dir.mkdir(parents=True, exist_ok=True)
                drv.save_screenshot(str(out_dir / "console.png"))
                drv.find_element(By.CSS_SELECTOR, "#found li").click()
                _until(lambda: drv.execute_script("const i=document.getElementById('vimg'); "
                                                  "return i.complete && i.naturalWidth > 0"))
                shown["viewer"] = drv.find_element(By.ID, "vcap").text
                drv.execute_script("document.getElementById('moments').scrollIntoView()")
                time.sleep(0.5)
                drv.save_screenshot(str(out_dir / "console_moments.png"))
            finally:
                drv.quit()
    finally:
        backend.shutdown()
    return shown


def available() -> str | None:
    """Why the scene cannot run here (None: it can)."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        return "Debian chromium + chromium-driver not installed (apt-get install chromium chromium-driver)"
    if not (MEDIA / "vtest.avi").is_file() or not (MEDIA / "box.mp4").is_file():
        return f"real test videos not found at {MEDIA}"
    return None


if __name__ == "__main__":  # python -m tests.console_scene docs
    missing = available()
    if missing:
        sys.exit(missing)
    print(run_scene(Path(sys.argv[1] if len(sys.argv) > 1 else "docs")))
