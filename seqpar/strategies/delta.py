"""The gated delta rule across ranks: LASP-1 ring, LASP-2 all-gather and the All-Scan.

Per head, `S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t`,
`o_t = scale q_t S_t` (the chunk form: `seqpar.kernels.delta`). A rank's tokens map the
incoming state affinely (`kernels.delta.chunk_forward(transition=True)` computes all of it
in one pass from zero):

    S_out(r) = A_r S_in(r) + S_loc(r),      o_t = o_loc_t + Q_eff_t S_in(r),

with `A_r` `[Dk, Dk]` per (batch, head), the product of the rank's transitions, and
`S_in(r) = S_out(r-1)`. So the ranks run a linear recurrence whose factor is a matrix:
the combine is `A x + b` instead of `a * x + b`. Its columns never mix, so the state travels
column after column (`[Dv, B, H, Dk]` flat) and the All-Scan cuts it into pieces of whole
columns: each piece is combined and sent on as soon as it arrives (`comm.scan.StateScan`).

Backward. With `dS_out(r) = dS_in(r+1)` (zero on the last rank):

    dS_in(r) = A_r^T dS_out(r) + b_r,       b_r = sum_t Q_eff_t^T dO_t,

the same recurrence in reverse with the transposed maps. Each rank recomputes its forward
from its saved `S_in` under autograd and takes the gradients of `<o, dO> + <S_out, dS_out>`
in q, k, v, beta and the decay: no per-token state is kept between forward and backward.
The recomputation runs while the all-gather's message travels; on the chain methods it
runs while this rank's dS_out is on its way, before it combines and relays.

Documents (`layout.cu_seqlens`): the state restarts at every document start. The pieces
between starts run from zero; only the tokens before the rank's first start see `S_in`
(`Q_eff` is 0 from there on) and a rank holding a start has `A_r = 0`: nothing passes
through it, and its backward passes back only `b_r` (0 when the rank's first token starts a
document). The messages still run, so the volumes below hold.

Bytes a rank sends, `S = B H Dk Dv` and `T = B H Dk Dk` states (fp32; fp64 for fp64 inputs):

| method    | forward             | backward            | last rank's wait (critical path) |
|-----------|---------------------|---------------------|----------------------------------|
| ring      | S (all but the last)| S (all but the first)| (P-1)(alpha + beta S), after the local pass |
| allscan   | S in `scan_pieces`  | the same, reversed  | (P-2+K)(alpha + beta S/K) after it |
| allgather | (P-1)(S + T)        | (P-1) S             | one all-gather after the local pass (the forward cannot overlap it: A and S_loc come out of that pass); the backward's overlaps the recomputation |

The transition `T` moves only in the all-gather (every rank folds the prefix itself); the
ring and the All-Scan keep it home and apply it to what arrives.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

from ..call import collective_call, grad_wanted, group_of, layout_for, no_seq
from ..comm import collectives
from ..comm.scan import StateScan
from ..kernels import delta as delta_kernels
from ..kernels.linear import acc_dtype, state_bytes
from ..layout import SeqLayout, group_rank_and_size
from . import linear as _linear
from .linear import DECAY_FLOOR, METHODS, OPTIONS, _segments, _timed_wait, default_scan_pieces, document_starts

BACKENDS = ("auto", "torch", "triton")


def analytic_bytes(layout: SeqLayout, batch: int, heads: int, dk: int, dv: int, *, method: str,
                   dtype: torch.dtype = torch.float32) -> Dict[str, int]:
    """Bytes this rank sends in the forward and the backward of `method` (the table above)."""
    rank, world = layout.rank, layout.world_size
    s, t = state_bytes(batch, heads, dk, dv, dtype), state_bytes(batch, heads, dk, dk, dtype)
    if world == 1:
        return {"forward": 0, "backward": 0}
    if method == "allgather":
        return {"forward": (world - 1) * (s + t), "backward": (world - 1) * s}
    return {"forward": s if rank < world - 1 else 0, "backward": s if rank > 0 else 0}


# -- the state column after column ---------------------------------------------------------


def _columns(x: torch.Tensor) -> torch.Tensor:
    """`[B, H, Dk, W]` -> flat `[W, B, H, Dk]`: a piece of whole columns is contiguous."""
    return x.permute(3, 0, 1, 2).reshape(-1)


def _from_columns(flat: torch.Tensor, shape) -> torch.Tensor:
    b, h, dk, w = shape
    return flat.view(w, b, h, dk).permute(1, 2, 3, 0)


def _combine(a: Optional[torch.Tensor], transpose: bool):
    """`out = A x + b` (`A^T x + b`) on a piece of whole columns, as `StateScan.run`'s combine
    function. Here `a=None` is `A = 0` (nothing of the incoming state passes the rank), unlike
    `StateScan.run(None, b)`, where None is the identity."""
    if a is None:
        def zero(lo, hi, incoming, b, out):
            out.copy_(b)

        return zero
    b_, h, dk, _ = a.shape
    mats = a.reshape(b_ * h, dk, dk)
    equation = "zji,mzj->mzi" if transpose else "zij,mzj->mzi"

    def affine(lo, hi, incoming, b, out):
        x = incoming.view(-1, b_ * h, dk)
        torch.add(b.view_as(x), torch.einsum(equation, mats, x), out=out.view_as(x))

    return affine


def _fold(states: Sequence[torch.Tensor], maps: Sequence[Optional[torch.Tensor]], order, transpose: bool):
    """`x = A_j x + b_j` over `order` (`A_j` None: 0); zeros when `order` is empty."""
    x = torch.zeros_like(states[0])
    for j in order:
        a = maps[j]
        if a is None:
            x = states[j].clone()
        else:
            x = states[j] + (a.transpose(-1, -2) if transpose else a) @ x
    return x


# -- one rank's pieces ---------------------------------------------------------------------


def _local_forward(q, k, v, beta, g, scale, chunk, segments, takes_in: bool, backend: str):
    """The rank's block from zero: `(o_loc, S_loc, Q_eff, A)`; Q_eff and A None when no
    incoming state reaches the block (the first rank, or a document starts on its first token)."""
    outs, q_eff, a, state = [], None, None, None
    for i, (lo, hi) in enumerate(segments):
        args = (q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], beta[:, lo:hi], None if g is None else g[:, lo:hi])
        if i == 0 and takes_in:
            out, state, q_eff, a = delta_kernels.chunk_forward(*args, scale, chunk, transition=True, backend=backend)
        else:
            out, state = delta_kernels.chunk_forward(*args, scale, chunk, backend=backend)
        outs.append(out)
    if q_eff is not None and len(segments) > 1:  # tokens after the first start see nothing of S_in
        q_eff = torch.cat([q_eff, q_eff.new_zeros(q.shape[0], q.shape[1] - q_eff.shape[1], *q_eff.shape[2:])], 1)
        a = None  # a document starts on the rank: nothing of S_in reaches S_out
    return torch.cat(outs, 1) if len(outs) > 1 else outs[0], state, q_eff, a


def _recompute(q, k, v, beta, g, scale, chunk, segments, s_in, backend: str):
    """The rank's forward from `s_in` (None: zero) into its first piece: `(o, S_out)`."""
    outs, state = [], None
    for i, (lo, hi) in enumerate(segments):
        out, state = delta_kernels.chunk_forward(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], beta[:, lo:hi],
                                                 None if g is None else g[:, lo:hi], scale, chunk,
                                                 initial=s_in if i == 0 else None, backend=backend)
        outs.append(out)
    return (torch.cat(outs, 1) if len(outs) > 1 else outs[0]), state


class DeltaAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, layout, scale, method, chunk_size, pieces, backend):
        acc = acc_dtype(q.dtype)
        world, rank = layout.world_size, layout.rank
        starts = document_starts(layout)
        segments = _segments(q.shape[1], starts)
        takes_in = rank > 0 and (not starts or starts[0] > 0)
        b, _, h, dk = q.shape
        shape = (b, h, dk, v.shape[-1])
        op = f"delta.{method}.forward.state"
        scan = None
        if world > 1 and method != "allgather":  # receives posted: S_in travels during the local pass
            scan = StateScan(math.prod(shape), dtype=acc, device=q.device, group=layout.group, rank=rank,
                             world=world, peer=layout.peer, reverse=False, pieces=pieces, op=op, unit=b * h * dk)
        out, s_loc, q_eff, a = _local_forward(q, k, v, beta, g, scale, chunk_size, segments, takes_in, backend)
        maps = None
        if world == 1:
            s_in = None
        elif scan is not None:
            x_in, _ = scan.run(_combine(a, False), _columns(s_loc))
            scan.finish()
            s_in = _from_columns(x_in, shape)
        else:
            payload = torch.cat([s_loc.reshape(-1), (torch.zeros(b, h, dk, dk, dtype=acc, device=q.device)
                                                    if a is None else a).reshape(-1)])
            handle, buffers = collectives.all_gather_uneven_async(payload, [payload.numel()] * world,
                                                                  layout.group, op)
            _timed_wait(handle, op)
            split = s_loc.numel()
            states = [buf[:split].view(shape) for buf in buffers]
            maps = [buf[split:].view(b, h, dk, dk) for buf in buffers]
            s_in = _fold(states, maps, range(rank), False)
            # the backward folds the later ranks' maps, transposed: copies, not views of the
            # gathered buffers (which hold every rank's state too)
            maps = [m.clone() for m in maps[rank + 1:]]
        if takes_in:
            out = out + torch.einsum("bnhk,bhkv->bnhv", q_eff, s_in)
        else:
            q_eff = s_in = None
        ctx.save_for_backward(q, k, v, beta, g, s_in, q_eff, a)
        ctx.args = (layout, scale, method, chunk_size, pieces, segments, maps, backend)
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, beta, g, s_in, q_eff, a = ctx.saved_tensors
        layout, scale, method, chunk_size, pieces, segments, maps, backend = ctx.args
        acc = acc_dtype(q.dtype)
        world, rank = layout.world_size, layout.rank
        b, _, h, dk = q.shape
        shape = (b, h, dk, v.shape[-1])
        do = do.to(acc)
        # b_r: what this rank's outputs ask of its incoming state
        local = torch.zeros(shape, dtype=acc, device=q.device) if q_eff is None else \
            torch.einsum("bnhk,bnhv->bhkv", q_eff, do)
        op = f"delta.{method}.backward.state"
        inputs = (q, k, v, beta, g)
        wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
        leaves = [t.detach().requires_grad_(i in wanted) if t is not None else None for i, t in enumerate(inputs)]

        def intra():
            with torch.enable_grad():
                return _recompute(*leaves, scale, chunk_size, segments, s_in, backend)

        ds_out = None
        if world == 1:
            out, s_out = intra()
        elif method != "allgather":
            scan = StateScan(math.prod(shape), dtype=acc, device=q.device, group=layout.group, rank=rank,
                             world=world, peer=layout.peer, reverse=True, pieces=pieces, op=op, unit=b * h * dk)
            out, s_out = intra()  # the recomputation overlaps dS_out's way back
            x_in, _ = scan.run(_combine(a, True), _columns(local))
            scan.finish()
            ds_out = _from_columns(x_in, shape) if rank < world - 1 else None
        else:
            flat = local.reshape(-1)
            handle, buffers = collectives.all_gather_uneven_async(flat, [flat.numel()] * world, layout.group, op)
            out, s_out = intra()
            _timed_wait(handle, op)
            later = [buf.view(shape) for buf in buffers[rank + 1:]]
            ds_out = _fold(later, maps, range(len(later) - 1, -1, -1), True) if later else None
        outputs, grads = [out], [do]
        if ds_out is not None:
            outputs.append(s_out)
            grads.append(ds_out)
        found = torch.autograd.grad(outputs, [leaves[i] for i in wanted], grads, allow_unused=True)
        result: List[Optional[torch.Tensor]] = [None] * 5
        for i, grad in zip(wanted, found):
            result[i] = (torch.zeros_like(inputs[i]) if grad is None else grad).to(inputs[i].dtype)
        return (*result, None, None, None, None, None, None)


