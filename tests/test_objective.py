"""The training objectives (training/objective.py): the preference losses against their papers'
formulas and against TRL, the reference without a copy, exact accumulation over pairs, and the
preference records (data.py)."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from solotune.config import DataConfig, LoraConfig, PrecisionConfig, TrainConfig
from solotune.data import IGNORE_INDEX, Example, Pair, Record, make_batch, split_micro_batches, tokenize_records
from solotune.errors import SolotuneError
from solotune.fastpaths.loss import response_token_losses, sequence_log_probs
from solotune.fastpaths.registry import FastPaths
from solotune.model.adapters import apply_lora, prepare_full_finetune
from solotune.model.precision import resolve_policy
from solotune.testing import make_model
from solotune.training.objective import Preference, adapter_off, reference_log_probs
from solotune.training.step import accumulate_gradients

POLICY = resolve_policy(PrecisionConfig(mp="off"), "cpu", frozen_base=True)
METHODS = {
    "dpo": Preference("dpo", beta=0.1, reference="adapter"),
    "orpo": Preference("orpo", beta=0.0, orpo_lambda=0.2),
    "simpo": Preference("simpo", beta=2.0, gamma=0.5),
}


def pair_rows(n=8):
    """Pairs of different lengths; the rejected answer a near miss of the chosen one."""
    return [
        {
            "prompt": f"Q{i}: what is {i} + {i}? " + "so " * (i % 3),
            "chosen": f"{2 * i}",
            "rejected": f"{2 * i + 1} or so",
        }
        for i in range(n)
    ]


def pairs_from(tokenizer, rows, **data):
    records = [Record(r, f"pair {i}") for i, r in enumerate(rows)]
    return tokenize_records(records, tokenizer, DataConfig(max_len=512, **data), pairs=True)[0]


def adapted_model(tokenizer, seed=0):
    """A LoRA model whose adapter is not zero (B drawn), so that policy and reference differ."""
    model = apply_lora(make_model(tokenizer, seed=seed), LoraConfig(r=4, dropout=0.0)).train()
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_grads(g1, g2, tol):
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1:
        rel = (g2[name] - g1[name]).norm() / g1[name].norm().clamp_min(1e-12)
        assert rel < tol, f"{name}: relative gradient difference {rel:.2e}"


# ---------------------------------------------------------------------------------------------
# Per-position log-probs from the chunked head


@pytest.mark.parametrize("head_trains", [False, True], ids=["frozen-head", "trained-head"])
def test_token_losses_from_the_chunked_head_equal_the_full_logits(tokenizer, head_trains):
    """-log p of each answer token, and its gradient under an uneven weighting (what an objective
    makes of the positions), from the chunked head (fused for a frozen head, checkpointed chunks
    for a trained one) against the model's full logits, fp32."""
    pairs = pairs_from(tokenizer, pair_rows(4))
    batch = make_batch(pairs, tokenizer.pad_token_id, padding_free=True)
    results = {}
    for chunk in (0, 5):
        model = make_model(tokenizer).train()
        model = prepare_full_finetune(model) if head_trains else apply_lora(model, LoraConfig(r=4, dropout=0.0))
        losses = response_token_losses(model, batch, chunk)
        weights = torch.linspace(0.5, 2.0, losses.numel())
        (losses * weights).sum().backward()
        results[chunk] = (losses.detach(), grads(model))
    (full, g_full), (chunked, g_chunked) = results[0], results[5]
    assert full.shape == (batch.n_loss_tokens,)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    assert_close_grads(g_full, g_chunked, 1e-5)


def test_sequence_log_probs_sum_each_answer(tokenizer):
    """A sequence's log-prob is the sum over its answer tokens of log p(token | before), as a
    direct log_softmax of the model's logits on that sequence alone gives it."""
    pairs = pairs_from(tokenizer, pair_rows(3))
    model = make_model(tokenizer)
    logps, counts = sequence_log_probs(model, make_batch(pairs, tokenizer.pad_token_id, padding_free=True), 4)
    for i, seq in enumerate(s for p in pairs for s in p.sequences):
        ids = torch.tensor([seq.input_ids])
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        targets = [(t, y) for t, y in enumerate(seq.labels[1:]) if y != IGNORE_INDEX]
        expected = sum(logp[t, y] for t, y in targets)
        assert counts[i] == len(targets)
        assert logps[i].item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# The reference, without a copy


