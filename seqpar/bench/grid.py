"""`python -m seqpar bench --grid`: the cost model against measurement, and how often "auto" wins.

For each world size P, a local gloo world (`cores / P` threads per rank) is calibrated
(`seqpar.calibrate`, not saved), then for every grid point (N, H, H_kv) the plan on that
topology lists the feasible strategies; each runs (forward + backward, or forward alone
with `--no-training`) interleaved round by round, each round starting one candidate later,
timed as the slowest rank per round. A point gets at least `--repeats` timed rounds and
more while they fit in `--seconds-per-point` (up to `--max-repeats`): cheap points, where
this machine's noise is largest against the time, get the most. Warm-up rounds run once
per strategy and world (what they warm, connections and kernel checks, belongs to the
process). A strategy's measured time is the median over rounds. "auto" wins a point when
its choice is within `tolerance` (default 1.1x) of the fastest measured strategy, the
ratio taken round by round (the median of the per-round ratios: drift of the machine
within a round slows both alike); the ratio of the medians is reported beside it.

Output: a progress line on stderr, a table (predicted against measured per strategy,
per point), the fraction of points "auto" won, JSON, and a PNG of time against sequence
length per strategy (measured solid, predicted dashed) when matplotlib is installed
(`pip install seqpar[bench]`); without it the PNG is skipped and the report says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .common import HelpFormatter, default_out_dir, progress, progress_end, timed_call

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class GridConfig:
    world_sizes: Tuple[int, ...] = (2, 3, 4)
    seq_lens: Tuple[int, ...] = (2048, 4096, 8192)
    head_pairs: Tuple[Tuple[int, int], ...] = ((8, 8), (8, 2))  # (H, H_kv)
    head_dim: int = 64
    batch: int = 1
    dtype: str = "float32"
    causal: bool = True
    scheme: str = "zigzag"
    training: bool = True
    backend: str = "auto"
    repeats: int = 5  # timed rounds at least
    max_repeats: int = 40  # timed rounds at most
    seconds_per_point: float = 60.0  # more rounds while they fit in this budget
    warmup: int = 1
    tolerance: float = 1.1
    seed: int = 0


# -- work done on each rank -------------------------------------------------------------------

# (strategy, options) this rank process has run: its warm-up rounds are not repeated
_WARMED: set = set()


def calibrate_on_rank(dtype: str, backend: str):
    import seqpar

    return seqpar.calibrate(dtype=dtype, backend=backend, save=False)


def measure_on_rank(cfg: GridConfig, seq_len: int, heads: int, kv_heads: int, candidates: List[Tuple[str, Dict]],
                    label: str) -> Dict[int, List[float]]:
    """Seconds of each candidate per timed round on this rank (rounds interleave candidates)."""
    import torch.distributed as dist

    import seqpar

    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(cfg.seed)
    dtype = DTYPES[cfg.dtype]
    layout = seqpar.SeqLayout(seq_len, scheme=cfg.scheme)
    shapes = ((cfg.batch, seq_len, heads, cfg.head_dim), (cfg.batch, seq_len, kv_heads, cfg.head_dim))
    q, k, v, do = (layout.shard(torch.randn(shapes[i in (1, 2)], generator=gen)).to(dtype).contiguous()
                   for i in range(4))
    q, k, v = (t.requires_grad_(cfg.training) for t in (q, k, v))
    times: Dict[int, List[float]] = {i: [] for i in range(len(candidates))}
    keys = [(strategy, tuple(sorted(options.items()))) for strategy, options in candidates]
    count = len(candidates)
    spent = 0.0  # seconds of timed rounds so far (the slowest rank's: every rank decides alike)
    round_ = 0
    while True:
        timed = round_ >= cfg.warmup
        round_start = time.perf_counter()
        # each round starts one candidate later: no strategy always follows the same one
        for i in [(round_ + j) % count for j in range(count)]:
            strategy, options = candidates[i]
            if not timed and keys[i] in _WARMED:
                continue  # first-call costs (connections, kernel checks) are per process, paid already
            if rank == 0:
                progress(f"  {label}: {'timed round ' + str(round_ - cfg.warmup + 1) if timed else 'warm-up'}, "
                         f"{strategy}{options or ''}")
            q.grad = k.grad = v.grad = None

            def call():
                if cfg.training:
                    out = seqpar.attention(q, k, v, layout=layout, causal=cfg.causal, strategy=strategy,
                                           backend=cfg.backend, **options)
                    out.backward(do)
                else:
                    with torch.no_grad():
                        seqpar.attention(q, k, v, layout=layout, causal=cfg.causal, strategy=strategy,
                                         backend=cfg.backend, **options)

            elapsed = timed_call(call, q.device)
            if timed:
                times[i].append(elapsed)
        round_ += 1
        if not timed:
            continue
        took = torch.tensor([time.perf_counter() - round_start], dtype=torch.float64)
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        spent += float(took)
        done = round_ - cfg.warmup
        # at least `repeats` rounds; more while the point's time budget lasts (cheap points
        # get many rounds, where this machine's noise is largest relative to the time)
        if done >= cfg.max_repeats or (done >= cfg.repeats and spent + float(took) > cfg.seconds_per_point):
            break
    _WARMED.update(keys)
    progress_end()
    return times


# -- the driver ---------------------------------------------------------------------------


def paired_ratio(times: List[float], others: List[float]) -> float:
    """How much slower `times` is than `others`, from rounds run side by side: the median
    over rounds of the per-round ratio (drift the machine goes through in a round, such
    as another process waking, slows both alike and cancels)."""
    return statistics.median(a / b for a, b in zip(times, others))


def _spread(times: List[float]) -> float:
    """Relative spread of one candidate's rounds: (max - min) / median."""
    return (max(times) - min(times)) / statistics.median(times) if len(times) > 1 else 0.0



