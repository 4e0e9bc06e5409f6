"""TokenRing (arXiv 2412.20501): K/V stay, queries travel, partial outputs come back.

Rank r keeps its K/V. Its queries visit every other rank; each visited rank attends them to
its own K/V and returns the partial `(out, lse)`, which r merges with the one merge. Queries
go one way round the ring while partials come the other way, so both directions of each
link carry traffic. Only the query rows that the receiver (or, when relayed, some rank
further on) can see are sent, and fully masked blocks are never computed. For causal
contiguous layouts that removes most traffic to earlier ranks; for zigzag the receivers
before the wrap need only the second chunk.

Routes (`route=`):
- "direct" (default; full-mesh links such as NVSwitch, as in the paper): at step t rank r
  sends its rows to r+t and gets the partial straight back from r+t. The return of step t
  is posted with the queries of step t+1, so it overlaps the next block's compute.
- "ring" (ring-only links): queries are relayed hop by hop; the partials for the queries
  of rank s start at the last rank they visit (s-1) and travel back along the reverse
  ring, each rank merging its own partial into them as they pass. They reach s P-1 hops
  after the last compute step; each rank holds its partials until their stream passes.
  The partial outputs travel in fp32 on this route (in the input dtype on the direct one):
  a stream merged and re-sent at every hop would be rounded P-1 times.

Backward: K/V and so dK/dV stay on their owner (accumulated in fp32). q, dO, out and lse
travel by the same route, with out in place of rowsum(dO * O) because the fused backward
ops derive that term from out themselves. Partial dQ (fp32) returns to the owner.

Volume per rank per direction (`m(s->r)` = rows of s's queries sent towards r, e = element
size, a = 4 for fp32 lse/dQ, 8 for fp64 inputs), direct route:
    forward:  out-going  sum_t B m(r -> r+t) H D e            (queries)
              returning  sum_t B m(r-t -> r) H (D e + a)      (partial out, lse)
    backward: out-going  sum_t B m(r -> r+t) H (3 D e + a)    (q, dO, out, lse)
              returning  sum_t B m(r-t -> r) H D a            (partial dQ)
Ring's K/V volume is `2 B n H_kv D` per hop: with MHA TokenRing sends about half of that
each way and uses both directions; with GQA (H = G H_kv) its queries alone are G/2 times
ring's traffic, so ring wins. On the relayed route the returning partial out counts
`D a` instead of `D e`. `analytic_bytes` gives exact numbers for a layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import torch

from ..comm import p2p
from ..errors import brief
from ..kernels import block as block_kernels
from ..layout import Block, SeqLayout, visible_blocks
from ..registry import Strategy, register, run
from .common import attend_blocks, attend_blocks_backward, saved_output_function

ROUTES = ("direct", "ring")
Ranges = List[Tuple[int, int]]


# -- which rows travel ------------------------------------------------------------------

def _rows(layout: SeqLayout, q_rank: int, k_ranks: Sequence[int], causal: bool) -> Ranges:
    """Merged, sorted (start, length) ranges of q_rank's rows seen by any of `k_ranks`."""
    spans = sorted(
        (blk.q_start, blk.q_start + blk.q_len) for kr in k_ranks for blk in visible_blocks(layout, q_rank, kr, causal)
    )
    merged: List[List[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b - a) for a, b in merged]


def _count(ranges: Ranges) -> int:
    return sum(n for _, n in ranges)


def _pack(x: torch.Tensor, ranges: Ranges, dim: int) -> torch.Tensor:
    if not ranges:
        return x.narrow(dim, 0, 0).contiguous()
    pieces = [x.narrow(dim, a, n) for a, n in ranges]
    return torch.cat(pieces, dim) if len(pieces) != 1 else pieces[0].contiguous()


def _repack(x: torch.Tensor, have: Ranges, keep: Ranges, dim: int) -> torch.Tensor:
    """Rows `keep` (a subset of `have`) of a tensor packed as `have`."""
    return _pack(x, [(_packed_index(have, a), n) for a, n in keep], dim)


def _packed_index(ranges: Ranges, row: int) -> int:
    offset = 0
    for a, n in ranges:
        if a <= row < a + n:
            return offset + row - a
        offset += n
    raise AssertionError(f"row {row} is not in {ranges}")


