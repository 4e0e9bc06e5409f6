"""The delta-rule chunk kernel (`seqpar.kernels.delta`) against the token-by-token recurrence."""
import pytest
import torch

from seqpar.kernels.delta import chunk_forward
from seqpar.kernels.reference import delta_rule_recurrent


def _inputs(n=37, b=2, h=3, dk=5, dv=7, seed=0, dtype=torch.float64, strength=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, dk, generator=gen, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(b, n, h, dk, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(b, n, h, dv, generator=gen, dtype=torch.float64)
    beta = torch.rand(b, n, h, generator=gen, dtype=torch.float64)
    g = torch.rand(b, n, h, generator=gen, dtype=torch.float64).clamp_min(1e-3).log() * strength
    s0 = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, beta, g, s0)]


@pytest.mark.parametrize("chunk", [1, 4, 8, 64])
@pytest.mark.parametrize("decay", [False, True])
def test_chunks_match_the_recurrence_from_a_state(chunk, decay):
    q, k, v, beta, g, s0 = _inputs()
    g = g if decay else None
    out, state = chunk_forward(q, k, v, beta, g, 0.5, chunk, initial=s0)
    ref_out, ref_state = delta_rule_recurrent(q, k, v, beta, g, scale=0.5, initial_state=s0)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-13)
    torch.testing.assert_close(state, ref_state, rtol=0, atol=1e-13)


@pytest.mark.parametrize("chunk", [3, 16])
def test_affine_summary_from_one_pass(chunk):
    # [S | X] from [0 | I]: the block from zero, and the map of any incoming state
    q, k, v, beta, g, s0 = _inputs(n=29)
    out, s_loc, q_eff, a = chunk_forward(q, k, v, beta, g, 0.5, chunk, transition=True)
    ref_out, ref_state = delta_rule_recurrent(q, k, v, beta, g, scale=0.5, initial_state=s0)
    torch.testing.assert_close(out + torch.einsum("bnhk,bhkv->bnhv", q_eff, s0), ref_out, rtol=0, atol=1e-13)
    torch.testing.assert_close(a @ s0 + s_loc, ref_state, rtol=0, atol=1e-13)
    # the map is the product of the token transitions exp(g_t)(I - beta_t k_t^T k_t)
    eye = torch.eye(5, dtype=torch.float64)
    prod = eye.expand(2, 3, 5, 5).clone()
    for t in range(29):
        kt = k[:, t]
        step = g[:, t].exp()[..., None, None] * (eye - beta[:, t, :, None, None] * kt[..., :, None] * kt[..., None, :])
        prod = step @ prod
    torch.testing.assert_close(a, prod, rtol=0, atol=1e-13)


def test_gradients_match_the_recurrence():
    q, k, v, beta, g, s0 = _inputs(n=23)
    do = torch.randn(2, 23, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (lambda *a: chunk_forward(*a, 0.5, 4, initial=s0)[0],
               lambda *a: delta_rule_recurrent(*a, scale=0.5, initial_state=s0)[0]):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, beta, g)]
        fn(*leaves).backward(do)
        grads.append([t.grad for t in leaves])
    for name, got, ref in zip(("dq", "dk", "dv", "dbeta", "dg"), *grads):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12, msg=name)


def test_strong_decay_stays_finite():
    # g = -60 on every token (the floor): every factor exp(<= 0), nothing overflows
    q, k, v, beta, g, _ = _inputs(n=40, dtype=torch.float32)
    g = torch.full_like(g, -60.0).requires_grad_()
    out, state = chunk_forward(q, k, v, beta, g, 0.5, 16)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(state).all() and torch.isfinite(g.grad).all()
    # each token forgets everything before it: o_t = scale q_t beta_t k_t^T v_t
    ref = 0.5 * (q * k).sum(-1, keepdim=True) * beta[..., None] * v
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_strided_inputs_give_the_same_result():
    q, k, v, beta, g, _ = _inputs(n=19)
    base = chunk_forward(q, k, v, beta, g, 0.5, 8)[0]
    wide = torch.randn(2, 19, 3, 10, dtype=torch.float64)
    wide[..., ::2] = q
    heads_major = k.transpose(1, 2).contiguous().transpose(1, 2)
    out = chunk_forward(wide[..., ::2], heads_major, v, beta.transpose(0, 1).contiguous().transpose(0, 1), g, 0.5, 8)[0]
    torch.testing.assert_close(out, base, rtol=0, atol=0)


