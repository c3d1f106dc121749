"""``EvalRunner``: stream each benchmark video through :class:`serve.core.pipeline.StreamPipeline` up to each question's
time, ask there, score, and compare the configured compression with compression off in the same run.

Per video and setting (settings interleaved video by video, so both see the same machine load):

1. open one stream in the setting's pipeline (the same stages the service runs: sampler, chunker, VisionStage with
   the STC cacher and the pruner, LLMStage with the bounded KV session);
2. for each question in time order: feed the frames with ``pts <= time`` (one sampler across the whole video, so
   sampling does not depend on where the questions fall; the partial chunk is flushed at the question, as a live
   stream's context holds everything seen so far), then ask the question on the live context and score the answer;
   the question and answer are rolled back, so later questions see only video;
3. close the stream. Costs are read from the pipeline's stats at each question.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from serve.eval.bench import EvalItem, resolve_video, score
from serve.core.options import StreamOptions
from serve.core.pipeline import StreamPipeline
from stream.config import SourceConfig
from stream.frames import Frame
from stream.models.base import VLMAdapter
from stream.sources import open_source

COST_KEYS = ("vit_ms", "visual_tokens", "prefill_ms", "kv_bytes", "ttft_ms")


@dataclass
class ItemResult:
    """One question answered under one setting; costs are the stream's totals when the question was asked."""

    item_id: str
    task: str
    setting: str
    time_s: float
    answer: str
    response: str
    correct: bool
    frames: int
    visual_tokens: int
    vit_ms: float
    prefill_ms: float
    ingest_cpu_s: float
    ttft_ms: float
    kv_tokens: int
    kv_bytes: int


class _Until:
    """Feeds one frame iterator in segments: ``upto(t)`` yields the next frames with ``pts <= t``."""

    def __init__(self, frames: Iterator[Frame]) -> None:
        self._it, self._next = frames, None

    def upto(self, t: float) -> Iterator[Frame]:
        while True:
            if self._next is None:
                self._next = next(self._it, None)
            if self._next is None or self._next.pts > t + 1e-9:
                return
            frame, self._next = self._next, None
            yield frame


def compression_off(options: StreamOptions) -> StreamOptions:
    """``options`` with every lossy step off: the STC cacher (and its frame gate), the pruner, and the int8 KV window
    (the window in the model's dtype). Sampling and the KV budget and policy are unchanged."""
    return options.merged({"cacher": {"enabled": False}, "pruner": {"enabled": False}, "kv": {"window_quant": "none"}})


class EvalRunner:
    """Runs benchmark questions through one in-process pipeline per setting.

    Args:
        adapter: the loaded VLM adapter (shared by every setting).
        settings: setting name -> stream options, e.g. ``{"configured": opts, "off": compression_off(opts)}``.
        source: how video files are opened (decord via :func:`stream.sources.open_source`).
        memory_budget_bytes: replica-wide KV budget of each pipeline.
        max_new_tokens: answer length (the benchmarks want a letter, a number or Yes/No).
    """

    def __init__(self, adapter: VLMAdapter, settings: dict[str, StreamOptions], source: SourceConfig | None = None,
                 memory_budget_bytes: int = 4 << 30, max_new_tokens: int = 16) -> None:
        if not settings:
            raise ValueError("EvalRunner needs at least one setting")
        self.adapter, self.settings = adapter, settings
        self.source = source or SourceConfig()
        self.max_new_tokens = max_new_tokens
        self.pipelines = {name: StreamPipeline(adapter, opts, memory_budget_bytes) for name, opts in settings.items()}

    def run_video(self, setting: str, path: Path, items: list[EvalItem]) -> list[ItemResult]:
        """Stream ``path`` once under ``setting``, asking ``items`` (any order; asked in time order)."""
        pipe = self.pipelines[setting]
        sid = pipe.open(f"eval-{setting}")
        chunker = pipe.chunker(sid)  # one sampling decision across the segments
        out: list[ItemResult] = []
        cpu_s = 0.0
        try:
            with open_source(path, self.source) as src:
                feed = _Until(iter(src))
                for item in sorted(items, key=lambda it: it.time_s):
                    t0 = time.thread_time()
                    pipe.ingest(sid, feed.upto(item.time_s), chunker=chunker)  # 2. frames up to the question
                    cpu_s += time.thread_time() - t0
                    response = "".join(pipe.ask(sid, item.prompt, self.max_new_tokens))
                    st = pipe.stats[sid]
                    out.append(ItemResult(
                        item.item_id, item.task, setting, item.time_s, item.answer, response, score(item, response),
                        st.frames, st.visual_tokens, round(st.vit_ms, 3), round(st.prefill_ms, 3), round(cpu_s, 4),
                        round(st.answer.ttft_ms, 3), st.answer.kv_tokens, st.answer.kv_bytes))
        finally:
            pipe.close(sid)
        return out

    def run(self, items: list[EvalItem], videos: str | Path,
            progress: Callable[[str], None] | None = None) -> list[ItemResult]:
        """Every item under every setting; videos are resolved (and missing ones reported) before any encode."""
        by_video: dict[Path, list[EvalItem]] = defaultdict(list)
        for item in items:
            by_video[resolve_video(item, videos)].append(item)
        results: list[ItemResult] = []
        for k, (path, group) in enumerate(by_video.items()):
            for setting in self.settings:
                results += self.run_video(setting, path, group)
            if progress:
                progress(f"[{k + 1}/{len(by_video)}] {path.name}: {len(group)} questions")
        return results


