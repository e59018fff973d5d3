"""How fast this CPU runs fp32 vs bf16: a matmul, and one LoRA training step of the embedded default.

Each variant runs in its own process, alternating, so the numbers are side by side:

    setsid python benchmarks/cpu_precision.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "fp32": {"mp": "off", "base_dtype": "fp32"},
    "bf16 autocast, fp32 base": {"mp": "bf16", "base_dtype": "fp32"},
    "bf16 autocast, bf16 base": {"mp": "bf16", "base_dtype": "bf16"},
}


def matmul_gflops(dtype_name: str, n: int = 1024, reps: int = 3) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def step_seconds(mp: str, base_dtype: str, batch: int, seq: int, steps: int) -> float:
    """Median seconds of one forward + backward of SmolLM2-135M with LoRA r=16 on q, k, v."""
    import torch

    from solotune.config import RunConfig
    from solotune.loss import full_response_loss_sum
    from solotune.model_setup import build_model
    from solotune.models import resolve_model_source
    from solotune.precision import resolve_policy

    cfg = RunConfig()
    cfg.precision.mp, cfg.precision.base_dtype = mp, base_dtype
    policy = resolve_policy(cfg.precision, "cpu", frozen_base=True)
    model = build_model(resolve_model_source(cfg.model), cfg, policy).train()
    x = torch.randint(0, 49152, (batch, seq))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with policy.autocast():
            logits = model(input_ids=x, use_cache=False).logits
        (full_response_loss_sum(logits, x) / x.numel()).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first step warms up


def child(name: str, args) -> None:
    v = VARIANTS[name]
    dtype = "fp32" if v["mp"] == "off" else "bf16"
    result = {
        "matmul_gflops": matmul_gflops(dtype),
        "step_s": step_seconds(v["mp"], v["base_dtype"], args.batch, args.seq, args.steps),
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args)
    from solotune.precision import cpu_has_native_bf16

    print(f"native bf16 on this CPU: {cpu_has_native_bf16()}; batch {args.batch} x {args.seq} tokens")
    runs = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name in VARIANTS:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--steps",
                str(args.steps),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs[name].append(json.loads(out))
    base = statistics.median(r["step_s"] for r in runs["fp32"])
    print("| variant | matmul GFLOP/s (1024^3) | fwd+bwd step s | vs fp32 |\n|---|---|---|---|")
    for name, rs in runs.items():
        step = statistics.median(r["step_s"] for r in rs)
        gflops = statistics.median(r["matmul_gflops"] for r in rs)
        print(f"| {name} | {gflops:.1f} | {step:.2f} | {step / base:.1f}x |")


if __name__ == "__main__":
    main()