def test_reference_with_the_adapter_off_equals_a_frozen_copy_of_the_base(tokenizer):
    """DPO's reference under LoRA (the same model, its adapter switched off) gives the log-probs
    of a separate frozen copy of the base, to 1e-6 in fp32, while the policy's differ."""
    base = make_model(tokenizer)
    frozen = copy.deepcopy(base)
    model = apply_lora(base, LoraConfig(r=4, dropout=0.0)).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = make_batch(pairs_from(tokenizer, pair_rows(4)), tokenizer.pad_token_id, padding_free=True)
    with torch.no_grad():
        with adapter_off(model):
            reference, _ = sequence_log_probs(model, batch, 8)
        copy_logps, _ = sequence_log_probs(frozen, batch, 8)
        policy, _ = sequence_log_probs(model, batch, 8)
    torch.testing.assert_close(reference, copy_logps, rtol=1e-6, atol=1e-6)
    assert (policy - reference).abs().max() > 1e-3  # the adapter is on again after the reference pass


def test_precomputed_reference_gives_the_loss_of_the_reference_pass(tokenizer):
    """--pref.precompute-ref: log-probs computed once before training give the same DPO loss,
    statistics and gradients as the adapter-off pass in the step."""
    pairs = pairs_from(tokenizer, pair_rows(6))
    fast = FastPaths.asked(TrainConfig())
    model = apply_lora(make_model(tokenizer), LoraConfig(r=4, dropout=0.0)).train()
    cache = reference_log_probs(model, pairs, fast, tokenizer.pad_token_id, POLICY, micro=4)
    assert sorted(cache) == [p.record_index for p in pairs]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # as if trained: the policy moves away from the reference
    results = {}
    for reference in ("adapter", "cached"):
        objective = Preference("dpo", beta=0.1, reference=reference, cache=cache)
        batch = objective.batch(pairs, fast, tokenizer.pad_token_id)
        values = accumulate_gradients(model, [batch], POLICY, objective)
        results[reference] = (values, grads(model))
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(results["cached"][0], results["adapter"][0], rtol=1e-6, atol=1e-6)
    assert_close_grads(results["adapter"][1], results["cached"][1], 1e-6)


# ---------------------------------------------------------------------------------------------
# Exact accumulation over pairs


@pytest.mark.parametrize("method", list(METHODS))
def test_accumulation_and_layout_are_exact_over_pairs(tokenizer, method):
    """8 pairs as 1 micro-batch of 8, 4 of 2, and padded instead of padding-free: the same loss,
    statistics and adapter gradients to 1e-5 (fp32): the loss is a mean over the step's pairs."""
    pairs = pairs_from(tokenizer, pair_rows(8))
    objective = METHODS[method]
    results = {}
    for parts, packed in ((1, True), (4, True), (4, False)):
        model = adapted_model(tokenizer)
        fast = FastPaths({"fused_swiglu": False, "padding_free": packed, "ce_chunk": 7})
        micro = [objective.batch([pairs[i] for i in mb], fast, 0) for mb in split_micro_batches(list(range(8)), parts)]
        values = accumulate_gradients(model, micro, POLICY, objective)
        results[parts, packed] = (values, grads(model))
    reference_values, reference_grads = results[1, True]
    assert reference_values.shape == (5,) and reference_values[0] > 0
    for key in ((4, True), (4, False)):
        torch.testing.assert_close(results[key][0], reference_values, rtol=1e-5, atol=1e-6)
        assert_close_grads(reference_grads, results[key][1], 1e-5)


# ---------------------------------------------------------------------------------------------
# The losses against their papers' formulas and against TRL


