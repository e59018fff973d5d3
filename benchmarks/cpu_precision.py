"""How fast this CPU runs fp32 vs bf16: matmuls in each layout, and a training step of the embedded default.

Each variant runs in its own process, alternating, so the numbers are side by side:

    setsid python benchmarks/cpu_precision.py --repeats 2

On a CPU that emulates bf16, "autograd layouts" is the step as PyTorch runs it and the bf16
default is solotune's (solotune.cpu_bf16: each linear's input gradient with a column-major
weight). Elsewhere the two are the same code.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "fp32": {"mp": "off", "base_dtype": "fp32", "layouts": "solotune"},
    "bf16 autocast, fp32 base": {"mp": "bf16", "base_dtype": "fp32", "layouts": "solotune"},
    "bf16 autocast, bf16 base": {"mp": "bf16", "base_dtype": "bf16", "layouts": "solotune"},
    "bf16 autocast, bf16 base, autograd layouts": {"mp": "bf16", "base_dtype": "bf16", "layouts": "autograd"},
}
# A linear layer's three products in a SmolLM2 MLP shape (512 tokens, 576 -> 1536), and the LM
# head's input gradient (1024 positions, 49,152 x 576).
LAYOUTS = {
    "forward x @ W.T": lambda x, w, g: x @ w.T,
    "weight gradient g.T @ x": lambda x, w, g: g.T @ x,
    "input gradient g @ W": lambda x, w, g: g @ w,
    "input gradient g @ column_major(W)": lambda x, w, g: g @ w.T.contiguous().T,
    "input gradient cpu_bf16.matmul(g, W)": lambda x, w, g: _sliced(g, w),
}


def _sliced(g, w):
    from solotune.fastpaths.cpu_bf16 import matmul

    return matmul(g, w)  # where bf16 is emulated, W column-major 4,096 rows at a time


def layout_gflops(dtype, tokens: int, d_in: int, d_out: int, reps: int = 3) -> dict[str, float]:
    """GFLOP/s of each product of a linear layer; the column-major copy is timed with its product."""
    import torch

    x, w, g = (
        torch.randn(tokens, d_in, dtype=dtype),
        torch.randn(d_out, d_in, dtype=dtype),
        torch.randn(tokens, d_out, dtype=dtype),
    )
    result = {}
    for name, product in LAYOUTS.items():
        product(x, w, g)
        best = min(_seconds(product, x, w, g) for _ in range(reps))
        result[name] = 2 * tokens * d_in * d_out / best / 1e9
    return result


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def step_seconds(variant: dict, batch: int, seq: int, steps: int) -> float:
    """Median seconds of one forward + backward of SmolLM2-135M with LoRA r=16 on q, k, v."""
    import torch

    from solotune.config import RunConfig
    from solotune.fastpaths.cpu_bf16 import restore_layouts
    from solotune.fastpaths.loss import full_response_loss_sum
    from solotune.model.models import resolve_model_source
    from solotune.model.precision import resolve_policy
    from solotune.training.setup import build_model

    cfg = RunConfig()
    cfg.precision.mp, cfg.precision.base_dtype = variant["mp"], variant["base_dtype"]
    policy = resolve_policy(cfg.precision, "cpu", frozen_base=True)
    model = build_model(resolve_model_source(cfg.model), cfg, policy).train()
    if variant["layouts"] == "autograd":
        restore_layouts(model)
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
    import torch

    v = VARIANTS[name]
    dtype = torch.float32 if v["mp"] == "off" else torch.bfloat16
    result = {
        "mlp": layout_gflops(dtype, 512, 576, 1536),
        "head": layout_gflops(dtype, 1024, 576, 49152, reps=1),
        "step_s": step_seconds(v, args.batch, args.seq, args.steps),
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
    from solotune.model.precision import cpu_has_native_bf16

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
    print("| variant | fwd+bwd step s | vs fp32 |\n|---|---|---|")
    for name, rs in runs.items():
        step = statistics.median(r["step_s"] for r in rs)
        print(f"| {name} | {step:.2f} | {step / base:.1f}x |")
    print("\nGFLOP/s of a linear layer's products (median over the runs of each dtype; the copy counted)\n")
    print("| product | fp32 MLP | bf16 MLP | fp32 head | bf16 head |\n|---|---|---|---|---|")
    fp32, bf16 = runs["fp32"], [r for name, rs in runs.items() if name != "fp32" for r in rs]
    for product in LAYOUTS:
        cells = [statistics.median(r[part][product] for r in rs) for part in ("mlp", "head") for rs in (fp32, bf16)]
        print(f"| {product} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
