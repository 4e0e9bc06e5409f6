"""The strategy registry: one `Strategy` record per exact softmax algorithm, and `run`,
the path every call takes from a public function to a strategy's `apply`.

A strategy file defines its algorithm, its typed `Options` (a frozen dataclass: the
options it takes, their defaults stated once, their types checked on construction),
`check` (what it cannot serve), `analytic_bytes`, and, for the planner, its schedule
(`cost`), its memory (`peak_memory`) and the option values worth planning
(`candidates`), and registers itself at its end:

    register(Strategy("ring", _apply, analytic_bytes, Options, cost=cost, peak_memory=peak_memory,
                      candidates=candidates))

`strategies/__init__.py` imports every strategy file; a new algorithm is one file there
plus one import line. This module imports no strategy, and neither does `attention.py`'s
protocol below it, nor the planner (`seqpar.planner`): they ask the registry, not the files.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .call import (check_tensors, collective_call, grad_wanted, group_of, layout_for, no_seq, resolve_scale,
                   values_digest)
from .comm.groups import describe
from .errors import brief
from .kernels.block import BACKENDS, resolve_backend, verify_once
from .layout import Mask, SeqLayout, documents_key


@dataclass(frozen=True)
class NoOptions:
    """The options of a strategy that takes none."""

    def resolve(self, q, k, v, layout) -> "NoOptions":
        return self


@dataclass(frozen=True)
class Strategy:
    name: str
    # (q, k, v, layout, causal, scale, backend, options: Options) -> out [B, n, H, D]
    apply: Callable
    # (layout, batch, heads, kv_heads, head_dim, element_size, **options) -> {"forward", "backward"} bytes
    analytic_bytes: Callable
    # a frozen dataclass of the strategy's options and their defaults; its __post_init__
    # checks types and values, `resolve(q, k, v, layout)` fills defaults that depend on the
    # problem or on this rank's environment (those shape collectives: they are agreed on)
    Options: type = NoOptions
    # (q, k, v, layout, options) -> None; raises ValueError when the strategy cannot serve
    check: Optional[Callable] = None
    # The planner's view (`seqpar.planner`; the problem and timeline types are in
    # `seqpar.planner.schedule`). None: the planner lists the strategy as not planned.
    # (problem, topology, options: dict) -> (Timeline, {"forward", "backward", ...} bytes of
    # the busiest rank): the strategy's schedule, one call on one rank; may raise
    # `schedule.NotPlanned(reason)` for option values it does not price
    cost: Optional[Callable] = None
    # (problem, options: dict) -> peak bytes a rank holds (see `Problem.peak`); required with `cost`
    peak_memory: Optional[Callable] = None
    # (problem) -> [options: dict, ...]: the option values worth planning (None: [{}])
    candidates: Optional[Callable] = None


_REGISTRY: Dict[str, Strategy] = {}


def register(strategy: Strategy) -> None:
    if strategy.cost is not None and strategy.peak_memory is None:
        raise ValueError(f"strategy {strategy.name!r}: a cost needs a peak_memory too (the planner checks "
                         f"memory limits)")
    _REGISTRY[strategy.name] = strategy


def names() -> Tuple[str, ...]:
    return tuple(_REGISTRY)


def strategies() -> Tuple[Strategy, ...]:
    """Every registered record, in registration order."""
    return tuple(_REGISTRY.values())


def get(name) -> Strategy:
    if not isinstance(name, str):
        raise TypeError(f"strategy: expected a str, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"strategy: expected one of {names() + ('auto',)}, got {name!r}")
    return _REGISTRY[name]


def make_options(name: str, given: Dict):
    """The strategy's typed options from keyword arguments, unknown names refused."""
    strategy = get(name)
    known = [f.name for f in dataclasses.fields(strategy.Options)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"options: strategy {name!r} takes {known or 'no options'}, got {unknown}")
    return strategy.Options(**given)


def check_strategy(name: str, q, k, v, layout, options: Dict):
    """Raise the ValueError strategy `name` would raise for these tensors (meta tensors
    do), layout and options; return its resolved options when it can serve them (the
    planner's feasibility test)."""
    strategy = get(name)
    opts = make_options(name, options).resolve(q, k, v, layout)
    if strategy.check is not None:
        strategy.check(q, k, v, layout, opts)
    return opts


def analytic_bytes(name: str, layout, batch: int, heads: int, kv_heads: int, head_dim: int, element_size: int,
                   **options):
    """Bytes a rank of `layout` sends in one forward and one backward of strategy `name`."""
    return get(name).analytic_bytes(layout, batch, heads, kv_heads, head_dim, element_size, **options)


def describe_options(options) -> tuple:
    if dataclasses.is_dataclass(options):
        options = dataclasses.asdict(options)
    return tuple(sorted((key, describe(val)) for key, val in options.items()))


@dataclass(frozen=True)
class _Resolved:
    """What a call's local check settled: the strategy and options that run, the scale,
    the concrete backend, and auto's choice (for the signature)."""
    layout: SeqLayout
    name: str
    options: object
    scale: float
    backend: str
    chosen: tuple = None


