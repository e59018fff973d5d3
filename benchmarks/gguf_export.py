"""`solotune export` of the embedded default (SmolLM2-135M-Instruct) in each type: the file's
size, the export's seconds, and how far the file read back by transformers' GGUF loader is from
the fp32 Hugging Face model (largest logit difference on the evaluation prompts, relative to the
largest logit; greedy tokens that agree).

    setsid .venv/bin/python benchmarks/gguf_export.py --out benchmarks/results/gguf_export-cpu-<machine>-<date>.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from solotune.config import REFERENCE_PROMPTS, ModelConfig
from solotune.model.models import resolve_model_source
from solotune.run.export import export_gguf

TYPES = ("f16", "bf16", "q8_0", "q4_0")
NEW_TOKENS = 16


def compare(reference, exported, tokenizer) -> tuple[float, int]:
    """(largest logit difference / largest logit, greedy tokens equal before the first that differs)."""
    gap = scale = 0.0
    agree = 0
    with torch.no_grad():
        for prompt in REFERENCE_PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")
            a, b = reference(**ids).logits, exported(**ids).logits
            gap, scale = max(gap, (a - b).abs().max().item()), max(scale, a.abs().max().item())
            n = ids["input_ids"].shape[1]
            ga, gb = (
                m.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, n:].tolist()
                for m in (reference, exported)
            )
            agree += next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), min(len(ga), len(gb)))
    return gap / scale, agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table here (markdown)")
    args = parser.parse_args()
    source = resolve_model_source(ModelConfig())
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for gguf_type in TYPES:
            path = Path(tmp) / f"smollm2-{gguf_type}.gguf"
            result = export_gguf(path, gguf_type, model=source)
            exported = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32).eval()
            relative, agree = compare(reference, exported, tokenizer)
            rows.append(
                f"| {gguf_type} | {result.mib:,.1f} | {result.seconds:.1f} | {relative:.2e} "
                f"| {agree} of {NEW_TOKENS * len(REFERENCE_PROMPTS)} |"
            )
            print(rows[-1], flush=True)
            path.unlink()
    table = "\n".join(
        [
            "| type | MiB | export s | largest logit difference / largest logit | greedy tokens agreeing |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    header = (
        f"# solotune export of SmolLM2-135M-Instruct, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}\n\n`setsid .venv/bin/python benchmarks/gguf_export.py`. Read back with transformers' "
        f"GGUF loader; compared with the fp32 model on the {len(REFERENCE_PROMPTS)} evaluation prompts "
        f"({NEW_TOKENS} greedy tokens each, counted up to the first that differs).\n\n"
    )
    print(table)
    if args.out:
        Path(args.out).write_text(header + table + "\n")


if __name__ == "__main__":
    main()