# -- the public function -------------------------------------------------------------------


def _check(q, k, v, beta, decay, layout, scale, method, backend, options):
    _linear._check(q, k, v, None, layout, scale, method, options, what="delta attention")
    b, n, h, dk = q.shape
    if not isinstance(beta, torch.Tensor):
        raise TypeError(f"beta: expected a torch.Tensor [batch, seqlen, heads], got {type(beta).__name__}")
    if tuple(beta.shape) != (b, n, h):
        raise ValueError(f"beta: expected shape [{b}, {n}, {h}] (batch, local seqlen and heads of q), "
                         f"got {tuple(beta.shape)}")
    if not beta.is_floating_point():
        raise ValueError(f"beta: expected a floating-point tensor, got {beta.dtype}")
    if beta.device != q.device:
        raise ValueError(f"beta: expected device {q.device} (that of q), got {beta.device}")
    if decay is not None:
        hint = " (a gate per key channel is linear_attention's, not the delta rule's)" \
            if isinstance(decay, torch.Tensor) and tuple(decay.shape) == (b, n, h, dk) else ""
        _linear.check_decay(decay, q, ((h,), (b, n, h)),
                            f"[{h}] (per head) or [{b}, {n}, {h}] (per token: batch, local seqlen, heads)", hint)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def _triton_unavailable(q, chunk: int = 0) -> Optional[str]:
    if q.dtype == torch.float64:
        return "backend 'triton' runs the fp32 chunk form (float16, bfloat16, float32 inputs), got float64"
    try:
        from ..kernels.triton import delta as triton_delta
    except Exception as exc:  # ImportError, or a triton build that does not load here
        return f"backend 'triton' needs triton, which does not import ({type(exc).__name__}: {exc})"
    chunk = min(chunk, q.shape[1]) if q.dim() == 4 else chunk
    reason = triton_delta.unavailable(q.device, torch.float32, q.shape[-1] if q.dim() == 4 else 0, chunk)
    return None if reason is None else f"backend 'triton': {reason}"


