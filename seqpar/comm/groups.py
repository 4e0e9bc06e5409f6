"""Cross-rank agreement on a call's metadata, so bad input raises on every rank.

A rank that got bad input must not leave its peers waiting inside a collective. Each
public entry point validates locally, then calls `agree()`: the first time this rank sees
a call signature (or whenever its own validation failed) the ranks exchange their
signatures and errors in one small all-gather; any error or difference raises on every
rank. A signature already agreed on is skipped, so steady-state calls cost nothing.

Limit: a signature that changes on one rank only, after the old one was agreed on, sends
that rank alone into the check while its peers go on. `set_validation("always")` closes
that gap at the price of one small collective per call.
"""
from __future__ import annotations

from typing import Dict, Optional, Set, Tuple

import torch

from . import collectives

_MODES = ("first", "always")
_mode = "first"
_seen: Dict[object, Set[tuple]] = {}


def set_validation(mode: str) -> None:
    """"first" (default): check a call signature across ranks once; "always": every call."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    _mode = mode


def describe(x) -> tuple:
    """A picklable, comparable description of an argument (tensors by shape/dtype/device)."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), str(x.dtype), x.device.type)
    if isinstance(x, (bool, int, float, str, type(None))):
        return (type(x).__name__, x)
    return (type(x).__name__,)


def agree(group, world_size: int, signature: Tuple[Tuple[str, object], ...], error: Optional[Exception], what: str) -> None:
    """Raise on every rank if any rank's `error` is set or the signatures differ."""
    if world_size == 1:
        if error is not None:
            raise error
        return
    seen = _seen.setdefault(group, set())
    if error is None and _mode == "first" and signature in seen:
        return
    message = None if error is None else (type(error).__name__, str(error))
    gathered = collectives.all_gather_object((signature, message), group, op="check")
    if error is not None:
        raise error
    for rank, (_, msg) in enumerate(gathered):
        if msg is not None:
            raise ValueError(f"{what}: rank {rank} of the group got bad input, so every rank stops: {msg[1]}")
    mine = dict(signature)
    for rank, (sig, _) in enumerate(gathered):
        theirs = dict(sig)
        for name in mine:
            if theirs.get(name) != mine[name]:
                values = ", ".join(f"rank {r}: {dict(s).get(name)!r}" for r, (s, _) in enumerate(gathered))
                raise ValueError(f"{what}: {name} must be the same on every rank, got {values}")
    seen.add(signature)
