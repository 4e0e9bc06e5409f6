"""Collectives with uneven sizes, counted in `seqpar.comm.stats`."""
from __future__ import annotations

import pickle
from typing import List, Sequence

import torch
import torch.distributed as dist

from . import stats


def all_gather_uneven(x: torch.Tensor, sizes: Sequence[int], group, op: str) -> List[torch.Tensor]:
    """Gather every rank's `x` (dim 0 of size `sizes[rank]`); returns the list by rank.

    Shards are padded to the largest size on the wire, so the bytes are
    `(P - 1) * max(sizes) * row_bytes` received per rank.
    """
    longest = max(sizes)
    row_shape = tuple(x.shape[1:])
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0],) + row_shape)])
    buffers = [x.new_empty((longest,) + row_shape) for _ in sizes]
    dist.all_gather(buffers, x.contiguous(), group=group)
    world = len(sizes)
    stats.record(op, stats.nbytes([x]) * (world - 1), stats.nbytes([x]) * (world - 1))
    return [buf[:n] for buf, n in zip(buffers, sizes)]


def all_reduce_sum(x: torch.Tensor, group, op: str) -> None:
    dist.all_reduce(x, group=group)
    world = dist.get_world_size(group)
    # ring all-reduce: 2 (P-1)/P of the tensor each way
    moved = 2 * (world - 1) * stats.nbytes([x]) // world
    stats.record(op, moved, moved)


def device_of(group) -> torch.device:
    """Where this group's collectives want their tensors (NCCL: the current CUDA device)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max(x: torch.Tensor, group, op: str) -> None:
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    world = dist.get_world_size(group)
    moved = 2 * (world - 1) * stats.nbytes([x]) // world
    stats.record(op, moved, moved)


def all_gather_object(obj, group, op: str) -> list:
    """Every rank's picklable `obj`, by rank. (torch's own version needs numpy.)"""
    device = device_of(group)
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=device), group=group)
    lengths = [int(t.item()) for t in sizes]
    shards = all_gather_uneven(payload, lengths, group, op)
    return [pickle.loads(bytes(shard.cpu().tolist())) for shard in shards]
