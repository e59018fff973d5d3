"""What dropout keyed to the data costs against torch's own: forward + backward of one dropout
on (tokens x features) activations, both side by side in this process, alternating, medians of
the repeats; and what each keeps for backward.

    setsid .venv/bin/python benchmarks/dropout_cost.py --out benchmarks/results/dropout_cost-<machine>-<date>.md

Shapes: the embedded default's hidden size (576) at 2,048 tokens, and a 7B's (4,096) at 4,096
tokens (that one on a GPU only: 16 M elements per op on a 2-core CPU take seconds).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from solotune.data import token_keys
from solotune.model.dropout import KeyedDropout, keyed_by

P = 0.05


def time_once(dropout: torch.nn.Module, x: torch.Tensor, keys: torch.Tensor, device: torch.device) -> float:
    grad = torch.ones_like(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with keyed_by(keys):
        dropout(x).backward(grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def saved_bytes(dropout: torch.nn.Module, x: torch.Tensor, keys: torch.Tensor) -> int:
    saved = []
    with (
        keyed_by(keys),
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
    ):
        dropout(x)
    return sum(t.numel() * t.element_size() for t in saved)


def measure(tokens: int, features: int, device: torch.device, repeats: int) -> str:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(1, tokens, features, device=device, dtype=dtype, requires_grad=True)
    keys = token_keys(torch.zeros(tokens, dtype=torch.long), torch.arange(tokens)).view(1, tokens).to(device)
    variants = {"torch nn.Dropout": torch.nn.Dropout(P).train(), "keyed": KeyedDropout(P, salt=1).train()}
    times = {name: [] for name in variants}
    for d in variants.values():  # warm-up
        time_once(d, x, keys, device)
    for _ in range(repeats):
        for name, d in variants.items():
            times[name].append(time_once(d, x, keys, device))
    torch_ms, keyed_ms = (statistics.median(times[n]) * 1e3 for n in variants)
    torch_mib, keyed_mib = (saved_bytes(d, x, keys) / 2**20 for d in variants.values())
    return (
        f"| {tokens:,} x {features:,} | {str(dtype).removeprefix('torch.')} | {torch_ms:.2f} | {keyed_ms:.2f} | "
        f"{keyed_ms / torch_ms:.2f}x | {torch_mib:.2f} | {keyed_mib:.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [(2048, 576)] + ([(4096, 4096)] if device.type == "cuda" else [])
    lines = [
        f"dropout p = {P}, forward + backward, median of {args.repeats}, device {device} "
        f"({torch.cuda.get_device_name(0) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})",
        "",
        "| tokens x features | dtype | torch ms | keyed ms | keyed / torch | torch keeps MiB | keyed keeps MiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(measure(t, f, device, args.repeats) for t, f in shapes),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
