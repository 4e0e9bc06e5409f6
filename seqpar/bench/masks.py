"""Masks under sequence parallelism: `python -m seqpar bench --masks`.

Two tables, each run on local gloo worlds of P ranks (P = 2 and 4), side by side in one run:

- **Windows**: causal ring and all-gather attention with sliding windows of N/16, N/8 and
  N/2 against the same strategy without a window and against dense attention in one
  process (PyTorch's SDPA, plain causal: the fastest dense call there is; the windowed
  dense call would be slower): forward and forward+backward seconds (the slowest rank),
  the bytes the busiest rank sent (measured, and the analytic count, which must be equal),
  the bytes over the same strategy's unwindowed ones, and the error against float64 dense
  attention with the window.
- **Packed documents**: a realistic length mix (a few long documents, many short ones), ring
  attention on the contiguous, zigzag (per document) and balanced layouts: the busiest
  rank's causal work over the mean (visible query-key pairs), how many documents span
  ranks, seconds and bytes as above, and the error.

The layout is contiguous for the windows (a window narrower than a rank's share then
needs only the previous rank's last rows) and causal throughout.
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .common import (assemble, default_out_dir, machine_description, progress, progress_end, rel_err,
                     slowest_per_repeat, timed_call, write_json)


@dataclass
class MaskBenchConfig:
    world_sizes: Tuple[int, ...] = (2, 4)
    seq_len: int = 4096
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    windows: Tuple[int, ...] = (16, 8, 2)  # window = N / each
    window_strategies: Tuple[str, ...] = ("ring", "allgather")
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    documents: Optional[Tuple[int, ...]] = field(default=None)  # cu_seqlens; None: the default mix


def length_mix(seq_len: int, seed: int = 0) -> Tuple[int, ...]:
    """cu_seqlens of a realistic packing: about half the tokens in three long documents
    (N/4, N/8, N/8), the rest in short ones of 32 to 512 tokens, shuffled."""
    rng = random.Random(seed)
    lengths = [seq_len // 4, seq_len // 8, seq_len // 8]
    left = seq_len - sum(lengths)
    while left > 0:
        n = min(left, rng.randint(32, 512))
        lengths.append(n)
        left -= n
    rng.shuffle(lengths)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return tuple(bounds)


def _inputs(cfg: MaskBenchConfig):
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (1, cfg.seq_len)
    q = torch.randn(*shape, cfg.heads, cfg.head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(*shape, cfg.kv_heads, cfg.head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(*shape, cfg.kv_heads, cfg.head_dim, generator=gen, dtype=torch.float64)
    do = torch.randn(*shape, cfg.heads, cfg.head_dim, generator=gen, dtype=torch.float64)
    return q, k, v, do


def _reference(cfg: MaskBenchConfig, window: Tuple[int, int], documents) -> torch.Tensor:
    """float64 dense attention's output with the mask (one process)."""
    from ..kernels.reference import dense_attention
    from ..testing.checks import visibility

    q, k, v, _ = _inputs(cfg)
    mask = visibility(cfg.seq_len, True, documents, window)
    return dense_attention(q, k, v, causal=mask is None, mask=mask)


def _timed_rounds(cfg: MaskBenchConfig, fwd, fwd_bwd) -> Dict[str, List[float]]:
    """Seconds of `fwd()` and `fwd_bwd()` per round, interleaved, after `cfg.warmup` rounds."""
    times = {"forward": [], "forward_backward": []}
    for round_ in range(cfg.warmup + cfg.repeats):
        for name, fn in (("forward", fwd), ("forward_backward", fwd_bwd)):
            elapsed = timed_call(fn)
            if round_ >= cfg.warmup:
                times[name].append(elapsed)
    return times


