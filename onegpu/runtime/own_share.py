"""Calls a replica makes with its own share of the work (``onegpu.split_between_replicas``): the model runs them
as they are, for this replica alone.

A prepared model's other calls take part in the whole virtual device's batch: a batch the loop built is cut
to this replica's rows and checked against the other workers' (:mod:`onegpu.runtime.call_slicing`), and a loss
is weighted by its share of the global batch (:mod:`onegpu.runtime.loss_weighting`); both talk to every replica
on every call. A replica's own share is its own: the replicas make different calls, as many as each needs (a
prompt generating 9 tokens here, 30 there), so those hooks stand aside. The workers inside one replica (its
tensor-parallel ranks) still work together: they hold the same share and make the same calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_own: ContextVar[bool] = ContextVar("onegpu_own_share", default=False)


def calls_are_own() -> bool:
    """Whether the model's calls now are this replica's own (inside ``split_between_replicas``)."""
    return _own.get()


@contextmanager
def own_calls() -> Iterator[None]:
    """The model's calls inside are this replica's own: not sliced, fingerprinted or weighted across replicas."""
    token = _own.set(True)
    try:
        yield
    finally:
        _own.reset(token)
