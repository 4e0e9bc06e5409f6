"""What several strategies share: the autograd function around (forward, backward) loops."""
from __future__ import annotations

import torch


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
