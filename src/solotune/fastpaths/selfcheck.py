"""The set-up check: a fast path the model cannot take is turned off, and says why.

Before the loop, each fast path the run asks for (registry.FAST_PATHS: the fused SwiGLU,
padding-free rows, the chunked LM head and cross-entropy) runs on a short probe batch and is
compared with the model's own plain forward (a padded batch, the full logits). A fast path that
disagrees beyond the rounding of the compute dtype, or that fails, is turned off for this
model, with a line saying why. This is what keeps an architecture the fast paths were not
written for (absolute positions, logits scaled or capped after the LM head, sliding windows,
attention without SDPA) trainable. The decision (registry.FastPaths) is made here once and
handed on. Its counterpart after the first step is training/gradients.py.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from solotune.config import TrainConfig
from solotune.data import Batch, Example, collate
from solotune.errors import is_out_of_memory
from solotune.fastpaths.attention import disable_padding_free
from solotune.fastpaths.kernels import choose_kernels, keep_faster, time_step, use_liger
from solotune.fastpaths.registry import FAST_PATHS, FastPaths
from solotune.fastpaths.technique import FastPath, Probe, largest_difference, logits
from solotune.model.precision import PrecisionPolicy

PROBE_RECORDS = 3  # several records, so that attention leaking between them shows
PROBE_TOKENS = 48  # each cut to this many: the check costs a few short forwards
# The largest relative difference allowed between a fast path and the plain forward (see
# technique.largest_difference). Each comparison changes one thing, so on the CPU the kept paths measured
# 0 to 4e-6 in every dtype; the margin is for other kernels on GPUs, whose 16-bit results round
# at 2^-8 (bf16) or 2^-11 (fp16). Faults measure far more: Granite's logit scale left out, 3.0;
# records that see each other in a padding-free row, 1.5 (both on tiny random models, fp32).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
# In 16 bits, after the fp32 twin has decided the structure: the model's own paths must agree to
# this, far above their rounding (2.8e-2 the largest seen, bf16 on the embedded default) and
# below a path that computes something else (faults measure 1 and more).
SANITY = 0.25


def probe_examples(examples: list[Example], vocab_size: int | None = None) -> list[Example]:
    """The first few records, cut short, with every next token a target: the paths are compared
    as functions, so which positions carry loss in training does not matter here. `vocab_size`:
    token ids folded into a smaller vocabulary (the structural twin's)."""
    fold = (lambda ids: [t % vocab_size for t in ids]) if vocab_size else list
    probe = [fold(e.input_ids[:PROBE_TOKENS]) for e in examples[:PROBE_RECORDS]]
    return [Example(ids, list(ids), e.record_index) for ids, e in zip(probe, examples)]


@dataclass(frozen=True)
class RunShape:
    """What the set-up check knows of the run: its records, the padding id, its precision and
    settings, and the longest a record may be."""

    examples: list[Example]
    pad_id: int
    policy: PrecisionPolicy
    cfg: TrainConfig
    max_len: int


def choose_fast_paths(model, run: RunShape, compiling: bool = False) -> FastPaths:
    """Switch on the fast paths `run.cfg` asks for, each only where it matches the plain forward.

    Each comparison changes one thing, so that only a fault, not the rounding of other kernels
    on other shapes, can tell the two apart: the fused SwiGLU against the model's MLPs on the
    same padded batch; a padding-free row against each record run alone; the chunked head
    against the model's logits on the same batch.

    In fp32 the model itself is compared, to TOLERANCE. In 16 bits a sound path and a faulty
    one can differ by the same amount (bf16, the embedded default: padding-free rows 2.8e-2
    sound, a leak between records 3.2e-2 to 3.9e-2 elsewhere), so the structure is decided in
    fp32 on the model's twin (`structural_twin`: its architecture, one or two layers, random
    weights), to 1e-4, where faults measure 1.3 and more; the model itself must then agree to
    SANITY in its own precision: its kernels run (flash attention's variable-length path, say)
    and give nothing far off. A model that changes its logits after the head (soft-capping,
    scaling) keeps the full head by declaration (`declared_logit_change`).

    Liger's kernels are numerics, not structure: compared on the model in its precision, to
    TOLERANCE; under `--train.kernels auto` kept only where faster at the run's shape (timed),
    and never in a compiled run (`compiling`): inductor fuses the norms and the rotary embedding
    itself, and Triton kernels traced by dynamo fail to compile.
    """
    fast = FastPaths()
    policy, cfg = run.policy, run.cfg
    declared = declared_logit_change(model.config)
    if declared and cfg.ce_chunk:
        fast.notes.append(f"chunked LM head + cross-entropy off for this model: {declared}")
        run = replace(run, cfg=replace(cfg, ce_chunk=0))
    dtype = policy.compute_dtype if policy.compute_dtype != torch.float32 else policy.base_dtype
    tolerance = TOLERANCE[dtype]
    undo_liger = _choose_liger(model, run, compiling, fast, tolerance)
    if dtype != torch.float32:
        twin = structural_twin(model)
        if twin is not None:
            fp32 = PrecisionPolicy(policy.device, torch.float32, torch.float32, policy.scaler)
            structure = _check_paths(twin, replace(run, policy=fp32), TOLERANCE[torch.float32])
            fast.notes += [f"{note} (fp32, on a {_layers(twin)}-layer twin)" for note in structure.notes]
            run = replace(run, cfg=replace(run.cfg, **structure.kept))
            tolerance = SANITY
            del twin
    paths = _check_paths(model, run, tolerance)
    fast.kept = paths.kept
    fast.largest_difference = max(fast.largest_difference, paths.largest_difference)
    fast.notes += paths.notes
    if undo_liger and cfg.kernels == "auto":
        _time_liger(model, run, fast, undo_liger)
    return fast


def _choose_liger(model, run: RunShape, compiling: bool, fast: FastPaths, tolerance: float):
    """Liger's kernels in `model` where they can run and match its plain forward; their undo, or None."""
    policy, cfg = run.policy, run.cfg
    liger, why = choose_kernels(cfg.kernels, policy.device)
    if not liger:
        if policy.device.type == "cuda" and cfg.kernels == "auto":
            fast.notes.append(why)  # on a GPU, say what installing them would bring
        return None
    if compiling:
        fast.notes.append("Liger RMSNorm + RoPE off: the run compiles, and inductor fuses both itself")
        return None
    padded = collate(probe_examples(run.examples), run.pad_id).to(policy.device)
    with _probing(model), torch.no_grad(), policy.autocast():
        undo = _check_liger(model, padded, fast, tolerance)
    fast.kernels = "liger" if undo else "none"
    return undo


def _check_paths(model, run: RunShape, tolerance: float) -> FastPaths:
    """Each fast path the run asks for (registry.FAST_PATHS, in order), switched on in `model`,
    compared with its plain forward to `tolerance`, and kept or undone; what was kept, and why not."""
    fast = FastPaths()
    vocab = model.config.vocab_size
    probe = Probe(
        probe_examples(run.examples, vocab), run.pad_id % vocab, run.max_len,  # the twin's vocabulary is smaller
        run.policy.device, attention=model.config._attn_implementation,
    )  # fmt: skip
    with _probing(model), torch.no_grad(), run.policy.autocast():
        for path in FAST_PATHS:
            asked = getattr(run.cfg, path.field)
            if asked != path.off:
                fast.kept[path.field] = asked  # what `difference` runs with
                if not _check(path, model, probe, fast, tolerance):
                    fast.kept[path.field] = path.off
    return fast


def _check(path: FastPath, model, probe: Probe, fast: FastPaths, tolerance: float) -> bool:
    """Switch `path` on and keep it where it matches the plain forward."""
    if not path.enable(model, probe):  # nothing in this model for it to change
        return False
    return _keep(fast, path.name, tolerance, lambda: path.difference(model, probe, fast.kept),
                 undo=lambda: path.undo(model, probe))  # fmt: skip


@contextlib.contextmanager
def _probing(model):
    """Eval mode (no dropout: the paths must agree up to rounding) and the model's own attention
    afterwards: the loop switches padding-free attention on for its steps alone."""
    was_training, attention = model.training, model.config._attn_implementation
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        disable_padding_free(model, attention)


# Logits changed after the LM head, by a config field: the chunked head would leave it out. Known
# by declaration, since a measure sees the change only where it exceeds the tolerance (a soft cap
# hardly touches the small logits of a probe).
LOGIT_CHANGES = {
    "final_logit_softcapping": "its logits are soft-capped after the head (final_logit_softcapping = {})",
    "logits_scaling": "its logits are scaled after the head (logits_scaling = {})",
    "logit_scale": "its logits are scaled after the head (logit_scale = {})",
}


def declared_logit_change(config) -> str | None:
    """Why the model's logits are not its LM head's output alone, where its config says so."""
    for field_name, why in LOGIT_CHANGES.items():
        value = getattr(config, field_name, None)
        if value not in (None, 0, 1, 1.0):
            return why.format(value)
    return None


STRUCTURE_VOCAB = 1024  # the twin's vocabulary: the head's structure, not its size, is checked
INTERMEDIATE_SIZE = 1024  # likewise its MLP width


def structural_twin(model):
    """The model's architecture in fp32 on its device, with random weights: one layer (two where
    the config sets layer types, such as sliding and full attention in turn), a small vocabulary
    and MLP. What the fast paths could get wrong is structure, which a layer shows as well as
    thirty, in fp32 far above rounding; the twin costs ~0.3 GiB for a 7B model. None where the
    architecture cannot be built again from its config."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(base.config)
    layers = 2 if getattr(config, "layer_types", None) else 1
    changes = dict(num_hidden_layers=layers, vocab_size=min(config.vocab_size, STRUCTURE_VOCAB))
    if isinstance(getattr(config, "intermediate_size", None), int):
        changes["intermediate_size"] = min(config.intermediate_size, INTERMEDIATE_SIZE)
    if getattr(config, "layer_types", None):
        changes["layer_types"] = list(config.layer_types[:layers])
    for name, value in changes.items():
        setattr(config, name, value)
    for token in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(config, token, None), int) and getattr(config, token) >= config.vocab_size:
            setattr(config, token, None)
    config.quantization_config = None
    device = base.get_input_embeddings().weight.device
    try:
        torch.manual_seed(0)
        with torch.device(device):
            twin = type(base)(config).to(torch.float32)
    except Exception:  # an architecture whose config does not rebuild it: the model alone decides
        return None
    if _layers(twin) != layers:  # the class did not build from num_hidden_layers
        return None
    twin.set_attn_implementation(base.config._attn_implementation)
    return twin.eval()


def _layers(model) -> int:
    return sum(1 for m in model.modules() if isinstance(m, GradientCheckpointingLayer))


def _time_liger(model, run: RunShape, fast: FastPaths, undo) -> None:
    """Keep Liger's kernels only where a training step at the run's shape is faster with them
    (measured on an H200: 0.78x on a 1B shape, where the model's own ran through cuBLAS and
    PyTorch's fused ops)."""
    step = training_step_probe(model, run, fast)
    with_liger = time_step(step, run.policy.device)
    undo()
    keep, line = keep_faster("Liger RMSNorm + RoPE", with_liger, time_step(step, run.policy.device))
    if keep:
        use_liger(model)
    fast.kernels = "liger" if keep else "none"
    fast.notes.append(line)
    model.zero_grad(set_to_none=True)


def training_step_probe(model, run: RunShape, fast: FastPaths):
    """A forward and backward of the run's largest micro-batch, as the loop runs it, to time; its
    dropout draws leave the run's random stream as it was."""
    policy, cfg, max_len, pad_id = run.policy, run.cfg, run.max_len, run.pad_id
    longest = sorted(run.examples, key=lambda e: len(e.input_ids), reverse=True)
    micro = longest[: max(1, cfg.batch // cfg.grad_accum)]
    batch = fast.batch(micro, pad_id).to(policy.device)
    loss_fn = fast.loss_fn()
    devices = [policy.device] if policy.device.type == "cuda" else []

    def step() -> None:
        with torch.random.fork_rng(devices=devices), fast.during_steps(model, max_len), policy.autocast():
            loss = loss_fn(model, batch)
        loss.backward()

    return step


def _check_liger(model, padded: Batch, fast: FastPaths, tolerance: float):
    """Liger's kernels in `model` where they match its plain forward; returns their undo, or None."""
    plain = logits(model, padded)
    undo = []

    def undo_all() -> None:
        for u in undo:
            u()

    def difference() -> float:
        undo.append(use_liger(model))
        return largest_difference(logits(model, padded), plain, padded)

    return undo_all if _keep(fast, "Liger RMSNorm + RoPE", tolerance, difference, undo=undo_all) else None


def _keep(fast: FastPaths, name: str, tolerance: float, difference, undo=lambda: None) -> bool:
    """Run one comparison; True to keep the path, else undo it and note why."""
    try:
        diff = difference()
    except Exception as e:  # a path that cannot run on this model is a path to turn off
        if is_out_of_memory(e):
            raise
        undo()
        fast.notes.append(f"{name} off for this model: {_first_line(e)}")
        return False
    if not diff <= tolerance:  # also catches NaN
        undo()
        fast.notes.append(
            f"{name} off for this model: it differs from the model's plain forward by {diff:.1e} "
            f"(relative; tolerance {tolerance:.0e})"
        )
        return False
    fast.largest_difference = max(fast.largest_difference, diff)
    return True


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
