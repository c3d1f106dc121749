"""Every benchmark runs exactly as the docs write it: ``python benchmarks/<script>.py [flags]`` from the repository
root (the one convention). Each script's ``--help`` must work from a clean interpreter started in another folder (so
an import error can never hide until a user types the command), and every flag a documented command uses must be
one the script accepts."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if 'if __name__ == "__main__"' in p.read_text())
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"python benchmarks/(\w+)\.py((?:[ \t]+[^\s`|;&]+)*)")


@pytest.fixture(scope="module")
def helps(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """``python benchmarks/<script>.py --help`` of every script, run from an empty folder with no PYTHONPATH."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(script: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), "--help"], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        return dict(zip((p.stem for p in SCRIPTS), pool.map(run, SCRIPTS)))


def test_there_are_benchmarks() -> None:
    assert {"bench_cacher", "bench_engine", "bench_kv", "bench_watches", "gpu_check"} <= {p.stem for p in SCRIPTS}


@pytest.mark.parametrize("script", [p.stem for p in SCRIPTS])
def test_help_runs_from_anywhere(helps, script: str) -> None:
    out = helps[script]
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


def _documented() -> list[tuple[str, str, str]]:
    """``(doc, script, flags)`` of every documented benchmark command (continuation lines joined)."""
    found = []
    for doc in DOCS:
        text = re.sub(r"\\\n\s*", " ", doc.read_text())
        found += [(doc.name, m.group(1), m.group(2)) for m in COMMAND.finditer(text)]
    return found


def test_documented_commands_name_real_scripts_and_flags(helps) -> None:
    documented = _documented()
    assert len(documented) >= 10, "the docs show how to run the benchmarks"
    bad = []
    for doc, script, args in documented:
        if script not in helps:
            bad.append(f"{doc}: benchmarks/{script}.py is not a runnable script")
            continue
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", args):
            if flag not in helps[script].stdout:
                bad.append(f"{doc}: benchmarks/{script}.py has no flag {flag}")
    assert bad == []
