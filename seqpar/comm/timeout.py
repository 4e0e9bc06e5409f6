"""Every wait seqpar does on a peer, bounded, and failing with seqpar's own error.

A peer that is alive but never joins a collective (it raised and caught an exception in
user code, or skipped the call) would otherwise leave its partners blocked until the
process group's own timeout (30 minutes on gloo by default), and the error, when it
comes, is the backend's (`Timed out waiting 20000ms for send operation`), with no word
of seqpar, the operation or the rank. So every seqpar helper posts its operation
asynchronously and waits through `wait()` below, which raises `CommTimeout` naming the
operation (the same `op` label `seqpar.comm.track()` counts it under), the peer rank(s)
waited for and the time waited.

The limit: `set_timeout(seconds)` if set, else the process group's own timeout (the one
given to `init_process_group` / `new_group`, read from the group's backend options), so
seqpar never fails earlier than torch would, only more clearly. A limit set above the
group's timeout does not extend it for collectives: gloo runs each collective under the
group's timeout and fails it there, which seqpar reports as the same `CommTimeout` (with
the time actually waited); gloo's send/recv take the limit seqpar passes.

NCCL (any accelerator tensor): `Work.wait()` there only makes the current CUDA stream
wait for the communication stream; `Work.wait(timeout)` instead blocks the host thread
until the operation has finished on the GPU (a host sync per wait, which would stall the
launch queue that overlaps communication with compute), and on expiry aborts the
communicators. So by default seqpar's waits on accelerator tensors stay untimed and
stream-ordered, and NCCL's watchdog enforces the group's timeout (10 minutes by
default) with its own error. Only a timeout set explicitly with `set_timeout` applies
there too, at the cost of that host sync, as a debugging aid.
"""
from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist

_timeout: Optional[float] = None
_MIN_REMAINING = timedelta(milliseconds=1)  # timedelta(0) means "no timeout" to torch


class CommError(RuntimeError):
    """A seqpar communication failed; the message names the operation and the peers."""

    def __init__(self, message: str, *, op: str, rank: int, peers: Sequence[int], waited: float):
        super().__init__(message)
        self.op, self.rank, self.peers, self.waited = op, rank, list(peers), waited

    def __reduce__(self):  # keyword-only fields: pickle (to a parent process) needs them named
        return _rebuild, (type(self), self.args[0], vars(self))


class CommTimeout(CommError):
    """A peer did not join a seqpar communication within the timeout (`set_timeout`)."""

    def __init__(self, message: str, *, op: str, rank: int, peers: Sequence[int], waited: float, limit: float):
        super().__init__(message, op=op, rank=rank, peers=peers, waited=waited)
        self.limit = limit


def _rebuild(cls, message: str, fields: dict) -> CommError:
    return cls(message, **fields)


def set_timeout(seconds: Optional[float]) -> None:
    """Bound every seqpar wait on a peer to `seconds` (this process only; set it on every
    rank). `None` restores the default: the process group's own timeout."""
    global _timeout
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                or seconds <= 0:
            raise ValueError(f"seconds: expected a positive finite number of seconds or None, got {seconds!r}")
        seconds = float(seconds)
    _timeout = seconds


def get_timeout() -> Optional[float]:
    """The timeout set by `set_timeout`, or None when seqpar uses each group's own."""
    return _timeout


def group_timeout(group, device: torch.device = torch.device("cpu")) -> timedelta:
    """The timeout the process group `group` (None: the default group) was created with,
    for its backend serving `device`; torch's default for that backend where the group's
    options do not say."""
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    try:
        return pg._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):  # a backend without options (a custom one)
        return dist.distributed_c10d._get_default_timeout(dist.get_backend(group))


def _limit(group, device: torch.device) -> Optional[timedelta]:
    """The timeout for a wait on `device` tensors, or None for an untimed wait."""
    if _timeout is not None:
        return timedelta(seconds=_timeout)
    if device.type != "cpu":
        return None  # stream-ordered NCCL wait: no host sync on the default path (module doc)
    return group_timeout(group, device)


def group_peers(group) -> List[int]:
    """Global ranks of every member of `group` but this rank: who a collective waits for."""
    ranks = dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
    me = dist.get_rank()
    return [r for r in ranks if r != me]


@torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
def wait(works: Iterable, group, op: str, peers: Sequence[Sequence[int]], device: torch.device, what: str) -> None:
    """Wait for each of `works` (posted by `op`); `peers[i]`: the global ranks `works[i]`
    waits for. `what` words the operation for the error ("exchange", "all-reduce", ...).
    One deadline for all of them: the limit bounds the whole call, not each piece."""
    works = list(works)
    limit = _limit(group, device)
    if limit is None:
        for work in works:
            work.wait()
        return
    start = time.monotonic()
    deadline = start + limit.total_seconds()
    for i, work in enumerate(works):
        remaining = timedelta(seconds=deadline - time.monotonic())
        try:
            work.wait(max(remaining, _MIN_REMAINING))
        except Exception as exc:
            # who is late: this piece's peers, and those of every later piece still pending
            late = list(peers[i])
            for later, their_peers in zip(works[i + 1:], peers[i + 1:]):
                if not _completed(later):
                    late += [p for p in their_peers if p not in late]
            raise _error(exc, op, what, sorted(late), time.monotonic() - start, limit.total_seconds()) from exc


def _completed(work) -> bool:
    try:
        return work.is_completed()
    except Exception:  # a failed work is not a late peer's fault alone; count it as pending
        return False


def _error(exc: Exception, op: str, what: str, peers: List[int], waited: float, limit: float) -> CommError:
    rank = dist.get_rank()
    source = "seqpar.comm.set_timeout" if _timeout is not None else "the process group's timeout"
    who = f"rank {peers[0]}" if len(peers) == 1 else f"ranks {peers}"
    # torch words its own expiry "Operation timed out!" (collectives) or "Timed out waiting
    # ...ms for send/recv operation" (gloo p2p); a backend's own, shorter op timeout lands here too
    if "timed out" in str(exc).lower() or waited >= 0.99 * limit:
        return CommTimeout(
            f"seqpar {op}: rank {rank} waited {waited:.1f} s for {who} to join this {what}, past the "
            f"{limit:g} s timeout ({source}). Every rank must make the same seqpar calls in the same "
            f"order; a rank that skipped the call, or raised before it, leaves its peers waiting. The "
            f"process group may be unusable now. (backend: {exc})",
            op=op, rank=rank, peers=peers, waited=waited, limit=limit,
        )
    return CommError(
        f"seqpar {op}: this {what} between rank {rank} and {who} failed after {waited:.1f} s: {exc}",
        op=op, rank=rank, peers=peers, waited=waited,
    )


class Pending:
    """A posted collective; `wait()` waits for it under the timeout (like `Work.wait()`)."""

    def __init__(self, work, group, op: str, device: torch.device, what: str):
        self._work, self._group, self._op, self._device, self._what = work, group, op, device, what


    @torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
    def wait(self) -> None:
        if self._work is not None:
            work, self._work = self._work, None
            wait([work], self._group, self._op, [group_peers(self._group)], self._device, self._what)


@torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
def run(work, group, op: str, device: torch.device, what: str) -> None:
    """Wait for the collective `work` on every other member of `group`."""
    Pending(work, group, op, device, what).wait()
