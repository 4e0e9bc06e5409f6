"""`python -m seqpar bench`: every strategy against dense attention on the same hardware.

On a CPU machine it spawns a local gloo world of `--world-size` ranks, each with
`cores / P` threads, and times single-process dense attention (PyTorch SDPA over the
whole sequence) with all the cores: the ratio is the cost of splitting the sequence.
Under `torchrun` it uses the launched group (NCCL on GPUs) and times dense on rank 0's
device. Each row: median wall time over repeats (the slowest rank per repeat), its ratio
to dense, bytes sent per rank against the strategy's analytic volume, and the max error
relative to dense attention in the same dtype.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class BenchConfig:
    world_size: int = 2
    seq_len: int = 16384
    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    causal: bool = True
    scheme: str = "zigzag"
    backend: str = "auto"
    repeats: int = 3
    warmup: int = 1
    seed: int = 0


# -- work done on each rank -------------------------------------------------------------


def _device() -> torch.device:
    if torch.cuda.is_available() and torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _global_inputs(cfg: BenchConfig, device):
    gen = torch.Generator().manual_seed(cfg.seed)
    dtype = DTYPES[cfg.dtype]
    shape_q = (cfg.batch, cfg.seq_len, cfg.heads, cfg.head_dim)
    shape_kv = (cfg.batch, cfg.seq_len, cfg.kv_heads, cfg.head_dim)
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in (shape_q, shape_kv, shape_kv, shape_q)]


def _timed(fn, repeats: int, warmup: int, device, barrier) -> List[float]:
    times = []
    for i in range(warmup + repeats):
        barrier()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    return times


def _dense_fns(cfg: BenchConfig, tensors):
    import torch.nn.functional as F

    q, k, v, do = tensors

    def forward():
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=cfg.causal,
            enable_gqa=cfg.heads != cfg.kv_heads,
        ).transpose(1, 2)

    return forward, q, k, v, do


def _strategy_fns(cfg: BenchConfig, strategy: str, layout, tensors):
    import seqpar

    q, k, v, do = (layout.shard(t).contiguous() for t in tensors)

    def forward():
        return seqpar.attention(q, k, v, layout=layout, causal=cfg.causal, strategy=strategy, backend=cfg.backend)

    return forward, q, k, v, do


def bench_on_rank(cfg: BenchConfig, strategies: List[str], peers: bool) -> Dict:
    """Every contestant, interleaved round by round so that drift in the machine's speed
    hits all of them alike. Dense runs on rank 0 alone with every core of the ranks
    (the others wait at a barrier); strategies run on all ranks with their share."""
    import torch.distributed as dist

    import seqpar
    from seqpar.attention import analytic_bytes

    device = _device()
    rank = dist.get_rank()
    rank_threads = torch.get_num_threads()
    # dense gets the ranks' threads together, never more than the machine's cores
    dense_threads = min(rank_threads * dist.get_world_size(), os.cpu_count() or 1) if device.type == "cpu" else rank_threads
    tensors = [t.requires_grad_(i < 3) for i, t in enumerate(_global_inputs(cfg, device))]
    layout = seqpar.SeqLayout(cfg.seq_len, scheme=cfg.scheme)
    contestants = {"dense": _dense_fns(cfg, [t.detach().requires_grad_(i < 3) for i, t in enumerate(tensors)])}
    for name in strategies:
        contestants[name] = _strategy_fns(cfg, name, layout, [t.detach() for t in tensors])
        for t in contestants[name][1:4]:
            t.requires_grad_()
    skipped = {}
    if peers:
        contestants.update(_peer_contestants(cfg, tensors, skipped))
    def run_one(name: str, backward: bool) -> float:
        forward, q, k, v, do = contestants[name][:5]
        active = name != "dense" or rank == 0
        if name == "dense" and active:
            torch.set_num_threads(dense_threads)
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        if active:
            if backward:
                q.grad = k.grad = v.grad = None
                forward().backward(do)
            else:
                with torch.no_grad():
                    forward()
        _sync(device)
        elapsed = time.perf_counter() - start
        torch.set_num_threads(rank_threads)
        return elapsed if active else 0.0

    modes = {name: ((False, True) if contestants[name][1] is not None else (False,)) for name in contestants}
    times = {(name, bwd): [] for name in contestants for bwd in modes[name]}
    rounds = cfg.warmup + cfg.repeats
    for round_ in range(rounds):
        for name in contestants:
            for bwd in modes[name]:
                elapsed = run_one(name, bwd)
                if round_ >= cfg.warmup:
                    times[(name, bwd)].append(elapsed)
                label = "warm-up" if round_ < cfg.warmup else f"round {round_ - cfg.warmup + 1}/{cfg.repeats}"
                if rank == 0:
                    _progress(f"  [{label}] {name} {'fwd+bwd' if bwd else 'fwd'}: {elapsed:.3f} s (rank 0)")

    results = {"rank": rank, "threads": rank_threads, "dense_threads": dense_threads, "peer_skipped": skipped}
    for name, (forward, q, k, v, do, *peer_layout) in contestants.items():
        entry = {"forward": times[(name, False)], "forward_backward": times.get((name, True))}
        if name == "dense" and rank != 0:
            results[name] = entry
            continue
        if name in strategies:
            with seqpar.comm.track() as fwd_stats:
                out = forward()
            with seqpar.comm.track() as bwd_stats:
                q.grad = k.grad = v.grad = None
                out.backward(do)
            expected = analytic_bytes(name, layout, cfg.batch, cfg.heads, cfg.kv_heads, cfg.head_dim, q.element_size())
            entry.update(
                bytes_forward=fwd_stats.bytes_sent(name), bytes_backward=bwd_stats.bytes_sent(name),
                analytic_forward=expected["forward"], analytic_backward=expected["backward"],
                ops_forward=fwd_stats.as_dict(), ops_backward=bwd_stats.as_dict(),
                positions=layout.positions(),
            )
        elif name == "dense":
            out = forward()
            q.grad = k.grad = v.grad = None
            out.backward(do)
        else:
            if q is not None:
                out = forward()
                q.grad = k.grad = v.grad = None
                out.backward(do)
            else:
                with torch.no_grad():
                    out = forward()
            entry["positions"] = peer_layout[0].positions()
        entry["out"] = out.detach().cpu()
        if q is not None:
            entry.update(dq=q.grad.cpu(), dk=k.grad.cpu(), dv=v.grad.cpu())
        results[name] = entry
    return results


def _load_bench_module(filename: str):
    """A peer adapter from bench/ of a clone (peers are never imported by the package)."""
    path = Path.cwd() / "bench" / filename
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peer_contestants(cfg: BenchConfig, tensors, skipped: Dict[str, str]) -> Dict:
    """Peers that can run this problem: name -> (forward, q, k, v, do or None, layout)."""
    import seqpar

    found = {}
    equal = cfg.seq_len % (2 * torch.distributed.get_world_size()) == 0
    contiguous = seqpar.SeqLayout(cfg.seq_len, scheme="contiguous")

    def shards(layout, grad):
        q, k, v, do = (layout.shard(t.detach()).contiguous() for t in tensors)
        if grad:
            q, k, v = (t.requires_grad_() for t in (q, k, v))
        return q, k, v, do

    torch_ring = _load_bench_module("torch_ring_peer.py")
    reason = "bench/torch_ring_peer.py not found (run from a clone)" if torch_ring is None else torch_ring.available()
    if reason is None and not equal:
        reason = "needs seq_len divisible by 2P"
    if reason is None and cfg.heads != cfg.kv_heads:
        reason = "no GQA"
    if reason is None:
        balanced = cfg.scheme == "zigzag"
        layout = seqpar.SeqLayout(cfg.seq_len, scheme="zigzag" if balanced else "contiguous")
        q, k, v, _ = shards(layout, False)
        found["torch templated ring (peer)"] = (
            lambda q=q, k=k, v=v: torch_ring.torch_ring_forward(q, k, v, causal=cfg.causal, load_balance=balanced),
            None, None, None, None, layout,
        )
    else:
        skipped["torch templated ring"] = reason

    ulysses = _load_bench_module("ulysses_peers.py")
    for name, avail, grad in (("deepspeed ulysses (peer)", "available_deepspeed", True),
                              ("yunchang ulysses (peer)", "available_yunchang", False)):
        reason = "bench/ulysses_peers.py not found (run from a clone)" if ulysses is None else getattr(ulysses, avail)()
        if reason is None and not equal:
            reason = "needs seq_len divisible by P (uneven lengths abort over gloo)"
        if reason is None:
            q, k, v, do = shards(contiguous, grad)
            if grad:
                fn = lambda q=q, k=k, v=v: ulysses.deepspeed_ulysses(q, k, v, causal=cfg.causal)
                found[name] = (fn, q, k, v, do, contiguous)
            else:
                fn = lambda q=q, k=k, v=v: ulysses.yunchang_ulysses(q, k, v, causal=cfg.causal, local="sdpa")
                found[name] = (fn, None, None, None, None, contiguous)
        else:
            skipped[name.replace(" (peer)", "")] = reason
    return found


# -- the driver -----------------------------------------------------------------------


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _assemble(results: List[Dict], name: str, seq_dim_size: int) -> torch.Tensor:
    first = results[0][name]
    full = first.new_empty((first.shape[0], seq_dim_size) + tuple(first.shape[2:]))
    for res in results:
        full[:, res["positions"]] = res[name]
    return full


def _slowest_per_repeat(results: List[Dict], key: str) -> List[float]:
    return [max(times) for times in zip(*(r[key] for r in results))]


def _format_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def machine_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def _is_main() -> bool:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _progress(text: str) -> None:
    if _is_main():
        print(text, file=sys.stderr, flush=True)


def run(cfg: BenchConfig, strategies: Optional[List[str]] = None, peers: bool = True, json_path: Optional[str] = None) -> Dict:
    from .attention import registered_strategies
    from .testing import LocalWorld

    names = list(strategies or registered_strategies())
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cores = os.cpu_count() or 1
    if _is_main():
        print(f"seqpar bench: P={cfg.world_size}, N={cfg.seq_len}, H={cfg.heads}, H_kv={cfg.kv_heads}, "
              f"D={cfg.head_dim}, {cfg.dtype}, causal={cfg.causal}, scheme={cfg.scheme}; contestants: dense, "
              f"{', '.join(names)}{' and the peers found in bench/' if peers else ''}; "
              f"{cfg.warmup} warm-up + {cfg.repeats} timed rounds, interleaved", file=sys.stderr, flush=True)
    if launched:
        runner = _TorchrunRunner(cfg)
    else:
        runner = LocalWorld(cfg.world_size, threads_per_rank=max(1, cores // cfg.world_size))
    try:
        res = runner.run(bench_on_rank, cfg, names, peers, timeout=4 * 3600)
    finally:
        runner.close()
    dense = res[0]["dense"]
    rows = [{"name": f"dense ({res[0]['dense_threads']} threads, 1 process)", "threads": res[0]["dense_threads"],
             "forward_times_s": dense["forward"], "forward_backward_times_s": dense["forward_backward"]}]
    for name in [n for n in res[0] if n not in ("dense", "rank", "threads", "dense_threads", "peer_skipped")]:
        per_rank = [r[name] for r in res]
        row = {"name": name, "threads": res[0]["threads"],
               "forward_times_s": _slowest_per_repeat(per_rank, "forward")}
        if per_rank[0]["forward_backward"]:
            row["forward_backward_times_s"] = _slowest_per_repeat(per_rank, "forward_backward")
        if "bytes_forward" in per_rank[0]:
            for key in ("bytes_forward", "analytic_forward", "bytes_backward", "analytic_backward"):
                row[key] = max(r[key] for r in per_rank)
            for phase in ("forward", "backward"):
                # per direction where a strategy names them (TokenRing: outgoing / returning)
                for direction in ("outgoing", "returning"):
                    sent = [sum(v["bytes_sent"] for op, v in r[f"ops_{phase}"].items() if op.endswith(direction))
                            for r in per_rank]
                    if any(sent):
                        row[f"bytes_{phase}_{direction}"] = max(sent)
            row["ops_rank0"] = {"forward": per_rank[0]["ops_forward"], "backward": per_rank[0]["ops_backward"]}
        grads = ("out", "dq", "dk", "dv") if "dq" in per_rank[0] else ("out",)
        row["errors"] = {g: _rel_err(_assemble(per_rank, g, cfg.seq_len), dense[g]) for g in grads}
        row["max_rel_err"] = max(row["errors"].values())
        rows.append(row)
    for name, reason in res[0]["peer_skipped"].items():
        rows.append({"name": name, "skipped": reason})
    for row in rows:
        for key in ("forward", "forward_backward"):
            if row.get(f"{key}_times_s"):
                times = row[f"{key}_times_s"]
                row[f"{key}_s"] = statistics.median(times)
                row[f"{key}_spread"] = (max(times) - min(times)) / statistics.median(times)
    dense_fwd, dense_fb = rows[0]["forward_s"], rows[0]["forward_backward_s"]
    for row in rows:
        if "forward_s" in row:
            row["forward_vs_dense"] = row["forward_s"] / dense_fwd
        if "forward_backward_s" in row:
            row["forward_backward_vs_dense"] = row["forward_backward_s"] / dense_fb
    report = {
        "config": dataclasses.asdict(cfg), "machine": machine_description(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "launched_with_torchrun": launched, "rows": rows,
    }
    if not _is_main():
        return report
    print(format_table(report))
    write_json(report, json_path)
    return report


def write_json(report: Dict, path: Optional[str]) -> None:
    """Write a bench report as JSON (nothing when `path` is empty), and say where."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))
    print(f"results written to {path}", file=sys.stderr)


