"""The loop: the memory breakdown only where it can matter (its rehearsal), compiled steps beside
tracked ones, and one device-to-host sync per optimizer step."""

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from solotune.config import DataConfig, LoraConfig, PrecisionConfig, TrainConfig
from solotune.data import Record, collate, collate_packed, tokenize_records
from solotune.fastpaths.attention import padding_free_attention
from solotune.measure.memory import PeakSteps, step_size
from solotune.model.adapters import apply_lora, prepare_full_finetune
from solotune.model.precision import resolve_policy
from solotune.testing import make_model
from solotune.training import loop as loop_module
from solotune.training.compile import CompiledLayers, choose_compile
from solotune.training.optim import make_optimizer
from solotune.training.step import StepContext, train_step

FP32 = PrecisionConfig(mp="off")


def varied_examples(tokenizer, n=24):
    """Records whose lengths rise and fall irregularly, so that later steps are sometimes larger."""
    rows = [{"prompt": "q" * (5 + (i * 37) % 90), "response": "a" * (3 + (i * 53) % 70)} for i in range(n)]
    examples, _, _ = tokenize_records([Record(r, f"row {i}") for i, r in enumerate(rows)], tokenizer, DataConfig())
    return examples


def run_loop(tokenizer, track_memory, full=False, **train):
    torch.manual_seed(0)
    model = make_model(tokenizer, hidden_size=96, num_hidden_layers=2)
    model = prepare_full_finetune(model) if full else apply_lora(model, LoraConfig(r=4, dropout=0.0))
    policy = resolve_policy(FP32, "cpu", frozen_base=not full)
    cfg = TrainConfig(batch=4, epochs=2, track_memory=track_memory, **train)
    return loop_module.train_loop(model, varied_examples(tokenizer), tokenizer.pad_token_id, policy, cfg)


PARTS = ("tracked_peak_mib", "parameters_mib", "gradients_mib", "optimizer_state_mib", "activations_mib")


@pytest.mark.parametrize(
    ("full", "padding_free"), [(False, True), (False, False), (True, True)], ids=["lora", "lora-padded", "full"]
)
def test_tracking_only_the_steps_that_can_set_the_peak_gives_the_whole_breakdown(tokenizer, full, padding_free):
    """`peak` rehearses the largest step before the loop, follows none or few of the 12 steps in
    it, and reports the very parts `always` reports (fp32, deterministic: equal to the byte),
    with the same losses: the rehearsal changed nothing."""
    always = run_loop(tokenizer, "always", full=full, padding_free=padding_free)
    peak = run_loop(tokenizer, "peak", full=full, padding_free=padding_free)
    assert peak.losses == always.losses
    assert always.memory["tracked_steps"] == 12 and always.memory["rehearsal_s"] == 0
    assert peak.memory["tracked_steps"] < 12 and peak.memory["rehearsal_s"] > 0
    assert {k: peak.memory[k] for k in PARTS} == {k: always.memory[k] for k in PARTS}
    assert peak.memory["part_max"] == always.memory["part_max"]  # each part's maximum over the loop
    for part, most in always.memory["part_max"].items():
        assert most >= always.memory[part]  # at least its share of the peak


def test_the_rehearsal_leaves_no_step_of_the_loop_to_follow(tokenizer):
    """With the optimizer state allocated before the loop and the largest step rehearsed, `peak`
    follows none of these 12 steps (padded batches, whose size the rehearsal's key, records x
    longest, measures), in either order; the loop's losses are those of a run without the
    breakdown, and the breakdown is the same in either order."""
    first = run_loop(tokenizer, "peak", padding_free=False, seed=3)
    planned = run_loop(tokenizer, "peak", padding_free=False, seed=3, largest_first=False)
    untracked = run_loop(tokenizer, "off", padding_free=False, seed=3)
    assert first.memory["tracked_steps"] == planned.memory["tracked_steps"] == 0
    assert first.losses == untracked.losses and first.grad_norms == untracked.grad_norms
    assert {k: first.memory[k] for k in PARTS} == {k: planned.memory[k] for k in PARTS}


