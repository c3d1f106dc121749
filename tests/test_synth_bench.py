"""The synthetic streaming benchmark (``serve.eval.synth``): deterministic, loadable in both formats, its planted
objects are where its timeline says, train and test footage never overlap, bad input fails naming the fix; and the
reference model's training input is the service's inference input."""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from serve.eval.bench import LETTERS, load_bench, mc_prompt
from serve.eval.synth import main, make_bench
from serve.eval.synth_scene import CLIP_FPS, COLOURS, SIZES, load_footage, split_stretch
from stream.errors import ConfigError, SourceNotFoundError
from stream.sources import open_source

SMALL = dict(items=12, clip_seconds=(24, 26), items_per_clip=12)


@pytest.fixture(scope="module")
def grey_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12 s, 10 fps, 160x120 grey (R = G = B) textured background, so planted colours stand out."""
    path = tmp_path_factory.mktemp("bg") / "grey.mp4"
    yy, xx = np.mgrid[0:120, 0:160]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.time_base = Fraction(1, 10)
        for i in range(120):
            grey = (100 + 60 * np.sin((xx + 2 * i) / 9.0) * np.cos(yy / 13.0)).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(np.repeat(grey[..., None], 3, axis=2), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory, grey_video: Path) -> Path:
    out = tmp_path_factory.mktemp("bench")
    make_bench(out, seed=3, videos=[grey_video], split="test", **SMALL)
    return out


def _frames(path: Path) -> np.ndarray:
    with open_source(path) as src:
        return np.stack([f.rgb for f in src])


def test_same_seed_same_bytes_and_frames(tmp_path: Path, bench: Path, grey_video: Path) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    summary = make_bench(again, seed=3, videos=[grey_video], split="test", **SMALL)
    make_bench(other, seed=4, videos=[grey_video], split="test", **SMALL)
    assert summary["items"] == 12
    for name in ("ovo.json", "streamingbench.json", "meta.json"):
        assert (bench / name).read_bytes() == (again / name).read_bytes(), name
    assert (bench / "ovo.json").read_bytes() != (other / "ovo.json").read_bytes()
    a, b = _frames(bench / "videos/test_s3_c000.mp4"), _frames(again / "videos/test_s3_c000.mp4")
    seconds = json.loads((bench / "meta.json").read_text())["clips"][0]["seconds"]
    assert a.shape == (seconds * CLIP_FPS, 192, 256, 3)
    np.testing.assert_array_equal(a, b)
    c = _frames(other / "videos/test_s4_c000.mp4")
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_both_formats_load_unchanged(bench: Path) -> None:
    ovo = load_bench(bench / "ovo.json", "ovo")
    sb = load_bench(bench / "streamingbench.json", "streamingbench")
    tasks = {it.task for it in ovo}
    assert {"ATR", "STU", "OJR", "EPM", "ASI", "REC", "CRR"} <= tasks
    assert all(it.scorer == "count" for it in ovo if it.task == "REC")
    crr = [it for it in ovo if it.task == "CRR"]
    assert {it.answer for it in crr} == {"Yes", "No"}
    mc = {it.item_id: it for it in ovo if it.scorer == "mc_contains"}
    assert len(sb) == len(mc) and all(mc[q.item_id].prompt == q.prompt and mc[q.item_id].answer == q.answer
                                      and mc[q.item_id].time_s == q.time_s for q in sb)
    meta = json.loads((bench / "meta.json").read_text())
    ids = {m["id"]: m for m in meta["items"]}
    assert all(ids[it.item_id.split("#")[0]]["task"] == it.task for it in ovo)
    assert all(ids[it.item_id]["T_s"] >= 2 for it in ovo if it.task in ("EPM", "ASI"))
    assert all(ids[it.item_id.split("#")[0]]["onset_s"] >= 5 for it in crr)
    assert all(it.video.startswith("videos/") and (bench / it.video).is_file() for it in ovo)


def _clear(objs: list[dict], obj: dict, t: float) -> bool:
    """No other object covers ``obj``'s box at time ``t``."""
    def box(o: dict) -> tuple[float, float, float, float]:
        a = (t - o["on"]) / max(1, o["off"] - o["on"])
        x = o["start"][0] + a * (o["end"][0] - o["start"][0])
        y = o["start"][1] + a * (o["end"][1] - o["start"][1])
        hw, hh = SIZES[o["size"]] * 192 / 256 / 2, SIZES[o["size"]] / 2
        return x - hw, y - hh, x + hw, y + hh

    x0, y0, x1, y1 = box(obj)
    for o in objs:
        if o is not obj and o["on"] <= t < o["off"]:
            a0, b0, a1, b1 = box(o)
            if a0 < x1 + 0.02 and x0 < a1 + 0.02 and b0 < y1 + 0.02 and y0 < b1 + 0.02:
                return False
    return True


