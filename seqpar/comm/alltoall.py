"""All-to-all between sequence shards and head shards (Ulysses), uneven lengths allowed."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist

from . import p2p, stats, timeout


@torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
def all_to_all_rows(send: torch.Tensor, send_rows: Sequence[int], recv_rows: Sequence[int], group, op: str,
                    members: Sequence[int] = None) -> torch.Tensor:
    """`send` `[sum(send_rows), *row]` goes out in consecutive pieces of `send_rows[j]` rows
    to member j; returns `[sum(recv_rows), *row]`, the piece from member i at its offset.

    `members`: the ranks of `group` taking part, in member order (default: all of them,
    and the group's all-to-all collective runs). A subset exchanges by one batch of
    isend/irecv on `group` itself, so no sub-group has to be created (creating one is only
    safe when every rank of the world joins in, which a sub-group's caller cannot promise).
    Counted bytes leave out the piece a member sends to itself (a local copy)."""
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
        timeout.run(work, group, op, recv.device, "all-to-all")
    else:
        me = members.index(dist.get_rank(group))
        sends = list(zip(torch.split(send, list(send_rows)), members))
        recvs = list(zip(torch.split(recv, list(recv_rows)), members))
        recvs[me][0].copy_(sends[me][0])
        own = members[me]
        p2p.post([x for x in sends if x[1] != own], [x for x in recvs if x[1] != own], group, op=op, record=False).wait()
    size = send.element_size() * row_numel
    stats.record(op, (sum(send_rows) - send_rows[me]) * size, (sum(recv_rows) - recv_rows[me]) * size)
    return recv


def split_rows(x: torch.Tensor, rows: Sequence[int]) -> List[torch.Tensor]:
    return list(torch.split(x, list(rows), dim=0))