def _signature(strategy, backend, causal, window_size, softcap, sinks, layout, q, k, v, options,
               r: Optional[_Resolved]):
    # root causes first: the first field that differs is the one the error names
    return (
        ("q [batch, heads, head_dim], dtype, device", no_seq(q)),
        ("k [batch, heads, head_dim], dtype, device", no_seq(k)),
        ("v [batch, heads, head_dim], dtype, device", no_seq(v)),
        ("seq_len", getattr(layout if r is None else r.layout, "seq_len", None)),
        ("scheme", getattr(layout if r is None else r.layout, "scheme", None)),
        ("cu_seqlens (documents; a checksum of the boundaries)",
         documents_key(getattr(layout if r is None else r.layout, "documents", None))),
        ("strategy", strategy),
        ("strategy='auto' chose (from its topology: the cached calibration or the defaults)", r and r.chosen),
        ("backend", backend),
        # ranks exchange buffers in the resolved backend's memory layout: it must be one
        ("backend resolved on this rank", r and r.backend),
        ("causal", causal),
        ("window_size", brief(window_size)),
        ("softcap", brief(softcap)),
        ("sinks [heads], dtype, device", describe(sinks)),
        # replicated logits: a rank with other values would answer differently, silently
        ("sinks (its values)", values_digest(sinks) if r is not None and isinstance(sinks, torch.Tensor) else None),
        ("softmax_scale", r and r.scale),
        ("options", describe_options(options)),
        # defaults read from this rank's environment shape the collectives too
        ("options with defaults resolved on this rank", r and (r.name, describe_options(r.options))),
        # a backward on some ranks only would leave the others waiting in its collectives
        ("gradients required (q, k or v requires grad, grad mode on)", grad_wanted(q, k, v)),
    )


def check_window(window_size) -> Tuple[int, int]:
    """`window_size` as a tuple `(left, right)` of ints >= -1 (-1: unbounded)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2 or any(
            isinstance(x, bool) or not isinstance(x, int) for x in window_size):
        raise TypeError(f"window_size: expected a pair of ints (left, right), got {brief(window_size)}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"window_size: expected ints >= -1 (-1: unbounded on that side), got ({left}, {right})")
    return left, right


def check_softcap(softcap) -> float:
    """`softcap` as a float >= 0 (0: no softcap)."""
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: expected a float >= 0 (0: none), got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap: expected a finite float >= 0 (0: none), got {softcap!r}")
    return float(softcap)


def check_sinks(sinks, q) -> None:
    """`sinks`: None, or a floating tensor `[H]` (one logit per query head) on q's device."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks: expected None or a torch.Tensor [{q.shape[2]}], got {type(sinks).__name__}")
    problems = []
    if tuple(sinks.shape) != (q.shape[2],):
        problems.append(f"sinks: expected shape [{q.shape[2]}] (one logit per query head), got {tuple(sinks.shape)}")
    if not sinks.is_floating_point():
        problems.append(f"sinks: expected a floating-point tensor, got {sinks.dtype}")
    if sinks.device != q.device:
        problems.append(f"sinks: expected device {q.device} (that of q), got {sinks.device}")
    if problems:
        raise ValueError("; ".join(problems))


# Under torch.compile a strategy call is one graph break and runs eagerly: on an H200
# (torch 2.11, inductor and aot_eager alike) tracing ring attention with the triton
# backend gave a zero incoming gradient to its backward, so all of dq, dk, dv came back
# zero while eager was right (bench/results/2026-11-30-h200-gpu-check.md). The blocks
# inside stay custom ops (`seqpar::block_forward`/`block_backward`) for code that
# compiles its own loops over them.
@torch.compiler.disable
def run(strategy, q, k, v, *, layout=None, causal=False, softmax_scale=None, window_size=(-1, -1),
        softcap=0.0, sinks=None, backend="auto", choose=None, _error=None, **options):
    """Check, agree on and run one call of a registered strategy (or of `choose`'s pick
    when `strategy == "auto"`: `choose(q, k, v, layout, causal, options) -> (name,
    options)`). `_error`: bad input a wrapper (seqpar.nn) found with its own checks; it
    goes through the same agreement, so the wrapper's peers raise too. The strategy's
    `apply` gets the mask (`layout.Mask`: causal and the window) where `causal` went."""
    group = group_of(layout)

    def check() -> _Resolved:
        check_tensors(q, k, v, value_dim=True)
        local = layout_for(layout, q, group)
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
        check_window(window_size)
        cap = check_softcap(softcap)
        check_sinks(sinks, q)
        scale = resolve_scale(softmax_scale, q.shape[-1])
        chosen = None
        if strategy == "auto" and choose is not None:
            # the planner counts the window's work and bytes (documents come with the layout)
            windowed = tuple(window_size) != (-1, -1)
            name, given = choose(q, k, v, local, Mask(causal, tuple(window_size)) if windowed else causal, options)
            chosen = (name, describe_options(given))
        else:
            name, given = get(strategy).name, options
        opts = check_strategy(name, q, k, v, local, given)
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        concrete = resolve_backend(backend, q.device, q.dtype, q.shape[-1], scale, cap, value_dim=v.shape[-1])
        verify_once(concrete, q)  # a GPU backend's first-use check, before any collective
        return _Resolved(local, name, opts, scale, concrete, chosen)

    r = collective_call(group, f"seqpar.attention(strategy={strategy!r})", check,
                        lambda r: _signature(strategy, backend, causal, window_size, softcap, sinks, layout, q, k, v,
                                             options, r),
                        prior_error=_error)
    plain = tuple(window_size) == (-1, -1) and not softcap
    mask = causal if plain else Mask(causal, tuple(window_size), float(softcap))
    if sinks is None:
        return _REGISTRY[r.name].apply(q, k, v, r.layout, mask, r.scale, r.backend, r.options)
    return _REGISTRY[r.name].apply(q, k, v, r.layout, mask, r.scale, r.backend, r.options, sinks=sinks)