def direct_logps(model, pair: Pair) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(chosen, rejected) summed answer log-probs from log_softmax of each sequence alone, and counts."""
    out = []
    for seq in pair.sequences:
        logp = torch.log_softmax(model(torch.tensor([seq.input_ids])).logits[0].float(), -1)
        targets = [(t, y) for t, y in enumerate(seq.labels[1:]) if y != IGNORE_INDEX]
        out.append((torch.stack([logp[t, y] for t, y in targets]).sum(), len(targets)))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def paper_loss(method: str, model, pairs: list[Pair], reference_model=None) -> torch.Tensor:
    """The mean over pairs of each paper's loss, written out from its formula."""
    losses = []
    for pair in pairs:
        c, r, nc, nr = direct_logps(model, pair)
        if method == "dpo":  # Rafailov et al. (2023), eq. 7
            with torch.no_grad():
                c_ref, r_ref, _, _ = direct_logps(reference_model, pair)
            losses.append(-F.logsigmoid(0.1 * ((c - c_ref) - (r - r_ref))))
        elif method == "orpo":  # Hong et al. (2024), eqs. 4-7: mean token log-probs, odds p / (1 - p)
            pc, pr = torch.exp(c / nc), torch.exp(r / nr)
            log_odds_ratio = torch.log((pc / (1 - pc)) / (pr / (1 - pr)))
            losses.append(-c / nc - 0.2 * F.logsigmoid(log_odds_ratio))
        else:  # SimPO, Meng et al. (2024), eq. 6
            losses.append(-F.logsigmoid(2.0 / nc * c - 2.0 / nr * r - 0.5))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("method", list(METHODS))
def test_each_loss_is_its_papers_formula(tokenizer, method):
    """The step's loss and gradients against the paper's formula computed sequence by sequence
    from the model's plain logits (DPO's reference: a frozen copy of the base), fp32."""
    pairs = pairs_from(tokenizer, pair_rows(4))
    base = make_model(tokenizer)
    frozen = copy.deepcopy(base)
    fast = FastPaths({"fused_swiglu": False, "padding_free": True, "ce_chunk": 1024})
    results = {}
    for ours in (True, False):
        torch.manual_seed(0)
        model = adapted_model(tokenizer)
        if ours:
            loss = accumulate_gradients(model, [METHODS[method].batch(pairs, fast, 0)], POLICY, METHODS[method])[0]
        else:
            loss = paper_loss(method, model, pairs, frozen)
            loss.backward()
        results[ours] = (loss.item(), grads(model))
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    assert_close_grads(results[False][1], results[True][1], 1e-5)


