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

from typing import Dict, Optional

import torch

from ..comm import p2p
from ..kernels import block as block_kernels
from ..layout import SeqLayout, visible_blocks
from ..registry import Strategy, register, run
from .common import attend_blocks, attend_blocks_backward, fold_sinks, sinks_grad


def _kv_buffer(k: torch.Tensor, v: torch.Tensor, n: int, backend: str, dtype=None):
    """(storage, (k view, v view)) for the K/V (or dK/dV) of an n-token rank: the views
    are `[B, n, H_kv, D]` and `[B, n, H_kv, Dv]` in the kernel's preferred layout, one
    after the other in `storage`, a flat buffer, which is what travels."""
    b, _, h_kv, d = k.shape
    dv = v.shape[3]
    storage = torch.empty(b * n * h_kv * (d + dv), dtype=dtype or k.dtype, device=k.device)
    k_size = b * n * h_kv * d
    return storage, (block_kernels.view_in_kernel_layout(storage[:k_size], (b, n, h_kv, d), backend),
                     block_kernels.view_in_kernel_layout(storage[k_size:], (b, n, h_kv, dv), backend))


def _pack_kv(k, v, backend, world: int):
    """K and V in one buffer that can travel; a ring of one member uses them as they are."""
    if world == 1:
        return None, (k, v)
    storage, view = _kv_buffer(k, v, k.shape[1], backend)
    view[0].copy_(k)
    view[1].copy_(v)
    return storage, view


def _ring_forward(q, k, v, layout: SeqLayout, causal: bool, scale: float, backend: str,
                  ring_op: str = "ring.forward.kv"):
    """q in the kernel layout; returns (out [B, n, H, Dv] acc dtype, lse [B, H, n] acc dtype)."""
    rank, world = layout.rank, layout.world_size
    fwd, _ = block_kernels.kernels(backend, q, k)
    merge = block_kernels.merge_kernel(backend)
    acc = block_kernels.acc_dtype(q.dtype)
    b, nq, h, _ = q.shape
    _, out = block_kernels.empty_in_kernel_layout((b, nq, h, v.shape[3]), backend, dtype=acc, device=q.device)
    # lse accumulates in fp64: it is only [B, H, n], and each merge would otherwise round
    # it by an ulp of |lse|, an error that saturated softmax rows amplify in the gradients
    lse = torch.empty((b, h, nq), dtype=torch.float64, device=q.device)
    empty = True  # nothing written yet: the first block covering every row is copied, not merged
    kv_storage, kv = _pack_kv(k, v, backend, world)
    nxt, prv = layout.peer((rank + 1) % world), layout.peer((rank - 1) % world)
    for step in range(world):
        src = (rank - step) % world
        exchange = None
        if step < world - 1:
            incoming = _kv_buffer(k, v, layout.local_len_of((src - 1) % world), backend)
            exchange = p2p.post([(kv_storage, nxt)], [(incoming[0], prv)], layout.group, op=ring_op)
        empty = attend_blocks(fwd, q, kv[0], kv[1], visible_blocks(layout, rank, src, causal), scale, out, lse,
                              fresh=empty, merge=merge)
        if exchange is not None:
            exchange.wait()
            kv_storage, kv = incoming
    if empty:  # no block at all (no rows): keep the -inf/0 convention
        out.zero_()
        lse.fill_(float("-inf"))
    return out, lse.to(acc)


