"""The performance techniques compute the same numbers as the plain path (fp32, stated tolerances)."""

import pytest
import torch
import torch.nn.functional as F

from solotune.config import DataConfig, LoraConfig, PrecisionConfig, RunConfig, TrainConfig
from solotune.data import IGNORE_INDEX, Record, collate, collate_packed, tokenize_records
from solotune.fastpaths.attention import enable_padding_free
from solotune.fastpaths.loss import ResponseLoss
from solotune.fastpaths.swiglu import SiluMul, use_fused_swiglu
from solotune.measure.memory import MIB
from solotune.model.adapters import apply_lora
from solotune.model.precision import resolve_policy
from solotune.testing import assert_same_gradients, loss_and_grads, make_model, save_model_folder
from solotune.testing import varied_examples as examples
from solotune.training.loop import train_loop
from solotune.training.setup import build_model


def per_token_losses(logits, labels):
    """Per-position next-token CE, 0 where there is no target: (B, T-1)."""
    return F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )


@pytest.mark.parametrize("train_on_prompt", [False, True], ids=["response-only", "every-token"])
def test_padding_free_row_gives_each_record_its_padded_loss(tokenizer, train_on_prompt):
    """Records back to back in one row, positions restarting, attention per record == padded batch (1e-5)."""
    exs = examples(tokenizer, train_on_prompt=train_on_prompt)
    model = make_model(tokenizer)
    padded, packed = collate(exs, tokenizer.pad_token_id), collate_packed(exs)
    assert packed.n_positions == packed.n_tokens == padded.n_tokens < padded.n_positions
    assert packed.n_loss_tokens == padded.n_loss_tokens
    with torch.no_grad():
        ref = per_token_losses(model(**padded.model_inputs()).logits, padded.labels)
        enable_padding_free(model, max_len=512)
        row = per_token_losses(model(**packed.model_inputs()).logits, packed.labels)[0]
    start = 0
    for i, e in enumerate(exs):
        n = len(e.input_ids)
        # The row's position start+t predicts token t+1 of record i, as position t of padded row i.
        mine, theirs = row[start : start + n - 1], ref[i, : n - 1]
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-5), (
            f"record {i}: max diff {(mine - theirs).abs().max():.2e}"
        )
        assert theirs.sum() > 0
        start += n
    # The last position of each record has no target in the row (the next record's first label is cleared).
    assert row.sum().item() == pytest.approx(ref.sum().item(), rel=1e-5)


