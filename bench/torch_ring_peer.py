"""Benchmark peer: PyTorch's own ring attention core, forward only, on CPU over gloo.

What runs
---------
`torch.distributed.tensor.experimental._context_parallel._attention._templated_ring_attention`
(the private engine behind `context_parallel()`), called directly:

    _templated_ring_attention(group, 2, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                              q_bhsd, k_bhsd, v_bhsd, is_causal=causal, scale=D ** -0.5)

Calling it directly (rather than through `context_parallel()` and the DTensor SDPA
dispatcher) measures the ring itself: no DeviceMesh, no DTensor dispatch, no resharding of
the caller's buffers. The per-block op is the CPU flash kernel, which returns
`(out [B,H,S,D], logsumexp [B,H,S])` — exactly the `(out, lse, *rest)` the template merges.

Layout torch expects
--------------------
* Tensor layout is [batch, heads, seq, head_dim] (bhsd). The `seq_dim` argument is only
  used by the output merger; everything else in the template hard-codes dim 2 (the
  `query.size(2) != key.size(2)` check, `chunk(2, dim=2)` for load balancing, the rotater
  built with seq_dim 2). So it MUST be 2, and we hand it `q.transpose(1, 2)` views of our
  bshd shards — the same strided bhsd views a model's SDPA call gives torch's CP.
* Sequence sharding without load balancing: contiguous, rank r holds the r-th of P chunks.
* With load balancing (`_cp_options.enable_load_balance = True`) torch uses the
  *head-tail* ("zigzag") layout of `_HeadTailLoadBalancer` (`_load_balancer.py`), not a
  round-robin stripe: the sequence is cut into 2P equal chunks and rank r holds chunk r
  followed by chunk 2P-1-r, concatenated. (Its docstring calls this "round-robin", but the
  indices it generates, and the template's logic — first K half = chunk `src`, second Q half
  = chunk 2P-1-r — are head-tail.) The global length must divide by 2P.
* Load balancing is causal-only: the template raises "Load balancing requires
  `is_causal=True`". For causal=False the order of keys is irrelevant (every query sees
  every key, and each rank keeps its own query rows), so `load_balance=True, causal=False`
  runs the template with balancing off on the zigzag shards and is still exact.
* Equal local lengths only (no uneven shards), self-attention only (q and k same length
  when causal), no GQA (the CPU flash op needs equal q/kv heads), no dropout.

Options (`_cp_options`, a module global — set inside `_cp_options_set` and restored after)
------------------------------------------------------------------------------------------
* `enable_load_balance = load_balance and causal` (see above).
* `convert_to_f32 = True` (torch's default): partial outputs/LSEs are merged in fp32, like
  our fp32 accumulator.
* `rotate_method = ALL_TO_ALL`, i.e. `set_rotate_method("alltoall")`. Why: torch's default,
  ALL_GATHER, is not a ring — it all-gathers every rank's K/V once up front (one
  collective, P x the K/V memory resident) and then indexes into it, so the cost model
  differs from a ring. ALL_TO_ALL issues, at every step, a `permute_tensor` (an
  `all_to_all_single` whose only non-empty split goes to rank r+1 / comes from rank r-1),
  posted before the step's block compute and waited on at the next step: the same bytes,
  same neighbour pattern, same one-step-ahead overlap and same O(1) K/V buffers as our
  point-to-point ring. It is the apples-to-apples setting. (At P=2 the two move the same
  bytes; `torch_ring_forward(..., rotate="allgather")` is there for reference.)

Things worth knowing when reading timings
-----------------------------------------
* The template makes K and V contiguous (a copy of the strided bhsd view) and
  concatenates them into one flat buffer every step before sending; with load balancing
  it rebuilds the whole output/LSE with `torch.cat` on every partial merge. That is
  torch's cost, and is counted.
* Without load balancing and causal, steps whose K/V are entirely in the future are
  skipped, but their K/V are still forwarded (it is a ring).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time

import torch

_RING_MODULE = "torch.distributed.tensor.experimental._context_parallel._attention"


def available() -> str | None:
    """None if the templated ring can run here, else why not."""
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this build"
    if not dist.is_gloo_available():
        return "the gloo backend is not available in this build"
    try:
        attn = __import__(_RING_MODULE, fromlist=["_templated_ring_attention"])
    except Exception as exc:  # private module: moves between releases
        return f"cannot import {_RING_MODULE}: {exc!r}"
    for name in ("_templated_ring_attention", "_cp_options", "_RotateMethod"):
        if not hasattr(attn, name):
            return f"{_RING_MODULE} has no {name} (torch {torch.__version__})"
    if not hasattr(attn._RotateMethod, "ALL_TO_ALL"):
        return f"_RotateMethod has no ALL_TO_ALL (torch {torch.__version__})"
    if not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return "aten._scaled_dot_product_flash_attention_for_cpu is missing"
    return None


@contextlib.contextmanager
def _cp_options_set(**values):
    """Temporarily set fields of torch's global `_cp_options`; restore them on exit."""
    from torch.distributed.tensor.experimental._context_parallel._attention import _cp_options

    saved = {name: getattr(_cp_options, name) for name in values}
    try:
        for name, value in values.items():
            setattr(_cp_options, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(_cp_options, name, value)


def torch_ring_forward(q, k, v, *, causal: bool, group=None, load_balance: bool,
                       rotate: str = "alltoall") -> torch.Tensor:
    """This rank's attention output, via torch's templated ring; q/k/v/out are bshd shards.

    load_balance=False: rank r holds the r-th contiguous chunk of N/P tokens.
    load_balance=True: head-tail/zigzag — chunks r and 2P-1-r of 2P, concatenated.
    `rotate` picks torch's K/V rotation ("alltoall" = per-step neighbour ring, the default
    here; "allgather" = torch's own default, one up-front all-gather).
    """
    import torch.distributed as dist
    from torch.distributed.tensor.experimental._context_parallel._attention import (
        _RotateMethod,
        _templated_ring_attention,
    )

    if group is None:
        group = dist.group.WORLD  # the template insists on a ProcessGroup object
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"equal q/k/v shard shapes required, got {q.shape}, {k.shape}, {v.shape}")
    if load_balance and q.shape[1] % 2:
        raise ValueError(f"load_balance: the local length {q.shape[1]} must be even (2 chunks)")
    method = {"alltoall": _RotateMethod.ALL_TO_ALL, "allgather": _RotateMethod.ALL_GATHER}[rotate]
    scale = q.shape[-1] ** -0.5
    with _cp_options_set(enable_load_balance=bool(load_balance and causal),
                         convert_to_f32=True, rotate_method=method):
        out, _lse = _templated_ring_attention(
            group,
            2,  # seq_dim: bhsd; the template hard-codes 2 elsewhere, so nothing else works
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=causal,
            scale=scale,
        )[:2]
    # The CPU flash op allocates its output bshd-contiguous and elementwise merges keep that
    # order, so this is usually free; after a load-balanced partial merge (torch.cat along
    # dim 2) the result is bhsd-contiguous and this is one copy of the output. Our ring
    # returns contiguous bshd, so the peer pays for the same contract.
    return out.transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------
