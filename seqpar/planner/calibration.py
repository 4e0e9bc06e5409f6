"""`calibrate()`: measure a group's collectives and block kernel into a `Topology`.

Every measurement goes through `seqpar.comm` (the helpers the strategies call: the ring's
neighbour exchange, the all-to-all, all-gather, reduce-scatter and all-reduce, and the
barrier that starts each timing on all ranks together), so every wait on a peer is
bounded by `seqpar.comm.timeout` and fails as a `CommTimeout` naming the operation.
"""
from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time
from typing import Dict, List, Sequence, Tuple

import torch

from ..comm import alltoall, collectives, p2p
from ..kernels import block
from ..layout import group_rank_and_size
from . import topology as _topology
from .schedule import BACKWARD_FLOPS, FORWARD_FLOPS
from .topology import KINDS, Topology, _device_name, _dtype, _dtype_name, cache_path, default_topology, steps

def _fit(points: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """`time = intercept + bytes * slope` by least squares on relative residuals (each
    point weighs 1/time^2, so small messages fit their latency as well as large ones fit
    their bandwidth); both kept positive."""
    w = [1.0 / max(y, 1e-12) ** 2 for _, y in points]
    sw = sum(w)
    mx = sum(wi * x for wi, (x, _) in zip(w, points)) / sw
    my = sum(wi * y for wi, (_, y) in zip(w, points)) / sw
    var = sum(wi * (x - mx) ** 2 for wi, (x, _) in zip(w, points))
    slope = sum(wi * (x - mx) * (y - my) for wi, (x, y) in zip(w, points)) / var if var else 0.0
    if slope <= 0:
        # noise swamped the size dependence. Charging all of a point's time to its bytes
        # would turn a latency-bound small message into a bandwidth of a few MB/s (that
        # once priced Ulysses 30x too high); instead the smallest message gives the
        # latency and the largest one's extra time, at least a tenth of it, the bytes
        (x0, y0), (x1, y1) = min(points), max(points)
        slope = max(y1 - y0, 0.1 * y1) / x1
        return max(y0 - slope * x0, 1e-7), slope
    intercept = max(my - slope * mx, 1e-7)
    return intercept, slope


def _timed(fn, repeats: int, group, device, calls: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` on this rank, every timing started together
    on all ranks (a barrier first), so the ranks contend for the machine as they will when
    attention runs; one untimed call first (connections, buffers, caches). A timing of
    `calls` calls back to back gives seconds per call."""
    fn()
    times = []
    for _ in range(repeats):
        collectives.barrier(group, op="calibrate")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


# calls per timing window at most: the smallest CPU block (16 tokens, ~30 us a call) gets
# a window of ~30 ms instead of the full one (still many scheduler slices)
_MAX_CALLS = 1000


def _calls_to_fill(fns: Sequence, window: float, group, device) -> List[int]:
    """For each of `fns`, how many calls back to back take about `window` seconds on the
    slowest rank (at most `_MAX_CALLS`; the same counts on every rank). A kernel timed
    alone can finish inside one scheduler time slice while its rank has the core to itself;
    with more ranks than cores that overstates the rate the ranks get together, which a
    window of many calls (every rank computing for all of it) does not."""
    once = _slowest([_timed(fn, 1, group, device) for fn in fns], group, device)
    return [max(1, min(_MAX_CALLS, math.ceil(window / max(t, 1e-6)))) for t in once]


def _slowest(values: Sequence[float], group, device) -> List[float]:
    """Each value's maximum over the ranks (the same list on every rank)."""
    mine = torch.tensor(list(values), dtype=torch.float64, device=device)
    collectives.all_reduce_max(mine, group, op="calibrate")
    return [float(x) for x in mine.tolist()]


def _exchange(x: torch.Tensor, buf: torch.Tensor, group, rank: int, world: int):
    """Post the ring's neighbour exchange: `x` to rank+1, `buf` from rank-1."""
    return p2p.post([(x, (rank + 1) % world)], [(buf, (rank - 1) % world)], group, op="calibrate", record=False)


def _measure_links(group, world: int, rank: int, device, sizes: Sequence[int], repeats: int) -> Dict[str, Tuple]:
    """(latency per step, bandwidth, points) of each kind, fitted over message sizes."""
    timed, sent = [], []
    for kind in KINDS:
        for size in sizes:
            numel = max(world, size // 4 // world * world)  # divisible by the world for the collectives
            x = torch.ones(numel, dtype=torch.float32, device=device)
            if kind == "p2p":
                buf = torch.empty_like(x)

                def fn(x=x, buf=buf):
                    _exchange(x, buf, group, rank, world).wait()
                nbytes = x.numel() * 4
            elif kind == "alltoall":
                rows = [numel // world] * world

                def fn(x=x, rows=rows):
                    alltoall.all_to_all_rows(x, rows, rows, group, op="calibrate")
                nbytes = x.numel() * 4 * (world - 1) // world
            elif kind == "allgather":
                piece = x[: numel // world].clone()

                def fn(piece=piece):
                    collectives.all_gather_uneven(piece, [piece.shape[0]] * world, group, op="calibrate")
                nbytes = piece.numel() * 4 * (world - 1)
            elif kind == "reduce_scatter":
                parts = list(x.chunk(world))

                def fn(parts=parts):
                    collectives.reduce_scatter_sum(parts, group, op="calibrate")
                nbytes = parts[0].numel() * 4 * (world - 1)
            else:
                def fn(x=x):
                    collectives.all_reduce_sum(x, group, op="calibrate")
                nbytes = 2 * (world - 1) * x.numel() * 4 // world
            timed.append(_timed(fn, repeats, group, device))
            sent.append(float(nbytes))
    # the slowest rank's time of each call: every rank fits the same points
    timed = _slowest(timed, group, device)
    results, i = {}, 0
    for kind in KINDS:
        points = list(zip(sent[i:i + len(sizes)], timed[i:i + len(sizes)]))
        i += len(sizes)
        intercept, slope = _fit(points)
        results[kind] = (intercept / steps(kind, world), 1.0 / slope, points)
    return results


def _kernel_calls(device, dtype, backend: str, n: int, heads: int, head_dim: int):
    """(forward call, backward call, flops of each) of the block kernel on a square n-token block."""
    gen = torch.Generator().manual_seed(0)
    scale = head_dim ** -0.5
    q, k, v, do = (torch.randn(1, n, heads, head_dim, generator=gen).to(device=device, dtype=dtype)
                   for _ in range(4))
    fwd, bwd = block.kernels(backend, q, k)
    out, lse = fwd(q, k, v, scale, None)
    out = out.to(dtype)
    elements = float(n * n * heads * head_dim)
    return (lambda: fwd(q, k, v, scale, None), lambda: bwd(do, q, k, v, out, lse, scale, None),
            FORWARD_FLOPS * elements, BACKWARD_FLOPS * elements)


def _measure_kernel(group, device, dtype, backend: str, sizes: Sequence[int], heads: int, head_dim: int,
                    repeats: int) -> Tuple[float, float, float]:
    """(forward flop/s, backward flop/s, seconds per call) of the block kernel, fitted over
    square unmasked blocks of `sizes` tokens, all ranks computing at once. Each size is
    timed over a window of calls back to back (`_calls_to_fill`); on CUDA the launches then
    queue as they do inside a strategy, so the per-call overhead is the launch throughput,
    not the latency of one synchronised call."""
    timed, flops = [], []
    window = 0.02 if device.type == "cuda" else 0.15
    for n in sizes:
        fwd, bwd, f_flops, b_flops = _kernel_calls(device, dtype, backend, n, heads, head_dim)
        f_calls, b_calls = _calls_to_fill((fwd, bwd), window, group, device)
        timed += [_timed(fwd, repeats, group, device, f_calls), _timed(bwd, repeats, group, device, b_calls)]
        flops += [f_flops, b_flops]
    timed = _slowest(timed, group, device)
    f_overhead, f_slope = _fit(list(zip(flops[0::2], timed[0::2])))
    b_overhead, b_slope = _fit(list(zip(flops[1::2], timed[1::2])))
    return 1.0 / f_slope, 1.0 / b_slope, min(f_overhead, b_overhead)


def _measure_overlap(group, world: int, rank: int, device, dtype, backend: str, n: int, heads: int,
                     bandwidth: float, repeats: int) -> float:
    """The fraction of a neighbour exchange that hides behind a block computed meanwhile:
    `(t_compute + t_exchange - t_both) / min(t_compute, t_exchange)`, the exchange sized to
    take about as long as the block; the smallest over the ranks."""
    fwd, _, _, _ = _kernel_calls(device, dtype, backend, n, heads, 64)
    t_compute = _timed(fwd, repeats, group, device)
    # the message size must be the same on every rank: size it from the slowest rank's block
    numel = int(min(max(_slowest([t_compute], group, device)[0] * bandwidth, 1 << 16), 1 << 26)) // 4
    x = torch.ones(numel, dtype=torch.float32, device=device)
    buf = torch.empty_like(x)
    t_exchange = _timed(lambda: _exchange(x, buf, group, rank, world).wait(), repeats, group, device)

    def both():
        pending = _exchange(x, buf, group, rank, world)
        fwd()
        pending.wait()

    t_both = _timed(both, repeats, group, device)
    mine = (t_compute + t_exchange - t_both) / max(1e-12, min(t_compute, t_exchange))
    return -_slowest([-min(1.0, max(0.0, mine))], group, device)[0]


def calibrate(group=None, *, dtype=None, backend: str = "auto", save: bool = True,
              message_sizes: Sequence[int] = (1 << 12, 1 << 18, 1 << 22), repeats: int = 5) -> Topology:
    """Measure this group's collectives and block kernel; return (and cache) a Topology.

    Collective over `group` (default: the world). Times p2p neighbour exchange, all-to-all,
    all-gather, reduce-scatter and all-reduce at `message_sizes` (bytes), fits `latency per
    step + bytes / bandwidth` per kind, times the resolved block kernel's forward and
    backward on square blocks (`dtype`: default bfloat16 on CUDA, float32 on CPU) for its
    flop rates and per-call overhead, and how much of an exchange hides behind a block
    computed meanwhile (`overlap`). Every timing starts on all ranks together (a barrier)
    and is the median of `repeats`; each is then the slowest rank's (a MAX all-reduce), so
    every rank fits the same numbers and returns the same Topology. Ranks per node come
    from the ranks' hostnames. On one node the measurements describe the intra-node links
    and the inter-node ones keep the device type's defaults; across nodes the measurements
    describe the inter-node links (the slowest link bounds each call) and the intra-node
    ones keep the defaults.

    `save=True` writes the result to `cache_path(...)` on every host (see `cache_dir`),
    where `strategy="auto"` finds it. Takes a few seconds.
    """
    backend_name = collectives.backend_of(group)
    if backend_name is None:
        raise ValueError("group: calibrate needs an initialized torch.distributed process group, got none")
    rank, world = group_rank_and_size(group)
    device = collectives.device_of(group)
    dtype = _dtype(dtype if dtype is not None else (torch.bfloat16 if device.type == "cuda" else torch.float32))
    hosts = collectives.all_gather_object(socket.gethostname(), group, op="calibrate")
    per_host = {h: hosts.count(h) for h in hosts}
    contiguous = all(hosts[i] == hosts[i - 1] or hosts[i] not in hosts[:i] for i in range(1, world))
    ranks_per_node = min(per_host.values()) if contiguous and len(set(per_host.values())) == 1 else 1
    base = default_topology(device.type, dtype, world, ranks_per_node=ranks_per_node)
    measured = ()
    if world > 1:
        links = _measure_links(group, world, rank, device, message_sizes, repeats)
        level = "intra" if len(per_host) == 1 else "inter"
        measured = tuple((level, kind, lat, bw) for kind, (lat, bw, _) in links.items())
        p2p_lat, p2p_bw = links["p2p"][:2]
        if level == "intra":
            base = base.replace(intra_latency=p2p_lat, intra_bandwidth=p2p_bw)
        else:
            base = base.replace(inter_latency=p2p_lat, inter_bandwidth=p2p_bw)
    concrete = block.resolve_backend(backend, device, dtype, 64)
    # a tiny block pins the per-call overhead, two larger ones the flop rate (on the
    # project's 2-core CPU the rate per element stayed flat from 1024 to 8192 keys)
    sizes = (64, 512, 2048) if device.type == "cuda" else (16, 256, 1024)
    heads = 16 if device.type == "cuda" else 4
    fwd_rate, bwd_rate, overhead = _measure_kernel(group, device, dtype, concrete, sizes, heads, 64,
                                                   min(repeats, 3))
    overlap = base.overlap
    if world > 1:
        overlap = _measure_overlap(group, world, rank, device, dtype, concrete, sizes[-1], heads, base.intra_bandwidth
                                   if len(per_host) == 1 else base.inter_bandwidth, repeats)
    topo = base.replace(compute_rate=fwd_rate, backward_rate=bwd_rate, kernel_overhead=overhead, overlap=overlap,
                        measured=measured,
                        source=f"calibrated {time.strftime('%Y-%m-%d %H:%M:%S')} on {world} rank(s), "
                               f"{backend_name}, {_device_name(device)}, {_dtype_name(dtype)}, "
                               f"{concrete} kernel")
    # one answer everywhere, even if float arithmetic were to differ between hosts: rank 0's
    topo = Topology.from_dict(collectives.all_gather_object(topo.to_dict(), group, op="calibrate")[0])
    if save:
        path = cache_path(backend_name, world, device, dtype)
        if hosts.index(hosts[rank]) == rank:  # one writer per host (they would write the same)
            path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"topology": topo.to_dict(), "hosts": hosts, "seqpar_cache_version": 1}
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(payload, indent=2))
            os.replace(tmp, path)
        _topology._loaded[(backend_name, world, str(device), dtype)] = topo
    # every rank, whatever its `save`: when calibrate returns, each host's file is complete
    collectives.barrier(group, op="calibrate")
    return topo

