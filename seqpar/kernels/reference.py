"""Dense references: the test oracle, and plain math any dtype/device can run."""
from __future__ import annotations

from typing import Optional

import torch


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    q_positions: Optional[torch.Tensor] = None,
    k_positions: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """Softmax attention on one device, differentiable by autograd.

    `q` `[B, Nq, H, D]`, `k`/`v` `[B, Nk, H_kv, D]`. `causal` compares global positions
    (default `arange`): key j is visible to query i iff `k_positions[j] <= q_positions[i]`.
    Rows that see no key return 0 (and lse -inf). Computes in the input dtype.
    """
    b, nq, h, d = q.shape
    nk, h_kv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    group = h // h_kv
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if causal:
        qp = torch.arange(nq, device=q.device) if q_positions is None else q_positions.to(q.device)
        kp = torch.arange(nk, device=q.device) if k_positions is None else k_positions.to(q.device)
        visible = kp[None, :] <= qp[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe[..., None])
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    return (out, lse) if return_lse else out
