"""`seqpar.attention`: argument checks, the strategy registry, and "auto".

Every exact strategy enters through `run_strategy`, which validates the call locally,
agrees on it across ranks (`comm.groups.agree`: bad input on any rank raises on every
rank, nobody waits), resolves the backend and hands over to the strategy.
`strategy="auto"` asks the planner (`seqpar.dispatch.choose`) for a registered strategy
and its options; the choice is part of the agreed signature, so ranks that would choose
differently (e.g. from different cached calibrations) raise instead of mismatching.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet

import torch

from .comm.groups import agree, describe
from .kernels.block import BACKENDS, resolve_backend
from .layout import SeqLayout, group_rank_and_size

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Strategy:
    apply: Callable  # (q, k, v, layout, causal, scale, backend, options) -> out
    analytic_bytes: Callable  # (layout, batch, heads, kv_heads, head_dim, element_size, **options) -> {"forward", "backward"}
    options: FrozenSet[str] = frozenset()
    check: Callable = None  # (q, k, v, layout, options): raises ValueError if it cannot serve
    # (q, k, v, layout, options) -> options with every default filled in. Defaults may come
    # from this rank's environment (USP's LOCAL_WORLD_SIZE); the resolved values shape the
    # collectives, so they are what ranks agree on
    resolve: Callable = None


_REGISTRY: Dict[str, Strategy] = {}


def register_strategy(name: str, apply: Callable, analytic_bytes: Callable, options=(), check: Callable = None,
                      resolve: Callable = None) -> None:
    _REGISTRY[name] = Strategy(apply, analytic_bytes, frozenset(options), check, resolve)


def analytic_bytes(strategy: str, layout, batch: int, heads: int, kv_heads: int, head_dim: int, element_size: int,
                   **options):
    """Bytes a rank of `layout` sends in one forward and one backward of `strategy`."""
    return _REGISTRY[strategy].analytic_bytes(layout, batch, heads, kv_heads, head_dim, element_size, **options)


def registered_strategies():
    return tuple(_REGISTRY)


def check_strategy(strategy: str, q, k, v, layout, options) -> None:
    """Raise the ValueError `strategy` would raise for these tensors (meta tensors do),
    layout and options; return None when it can serve them. The planner's feasibility."""
    if strategy not in _REGISTRY:
        raise ValueError(f"strategy: expected one of {registered_strategies()}, got {strategy!r}")
    unknown = sorted(set(options) - _REGISTRY[strategy].options)
    if unknown:
        raise ValueError(
            f"options: strategy {strategy!r} takes {sorted(_REGISTRY[strategy].options) or 'no options'}, got {unknown}"
        )
    if _REGISTRY[strategy].check is not None:
        _REGISTRY[strategy].check(q, k, v, layout, options)


def _resolve_strategy(strategy: str) -> str:
    if not isinstance(strategy, str):
        raise TypeError(f"strategy: expected a str, got {type(strategy).__name__}")
    if strategy in _REGISTRY:
        return strategy
    raise ValueError(f"strategy: expected one of {registered_strategies() + ('auto',)}, got {strategy!r}")


def _raise_all(problems, kind=ValueError) -> None:
    if problems:
        raise kind("; ".join(problems))


def check_qkv_types(q, k, v) -> None:
    """q, k, v are 4-dim tensors `[batch, seqlen, heads, head_dim]` of one supported dtype
    and one device that holds data (shared by every entry point: softmax, linear and Star
    attention). Every problem found is named at once."""
    _raise_all([f"{name}: expected a torch.Tensor, got {type(t).__name__}" for name, t in (("q", q), ("k", k), ("v", v))
                if not isinstance(t, torch.Tensor)], TypeError)
    problems = [f"{name}: expected 4 dims [batch, seqlen, heads, head_dim], got shape {tuple(t.shape)}"
                for name, t in (("q", q), ("k", k), ("v", v)) if t.dim() != 4]
    if q.dtype not in DTYPES:
        problems.append(f"q: expected dtype in {[str(d) for d in DTYPES]}, got {q.dtype}")
    if q.device.type == "meta":
        # a meta tensor has no values to attend over (the planner checks shapes with meta
        # tensors through check_strategy, not here)
        problems.append("q: expected a tensor with data (on cpu, cuda, ...), got one on the meta device")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            problems.append(f"{name}: expected dtype {q.dtype} (that of q), got {t.dtype}")
        if t.device != q.device:
            problems.append(f"{name}: expected device {q.device} (that of q), got {t.device}")
    _raise_all(problems)


