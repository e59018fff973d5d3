"""A Llama-2-7B-shaped training step on one GPU: memory, speed and MFU, against `estimate`.

LoRA r=16 on q, k, v, batch 8 x 512 tokens, bf16: plain, with gradient checkpointing, and QLoRA
(NF4 base, double quantization) with checkpointing. Random weights (no hub needed; memory and
speed depend on shapes, not values), records of random tokens at full length, every position a
target. Each configuration runs `solotune`'s own set-up and loop (`training.setup.prepare_model`,
`loop.train_loop`) in a process of its own, and `solotune estimate`'s simulation of the same
configuration. Reported per configuration: the CUDA allocator's peak over the loop and the
tracked tensor peak, the estimate of both, tokens/s and MFU (model FLOPs over the measured
bf16 matmul peak), end to end and in steady state (the steps after the first WARMUP_STEPS: the
first is the one the memory breakdown follows and the allocator's warm-up). "TRL LoRA bf16" is
the peer on the same shape and batches: TRL's SFTTrainer with PEFT, the model built in the
process from the config, nothing saved.

    python benchmarks/gpu_step.py --out gpu_step.md                      # on a GPU
    python benchmarks/gpu_step.py --shape tiny --device cpu --steps 2     # a dry run on the CPU
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
import warnings

SHAPES = {
    "llama2-7b": dict(model="llama2-7b"),  # estimate's preset: Llama-2-7B's config.json
    "tiny": dict(
        model_type="llama",
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}
CONFIGS = {  # name -> (gradient checkpointing, quantization)
    "LoRA bf16": (False, "none"),
    "LoRA bf16 + checkpointing": (True, "none"),
    "QLoRA NF4 bf16 + checkpointing": (True, "nf4"),
}
PEER = "TRL LoRA bf16"
BATCH, SEQ_LEN = 8, 512
WARMUP_STEPS = 2  # left out of the steady-state figures


def model_config(shape: str):
    from transformers import AutoConfig

    from solotune.experiment.estimate import model_config as preset_config

    settings = dict(SHAPES[shape])
    if "model" in settings:
        return preset_config(settings["model"])
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


def run_config(cfg_name: str, shape: str, device: str, steps: int, seq_len: int) -> dict:
    """One configuration, measured (run in a process of its own)."""
    import torch
    from transformers import AutoModelForCausalLM

    from solotune.config import RunConfig
    from solotune.data import Example
    from solotune.experiment.estimate import estimate_memory
    from solotune.measure.flops import matmul_peak_flops
    from solotune.model.precision import resolve_policy
    from solotune.training.loop import train_loop
    from solotune.training.setup import prepare_model

    checkpointing, quant = CONFIGS[cfg_name]
    cfg = RunConfig(device=device)
    cfg.precision.mp, cfg.train.grad_checkpointing, cfg.quant.method = "bf16", checkpointing, quant
    cfg.train.batch, cfg.train.max_steps, cfg.lora.dropout = BATCH, steps, 0.0
    config = model_config(shape)
    estimate = estimate_memory(config, cfg, seq_len)

    policy = resolve_policy(cfg.precision, device, frozen_base=True)
    torch.manual_seed(0)
    with torch.device(policy.device):  # NF4: quantized where it lies, layer by layer, below
        model = AutoModelForCausalLM.from_config(config, dtype=policy.base_dtype)
    if quant != "none":
        model = quantize_nf4(model, policy.device, policy.compute_dtype)
    model = prepare_model(model, cfg)
    generator = torch.Generator().manual_seed(0)
    examples = [
        Example(ids, list(ids), i)
        for i, ids in enumerate(
            torch.randint(3, config.vocab_size, (BATCH * steps, seq_len), generator=generator).tolist()
        )
    ]
    loop = train_loop(model, examples, pad_id=0, policy=policy, cfg=cfg.train)
    peak_flops = matmul_peak_flops(policy.device, policy.compute_dtype)
    return {
        "config": cfg_name,
        "peak_mib": loop.memory["peak_mib"],
        "tensor_peak_mib": loop.memory["tracked_peak_mib"],
        "estimated_tensor_mib": estimate.parts_mib["tracked_peak_mib"],
        "estimated_peak_mib": estimate.total_mib(0.0 if device == "cpu" else 700.0),
        **speed(loop.tokens, loop.flops, loop.runtime_s, loop.step_seconds, peak_flops),
        "steps": len(loop.losses),
        # the parts, to tell where an estimate is off
        "measured_parts_mib": {k: loop.memory[f"{k}_mib"] for k in PARTS},
        "estimated_parts_mib": {k: estimate.parts_mib[f"{k}_mib"] for k in PARTS},
        "part_max_mib": loop.memory["part_max"],
        "estimated_part_max_mib": estimate.parts_mib.get("part_max"),
        "rehearsal_s": loop.memory["rehearsal_s"],
    }


PARTS = ("parameters", "gradients", "optimizer_state", "activations")


def speed(tokens: int, flops: float, runtime_s: float, step_seconds: list[float], peak_flops: float) -> dict:
    """tokens/s and MFU end to end, and over the steps after the warm-up (every step has the same
    tokens and FLOPs here)."""
    steady = step_seconds[WARMUP_STEPS:] or step_seconds
    share = len(steady) / len(step_seconds)
    return {
        "tokens_per_s": tokens / runtime_s,
        "mfu": flops / runtime_s / peak_flops,
        "steady_tokens_per_s": tokens * share / sum(steady),
        "steady_mfu": flops * share / sum(steady) / peak_flops,
    }


def peer_settings(device: str, steps: int, seq_len: int):
    """TRL's settings for the same batches: micro-batch 8, no accumulation, bf16, no
    checkpointing, records in order, nothing saved or reported."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir="/tmp/trl-gpu-step",
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=2e-4,
        bf16=True,
        use_cpu=device == "cpu",
        max_length=seq_len,
        completion_only_loss=True,
        gradient_checkpointing=False,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def run_peer(shape: str, device: str, steps: int, seq_len: int) -> dict:
    """TRL's SFTTrainer + PEFT LoRA on the same shape, batches and settings (in a process of its own)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTTrainer

    from solotune.data import Example, collate_packed
    from solotune.measure.flops import FlopModel, matmul_peak_flops
    from solotune.measure.memory import PeakMemoryProbe
    from solotune.testing import make_tokenizer

    config = model_config(shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (BATCH * steps, seq_len), generator=generator).tolist()
    rows = [{"input_ids": r, "completion_mask": [1] * len(r)} for r in ids]
    probe, step_seconds = PeakMemoryProbe(torch.device(device)), []

    class Measure(TrainerCallback):
        def on_train_begin(self, *_, **__):
            probe.reset()

        def on_step_begin(self, *_, **__):
            torch.cuda.synchronize() if device == "cuda" else None
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            torch.cuda.synchronize() if device == "cuda" else None
            step_seconds.append(time.perf_counter() - self.start)

    args = peer_settings(device, steps, seq_len)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
    tokenizer = make_tokenizer()  # the records are token ids already: it pads, with id 0
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), peft_config=lora, processing_class=tokenizer
    )
    trainer.add_callback(Measure())
    trainer.train()
    step_flops = FlopModel.of(trainer.model).step_flops([collate_packed([Example(r, r, 0) for r in ids[:BATCH]])])
    peak = probe.read()
    return {
        "config": PEER,
        "peak_mib": peak.peak_mib,
        **speed(
            BATCH * seq_len * steps,
            step_flops * steps,
            sum(step_seconds),
            step_seconds,
            matmul_peak_flops(torch.device(device), torch.bfloat16),
        ),
        "steps": len(step_seconds),
    }


def quantize_nf4(model, device, compute_dtype):
    """Swap every linear layer but the LM head for bitsandbytes' NF4 layer holding its weights
    (double quantization, blocks of 64): what loading with `--quant nf4` builds, from random
    weights instead of a checkpoint."""
    import bitsandbytes as bnb
    import torch

    from solotune.model.quant import BLOCKSIZE_4BIT, keep_4bit_layout_trainable

    for name, linear in list(model.named_modules()):
        if not isinstance(linear, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data,
            requires_grad=False,
            quant_type="nf4",
            blocksize=BLOCKSIZE_4BIT,
            compress_statistics=True,
        )
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, layer)
    model = model.to(device)
    keep_4bit_layout_trainable(model)
    return model


def table(results: list[dict]) -> str:
    rows = [
        "| configuration | allocator peak MiB | tensor peak MiB | estimated tensor MiB (est. / measured) "
        "| estimated peak MiB (est. / measured) | tokens/s | MFU | steady tokens/s | steady MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "tensor_peak_mib" in r:
            tensor = f"{r['tensor_peak_mib']:,.0f}"
            estimates = (
                f"{r['estimated_tensor_mib']:,.0f} ({r['estimated_tensor_mib'] / r['tensor_peak_mib']:.3f}) | "
                f"{r['estimated_peak_mib']:,.0f} ({r['estimated_peak_mib'] / r['peak_mib']:.3f})"
            )
        else:  # the peer: no breakdown, no estimate
            tensor, estimates = "-", "- | -"
        rows.append(
            f"| {r['config']} | {r['peak_mib']:,.0f} | {tensor} | {estimates} | {r['tokens_per_s']:,.0f} "
            f"| {100 * r['mfu']:.0f}% | {r['steady_tokens_per_s']:,.0f} | {100 * r['steady_mfu']:.0f}% |"
        )
    return "\n".join(rows)


def targets(results: list[dict]) -> list[str]:
    """The issue's targets for the 7B step, measured in this run."""
    by = {r["config"]: r for r in results}
    lines = []
    if "LoRA bf16" in by:
        plain = by["LoRA bf16"]
        lines.append(
            f"7B LoRA step MFU: {100 * plain['mfu']:.0f}% end to end, {100 * plain['steady_mfu']:.0f}% "
            "steady (target >= 40%)"
        )
        if PEER in by:
            ratio = plain["steady_tokens_per_s"] / by[PEER]["steady_tokens_per_s"]
            lines.append(f"7B LoRA step vs TRL (steady tokens/s): {ratio:.2f}x")
    if "LoRA bf16 + checkpointing" in by:
        lines.append(
            f"7B LoRA + checkpointing peak: {by['LoRA bf16 + checkpointing']['peak_mib'] * 2**20 / 1e9:.2f} GB (target <= 15 GB)"
        )
    if "QLoRA NF4 bf16 + checkpointing" in by:
        lines.append(
            f"7B QLoRA NF4 peak: {by['QLoRA NF4 bf16 + checkpointing']['peak_mib'] * 2**20 / 1e9:.2f} GB (target <= 7 GB)"
        )
    estimated = [r for r in results if "tensor_peak_mib" in r]
    if not estimated:
        return lines
    worst = max(abs(r["estimated_tensor_mib"] / r["tensor_peak_mib"] - 1) for r in estimated)
    lines.append(f"estimate vs measured tensor peak: worst {100 * worst:.1f}% off (target within 5%)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    choices = [*CONFIGS, PEER]
    parser.add_argument("--configs", default=",".join(choices), help="comma-separated, from: " + ", ".join(choices))
    parser.add_argument("--out", help="also write the table here (markdown)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.worker:
        run = run_peer if args.worker == PEER else functools.partial(run_config, args.worker)
        print("RESULT " + json.dumps(run(args.shape, args.device, args.steps, args.seq_len)))
        return
    results = []
    for name in args.configs.split(","):
        start = time.perf_counter()
        worker = [sys.executable, __file__, "--worker", name, "--shape", args.shape, "--device", args.device]
        worker += ["--steps", str(args.steps), "--seq-len", str(args.seq_len)]
        proc = subprocess.run(worker, capture_output=True, text=True, start_new_session=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            print(f"{name}: failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}", flush=True)
            continue
        results.append(json.loads(lines[-1][len("RESULT ") :]))
        print("RESULT " + json.dumps(results[-1]), flush=True)  # the whole record, for the log
        print(f"{name}: done in {time.perf_counter() - start:.0f} s", flush=True)
    if not results:
        sys.exit(1)
    text = "\n".join(
        [
            f"`python benchmarks/gpu_step.py {' '.join(sys.argv[1:])}`: {args.shape} shape, LoRA r=16 on q, k, v, "
            f"batch {BATCH} x {args.seq_len}, bf16, {args.steps} steps (steady: after the first {WARMUP_STEPS})",
            "",
            table(results),
            "",
            *targets(results),
        ]
    )
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
