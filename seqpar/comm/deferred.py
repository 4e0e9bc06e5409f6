"""Checks of the values of device tensors without a host sync.

Some arguments are only valid for some values (a linear-attention decay must be <= 0).
Reading a value of a CUDA tensor on the host waits for the device: once per call and
layer, that stalls the launch queue that keeps a GPU busy. So on a device (default mode
"deferred") a check is queued: the reduced value is copied to pinned host memory behind
the call's own work, with an event, and the call goes on. Every later entry point looks
at the queued checks whose device work has finished (without waiting) and, if one failed,
raises its error through the cross-rank agreement (`seqpar.call.collective_call`), so
every rank stops at the same call: the bad rank with the check's own message, naming the
argument, the expected and the given value; the others naming the bad rank.

The price: the call that got the bad value has already run (its result is wrong, and it
is never used, since the next seqpar call raises; a program that makes no further seqpar
call never hears of it). `set_value_checks("sync")` checks in the call itself, at the
cost of one host sync per check. CPU tensors are always checked at once: there it costs
nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

_MODES = ("deferred", "sync")
_mode = "deferred"
_defer_on_cpu = False  # tests: queue CPU checks as if they ran on a device


@dataclass
class _Pending:
    value: torch.Tensor  # host copy (pinned on CUDA), valid once `event` has completed
    event: Optional[object]  # torch.cuda.Event; None: the copy is already done
    ok: Callable[[float], bool]
    message: Callable[[float], str]


_pending: List[_Pending] = []


def set_value_checks(mode: str) -> None:
    """"deferred" (default): device tensors' values are checked without a host sync and a
    failure raises at the next seqpar call; "sync": checked in the call (one host sync)."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    _mode = mode


def check_value(value: torch.Tensor, ok: Callable[[float], bool], message: Callable[[float], str]) -> None:
    """Check the 0-dim tensor `value` (e.g. a reduction of an argument) with `ok`; on failure
    `ValueError(message(value))`, now (CPU tensors, mode "sync") or at the next seqpar
    call (device tensors, mode "deferred")."""
    if _mode == "sync" or (value.device.type == "cpu" and not _defer_on_cpu):
        got = float(value)
        if not ok(got):
            raise ValueError(message(got))
        return
    value = value.detach().reshape(())
    if value.device.type == "cuda":
        with torch.cuda.device(value.device):  # the copy and its event on value's device and stream
            host = torch.empty((), dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(value.device))
    else:  # another device, or a CPU tensor under test: the copy is done
        host, event = value.to("cpu", copy=True), None
    _pending.append(_Pending(host, event, ok, message))


def take_failure() -> Optional[ValueError]:
    """The error of the first queued check that finished and failed (checks still running on
    the device are left queued, not waited for); finished checks are dropped."""
    failure, still = None, []
    for entry in _pending:
        if entry.event is not None and not entry.event.query():
            still.append(entry)
            continue
        got = float(entry.value)
        if failure is None and not entry.ok(got):
            failure = ValueError(f"{entry.message(got)} (in an earlier call on this rank: device values are checked "
                                 f"without a host sync and reported at the next seqpar call; "
                                 f"seqpar.comm.set_value_checks('sync') checks within the call)")
    _pending[:] = still
    return failure


def pending() -> int:
    """How many queued checks have not been looked at yet."""
    return len(_pending)
