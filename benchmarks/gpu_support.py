"""Support of ``benchmarks/gpu_check.py``: the check records, running one check as a subprocess with a time limit,
per-process GPU memory (``nvidia-smi`` polling, and a wrapper reporting ``torch.cuda.max_memory_allocated``), and
the inputs (video, the service's model folder).

``python benchmarks/gpu_support.py --peak SCRIPT ARGS...`` runs SCRIPT as ``__main__`` and writes its peak CUDA
memory to the file named by ``$STC_GPU_CHECK_PEAK_FILE`` (the driver sets it).
"""
from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
DEFAULT_VIDEO = REPO.parent / "shared" / "media" / "vtest.avi"
PEAK_ENV = "STC_GPU_CHECK_PEAK_FILE"


@dataclass
class Plan:
    """One check, ready to run: the command, its time limit, and how to read its result."""

    cmd: list[str]
    timeout_s: float
    figures: Callable[[dict[str, Any]], dict[str, Any]] = lambda out: {}
    judge: Callable[[int, dict[str, Any] | None, str], str | None] | None = None  # -> failure reason or None
    note: str = ""


@dataclass
class Result:
    check: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    peak_gpu_mib: dict[str, float] = field(default_factory=dict)
    log: str = ""

    def line(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in ("", {}, None) or k in ("check", "status")}


class Skip(Exception):
    """A check that does not apply here (the reason is reported)."""


class Fail(Exception):
    """A check that cannot even start (its input could not be built); reported as a failure with the reason."""


# ---- context -----------------------------------------------------------------------------------------------------
@dataclass
class Context:
    device: str
    smoke: bool
    out: Path
    python: str = sys.executable
    video: Path | None = None
    service_model: str | None = None

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.cuda else "float32"

    def script(self, name: str, *args: str) -> list[str]:
        """``python gpu_support.py --peak benchmarks/<name> args``: the benchmark under the peak-memory wrapper."""
        return [self.python, str(BENCH / "gpu_support.py"), "--peak", str(BENCH / name), *args]


def help_text(ctx: Context, name: str) -> str | None:
    """``--help`` of a benchmark, or None when the file is absent (cached)."""
    path = BENCH / name
    if not path.is_file():
        return None
    key = f"_help_{name}"
    if key not in _HELP:
        proc = subprocess.run([ctx.python, str(path), "--help"], capture_output=True, text=True, timeout=120,
                              cwd=REPO, env=child_env())
        _HELP[key] = proc.stdout + proc.stderr
    return _HELP[key]


_HELP: dict[str, str] = {}


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def last_json(text: str) -> dict[str, Any] | None:
    """The last stdout line that is a JSON object (the benchmarks' contract)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def pick(data: dict[str, Any] | None, *keys: str) -> dict[str, Any]:
    """The named top-level fields of ``data`` that are present (headline figures)."""
    return {k: data[k] for k in keys if data and k in data}


# ---- running ---------------------------------------------------------------------------------------------------------
class GpuPoller:
    """Polls ``nvidia-smi`` for per-process GPU memory while a check runs; keeps each process's peak (MiB)."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.period_s, self.peaks, self._stop = period_s, {}, threading.Event()
        self.available = self._query() is not None
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _query() -> list[tuple[int, float]] | None:
        try:
            query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
            out = subprocess.run(query, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode != 0:
            return None
        rows = [line.split(",") for line in out.stdout.strip().splitlines() if line.count(",") == 1]
        return [(int(p), float(m)) for p, m in rows if p.strip().isdigit() and m.strip().replace(".", "").isdigit()]

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            for pid, mib in self._query() or []:
                name = process_name(pid)
                self.peaks[name] = max(self.peaks.get(name, 0.0), mib)

    def __enter__(self) -> "GpuPoller":
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=15)


