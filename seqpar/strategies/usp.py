"""USP (arXiv 2405.07719): Ulysses inside groups of U ranks, ring attention across groups.

With P = U R, rank r is member `r mod U` of Ulysses group `r // U` (U neighbouring ranks,
meant to share a node's fast links) and member `r // U` of ring `r mod U`. No process
sub-groups are created: the all-to-all inside a Ulysses group is one batch of isend/irecv
among its members, and the ring sends to its neighbours' ranks, both on the layout's group.
(Creating sub-groups deadlocks when the layout's group is itself a sub-group: torch names
new groups by counters or by "hashes" salted with each process's group count, which
differ between ranks whose histories differ.) Step one
is Ulysses within the group: its U shards become one shard of the group's tokens with
H/U heads. Step two is ring attention among the R ranks that hold the same head chunk,
each holding a different group's tokens; step three returns the output by all-to-all.

How a global layout maps onto the two levels: ring member g holds the union of its U
ranks' positions (`GroupLayout`). Contiguous: one run per group, so the ring sees a
contiguous layout. Zigzag over P ranks: group g holds chunks gU..gU+U-1 and their
mirrors 2P-1-gU-U+1..2P-1-gU, i.e. two runs that form a zigzag layout over R groups, so
the causal balance carries to the ring level. Stripe: U interleaved stride-P runs, which
balance like stripe. U = P is plain Ulysses, U = 1 plain ring.

Volume per rank: the Ulysses all-to-alls of `ulysses.analytic_bytes` over the U members,
plus the ring exchange of `ring.analytic_bytes` over the R groups with H_kv/U KV heads
(one when KV heads are replicated), on the group-level layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional

from ..layout import GroupLayout, SeqLayout
from ..registry import Strategy, register, run
from . import ring, ulysses


def default_ulysses_size(world: int, heads: int, kv_heads: int) -> int:
    """The largest U dividing P that the heads allow, within a node when torchrun says
    how many ranks share one (LOCAL_WORLD_SIZE)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    for size in range(min(world, local), 0, -1):
        if world % size == 0 and ulysses.head_constraint(heads, kv_heads, size, "usp") is None:
            return size
    return 1


@dataclass(frozen=True)
class Options:
    """`ulysses_size` U: ranks per Ulysses group; None means `default_ulysses_size`.
    `head_chunks` c: the Ulysses level's pipelined head chunks (`ulysses.Options`); None
    means `ulysses.default_head_chunks` for U."""
    ulysses_size: Optional[int] = None
    head_chunks: Optional[int] = None

    def __post_init__(self):
        size = self.ulysses_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
            raise TypeError(f"ulysses_size: expected an int, got {type(size).__name__}")
        ulysses.check_head_chunks_type(self.head_chunks)

    def resolve(self, q, k, v, layout) -> "Options":
        """The defaults filled in. `ulysses_size` reads this rank's LOCAL_WORLD_SIZE, so the
        resolved values are agreed across ranks before any collective (`registry.run`)."""
        size = self.ulysses_size
        if size is None:
            size = default_ulysses_size(layout.world_size, q.shape[2], k.shape[2])
        chunks = self.head_chunks
        if chunks is None:  # a size `_check` refuses is refused before the chunks count
            chunks = ulysses.default_head_chunks(q.shape[2], k.shape[2], size)
        return Options(size, chunks)


def _check(q, k, v, layout, options: Options):
    size = options.ulysses_size
    if size < 1 or layout.world_size % size:
        raise ValueError(f"ulysses_size: expected a divisor of the world size {layout.world_size}, got {size}")
    reason = ulysses.head_constraint(q.shape[2], k.shape[2], size, "usp")
    if reason:
        raise ValueError(reason.replace("strategy='usp' with a smaller ulysses_size", "a smaller ulysses_size"))
    if size == 1 and options.head_chunks != 1:
        raise ValueError(f"head_chunks: ulysses_size=1 is ring attention, which has no head chunks; "
                         f"expected None or 1, got {options.head_chunks}")
    reason = ulysses.head_chunks_reason(options.head_chunks, q.shape[2], k.shape[2], size)
    if reason:
        raise ValueError(reason)


