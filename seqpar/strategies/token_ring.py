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
  sends its rows to r+t and gets the partial straight back from r+t. The queries of step
  t+1 fly during step t's compute; the return of step t is posted after it and folded in
  before step t+1's compute (it flies while step t+1's queries finish arriving), so no
  rank holds the results of two steps at once.
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

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..comm import p2p
from ..errors import brief
from ..kernels import block as block_kernels
from ..layout import Block, Mask, SeqLayout, visible_blocks
from ..registry import Strategy, register, run
from .common import attend_blocks, attend_blocks_backward, saved_output_function

ROUTES = ("direct", "ring")
DEFAULT_ROUTE = "direct"
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
        dataclasses.replace(blk, q_start=_packed_index(ranges, blk.q_start))
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
    b, m, h, _ = q_rows.shape
    out = torch.zeros(b, m, h, v.shape[3], dtype=acc, device=q_rows.device)
    lse = torch.full((b, h, m), float("-inf"), dtype=lse_dtype, device=q_rows.device)
    attend_blocks(fwd, q_rows, k, v, blocks, scale, out, lse, merge=merge)
    return out, lse


class _Pass(ABC):
    """One pass's traffic, for `_travel`: this rank's rows that travel out (`payload`:
    `(tensor, row dim)` pairs), the results that come back, and how they fold in."""

    payload: List[Tuple[torch.Tensor, int]]

    @abstractmethod
    def result_buffers(self, n: int) -> List[torch.Tensor]:
        """Receive buffers for the results of `n` rows."""

    @abstractmethod
    def compute(self, src: int, t: int, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
        """Results for rank `src`'s rows `plan.rows[src][t]`, which arrived as `tensors`."""

    @abstractmethod
    def absorb(self, parts: List[torch.Tensor], ranges: Ranges) -> None:
        """Fold results for this rank's rows `ranges` into its accumulators."""

    @abstractmethod
    def combine(self, kept: List[torch.Tensor], incoming: List[torch.Tensor], rows_kept: Ranges,
                rows_in: Ranges) -> None:
        """Fold a passing result stream (rows `rows_in`) into a kept one (rows `rows_kept`)."""

    def pack(self, tensors: List[torch.Tensor], have: Ranges, keep: Ranges) -> List[torch.Tensor]:
        """Rows `keep` of payload-shaped `tensors` whose rows are `have`."""
        keep_packed = [(_packed_index(have, a), n) for a, n in keep]
        return [_pack(x, keep_packed, dim) for x, (_, dim) in zip(tensors, self.payload)]

    def empty_rows(self, n: int) -> List[torch.Tensor]:
        """Receive buffers for `n` rows of payload."""
        return [x.new_empty(tuple(n if i == dim else size for i, size in enumerate(x.shape)))
                for x, dim in self.payload]


def _travel(layout: SeqLayout, plan: "_Plan", traffic: _Pass, op: str, local) -> None:
    """Move this rank's rows to the others and their results back, by `plan.route`;
    `local()` (this rank's own block) runs while the first rows fly."""
    (_travel_direct if plan.route == "direct" else _travel_relayed)(layout, plan, traffic, op, local)


def _travel_direct(layout: SeqLayout, plan: "_Plan", traffic: _Pass, op: str, local) -> None:
    """Step t: send own rows to rank+t, receive rank-t's, compute, return the results to
    rank-t directly. The next step's rows fly during the compute; the returns are folded in
    before the next compute."""
    rank, world, rows = layout.rank, layout.world_size, plan.rows
    own = [x for x, _ in traffic.payload]
    full = [(0, layout.local_len)]

    def post_rows(t):
        src = (rank - t) % world
        return p2p.post([(x, (rank + t) % world) for x in traffic.pack(own, full, rows[rank][t])],
                        [(x, src) for x in traffic.empty_rows(_count(rows[src][t]))], layout.group,
                        op=f"{op}.outgoing")

    pending_rows = post_rows(1) if world > 1 else None
    local()
    pending_return = None
    for t in range(1, world):
        src = (rank - t) % world
        tensors = pending_rows.wait()
        if pending_return is not None:
            # the last step's results have flown with these rows; folding them in before the
            # compute frees the partial sent and the one received (two result buffers)
            traffic.absorb(pending_return.wait(), rows[rank][t - 1])
            pending_return = None
        if t + 1 < world:
            pending_rows = post_rows(t + 1)
        produced = traffic.compute(src, t, tensors)
        del tensors
        pending_return = p2p.post([(x, src) for x in produced],
                                  [(x, (rank + t) % world) for x in traffic.result_buffers(_count(rows[rank][t]))],
                                  layout.group, op=f"{op}.returning")
        del produced
    if pending_return is not None:
        traffic.absorb(pending_return.wait(), rows[rank][world - 1])


def _travel_relayed(layout: SeqLayout, plan: "_Plan", traffic: _Pass, op: str, local) -> None:
    """Rows relayed hop by hop along the ring (the next hop flies while these rows
    compute), then each owner's results stream back from its last receiver, folded in by
    every rank they pass."""
    rank, world, rows = layout.rank, layout.world_size, plan.rows
    held, owner = [x for x, _ in traffic.payload], rank
    kept = {}
    for t in range(1, world):
        src = (rank - t) % world
        exchange = p2p.post([(x, (rank + 1) % world) for x in traffic.pack(held, rows[owner][t - 1], rows[owner][t])],
                            [(x, (rank - 1) % world) for x in traffic.empty_rows(_count(rows[src][t]))],
                            layout.group, op=f"{op}.outgoing")
        if t == 1:
            local()
        else:
            kept[owner] = traffic.compute(owner, t - 1, held)
        held, owner = exchange.wait(), src
    if world > 1:
        kept[owner] = traffic.compute(owner, world - 1, held)
    else:
        local()
    for hop in range(1, world):
        leaving, arriving = (rank + hop) % world, (rank + hop + 1) % world
        position = (rank - arriving) % world
        buffers = traffic.result_buffers(_count(rows[arriving][position + 1]))
        incoming = p2p.post([(x, (rank - 1) % world) for x in kept.pop(leaving)],
                            [(x, (rank + 1) % world) for x in buffers], layout.group, op=f"{op}.returning").wait()
        if position == 0:
            traffic.absorb(incoming, rows[rank][1])
        else:
            traffic.combine(kept[arriving], incoming, rows[arriving][position], rows[arriving][position + 1])


class _ForwardPass(_Pass):
    """Queries travel; partial (out, lse) return and merge into the owner's accumulators."""

    def __init__(self, q, k, v, layout: SeqLayout, plan: _Plan, causal, scale, backend, out, lse):
        self.payload = [(q, 1)]
        self.k, self.v, self.layout, self.plan, self.causal, self.scale = k, v, layout, plan, causal, scale
        self.fwd, _ = block_kernels.kernels(backend, q, k)
        self.merge = block_kernels.merge_kernel(backend)
        self.acc = block_kernels.acc_dtype(q.dtype)
        self.out, self.lse = out, lse
        self.shape = out.shape  # [B, n, H, Dv]: what returns
        # the partial outputs' wire dtype: the input dtype on the direct route (each partial is
        # rounded once before its merge), fp32 on the relayed one, whose partials are merged
        # and sent on at every hop (bf16 rounded P-1 times reached 2.3x dense's error at P=4)
        self.wire = self.acc if plan.route == "ring" else q.dtype

    def result_buffers(self, n):
        b, _, h, d = self.shape
        device = self.out.device
        return [torch.empty(b, n, h, d, dtype=self.wire, device=device),
                torch.empty(b, h, n, dtype=self.acc, device=device)]

    def compute(self, src, t, tensors):
        blocks = _blocks_in(self.layout, src, self.layout.rank, self.causal, self.plan.rows[src][t])
        part_out, part_lse = _attend(self.fwd, self.merge, tensors[0], self.k, self.v, blocks, self.scale, self.acc,
                                     self.acc)
        return [part_out.to(self.wire), part_lse]

    def absorb(self, parts, ranges):
        _scatter_merge(self.merge, self.out, self.lse, parts[0], parts[1], ranges)

    def combine(self, kept, incoming, rows_kept, rows_in):
        # kept travels on in the wire dtype; merge in fp32 (lse in fp64) and store back
        kept_out, kept_lse = kept[0].to(self.acc), kept[1].to(torch.float64)
        _scatter_merge(self.merge, kept_out, kept_lse, incoming[0], incoming[1],
                       [(_packed_index(rows_kept, a), n) for a, n in rows_in])
        kept[0], kept[1] = kept_out.to(self.wire), kept_lse.to(self.acc)


def _forward(q, k, v, layout: SeqLayout, causal, scale, backend, route, name):
    """Returns this rank's (out [B, n, H, D] acc dtype, lse [B, H, n] acc dtype)."""
    fwd, _ = block_kernels.kernels(backend, q, k)
    acc = block_kernels.acc_dtype(q.dtype)
    plan = _plan_of(layout, causal, route)
    b, n, h, _ = q.shape
    out = torch.zeros(b, n, h, v.shape[3], dtype=acc, device=q.device)
    lse = torch.full((b, h, n), float("-inf"), dtype=torch.float64, device=q.device)
    merge = block_kernels.merge_kernel(backend)

    def local():  # this rank's own block, while its first rows fly
        attend_blocks(fwd, q, k, v, visible_blocks(layout, layout.rank, layout.rank, causal), scale, out, lse,
                      merge=merge)

    _travel(layout, plan, _ForwardPass(q, k, v, layout, plan, causal, scale, backend, out, lse), f"{name}.forward",
            local)
    return out, lse.to(acc)


class _BackwardPass(_Pass):
    """q, dO, out and lse travel; partial dq returns; dK/dV stay on this rank."""

    def __init__(self, q, do, out, lse, k, v, layout: SeqLayout, plan: _Plan, causal, scale, backend, dq, dk, dv):
        self.payload = [(q, 1), (do, 1), (out, 1), (lse, 2)]
        self.k, self.v, self.layout, self.plan, self.causal, self.scale = k, v, layout, plan, causal, scale
        _, self.bwd = block_kernels.kernels(backend, q, k)
        self.dq, self.dk, self.dv = dq, dk, dv

    def attend_back(self, blocks, q_rows, do_rows, out_rows, lse_rows, dq_rows):
        attend_blocks_backward(self.bwd, blocks, do_rows, q_rows, self.k, self.v, out_rows, lse_rows, self.scale,
                               dq_rows, self.dk, self.dv)

    def result_buffers(self, n):
        b, _, h, d = self.dq.shape
        return [torch.empty(b, n, h, d, dtype=self.dq.dtype, device=self.dq.device)]

    def compute(self, src, t, tensors):
        q_rows, do_rows, out_rows, lse_rows = tensors
        dq_rows = torch.zeros(q_rows.shape, dtype=self.dq.dtype, device=self.dq.device)
        blocks = _blocks_in(self.layout, src, self.layout.rank, self.causal, self.plan.rows[src][t])
        self.attend_back(blocks, q_rows, do_rows, out_rows, lse_rows, dq_rows)
        return [dq_rows]

    def absorb(self, parts, ranges):
        _scatter_add(self.dq, parts[0], ranges)

    def combine(self, kept, incoming, rows_kept, rows_in):
        _scatter_add(kept[0], incoming[0], [(_packed_index(rows_kept, a), n) for a, n in rows_in])


def _backward(do, q, k, v, out, lse, layout: SeqLayout, causal, scale, backend, route, name):
    """Returns dq, dk, dv in the acc dtype; dK/dV never leave this rank."""
    acc = block_kernels.acc_dtype(q.dtype)
    plan = _plan_of(layout, causal, route)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    traffic = _BackwardPass(q, do, out, lse, k, v, layout, plan, causal, scale, backend, dq, dk, dv)
    _travel(layout, plan, traffic, f"{name}.backward",
            lambda: traffic.attend_back(visible_blocks(layout, layout.rank, layout.rank, causal), q, do, out, lse, dq))
    return dq, dk, dv


TokenRingAttention = saved_output_function("TokenRingAttention", _forward, _backward)


def analytic_bytes(layout: SeqLayout, batch: int, heads: int, kv_heads: int, head_dim: int, element_size: int,
                   route: str = DEFAULT_ROUTE, causal: bool = True, value_dim: Optional[int] = None,
                   window_size=(-1, -1), **options) -> Dict[str, int]:
    """Bytes this rank sends, per pass and direction ("forward"/"backward" are the totals;
    "*_outgoing" is the queries' direction, "*_returning" the results' direction)."""
    rank, world = layout.rank, layout.world_size
    # a window narrows the rows that travel, as the strategy's own plan does
    mask = causal if tuple(window_size) == (-1, -1) else Mask(bool(causal), tuple(window_size))
    plan = _plan_of(layout, mask, route)
    a = 8 if element_size == 8 else 4
    row = batch * heads * head_dim  # a query row (and a dq row)
    vrow = batch * heads * (head_dim if value_dim is None else value_dim)  # an output (and dO) row
    if route == "direct":
        out_rows = sum(_count(plan.rows[rank][t]) for t in range(1, world))
        back_rows = sum(_count(plan.rows[(rank - t) % world][t]) for t in range(1, world))
    else:
        # relayed: the rows of owner rank-t+1 go on at step t; the stream of owner rank+hop leaves at hop
        out_rows = sum(_count(plan.rows[(rank - t + 1) % world][t]) for t in range(1, world))
        back_rows = sum(_count(plan.rows[(rank + hop) % world][world - hop]) for hop in range(1, world))
    heads_rows = batch * heads
    wire = a if route == "ring" else element_size  # the returning partial outputs (see _forward)
    volume = {
        "forward_outgoing": out_rows * row * element_size,
        "forward_returning": back_rows * (vrow * wire + heads_rows * a),
        "backward_outgoing": out_rows * ((row + 2 * vrow) * element_size + heads_rows * a),  # q, dO, out, lse
        "backward_returning": back_rows * row * a,
    }
    volume["forward"] = volume["forward_outgoing"] + volume["forward_returning"]
    volume["backward"] = volume["backward_outgoing"] + volume["backward_returning"]
    return volume


def _plan_of(layout, causal, route: str) -> "_Plan":
    """The `_Plan` of a call: a SeqLayout's rows depend on its geometry only, so every call
    (forward, backward, every rank's byte count) shares one cached plan."""
    if isinstance(layout, SeqLayout):
        return _geometry_plan(layout.geometry, causal, route)
    return _Plan(layout, causal, route)


@lru_cache(maxsize=16)
def _geometry_plan(geometry: tuple, causal: bool, route: str) -> _Plan:
    seq_len, scheme, world, documents = geometry
    return _Plan(SeqLayout.simulated(seq_len, world, 0, scheme, documents), causal, route)


@dataclass(frozen=True)
class Options:
    """`route`: "direct" (partials straight back to the owner) or "ring" (hop by hop)."""
    route: str = DEFAULT_ROUTE

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

    route = options.get("route", DEFAULT_ROUTE)
    world = prob.world_size
    if route == "ring" and world > EXACT_RANKS:
        raise NotPlanned(
            f"token_ring: route='ring' is not planned above {EXACT_RANKS} ranks, got {world}: its exact volume "
            f"takes O(P^3) block enumerations to evaluate, and its P-1 exposed return hops make it the slower "
            f"route in this model (name it explicitly to use it)")
    nbytes = busiest_bytes(prob, analytic_bytes, options)
    level = topo.level(range(world))
    visible = visible_elements(prob.layout(), prob.mask)
    per = prob.batch * prob.heads * prob.head_dim
    rows = torch.arange(world)
    line = Timeline(topo.overlap)
    hops = max(1, world - 1)

    def one_pass(flops: float, rate: float, outgoing: float, returning: float) -> None:
        blocks = block_time(visible, flops * per, rate, topo.kernel_overhead)
        work = [float(blocks[(rows - t) % world, rows].max()) for t in range(world)]
        out_step = topo.transfer(level, "p2p", world, outgoing / hops)
        ret_step = topo.transfer(level, "p2p", world, returning / hops)
        if world == 1:
            line.work(work[0])
            return
        line.overlap(work[0], out_step, 1)  # the first rows fly while the local block computes
        if route == "direct":
            for t in range(1, world):
                if t > 1:  # the return of step t-1 is folded in before step t computes
                    line.wait(ret_step, 1)
                # the rows of step t+1 fly while step t computes
                nxt = out_step if t + 1 < world else 0.0
                line.overlap(work[t], nxt, int(nxt > 0))
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
    backward carries dO, out and lse with the queries and dQ back: at its fullest step a
    rank holds dO, its fp32 dQ, dK, dV, the visitors' q, dO, out and lse it computes on and
    the next step's arriving, and either the partial dQ it computes and one backward tile
    (`common.backward_tile_bytes`) or, after the compute, the partial going back and the one
    coming in; with one step (P = 2) nothing arrives beside the visitors."""
    from .common import backward_tile_bytes

    b, h, hkv, d, n = prob.batch, prob.heads, prob.kv_heads, prob.head_dim, prob.longest_local
    e, a = prob.element_size, prob.acc_size
    rows, lse = b * n * h * d, b * h * n
    saved = lse * a  # q is the input, the saved output the returned one
    fwd = 2 * rows * e + 2 * (rows * a + lse * a) + rows * a + lse * 8
    visitors = 3 * rows * e + lse * a
    tile = backward_tile_bytes(b, n, h, hkv, d, a, element_size=e)
    if prob.world_size >= 3:  # the next step's visitors arrive during the compute
        travelling = 2 * visitors + max(rows * a + tile, 2 * rows * a)
    else:  # one step: nothing arrives for a next one; its partial dQ returns after the compute
        travelling = visitors + max(rows * a + tile, 2 * rows * a)
    bwd = rows * e + rows * a + 2 * b * n * hkv * d * a + (travelling if prob.world_size > 1 else tile)
    return prob.peak(saved, fwd, bwd)


def candidates(prob):
    return [{"route": route} for route in ROUTES]

def _apply(q, k, v, layout, causal, scale, backend, options: Options, sinks=None):
    args = (layout, causal, scale, backend, options.route, "token_ring")
    return TokenRingAttention.apply(q, k, v, sinks, args)


def token_ring_attention(q, k, v, *, layout=None, causal=False, softmax_scale=None, backend="auto",
                         route: str = DEFAULT_ROUTE, **options):
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
