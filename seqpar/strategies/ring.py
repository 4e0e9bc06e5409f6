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

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional, Tuple

import torch

from ..comm import p2p
from ..kernels import block as block_kernels
from ..kernels.memory import unit_stride
from ..layout import Mask, SeqLayout, as_mask, visible_blocks
from ..registry import Strategy, register, run
from .common import attend_blocks, attend_blocks_backward, fold_sinks, held_blocks, seen_span, sinks_grad


def _kv_buffer(k: torch.Tensor, v: torch.Tensor, n: int, dtype=None):
    """(storage, (k view, v view)) for the K/V (or dK/dV) of n tokens: the views are
    `[B, n, H_kv, D]` and `[B, n, H_kv, Dv]`, contiguous, one after the other in
    `storage`, a flat buffer, which is what travels."""
    b, _, h_kv, d = k.shape
    dv = v.shape[3]
    storage = torch.empty(b * n * h_kv * (d + dv), dtype=dtype or k.dtype, device=k.device)
    k_size = b * n * h_kv * d
    return storage, (storage[:k_size].view(b, n, h_kv, d), storage[k_size:].view(b, n, h_kv, dv))


def _pack_kv(k, v, world: int):
    """K and V in one buffer that can travel; a ring of one member uses them as they are."""
    if world == 1:
        return None, (k, v)
    storage, view = _kv_buffer(k, v, k.shape[1])
    view[0].copy_(k)
    view[1].copy_(v)
    return storage, view


@dataclass(frozen=True)
class RingPlan:
    """Which K/V travel how far, from the layout and the mask alone (so every rank computes
    the same plan). Rank s's K/V reach rank s+t at step t; `hops[s]` is the farthest t
    whose rank sees any of s's keys (0: no other rank does, nothing of s moves), and
    `spans[s][t]` (t = 1 .. hops[s]) the local key rows `(a, b)` of s that ranks s+t ..
    s+hops[s] see, so the hop into rank s+t carries exactly those rows (a window or a
    document narrows them; `spans[s][0]` is all of s's rows). The fp32 dK/dV of s's keys
    travel one step behind over rows `spans[s][1]` and go home from rank s+hops[s]."""

    hops: Tuple[int, ...]
    spans: Tuple[Tuple[Tuple[int, int], ...], ...]

    def carries(self, src: int, step: int) -> Optional[Tuple[int, int]]:
        """The rows of `src` that reach rank src+step at step `step`, or None."""
        return self.spans[src][step] if step <= self.hops[src] else None


def ring_plan(layout, mask) -> RingPlan:
    """The `RingPlan` of `layout` (a SeqLayout or a ring of Ulysses groups) under `mask`."""
    mask = dataclasses.replace(as_mask(mask), softcap=0.0)
    geometry = getattr(layout, "geometry", None)
    if geometry is not None:
        return _cached_plan(geometry, mask)
    # a ring of Ulysses groups is made per call: plan it once for its forward and backward
    plans = layout.__dict__.setdefault("_ring_plans", {})
    if mask not in plans:
        plans[mask] = _plan(layout, mask)
    return plans[mask]


@lru_cache(maxsize=256)
def _cached_plan(geometry: tuple, mask: Mask) -> RingPlan:
    seq_len, scheme, world, documents = geometry
    return _plan(SeqLayout.simulated(seq_len, world, 0, scheme, documents), mask)


def _plan(layout, mask: Mask) -> RingPlan:
    world = layout.world_size
    hops, spans = [], []
    for s in range(world):
        need = {}
        for u in range(1, world):
            seen = seen_span(visible_blocks(layout, (s + u) % world, s, mask))
            if seen is not None:
                need[u] = seen
        farthest = max(need, default=0)
        rows = [(0, layout.local_len_of(s))] + [None] * farthest
        lo = hi = None
        for t in range(farthest, 0, -1):  # rows seen at distance >= t: a growing union
            if t in need:
                a, b = need[t]
                lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
            rows[t] = (lo, hi)
        hops.append(farthest)
        spans.append(tuple(rows))
    return RingPlan(tuple(hops), tuple(spans))


