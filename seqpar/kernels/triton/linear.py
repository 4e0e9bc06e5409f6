"""Chunked causal linear attention with per-token decay and zero initial state (Triton).

Per (batch, head), with a state `S` of shape `[Dk, Dv]` that is zero before the first token:

    S_t = exp(g_t) * S_{t-1} + k_t^T v_t,      o_t = scale * q_t S_t

`g` is a log decay (`<= 0`) per token, `[B, n, H]` fp32, or None (no decay).

Chunked form (chunk size C, chunks c = 0 .. NT-1). `G` is the cumulative sum of `g`
*within* a chunk (fp32, written once by `_chunk_cumsum_kernel`), `G_C` its value at the
chunk's last token and `h_c` the state before the chunk:

    o_i     = scale * [ exp(G_i) q_i h_c + sum_{j <= i in chunk} exp(G_i - G_j) (q_i . k_j) v_j ]
    h_{c+1} = exp(G_C) h_c + sum_j exp(G_C - G_j) k_j^T v_j

Every exponent is <= 0: `exp(G_i - G_j)` is formed only where `j <= i` (the mask is applied
before the exp), the inter-chunk factors are `exp(G_i)`, `exp(G_C)` and `exp(G_C - G_j)`.
Keeping `G` chunk-local also bounds `|G|` by C * max|g|, which bounds the rounding of
`G_i - G_j`.

Forward (two kernels after the cumsum):
1. `_state_fwd_kernel`, grid (B*H, Dk tiles, Dv tiles): walks the chunks in order, stores
   `h_c` for every chunk and the final state. This is the only sequential part and it does
   one `[Dk, C] x [C, Dv]` product per chunk.
2. `_output_fwd_kernel`, grid (NT x B*H folded on axis 0, Dv tiles): every chunk in
   parallel, the `O(C^2)` intra-chunk term and `q h_c`. (The layout of
   flash-linear-attention's chunk kernels: the long-sequence work is parallel over
   chunks, not only over batch and heads.)
B*H sits on grid axis 0, alone or folded with the chunks (`grid.py`): axes 1 and 2 stop
at 65535.
Every program holds at most 64 columns of Dk or Dv and walks the rest, so fp32 tiles fit
shared memory for any head dim (a whole-Dk backward tile needed ~310 KB at Dk = 128,
C = 64, compiled for sm_90; H100 allows 227 KB).

Backward (the states are recomputed by kernel 1). With `dh_c` the gradient of the
state at the *end* of chunk c (zero after the last chunk: the final state's gradient is
zero), the reverse recurrence (`_state_bwd_kernel`, sequential like kernel 1) is

    dh_{c-1} = exp(G_C) dh_c + scale * (q * exp(G))^T do          (over chunk c)

and per chunk, with `D_ij = exp(G_i - G_j)` for j <= i (else 0), in parallel over chunks
(`_dqk_bwd_kernel` per Dk slice, `_dv_bwd_kernel` per Dv slice):

    dq_i = scale * [ exp(G_i) do_i h_c^T + sum_{j<=i} D_ij (do_i . v_j) k_j ]
    dk_j = scale * sum_{i>=j} D_ij (do_i . v_j) q_i + exp(G_C - G_j) v_j dh_c^T
    dv_j = scale * sum_{i>=j} D_ij (q_i . k_j) do_i + exp(G_C - G_j) k_j dh_c

Decay gradient. With `A_t` the cumulative decay over the whole block,
`L = sum_t do_t . o_t = scale * sum_{s <= t} exp(A_t - A_s) (q_t . k_s)(do_t . v_s)`.
A pair (s, t) depends on `A_t - A_s`, so `dL/dA_t = q_t . dq_t - k_t . dk_t`, and since
`A_t = sum_{s' <= t} g_s'`, `dL/dg_s = sum_{t >= s} dL/dA_t` (a reverse cumulative sum).
The diagonal pairs (s = t) appear in both `q_t . dq_t` and `k_t . dk_t` and cancel exactly;
they are the largest terms (weight exp(0) = 1), so subtracting them in floating point loses
everything when decays are strong (g = -20: the true gradient is ~exp(-20) times them).
`_dqk_bwd_kernel` therefore leaves them out: the intra-chunk part is
`rowsum(M)_t - colsum(M)_t` with `M_ij = scale * D_ij (q_i . k_j)(do_i . v_j)` over j < i
only, plus `q_t . dq_t^inter - k_t . dk_t^inter` (pairs across chunks). The host then sums
over t >= s in fp64 within s's chunk and adds `<h_{c+1}, dh_c>` (the chunk's end state and
its gradient: what all later t contribute), so rounding does not accumulate over the block.

Precision: inputs fp16/bf16/fp32 are loaded and upcast to fp32; every product is an fp32
`tl.dot` with fp32 accumulation, and states are never rounded to the input dtype (an fp16
state overflows after ~65504 / |k v| undecayed tokens). fp32 inputs use
`input_precision="ieee"` (true fp32); fp16/bf16 inputs use "tf32" (tensor cores; TF32 keeps
fp32's range and has fp16's 10 mantissa bits, more than bf16's 7).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .grid import folded_grid, tile_and_row

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# largest Dk / Dv slice of one program: every kernel walks or tiles longer head dims, which
# keeps fp32 tiles within shared memory and registers whatever the head dim
_MAX_TILE = 64


def _empty(shape, device) -> torch.Tensor:
    """Every fp32 buffer the wrappers allocate comes from here (tests fill it with NaN)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


