"""Keep an optimizer created before ``prepare`` pointed at the model's (possibly sharded) parameters."""

from __future__ import annotations

import torch
from torch import nn

from onegpu.errors import UsageError


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The model name of every parameter in every group, failing loudly on a foreign one."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        found = []
        for param in group["params"]:
            if id(param) not in names:
                raise UsageError(
                    f"optimizer param group {index} holds a parameter of shape {tuple(param.shape)} that is "
                    f"not in the model: build the optimizer from model.parameters() of the model given to prepare()"
                )
            found.append(names[id(param)])
        groups.append(found)
    if optimizer.state:
        raise UsageError(
            "the optimizer has already taken steps (it holds state): call onegpu.prepare() before training, "
            "or load optimizer state after prepare()"
        )
    return groups


def repoint(optimizer: torch.optim.Optimizer, model: nn.Module, groups: list[list[str]]) -> None:
    """Replace each group's parameters by the model's current parameters of the same names.

    Names the model no longer holds (another pipeline stage's parameters) leave the optimizer.
    """
    current = dict(model.named_parameters())
    for group, names in zip(optimizer.param_groups, groups):
        group["params"] = [current[name] for name in names if name in current]
