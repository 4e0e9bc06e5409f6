"""`seqpar.attention`: argument checks, the strategy registry, and "auto".

Every exact strategy enters through `run_strategy`, which validates the call locally,
resolves the backend and the strategy's defaults, agrees on all of it across ranks
(`seqpar.call.collective_call`: bad input on any rank raises on every rank, nobody
waits) and hands over to the strategy.
`strategy="auto"` asks the planner (`seqpar.dispatch.choose`) for a registered strategy
and its options; the choice is part of the agreed signature, so ranks that would choose
differently (e.g. from different cached calibrations) raise instead of mismatching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet

import torch

from .call import check_tensors, collective_call, grad_wanted, group_of, layout_for, no_seq, resolve_scale
from .comm.groups import describe
from .kernels.block import BACKENDS, resolve_backend
from .layout import SeqLayout


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
        ("gradients required (q, k or v requires grad, grad mode on)", grad_wanted(q, k, v)),
    )


@dataclass(frozen=True)
class _Resolved:
    """What a call's local check settled: the strategy and options that run, the scale,
    the concrete backend, and auto's choice (for the signature)."""
    layout: SeqLayout
    name: str
    options: Dict
    scale: float
    backend: str
    chosen: tuple = None


def run_strategy(strategy, q, k, v, *, layout=None, causal=False, softmax_scale=None, backend="auto", _error=None,
                 **options):
    # `_error`: bad input that a wrapper (seqpar.nn) found with its own checks. It goes
    # through the same agreement, so the wrapper's peers raise too instead of waiting here.
    group = group_of(layout)

    def check() -> _Resolved:
        check_tensors(q, k, v)
        local = layout_for(layout, q, group)
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
        scale = resolve_scale(softmax_scale, q.shape[-1])
        chosen = None
        if strategy == "auto":
            name, run_options = _auto(q, k, v, local, causal, options)
            chosen = (name, _describe_options(run_options))
        else:
            name, run_options = _resolve_strategy(strategy), options
        check_strategy(name, q, k, v, local, run_options)
        if _REGISTRY[name].resolve is not None:
            run_options = _REGISTRY[name].resolve(q, k, v, local, run_options)
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        concrete = resolve_backend(backend, q.device, q.dtype, q.shape[-1], scale)
        return _Resolved(local, name, run_options, scale, concrete, chosen)

    def signature(r: _Resolved):
        return _signature(strategy, backend, causal, r and r.scale, layout if r is None else r.layout, q, k, v,
                          options, r and r.chosen, r and r.backend, r and r.options)

    r = collective_call(group, f"seqpar.attention(strategy={strategy!r})", check, signature, prior_error=_error)
    return _REGISTRY[r.name].apply(q, k, v, r.layout, causal, r.scale, r.backend, r.options)


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
