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
    mask: Optional[torch.Tensor] = None,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
):
    """Softmax attention on one device, differentiable by autograd.

    `q` `[B, Nq, H, D]`, `k`/`v` `[B, Nk, H_kv, D]`. `causal` compares global positions
    (default `arange`): key j is visible to query i iff `k_positions[j] <= q_positions[i]`.
    `mask`: an optional bool `[Nq, Nk]`, True where a key is visible, applied on top of
    `causal`. `softcap > 0`: scores become `softcap * tanh(score / softcap)` (before the
    masks). `sinks` `[H]`: one more logit per head in every row's softmax, with a zero
    value (differentiable). Rows that see no key (and no sink) return 0 (and lse -inf).
    Computes in the input dtype.
    """
    b, nq, h, d = q.shape
    nk, h_kv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    group = h // h_kv
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if causal:
        qp = torch.arange(nq, device=q.device) if q_positions is None else q_positions.to(q.device)
        kp = torch.arange(nk, device=q.device) if k_positions is None else k_positions.to(q.device)
        visible = kp[None, :] <= qp[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask.to(q.device), float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.to(scores.dtype)[None, :, None, None].expand(b, h, nq, 1)], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe[..., None])
    if sinks is not None:
        probs = probs[..., :-1]
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    return (out, lse) if return_lse else out


def linear_attention_recurrent(q, k, v, g=None, *, scale=None, initial_state=None, cu_seqlens=None):
    """Causal linear attention token by token (the test oracle), differentiable by autograd.

    `S_t = exp(g_t) S_{t-1} + k_t^T v_t`, `o_t = scale q_t S_t`. q, k `[B, n, H, Dk]`,
    v `[B, n, H, Dv]`, g None, `[B, n, H]` or `[B, n, H, Dk]` (a gate per key channel, GLA:
    `S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t`), initial_state None or `[B, H, Dk, Dv]`.
    `cu_seqlens`: None or document boundaries `[0, l1, ..., n]`: the state restarts from zero
    at every document start (the initial state reaches only the first document).
    Returns (o `[B, n, H, Dv]`, final state `[B, H, Dk, Dv]`) in the input dtype.
    """
    b, n, h, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    state = q.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state
    starts = set() if cu_seqlens is None else {int(x) for x in list(cu_seqlens)[1:-1]}
    outs = []
    for t in range(n):
        if t in starts:
            state = torch.zeros_like(state)
        elif g is not None:
            factor = g[:, t].exp()
            state = state * (factor[..., None] if g.dim() == 4 else factor[..., None, None])
        state = state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outs, dim=1), state


def linear_attention_parallel(q, k, v, g=None, *, scale=None):
    """Causal linear attention in its quadratic (parallel) form, in the input dtype:
    `o = scale ((q k^T) * exp(G_i - G_j) [j <= i]) v` with `G` the cumulative log decay.
    What a plain PyTorch user would write; its error in low precision is the yardstick."""
    n = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bihk,bjhk->bhij", q, k)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    if g is None:
        weights = causal.to(q.dtype)
    else:
        cum = g.to(q.dtype).cumsum(1).transpose(1, 2)  # [B, H, n]
        weights = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    return torch.einsum("bhij,bjhv->bihv", scores * weights, v) * scale


def star_context_mask(local_lens, anchor_len: int) -> torch.Tensor:
    """Bool `[N, N]`: which keys Star attention's context phase lets each query see.

    `local_lens`: the contiguous block length of each rank, in rank order (N = their sum).
    A query at position t of a rank whose block starts at s sees keys `[0, anchor_len)`
    and `[s, t]`; on rank 0 (s = 0) that is plain causal attention.
    """
    n = sum(local_lens)
    block = torch.repeat_interleave(torch.arange(len(local_lens)), torch.tensor(list(local_lens)))
    pos = torch.arange(n)
    causal = pos[None, :] <= pos[:, None]
    same_block = block[None, :] == block[:, None]
    anchor = (pos < anchor_len)[None, :].expand(n, n)
    return causal & (same_block | anchor)


def delta_rule_recurrent(q, k, v, beta, g=None, *, scale=None, initial_state=None, cu_seqlens=None):
    """The gated delta rule token by token (the test oracle), differentiable by autograd.

    `S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t`, `o_t = scale q_t S_t`.
    q, k `[B, n, H, Dk]`, v `[B, n, H, Dv]`, beta `[B, n, H]`, g None or `[B, n, H]`,
    initial_state None or `[B, H, Dk, Dv]`; `cu_seqlens` restarts the state from zero at
    every document start. Returns (o, final state) in the input dtype."""
    b, n, h, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    state = q.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state
    starts = set() if cu_seqlens is None else {int(x) for x in list(cu_seqlens)[1:-1]}
    outs = []
    for t in range(n):
        if t in starts:
            state = torch.zeros_like(state)
        kt, bt = k[:, t], beta[:, t, :, None]  # [B, H, Dk], [B, H, 1]
        if g is not None:
            state = state * g[:, t].exp()[..., None, None]
        # (I - beta k^T k) S + beta k^T v = S + beta k^T (v - k S)
        err = v[:, t] - torch.einsum("bhk,bhkv->bhv", kt, state)
        state = state + (bt * kt)[..., None] * err[..., None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outs, dim=1), state