def test_each_parts_maximum_shows_the_activations_a_full_finetune_peak_hides(tokenizer):
    """A full fine-tune peaks in the optimizer step, after backward freed the activations: the
    split at the peak shows few, their own maximum (reached in the forward) many more."""
    torch.manual_seed(0)
    model = prepare_full_finetune(make_model(tokenizer, hidden_size=256, num_hidden_layers=4))
    rows = [{"prompt": "q" * (5 + i), "response": "a" * (3 + i)} for i in range(8)]
    examples, _, _ = tokenize_records([Record(r, f"row {i}") for i, r in enumerate(rows)], tokenizer, DataConfig())
    policy = resolve_policy(FP32, "cpu", frozen_base=False)
    cfg = TrainConfig(batch=4, epochs=1, track_memory="always")
    memory = loop_module.train_loop(model, examples, tokenizer.pad_token_id, policy, cfg).memory
    assert memory["optimizer_state_mib"] > 0  # the peak is in the optimizer step
    assert memory["part_max"]["activations_mib"] > 2 * memory["activations_mib"]
    assert memory["part_max"]["optimizer_state_mib"] == memory["optimizer_state_mib"]


def test_a_step_is_followed_unless_an_earlier_one_was_at_least_as_large():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    steps = PeakSteps(optimizer)
    assert steps.can_set_peak((100, 5000))  # the first
    assert not steps.can_set_peak((100, 5000)) and not steps.can_set_peak((90, 4000))
    assert steps.can_set_peak((80, 9000))  # a longer record: more attention area
    assert steps.can_set_peak((120, 100))  # more positions
    assert steps.can_set_peak((110, 8000))  # no earlier step is as large in both measures
    assert not steps.can_set_peak((105, 6000))  # (110, 8000) is
    optimizer.state[optimizer.param_groups[0]["params"][0]] = {"exp_avg": torch.zeros(3)}
    assert steps.can_set_peak((10, 10))  # the optimizer state grew: every bound is void


def test_a_row_the_attention_pads_into_a_batch_is_measured_as_that_batch():
    """Four records of about 60 tokens run as one padded batch of 4 x 64 (attention.py); one of
    100 and three of 20 run one call each. The shorter row holds more attention positions, and
    no measure lets the longer one hide it (the loss of that, a missed peak, was a real bug)."""
    similar, unequal = step_size([[60, 64, 50, 57]], True), step_size([[100, 20, 20, 20]], True)
    assert similar == (231, 4 * 64, 4 * 64 * 64) and unequal == (160, 160, 100**2 + 3 * 20**2)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    steps = PeakSteps(optimizer)
    assert steps.can_set_peak(step_size([[130, 40, 40, 40]], True)) and steps.can_set_peak(similar)


def test_compiled_steps_run_beside_tracked_eager_ones(tokenizer, monkeypatch):
    """--train.compile on with the breakdown: the losses and the breakdown of an uncompiled run
    (the followed steps ran eager), and fewer steps compiled than run. The aot_eager backend
    stands in for Inductor (Dynamo's capture without minutes of C++ compiling)."""
    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(loop_module, "CompiledLayers", functools.partial(CompiledLayers, backend="aot_eager"))
    eager = run_loop(tokenizer, "peak", compile="off")
    compiled = run_loop(tokenizer, "peak", compile="on")
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    assert {k: compiled.memory[k] for k in PARTS} == {k: eager.memory[k] for k in PARTS}
    assert compiled.compile_s > 0 and eager.compile_s == 0


def test_compile_auto_turns_on_only_where_it_was_measured_to_pay_back(monkeypatch):
    from solotune.training import compile as compiling

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compiling.COMPILE_PAYS_BACK_FROM == {}  # nowhere yet: auto never compiles
    for device in (cuda, cpu):
        on, why = choose_compile("auto", "peak", device, 10_000)
        assert (
            not on and why == f"compile: off (auto: not yet measured to pay back on {device.type}; --train.compile on)"
        )
    monkeypatch.setitem(compiling.COMPILE_PAYS_BACK_FROM, "cuda", 100)  # as a measurement would set it
    assert choose_compile("auto", "peak", cuda, 100)[0]
    assert not choose_compile("auto", "peak", cuda, 99)[0]
    assert not choose_compile("auto", "peak", cpu, 10_000)[0]
    assert not choose_compile("auto", "always", cuda, 10_000)[0]
    on, why = choose_compile("on", "off", cpu, 3)
    assert on and why == "compile: on (requested)"


# ---------------------------------------------------------------------------------------------
# Device-to-host syncs


