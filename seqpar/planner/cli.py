"""`python -m seqpar plan`: print the plan table for a problem (no process group needed)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

from .model import plan
from .topology import DTYPE_NAMES, SCHEMES, default_topology, load_calibration


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m seqpar plan`: print the plan table for a problem (no process group needed)."""
    import argparse

    class Formatter(argparse.ArgumentDefaultsHelpFormatter):
        """Defaults in --help, except where there is none (None: the help says what applies)."""

        def _get_help_string(self, action):
            return action.help if action.default is None else super()._get_help_string(action)

    parser = argparse.ArgumentParser(prog="python -m seqpar plan", formatter_class=Formatter,
                                     description="Predict every strategy's time on a problem and show the choice.")
    parser.add_argument("--seq-len", type=int, required=True, help="global sequence length N (required)")
    parser.add_argument("--world-size", type=int, required=True, help="ranks P (required)")
    parser.add_argument("--heads", type=int, default=32, help="query heads H")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads H_kv (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension D")
    parser.add_argument("--batch", type=int, default=1, help="batch size B")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), default="bfloat16", help="inputs' dtype")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal attention")
    parser.add_argument("--training", action=argparse.BooleanOptionalAction, default=True,
                        help="forward + backward; --no-training plans the forward alone")
    parser.add_argument("--scheme", choices=SCHEMES, default="contiguous", help="sequence layout")
    parser.add_argument("--window", type=int, nargs=2, metavar=("LEFT", "RIGHT"), default=(-1, -1),
                        help="sliding window_size (left, right), -1 unbounded (default: none)")
    parser.add_argument("--cu-seqlens", metavar="FILE", default=None,
                        help="packed documents: a file of the boundaries 0, l1, l1+l2, ..., N (JSON list, or "
                             "integers separated by commas or whitespace)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="the default topology's device type (this machine's)")
    parser.add_argument("--calibration", default=None,
                        help="a calibration JSON file (from seqpar.calibrate; default: the device's defaults)")
    parser.add_argument("--ranks-per-node", type=int, default=None,
                        help="ranks per node (default: the topology's, LOCAL_WORLD_SIZE on CUDA)")
    parser.add_argument("--intra-bandwidth", type=float, default=None, help="GB/s a rank sends within a node (default: the topology's)")
    parser.add_argument("--intra-latency", type=float, default=None, help="microseconds per step within a node (default: the topology's)")
    parser.add_argument("--inter-bandwidth", type=float, default=None, help="GB/s a rank sends between nodes (default: the topology's)")
    parser.add_argument("--inter-latency", type=float, default=None, help="microseconds per step between nodes (default: the topology's)")
    parser.add_argument("--tflops", type=float, default=None, help="block kernel forward TFLOP/s, backward the same (default: the topology's)")
    parser.add_argument("--memory-gib", type=float, default=None, help="memory a rank may spend on attention, GiB (default: the topology's)")
    args = parser.parse_args(argv)
    if args.calibration:
        topo = load_calibration(Path(args.calibration))
        if topo is None:
            parser.error(f"--calibration: expected a readable calibration JSON file, got {args.calibration!r}")
    else:
        topo = default_topology(args.device, args.dtype, args.world_size, ranks_per_node=args.ranks_per_node)
    changes = {}
    if args.ranks_per_node is not None:
        changes["ranks_per_node"] = args.ranks_per_node
    for flag, key, unit in (("intra_bandwidth", "intra_bandwidth", 1e9), ("inter_bandwidth", "inter_bandwidth", 1e9),
                            ("intra_latency", "intra_latency", 1e-6), ("inter_latency", "inter_latency", 1e-6),
                            ("memory_gib", "memory_limit", 2 ** 30)):
        if getattr(args, flag) is not None:
            changes[key] = getattr(args, flag) * unit
    if args.tflops is not None:
        changes["compute_rate"] = changes["backward_rate"] = args.tflops * 1e12
    if changes:
        # measured per-kind links would override what the flags say: drop them
        changes.setdefault("measured", () if any(k.endswith(("bandwidth", "latency")) for k in changes)
                           else topo.measured)
        topo = topo.replace(source=topo.source + " with command-line changes", **changes)
    documents = None
    if args.cu_seqlens is not None:
        try:
            text = Path(args.cu_seqlens).read_text()
            documents = [int(x) for x in text.replace("[", " ").replace("]", " ").replace(",", " ").split()]
        except (OSError, ValueError) as exc:
            parser.error(f"--cu-seqlens: expected a file of integers, got {args.cu_seqlens!r} ({exc})")
    try:
        result = plan(args.seq_len, world_size=args.world_size, heads=args.heads, kv_heads=args.kv_heads,
                      head_dim=args.head_dim, dtype=args.dtype, causal=args.causal, training=args.training,
                      batch=args.batch, scheme=args.scheme, topology=topo, window_size=tuple(args.window),
                      cu_seqlens=documents)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    print(result)
    return 0
