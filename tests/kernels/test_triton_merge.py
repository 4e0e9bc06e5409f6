"""The fused Triton merge against the reference `merge_` (in Triton's interpreter without CUDA)."""
import pytest
import torch

from seqpar.kernels import block
from seqpar.kernels.merge import merge_ as reference_merge
from seqpar.kernels.reference import dense_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_REASON = block.unavailable_reason("triton", DEVICE, torch.float32, 64)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"triton backend unavailable: {_REASON}")

if _REASON is None:
    from seqpar.kernels.triton.merge import merge_ as fused_merge


def _random_state(b, n, h, d, lse_dtype, part_dtype, seed, spread=5.0):
    """An accumulator and a part with rows where either side (or both) saw no key."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(b, n, h, d, generator=gen)
    lse = (torch.randn(b, h, n, generator=gen) * spread).to(lse_dtype)
    part_out = torch.randn(b, n, h, d, generator=gen).to(part_dtype)
    part_lse = torch.randn(b, h, n, generator=gen) * spread
    lse[:, 0, : n // 2] = float("-inf")  # accumulator rows that saw no key yet
    out[:, : n // 2, 0] = 0
    part_lse[:, 0, n // 3:] = float("-inf")  # part rows that saw none (overlapping: both -inf)
    part_out[:, n // 3:, 0] = 0
    return [t.to(DEVICE) for t in (out, lse, part_out, part_lse)]


def _assert_same_merge(out, lse, part_out, part_lse):
    want_out, want_lse = out.clone(), lse.clone()
    reference_merge(want_out, want_lse, part_out, part_lse)
    fused_merge(out, lse, part_out, part_lse)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    finite = torch.isfinite(want_lse)
    # a few ulps of the accumulator dtypes: the same formula, evaluated in another order
    ulp = torch.finfo(lse.dtype).eps
    assert (lse[finite] - want_lse[finite]).abs().max().item() <= 4 * ulp * max(1.0, want_lse[finite].abs().max().item())
    assert (out - want_out).abs().max().item() <= 4 * torch.finfo(out.dtype).eps * max(1.0, want_out.abs().max().item())


@pytest.mark.parametrize("lse_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("part_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 3, 12), (1, 1, 1, 1), (1, 5, 2, 64)], ids=str)
def test_fused_merge_equals_reference(shape, part_dtype, lse_dtype):
    _assert_same_merge(*_random_state(*shape, lse_dtype, part_dtype, seed=sum(shape)))


def test_fused_merge_on_strided_views_writes_only_the_view():
    # the strategies merge into row slices of heads-major accumulators and head slices
    out_buf, lse_buf, part_out, part_lse = _random_state(2, 30, 4, 8, torch.float64, torch.float32, seed=1)
    heads_major = out_buf.transpose(1, 2).contiguous().transpose(1, 2)
    before_out, before_lse = heads_major.clone(), lse_buf.clone()
    rows, heads = slice(3, 20), slice(1, 3)
    out_view, lse_view = heads_major[:, rows, heads], lse_buf[:, heads, rows]
    part = (part_out[:, rows, heads], part_lse[:, heads, rows])
    want_out, want_lse = out_view.clone(), lse_view.clone()
    reference_merge(want_out, want_lse, *part)
    fused_merge(out_view, lse_view, *part)
    torch.testing.assert_close(out_view, want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse_view, want_lse, rtol=1e-12, atol=1e-12)
    untouched = torch.ones_like(before_out, dtype=torch.bool)
    untouched[:, rows, heads] = False
    assert torch.equal(heads_major[untouched], before_out[untouched])
    untouched_lse = torch.ones_like(before_lse, dtype=torch.bool)
    untouched_lse[:, heads, rows] = False
    assert torch.equal(lse_buf[untouched_lse], before_lse[untouched_lse])


def test_fused_merges_equal_attention_over_the_union():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 9, 2, 16, generator=gen, dtype=torch.float64)
    ks = [torch.randn(1, n, 2, 16, generator=gen, dtype=torch.float64) for n in (3, 7, 1, 5)]
    vs = [torch.randn(1, n, 2, 16, generator=gen, dtype=torch.float64) for n in (3, 7, 1, 5)]
    parts = [dense_attention(q, k, v, softmax_scale=2.0, return_lse=True) for k, v in zip(ks, vs)]
    want_out, want_lse = dense_attention(q, torch.cat(ks, 1), torch.cat(vs, 1), softmax_scale=2.0, return_lse=True)
    out = torch.zeros(1, 9, 2, 16, device=DEVICE)
    lse = torch.full((1, 2, 9), float("-inf"), dtype=torch.float64, device=DEVICE)
    for part_out, part_lse in parts:
        fused_merge(out, lse, part_out.float().to(DEVICE), part_lse.float().to(DEVICE))
    assert (out.cpu().double() - want_out).abs().max().item() < 1e-6
    assert (lse.cpu() - want_lse).abs().max().item() < 1e-6


@pytest.mark.parametrize("big", [80.0, 1e4, 3e38])
def test_fused_merge_does_not_overflow_on_huge_lse(big):
    out = torch.ones(1, 1, 1, 2, device=DEVICE)
    lse = torch.full((1, 1, 1), big, device=DEVICE)
    fused_merge(out, lse, 3 * torch.ones(1, 1, 1, 2, device=DEVICE), torch.full((1, 1, 1), big, device=DEVICE))
    torch.testing.assert_close(out, torch.full((1, 1, 1, 2), 2.0, device=DEVICE))
    torch.testing.assert_close(lse, torch.full((1, 1, 1), big, device=DEVICE) + torch.log(torch.tensor(2.0)))


def test_fused_merge_rejects_mismatched_shapes():
    out, lse, part_out, part_lse = _random_state(1, 4, 2, 8, torch.float32, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"part_lse: expected shape \(1, 2, 4\) \(from out \(1, 4, 2, 8\)\), got \(1, 2, 3\)"):
        fused_merge(out, lse, part_out, part_lse[:, :, :3])
    with pytest.raises(ValueError, match="out: expected 4 dims"):
        fused_merge(out[0], lse, part_out, part_lse)


def test_merge_kernel_goes_with_the_backend(monkeypatch):
    calls = []
    monkeypatch.setattr("seqpar.kernels.triton.merge.merge_", lambda *args: calls.append(args))
    block.merge_kernel("triton")(1, 2, 3, 4)
    assert calls == [(1, 2, 3, 4)]  # the fused merge
    for backend in ("torch", "sdpa", "flash_attn"):
        assert block.merge_kernel(backend) is reference_merge


@pytest.mark.gpu
def test_gpu_fused_merge_more_than_65535_batch_heads():
    """B x H = 4100 x 16 rows: past the 65535 of a second grid axis."""
    _assert_same_merge(*_random_state(4100, 3, 16, 8, torch.float32, torch.float32, seed=1))
