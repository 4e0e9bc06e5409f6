"""Ulysses and USP with their heads in pipelined chunks (`head_chunks`): every chunk count
against float64 dense attention, with the masks, value head dims, sinks and memory layouts
that change what each chunk carries; the option's checks; and the bytes, which chunks
must not change."""
import re

import pytest
import torch

import seqpar
from seqpar.layout import SeqLayout
from seqpar.strategies import ulysses
from seqpar.testing import AttentionProblem, assert_matches_dense, check_attention, world

CASES = [
    # (strategy, world, options, problem fields)
    ("ulysses", 2, {"head_chunks": 2}, dict(seq_len=13, heads=8, kv_heads=4, scheme="zigzag", causal=True)),
    ("ulysses", 2, {"head_chunks": 4}, dict(seq_len=11, heads=8, kv_heads=8, scheme="stripe", causal=True,
                                            window=(4, -1), sinks=True)),
    ("ulysses", 3, {"head_chunks": 2}, dict(seq_len=17, heads=6, kv_heads=6, scheme="balanced", causal=True,
                                            documents=(0, 4, 9, 17))),
    ("ulysses", 2, {"head_chunks": 2}, dict(seq_len=10, heads=4, kv_heads=4, head_dim=12, value_dim=8,
                                            scheme="contiguous", softcap=4.0)),
    ("ulysses", 4, {"head_chunks": 2}, dict(seq_len=21, heads=16, kv_heads=8, scheme="zigzag", causal=True,
                                            memory_layout="fused_qkv")),
    ("usp", 4, {"ulysses_size": 2, "head_chunks": 2}, dict(seq_len=19, heads=8, kv_heads=4, scheme="zigzag",
                                                           causal=True)),
    ("usp", 4, {"ulysses_size": 2, "head_chunks": 2}, dict(seq_len=16, heads=4, kv_heads=4, head_dim=12,
                                                           value_dim=4, scheme="stripe", causal=True,
                                                           sinks=True, memory_layout="heads_major")),
]


@pytest.mark.parametrize("strategy, p, options, fields", CASES)
@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_head_chunks_match_dense(strategy, p, options, fields, dtype):
    problem = AttentionProblem(p, dtype=dtype, seed=fields["seq_len"] + p, **fields)
    report = world(p).run(check_attention, problem, None, strategy=strategy, **options)[0]
    assert_matches_dense(problem, report)


def _bytes_and_out(chunks):
    import torch.distributed as dist

    from seqpar.comm import stats

    layout = SeqLayout(14, scheme="zigzag")
    gen = torch.Generator().manual_seed(dist.get_rank())
    q, k, v, do = (torch.randn(1, layout.local_len, 4, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    q.requires_grad_()
    with stats.track() as counted:
        out = seqpar.ulysses_attention(q, k.requires_grad_(), v.requires_grad_(), layout=layout, causal=True,
                                       head_chunks=chunks)
        out.backward(do)
    sent = {op: (entry["bytes_sent"], entry["bytes_received"]) for op, entry in counted.as_dict().items()}
    return sent, out.detach(), q.grad, k.grad, v.grad


def test_chunks_move_the_same_bytes_and_give_the_same_result():
    one, two = (world(2).run(_bytes_and_out, c) for c in (1, 2))
    for a, b in zip(one, two):
        assert a[0] == b[0] and a[0]  # the same bytes per exchange, and some were sent
        for x, y in zip(a[1:], b[1:]):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_default_chunks():
    assert ulysses.default_head_chunks(8, 8, 2) == 2  # 4 KV heads per member
    assert ulysses.default_head_chunks(8, 2, 2) == 1  # 1 per member
    assert ulysses.default_head_chunks(8, 1, 2) == 1  # replicated
    assert ulysses.default_head_chunks(8, 8, 1) == 1  # no exchange to hide


@pytest.mark.parametrize("chunks, error, message", [
    (3, ValueError, r"head_chunks: expected a divisor of the KV heads per Ulysses member \(4 KV heads over 2 "
                    r"members: 2\), got 3"),
    (2, None, None),
    (0, ValueError, r"head_chunks: expected a positive int or None, got 0"),
    (True, TypeError, r"head_chunks: expected a positive int or None, got True"),
    ("2", TypeError, r"head_chunks: expected a positive int or None, got '2'"),
])
def test_head_chunks_checked(chunks, error, message):
    q = torch.randn(1, 6, 4, 8, device="meta")
    k = torch.randn(1, 6, 4, 8, device="meta")
    layout = SeqLayout.simulated(12, 2, 0)
    from seqpar.registry import check_strategy

    if error is None:
        assert check_strategy("ulysses", q, k, k, layout, {"head_chunks": chunks}).head_chunks == chunks
        return
    with pytest.raises(error, match=message):
        check_strategy("ulysses", q, k, k, layout, {"head_chunks": chunks})


def test_replicated_kv_heads_take_one_chunk():
    q, k = torch.randn(1, 6, 4, 8, device="meta"), torch.randn(1, 6, 1, 8, device="meta")
    from seqpar.registry import check_strategy

    layout = SeqLayout.simulated(12, 2, 0)
    assert check_strategy("usp", q, k, k, layout, {}).head_chunks == 1
    with pytest.raises(ValueError, match=r"\(1 KV heads over 2 members: 1, replicated\), got 2"):
        check_strategy("usp", q, k, k, layout, {"ulysses_size": 2, "head_chunks": 2})


def _chunks_per_rank(strategy, per_rank, extra):
    """One call whose head_chunks differ by rank; returns the error this rank raised."""
    import torch.distributed as dist

    layout = SeqLayout(12, scheme="zigzag")
    q, k, v = (torch.randn(1, layout.local_len, 8, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    try:
        out = seqpar.attention(q, k, v, layout=layout, causal=True, strategy=strategy,
                               head_chunks=per_rank[dist.get_rank()], **extra)
        out.sum().backward()
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("strategy, p, per_rank, extra, message", [
    # valid on each rank, but they differ: every rank names the option and each rank's value
    ("ulysses", 2, [2, 1], {}, r"options must be the same on every rank.*head_chunks"),
    ("ulysses", 2, [None, 1], {}, r"options must be the same on every rank.*head_chunks"),
    ("usp", 4, [2, 2, 1, 2], {"ulysses_size": 2}, r"options must be the same on every rank.*head_chunks"),
    # bad on one rank only: that rank's own error, and the others name it
    ("ulysses", 2, [3, 2], {}, r"head_chunks: expected a divisor"),
])
def test_head_chunks_disagreement_raises_on_every_rank(strategy, p, per_rank, extra, message):
    errors = world(p).run(_chunks_per_rank, strategy, per_rank, extra, timeout=60)
    assert all(e is not None for e in errors), errors
    for e in errors:
        assert re.search(message, e, flags=re.S), errors


def test_usp_of_one_rank_per_group_has_no_head_chunks():
    from seqpar.registry import check_strategy

    q = torch.randn(1, 6, 8, 8, device="meta")
    layout = SeqLayout.simulated(12, 2, 0)
    assert check_strategy("usp", q, q, q, layout, {"ulysses_size": 1}).head_chunks == 1
    with pytest.raises(ValueError, match=r"head_chunks: ulysses_size=1 is ring attention, which has no head "
                                         r"chunks; expected None or 1, got 2"):
        check_strategy("usp", q, q, q, layout, {"ulysses_size": 1, "head_chunks": 2})
