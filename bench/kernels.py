"""Single-GPU benchmark of seqpar's block kernels, the merge, and a one-GPU ring emulation.

    python bench/kernels.py                                 # CUDA, default problem
    python bench/kernels.py --dtype bfloat16 --seq-len 8192 --head-dim 128 --json out.json
    python bench/kernels.py --device cpu --tiny             # smoke test (Triton's interpreter)

Three tables:
1. Block kernel, forward and backward TFLOP/s: seqpar's Triton kernel (`backend="triton"`)
   and seqpar's `sdpa` block (PyTorch's flash op cut into square pieces) against PyTorch SDPA
   with the flash and cuDNN backends (`torch.nn.attention.sdpa_kernel`) and flash-attn's
   `flash_attn_func` when installed. FLOPs count only the visible (unmasked) score entries:
   forward 4 * B * H * D * visible, backward 2.5x that (five matmuls instead of two).
2. Merge GB/s: the fused Triton merge, the compiled CUDA merge (when `seqpar._C` is built)
   and the reference `merge_` against a device-to-device
   copy of the accumulator. Bytes = what the fused kernel must move: read out, part_out,
   lse, part_lse; write out, lse.
3. Ring emulation: the compute of a P-step zigzag causal ring, every rank's blocks and
   merges one after another on one GPU (no communication), against one dense causal call
   over the same N tokens: the cost of cutting attention into ring blocks.

Timing: CUDA events around each call, warm-up calls first, the median of the repeats, and
the L2 cache flushed (a buffer of 4x the L2, at least 256 MiB, overwritten) before every timed repeat. On cpu,
`time.perf_counter` (the smoke test only checks that everything runs).
A contestant that cannot run here is listed as skipped with its reason.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Timer:
    """Median seconds of `fn()` over `repeats` runs after `warmup` runs, L2 flushed before each.

    `samples` keeps the seconds of every timed repeat of the last call (for the spread)."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.cuda = device.type == "cuda"
        self.samples: List[float] = []
        self.flush_bytes = 0
        self.flush_buffer = None
        if self.cuda:
            # overwriting a buffer 4x the L2 (and at least 256 MiB; H100 50 MiB, H200 60 MiB) evicts the operands
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
            self.flush_bytes = max(256 << 20, 4 * l2)
            self.flush_buffer = torch.empty(self.flush_bytes, dtype=torch.int8, device=device)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.cuda:
                self.flush_buffer.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        self.samples = times
        return statistics.median(times)


def visible_pairs(nq: int, nk: int, offset: Optional[int]) -> int:
    """Score entries (query, key) that the mask leaves visible: key j <= i + offset."""
    if offset is None:
        return nq * nk
    return sum(min(nk, max(0, i + offset + 1)) for i in range(nq))


