"""Linear attention across ranks: LASP-1 ring, LASP-2 all-gather and the ZeCO All-Scan.

Causal linear attention carries a state `S` `[Dk, Dv]` per (batch, head) instead of a KV
cache. Rank r's tokens, started from zero, give outputs `o_loc` and a state `S_loc`; with
`G_t` the cumulative log decay of its tokens (fp64) and `a_r = exp(G_n)` its total decay,

    S_in(r)  = S_out(r-1),        S_out(r) = a_r S_in(r) + S_loc(r),
    o_t      = o_loc_t + scale exp(G_t) q_t S_in(r).

So ranks only pass states: a linear recurrence over ranks. The backward is the same
recurrence in reverse for the state gradients: with `b_r = scale sum_t exp(G_t) q_t^T dO_t`,
`dS_out(r) = dS_in(r+1)`, `dS_in(r) = a_r dS_out(r) + b_r`; then

    dq_t += scale exp(G_t) dO_t S_in^T,   dk_s += exp(G_n - G_s) v_s dS_out^T,
    dv_s += exp(G_n - G_s) k_s dS_out,    dg from `kernels.linear.decay_grad`.

Every factor is `exp(<= 0)`. States, decays and their products stay fp32 (fp64 inputs: fp64).

A gate per key channel (GLA, `decay` `[B, n, H, Dk]`) makes `G_t` and `a_r` vectors over Dk:
every product above by `exp(G)` or `a_r` is then elementwise over the rows of the state
(`S_out = diag(a_r) S_in + S_loc`) and the gradient of the decay is per channel.

Documents (`layout.cu_seqlens`): the state restarts from zero at every document start.
Within a rank the chunk kernels run on each piece between document starts from a zero
state (pieces share no term: no -inf enters an exponent, gradients stay finite); across
ranks, the incoming state reaches only the tokens before the rank's first document start,
the outgoing state holds only the tokens from its last one on, and a rank holding a start
has `a_r = 0`: what came before it stops there, and its backward passes back a zero
gradient (the messages still run, so the volumes below do not change).

The three methods differ only in how the recurrence crosses the ranks. With `S` the bytes
of one state (`4 B H Dk Dv`; fp64 inputs: 8), `g` = `4 B H` when a decay is given
(`4 B H Dk` for a gate per key channel), else 0,
`alpha` the latency of a message and `beta` the time per byte:

| method    | forward bytes sent per rank | backward | last rank's wait for S_in (critical path) |
|-----------|-----------------------------|----------|--------------------------------------------|
| ring      | S (every rank but the last) | S (every rank but the first) | (P-1)(alpha + beta S), after the intra-chunk work |
| allscan   | S in `scan_pieces` messages | the same, reversed | (P-2+K)(alpha + beta S/K), K = scan_pieces, after it |
| allgather | (P-1)(S + g)                | (P-1) S  | one all-gather, posted before the intra-chunk work, hidden behind it |

- ring (LASP-1, arXiv 2404.02882): receives are posted, the local intra-chunk work runs
  while the state travels, then each rank combines and passes its whole state on. The
  chain grows by one full state (and one combine) per hop.
- allscan (ZeCO, arXiv 2507.01004): the same schedule, but the scan is pipelined by
  `comm.scan.StateScan`: the state goes in K pieces, each combined and sent on as soon as
  it arrives, so the chain costs about one state plus one piece per hop. Both take the
  local state (forward) from the chunked pass itself, so they add no work to it.
- allgather (LASP-2, arXiv 2502.07563): each rank first computes its local state (one
  matmul), posts one all-gather of (state, total decay), computes its intra-chunk part
  meanwhile, then combines the prefix of the ranks before it locally. The backward
  all-gathers the state gradients `b_r` and combines the suffix. Bytes grow with P.

`measured` waits: `seqpar.comm.track()` records the seconds each rank spent blocked on
the incoming state (`stats.wait_seconds("linear.<method>.forward")`).
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Sequence

import torch

from ..call import check_qkv_types, collective_call, grad_wanted, group_of, layout_for, no_seq
from ..comm import collectives, deferred, stats
from ..comm.groups import describe
from ..comm.scan import StateScan
from ..errors import brief
from ..kernels import linear as linear_kernels
from ..kernels.linear import state_bytes
from ..layout import SeqLayout, documents_key, group_rank_and_size

METHODS = ("auto", "ring", "allgather", "allscan")
BACKENDS = ("auto", "torch", "triton")
OPTIONS = ("chunk_size", "scan_pieces")
DECAY_FLOOR = 60.0  # log decays below -DECAY_FLOOR act as -DECAY_FLOOR (see linear_attention)

# Message size at which latency and transfer time are equal (alpha / beta) in the default
# scan model; calibrated for loopback TCP and NVLink alike to within a factor of a few.
_HALF_SIZE_BYTES = 64 * 1024
# Below this many bytes gathered per rank, the all-gather hides behind the intra-chunk work.
_ALLGATHER_LIMIT_BYTES = 8 * 1024 * 1024


def default_scan_pieces(world: int, nbytes: int) -> int:
    """Pieces minimising `(P - 2 + K)(alpha + beta S / K)`: `K = sqrt((P - 2) S beta / alpha)`.
    One piece for P <= 2 (a single hop gains nothing from being cut)."""
    if world <= 2:
        return 1
    return max(1, min(64, round(math.sqrt((world - 2) * nbytes / _HALF_SIZE_BYTES))))


def choose_method(world: int, nbytes: int) -> str:
    """A rule of thumb without a topology: the all-gather while the states it gathers are
    small enough to hide behind the intra-chunk work (no chain at all), else the All-Scan
    (flat in P). Ring (LASP-1) is never faster than the All-Scan: it exists for comparison.
    `method="auto"` uses `seqpar.plan_linear` (the cost model on this group's topology)."""
    if (world - 1) * nbytes <= _ALLGATHER_LIMIT_BYTES:
        return "allgather"
    return "allscan"


def analytic_bytes(layout: SeqLayout, batch: int, heads: int, dk: int, dv: int, *, method: str,
                   decay, dtype: torch.dtype = torch.float32) -> Dict[str, int]:
    """Bytes this rank sends in the forward and the backward of `method` (see the table).

    `decay`: False or None (no decay), True (per head or per token: one total decay per
    (batch, head)) or "channel" (a gate per key channel: a `[Dk]` total per (batch, head)).
    Documents add no bytes: whether a rank restarts the state follows from the layout."""
    rank, world = layout.rank, layout.world_size
    s = state_bytes(batch, heads, dk, dv, dtype)
    if world == 1:
        return {"forward": 0, "backward": 0}
    if method == "allgather":
        width = dk if decay == "channel" else 1
        g = batch * heads * width * (8 if dtype == torch.float64 else 4) if decay else 0
        return {"forward": (world - 1) * (s + g), "backward": (world - 1) * s}
    return {"forward": s if rank < world - 1 else 0, "backward": s if rank > 0 else 0}


def document_starts(layout: SeqLayout, rank: Optional[int] = None) -> List[int]:
    """Local indices of the document starts on `rank` (default: this rank) of a contiguous
    layout: where the state restarts from zero. Empty without documents."""
    if layout.documents is None:
        return []
    rank = layout.rank if rank is None else rank
    runs = layout.runs(rank)
    if not runs:
        return []
    start, length = runs[0].start, layout.local_len_of(rank)
    return [d - start for d in layout.documents[:-1] if start <= d < start + length]


# -- one rank's pieces ---------------------------------------------------------------------


def _kernels(backend: str):
    if backend == "triton":
        from ..kernels.triton import linear as triton_linear

        return triton_linear.chunk_forward, triton_linear.chunk_backward
    return linear_kernels.chunk_forward, linear_kernels.chunk_backward


class _Decay:
    """Cumulative log decay of this rank's tokens and the factors built from it.

    `g`: None, `[B, n, H]` or `[B, n, H, Dk]` (per channel); `starts`: the local document
    starts (the state restarts there: the incoming state reaches only the tokens before the
    first, the outgoing state holds only the tokens from the last on, and the rank's total
    decay is 0). Factors are kept `[B, n, H, W]` with W = 1 or Dk."""

    def __init__(self, g: Optional[torch.Tensor], acc: torch.dtype, device: torch.device, shape,
                 starts: Sequence[int] = ()):
        self.given = g is not None  # a decay tensor (its totals travel, it has a gradient)
        self.active = self.given or bool(starts)  # factors other than 1
        self.channel = g is not None and g.dim() == 4
        self.device = device
        if not self.active:
            return
        if g is None:
            cum = torch.zeros(*shape[:3], 1, dtype=torch.float64, device=device)
        else:
            cum = g.double().cumsum(1)  # fp64: differences of long sums stay exact
            cum = cum if self.channel else cum[..., None]  # [B, n, H, W]
        total = cum[:, -1:]
        to_query = cum.exp()  # exp(G_t): an incoming state's weight at t
        to_end = (total - cum).exp()  # exp(G_n - G_s): token s in the outgoing state
        total = total[:, 0].exp()  # [B, H, W]
        if starts:
            to_query[:, starts[0]:] = 0
            to_end[:, :starts[-1]] = 0
            total = torch.zeros_like(total)
        self.to_query, self.to_end, self.total = to_query.to(acc), to_end.to(acc), total.to(acc)

    def state_factor(self, dk: int, dv: int) -> Optional[torch.Tensor]:
        """`a_r` broadcast over a flat state `[B*H*Dk*Dv]`, or None (1)."""
        if not self.active:
            return None
        b, h, _ = self.total.shape
        return self.total[..., None].expand(b, h, dk, dv).reshape(-1)

    def query(self, x):
        return x if not self.active else x * self.to_query

    def key(self, x):
        return x if not self.active else x * self.to_end


def _local_state(k, v, decay: _Decay, acc) -> torch.Tensor:
    """`S_loc = sum_s exp(G_n - G_s) k_s^T v_s` `[B, H, Dk, Dv]`: one matmul, no chunking."""
    return torch.einsum("bnhk,bnhv->bhkv", decay.key(k.to(acc)), v.to(acc))


def _query_state(q, x, decay: _Decay, scale: float, acc) -> torch.Tensor:
    """`scale exp(G_t) q_t x` for every local token `[B, n, H, Dv]`."""
    return torch.einsum("bnhk,bhkv->bnhv", decay.query(q.to(acc)), x) * scale


def _timed_wait(handle, op: str) -> None:
    if handle is None:
        return
    if stats.tracking():
        import time

        start = time.perf_counter()
        handle.wait()
        stats.record_wait(op, time.perf_counter() - start)
    else:
        handle.wait()


def _fold(values, factors, order):
    """x = a_j x + b_j over `order` (`factors[j]` a tensor, or a number); zeros when
    `order` is empty."""
    x = torch.zeros_like(values[0])
    for j in order:
        x = values[j] + (x if factors is None else factors[j] * x)
    return x


def _cross(layout: SeqLayout, method: str, phase: str, reverse: bool, pieces: int, shape, acc, decay: _Decay,
           local_fn, intra, gathered_totals=None):
    """Run `intra()` (the intra-chunk work) and carry the recurrence across the ranks by
    `method`. `local_fn(intra_result)` gives this rank's `b_r` `[B, H, Dk, Dv]` (the
    all-gather calls it before `intra`, with None, so that the gather overlaps it). Returns (intra's result, x_in, x_out, the
    totals of every rank: the all-gather's forward collects them for its backward)."""
    a = decay.state_factor(shape[-2], shape[-1])
    op = f"linear.{method}.{phase}.state"
    world, rank = layout.world_size, layout.rank
    if method == "allgather":
        flat = local_fn(None).reshape(-1)
        send_totals = decay.given and gathered_totals is None
        payload = torch.cat([flat, decay.total.reshape(-1)]) if send_totals else flat
        handle, buffers = collectives.all_gather_uneven_async(payload, [payload.numel()] * world, layout.group, op)
        result = intra()
        _timed_wait(handle, op)
        states = [buf[: flat.numel()] for buf in buffers]
        if send_totals:
            gathered_totals = [buf[flat.numel():].reshape(decay.total.shape) for buf in buffers]
        factors = None
        if decay.given:  # the totals of ranks that restart are 0 already
            factors = [t[..., None].expand(shape).reshape(-1) for t in gathered_totals]
        elif layout.documents is not None:  # no decay: 0 where a rank restarts, else 1
            factors = [0.0 if document_starts(layout, j) else 1.0 for j in range(world)]
        x_in = _fold(states, factors, range(world - 1, rank, -1) if reverse else range(rank))
        x_out = flat + (x_in if a is None else a * x_in)
        return result, x_in.reshape(shape), x_out.reshape(shape), gathered_totals
    scan = StateScan(math.prod(shape), dtype=acc, device=decay.device, group=layout.group, rank=rank, world=world,
                     peer=layout.peer, reverse=reverse, pieces=pieces, op=op)
    # receives are posted: the incoming state travels while the intra-chunk work runs
    result = intra()
    x_in, x_out = scan.run(a, local_fn(result).reshape(-1))
    scan.finish()
    return result, x_in.reshape(shape), x_out.reshape(shape), None


def _segments(n: int, starts: Sequence[int]):
    """The runs `[a, b)` of local tokens between document starts (the whole rank without)."""
    cuts = sorted({0, n, *starts})
    return list(zip(cuts[:-1], cuts[1:]))


def _split_forward(fwd, q, k, v, g, scale, chunk_size, segments):
    """`fwd` on each document piece from a zero state: outputs joined, the last piece's state."""
    if len(segments) == 1:
        return fwd(q, k, v, g, scale, chunk_size)
    outs = []
    for a, b in segments:
        out, state = fwd(q[:, a:b], k[:, a:b], v[:, a:b], None if g is None else g[:, a:b], scale, chunk_size)
        outs.append(out)
    return torch.cat(outs, 1), state


def _split_backward(bwd, do, q, k, v, g, scale, chunk_size, segments):
    """`bwd` on each document piece: the pieces share no term, their gradients are joined."""
    if len(segments) == 1:
        return bwd(do, q, k, v, g, scale, chunk_size)
    parts = [bwd(do[:, a:b], q[:, a:b], k[:, a:b], v[:, a:b], None if g is None else g[:, a:b], scale, chunk_size)
             for a, b in segments]
    return tuple(None if part[0] is None else torch.cat(part, 1) for part in zip(*parts))


class LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, layout, scale, method, backend, chunk_size, pieces):
        fwd, _ = _kernels(backend)
        acc = linear_kernels.acc_dtype(q.dtype)
        starts = document_starts(layout)
        segments = _segments(q.shape[1], starts)
        decay = _Decay(g, acc, q.device, q.shape, starts)
        g_kernel = None if g is None else g.to(acc)

        def intra():
            return _split_forward(fwd, q, k, v, g_kernel, scale, chunk_size, segments)

        shape = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])

        def local_fn(result):  # ring and allscan take the local state from the chunked pass
            return result[1] if result is not None else _local_state(k, v, decay, acc)

        (out, _), s_in, _, totals = _cross(layout, method, "forward", False, pieces, shape, acc, decay,
                                           local_fn, intra)
        if layout.rank > 0 and (not starts or starts[0] > 0):
            out += _query_state(q, s_in, decay, scale, acc)
        ctx.save_for_backward(q, k, v, g, s_in)
        ctx.args = (layout, scale, method, backend, chunk_size, pieces, totals, starts, segments)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, s_in = ctx.saved_tensors
        layout, scale, method, backend, chunk_size, pieces, totals, starts, segments = ctx.args
        _, bwd = _kernels(backend)
        acc = linear_kernels.acc_dtype(q.dtype)
        decay = _Decay(g, acc, q.device, q.shape, starts)
        g_kernel = None if g is None else g.to(acc)
        do = do.contiguous()

        def intra():
            return _split_backward(bwd, do, q, k, v, g_kernel, scale, chunk_size, segments)

        def local_fn(_):  # b_r = scale sum_t exp(G_t) q_t^T dO_t: this rank's share of dS_in
            return torch.einsum("bnhk,bnhv->bhkv", decay.query(q.to(acc)), do.to(acc)) * scale

        (dq, dk, dv, dg), ds_out, _, _ = _cross(layout, method, "backward", True, pieces, s_in.shape, acc, decay,
                                                local_fn, intra, gathered_totals=totals)
        first, last = layout.rank == 0, layout.rank == layout.world_size - 1
        # a rank whose first token starts a document takes nothing in (nor gives a gradient back)
        takes_in = not first and (not starts or starts[0] > 0)
        dq_cross = dk_cross = carried = None
        if takes_in:
            dq_cross = decay.query(torch.einsum("bnhv,bhkv->bnhk", do.to(acc), s_in)) * scale
            dq += dq_cross
        if not last:
            dk_cross = decay.key(torch.einsum("bnhv,bhkv->bnhk", v.to(acc), ds_out))
            dk += dk_cross
            dv += torch.einsum("bnhk,bhkv->bnhv", decay.key(k.to(acc)), ds_out)
            if takes_in and decay.given:  # <a S_in, dS_out>: every g_s scales the carried state
                carried = decay.total.double() * (s_in.double() * ds_out.double()).sum(-1)  # [B, H, Dk]
                carried = carried if decay.channel else carried.sum(-1)
        if g is not None and ctx.needs_input_grad[3]:
            dg = dg + linear_kernels.decay_grad(q, k, dq_cross, dk_cross, carried, channel=decay.channel)
            dg = dg.to(g.dtype)
        else:
            dg = None
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg) + (None,) * 6


