"""The custom ops of seqpar/kernels/block.py: torch.library.opcheck (schema, fake, autograd
registration, AOT dispatch), the fake contract against real outputs, gradients of
block_forward (out and lse) by gradcheck, and the strategies' kernels going through them."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from seqpar.kernels import block
from seqpar.kernels import block as ops


def _block(gen, dtype, nq=7, nk=9, heads=4, kv_heads=2, d=8):
    q = torch.randn(2, nq, heads, d, generator=gen).to(dtype)
    k, v = (torch.randn(2, nk, kv_heads, d, generator=gen).to(dtype) for _ in range(2))
    return q, k, v


# each case a different backend, dtype, mask and GQA ratio; opcheck costs ~2 s a case here
FORWARD_CASES = [("torch", torch.float64, 3, 2), ("sdpa", torch.float32, -2, 4), ("sdpa", torch.bfloat16, None, 1)]


@pytest.mark.parametrize("backend, dtype, offset, kv_heads", FORWARD_CASES)
def test_opcheck_block_forward(backend, dtype, offset, kv_heads):
    q, k, v = _block(torch.Generator().manual_seed(0), dtype, kv_heads=kv_heads)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.seqpar.block_forward.default, (q, k, v, 0.3, offset, backend))


@pytest.mark.parametrize("backend, dtype, offset", [("torch", torch.float64, 0), ("sdpa", torch.bfloat16, 3)])
def test_opcheck_block_backward(backend, dtype, offset):
    gen = torch.Generator().manual_seed(1)
    q, k, v = _block(gen, dtype)
    out, lse = block.torch_forward(q, k, v, 0.3, offset)
    do = torch.randn(q.shape, generator=gen).to(dtype)
    torch.library.opcheck(torch.ops.seqpar.block_backward.default, (do, q, k, v, out.to(dtype), lse, 0.3, offset, backend))


def test_opcheck_merge_on_views_of_a_heads_major_accumulator():
    gen = torch.Generator().manual_seed(2)
    acc = torch.randn(2, 3, 9, 4, generator=gen).transpose(1, 2)
    acc_lse = torch.randn(2, 3, 9, generator=gen, dtype=torch.float64)
    part, part_lse = torch.randn(2, 5, 3, 4, generator=gen).bfloat16(), torch.randn(2, 3, 5, generator=gen)
    torch.library.opcheck(torch.ops.seqpar.merge_.default, (acc[:, 2:7], acc_lse[:, :, 2:7], part, part_lse))


@pytest.mark.parametrize("backend, dtype, offset", [("torch", torch.float64, 2), ("sdpa", torch.float32, None),
                                                    ("sdpa", torch.bfloat16, -1), ("sdpa", torch.float32, 4)])
def test_fake_promises_what_the_real_op_returns(backend, dtype, offset):
    gen = torch.Generator().manual_seed(3)
    q, k, v = _block(gen, dtype, kv_heads=4 if offset is None else 2)
    real = ops.block_forward(q, k, v, 0.3, offset, backend)
    do = torch.randn(q.shape, generator=gen).to(dtype)
    real_bwd = ops.block_backward(do, q, k, v, real[0].to(dtype), real[1], 0.3, offset, backend)
    with FakeTensorMode() as mode:
        fq, fk, fv, fdo = (mode.from_tensor(t) for t in (q, k, v, do))
        fake = ops.block_forward(fq, fk, fv, 0.3, offset, backend)
        fake_bwd = ops.block_backward(fdo, fq, fk, fv, fake[0].to(dtype), fake[1], 0.3, offset, backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for r, f in zip(real + real_bwd, fake + fake_bwd):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())
        assert r.dtype == acc
    assert real[1].shape == (2, 4, 7)
    assert real[0].is_contiguous()


@pytest.mark.parametrize("offset", [None, 1, -1])
def test_block_forward_gradients_of_out_and_lse(offset):
    # offset -1: query row 0 sees no key (lse = -inf, zero gradient by convention)
    gen = torch.Generator().manual_seed(4)
    q, k, v = _block(gen, torch.float64, nq=4, nk=5, heads=2, kv_heads=1, d=3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        out, lse = torch.ops.seqpar.block_forward(q, k, v, 0.7, offset, "torch")
        return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: f(q, k, v)[1], (q, k, v))


def test_block_forward_lse_gradient_through_sdpa_matches_torch():
    gen = torch.Generator().manual_seed(5)
    q, k, v = _block(gen, torch.float32)
    g = torch.randn(2, 4, 7, generator=gen)
    grads = []
    for backend in ("torch", "sdpa"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = torch.ops.seqpar.block_forward(*leaves, 0.3, 2, backend)
        ((out.sum(-1) ** 2).sum() + (lse * g).sum()).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_strategy_kernels_are_the_custom_ops():
    gen = torch.Generator().manual_seed(6)
    q, k, v = _block(gen, torch.float32)
    fwd, bwd = block.kernels("sdpa", q, k)
    with _Ops() as seen:
        out, lse = fwd(q, k, v, 0.3, 1)
        bwd(q, q, k, v, out.to(q.dtype), lse, 0.3, 1)
    assert seen.names[0] == "seqpar.block_forward.default"
    assert "seqpar.block_backward.default" in seen.names
    want = block.sdpa_forward(q, k, v, 0.3, 1)
    torch.testing.assert_close(out, want[0], rtol=0, atol=0)
    torch.testing.assert_close(lse, want[1], rtol=0, atol=0)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match=r"backend: expected a concrete block backend .*, got 'auto'"):
        ops.block_fns("auto")
