"""`python -m seqpar bench`: every strategy against dense attention on the same hardware.

On a CPU machine it spawns a local gloo world of `--world-size` ranks, each with
`cores / P` threads, and times single-process dense attention (PyTorch SDPA over the
whole sequence) with all the cores: the ratio is the cost of splitting the sequence. A
second single-process row runs seqpar's own block kernel on the whole sequence; a
strategy's ratio to it is the split's cost alone, apart from what seqpar's kernels gain
on PyTorch's (on CPUs, causal blocks cut into a tree, `pieces.causal_tree`).
Under `torchrun` it uses the launched group (NCCL on GPUs) and times dense on rank 0's
device. Each row: median wall time over repeats (the slowest rank per repeat), its ratio
to dense, bytes sent per rank against the strategy's analytic volume, and the max error
relative to dense attention in the same dtype.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .common import (HelpFormatter, assemble, default_out_dir, is_main, machine_description, progress, progress_end,
                     rel_err, repo_root, settle, slowest_per_repeat, timed_call, write_json)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class BenchConfig:
    world_size: int = 2
    seq_len: int = 8192
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


def _global_inputs(cfg: BenchConfig, device):
    gen = torch.Generator().manual_seed(cfg.seed)
    dtype = DTYPES[cfg.dtype]
    shape_q = (cfg.batch, cfg.seq_len, cfg.heads, cfg.head_dim)
    shape_kv = (cfg.batch, cfg.seq_len, cfg.kv_heads, cfg.head_dim)
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in (shape_q, shape_kv, shape_kv, shape_q)]


def _timed(fn, repeats: int, warmup: int, device, barrier) -> List[float]:
    times = [timed_call(fn, device, barrier) for _ in range(warmup + repeats)]
    return times[warmup:]


def _dense_fns(cfg: BenchConfig, tensors):
    import torch.nn.functional as F

    q, k, v, do = tensors

    def forward():
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=cfg.causal,
            enable_gqa=cfg.heads != cfg.kv_heads,
        ).transpose(1, 2)

    return forward, q, k, v, do


# The contestants that run on rank 0 alone with every core (the others wait at the barriers):
# PyTorch's dense SDPA, and seqpar's own block kernel on the whole problem (what seqpar's
# kernels do without splitting the sequence: the ratio of a strategy to it is the cost of
# the split alone, the kernel's own gains aside).
SINGLE_PROCESS = ("dense", "seqpar kernel")


def _kernel_fns(cfg: BenchConfig, tensors):
    """seqpar's block kernel on the whole sequence the way a strategy runs its blocks: one
    block call forward, the backward through `attend_blocks_backward` (in tiles of
    `BACKWARD_TILE` rows and keys on CPUs), in the strategies' own autograd wrapper
    (`saved_output_function`: the output saved in the input dtype); backend as the
    strategies resolve it."""
    from ..kernels import block
    from ..layout import Block
    from ..strategies.common import attend_blocks_backward, saved_output_function

    q, k, v, do = tensors
    scale = cfg.head_dim ** -0.5
    backend = block.resolve_backend(cfg.backend, q.device, q.dtype, cfg.head_dim, scale)
    offset = 0 if cfg.causal else None
    fwd, bwd = block.kernels(backend, q, k)

    def whole_forward(q, k, v):
        return fwd(q, k, v, scale, offset)

    def whole_backward(do, q, k, v, out, lse):
        acc = block.acc_dtype(q.dtype)
        dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
        attend_blocks_backward(bwd, [Block(0, q.shape[1], 0, k.shape[1], offset)], do, q, k, v, out, lse, scale,
                               dq, dk, dv)
        return dq, dk, dv

    whole_kernel = saved_output_function("WholeKernel", whole_forward, whole_backward)

    def forward():
        return whole_kernel.apply(q, k, v, None, ())

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
    from seqpar.registry import analytic_bytes

    device = _device()
    rank = dist.get_rank()
    rank_threads = torch.get_num_threads()
    # dense gets the ranks' threads together, never more than the machine's cores
    dense_threads = min(rank_threads * dist.get_world_size(), os.cpu_count() or 1) if device.type == "cpu" else rank_threads
    tensors = [t.requires_grad_(i < 3) for i, t in enumerate(_global_inputs(cfg, device))]
    layout = seqpar.SeqLayout(cfg.seq_len, scheme=cfg.scheme)
    contestants = {"dense": _dense_fns(cfg, [t.detach().requires_grad_(i < 3) for i, t in enumerate(tensors)]),
                   "seqpar kernel": _kernel_fns(cfg, [t.detach().requires_grad_(i < 3) for i, t in enumerate(tensors)])}
    for name in strategies:
        contestants[name] = _strategy_fns(cfg, name, layout, [t.detach() for t in tensors])
        for t in contestants[name][1:4]:
            t.requires_grad_()
    skipped = {}
    if peers:
        contestants.update(_peer_contestants(cfg, tensors, skipped))
    def run_one(name: str, backward: bool) -> float:
        forward, q, k, v, do = contestants[name][:5]
        active = name not in SINGLE_PROCESS or rank == 0
        if name in SINGLE_PROCESS and active:
            torch.set_num_threads(dense_threads)
        def call():
            if not active:
                return
            if backward:
                q.grad = k.grad = v.grad = None
                forward().backward(do)
            else:
                with torch.no_grad():
                    forward()

        elapsed = timed_call(call, device)
        torch.set_num_threads(rank_threads)
        if name in SINGLE_PROCESS and device.type == "cpu":
            settle()  # its threads spin on after it, on the cores the next contestant uses
        return elapsed if active else 0.0

    modes = {name: ((False, True) if contestants[name][1] is not None else (False,)) for name in contestants}
    times = {(name, bwd): [] for name in contestants for bwd in modes[name]}
    rounds = cfg.warmup + cfg.repeats
    steps, step = rounds * sum(len(m) for m in modes.values()), 0
    for round_ in range(rounds):
        for name in contestants:
            for bwd in modes[name]:
                elapsed = run_one(name, bwd)
                step += 1
                if round_ >= cfg.warmup:
                    times[(name, bwd)].append(elapsed)
                label = "warm-up" if round_ < cfg.warmup else f"round {round_ - cfg.warmup + 1}/{cfg.repeats}"
                if rank == 0:
                    _progress(f"  timing [{step}/{steps}, {label}] {name} {'fwd+bwd' if bwd else 'fwd'}: "
                              f"{elapsed:.3f} s (rank 0)", final=step == steps)

    results = {"rank": rank, "threads": rank_threads, "dense_threads": dense_threads, "peer_skipped": skipped}
    for i, (name, (forward, q, k, v, do, *peer_layout)) in enumerate(contestants.items()):
        if rank == 0:
            _progress(f"  checking [{i + 1}/{len(contestants)}] {name}: bytes sent and the result for the errors",
                      final=i + 1 == len(contestants))
        entry = {"forward": times[(name, False)], "forward_backward": times.get((name, True))}
        if name in SINGLE_PROCESS and rank != 0:
            results[name] = entry
            continue
        if name in strategies:
            with seqpar.comm.track() as fwd_stats:
                out = forward()
            with seqpar.comm.track() as bwd_stats:
                q.grad = k.grad = v.grad = None
                out.backward(do)
            expected = analytic_bytes(name, layout, cfg.batch, cfg.heads, cfg.kv_heads, cfg.head_dim, q.element_size(),
                                      causal=cfg.causal)
            entry.update(
                bytes_forward=fwd_stats.bytes_sent(name), bytes_backward=bwd_stats.bytes_sent(name),
                analytic_forward=expected["forward"], analytic_backward=expected["backward"],
                ops_forward=fwd_stats.as_dict(), ops_backward=bwd_stats.as_dict(),
                positions=layout.positions(),
            )
        elif name in SINGLE_PROCESS:
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
    path = _bench_dir() / filename
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The peer rows: (name, adapter in bench/, its availability check, the package it needs or
# None, how to install that package without replacing torch; see bench/ulysses_peers.py).
PEERS = (
    ("torch templated ring", "torch_ring_peer.py", "available", None, None),
    ("deepspeed ulysses", "ulysses_peers.py", "available_deepspeed", "deepspeed",
     "DS_BUILD_OPS=0 DS_ACCELERATOR=cpu pip install --no-build-isolation --no-deps deepspeed==0.19.8 && "
     "pip install hjson msgpack ninja psutil tqdm einops numpy packaging py-cpuinfo 'pydantic>=2'"),
    ("yunchang ulysses", "ulysses_peers.py", "available_yunchang", "yunchang", "pip install --no-deps yunchang==0.6.4"),
)


def peer_unavailable(name: str, module) -> Optional[str]:
    """Why the peer row `name` cannot run here (None if it can); a missing package comes
    with the command that installs it."""
    _, filename, check, package, install = next(p for p in PEERS if p[0] == name)
    if module is None:
        return f"bench/{filename} not found (run from a clone)"
    if package is not None and importlib.util.find_spec(package) is None:
        return f"{package} is not installed; to add this row: {install}"
    reason = getattr(module, check)()
    if reason is not None and install is not None and reason.startswith("cannot import"):
        reason += f"; to (re)install: {install}"
    return reason


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
    reason = peer_unavailable("torch templated ring", torch_ring)
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
    for name, grad in (("deepspeed ulysses", True), ("yunchang ulysses", False)):
        reason = peer_unavailable(name, ulysses)
        if reason is None and not equal:
            reason = "needs seq_len divisible by P (uneven lengths abort over gloo)"
        if reason is None:
            q, k, v, do = shards(contiguous, grad)
            if grad:
                fn = lambda q=q, k=k, v=v: ulysses.deepspeed_ulysses(q, k, v, causal=cfg.causal)
                found[name + " (peer)"] = (fn, q, k, v, do, contiguous)
            else:
                fn = lambda q=q, k=k, v=v: ulysses.yunchang_ulysses(q, k, v, causal=cfg.causal, local="sdpa")
                found[name + " (peer)"] = (fn, None, None, None, None, contiguous)
        else:
            skipped[name] = reason
    return found


# -- the driver -----------------------------------------------------------------------


def _format_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _progress(text: str, final: bool = False) -> None:
    if is_main():
        progress(text, final=final)


def _bench_dir() -> Path:
    root = repo_root()
    return root / "bench" if root is not None else Path.cwd() / "bench"


def run(cfg: BenchConfig, strategies: Optional[List[str]] = None, peers: bool = True, json_path: Optional[str] = None,
        kind: str = "bench") -> Dict:
    from ..registry import names as registered_strategies
    from ..testing import LocalWorld

    names = list(strategies or registered_strategies())
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cores = os.cpu_count() or 1
    if is_main():
        progress_end()
        print(f"seqpar bench: P={cfg.world_size}, N={cfg.seq_len}, H={cfg.heads}, H_kv={cfg.kv_heads}, "
              f"D={cfg.head_dim}, {cfg.dtype}, causal={cfg.causal}, scheme={cfg.scheme}; contestants: dense, "
              f"{', '.join(names)}{' and the peers found in bench/' if peers else ''}; "
              f"{cfg.warmup} warm-up + {cfg.repeats} timed rounds, interleaved", file=sys.stderr, flush=True)
        if not peers:
            print(f"--no-peers: skipping the peer rows {', '.join(p[0] for p in PEERS)}", file=sys.stderr, flush=True)
    if launched:
        runner = _TorchrunRunner(cfg)
    else:
        _progress(f"  starting a local world of {cfg.world_size} ranks", final=True)
        runner = LocalWorld(cfg.world_size, threads_per_rank=max(1, cores // cfg.world_size))
    try:
        res = runner.run(bench_on_rank, cfg, names, peers, timeout=4 * 3600)
    finally:
        runner.close()
    dense = res[0]["dense"]
    rows = [{"name": f"dense ({res[0]['dense_threads']} threads, 1 process)", "threads": res[0]["dense_threads"],
             "forward_times_s": dense["forward"], "forward_backward_times_s": dense["forward_backward"]}]
    kernel = res[0]["seqpar kernel"]
    rows.append({"name": f"seqpar kernel ({res[0]['dense_threads']} threads, 1 process)",
                 "threads": res[0]["dense_threads"], "forward_times_s": kernel["forward"],
                 "forward_backward_times_s": kernel["forward_backward"],
                 "errors": {g: rel_err(kernel[g], dense[g]) for g in ("out", "dq", "dk", "dv")}})
    rows[-1]["max_rel_err"] = max(rows[-1]["errors"].values())
    for name in [n for n in res[0] if n not in SINGLE_PROCESS + ("rank", "threads", "dense_threads", "peer_skipped")]:
        per_rank = [r[name] for r in res]
        row = {"name": name, "threads": res[0]["threads"],
               "forward_times_s": slowest_per_repeat(per_rank, "forward")}
        if per_rank[0]["forward_backward"]:
            row["forward_backward_times_s"] = slowest_per_repeat(per_rank, "forward_backward")
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
        row["errors"] = {g: rel_err(assemble(per_rank, g, cfg.seq_len), dense[g]) for g in grads}
        row["max_rel_err"] = max(row["errors"].values())
        rows.append(row)
    for name, reason in res[0]["peer_skipped"].items():
        rows.append({"name": name, "skipped": reason})
    if not peers:
        rows += [{"name": p[0], "skipped": "--no-peers"} for p in PEERS]
    for row in rows:
        for key in ("forward", "forward_backward"):
            if row.get(f"{key}_times_s"):
                times = row[f"{key}_times_s"]
                row[f"{key}_s"] = statistics.median(times)
                row[f"{key}_spread"] = (max(times) - min(times)) / statistics.median(times)
    dense_fwd, dense_fb = rows[0]["forward_s"], rows[0]["forward_backward_s"]
    kernel_fwd, kernel_fb = rows[1]["forward_s"], rows[1]["forward_backward_s"]
    for row in rows:
        if "forward_s" in row:
            row["forward_vs_dense"] = row["forward_s"] / dense_fwd
            row["forward_vs_kernel"] = row["forward_s"] / kernel_fwd
        if "forward_backward_s" in row:
            row["forward_backward_vs_dense"] = row["forward_backward_s"] / dense_fb
            row["forward_backward_vs_kernel"] = row["forward_backward_s"] / kernel_fb
    report = {
        "config": dataclasses.asdict(cfg), "machine": machine_description(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "launched_with_torchrun": launched, "rows": rows,
    }
    if not is_main():
        return report
    progress_end()
    print(format_table(report), flush=True)
    write_json(report, json_path, kind=kind)
    return report


def format_table(report: Dict) -> str:
    cfg = report["config"]
    lines = [
        f"seqpar bench on {report['machine']} (torch {report['torch']}): P={cfg['world_size']}, N={cfg['seq_len']}, "
        f"B={cfg['batch']}, H={cfg['heads']}, H_kv={cfg['kv_heads']}, D={cfg['head_dim']}, {cfg['dtype']}, "
        f"causal={cfg['causal']}, scheme={cfg['scheme']}, backend={cfg['backend']}",
        "",
        "| strategy | fwd (s) | fwd / dense | fwd+bwd (s) | fwd+bwd / dense | fwd+bwd / seqpar kernel | bytes/rank fwd (analytic) | bytes/rank bwd (analytic) | max rel err vs dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def num(row, key, fmt):
        return format(row[key], fmt) if key in row else "-"

    lines.insert(1, f"median of {cfg['repeats']} interleaved rounds, slowest rank per round; {report['date']}")
    for row in report["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['name']} | skipped: {row['skipped']} | | | | | | | |")
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
            f"{num(row, 'forward_backward_vs_kernel', '.2f')}x | {fwd_bytes if 'bytes_forward' in row else '-'} | {bwd_bytes if 'bytes_backward' in row else '-'} | "
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
        from ..comm.collectives import all_gather_object

        return all_gather_object(fn(*args), None, op="bench.results")

    def close(self):
        """Nothing to release: torchrun owns the processes and the group."""


# The profiles of the main job: (N exact, N linear, chain rounds). The default fits in about
# 5 minutes on a busy 2-core machine; --long is the README's recorded problem.
PROFILES = {"quick": (2048, 4096, 5), "default": (8192, 16384, 10), "long": (16384, 65536, 30)}
# N of the small-problem rows after the main ones (default and --long profiles)
SMALL_SIZES = (2048, 4096)
# their timed rounds at least: a call takes a fraction of a second, and rounds vary by
# 10-30% on a shared machine, so their medians want more rounds than the main rows
SMALL_REPEATS = 9

_FIELD_HELP = {
    "world_size": "ranks P of the local world (under torchrun: the launched group)",
    "seq_len": "global sequence length N",
    "batch": "batch size B",
    "heads": "query heads H",
    "kv_heads": "key/value heads H_kv (H %% H_kv == 0)",
    "head_dim": "head dimension D",
    "dtype": "inputs' dtype",
    "causal": "causal attention",
    "scheme": "sequence layout of the strategies",
    "backend": "block kernel backend (seqpar.attention's backend=)",
    "repeats": "timed rounds (the median is reported)",
    "warmup": "untimed rounds first",
    "seed": "seed of the random inputs",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m seqpar bench", description=__doc__.splitlines()[0], formatter_class=HelpFormatter,
        epilog="profiles: default N=%d (linear rows N=%d); --long N=%d (linear %d), the README's recorded problem; "
               "--quick N=%d (linear %d). JSON goes to a new timestamped file beside the latest one."
               % (PROFILES["default"][:2] + PROFILES["long"][:2] + PROFILES["quick"][:2]))
    for field in dataclasses.fields(BenchConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = _FIELD_HELP.get(field.name, field.name)
        if field.name == "causal":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
        elif field.name == "seq_len":
            parser.add_argument(flag, type=int, default=None,
                                help=help_text + " (default: %d; --long %d, --quick %d)"
                                % (PROFILES["default"][0], PROFILES["long"][0], PROFILES["quick"][0]))
        elif field.name == "dtype":
            parser.add_argument(flag, choices=list(DTYPES), default=field.default, help=help_text)
        elif field.name == "scheme":
            parser.add_argument(flag, choices=("contiguous", "zigzag", "stripe"), default=field.default,
                                help=help_text)
        else:
            kind = int if isinstance(field.default, int) else str
            parser.add_argument(flag, type=kind, default=field.default, help=help_text)
    parser.add_argument("--strategies", nargs="*", default=None, help="strategies to run (default: every registered "
                        "strategy)")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip the peer rows: " + ", ".join(p[0] for p in PEERS))
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--quick", action="store_true", help="small problems for a smoke run (N=%d exact, %d linear)"
                         % PROFILES["quick"][:2])
    profile.add_argument("--long", action="store_true", help="the README's recorded problem (N=%d exact, %d linear; "
                         "about 4x the default's time)" % PROFILES["long"][:2])
    parser.add_argument("--memory", action="store_true",
                        help="instead: peak memory per rank of every strategy against dense and the planner's "
                             "analytic peak (see --memory --help)")
    parser.add_argument("--masks", action="store_true",
                        help="instead: windowed ring against full ring and dense, and packed documents on the "
                             "contiguous, zigzag and balanced layouts (see --masks --help)")
    parser.add_argument("--grid", action="store_true",
                        help="instead: every feasible strategy on a grid of (P, N, H, H_kv), predicted against "
                             "measured, and how often strategy='auto' picks the fastest (see --grid --help)")
    parser.add_argument("--small-sizes", type=int, nargs="*", default=None,
                        help="after the main rows, the same contestants at these N (per-call overhead on small "
                             "problems; default: %s with the default and --long profiles, none with --quick or an "
                             "explicit --seq-len; no value: none)" % " ".join(map(str, SMALL_SIZES)))
    parser.add_argument("--linear", choices=("on", "off", "only"), default="on",
                        help="the linear-attention rows (methods by P, on local worlds): on (after the exact "
                             "strategies), off, or only")
    parser.add_argument("--linear-world-sizes", type=int, nargs="+", default=[2, 4], help="P of the linear rows")
    parser.add_argument("--linear-kinds", nargs="+", default=["scalar"], choices=("scalar", "gla", "delta"),
                        help="the linear models benchmarked, one table each: scalar (linear_attention, a decay per "
                             "token), gla (a gate per key channel), delta (delta_attention, the gated delta rule)")
    parser.add_argument("--linear-seq-len", type=int, default=None,
                        help="N of the linear rows (default: %d; --long %d, --quick %d)"
                        % (PROFILES["default"][1], PROFILES["long"][1], PROFILES["quick"][1]))
    parser.add_argument("--out-dir", default=str(default_out_dir()),
                        help="where the JSON reports go (bench/out/ of the checkout, else the current directory)")
    parser.add_argument("--json", default=None,
                        help="the latest exact-attention report (default: OUT_DIR/latest.json; each run also writes "
                             "OUT_DIR/bench-DATE-TIME.json beside it; '' writes nothing)")
    parser.add_argument("--linear-json", default=None,
                        help="the latest linear report (default: OUT_DIR/linear.json, plus linear-DATE-TIME.json "
                             "beside it; '' writes nothing)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--grid" in argv:  # the cost model against measurement: its own options
        from .grid import main as grid_main

        return grid_main([a for a in argv if a != "--grid"])
    if "--memory" in argv:  # peak memory per rank: its own options
        from .memory import main as memory_main

        return memory_main([a for a in argv if a != "--memory"])
    if "--masks" in argv:  # windows and packed documents: their own options
        from .masks import main as masks_main

        return masks_main([a for a in argv if a != "--masks"])
    args = build_parser().parse_args(argv)
    profile = PROFILES["quick" if args.quick else "long" if args.long else "default"]
    cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})
    if cfg.seq_len is None:
        cfg.seq_len = profile[0]
    out_dir = Path(args.out_dir)
    json_path = str(out_dir / "latest.json") if args.json is None else args.json
    linear_json = str(out_dir / "linear.json") if args.linear_json is None else args.linear_json
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    started = time.perf_counter()
    if args.linear != "only":
        run(cfg, args.strategies, peers=not args.no_peers, json_path=json_path)
        small = args.small_sizes
        if small is None:
            small = [] if args.quick or args.seq_len is not None else list(SMALL_SIZES)
        for n in small:  # per-call overhead: the fixed costs show on problems of a few thousand tokens
            path = str(out_dir / f"small-{n}.json") if json_path else ""
            run(dataclasses.replace(cfg, seq_len=n, repeats=max(cfg.repeats, SMALL_REPEATS)), args.strategies,
                peers=not args.no_peers, json_path=path, kind=f"small{n}")
    if args.linear != "off" and not launched:  # the linear rows spawn their own local worlds
        from . import linear as linear_bench

        for kind in args.linear_kinds:
            lin = linear_bench.LinearBenchConfig(
                world_sizes=tuple(args.linear_world_sizes),
                seq_len=profile[1] if args.linear_seq_len is None else args.linear_seq_len,
                dtype=cfg.dtype if cfg.dtype != "float64" else "float32", repeats=cfg.repeats, warmup=cfg.warmup,
                chain_repeats=profile[2], kind=kind,
            )
            report = linear_bench.run(lin)
            report["machine"], report["torch"] = machine_description(), torch.__version__
            progress_end()
            print()
            print(linear_bench.format_tables(report), flush=True)
            # linear.json for the scalar decay, linear-gla.json and linear-delta.json beside it
            path = linear_json if kind == "scalar" or not linear_json else \
                str(Path(linear_json).with_name(f"{Path(linear_json).stem}-{kind}.json"))
            write_json(report, path, kind="linear" if kind == "scalar" else f"linear-{kind}")
    if is_main():
        print(f"seqpar bench: done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return 0
