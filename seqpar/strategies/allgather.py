"""All-gather KV (the llama3 context-parallel approach): gather K/V, attend locally.

Every rank gathers K and V (with H_kv heads) from every other rank, then attends its own
queries to every rank's keys: one block call per (source rank, visible block) from
`layout.visible_blocks`, merged with the one merge, so masks follow global positions for
every scheme. The gather sends each peer only the rows of the keys its queries see, from
the first to the last, one message per pair (batched point-to-point on every backend):
all of them without a mask, half of a lower rank's rows under a causal zigzag layout, a
window's worth next to a sliding window, nothing between documents that do not meet.

The backward gathers K/V again (nothing of size N is kept between the passes) and returns
the fp32 dK/dV of each other rank's keys, over the same rows, to their owner in P-1
rounds of paired exchanges (round j: to rank+j, from rank-j), each posted as soon as
those gradients are computed, so the return flies while the next source's blocks
compute, and no rank holds every rank's dK/dV at once. A pair whose queries see none of
the keys (causal contiguous shards, windows, documents) sends nothing either way.

Each pass attends to the rank's own keys first, while the gather flies. `kv_head_chunk=c`
processes the KV heads c at a time (with their G query heads each): peak memory for
gathered K/V is `2 B N c D` instead of `2 B N H_kv D`, and the gather of the next chunk is
posted as soon as the current one has landed.

Volume per rank (`n_max` the longest local length, `e` the element size; `m_(r,s)` the
rows of rank s's keys from the first rank r's queries see to the last, 0 if none):
    forward:  sum over r != rank of 2 B m_(r,rank) H_kv D e
                                                     (K, V to each peer; at most
                                                      (P-1) 2 B n_max H_kv D e)
    backward: the same gather again
            + sum over s != rank of 2 B m_(rank,s) H_kv D 4
                                                     (dK, dV in fp32, 8 bytes for fp64
                                                      inputs, of the rows this rank saw;
                                                      at most (P-1) 2 B n_max H_kv D 4)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..comm import collectives, p2p
from ..errors import brief
from ..kernels import block as block_kernels
from ..kernels.memory import unit_stride
from ..layout import Mask, SeqLayout, visible_blocks
from ..registry import Strategy, register, run
from .common import attend_blocks, attend_blocks_backward, held_blocks, saved_output_function, seen_span


def _chunks(kv_heads: int, chunk: Optional[int]):
    step = kv_heads if chunk is None else chunk
    return [(a, min(kv_heads, a + step)) for a in range(0, kv_heads, step)]


class _Gather:
    """K/V of one KV-head chunk from every other rank, posted now, waited on by `result()`.

    Rank s sends rank r only the rows of its keys that r's queries see, from the first to
    the last (`_seen_rows`; all of them without a mask): one message per pair, straight from
    one packed buffer of the rows any peer sees; a pair that sees nothing sends nothing."""

    def __init__(self, k, v, heads, layout: SeqLayout, mask, op: str):
        a, b = heads
        rank, world = layout.rank, layout.world_size
        self.d = k.shape[3]
        width = (k.shape[0], b - a, self.d + v.shape[3])
        # what this rank's queries see of each source, and what each peer sees of this rank
        self.seen = [None if s == rank else _seen_rows(layout, rank, s, mask) for s in range(world)]
        # per peer that sees any of this rank's keys, those rows: what it gets, and (in the
        # backward) the rows whose dK/dV it returns
        self.sent = _peers_seeing(layout, rank, mask)
        sends = []
        if self.sent:
            lo, hi = _hull(self.sent.values())
            # [rows, B, c, D + Dv]: each token's K then V (their head dims may differ), one
            # copy each straight into the message; a peer's rows are a contiguous slice
            local = k.new_empty(hi - lo, *width)
            local[..., :self.d].copy_(k[:, lo:hi, a:b].transpose(0, 1))
            local[..., self.d:].copy_(v[:, lo:hi, a:b].transpose(0, 1))
            sends = [(local[first - lo:end - lo], r) for r, (first, end) in self.sent.items()]
            del local
        self.buffers = [None if rows is None else k.new_empty(rows[1] - rows[0], *width) for rows in self.seen]
        recvs = [(buf, s) for s, buf in enumerate(self.buffers) if buf is not None]
        self.handle = (p2p.post(sends, recvs, layout.group, op, tag=collectives.GATHER_TAG, what="K/V gather")
                       if sends or recvs else None)
        self.on_arrival = None  # called once, when the gather has landed

    def result(self) -> Optional[List[Optional[Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]]]]:
        """Per source rank, (K `[B, m, c, D]`, V `[B, m, c, Dv]`, their local rows `(first,
        end)`) (views) of the m rows this rank sees, or None (this rank, and a rank it sees
        none of). The first call hands the buffers over (the gather keeps no reference, so
        they are freed with the caller's views); later calls only wait and return None."""
        if self.handle is not None:
            self.handle.wait()
            self.handle = None
        if self.on_arrival is not None:
            then, self.on_arrival = self.on_arrival, None
            then()
        if self.buffers is None:
            return None
        buffers, self.buffers = self.buffers, None
        return [None if buf is None else (buf[..., :self.d].transpose(0, 1), buf[..., self.d:].transpose(0, 1), rows)
                for buf, rows in zip(buffers, self.seen)]


def _gathered(k, v, layout: SeqLayout, mask, chunk, op: str):
    """Yield (first KV head, end, its posted `_Gather`) per chunk; the next chunk's gather is
    posted as soon as the current one has landed (one gather in flight at a time), so it
    flies while the rest of this chunk and the next chunk's own keys compute."""
    chunks = _chunks(k.shape[2], chunk)
    posted = {0: _Gather(k, v, chunks[0], layout, mask, op)}

    def post(i):
        posted[i] = _Gather(k, v, chunks[i], layout, mask, op)

    for i, (a, end) in enumerate(chunks):
        current = posted.pop(i)
        if i + 1 < len(chunks):
            current.on_arrival = lambda i=i: post(i + 1)
        yield a, end, current
        current.result()  # a caller that never asked still posts the next gather
        del current


def _forward(q, k, v, layout: SeqLayout, causal, scale, backend, chunk):
    rank = layout.rank
    # every block reads q: a q whose head dim is strided, which each fused block would
    # copy, is copied once (kept only here)
    q = unit_stride(q)
    fwd, _ = block_kernels.kernels(backend, q, k)
    merge = block_kernels.merge_kernel(backend)
    acc = block_kernels.acc_dtype(q.dtype)
    b, nq, h, _ = q.shape
    group = h // k.shape[2]
    out = torch.zeros(b, nq, h, v.shape[3], dtype=acc, device=q.device)
    lse = torch.full((b, h, nq), float("-inf"), dtype=torch.float64, device=q.device)
    for a, c_end, gather in _gathered(k, v, layout, causal, chunk, "allgather.forward.kv"):
        heads = slice(a * group, c_end * group)
        q_c, out_c, lse_c = q[:, :, heads], out[:, :, heads], lse[:, heads]
        # this rank's own keys first: they need no gather, which flies meanwhile
        attend_blocks(fwd, q_c, k[:, :, a:c_end], v[:, :, a:c_end], visible_blocks(layout, rank, rank, causal),
                      scale, out_c, lse_c, merge=merge)
        for src, kv in enumerate(gather.result()):
            if kv is not None:
                k_src, v_src, held = kv
                attend_blocks(fwd, q_c, k_src, v_src, held_blocks(visible_blocks(layout, rank, src, causal), held),
                              scale, out_c, lse_c, merge=merge)
    return out, lse.to(acc)


def _backward(do, q, k, v, out, lse, layout: SeqLayout, causal, scale, backend, chunk):
    rank, world = layout.rank, layout.world_size
    _, bwd = block_kernels.kernels(backend, q, k)
    acc = block_kernels.acc_dtype(q.dtype)
    group = q.shape[2] // k.shape[2]
    d = k.shape[3]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = dv = None  # made once the first chunk's gathered K/V and gradients are freed (`_Gather.result`)
    for a, c_end, gather in _gathered(k, v, layout, causal, chunk, "allgather.backward.kv"):
        heads = slice(a * group, c_end * group)
        rows = (do[:, :, heads], q[:, :, heads])
        tail = (out[:, :, heads], lse[:, heads], scale, dq[:, :, heads])

        def attend(blocks, k_src, v_src, grads):
            # grads is [rows, B, c, D + Dv]: its K and V parts as [B, rows, c, D or Dv] views
            attend_blocks_backward(bwd, blocks, *rows, k_src, v_src, *tail, grads[..., :d].transpose(0, 1),
                                   grads[..., d:].transpose(0, 1))

        # own keys first, while the gather flies
        width = (k.shape[0], c_end - a, d + v.shape[3])
        mine = torch.zeros(layout.local_len, *width, dtype=acc, device=q.device)
        attend(visible_blocks(layout, rank, rank, causal), k[:, :, a:c_end], v[:, :, a:c_end], mine)
        kvs = gather.result()
        # then rank+1's keys, rank+2's, ...: round j sends the gradients of rank+j's keys to it
        # and receives rank-j's for this rank's keys (both sides skip a pair whose queries see
        # none of the keys), while round j+1 computes; at most two rounds are in flight
        flying = []
        for j in range(1, world):
            src, frm = (rank + j) % world, (rank - j) % world
            sends, recvs = [], []
            if kvs[src] is not None:  # the rows `_seen_rows(layout, rank, src)`, which src expects back
                k_src, v_src, held = kvs[src]
                grads = torch.zeros(k_src.shape[1], *width, dtype=acc, device=q.device)
                attend(held_blocks(visible_blocks(layout, rank, src, causal), held), k_src, v_src, grads)
                sends.append((grads, src))
                del grads, k_src, v_src
            seen = gather.sent.get(frm)  # the rows of this rank's keys it sent rank frm
            if seen is not None:
                recvs.append((torch.empty(seen[1] - seen[0], *width, dtype=acc, device=q.device), frm))
            if sends or recvs:
                flying.append((p2p.post(sends, recvs, layout.group, op="allgather.backward.dkv"), seen))
            del sends, recvs
            if len(flying) > 1:
                _add_returned(mine, *flying.pop(0))
        for exchange, seen in flying:
            _add_returned(mine, exchange, seen)
        del flying, kvs
        if dk is None:
            dk = torch.empty(k.shape, dtype=acc, device=q.device)
            dv = torch.empty(v.shape, dtype=acc, device=q.device)
        dk[:, :, a:c_end] = mine[..., :d].transpose(0, 1)
        dv[:, :, a:c_end] = mine[..., d:].transpose(0, 1)
    return dq, dk, dv


def _seen_rows(layout, q_rank: int, k_rank: int, causal) -> Optional[Tuple[int, int]]:
    """The rows `(first, end)` of `k_rank`'s keys that some query of `q_rank` sees, from the
    first to the last, or None when it sees none (every rank derives the same): the rows
    `k_rank` sends `q_rank` and `q_rank` returns dK/dV of."""
    return seen_span(visible_blocks(layout, q_rank, k_rank, causal))


def _peers_seeing(layout, rank: int, causal) -> Dict[int, Tuple[int, int]]:
    """Per other rank that sees some of `rank`'s keys, the rows it sees (`_seen_rows`)."""
    seen = {r: _seen_rows(layout, r, rank, causal) for r in range(layout.world_size) if r != rank}
    return {r: rows for r, rows in seen.items() if rows is not None}


def _hull(spans) -> Tuple[int, int]:
    """`(first, end)` over row spans `(a, b)` (at least one)."""
    spans = list(spans)
    return min(a for a, _ in spans), max(b for _, b in spans)


def _add_returned(mine, exchange, seen) -> None:
    """Wait for one round's dK/dV exchange and add what came back into rows `seen` of `mine`."""
    for part in exchange.wait():
        mine[seen[0]:seen[1]] += part


AllGatherAttention = saved_output_function("AllGatherAttention", _forward, _backward)


def analytic_bytes(layout: SeqLayout, batch: int, heads: int, kv_heads: int, head_dim: int,
                   element_size: int, value_dim: Optional[int] = None, causal: bool = False,
                   window_size: Tuple[int, int] = (-1, -1), **options) -> Dict[str, int]:
    """Bytes this rank sends in one forward and one backward, exactly (`value_dim`: v's head
    dim, None for head_dim; the mask `causal`/`window_size` and the layout's documents decide
    which rows of its keys each peer sees, and which rows of each peer's keys it sees and
    returns gradients of)."""
    rank, world = layout.rank, layout.world_size
    per_token = batch * kv_heads * (head_dim + (head_dim if value_dim is None else value_dim))
    mask = Mask(bool(causal), tuple(window_size))
    grads = 8 if element_size == 8 else 4

    def rows(pairs):
        return sum(b - a for a, b in filter(None, pairs))

    gathered = rows(_peers_seeing(layout, rank, mask).values()) * per_token * element_size
    returned = rows(_seen_rows(layout, rank, s, mask) for s in range(world) if s != rank) * per_token * grads
    return {"forward": gathered, "backward": gathered + returned}


@dataclass(frozen=True)
class Options:
    """`kv_head_chunk` c: gather and process c KV heads at a time; None means all at once."""
    kv_head_chunk: Optional[int] = None

    def __post_init__(self):
        chunk = self.kv_head_chunk
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"kv_head_chunk: expected a positive int or None, got {brief(chunk)}")

    def resolve(self, q, k, v, layout) -> "Options":
        return self



