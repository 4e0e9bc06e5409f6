"""Neighbour exchange: one batch of isend/irecv posted at once, waited later."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

from . import stats


def global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class Exchange:
    """Sends and receives posted together; `wait()` returns the received tensors."""

    def __init__(self, works, received: List[torch.Tensor]):
        self._works = works
        self._received = received

    def wait(self) -> List[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._works = []
        return self._received


def post(
    sends: Sequence[Tuple[torch.Tensor, int]],
    recvs: Sequence[Tuple[torch.Tensor, int]],
    group,
    op: str,
    record: bool = True,
) -> Exchange:
    """Post `sends` (tensor, group rank) and receives into `recvs` (buffer, group rank).

    Empty tensors are not put on the wire (gloo never completes a zero-byte pair); both
    ends derive the sizes from the same plan, so both skip them."""
    ops = [dist.P2POp(dist.isend, t, global_rank(group, peer), group) for t, peer in sends if t.numel()]
    ops += [dist.P2POp(dist.irecv, t, global_rank(group, peer), group) for t, peer in recvs if t.numel()]
    if record:
        stats.record(op, stats.nbytes(t for t, _ in sends), stats.nbytes(t for t, _ in recvs))
    works = dist.batch_isend_irecv(ops) if ops else []
    return Exchange(works, [t for t, _ in recvs])
