"""A DPO step of solotune against TRL's DPOTrainer, side by side, and against an SFT step.

The same workload for both tools: the embedded default model, the first N pairs of solotune's
built-in preference set (the Alpaca prompt, the computed answer chosen, a perturbation of it
rejected), max length 256, LoRA r=16 / alpha 32 / dropout 0 on q, k, v (no dropout: the two
tools draw different masks), the reference the adapter switched off, beta 0.1, effective batch
8 pairs, AdamW lr 1e-4 with a linear decay and no warm-up, 1 epoch, the pairs in file order,
fp32, seed 0. The worker checks that TRL's tokenization gives solotune's token ids. Every run
is its own process (setsid); the runs alternate between the settings. Needs TRL (the `bench`
extra, also in requirements.txt).

    .venv/bin/python benchmarks/vs_trl_dpo.py --pairs 32 --repeats 2
    python benchmarks/vs_trl_dpo.py --device cuda --precision bf16 --model /tmp/solotune-1b   # device_gpu.sh

Reported per run: non-padding tokens/s (chosen and rejected sequences), the peak RSS of the
training loop (the high-water mark reset when the loop starts), loop wall time, first and last
loss. Beside the DPO runs, solotune's SFT on the very same chosen and rejected sequences (each a
prompt/response record, 16 a step): the target is a DPO peak of at most 1.3x that SFT step's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAIRS_PER_STEP = 8
SETTINGS = {
    "trl-dpo": "TRL DPOTrainer, 8 pairs a step (micro-batch 8)",
    "trl-dpo-micro2": "TRL DPOTrainer, 4 x 2 pairs (gradient accumulation)",
    "solotune-dpo": "solotune --method dpo, 8 pairs a step (defaults: padding-free, chunked head)",
    "solotune-dpo-micro2": "solotune --method dpo, 4 x 2 pairs (--grad-accum 4)",
    "solotune-sft": "solotune SFT on the same chosen + rejected sequences, 16 a step",
}


# (solotune, peer): the same micro-batch, then solotune's default against the peer's leanest
COMPARED = [("solotune-dpo", "trl-dpo"), ("solotune-dpo-micro2", "trl-dpo-micro2"), ("solotune-dpo", "trl-dpo-micro2")]


def pair_rows(n: int) -> list[dict]:
    from solotune.config import DataConfig
    from solotune.data import read_records

    return [r.fields for r in read_records(DataConfig(samples=n), pairs=True)]


def solotune_args(args, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "solotune.cli", "train", "--max-len", str(args.max_len), "--lora.r", "16",
        "--lora.alpha", "32", "--lora.dropout", "0", "--lr", "1e-4", "--epochs", "1", "--no-train.shuffle",
        "--train.schedule", "linear", "--train.warmup-ratio", "0", "--seed", "0",
        "--no-generate.enabled", "--output-dir", str(out), "--device", args.device, "--data.on-bad-record", "skip",
        "--mp", "off" if args.precision == "fp32" else args.precision,
    ] + (["--model", args.model] if args.model else [])  # fmt: skip


def run_solotune(setting: str, args, tmp: Path) -> dict:
    if setting.startswith("solotune-dpo"):
        cmd = solotune_args(args, tmp / "run") + ["--method", "dpo", "--samples", str(args.pairs), "--batch", "8"]
        cmd += ["--grad-accum", "4"] if setting.endswith("micro2") else []
    else:  # every pair's two sequences as prompt/response records, a step's 16 in file order
        data = tmp / "sequences.jsonl"
        rows = [
            {"prompt": r["prompt"], "response": r[k]} for r in pair_rows(args.pairs) for k in ("chosen", "rejected")
        ]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cmd = solotune_args(args, tmp / "run") + ["--data", str(data), "--batch", str(2 * PAIRS_PER_STEP)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    m = json.loads((tmp / "run" / "metrics.json").read_text())
    t = m["train"]
    return {
        "tokens_per_s": t["tokens_per_s"],
        "peak_mib": m["memory"]["peak_mib"],
        "loop_s": t["runtime_s"],
        "first_loss": t["loss_curve"][0],
        "last_loss": t["final_loss"],
        "steps": t["steps"],
    }


def run_trl(setting: str, args, tmp: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer
    from vs_trl import trainer_measure  # benchmarks/ is the script's folder, so on its path

    from solotune.config import DataConfig, ModelConfig
    from solotune.data import read_records, tokenize_records
    from solotune.model.models import load_tokenizer, resolve_model_source

    torch.manual_seed(0)
    model_cfg = ModelConfig(name=args.model)
    source = resolve_model_source(model_cfg)
    tokenizer = load_tokenizer(source, model_cfg)
    rows = pair_rows(args.pairs)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")

    micro = 2 if setting == "trl-dpo-micro2" else PAIRS_PER_STEP
    config = DPOConfig(
        output_dir=str(tmp / "trl"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=PAIRS_PER_STEP // micro, learning_rate=1e-4, num_train_epochs=1,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=0, beta=0.1,
        use_cpu=args.device == "cpu", bf16=args.precision == "bf16", max_length=args.max_len,
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    peft_config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    measure = trainer_measure(torch.device(args.device))  # vs_trl.py's: the same measure for both peers
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=peft_config, callbacks=[measure],
    )  # fmt: skip
    # Both leave out a pair whose prompt fills the length limit (solotune's with --data.on-bad-record skip).
    data = DataConfig(samples=args.pairs, max_len=args.max_len, on_bad_record="skip")
    ours = tokenize_records(read_records(data, pairs=True), tokenizer, data, True)[0]
    theirs = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert len(ours) == len(theirs), f"solotune keeps {len(ours)} pairs, TRL {len(theirs)}"
    differ = sum(
        p.chosen.input_ids != t["prompt_ids"] + t["chosen_ids"]
        or p.rejected.input_ids != t["prompt_ids"] + t["rejected_ids"]
        for p, t in zip(ours, theirs)
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = sum(len(s.input_ids) for p in ours for s in p.sequences)
    return {
        "tokens_per_s": tokens / measure.seconds,
        "peak_mib": measure.peak.peak_mib,
        "loop_s": measure.seconds,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "steps": len(losses),
        "token_ids_differ": differ,
    }


def worker(setting: str, args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = (run_trl if setting.startswith("trl") else run_solotune)(setting, args, Path(tmp))
    print("RESULT " + json.dumps(result))


def run_one(setting: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", setting, "--pairs", str(args.pairs), "--max-len", str(args.max_len)]
    cmd += ["--device", args.device, "--precision", args.precision] + (["--model", args.model] if args.model else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, start_new_session=True)  # setsid
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    print(f"  {setting}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-3:]}", file=sys.stderr)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--model", help="default: the embedded default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--out", help="also write the report to this Markdown file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args)
    settings = args.settings.split(",")
    results: dict[str, list[dict]] = {s: [] for s in settings}
    for repeat in range(args.repeats):
        for setting in settings:  # alternating
            r = run_one(setting, args)
            if r:
                results[setting].append(r)
                print(f"run {repeat + 1} {setting}: {json.dumps(r)}", flush=True)
    text = report(results, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def report(results: dict[str, list[dict]], args) -> str:
    def median(setting, key):
        values = [r[key] for r in results.get(setting, [])]
        return statistics.median(values) if values else float("nan")

    lines = [
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"device {args.device}; model {args.model or 'the embedded default'}; {args.pairs} built-in pairs, "
        f"max length {args.max_len}, {args.precision}; median of {args.repeats} runs each",
        "",
        "| setting | tokens/s | peak MiB | loop s | first loss | last loss |",
        "|---|---|---|---|---|---|",
    ]
    for s in results:
        if results[s]:
            lines.append(
                f"| {SETTINGS[s]} | {median(s, 'tokens_per_s'):.0f} | {median(s, 'peak_mib'):,.0f} | "
                f"{median(s, 'loop_s'):.1f} | {median(s, 'first_loss'):.4f} | {median(s, 'last_loss'):.4f} |"
            )
    lines.append("")
    for ours, peer in COMPARED:
        if results.get(peer) and results.get(ours):
            lines.append(
                f"{SETTINGS[ours]} vs {SETTINGS[peer]}: {median(ours, 'tokens_per_s') / median(peer, 'tokens_per_s'):.2f}x "
                f"tokens/s at {median(ours, 'peak_mib') / median(peer, 'peak_mib'):.2f}x the peak"
            )
    ours = "solotune-dpo"
    if results.get("solotune-sft") and results.get(ours):
        lines.append(
            f"solotune DPO peak / SFT peak on the same sequences: "
            f"{median(ours, 'peak_mib') / median('solotune-sft', 'peak_mib'):.2f}x (target <= 1.3x)"
        )
    differ = [r["token_ids_differ"] for s in results if s.startswith("trl") for r in results[s]]
    if differ:
        lines.append(f"pairs whose TRL token ids differ from solotune's: {max(differ)}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