def _ring_backward(do, q, k, v, out, lse, layout: SeqLayout, causal: bool, scale: float, backend: str,
                   ring_op: str = "ring.backward"):
    """do, q, out in the kernel layout; returns dq, dk, dv in the acc dtype."""
    rank, world = layout.rank, layout.world_size
    _, bwd = block_kernels.kernels(backend, q, k)
    acc = block_kernels.acc_dtype(q.dtype)
    nxt, prv = layout.peer((rank + 1) % world), layout.peer((rank - 1) % world)
    _, dq = block_kernels.empty_in_kernel_layout(q.shape, backend, dtype=acc, device=q.device)
    dq.zero_()
    kv_storage, kv = _pack_kv(k, v, backend, world)
    dkv_storage = None  # fp32 gradient of the K/V held at this step, accumulated along the ring
    for step in range(world):
        src = (rank - step) % world
        sends, recvs = [], []
        if step < world - 1:
            next_kv = _kv_buffer(k, v, layout.local_len_of((src - 1) % world), backend)
            sends.append((kv_storage, nxt))
            recvs.append((next_kv[0], prv))
        if dkv_storage is not None:
            # the previous step's dK/dV go on one hop, in the same batch as the K/V
            incoming_dkv = _kv_buffer(k, v, layout.local_len_of(src), backend, dtype=acc)
            sends.append((dkv_storage, nxt))
            recvs.append((incoming_dkv[0], prv))
        exchange = p2p.post(sends, recvs, layout.group, op=ring_op) if sends else None
        part_storage, part = _kv_buffer(k, v, layout.local_len_of(src), backend, dtype=acc)
        part_storage.zero_()
        attend_blocks_backward(bwd, visible_blocks(layout, rank, src, causal), do, q, kv[0], kv[1], out, lse, scale,
                               dq, part[0], part[1])
        if exchange is not None:
            exchange.wait()
            if step < world - 1:
                kv_storage, kv = next_kv
            if dkv_storage is not None:
                part_storage += incoming_dkv[0]
        dkv_storage, dkv = part_storage, part
    if world > 1:
        # dK/dV of rank r+1's K/V are here; one more hop brings everyone's home
        home_storage, dkv = _kv_buffer(k, v, layout.local_len, backend, dtype=acc)
        p2p.post([(dkv_storage, nxt)], [(home_storage, prv)], layout.group, op=ring_op).wait()
    return dq, dkv[0], dkv[1]


def analytic_bytes(layout: SeqLayout, batch: int, heads: int, kv_heads: int, head_dim: int,
                   element_size: int, value_dim: Optional[int] = None, **options) -> Dict[str, int]:
    """Bytes this rank sends (and receives) in the forward and the backward, exactly
    (`value_dim`: v's head dim, None for head_dim)."""
    rank, world = layout.rank, layout.world_size
    per_token = batch * kv_heads * (head_dim + (head_dim if value_dim is None else value_dim))
    forwarded = sum(layout.local_len_of((rank - t) % world) for t in range(world - 1))
    fwd = forwarded * per_token * element_size
    acc_size = 8 if element_size == 8 else 4  # gradients travel in fp32 (fp64 for fp64)
    grads = layout.seq_len * per_token * acc_size if world > 1 else 0
    return {"forward": fwd, "backward": fwd + grads}



# -- for the planner (seqpar.planner): schedule, memory, candidates ----------------------------


def ring_phase(line, prob, topo, ring_layout, heads: int, fwd_bytes: float, grad_bytes: float, level: str,
               backward: bool) -> None:
    """Add one pass of ring attention over `ring_layout` (R members, `heads` query heads
    per member) to the timeline `line`: each step takes the busiest member's blocks while
    the next K/V exchange (and, backward, the previous step's dK/dV) flies."""
    from ..planner.schedule import BACKWARD_FLOPS, FORWARD_FLOPS, block_time, visible_elements

    size = ring_layout.world_size
    visible = visible_elements(ring_layout, prob.causal)
    per = prob.batch * heads * prob.head_dim
    if backward:
        blocks = block_time(visible, BACKWARD_FLOPS * per, topo.backward_rate, topo.kernel_overhead)
    else:
        blocks = block_time(visible, FORWARD_FLOPS * per, topo.compute_rate, topo.kernel_overhead)
    rows = torch.arange(size)
    kv_step = fwd_bytes / max(1, size - 1)
    grad_step = grad_bytes / size if size > 1 else 0.0
    for step in range(size):
        work = float(blocks[rows, (rows - step) % size].max())
        nbytes = kv_step if step < size - 1 else 0.0
        if backward and step >= 1:
            nbytes += grad_step
        messages = 1 if nbytes else 0
        line.overlap(work, topo.transfer(level, "p2p", size, nbytes) if nbytes else 0.0, messages)
    if backward and size > 1:
        line.wait(topo.transfer(level, "p2p", size, grad_step), 1)  # dK/dV's last hop home