def test_planted_pixels_at_onset_not_before(bench: Path) -> None:
    meta = json.loads((bench / "meta.json").read_text())
    clip = meta["clips"][0]
    frames = _frames(bench / clip["video"]).astype(int)  # [N, 192, 256, 3]
    checked = 0
    for obj in clip["objects"]:
        on = obj["on"]
        if on < 1 or obj["covered"] or not (_clear(clip["objects"], obj, on) and _clear(clip["objects"], obj, on - .5)):
            continue
        x, y = int(obj["start"][0] * 256), int(obj["start"][1] * 192)
        if obj["shape"] == "triangle":
            y += int(SIZES[obj["size"]] * 192 / 4)  # the lower half of a triangle is the wide part
        at = frames[on * CLIP_FPS, y - 2:y + 3, x - 2:x + 3].reshape(-1, 3).mean(0)
        before = frames[on * CLIP_FPS - 1, y - 2:y + 3, x - 2:x + 3].reshape(-1, 3).mean(0)
        assert np.abs(at - np.array(COLOURS[obj["colour"]])).max() < 60, (obj, at)
        assert before.max() - before.min() < 40, (obj, before)  # grey background: no planted colour yet
        checked += 1
    assert checked >= 3


def test_train_and_test_footage_disjoint(grey_video: Path) -> None:
    train, test = load_footage(grey_video, "train"), load_footage(grey_video, "test")
    assert train.stretch[1] <= test.stretch[0] and train.stretch[0] == 0 and test.stretch[1] == test.source_frames
    assert set(train.source_index.tolist()).isdisjoint(test.source_index.tolist())
    assert train.source_index.max() < train.stretch[1] <= test.source_index.min()
    assert split_stretch(795, "train") == (0, 477) and split_stretch(795, "test") == (477, 795)


def test_missing_video_and_bad_values_name_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(SourceNotFoundError, match=r"nope\.mp4.*Fix: pass existing video files with --videos"):
        make_bench(tmp_path / "b", seed=0, videos=[missing])
    assert isinstance(SourceNotFoundError("x"), FileNotFoundError)
    assert main([str(tmp_path / "b"), "--seed", "0", "--videos", str(missing)]) == 2
    assert "nope.mp4" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"split='val'.*Fix"):
        make_bench(tmp_path / "b", seed=0, split="val")
    with pytest.raises(ConfigError, match=r"seed=-1.*Fix"):
        make_bench(tmp_path / "b", seed=-1)


def test_training_input_is_the_services_input(bench: Path) -> None:
    """The reference trainer's batched question blocks give the logits of the adapter's inference path."""
    torch = pytest.importorskip("torch")
    from benchmarks.train_reference import build_adapter, check_inference_path, load_clips

    torch.manual_seed(0)
    adapter = build_adapter(0)
    clip = load_clips(bench, adapter)[0]
    for row in (0, len(clip.items) - 1):
        assert check_inference_path(adapter, clip, row) < 1e-4


