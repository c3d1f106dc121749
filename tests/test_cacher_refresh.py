"""The cacher's per-region drift refresh (``refresh_cell_below``): a local change that barely moves the whole-frame
signature still gets the frame re-encoded, on real video with a real object planted (tiny LLaVA-OV tower)."""
from __future__ import annotations

import numpy as np
import torch

from cache.cacher import StreamCacher, min_cell_cosine
from cache.config import CacherConfig
from cache.stc import frame_signature
from tests.media import real_video


def _frames() -> np.ndarray:
    """``[4, 240, 320, 3]``: vtest.avi at 1 fps; frame 3 gets a crop of box.mp4 pasted into one corner region."""
    import decord
    from PIL import Image

    a = decord.VideoReader(str(real_video("vtest.avi"))).get_batch([0, 2, 4, 6]).asnumpy()
    b = decord.VideoReader(str(real_video("box.mp4"))).get_batch([30]).asnumpy()[0]
    rgb = np.stack([np.asarray(Image.fromarray(f).resize((320, 240))) for f in a])
    rgb[3, 20:80, 20:100] = np.asarray(Image.fromarray(b).resize((80, 60)))
    return rgb


def test_min_cell_cosine_finds_the_changed_region(tiny_llava) -> None:
    pv = tiny_llava.preprocess(_frames())
    with torch.inference_mode():
        hidden = tiny_llava.vision_embed(pv)  # [4, P, D]
    sig = frame_signature(hidden, 4).numpy()  # [4, D * 16]
    d = hidden.shape[-1]
    assert min_cell_cosine(sig[0], sig[0], d) > 0.9999
    local = min_cell_cosine(sig[3], sig[0], d)
    assert local < min(min_cell_cosine(sig[i], sig[0], d) for i in (1, 2)) - 0.05  # the planted region stands out
    assert float(sig[3] @ sig[0]) > 0.9  # while the whole-frame signature still matches (no new scene)


def test_local_change_triggers_a_refresh_only_when_enabled(tiny_llava) -> None:
    pv = tiny_llava.preprocess(_frames())
    with torch.inference_mode():
        hidden = tiny_llava.vision_embed(pv)
    sig = frame_signature(hidden, 4).numpy()
    d = hidden.shape[-1]
    cut = (min_cell_cosine(sig[3], sig[0], d) + min(min_cell_cosine(sig[i], sig[0], d) for i in (1, 2))) / 2
    kinds = {}
    for name, extra in (("off", {"refresh_cell_below": None}), ("on", {"refresh_cell_below": cut})):
        cacher = StreamCacher(CacherConfig(ratio=0.25, max_reuse=None, **extra))
        tiny_llava.encode_vision(pv, layer_runner=cacher.runner)
        kinds[name] = [k for k, _ in cacher.last_chunk_decisions()]
    assert kinds["off"] == ["new", "reuse", "reuse", "reuse"]
    assert kinds["on"] == ["new", "reuse", "reuse", "refresh"]


def test_refresh_cell_below_is_validated() -> None:
    import pytest

    from stream.errors import ConfigError

    with pytest.raises(ConfigError, match="refresh_cell_below"):
        CacherConfig.parse({"refresh_cell_below": 2.0})
