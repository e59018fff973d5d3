"""The optimizer's state allocated before the first step changes no number of the training."""

import pytest
import torch

from solotune.data import collate
from solotune.fastpaths.loss import ResponseLoss
from solotune.measure.memory import optimizer_state_bytes
from solotune.testing import make_model
from solotune.testing import varied_examples as examples
from solotune.training.optim import create_state, new_optimizer


def weights_after_steps(tokenizer, optim: str, eager: bool, steps: int = 3) -> list[torch.Tensor]:
    model = make_model(tokenizer).train()
    params = list(model.parameters())
    optimizer = new_optimizer(optim, params, lr=1e-2, weight_decay=0.1)
    if eager:
        before = [p.detach().clone() for p in params]
        create_state(optimizer)
        assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True)), "create_state moved a weight"
        assert all(p.grad is None for p in params), "create_state left gradients behind"
    batch = collate(examples(tokenizer), tokenizer.pad_token_id)
    for _ in range(steps):
        ResponseLoss(chunk=0)(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("optim", ["adamw", "sgd", "adamw8bit"])
def test_training_with_the_state_created_first_is_the_same_bit_for_bit(tokenizer, optim):
    lazy = weights_after_steps(tokenizer, optim, eager=False)
    eager = weights_after_steps(tokenizer, optim, eager=True)
    assert all(torch.equal(a, b) for a, b in zip(eager, lazy, strict=True))


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_the_state_created_first_is_the_state_a_first_step_makes(tokenizer, optim):
    model = make_model(tokenizer)
    eager = new_optimizer(optim, list(model.parameters()), lr=1e-2, weight_decay=0.0)
    create_state(eager)
    lazy = new_optimizer(optim, list(model.parameters()), lr=1e-2, weight_decay=0.0)
    ResponseLoss(chunk=0)(model, collate(examples(tokenizer), tokenizer.pad_token_id)).backward()
    lazy.step()
    assert optimizer_state_bytes(eager) == optimizer_state_bytes(lazy) > 0
