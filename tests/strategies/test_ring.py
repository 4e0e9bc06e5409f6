"""Ring attention against float64 dense attention on real gloo worlds of 1-4 ranks."""
import pytest
import torch
from hypothesis import given

import seqpar
from seqpar.layout import SCHEMES, SeqLayout
from seqpar.strategies import ring
from seqpar.testing import AttentionProblem, assert_matches_dense, check_attention, world
from seqpar.testing.strategies import attention_problems


def _check(problem, **options):
    report = world(problem.world_size).run(check_attention, problem, seqpar.ring_attention, **options)[0]
    assert_matches_dense(problem, report)
    return report


@pytest.mark.parametrize("scheme", SCHEMES)
@given(problem=attention_problems())
def test_ring_matches_dense_hypothesis(scheme, problem):
    _check(problem.replace(scheme=scheme))


# edge cases kept as a table: each was a failure mode of some implementation
EDGE_CASES = {
    "n_equals_p_causal_stripe": AttentionProblem(4, 4, causal=True, scheme="stripe"),
    "n_equals_p_zigzag_has_empty_chunks": AttentionProblem(3, 3, causal=True, scheme="zigzag"),
    "uneven_zigzag_p4": AttentionProblem(4, 29, heads=4, kv_heads=2, causal=True, scheme="zigzag"),
    "uneven_contiguous_p3": AttentionProblem(3, 31, heads=3, kv_heads=1, head_dim=33, causal=True),
    "mqa_stripe_bf16": AttentionProblem(4, 37, heads=8, kv_heads=1, head_dim=16, causal=True, scheme="stripe", dtype="bfloat16"),
    "saturated_logits_fp32": AttentionProblem(2, 24, causal=True, scheme="zigzag", dtype="float32", logit_scale=64.0),
    "saturated_logits_bf16": AttentionProblem(3, 24, causal=False, dtype="bfloat16", logit_scale=64.0),
    "fp16": AttentionProblem(2, 40, heads=4, kv_heads=2, causal=True, scheme="zigzag", dtype="float16"),
    "batch3_gqa3": AttentionProblem(2, 19, batch=3, heads=6, kv_heads=2, head_dim=12, causal=True, scheme="stripe"),
    "single_rank": AttentionProblem(1, 9, heads=4, kv_heads=2, causal=True, dtype="float32"),
    "head_dim_1": AttentionProblem(2, 10, head_dim=1, causal=True, scheme="zigzag"),
}


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_ring_edge_cases(name, backend):
    _check(EDGE_CASES[name], backend=backend)


def test_ring_longer_sequence_each_scheme():
    for scheme in SCHEMES:
        _check(AttentionProblem(2, 700, heads=4, kv_heads=2, head_dim=32, causal=True, scheme=scheme, dtype="float32"))


def _measure_bytes(problem):
    layout = SeqLayout(problem.seq_len, scheme=problem.scheme)
    dtype = getattr(torch, problem.dtype)
    q, k, v, do = (layout.shard(t).to(dtype) for t in problem.global_tensors())
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with seqpar.comm.track() as fwd_stats:
        out = seqpar.ring_attention(q, k, v, layout=layout, causal=problem.causal)
    with seqpar.comm.track() as bwd_stats:
        out.backward(do)
    expected = ring.analytic_bytes(layout, problem.batch, problem.heads, problem.kv_heads, problem.head_dim, q.element_size(),
                                   causal=problem.causal)
    measured = {
        "forward": fwd_stats.bytes_sent("ring.forward"), "backward": bwd_stats.bytes_sent("ring.backward"),
        "forward_received": fwd_stats.bytes_received("ring.forward"),
        "other": set(fwd_stats.ops) - {"ring.forward.kv", "check"},
        "check": fwd_stats.bytes_sent("check"),
    }
    return expected, measured


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("world_size, seq_len, dtype", [(2, 64, "float32"), (3, 31, "bfloat16"), (4, 4, "float64")])
def test_ring_moves_exactly_the_analytic_volume(world_size, seq_len, dtype, scheme, causal):
    problem = AttentionProblem(world_size, seq_len, batch=2, heads=4, kv_heads=2, head_dim=8, causal=causal,
                               scheme=scheme, dtype=dtype)
    results = world(world_size).run(_measure_bytes, problem)
    for rank, (expected, measured) in enumerate(results):
        assert measured["forward"] == expected["forward"], rank
        assert measured["backward"] == expected["backward"], rank
        assert not measured["other"], "only the ring exchange and the agreement check communicate"
        # the per-call agreement: one ring all-reduce of a 16-byte digest
        assert measured["check"] == 2 * (world_size - 1) * 16 // world_size
    assert sum(m["forward_received"] for _, m in results) == sum(m["forward"] for _, m in results) > 0
    # the textbook volume when lengths are equal and every rank sees every other's keys
    # (causal: not always; a causal contiguous layout moves K/V only towards later ranks):
    # 2 B (N/P) H_kv D (P-1) elements forward
    if seq_len % world_size == 0 and not causal:
        elem = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        assert expected["forward"] == 2 * 2 * (seq_len // world_size) * 2 * 8 * (world_size - 1) * elem


def _skipped_blocks(seq_len, scheme):
    """Count block-kernel calls per rank: fully masked blocks must never be computed."""
    from seqpar.kernels.backends import torch_math

    calls = []
    original = torch_math.forward

    def counting(q, k, v, scale, offset):
        calls.append((q.shape[1], k.shape[1], offset))
        return original(q, k, v, scale, offset)

    torch_math.forward = counting
    try:
        layout = SeqLayout(seq_len, scheme=scheme)
        x = torch.randn(1, layout.local_len, 2, 8)
        seqpar.ring_attention(x, x, x, layout=layout, causal=True, backend="torch")
    finally:
        torch_math.forward = original
    return calls


def test_causal_work_skips_masked_blocks_and_balances():
    # contiguous: rank 0 computes only its diagonal; zigzag: every rank computes the same area
    contiguous = world(4).run(_skipped_blocks, 64, "contiguous")
    assert [len(c) for c in contiguous] == [1, 2, 3, 4]
    zigzag = world(4).run(_skipped_blocks, 64, "zigzag")
    areas = [sum(nq * nk for nq, nk, _ in calls) for calls in zigzag]
    assert len(set(areas)) == 1 and all(len(c) == 4 for c in zigzag)
