"""seqpar.kernels.cuda_ext: the references against an independent recurrence, the torch
fallback of every wrapper, argument errors, availability; and (marked gpu, skipped
without a CUDA device and the built extension) the compiled kernels against the references."""
import pytest
import torch

from seqpar.kernels import block, cuda_ext
from seqpar.kernels.backends import cuda as cuda_backend
from seqpar.kernels.merge import merge_ as merge_reference_


def _final_state(k, v, g):
    """Token-by-token recurrence S_t = exp(g_t) S_{t-1} + k_t^T v_t from zero.
    k [B, n, H, Dk], v [B, n, H, Dv], g [B, n, H] -> [B, H, Dk, Dv]."""
    b, n, h, dk = k.shape
    s = torch.zeros(b, h, dk, v.shape[-1], dtype=k.dtype)
    for t in range(n):
        s = torch.exp(g[:, t])[..., None, None] * s + k[:, t, :, :, None] * v[:, t, :, None, :]
    return s


def _chunks(gen, lengths, b=2, h=3, dk=4, dv=5):
    k = torch.randn(b, sum(lengths), h, dk, generator=gen, dtype=torch.float64)
    v = torch.randn(b, sum(lengths), h, dv, generator=gen, dtype=torch.float64)
    g = -torch.rand(b, sum(lengths), h, generator=gen, dtype=torch.float64)
    bounds = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    local = [_final_state(k[:, a:e], v[:, a:e], g[:, a:e]) for a, e in zip(bounds, bounds[1:])]
    decay = [g[:, a:e].sum(1) for a, e in zip(bounds, bounds[1:])]
    prefix = [_final_state(k[:, :e], v[:, :e], g[:, :e]) for e in bounds[1:]]
    return local, decay, prefix


def test_combine_of_two_chunks_is_the_state_of_their_concatenation():
    gen = torch.Generator().manual_seed(0)
    (s_a, s_b), (_, g_b), (_, s_ab) = _chunks(gen, [5, 7])
    torch.testing.assert_close(cuda_ext.state_combine_reference(s_a, s_b, g_b), s_ab, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cuda_ext.state_combine(s_a, s_b, g_b), s_ab, rtol=1e-12, atol=1e-12)


def test_scan_gives_the_state_after_every_chunk():
    gen = torch.Generator().manual_seed(1)
    local, decay, prefix = _chunks(gen, [3, 1, 4, 2])
    got = cuda_ext.state_scan(torch.stack(local), torch.stack(decay))
    torch.testing.assert_close(got, torch.stack(prefix), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cuda_ext.state_scan_reference(torch.stack(local), torch.stack(decay)), got,
                               rtol=0, atol=0)


def test_state_combine_rows_touches_only_its_rows_and_sub_blocks_compose():
    gen = torch.Generator().manual_seed(2)
    s_in, s_local = torch.randn(2, 3, 8, 4, generator=gen), torch.randn(2, 3, 8, 4, generator=gen)
    g = -torch.rand(2, 3, generator=gen)
    want = cuda_ext.state_combine_reference(s_in, s_local, g)
    out = torch.full_like(s_in, float("nan"))
    cuda_ext.state_combine_rows_(out, s_in, s_local, g, 2, 5)
    torch.testing.assert_close(out[:, :, 2:5], want[:, :, 2:5])
    assert torch.isnan(out[:, :, :2]).all() and torch.isnan(out[:, :, 5:]).all()
    # ZeCO's sub-blocks: every row range in turn, into s_in itself
    for r0 in range(0, 8, 3):
        cuda_ext.state_combine_rows_(s_in, s_in, s_local, g, r0, min(8, r0 + 3))
    torch.testing.assert_close(s_in, want)
    # a sub-block as views
    view_out = cuda_ext.state_combine(want[:, :, 1:4], s_local[:, :, 1:4], g)
    torch.testing.assert_close(view_out, cuda_ext.state_combine_reference(want[:, :, 1:4], s_local[:, :, 1:4], g))


def test_state_scan_in_place():
    gen = torch.Generator().manual_seed(3)
    states, g = torch.randn(3, 1, 2, 3, 3, generator=gen), -torch.rand(3, 1, 2, generator=gen)
    want = cuda_ext.state_scan_reference(states, g)
    assert cuda_ext.state_scan(states, g, out=states) is states
    torch.testing.assert_close(states, want)


def test_merge_wrapper_falls_back_to_merge_py():
    gen = torch.Generator().manual_seed(4)
    out, lse = torch.randn(1, 4, 2, 3, generator=gen), torch.randn(1, 2, 4, generator=gen, dtype=torch.float64)
    part, part_lse = torch.randn(1, 4, 2, 3, generator=gen).bfloat16(), torch.randn(1, 2, 4, generator=gen)
    want_out, want_lse = out.clone(), lse.clone()
    merge_reference_(want_out, want_lse, part, part_lse)
    cuda_ext.merge_(out, lse, part, part_lse)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


