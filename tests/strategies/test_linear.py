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
@pytest.mark.parametrize("decay", ["none", "head", "token"])
def test_every_method_and_decay_on_uneven_world(method, decay):
    # 3 ranks of 11, 10 and 10 tokens; several chunks per rank; strong decays included
    problem = LinearProblem(world_size=3, seq_len=31, batch=2, heads=3, key_dim=5, value_dim=7, decay=decay)
    report = _check(problem, method=method, chunk_size=4, scan_pieces=3 if method == "allscan" else None)
    assert report["err_out"] < 1e-12
    assert ("err_dg" in report) == (decay != "none")


def _measure(method, decay, pieces):
    layout = seqpar.SeqLayout(23)
    b, h, dk, dv = 2, 3, 5, 7
    gen = torch.Generator().manual_seed(layout.rank)
    q, k = (torch.randn(b, layout.local_len, h, dk, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(b, layout.local_len, h, dv, generator=gen, requires_grad=True)
    g = -torch.rand(b, layout.local_len, h, generator=gen) if decay else None
    with seqpar.comm.track() as fwd:
        out = seqpar.linear_attention(q, k, v, layout=layout, decay=g, method=method, scan_pieces=pieces)
    with seqpar.comm.track() as bwd:
        out.sum().backward()
    expected = linear_strategy.analytic_bytes(layout, b, h, dk, dv, method=method, decay=decay)
    return (fwd.bytes_sent("linear"), bwd.bytes_sent("linear"), expected, fwd.calls("linear"),
            fwd.wait_seconds(f"linear.{method}"))


@pytest.mark.parametrize("method, pieces", [("ring", None), ("allgather", None), ("allscan", 1), ("allscan", 4)])
@pytest.mark.parametrize("decay", [False, True])
def test_bytes_equal_analytic_volume(method, pieces, decay):
    results = world(4).run(_measure, method, decay, pieces)
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
    assert linear_strategy.default_scan_pieces(2, 1 << 30) == 1
    assert linear_strategy.default_scan_pieces(4, 4 << 20) > 4


def test_auto_picks_by_world_and_state_size():
    assert linear_strategy.choose_method(4, 1 << 10) == "allgather"
    assert linear_strategy.choose_method(64, 1 << 20) == "allscan"


# -- errors: every rank raises, nobody waits ---------------------------------------------------


def _call_with(kind):
    layout = seqpar.SeqLayout(12, scheme="zigzag" if kind == "zigzag" else "contiguous")
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
