"""torch.compile of the decoder layers for the loop (`--train.compile`): when, and how.

`choose_compile` decides, once, at set-up; `CompiledLayers` swaps each layer's forward for its
compiled one while the loop runs, keeps the number of graphs bounded, and gives up (eager
again, one line) past its bounds.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from solotune.errors import SolotuneError
from solotune.fastpaths.attention import segments_aside

# --train.compile auto: the devices where compiling has been measured to pay back, and from how
# many steps (benchmarks/vs_trl.py --focus compiled; device_gpu.sh on a GPU). None yet: on the
# H200 it stalled (a graph per step, before the graphs were bounded) and has not been measured
# since; on a 2-core CPU it won 1.08x on 32 long steps, less than its variance elsewhere.
COMPILE_PAYS_BACK_FROM: dict[str, int] = {}


def choose_compile(requested: str, track_memory: str, device: torch.device, n_steps: int) -> tuple[bool, str]:
    """Whether the loop compiles its layers, and the line that says why.

    auto compiles only where it has been measured to pay back (COMPILE_PAYS_BACK_FROM) for a run
    of that many steps.
    """
    if requested != "auto":
        return requested == "on", f"compile: {requested} (requested)"
    if track_memory == "always":
        return False, "compile: off (auto: every step is tracked, and tracked steps run eager)"
    min_steps = COMPILE_PAYS_BACK_FROM.get(device.type)
    if min_steps is None:
        return False, f"compile: off (auto: not yet measured to pay back on {device.type}; --train.compile on)"
    if n_steps < min_steps:
        return False, f"compile: off (auto: {n_steps} steps are too few to pay back the compile time)"
    return True, f"compile: on (auto: measured to pay back on {device.type} from {min_steps} steps)"


# A compile past either bound stops, and the run goes on eager (loop.py): graphs past this many mean
# something recompiles per shape (a sound SFT run makes 2 to 5; DPO's reference pass, without
# gradients and with the adapter off, adds its own variants: 8 in tests/test_loop.py); seconds past
# this many cost more than compiling can win back.
MAX_GRAPHS = 12
COMPILE_BUDGET_S = 240.0


class CompiledLayers:
    """torch.compile every decoder layer's forward for the loop; eager again afterwards.

    Layers, not the whole model: all layers share one compiled graph, the loss and LM head
    stay eager, and a graph break costs one layer, not the step. Shapes are dynamic from the
    start, so a new record length does not recompile (a new number of records per micro-batch
    does, once: the last step's when the batch does not divide the data). Generation, before
    and after the loop, runs eager: it would otherwise compile graphs of its own. `eager()`
    runs a step uncompiled (the memory tracker's per-op hook cannot be traced).

    What would recompile is kept out of the graphs: a padding-free row's segment lengths, a
    tuple of ints whose values dynamo would guard on (a new graph each step), go around the
    compiled forward to the attention (attention.segments_aside); and the first layer, whose
    input needs no gradient when the embeddings are frozen (LoRA) while every later layer's
    does, runs eager rather than as a second variant of every graph.
    """

    def __init__(self, model, backend: str = "inductor"):
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not layers:
            raise SolotuneError(f"train.compile: found no decoder layers to compile in {type(model).__name__}")
        frozen_input = not model.get_input_embeddings().weight.requires_grad
        self.layers = layers[1:] if frozen_input and len(layers) > 1 else layers
        self.compiled = [
            _segments_aside(torch.compile(layer.forward, dynamic=True, backend=backend)) for layer in self.layers
        ]
        self.graphs_before = _graph_count()
        self.stopped = False

    def __enter__(self) -> CompiledLayers:
        if not self.stopped:
            for layer, forward in zip(self.layers, self.compiled):
                layer.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)  # the instance attribute: the class's eager forward again

    @contextlib.contextmanager
    def eager(self):
        self.__exit__()
        try:
            yield
        finally:
            self.__enter__()

    def stop_if_over_budget(self, compile_s: float) -> str | None:
        """Eager from now on if compiling has passed its bounds (MAX_GRAPHS, COMPILE_BUDGET_S);
        the line that says so, or None."""
        graphs = _graph_count() - self.graphs_before
        if self.stopped or (graphs <= MAX_GRAPHS and compile_s <= COMPILE_BUDGET_S):
            return None
        self.stopped = True
        self.__exit__()
        return (
            f"compile: off from here, eager ({graphs} graphs and {compile_s:.0f} s of compiling so far, "
            f"past the bounds of {MAX_GRAPHS} graphs and {COMPILE_BUDGET_S:.0f} s)"
        )


def _segments_aside(compiled_forward):
    """The compiled layer forward, called without the padding-free row's segment arguments, which
    the attention takes from `segments_aside` instead (they are plain ints: dynamo would
    specialize on them)."""

    def forward(*args, segment_lengths=None, segment_offsets=None, **kwargs):
        with segments_aside(segment_lengths, segment_offsets):
            return compiled_forward(*args, **kwargs)

    return forward


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compile_seconds() -> float:
    """Seconds torch.compile has spent so far in this process (Dynamo + Inductor, all frames)."""
    from torch._dynamo.utils import compilation_time_metrics  # private, but the only such record

    return sum(compilation_time_metrics.get("_compile.compile_inner", []))