# On a GPU each of these waits for the device. Seen through the dispatcher: a value read into
# Python (item, bool, float, int, an index), and the ops whose output shape depends on the
# values (nonzero, a boolean mask, unique, repeat_interleave without its size); a tensor made
# from Python data inside the step (on a GPU, a copy from pageable host memory, which waits).
SYNCING_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten.lift_fresh.default,
}
# Seen only in Python: copies to the host, and copies to a device that wait for it. Every tensor
# is on the CPU here, so `.to(device)` cannot tell a copy from the host from a no-op on the same
# device (the libraries' own, e.g. clip_grad_norm_'s); solotune's own calls are the ones counted.
HOST_COPIES = ("tolist", "numpy", "cpu", "to")


def _waits(func, args, kwargs) -> bool:
    if func in SYNCING_OPS:
        return True
    if func is torch.ops.aten.index.Tensor:  # a boolean mask is a nonzero
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    if func is torch.ops.aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    return False


def _blocking_copy(name: str, args: tuple, kwargs: dict, caller) -> bool:
    """`.to(device)` without non_blocking=True, by solotune: on a GPU, from pageable memory, it waits."""
    if name != "to":
        return True
    to_device = "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args)
    ours = f"{os.sep}solotune{os.sep}" in caller.f_code.co_filename
    return ours and to_device and not kwargs.get("non_blocking", False)


def _called_from(module: str) -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if module in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


