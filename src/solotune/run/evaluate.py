"""Whether the fine-tune worked: the loss on held-out records, and the task accuracy on them
before and after training.

The eval loss is the training loss's own definition (the run's objective: for SFT the mean
cross-entropy over the response tokens), summed over every held-out record and divided once by
their response tokens (or pairs): exact, not a mean of batch means. A preference objective's
statistics come with it: the held-out reward accuracy and margin. It runs in micro-batches of the training's size, on
padding-free rows where training uses them, under `torch.no_grad`, with one device read at the
end.

The task accuracy asks the model for each held-out record's answer, greedily, and compares it
with the record's response: `exact` (equal after stripping whitespace) or `contains` (the
response appears in the answer). The built-in data set's answers are computed, so checkable; for
other data the metric is the user's choice (`--eval.metric`). Prompts are left-padded and
generated in batches.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace

import torch

from solotune.config import RunConfig
from solotune.data import (
    Record,
    count_loss_tokens,
    format_instruction,
    pair_parts,
    read_records,
    sequences_of,
    tokenize_records,
)
from solotune.errors import SolotuneError
from solotune.fastpaths.registry import FastPaths
from solotune.model.precision import PrecisionPolicy
from solotune.parallel import sharding
from solotune.prompting import Ask, PromptFormat
from solotune.run.generate import encode_left_padded
from solotune.training.objective import SFT, Objective

GENERATION_BATCH = 8
ANSWER_SLACK_TOKENS = 8  # generated beyond the longest expected answer, so that a wrong one shows


def hold_out(examples: list, split: float, seed: int) -> tuple[list, list]:
    """(train, held out): `split` of the examples, at least one, picked by `seed` before any training."""
    n_eval = max(1, round(split * len(examples)))
    if n_eval >= len(examples):
        raise SolotuneError(f"eval.split = {split}: it leaves no record of {len(examples)} to train on")
    chosen = set(random.Random(seed).sample(range(len(examples)), n_eval))
    train = [e for i, e in enumerate(examples) if i not in chosen]
    return train, [e for i, e in enumerate(examples) if i in chosen]


@dataclass
class HeldOut:
    """The held-out examples, evaluated as the training computes its loss (`micro` records a
    micro-batch, with the run's fast paths), every `every` steps."""

    examples: list  # the units: Examples, or preference Pairs
    pad_id: int
    micro: int
    every: int = 0
    on_best: Callable[[int], None] | None = None  # --eval.keep-best: called with the step of a new lowest loss
    best: float = math.inf

    def due(self, done: int, n_steps: int) -> bool:
        """Whether the loop evaluates after step `done` (the end of training is the caller's)."""
        return self.every > 0 and done % self.every == 0 and done < n_steps

    def loss(self, model, policy: PrecisionPolicy, fast: FastPaths, objective: Objective | None = None) -> float:
        return self.evaluate(model, policy, fast, objective or SFT(fast.ce_chunk))["loss"]

    def evaluate(self, model, policy: PrecisionPolicy, fast: FastPaths, objective: Objective) -> dict[str, float]:
        """The objective's loss over the held-out units (no gradients), and its statistics,
        computed as the run computes them: the same batch layout, loss and attention."""
        was_training = model.training
        model.eval()
        total = torch.zeros(1 + len(objective.stats), dtype=torch.float32, device=policy.device)
        longest = max(len(s.input_ids) for s in sequences_of(self.examples))
        with torch.no_grad(), fast.during_steps(model, longest):
            for start in range(0, len(self.examples), self.micro):
                batch = objective.batch(self.examples[start : start + self.micro], fast, self.pad_id)
                with policy.autocast():
                    total += objective(model, batch.to(policy.device)).float()
        model.train(was_training)
        sharding.reshard(model)  # FSDP2: a forward without backward leaves the root's weights gathered
        values = (total / objective.normalizer(self.examples)).tolist()
        return dict(zip(("loss", *objective.stats), values))

    def record(self, step: int, loss: float) -> None:
        """Note the loss of `step`; a new lowest one goes to `on_best`."""
        if loss < self.best:
            self.best = loss
            if self.on_best:
                self.on_best(step)


@dataclass
class Accuracy:
    metric: str  # exact or contains
    correct: int
    records: int
    seconds: float
    samples: list[dict] = field(default_factory=list)  # the first few: prompt, expected, answer

    @property
    def fraction(self) -> float:
        return self.correct / self.records

    def as_dict(self) -> dict:
        return {
            "metric": self.metric,
            "correct": self.correct,
            "records": self.records,
            "accuracy": self.fraction,
            "seconds": self.seconds,
            "samples": self.samples,
        }


def question_and_answer(record: Record, fmt: str) -> tuple[str, str] | None:
    """The prompt the model sees in training and the expected response; None for plain text."""
    r = record.fields
    if fmt == "alpaca":
        return format_instruction(r["instruction"], r.get("input") or ""), r["output"]
    if fmt == "prompt_response":
        return r["prompt"], r["response"]
    if fmt == "messages" and r["messages"] and r["messages"][-1].get("role") == "assistant":
        return r["messages"][:-1], r["messages"][-1]["content"]
    if fmt == "preference":  # the chosen answer is the expected one
        prompt, chosen, _ = pair_parts(record)
        return prompt, chosen
    return None


def task_accuracy(
    model, tokenizer, pairs: list[tuple], metric: str, policy: PrecisionPolicy, max_new_tokens: int | None = None
) -> Accuracy:
    """Greedy answers to `pairs` (question_and_answer's), scored by `metric`. `max_new_tokens`:
    default, the longest expected answer's tokens and a few more."""
    start = time.perf_counter()
    correct, samples = 0, []
    for first in range(0, len(pairs), GENERATION_BATCH):
        chunk = pairs[first : first + GENERATION_BATCH]
        answers = _generate_answers(model, tokenizer, chunk, policy, max_new_tokens)
        for (question, expected), answer in zip(chunk, answers):
            ok = _scores(answer, expected, metric)
            correct += ok
            if len(samples) < 5:
                shown = question if isinstance(question, str) else question[-1]["content"]
                samples.append({"prompt": shown[-200:], "expected": expected, "answer": answer, "correct": ok})
    return Accuracy(metric, correct, len(pairs), time.perf_counter() - start, samples)


def _scores(answer: str, expected: str, metric: str) -> bool:
    if metric == "exact":
        return answer.strip() == expected.strip()
    return expected.strip() in answer


def _generate_answers(model, tokenizer, pairs: list[tuple], policy: PrecisionPolicy, max_new_tokens: int | None):
    # As training tokenized them: a text prompt with the tokenizer's special tokens, a chat
    # template's rendering as it is (it writes its own).
    prompts = [
        Ask(q, q) if isinstance(q, str) else PromptFormat("chat", tokenizer.chat_template).ask_turns(q, tokenizer)
        for q, _ in pairs
    ]
    if max_new_tokens is None:
        longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, a in pairs)
        max_new_tokens = longest + ANSWER_SLACK_TOKENS
    inputs = encode_left_padded(tokenizer, prompts).to(policy.device)  # every row continues at its end
    was_training = model.training
    model.eval()
    with torch.no_grad(), policy.autocast():  # not inference mode: FSDP2 trains the weights it gathers
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    model.train(was_training)
    sharding.reshard(model)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@dataclass
