"""The gated delta rule's chunk-after-chunk part in Triton (`seqpar.kernels.delta.recurrence`).

The parallel parts of the chunk form (the triangular solve for `U` and `W`, the masked
scores `A`, the factors `Qg = Q diag(Gamma)` and `Ke = K exp(G_C - G)`) stay in torch; this
file runs only the loop over chunks, which in torch is a few kernel launches per chunk. Per
(batch, head) and chunk c, entered with `S_c` `[Dk, W]`:

    d_c = U_c - W_c S_c,    O_c = Qg_c S_c + A_c d_c,    S_{c+1} = gamma_c S_c + Ke_c^T d_c

`_forward_kernel`, grid (B*H, W tiles): one program per (batch, head) and BV columns of the
state (the columns never mix), the whole Dk in one tile (`d` contracts over it). It stores
each chunk's entry state for the backward, the outputs and the final state.

`_backward_kernel`, same grid, walks the chunks backwards with `dS` the gradient of `S_{c+1}`
(the derivation is in `seqpar/kernels/delta.py`):

    dd = A^T dO + Ke dS;  dU = dd;  dW = -dd S_c^T;  dQg = dO S_c^T;  dA = dO d^T;
    dKe = d dS^T;  dgamma = <S_c, dS>;  dS <- Qg^T dO + gamma dS - W^T dd

`dU` and `dS` are per column tile; `dW`, `dQg`, `dA`, `dKe` and `dgamma` sum over the
columns, so each tile writes its share and the host adds the shares (one tile when
W <= 64). Everything is fp32 with fp32 products (`input_precision="ieee"`): the inputs are
the chunk form's fp32 tensors whatever the model's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_MAX_BV = 64


@triton.jit
def _tile(ptr, base, rows, cols, n_rows, n_cols, stride):
    """A [len(rows), len(cols)] tile of a row-major matrix at `base`, zero outside."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + base + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _put(ptr, base, rows, cols, n_rows, n_cols, stride, value):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + base + rows[:, None] * stride + cols[None, :], value, mask=mask)


@triton.jit
def _forward_kernel(u_ptr, w_ptr, q_ptr, a_ptr, ke_ptr, gamma_ptr, s0_ptr, out_ptr, states_ptr, final_ptr,
                    NC, C, DK, WIDTH, USE_GAMMA: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1) * BV
    t = tl.arange(0, BT)
    kk = tl.arange(0, BK)
    cols = col0 + tl.arange(0, BV)
    state = _tile(s0_ptr, bh * DK * WIDTH, kk, cols, DK, WIDTH, WIDTH)
    for c in range(NC):
        chunk = bh * NC + c
        _put(states_ptr, chunk * DK * WIDTH, kk, cols, DK, WIDTH, WIDTH, state)
        u = _tile(u_ptr, chunk * C * WIDTH, t, cols, C, WIDTH, WIDTH)
        w = _tile(w_ptr, chunk * C * DK, t, kk, C, DK, DK)
        q = _tile(q_ptr, chunk * C * DK, t, kk, C, DK, DK)
        a = _tile(a_ptr, chunk * C * C, t, t, C, C, C)
        ke = _tile(ke_ptr, chunk * C * DK, t, kk, C, DK, DK)
        d = u - tl.dot(w, state, input_precision="ieee")
        o = tl.dot(q, state, input_precision="ieee")
        o = tl.dot(a, d, acc=o, input_precision="ieee")
        _put(out_ptr, chunk * C * WIDTH, t, cols, C, WIDTH, WIDTH, o)
        if USE_GAMMA:
            state = state * tl.load(gamma_ptr + chunk)
        state = tl.dot(tl.trans(ke), d, acc=state, input_precision="ieee")
    _put(final_ptr, bh * DK * WIDTH, kk, cols, DK, WIDTH, WIDTH, state)


