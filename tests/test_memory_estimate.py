"""The simple rule's memory estimate: states counted exactly, activations from the model's inspection."""

import pytest
import torch
from torch.utils.data import default_collate

from onegpu.planner.inspection import describe
from onegpu.planner.memory import estimate_memory, optimizer_state_slots
from onegpu.planner.simple_rule import choose_plan


def test_states_are_exact_for_adamw():
    model = torch.nn.Linear(10, 5)  # 55 parameters
    estimate = estimate_memory(model, optimizer=torch.optim.AdamW(model.parameters()), activations=None)
    assert (estimate.parameters, estimate.gradients, estimate.optimizer) == (220, 220, 440)
    assert estimate.activations is None


@pytest.mark.parametrize(
    ("make", "slots"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 0),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 1),
        (lambda p: torch.optim.Adam(p, amsgrad=True), 3),
        (lambda p: torch.optim.RMSprop(p, momentum=0.9, centered=True), 3),
    ],
)
def test_optimizer_state_slots(make, slots):
    assert optimizer_state_slots(make(torch.nn.Linear(2, 2).parameters())) == slots


def test_activations_are_what_autograd_saves_and_nothing_is_allocated():
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    profile = describe(model, sample=default_collate([torch.randn(64)]), seq_len=1).profile  # one sample
    # saved for backward: the input (32x64, by the first linear) and ReLU's output (32x256, by
    # ReLU and the second linear: one tensor, counted once); fp32. Weights are states, not counted.
    assert profile.activation_bytes_per_sample * 32 == 4 * (32 * 64 + 32 * 256)
    assert (torch.cuda.memory_allocated() if torch.cuda.is_available() else 0) == before


def test_rule_replicates_when_it_fits_and_shards_when_not():
    model = torch.nn.Linear(1000, 1000)
    estimate = estimate_memory(model, optimizer=torch.optim.AdamW(model.parameters()), activations=None)
    assert choose_plan(estimate=estimate, budget_bytes=estimate.total, world_size=2).strategy == "ddp"
    plan = choose_plan(estimate=estimate, budget_bytes=estimate.total - 1, world_size=2)
    assert plan.strategy == "fsdp" and "exceeds" in plan.reason
