"""The one collective-call protocol of every public entry point: check locally, describe
the call, agree across ranks, run.

A rank that got bad input must not leave its peers waiting in the collectives that
follow, and ranks that disagree on what shapes those collectives (shapes, dtypes, the
layout, options and the defaults each rank resolved from its own environment) must not
start them. So every entry point (`seqpar.attention` and the strategy functions,
`linear_attention`, Star's two phases, `star_generate`, `seqpar.nn`'s collectives) runs

    result = collective_call(group, "seqpar.name", check, signature)

`check()` validates this rank's arguments and returns what the call needs (resolved
scale, backend, options...); a `ValueError`/`TypeError` it raises is held, not raised.
`signature(result)` (`result` is None when the check failed) lists the fields every rank
must agree on, root causes first: the first field that differs is the one the error
names. `comm.groups.agree` then raises on every rank if any rank failed or any field
differs, and otherwise the call goes on with `result`.

The helpers below are the local checks the entry points share.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Tuple, TypeVar, Union

import torch

from .comm import deferred
from .comm.groups import agree, describe
from .layout import SeqLayout, as_process_group, group_rank_and_size

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

R = TypeVar("R")
Signature = Sequence[Tuple[str, object]]


def collective_call(group, what: str, check: Callable[[], R],
                    signature: Union[Signature, Callable[[Optional[R]], Signature]],
                    prior_error: Optional[Exception] = None) -> R:
    """`check()`'s result, once every rank of `group` passed its check and agrees on
    `signature`; else the same error on every rank (see the module docstring).
    `prior_error`: a caller's own failed check (e.g. a wrapper's), raised on every rank too."""
    # a device value check of an earlier call that failed (`comm.deferred`) stops this one, on every rank
    result, error = None, prior_error or deferred.take_failure()
    if error is None:
        try:
            result = check()
        except (ValueError, TypeError) as exc:
            error = exc
    fields = signature(None if error is not None else result) if callable(signature) else signature
    _, world = group_rank_and_size(group)
    agree(group, world, tuple(fields), error, what=what)
    return result


def raise_all(problems: Sequence[str], kind=ValueError) -> None:
    """Raise one error naming every problem found, so a user fixes them in one go."""
    if problems:
        raise kind("; ".join(problems))


def check_qkv_types(q, k, v) -> None:
    """q, k, v are 4-dim tensors `[batch, seqlen, heads, head_dim]` of one supported dtype
    and one device that holds data (shared by every entry point: softmax, linear and Star
    attention). Every problem found is named at once."""
    raise_all([f"{name}: expected a torch.Tensor, got {type(t).__name__}" for name, t in (("q", q), ("k", k), ("v", v))
               if not isinstance(t, torch.Tensor)], TypeError)
    problems = [f"{name}: expected 4 dims [batch, seqlen, heads, head_dim], got shape {tuple(t.shape)}"
                for name, t in (("q", q), ("k", k), ("v", v)) if t.dim() != 4]
    if q.dtype not in DTYPES:
        problems.append(f"q: expected dtype in {[str(d) for d in DTYPES]}, got {q.dtype}")
    if q.device.type == "meta":
        # a meta tensor has no values to attend over (the planner checks shapes with meta
        # tensors through attention.check_strategy, not here)
        problems.append("q: expected a tensor with data (on cpu, cuda, ...), got one on the meta device")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            problems.append(f"{name}: expected dtype {q.dtype} (that of q), got {t.dtype}")
        if t.device != q.device:
            problems.append(f"{name}: expected device {q.device} (that of q), got {t.device}")
    raise_all(problems)


def check_tensors(q, k, v, same_seqlen: bool = True, value_dim: bool = False) -> None:
    """Types, ranks, dtypes, devices and shapes of q, k, v; `same_seqlen=False` lets the
    key length differ from the query length (Star's query phase); `value_dim=True` lets v
    have a head dim of its own (MLA). k is checked against q and then v against k, so each
    message blames the tensor that is wrong; every problem found is named at once."""
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
    if not problems and value_dim and (k.shape[:3] != v.shape[:3] or v.shape[3] == 0):
        problems.append(f"v: expected the shape of k {tuple(k.shape)} up to its head dim (any >= 1), "
                        f"got {tuple(v.shape)}")
    elif not problems and not value_dim and k.shape != v.shape:
        problems.append(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    raise_all(problems)


def resolve_scale(softmax_scale, head_dim: int) -> float:
    """`softmax_scale` checked, with None meaning `head_dim ** -0.5`."""
    if softmax_scale is None:
        return head_dim ** -0.5
    if not isinstance(softmax_scale, numbers.Real) or isinstance(softmax_scale, bool):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale: expected a finite float or None, got {softmax_scale!r}")
    return float(softmax_scale)


def layout_for(layout, q, group_of_default) -> SeqLayout:
    """`layout` checked against this process group and q's local length; None means a
    contiguous layout of equal local lengths on the default group."""
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


def group_of(layout):
    """The process group a call runs on: the layout's, else the default group (a layout
    built on a 1-D DeviceMesh holds the mesh's process group)."""
    return as_process_group(layout.group) if isinstance(layout, SeqLayout) else None


def no_seq(t) -> tuple:
    """`describe(t)` without the sequence dim (dim 1) of a `[B, n, ...]` tensor: a rank's
    share of the sequence may differ by rank, its other dims may not."""
    d = describe(t)
    if d[0] == "tensor" and len(d[1]) > 1:
        return (d[0], d[1][:1] + d[1][2:]) + d[2:]
    return d


def grad_wanted(*tensors) -> bool:
    """Whether autograd will run a backward (and its collectives) for this call."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


_DIGEST_MODULUS = 2 ** 31 - 1


def values_digest(t: torch.Tensor) -> tuple:
    """Two checksums of `t`'s bits (its sum and a position-weighted sum, modulo a prime), so
    ranks can agree that a replicated tensor is the same everywhere: computed on t's device
    in O(numel), then 16 bytes reach the host. Exact integer arithmetic, so equal tensors
    give equal digests on every device; reordered rows change the weighted sum."""
    flat = t.detach().contiguous().view(-1)
    bits = flat.view(torch.int16 if flat.element_size() == 2 else torch.int32).to(torch.int64)
    bits = torch.remainder(bits, _DIGEST_MODULUS)
    weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64)
    weights = torch.remainder(weights * 2654435761, _DIGEST_MODULUS)
    # every term is below 2**31, so the sums stay exact for up to 2**32 elements
    total = bits.sum()
    weighted = torch.remainder(bits * weights, _DIGEST_MODULUS).sum()
    return tuple(torch.stack([total, weighted]).tolist())