# -- kernels --------------------------------------------------------------------------------
#
# Addressing, in every kernel: q, k, v, do, o, dq, dk, dv are contiguous [B, n, H, D], so
# token t of head h in batch b starts at ((b*n + t) * H + h) * D and the next token is
# H * D further. `row0 = b*n + i_t*BT` (int64: B*n*H*D may exceed 2**31) is the chunk's
# first token; offsets inside a chunk (offs_t * H * D) stay small. G, g, dA, dg are
# [B, n, H] (dA [B, n, H, NK]); states are [B*H, NT, K, V].


@triton.jit
def _intra_chunk_weights(G, n_rows, BT: tl.constexpr, USE_G: tl.constexpr):
    """`[BT, BT]`: exp(G_i - G_j) where key j <= query i < n_rows (a real token), else 0."""
    offs_t = tl.arange(0, BT)
    # [BT, BT]
    mask = (offs_t[:, None] >= offs_t[None, :]) & (offs_t[:, None] < n_rows)
    if USE_G:
        # mask before exp: for j > i the exponent is >= 0 and may overflow
        diff = tl.where(mask, G[:, None] - G[None, :], 0.0)
        weights = tl.where(mask, tl.exp(diff), 0.0)
    else:
        weights = tl.where(mask, 1.0, 0.0)
    return weights


@triton.jit
def _chunk_cumsum_kernel(g_ptr, G_ptr, n, H: tl.constexpr, BT: tl.constexpr):
    """G[b, t, h] = sum of g[b, s, h] over the tokens s <= t of t's chunk. Grid folded (NT x B*H)."""
    i_t, i_bh = tile_and_row(n, BT)
    i_b, i_h = i_bh // H, i_bh % H
    offs_t = tl.arange(0, BT)
    row0 = i_b.to(tl.int64) * n + i_t * BT
    offs = row0 * H + i_h + offs_t * H
    # [BT]
    g = tl.load(g_ptr + offs, mask=offs_t < n - i_t * BT, other=0.0)
    tl.store(G_ptr + offs, tl.cumsum(g, axis=0), mask=offs_t < n - i_t * BT)


