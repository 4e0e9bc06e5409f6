"""Peak memory per rank: `python -m seqpar bench --memory`.

Each rank of a local gloo world (P = 2 and 4) runs one forward + backward of each strategy
with its default options; its peak resident memory during that call, minus its resident
memory just before the inputs were made (inputs, gradients and dO included), is compared
with dense attention in one process on the whole problem (PyTorch SDPA, measured the same
way) and with the planner's analytic peak (`Strategy.peak_memory`: the buffers the strategy
holds, what `Topology.memory_limit` decides with).

The peak is the kernel's high-water mark of the resident set (`VmHWM`), reset before each
measurement (`/proc/self/clear_refs`); a warm-up call first keeps one-time allocations
(plans, caches) out. The ranks run in fresh processes whose glibc serves every block of
64 KiB or more by mmap (`MALLOC_MMAP_THRESHOLD_`), so a freed tensor leaves the resident
set at once and the next call's tensors count again. Linux only; the numbers are host
memory (CPU tensors).
"""
from __future__ import annotations

import argparse
import gc
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .common import default_out_dir, machine_description, progress, progress_end, write_json

MIB = 2 ** 20


@dataclass
class MemoryBenchConfig:
    world_sizes: Tuple[int, ...] = (2, 4)
    seq_len: int = 16384
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    scheme: str = "zigzag"
    # a row is a strategy with its default options, or "name:option=int" (one option set)
    strategies: Tuple[str, ...] = ("ring", "ulysses", "usp", "allgather", "allgather:kv_head_chunk=1", "token_ring")


def parse_row(spec: str) -> Tuple[str, Dict[str, int]]:
    """`"allgather:kv_head_chunk=1"` -> `("allgather", {"kv_head_chunk": 1})`; `"ring"` -> `("ring", {})`."""
    name, _, option = spec.partition(":")
    if not option:
        return name, {}
    key, sep, value = option.partition("=")
    if not sep or not value.lstrip("-").isdigit():
        raise ValueError(f"--strategies: expected NAME or NAME:OPTION=INT, got {spec!r}")
    return name, {key: int(value)}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def available() -> Optional[str]:
    """Why this machine cannot measure peaks this way, or None."""
    try:
        _status_kib("VmHWM")
        _reset_peak()
    except (OSError, RuntimeError) as exc:
        return f"needs Linux's /proc/self/status VmHWM and clear_refs ({exc})"
    return None


def _measure(call) -> int:
    """Bytes of peak resident memory above the resident set before `call()`."""
    gc.collect()
    before = _status_kib("VmRSS")
    _reset_peak()
    call()
    return (_status_kib("VmHWM") - before) * 1024


def _on_rank(cfg: MemoryBenchConfig, strategy: Optional[str]) -> Dict:
    """`strategy` (a row spec, `parse_row`) on this rank's tokens, or (None) dense SDPA on the
    whole problem on rank 0."""
    import torch.distributed as dist
    import torch.nn.functional as F

    import seqpar
    from ..layout import SeqLayout

    dtype = getattr(torch, cfg.dtype)
    layout = SeqLayout(cfg.seq_len, scheme=cfg.scheme)
    rank = dist.get_rank()
    n = cfg.seq_len if strategy is None else layout.local_len
    shapes = [(1, n, cfg.heads, cfg.head_dim), (1, n, cfg.kv_heads, cfg.head_dim),
              (1, n, cfg.kv_heads, cfg.head_dim), (1, n, cfg.heads, cfg.head_dim)]

    def run():
        gen = torch.Generator().manual_seed(rank)
        q, k, v, do = (torch.randn(s, generator=gen, dtype=dtype) for s in shapes)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        if strategy is None:
            if rank == 0:
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=True, enable_gqa=cfg.heads != cfg.kv_heads)
                out.backward(do.transpose(1, 2))
        else:
            name, options = parse_row(strategy)
            seqpar.attention(q, k, v, layout=layout, causal=True, strategy=name, **options).backward(do)
        dist.barrier()

    run()  # warm-up: plans, caches, the first-use checks
    peak = _measure(run)
    return {"rank": rank, "peak": peak}


