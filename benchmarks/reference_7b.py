"""The reference experiment's memory column, reproduced from Llama-2-7B's config alone.

The reference (a student study, Llama-2-7B, 200 Alpaca samples, A100 80 GB, batch 8) reported
peak memory for LoRA r=16 on q, k, v: 30,151.6 MB in fp32 and 41,590.6 MB with fp16 mixed
precision, and `X` (out of memory) for full fine-tuning. It does not state its sequence length;
64 tokens per sequence reproduces both LoRA figures within 4% (its Alpaca batches were short),
so that is what we assume. Each row is `solotune estimate`, the tensor peak without CUDA overhead (the
study read `torch.cuda.max_memory_allocated`, which holds no CUDA context either). The study's
rows use the plain loop it ran (padded batches, full logits, autograd's SwiGLU, PEFT's dropout);
the last row is solotune's defaults, its loop's techniques on.

    python benchmarks/reference_7b.py | tee benchmarks/results/reference_7b-<machine>-<date>.md
"""

from __future__ import annotations

import datetime
import platform
import warnings

from solotune.config import RunConfig
from solotune.experiment.estimate import estimate_memory, model_config

PLAIN_LOOP = {
    "train.padding_free": False,
    "train.ce_chunk": 0,
    "train.fused_swiglu": False,
    "lora.shared_dropout": False,
}
ROWS = [  # (label, reported MB, config overrides)
    ("LoRA fp32", "30,151.6", {**PLAIN_LOOP, "precision.mp": "off"}),
    (
        "LoRA fp16 autocast, fp32 base (reference setup)",
        "41,590.6",
        {**PLAIN_LOOP, "precision.mp": "fp16", "precision.base_dtype": "fp32"},
    ),
    ("LoRA fp16 autocast, fp16 base", "-", {**PLAIN_LOOP, "precision.mp": "fp16"}),
    ("full fp32 + AdamW", "X (80 GB)", {**PLAIN_LOOP, "precision.mp": "off", "lora.enabled": False}),
    ("LoRA fp16 autocast, fp16 base, solotune's loop (its defaults)", "-", {"precision.mp": "fp16"}),
]


def main(seq_len: int = 64) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    config = model_config("llama2-7b")
    print(
        f"# The reference experiment's memory column from the config alone ({datetime.date.today()}, {platform.machine()})"
    )
    print(f"\n`python benchmarks/reference_7b.py`: Llama-2-7B, batch 8 x {seq_len} tokens, LoRA r=16 on q, k, v\n")
    print(
        "| configuration | reported | estimated tensor peak MiB | fits in 80 GiB (81,920 MiB, with 700 MiB overhead) |"
    )
    print("|---|---|---|---|")
    for label, reported, overrides in ROWS:
        cfg = RunConfig()
        for path, value in overrides.items():
            section, name = path.split(".")
            setattr(getattr(cfg, section), name, value)
        est = estimate_memory(config, cfg, seq_len)
        peak = est.parts_mib["tracked_peak_mib"]
        print(f"| {label} | {reported} | {peak:,.1f} | {'yes' if peak + 700 <= 80 * 1024 else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
