"""A peer that is alive but skips a seqpar call: its partners raise seqpar's CommTimeout,
naming the operation and the peer, within the configured timeout (issue 13, item 4).

Each test uses a fresh 2-rank world, closed afterwards: after a timed-out wait the
skipped operation is still posted, so that process group is not reusable.
"""
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.comm import CommTimeout, alltoall, collectives
from seqpar.layout import SeqLayout
from seqpar.testing import AttentionProblem
from seqpar.testing.world import LocalWorld

LIMIT = 2.0  # seconds: the timeout the tests set
DETECT_WITHIN = 10.0  # seconds: the bound the issue asks for


def _in_fresh_world(fn, *args):
    w = LocalWorld(2, threads_per_rank=1)
    try:
        return w.run(fn, *args, timeout=120)  # start-up included; without seqpar's timeout rank 0 would wait 30 min
    finally:
        w.close(force=True)  # a rank may still hold the stuck operation: do not wait on it


def _timed(call):
    """(error fields, seconds) of `call()` on this rank, which must raise CommTimeout."""
    start = time.monotonic()
    try:
        call()
    except CommTimeout as exc:
        return {"type": type(exc).__name__, "message": str(exc), "op": exc.op, "peers": exc.peers,
                "limit": exc.limit}, time.monotonic() - start
    return None, time.monotonic() - start


def _qkv(layout):
    q, k, v, _ = AttentionProblem(2, 16, heads=2, kv_heads=2, head_dim=4).global_tensors()
    return [layout.shard(t) for t in (q, k, v)]


def _ring_skipped_by_rank_1(validation):
    seqpar.comm.set_validation(validation)
    seqpar.comm.set_timeout(LIMIT)
    layout = SeqLayout(16, scheme="zigzag")
    q, k, v = _qkv(layout)
    if validation == "first":  # agree once on both ranks, so rank 0's next call goes straight to the ring
        seqpar.ring_attention(q, k, v, layout=layout, causal=True)
    if dist.get_rank() == 1:
        return None  # alive, but skips the call
    return _timed(lambda: seqpar.ring_attention(q, k, v, layout=layout, causal=True))


def _check(result, op_prefix, what):
    error, seconds = result
    assert error is not None, f"expected CommTimeout from {op_prefix}, got a return after {seconds:.1f} s"
    assert error["op"].startswith(op_prefix) and error["peers"] == [1] and error["limit"] == LIMIT, error
    assert LIMIT * 0.9 <= seconds < DETECT_WITHIN, seconds
    message = error["message"]
    assert message.startswith(f"seqpar {error['op']}: rank 0 waited "), message
    assert f"for rank 1 to join this {what}, past the 2 s timeout (seqpar.comm.set_timeout)" in message, message


def test_ring_attention_times_out_in_the_agreement_when_a_peer_skips_it():
    # the default validation agrees on every call, so the first wait is agree's all-reduce
    results = _in_fresh_world(_ring_skipped_by_rank_1, "always")
    assert results[1] is None
    _check(results[0], "check", "all-reduce")


def test_ring_attention_times_out_in_the_ring_exchange_when_a_peer_skips_it():
    results = _in_fresh_world(_ring_skipped_by_rank_1, "first")
    _check(results[0], "ring.forward", "exchange")


def _all_to_all_skipped_by_rank_1():
    seqpar.comm.set_timeout(LIMIT)
    if dist.get_rank() == 1:
        return None
    send = torch.ones(4, 3)
    return _timed(lambda: alltoall.all_to_all_rows(send, [2, 2], [2, 2], None, op="ulysses.test"))


def test_all_to_all_times_out_when_a_peer_skips_it():
    _check(_in_fresh_world(_all_to_all_skipped_by_rank_1)[0], "ulysses.test", "all-to-all")


def _all_gather_skipped_by_rank_1():
    seqpar.comm.set_timeout(LIMIT)
    if dist.get_rank() == 1:
        return None
    return _timed(lambda: collectives.all_gather_uneven(torch.ones(3, 2), [3, 2], None, op="allgather.test"))


def test_all_gather_times_out_when_a_peer_skips_it():
    _check(_in_fresh_world(_all_gather_skipped_by_rank_1)[0], "allgather.test", "all-gather")


def _groups_timeout_by_default():
    # no set_timeout: seqpar's limit is the group's own (short here so the test is quick)
    group = dist.new_group([0, 1], timeout=timedelta(seconds=LIMIT))
    if dist.get_rank() == 1:
        return None
    error, seconds = _timed(lambda: collectives.all_reduce_sum(torch.ones(3), group, op="test.default"))
    return error, seconds


def test_default_limit_is_the_groups_timeout():
    error, seconds = _in_fresh_world(_groups_timeout_by_default)[0]
    assert error is not None and error["op"] == "test.default" and error["limit"] == LIMIT, error
    assert "past the 2 s timeout (the process group's timeout)" in error["message"], error
    assert LIMIT * 0.9 <= seconds < DETECT_WITHIN, seconds
