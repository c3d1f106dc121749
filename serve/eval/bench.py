"""Benchmark files -> typed questions at stream times, and the benchmarks' own answer scoring.

Formats (``--format``):

* ``ovo`` (OVO-Bench, one JSON list). Backward-tracing and real-time items (``EPM ASI HLD STU OJR ATR ACR OCR
  FPD``): ``{id, task, video, realtime, question, options, gt}`` with ``gt`` a 0-based option index; the question is
  asked at ``realtime`` seconds as multiple choice and scored as OVO-Bench does (the right letter occurs in the
  response). Forward active-responding items (``REC SSR CRR``): ``{id, task, video, test_info: [{realtime, ...}]}``;
  every ``test_info`` entry is one question at its own ``realtime``: ``REC`` (needs ``activity``; entry ``count``)
  asks for a count, scored by the response's digits; ``SSR`` (entry ``step``, ``type`` 0/1) and ``CRR`` (item
  ``question``, entry ``type`` 0/1) ask Yes/No, scored as OVO-Bench does ("Yes"/"No" or a bare "Y"/"N").
* ``streamingbench`` (StreamingBench, one JSON list): ``{video_path, questions: [{task_type, question, time_stamp
  "HH:MM:SS", options ["A. ...", ...], answer "B"}]}``; scored by the first option letter in the response.

Every malformed item raises :class:`BenchFormatError` naming the item (index and id), the field, the bad value,
what is allowed and the fix, before any model runs.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from stream.errors import ConfigError

__all__ = ["BenchFormatError", "EvalItem", "FORMATS", "load_bench", "resolve_video", "score"]

OVO_MC_TASKS = ("EPM", "ASI", "HLD", "STU", "OJR", "ATR", "ACR", "OCR", "FPD")
OVO_FORWARD_TASKS = ("REC", "SSR", "CRR")
LETTERS = "ABCDEFGHIJ"

MC_PROMPT = ("Question: {question}\nOptions:\n{options}\n\nAnswer with only the letter of the correct option "
             "(e.g. A, B, C). Do not add any other text.")
REC_PROMPT = ("People in this video may repeat one kind of action; 'they' below means the people doing it. Count "
              "how many times it has been done so far, all people together; one complete motion counts as one.\n"
              "How many times did they {activity}?\nAnswer with a single number (0, 1, 2, ...) and nothing else.")
SSR_PROMPT = ("This is a tutorial video made of a sequence of steps. One of the steps is:\n{step}\nIs the person "
              "in the video performing this step right now? Answer only \"Yes\" or \"No\".")
CRR_PROMPT = ("Answer from the video content. The question is about the latest frames (the end of the video so "
              "far):\n{question}\nDo the frames seen so far, especially the latest ones, give enough information "
              "to answer it? Answer only \"Yes\" or \"No\".")


class BenchFormatError(ConfigError):
    """A benchmark file or item that does not follow its format (the message names the item and the fix)."""


@dataclass(frozen=True)
class EvalItem:
    """One question asked at one stream time.

    Attributes:
        item_id: the benchmark's id (forward OVO entries: ``"<id>#<entry>"``).
        task: task name the accuracy is grouped by (OVO ``task``, StreamingBench ``task_type``).
        video: video path as written in the file (resolved against ``--videos`` by :func:`resolve_video`).
        time_s: seconds into the video at which the question is asked; frames after it are not seen.
        prompt: the full question text given to the model (question + options + answer instruction).
        answer: the ground truth in the scorer's terms: a letter, ``"Yes"``/``"No"``, or a count.
        scorer: ``mc_contains`` (OVO), ``yes_no`` (OVO SSR/CRR), ``count`` (OVO REC), ``mc_first`` (StreamingBench).
        options: the option texts (multiple choice), for the report.
    """

    item_id: str
    task: str
    video: str
    time_s: float
    prompt: str
    answer: str
    scorer: str
    options: tuple[str, ...] = ()


def _fail(where: str, msg: str) -> BenchFormatError:
    return BenchFormatError(f"{where}: {msg}")


def _get(obj: Any, key: str, where: str, kind: type | tuple[type, ...], fix: str) -> Any:
    if not isinstance(obj, dict):
        raise _fail(where, f"must be a JSON object, got {type(obj).__name__}. Fix: {fix}")
    if key not in obj:
        raise _fail(where, f"missing field {key!r} (has: {', '.join(map(str, obj)) or 'nothing'}). Fix: {fix}")
    value, kinds = obj[key], (kind if isinstance(kind, tuple) else (kind,))
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise _fail(where, f"field {key!r} must be {names}, got {value!r}. Fix: {fix}")
    return value


def _seconds(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise _fail(where, f"field {key!r} must be seconds >= 0 into the video, got {value!r}. Fix: e.g. 12.5")
    return float(value)


def _options(value: Any, where: str, strip_letters: bool) -> tuple[str, ...]:
    if not isinstance(value, list) or not 2 <= len(value) <= len(LETTERS) or not all(isinstance(o, str) for o in value):
        raise _fail(where, f"field 'options' must be a list of 2-{len(LETTERS)} strings, got {value!r}. "
                           "Fix: e.g. [\"A. a dog\", \"B. a cat\"]")
    if not strip_letters:
        return tuple(value)
    out = []
    for i, text in enumerate(value):
        m = re.match(r"\s*\(?([A-J])[.):]\s*(.*)", text, re.S)
        if m is None or m.group(1) != LETTERS[i]:
            raise _fail(where, f"option {i} must start with '{LETTERS[i]}.', got {text!r}. Fix: write "
                               f"\"{LETTERS[i]}. <text>\"")
        out.append(m.group(2).strip())
    return tuple(out)


def mc_prompt(question: str, options: Sequence[str]) -> str:
    """The multiple-choice prompt every benchmark item and ``stc-serve ask --options`` use (options lettered A, B, ...)."""
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return MC_PROMPT.format(question=question.strip(), options=lines)


def _ovo_item(raw: Any, index: int) -> list[EvalItem]:
    where = f"item {index}" + (f" (id {raw.get('id')!r})" if isinstance(raw, dict) and "id" in raw else "")
    fix = "see the OVO-Bench format in `stc-serve eval --help`"
    item_id = str(_get(raw, "id", where, (str, int), fix))
    task = _get(raw, "task", where, str, fix)
    video = _get(raw, "video", where, str, "give the video path relative to --videos")
    if task in OVO_MC_TASKS:
        question = _get(raw, "question", where, str, fix)
        options = _options(_get(raw, "options", where, list, fix), where, strip_letters=False)
        gt = _get(raw, "gt", where, int, "give the 0-based index of the right option")
        if not 0 <= gt < len(options):
            raise _fail(where, f"field 'gt' must be a 0-based option index in [0, {len(options)}), got {gt}. "
                               "Fix: index the right option from 0")
        time_s = _seconds(raw.get("realtime"), where, "realtime")
        return [EvalItem(item_id, task, video, time_s, mc_prompt(question, options), LETTERS[gt], "mc_contains",
                         options)]
    if task not in OVO_FORWARD_TASKS:
        raise _fail(where, f"unknown task {task!r}; allowed: {', '.join(OVO_MC_TASKS + OVO_FORWARD_TASKS)}. "
                           "Fix: use an OVO-Bench task name")
    entries = _get(raw, "test_info", where, list, "forward tasks list their questions under test_info")
    if not entries:
        raise _fail(where, "field 'test_info' is empty. Fix: give at least one {realtime, ...} entry")
    items = []
    for j, entry in enumerate(entries):
        at = f"{where} test_info[{j}]"
        time_s = _seconds(entry.get("realtime") if isinstance(entry, dict) else None, at, "realtime")
        if task == "REC":
            activity = _get(raw, "activity", where, str, "REC items name the counted activity")
            count = _get(entry, "count", at, int, "give the true count so far")
            prompt, answer, scorer = REC_PROMPT.format(activity=activity.strip()), str(count), "count"
        else:
            kind = _get(entry, "type", at, int, "type is 1 (yes) or 0 (no)")
            if kind not in (0, 1):
                raise _fail(at, f"field 'type' must be 0 (no) or 1 (yes), got {kind}. Fix: use 0 or 1")
            if task == "SSR":
                prompt = SSR_PROMPT.format(step=_get(entry, "step", at, str, "SSR entries name the step").strip())
            else:
                prompt = CRR_PROMPT.format(question=_get(raw, "question", where, str, fix).strip())
            answer, scorer = ("Yes" if kind == 1 else "No"), "yes_no"
        items.append(EvalItem(f"{item_id}#{j}", task, video, time_s, prompt, answer, scorer))
    return items


def parse_timestamp(text: Any, where: str) -> float:
    """``"HH:MM:SS"`` (or ``MM:SS``, seconds may have decimals) -> seconds; raises naming ``where``."""
    m = re.fullmatch(r"\s*(?:(\d+):)?(\d{1,2}):(\d{1,2}(?:\.\d+)?)\s*", text) if isinstance(text, str) else None
    if m is None or int(m.group(2)) >= 60 or float(m.group(3)) >= 60:
        raise _fail(where, f"field 'time_stamp' must be \"HH:MM:SS\", got {text!r}. Fix: e.g. \"00:01:05\"")
    return int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def _streamingbench_items(raw: Any, index: int) -> list[EvalItem]:
    where = f"item {index}"
    video = _get(raw, "video_path", where, str, "give the video path relative to --videos")
    questions = _get(raw, "questions", where, list, "list the questions of this video")
    items = []
    for j, q in enumerate(questions):
        at = f"{where} ({video!r}) question {j}"
        task = _get(q, "task_type", at, str, "name the task, e.g. \"Object Perception\"")
        question = _get(q, "question", at, str, "give the question text")
        options = _options(_get(q, "options", at, list, "give the options"), at, strip_letters=True)
        answer = _get(q, "answer", at, str, "give the right letter, e.g. \"B\"").strip().upper()
        if answer not in LETTERS[:len(options)] or not answer:
            raise _fail(at, f"field 'answer' must be one of {', '.join(LETTERS[:len(options)])}, got "
                            f"{q['answer']!r}. Fix: give the right option's letter")
        time_s = parse_timestamp(q.get("time_stamp"), at)
        item_id = str(q.get("id", f"{index}:{j}"))
        items.append(EvalItem(item_id, task, video, time_s, mc_prompt(question, options), answer, "mc_first", options))
    return items


FORMATS: dict[str, Callable[[Any, int], list[EvalItem]]] = {"ovo": _ovo_item, "streamingbench": _streamingbench_items}


def load_bench(path: str | Path, fmt: str) -> list[EvalItem]:
    """Read a benchmark JSON file of format ``fmt`` (``ovo`` or ``streamingbench``) -> questions in file order."""
    if fmt not in FORMATS:
        raise BenchFormatError(f"unknown benchmark format {fmt!r}; allowed: {', '.join(FORMATS)}. Fix: pass "
                               "--format ovo or --format streamingbench")
    p = Path(path)
    if not p.is_file():
        raise BenchFormatError(f"benchmark file {str(p)!r} does not exist. Fix: pass the JSON file with --bench")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BenchFormatError(f"benchmark file {str(p)!r} is not valid JSON ({exc}). Fix: pass the benchmark's "
                               "JSON file") from None
    if not isinstance(data, list) or not data:
        raise BenchFormatError(f"benchmark file {str(p)!r} must hold a non-empty JSON list of items, got "
                               f"{type(data).__name__}. Fix: pass the {fmt} annotation file itself")
    return [item for i, raw in enumerate(data) for item in FORMATS[fmt](raw, i)]


def resolve_video(item: EvalItem, videos: str | Path) -> Path:
    """The video file of ``item``: ``videos / item.video``, else ``videos / <file name>`` (StreamingBench paths
    often carry the authors' folder), else the path as written when it exists; raises naming the item."""
    root, rel = Path(videos), Path(item.video)
    for cand in (root / rel, root / rel.name, rel):
        if cand.is_file():
            return cand
    raise BenchFormatError(f"item {item.item_id!r}: video {item.video!r} not found under {str(root)!r} (tried "
                           f"{str(root / rel)!r} and {str(root / rel.name)!r}). Fix: pass the folder holding the "
                           "benchmark's videos with --videos")


def parse_choice(response: str, n_options: int = 4) -> str | None:
    """StreamingBench-style: the first standalone option letter in ``response`` (``"B"``, ``"(B)"``, ``"B. x"``)."""
    m = re.search(rf"(?<![A-Za-z])([A-{LETTERS[max(1, n_options) - 1]}])(?![A-Za-z])", response)
    return m.group(1) if m else None


def score(item: EvalItem, response: str) -> bool:
    """Whether ``response`` is right, as the item's benchmark scores it (see the module docstring)."""
    text = response.strip()
    if item.scorer == "mc_contains":
        return item.answer in text
    if item.scorer == "mc_first":
        return parse_choice(text, len(item.options)) == item.answer
    if item.scorer == "count":
        return "".join(re.findall(r"\d+", text)) == item.answer
    if item.scorer == "yes_no":
        return text == item.answer[0] or item.answer in text
    raise ValueError(f"unknown scorer {item.scorer!r}")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of ``k`` right answers in ``n`` (``(0, 1)`` when ``n == 0``)."""
    if n == 0:
        return 0.0, 1.0
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)