class Evaluation:
    """A run's evaluation: the held-out loss before, during and after training, and the task
    accuracy before and after (where `metric` is not none)."""

    held_out: HeldOut
    pairs: list[tuple]  # (question, expected answer) of the records whose accuracy is measured
    metric: str  # exact, contains or none
    source: str  # where the held-out records came from, for the run's header
    results: dict = field(default_factory=dict)  # what goes into metrics.json

    def describe(self) -> str:
        accuracy = f"task accuracy ({self.metric}) on {len(self.pairs)}" if self.pairs else "no task accuracy"
        every = f", every {self.held_out.every} steps" if self.held_out.every else ""
        held = self.held_out.examples
        return (
            f"eval: {len(held)} held-out records ({self.source}), "
            f"{count_loss_tokens(sequences_of(held)):,} response tokens; loss before and after training{every}; "
            f"{accuracy}"
        )

    def run(
        self, when: str, model, tokenizer, policy: PrecisionPolicy, fast: FastPaths, step: int, objective: Objective
    ) -> None:
        """Evaluate `when` ("before" or "after") training, at `step`."""
        start = time.perf_counter()
        values = self.held_out.evaluate(model, policy, fast, objective)
        self.held_out.record(step, values["loss"])
        self.results.update({f"{name}_{when}": value for name, value in values.items()})
        if self.pairs:
            self.results[f"accuracy_{when}"] = task_accuracy(
                model, tokenizer, self.pairs, self.metric, policy
            ).as_dict()
        self.results[f"seconds_{when}"] = time.perf_counter() - start

    def metrics(self, during: list, n_steps: int) -> dict:
        """metrics.json's `eval`: the curve from before to after training (`during`: the loop's
        [step, loss] pairs), and the accuracies."""
        curve = [[0, self.results["loss_before"]], *during]
        if curve[-1][0] != n_steps:
            curve.append([n_steps, self.results["loss_after"]])
        return {"records": len(self.held_out.examples), "source": self.source, "metric": self.metric,
                **self.results, "loss_curve": curve, "best_loss": self.held_out.best}  # fmt: skip


def evaluation_for(cfg: RunConfig, records: list[Record], examples: list, fmt: str, tokenizer):
    """(training examples, Evaluation or None) for `cfg.eval`: held out of `examples` by seed
    (--eval.split), or read and tokenized from --eval.data as the training data is."""
    e = cfg.eval
    if not e.enabled:
        return examples, None
    if e.data:
        preference = cfg.pref.method != "sft"
        eval_records = read_records(dataclass_replace(cfg.data, path=e.data, samples=None), preference)
        held, _, eval_fmt = tokenize_records(eval_records, tokenizer, cfg.data, preference)
        source = e.data
    else:
        examples, held = hold_out(examples, e.split, cfg.train.seed)
        eval_records, eval_fmt, source = records, fmt, f"{e.split:g} of the data, seed {cfg.train.seed}"
    metric = e.metric if e.metric != "auto" else ("exact" if cfg.data.path is None and not e.data else "none")
    pairs = []
    if metric != "none":
        pairs = [p for x in held[: e.max_records] if (p := question_and_answer(eval_records[x.record_index], eval_fmt))]
    held_out = HeldOut(held, tokenizer.pad_token_id, cfg.micro_batch(), e.every)
    return examples, Evaluation(held_out, pairs, metric, source)
