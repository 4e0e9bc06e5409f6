"""What several strategies share: the block loops and the autograd function around them."""
from __future__ import annotations

import torch

from ..kernels.merge import merge_


def saved_output_function(name: str, forward_fn, backward_fn) -> type:
    """An autograd function named `name` (profiles and tracebacks show `{name}Backward`):
    `out, lse = forward_fn(q, k, v, *args)`; its backward calls
    `backward_fn(do, q, k, v, out, lse, *args) -> dq, dk, dv` with the saved tensors.
    `.apply(q, k, v, args)`. Results come back in the input dtypes."""

    def forward(ctx, q, k, v, args):
        out, lse = forward_fn(q, k, v, *args)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = args
        return out

    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward_fn(do.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


def attend_blocks(fwd, q, k, v, blocks, scale, out, lse, fresh: bool = False, merge=merge_) -> bool:
    """Attend q's rows to k/v over `blocks` and merge each result into `(out, lse)`.

    `fresh`: nothing is written in `(out, lse)` yet; the first block that covers every row
    is then copied instead of merged into zeros (and otherwise they are initialised).
    `merge`: the backend's merge (`block.merge_kernel`), the reference `merge_` by default.
    Returns whether the accumulator is still fresh (no block at all)."""
    for blk in blocks:
        qs = slice(blk.q_start, blk.q_start + blk.q_len)
        ks = slice(blk.k_start, blk.k_start + blk.k_len)
        part_out, part_lse = fwd(q[:, qs], k[:, ks], v[:, ks], scale, blk.offset, blk.lo, blk.softcap)
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
        dq_b, dk_b, dv_b = bwd(do[:, qs], q[:, qs], k[:, ks], v[:, ks], out[:, qs], lse[:, :, qs], scale, blk.offset,
                               blk.lo, blk.softcap)
        dq[:, qs] += dq_b
        dk[:, ks] += dk_b
        dv[:, ks] += dv_b
