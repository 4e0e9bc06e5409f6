"""Choosing a strategy: the cost model, `plan()`, `plan_linear()`, `calibrate()` and "auto".

`plan(seq_len, world_size=P, heads=H, ...)` predicts, for every registered exact strategy
and each of its option values worth trying, the time of one attention call (forward, or
forward + backward when `training`) on one rank, and picks the fastest feasible one
(candidates within `TIE` (2%) of the fastest are a tie, broken by `TIE_PREFERENCE`).
Nothing here communicates: `plan` is pure arithmetic on a `Topology`, so every rank that
plans with the same inputs gets the same answer.

The model (all per rank; the busiest rank sets the pace):

- **Bytes** come from each strategy's own `analytic_bytes` (the numbers the tests check
  against the measured traffic), evaluated on `SeqLayout.simulated` layouts of every rank
  (a sample of ranks when P > 16) and maximised over ranks.
- **Transfers** are alpha-beta: a call of kind `p2p`, `alltoall`, `allgather`,
  `reduce_scatter` or `allreduce` among k ranks costs `steps(kind, k) * latency + bytes
  sent / bandwidth`, with `steps` = 1 for p2p, k-1 for all-to-all, all-gather and
  reduce-scatter (pairwise / ring algorithms), 2(k-1) for all-reduce. The link level is
  "intra" when every rank of the call sits in one node (`ranks_per_node` consecutive
  ranks), else "inter": the slowest link bounds a call that crosses nodes.
- **Compute** counts the visible score elements of every (query rank, key rank) block
  exactly from the layout's runs (`visible_elements`, equal to what `layout.visible_blocks`
  computes), so contiguous causal layouts load the last rank most and zigzag/stripe
  balance. A block costs `4 B h D` flops per visible score forward and `10 B h D` backward
  (the recomputing flash backward: 5 matmuls), at `compute_rate` / `backward_rate`, plus
  `kernel_overhead` seconds per block call.
- **Overlap** follows each strategy's schedule: ring steps take `max(compute, exchange)`
  (plus `1 - Topology.overlap` of the shorter: on CPUs the transfers share the cores)
  (the next exchange is posted before the current block); all-to-alls are fully exposed;
  the all-gather of the first KV-head chunk is exposed and the next chunk's gather hides
  behind the current chunk's work; reduce-scatters of dK/dV are exposed; TokenRing's
  first rows and last returns are exposed (`route="ring"`: the whole return stream).
- **Memory** is the peak of the buffers a strategy holds (inputs, gathered or in-flight
  K/V or queries, fp32 accumulators, and in training what the backward saves and
  allocates); kernel workspace and the rest of the model are not counted. A candidate
  over `Topology.memory_limit` is infeasible.
- Every call also pays the agreement check's 16-byte all-reduce (the same for all).

Feasibility comes from each strategy's registered `check` (run on meta tensors), so the
reasons a plan gives are the `ValueError` messages the strategy itself would raise.

What the model leaves out (read predictions as a ranking, not a stopwatch): ranks run in
lockstep per step (the slowest rank's block sets each ring step); per-step bytes are the
busiest rank's total spread evenly over the steps; the agreement check and Python
overhead outside block calls are not counted; link contention between concurrent
collectives is not modelled; kernel rates do not depend on block shape or mask
(calibration fits one rate over 16-, 256- and 1024-token blocks; on the project's CPU the
per-element rate measured flat from 1024- to 8192-token keys, and square causal pieces
cost up to ~1.5x per visible element at 1024 tokens, less for longer ones).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import socket
import statistics
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from .errors import brief

KINDS = ("p2p", "alltoall", "allgather", "reduce_scatter", "allreduce")
LEVELS = ("intra", "inter")
DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
               "float64": torch.float64}
SCHEMES = ("contiguous", "zigzag", "stripe")

# flops per visible score element and per (batch x head x head_dim): QK^T and PV forward;
# the flash backward recomputes QK^T and adds dV, dP, dQ, dK
FORWARD_FLOPS = 4
BACKWARD_FLOPS = 10
# ranks whose bytes and memory are evaluated one by one; above this, a sample
EXACT_RANKS = 16
# Candidates predicted within this fraction of the fastest are a tie (the calibrated
# rates and links move by a few percent between calibrations, and the model leaves out
# costs of that size); a tie goes to the strategy earliest in TIE_PREFERENCE: ring, whose
# step-by-step schedule the model times most faithfully and which has no head-count
# constraint, then the head-parallel ones (exposed all-to-alls, predictable), then the
# all-gather (memory grows with N), then TokenRing (partials merged on their way back).
TIE = 0.02
TIE_PREFERENCE = ("ring", "ulysses", "usp", "allgather", "token_ring")


def _preference(strategy: str) -> int:
    return TIE_PREFERENCE.index(strategy) if strategy in TIE_PREFERENCE else len(TIE_PREFERENCE)


def steps(kind: str, ranks: int) -> int:
    """Sequential latency steps of one call of `kind` among `ranks` ranks."""
    if ranks <= 1:
        return 0
    if kind == "p2p":
        return 1
    if kind == "allreduce":
        return 2 * (ranks - 1)
    return ranks - 1


# -- the machine ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """What the cost model knows about the machine, per rank.

    Bandwidths are bytes per second that one rank sends; latencies are seconds per
    sequential step of a call (see `steps`). `measured` overrides a (level, kind) pair
    with a calibrated `(latency, bandwidth)`: `(("intra", "alltoall", 2e-5, 1.1e11), ...)`.
    `compute_rate` / `backward_rate`: flop/s of the block kernel's forward / backward
    (`FORWARD_FLOPS` / `BACKWARD_FLOPS` per visible score element and B H D);
    `kernel_overhead`: seconds per block call. `overlap`: the fraction of a transfer that
    hides behind compute posted with it (1: fully, 0: they serialize). `memory_limit`: bytes a rank may spend on
    attention buffers (None: no limit).
    """

    ranks_per_node: int = 1
    intra_bandwidth: float = 1.5e9
    intra_latency: float = 1e-4
    inter_bandwidth: float = 1.0e9
    inter_latency: float = 1e-4
    compute_rate: float = 3e10
    backward_rate: float = 3e10
    kernel_overhead: float = 5e-5
    overlap: float = 1.0
    measured: Tuple[Tuple[str, str, float, float], ...] = ()
    memory_limit: Optional[float] = None
    device: str = "cpu"
    source: str = "given"

    def __post_init__(self):
        if isinstance(self.ranks_per_node, bool) or not isinstance(self.ranks_per_node, int) or self.ranks_per_node < 1:
            raise ValueError(f"ranks_per_node: expected a positive int, got {self.ranks_per_node!r}")
        for name in ("intra_bandwidth", "inter_bandwidth", "compute_rate", "backward_rate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: expected a positive finite number, got {brief(value)}")
        for name in ("intra_latency", "inter_latency", "kernel_overhead"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name}: expected a finite number >= 0, got {brief(value)}")
        if not (isinstance(self.overlap, (int, float)) and 0 <= self.overlap <= 1):
            raise ValueError(f"overlap: expected a fraction in [0, 1], got {self.overlap!r}")
        for entry in self.measured:
            if len(entry) != 4 or entry[0] not in LEVELS or entry[1] not in KINDS:
                raise ValueError(f"measured: expected (level in {LEVELS}, kind in {KINDS}, latency, bandwidth) "
                                 f"entries, got {brief(entry)}")

    def link(self, level: str, kind: str) -> Tuple[float, float]:
        """(latency per step, bandwidth) of a call of `kind` at `level`."""
        for lv, kd, latency, bandwidth in self.measured:
            if (lv, kd) == (level, kind):
                return latency, bandwidth
        if level == "intra":
            return self.intra_latency, self.intra_bandwidth
        return self.inter_latency, self.inter_bandwidth

    def transfer(self, level: str, kind: str, ranks: int, nbytes: float, calls: int = 1) -> float:
        """Seconds for `calls` calls of `kind` among `ranks` ranks sending `nbytes` in all."""
        if ranks <= 1 or calls == 0:
            return 0.0
        latency, bandwidth = self.link(level, kind)
        return calls * steps(kind, ranks) * latency + nbytes / bandwidth

    def level(self, members: Sequence[int]) -> str:
        """"intra" when all `members` (ranks) share a node, else "inter"."""
        nodes = {m // self.ranks_per_node for m in members}
        return "intra" if len(nodes) <= 1 else "inter"

    def replace(self, **changes) -> "Topology":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict:
        out = dataclasses.asdict(self)
        out["measured"] = [list(m) for m in self.measured]
        return out

    @classmethod
    def from_dict(cls, data: Dict) -> "Topology":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"topology: unknown fields {unknown}; expected some of {sorted(known)}")
        data = dict(data)
        data["measured"] = tuple(tuple(m) for m in data.get("measured", ()))
        return cls(**data)

    def describe(self) -> str:
        def rate(x):
            return f"{x / 1e9:.3g} GB/s"

        text = (f"{self.source}: {self.ranks_per_node} rank(s) per node; intra {rate(self.intra_bandwidth)}, "
                f"{self.intra_latency * 1e6:.3g} us; inter {rate(self.inter_bandwidth)}, "
                f"{self.inter_latency * 1e6:.3g} us; block kernel {self.compute_rate / 1e12:.3g} TFLOP/s fwd, "
                f"{self.backward_rate / 1e12:.3g} bwd, {self.kernel_overhead * 1e6:.3g} us/call; overlap "
                f"{self.overlap:.2g}")
        if self.measured:
            text += "; measured: " + ", ".join(
                f"{lv} {kd} {lat * 1e6:.3g} us/step {rate(bw)}" for lv, kd, lat, bw in self.measured)
        if self.memory_limit:
            text += f"; memory limit {self.memory_limit / 2**30:.3g} GiB/rank"
        return text


def _local_world_size(world_size: Optional[int]) -> Optional[int]:
    env = os.environ.get("LOCAL_WORLD_SIZE")
    if env and env.isdigit() and int(env) > 0:
        return int(env) if world_size is None else min(int(env), world_size)
    return None


def default_topology(device: str = "cpu", dtype=torch.float32, world_size: Optional[int] = None,
                     ranks_per_node: Optional[int] = None) -> Topology:
    """The topology "auto" assumes without a calibration, by device type.

    - "cpu" (gloo over loopback, one node): 1.5 GB/s and 100 us per step between ranks,
      30 GFLOP/s per rank, 50 us per block call, half of a transfer hidden behind compute
      (gloo's threads share the cores); ranks per node: `LOCAL_WORLD_SIZE`, else the world.
    - "cuda": NVLink/NVSwitch-like within a node (300 GB/s, 10 us), InfiniBand-like
      between nodes (one 400 Gb/s NIC per GPU: 40 GB/s, 25 us); block kernel 300 / 200
      TFLOP/s (fwd / bwd) for float16/bfloat16, 15 for float32 (no fused CUDA kernel),
      2 for float64; 20 us per block call; transfers fully hidden behind compute; ranks per node: `LOCAL_WORLD_SIZE`, else the
      visible GPUs, else the world.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    dtype = _dtype(dtype)
    local = ranks_per_node or _local_world_size(world_size)
    if device == "cpu":
        return Topology(ranks_per_node=local or world_size or 1, intra_bandwidth=1.5e9, intra_latency=1e-4,
                        inter_bandwidth=1.0e9, inter_latency=1e-4, compute_rate=3e10, backward_rate=3e10,
                        kernel_overhead=5e-5, overlap=0.5, device="cpu", source="default cpu (gloo loopback)")
    if local is None:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        local = min(visible, world_size) if visible and world_size else (visible or world_size or 8)
    fwd, bwd = {torch.float16: (3e14, 2e14), torch.bfloat16: (3e14, 2e14), torch.float32: (1.5e13, 1.5e13),
                torch.float64: (2e12, 2e12)}[dtype]
    return Topology(ranks_per_node=local, intra_bandwidth=3e11, intra_latency=1e-5, inter_bandwidth=4e10,
                    inter_latency=2.5e-5, compute_rate=fwd, backward_rate=bwd, kernel_overhead=2e-5, device="cuda",
                    source="default cuda (NVLink-like intra, InfiniBand-like inter)")


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise ValueError(f"dtype: expected one of {list(DTYPE_NAMES)} (or the torch dtype), got {dtype!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- exact counts of visible scores -----------------------------------------------------------


def _stair_sum(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum over x <= y of clamp(x, 0, m), for int64 tensors."""
    y = y.clamp_min(0)
    inside = torch.minimum(y, m)
    return inside * (inside + 1) // 2 + (y - inside) * m


def visible_elements(layout, causal: bool) -> torch.Tensor:
    """`[P, P]` int64: visible (query, key) score pairs of rank i's queries against rank
    j's keys, exactly as `layout.visible_blocks` masks them (for a `SeqLayout` or a
    `GroupLayout`). Counted from the runs in closed form, so it costs O(P^2) tensor work."""
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
            # with the offset of `layout._pair_offset` (a one-token run takes the other's stride)
            stride = torch.where(ql == 1, kst, qst)
            offset = torch.div(qs - ks, stride, rounding_mode="floor")
            count = _stair_sum(offset + ql, kl) - _stair_sum(offset, kl)
            total += torch.where((ql > 0) & (kl > 0), count, torch.zeros_like(count))
    return total


# -- candidates and their costs ---------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One strategy with fixed options, and what the model predicts for it (seconds,
    bytes; per rank, the busiest rank)."""

    strategy: str
    options: Tuple[Tuple[str, object], ...]
    feasible: bool
    reason: Optional[str] = None
    time_s: float = math.inf
    compute_s: float = 0.0
    comm_s: float = 0.0
    exposed_s: float = 0.0
    bytes_forward: int = 0
    bytes_backward: int = 0
    messages: int = 0
    peak_memory: int = 0

    @property
    def label(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.strategy}({opts})" if opts else self.strategy

    @property
    def kwargs(self) -> Dict[str, object]:
        return dict(self.options)


class _Timeline:
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
class _Problem:
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

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def acc_size(self) -> int:
        return 8 if self.dtype == torch.float64 else 4

    def layout(self, rank: int = 0):
        from .layout import SeqLayout

        return SeqLayout.simulated(self.seq_len, self.world_size, rank, self.scheme)

    def ranks(self) -> List[int]:
        p = self.world_size
        if p <= EXACT_RANKS:
            return list(range(p))
        return sorted({0, 1, p // 2 - 1, p // 2, p - 2, p - 1})


def _block_time(elements: torch.Tensor, flops_per_element: float, rate: float, overhead: float) -> torch.Tensor:
    """Seconds per block (float64 tensor) for visible-element counts `elements`."""
    return elements.double() * flops_per_element / rate + (elements > 0).double() * overhead


def _busiest_bytes(prob: _Problem, strategy: str, options: Dict) -> Dict[str, int]:
    """Per key of the strategy's `analytic_bytes`, the largest value over the ranks."""
    from .registry import analytic_bytes

    best: Dict[str, int] = {}
    for r in prob.ranks():
        got = analytic_bytes(strategy, prob.layout(r), prob.batch, prob.heads, prob.kv_heads, prob.head_dim,
                             prob.element_size, causal=prob.causal, **options)
        for key, value in got.items():
            best[key] = max(best.get(key, 0), value)
    return best


def _ring_phase(line: _Timeline, prob: _Problem, topo: Topology, ring_layout, heads: int, fwd_bytes: float,
                grad_bytes: float, level: str, backward: bool) -> None:
    """Ring attention over `ring_layout` (R members) with `heads` query heads per member."""
    size = ring_layout.world_size
    visible = visible_elements(ring_layout, prob.causal)
    per = prob.batch * heads * prob.head_dim
    if backward:
        blocks = _block_time(visible, BACKWARD_FLOPS * per, topo.backward_rate, topo.kernel_overhead)
    else:
        blocks = _block_time(visible, FORWARD_FLOPS * per, topo.compute_rate, topo.kernel_overhead)
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


def _cost_ring(prob: _Problem, topo: Topology, options: Dict, nbytes: Dict[str, int]) -> _Timeline:
    layout = prob.layout()
    level = topo.level(range(prob.world_size))
    line = _Timeline(topo.overlap)
    fwd = nbytes["forward"]
    _ring_phase(line, prob, topo, layout, prob.heads, fwd, 0.0, level, backward=False)
    if prob.training:
        _ring_phase(line, prob, topo, layout, prob.heads, fwd, nbytes["backward"] - fwd, level, backward=True)
    return line


def _cost_head_parallel(prob: _Problem, topo: Topology, size: int) -> Tuple[_Timeline, Dict[str, int]]:
    """Ulysses inside groups of `size` ranks, ring across the groups (USP; size = P: Ulysses)."""
    from .layout import GroupLayout
    from .strategies import ulysses

    world = prob.world_size
    groups = [list(range(g * size, (g + 1) * size)) for g in range(world // size)]
    a2a = {"forward": 0, "backward": 0}
    for r in prob.ranks():
        members = groups[r // size]
        got = ulysses.analytic_bytes(prob.layout(r), prob.batch, prob.heads, prob.kv_heads, prob.head_dim,
                                     prob.element_size, members=members)
        for key in a2a:
            a2a[key] = max(a2a[key], got[key])
    name = "ulysses" if size == world else "usp"
    total = _busiest_bytes(prob, name, {} if size == world else {"ulysses_size": size})
    around = {key: max(0, total[key] - a2a[key]) for key in a2a}  # the ring across groups
    a2a_level = "intra" if all(topo.level(g) == "intra" for g in groups) else "inter"
    # ring m joins member m of every group; it is intra-node only if each such ring is
    ring_level = "intra" if all(topo.level([g[m] for g in groups]) == "intra" for m in range(size)) else "inter"
    ring_layout = GroupLayout(prob.layout(), groups, 0)
    heads = prob.heads // size
    line = _Timeline(topo.overlap)
    # the all-to-alls are exposed: q/k/v in and the output back (forward); dO in and dQ/dK/dV back
    line.wait(topo.transfer(a2a_level, "alltoall", size, a2a["forward"], calls=2), 2 * steps("alltoall", size))
    _ring_phase(line, prob, topo, ring_layout, heads, around["forward"], 0.0, ring_level, backward=False)
    if prob.training:
        line.wait(topo.transfer(a2a_level, "alltoall", size, a2a["backward"], calls=2), 2 * steps("alltoall", size))
        _ring_phase(line, prob, topo, ring_layout, heads, around["forward"], around["backward"] - around["forward"],
                    ring_level, backward=True)
    return line, total


def _cost_allgather(prob: _Problem, topo: Topology, options: Dict, nbytes: Dict[str, int]) -> _Timeline:
    chunk = options.get("kv_head_chunk") or prob.kv_heads
    chunks = math.ceil(prob.kv_heads / chunk)
    world = prob.world_size
    level = topo.level(range(world))
    visible = visible_elements(prob.layout(), prob.causal)
    per = prob.batch * prob.heads * prob.head_dim
    calls = (visible > 0).sum(1).double()
    fwd_work = float((visible.sum(1).double() * FORWARD_FLOPS * per / topo.compute_rate
                      + calls * topo.kernel_overhead * chunks).max()) / chunks
    bwd_work = float((visible.sum(1).double() * BACKWARD_FLOPS * per / topo.backward_rate
                      + calls * topo.kernel_overhead * chunks).max()) / chunks
    gather = topo.transfer(level, "allgather", world, nbytes["forward"] / chunks)
    msgs = steps("allgather", world)
    line = _Timeline(topo.overlap)

    def gathered_pass(work: float, scatter: float) -> None:
        line.wait(gather, msgs)  # the first chunk's gather: nothing to hide it behind
        for i in range(chunks):
            line.overlap(work, gather if i + 1 < chunks else 0.0, msgs if i + 1 < chunks else 0)
            if scatter:
                line.wait(scatter, steps("reduce_scatter", world))

    gathered_pass(fwd_work, 0.0)
    if prob.training:
        scatter = topo.transfer(level, "reduce_scatter", world, (nbytes["backward"] - nbytes["forward"]) / chunks)
        gathered_pass(bwd_work, scatter)
    return line


def _cost_token_ring(prob: _Problem, topo: Topology, options: Dict, nbytes: Dict[str, int]) -> _Timeline:
    route = options.get("route", "direct")
    world = prob.world_size
    level = topo.level(range(world))
    visible = visible_elements(prob.layout(), prob.causal)
    per = prob.batch * prob.heads * prob.head_dim
    rows = torch.arange(world)
    line = _Timeline(topo.overlap)
    hops = max(1, world - 1)

    def one_pass(flops: float, rate: float, outgoing: float, returning: float) -> None:
        blocks = _block_time(visible, flops * per, rate, topo.kernel_overhead)
        # at step t rank r attends the queries of rank r-t to its own keys
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
    return line


def _peak_memory(prob: _Problem, strategy: str, options: Dict) -> int:
    """Peak bytes of the buffers a rank holds: its inputs and output, plus (training) what
    the forward saves for the backward, plus the larger of the forward's and the
    backward's transient buffers (in flight, gathered, accumulators). Kernel workspace
    and the rest of the model are not counted."""
    b, h, hkv, d = prob.batch, prob.heads, prob.kv_heads, prob.head_dim
    e, a = prob.element_size, prob.acc_size
    world = prob.world_size
    n = -(-prob.seq_len // world)  # the longest local length
    rows, lse = b * n * h * d, b * h * n
    inputs = (rows + 2 * b * n * hkv * d) * e + rows * e  # q, k, v and the output
    if strategy == "ring":
        kv = 2 * b * n * hkv * d
        saved = 2 * rows * e + lse * a  # q in the kernel's layout, out, lse
        fwd = 3 * kv * e + rows * a + lse * 8
        bwd = 2 * kv * e + 3 * kv * a + rows * (a + e)
    elif strategy in ("ulysses", "usp"):
        from .strategies.ulysses import kv_heads_per_member

        size = world if strategy == "ulysses" else options["ulysses_size"]
        hq, hk = h // size, kv_heads_per_member(h, hkv, size)
        ng = n * size  # the group's tokens
        full = b * ng * (hq + 2 * hk) * d
        ring_kv = 2 * b * ng * hk * d if size < world else 0
        saved = full * e + b * ng * hq * d * e + b * hq * ng * a
        fwd = 2 * full * e + 2 * ring_kv * e + b * ng * hq * d * (a + 2 * e) + b * hq * ng * 8
        bwd = 2 * b * ng * hq * d * e + full * (a + 2 * e) + 2 * ring_kv * e + 3 * ring_kv * a
    elif strategy == "allgather":
        chunk = options.get("kv_head_chunk") or hkv
        gathered = 2 * b * world * n * chunk * d * e * (2 if chunk < hkv else 1) + 2 * b * n * chunk * d * e
        saved = rows * e + lse * a
        fwd = gathered + rows * a + lse * 8
        bwd = gathered + 2 * b * world * n * chunk * d * a + rows * a + 2 * b * n * hkv * d * a
    elif strategy == "token_ring":
        saved = rows * e + lse * a
        fwd = 2 * rows * e + 2 * (rows * a + lse * a) + rows * a + lse * 8
        bwd = 2 * (3 * rows * e + lse * a) + 2 * rows * a + rows * a + 2 * b * n * hkv * d * a
    else:
        raise ValueError(f"strategy: no memory model for {strategy!r}")
    if prob.training:
        return inputs + saved + max(fwd, bwd)
    return inputs + fwd


# Candidates the planner knows how to cost: strategy -> option sets (a function of the problem)
def _candidate_options(prob: _Problem) -> List[Tuple[str, Dict]]:
    out: List[Tuple[str, Dict]] = [("ring", {}), ("ulysses", {})]
    world = prob.world_size
    out += [("usp", {"ulysses_size": u}) for u in range(2, world) if world % u == 0]
    out.append(("allgather", {}))
    if prob.kv_heads > 1:
        out.append(("allgather", {"kv_head_chunk": 1}))
    out.append(("token_ring", {"route": "direct"}))
    out.append(("token_ring", {"route": "ring"}))
    return out


def _not_planned(prob: _Problem, strategy: str, options: Dict) -> Optional[str]:
    """Why the planner leaves out a candidate it could cost, or None."""
    if strategy == "token_ring" and options.get("route") == "ring" and prob.world_size > EXACT_RANKS:
        return (f"token_ring: route='ring' is not planned above {EXACT_RANKS} ranks, got {prob.world_size}: its "
                f"exact volume takes O(P^3) block enumerations to evaluate, and its P-1 exposed return hops make "
                f"it the slower route in this model (name it explicitly to use it)")
    return None


_COSTS = {"ring": _cost_ring, "allgather": _cost_allgather, "token_ring": _cost_token_ring}


def _evaluate(prob: _Problem, topo: Topology, strategy: str, options: Dict) -> Candidate:
    from .registry import check_strategy

    opts = tuple(sorted(options.items()))
    meta = dict(device="meta", dtype=prob.dtype)
    n = prob.layout(0).local_len
    q = torch.empty(prob.batch, n, prob.heads, prob.head_dim, **meta)
    kv = torch.empty(prob.batch, n, prob.kv_heads, prob.head_dim, **meta)
    try:
        check_strategy(strategy, q, kv, kv, prob.layout(0), options)
    except ValueError as exc:
        return Candidate(strategy, opts, False, str(exc))
    skipped = _not_planned(prob, strategy, options)
    if skipped:
        return Candidate(strategy, opts, False, skipped)
    if strategy in ("ulysses", "usp"):
        size = prob.world_size if strategy == "ulysses" else options["ulysses_size"]
        line, nbytes = _cost_head_parallel(prob, topo, size)
    else:
        nbytes = _busiest_bytes(prob, strategy, options)
        line = _COSTS[strategy](prob, topo, options, nbytes)
    # every call first agrees on its arguments: one 16-byte all-reduce, the same for all
    line.wait(topo.transfer(topo.level(range(prob.world_size)), "allreduce", prob.world_size, 16.0),
              steps("allreduce", prob.world_size))
    memory = _peak_memory(prob, strategy, options)
    reason = None
    if topo.memory_limit is not None and memory > topo.memory_limit:
        reason = (f"memory: needs about {memory / 2**30:.3g} GiB per rank, more than the topology's memory_limit "
                  f"of {topo.memory_limit / 2**30:.3g} GiB")
    return Candidate(strategy, opts, reason is None, reason, line.total, line.compute, line.comm, line.exposed,
                     int(nbytes["forward"]), int(nbytes["backward"]) if prob.training else 0, line.messages,
                     int(memory))


# -- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The planner's answer: `strategy` and `options` to pass to `seqpar.attention`, and
    every candidate: the choice first, the other feasible ones by predicted time, then the
    infeasible with reasons. The choice is the fastest, or a candidate tied with it (within
    `TIE`) that comes earlier in `TIE_PREFERENCE`."""

    problem: Dict[str, object]
    topology: Topology
    candidates: Tuple[Candidate, ...]

    @property
    def choice(self) -> Candidate:
        return self.candidates[0]

    @property
    def strategy(self) -> str:
        return self.choice.strategy

    @property
    def options(self) -> Dict[str, object]:
        return self.choice.kwargs

    @property
    def feasible(self) -> Tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if c.feasible)

    @property
    def infeasible(self) -> Tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if not c.feasible)

    def candidate(self, strategy: str, **options) -> Candidate:
        """The candidate of `strategy` with exactly these options."""
        key = tuple(sorted(options.items()))
        for c in self.candidates:
            if c.strategy == strategy and c.options == key:
                return c
        raise KeyError(f"no candidate {strategy}({key}) in this plan")

    def __str__(self) -> str:
        p = self.problem
        head = (f"seqpar plan: N={p['seq_len']}, P={p['world_size']}, B={p['batch']}, H={p['heads']}, "
                f"H_kv={p['kv_heads']}, D={p['head_dim']}, {p['dtype']}, {'causal' if p['causal'] else 'full'}, "
                f"{p['scheme']}, {'training (fwd+bwd)' if p['training'] else 'inference (fwd)'}")
        lines = [head, f"topology: {self.topology.describe()}", "",
                 "|   | strategy | predicted ms | compute ms | comm ms | exposed comm ms | MiB sent/rank fwd | "
                 "bwd | latency steps | peak MiB/rank |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for c in self.feasible:
            mark = "*" if c is self.choice else " "
            lines.append(
                f"| {mark} | {c.label} | {c.time_s * 1e3:.3f} | {c.compute_s * 1e3:.3f} | {c.comm_s * 1e3:.3f} | "
                f"{c.exposed_s * 1e3:.3f} | {c.bytes_forward / 2**20:.2f} | "
                f"{c.bytes_backward / 2**20 if p['training'] else 0:.2f} | {c.messages} | "
                f"{c.peak_memory / 2**20:.1f} |")
        if self.infeasible:
            lines += ["", "infeasible:"]
            lines += [f"  {c.label}: {c.reason}" for c in self.infeasible]
        lines += ["", f"chosen: {self.choice.label} (strategy={self.strategy!r}, options={self.options})"]
        fastest = min(self.feasible, key=lambda c: c.time_s)
        if fastest is not self.choice:
            lines.append(f"  (predicted within {TIE:.0%} of the fastest, {fastest.label}: a tie, which goes to "
                         f"{self.choice.strategy} by TIE_PREFERENCE)")
        return "\n".join(lines)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {brief(value)}")
    return value


def plan(seq_len: int, *, world_size: int, heads: int, kv_heads: Optional[int] = None, head_dim: int = 128,
         dtype="bfloat16", causal: bool = True, training: bool = True, batch: int = 1,
         scheme: str = "contiguous", topology: Optional[Topology] = None) -> Plan:
    """Predict every exact strategy's time on this problem and pick the fastest feasible one
    (or, among candidates within `TIE` of the fastest, the first in `TIE_PREFERENCE`).

    Problem: global `seq_len` N over `world_size` P ranks, `heads` H query heads and
    `kv_heads` H_kv (default H) of `head_dim` D, `dtype` (name or torch dtype), `causal`,
    `training` (forward + backward) or inference (forward only), `batch` B, and the layout
    `scheme` ("contiguous", "zigzag", "stripe"). `topology`: the machine (default:
    `default_topology` for this machine's device type with P ranks).

    Returns a `Plan`: `plan.strategy`, `plan.options` (for `seqpar.attention(...,
    strategy=plan.strategy, **plan.options)`), every candidate's predicted time, compute,
    transfer time, exposed transfer time, bytes sent per rank (from the strategies'
    `analytic_bytes`), latency steps and peak memory, and infeasible candidates with the
    reason. `print(plan)` shows the table. Deterministic: equal inputs, equal plan.
    """
    _positive_int("seq_len", seq_len)
    _positive_int("world_size", world_size)
    _positive_int("heads", heads)
    kv_heads = heads if kv_heads is None else kv_heads
    _positive_int("kv_heads", kv_heads)
    _positive_int("head_dim", head_dim)
    _positive_int("batch", batch)
    if heads % kv_heads:
        raise ValueError(f"kv_heads: expected a divisor of heads={heads}, got {kv_heads}")
    if seq_len < world_size:
        raise ValueError(f"seq_len: expected at least world_size={world_size} (a token per rank), got {seq_len}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    for name, value in (("causal", causal), ("training", training)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    dtype = _dtype(dtype)
    if topology is None:
        topology = default_topology("cuda" if torch.cuda.is_available() else "cpu", dtype, world_size)
    elif not isinstance(topology, Topology):
        raise TypeError(f"topology: expected a seqpar.dispatch.Topology or None, got {type(topology).__name__}")
    prob = _Problem(seq_len, world_size, heads, kv_heads, head_dim, dtype, causal, training, batch, scheme)
    return _plan(prob, topology)


@lru_cache(maxsize=256)
def _plan(prob: _Problem, topology: Topology) -> Plan:
    from .registry import names as registered_strategies

    known = set(registered_strategies())
    evaluated = [_evaluate(prob, topology, s, o) for s, o in _candidate_options(prob) if s in known]
    order = {id(c): i for i, c in enumerate(evaluated)}
    feasible = sorted((c for c in evaluated if c.feasible), key=lambda c: (c.time_s, c.messages, order[id(c)]))
    infeasible = [c for c in evaluated if not c.feasible]
    if not feasible:
        reasons = "; ".join(f"{c.label}: {c.reason}" for c in infeasible)
        raise ValueError(f"topology: no strategy can serve this problem on this topology ({reasons})")
    # predictions closer than the model's resolution are a tie: the tie goes to the
    # strategy earliest in TIE_PREFERENCE, the rest stay sorted by predicted time
    tied = [c for c in feasible if c.time_s <= feasible[0].time_s * (1.0 + TIE)]
    choice = min(tied, key=lambda c: (_preference(c.strategy), c.time_s, c.messages, order[id(c)]))
    feasible = [choice] + [c for c in feasible if c is not choice]
    problem = {"seq_len": prob.seq_len, "world_size": prob.world_size, "heads": prob.heads,
               "kv_heads": prob.kv_heads, "head_dim": prob.head_dim, "dtype": _dtype_name(prob.dtype),
               "causal": prob.causal, "training": prob.training, "batch": prob.batch, "scheme": prob.scheme}
    return Plan(problem, topology, tuple(feasible + infeasible))


# -- linear attention -------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearCandidate:
    method: str
    scan_pieces: int
    time_s: float
    compute_s: float
    exposed_s: float
    bytes_forward: int
    bytes_backward: int


@dataclass(frozen=True)
class LinearPlan:
    """`method` and `scan_pieces` for `seqpar.linear_attention`, and every method's prediction."""

    problem: Dict[str, object]
    topology: Topology
    candidates: Tuple[LinearCandidate, ...]

    @property
    def method(self) -> str:
        return self.candidates[0].method

    @property
    def scan_pieces(self) -> int:
        return self.candidates[0].scan_pieces

    def __str__(self) -> str:
        p = self.problem
        lines = [f"seqpar linear plan: N={p['seq_len']}, P={p['world_size']}, B={p['batch']}, H={p['heads']}, "
                 f"Dk={p['key_dim']}, Dv={p['value_dim']}, {p['dtype']}, decay={p['decay']}, "
                 f"{'training' if p['training'] else 'inference'}",
                 f"topology: {self.topology.describe()}", "",
                 "|   | method | scan_pieces | predicted ms | compute ms | exposed comm ms | bytes/rank fwd | bwd |",
                 "|---|---|---|---|---|---|---|---|"]
        for i, c in enumerate(self.candidates):
            lines.append(f"| {'*' if i == 0 else ' '} | {c.method} | {c.scan_pieces} | {c.time_s * 1e3:.3f} | "
                         f"{c.compute_s * 1e3:.3f} | {c.exposed_s * 1e3:.3f} | {c.bytes_forward} | "
                         f"{c.bytes_backward} |")
        return "\n".join(lines)


def _chain_links(topo: Topology, world: int) -> List[Tuple[float, float]]:
    """(latency, bandwidth) of each hop r -> r+1 of a chain over the ranks."""
    return [topo.link(topo.level([r, r + 1]), "p2p") for r in range(world - 1)]


def _scan_time(links: List[Tuple[float, float]], nbytes: float, pieces: int) -> float:
    """The last rank's wait for a value of `nbytes` sent down the chain in `pieces` pieces:
    the first piece crosses every hop, the others follow at the pace of the slowest hop."""
    if not links:
        return 0.0
    piece = nbytes / pieces
    first = sum(lat + piece / bw for lat, bw in links)
    slowest = max(lat + piece / bw for lat, bw in links)
    return first + (pieces - 1) * slowest


def best_scan_pieces(topo: Topology, world: int, nbytes: int) -> int:
    """The All-Scan's pieces K in [1, 64] that minimise `_scan_time` on this topology."""
    if world <= 2:
        return 1
    links = _chain_links(topo, world)
    return min(range(1, 65), key=lambda k: (_scan_time(links, nbytes, k), k))


def plan_linear(seq_len: int, *, world_size: int, heads: int, key_dim: int = 128, value_dim: Optional[int] = None,
                batch: int = 1, dtype="bfloat16", decay: bool = True, training: bool = True,
                chunk_size: int = 64, topology: Optional[Topology] = None) -> LinearPlan:
    """Choose `method` ("ring", "allgather", "allscan") and `scan_pieces` for linear attention.

    Per rank, the intra-chunk work is `(2 C (Dk + Dv) + 4 Dk Dv) B H n` flops forward (C the
    chunk size, n = N/P tokens) and 2.5x that backward, at the topology's compute rate.
    The state `S = B H Dk Dv` fp32 then crosses the ranks (see `strategies/linear.py`):
    ring waits for `(P-1)` whole-state hops, allscan for the pipelined scan (first piece
    through every hop, then one piece per step of the slowest hop), allgather for one
    all-gather of (P-1) states minus the intra-chunk work it hides behind, plus folding
    the gathered states. Returns a `LinearPlan` (`.method`, `.scan_pieces`, a table).
    """
    from .kernels.linear import state_bytes

    for name, value in (("seq_len", seq_len), ("world_size", world_size), ("heads", heads),
                        ("key_dim", key_dim), ("batch", batch), ("chunk_size", chunk_size)):
        _positive_int(name, value)
    value_dim = key_dim if value_dim is None else _positive_int("value_dim", value_dim)
    dtype = _dtype(dtype)
    if topology is None:
        topology = default_topology("cuda" if torch.cuda.is_available() else "cpu", dtype, world_size)
    world = world_size
    s = state_bytes(batch, heads, key_dim, value_dim, dtype)
    g = batch * heads * (8 if dtype == torch.float64 else 4) if decay else 0
    n = -(-seq_len // world)
    flops = (2 * chunk_size * (key_dim + value_dim) + 4 * key_dim * value_dim) * batch * heads * n
    intra = {"forward": flops / topology.compute_rate, "backward": 2.5 * flops / topology.backward_rate}
    links = _chain_links(topology, world)
    level = topology.level(range(world))
    pieces = best_scan_pieces(topology, world, s)
    # folding the gathered states costs one multiply-add per state element per earlier rank
    fold = 2 * (world - 1) * (s // 4) / topology.compute_rate
    phases = ("forward", "backward") if training else ("forward",)
    out = []
    for method, k in (("allgather", 1), ("allscan", pieces), ("ring", 1)):
        exposed = 0.0
        for phase in phases:
            if method == "allgather":
                payload = (world - 1) * (s + (g if phase == "forward" else 0))
                gather = topology.transfer(level, "allgather", world, payload)
                exposed += max(0.0, gather - intra[phase]) + fold
            else:
                exposed += _scan_time(links, s, k)
        compute = sum(intra[p] for p in phases)
        if world == 1:
            sent = (0, 0)
        elif method == "allgather":
            sent = ((world - 1) * (s + g), (world - 1) * s)
        else:
            sent = (s, s)
        out.append(LinearCandidate(method, k, compute + exposed, compute, exposed, sent[0],
                                   sent[1] if training else 0))
    order = {"allgather": 0, "allscan": 1, "ring": 2}
    out.sort(key=lambda c: (c.time_s, order[c.method]))
    problem = {"seq_len": seq_len, "world_size": world, "heads": heads, "key_dim": key_dim, "value_dim": value_dim,
               "batch": batch, "dtype": _dtype_name(dtype), "decay": decay, "training": training}
    return LinearPlan(problem, topology, tuple(out))


# -- calibration ------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where calibrations are cached: `$SEQPAR_CACHE_DIR`, else `$XDG_CACHE_HOME/seqpar`,
    else `~/.cache/seqpar`."""
    if os.environ.get("SEQPAR_CACHE_DIR"):
        return Path(os.environ["SEQPAR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "seqpar"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}"


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def cache_path(backend: str, world_size: int, device: torch.device, dtype, hostname: Optional[str] = None) -> Path:
    """The calibration file of a group: `calibration-<backend>-p<P>-<device>-<dtype>-<host>.json`.
    Each host keeps its own file (every rank can find it without asking its peers); all
    ranks of a calibrated group write the same topology."""
    host = hostname or socket.gethostname()
    name = f"calibration-{backend}-p{world_size}-{_device_name(device)}-{_dtype_name(_dtype(dtype))}-{host}.json"
    return cache_dir() / _slug(name)


def load_calibration(path: Path) -> Optional[Topology]:
    """The Topology stored at `path`, or None when there is no readable file."""
    try:
        data = json.loads(Path(path).read_text())
        return Topology.from_dict(data["topology"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fit(points: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """`time = intercept + bytes * slope` by least squares on relative residuals (each
    point weighs 1/time^2, so small messages fit their latency as well as large ones fit
    their bandwidth); both kept positive."""
    w = [1.0 / max(y, 1e-12) ** 2 for _, y in points]
    sw = sum(w)
    mx = sum(wi * x for wi, (x, _) in zip(w, points)) / sw
    my = sum(wi * y for wi, (_, y) in zip(w, points)) / sw
    var = sum(wi * (x - mx) ** 2 for wi, (x, _) in zip(w, points))
    slope = sum(wi * (x - mx) * (y - my) for wi, (x, y) in zip(w, points)) / var if var else 0.0
    if slope <= 0:
        # noise swamped the size dependence. Charging all of a point's time to its bytes
        # would turn a latency-bound small message into a bandwidth of a few MB/s (that
        # once priced Ulysses 30x too high); instead the smallest message gives the
        # latency and the largest one's extra time, at least a tenth of it, the bytes
        (x0, y0), (x1, y1) = min(points), max(points)
        slope = max(y1 - y0, 0.1 * y1) / x1
        return max(y0 - slope * x0, 1e-7), slope
    intercept = max(my - slope * mx, 1e-7)
    return intercept, slope


def _timed(fn, repeats: int, group, device, calls: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` on this rank, every timing started together
    on all ranks (a barrier first), so the ranks contend for the machine as they will when
    attention runs; one untimed call first (connections, buffers, caches). A timing of
    `calls` calls back to back gives seconds per call."""
    import torch.distributed as dist

    fn()
    times = []
    for _ in range(repeats):
        dist.barrier(group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


# calls per timing window at most: the smallest CPU block (16 tokens, ~30 us a call) gets
# a window of ~30 ms instead of the full one (still many scheduler slices)
_MAX_CALLS = 1000


def _calls_to_fill(fns: Sequence, window: float, group, device) -> List[int]:
    """For each of `fns`, how many calls back to back take about `window` seconds on the
    slowest rank (at most `_MAX_CALLS`; the same counts on every rank). A kernel timed
    alone can finish inside one scheduler time slice while its rank has the core to itself;
    with more ranks than cores that overstates the rate the ranks get together, which a
    window of many calls (every rank computing for all of it) does not."""
    once = _slowest([_timed(fn, 1, group, device) for fn in fns], group, device)
    return [max(1, min(_MAX_CALLS, math.ceil(window / max(t, 1e-6)))) for t in once]



def _slowest(values: Sequence[float], group, device) -> List[float]:
    """Each value's maximum over the ranks (the same list on every rank)."""
    from .comm import collectives

    mine = torch.tensor(list(values), dtype=torch.float64, device=device)
    collectives.all_reduce_max(mine, group, op="calibrate")
    return [float(x) for x in mine.tolist()]


def _exchange(x: torch.Tensor, buf: torch.Tensor, group, rank: int, world: int):
    """Post the ring's neighbour exchange: `x` to rank+1, `buf` from rank-1."""
    from .comm import p2p

    return p2p.post([(x, (rank + 1) % world)], [(buf, (rank - 1) % world)], group, op="calibrate", record=False)


def _measure_links(group, world: int, rank: int, device, sizes: Sequence[int], repeats: int) -> Dict[str, Tuple]:
    """(latency per step, bandwidth, points) of each kind, fitted over message sizes."""
    import torch.distributed as dist

    timed, sent = [], []
    for kind in KINDS:
        for size in sizes:
            numel = max(world, size // 4 // world * world)  # divisible by the world for the collectives
            x = torch.ones(numel, dtype=torch.float32, device=device)
            if kind == "p2p":
                buf = torch.empty_like(x)

                def fn(x=x, buf=buf):
                    _exchange(x, buf, group, rank, world).wait()
                nbytes = x.numel() * 4
            elif kind == "alltoall":
                out = torch.empty_like(x)

                def fn(x=x, out=out):
                    dist.all_to_all_single(out, x, group=group)
                nbytes = x.numel() * 4 * (world - 1) // world
            elif kind == "allgather":
                piece = x[: numel // world].clone()
                outs = [torch.empty_like(piece) for _ in range(world)]

                def fn(piece=piece, outs=outs):
                    dist.all_gather(outs, piece, group=group)
                nbytes = piece.numel() * 4 * (world - 1)
            elif kind == "reduce_scatter":
                parts = list(x.chunk(world))
                out = torch.empty_like(parts[0])

                def fn(parts=parts, out=out):
                    dist.reduce_scatter(out, parts, group=group)
                nbytes = parts[0].numel() * 4 * (world - 1)
            else:
                def fn(x=x):
                    dist.all_reduce(x, group=group)
                nbytes = 2 * (world - 1) * x.numel() * 4 // world
            timed.append(_timed(fn, repeats, group, device))
            sent.append(float(nbytes))
    # the slowest rank's time of each call: every rank fits the same points
    timed = _slowest(timed, group, device)
    results, i = {}, 0
    for kind in KINDS:
        points = list(zip(sent[i:i + len(sizes)], timed[i:i + len(sizes)]))
        i += len(sizes)
        intercept, slope = _fit(points)
        results[kind] = (intercept / steps(kind, world), 1.0 / slope, points)
    return results


def _kernel_calls(device, dtype, backend: str, n: int, heads: int, head_dim: int):
    """(forward call, backward call, flops of each) of the block kernel on a square n-token block."""
    from .kernels import block

    gen = torch.Generator().manual_seed(0)
    scale = head_dim ** -0.5
    q, k, v, do = (torch.randn(1, n, heads, head_dim, generator=gen).to(device=device, dtype=dtype)
                   for _ in range(4))
    q, k, v, do = (block.to_kernel_layout(t, backend) for t in (q, k, v, do))
    fwd, bwd = block.kernels(backend, q, k)
    out, lse = fwd(q, k, v, scale, None)
    out = out.to(dtype)
    elements = float(n * n * heads * head_dim)
    return (lambda: fwd(q, k, v, scale, None), lambda: bwd(do, q, k, v, out, lse, scale, None),
            FORWARD_FLOPS * elements, BACKWARD_FLOPS * elements)


def _measure_kernel(group, device, dtype, backend: str, sizes: Sequence[int], heads: int, head_dim: int,
                    repeats: int) -> Tuple[float, float, float]:
    """(forward flop/s, backward flop/s, seconds per call) of the block kernel, fitted over
    square unmasked blocks of `sizes` tokens, all ranks computing at once. Each size is
    timed over a window of calls back to back (`_calls_to_fill`); on CUDA the launches then
    queue as they do inside a strategy, so the per-call overhead is the launch throughput,
    not the latency of one synchronised call."""
    timed, flops = [], []
    window = 0.02 if device.type == "cuda" else 0.15
    for n in sizes:
        fwd, bwd, f_flops, b_flops = _kernel_calls(device, dtype, backend, n, heads, head_dim)
        f_calls, b_calls = _calls_to_fill((fwd, bwd), window, group, device)
        timed += [_timed(fwd, repeats, group, device, f_calls), _timed(bwd, repeats, group, device, b_calls)]
        flops += [f_flops, b_flops]
    timed = _slowest(timed, group, device)
    f_overhead, f_slope = _fit(list(zip(flops[0::2], timed[0::2])))
    b_overhead, b_slope = _fit(list(zip(flops[1::2], timed[1::2])))
    return 1.0 / f_slope, 1.0 / b_slope, min(f_overhead, b_overhead)


def _measure_overlap(group, world: int, rank: int, device, dtype, backend: str, n: int, heads: int,
                     bandwidth: float, repeats: int) -> float:
    """The fraction of a neighbour exchange that hides behind a block computed meanwhile:
    `(t_compute + t_exchange - t_both) / min(t_compute, t_exchange)`, the exchange sized to
    take about as long as the block; the smallest over the ranks."""
    fwd, _, _, _ = _kernel_calls(device, dtype, backend, n, heads, 64)
    t_compute = _timed(fwd, repeats, group, device)
    # the message size must be the same on every rank: size it from the slowest rank's block
    numel = int(min(max(_slowest([t_compute], group, device)[0] * bandwidth, 1 << 16), 1 << 26)) // 4
    x = torch.ones(numel, dtype=torch.float32, device=device)
    buf = torch.empty_like(x)
    t_exchange = _timed(lambda: _exchange(x, buf, group, rank, world).wait(), repeats, group, device)

    def both():
        pending = _exchange(x, buf, group, rank, world)
        fwd()
        pending.wait()

    t_both = _timed(both, repeats, group, device)
    mine = (t_compute + t_exchange - t_both) / max(1e-12, min(t_compute, t_exchange))
    return -_slowest([-min(1.0, max(0.0, mine))], group, device)[0]


def calibrate(group=None, *, dtype=None, backend: str = "auto", save: bool = True,
              message_sizes: Sequence[int] = (1 << 12, 1 << 18, 1 << 22), repeats: int = 5) -> Topology:
    """Measure this group's collectives and block kernel; return (and cache) a Topology.

    Collective over `group` (default: the world). Times p2p neighbour exchange, all-to-all,
    all-gather, reduce-scatter and all-reduce at `message_sizes` (bytes), fits `latency per
    step + bytes / bandwidth` per kind, times the resolved block kernel's forward and
    backward on square blocks (`dtype`: default bfloat16 on CUDA, float32 on CPU) for its
    flop rates and per-call overhead, and how much of an exchange hides behind a block
    computed meanwhile (`overlap`). Every timing starts on all ranks together (a barrier)
    and is the median of `repeats`; each is then the slowest rank's (a MAX all-reduce), so
    every rank fits the same numbers and returns the same Topology. Ranks per node come
    from the ranks' hostnames. On one node the measurements describe the intra-node links
    and the inter-node ones keep the device type's defaults; across nodes the measurements
    describe the inter-node links (the slowest link bounds each call) and the intra-node
    ones keep the defaults.

    `save=True` writes the result to `cache_path(...)` on every host (see `cache_dir`),
    where `strategy="auto"` finds it. Takes a few seconds.
    """
    import torch.distributed as dist

    from .comm import collectives
    from .kernels.block import resolve_backend

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: calibrate needs an initialized torch.distributed process group, got none")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = collectives.device_of(group)
    dtype = _dtype(dtype if dtype is not None else (torch.bfloat16 if device.type == "cuda" else torch.float32))
    hosts = collectives.all_gather_object(socket.gethostname(), group, op="calibrate")
    per_host = {h: hosts.count(h) for h in hosts}
    contiguous = all(hosts[i] == hosts[i - 1] or hosts[i] not in hosts[:i] for i in range(1, world))
    ranks_per_node = min(per_host.values()) if contiguous and len(set(per_host.values())) == 1 else 1
    base = default_topology(device.type, dtype, world, ranks_per_node=ranks_per_node)
    measured = ()
    if world > 1:
        links = _measure_links(group, world, rank, device, message_sizes, repeats)
        level = "intra" if len(per_host) == 1 else "inter"
        measured = tuple((level, kind, lat, bw) for kind, (lat, bw, _) in links.items())
        p2p_lat, p2p_bw = links["p2p"][:2]
        if level == "intra":
            base = base.replace(intra_latency=p2p_lat, intra_bandwidth=p2p_bw)
        else:
            base = base.replace(inter_latency=p2p_lat, inter_bandwidth=p2p_bw)
    concrete = resolve_backend(backend, device, dtype, 64)
    # a tiny block pins the per-call overhead, two larger ones the flop rate (on the
    # project's 2-core CPU the rate per element stayed flat from 1024 to 8192 keys)
    sizes = (64, 512, 2048) if device.type == "cuda" else (16, 256, 1024)
    heads = 16 if device.type == "cuda" else 4
    fwd_rate, bwd_rate, overhead = _measure_kernel(group, device, dtype, concrete, sizes, heads, 64,
                                                   min(repeats, 3))
    overlap = base.overlap
    if world > 1:
        overlap = _measure_overlap(group, world, rank, device, dtype, concrete, sizes[-1], heads, base.intra_bandwidth
                                   if len(per_host) == 1 else base.inter_bandwidth, repeats)
    topo = base.replace(compute_rate=fwd_rate, backward_rate=bwd_rate, kernel_overhead=overhead, overlap=overlap,
                        measured=measured,
                        source=f"calibrated {time.strftime('%Y-%m-%d %H:%M:%S')} on {world} rank(s), "
                               f"{dist.get_backend(group)}, {_device_name(device)}, {_dtype_name(dtype)}, "
                               f"{concrete} kernel")
    # one answer everywhere, even if float arithmetic were to differ between hosts: rank 0's
    topo = Topology.from_dict(collectives.all_gather_object(topo.to_dict(), group, op="calibrate")[0])
    rank = dist.get_rank(group)
    if save:
        path = cache_path(dist.get_backend(group), world, device, dtype)
        if hosts.index(hosts[rank]) == rank:  # one writer per host (they would write the same)
            path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"topology": topo.to_dict(), "hosts": hosts, "seqpar_cache_version": 1}
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(payload, indent=2))
            os.replace(tmp, path)
        _loaded[(dist.get_backend(group), world, str(device), dtype)] = topo
    # every rank, whatever its `save`: when calibrate returns, each host's file is complete
    dist.barrier(group=group)
    return topo


# -- what "auto" uses -------------------------------------------------------------------------

# (backend, world size, device, dtype) -> this host's cached calibration or None, read once
_loaded: Dict[tuple, Optional[Topology]] = {}


def auto_topology(group, device: torch.device, dtype: torch.dtype) -> Topology:
    """The topology `strategy="auto"` plans with: this group's cached calibration (see
    `cache_path`; read once per process) if there is one, else `default_topology`.
    Local only (no communication): ranks that load different files choose differently,
    and the agreement check in `seqpar.attention` then raises on every rank."""
    import torch.distributed as dist

    from .layout import group_rank_and_size

    _, world = group_rank_and_size(group)
    if dist.is_available() and dist.is_initialized():
        key = (dist.get_backend(group), world, str(device), dtype)
        if key not in _loaded:
            _loaded[key] = load_calibration(cache_path(key[0], world, device, dtype))
        if _loaded[key] is not None:
            return _loaded[key]
    return default_topology(device.type if device.type in ("cpu", "cuda") else "cpu", dtype, world)


def choose(layout, batch: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, causal: bool,
           training: bool, device: torch.device) -> Tuple[str, Dict[str, object]]:
    """`(strategy, options)` for `strategy="auto"` on `layout`'s group."""
    if layout.world_size == 1:
        return "ring", {}
    topo = auto_topology(layout.group, device, dtype)
    chosen = plan(layout.seq_len, world_size=layout.world_size, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                  dtype=dtype, causal=causal, training=training, batch=batch, scheme=layout.scheme, topology=topo)
    return chosen.strategy, chosen.options


def choose_linear(layout, batch: int, heads: int, key_dim: int, value_dim: int, dtype: torch.dtype, decay: bool,
                  training: bool, chunk_size: int, device: torch.device) -> Tuple[str, int]:
    """`(method, scan_pieces)` for `linear_attention(method="auto")` on `layout`'s group."""
    topo = auto_topology(layout.group, device, dtype)
    chosen = plan_linear(layout.seq_len, world_size=layout.world_size, heads=heads, key_dim=key_dim,
                         value_dim=value_dim, batch=batch, dtype=dtype, decay=decay, training=training,
                         chunk_size=chunk_size, topology=topo)
    return chosen.method, chosen.scan_pieces


# -- the command line -------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m seqpar plan`: print the plan table for a problem (no process group needed)."""
    import argparse

    class Formatter(argparse.ArgumentDefaultsHelpFormatter):
        """Defaults in --help, except where there is none (None: the help says what applies)."""

        def _get_help_string(self, action):
            return action.help if action.default is None else super()._get_help_string(action)

    parser = argparse.ArgumentParser(prog="python -m seqpar plan", formatter_class=Formatter,
                                     description="Predict every strategy's time on a problem and show the choice.")
    parser.add_argument("--seq-len", type=int, required=True, help="global sequence length N (required)")
    parser.add_argument("--world-size", type=int, required=True, help="ranks P (required)")
    parser.add_argument("--heads", type=int, default=32, help="query heads H")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads H_kv (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension D")
    parser.add_argument("--batch", type=int, default=1, help="batch size B")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), default="bfloat16", help="inputs' dtype")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal attention")
    parser.add_argument("--training", action=argparse.BooleanOptionalAction, default=True,
                        help="forward + backward; --no-training plans the forward alone")
    parser.add_argument("--scheme", choices=SCHEMES, default="contiguous", help="sequence layout")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="the default topology's device type (this machine's)")
    parser.add_argument("--calibration", default=None,
                        help="a calibration JSON file (from seqpar.calibrate; default: the device's defaults)")
    parser.add_argument("--ranks-per-node", type=int, default=None,
                        help="ranks per node (default: the topology's, LOCAL_WORLD_SIZE on CUDA)")
    parser.add_argument("--intra-bandwidth", type=float, default=None, help="GB/s a rank sends within a node (default: the topology's)")
    parser.add_argument("--intra-latency", type=float, default=None, help="microseconds per step within a node (default: the topology's)")
    parser.add_argument("--inter-bandwidth", type=float, default=None, help="GB/s a rank sends between nodes (default: the topology's)")
    parser.add_argument("--inter-latency", type=float, default=None, help="microseconds per step between nodes (default: the topology's)")
    parser.add_argument("--tflops", type=float, default=None, help="block kernel forward TFLOP/s, backward the same (default: the topology's)")
    parser.add_argument("--memory-gib", type=float, default=None, help="memory a rank may spend on attention, GiB (default: the topology's)")
    args = parser.parse_args(argv)
    if args.calibration:
        topo = load_calibration(Path(args.calibration))
        if topo is None:
            parser.error(f"--calibration: expected a readable calibration JSON file, got {args.calibration!r}")
    else:
        topo = default_topology(args.device, args.dtype, args.world_size, ranks_per_node=args.ranks_per_node)
    changes = {}
    if args.ranks_per_node is not None:
        changes["ranks_per_node"] = args.ranks_per_node
    for flag, key, unit in (("intra_bandwidth", "intra_bandwidth", 1e9), ("inter_bandwidth", "inter_bandwidth", 1e9),
                            ("intra_latency", "intra_latency", 1e-6), ("inter_latency", "inter_latency", 1e-6),
                            ("memory_gib", "memory_limit", 2 ** 30)):
        if getattr(args, flag) is not None:
            changes[key] = getattr(args, flag) * unit
    if args.tflops is not None:
        changes["compute_rate"] = changes["backward_rate"] = args.tflops * 1e12
    if changes:
        # measured per-kind links would override what the flags say: drop them
        changes.setdefault("measured", () if any(k.endswith(("bandwidth", "latency")) for k in changes)
                           else topo.measured)
        topo = topo.replace(source=topo.source + " with command-line changes", **changes)
    try:
        result = plan(args.seq_len, world_size=args.world_size, heads=args.heads, kv_heads=args.kv_heads,
                      head_dim=args.head_dim, dtype=args.dtype, causal=args.causal, training=args.training,
                      batch=args.batch, scheme=args.scheme, topology=topo)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    print(result)
    return 0
