import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from seqpar.kernels import block
from seqpar.kernels.reference import dense_attention

CPU_BACKENDS = ["torch", "sdpa"]


def _reference(q, k, v, scale, offset):
    """Dense attention with the block's mask expressed as global positions."""
    kp = torch.arange(k.shape[1])
    if offset is None:
        return dense_attention(q, k, v, softmax_scale=scale, return_lse=True)
    qp = torch.arange(q.shape[1]) + offset
    return dense_attention(q, k, v, causal=True, softmax_scale=scale, q_positions=qp, k_positions=kp, return_lse=True)


def _problem(nq, nk, heads, kv_heads, head_dim, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, nq, heads, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(2, nk, kv_heads, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(2, nk, kv_heads, head_dim, generator=gen, dtype=torch.float64)
    do = torch.randn(2, nq, heads, head_dim, generator=gen, dtype=torch.float64)
    return q, k, v, do


@st.composite
def blocks(draw):
    nq, nk = draw(st.integers(1, 17)), draw(st.integers(1, 17))
    offset = draw(st.one_of(st.none(), st.integers(-nq - 2, nk + 2)))
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([1, 5, 8, 24, 33]))
    return nq, nk, offset, heads, kv_heads, head_dim, draw(st.integers(0, 10_000))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(case=blocks())
def test_block_forward_backward_match_dense_float64(backend, case):
    nq, nk, offset, heads, kv_heads, head_dim, seed = case
    q, k, v, do = _problem(nq, nk, heads, kv_heads, head_dim, seed)
    scale = 0.7
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = _reference(qr, kr, vr, scale, offset)
    ref_grads = torch.autograd.grad(ref_out, (qr, kr, vr), do)
    fwd, bwd = block.kernels(backend, q, k)
    out, lse = fwd(q, k, v, scale, offset)
    assert out.shape == q.shape and lse.shape == (2, heads, nq)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(out.double(), ref_out.detach(), rtol=1e-10, atol=1e-10)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse.detach()[finite], rtol=1e-10, atol=1e-10)
    grads = bwd(do, q, k, v, ref_out.detach(), ref_lse.detach(), scale, offset)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [None, 0, -3, 4])
def test_block_low_precision_close_to_dense(backend, dtype, offset):
    q, k, v, do = _problem(40, 33, 4, 2, 16, seed=1)
    ref_out, ref_lse = _reference(q, k, v, 0.25, offset)
    fwd, _ = block.kernels(backend, q.to(dtype), k.to(dtype))
    out, lse = fwd(q.to(dtype), k.to(dtype), v.to(dtype), 0.25, offset)
    assert lse.dtype == torch.float32
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    assert (out.double() - ref_out).abs().max() < tol
    finite = torch.isfinite(ref_lse)
    assert (lse[finite].double() - ref_lse[finite]).abs().max() < tol


@given(st.integers(0, 20), st.integers(0, 20), st.one_of(st.none(), st.integers(-25, 25)))
def test_square_pieces_cover_exactly_the_visible_keys(nq, nk, offset):
    covered = torch.zeros(nq, nk, dtype=torch.int64)
    for q0, q1, k0, k1, causal in block.square_pieces(nq, nk, offset):
        assert q1 > q0 and k1 > k0
        if causal:
            assert q1 - q0 == k1 - k0
            covered[q0:q1, k0:k1] += torch.tril(torch.ones(q1 - q0, k1 - k0, dtype=torch.int64))
        else:
            covered[q0:q1, k0:k1] += 1
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    visible = torch.ones(nq, nk, dtype=torch.bool) if offset is None else j <= i + offset
    assert torch.equal(covered, visible.to(torch.int64))
    assert len(block.square_pieces(nq, nk, offset)) <= 3


def test_gqa_does_not_repeat_kv(monkeypatch):
    # the torch backend must contract over head groups, never materialise K per query head
    calls = []
    original = torch.Tensor.repeat_interleave
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", lambda *a, **k: calls.append(1) or original(*a, **k))
    q, k, v, do = _problem(6, 6, 8, 2, 8, seed=0)
    for backend in CPU_BACKENDS:
        fwd, bwd = block.kernels(backend, q, k)
        out, lse = fwd(q, k, v, 0.3, 0)
        bwd(do, q, k, v, out, lse, 0.3, 0)
    assert not calls


def test_resolve_backend():
    assert block.resolve_backend("auto", torch.device("cpu"), torch.float32, 64) == "sdpa"
    assert block.resolve_backend("torch", torch.device("cpu"), torch.float64, 64) == "torch"
    with pytest.raises(ValueError, match="backend.*flash_attn"):
        block.resolve_backend("flash_attn", torch.device("cpu"), torch.float16, 64)
    with pytest.raises(ValueError, match="backend: expected one of"):
        block.resolve_backend("cudnn", torch.device("cpu"), torch.float16, 64)
    with pytest.raises(ValueError, match="backend: triton takes float16, bfloat16 or float32, got torch.float64"):
        block.resolve_backend("triton", torch.device("cpu"), torch.float64, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flash_attn"])
@pytest.mark.parametrize("offset", [None, 0, -1, 7])
def test_gpu_backends_match_torch_math(backend, offset):
    device = torch.device("cuda")
    reason = block.unavailable_reason(backend, device, torch.bfloat16, 64)
    if reason:
        pytest.skip(reason)
    q, k, v, do = (t.to(device=device, dtype=torch.bfloat16) for t in _problem(300, 257, 8, 2, 64, seed=2))
    fwd, bwd = block.kernels(backend, q, k)
    out, lse = fwd(q, k, v, 0.125, offset)
    ref_out, ref_lse = block.torch_forward(q, k, v, 0.125, offset)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    grads = bwd(do, q, k, v, ref_out.to(q.dtype), ref_lse, 0.125, offset)
    ref_grads = block.torch_backward(do, q, k, v, ref_out.to(q.dtype), ref_lse, 0.125, offset)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


def test_cuda_backend_without_the_extension_names_it():
    with pytest.raises(ValueError, match="backend: cuda needs"):
        block.resolve_backend("cuda", torch.device("cpu"), torch.float16, 64)
