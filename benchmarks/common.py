"""Shared by the benchmark scripts: the machine description every JSON line carries."""
from __future__ import annotations

import os
import platform
from typing import Any

import torch


def machine_info(device: str, **extra: Any) -> dict[str, Any]:
    """CPU count, torch version, device (GPU name on cuda), platform and torch threads, plus ``extra``."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "device": device,
                            "platform": platform.platform(), "threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info.update(extra)
    return info


def progress(iterable: Any, desc: str, total: int | None = None) -> Any:
    """``iterable`` with a tqdm progress bar on stderr when stderr is a terminal (silent otherwise)."""
    import sys  # noqa: PLC0415

    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, disable=not sys.stderr.isatty())