# -- the public function -------------------------------------------------------------------


def _resolve_backend(backend, q, decay=None) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    reason = _triton_unavailable(q)
    if reason is None and isinstance(decay, torch.Tensor) and decay.dim() == 4:
        reason = (f"backend 'triton' takes decay None, [H] or [B, n, H]; its chunk kernels have no per-channel "
                  f"gate (GLA), got decay of shape {tuple(decay.shape)}")
    if backend == "triton":
        if reason is not None:
            raise ValueError(f"backend: {reason} (backend='torch' serves every case)")
        return "triton"
    return "triton" if reason is None and q.device.type == "cuda" else "torch"


def _triton_unavailable(q) -> Optional[str]:
    if q.dtype == torch.float64:
        return f"backend 'triton' supports float16, bfloat16 and float32, got {q.dtype}"
    if q.device.type not in ("cpu", "cuda"):
        return f"backend 'triton' supports cuda (and cpu under TRITON_INTERPRET=1), got {q.device.type}"
    try:
        from ..kernels.triton import linear as triton_linear
    except Exception as exc:  # ImportError, or a triton build that does not load here
        return f"backend 'triton' needs triton, which does not import ({type(exc).__name__}: {exc})"
    # how the kernels were decorated decides, not today's environment: interpreted kernels
    # cannot run on a GPU at speed, compiled ones cannot take CPU tensors
    interpreted = type(triton_linear._chunk_cumsum_kernel).__name__ == "InterpretedFunction"
    if q.device.type == "cpu":
        if not interpreted:
            return ("backend 'triton' on CPU runs only in Triton's interpreter: set TRITON_INTERPRET=1 before "
                    "seqpar's triton kernels are first imported")
        if q.dtype == torch.bfloat16:
            return "backend 'triton' on CPU (the interpreter) cannot run bfloat16"
    elif interpreted:
        return ("seqpar's triton kernels were imported under TRITON_INTERPRET=1 (the CPU interpreter); "
                "unset it to compile them for cuda")
    return None