def _check_tensors(q, k, v, same_seqlen: bool = True) -> None:
    """Types, ranks, dtypes, devices and shapes of q, k, v; `same_seqlen=False` lets the
    key length differ from the query length (Star's query phase). k is checked against q
    and then v against k, so each message blames the tensor that is wrong; every problem
    found is named at once."""
    check_qkv_types(q, k, v)
    problems = []
    if k.shape[0] != q.shape[0]:
        problems.append(f"k: expected batch {q.shape[0]} (that of q), got {k.shape[0]}")
    if same_seqlen and k.shape[1] != q.shape[1]:
        problems.append(f"k: expected local seqlen {q.shape[1]} (that of q), got {k.shape[1]}")
    if k.shape[3] != q.shape[3]:
        problems.append(f"k: expected head_dim {q.shape[3]} (that of q), got {k.shape[3]}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        problems.append(f"k: expected a number of KV heads that divides q's {q.shape[2]} heads, got {k.shape[2]}")
    if not problems and k.shape != v.shape:
        problems.append(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    _raise_all(problems)


def _resolve_scale(softmax_scale, head_dim: int) -> float:
    """`softmax_scale` checked, with None meaning `head_dim ** -0.5`."""
    if softmax_scale is None:
        return head_dim ** -0.5
    if not isinstance(softmax_scale, numbers.Real) or isinstance(softmax_scale, bool):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale: expected a finite float or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _layout_for(layout, q, group_of_default):
    if layout is None:
        _, world = group_rank_and_size(None)
        return SeqLayout(q.shape[1] * world, group=group_of_default, scheme="contiguous", _collective=False)
    if not isinstance(layout, SeqLayout):
        raise TypeError(f"layout: expected a seqpar.SeqLayout or None, got {type(layout).__name__}")
    rank, world = group_rank_and_size(layout.group)
    if (layout.world_size, layout.rank) != (world, rank):
        raise ValueError(
            f"layout: expected a layout of this process group (world size {world}, rank {rank}), "
            f"got one for world size {layout.world_size}, rank {layout.rank}"
        )
    if q.shape[1] != layout.local_len:
        raise ValueError(
            f"q: expected local seqlen {layout.local_len} (layout.local_len on rank {layout.rank}), got {q.shape[1]}"
        )
    return layout


def no_seq(t) -> tuple:
    """`describe(t)` without the sequence dim of a `[B, n, H, D]` tensor (it may differ by rank)."""
    d = describe(t)
    if d[0] == "tensor" and len(d[1]) == 4:
        return (d[0], d[1][:1] + d[1][2:]) + d[2:]
    return d


def _grad_wanted(*tensors) -> bool:
    """Whether autograd will run a backward (and its collectives) for this call."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _describe_options(options) -> tuple:
    return tuple(sorted((key, describe(val)) for key, val in options.items()))


def _signature(strategy, backend, causal, scale, layout, q, k, v, options, chosen=None, concrete=None,
               resolved=None):
    # root causes first: the first field that differs is the one the error names
    return (
        ("q [batch, heads, head_dim], dtype, device", no_seq(q)),
        ("k [batch, heads, head_dim], dtype, device", no_seq(k)),
        ("v [batch, heads, head_dim], dtype, device", no_seq(v)),
        ("seq_len", getattr(layout, "seq_len", None)),
        ("scheme", getattr(layout, "scheme", None)),
        ("strategy", strategy),
        ("strategy='auto' chose (from its topology: the cached calibration or the defaults)", chosen),
        ("backend", backend),
        # ranks exchange buffers in the resolved backend's memory layout: it must be one
        ("backend resolved on this rank", concrete),
        ("causal", causal),
        ("softmax_scale", scale),
        ("options", _describe_options(options)),
        # defaults read from this rank's environment shape the collectives too
        ("options with defaults resolved on this rank", None if resolved is None else _describe_options(resolved)),
        # a backward on some ranks only would leave the others waiting in its collectives
        ("gradients required (q, k or v requires grad, grad mode on)", _grad_wanted(q, k, v)),
    )


def run_strategy(strategy, q, k, v, *, layout=None, causal=False, softmax_scale=None, backend="auto", _error=None,
                 **options):
    # `_error`: bad input that a wrapper (seqpar.nn) found with its own checks. It goes
    # through the same agreement, so the wrapper's peers raise too instead of waiting here.
    group = layout.group if isinstance(layout, SeqLayout) else None
    error = None
    name = concrete_backend = scale = chosen = None
    try:
        if _error is not None:
            raise _error
        _check_tensors(q, k, v)
        layout = _layout_for(layout, q, group)
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
        scale = _resolve_scale(softmax_scale, q.shape[-1])
        if strategy == "auto":
            name, run_options = _auto(q, k, v, layout, causal, options)
            chosen = (name, _describe_options(run_options))
        else:
            name, run_options = _resolve_strategy(strategy), options
        check_strategy(name, q, k, v, layout, run_options)
        if _REGISTRY[name].resolve is not None:
            run_options = _REGISTRY[name].resolve(q, k, v, layout, run_options)
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        concrete_backend = resolve_backend(backend, q.device, q.dtype, q.shape[-1], scale)
    except (ValueError, TypeError) as exc:
        error = exc
    _, world = group_rank_and_size(group)
    resolved = None if error is not None else run_options
    signature = _signature(strategy, backend, causal, scale, layout, q, k, v, options, chosen, concrete_backend,
                           resolved)
    agree(group, world, signature, error, what=f"seqpar.attention(strategy={strategy!r})")
    return _REGISTRY[name].apply(q, k, v, layout, causal, scale, concrete_backend, run_options)


def _auto(q, k, v, layout, causal, options):
    """(strategy, options) that `strategy="auto"` runs: the plan's choice (`seqpar.plan`)."""
    if layout.world_size == 1:
        # one rank: every strategy is the same local blocks; ring validates the options
        return "ring", options
    if options:
        raise ValueError(
            f"options: strategy='auto' chooses the strategy's options itself; name a strategy to set them, "
            f"got {sorted(options)}"
        )
    from . import dispatch

    # the backward costs as much again: plan for it when autograd will run one
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return dispatch.choose(layout, q.shape[0], q.shape[2], k.shape[2], q.shape[3], q.dtype, causal, training,
                           q.device)


def attention(q, k, v, *, layout=None, causal=False, softmax_scale=None, strategy="auto", backend="auto", **options):
    """Exact softmax attention over a sequence split across the ranks of `layout.group`.

    `q` `[B, S/P, H, D]`, `k`/`v` `[B, S/P, H_kv, D]` (`H % H_kv == 0`): this rank's tokens
    of `layout` (default: contiguous, equal lengths, default group). Returns this rank's
    rows of dense attention over the global sequence, `[B, S/P, H, D]`, input dtype.
    `causal`: query at global position i sees keys j <= i. `softmax_scale`: default
    `D ** -0.5`. `strategy`: "ring", "ulysses", "usp" (option `ulysses_size`), "allgather"
    (option `kv_head_chunk`), "token_ring" (option `route`) or "auto" (the choice of
    `seqpar.plan` on this group's cached calibration, else default topology: the fastest
    feasible one, near-ties to a fixed preference; options are then chosen too, so none may
    be given); `backend`: "auto", "torch", "sdpa", "triton",
    "flash_attn" (per-block kernel). Differentiable in q, k, v.
    """
    return run_strategy(strategy, q, k, v, layout=layout, causal=causal, softmax_scale=softmax_scale,
                        backend=backend, **options)


def _register_builtin() -> None:
    from .strategies import allgather, ring, token_ring, ulysses, usp

    register_strategy("ring", ring._apply, ring.analytic_bytes)
    register_strategy("ulysses", ulysses._apply, ulysses.analytic_bytes, check=ulysses._check)
    register_strategy("usp", usp._apply, usp.analytic_bytes, options=("ulysses_size",), check=usp._check,
                      resolve=usp._resolve)
    register_strategy("token_ring", token_ring._apply, token_ring.analytic_bytes, options=("route",),
                      check=token_ring._check)
    register_strategy("allgather", allgather._apply, allgather.analytic_bytes, options=("kv_head_chunk",),
                      check=allgather._check)


_register_builtin()
