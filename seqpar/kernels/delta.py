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
i <= t, masked before `exp`), so nothing overflows however strong the decay; `G` and its
differences are taken in fp64 (the factors are then fp32), so their rounding does not grow
with `|G|`.

Affine summary. The block's outputs and final state are affine in `S_0`:
`S_out = A S_0 + S_loc`, `o_t = o_loc_t + Q_eff_t S_0` with `A` `[Dk, Dk]` the product of
the block's transitions. `chunk_forward(..., transition=True)` gets all four in one pass by
carrying `[S | X]` `[Dk, Dv + Dk]` from `[0 | I]` with values `[V | 0]`: the left columns
are the block from zero, the right ones `A_{<=t}` (and `Q_eff = scale q_t A_{<=t}`). The
columns of `S` never mix: any slice of them can be carried on its own.

Backward. The parallel parts (the solve, the scores, the factors) go through autograd; the
chunk-after-chunk part is one function (`recurrence`) with its own backward: per chunk c,
entered with `S_c`, `d_c = U_c - W_c S_c`, `O_c = Qg_c S_c + A_c d_c` and
`S_{c+1} = gamma_c S_c + Ke_c^T d_c` (Qg = Q diag(Gamma), A the masked scores, Ke = K
exp(G_C - G), gamma = Gamma_C) give, from the last chunk back with `dS` the gradient of
`S_{c+1}`:

    dd_c   = A_c^T dO_c + Ke_c dS              dU_c = dd_c,     dW_c = -dd_c S_c^T
    dQg_c  = dO_c S_c^T      dA_c = dO_c d_c^T      dKe_c = d_c dS^T
    dgamma_c = <S_c, dS>     dS <- Qg_c^T dO_c + gamma_c dS - W_c^T dd_c

with the chunks' entry states `S_c` kept from the forward (`[NC, Dk, Dv]` per head, as fla
keeps them). The strategy (`seqpar.strategies.delta`) recomputes a rank's forward in its
backward, so nothing of this is held between the passes.
"""
from __future__ import annotations

from typing import Optional

import torch

from .linear import _chunked, _unchunked, acc_dtype

DEFAULT_CHUNK = 64


def chunk_forward(q, k, v, beta, g: Optional[torch.Tensor], scale: float, chunk_size: int = DEFAULT_CHUNK,
                  initial: Optional[torch.Tensor] = None, transition: bool = False, backend: str = "torch"):
    """The gated delta rule over a block, from `initial` (`[B, H, Dk, Dv]`, default zero).

    q, k `[B, n, H, Dk]`; v `[B, n, H, Dv]`; beta `[B, n, H]`; g None or `[B, n, H]` (log
    decay, <= 0). Returns `(o [B, n, H, Dv], S_out [B, H, Dk, Dv])` in fp32 (fp64 for fp64
    inputs); with `transition=True` (and no `initial`) also `(Q_eff [B, n, H, Dk],
    A [B, H, Dk, Dk])`, scale included in Q_eff: `o + Q_eff S_in` and `A S_in + S_out` are the
    block's results from a state `S_in`. Differentiable by autograd in every input.
    `backend`: "torch" or "triton" for the chunk-after-chunk part (`recurrence`).
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
        # G within each chunk, and its differences, in fp64: |G| reaches C * 60 under strong
        # decays, and an fp32 difference of two such sums would carry ulp(|G|) ~ 2e-4 into
        # every factor after it (measured: 6.5e-5 output error, against 1.4e-7 this way)
        cum = _chunked(g, c, torch.float64).cumsum(-1)  # [B, H, NC, C]
        pair = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp().to(acc)
        gamma = cum.exp().to(acc)  # Gamma_t
        to_end = (cum[..., -1:] - cum).exp().to(acc)  # exp(G_C - G_t)
        gamma_end = cum[..., -1].exp().to(acc)[..., None, None]  # [B, H, NC, 1, 1]
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
    ends = None if gamma_end is None else gamma_end[..., 0, 0]  # [B, H, NC]
    outs, state = recurrence(u, w, q_in, scores, k_out, ends, state, backend)
    out = _unchunked(outs * scale, n)  # [B, n, H, width]
    if not transition:
        return out, state
    # copies, not views: a caller keeps Q_eff and A, not the whole [.., Dv + Dk] buffers
    return out[..., :dv], state[..., :dv], out[..., dv:].contiguous(), state[..., dv:].contiguous()


