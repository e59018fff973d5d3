"""Estimate (fake tensors, on the CPU) against a real training loop on the GPU.

A SmolLM2-135M-shaped model with random weights, full-length batches of 4 x 256 byte tokens,
two optimizer steps: the estimated tensor peak against the tracker's measurement and against
`torch.cuda.max_memory_allocated`.

    python benchmarks/estimate_vs_cuda.py
"""

from __future__ import annotations

import tempfile
import warnings

from solotune.config import RunConfig
from solotune.data import Record, tokenize_records
from solotune.experiment.estimate import PRESETS, estimate_memory, model_config
from solotune.model.models import load_tokenizer, resolve_model_source
from solotune.model.precision import resolve_policy
from solotune.testing import save_model_folder
from solotune.training.loop import train_loop
from solotune.training.setup import build_model

CONFIGS = {
    "LoRA fp32": {},
    "LoRA bf16": {"mp": "bf16"},
    "LoRA fp32 + checkpointing": {"gc": True},
    "full fp32": {"lora": False},
    "full bf16 autocast": {"lora": False, "mp": "bf16"},
}
SEQ = 256


def make_cfg(model_dir: str, lora=True, mp="off", gc=False) -> RunConfig:
    cfg = RunConfig(device="cuda")
    cfg.model.name, cfg.lora.enabled, cfg.precision.mp, cfg.train.grad_checkpointing = model_dir, lora, mp, gc
    cfg.train.batch, cfg.train.max_steps, cfg.lora.dropout = 4, 2, 0.0
    return cfg


def measure(cfg: RunConfig) -> dict:
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model)
    rows = [Record({"prompt": "p" * 200, "response": "r" * (SEQ - 201)}, str(i)) for i in range(8)]
    examples, _, _ = tokenize_records(rows, tokenizer, cfg.data)
    policy = resolve_policy(cfg.precision, cfg.device, frozen_base=cfg.lora.enabled)
    return train_loop(build_model(source, cfg, policy), examples, tokenizer.pad_token_id, policy, cfg.train).memory


def main() -> None:
    warnings.filterwarnings("ignore")
    shape = {k: v for k, v in PRESETS["smollm2-135m"].items() if k != "model_type"}
    with tempfile.TemporaryDirectory() as tmp:
        save_model_folder(tmp, initializer_range=0.02, **shape)
        print(
            "| configuration | estimated tensor peak MiB | measured tensor peak MiB | max_memory_allocated MiB | estimate / allocated |"
        )
        print("|---|---|---|---|---|")
        for name, kw in CONFIGS.items():
            cfg = make_cfg(tmp, **kw)
            est = estimate_memory(model_config(tmp), cfg, SEQ).parts_mib["tracked_peak_mib"]
            real = measure(cfg)
            print(
                f"| {name} | {est:,.1f} | {real['tracked_peak_mib']:,.1f} | {real['peak_mib']:,.1f} | "
                f"{est / real['peak_mib']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
