"""The cacher's rolling reference (``CacherConfig.rolling``): reused frames write the tokens they recomputed back
into their reference, so drift cannot build up against a stale key frame. Real video, tiny LLaVA-OV tower
(random weights: the properties tested hold for any weights)."""
from __future__ import annotations

import numpy as np
import torch

from cache.cacher import StreamCacher
from cache.config import CacherConfig
from cache.stc import encode_full, encode_selective, frame_signature
from tests.media import real_video


def _clip(n: int, step: int = 5) -> np.ndarray:
    """``[n, 240, 320, 3]``: vtest.avi frames ``0, step, 2 step, ...`` (a fixed camera, people walking)."""
    import decord
    from PIL import Image

    frames = decord.VideoReader(str(real_video("vtest.avi"))).get_batch([i * step for i in range(n)]).asnumpy()
    return np.stack([np.asarray(Image.fromarray(f).resize((320, 240))) for f in frames])


def _planted(rgb: np.ndarray, frame: int) -> np.ndarray:
    """``rgb`` with a crop of box.mp4 pasted over one region of ``frame`` (the rest untouched)."""
    import decord
    from PIL import Image

    out = rgb.copy()
    crop = decord.VideoReader(str(real_video("box.mp4"))).get_batch([30]).asnumpy()[0]
    out[frame, 40:120, 60:160] = np.asarray(Image.fromarray(crop).resize((100, 80)))
    return out


def test_ratio_one_rolls_the_reference_onto_the_reused_frame(tiny_llava) -> None:
    """Every token recomputed: after reusing frame 1, the reference holds exactly frame 1's full-encode states."""
    hidden = tiny_llava.vision_embed(tiny_llava.preprocess(_clip(2)))  # [2, P, D]
    layers = tiny_llava.vision_layers
    _, (ref,) = encode_full(hidden[:1], layers, keep=[0])
    full, (oracle,) = encode_full(hidden[1:], layers, keep=[0])
    out, counts = encode_selective(hidden[1:], layers, ref, ratio=1.0, rolling=True)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    assert counts == [hidden.shape[1]] * len(layers)
    for name in ("keys", "values", "update"):
        torch.testing.assert_close(getattr(ref, name), getattr(oracle, name), atol=1e-5, rtol=1e-5)


def test_without_rolling_the_reference_is_untouched(tiny_llava) -> None:
    hidden = tiny_llava.vision_embed(tiny_llava.preprocess(_clip(3)))
    layers = tiny_llava.vision_layers
    _, (ref,) = encode_full(hidden[:1], layers, keep=[0])
    before = ref.keys.clone(), ref.values.clone(), ref.update.clone()
    encode_selective(hidden[1:], layers, ref, ratio=0.25, rolling=False)
    assert all(torch.equal(a, b) for a, b in zip(before, (ref.keys, ref.values, ref.update)))


def test_a_planted_change_is_recomputed_and_written_into_the_reference(tiny_llava) -> None:
    """Frame 1 gets an object planted; at layer 0 its tokens are recomputed and now stand in the reference, so
    frame 2 (the object gone again) recomputes them once more instead of reusing the object's features."""
    rgb = np.repeat(_clip(1), 3, axis=0)  # one still frame three times; the object is the only change
    rgb[2, 150:200, 200:280] = 255 - rgb[2, 150:200, 200:280]  # frame 2: the object gone, another region changed
    pv = tiny_llava.preprocess(_planted(rgb, 1))
    hidden = tiny_llava.vision_embed(pv)  # [3, P, D]
    changed = (hidden[1] - hidden[0]).abs().amax(dim=-1) > 1e-4  # [P] tokens the object covers
    assert 20 < int(changed.sum()) < 0.25 * hidden.shape[1]
    layers = tiny_llava.vision_layers
    _, (ref,) = encode_full(hidden[:1], layers, keep=[0])
    keys0 = ref.keys[0].clone()
    encode_selective(hidden[1:2], layers, ref, ratio=0.25, rolling=True)
    rolled = (ref.keys[0] - keys0).abs().amax(dim=-1) > 0  # [P] layer-0 tokens written back
    assert bool(rolled[changed].all())  # every planted token was recomputed and is now in the reference
    gone = (hidden[2] - hidden[0]).abs().amax(dim=-1) <= 1e-4  # [P] frame 2 equals frame 0 here
    changed &= gone
    out, _ = encode_selective(hidden[2:3], layers, ref, ratio=0.25, rolling=True)
    full, _ = encode_full(hidden[2:3], layers)
    stale, _ = encode_full(hidden[1:2], layers)  # what reusing the object's features would look like
    err = ((out - full) ** 2).sum(dim=-1)[0]  # [P]
    assert float(err[changed].sum()) < 0.05 * float(((stale - full) ** 2).sum(dim=-1)[0][changed].sum())


def test_rolling_keeps_a_long_reuse_run_closer_to_the_full_encode(tiny_llava) -> None:
    """Eight frames reusing one reference (no refresh): the rolling reference's error stays below the fixed key
    frame's, most of all late in the run where the fixed reference is stale."""
    pv = tiny_llava.preprocess(_clip(8, step=8))
    full = tiny_llava.encode_vision(pv)
    errs = {}
    for rolling in (False, True):
        cacher = StreamCacher(CacherConfig(ratio=0.25, max_reuse=None, rolling=rolling, match_threshold=-1.0))
        out = tiny_llava.encode_vision(pv, layer_runner=cacher.runner)
        assert [k for k, _ in cacher.last_chunk_decisions()] == ["new"] + ["reuse"] * 7
        errs[rolling] = ((out - full) ** 2).sum(dim=(1, 2))  # [8]
    assert float(errs[True][1:].sum()) < float(errs[False][1:].sum())
    assert float(errs[True][-3:].sum()) < 0.8 * float(errs[False][-3:].sum())


def test_rolling_is_chunk_invariant_and_keeps_the_anchor_signature(tiny_llava) -> None:
    pv = tiny_llava.preprocess(_clip(7, step=6))
    hidden = tiny_llava.vision_embed(pv)
    runs = []
    for chunks in ([7], [1] * 7, [3, 4], [2, 2, 3]):
        cacher = StreamCacher(CacherConfig(ratio=0.2, max_reuse=None))
        outs, start = [], 0
        for n in chunks:
            outs.append(tiny_llava.encode_vision(pv[start:start + n], layer_runner=cacher.runner))
            start += n
        runs.append((torch.cat(outs), cacher.stats()["tokens_recomputed"], cacher))
    for out, tokens, _ in runs[1:]:
        torch.testing.assert_close(out, runs[0][0], atol=1e-5, rtol=1e-5)
        assert tokens == runs[0][1]
    cacher = runs[1][2]
    (ref_id,) = [r["id"] for r in cacher.held_references()]
    held = cacher._store.get(ref_id).signature  # noqa: SLF001 - our own class
    first = frame_signature(hidden[:1].detach(), cacher.config.signature_grid)[0].numpy()
    np.testing.assert_allclose(held, first, atol=1e-6)  # drift is still measured from the fully encoded frame
