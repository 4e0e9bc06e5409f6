"""Block kernels on inputs whose memory layout is not the packed one: PyTorch's fused flash
op reads the head dim as unit-stride, so the sdpa pieces must copy exactly those inputs."""
import pytest
import torch

from seqpar.kernels import block


def _views(x, layout):
    """`x` `[B, n, H, D]` with the same values in another memory layout."""
    if layout == "head_dim_stride_2":
        return torch.stack([x, torch.full_like(x, 1e30)], dim=-1)[..., 0]
    if layout == "dh_transposed":  # a [B, n, D, H] buffer seen as [B, n, H, D]
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "heads_major":  # a [B, H, n, D] buffer
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "expanded":  # stride 0 in the batch and in the head dim (an expanded dO)
        return x[:1, :, :, :1].expand_as(x)
    return x


LAYOUTS = ["head_dim_stride_2", "dh_transposed", "heads_major", "expanded"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("heads, kv_heads, offset", [(2, 2, None), (4, 2, 3), (4, 1, 0)])
def test_sdpa_block_any_strides_equals_torch(layout, heads, kv_heads, offset):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 11, heads, 6, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 11, kv_heads, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    do = torch.randn(2, 11, heads, 6, generator=gen, dtype=torch.float64)
    if layout == "expanded":
        q, k, v, do = (t[:1, :, :, :1].expand_as(t).contiguous() for t in (q, k, v, do))
    scale = 0.4
    ref_out, ref_lse = block.torch_forward(q, k, v, scale, offset)
    ref = block.torch_backward(do, q, k, v, ref_out, ref_lse, scale, offset)
    views = [_views(t, layout) for t in (q, k, v, do)]
    out, lse = block.sdpa_forward(*views[:3], scale, offset)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10, msg=lambda m: f"out, {layout}: {m}")
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    grads = block.sdpa_backward(views[3], *views[:3], _views(ref_out, layout), ref_lse, scale, offset)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}, {layout}: {m}")