def test_dpo_matches_trl(tokenizer, tmp_path):
    """The DPO loss and its LoRA gradients equal TRL's DPOTrainer (ref_model=None under PEFT: the
    reference is the adapter switched off) on the same pairs, to 1e-5 in fp32; and our
    tokenization of the pairs gives TRL's token ids."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    rows = pair_rows(6)
    model = adapted_model(tokenizer)
    args = trl.DPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=6, beta=0.1, report_to="none", use_cpu=True,
        max_length=None, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    # TRL keeps a copy of an adapter it is given as the reference ("ref"); without it, as for an
    # adapter TRL makes itself, the reference is the adapter switched off: solotune's reference.
    trainer.model.delete_adapter("ref")
    trl_rows = [trainer.train_dataset[i] for i in range(len(rows))]
    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(trl_rows))
    trl_loss.backward()
    trl_grads = grads(model)
    model.zero_grad(set_to_none=True)

    pairs = pairs_from(tokenizer, rows)
    for pair, row in zip(pairs, trl_rows):
        assert pair.chosen.input_ids == row["prompt_ids"] + row["chosen_ids"]
        assert pair.rejected.input_ids == row["prompt_ids"] + row["rejected_ids"]
    objective = METHODS["dpo"]
    fast = FastPaths({"fused_swiglu": False, "padding_free": True, "ce_chunk": 1024})
    loss = accumulate_gradients(model, [objective.batch(pairs, fast, 0)], POLICY, objective)[0]
    assert abs(trl_loss.item() - 0.6931) > 1e-3  # the policy differs from the reference
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert_close_grads(trl_grads, grads(model), 1e-5)


# ---------------------------------------------------------------------------------------------
# Preference records


def test_pair_layouts_of_the_common_data_sets_give_the_same_tokens(tokenizer):
    """{prompt, chosen, rejected} as text, Anthropic HH's (no prompt field: the text up to the
    last "Assistant:") and chat messages (UltraFeedback: each answer the whole conversation)."""
    text = pairs_from(tokenizer, [{"prompt": "Human: 2+2?\n\nAssistant:", "chosen": " 4", "rejected": " 5"}])[0]
    hh = pairs_from(tokenizer, [{"chosen": "Human: 2+2?\n\nAssistant: 4", "rejected": "Human: 2+2?\n\nAssistant: 5"}])
    assert hh[0] == text
    user = [{"role": "user", "content": "2+2?"}]
    ultra = {
        "prompt": "2+2?",
        "chosen": user + [{"role": "assistant", "content": "4"}],
        "rejected": user + [{"role": "assistant", "content": "5"}],
    }
    chat = pairs_from(tokenizer, [ultra])[0]
    prompt_ids = tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    assert chat.chosen.input_ids[: len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(chat.chosen.input_ids[len(prompt_ids) :]) == "4</s>"
    assert chat.chosen.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    messages_prompt = pairs_from(tokenizer, [{**ultra, "prompt": user, "chosen": "4", "rejected": "5"}])[0]
    assert messages_prompt == chat


BAD_PAIRS = [
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "the rejected answer is empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are the same answer"),
    ({"prompt": "q" * 40, "chosen": "a", "rejected": "b"}, "leave no answer token within max_len = 32"),
    ({"chosen": "just text", "rejected": "other text"}, "no 'Assistant:' turn"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "both be text or both"),
]


@pytest.mark.parametrize("row, message", BAD_PAIRS, ids=[m for _, m in BAD_PAIRS])
def test_a_bad_pair_is_one_line_naming_the_record(tokenizer, row, message):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    records = [Record(good, "data.jsonl:1"), Record(row, "data.jsonl:2")]
    with pytest.raises(SolotuneError) as e:
        tokenize_records(records, tokenizer, DataConfig(max_len=32), pairs=True)
    assert str(e.value).startswith("data.jsonl:2: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_pairs_are_counted_when_skipped(tokenizer):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    records = [Record(good, "r0")] + [Record(row, f"r{i + 1}") for i, (row, _) in enumerate(BAD_PAIRS)]
    pairs, stats, fmt = tokenize_records(records, tokenizer, DataConfig(max_len=32, on_bad_record="skip"), pairs=True)
    assert fmt == "preference" and len(pairs) == 1 and stats.skipped == len(BAD_PAIRS)
    assert stats.skip_reasons[0].startswith("r1: missing field")


def test_sft_on_preference_records_trains_on_the_chosen_answers(tokenizer):
    rows = pair_rows(3)
    sft = tokenize_records([Record(r, "x") for r in rows], tokenizer, DataConfig(), pairs=False)[0]
    pairs = pairs_from(tokenizer, rows)
    assert all(isinstance(e, Example) for e in sft) and [e for e in sft] == [p.chosen for p in pairs]


def test_a_preference_method_refuses_instruction_records(tokenizer):
    records = [Record({"instruction": "Say hi.", "output": "hi"}, "data.json record 0")]
    with pytest.raises(SolotuneError, match="needs records with 'chosen' and 'rejected'"):
        tokenize_records(records, tokenizer, DataConfig(), pairs=True)


def test_the_built_in_pairs_reject_a_checkable_perturbation():
    from solotune.builtin_data import builtin_preference_records, builtin_records

    pairs, instructions = builtin_preference_records(), builtin_records()
    assert len(pairs) == len(instructions) == 240
    for pair, record in zip(pairs, instructions):
        assert pair["chosen"] == record["output"] and pair["rejected"] != pair["chosen"]
        assert pair["instruction"] == record["instruction"]
    assert json.loads(pairs[8]["chosen"])["age"] + 1 == json.loads(pairs[8]["rejected"])["age"]


# ---------------------------------------------------------------------------------------------
# End to end: `solotune train --method ...` and `solotune estimate --method dpo`


@pytest.fixture
def pair_file(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(12)))
    return f


def pref_args(model_dir, data, out, *extra):
    return [
        "train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--batch", "4",
        "--mp", "off", "--no-generate.enabled", "--max-steps", "2", "--lr", "1e-2", *extra,
    ]  # fmt: skip


def test_a_dpo_run_reports_rewards_per_step_and_held_out_reward_accuracy(tiny_model_dir, pair_file, tmp_path, capsys):
    """A LoRA DPO run: the reference pass in each step, each step's rewards in metrics.json, the
    held-out reward accuracy before (every reward 0: the adapter starts at zero, ties count
    half) and after, in the summary."""
    from solotune.cli import main

    out = tmp_path / "dpo"
    assert main(pref_args(tiny_model_dir, pair_file, out, "--method", "dpo", "--eval.split", "0.25")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["objective"]["method"] == "dpo" and m["objective"]["reference"] == "adapter"
    assert m["train"]["loss_curve"][0] == pytest.approx(0.6931, abs=1e-4)  # policy = reference at step 0
    assert set(m["train"]["stats"]) == {"reward_accuracy", "chosen_reward", "rejected_reward", "margin"}
    assert all(len(v) == 2 for v in m["train"]["stats"].values())
    assert m["eval"]["reward_accuracy_before"] == 0.5 and m["eval"]["margin_before"] == 0.0
    assert 0 <= m["eval"]["reward_accuracy_after"] <= 1
    printed = capsys.readouterr().out
    assert "reference: the model with its adapter off" in printed and "reward accuracy 50% -> " in printed
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_full_finetune_dpo_takes_its_reference_from_log_probs_computed_before_training(
    tiny_model_dir, pair_file, tmp_path, capsys
):
    """Full fine-tuning has no adapter to switch off: the reference log-probs are computed once
    before training and kept in the run folder (no copy of the weights); at step 0 the policy
    is the reference, so the first loss is log 2."""
    from solotune.cli import main

    out = tmp_path / "full"
    assert main(pref_args(tiny_model_dir, pair_file, out, "--method", "dpo", "--no-lora")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["objective"]["reference"] == "cached"
    assert m["train"]["loss_curve"][0] == pytest.approx(math.log(2), abs=1e-6)
    cache = json.loads((out / "reference-logps.json").read_text())["logps"]
    assert len(cache) == 12 and all(len(v) == 2 and v[0] < 0 and v[1] < 0 for v in cache.values())
    assert "log-probs of 12 pairs computed" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_reference_free_methods_run(tiny_model_dir, pair_file, tmp_path, method):
    from solotune.cli import main

    out = tmp_path / method
    assert main(pref_args(tiny_model_dir, pair_file, out, "--method", method)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["objective"]["reference"] == "none" and len(m["train"]["stats"]["margin"]) == 2


def test_estimate_includes_the_reference_pass(tiny_model_dir):
    """`estimate --method dpo` simulates the pairs' step with its reference pass: more than an
    SFT step of half the sequences, at most 1.3x an SFT step of the same chosen + rejected ones."""
    from solotune.config import RunConfig
    from solotune.experiment.estimate import estimate_memory, model_config

    def peak(method, batch):
        cfg = RunConfig(device="cpu")
        cfg.model.name, cfg.pref.method, cfg.train.batch = str(tiny_model_dir), method, batch
        return estimate_memory(model_config(str(tiny_model_dir)), cfg, 64).parts_mib["activations_mib"]

    dpo, sft_same_tokens, sft_chosen = peak("dpo", 2), peak("sft", 4), peak("sft", 2)
    assert sft_chosen < dpo <= 1.3 * sft_same_tokens
