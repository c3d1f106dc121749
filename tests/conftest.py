"""Shared fixtures: tiny random-weight models (built once per session), real media, threads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stream.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llava", "llava_onevision")


@pytest.fixture(scope="session")
def tiny_smolvlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stream.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-smolvlm", "smolvlm")


@pytest.fixture(scope="session")
def tiny_llava(tiny_llava_dir: Path):
    from stream.models import load_adapter

    return load_adapter(tiny_llava_dir)


@pytest.fixture(scope="session")
def tiny_smolvlm(tiny_smolvlm_dir: Path):
    from stream.models import load_adapter

    return load_adapter(tiny_smolvlm_dir)


@pytest.fixture(params=["llava_onevision", "smolvlm"])
def tiny_adapter(request: pytest.FixtureRequest):
    """Each family's tiny adapter in turn."""
    name = "tiny_llava" if request.param == "llava_onevision" else "tiny_smolvlm"
    return request.getfixturevalue(name)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def qwen(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A tiny Qwen2.5-VL / Qwen3-VL adapter (random weights), once per module and family."""
    from stream.models import load_adapter, make_tiny_model

    torch.manual_seed(0)
    family = request.param
    return load_adapter(str(make_tiny_model(tmp_path_factory.mktemp("m") / f"tiny-{family}", family)))


@pytest.fixture(scope="session")
def media_dir() -> Path:
    if not (MEDIA / "vtest.avi").is_file():
        pytest.skip(f"real test videos not found at {MEDIA} (see ../shared/media/README.md)")
    return MEDIA


@pytest.fixture(scope="session")
def real_frames(media_dir: Path) -> np.ndarray:
    """``[6, 576, 768, 3]`` uint8: vtest.avi at 1 fps (every 10th frame)."""
    import decord

    vr = decord.VideoReader(str(media_dir / "vtest.avi"))
    return vr.get_batch(list(range(0, 60, 10))).asnumpy()