def _apply(q, k, v, layout, causal, scale, backend, options: Options, sinks=None):
    size = options.ulysses_size
    if size == 1:
        return ring._apply(q, k, v, layout, causal, scale, backend, None, sinks)
    groups = ulysses.ulysses_groups(layout.world_size, size)
    members = groups[layout.rank // size]
    # no sub-groups are created: both levels talk on the layout's group (see GroupLayout.peer
    # and alltoall.all_to_all_rows), which is safe whatever group the caller's layout uses
    ring_layout = GroupLayout(layout, groups, layout.rank // size, member=layout.rank % size)
    scatter = ulysses.HeadScatter(layout, members, members.index(layout.rank), layout.group, ring_layout,
                                  q.shape[2], k.shape[2])
    return ulysses.HeadParallelAttention.apply(q, k, v, sinks, scatter, ring_layout, causal, scale, backend, "usp",
                                               options.head_chunks)


def analytic_bytes(layout: SeqLayout, batch: int, heads: int, kv_heads: int, head_dim: int,
                   element_size: int, ulysses_size: Optional[int] = None, value_dim: Optional[int] = None,
                   causal: bool = False, window_size=(-1, -1), **options) -> Dict[str, int]:
    """Bytes this rank sends in one forward and one backward of USP, exactly (the ring
    across groups moves only what the mask `causal`/`window_size` lets later groups see)."""
    size = ulysses_size or default_ulysses_size(layout.world_size, heads, kv_heads)
    mask = {"causal": causal, "window_size": window_size}
    if size == 1:
        return ring.analytic_bytes(layout, batch, heads, kv_heads, head_dim, element_size, value_dim=value_dim,
                                   **mask)
    g = layout.rank // size
    groups = ulysses.ulysses_groups(layout.world_size, size)
    a2a = ulysses.analytic_bytes(layout, batch, heads, kv_heads, head_dim, element_size, members=groups[g],
                                 value_dim=value_dim)
    ring_layout = GroupLayout(layout, groups, g)
    kv_local = ulysses.kv_heads_per_member(heads, kv_heads, size)
    around = ring.analytic_bytes(ring_layout, batch, heads // size, kv_local, head_dim, element_size,
                                 value_dim=value_dim, **mask)
    return {phase: a2a[phase] + around[phase] for phase in ("forward", "backward")}



# -- for the planner (seqpar.planner): schedule, memory, candidates ----------------------------


def cost(prob, topo, options):
    """Ulysses' schedule in groups of `ulysses_size`, ring across them (`ulysses.head_parallel_cost`)."""
    from ..planner.schedule import busiest_bytes

    size = options["ulysses_size"]
    return ulysses.head_parallel_cost(prob, topo, size, busiest_bytes(prob, analytic_bytes, {"ulysses_size": size}),
                                      ulysses.planned_head_chunks(prob, size, options))


def peak_memory(prob, options) -> int:
    size = options["ulysses_size"]
    return ulysses.head_parallel_memory(prob, size, ulysses.planned_head_chunks(prob, size, options))


def candidates(prob):
    """Every proper divisor U of P above 1 (U = 1 is ring, U = P Ulysses), each with its
    default head chunks and, where those pipeline, with one chunk."""
    world = prob.world_size
    out = []
    for u in range(2, world):
        if world % u == 0:
            out.append({"ulysses_size": u})
            if ulysses.head_constraint(prob.heads, prob.kv_heads, u, "usp") is None and ulysses.default_head_chunks(
                    prob.heads, prob.kv_heads, u) > 1:
                out.append({"ulysses_size": u, "head_chunks": 1})
    return out

def usp_attention(q, k, v, *, layout=None, causal=False, softmax_scale=None, backend="auto",
                  ulysses_size: Optional[int] = None, head_chunks: Optional[int] = None, **options):
    """Exact attention by USP: Ulysses within groups of `ulysses_size` ranks, ring across them.

    `q` `[B, S/P, H, D]`, `k`/`v` `[B, S/P, H_kv, D]` of `layout` (any scheme, uneven
    lengths). `ulysses_size` U must divide P, and H (and H_kv, or be divisible by it) by U;
    default: the largest such U, at most the ranks per node (`LOCAL_WORLD_SIZE`).
    `head_chunks`: the Ulysses level's pipelined head chunks (`ulysses_attention`).
    Returns `[B, S/P, H, D]` in the input dtype; differentiable in q, k, v.
    """
    return run("usp", q, k, v, layout=layout, causal=causal, softmax_scale=softmax_scale,
                        backend=backend, ulysses_size=ulysses_size, head_chunks=head_chunks, **options)


register(Strategy("usp", _apply, analytic_bytes, Options, _check, cost=cost, peak_memory=peak_memory,
                  candidates=candidates))