def _blocks_in(layout, q_rank, k_rank, causal, ranges: Ranges) -> List[Block]:
    """visible_blocks with query rows renumbered into the packed rows `ranges`."""
    return [
        Block(_packed_index(ranges, blk.q_start), blk.q_len, blk.k_start, blk.k_len, blk.offset)
        for blk in visible_blocks(layout, q_rank, k_rank, causal)
    ]


def _scatter_merge(merge, out, lse, part_out, part_lse, ranges: Ranges) -> None:
    offset = 0
    for a, n in ranges:
        merge(out[:, a:a + n], lse[:, :, a:a + n], part_out[:, offset:offset + n], part_lse[:, :, offset:offset + n])
        offset += n


def _scatter_add(dq, part, ranges: Ranges) -> None:
    offset = 0
    for a, n in ranges:
        dq[:, a:a + n] += part[:, offset:offset + n]
        offset += n


class _Plan:
    """Rows sent at every step of a route, for every (owner, receiver) pair."""

    def __init__(self, layout: SeqLayout, causal: bool, route: str):
        world = layout.world_size
        self.layout, self.causal, self.route = layout, causal, route
        # rows[s][t]: rows of s's queries on the wire towards step t's receiver s+t
        self.rows = []
        for s in range(world):
            per_step = [[(0, layout.local_len_of(s))]]
            for t in range(1, world):
                receivers = [(s + t) % world] if route == "direct" else [(s + j) % world for j in range(t, world)]
                per_step.append(_rows(layout, s, receivers, causal))
            self.rows.append(per_step)


# -- forward ---------------------------------------------------------------------------

def _attend(fwd, merge, q_rows, k, v, blocks, scale, acc, lse_dtype):
    b, m, h, d = q_rows.shape
    out = torch.zeros(b, m, h, d, dtype=acc, device=q_rows.device)
    lse = torch.full((b, h, m), float("-inf"), dtype=lse_dtype, device=q_rows.device)
    attend_blocks(fwd, q_rows, k, v, blocks, scale, out, lse, merge=merge)
    return out, lse


def _select(x: torch.Tensor, dim: int, ranges: Ranges) -> torch.Tensor:
    return _pack(x, ranges, dim)


def _travel(layout: SeqLayout, plan: "_Plan", payload, results, compute, absorb, combine, op: str) -> None:
    """Move this rank's rows to the others and their results back, by `plan.route`.

    payload:  [(tensor, row_dim)] of this rank's rows (sent as the rows each receiver needs)
    results:  [(row_dim, make_buffer(n_rows))] describing what `compute` returns
    compute(src, t, tensors) -> result tensors over rows `plan.rows[src][t]`
    absorb(results, ranges): fold results for this rank's rows `ranges` into its accumulators
    combine(kept, incoming, rows_kept, rows_incoming): fold a passing stream into a kept result
    """
    rank, world = layout.rank, layout.world_size
    rows = plan.rows

    def pack_rows(tensors, have, keep):
        return [_select(x, dim, [(_packed_index(have, a), n) for a, n in keep]) for x, (_, dim) in zip(tensors, payload)]

    def buffers_like_payload(n):
        return [x.new_empty(tuple(n if i == dim else size for i, size in enumerate(x.shape))) for x, dim in payload]

    def result_buffers(n):
        return [make(n) for _, make in results]

    own = [x for x, _ in payload]
    full = [(0, layout.local_len)]
    if plan.route == "direct":
        def post_rows(t):
            src = (rank - t) % world
            return p2p.post([(x, (rank + t) % world) for x in pack_rows(own, full, rows[rank][t])],
                            [(x, src) for x in buffers_like_payload(_count(rows[src][t]))], layout.group,
                            op=f"{op}.outgoing")

        pending_rows = post_rows(1) if world > 1 else None
        pending_return = None
        for t in range(1, world):
            src = (rank - t) % world
            tensors = pending_rows.wait()
            if t + 1 < world:
                pending_rows = post_rows(t + 1)
            produced = compute(src, t, tensors)
            if pending_return is not None:
                absorb(pending_return.wait(), rows[rank][t - 1])
            pending_return = p2p.post([(x, src) for x in produced],
                                      [(x, (rank + t) % world) for x in result_buffers(_count(rows[rank][t]))],
                                      layout.group, op=f"{op}.returning")
        if pending_return is not None:
            absorb(pending_return.wait(), rows[rank][world - 1])
        return

    # ring: rows relayed hop by hop (the next hop flies while these rows compute), then the
    # results of each owner stream back from its last receiver, folded in as they pass
    held, owner = own, rank
    kept = {}
    for t in range(1, world):
        src = (rank - t) % world
        exchange = p2p.post([(x, (rank + 1) % world) for x in pack_rows(held, rows[owner][t - 1], rows[owner][t])],
                            [(x, (rank - 1) % world) for x in buffers_like_payload(_count(rows[src][t]))],
                            layout.group, op=f"{op}.outgoing")
        if t > 1:
            kept[owner] = compute(owner, t - 1, held)
        held, owner = exchange.wait(), src
    if world > 1:
        kept[owner] = compute(owner, world - 1, held)
    for hop in range(1, world):
        leaving, arriving = (rank + hop) % world, (rank + hop + 1) % world
        position = (rank - arriving) % world
        incoming = p2p.post([(x, (rank - 1) % world) for x in kept.pop(leaving)],
                            [(x, (rank + 1) % world) for x in result_buffers(_count(rows[arriving][position + 1]))],
                            layout.group, op=f"{op}.returning").wait()
        if position == 0:
            absorb(incoming, rows[rank][1])
        else:
            combine(kept[arriving], incoming, rows[arriving][position], rows[arriving][position + 1])


