"""The reference model's held-out report: left/right (STU) items split by where the other objects on screen are."""
from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")

from benchmarks.reference_report import report, side_group  # noqa: E402
from serve.eval.bench import EvalItem  # noqa: E402


def _obj(oid: int, x: float, on: int = 0, off: int = 20, end_x: float | None = None) -> dict[str, Any]:
    return {"oid": oid, "shape": "square", "colour": "red", "size": "small", "on": on, "off": off,
            "start": [x, 0.5], "end": [x if end_x is None else end_x, 0.5], "covered": None}


def _item(oid: int, t: int, name: str = "a") -> dict[str, Any]:
    return {"id": name, "task": "STU", "video": "v.mp4", "times": [t], "kind": "side_now", "objects": [oid]}


def test_side_group_reads_the_others_sides_at_the_items_time() -> None:
    """Alone, every other object on the asked one's side, or one on the other side -- at the time asked: an object
    that has left or not yet appeared does not count, and a moving one counts where it is then."""
    assert side_group(_item(0, 5), [_obj(0, 0.2)]) == "STU_alone"
    assert side_group(_item(0, 5), [_obj(0, 0.2), _obj(1, 0.35)]) == "STU_others_same_side"
    assert side_group(_item(0, 5), [_obj(0, 0.2), _obj(1, 0.8)]) == "STU_other_opposite"
    assert side_group(_item(0, 5), [_obj(0, 0.8), _obj(1, 0.7), _obj(2, 0.1)]) == "STU_other_opposite"
    assert side_group(_item(0, 5), [_obj(0, 0.2), _obj(1, 0.8, on=6)]) == "STU_alone"  # not on screen yet
    assert side_group(_item(0, 5), [_obj(0, 0.2), _obj(1, 0.8, off=5)]) == "STU_alone"  # has left
    # moving from x=0.2 (t=0) to 0.8 (t=20): at t=5 it is at 0.35, left of centre; at t=15 at 0.65, right
    assert side_group(_item(0, 5), [_obj(0, 0.2), _obj(1, 0.2, end_x=0.8)]) == "STU_others_same_side"
    assert side_group(_item(0, 15), [_obj(0, 0.2), _obj(1, 0.2, end_x=0.8)]) == "STU_other_opposite"


def test_report_counts_each_stu_item_in_its_group() -> None:
    meta = {"clips": [{"video": "v.mp4", "objects": [_obj(0, 0.2), _obj(1, 0.8, on=10)]}],
            "items": [_item(0, 5, "early"), _item(0, 12, "late")]}
    results = [(EvalItem(m["id"], "STU", "v.mp4", m["times"][0], "q", "A", "mc_contains"), "A", ok)
               for m, ok in zip(meta["items"], (True, False))]
    acc = report(results, meta, window_s=15)
    assert acc["STU"]["n"] == 2 and acc["STU"]["correct"] == 1
    assert (acc["STU_alone"]["n"], acc["STU_alone"]["correct"]) == (1, 1)
    assert (acc["STU_other_opposite"]["n"], acc["STU_other_opposite"]["correct"]) == (1, 0)
    assert "STU_others_same_side" not in acc