@pytest.mark.parametrize("call, match", [
    (lambda: cuda_ext.merge_(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 2)),
     r"lse: expected shape \[1, 3, 2\], got \[1, 2, 3\]"),
    (lambda: cuda_ext.merge_(torch.zeros(2, 3, 4), torch.zeros(1, 2, 3), torch.zeros(2, 3, 4), torch.zeros(1, 2, 3)),
     r"out: expected 4 dims \[B, n, H, D\], got shape \[2, 3, 4\]"),
    (lambda: cuda_ext.merge_(torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 2), torch.zeros(1, 2, 3, 4, dtype=torch.int32),
                             torch.zeros(1, 3, 2)),
     r"part_out: expected a floating-point dtype, got torch.int32"),
    (lambda: cuda_ext.state_combine(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4, dtype=torch.float64),
                                    torch.zeros(1, 2)),
     r"s_local: expected dtype torch.float32 \(that of s_in\), got torch.float64"),
    (lambda: cuda_ext.state_combine(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), torch.zeros(2, 1)),
     r"log_decay: expected shape \[1, 2\], got \[2, 1\]"),
    (lambda: cuda_ext.state_combine_rows_(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4),
                                          torch.zeros(1, 2), 2, 4),
     r"row_start, row_end: expected 0 <= row_start <= row_end <= Dk = 3, got 2, 4"),
    (lambda: cuda_ext.state_scan(torch.zeros(2, 1, 2, 3, 4), torch.zeros(2, 1)),
     r"log_decay: expected shape \[2, 1, 2\], got \[2, 1\]"),
    (lambda: cuda_ext.state_scan(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2)),
     r"states: expected 5 dims \[C, B, H, Dk, Dv\], got shape \[1, 2, 3, 4\]"),
])
def test_errors_name_argument_expected_and_given(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_row_range_must_be_ints():
    s = torch.zeros(1, 1, 2, 2)
    with pytest.raises(TypeError, match="row_start: expected an int, got float"):
        cuda_ext.state_combine_rows_(s, s, s, torch.zeros(1, 1), 0.0, 1)


def test_unavailable_reason_without_the_extension():
    if cuda_ext.built():
        pytest.skip("the extension is built here")
    reason = cuda_backend.unavailable_reason(torch.device("cpu"), torch.bfloat16, 64)
    assert "seqpar._C" in reason and "SEQPAR_BUILD_CUDA=1" in reason
    assert not cuda_ext.available()


def test_cuda_backend_is_the_flash_op_and_the_fused_merge():
    from seqpar.kernels import block as ops

    fwd, bwd, merge = cuda_backend.forward, cuda_backend.backward, block.merge_kernel("cuda")
    assert (fwd, bwd, merge) == (block.sdpa_forward, block.sdpa_backward, ops.merge_)
    # the op merges like merge.py (here through its torch fallback)
    gen = torch.Generator().manual_seed(7)
    out, lse = torch.randn(1, 3, 2, 4, generator=gen), torch.randn(1, 2, 3, generator=gen)
    part, part_lse = torch.randn(1, 3, 2, 4, generator=gen), torch.randn(1, 2, 3, generator=gen)
    want_out, want_lse = out.clone(), lse.clone()
    merge_reference_(want_out, want_lse, part, part_lse)
    merge(out, lse, part, part_lse)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


# -- the compiled kernels (GPU) -----------------------------------------------------------

def _need_kernels():
    if not cuda_ext.available():
        pytest.skip(f"the compiled kernels cannot run here: "
                    f"{cuda_backend.unavailable_reason(torch.device('cuda'), torch.bfloat16, 64)}")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [1, 8, 64, 80, 128])
