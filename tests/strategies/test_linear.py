"""Linear attention (LASP-1 ring, LASP-2 all-gather, ZeCO All-Scan) against the float64
recurrence on real gloo worlds: forward, dq, dk, dv and the decay's gradient."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqpar
from seqpar.strategies import linear as linear_strategy
from seqpar.testing import LinearProblem, assert_matches_dense, check_linear_attention, world
from seqpar.testing.strategies import linear_problems

METHODS = ("ring", "allgather", "allscan")


def _check(problem, **options):
    report = world(problem.world_size).run(check_linear_attention, problem, **options)[0]
    assert_matches_dense(problem, report)
    return report


@given(problem=linear_problems(), method=st.sampled_from(METHODS + ("auto",)), pieces=st.sampled_from([None, 1, 2, 5]),
       chunk=st.sampled_from([None, 1, 3, 8]))
def test_matches_recurrence_float64(problem, method, pieces, chunk):
    _check(problem, method=method, scan_pieces=pieces if method in ("allscan", "auto") else None, chunk_size=chunk)


@settings(max_examples=24)
@given(problem=linear_problems(dtypes=("float32", "float16", "bfloat16")), method=st.sampled_from(METHODS))
def test_low_precision_within_dense_error(problem, method):
    _check(problem, method=method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("decay", ["none", "head", "token", "channel"])
def test_every_method_and_decay_on_uneven_world(method, decay):
    # 3 ranks of 11, 10 and 10 tokens; several chunks per rank; strong decays included
    problem = LinearProblem(world_size=3, seq_len=31, batch=2, heads=3, key_dim=5, value_dim=7, decay=decay)
    report = _check(problem, method=method, chunk_size=4, scan_pieces=3 if method == "allscan" else None)
    assert report["err_out"] < 1e-12
    assert ("err_dg" in report) == (decay != "none")


# documents: one starting exactly at rank 1's first token (23 over 4 ranks: 6, 6, 6, 5),
# one of a single token, one across ranks 1 to 3
DOCS_23 = (0, 6, 7, 23)


# -- documents: the state restarts at every document start --------------------------------

# 31 tokens over 3 ranks hold 0-10, 11-20, 21-30
DOCUMENTS_31 = [
    (0, 11, 21, 31),  # every rank starts a document: nothing crosses ranks
    (0, 1, 2, 9, 10, 22, 23, 31),  # one-token documents, starts at a rank's first and last token
    (0, 3, 30, 31),  # one document across all three ranks, a one-token last document
    (0, 31),  # one document: as without documents
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("documents", DOCUMENTS_31)
def test_documents_restart_the_state(method, documents):
    # every decay form on every method: the exact per-document recurrence in float64
    decay = ("none", "head", "token", "channel")[(DOCUMENTS_31.index(documents) + METHODS.index(method)) % 4]
    problem = LinearProblem(world_size=3, seq_len=31, batch=2, heads=2, key_dim=5, value_dim=3, decay=decay,
                            documents=documents, seed=7)
    report = _check(problem, method=method, chunk_size=4, scan_pieces=2 if method == "allscan" else None)
    assert report["err_out"] < 1e-12 and report["err_dq"] < 1e-12 and report["err_dk"] < 1e-12
    assert ("err_dg" in report) == (decay != "none")


def _documents_cut_the_chain(method):
    # every rank starts a document: a rank's outputs and gradients must not depend on any other rank's inputs
    layout = seqpar.SeqLayout(12, cu_seqlens=[0, 6, 12])
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 6, 2, 4, generator=gen, dtype=torch.float64) for _ in range(4))
    g = -torch.rand(1, 6, 2, 4, generator=gen, dtype=torch.float64)
    if layout.rank == 0:  # large, slowly decaying state out of rank 0
        q, k, v, g = q * 3, k * 3, v * 3, g * 0.01
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
    out = seqpar.linear_attention(*leaves[:3], layout=layout, decay=leaves[3], method=method)
    out.backward(do)
    return [out.detach()] + [t.grad for t in leaves]


def _alone(rank):
    """Rank `rank`'s tokens of `_documents_cut_the_chain` from a zero state: out and grads."""
    from seqpar.kernels.reference import linear_attention_recurrent

    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 6, 2, 4, generator=gen, dtype=torch.float64) for _ in range(4))
    g = -torch.rand(1, 6, 2, 4, generator=gen, dtype=torch.float64)
    if rank == 0:
        q, k, v, g = q * 3, k * 3, v * 3, g * 0.01
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
    out, _ = linear_attention_recurrent(*leaves, scale=4 ** -0.5)
    out.backward(do)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("method", METHODS)
