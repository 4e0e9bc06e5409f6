"""Collectives with uneven sizes, counted in `seqpar.comm.stats`."""
from __future__ import annotations

import pickle
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from . import p2p, stats, timeout
from .p2p import global_rank


# The tag of the all-gathers that gloo runs as point-to-point messages: they never match a
# receive of other traffic between the same ranks (a strategy's own exchanges, tag 0).
GATHER_TAG = 0x5E9A


def gathers_by_p2p(group) -> bool:
    """Whether `all_gather_uneven_async` sends each shard straight to every peer instead of
    calling the backend's all-gather: on gloo. Its all-gather stages the shards through
    copies; straight messages timed 4.4 -> 3.4 ms (P=2, 4 MiB per rank), 9.7 -> 5.7 ms
    (P=4, 2 MiB), 67 -> 31 ms (P=4, 8 MiB) on loopback (2-core VM), and hold no copy of
    the rank's own shard. NCCL keeps its collective."""
    return dist.get_backend(group) == "gloo"


@torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
def all_gather_uneven_async(x: torch.Tensor, sizes: Sequence[int], group, op: str):
    """Post an all-gather of every rank's `x` (dim 0 of size `sizes[rank]`).

    Returns `(handle or None, buffers)`: after `handle.wait()` (which raises
    `seqpar.comm.CommTimeout` past the timeout), `buffers[r][:sizes[r]]` is rank r's shard
    (this rank's own: `x` itself, padded). Shards are padded to the largest size on the
    wire, so each rank sends and receives `(P - 1) * max(sizes) * row_bytes`. On gloo the
    shards go as messages to every peer (`gathers_by_p2p`), elsewhere by the backend's
    all-gather; `x` must stay untouched until the wait either way.
    """
    world = len(sizes)
    if world == 1:
        return None, [x]
    longest = max(sizes)
    row_shape = tuple(x.shape[1:])
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0],) + row_shape)])
    x = x.contiguous()
    stats.record(op, stats.nbytes([x]) * (world - 1), stats.nbytes([x]) * (world - 1))
    if gathers_by_p2p(group):
        me = dist.get_rank(group)
        buffers = [x if r == me else x.new_empty((longest,) + row_shape) for r in range(world)]
        # rank me + j gets ours while rank me - j's arrives: every pair in the same order
        sends = [(x, (me + j) % world) for j in range(1, world)]
        recvs = [(buffers[(me - j) % world], (me - j) % world) for j in range(1, world)]
        return p2p.post(sends, recvs, group, op, record=False, tag=GATHER_TAG, what="all-gather"), buffers
    buffers = [x.new_empty((longest,) + row_shape) for _ in sizes]
    work = dist.all_gather(buffers, x, group=group, async_op=True)
    return timeout.Pending(work, group, op, x.device, "all-gather"), buffers


@torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
def all_gather_uneven(x: torch.Tensor, sizes: Sequence[int], group, op: str) -> List[torch.Tensor]:
    """Every rank's `x` (dim 0 of size `sizes[rank]`), as a list by rank."""
    handle, buffers = all_gather_uneven_async(x, sizes, group, op)
    if handle is not None:
        handle.wait()
    return [buf[:n] for buf, n in zip(buffers, sizes)]


@torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
def reduce_scatter_sum(parts: List[torch.Tensor], group, op: str) -> torch.Tensor:
    """Sum over ranks of `parts[r]`, delivered to rank r (all parts the same shape)."""
    if len(parts) == 1:
        return parts[0]
    parts = [p.contiguous() for p in parts]
    out = torch.empty_like(parts[0])
    timeout.run(dist.reduce_scatter(out, parts, group=group, async_op=True), group, op, out.device, "reduce-scatter")
    moved = stats.nbytes(parts[:1]) * (len(parts) - 1)
    stats.record(op, moved, moved)
    return out


@torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
def all_reduce_sum(x: torch.Tensor, group, op: str) -> None:
    timeout.run(dist.all_reduce(x, group=group, async_op=True), group, op, x.device, "all-reduce")
    world = dist.get_world_size(group)
    # ring all-reduce: 2 (P-1)/P of the tensor each way
    moved = 2 * (world - 1) * stats.nbytes([x]) // world
    stats.record(op, moved, moved)


@torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
def broadcast(x: torch.Tensor, src: int, group, op: str, async_op: bool = False):
    """In place: `x` on every rank becomes group rank `src`'s `x` (same shape everywhere).
    With `async_op=True` returns a handle to `wait()` on (None when nothing was sent); its
    wait, like the synchronous call, raises `seqpar.comm.CommTimeout` past the timeout.

    Counted as a pipelined chain `src -> src+1 -> ... -> src-1`, which moves the least per
    rank: every rank but `src` receives the tensor once, every rank but the chain's last
    (`src - 1`) sends it once."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1  # one process needs no group
    if world == 1:
        return None
    work = dist.broadcast(x, src=global_rank(group, src), group=group, async_op=True)
    rank = dist.get_rank(group)
    size = stats.nbytes([x])
    stats.record(op, 0 if rank == (src - 1) % world else size, 0 if rank == src else size)
    handle = timeout.Pending(work, group, op, x.device, "broadcast")
    if not async_op:
        handle.wait()
        return None
    return handle


@torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
def reduce_sum(x: torch.Tensor, dst: int, group, op: str) -> None:
    """In place on group rank `dst`: `x` becomes the sum of every rank's `x`. On the other
    ranks `x` is left undefined (gloo uses it as scratch).

    Counted as the reverse chain of `broadcast`: every rank but `dst` sends the tensor once,
    every rank but the chain's first (`dst - 1`) receives it once."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        return
    timeout.run(dist.reduce(x, dst=global_rank(group, dst), group=group, async_op=True), group, op, x.device, "reduce")
    rank = dist.get_rank(group)
    size = stats.nbytes([x])
    stats.record(op, 0 if rank == dst else size, 0 if rank == (dst - 1) % world else size)


def backend_of(group) -> Optional[str]:
    """The name of `group`'s backend ("gloo", "nccl", ...), or None when torch.distributed
    is not initialized in this process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_backend(group)


def barrier(group, op: str) -> None:
    """Wait until every member of `group` has reached this call."""
    if dist.get_world_size(group) == 1:
        return
    device = device_of(group)
    timeout.run(dist.barrier(group=group, async_op=True), group, op, device, "barrier")


def device_of(group) -> torch.device:
    """Where this group's collectives want their tensors (NCCL: the current CUDA device)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
def all_reduce_max(x: torch.Tensor, group, op: str) -> None:
    timeout.run(dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group, async_op=True), group, op, x.device, "all-reduce")
    world = dist.get_world_size(group)
    moved = 2 * (world - 1) * stats.nbytes([x]) // world
    stats.record(op, moved, moved)


@torch.compiler.disable  # a process-group call: eager, a graph break under torch.compile
def all_gather_object(obj, group, op: str) -> list:
    """Every rank's picklable `obj`, by rank. (torch's own version needs numpy.)"""
    device = device_of(group)
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    mine = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    timeout.run(dist.all_gather(sizes, mine, group=group, async_op=True), group, op, device, "all-gather")
    lengths = [int(t.item()) for t in sizes]
    shards = all_gather_uneven(payload, lengths, group, op)
    return [pickle.loads(bytes(shard.cpu().tolist())) for shard in shards]
