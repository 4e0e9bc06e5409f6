"""The merge of `seqpar.kernels.merge.merge_` as one Triton kernel: one pass over
(out, lse, part_out, part_lse), in place, on strided views.

Same formula as the reference (see merge.py), computed in the dtype of the accumulator's
lse (fp64 in the strategies, whose lse accumulates in fp64):

    d = part_lse - lse              (both -inf: 0)
    out += sigmoid(d) * (part_out - out)
    lse  = max(lse, part_lse) + log1p(exp(-|d|))

The reference launches about a dozen elementwise kernels and temporaries per merge; this
reads each tensor once and writes out and lse once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grid import folded_grid, tile_and_row

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _log1p(x):
    """log(1 + x) for x in [0, 1], accurate to a few ulps where 1 + x rounds (Goldberg's
    trick: the rounding of u = 1 + x cancels in log(u) * x / (u - 1))."""
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _merge_kernel(Out, Lse, PartOut, PartLse,
                  stride_ob, stride_on, stride_oh, stride_od,
                  stride_lb, stride_lh, stride_ln,
                  stride_pb, stride_pn, stride_ph, stride_pd,
                  stride_qb, stride_qh, stride_qn,
                  n, heads,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tile, off_bh = tile_and_row(n, BLOCK_M)
    start_m = tile * BLOCK_M
    off_b = (off_bh // heads).to(tl.int64)
    off_h = (off_bh % heads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n
    rows = offs_m.to(tl.int64)

    # -- the weight of the part: only the difference of the two lse enters
    # [BM]
    lse_ptrs = Lse + off_b * stride_lb + off_h * stride_lh + rows * stride_ln
    lse = tl.load(lse_ptrs, mask=row_ok, other=0.0)
    part_lse = tl.load(PartLse + off_b * stride_qb + off_h * stride_qh + rows * stride_qn,
                       mask=row_ok, other=0.0).to(lse.dtype)
    # equal lse give d = 0; that includes both -inf (no key seen on either side), where
    # the plain difference would be nan (both outputs are 0 there anyway)
    same = part_lse == lse
    diff = tl.where(same, 0.0, part_lse) - tl.where(same, 0.0, lse)
    w_part = tl.sigmoid(diff)
    new_lse = tl.maximum(lse, part_lse) + _log1p(tl.exp(-tl.abs(diff)))
    tl.store(lse_ptrs, new_lse, mask=row_ok)

    # -- out += w_part * (part_out - out)
    # [BM, D]
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    out_ptrs = Out + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_on + offs_d[None, :] * stride_od
    out = tl.load(out_ptrs, mask=mask, other=0.0)
    part = tl.load(PartOut + off_b * stride_pb + off_h * stride_ph + rows[:, None] * stride_pn
                   + offs_d[None, :] * stride_pd, mask=mask, other=0.0).to(out.dtype)
    out = out + (part - out) * w_part.to(out.dtype)[:, None]
    tl.store(out_ptrs, out, mask=mask)


def merge_(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Merge `(part_out [B, n, H, D], part_lse [B, H, n])` into `(out, lse)` in place; any strides."""
    if out.dim() != 4:
        raise ValueError(f"out: expected 4 dims [B, n, H, D], got shape {tuple(out.shape)}")
    b, n, heads, head_dim = out.shape
    for name, x, shape in (("lse", lse, (b, heads, n)), ("part_out", part_out, (b, n, heads, head_dim)),
                           ("part_lse", part_lse, (b, heads, n))):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (from out {tuple(out.shape)}), got {tuple(x.shape)}")
        if x.device != out.device:
            raise ValueError(f"{name}: expected device {out.device} (that of out), got {x.device}")
    for name, x in (("out", out), ("lse", lse), ("part_out", part_out), ("part_lse", part_lse)):
        if x.dtype not in _FLOATS:
            raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")
    if lse.numel() == 0:  # no rows
        return
    block_d = triton.next_power_of_2(max(head_dim, 1))
    # about 4K elements of out per program: one row of D per thread group, rows in parallel
    block_m = max(1, min(triton.next_power_of_2(max(n, 1)), 4096 // block_d))
    _merge_kernel[folded_grid(n, block_m, b * heads)](
        out, lse, part_out, part_lse,
        *out.stride(), *lse.stride(), *part_out.stride(), *part_lse.stride(),
        n, heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m,
    )
