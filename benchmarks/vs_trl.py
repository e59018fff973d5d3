"""solotune vs the standard stack (transformers + TRL SFTTrainer + PEFT LoRA), side by side.

The same workload for both: the embedded default model, the first N Alpaca records in file
order (no shuffling, so every optimizer step sees the same records in both tools), the Alpaca
template, loss on response tokens only, max length 512, LoRA r=16 / alpha 32 / dropout 0.05
on q, k, v, effective batch 8, AdamW lr 2e-4 with a linear decay and no warm-up, 1 epoch,
seed 0. Both tools get the very same token ids and loss masks (solotune tokenizes; TRL gets the
tokenized records with a completion mask). Every run is its own process; the runs alternate
between the tools. Needs the `bench` extra (`pip install -e .[bench]`, i.e. TRL).

    setsid .venv/bin/python benchmarks/vs_trl.py --data ../shared/data/alpaca_en_demo.json

Reported per run: non-padding tokens/s, padding fraction, peak RSS of the training loop (the
high-water mark is reset when the loop starts), loop wall time, final and average loss, and
model FLOPs utilisation (solotune.flops: the same FLOP count for both, over the measured
matmul peak of the run's compute dtype on this machine).
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EFFECTIVE_BATCH = 8


@dataclass(frozen=True)
class Setting:
    tool: str  # "solotune" or "trl"
    micro: int  # micro-batch size; accumulation = EFFECTIVE_BATCH / micro
    precision: str  # "fp32" or "bf16"
    variant: str = "default"  # solotune: "default" or "plain"; trl: "padded" or "padding_free"
    checkpointing: bool = False  # TRL's SFTConfig turns gradient checkpointing on by default
    allocator: str = "glibc"  # the process's C allocator (solotune.allocator): glibc, jemalloc, tcmalloc

    @property
    def label(self) -> str:
        gc = ", checkpointing" if self.checkpointing else ""
        alloc = f", {self.allocator}" if self.allocator != "glibc" else ""
        return (
            f"{self.tool} {self.variant}{gc}, {self.micro} x {EFFECTIVE_BATCH // self.micro}, {self.precision}{alloc}"
        )


# solotune "plain": the loop's own techniques off (padded batches, full logits, autograd's SwiGLU,
# PEFT's dropout), to show what they buy.
PLAIN = ["--no-train.padding-free", "--train.ce-chunk", "0", "--no-train.fused-swiglu", "--no-lora.shared-dropout"]
# solotune "compiled": the decoder layers under torch.compile (the steps the memory breakdown
# follows run eager); its compile time is reported apart from the loop's runtime, so tokens/s
# leaves it out. "untracked" / "always": the memory breakdown on no step / on every step (the
# default follows only the steps that can set the peak).
VARIANT_OPTIONS = {
    "plain": PLAIN,
    "compiled": ["--train.compile"],
    "untracked": ["--no-train.track-memory"],
    "always": ["--train.track-memory", "always"],
}


def plan(precisions: list[str], peer_micros: list[int], focus: str = "all") -> list[Setting]:
    """The runs, alternating between the tools.

    focus "compiled": the settings that decide the targets, with solotune also under torch.compile:
    the peer's two best (micro-batch 1 and 2) and its micro-batch 8 (the same-settings target)
    against solotune compiled at micro-batch 8, 2 and 1 and its eager default at 1 and 8.
    """
    if focus == "allocators":  # glibc's malloc vs jemalloc (both tools) and tcmalloc (solotune)
        runs = []
        for precision in precisions:
            for allocator in ("glibc", "jemalloc"):
                runs += [
                    Setting("solotune", EFFECTIVE_BATCH, precision, "default", allocator=allocator),
                    Setting("trl", 1, precision, "padded", allocator=allocator),
                ]
            runs += [
                Setting("solotune", EFFECTIVE_BATCH, precision, "default", allocator="tcmalloc"),
                Setting("solotune", 2, precision, "compiled", allocator="jemalloc"),
            ]
        return runs
    if focus == "overhead":  # what the breakdown costs, and the default against the peer's best
        runs = []
        for precision in precisions:
            peer = [Setting("trl", m, precision, "padded") for m in peer_micros]
            ours = [Setting("solotune", EFFECTIVE_BATCH, precision, v) for v in ("default", "untracked", "always")]
            for i in range(max(len(peer), len(ours))):
                runs += peer[i : i + 1] + ours[i : i + 1]
        return runs
    if focus == "compiled":
        runs = []
        for precision in precisions:
            peer = [Setting("trl", m, precision, "padded") for m in (1, 2, EFFECTIVE_BATCH)]
            ours = [Setting("solotune", m, precision, "compiled") for m in (EFFECTIVE_BATCH, 2, 1)]
            ours += [Setting("solotune", m, precision, "default") for m in (1, EFFECTIVE_BATCH)]
            for i in range(len(ours)):
                runs += peer[i : i + 1] + ours[i : i + 1]
        return runs
    runs = []
    for precision in precisions:
        # The peer: its defaults (checkpointing on), then its faster settings with it off.
        peer = [Setting("trl", EFFECTIVE_BATCH, precision, "padded", checkpointing=True)]
        peer += [Setting("trl", m, precision, "padded") for m in peer_micros]
        peer.append(Setting("trl", EFFECTIVE_BATCH, precision, "padding_free"))
        ours = [
            Setting("solotune", EFFECTIVE_BATCH, precision, "default"),
            Setting("solotune", EFFECTIVE_BATCH, precision, "plain"),
            Setting("solotune", 1, precision, "default"),
            Setting("solotune", EFFECTIVE_BATCH, precision, "default", checkpointing=True),
        ]
        for i in range(max(len(peer), len(ours))):
            runs += peer[i : i + 1] + ours[i : i + 1]
    return runs


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process)


def tokenized_examples(args):
    from solotune.config import DataConfig, ModelConfig
    from solotune.data import read_records, tokenize_records
    from solotune.model.models import load_tokenizer, resolve_model_source

    mcfg = ModelConfig(name=args.model)
    source = resolve_model_source(mcfg)
    dcfg = DataConfig(path=args.data, samples=args.records, max_len=args.max_len)
    examples, _, _ = tokenize_records(read_records(dcfg), load_tokenizer(source, mcfg), dcfg)
    return source, examples


def run_solotune(s: Setting, args, out_dir: Path) -> dict:
    cmd = (
        [
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
            "--lora.r",
            "16",
            "--lora.alpha",
            "32",
            "--lora.dropout",
            "0.05",
            "--batch",
            str(EFFECTIVE_BATCH),
            "--grad-accum",
            str(EFFECTIVE_BATCH // s.micro),
            "--lr",
            "2e-4",
            "--epochs",
            "1",
            "--no-train.shuffle",
            "--train.schedule",
            "linear",
            "--train.warmup-ratio",
            "0",
            "--train.seed",
            "0",
            "--precision.mp",
            "off" if s.precision == "fp32" else s.precision,
            "--device",
            args.device,
            "--no-generate.enabled",
            "--output-dir",
            str(out_dir / "run"),
            "--cpu-allocator",
            s.allocator,
        ]
        + (["--model", args.model] if args.model else [])
        + VARIANT_OPTIONS.get(s.variant, [])
        + (["--grad-checkpointing"] if s.checkpointing else [])
    )
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    m = json.loads((out_dir / "run" / "metrics.json").read_text())
    t = m["train"]
    return {
        "tokens_per_s": t["tokens_per_s"],
        "padding": t["padding_fraction"],
        "peak_mib": m["memory"]["peak_mib"],
        "loop_s": t["runtime_s"],
        "final_loss": t["final_loss"],
        "avg_loss": t["avg_loss"],
        "mfu": t["mfu"],
        "steps": t["steps"],
        "compile_s": t.get("compile_s", 0.0),
    }


def trainer_measure(device):
    """A Trainer callback that times `train()` and reads the peak memory of its loop alone (the
    high-water mark reset as training begins): `.seconds` and `.peak` once it ends."""
    from transformers import TrainerCallback

    from solotune.measure.memory import PeakMemoryProbe

    probe = PeakMemoryProbe(device)

    class Measure(TrainerCallback):
        def on_train_begin(self, *_, **__):
            probe.reset()
            self.start = time.perf_counter()

        def on_train_end(self, *_, **__):
            self.seconds = time.perf_counter() - self.start
            self.peak = probe.read()

    return Measure()


def run_trl(s: Setting, args, out_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from solotune.data import IGNORE_INDEX, collate_packed
    from solotune.measure.flops import FlopModel, matmul_peak_flops

    source, examples = tokenized_examples(args)
    rows = [{"input_ids": e.input_ids, "completion_mask": [int(y != IGNORE_INDEX) for y in e.labels]} for e in examples]
    dtype = torch.bfloat16 if s.precision == "bf16" else torch.float32
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa").to(device)

    measure = trainer_measure(device)
    config = SFTConfig(
        output_dir=str(out_dir / "trl"),
        per_device_train_batch_size=s.micro,
        gradient_accumulation_steps=EFFECTIVE_BATCH // s.micro,
        learning_rate=2e-4,
        num_train_epochs=1,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=0,
        bf16=s.precision == "bf16",
        use_cpu=args.device == "cpu",
        max_length=None if s.variant == "padding_free" else args.max_len,  # the records are truncated already
        completion_only_loss=True,
        padding_free=s.variant == "padding_free",
        train_sampling_strategy="sequential",
        gradient_checkpointing=s.checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), peft_config=peft_config, callbacks=[measure]
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = [examples[i : i + EFFECTIVE_BATCH] for i in range(0, len(examples), EFFECTIVE_BATCH)]
    flops = sum(FlopModel.of(trainer.model).step_flops([collate_packed(step)]) for step in steps)
    tokens = sum(len(e.input_ids) for e in examples)
    padded = sum(
        len(mb) * max(len(e.input_ids) for e in mb)
        for step in steps
        for mb in (step[i : i + s.micro] for i in range(0, len(step), s.micro))
    )
    return {
        "tokens_per_s": tokens / measure.seconds,
        "padding": 0.0 if s.variant == "padding_free" else 1 - tokens / padded,
        "peak_mib": measure.peak.peak_mib,
        "loop_s": measure.seconds,
        "final_loss": losses[-1],
        "avg_loss": sum(losses) / len(losses),
        "steps": len(losses),
        "mfu": flops / measure.seconds / matmul_peak_flops(device, dtype),
    }


def worker(spec: str, args) -> None:
    s = Setting(**json.loads(spec))
    with tempfile.TemporaryDirectory() as tmp:
        result = (run_trl if s.tool == "trl" else run_solotune)(s, args, Path(tmp))
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Driver


def run_one(s: Setting, args) -> dict | None:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps(asdict(s)),
        "--data",
        args.data,
        "--records",
        str(args.records),
        "--max-len",
        str(args.max_len),
        "--device",
        args.device,
    ] + (["--model", args.model] if args.model else [])
    env = dict(os.environ)
    if s.tool == "trl" and s.allocator != "glibc":  # solotune preloads its own (--cpu-allocator)
        from solotune.measure.allocator import choose

        env["LD_PRELOAD"] = choose(s.allocator)[1]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, start_new_session=True)  # setsid
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    print(
        f"  {s.label}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:] or ''}", file=sys.stderr
    )
    return None


def table(results: list[tuple[Setting, dict]]) -> str:
    head = "| tool, setting | tokens/s | padding | peak MiB | loop s | final loss | avg loss | MFU |\n|---|---|---|---|---|---|---|---|"
    rows = [
        f"| {s.label} | {r['tokens_per_s']:.0f} | {100 * r['padding']:.0f}% | {r['peak_mib']:,.0f} | {r['loop_s']:.0f} | "
        f"{r['final_loss']:.4f} | {r['avg_loss']:.4f} | {100 * r['mfu']:.0f}% |"
        for s, r in results
    ]
    return "\n".join([head, *rows])


def ratios(results: list[tuple[Setting, dict]], precision: str) -> list[str]:
    """The issue's targets, measured in this run."""
    here = [(s, r) for s, r in results if s.precision == precision]
    peer = [(s, r) for s, r in here if s.tool == "trl"]
    ours = [(s, r) for s, r in here if s.tool == "solotune" and s.variant in ("default", "compiled")]
    if not peer or not ours:
        return []
    best_peer_s, best_peer = max(peer, key=lambda sr: sr[1]["tokens_per_s"])
    fitting = [(s, r) for s, r in ours if r["peak_mib"] <= best_peer["peak_mib"]] or ours
    best_s, best = max(fitting, key=lambda sr: sr[1]["tokens_per_s"])
    lines = [
        f"{precision}: headline: solotune at its fastest within the peer's memory ({best_s.label}) vs the peer at its fastest "
        f"({best_peer_s.label}): {best['tokens_per_s'] / best_peer['tokens_per_s']:.2f}x tokens/s at "
        f"{best['peak_mib'] / best_peer['peak_mib']:.2f}x the peak memory (target >= 2.0x at <= 1.0x)"
    ]
    same = dict(((s.tool, s.variant, s.micro, s.checkpointing), r) for s, r in here)
    peer8 = same.get(("trl", "padded", EFFECTIVE_BATCH, False))
    for variant in ("default", "compiled"):
        ours8 = same.get(("solotune", variant, EFFECTIVE_BATCH, False))
        if not (ours8 and peer8):
            continue
        lines.append(
            f"{precision}: same settings (micro-batch 8, no accumulation, no checkpointing), solotune {variant}: "
            f"{ours8['tokens_per_s'] / peer8['tokens_per_s']:.2f}x tokens/s at {ours8['peak_mib'] / peer8['peak_mib']:.2f}x "
            f"the peak memory (target >= 3.0x at <= 0.3x)"
        )
        lines.append(
            f"{precision}: same maths, solotune {variant}: average loss {ours8['avg_loss']:.4f} vs {peer8['avg_loss']:.4f} "
            f"({100 * (ours8['avg_loss'] / peer8['avg_loss'] - 1):+.2f}%, target within 1%)"
        )
    lines.append(
        f"{precision}: MFU of solotune's fastest: {100 * best['mfu']:.0f}% of the measured {precision} matmul peak (target >= 50%)"
    )
    return lines