def _triton_reason():
    from seqpar.strategies.delta import _triton_unavailable

    return _triton_unavailable(torch.empty(1, dtype=torch.float32))


@pytest.mark.skipif(_triton_reason() is not None, reason=f"triton unavailable: {_triton_reason()}")
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("chunk, dk, dv", [(4, 5, 7), (16, 20, 70)])
def test_triton_recurrence_matches_torch(decay, chunk, dk, dv):
    # fp32, forward and every gradient; dv = 70 spans two column tiles (their shares summed)
    q, k, v, beta, g, s0 = _inputs(n=37, dk=dk, dv=dv, dtype=torch.float32)
    do = torch.randn(2, 37, 3, dv, generator=torch.Generator().manual_seed(1))
    results = []
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, beta, g, s0)]
        out, state = chunk_forward(*leaves[:4], leaves[4] if decay else None, 0.5, chunk, initial=leaves[5],
                                   backend=backend)
        ((out * do).sum() + (state * 0.5).sum()).backward()
        results.append([out.detach(), state.detach()] + [t.grad for t in leaves])
    for name, got, ref in zip(("out", "state", "dq", "dk", "dv", "dbeta", "dg", "ds0"), results[1], results[0]):
        if name == "dg" and not decay:
            assert got is None and ref is None
            continue
        # fp32 sums in another order: a few ulps of the largest value (measured 2-3e-7)
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, (name, err)


_COMPILE_SCRIPT = """
from seqpar.kernels.triton import delta as D

def arg_type(name):
    return "*fp32" if name.endswith("_ptr") else "i32"

# Dk = 128 in one tile, C = 64, 64 state columns: the largest tiles the host wrapper makes
for use_gamma in (True, False):
    c = dict(USE_GAMMA=use_gamma, BT=64, BK=128, BV=64)
    build(D._forward_kernel, c, arg_type)
    build(D._backward_kernel, c, arg_type)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests compile and run the kernels")
def test_triton_kernels_compile_for_sm90():
    from triton_compile import compile_for_sm90

    compile_for_sm90(_COMPILE_SCRIPT)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_triton_recurrence_at_model_sizes(dtype):
    # Dk = Dv = 128, chunks of 64, bf16 inputs (the chunk form is fp32 either way)
    gen = torch.Generator().manual_seed(0)
    b, n, h, d = 2, 1000, 4, 128
    q = torch.randn(b, n, h, d, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(b, n, h, d, generator=gen), dim=-1)
    v, do = (torch.randn(b, n, h, d, generator=gen) for _ in range(2))
    beta = torch.rand(b, n, h, generator=gen)
    g = torch.rand(b, n, h, generator=gen) * -0.1
    results = []
    for backend in ("torch", "triton"):
        leaves = [t.to("cuda", dtype).requires_grad_() for t in (q, k, v, beta, g)]
        out, _ = chunk_forward(*leaves, d ** -0.5, 64, backend=backend)
        out.backward(do.to("cuda"))
        results.append([out.detach()] + [t.grad.float() for t in leaves])
    for name, got, ref in zip(("out", "dq", "dk", "dv", "dbeta", "dg"), results[1], results[0]):
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        # bf16 gradients: the two fp32 results may round to neighbouring bf16 values
        assert err < (1e-4 if dtype == torch.float32 else 1e-2), (name, err)


def test_strong_then_weak_decays_keep_float32_accuracy():
    # each 64-token chunk: 40 tokens at the floor (-60), then 24 almost undecayed: |G| reaches
    # 2400, and fp32 differences of such sums lost 1.4e-4 of the output; fp64 sums: ~2e-7
    from seqpar.kernels import linear

    gen = torch.Generator().manual_seed(0)
    n, b, h, d = 128, 1, 2, 16
    q, v = (torch.randn(b, n, h, d, generator=gen, dtype=torch.float64) for _ in range(2))
    k = torch.nn.functional.normalize(torch.randn(b, n, h, d, generator=gen, dtype=torch.float64), dim=-1)
    beta = torch.rand(b, n, h, generator=gen, dtype=torch.float64)
    g = torch.full((b, n, h), -1e-3, dtype=torch.float64)
    g.view(b, 2, 64, h)[:, :, :40] = -60.0
    for name, fn, args in (("delta", chunk_forward, (q, k, v, beta, g)), ("linear", linear.chunk_forward, (q, k, v, g))):
        ref = fn(*args, 0.25, 64)[0]
        got = fn(*(t.float() for t in args), 0.25, 64)[0]
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 2e-6, (name, err)
