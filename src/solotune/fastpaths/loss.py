"""The training loss: summed next-token cross-entropy over the response positions.

Two ways to compute the same number. `full` asks the model for its logits, B x T x V of them,
which for a 49k vocabulary and 8 x 512 tokens is 768 MiB in fp32, and three logits-sized
tensors are alive at once in backward. `chunked` takes the decoder's hidden states, keeps only
the positions that carry a loss, and runs the LM head and cross-entropy on chunks of them: no
logits are computed for prompt or padding positions and one chunk's logits exist at a time.

The chunked loss is a plain sum, so its gradient needs nothing from downstream but one scalar.
For a plain linear head, forward therefore computes each chunk's gradient while the chunk's
logits exist and keeps only the (N, H) gradient of the hidden states; backward scales it.
Nothing logits-sized is kept for backward, and the head's matmul is not run a third time.
Any other head (an adapted or quantized one) runs chunk by chunk under checkpointing instead.

The preference objectives need each position's log-prob, not their sum: a pair's loss is a
function of its sequences' summed log-probs. `response_token_losses` gives them from the same
chunked head; with a frozen head (LoRA) each position's gradient is again computed in forward,
as one (N, H) row scaled in backward by what the objective makes of that position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from solotune.data import IGNORE_INDEX, Batch, collate_packed
from solotune.errors import SolotuneError
from solotune.fastpaths.cpu_bf16 import matmul
from solotune.fastpaths.technique import FastPath, Probe, largest_difference, logits
from solotune.parallel import sharding


def full_response_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over positions with a label, in fp32."""
    V = logits.shape[-1]
    # Shift the labels, not the logits: position t predicts token t+1, and the last position
    # predicts nothing. Slicing the logits instead would copy all of them once more.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.float().view(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_response_loss_sum(
    hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor, positions: torch.Tensor, chunk: int
) -> torch.Tensor:
    """The same sum from the final hidden states (B, T, H), `chunk` loss positions at a time.

    `positions`: flat indices into B*T of the positions that predict a response token
    (Batch.loss_positions); position t's target is the label at t + 1 of the same row.
    """
    h = hidden.flatten(0, 1)[positions]  # (N, H)
    targets = labels.flatten()[positions + 1]  # (N,)
    if type(lm_head) is torch.nn.Linear:  # exactly: adapted and quantized heads subclass it
        return FusedHeadCrossEntropy.apply(h, lm_head.weight, lm_head.bias, targets, chunk)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        total = total + checkpoint(
            _head_cross_entropy, lm_head, h[start : start + chunk], targets[start : start + chunk], use_reentrant=False
        )
    return total


class FusedHeadCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(h @ weight.T + bias, targets)), with the gradients computed in forward.

    Per chunk: logits in fp32, their log-sum-exp, then in place softmax - one_hot, the gradient
    of the chunk's summed loss w.r.t. its logits; from it the chunk's gradient w.r.t. h (and
    w.r.t. weight and bias when they train). The matmuls run in whatever dtype autocast gives
    them, as the unfused head's would. The gradients are held in fp32, so an fp16 loss scale
    is applied to them in backward, not lost to underflow in forward.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None  # every row is written
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        weight_in_head_dtype = None
        for start in range(0, h.shape[0], chunk):
            h_c = h[start : start + chunk]
            losses, grad_logits, head_dtype = _losses_and_logit_grads(h_c, weight, bias, targets[start : start + chunk])
            total += losses.sum()
            g = grad_logits.to(head_dtype)
            if weight_in_head_dtype is None:  # cast once, not per chunk (a no-op unless autocast casts)
                weight_in_head_dtype = weight.to(head_dtype)
            if need_h:
                grad_h[start : start + chunk] = matmul(g, weight_in_head_dtype)  # fast where bf16 is emulated
            if need_w:
                grad_w += g.T @ h_c.to(head_dtype)
            if need_b:
                grad_b += grad_logits.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = [None if g is None else (grad_total * g).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return *grads, None, None


def _losses_and_logit_grads(h_c, weight, bias, t_c) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """A chunk's per-position cross-entropy and its gradient w.r.t. the logits (softmax minus the
    target's one-hot, fp32, in the logits' own memory), and the dtype the head computed in."""
    logits = F.linear(h_c, weight, bias)
    head_dtype = logits.dtype
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    rows = torch.arange(t_c.shape[0], device=h_c.device)
    losses = lse - logits[rows, t_c]
    grad_logits = logits.sub_(lse.unsqueeze(-1)).exp_()  # softmax, in the logits' memory
    grad_logits[rows, t_c] -= 1
    return losses, grad_logits, head_dtype


class FusedHeadTokenLosses(torch.autograd.Function):
    """cross_entropy(h @ weight.T + bias, targets) per position, (N,), for a frozen head.

    Position i's loss depends on row i of h alone, so its gradient is row i of
    (softmax - one_hot) @ weight times whatever the caller makes of that loss: forward keeps the
    (N, H) rows in fp32, backward scales each by its incoming gradient. One chunk's logits exist
    at a time, and the head's matmul is not run again in backward.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk):
        losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[0] else None
        weight_in_head_dtype = None
        for start in range(0, h.shape[0], chunk):
            h_c = h[start : start + chunk]
            chunk_losses, grad_logits, head_dtype = _losses_and_logit_grads(
                h_c, weight, bias, targets[start : start + chunk]
            )
            losses[start : start + chunk] = chunk_losses
            if grad_h is not None:
                if weight_in_head_dtype is None:
                    weight_in_head_dtype = weight.to(head_dtype)
                grad_h[start : start + chunk] = matmul(grad_logits.to(head_dtype), weight_in_head_dtype)
        ctx.save_for_backward(grad_h)
        ctx.h_dtype = h.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_h,) = ctx.saved_tensors
        grad = None if grad_h is None else (grad_h * grad_losses.unsqueeze(-1)).to(ctx.h_dtype)
        return grad, None, None, None, None


def chunked_token_losses(
    hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor, positions: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Each loss position's cross-entropy, (N,) fp32, from the final hidden states, `chunk`
    positions at a time (see chunked_response_loss_sum for `positions`)."""
    h = hidden.flatten(0, 1)[positions]
    targets = labels.flatten()[positions + 1]
    frozen = not any(p.requires_grad for p in lm_head.parameters())
    if type(lm_head) is torch.nn.Linear and frozen:
        return FusedHeadTokenLosses.apply(h, lm_head.weight, lm_head.bias, targets, chunk)
    return torch.cat(
        [
            checkpoint(
                _head_cross_entropy, lm_head, h[s : s + chunk], targets[s : s + chunk], "none", use_reentrant=False
            )
            for s in range(0, h.shape[0], chunk)
        ]
    )


def _head_cross_entropy(
    lm_head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, reduction: str = "sum"
) -> torch.Tensor:
    return F.cross_entropy(lm_head(h).float(), targets, reduction=reduction)


def response_token_losses(model, batch: Batch, chunk: int) -> torch.Tensor:
    """-log p(target) at each of the batch's loss positions, (N,) fp32, in `loss_positions`
    order: from the chunked head, or (`chunk` = 0) from the model's full logits."""
    inputs = batch.model_inputs()
    if not chunk or not supports_chunked_head(model):
        logits = model(**inputs).logits
        targets = batch.labels.flatten()[batch.loss_positions + 1]
        return F.cross_entropy(logits.flatten(0, 1)[batch.loss_positions].float(), targets, reduction="none")
    return chunked_token_losses(
        _hidden_states(model, inputs), model.get_output_embeddings(), batch.labels, batch.loss_positions, chunk
    )


def sequence_log_probs(model, batch: Batch, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of each sequence's loss tokens, their counts), each (sequences,) fp32."""
    token_losses = response_token_losses(model, batch, chunk)
    zeros = token_losses.new_zeros(batch.n_sequences)
    logps = zeros.index_add(0, batch.loss_sequences, -token_losses)
    counts = zeros.index_add(0, batch.loss_sequences, torch.ones_like(token_losses))
    return logps, counts


@dataclass(frozen=True)
class ResponseLoss:
    """How the loop computes a micro-batch's summed loss; `chunk` = 0 means full logits.

    Under FSDP2 the hidden states come from the model's own forward rather than from its decoder
    called alone: the forward is what gathers the weights (sharding.py).
    """

    chunk: int = 1024

    def __call__(self, model, batch: Batch) -> torch.Tensor:
        inputs = batch.model_inputs()
        if not self.chunk or not supports_chunked_head(model):
            return full_response_loss_sum(model(**inputs).logits, batch.labels)
        hidden = _hidden_states(model, inputs)
        return chunked_response_loss_sum(
            hidden, model.get_output_embeddings(), batch.labels, batch.loss_positions, self.chunk
        )


def _hidden_states(model, inputs: dict) -> torch.Tensor:
    """The decoder's last hidden states (B, T, H) for `inputs`."""
    if sharding.is_sharded(model):
        return final_hidden_states(model, inputs)
    return model.get_decoder()(**inputs).last_hidden_state


def final_hidden_states(model, inputs: dict) -> torch.Tensor:
    """The decoder's last hidden states from the model's own forward, with the identity standing
    in for its LM head. Where the forward changes the head's output (soft-capping, scaling), the
    set-up check has already turned the chunked head off (selfcheck.py)."""
    head = model.get_output_embeddings()
    model.set_output_embeddings(_HiddenStates())
    try:
        return model(**inputs).logits
    finally:
        model.set_output_embeddings(head)


class _HiddenStates(torch.nn.Module):
    """An LM head that returns its input. A copy, not the model's slice of it: FSDP2 hooks the
    forward's outputs for backward, and warns of a view, whose in-place change would lose it."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.clone()


def supports_chunked_head(model) -> bool:
    """True where the model has a decoder and an LM head to call apart. Whether its logits are
    exactly lm_head(last hidden state), with no scaling or capping after the head (Gemma 2's
    soft-capping, Granite's logits_scaling, Cohere's logit_scale, ...), is the set-up check's to
    find out (selfcheck.py), for any architecture."""
    return model.get_output_embeddings() is not None and hasattr(model, "get_decoder")


class ChunkedHead(FastPath):
    """The LM head and cross-entropy in chunks of positions (`ResponseLoss`), never building
    the (tokens x vocabulary) logits, against the model's own logits on the same batch. Right
    only where the logits are exactly the head's output, with nothing done after it."""

    name, field, off, axis, label = "chunked LM head + cross-entropy", "ce_chunk", 0, "cce", "Chunked CE"

    def on_value(self, train_cfg) -> int:
        return train_cfg.ce_chunk or 1024

    def difference(self, model, probe: Probe, kept: dict) -> float:
        if not supports_chunked_head(model):
            raise SolotuneError("the model has no separate decoder and LM head to split")
        batch = collate_packed(probe.records).to(probe.device) if kept.get("padding_free") else probe.padded
        full_logits = logits(model, batch)
        hidden = model.get_decoder()(**batch.model_inputs()).last_hidden_state
        head = model.get_output_embeddings()(hidden).float()
        full = full_response_loss_sum(full_logits, batch.labels)
        loss = ResponseLoss(kept["ce_chunk"])(model, batch)
        loss_difference = ((loss - full).abs() / full.abs().clamp_min(1e-6)).item()
        return max(largest_difference(head, full_logits, batch), loss_difference)


CHUNKED_HEAD = ChunkedHead()