def medians(results: list[tuple[Setting, dict]]) -> list[tuple[Setting, dict]]:
    """One row per setting (the first occurrence's place): each number the median of its repeats."""
    by_setting: dict[Setting, list[dict]] = {}
    for s, r in results:
        by_setting.setdefault(s, []).append(r)
    return [(s, {k: statistics.median(r[k] for r in rs) for k in rs[0]}) for s, rs in by_setting.items()]


def overhead_ratios(results: list[tuple[Setting, dict]], precision: str) -> list[str]:
    """The memory breakdown's cost (against no breakdown), and the default against the peer's best."""
    here = {(s.tool, s.variant): r for s, r in results if s.precision == precision and s.micro == EFFECTIVE_BATCH}
    peer = [r for s, r in results if s.precision == precision and s.tool == "trl"]
    default, untracked, always = (here.get(("solotune", v)) for v in ("default", "untracked", "always"))
    lines = []
    if default and untracked:
        for name, r in (("default (breakdown on the peak steps)", default), ("breakdown on every step", always)):
            if r:
                lines.append(
                    f"{precision}: {name}: {r['tokens_per_s'] / untracked['tokens_per_s']:.3f}x the tokens/s of no "
                    f"breakdown (target for the default: >= 0.97x)"
                )
    if default and peer:
        best = max(peer, key=lambda r: r["tokens_per_s"])
        lines.append(
            f"{precision}: solotune default vs the peer at its fastest: {default['tokens_per_s'] / best['tokens_per_s']:.2f}x "
            f"tokens/s at {default['peak_mib'] / best['peak_mib']:.2f}x the peak memory (target >= 1.5x)"
        )
    return lines


