"""The gated delta rule (`seqpar.delta_attention`) across ranks against the float64
recurrence on real gloo worlds: forward, dq, dk, dv, dbeta and the decay's gradient."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqpar
from seqpar.planner import plan_linear
from seqpar.strategies import delta as delta_strategy
from seqpar.testing import DeltaProblem, assert_matches_dense, check_delta_attention, world
from seqpar.testing.strategies import delta_problems

METHODS = ("ring", "allgather", "allscan")


def _check(problem, **options):
    report = world(problem.world_size).run(check_delta_attention, problem, **options)[0]
    assert_matches_dense(problem, report)
    return report


@settings(max_examples=30)
@given(problem=delta_problems(), method=st.sampled_from(METHODS + ("auto",)), pieces=st.sampled_from([None, 1, 2, 5]),
       chunk=st.sampled_from([None, 1, 3, 8]))
def test_matches_recurrence_float64(problem, method, pieces, chunk):
    report = _check(problem, method=method, scan_pieces=pieces if method in ("allscan", "auto") else None,
                    chunk_size=chunk)
    assert max(v for k, v in report.items() if k.startswith("err_")) < 1e-10


@settings(max_examples=16)
@given(problem=delta_problems(dtypes=("float32", "float16", "bfloat16")), method=st.sampled_from(METHODS))
def test_low_precision_within_dense_error(problem, method):
    _check(problem, method=method)


# 31 tokens over 3 ranks hold 0-10, 11-20, 21-30
DOCUMENTS_31 = [
    None,
    (0, 11, 21, 31),  # every rank starts a document: nothing crosses ranks
    (0, 1, 2, 9, 10, 22, 23, 31),  # one-token documents, starts at a rank's first and last token
    (0, 3, 30, 31),  # one document across all three ranks, a one-token last document
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("decay", ["none", "head", "token"])
@pytest.mark.parametrize("documents", DOCUMENTS_31)
def test_every_method_decay_and_documents_on_uneven_world(method, decay, documents):
    # several chunks per rank (chunk 4), the All-Scan in 3 pieces of whole columns (Dv = 7)
    problem = DeltaProblem(world_size=3, seq_len=31, batch=2, heads=2, key_dim=5, value_dim=7, decay=decay,
                           documents=documents, seed=11)
    report = _check(problem, method=method, chunk_size=4, scan_pieces=3 if method == "allscan" else None)
    assert max(v for k, v in report.items() if k.startswith("err_")) < 1e-12
    assert "err_dbeta" in report and ("err_dg" in report) == (decay != "none")


@pytest.mark.parametrize("method", METHODS)
def test_float32_four_ranks_many_chunks(method):
    problem = DeltaProblem(world_size=4, seq_len=301, batch=1, heads=2, key_dim=16, value_dim=12, decay="token",
                           dtype="float32", documents=(0, 50, 51, 230, 301), seed=3)
    report = _check(problem, method=method, chunk_size=16)
    assert report["err_out"] < 1e-5 and report["err_dbeta"] < 1e-4


def _measure(method, decay, pieces, documents=None):
    layout = seqpar.SeqLayout(23, cu_seqlens=documents)
    b, h, dk, dv = 2, 3, 5, 7
    gen = torch.Generator().manual_seed(layout.rank)
    n = layout.local_len
    q, k = (torch.randn(b, n, h, dk, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(b, n, h, dv, generator=gen, requires_grad=True)
    beta = torch.rand(b, n, h, generator=gen, requires_grad=True)
    g = -torch.rand(b, n, h, generator=gen) if decay else None
    with seqpar.comm.track() as fwd:
        out = seqpar.delta_attention(q, k, v, beta, layout=layout, decay=g, method=method, scan_pieces=pieces)
    with seqpar.comm.track() as bwd:
        out.sum().backward()
    expected = delta_strategy.analytic_bytes(layout, b, h, dk, dv, method=method)
    return fwd.bytes_sent("delta"), bwd.bytes_sent("delta"), expected, fwd.calls("delta")


@pytest.mark.parametrize("method, pieces", [("ring", None), ("allgather", None), ("allscan", 4)])
@pytest.mark.parametrize("decay, documents", [(False, None), (True, (0, 6, 7, 23))])
def test_bytes_equal_analytic_volume(method, pieces, decay, documents):
    results = world(4).run(_measure, method, decay, pieces, documents)
    for rank, (fwd, bwd, expected, calls) in enumerate(results):
        assert (fwd, bwd) == (expected["forward"], expected["backward"]), f"rank {rank}"
        if method == "allscan" and rank < 3:
            # four pieces of whole columns (Dv = 7: 2, 2, 2, 1), one message each
            assert calls == 4 * (1 if rank == 0 else 2), f"rank {rank}: {calls} calls"


def test_bytes_table():
    layout = seqpar.SeqLayout.simulated(64, 4, 1, "contiguous")
    s, t = 2 * 3 * 5 * 7 * 4, 2 * 3 * 5 * 5 * 4
    assert delta_strategy.analytic_bytes(layout, 2, 3, 5, 7, method="ring") == {"forward": s, "backward": s}
    # LASP-2 gathers a [Dk, Dk] transition beside every state; the chain methods keep it home
    assert delta_strategy.analytic_bytes(layout, 2, 3, 5, 7, method="allgather") == {
        "forward": 3 * (s + t), "backward": 3 * s}
    assert delta_strategy.analytic_bytes(layout, 2, 3, 5, 7, method="allscan") == {"forward": s, "backward": s}


def test_planner_counts_the_transition():
    linear = plan_linear(65536, world_size=8, heads=16, key_dim=128, value_dim=128, decay=True)
    delta = plan_linear(65536, world_size=8, heads=16, key_dim=128, value_dim=128, decay=True, rule="delta")
    gather = {c.method: c for c in delta.candidates}["allgather"]
    assert gather.bytes_forward == 7 * 2 * (16 * 128 * 128 * 4)
    assert {c.method: c for c in linear.candidates}["allgather"].bytes_forward < gather.bytes_forward
    assert "delta-rule plan" in str(delta)
    with pytest.raises(ValueError, match="decay: expected False or True, got 'channel'"):
        plan_linear(1024, world_size=2, heads=1, decay="channel", rule="delta")
    with pytest.raises(ValueError, match="rule: expected 'linear' or 'delta'"):
        plan_linear(1024, world_size=2, heads=1, rule="gdn")


def _documents_cut_the_chain(method):
    # every rank starts a document: a rank's results must not depend on another rank's inputs
    layout = seqpar.SeqLayout(12, cu_seqlens=[0, 6, 12])
    args = _rank_inputs(layout.rank)
    leaves = [t.clone().requires_grad_() for t in args[:5]]
    out = seqpar.delta_attention(*leaves[:4], layout=layout, decay=leaves[4], method=method)
    out.backward(args[5])
    return [out.detach()] + [t.grad for t in leaves]


def _rank_inputs(rank):
    gen = torch.Generator().manual_seed(0)
    q, v, do = (torch.randn(1, 6, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    k = torch.nn.functional.normalize(torch.randn(1, 6, 2, 4, generator=gen, dtype=torch.float64), dim=-1)
    beta = torch.rand(1, 6, 2, generator=gen, dtype=torch.float64)
    g = -torch.rand(1, 6, 2, generator=gen, dtype=torch.float64)
    if rank == 0:  # large, slowly decaying state out of rank 0
        q, v, g = q * 3, v * 3, g * 0.01
    return q, k, v, beta, g, do


def test_a_rank_starting_a_document_ignores_the_state_before():
    from seqpar.kernels.reference import delta_rule_recurrent

    for method in METHODS:
        results = world(2).run(_documents_cut_the_chain, method)
        for rank in range(2):
            q, k, v, beta, g, do = _rank_inputs(rank)
            leaves = [t.clone().requires_grad_() for t in (q, k, v, beta, g)]
            out, _ = delta_rule_recurrent(*leaves, scale=4 ** -0.5)
            out.backward(do)
            for name, got, ref in zip(("out", "dq", "dk", "dv", "dbeta", "dg"), results[rank],
                                      [out.detach()] + [t.grad for t in leaves]):
                torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=f"{method} rank {rank}: {name}")


# -- errors: every rank raises, nobody waits ---------------------------------------------------


def _call_with(kind):
    import torch.distributed as dist

    documents = None
    if kind == "documents_differ":  # each rank was handed other boundaries
        documents = [0, 5, 12] if dist.get_rank() == 0 else [0, 6, 12]
    try:
        layout = seqpar.SeqLayout(12, scheme="zigzag" if kind == "zigzag" else "contiguous", cu_seqlens=documents)
    except ValueError as exc:
        return str(exc)
    n = layout.local_len
    q = k = torch.randn(1, n, 2, 4)
    v = torch.randn(1, n, 2, 3)
    beta = torch.rand(1, n, 2)
    decay = None
    if kind == "beta_shape":
        beta = torch.rand(1, n, 2, 1) if layout.rank == 1 else beta
    elif kind == "beta_type":
        beta = 0.5
    elif kind == "positive":
        decay = torch.full((2,), 0.5 if layout.rank == 1 else -0.5)
    elif kind == "channel":
        decay = -torch.rand(1, n, 2, 4)
    elif kind == "mixed_kind":  # per head on rank 0, per token elsewhere
        decay = torch.zeros(2) if layout.rank == 0 else torch.zeros(1, n, 2)
    elif kind == "triton":  # the triton recurrence runs the fp32 chunk form only
        q, k, v, beta = (t.double() for t in (q, k, v, beta))
    try:
        seqpar.delta_attention(q, k, v, beta, layout=layout, decay=decay, method="allscan",
                               backend="triton" if kind == "triton" else "auto")
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("kind, words", [
    ("zigzag", ["layout", "delta attention", "'contiguous'", "'zigzag'"]),
    ("beta_shape", ["beta", "[1, 6, 2]", "(1, 6, 2, 1)"]),
    ("beta_type", ["beta", "float"]),
    ("positive", ["decay", "<= 0", "0.5"]),
    ("channel", ["decay", "per key channel", "(1, 6, 2, 4)"]),
    ("mixed_kind", ["decay", "rank 0", "rank 1"]),
    ("triton", ["backend", "'triton'", "float64", "backend='torch'"]),
    ("documents_differ", ["cu_seqlens", "rank 0", "rank 1"]),
])
def test_bad_input_raises_on_every_rank(kind, words):
    messages = world(2).run(_call_with, kind, timeout=60)
    for rank, message in enumerate(messages):
        assert message is not None, f"rank {rank} did not raise"
        for word in words:
            assert word in message, f"rank {rank}: {word!r} not in {message!r}"


def _reset_decay():
    layout = seqpar.SeqLayout(8)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.local_len, 1, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    beta = torch.rand(1, layout.local_len, 1, generator=gen, dtype=torch.float64)
    g = torch.zeros(1, layout.local_len, 1, dtype=torch.float64)
    g[0, 1, 0] = float("-inf")  # a full reset on every rank's second token
    g.requires_grad_()
    out = seqpar.delta_attention(q, k, v, beta, layout=layout, decay=g, method="allscan")
    out.sum().backward()
    return bool(torch.isfinite(out).all() and torch.isfinite(g.grad).all())


def test_minus_infinity_decay_resets_instead_of_nan():
    assert all(world(2).run(_reset_decay))


_TRITON_REASON = delta_strategy._triton_unavailable(torch.empty(1, dtype=torch.float32))


@pytest.mark.skipif(_TRITON_REASON is not None, reason=f"triton backend unavailable: {_TRITON_REASON}")
@pytest.mark.parametrize("method", METHODS)
def test_triton_backend_on_every_method(method):
    # under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU);
    # documents, several chunks per rank, a transition of Dv + Dk = 21 columns
    problem = DeltaProblem(world_size=2, seq_len=37, batch=1, heads=2, key_dim=12, value_dim=9, decay="token",
                           dtype="float32", seed=5, documents=(0, 5, 6, 23, 37))
    _check(problem, method=method, backend="triton", chunk_size=8)
