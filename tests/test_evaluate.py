"""Evaluation on held-out records: the eval loss is the training loss's definition, exactly; the
task accuracy is greedy generation scored against the records' answers."""

import json

import pytest
import torch
import torch.nn.functional as F

from solotune.cli import main
from solotune.config import PrecisionConfig
from solotune.data import IGNORE_INDEX, Record
from solotune.errors import SolotuneError
from solotune.fastpaths.registry import FastPaths
from solotune.model.precision import resolve_policy
from solotune.run.evaluate import HeldOut, hold_out, task_accuracy
from solotune.testing import make_model
from solotune.testing import varied_examples as examples

FP32 = resolve_policy(PrecisionConfig(mp="off"), "cpu", frozen_base=True)


def plain_mean_loss(model, exs) -> float:
    """Each record alone through the model's plain forward: summed CE over its response tokens,
    divided by all the records' response tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for e in exs:
            logits = model(torch.tensor([e.input_ids])).logits[0, :-1]
            targets = torch.tensor(e.labels[1:])
            total += F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    return total / count


@pytest.mark.parametrize("packed", [True, False], ids=["padding-free", "padded"])
@pytest.mark.parametrize("chunk", [0, 1024], ids=["full-logits", "chunked-head"])
def test_eval_loss_is_the_plain_forwards_mean_over_the_held_out_response_tokens(tokenizer, packed, chunk):
    """Micro-batches of 2 over 5 records of different lengths (the last micro-batch is short):
    the same number as a plain forward of each record alone (fp32, 1e-5)."""
    model = make_model(tokenizer).train()  # dropout is 0; eval mode is the evaluation's to set
    exs = examples(tokenizer, n=5)
    held = HeldOut(exs, tokenizer.pad_token_id, micro=2)
    loss = held.loss(model, FP32, FastPaths({"fused_swiglu": False, "padding_free": packed, "ce_chunk": chunk}))
    assert loss == pytest.approx(plain_mean_loss(model, exs), rel=1e-5)
    assert model.training  # left as it was found


def test_records_are_held_out_by_the_seed_before_training():
    exs = list(range(50))
    train, held = hold_out(exs, 0.1, seed=3)
    assert len(held) == 5 and sorted(train + held) == exs
    assert hold_out(exs, 0.1, seed=3) == (train, held)
    assert hold_out(exs, 0.1, seed=4)[1] != held
    assert len(hold_out(exs[:3], 0.01, seed=0)[1]) == 1  # at least one record
    with pytest.raises(SolotuneError, match="leaves no record"):
        hold_out(exs[:1], 0.5, seed=0)


def test_task_accuracy_scores_the_greedy_answers_generated_in_left_padded_batches(tokenizer):
    """Nine questions of different lengths (two generation batches). The expected answer of every
    other question is the model's own greedy answer, generated alone: exactly those count as
    correct, so the batched, left-padded answers are the ones generated one at a time."""
    model = make_model(tokenizer)
    model.eval()
    questions = [f"Question {i}: " + "why " * (i % 4) for i in range(9)]

    def alone(q: str) -> str:
        ids = tokenizer(q, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    own = [alone(q) for q in questions]
    assert len(set(own)) > 1
    expected = [own[i] if i % 2 == 0 else "zzzzzz" for i in range(9)]
    pairs = list(zip(questions, expected))
    result = task_accuracy(model, tokenizer, pairs, "exact", FP32, max_new_tokens=10)
    assert (result.correct, result.records) == (5, 9)
    assert [s["answer"] for s in result.samples] == own[:5]
    contains = task_accuracy(
        model, tokenizer, [(q, a[:3]) for q, a in pairs if a != "zzzzzz"], "contains", FP32, max_new_tokens=10
    )
    assert contains.correct == contains.records == 5


def test_a_run_with_held_out_records_reports_their_loss_and_accuracy(tiny_model_dir, tmp_path, capsys):
    """The built-in data with 20% held out: the training never sees them (its tokens are the
    rest's), the eval curve runs from step 0 to the last step, the accuracy is measured before and
    after, and --eval.keep-best saves the weights of the lowest point of the curve."""
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--samples", "20", "--batch", "4", "--max-len", "400",
            "--mp", "off", "--eval.split", "0.2", "--eval.every", "2", "--eval.keep-best", "--lr", "5e-3",
            "--no-generate.enabled", "--output-dir", str(out)]  # fmt: skip
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    e = m["eval"]
    assert e["records"] == 4 and e["metric"] == "exact"
    assert [s for s, _ in e["loss_curve"]] == [0, 2, 4]
    assert e["loss_curve"][0][1] == e["loss_before"] and e["loss_curve"][-1][1] == e["loss_after"]
    assert e["accuracy_before"]["records"] == e["accuracy_after"]["records"] == 4
    assert m["train"]["steps"] == 4  # 16 training records in steps of 4
    best_step = min(e["loss_curve"], key=lambda p: p[1])[0]
    assert json.loads((out / "best-adapter" / "best.json").read_text())["step"] == best_step
    assert (
        f"eval: loss {e['loss_before']:.4f} -> {e['loss_after']:.4f} on 4 held-out records" in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eval.split", "1.5"], "eval.split = 1.5: must be in [0, 1)"),
        (["--eval.split", "0.1", "--eval.data", "x.json"], "both give held-out records"),
        (["--eval.keep-best"], "needs held-out records"),
    ],
)
def test_bad_evaluation_options_are_refused_in_one_line(tiny_model_dir, tmp_path, capsys, extra, message):
    assert main(["train", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists()


def test_question_and_answer_follow_the_training_prompt():
    from solotune.data import format_instruction
    from solotune.run.evaluate import question_and_answer

    r = Record({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, "row 0")
    assert question_and_answer(r, "alpaca") == (format_instruction("Add 2 and 3.", ""), "5")
    assert question_and_answer(Record({"text": "free text"}, "row 1"), "text") is None
