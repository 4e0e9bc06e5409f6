"""The vocabulary of a strategy's schedule, as the planner prices it: the `Problem`
(shapes, dtype, layout scheme; one per plan), a rank's `Timeline` (compute, transfers and
what they leave exposed), exact counts of visible scores per block (`visible_elements`),
`block_time`, and `busiest_bytes` (a strategy's `analytic_bytes`, maximised over ranks).

Each strategy's `cost(problem, topology, options) -> (Timeline, bytes)` and
`peak_memory(problem, options)` (registered on its `Strategy` record, see
`seqpar.registry`) are written in these terms; `seqpar.planner.model` adds them up. This
module imports no strategy and nothing that does, so strategy files may import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..layout import Mask, SeqLayout, as_mask, visible_blocks

# flops per visible score element and per (batch x head x head_dim): QK^T and PV forward;
# the flash backward recomputes QK^T and adds dV, dP, dQ, dK
FORWARD_FLOPS = 4
BACKWARD_FLOPS = 10
# ranks whose bytes and memory are evaluated one by one; above this, a sample
EXACT_RANKS = 16


class NotPlanned(Exception):
    """Raised by a strategy's `cost` for a candidate it can run but the planner does not
    price (the message says why); the plan lists it as infeasible with that reason."""


# -- exact counts of visible scores -----------------------------------------------------------


def _stair_sum(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum over x <= y of clamp(x, 0, m), for int64 tensors."""
    y = y.clamp_min(0)
    inside = torch.minimum(y, m)
    return inside * (inside + 1) // 2 + (y - inside) * m


def visible_elements(layout, causal) -> torch.Tensor:
    """`[P, P]` int64: visible (query, key) score pairs of rank i's queries against rank
    j's keys, exactly as `layout.visible_blocks` masks them (for a `SeqLayout` or a
    `GroupLayout`). `causal`: a bool or a `layout.Mask` (a window). Plain causal or full
    attention is counted from the runs in closed form (O(P^2) tensor work); a window or
    documents from the visible blocks, pair by pair."""
    mask = as_mask(causal)
    if mask.windowed or getattr(layout, "documents", None) is not None:
        return _masked_elements(layout, mask)
    causal = mask.causal
    world = layout.world_size
    lens = torch.tensor([layout.local_len_of(r) for r in range(world)], dtype=torch.int64)
    if not causal:
        return lens[:, None] * lens[None, :]
    runs = [layout.runs(r) for r in range(world)]
    width = max(len(rs) for rs in runs)
    starts = torch.zeros(world, width, dtype=torch.int64)
    lengths = torch.zeros(world, width, dtype=torch.int64)
    strides = torch.ones(world, width, dtype=torch.int64)
    for r, rs in enumerate(runs):
        for i, run in enumerate(rs):
            starts[r, i], lengths[r, i], strides[r, i] = run.start, run.length, run.stride
    total = torch.zeros(world, world, dtype=torch.int64)
    for a in range(width):
        qs, ql, qst = starts[:, a, None], lengths[:, a, None], strides[:, a, None]
        for b in range(width):
            ks, kl, kst = starts[None, :, b], lengths[None, :, b], strides[None, :, b]
            # key j of the key run is visible to query i of the query run iff j <= i + offset,
            # with the stride of `layout._common_stride` (a one-token run takes the other's stride)
            stride = torch.where(ql == 1, kst, qst)
            offset = torch.div(qs - ks, stride, rounding_mode="floor")
            count = _stair_sum(offset + ql, kl) - _stair_sum(offset, kl)
            total += torch.where((ql > 0) & (kl > 0), count, torch.zeros_like(count))
    return total


def block_pairs(blk) -> int:
    """Visible (query, key) pairs of one block: query i sees keys j with
    `lo <= j - i <= offset` (relative to the block), inside `[0, k_len)`."""
    if blk.offset is None and blk.lo is None:
        return blk.q_len * blk.k_len
    i = torch.arange(blk.q_len, dtype=torch.int64)
    first = i + blk.lo if blk.lo is not None else torch.zeros_like(i)
    last = i + blk.offset if blk.offset is not None else torch.full_like(i, blk.k_len - 1)
    return int((last.clamp(max=blk.k_len - 1) - first.clamp(min=0) + 1).clamp(min=0).sum())


def _masked_elements(layout, mask) -> torch.Tensor:
    world = layout.world_size
    total = torch.zeros(world, world, dtype=torch.int64)
    for i in range(world):
        for j in range(world):
            total[i, j] = sum(block_pairs(blk) for blk in visible_blocks(layout, i, j, mask))
    return total


# -- a rank's schedule and the problem -------------------------------------------------------


class Timeline:
    """Accumulates one rank's critical path: compute, transfers and what they leave exposed."""

    def __init__(self, overlap: float = 1.0):
        self.total = self.compute = self.comm = self.exposed = 0.0
        self.messages = 0
        self.overlap_fraction = overlap

    def work(self, seconds: float) -> None:
        self.total += seconds
        self.compute += seconds

    def wait(self, seconds: float, messages: int = 0) -> None:
        """A transfer nothing overlaps."""
        self.total += seconds
        self.comm += seconds
        self.exposed += seconds
        self.messages += messages

    def overlap(self, work: float, transfer: float, messages: int = 0) -> None:
        """Compute while a posted transfer flies; the step ends when both are done. Only
        `overlap_fraction` of the shorter one hides (CPU collectives share the cores)."""
        step = max(work, transfer) + (1.0 - self.overlap_fraction) * min(work, transfer)
        self.total += step
        self.compute += work
        self.comm += transfer
        self.exposed += step - work
        self.messages += messages


@dataclass(frozen=True)
class Problem:
    """One attention problem as the planner sees it (hashable: plans are cached on it):
    global `seq_len` over `world_size` ranks of `scheme`, `batch`, `heads`, `kv_heads`,
    `head_dim`, `dtype`, `causal`, and `training` (forward + backward) or not; a sliding
    `window` (`window_size`) and packed `documents` (cu_seqlens) change the work each
    rank's blocks do and, for ring, the bytes."""

    seq_len: int
    world_size: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    training: bool
    batch: int
    scheme: str
    window: Tuple[int, int] = (-1, -1)
    documents: Optional[Tuple[int, ...]] = None

    @property
    def mask(self):
        """What `visible_blocks` takes: the causal flag, or a `Mask` with the window."""
        return self.causal if self.window == (-1, -1) else Mask(self.causal, self.window)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def acc_size(self) -> int:
        """Bytes of an accumulator element (fp32; fp64 for fp64 inputs)."""
        return 8 if self.dtype == torch.float64 else 4

    @property
    def longest_local(self) -> int:
        """The longest local length, ceil(N / P)."""
        return -(-self.seq_len // self.world_size)

    def layout(self, rank: int = 0) -> SeqLayout:
        return SeqLayout.simulated(self.seq_len, self.world_size, rank, self.scheme, self.documents)

    def ranks(self) -> List[int]:
        """The ranks whose bytes are evaluated: all up to `EXACT_RANKS`, above it a sample."""
        p = self.world_size
        if p <= EXACT_RANKS:
            return list(range(p))
        return sorted({0, 1, p // 2 - 1, p // 2, p - 2, p - 1})

    def peak(self, saved: int, forward: int, backward: int) -> int:
        """Peak bytes a rank holds for one call: its inputs and output (q, k, v, out at the
        longest local length), plus, in training, what the forward saves for the backward
        and the larger of the two passes' transient buffers (`forward`, `backward`: in
        flight, gathered, accumulators); in inference, the forward's transients."""
        b, n, d = self.batch, self.longest_local, self.head_dim
        rows = b * n * self.heads * d
        inputs = (rows + 2 * b * n * self.kv_heads * d) * self.element_size + rows * self.element_size
        if self.training:
            return inputs + saved + max(forward, backward)
        return inputs + forward


def block_time(elements: torch.Tensor, flops_per_element: float, rate: float, overhead: float) -> torch.Tensor:
    """Seconds per block (float64 tensor) for visible-element counts `elements`."""
    return elements.double() * flops_per_element / rate + (elements > 0).double() * overhead


def busiest_bytes(prob: Problem, analytic_bytes: Callable, options: Dict) -> Dict[str, int]:
    """Per key of a strategy's `analytic_bytes(layout, batch, heads, kv_heads, head_dim,
    element_size, causal=..., **options)`, the largest value over `prob.ranks()`."""
    best: Dict[str, int] = {}
    for r in prob.ranks():
        got = analytic_bytes(prob.layout(r), prob.batch, prob.heads, prob.kv_heads, prob.head_dim,
                             prob.element_size, causal=prob.causal, window_size=prob.window, **options)
        for key, value in got.items():
            best[key] = max(best.get(key, 0), value)
    return best