def _on_rank(cfg: MaskBenchConfig, scheme: str, window: Tuple[int, int], documents, strategy: str) -> Dict:
    """One case on every rank of the world: times, bytes, this rank's output."""
    import seqpar
    from ..layout import SeqLayout
    from ..registry import analytic_bytes

    dtype = getattr(torch, cfg.dtype)
    layout = SeqLayout(cfg.seq_len, scheme=scheme, cu_seqlens=documents)
    q, k, v, do = (layout.shard(t).to(dtype) for t in _inputs(cfg))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def forward():
        return seqpar.attention(q, k, v, layout=layout, causal=True, window_size=window, strategy=strategy)

    def fwd():
        with torch.no_grad():
            forward()

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        forward().backward(do)

    times = _timed_rounds(cfg, fwd, fwd_bwd)
    with seqpar.comm.track() as fwd_stats:
        out = forward()
    with seqpar.comm.track() as bwd_stats:
        out.backward(do)
    expected = analytic_bytes(strategy, layout, 1, cfg.heads, cfg.kv_heads, cfg.head_dim, q.element_size(),
                              causal=True, window_size=window)
    return {"times": times, "bytes_forward": fwd_stats.bytes_sent(strategy),
            "bytes_backward": bwd_stats.bytes_sent(strategy), "analytic": expected, "out": out.detach(),
            "positions": layout.positions()}


def _dense_on_rank(cfg: MaskBenchConfig, documents=None) -> Dict:
    """Dense causal SDPA in one process (rank 0; the others wait at the barriers); with
    `documents`, SDPA with the causal document mask as a boolean `attn_mask`."""
    import torch.distributed as dist
    import torch.nn.functional as F

    dtype = getattr(torch, cfg.dtype)
    q, k, v, do = (t.to(dtype) for t in _inputs(cfg))
    q, k, v = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    do = do.transpose(1, 2).contiguous()
    main = dist.get_rank() == 0
    mask = None
    if documents is not None:
        from ..testing.checks import visibility

        mask = visibility(cfg.seq_len, True, documents)
    sdpa = dict(is_causal=True) if mask is None else dict(attn_mask=mask)
    threads = torch.get_num_threads()
    if main:
        torch.set_num_threads(threads * dist.get_world_size())  # the machine's cores, as the ranks have together

    def fwd():
        if main:
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, enable_gqa=cfg.heads != cfg.kv_heads, **sdpa)

    def fwd_bwd():
        if main:
            q.grad = k.grad = v.grad = None
            F.scaled_dot_product_attention(q, k, v, enable_gqa=cfg.heads != cfg.kv_heads, **sdpa).backward(do)

    try:
        return {"times": _timed_rounds(cfg, fwd, fwd_bwd)}
    finally:
        torch.set_num_threads(threads)


