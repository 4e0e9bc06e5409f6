"""Offset blocks through kernels that know only "no mask" and "square causal" (imports no backend).

PyTorch's fused SDPA ops and flash-attn take no causal offset, so `square_pieces` cuts any
offset block exactly into at most three such pieces, and `pieces_forward` /
`pieces_backward` run a backend's piece kernel over them: a piece kernel is
`piece_fwd(q, k, v, scale, causal) -> (out, lse)` and
`piece_bwd(do, q, k, v, out, lse, scale, causal) -> (dq, dk, dv)`, bshd in and out. The
partial results of the pieces are merged with the reference merge (`merge.merge_`).

The NaN rule (block.py) for the fused pieces: PyTorch's CPU flash op breaks it by itself:
a row whose visible scores are all NaN and fewer than one vector (16 fp32 / 8 fp64 keys on
AVX-512, e.g. every row near the start of a causal piece) takes a scalar max that skips
NaN, looks fully masked and returns out = 0, lse = 0. `_nan_rows_` restores the rule for
every piece from the inputs' NaN rows (one pass over q, k and out; no host sync).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from .memory import acc_dtype
from .merge import merge_

Piece = Tuple[int, int, int, int, bool]


def square_pieces(nq: int, nk: int, offset: Optional[int]) -> List[Piece]:
    """Cut an offset-masked `[nq, nk]` block into unmasked and square-causal pieces.

    Returns `(q0, q1, k0, k1, causal)`; `causal` pieces are square (`q1-q0 == k1-k0`)
    with key j visible to query i iff `j <= i`. Rows that see no key are in no piece.
    """
    if nq == 0 or nk == 0:
        return []
    if offset is None or offset >= nk - 1:
        return [(0, nq, 0, nk, False)]
    first_row = max(0, -offset)
    if first_row >= nq:
        return []
    # keys [0, shared) are visible to every row from first_row on
    shared = first_row + offset
    stair = min(nq - first_row, nk - shared)
    pieces: List[Piece] = []
    if shared > 0:
        pieces.append((first_row, first_row + stair, 0, shared, False))
    pieces.append((first_row, first_row + stair, shared, shared + stair, True))
    if first_row + stair < nq:
        pieces.append((first_row + stair, nq, 0, nk, False))
    return pieces


# PyTorch's CPU flash op takes its row maximum element by element, skipping NaN, only for
# rows that see fewer keys than one vector holds (16 fp32 with AVX-512); wider rows reduce
# in vector registers, where NaN propagates. Rows seeing at least this many keys (a
# generous bound for any vector width) need no fix on CPU.
_CPU_VECTOR_KEYS = 64


def _nan_rows_(q, k, out, lse, causal):
    """Make NaN, in place, the rows of a fused piece's `(out, lse)` that see a NaN input
    (the NaN rule, block.py): rows of q holding a NaN, and rows that see a key holding one
    (an unmasked piece: every row; a square causal piece: rows from the first NaN key on).
    On CPU only the rows that see fewer than `_CPU_VECTOR_KEYS` keys can have dropped a
    NaN, so only those are checked (the first rows of a causal piece, or every row of a
    narrow unmasked one): the cost stays a small slice of the piece's. Returns `(out, lse)`;
    `out` `[B, n, H, D]`, `lse` `[B, H, n]`."""
    b, n, h, _ = q.shape
    if q.device.type == "cpu":
        rows = min(n, _CPU_VECTOR_KEYS) if causal else (n if k.shape[1] < _CPU_VECTOR_KEYS else 0)
        if rows == 0:
            return out, lse
        if rows < n:
            _nan_rows_slice_(q[:, :rows], k[:, :rows], out[:, :rows], lse[:, :, :rows], causal)
            return out, lse
    _nan_rows_slice_(q, k, out, lse, causal)
    return out, lse


def _nan_rows_slice_(q, k, out, lse, causal) -> None:
    b, n, h, _ = q.shape
    h_kv = k.shape[2]
    bad_k = k.isnan().any(-1)  # [B, nk, H_kv]
    if causal:
        bad_k = bad_k.cumsum(1, dtype=torch.int32) > 0
    else:
        bad_k = bad_k.any(1, keepdim=True)
    bad_k = bad_k[:, :, :, None].expand(-1, -1, -1, h // h_kv).reshape(b, -1, h)
    bad = q.isnan().any(-1) | bad_k  # [B, n, H]
    out.masked_fill_(bad[..., None], float("nan"))
    lse.masked_fill_(bad.transpose(1, 2), float("nan"))


def pieces_forward(piece_fwd: Callable, q, k, v, scale, offset):
    """Forward of an offset block through a kernel that knows only unmasked/square causal."""
    b, nq, h, d = q.shape
    pieces = square_pieces(nq, k.shape[1], offset)
    if len(pieces) == 1 and pieces[0][:2] == (0, nq):
        _, _, k0, k1, causal = pieces[0]
        part_out, part_lse = piece_fwd(q, k[:, k0:k1], v[:, k0:k1], scale, causal)
        return _nan_rows_(q, k[:, k0:k1], part_out, part_lse, causal)
    acc = acc_dtype(q.dtype)
    out = torch.zeros(b, nq, h, d, dtype=acc, device=q.device)
    lse = torch.full((b, h, nq), float("-inf"), dtype=acc, device=q.device)
    for q0, q1, k0, k1, causal in pieces:
        part_out, part_lse = piece_fwd(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], scale, causal)
        _nan_rows_(q[:, q0:q1], k[:, k0:k1], part_out, part_lse, causal)
        merge_(out[:, q0:q1], lse[:, :, q0:q1], part_out, part_lse)
    return out, lse


def pieces_backward(piece_bwd: Callable, do, q, k, v, out, lse, scale, offset):
    nq, nk = q.shape[1], k.shape[1]
    pieces = square_pieces(nq, nk, offset)
    if len(pieces) == 1 and pieces[0][:4] == (0, nq, 0, nk):
        return piece_bwd(do, q, k, v, out, lse, scale, pieces[0][4])
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for q0, q1, k0, k1, causal in pieces:
        dq_p, dk_p, dv_p = piece_bwd(
            do[:, q0:q1], q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], out[:, q0:q1], lse[:, :, q0:q1], scale, causal
        )
        dq[:, q0:q1] += dq_p
        dk[:, k0:k1] += dk_p
        dv[:, k0:k1] += dv_p
    return dq, dk, dv


# -- square causal pieces as a tree of smaller calls (CPU) -------------------------------

def causal_tree(n: int, leaf: int) -> Tuple[int, List[int]]:
    """The tree `causal_tree_forward` cuts a square causal piece of `n` rows into:
    `(n0, sizes)`. The first `n0 = leaf * 2^k` rows (the largest such `n0 <= n`, `k >= 1`)
    are `n0 / leaf` square causal leaves, run as one batched call, and for each `s` of
    `sizes` (`leaf, 2 leaf, .., n0 / 2`) the unmasked blocks of the rows `[2js + s,
    2js + 2s)` over the keys `[2js, 2js + s)`, every `j` in one batched call: together
    exactly the causal triangle of `n0`. The rows `[n0, n)` are an unmasked block over
    the keys `[0, n0)` and a square causal piece of their own (cut again if large enough).
    `n0 = 0` when `n < 2 leaf` (the piece stays whole)."""
    if n < 2 * leaf:
        return 0, []
    n0, sizes = leaf, []
    while 2 * n0 <= n:
        sizes.append(n0)
        n0 *= 2
    return n0, sizes


def _split_halves(x: torch.Tensor, n0: int, s: int, half: int) -> torch.Tensor:
    """Rows `[2js + half*s, 2js + (half+1)*s)` of `x[:, :n0]` for every j, as a batch:
    `[B * n0/(2s), s, ...]` (a view where the strides allow)."""
    b = x.shape[0]
    j = n0 // (2 * s)
    return x[:, :n0].reshape(b, j, 2, s, *x.shape[2:])[:, :, half].reshape(b * j, s, *x.shape[2:])


def causal_tree_forward(piece_fwd: Callable, q, k, v, scale, leaf: int, nan_fix: Optional[bool] = None):
    """A square causal piece through `piece_fwd` in the calls of `causal_tree`; returns
    `(out [B, n, H, Dv], lse [B, H, n])` in the accumulation dtype. The rows past the tree
    (`[n0, n)`) go back through `piece_fwd` as a causal piece of their own, so the backend
    decides again whether a tree pays for them.

    Why: PyTorch's CPU flash op computes a causal call nearly as if it were unmasked at
    small sizes (one thread, 8 heads x 64: a 512-row causal call took 97% of the unmasked
    call's time; 1024 rows 76%), while the tree's calls do about half the work of the
    triangle's square and merge the rest (timings: `backends/sdpa.py`).

    A leaf's rows see fewer keys than the op's vectors hold, so the op may drop a NaN in
    any of them: when q or k holds a NaN (one sum each tells, read on the host: the tree
    runs on CPUs only) every call's NaN rows are restored (`_nan_rows_`), and the NaN rule
    holds as before."""
    b, n, h, _ = q.shape
    n0, sizes = causal_tree(n, leaf)
    if nan_fix is None:
        nan_fix = bool(torch.isnan(q.sum()) or torch.isnan(k.sum()))
    fix = _nan_rows_ if nan_fix else (lambda *args: None)
    acc = acc_dtype(q.dtype)
    m = n0 // leaf
    dv = v.shape[3]
    lq, lk, lv = (x[:, :n0].reshape(b * m, leaf, *x.shape[2:]) for x in (q, k, v))
    leaf_out, leaf_lse = piece_fwd(lq, lk, lv, scale, True)
    fix(lq, lk, leaf_out, leaf_lse, True)
    del lq, lk, lv  # copies where the strides did not allow views
    leaf_lse = leaf_lse.to(acc).reshape(b, m, h, leaf).transpose(1, 2).reshape(b, h, n0)
    if n0 == n:  # the leaves' results are the accumulators (fresh tensors of the op)
        out, lse = leaf_out.to(acc).reshape(b, n, h, dv), leaf_lse.contiguous()
    else:
        out = torch.empty((b, n, h, dv), dtype=acc, device=q.device)
        lse = torch.empty((b, h, n), dtype=acc, device=q.device)
        out[:, :n0] = leaf_out.reshape(b, n0, h, dv)
        lse[:, :, :n0] = leaf_lse
    del leaf_out, leaf_lse
    for s in sizes:
        j = n0 // (2 * s)
        qs, ks, vs = _split_halves(q, n0, s, 1), _split_halves(k, n0, s, 0), _split_halves(v, n0, s, 0)
        part_out, part_lse = piece_fwd(qs, ks, vs, scale, False)
        fix(qs, ks, part_out, part_lse, False)
        del qs, ks, vs
        part_out = part_out.reshape(b, j, s, h, dv)
        part_lse = part_lse.reshape(b, j, h, s)
        rows_out = out[:, :n0].view(b, j, 2, s, h, dv)[:, :, 1]  # [B, j, s, H, Dv]
        rows_lse = lse[:, :, :n0].view(b, h, j, 2, s)[:, :, :, 1]  # [B, H, j, s]
        for i in range(b):  # merge_ takes [B, n, H, D] / [B, H, n]: j in the batch dim
            merge_(rows_out[i], rows_lse[i].transpose(0, 1), part_out[i], part_lse[i])
        del part_out, part_lse, rows_out, rows_lse
    if n0 < n:
        rest = slice(n0, n)
        tail_out, tail_lse = piece_fwd(q[:, rest], k[:, rest], v[:, rest], scale, True)
        fix(q[:, rest], k[:, rest], tail_out, tail_lse, True)
        out[:, rest] = tail_out
        lse[:, :, rest] = tail_lse
        del tail_out, tail_lse
        part_out, part_lse = piece_fwd(q[:, rest], k[:, :n0], v[:, :n0], scale, False)
        fix(q[:, rest], k[:, :n0], part_out, part_lse, False)
        merge_(out[:, rest], lse[:, :, rest], part_out, part_lse)
    return out, lse


def causal_tree_backward(piece_bwd: Callable, do, q, k, v, out, lse, scale, leaf: int):
    """Backward of `causal_tree_forward` (`out`, `lse`: the rows' final ones); returns
    `(dq, dk, dv)`, `[B, n, H, D]`-contiguous in the accumulation dtype. Besides the
    gradients it returns it holds one call's fresh gradients at a time (half the rows at
    most for a level; with `n0 < n` the leaves' while they are copied, and the tail's)."""
    b, n, h, _ = q.shape
    n0, sizes = causal_tree(n, leaf)
    acc = acc_dtype(q.dtype)
    m = n0 // leaf
    lse = lse.to(acc)
    leaves = [x[:, :n0].reshape(b * m, leaf, *x.shape[2:]) for x in (do, q, k, v, out)]
    leaf_lse = lse[:, :, :n0].reshape(b, h, m, leaf).transpose(1, 2).reshape(b * m, h, leaf)
    grads = piece_bwd(*leaves, leaf_lse, scale, True)
    del leaves, leaf_lse
    if n0 == n:  # the leaves' gradients are the accumulators
        dq, dk, dv = (g.to(acc).reshape(b, n, *g.shape[2:]) for g in grads)
    else:
        dq, dk, dv = (torch.empty((b, n) + ref.shape[2:], dtype=acc, device=q.device) for ref in (q, k, v))
        for full, g in zip((dq, dk, dv), grads):
            full[:, :n0] = g.reshape(b, n0, *g.shape[2:])
    del grads
    for s in sizes:
        j = n0 // (2 * s)
        rows = [_split_halves(x, n0, s, 1) for x in (do, q)]
        keys = [_split_halves(x, n0, s, 0) for x in (k, v)]
        rows_out = _split_halves(out, n0, s, 1)
        rows_lse = lse[:, :, :n0].reshape(b, h, j, 2, s)[:, :, :, 1].transpose(1, 2).reshape(b * j, h, s)
        gq, gk, gv = piece_bwd(*rows, *keys, rows_out, rows_lse, scale, False)
        del rows, keys, rows_out, rows_lse
        dq[:, :n0].view(b, j, 2, s, *dq.shape[2:])[:, :, 1] += gq.view(b, j, s, *gq.shape[2:])
        dk[:, :n0].view(b, j, 2, s, *dk.shape[2:])[:, :, 0] += gk.view(b, j, s, *gk.shape[2:])
        dv[:, :n0].view(b, j, 2, s, *dv.shape[2:])[:, :, 0] += gv.view(b, j, s, *gv.shape[2:])
        del gq, gk, gv
    if n0 < n:
        rest = slice(n0, n)
        gq, gk, gv = piece_bwd(do[:, rest], q[:, rest], k[:, rest], v[:, rest], out[:, rest], lse[:, :, rest], scale,
                               True)
        dq[:, rest], dk[:, rest], dv[:, rest] = gq, gk, gv
        del gq, gk, gv
        gq, gk, gv = piece_bwd(do[:, rest], q[:, rest], k[:, :n0], v[:, :n0], out[:, rest], lse[:, :, rest], scale,
                               False)
        dq[:, rest] += gq
        dk[:, :n0] += gk
        dv[:, :n0] += gv
    return dq, dk, dv


# -- windows: blocks with a lower bound ---------------------------------------------------

def band_blocks(nq: int, nk: int, offset: Optional[int], lo: int) -> List[Tuple[int, int, int, int, Optional[int],
                                                                                Optional[int]]]:
    """Cut a band block (key j visible to query i iff `lo <= j - i <= offset`) into
    one-sided blocks `(q0, q1, k0, k1, offset', lo')`, exactly one of `offset'`, `lo'` set.

    Rows go in chunks of W = offset - lo + 1. For chunk rows [r0, r1), keys below r0 + offset
    satisfy the upper bound for every row of the chunk (only `lo` binds), and keys from
    r0 + offset on satisfy the lower bound (j >= r0 + offset = (r1 - 1) + lo at most): two
    one-sided blocks per chunk, none overlapping, together the band."""
    if offset is None:
        return [(0, nq, 0, nk, None, lo)]
    width = offset - lo + 1
    blocks = []
    for r0 in range(0, nq, width):
        r1 = min(nq, r0 + width)
        a, b = max(0, r0 + lo), max(0, min(nk, r0 + offset))
        if a < b:
            blocks.append((r0, r1, a, b, None, r0 + lo - a))
        c, d = max(0, r0 + offset), min(nk, r1 + offset)
        if c < d:
            blocks.append((r0, r1, c, d, r0 + offset - c, None))
    return blocks


def band_forward(fwd: Callable, q, k, v, scale, offset, lo):
    """Forward of a band block through `fwd(q, k, v, scale, offset)`, which takes only an
    upper bound: a lower-bound block is an upper-bound block of the reversed rows and keys
    (`j - i >= lo` iff `j' - i' <= nk - nq - lo` with `i' = nq-1-i`, `j' = nk-1-j`)."""
    b, nq, h, d = q.shape
    acc = acc_dtype(q.dtype)
    out = torch.zeros(b, nq, h, d, dtype=acc, device=q.device)
    lse = torch.full((b, h, nq), float("-inf"), dtype=acc, device=q.device)
    for q0, q1, k0, k1, upper, lower in band_blocks(nq, k.shape[1], offset, lo):
        qs, ks, vs = q[:, q0:q1], k[:, k0:k1], v[:, k0:k1]
        if lower is None:
            part_out, part_lse = fwd(qs, ks, vs, scale, upper)
        else:
            m, n = q1 - q0, k1 - k0
            part_out, part_lse = fwd(qs.flip(1), ks.flip(1), vs.flip(1), scale, n - m - lower)
            part_out, part_lse = part_out.flip(1), part_lse.flip(2)
        merge_(out[:, q0:q1], lse[:, :, q0:q1], part_out, part_lse)
    return out, lse


def band_backward(bwd: Callable, do, q, k, v, out, lse, scale, offset, lo):
    """Backward of `band_forward` through `bwd(do, q, k, v, out, lse, scale, offset)`."""
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for q0, q1, k0, k1, upper, lower in band_blocks(q.shape[1], k.shape[1], offset, lo):
        rows = (do[:, q0:q1], q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], out[:, q0:q1], lse[:, :, q0:q1])
        if lower is None:
            dq_p, dk_p, dv_p = bwd(*rows, scale, upper)
        else:
            m, n = q1 - q0, k1 - k0
            flipped = [t.flip(2 if t is rows[5] else 1) for t in rows]
            dq_p, dk_p, dv_p = (g.flip(1) for g in bwd(*flipped, scale, n - m - lower))
        dq[:, q0:q1] += dq_p
        dk[:, k0:k1] += dk_p
        dv[:, k0:k1] += dv_p
    return dq, dk, dv
