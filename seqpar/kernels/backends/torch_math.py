"""Backend "torch": the reference math, on any device and dtype, with any offset and window.

Plain torch in the accumulation dtype (fp32; fp64 for fp64 inputs, so a float64 problem
runs float64 end to end and tests compare it with a float64 dense reference). GQA by
head groups (K/V are never repeated); the scores are computed in chunks of query rows
so that one chunk holds at most `_ROW_CHUNK_ELEMENTS` of them. Rows that see no key get
`lse = -inf` and `out = 0`. Merged by the reference merge.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..memory import acc_dtype

_ROW_CHUNK_ELEMENTS = 1 << 25  # scores per chunk (128 MiB in fp32)


def _row_chunks(q: torch.Tensor, nk: int):
    b, nq, h, _ = q.shape
    rows = max(1, _ROW_CHUNK_ELEMENTS // max(1, b * h * nk))
    for start in range(0, nq, rows):
        yield start, min(nq, start + rows)


def _scores(q, k, scale, offset, row0, acc, lo=None, softcap=0.0):
    # q [B, r, H_kv, G, D], k [B, nk, H_kv, D] -> [B, H_kv, G, r, nk]
    s = torch.einsum("bihgd,bjhd->bhgij", q.to(acc), k.to(acc)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if offset is not None or lo is not None:
        i = torch.arange(row0, row0 + q.shape[1], device=q.device)[:, None]
        j = torch.arange(k.shape[1], device=q.device)[None, :]
        if offset is not None:
            s = s.masked_fill(j > i + offset, float("-inf"))
        if lo is not None:
            s = s.masked_fill(j < i + lo, float("-inf"))
    return s


BANDS = True  # takes the lower bound `lo` of a window natively (others: pieces.band_forward)
SOFTCAP = True  # takes `softcap` (the other backends do not: unavailable_reason says so)
VALUE_DIM = True  # takes v with a head dim of its own (others: block.py pads to one head dim)


def takes_precise_out(device: torch.device) -> bool:
    """The backward takes `out` in the accumulation dtype (it computes in it anyway)."""
    return True


def _safe(lse):
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def forward(q, k, v, scale, offset, lo=None, softcap=0.0):
    b, nq, h, d = q.shape
    h_kv, dv = k.shape[2], v.shape[3]
    acc = acc_dtype(q.dtype)
    qg = q.reshape(b, nq, h_kv, h // h_kv, d)
    out = torch.empty(b, nq, h_kv, h // h_kv, dv, dtype=acc, device=q.device)
    lse = torch.empty(b, h_kv, h // h_kv, nq, dtype=acc, device=q.device)
    vv = v.to(acc)
    for r0, r1 in _row_chunks(q, k.shape[1]):
        s = _scores(qg[:, r0:r1], k, scale, offset, r0, acc, lo, softcap)
        l = torch.logsumexp(s, dim=-1)
        # exp(s - max) / sum, not exp(s - lse): lse rounded to the accumulation dtype would
        # scale a whole row by up to an ulp of |lse| (an error the division cancels)
        p = torch.softmax(s, dim=-1)
        p = torch.where(torch.isneginf(l)[..., None], 0.0, p)  # a row that sees no key: 0, not NaN
        out[:, r0:r1] = torch.einsum("bhgij,bjhd->bihgd", p, vv)
        lse[..., r0:r1] = l
    return out.reshape(b, nq, h, dv), lse.reshape(b, h, nq)


def backward(do, q, k, v, out, lse, scale, offset, lo=None, softcap=0.0):
    b, nq, h, d = q.shape
    h_kv, dv_dim = k.shape[2], v.shape[3]
    g = h // h_kv
    acc = acc_dtype(q.dtype)
    qg = q.reshape(b, nq, h_kv, g, d)
    dog = do.reshape(b, nq, h_kv, g, dv_dim).to(acc)
    # delta = rowsum(dO * O): [B, H_kv, G, nq]
    delta = (dog * out.reshape(b, nq, h_kv, g, dv_dim).to(acc)).sum(-1).permute(0, 2, 3, 1)
    lse = _safe(lse.reshape(b, h_kv, g, nq).to(acc))
    kk, vv = k.to(acc), v.to(acc)
    dq = torch.empty(b, nq, h_kv, g, d, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for r0, r1 in _row_chunks(q, k.shape[1]):
        s = _scores(qg[:, r0:r1], k, scale, offset, r0, acc, lo, softcap)
        p = torch.exp(s - lse[..., r0:r1, None])
        dp = torch.einsum("bihgd,bjhd->bhgij", dog[:, r0:r1], vv)
        ds = p * (dp - delta[..., r0:r1, None])
        if softcap:
            # s = c tanh(x / c): ds/dx = 1 - tanh^2 = 1 - (s / c)^2 (masked entries have p = 0)
            ds = ds * (1 - (s.masked_fill(torch.isinf(s), 0.0) / softcap) ** 2)
        dq[:, r0:r1] = torch.einsum("bhgij,bjhd->bihgd", ds, kk) * scale
        dk += torch.einsum("bhgij,bihgd->bjhd", ds, qg[:, r0:r1].to(acc)) * scale
        dv += torch.einsum("bhgij,bihgd->bjhd", p, dog[:, r0:r1])
    return dq.reshape(b, nq, h, d), dk, dv


merge = None  # the reference merge


def unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int, scale: float = 1.0) -> Optional[str]:
    """The reference math serves every case."""
    return None
