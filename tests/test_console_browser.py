"""The web console in a real headless browser (Debian chromium + chromedriver, driven by selenium) against the app
served by uvicorn on 127.0.0.1 (LocalBackend + stage doubles, API key on): the page loads, a pushed stream appears
with its frame, a question's streamed answer shows up in the DOM, a yes/no watch's alert appears. Saves a screenshot
to a temporary folder (and $ARTIFACTS_DIR if set); the screenshots in docs/ come from tests/console_scene.py."""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve.core.config import ServiceConfig
from serve.http.app import make_api
from serve.core.protocol import CONTENT_TYPE, encode_frames
from serve.core.local import LocalBackend
from tests.console_scene import _until
from tests.service_doubles import FakeLLMStage, FakeVisionStage, frames

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class _YesLLM(FakeLLMStage):
    def score_choices(self, stream_id, question, choices):
        return [0.9, 0.1]


@pytest.fixture()
def server():
    uvicorn = pytest.importorskip("uvicorn")
    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 4},
                               "serve": {"max_streams": 4, "api_key": "secret"}})
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), FakeVisionStage(), _YesLLM())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_api(backend, cfg.serve), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(5)
    backend.shutdown()


def _driver():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip("Debian chromium + chromium-driver not installed (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(arg)
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def test_console_shows_stream_streamed_answer_and_alert(server, tmp_path):
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    auth = {"Authorization": "Bearer secret"}
    assert httpx.get(server + "/streams").status_code == 401  # the API needs the key; the page sends it
    drv = _driver()
    try:
        drv.get(server + "/ui?key=secret")
        assert "stc-serve" in drv.title
        assert httpx.post(server + "/streams", json={"stream_id": "cam"}, headers=auth).status_code == 201
        rgb, pts = frames(8)
        httpx.post(server + "/streams/cam/frames?flush=true", content=encode_frames(rgb, pts, "raw"),
                   headers={**auth, "Content-Type": CONTENT_TYPE})
        _until(lambda: drv.find_elements(By.CSS_SELECTOR, '.tile[data-stream="cam"]'))
        _until(lambda: "8" in drv.find_element(By.CSS_SELECTOR, '.tile[data-stream="cam"] .encoded').text)
        drv.find_element(By.ID, "question").send_keys("what happened?")
        drv.find_element(By.CSS_SELECTOR, "#ask button").click()
        _until(lambda: drv.find_element(By.ID, "answer").get_attribute("data-done") == "true")
        assert drv.find_element(By.ID, "answer").text == "frames=8 last=0.70"
        drv.find_element(By.ID, "wquestion").send_keys("is there a person?")
        drv.find_element(By.ID, "wevery").clear()
        drv.find_element(By.ID, "wevery").send_keys("0.5")
        drv.find_element(By.CSS_SELECTOR, "#watch button").click()
        alert = _until(lambda: drv.find_elements(By.CSS_SELECTOR, "#alerts li"))
        assert "[alert]" in alert[0].text and "P(yes)=0.90" in alert[0].text
        _until(lambda: drv.execute_script(
            "const i=document.querySelector('.tile[data-stream=cam] img'); return i && i.complete && i.naturalWidth>0"))
        time.sleep(1.5)  # a few chart samples
        shot = tmp_path / "console.png"
        drv.save_screenshot(str(shot))
        if os.environ.get("ARTIFACTS_DIR"):
            shutil.copy(shot, Path(os.environ["ARTIFACTS_DIR"]) / "console.png")
        assert shot.stat().st_size > 1000
        assert httpx.delete(server + "/streams/cam", headers=auth).status_code == 200  # watches end with it
        ended = _until(lambda: [li for li in drv.find_elements(By.CSS_SELECTOR, "#events li")
                                if li.text.startswith("[end]")])
        assert "closed" in ended[0].text and "1 watches stopped" in ended[0].text
    finally:
        drv.quit()
