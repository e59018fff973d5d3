"""Data parallel over N processes, launched by torchrun: the same run, its steps split across ranks.

`solotune train --nproc N` runs itself under `torchrun --standalone --nproc-per-node N` (launch.py;
several nodes: call torchrun yourself with its rendezvous flags and `-m solotune.cli train`).
Each rank takes its share of every step's micro-batches: N ranks with `--grad-accum K` run the
micro-batches one process would run with `--grad-accum N*K`. Every rank counts the whole step's
response tokens from its records on the host, so each divides its loss by that global count
without asking the others: the summed gradients and the loss are then exactly the
single process's.

After backward, one fp32 all-reduce per step sums the gradients and the step's loss together.
LoRA's gradients are a few MB, so a single collective after the step costs less than DDP's
bucketing would overlap, and fp32 keeps the sum exact on every backend (gloo cannot reduce
bf16). Rank 0 writes everything; the others only train.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from solotune.errors import SolotuneError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The rank that writes the run folder, prints and generates."""
        return self.rank == 0

    def shard(self, micro_batches: list) -> list:
        """This rank's consecutive share of a step's micro-batches (a short last step leaves the
        last ranks fewer, or none: they add zero gradients)."""
        per_rank = -(-len(micro_batches) // self.size)
        return micro_batches[self.rank * per_rank : (self.rank + 1) * per_rank]


def current() -> World:
    """This process's place in the torchrun job (rank 0 of 1 outside one)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ


def init(requested: int, device: torch.device) -> World:
    """Join the job's process group (gloo on the CPU, NCCL on CUDA); check it is the one asked for."""
    world = current()
    if world.size != requested:
        raise SolotuneError(
            f"--nproc {requested} but this job has {world.size} processes (torchrun --nproc-per-node); make them agree"
        )
    if world.size > 1 and not torch_dist.is_initialized():
        if device.type == "cuda":
            if torch.cuda.device_count() < world.size:
                raise SolotuneError(f"--nproc {world.size} but only {torch.cuda.device_count()} GPUs are visible")
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", world.rank)))
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world


def sum_step(grads: list[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    """Sum the gradients (in place) and the step's loss and statistics (`values`, 1-D) over the
    ranks, in fp32, in one collective; returns the summed values."""
    flat = step_buffer(grads, values)
    torch_dist.all_reduce(flat)
    start = 0
    for g in grads:
        g.copy_(flat[start : start + g.numel()].view_as(g))
        start += g.numel()
    return flat[start:]


def step_buffer(grads: list[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    """The fp32 buffer one all-reduce carries: every gradient, then the loss and statistics
    (also what `estimate` adds for a rank)."""
    return torch.cat([g.detach().float().reshape(-1) for g in grads] + [values.detach().float().reshape(-1)])


def sum_counts(*values: float) -> list[float]:
    """Each count summed over the ranks (tokens, positions, FLOPs: the job's, not one rank's)."""
    if not torch_dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    torch_dist.all_reduce(t)
    return t.tolist()


def gather(value) -> list:
    """`value` from every rank, in rank order (on every rank)."""
    if not torch_dist.is_initialized():
        return [value]
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, value)
    return out


def broadcast(value):
    """Rank 0's `value` on every rank."""
    if not torch_dist.is_initialized():
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def finish() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
