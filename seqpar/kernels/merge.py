"""The one stable merge of partial attention results.

Two partial results over disjoint key sets, `(o1, l1)` and `(o2, l2)` with `o` the
softmax-normalised output of each part and `l` its log-sum-exp, combine as

    l = max(l1, l2) + log1p(exp(min(l1, l2) - max(l1, l2)))
    o = o1 * exp(l1 - l) + o2 * exp(l2 - l)

in fp32 (fp64 for fp64 inputs). A row that has seen no key carries `l = -inf`, `o = 0`;
the guards keep `-inf - -inf` from ever being evaluated, so such rows stay finite.
Shapes: `o` is `[B, n, H, D]`, `l` is `[B, H, n]`.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isneginf(x), torch.zeros_like(x), x)


def merge_lse(l1: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    hi = torch.maximum(l1, l2)
    lo = torch.minimum(l1, l2)
    # hi = -inf means both are -inf: exp(lo - 0) = 0 and the sum stays -inf
    return hi + torch.log1p(torch.exp(lo - _finite_or_zero(hi)))


def _row_weight(lse_part: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # [B, H, n] -> [B, n, H, 1]; exp(-inf - finite) = 0 for rows the part never saw
    return torch.exp(lse_part - _finite_or_zero(lse)).transpose(1, 2).unsqueeze(-1)


def merge_(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Merge a partial result into the accumulator `(out, lse)` in place (views allowed)."""
    new_lse = merge_lse(lse, part_lse.to(lse.dtype))
    w_acc = _row_weight(lse, new_lse)
    w_part = _row_weight(part_lse.to(lse.dtype), new_lse)
    out.mul_(w_acc).add_(part_out.to(out.dtype) * w_part)
    lse.copy_(new_lse)


def merge(parts: Sequence[Tuple[torch.Tensor, torch.Tensor]], dtype=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge partial results `[(out_i, lse_i), ...]` over disjoint key sets; returns `(out, lse)`."""
    if not parts:
        raise ValueError("parts: expected at least one (out, lse) pair, got none")
    first_out, first_lse = parts[0]
    acc = dtype or (torch.float64 if first_out.dtype == torch.float64 else torch.float32)
    out = first_out.to(acc, copy=True)
    lse = first_lse.to(acc, copy=True)
    for part_out, part_lse in parts[1:]:
        merge_(out, lse, part_out, part_lse)
    return out, lse
