"""The torch chunked linear-attention kernel against the float64 recurrence."""
import pytest
import torch

from seqpar.kernels import linear
from seqpar.kernels.reference import linear_attention_parallel, linear_attention_recurrent


def _inputs(n, decay, dtype=torch.float64, b=2, h=3, dk=5, dv=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, n, h, dk, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, n, h, dv, generator=gen, dtype=torch.float64)
    do = torch.randn(b, n, h, dv, generator=gen, dtype=torch.float64)
    g = None
    if decay == "mild":
        g = -torch.rand(b, n, h, generator=gen, dtype=torch.float64)
    elif decay == "strong":  # exp(-20) per token: states forget at once, nothing may overflow
        g = -20 * torch.rand(b, n, h, generator=gen, dtype=torch.float64)
    elif decay == "channel":  # a gate per key channel (GLA), from none to strong
        g = torch.rand(b, n, h, dk, generator=gen, dtype=torch.float64).clamp_min(1e-3).log()
    elif decay == "channel_strong":
        g = -20 * torch.rand(b, n, h, dk, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, do)], g


def _reference(q, k, v, do, g, scale):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    g = None if g is None else g.detach().double().requires_grad_()
    out, state = linear_attention_recurrent(q, k, v, g, scale=scale)
    out.backward(do.double())
    return out.detach(), state.detach(), q.grad, k.grad, v.grad, None if g is None else g.grad


@pytest.mark.parametrize("decay", [None, "mild", "strong", "channel", "channel_strong"])
@pytest.mark.parametrize("n, chunk", [(1, 64), (7, 3), (16, 16), (37, 8), (50, 64)])
def test_matches_recurrence_float64(n, chunk, decay):
    (q, k, v, do), g = _inputs(n, decay)
    out, state = linear.chunk_forward(q, k, v, g, 0.7, chunk)
    dq, dk, dv, dg = linear.chunk_backward(do, q, k, v, g, 0.7, chunk)
    ref = _reference(q, k, v, do, g, 0.7)
    for name, got, want in zip(("out", "state", "dq", "dk", "dv", "dg"), (out, state, dq, dk, dv, dg), ref):
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == torch.float64, name
        # dg of a single token is exactly 0 (nothing before it to decay): compare absolutely there
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * max(1.0, want.abs().max().item()), msg=name)


def test_inputs_are_not_modified():
    (q, k, v, do), g = _inputs(9, "mild")  # one chunk: views of the inputs are possible
    before = [t.clone() for t in (q, k, v, do, g)]
    linear.chunk_forward(q, k, v, g, 0.5, 64)
    linear.chunk_backward(do, q, k, v, g, 0.5, 64)
    for got, want in zip((q, k, v, do, g), before):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_float32(dtype):
    (q, k, v, do), g = _inputs(70, "mild", dtype)
    out, state = linear.chunk_forward(q, k, v, g.float(), 0.5, 16)
    grads = linear.chunk_backward(do, q, k, v, g.float(), 0.5, 16)
    assert out.dtype == state.dtype == torch.float32 and all(t.dtype == torch.float32 for t in grads)
    ref_out, _, ref_dq, *_ = _reference(q, k, v, do, g, 0.5)
    # the yardstick: the quadratic form computed by plain PyTorch in the same dtype
    dense = linear_attention_parallel(q, k, v, g.to(dtype), scale=0.5)
    floor = torch.finfo(dtype).eps
    dense_err = max((dense.double() - ref_out).abs().max().item() / ref_out.abs().max().item(), floor)
    err = (out.double() - ref_out).abs().max().item() / ref_out.abs().max().item()
    assert err <= 2 * dense_err


def test_long_strongly_decayed_block_stays_finite_in_float32():
    (q, k, v, do), g = _inputs(300, "strong", torch.float32, b=1, h=1)
    out, state = linear.chunk_forward(q, k, v, g.float(), 1.0, 64)
    grads = linear.chunk_backward(do, q, k, v, g.float(), 1.0, 64)
    for t in (out, state) + tuple(grads):
        assert torch.isfinite(t).all()


def test_decay_gradient_under_strong_decay_in_float32():
    # with g = -20 the true dg is ~1e-9 of the pair terms; subtracting the rounded
    # q.dq - k.dk totals (diagonal pairs included) gave errors of order 1 here
    (q, k, v, do), _ = _inputs(40, None, b=1, h=2, dk=8, dv=8)
    g = torch.full((1, 40, 2), -20.0, dtype=torch.float64)
    *_, ref_dg = _reference(q, k, v, do, g, 0.5)
    *_, dg = linear.chunk_backward(do.float(), q.float(), k.float(), v.float(), g.float(), 0.5, 16)
    assert ((dg.double() - ref_dg).abs().max() / ref_dg.abs().max()).item() < 1e-5


def test_per_channel_gate_equal_across_channels_is_the_per_token_decay():
    # a gate that is the same on every key channel is the scalar decay: same outputs, and
    # the per-channel gradient summed over channels is the scalar one
    (q, k, v, do), g = _inputs(37, "mild")
    g4 = g[..., None].expand(*g.shape, q.shape[-1]).contiguous()
    out, state = linear.chunk_forward(q, k, v, g, 0.5, 8)
    out4, state4 = linear.chunk_forward(q, k, v, g4, 0.5, 8)
    torch.testing.assert_close(out4, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state4, state, rtol=1e-12, atol=1e-12)
    *grads, dg = linear.chunk_backward(do, q, k, v, g, 0.5, 8)
    *grads4, dg4 = linear.chunk_backward(do, q, k, v, g4, 0.5, 8)
    assert dg4.shape == g4.shape
    for got, want in zip(grads4, grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dg4.sum(-1), dg, rtol=1e-10, atol=1e-10)


def test_recurrence_restarts_at_document_starts():
    # the oracle itself: with cu_seqlens, each document is the recurrence on it alone
    (q, k, v, _), g = _inputs(9, "channel")
    out, state = linear_attention_recurrent(q, k, v, g, cu_seqlens=[0, 4, 5, 9])
    for a, b in [(0, 4), (4, 5), (5, 9)]:
        alone, last = linear_attention_recurrent(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b])
        torch.testing.assert_close(out[:, a:b], alone, rtol=0, atol=0)
    torch.testing.assert_close(state, last, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_head_decay_gradient_in_float32_does_not_degrade_with_length(seed):
    # A per-head decay's gradient sums dg_s over every token, and dg_s was a suffix sum over
    # the whole block of terms that cancel (each token as a query and as a key): its fp32
    # rounding grew with the length (relative error 3.7e-4, 1.2e-4, 3.9e-4 here before).
    # Taken within each chunk plus <S_end, dS_end> of the chunk, it measured <= 8e-7.
    # Inputs are fp32 values, so the float64 reference is exact for what the kernel sees.
    n, b, h, d = 16384, 1, 4, 8
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(b, n, h, d, generator=gen) for _ in range(4))
    g_head = torch.rand(h, generator=gen).clamp_min(1e-3).log()
    g = g_head.view(1, 1, h).expand(b, n, h)
    *_, ref = linear.chunk_backward(*(t.double() for t in (do, q, k, v, g)), 0.5)
    *_, got = linear.chunk_backward(do, q, k, v, g, 0.5)
    ref, got = ref.sum((0, 1)), got.double().sum((0, 1))
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < 64 * torch.finfo(torch.float32).eps, err  # 7.6e-6
