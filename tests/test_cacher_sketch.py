"""Key sketches (``CacherConfig.key_sketch``, ``cache/sketch.py``): changed tokens are found from a random projection
of their keys, and only the picked tokens' keys are computed. Tiny real HF towers with random weights: what is tested
holds for any weights (exactness at ratio 1, a planted change is picked, sketch cosines track key cosines)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cache.cacher import StreamCacher
from cache.config import CacherConfig
from cache.sketch import key_sketch
from cache.stc import encode_full, encode_selective, reference_nbytes, selective_layer_rows
from stream.models.vision_ops import layer_ops
from tests.media import real_video

R = 16  # sketch width for the tiny towers (width 64)


def _clip(n: int, step: int = 5) -> np.ndarray:
    """``[n, 240, 320, 3]``: vtest.avi frames ``0, step, ...`` (a fixed camera)."""
    import av

    out = []
    with av.open(str(real_video("vtest.avi"))) as box:
        for i, frame in enumerate(box.decode(video=0)):
            if i % step == 0:
                out.append(np.asarray(frame.to_image().resize((320, 240))))
            if len(out) == n:
                break
    return np.stack(out)


def test_ratio_one_with_sketches_is_the_full_encoder_and_rolls_exactly(tiny_llava) -> None:
    hidden = tiny_llava.vision_embed(tiny_llava.preprocess(_clip(2)))  # [2, P, D]
    layers = tiny_llava.vision_layers
    _, (ref,) = encode_full(hidden[:1], layers, keep=[0], sketch_dim=R)
    full, (oracle,) = encode_full(hidden[1:], layers, keep=[0], sketch_dim=R)
    assert ref.sketch is not None and ref.sketch.shape == (len(layers), hidden.shape[1], R)
    out, counts = encode_selective(hidden[1:], layers, ref, ratio=1.0, rolling=True)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    assert counts == [hidden.shape[1]] * len(layers)
    for name in ("keys", "values", "update", "sketch"):  # the reference is now frame 1, sketches included
        torch.testing.assert_close(getattr(ref, name), getattr(oracle, name), atol=1e-5, rtol=1e-5)
    assert ref.nbytes == reference_nbytes(len(layers), hidden.shape[1], hidden.shape[2], torch.float32, R)
    before = ref.sketch.clone()
    out, counts = encode_selective(hidden[1:], layers, ref, ratio=0.0, threshold=-1.0, rolling=True)  # none picked
    assert counts == [0] * len(layers) and torch.equal(ref.sketch, before)


@pytest.mark.parametrize("qwen", ["qwen2_5_vl", "qwen3_vl"], indirect=True)
def test_sketches_through_qwen_ops_ratio_one_is_exact(qwen) -> None:
    """Rotary keys: the sketch is taken before the rotary, the picked keys get it at their own positions."""
    pv = qwen.preprocess(_clip(4))  # two temporal patches
    layers = qwen.grid_layers(*pv.shape[1:3])
    with torch.inference_mode():
        hidden = qwen.vision_embed(pv)  # [2, P, D]
    width = hidden.shape[-1] // 4
    _, (ref,) = encode_full(hidden[:1], layers, keep=[0], sketch_dim=width)
    full, _ = encode_full(hidden[1:], layers)
    out, _ = encode_selective(hidden[1:], layers, ref, ratio=1.0, rolling=True)
    torch.testing.assert_close(out, full, atol=1e-4, rtol=1e-4)
    again, counts = encode_selective(hidden[1:], layers, ref, ratio=0.1, rolling=True)  # now the same frame
    torch.testing.assert_close(again, full, atol=1e-4, rtol=1e-4)
    assert 0 < sum(counts) < len(layers) * hidden.shape[1]


def test_a_planted_change_is_picked_by_its_sketch(tiny_llava) -> None:
    rgb = np.repeat(_clip(1), 2, axis=0)
    rgb[1, 40:120, 60:160] = 255 - rgb[1, 40:120, 60:160]  # an object: one region inverted
    hidden = tiny_llava.vision_embed(tiny_llava.preprocess(rgb))
    layer = tiny_llava.vision_layers[0]
    _, (ref,) = encode_full(hidden[:1], [layer], keep=[0], sketch_dim=R)
    changed = (hidden[1] - hidden[0]).norm(dim=-1) > 1e-4  # [P] tokens whose patch changed
    assert 0 < int(changed.sum()) < hidden.shape[1] // 4
    with torch.inference_mode():
        _, idx, rows = selective_layer_rows(layer, hidden[1:], ref.layer(0, hidden.dtype), 0.25, None)
    picked = torch.zeros_like(changed)
    picked[idx[0]] = True
    assert bool(picked[changed].all()), "a token whose patch changed was served from the reference"
    assert rows.sketch is not None and rows.sketch.shape == (1, idx.shape[1], R)


def test_sketch_cosines_rank_tokens_like_key_cosines() -> None:
    """Johnson-Lindenstrauss: at width 64 of 512, sketch cosines order the tokens' key changes as the keys do."""
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    torch.manual_seed(0)
    layer = SiglipEncoderLayer(SiglipVisionConfig(hidden_size=512, intermediate_size=64, num_attention_heads=8)).eval()
    ops = layer_ops(layer)
    with torch.inference_mode():
        h = torch.randn(1, 400, 512)
        h2 = h + torch.rand(1, 400, 1) * torch.randn(1, 400, 512)  # tokens changed by different amounts
        exact = 1 - F.cosine_similarity(ops.keys(h2), ops.keys(h), dim=-1)[0]  # [P]
        approx = 1 - F.cosine_similarity(key_sketch(ops, h2, 64), key_sketch(ops, h, 64), dim=-1)[0]
    rank = lambda v: v.argsort().argsort().float()  # noqa: E731
    spearman = float(torch.corrcoef(torch.stack([rank(exact), rank(approx)]))[0, 1])
    assert spearman > 0.9, spearman
    top = set(exact.topk(60).indices.tolist())  # the 15 % most changed
    assert len(top & set(approx.topk(60).indices.tolist())) >= 36  # JL noise: ~2/3 of the top 15 % agree


