"""All-to-all between sequence shards and head shards (Ulysses), uneven lengths allowed."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist

from . import stats


def all_to_all_rows(send: torch.Tensor, send_rows: Sequence[int], recv_rows: Sequence[int], group, op: str) -> torch.Tensor:
    """`send` `[sum(send_rows), *row]` goes out in consecutive pieces of `send_rows[j]` rows
    to member j; returns `[sum(recv_rows), *row]`, the piece from member i at its offset.

    Counted bytes leave out the piece a member sends to itself (a local copy)."""
    row_shape = tuple(send.shape[1:])
    row_numel = send[0].numel() if send.shape[0] else int(torch.tensor(row_shape).prod().item())
    recv = send.new_empty((sum(recv_rows),) + row_shape)
    me = dist.get_rank(group)
    dist.all_to_all_single(
        recv.view(-1), send.contiguous().view(-1),
        [n * row_numel for n in recv_rows], [n * row_numel for n in send_rows], group=group,
    )
    size = send.element_size() * row_numel
    stats.record(op, (sum(send_rows) - send_rows[me]) * size, (sum(recv_rows) - recv_rows[me]) * size)
    return recv


def split_rows(x: torch.Tensor, rows: Sequence[int]) -> List[torch.Tensor]:
    return list(torch.split(x, list(rows), dim=0))