def _median(xs: Sequence[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _slowest(results: List[Dict], key: str) -> float:
    """The median over repeats of the slowest rank's time."""
    return _median(slowest_per_repeat([r["times"] for r in results], key))


def _work_balance(cfg: MaskBenchConfig, scheme: str, documents, world: int) -> Tuple[float, int]:
    """(busiest rank's causal work over the mean, documents spanning ranks): a query at
    position t of a document that starts at s sees t - s + 1 keys."""
    from ..layout import SeqLayout

    layout = SeqLayout.simulated(cfg.seq_len, world, 0, scheme, documents)
    starts = torch.tensor(documents[:-1])
    work, owners = [], {}
    for r in range(world):
        positions = layout.positions_of(r)
        doc = torch.bucketize(positions, starts, right=True) - 1
        work.append(int((positions - starts[doc] + 1).sum()))
        for d in doc.unique().tolist():
            owners.setdefault(d, set()).add(r)
    spanning = sum(1 for ranks in owners.values() if len(ranks) > 1)
    return max(work) / (sum(work) / world), spanning


def run(cfg: MaskBenchConfig) -> Dict:
    from ..testing import world as local_world

    documents = cfg.documents or length_mix(cfg.seq_len, cfg.seed)
    n = cfg.seq_len
    report: Dict = {"config": {**asdict(cfg), "documents": list(documents)}, "windows": [], "documents": []}
    window_cases = [(strategy, f"{strategy}, {name}", window) for strategy in cfg.window_strategies
                    for name, window in [("no window", (-1, -1))] + [(f"window N/{w}", (n // w, 0))
                                                                      for w in cfg.windows]]
    doc_cases = [(scheme, scheme) for scheme in ("contiguous", "zigzag", "balanced")]
    total = len(cfg.world_sizes) * (2 + len(window_cases) + len(doc_cases))
    done = 0
    refs = {}
    for p in cfg.world_sizes:
        w = local_world(p)
        progress(f"[{done + 1}/{total}] P={p}: dense causal SDPA in one process")
        dense = w.run(_dense_on_rank, cfg, timeout=3600)
        done += 1
        dense_row = {"world_size": p, "case": "dense causal (one process, SDPA)",
                     "forward_s": _slowest(dense, "forward"), "forward_backward_s": _slowest(dense, "forward_backward")}
        report["windows"].append(dense_row)
        full_bytes = None
        for strategy, name, window in window_cases:
            progress(f"[{done + 1}/{total}] P={p}: {name}")
            results = w.run(_on_rank, cfg, "contiguous", window, None, strategy, timeout=3600)
            done += 1
            if window not in refs:
                refs[window] = _reference(cfg, window, None)
            row = _row(p, name, results, refs[window], n)
            if window == (-1, -1):
                full_bytes = row["bytes_backward"]
            row["bytes_vs_unwindowed"] = row["bytes_backward"] / full_bytes if full_bytes else None
            row["forward_vs_dense"] = row["forward_s"] / dense_row["forward_s"]
            row["forward_backward_vs_dense"] = row["forward_backward_s"] / dense_row["forward_backward_s"]
            report["windows"].append(row)
        progress(f"[{done + 1}/{total}] P={p}: dense SDPA with the document mask in one process")
        dense_docs = w.run(_dense_on_rank, cfg, documents, timeout=3600)
        done += 1
        dense_docs_row = {"world_size": p, "case": "dense, document mask (one process, SDPA)",
                          "forward_s": _slowest(dense_docs, "forward"),
                          "forward_backward_s": _slowest(dense_docs, "forward_backward")}
        report["documents"].append(dense_docs_row)
        for name, scheme in doc_cases:
            progress(f"[{done + 1}/{total}] P={p}: packed documents, {scheme}")
            results = w.run(_on_rank, cfg, scheme, (-1, -1), documents, "ring", timeout=3600)
            done += 1
            key = ("documents", documents)
            if key not in refs:
                refs[key] = _reference(cfg, (-1, -1), documents)
            row = _row(p, f"ring, {scheme}", results, refs[key], n)
            row["work_max_over_mean"], row["documents_spanning_ranks"] = _work_balance(cfg, scheme, documents, p)
            row["forward_backward_vs_dense"] = row["forward_backward_s"] / dense_docs_row["forward_backward_s"]
            report["documents"].append(row)
    progress_end()
    return report


def _row(p: int, name: str, results: List[Dict], ref: torch.Tensor, n: int) -> Dict:
    sent_fwd = [r["bytes_forward"] for r in results]
    sent_bwd = [r["bytes_backward"] for r in results]
    exact = all(r["bytes_forward"] == r["analytic"]["forward"] and r["bytes_backward"] == r["analytic"]["backward"]
                for r in results)
    return {"world_size": p, "case": name, "forward_s": _slowest(results, "forward"),
            "forward_backward_s": _slowest(results, "forward_backward"),
            "bytes_forward": max(sent_fwd), "bytes_backward": max(sent_fwd[i] + sent_bwd[i] for i in range(p)),
            "bytes_equal_analytic": exact, "error": rel_err(assemble(results, "out", n), ref)}


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def format_tables(report: Dict) -> str:
    cfg = report["config"]
    lines = [f"Windows: causal {' and '.join(cfg['window_strategies'])}, contiguous layout, N={cfg['seq_len']}, H={cfg['heads']}/{cfg['kv_heads']}, "
             f"D={cfg['head_dim']}, {cfg['dtype']}; bytes: the busiest rank's, forward and fwd+bwd "
             f"(measured = analytic for every row marked =)", "",
             "| P | case | fwd s | fwd+bwd s | fwd / dense | fwd+bwd / dense | MiB fwd | MiB fwd+bwd | bytes / no window "
             "| err vs fp64 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["windows"]:
        if "bytes_forward" not in r:
            lines.append(f"| {r['world_size']} | {r['case']} | {r['forward_s']:.3f} | {r['forward_backward_s']:.3f} "
                         f"| 1.00 | 1.00 | - | - | - | - |")
            continue
        eq = "=" if r["bytes_equal_analytic"] else " (differs from analytic!)"
        ratio = "-" if r["bytes_vs_unwindowed"] is None else f"{r['bytes_vs_unwindowed']:.3f}"
        lines.append(f"| {r['world_size']} | {r['case']} | {r['forward_s']:.3f} | {r['forward_backward_s']:.3f} | "
                     f"{r['forward_vs_dense']:.2f} | {r['forward_backward_vs_dense']:.2f} | {_mib(r['bytes_forward'])} | "
                     f"{_mib(r['bytes_backward'])}{eq} | {ratio} | {r['error']:.1e} |")
    docs = cfg["documents"]
    lengths = sorted((b - a for a, b in zip(docs[:-1], docs[1:])), reverse=True)
    lines += ["", f"Packed documents: {len(lengths)} documents (longest {lengths[:3]}, shortest {lengths[-1]}), "
              "causal ring", "",
              "| P | layout | busiest work / mean | docs spanning ranks | fwd s | fwd+bwd s | fwd+bwd / dense | MiB fwd "
              "| MiB fwd+bwd | err vs fp64 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["documents"]:
        if "bytes_forward" not in r:
            lines.append(f"| {r['world_size']} | {r['case']} | - | - | {r['forward_s']:.3f} | "
                         f"{r['forward_backward_s']:.3f} | 1.00 | - | - | - |")
            continue
        eq = "=" if r["bytes_equal_analytic"] else " (differs from analytic!)"
        lines.append(f"| {r['world_size']} | {r['case']} | {r['work_max_over_mean']:.3f} | "
                     f"{r['documents_spanning_ranks']} | {r['forward_s']:.3f} | {r['forward_backward_s']:.3f} | "
                     f"{r['forward_backward_vs_dense']:.2f} | {_mib(r['bytes_forward'])} | "
                     f"{_mib(r['bytes_backward'])}{eq} | {r['error']:.1e} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqpar bench --masks", description=__doc__.split("\n\n")[0])
    defaults = MaskBenchConfig()
    parser.add_argument("--world-sizes", type=int, nargs="+", default=list(defaults.world_sizes))
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--kv-heads", type=int, default=defaults.kv_heads)
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim)
    parser.add_argument("--dtype", default=defaults.dtype, choices=("float32", "bfloat16", "float64"))
    parser.add_argument("--window-strategies", nargs="+", default=list(defaults.window_strategies),
                        help="the strategies of the windows table (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--quick", action="store_true", help="N=1024, P=2 only: a smoke run")
    parser.add_argument("--out-dir", default=str(default_out_dir()))
    parser.add_argument("--json", default=None, help="results file (default: OUT_DIR/masks.json; '' writes nothing)")
    args = parser.parse_args(argv)
    cfg = MaskBenchConfig(world_sizes=tuple(args.world_sizes), seq_len=args.seq_len, heads=args.heads,
                          kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype, repeats=args.repeats,
                          warmup=args.warmup, window_strategies=tuple(args.window_strategies))
    if args.quick:
        cfg.world_sizes, cfg.seq_len, cfg.repeats = (2,), 1024, 1
    started = time.perf_counter()
    report = run(cfg)
    report["machine"], report["torch"] = machine_description(), torch.__version__
    print(format_tables(report), flush=True)
    from pathlib import Path

    json_path = str(Path(args.out_dir) / "masks.json") if args.json is None else args.json
    if json_path:
        write_json({k: v for k, v in report.items()}, json_path, kind="masks")
    print(f"seqpar bench --masks: done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0