def _resolve_backend(backend: str, q, chunk: int) -> str:
    """"torch", or "triton" (asked for and available; "auto": on CUDA when available)."""
    if backend == "torch":
        return "torch"
    reason = _triton_unavailable(q, chunk)
    if backend == "triton":
        if reason is not None:
            raise ValueError(f"backend: {reason} (backend='torch' serves every case)")
        return "triton"
    return "triton" if reason is None and q.device.type == "cuda" else "torch"


# a graph break under torch.compile, run eagerly, as every softmax strategy (registry.run)
@torch.compiler.disable
def delta_attention(q, k, v, beta, *, layout=None, decay=None, scale=None, method="auto", backend="auto", **options):
    """The gated delta rule (DeltaNet, Gated DeltaNet) over a sequence split contiguously.

    Per head, from a zero state at global position 0:
    `S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t`, `o_t = scale q_t S_t`
    (`k_t` a row vector; the caller normalises k, e.g. L2, as the models do).

    - `q`, `k` `[B, S/P, H, Dk]`, `v` `[B, S/P, H, Dv]`, `beta` `[B, S/P, H]`: this rank's
      tokens of `layout` (scheme "contiguous", documents allowed: the state restarts at every
      document start; default: equal lengths on the default group). Returns `o`
      `[B, S/P, H, Dv]` in the dtype of v.
    - `decay`: log decay `g <= 0`: None, `[H]` (per head) or `[B, S/P, H]` (per token);
      values below -60 act as -60. Differentiable, as are q, k, v and beta; a per-head
      decay's gradient on each rank is that rank's share (sum it over the group, as for
      any parameter replicated across the ranks).
    - `scale`: default `Dk ** -0.5`. `method`: "ring" (LASP-1), "allgather" (LASP-2),
      "allscan" (the All-Scan, the state pipelined in pieces of whole columns) or "auto"
      (`seqpar.plan_linear(..., rule="delta")` on this group's topology). `backend`: "torch",
      "triton" (the loop over chunks as one Triton kernel each way; the solve and the scores
      stay in torch) or "auto" (triton on CUDA when it loads, else torch). fp32 states
      (fp64 for fp64 inputs, torch only).
    - options: `chunk_size` (default 64), `scan_pieces` (allscan).

    Bytes and critical paths: the module docstring of `seqpar.strategies.delta`.
    """
    group = group_of(layout)
    _, world = group_rank_and_size(group)
    chunk_size = options.get("chunk_size") or delta_kernels.DEFAULT_CHUNK

    def check():
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q: expected a torch.Tensor, got {type(q).__name__}")
        local = layout_for(layout, q, group)
        _check(q, k, v, beta, decay, local, scale, method, backend, options)
        concrete = _resolve_backend(backend, q, chunk_size)
        nbytes = state_bytes(q.shape[0], q.shape[2], q.shape[3], v.shape[3], q.dtype)
        chosen, auto_choice = method, None
        pieces = options.get("scan_pieces") or default_scan_pieces(world, nbytes) if method == "allscan" else 1
        if method == "auto" and world > 1:
            from ..planner.model import choose_linear

            chosen, planned = choose_linear(local, q.shape[0], q.shape[2], q.shape[3], v.shape[3], q.dtype,
                                            decay is not None, grad_wanted(q, k, v, beta, decay), chunk_size,
                                            q.device, rule="delta")
            pieces = options.get("scan_pieces") or planned
            auto_choice = (chosen, pieces)
        elif method == "auto":
            chosen = "ring"  # one rank: nothing crosses ranks
        return local, chosen, pieces, auto_choice, concrete

    def signature(r):
        local = layout if r is None else r[0]
        fields = _linear._signature(q, k, v, decay, local, scale, method, backend, options, r and r[3], r and r[4])
        return fields + (("beta [batch, heads], dtype, device", no_seq(beta)),
                         ("gradients required (q, k, v, beta or decay)", grad_wanted(q, k, v, beta, decay)))

    layout, chosen, pieces, _, concrete = collective_call(group, "seqpar.delta_attention", check, signature)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = None
    if decay is not None:
        g = decay.to(acc).clamp(min=-DECAY_FLOOR)  # as in linear_attention: keeps -inf out of the sums
        if g.dim() == 1:
            g = g.view(1, 1, -1).expand(q.shape[0], q.shape[1], -1)
    return DeltaAttention.apply(q, k, v, beta, g, layout, scale, chosen, chunk_size, pieces, concrete)
