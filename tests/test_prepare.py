"""prepare() in one process: the same objects back, and loud errors for what cannot be mapped."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import onegpu
from onegpu.errors import UsageError


def test_returns_the_same_objects_in_order():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(4, 3)), batch_size=2)
    out_model, out_loader, out_optimizer = onegpu.prepare(model, loader, optimizer)
    assert out_model is model and out_optimizer is optimizer
    assert [b[0].shape[0] for b in out_loader] == [2, 2]
    assert model.onegpu_plan.strategy == "single"


def test_an_optimizer_parameter_not_in_the_model_is_named():
    model = torch.nn.Linear(3, 1)
    stray = torch.nn.Parameter(torch.zeros(7, 2))
    optimizer = torch.optim.SGD([*model.parameters(), stray], lr=0.1)
    with pytest.raises(UsageError, match=r"param group 0 holds a parameter of shape \(7, 2\) that is not in the model"):
        onegpu.prepare(model, optimizer)


def test_an_optimizer_that_already_stepped_is_refused():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    with pytest.raises(UsageError, match="call onegpu.prepare\\(\\) before training"):
        onegpu.prepare(model, optimizer)


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(UsageError, match="strategy='zero3' is not known: use 'ddp', 'fsdp'"):
        onegpu.prepare(torch.nn.Linear(2, 2), strategy="zero3")


def test_exactly_one_model():
    with pytest.raises(UsageError, match="exactly one model"):
        onegpu.prepare(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))


def test_bad_memory_budget_names_the_fix(monkeypatch):
    monkeypatch.setenv("ONEGPU_MEMORY_BUDGET_GB", "lots")
    with pytest.raises(UsageError, match="ONEGPU_MEMORY_BUDGET_GB='lots' is not a positive number"):
        onegpu.prepare(torch.nn.Linear(2, 2))
