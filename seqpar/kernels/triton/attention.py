"""Block attention with log-sum-exp in Triton (flash-attention-2 schedule), forward and backward.

Same calling convention as `block.torch_forward` / `block.torch_backward`:

    forward(q, k, v, scale, offset)                      -> out [B, nq, H, D] fp32, lse [B, H, nq] fp32
    backward(do, q, k, v, out, lse, scale, offset)       -> dq, dk, dv (fp32, shapes of q, k, v)

`q` `[B, nq, H, D]`, `k`/`v` `[B, nk, H_kv, D]` with `H % H_kv == 0`, any strides, float16,
bfloat16 or float32 (accumulation in fp32; fp32 dots in IEEE precision, never TF32).
`offset`: None (every key visible) or an int: key j is visible to query i iff `j <= i + offset`.
Rows that see no key get `lse = -inf`, `out = 0`.

Schedule (program = one tile of rows of one head):
- forward: query tile x key tiles with the online softmax. Key tiles that every row of the
  tile sees run without a mask; the tiles on the mask's diagonal (and the last, partial
  tile) run masked; key tiles past the last visible key are never visited.
- GQA: query head h reads KV head h // (H / H_kv); K/V are never repeated.
- backward (the block receives the *final* merged `out`/`lse` of its rows, see block.py):
  1. delta = rowsum(dO * O) per query row,
  2. dK/dV: one program per key tile of a KV head loops over the query heads of its group
     and the query tiles that see the key tile (so the group's sum needs no atomics),
  3. dQ: one program per query tile loops over the key tiles it sees.
  No atomics: the results are deterministic.

Head dims that are not powers of two are padded to the next one (at least 16, the smallest
`tl.dot`) with masked loads and stores.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .grid import folded_grid, tile_and_row

# constexpr: the only globals a @triton.jit function may read
LOG2E = tl.constexpr(1.4426950408889634)  # the kernels use exp2; scores are scaled by log2(e)
LN2 = tl.constexpr(0.6931471805599453)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # one padded head row must fit a tile in registers


# -- forward ---------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    """tanh in fp32, within a few ulps everywhere (Triton has no tanh the CPU interpreter
    runs): the [7/6] Pade approximant of Lambert's continued fraction for |x| <= 1 (its
    error there is below 3e-12 relative), `(1 - e) / (1 + e)` with `e = exp(-2|x|)` above
    (no cancellation once |x| > 1). NaN stays NaN, +-inf gives +-1."""
    a = tl.abs(x)
    x2 = x * x
    pade = x * (135135.0 + x2 * (17325.0 + x2 * (378.0 + x2))) / (135135.0 + x2 * (62370.0 + x2 * (3150.0 + 28.0 * x2)))
    e = tl.math.exp2(a * -2.8853900817779268)  # exp(-2|x|) = 2^(-2 log2(e) |x|)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    return tl.where(a <= 1.0, pade, big)


@triton.jit
def _key_tile_scores(q, kT_ptrs, cols, offs_m, d_ok, n_k, offset, qk_scale, softcap2,
                     MASKED: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """`(K^T [D, BN], scores [BM, BN] in log2 units, tanh of the capped scores)` of one key
    tile for a query tile; a masked stage (it may reach past the last key) sets invisible
    scores to -inf. With SOFTCAP a score s becomes `c tanh(s / c)` (`softcap2` is c in log2
    units); the tanh is returned for the backward's `1 - tanh^2` (else the scores again)."""
    if MASKED:
        kT = tl.load(kT_ptrs, mask=d_ok[:, None] & (cols[None, :] < n_k), other=0.0)
    else:
        kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
    qk = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
    t = qk
    if SOFTCAP:
        t = _tanh(qk / softcap2)
        qk = softcap2 * t
    if MASKED:
        # after the scaling: a negative scale must not turn -inf into +inf
        visible = cols[None, :] < n_k
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + offset)
        qk = tl.where(visible, qk, float("-inf"))
    return kT, qk, t


