"""All-to-all between sequence shards and head shards (Ulysses), uneven lengths allowed."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist

from . import p2p, stats, timeout


class RowsExchange:
    """An all-to-all in flight (`post_all_to_all_rows`); `wait()` returns what arrived."""

    def __init__(self, recv: torch.Tensor, pending):
        self._recv, self._pending = recv, pending

    @torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
    def wait(self) -> torch.Tensor:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()
        return self._recv


@torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
def post_all_to_all_rows(send: torch.Tensor, send_rows: Sequence[int], recv_rows: Sequence[int], group, op: str,
                         members: Sequence[int] = None) -> RowsExchange:
    """Post an all-to-all: `send` `[sum(send_rows), *row]` goes out in consecutive pieces of
    `send_rows[j]` rows to member j; the exchange's `wait()` returns `[sum(recv_rows),
    *row]`, the piece from member i at its offset. `send` must stay untouched until then.

    `members`: the ranks of `group` taking part, in member order (default: all of them,
    and the group's all-to-all collective runs). A subset exchanges by one batch of
    isend/irecv on `group` itself, so no sub-group has to be created (creating one is only
    safe when every rank of the world joins in, which a sub-group's caller cannot promise).
    Every member posts its exchanges in the same order. Counted bytes leave out the piece a
    member sends to itself (a local copy)."""
    row_shape = tuple(send.shape[1:])
    row_numel = 1
    for size_ in row_shape:
        row_numel *= size_
    send = send.contiguous()
    recv = send.new_empty((sum(recv_rows),) + row_shape)
    if members is None:
        me = dist.get_rank(group)
        work = dist.all_to_all_single(
            recv.view(-1), send.view(-1),
            [n * row_numel for n in recv_rows], [n * row_numel for n in send_rows], group=group, async_op=True,
        )
        pending = timeout.Pending(work, group, op, recv.device, "all-to-all")
    else:
        me = members.index(dist.get_rank(group))
        sends = list(zip(torch.split(send, list(send_rows)), members))
        recvs = list(zip(torch.split(recv, list(recv_rows)), members))
        recvs[me][0].copy_(sends[me][0])
        own = members[me]
        pending = p2p.post([x for x in sends if x[1] != own], [x for x in recvs if x[1] != own], group, op=op,
                           record=False)
    size = send.element_size() * row_numel
    stats.record(op, (sum(send_rows) - send_rows[me]) * size, (sum(recv_rows) - recv_rows[me]) * size)
    return RowsExchange(recv, pending)


def all_to_all_rows(send: torch.Tensor, send_rows: Sequence[int], recv_rows: Sequence[int], group, op: str,
                    members: Sequence[int] = None) -> torch.Tensor:
    """`post_all_to_all_rows(...).wait()`: the all-to-all, done."""
    return post_all_to_all_rows(send, send_rows, recv_rows, group, op, members).wait()


def split_rows(x: torch.Tensor, rows: Sequence[int]) -> List[torch.Tensor]:
    return list(torch.split(x, list(rows), dim=0))