def format_table(report: Dict) -> str:
    cfg = report["config"]
    lines = [
        f"seqpar bench on {report['machine']} (torch {report['torch']}): P={cfg['world_size']}, N={cfg['seq_len']}, "
        f"B={cfg['batch']}, H={cfg['heads']}, H_kv={cfg['kv_heads']}, D={cfg['head_dim']}, {cfg['dtype']}, "
        f"causal={cfg['causal']}, scheme={cfg['scheme']}, backend={cfg['backend']}",
        "",
        "| strategy | fwd (s) | fwd / dense | fwd+bwd (s) | fwd+bwd / dense | bytes/rank fwd (analytic) | bytes/rank bwd (analytic) | max rel err vs dense |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def num(row, key, fmt):
        return format(row[key], fmt) if key in row else "-"

    lines.insert(1, f"median of {cfg['repeats']} interleaved rounds, slowest rank per round; {report['date']}")
    for row in report["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['name']} | skipped: {row['skipped']} | | | | | | |")
            continue
        fwd_bytes = f"{_format_bytes(row.get('bytes_forward'))} ({_format_bytes(row.get('analytic_forward'))})"
        bwd_bytes = f"{_format_bytes(row.get('bytes_backward'))} ({_format_bytes(row.get('analytic_backward'))})"
        if "bytes_forward_outgoing" in row:
            fwd_bytes += (f": {_format_bytes(row['bytes_forward_outgoing'])} → / "
                          f"{_format_bytes(row.get('bytes_forward_returning', 0))} ←")
            bwd_bytes += (f": {_format_bytes(row['bytes_backward_outgoing'])} → / "
                          f"{_format_bytes(row.get('bytes_backward_returning', 0))} ←")
        lines.append(
            f"| {row['name']} | {num(row, 'forward_s', '.3f')} | {num(row, 'forward_vs_dense', '.2f')}x | "
            f"{num(row, 'forward_backward_s', '.3f')} | {num(row, 'forward_backward_vs_dense', '.2f')}x | "
            f"{fwd_bytes if 'bytes_forward' in row else '-'} | {bwd_bytes if 'bytes_backward' in row else '-'} | "
            f"{num(row, 'max_rel_err', '.1e')} |"
        )
    return "\n".join(lines)


class _TorchrunRunner:
    """The same calls as LocalWorld, on the group torchrun launched (every rank runs them)."""

    def __init__(self, cfg: BenchConfig):
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if dist.get_world_size() != cfg.world_size:
            cfg.world_size = dist.get_world_size()

    def run(self, fn, *args, timeout=None):
        from .comm.collectives import all_gather_object

        return all_gather_object(fn(*args), None, op="bench.results")

    def close(self):
        """Nothing to release: torchrun owns the processes and the group."""


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--grid" in argv:  # the cost model against measurement: its own options
        from .benchmark_grid import main as grid_main

        return grid_main([a for a in argv if a != "--grid"])
    parser = argparse.ArgumentParser(prog="python -m seqpar bench", description=__doc__.splitlines()[0])
    for field in dataclasses.fields(BenchConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=field.default)
        else:
            kind = int if isinstance(field.default, int) else str
            parser.add_argument(flag, type=kind, default=field.default)
    parser.add_argument("--strategies", nargs="*", default=None, help="default: every registered strategy")
    parser.add_argument("--no-peers", action="store_true", help="skip the PyTorch templated-ring row")
    parser.add_argument("--json", default="bench/out/latest.json", help="where to write the results (JSON)")
    parser.add_argument("--quick", action="store_true", help="small problems (N=2048 exact, 4096 linear) for a smoke run")
    parser.add_argument("--grid", action="store_true",
                        help="instead: every feasible strategy on a grid of (P, N, H, H_kv), predicted against "
                             "measured, and how often strategy='auto' picks the fastest (see --grid --help)")
    parser.add_argument("--linear", choices=("on", "off", "only"), default="on",
                        help="the linear-attention rows (methods by P, on local worlds): on (after the exact "
                             "strategies), off, or only")
    parser.add_argument("--linear-world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--linear-seq-len", type=int, default=65536)
    parser.add_argument("--linear-json", default="bench/out/linear.json")
    args = parser.parse_args(argv)
    cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})
    if args.quick:
        cfg.seq_len = 2048
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.linear != "only":
        run(cfg, args.strategies, peers=not args.no_peers, json_path=args.json)
    if args.linear != "off" and not launched:  # the linear rows spawn their own local worlds
        from . import benchmark_linear

        lin = benchmark_linear.LinearBenchConfig(
            world_sizes=tuple(args.linear_world_sizes), seq_len=4096 if args.quick else args.linear_seq_len,
            dtype=cfg.dtype if cfg.dtype != "float64" else "float32", repeats=cfg.repeats, warmup=cfg.warmup,
        )
        report = benchmark_linear.run(lin)
        report["machine"], report["torch"] = machine_description(), torch.__version__
        print()
        print(benchmark_linear.format_tables(report))
        write_json(report, args.linear_json)
    return 0
