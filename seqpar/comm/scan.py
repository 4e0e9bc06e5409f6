"""A linear recurrence across the ranks, pipelined in pieces: the ZeCO All-Scan.

Rank r holds `(a_r, b_r)` and needs `x_{r-1}` where `x_r = a_r * x_{r-1} + b_r` (ranks in
order; `reverse=True` runs from the last rank down: `x_r = a_r * x_{r+1} + b_r`). The value
is cut into `pieces` contiguous parts; each part is received, combined and sent on as soon
as it arrives, so rank r+1 starts on part 0 while rank r still waits for part 1. With a
value of `S` bytes, per-message latency `alpha` and time per byte `beta`, the last rank
holds its input after

    (P - 2 + pieces) * (alpha + beta * S / pieces)      (pieces = 1: (P - 1)(alpha + beta S))

instead of `(P - 1)(alpha + beta S)`: the whole value crosses the chain once, and each
further hop adds one piece. Every rank but the last sends `S` bytes in `pieces` messages.

Receives are posted when the scan is created, so a caller can post them, compute, and
`run` later (LASP-1's schedule) or `run` at once (All-Scan's).

`a` may also be a function `combine(lo, hi, incoming, b, out)` writing `out = a x_in + b`
for the elements `[lo, hi)`: an affine map (the delta rule's `[Dk, Dk]` transition) acts on
whole columns of the state, so the value is laid out column after column and the pieces are
cut at multiples of `unit` elements (one column).
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Tuple

import torch

from . import p2p, stats


class StateScan:
    """One scan of a flat value (1-D tensors) over the ranks of a group."""

    def __init__(self, numel: int, *, dtype, device, group, rank: int, world: int, peer: Callable[[int], int],
                 reverse: bool, pieces: int, op: str, unit: int = 1):
        step = -1 if reverse else 1
        self._src: Optional[int] = rank - step if 0 <= rank - step < world else None
        self._dst: Optional[int] = rank + step if 0 <= rank + step < world else None
        self._peer, self._group, self._op = peer, group, op
        if unit < 1 or numel % unit:
            raise ValueError(f"unit: expected a positive divisor of numel {numel}, got {unit}")
        pieces = max(1, min(pieces, numel // unit))
        self._bounds = [(lo * unit, hi * unit) for lo, hi in _bounds(numel // unit, pieces)]
        self.received = torch.zeros(numel, dtype=dtype, device=device)
        self._recvs: List[p2p.Exchange] = []
        if self._src is not None:
            self._recvs = [
                p2p.post([], [(self.received[lo:hi], peer(self._src))], group, op=op) for lo, hi in self._bounds
            ]
        self._sends: List[p2p.Exchange] = []

    def run(self, a, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """`(x_in, x_out)`: the value from the previous rank (zeros on the first) and this
        rank's `a * x_in + b` (`a=None` means 1; a function: `a(lo, hi, x_in, b, out)`), both
        flat like `b`; `x_out` is on its way on."""
        out = torch.empty_like(b)
        timing = stats.tracking()
        for i, (lo, hi) in enumerate(self._bounds):
            if self._src is None:
                out[lo:hi] = b[lo:hi]
            else:
                start = time.perf_counter() if timing else 0.0
                self._recvs[i].wait()
                if timing:
                    stats.record_wait(self._op, time.perf_counter() - start)
                incoming = self.received[lo:hi]
                if callable(a):
                    a(lo, hi, incoming, b[lo:hi], out[lo:hi])
                elif a is None:
                    torch.add(b[lo:hi], incoming, out=out[lo:hi])
                else:
                    torch.addcmul(b[lo:hi], a[lo:hi], incoming, out=out[lo:hi])
            if self._dst is not None:
                self._sends.append(p2p.post([(out[lo:hi], self._peer(self._dst))], [], self._group, op=self._op))
        return self.received, out

    def finish(self) -> None:
        """Wait until this rank's sends are complete (their buffers may then be reused)."""
        for exchange in self._sends:
            exchange.wait()
        self._sends = []


def _bounds(numel: int, pieces: int) -> List[Tuple[int, int]]:
    base, extra = divmod(numel, pieces)
    bounds, lo = [], 0
    for i in range(pieces):
        hi = lo + base + (1 if i < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds
