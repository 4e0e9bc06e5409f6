"""fp32 accuracy of seqpar's chunked linear-attention and delta-rule kernels against
flash-linear-attention's own PyTorch references, both against float64, on the same inputs.

    python bench/linear_precision.py --fla PATH [--seq-lens 1024 4096 16384] [--seeds 2]

PATH is the root of an unpacked `fla-core` wheel (the directory holding `fla/`): the script
loads only fla's pure-PyTorch reference files (`ops/simple_gla/naive.py`,
`ops/gla/naive.py`, `ops/gated_delta_rule/naive.py`), which run on a CPU, and never imports
the `fla` package itself (its kernels need a GPU). fla is not a dependency of seqpar.

Forms: linear attention with a decay per head and per token (fla: `naive_chunk_simple_gla`,
fp32 chunks of 64), a gate per key channel (GLA; fla has no CPU chunked reference, so its
fp32 recurrence `naive_recurrent_gla`), and the gated delta rule with no decay, per head and
per token (fla: `naive_chunk_gated_delta_rule`). The float64 reference is seqpar's chunked
kernel in float64 (equal to the token-by-token float64 recurrence to ~1e-15 in the tests).
Errors are max-abs relative to the largest reference value; worst over seeds.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time

import torch

from seqpar.bench.linear import _SingleProcess
from seqpar.kernels import delta as delta_kernels


def _load(root: str, rel: str):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_"), os.path.join(root, "fla", rel))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(form, n, seed, strong=False, b=1, h=2, dk=16, dv=16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, dk, generator=gen, dtype=torch.float64)
    k = torch.randn(b, n, h, dk, generator=gen, dtype=torch.float64)
    k = torch.nn.functional.normalize(k, dim=-1) if form.startswith("delta") else k * dk ** -0.5
    v = torch.randn(b, n, h, dv, generator=gen, dtype=torch.float64)
    do = torch.randn(b, n, h, dv, generator=gen, dtype=torch.float64)
    beta = torch.rand(b, n, h, generator=gen, dtype=torch.float64)
    # decays as gated models learn them: exp(g) in [0.9, 1); `strong`: exp(g) uniform in
    # [1e-3, 1] (g down to -6.9). Per head: one per head
    def draw(*shape):
        u = torch.rand(*shape, generator=gen, dtype=torch.float64)
        return u.clamp_min(1e-3).log() if strong else u * -0.1

    if form.endswith("head"):
        g = draw(h).view(1, 1, h).expand(b, n, h).contiguous()
    elif form.endswith("channel"):
        g = draw(b, n, h, dk)
    elif form.endswith("none"):
        g = torch.zeros(b, n, h, dtype=torch.float64)
    else:
        g = draw(b, n, h)
    return q, k, v, do, beta, g


def _grads(fn, tensors, do, names):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return {"out": out.detach(), **{name: leaf.grad for name, leaf in zip(names, leaves)}}


def _ours(form, scale):
    if form.startswith("delta"):
        return (lambda q, k, v, beta, g: delta_kernels.chunk_forward(q, k, v, beta, g, scale, 64)[0].to(q.dtype)), True
    return (lambda q, k, v, g: _SingleProcess.apply(q, k, v, g, scale, 64)), False


def _theirs(form, fla, scale):
    if form.startswith("delta"):
        return (lambda q, k, v, beta, g: fla["delta"].naive_chunk_gated_delta_rule(
            q, k, v, g, beta, chunk_size=64, scale=scale)[0]), True
    if form.endswith("channel"):
        return (lambda q, k, v, g: fla["gla"].naive_recurrent_gla(q, k, v, g)[0]), False
    return (lambda q, k, v, g: fla["simple_gla"].naive_chunk_simple_gla(q, k, v, g, chunk_size=64, scale=scale)[0]), False


def _rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fla", required=True, help="root of an unpacked fla-core wheel (holds fla/)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--forms", nargs="+", default=["linear-head", "linear-token", "linear-channel",
                                                      "delta-none", "delta-head", "delta-token"])
    parser.add_argument("--strong", action="store_true", help="strong decays: exp(g) uniform in [1e-3, 1] "
                        "instead of [0.9, 1)")
    parser.add_argument("--json", default=None, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    fla = {"simple_gla": _load(args.fla, "ops/simple_gla/naive.py"), "gla": _load(args.fla, "ops/gla/naive.py"),
           "delta": _load(args.fla, "ops/gated_delta_rule/naive.py")}
    rows = []
    for form in args.forms:
        for n in args.seq_lens:
            worst = {}
            for seed in range(args.seeds):
                q, k, v, do, beta, g = _inputs(form, n, seed, args.strong)
                scale = q.shape[-1] ** -0.5
                ours, with_beta = _ours(form, scale)
                theirs, _ = _theirs(form, fla, scale)
                tensors = (q, k, v, beta, g) if with_beta else (q, k, v, g)
                names = ("dq", "dk", "dv", "dbeta", "dg") if with_beta else ("dq", "dk", "dv", "dg")
                if form.endswith("none"):  # no decay: no gradient to compare
                    tensors, names = tensors[:-1], names[:-1]
                    ours_fn, theirs_fn = ours, theirs
                    ours = lambda *t, f=ours_fn: f(*t, None)  # noqa: E731
                    theirs = lambda *t, f=theirs_fn, z=g: f(*t, z.to(t[0].dtype))  # noqa: E731
                ref = _grads(ours, tensors, do, names)
                for who, fn in (("seqpar", ours), ("fla", theirs)):
                    started = time.perf_counter()
                    got = _grads(fn, [t.float() for t in tensors], do, names)
                    for name in got:
                        key = (who, name)
                        worst[key] = max(worst.get(key, 0.0), _rel(got[name], ref[name]))
                    print(f"  {form} N={n} seed {seed} {who}: {time.perf_counter() - started:.1f} s", file=sys.stderr,
                          flush=True)
            row = {"form": form, "seq_len": n, "seqpar": {}, "fla": {}}
            for (who, name), err in worst.items():
                row[who][name] = err
            rows.append(row)
            print(f"{form:15s} N={n:6d} " + "  ".join(
                f"{name} {row['seqpar'][name]:.1e}/{row['fla'][name]:.1e}" for name in row["seqpar"]), flush=True)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seeds": args.seeds, "strong_decay": args.strong,
              "rows": rows,
              "note": "relative max error against float64, seqpar / fla, worst over seeds"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
