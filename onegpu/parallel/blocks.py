"""Find a model's repeated blocks (transformer layers) without knowing its family."""

from __future__ import annotations

from torch import nn


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of the largest ModuleList/Sequential whose children share one class.

    Hugging Face decoders (``model.layers``, ``transformer.h``), encoders (``encoder.layer``)
    and hand-written stacks all keep their blocks that way. Empty when there is none.
    """
    best: list[nn.Module] = []
    for module in model.modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.children())
        if len(children) > 1 and len({type(c) for c in children}) == 1 and any(True for _ in children[0].parameters()):
            if sum(p.numel() for c in children for p in c.parameters()) > sum(
                p.numel() for c in best for p in c.parameters()
            ):
                best = children
    return best


def block_container(model: nn.Module, blocks: list[nn.Module]) -> str:
    """The module path of the ModuleList/Sequential holding ``blocks`` (``"model.layers"``)."""
    return next(
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and list(m.children()) == blocks
    )


def blocks_at(model: nn.Module, path: str) -> list[nn.Module]:
    """The repeated blocks a plan names by their container's path."""
    return list(model.get_submodule(path).children())
