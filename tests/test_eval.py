"""``stc-serve eval``: benchmark files in both formats over the real media, run with the tiny model.

The plumbing is checked exactly: with compression off every answer equals HF ``generate`` on the frames sampled up
to the question's time and the same prompt; question times truncate the stream; malformed items fail naming the
item; the CLI writes a report and a plot with both settings side by side.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from serve.cli.main import main
from serve.eval import (BenchFormatError, EvalRunner, compression_off, load_bench, parse_choice, score,
                        summarize)
from serve.core.options import StreamOptions
from stream.config import SourceConfig
from stream.sampler import FpsSampler
from stream.sources import open_source

OPTS = StreamOptions.parse({"sampler": {"fps": 1.0, "frames_per_chunk": 2}})


def _ovo_items() -> list[dict]:
    opts = ["a person walking", "a cardboard box", "an empty street", "a car"]
    return [
        {"id": 7, "task": "STU", "video": "vtest.avi", "realtime": 2.5, "question": "What is shown?",
         "options": opts, "gt": 0},
        {"id": 8, "task": "EPM", "video": "vtest.avi", "realtime": 4.2, "question": "What came first?",
         "options": opts[:3], "gt": 2},
        {"id": 9, "task": "OJR", "video": "box.mp4", "realtime": 3.0, "question": "Which object?",
         "options": opts, "gt": 1},
        {"id": 10, "task": "SSR", "video": "box.mp4",
         "test_info": [{"realtime": 1.0, "step": "open the box", "type": 0},
                       {"realtime": 2.0, "step": "close the box", "type": 1}]},
        {"id": 11, "task": "REC", "video": "vtest.avi", "activity": "walk past the camera",
         "test_info": [{"realtime": 3.5, "count": 2}]},
    ]


def _streamingbench_items() -> list[dict]:
    q = {"task_type": "Object Perception", "question": "What is in the scene?",
         "options": ["A. people", "B. a box", "C. a tree", "D. nothing"], "answer": "A"}
    return [{"video_path": "./videos/vtest.avi", "questions": [{**q, "time_stamp": "00:00:03"},
                                                                {**q, "task_type": "Causal Reasoning",
                                                                 "time_stamp": "00:00:01", "answer": "C"}]},
            {"video_path": "box.mp4", "questions": [{**q, "time_stamp": "00:00:02", "answer": "B"}]}]


@pytest.fixture()
def bench_files(tmp_path: Path, media_dir: Path) -> dict[str, Path]:
    ovo, sb = tmp_path / "ovo.json", tmp_path / "sb.json"
    ovo.write_text(json.dumps(_ovo_items()))
    sb.write_text(json.dumps(_streamingbench_items()))
    return {"ovo": ovo, "streamingbench": sb}


def _sampled_frames(path: Path, until: float, fps: float = 1.0):
    sampler, out = FpsSampler(fps), []
    with open_source(path, SourceConfig()) as src:
        for frame in src:
            if frame.pts > until + 1e-9:
                break
            if sampler.accept(frame):
                out.append(frame)
    return out


def _hf_greedy(adapter, frames, question: str, max_new_tokens: int) -> str:
    rgb = np.stack([f.rgb for f in frames])
    end = torch.full((adapter.video_end_embeds().shape[0],), adapter.placeholder_id)
    ids = torch.cat([adapter.stream_prefix_ids(), adapter.chunk_placeholder_ids(len(frames), [f.pts for f in frames]),
                     end, adapter.question_ids(question)])[None]
    out = adapter.model.generate(input_ids=ids, pixel_values_videos=adapter.preprocess(rgb)[None],
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=sorted(adapter.eos_token_ids), pad_token_id=adapter.tokenizer.pad_token_id)
    return adapter.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_compression_off_answers_equal_hf_generate_and_times_truncate(tiny_llava, bench_files, media_dir) -> None:
    items = load_bench(bench_files["ovo"], "ovo")
    assert [i.item_id for i in items] == ["7", "8", "9", "10#0", "10#1", "11#0"]
    runner = EvalRunner(tiny_llava, {"off": compression_off(OPTS)}, max_new_tokens=5)
    results = runner.run(items, media_dir)
    assert len(results) == len(items)
    by_id = {i.item_id: i for i in items}
    for r in results:
        item = by_id[r.item_id]
        frames = _sampled_frames(media_dir / item.video, item.time_s)
        assert r.frames == len(frames) and all(f.pts <= item.time_s for f in frames)  # the stream stops there
        # the streamed answer holds back a trailing incomplete UTF-8 character (as the service does)
        assert r.response == _hf_greedy(tiny_llava, frames, item.prompt, 5).rstrip("\ufffd"), r.item_id
        assert r.correct == score(item, r.response)
    vtest = sorted((r for r in results if by_id[r.item_id].video == "vtest.avi"), key=lambda r: r.time_s)
    assert [r.frames for r in vtest] == [3, 4, 5]  # 1 fps from t=0: frames at 0,1,2 | +3 | +4
    assert vtest[0].visual_tokens < vtest[-1].visual_tokens


def test_cli_reports_both_settings_side_by_side(bench_files, media_dir, tmp_path, capsys) -> None:
    out, png = tmp_path / "report.json", tmp_path / "report.png"
    rc = main(["eval", "--bench", str(bench_files["streamingbench"]), "--format", "streamingbench",
               "--videos", str(media_dir), "--out", str(out), "--plot", str(png), "--fps", "1", "--chunk", "2",
               "--max-new-tokens", "4"])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads(out.read_text())
    assert png.stat().st_size > 1000 and last["random_weights"] is True
    conf, off = report["settings"]["configured"], report["settings"]["off"]
    assert set(conf["accuracy"]["per_task"]) == {"Object Perception", "Causal Reasoning"}
    assert conf["questions"] == off["questions"] == 3
    # the default pruner keeps a quarter of the visual tokens; the cacher reuses ViT work on 1 fps video
    assert conf["cost"]["mean_at_question"]["visual_tokens"] < 0.3 * off["cost"]["mean_at_question"]["visual_tokens"]
    assert conf["cost_ratio"]["kv_bytes"] < 1.0
    rows = report["results"]
    assert {r["setting"] for r in rows} == {"configured", "off"}
    assert sorted(r["frames"] for r in rows if r["setting"] == "off") == [2, 2, 4]  # vtest at 1 s and 3 s; box.mp4
    # (29.97 fps) at 2 s: its frame at 2.002 s is still in the future, so frames at 0 and 1.001 s only
    n_ok = sum(r["correct"] for r in rows if r["setting"] == "off")
    assert off["accuracy"]["overall"] == round(n_ok / 3, 4)


def test_summary_accuracy_per_task_and_retained() -> None:
    from serve.eval.harness import ItemResult

    def row(i, task, setting, ok, tokens):
        return ItemResult(str(i), task, setting, 1.0, "A", "A" if ok else "B", ok, 2, tokens, 10.0, 5.0, 0.1, 3.0,
                          tokens + 10, 100 * tokens)

    rows = [row(0, "X", "off", True, 40), row(1, "X", "off", True, 40), row(2, "Y", "off", False, 40),
            row(0, "X", "on", True, 10), row(1, "X", "on", False, 10), row(2, "Y", "on", False, 10)]
    s = summarize(rows, ["on", "off"])
    assert s["off"]["accuracy"]["overall"] == round(2 / 3, 4) and s["off"]["accuracy"]["task_mean"] == 0.5
    assert s["on"]["accuracy"]["per_task"]["X"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert s["on"]["accuracy_retained"] == 0.5 and s["on"]["cost_ratio"]["visual_tokens"] == 0.25
    assert s["on"]["same_answer_as_off"] == round(2 / 3, 4)


@pytest.mark.parametrize("fmt,items,match", [
    ("ovo", [{"id": "ok", "task": "STU", "video": "v.mp4", "realtime": 1, "question": "q", "options": ["a", "b"],
              "gt": 0}, {"id": "bad", "task": "STU", "video": "v.mp4", "realtime": 1, "question": "q",
                         "options": ["a", "b"], "gt": 2}], r"item 1 \(id 'bad'\): field 'gt' must be a 0-based"),
    ("ovo", [{"id": "x", "task": "STU", "video": "v.mp4", "question": "q", "options": ["a", "b"], "gt": 0}],
     r"item 0 \(id 'x'\): field 'realtime' must be seconds"),
    ("ovo", [{"id": "x", "task": "ZZZ", "video": "v.mp4"}], r"unknown task 'ZZZ'; allowed: EPM"),
    ("ovo", [{"id": "f", "task": "CRR", "video": "v.mp4", "question": "q",
              "test_info": [{"realtime": 1, "type": 3}]}], r"item 0 \(id 'f'\) test_info\[0\]: field 'type'"),
    ("ovo", [{"id": "r", "task": "REC", "video": "v.mp4", "test_info": [{"realtime": 1, "count": 1}]}],
     r"missing field 'activity'"),
    ("streamingbench", [{"video_path": "v.mp4", "questions": [{"task_type": "t", "question": "q",
                                                               "time_stamp": "1:75", "options": ["A. x", "B. y"],
                                                               "answer": "A"}]}],
     r"item 0 \('v.mp4'\) question 0: field 'time_stamp' must be \"HH:MM:SS\", got '1:75'"),
    ("streamingbench", [{"video_path": "v.mp4", "questions": [{"task_type": "t", "question": "q",
                                                               "time_stamp": "00:00:01", "options": ["A. x", "y"],
                                                               "answer": "A"}]}],
     r"option 1 must start with 'B.'"),
    ("streamingbench", [{"video_path": "v.mp4", "questions": [{"task_type": "t", "question": "q",
                                                               "time_stamp": "00:00:01", "options": ["A. x", "B. y"],
                                                               "answer": "C"}]}],
     r"field 'answer' must be one of A, B, got 'C'"),
    ("streamingbench", {"video_path": "v.mp4"}, r"must hold a non-empty JSON list"),
])
def test_malformed_items_name_the_item(tmp_path, fmt, items, match) -> None:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(items))
    with pytest.raises(BenchFormatError, match=match):
        load_bench(path, fmt)


def test_cli_errors_are_clear_and_exit_2(bench_files, tmp_path, capsys) -> None:
    rc = main(["eval", "--bench", str(bench_files["ovo"]), "--format", "ovo", "--videos", str(tmp_path)])
    assert rc == 2
    assert "item '7': video 'vtest.avi' not found under" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    assert main(["eval", "--bench", str(bad), "--format", "ovo", "--videos", str(tmp_path)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("scorer,answer,response,ok", [
    ("mc_first", "B", "B", True), ("mc_first", "B", "(B) a box", True), ("mc_first", "B", "Answer: B.", True),
    ("mc_first", "B", "A. people, not B", False), ("mc_first", "B", "Because", False),
    ("mc_contains", "C", "I think C", True), ("mc_contains", "C", "B", False),
    ("yes_no", "Yes", "Yes.", True), ("yes_no", "Yes", "Y", True), ("yes_no", "No", "Yes", False),
    ("count", "12", "12 times", True), ("count", "12", "1 2", True), ("count", "2", "12", False),
])
def test_scoring_follows_the_benchmarks(scorer, answer, response, ok) -> None:
    from serve.eval import EvalItem

    item = EvalItem("i", "t", "v", 0.0, "p", answer, scorer, ("a", "b", "c", "d"))
    assert score(item, response) is ok
    assert parse_choice("the answer is D", 4) == "D" and parse_choice("xyz", 4) is None


def test_wilson_interval_matches_the_closed_form_and_stays_in_0_1() -> None:
    from serve.eval.bench import wilson

    lo, hi = wilson(5, 10)  # textbook value: 0.2366 - 0.7634
    assert abs(lo - 0.2366) < 1e-4 and abs(hi - 0.7634) < 1e-4
    assert wilson(0, 10)[0] == 0.0 and abs(wilson(0, 10)[1] - 0.2775) < 1e-4
    assert wilson(10, 10)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)