# -- for the planner (seqpar.planner): schedule, memory, candidates ----------------------------


def cost(prob, topo, options):
    """(timeline, busiest rank's bytes): the first gather hides behind the rank's own keys'
    blocks, each next chunk's behind the current chunk's; the dK/dV return in P-1 rounds
    that fly while the next source computes, the last round exposed."""
    import math

    from ..planner.schedule import BACKWARD_FLOPS, FORWARD_FLOPS, Timeline, busiest_bytes, visible_elements
    from ..planner.topology import steps

    nbytes = busiest_bytes(prob, analytic_bytes, options)
    chunk = options.get("kv_head_chunk") or prob.kv_heads
    chunks = math.ceil(prob.kv_heads / chunk)
    world = prob.world_size
    level = topo.level(range(world))
    visible = visible_elements(prob.layout(), prob.mask)
    per = prob.batch * prob.heads * prob.head_dim
    calls = (visible > 0).sum(1).double()
    fwd_work = float((visible.sum(1).double() * FORWARD_FLOPS * per / topo.compute_rate
                      + calls * topo.kernel_overhead * chunks).max()) / chunks
    bwd_work = float((visible.sum(1).double() * BACKWARD_FLOPS * per / topo.backward_rate
                      + calls * topo.kernel_overhead * chunks).max()) / chunks
    own = visible.diagonal().double()
    own_fwd = float((own * FORWARD_FLOPS * per / topo.compute_rate + (own > 0) * topo.kernel_overhead).max()) / chunks
    own_bwd = float((own * BACKWARD_FLOPS * per / topo.backward_rate + (own > 0) * topo.kernel_overhead).max()) / chunks
    gather = topo.transfer(level, "allgather", world, nbytes["forward"] / chunks)
    msgs = steps("allgather", world)
    line = Timeline(topo.overlap)

    def gathered_pass(work: float, own_work: float, scatter: float) -> None:
        line.overlap(own_work, gather, msgs)  # the first chunk's gather flies while the own keys compute
        for i in range(chunks):
            last = i + 1 == chunks
            # the rest of this chunk and the next chunk's own keys, while the next chunk's gather flies
            line.overlap(work - own_work + (0.0 if last else own_work), 0.0 if last else gather, 0 if last else msgs)
            if scatter:
                line.wait(scatter, 1)

    gathered_pass(fwd_work, own_fwd, 0.0)
    if prob.training:
        # the last of the P-1 rounds of dK/dV is exposed, the others fly behind blocks
        last_round = topo.transfer(level, "p2p", world, (nbytes["backward"] - nbytes["forward"]) / chunks
                                   / max(1, world - 1))
        gathered_pass(bwd_work, own_bwd, last_round)
    return line, nbytes