def _forward(q, k, v, layout: SeqLayout, causal, scale, backend, route, name):
    """Returns this rank's (out [B, n, H, D] acc dtype, lse [B, H, n] acc dtype)."""
    rank = layout.rank
    fwd, _ = block_kernels.kernels(backend, q, k)
    merge = block_kernels.merge_kernel(backend)
    acc = block_kernels.acc_dtype(q.dtype)
    plan = _Plan(layout, causal, route)
    out, lse = _attend(fwd, merge, q, k, v, visible_blocks(layout, rank, rank, causal), scale, acc, torch.float64)
    b, _, h, d = q.shape

    # the partial outputs' wire dtype: the input dtype on the direct route (each partial is
    # rounded once before its merge), fp32 on the relayed one, whose partials are merged
    # and sent on at every hop (bf16 rounded P-1 times reached 2.3x dense's error at P=4)
    wire = acc if route == "ring" else q.dtype

    def compute(src, t, tensors):
        blocks = _blocks_in(layout, src, rank, causal, plan.rows[src][t])
        part_out, part_lse = _attend(fwd, merge, tensors[0], k, v, blocks, scale, acc, acc)
        return [part_out.to(wire), part_lse]

    def absorb(parts, ranges):
        _scatter_merge(merge, out, lse, parts[0], parts[1], ranges)

    def combine(kept, incoming, rows_kept, rows_in):
        # kept travels on in the wire dtype; merge in fp32 and store back
        kept_out, kept_lse = kept[0].to(acc), kept[1].to(torch.float64)
        _scatter_merge(merge, kept_out, kept_lse, incoming[0], incoming[1],
                       [(_packed_index(rows_kept, a), n) for a, n in rows_in])
        kept[0], kept[1] = kept_out.to(wire), kept_lse.to(acc)

    results = [
        (1, lambda n: torch.empty(b, n, h, d, dtype=wire, device=q.device)),
        (2, lambda n: torch.empty(b, h, n, dtype=acc, device=q.device)),
    ]
    _travel(layout, plan, [(q, 1)], results, compute, absorb, combine, op=f"{name}.forward")
    return out, lse.to(acc)


