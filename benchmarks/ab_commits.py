"""Did a change regress? The same `solotune train` run from an earlier commit and from the working
tree, alternating, each run its own process (setsid), medians over the repeats.

The earlier commit is checked out into a temporary git worktree and imported from there; both
sides use this virtual environment's libraries. The default run is the vs_trl.py workload at
its same-settings point: the embedded default, the first 64 Alpaca records in file order, LoRA
r=16 on q, k, v, micro-batch 8, fp32.

    setsid .venv/bin/python benchmarks/ab_commits.py --base <commit> --out benchmarks/results/ab-<what>-<date>.md
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

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = [
    "--samples", "64", "--max-len", "512", "--lora.r", "16", "--lora.alpha", "32", "--lora.dropout", "0.05",
    "--batch", "8", "--grad-accum", "1", "--epochs", "1", "--no-train.shuffle", "--train.schedule", "linear",
    "--train.warmup-ratio", "0", "--mp", "off", "--device", "cpu", "--no-generate.enabled",
]  # fmt: skip


def run(src: Path, data: str, extra: list[str], out_dir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable,
        "-m",
        "solotune.cli",
        "train",
        "--data",
        data,
        *WORKLOAD,
        *extra,
        "--output-dir",
        str(out_dir),
    ]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    m = json.loads((out_dir / "metrics.json").read_text())
    return {
        "tokens_per_s": m["train"]["tokens_per_s"],
        "peak_mib": m["memory"]["peak_mib"],
        "avg_loss": m["train"]["avg_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the earlier commit")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extra", default="", help="more `solotune train` options for both sides")
    parser.add_argument("--out", help="also write the table here (markdown)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base_tree), args.base], check=True
        )
        try:
            sides = {f"base {args.base}": base_tree / "src", "working tree": ROOT / "src"}
            results: dict[str, list[dict]] = {name: [] for name in sides}
            for i in range(args.repeats):
                for name, src in sides.items():
                    r = run(src, args.data, args.extra.split(), Path(tmp) / f"run-{i}-{len(results[name])}-{name[:4]}")
                    results[name].append(r)
                    print(
                        f"[{i + 1}/{args.repeats}] {name}: {r['tokens_per_s']:.1f} tokens/s, peak {r['peak_mib']:,.0f} MiB",
                        flush=True,
                    )
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
    base, new = med[f"base {args.base}"], med["working tree"]
    lines = [
        f"# solotune train, {args.base} vs the working tree ({datetime.date.today()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs)",
        "",
        f"`python benchmarks/ab_commits.py {' '.join(sys.argv[1:])}`: medians of {args.repeats} alternating runs each",
        "",
        "| side | tokens/s | peak MiB | avg loss |",
        "|---|---|---|---|",
        *(f"| {n} | {m['tokens_per_s']:.1f} | {m['peak_mib']:,.0f} | {m['avg_loss']:.4f} |" for n, m in med.items()),
        "",
        f"working tree / base: {new['tokens_per_s'] / base['tokens_per_s']:.3f}x tokens/s, "
        f"{new['peak_mib'] / base['peak_mib']:.3f}x peak memory",
    ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