def _rows_to_send(held, held_rows: Tuple[int, int], rows: Tuple[int, int], k, v):
    """(storage, views) of rows `rows` of a source's K/V, held as `held` (storage, views)
    over rows `held_rows`: the held buffer itself when the rows are the same, else a copy."""
    storage, (hk, hv) = held
    if storage is not None and rows == held_rows:
        return storage, (hk, hv)
    a, b = rows[0] - held_rows[0], rows[1] - held_rows[0]
    packed, views = _kv_buffer(k, v, b - a)
    views[0].copy_(hk[:, a:b])
    views[1].copy_(hv[:, a:b])
    return packed, views


def _kv_hop(plan: RingPlan, held, held_rows, src: int, step: int, world: int, k, v, nxt: int,
            prv: int, sends: list, recvs: list):
    """The K/V traffic of step `step` (holding `src`'s rows `held_rows`): the rows of
    `src` a later rank sees go to `nxt`, and the rows of the next source this rank or a
    later one sees come from `prv`. Appends to `sends`/`recvs`; returns the receive buffer
    `(storage, views)` and its rows, or `(None, None)`."""
    if step >= world - 1:
        return None, None
    out_rows = plan.carries(src, step + 1)
    if out_rows is not None:
        sends.append((_rows_to_send(held, held_rows, out_rows, k, v)[0], nxt))
    in_rows = plan.carries((src - 1) % world, step + 1)
    if in_rows is None:
        return None, None
    incoming = _kv_buffer(k, v, in_rows[1] - in_rows[0])
    recvs.append((incoming[0], prv))
    return incoming, in_rows


def _rows_buffer(k, v, rows: Tuple[int, int], acc):
    """(storage, views) of the dK/dV of a source's key rows `rows`, in `acc`."""
    return _kv_buffer(k, v, rows[1] - rows[0], dtype=acc)


def _ring_forward(q, k, v, layout: SeqLayout, causal, scale: float, backend: str,
                  ring_op: str = "ring.forward.kv"):
    """q in any layout (the kernel's is fastest); returns (out [B, n, H, Dv] contiguous, acc
    dtype; lse [B, H, n] acc dtype).
    `causal`: a bool or a `layout.Mask`; only the K/V rows that a later rank sees travel."""
    rank, world = layout.rank, layout.world_size
    fwd, _ = block_kernels.kernels(backend, q, k)
    merge = block_kernels.merge_kernel(backend)
    acc = block_kernels.acc_dtype(q.dtype)
    b, nq, h, _ = q.shape
    # the caller's [B, n, H, Dv]-contiguous layout: with fp32 inputs the accumulator is the
    # output itself (returned and saved, no copy); the merges take any strides
    out = torch.empty((b, nq, h, v.shape[3]), dtype=acc, device=q.device)
    # lse accumulates in fp64: it is only [B, H, n], and each merge would otherwise round
    # it by an ulp of |lse|, an error that saturated softmax rows amplify in the gradients
    lse = torch.empty((b, h, nq), dtype=torch.float64, device=q.device)
    empty = True  # nothing written yet: the first block covering every row is copied, not merged
    plan = ring_plan(layout, causal)
    held, held_rows = (None, (k, v)), plan.spans[rank][0]
    nxt, prv = layout.peer((rank + 1) % world), layout.peer((rank - 1) % world)
    for step in range(world):
        src = (rank - step) % world
        sends, recvs = [], []
        incoming, in_rows = _kv_hop(plan, held, held_rows, src, step, world, k, v, nxt, prv, sends, recvs)
        exchange = p2p.post(sends, recvs, layout.group, op=ring_op) if sends or recvs else None
        blocks = visible_blocks(layout, rank, src, causal)
        if blocks:
            kv = held[1]
            empty = attend_blocks(fwd, q, kv[0], kv[1], held_blocks(blocks, held_rows), scale, out, lse,
                                  fresh=empty, merge=merge)
        if exchange is not None:
            exchange.wait()
        if incoming is not None:
            held, held_rows = incoming, in_rows
    if empty:  # no block at all (no rows): keep the -inf/0 convention
        out.zero_()
        lse.fill_(float("-inf"))
    return out, lse.to(acc)