def _backward(do, q, k, v, out, lse, layout: SeqLayout, causal, scale, backend, route, name):
    """Returns dq, dk, dv in the acc dtype; dK/dV never leave this rank."""
    rank = layout.rank
    _, bwd = block_kernels.kernels(backend, q, k)
    acc = block_kernels.acc_dtype(q.dtype)
    plan = _Plan(layout, causal, route)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)

    def attend_back(blocks, q_rows, do_rows, out_rows, lse_rows, dq_rows):
        attend_blocks_backward(bwd, blocks, do_rows, q_rows, k, v, out_rows, lse_rows, scale, dq_rows, dk, dv)

    attend_back(visible_blocks(layout, rank, rank, causal), q, do, out, lse, dq)

    def compute(src, t, tensors):
        q_rows, do_rows, out_rows, lse_rows = tensors
        dq_rows = torch.zeros(q_rows.shape, dtype=acc, device=q.device)
        attend_back(_blocks_in(layout, src, rank, causal, plan.rows[src][t]), q_rows, do_rows, out_rows,
                    lse_rows, dq_rows)
        return [dq_rows]

    def absorb(parts, ranges):
        _scatter_add(dq, parts[0], ranges)

    def combine(kept, incoming, rows_kept, rows_in):
        _scatter_add(kept[0], incoming[0], [(_packed_index(rows_kept, a), n) for a, n in rows_in])

    payload = [(q, 1), (do, 1), (out, 1), (lse, 2)]
    results = [(1, lambda n: torch.empty(q.shape[0], n, q.shape[2], q.shape[3], dtype=acc, device=q.device))]
    _travel(layout, plan, payload, results, compute, absorb, combine, op=f"{name}.backward")
    return dq, dk, dv


TokenRingAttention = saved_output_function("TokenRingAttention", _forward, _backward)


def analytic_bytes(layout: SeqLayout, batch: int, heads: int, kv_heads: int, head_dim: int, element_size: int,
                   route: str = "direct", causal: bool = True, **options) -> Dict[str, int]:
    """Bytes this rank sends, per pass and direction ("forward"/"backward" are the totals;
    "*_outgoing" is the queries' direction, "*_returning" the results' direction)."""
    rank, world = layout.rank, layout.world_size
    if isinstance(layout, SeqLayout):
        # the rows depend on the layout's geometry only: every rank's call shares one plan
        plan = _geometry_plan(layout.seq_len, world, layout.scheme, causal, route)
    else:
        plan = _Plan(layout, causal, route)
    a = 8 if element_size == 8 else 4
    row = batch * heads * head_dim
    if route == "direct":
        out_rows = sum(_count(plan.rows[rank][t]) for t in range(1, world))
        back_rows = sum(_count(plan.rows[(rank - t) % world][t]) for t in range(1, world))
    else:
        # relayed: the rows of owner rank-t+1 go on at step t; the stream of owner rank+hop leaves at hop
        out_rows = sum(_count(plan.rows[(rank - t + 1) % world][t]) for t in range(1, world))
        back_rows = sum(_count(plan.rows[(rank + hop) % world][world - hop]) for hop in range(1, world))
    heads_rows = batch * heads
    wire = a if route == "ring" else element_size  # the returning partial outputs (see _forward)
    return {
        "forward_outgoing": out_rows * row * element_size,
        "forward_returning": back_rows * (row * wire + heads_rows * a),
        "backward_outgoing": out_rows * (3 * row * element_size + heads_rows * a),
        "backward_returning": back_rows * row * a,
        "forward": out_rows * row * element_size + back_rows * (row * wire + heads_rows * a),
        "backward": out_rows * (3 * row * element_size + heads_rows * a) + back_rows * row * a,
    }


@lru_cache(maxsize=16)
def _geometry_plan(seq_len: int, world: int, scheme: str, causal: bool, route: str) -> _Plan:
    return _Plan(SeqLayout.simulated(seq_len, world, 0, scheme), causal, route)


@dataclass(frozen=True)
class Options:
    """`route`: "direct" (partials straight back to the owner) or "ring" (hop by hop)."""
    route: str = "direct"

    def __post_init__(self):
        if self.route not in ROUTES:
            raise ValueError(f"route: expected one of {ROUTES}, got {brief(self.route)}")

    def resolve(self, q, k, v, layout) -> "Options":
        return self



# -- for the planner (seqpar.planner): schedule, memory, candidates ----------------------------