def test_reference_probe_loss_weights_occupied_cells_and_shape() -> None:
    """The trainer's probe loss: with unit weights it is the plain per-cell cross-entropy sum (+ cell, count and
    summary terms); ``occupied_weight`` and ``shape_weight`` scale exactly the occupied cells and the shape term."""
    torch = pytest.importorskip("torch")
    from benchmarks.reference_probes import GRID, Probes

    torch.manual_seed(0)
    b, t, d, n_present = 3, GRID * GRID, 8, 72
    tokens = torch.randn(b, t, d)  # [B, T, d]
    labels = torch.zeros(b, t + 1, 3, dtype=torch.long)  # [B, T + 1, 3]
    labels[:, 5] = torch.tensor([2, 3, 1])  # one object cell per frame
    labels[:, -1, 0] = 1  # one object on screen
    present = torch.zeros(b, n_present)
    plain = Probes(d, n_present, occupied_weight=1.0, shape_weight=1.0, present_weight=10.0)
    ce = torch.nn.functional.cross_entropy
    parts = plain.token(tokens).split(plain.splits, dim=-1)
    frame = plain.frame(tokens.mean(1))
    expected = (sum(ce(p.flatten(0, 1), labels[:, :-1, j].flatten()) for j, p in enumerate(parts[:3]))
                + ce(parts[3].flatten(0, 1), torch.arange(t).repeat(b)) + ce(frame[:, :4], labels[:, -1, 0])
                + 10 * torch.nn.functional.binary_cross_entropy_with_logits(frame[:, 4:], present))
    assert torch.allclose(plain.loss(tokens, labels, present), expected, atol=1e-6)

    weighted = Probes(d, n_present, occupied_weight=5.0, shape_weight=3.0, present_weight=10.0)
    weighted.load_state_dict(plain.state_dict())
    w = 1 + 4 * (labels[:, :-1, 0] > 0).float().flatten()
    terms = [(ce(p.flatten(0, 1), labels[:, :-1, j].flatten(), reduction="none") * w).sum() / w.sum()
             for j, p in enumerate(parts[:3])]
    rest = expected - sum(ce(p.flatten(0, 1), labels[:, :-1, j].flatten()) for j, p in enumerate(parts[:3]))
    assert torch.allclose(weighted.loss(tokens, labels, present), terms[0] + 3 * terms[1] + terms[2] + rest, atol=1e-5)


def test_mirrored_frame_labels_are_the_mirrored_scenes_labels() -> None:
    """The warm-up's left-right augmentation: mirroring a frame's ground truth equals the ground truth of the
    mirrored scene (every object's x reflected), computed from the timeline by ``token_labels``."""
    import torch

    from benchmarks.reference_data import token_labels
    from benchmarks.reference_probes import mirror

    objects = [dict(oid=0, shape="square", colour="red", size="small", on=0, off=9, start=(0.2, 0.3),
                    end=(0.2, 0.3), covered=None),
               dict(oid=1, shape="triangle", colour="blue", size="large", on=0, off=9, start=(0.62, 0.7),
                    end=(0.62, 0.7), covered=None),
               dict(oid=2, shape="circle", colour="green", size="small", on=5, off=9, start=(0.9, 0.1),
                    end=(0.9, 0.1), covered=None)]
    flipped = [{**o, "start": (1 - o["start"][0], o["start"][1]), "end": (1 - o["end"][0], o["end"][1])}
               for o in objects]
    cells, present = token_labels(objects, 6.0)  # all three on screen
    cells_m, present_m = token_labels(flipped, 6.0)
    assert cells[-1] == [3, 0, 0] and cells != cells_m and present != present_m  # three objects, not symmetric
    pixels = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    px, labels, pres = mirror(pixels, torch.tensor([cells] * 2), torch.tensor([present] * 2))
    assert labels.tolist() == [cells_m] * 2 and pres.tolist() == [present_m] * 2
    assert torch.equal(px[:, :, :, 0], pixels[:, :, :, -1])


def test_stream_state_labels_answer_the_benchs_own_questions(bench: Path) -> None:
    """The stream-state probes' targets (``state_labels``) agree with every counting (REC) and episodic-colour (EPM)
    answer the generator wrote: the count of the asked colour x shape, and the latest colour of the asked
    size x shape, at the frame the question is asked on."""
    pytest.importorskip("torch")
    from benchmarks.reference_data import state_labels
    from serve.eval.synth_scene import SHAPES

    meta = json.loads((bench / "meta.json").read_text())
    objects = {c["video"]: c["objects"] for c in meta["clips"]}
    checked = {"REC": 0, "EPM": 0}
    for it in load_bench(bench / "ovo.json", "ovo"):
        if it.task not in checked:
            continue
        labels = state_labels(objects[it.video], [float(s) for s in range(int(it.time_s) + 1)])
        words = it.prompt.replace("?", " ").split()
        shape = next(w for w in words if w in SHAPES)
        if it.task == "REC":
            colour = next(w for w in words if w in COLOURS)
            kind = list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)
            assert int(labels["count"][-1, kind]) == int(it.answer)
        else:
            size = next(w for w in words if w in SIZES)
            colour = it.options["ABCDEF".index(it.answer)]
            assert int(labels["last"][-1, SHAPES.index(shape) * len(SIZES) + list(SIZES).index(size)]) == \
                1 + list(COLOURS).index(colour)
        checked[it.task] += 1
    assert checked["REC"] >= 2 and checked["EPM"] >= 1, checked


