"""The cross-rank agreement runs on the host: on a device (NCCL) group it never creates a
device tensor, so it never syncs the host with the device stream (issue: a 32-layer model
stalled its launch queue 64 times per step)."""
import torch
import torch.distributed as dist

import seqpar
from seqpar.comm import collectives, groups
from seqpar.testing import LocalWorld


def _ring_on_device_groups(device_groups, group, odd_rank):
    """Pretend `device_groups` are device groups whose tensors live on cuda (this CPU build
    cannot create one: any device tensor would raise), then call ring attention over
    `group`, causal only on `odd_rank` (None: everywhere alike). The output, or the error."""
    groups._runs_on_host = lambda g: g not in device_groups
    collectives.device_of = lambda g: torch.device("cuda") if g in device_groups else torch.device("cpu")
    # the one collective that starts a device group, once per group: recorded, not run
    # (it needs a device tensor; every rank calls it alike, before any exchange)
    started = getattr(groups, "_test_started", None)
    if started is None:
        started = groups._test_started = []
        groups._first_collective = started.append
    layout = seqpar.SeqLayout(8, scheme="zigzag", group=group)
    q = torch.randn(1, layout.local_len, 2, 4, dtype=torch.float64)
    try:
        return seqpar.ring_attention(q, q, q, layout=layout, causal=dist.get_rank() == odd_rank)
    except ValueError as exc:
        return "raised: " + str(exc)


def _as_if_nccl(mismatch: bool):
    """The world group pretended to be a device group."""
    out = _ring_on_device_groups((None, dist.group.WORLD), None, 1 if mismatch else None)
    if isinstance(out, str):
        return out
    return (tuple(out.shape), len(groups._host_groups), out.device.type, len(groups._test_started))


def test_agreement_uses_a_host_group_on_device_groups():
    # a fresh world: the patches above must not leak into the shared worlds
    w = LocalWorld(2, threads_per_rank=1)
    try:
        # the device group is started once (its first collective joins every rank), and
        # the agreement runs on the host group; a second call starts nothing
        assert w.run(_as_if_nccl, False, timeout=120) == [((1, 4, 2, 4), 1, "cpu", 1)] * 2
        assert w.run(_as_if_nccl, False, timeout=120) == [((1, 4, 2, 4), 1, "cpu", 1)] * 2
        for message in w.run(_as_if_nccl, True, timeout=120):
            assert message.startswith("raised: ") and "causal must be the same on every rank" in message, message
    finally:
        w.close(force=True)


def _host_group_of_world_is_itself():
    return groups.host_group(None) is None or groups.host_group(None) is dist.group.WORLD


def test_gloo_groups_are_their_own_host_group():
    from seqpar.testing import world

    assert world(2).run(_host_group_of_world_is_itself) == [True, True]


def _sub_group_as_if_nccl(mismatch: bool):
    """A 2-rank sub-group of a 3-rank world made by seqpar.comm.new_group, pretended to be a
    device group (its tensors on cuda, which this CPU build cannot create): ring attention
    on it agrees over the gloo twin made with it, never on the device group."""
    groups._needs_twin = lambda backend: True
    group = seqpar.comm.new_group([0, 2])
    if dist.get_rank() == 1:  # not a member: made the groups in step, calls nothing
        return "not a member"
    out = _ring_on_device_groups((group,), group, 2 if mismatch else None)
    if isinstance(out, str):
        return out
    twin = groups.host_group(group)
    return (tuple(out.shape), twin is not None and twin is not group and dist.get_world_size(twin) == 2)


def test_sub_groups_made_by_seqpar_agree_on_their_host_twin():
    w = LocalWorld(3, threads_per_rank=1)
    try:
        got = w.run(_sub_group_as_if_nccl, False, timeout=120)
        assert got == [((1, 4, 2, 4), True), "not a member", ((1, 4, 2, 4), True)]
        got = w.run(_sub_group_as_if_nccl, True, timeout=120)
        for message in (got[0], got[2]):
            assert message.startswith("raised: ") and "causal must be the same on every rank" in message, message
    finally:
        w.close(force=True)


def _twin_with_local_synchronization():
    """Only the members make a locally synchronised group (and its twin); a group every rank
    makes afterwards must still line up on all of them."""
    groups._needs_twin = lambda backend: True
    if dist.get_rank() in (0, 2):
        seqpar.comm.new_group([0, 2], use_local_synchronization=True)
    later = dist.new_group([0, 1, 2])
    t = torch.ones(1)
    dist.all_reduce(t, group=later)
    return float(t)


def test_a_locally_synchronised_twin_leaves_later_groups_in_step():
    w = LocalWorld(3, threads_per_rank=1)
    try:
        assert w.run(_twin_with_local_synchronization, timeout=60) == [3.0, 3.0, 3.0]
    finally:
        w.close(force=True)
