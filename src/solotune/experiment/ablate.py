"""The technique grid: every combination of the chosen axes, each cell a `solotune train` subprocess.

Every cell shares the base configuration (model, data, order, seed, steps, effective batch), so
cells differ only in the technique. A separate process per cell gives each its own peak memory,
and lets a cell that runs out of memory or crashes become an `X` row while the grid goes on.
Results are written as each cell finishes; `--resume` runs only the cells without a result.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from solotune import artifacts
from solotune.artifacts import CELLS_DIR, GRID_FILE
from solotune.config import RunConfig, config_paths, to_dict, validate
from solotune.errors import OUT_OF_MEMORY_EXIT, SolotuneError
from solotune.fastpaths.registry import FAST_PATHS
from solotune.fastpaths.technique import FastPath
from solotune.model.precision import sixteen_bit

RESULTS_FILE = "results.json"  # each finished cell's status
BASE_CONFIG_FILE = "base.yaml"  # the configuration every cell shares


@dataclass(frozen=True)
class Axis:
    """One technique switch: its values and the config overrides each value means."""

    key: str
    label: str  # as in the reference table
    values: tuple[str, ...]
    overrides: Callable[[RunConfig, str], dict]


def fast_path_axis(path: FastPath) -> Axis:
    """A fast path's ON and OFF cells (fastpaths/technique.py)."""

    def overrides(cfg: RunConfig, value: str) -> dict:
        return {f"train.{path.field}": path.on_value(cfg.train) if value == "ON" else path.off}

    return Axis(path.axis, path.label, ("OFF", "ON"), overrides)


AXES = {
    "ga": Axis("ga", "GA", ("OFF", "ON"), lambda c, v: {"train.grad_accum": c.train.batch if v == "ON" else 1}),
    "mp": Axis("mp", "MP", ("OFF", "ON"), lambda c, v: {"precision.mp": sixteen_bit(c.device) if v == "ON" else "off"}),
    "lora": Axis("lora", "LoRA", ("OFF", "ON"), lambda c, v: {"lora.enabled": v == "ON"}),
    "gc": Axis("gc", "GC", ("OFF", "ON"), lambda c, v: {"train.grad_checkpointing": v == "ON"}),
    # The fast paths, each against its plain form: an axis per registered path.
    **{path.axis: fast_path_axis(path) for path in FAST_PATHS},
    "sdrop": Axis("sdrop", "Shared dropout", ("OFF", "ON"), lambda c, v: {"lora.shared_dropout": v == "ON"}),
    # The frozen base in 4 bits (QLoRA; needs LoRA), 8-bit optimizer moments, and the old fp32
    # storage of frozen weights under mixed precision (an fp32 copy plus autocast's 16-bit one).
    "quant": Axis("quant", "4-bit base", ("OFF", "ON"), lambda c, v: {"quant.method": "nf4" if v == "ON" else "none"}),
    "optim": Axis(
        "optim", "8-bit optim", ("OFF", "ON"), lambda c, v: {"train.optim": "adamw8bit" if v == "ON" else "adamw"}
    ),
    "base": Axis(
        "base", "FP32 base", ("OFF", "ON"), lambda c, v: {"precision.base_dtype": "fp32" if v == "ON" else "auto"}
    ),
    # The training objective, on preference pairs (the built-in ones unless --data): SFT on the
    # chosen answers against DPO, ORPO and SimPO (training/objective.py).
    "method": Axis(
        "method",
        "Objective",
        ("SFT", "DPO", "ORPO", "SimPO"),
        lambda c, v: {"pref.method": v.lower(), "data.format": "preference"},
    ),
    # Compiled cells run the steps the memory tracker follows eager, the others compiled.
    "compile": Axis("compile", "Compile", ("OFF", "ON"), lambda c, v: {"train.compile": v.lower()}),
}


@dataclass
class Cell:
    name: str  # e.g. "ga-off_mp-on_lora-on"
    values: dict[str, str]  # axis key -> value
    overrides: dict  # dotted config path -> value


def parse_axes(text: str) -> list[Axis]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in AXES]
    if unknown or not keys:
        raise SolotuneError(f"--axes: unknown axis {', '.join(unknown) or '(none)'}; choose from {', '.join(AXES)}")
    return [AXES[k] for k in keys]


def plan_cells(cfg: RunConfig, axes: list[Axis]) -> list[Cell]:
    """Every combination, the first axis varying slowest (the reference table's column order)."""
    cells = []
    for combo in itertools.product(*(a.values for a in axes)):
        values = {a.key: v for a, v in zip(axes, combo)}
        overrides = {}
        for a, v in zip(axes, combo):
            overrides.update(config_paths(a.overrides(cfg, v), f"ablate axis {a.key}"))
        cells.append(Cell("_".join(f"{k}-{v.lower()}" for k, v in values.items()), values, overrides))
    return cells


def cell_argv(base_yaml: Path, cell_dir: Path, cell: Cell) -> list[str]:
    """The `solotune train` command line of one cell."""
    argv = [sys.executable, "-m", "solotune.cli", "train", str(base_yaml), "--output-dir", str(cell_dir)]
    for path, value in cell.overrides.items():
        flag = "--" + path.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            argv += [flag, str(value)]
    return argv


class GridWatch(Protocol):
    """What follows a running grid (report.LiveReport): each cell's start, progress and end."""

    def cell_started(self, name: str) -> None: ...

    def cell_progress(self, step: int, steps: int, loss: float | None) -> None: ...

    def cell_finished(self, seconds: float) -> None: ...