# self-check and timing (run: python bench/torch_ring_peer.py)
# --------------------------------------------------------------------------------------

def _shard(x: torch.Tensor, rank: int, world: int, load_balance: bool) -> torch.Tensor:
    """Rank `rank`'s rows (dim 1) of a global bshd tensor, in the layout torch expects."""
    if not load_balance:
        return x.chunk(world, dim=1)[rank].contiguous()
    chunks = x.chunk(2 * world, dim=1)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=1).contiguous()


def _check_case(seed: int, b: int, n: int, h: int, d: int, causal: bool, load_balance: bool,
                rotate: str = "alltoall") -> float:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed)  # every rank builds the same global q/k/v
    q, k, v = (torch.randn(b, n, h, d, generator=g) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
    ).transpose(1, 2)
    out = torch_ring_forward(*(_shard(t, rank, world, load_balance) for t in (q, k, v)),
                             causal=causal, load_balance=load_balance, rotate=rotate)
    return (out - _shard(ref, rank, world, load_balance)).abs().max().item()


def _time_case(b: int, n: int, h: int, d: int, causal: bool, load_balance: bool, rotate: str,
               iters: int) -> list:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1234 + rank)
    q, k, v = (torch.randn(b, n // world, h, d, generator=g) for _ in range(3))
    times = []
    for _ in range(1 + iters):  # the first is the warm-up
        dist.barrier()
        t0 = time.perf_counter()
        torch_ring_forward(q, k, v, causal=causal, load_balance=load_balance, rotate=rotate)
        times.append(time.perf_counter() - t0)
    return times[1:]


def _main() -> None:
    reason = available()
    if reason is not None:
        print(f"torch ring peer unavailable: {reason}")
        return
    from seqpar.testing import world as make_world

    P = 2
    w = make_world(P, threads_per_rank=1)

    b, n, h, d = 1, 256, 4, 32
    for causal in (True, False):
        for load_balance in (True, False):
            errs = w.run(_check_case, 0, b, n, h, d, causal, load_balance)
            err = max(errs)
            print(f"check P={P} B={b} N={n} H={h} D={d} fp32 causal={causal!s:5} "
                  f"load_balance={load_balance!s:5} max|err|={err:.2e}")
            assert err < 1e-4, f"torch ring differs from dense attention by {err}"

    b, n, h, d = 1, 16384, 8, 64
    # P ranks x 1 thread should own the cores; anything else running skews the numbers
    print(f"host: {os.cpu_count()} cores, 1-min load average before timing {os.getloadavg()[0]:.2f}")
    for rotate in ("alltoall", "allgather"):
        per_rank = w.run(_time_case, b, n, h, d, True, True, rotate, 3)
        # an iteration takes as long as its slowest rank
        slowest = [max(ts) for ts in zip(*per_rank)]
        tag = "" if rotate == "alltoall" else "  (reference: torch's default rotation)"
        print(f"time  P={P} B={b} N={n} H={h} D={d} fp32 causal load_balance rotate={rotate} "
              f"1 thread/rank: median {1e3 * statistics.median(slowest):.1f} ms "
              f"(runs {', '.join(f'{1e3 * t:.1f}' for t in slowest)}){tag}")


if __name__ == "__main__":
    _main()
