"""A model whose calls onegpu takes over keeps its class: a subclass of the user's class is put in its place."""

from __future__ import annotations

import functools

from torch import nn


def put_in_front(model: nn.Module, mixin: type, *, prefix: str) -> None:
    """Make ``model``'s class ``<prefix><its class>``, a subclass of its class with ``mixin`` in front. Its
    ``forward`` is the mixin's, with the user's signature: code reading it (Hugging Face's ``generate``, which
    passes ``position_ids`` or ``logits_to_keep`` only to a forward that names them) sees the model's own."""
    cls = type(model)

    @functools.wraps(cls.forward)
    def forward(self, *args, **kwargs):
        return mixin.forward(self, *args, **kwargs)

    model.__class__ = type(f"{prefix}{cls.__name__}", (mixin, cls), {"forward": forward})