def cost(prob, topo, options):
    """(timeline, busiest rank's bytes). At step t rank r attends the queries of rank r-t;
    the first rows and the last returns are exposed, the rest fly while a step computes
    (`route="ring"`: the partials stream back hop by hop after the last step, exposed)."""
    from ..planner.schedule import (BACKWARD_FLOPS, EXACT_RANKS, FORWARD_FLOPS, NotPlanned, Timeline, block_time,
                                    busiest_bytes, visible_elements)

    route = options.get("route", "direct")
    world = prob.world_size
    if route == "ring" and world > EXACT_RANKS:
        raise NotPlanned(
            f"token_ring: route='ring' is not planned above {EXACT_RANKS} ranks, got {world}: its exact volume "
            f"takes O(P^3) block enumerations to evaluate, and its P-1 exposed return hops make it the slower "
            f"route in this model (name it explicitly to use it)")
    nbytes = busiest_bytes(prob, analytic_bytes, options)
    level = topo.level(range(world))
    visible = visible_elements(prob.layout(), prob.causal)
    per = prob.batch * prob.heads * prob.head_dim
    rows = torch.arange(world)
    line = Timeline(topo.overlap)
    hops = max(1, world - 1)

    def one_pass(flops: float, rate: float, outgoing: float, returning: float) -> None:
        blocks = block_time(visible, flops * per, rate, topo.kernel_overhead)
        work = [float(blocks[(rows - t) % world, rows].max()) for t in range(world)]
        out_step = topo.transfer(level, "p2p", world, outgoing / hops)
        ret_step = topo.transfer(level, "p2p", world, returning / hops)
        line.work(work[0])
        if world == 1:
            return
        line.wait(out_step, 1)  # the first rows leave after the local block
        if route == "direct":
            for t in range(1, world):
                # rows of step t+1 and the return of step t-1 fly while step t computes
                nxt = out_step if t + 1 < world else 0.0
                back = ret_step if t > 1 else 0.0
                line.overlap(work[t], nxt + back, int(nxt > 0) + int(back > 0))
            line.wait(ret_step, 1)
        else:
            for t in range(2, world):
                line.overlap(work[t - 1], out_step, 1)
            line.work(work[world - 1])
            for _ in range(world - 1):  # the partials stream back hop by hop, merged as they pass
                line.wait(ret_step, 1)

    one_pass(FORWARD_FLOPS, topo.compute_rate, nbytes["forward_outgoing"], nbytes["forward_returning"])
    if prob.training:
        one_pass(BACKWARD_FLOPS, topo.backward_rate, nbytes["backward_outgoing"], nbytes["backward_returning"])
    return line, nbytes


def peak_memory(prob, options) -> int:
    """Inputs, plus the visiting queries and the partial outputs in flight both ways; the
    backward carries dO, out and lse with the queries and dQ back."""
    b, h, hkv, d, n = prob.batch, prob.heads, prob.kv_heads, prob.head_dim, prob.longest_local
    e, a = prob.element_size, prob.acc_size
    rows, lse = b * n * h * d, b * h * n
    saved = rows * e + lse * a
    fwd = 2 * rows * e + 2 * (rows * a + lse * a) + rows * a + lse * 8
    bwd = 2 * (3 * rows * e + lse * a) + 2 * rows * a + rows * a + 2 * b * n * hkv * d * a
    return prob.peak(saved, fwd, bwd)


def candidates(prob):
    return [{"route": route} for route in ROUTES]

def _apply(q, k, v, layout, causal, scale, backend, options: Options):
    args = (layout, causal, scale, backend, options.route, "token_ring")
    return TokenRingAttention.apply(q, k, v, args)


def token_ring_attention(q, k, v, *, layout=None, causal=False, softmax_scale=None, backend="auto",
                         route: str = "direct", **options):
    """Exact attention by TokenRing: queries travel, partial outputs return, K/V stay.

    `q` `[B, S/P, H, D]`, `k`/`v` `[B, S/P, H_kv, D]` of `layout` (any scheme, uneven
    lengths). `route`: "direct" (partials return straight to the query's owner; full-mesh
    links) or "ring" (hop by hop back, merged as they pass; ring-only links).
    Returns `[B, S/P, H, D]` in the input dtype; differentiable in q, k, v.
    """
    return run("token_ring", q, k, v, layout=layout, causal=causal, softmax_scale=softmax_scale,
                        backend=backend, route=route, **options)


register(Strategy("token_ring", _apply, analytic_bytes, Options, cost=cost, peak_memory=peak_memory,
                  candidates=candidates))
