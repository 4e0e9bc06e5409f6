"""`seqpar.attention`: exact softmax attention by a named strategy or by "auto".

Every exact strategy call goes through `registry.run`, which validates the call locally,
resolves the backend and the strategy's options (defaults included), agrees on all of it
across ranks (`seqpar.call.collective_call`: bad input on any rank raises on every rank,
nobody waits) and hands over to the strategy's `apply`. `strategy="auto"` asks the planner
(`seqpar.planner.choose`) for a registered strategy and its options; the choice is part
of the agreed signature, so ranks that would choose differently (e.g. from different
cached calibrations) raise instead of mismatching.
"""
from __future__ import annotations

from . import strategies  # noqa: F401  (registers the built-in strategies)
from .call import grad_wanted
from .layout import as_mask
from .registry import analytic_bytes, check_strategy, names, run

__all__ = ["attention", "run_strategy", "analytic_bytes", "check_strategy", "registered_strategies"]


def registered_strategies():
    return names()


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
    from .planner.model import choose

    # the backward costs as much again: plan for it when autograd will run one
    mask = as_mask(causal)
    return choose(layout, q.shape[0], q.shape[2], k.shape[2], q.shape[3], q.dtype, mask.causal, grad_wanted(q, k, v),
                  q.device, window_size=mask.window)


def run_strategy(strategy, q, k, v, *, layout=None, causal=False, softmax_scale=None, window_size=(-1, -1),
                 softcap=0.0, sinks=None, backend="auto", _error=None, **options):
    """`registry.run` with "auto" served by the planner (what `attention` and `seqpar.nn` call)."""
    return run(strategy, q, k, v, layout=layout, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
               softcap=softcap, sinks=sinks, backend=backend, choose=_auto, _error=_error, **options)


def attention(q, k, v, *, layout=None, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
              sinks=None, strategy="auto", backend="auto", **options):
    """Exact softmax attention over a sequence split across the ranks of `layout.group`.

    `q` `[B, S/P, H, D]`, `k`/`v` `[B, S/P, H_kv, D]` (`H % H_kv == 0`): this rank's tokens
    of `layout` (default: contiguous, equal lengths, default group). Returns this rank's
    rows of dense attention over the global sequence, `[B, S/P, H, D]`, input dtype.
    `causal`: query at global position i sees keys j <= i. `softmax_scale`: default
    `D ** -0.5`. `window_size=(left, right)`: query i sees keys `i - left <= j <= i + right`
    in global positions (-1: unbounded; flash-attn's convention), on top of `causal` and
    of the layout's documents. `softcap > 0`: every score becomes `softcap * tanh(score /
    softcap)` (flash-attn's softcap; the torch backend serves it, "auto" picks it).
    `sinks`: None or `[H]` logits, the same on every rank (gpt-oss's attention sinks): each
    row's softmax gets one more term `exp(sinks[h])` with a zero value; differentiable,
    each rank's `sinks.grad` being its share (sum it over the group). `strategy`: "ring", "ulysses", "usp" (option `ulysses_size`), "allgather"
    (option `kv_head_chunk`), "token_ring" (option `route`) or "auto" (the choice of
    `seqpar.plan` on this group's cached calibration, else default topology: the fastest
    feasible one, near-ties to a fixed preference; options are then chosen too, so none may
    be given); `backend`: "auto", "torch", "sdpa", "triton",
    "flash_attn" (per-block kernel). Differentiable in q, k, v.
    """
    return run_strategy(strategy, q, k, v, layout=layout, causal=causal, softmax_scale=softmax_scale,
                        window_size=window_size, softcap=softcap, sinks=sinks, backend=backend, **options)
