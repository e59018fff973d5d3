"""Where the eager loop's peak RSS goes beyond its tensors on the CPU: glibc's heap.

Runs `solotune train` on the first N Alpaca records (effective batch 8, micro-batch 8, fp32, no
memory breakdown, so nothing but the loop runs) in child processes, alternating two variants:

  default  the loop as it is; after every forward and backward it prints glibc's heap
           (mallinfo2: bytes in the heap, how many of them in use, how many free)
  slabs    an experiment that was not kept: every tensor saved for backward (1 MiB and up,
           not a parameter) is copied into reusable 64 MiB slabs, so that the heap holds only
           short-lived temporaries

    setsid .venv/bin/python benchmarks/cpu_heap.py --data ../shared/data/alpaca_en_demo.json
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys

MIB = 2**20


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def heap_line(tag: str) -> str:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    m = libc.mallinfo2()
    rss = next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
    return (
        f"{tag}: RSS {rss:,} MiB, heap {m.arena // MIB:,} MiB ({m.uordblks // MIB:,} in use, "
        f"{m.fordblks // MIB:,} free), mmapped {m.hblkhd // MIB:,} MiB"
    )


class Slabs:
    """Bump allocation of saved tensors in slabs that are reused once backward has freed them."""

    def __init__(self, slab_bytes: int = 64 * MIB):
        self.slab_bytes, self.free, self.used, self.current, self.offset = slab_bytes, [], [], None, 0
        self.parameters: set[int] = set()

    def pack(self, t):
        import torch

        n = t.numel() * t.element_size()
        if n < MIB or not t.is_contiguous() or t.untyped_storage().data_ptr() in self.parameters:
            return t
        padded = (n + 63) // 64 * 64
        if self.current is None or self.offset + padded > self.current.numel():
            fits = [s for s in self.free if s.numel() >= padded]
            self.current = fits[0] if fits else torch.empty(max(self.slab_bytes, padded), dtype=torch.uint8)
            if fits:
                self.free.remove(self.current)
            self.used.append(self.current)
            self.offset = 0
        copy = self.current[self.offset : self.offset + n].view(t.dtype).view(t.shape)
        self.offset += padded
        return copy.copy_(t)

    def release(self) -> None:
        self.free += self.used
        self.used, self.current, self.offset = [], None, 0


def child(variant: str, train_args: list[str]) -> None:
    """Patch the loop's gradient accumulation, then run the CLI in this process."""
    import torch

    import solotune.training.step as step
    from solotune.cli import main
    from solotune.model.dropout import keyed_by

    slabs = Slabs()

    def accumulate(model, micro_batches, policy, loss_fn, **_):
        if not slabs.parameters:
            slabs.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        n_loss_tokens = sum(mb.n_loss_tokens for mb in micro_batches)
        step_loss = torch.zeros(())
        for mb in micro_batches:
            hooks = (slabs.pack, lambda t: t) if variant == "slabs" else (lambda t: t, lambda t: t)
            with keyed_by(mb.token_keys):
                with torch.autograd.graph.saved_tensors_hooks(*hooks), policy.autocast():
                    loss = loss_fn(model, mb) / n_loss_tokens
                print(heap_line("  after forward"), flush=True)
                loss.backward()
            print(heap_line("  after backward"), flush=True)
            step_loss += loss.detach()
            slabs.release()
        return step_loss

    step.accumulate_gradients = accumulate
    sys.argv = ["solotune", *train_args]
    main()


def run(variant: str, args, out: str) -> None:
    train_args = [
        "train",
        "--data",
        args.data,
        "--samples",
        str(args.records),
        "--max-len",
        "512",
        "--batch",
        "8",
        "--precision.mp",
        "off",
        "--no-generate.enabled",
        "--no-train.shuffle",
        "--no-train.track-memory",
        "--output-dir",
        out,
    ]
    proc = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--", *train_args], capture_output=True, text=True, check=True
    )
    print(f"== {variant}")
    for line in proc.stdout.splitlines():
        if line.startswith(("  after", "peak RSS", "steps:", "runtime:")):
            print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/alpaca_en_demo.json")
    p.add_argument("--records", type=int, default=24, help="the first N records (default 24: 3 steps)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.child:
        return child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("default", "slabs"):
            run(variant, args, f"{tmp}/{variant}")


if __name__ == "__main__":
    main()