@triton.jit
def _backward_kernel(u_ptr, w_ptr, q_ptr, a_ptr, ke_ptr, gamma_ptr, states_ptr, dout_ptr, dfinal_ptr,
                     du_ptr, dw_ptr, dq_ptr, da_ptr, dke_ptr, dgamma_ptr, ds0_ptr, NC, C, DK, WIDTH, BH,
                     USE_GAMMA: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    col0 = tl.program_id(1) * BV
    t = tl.arange(0, BT)
    kk = tl.arange(0, BK)
    cols = col0 + tl.arange(0, BV)
    share = tile * BH * NC  # this column tile's share of the summed gradients
    ds = _tile(dfinal_ptr, bh * DK * WIDTH, kk, cols, DK, WIDTH, WIDTH)
    for back in range(NC):
        c = NC - 1 - back
        chunk = bh * NC + c
        s = _tile(states_ptr, chunk * DK * WIDTH, kk, cols, DK, WIDTH, WIDTH)
        do = _tile(dout_ptr, chunk * C * WIDTH, t, cols, C, WIDTH, WIDTH)
        u = _tile(u_ptr, chunk * C * WIDTH, t, cols, C, WIDTH, WIDTH)
        w = _tile(w_ptr, chunk * C * DK, t, kk, C, DK, DK)
        q = _tile(q_ptr, chunk * C * DK, t, kk, C, DK, DK)
        a = _tile(a_ptr, chunk * C * C, t, t, C, C, C)
        ke = _tile(ke_ptr, chunk * C * DK, t, kk, C, DK, DK)
        d = u - tl.dot(w, s, input_precision="ieee")
        dd = tl.dot(tl.trans(a), do, input_precision="ieee")
        dd = tl.dot(ke, ds, acc=dd, input_precision="ieee")
        _put(du_ptr, chunk * C * WIDTH, t, cols, C, WIDTH, WIDTH, dd)
        part = (share + chunk) * C
        _put(dw_ptr, part * DK, t, kk, C, DK, DK, -tl.dot(dd, tl.trans(s), input_precision="ieee"))
        _put(dq_ptr, part * DK, t, kk, C, DK, DK, tl.dot(do, tl.trans(s), input_precision="ieee"))
        _put(da_ptr, part * C, t, t, C, C, C, tl.dot(do, tl.trans(d), input_precision="ieee"))
        _put(dke_ptr, part * DK, t, kk, C, DK, DK, tl.dot(d, tl.trans(ds), input_precision="ieee"))
        if USE_GAMMA:
            gamma = tl.load(gamma_ptr + chunk)
            tl.store(dgamma_ptr + share + chunk, tl.sum(tl.sum(s * ds, axis=1), axis=0))
            ds = ds * gamma
        ds = tl.dot(tl.trans(q), do, acc=ds, input_precision="ieee")
        ds = ds - tl.dot(tl.trans(w), dd, input_precision="ieee")
    _put(ds0_ptr, bh * DK * WIDTH, kk, cols, DK, WIDTH, WIDTH, ds)


def _sizes(u, w):
    b, h, nc, c, width = u.shape
    dk = w.shape[-1]
    bt, bk = max(16, triton.next_power_of_2(c)), max(16, triton.next_power_of_2(dk))
    bv = max(16, min(_MAX_BV, triton.next_power_of_2(width)))
    return b * h, nc, c, dk, width, bt, bk, bv, triton.cdiv(width, bv)


class _Recurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, w, q_in, scores, k_out, gamma, state):
        u, w, q_in, scores, k_out, state = (t.contiguous() for t in (u, w, q_in, scores, k_out, state))
        gamma = None if gamma is None else gamma.contiguous()
        bh, nc, c, dk, width, bt, bk, bv, tiles = _sizes(u, w)
        out = torch.empty_like(u)
        states = torch.empty(*state.shape[:2], nc, dk, width, dtype=u.dtype, device=u.device)
        final = torch.empty_like(state)
        _forward_kernel[(bh, tiles)](u, w, q_in, scores, k_out, u if gamma is None else gamma, state, out, states,
                                     final, nc, c, dk, width, USE_GAMMA=gamma is not None, BT=bt, BK=bk, BV=bv)
        ctx.save_for_backward(u, w, q_in, scores, k_out, gamma, states)
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        u, w, q_in, scores, k_out, gamma, states = ctx.saved_tensors
        bh, nc, c, dk, width, bt, bk, bv, tiles = _sizes(u, w)
        d_out = torch.zeros_like(u) if d_out is None else d_out.contiguous()
        d_final = torch.zeros_like(states[:, :, 0]) if d_final is None else d_final.contiguous()
        du = torch.empty_like(u)
        dw, dq, dke = (torch.empty(tiles, *w.shape, dtype=u.dtype, device=u.device) for _ in range(3))
        da = torch.empty(tiles, *scores.shape, dtype=u.dtype, device=u.device)
        dgamma = torch.empty(tiles, *gamma.shape, dtype=u.dtype, device=u.device) if gamma is not None else None
        ds0 = torch.empty_like(d_final)
        _backward_kernel[(bh, tiles)](u, w, q_in, scores, k_out, u if gamma is None else gamma, states, d_out,
                                      d_final, du, dw, dq, da, dke, u if dgamma is None else dgamma, ds0, nc, c, dk,
                                      width, bh, USE_GAMMA=gamma is not None, BT=bt, BK=bk, BV=bv)
        return (du, dw.sum(0), dq.sum(0), da.sum(0), dke.sum(0), None if dgamma is None else dgamma.sum(0), ds0)


# one program holds the whole Dk and a chunk in registers: about ten [C, Dk] / [Dk, 64]
# fp32 tiles in the backward, which fits at Dk = 128, C = 64 (compiled for sm_90 in the tests)
MAX_KEY_DIM = 128
MAX_CHUNK = 64


def unavailable(device: torch.device, dtype: torch.dtype, key_dim: int = 0, chunk: int = 0) -> Optional[str]:
    """Why this kernel cannot run here (or for this head dim and chunk size), or None."""
    if key_dim > MAX_KEY_DIM or chunk > MAX_CHUNK:
        return (f"the Triton delta-rule recurrence holds the whole key dim and a chunk in one program: Dk <= "
                f"{MAX_KEY_DIM} and chunk_size <= {MAX_CHUNK}, got Dk={key_dim}, chunk_size={chunk}")
    if dtype != torch.float32:
        return f"the Triton delta-rule recurrence runs on the chunk form's fp32 tensors, got {dtype}"
    interpreted = type(_forward_kernel).__name__ == "InterpretedFunction"
    if device.type == "cpu" and not interpreted:
        return "on CPU it runs only in Triton's interpreter (TRITON_INTERPRET=1 before the first import)"
    if device.type == "cuda" and interpreted:
        return "it was imported under TRITON_INTERPRET=1 (the CPU interpreter); unset it to compile for cuda"
    if device.type not in ("cpu", "cuda"):
        return f"it runs on cuda (and cpu under the interpreter), got {device.type}"
    return None


def recurrence(u, w, q_in, scores, k_out, gamma, state):
    """`seqpar.kernels.delta.recurrence` in Triton (fp32 tensors)."""
    reason = unavailable(u.device, u.dtype, w.shape[-1], u.shape[3])
    if reason is not None:
        raise ValueError(f"backend: {reason}")
    return _Recurrence.apply(u, w, q_in, scores, k_out, gamma, state)
