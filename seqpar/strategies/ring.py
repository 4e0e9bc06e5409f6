"""Ring attention (arXiv 2310.01889): K/V travel around the ring, queries stay.

Forward, on rank r, step t = 0 .. P-1: hold the K/V of rank `src = (r - t) mod P`; post
the exchange that sends them to r+1 and receives rank src-1's from r-1; compute every
visible block of (own queries) x (src's keys) and merge it into the fp32 accumulator;
wait. Blocks come from `layout.visible_blocks`, so every scheme and uneven lengths work
and fully masked blocks are never computed (zigzag/stripe balance the causal work).

Backward: K/V circulate again and the fp32 dK/dV accumulated for them travel one step
behind (posted in the same batch as the next K/V exchange), so after P steps each rank
holds the full gradient of its own K/V; dQ stays local.

Volume per rank (bytes sent = bytes received; `n_s` = local length of rank s, `e` the
element size, `kv(s) = 2 B n_s H_kv D`):
    forward:  sum over the P-1 ranks s that this rank forwards of kv(s) * e
              (equal lengths: 2 B (N/P) H_kv D (P-1) e)
    backward: the same K/V again, plus the dK/dV of all P ranks in fp32 (4 bytes;
              fp64 inputs: 8) (equal lengths: 2 B (N/P) H_kv D ((P-1) e + 4 P))
`analytic_bytes` computes these exactly for any layout; tests assert the counts.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..comm import p2p
from ..kernels import block as block_kernels
from ..kernels.merge import merge_
from ..layout import SeqLayout, visible_blocks


def _kv_shape(k: torch.Tensor, n: int):
    return (2, k.shape[0], n, k.shape[2], k.shape[3])


def _ring_forward(q, k, v, layout: SeqLayout, causal: bool, scale: float, backend: str):
    rank, world = layout.rank, layout.world_size
    fwd, _ = block_kernels.kernels(backend, q, k)
    acc = block_kernels.acc_dtype(q.dtype)
    b, nq, h, d = q.shape
    out = torch.zeros(b, nq, h, d, dtype=acc, device=q.device)
    # lse accumulates in fp64: it is only [B, H, n], and each merge would otherwise round
    # it by an ulp of |lse|, an error that saturated softmax rows amplify in the gradients
    lse = torch.full((b, h, nq), float("-inf"), dtype=torch.float64, device=q.device)
    kv = torch.stack([k, v])
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    for step in range(world):
        src = (rank - step) % world
        exchange = None
        if step < world - 1:
            incoming = kv.new_empty(_kv_shape(k, layout.local_len_of((src - 1) % world)))
            exchange = p2p.post([(kv, nxt)], [(incoming, prv)], layout.group, op="ring.forward.kv")
        for blk in visible_blocks(layout, rank, src, causal):
            ks = slice(blk.k_start, blk.k_start + blk.k_len)
            qs = slice(blk.q_start, blk.q_start + blk.q_len)
            part_out, part_lse = fwd(q[:, qs], kv[0][:, ks], kv[1][:, ks], scale, blk.offset)
            merge_(out[:, qs], lse[:, :, qs], part_out, part_lse)
        if exchange is not None:
            (kv,) = exchange.wait()
    return out, lse.to(acc)


def _ring_backward(do, q, k, v, out, lse, layout: SeqLayout, causal: bool, scale: float, backend: str):
    rank, world = layout.rank, layout.world_size
    _, bwd = block_kernels.kernels(backend, q, k)
    acc = block_kernels.acc_dtype(q.dtype)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    dkv = None  # fp32 gradient of the K/V held at this step, accumulated along the ring
    for step in range(world):
        src = (rank - step) % world
        sends, recvs = [], []
        if step < world - 1:
            next_kv = kv.new_empty(_kv_shape(k, layout.local_len_of((src - 1) % world)))
            sends.append((kv, nxt))
            recvs.append((next_kv, prv))
        if dkv is not None:
            # the previous step's dK/dV go on one hop, in the same batch as the K/V
            incoming_dkv = dkv.new_empty(_kv_shape(k, layout.local_len_of(src)))
            sends.append((dkv, nxt))
            recvs.append((incoming_dkv, prv))
        exchange = p2p.post(sends, recvs, layout.group, op="ring.backward") if sends else None
        part = torch.zeros(_kv_shape(k, layout.local_len_of(src)), dtype=acc, device=q.device)
        for blk in visible_blocks(layout, rank, src, causal):
            ks = slice(blk.k_start, blk.k_start + blk.k_len)
            qs = slice(blk.q_start, blk.q_start + blk.q_len)
            dq_b, dk_b, dv_b = bwd(
                do[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs], lse[:, :, qs], scale, blk.offset
            )
            dq[:, qs] += dq_b
            part[0][:, ks] += dk_b
            part[1][:, ks] += dv_b
        if exchange is not None:
            received = exchange.wait()
            if step < world - 1:
                kv = received[0]
            if dkv is not None:
                part += received[-1]
        dkv = part
    if world > 1:
        # dK/dV of rank r+1's K/V are here; one more hop brings everyone's home
        home = dkv.new_empty(_kv_shape(k, layout.local_len))
        (dkv,) = p2p.post([(dkv, nxt)], [(home, prv)], layout.group, op="ring.backward").wait()
    return dq, dkv[0], dkv[1]


def analytic_bytes(layout: SeqLayout, batch: int, heads: int, kv_heads: int, head_dim: int,
                   element_size: int) -> Dict[str, int]:
    """Bytes this rank sends (and receives) in the forward and the backward, exactly."""
    rank, world = layout.rank, layout.world_size
    per_token = 2 * batch * kv_heads * head_dim
    forwarded = sum(layout.local_len_of((rank - t) % world) for t in range(world - 1))
    fwd = forwarded * per_token * element_size
    acc_size = 8 if element_size == 8 else 4  # gradients travel in fp32 (fp64 for fp64)
    grads = layout.seq_len * per_token * acc_size if world > 1 else 0
    return {"forward": fwd, "backward": fwd + grads}


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, causal, scale, backend):
        out, lse = _ring_forward(q, k, v, layout, causal, scale, backend)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (layout, causal, scale, backend)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(do.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(q, k, v, *, layout=None, causal=False, softmax_scale=None, backend="auto", **options):
    """Exact attention over the whole sequence by ring attention (K/V pass rank to rank).

    `q` `[B, S/P, H, D]`, `k`/`v` `[B, S/P, H_kv, D]`: this rank's tokens of `layout`
    (default: contiguous, equal lengths, default group). Returns this rank's rows of dense
    softmax attention `[B, S/P, H, D]` in the input dtype; `causal` masks by global position;
    `softmax_scale` defaults to `D ** -0.5`. Differentiable in q, k, v.
    """
    from ..attention import run_strategy

    return run_strategy("ring", q, k, v, layout=layout, causal=causal, softmax_scale=softmax_scale,
                        backend=backend, **options)


def _apply(q, k, v, layout, causal, scale, backend, options):
    return RingAttention.apply(q, k, v, layout, causal, scale, backend)
