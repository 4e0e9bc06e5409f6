"""A value head dim of its own (MLA: q/k head dim 192, v head dim 128) on every softmax
strategy and block backend, forward and backward, against float64 dense attention."""
import pytest
import torch

import seqpar
from seqpar.kernels import block
from seqpar.layout import SeqLayout
from seqpar.testing import AttentionProblem, assert_matches_dense, check_attention, world

STRATEGIES = ["ring", "ulysses", "usp", "allgather", "token_ring"]

CASES = [
    # (world, seq_len, scheme, causal, head_dim, value_dim, extra problem fields)
    (2, 13, "zigzag", True, 12, 8, {}),  # MLA-like: v narrower
    (3, 16, "balanced", True, 8, 12, {"documents": (0, 5, 6, 16)}),  # v wider, packed documents
    (4, 18, "stripe", True, 12, 4, {"window": (5, -1), "sinks": True}),
    (2, 12, "contiguous", False, 8, 16, {"softcap": 5.0}),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("p, n, scheme, causal, d, dv, extra", CASES)
@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_every_strategy_serves_a_value_head_dim_of_its_own(strategy, p, n, scheme, causal, d, dv, extra, dtype):
    problem = AttentionProblem(p, n, heads=4 * p, kv_heads=p, head_dim=d, value_dim=dv, causal=causal,
                               scheme=scheme, dtype=dtype, seed=n + dv, **extra)
    report = world(p).run(check_attention, problem, None, strategy=strategy)[0]
    assert_matches_dense(problem, report)


@pytest.mark.parametrize("memory_layout", ["fused_qkv", "head_dim_stride_2", "heads_major"])
@pytest.mark.parametrize("strategy", ["ring", "ulysses", "token_ring"])
def test_value_head_dim_any_memory_layout(strategy, memory_layout):
    problem = AttentionProblem(2, 11, heads=4, kv_heads=2, head_dim=12, value_dim=8, causal=True, scheme="zigzag",
                               dtype="float32", memory_layout=memory_layout, seed=3)
    report = world(2).run(check_attention, problem, None, strategy=strategy)[0]
    assert_matches_dense(problem, report)


@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton"])
@pytest.mark.parametrize("d, dv", [(24, 16), (16, 24)])
@pytest.mark.parametrize("offset", [None, 0, 3, -4])
def test_block_backends_with_a_value_head_dim(backend, d, dv, offset):
    """Backends without a value head dim of their own run padded (block.py): exact."""
    if backend == "triton":
        pytest.importorskip("triton")
        from seqpar.kernels.triton import attention as triton_attention

        if not triton_attention.INTERPRETED and not torch.cuda.is_available():
            pytest.skip("triton runs on cpu only under TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(d + dv)
    q = torch.randn(1, 10, 4, d, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 13, 2, d, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 13, 2, dv, generator=gen, dtype=torch.float64)
    do = torch.randn(1, 10, 4, dv, generator=gen, dtype=torch.float64)
    ref_out, ref_lse = block.torch_forward(q, k, v, 0.3, offset)
    ref_grads = block.torch_backward(do, q, k, v, ref_out, ref_lse, 0.3, offset)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    qf, kf, vf, dof = (t.to(device, torch.float32) for t in (q, k, v, do))
    fwd, bwd = block.kernels(backend, qf, kf)
    out, lse = fwd(qf, kf, vf, 0.3, offset)
    assert out.shape == (1, 10, 4, dv)
    grads = bwd(dof, qf, kf, vf, out.to(qf.dtype), lse, 0.3, offset)
    for got, want in [(out, ref_out), (lse, ref_lse), *zip(grads, ref_grads)]:
        torch.testing.assert_close(got.double().cpu(), want, rtol=2e-5, atol=2e-5)


def _bytes_match(strategy, d, dv):
    from seqpar import comm, registry

    layout = SeqLayout(14, scheme="zigzag")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, layout.local_len, 4, d, generator=gen, requires_grad=True)
    k = torch.randn(1, layout.local_len, 2, d, generator=gen, requires_grad=True)
    v = torch.randn(1, layout.local_len, 2, dv, generator=gen, requires_grad=True)
    with comm.track() as fwd_log:
        out = seqpar.attention(q, k, v, layout=layout, causal=True, strategy=strategy)
    with comm.track() as bwd_log:
        out.sum().backward()
    want = registry.analytic_bytes(strategy, layout, 1, 4, 2, d, 4, value_dim=dv, causal=True)
    return (fwd_log.bytes_sent(f"{strategy}.forward"), bwd_log.bytes_sent(f"{strategy}.backward"), want["forward"],
            want["backward"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bytes_with_a_value_head_dim_equal_the_analytic_volume(strategy):
    for fwd, bwd, want_fwd, want_bwd in world(2).run(_bytes_match, strategy, 12, 4):
        assert (fwd, bwd) == (want_fwd, want_bwd)


def _bad_value_dim():
    layout = SeqLayout(8)
    q = torch.randn(1, layout.local_len, 4, 8)
    v = torch.randn(1, layout.local_len, 3, 6)
    try:
        seqpar.attention(q, q[:, :, :2], v, layout=layout, causal=True)
    except ValueError as exc:
        return str(exc)
    return "returned"


def test_v_with_other_heads_names_the_shape():
    for message in world(2).run(_bad_value_dim, timeout=120):
        assert "v: expected the shape of k (1, 4, 2, 8) up to its head dim (any >= 1), got (1, 4, 3, 6)" in message
