"""The run folder: creating it, and writing files so that a half-written one never looks complete.

A run folder is complete when it holds metrics.json, which is written last and atomically.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

import yaml

from solotune.errors import SolotuneError

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"


@contextlib.contextmanager
def run_folder(requested: str | None):
    """Create the run folder (default runs/<date>-<time>) for the duration of a run.

    A folder holding a finished run is refused. If the run fails with a user error, a folder
    that this run created is removed again, so nothing half-written is left behind, unless it
    holds a checkpoint to resume from (the run was stopped, or failed after saving one).
    """
    path = Path(requested) if requested else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if (path / METRICS_FILE).exists():
        raise SolotuneError(f"{path} already holds a finished run; choose another --output-dir")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SolotuneError(f"cannot write to output folder {path}: {e.strerror}") from None
    try:
        yield path
    except SolotuneError:
        if created and not any((path / "checkpoints").glob("step-*")):
            shutil.rmtree(path, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(path: Path):
    """A temporary name beside `path` to write to, renamed to `path` only when the block ends
    without an error (and removed when it does not), so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and a rename, so readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, data: dict) -> None:
    """JSON with NaN and infinities written as null: they are not JSON, and strict readers refuse them."""
    write_atomic(path, json.dumps(_finite(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_yaml(path: Path, data: dict) -> None:
    write_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def machine_info() -> dict:
    """CPU model, core count and memory of this machine (Linux /proc; best effort elsewhere)."""
    info = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "memory_gib": None}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
            info["cpu"],
        )
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return info


GRID_FILE = "grid.json"  # an ablation grid's axes and cells (ablate.py)
CELLS_DIR = "cells"  # a grid's run folders, one per cell, by name


def grid_of(run_dir: Path) -> Path | None:
    """The grid folder a run folder is a cell of, if it is one."""
    grid = run_dir.parent.parent
    return grid if run_dir.parent.name == CELLS_DIR and (grid / GRID_FILE).is_file() else None
