"""Chunked causal linear attention on one device: a block of tokens from a zero state.

Per (batch, head), with state `S` `[Dk, Dv]` and log decay `g_t <= 0`:

    S_t = exp(g_t) S_{t-1} + k_t^T v_t,      o_t = scale * q_t S_t,      S_0 = 0.

`chunk_forward` returns the outputs and the final state of a block started from zero;
`chunk_backward` the gradients with no gradient flowing into that final state. Everything
a sequence-parallel method adds (an incoming state, the gradient of the outgoing one) is a
rank-one-pass correction on top, in `seqpar.strategies.linear`; this keeps the kernels
(torch here, Triton in `kernels/triton/linear.py`) to one small contract.

The chunked form, with `C` tokens per chunk and `G` the within-chunk cumulative log decay:

    o_chunk = scale * [ ((q k^T) * exp(G_i - G_j) [j <= i]) v  +  (q * exp(G)) S_prev ]
    S_next  = exp(G_C) S_prev + (k * exp(G_C - G))^T v

Every exponent is <= 0 (differences are taken only for j <= i, masked before `exp`), so
nothing overflows however strong the decay. States and decay sums are fp32 (fp64 for
fp64 inputs). Shapes: q, k `[B, n, H, Dk]`, v `[B, n, H, Dv]`, g `[B, n, H]`, `[B, n, H, Dk]`
(a gate per key channel, GLA: `S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t`; every factor above
is then per channel, and so is dg) or None.

Gradient of the decay. Write `G_t` for the cumulative log decay over the whole block. The
output and state depend on the decay only through `exp(G_t - G_s)` (s <= t) and, with an
incoming state, `exp(G_t)`; so the gradient w.r.t. `G_t` is `q_t . dq_t` (t as a query)
minus `k_t . dk_t` (t as a key), and the gradient w.r.t. `g_s` is its reverse cumulative
sum over t >= s (plus `<S_out, dS_out>` when the final state has a gradient: every `g_s`
scales it). The pairs s = t enter both sides and cancel exactly; they are also the largest
terms, so `chunk_backward` sums only the pairs s < t (`rowsum - colsum` of the pair matrix
within a chunk, the inter-chunk products across chunks) instead of subtracting rounded
totals: under strong decay (g = -20) the true dg is ~1e-9 of those terms. `decay_grad`
adds what cross-block terms (an incoming state, the outgoing state's gradient) contribute.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 64
# chunk cap for per-channel decays: their pair factors are [C, C, Dk] per chunk
CHANNEL_CHUNK = 16
# elements of fp64 pair differences formed at once for per-channel decays (32 MiB)
_CHANNEL_SLICE = 4 * 2 ** 20



def state_bytes(batch: int, heads: int, dk: int, dv: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the states `[B, H, Dk, Dv]` (fp32; fp64 for fp64 inputs) that cross ranks."""
    return batch * heads * dk * dv * (8 if dtype == torch.float64 else 4)

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunked(x: torch.Tensor, chunk: int, acc) -> torch.Tensor:
    """[B, n, H, D] (or [B, n, H]) -> [B, H, NC, C, D] (or [B, H, NC, C]), zero-padded."""
    b, n, h = x.shape[:3]
    x = x.to(acc).movedim(1, 2)  # [B, H, n, ...]
    pad = (-n) % chunk
    if pad:
        x = F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
    return x.reshape(b, h, (n + pad) // chunk, chunk, *x.shape[3:])


def _unchunked(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, H, NC, C, D] -> [B, n, H, D]."""
    b, h = x.shape[:2]
    return x.reshape(b, h, -1, x.shape[-1])[:, :, :n].movedim(2, 1)


class _Chunks:
    """The per-chunk quantities forward and backward share (recomputed in the backward).

    A scalar decay `g` `[B, n, H]` gives pairwise factors `mask` `[B, H, NC, C, C]`; a
    per-channel one `[B, n, H, Dk]` (GLA) gives `mask` `[B, H, NC, C, C, Dk]` (`self.channel`),
    so its chunks are capped at `CHANNEL_CHUNK` tokens to bound that tensor."""

    def __init__(self, q, k, v, g, chunk: int):
        acc = acc_dtype(q.dtype)
        self.n = q.shape[1]
        self.channel = g is not None and g.dim() == 4
        if self.channel:
            chunk = min(chunk, CHANNEL_CHUNK)
        chunk = max(1, min(chunk, self.n))
        self.chunk = chunk
        self.q, self.k, self.v = (_chunked(t, chunk, acc) for t in (q, k, v))
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
        if g is None:
            self.decay_q = self.decay_k = None  # exp(G), exp(G_C - G): all ones
            self.gamma = None  # exp(G_C) per chunk
            self.mask = causal.to(acc)
        elif self.channel:
            # the same factors per key channel: G [B, H, NC, C, Dk], in fp64 as below; the pair
            # factors [B, H, NC, C, C, Dk] are formed a few chunks at a time, so the fp64
            # differences stay a bounded transient
            cum = _chunked(g, chunk, torch.float64).cumsum(-2)
            nc = cum.shape[2]
            self.mask = torch.empty(*cum.shape[:4], chunk, cum.shape[-1], dtype=acc, device=q.device)
            step = max(1, _CHANNEL_SLICE // (chunk * chunk * cum.shape[-1] * cum.shape[0] * cum.shape[1]))
            for a in range(0, nc, step):
                part = cum[:, :, a:a + step]
                diff = (part[..., :, None, :] - part[..., None, :, :]).masked_fill_(~causal[..., None], float("-inf"))
                self.mask[:, :, a:a + step] = diff.exp_()
            self.decay_q = cum.exp().to(acc)  # [B, H, NC, C, Dk]
            self.decay_k = (cum[..., -1:, :] - cum).exp_().to(acc)
            self.gamma = cum[..., -1, :].exp().to(acc)[..., None]  # [B, H, NC, Dk, 1]: scales the rows of a state
        else:
            # -- within-chunk cumulative log decay, and the pairwise factors exp(G_i - G_j), j <= i,
            # in fp64: |G| reaches C * 60 under strong decays, and an fp32 difference of two such
            # sums would carry ulp(|G|) into every factor after it; the factors are then `acc`
            cum = _chunked(g, chunk, torch.float64).cumsum(-1)  # [B, H, NC, C]
            diff = (cum[..., :, None] - cum[..., None, :]).masked_fill_(~causal, float("-inf"))
            self.mask = diff.exp_().to(acc)  # [B, H, NC, C, C]
            self.decay_q = cum.exp().to(acc)[..., None]  # [B, H, NC, C, 1]
            self.decay_k = (cum[..., -1:] - cum).exp_().to(acc)[..., None]
            self.gamma = cum[..., -1].exp().to(acc)[..., None, None]  # [B, H, NC, 1, 1]

    def scores(self) -> torch.Tensor:
        """`(q_i . k_j) exp(G_i - G_j) [j <= i]` per chunk `[B, H, NC, C, C]` (per channel:
        the factor inside the sum over channels)."""
        if self.channel:
            return torch.einsum("bhnic,bhnjc,bhnijc->bhnij", self.q, self.k, self.mask)
        return (self.q @ self.k.transpose(-1, -2)).mul_(self.mask)

    def chunk_states(self) -> torch.Tensor:
        """State each chunk adds from zero: `(k * exp(G_C - G))^T v`, [B, H, NC, Dk, Dv]."""
        k = self.k if self.decay_k is None else self.k * self.decay_k
        return k.transpose(-1, -2) @ self.v

    def scan(self, adds: torch.Tensor, reverse: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """`before[c]`: the running value entering chunk c; and the value after the last one.

        Forward: x_c = gamma_c x_{c-1} + adds_c. Reverse: x_c = gamma_c x_{c+1} + adds_c, and
        `before[c]` is x_{c+1} (what chunk c receives from the chunks after it)."""
        before = torch.empty_like(adds)
        x = torch.zeros_like(adds[:, :, 0])
        order = range(adds.shape[2] - 1, -1, -1) if reverse else range(adds.shape[2])
        for c in order:
            before[:, :, c] = x
            if self.gamma is None:
                x = x + adds[:, :, c]
            else:
                x = torch.addcmul(adds[:, :, c], self.gamma[:, :, c], x)
        return before, x


def chunk_forward(q, k, v, g: Optional[torch.Tensor], scale: float, chunk_size: int = DEFAULT_CHUNK):
    """Outputs and final state of a block from a zero state.

    q, k `[B, n, H, Dk]`; v `[B, n, H, Dv]`; g None, `[B, n, H]` or `[B, n, H, Dk]` (log decay, <= 0).
    Returns (o `[B, n, H, Dv]`, state `[B, H, Dk, Dv]`), both fp32 (fp64 for fp64 inputs).
    """
    ch = _Chunks(q, k, v, g, chunk_size)
    # -- intra-chunk: (q k^T masked and decayed) v
    out = ch.scores() @ ch.v  # [B, H, NC, C, Dv]
    # -- inter-chunk: the state entering each chunk, seen through exp(G)
    before, state = ch.scan(ch.chunk_states())
    q_dec = ch.q if ch.decay_q is None else ch.q * ch.decay_q
    out += q_dec @ before
    return _unchunked(out.mul_(scale), ch.n), state


def chunk_backward(do, q, k, v, g: Optional[torch.Tensor], scale: float, chunk_size: int = DEFAULT_CHUNK):
    """Gradients of `sum(o * do)` for a block from a zero state, no gradient on the final state.

    Returns (dq, dk, dv, dg) in fp32 (fp64 for fp64 inputs); dg the shape of g, or None.
    """
    ch = _Chunks(q, k, v, g, chunk_size)
    dos = _chunked(do, ch.chunk, ch.q.dtype) * scale  # scale folded into dO (never in place: a view of the caller's)
    # -- intra-chunk
    dov = dos @ ch.v.transpose(-1, -2)  # [B, H, NC, C, C]: dO_i . v_j
    scores = ch.scores()
    if ch.channel:
        dq = torch.einsum("bhnij,bhnjc,bhnijc->bhnic", dov, ch.k, ch.mask)
        dk = torch.einsum("bhnij,bhnic,bhnijc->bhnjc", dov, ch.q, ch.mask)
    else:
        dscores = dov * ch.mask
        dq = dscores @ ch.k
        dk = dscores.transpose(-1, -2) @ ch.q
    dv = scores.transpose(-1, -2) @ dos
    # -- inter-chunk, forward state: dq += exp(G) dO S_prev^T
    before, final = ch.scan(ch.chunk_states())
    dq_inter = dos @ before.transpose(-1, -2)
    if ch.decay_q is not None:
        dq_inter *= ch.decay_q
    # -- inter-chunk, state gradient: what flows into chunk c's added state from later chunks
    q_dec = ch.q if ch.decay_q is None else ch.q * ch.decay_q
    after, _ = ch.scan(q_dec.transpose(-1, -2) @ dos, reverse=True)  # [B, H, NC, Dk, Dv]
    k_dec = ch.k if ch.decay_k is None else ch.k * ch.decay_k
    dv += k_dec @ after
    dk_inter = ch.v @ after.transpose(-1, -2)
    if ch.decay_k is not None:
        dk_inter *= ch.decay_k
    dg = None
    if g is not None:
        # -- dG_t without the diagonal pairs (s = t): they cancel exactly between the query
        # and the key side, and subtracting them after rounding would swamp a small dg
        wide = torch.float64
        if ch.channel:
            # M_ijc = scale exp(G_ic - G_jc) q_ic k_jc (dO_i . v_j), j < i: one term per channel
            pairs = torch.einsum("bhnic,bhnjc,bhnijc->bhnijc", ch.q, ch.k, ch.mask).to(wide) * dov.to(wide)[..., None]
            pairs.diagonal(dim1=-3, dim2=-2).zero_()
            per_token = pairs.sum(-2) - pairs.sum(-3)  # [B, H, NC, C, Dk]
            per_token += (ch.q * dq_inter).to(wide) - (ch.k * dk_inter).to(wide)
        else:
            pairs = scores.to(wide) * dov.to(wide)  # M_ij = scale exp(G_i - G_j) (q_i . k_j)(dO_i . v_j), j <= i
            pairs.diagonal(dim1=-2, dim2=-1).zero_()
            per_token = pairs.sum(-1) - pairs.sum(-2)  # [B, H, NC, C]
            per_token += (ch.q * dq_inter).sum(-1, dtype=wide) - (ch.k * dk_inter).sum(-1, dtype=wide)
            per_token = per_token[..., None]
        # -- dg_s = sum_{t >= s} dG_t, taken within s's chunk only, plus <S_end, dS_end> of that
        # chunk (the end state's gradient from the later chunks: every g_s of the chunk scales
        # the part of S_end that is carried on). The terms of the later chunks sum to that
        # inner product exactly; summing them instead would add a rounding error per token
        # over the whole block (relative dg error growing with n: 6e-5 at n = 4096 in fp32)
        per_token = per_token.flip(3).cumsum(3).flip(3)
        ends = torch.cat([before[:, :, 1:], final[:, :, None]], 2)  # the state at each chunk's end
        carried = ends.to(wide).mul_(after.to(wide)).sum(-1)  # [B, H, NC, Dk]
        per_token += (carried if ch.channel else carried.sum(-1, keepdim=True))[:, :, :, None]
        per_token = _unchunked(per_token, ch.n)  # [B, n, H, 1 or Dk]
        dg = (per_token if ch.channel else per_token[..., 0]).to(ch.q.dtype)
    dq += dq_inter
    dk += dk_inter
    n = ch.n
    return _unchunked(dq, n), _unchunked(dk, n), _unchunked(dv, n), dg


def _reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    """`sum_{t >= s} x_t` along dim 1, in fp64: over a long block the terms cancel to a small total."""
    return x.double().flip(1).cumsum(1).flip(1)


def decay_grad(q, k, dq_cross, dk_cross, carried: Optional[torch.Tensor] = None, channel: bool = False
               ) -> torch.Tensor:
    """What terms added on top of a block's own gradients contribute to dg `[B, n, H]`
    (`channel`: `[B, n, H, Dk]`, a per-channel decay).

    Terms that pair token t with things outside the block: an incoming state (`dq_cross`,
    through `exp(G_t)`: every g_s with s <= t) and the gradient of the outgoing state
    (`dk_cross`, through `exp(G_n - G_t)`: every g_s with s > t). So
    `dg_s = sum_{t >= s} q_t . dq_cross_t + sum_{t < s} k_t . dk_cross_t + carried`, with
    `carried = <a S_in, dS_out>` `[B, H]` (`[B, H, Dk]`) the incoming state's way through the
    block's total decay `a` (each g_s scales it). Both sums run in fp64, and the key side is
    a running sum from the block's start rather than `<S_out, dS_out>` minus a suffix sum
    (the two are equal; the difference cancels to a small value, 0 before a document start)."""
    acc = acc_dtype(q.dtype)

    def per_token(x, dx):
        prod = x.to(torch.float64) * dx.to(torch.float64)
        return prod if channel else prod.sum(-1)

    shape = q.shape if channel else q.shape[:3]
    dg = torch.zeros(shape, dtype=torch.float64, device=q.device)
    if dq_cross is not None:
        dg = dg + per_token(q, dq_cross).flip(1).cumsum(1).flip(1)
    if dk_cross is not None:
        terms = per_token(k, dk_cross).cumsum(1)
        dg = dg + torch.cat([torch.zeros_like(terms[:, :1]), terms[:, :-1]], 1)  # exclusive: t < s
    if carried is not None:
        dg = dg + carried.double()[:, None]
    return dg.to(acc)
