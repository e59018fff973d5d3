"""Peak CUDA memory and speed of solotune's training switches, one process per configuration.

The model has the shape of SmolLM2-135M (or Llama-2-7B with --shape llama2-7b) with random
weights and a byte-level tokenizer, so no download is needed; memory depends on the shapes,
not on the values. Data: the built-in data set (about 230 byte-tokens per record), batch 8.

    python benchmarks/cuda_memory.py --steps 6 --out results.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from solotune.testing import save_model_folder

SHAPES = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
}
CONFIGS = {
    "LoRA fp32": [],
    "LoRA bf16": ["--mp", "bf16"],
    "LoRA fp16": ["--mp", "fp16"],
    "LoRA fp16, fp32 base (reference setup)": ["--mp", "fp16", "--base-dtype", "fp32"],
    "LoRA fp32 + grad accum 8": ["--grad-accum", "8"],
    "LoRA fp32 + checkpointing": ["--grad-checkpointing"],
    "full fp32": ["--no-lora"],
    "full bf16 autocast": ["--no-lora", "--mp", "bf16"],
}


def run_one(model_dir: Path, out: Path, extra: list[str], steps: int, device: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "solotune.cli",
        "train",
        "--model",
        str(model_dir),
        "--output-dir",
        str(out),
        "--max-steps",
        str(steps),
        "--no-generate.enabled",
        "--mp",
        "off",
        "--device",
        device,
        *extra,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads((out / "metrics.json").read_text())


def row(name: str, m: dict) -> str:
    if "error" in m:
        return f"| {name} | X ({m['error'][:60]}) |||||||"
    mem, t = m["memory"], m["train"]
    reserved = mem["reserved_mib"] if mem["reserved_mib"] is not None else float("nan")
    return (
        f"| {name} | {mem['peak_mib']:,.0f} | {reserved:,.0f} | {mem['parameters_mib']:,.0f} | "
        f"{mem['gradients_mib']:,.1f} | {mem['optimizer_state_mib']:,.1f} | {mem['activations_mib']:,.0f} | "
        f"{t['tokens_per_s']:,.0f} | {t['avg_loss']:.4f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=SHAPES)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", nargs="*", help="names of CONFIGS to run (default: all)")
    parser.add_argument("--out", type=Path, help="write all metrics here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        save_model_folder(model_dir, initializer_range=0.02, **SHAPES[args.shape])
        results = {}
        print(
            "| configuration | peak allocated MiB | reserved MiB | parameters | gradients | optimizer state "
            "| activations | tokens/s | avg loss |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for i, (name, extra) in enumerate(CONFIGS.items()):
            if args.only and name not in args.only:
                continue
            results[name] = run_one(model_dir, Path(tmp) / f"run{i}", extra, args.steps, args.device)
            print(row(name, results[name]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
