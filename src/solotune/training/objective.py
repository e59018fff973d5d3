"""What a run minimises: its training objective, one home for each (SFT among them).

An objective turns a micro-batch into one vector, [summed loss, *summed statistics]; the step
divides it by the step's `normalizer`, the count the loss is a mean over: response tokens for
SFT, pairs for the preference objectives. Every unit's loss depends on that unit alone, so the
mean is exactly the full batch's however the step is split into micro-batches or ranks.

The preference objectives score a pair (prompt, chosen, rejected) by its two sequences'
log-probs, each the sum over the answer's tokens (fastpaths/loss.sequence_log_probs: the chunked
head, no tokens x vocabulary tensor):
  DPO    -log sigmoid(beta * ((c - c_ref) - (r - r_ref))), with label smoothing eps the
         conservative form (1 - eps) * that + eps * the same for the flipped label
         (Rafailov et al., 2023); c_ref, r_ref from the reference model: under LoRA the same
         model with its adapter switched off (no copy of the weights), or computed once before
         training (`reference_log_probs`).
  ORPO   the chosen answer's mean token NLL - lambda * log sigmoid(log odds(c') - log odds(r')),
         c', r' the answers' mean token log-probs, odds(p) = p / (1 - p) (Hong et al., 2024);
         no reference.
  SimPO  -log sigmoid(beta * (c' - r') - gamma), length-normalised, no reference
         (Meng et al., 2024).
The statistics are the ones the DPO paper reports: the rewards (DPO: beta times the log-ratio
to the reference; ORPO: lambda c'; SimPO: beta c'), their margin, and the reward accuracy, the
fraction of pairs whose chosen answer gets the higher reward (a tie counts half).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from solotune.config import RunConfig
from solotune.data import Batch, count_loss_tokens, sequences_of
from solotune.fastpaths.loss import ResponseLoss, sequence_log_probs
from solotune.fastpaths.registry import FastPaths
from solotune.model.precision import PrecisionPolicy
from solotune.parallel import sharding

PAIR_STATS = ("reward_accuracy", "chosen_reward", "rejected_reward", "margin")


@dataclass(frozen=True)
class SFT:
    """Next-token cross-entropy on the response tokens, a mean over the step's response tokens."""

    chunk: int = 1024  # the chunked head's positions at a time; 0: full logits (fastpaths/loss.py)
    name = "sft"
    stats = ()
    reference = "none"
    reference_passes = 0  # forwards besides the policy's, per micro-batch (for the FLOP count)

    def batch(self, units: list, fast: FastPaths, pad_id: int) -> Batch:
        return fast.batch(units, pad_id)

    def normalizer(self, units: list) -> int:
        return count_loss_tokens(sequences_of(units))

    def batch_normalizer(self, batch: Batch) -> int:
        return batch.n_loss_tokens

    def __call__(self, model, batch: Batch) -> torch.Tensor:
        return ResponseLoss(self.chunk)(model, batch).reshape(1)

    def describe(self) -> str:
        return "objective: sft (cross-entropy on the response tokens)"


