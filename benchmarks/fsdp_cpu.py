"""Full fine-tuning on one process against two FSDP2 processes (torchrun, gloo), on the CPU:
losses, the measured breakdown of rank 0, and `solotune estimate` for each.

A tiny Llama (hidden 128, 4 layers, random weights) on 16 records of exactly 128 tokens, 2 steps
of batch 4, fp32; the one process runs --grad-accum 2, so both run the same micro-batches.
Each command is started with setsid, one after the other.

    setsid .venv/bin/python benchmarks/fsdp_cpu.py --out benchmarks/results/fsdp-cpu-<machine>-<date>.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from solotune.config import RunConfig
from solotune.experiment.estimate import estimate_memory, model_config
from solotune.testing import save_model_folder

SEQ = 128  # prompt 100 + response 27 + EOS
PARTS = ("tracked_peak_mib", "parameters_mib", "gradients_mib", "optimizer_state_mib", "activations_mib")
RUNS = {"one process, --grad-accum 2": (1, 2), "rank 0 of two, FSDP2": (2, 1)}


def train(model: Path, data: Path, out: Path, nproc: int, grad_accum: int) -> tuple[dict, float, list[str]]:
    cmd = [sys.executable, "-m", "solotune.cli", "train", "--model", str(model), "--data", str(data), "--no-lora",
           "--mp", "off", "--batch", "4", "--max-steps", "2", "--no-generate.enabled", "--train.track-memory", "always",
           "--grad-accum", str(grad_accum), "--nproc", str(nproc), "--output-dir", str(out)]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, start_new_session=True)
    return json.loads((out / "metrics.json").read_text()), time.perf_counter() - start, cmd[3:]


def estimate(model: Path, nproc: int, grad_accum: int) -> dict:
    cfg = RunConfig()
    cfg.model.name, cfg.lora.enabled, cfg.precision.mp = str(model), False, "off"
    cfg.train.batch, cfg.train.grad_accum, cfg.nproc = 4, grad_accum, nproc
    return estimate_memory(model_config(str(model)), cfg, SEQ).parts_mib


def row(name: str, source: str, mem: dict) -> str:
    state = " / ".join(f"{v:.2f}" for v in mem["state_after_update"].values())
    return f"| {name} | {source} | " + " | ".join(f"{mem[k]:.2f}" for k in PARTS) + f" | {state} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table here (markdown)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = save_model_folder(Path(tmp) / "m", hidden_size=128, num_hidden_layers=4)
        data = Path(tmp) / "data.json"
        data.write_text(json.dumps([{"prompt": "p" * 100, "response": "r" * 27}] * 16))
        lines, commands = [], []
        for name, (nproc, grad_accum) in RUNS.items():
            metrics, seconds, cmd = train(model, data, Path(tmp) / f"run{nproc}", nproc, grad_accum)
            commands.append("solotune " + " ".join(cmd).replace(tmp, "<tmp>"))
            curve = " / ".join(f"{x:.6f}" for x in metrics["train"]["loss_curve"])
            lines += [
                row(name, "measured", metrics["memory"]),
                row("", "estimated", estimate(model, nproc, grad_accum)),
            ]
            lines.append(f"| | losses {curve}; whole command {seconds:.1f} s | | | | | | |")
    table = [
        f"# Full fine-tuning, one process against two FSDP2 processes ({datetime.date.today()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs)",
        "",
        "`python benchmarks/fsdp_cpu.py`, which ran:",
        "",
        *(f"    {c}" for c in commands),
        "",
        "MiB, from the tensor tracker (rank 0 for the two processes); state after update: parameters / "
        "gradients / optimizer state right after an optimizer step.",
        "",
        "| run | | tensor peak | parameters | gradients | optimizer state | activations | state after update |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
    ]
    print("\n".join(table))
    if args.out:
        Path(args.out).write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