def _ring_backward(do, q, k, v, out, lse, layout: SeqLayout, causal, scale: float, backend: str,
                   ring_op: str = "ring.backward"):
    """do, q, out in any layout; returns dq, dk, dv, `[B, n, H, D]`-contiguous in the acc
    dtype (with fp32 inputs they are the gradients themselves, no copy).

    The K/V travel as in the forward. This rank's own blocks (step 0) add straight into
    its dK/dV; from step 1 the dK/dV of a source's keys accumulate over rows `spans[s][1]`
    along the ring, one step behind the K/V, and the last rank to see them sends them home,
    where they are added. The dK/dV go in their own batch of exchanges, posted just before
    the K/V's: a step adds its blocks into the partial dK/dV arriving from the previous rank,
    waiting for it after its first tile's kernel (`attend_blocks_backward(ready=)`), rather
    than into a fresh buffer held beside it; the partial sent on is then freed too."""
    rank, world = layout.rank, layout.world_size
    _, bwd = block_kernels.kernels(backend, q, k)
    acc = block_kernels.acc_dtype(q.dtype)
    plan = ring_plan(layout, causal)
    nxt, prv = layout.peer((rank + 1) % world), layout.peer((rank - 1) % world)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    home = (torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device))
    held, held_rows = (None, (k, v)), plan.spans[rank][0]
    travelling = None  # (storage, views) of the dK/dV computed at the previous step
    for step in range(world + 1):
        src = (rank - step) % world
        before = (src + 1) % world  # the source of the previous step
        grad_sends, grad_recvs = [], []
        incoming_dkv = returning = None
        if travelling is not None:
            if step <= plan.hops[before]:  # on to the rank that holds `before`'s K/V now
                grad_sends.append((travelling[0], nxt))
            else:  # no later rank sees them: home
                grad_sends.append((travelling[0], layout.peer(before)))
        if 2 <= step < world and step <= plan.hops[src]:
            incoming_dkv = _rows_buffer(k, v, plan.spans[src][1], acc)
            grad_recvs.append((incoming_dkv[0], prv))
        if plan.hops[rank] >= 1 and step == plan.hops[rank] + 1:
            returning = _rows_buffer(k, v, plan.spans[rank][1], acc)
            grad_recvs.append((returning[0], layout.peer((rank + plan.hops[rank]) % world)))
        # the dK/dV first: this step waits for them after one tile, and a backend that runs
        # its batches in order on one stream (NCCL) must not put the K/V, needed only at the
        # step's end, before them
        grad_exchange = (p2p.post(grad_sends, grad_recvs, layout.group, op=ring_op)
                         if grad_sends or grad_recvs else None)
        del grad_sends, grad_recvs
        sends, recvs = [], []
        incoming, in_rows = _kv_hop(plan, held, held_rows, src, step, world, k, v, nxt, prv, sends, recvs)
        kv_exchange = p2p.post(sends, recvs, layout.group, op=ring_op) if sends or recvs else None
        del sends
        travelling = None

        def arrived():
            """Wait for this step's dK/dV traffic; the partial sent on is released."""
            nonlocal grad_exchange
            if grad_exchange is not None:
                grad_exchange.wait()
                grad_exchange = None

        if step < world and (step == 0 or step <= plan.hops[src]):
            blocks = visible_blocks(layout, rank, src, causal)
            ready = None
            if step == 0:
                dkv = home
            else:
                first = plan.spans[src][1][0]
                a, b = held_rows[0] - first, held_rows[1] - first  # the rows of the held K/V
                if incoming_dkv is None:
                    storage, views = _rows_buffer(k, v, plan.spans[src][1], acc)
                    storage.zero_()
                    travelling = (storage, views)
                    dkv = (views[0][:, a:b], views[1][:, a:b])
                else:
                    travelling, dkv = incoming_dkv, None

                    def ready():
                        arrived()
                        return travelling[1][0][:, a:b], travelling[1][1][:, a:b]
            if blocks:
                kv = held[1]
                attend_blocks_backward(bwd, held_blocks(blocks, held_rows), do, q, kv[0], kv[1], out, lse, scale,
                                       dq, *(dkv or (None, None)), ready=ready)
        arrived()
        if kv_exchange is not None:
            kv_exchange.wait()
        if returning is not None:
            a, b = plan.spans[rank][1]
            home[0][:, a:b] += returning[1][0]
            home[1][:, a:b] += returning[1][1]
        if incoming is not None:
            held, held_rows = incoming, in_rows
    return dq, home[0], home[1]