def _tensors(b, n, h, h_kv, d, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    return make(b, n, h, d), make(b, n, h_kv, d), make(b, n, h_kv, d), make(b, n, h, d)


def _sdpa_contestant(backend_name: str):
    """Forward / backward closures of PyTorch SDPA restricted to one of its backends."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]

    def make(q, k, v, do, scale, causal):
        qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
        gqa = q.shape[2] != k.shape[2]

        def fwd():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa)

        out = fwd()
        dot = do.transpose(1, 2)

        def bwd():
            return torch.autograd.grad(out, (qt, kt, vt), dot, retain_graph=True)

        return fwd, bwd

    return make


def _seqpar_contestant(backend: str):
    def make(q, k, v, do, scale, causal):
        from seqpar.kernels import block

        reason = block.unavailable_reason(backend, q.device, q.dtype, q.shape[-1], scale)
        if reason:
            raise RuntimeError(reason)
        fwd_fn, bwd_fn = block.kernels(backend, q, k)
        offset = 0 if causal else None
        out, lse = fwd_fn(q, k, v, scale, offset)
        out = out.to(q.dtype)
        return (lambda: fwd_fn(q, k, v, scale, offset)), (lambda: bwd_fn(do, q, k, v, out, lse, scale, offset))

    return make


def _flash_attn_contestant(q, k, v, do, scale, causal):
    from flash_attn import flash_attn_func

    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def fwd():
        return flash_attn_func(qg, kg, vg, softmax_scale=scale, causal=causal)

    out = fwd()
    return fwd, (lambda: torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True))


CONTESTANTS = {
    "seqpar triton": _seqpar_contestant("triton"),
    "seqpar sdpa block": _seqpar_contestant("sdpa"),
    "torch sdpa flash": _sdpa_contestant("flash"),
    "torch sdpa cudnn": _sdpa_contestant("cudnn"),
    "flash-attn": _flash_attn_contestant,
}


def bench_block(args, timer: Timer) -> List[Dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    q, k, v, do = _tensors(args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim, dtype, device)
    scale = args.head_dim ** -0.5
    rows = []
    for causal in (False, True):
        flops_fwd = 4 * args.batch * args.heads * args.head_dim * visible_pairs(args.seq_len, args.seq_len,
                                                                               0 if causal else None)
        for name, make in CONTESTANTS.items():
            row = {"table": "block", "contestant": name, "causal": causal}
            try:
                fwd, bwd = make(q, k, v, do, scale, causal)
                t_fwd, t_bwd = timer(fwd), timer(bwd)
                row.update(fwd_s=t_fwd, bwd_s=t_bwd, fwd_tflops=flops_fwd / t_fwd / 1e12,
                           bwd_tflops=2.5 * flops_fwd / t_bwd / 1e12)
            except Exception as exc:  # a contestant this machine cannot run is reported, not fatal
                row["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            rows.append(row)
    return rows


def bench_merge(args, timer: Timer) -> List[Dict]:
    from seqpar.kernels import block
    from seqpar.kernels.merge import merge_ as reference_merge

    device = torch.device(args.device)
    b, n, h, d = args.batch, args.seq_len, args.heads, args.head_dim
    gen = torch.Generator(device="cpu").manual_seed(1)
    out = torch.randn(b, n, h, d, generator=gen).to(device)
    part_out = torch.randn(b, n, h, d, generator=gen).to(device)
    lse = torch.randn(b, h, n, generator=gen, dtype=torch.float64).to(device)
    part_lse = torch.randn(b, h, n, generator=gen).to(device)
    moved = 3 * out.numel() * out.element_size() + 2 * lse.numel() * lse.element_size() + part_lse.numel() * 4
    copy_dst = torch.empty_like(out)
    t_copy = timer(lambda: copy_dst.copy_(out))
    rows = [{"table": "merge", "contestant": "device copy of out (read + write)", "s": t_copy,
             "gb_per_s": 2 * out.numel() * out.element_size() / t_copy / 1e9}]
    contestants = {"reference merge_ (torch ops)": reference_merge}
    for backend, name in (("triton", "fused triton merge"), ("cuda", "compiled cuda merge (seqpar._C)")):
        # the cuda backend's condition is stated for its 16-bit blocks; its merge takes fp32 accumulators
        reason = block.unavailable_reason(backend, device, torch.float32 if backend == "triton" else torch.bfloat16, d)
        if reason is None:
            contestants[name] = block.merge_kernel(backend)
        elif backend == "triton" or device.type == "cuda":
            rows.append({"table": "merge", "contestant": name, "skipped": reason})
    for name, fn in contestants.items():
        # the merge is in place: repeating it on the same tensors is what a ring does
        t = timer(lambda: fn(out, lse, part_out, part_lse))
        rows.append({"table": "merge", "contestant": name, "s": t, "gb_per_s": moved / t / 1e9})
    return rows


def bench_ring(args, timer: Timer) -> List[Dict]:
    """Every rank's forward of a P-step zigzag causal ring on one device, against one dense call."""
    import torch.nn.functional as F

    from seqpar.kernels import block
    from seqpar.layout import SeqLayout, visible_blocks
    from seqpar.strategies.common import attend_blocks

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    p, n = args.ring_size, args.seq_len
    q, k, v, _ = _tensors(args.batch, n, args.heads, args.kv_heads, args.head_dim, dtype, device, seed=2)
    scale = args.head_dim ** -0.5
    layouts = [SeqLayout.simulated(n, p, r, scheme="zigzag") for r in range(p)]
    positions = [layout.positions() for layout in layouts]
    shards = [(q[:, pos].contiguous(), k[:, pos].contiguous(), v[:, pos].contiguous()) for pos in positions]
    rows = []
    flops = 4 * args.batch * args.heads * args.head_dim * visible_pairs(n, n, 0)

    def reference():
        return F.scaled_dot_product_attention(
            q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2), is_causal=True,
            scale=scale, enable_gqa=args.heads != args.kv_heads).transpose(1, 2)

    try:
        dense = timer(lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale,
            enable_gqa=args.heads != args.kv_heads))
        rows.append({"table": "ring", "contestant": "dense causal sdpa", "s": dense, "tflops": flops / dense / 1e12})
    except Exception as exc:
        dense = None
        rows.append({"table": "ring", "contestant": "dense causal sdpa", "skipped": f"{type(exc).__name__}: {exc}"[:200]})
    for backend in ("triton", "sdpa"):
        name = f"ring emulation P={p}, backend={backend}"
        reason = block.unavailable_reason(backend, device, dtype, args.head_dim, scale)
        if reason:
            rows.append({"table": "ring", "contestant": name, "skipped": reason})
            continue
        fwd, _ = block.kernels(backend, q, k)
        merge = block.merge_kernel(backend)

        def ring_forward():
            outs = []
            for rank in range(p):
                rq = shards[rank][0]
                out = torch.empty(rq.shape, dtype=torch.float32, device=device)
                lse = torch.empty(rq.shape[0], rq.shape[2], rq.shape[1], dtype=torch.float64, device=device)
                fresh = True
                for step in range(p):
                    src = (rank - step) % p
                    fresh = attend_blocks(fwd, rq, shards[src][1], shards[src][2],
                                          visible_blocks(layouts[rank], rank, src, True), scale, out, lse,
                                          fresh=fresh, merge=merge)
                outs.append(out)
            return outs

        t = timer(ring_forward)
        row = {"table": "ring", "contestant": name, "s": t, "tflops": flops / t / 1e12}
        # the emulation must compute attention: its rows against one float32 dense call
        whole = torch.empty(q.shape, dtype=torch.float32, device=device)
        for pos, out in zip(positions, ring_forward()):
            whole[:, pos] = out
        row["max_rel_err_vs_fp32_dense"] = _rel_err(whole, reference())
        if dense:
            row["vs_dense"] = t / dense
        rows.append(row)
    return rows


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def _print(rows: List[Dict]) -> None:
    for row in rows:
        fields = ", ".join(f"{key}={val:.4g}" if isinstance(val, float) else f"{key}={val}"
                           for key, val in row.items() if key not in ("table", "contestant"))
        print(f"[{row['table']}] {row['contestant']}: {fields}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--ring-size", type=int, default=4, help="P of the ring emulation")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke problem (N=40, H=2, D=16, 1 repeat)")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim = 1, 40, 2, 1, 16
        args.ring_size, args.warmup, args.repeats = 2, 0, 1
    args.kv_heads = args.kv_heads or args.heads
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        # triton on cpu is its interpreter; it must be set before the kernels are imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    timer = Timer(device, args.warmup, args.repeats)
    rows = bench_block(args, timer) + bench_merge(args, timer) + bench_ring(args, timer)
    meta = {"table": "meta", "contestant": "problem", "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else "cpu", "torch": torch.__version__,
            **{key: val for key, val in vars(args).items() if key != "json"}}
    rows.insert(0, meta)
    _print(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
