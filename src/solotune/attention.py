"""Padding-free attention: each record of a concatenated row attends only to itself.

A padding-free micro-batch is one row holding its records back to back (data.collate_packed).
The model gets the row's `segment_lengths` as a keyword argument, which transformers passes
down to the attention function of every layer; this one runs SDPA's causal kernel on each
record's slice. No B x H x T x T mask is built, and no attention is computed across records or
on padding. Without `segment_lengths` (generation, padded batches) it is plain SDPA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from solotune.errors import SolotuneError

NAME = "solotune_varlen"


def varlen_sdpa_attention(module, query, key, value, attention_mask, segment_lengths=None, **kwargs):
    """Attention of (B, H, T, D) tensors; with `segment_lengths`, causal within each segment."""
    if segment_lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs, start = [], 0
    for n in segment_lengths:
        end = start + n
        out, _ = sdpa_attention_forward(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None, **kwargs
        )
        outputs.append(out)  # (B, n, H, D)
        start = end
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(NAME, varlen_sdpa_attention)
# The mask builder of SDPA: given an all-ones 2D mask it returns None (pure causal), which is
# what the per-segment calls need; for padded batches it builds SDPA's usual mask.
AttentionMaskInterface.register(NAME, sdpa_mask)


def enable_padding_free(model, max_len: int) -> None:
    """Switch `model` (a transformers model, possibly PEFT-wrapped) to per-record attention."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    if window and max_len > window:
        raise SolotuneError(
            f"padding-free batches: this model uses a sliding attention window of {window} tokens, "
            f"shorter than max_len = {max_len}; lower --max-len or use --train.padding-free false"
        )
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, KeyError, AttributeError) as err:
        raise SolotuneError(
            f"padding-free batches need a model that supports transformers' attention interface "
            f"({type(model).__name__}: {err}); use --train.padding-free false"
        ) from err