def run(cfg: GridConfig, json_path: Optional[str] = None, png_path: Optional[str] = None) -> Dict:
    import seqpar
    from .common import machine_description, write_json
    from ..testing import LocalWorld

    cores = os.cpu_count() or 1
    points = [(p, n, h, hkv) for p in cfg.world_sizes for n in cfg.seq_lens for h, hkv in cfg.head_pairs]
    rows, summaries, topologies = [], [], {}
    done = 0
    for world_size in cfg.world_sizes:
        world = LocalWorld(world_size, threads_per_rank=max(1, cores // world_size))
        try:
            progress(f"seqpar bench --grid: calibrating a local world of {world_size} ranks", final=True)
            topo = world.run(calibrate_on_rank, cfg.dtype, cfg.backend, timeout=600)[0]
            topologies[world_size] = topo.to_dict()
            for _, seq_len, heads, kv_heads in [pt for pt in points if pt[0] == world_size]:
                done += 1
                label = f"[{done}/{len(points)}] P={world_size} N={seq_len} H={heads} H_kv={kv_heads}"
                plan = seqpar.plan(seq_len, world_size=world_size, heads=heads, kv_heads=kv_heads,
                                   head_dim=cfg.head_dim, dtype=cfg.dtype, causal=cfg.causal,
                                   training=cfg.training, batch=cfg.batch, scheme=cfg.scheme, topology=topo)
                candidates = list(plan.feasible)
                per_rank = world.run(measure_on_rank, cfg, seq_len, heads, kv_heads,
                                     [(c.strategy, c.kwargs) for c in candidates], label, timeout=4 * 3600)
                measured, rounds = {}, {}
                for i, c in enumerate(candidates):
                    slowest = [max(ts) for ts in zip(*(r[i] for r in per_rank))]
                    rounds[c.label] = slowest
                    measured[c.label] = statistics.median(slowest)
                    rows.append({"world_size": world_size, "seq_len": seq_len, "heads": heads, "kv_heads": kv_heads,
                                 "candidate": c.label, "strategy": c.strategy, "options": c.kwargs,
                                 "predicted_s": c.time_s, "measured_s": measured[c.label],
                                 "spread": _spread(slowest), "times_s": slowest, "auto": c is plan.choice})
                best = min(measured, key=measured.get)
                auto = plan.choice.label
                ratio = paired_ratio(rounds[auto], rounds[best])
                summaries.append({"world_size": world_size, "seq_len": seq_len, "heads": heads,
                                  "kv_heads": kv_heads, "auto": auto, "best": best,
                                  "auto_vs_best": ratio, "auto_vs_best_unpaired": measured[auto] / measured[best],
                                  "auto_ok": ratio <= cfg.tolerance, "predicted_best": auto == best,
                                  "spread": statistics.median(_spread(t) for t in rounds.values())})
                progress(f"  {label}: auto {plan.choice.label}, fastest {best} (auto / fastest {ratio:.2f})",
                         final=True)
        finally:
            world.close()
    wins = sum(s["auto_ok"] for s in summaries)
    logs = [abs(math.log(r["measured_s"] / r["predicted_s"])) for r in rows if r["predicted_s"] > 0]
    report = {
        "config": dataclasses.asdict(cfg), "machine": machine_description(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "topologies": topologies, "rows": rows, "points": summaries,
        "auto_win_fraction": wins / len(summaries) if summaries else 0.0,
        "median_abs_log_error": statistics.median(logs) if logs else None,
    }
    report["png"], report["png_note"] = _plot(report, png_path) if png_path else (None, "no PNG path given")
    print(format_table(report), flush=True)
    write_json(report, json_path, kind="grid")
    return report


def _best_round_ratio(rows: List[Dict], point: Dict) -> float:
    """auto's fastest round over the fastest round of any candidate at `point` (other
    processes only ever add time, so a strategy's best round is its least disturbed)."""
    key = (point["world_size"], point["seq_len"], point["heads"], point["kv_heads"])
    mine = [r for r in rows if (r["world_size"], r["seq_len"], r["heads"], r["kv_heads"]) == key]
    auto = next(r for r in mine if r["auto"])
    return min(auto["times_s"]) / min(min(r["times_s"]) for r in mine)


def format_table(report: Dict) -> str:
    cfg = report["config"]
    lines = [
        f"seqpar bench --grid on {report['machine']} (torch {report['torch']}): D={cfg['head_dim']}, "
        f"B={cfg['batch']}, {cfg['dtype']}, causal={cfg['causal']}, scheme={cfg['scheme']}, "
        f"{'forward + backward' if cfg['training'] else 'forward'}; median of {cfg['repeats']} to "
        f"{cfg.get('max_repeats', cfg['repeats'])} rounds (as many as fit in "
        f"{cfg.get('seconds_per_point', 0):.0f} s per point; slowest rank; spread: (max - min) / median), "
        f"{report['date']}; auto / fastest (paired): median over rounds of the ratio within a round",
        "",
        "| P | N | H | H_kv | strategy | predicted s | measured s | spread | measured / predicted | "
        "best round s | best round / predicted | |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    best = {(s["world_size"], s["seq_len"], s["heads"], s["kv_heads"]): s["best"] for s in report["points"]}
    for r in report["rows"]:
        key = (r["world_size"], r["seq_len"], r["heads"], r["kv_heads"])
        marks = " ".join(m for m, on in (("auto", r["auto"]), ("fastest", best[key] == r["candidate"])) if on)
        lines.append(f"| {r['world_size']} | {r['seq_len']} | {r['heads']} | {r['kv_heads']} | {r['candidate']} | "
                     f"{r['predicted_s']:.4f} | {r['measured_s']:.4f} | {100 * r.get('spread', 0.0):.0f}% | "
                     f"{r['measured_s'] / r['predicted_s']:.2f} | {min(r['times_s']):.4f} | "
                     f"{min(r['times_s']) / r['predicted_s']:.2f} | {marks} |")
    wins = sum(s["auto_ok"] for s in report["points"])
    lines += ["", "| P | N | H | H_kv | auto | fastest measured | auto / fastest (paired) | unpaired | "
                  "best rounds | within tolerance |", "|---|---|---|---|---|---|---|---|---|---|"]
    best_round_wins = 0
    for s in report["points"]:
        by_best_round = _best_round_ratio(report["rows"], s)
        best_round_wins += by_best_round <= cfg["tolerance"]
        lines.append(f"| {s['world_size']} | {s['seq_len']} | {s['heads']} | {s['kv_heads']} | {s['auto']} | "
                     f"{s['best']} | {s['auto_vs_best']:.3f} | {s.get('auto_vs_best_unpaired', s['auto_vs_best']):.3f} | "
                     f"{by_best_round:.3f} | {'yes' if s['auto_ok'] else 'NO'} |")
    best_logs = [abs(math.log(min(r["times_s"]) / r["predicted_s"])) for r in report["rows"] if r["predicted_s"] > 0]
    lines += ["", f"auto within {cfg['tolerance']}x of the fastest measured strategy at {wins} of "
                  f"{len(report['points'])} points ({100 * report['auto_win_fraction']:.0f}%; by best rounds: "
                  f"{best_round_wins}); median |log(measured / predicted)| = "
                  f"{report['median_abs_log_error']:.2f} (best rounds: {statistics.median(best_logs):.2f})"
              if report["points"] else "no grid points"]
    lines.append(f"plot: {report['png'] or 'skipped'} ({report['png_note']})")
    return "\n".join(lines)


def _plot(report: Dict, png_path: str) -> Tuple[Optional[str], str]:
    """Time against sequence length per strategy, one panel per (P, H, H_kv)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        message = "matplotlib is not installed (pip install seqpar[bench]); PNG skipped"
        print(message, file=sys.stderr)
        return None, message
    panels = sorted({(r["world_size"], r["heads"], r["kv_heads"]) for r in report["rows"]})
    cols = min(2, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.5 * cols, 4.2 * rows_n), squeeze=False)
    for ax, (p, h, hkv) in zip(axes.flat, panels):
        mine = [r for r in report["rows"] if (r["world_size"], r["heads"], r["kv_heads"]) == (p, h, hkv)]
        for i, name in enumerate(sorted({r["candidate"] for r in mine})):
            pts = sorted((r["seq_len"], r["measured_s"], r["predicted_s"]) for r in mine if r["candidate"] == name)
            color = f"C{i % 10}"
            ax.plot([x[0] for x in pts], [x[1] for x in pts], "o-", color=color, label=f"{name} measured")
            ax.plot([x[0] for x in pts], [x[2] for x in pts], "--", color=color, alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("seconds (dashed: predicted)")
        ax.set_title(f"P={p}, H={h}, H_kv={hkv}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path, "measured solid, predicted dashed"


def _pairs(text: str) -> Tuple[int, int]:
    try:
        h, hkv = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H:H_kv such as 8:2, got {text!r}") from None
    return h, hkv


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqpar bench --grid", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    defaults = GridConfig()
    parser.add_argument("--world-sizes", type=int, nargs="+", default=list(defaults.world_sizes),
                        help="P: one calibrated local world each")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=list(defaults.seq_lens),
                        help="sequence lengths N of the grid")
    parser.add_argument("--heads", type=_pairs, nargs="+", default=list(defaults.head_pairs), metavar="H:H_KV",
                        help="head shapes of the grid")
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim, help="head dimension D")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="batch size B")
    parser.add_argument("--dtype", choices=list(DTYPES), default=defaults.dtype, help="inputs' dtype")
    parser.add_argument("--scheme", choices=("contiguous", "zigzag", "stripe"), default=defaults.scheme,
                        help="sequence layout")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=defaults.causal,
                        help="causal attention")
    parser.add_argument("--training", action=argparse.BooleanOptionalAction, default=defaults.training,
                        help="time forward + backward or, with --no-training, the forward")
    parser.add_argument("--backend", default=defaults.backend, help="block kernel backend")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed rounds per point, at least")
    parser.add_argument("--max-repeats", type=int, default=defaults.max_repeats,
                        help="timed rounds per point, at most")
    parser.add_argument("--seconds-per-point", type=float, default=defaults.seconds_per_point,
                        help="after --repeats rounds, go on while the point's timed rounds fit in this budget")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed rounds per strategy and world")
    parser.add_argument("--tolerance", type=float, default=defaults.tolerance,
                        help="auto wins a point within this factor of the fastest")
    parser.add_argument("--out-dir", default=str(default_out_dir()),
                        help="where the JSON and PNG go (bench/out/ of the checkout, else the current directory)")
    parser.add_argument("--json", default=None,
                        help="the latest report (default: OUT_DIR/grid.json; each run also writes "
                             "OUT_DIR/grid-DATE-TIME.json beside it; '' writes nothing)")
    parser.add_argument("--png", default=None, help="the plot (default: OUT_DIR/grid.png; '' skips it)")
    parser.add_argument("--table", metavar="JSON", default=None,
                        help="print the tables of a saved run's JSON and exit (runs nothing)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: N 1024 and 2048, at most 10 s of timed rounds per point")
    args = parser.parse_args(argv)
    if args.table:
        print(format_table(json.loads(Path(args.table).read_text())))
        return 0
    budget = min(args.seconds_per_point, 10.0) if args.quick else args.seconds_per_point
    cfg = GridConfig(world_sizes=tuple(args.world_sizes), seq_lens=(1024, 2048) if args.quick else tuple(args.seq_lens),
                     head_pairs=tuple(args.heads), head_dim=args.head_dim, batch=args.batch, dtype=args.dtype,
                     causal=args.causal, scheme=args.scheme, training=args.training, backend=args.backend,
                     repeats=args.repeats, max_repeats=max(args.repeats, args.max_repeats), seconds_per_point=budget,
                     warmup=args.warmup, tolerance=args.tolerance)
    json_path = str(Path(args.out_dir) / "grid.json") if args.json is None else args.json
    png_path = str(Path(args.out_dir) / "grid.png") if args.png is None else args.png
    run(cfg, json_path=json_path or None, png_path=png_path or None)
    return 0