def check_decay(decay, q, shapes, expected: str, hint: str = "") -> None:
    """A tensor `decay` of one of `shapes` (worded `expected`; `hint` follows a wrong shape),
    floating point, on q's device, with log-space values <= 0 (-inf allowed: a full reset)."""
    if not isinstance(decay, torch.Tensor):
        raise TypeError(f"decay: expected None or a torch.Tensor, got {type(decay).__name__}")
    if tuple(decay.shape) not in shapes:
        raise ValueError(f"decay: expected shape {expected}, got {tuple(decay.shape)}{hint}")
    if not decay.is_floating_point():
        raise ValueError(f"decay: expected a floating-point tensor, got {decay.dtype}")
    if decay.device != q.device:
        raise ValueError(f"decay: expected device {q.device} (that of q), got {decay.device}")
    if decay.numel():
        # on a GPU without a host sync: a failure raises at the next seqpar call (`comm.deferred`)
        deferred.check_value(decay.detach().amax(), lambda largest: largest <= 0,  # NaN fails; -inf is a reset
                             lambda largest: f"decay: expected log-space values <= 0 (a decay factor exp(g) <= 1), "
                                             f"got a maximum of {largest}")


def _check(q, k, v, decay, layout, scale, method, options, what="linear attention"):
    check_qkv_types(q, k, v)
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {tuple(q.shape)} [batch, seqlen, heads, Dk], got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v: expected shape [{q.shape[0]}, {q.shape[1]}, {q.shape[2]}, Dv] (batch, seqlen and heads "
                         f"of q), got {tuple(v.shape)}")
    if layout.scheme != "contiguous":
        docs = "" if layout.documents is None else f" with {len(layout.documents) - 1} documents (cu_seqlens)"
        raise ValueError(f"layout: {what} expects scheme 'contiguous' (the state runs through the "
                         f"sequence in order; documents too), got scheme {layout.scheme!r}{docs}")
    if q.shape[1] != layout.local_len:
        raise ValueError(f"q: expected local seqlen {layout.local_len} (layout.local_len on rank {layout.rank}), "
                         f"got {q.shape[1]}")
    if decay is not None:
        b, n, h, dk = q.shape
        check_decay(decay, q, ((h,), (b, n, h), (b, n, h, dk)),
                    f"[{h}] (per head), [{b}, {n}, {h}] (per token: batch, local seqlen, heads) or [{b}, {n}, {h}, "
                    f"{dk}] (per token and key channel, GLA)")
    if scale is not None:
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
            raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite float or None, got {brief(scale)}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"options: {what.replace(' ', '_')} takes {list(OPTIONS)}, got {unknown}")
    if options.get("scan_pieces") is not None and method not in ("allscan", "auto"):
        raise ValueError(f"scan_pieces: only method='allscan' (or 'auto') cuts the state into pieces, "
                         f"got method={method!r}")
    for name in OPTIONS:
        value = options.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}: expected a positive int, got {brief(value)}")


