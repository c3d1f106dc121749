"""The reference model's lookup stage: shortcut-proof layout windows and the pointer loss on one attention head."""
from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from benchmarks.reference_data import GRID, LETTERS  # noqa: E402
from benchmarks.reference_layouts import FRAMES, PointerLoss, layout_windows  # noqa: E402
from benchmarks.train_reference import clip_loss, train  # noqa: E402
from serve.eval.synth import default_videos  # noqa: E402
from serve.eval.synth_items import screen_side as side  # noqa: E402
from serve.eval.synth_scene import COLOURS, SHAPES, SIZES, PlantedObject  # noqa: E402

MODEL = "stream/models/reference"


@pytest.fixture(scope="module")
def adapter():
    from stream.models.loading import load_adapter

    return load_adapter(MODEL)


@pytest.fixture(scope="module")
def windows(adapter):
    return layout_windows(adapter, 12, seed=3, videos=default_videos())


def _obj(x0: float, x1: float, size: str = "small") -> PlantedObject:
    return PlantedObject(0, "square", "red", size, 0, 10, (x0, 0.5), (x1, 0.5), None)


def test_side_is_the_bench_rule_over_the_last_two_seconds() -> None:
    assert side(_obj(0.2, 0.2), 3) == 0 and side(_obj(0.8, 0.8), 3) == 1
    assert side(_obj(0.5, 0.5), 3) is None  # on the centre band
    # moving right across the centre over 10 s: left at first, on the band in between, right at the end
    moving = _obj(0.1, 0.9)
    assert side(moving, 1) == 0 and side(moving, 5) is None and side(moving, 9) == 1


def test_every_window_holds_two_objects_on_opposite_sides_at_its_last_second(windows) -> None:
    """No majority side: the last frame's summary (``token_labels``) has exactly one object left of centre and one
    right of it."""
    n = len(COLOURS) * len(SHAPES)
    assert len(windows) == 12
    for w in windows:
        assert w.pixels.shape[0] == FRAMES and w.items == [] and len(w.pointers) == len(w.drills)
        last = w.present[-1]  # [36 identities, 18 colour x shape left of centre, 18 right of it]
        assert int(last[: n * len(SIZES)].sum()) in (1, 2)  # two objects (one identity if drawn twice)
        assert int(last[n * len(SIZES): n * (len(SIZES) + 1)].sum()) == 1
        assert int(last[n * (len(SIZES) + 1):].sum()) == 1


def test_pointers_name_the_asked_object_and_agree_with_the_side_answers(adapter, windows) -> None:
    """Colour / shape / side questions point at cells that all show one object, in the frame asked (none when the
    object covers too little of every cell to label one, see ``token_labels``); a side question's answer is the side
    those cells are on; the count question points nowhere."""
    kinds = {"side": 0, "count": 0, "other": 0, "unlabelled": 0}
    for w in windows:
        for (_, seen, q_ids, answer), cells in zip(w.drills, w.pointers):
            text = adapter.tokenizer.decode(q_ids)
            if "How many objects" in text:
                assert cells == []
                kinds["count"] += 1
                continue
            if not cells:
                kinds["unlabelled"] += 1
                continue
            labels = w.labels[seen - 1]
            assert len({tuple(int(v) for v in labels[c]) for c in cells}) == 1 and int(labels[cells[0], 0]) > 0
            if "left or the right" in text:
                letter = adapter.tokenizer.decode(answer[:-1]).strip()
                right = min(c % GRID for c in cells) >= GRID // 2
                assert max(c % GRID for c in cells) < GRID // 2 or right
                assert letter == LETTERS[int(right)]  # options are ["left", "right"]
                kinds["side"] += 1
            else:
                kinds["other"] += 1
    assert min(kinds["side"], kinds["count"], kinds["other"]) > 0, kinds
    assert kinds["unlabelled"] < 0.1 * (kinds["side"] + kinds["other"]), kinds


