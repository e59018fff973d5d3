"""FSDP2 for full fine-tuning across processes: each rank holds 1/N of the weights, gradients and
optimizer state, and gathers one decoder layer's weights at a time to compute.

`fully_shard` (torch.distributed.fsdp) wraps every decoder layer and then the whole model, whose
own unit holds what is left: the embeddings, the final norm and the LM head (tied or not). A
layer's weights are all-gathered before its forward and backward and freed after; its gradients
are reduce-scattered after its backward, summed, not averaged (the loss is already divided by
the whole step's response tokens, dist.py), in fp32 on every backend.

Everything that reads a weight outside a forward goes through this module: the full weights for
saving and checkpoints (`full_tensor`, gathered on every rank, kept by rank 0), a checkpoint's
weights put back as each rank's shard (`shard_like`). The whole-model unit is the root: its
weights stay gathered from its forward to the end of backward, which is what lets the chunked
LM head use the head's weight after the decoder ran (loss.ResponseLoss).
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from solotune.errors import SolotuneError
from solotune.model.adapters import save_trained


def shard_model(model: torch.nn.Module, compute_dtype: torch.dtype = torch.float32, mesh=None) -> None:
    """Shard `model` (a transformers causal LM) across the job's ranks, in place. `mesh`: the
    ranks' DeviceMesh (default: every rank of the process group, on this device type).

    Under mixed precision (`compute_dtype` bf16) FSDP2 gathers the fp32 weights as bf16: autocast
    would otherwise cache a bf16 copy of every gathered weight until the forward ends, the whole
    model again in 16 bits on every rank (measured with `solotune estimate`: 12.6 GiB a rank for
    Llama-2-7B). Gradients are reduced in fp32 into the fp32 shards either way.
    """
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise SolotuneError(f"--dist fsdp: {type(model).__name__} has no list of decoder layers to shard")
    fp32_weights = next(model.parameters()).dtype == torch.float32
    gathered = compute_dtype if compute_dtype != torch.float32 and fp32_weights else None
    policy = MixedPrecisionPolicy(param_dtype=gathered, reduce_dtype=torch.float32)  # gloo cannot reduce bf16
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum: the loss carries the step's normalisation
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM, which gloo has (no PREMUL_SUM)


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered weight (nothing to do for a model that is not sharded). Training
    reshards on its own after backward; a forward without one (generation, evaluation) would
    otherwise leave the root's weights gathered, and stale after the next update."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t` (`t` itself unless it is sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of `t` on every rank (a collective when `t` is sharded: every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (the whole tensor, the same on every rank) laid out as `like`: its shard if `like`
    is sharded. No communication: every rank read the same checkpoint."""
    if not isinstance(like, DTensor) or value.shape != like.shape:
        return value
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def save_whole(model: torch.nn.Module, tokenizer, folder, keep: bool) -> None:
    """Save the whole model as one process would (adapters.save_trained). Every rank must call:
    the weights are gathered from the shards, onto the CPU, and written where `keep` (rank 0)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if keep:
        save_trained(model, tokenizer, folder, state_dict=state)
