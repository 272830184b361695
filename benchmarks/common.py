"""What the benchmark scripts share: tables, fresh-process variants, memory and time probes."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Re-exported: the scripts call them as common.percentile etc.
from benchmarks.summary import median as median
from benchmarks.summary import percentile as percentile
from benchmarks.summary import write_json as write_json

GIB = 1024**3
REPO_ROOT = Path(__file__).resolve().parent.parent
# A child process reports its numbers as one stdout line with this prefix.
RESULT_PREFIX = "BENCH-RESULT "


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}"


def machine() -> str:
    """One line naming the machine a table came from."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{device}; torch {torch.__version__}; {platform.machine()} {platform.system()}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- CPU memory: peak RSS of this process ------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """High-water mark of the resident set since start or the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the RSS afterwards is what
    is still alive (glibc otherwise keeps freed small/medium blocks mapped)."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Linux ≥ 4.0: ``echo 5 > /proc/self/clear_refs``).

    Returns False where that is not allowed; the peak then still includes loading."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# --- fresh-process variants ---------------------------------------------------------------------


def emit_result(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: Path, args: Sequence[str], timeout: float | None) -> dict[str, Any]:
    """Run ``script`` with ``args`` in a fresh Python process and return its result line.

    A child that fails (out of memory, timeout, exception) gives ``{"error": ...}``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, str(script), *args]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return result
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit code {done.returncode}: {' | '.join(tail)}"}
