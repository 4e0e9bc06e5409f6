"""Star attention, phase 1: its error against dense causal attention by anchor length and
P, its time against ring attention on the same problem, and greedy-decoding divergence.

    python bench/star_accuracy.py            # writes bench/results/DATE-cpu2-star.json
    python bench/star_accuracy.py --quick    # small sizes, a smoke run

Data with local structure: a slowly varying process `z_t` (AR(1), correlation
`rho^|t-s|`, rho = 0.98) drives both queries and keys, so a query's largest logits are
its recent neighbours: about `local_logit` = 12 for itself, decaying with distance, while
far tokens' logits are ~N(0, (12 / sqrt(D - 1))^2). The first `sinks` = 4 tokens are
global: one reserved dimension gives them a logit of `sink_logit` = 10 from every query,
the attention-sink pattern of trained LMs. Then a query's attention mass is about 70% on
its last 16 tokens, 76% on its last 64, 23% on the sinks and 1% elsewhere (N = 4096).
Values are N(0, 1). Errors are of the fp32 output against float64 dense causal attention.

Timing: forward only (inference), gloo ranks with one thread each, contestants
interleaved round by round (1 warm-up, then `--rounds`), median over rounds of the
slowest rank. Bytes are counted by `seqpar.comm.track()` (per rank, the busiest rank).
Decoding: `seqpar.star_generate` on `seqpar.testing.tiny_lm` (random weights) against
dense greedy decoding.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing

import seqpar  # noqa: E402
from seqpar.kernels.reference import dense_attention  # noqa: E402
from seqpar.layout import SeqLayout, split_sizes  # noqa: E402
from seqpar.testing import close_all, tiny_lm, world  # noqa: E402


def local_structure(seq_len, heads, head_dim, seed, rho=0.98, local_logit=12.0, sinks=4, sink_logit=10.0):
    """q, k, v `[1, N, H, D]` fp32 (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    d = head_dim - 1  # dimension 0 carries the sink channel
    noise = torch.randn(seq_len, heads, d, generator=gen, dtype=torch.float64)
    z = torch.empty_like(noise)
    z[0] = noise[0]
    for t in range(1, seq_len):
        z[t] = rho * z[t - 1] + math.sqrt(1 - rho * rho) * noise[t]
    # q.k / sqrt(D) ~ s^2 |z|^2 / sqrt(D) ~ s^2 d / sqrt(D) for neighbours
    s = math.sqrt(local_logit * math.sqrt(head_dim) / d)
    q = torch.zeros(seq_len, heads, head_dim, dtype=torch.float64)
    k = torch.zeros_like(q)
    q[..., 1:] = s * z + 0.1 * torch.randn(seq_len, heads, d, generator=gen, dtype=torch.float64)
    k[..., 1:] = s * z + 0.1 * torch.randn(seq_len, heads, d, generator=gen, dtype=torch.float64)
    q[..., 0] = math.sqrt(head_dim)
    k[:sinks, :, 0] = sink_logit
    v = torch.randn(seq_len, heads, head_dim, generator=gen, dtype=torch.float64)
    return tuple(t[None].float() for t in (q, k, v))


def dense_reference(q, k, v, chunk=512):
    """float64 dense causal attention, in row chunks (bounded memory)."""
    n = q.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        out[:, r0:r1] = dense_attention(q[:, r0:r1].double(), k[:, :r1].double(), v[:, :r1].double(), causal=True,
                                        q_positions=torch.arange(r0, r1), k_positions=torch.arange(r1))
    return out


# -- on the ranks ---------------------------------------------------------------------


def _phase1_outputs(data_args, anchors):
    """This rank's phase-1 output for each anchor length, and ring's (exact) output."""
    q, k, v = local_structure(*data_args)
    layout = SeqLayout(q.shape[1])
    ql, kl, vl = (layout.shard(t) for t in (q, k, v))
    with torch.no_grad():
        outs = {a: seqpar.star_attention(ql, kl, vl, layout=layout, anchor_len=a) for a in anchors}
        outs["ring"] = seqpar.ring_attention(ql, kl, vl, layout=layout, causal=True)
    return outs


def _timings(data_args, anchors, rounds):
    import torch.distributed as dist

    q, k, v = local_structure(*data_args)
    contiguous, zigzag = SeqLayout(q.shape[1]), SeqLayout(q.shape[1], scheme="zigzag")
    qc, kc, vc = (contiguous.shard(t).contiguous() for t in (q, k, v))
    qz, kz, vz = (zigzag.shard(t).contiguous() for t in (q, k, v))
    contestants = {
        "ring (contiguous)": lambda: seqpar.ring_attention(qc, kc, vc, layout=contiguous, causal=True),
        "ring (zigzag)": lambda: seqpar.ring_attention(qz, kz, vz, layout=zigzag, causal=True),
    }
    for a in anchors:
        contestants[f"star (anchor {a})"] = partial(seqpar.star_attention, qc, kc, vc, layout=contiguous,
                                                    anchor_len=a)
    times = {name: [] for name in contestants}
    sent = {}
    with torch.no_grad():
        for round_ in range(1 + rounds):
            for name, fn in contestants.items():
                dist.barrier()
                start = time.perf_counter()
                with seqpar.comm.track() as stats:
                    fn()
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
                if round_:
                    times[name].append(elapsed.item())
                sent[name] = sum(op["bytes_sent"] for key, op in stats.as_dict().items() if key != "check")
    return {"times": times, "bytes_sent": sent}


def _decode(seq_len, anchor_len, max_new_tokens, batch, seed):
    layout = SeqLayout(seq_len)
    weights = tiny_lm.init_weights(tiny_lm.TinyLMConfig(), seed)
    prompt = tiny_lm.random_prompt(tiny_lm.TinyLMConfig(), batch, seq_len, seed)
    anchor = layout.local_len_of(0) if anchor_len is None else anchor_len
    tokens, logits = seqpar.star_generate(partial(tiny_lm.forward, weights), layout.shard(prompt, dim=1),
                                          layout=layout, anchor_len=anchor, max_new_tokens=max_new_tokens,
                                          return_logits=True)
    dense = tiny_lm.reference_greedy(weights, prompt, max_new_tokens)
    return dict(tiny_lm.divergence(tokens, logits, *dense), anchor_len=anchor)


# -- driver ---------------------------------------------------------------------------


def accuracy(args):
    rows = []
    data_args = (args.acc_len, args.heads, args.head_dim, args.seed)
    q, k, v = local_structure(*data_args)
    ref = dense_reference(q, k, v)
    top = ref.abs().max().item()
    for p in args.acc_worlds:
        n0 = split_sizes(args.acc_len, p)[0]
        anchors = sorted({a for a in (0, 1, 4, 16, 64, 256, n0 // 4, n0 // 2, n0) if a <= n0})
        per_rank = world(p).run(_phase1_outputs, data_args, anchors, timeout=1800)
        for a in anchors + ["ring"]:
            out = torch.cat([r[a] for r in per_rank], dim=1).double()
            row_err = (out - ref).norm(dim=-1) / ref.norm(dim=-1)  # [1, N, H]
            # where the error lives: by a query's distance from the start of its block
            # (ranks r > 0 only; rank 0 is exact)
            offset = torch.cat([torch.arange(n) for n in split_sizes(args.acc_len, p)])
            later = torch.arange(args.acc_len) >= n0
            by_offset = {f"{lo}-{hi - 1}": row_err[:, later & (offset >= lo) & (offset < hi)].mean().item()
                         for lo, hi in ((0, 16), (16, 64), (64, 256), (256, args.acc_len)) if lo < n0}
            rows.append({
                "P": p, "anchor_len": a, "block": n0,
                "max_abs_err_rel": (out - ref).abs().max().item() / top,
                "mean_row_rel_err": row_err.mean().item(),
                "max_row_rel_err": row_err.max().item(),
                "mean_row_rel_err_by_offset_in_block": by_offset,
            })
            print(f"accuracy P={p} anchor={a}: " + ", ".join(f"{key}={val:.2e}" for key, val in rows[-1].items()
                                                         if isinstance(val, float)) + f", by offset {by_offset}",
                  flush=True)
    close_all()  # free the largest world before timing
    return rows


def timing(args):
    rows = []
    data_args = (args.time_len, args.heads, args.head_dim, args.seed)
    for p in args.time_worlds:
        n0 = split_sizes(args.time_len, p)[0]
        anchors = [n0 // 8, n0 // 4, n0 // 2, n0]
        result = world(p).run(_timings, data_args, anchors, args.rounds, timeout=3600)[0]
        for name, times in result["times"].items():
            rows.append({"P": p, "contestant": name, "median_s": statistics.median(times), "rounds_s": times,
                         "bytes_sent_rank0": result["bytes_sent"][name]})
            print(f"timing P={p} {name}: {rows[-1]['median_s']:.3f} s", flush=True)
    return rows


def decoding(args):
    rows = []
    for p, anchor in ((2, None), (4, 0), (4, 8), (4, None)):
        res = world(p).run(_decode, args.dec_len, anchor, args.dec_tokens, 4, args.seed, timeout=1800)[0]
        rows.append(dict(res, P=p, prompt_len=args.dec_len, new_tokens=args.dec_tokens))
        print(f"decoding P={p}: {rows[-1]}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.acc_len, args.acc_worlds = (1024, (2, 4)) if args.quick else (4096, (2, 4, 8))
    args.time_len, args.time_worlds = (2048, (2,)) if args.quick else (16384, (2, 4))
    args.dec_len, args.dec_tokens = (64, 8) if args.quick else (128, 32)
    started = time.time()
    load_before = os.getloadavg()
    result = {
        "what": "Star attention phase 1: error vs dense causal, time vs ring; tiny-LM decoding divergence",
        "machine": f"{os.cpu_count()}-core CPU VM, {platform.processor() or platform.machine()}, gloo",
        "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "data": {"heads": args.heads, "head_dim": args.head_dim, "rho": 0.98, "local_logit": 12.0, "sinks": 4,
                 "sink_logit": 10.0, "dtype": "float32", "batch": 1},
        "accuracy": {"seq_len": args.acc_len, "rows": accuracy(args)},
        "timing": {"seq_len": args.time_len, "threads_per_rank": 1, "rounds": args.rounds, "rows": timing(args)},
        "decoding": {"model": vars(tiny_lm.TinyLMConfig()), "batch": 4, "rows": decoding(args)},
    }
    result["load_average_before_after"] = [load_before, os.getloadavg()]
    result["wall_s"] = time.time() - started
    out = args.out or ROOT / "bench" / "results" / f"{datetime.date.today()}-cpu2-star{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
