"""Does Llama-2-7B train in 8 GB with a 4-bit base? `solotune estimate`, from the config alone.

NF4 (with and without double quantization) and int8 bases against a bf16 base: LoRA r=16 on
q, k, v, bf16 compute, gradient checkpointing, micro-batch 8 x 512 tokens, the CUDA overhead
`estimate` adds by default. Each row is one `estimate_memory` call (about 20 s on a CPU).

    setsid .venv/bin/python benchmarks/qlora_7b.py --out benchmarks/results/qlora_7b-<machine>-<date>.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import warnings
from pathlib import Path

from solotune.config import DEFAULT_CUDA_OVERHEAD_MIB, RunConfig
from solotune.experiment.estimate import estimate_memory, model_config

GPU_MIB = 8e9 / 2**20  # 8 GB as sold
SEQ_LEN = 512
ROWS = [  # (label, quantization method, double quantization)
    ("LoRA, bf16 base", "none", True),
    ("QLoRA NF4, double quant", "nf4", True),
    ("QLoRA NF4, no double quant", "nf4", False),
    ("int8 base", "int8", True),
]


def row(label: str, method: str, double_quant: bool) -> str:
    cfg = RunConfig()
    cfg.precision.mp = "bf16"
    cfg.train.grad_checkpointing = True
    cfg.quant.method, cfg.quant.double_quant = method, double_quant
    est = estimate_memory(model_config("llama2-7b"), cfg, SEQ_LEN)
    p, total = est.parts_mib, est.total_mib(DEFAULT_CUDA_OVERHEAD_MIB)
    verdict = f"fits ({GPU_MIB - total:+,.0f} MiB)" if total <= GPU_MIB else "no"
    return (
        f"| {label} | {p['parameters_mib']:,.1f} | {p['optimizer_state_mib']:,.1f} | {p['activations_mib']:,.1f} "
        f"| {p['tracked_peak_mib']:,.1f} | {total:,.1f} | {verdict} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    lines = [
        f"# Llama-2-7B with a 4-bit base in 8 GB ({datetime.date.today()}, {platform.machine()}, "
        f"{platform.processor() or 'cpu'})",
        "",
        f"`python benchmarks/qlora_7b.py`: bf16, checkpointing, micro-batch 8 x {SEQ_LEN}, LoRA r=16 on q, k, v; MiB.",
        "",
        f"| configuration | parameters | optimizer state | activations | tensor peak "
        f"| + {DEFAULT_CUDA_OVERHEAD_MIB:.0f} MiB overhead | 8 GB ({GPU_MIB:,.0f} MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for label, method, double_quant in ROWS:
        lines.append(row(label, method, double_quant))
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
