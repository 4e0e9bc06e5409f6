"""The cross-rank scan alone: the last rank's wait for its incoming state, by state size,
world size and number of pieces (ring = 1 piece, All-Scan = K pieces).

    python bench/linear_chain.py [--sizes-mib 0.0625 4 64] [--world-sizes 2 4] [--pieces 1 4 8 16]

Each measurement: a barrier, then `comm.scan.StateScan.run` on every rank (nothing else
running), the last rank's seconds blocked on receives; median of `--repeats`. Also fits
per-message latency alpha and time per byte beta from the 1-piece P=2 rows and prints the
model's prediction `(P - 2 + K) (alpha + beta S / K)` beside each measurement.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _on_rank(sizes, pieces_list, repeats):
    import torch.distributed as dist

    import seqpar
    from seqpar.comm import stats
    from seqpar.comm.scan import StateScan

    layout = seqpar.SeqLayout(dist.get_world_size() * 2)
    rank, world = layout.rank, layout.world_size
    out = {}
    for nbytes in sizes:
        numel = nbytes // 4
        local, decay = torch.randn(numel), torch.rand(numel)
        for pieces in pieces_list:
            waits = []
            for _ in range(repeats):
                dist.barrier()
                with stats.track() as st:
                    scan = StateScan(numel, dtype=torch.float32, device=local.device, group=None, rank=rank,
                                     world=world, peer=layout.peer, reverse=False, pieces=pieces, op="chain")
                    scan.run(decay, local)
                    scan.finish()
                waits.append(st.wait_seconds("chain"))
            out[(nbytes, pieces)] = statistics.median(waits)
    return out


def main():
    from seqpar.testing import LocalWorld

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=float, nargs="+", default=[0.0625, 4, 64])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--pieces", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default="bench/out/linear_chain.json")
    args = parser.parse_args()
    sizes = [int(s * 1024 * 1024) for s in args.sizes_mib]
    results = {}
    for world_size in args.world_sizes:
        world = LocalWorld(world_size, threads_per_rank=1)
        try:
            results[world_size] = world.run(_on_rank, sizes, args.pieces, args.repeats, timeout=3600)[-1]
        finally:
            world.close()
    # alpha, beta from the one-piece P=2 waits of the two smallest sizes
    base = results.get(2)
    alpha = beta = None
    if base and len(sizes) >= 2:
        (s0, s1) = sorted(sizes)[:2]
        beta = (base[(s1, 1)] - base[(s0, 1)]) / (s1 - s0)
        alpha = max(base[(s0, 1)] - beta * s0, 0.0)
    rows = []
    print(f"the chain alone, {os.cpu_count()} cores, 1 thread per rank; alpha={alpha and alpha * 1e3:.3f} ms, "
          f"beta={beta and 1 / beta / 1e9:.2f} GB/s (fit on P=2, 1 piece)\n")
    print("| state | P | pieces | last rank's wait (ms) | model (ms) | vs P=2, same pieces |")
    print("|---|---|---|---|---|---|")
    for nbytes in sizes:
        for world_size in args.world_sizes:
            for pieces in args.pieces:
                wait = results[world_size][(nbytes, pieces)]
                model = None if alpha is None else (world_size - 2 + pieces) * (alpha + beta * nbytes / pieces)
                ref = results.get(2, {}).get((nbytes, pieces))
                rows.append({"state_bytes": nbytes, "world_size": world_size, "pieces": pieces, "wait_s": wait,
                             "model_s": model, "vs_p2": wait / ref if ref else None})
                print(f"| {nbytes / 2**20:g} MiB | {world_size} | {pieces} | {wait * 1e3:.3f} | "
                      f"{'-' if model is None else f'{model * 1e3:.3f}'} | "
                      f"{'-' if not ref else f'{wait / ref:.2f}x'} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"alpha_s": alpha, "beta_s_per_byte": beta, "rows": rows,
                                           "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                           "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    main()
