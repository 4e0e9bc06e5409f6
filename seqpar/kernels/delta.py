"""The gated delta rule in chunks on one device (torch; fp32, or fp64 for fp64 inputs).

Per (batch, head), with state `S` `[Dk, Dv]`, row vectors `k_t` `[Dk]`, `v_t` `[Dv]`,
`beta_t` a scalar and `a_t = exp(g_t)` (`g_t <= 0`):

    S_t = a_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,      o_t = scale q_t S_t.

Derivation of the chunk form (the WY / UT form; fla uses the same). Write the update as

    S_t = a_t S_{t-1} + k_t^T d_t,      d_t = beta_t (v_t - a_t k_t S_{t-1})

(expand the product: `a_t S - a_t beta_t k^T k S + beta_t k^T v`). Inside a chunk entered
with `S_0`, let `G_t` be the chunk's cumulative log decay and `Gamma_t = exp(G_t)`. Unrolling,

    S_t = Gamma_t S_0 + sum_{i <= t} exp(G_t - G_i) k_i^T d_i,

so `a_t S_{t-1} = Gamma_t S_0 + sum_{i < t} exp(G_t - G_i) k_i^T d_i` and

    d_t + beta_t sum_{i < t} exp(G_t - G_i) (k_t . k_i) d_i = beta_t v_t - beta_t Gamma_t k_t S_0.

That is a unit lower-triangular system `(I + L) d = diag(beta) V - diag(beta Gamma) K S_0`
with `L_ti = beta_t exp(G_t - G_i) (k_t . k_i)` for i < t: one triangular solve per chunk
for both right-hand sides (`torch.linalg.solve_triangular`), which gives

    U = (I + L)^{-1} diag(beta) V,   W = (I + L)^{-1} diag(beta Gamma) K,   d = U - W S_0

(U, W depend on the chunk alone: every chunk solves in parallel). Then

    O     = scale (diag(Gamma) Q S_0 + (Q K^T * exp(G_t - G_i) [i <= t]) d)
    S_C   = Gamma_C S_0 + (K * exp(G_C - G))^T d.

Only the last two lines run chunk after chunk. Every exponent is <= 0 (differences only for
i <= t, masked before `exp`), so nothing overflows however strong the decay.

Affine summary. The block's outputs and final state are affine in `S_0`:
`S_out = A S_0 + S_loc`, `o_t = o_loc_t + Q_eff_t S_0` with `A` `[Dk, Dk]` the product of
the block's transitions. `chunk_forward(..., transition=True)` gets all four in one pass by
carrying `[S | X]` `[Dk, Dv + Dk]` from `[0 | I]` with values `[V | 0]`: the left columns
are the block from zero, the right ones `A_{<=t}` (and `Q_eff = scale q_t A_{<=t}`). The
columns of `S` never mix: any slice of them can be carried on its own.

The backward is autograd through this forward, recomputed (`seqpar.strategies.delta`):
no per-token state is saved, and every operation above is differentiable.
"""
from __future__ import annotations

from typing import Optional

import torch

from .linear import _chunked, _unchunked, acc_dtype

DEFAULT_CHUNK = 64


def chunk_forward(q, k, v, beta, g: Optional[torch.Tensor], scale: float, chunk_size: int = DEFAULT_CHUNK,
                  initial: Optional[torch.Tensor] = None, transition: bool = False):
    """The gated delta rule over a block, from `initial` (`[B, H, Dk, Dv]`, default zero).

    q, k `[B, n, H, Dk]`; v `[B, n, H, Dv]`; beta `[B, n, H]`; g None or `[B, n, H]` (log
    decay, <= 0). Returns `(o [B, n, H, Dv], S_out [B, H, Dk, Dv])` in fp32 (fp64 for fp64
    inputs); with `transition=True` (and no `initial`) also `(Q_eff [B, n, H, Dk],
    A [B, H, Dk, Dk])`, scale included in Q_eff: `o + Q_eff S_in` and `A S_in + S_out` are the
    block's results from a state `S_in`. Differentiable by autograd in every input.
    """
    acc = acc_dtype(q.dtype)
    b, n, h, dk = q.shape
    dv = v.shape[-1]
    c = max(1, min(chunk_size, n))
    # padded tokens (k = v = beta = g = 0) are the identity on the state
    qc, kc, vc = (_chunked(t, c, acc) for t in (q, k, v))  # [B, H, NC, C, D]
    bc = _chunked(beta, c, acc)  # [B, H, NC, C]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    if g is None:
        pair = causal.to(acc)  # exp(G_t - G_i) [i <= t]
        gamma = to_end = gamma_end = None
    else:
        cum = _chunked(g, c, acc).cumsum(-1)  # [B, H, NC, C]: G within each chunk
        pair = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        gamma = cum.exp()  # Gamma_t
        to_end = (cum[..., -1:] - cum).exp()  # exp(G_C - G_t)
        gamma_end = cum[..., -1].exp()[..., None, None]  # [B, H, NC, 1, 1]
    kk = (kc @ kc.transpose(-1, -2)) * pair
    lower = (kk * bc[..., :, None]).tril(-1)  # L; the solve reads the unit diagonal, not these zeros
    eye = torch.eye(c, dtype=acc, device=q.device)
    bk = kc * (bc if gamma is None else bc * gamma)[..., None]
    rhs = torch.cat([vc * bc[..., None], bk], -1)
    uw = torch.linalg.solve_triangular(lower + eye, rhs, upper=False, unitriangular=True)
    u, w = uw[..., :dv], uw[..., dv:]
    scores = (qc @ kc.transpose(-1, -2)) * pair  # [B, H, NC, C, C], zero above the diagonal
    q_in = qc if gamma is None else qc * gamma[..., None]
    k_out = kc if to_end is None else kc * to_end[..., None]

    if transition:
        if initial is not None:
            raise ValueError("initial: transition=True carries the block from zero and the identity")
        eye_k = torch.eye(dk, dtype=acc, device=q.device).expand(b, h, dk, dk)
        state = torch.cat([torch.zeros(b, h, dk, dv, dtype=acc, device=q.device), eye_k], -1)
        u = torch.cat([u, torch.zeros(*u.shape[:-1], dk, dtype=acc, device=q.device)], -1)
    elif initial is None:
        state = torch.zeros(b, h, dk, dv, dtype=acc, device=q.device)
    else:
        state = initial.to(acc)
    outs = []
    # unbind, not indexing: the backward of an index builds a full-size zero tensor per chunk
    ends = [None] * qc.shape[2] if gamma_end is None else gamma_end.unbind(2)
    for u_i, w_i, q_i, s_i, k_i, end in zip(u.unbind(2), w.unbind(2), q_in.unbind(2), scores.unbind(2),
                                             k_out.unbind(2), ends):
        d = u_i - w_i @ state  # [B, H, C, width]
        outs.append(q_i @ state + s_i @ d)
        state = (state if end is None else end * state) + k_i.transpose(-1, -2) @ d
    out = _unchunked(torch.stack(outs, 2) * scale, n)  # [B, n, H, width]
    if not transition:
        return out, state
    return out[..., :dv], state[..., :dv], out[..., dv:], state[..., dv:]