def recurrence(u, w, q_in, scores, k_out, gamma, state, backend: str = "torch"):
    """The chunk-after-chunk part: `(O [B, H, NC, C, W], S_final [B, H, Dk, W])` from the
    chunked `U`, `W`, `Qg`, `A`, `Ke` (`[B, H, NC, C, .]`), the chunks' decays `gamma`
    (`[B, H, NC]` or None: 1) and the entering state `[B, H, Dk, W]`; differentiable in all."""
    if backend == "triton":
        from .triton import delta as triton_delta

        return triton_delta.recurrence(u, w, q_in, scores, k_out, gamma, state)
    return _Recurrence.apply(u, w, q_in, scores, k_out, gamma, state)


class _Recurrence(torch.autograd.Function):
    """`recurrence` in torch: a loop over the chunks, forward and backward (module docstring)."""

    @staticmethod
    def forward(ctx, u, w, q_in, scores, k_out, gamma, state):
        nc = u.shape[2]
        outs = torch.empty(*u.shape[:4], state.shape[-1], dtype=state.dtype, device=state.device)
        states = torch.empty(*state.shape[:2], nc, *state.shape[2:], dtype=state.dtype, device=state.device)
        for c in range(nc):
            states[:, :, c] = state
            d = u[:, :, c] - w[:, :, c] @ state  # [B, H, C, W]
            torch.matmul(q_in[:, :, c], state, out=outs[:, :, c])
            outs[:, :, c] += scores[:, :, c] @ d
            carried = state if gamma is None else gamma[:, :, c, None, None] * state
            state = carried + k_out[:, :, c].transpose(-1, -2) @ d
        ctx.save_for_backward(u, w, q_in, scores, k_out, gamma, states)
        return outs, state

    @staticmethod
    def backward(ctx, d_outs, d_state):
        u, w, q_in, scores, k_out, gamma, states = ctx.saved_tensors
        nc = u.shape[2]
        grads = [torch.empty_like(t) for t in (u, w, q_in, scores, k_out)]
        du, dw, dq_in, dscores, dk_out = grads
        dgamma = None if gamma is None else torch.empty_like(gamma)
        ds = torch.zeros_like(states[:, :, 0]) if d_state is None else d_state.clone()
        if d_outs is None:
            d_outs = torch.zeros(*u.shape[:4], states.shape[-1], dtype=states.dtype, device=states.device)
        for c in range(nc - 1, -1, -1):
            s_c, do = states[:, :, c], d_outs[:, :, c]
            d = u[:, :, c] - w[:, :, c] @ s_c
            dd = scores[:, :, c].transpose(-1, -2) @ do + k_out[:, :, c] @ ds
            du[:, :, c] = dd
            torch.matmul(dd, s_c.transpose(-1, -2), out=dw[:, :, c])
            dw[:, :, c].neg_()
            torch.matmul(do, s_c.transpose(-1, -2), out=dq_in[:, :, c])
            torch.matmul(do, d.transpose(-1, -2), out=dscores[:, :, c])
            torch.matmul(d, ds.transpose(-1, -2), out=dk_out[:, :, c])
            if gamma is not None:
                dgamma[:, :, c] = (s_c * ds).sum((-1, -2))
            carried = ds if gamma is None else gamma[:, :, c, None, None] * ds
            ds = q_in[:, :, c].transpose(-1, -2) @ do + carried - w[:, :, c].transpose(-1, -2) @ dd
        return du, dw, dq_in, dscores, dk_out, dgamma, ds
