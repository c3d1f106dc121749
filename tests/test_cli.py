"""``stc-serve`` end to end: ask on a real and a generated video, JSON output, clear errors on bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from serve.cli.main import main
from tests.media import make_clip


def test_ask_json_on_generated_clip(tmp_path, tiny_llava_dir, capsys) -> None:
    clip = make_clip(tmp_path / "clip.mp4", num_frames=40, fps=10, size=(160, 120))
    rc = main(["ask", str(clip), "What moves?", "--json", "--model", str(tiny_llava_dir), "--max-new-tokens", "4",
               "--chunk", "2"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("answer", "frames", "visual_tokens", "kv_tokens", "vit_ms", "prefill_ms"):
        assert key in out
    assert out["frames"] == 4 and out["random_weights"] is True and out["chunks"] == 2


def test_ask_until_streams_only_the_first_seconds_and_options_map_the_letter(tmp_path, tiny_llava_dir,
                                                                             capsys) -> None:
    """``--until 1.5`` at 10 fps streams the frames with pts <= 1.5 (16 of 40; 4 chunks of 4 at 10 fps sampling);
    ``--options`` asks the benchmarks' multiple-choice prompt and reports the chosen option's text (or null)."""
    clip = make_clip(tmp_path / "clip.mp4", num_frames=40, fps=10, size=(160, 120))
    rc = main(["ask", str(clip), "Which colour?", "--json", "--model", str(tiny_llava_dir), "--max-new-tokens", "4",
               "--chunk", "4", "--fps", "10", "--until", "1.5", "--options", "red, green ,blue"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["frames"] == 16 and out["chunks"] == 4
    from serve.eval.bench import parse_choice

    letter = parse_choice(out["answer"], 3)
    assert out["choice"] == (None if letter is None else ["red", "green", "blue"]["ABC".index(letter)])


def test_ask_real_video_console_script(media_dir, tiny_smolvlm_dir) -> None:
    """The installed console script on ../shared/media/vtest.avi, SmolVLM family, text output."""
    cmd = [sys.executable, "-m", "serve.cli", "ask", str(media_dir / "vtest.avi"), "What is happening?",
           "--model", str(tiny_smolvlm_dir), "--fps", "0.2", "--max-new-tokens", "3"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "RANDOM weights" in res.stderr
    assert "answer:" in res.stdout and "frames=16" in res.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["ask", "/nonexistent/video.mp4", "q"], "does not exist"),
        (["ask", "{clip}", "q", "--cache-ratio", "1.5"], "cacher.ratio"),
        (["ask", "{clip}", "q", "--policy", "nope"], "unknown pruning policy"),
        (["ask", "{clip}", "q", "--fps", "0"], "sampler.fps"),
        (["ask", "{clip}", "q", "--options", "only-one"], "2-10 comma-separated"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, tiny_llava_dir, capsys, args, message) -> None:
    clip = make_clip(tmp_path / "clip.mp4", num_frames=5, size=(64, 48))
    argv = [a.replace("{clip}", str(clip)) for a in args] + ["--model", str(tiny_llava_dir)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_make_tiny_model_command(tmp_path, capsys) -> None:
    assert main(["make-tiny-model", str(tmp_path / "m"), "--family", "smolvlm"]) == 0
    assert "RANDOM weights" in capsys.readouterr().out
    assert (tmp_path / "m" / "config.json").is_file()