def _gathered_rows(prob) -> int:
    """The most K/V rows any rank holds of other ranks' keys during a gather: its message
    (the rows any peer sees of its keys) and what it receives (the rows it sees of each)."""
    most = 0
    for r in prob.ranks():
        layout = prob.layout(r)
        sent = _peers_seeing(layout, r, prob.mask)
        lo, hi = _hull(sent.values()) if sent else (0, 0)
        message = hi - lo
        seen = (_seen_rows(layout, r, s, prob.mask) for s in range(prob.world_size) if s != r)
        most = max(most, message + sum(b - a for a, b in filter(None, seen)))
    return most


def peak_memory(prob, options) -> int:
    """Inputs and output, plus every buffer of the fullest moment of the backward: dO and
    the fp32 dQ (and with several chunks the fp32 dK, dV, made at the first chunk's end),
    then the largest of three phases, the first two with one backward tile
    (`common.backward_tile_bytes`). While the gather lands and the own keys compute: one
    chunk's gathered K/V (the rows this rank's message holds and the rows it receives,
    `_gathered_rows`; the own keys are the input) and the own keys' fp32 dK/dV. During the
    rounds that return dK/dV: the gathered chunk, the own keys' dK/dV, the gradients being
    computed and the previous round's outgoing and incoming ones (P = 2: one round; each
    counted at the full local length), and with several chunks the next chunk's gather.
    At a chunk's end: its dK/dV and the fp32 dK, dV they are copied into."""
    from .common import backward_tile_bytes

    b, h, hkv, d, n = prob.batch, prob.heads, prob.kv_heads, prob.head_dim, prob.longest_local
    e, a, world = prob.element_size, prob.acc_size, prob.world_size
    rows, lse = b * n * h * d, b * h * n
    chunk = min(options.get("kv_head_chunk") or hkv, hkv)
    one = 2 * b * _gathered_rows(prob) * chunk * d * e  # a chunk's K/V: message and received
    following = one if chunk < hkv else 0  # the next chunk's gather in flight
    grads = 2 * b * n * chunk * d * a  # one rank's fp32 dK/dV of a chunk
    tile = backward_tile_bytes(b, n, chunk * (h // hkv), chunk, d, a, element_size=e)
    saved = lse * a  # q is the input, the saved output the returned one
    fwd = one + following + (rows * a if a != e else 0) + lse * 8  # out (fp32 when the inputs are not), lse
    landing = one + grads + tile
    rounds = one + following + grads * (4 if world >= 3 else 2) + tile
    dkv = 2 * b * n * hkv * d * a
    bwd = rows * e + rows * a + (dkv if chunk < hkv else 0) + max(landing, rounds, grads + (dkv if chunk == hkv else 0))
    return prob.peak(saved, fwd, bwd)


def candidates(prob):
    """All KV heads at once, and (when there are several) one at a time: the least memory."""
    return [{}] + ([{"kv_head_chunk": 1}] if prob.kv_heads > 1 else [])

def _apply(q, k, v, layout, causal, scale, backend, options: Options, sinks=None):
    args = (layout, causal, scale, backend, options.kv_head_chunk)
    return AllGatherAttention.apply(q, k, v, sinks, args)


def allgather_attention(q, k, v, *, layout=None, causal=False, softmax_scale=None, backend="auto",
                        kv_head_chunk: Optional[int] = None, **options):
    """Exact attention by gathering K/V (llama3 CP); dK/dV return to their owners.

    Each rank receives from each peer only the rows of its keys that its queries see
    (first to last: everything without a mask, a window's worth next to a sliding window)
    and returns the dK/dV of those rows. `q` `[B, S/P, H, D]`, `k`/`v` `[B, S/P, H_kv, D]`
    of `layout` (any scheme, uneven lengths). `kv_head_chunk`: gather and process this many
    KV heads at a time to bound peak memory (default: all at once). Returns
    `[B, S/P, H, D]` in the input dtype.
    """
    return run("allgather", q, k, v, layout=layout, causal=causal, softmax_scale=softmax_scale,
                        backend=backend, kv_head_chunk=kv_head_chunk, **options)


register(Strategy("allgather", _apply, analytic_bytes, Options, cost=cost, peak_memory=peak_memory,
                  candidates=candidates))
