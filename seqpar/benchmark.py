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


def dense_on_one_process(cfg: BenchConfig) -> Dict:
    """Dense SDPA over the whole sequence: times, and the outputs the strategies must match."""
    import torch.nn.functional as F

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    q, k, v, do = _global_inputs(cfg, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def forward():
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=cfg.causal,
            enable_gqa=cfg.heads != cfg.kv_heads,
        ).transpose(1, 2)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        forward().backward(do)

    with torch.no_grad():
        fwd = _timed(forward, cfg.repeats, cfg.warmup, device, lambda: None)
    fwd_bwd = _timed(forward_backward, cfg.repeats, cfg.warmup, device, lambda: None)
    out = forward().detach()
    return {
        "forward": fwd, "forward_backward": fwd_bwd, "threads": torch.get_num_threads(),
        "out": out.cpu(), "dq": q.grad.cpu(), "dk": k.grad.cpu(), "dv": v.grad.cpu(),
    }


def strategy_on_rank(cfg: BenchConfig, strategy: str) -> Dict:
    """Run one strategy collectively; returns this rank's times, bytes and local results."""
    import torch.distributed as dist

    import seqpar
    from seqpar.attention import analytic_bytes

    device = _device()
    layout = seqpar.SeqLayout(cfg.seq_len, scheme=cfg.scheme)
    q, k, v, do = (layout.shard(t).contiguous() for t in _global_inputs(cfg, device))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def forward():
        return seqpar.attention(q, k, v, layout=layout, causal=cfg.causal, strategy=strategy, backend=cfg.backend)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        forward().backward(do)

    with torch.no_grad():
        fwd = _timed(forward, cfg.repeats, cfg.warmup, device, dist.barrier)
    fwd_bwd = _timed(forward_backward, cfg.repeats, cfg.warmup, device, dist.barrier)
    with seqpar.comm.track() as fwd_stats:
        out = forward()
    with seqpar.comm.track() as bwd_stats:
        q.grad = k.grad = v.grad = None
        out.backward(do)
    expected = analytic_bytes(strategy, layout, cfg.batch, cfg.heads, cfg.kv_heads, cfg.head_dim, q.element_size())
    return {
        "forward": fwd, "forward_backward": fwd_bwd, "threads": torch.get_num_threads(),
        "bytes_forward": fwd_stats.bytes_sent(strategy), "bytes_backward": bwd_stats.bytes_sent(strategy),
        "analytic_forward": expected["forward"], "analytic_backward": expected["backward"],
        "positions": layout.positions(), "out": out.detach().cpu(),
        "dq": q.grad.cpu(), "dk": k.grad.cpu(), "dv": v.grad.cpu(),
    }