def compiled_note(r: dict) -> str:
    return f", compile {r['compile_s']:.0f} s (not in tokens/s)" if r.get("compile_s") else ""


def default_precisions(device: str) -> list[str]:
    """bf16 and fp32 where bf16 is native; fp32 alone on CPUs that emulate bf16 (~20x slower)."""
    if device == "cuda":
        return ["bf16", "fp32"]
    from solotune.model.precision import cpu_has_native_bf16

    return ["bf16", "fp32"] if cpu_has_native_bf16() else ["fp32"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/alpaca_en_demo.json", help="an Alpaca-format JSON file")
    p.add_argument("--records", type=int, default=64, help="the first N records (default 64)")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--precisions", default=None, help="comma-separated: fp32,bf16 (default: what the device runs natively)"
    )
    p.add_argument("--peer-micro", default="8,4,2,1", help="the peer's micro-batch sizes to try")
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    p.add_argument(
        "--focus",
        default="all",
        choices=["all", "compiled", "allocators", "overhead"],
        help="compiled: only the settings that decide the targets, with solotune also compiled; "
        "allocators: glibc's malloc vs jemalloc / tcmalloc; overhead: the memory breakdown's cost "
        "(solotune with it on the peak steps, on none, on all) and the peer's settings",
    )
    p.add_argument("--repeats", type=int, default=1, help="run the plan this many times, alternating; medians")
    p.add_argument(
        "--ours-allocator",
        default="glibc",
        choices=["glibc", "tcmalloc", "jemalloc"],
        help="solotune's --cpu-allocator in the plan's runs (the peer keeps glibc's malloc)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args)

    precisions = args.precisions.split(",") if args.precisions else default_precisions(args.device)
    runs = plan(precisions, [int(m) for m in args.peer_micro.split(",")], args.focus) * args.repeats
    if args.ours_allocator != "glibc":
        runs = [replace(s, allocator=args.ours_allocator) if s.tool == "solotune" else s for s in runs]
    print(
        f"{len(runs)} runs, {args.records} records from {args.data}, max len {args.max_len}, device {args.device}, "
        f"precisions {', '.join(precisions)}",
        flush=True,
    )
    results = []
    for i, s in enumerate(runs, 1):
        start = time.perf_counter()
        r = run_one(s, args)
        if r:
            results.append((s, r))
            print(
                f"[{i}/{len(runs)}] {s.label}: {r['tokens_per_s']:.0f} tokens/s, peak {r['peak_mib']:,.0f} MiB, "
                f"avg loss {r['avg_loss']:.4f}{compiled_note(r)} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    results = medians(results)
    machine = f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    report = [
        f"# solotune vs TRL SFTTrainer + PEFT ({time.strftime('%Y-%m-%d')}, {machine}, device {args.device})",
        "",
        f"`{' '.join(['python', 'benchmarks/vs_trl.py', *sys.argv[1:]])}`",
        "",
        "Peak: "
        + ("the CUDA allocator's peak" if args.device == "cuda" else "the process's peak RSS")
        + " over the training loop. Tokens/s: non-padding tokens.",
        "",
        table(results),
        "",
    ]
    for precision in precisions if args.focus != "allocators" else []:  # the targets' ratios are for one allocator
        report += overhead_ratios(results, precision) if args.focus == "overhead" else ratios(results, precision)
    text = "\n".join(report)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