def _signature(q, k, v, decay, layout, scale, method, backend, options, chosen=None, concrete=None):
    return (
        ("q [batch, heads, Dk], dtype, device", no_seq(q)),
        ("k [batch, heads, Dk], dtype, device", no_seq(k)),
        ("v [batch, heads, Dv], dtype, device", no_seq(v)),
        ("decay", no_seq(decay) if isinstance(decay, torch.Tensor) and decay.dim() >= 3 else describe(decay)),
        ("seq_len", getattr(layout, "seq_len", None)),
        ("scheme", getattr(layout, "scheme", None)),
        ("cu_seqlens (documents; a checksum of the boundaries)", documents_key(getattr(layout, "documents", None))),
        ("method", method),
        ("method='auto' chose (method, scan_pieces; from its topology: the cached calibration or the defaults)",
         chosen),
        ("backend", backend),
        ("backend resolved on this rank", concrete),
        ("scale", scale),
        ("options", tuple(sorted((key, describe(val)) for key, val in options.items()))),
        # a backward on some ranks only would leave the others waiting in its collectives
        ("gradients required (q, k, v or decay requires grad, grad mode on)", grad_wanted(q, k, v, decay)),
    )


# a graph break under torch.compile, run eagerly, as every softmax strategy (registry.run)
@torch.compiler.disable
def linear_attention(q, k, v, *, layout=None, decay=None, scale=None, method="auto", backend="auto", **options):
    """Causal linear attention over a sequence split contiguously across the ranks.

    `q`, `k` `[B, S/P, H, Dk]`, `v` `[B, S/P, H, Dv]`: this rank's tokens of `layout`
    (scheme "contiguous"; default: equal lengths on the default group). Per head, from a
    zero state at global position 0: `S_t = exp(g_t) S_{t-1} + k_t^T v_t`,
    `o_t = scale q_t S_t`; returns this rank's `o` `[B, S/P, H, Dv]` in the input dtype.

    - `decay`: log decay `g <= 0`: None (no decay), `[H]` (per head), `[B, S/P, H]`
      (per token, this rank's tokens) or `[B, S/P, H, Dk]` (per token and key channel, GLA:
      `S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t`; backend "torch" only, "auto" picks it);
      -inf resets the state. Values below -60 act as -60 (exp(-60) ~ 1e-26: no result
      changes). Differentiable.
    - `layout.cu_seqlens` (documents): the state restarts from zero at every document start.
    - `scale`: default `Dk ** -0.5`.
    - `method`: "ring" (LASP-1), "allgather" (LASP-2), "allscan" (ZeCO All-Scan) or
      "auto" (`seqpar.plan_linear` on this group's cached calibration, else default topology;
      it also sets `scan_pieces` unless given). `backend`: "torch", "triton" or "auto".
    - options: `chunk_size` (tokens per chunk of the kernel, default 64), `scan_pieces`
      (allscan: pieces the state is pipelined in; default `default_scan_pieces`).

    Differentiable in q, k, v and a tensor decay. States and decay products are fp32 (fp64
    for fp64 inputs). Volumes and critical paths: the module docstring.
    """
    group = group_of(layout)
    _, world = group_rank_and_size(group)
    chunk_size = options.get("chunk_size") or linear_kernels.DEFAULT_CHUNK

    def check():
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q: expected a torch.Tensor, got {type(q).__name__}")
        local = layout_for(layout, q, group)
        _check(q, k, v, decay, local, scale, method, options)
        concrete = _resolve_backend(backend, q, decay)
        nbytes = state_bytes(q.shape[0], q.shape[2], q.shape[3], v.shape[3], q.dtype)
        chosen, auto_choice = method, None
        # ring is LASP-1, whole states; only the All-Scan cuts them into pieces
        pieces = options.get("scan_pieces") or default_scan_pieces(world, nbytes) if method == "allscan" else 1
        if method == "auto" and world > 1:
            from ..planner.model import choose_linear

            # part of the agreed signature: ranks that would choose differently raise
            training = grad_wanted(q, k, v, decay)
            gate = False if decay is None else "channel" if decay.dim() == 4 else True
            chosen, planned = choose_linear(local, q.shape[0], q.shape[2], q.shape[3], v.shape[3], q.dtype,
                                            gate, training, chunk_size, q.device)
            pieces = options.get("scan_pieces") or planned
            auto_choice = (chosen, pieces)
        elif method == "auto":
            chosen = choose_method(world, nbytes)  # one rank: nothing crosses ranks
        return local, concrete, chosen, pieces, auto_choice

    def signature(r):
        local = layout if r is None else r[0]
        return _signature(q, k, v, decay, local, scale, method, backend, options, r and r[4], r and r[1])

    layout, concrete, chosen, pieces, _ = collective_call(group, "seqpar.linear_attention", check, signature)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    g = None
    if decay is not None:
        # exp(-60) ~ 1e-26 is below every dtype's rounding of the terms it multiplies, so the
        # floor changes no result; it keeps -inf (a full reset) out of the cumulative sums,
        # where -inf - -inf would be NaN. The gradient below the floor is 0, as is exp's at -inf.
        g = decay.to(torch.float64 if q.dtype == torch.float64 else torch.float32).clamp(min=-DECAY_FLOOR)
        if g.dim() == 1:
            g = g.view(1, 1, -1).expand(q.shape[0], q.shape[1], -1)
    return LinearAttention.apply(q, k, v, g, layout, scale, chosen, concrete, chunk_size, pieces)