def test_config_uses_a_sketch_only_when_it_saves_work(tiny_llava) -> None:
    assert CacherConfig().key_sketch == 128 and CacherConfig().sketch_width(1152) == 128
    assert CacherConfig().sketch_width(64) is None  # 128 is not narrower than half of 64: exact keys
    assert CacherConfig(key_sketch=None).sketch_width(1152) is None
    cacher = StreamCacher(CacherConfig(key_sketch=R, refresh_cell_below=None))
    pv = tiny_llava.preprocess(_clip(4))
    tiny_llava.encode_vision(pv, layer_runner=cacher.runner)
    held = cacher.held_references()
    d, p, layers = 64, 729, len(tiny_llava.vision_layers)
    assert held and held[0]["bytes"] == (3 * d + R) * layers * p * 4
    assert cacher.stats()["frames_reused"] > 0


@pytest.mark.parametrize("qwen", ["qwen2_5_vl"], indirect=True)
def test_region_refresh_auto_takes_the_adapters_value(tiny_llava, qwen) -> None:
    """'auto' region refresh: 0.8 for towers with absolute position embeddings, off for Qwen2.5-VL (rotary only);
    an explicit value always wins; a stream opened on the vision stage gets its family's value."""
    from serve.core.options import StreamOptions
    from serve.core.stages import VisionStage
    from stream.models.qwen3_vl import Qwen3VLAdapter

    auto = CacherConfig()
    assert auto.refresh_cell_below == "auto" and StreamCacher(auto).config.refresh_cell_below == 0.8
    assert auto.resolved(Qwen3VLAdapter.cell_refresh).refresh_cell_below == 0.8
    assert CacherConfig(refresh_cell_below=0.5).resolved(None).refresh_cell_below == 0.5
    with pytest.raises(ValueError, match="refresh_cell_below"):
        CacherConfig.parse({"refresh_cell_below": 1.5}, "cacher")
    for adapter, want in ((tiny_llava, 0.8), (qwen, None)):
        stage = VisionStage(adapter)
        stage.open("s")
        assert stage._streams.get("s").cacher.config.refresh_cell_below == want, adapter.family
        stage.close("s")
        stage.open("t", StreamOptions().merged({"cacher": {"refresh_cell_below": 0.6}}))
        assert stage._streams.get("t").cacher.config.refresh_cell_below == 0.6
        stage.close("t")