def process_name(pid: int) -> str:
    """``pid:<short command>``: Ray names its workers (``ray::ServeReplica:stc:vision``), scripts by their file."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    words = [c.decode(errors="replace") for c in cmd if c]
    text = next((w for w in words if w.startswith("ray::")), None) or next(
        (Path(w).name for w in words if w.endswith(".py")), words[0] if words else "?")
    return f"{pid}:{text[:60]}"


def run_check(name: str, plan: Plan, limit_s: float, ctx: Context) -> Result:
    """Run one planned check as a subprocess (stdout/stderr to ``<out>/<name>.log``) and judge it."""
    log = ctx.out / f"{name}.log"
    peak_file = ctx.out / f"{name}.peak.json"
    env = {**child_env(), PEAK_ENV: str(peak_file)}
    t0 = time.monotonic()
    timed_out = False
    with GpuPoller() as poller, open(log, "w") as fh:
        fh.write("$ " + " ".join(plan.cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(plan.cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=fh, text=True,
                                start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 9)  # the check's own process group (Ray workers included)
            stdout, _ = proc.communicate()
        fh.write(stdout)
    seconds = time.monotonic() - t0
    out = last_json(stdout)
    peaks = {k: round(v, 1) for k, v in poller.peaks.items()}
    if peak_file.is_file():
        torch_peak = json.loads(peak_file.read_text()).get("torch_max_allocated_mib")
        if torch_peak is not None:
            peaks["torch_max_allocated (driver process)"] = torch_peak
    if timed_out:
        reason = f"timed out after {limit_s:.0f} s"
    elif plan.judge is not None:
        reason = plan.judge(proc.returncode, out, stdout) or ""
    else:
        reason = "" if proc.returncode == 0 and out is not None else f"exit {proc.returncode}, no JSON result line"
    try:
        figures = plan.figures(out) if out else {}
    except (KeyError, TypeError, ValueError) as exc:
        figures, reason = {}, reason or f"result line unreadable: {exc!r}"
    status = "fail" if reason else "pass"
    if not reason and plan.note:
        reason = plan.note
    if status == "fail":
        tail = "".join(log.read_text().splitlines(keepends=True)[-4:]).strip()
        reason = f"{reason} | log {log}: {tail[-400:]}"
    return Result(name, status, reason, round(seconds, 1), figures, peaks, str(log))


def peak_wrapper(script: str, argv: list[str]) -> None:
    """Run ``script`` as ``__main__`` in this process; write its peak CUDA memory to ``$STC_GPU_CHECK_PEAK_FILE``."""
    sys.argv = [script, *argv]
    code: Any = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    finally:
        target = os.environ.get(PEAK_ENV)
        torch = sys.modules.get("torch")
        used = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
        if target:
            peak = round(torch.cuda.max_memory_allocated() / 2**20, 1) if used else None
            Path(target).write_text(json.dumps({"torch_max_allocated_mib": peak}))
    sys.exit(code)


def prepare(ctx: Context, video: str | None) -> None:
    """The input video: the one given, else the real test video if present, else a synthetic clip."""
    if video:
        ctx.video = Path(video)
    elif DEFAULT_VIDEO.is_file():
        ctx.video = DEFAULT_VIDEO
    else:
        ctx.video = synthetic_video(ctx.out / "synthetic.mp4")


def synthetic_video(path: Path, seconds: int = 40, fps: int = 10, size: tuple[int, int] = (320, 240)) -> Path:
    """A clip of a square moving over a gradient (PyAV, H.264): used when the real test video is absent."""
    import av
    import numpy as np

    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(seconds * fps):
            rgb = np.empty((h, w, 3), dtype=np.uint8)
            rgb[..., 0], rgb[..., 1], rgb[..., 2] = x.astype(np.uint8), 128, (255 - x).astype(np.uint8)
            left = (3 * i) % (w - h // 4)
            rgb[h // 3: h // 3 + h // 4, left: left + h // 4] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def service_model(path: Path) -> Path:
    """LLaVA-OneVision with the real SigLIP-so400m tower and a Qwen2-0.5B-shaped LLM, random weights, bf16 on disk
    (a 7B LLM would cost minutes to write and load twice within the check's budget)."""
    import torch

    from benchmarks.bench_cacher import SO400M
    from stream.models.tiny import is_tiny, make_tiny_model

    if is_tiny(path):
        return path
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        text = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    intermediate_size=4864, vocab_size=151936)
        return make_tiny_model(path, "llava_onevision", text_overrides=text, vision_overrides=dict(SO400M))
    finally:
        torch.set_default_dtype(old)


if __name__ == "__main__":
    USAGE = ("usage: python benchmarks/gpu_support.py --peak SCRIPT [ARGS...]\n\nRun SCRIPT as __main__ with ARGS "
             f"and write its peak CUDA memory to the file named by ${PEAK_ENV} (gpu_check.py runs it).")
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(USAGE)
        sys.exit(0)
    if len(sys.argv) < 3 or sys.argv[1] != "--peak":
        raise SystemExit(USAGE)
    peak_wrapper(sys.argv[2], sys.argv[3:])