def test_stream_state_probes_read_each_frames_last_token(bench: Path) -> None:
    """The frame states the stream-state probes train on are decoder layer ``L``'s output at the last token of each
    frame: the same as that layer's output at the end of a stream cut right after that frame (causality)."""
    torch = pytest.importorskip("torch")
    from transformers import DynamicCache

    from benchmarks.train_reference import build_adapter, load_clips, question_hidden, visual_tokens

    torch.manual_seed(0)
    adapter = build_adapter(0)
    clip = load_clips(bench, adapter)[0]
    row = len(clip.items) - 1
    _, _, _, states = question_hidden(adapter, clip, [row], state_layer=2)  # [F, d]
    assert states.shape == (clip.items[row][1], adapter.llm.hidden_size)
    decoder = adapter.llm.decoder
    prefix = decoder.get_input_embeddings()(adapter.stream_prefix_ids())  # [P, d]
    vis = visual_tokens(adapter, clip.pixels[: len(states)])  # [F, T, d]
    for f in (0, len(states) // 2, len(states) - 1):
        cut = torch.cat([prefix, vis[: f + 1].flatten(0, 1)])[None]  # the stream up to frame f's last token
        out = decoder(inputs_embeds=cut, output_hidden_states=True, use_cache=True,
                      **{adapter.llm.cache_argument: DynamicCache(config=decoder.config)})
        assert torch.allclose(out.hidden_states[2][0, -1], states[f], atol=1e-4), f


def test_count_drills_follow_the_generators_counting_rule(bench: Path) -> None:
    """Every counting drill's answer is the stream-state count of its colour x shape at its second (the labels that
    agree with the bench's own REC answers), it is never asked within 1 s after one of that colour x shape's onsets
    (the generator's rule), its answers are drawn evenly, and the drills reach training as REC-prompt rows."""
    pytest.importorskip("torch")
    import random

    from benchmarks.reference_data import MAX_COUNT, build_adapter, count_drills, load_clips, state_labels
    from serve.eval.bench import REC_PROMPT
    from serve.eval.synth_scene import SHAPES

    meta = json.loads((bench / "meta.json").read_text())
    answers: list[int] = []
    for clip in meta["clips"]:
        objects = clip["objects"]
        seconds = int(max(o["off"] for o in objects)) + 1
        drills = count_drills(objects, seconds, 400, random.Random(1))
        labels = state_labels(objects, [float(s) for s in range(seconds)])
        for colour, shape, t, k in drills:
            assert int(labels["count"][t, list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)]) == k
            assert not any(o["on"] <= t <= o["on"] + 1 for o in objects if (o["colour"], o["shape"]) == (colour, shape))
        assert {k for *_, k in drills} >= {0, 1}  # an absent colour x shape and a present one at least
        answers += [k for *_, k in drills]
    shares = [answers.count(k) / len(answers) for k in range(MAX_COUNT + 1) if k in answers]
    assert max(shares) < 2 * min(shares), shares  # drawn evenly over the counts each clip offers
    adapter = build_adapter(0)
    clip = load_clips(bench, adapter, drills=5, seed=2)[0]
    assert len(clip.drills) == 5 and clip.questions[: len(clip.items)] == clip.items
    for item, seen, prompt, answer in clip.drills:
        text = adapter.tokenizer.decode(prompt, skip_special_tokens=True)
        assert item is None and REC_PROMPT.split("\n")[0] in text and 0 < seen <= len(clip.pts)
        assert adapter.tokenizer.decode(answer[:-1]).strip() in {str(k) for k in range(MAX_COUNT + 1)}