@pytest.mark.parametrize("kv_groups", [1, 2], ids=["mha", "gqa"])
def test_segments_as_one_padded_batch_equal_one_call_per_segment(kv_groups):
    """The batched path of the padding-free attention == SDPA on each segment, outputs and the
    gradients of query, key and value (fp32, 1e-5); the segments' lengths differ."""
    from types import SimpleNamespace

    from solotune.fastpaths import attention

    lengths, heads, dim = (5, 9, 1, 7), 4, 8
    module = SimpleNamespace(num_key_value_groups=kv_groups, is_causal=True)
    torch.manual_seed(0)
    q = torch.randn(1, heads, sum(lengths), dim, requires_grad=True)
    k, v = (torch.randn(1, heads // kv_groups, sum(lengths), dim, requires_grad=True) for _ in range(2))
    weights = torch.randn(1, sum(lengths), heads, dim)  # a loss that weighs every output differently

    def outputs_and_grads(limit):
        attention.PADDED_WORK_LIMIT, saved = limit, attention.PADDED_WORK_LIMIT
        try:
            out, _ = attention.varlen_sdpa_attention(module, q, k, v, None, segment_lengths=lengths, scaling=0.3)
        finally:
            attention.PADDED_WORK_LIMIT = saved
        grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
        return out, grads

    batched, batched_grads = outputs_and_grads(float("inf"))
    looped, looped_grads = outputs_and_grads(0.0)
    assert batched.shape == looped.shape == (1, sum(lengths), heads, dim)
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(batched_grads, looped_grads):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_segments_are_padded_into_a_batch_only_where_little_work_is_wasted():
    from solotune.fastpaths.attention import padding_pays

    assert padding_pays((60, 64, 50, 57))  # records of similar lengths: one call
    assert not padding_pays((512, 20, 30, 12))  # one long record: padding would multiply the work
    assert not padding_pays((64,))  # one segment is one call already


def run(tokenizer, steps=2, mp="off", vocab_size=None, **train):
    shape = dict(hidden_size=128, num_hidden_layers=2, vocab_size=vocab_size or len(tokenizer))
    model = apply_lora(make_model(tokenizer, **shape), LoraConfig(r=8, dropout=0.0))
    rows = [{"prompt": "p" * 100, "response": "r" * 150}] * 8
    exs, _, _ = tokenize_records([Record(r, f"row {i}") for i, r in enumerate(rows)], tokenizer, DataConfig())
    policy = resolve_policy(PrecisionConfig(mp=mp), "cpu", frozen_base=True)
    return train_loop(model, exs, tokenizer.pad_token_id, policy, TrainConfig(batch=4, max_steps=steps, **train)), model


def test_chunked_cross_entropy_holds_smaller_activations(tokenizer):
    """Full logits (B x T x V fp32, several alive in backward) vs one chunk at a time, same loss."""
    full, _ = run(tokenizer, ce_chunk=0, vocab_size=16384)  # a vocabulary large enough for logits to matter
    chunked, _ = run(tokenizer, ce_chunk=64, vocab_size=16384)
    assert chunked.losses == pytest.approx(full.losses, rel=1e-5)
    assert chunked.memory["activations_mib"] < 0.7 * full.memory["activations_mib"]


def test_bf16_frozen_base_holds_no_fp32_copy(tokenizer, tmp_path):
    """Measured parameter memory under bf16 LoRA: ~2 bytes per frozen parameter (+ fp32 adapters)."""
    cfg = RunConfig()
    cfg.precision.mp, cfg.lora.r, cfg.lora.dropout = "bf16", 8, 0.0
    policy = resolve_policy(cfg.precision, "cpu", frozen_base=True)
    model = build_model(str(save_model_folder(tmp_path / "m", hidden_size=128, num_hidden_layers=2)), cfg, policy)
    rows = [{"prompt": "p" * 100, "response": "r" * 150}] * 8
    exs, _, _ = tokenize_records([Record(r, f"row {i}") for i, r in enumerate(rows)], tokenizer, DataConfig())
    result = train_loop(model, exs, tokenizer.pad_token_id, policy, TrainConfig(batch=4, max_steps=2))
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    expected_mib = (2 * frozen + 4 * adapters) / MIB
    assert result.memory["parameters_mib"] == pytest.approx(expected_mib, rel=0.05)


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_fused_swiglu_equals_autograd_and_saves_less(tokenizer, full):
    """Same loss and gradients as the model's own MLP (fp32, 1e-5), one activation fewer per MLP."""
    exs = examples(tokenizer)
    batch = collate(exs, tokenizer.pad_token_id)
    results = []
    for fused in (False, True):
        model = make_model(tokenizer)
        if fused:
            assert use_fused_swiglu(model) == 2
        model = apply_lora(model, LoraConfig(r=4, dropout=0.0)) if not full else model.train().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, saved=saved: saved.append(t.untyped_storage().data_ptr()) or t, lambda t: t
        ):
            loss = ResponseLoss()(model, batch)
        loss.backward()
        results.append(
            (loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(set(saved)))
        )
    (ref_loss, ref_grads, ref_saved), (loss, grads, n_saved) = results
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert_same_gradients(grads, ref_grads)
    assert n_saved == ref_saved - 2  # one tensor fewer in each of the 2 layers


def test_compiled_layers_compute_the_eager_loss_and_gradients(tokenizer):
    """torch.compile of each decoder layer (the aot_eager backend: Dynamo's capture and autograd's
    graph without Inductor's minutes of C++ compiling) gives the eager loss and gradients (1e-5);
    records of new lengths do not recompile; eager again afterwards."""
    import torch._dynamo

    from solotune.training.compile import CompiledLayers, compile_seconds

    torch._dynamo.reset()
    model = make_model(tokenizer)
    enable_padding_free(model, 512)
    model = apply_lora(model, LoraConfig(r=4, dropout=0.0))
    exs = examples(tokenizer, n=6)
    batches = [collate_packed(exs[:3]), collate_packed(exs[3:])]  # 3 records, then 3 of other lengths
    eager = [loss_and_grads(model, b, ResponseLoss(chunk=0)) for b in batches]
    before = compile_seconds()
    graphs = torch._dynamo.utils.counters["stats"]
    with CompiledLayers(model, backend="aot_eager"):
        compiled = [loss_and_grads(model, batches[0], ResponseLoss(chunk=0))]
        after_first = graphs["unique_graphs"]
        compiled.append(loss_and_grads(model, batches[1], ResponseLoss(chunk=0)))
    assert compile_seconds() > before
    assert after_first > 0 and graphs["unique_graphs"] == after_first  # no graph per record length
    for (loss, grads), (ref_loss, ref_grads) in zip(compiled, eager):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert_same_gradients(grads, ref_grads)
    assert all("forward" not in vars(m) for m in model.modules())  # the compiled forwards are gone


def test_without_memory_tracking_only_the_peak_is_reported(tokenizer):
    """--train.track-memory off: same losses, the measured peak, no breakdown (None, not 0)."""
    tracked, _ = run(tokenizer)
    untracked, _ = run(tokenizer, track_memory="off")
    assert untracked.losses == tracked.losses
    assert untracked.memory["peak_mib"] > 0
    assert untracked.memory["parameters_mib"] is None and untracked.memory["tracked_peak_mib"] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_swiglu_backward_is_autograds_bit_for_bit_with_no_larger_peak(dtype):
    """The fused gradients equal autograd's unfused silu(gate) * up exactly, in fp32 and bf16,
    and backward's tensor peak is no larger (an fp32 backward in bf16 made it 2.4x larger)."""
    from solotune.measure.memory import TensorMemoryTracker

    torch.manual_seed(0)
    gate, up, grad = (torch.randn(4096, 256) * 3 for _ in range(3))
    results = {}
    for name, fn in (("autograd", lambda g, u: F.silu(g) * u), ("fused", SiluMul.apply)):
        g, u = gate.to(dtype).requires_grad_(), up.to(dtype).requires_grad_()
        out = fn(g, u)
        holder = torch.nn.Linear(1, 1)
        with TensorMemoryTracker(holder, torch.optim.SGD(holder.parameters(), lr=0.1), torch.device("cpu")) as tracker:
            out.backward(grad.to(dtype))
        results[name] = (g.grad, u.grad, tracker.peak_bytes)
    (ref_g, ref_u, ref_peak), (g_grad, u_grad, peak) = results["autograd"], results["fused"]
    assert torch.equal(g_grad, ref_g) and torch.equal(u_grad, ref_u)
    assert peak <= ref_peak, (peak, ref_peak)