@pytest.mark.parametrize("lse_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("part_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_merge_matches_merge_py(head_dim, lse_dtype, part_dtype):
    _need_kernels()
    gen = torch.Generator().manual_seed(head_dim)
    b, n, h = 2, 37, 5
    acc = torch.randn(b, h, n + 3, head_dim, generator=gen).transpose(1, 2)  # heads-major accumulator
    acc_lse = (torch.randn(b, h, n + 3, generator=gen) * 8).to(lse_dtype)
    part = torch.randn(b, n, h, head_dim, generator=gen).to(part_dtype)
    part_lse = torch.randn(b, h, n, generator=gen) * 8
    acc_lse[:, :, 3], part_lse[:, :, 0] = float("-inf"), float("-inf")  # row 0 of the view: neither saw a key
    acc[:, 3] = 0
    acc_lse[:, :, 4] = float("-inf")
    part_lse[:, :, 2] = float("-inf")
    want_out, want_lse = acc[:, 3:].clone(), acc_lse[:, :, 3:].clone()
    merge_reference_(want_out, want_lse, part, part_lse)
    acc, acc_lse = acc.cuda(), acc_lse.cuda()
    before = acc[:, :3].clone()
    cuda_ext.merge_(acc[:, 3:], acc_lse[:, :, 3:], part.cuda(), part_lse.cuda())
    torch.testing.assert_close(acc[:, 3:].cpu(), want_out, rtol=2e-6, atol=2e-6)
    tol = 1e-13 if lse_dtype == torch.float64 else 2e-6
    torch.testing.assert_close(acc_lse[:, :, 3:].cpu(), want_lse, rtol=tol, atol=tol)
    assert torch.equal(acc[:, :3], before)
    assert torch.isneginf(acc_lse[:, :, 3]).all() and torch.isfinite(acc).all()


@pytest.mark.gpu
def test_cuda_merge_of_many_rows_grid_strides():
    _need_kernels()
    gen = torch.Generator().manual_seed(9)
    b, n, h, d = 4, 40000, 8, 16  # 1.28M rows: more than one grid of 65536 blocks x 16 rows
    out, lse = torch.randn(b, n, h, d, generator=gen), torch.randn(b, h, n, generator=gen)
    part, part_lse = torch.randn(b, n, h, d, generator=gen).half(), torch.randn(b, h, n, generator=gen)
    want_out, want_lse = out.clone(), lse.clone()
    merge_reference_(want_out, want_lse, part, part_lse)
    out, lse = out.cuda(), lse.cuda()
    cuda_ext.merge_(out, lse, part.cuda(), part_lse.cuda())
    torch.testing.assert_close(out.cpu(), want_out, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(lse.cpu(), want_lse, rtol=2e-6, atol=2e-6)


@pytest.mark.gpu
def test_cuda_state_kernels_match_the_references():
    _need_kernels()
    gen = torch.Generator().manual_seed(5)
    s_in = torch.randn(2, 3, 64, 48, generator=gen).transpose(2, 3).contiguous().transpose(2, 3)
    s_local, g = torch.randn(2, 3, 64, 48, generator=gen), -torch.rand(2, 3, generator=gen) * 4
    want = cuda_ext.state_combine_reference(s_in, s_local, g)
    got = cuda_ext.state_combine(s_in.cuda(), s_local.cuda(), g.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
    out = torch.full((2, 3, 64, 48), float("nan"), device="cuda")
    cuda_ext.state_combine_rows_(out, s_in.cuda(), s_local.cuda(), g.cuda(), 16, 40)
    torch.testing.assert_close(out[:, :, 16:40].cpu(), want[:, :, 16:40], rtol=1e-6, atol=1e-6)
    assert torch.isnan(out[:, :, :16]).all() and torch.isnan(out[:, :, 40:]).all()
    states, decays = torch.randn(5, 2, 3, 16, 8, generator=gen), -torch.rand(5, 2, 3, generator=gen)
    want_scan = cuda_ext.state_scan_reference(states, decays)
    got_scan = cuda_ext.state_scan(states.cuda(), decays.cuda())
    torch.testing.assert_close(got_scan.cpu(), want_scan, rtol=1e-5, atol=1e-5)
    in_place = states.cuda()
    cuda_ext.state_scan(in_place, decays.cuda(), out=in_place)
    torch.testing.assert_close(in_place.cpu(), want_scan, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_ops_reject_bad_arguments():
    _need_kernels()
    x = torch.zeros(1, 2, 3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="lse: expected a CUDA tensor"):
        torch.ops.seqpar_cuda.merge_(x, torch.zeros(1, 3, 2), x.clone(), torch.zeros(1, 3, 2, device="cuda"))
    with pytest.raises(RuntimeError, match="out: expected dtype Float"):
        torch.ops.seqpar_cuda.merge_(x.double(), torch.zeros(1, 3, 2, device="cuda"), x, torch.zeros(1, 3, 2, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [None, 0, 7, -5])
def test_cuda_backend_blocks_match_the_reference_math(offset):
    _need_kernels()
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 45, 4, 64, generator=gen).bfloat16()
    k, v, do = (torch.randn(s, generator=gen).bfloat16() for s in ((1, 50, 2, 64), (1, 50, 2, 64), (1, 45, 4, 64)))
    fwd, bwd = cuda_backend.forward, cuda_backend.backward
    out, lse = fwd(q.cuda(), k.cuda(), v.cuda(), 0.125, offset)
    ref_out, ref_lse = block.torch_forward(q, k, v, 0.125, offset)
    torch.testing.assert_close(out.float().cpu(), ref_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse.float().cpu(), ref_lse, rtol=1e-3, atol=1e-3)
    grads = bwd(do.cuda(), q.cuda(), k.cuda(), v.cuda(), ref_out.bfloat16().cuda(), ref_lse.cuda(), 0.125, offset)
    ref_grads = block.torch_backward(do, q, k, v, ref_out.bfloat16(), ref_lse, 0.125, offset)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float().cpu(), want, rtol=5e-2, atol=5e-2)