def test_each_training_stage_asks_its_own_number_of_questions(bench: Path, monkeypatch, capsys) -> None:
    """``--questions EARLY SHORT LONG``: every step of a stage trains on that many of its clip's questions (one
    number = every stage); anything but one or three counts >= 1 is refused with the fix."""
    pytest.importorskip("torch")
    import benchmarks.train_reference as tr

    adapter = tr.build_adapter(0)
    clips = tr.load_clips(bench, adapter)
    asked: list[int] = []
    real = tr.clip_loss
    monkeypatch.setattr(tr, "clip_loss", lambda a, clip, rows, layer=None: asked.append(len(rows)) or real(
        a, clip, rows, layer))
    tr.train(adapter, [(2, clips, 3), (1, clips, 5)], 0, 1e-4, lambda msg: None)
    assert asked == [3, 3, 5]
    for bad in (["--questions", "32", "16"], ["--questions", "0"]):
        with pytest.raises(SystemExit) as exit_:
            tr.main(bad)
        assert exit_.value.code == 2 and "one or three numbers >= 1" in capsys.readouterr().err


def test_realtime_drills_follow_the_benchs_rules(bench: Path) -> None:
    """Each real-time drill, checked against the timeline: the scene is unchanged over the last second, the object it
    names is on screen, uncovered and the only one that description fits, and its answer is that object's colour /
    shape / side, or the number on screen; a drill at a bench item's time and question has the bench's answer."""
    from benchmarks.reference_data import planted
    from serve.eval.synth_items import STABLE_S, realtime_drills

    meta = json.loads((bench / "meta.json").read_text())
    items = {(it.video, it.time_s, it.prompt): it.answer for it in load_bench(bench / "ovo.json", "ovo")}
    tasks, same = set(), 0
    for clip in meta["clips"]:
        objects = [planted(o) for o in clip["objects"]]
        seconds = max(o.off for o in objects) + 1
        for q in realtime_drills(objects, range(STABLE_S + 1, seconds), np.random.default_rng(0)):
            t, answer, tasks = q.realtime, q.options[q.gt], tasks | {q.meta["kind"]}
            on = [o for o in objects if o.visible(t)]
            assert {o.oid for o in on} == {o.oid for o in objects if o.visible(t - 1)}
            if q.task == "OJR":
                assert answer == str(len(on))
            else:
                (o,) = [objects[i] for i in q.meta["objects"]]
                assert o in on and not (o.covered and o.covered[0] <= t < o.covered[1])
                fits = {"colour_now": lambda v: (v.size, v.shape) == (o.size, o.shape),
                        "shape_now": lambda v: v.colour == o.colour,
                        "side_now": lambda v: (v.colour, v.shape) == (o.colour, o.shape)}[q.meta["kind"]]
                assert [v for v in on if fits(v)] == [o]
                x = o.centre(t)[0]
                want = {"colour_now": o.colour, "shape_now": o.shape, "side_now": "left" if x < 0.5 else "right"}
                assert answer == want[q.meta["kind"]]
            key = (clip["video"], float(t), mc_prompt(q.question, q.options))
            if key in items:
                same += 1
                assert items[key] == LETTERS[q.gt]
    assert tasks == {"count_now", "colour_now", "shape_now", "side_now"} and same > 0


def test_first_stage_drills_stay_in_the_first_chunk(bench: Path) -> None:
    """``load_clips(early_drills=True)``: real-time drills within the first chunk only, none repeating a bench item,
    answered by a letter; the first stage (:func:`early`) trains on them, the later stages do not."""
    pytest.importorskip("torch")
    from benchmarks.reference_data import CHUNK, build_adapter, early, load_clips

    adapter = build_adapter(0)
    plain, drilled = load_clips(bench, adapter), load_clips(bench, adapter, early_drills=True)
    assert all(not c.early_drills for c in plain) and sum(len(c.early_drills) for c in drilled) > 0
    for p, d in zip(plain, drilled):
        prompts = {(seen, tuple(ids.tolist())) for _, seen, ids, _ in d.items}
        for item, seen, ids, answer in d.early_drills:
            assert item is None and 0 < seen <= CHUNK and (seen, tuple(ids.tolist())) not in prompts
            assert adapter.tokenizer.decode(answer[:-1]).strip() in set(LETTERS[:6])
        rows = lambda clip: [(r[0], r[1], r[2].tolist(), r[3].tolist()) for r in clip.questions]  # noqa: E731
        assert rows(d) == rows(p)  # the later stages' questions are unchanged
    first = {c.video: c for c in early(drilled, CHUNK)}
    for d in drilled:
        if d.video in first:
            assert first[d.video].drills == d.early_drills
