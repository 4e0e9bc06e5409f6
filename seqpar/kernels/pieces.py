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