def cost(prob, topo, options):
    """(timeline, busiest rank's bytes) of one call: the ring's steps forward and, in
    training, backward, each step `max(blocks, exchange)`."""
    from ..planner.schedule import Timeline, busiest_bytes

    nbytes = busiest_bytes(prob, analytic_bytes, options)
    layout = prob.layout()
    level = topo.level(range(prob.world_size))
    line = Timeline(topo.overlap)
    fwd = nbytes["forward"]
    ring_phase(line, prob, topo, layout, prob.heads, fwd, 0.0, level, backward=False)
    if prob.training:
        ring_phase(line, prob, topo, layout, prob.heads, fwd, nbytes["backward"] - fwd, level, backward=True)
    return line, nbytes


def peak_memory(prob, options) -> int:
    """Inputs, plus two K/V buffers in flight and the fp32 accumulators; the backward adds
    dK/dV in flight."""
    b, h, hkv, d, n = prob.batch, prob.heads, prob.kv_heads, prob.head_dim, prob.longest_local
    e, a = prob.element_size, prob.acc_size
    rows, lse, kv = b * n * h * d, b * h * n, 2 * b * n * hkv * d
    saved = 2 * rows * e + lse * a  # q in the kernel's layout, out, lse
    fwd = 3 * kv * e + rows * a + lse * 8
    bwd = 2 * kv * e + 3 * kv * a + rows * (a + e)
    return prob.peak(saved, fwd, bwd)


def candidates(prob):
    return [{}]

class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, layout, causal, scale, backend):
        q_k = block_kernels.to_kernel_layout(q, backend)
        out, lse = fold_sinks(*_ring_forward(q_k, k, v, layout, causal, scale, backend), sinks)
        # with sinks the backward's rowsum(dO * O) cancels against dO . v: keep O unrounded
        ctx.save_for_backward(q_k, k, v, out if sinks is not None else out.to(q.dtype), lse, sinks)
        ctx.args = (layout, causal, scale, backend)
        # the caller gets the usual [B, n, H, D]-contiguous layout
        return out.to(q.dtype).contiguous()

    @staticmethod
    def backward(ctx, do):
        q_k, k, v, out, lse, sinks = ctx.saved_tensors
        layout, causal, scale, backend = ctx.args
        do = block_kernels.to_kernel_layout(do, backend)
        dq, dk, dv = _ring_backward(do, q_k, k, v, out, lse, layout, causal, scale, backend)
        dsinks = sinks_grad(do, out, lse, sinks) if sinks is not None and ctx.needs_input_grad[3] else None
        return dq.to(q_k.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks, None, None, None, None


def ring_attention(q, k, v, *, layout=None, causal=False, softmax_scale=None, backend="auto", **options):
    """Exact attention over the whole sequence by ring attention (K/V pass rank to rank).

    `q` `[B, S/P, H, D]`, `k`/`v` `[B, S/P, H_kv, D]`: this rank's tokens of `layout`
    (default: contiguous, equal lengths, default group). Returns this rank's rows of dense
    softmax attention `[B, S/P, H, D]` in the input dtype; `causal` masks by global position;
    `softmax_scale` defaults to `D ** -0.5`. Differentiable in q, k, v.
    """
    return run("ring", q, k, v, layout=layout, causal=causal, softmax_scale=softmax_scale,
                        backend=backend, **options)


def _apply(q, k, v, layout, causal, scale, backend, options, sinks=None):
    return RingAttention.apply(q, k, v, sinks, layout, causal, scale, backend)


register(Strategy("ring", _apply, analytic_bytes, cost=cost, peak_memory=peak_memory, candidates=candidates))
