"""What the loop's optional switches cost or buy: the memory breakdown's per-op hook, torch.compile.

The same `solotune train` run (the embedded default, the first N Alpaca records in file order,
LoRA r=16 on q, k, v, effective batch 8, fp32 on a CPU without native bf16) with:

- default: everything on, the memory breakdown included;
- no breakdown: `--no-train.track-memory` (the measured peak only);
- compile: `--train.compile --no-train.track-memory` (each decoder layer compiled; the compile
  time is reported apart from the loop's runtime).

Each run is its own process; variants alternate over the repeats:

    setsid .venv/bin/python benchmarks/loop_switches.py --data ../shared/data/alpaca_en_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = {
    "default": [],
    "no breakdown": ["--no-train.track-memory"],
    "compile": ["--train.compile", "--no-train.track-memory"],
}


def run(variant: str, args, out_dir: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "solotune.cli",
        "train",
        "--data",
        args.data,
        "--samples",
        str(args.records),
        "--max-len",
        str(args.max_len),
        "--batch",
        "8",
        "--grad-accum",
        str(8 // args.micro),
        "--no-train.shuffle",
        "--precision.mp",
        args.mp,
        "--no-generate.enabled",
        "--output-dir",
        str(out_dir),
    ] + VARIANTS[variant]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    m = json.loads((out_dir / "metrics.json").read_text())
    t = m["train"]
    steady = sorted(t["step_seconds"][1:])  # the first step warms up (and, compiled, may still recompile)
    return {
        "tokens_per_s": t["tokens_per_s"],
        "loop_s": t["runtime_s"],
        "compile_s": t["compile_s"],
        "median_step_s": steady[len(steady) // 2],
        "peak_mib": m["memory"]["peak_mib"],
        "avg_loss": t["avg_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/alpaca_en_demo.json")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--micro", type=int, default=8, help="micro-batch size (accumulation = 8 / micro)")
    parser.add_argument("--mp", default="off", help="--precision.mp of every run")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    rows = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for v in VARIANTS:
                start = time.perf_counter()
                rows[v].append(run(v, args, Path(tmp) / f"{v}-{r}".replace(" ", "-")))
                print(f"  {v} ({r + 1}/{args.repeats}): {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(
        f"# loop switches, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {args.records} records, micro-batch {args.micro}, mp {args.mp}\n"
    )
    print("| variant | tokens/s | median step s | loop s | compile s | peak RSS MiB | avg loss | tokens/s vs default |")
    print("|---|---|---|---|---|---|---|---|")
    base = sum(r["tokens_per_s"] for r in rows["default"]) / args.repeats
    for v, runs in rows.items():
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        print(
            f"| {v} | {mean['tokens_per_s']:.0f} | {mean['median_step_s']:.2f} | {mean['loop_s']:.0f} | "
            f"{mean['compile_s']:.0f} | {mean['peak_mib']:,.0f} | {mean['avg_loss']:.4f} | "
            f"{mean['tokens_per_s'] / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