@dataclass(frozen=True)
class Preference:
    """DPO, ORPO or SimPO on pairs (see the module's docstring), a mean over the step's pairs.

    `reference`: where DPO's reference log-probs come from: "adapter" (the model with its LoRA
    adapter switched off, under no_grad, on the same batch) or "cached" (`cache`, computed before
    training); "none" for ORPO and SimPO.
    """

    method: str
    beta: float
    label_smoothing: float = 0.0
    orpo_lambda: float = 0.1
    gamma: float = 0.5
    chunk: int = 1024
    reference: str = "none"
    cache: dict[int, list[float]] = field(default_factory=dict)  # record index -> [chosen, rejected]
    stats = PAIR_STATS

    @property
    def name(self) -> str:
        return self.method

    @property
    def reference_passes(self) -> int:
        return int(self.reference == "adapter")

    def batch(self, units: list, fast: FastPaths, pad_id: int) -> Batch:
        """The pairs' sequences laid out as the run's fast paths lay out any sequences, with
        their cached reference log-probs (made on the host with the batch, moved with it)."""
        batch = fast.batch(units, pad_id)
        if self.reference != "cached":
            return batch
        return replace(batch, reference_logps=torch.tensor([v for u in units for v in self.cache[u.record_index]]))

    def normalizer(self, units: list) -> int:
        return len(units)

    def batch_normalizer(self, batch: Batch) -> int:
        return batch.n_pairs

    def __call__(self, model, batch: Batch) -> torch.Tensor:
        logps, counts = sequence_log_probs(model, batch, self.chunk)
        reference = self._reference_logps(model, batch)
        losses, chosen_rewards, rejected_rewards = self.pair_losses(logps, counts, reference)
        won = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
        return torch.stack(
            [
                losses.sum(),
                won.sum(),
                chosen_rewards.sum(),
                rejected_rewards.sum(),
                (chosen_rewards - rejected_rewards).sum(),
            ]
        )

    def pair_losses(
        self, logps: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, chosen reward, rejected reward) of each pair, from the sequences' summed
        log-probs and token counts in layout order (chosen, rejected, chosen, ...)."""
        chosen, rejected = logps[0::2], logps[1::2]
        if self.method == "dpo":
            chosen_ratio, rejected_ratio = chosen - reference[0::2], rejected - reference[1::2]
            z = self.beta * (chosen_ratio - rejected_ratio)
            losses = -(1 - self.label_smoothing) * F.logsigmoid(z) - self.label_smoothing * F.logsigmoid(-z)
            return losses, self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach()
        chosen_mean, rejected_mean = chosen / counts[0::2], rejected / counts[1::2]
        if self.method == "simpo":
            losses = -F.logsigmoid(self.beta * (chosen_mean - rejected_mean) - self.gamma)
            return losses, self.beta * chosen_mean.detach(), self.beta * rejected_mean.detach()
        # ORPO: log odds(p) = log p - log(1 - p), from the mean log-prob; log(1 - e^x) = log(-expm1(x))
        log_odds = (chosen_mean - rejected_mean) - (_log1m_exp(chosen_mean) - _log1m_exp(rejected_mean))
        losses = -chosen_mean - self.orpo_lambda * F.logsigmoid(log_odds)
        return losses, self.orpo_lambda * chosen_mean.detach(), self.orpo_lambda * rejected_mean.detach()

    def _reference_logps(self, model, batch: Batch) -> torch.Tensor | None:
        if self.reference == "cached":
            return batch.reference_logps
        if self.reference == "none":
            return None
        with torch.no_grad(), adapter_off(model):
            return sequence_log_probs(model, batch, self.chunk)[0]

    def describe(self) -> str:
        settings = {
            "dpo": f"beta {self.beta:g}, label smoothing {self.label_smoothing:g}",
            "orpo": f"lambda {self.orpo_lambda:g}",
            "simpo": f"beta {self.beta:g}, gamma {self.gamma:g}",
        }[self.method]
        reference = {
            "adapter": "; reference: the model with its adapter off, in each step (no copy of the weights)",
            "cached": "; reference: log-probs computed once before training (no copy of the weights)",
            "none": "; no reference model",
        }[self.reference]
        return f"objective: {self.method} on preference pairs ({settings}){reference}"


Objective = SFT | Preference


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate near 0 too; clamped where x rounds to 0 (p = 1)."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-7)))


def objective_for(cfg: RunConfig, fast: FastPaths) -> Objective:
    """The run's objective (`--method`), computing log-probs the way its fast paths say. DPO
    takes its reference from the adapter switched off under LoRA; with --pref.precompute-ref or
    under full fine-tuning (which has no adapter to switch off), from log-probs computed once
    before training, which the caller fills in (`reference_log_probs`)."""
    p = cfg.pref
    if p.method == "sft":
        return SFT(fast.ce_chunk)
    reference = "none"
    if p.method == "dpo":
        reference = "cached" if p.precompute_ref or not cfg.lora.enabled else "adapter"
    return Preference(p.method, p.resolved_beta(), p.label_smoothing, p.orpo_lambda, p.gamma, fast.ce_chunk, reference)


def adapter_off(model):
    """The model as its reference: its LoRA adapter switched off (PEFT), or itself."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def reference_log_probs(
    model, units: list, fast: FastPaths, pad_id: int, policy: PrecisionPolicy, micro: int
) -> dict[int, list[float]]:
    """Each pair's reference log-probs, [chosen, rejected] by record index: the model as it is
    now (before training), its adapter off, `micro` pairs at a time, without gradients, laid
    out and computed as the training steps compute them."""
    was_training = model.training
    model.eval()
    out: dict[int, list[float]] = {}
    longest = max(len(s.input_ids) for s in sequences_of(units))
    with torch.no_grad(), adapter_off(model), fast.during_steps(model, longest):
        for start in range(0, len(units), micro):
            chunk = units[start : start + micro]
            with policy.autocast():
                logps, _ = sequence_log_probs(model, fast.batch(chunk, pad_id).to(policy.device), fast.ce_chunk)
            values = logps.tolist()
            for i, unit in enumerate(chunk):
                out[unit.record_index] = values[2 * i : 2 * i + 2]
    model.train(was_training)
    sharding.reshard(model)
    return out
