"""Linear-attention rows of `python -m seqpar bench`: the three methods by world size.

For each P, a local gloo world of P ranks (`cores / P` threads each) runs every method;
the yardstick is single-process chunked linear attention (the same torch kernels, the
whole sequence, every core of the ranks together), timed in the same world on rank 0 and
interleaved round by round with the methods. Each row: median wall time (slowest rank per
round) of the forward and of forward+backward, the ratio to the single process, bytes sent
per rank against the analytic volume, and the last rank's measured wait for its incoming
state in the forward (seconds blocked, median over rounds), and the max error relative to
the single process's output and gradients.

A second table isolates the chain: the cross-rank scan alone (no attention work, a barrier
before each round), the last rank's wait for states of two sizes, ring (one piece) against
the All-Scan (`default_scan_pieces` pieces), and the all-gather of LASP-2.

`kind` picks the model: "scalar" (`linear_attention`, the config's `decay`), "gla" (a gate
per key channel, `decay` `[B, N, H, Dk]`) or "delta" (`delta_attention`, the gated delta
rule with the config's `decay`; the single process runs the delta chunk kernel under
autograd, and the chain combines with a `[Dk, Dk]` matrix per (batch, head): `A x + b` on
pieces of whole columns; its all-gather moves the state and the transition).
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .common import progress, rel_err, settle, timed_call

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
METHODS = ("ring", "allgather", "allscan")
KINDS = ("scalar", "gla", "delta")


@dataclass
class LinearBenchConfig:
    world_sizes: Tuple[int, ...] = (2, 4)
    seq_len: int = 65536
    batch: int = 1
    heads: int = 4
    key_dim: int = 64
    value_dim: int = 64
    dtype: str = "float32"
    decay: str = "token"  # "none", "head" or "token"
    methods: Tuple[str, ...] = METHODS
    chunk_size: int = 64
    repeats: int = 3
    warmup: int = 1
    chain_state_bytes: Tuple[int, ...] = (64 * 1024, 4 * 1024 * 1024)
    chain_repeats: int = 30
    seed: int = 0
    kind: str = "scalar"  # one of KINDS

    @property
    def effective_decay(self) -> str:
        return "channel" if self.kind == "gla" else self.decay

    @property
    def op_prefix(self) -> str:
        return "delta" if self.kind == "delta" else "linear"


def _inputs(cfg: LinearBenchConfig):
    gen = torch.Generator().manual_seed(cfg.seed)
    dtype = DTYPES[cfg.dtype]
    b, n, h = cfg.batch, cfg.seq_len, cfg.heads
    q = torch.randn(b, n, h, cfg.key_dim, generator=gen).to(dtype)
    k = torch.randn(b, n, h, cfg.key_dim, generator=gen)
    # the delta rule's k is L2-normalised, as the models feed it
    k = (torch.nn.functional.normalize(k, dim=-1) if cfg.kind == "delta" else k * cfg.key_dim ** -0.5).to(dtype)
    v = torch.randn(b, n, h, cfg.value_dim, generator=gen).to(dtype)
    do = torch.randn(b, n, h, cfg.value_dim, generator=gen).to(dtype)
    # decays in the range gated linear attentions learn: exp(g) in [0.9, 1)
    g = {"none": None,
         "head": torch.rand(h, generator=gen) * -0.1,
         "token": torch.rand(b, n, h, generator=gen) * -0.1,
         "channel": torch.rand(b, n, h, cfg.key_dim, generator=gen) * -0.1}[cfg.effective_decay]
    beta = torch.rand(b, n, h, generator=gen).to(dtype) if cfg.kind == "delta" else None
    return q, k, v, do, g, beta


class _SingleProcess(torch.autograd.Function):
    """The yardstick: the chunked kernels over the whole sequence in one process."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, chunk):
        from ..kernels import linear

        ctx.save_for_backward(q, k, v, g)
        ctx.args = (scale, chunk)
        return linear.chunk_forward(q, k, v, g, scale, chunk)[0].to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        from ..kernels import linear

        q, k, v, g = ctx.saved_tensors
        dq, dk, dv, dg = linear.chunk_backward(do, q, k, v, g, *ctx.args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, None, None


def _single_delta(q, k, v, beta, g, scale, chunk):
    """The delta rule's yardstick: its chunk kernel over the whole sequence, under autograd."""
    from ..kernels import delta

    return delta.chunk_forward(q, k, v, beta, g, scale, chunk)[0].to(q.dtype)


def bench_linear_on_rank(cfg: LinearBenchConfig) -> Dict:
    import torch.distributed as dist

    import seqpar
    from ..strategies import delta as delta_strategy
    from ..strategies import linear as linear_strategy

    rank, world = dist.get_rank(), dist.get_world_size()
    rank_threads = torch.get_num_threads()
    single_threads = min(rank_threads * world, os.cpu_count() or 1)
    q, k, v, do, g, beta = _inputs(cfg)
    scale = cfg.key_dim ** -0.5
    layout = seqpar.SeqLayout(cfg.seq_len)
    full_g = None if g is None else (g.view(1, 1, -1).expand(cfg.batch, cfg.seq_len, -1) if g.dim() == 1 else g)
    local = [layout.shard(t).contiguous() for t in (q, k, v, do)]
    local_g = None if g is None else (g if g.dim() == 1 else layout.shard(g).contiguous())
    local_beta = None if beta is None else layout.shard(beta).contiguous()
    for t in local[:3]:
        t.requires_grad_()
    whole = [t.clone().requires_grad_(i < 3) for i, t in enumerate((q, k, v, do))]
    delta = cfg.kind == "delta"
    prefix = cfg.op_prefix

    def single(backward: bool):
        if delta:
            out = _single_delta(whole[0], whole[1], whole[2], beta, full_g, scale, cfg.chunk_size)
        else:
            out = _SingleProcess.apply(whole[0], whole[1], whole[2], full_g, scale, cfg.chunk_size)
        if backward:
            out.backward(whole[3])
        return out

    def method_fn(method):
        def run(backward: bool):
            if delta:
                out = seqpar.delta_attention(local[0], local[1], local[2], local_beta, layout=layout, decay=local_g,
                                             scale=scale, method=method, backend="torch", chunk_size=cfg.chunk_size)
            else:
                out = seqpar.linear_attention(local[0], local[1], local[2], layout=layout, decay=local_g, scale=scale,
                                              method=method, backend="torch", chunk_size=cfg.chunk_size)
            if backward:
                out.backward(local[3])
            return out
        return run

    contestants = {"single process": single}
    contestants.update({m: method_fn(m) for m in cfg.methods})
    times = {(name, bwd): [] for name in contestants for bwd in (False, True)}
    waits = {name: [] for name in cfg.methods}
    steps, step = (cfg.warmup + cfg.repeats) * len(contestants) * 2, 0
    for round_ in range(cfg.warmup + cfg.repeats):
        for name, fn in contestants.items():
            for bwd in (False, True):
                step += 1
                active = name != "single process" or rank == 0
                if name == "single process" and active:
                    torch.set_num_threads(single_threads)
                for t in whole[:3] + local[:3]:
                    t.grad = None
                with seqpar.comm.track() as stats:
                    def call():
                        if not active:
                            return
                        if bwd:
                            fn(True)
                        else:
                            with torch.no_grad():
                                fn(False)

                    elapsed = timed_call(call)
                torch.set_num_threads(rank_threads)
                if name == "single process":
                    settle()  # its threads spin on after it, on the cores the next contestant uses
                if round_ >= cfg.warmup:
                    times[(name, bwd)].append(elapsed if active else 0.0)
                    if name in waits and not bwd:
                        waits[name].append(stats.wait_seconds(f"{prefix}.{name}.forward"))
                if rank == 0:
                    label = "warm-up" if round_ < cfg.warmup else f"round {round_ - cfg.warmup + 1}/{cfg.repeats}"
                    progress(f"  P={world} timing [{step}/{steps}, {label}] {name} {'fwd+bwd' if bwd else 'fwd'}: "
                             f"{elapsed:.3f} s (rank 0)", final=step == steps)
    result = {"rank": rank, "threads": rank_threads, "single_threads": single_threads,
              "positions": layout.positions()}
    for i, (name, fn) in enumerate(contestants.items()):
        if rank == 0:
            progress(f"  P={world} checking [{i + 1}/{len(contestants)}] {name}: bytes sent and the result for the "
                     "errors", final=i + 1 == len(contestants))
        entry = {"forward": times[(name, False)], "forward_backward": times[(name, True)]}
        if name == "single process" and rank != 0:
            result[name] = entry
            continue
        for t in whole[:3] + local[:3]:
            t.grad = None
        if name in waits:
            with seqpar.comm.track() as fwd_stats:
                out = fn(False)
            with seqpar.comm.track() as bwd_stats:
                out.backward(local[3])
            if delta:
                expected = delta_strategy.analytic_bytes(layout, cfg.batch, cfg.heads, cfg.key_dim, cfg.value_dim,
                                                         method=name, dtype=DTYPES[cfg.dtype])
            else:
                gate = False if g is None else "channel" if g.dim() == 4 else True
                expected = linear_strategy.analytic_bytes(layout, cfg.batch, cfg.heads, cfg.key_dim, cfg.value_dim,
                                                          method=name, decay=gate, dtype=DTYPES[cfg.dtype])
            entry.update(bytes_forward=fwd_stats.bytes_sent(prefix), bytes_backward=bwd_stats.bytes_sent(prefix),
                         analytic_forward=expected["forward"], analytic_backward=expected["backward"],
                         wait_forward=waits[name], grads=[t.grad.detach() for t in local[:3]])
        else:
            out = fn(True)
            entry["grads"] = [t.grad.detach() for t in whole[:3]]
        entry["out"] = out.detach()
        result[name] = entry
    result["chain"] = _chain_on_rank(cfg, layout)
    return result


def _chain_on_rank(cfg: LinearBenchConfig, layout) -> Dict:
    """The last rank's wait for its incoming state with nothing else running."""
    import torch.distributed as dist

    from ..comm import collectives, stats
    from ..comm.scan import StateScan
    from ..strategies.delta import _combine
    from ..strategies.linear import default_scan_pieces

    rank, world = layout.rank, layout.world_size
    out = {}
    steps, step = len(cfg.chain_state_bytes) * 3, 0
    for nbytes in cfg.chain_state_bytes:
        numel = nbytes // 4
        local = torch.randn(numel)
        decay, unit, payload = torch.rand(numel), 1, local
        if cfg.kind == "delta":  # states [Dk, Dv] = [64, 64] per head, each with a [Dk, Dk] transition
            heads = max(1, numel // (64 * 64))
            numel, unit = heads * 64 * 64, heads * 64
            local = torch.randn(numel)
            maps = torch.randn(1, heads, 64, 64) / 8
            decay = _combine(maps, False)
            payload = torch.cat([local, maps.reshape(-1)])
        variants = {"ring": 1, "allscan": default_scan_pieces(world, nbytes)}
        for name, pieces in list(variants.items()) + [("allgather", None)]:
            step += 1
            if rank == 0:
                progress(f"  P={world} the chain alone [{step}/{steps}]: {name}, {nbytes // 1024} KiB states, "
                         f"{cfg.chain_repeats} rounds", final=step == steps)
            waits = []
            for _ in range(cfg.chain_repeats):
                dist.barrier()
                with stats.track() as st:
                    if pieces is None:
                        handle, _ = collectives.all_gather_uneven_async(payload, [payload.numel()] * world,
                                                                        layout.group, "chain.allgather")
                        start = time.perf_counter()
                        handle.wait()
                        st.record_wait("chain.allgather", time.perf_counter() - start)
                    else:
                        scan = StateScan(numel, dtype=torch.float32, device=local.device, group=layout.group,
                                         rank=rank, world=world, peer=layout.peer, reverse=False, pieces=pieces,
                                         op=f"chain.{name}", unit=unit)
                        scan.run(decay, local)
                        scan.finish()
                waits.append(st.wait_seconds("chain"))
            out[(nbytes, name)] = {"wait_s": statistics.median(waits), "pieces": pieces}
    return out


# -- the driver -------------------------------------------------------------------------------


def _assemble(per_rank: List[Dict], name: str, index: Optional[int], n: int) -> torch.Tensor:
    parts = [(r["positions"], r[name]["out"] if index is None else r[name]["grads"][index]) for r in per_rank]
    first = parts[0][1]
    full = first.new_empty((first.shape[0], n) + tuple(first.shape[2:]))
    for positions, part in parts:
        full[:, positions] = part
    return full


def _progress(text: str) -> None:
    from .common import progress_end

    progress_end()
    print(text, file=sys.stderr, flush=True)


_TITLES = {"scalar": "linear attention", "gla": "linear attention, a gate per key channel (GLA)",
           "delta": "the gated delta rule"}


def run(cfg: LinearBenchConfig) -> Dict:
    from ..testing import LocalWorld

    if cfg.kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {cfg.kind!r}")
    cores = os.cpu_count() or 1
    rows, chains = [], []
    for world_size in cfg.world_sizes:
        _progress(f"seqpar bench ({_TITLES[cfg.kind]}): P={world_size}, N={cfg.seq_len}, B={cfg.batch}, "
                  f"H={cfg.heads}, Dk={cfg.key_dim}, Dv={cfg.value_dim}, decay={cfg.effective_decay}, {cfg.dtype}; "
                  f"methods {', '.join(cfg.methods)} against the single-process chunked kernel")
        progress(f"  starting a local world of {world_size} ranks", final=True)
        runner = LocalWorld(world_size, threads_per_rank=max(1, cores // world_size))
        try:
            res = runner.run(bench_linear_on_rank, cfg, timeout=4 * 3600)
        finally:
            runner.close()
        single = res[0]["single process"]
        base = {"forward_s": statistics.median(single["forward"]),
                "forward_backward_s": statistics.median(single["forward_backward"])}
        rows.append({"name": f"single process ({res[0]['single_threads']} threads)", "world_size": world_size,
                     **base})
        for method in cfg.methods:
            per_rank = [r for r in res]
            fwd = [max(ts) for ts in zip(*(r[method]["forward"] for r in per_rank))]
            fb = [max(ts) for ts in zip(*(r[method]["forward_backward"] for r in per_rank))]
            row = {"name": method, "world_size": world_size, "forward_s": statistics.median(fwd),
                   "forward_backward_s": statistics.median(fb),
                   "last_rank_wait_s": statistics.median(per_rank[-1][method]["wait_forward"])}
            for key in ("bytes_forward", "analytic_forward", "bytes_backward", "analytic_backward"):
                row[key] = max(r[method][key] for r in per_rank)
            row["forward_vs_single"] = row["forward_s"] / base["forward_s"]
            row["forward_backward_vs_single"] = row["forward_backward_s"] / base["forward_backward_s"]
            errors = {"out": rel_err(_assemble(per_rank, method, None, cfg.seq_len), single["out"])}
            for i, name in enumerate(("dq", "dk", "dv")):
                errors[name] = rel_err(_assemble(per_rank, method, i, cfg.seq_len), single["grads"][i])
            row["max_rel_err"] = max(errors.values())
            rows.append(row)
        last = res[-1]["chain"]
        for (nbytes, name), entry in sorted(last.items()):
            chains.append({"world_size": world_size, "state_bytes": nbytes, "method": name, **entry})
    report = {"config": dataclasses.asdict(cfg), "rows": rows, "chain": chains,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    return report


def format_tables(report: Dict) -> str:
    cfg = report["config"]
    lines = [
        f"{_TITLES[cfg.get('kind', 'scalar')]}: N={cfg['seq_len']}, B={cfg['batch']}, H={cfg['heads']}, "
        f"Dk={cfg['key_dim']}, Dv={cfg['value_dim']}, "
        f"decay={'channel' if cfg.get('kind') == 'gla' else cfg['decay']}, {cfg['dtype']}, chunk {cfg['chunk_size']}; median of "
        f"{cfg['repeats']} interleaved rounds, slowest rank per round; {report['date']}",
        "",
        "| method | P | fwd (s) | fwd / single | fwd+bwd (s) | fwd+bwd / single | bytes/rank fwd (analytic) | "
        "bytes/rank bwd (analytic) | last rank's wait, fwd (ms) | max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        if row["name"].startswith("single"):
            lines.append(f"| {row['name']} | {row['world_size']} | {row['forward_s']:.3f} | 1.00x | "
                         f"{row['forward_backward_s']:.3f} | 1.00x | - | - | - | - |")
            continue
        lines.append(
            f"| {row['name']} | {row['world_size']} | {row['forward_s']:.3f} | {row['forward_vs_single']:.2f}x | "
            f"{row['forward_backward_s']:.3f} | {row['forward_backward_vs_single']:.2f}x | "
            f"{row['bytes_forward']} ({row['analytic_forward']}) | {row['bytes_backward']} ({row['analytic_backward']}) | "
            f"{1e3 * row['last_rank_wait_s']:.2f} | {row['max_rel_err']:.1e} |")
    combine = ("a [64, 64] matrix per head (A x + b), pieces of whole columns; allgather: state + transition"
               if cfg.get("kind") == "delta" else "elementwise (a x + b)")
    lines += ["", "the chain alone (last rank's wait, ms, median of "
              f"{cfg['chain_repeats']}; barrier before each; combine: {combine}):", "",
              "| state | P | ring | allscan (pieces) | allgather |", "|---|---|---|---|---|"]
    by_key = {}
    for entry in report["chain"]:
        by_key.setdefault((entry["state_bytes"], entry["world_size"]), {})[entry["method"]] = entry
    for (nbytes, world_size), entry in sorted(by_key.items()):
        lines.append(f"| {nbytes // 1024} KiB | {world_size} | {1e3 * entry['ring']['wait_s']:.3f} | "
                     f"{1e3 * entry['allscan']['wait_s']:.3f} ({entry['allscan']['pieces']}) | "
                     f"{1e3 * entry['allgather']['wait_s']:.3f} |")
    return "\n".join(lines)