class HostSyncs(TorchDispatchMode):
    """Counts the calls that would make the host wait for a GPU: ours, and those of transformers'
    mask builder apart. Calls inside `optimizer.step()` are left out: they read step counters,
    which PyTorch keeps on the CPU on every device."""

    def __init__(self, optimizer):
        super().__init__()
        self.counts = {"reads": 0, "transformers_mask": 0}
        self.where = []
        self.in_optimizer = False
        self.hooks = [
            optimizer.register_step_pre_hook(lambda *_: setattr(self, "in_optimizer", True)),
            optimizer.register_step_post_hook(lambda *_: setattr(self, "in_optimizer", False)),
        ]
        self.originals = {name: getattr(torch.Tensor, name) for name in HOST_COPIES}

    def count(self, what: str) -> None:
        if _called_from("masking_utils"):
            self.counts["transformers_mask"] += 1
        elif not self.in_optimizer:
            self.counts["reads"] += 1
            self.where.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _waits(func, args, kwargs):
            self.count(str(func))
        return func(*args, **kwargs)

    def __enter__(self):
        for name in HOST_COPIES:
            setattr(torch.Tensor, name, self._copying(name))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)
        for h in self.hooks:
            h.remove()
        return super().__exit__(*exc)

    def _copying(self, name):
        original = self.originals[name]

        def copy(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if _blocking_copy(name, args, kwargs, caller):
                self.count(f"Tensor.{name} at {caller.f_code.co_filename}:{caller.f_lineno}")
            return original(tensor, *args, **kwargs)

        return copy


OUR_FILE = os.path.join(os.sep, "src", "solotune", "step.py")  # a call made as if from solotune's code


def test_the_sync_counter_sees_each_kind_of_wait():
    """Each kind of call that waits for a GPU counts once; none of the step's own ops does."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    x = torch.randn(8)
    waits = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.sum() > 0),
        "tolist": lambda: x.tolist(),
        "cpu": lambda: x.cpu(),
        "nonzero": lambda: x.nonzero(),
        "mask": lambda: x[x > 0],
        "tensor from data": lambda: torch.tensor([1, 2], device=x.device),
        "blocking copy": lambda: eval(compile("x.to(x.device)", OUR_FILE, "eval"), {"x": x}),
        "repeat_interleave": lambda: x[:2].repeat_interleave(torch.full((2,), 2)),
    }
    for name, call in waits.items():
        with HostSyncs(optimizer) as syncs:
            call()
        assert syncs.counts["reads"] == 1, (name, syncs.where)
    with HostSyncs(optimizer) as syncs:
        eval(compile("x.to(x.device, non_blocking=True)", OUR_FILE, "eval"), {"x": x})
        y = (x * 2).to(x.device).softmax(0)  # a library's .to: not counted (see HOST_COPIES)
        y[torch.arange(3)] += 1  # index_put with integer indices: no wait
        torch.repeat_interleave(x, torch.full((8,), 2), output_size=16)
    assert syncs.counts["reads"] == 0, syncs.where


@pytest.mark.parametrize(
    ("mp", "full", "padding_free", "grad_accum"),
    [("off", False, True, 1), ("off", False, False, 2), ("bf16", False, True, 2), ("off", True, True, 1)],
    ids=["lora", "lora-padded-accum", "lora-bf16-accum", "full"],
)
def test_one_host_read_per_optimizer_step(tokenizer, mp, full, padding_free, grad_accum):
    model = make_model(tokenizer, hidden_size=64, num_hidden_layers=2)
    model = prepare_full_finetune(model) if full else apply_lora(model, LoraConfig(r=4, dropout=0.1))
    model.train()
    policy = resolve_policy(PrecisionConfig(mp=mp), "cpu", frozen_base=not full)
    examples = varied_examples(tokenizer, n=8)
    make = collate_packed if padding_free else functools.partial(collate, pad_id=tokenizer.pad_token_id)
    micro = [make(examples[i : i + 4 // grad_accum]) for i in range(0, 4, 4 // grad_accum)]
    optimizer, scheduler = make_optimizer(model, TrainConfig(), total_steps=3)
    attention = padding_free_attention(model, 512) if padding_free else contextlib.nullcontext()  # as the loop does
    with attention:
        train_step(StepContext(model, optimizer, scheduler, policy), micro, check_gradients=True)  # step 1 checks more
        for _ in range(2):
            with HostSyncs(optimizer) as syncs:  # the batch's move to the device included, as the loop does
                on_device = [mb.to(policy.device) for mb in micro]
                out = train_step(StepContext(model, optimizer, scheduler, policy), on_device)
            counts = syncs.counts
            assert counts["reads"] == 1, syncs.where
            # transformers reads a padded batch's mask back to see whether it may skip it; a
            # padding-free row (the default) has no mask to read
            assert (counts["transformers_mask"] > 0) == any(mb.has_padding for mb in micro), counts
            assert isinstance(out.loss, float) and isinstance(out.grad_norm, float) and not out.skipped


# ---------------------------------------------------------------------------------------------
# Liger's kernels


def test_liger_kernels_are_chosen_only_where_they_can_run(monkeypatch):
    import importlib.util

    from solotune.errors import SolotuneError
    from solotune.fastpaths.kernels import choose_kernels

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_kernels("auto", cpu) == (False, "kernels: none (auto: Liger's kernels run on CUDA GPUs)")
    with pytest.raises(SolotuneError, match="need a CUDA GPU"):
        choose_kernels("liger", cpu)
    real_find_spec = importlib.util.find_spec
    for installed in (False, True):
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a, i=installed: object() if i else real_find_spec(name + "-absent"),
        )
        assert choose_kernels("auto", cuda)[0] is installed
        assert choose_kernels("none", cuda)[0] is False
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SolotuneError, match="pip install liger-kernel"):
        choose_kernels("liger", cuda)


def test_asking_for_liger_kernels_on_the_cpu_stops_before_any_work(tmp_path, capsys):
    from solotune.cli import main

    assert main(["train", "--train.kernels", "liger", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "solotune: error: --train.kernels liger: Liger's Triton kernels need a CUDA GPU; use --train.kernels none"
    ]
    assert not (tmp_path / "run").exists()


NO_LIGER = importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None


@pytest.mark.skipif(NO_LIGER, reason="liger-kernel and triton are not installed (an optional extra)")
def test_liger_kernels_go_in_and_come_out_again(tokenizer):
    """`use_liger` puts Liger's RMSNorm into every norm and its RoPE into the model class, and
    `undo` gives the model its own back: the same logits as before, to the bit. (Runs where
    liger-kernel is installed; the kernels themselves need a GPU: Triton 3.9's interpreter
    cannot run Liger 0.8.5's RMSNorm on the CPU.)"""
    from transformers.models.llama import modeling_llama

    from solotune.fastpaths.kernels import use_liger

    model = apply_lora(make_model(tokenizer), LoraConfig(r=4, dropout=0.0)).eval()
    batch = collate(varied_examples(tokenizer, n=3), tokenizer.pad_token_id)
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    own_rope, own_norm = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm
    with torch.no_grad():
        before = model(**batch.model_inputs()).logits
    undo = use_liger(model)
    assert all("forward" in vars(m) for m in norms) and modeling_llama.apply_rotary_pos_emb is not own_rope
    undo()
    assert not any("forward" in vars(m) for m in norms) and modeling_llama.apply_rotary_pos_emb is own_rope
    assert modeling_llama.LlamaRMSNorm is own_norm  # models built later get the model's own norm
    with torch.no_grad():
        assert torch.equal(model(**batch.model_inputs()).logits, before)


def test_kernels_are_kept_only_where_a_timed_step_is_faster():
    """The kernel choice by measurement, on a fake timer: the step runs once to warm up, then
    `repeats` times under the timer; a candidate is kept only when it beats the plain path by
    the margin (within noise, the plain path wins)."""
    from solotune.fastpaths.kernels import KEEP_IF_FASTER, Timing, keep_faster, time_step

    calls, clock = [], iter([10.0, 10.6])  # start, end: 0.6 s over 3 steps
    timing = time_step(lambda: calls.append(1), torch.device("cpu"), repeats=3, timer=lambda: next(clock))
    assert len(calls) == 4 and timing.seconds == pytest.approx(0.2) and timing.peak_mib is None
    plain = Timing(0.2)
    keep, line = keep_faster("Liger RMSNorm + RoPE", Timing(0.2 * KEEP_IF_FASTER * 0.99), plain)
    assert keep and line.startswith("Liger RMSNorm + RoPE: kept (faster: ")
    keep, line = keep_faster("Liger RMSNorm + RoPE", Timing(0.2 * 0.99), plain)  # 1% faster: noise
    assert not keep and "off (not 3% faster: 198.0 ms a step with them, 200.0 ms without" in line
    keep, _ = keep_faster("Liger RMSNorm + RoPE", Timing(0.26), plain)  # slower, as on the H200
    assert not keep


def test_a_compiled_run_leaves_liger_out_and_says_so(tokenizer, monkeypatch):
    """Liger's Triton kernels crash inside dynamo (H200, --train.compile on): a run that compiles
    never puts them in, and the set-up check says why."""
    from solotune.fastpaths import selfcheck
    from solotune.testing import varied_examples as records

    applied = []
    monkeypatch.setattr(selfcheck, "choose_kernels", lambda requested, device: (True, "kernels: liger (auto)"))
    monkeypatch.setattr(selfcheck, "use_liger", lambda model: applied.append(model) or (lambda: None))
    model = apply_lora(make_model(tokenizer), LoraConfig(r=4, dropout=0.0))
    policy = resolve_policy(FP32, "cpu", frozen_base=True)
    examples = records(tokenizer)
    run = selfcheck.RunShape(examples, tokenizer.pad_token_id, policy, TrainConfig(), 512)
    fast = selfcheck.choose_fast_paths(model, run, compiling=True)
    assert fast.kernels == "none" and not applied
    assert "Liger RMSNorm + RoPE off: the run compiles, and inductor fuses both itself" in fast.notes
    fast = selfcheck.choose_fast_paths(model, dataclasses.replace(run, cfg=TrainConfig(kernels="liger")))
    assert fast.kernels == "liger" and applied  # not compiling: checked and kept (asked for, so not timed)


def _compiled_run(tokenizer, monkeypatch, padding_free: bool, steps: int = 16):
    """A 16-step LoRA run of varied record lengths under --train.compile on, its graphs counted by
    dynamo's CompileCounter backend: what recompiles is dynamo's capture, whatever backend then
    compiles the graphs (Inductor takes minutes per graph on this CPU)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(loop_module, "CompiledLayers", functools.partial(CompiledLayers, backend=counter))
    return _varied_lengths_run(tokenizer, padding_free, steps, compile="on"), counter


def _varied_lengths_run(tokenizer, padding_free: bool, steps: int, compile: str):
    """`steps` LoRA steps of 2 records each, whose lengths change from step to step; the default
    LoRA dropout, whose keyed masks must not recompile either."""
    rows = [{"prompt": "q" * (5 + (i * 37) % 90), "response": "a" * (3 + (i * 53) % 70)} for i in range(2 * steps)]
    examples, _, _ = tokenize_records([Record(r, f"row {i}") for i, r in enumerate(rows)], tokenizer, DataConfig())
    torch.manual_seed(0)
    model = apply_lora(make_model(tokenizer, num_hidden_layers=3), LoraConfig(r=4))
    policy = resolve_policy(FP32, "cpu", frozen_base=True)
    cfg = TrainConfig(batch=2, epochs=1, compile=compile, padding_free=padding_free, track_memory="off")
    return loop_module.train_loop(model, examples, tokenizer.pad_token_id, policy, cfg)


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding-free", "padded"])
def test_compiled_layers_compile_a_bounded_number_of_graphs(tokenizer, monkeypatch, padding_free):
    """Record lengths vary in every step; the graphs do not grow with them. Padding-free rows
    used to pass their segment lengths, a tuple of ints, through the compiled layer: a graph per
    step until dynamo's cache gave up (7 graphs in these 16 steps at 236e039; the H200's first
    compiled step took 80 s). Now, padding-free: the layer's graph before and after the attention
    (left out of the graph), a variant of the second for the attention module's other caller,
    and one the first steps' layouts add (4 to 5, by the data); padded: one graph with a mask
    and one without. Both well inside the bound at which a run gives up compiling. The losses
    are those of the eager loop."""
    from solotune.training.compile import MAX_GRAPHS

    compiled, counter = _compiled_run(tokenizer, monkeypatch, padding_free)
    assert len(compiled.losses) == 16
    assert counter.frame_count <= (5 if padding_free else 2) < MAX_GRAPHS, counter.frame_count
    monkeypatch.undo()
    eager = run_loop_eager(tokenizer, padding_free)
    assert compiled.losses == pytest.approx(eager, rel=1e-5)


def run_loop_eager(tokenizer, padding_free: bool, steps: int = 16) -> list[float]:
    return _varied_lengths_run(tokenizer, padding_free, steps, compile="off").losses


def test_a_compile_past_its_bounds_goes_on_eager_and_says_so(tokenizer, monkeypatch, capsys):
    """Past MAX_GRAPHS graphs (or COMPILE_BUDGET_S seconds) compiling stops: one line, the rest of
    the run eager, the same losses; never a stalled run."""
    from solotune.training import compile as compiling

    monkeypatch.setattr(compiling, "MAX_GRAPHS", 0)
    compiled, counter = _compiled_run(tokenizer, monkeypatch, padding_free=True, steps=6)
    graphs_after_first_step = counter.frame_count
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("compile: off from here")]
    assert len(lines) == 1 and "past the bounds of 0 graphs" in lines[0]
    assert graphs_after_first_step > 0 and len(compiled.losses) == 6
    monkeypatch.undo()
    assert compiled.losses == pytest.approx(run_loop_eager(tokenizer, True, steps=6), rel=1e-5)


def _dpo_run(tokenizer, steps: int, compile: str):
    """`steps` LoRA DPO steps of 2 pairs each, lengths varying, the reference pass (the adapter
    switched off) in every step."""
    from solotune.training.objective import Preference

    rows = [
        {"prompt": "q" * (5 + (i * 37) % 60), "chosen": "a" * (3 + (i * 53) % 40), "rejected": "b" * (2 + i % 9)}
        for i in range(2 * steps)
    ]
    records = [Record(r, f"pair {i}") for i, r in enumerate(rows)]
    pairs = tokenize_records(records, tokenizer, DataConfig(), pairs=True)[0]
    torch.manual_seed(0)
    model = apply_lora(make_model(tokenizer, num_hidden_layers=3), LoraConfig(r=4))
    policy = resolve_policy(FP32, "cpu", frozen_base=True)
    cfg = TrainConfig(batch=2, epochs=1, compile=compile, track_memory="off", lr=1e-2)
    objective = Preference("dpo", beta=0.1, reference="adapter")
    return loop_module.train_loop(model, pairs, tokenizer.pad_token_id, policy, cfg, objective=objective)


def test_compiled_dpo_with_its_reference_pass_compiles_a_bounded_number_of_graphs(tokenizer, monkeypatch):
    """DPO switches the adapter off for its reference pass in every step, without gradients: the
    compiled layers see both. The graphs stay bounded (8 here, not one per step), inside the
    bound at which a run gives up compiling, and the losses are the eager loop's."""
    from torch._dynamo.testing import CompileCounter

    from solotune.training.compile import MAX_GRAPHS

    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(loop_module, "CompiledLayers", functools.partial(CompiledLayers, backend=counter))
    compiled = _dpo_run(tokenizer, 12, compile="on")
    assert counter.frame_count <= 8 < MAX_GRAPHS, counter.frame_count  # 5 of SFT's + 3 of the reference pass
    monkeypatch.undo()
    assert compiled.losses == pytest.approx(_dpo_run(tokenizer, 12, compile="off").losses, rel=1e-5)
    assert compiled.losses[0] == pytest.approx(math.log(2), abs=1e-6)
