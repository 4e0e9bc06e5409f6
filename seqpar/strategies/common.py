"""What several strategies share: the block loops and the autograd function around them."""
from __future__ import annotations

import torch

from ..kernels.merge import merge_


class SavedOutputAttention(torch.autograd.Function):
    """`out, lse = forward(q, k, v, *args)`; the backward calls
    `backward(do, q, k, v, out, lse, *args) -> dq, dk, dv` with the saved tensors.
    Results come back in the input dtypes."""

    @staticmethod
    def forward(ctx, q, k, v, forward_fn, backward_fn, args):
        out, lse = forward_fn(q, k, v, *args)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.backward_fn, ctx.args = backward_fn, args
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backward_fn(do.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def attend_blocks(fwd, q, k, v, blocks, scale, out, lse, fresh: bool = False, merge=merge_) -> bool:
    """Attend q's rows to k/v over `blocks` and merge each result into `(out, lse)`.

    `fresh`: nothing is written in `(out, lse)` yet; the first block that covers every row
    is then copied instead of merged into zeros (and otherwise they are initialised).
    `merge`: the backend's merge (`block.merge_kernel`), the reference `merge_` by default.
    Returns whether the accumulator is still fresh (no block at all)."""
    for blk in blocks:
        qs = slice(blk.q_start, blk.q_start + blk.q_len)
        ks = slice(blk.k_start, blk.k_start + blk.k_len)
        part_out, part_lse = fwd(q[:, qs], k[:, ks], v[:, ks], scale, blk.offset)
        if fresh and blk.q_len == q.shape[1]:
            out.copy_(part_out)
            lse.copy_(part_lse)
        else:
            if fresh:
                out.zero_()
                lse.fill_(float("-inf"))
            merge(out[:, qs], lse[:, :, qs], part_out, part_lse)
        fresh = False
    return fresh


def attend_blocks_backward(bwd, blocks, do, q, k, v, out, lse, scale, dq, dk, dv) -> None:
    """Backward of `attend_blocks`: add each block's gradients into dq (rows) and dk, dv (keys)."""
    for blk in blocks:
        qs = slice(blk.q_start, blk.q_start + blk.q_len)
        ks = slice(blk.k_start, blk.k_start + blk.k_len)
        dq_b, dk_b, dv_b = bwd(do[:, qs], q[:, qs], k[:, ks], v[:, ks], out[:, qs], lse[:, :, qs], scale, blk.offset)
        dq[:, qs] += dq_b
        dk[:, ks] += dk_b
        dv[:, ks] += dv_b