def _load_torch_ring_peer():
    """PyTorch's own templated ring (bench/torch_ring_peer.py in a clone), or None."""
    path = Path.cwd() / "bench" / "torch_ring_peer.py"
    if not path.exists():
        return None, "bench/torch_ring_peer.py not found (run from a clone of seqpar)"
    spec = importlib.util.spec_from_file_location("torch_ring_peer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reason = module.available()
    return (module, None) if reason is None else (None, reason)


def torch_ring_on_rank(cfg: BenchConfig) -> Dict:
    """Forward of PyTorch's templated ring with the CPU flash op (zigzag = its load balance)."""
    import torch.distributed as dist

    import seqpar

    peer, reason = _load_torch_ring_peer()
    if peer is None:
        return {"skipped": reason}
    device = _device()
    balanced = cfg.scheme == "zigzag"
    layout = seqpar.SeqLayout(cfg.seq_len, scheme="zigzag" if balanced else "contiguous")
    q, k, v, _ = (layout.shard(t).contiguous() for t in _global_inputs(cfg, device))

    def forward():
        return peer.torch_ring_forward(q, k, v, causal=cfg.causal, load_balance=balanced)

    with torch.no_grad():
        fwd = _timed(forward, cfg.repeats, cfg.warmup, device, dist.barrier)
        out = forward()
    return {"forward": fwd, "positions": layout.positions(), "out": out.cpu()}


# -- the driver -----------------------------------------------------------------------


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _assemble(results: List[Dict], name: str, seq_dim_size: int) -> torch.Tensor:
    first = results[0][name]
    full = first.new_empty((first.shape[0], seq_dim_size) + tuple(first.shape[2:]))
    for res in results:
        full[:, res["positions"]] = res[name]
    return full


def _median_of_slowest(results: List[Dict], key: str) -> float:
    per_repeat = [max(times) for times in zip(*(r[key] for r in results))]
    return statistics.median(per_repeat)


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
    return os.environ.get("RANK", "0") == "0"


def _progress(step: int, total: int, text: str) -> None:
    if _is_main():
        print(f"[{step}/{total}] {text}", file=sys.stderr, flush=True)


def run(cfg: BenchConfig, strategies: Optional[List[str]] = None, peers: bool = True, json_path: Optional[str] = None) -> Dict:
    from .attention import registered_strategies
    from .testing import LocalWorld

    names = list(strategies or registered_strategies())
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    total = 1 + len(names) + int(peers)
    cores = os.cpu_count() or 1
    step = 1
    _progress(step, total, f"dense SDPA, one process, {cores if not launched else 'its'} threads "
                           f"(N={cfg.seq_len}, H={cfg.heads}, D={cfg.head_dim}, {cfg.dtype}, causal={cfg.causal})")
    if launched:
        runner = _TorchrunRunner(cfg)
        dense = runner.dense()
    else:
        dense_world = LocalWorld(1, threads_per_rank=cores)
        try:
            dense = dense_world.run(dense_on_one_process, cfg, timeout=3600)[0]
        finally:
            dense_world.close()
        runner = LocalWorld(cfg.world_size, threads_per_rank=max(1, cores // cfg.world_size))
    rows = [{
        "name": "dense (1 process)", "forward_s": statistics.median(dense["forward"]),
        "forward_backward_s": statistics.median(dense["forward_backward"]), "threads": dense["threads"],
    }]
    try:
        for name in names:
            step += 1
            _progress(step, total, f"{name}: {cfg.world_size} ranks, scheme {cfg.scheme}")
            res = runner.run(strategy_on_rank, cfg, name, timeout=3600)
            errors = {g: _rel_err(_assemble(res, g, cfg.seq_len), dense[g]) for g in ("out", "dq", "dk", "dv")}
            rows.append({
                "name": name, "forward_s": _median_of_slowest(res, "forward"),
                "forward_backward_s": _median_of_slowest(res, "forward_backward"), "threads": res[0]["threads"],
                "bytes_forward": max(r["bytes_forward"] for r in res), "analytic_forward": max(r["analytic_forward"] for r in res),
                "bytes_backward": max(r["bytes_backward"] for r in res), "analytic_backward": max(r["analytic_backward"] for r in res),
                "max_rel_err": max(errors.values()), "errors": errors,
            })
        if peers:
            step += 1
            _progress(step, total, "peer: PyTorch templated ring (forward only)")
            res = runner.run(torch_ring_on_rank, cfg, timeout=3600)
            if "skipped" in res[0]:
                rows.append({"name": "torch templated ring", "skipped": res[0]["skipped"]})
            else:
                rows.append({
                    "name": "torch templated ring (peer)", "forward_s": _median_of_slowest(res, "forward"),
                    "threads": max(1, cores // cfg.world_size),
                    "max_rel_err": _rel_err(_assemble(res, "out", cfg.seq_len), dense["out"]),
                })
    finally:
        runner.close()
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
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
        print(f"results written to {json_path}", file=sys.stderr)
    return report


def format_table(report: Dict) -> str:
    cfg = report["config"]
    lines = [
        f"seqpar bench on {report['machine']} (torch {report['torch']}): P={cfg['world_size']}, N={cfg['seq_len']}, "
        f"B={cfg['batch']}, H={cfg['heads']}, H_kv={cfg['kv_heads']}, D={cfg['head_dim']}, {cfg['dtype']}, "
        f"causal={cfg['causal']}, scheme={cfg['scheme']}, backend={cfg['backend']}",
        "",
        "| strategy | fwd (s) | fwd / dense | fwd+bwd (s) | fwd+bwd / dense | bytes/rank fwd (analytic) | bytes/rank bwd (analytic) | max rel err |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def num(row, key, fmt):
        return format(row[key], fmt) if key in row else "-"

    for row in report["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['name']} | skipped: {row['skipped']} | | | | | | |")
            continue
        fwd_bytes = f"{_format_bytes(row.get('bytes_forward'))} ({_format_bytes(row.get('analytic_forward'))})"
        bwd_bytes = f"{_format_bytes(row.get('bytes_backward'))} ({_format_bytes(row.get('analytic_backward'))})"
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

        self.cfg = cfg
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if dist.get_world_size() != cfg.world_size:
            cfg.world_size = dist.get_world_size()

    def dense(self) -> Dict:
        import torch.distributed as dist

        result = [dense_on_one_process(self.cfg)] if dist.get_rank() == 0 else [None]
        dist.broadcast_object_list(result, src=0)
        return result[0]

    def run(self, fn, *args, timeout=None):
        import torch.distributed as dist

        mine = fn(*args)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        return gathered

    def close(self):
        pass


def main(argv: Optional[List[str]] = None) -> int:
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
    parser.add_argument("--quick", action="store_true", help="a small problem (N=2048) for a smoke run")
    args = parser.parse_args(argv)
    cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})
    if args.quick:
        cfg.seq_len = 2048
    run(cfg, args.strategies, peers=not args.no_peers, json_path=args.json)
    return 0