def analytic_peak(cfg: MemoryBenchConfig, strategy: str, world: int) -> Tuple[int, Dict]:
    """(the planner's peak bytes for the row `strategy` (`parse_row`), with the options a call
    resolves by default, the options)."""
    from .. import registry
    from ..planner.schedule import Problem

    prob = Problem(cfg.seq_len, world, cfg.heads, cfg.kv_heads, cfg.head_dim, getattr(torch, cfg.dtype), True, True, 1,
                   cfg.scheme)
    strategy, given = parse_row(strategy)
    entry = registry.get(strategy)
    # the default options, resolved as a call resolves them (USP: ulysses_size from the world)
    from ..strategies.token_ring import DEFAULT_ROUTE

    defaults = {"usp": {"ulysses_size": _default_ulysses(world, cfg)}, "token_ring": {"route": DEFAULT_ROUTE},
                "allgather": {"kv_head_chunk": None}}
    options = {**defaults.get(strategy, {}), **given}
    return entry.peak_memory(prob, options), options


def _default_ulysses(world: int, cfg: MemoryBenchConfig) -> int:
    from ..strategies.usp import default_ulysses_size

    return default_ulysses_size(world, cfg.heads, cfg.kv_heads)


def run(cfg: MemoryBenchConfig) -> Dict:
    import os

    from ..testing import LocalWorld

    reason = available()
    if reason:
        raise RuntimeError(f"bench --memory: {reason}")

    report: Dict = {"config": asdict(cfg), "rows": []}
    total = len(cfg.world_sizes) * (1 + len(cfg.strategies))
    done = 0
    for p in cfg.world_sizes:
        # for the ranks spawned here only: big blocks by mmap, returned to the system when freed
        saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
        try:
            w = LocalWorld(p)
        finally:
            if saved is None:
                del os.environ["MALLOC_MMAP_THRESHOLD_"]
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
        progress(f"[{done + 1}/{total}] P={p}: dense SDPA, one process")
        dense = w.run(_on_rank, cfg, None, timeout=3600)[0]["peak"]
        done += 1
        report["rows"].append({"world_size": p, "strategy": "dense (one process)", "peak": dense})
        for strategy in cfg.strategies:
            progress(f"[{done + 1}/{total}] P={p}: {strategy}")
            results = w.run(_on_rank, cfg, strategy, timeout=3600)
            done += 1
            peak = max(r["peak"] for r in results)
            analytic, options = analytic_peak(cfg, strategy, p)
            report["rows"].append({"world_size": p, "strategy": strategy, "options": options, "peak": peak,
                                   "per_rank": [r["peak"] for r in results], "vs_dense": peak / dense,
                                   "analytic": analytic, "vs_analytic": peak / analytic})
        w.close()
    progress_end()
    return report


def format_table(report: Dict) -> str:
    cfg = report["config"]
    lines = [f"Peak memory per rank of one forward + backward (busiest rank), N={cfg['seq_len']}, "
             f"H={cfg['heads']}/{cfg['kv_heads']}, D={cfg['head_dim']}, {cfg['dtype']}, causal {cfg['scheme']}", "",
             "| P | strategy | peak MiB | vs dense | analytic MiB | measured / analytic |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "analytic" not in r:
            lines.append(f"| {r['world_size']} | {r['strategy']} | {r['peak'] / MIB:.0f} | 1.00x | - | - |")
            continue
        lines.append(f"| {r['world_size']} | {r['strategy']} | {r['peak'] / MIB:.0f} | {r['vs_dense']:.2f}x | "
                     f"{r['analytic'] / MIB:.0f} | {r['vs_analytic']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqpar bench --memory", description=__doc__.split("\n\n")[0])
    defaults = MemoryBenchConfig()
    parser.add_argument("--world-sizes", type=int, nargs="+", default=list(defaults.world_sizes))
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--kv-heads", type=int, default=defaults.kv_heads)
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=defaults.dtype)
    parser.add_argument("--strategies", nargs="+", default=list(defaults.strategies))
    parser.add_argument("--quick", action="store_true", help="N=2048, P=2 only: a smoke run")
    parser.add_argument("--out-dir", default=str(default_out_dir()))
    parser.add_argument("--json", default=None, help="results file (default: OUT_DIR/memory.json; '' writes nothing)")
    args = parser.parse_args(argv)
    cfg = MemoryBenchConfig(world_sizes=tuple(args.world_sizes), seq_len=args.seq_len, heads=args.heads,
                            kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype,
                            strategies=tuple(args.strategies))
    if args.quick:
        cfg.world_sizes, cfg.seq_len = (2,), 2048
    started = time.perf_counter()
    report = run(cfg)
    report["machine"], report["torch"] = machine_description(), torch.__version__
    print(format_table(report), flush=True)
    from pathlib import Path

    json_path = str(Path(args.out_dir) / "memory.json") if args.json is None else args.json
    if json_path:
        write_json(report, json_path, kind="memory")
    print(f"seqpar bench --memory: done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0
