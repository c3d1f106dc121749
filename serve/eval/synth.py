"""``stc-serve make-bench``: a seeded synthetic streaming benchmark over real footage, with known answers.

``make_bench(OUT_DIR, seed, videos, items, split)`` writes into ``OUT_DIR``:

* ``videos/<split>_s<seed>_c<NNN>.mp4`` -- clips of 40-96 s, 256x192, 2 fps, H.264. The background is real video
  (default ``../shared/media/vtest.avi`` and ``box.mp4``, or the files passed): a fixed camera (the whole view) or a
  hand-held one (a drifting, jittering 72 % crop window), alternating per clip; footage shorter than the clip plays
  forward and backward. Planted shapes (square / circle / triangle x 6 colours x small / large) appear, move and
  leave at whole seconds; some are partly covered by a band of the footage for a while.
* ``ovo.json`` (OVO-Bench format: every task) and ``streamingbench.json`` (StreamingBench format: the same
  multiple-choice questions; forward tasks exist only in OVO-Bench). Both load with
  :func:`serve.eval.bench.load_bench` as they are; run them with ``stc-serve eval --bench OUT_DIR/ovo.json
  --format ovo --videos OUT_DIR``. Task codes and questions: see :mod:`serve.eval.synth_items`.
* ``ask.txt`` -- ready ``stc-serve ask`` lines (two real-time questions per clip, each at its time) with the
  expected answer, to try a model on one clip by hand.
* ``meta.json`` -- the ground-truth timeline: per clip its background, split stretch, camera and every object
  (identity, ``on``/``off`` seconds, motion, cover); per item its task, kind, object ids and times: ``T_s`` (EPM:
  seconds between the last frame showing the object and the question; ASI: since the first object's onset), so an
  analysis can split items inside / beyond a KV window of ``W`` tokens (``T_s * fps * tokens_per_frame`` vs ``W``);
  CRR: ``onset_s`` (alert latency = first "Yes" time - ``onset_s``).

Splits: ``train`` uses the first 60 % of each background's frames, ``test`` the last 40 % (disjoint footage); the
split is mixed into every random stream, so a train and a test bench never share a scene even with equal seeds
(use different seeds anyway: the reference model was trained on train seed 1; test benches use seed 0).
Deterministic: the same arguments give byte-identical JSON files and identical decoded frames.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from serve.eval.bench import LETTERS
from serve.eval.synth_items import STREAMINGBENCH_TYPES, Question, clip_questions, plan_objects
from serve.eval.synth_scene import (CLIP_FPS, CLIP_SIZE, SPLITS, TRAIN_FRACTION, Camera, Footage, load_footage,
                                    pingpong, render_frame, split_stretch, write_clip)
from stream.errors import ConfigError, SourceError

__all__ = ["DEFAULT_VIDEOS", "default_videos", "main", "make_bench"]

MEDIA = Path(__file__).resolve().parents[2].parent / "shared" / "media"
DEFAULT_VIDEOS = (MEDIA / "vtest.avi", MEDIA / "box.mp4")
SPLIT_CODE = {"train": 1, "test": 2}
VERSION = 1
CAMERAS = ("fixed", "handheld")


def default_videos() -> list[Path]:
    """The default backgrounds: ``../shared/media/vtest.avi`` (fixed street camera) and ``box.mp4``."""
    return list(DEFAULT_VIDEOS)


ASK_EXAMPLE_TASKS = ("ATR", "STU", "OJR")
ASK_HEADER = ("# stc-serve ask, one real-time question per line at its time (the answer follows 'expect:').\n"
              "# Meant for the reference model (--model reference); run a line as it is.\n")


def _ask_line(q: Question, video: Path) -> str:
    """One ``stc-serve ask`` command line asking ``q`` at its time, with the expected option as a comment."""
    args = ["stc-serve", "ask", str(video), q.question, "--options", ",".join(q.options), "--until",
            str(q.realtime), "--model", "reference"]
    return f"{shlex.join(args)}  # expect: {q.options[q.gt]}"


def _hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _ovo_item(q: Question, item_id: str, video: str) -> dict[str, Any]:
    base = {"id": item_id, "task": q.task, "video": video}
    if q.task == "REC":
        return {**base, "activity": q.activity, "test_info": q.entries}
    if q.task == "CRR":
        return {**base, "question": q.question, "test_info": q.entries}
    return {**base, "realtime": q.realtime, "question": q.question, "options": q.options, "gt": q.gt}


def _sb_question(q: Question, item_id: str) -> dict[str, Any]:
    return {"id": item_id, "task_type": STREAMINGBENCH_TYPES[q.task], "question": q.question,
            "time_stamp": _hms(q.realtime), "options": [f"{LETTERS[i]}. {o}" for i, o in enumerate(q.options)],
            "answer": LETTERS[q.gt]}


def _check(seed: int, items: int, split: str, clip_seconds: tuple[int, int], items_per_clip: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be an integer >= 0. Fix: e.g. --seed 0")
    if isinstance(items, bool) or not isinstance(items, int) or items < 1:
        raise ConfigError(f"items={items!r} must be an integer >= 1. Fix: e.g. --items 120")
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not supported; allowed: {', '.join(SPLITS)}. Fix: --split test")
    lo, hi = clip_seconds
    if not 24 <= lo <= hi <= 3600:
        raise ConfigError(f"clip_seconds={clip_seconds!r} must be (lo, hi) with 24 <= lo <= hi <= 3600. "
                          "Fix: e.g. (40, 96)")
    if not 7 <= items_per_clip <= 200:
        raise ConfigError(f"items_per_clip={items_per_clip!r} must be in 7..200 (one per task at least). Fix: 12")


def _clip(footage: Footage, seed: int, split: str, index: int, mode: str, seconds_range: tuple[int, int],
          n_items: int, path: Path) -> tuple[list[Question], dict[str, Any]]:
    """Plan, render and write clip ``index``; returns its questions and its meta entry."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODE[split], index]))
    seconds = int(rng.integers(seconds_range[0], seconds_range[1] + 1))
    objects = plan_objects(rng, seconds)
    questions = clip_questions(objects, seconds, n_items, rng)
    n_frames = seconds * CLIP_FPS
    camera = Camera.random(mode, n_frames, len(footage.frames), rng)
    write_clip(path, [render_frame(footage, camera, objects, k) for k in range(n_frames)])
    used = sorted({int(footage.source_index[i]) for i in
                   (pingpong(camera.offset + k, len(footage.frames)) for k in range(n_frames))})
    meta = {"video": f"videos/{path.name}", "background": footage.name, "camera": mode,
            "camera_offset": camera.offset, "seconds": seconds, "frames": n_frames,
            "footage_frames_used": [used[0], used[-1]], "objects": [o.__dict__ for o in objects]}
    return questions, meta


