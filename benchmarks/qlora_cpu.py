"""QLoRA on the embedded default: what the 4-bit base holds, and how its loss follows LoRA's.

Two parts, each run a `solotune train` process of its own:

1. Parameter memory under bf16 (the measured `parameters` part of the breakdown, and the
   quantized linear layers' own storage): LoRA on a bf16 base vs NF4 / FP4 (double quantization,
   bf16 compute) and int8. One short step each: parameters do not depend on the workload, and
   bf16 is emulated (slow) on CPUs without AVX512-BF16.
2. Loss curves over the same steps, fp32 compute (fast here): LoRA vs QLoRA NF4, and 8-bit AdamW,
   on the first N Alpaca records in file order.

    setsid .venv/bin/python benchmarks/qlora_cpu.py --data ../shared/data/alpaca_en_demo.json
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

MEMORY_RUNS = {
    "LoRA, bf16 base": [],
    "QLoRA NF4, double quant": ["--quant", "nf4"],
    "QLoRA NF4, no double quant": ["--quant", "nf4", "--no-quant.double-quant"],
    "QLoRA FP4, double quant": ["--quant", "fp4"],
    "int8 base": ["--quant", "int8"],
}
CURVE_RUNS = {
    "LoRA": [],
    "QLoRA NF4": ["--quant", "nf4"],
    "QLoRA NF4 + 8-bit AdamW": ["--quant", "nf4", "--optim", "adamw8bit"],
    "LoRA + 8-bit AdamW": ["--optim", "adamw8bit"],
}


def train(extra: list[str], common: list[str], out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "solotune.cli",
        "train",
        *common,
        "--no-generate.enabled",
        "--output-dir",
        str(out),
        *extra,
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def memory_part(args, tmp: Path) -> list[str]:
    common = [
        "--data",
        args.data,
        "--samples",
        "4",
        "--batch",
        "2",
        "--max-len",
        "128",
        "--max-steps",
        "1",
        "--mp",
        "bf16",
    ]
    rows, base = [], None
    for name, extra in MEMORY_RUNS.items():
        m = train(extra, common, tmp / f"mem-{len(rows)}")
        params = m["memory"]["parameters_mib"]
        base = base or params
        q = m.get("quantized_linears")
        linears = (
            f"{(q['weight_bytes'] + q['state_bytes']) / 2**20:,.1f} ({100 * q['fraction_of_16bit']:.1f}%)" if q else "–"
        )
        rows.append(f"| {name} | {params:,.1f} | {100 * params / base:.1f}% | {linears} | {m['params']['total']:,} |")
    return [
        "| run (bf16) | parameters MiB (measured) | vs LoRA bf16 | quantized linears MiB (% of their bf16 size) | all params |",
        "|---|---|---|---|---|",
        *rows,
    ]


def curve_part(args, tmp: Path) -> list[str]:
    common = [
        "--data",
        args.data,
        "--samples",
        str(args.records),
        "--batch",
        "8",
        "--max-len",
        "512",
        "--mp",
        "off",
        "--no-train.shuffle",
        "--train.warmup-ratio",
        "0",
    ]
    curves, rows = {}, []
    for name, extra in CURVE_RUNS.items():
        m = train(extra, common, tmp / f"curve-{len(rows)}")
        t = m["train"]
        curves[name] = t["loss_curve"]
        rows.append((name, t, m["memory"]))
    ref = curves["LoRA"]
    lines = [
        "| run (fp32) | avg loss | final loss | max per-step loss difference vs LoRA | tokens/s | parameters MiB | optimizer state MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t, mem in rows:
        diff = max(abs(a - b) / b for a, b in zip(curves[name], ref))
        lines.append(
            f"| {name} | {t['avg_loss']:.4f} | {t['final_loss']:.4f} | {100 * diff:.2f}% | {t['tokens_per_s']:.0f} | "
            f"{mem['parameters_mib']:,.1f} | {mem['optimizer_state_mib']:,.2f} |"
        )
    lines.append("")
    lines.append("loss curves: " + json.dumps({k: [round(x, 4) for x in v] for k, v in curves.items()}))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/alpaca_en_demo.json")
    parser.add_argument("--records", type=int, default=64)
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        lines = memory_part(args, Path(tmp)) + [""] + curve_part(args, Path(tmp))
    print(
        f"# QLoRA on the embedded default, {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
