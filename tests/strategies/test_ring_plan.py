"""Ring attention moves only what is seen: the plan (`ring.RingPlan`) stops K/V at the
last rank that sees them and sends only the rows seen; measured bytes equal the plan's
analytic count, the results stay exact."""
import pytest
import torch

import seqpar
from seqpar.layout import Mask, SeqLayout
from seqpar.strategies import ring
from seqpar.testing import AttentionProblem, assert_matches_dense, check_attention, world


def _bytes(layout, window, **kw):
    return [ring.analytic_bytes(SeqLayout.simulated(layout[0], layout[1], r, layout[2], kw.get("documents")),
                                1, 8, 8, 64, 2, causal=True, window_size=window) for r in range(layout[1])]


def test_a_window_of_n_over_8_at_p4_moves_at_most_035x_of_the_unwindowed_ring():
    n, p = 4096, 4
    full = _bytes((n, p, "contiguous"), (-1, -1))
    windowed = _bytes((n, p, "contiguous"), (n // 8, 0))
    for phase in ("forward", "backward"):
        busiest = max(b[phase] for b in windowed) / max(b[phase] for b in full)
        assert busiest <= 0.35, (phase, busiest)
        # a window of N/8 inside shares of N/4: only the last N/8 rows of the previous rank
        assert max(b["forward"] for b in windowed) == n // 8 * 8 * 64 * 2 * 2


def test_documents_each_on_one_rank_move_nothing():
    # four documents of equal length: the balanced layout gives each rank one
    docs = (0, 16, 32, 48, 64)
    plan = ring.ring_plan(SeqLayout.simulated(64, 4, 0, "balanced", docs), Mask(True))
    assert plan.hops == (0, 0, 0, 0)
    assert all(b == {"forward": 0, "backward": 0} for b in _bytes((64, 4, "balanced"), (-1, -1), documents=docs))


def test_plan_spans_shrink_along_the_ring():
    """The rows that travel on from a rank are within what it received."""
    layout = SeqLayout.simulated(40, 4, 0, "stripe")
    plan = ring.ring_plan(layout, Mask(True, (7, -1)))
    for s, spans in enumerate(plan.spans):
        for t in range(1, plan.hops[s] + 1):
            (a0, b0), (a1, b1) = spans[t - 1], spans[t]
            assert a0 <= a1 <= b1 <= b0, (s, t, spans)


def _measured(seq_len, scheme, window, documents):
    layout = SeqLayout(seq_len, scheme=scheme, cu_seqlens=documents)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, layout.local_len, 2, 8, generator=gen).requires_grad_() for _ in range(3))
    with seqpar.comm.track() as fwd:
        out = seqpar.ring_attention(q, k, v, layout=layout, causal=True, window_size=window)
    with seqpar.comm.track() as bwd:
        out.sum().backward()
    want = ring.analytic_bytes(layout, 2, 2, 2, 8, 4, causal=True, window_size=window)
    return (fwd.bytes_sent("ring"), bwd.bytes_sent("ring")), (want["forward"], want["backward"])


@pytest.mark.parametrize("p, n, scheme, window, documents", [
    (4, 64, "contiguous", (8, -1), None),  # one rank back, 8 rows
    (4, 64, "contiguous", (20, 0), None),  # two ranks back: rows shrink on the second hop
    (3, 31, "zigzag", (5, -1), None),
    (4, 37, "stripe", (3, -1), None),
    (3, 40, "balanced", (-1, -1), (0, 3, 20, 21, 40)),
    (2, 30, "contiguous", (-1, -1), (0, 10, 30)),
])
def test_measured_bytes_equal_the_plan(p, n, scheme, window, documents):
    for measured, want in world(p).run(_measured, n, scheme, window, documents):
        assert measured == want


@pytest.mark.parametrize("p, n, scheme, window, documents, dtype", [
    (4, 64, "contiguous", (20, 0), None, "float64"),
    (4, 64, "contiguous", (9, 3), None, "bfloat16"),
    (3, 40, "stripe", (6, -1), (0, 3, 20, 21, 40), "float32"),
    (4, 50, "zigzag", (11, -1), None, "float64"),
])
def test_trimmed_rows_stay_exact(p, n, scheme, window, documents, dtype):
    problem = AttentionProblem(p, n, heads=4, kv_heads=2, causal=True, scheme=scheme, window=window,
                               documents=documents, dtype=dtype, seed=n)
    for strategy in ("ring", "usp"):
        report = world(p).run(check_attention, problem, None, strategy=strategy)[0]
        assert_matches_dense(problem, report)
