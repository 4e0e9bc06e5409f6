"""Neighbour exchange: one batch of isend/irecv posted at once, waited later."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

from . import stats, timeout


def global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class Exchange:
    """Sends and receives posted together; `wait()` returns the received tensors, or raises
    `seqpar.comm.CommTimeout` naming `op` and the late peers once the timeout passes."""

    def __init__(self, works, received: List[torch.Tensor], group=None, op: str = "", peers: Sequence[int] = (),
                 device: torch.device = torch.device("cpu"), what: str = "exchange"):
        self._works = list(works)
        self._received = received
        self._group, self._op, self._device, self._what = group, op, device, what
        # gloo returns one work per op, in order, so a late work names its own peer; a
        # coalescing backend (NCCL) returns one for the batch, which waits for them all
        if len(self._works) == len(peers):
            self._peers = [[p] for p in peers]
        else:
            self._peers = [sorted(set(peers))] * len(self._works)


    @torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
    def wait(self) -> List[torch.Tensor]:
        works, self._works = self._works, []
        if works:
            timeout.wait(works, self._group, self._op, self._peers, self._device, self._what)
        return self._received


@torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
def post(
    sends: Sequence[Tuple[torch.Tensor, int]],
    recvs: Sequence[Tuple[torch.Tensor, int]],
    group,
    op: str,
    record: bool = True,
    tag: int = 0,
    what: str = "exchange",
) -> Exchange:
    """Post `sends` (tensor, group rank) and receives into `recvs` (buffer, group rank).

    Empty tensors are not put on the wire (gloo never completes a zero-byte pair); both
    ends derive the sizes from the same plan, so both skip them. `tag`: messages match
    only receives of the same tag (gloo; NCCL matches by order alone), so traffic of
    another kind between the same ranks can never land in these buffers. `what` words
    the operation in a timeout's error."""
    wire = [(dist.isend, t, global_rank(group, peer)) for t, peer in sends if t.numel()]
    wire += [(dist.irecv, t, global_rank(group, peer)) for t, peer in recvs if t.numel()]
    ops = [dist.P2POp(kind, t, peer, group, tag) for kind, t, peer in wire]
    if record:
        stats.record(op, stats.nbytes(t for t, _ in sends), stats.nbytes(t for t, _ in recvs))
    if not ops:
        return Exchange([], [t for t, _ in recvs])
    works = dist.batch_isend_irecv(ops)
    return Exchange(works, [t for t, _ in recvs], group, op, [peer for _, _, peer in wire], wire[0][1].device,
                    what)
