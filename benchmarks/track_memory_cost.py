"""What the memory breakdown costs on the CPU overhead proxy: `--train.track-memory` always,
off and peak (the default), alternating, each run its own process (setsid), medians.

The proxy of `overhead_proxy.py` (16 layers x hidden 64, micro-batch 8 of 46-66 tokens), 256
records: 32 steps. `peak` follows the steps that can set the peak (the first, and any step larger
than every earlier one in positions or in attention area); how many it followed is printed.

    setsid .venv/bin/python benchmarks/track_memory_cost.py --repeats 4 --out benchmarks/results/track_memory_cost-<machine>-<date>.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from overhead_proxy import SHAPE, short_records

from solotune.testing import save_model_folder

MODES = ("always", "off", "peak")


def run(model: Path, data: Path, out: Path, mode: str) -> dict:
    cmd = [sys.executable, "-m", "solotune.cli", "train", "--model", str(model), "--data", str(data),
           "--max-len", "64", "--batch", "8", "--mp", "off", "--no-generate.enabled",
           "--train.track-memory", mode, "--output-dir", str(out)]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run(cmd, check=True, capture_output=True, start_new_session=True, env=env)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", help="also write the table here (markdown)")
    args = parser.parse_args()
    speeds = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        model = save_model_folder(Path(tmp) / "deep-tiny", **SHAPE)
        data = Path(tmp) / "records.json"
        data.write_text(json.dumps(short_records(args.records)))
        for i in range(args.repeats):
            for mode in MODES:
                m = run(model, data, Path(tmp) / f"{mode}-{i}", mode)
                speeds[mode].append(m["train"]["tokens_per_s"])
                followed = f"{m['memory']['tracked_steps']} of {m['train']['steps']}"
                print(f"[{i + 1}/{args.repeats}] {mode}: {speeds[mode][-1]:,.0f} tokens/s, steps followed {followed}")
    off = statistics.median(speeds["off"])
    rows = [
        f"| {mode} | {statistics.median(v):,.0f} | {' / '.join(f'{x:,.0f}' for x in v)} | "
        f"{statistics.median(v) / off:.2f}x |"
        for mode, v in speeds.items()
    ]
    table = "\n".join(["| --train.track-memory | tokens/s (median) | runs | against off |", "|---|---|---|---|", *rows])
    header = (
        f"# The memory breakdown's cost on the CPU overhead proxy, {datetime.date.today()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs\n\n`setsid .venv/bin/python benchmarks/track_memory_cost.py "
        f"--repeats {args.repeats}`: {args.records} records, fp32; peak followed {followed} steps.\n\n"
    )
    print(table)
    if args.out:
        Path(args.out).write_text(header + table + "\n")


if __name__ == "__main__":
    main()