def analytic_bytes(layout: SeqLayout, batch: int, heads: int, kv_heads: int, head_dim: int,
                   element_size: int, value_dim: Optional[int] = None, causal: bool = False,
                   window_size: Tuple[int, int] = (-1, -1), **options) -> Dict[str, int]:
    """Bytes this rank sends (and receives) in the forward and the backward, exactly, for
    the mask `causal`/`window_size` and the layout's documents (`RingPlan`; `value_dim`:
    v's head dim, None for head_dim)."""
    rank, world = layout.rank, layout.world_size
    plan = ring_plan(layout, Mask(bool(causal), tuple(window_size)))
    per_token = batch * kv_heads * (head_dim + (head_dim if value_dim is None else value_dim))
    acc_size = 8 if element_size == 8 else 4  # gradients travel in fp32 (fp64 for fp64 inputs)
    kv_rows = 0
    for step in range(world - 1):
        rows = plan.carries((rank - step) % world, step + 1)
        kv_rows += 0 if rows is None else rows[1] - rows[0]
    # dK/dV: every rank r' = s+t (1 <= t <= hops[s]) that holds s's keys sends spans[s][1] on
    grad_rows = sum(plan.spans[s][1][1] - plan.spans[s][1][0] for s in range(world)
                    if 1 <= (rank - s) % world <= plan.hops[s])
    fwd = kv_rows * per_token * element_size
    return {"forward": fwd, "backward": fwd + grad_rows * per_token * acc_size}



# -- for the planner (seqpar.planner): schedule, memory, candidates ----------------------------


def ring_phase(line, prob, topo, ring_layout, heads: int, fwd_bytes: float, grad_bytes: float, level: str,
               backward: bool) -> None:
    """Add one pass of ring attention over `ring_layout` (R members, `heads` query heads
    per member) to the timeline `line`: each step takes the busiest member's blocks while
    the next K/V exchange (and, backward, the previous step's dK/dV) flies."""
    from ..planner.schedule import BACKWARD_FLOPS, FORWARD_FLOPS, block_time, visible_elements

    size = ring_layout.world_size
    visible = visible_elements(ring_layout, prob.mask)
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
    """Inputs and output, plus every buffer the loops hold at their fullest step.

    Saved: the lse (q is the input and the saved output is the returned one). Forward: the
    fp32 output accumulator (the output itself for fp32 inputs),
    the fp64 lse, this rank's K/V packed to travel and the incoming K/V. Backward: dO, the
    fp32 dQ, dK and dV, the held and incoming K/V, the partial dK/dV on its way out and the
    one arriving that this step adds into (P = 2: the other rank's K/V and one partial), and
    one backward tile's fresh gradients and kernel workspace (`common.backward_tile_bytes`)."""
    from .common import backward_tile_bytes

    b, h, hkv, d, n = prob.batch, prob.heads, prob.kv_heads, prob.head_dim, prob.longest_local
    e, a = prob.element_size, prob.acc_size
    rows, lse, kv = b * n * h * d, b * h * n, 2 * b * n * hkv * d
    saved = lse * a
    fwd = (rows * a if a != e else 0) + lse * 8 + 2 * kv * e
    # P = 2: one foreign step, holding the other rank's K/V with nothing arriving, and one partial
    travelling = (2 * kv * e + 2 * kv * a) if prob.world_size >= 3 else (kv * e + kv * a)
    bwd = rows * e + rows * a + kv * a + travelling + backward_tile_bytes(b, n, h, hkv, d, a, element_size=e)
    return prob.peak(saved, fwd, bwd)


def candidates(prob):
    return [{}]

class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, layout, causal, scale, backend):
        # the forward reads q once per step: a q whose head dim is strided, which each fused
        # block would copy, is copied once; the backward takes q as given, so no copy is kept
        out, lse = fold_sinks(*_ring_forward(unit_stride(q), k, v, layout, causal, scale, backend), sinks)
        result = out.to(q.dtype)  # [B, n, H, Dv]-contiguous; with fp32 inputs the accumulator itself
        # with sinks the backward's rowsum(dO * O) cancels against dO . v: keep O unrounded
        ctx.save_for_backward(q, k, v, out if sinks is not None else result, lse, sinks)
        ctx.args = (layout, causal, scale, backend)
        return result

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        layout, causal, scale, backend = ctx.args
        if do.stride(-1) != 1 or 0 in do.stride():  # e.g. an expanded gradient: one copy
            do = do.contiguous()
        dq, dk, dv = _ring_backward(do, q, k, v, out, lse, layout, causal, scale, backend)
        dsinks = sinks_grad(do, out, lse, sinks) if sinks is not None and ctx.needs_input_grad[3] else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks, None, None, None, None


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