@triton.jit
def _state_fwd_kernel(
    k_ptr, v_ptr, G_ptr, states_ptr, final_ptr, n, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One [BK, BV] tile of the state, carried over the chunks in order. Grid (B*H, cdiv(K, BK), cdiv(V, BV)).

    states[b*H + h, c] = state before chunk c; final[b, h] = state after the last token.
    """
    tl.static_assert(BT >= 16 and BK >= 16 and BV >= 16, "tl.dot needs tiles of at least 16")
    i_bh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    # [BK, BV]
    state_offs = offs_k[:, None] * V + offs_v[None, :]
    state_mask = (offs_k[:, None] < K) & (offs_v[None, :] < V)

    h = tl.zeros([BK, BV], dtype=tl.float32)
    for i_t in range(NT):
        # -- the output kernel reads the state at the start of every chunk
        tl.store(states_ptr + (i_bh.to(tl.int64) * NT + i_t) * (K * V) + state_offs, h, mask=state_mask)
        row0 = i_b.to(tl.int64) * n + i_t * BT
        n_rows = n - i_t * BT
        # [BT, BK]
        k = tl.load(k_ptr + (row0 * H + i_h) * K + offs_t[:, None] * (H * K) + offs_k[None, :],
                    mask=(offs_t[:, None] < n_rows) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        # [BT, BV]
        v = tl.load(v_ptr + (row0 * H + i_h) * V + offs_t[:, None] * (H * V) + offs_v[None, :],
                    mask=(offs_t[:, None] < n_rows) & (offs_v[None, :] < V), other=0.0).to(tl.float32)
        # -- h <- exp(G_C) h + (k * exp(G_C - G))^T v; both exponents <= 0
        if USE_G:
            # [BT] chunk-local cumulative decay; G_C is the stored value at the chunk's last
            # token (not a re-summation), so exp(G_C - G) is exactly 1 there
            G = tl.load(G_ptr + row0 * H + i_h + offs_t * H, mask=offs_t < n_rows, other=0.0)
            G_last = tl.load(G_ptr + (row0 + tl.minimum(BT, n_rows) - 1) * H + i_h)
            k = k * tl.exp(G_last - G)[:, None]
            h = h * tl.exp(G_last)
        h = tl.dot(tl.trans(k), v, acc=h, input_precision=DOT_PRECISION)
    tl.store(final_ptr + i_bh.to(tl.int64) * (K * V) + state_offs, h, mask=state_mask)


@triton.jit
def _scores_and_state_product(q_ptr, k_ptr, states_ptr, state_base, row0, i_h, offs_t, offs_v, n_rows, decay,
                              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                              BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                              KEYS_TIMES_STATE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One chunk, walking Dk in BK slices: `(q k^T [BT, BT], x S [BT, BV])` with S the chunk's
    `[K, V]` state slice at `states_ptr + state_base` and x = q (forward output: S = h_c) or k
    (`KEYS_TIMES_STATE`, the dv backward: S = dh_c), each row scaled by `decay` when USE_G."""
    # [BT, BT]
    s = tl.zeros([BT, BT], dtype=tl.float32)
    # [BT, BV]
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        # [BT, BK]
        qk_offs = (row0 * H + i_h) * K + offs_t[:, None] * (H * K) + offs_k[None, :]
        qk_mask = (offs_t[:, None] < n_rows) & (offs_k[None, :] < K)
        q = tl.load(q_ptr + qk_offs, mask=qk_mask, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + qk_offs, mask=qk_mask, other=0.0).to(tl.float32)
        # [BK, BV]
        state = tl.load(states_ptr + state_base + offs_k[:, None] * V + offs_v[None, :],
                        mask=(offs_k[:, None] < K) & (offs_v[None, :] < V), other=0.0)
        s = tl.dot(q, tl.trans(k), acc=s, input_precision=DOT_PRECISION)
        x = k if KEYS_TIMES_STATE else q
        if USE_G:
            x = x * decay[:, None]
        acc = tl.dot(x, state, acc=acc, input_precision=DOT_PRECISION)
    return s, acc


@triton.jit
def _output_fwd_kernel(
    q_ptr, k_ptr, v_ptr, G_ptr, states_ptr, o_ptr, scale, n, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """o for one chunk and one [BV] slice of Dv. Grid (NT x B*H folded, cdiv(V, BV)); walks Dk in BK slices."""
    tl.static_assert(BT >= 16 and BK >= 16 and BV >= 16, "tl.dot needs tiles of at least 16")
    i_t, i_bh = tile_and_row(n, BT)
    i_v = tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    offs_t = tl.arange(0, BT)
    offs_v = i_v * BV + tl.arange(0, BV)
    row0 = i_b.to(tl.int64) * n + i_t * BT
    n_rows = n - i_t * BT
    state_base = (i_bh.to(tl.int64) * NT + i_t) * (K * V)
    if USE_G:
        # [BT]
        G = tl.load(G_ptr + row0 * H + i_h + offs_t * H, mask=offs_t < n_rows, other=0.0)
        q_decay = tl.exp(G)
    else:
        G = tl.zeros([BT], dtype=tl.float32)
        q_decay = G  # unread without decay

    # -- accumulate q k^T and (q * exp(G)) h_c over Dk
    s, o = _scores_and_state_product(q_ptr, k_ptr, states_ptr, state_base, row0, i_h, offs_t, offs_v, n_rows,
                                     q_decay, H, K, V, BT, BK, BV, USE_G, False, DOT_PRECISION)

    # -- add the intra-chunk term: decayed, causally masked scores times v
    s = s * _intra_chunk_weights(G, n_rows, BT, USE_G)
    # [BT, BV]
    v_offs = (row0 * H + i_h) * V + offs_t[:, None] * (H * V) + offs_v[None, :]
    v_mask = (offs_t[:, None] < n_rows) & (offs_v[None, :] < V)
    v = tl.load(v_ptr + v_offs, mask=v_mask, other=0.0).to(tl.float32)
    o = tl.dot(s, v, acc=o, input_precision=DOT_PRECISION)
    tl.store(o_ptr + v_offs, o * scale, mask=v_mask)


@triton.jit
def _state_bwd_kernel(
    q_ptr, do_ptr, G_ptr, dstates_ptr, scale, n, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One [BK, BV] tile of the state gradient, carried over the chunks in reverse.

    Grid (B*H, cdiv(K, BK), cdiv(V, BV)).

    dstates[b*H + h, c] = gradient of the state at the end of chunk c (0 for the last chunk).
    """
    tl.static_assert(BT >= 16 and BK >= 16 and BV >= 16, "tl.dot needs tiles of at least 16")
    i_bh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    # [BK, BV]
    state_offs = offs_k[:, None] * V + offs_v[None, :]
    state_mask = (offs_k[:, None] < K) & (offs_v[None, :] < V)

    dh = tl.zeros([BK, BV], dtype=tl.float32)
    for i_rev in range(NT):
        i_t = NT - 1 - i_rev
        tl.store(dstates_ptr + (i_bh.to(tl.int64) * NT + i_t) * (K * V) + state_offs, dh, mask=state_mask)
        row0 = i_b.to(tl.int64) * n + i_t * BT
        n_rows = n - i_t * BT
        # [BT, BK]
        q = tl.load(q_ptr + (row0 * H + i_h) * K + offs_t[:, None] * (H * K) + offs_k[None, :],
                    mask=(offs_t[:, None] < n_rows) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        # [BT, BV]
        do = tl.load(do_ptr + (row0 * H + i_h) * V + offs_t[:, None] * (H * V) + offs_v[None, :],
                     mask=(offs_t[:, None] < n_rows) & (offs_v[None, :] < V), other=0.0).to(tl.float32)
        # -- dh <- exp(G_C) dh + scale * (q * exp(G))^T do: the gradient of the state before this chunk
        if USE_G:
            # [BT]
            G = tl.load(G_ptr + row0 * H + i_h + offs_t * H, mask=offs_t < n_rows, other=0.0)
            G_last = tl.load(G_ptr + (row0 + tl.minimum(BT, n_rows) - 1) * H + i_h)
            q = q * tl.exp(G)[:, None]
            dh = dh * tl.exp(G_last)
        dh = tl.dot(tl.trans(q * scale), do, acc=dh, input_precision=DOT_PRECISION)


@triton.jit
def _dqk_bwd_kernel(
    q_ptr, k_ptr, v_ptr, G_ptr, do_ptr, states_ptr, dstates_ptr,
    dq_ptr, dk_ptr, dA_ptr, scale, n, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, NK: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq, dk of one chunk and one [BK] slice of Dk, and that slice's share of dL/dG.

    Grid (NT x B*H folded, cdiv(K, BK)); walks Dv in BV slices. dL/dG is linear in q_i . k_j, so
    each Dk slice writes its own share to dA[b, t, h, i_k] and the host adds them.
    """
    tl.static_assert(BT >= 16 and BK >= 16 and BV >= 16, "tl.dot needs tiles of at least 16")
    i_t, i_bh = tile_and_row(n, BT)
    i_k = tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    row0 = i_b.to(tl.int64) * n + i_t * BT
    n_rows = n - i_t * BT
    state_base = (i_bh.to(tl.int64) * NT + i_t) * (K * V)

    # -- load the chunk's queries and keys (this Dk slice)
    # [BT, BK]
    qk_offs = (row0 * H + i_h) * K + offs_t[:, None] * (H * K) + offs_k[None, :]
    qk_mask = (offs_t[:, None] < n_rows) & (offs_k[None, :] < K)
    q = tl.load(q_ptr + qk_offs, mask=qk_mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + qk_offs, mask=qk_mask, other=0.0).to(tl.float32)

    # -- walk Dv: accumulate do v^T and the cross-chunk products with the states
    # [BT, BK]
    dq_inter = tl.zeros([BT, BK], dtype=tl.float32)
    dk_inter = tl.zeros([BT, BK], dtype=tl.float32)
    # [BT, BT] do_i . v_j
    dov = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        offs_v = i_v * BV + tl.arange(0, BV)
        # [BT, BV]
        v_offs = (row0 * H + i_h) * V + offs_t[:, None] * (H * V) + offs_v[None, :]
        v_mask = (offs_t[:, None] < n_rows) & (offs_v[None, :] < V)
        v = tl.load(v_ptr + v_offs, mask=v_mask, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + v_offs, mask=v_mask, other=0.0).to(tl.float32)
        # [BK, BV] state before the chunk and gradient of the state after it
        state_offs = state_base + offs_k[:, None] * V + offs_v[None, :]
        state_mask = (offs_k[:, None] < K) & (offs_v[None, :] < V)
        h = tl.load(states_ptr + state_offs, mask=state_mask, other=0.0)
        dh = tl.load(dstates_ptr + state_offs, mask=state_mask, other=0.0)
        dov = tl.dot(do, tl.trans(v), acc=dov, input_precision=DOT_PRECISION)
        dq_inter = tl.dot(do, tl.trans(h), acc=dq_inter, input_precision=DOT_PRECISION)
        dk_inter = tl.dot(v, tl.trans(dh), acc=dk_inter, input_precision=DOT_PRECISION)

    # -- cross-chunk parts: dq_i = scale exp(G_i) do_i h^T, dk_j = exp(G_C - G_j) v_j dh^T
    if USE_G:
        # [BT]
        G = tl.load(G_ptr + row0 * H + i_h + offs_t * H, mask=offs_t < n_rows, other=0.0)
        G_last = tl.load(G_ptr + (row0 + tl.minimum(BT, n_rows) - 1) * H + i_h)
        dq_inter = dq_inter * (tl.exp(G) * scale)[:, None]
        dk_inter = dk_inter * tl.exp(G_last - G)[:, None]
    else:
        G = tl.zeros([BT], dtype=tl.float32)
        dq_inter = dq_inter * scale
    # -- intra-chunk parts: ds_ij = scale * D_ij (do_i . v_j)
    # [BT, BT]
    ds = dov * _intra_chunk_weights(G, n_rows, BT, USE_G) * scale
    # [BT, BK]
    dq = tl.dot(ds, k, acc=dq_inter, input_precision=DOT_PRECISION)
    dk = tl.dot(tl.trans(ds), q, acc=dk_inter, input_precision=DOT_PRECISION)
    tl.store(dq_ptr + qk_offs, dq, mask=qk_mask)
    tl.store(dk_ptr + qk_offs, dk, mask=qk_mask)

    if USE_G:
        # -- dL/dG_t = q_t . dq_t - k_t . dk_t without the diagonal pairs, which cancel exactly
        # [BT, BT] this slice's share of q_i . k_j
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        # [BT, BT] M_ij = scale * D_ij (q_i . k_j)(do_i . v_j) for j < i
        m = tl.where(offs_t[:, None] > offs_t[None, :], ds * s, 0.0)
        # [BT]
        dA = tl.sum(m, axis=1) - tl.sum(m, axis=0)
        dA += tl.sum(q * dq_inter, axis=1) - tl.sum(k * dk_inter, axis=1)
        tl.store(dA_ptr + (row0 * H + i_h) * NK + offs_t * (H * NK) + i_k, dA, mask=offs_t < n_rows)


@triton.jit
def _dv_bwd_kernel(
    q_ptr, k_ptr, G_ptr, do_ptr, dstates_ptr, dv_ptr, scale, n, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dv of one chunk and one [BV] slice of Dv. Grid (NT x B*H folded, cdiv(V, BV)); walks Dk in BK slices."""
    tl.static_assert(BT >= 16 and BK >= 16 and BV >= 16, "tl.dot needs tiles of at least 16")
    i_t, i_bh = tile_and_row(n, BT)
    i_v = tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    offs_t = tl.arange(0, BT)
    offs_v = i_v * BV + tl.arange(0, BV)
    row0 = i_b.to(tl.int64) * n + i_t * BT
    n_rows = n - i_t * BT
    state_base = (i_bh.to(tl.int64) * NT + i_t) * (K * V)
    if USE_G:
        # [BT]
        G = tl.load(G_ptr + row0 * H + i_h + offs_t * H, mask=offs_t < n_rows, other=0.0)
        G_last = tl.load(G_ptr + (row0 + tl.minimum(BT, n_rows) - 1) * H + i_h)
        k_decay = tl.exp(G_last - G)
    else:
        G = tl.zeros([BT], dtype=tl.float32)
        k_decay = G  # unread without decay

    # -- accumulate q k^T and the cross-chunk part (k * exp(G_C - G)) dh over Dk
    s, dv = _scores_and_state_product(q_ptr, k_ptr, dstates_ptr, state_base, row0, i_h, offs_t, offs_v, n_rows,
                                      k_decay, H, K, V, BT, BK, BV, USE_G, True, DOT_PRECISION)

    # -- intra-chunk part: dv_j += sum_i a_ij do_i, a the forward's scaled, decayed, masked scores
    # [BT, BT]
    a = s * _intra_chunk_weights(G, n_rows, BT, USE_G) * scale
    # [BT, BV]
    v_offs = (row0 * H + i_h) * V + offs_t[:, None] * (H * V) + offs_v[None, :]
    v_mask = (offs_t[:, None] < n_rows) & (offs_v[None, :] < V)
    do = tl.load(do_ptr + v_offs, mask=v_mask, other=0.0).to(tl.float32)
    dv = tl.dot(tl.trans(a), do, acc=dv, input_precision=DOT_PRECISION)
    tl.store(dv_ptr + v_offs, dv, mask=v_mask)


# -- host wrappers --------------------------------------------------------------------------


def _check(q, k, v, g, chunk_size) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v: expected 4-d [B, n, H, D], "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k: expected equal shapes [B, n, H, Dk] and v [B, n, H, Dv], "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if min(q.shape) < 1 or v.shape[3] < 1:
        raise ValueError(f"q, v: expected non-empty dims, got {tuple(q.shape)}, {tuple(v.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: expected float16, bfloat16 or float32, got {t.dtype}")
    if g is not None and tuple(g.shape) != tuple(q.shape[:3]):
        raise ValueError(f"g: expected None or [B, n, H] = {tuple(q.shape[:3])}, got {tuple(g.shape)}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: expected a power of two >= 16, got {chunk_size}")


class _Config:
    """Launch geometry shared by the forward and the backward of one problem."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor, chunk_size: int):
        self.B, self.n, self.H, self.K = q.shape
        self.V = v.shape[3]
        # a chunk never exceeds the (padded) sequence: n = 7 runs one 16-row chunk
        self.BT = min(chunk_size, max(16, triton.next_power_of_2(self.n)))
        self.NT = triton.cdiv(self.n, self.BT)
        self.BK = min(_MAX_TILE, max(16, triton.next_power_of_2(self.K)))
        self.BV = min(_MAX_TILE, max(16, triton.next_power_of_2(self.V)))
        self.NK = triton.cdiv(self.K, self.BK)
        self.NV = triton.cdiv(self.V, self.BV)
        self.precision = "ieee" if q.dtype == torch.float32 else "tf32"

    def kernel_args(self, use_g: bool) -> dict:
        return {"H": self.H, "K": self.K, "V": self.V, "BT": self.BT, "BK": self.BK, "BV": self.BV,
                "USE_G": use_g, "DOT_PRECISION": self.precision}


def _chunk_cumsum(g: torch.Tensor, cfg: _Config) -> torch.Tensor:
    """Chunk-local cumulative log decay `[B, n, H]` fp32."""
    G = _empty((cfg.B, cfg.n, cfg.H), g.device)
    _chunk_cumsum_kernel[folded_grid(cfg.n, cfg.BT, cfg.B * cfg.H)](g, G, cfg.n, H=cfg.H, BT=cfg.BT)
    return G


def _forward_states(k, v, G, cfg: _Config):
    """States before every chunk `[B*H, NT, Dk, Dv]` and the final state `[B, H, Dk, Dv]`."""
    states = _empty((cfg.B * cfg.H, cfg.NT, cfg.K, cfg.V), k.device)
    final = _empty((cfg.B, cfg.H, cfg.K, cfg.V), k.device)
    _state_fwd_kernel[(cfg.B * cfg.H, cfg.NK, cfg.NV)](
        k, v, k if G is None else G, states, final, cfg.n, cfg.NT, **cfg.kernel_args(G is not None),
    )
    return states, final


def chunk_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
                  scale: float, chunk_size: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention with per-token decay from a zero state.

    q, k `[B, n, H, Dk]`; v `[B, n, H, Dv]` (float16, bfloat16 or float32, any strides, same device);
    g None or `[B, n, H]` (log decay per token, <= 0; converted to fp32).
    Returns `(o [B, n, H, Dv] fp32, state [B, H, Dk, Dv] fp32)`, state = S_n the final state.
    `chunk_size` (a power of two >= 16) changes speed and rounding only.
    """
    _check(q, k, v, g, chunk_size)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cfg = _Config(q, v, chunk_size)
    G = None if g is None else _chunk_cumsum(g.float().contiguous(), cfg)
    states, final = _forward_states(k, v, G, cfg)

    o = _empty((cfg.B, cfg.n, cfg.H, cfg.V), q.device)
    _output_fwd_kernel[folded_grid(cfg.n, cfg.BT, cfg.B * cfg.H) + (cfg.NV,)](
        q, k, v, q if G is None else G, states, o, float(scale), cfg.n, cfg.NT, **cfg.kernel_args(G is not None),
    )
    return o, final


def chunk_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   g: Optional[torch.Tensor], scale: float, chunk_size: int = 64):
    """Gradients of `sum(o * do)` for `o` of `chunk_forward` (zero initial state, zero final-state gradient).

    do `[B, n, H, Dv]` (float16, bfloat16 or float32); the other arguments as in `chunk_forward`.
    Returns `(dq [B, n, H, Dk], dk [B, n, H, Dk], dv [B, n, H, Dv], dg [B, n, H] or None
    when g is None)`, all fp32.
    """
    _check(q, k, v, g, chunk_size)
    if tuple(do.shape) != tuple(v.shape):
        raise ValueError(f"do: expected the shape of v {tuple(v.shape)}, got {tuple(do.shape)}")
    if do.dtype not in _DTYPES:
        raise TypeError(f"do: expected float16, bfloat16 or float32, got {do.dtype}")
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    cfg = _Config(q, v, chunk_size)
    B, n, H, K, V, NT = cfg.B, cfg.n, cfg.H, cfg.K, cfg.V, cfg.NT
    use_g = g is not None
    G = _chunk_cumsum(g.float().contiguous(), cfg) if use_g else None
    # kernels without decay never read G; any pointer fills the slot
    G_arg = G if use_g else q
    args = cfg.kernel_args(use_g)

    # -- recompute the chunk-start states, then the end-of-chunk state gradients
    states, final = _forward_states(k, v, G, cfg)
    dstates = _empty((B * H, NT, K, V), q.device)
    _state_bwd_kernel[(B * H, cfg.NK, cfg.NV)](q, do, G_arg, dstates, float(scale), n, NT, **args)

    # -- every chunk in parallel: dq, dk and the Dk-slice shares of dL/dG; then dv
    dq = _empty((B, n, H, K), q.device)
    dk = _empty((B, n, H, K), q.device)
    dA = _empty((B, n, H, cfg.NK), q.device) if use_g else q
    _dqk_bwd_kernel[folded_grid(n, cfg.BT, B * H) + (cfg.NK,)](
        q, k, v, G_arg, do, states, dstates, dq, dk, dA, float(scale), n, NT, NK=cfg.NK, **args,
    )
    dv = _empty((B, n, H, V), q.device)
    _dv_bwd_kernel[folded_grid(n, cfg.BT, B * H) + (cfg.NV,)](q, k, G_arg, do, dstates, dv, float(scale), n, NT, **args)
    if not use_g:
        return dq, dk, dv, None

    # -- dg_s = sum over t >= s of dL/dG_t, in fp64, taken within s's chunk only, plus
    # <h_end, dh_end> of that chunk (its end state and that state's gradient from the later
    # chunks): the later chunks' terms sum to that inner product exactly. Summing them
    # instead adds rounding over the whole block: a per-head decay's gradient (the sum of
    # dg over every token) then lost accuracy in proportion to the length.
    BT = cfg.BT
    dG = dA.sum(-1, dtype=torch.float64)  # [B, n, H]
    dG = torch.nn.functional.pad(dG, (0, 0, 0, NT * BT - n)).view(B, NT, BT, H)
    dG = dG.flip(2).cumsum(2).flip(2)
    ends = torch.cat([states[:, 1:], final.reshape(B * H, 1, K, V)], 1)  # [B*H, NT, K, V]
    carried = (ends.double() * dstates.double()).sum((-1, -2)).view(B, H, NT).transpose(1, 2)  # [B, NT, H]
    dg = (dG + carried[:, :, None, :]).reshape(B, NT * BT, H)[:, :n].to(torch.float32)
    return dq, dk, dv, dg
