"""Cross-rank agreement on a call's metadata, so bad input raises on every rank.

A rank that got bad input must not leave its peers waiting inside a collective, and ranks
that disagree on shapes must not start exchanging buffers of different sizes (gloo aborts
the process; NCCL hangs). Each public entry point validates locally, then calls `agree()`:

- every rank all-reduces (MAX) a 16-byte digest `[h, -h]` of its call signature (a rank
  whose own validation failed contributes a digest no peer can have). All digests are equal
  iff `max(h) == -max(-h)`, and every rank sees the same two maxima, so every rank reaches
  the same verdict;
- only on disagreement do the ranks all-gather their signatures and error messages, so
  that each rank raises an error naming the field, every rank's value, or the bad rank.

The agreement is host metadata, so it runs on the host where it can: over the group
itself when its backend is gloo, for the default (world) group on NCCL over a gloo group
of all ranks created once (`host_group`), and for a sub-group made by `new_group` over
the gloo twin made with it. There the check never touches the device stream: no host
sync, and the launch queue keeps running ahead (one ~16-byte TCP all-reduce per call
instead). On an NCCL sub-group made otherwise it runs on that group and syncs the host:
creating a gloo twin later, safely, would need every process of the world.

The digest check runs on every call ("always", the default): a rank cannot know from its
own history whether its peers have seen a signature, so a per-rank cache cannot decide
to skip it consistently. `set_validation("first")` skips signatures this rank has already
agreed on, saving the tiny collective. Under "first", a signature that changes on one rank
only, after the old one was agreed on, is not caught.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Optional, Set, Tuple

import torch
import torch.distributed as dist

from . import collectives, timeout

_MODES = ("always", "first")
_mode = "always"
_seen: Dict[object, Set[tuple]] = {}
_host_groups: Dict[object, object] = {}
_started: Set[object] = set()


def _runs_on_host(group) -> bool:
    """Whether `group` takes CPU tensors (gloo, alone or as the cpu part of a mixed backend)."""
    return "gloo" in str(dist.get_backend(group))


def host_group(group):
    """A process group over `group`'s ranks that takes CPU tensors, or None.

    `group` itself when its backend takes CPU tensors. For the default (world) group on a
    device backend, a gloo group of all ranks, created once on first use with the world's
    timeout: every rank reaches it in the same collective call, so all ranks create it in
    step, as `new_group` requires. For a device sub-group made by `seqpar.comm.new_group`,
    the gloo twin made with it. For any other device sub-group None: creating a group
    needs every process of the world (or, with local synchronisation, names derived from
    each process's own group history, which can differ between the members and hang), so
    the agreement stays on the device group there and syncs the host."""
    if _runs_on_host(group):
        return group
    if group is not None and group is not dist.group.WORLD:
        return _host_groups.get(group)  # a twin made by `new_group`, else None
    if "world" not in _host_groups:
        limit = timeout.group_timeout(None, collectives.device_of(None))
        _host_groups["world"] = dist.new_group(backend="gloo", timeout=limit)
    return _host_groups["world"]


def new_group(ranks=None, **kwargs):
    """`torch.distributed.new_group(ranks, **kwargs)`, plus, when that group runs on a device
    (NCCL), a gloo twin over the same ranks made in the same step, so that seqpar's
    agreement on the group runs on the host and never syncs it with the device stream.
    Like `new_group` itself, every process of the world must call it, in the same order
    (with `use_local_synchronization=True`, every member); `timeout` applies to both."""
    group = dist.new_group(ranks, **kwargs)
    if not _needs_twin(kwargs.get("backend")):
        return group  # the backend takes CPU tensors (every process decides alike, from the name)
    limit = kwargs.get("timeout") or timeout.group_timeout(None, collectives.device_of(None))
    # made the way the group was: with `use_local_synchronization` only its members call this,
    # and a twin made by every rank would leave the others' group names behind (a later
    # group made by all ranks then hangs)
    twin = dist.new_group(ranks, backend="gloo", timeout=limit,
                          use_local_synchronization=bool(kwargs.get("use_local_synchronization", False)))
    if _is_member(group):
        _host_groups[group] = twin
    return group


def _needs_twin(backend) -> bool:
    """Whether a group of `backend` (a name; None: the world's) takes device tensors only."""
    return "gloo" not in str(backend or dist.get_backend())


def _is_member(group) -> bool:
    return group is not None and group != dist.GroupMember.NON_GROUP_MEMBER


def start(group) -> None:
    """Run one collective on a device group's own backend, once per group, with every
    member: NCCL creates a communicator lazily in the group's first call, and PyTorch's
    `batch_isend_irecv` must not be that call unless every member posts in it, which the
    strategies' point-to-point exchanges do not promise (a rank that sees none of its
    peers' keys, and none of them its own, posts nothing). `agree` calls this before any
    exchange of every public entry point; on a device backend it is a one-element
    all-reduce queued on the stream (no host wait), on gloo nothing."""
    key = "world" if group is None or group is dist.group.WORLD else group
    if key in _started:
        return
    _started.add(key)
    if not _runs_on_host(group):
        _first_collective(group)


def _first_collective(group) -> None:
    dist.all_reduce(torch.zeros(1, device=collectives.device_of(group)), group=group)


def set_validation(mode: str) -> None:
    """"always" (default): agree on every call; "first": skip signatures agreed on before."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    _mode = mode


def _digest(signature) -> int:
    return int.from_bytes(hashlib.blake2b(repr(signature).encode(), digest_size=8).digest(), "little", signed=True) >> 1


def describe(x) -> tuple:
    """A picklable, comparable description of an argument (tensors by shape/dtype/device)."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), str(x.dtype), x.device.type)
    if isinstance(x, (bool, int, float, str, type(None))):
        return (type(x).__name__, x)
    return (type(x).__name__,)


@torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
def agree(group, world_size: int, signature: Tuple[Tuple[str, object], ...], error: Optional[Exception], what: str) -> None:
    """Raise on every rank if any rank's `error` is set or the signatures differ."""
    if world_size == 1:
        if error is not None:
            raise error
        return
    seen = _seen.setdefault(group, set())
    if error is None and _mode == "first" and signature in seen:
        return  # after a first call, which started the group
    start(group)  # every rank of a first call gets here (none has seen a signature yet)
    # a failed rank's digest is odd-signed and rank-specific: it equals nobody's
    mine = _digest(signature) if error is None else -(1 + dist.get_rank(group))
    host = host_group(group)
    if host is None:  # a device sub-group: agree on it (a host sync on NCCL)
        host = group
    digests = torch.tensor([mine, -mine], dtype=torch.int64, device=collectives.device_of(host))
    collectives.all_reduce_max(digests, host, op="check")
    top, neg_bottom = digests.tolist()
    if error is None and top == mine == -neg_bottom:
        seen.add(signature)
        return
    message = None if error is None else (type(error).__name__, str(error))
    gathered = collectives.all_gather_object((signature, message), host, op="check")
    if error is not None:
        raise error
    for rank, (_, msg) in enumerate(gathered):
        if msg is not None:
            raise ValueError(f"{what}: rank {rank} of the group got bad input, so every rank stops: {msg[1]}")
    # fields in signature order, so the first (root-cause) field that differs on any rank is named
    mine_fields = dict(signature)
    for name in mine_fields:
        for sig, _ in gathered:
            if dict(sig).get(name) != mine_fields[name]:
                values = ", ".join(f"rank {r}: {dict(s).get(name)!r}" for r, (s, _) in enumerate(gathered))
                raise ValueError(f"{what}: {name} must be the same on every rank, got {values}")
    seen.add(signature)  # the digests differed but the signatures do not: a hash collision