def test_pointer_attention_is_the_heads_attention_in_the_forward_pass(adapter, windows) -> None:
    """Oracle: the distribution the loss reads, times the cached values, equals what the head of that layer
    actually output (SDPA, the padded and masked question batch) at the answer-predicting token."""
    clip = windows[0]
    rows = list(range(len(clip.questions)))
    pointer = PointerLoss(adapter, 1, 3)
    attn = adapter.llm.decoder.layers[1].self_attn
    seen_out = {}
    hook = attn.o_proj.register_forward_pre_hook(lambda m, a: seen_out.update(o=a[0]))  # [Q, Lq, H * hd]
    try:
        with torch.no_grad():
            clip_loss(adapter, clip, rows)
            dists = pointer.attention(clip, rows)
            loss = pointer(clip, rows)
    finally:
        hook.remove()
        pointer.remove()
    values = pointer._seen["cache"].layers[1].values  # [Q, KV, K, hd]
    hd = attn.head_dim
    assert len(dists) == sum(bool(c) for c in clip.pointers)
    for i, p in dists:
        at = len(clip.questions[rows[i]][2])
        assert abs(float(p.sum()) - 1) < 1e-5
        assert torch.allclose(p @ values[i, 3], seen_out["o"][i, at, 3 * hd: 4 * hd], atol=1e-4)
    prefix, t_n = len(adapter.stream_prefix_ids()), adapter.tokens_per_frame
    mass = [sum(float(p[prefix + (clip.questions[rows[i]][1] - 1) * t_n + c]) for c in clip.pointers[rows[i]])
            for i, p in dists]
    assert float(loss) == pytest.approx(float(torch.tensor(mass).add(1e-6).log().neg().mean()), rel=1e-5)


def test_training_with_the_pointer_moves_the_heads_mass_onto_the_asked_object() -> None:
    """A few steps on layout windows with the pointer loss put more of head 3's attention on the asked cells than the
    same steps without it, from the same fresh (untrained) model and the same draws."""
    from benchmarks.reference_data import build_adapter

    def loss_after(weight: float) -> float:
        torch.manual_seed(0)
        ad = build_adapter(0)
        wins = layout_windows(ad, 6, seed=3, videos=default_videos())
        pointer = PointerLoss(ad, 1, 3)
        train(ad, [(12, wins, 16)], 0, 5e-4, lambda m: None, pointer=(pointer, weight) if weight else None)
        with torch.no_grad():
            out = []
            for w in wins[:4]:
                rows = list(range(len(w.questions)))
                clip_loss(ad, w, rows)
                out.append(float(pointer(w, rows)))
        pointer.remove()
        return sum(out) / len(out)

    with_pointer, without = loss_after(2.0), loss_after(0.0)
    assert with_pointer < without - 1.0  # measured: 2.5 vs 4.7 (-log of the head's mass on the cells)


def test_pointer_loss_names_the_allowed_layers_and_heads(adapter) -> None:
    with pytest.raises(ValueError, match=r"layer 9 head 3.*layers 0-3 and heads 0-5.*Fix: e.g. --pointer 1 3 0.5"):
        PointerLoss(adapter, 9, 3)


def test_the_trainer_refuses_a_bad_lookup_option(tmp_path, capsys) -> None:
    from benchmarks.reference_cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--init", str(tmp_path)], "t")
    assert f"--init {tmp_path}: a model folder written by this trainer is needed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--layout-long-share", "1"], "t")
    assert "strictly between 0 and 1" in capsys.readouterr().err
    args = parse_args(["--init", MODEL], "t")
    assert args.layout_steps == 3000 and tuple(args.pointer) == (1, 3, 0.5)


def test_the_lookup_command_fine_tunes_a_model_and_its_card_says_how(tmp_path) -> None:
    """``train_reference.py --init``: the stage runs end to end on a small bench, the model saved reloads, and its
    training.json / card keep the base run's figures and the command line that reproduces this stage."""
    import json

    from benchmarks.train_reference import main
    from serve.eval.synth import make_bench
    from stream.models.loading import load_adapter

    small = dict(items=12, clip_seconds=(24, 26), items_per_clip=12)
    make_bench(tmp_path / "data/long", seed=5, split="train", **small)
    make_bench(tmp_path / "data/test", seed=0, split="test", **small)
    (tmp_path / "data/short").symlink_to(tmp_path / "data/long")  # present, not read with --init
    out = tmp_path / "tuned"
    assert main(["--init", MODEL, "--data", str(tmp_path / "data"), "--out", str(out), "--layouts", "3",
                 "--layout-steps", "2", "--steps", "2", "--init-clips", "1", "--threads", "1"]) == 0
    figures = json.loads((out / "training.json").read_text())
    base = json.loads((Path(MODEL) / "training.json").read_text())
    assert figures["seed"] == base["seed"] and figures["lookup"]["stages"] == {"lookup": 2, "long": 2}
    assert figures["test_bench"]["questions"] == sum(r["n"] for k, r in figures["accuracy"].items()
                                                     if k in ("ATR", "STU", "OJR", "EPM", "ASI", "REC", "CRR"))
    card = " ".join((out / "README.md").read_text().split())
    assert "--init out/reference-seed --out stream/models/reference --layouts 3 --layout-steps 2" in card
    assert "--pointer 1 3 0.5 --steps 2" in card
    assert load_adapter(str(out)).tokens_per_frame == 16
