"""Shadowing a method of one object while a block runs: how a simulation observes the relay's coordinator
(``run._timing_calls``, ``decisions.scoring_decisions``) without changing its code."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def shadowing(owner: Any, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """``owner.name`` is ``wrap(owner.name)`` while the block runs (an instance attribute shadows the
    method), then as it was: an instance attribute already there (another observer's) is put back."""
    own = name in vars(owner)
    original = getattr(owner, name)
    setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)
