"""Every documented ``stc-serve ask`` flag works with every default, on every family (tiny random-weight models):
the combinations that grow chunks past the KV reserve (pruner off: eight 196-token LLaVA frames are 1568 tokens)
included. The clip has the size of ../shared/media/vtest.avi (768x576)."""
from __future__ import annotations

import json

import pytest

from serve.cli.main import main
from tests.kv_support import one_torch_thread  # noqa: F401  (autouse: no spin-waiting threads on a busy machine)
from tests.media import make_clip

COMBOS = [  # every documented stream flag at least once; the first three grow chunks past the KV reserve
    ["--no-prune"],
    ["--no-cache", "--no-prune", "--kv-policy", "sink_window", "--kv-budget", "2048"],
    ["--no-prune", "--chunk", "16", "--fps", "8", "--kv-policy", "offload"],
    ["--policy", "attention", "--no-cache", "--budget", "400"],
    ["--cache-ratio", "1.0", "--cache-threshold", "0.5", "--budget", "100"],
]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", num_frames=25, fps=10, size=(768, 576))


@pytest.mark.parametrize("family", ["llava_onevision", "smolvlm", "qwen2_5_vl", "qwen3_vl"])
def test_ask_works_with_every_documented_flag_combination(family, clip, capsys):
    for flags in COMBOS:
        argv = ["ask", str(clip), "What?", "--json", "--family", family, "--fps", "4", "--max-new-tokens", "1", *flags]
        rc = main(argv)
        captured = capsys.readouterr()
        assert rc == 0, (flags, captured.err[-500:])
        out = json.loads(captured.out.strip().splitlines()[-1])
        assert out["frames"] >= 8 and out["kv_tokens"] > 0 and out["family"] == family, (flags, out)
