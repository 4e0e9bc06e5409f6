"""The cost model: `plan()`, `plan_linear()`, and `choose` / `choose_linear` for "auto".

`plan(seq_len, world_size=P, heads=H, ...)` predicts, for every registered exact strategy
and each of its option values worth trying, the time of one attention call (forward, or
forward + backward when `training`) on one rank, and picks the fastest feasible one
(candidates within `TIE` (2%) of the fastest are a tie, broken by `TIE_PREFERENCE`).
Nothing here communicates: `plan` is pure arithmetic on a `Topology`, so every rank that
plans with the same inputs gets the same answer.

The model asks the registry (`seqpar.registry`), never a strategy file: for each
registered `Strategy` (those in `TIE_PREFERENCE` first, in its order, then the others in
registration order), its `candidates(problem)` give the option values worth planning, its
registered `check` says which it can serve, its `cost(problem, topology, options)` gives
one call's schedule on the busiest rank and its bytes, and its `peak_memory` the buffers a
rank holds. Each lives in the strategy's file next to its `analytic_bytes`, written in the
terms of `seqpar.planner.schedule`. A new strategy plans by registering these three.

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
- **Overlap** follows each strategy's schedule (its `cost`): ring steps take
  `max(compute, exchange)` (plus `1 - Topology.overlap` of the shorter: on CPUs the
  transfers share the cores) (the next exchange is posted before the current block);
  all-to-alls are fully exposed;
  all-gather's first KV-head chunk's gather hides behind the rank's own keys' blocks and
  the next chunk's behind the current chunk's work, and the last of its P-1 rounds of
  dK/dV returns is exposed; TokenRing's
  first rows and last returns are exposed (`route="ring"`: the whole return stream).
- **Memory** (each strategy's `peak_memory`) is the peak of the buffers a strategy
  holds (inputs, gathered or in-flight K/V or queries, fp32 accumulators, and in training
  what the backward saves and allocates); kernel workspace and the rest of the model are
  not counted. A candidate over `Topology.memory_limit` is infeasible.
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

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch

from .. import registry
from ..errors import brief
from ..kernels.linear import state_bytes
from ..layout import _check_cu_seqlens
from . import topology as _topology
from .schedule import NotPlanned, Problem
from .topology import SCHEMES, Topology, _dtype, _dtype_name, default_topology, steps

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


def _evaluate(prob: Problem, topo: Topology, strategy: registry.Strategy, options: Dict) -> Candidate:
    name = strategy.name
    opts = tuple(sorted(options.items()))
    meta = dict(device="meta", dtype=prob.dtype)
    n = prob.layout(0).local_len
    q = torch.empty(prob.batch, n, prob.heads, prob.head_dim, **meta)
    kv = torch.empty(prob.batch, n, prob.kv_heads, prob.head_dim, **meta)
    try:
        registry.check_strategy(name, q, kv, kv, prob.layout(0), options)
    except ValueError as exc:
        return Candidate(name, opts, False, str(exc))
    if strategy.cost is None:
        return Candidate(name, opts, False, f"{name}: registers no cost model (Strategy.cost), so it is not planned "
                                            f"(name it explicitly to use it)")
    try:
        line, nbytes = strategy.cost(prob, topo, dict(options))
    except NotPlanned as exc:
        return Candidate(name, opts, False, str(exc))
    # every call first agrees on its arguments: one 16-byte all-reduce, the same for all
    line.wait(topo.transfer(topo.level(range(prob.world_size)), "allreduce", prob.world_size, 16.0),
              steps("allreduce", prob.world_size))
    memory = strategy.peak_memory(prob, dict(options))
    reason = None
    if topo.memory_limit is not None and memory > topo.memory_limit:
        reason = (f"memory: needs about {memory / 2**30:.3g} GiB per rank, more than the topology's memory_limit "
                  f"of {topo.memory_limit / 2**30:.3g} GiB")
    return Candidate(name, opts, reason is None, reason, line.total, line.compute, line.comm, line.exposed,
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
        if tuple(p.get("window_size", (-1, -1))) != (-1, -1):
            head += f", window_size={tuple(p['window_size'])}"
        if p.get("documents"):
            head += f", {p['documents']} packed documents"
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
         scheme: str = "contiguous", topology: Optional[Topology] = None, window_size=(-1, -1),
         cu_seqlens=None) -> Plan:
    """Predict every exact strategy's time on this problem and pick the fastest feasible one
    (or, among candidates within `TIE` of the fastest, the first in `TIE_PREFERENCE`).

    Problem: global `seq_len` N over `world_size` P ranks, `heads` H query heads and
    `kv_heads` H_kv (default H) of `head_dim` D, `dtype` (name or torch dtype), `causal`,
    `training` (forward + backward) or inference (forward only), `batch` B, and the layout
    `scheme` ("contiguous", "zigzag", "stripe", "balanced"), a sliding window `window_size`
    `(left, right)` and packed documents `cu_seqlens` (as `seqpar.attention` and `SeqLayout`
    take them): the work of every block and ring's bytes are counted with the mask exactly.
    `topology`: the machine (default: `default_topology` for this machine's device type
    with P ranks).

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
    window = registry.check_window(window_size)
    documents = None if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, seq_len)
    dtype = _dtype(dtype)
    if topology is None:
        topology = default_topology("cuda" if torch.cuda.is_available() else "cpu", dtype, world_size)
    elif not isinstance(topology, Topology):
        raise TypeError(f"topology: expected a seqpar.Topology or None, got {type(topology).__name__}")
    prob = Problem(seq_len, world_size, heads, kv_heads, head_dim, dtype, causal, training, batch, scheme, window,
                   documents)
    return _plan(prob, topology, _planned())


