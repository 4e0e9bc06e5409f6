"""The one stable merge of partial attention results.

Two partial results over disjoint key sets, `(o1, l1)` and `(o2, l2)` with `o` the
softmax-normalised output of each part and `l` its log-sum-exp, combine as

    l = max(l1, l2) + log1p(exp(-|l1 - l2|))
    o = o1 * exp(l1 - l) + o2 * exp(l2 - l) = o1 + sigmoid(l2 - l1) * (o2 - o1)

in fp32 (fp64 for fp64 inputs); the second form is the one computed. A row that has seen
no key carries `l = -inf`, `o = 0`; `-inf - -inf` is caught, so such rows stay finite.
A NaN in either `l` or `o` of a row makes the merged row NaN (block.py's NaN rule).
Shapes: `o` is `[B, n, H, D]`, `l` is `[B, H, n]`.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch


def merge_(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Merge a partial result into the accumulator `(out, lse)` in place (views allowed).

    Only the difference `d = part_lse - lse` enters the weights (`sigmoid(d)` for the part),
    so neither weight ever subtracts two large, rounded numbers: with |lse| ~ 1e4 in fp32
    the textbook `exp(l1 - l)` would already lose three digits.
    """
    part_lse = part_lse.to(lse.dtype)
    # equal lse give d = 0; that includes both -inf (no key seen on either side), where the
    # plain difference is nan (both outputs are 0 there). A NaN lse stays NaN: its weight is
    # NaN and so is the merged row (the NaN rule, block.py).
    d = torch.where(part_lse == lse, torch.zeros_like(lse), part_lse - lse)
    w_part = torch.sigmoid(d).transpose(1, 2).unsqueeze(-1).to(out.dtype)  # [B, n, H, 1]
    out.add_((part_out.to(out.dtype) - out).mul_(w_part))
    lse.copy_(torch.maximum(lse, part_lse) + torch.log1p(torch.exp(-d.abs())))


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
