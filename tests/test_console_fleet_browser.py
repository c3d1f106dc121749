"""The console's camera grid, fleet question, moments and timeline in headless Chromium (Debian chromium +
chromedriver, selenium) against the app on 127.0.0.1: four labelled cameras over real footage, a red square planted
in one from 10 s on, stage doubles that score by colour (plumbing, not meaning; tests/console_scene.py). Screenshots
go to a temporary folder; the ones in docs/ come from ``python -m tests.console_scene docs``."""
from __future__ import annotations

import pytest

from tests.console_scene import ONSET_S, RED_CAMERA, available, run_scene


def test_fleet_answers_land_on_tiles_and_moments_open_in_the_viewer(tmp_path):
    pytest.importorskip("selenium.webdriver")
    missing = available()
    if missing:
        pytest.skip(missing)
    shown = run_scene(tmp_path)
    assert shown["top"] == [RED_CAMERA]  # ranked first, highlighted
    assert shown["scores"][RED_CAMERA].startswith("#1") and "P(yes)=1.00" in shown["scores"][RED_CAMERA]
    assert all("P(yes)=" in text for text in shown["scores"].values())
    assert shown["moments"][0].startswith(f"{ONSET_S:.1f} s – 19.5 s score 1.00")  # from the onset to the end
    assert shown["timeline"] == ["alert", "caption", "moment", "score"]
    assert shown["viewer"].startswith(f"Is there a red square?: {ONSET_S:.1f} s")
    for name in ("console.png", "console_moments.png"):
        assert (tmp_path / name).stat().st_size > 10_000