@triton.jit
def _fwd_key_tiles(acc, l_i, m_i, q, kT_ptrs, v_ptrs, stride_kn, stride_vn,
                   lo, hi, offs_m, offs_n, offs_d, n_k, offset, qk_scale, softcap2,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the key tiles [lo, hi); kT_ptrs / v_ptrs point at key `lo`."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        # -- V (a masked stage may reach past the last key), and the scores in log2 units
        if MASKED:
            v = tl.load(v_ptrs, mask=(cols[:, None] < n_k) & d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        # [BM, BN]
        _, qk, _ = _key_tile_scores(q, kT_ptrs, cols, offs_m, d_ok, n_k, offset, qk_scale, softcap2, MASKED, CAUSAL,
                                    SOFTCAP, PRECISION)
        # -- update m_i and l_i (a row that has seen no key yet keeps m = -inf, l = 0)
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- update the output accumulator
        # [BM, D]
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_ij
        kT_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse,
              stride_qb, stride_qn, stride_qh, stride_qd,
              stride_kb, stride_kn, stride_kh, stride_kd,
              stride_vb, stride_vn, stride_vh, stride_vd,
              stride_ob, stride_on, stride_oh, stride_od,
              stride_lb, stride_lh, stride_ln,
              n_q, n_k, heads, group, offset, qk_scale, softcap2,
              CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)  # tl.dot's smallest tile
    tile, off_bh = tile_and_row(n_q, BLOCK_M)
    start_m = tile * BLOCK_M
    off_b = off_bh // heads
    off_h = off_bh % heads
    off_hk = off_h // group  # GQA: the KV head this query head reads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n_q
    d_ok = offs_d < HEAD_DIM

    # -- which key tiles this query tile visits
    last_row = tl.minimum(start_m + BLOCK_M, n_q) - 1
    if CAUSAL:
        # keys [0, full) are visible to every row of the tile; [full, hi) to some of them
        hi = tl.minimum(tl.maximum(last_row + offset + 1, 0), n_k)
        full = tl.minimum(tl.maximum(start_m + offset + 1, 0), n_k) // BLOCK_N * BLOCK_N
    else:
        hi = n_k
        full = n_k // BLOCK_N * BLOCK_N

    # 64-bit base offsets: B * n * H * D may pass 2^31 elements
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + start_m.to(tl.int64) * stride_qn
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    # [BM, D]
    q = tl.load(q_base + tl.arange(0, BLOCK_M)[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # [D, BN] and [BN, D] at key 0
    kT_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # -- stage 1: key tiles every row sees, no mask
    acc, l_i, m_i = _fwd_key_tiles(acc, l_i, m_i, q, kT_ptrs, v_ptrs, stride_kn, stride_vn,
                                   0, full, offs_m, offs_n, offs_d, n_k, offset, qk_scale, softcap2,
                                   False, CAUSAL, SOFTCAP, HEAD_DIM, BLOCK_N, PRECISION)
    # -- stage 2: the diagonal and the last partial tile, masked; stops at the last visible key
    acc, l_i, m_i = _fwd_key_tiles(acc, l_i, m_i, q,
                                   kT_ptrs + tl.cast(full, tl.int64) * stride_kn, v_ptrs + tl.cast(full, tl.int64) * stride_vn,
                                   stride_kn, stride_vn, full, hi, offs_m, offs_n, offs_d, n_k, offset, qk_scale,
                                   softcap2, True, CAUSAL, SOFTCAP, HEAD_DIM, BLOCK_N, PRECISION)

    # -- epilogue: normalise; rows that saw no key keep out = 0 and get lse = -inf. A row
    # that saw a NaN score has l = NaN: `!= 0` counts it as seen, so out and lse stay NaN
    # (block.py's NaN rule; `> 0` would have given it lse = -inf)
    seen = l_i != 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh + start_m.to(tl.int64) * stride_on
    tl.store(o_base + tl.arange(0, BLOCK_M)[:, None] * stride_on + offs_d[None, :] * stride_od, out,
             mask=row_ok[:, None] & d_ok[None, :])
    l_base = Lse + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh
    tl.store(l_base + offs_m.to(tl.int64) * stride_ln, lse, mask=row_ok)


# -- backward --------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess(Out, DO, Delta,
                    stride_ob, stride_on, stride_oh, stride_od,
                    stride_db, stride_dn, stride_dh, stride_dd,
                    n_q, heads,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, stored contiguous [B, H, nq]."""
    tile, off_bh = tile_and_row(n_q, BLOCK_M)
    start_m = tile * BLOCK_M
    off_b = off_bh // heads
    off_h = off_bh % heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    rows = tl.arange(0, BLOCK_M)[:, None]
    o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh + start_m.to(tl.int64) * stride_on
    do_base = DO + off_b.to(tl.int64) * stride_db + off_h.to(tl.int64) * stride_dh + start_m.to(tl.int64) * stride_dn
    # [BM, D]
    o = tl.load(o_base + rows * stride_on + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_base + rows * stride_dn + offs_d[None, :] * stride_dd, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    tl.store(Delta + off_bh.to(tl.int64) * n_q + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def _load_row_stats(Lse, Delta, offs_m, n_q, stride_ln):
    """lse (in log2 units) and delta of the query rows `offs_m` of one head.

    Rows past n_q get lse = +inf, so exp2(s - lse) = 0 and they drop out of every sum
    without a mask; rows that saw no key (lse = -inf) use 0, like the torch reference
    (their scores are all masked, so p = 0 for them as well)."""
    row_ok = offs_m < n_q
    lse = tl.load(Lse + offs_m.to(tl.int64) * stride_ln, mask=row_ok, other=float("inf")).to(tl.float32)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E
    delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_query_tiles(dk, dv, k, v, Q, DO, Lse, Delta,
                      stride_qn, stride_qd, stride_dn, stride_dd, stride_ln,
                      lo, hi, offs_n, offs_d, n_q, offset, qk_scale, softcap2,
                      MASKED: tl.constexpr, SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """Add the query tiles [lo, hi) of one query head to dK/dV of one key tile.

    Q, DO point at row 0 of that head; Lse, Delta at its lse / delta rows."""
    d_ok = offs_d < HEAD_DIM
    rows = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + rows
        row_ok = offs_m < n_q
        # -- load Q^T and dO of the tile
        # [D, BM] and [BM, D]
        qT = tl.load(Q + start_m.to(tl.int64) * stride_qn + rows[None, :] * stride_qn + offs_d[:, None] * stride_qd,
                     mask=d_ok[:, None] & row_ok[None, :], other=0.0)
        do = tl.load(DO + start_m.to(tl.int64) * stride_dn + rows[:, None] * stride_dn + offs_d[None, :] * stride_dd,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse, delta = _load_row_stats(Lse, Delta, offs_m, n_q, stride_ln)
        # -- P^T = exp2(S^T - lse) with the global lse: the block's exact share
        # [BN, BM]
        qkT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale
        tT = qkT
        if SOFTCAP:
            tT = _tanh(qkT / softcap2)
            qkT = softcap2 * tT
        if MASKED:
            qkT = tl.where(offs_n[:, None] <= offs_m[None, :] + offset, qkT, float("-inf"))
        pT = tl.math.exp2(qkT - lse[None, :])
        # -- dV += P^T dO
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        # -- dS^T = P^T * (dP^T - delta), dP^T = V dO^T
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:  # d(c tanh(s / c)) / ds = 1 - tanh^2
            dsT = dsT * (1.0 - tT * tT)
        # -- dK += dS^T Q (the softmax scale is applied once, at the end)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV,
                   stride_qb, stride_qn, stride_qh, stride_qd,
                   stride_kb, stride_kn, stride_kh, stride_kd,
                   stride_vb, stride_vn, stride_vh, stride_vd,
                   stride_db, stride_dn, stride_dh, stride_dd,
                   stride_lb, stride_lh, stride_ln,
                   stride_dkb, stride_dkn, stride_dkh, stride_dkd,
                   stride_dvb, stride_dvn, stride_dvh, stride_dvd,
                   n_q, n_k, heads, kv_heads, group, offset, qk_scale, scale, softcap2,
                   CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    tile, off_bh = tile_and_row(n_k, BLOCK_N)
    start_n = tile * BLOCK_N
    off_b = off_bh // kv_heads
    off_hk = off_bh % kv_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_N)
    kv_mask = (offs_n[:, None] < n_k) & (offs_d[None, :] < HEAD_DIM)

    # -- which query tiles see this key tile
    if CAUSAL:
        # rows [lo, full) see part of the tile (masked), rows [full, n_q) all of it
        last_col = tl.minimum(start_n + BLOCK_N, n_k) - 1
        lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
        full = tl.cdiv(tl.maximum(last_col - offset, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(full, n_q)
    else:
        lo = 0
        full = 0
        mid = 0

    # [BN, D]
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh + start_n.to(tl.int64) * stride_kn
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh + start_n.to(tl.int64) * stride_vn
    k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # -- the query heads of this KV head's group all add into its dK/dV, in order
    for g in range(0, group):
        off_h = off_hk * group + g
        q_head = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        do_head = DO + off_b.to(tl.int64) * stride_db + off_h.to(tl.int64) * stride_dh
        lse_head = Lse + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh
        delta_head = Delta + (off_b * heads + off_h).to(tl.int64) * n_q
        dk, dv = _dkdv_query_tiles(dk, dv, k, v, q_head, do_head, lse_head, delta_head,
                                   stride_qn, stride_qd, stride_dn, stride_dd, stride_ln,
                                   lo, mid, offs_n, offs_d, n_q, offset, qk_scale, softcap2,
                                   True, SOFTCAP, HEAD_DIM, BLOCK_M, PRECISION)
        dk, dv = _dkdv_query_tiles(dk, dv, k, v, q_head, do_head, lse_head, delta_head,
                                   stride_qn, stride_qd, stride_dn, stride_dd, stride_ln,
                                   full, n_q, offs_n, offs_d, n_q, offset, qk_scale, softcap2,
                                   False, SOFTCAP, HEAD_DIM, BLOCK_M, PRECISION)

    dk = dk * scale
    dk_base = DK + off_b.to(tl.int64) * stride_dkb + off_hk.to(tl.int64) * stride_dkh + start_n.to(tl.int64) * stride_dkn
    dv_base = DV + off_b.to(tl.int64) * stride_dvb + off_hk.to(tl.int64) * stride_dvh + start_n.to(tl.int64) * stride_dvn
    tl.store(dk_base + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk, mask=kv_mask)
    tl.store(dv_base + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv, mask=kv_mask)


@triton.jit
def _dq_key_tiles(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kn, stride_vn,
                  lo, hi, offs_m, offs_n, offs_d, n_k, offset, qk_scale, softcap2,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Add the key tiles [lo, hi) to dQ of one query tile; kT_ptrs / vT_ptrs point at key `lo`."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        # [D, BN]
        if MASKED:
            vT = tl.load(vT_ptrs, mask=d_ok[:, None] & (cols[None, :] < n_k), other=0.0)
        else:
            vT = tl.load(vT_ptrs, mask=d_ok[:, None], other=0.0)
        # -- P = exp2(S - lse)
        # [D, BN], [BM, BN]
        kT, qk, t = _key_tile_scores(q, kT_ptrs, cols, offs_m, d_ok, n_k, offset, qk_scale, softcap2, MASKED, CAUSAL,
                                     SOFTCAP, PRECISION)
        p = tl.math.exp2(qk - lse[:, None])
        # -- dS = P * (dP - delta), dP = dO V^T
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:  # d(c tanh(s / c)) / ds = 1 - tanh^2
            ds = ds * (1.0 - t * t)
        # -- dQ += dS K
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)
        kT_ptrs += BLOCK_N * stride_kn
        vT_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, Lse, Delta, DQ,
                 stride_qb, stride_qn, stride_qh, stride_qd,
                 stride_kb, stride_kn, stride_kh, stride_kd,
                 stride_vb, stride_vn, stride_vh, stride_vd,
                 stride_db, stride_dn, stride_dh, stride_dd,
                 stride_lb, stride_lh, stride_ln,
                 stride_dqb, stride_dqn, stride_dqh, stride_dqd,
                 n_q, n_k, heads, group, offset, qk_scale, scale, softcap2,
                 CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    tile, off_bh = tile_and_row(n_q, BLOCK_M)
    start_m = tile * BLOCK_M
    off_b = off_bh // heads
    off_h = off_bh % heads
    off_hk = off_h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_M)
    mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)

    # -- the same key tiles as the forward visits
    last_row = tl.minimum(start_m + BLOCK_M, n_q) - 1
    if CAUSAL:
        hi = tl.minimum(tl.maximum(last_row + offset + 1, 0), n_k)
        full = tl.minimum(tl.maximum(start_m + offset + 1, 0), n_k) // BLOCK_N * BLOCK_N
    else:
        hi = n_k
        full = n_k // BLOCK_N * BLOCK_N

    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + start_m.to(tl.int64) * stride_qn
    do_base = DO + off_b.to(tl.int64) * stride_db + off_h.to(tl.int64) * stride_dh + start_m.to(tl.int64) * stride_dn
    # [BM, D]
    q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dn + offs_d[None, :] * stride_dd, mask=mask, other=0.0)
    lse, delta = _load_row_stats(Lse + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh,
                                 Delta + off_bh.to(tl.int64) * n_q, offs_m, n_q, stride_ln)
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    # [D, BN] at key 0
    kT_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    vT_ptrs = v_base + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_key_tiles(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kn, stride_vn,
                       0, full, offs_m, offs_n, offs_d, n_k, offset, qk_scale, softcap2,
                       False, CAUSAL, SOFTCAP, HEAD_DIM, BLOCK_N, PRECISION)
    dq = _dq_key_tiles(dq, q, do, lse, delta,
                       kT_ptrs + tl.cast(full, tl.int64) * stride_kn, vT_ptrs + tl.cast(full, tl.int64) * stride_vn,
                       stride_kn, stride_vn, full, hi, offs_m, offs_n, offs_d, n_k, offset, qk_scale,
                       softcap2, True, CAUSAL, SOFTCAP, HEAD_DIM, BLOCK_N, PRECISION)
    dq = dq * scale
    dq_base = DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh + start_m.to(tl.int64) * stride_dqn
    tl.store(dq_base + rows[:, None] * stride_dqn + offs_d[None, :] * stride_dqd, dq, mask=mask)


# -- host side -------------------------------------------------------------------------

# whether these kernels were decorated under TRITON_INTERPRET=1 (the CPU interpreter):
# triton reads the variable when `@triton.jit` runs, i.e. when this module is imported
INTERPRETED = type(_attn_fwd).__name__ == "InterpretedFunction"


def head_block(head_dim: int) -> int:
    """The padded head dim: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, 16-bit or fp32 inputs, and padded
# head dim (up to 64 / 128 / 256). BLOCK_M counts query rows, BLOCK_N keys; in "dkdv" the
# key tile stays and query tiles stream past it, in "fwd" and "dq" the other way round.
# Chosen without a GPU: each compiles for sm_80 and sm_90 within their shared memory and,
# by ptxas' resource usage, without register spills on sm_90 (sm_80: at most 24 bytes of
# stack). None was timed: bench/kernels.py measures them against SDPA and flash-attn.
_TILES = {
    ("fwd", False): {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)},
    ("fwd", True): {64: (64, 32, 8, 2), 128: (32, 16, 4, 2), 256: (32, 16, 4, 1)},
    ("dkdv", False): {64: (32, 64, 4, 3), 128: (32, 32, 4, 2), 256: (16, 32, 4, 1)},
    ("dkdv", True): {64: (16, 16, 4, 1), 128: (16, 16, 4, 1), 256: (16, 16, 4, 1)},
    ("dq", False): {64: (64, 32, 4, 2), 128: (64, 32, 4, 2), 256: (32, 16, 4, 1)},
    ("dq", True): {64: (32, 16, 4, 1), 128: (32, 16, 4, 1), 256: (16, 16, 4, 1)},
}


def _tiles(kind: str, block_d: int, dtype: torch.dtype) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a kernel ("fwd", "dkdv" or "dq").

    The interpreter costs per operation, not per element: large tiles, few programs (the
    kernel tests choose small tiles themselves, to cross tile edges)."""
    if INTERPRETED:
        return 64, 64, 1, 1
    by_dim = _TILES[(kind, dtype == torch.float32)]
    return by_dim[min(d for d in by_dim if d >= block_d)]


def _mask(n_q: int, n_k: int, offset: Optional[int]) -> Optional[Tuple[bool, int]]:
    """(causal, offset) reduced to what the block needs, or None when no row sees a key."""
    if n_q == 0 or n_k == 0:
        return None
    if offset is None:
        return False, 0
    offset = int(offset)
    if offset >= n_k - 1:  # even row 0 sees every key
        return False, 0
    if offset + n_q - 1 < 0:  # even the last row sees no key
        return None
    return True, offset


def _strides(x: torch.Tensor):
    return tuple(x.stride())


def _check(name: str, x: torch.Tensor, like: torch.Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name}: the triton backend takes float16, bfloat16 or float32, got {x.dtype}")
    if x.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (that of q), got {x.device}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected 4 dims [B, n, H, D], got shape {tuple(x.shape)}")


def _check_inputs(q, k, v) -> Tuple[int, int, int, int, int, int]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check(name, x, q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: expected the dtype of q ({q.dtype}), got {k.dtype} and {v.dtype}")
    b, n_q, heads, head_dim = q.shape
    n_k, kv_heads = k.shape[1], k.shape[2]
    if tuple(k.shape) != (b, n_k, kv_heads, head_dim) or tuple(v.shape) != tuple(k.shape):
        raise ValueError(
            f"k, v: expected shape [B={b}, n_k, H_kv, D={head_dim}] each, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k: expected KV heads dividing the query heads ({heads}), got {kv_heads}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q: the triton backend takes head_dim <= {MAX_HEAD_DIM}, got {head_dim}")
    return b, n_q, n_k, heads, kv_heads, head_dim


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, offset: Optional[int], *,
            softcap: float = 0.0, block_m: Optional[int] = None,
            block_n: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block attention: `(out [B, nq, H, D] fp32, lse [B, H, nq] fp32)`.

    `softcap` > 0: every score s = scale q.k becomes `softcap * tanh(s / softcap)`.
    `block_m`/`block_n` override the tile sizes (powers of two >= 16; tests use them)."""
    b, n_q, n_k, heads, kv_heads, head_dim = _check_inputs(q, k, v)
    out = torch.empty(b, n_q, heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, heads, n_q, dtype=torch.float32, device=q.device)
    mask = _mask(n_q, n_k, offset)
    if mask is None or b * heads == 0:  # a fully masked block is never computed
        return out.zero_(), lse.fill_(float("-inf"))
    causal, off = mask
    block_d = head_block(head_dim)
    bm, bn, warps, stages = _tiles("fwd", block_d, q.dtype)
    bm, bn = block_m or bm, block_n or bn
    grid = folded_grid(n_q, bm, b * heads)
    _attn_fwd[grid](
        q, k, v, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(lse),
        n_q, n_k, heads, heads // kv_heads, off, scale * LOG2E.value, _softcap2(softcap),
        CAUSAL=causal, SOFTCAP=softcap > 0, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
        PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages,
    )
    return out, lse


def _softcap2(softcap: float) -> float:
    """The softcap in the kernels' log2 units (1.0 when there is none: never used then)."""
    return float(softcap) * LOG2E.value if softcap > 0 else 1.0


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get IEEE fp32 dots: TF32 (triton's default) would lose the fp32 accuracy
    # the strategies are tested to (within 2x of dense fp32 attention)
    return "ieee" if dtype == torch.float32 else "tf32"


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, scale: float, offset: Optional[int], *, softcap: float = 0.0,
             block_m: Optional[int] = None, block_n: Optional[int] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients `(dq, dk, dv)` in fp32 of this block, given the final `out`/`lse` of its rows.

    `block_m`/`block_n` override the query / key tile sizes of both gradient kernels."""
    b, n_q, n_k, heads, kv_heads, head_dim = _check_inputs(q, k, v)
    for name, x, shape in (("do", do, q.shape), ("out", out, q.shape), ("lse", lse, (b, heads, n_q))):
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (that of q), got {x.device}")
    if do.dtype != q.dtype:
        # dO enters the tensor-core dots with Q, K, V: one dtype for all
        do = do.to(q.dtype)
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.empty(v.shape, dtype=torch.float32, device=q.device)
    mask = _mask(n_q, n_k, offset)
    if mask is None or b * heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    causal, off = mask
    block_d = head_block(head_dim)
    group = heads // kv_heads
    precision = _precision(q.dtype)

    # -- 1. delta = rowsum(dO * O)
    delta = torch.empty(b, heads, n_q, dtype=torch.float32, device=q.device)
    pre_m = max(16, min(128, 8192 // block_d))
    _bwd_preprocess[folded_grid(n_q, pre_m, b * heads)](
        out, do, delta, *_strides(out), *_strides(do), n_q, heads,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=pre_m,
    )
    # -- 2. dK, dV: one program per key tile of a KV head
    bm, bn, warps, stages = _tiles("dkdv", block_d, q.dtype)
    bm, bn = block_m or bm, block_n or bn
    _attn_bwd_dkdv[folded_grid(n_k, bn, b * kv_heads)](
        q, k, v, do, lse, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(lse), *_strides(dk), *_strides(dv),
        n_q, n_k, heads, kv_heads, group, off, scale * LOG2E.value, scale, _softcap2(softcap),
        CAUSAL=causal, SOFTCAP=softcap > 0, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
        PRECISION=precision, num_warps=warps, num_stages=stages,
    )
    # -- 3. dQ: one program per query tile
    bm, bn, warps, stages = _tiles("dq", block_d, q.dtype)
    bm, bn = block_m or bm, block_n or bn
    _attn_bwd_dq[folded_grid(n_q, bm, b * heads)](
        q, k, v, do, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(lse), *_strides(dq),
        n_q, n_k, heads, group, off, scale * LOG2E.value, scale, _softcap2(softcap),
        CAUSAL=causal, SOFTCAP=softcap > 0, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
        PRECISION=precision, num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv
