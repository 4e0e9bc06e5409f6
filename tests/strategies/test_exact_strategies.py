"""Ulysses, USP and all-gather KV against float64 dense attention on real gloo worlds."""
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import seqpar
from seqpar.layout import SCHEMES, SeqLayout
from seqpar.attention import analytic_bytes
from seqpar.testing import AttentionProblem, assert_matches_dense, check_attention, world
from seqpar.testing.strategies import attention_problems

FUNCTIONS = {
    "ulysses": seqpar.ulysses_attention,
    "usp": seqpar.usp_attention,
    "allgather": seqpar.allgather_attention,
}


def _check(problem, strategy, **options):
    report = world(problem.world_size).run(check_attention, problem, FUNCTIONS[strategy], **options)[0]
    assert_matches_dense(problem, report)


@st.composite
def head_split_problems(draw, size_of=lambda p: p):
    """Problems whose heads a Ulysses group of `size_of(P)` ranks can split."""
    problem = draw(attention_problems())
    size = size_of(problem.world_size)
    kv_heads = draw(st.sampled_from(sorted({1, size, 2 * size} | ({size // 2} if size % 2 == 0 else set()))))
    base = max(kv_heads, size)
    heads = base * draw(st.sampled_from([1, 2]))
    return problem.replace(heads=heads, kv_heads=kv_heads)


@pytest.mark.parametrize("scheme", SCHEMES)
@given(problem=head_split_problems())
def test_ulysses_matches_dense_hypothesis(scheme, problem):
    _check(problem.replace(scheme=scheme), "ulysses")


@given(problem=head_split_problems(size_of=lambda p: 2 if p % 2 == 0 else 1))
def test_usp_matches_dense_hypothesis(problem):
    _check(problem, "usp", ulysses_size=2 if problem.world_size % 2 == 0 else 1)


@given(problem=attention_problems(), chunk=st.sampled_from([None, 1, 2]))
def test_allgather_matches_dense_hypothesis(problem, chunk):
    _check(problem, "allgather", kv_head_chunk=chunk)


USP_CASES = [(4, 1), (4, 2), (4, 4), (2, 2), (3, 3)]


@pytest.mark.parametrize("world_size, size", USP_CASES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_usp_every_split_and_scheme(world_size, size, scheme):
    for n, heads, kv_heads, dtype in ((world_size, 2 * size, size, "float64"), (29, 2 * size, 1, "bfloat16")):
        _check(AttentionProblem(world_size, n, batch=2, heads=heads, kv_heads=kv_heads, head_dim=12,
                                causal=True, scheme=scheme, dtype=dtype, seed=n), "usp", ulysses_size=size)


def test_usp_default_size_and_auto_fallback_to_ring():
    # 3 heads cannot split over 2 or 4: the default ulysses_size falls back to 1 (ring)
    _check(AttentionProblem(4, 19, heads=3, kv_heads=1, causal=True, scheme="zigzag"), "usp")
    _check(AttentionProblem(4, 19, heads=4, kv_heads=2, causal=True, scheme="stripe"), "usp")


def _measure(problem, strategy, options):
    layout = SeqLayout(problem.seq_len, scheme=problem.scheme)
    dtype = getattr(torch, problem.dtype)
    q, k, v, do = (layout.shard(t).to(dtype) for t in problem.global_tensors())
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with seqpar.comm.track() as fwd:
        out = FUNCTIONS[strategy](q, k, v, layout=layout, causal=problem.causal, **options)
    with seqpar.comm.track() as bwd:
        out.backward(do)
    expected = analytic_bytes(strategy, layout, problem.batch, problem.heads, problem.kv_heads, problem.head_dim,
                              q.element_size(), causal=problem.causal, **options)
    return expected, {"forward": fwd.bytes_sent(strategy), "backward": bwd.bytes_sent(strategy),
                      "ops": sorted(set(fwd.ops) | set(bwd.ops))}


BYTES_CASES = [
    ("ulysses", 2, 64, 4, 2, "float32", {}),
    ("ulysses", 4, 37, 8, 1, "bfloat16", {}),  # replicated KV heads, uneven
    ("ulysses", 3, 31, 6, 3, "float64", {}),
    ("usp", 4, 45, 4, 2, "float32", {"ulysses_size": 2}),
    ("usp", 4, 40, 8, 1, "bfloat16", {"ulysses_size": 2}),
    ("allgather", 3, 31, 4, 2, "float32", {}),
    ("allgather", 4, 42, 6, 3, "bfloat16", {"kv_head_chunk": 2}),
]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("strategy, world_size, seq_len, heads, kv_heads, dtype, options", BYTES_CASES)
def test_moves_exactly_the_analytic_volume(strategy, world_size, seq_len, heads, kv_heads, dtype, options, scheme):
    problem = AttentionProblem(world_size, seq_len, batch=2, heads=heads, kv_heads=kv_heads, head_dim=8,
                               causal=True, scheme=scheme, dtype=dtype)
    results = world(world_size).run(_measure, problem, strategy, options)
    for rank, (expected, measured) in enumerate(results):
        assert measured["forward"] == expected["forward"], rank
        assert measured["backward"] == expected["backward"], rank
        assert all(op == "check" or op.startswith(strategy + ".") for op in measured["ops"]), measured["ops"]
    # every rank moves something, but under a causal contiguous layout all-gather's last
    # rank, whose keys no other rank's queries see
    quiet = [world_size - 1] if (strategy, scheme) == ("allgather", "contiguous") else []
    assert [r for r, (expected, _) in enumerate(results) if expected["forward"] == 0] == quiet
    assert all(expected["backward"] > 0 for expected, _ in results)


@pytest.mark.parametrize("scheme, window, expected", [
    # rows of each peer's keys each rank's queries see, first to last (N=16, P=2, 8 a rank)
    ("zigzag", (-1, -1), {0: 4, 1: 8}),  # rank 1 sees chunk 0 of rank 0; rank 0 all of rank 1
    ("contiguous", (-1, -1), {0: 8, 1: 0}),  # rank 0's keys go to rank 1, nothing comes back
    ("contiguous", (2, 0), {0: 2, 1: 0}),  # a window of 2 keys back: rank 0's last two rows
])
def test_allgather_sends_only_the_rows_peers_see(scheme, window, expected):
    # hand-counted volumes, not derived from the strategy's own helpers: K and V of
    # B=1, H_kv=2, D=4, fp32 is 64 bytes a row; dK/dV return the rows the rank saw
    for rank in (0, 1):
        layout = SeqLayout.simulated(16, 2, rank=rank, scheme=scheme)
        got = analytic_bytes("allgather", layout, 1, 4, 2, 4, 4, causal=True, window_size=window)
        sent, saw = expected[rank], expected[1 - rank]
        assert got == {"forward": 64 * sent, "backward": 64 * sent + 64 * saw}, (rank, got)


def test_ulysses_textbook_volume_equal_lengths():
    # forward: B (N/P) D (H + 2H_kv) (P-1)/P in, B (N/P) D H (P-1)/P back, i.e. B (N/P) D (2H + 2H_kv) (P-1)/P
    layout = SeqLayout.simulated(64, 4, rank=1)
    batch, heads, kv_heads, head_dim, elem, tokens = 1, 8, 4, 16, 2, 16
    got = analytic_bytes("ulysses", layout, batch, heads, kv_heads, head_dim, elem)
    assert got["forward"] == batch * tokens * head_dim * elem * (2 * heads + 2 * kv_heads) * 3 // 4
    assert got["backward"] == got["forward"]


@pytest.mark.parametrize("strategy, options, heads, kv_heads, match", [
    ("ulysses", {}, 6, 2, "query heads .6. must be divisible by the Ulysses size .4.; strategy='usp'"),
    ("ulysses", {}, 12, 3, "KV heads .3. must divide or be divisible by the Ulysses size .4."),
    ("usp", {"ulysses_size": 3}, 8, 2, "ulysses_size: expected a divisor of the world size 4, got 3"),
    ("usp", {"ulysses_size": 4}, 6, 2, "query heads .6. must be divisible by the Ulysses size .4."),
    ("allgather", {"kv_head_chunk": 0}, 4, 2, "kv_head_chunk: expected a positive int or None, got 0"),
])
def test_strategy_constraints_raise_naming_alternatives(strategy, options, heads, kv_heads, match):
    results = world(4).run(_constrained, strategy, options, heads, kv_heads, return_exceptions=True, timeout=60)
    for exc in results:
        assert isinstance(exc, ValueError), exc
        assert re.search(match, str(exc)), str(exc)


def _constrained(strategy, options, heads, kv_heads):
    layout = SeqLayout(16)
    q = torch.randn(1, 4, heads, 8)
    k = torch.randn(1, 4, kv_heads, 8)
    return FUNCTIONS[strategy](q, k, k, layout=layout, **options)


def test_usp_type_error():
    with pytest.raises(TypeError, match="ulysses_size: expected an int, got float"):
        seqpar.usp_attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), ulysses_size=1.0)


FUNCTIONS["token_ring"] = seqpar.token_ring_attention


@pytest.mark.parametrize("route", ["direct", "ring"])
@given(problem=attention_problems())
def test_token_ring_matches_dense_hypothesis(route, problem):
    _check(problem, "token_ring", route=route)


@pytest.mark.parametrize("route", ["direct", "ring"])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("world_size, seq_len, causal, dtype", [
    (2, 40, True, "float32"), (3, 31, True, "bfloat16"), (4, 37, False, "float64"), (4, 45, True, "float32"),
])
def test_token_ring_bytes_per_direction(route, scheme, world_size, seq_len, causal, dtype):
    problem = AttentionProblem(world_size, seq_len, batch=2, heads=4, kv_heads=2, head_dim=8, causal=causal,
                               scheme=scheme, dtype=dtype)
    for rank, (expected, measured) in enumerate(world(world_size).run(_token_ring_bytes, problem, route)):
        for key, value in measured.items():
            assert value == expected[key], (rank, key, value, expected[key])


def _token_ring_bytes(problem, route):
    layout = SeqLayout(problem.seq_len, scheme=problem.scheme)
    dtype = getattr(torch, problem.dtype)
    q, k, v, do = (layout.shard(t).to(dtype) for t in problem.global_tensors())
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with seqpar.comm.track() as fwd:
        out = seqpar.token_ring_attention(q, k, v, layout=layout, causal=problem.causal, route=route)
    with seqpar.comm.track() as bwd:
        out.backward(do)
    expected = analytic_bytes("token_ring", layout, problem.batch, problem.heads, problem.kv_heads,
                              problem.head_dim, q.element_size(), route=route, causal=problem.causal)
    measured = {
        "forward_outgoing": fwd.bytes_sent("token_ring.forward.outgoing"),
        "forward_returning": fwd.bytes_sent("token_ring.forward.returning"),
        "backward_outgoing": bwd.bytes_sent("token_ring.backward.outgoing"),
        "backward_returning": bwd.bytes_sent("token_ring.backward.returning"),
    }
    return expected, measured


def test_token_ring_causal_contiguous_sends_less_than_ring():
    # rank 0's queries see nothing later: with causal contiguous shards it sends no queries
    layout = SeqLayout.simulated(64, 4, rank=0)
    tr = analytic_bytes("token_ring", layout, 1, 8, 8, 16, 2, route="direct", causal=True)
    rg = analytic_bytes("ring", layout, 1, 8, 8, 16, 2, causal=True)
    assert tr["forward_outgoing"] == 0 and rg["forward"] > 0


def test_token_ring_rejects_unknown_route():
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="route: expected one of .'direct', 'ring'., got 'mesh'"):
        seqpar.token_ring_attention(x, x, x, route="mesh")


def _usp_on_subgroup_then_world():
    import torch.distributed as dist

    first = dist.new_group([0, 1])
    if dist.get_rank() in (0, 1):
        layout = SeqLayout(9, group=first, scheme="stripe")
        q, k = torch.randn(1, layout.local_len, 4, 8), torch.randn(1, layout.local_len, 2, 8)
        seqpar.usp_attention(q, k, k, layout=layout, ulysses_size=2)
    layout = SeqLayout(13, scheme="zigzag")
    q, k = torch.randn(1, layout.local_len, 4, 8), torch.randn(1, layout.local_len, 2, 8)
    seqpar.usp_attention(q, k, k, layout=layout, ulysses_size=2)
    later = dist.new_group([0, 2])  # the user's own groups must still line up afterwards
    if dist.get_rank() in (0, 2):
        t = torch.ones(1)
        dist.all_reduce(t, group=later)
        return t.item()
    return 2.0


def test_usp_creates_no_groups_that_could_desynchronise_the_world():
    # histories that differ between ranks once made torch name the same sub-group differently
    assert world(4).run(_usp_on_subgroup_then_world, timeout=60) == [2.0] * 4