def test_a_rank_starting_a_document_ignores_the_state_before(method):
    # each rank equals its tokens alone from a zero state, outputs and gradients: no state
    # came into rank 1, and no gradient went back to rank 0
    results = world(2).run(_documents_cut_the_chain, method)
    for rank in range(2):
        for name, got, ref in zip(("out", "dq", "dk", "dv", "dg"), results[rank], _alone(rank)):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=f"rank {rank}: {name}")


def _measure(method, decay, pieces, documents=None):
    layout = seqpar.SeqLayout(23, cu_seqlens=documents)
    b, h, dk, dv = 2, 3, 5, 7
    gen = torch.Generator().manual_seed(layout.rank)
    q, k = (torch.randn(b, layout.local_len, h, dk, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(b, layout.local_len, h, dv, generator=gen, requires_grad=True)
    g = None
    if decay:
        g = -torch.rand(b, layout.local_len, h, *((dk,) if decay == "channel" else ()), generator=gen)
    with seqpar.comm.track() as fwd:
        out = seqpar.linear_attention(q, k, v, layout=layout, decay=g, method=method, scan_pieces=pieces)
    with seqpar.comm.track() as bwd:
        out.sum().backward()
    expected = linear_strategy.analytic_bytes(layout, b, h, dk, dv, method=method, decay=decay)
    return (fwd.bytes_sent("linear"), bwd.bytes_sent("linear"), expected, fwd.calls("linear"),
            fwd.wait_seconds(f"linear.{method}"))


@pytest.mark.parametrize("method, pieces", [("ring", None), ("allgather", None), ("allscan", 1), ("allscan", 4)])
@pytest.mark.parametrize("decay, documents", [(False, None), (True, None), ("channel", None), (False, DOCS_23),
                                              ("channel", DOCS_23)])
def test_bytes_equal_analytic_volume(method, pieces, decay, documents):
    results = world(4).run(_measure, method, decay, pieces, documents)
    for rank, (fwd, bwd, expected, calls, waited) in enumerate(results):
        assert (fwd, bwd) == (expected["forward"], expected["backward"]), f"rank {rank}"
        assert waited >= 0.0
        if method == "allscan" and rank < 3:
            # each piece is one message (and rank 0 only sends)
            assert calls == (pieces or 1) * (1 if rank == 0 else 2), f"rank {rank}: {calls} calls"
    # only a rank with a predecessor waits for a state in the forward chain
    if method != "allgather":
        assert results[0][4] == 0.0


def test_state_bytes_table():
    layout = seqpar.SeqLayout.simulated(64, 4, 1, "contiguous")
    s = 2 * 3 * 5 * 7 * 4
    assert linear_strategy.analytic_bytes(layout, 2, 3, 5, 7, method="ring", decay=True) == {"forward": s, "backward": s}
    assert linear_strategy.analytic_bytes(layout, 2, 3, 5, 7, method="allgather", decay=True) == {
        "forward": 3 * (s + 2 * 3 * 4), "backward": 3 * s}
    # a gate per key channel: the all-gather moves a [Dk] total decay per (batch, head)
    assert linear_strategy.analytic_bytes(layout, 2, 3, 5, 7, method="allgather", decay="channel") == {
        "forward": 3 * (s + 2 * 3 * 5 * 4), "backward": 3 * s}
    assert linear_strategy.analytic_bytes(layout, 2, 3, 5, 7, method="allscan", decay="channel") == {
        "forward": s, "backward": s}
    assert linear_strategy.default_scan_pieces(2, 1 << 30) == 1
    assert linear_strategy.default_scan_pieces(4, 4 << 20) > 4


def test_auto_picks_by_world_and_state_size():
    assert linear_strategy.choose_method(4, 1 << 10) == "allgather"
    assert linear_strategy.choose_method(64, 1 << 20) == "allscan"


# -- errors: every rank raises, nobody waits ---------------------------------------------------


def _call_with(kind):
    scheme = {"zigzag": "zigzag", "documents_zigzag": "zigzag", "documents_balanced": "balanced"}.get(kind, "contiguous")
    layout = seqpar.SeqLayout(12, scheme=scheme, cu_seqlens=[0, 5, 12] if kind.startswith("documents") else None)
    n = layout.local_len
    q = k = torch.randn(1, n, 2, 4)
    v = torch.randn(1, n, 2, 3)
    decay = None
    if kind == "decay_shape":
        decay = torch.zeros(1, n, 3)
    elif kind == "positive":
        decay = torch.full((2,), 0.5 if layout.rank == 1 else -0.5)
    elif kind == "nan":
        decay = torch.full((2,), float("nan"))
    elif kind == "mixed_kind":  # per head on rank 0, per token elsewhere
        decay = torch.zeros(2) if layout.rank == 0 else torch.zeros(1, n, 2)
    elif kind == "channel_shape":  # one gate too many per head
        decay = torch.zeros(1, n, 2, 5)
    elif kind == "channel_positive":
        decay = torch.full((1, n, 2, 4), -0.5)
        decay[0, -1, 1, 3] = 0.5 if layout.rank == 1 else -0.5
    elif kind == "channel_vs_token":  # per channel on rank 0, per token elsewhere
        decay = torch.zeros(1, n, 2, 4) if layout.rank == 0 else torch.zeros(1, n, 2)
    elif kind == "v_shape":
        v = torch.randn(1, n, 3, 3)
    try:
        seqpar.linear_attention(q, k, v, layout=layout, decay=decay, method="allscan")
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("kind, words", [
    ("zigzag", ["layout", "contiguous", "zigzag"]),
    ("decay_shape", ["decay", "[2]", "(1, 6, 3)"]),
    ("positive", ["decay", "<= 0", "0.5"]),
    ("nan", ["decay", "<= 0", "nan"]),
    ("mixed_kind", ["decay", "rank 0", "rank 1"]),
    ("v_shape", ["v", "heads", "(1, 6, 3, 3)"]),
    ("channel_shape", ["decay", "[1, 6, 2, 4]", "(1, 6, 2, 5)"]),
    ("channel_positive", ["decay", "<= 0", "0.5"]),
    ("channel_vs_token", ["decay", "rank 0", "rank 1"]),
    ("documents_zigzag", ["layout", "'contiguous'", "'zigzag'", "2 documents"]),
    ("documents_balanced", ["layout", "'contiguous'", "'balanced'", "2 documents"]),
])
def test_bad_input_raises_on_every_rank(kind, words):
    messages = world(2).run(_call_with, kind, timeout=60)
    for rank, message in enumerate(messages):
        assert message is not None, f"rank {rank} did not raise"
        for word in words:
            assert word in message, f"rank {rank}: {word!r} not in {message!r}"


def test_bad_method_and_options_name_the_argument():
    q = torch.randn(1, 4, 1, 2)
    with pytest.raises(ValueError, match="method.*'lasp'"):
        seqpar.linear_attention(q, q, q, method="lasp")
    with pytest.raises(ValueError, match="scan_pieces: expected a positive int, got 0"):
        seqpar.linear_attention(q, q, q, scan_pieces=0)
    with pytest.raises(ValueError, match=r"options.*\['pieces'\]"):
        seqpar.linear_attention(q, q, q, pieces=2)
    with pytest.raises(TypeError, match="decay: expected None or a torch.Tensor"):
        seqpar.linear_attention(q, q, q, decay=-0.5)
    with pytest.raises(ValueError, match="backend"):
        seqpar.linear_attention(q, q, q, backend="sdpa")


_TRITON_REASON = linear_strategy._triton_unavailable(torch.empty(1, dtype=torch.float32))


@pytest.mark.skipif(_TRITON_REASON is not None, reason=f"triton backend unavailable: {_TRITON_REASON}")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("decay", ["none", "token"])
def test_triton_backend_on_every_method(method, decay):
    # under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)
    problem = LinearProblem(world_size=2, seq_len=37, batch=1, heads=2, key_dim=12, value_dim=20, decay=decay,
                            dtype="float32", seed=3)
    _check(problem, method=method, backend="triton")


@pytest.mark.skipif(_TRITON_REASON is not None, reason=f"triton backend unavailable: {_TRITON_REASON}")
def test_triton_backend_with_documents():
    # the triton chunk kernels run on each document piece of a rank
    problem = LinearProblem(world_size=2, seq_len=37, batch=1, heads=2, key_dim=12, value_dim=20, decay="token",
                            dtype="float32", seed=5, documents=(0, 5, 6, 19, 37))
    _check(problem, method="allgather", backend="triton")


@pytest.mark.skipif(_TRITON_REASON is not None, reason=f"triton backend unavailable: {_TRITON_REASON}")
def test_triton_backend_refuses_per_channel_gates():
    q = torch.randn(1, 4, 2, 3)
    g = -torch.rand(1, 4, 2, 3)
    with pytest.raises(ValueError, match=r"backend: backend 'triton' takes decay None, \[H\] or \[B, n, H\].*"
                                         r"per-channel.*\(1, 4, 2, 3\).*backend='torch'"):
        seqpar.linear_attention(q, q, q, decay=g, backend="triton")
    # a per-token decay is still the triton kernels' when asked for
    assert linear_strategy._resolve_backend("triton", q, g[..., 0]) == "triton"


def test_triton_backend_refuses_float64_by_name():
    q = torch.randn(1, 4, 1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend: .*float64"):
        seqpar.linear_attention(q, q, q, backend="triton")


def _ring_messages(method):
    # a state big enough that the All-Scan's default cuts it (P=3, 256 KiB)
    layout = seqpar.SeqLayout(6)
    q = torch.randn(1, 2, 16, 64)
    with seqpar.comm.track() as stats:
        seqpar.linear_attention(q, q, q, layout=layout, method=method)
    return stats.calls("linear")


def test_ring_sends_whole_states_and_allscan_pieces():
    ring, allscan = world(3).run(_ring_messages, "ring"), world(3).run(_ring_messages, "allscan")
    assert ring[1] == 2  # LASP-1: one whole state in, one out
    assert allscan[1] > 2


def _reset_decay():
    layout = seqpar.SeqLayout(8)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.local_len, 1, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    g = torch.zeros(1, layout.local_len, 1, dtype=torch.float64)
    g[0, 1, 0] = float("-inf")  # a full reset on every rank's second token
    out = seqpar.linear_attention(q, k, v, layout=layout, decay=g, method="allscan")
    return bool(torch.isfinite(out).all())


def test_minus_infinity_decay_resets_instead_of_nan():
    assert all(world(2).run(_reset_decay))


def test_scan_pieces_only_for_allscan():
    q = torch.randn(1, 4, 1, 2)
    with pytest.raises(ValueError, match="scan_pieces: only method='allscan'"):
        seqpar.linear_attention(q, q, q, method="ring", scan_pieces=4)
