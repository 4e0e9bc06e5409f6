"""The comm layer's own operations, run directly on the shared local worlds."""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import seqpar.comm
from seqpar.comm import alltoall, collectives, p2p, timeout
from seqpar.comm.groups import agree, describe
from seqpar.comm.scan import StateScan
from seqpar.testing import world


def _ring_exchange():
    rank, size = dist.get_rank(), dist.get_world_size()
    send = torch.full((3,), float(rank))
    recv = torch.empty(3)
    nothing = torch.empty(0)  # zero-byte pieces stay off the wire on both ends
    received = p2p.post([(send, (rank + 1) % size), (nothing, (rank - 1) % size)],
                        [(recv, (rank - 1) % size), (nothing, (rank + 1) % size)], None, op="test.p2p").wait()
    return [t.tolist() for t in received]


def test_post_exchanges_with_both_neighbours():
    for rank, received in enumerate(world(3).run(_ring_exchange)):
        assert received == [[float((rank - 1) % 3)] * 3, []], rank


def _gather_beside_an_exchange():
    """An uneven all-gather and a plain exchange of the same size with the same peer,
    posted in opposite orders on the two ranks: on gloo the gather goes as tagged
    messages, which land in the gather's buffers only, whatever was posted first."""
    rank = dist.get_rank()
    sizes = [3, 2]
    x = torch.full((sizes[rank], 2), float(rank + 1))
    plain_out, plain_in = torch.full((3, 2), -1.0 - rank), torch.empty(3, 2)
    with seqpar.comm.track() as stats:
        if rank == 0:
            handle, buffers = collectives.all_gather_uneven_async(x, sizes, None, op="test.gather")
            plain = p2p.post([(plain_out, 1)], [(plain_in, 1)], None, op="test.plain")
        else:
            plain = p2p.post([(plain_out, 0)], [(plain_in, 0)], None, op="test.plain")
            handle, buffers = collectives.all_gather_uneven_async(x, sizes, None, op="test.gather")
    handle.wait()
    plain.wait()
    own_is_input = buffers[rank].data_ptr() == x.data_ptr() if x.shape[0] == max(sizes) else None
    return ([b[:n].tolist() for b, n in zip(buffers, sizes)], plain_in.tolist(), stats.bytes_sent("test.gather"),
            collectives.gathers_by_p2p(None), own_is_input)


def test_uneven_all_gather_lands_apart_from_other_traffic():
    results = world(2).run(_gather_beside_an_exchange)
    sizes = [3, 2]
    for rank, (gathered, plain, sent, by_p2p, own_is_input) in enumerate(results):
        assert gathered == [[[float(r + 1)] * 2] * n for r, n in enumerate(sizes)], rank
        assert plain == [[-1.0 - (1 - rank)] * 2] * 3, rank
        assert sent == 3 * 2 * 4, rank  # padded to 3 rows, to 1 peer, fp32
        assert by_p2p  # the suite's worlds are gloo
        assert own_is_input in (None, True), rank  # no copy of the own shard


def _all_to_all(members):
    rank, size = dist.get_rank(), dist.get_world_size()
    ranks = list(range(size)) if members is None else members
    if rank not in ranks:
        return None
    me = ranks.index(rank)
    # member i sends (i + j + 1) rows to member j, each row [10 i + j, -(10 i + j)]
    send_rows = [me + j + 1 for j in range(len(ranks))]
    recv_rows = [i + me + 1 for i in range(len(ranks))]
    send = torch.cat([torch.tensor([[10.0 * me + j, -(10.0 * me + j)]]).repeat(n, 1) for j, n in enumerate(send_rows)])
    with seqpar.comm.track() as stats:
        out = alltoall.all_to_all_rows(send, send_rows, recv_rows, None, op="test.a2a", members=members)
    return out.tolist(), stats.bytes_sent("test.a2a")


@pytest.mark.parametrize("members", [None, [0, 2]])
def test_all_to_all_rows_uneven(members):
    results = world(3).run(_all_to_all, members)
    ranks = [0, 1, 2] if members is None else members
    for me, rank in enumerate(ranks):
        rows, sent = results[rank]
        expected = []
        for i in range(len(ranks)):
            expected += [[10.0 * i + me, -(10.0 * i + me)]] * (i + me + 1)
        assert rows == expected, rank
        own = 2 * me + 1  # the piece a member sends itself is a local copy, not counted
        assert sent == (sum(me + j + 1 for j in range(len(ranks))) - own) * 2 * 4, rank
    if members is not None:
        assert results[1] is None


def _scan(reverse, pieces):
    rank, size = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(7)
    a_all = torch.rand(size, 5, generator=gen, dtype=torch.float64)
    b_all = torch.randn(size, 5, generator=gen, dtype=torch.float64)
    scan = StateScan(5, dtype=torch.float64, device=torch.device("cpu"), group=None, rank=rank, world=size,
                     peer=lambda r: r, reverse=reverse, pieces=pieces, op="test.scan")
    x_in, x_out = scan.run(a_all[rank], b_all[rank])
    scan.finish()
    # sequential reference: x_r = a_r x_prev + b_r, along the scan's order
    x, expected_in = torch.zeros(5, dtype=torch.float64), {}
    for r in (reversed(range(size)) if reverse else range(size)):
        expected_in[r] = x
        x = a_all[r] * x + b_all[r]
    # close, not equal: the scan's addcmul may fuse the multiply-add, which rounds once
    close = dict(rtol=1e-12, atol=1e-12)
    return (torch.allclose(x_in, expected_in[rank], **close),
            torch.allclose(x_out, a_all[rank] * expected_in[rank] + b_all[rank], **close))


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_matches_the_sequential_recurrence(reverse):
    for rank, (got_in, got_out) in enumerate(world(3).run(_scan, reverse, 2)):
        assert got_in and got_out, rank


def _agree(values):
    rank = dist.get_rank()
    try:
        agree(None, dist.get_world_size(), (("n", describe(values[rank])),), None, what="test.agree")
        return None
    except ValueError as exc:
        return str(exc)


def test_agree_passes_equal_and_names_differing_values_on_every_rank():
    assert world(3).run(_agree, [4, 4, 4]) == [None] * 3
    messages = world(3).run(_agree, [4, 5, 4])
    for message in messages:
        assert message == "test.agree: n must be the same on every rank, got rank 0: ('int', 4), " \
                          "rank 1: ('int', 5), rank 2: ('int', 4)"


def _group_timeouts():
    sub = dist.new_group([0, 1], timeout=timedelta(seconds=77))
    return timeout.group_timeout(None).total_seconds(), timeout.group_timeout(sub).total_seconds()


def test_default_timeout_is_the_groups_own():
    # LocalWorld creates its group with torch's default (30 min on gloo)
    for default, sub in world(2).run(_group_timeouts):
        assert (default, sub) == (1800.0, 77.0)


def test_set_timeout_validates_and_none_restores_the_default():
    assert seqpar.comm.get_timeout() is None
    try:
        seqpar.comm.set_timeout(2)
        assert seqpar.comm.get_timeout() == 2.0
        for bad in (0, -1.0, float("nan"), float("inf"), True, "2"):
            with pytest.raises(ValueError, match=r"seconds: expected a positive finite number .* got"):
                seqpar.comm.set_timeout(bad)
        assert seqpar.comm.get_timeout() == 2.0
    finally:
        seqpar.comm.set_timeout(None)
    assert seqpar.comm.get_timeout() is None