def _accuracy(rows: list[ItemResult]) -> dict[str, Any]:
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        per_task[r.task].append(r.correct)
    tasks = {t: {"n": len(v), "correct": sum(v), "accuracy": round(sum(v) / len(v), 4)} for t, v in per_task.items()}
    return {"overall": round(sum(r.correct for r in rows) / len(rows), 4) if rows else 0.0,
            "task_mean": round(sum(t["accuracy"] for t in tasks.values()) / len(tasks), 4) if tasks else 0.0,
            "per_task": tasks}


def _cost(rows: list[ItemResult]) -> dict[str, Any]:
    n = max(1, len(rows))
    mean = {k: round(sum(getattr(r, k) for r in rows) / n, 3) for k in (*COST_KEYS, "frames", "kv_tokens")}
    return {"mean_at_question": mean, "ingest_cpu_s_total": round(sum(r.ingest_cpu_s for r in rows), 3)}


def summarize(results: list[ItemResult], settings: list[str], baseline: str | None = "off") -> dict[str, Any]:
    """Accuracy per task and overall, and the cost side, per setting; ratios against ``baseline`` when present."""
    out: dict[str, Any] = {}
    for name in settings:
        rows = [r for r in results if r.setting == name]
        out[name] = {"questions": len(rows), "accuracy": _accuracy(rows), "cost": _cost(rows)}
    if baseline in out:
        base = out[baseline]
        for name, s in out.items():
            if name == baseline:
                continue
            b_acc = sum(r.correct for r in results if r.setting == baseline)
            acc = sum(r.correct for r in results if r.setting == name)
            s["accuracy_retained"] = round(acc / b_acc, 4) if b_acc else None
            bm, sm = base["cost"]["mean_at_question"], s["cost"]["mean_at_question"]
            s["cost_ratio"] = {k: round(sm[k] / bm[k], 4) if bm[k] else None for k in COST_KEYS}
            same = {(r.item_id): r.response for r in results if r.setting == baseline}
            rows = [r for r in results if r.setting == name]
            s["same_answer_as_" + baseline] = round(sum(same.get(r.item_id) == r.response for r in rows)
                                                    / max(1, len(rows)), 4)
    return out


def results_json(results: list[ItemResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]


def plot_report(summary: dict[str, Any], path: str | Path, title: str) -> None:
    """Per-task accuracy per setting (left) and each setting's cost relative to the first one's baseline (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summary)
    tasks = sorted({t for s in summary.values() for t in s["accuracy"]["per_task"]})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(names)
    x = np.arange(len(tasks) + 1)
    for i, name in enumerate(names):
        acc = summary[name]["accuracy"]
        vals = [acc["per_task"].get(t, {}).get("accuracy", 0.0) for t in tasks] + [acc["overall"]]
        ax1.bar(x + i * width, vals, width, label=name)
    ax1.set_xticks(x + 0.4 - width / 2, tasks + ["overall"], rotation=30, fontsize=8)
    ax1.set(ylabel="accuracy", ylim=(0, 1), title="accuracy per task")
    ax1.legend(fontsize=8)
    ratios = [(n, s["cost_ratio"]) for n, s in summary.items() if "cost_ratio" in s]
    for i, (name, r) in enumerate(ratios):
        ax2.bar(np.arange(len(COST_KEYS)) + i * 0.4, [r[k] or 0.0 for k in COST_KEYS], 0.4, label=name)
    ax2.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax2.set_xticks(np.arange(len(COST_KEYS)), COST_KEYS, fontsize=8)
    ax2.set(ylabel="cost / cost with compression off", title="cost at question time (mean over questions)")
    if ratios:
        ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