def _planned() -> Tuple[registry.Strategy, ...]:
    """The registered strategies, those in TIE_PREFERENCE first (in its order), then the
    others in registration order: the order candidates are listed and exact ties broken."""
    return tuple(sorted(registry.strategies(), key=lambda s: _preference(s.name)))


@lru_cache(maxsize=256)
def _plan(prob: Problem, topology: Topology, strategies: Tuple[registry.Strategy, ...]) -> Plan:
    evaluated = [_evaluate(prob, topology, s, dict(o))
                 for s in strategies for o in (s.candidates(prob) if s.candidates is not None else [{}])]
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
               "causal": prob.causal, "training": prob.training, "batch": prob.batch, "scheme": prob.scheme,
               "window_size": list(prob.window), "documents": None if prob.documents is None else len(prob.documents) - 1}
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
        rule = "delta-rule" if p.get("rule") == "delta" else "linear"
        lines = [f"seqpar {rule} plan: N={p['seq_len']}, P={p['world_size']}, B={p['batch']}, H={p['heads']}, "
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
                batch: int = 1, dtype="bfloat16", decay=True, training: bool = True,
                chunk_size: int = 64, topology: Optional[Topology] = None, rule: str = "linear") -> LinearPlan:
    """Choose `method` ("ring", "allgather", "allscan") and `scan_pieces` for linear attention
    (`rule="linear"`) or the gated delta rule (`rule="delta"`, `seqpar.delta_attention`).

    Per rank, the intra-chunk work is `(2 C (Dk + Dv) + 4 Dk Dv) B H n` flops forward (C the
    chunk size, n = N/P tokens) and 2.5x that backward, at the topology's compute rate.
    The state `S = B H Dk Dv` fp32 then crosses the ranks (see `strategies/linear.py`):
    ring waits for `(P-1)` whole-state hops, allscan for the pipelined scan (first piece
    through every hop, then one piece per step of the slowest hop), allgather for one
    all-gather of (P-1) states minus the intra-chunk work it hides behind, plus folding
    the gathered states. `decay`: False (none), True (per head or per token: one total
    decay per (batch, head) in the all-gather) or "channel" (a gate per key channel: a
    `[Dk]` total). Returns a `LinearPlan` (`.method`, `.scan_pieces`, a table).

    The delta rule's summary is affine: the all-gather moves a `[Dk, Dk]` transition per
    (batch, head) beside each state, must wait for the local pass that computes both (its
    forward hides nothing), and folds with matrix products (`2 Dk` flops per state element
    per earlier rank); its local pass carries `Dv + Dk` columns (the state and the
    transition) with a triangular solve per chunk, and its backward recomputes the forward
    (about 3.5x the forward's flops in all).
    """
    if rule not in ("linear", "delta"):
        raise ValueError(f"rule: expected 'linear' or 'delta', got {brief(rule)}")
    if decay not in (False, True, "channel") or (rule == "delta" and decay == "channel"):
        allowed = "False or True" if rule == "delta" else "False, True or 'channel'"
        raise ValueError(f"decay: expected {allowed}, got {brief(decay)}")
    for name, value in (("seq_len", seq_len), ("world_size", world_size), ("heads", heads),
                        ("key_dim", key_dim), ("batch", batch), ("chunk_size", chunk_size)):
        _positive_int(name, value)
    value_dim = key_dim if value_dim is None else _positive_int("value_dim", value_dim)
    dtype = _dtype(dtype)
    if topology is None:
        topology = default_topology("cuda" if torch.cuda.is_available() else "cpu", dtype, world_size)
    world = world_size
    s = state_bytes(batch, heads, key_dim, value_dim, dtype)
    g = batch * heads * (key_dim if decay == "channel" else 1) * (8 if dtype == torch.float64 else 4) if decay else 0
    n = -(-seq_len // world)
    delta = rule == "delta"
    if delta:
        width = value_dim + key_dim  # the state and the transition, carried together
        per_token = 2 * chunk_size * (2 * key_dim + 2 * width) + chunk_size * width + 6 * key_dim * width
        flops = per_token * batch * heads * n
        backward = 3.5
        g = state_bytes(batch, heads, key_dim, key_dim, dtype)  # the transition beside each state
    else:
        flops = (2 * chunk_size * (key_dim + value_dim) + 4 * key_dim * value_dim) * batch * heads * n
        backward = 2.5
    intra = {"forward": flops / topology.compute_rate, "backward": backward * flops / topology.backward_rate}
    links = _chain_links(topology, world)
    level = topology.level(range(world))
    pieces = best_scan_pieces(topology, world, s)
    # folding the gathered states costs one multiply-add per state element per earlier rank
    # (the delta rule: a [Dk, Dk] matrix product)
    fold = 2 * (world - 1) * (s // 4) * (key_dim if delta else 1) / topology.compute_rate
    phases = ("forward", "backward") if training else ("forward",)
    out = []
    for method, k in (("allgather", 1), ("allscan", pieces), ("ring", 1)):
        exposed = 0.0
        for phase in phases:
            if method == "allgather":
                payload = (world - 1) * (s + (g if phase == "forward" else 0))
                gather = topology.transfer(level, "allgather", world, payload)
                hidden = 0.0 if delta and phase == "forward" else intra[phase]
                exposed += max(0.0, gather - hidden) + fold
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
               "batch": batch, "dtype": _dtype_name(dtype), "decay": decay, "training": training, "rule": rule}
    return LinearPlan(problem, topology, tuple(out))


# -- what "auto" asks -----------------------------------------------------------------------


def choose(layout, batch: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, causal: bool,
           training: bool, device: torch.device, window_size=(-1, -1)) -> Tuple[str, Dict[str, object]]:
    """`(strategy, options)` for `strategy="auto"` on `layout`'s group (its documents too)."""
    if layout.world_size == 1:
        return "ring", {}
    topo = _topology.auto_topology(layout.group, device, dtype)
    chosen = plan(layout.seq_len, world_size=layout.world_size, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                  dtype=dtype, causal=causal, training=training, batch=batch, scheme=layout.scheme, topology=topo,
                  window_size=window_size, cu_seqlens=layout.documents)
    return chosen.strategy, chosen.options


def choose_linear(layout, batch: int, heads: int, key_dim: int, value_dim: int, dtype: torch.dtype, decay,
                  training: bool, chunk_size: int, device: torch.device, rule: str = "linear") -> Tuple[str, int]:
    """`(method, scan_pieces)` for `linear_attention` / `delta_attention(method="auto")` on
    `layout`'s group."""
    topo = _topology.auto_topology(layout.group, device, dtype)
    chosen = plan_linear(layout.seq_len, world_size=layout.world_size, heads=heads, key_dim=key_dim,
                         value_dim=value_dim, batch=batch, dtype=dtype, decay=decay, training=training,
                         chunk_size=chunk_size, topology=topo, rule=rule)
    return chosen.method, chosen.scan_pieces
