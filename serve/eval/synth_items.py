"""Timelines and questions of the synthetic streaming benchmark (no pixels here; see ``synth_scene``).

* :func:`plan_objects` -- one clip's planted objects: a repeated target (counted by ``REC``), a watched target
  (``CRR``, its onset gives alert latency), two once-only "episodic" objects whose size+shape nothing else in the
  clip has (``EPM`` asks their colour after they left), and distractors (at most 3 objects on screen at once).
* :func:`clip_questions` -- questions about a timeline, each answerable from the frames up to its time, with the
  metadata later analysis needs (``T_s``: seconds between the last frame showing the asked object and the question).
* :func:`realtime_drills` -- every real-time question those rules allow at given seconds (training drills).

Task codes (OVO-Bench's; StreamingBench ``task_type`` in brackets):

==========  ======================================================================  =========================
OVO code    question (asked at ``realtime`` seconds)                                kind
==========  ======================================================================  =========================
``ATR``     colour of the <size> <shape> on screen now / shape of the <colour> one   real-time [Attribute Perception]
``STU``     is the <colour> <shape> on the left or the right now                    real-time [Spatial Understanding]
``OJR``     how many objects are on the screen now (0-3)                            real-time [Counting]
``EPM``     colour of the <size> <shape> that was on screen earlier and has left    backward [Event Understanding]
``ASI``     did the <object a> appear before or after the <object b>                backward [Sequence Understanding]
``REC``     how many times a <colour> <shape> has appeared so far (several times)   forward (OVO only)
``CRR``     where is the <colour> <shape>: Yes once it is on screen, No before       forward (OVO only)
==========  ======================================================================  =========================

Multiple-choice options are closed sets in a fixed order (all 6 colours, all 3 shapes, left/right, 0-3,
before/after), so an answer letter means one value everywhere: chance is 1/6, 1/3, 1/2, 1/4 and 1/2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from serve.eval.synth_scene import COLOURS, SHAPES, SIZES, PlantedObject

TASK_WEIGHTS = {"ATR": 3, "STU": 2, "OJR": 2, "EPM": 2, "ASI": 1, "REC": 1, "CRR": 1}  # per 12 items of a clip
STREAMINGBENCH_TYPES = {"ATR": "Attribute Perception", "STU": "Spatial Understanding", "OJR": "Counting",
                        "EPM": "Event Understanding", "ASI": "Sequence Understanding"}
TASK_KINDS = {"ATR": "realtime", "STU": "realtime", "OJR": "realtime", "EPM": "backward", "ASI": "backward",
              "REC": "counting", "CRR": "watch"}  # OVO-Bench's three kinds; forward active responding split in two
MAX_ON_SCREEN = 3
STABLE_S = 1  # real-time questions: the scene has not changed in the last STABLE_S seconds
COUNT_WORDS = ("0", "1", "2", "3")


@dataclass
class Question:
    """One benchmark item before it is written in a file format.

    Attributes:
        task: OVO task code (see the module table).
        realtime: seconds into the clip the question is asked (MC tasks); forward tasks use ``entries``.
        question, options, gt: multiple choice (``gt`` 0-based); forward: ``question`` (CRR) or ``activity`` (REC).
        entries: forward tasks: ``[{"realtime": s, "count": n}]`` (REC) or ``[{"realtime": s, "type": 0|1}]`` (CRR).
        meta: analysis fields (``kind``, ``objects``, ``T_s``, ``onset_s``, ...).
    """

    task: str
    realtime: int = 0
    question: str = ""
    options: list[str] = field(default_factory=list)
    gt: int = 0
    activity: str = ""
    entries: list[dict[str, int]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def _bounds(size: str) -> tuple[float, float]:
    """Half side of a ``size`` object as fractions of clip (width, height)."""
    probe = PlantedObject(0, "square", "red", size, 0, 1, (0.5, 0.5), (0.5, 0.5))
    return probe.half_width(), SIZES[size] / 2


def _apart(a: PlantedObject, b: PlantedObject) -> bool:
    """True when ``a`` and ``b`` never overlap (checked every half second they are both on screen)."""
    for t in np.arange(max(a.on, b.on), min(a.off, b.off), 0.5):
        (ax, ay), (bx, by) = a.centre(t), b.centre(t)
        wa, ha = _bounds(a.size)
        wb, hb = _bounds(b.size)
        if abs(ax - bx) < wa + wb + 0.02 and abs(ay - by) < ha + hb + 0.02:
            return False
    return True


def place_object(rng: np.random.Generator, oid: int, ident: tuple[str, str, str], on: int, off: int,
           others: list[PlantedObject], covered_p: float = 0.15) -> PlantedObject | None:
    """An object of identity ``(colour, shape, size)`` on screen ``[on, off)``, not overlapping ``others`` and with at
    most ``MAX_ON_SCREEN`` objects on screen at once; ``None`` after 30 failed draws."""
    colour, shape, size = ident
    hw, hh = _bounds(size)
    for t in range(on, off):
        if sum(o.visible(t) for o in others) >= MAX_ON_SCREEN:
            return None
    for _ in range(30):
        sx, sy = rng.uniform(hw + 0.02, 1 - hw - 0.02), rng.uniform(hh + 0.02, 1 - hh - 0.02)
        ex, ey = sx, sy
        if rng.random() < 0.5:  # moving
            ex = float(np.clip(sx + rng.uniform(-0.35, 0.35), hw + 0.02, 1 - hw - 0.02))
            ey = float(np.clip(sy + rng.uniform(-0.2, 0.2), hh + 0.02, 1 - hh - 0.02))
        covered = None
        if off - on >= 6 and rng.random() < covered_p:
            third = (off - on) // 3
            covered = (on + third, off - third)
        obj = PlantedObject(oid, shape, colour, size, on, off, (round(float(sx), 3), round(float(sy), 3)),
                            (round(float(ex), 3), round(float(ey), 3)), covered)
        if all(_apart(obj, o) for o in others):
            return obj
    return None


def plan_objects(rng: np.random.Generator, seconds: int) -> list[PlantedObject]:
    """The planted objects of a ``seconds``-long clip (see the module docstring), sorted by onset."""
    colours, combos = list(COLOURS), [(s, z) for s in SHAPES for z in SIZES]
    order = rng.permutation(len(combos))
    episodic_combos, free_combos = [combos[i] for i in order[:2]], [combos[i] for i in order[2:]]
    picks = rng.choice(len(colours), size=2, replace=False)
    rec_shape, rec_size = free_combos[int(rng.integers(len(free_combos)))]
    watch_shape, watch_size = free_combos[int(rng.integers(len(free_combos)))]
    rec = (colours[picks[0]], rec_shape, rec_size)
    watch = (colours[picks[1]], watch_shape, watch_size)
    objects: list[PlantedObject] = []

    def add(ident: tuple[str, str, str], on: int, off: int, covered_p: float = 0.15) -> bool:
        obj = place_object(rng, len(objects), ident, on, off, objects, covered_p)
        if obj is not None:
            objects.append(obj)
        return obj is not None

    # 1. episodic objects early in the clip (so they can be asked long after they left)
    for shape, size in episodic_combos:
        for _ in range(10):
            on = int(rng.integers(1, max(2, int(seconds * 0.45))))
            if add((colours[int(rng.integers(len(colours)))], shape, size), on, on + int(rng.integers(3, 7)), 0.0):
                break
    # 2. the watched object: once, in the middle of the clip, on screen >= 5 s
    for _ in range(10):
        on = int(rng.integers(int(seconds * 0.3), int(seconds * 0.75)))
        if add(watch, on, min(seconds, on + int(rng.integers(5, 9))), 0.0):
            break
    # 3. the repeated object: 1-4 appearances of 2-4 s, at least 3 s apart
    t = int(rng.integers(2, 8))
    for _ in range(int(rng.choice([1, 2, 3, 4], p=[0.2, 0.3, 0.3, 0.2]))):
        dur = int(rng.integers(2, 5))
        while t + dur < seconds - 2 and not add(rec, t, t + dur, 0.0):
            t += 1
        t += dur + int(rng.integers(3, max(4, seconds // 5)))
    # 4. distractors: any identity whose (colour, shape) is neither target's and whose (shape, size) is not episodic
    taken = {(c, s) for c, s, _ in (rec, watch)}
    idents = [(c, s, z) for c in colours for s, z in free_combos if (c, s) not in taken]
    for t in range(0, seconds - 2):
        if rng.random() < 0.2:
            ident = idents[int(rng.integers(len(idents)))]
            add(ident, t, min(seconds, t + int(rng.integers(4, 12))))
    objects.sort(key=lambda o: (o.on, o.oid))
    return [PlantedObject(i, *[getattr(o, f) for f in ("shape", "colour", "size", "on", "off", "start", "end",
                                                        "covered")]) for i, o in enumerate(objects)]


def _visible(objects: list[PlantedObject], t: float) -> list[PlantedObject]:
    return [o for o in objects if o.visible(t)]


def _stable(objects: list[PlantedObject], t: int) -> bool:
    """The same objects are on screen at every whole second of ``[t - STABLE_S, t]``."""
    ids = {o.oid for o in _visible(objects, t)}
    return all({o.oid for o in _visible(objects, s)} == ids for s in range(t - STABLE_S, t))


def _fixed(right: str, pool: Sequence[str]) -> tuple[list[str], int]:
    """Every value of a closed set as options, in its fixed order -> (options, gt index of ``right``)."""
    return list(pool), list(pool).index(right)


def screen_side(o: PlantedObject, t: int) -> int | None:
    """STU's rule at whole second ``t``: 0 when the object stays left of 0.48 over the last ``STABLE_S`` seconds, 1
    when it stays right of 0.52, ``None`` when it touches the centre band (no left/right question then)."""
    xs = [o.centre(s)[0] for s in range(t - STABLE_S, t + 1)]
    if all(x + o.half_width() < 0.48 for x in xs):
        return 0
    if all(x - o.half_width() > 0.52 for x in xs):
        return 1
    return None


def _realtime(task: str, objects: list[PlantedObject], t: int, rng: np.random.Generator) -> Question | None:
    """A real-time question at ``t`` or ``None`` when the scene does not allow one."""
    if not _stable(objects, t):
        return None
    vis = _visible(objects, t)
    if task == "OJR":
        return Question(task, t, "How many objects are on the screen now?", list(COUNT_WORDS), len(vis),
                        meta={"kind": "count_now", "objects": [o.oid for o in vis]})
    clear = [o for o in vis if (o.covered is None or not o.covered[0] <= t < o.covered[1])]
    if not clear:
        return None
    o = clear[int(rng.integers(len(clear)))]
    if task == "ATR" and rng.random() < 0.6:
        if sum((v.shape, v.size) == (o.shape, o.size) for v in vis) > 1:
            return None
        opts, gt = _fixed(o.colour, list(COLOURS))
        q = f"What colour is the {o.size} {o.shape} on the screen now?"
        return Question(task, t, q, opts, gt, meta={"kind": "colour_now", "objects": [o.oid]})
    if task == "ATR":
        if sum(v.colour == o.colour for v in vis) > 1:
            return None
        opts, gt = _fixed(o.shape, SHAPES)
        q = f"What shape is the {o.colour} object on the screen now?"
        return Question(task, t, q, opts, gt, meta={"kind": "shape_now", "objects": [o.oid]})
    if sum((v.colour, v.shape) == (o.colour, o.shape) for v in vis) > 1:
        return None
    side = screen_side(o, t)
    if side is None:
        return None
    q = f"Is the {o.colour} {o.shape} on the left or the right side of the screen now?"
    return Question(task, t, q, ["left", "right"], side, meta={"kind": "side_now", "objects": [o.oid]})


def realtime_drills(objects: list[PlantedObject], times: Sequence[int], rng: np.random.Generator,
                    tries: int = 4) -> list[Question]:
    """Real-time questions (ATR, STU, OJR) at each whole second of ``times`` by exactly the bench's rules, each
    question once: extra training questions about a clip (``tries`` draws per task and second; the bench's
    :func:`clip_questions` asks only a few per clip)."""
    out: list[Question] = []
    for t in times:
        asked: set[str] = set()
        for task in ("ATR", "ATR", "STU", "OJR"):
            for _ in range(tries):
                q = _realtime(task, objects, t, rng)
                if q is not None and q.question not in asked:
                    asked.add(q.question)
                    out.append(q)
    return out


def _episodic(objects: list[PlantedObject], seconds: int, rng: np.random.Generator) -> Question | None:
    """EPM: the colour of a once-only object (unique size+shape in the clip) asked after it left."""
    combos: dict[tuple[str, str], list[PlantedObject]] = {}
    for o in objects:
        combos.setdefault((o.shape, o.size), []).append(o)
    unique = [v[0] for v in combos.values() if len(v) == 1 and v[0].off + 1 < seconds]
    if not unique:
        return None
    o = unique[int(rng.integers(len(unique)))]
    last_seen = o.off - 1  # whole second of its last frame at 1 fps
    far = rng.random() < 0.5 and seconds - 1 - last_seen > 16
    lo, hi = (16, seconds - 1 - last_seen) if far else (2, min(15, seconds - 1 - last_seen))
    if hi < lo:
        return None
    t = last_seen + int(rng.integers(lo, hi + 1))
    opts, gt = _fixed(o.colour, list(COLOURS))
    q = f"What colour was the {o.size} {o.shape} that was on the screen earlier?"
    return Question("EPM", t, q, opts, gt, meta={"kind": "colour_before", "objects": [o.oid], "T_s": t - last_seen,
                                                 "onset_ago_s": t - o.on})


def _order(objects: list[PlantedObject], seconds: int, rng: np.random.Generator) -> Question | None:
    """ASI: did object ``a`` appear before or after object ``b`` (both described uniquely so far, onsets >= 2 s
    apart)? ``T_s``: seconds since the earlier onset."""
    t = int(rng.integers(min(seconds - 1, 12), seconds))
    seen = [o for o in objects if o.on <= t - 1]
    names = [o.describe() for o in seen]
    cands = [o for o in seen if names.count(o.describe()) == 1]
    if len(cands) < 2:
        return None
    a, b = (cands[i] for i in rng.choice(len(cands), size=2, replace=False))
    if abs(a.on - b.on) < 2:
        return None
    q = f"Did the {a.describe()} appear before or after the {b.describe()}?"
    return Question("ASI", t, q, ["before", "after"], int(a.on > b.on),
                    meta={"kind": "order", "objects": [a.oid, b.oid], "T_s": t - min(a.on, b.on),
                          "onset_ago_s": t - min(a.on, b.on)})


def _repeats(objects: list[PlantedObject], seconds: int, rng: np.random.Generator) -> Question | None:
    """REC: counts of the repeated object so far at up to 4 times (never within 1 s after one of its onsets)."""
    idents: dict[tuple[str, str], list[PlantedObject]] = {}
    for o in objects:
        idents.setdefault((o.colour, o.shape), []).append(o)
    target = max(idents.values(), key=len)
    if len(target) < 2 and not any(o.on > 3 for o in target):
        return None
    onsets = [o.on for o in target]
    times = [s for s in range(2, seconds) if all(not on <= s <= on + 1 for on in onsets)]
    picks = sorted(int(x) for x in rng.choice(times, size=min(4, len(times)), replace=False))
    entries = [{"realtime": s, "count": sum(on <= s for on in onsets)} for s in picks]
    o = target[0]
    return Question("REC", activity=f"show a {o.colour} {o.shape}", entries=entries,
                    meta={"kind": "count_so_far", "objects": [x.oid for x in target], "onsets_s": onsets})


def _watch(objects: list[PlantedObject], rng: np.random.Generator) -> Question | None:
    """CRR: "where is the <colour> <shape>" -- No before its onset, Yes from its onset (alert latency)."""
    for o in objects:
        same = [x for x in objects if (x.colour, x.shape) == (o.colour, o.shape)]
        if len(same) == 1 and o.off - o.on >= 5 and o.on >= 5:
            times = [(o.on - d, 0) for d in (4, 2, 1)] + [(o.on + d, 1) for d in range(4)]
            entries = [{"realtime": s, "type": k} for s, k in times]
            return Question("CRR", question=f"Where is the {o.colour} {o.shape} on the screen?", entries=entries,
                            meta={"kind": "watch", "objects": [o.oid], "onset_s": o.on, "offset_s": o.off})
    return None


def clip_questions(objects: list[PlantedObject], seconds: int, n_items: int,
                   rng: np.random.Generator) -> list[Question]:
    """Up to ``n_items`` questions about one clip, split over tasks by ``TASK_WEIGHTS`` (at most one REC and one
    CRR item per clip), in time order of their first ``realtime``."""
    total = sum(TASK_WEIGHTS.values())
    quota = {k: max(1, round(w * n_items / total)) for k, w in TASK_WEIGHTS.items()}
    quota["REC"] = quota["CRR"] = 1
    out: list[Question] = []
    for task, n in quota.items():
        got: list[Question] = []
        for _ in range(40 * n):
            if len(got) >= n:
                break
            if task in ("ATR", "STU", "OJR"):
                q = _realtime(task, objects, int(rng.integers(STABLE_S + 1, seconds)), rng)
            elif task == "EPM":
                q = _episodic(objects, seconds, rng)
            elif task == "ASI":
                q = _order(objects, seconds, rng)
            elif task == "REC":
                q = _repeats(objects, seconds, rng)
            else:
                q = _watch(objects, rng)
            if q is not None and all((q.task, q.realtime, q.question) != (g.task, g.realtime, g.question)
                                     or q.entries for g in got):
                got.append(q)
        out += got
    if len(out) > n_items:  # rounding gave more than asked: drop a random few
        out = [out[i] for i in sorted(rng.choice(len(out), size=n_items, replace=False))]
    out.sort(key=lambda q: (q.entries[0]["realtime"] if q.entries else q.realtime, q.task))
    return out