def make_bench(out_dir: str | Path, seed: int, videos: Sequence[str | Path] | None = None, items: int = 120,
               split: str = "test", *, clip_seconds: tuple[int, int] = (40, 96),
               items_per_clip: int = 12) -> dict[str, Any]:
    """Write a synthetic benchmark (clips, ``ovo.json``, ``streamingbench.json``, ``meta.json``) into ``out_dir``.

    Args:
        out_dir: output folder (created; existing files of the same names are overwritten).
        seed: random seed (>= 0); the same arguments give byte-identical JSON files and identical frames.
        videos: background videos (default :data:`DEFAULT_VIDEOS`); clip ``c`` uses ``videos[c % len(videos)]``.
        items: number of benchmark items (an OVO forward item holds several timed questions).
        split: ``test`` (last 40 % of each background's frames) or ``train`` (first 60 %).
        clip_seconds: clip length range in seconds (inclusive).
        items_per_clip: items asked about one clip (the last clip may get fewer).

    Returns:
        A summary: ``out_dir``, ``seed``, ``split``, ``clips``, ``items``, ``questions`` (timed questions after
        expanding forward items), ``per_task`` item counts, ``video_seconds``, ``files``.

    Raises:
        ConfigError: a bad argument (the message names it and the fix).
        SourceNotFoundError / SourceFormatError: a background video is missing or not decodable.
    """
    _check(seed, items, split, tuple(clip_seconds), items_per_clip)
    paths = [Path(v) for v in (videos or default_videos())]
    footages = [load_footage(p, split) for p in paths]  # 1. every background, before anything is written
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    ovo: list[dict[str, Any]] = []
    sb: list[dict[str, Any]] = []
    meta_items: list[dict[str, Any]] = []
    clips: list[dict[str, Any]] = []
    examples: list[str] = []
    index = 0
    while len(ovo) < items and index < 4 * items:  # 2. clips until the items are there
        footage = footages[index % len(footages)]
        mode = CAMERAS[(index // len(footages)) % len(CAMERAS)]
        path = out / "videos" / f"{split}_s{seed}_c{index:03d}.mp4"
        questions, clip_meta = _clip(footage, seed, split, index, mode, tuple(clip_seconds),
                                     min(items_per_clip, items - len(ovo)), path)
        clips.append(clip_meta)
        sb_questions = []
        for j, q in enumerate(questions):  # 3. both formats and the analysis sidecar
            item_id = f"{split}-s{seed}-c{index:03d}-{j:02d}"
            ovo.append(_ovo_item(q, item_id, clip_meta["video"]))
            if q.task in STREAMINGBENCH_TYPES:
                sb_questions.append(_sb_question(q, item_id))
            times = [e["realtime"] for e in q.entries] or [q.realtime]
            meta_items.append({"id": item_id, "task": q.task, "video": clip_meta["video"], "times": times, **q.meta})
            if q.task in ASK_EXAMPLE_TASKS and len(examples) < 2 * (index + 1):
                examples.append(_ask_line(q, out / clip_meta["video"]))
        if sb_questions:
            sb.append({"video_path": clip_meta["video"], "questions": sb_questions})
        index += 1
    backgrounds = [{"name": f.name, "path": str(p), "source_frames": f.source_frames, "stretch": list(f.stretch),
                    "other_split_stretch": list(split_stretch(f.source_frames, "train" if split == "test" else
                                                              "test"))} for p, f in zip(paths, footages)]
    meta = {"generator": "serve.eval.synth", "version": VERSION, "seed": seed, "split": split,
            "train_fraction": TRAIN_FRACTION, "clip_size": list(CLIP_SIZE), "clip_fps": CLIP_FPS,
            "backgrounds": backgrounds, "clips": clips, "items": meta_items}
    files = {"ovo.json": ovo, "streamingbench.json": sb, "meta.json": meta}
    for name, data in files.items():
        (out / name).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (out / "ask.txt").write_text(ASK_HEADER + "".join(line + "\n" for line in examples), encoding="utf-8")
    per_task: dict[str, int] = {}
    for item in ovo:
        per_task[item["task"]] = per_task.get(item["task"], 0) + 1
    return {"out_dir": str(out), "seed": seed, "split": split, "clips": len(clips), "items": len(ovo),
            "questions": sum(len(i.get("test_info", [0])) for i in ovo), "per_task": dict(sorted(per_task.items())),
            "video_seconds": sum(c["seconds"] for c in clips), "files": sorted([*files, "ask.txt"]) + ["videos/"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stc-serve make-bench", description="Write a seeded synthetic streaming "
                                "benchmark over real footage (clips, ovo.json, streamingbench.json, meta.json).")
    p.add_argument("out_dir", type=Path, help="output folder")
    p.add_argument("--seed", type=int, required=True, help="random seed (test benches: 0; the reference model was "
                   "trained on --split train --seed 1)")
    p.add_argument("--videos", nargs="+", type=Path, help="background videos (default: ../shared/media/vtest.avi "
                   "and box.mp4)")
    p.add_argument("--items", type=int, default=120, help="number of benchmark items (default 120)")
    p.add_argument("--split", choices=SPLITS, default="test", help="footage stretch: test = last 40 %% of each "
                   "background, train = first 60 %% (default test)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``OUT_DIR --seed N [--videos V ...] [--items K] [--split train|test]``; prints the summary as JSON."""
    args = build_parser().parse_args(argv)
    try:
        summary = make_bench(args.out_dir, args.seed, args.videos, args.items, args.split)
    except (ConfigError, SourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