# The cell's progress bar on stderr (training/loop.py): "train:  33%|...| 1/3 [...loss=0.6931, ...]"
PROGRESS = re.compile(rb"train:[^\r\n]*?\| *(\d+)/(\d+) \[[^\]]*?loss=([0-9.]+)")


def run_cell(argv: list[str], cell_dir: Path, timeout_s: float | None, watch: GridWatch | None = None) -> dict:
    """Run one cell, streaming its progress (to the terminal and to `watch`); return its outcome
    (ok, or X with the reason)."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tail = b""
    with open(cell_dir / "log.txt", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.PIPE)
        try:
            while chunk := os.read(proc.stderr.fileno(), 4096):
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
                log.write(chunk)
                tail = (tail + chunk)[-4000:]
                if watch and (steps := PROGRESS.findall(tail)):
                    step, total, loss = steps[-1]
                    watch.cell_progress(int(step), int(total), float(loss))
                if timeout_s and time.perf_counter() - start > timeout_s:
                    proc.kill()
            code = proc.wait()
        except BaseException:
            proc.kill()
            raise
    outcome = {"cell_s": time.perf_counter() - start}
    if code == 0 and (cell_dir / artifacts.METRICS_FILE).is_file():
        return {**outcome, "status": "ok"}
    return {**outcome, "status": "X", "reason": failure_reason(code, tail.decode("utf-8", "replace"))}


def failure_reason(code: int, stderr_tail: str) -> str:
    """A short reason for a failed cell: OOM, killed, or the error's last line."""
    lines = [line.strip() for line in stderr_tail.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("solotune: error:")]
    last = (errors or lines or ["(no output)"])[-1].removeprefix("solotune: error: ")
    if code == OUT_OF_MEMORY_EXIT:
        return f"OOM ({last.removeprefix('out of memory: ')[:120]})"
    if code < 0:
        return f"killed by signal {-code}" + (" (likely the kernel's OOM killer)" if code == -9 else "")
    return last[:200]


def run_grid(
    cfg: RunConfig,
    axes: list[Axis],
    grid_dir: Path | None,
    resume: bool,
    timeout_s: float | None,
    watch: Callable[[Path, int], GridWatch] | None = None,
) -> Path:
    """Run (or finish) a grid; returns its folder. `watch(grid_dir, cells to run)`: what follows
    the cells as they run (the live report)."""
    if resume:
        if not (grid_dir / GRID_FILE).is_file():
            raise SolotuneError(f"--resume {grid_dir}: not an ablation grid folder (no {GRID_FILE})")
        grid = artifacts.read_json(grid_dir / GRID_FILE)
        cells = [Cell(c["name"], c["values"], c["overrides"]) for c in grid["cells"]]
    else:
        validate(cfg)
        grid_dir = grid_dir or Path("runs") / datetime.now().strftime("ablate-%Y%m%d-%H%M%S")
        cfg.output_dir = None  # each cell gets its own folder inside the grid
        if (grid_dir / GRID_FILE).exists():
            raise SolotuneError(f"{grid_dir} already holds a grid; use --resume {grid_dir} to finish it")
        grid_dir.mkdir(parents=True, exist_ok=True)
        cells = plan_cells(cfg, axes)
        artifacts.write_yaml(grid_dir / BASE_CONFIG_FILE, to_dict(cfg))
        artifacts.write_json(
            grid_dir / GRID_FILE,
            {
                "axes": [{"key": a.key, "label": a.label, "values": list(a.values)} for a in axes],
                "cells": [vars(c) for c in cells],
            },
        )
    results_path = grid_dir / RESULTS_FILE
    results = artifacts.read_json(results_path) if results_path.exists() else {}
    todo = [c for c in cells if c.name not in results]
    print(f"grid {grid_dir}: {len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run")
    follower = watch(grid_dir, len(todo)) if watch else None
    start = time.perf_counter()
    for i, cell in enumerate(todo, start=1):
        eta = (time.perf_counter() - start) / (i - 1) * (len(todo) - i + 1) if i > 1 else None
        print(
            f"\n=== cell {i}/{len(todo)}: {cell.name}" + (f"  (grid ETA {eta / 60:.1f} min)" if eta else ""), flush=True
        )
        cell_dir = grid_dir / CELLS_DIR / cell.name
        if follower:
            follower.cell_started(cell.name)
        argv = cell_argv(grid_dir / BASE_CONFIG_FILE, cell_dir, cell)
        results[cell.name] = run_cell(argv, cell_dir, timeout_s, follower)
        artifacts.write_json(results_path, results)
        if follower:
            follower.cell_finished(results[cell.name]["cell_s"])
        print(f"=== cell {cell.name}: {cell_summary(results[cell.name], cell_dir)}", flush=True)
    return grid_dir


def cell_summary(outcome: dict, cell_dir: Path) -> str:
    """One line for the terminal: X and why, or the cell's headline numbers."""
    if outcome["status"] == "X":
        return f"X ({outcome['reason']})"
    m = artifacts.read_json(cell_dir / artifacts.METRICS_FILE)
    return (
        f"peak {m['memory']['peak_mib']:,.0f} MiB, loop {m['train']['runtime_s']:.1f} s, "
        f"{m['train']['tokens_per_s']:.0f} tokens/s, average loss {m['train']['avg_loss']:.4f}"
    )
